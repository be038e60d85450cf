"""Background job runner: a FIFO queue with one worker thread, so one accelerator job runs at a time.

Job functions are plain callables `fn(params, ctx) -> dict | None`. They report through the
`JobContext` and stop cooperatively: `ctx.progress()` / `ctx.check_cancelled()` raise
`JobCancelled` once the user asked to cancel. Every state change is stored in SQLite (see
`workbench.store`), so the Runs tab and a restarted app see the same history.
"""

from __future__ import annotations

import json
import logging
import queue
import secrets
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from workbench.errors import InvalidInput, JobCancelled, WorkbenchError
from workbench.memory import is_out_of_memory, out_of_memory_error
from workbench.store import Job, JobStatus, JobStore

__all__ = ["Job", "JobContext", "JobRunner", "JobStatus", "get_runner"]

logger = logging.getLogger(__name__)

JobFn = Callable[[dict[str, Any], "JobContext"], "dict[str, Any] | None"]

WORKER_THREAD_NAME = "job-runner"
# A job whose own code did not say what to change when memory ran out gets this.
OUT_OF_MEMORY_ADVICE = ("Start it again with a smaller batch (and more gradient accumulation to keep the "
                        "effective batch), fewer images at once or a smaller resolution.")
# Progress may be reported every diffusion step; the database sees at most one write per interval.
PROGRESS_WRITE_INTERVAL_S = 0.2


def _log_line(message: str) -> str:
    return f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message.rstrip()}\n"


def _new_job_id() -> str:
    # Sortable by time and readable as a folder name, e.g. 20250101-120000-a1b2c3.
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


class JobContext:
    """What a running job sees: its parameters, its folder, and ways to report and to stop."""

    def __init__(self, job_id: str, params: dict[str, Any], run_dir: Path, store: JobStore, cancel_event: threading.Event):
        self.job_id = job_id
        self.params = params
        self.run_dir = run_dir
        self._store = store
        self._cancel_event = cancel_event
        self._fraction = 0.0
        self._stage = ""
        self._pending_log: list[str] = []
        self._last_write = 0.0
        self._dirty = False  # progress reported but not yet written

    @property
    def cancelled(self) -> bool:
        return self._cancel_event.is_set()

    @property
    def stage(self) -> str:
        return self._stage

    @property
    def fraction(self) -> float:
        return self._fraction

    def check_cancelled(self) -> None:
        if self._dirty:
            self.flush()  # a throttled progress update is written once its interval has passed
        if self._cancel_event.is_set():
            raise JobCancelled(f"job {self.job_id} was cancelled")

    def progress(self, fraction: float, stage: str | None = None) -> None:
        """Report progress in 0..1; `stage` replaces the stage message if given. Raises JobCancelled."""
        self._fraction = min(1.0, max(0.0, float(fraction)))
        if stage is not None:
            self._stage = stage
        self._dirty = True
        self.check_cancelled()

    def log(self, message: str) -> None:
        self._pending_log.append(_log_line(message))
        self._dirty = True
        self.flush()

    def flush(self, force: bool = False) -> None:
        """Write pending progress and log lines (throttled unless `force`). Call with force=True
        before a long step that reports nothing, so the UI does not show a stale state meanwhile."""
        now = time.monotonic()
        if not force and now - self._last_write < PROGRESS_WRITE_INTERVAL_S:
            return
        self._last_write = now
        self._dirty = False
        self._store.update_progress(self.job_id, self._fraction, self._stage, self._take_pending_log())

    def _take_pending_log(self) -> str:
        text = "".join(self._pending_log)
        self._pending_log.clear()
        return text


START_AGAIN = ("Start it again with the Runs tab's Run again (or the Train tab's Continue): a training run (IPR, "
               "SELMA, RECAP, ReFL) continues from its last checkpoint, other jobs run anew with the same settings.")
INTERRUPTED_REASON = "The app stopped (was closed or crashed) while this job was queued or running. " + START_AGAIN


