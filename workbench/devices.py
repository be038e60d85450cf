"""Pick the device and dtype a pipeline runs on: the best available, unless the user says otherwise."""

from __future__ import annotations

import torch

from .errors import InvalidInput

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
          "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def pick_device(requested: str | None = None) -> torch.device:
    if requested:
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise InvalidInput(f"Device '{requested}' was requested but CUDA is not available on this machine.")
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device, requested: str | None = None) -> torch.dtype:
    if requested:
        if requested not in DTYPES:
            raise InvalidInput(f"Unknown dtype '{requested}'; use one of: fp32, fp16, bf16.")
        return DTYPES[requested]
    if device.type == "cuda":
        # bf16 keeps fp16's speed without the SDXL VAE's fp16 overflow; older GPUs fall back to fp16.
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32
