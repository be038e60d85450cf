"""Local captions & masks tab: RealignDiff's training-free fine stage on one prompt and seed.

The tab calls `pipelines.realign_fine.realign_fine` and shows what it did: the tags of the image with the LLM's
score of each (2 certain, 0.5 possible, 0 unlikely), the local caption of each object and the prompt tokens that
got its mask, the masks over the original image, every prompt token's cross-attention map before and after the
modulation, and the regenerated image beside the original (same seed).

Every run is written to `<data>/realign-fine/<run>/` by the pipeline itself, and everything shown is read back
from that folder, so a past run reopens after a restart exactly as it was, without recomputing.
Handlers are plain functions so they are tested without a browser.
"""

from __future__ import annotations

import functools
import json
import math
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import numpy as np
import pandas as pd
from PIL import Image

from pipelines.realign_fine import FineStageConfig, Perception, backend_names, realign_fine
from ..attention_modulation import EDGES
from ..config import get_settings
from ..errors import InvalidInput, WorkbenchError
from ..generation import GenerationRequest
from ..jobs import run_names
from ..llm import LLMS
from ..memory import out_of_memory_as_message
from ..perception.backends import DETECTORS, SEGMENTERS, TAGGERS
from ..prompt_parser import check_prompt
from ..registry import load_pipeline
from .adapters import model_dropdown
from .compare import default_steps
from .inspect import DISPLAY_SIDE, MASK_ALPHA

RUNS_FOLDER = "realign-fine"  # under the data folder
AUTO = "auto"  # a backend left to the model's own world (shapes -> shapes; real models -> CLIP, Grounded-SAM, LLM)
BACKEND_CHOICES = {"llm": list(LLMS), "tagger": list(TAGGERS), "detector": list(DETECTORS), "segmenter": list(SEGMENTERS)}
SCORE_MEANING = {2.0: "certain", 0.5: "possible", 0.0: "unlikely"}
MAX_STRENGTH = 10.0
ATTENTION_SIDE = 96  # each token's map is enlarged (nearest) to this many pixels
TABLE_COLUMNS = ["tag", "tagger confidence", "LLM score", "LLM says", "local caption", "tokens given its mask",
                 "mask area %", "effect"]
# A dark-to-bright ramp (black, purple, orange, yellow) so weak and strong attention read apart at a glance.
HEAT_STOPS = np.array([0.0, 0.35, 0.7, 1.0])
HEAT_COLORS = np.array([[0, 0, 4], [120, 28, 109], [237, 105, 37], [252, 255, 164]], dtype=np.float32)


# --- the run folders -----------------------------------------------------------------------------


def runs_dir() -> Path:
    return get_settings().data_dir / RUNS_FOLDER


def past_runs() -> list[tuple[str, str]]:
    """(label, folder name) of every saved run, newest first; the label says prompt and seed."""
    choices = []
    for name in run_names(runs_dir(), lambda folder: (folder / "result.json").is_file()):
        try:
            result = json.loads((runs_dir() / name / "result.json").read_text())
            label = f"{name} · {result['prompt'][:60]} (seed {result['seed']}, S {result['config']['strength']:g})"
        except (OSError, ValueError, KeyError, TypeError):
            label = name  # still listed: opening it says what is wrong with it
        choices.append((label, name))
    return choices


def new_run_folder() -> Path:
    # The timestamp sorts and reads well; the suffix keeps two runs started in the same second apart.
    return runs_dir() / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


@dataclass
class SavedRun:
    """One run as the pipeline wrote it: result.json, the two images, each object's mask, the attention maps."""

    folder: Path
    result: dict
    original: Image.Image
    realigned: Image.Image
    masks: dict[str, np.ndarray]  # object -> bool (H, W)
    before: np.ndarray  # (tokens, h, w) cross-attention of the realigned run without the modulation
    after: np.ndarray  # (tokens, h, w) and with it
    tokens: dict[int, str]  # prompt token index -> text


