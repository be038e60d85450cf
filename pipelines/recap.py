"""RECAP, recaptioning (Segalis et al., "A Picture is Worth a Thousand Words: Principled Recaptioning
Improves Image Generation", arXiv 2310.16656).

    python -m pipelines.recap run --model shapes --out DIR            # the same command continues a stopped run
    python -m pipelines.recap make-shapes-data --n 2000 --out DIR
    python -m pipelines.recap recaption --data IMAGEFOLDER --captioner blip --out DIR

The paper's observation: web alt text is a poor description of its image (objects left out, wrong
counts, attributes on the wrong object, no layout), and a text-to-image model learns exactly that
looseness. Its fix, read top to bottom in `run_recap`:

1. data: the "web data", images with their alt text. In the shapes world `make_shapes_dataset`
   renders random scenes of the world's own sampler and gives each the web-style noisy alt text of
   `noisy_alt_text` (the kind of caption the shapes model was pre-trained on); for a real model,
   any imagefolder whose `text` is alt text (`config.data`).
2. recaption: a captioner reads every image's pixels and writes a short and a long (detailed)
   caption (`recaption`; the paper fine-tunes PaLI for both modes, we use the captioner backends:
   the shapes world's embedded one, BLIP, BLIP-2). The output is a new imagefolder that keeps the
   alt text; the user's folder is never written to.
3. fine-tune the model on the images with their alt text, and
4. fine-tune it on the same images with the RECAP captions: in the paper's mix, each time an image
   is drawn it comes with its short or its long caption (p = 0.5), and 14% of the captions are
   dropped for classifier-free guidance. Both fine-tunes share every setting, step count
   and seed, so they see the same images, noise and timesteps in the same order: the captions are
   the only difference.
5. evaluate base, alt-text and RECAP models on ShapesBench (or any GenEval-format prompt file).

Every stage writes its result under the run folder before the next starts and is skipped when it
exists, so calling `run_recap` again continues a crashed or cancelled run (the recaptioner from its
partial file, the trainer from its checkpoints). Folder layout:

    config.json  summary.json  eval-base/
    data/        images/  metadata.jsonl  scenes.jsonl  dataset.json     (shapes world, made here)
    recaptioned/ images/  metadata.jsonl  recaption.json                 (the relabeled imagefolder)
    alt-text/    train/metadata.jsonl  adapter/  eval/
    recap/       train/metadata.jsonl  adapter/  eval/
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from pipelines.trainer import (TRANSFORMER_TARGETS, UNET_TARGETS, UNTRAINED_UNET_NEEDS_TEXT_ENCODER,
                               add_target_modules_argument, parse_target_modules, refuse_settings_with_resume)
from workbench.benchmark import (SHAPESBENCH, BenchmarkConfig, check_run_settings, detector_name, format_scores,
                                 run_benchmark)
from workbench.console import ConsoleProgress
from workbench.errors import InvalidInput, JobCancelled, WorkbenchError
from workbench.generation import LoraSpec, lora_weights_file
from workbench.imagefolder import read_imagefolder
from workbench.shapes.world import IMAGE_SIZE
from workbench.store import bind_run_config, check_output_folder, read_jsonl, write_json, write_jsonl

CAPTION_MIXES = ("mix", "short", "long")  # the paper's short/long mix, or short or long captions only
VARIANTS = {"base": "base", "alt_text": "alt-text", "recap": "RECAP"}  # summary key -> column title
# The paper's short captions are brief, human-style ones that name what is there; its long ones add
# attributes and layout. The shapes captioner's plain short mode states every colour, so with it every
# training caption names a colour, and a model fine-tuned on them draws nothing detectable for a prompt
# that names none (after an 800-step probe: 0 of 4 seeds for "a circle", against 4 of 4 before; 27%
# single_object on held-out prompts against 91% with brief shorts). Its brief short mode ("two
# circles and a square") leaves colours to the long caption.
CAPTIONER_OPTIONS = {"shapes": {"brief_short": True}}
# Settings added after older runs were saved, with the value those runs had, so they stay resumable.
IMPLIED_SETTINGS = {"inline_pairs": False, "target_modules": list(UNET_TARGETS), "train_unet": True}


@dataclass
class RecapConfig:
    model: str = "shapes"
    # The web data: an imagefolder whose `text_field` holds alt text, or None to render the shapes
    # world's own (`images` random scenes, seed `data_seed`, at the model's resolution).
    data: str | None = None
    images: int = 5000  # 10000 training rows: each image is drawn ~16 times in 2500 steps of 32
    data_seed: int = 0
    single_share: float | None = None  # share of single-object scenes; None: the shapes model's pre-training mix
    text_field: str = "text"
    # None: the captioner of the data's world ("shapes" for shapes data, else "blip").
    captioner: str | None = None
    skip_unreadable: bool = False  # drop images that cannot be read instead of stopping
    captions: str = "mix"  # see CAPTION_MIXES
    # Shapes captioner: write a related pair in one phrase, as people say it ("a circle to the left
    # of a square"), in the long and the brief short caption, not only as a clause after the list
    # (workbench.shapes.captions.figure_and_ground). With it the RECAP fine-tunes learn where things
    # go from prompts worded as people word them: RECAP minus alt text rose from +1.0 to +7.9 (LoRA)
    # and from +2.0 to +9.9 (full UNet), position from 0 to 17-24 (assets/adapters/recap-shapes/README.md).
    # Pairs in the long caption only (an earlier version) left position at 0.
    inline_pairs: bool = True
    # Fine-tuning (pipelines.trainer), the same for both fine-tunes. It must be strong enough for the
    # captions to matter: a rank-8 LoRA at IPR's settings leaves both models next to the base. Rank 64
    # at lr 5e-4 for 2500 steps of 32 (80k image draws, a quarter of the shapes model's own
    # pre-training) lets each model move toward what its captions say, and stays a diffusers-format
    # adapter. Stronger settings (lr 1e-3, or a full UNet fine-tune, `lora=False`, at 5e-4) made the
    # RECAP model lose more on prompts worded unlike its captioner's grammar, in 800-step probes on
    # held-out training-grammar prompts (never ShapesBench's). A full UNet fine-tune at lr 1e-4 gains
    # more (RECAP minus alt text +9.9 against the LoRA's +7.9) but is a 16 MB UNet, not an adapter.
    lora: bool = True
    rank: int = 64
    alpha: float = 64.0
    # The UNet layers the LoRA adapts (pipelines.trainer.TARGET_PRESETS or module names): the whole
    # transformer blocks, since RECAP's captions change what words mean for the image and the paper
    # fine-tunes the whole model. Same data and steps: RECAP minus alt text +10.1 against +7.9 with
    # the attention projections alone (assets/adapters/recap-shapes/README.md).
    target_modules: list[str] = field(default_factory=lambda: list(TRANSFORMER_TARGETS))
    # Kept frozen: the shapes text encoder fine-tuned along (lr 5e-4) forgot two-object prompts.
    train_text_encoder: bool = False
    # False (with train_text_encoder and a LoRA; not in the paper): both fine-tunes adapt the text
    # encoder only, and the UNet stays the base model's, as IPR's and SELMA's text-encoder adapters.
    train_unet: bool = True
    steps: int = 2500
    batch_size: int = 32
    lr: float = 5e-4
    prompt_dropout: float = 0.14  # the paper's share of empty captions
    seed: int = 0
    # Evaluation: the same sampling settings for base, alt-text and RECAP models.
    detector: str | None = None  # None: the model's own world (shapes model -> shapes detector)
    sample_steps: int | None = None  # None: the base model's default
    guidance: float | None = None
    eval_prompts: str = str(SHAPESBENCH)
    eval_seeds: int = 4  # 0: skip evaluation

    def validate(self) -> None:
        if self.data is not None:
            self.data = str(Path(self.data).expanduser().resolve())
        checks = [
            (self.data is not None or self.images >= 1, f"Give at least one image to render (got {self.images})."),
            (self.captions in CAPTION_MIXES, f"Unknown caption choice '{self.captions}'; use one of "
                                             f"{', '.join(CAPTION_MIXES)}."),
            (self.steps >= 1, f"Training steps must be at least 1 (got {self.steps})."),
            (self.batch_size >= 1, f"The batch size must be at least 1 (got {self.batch_size})."),
            (self.train_unet or (self.lora and self.train_text_encoder), UNTRAINED_UNET_NEEDS_TEXT_ENCODER),
            (0.0 <= self.prompt_dropout < 1.0, f"prompt_dropout must be in [0, 1) (got {self.prompt_dropout})."),
            (bool(self.text_field.strip()), "Name the metadata field that holds the alt text (text_field)."),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidInput(message)
        from workbench.perception.backends import CAPTIONERS, check_all, check_backend

        if self.captioner_name() not in CAPTIONERS:
            raise InvalidInput(f"Unknown captioner '{self.captioner}'. Available: {', '.join(CAPTIONERS)}.")
        # All that is missing in one message, before any image is rendered.
        check_all([lambda: check_run_settings(self.model, self.eval_prompts, self.eval_seeds, self.detector),
                   lambda: check_backend("captioner", self.captioner_name(), **self.captioner_options())])

    def captioner_name(self) -> str:
        """The named captioner, else the data's world's: rendered data, or any data of the shapes model, is
        the shapes world's; other data is read by BLIP."""
        from workbench.skills import world_of

        if self.captioner:
            return self.captioner
        return "shapes" if self.data is None or world_of(self.model) == "shapes" else "blip"

    def captioner_options(self) -> dict:
        """What the recaptioner backend is built with."""
        options = dict(CAPTIONER_OPTIONS.get(self.captioner_name(), {}))
        if self.captioner_name() == "shapes" and self.inline_pairs:  # off: as recaptions made before it
            options["inline_pairs"] = True
        return options

    @classmethod
    def from_dict(cls, data: dict) -> "RecapConfig":
        known = {f.name for f in fields(cls)}
        data = {**IMPLIED_SETTINGS, **data}
        return cls(**{key: value for key, value in data.items() if key in known})


