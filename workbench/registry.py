"""Model names -> diffusers pipelines: built-in hub ids, local diffusers folders, the shapes model.

Weights are only ever read from disk (`local_files_only=True`): fetching is an explicit step the user
takes, so a missing model fails at once with the command that fetches it instead of a long stall or a
stack trace.
"""

from __future__ import annotations

import json
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ASSETS_DIR, get_settings
from .devices import pick_device, pick_dtype
from .errors import InvalidInput, ModelNotAvailable
from .memory import out_of_memory_as_message

# diffusers still passes this deprecated argument to huggingface_hub, whose warning would stand above
# every "download it with ..." message as if it were the problem.
warnings.filterwarnings("ignore", message="The `local_dir_use_symlinks` argument is deprecated", category=UserWarning)


@dataclass(frozen=True)
class ModelEntry:
    name: str
    source: str  # hub id or local folder in diffusers format
    family: str  # "sd" or "sdxl": decides defaults and which perception fits
    description: str
    default_size: int
    default_steps: int = 30
    default_guidance: float = 7.5
    fetch_hint: str = ""  # how to get the weights when they are missing
    base_model: str = ""  # the registered model a local full fine-tune was trained from ("shapes")

    @property
    def is_local(self) -> bool:
        return Path(self.source).is_absolute() or self.source.startswith(".")

    @property
    def world(self) -> str:
        """'shapes' for the embedded shapes model and its fine-tunes (the shapes detector, captioner and
        skills fit them), 'real' for every other model."""
        return "shapes" if "shapes" in (self.name, self.base_model) else "real"


def _hub_hint(repo_id: str) -> str:
    return (f"Download it once with `hf download {repo_id}` (older clients: "
            f"`huggingface-cli download {repo_id}`), which puts it in the Hugging Face cache "
            f"(~/.cache/huggingface/hub, or $HF_HOME), or pass a local folder in diffusers format.")


SHAPES_MODEL_DIR = ASSETS_DIR / "models" / "shapes-sd"

BUILTIN_MODELS: dict[str, ModelEntry] = {
    entry.name: entry
    for entry in [
        ModelEntry("shapes", str(SHAPES_MODEL_DIR), "sd",
                   "Embedded shapes world: tiny Stable Diffusion trained on coloured shapes (64x64, CPU).",
                   default_size=64, default_steps=20, default_guidance=7.5,
                   fetch_hint="It ships with the repository; rebuild it with "
                              "`python -m pipelines.train_shapes --out assets/models/shapes-sd`."),
        ModelEntry("sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5", "sd",
                   "Stable Diffusion 1.5", default_size=512,
                   fetch_hint=_hub_hint("stable-diffusion-v1-5/stable-diffusion-v1-5")),
        ModelEntry("sd21", "stabilityai/stable-diffusion-2-1", "sd",
                   "Stable Diffusion 2.1", default_size=768,
                   fetch_hint=_hub_hint("stabilityai/stable-diffusion-2-1")),
        ModelEntry("sdxl", "stabilityai/stable-diffusion-xl-base-1.0", "sdxl",
                   "Stable Diffusion XL base 1.0", default_size=1024, default_guidance=5.0,
                   fetch_hint=_hub_hint("stabilityai/stable-diffusion-xl-base-1.0")),
    ]
}


def model_names() -> list[str]:
    return list(BUILTIN_MODELS)


def _family_from_index(model_index: Path) -> str:
    class_name = json.loads(model_index.read_text()).get("_class_name", "")
    return "sdxl" if "XL" in class_name else "sd"


# A full fine-tune's pipeline folder names the model it came from, so it samples with that model's steps
# and guidance (a Compare column against its base differs only by the weights) and is scored in its world.
FINE_TUNE_FILE = "workbench_model.json"


def write_fine_tune_origin(pipeline_folder: Path, source: ModelEntry) -> None:
    """Record in an exported pipeline which registered model it was fine-tuned from."""
    origin = source.base_model or source.name
    (Path(pipeline_folder) / FINE_TUNE_FILE).write_text(json.dumps({"base_model": origin}) + "\n")


def _fine_tune_origin(folder: Path) -> ModelEntry | None:
    try:
        origin = json.loads((folder / FINE_TUNE_FILE).read_text()).get("base_model")
    except (OSError, ValueError, AttributeError):
        return None
    return BUILTIN_MODELS.get(origin) if isinstance(origin, str) else None


def _native_size(folder: Path, fallback: int) -> int:
    """The image side the model was trained at: UNet sample size times the VAE's downscaling."""
    try:
        sample_size = json.loads((folder / "unet" / "config.json").read_text())["sample_size"]
        vae_blocks = len(json.loads((folder / "vae" / "config.json").read_text())["block_out_channels"])
        return int(sample_size) * 2 ** (vae_blocks - 1)
    except (OSError, KeyError, TypeError, ValueError):
        return fallback


