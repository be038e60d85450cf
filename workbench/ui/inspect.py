"""Inspect & Relabel tab: one image, what the detector sees in it, and the prompt IPR would train on.

Generate an image (or upload one) with its prompt, run the detector and segmenter, and compare the
scene the prompt asks for with the scene detected; the relabeled prompt is shown as a word diff
against the original. Handlers are plain functions so they are tested without a browser.
"""

from __future__ import annotations

import difflib
import functools
import json
import math
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image, UnidentifiedImageError

from pipelines.ipr import IPRConfig, confidence_bar, training_verdict
from ..config import get_settings
from ..errors import InvalidInput, WorkbenchError
from ..generation import METADATA_KEY, GenerationRequest, generate
from ..memory import out_of_memory_as_message
from ..perception.backends import get_detector, get_segmenter
from ..perception.base import Detection
from ..prompt_parser import parse_prompt
from ..registry import resolve
from .adapters import model_dropdown
from ..relabel import relabel

DETECTOR_CHOICES = ["auto", "shapes", "groundingdino", "groundingdino+clip"]  # +clip: colours too
DIFF_COLORS = {"removed": "#f87171", "added": "#4ade80"}
# Shapes images are 64 px: they are enlarged (nearest neighbour) so boxes and masks stay readable.
DISPLAY_SIDE = 384
MASK_ALPHA = 0.45  # masks shade the object; the box outline stays opaque
PERCEPTION_ADVICE = "Try a smaller image, or free the memory other models or programs hold."
SAVED_IMAGES_SHOWN = 120  # newest first; older ones stay on disk, and can be uploaded
# The relabel's options (`relabel.relabel` keywords), as the tab names them.
RELABEL_OPTIONS = {"one clause per colour of a class": "split_colors",
                   "say where two single objects are": "say_relations",
                   "keep the prompt's framing": "keep_framing"}


def ipr_relabel_options() -> list[str]:
    """The options an IPR run relabels with by default, so the tab shows the prompt IPR would train on."""
    defaults = IPRConfig()
    return [label for label, keyword in RELABEL_OPTIONS.items() if getattr(defaults, keyword)]


# --- perception backends -------------------------------------------------------------------------


def detector_for(model: str, choice: str = "auto") -> str:
    """The detector backend name: the chosen one, or the model's own world (shapes -> shapes)."""
    if choice and choice != "auto":
        return choice
    return "shapes" if resolve(model).world == "shapes" else "groundingdino"


SEGMENTER_FOR = {"shapes": "shapes", "groundingdino": "sam", "groundingdino+clip": "sam"}


# Real backends load hundreds of MB of weights: build each once per process. A backend whose
# weights are missing raises, and failures are not cached, so it works once they are downloaded.
@functools.lru_cache(maxsize=4)
def _detector(name: str):
    return get_detector(name)


@functools.lru_cache(maxsize=4)
def _segmenter(name: str):
    return get_segmenter(name)


# --- display helpers -----------------------------------------------------------------------------


def as_image(value) -> Image.Image:
    """An RGB PIL image from what a Gradio image input or a caller gives; InvalidInput otherwise."""
    if value is None:
        raise InvalidInput("No image yet: generate one or upload an image first.")
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, np.ndarray):
        try:
            return Image.fromarray(value.astype(np.uint8)).convert("RGB")
        except (TypeError, ValueError) as error:
            raise InvalidInput(f"That array is not an image ({error}).") from None
    if isinstance(value, (str, Path)):
        try:
            with Image.open(value) as image:
                return image.convert("RGB")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):  # PIL's ways to say "broken"
            raise InvalidInput(f"'{Path(value).name}' is not an image file the workbench can read "
                               f"(PNG, JPEG or WebP).") from None
    raise InvalidInput(f"Expected an image, got {type(value).__name__}.")


def readable_uploads(component: gr.Image) -> gr.Image:
    """The image input (type "filepath"), made to pass an upload that is no readable image on to the
    handlers as its path, which they read and refuse with a message (`as_image`). Gradio opens every
    upload before any handler runs and would answer with a bare "Error" over the handler's outputs.
    (The instance's method is wrapped, since a subclass of a Gradio component writes a .pyi beside its
    module; a handler's gr.update() to the component replaces the instance, so handlers give the image
    back as it is instead.)"""
    decode = component.preprocess

    def preprocess(payload):
        try:
            return decode(payload)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):  # PIL's ways to say "broken"
            return str(payload.path)

    component.preprocess = preprocess
    return component