def load_run(name: str) -> SavedRun:
    """Read a run folder back; InvalidInput when it is gone or incomplete."""
    folder = runs_dir() / Path(name).name  # only folders under the data folder, whatever the page sends
    try:
        result = json.loads((folder / "result.json").read_text())
        with Image.open(folder / "original.png") as original, Image.open(folder / "realigned.png") as realigned:
            images = original.convert("RGB"), realigned.convert("RGB")
        masks = {}
        for region in result["regions"]:
            with Image.open(folder / region["mask"]) as mask:
                masks[region["object"]] = np.asarray(mask.convert("L")) > 127
        with np.load(folder / "attention.npz") as maps:
            before, after = maps["before"], maps["after"]
            tokens = {int(index): text for index, text in (entry.split(":", 1) for entry in maps["tokens"])}
    except FileNotFoundError as error:
        raise InvalidInput(f"The run '{folder.name}' is incomplete or gone: {Path(error.filename).name} "
                           f"is missing from {folder}.") from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InvalidInput(f"The run '{folder.name}' cannot be read ({error}).") from None
    return SavedRun(folder, result, *images, masks, before, after, tokens)


# --- what the page shows -------------------------------------------------------------------------


def enlarged(image: Image.Image) -> tuple[Image.Image, int]:
    """Small images (the shapes world's are 64 px) enlarged by a whole factor, nearest neighbour, to stay crisp."""
    scale = max(1, math.ceil(DISPLAY_SIDE / max(image.size)))
    return (image.resize((image.width * scale, image.height * scale), Image.NEAREST) if scale > 1 else image), scale


def region_tokens(run: SavedRun) -> dict[str, dict[int, str]]:
    """object -> {token index: word} of the prompt tokens that got its mask."""
    return {region["object"]: {int(index): word for index, word in region["tokens"].items()}
            for region in run.result["regions"]}


def tokens_text(tokens: dict[int, str]) -> str:
    return ", ".join(f"{index} {word}" for index, word in sorted(tokens.items()))


def tag_table(run: SavedRun) -> pd.DataFrame:
    """One row per tag, best first: its LLM score and, for the objects realigned, local caption and tokens."""
    result = run.result
    regions = {region["object"]: region for region in result["regions"]}
    tokens = region_tokens(run)
    rows = []
    for tag in result["tags"]:
        name, score = tag["name"], tag["llm_score"]
        region = regions.get(name)
        if region is not None:
            effect = "realigned: its caption's tokens are pulled into its mask"
        elif score == 0:
            effect = "not asked for: gets no tokens"
        else:
            effect = "no region of its own (regions go to the object classes detected)"
        rows.append([name, round(float(tag["confidence"]), 3), score, SCORE_MEANING.get(score, ""),
                     result["local_captions"].get(name, ""), tokens_text(tokens.get(name, {})),
                     round(100 * region["area"], 1) if region else "", effect])
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def mask_overlay(run: SavedRun) -> tuple[Image.Image, list[tuple[np.ndarray, str]]]:
    """gr.AnnotatedImage value: the original image with one layer per realigned object's mask."""
    big, scale = enlarged(run.original)
    tokens = region_tokens(run)
    layers = []
    for name, mask in run.masks.items():
        layer = np.kron(mask, np.ones((scale, scale), dtype=bool))[:big.height, :big.width].astype(np.float32)
        caption = run.result["local_captions"].get(name, name)
        words = ", ".join(word for _, word in sorted(tokens.get(name, {}).items()))
        layers.append((layer * MASK_ALPHA, f"{name}: “{caption}” (tokens: {words or 'none'})"))
    return big, layers


def heat(values: np.ndarray) -> Image.Image:
    """A 2-D map in [0, 1] as a coloured image, enlarged to ATTENTION_SIDE."""
    v = np.clip(values, 0.0, 1.0)
    rgb = np.stack([np.interp(v, HEAT_STOPS, HEAT_COLORS[:, c]) for c in range(3)], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb, "RGB").resize((ATTENTION_SIDE, ATTENTION_SIDE), Image.NEAREST)


def attention_galleries(run: SavedRun) -> tuple[list[tuple[Image.Image, str]], list[tuple[Image.Image, str]]]:
    """(before, after) gallery values: one map per prompt token, in prompt order, captioned with the token and
    the object whose mask it got. A token's two maps share one scale (their common maximum), so the change
    between them is real; different tokens are scaled apart, so a weak token's map still shows its shape."""
    owner = {index: name for name, tokens in region_tokens(run).items() for index in tokens}
    before, after = [], []
    for index, text in run.tokens.items():
        top = max(float(run.before[index].max()), float(run.after[index].max()), 1e-12)
        caption = f"{index} {text}" + (f" → {owner[index]}" if index in owner else "")
        before.append((heat(run.before[index] / top), caption))
        after.append((heat(run.after[index] / top), caption))
    return before, after