@dataclass
class Stages:
    """Progress over the whole run: each stage owns a slice of [0, 1] (weights ~ measured time)."""

    report: Callable[[float, str], None] | None
    weights: dict = field(default_factory=lambda: {"data": 0.002, "recaption": 0.005, "train alt-text": 0.33,
                                                   "train RECAP": 0.33, "eval base": 0.11, "eval alt-text": 0.11,
                                                   "eval RECAP": 0.11})

    def __call__(self, stage: str, fraction: float, message: str) -> None:
        if self.report is None:
            return
        order = list(self.weights)
        before = sum(self.weights[s] for s in order[:order.index(stage)])
        done = (before + min(max(fraction, 0.0), 1.0) * self.weights[stage]) / sum(self.weights.values())
        self.report(done, f"{stage}: {message}")


# --- the run ----------------------------------------------------------------------------------------


def run_recap(config: RecapConfig, out_dir: Path, on_progress: Callable[[float, str], None] | None = None,
              should_stop: Callable[[], bool] | None = None, log: Callable[[str], None] = print) -> dict:
    """Run (or continue) a RECAP run in `out_dir`; returns {"status", "run", "adapters", "summary", "seconds"}.

    on_progress(fraction in [0, 1], message) is called throughout; should_stop() is polled between
    images, training steps and generation steps, and a stop raises JobCancelled (run again to continue).
    """
    from workbench.registry import resolve

    config.validate()
    out_dir = check_output_folder(out_dir)  # a file there: said before any work
    out_dir.mkdir(parents=True, exist_ok=True)
    bind_run_config(out_dir, {"kind": "recap", **asdict(config)}, "a RECAP run", implied=IMPLIED_SETTINGS)
    stages = Stages(on_progress)
    if not config.eval_seeds:
        stages.weights = {k: v for k, v in stages.weights.items() if not k.startswith("eval")}
    started = time.time()
    entry = resolve(config.model)

    # 1. The web data.
    if config.data is None:
        data = out_dir / "data"
        made = make_shapes_dataset(data, config.images, seed=config.data_seed, size=entry.default_size,
                                   single_share=config.single_share,
                                   on_progress=lambda f, m: stages("data", f, m), should_stop=should_stop)
        log(f"data: {made['images']} shapes scenes with noisy alt text in {data} "
            f"({made['alt_text_exact']:.0%} of alt texts are exact)")
    else:
        data = Path(config.data)

    # 2. Recaption from the pixels.
    recaptioned = out_dir / "recaptioned"
    result = recaption(data, recaptioned, captioner=config.captioner_name(), text_field=config.text_field,
                       skip_unreadable=config.skip_unreadable, captioner_options=config.captioner_options(),
                       on_progress=lambda f, m: stages("recaption", f, m),
                       should_stop=should_stop)
    if result.get("stopped"):
        raise JobCancelled("recaptioning was stopped; run again to continue where it stopped")
    rows = read_jsonl(recaptioned / "metadata.jsonl")
    exact = caption_stats(out_dir, config).get("exact_share")
    log(f"recaption: {result['images']} images captioned by '{result['captioner']}' "
        f"({result['skipped']} unreadable skipped, {result.get('empty_captions', 0)} with an empty caption: the "
        f"captioner saw nothing)" +
        (f"; exact: long captions {exact['long_caption']:.0%}, alt text {exact['alt_text']:.0%}" if exact else ""))

    # 3-4. Two fine-tunes that differ only in their captions.
    adapters = {}
    for variant, folder, kind in (("alt_text", "alt-text", "alt"), ("recap", "recap", config.captions)):
        train_rows = recap_training_rows(rows, recaptioned, kind)
        adapters[variant] = fine_tune(config, train_rows, out_dir / folder, f"train {VARIANTS[variant]}", stages,
                                      should_stop, log)

    # 5. Evaluate the three models with the same prompts, seeds and sampling settings.
    scores = {}
    if config.eval_seeds:
        scores["base"] = evaluate(config, None, out_dir / "eval-base", "eval base", stages, should_stop, log)
        for variant, folder in (("alt_text", "alt-text"), ("recap", "recap")):
            scores[variant] = evaluate(config, adapters[variant], out_dir / folder / "eval",
                                       f"eval {VARIANTS[variant]}", stages, should_stop, log)
    summary = write_summary(out_dir, config, scores, adapters)
    return {"status": "done", "run": str(out_dir), "adapters": {k: str(v) for k, v in adapters.items()},
            "summary": summary, "seconds": round(time.time() - started, 1)}


