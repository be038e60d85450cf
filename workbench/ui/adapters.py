"""The LoRA adapters the Generate and Compare tabs offer, under labels a researcher recognises.

Every folder holding `pytorch_lora_weights.safetensors` in assets/adapters/ or in a run is an adapter;
its label names the method and run it came from and what it is (an IPR iteration, ReFL, a SELMA
expert, SELMA's mixed-data LoRA or its fused merge, RECAP's alt-text or RECAP fine-tune). The Compare
tab also offers each finished SELMA run's experts joined into one variant at the run's merge weights
(1/n each by default): the authors' `set_adapters` inference, which the fused merge reproduces; and
every full fine-tune's exported pipeline (`.../adapter/pipeline`), drawn in place of the base model.
"""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr

from ..config import ASSETS_DIR, get_settings
from ..errors import WorkbenchError
from ..registry import model_names
from ..store import walk_folders
from .train_runs import read_json, run_kind

WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
METHODS = {"ipr": "IPR", "refl": "ReFL", "selma": "SELMA", "recap": "RECAP"}


# Folders that hold no adapter or pipeline: generated images (most of a data folder's files) and the
# trainer's checkpoints (the same files as the finished ones, which two per adapter would bury).
SKIPPED_FOLDERS = {"images", "checkpoints"}


def discover_adapters() -> list[str]:
    """LoRA adapters shipped in assets/ or produced by runs in the data folder."""
    roots = [ASSETS_DIR / "adapters", get_settings().runs_dir]
    return sorted(str(folder) for root in roots for folder, files in walk_folders(root, SKIPPED_FOLDERS)
                  if WEIGHTS_FILE in files)


def is_pipeline_folder(path: str | Path) -> bool:
    """A diffusers pipeline folder (a full fine-tune's export, or any local model), not a LoRA."""
    folder = Path(str(path).strip()).expanduser()
    return folder.is_dir() and (folder / "model_index.json").is_file()


def discover_fine_tunes() -> list[str]:
    """Pipelines that full fine-tunes in runs exported (`<out>/pipeline`)."""
    return sorted(str(folder) for folder, files in walk_folders(get_settings().runs_dir, SKIPPED_FOLDERS)
                  if folder.name == "pipeline" and "model_index.json" in files)


def fine_tune_label(path: str | Path) -> str:
    """The label of the trainer's output folder (where a LoRA would have been), marked as a full fine-tune."""
    return f"{adapter_label(Path(path).parent)} (full fine-tune)"


def model_choices() -> list:
    """The registered models, then each full fine-tune in the runs ((label, pipeline folder))."""
    return model_names() + sorted((fine_tune_label(path), path) for path in discover_fine_tunes())


# Marks every model list, so the app refreshes them all when the page is (re)loaded.
MODEL_LIST_CLASS = "model-list"


def model_dropdown(value: str, label: str = "Model", **kwargs) -> gr.Dropdown:
    """A model list: the registered models and the runs' full fine-tunes, or any folder or hub id typed in."""
    return gr.Dropdown(model_choices(), value=value, label=label, allow_custom_value=True,
                       elem_classes=[MODEL_LIST_CLASS], **kwargs)


def model_lists(blocks) -> list[gr.Dropdown]:
    """The model lists of a built app (every `model_dropdown` in it)."""
    return [block for block in blocks.values()
            if isinstance(block, gr.Dropdown) and MODEL_LIST_CLASS in (block.elem_classes or [])]


def adapter_label(path: str | Path) -> str:
    """'SELMA <run> · expert counting', 'RECAP <run> · RECAP fine-tune', 'shipped · ipr-shapes', ...;
    the path itself for an adapter of no known run."""
    folder = Path(path)
    shipped, runs = ASSETS_DIR / "adapters", get_settings().runs_dir
    if folder.is_relative_to(shipped):
        return f"shipped · {folder.relative_to(shipped).as_posix()}"
    if not folder.is_relative_to(runs) or folder == runs:
        return str(folder)
    run, *rest = folder.relative_to(runs).parts
    kind = run_kind(runs / run)
    what = _part_label(kind, runs / run, rest)
    return f"{METHODS[kind]} {run} · {what}" if kind in METHODS and what else f"runs/{'/'.join([run, *rest])}"


def _part_label(kind: str | None, run: Path, rest: list[str]) -> str | None:
    if kind == "selma" and rest == ["merged"]:
        merge = read_json(run / "merged" / "merge.json") or {}
        return f"merged experts, fused ({merge.get('combination', '?')})"
    if kind == "selma" and rest == ["mixed"]:
        return "single LoRA on all skills' data mixed"
    if kind == "selma" and len(rest) == 2 and rest[0] == "experts":
        return f"expert {rest[1]}"
    if kind == "recap" and rest in (["alt-text", "adapter"], ["recap", "adapter"]):
        return "alt-text fine-tune" if rest[0] == "alt-text" else "RECAP fine-tune"
    if kind == "ipr" and len(rest) == 2 and rest[1] == "adapter" and rest[0].startswith("iteration-"):
        number = rest[0].removeprefix("iteration-")  # folder iteration-0 is iteration 1, as Train and Results count
        return f"iteration {int(number) + 1}" if number.isdigit() else None
    if kind == "refl" and rest == ["adapter"]:
        return "ReFL adapter"
    return None


def selma_joined_variants() -> list[tuple[str, str]]:
    """(label, variant line) for every SELMA run whose experts are all trained: the experts joined with
    '+' at the run's merge weights, one Compare variant."""
    from pipelines.selma import SelmaConfig
    from .train_runs import runs_of_kind

    variants = []
    for run in runs_of_kind("selma"):
        folder = get_settings().runs_dir / run
        try:
            config = SelmaConfig.from_dict(json.loads((folder / "config.json").read_text()))
            names = [skill.name for skill in config.skill_list()]
        except (OSError, ValueError, TypeError, WorkbenchError):
            continue  # unreadable, or a user skill since deleted: its experts are still listed one by one
        experts = [folder / "experts" / name for name in names]
        if not all((expert / WEIGHTS_FILE).is_file() for expert in experts):
            continue
        weights = config.merge_weight_list(len(experts))
        line = " + ".join(f"{expert}:{weight:.6g}" for expert, weight in zip(experts, weights))
        shown = f"1/{len(experts)} each" if config.merge_weights is None else "the run's merge weights"
        variants.append((f"SELMA {run} · all {len(experts)} experts joined (set_adapters, {shown})", line))
    return variants


def adapter_choices(joined: bool = False) -> list[tuple[str, str]]:
    """(label, path) of every adapter, by label; with `joined`, SELMA's joined experts (value: a variant
    line) and the full fine-tunes (value: their pipeline folder) too, Compare's other kinds of variant."""
    choices = [(adapter_label(path), path) for path in discover_adapters()]
    if joined:
        choices += selma_joined_variants() + [(fine_tune_label(path), path) for path in discover_fine_tunes()]
    return sorted(choices)
