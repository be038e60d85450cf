"""JobStore: WAL mode, safe writes from several threads, and status transitions that cannot go backwards."""

from __future__ import annotations

import sqlite3
import threading
import time

from workbench.store import Job, JobStatus, JobStore


def queued_job(job_id: str) -> Job:
    return Job(id=job_id, kind="test", params={"n": 1}, status=JobStatus.QUEUED, created_at=time.time())


def test_database_uses_wal_mode(tmp_path):
    JobStore(tmp_path / "jobs.db").close()
    with sqlite3.connect(tmp_path / "jobs.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_concurrent_writes_from_threads_are_all_kept(tmp_path):
    store = JobStore(tmp_path / "jobs.db")
    store.insert(queued_job("shared"))
    store.claim("shared", time.time())

    def write(thread_index: int) -> None:
        store.insert(queued_job(f"job-{thread_index}"))
        for step in range(50):
            store.update_progress("shared", step / 50, "", f"{thread_index}:{step}\n")

    threads = [threading.Thread(target=write, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(store.list_jobs()) == 9
    assert len(store.get("shared").log.splitlines()) == 8 * 50


def test_finished_job_cannot_be_claimed_or_interrupted(tmp_path):
    store = JobStore(tmp_path / "jobs.db")
    store.insert(queued_job("a"))
    assert store.claim("a", time.time()) is True
    assert store.claim("a", time.time()) is False  # already running
    assert store.finish("a", JobStatus.DONE, time.time(), 1.0, "", "", outputs={"x": 1}) is True
    assert store.cancel_queued("a", time.time()) is False
    assert store.interrupt(time.time()) == 0
    job = store.get("a")
    assert job.status is JobStatus.DONE and job.outputs == {"x": 1}
    assert store.get("missing") is None


def test_a_run_folder_that_failed_before_any_work_takes_corrected_settings(tmp_path):
    import json

    import pytest

    from workbench.errors import InvalidInput
    from workbench.store import bind_run_config

    run = tmp_path / "run"
    run.mkdir()
    bind_run_config(run, {"model": "/no/such/model", "lr": 1e-4}, "a run")  # then the start failed
    bind_run_config(run, {"model": "shapes", "lr": 1e-4}, "a run")  # the user fixes the model, same folder
    assert json.loads((run / "config.json").read_text())["model"] == "shapes"

    (run / "eval-base").mkdir()  # work done: other settings would mix results
    with pytest.raises(InvalidInput, match=r"other settings \(model\)"):
        bind_run_config(run, {"model": "sd15", "lr": 1e-4}, "a run")
    bind_run_config(run, {"model": "shapes", "lr": 1e-4}, "a run")  # the same settings continue it
