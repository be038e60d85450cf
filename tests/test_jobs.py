"""Job runner: progress, outputs, cancel, failure, FIFO order, restart, and the Runs tab."""

from __future__ import annotations

import threading
import time

import pytest

from workbench.errors import InvalidInput
from workbench.jobs import Job, JobContext, JobRunner, JobStatus, get_runner
from workbench.store import JobStore

TIMEOUT = 5.0


@pytest.fixture
def make_runner(tmp_path):
    runners: list[JobRunner] = []

    def make() -> JobRunner:
        runner = JobRunner(tmp_path / "jobs.db", tmp_path / "runs")
        runners.append(runner)
        return runner

    yield make
    for runner in runners:
        runner.shutdown(wait=True)


@pytest.fixture
def runner(make_runner) -> JobRunner:
    return make_runner()


def wait_until(condition, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def blocking_job(release: threading.Event):
    """A job that reports progress until `release` is set (or it is cancelled)."""

    def run(params: dict, ctx: JobContext) -> dict:
        ctx.progress(0.5, "halfway")
        while not release.is_set():
            ctx.check_cancelled()
            time.sleep(0.01)
        return {"released": True}

    return run


def test_outputs_are_stored_and_run_dir_created(runner):
    def write_file(params: dict, ctx: JobContext) -> dict:
        (ctx.run_dir / "out.txt").write_text(params["text"])
        ctx.log("wrote out.txt")
        return {"file": "out.txt", "n": 3}

    runner.register("write", write_file)
    job_id = runner.submit("write", {"text": "hello"})
    job = runner.wait(job_id, timeout=TIMEOUT)

    assert job.status is JobStatus.DONE
    assert job.outputs == {"file": "out.txt", "n": 3}
    assert job.params == {"text": "hello"}
    assert job.progress == 1.0
    assert job.error is None
    assert job.created_at <= job.started_at <= job.finished_at
    assert "wrote out.txt" in job.log
    assert (runner.runs_dir / job_id / "out.txt").read_text() == "hello"


def test_progress_is_visible_while_running(runner):
    release = threading.Event()
    runner.register("block", blocking_job(release))
    job_id = runner.submit("block", {})

    wait_until(lambda: runner.get(job_id).status is JobStatus.RUNNING and runner.get(job_id).progress == 0.5)
    job = runner.get(job_id)
    assert job.stage == "halfway"
    assert job.started_at is not None and job.finished_at is None

    release.set()
    assert runner.wait(job_id, timeout=TIMEOUT).status is JobStatus.DONE


def test_progress_writes_are_throttled_but_final_state_is_written(runner, monkeypatch):
    writes = []
    real_update = runner._store.update_progress
    monkeypatch.setattr(
        runner._store, "update_progress", lambda *args: (writes.append(args), real_update(*args))
    )

    def many_steps(params: dict, ctx: JobContext) -> None:
        for step in range(1000):
            ctx.progress(step / 1000, f"step {step}")

    runner.register("steps", many_steps)
    job = runner.wait(runner.submit("steps", {}), timeout=TIMEOUT)
    assert job.status is JobStatus.DONE
    assert len(writes) < 20  # 1000 progress calls, a handful of database writes
    assert job.stage == "step 999"  # the last stage is kept even though most writes were skipped
    assert job.progress == 1.0


def test_throttled_progress_reaches_the_database_while_running(runner):
    release = threading.Event()

    def quick_updates(params: dict, ctx: JobContext) -> None:
        ctx.log("first write")  # makes the next progress call fall inside the throttle interval
        ctx.progress(0.25)
        while not release.is_set():
            ctx.check_cancelled()
            time.sleep(0.01)

    runner.register("quick", quick_updates)
    job_id = runner.submit("quick", {})
    wait_until(lambda: runner.get(job_id).progress == 0.25, timeout=2)
    release.set()
    runner.wait(job_id, timeout=TIMEOUT)


def test_cancel_running_job(runner):
    release = threading.Event()
    runner.register("block", blocking_job(release))
    job_id = runner.submit("block", {})
    wait_until(lambda: runner.get(job_id).status is JobStatus.RUNNING)

    requested = time.monotonic()
    assert runner.cancel(job_id) is True
    job = runner.wait(job_id, timeout=TIMEOUT)

    assert job.status is JobStatus.CANCELLED
    assert time.monotonic() - requested < 3
    assert job.outputs == {}
    assert runner.cancel(job_id) is False  # already finished


def test_cancel_queued_job_never_runs(runner):
    release = threading.Event()
    ran = []
    runner.register("block", blocking_job(release))
    runner.register("record", lambda params, ctx: ran.append(params["n"]))
    first = runner.submit("block", {})
    queued = runner.submit("record", {"n": 1})

    assert runner.get(queued).status is JobStatus.QUEUED
    assert runner.cancel(queued) is True
    assert runner.get(queued).status is JobStatus.CANCELLED

    release.set()
    runner.wait(first, timeout=TIMEOUT)
    after = runner.submit("record", {"n": 2})
    runner.wait(after, timeout=TIMEOUT)
    assert ran == [2]
    assert runner.get(queued).started_at is None
    assert not (runner.runs_dir / queued).exists()


def test_a_queued_job_says_which_job_it_waits_for(runner):
    from workbench.ui.generate import follow_job

    release = threading.Event()
    runner.register("block", blocking_job(release))
    runner.register("record", lambda params, ctx: None)
    first = runner.submit("block", {})
    wait_until(lambda: runner.get(first).status is JobStatus.RUNNING)
    queued = runner.submit("record", {})
    note = runner.waiting_note(runner.get(queued))
    assert f"Waiting for job `{first}` (block" in note and "one at a time" in note
    _, line = next(follow_job(runner, queued, 0.01))  # what the Compare and Generate tabs show meanwhile
    assert line.startswith(f"Job `{queued}` is queued.") and first in line
    assert runner.waiting_note(runner.get(first)) == ""  # a running job waits for nothing
    release.set()
    runner.wait(queued, timeout=TIMEOUT)
    assert runner.waiting_note(runner.get(queued)) == ""


def test_failing_job_records_error_and_runner_keeps_working(runner):
    def explode(params: dict, ctx: JobContext) -> None:
        ctx.progress(0.3, "about to fail")
        raise ValueError("bad things")

    runner.register("explode", explode)
    runner.register("ok", lambda params, ctx: {"fine": True})
    failed = runner.wait(runner.submit("explode", {}), timeout=TIMEOUT)

    assert failed.status is JobStatus.FAILED
    assert failed.error == "ValueError: bad things"
    assert "Traceback" in failed.log and "bad things" in failed.log
    assert failed.progress == pytest.approx(0.3)
    assert failed.stage == "about to fail"

    ok = runner.wait(runner.submit("ok", {}), timeout=TIMEOUT)
    assert ok.status is JobStatus.DONE and ok.outputs == {"fine": True}


def test_non_json_outputs_fail_the_job(runner):
    runner.register("bad_outputs", lambda params, ctx: {"value": object()})
    job = runner.wait(runner.submit("bad_outputs", {}), timeout=TIMEOUT)
    assert job.status is JobStatus.FAILED
    assert "TypeError" in job.error


def test_one_job_at_a_time_in_fifo_order(runner):
    active = 0
    max_active = 0
    order: list[int] = []
    lock = threading.Lock()

    def tracked(params: dict, ctx: JobContext) -> None:
        nonlocal active, max_active
        with lock:
            active += 1
            max_active = max(max_active, active)
        order.append(params["n"])
        time.sleep(0.02)
        with lock:
            active -= 1

    runner.register("tracked", tracked)
    job_ids = [runner.submit("tracked", {"n": n}) for n in range(5)]
    for job_id in job_ids:
        assert runner.wait(job_id, timeout=TIMEOUT).status is JobStatus.DONE

    assert order == [0, 1, 2, 3, 4]
    assert max_active == 1
    assert [job.id for job in runner.list_jobs()] == job_ids[::-1]  # newest first


def test_restart_keeps_history_and_interrupts_running_job(make_runner):
    release = threading.Event()
    first = make_runner()
    first.register("block", blocking_job(release))
    first.register("ok", lambda params, ctx: {"answer": 42})
    done_id = first.submit("ok", {})
    first.wait(done_id, timeout=TIMEOUT)
    running_id = first.submit("block", {})
    queued_id = first.submit("ok", {})
    wait_until(lambda: first.get(running_id).status is JobStatus.RUNNING)

    # The "process died": a second runner opens the same database while the first still holds the job.
    second = make_runner()
    assert second.get(done_id).status is JobStatus.DONE
    assert second.get(done_id).outputs == {"answer": 42}
    assert second.get(running_id).status is JobStatus.INTERRUPTED
    assert second.get(queued_id).status is JobStatus.INTERRUPTED
    assert second.get(running_id).finished_at is not None
    assert {job.id for job in second.list_jobs()} == {done_id, running_id, queued_id}

    # The old worker finishing late must not overwrite what the new runner decided.
    release.set()
    wait_until(lambda: first._queue.empty())
    first.shutdown(wait=True)
    assert second.get(running_id).status is JobStatus.INTERRUPTED
    assert second.wait(queued_id, timeout=TIMEOUT).status is JobStatus.INTERRUPTED


def test_row_left_running_in_database_becomes_interrupted(tmp_path):
    store = JobStore(tmp_path / "jobs.db")
    store.insert(Job(id="old", kind="generate", params={"prompt": "a cat"}, status=JobStatus.RUNNING,
                     progress=0.4, created_at=time.time(), started_at=time.time()))
    store.close()

    runner = JobRunner(tmp_path / "jobs.db", tmp_path / "runs")
    try:
        job = runner.get("old")
        assert job.status is JobStatus.INTERRUPTED
        assert job.params == {"prompt": "a cat"}
        assert job.progress == pytest.approx(0.4)
    finally:
        runner.shutdown()


def test_a_job_the_app_died_under_says_so_and_ends_at_its_last_report(tmp_path):
    store = JobStore(tmp_path / "jobs.db")
    started = time.time() - 100
    store.insert(Job(id="old", kind="eval", params={}, status=JobStatus.RUNNING, created_at=started,
                     started_at=started))
    store.update_progress("old", 0.5, "evaluating", "halfway\n")
    last_report = time.time()
    store.close()
    time.sleep(0.2)  # the app is down for a while

    runner = JobRunner(tmp_path / "jobs.db", tmp_path / "runs")
    try:
        job = runner.get("old")
        assert job.status is JobStatus.INTERRUPTED
        assert "The app stopped" in job.error and "Run again" in job.error
        assert job.finished_at == pytest.approx(last_report, abs=0.1)  # not the restart
        assert job.duration == pytest.approx(100, abs=1)
    finally:
        runner.shutdown()


def test_a_database_written_before_updated_at_existed_opens_and_keeps_its_jobs(tmp_path):
    import sqlite3

    with sqlite3.connect(tmp_path / "jobs.db") as old:
        old.executescript("""
            CREATE TABLE jobs (id TEXT PRIMARY KEY, kind TEXT NOT NULL, params TEXT NOT NULL, status TEXT NOT NULL,
                progress REAL NOT NULL DEFAULT 0, stage TEXT NOT NULL DEFAULT '', log TEXT NOT NULL DEFAULT '',
                error TEXT, outputs TEXT NOT NULL DEFAULT '{}', created_at REAL NOT NULL, started_at REAL,
                finished_at REAL);
            INSERT INTO jobs (id, kind, params, status, created_at, started_at, finished_at)
                VALUES ('done', 'generate', '{}', 'done', 1.0, 2.0, 3.0);
        """)
    old.close()
    runner = JobRunner(tmp_path / "jobs.db", tmp_path / "runs")
    try:
        assert runner.get("done").status is JobStatus.DONE and runner.get("done").duration == 1.0
        runner.register("ok", lambda params, ctx: {"answer": 1})
        assert runner.wait(runner.submit("ok", {}), timeout=TIMEOUT).status is JobStatus.DONE
    finally:
        runner.shutdown()


def test_shutdown_interrupts_running_and_queued_jobs(make_runner):
    runner = make_runner()
    runner.register("block", blocking_job(threading.Event()))
    running_id = runner.submit("block", {})
    queued_id = runner.submit("block", {})
    wait_until(lambda: runner.get(running_id).status is JobStatus.RUNNING)

    runner.shutdown(wait=True)
    assert runner.get(running_id).status is JobStatus.INTERRUPTED
    assert runner.get(queued_id).status is JobStatus.INTERRUPTED


def test_invalid_submissions(runner):
    with pytest.raises(InvalidInput, match="Unknown job kind"):
        runner.submit("nope", {})
    runner.register("ok", lambda params, ctx: None)
    with pytest.raises(InvalidInput, match="JSON"):
        runner.submit("ok", {"value": object()})
    assert runner.list_jobs() == []


def test_wait_times_out(runner):
    release = threading.Event()
    runner.register("block", blocking_job(release))
    job_id = runner.submit("block", {})
    with pytest.raises(TimeoutError):
        runner.wait(job_id, timeout=0.2)
    release.set()
    assert runner.wait(job_id, timeout=TIMEOUT).status is JobStatus.DONE


def test_get_runner_uses_settings(data_dir):
    import workbench.jobs as jobs

    jobs._runner = None
    try:
        runner = get_runner()
        assert get_runner() is runner
        assert runner.runs_dir == data_dir.resolve() / "runs"
        assert (data_dir / "workbench.db").exists()
    finally:
        if jobs._runner is not None:
            jobs._runner.shutdown()
        jobs._runner = None


def test_runs_tab_builds_and_shows_jobs(runner):
    import gradio as gr

    from workbench.ui.runs import build_runs_tab, job_details, jobs_table

    runner.register("ok", lambda params, ctx: {"images": 2})
    job_id = runner.submit("ok", {"prompt": "a red cube"})
    runner.wait(job_id, timeout=TIMEOUT)

    with gr.Blocks() as demo:
        with gr.Tab("Runs"):
            build_runs_tab(runner)
    assert any(isinstance(block, gr.Timer) for block in demo.blocks.values())

    table = jobs_table(runner.list_jobs())
    assert table.loc[0, "id"] == job_id
    assert table.loc[0, "status"] == "done"
    assert table.loc[0, "progress %"] == 100
    params, log, outputs, error = job_details(runner, job_id)
    assert params == {"prompt": "a red cube"} and outputs == {"images": 2} and error == ""
    assert "done" in log


def test_run_again_starts_a_finished_job_anew_and_a_training_run_continues_in_its_folder(runner, tmp_path, monkeypatch):
    from workbench.ui import runs

    runner.register("ok", lambda params, ctx: {"seen": params})
    job_id = runner.submit("ok", {"prompt": "a red cube"})
    runner.wait(job_id, timeout=TIMEOUT)
    message = runs.run_again(runner, job_id)
    new_id = message.split("`")[1]
    assert new_id != job_id and runner.wait(new_id, timeout=TIMEOUT).outputs == {"seen": {"prompt": "a red cube"}}
    assert runs.run_again(runner, None) == "Select a job first."

    release = threading.Event()
    runner.register("block", blocking_job(release))
    busy = runner.submit("block", {})
    wait_until(lambda: runner.get(busy).status is JobStatus.RUNNING)
    assert runs.run_again(runner, busy) == f"`{busy}` is still running."
    release.set()
    runner.wait(busy, timeout=TIMEOUT)

    # A training run is continued where it is, not started afresh.
    continued = []
    monkeypatch.setattr(runs, "continue_run", lambda runner, run, reviewed, kind: continued.append((run, kind))
                        or ("job", f"Run `{run}`: continuing"))
    runner.register("ipr", lambda params, ctx: None)
    first = runner.submit("ipr", {"iterations": 1})
    runner.wait(first, timeout=TIMEOUT)
    assert runs.run_again(runner, first) == f"Run `{first}`: continuing" and continued == [(first, "ipr")]
    again = runner.submit("ipr", {"resume_dir": str(tmp_path / "runs" / first)})
    runner.wait(again, timeout=TIMEOUT)
    runs.run_again(runner, again)
    assert continued[-1] == (first, "ipr")