def detection_label(det: Detection) -> str:
    """"red circle 0.98": what the legend and the box say."""
    return " ".join(part for part in (det.color, det.label, f"{det.score:.2f}") if part)


def annotated(image: Image.Image, detections: list[Detection], masks: list[np.ndarray] | None = None,
              threshold: float | None = None) -> tuple[Image.Image, list[tuple[np.ndarray, str]]]:
    """The value of a gr.AnnotatedImage: the image enlarged, one layer per detection with its box
    outline and (when given) its mask. Detections at or under `threshold` are labelled "(ignored)"."""
    scale = max(1, math.ceil(DISPLAY_SIDE / max(image.size)))
    big = image.resize((image.width * scale, image.height * scale), Image.NEAREST) if scale > 1 else image
    height, width = big.height, big.width
    border = max(2, round(max(width, height) / 192))  # still visible once the page shrinks the image
    layers = []
    for index, det in enumerate(detections):
        layer = np.zeros((height, width), dtype=np.float32)
        if masks is not None and index < len(masks) and masks[index] is not None:
            mask = np.asarray(masks[index], dtype=bool)
            layer[np.kron(mask, np.ones((scale, scale), dtype=bool))[:height, :width]] = MASK_ALPHA
        x0, y0, x1, y1 = (int(round(v * scale)) for v in det.box)
        x0, x1 = sorted((min(max(x0, 0), width - 1), min(max(x1, 1), width)))
        y0, y1 = sorted((min(max(y0, 0), height - 1), min(max(y1, 1), height)))
        layer[y0:y1, x0:x0 + border] = layer[y0:y1, x1 - border:x1] = 1.0
        layer[y0:y0 + border, x0:x1] = layer[y1 - border:y1, x0:x1] = 1.0
        label = detection_label(det)
        if threshold is not None and det.score <= threshold:  # the relabel keeps scores above it
            label += " (ignored)"
        layers.append((layer, label))
    return big, layers


def word_diff(original: str, relabeled: str) -> list[tuple[str, str | None]]:
    """gr.HighlightedText tokens: words only in the original are "removed", only in the relabel
    "added", shared ones unmarked; reading the unmarked and "added" words gives the relabel."""
    old, new = (original or "").split(), (relabeled or "").split()
    tokens: list[tuple[str, str | None]] = []
    for op, i0, i1, j0, j1 in difflib.SequenceMatcher(a=old, b=new, autojunk=False).get_opcodes():
        if op == "equal":
            tokens.append((" ".join(old[i0:i1]), None))
            continue
        if i1 > i0:
            tokens.append((" ".join(old[i0:i1]), "removed"))
        if j1 > j0:
            tokens.append((" ".join(new[j0:j1]), "added"))
    spaced: list[tuple[str, str | None]] = []
    for index, token in enumerate(tokens):
        if index:
            spaced.append((" ", None))
        spaced.append(token)
    return spaced


# --- handlers ------------------------------------------------------------------------------------


def generate_image(model: str, prompt: str, seed, current=None):
    """One image for (model, prompt, seed); a missing model or bad input comes back as the message, and
    the image already shown (`current`) stays: given back as it is, not as gr.update(), which would
    replace the tab's image input and with it `readable_uploads`' wrapper."""
    try:
        seed_value = int(seed) if seed is not None else 0
        request = GenerationRequest(prompt=prompt or "", model=model, seeds=[seed_value])
        result = generate(request)[0]
    except WorkbenchError as error:
        return current, f"Cannot generate: {error}"
    return result.image, f"Generated with `{model}`, seed {seed_value}. Press **Detect & relabel** next."


def _metadata(image: Image.Image) -> dict:
    """The generation parameters a workbench PNG carries; {} for any other image."""
    try:
        metadata = json.loads(image.info[METADATA_KEY])
        return metadata if isinstance(metadata, dict) else {}
    except (AttributeError, KeyError, TypeError, ValueError):
        return {}


def fill_from_metadata(path):
    """(prompt, model, message) for an upload: a workbench PNG carries its prompt and model, which fill
    the fields (else both stay); a file that is no readable image is said so in the message."""
    try:
        metadata = _metadata_of(path)
    except InvalidInput as error:
        return gr.update(), gr.update(), f"Cannot read the upload: {error}"
    if "prompt" in metadata and "model" in metadata:
        return metadata["prompt"], metadata["model"], "The upload's prompt and model are filled in from its PNG."
    return gr.update(), gr.update(), "Uploaded. Give the prompt it was made for, then press **Detect & relabel**."