# --- 1. the shapes world's web data -----------------------------------------------------------------


def is_rendered_shapes_data(folder: Path) -> bool:
    """Whether `folder` is a shapes-world imagefolder that make_shapes_dataset rendered (its own files)."""
    folder = Path(folder)
    return all((folder / name).is_file() for name in ("dataset.json", "scenes.jsonl", "metadata.jsonl"))


def make_shapes_dataset(out: Path, n: int, seed: int = 0, size: int = IMAGE_SIZE, noise=None,
                        single_share: float | None = None,
                        on_progress: Callable[[float, str], None] | None = None,
                        should_stop: Callable[[], bool] | None = None) -> dict:
    """Render n random scenes with web-style noisy alt text into the imagefolder `out`; returns its stats.

    Scenes are drawn as the shapes model's own pre-training pool draws them (`pipelines.train_shapes`):
    `single_share` of them single objects (None: that pool's share), the rest from `sample_scene`'s
    mix. As the paper recaptions the very web data its model was trained on, only the captions then
    differ from pre-training: on a mix with fewer single objects, the unconditional branch learns
    busier images and guidance wipes out whole objects of "a circle" from RECAP-tuned models (blank
    images in 6 of 16 seeds after an 800-step probe).

    Writes images/NNNNN.png, metadata.jsonl ({"file_name", "text": alt text}), scenes.jsonl (the true
    scenes, for checks only: the recaptioner reads pixels, never this file) and dataset.json (settings
    and stats). Image i depends on (seed, i) alone, so the same settings give the same files, and the
    first k images of a larger set are a smaller one. A finished folder with the same settings is kept.
    """
    from workbench.shapes.captions import AltTextNoise, long_caption, noisy_alt_text
    from workbench.shapes.render import render
    from workbench.shapes.scene import Scene, ShapeObject, sample_scene

    check_output_folder(out)
    noise = noise or AltTextNoise()
    if single_share is None:
        from pipelines.train_shapes import Config

        single_share = Config().single_share
    if not 0.0 <= single_share <= 1.0:
        raise InvalidInput(f"single_share must be in [0, 1] (got {single_share}).")
    if n < 1:
        raise InvalidInput(f"Give at least one image to render (got {n}).")
    if size < 16:
        raise InvalidInput(f"Images must be at least 16 pixels wide (got {size}).")
    out = Path(out)
    settings = {"images": n, "seed": seed, "size": size, "single_share": single_share, "noise": asdict(noise)}
    info_path = out / "dataset.json"
    if info_path.exists() and (out / "metadata.jsonl").exists():
        info = json.loads(info_path.read_text())
        if info.get("settings") != settings:
            raise InvalidInput(f"{out} holds a shapes dataset made with other settings ({info.get('settings')}); "
                               f"choose another folder.")
        return info
    (out / "images").mkdir(parents=True, exist_ok=True)
    started = time.time()
    rows, scenes = [], []
    scale = size / IMAGE_SIZE  # the world lays scenes out at 64 px; other sizes scale them exactly
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        scene = sample_scene(rng, max_objects=1) if rng.random() < single_share else sample_scene(rng)
        alt = noisy_alt_text(scene, rng, noise)
        if scale != 1:
            scene = Scene(tuple(ShapeObject(o.shape, o.color, o.cx * scale, o.cy * scale, o.size * scale)
                                for o in scene.objects), size, size)
        name = f"images/{i:05d}.png"
        render(scene).save(out / name)
        rows.append({"file_name": name, "text": alt})
        scenes.append({"file_name": name, "scene": scene.to_dict(), "caption": long_caption(scene)})
        if i % 100 == 99 or i == n - 1:
            if on_progress is not None:
                on_progress((i + 1) / n, f"{i + 1}/{n} scenes rendered")
            if should_stop is not None and should_stop() and i < n - 1:
                raise JobCancelled("making the shapes dataset was stopped; run again to make it")
    write_jsonl(out / "scenes.jsonl", scenes)
    write_jsonl(out / "metadata.jsonl", rows)
    info = {"settings": settings, "images": n, "seconds": round(time.time() - started, 2),
            "alt_text_exact": float(np.mean([r["text"] == s["caption"] for r, s in zip(rows, scenes)])),
            "shapesbench_overlap": {"alt_text": bench_overlap([r["text"] for r in rows]),
                                    "exact_caption": bench_overlap([s["caption"] for s in scenes])}}
    write_json(info_path, info)
    return info


