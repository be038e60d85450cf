"""Taggers for real images: CLIP zero-shot over a tag list ("clip"), and RAM when it is installed ("ram").

CLIP tagging: each tag becomes a prompt ("a photo of a {tag}"; a colour "a photo of a {colour} object",
GenEval's colour prompt; "orange", a COCO class too, reads as the object), the image and the prompts are
embedded with the CLIP of `clip_metrics.py` ($WORKBENCH_CLIP_MODEL, default ViT-L/14, from disk only), and
each tag is scored from its cosine with the image in one of two ways:
- "softmax" (default): CLIP's zero-shot classification, softmax(s x cos) over the tag list, s the
  model's logit scale (100 for the released CLIPs). The scores sum to 1: the main subjects take most
  of it, and the default threshold 0.05 (about 4x an even share of the 89 default tags) keeps those.
- "sigmoid": sigmoid(s x (cos(tag) - cos(null))), `null` being the bare prompt "a photo": each tag is
  scored on its own (multi-label), above 0.5 when it describes the image better than saying nothing
  does. The default threshold is 0.5. Neither threshold is calibrated on real data yet; pass your own.
Tags scoring at least `threshold` come back best first. The default tag list is GenEval's vocabulary
(80 COCO classes and 10 colours, `coco.py`: 89 tags, "orange" being both); `tags=` replaces it, and
only those tags can come out.

RAM (the Recognize Anything Model, https://github.com/xinyu1205/recognize-anything) is used through its
own package, imported only when the "ram" tagger is asked for; it tags with its 4585-tag vocabulary and
per-tag thresholds, scores being its sigmoid outputs.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from workbench.errors import InvalidInput, ModelNotAvailable
from workbench.perception.base import Tag
from workbench.perception.coco import COCO_CLASSES, GENEVAL_COLORS

DEFAULT_TAGS: tuple[str, ...] = tuple(dict.fromkeys(COCO_CLASSES + GENEVAL_COLORS))  # "orange" once
OBJECT_TEMPLATE = "a photo of a {tag}"
COLOUR_TEMPLATE = "a photo of a {tag} object"  # GenEval's colour prompt
NULL_PROMPT = "a photo"
SCORINGS = ("softmax", "sigmoid")
DEFAULT_THRESHOLDS = {"softmax": 0.05, "sigmoid": 0.5}

TAGGER_METRIC = "The CLIP tagger (tagger 'clip')"


def tag_prompt(tag: str) -> str:
    # A word that is both (orange) reads as the COCO object: "a photo of a orange" still suits orange things.
    colour = tag in GENEVAL_COLORS and tag not in COCO_CLASSES
    return (COLOUR_TEMPLATE if colour else OBJECT_TEMPLATE).format(tag=tag)


class ClipTagger:
    """CLIP zero-shot tagging over a fixed tag list.

    `clip` is anything with `embed_texts(list[str])` and `embed_images(list[Image])` returning unit
    vectors (a `clip_metrics.Clip`, or a stand-in in tests); its `model.logit_scale`, when it has
    one, sets how sharp the scores are.
    """

    def __init__(self, clip, tags: Sequence[str] | None = None, scoring: str = "softmax",
                 threshold: float | None = None, max_tags: int | None = None):
        tags = [str(tag).strip() for tag in (DEFAULT_TAGS if tags is None else tags)]
        tags = list(dict.fromkeys(tag for tag in tags if tag))  # no blanks, no repeats, order kept
        if not tags:
            raise InvalidInput("The CLIP tagger needs at least one tag.")
        if scoring not in SCORINGS:
            raise InvalidInput(f"Tag scoring must be one of {', '.join(SCORINGS)}, not {scoring!r}.")
        self.clip = clip
        self.tags = tuple(tags)
        self.scoring = scoring
        self.threshold = DEFAULT_THRESHOLDS[scoring] if threshold is None else float(threshold)
        self.max_tags = max_tags
        scale = getattr(getattr(clip, "model", None), "logit_scale", None)
        self.scale = float(scale.detach().exp()) if isinstance(scale, torch.Tensor) else 100.0
        # The tag prompts (and the null prompt after them) are embedded once, not per image.
        self._texts = clip.embed_texts([tag_prompt(tag) for tag in self.tags] + [NULL_PROMPT]).float()

    def scores(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(images, tags) scores in [0, 1], in the order of `self.tags`."""
        features = torch.nn.functional.normalize(self.clip.embed_images(list(images)).float(), dim=-1)
        cosines = features @ torch.nn.functional.normalize(self._texts, dim=-1).T
        tags, null = cosines[:, :-1], cosines[:, -1:]
        if self.scoring == "softmax":
            return torch.softmax(self.scale * tags, dim=-1)
        return torch.sigmoid(self.scale * (tags - null))

    def tag_many(self, images: Sequence[Image.Image]) -> list[list[Tag]]:
        if not images:
            return []
        results = []
        for row in self.scores(images).tolist():
            found = sorted(((score, tag) for tag, score in zip(self.tags, row) if score >= self.threshold),
                           key=lambda pair: (-pair[0], pair[1]))
            results.append([Tag(tag, float(score)) for score, tag in found[:self.max_tags]])
        return results

    def tag(self, image: Image.Image) -> list[Tag]:
        return self.tag_many([image])[0]


