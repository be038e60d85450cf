"""The generation service: one validated request in, reproducible PNGs out.

Every saved image carries its full request as PNG text metadata (`workbench` key, JSON), so
`request_from_png` rebuilds the exact request that made it, and generating that again with the
same single seed gives the same pixels.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from . import __version__
from .config import get_settings
from .errors import InvalidInput, JobCancelled
from .memory import out_of_memory_as_message
from .registry import load_pipeline, resolve
from .prompt_parser import MAX_PROMPT_CHARS, too_long  # one limit for generating, parsing and editing
from .store import check_output_folder

MAX_SEEDS = 64
MAX_STEPS = 200
MAX_SIDE = 2048
METADATA_KEY = "workbench"

SCHEDULERS = {
    "default": None,  # the model's own scheduler
    "ddim": "DDIMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
    "pndm": "PNDMScheduler",
    "ddpm": "DDPMScheduler",
}


@dataclass
class LoraSpec:
    path: str
    weight: float = 1.0

    @classmethod
    def parse(cls, text: str) -> "LoraSpec":
        """'PATH' or 'PATH:WEIGHT' (a weight is a float after the last colon)."""
        path, _, weight = text.strip().rpartition(":")
        try:
            return cls(path, float(weight)) if path else cls(text.strip())
        except ValueError:
            # "adapter:abc": a weight that is no number, unless the whole text names something (C:\dir)
            if path and Path(path).expanduser().exists() and not Path(text.strip()).expanduser().exists():
                raise InvalidInput(f"The LoRA weight after the colon in '{text.strip()}' is not a number; write "
                                   f"PATH or PATH:WEIGHT, e.g. {path}:0.8.") from None
            return cls(text.strip())

    def adapter_name(self) -> str:
        # peft adapter names must be valid module names. The hash covers the path and the weight
        # file's size and time, so an adapter re-trained into the same folder is loaded afresh
        # instead of the cached pipeline serving its old weights.
        weights = lora_weights_file(self.path)
        stamp = f"{weights.stat().st_size}:{weights.stat().st_mtime_ns}" if weights is not None else ""
        digest = hashlib.sha1(f"{Path(self.path).resolve()}|{stamp}".encode()).hexdigest()[:10]
        return f"lora_{digest}"


@dataclass
class GenerationRequest:
    prompt: str
    model: str = field(default_factory=lambda: get_settings().default_model)
    negative_prompt: str = ""
    seeds: list[int] = field(default_factory=lambda: [0])
    steps: int | None = None  # None: the model's default
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    batch_size: int = 8  # images per pipeline call; seeds are split into batches of this size
    scheduler: str = "default"
    loras: list[LoraSpec] = field(default_factory=list)

    def validate(self) -> None:
        """Raise InvalidInput with a readable message; runs before anything is loaded or written."""
        if not self.prompt or not self.prompt.strip():
            raise InvalidInput("The prompt is empty: describe the image you want.")
        for what, text in (("prompt", self.prompt), ("negative prompt", self.negative_prompt or "")):
            if len(text) > MAX_PROMPT_CHARS:
                raise InvalidInput(too_long(text, what))
        if not self.seeds or len(self.seeds) > MAX_SEEDS:
            raise InvalidInput(f"Give between 1 and {MAX_SEEDS} seeds (got {len(self.seeds)}).")
        if any(not isinstance(s, int) or not 0 <= s < 2**32 for s in self.seeds):
            raise InvalidInput("Seeds must be whole numbers between 0 and 4294967295.")
        if self.steps is not None and not 1 <= self.steps <= MAX_STEPS:
            raise InvalidInput(f"Steps must be between 1 and {MAX_STEPS} (got {self.steps}).")
        if self.guidance is not None and not 0 <= self.guidance <= 50:
            raise InvalidInput(f"Guidance must be between 0 and 50 (got {self.guidance}).")
        for side_name, side in (("width", self.width), ("height", self.height)):
            if side is not None and (not 8 <= side <= MAX_SIDE or side % 8):
                raise InvalidInput(f"The {side_name} must be a multiple of 8 between 8 and {MAX_SIDE} "
                                   f"(got {side}).")
        if not 1 <= self.batch_size <= MAX_SEEDS:
            raise InvalidInput(f"Batch size must be between 1 and {MAX_SEEDS}.")
        if self.scheduler not in SCHEDULERS:
            raise InvalidInput(f"Unknown scheduler '{self.scheduler}'; use one of {', '.join(SCHEDULERS)}.")
        for lora in self.loras:
            if not lora_weights_file(lora.path):
                raise InvalidInput(f"LoRA adapter not found: {lora.path} (expected a .safetensors file "
                                   f"or a folder holding pytorch_lora_weights.safetensors).")
            if not -4 <= lora.weight <= 4:
                raise InvalidInput(f"LoRA weight {lora.weight} is out of range [-4, 4].")
        resolve(self.model)  # unknown model names fail here, before any work

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "GenerationRequest":
        data = dict(data)
        data["loras"] = [LoraSpec(**lora) for lora in data.get("loras", [])]
        known = cls.__dataclass_fields__
        return cls(**{key: value for key, value in data.items() if key in known})


@dataclass
class GeneratedImage:
    image: Image.Image
    seed: int
    path: Path | None
    metadata: dict


def lora_weights_file(path: str) -> Path | None:
    candidate = Path(path).expanduser()
    if candidate.is_file() and candidate.suffix == ".safetensors":
        return candidate
    if candidate.is_dir() and (candidate / "pytorch_lora_weights.safetensors").is_file():
        return candidate / "pytorch_lora_weights.safetensors"
    return None


# One pipeline call at a time per process: cached pipelines are shared and their scheduler and
# adapters are set per request.
_pipeline_lock = threading.Lock()


def generate(request: GenerationRequest, out_dir: Path | None = None,
             on_progress: Callable[[float, str], None] | None = None,
             should_stop: Callable[[], bool] | None = None) -> list[GeneratedImage]:
    """Generate one image per seed; save them as PNGs with metadata when `out_dir` is given."""
    return generate_many([request], out_dir, on_progress, should_stop)


def _sampling_settings(request: GenerationRequest) -> tuple:
    """What must be equal for requests to share a pipeline call (everything but prompt and seeds)."""
    return (request.model, request.negative_prompt, request.steps, request.guidance, request.width,
            request.height, request.scheduler, [(lora.path, lora.weight) for lora in request.loras])


def generate_many(requests: list[GenerationRequest], out_dir: Path | None = None,
                  on_progress: Callable[[float, str], None] | None = None,
                  should_stop: Callable[[], bool] | None = None) -> list[GeneratedImage]:
    """Generate (prompt, seed) pairs of several requests, batched across prompts.

    The requests must share their sampling settings; benchmarks use this to fill every batch.
    Results come back in request order, then seed order.
    """
    if not requests:
        return []
    for request in requests:
        request.validate()
    if out_dir is not None:
        check_output_folder(out_dir)
    if any(_sampling_settings(r) != _sampling_settings(requests[0]) for r in requests):
        raise InvalidInput("Requests generated together must share model, steps, guidance, size, "
                           "scheduler, negative prompt and adapters.")
    first = requests[0]
    pipe = load_pipeline(first.model)
    entry = pipe.workbench_entry
    steps = first.steps or entry.default_steps
    guidance = entry.default_guidance if first.guidance is None else first.guidance
    width = first.width or entry.default_size
    height = first.height or entry.default_size
    items = [(request, seed) for request in requests for seed in request.seeds]
    batch_size = first.batch_size
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    total_steps = steps * len(batches)
    results: list[GeneratedImage] = []

    what = f"generating {len(items)} image(s) of {width}x{height} with '{first.model}'"
    advice = ("Ask for fewer seeds at once or a smaller size" +
              (f"; the images are drawn {batch_size} at a time." if len(items) > 1 else "."))
    with _pipeline_lock, out_of_memory_as_message(what, advice):
        _set_scheduler(pipe, first.scheduler)
        _set_adapters(pipe, first.loras)
        for batch_index, batch in enumerate(batches):
            def step_end(_pipe, step, _timestep, callback_kwargs, batch_index=batch_index):
                if should_stop is not None and should_stop():
                    raise JobCancelled()
                if on_progress is not None:
                    done = batch_index * steps + step + 1
                    on_progress(done / total_steps, f"denoising step {done}/{total_steps}")
                return callback_kwargs

            # CPU generators: the same seed gives the same starting noise on every device.
            generators = [torch.Generator("cpu").manual_seed(seed) for _, seed in batch]
            images = pipe(prompt=[request.prompt for request, _ in batch],
                          negative_prompt=[first.negative_prompt] * len(batch) if first.negative_prompt else None,
                          num_inference_steps=steps, guidance_scale=guidance, width=width, height=height,
                          generator=generators, callback_on_step_end=step_end).images
            for (request, seed), image in zip(batch, images):
                metadata = _image_metadata(request, entry, seed, steps, guidance, width, height)
                path = save_png(image, metadata, out_dir) if out_dir is not None else None
                results.append(GeneratedImage(image, seed, path, metadata))
    return results


def _set_scheduler(pipe, name: str) -> None:
    default = pipe.workbench_default_scheduler
    if SCHEDULERS[name] is None:
        pipe.scheduler = default
        return
    import diffusers

    scheduler_class = getattr(diffusers, SCHEDULERS[name])
    if type(pipe.scheduler) is not scheduler_class:
        pipe.scheduler = scheduler_class.from_config(default.config)


# The diffusers logger that warns, for each part of the pipeline, when a LoRA file holds none of its keys.
NO_KEYS_LOGGERS = {"unet": "diffusers.loaders.peft", "text_encoder": "diffusers.loaders.lora_base"}


@contextmanager
def quiet_adapter_report(absent_parts: frozenset[str] | set[str] = frozenset()):
    """Silence the load report transformers 5 logs when diffusers puts a LoRA on a CLIP text encoder: it
    calls every adapter weight MISSING although they load (tests/test_generation.py compares them). With
    `absent_parts` ("unet", "text_encoder"), also diffusers' warning that the file holds no keys for those
    parts, which it calls safe to ignore and which is expected of an adapter that never trained them
    (IPR's text-encoder LoRA, ReFL's UNet LoRA)."""
    names = ["transformers.integrations.peft"] + [NO_KEYS_LOGGERS[part] for part in sorted(absent_parts)]
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def absent_adapter_parts(weights: Path) -> set[str]:
    """The pipeline parts (of NO_KEYS_LOGGERS) a diffusers-format LoRA file holds no layers for."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        parts = {key.split(".", 1)[0] for key in f.keys()}
    return set(NO_KEYS_LOGGERS) - parts


