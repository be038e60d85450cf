"""Compare a base model with aligned variants: same prompts, same seeds, every image scored.

A variant is a label and the LoRA adapters (with weights) applied to the comparison's model, or to a
full fine-tune of it (a pipeline folder the trainer exported); the base model is the variant with
neither. Every variant draws every (prompt, seed) with the same CPU generator seeds and the comparison
model's steps and guidance, so the columns differ only by what the adapters or weights change, and an
adapter at weight 0 draws the base model's images. Seeds start at 0 (the seeds of every run's own
evaluation) or at `first_seed` (4 and on: images no run's evaluation drew). Each image gets GenEval's
verdict from the benchmark's detector. The run folder holds `compare.json` (settings, per-variant
per-tag scores, one row per image) and `images/<variant>/<prompt index>-<seed>.png` (with their
generation metadata embedded).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .benchmark import SHAPESBENCH, BenchmarkConfig, pick_detector
from .errors import InvalidInput
from .evaluation import Verdict, load_prompt_file, score_detections, summarize, validate_metadata
from .generation import GenerationRequest, LoraSpec, generate_many, save_png
from .history import adapters_label, record, with_seeds
from .registry import check_model, resolve
from .store import write_json

MAX_VARIANTS = 8
MAX_PROMPTS = 300
MAX_SEEDS = 16
RESULT_FILE = "compare.json"


@dataclass
class Variant:
    label: str
    loras: list[LoraSpec] = field(default_factory=list)
    model: str | None = None  # a full fine-tune's pipeline folder, drawn instead of the comparison's model

    @classmethod
    def of(cls, loras: list[LoraSpec], label: str | None = None, model: str | None = None) -> "Variant":
        """A variant named after its model and adapters unless a label is given ('base' when there are none)."""
        if label is None:
            names = ([short_model_name(model)] if model else []) + (
                [adapters_label([lora.__dict__ for lora in loras])] if loras else [])
            label = " + ".join(names) or "base"
        return cls(label, list(loras), model)

    def to_dict(self) -> dict:
        return {"label": self.label, "loras": [lora.__dict__ for lora in self.loras], "model": self.model}

    @classmethod
    def from_dict(cls, data: dict) -> "Variant":
        return cls(data["label"], [LoraSpec(**lora) for lora in data.get("loras", [])], data.get("model"))


def short_model_name(folder: str) -> str:
    """'<run>/recap (full)' for <run>/recap/adapter/pipeline: the folder names that say which fine-tune."""
    parts = [part for part in Path(folder).parts if part not in ("pipeline", "adapter", "")]
    return "/".join(parts[-2:]) + " (full)"


@dataclass
class CompareConfig:
    model: str = "shapes"
    variants: list[Variant] = field(default_factory=lambda: [Variant("base")])
    prompts: list[dict] = field(default_factory=list)  # GenEval metadata records
    prompt_set: str = "custom"  # what the prompts are, for the history ("shapesbench.jsonl:counting")
    seeds: int = 2  # seeds first_seed .. first_seed + seeds - 1 for every prompt and variant
    first_seed: int = 0  # 4 and on: images that no run's own evaluation (seeds 0..3) drew
    steps: int | None = None
    guidance: float | None = None
    batch_size: int = 16
    detector: str | None = None  # None: the model's own world, as in the benchmark

    def to_dict(self) -> dict:
        return {**self.__dict__, "variants": [variant.to_dict() for variant in self.variants]}

    @classmethod
    def from_dict(cls, data: dict) -> "CompareConfig":
        return cls(**{**data, "variants": [Variant.from_dict(v) for v in data.get("variants", [])]})

    def benchmark(self) -> BenchmarkConfig:
        """The benchmark settings whose detector scores this comparison."""
        return BenchmarkConfig(model=self.model, seeds=self.seeds, steps=self.steps, guidance=self.guidance,
                               batch_size=self.batch_size, detector=self.detector)

    def validate(self) -> None:
        if not self.variants:
            raise InvalidInput("Nothing to compare: give at least one variant (the base model counts).")
        if len(self.variants) > MAX_VARIANTS:
            raise InvalidInput(f"At most {MAX_VARIANTS} variants can be compared at once (got {len(self.variants)}).")
        labels = [variant.label for variant in self.variants]
        if len(set(labels)) != len(labels):
            raise InvalidInput(f"Two variants have the same name ({', '.join(labels)}); give each its own adapters "
                               f"or weight.")
        if not self.prompts:
            raise InvalidInput("No prompts to compare on: type some, pick a ShapesBench tag or upload a file.")
        if len(self.prompts) > MAX_PROMPTS:
            raise InvalidInput(f"At most {MAX_PROMPTS} prompts per comparison (got {len(self.prompts)}).")
        for number, record_ in enumerate(self.prompts, start=1):
            validate_metadata(record_, f"prompt {number}")
        if not 1 <= int(self.seeds) <= MAX_SEEDS:
            raise InvalidInput(f"Seeds per prompt must be between 1 and {MAX_SEEDS} (got {self.seeds}).")
        if not 0 <= int(self.first_seed) < 2**32 - int(self.seeds):
            raise InvalidInput(f"The first seed must be a whole number from 0 to {2**32 - int(self.seeds) - 1} "
                               f"(got {self.first_seed}).")
        for variant in self.variants:  # adapters, steps, model: the generation service's own checks
            GenerationRequest(self.prompts[0]["prompt"], model=variant.model or self.model, seeds=[0],
                              steps=self.steps, guidance=self.guidance, batch_size=self.batch_size,
                              loras=variant.loras).validate()
            if variant.model is not None:
                check_model(variant.model)

    def sampling(self) -> tuple[int, float]:
        """(steps, guidance) for every variant: the comparison model's own unless set, so that a full
        fine-tune exported as a plain folder still samples like the model it is compared with."""
        entry = resolve(self.model)
        return (self.steps or entry.default_steps,
                entry.default_guidance if self.guidance is None else self.guidance)


# --- where prompts come from ------------------------------------------------------------------------


def prompts_from_text(text: str) -> list[dict]:
    """One prompt a line, read into GenEval metadata by the prompt parser (tag inferred)."""
    from .prompt_parser import infer_tag, parse_prompt

    records = []
    for number, line in enumerate((text or "").splitlines(), start=1):
        if not line.strip():
            continue
        spec = parse_prompt(line.strip())
        if not spec["include"]:
            raise InvalidInput(f"line {number} ({line.strip()!r}) names no object the detector knows, so its "
                               f"images could not be scored; name shapes or COCO objects.")
        records.append({"tag": infer_tag(spec), "prompt": line.strip(), **spec})
    return records


def prompt_tags(path: Path | str = SHAPESBENCH) -> list[str]:
    return list(dict.fromkeys(record_["tag"] for record_ in load_prompt_file(path)))


def prompts_from_tag(tag: str, count: int, path: Path | str = SHAPESBENCH) -> list[dict]:
    """The first `count` prompts of a tag of a prompt file (of every tag when tag is 'all')."""
    if not count or int(count) < 1:
        raise InvalidInput("Prompts per tag must be at least 1.")
    records = load_prompt_file(path)
    tags = prompt_tags(path) if tag == "all" else [tag]
    chosen = [r for t in tags for r in [r for r in records if r["tag"] == t][:int(count)]]
    if not chosen:
        raise InvalidInput(f"{Path(path).name} has no prompts tagged {tag!r}.")
    return chosen


# --- verdicts -------------------------------------------------------------------------------------------


def mark(correct: bool, requirements: dict) -> str:
    """'✓', or '✗' and the requirements the image fails ('✗ counts, position')."""
    if correct:
        return "✓"
    failed = [name for name, held in requirements.items() if held is False]
    return "✗ " + ", ".join(failed) if failed else "✗"


def verdict_mark(verdict: Verdict) -> str:
    return mark(verdict.correct, verdict.requirements)


# --- the comparison ---------------------------------------------------------------------------------------


def run_compare(config: CompareConfig, out_dir: Path, on_progress: Callable[[float, str], None] | None = None,
                should_stop: Callable[[], bool] | None = None) -> dict:
    """Generate and score every variant; write and return the comparison (compare.json's content)."""
    config.validate()
    detector = pick_detector(config.benchmark())
    out_dir = Path(out_dir)
    seeds = list(range(int(config.first_seed), int(config.first_seed) + int(config.seeds)))
    steps, guidance = config.sampling()
    started = time.time()
    variants, rows = [], []
    n = len(config.variants)
    for v, variant in enumerate(config.variants):
        def progress(fraction, stage, v=v, label=variant.label):
            if on_progress is not None:
                on_progress((v + 0.9 * fraction) / n, f"{label}: {stage}")

        requests = [GenerationRequest(r["prompt"], model=variant.model or config.model, seeds=seeds, steps=steps,
                                      guidance=guidance, batch_size=config.batch_size, loras=variant.loras)
                    for r in config.prompts]
        results = generate_many(requests, on_progress=progress, should_stop=should_stop)
        progress(1.0, "scoring")
        variant_rows = []
        for i, result in enumerate(results):
            index = i // len(seeds)
            prompt = config.prompts[index]
            path = save_png(result.image, result.metadata, out_dir / "images" / f"{v:02d}",
                            name=f"{index:05d}-{result.seed:04d}.png")
            verdict = score_detections(prompt, detector.detect(result.image))
            variant_rows.append({"variant": v, "label": variant.label, "index": index, "tag": prompt["tag"],
                                 "prompt": prompt["prompt"], "seed": result.seed,
                                 "path": str(path.relative_to(out_dir)), "correct": verdict.correct,
                                 "mark": verdict_mark(verdict), "reasons": verdict.reasons,
                                 "requirements": verdict.requirements})
        summary = summarize(variant_rows)
        variants.append({**variant.to_dict(), "per_tag": summary["per_tag"], "overall": summary["overall"],
                         "images": summary["images"]})
        rows += variant_rows

    result = {"kind": "compare", "created": time.time(), "seconds": round(time.time() - started, 1),
              "config": config.to_dict(), "variants": variants, "rows": rows}
    write_json(out_dir / RESULT_FILE, result)  # atomic: the Compare tab and reports read it
    prompt_set = with_seeds(config.prompt_set, seeds[0], len(seeds))
    for variant in variants:
        record(model=variant["model"] or config.model, adapters=variant["loras"], prompt_set=prompt_set,
               seeds=len(seeds), per_tag=variant["per_tag"], overall=variant["overall"], images=variant["images"],
               source="compare", source_id=out_dir.name, folder=out_dir.resolve(), label=variant["label"])
    return result


def load_result(folder: Path) -> dict:
    path = Path(folder) / RESULT_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InvalidInput(f"{folder} holds no comparison ({RESULT_FILE} is missing).") from None


def accuracy_table(variants: list[dict]) -> pd.DataFrame:
    """Accuracy (%) with one row per tag (then 'overall') and one column per variant."""
    tags = list(dict.fromkeys(tag for variant in variants for tag in variant["per_tag"]))
    rows = [[tag] + [_percent(variant["per_tag"].get(tag)) for variant in variants] for tag in tags]
    rows.append(["overall"] + [_percent(variant.get("overall")) for variant in variants])
    return pd.DataFrame(rows, columns=["tag"] + [variant["label"] for variant in variants])


def difference_table(variants: list[dict], rows: list[dict]) -> pd.DataFrame:
    """Each later variant minus the first, in points, with its 95% CI and paired p-value, one row per tag
    then 'overall' (`workbench.significance`); empty with fewer than two variants or images that differ."""
    from .significance import against_first

    if len(variants) < 2:
        return pd.DataFrame(columns=["tag"])
    try:
        results = against_first(variants, rows)
    except InvalidInput:  # variants of different prompts or seeds (an unfinished run): nothing to pair
        return pd.DataFrame(columns=["tag"])
    tags = [d.tag for d in results[0][1]]
    columns = {f"{label} − {variants[0]['label']}": [
        f"{d.summary_text()} p={d.p_value:.3g}" for d in diffs]
        for label, diffs in results}
    return pd.DataFrame({"tag": tags, **columns})


def _percent(stats) -> float | None:
    if stats is None:
        return None
    value = stats["accuracy"] if isinstance(stats, dict) else stats
    return round(100 * float(value), 1)


def format_table(variants: list[dict]) -> str:
    return accuracy_table(variants).to_string(index=False)


def run_compare_job(params: dict, ctx) -> dict:
    """The 'compare' job kind: a comparison in the job's run folder."""
    config = CompareConfig.from_dict(params)
    ctx.log(f"comparing {', '.join(v.label for v in config.variants)} of {config.model} on "
            f"{len(config.prompts)} prompt(s) x {config.seeds} seed(s)")
    result = run_compare(config, ctx.run_dir, on_progress=lambda fraction, stage: ctx.progress(fraction, stage),
                         should_stop=lambda: ctx.cancelled)
    ctx.log("accuracy (%):\n" + format_table(result["variants"]))
    return {"folder": str(ctx.run_dir), "compare": str(ctx.run_dir / RESULT_FILE),
            "overall": {variant["label"]: variant["overall"] for variant in result["variants"]}}