def bench_overlap(texts: list[str], prompts: str | Path = SHAPESBENCH) -> float:
    """Share of texts that are, ignoring case, spacing and punctuation, one of the prompt file's prompts."""
    from workbench.evaluation import load_prompt_file
    from workbench.shapes.bench_prompts import normalize_prompt

    bench = {normalize_prompt(record["prompt"]) for record in load_prompt_file(str(prompts))}
    return float(np.mean([normalize_prompt(text) in bench for text in texts])) if texts else 0.0


# --- 2. the recaptioner -----------------------------------------------------------------------------


def read_alt_text_rows(data: Path, text_field: str = "text") -> list[dict]:
    """The rows of an imagefolder's metadata.jsonl, checked: one-line InvalidInput on any problem."""
    meta, rows = read_imagefolder(data, text_field, text_hint="the alt text; use \"\" for none")
    if not rows:
        raise InvalidInput(f"{meta} lists no images.")
    return rows


def recaption(data: Path, out: Path, captioner: str = "shapes", text_field: str = "text", batch_size: int = 16,
              skip_unreadable: bool = False, captioner_options: dict | None = None,
              on_progress: Callable[[float, str], None] | None = None,
              should_stop: Callable[[], bool] | None = None) -> dict:
    """Write a short and a long caption for every image of the imagefolder `data` into a new imagefolder `out`.

    captioner_options go to the backend (None: CAPTIONER_OPTIONS, i.e. brief short captions for "shapes").

    Each row of out/metadata.jsonl is the source row (alt text untouched in `text_field`) plus
    "alt_text", "short_caption" and "long_caption"; images are hard-linked (copied across file
    systems) under the same relative names. Rows are appended to out/metadata.partial.jsonl as they
    are captioned, so a stopped or killed recaption continues where it stopped; metadata.jsonl
    appears, whole, at the end. Returns the stats saved in out/recaption.json, with "stopped": True
    when should_stop() ended it early.
    """
    from workbench.perception.backends import check_backend, get_captioner

    captioner_options = CAPTIONER_OPTIONS.get(captioner, {}) if captioner_options is None else captioner_options
    data, out = Path(data).expanduser(), check_output_folder(Path(out).expanduser())
    if out.resolve() == data.resolve():
        raise InvalidInput(f"The recaptioned folder must differ from the source {data}: the source is never "
                           f"overwritten.")
    if batch_size < 1:
        raise InvalidInput(f"batch_size must be at least 1 (got {batch_size}).")
    source = read_alt_text_rows(data, text_field)
    meta = data / "metadata.jsonl"
    settings = {"source": str(data.resolve()), "source_sha256": hashlib.sha256(meta.read_bytes()).hexdigest(),
                "captioner": captioner, "captioner_options": captioner_options, "text_field": text_field,
                "skip_unreadable": skip_unreadable}
    info_path, final, partial = out / "recaption.json", out / "metadata.jsonl", out / "metadata.partial.jsonl"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        saved = info.get("settings", {})
        # Turning skipping on to get past an unreadable image continues the same recaption: the rows written
        # before it stopped are the same either way. Turning it off after skips would not be.
        if not info.get("done") and skip_unreadable and saved.get("skip_unreadable") is False:
            saved = {**saved, "skip_unreadable": True}
            write_json(info_path, {**info, "settings": saved})
        if saved != settings:
            differing = sorted(k for k in settings if saved.get(k) != settings[k])
            raise InvalidInput(f"{out} holds captions of another recaption ({', '.join(differing)} differ); "
                               f"choose another output folder.")
        if info.get("done") and final.exists():
            return info
    check_backend("captioner", captioner, **captioner_options)  # missing weights: say so before work
    out.mkdir(parents=True, exist_ok=True)
    write_json(info_path, {"settings": settings, "done": False})

    model = get_captioner(captioner, **captioner_options)
    written = _read_partial(partial)
    started, total = time.time(), len(source)
    with partial.open("a") as handle:
        for start in range(len(written), total, batch_size):
            chunk, images, places = [], [], []
            for index in range(start, min(start + batch_size, total)):
                record = source[index]
                image, problem = _open_image(data / record["file_name"])
                if problem is not None:
                    if not skip_unreadable:
                        raise InvalidInput(f"Cannot read image {data / record['file_name']} (line {index + 1} of "
                                           f"{meta}): {problem}. Remove it, or skip unreadable images "
                                           f"(--skip-unreadable; in the app, the 'Skip unreadable images' box).")
                    chunk.append({"file_name": record["file_name"], "skipped": problem})
                    continue
                chunk.append(None)
                images.append(image)
                places.append((index, record))
            short = _caption_many(model, images, "short", batch_size)
            long = _caption_many(model, images, "long", batch_size)
            captioned = iter(zip(places, short, long))
            for k, row in enumerate(chunk):
                if row is None:
                    (index, record), s, l = next(captioned)
                    name = _place_image(data / record["file_name"], out, record["file_name"], index)
                    row = {**record, "file_name": name, "alt_text": record[text_field],
                           "short_caption": s.strip(), "long_caption": l.strip()}
                handle.write(json.dumps(row) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
            done = min(start + batch_size, total)
            if on_progress is not None:
                on_progress(done / total, f"{done}/{total} images captioned")
            if should_stop is not None and should_stop() and done < total:
                return {"settings": settings, "done": False, "stopped": True, "images": done}

    rows = _read_partial(partial)
    kept = [row for row in rows if "skipped" not in row]
    if not kept:
        raise InvalidInput(f"No image of {data} could be read, so nothing was captioned.")
    write_jsonl(final, kept)
    info = {"settings": settings, "done": True, "captioner": captioner, "images": len(kept),
            "skipped": len(rows) - len(kept), "skipped_files": [r["file_name"] for r in rows if "skipped" in r][:20],
            "empty_captions": sum(not r["long_caption"] for r in kept),
            "seconds": round(time.time() - started, 2)}
    write_json(info_path, info)
    partial.unlink()
    return info


def _read_partial(path: Path) -> list[dict]:
    """The complete rows of a partial file; a torn last line (killed mid-write) is cut off."""
    if not path.exists():
        return []
    rows, good = [], 0
    text = path.read_text()
    for line in text.splitlines(keepends=True):
        try:
            if not line.endswith("\n"):
                raise ValueError("torn")
            rows.append(json.loads(line))
        except ValueError:
            break
        good += len(line.encode())
    if good != len(text.encode()):
        with path.open("r+b") as handle:
            handle.truncate(good)
    return rows


def _open_image(path: Path):
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB"), None
    except (OSError, ValueError) as error:
        return None, str(error).splitlines()[0][:200] or type(error).__name__


def _caption_many(model, images: list, mode: str, batch_size: int) -> list[str]:
    if not images:
        return []
    if hasattr(model, "caption_many"):  # BLIP, BLIP-2: batched through the network
        return model.caption_many(images, mode, batch_size=batch_size)
    return [model.caption(image, mode) for image in images]


def _place_image(source: Path, out: Path, file_name: str, index: int) -> str:
    """Put the image in the recaptioned folder under its own relative name (a hard link where the file
    system allows, else a copy); absolute or escaping names get images/<index><suffix>."""
    name = Path(file_name)
    if name.is_absolute() or ".." in name.parts:
        name = Path("images") / f"{index:06d}{name.suffix}"
    target = out / name
    if target.exists() and target.samefile(source):
        return name.as_posix()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)
    return name.as_posix()


