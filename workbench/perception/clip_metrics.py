"""CLIP for evaluation: loading it from disk only, and GenEval's zero-shot colour classifier.

GenEval (Ghosh et al., 2023, `evaluation/evaluate_images.py` of https://github.com/djghosh13/geneval)
reads an object's colour by cropping its box out of the image (the object's mask pasted on a #999 grey
background first, when the detector gives masks), and classifying the crop zero-shot with CLIP ViT-L/14
over ten colour names. Each colour's text embedding is the normalised mean of the unit embeddings of
three prompts ("a photo of a {colour} {object}", "a photo of a {colour}-colored {object}", "a photo
of a {colour} object"), the crop's logit for a colour is 100 x cos(crop, colour), and the colour is the
argmax. `ColourClassifier` does exactly that; `ColourDetector` wraps any detector so each Detection
comes back with its `color` filled, which is what the scorer (`workbench.evaluation`) reads.

The weights are the transformers port of OpenAI's ViT-L/14 (`openai/clip-vit-large-patch14`, the
same weights GenEval loads through open_clip), read with `local_files_only=True` from safetensors:
nothing is downloaded, and a missing model raises ModelNotAvailable saying what to fetch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from workbench.errors import ModelNotAvailable
from workbench.perception.base import Box, Detection
from workbench.perception.coco import GENEVAL_COLORS

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"  # GenEval's ViT-L/14
CLIP_MODEL_ENV = "WORKBENCH_CLIP_MODEL"

COLOR_TEMPLATES = ("a photo of a {color} {object}", "a photo of a {color}-colored {object}",
                   "a photo of a {color} object")
MASK_BACKGROUND = "#999"  # GenEval's default bgcolor behind a masked object

COLOUR_METRIC = "The GenEval colour classifier (detector 'groundingdino+clip')"


def clip_model_name() -> str:
    """The CLIP the metrics use: $WORKBENCH_CLIP_MODEL (a hub id in the HF cache or a local folder), else ViT-L/14."""
    return os.environ.get(CLIP_MODEL_ENV) or DEFAULT_CLIP_MODEL


# --- finding and loading the model --------------------------------------------------------------


def _is_local(name: str) -> bool:
    path = Path(name).expanduser()
    return path.is_dir() or path.is_absolute() or name.startswith((".", "~"))


def _missing_message(metric: str, name: str, where: str) -> str:
    if _is_local(name):
        fetch = (f"Point {CLIP_MODEL_ENV} at a folder holding a CLIP model saved by transformers (config.json, "
                 f"model.safetensors, tokenizer and preprocessor files), e.g. one made with "
                 f"`hf download {DEFAULT_CLIP_MODEL} --local-dir {name}`, or unset it to use {DEFAULT_CLIP_MODEL} "
                 f"from the Hugging Face cache.")
    else:
        fetch = (f"Download it once with `hf download {name}` (it goes to the Hugging Face cache, "
                 f"~/.cache/huggingface/hub or $HF_HOME), or set {CLIP_MODEL_ENV} to a local folder holding a "
                 f"CLIP model saved by transformers (config.json, model.safetensors, tokenizer and preprocessor "
                 f"files).")
    return f"{metric} needs the CLIP model '{name}', which is not on this machine ({where}). {fetch}"


def check_clip(name: str | None = None, metric: str = "This metric") -> None:
    """Raise ModelNotAvailable when the CLIP model's config or safetensors weights are not on disk.

    Cheap (nothing is loaded), so the UI and `check_backend` can answer before a job is queued.
    """
    name = str(name or clip_model_name())
    path = Path(name).expanduser()
    if _is_local(name):
        if not path.is_dir():
            raise ModelNotAvailable(_missing_message(metric, name, f"no folder {path}"))
        for needed in ("config.json", "model.safetensors"):
            if not (path / needed).is_file() and not (needed == "model.safetensors"
                                                      and (path / "model.safetensors.index.json").is_file()):
                raise ModelNotAvailable(_missing_message(metric, name, f"{path} has no {needed}"))
        return
    from huggingface_hub import try_to_load_from_cache

    for needed in ("config.json", "model.safetensors"):
        if not isinstance(try_to_load_from_cache(name, needed), str):
            raise ModelNotAvailable(_missing_message(metric, name, f"no {needed} for it in the Hugging Face cache"))


class Clip:
    """A loaded CLIP with the two functions the metrics need: unit-length text and image embeddings.

    Both run without gradients, in batches, and return float32 CPU tensors of shape (N, D), so callers
    compare them with a plain matrix product whatever device the model sits on.
    """

    def __init__(self, model, tokenizer, image_processor, device: torch.device | str = "cpu", name: str = ""):
        self.model = model.eval().to(device)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.device = torch.device(device)
        self.name = name
        text_positions = getattr(getattr(model.config, "text_config", None), "max_position_embeddings", 77)
        # Prompts longer than the text model reads are cut, as torchmetrics' CLIPScore does (77 tokens).
        self.max_text_tokens = int(min(getattr(tokenizer, "model_max_length", text_positions) or text_positions,
                                       text_positions))

    @staticmethod
    def _pooled(output) -> torch.Tensor:
        # transformers 5 returns a BaseModelOutputWithPooling whose pooler_output is the projected
        # embedding; transformers 4 returned that tensor itself.
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        chunks = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                                    max_length=self.max_text_tokens, return_tensors="pt")
            output = self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                  attention_mask=tokens["attention_mask"].to(self.device))
            chunks.append(torch.nn.functional.normalize(self._pooled(output).float(), dim=-1).cpu())
        return torch.cat(chunks) if chunks else torch.zeros(0, self.model.config.projection_dim)

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image], batch_size: int = 16) -> torch.Tensor:
        chunks = []
        dtype = next(self.model.parameters()).dtype
        for start in range(0, len(images), batch_size):
            batch = [image.convert("RGB") for image in images[start:start + batch_size]]
            pixels = self.image_processor(images=batch, return_tensors="pt")["pixel_values"]
            output = self.model.get_image_features(pixel_values=pixels.to(self.device, dtype))
            chunks.append(torch.nn.functional.normalize(self._pooled(output).float(), dim=-1).cpu())
        return torch.cat(chunks) if chunks else torch.zeros(0, self.model.config.projection_dim)


def load_clip(name: str | None = None, metric: str = "This metric", device: str | None = None) -> Clip:
    """CLIP (model, tokenizer, image processor) from a local folder or the HF cache, never the network."""
    name = str(name or clip_model_name())
    check_clip(name, metric)
    import transformers
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    from workbench.config import get_settings
    from workbench.devices import pick_device

    transformers.utils.logging.disable_progress_bar()  # loading bars would flood the CLI and job logs
    source = str(Path(name).expanduser()) if _is_local(name) else name
    try:
        model = CLIPModel.from_pretrained(source, local_files_only=True, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        image_processor = CLIPImageProcessor.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as error:  # huggingface_hub's not-found errors are OSErrors
        reason = str(error).splitlines()[0][:300] if str(error) else type(error).__name__
        raise ModelNotAvailable(_missing_message(metric, name, f"loading it failed: {reason}")) from None
    return Clip(model, tokenizer, image_processor, pick_device(device or get_settings().device), name)


# --- the colour classifier ----------------------------------------------------------------------


def crop_box(image: Image.Image, box: Box, mask: np.ndarray | None = None,
             background: str = MASK_BACKGROUND) -> Image.Image | None:
    """The pixels of one object, as GenEval hands them to CLIP; None when the box misses the image.

    With a mask, the object is pasted on a flat `background` first, so the colour of what surrounds
    it does not count. The box is clamped to the image and rounded to whole pixels (as PIL's crop
    rounds); a box thinner than a pixel that touches the image keeps one pixel, so a detection on the
    image always gets a colour.
    """
    image = image.convert("RGB")
    width, height = image.size
    x0, y0, x1, y1 = (float(v) for v in box[:4])
    if not all(np.isfinite([x0, y0, x1, y1])):
        return None
    x0, x1 = sorted((x0, x1))
    y0, y1 = sorted((y0, y1))
    if x1 < 0 or y1 < 0 or x0 > width or y0 > height:
        return None
    left, top = min(max(int(round(x0)), 0), width - 1), min(max(int(round(y0)), 0), height - 1)
    right, bottom = min(max(int(round(x1)), left + 1), width), min(max(int(round(y1)), top + 1), height)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (height, width):
            raise ValueError(f"mask of shape {mask.shape} for an image of {width}x{height}")
        blank = Image.new("RGB", image.size, color=background)
        image = Image.composite(image, blank, Image.fromarray(mask.astype(np.uint8) * 255))
    return image.crop((left, top, right, bottom))


class ColourClassifier:
    """GenEval's colour reading: crop each box, compare it with CLIP to one prompt set per colour.

    `clip` is anything with `embed_texts(list[str])` and `embed_images(list[Image])` returning unit
    vectors (a `Clip`, or a stand-in in tests). Only the listed `colours` can come out: GenEval's ten
    by default, so a prompt asking for another colour (grey, say) can never be matched.
    """

    def __init__(self, clip, colours: Sequence[str] = GENEVAL_COLORS, templates: Sequence[str] = COLOR_TEMPLATES,
                 background: str = MASK_BACKGROUND, batch_size: int = 16):
        if not colours:
            raise ValueError("the colour classifier needs at least one colour")
        self.clip = clip
        self.colours = tuple(colours)
        self.templates = tuple(templates)
        self.background = background
        self.batch_size = batch_size
        self._weights: dict[str, torch.Tensor] = {}  # object name -> (colours, D), computed once

    def colour_embeddings(self, object_name: str) -> torch.Tensor:
        """One unit vector per colour: the normalised mean of its prompts' unit embeddings (clip_benchmark's way)."""
        if object_name not in self._weights:
            texts = [template.format(color=colour, object=object_name)
                     for colour in self.colours for template in self.templates]
            embedded = self.clip.embed_texts(texts).float().reshape(len(self.colours), len(self.templates), -1)
            mean = torch.nn.functional.normalize(embedded, dim=-1).mean(dim=1)
            self._weights[object_name] = torch.nn.functional.normalize(mean, dim=-1)
        return self._weights[object_name]

    def classify(self, image: Image.Image, boxes: Sequence[Box], object_name: str,
                 masks: Sequence[np.ndarray | None] | None = None) -> list[str | None]:
        """The colour of the `object_name` in each box (None for a box that misses the image)."""
        masks = list(masks) if masks is not None else [None] * len(boxes)
        crops = [crop_box(image, box, mask, self.background) for box, mask in zip(boxes, masks)]
        present = [crop for crop in crops if crop is not None]
        if not present:
            return [None] * len(boxes)
        features = self.clip.embed_images(present, batch_size=self.batch_size).float()
        logits = 100.0 * torch.nn.functional.normalize(features, dim=-1) @ self.colour_embeddings(object_name).T
        found = iter(logits.argmax(dim=-1).tolist())
        return [None if crop is None else self.colours[next(found)] for crop in crops]


class ColourDetector:
    """A detector whose detections carry the colour GenEval's classifier reads in each box.

    Wraps any `Detector` (GroundingDINO for real models), so the scorer gets colours without the
    detector knowing about them; detections come back in the detector's order, only `color` set.
    """

    def __init__(self, detector, classifier: ColourClassifier):
        self.detector = detector
        self.classifier = classifier

    def detect(self, image: Image.Image, labels: list[str] | None = None) -> list[Detection]:
        detections = list(self.detector.detect(image, labels))
        by_label: dict[str, list[int]] = {}
        for index, detection in enumerate(detections):
            by_label.setdefault(detection.label, []).append(index)
        for label, indices in by_label.items():
            colours = self.classifier.classify(image, [detections[i].box for i in indices], label)
            for i, colour in zip(indices, colours):
                detections[i] = replace(detections[i], color=colour)
        return detections
