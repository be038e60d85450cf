"""Running out of memory, said as a message a person can act on instead of a stack trace.

CUDA raises `torch.OutOfMemoryError`, MPS and ROCm raise a RuntimeError that says "out of memory", the
CPU raises MemoryError. Each is turned into `OutOfMemory` (a WorkbenchError, so the UI and the CLI show
it as is) that says what was being done, what to change, and which background job, if any, holds
memory on the same machine: a fine-tune in the job runner and an Inspect click share one GPU.
"""

from __future__ import annotations

import gc
import threading
from contextlib import contextmanager

import torch

from .errors import OutOfMemory


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def release_cached_memory() -> None:
    """Give the failed call's tensors back, so the next, smaller request can run in this process."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _background_jobs_note() -> str:
    # Imported here: the job runner reports its own jobs' failures through this module.
    from . import jobs

    if threading.current_thread().name == jobs.WORKER_THREAD_NAME:
        return ""  # this is the background job: no other job runs beside it
    running = jobs.running_jobs()
    if not running:
        return ""
    names = ", ".join(f"{job.kind} job {job.id}" for job in running)
    return (f" A background run holds memory on this machine ({names}): wait for it to finish or cancel it "
            f"in the Runs tab, then try again.")


def out_of_memory_error(what: str, advice: str) -> OutOfMemory:
    """What to raise (or report) once memory ran out; frees the cache first."""
    release_cached_memory()
    return OutOfMemory(f"Out of memory while {what}. {advice}{_background_jobs_note()}")


@contextmanager
def out_of_memory_as_message(what: str, advice: str):
    """Inside this block, running out of memory raises OutOfMemory(what, advice) and frees the cache."""
    try:
        yield
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        # `from error` keeps the original in the job log's traceback; people see only the message.
        raise out_of_memory_error(what, advice) from error