# --- 3-4. fine-tuning ------------------------------------------------------------------------------


def recap_training_rows(rows: list[dict], folder: Path, kind: str) -> list[dict]:
    """Trainer rows for one fine-tune: kind "alt" (the alt text), "mix", "short" or "long".

    Every image gives two rows, so both fine-tunes draw the same images in the same
    order (the trainer's order depends on the seed and the row count alone). In the mix the two rows
    are the image's short and long caption: each time an image is drawn, one of the two with p = 0.5
    (the paper's mix), in exact halves over every epoch.
    """
    texts = {"alt": ("alt_text", "alt_text"), "mix": ("short_caption", "long_caption"),
             "short": ("short_caption", "short_caption"), "long": ("long_caption", "long_caption")}[kind]
    folder = Path(folder).resolve()
    return [{"file_name": str(folder / row["file_name"]), "text": row[key]} for row in rows for key in texts]


def fine_tune(config: RecapConfig, rows: list[dict], folder: Path, stage: str, stages: Stages, should_stop,
              log) -> Path:
    """One fine-tune through the shared engine; returns the adapter folder (LoRA) or the pipeline (full)."""
    from pipelines.trainer import TrainConfig, train

    adapter = folder / "adapter"
    result = adapter / "pipeline" if not config.lora else adapter
    if (adapter / "done").exists():
        return result
    write_jsonl(folder / "train" / "metadata.jsonl", rows)
    train_config = TrainConfig(model=config.model, data=[str(folder / "train")], out=str(adapter), lora=config.lora,
                               rank=config.rank, alpha=config.alpha, target_modules=tuple(config.target_modules),
                               train_text_encoder=config.train_text_encoder, train_unet=config.train_unet,
                               steps=config.steps, batch_size=config.batch_size, lr=config.lr,
                               prompt_dropout=config.prompt_dropout, seed=config.seed)
    outcome = train(train_config, on_progress=lambda f, m: stages(stage, f, m), should_stop=should_stop)
    if outcome.get("stopped"):
        raise JobCancelled(f"{stage} was stopped; run again to continue from its checkpoint")
    (adapter / "done").write_text(json.dumps({"seconds": outcome["seconds"], "loss": outcome["loss"]}))
    log(f"{stage}: {outcome['steps']} steps, loss {outcome['loss']:.4f}, {outcome['seconds']:.0f} s")
    return result


