"""Run a GenEval-format prompt set through a model and score every image with a detector.

Writes, under the output folder, GenEval's layout (`images/<prompt index>/<seed>.png`), a per-image
verdict table (`verdicts.jsonl` and `verdicts.csv`) and `scores.json` (per tag and overall).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .config import ASSETS_DIR
from .errors import InvalidInput, ModelNotAvailable
from .evaluation import load_prompt_file, score_detections, summarize
from .generation import GenerationRequest, LoraSpec, generate_many, save_png
from .registry import check_model, resolve
from .store import check_output_folder, write_json

SHAPESBENCH = ASSETS_DIR / "prompts" / "shapesbench.jsonl"


def _backend_detector(name: str) -> Callable[[], object]:
    """A factory for a perception backend (workbench.perception.backends), settings from the environment."""

    def build():
        from .perception.backends import get_detector

        try:
            return get_detector(name)
        except ModelNotAvailable as error:
            raise ModelNotAvailable(f"{error}\n(To score shapes-world prompts without it, pass --detector shapes.)") from None

    return build


# Detector backends by name, as the perception backends table names them.
DETECTORS: dict[str, Callable[[], object]] = {name: _backend_detector(name)
                                              for name in ("shapes", "groundingdino", "groundingdino+clip")}


@dataclass
class BenchmarkConfig:
    model: str = "shapes"
    loras: list[LoraSpec] = field(default_factory=list)
    prompts: str = str(SHAPESBENCH)
    seeds: int = 4
    # Seeds first_seed .. first_seed + seeds - 1. Every run's own evaluation uses 0..3; a later start
    # gives images no setting was ever chosen on (a held-out check of a claimed gain).
    first_seed: int = 0
    steps: int | None = None
    guidance: float | None = None
    batch_size: int = 16
    detector: str | None = None  # None: the model's own world (shapes model -> shapes detector)

    def to_dict(self) -> dict:
        """JSON form, for job parameters and scores.json."""
        return {**self.__dict__, "loras": [lora.__dict__ for lora in self.loras]}

    def check_seeds(self) -> None:
        if not 1 <= self.seeds <= 16:
            raise InvalidInput(f"Seeds per prompt must be between 1 and 16 (got {self.seeds}).")
        if not 0 <= self.first_seed < 2**32 - self.seeds:
            raise InvalidInput(f"The first seed must be between 0 and {2**32 - self.seeds - 1} "
                               f"(got {self.first_seed}).")

    @classmethod
    def from_dict(cls, data: dict) -> "BenchmarkConfig":
        return cls(**{**data, "loras": [LoraSpec(**lora) for lora in data.get("loras", [])]})


def _asks_for_colour(prompts: str) -> bool:
    return any("color" in clause for record in load_prompt_file(prompts) for clause in record.get("include", []))


def detector_name(config: BenchmarkConfig) -> str:
    """The detector backend that scores this model's images: the model's own world by default.

    The shapes model gets the exact shapes detector. Other models get GroundingDINO, with GenEval's CLIP
    colour classifier on each box ("groundingdino+clip") when the prompt set asks for any colour, since
    GroundingDINO alone reports none; without colour clauses the CLIP weights are not needed.
    """
    if config.detector:
        name = config.detector
    elif resolve(config.model).world == "shapes":
        name = "shapes"
    else:
        name = "groundingdino+clip" if _asks_for_colour(config.prompts) else "groundingdino"
    if name not in DETECTORS:
        raise ModelNotAvailable(
            f"No '{name}' detector backend is installed in this workbench yet, so images of "
            f"'{config.model}' cannot be scored. Available: {', '.join(DETECTORS)} "
            f"(pass --detector shapes to score shapes-world prompts).")
    return name


def pick_detector(config: BenchmarkConfig):
    return DETECTORS[detector_name(config)]()


def check_detector(config: BenchmarkConfig) -> None:
    """Raise what pick_detector would (unknown backend, missing weights) without loading a model,
    so the UI can answer at once instead of after a large detector is read."""
    from .perception.backends import CHECKS

    name = detector_name(config)
    if name in CHECKS:
        try:
            CHECKS[name]()
        except ModelNotAvailable as error:
            raise ModelNotAvailable(f"{error}\n(To score shapes-world prompts without it, pass --detector shapes.)") from None


def check_run_settings(model: str, eval_prompts: str, eval_seeds: int, detector: str | None = None,
                       detects: bool = False) -> None:
    """What every method's run checks before it writes anything: a model it can name (not loaded);
    when it evaluates, a readable prompt file and a seed count the benchmark takes (0: no evaluation);
    when it evaluates or otherwise `detects`, a detector that exists and whose weights are on disk."""
    from .perception.backends import check_all

    resolve(model)
    if not 0 <= eval_seeds <= 16:
        raise InvalidInput(f"Evaluation seeds must be between 0 and 16 (got {eval_seeds}).")
    if eval_seeds:
        load_prompt_file(eval_prompts)
    # What is missing, all of it in one message: the model's weights and the detector's.
    needed = [lambda: check_model(model)]
    if eval_seeds or detects:
        needed.append(lambda: check_detector(BenchmarkConfig(model=model, prompts=eval_prompts, detector=detector)))
    check_all(needed)


def run_benchmark(config: BenchmarkConfig, out_dir: Path,
                  on_progress: Callable[[float, str], None] | None = None,
                  should_stop: Callable[[], bool] | None = None) -> dict:
    records = load_prompt_file(config.prompts)
    config.check_seeds()
    out_dir = check_output_folder(out_dir)
    seeds = list(range(config.first_seed, config.first_seed + config.seeds))
    from .perception.backends import check_all

    check_all([lambda: check_model(config.model), lambda: check_detector(config)])  # all that is missing, at once
    detector = pick_detector(config)
    requests = [GenerationRequest(record["prompt"], model=config.model, seeds=seeds,
                                  steps=config.steps, guidance=config.guidance, batch_size=config.batch_size,
                                  loras=config.loras) for record in records]
    started = time.time()
    results = generate_many(requests, on_progress=on_progress, should_stop=should_stop)

    rows = []
    for index, record in enumerate(records):
        folder = out_dir / "images" / f"{index:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metadata.jsonl").write_text(json.dumps(record) + "\n")
        for result in results[index * config.seeds:(index + 1) * config.seeds]:
            path = save_png(result.image, result.metadata, folder, name=f"{result.seed:04d}.png")
            verdict = score_detections(record, detector.detect(result.image))
            rows.append({"index": index, "tag": record["tag"], "prompt": record["prompt"], "seed": result.seed,
                         "path": str(path.relative_to(out_dir)), "correct": verdict.correct,
                         "reasons": "; ".join(verdict.reasons), **{f"ok_{key}": value for key, value in
                                                                     verdict.requirements.items()}})
    summary = summarize(rows)
    summary["config"] = {**config.to_dict(), "seconds": round(time.time() - started, 1)}
    _write_outputs(out_dir, rows, summary)
    from .history import record_evaluation

    record_evaluation(config, summary, out_dir)  # the Results tab's history (never fails the run)
    return summary


def _write_outputs(out_dir: Path, rows: list[dict], summary: dict) -> None:
    import pandas as pd

    with open(out_dir / "verdicts.jsonl", "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    pd.DataFrame(rows).to_csv(out_dir / "verdicts.csv", index=False)
    write_json(out_dir / "scores.json", summary)  # last and atomic: runs take its presence as "evaluated"


def format_scores(summary: dict) -> str:
    lines = [f"{'tag':<14} {'correct':>9} {'accuracy':>9}"]
    for tag, stats in summary["per_tag"].items():
        lines.append(f"{tag:<14} {stats['correct']:>4}/{stats['total']:<4} {stats['accuracy']:>9.1%}")
    lines.append(f"{'overall':<14} {'':>9} {summary['overall']:>9.1%}   ({summary['images']} images, "
                 f"{summary['config']['seconds']} s)")
    return "\n".join(lines)