def resolve(name_or_path: str) -> ModelEntry:
    """A registered name, a local diffusers folder, or a hub id ("org/name")."""
    name = (name_or_path or "").strip()
    if not name:
        raise InvalidInput("No model given: pick one of " + ", ".join(model_names()) + " or a local folder.")
    if name in BUILTIN_MODELS:
        return BUILTIN_MODELS[name]
    path = Path(name).expanduser()
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise InvalidInput(f"'{name}' is a folder but not a diffusers pipeline (no model_index.json).")
        family = _family_from_index(index)
        hint = "Check that the folder holds every component listed in model_index.json."
        origin = _fine_tune_origin(path)
        if origin is not None:
            return ModelEntry(str(path.resolve()), str(path.resolve()), family,
                              f"Full fine-tune of {origin.name} ({path.resolve()})",
                              default_size=_native_size(path, origin.default_size), default_steps=origin.default_steps,
                              default_guidance=origin.default_guidance, fetch_hint=hint, base_model=origin.name)
        return ModelEntry(str(path.resolve()), str(path.resolve()), family, f"Local pipeline {path.name}",
                          default_size=_native_size(path, 1024 if family == "sdxl" else 512), fetch_hint=hint)
    if name.count("/") == 1 and not name.startswith(("/", ".", "~")) and " " not in name:
        family = "sdxl" if "xl" in name.lower() else "sd"
        return ModelEntry(name, name, family, f"Hub model {name}",
                          default_size=1024 if family == "sdxl" else 512, fetch_hint=_hub_hint(name))
    if name.startswith(("/", ".", "~")):  # meant as a folder
        raise InvalidInput(f"No model folder at '{name}' ({path.resolve()} does not exist): give a folder in diffusers "
                           f"format (with model_index.json), or one of {', '.join(model_names())}.")
    raise InvalidInput(f"Unknown model '{name}'. Use one of {', '.join(model_names())}, "
                       f"a local folder in diffusers format, or a Hugging Face hub id like org/name.")


# --- loading, with a small cache: pipelines are large, so keep only the most recent few -------

_CACHE_SIZE = 2
_cache: OrderedDict[tuple, object] = OrderedDict()
_cache_lock = threading.Lock()


def check_model(name_or_path: str) -> ModelEntry:
    """The entry of a model whose pipeline is on this machine, without loading it; else ModelNotAvailable
    with the download hint (a hub id counts as present when the cache holds its model_index.json)."""
    entry = resolve(name_or_path)
    if entry.is_local:
        present = (Path(entry.source) / "model_index.json").is_file()
    else:
        from huggingface_hub import try_to_load_from_cache

        present = isinstance(try_to_load_from_cache(entry.source, "model_index.json"), str)
    if not present:
        where = f"no pipeline at {entry.source}" if entry.is_local else "not in the local Hugging Face cache"
        raise ModelNotAvailable(f"Model '{entry.name}' ({entry.source}) is {where}. {entry.fetch_hint}")
    return entry


def load_pipeline(name_or_path: str, device: str | None = None, dtype: str | None = None):
    """Load (or fetch from the cache) the text-to-image pipeline for a model name or path."""
    entry = resolve(name_or_path)
    settings = get_settings()
    torch_device = pick_device(device or settings.device)
    torch_dtype = pick_dtype(torch_device, dtype or settings.dtype)
    key = (entry.source, str(torch_device), str(torch_dtype))
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
        with out_of_memory_as_message(f"loading '{entry.name}' onto {torch_device}",
                                      "Free memory (other models, other programs on the GPU) or choose a smaller "
                                      "dtype (WORKBENCH_DTYPE=fp16 or bf16) or the CPU (WORKBENCH_DEVICE=cpu)."):
            pipe = _load_from_disk(entry, torch_dtype).to(torch_device)
        pipe.set_progress_bar_config(disable=True)
        pipe.workbench_entry = entry  # the generation service reads defaults and names from it
        pipe.workbench_default_scheduler = pipe.scheduler  # schedulers are swapped per request
        _cache[key] = pipe
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
        return pipe


def clear_cache() -> None:
    with _cache_lock:
        _cache.clear()


def _load_from_disk(entry: ModelEntry, torch_dtype: torch.dtype):
    import diffusers
    import transformers
    from diffusers import AutoPipelineForText2Image

    # Loading bars would flood the CLI and job logs; errors are reported on their own.
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()

    if entry.is_local and not (Path(entry.source) / "model_index.json").is_file():
        raise ModelNotAvailable(f"Model '{entry.name}' is missing: no pipeline at {entry.source}. "
                                f"{entry.fetch_hint}")
    try:
        return AutoPipelineForText2Image.from_pretrained(
            entry.source, dtype=torch_dtype, local_files_only=True, use_safetensors=True)
    except (OSError, ValueError) as error:  # huggingface_hub's not-found errors are OSErrors
        where = "folder" if entry.is_local else "local Hugging Face cache"
        reason = str(error).splitlines()[0][:300]
        raise ModelNotAvailable(
            f"Model '{entry.name}' ({entry.source}) could not be loaded from the {where}: {reason} "
            f"{entry.fetch_hint}") from None
