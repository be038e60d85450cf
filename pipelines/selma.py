"""SELMA (Li, Cho, Sung, Yoon and Bansal, "SELMA: Learning and Merging Skill-Specific Text-to-Image
Experts with Auto-Generated Data", arXiv 2403.06952).

    python -m pipelines.selma --model shapes --out DIR          # --resume continues DIR

The method (Sec. 3 of the paper), read top to bottom in `run_selma`:

1. prompts: for each skill, an LLM writes prompts from three in-context examples drawn from the
   skill's seeds and the prompts kept so far, request after request; a prompt is kept only when its
   ROUGE-L against every kept prompt (seeds included) is at most 0.8 (`workbench.rouge`). Prompts
   equal to an evaluation prompt (ShapesBench in the shapes world) are dropped, as in IPR, and so
   are prompts longer than the model's text encoder reads;
2. images: the base model draws each prompt, or another model (`image_model`: the paper's
   weak-to-strong setting, images of a weaker model teaching a stronger one); optionally (not in the
   paper, `image_check`) the detector then checks each image: "verify" keeps only the images that
   show their prompt, "relabel" gives the others the prompt they do show, as IPR does;
3. experts: one LoRA per skill on that skill's pairs only, with the shared engine
   (`pipelines.trainer`); and, as the paper's comparison, one LoRA on every skill's pairs mixed;
4. merge: the experts with equal weights 1/n through diffusers' `set_adapters`, as the authors'
   inference does (`inference/img_gen_merge.py`), or one of peft's `add_weighted_adapter`
   combinations; `merged/` always holds a single fused adapter in diffusers' LoRA format;
5. evaluate: the base model, the mixed LoRA, the merged experts (and each expert alone, optional)
   on ShapesBench or any GenEval-format prompt file; `summary.json` holds the per-tag table.

Every stage writes its result under the run folder before the next starts and is skipped when that
result exists, so calling `run_selma` again continues a crashed or cancelled run (the trainer
resumes from its own checkpoints). Folder layout:

    config.json  summary.json
    prompts/<skill>.json        the skill, its kept prompts and the filter's statistics
    data/<skill>/images/  data/<skill>/metadata.jsonl    an imagefolder per skill
    data/<skill>/checked/metadata.jsonl  check.json      (image_check) what each expert trains on
    experts/<skill>/  mixed/    LoRA adapters (diffusers format) with train_config.json, log.jsonl
    merged/                     the fused merged adapter and merge.json
    eval-base/  eval-mixed/  eval-merged/  eval-expert-<skill>/

The fused merge is `pipelines/lora_merge.py` (shared with IPR); its docstring says why "cat" and
set_adapters agree.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from pipelines.lora_merge import COMBINATIONS, merge_experts
from pipelines.trainer import (UNET_TARGETS, UNTRAINED_UNET_NEEDS_TEXT_ENCODER, TrainConfig, add_target_modules_argument,
                               parse_target_modules, refuse_settings_with_resume, train)
from workbench.benchmark import SHAPESBENCH, BenchmarkConfig, check_run_settings, run_benchmark
from workbench.console import ConsoleProgress
from workbench.errors import InvalidInput, JobCancelled, ModelNotAvailable, WorkbenchError
from workbench.evaluation import THRESHOLD
from workbench.generation import GenerationRequest, LoraSpec, generate_many, lora_weights_file, save_png
from workbench.imagefolder import read_imagefolder
from workbench.rouge import DEFAULT_THRESHOLD, RougeFilter
from workbench.skills import Skill, resolve_skills, world_of
from workbench.store import bind_run_config, check_output_folder, write_json, write_jsonl

# Merging: "set_adapters" is the authors' (every expert active at weight w_i); the rest are peft's
# add_weighted_adapter combinations, baked into one adapter.
MERGES = ("set_adapters",) + COMBINATIONS
IMAGE_CHECKS = ("none", "verify", "relabel")  # see SelmaConfig.image_check and check_images
MAX_PROMPTS_PER_SKILL = 5000
IMAGE_CHUNK = 64  # prompts drawn per generation call (bounds memory; finer progress)
PATIENCE = 10  # LLM requests in a row that add no prompt before a skill's generation stops


@dataclass
class SelmaConfig:
    model: str = "shapes"  # the model whose experts are trained
    image_model: str | None = None  # draws the training images; None: `model` (weak-to-strong: a weaker one)
    llm: str | None = None  # workbench.llm backend; None: "shapes" for the shapes model, else "openai"
    llm_temperature: float = 1.0  # the authors sample at 1.0
    skills: list[str] | None = None  # skill names (workbench.skills); None: the world's built-in five
    # Shapes-world defaults, sized for a full run (5 experts, the mixed LoRA, 3 evaluations at 4 seeds)
    # of about 50 minutes on one CPU thread. The shapes world holds only ~80 counting and ~110
    # colour-binding prompts that pass the ROUGE-L filter once ShapesBench's are removed: those skills
    # stop short of prompts_per_skill (their stats say so).
    prompts_per_skill: int = 150
    prompts_per_request: int = 20  # the authors ask for 20 prompts per request
    in_context_examples: int = 3  # the authors' num_prompt_instructions
    rouge_threshold: float = DEFAULT_THRESHOLD  # keep a prompt when its ROUGE-L to every kept one is <= this
    samples_per_prompt: int = 3
    sample_steps: int | None = None  # drawing the training images; None: the image model's default
    guidance: float | None = None
    # What the detector does with the images before training (a workbench addition; see IMAGE_CHECKS).
    # A model that misses most of its prompts otherwise teaches each expert its own mistakes: on the
    # shapes model the unchecked experts fell 3.2 points below the base. "verify" leaves too little of
    # a skill the model rarely gets right (3 of 450 spatial images on the shapes model); "relabel"
    # keeps every image that shows something asked for, under the prompt it shows.
    image_check: str = "none"
    # Fine-tuning (pipelines.trainer). The authors: rank 128, lr 3e-4, 5000 steps, batch 64 on SD v1.4;
    # the shapes defaults are IPR's (rank 8, lr 5e-4, batch 32), which suit the tiny shapes UNet.
    rank: int = 8
    alpha: float = 8.0
    # The UNet layers each LoRA adapts (pipelines.trainer.TARGET_PRESETS or module names).
    target_modules: list[str] = field(default_factory=lambda: list(UNET_TARGETS))
    # A LoRA on the text encoder too (our addition; IPR's position gain on the shapes model needed it).
    # Merging then combines the text-encoder adapters the same way as the UNet's.
    train_text_encoder: bool = False
    # False (with train_text_encoder): every expert and the mixed LoRA adapt the text encoder only; the
    # UNet stays the base model's (pipelines.trainer train_unet).
    train_unet: bool = True
    steps: int = 400  # per expert
    baseline: bool = True  # also train one LoRA on every skill's data mixed (the paper's comparison)
    # None: n_skills x steps, the optimizer steps of all experts together, so the mixed LoRA sees each
    # image about as often as its expert does (exactly, for skills of equal size): equal data, equal
    # compute, and only "one adapter on the mixture" vs "n adapters, merged" differs. (`steps` alone
    # would show each image n times less often and handicap the baseline.)
    baseline_steps: int | None = None
    batch_size: int = 32
    lr: float = 5e-4
    prompt_dropout: float = 0.1  # keeps the unconditional branch that guidance subtracts trained
    # Merging.
    merge: str = "set_adapters"  # see MERGES
    merge_weights: list[float] | None = None  # None: 1/n each, as the authors
    merge_density: float = 0.5  # share of entries ties / dare / magnitude_prune keep
    # Evaluation.
    eval_prompts: str = str(SHAPESBENCH)
    eval_seeds: int = 4  # 0: skip evaluation
    eval_experts: bool = False  # also score each expert alone
    detector: str | None = None  # None: the model's own world (shapes model -> shapes detector)
    seed: int = 0

    def validate(self) -> None:
        """Raise InvalidInput (one line) for settings that cannot be run as given."""
        from workbench.llm import LLMS, SHAPES_SKILLS
        from workbench.registry import resolve

        if self.skills is not None and not isinstance(self.skills, str):
            self.skills = list(self.skills)  # config.json compares lists, not tuples
        if self.merge_weights is not None:
            self.merge_weights = [float(w) for w in self.merge_weights]
        for name in (self.model, self.image_model):
            if name is not None and resolve(name).family != "sd":
                raise InvalidInput(f"SELMA fine-tunes with the shared engine, which trains SD-style models (one CLIP "
                                   f"text encoder); '{name}' is {resolve(name).family}.")
        if self.llm is not None and self.llm not in LLMS:
            raise InvalidInput(f"Unknown LLM backend '{self.llm}'. Available: {', '.join(LLMS)}.")
        skills = self.skill_list()
        if self.llm_name() == "shapes":
            foreign = [s.name for s in skills if s.name not in SHAPES_SKILLS]
            if foreign:
                raise InvalidInput(f"The shapes LLM writes prompts only for {', '.join(SHAPES_SKILLS)}; "
                                   f"{', '.join(foreign)} needs an \"openai\" or \"transformers\" LLM (--llm).")
        checks = [
            (1 <= self.prompts_per_skill <= MAX_PROMPTS_PER_SKILL,
             f"Prompts per skill must be between 1 and {MAX_PROMPTS_PER_SKILL} (got {self.prompts_per_skill})."),
            (1 <= self.prompts_per_request <= 100,
             f"Prompts per LLM request must be between 1 and 100 (got {self.prompts_per_request})."),
            (1 <= self.in_context_examples <= 20,
             f"In-context examples must be between 1 and 20 (got {self.in_context_examples})."),
            (0.0 <= self.rouge_threshold <= 1.0,
             f"The ROUGE-L threshold must be between 0 and 1 (got {self.rouge_threshold})."),
            (0.0 <= self.llm_temperature <= 2.0,
             f"The LLM temperature must be between 0 and 2 (got {self.llm_temperature})."),
            (1 <= self.samples_per_prompt <= 16,
             f"Images per prompt must be between 1 and 16 (got {self.samples_per_prompt})."),
            (self.rank >= 1, f"The LoRA rank must be at least 1 (got {self.rank})."),
            (self.alpha > 0, f"The LoRA alpha must be positive (got {self.alpha})."),
            (self.steps >= 1, f"Steps per expert must be at least 1 (got {self.steps})."),
            (self.batch_size >= 1, f"The batch size must be at least 1 (got {self.batch_size})."),
            (self.baseline_steps is None or self.baseline_steps >= 1,
             f"baseline_steps must be at least 1, or None for n_skills x steps (got {self.baseline_steps})."),
            (self.lr > 0 and math.isfinite(self.lr), f"The learning rate must be a positive number (got {self.lr})."),
            (self.train_unet or self.train_text_encoder,
             UNTRAINED_UNET_NEEDS_TEXT_ENCODER),
            (0.0 <= self.prompt_dropout < 1.0, f"prompt_dropout must be in [0, 1) (got {self.prompt_dropout})."),
            (self.merge in MERGES, f"Unknown merge '{self.merge}'; use one of {', '.join(MERGES)}."),
            (self.image_check in IMAGE_CHECKS,
             f"Unknown image check '{self.image_check}'; use one of {', '.join(IMAGE_CHECKS)}."),
            (0.0 < self.merge_density <= 1.0, f"merge_density must be in (0, 1] (got {self.merge_density})."),
            (self.merge_weights is None or len(self.merge_weights) == len(skills),
             f"Give one merge weight per skill ({len(skills)}), or none for 1/n each."),
            (self.merge_weights is None or all(math.isfinite(w) and -4 <= w <= 4 for w in self.merge_weights),
             "Merge weights must be numbers between -4 and 4."),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidInput(message)
        from workbench.perception.backends import check_all
        from workbench.registry import check_model

        # The drawing model too, before any prompt is written: all that is missing in one message.
        check_all([lambda: check_run_settings(self.model, self.eval_prompts, self.eval_seeds, self.detector,
                                              detects=self.image_check != "none")]
                  + ([lambda: check_model(self.image_model)] if self.image_model not in (None, self.model) else []))

    def world(self) -> str:
        return world_of(self.model)

    def skill_list(self) -> list[Skill]:
        return resolve_skills(self.skills, self.world())

    def llm_name(self) -> str:
        return self.llm or ("shapes" if self.world() == "shapes" else "openai")

    def merge_weight_list(self, n: int) -> list[float]:
        return list(self.merge_weights) if self.merge_weights is not None else [1.0 / n] * n

    def mixed_steps(self, n: int) -> int:
        return self.baseline_steps if self.baseline_steps is not None else n * self.steps

    @classmethod
    def from_dict(cls, data: dict) -> "SelmaConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


class Progress:
    """Progress over the whole run: each task owns a share of [0, 1] in proportion to its rough cost."""

    def __init__(self, report: Callable[[float, str], None] | None, plan: dict[str, float]):
        self.report, self.plan = report, plan
        self.total = sum(plan.values()) or 1.0

    def __call__(self, task: str, fraction: float, message: str) -> None:
        if self.report is None:
            return
        names = list(self.plan)
        before = sum(self.plan[name] for name in names[:names.index(task)])
        self.report(min(1.0, (before + fraction * self.plan[task]) / self.total), f"{task}: {message}")


def plan(config: SelmaConfig, skills: list[Skill]) -> dict[str, float]:
    """Rough cost of every task, in seconds of the shapes model on one CPU thread (only the ratios matter)."""
    from workbench.evaluation import load_prompt_file

    image, step = 0.25, 0.35 * config.batch_size / 32
    tasks = {f"prompts {s.name}": 0.02 * config.prompts_per_skill for s in skills}
    tasks |= {f"images {s.name}": image * config.prompts_per_skill * config.samples_per_prompt for s in skills}
    if config.image_check != "none":
        tasks |= {f"check {s.name}": 0.01 * config.prompts_per_skill * config.samples_per_prompt for s in skills}
    tasks |= {f"expert {s.name}": step * config.steps for s in skills}
    if config.baseline:
        tasks["mixed LoRA"] = step * config.mixed_steps(len(skills))
    tasks["merge"] = 2.0
    if config.eval_seeds:
        per_eval = 1.2 * image * len(load_prompt_file(config.eval_prompts)) * config.eval_seeds
        for label in ["base", "merged"] + (["mixed"] if config.baseline else []):
            tasks[f"eval {label}"] = per_eval
        if config.eval_experts:
            tasks |= {f"eval expert {s.name}": per_eval for s in skills}
    return tasks


# --- the run ----------------------------------------------------------------------------------------


def run_selma(config: SelmaConfig, out_dir: Path, on_progress: Callable[[float, str], None] | None = None,
              should_stop: Callable[[], bool] | None = None, log: Callable[[str], None] = print) -> dict:
    """Run (or continue) a SELMA run in `out_dir`; returns the summary (also in summary.json).

    on_progress(fraction of the whole run in [0, 1], "task: message"); should_stop() is polled
    during every stage and ends the run with JobCancelled (call again to continue).
    """
    config.validate()
    out_dir = check_output_folder(out_dir)  # a file there: said before any work
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_same_config(config, out_dir)
    skills = config.skill_list()
    progress = Progress(on_progress, plan(config, skills))
    started = time.time()

    # 1. Skill-specific prompts, written by the LLM and filtered for diversity.
    llm = None
    for skill in skills:
        path = out_dir / "prompts" / f"{skill.name}.json"
        if not path.exists():
            llm = llm or make_llm(config)
            record = write_skill_prompts(config, skill, llm, progress, should_stop)
            write_json(path, record)
            log(f"{skill.name}: {prompt_summary(record['stats'])}")

    # 2. Images of every prompt, by the base model or `image_model`.
    for skill in skills:
        folder = out_dir / "data" / skill.name
        if not (folder / "metadata.jsonl").exists():
            prompts = json.loads((out_dir / "prompts" / f"{skill.name}.json").read_text())["prompts"]
            rows = draw_images(config, skill.name, prompts, folder, progress, should_stop)
            log(f"{skill.name}: {len(rows)} images of {len(prompts)} prompts")

    # 2b. Optionally, the detector checks the images: keep those that show their prompt, or relabel.
    data = {skill.name: out_dir / "data" / skill.name for skill in skills}
    if config.image_check != "none":
        detector = None
        for skill in skills:
            checked = data[skill.name] / "checked"
            if not (checked / "metadata.jsonl").exists():
                detector = detector or _detector(config)
                stats = check_images(data[skill.name], detector, config.image_check,
                                     lambda f, m, s=skill.name: progress(f"check {s}", f, m), should_stop)
                log(f"{skill.name}: {check_summary(stats)}")
            data[skill.name] = checked

    # 3. One LoRA expert per skill; the mixed-data LoRA as the baseline.
    experts = {}
    for skill in skills:
        experts[skill.name] = train_adapter(config, [data[skill.name]], out_dir / "experts" / skill.name,
                                            config.steps, f"expert {skill.name}", progress, should_stop)
    mixed = None
    if config.baseline:
        mixed = train_adapter(config, list(data.values()), out_dir / "mixed",
                              config.mixed_steps(len(skills)), "mixed LoRA", progress, should_stop)

    # 4. Merge the experts.
    weights = config.merge_weight_list(len(skills))
    merged = out_dir / "merged"
    if not (merged / "merge.json").exists():
        progress("merge", 0.0, f"{config.merge} of {len(skills)} experts")
        combination = "cat" if config.merge == "set_adapters" else config.merge  # cat: exactly set_adapters
        merge_experts(config.model, list(experts.values()), weights, merged, combination=combination,
                      density=config.merge_density, seed=config.seed)
        progress("merge", 1.0, f"wrote {merged}")
    merged_loras = merged_variant(config, experts, weights, merged)

    # 5. Evaluate base, mixed and merged (and each expert alone).
    if config.eval_seeds:
        variants = {"base": [], "merged": merged_loras}
        if mixed is not None:
            variants["mixed"] = [LoraSpec(str(mixed), 1.0)]
        if config.eval_experts:
            variants |= {f"expert {name}": [LoraSpec(str(path), 1.0)] for name, path in experts.items()}
        for label, loras in variants.items():
            scores = evaluate(config, loras, out_dir / ("eval-" + label.replace(" ", "-")), f"eval {label}", progress,
                              should_stop)
            log(f"{label}: {scores['overall']:.1%} overall on {Path(config.eval_prompts).name}")

    summary = write_summary(config, out_dir, seconds=time.time() - started)
    if summary["table"]["rows"]:
        log(format_table(summary))
    return summary


def make_llm(config: SelmaConfig):
    from workbench.llm import get_llm

    name = config.llm_name()
    return get_llm(name, seed=config.seed) if name == "shapes" else get_llm(name)


def write_skill_prompts(config: SelmaConfig, skill: Skill, llm, progress: Progress, should_stop) -> dict:
    """Stage 1 for one skill (the authors' llm/prompt_generation.py, after Self-Instruct): ask for
    `prompts_per_request` prompts at a time, each request showing `in_context_examples` prompts drawn
    from the seeds and the prompts kept so far; keep a prompt when it is no evaluation prompt, fits
    the text encoder, and its ROUGE-L to every kept prompt (seeds included) is at most the threshold. Stops at
    `prompts_per_skill`, or when requests stop adding prompts (a small world runs out of new ones)."""
    from workbench.llm import LLMOutputError, write_prompts

    n, task = config.prompts_per_skill, f"prompts {skill.name}"
    held_out = evaluation_prompts(config)
    fits = prompt_fits(config)
    pool = list(skill.examples)
    rouge = RougeFilter(pool, config.rouge_threshold)
    rng = random.Random(zlib.crc32(f"{config.seed}:{skill.name}".encode()))
    kept: list[str] = []
    in_evaluation = too_long = requests = failed = stale = 0
    last_failure = ""
    max_requests = 5 * math.ceil(n / config.prompts_per_request) + PATIENCE
    while len(kept) < n and requests < max_requests and stale < PATIENCE:
        if should_stop is not None and should_stop():
            raise JobCancelled(f"prompt writing for {skill.name} was stopped; resume the run to continue it")
        examples = rng.sample(pool, min(config.in_context_examples, len(pool)))
        requests += 1
        try:
            batch = write_prompts(llm, skill.name, skill.description, examples, config.prompts_per_request,
                                  temperature=config.llm_temperature, at_least=1)
        except LLMOutputError as error:
            failed += 1  # an unusable answer costs a request, not the run
            stale += 1
            last_failure = error.reason
            continue
        before = len(kept)
        for prompt in batch:
            if len(kept) == n:
                break
            if _normalize(prompt) in held_out:
                in_evaluation += 1
            elif not fits(prompt):
                too_long += 1
            elif rouge.offer(prompt):
                kept.append(" ".join(prompt.split()))
                pool.append(kept[-1])
        stale = 0 if len(kept) > before else stale + 1
        progress(task, len(kept) / n, f"{len(kept)}/{n} prompts kept after {requests} request(s)")
    if not kept:
        why = [f"{failed} unusable answer(s)" + (f", the last because {last_failure}" if last_failure else "")]
        if rouge.stats.near_duplicates:
            why.append(f"{rouge.stats.near_duplicates} prompt(s) too close to a kept one: raise --rouge-threshold "
                       f"(now {config.rouge_threshold:g}) to keep closer prompts")
        if in_evaluation or too_long:
            why.append(f"{in_evaluation} evaluation prompt(s) and {too_long} too long for the text encoder left out")
        raise InvalidInput(f"The LLM wrote no usable prompt for the skill '{skill.name}' in {requests} request(s) "
                           f"({'; '.join(why)}); check the LLM and the skill's description and examples.")
    stats = rouge.stats.to_dict()
    stats = {"generated": stats["generated"] + in_evaluation + too_long, "kept": len(kept),
             "near_duplicates": stats["near_duplicates"], "invalid": stats["invalid"], "in_evaluation": in_evaluation,
             "too_long": too_long,
             "asked": n, "requests": requests, "failed_requests": failed, "threshold": config.rouge_threshold,
             "mean_max_rouge": stats["mean_max_rouge"], "max_rouge": stats["max_rouge"]}
    return {"skill": skill.to_dict(), "prompts": kept, "stats": stats}


def evaluation_prompts(config: SelmaConfig) -> set[str]:
    """Prompts no skill may train on: the evaluation file's, and ShapesBench's in the shapes world."""
    from workbench.evaluation import load_prompt_file
    from workbench.shapes.bench_prompts import shapesbench_prompts

    records = load_prompt_file(config.eval_prompts)
    if config.world() == "shapes":
        records = records + shapesbench_prompts()
    return {_normalize(r["prompt"]) for r in records}


def prompt_fits(config: SelmaConfig) -> Callable[[str], bool]:
    """Whether a prompt fits the text encoders of the trained and the drawing model: a longer one would
    be cut, so its expert would learn from a caption that stops mid-scene (the shapes model reads 32
    tokens, and about half of the shapes LLM's long descriptions are longer; SD reads 77)."""
    from transformers import CLIPTokenizer

    from workbench.registry import resolve

    tokenizers = []
    for name in dict.fromkeys([config.model, config.image_model or config.model]):
        entry = resolve(name)
        try:
            tokenizer = CLIPTokenizer.from_pretrained(entry.source, subfolder="tokenizer", local_files_only=True)
        except (OSError, ValueError) as error:
            raise ModelNotAvailable(f"The tokenizer of '{entry.name}' ({entry.source}) could not be loaded: "
                                    f"{str(error).splitlines()[0][:200]} {entry.fetch_hint}") from None
        # transformers 5 may hand back an empty tokenizer (a few special tokens, no length limit) for a folder
        # it could not read instead of raising; such a one would let every prompt through.
        if len(tokenizer) < 10 or not 0 < tokenizer.model_max_length < 100_000:
            raise ModelNotAvailable(f"The tokenizer of '{entry.name}' ({entry.source}) could not be loaded: it "
                                    f"holds {len(tokenizer)} tokens. {entry.fetch_hint}")
        tokenizers.append(tokenizer)

    def fits(prompt: str) -> bool:
        return all(len(t(prompt, verbose=False).input_ids) <= t.model_max_length for t in tokenizers)

    return fits


def _normalize(prompt: str) -> str:
    from workbench.shapes.bench_prompts import normalize_prompt

    return normalize_prompt(prompt)


def prompt_summary(stats: dict) -> str:
    return (f"{stats['kept']}/{stats['asked']} prompts kept of {stats['generated']} written in {stats['requests']} "
            f"request(s): {stats['near_duplicates']} near-duplicates (ROUGE-L > {stats['threshold']}), "
            f"{stats['in_evaluation']} equal to an evaluation prompt, {stats['too_long']} longer than the text "
            f"encoder reads, {stats['invalid']} invalid")


def draw_images(config: SelmaConfig, skill: str, prompts: list[str], folder: Path, progress: Progress,
                should_stop) -> list[dict]:
    """Stage 2 for one skill: `samples_per_prompt` images of every prompt, as an imagefolder
    (metadata.jsonl written last: it marks the stage done)."""
    n = config.samples_per_prompt
    model = config.image_model or config.model
    rows = []
    for start in range(0, len(prompts), IMAGE_CHUNK):
        chunk = prompts[start:start + IMAGE_CHUNK]
        requests = [GenerationRequest(p, model=model, seeds=list(range(n)), steps=config.sample_steps,
                                      guidance=config.guidance, batch_size=16) for p in chunk]

        def report(fraction: float, message: str, start=start, size=len(chunk)) -> None:
            progress(f"images {skill}", (start + fraction * size) / len(prompts),
                     f"prompts {start + 1}-{start + size} of {len(prompts)}, {message}")

        results = generate_many(requests, on_progress=report, should_stop=should_stop)
        for offset, prompt in enumerate(chunk):
            for result in results[offset * n:(offset + 1) * n]:
                name = f"p{start + offset:05d}_s{result.seed:04d}.png"
                save_png(result.image, result.metadata, folder / "images", name=name)
                rows.append({"file_name": f"images/{name}", "text": prompt, "skill": skill, "seed": result.seed})
    write_jsonl(folder / "metadata.jsonl", rows)
    return rows


def _detector(config: SelmaConfig):
    from workbench.benchmark import pick_detector

    return pick_detector(BenchmarkConfig(model=config.model, detector=config.detector))


def check_images(folder: Path, detector, mode: str, report: Callable[[float, str], None] | None = None,
                 should_stop=None, box_threshold: float = THRESHOLD) -> dict:
    """Stage 2b for one skill: detect the objects of every image of `folder` (an imagefolder) and run
    IPR's relabeler on its prompt. An image that shows its prompt (GenEval's verdict) is kept as it is;
    one that misses it is left out ("verify") or kept under the prompt it does show, at IPR's loss
    weight for a relabeled pair ("relabel"); images showing nothing asked for, or an object the
    detector is unsure of, are always left out. Writes `folder/checked/metadata.jsonl` (rows naming
    `../images/...`, so no image is copied) and `check.json` with the counts; returns those counts."""
    from PIL import Image

    from pipelines.ipr import confidence_bar, sample_weight, unsure_detections
    from workbench.relabel import relabel

    if mode not in IMAGE_CHECKS[1:]:
        raise InvalidInput(f"Unknown image check '{mode}'; use one of {', '.join(IMAGE_CHECKS[1:])}.")
    min_confidence = confidence_bar(detector)
    _, rows = read_imagefolder(folder, kind="SELMA skill data")
    kept, counts = [], {"matched": 0, "relabeled": 0, "missed": 0, "dropped": 0, "unsure": 0}
    for i, row in enumerate(rows):
        if should_stop is not None and should_stop():
            raise JobCancelled(f"checking the images of {folder.name} was stopped; resume the run to continue it")
        with Image.open(folder / row["file_name"]) as image:
            image = image.convert("RGB")
            detections = [d.to_dict() for d in detector.detect(image)]
        result = relabel(row["text"], detections, image.width, image.height, box_threshold=box_threshold,
                         split_colors=True, say_relations=True)  # IPR's relabels (see IPRConfig)
        if not result.keep:
            counts["dropped"] += 1
        elif unsure_detections(detections, box_threshold, min_confidence):
            counts["unsure"] += 1
        elif result.changed and mode == "verify":
            counts["missed"] += 1
        else:
            counts["relabeled" if result.changed else "matched"] += 1
            kept.append({**row, "file_name": "../" + row["file_name"], "text": result.prompt, "prompt": row["text"],
                         "weight": sample_weight("relabel", result.changed, detections, box_threshold)})
        if report is not None and i % 64 == 0:
            report(i / len(rows), f"{i}/{len(rows)} images, {len(kept)} kept")
    stats = {"mode": mode, "images": len(rows), "kept": len(kept), **counts}
    if not kept:
        raise InvalidInput(f"The detector kept none of the {len(rows)} images in {folder}, so there is nothing to "
                           f"train this skill's expert on; try the image check \"relabel\" or \"none\", or draw "
                           f"more images per prompt.")
    checked = folder / "checked"
    checked.mkdir(parents=True, exist_ok=True)
    write_json(checked / "check.json", stats)
    write_jsonl(checked / "metadata.jsonl", kept)  # last: it marks the stage done
    return stats


def check_summary(stats: dict) -> str:
    return (f"{stats['kept']}/{stats['images']} images kept ({stats['mode']}): {stats['matched']} show their prompt, "
            f"{stats['relabeled']} relabeled to what they show, {stats['missed']} miss it, {stats['dropped']} show "
            f"nothing asked for, {stats['unsure']} with an object the detector is unsure of")


def train_adapter(config: SelmaConfig, data: list[Path], out: Path, steps: int, task: str, progress: Progress,
                  should_stop) -> Path:
    """Stage 3: one LoRA on the given imagefolders (skipped when `out/done` exists)."""
    if (out / "done").exists() and lora_weights_file(str(out)) is not None:
        return out
    train_config = TrainConfig(model=config.model, data=[str(d) for d in data], out=str(out), lora=True,
                               rank=config.rank, alpha=config.alpha, target_modules=tuple(config.target_modules),
                               train_text_encoder=config.train_text_encoder, train_unet=config.train_unet,
                               steps=steps,
                               batch_size=config.batch_size, lr=config.lr,
                               prompt_dropout=config.prompt_dropout, seed=config.seed)
    result = train(train_config, on_progress=lambda f, m: progress(task, f, m), should_stop=should_stop)
    if result.get("stopped"):
        raise JobCancelled(f"training of the {task} was stopped; resume the run to continue it")
    (out / "done").write_text("")
    return out


def merged_variant(config: SelmaConfig, experts: dict[str, Path], weights: list[float], merged: Path) -> list[LoraSpec]:
    """The adapters that make the merged model: every expert at its weight (set_adapters, as the
    authors), or the one merged adapter."""
    if config.merge == "set_adapters":
        return [LoraSpec(str(path), weight) for path, weight in zip(experts.values(), weights)]
    return [LoraSpec(str(merged), 1.0)]


def evaluate(config: SelmaConfig, loras: list[LoraSpec], out: Path, task: str, progress: Progress,
             should_stop) -> dict:
    """Stage 5: the GenEval-style benchmark with these adapters (skipped when already scored)."""
    scores_file = out / "scores.json"
    if scores_file.exists():
        return json.loads(scores_file.read_text())
    out.mkdir(parents=True, exist_ok=True)
    bench = BenchmarkConfig(model=config.model, prompts=config.eval_prompts, seeds=config.eval_seeds,
                            detector=config.detector, loras=loras)
    return run_benchmark(bench, out, on_progress=lambda f, m: progress(task, f, m), should_stop=should_stop)


# --- results ----------------------------------------------------------------------------------------


def write_summary(config: SelmaConfig, out_dir: Path, seconds: float | None = None) -> dict:
    """summary.json: each skill's prompts and images, and the per-tag scores of every evaluated variant."""
    out_dir = Path(out_dir)
    skills = {}
    for skill in config.skill_list():
        record_path = out_dir / "prompts" / f"{skill.name}.json"
        if not record_path.exists():
            continue
        record = json.loads(record_path.read_text())
        stats = {k: v for k, v in record["stats"].items() if k != "max_rouge"}
        metadata = out_dir / "data" / skill.name / "metadata.jsonl"
        images = sum(1 for line in metadata.read_text().splitlines() if line.strip()) if metadata.exists() else 0
        expert = out_dir / "experts" / skill.name
        checked = out_dir / "data" / skill.name / "checked" / "check.json"
        skills[skill.name] = {"description": skill.description, "prompts": len(record["prompts"]), "images": images,
                              "check": json.loads(checked.read_text()) if checked.exists() else None,
                              "expert": str(expert) if (expert / "done").exists() else None, "stats": stats}
    scores = {}
    for label in ["base", "mixed", "merged"] + [f"expert {name}" for name in skills]:
        path = out_dir / ("eval-" + label.replace(" ", "-")) / "scores.json"
        if path.exists():
            data = json.loads(path.read_text())
            scores[label] = {"overall": data["overall"],
                             "per_tag": {t: s["accuracy"] for t, s in data["per_tag"].items()},
                             "images": data.get("images"), "folder": str(path.parent)}
    tags = list(dict.fromkeys(tag for entry in scores.values() for tag in entry["per_tag"]))
    rows = [{"variant": label, **entry["per_tag"], "overall": entry["overall"]} for label, entry in scores.items()]
    merged = out_dir / "merged" / "merge.json"
    summary = {"kind": "selma", "run": str(out_dir), "model": config.model,
               "image_model": config.image_model or config.model, "merge": config.merge,
               "merge_weights": config.merge_weight_list(len(config.skill_list())),
               "merged_adapter": str(merged.parent) if merged.exists() else None,
               "mixed_adapter": str(out_dir / "mixed") if (out_dir / "mixed" / "done").exists() else None,
               "skills": skills, "scores": scores, "table": {"tags": tags, "rows": rows},
               "seconds": None if seconds is None else round(seconds, 1)}
    write_json(out_dir / "summary.json", summary)
    return summary


def format_table(summary: dict) -> str:
    """The per-tag accuracy of every evaluated variant as a text table."""
    tags, rows = summary["table"]["tags"], summary["table"]["rows"]
    width = max([len("variant")] + [len(row["variant"]) for row in rows])
    columns = tags + ["overall"]
    lines = [f"{'variant':<{width}}  " + "  ".join(f"{c:>{max(len(c), 7)}}" for c in columns)]
    for row in rows:
        cells = [f"{row[c]:.1%}" if row.get(c) is not None else "-" for c in columns]
        lines.append(f"{row['variant']:<{width}}  "
                     + "  ".join(f"{v:>{max(len(c), 7)}}" for v, c in zip(cells, columns)))
    return "\n".join(lines)


def finished_stages(out_dir: Path, config: SelmaConfig | None = None) -> dict[str, bool]:
    """Which stages of a run folder are done (for a UI deciding what *Continue* would still do)."""
    out_dir = Path(out_dir)
    config = config or load_config(out_dir)
    skills = [s.name for s in config.skill_list()]
    stages = {"prompts": all((out_dir / "prompts" / f"{s}.json").exists() for s in skills),
              "images": all((out_dir / "data" / s / "metadata.jsonl").exists() for s in skills),
              "check": config.image_check == "none" or all((out_dir / "data" / s / "checked" / "metadata.jsonl")
                                                           .exists() for s in skills),
              "experts": all((out_dir / "experts" / s / "done").exists() for s in skills),
              "mixed": not config.baseline or (out_dir / "mixed" / "done").exists(),
              "merge": (out_dir / "merged" / "merge.json").exists()}
    labels = ["base", "merged"] + (["mixed"] if config.baseline else [])
    labels += [f"expert-{s}" for s in skills] if config.eval_experts else []
    stages["eval"] = not config.eval_seeds or all((out_dir / f"eval-{label}" / "scores.json").exists()
                                                  for label in labels)
    return stages


def _check_same_config(config: SelmaConfig, out_dir: Path) -> None:
    # Scoring the experts alone adds evaluations without changing any result; the rest must match.
    bind_run_config(out_dir, {"kind": "selma", **asdict(config)}, "a SELMA run", ignore=("eval_experts",),
                    implied={"image_check": "none", "train_text_encoder": False, "train_unet": True,
                             "target_modules": list(UNET_TARGETS)})  # what runs saved before these had


def load_config(out_dir: Path) -> SelmaConfig:
    path = Path(out_dir) / "config.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    if data.get("kind") != "selma":
        raise InvalidInput(f"{out_dir} is not a SELMA run (no SELMA config.json).")
    return SelmaConfig.from_dict(data)




# --- command line -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    d = SelmaConfig()
    p = argparse.ArgumentParser(prog="python -m pipelines.selma",
                                description="SELMA: skill-specific LoRA experts on auto-generated data, merged.")
    p.add_argument("--out", type=Path, help="run folder (created; continued with --resume)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out with its saved settings")
    p.add_argument("--list-skills", action="store_true", help="list the skills available for --model and exit")
    p.add_argument("--model", default=d.model)
    p.add_argument("--image-model", default=None, help="draw the training images with this model (weak-to-strong)")
    p.add_argument("--llm", default=None, help="LLM backend (shapes, openai, transformers); default: the model's world")
    p.add_argument("--llm-temperature", type=float, default=d.llm_temperature)
    p.add_argument("--skill", action="append", dest="skills", default=None,
                   help="a skill to train an expert for (repeatable; default: the world's five)")
    p.add_argument("--prompts-per-skill", type=int, default=d.prompts_per_skill)
    p.add_argument("--prompts-per-request", type=int, default=d.prompts_per_request)
    p.add_argument("--rouge-threshold", type=float, default=d.rouge_threshold,
                   help="keep a prompt when its ROUGE-L to every kept prompt is at most this")
    p.add_argument("--samples-per-prompt", type=int, default=d.samples_per_prompt)
    p.add_argument("--sample-steps", type=int, default=None, help="denoising steps for the training images")
    p.add_argument("--image-check", choices=IMAGE_CHECKS, default=d.image_check,
                   help="what the detector does with the images before training (not in the paper): none, "
                        "verify (keep those that show their prompt), relabel (the others get the prompt they show)")
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    add_target_modules_argument(p, d.target_modules)
    p.add_argument("--train-text-encoder", action="store_true", help="a LoRA on the text encoder too")
    p.add_argument("--no-train-unet", dest="train_unet", action="store_false",
                   help="with --train-text-encoder: LoRAs on the text encoder only; the UNet stays the base model's")
    p.add_argument("--steps", type=int, default=d.steps, help="training steps per expert")
    p.add_argument("--baseline-steps", type=int, default=None,
                   help="steps of the mixed LoRA (default: n_skills x steps)")
    p.add_argument("--no-baseline", action="store_true", help="skip the mixed-data LoRA")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--prompt-dropout", type=float, default=d.prompt_dropout)
    p.add_argument("--merge", choices=MERGES, default=d.merge)
    p.add_argument("--merge-weight", type=float, action="append", dest="merge_weights", default=None,
                   help="one per skill, in --skill order (default: 1/n each)")
    p.add_argument("--merge-density", type=float, default=d.merge_density)
    p.add_argument("--eval-prompts", default=d.eval_prompts)
    p.add_argument("--eval-seeds", type=int, default=d.eval_seeds, help="0 skips evaluation")
    p.add_argument("--eval-experts", action="store_true", help="also score each expert alone")
    p.add_argument("--detector", default=None)
    p.add_argument("--seed", type=int, default=d.seed)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.list_skills:
            from workbench.skills import available_skills

            for skill in available_skills(world_of(args.model)).values():
                print(f"{skill.name}: {skill.description}")
            return 0
        if args.out is None:
            parser.error("--out is required")
        if args.resume:
            refuse_settings_with_resume(parser, args, allowed=("eval_experts",))  # scoring the experts only adds
            config = load_config(args.out)
            config.eval_experts = config.eval_experts or args.eval_experts
        else:
            config = SelmaConfig(
                model=args.model, image_model=args.image_model, llm=args.llm, llm_temperature=args.llm_temperature,
                skills=args.skills, prompts_per_skill=args.prompts_per_skill,
                prompts_per_request=args.prompts_per_request, rouge_threshold=args.rouge_threshold,
                samples_per_prompt=args.samples_per_prompt, sample_steps=args.sample_steps,
                image_check=args.image_check,
                rank=args.rank, train_text_encoder=args.train_text_encoder, train_unet=args.train_unet,
                target_modules=list(parse_target_modules(args.target_modules)),
                alpha=float(args.alpha if args.alpha is not None else args.rank), steps=args.steps,
                baseline=not args.no_baseline, baseline_steps=args.baseline_steps, batch_size=args.batch_size,
                lr=args.lr, prompt_dropout=args.prompt_dropout, merge=args.merge, merge_weights=args.merge_weights,
                merge_density=args.merge_density, eval_prompts=args.eval_prompts, eval_seeds=args.eval_seeds,
                eval_experts=args.eval_experts, detector=args.detector, seed=args.seed)
        summary = run_selma(config, args.out, on_progress=ConsoleProgress(), log=lambda m: print(m, flush=True))
    except WorkbenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"stopped: finished stages and checkpoints are kept in {args.out}; continue with "
              f"`python -m pipelines.selma --out {args.out} --resume`", file=sys.stderr)
        return 130
    print(f"done in {summary['seconds']} s: experts in {args.out / 'experts'}, "
          f"merged adapter {summary['merged_adapter']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
