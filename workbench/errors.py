"""Errors that carry a message meant for the user (UI and CLI show it as is, no stack trace)."""


class WorkbenchError(Exception):
    """Base class: `str(error)` is a complete, actionable message for a person."""


class InvalidInput(WorkbenchError):
    """A request that cannot be run as given (empty prompt, absurd size, bad file...)."""


class ModelNotAvailable(WorkbenchError):
    """Weights that are not on this machine; the message says what to download and where."""


class JobCancelled(Exception):
    """Raised inside a job when the user asked it to stop."""


class OutOfMemory(WorkbenchError):
    """The device (GPU or CPU) ran out of memory; the message says what to change (see workbench.memory)."""