# --- 5. evaluation ---------------------------------------------------------------------------------


def evaluate(config: RecapConfig, model: Path | None, out: Path, stage: str, stages: Stages, should_stop,
             log) -> dict:
    """The GenEval-style benchmark of the base model (model None), a LoRA folder or a full pipeline."""
    from workbench.registry import resolve

    scores_file = out / "scores.json"
    if scores_file.exists():
        return json.loads(scores_file.read_text())
    out.mkdir(parents=True, exist_ok=True)
    entry = resolve(config.model)
    base = BenchmarkConfig(model=config.model, prompts=config.eval_prompts, detector=config.detector)
    is_lora = model is not None and lora_weights_file(str(model)) is not None
    bench = BenchmarkConfig(model=str(model) if model is not None and not is_lora else config.model,
                            loras=[LoraSpec(str(model), 1.0)] if is_lora else [], prompts=config.eval_prompts,
                            seeds=config.eval_seeds, detector=detector_name(base),
                            # A full fine-tune is a local folder with other defaults: sample all alike.
                            steps=config.sample_steps or entry.default_steps,
                            guidance=entry.default_guidance if config.guidance is None else config.guidance)
    summary = run_benchmark(bench, out, on_progress=lambda f, m: stages(stage, f, m), should_stop=should_stop)
    log(f"{stage.removeprefix('eval ')}:\n" + format_scores(summary))
    return summary


# --- bookkeeping ------------------------------------------------------------------------------------


