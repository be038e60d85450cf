"""Reading real-model weights from disk: safely, and with a message saying what to fetch when absent.

Checkpoints are `torch.load`ed with `weights_only=True` only: a `.pth` file is a pickle, and a full
unpickle can run arbitrary code, so anything other than tensors and plain containers is refused.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from pathlib import Path

from workbench.errors import ModelNotAvailable


@dataclass(frozen=True)
class Missing:
    """One file or folder a backend needs and did not find."""

    what: str  # e.g. "GroundingDINO checkpoint"
    looked_at: str  # the path or hub id that was tried
    fetch: str  # exactly what to download, and where to put it


def raise_if_missing(backend: str, missing: list[Missing]) -> None:
    """One ModelNotAvailable listing everything missing at once, so a single round of downloads fixes it."""
    if not missing:
        return
    lines = [f"The {backend} backend cannot start: {len(missing)} required file(s) are not on this machine."]
    for item in missing:
        # A setting pointed at the folder that holds the file reads as "not found" otherwise.
        found = (f"{item.looked_at} is a folder; point the setting at the file inside it" if Path(item.looked_at).is_dir()
                 else f"not found at {item.looked_at}")
        lines.append(f"- {item.what}: {found}. {item.fetch}")
    raise ModelNotAvailable("\n".join(lines))


def load_state_dict(path: Path, what: str, key: str | None = None, allowed_globals: tuple = ()) -> dict:
    """The tensors of a checkpoint file (under `key` when the file wraps them, e.g. {"model": ...}).

    `allowed_globals`: plain data classes a known checkpoint format stores beside its tensors (such as
    argparse.Namespace for training arguments); still loaded by the weights-only unpickler.
    """
    import torch

    try:
        with torch.serialization.safe_globals(list(allowed_globals)):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if found is None:  # not a torch file at all (an HTML error page saved as .pth, a cut-off download)
            raise ModelNotAvailable(f"The {what} at {path} is not a PyTorch checkpoint; download it again.") from None
        # It pickles objects besides tensors: refuse rather than run their code; say how to convert it.
        raise ModelNotAvailable(
            f"The {what} at {path} holds pickled objects besides tensors, so it was not loaded "
            f"(it stores {found.group(1)}). If you trust its source, keep only its tensors once with "
            f"`python -c \"import torch; c = torch.load('{path}', weights_only=False); "
            f"torch.save({{'model': c['model']}} if 'model' in c else c, '{path}')\"`.") from None
    except (OSError, RuntimeError, EOFError) as error:  # truncated download, unreadable file
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise ModelNotAvailable(f"The {what} at {path} could not be read ({reason}); download it again.") from None
    if key is not None and isinstance(checkpoint, dict) and key in checkpoint:
        checkpoint = checkpoint[key]
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise ModelNotAvailable(f"The {what} at {path} holds no weights; download it again.")
    return checkpoint