def _metadata_of(path) -> dict:
    """The workbench parameters in an image file ({} for none); InvalidInput when it is no readable image."""
    as_image(path)  # decodes it whole: a file cut short fails here, not in the detector
    with Image.open(path) as image:
        return _metadata(image)


# --- images saved earlier -------------------------------------------------------------------------


def saved_images(limit: int = SAVED_IMAGES_SHOWN) -> list[Path]:
    """The images the workbench generated (Generate tab jobs, comparisons), newest first."""
    runs = get_settings().runs_dir
    if not runs.is_dir():
        return []
    paths = [path for path in runs.glob("*/images/**/*.png") if path.is_file()]
    # Images a person asked for (runs/<id>/images/<name>.png) before an evaluation's hundreds
    # (runs/<id>/images/<prompt>/<seed>.png), which would otherwise fill the gallery at once.
    paths.sort(key=lambda path: (path.parent.name != "images", -path.stat().st_mtime))
    return paths[:limit]


def saved_gallery() -> tuple[list[tuple[str, str]], list[str]]:
    """(gallery items: path and the prompt it was made for, the paths in the same order)."""
    items = []
    for path in saved_images():
        try:
            with Image.open(path) as image:
                prompt = _metadata(image).get("prompt", "")
        except (OSError, UnidentifiedImageError):
            continue
        items.append((str(path), prompt or path.name))
    return items, [path for path, _ in items]


def pick_saved(paths: list[str], index: int | None, current=None):
    """(image, prompt, model, message) of the picked image; prompt and model come from the PNG's
    embedded parameters and stay as they are for an image without them. On failure the image shown
    (`current`) is given back as it is (see generate_image)."""
    if index is None or not 0 <= index < len(paths or []):
        return current, gr.update(), gr.update(), "Pick an image in the gallery."
    path = Path(paths[index])
    try:
        path.resolve().relative_to(get_settings().runs_dir.resolve())  # only the data folder's images
        with Image.open(path) as image:
            picture = image.convert("RGB")
            metadata = _metadata(image)
    except (OSError, ValueError, UnidentifiedImageError) as error:
        return current, gr.update(), gr.update(), f"Cannot open `{path.name}`: {error}"
    prompt = metadata.get("prompt") or gr.update()
    model = metadata.get("model") or gr.update()
    seed = f", seed {metadata['seed']}" if "seed" in metadata else ""
    return picture, prompt, model, f"Picked `{path.name}`{seed}. Press **Detect & relabel** next."


def inspect_image(image, prompt: str, model: str, detector_choice: str = "auto", box_threshold: float = 0.3,
                  options: list[str] | None = None, progress=gr.Progress()):
    """Detect, segment and relabel; returns the values of the tab's outputs, in order:
    annotated image, parsed scene, detected scene, word diff, relabeled prompt, verdict, message.
    `options` are RELABEL_OPTIONS labels (None: IPR's defaults). `progress` names each stage: real
    detectors and SAM take a while to load the first time."""
    empty = (None, None, None, None, "", "")
    chosen = ipr_relabel_options() if options is None else options
    try:
        picture = as_image(image)
        if not prompt or not prompt.strip():
            raise InvalidInput("Give the prompt the image was made for: the relabel rewrites it.")
        name = detector_for(model, detector_choice)
        progress(0.0, desc=f"loading the {name} detector")
        detector = _detector(name)
        progress(0.3, desc=f"detecting objects with {name}")
        spec = parse_prompt(prompt)
        # The shapes detector sees everything; open-vocabulary detectors need the names to look for.
        labels = None if name == "shapes" else _classes(spec)
        with out_of_memory_as_message(f"detecting objects with {name}", PERCEPTION_ADVICE):
            detections = list(detector.detect(picture, labels))
        found = [d.to_dict() for d in detections]
        result = relabel(prompt, found, picture.width, picture.height, box_threshold=float(box_threshold),
                         **{keyword: label in chosen for label, keyword in RELABEL_OPTIONS.items()})
        # As an IPR run decides: not trained on when the detector is unsure of an object it calls.
        keep, _unsure, reasons = training_verdict(result, found, float(box_threshold), confidence_bar(detector))
    except WorkbenchError as error:
        return (*empty, f"Cannot inspect: {error}")

    notes = []
    masks = None
    try:
        progress(0.6, desc="segmenting the detected objects")
        segmenter = _segmenter(SEGMENTER_FOR.get(name, "sam"))
        with out_of_memory_as_message("segmenting the detected objects", PERCEPTION_ADVICE):
            masks = segmenter.segment(picture, [d.box for d in detections]) if detections else []
    except WorkbenchError as error:
        notes.append(f"No masks: {error}")
    shown = annotated(picture, detections, masks, threshold=float(box_threshold))
    kept = sum(d.score > box_threshold for d in detections)
    verdict = "\n".join([
        f"**{'Changed' if result.changed else 'Unchanged'}**, "
        f"{'kept for training' if keep else 'not kept for training'}.",
        *(f"- {reason}" for reason in reasons),
    ])
    message = f"{len(detections)} detection(s) with `{name}`, {kept} above {box_threshold:.2f} (kept by the relabel)."
    if notes:
        message += " " + " ".join(notes)
    return (shown, result.spec, result.detected_spec, word_diff(prompt, result.prompt), result.prompt, verdict,
            message)