def _set_adapters(pipe, loras: list[LoraSpec]) -> None:
    if not loras:
        if getattr(pipe, "get_list_adapters", None) and any(pipe.get_list_adapters().values()):
            pipe.disable_lora()
        return
    # One adapter listed twice acts as once with the summed weight (a LoRA's update is linear in it).
    weights_by_name: dict[str, float] = {}
    for lora in loras:
        weights_by_name[lora.adapter_name()] = weights_by_name.get(lora.adapter_name(), 0.0) + lora.weight
    loaded = {name for names in pipe.get_list_adapters().values() for name in names}
    for lora in {lora.adapter_name(): lora for lora in loras}.values():
        if lora.adapter_name() not in loaded:
            _load_adapter(pipe, lora)
    pipe.enable_lora()
    pipe.set_adapters(list(weights_by_name), adapter_weights=list(weights_by_name.values()))


def _load_adapter(pipe, lora: LoraSpec) -> None:
    """Load one adapter file, or InvalidInput naming it when it is no LoRA diffusers can read (a broken
    download, another tool's format); a failed load leaves no half-loaded adapter behind."""
    from safetensors import SafetensorError

    weights = lora_weights_file(lora.path)
    try:
        # peft warns on every adapter after the first; a pipeline that keeps several loaded means to.
        with quiet_adapter_report(absent_adapter_parts(weights)), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            pipe.load_lora_weights(str(weights.parent), weight_name=weights.name, adapter_name=lora.adapter_name())
    except (SafetensorError, ValueError, KeyError, IndexError, RuntimeError) as error:
        if any(lora.adapter_name() in names for names in pipe.get_list_adapters().values()):
            pipe.delete_adapters(lora.adapter_name())
        raise InvalidInput(f"{weights} is not a LoRA adapter in diffusers format for this model "
                           f"({type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}).") from None