def summary(run: SavedRun) -> str:
    result, config = run.result, run.result["config"]
    captions = ", ".join(f"{name}: “{caption}”" for name, caption in result["local_captions"].items())
    missing = [f"“{region['caption']}” ({', '.join(region['missing_words'])})" for region in result["regions"]
               if region["missing_words"]]
    lines = [f"**{result['prompt']}**, seed {result['seed']}, S = {config['strength']:g}, edges {config['edges']}, "
             f"model `{config['model']}` ({', '.join(f'{k} {v}' for k, v in result['backends'].items())}); "
             f"{result['seconds']:.1f} s. Saved in `{run.folder}`.",
             f"Realigned: {captions}." if captions else
             "Nothing to realign: no object the prompt names was found, so the image is regenerated unchanged."]
    if missing:
        lines.append(f"Words of local captions not in the prompt (they get no mask): {'; '.join(missing)}.")
    return "\n\n".join(lines)


def show_run(run: SavedRun):
    """Values of the tab's outputs, in order: original, realigned, table, masks, attention before, after, status."""
    before, after = attention_galleries(run)
    return (enlarged(run.original)[0], enlarged(run.realigned)[0], tag_table(run), mask_overlay(run), before, after,
            summary(run))


# --- handlers ------------------------------------------------------------------------------------


def _backend(value) -> str | None:
    value = (value or "").strip() if isinstance(value, str) else value
    return None if value in (None, "", AUTO) else value


def build_config(model, prompt, seed, strength, edges, steps=None, llm=None, tagger=None, detector=None,
                 segmenter=None) -> tuple[FineStageConfig, int]:
    """(config, seed) from the tab's inputs; InvalidInput says what is wrong before anything is loaded."""
    if seed is None:
        raise InvalidInput("Give a seed (a whole number): the original and the realigned image share it.")
    if steps is not None and steps != "":
        steps = int(steps)
    # The Generate tab's checks: prompt empty or too long, seed range, steps, unknown model.
    GenerationRequest(prompt=prompt or "", model=model or "", seeds=[int(seed)], steps=steps or None).validate()
    check_prompt(prompt)  # the LLM step reads at most 1000 characters: say so before any image is drawn
    if strength is None or not 0 <= float(strength) <= MAX_STRENGTH:
        raise InvalidInput(f"The strength S must be between 0 (no change) and {MAX_STRENGTH:g} (got {strength}).")
    if edges not in EDGES:
        raise InvalidInput(f"Edge handling must be one of {', '.join(EDGES)} (got {edges!r}).")
    backends = {"llm": llm, "tagger": tagger, "detector": detector, "segmenter": segmenter}
    for kind, value in backends.items():
        if _backend(value) is not None and _backend(value) not in BACKEND_CHOICES[kind]:
            raise InvalidInput(f"Unknown {kind} backend '{value}'. Available: {', '.join(BACKEND_CHOICES[kind])}.")
    config = FineStageConfig(model=model.strip(), strength=float(strength), edges=edges, steps=steps or None,
                             **{kind: _backend(value) for kind, value in backends.items()})
    return config, int(seed)


# Real backends (CLIP, GroundingDINO, SAM, an LLM) take long to load: build them once per set of names. A load
# that fails (missing weights) raises and is not cached, so it works once the weights are there.
@functools.lru_cache(maxsize=2)
def _perception(names: tuple[tuple[str, str], ...]) -> Perception:
    return Perception.load(FineStageConfig(**dict(names)))


def run_fine_stage(model, prompt, seed, strength=1.0, edges="neutral", steps=None, llm=None, tagger=None,
                   detector=None, segmenter=None, progress=gr.Progress()):
    """Run the fine stage into a new run folder and show it; the outputs of `show_run`, then the run picker.
    Bad input or missing weights leave the page as it is and say why in the status line. It runs in the
    request (one image, interactive); `progress` shows each stage meanwhile, which takes minutes with a
    real model on a CPU."""
    keep = (gr.update(),) * 6
    try:
        config, seed = build_config(model, prompt, seed, strength, edges, steps, llm, tagger, detector, segmenter)
        progress(0.0, desc="loading the model and the perception models")
        load_pipeline(config.model)  # a missing model is named before the perception models are looked for
        folder = new_run_folder()
        with out_of_memory_as_message(f"realigning with '{config.model}' and its perception models",
                                      "Free the memory other models or programs hold, or choose lighter backends "
                                      "(a smaller LLM or tagger)."):
            perception = _perception(tuple(sorted(backend_names(config).items())))
            realign_fine(prompt, seed, folder, config, perception, log=lambda _: None,
                         on_progress=lambda fraction, stage: progress(fraction, desc=stage))
        shown = show_run(load_run(folder.name))
    except WorkbenchError as error:
        return (*keep, f"Cannot realign: {error}", gr.update())
    return (*shown, gr.update(choices=past_runs(), value=folder.name))


