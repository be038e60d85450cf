"""SQLite persistence for jobs, so the run history survives a restart.

One connection shared by all threads, guarded by a lock: the worker thread writes progress
while Gradio's threads read the table. WAL mode lets another process (the CLI, a second app)
read the same file while we write.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any


class JobStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"  # was queued or running when the process stopped

    @property
    def is_finished(self) -> bool:
        return self not in (JobStatus.QUEUED, JobStatus.RUNNING)


@dataclass
class Job:
    id: str
    kind: str
    params: dict[str, Any]
    status: JobStatus
    progress: float = 0.0
    stage: str = ""
    log: str = ""
    error: str | None = None
    outputs: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None

    @property
    def duration(self) -> float | None:
        """Seconds spent running so far (or in total, once finished); None if it never started."""
        if self.started_at is None:
            return None
        end = self.finished_at if self.finished_at is not None else time.time()
        return max(0.0, end - self.started_at)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    params TEXT NOT NULL,
    status TEXT NOT NULL,
    progress REAL NOT NULL DEFAULT 0,
    stage TEXT NOT NULL DEFAULT '',
    log TEXT NOT NULL DEFAULT '',
    error TEXT,
    outputs TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_created_at ON jobs (created_at);
"""

_ACTIVE = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)


def connect_database(db_path: Path, schema: str) -> sqlite3.Connection:
    """The app's SQLite file (created if needed) with `schema` applied; every table lives in it.

    Autocommit (isolation_level=None: each statement is its own transaction), WAL so another process
    (the CLI, a second app) reads while we write, shareable across threads behind the caller's lock.
    """
    db_path = Path(db_path)
    db_path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None, timeout=10)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(schema)
    return conn


class JobStore:
    def __init__(self, db_path: Path):
        self._lock = threading.Lock()
        self._conn = connect_database(db_path, _SCHEMA)
        # Added after the first release: when a running job last reported, so a job the app died under
        # is dated by its last sign of life, not by the restart.
        if "updated_at" not in {row["name"] for row in self._conn.execute("PRAGMA table_info(jobs)")}:
            self._conn.execute("ALTER TABLE jobs ADD COLUMN updated_at REAL")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _execute(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._conn.execute(sql, args)

    def insert(self, job: Job) -> None:
        self._execute(
            "INSERT INTO jobs (id, kind, params, status, progress, stage, log, error, outputs,"
            " created_at, started_at, finished_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                job.id,
                job.kind,
                json.dumps(job.params),
                JobStatus(job.status).value,
                job.progress,
                job.stage,
                job.log,
                job.error,
                json.dumps(job.outputs),
                job.created_at,
                job.started_at,
                job.finished_at,
            ),
        )

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job_from_row(row) if row else None

    def list_jobs(self, limit: int = 200, with_log: bool = True) -> list[Job]:
        """The newest jobs first; without their logs (`with_log=False`, left empty) for pages that poll
        the list every second or two, since a long run's log grows to many kilobytes."""
        columns = "*" if with_log else ("id, kind, params, status, progress, stage, '' AS log, error, outputs, "
                                        "created_at, started_at, finished_at")
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {columns} FROM jobs ORDER BY created_at DESC, rowid DESC LIMIT ?", (limit,)
            ).fetchall()
        return [_job_from_row(row) for row in rows]

    def claim(self, job_id: str, started_at: float) -> bool:
        """queued -> running; False if the job was cancelled (or taken) meanwhile."""
        cursor = self._execute(
            "UPDATE jobs SET status = ?, started_at = ? WHERE id = ? AND status = ?",
            (JobStatus.RUNNING.value, started_at, job_id, JobStatus.QUEUED.value),
        )
        return cursor.rowcount == 1

    def update_progress(self, job_id: str, progress: float, stage: str, log_append: str) -> None:
        # Only a running job moves: another runner may have marked it interrupted meanwhile.
        self._execute(
            "UPDATE jobs SET progress = ?, stage = ?, log = log || ?, updated_at = ? WHERE id = ? AND status = ?",
            (progress, stage, log_append, time.time(), job_id, JobStatus.RUNNING.value),
        )

    def finish(
        self,
        job_id: str,
        status: JobStatus,
        finished_at: float,
        progress: float,
        stage: str,
        log_append: str,
        error: str | None = None,
        outputs: dict[str, Any] | None = None,
    ) -> bool:
        cursor = self._execute(
            "UPDATE jobs SET status = ?, finished_at = ?, progress = ?, stage = ?, log = log || ?,"
            " error = ?, outputs = ? WHERE id = ? AND status = ?",
            (
                status.value,
                finished_at,
                progress,
                stage,
                log_append,
                error,
                json.dumps(outputs or {}),
                job_id,
                JobStatus.RUNNING.value,
            ),
        )
        return cursor.rowcount == 1

    def cancel_queued(self, job_id: str, finished_at: float) -> bool:
        cursor = self._execute(
            "UPDATE jobs SET status = ?, finished_at = ? WHERE id = ? AND status = ?",
            (JobStatus.CANCELLED.value, finished_at, job_id, JobStatus.QUEUED.value),
        )
        return cursor.rowcount == 1

    def interrupt(self, finished_at: float, job_id: str | None = None, reason: str | None = None) -> int:
        """Mark queued/running jobs interrupted (all of them, or just `job_id`), with `reason` as their error
        unless they have one; returns how many. A running job ends at its last progress report when
        that is known (the process may have died long before `finished_at`)."""
        sql = ("UPDATE jobs SET status = ?, error = COALESCE(error, ?),"
               " finished_at = CASE WHEN status = ? THEN COALESCE(updated_at, ?) ELSE ? END WHERE status IN (?, ?)")
        args: tuple = (JobStatus.INTERRUPTED.value, reason, JobStatus.RUNNING.value, finished_at, finished_at,
                       *_ACTIVE)
        if job_id is not None:
            sql += " AND id = ?"
            args += (job_id,)
        return self._execute(sql, args).rowcount