def write_summary(out_dir: Path, config: RecapConfig, scores: dict, adapters: dict) -> dict:
    """summary.json: the per-tag table of every evaluated model, RECAP minus alt text, caption stats."""
    out_dir = Path(out_dir)
    summary: dict = {"adapters": {k: str(v) for k, v in adapters.items()}, "eval_seeds": config.eval_seeds,
                     "variants": {}, "tags": []}
    for variant, result in scores.items():
        summary["variants"][variant] = {"overall": result["overall"],
                                        "per_tag": {t: s["accuracy"] for t, s in result["per_tag"].items()},
                                        "seconds": result.get("config", {}).get("seconds")}
        summary["tags"] = list(result["per_tag"])
    if "recap" in summary["variants"] and "alt_text" in summary["variants"]:
        recap, alt = summary["variants"]["recap"], summary["variants"]["alt_text"]
        summary["recap_minus_alt_text"] = {
            "overall": recap["overall"] - alt["overall"],
            "per_tag": {t: recap["per_tag"][t] - alt["per_tag"][t] for t in summary["tags"]}}
    summary["captions"] = caption_stats(out_dir, config)
    for variant, folder in (("alt_text", "alt-text"), ("recap", "recap")):
        done = out_dir / folder / "adapter" / "done"
        if done.exists():
            summary.setdefault("training", {})[variant] = json.loads(done.read_text() or "{}")
    write_json(out_dir / "summary.json", summary)
    return summary


def caption_stats(out_dir: Path, config: RecapConfig) -> dict:
    """How good each caption is where the truth is known (shapes data made here), and ShapesBench overlap."""
    rows = read_jsonl(Path(out_dir) / "recaptioned" / "metadata.jsonl")
    stats: dict = {"images": len(rows),
                   "eval_prompt_overlap": {key: bench_overlap([r[key] for r in rows], config.eval_prompts)
                                           for key in ("alt_text", "short_caption", "long_caption")}}
    scenes_file = Path(out_dir) / "data" / "scenes.jsonl"
    if config.data is None and scenes_file.exists():
        from workbench.shapes.captions import long_caption
        from workbench.shapes.scene import Scene

        scenes = read_jsonl(scenes_file)
        # Alt text is written in the clause form; long captions in the recaptioner's own form.
        truth = {"alt_text": {s["file_name"]: s["caption"] for s in scenes},
                 "long_caption": {s["file_name"]: long_caption(Scene.from_dict(s["scene"]), config.inline_pairs)
                                  for s in scenes}}
        stats["exact_share"] = {key: float(np.mean([r[key] == truth[key][r["file_name"]] for r in rows]))
                                for key in ("alt_text", "long_caption")}
    return stats


def format_table(summary: dict) -> str:
    """The per-tag table (percent) of base, alt-text and RECAP, and RECAP minus alt text."""
    variants = [v for v in VARIANTS if v in summary["variants"]]
    delta = summary.get("recap_minus_alt_text")
    head = f"{'tag':<14}" + "".join(f"{VARIANTS[v]:>10}" for v in variants) + (f"{'RECAP-alt':>11}" if delta else "")
    lines = [head]
    for tag in summary["tags"] + ["overall"]:
        values = [summary["variants"][v]["per_tag"][tag] if tag != "overall" else summary["variants"][v]["overall"]
                  for v in variants]
        line = f"{tag:<14}" + "".join(f"{100 * x:>10.1f}" for x in values)
        if delta:
            d = delta["overall"] if tag == "overall" else delta["per_tag"][tag]
            line += f"{100 * d:>+11.1f}"
        lines.append(line)
    return "\n".join(lines)


def load_config(out_dir: Path) -> RecapConfig:
    path = Path(out_dir) / "config.json"
    if not path.exists() or json.loads(path.read_text()).get("kind") != "recap":
        raise InvalidInput(f"{out_dir} is not a RECAP run (no config.json of kind recap).")
    return RecapConfig.from_dict(json.loads(path.read_text()))