def open_run(name: str | None):
    """A saved run, read from disk (nothing is recomputed); the outputs of `show_run`."""
    if not name:
        return (*(gr.update(),) * 6, "Choose a saved run.")
    try:
        return show_run(load_run(name))
    except WorkbenchError as error:
        return (*(gr.update(),) * 6, f"Cannot open: {error}")


# --- layout --------------------------------------------------------------------------------------


def build_local_captions_tab() -> gr.Dropdown:
    """Create the tab inside the current Gradio context; returns the saved-run picker (refreshed on load)."""
    default_model = get_settings().default_model
    gr.Markdown("RealignDiff's fine stage, training-free: tag the image, let an LLM score each tag against the "
                "prompt, find the objects (Grounded-SAM), write a local caption for each, give its words the "
                "object's mask, and regenerate the **same seed** with the cross-attention pulled into the masks.")
    with gr.Row():
        with gr.Column(scale=2):
            model = model_dropdown(default_model, elem_id="fine-model")
            prompt = gr.Textbox(label="Prompt", lines=2, placeholder="an orange square and a red circle",
                                elem_id="fine-prompt")
            with gr.Row():
                seed = gr.Number(value=0, precision=0, label="Seed")
                strength = gr.Slider(0, 3, value=1.0, step=0.05, label="Strength S",
                                     info="0 regenerates the original exactly", elem_id="fine-strength")
            edges = gr.Radio([("neutral: cells a mask covers in part are left alone", "neutral"),
                              ("outside: pushed out, as eq. 8", "outside")], value="neutral",
                             label="Edge handling", elem_id="fine-edges")
            with gr.Accordion("Sampling and backends", open=False):
                steps = gr.Slider(1, 100, value=default_steps(default_model) or 20, step=1, label="Steps",
                                  elem_id="fine-steps")
                with gr.Row():
                    backends = [gr.Dropdown([AUTO] + choices, value=AUTO, label=kind.upper() if kind == "llm"
                                            else kind.capitalize(), allow_custom_value=True,
                                            info="auto: the model's own world")
                                for kind, choices in BACKEND_CHOICES.items()]
            run_button = gr.Button("Realign", variant="primary", elem_id="fine-button")
            status = gr.Markdown(elem_id="fine-status")
            with gr.Row():
                run = gr.Dropdown(past_runs(), value=None, label="Saved runs", scale=3, elem_id="fine-run")
                refresh = gr.Button("Refresh", scale=1)
        with gr.Column(scale=3):
            with gr.Row():
                original = gr.Image(label="Original", type="pil", format="png", interactive=False, height=320,
                                    elem_id="fine-original")
                realigned = gr.Image(label="Realigned (same seed)", type="pil", format="png", interactive=False,
                                     height=320, elem_id="fine-realigned")
            masks = gr.AnnotatedImage(label="Masks of the objects realigned, over the original", format="png",
                                      height=320, elem_id="fine-masks")
    table = gr.Dataframe(headers=TABLE_COLUMNS, label="Tags, LLM scores (2 certain, 0.5 possible, 0 unlikely) and "
                                                      "local captions", interactive=False, elem_id="fine-table")
    gr.Markdown("Cross-attention of each prompt token (`index token → object` when it got a mask), averaged over "
                "layers, heads and steps of the realigned run; each token's two maps share one scale.")
    before = gr.Gallery(label="Before modulation", columns=8, height=230, format="png", object_fit="contain",
                        elem_id="fine-before")
    after = gr.Gallery(label="After modulation", columns=8, height=230, format="png", object_fit="contain",
                       elem_id="fine-after")

    outputs = [original, realigned, table, masks, before, after, status]
    run_button.click(run_fine_stage, [model, prompt, seed, strength, edges, steps, *backends], outputs + [run],
                     api_name="local_captions")
    run.input(open_run, run, outputs)
    refresh.click(lambda: gr.update(choices=past_runs()), None, run)
    model.change(lambda name: default_steps(name) or gr.update(), model, steps)
    return run