def _job_from_row(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        kind=row["kind"],
        params=json.loads(row["params"]),
        status=JobStatus(row["status"]),
        progress=row["progress"],
        stage=row["stage"],
        log=row["log"],
        error=row["error"],
        outputs=json.loads(row["outputs"]),
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
    )


def bind_run_config(out_dir: Path, settings: dict, what: str, ignore: tuple[str, ...] = (),
                    implied: dict | None = None) -> None:
    """A run folder belongs to one configuration: write `settings` as its config.json, or check that
    they match the saved ones (keys in `ignore` may differ), since continuing with others would mix results.
    `implied` gives settings added after older runs were saved, with the value those runs had."""
    import os

    path = Path(out_dir) / "config.json"
    # A run that stopped before any work (a missing model, say) holds nothing but its config: a rerun with
    # corrected settings takes the folder over instead of being refused.
    started = path.exists() and any(entry.name != "config.json" for entry in Path(out_dir).iterdir())
    if started:
        from .errors import InvalidInput

        try:
            saved = json.loads(path.read_text())
        except ValueError:
            raise InvalidInput(f"{path} is damaged (not JSON): choose a new output folder.") from None
        if "kind" in settings and isinstance(saved, dict) and saved.get("kind", settings["kind"]) != settings["kind"]:
            raise InvalidInput(f"{out_dir} holds another kind of run ({saved['kind']}), not {what}: choose a new "
                               f"output folder.")
        saved = {**(implied or {}), **saved}
        differing = sorted(k for k in settings if k not in ignore and saved.get(k) != settings[k])
        if differing:
            raise InvalidInput(f"{out_dir} holds {what} with other settings ({', '.join(differing)}); "
                               f"continue it with the same settings or choose a new output folder.")
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(settings, indent=2))
    os.replace(tmp, path)


def refuse_run_folder(out_dir: Path | str, what: str) -> None:
    """InvalidInput when `out_dir` holds a run (its config.json): `what` would be written among its files."""
    if (Path(out_dir) / "config.json").is_file():
        from .errors import InvalidInput

        raise InvalidInput(f"{out_dir} holds a run (config.json); give a new folder for {what}.")


def check_output_folder(folder: Path | str) -> Path:
    """The folder to write into, checked before any work: InvalidInput when a file stands at its path."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        from .errors import InvalidInput

        raise InvalidInput(f"{folder} is a file; give a folder to write into.")
    return folder


def write_json(path: Path, data) -> None:
    """Write JSON atomically (temp file, then rename): a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSONL file the workbench wrote (write_jsonl, an evaluation's verdicts); blank lines
    are skipped. Files a user gives are read by validating readers (imagefolder, evaluation, reviews)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write one JSON object per line, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    os.replace(tmp, path)


def walk_folders(root: Path, skip: set[str], max_depth: int | None = None):
    """(folder, its file names) for root and the folders below it, not descending into folders named in
    `skip` (a data folder's generated images are most of its files) nor below `max_depth` levels."""
    root = Path(root)
    for folder, subfolders, files in os.walk(root):
        depth = len(Path(folder).relative_to(root).parts)
        subfolders[:] = [] if max_depth is not None and depth >= max_depth else [
            name for name in subfolders if name not in skip]
        yield Path(folder), files