def _image_metadata(request: GenerationRequest, entry, seed: int, steps: int, guidance: float,
                    width: int, height: int) -> dict:
    import diffusers

    return {
        "prompt": request.prompt, "negative_prompt": request.negative_prompt, "model": request.model,
        "model_source": entry.source, "seed": seed, "steps": steps, "guidance": guidance,
        "width": width, "height": height, "scheduler": request.scheduler,
        "loras": [asdict(lora) for lora in request.loras],
        "workbench_version": __version__, "diffusers_version": diffusers.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def save_png(image: Image.Image, metadata: dict, out_dir: Path, name: str | None = None) -> Path:
    """Write atomically (temp file, then rename) so a crash never leaves half an image."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    info.add_text(METADATA_KEY, json.dumps(metadata))
    info.add_text("parameters", f"{metadata['prompt']}\nSteps: {metadata['steps']}, "
                                f"CFG scale: {metadata['guidance']}, Seed: {metadata['seed']}, "
                                f"Size: {metadata['width']}x{metadata['height']}, Model: {metadata['model']}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = out_dir / (name or f"{stamp}-seed{metadata['seed']}-{uuid.uuid4().hex[:6]}.png")
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".png.part")
    with os.fdopen(fd, "wb") as handle:
        image.save(handle, format="PNG", pnginfo=info)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; the image is as shareable as any file
    os.replace(tmp, path)
    return path


def _umask() -> int:
    """The process umask, read without setting it (os.umask would change it for every thread meanwhile)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def read_png_metadata(path: Path) -> dict:
    try:
        with Image.open(path) as image:
            text = image.text.get(METADATA_KEY)  # type: ignore[attr-defined]
    except (OSError, AttributeError) as error:
        raise InvalidInput(f"{path} is not a PNG image the workbench can read ({error}).") from None
    if not text:
        raise InvalidInput(f"{path} carries no workbench metadata: it was not made by the workbench.")
    return json.loads(text)


def request_from_png(path: Path) -> GenerationRequest:
    """The request that reproduces this image exactly (one seed, same everything else)."""
    meta = read_png_metadata(path)
    return GenerationRequest(
        prompt=meta["prompt"], model=meta["model"], negative_prompt=meta.get("negative_prompt", ""),
        seeds=[meta["seed"]], steps=meta["steps"], guidance=meta["guidance"], width=meta["width"],
        height=meta["height"], scheduler=meta.get("scheduler", "default"),
        loras=[LoraSpec(**lora) for lora in meta.get("loras", [])])