class JobRunner:
    def __init__(self, db_path: Path, runs_dir: Path):
        self.runs_dir = Path(runs_dir)
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self._store = JobStore(db_path)
        # Jobs left queued or running by a previous process can never finish now.
        stale = self._store.interrupt(time.time(), reason=INTERRUPTED_REASON)
        if stale:
            logger.info("marked %d job(s) from a previous run as interrupted", stale)
        self._functions: dict[str, JobFn] = {}
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._lock = threading.Lock()
        self._running: dict[str, threading.Event] = {}  # job id -> its cancel event
        self._finished = threading.Condition()
        self._stopping = False
        self._worker = threading.Thread(target=self._work, name=WORKER_THREAD_NAME, daemon=True)
        self._worker.start()

    # -- public API ---------------------------------------------------------------------------

    def register(self, kind: str, fn: JobFn) -> None:
        """Register (or replace) the function that runs jobs of `kind`."""
        self._functions[kind] = fn

    def submit(self, kind: str, params: dict[str, Any]) -> str:
        if kind not in self._functions:
            known = ", ".join(sorted(self._functions)) or "none"
            raise InvalidInput(f"Unknown job kind {kind!r} (registered: {known}).")
        if self._stopping:
            raise WorkbenchError("The job runner is shutting down; no new jobs are accepted.")
        try:
            params = json.loads(json.dumps(params))  # a copy the caller cannot mutate later
        except (TypeError, ValueError) as error:
            raise InvalidInput(f"Job parameters must be JSON-serialisable: {error}") from error
        job = Job(id=_new_job_id(), kind=kind, params=params, status=JobStatus.QUEUED, created_at=time.time())
        self._store.insert(job)
        self._queue.put(job.id)
        return job.id

    def get(self, job_id: str) -> Job | None:
        return self._store.get(job_id)

    def running(self) -> list[Job]:
        """The jobs the worker is running now (at most one)."""
        with self._lock:
            ids = list(self._running)
        jobs = (self._store.get(job_id) for job_id in ids)
        return [job for job in jobs if job is not None and job.status is JobStatus.RUNNING]

    def list_jobs(self, limit: int = 200, with_log: bool = True) -> list[Job]:
        return self._store.list_jobs(limit, with_log)

    def waiting_note(self, job: Job) -> str:
        """For a queued job, the job it waits for ('' for any other): the worker runs one job at a time,
        so a short job queued behind a long training run would otherwise seem stuck."""
        if job.status is not JobStatus.QUEUED:
            return ""
        ahead = [other for other in self.running() if other.id != job.id]
        if not ahead:
            return ""
        return (f"Waiting for job `{ahead[0].id}` ({ahead[0].kind}, {ahead[0].progress:.0%}) to finish: jobs run "
                f"one at a time (the Runs tab can cancel it).")

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued job at once, or ask a running one to stop. False if neither."""
        if self._store.cancel_queued(job_id, time.time()):
            self._notify_finished()
            return True
        with self._lock:
            event = self._running.get(job_id)
        if event is None:
            return False
        event.set()
        return True

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """Block until the job is finished; raises TimeoutError after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self._store.get(job_id)
            if job is None:
                raise InvalidInput(f"No job with id {job_id!r}.")
            if job.status.is_finished:
                return job
            remaining = 0.5 if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"job {job_id} still {job.status.value} after {timeout} s")
            # Re-check at least every 0.5 s, in case another runner or process finished the job.
            with self._finished:
                self._finished.wait(min(remaining, 0.5))

    def shutdown(self, wait: bool = True) -> None:
        """Stop the worker: the running job is asked to stop, queued ones are marked interrupted."""
        self._stopping = True
        now = time.time()
        while True:
            try:
                job_id = self._queue.get_nowait()
            except queue.Empty:
                break
            if job_id is not None:
                self._store.interrupt(now, job_id, reason="The app stopped before this job started. " + START_AGAIN)
        with self._lock:
            for event in self._running.values():
                event.set()
        self._queue.put(None)
        self._notify_finished()
        # The store stays open: the history can still be read after shutdown.
        if wait and threading.current_thread() is not self._worker:
            self._worker.join()

    # -- worker -------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            job_id = self._queue.get()
            if job_id is None:
                return
            try:
                self._run_one(job_id)
            except Exception as exc:  # a bug here must not stop the worker for the jobs after it
                logger.exception("job runner failed while handling job %s", job_id)
                error = f"{type(exc).__name__}: {exc}"
                self._store.finish(job_id, JobStatus.FAILED, time.time(), 0.0, "", _log_line(error), error=error)
            self._notify_finished()

    def _run_one(self, job_id: str) -> None:
        cancel_event = threading.Event()
        # Registered before claiming, so a cancel arriving right after the claim finds the event.
        with self._lock:
            self._running[job_id] = cancel_event
        try:
            if not self._store.claim(job_id, time.time()):
                return  # cancelled while queued
            job = self._store.get(job_id)
            run_dir = self.runs_dir / job_id
            run_dir.mkdir(parents=True, exist_ok=True)
            ctx = JobContext(job_id, job.params, run_dir, self._store, cancel_event)
            ctx.log(f"started {job.kind}")
            self._execute(job, ctx)
        finally:
            with self._lock:
                del self._running[job_id]

    def _execute(self, job: Job, ctx: JobContext) -> None:
        error = None
        outputs: dict[str, Any] = {}
        try:
            fn = self._functions[job.kind]
            result = fn(job.params, ctx)
            outputs = _check_outputs(result)
            status = JobStatus.DONE
            ctx.log("done")
        except JobCancelled:
            # Stopped by shutdown (not by the user): the job did not choose to end, it was cut off.
            status = JobStatus.INTERRUPTED if self._stopping else JobStatus.CANCELLED
            ctx.log(status.value)
        except Exception as exc:
            status = JobStatus.FAILED
            if isinstance(exc, WorkbenchError):
                error = str(exc)
            elif is_out_of_memory(exc):
                error = str(out_of_memory_error(f"running this {job.kind} job", OUT_OF_MEMORY_ADVICE))
            else:
                error = f"{type(exc).__name__}: {exc}"
            ctx.log(f"failed: {error}\n{traceback.format_exc()}")
        self._store.finish(
            job.id,
            status,
            finished_at=time.time(),
            progress=1.0 if status is JobStatus.DONE else ctx.fraction,
            stage=ctx.stage,
            log_append=ctx._take_pending_log(),
            error=error,
            outputs=outputs,
        )

    def _notify_finished(self) -> None:
        with self._finished:
            self._finished.notify_all()


def _check_outputs(result: Any) -> dict[str, Any]:
    if result is None:
        return {}
    if not isinstance(result, dict):
        raise TypeError(f"job function must return a dict or None, got {type(result).__name__}")
    json.dumps(result)  # raises TypeError now rather than when the row is written
    return result


def run_names(runs_dir: Path, holds: Callable[[Path], bool]) -> list[str]:
    """Names of the run folders under `runs_dir` that `holds` accepts, newest first."""
    runs_dir = Path(runs_dir)
    found = [child for child in runs_dir.iterdir() if child.is_dir() and holds(child)] if runs_dir.is_dir() else []
    return [child.name for child in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)]


_runner: JobRunner | None = None
_runner_lock = threading.Lock()


def running_jobs() -> list[Job]:
    """The process-wide runner's running jobs; none when no runner was started (starts none)."""
    with _runner_lock:
        runner = _runner
    return runner.running() if runner is not None else []


def get_runner() -> JobRunner:
    """The process-wide runner, on the database and runs folder from the settings."""
    global _runner
    with _runner_lock:
        if _runner is None:
            from workbench.config import get_settings

            settings = get_settings()
            _runner = JobRunner(settings.db_path, settings.runs_dir)
        return _runner