def load_clip_tagger(model: str | None = None, tags: Sequence[str] | None = None, scoring: str = "softmax",
                     threshold: float | None = None, max_tags: int | None = None,
                     device: str | None = None) -> ClipTagger:
    """The "clip" tagger: CLIP from a local folder or the HF cache ($WORKBENCH_CLIP_MODEL), never the network."""
    from workbench.perception.clip_metrics import load_clip

    return ClipTagger(load_clip(model, TAGGER_METRIC, device=device), tags, scoring, threshold, max_tags)


# --- RAM ----------------------------------------------------------------------------------------

RAM_ENV = "WORKBENCH_RAM_CHECKPOINT"
RAM_CHECKPOINT = "ram_plus_swin_large_14m.pth"
RAM_INSTALL = "pip install git+https://github.com/xinyu1205/recognize-anything.git"
RAM_IMAGE_SIZE = 384


def ram_checkpoint() -> Path:
    """$WORKBENCH_RAM_CHECKPOINT, else $WORKBENCH_DATA/weights/ram/ram_plus_swin_large_14m.pth."""
    from workbench.perception.backends import weights_dir

    return Path(os.environ.get(RAM_ENV) or weights_dir() / "ram" / RAM_CHECKPOINT).expanduser()


def check_ram(checkpoint: str | Path | None = None) -> None:
    """Raise ModelNotAvailable when the recognize-anything package or the RAM++ checkpoint is missing."""
    problems = []
    if importlib.util.find_spec("ram") is None:
        problems.append(f"the recognize-anything package, which is not installed: `{RAM_INSTALL}` (it also reads "
                        f"bert-base-uncased's tokenizer, so run `hf download bert-base-uncased` once)")
    path = Path(checkpoint).expanduser() if checkpoint else ram_checkpoint()
    if not path.is_file():
        problems.append(f"the RAM++ checkpoint at {path}, which is not there: download {RAM_CHECKPOINT} with "
                        f"`hf download xinyu1205/recognize-anything-plus-model {RAM_CHECKPOINT} --local-dir "
                        f"{path.parent}` (or set {RAM_ENV} to where it is)")
    if problems:
        raise ModelNotAvailable("The RAM tagger (tagger 'ram') needs " + "; and ".join(problems)
                                + ". Until then use the 'clip' tagger (CLIP zero-shot over COCO classes and colours).")


class RamTagger:
    """RAM++ through the recognize-anything package: its tags above its per-tag thresholds, best first."""

    def __init__(self, checkpoint: str | Path | None = None, device: str | None = None, vit: str = "swin_l"):
        check_ram(checkpoint)
        from ram.models import ram_plus  # the package, imported only now that it is known to be there
        from torchvision import transforms

        from workbench.config import get_settings
        from workbench.devices import pick_device

        self.device = pick_device(device or get_settings().device)
        path = Path(checkpoint).expanduser() if checkpoint else ram_checkpoint()
        self.model = ram_plus(pretrained=str(path), image_size=RAM_IMAGE_SIZE, vit=vit).eval().to(self.device)
        # RAM's own preprocessing (ram.transform.get_transform), written out: its module path moved between releases.
        self.transform = transforms.Compose([
            transforms.Resize((RAM_IMAGE_SIZE, RAM_IMAGE_SIZE)), transforms.ToTensor(),
            transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])

    @torch.no_grad()
    def tag(self, image: Image.Image) -> list[Tag]:
        logits = []
        # generate_tag thresholds the scores and returns names only: the head's output is caught on the
        # way to read each tag's score too.
        hook = self.model.fc.register_forward_hook(lambda module, args, output: logits.append(output))
        try:
            self.model.generate_tag(self.transform(image.convert("RGB")).unsqueeze(0).to(self.device))
        finally:
            hook.remove()
        scores = torch.sigmoid(logits[-1].float().reshape(-1)).cpu()
        passed = scores > self.model.class_threshold.float().cpu()
        for index in getattr(self.model, "delete_tag_index", None) or []:
            passed[index] = False
        names = self.model.tag_list
        found = sorted(((float(scores[i]), str(names[i])) for i in torch.nonzero(passed).flatten().tolist()),
                       key=lambda pair: (-pair[0], pair[1]))
        return [Tag(name, score) for score, name in found]