def _classes(spec: dict) -> list[str]:
    names = [clause["class"] for key in ("include", "exclude") for clause in spec.get(key, [])]
    return list(dict.fromkeys(names))


# --- layout --------------------------------------------------------------------------------------


def build_inspect_tab() -> None:
    """Create the tab's components inside the current Gradio context."""
    with gr.Row():
        with gr.Column(scale=2):
            model = model_dropdown(get_settings().default_model, elem_id="inspect-model")
            prompt = gr.Textbox(label="Prompt", lines=2, placeholder="two red circles above a blue square",
                                elem_id="inspect-prompt")
            with gr.Row():
                seed = gr.Number(value=0, precision=0, label="Seed")
                generate_button = gr.Button("Generate one image", elem_id="inspect-generate")
            # A file path, decoded by the handlers; PNG, so a generated image is inspected pixel for pixel.
            image = readable_uploads(gr.Image(type="filepath", format="png", sources=["upload", "clipboard"],
                                              label="Image (generated, or upload your own)", height=320,
                                              elem_id="inspect-image"))
            with gr.Accordion("Or pick an image generated earlier", open=False, elem_id="inspect-saved") as saved_box:
                saved = gr.Gallery(label="Newest first (Generate tab, comparisons)", columns=6, height=260,
                                   object_fit="contain", allow_preview=False, elem_id="inspect-saved-gallery")
                refresh_saved = gr.Button("Refresh", size="sm", elem_id="inspect-saved-refresh")
            saved_paths = gr.State([])
            with gr.Row():
                detector = gr.Dropdown(DETECTOR_CHOICES, value="auto", label="Detector",
                                       info="auto: shapes for the shapes model, GroundingDINO otherwise")
                threshold = gr.Slider(0.0, 0.95, value=0.3, step=0.05, label="Box threshold",
                                      info="detections scoring at or below it are ignored")
            options = gr.CheckboxGroup(list(RELABEL_OPTIONS), value=ipr_relabel_options(), label="Relabel",
                                       info="ticked as an IPR run relabels by default", elem_id="inspect-options")
            inspect_button = gr.Button("Detect & relabel", variant="primary", elem_id="inspect-button")
            message = gr.Markdown(elem_id="inspect-status")
        with gr.Column(scale=3):
            boxes = gr.AnnotatedImage(label="Detections and masks", height=384, format="png",
                                      elem_id="inspect-annotated")
            diff = gr.HighlightedText(label="Original → relabeled prompt", color_map=DIFF_COLORS,
                                      show_legend=True, combine_adjacent=False, elem_id="inspect-diff")
            relabeled = gr.Textbox(label="Relabeled prompt", interactive=False, elem_id="inspect-relabeled")
            verdict = gr.Markdown(elem_id="inspect-verdict")
            with gr.Row():
                parsed = gr.JSON(label="Scene the prompt asks for")
                detected = gr.JSON(label="Scene detected")

    generate_button.click(generate_image, [model, prompt, seed, image], [image, message], api_name="inspect_generate")

    def on_pick(paths, current, event: gr.SelectData):
        return pick_saved(paths, event.index, current)

    saved_box.expand(saved_gallery, None, [saved, saved_paths])
    refresh_saved.click(saved_gallery, None, [saved, saved_paths])
    saved.select(on_pick, [saved_paths, image], [image, prompt, model, message])
    image.upload(fill_from_metadata, image, [prompt, model, message])
    inspect_button.click(inspect_image, [image, prompt, model, detector, threshold, options],
                         [boxes, parsed, detected, diff, relabeled, verdict, message], api_name="inspect_relabel")