# --- command line -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    d = RecapConfig()
    parser = argparse.ArgumentParser(prog="python -m pipelines.recap",
                                     description=__doc__.split("\n\n")[0].replace("\n", " "))
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="the whole comparison: data, recaption, two fine-tunes, evaluation")
    run.add_argument("--out", type=Path, required=True, help="run folder (the same command continues it)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out with its saved settings")
    run.add_argument("--model", default=d.model)
    run.add_argument("--data", default=None, help="imagefolder with alt text (default: render shapes-world data)")
    run.add_argument("--images", type=int, default=d.images, help="shapes-world images to render")
    run.add_argument("--data-seed", type=int, default=d.data_seed)
    run.add_argument("--single-share", type=float, default=None,
                     help="share of single-object scenes to render (default: the shapes model's pre-training mix)")
    run.add_argument("--text-field", default=d.text_field, help="metadata field holding the alt text")
    run.add_argument("--captioner", default=None, help="shapes, blip or blip2 (default: the data's world)")
    run.add_argument("--skip-unreadable", action="store_true", help="drop unreadable images instead of stopping")
    run.add_argument("--captions", choices=CAPTION_MIXES, default=d.captions,
                     help="RECAP captions to train on: the short/long mix (paper), or one kind only")
    kind = run.add_mutually_exclusive_group()
    kind.add_argument("--lora", action="store_true", default=True, help="train LoRA adapters (default)")
    kind.add_argument("--full", action="store_true", help="fine-tune the whole UNet instead of a LoRA")
    run.add_argument("--inline-pairs", action=argparse.BooleanOptionalAction, default=d.inline_pairs,
                     help="shapes captioner: say a related pair in one phrase ('a circle to the left of a "
                          "square') instead of a clause after the list (default on)")
    run.add_argument("--rank", type=int, default=d.rank)
    add_target_modules_argument(run, d.target_modules)
    run.add_argument("--train-text-encoder", action="store_true", help="a LoRA on the text encoder too")
    run.add_argument("--no-train-unet", dest="train_unet", action="store_false",
                     help="with --train-text-encoder: LoRAs on the text encoder only; the UNet stays the base model's")
    run.add_argument("--steps", type=int, default=d.steps, help="training steps of each fine-tune")
    run.add_argument("--batch-size", type=int, default=d.batch_size)
    run.add_argument("--lr", type=float, default=d.lr)
    run.add_argument("--prompt-dropout", type=float, default=d.prompt_dropout)
    run.add_argument("--seed", type=int, default=d.seed)
    run.add_argument("--detector", default=None)
    run.add_argument("--eval-prompts", default=d.eval_prompts)
    run.add_argument("--eval-seeds", type=int, default=d.eval_seeds, help="seeds per prompt (0: no evaluation)")

    rec = commands.add_parser("recaption", help="add short and long captions to an imagefolder (new folder)")
    rec.add_argument("--data", type=Path, required=True, help="imagefolder with metadata.jsonl")
    rec.add_argument("--out", type=Path, required=True, help="new imagefolder (the same command continues it)")
    rec.add_argument("--captioner", default=None, help="shapes, blip or blip2 (default: shapes for a folder "
                                                         "make-shapes-data rendered, else blip)")
    rec.add_argument("--text-field", default="text", help="metadata field holding the alt text")
    rec.add_argument("--batch-size", type=int, default=16)
    rec.add_argument("--skip-unreadable", action="store_true")
    rec.add_argument("--inline-pairs", action=argparse.BooleanOptionalAction, default=d.inline_pairs,
                     help="shapes captioner: say a related pair in one phrase (default on)")

    make = commands.add_parser("make-shapes-data", help="render shapes scenes with noisy alt text (an imagefolder)")
    make.add_argument("--n", type=int, default=d.images)
    make.add_argument("--out", type=Path, required=True)
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--size", type=int, default=IMAGE_SIZE, help="image side in pixels (the shapes model: 64)")
    make.add_argument("--single-share", type=float, default=None,
                      help="share of single-object scenes (default: the shapes model's pre-training mix)")
    parser.run_command = run  # main checks a resumed run's flags against this sub-command's defaults
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    say = lambda message: print(message, flush=True)  # noqa: E731
    try:
        if args.command == "make-shapes-data":
            info = make_shapes_dataset(args.out, args.n, seed=args.seed, size=args.size,
                                       single_share=args.single_share)
            overlap = info["shapesbench_overlap"]
            say(f"{info['images']} images in {args.out}; alt text exact for {info['alt_text_exact']:.1%}; "
                f"equal to a ShapesBench prompt: alt text {overlap['alt_text']:.1%}, exact caption "
                f"{overlap['exact_caption']:.1%}")
        elif args.command == "recaption":
            captioner = args.captioner or ("shapes" if is_rendered_shapes_data(args.data) else "blip")
            if not args.captioner:
                say(f"captioner: {captioner} (pass --captioner to choose another)")
            options = RecapConfig(captioner=captioner, inline_pairs=args.inline_pairs).captioner_options()
            info = recaption(args.data, args.out, captioner=captioner, text_field=args.text_field,
                             batch_size=args.batch_size, skip_unreadable=args.skip_unreadable,
                             captioner_options=options)
            say(f"{info['images']} images captioned into {args.out} ({info['skipped']} unreadable skipped, "
                f"{info.get('empty_captions', 0)} with an empty caption: the captioner saw nothing; "
                f"{info['seconds']} s)")
        else:
            if args.resume:
                refuse_settings_with_resume(parser.run_command, args)
                config = load_config(args.out)
            else:
                config = RecapConfig(model=args.model, data=args.data, images=args.images, data_seed=args.data_seed,
                                     single_share=args.single_share,
                                     text_field=args.text_field, captioner=args.captioner,
                                     skip_unreadable=args.skip_unreadable, captions=args.captions,
                                     inline_pairs=args.inline_pairs, lora=not args.full,
                                     rank=args.rank, alpha=float(args.rank),
                                     target_modules=list(parse_target_modules(args.target_modules)),
                                     train_text_encoder=args.train_text_encoder, train_unet=args.train_unet,
                                     steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                     prompt_dropout=args.prompt_dropout, seed=args.seed, detector=args.detector,
                                     eval_prompts=args.eval_prompts, eval_seeds=args.eval_seeds)
            result = run_recap(config, args.out, on_progress=ConsoleProgress(), log=say)
            say(f"done in {result['seconds']} s: adapters {result['adapters']['alt_text']} (alt text), "
                f"{result['adapters']['recap']} (RECAP)")
            if result["summary"]["variants"]:
                say(format_table(result["summary"]))
    except WorkbenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"stopped: what was finished is kept in {args.out}; run the same command again to continue"
              + (f" (or `python -m pipelines.recap run --resume --out {args.out}`)" if args.command == "run" else ""),
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
