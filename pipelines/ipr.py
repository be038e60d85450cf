"""IPR, Iterative Prompt Relabeling (Chen et al., "Learning from Mistakes: Iterative Prompt Relabeling
for Text-to-Image Diffusion Model Training", arXiv 2312.16204).

    python -m pipelines.ipr --model shapes --iterations 2 --lora --out DIR

For each iteration k (the method of the paper's Sec. 3, read top to bottom in `run_ipr`):

1. sample: draw `samples_per_prompt` images for every training prompt with the current model
   (the base model, plus the adapter of iteration k-1);
2. detect and relabel: find what each image really shows and rewrite its prompt to that
   (`workbench.relabel`): images that already satisfy their prompt keep it, the others get the
   prompt they do satisfy, and images showing nothing that was asked for are dropped;
3. review (optional, `review=True`): stop so that a person can accept, edit or reject relabels in
   the Review tab; calling `run_ipr` again on the folder continues once `mark_reviewed` was called;
4. fine-tune on the pairs of iterations 0..k (training sets accumulate) with the detection-based
   loss re-scaling below, continuing the adapter of iteration k-1 (or afresh from the base model,
   `continue_adapter=False`); samples with an object the detector is unsure of can be left out
   (`min_confidence`);
5. evaluate on ShapesBench (or any GenEval-format prompt file).

Every stage writes its result under the run folder before the next starts and is skipped when
that result exists, so calling `run_ipr` again continues a crashed, cancelled or reviewed run (the
trainer resumes from its own checkpoints). Folder layout:

    config.json  metrics.jsonl  eval-base/
    iteration-<k>/images/  samples.jsonl  reviewed  train/metadata.jsonl  adapter/  eval/
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from pipelines.trainer import (UNET_TARGETS, UNTRAINED_UNET_NEEDS_TEXT_ENCODER, add_target_modules_argument,
                               parse_target_modules, refuse_settings_with_resume)
from workbench.benchmark import (SHAPESBENCH, BenchmarkConfig, check_run_settings, format_scores, pick_detector,
                                 run_benchmark)
from workbench.config import get_settings
from workbench.console import ConsoleProgress
from workbench.errors import InvalidInput, WorkbenchError
from workbench.store import bind_run_config, check_output_folder, read_jsonl, write_jsonl
from workbench.generation import GenerationRequest, LoraSpec, generate_many, lora_weights_file, save_png
from workbench.relabel import relabel
from workbench.reviews import ReviewStore, load_samples, training_rows, with_reviews
from workbench.skills import world_of
from workbench.shapes.bench_prompts import (CLAUSE_POSITION_SHARE, TRAINING_KINDS, check_training_kinds,
                                           training_prompts)

# Detection-based loss re-scaling. The authors' released training script weights a sample's
# denoising loss by 1.0 when the image already matched its prompt and by 0.5 when its prompt was
# relabeled (a relabeled pair is right, but it was not what the model was asked for); the
# alternative scales that factor by how sure the detector was of the objects the new prompt names.
WEIGHTINGS = ("relabel", "detector")
MATCHED_WEIGHT = 1.0
RELABELED_WEIGHT = 0.5


@dataclass
class IPRConfig:
    model: str = "shapes"
    iterations: int = 2
    prompts: int = 500  # training prompts, from the shapes grammar (disjoint from ShapesBench)
    samples_per_prompt: int = 3
    prompt_seed: int = 0
    # Kinds of training request (workbench.shapes.bench_prompts.TRAINING_KINDS), each drawn equally
    # often; None: all. The paper trains on spatial prompts alone, and so do we by default: on the
    # shapes model, two iterations over all kinds lost 4.6 points overall (training on its own
    # cluttered multi-object images), over position prompts alone 1.4 (UNet LoRA only; with the
    # text encoder's too, +1.5 and position +15; trained afresh each iteration, +5.9 and position
    # +15.5; assets/adapters/ipr-shapes).
    prompt_kinds: list[str] | None = field(default_factory=lambda: ["position"])
    # Share of position training prompts said as a caption clause ("a circle and a square; the circle
    # is above the square"), the form the shapes model draws both objects for (72% of images against
    # 1% inline): IPR can only relabel a relation in an image that shows both objects.
    clause_share: float = CLAUSE_POSITION_SHARE
    detector: str | None = None  # None: the model's own world (shapes model -> shapes detector)
    box_threshold: float = 0.3
    # Samples with an object the detector calls but is unsure of (score above the box threshold and
    # below this) are not trained on: a blob halfway between a square and a circle, labelled either
    # way, teaches the model to draw it, and each iteration would drift further. None: the
    # detector's own `confident_score` (the shapes detector's 0.9; none for others); 0: keep all.
    min_confidence: float | None = None
    # Relabels as true to the image as the detector allows: one clause per colour of a class, and
    # where two single objects are relative to each other whatever the prompt asked (a model that
    # rarely composes a relation learns relations from the pairs that show one).
    split_colors: bool = True
    say_relations: bool = True
    # Write each rewrite inside its prompt's own framing ("a photo of ... on a white background"; not in
    # the paper's code, which edits the prompt in place). Without it only unchanged prompts keep their
    # framing, so the framing words come to mean "the image is faithful" (relabel.relabel).
    keep_framing: bool = False
    weighting: str = "relabel"  # see WEIGHTINGS
    # Mirror images (not in the paper): each training image is flipped left to right with p = 0.5 and
    # trained under its caption with left and right swapped, where its mirrored detections confirm
    # that caption (else it is never flipped). Twice the pairs, as many left of as right of.
    mirror: bool = False
    review: bool = False  # pause after relabeling each iteration for a manual review
    # Fine-tuning (pipelines.trainer).
    lora: bool = True
    rank: int = 8
    alpha: float = 8.0
    # The UNet layers the LoRA adapts (pipelines.trainer.TARGET_PRESETS or module names).
    target_modules: list[str] = field(default_factory=lambda: list(UNET_TARGETS))
    # A LoRA on the text encoder too: "a circle above a square" and "a circle and a square" differ in
    # how the words combine, and the UNet's LoRA alone learns that slowly (position 4.5% vs 9.0% after
    # one iteration on the shapes model, assets/adapters/ipr-shapes).
    train_text_encoder: bool = True
    # False (the default; not in the paper): only the text encoder's LoRA trains and the UNet stays the
    # base model's. The shapes model draws both objects of a relation stated as its captions state it
    # and misreads the inline form (README, bench/relation_phrasing.py): a reading error, which a
    # text-encoder adapter fixes without the UNet learning from its own blurrier images. Two seeds on
    # the shapes model: 59.3 / 62.1 after iteration 1 and 58.9 / 58.2 after iteration 2, against 53.9 /
    # 57.7 and 58.2 / 54.3 with the UNet's LoRA too; colours kept, about half as many unsure samples
    # in iteration 2 (assets/adapters/ipr-shapes).
    train_unet: bool = False
    steps: int = 800  # per iteration
    # Training sets accumulate, so at a fixed step count a later iteration sees each pair fewer times
    # than iteration 1 did. True: iteration k trains steps * (its pairs / iteration 1's pairs) steps,
    # the same number of passes over its data as iteration 1.
    scale_steps: bool = False
    # Iteration k's adapter starts from iteration k-1's (True) or afresh from the base model (False);
    # either way it trains on the pairs of iterations 0..k. Afresh, the model is never fine-tuned
    # for more than `steps` on its own images, so errors in them cannot compound across iterations:
    # on the shapes model iteration 2 scored 58.2 overall afresh against 53.8 continued (position
    # 15.5 vs 15.0; assets/adapters/ipr-shapes).
    continue_adapter: bool = False
    batch_size: int = 32
    lr: float = 5e-4
    # Exported adapter = exponential moving average of its weights over the last ~1/(1 - decay) steps
    # (diffusers' EMAModel); None: the last step's weights.
    ema_decay: float | None = None
    # Adapters trained per iteration on the same pairs with different seeds (LoRA initialisation and
    # batch order) and averaged into one (a uniform "model soup", Wortsman et al. 2022: the mean of
    # their weight updates, fused with peft's "cat" merge). On the shapes model two seeds of the same
    # iteration-1 pairs scored 53.2 and 56.8: one fine-tune is a noisy draw. K times the training
    # time. Two averaged scored 56.2 after iteration 1 but 56.6 after iteration 2, against 53.9 and
    # 58.2 for one (assets/adapters/ipr-shapes), so the default is 1: one adapter, as in the paper.
    adapter_seeds: int = 1
    prompt_dropout: float = 0.1  # keeps the unconditional branch that guidance subtracts trained
    # Share of the noise schedule that training draws timesteps from (pipelines.trainer). [0.5, 1.0]:
    # the noisier half only, where the layout that a relabel describes is decided, so the model's own
    # images teach what goes where and not their blur (not in the paper). On the shapes model it scored
    # 52.9 and 55.0 after two iterations (two seeds), against 58.2 for the whole schedule: the LoRA also
    # acts at the low-noise steps it was never trained on (assets/adapters/ipr-shapes).
    timestep_range: list[float] = field(default_factory=lambda: [0.0, 1.0])
    # Prior preservation (not in the paper; DreamBooth's remedy for the same drift): pairs of the
    # model's pre-training kind of data mixed into every iteration's training set, so the adapter keeps
    # drawing clean shapes while it learns from its own, blurrier images. `prior_data`: an imagefolder
    # (needed for real models); for the shapes model, `prior_images` scenes rendered with the web-style
    # alt text it was pre-trained on. 0 and None: off.
    prior_images: int = 0
    prior_data: str | None = None
    seed: int = 0
    # Sampling and evaluation.
    sample_steps: int | None = None  # None: the model's default
    guidance: float | None = None
    eval_prompts: str = str(SHAPESBENCH)
    eval_seeds: int = 4  # 0: skip evaluation

    def validate(self) -> None:
        if not 1 <= self.iterations <= 20:
            raise InvalidInput(f"Iterations must be between 1 and 20 (got {self.iterations}).")
        if self.prompts < 1 or self.samples_per_prompt < 1:
            raise InvalidInput("Give at least one training prompt and one sample per prompt.")
        if self.weighting not in WEIGHTINGS:
            raise InvalidInput(f"Unknown weighting '{self.weighting}'; use one of {', '.join(WEIGHTINGS)}.")
        if not 0 <= self.box_threshold < 1:
            raise InvalidInput(f"The box threshold must be in [0, 1) (got {self.box_threshold}).")
        check_training_kinds(self.prompt_kinds)
        if not 0 <= self.clause_share <= 1:
            raise InvalidInput(f"The clause share must be in [0, 1] (got {self.clause_share}).")
        if self.min_confidence is not None and not 0 <= self.min_confidence <= 1:
            raise InvalidInput(f"The minimum confidence must be in [0, 1] (got {self.min_confidence}).")
        if self.steps < 1:
            raise InvalidInput(f"Training steps per iteration must be at least 1 (got {self.steps}).")
        if self.batch_size < 1:
            raise InvalidInput(f"The batch size must be at least 1 (got {self.batch_size}).")
        if not 1 <= self.adapter_seeds <= 8:
            raise InvalidInput(f"Adapter seeds must be between 1 and 8 (got {self.adapter_seeds}).")
        if self.adapter_seeds > 1 and (self.continue_adapter or not self.lora):
            raise InvalidInput("Averaging several adapters per iteration (--adapter-seeds) needs LoRA adapters "
                               "trained afresh each iteration (drop --continue-adapter and --full).")
        if len(self.timestep_range) != 2 or not 0 <= self.timestep_range[0] < self.timestep_range[1] <= 1:
            raise InvalidInput(f"The timestep range must be two shares of the schedule, 0 <= low < high <= 1, "
                               f"e.g. 0.5 1.0 (got {self.timestep_range}).")
        if not self.train_unet and not self.lora:
            raise InvalidInput("A full fine-tune (--full, or Full in the Train tab) trains the whole UNet: train the "
                               "UNet too (--train-unet, or tick 'Train the UNet too'). By default IPR trains a LoRA "
                               "on the text encoder alone.")
        if not self.train_unet and not (self.lora and self.train_text_encoder):
            raise InvalidInput(UNTRAINED_UNET_NEEDS_TEXT_ENCODER)
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise InvalidInput(f"The EMA decay must be in (0, 1), e.g. 0.99 (got {self.ema_decay}).")
        if self.prior_images < 0:
            raise InvalidInput(f"Prior images must be 0 or more (got {self.prior_images}).")
        if self.guidance is not None and not 0 < self.guidance <= 50:
            raise InvalidInput(f"The sampling guidance must be in (0, 50], e.g. 7.5 (got {self.guidance}).")
        if self.sample_steps is not None and not 1 <= self.sample_steps <= 200:
            raise InvalidInput(f"Sampling steps must be between 1 and 200 (got {self.sample_steps}).")
        if self.prior_images and self.prior_data is None and world_of(self.model) != "shapes":
            raise InvalidInput("Prior preservation on a model other than the shapes model needs --prior-data, an "
                               "imagefolder of the model's pre-training kind of data.")
        if self.prior_data is not None:  # read now, not after the first iteration's sampling and relabeling
            from workbench.imagefolder import read_imagefolder

            read_imagefolder(self.prior_data, kind="Prior-preservation data")
        # The engine's own checks (lr, rank, target modules...) now, not after the first iteration's sampling.
        trainer_config(self, ["-"], Path("-"), None, self.steps, self.seed).validate()
        check_run_settings(self.model, self.eval_prompts, self.eval_seeds, self.detector, detects=True)

    @classmethod
    def from_dict(cls, data: dict) -> "IPRConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


# Settings added after runs were saved, with the value those runs had.
OLDER_RUNS = {"min_confidence": 0.0, "continue_adapter": True, "prompt_kinds": None, "prior_images": 0,
              "prior_data": None, "target_modules": list(UNET_TARGETS), "mirror": False,
              "scale_steps": False, "ema_decay": None, "clause_share": 0.5, "adapter_seeds": 1,
              "timestep_range": [0.0, 1.0], "train_unet": True, "keep_framing": False}


@dataclass
class Stages:
    """Progress over the whole run: each stage owns a slice of [0, 1]."""

    report: Callable[[float, str], None] | None
    iterations: int
    evaluate: bool
    weights: dict = field(default_factory=lambda: {"sample": 0.2, "relabel": 0.05, "train": 0.55, "eval": 0.2})

    def __call__(self, iteration: int | None, stage: str, fraction: float, message: str) -> None:
        if self.report is None:
            return
        per_iteration = dict(self.weights)
        if not self.evaluate:
            per_iteration.pop("eval")
        total = sum(per_iteration.values())
        base = per_iteration.get("eval", 0.0) if self.evaluate else 0.0  # the base model's evaluation
        span = base + self.iterations * total
        if iteration is None:
            done = fraction * base
        else:
            order = list(per_iteration)
            before = sum(per_iteration[s] for s in order[:order.index(stage)])
            done = base + iteration * total + before + fraction * per_iteration[stage]
        where = "base model" if iteration is None else f"iteration {iteration + 1}/{self.iterations}"
        self.report(done / span, f"{where}: {stage}: {message}")


# --- the loop ---------------------------------------------------------------------------------------


def run_ipr(config: IPRConfig, out_dir: Path, on_progress: Callable[[float, str], None] | None = None,
            should_stop: Callable[[], bool] | None = None, log: Callable[[str], None] = print) -> dict:
    """Run (or continue) an IPR run in `out_dir`; returns the per-iteration metrics.

    Returns early with `{"status": "awaiting_review", ...}` when `config.review` is set and an
    iteration's relabels wait for a person.
    """
    config.validate()
    out_dir = check_output_folder(out_dir)  # a file there: said before any work
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_same_config(config, out_dir)
    stages = Stages(on_progress, config.iterations, evaluate=config.eval_seeds > 0)
    detector = pick_detector(BenchmarkConfig(model=config.model, detector=config.detector))
    records = training_prompts(config.prompts, seed=config.prompt_seed, kinds=config.prompt_kinds,
                               clause_share=config.clause_share)
    started = time.time()

    if config.eval_seeds:
        evaluate(config, None, out_dir / "eval-base", stages, should_stop, log)

    prior = prior_folder(config, out_dir, should_stop)
    if prior is not None and config.mirror:
        prior = mirror_safe_prior(prior, out_dir / "prior-mirror")
    adapter: Path | None = None
    for k in range(config.iterations):
        folder = out_dir / f"iteration-{k}"
        samples_file = folder / "samples.jsonl"
        if not samples_file.exists():
            images = sample(config, records, k, adapter, folder, stages, should_stop)
            samples = annotate(config, images, k, detector, stages)
            write_jsonl(samples_file, samples)
            log(f"iteration {k + 1}: {relabel_summary(samples)}")
        if config.review and not (folder / "reviewed").exists():
            log(f"iteration {k + 1}: relabels wait for review (Review tab), then continue the run")
            return {"status": "awaiting_review", "iteration": k, "run": str(out_dir)}

        rows = accumulated_training_rows(out_dir, k, mirror=config if config.mirror else None)
        next_adapter = folder / "adapter"
        if lora_weights_file(str(next_adapter)) is None or not (next_adapter / "done").exists():
            train_iteration(config, rows, folder, adapter if config.continue_adapter else None, stages, k, should_stop,
                            prior)
            (next_adapter / "done").write_text("")
        adapter = next_adapter
        scores = evaluate(config, adapter, folder / "eval", stages, should_stop, log, k) if config.eval_seeds else None
        _record_metrics(out_dir, k, rows, scores)

    return {"status": "done", "run": str(out_dir), "adapter": str(adapter), "seconds": round(time.time() - started, 1),
            "metrics": read_metrics(out_dir)}


def sample(config: IPRConfig, records: list[dict], k: int, adapter: Path | None, folder: Path, stages: Stages,
           should_stop) -> list[dict]:
    """Stage 1: draw images of every training prompt with the current model, saved as PNGs."""
    n = config.samples_per_prompt
    seeds = [k * n + j for j in range(n)]  # fresh images each iteration, same prompts
    loras = [LoraSpec(str(adapter), 1.0)] if adapter is not None else []
    requests = [GenerationRequest(r["prompt"], model=config.model, seeds=seeds, steps=config.sample_steps,
                                  guidance=config.guidance, batch_size=16, loras=loras) for r in records]
    results = generate_many(requests, on_progress=lambda f, m: stages(k, "sample", f, m), should_stop=should_stop)
    images_dir = folder / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for index, record in enumerate(records):
        for result in results[index * n:(index + 1) * n]:
            name = f"p{index:05d}_s{result.seed:04d}.png"
            save_png(result.image, result.metadata, images_dir, name=name)
            out.append({"id": f"i{k}-p{index:05d}-s{result.seed:04d}", "iteration": k,
                        "image": f"{folder.name}/images/{name}", "prompt": record["prompt"], "seed": result.seed,
                        "pil": result.image})
    return out


def annotate(config: IPRConfig, images: list[dict], k: int, detector, stages: Stages) -> list[dict]:
    """Stage 2: detect, relabel and weight every sample."""
    min_confidence = confidence_bar(detector, config.min_confidence)
    samples = []
    for i, item in enumerate(images):
        image = item.pop("pil")
        detections = [d.to_dict() for d in detector.detect(image)]
        result = relabel(item["prompt"], detections, image.width, image.height, box_threshold=config.box_threshold,
                         split_colors=config.split_colors, say_relations=config.say_relations,
                         keep_framing=config.keep_framing)
        keep, unsure, reasons = training_verdict(result, detections, config.box_threshold, min_confidence)
        samples.append({**item, "spec": result.spec, "detections": detections, "relabeled": result.prompt,
                        "changed": result.changed, "keep": keep, "unsure": unsure, "reasons": reasons,
                        "weight": sample_weight(config.weighting, result.changed, detections, config.box_threshold)})
        done = i + 1
        if done % 64 == 0 or done == len(images):  # the last report says the stage finished
            stages(k, "relabel", done / len(images), f"{done}/{len(images)} images")
    return samples


def training_verdict(result, detections: list[dict], box_threshold: float,
                     min_confidence: float) -> tuple[bool, bool, list[str]]:
    """(keep, unsure, reasons) of one relabeled sample: the relabel's keep (something asked for was
    found), unless the detector is unsure of an object it calls, which IPR does not train on."""
    unsure = unsure_detections(detections, box_threshold, min_confidence) if result.keep else []
    if not unsure:
        return result.keep, False, list(result.reasons)
    return False, True, [*result.reasons, f"the detector is unsure of a {unsure[0]['label']} "
                                          f"(score {unsure[0]['score']:.2f} < {min_confidence}): not trained on"]


def confidence_bar(detector, min_confidence: float | None = None) -> float:
    """The score under which a detection counts as unsure: the one given, else the detector's own
    `confident_score` (0.9 for the shapes detector; 0, none unsure, for detectors without one)."""
    return getattr(detector, "confident_score", 0.0) if min_confidence is None else min_confidence


def unsure_detections(detections: list[dict], box_threshold: float, min_confidence: float) -> list[dict]:
    """Detections the detector calls (above the box threshold) but is unsure of (below min_confidence)."""
    return [d for d in detections if box_threshold < d["score"] < min_confidence]


def sample_weight(weighting: str, changed: bool, detections: list[dict], box_threshold: float) -> float:
    """IPR's loss factor for one sample (see MATCHED_WEIGHT / RELABELED_WEIGHT above)."""
    factor = RELABELED_WEIGHT if changed else MATCHED_WEIGHT
    if weighting == "relabel":
        return factor
    # "detector": scale by the mean confidence of the detections kept (at or above the box threshold).
    scores = [d["score"] for d in detections if d["score"] >= box_threshold]
    return factor * (sum(scores) / len(scores) if scores else 0.0)


def accumulated_training_rows(out_dir: Path, k: int, mirror: IPRConfig | None = None) -> list[dict]:
    """Training pairs of iterations 0..k, with the manual reviews applied (rejected ones dropped,
    edited prompts used); with `mirror` (the run's config), each row's "flip_text" too."""
    reviews = ReviewStore(get_settings().db_path).get_all(run_id(out_dir))
    rows = []
    for j in range(k + 1):
        reviewed = with_reviews(load_samples(out_dir, iteration=j), reviews)
        iteration_rows = training_rows(reviewed)
        if mirror is not None:
            by_id = {str(sample["id"]): sample for sample in reviewed}
            for row in iteration_rows:
                row["flip_text"] = mirrored_caption(mirror, row["text"], by_id[row["id"]], out_dir)
        rows += iteration_rows
    if not rows:
        raise InvalidInput(f"Iterations 1..{k + 1} of {out_dir} left no training pairs: every sample was "
                           f"rejected or showed nothing the prompt asked for.")
    return rows


# "left" and "right" as words, in every phrasing: "left of", "to the right of", "on the left side of".
SIDES = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def swap_sides(text: str) -> str:
    """The caption with left and right swapped ("a circle to the left of a square" -> "... right of ...")."""
    def swap(match: re.Match) -> str:
        word = "right" if match.group(1).lower() == "left" else "left"
        return word.capitalize() if match.group(1)[0].isupper() else word
    return SIDES.sub(swap, text)


def mirrored_caption(config: IPRConfig, text: str, sample: dict, run_root: Path) -> str | None:
    """The caption of a sample's image mirrored left to right (see IPRConfig.mirror): its training
    caption with left and right swapped, when the mirrored detections confirm it (relabeling it
    against them leaves it as it is); else None, and that pair is never mirrored."""
    from PIL import Image

    with Image.open(run_root / sample["image"]) as image:
        width, height = image.size
    mirrored = [{**det, "box": [width - det["box"][2], det["box"][1], width - det["box"][0], det["box"][3]]}
                for det in sample["detections"]]
    swapped = swap_sides(text)
    confirmed = relabel(swapped, mirrored, width, height, box_threshold=config.box_threshold,
                        split_colors=config.split_colors, say_relations=config.say_relations,
                        keep_framing=config.keep_framing).prompt
    return swapped if confirmed == swapped else None


def prior_folder(config: IPRConfig, out_dir: Path, should_stop=None) -> Path | None:
    """The imagefolder of prior-preservation pairs (see IPRConfig.prior_images): the user's, or for the
    shapes model `prior_images` pre-training scenes rendered once into `out_dir/prior`; None when off."""
    if config.prior_data is not None:
        return Path(config.prior_data)
    if not config.prior_images:
        return None
    from pipelines.recap import make_shapes_dataset

    make_shapes_dataset(out_dir / "prior", config.prior_images, seed=config.seed + 1, should_stop=should_stop)
    return out_dir / "prior"


def train_iteration(config: IPRConfig, rows: list[dict], folder: Path, init_adapter: Path | None, stages: Stages,
                    k: int, should_stop, prior: Path | None = None) -> dict:
    """Stage 4: fine-tune on the accumulated pairs (and the prior-preservation pairs), afresh or
    continuing the previous iteration's adapter; with `adapter_seeds` > 1, one adapter per seed,
    averaged into `folder/adapter`."""
    data_dir = folder / "train"
    data_dir.mkdir(parents=True, exist_ok=True)
    run_root = folder.parent
    write_jsonl(data_dir / "metadata.jsonl",
                 [{"file_name": str((run_root / row["file_name"]).resolve()), "text": row["text"],
                   "weight": row["weight"], **({"flip_text": row["flip_text"]} if "flip_text" in row else {})}
                  for row in rows])
    steps = iteration_steps(config, run_root, k, len(rows))
    data = [str(data_dir)] + ([str(prior)] if prior else [])
    if config.adapter_seeds == 1:
        return _train_adapter(config, data, folder / "adapter", init_adapter, steps, config.seed + k,
                              lambda f, m: stages(k, "train", f, m), should_stop, k)

    from pipelines.lora_merge import merge_experts

    n = config.adapter_seeds
    members = []
    for j in range(n):
        member = folder / f"adapter-seed{j}"
        if lora_weights_file(str(member)) is None or not (member / "done").exists():
            _train_adapter(config, data, member, None, steps, config.seed + k + 100 * j,
                           lambda f, m, j=j: stages(k, "train", (j + f) / n, f"adapter {j + 1}/{n}: {m}"),
                           should_stop, k)
            (member / "done").write_text("")
        members.append(member)
    merged = merge_experts(config.model, members, [1.0 / n] * n, folder / "adapter", combination="cat")
    return {"adapter": str(merged), "members": [str(m) for m in members]}


def trainer_config(config: IPRConfig, data: list[str], out: Path, init_adapter: Path | None, steps: int, seed: int):
    """The shared engine's settings for one adapter of an iteration."""
    from pipelines.trainer import TrainConfig

    return TrainConfig(model=config.model, data=data, out=str(out),
                       lora=config.lora, rank=config.rank, alpha=config.alpha,
                       target_modules=tuple(config.target_modules),
                       train_text_encoder=config.train_text_encoder, train_unet=config.train_unet,
                       init_lora=str(init_adapter) if init_adapter is not None else None,
                       steps=steps, batch_size=config.batch_size, lr=config.lr, random_flip=config.mirror,
                       prompt_dropout=config.prompt_dropout, ema_decay=config.ema_decay,
                       timestep_range=tuple(config.timestep_range), seed=seed)


def _train_adapter(config: IPRConfig, data: list[str], out: Path, init_adapter: Path | None, steps: int, seed: int,
                   on_progress, should_stop, k: int) -> dict:
    from pipelines.trainer import train

    result = train(trainer_config(config, data, out, init_adapter, steps, seed), on_progress=on_progress,
                   should_stop=should_stop)
    if result.get("stopped"):
        from workbench.jobs import JobCancelled

        raise JobCancelled(f"training of iteration {k + 1} was stopped; resume the run to continue it")
    return result


def mirror_safe_prior(prior: Path, folder: Path) -> Path:
    """A copy of the prior-preservation folder's metadata for mirrored training: nothing confirms a
    prior caption's left or right in the mirror image, so a caption that says a side stays unflipped
    ("flip_text": null); the others flip under their own caption."""
    from workbench.imagefolder import read_imagefolder

    _, prior_rows = read_imagefolder(prior, kind="Prior-preservation data")
    rows = [{**row, "file_name": str((prior / row["file_name"]).resolve()),
             "flip_text": None if SIDES.search(row["text"]) else row["text"]} for row in prior_rows]
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "metadata.jsonl", rows)
    return folder


def iteration_steps(config: IPRConfig, out_dir: Path, k: int, pairs: int) -> int:
    """Training steps of iteration k: `config.steps`, or with `scale_steps` as many passes over
    iteration k's accumulated pairs as iteration 1 made over its own."""
    if not config.scale_steps or k == 0:
        return config.steps
    first_pairs = len(accumulated_training_rows(out_dir, 0))
    return max(1, round(config.steps * pairs / first_pairs))


def evaluate(config: IPRConfig, adapter: Path | None, out: Path, stages: Stages, should_stop, log,
             k: int | None = None) -> dict:
    """Stage 5: the GenEval-style benchmark with the current adapter (skipped when already scored)."""
    scores_file = out / "scores.json"
    if scores_file.exists():
        return json.loads(scores_file.read_text())
    out.mkdir(parents=True, exist_ok=True)
    bench = BenchmarkConfig(model=config.model, prompts=config.eval_prompts, seeds=config.eval_seeds,
                            detector=config.detector,
                            loras=[LoraSpec(str(adapter), 1.0)] if adapter is not None else [])
    summary = run_benchmark(bench, out, on_progress=lambda f, m: stages(k, "eval", f, m), should_stop=should_stop)
    log(("base model" if k is None else f"iteration {k + 1}") + ":\n" + format_scores(summary))
    return summary


# --- bookkeeping ------------------------------------------------------------------------------------


def run_id(out_dir: Path) -> str:
    """Reviews are keyed by the run folder's name (the job id for runs started from the app)."""
    return Path(out_dir).resolve().name


def mark_reviewed(out_dir: Path, iteration: int) -> None:
    """Let a paused run continue past `iteration`'s relabels (the reviews are read at training)."""
    folder = Path(out_dir) / f"iteration-{iteration}"
    if not (folder / "samples.jsonl").exists():
        raise InvalidInput(f"{folder} has no relabeled samples to review yet.")
    (folder / "reviewed").write_text(json.dumps({"time": time.time()}))


def paused_iteration(out_dir: Path) -> int:
    """The first iteration whose relabels exist but were not marked reviewed."""
    for folder in sorted(Path(out_dir).glob("iteration-*"), key=lambda p: int(p.name.split("-")[1])):
        if (folder / "samples.jsonl").exists() and not (folder / "reviewed").exists():
            return int(folder.name.split("-")[1])
    raise InvalidInput(f"{out_dir} has no iteration waiting for review.")


def relabel_counts(samples: list[dict]) -> dict:
    """How an iteration's samples fared: matched their prompt, relabeled, dropped (nothing asked for
    was found) or left out (an object the detector is unsure of)."""
    return {"samples": len(samples), "matched": sum(not s["changed"] and s["keep"] for s in samples),
            "relabeled": sum(s["changed"] and s["keep"] for s in samples),
            "dropped": sum(not s["keep"] and not s.get("unsure") for s in samples),
            "unsure": sum(bool(s.get("unsure")) for s in samples)}


def relabel_summary(samples: list[dict]) -> str:
    c = relabel_counts(samples)
    return (f"{c['samples']} samples, {c['matched']} matched their prompt, {c['relabeled']} relabeled, "
            f"{c['dropped']} dropped (nothing asked for was found), {c['unsure']} left out (an object the "
            f"detector is unsure of)")


def read_metrics(out_dir: Path) -> list[dict]:
    path = Path(out_dir) / "metrics.jsonl"
    metrics = read_jsonl(path) if path.exists() else []
    base = Path(out_dir) / "eval-base" / "scores.json"
    if base.exists():
        scores = json.loads(base.read_text())
        metrics.insert(0, {"iteration": 0, "label": "base", "overall": scores["overall"],
                           "per_tag": {t: s["accuracy"] for t, s in scores["per_tag"].items()}})
    return metrics


def _record_metrics(out_dir: Path, k: int, rows: list[dict], scores: dict | None) -> None:
    existing = [m for m in read_metrics(out_dir) if m.get("label") != "base"]
    if any(m["iteration"] == k + 1 for m in existing):
        return
    entry = {"iteration": k + 1, "label": f"iteration {k + 1}",
             **relabel_counts(load_samples(out_dir, iteration=k)), "training_pairs": len(rows)}
    if scores is not None:
        entry["overall"] = scores["overall"]
        entry["per_tag"] = {t: s["accuracy"] for t, s in scores["per_tag"].items()}
    with open(out_dir / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps(entry) + "\n")


def _check_same_config(config: IPRConfig, out_dir: Path) -> None:
    # Review is a way of running, not part of the result; the rest must match.
    bind_run_config(out_dir, {"kind": "ipr", **asdict(config)}, "an IPR run", ignore=("review",), implied=OLDER_RUNS)


def load_config(out_dir: Path) -> IPRConfig:
    path = Path(out_dir) / "config.json"
    if not path.exists():
        raise InvalidInput(f"{out_dir} is not an IPR run (no config.json).")
    return IPRConfig.from_dict({**OLDER_RUNS, **json.loads(path.read_text())})



# --- command line -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    defaults = IPRConfig()
    parser = argparse.ArgumentParser(prog="python -m pipelines.ipr",
                                     description="Iterative Prompt Relabeling (IPR) fine-tuning.")
    parser.add_argument("--out", type=Path, required=True, help="run folder (created; reused with --resume)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out with its saved settings")
    parser.add_argument("--reviewed", action="store_true",
                        help="with --resume: the paused iteration's relabels were reviewed; train on them")
    parser.add_argument("--model", default=defaults.model)
    parser.add_argument("--iterations", type=int, default=defaults.iterations)
    parser.add_argument("--prompts", type=int, default=defaults.prompts, help="training prompts per iteration")
    parser.add_argument("--samples-per-prompt", type=int, default=defaults.samples_per_prompt)
    parser.add_argument("--prompt-kinds", nargs="+", default=defaults.prompt_kinds, metavar="KIND",
                        help="kinds of training prompt, each drawn equally often (repeat one to draw it more): "
                             + ", ".join(TRAINING_KINDS) + " (default: position, as in the paper)")
    parser.add_argument("--clause-share", type=float, default=defaults.clause_share,
                        help="share of position prompts said as a caption clause ('a circle and a square; the circle "
                             "is above the square') instead of inline")
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--lora", action="store_true", default=True, help="train a LoRA adapter (default)")
    kind.add_argument("--full", action="store_true",
                      help="fine-tune the whole UNet instead of a LoRA (needs --train-unet: IPR trains the text "
                           "encoder alone by default)")
    parser.add_argument("--rank", type=int, default=defaults.rank)
    add_target_modules_argument(parser, defaults.target_modules)
    parser.add_argument("--train-text-encoder", action=argparse.BooleanOptionalAction,
                        default=defaults.train_text_encoder, help="also train the text encoder (LoRA or full)")
    parser.add_argument("--train-unet", action=argparse.BooleanOptionalAction, default=defaults.train_unet,
                        help="train a LoRA on the UNet too; --no-train-unet (the default): the text encoder's LoRA "
                             "only, so the model learns to read prompts and draws as the base model does")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="training steps per iteration")
    parser.add_argument("--scale-steps", action=argparse.BooleanOptionalAction, default=defaults.scale_steps,
                        help="scale later iterations' steps with their accumulated pairs (same passes over the data)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--ema-decay", type=float, default=defaults.ema_decay,
                        help="save the moving average of the adapter's weights (e.g. 0.99) instead of the last step's")
    parser.add_argument("--adapter-seeds", type=int, default=defaults.adapter_seeds,
                        help="train this many adapters per iteration with different seeds and average them (model soup)")
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--continue-adapter", action="store_true",
                        help="start each iteration's adapter from the previous one instead of afresh from the base "
                             "model (either way it trains on all pairs so far)")
    parser.add_argument("--prompt-dropout", type=float, default=defaults.prompt_dropout,
                        help="share of training captions replaced by the empty prompt")
    parser.add_argument("--timestep-range", type=float, nargs=2, default=defaults.timestep_range,
                        metavar=("LOW", "HIGH"),
                        help="train on timesteps from this share of the noise schedule only (0.5 1.0: the noisier "
                             "half, where the layout is decided; default 0 1: all)")
    parser.add_argument("--prior-images", type=int, default=defaults.prior_images,
                        help="shapes model: render this many pre-training scenes and mix them into every iteration's "
                             "training set (prior preservation; not in the paper; 0: off)")
    parser.add_argument("--prior-data", default=None,
                        help="imagefolder of the model's pre-training kind of data to mix in instead (real models)")
    parser.add_argument("--weighting", choices=WEIGHTINGS, default=defaults.weighting)
    parser.add_argument("--mirror", action=argparse.BooleanOptionalAction, default=defaults.mirror,
                        help="train on mirror images too, under the captions they earn (left and right swapped; "
                             "not in the paper)")
    parser.add_argument("--literal-relabels", action="store_true",
                        help="relabels only in terms GenEval's scorer checks: no colour split, relations only where asked")
    parser.add_argument("--keep-framing", action=argparse.BooleanOptionalAction, default=defaults.keep_framing,
                        help="write each relabel inside its prompt's framing ('a photo of ... on a white background') "
                             "instead of as the bare scene")
    parser.add_argument("--box-threshold", type=float, default=defaults.box_threshold)
    parser.add_argument("--min-confidence", type=float, default=defaults.min_confidence,
                        help="drop samples with a detection scoring above the box threshold but below this "
                             "(default: the detector's own confident score, 0.9 for the shapes detector; 0: keep all)")
    parser.add_argument("--detector", default=None)
    parser.add_argument("--review", action=argparse.BooleanOptionalAction, default=None,
                        help="pause after each relabeling for a manual review (default: off; with --resume, as the "
                             "run was started)")
    parser.add_argument("--sample-guidance", type=float, default=defaults.guidance,
                        help="guidance scale for drawing the training images (default: the model's own); "
                             "evaluation always uses the model's own")
    parser.add_argument("--sample-steps", type=int, default=defaults.sample_steps,
                        help="sampling steps for the training images (default: the model's own)")
    parser.add_argument("--eval-prompts", default=defaults.eval_prompts)
    parser.add_argument("--eval-seeds", type=int, default=defaults.eval_seeds)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.reviewed and not args.resume:
        parser.error("--reviewed marks the paused iteration of an existing run: use it with --resume")
    if args.resume:
        refuse_settings_with_resume(parser, args, allowed=("reviewed", "review"))
    try:
        if args.resume:
            config = load_config(args.out)
            if args.review is not None:  # else the run keeps pausing as it was started
                config.review = args.review
            if args.reviewed:
                mark_reviewed(args.out, paused_iteration(args.out))
        else:
            config = IPRConfig(model=args.model, iterations=args.iterations, prompts=args.prompts,
                               samples_per_prompt=args.samples_per_prompt, prompt_kinds=args.prompt_kinds,
                               clause_share=args.clause_share,
                               lora=not args.full, rank=args.rank, alpha=float(args.rank),
                               target_modules=list(parse_target_modules(args.target_modules)),
                               train_text_encoder=args.train_text_encoder, train_unet=args.train_unet,
                               steps=args.steps,
                               scale_steps=args.scale_steps, ema_decay=args.ema_decay,
                               adapter_seeds=args.adapter_seeds,
                               batch_size=args.batch_size, lr=args.lr, prompt_dropout=args.prompt_dropout,
                               timestep_range=list(args.timestep_range),
                               prior_images=args.prior_images, prior_data=args.prior_data, weighting=args.weighting,
                               mirror=args.mirror,
                               split_colors=not args.literal_relabels,
                               say_relations=not args.literal_relabels, keep_framing=args.keep_framing,
                               continue_adapter=args.continue_adapter,
                               box_threshold=args.box_threshold, min_confidence=args.min_confidence,
                               detector=args.detector, review=bool(args.review),
                               guidance=args.sample_guidance, sample_steps=args.sample_steps,
                               eval_prompts=args.eval_prompts, eval_seeds=args.eval_seeds, seed=args.seed)
        result = run_ipr(config, args.out, on_progress=ConsoleProgress(), log=lambda m: print(m, flush=True))
    except WorkbenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"stopped: finished stages and checkpoints are kept in {args.out}; continue with "
              f"`python -m pipelines.ipr --out {args.out} --resume`", file=sys.stderr)
        return 130
    if result["status"] == "awaiting_review":
        print(f"Paused for review of iteration {result['iteration'] + 1}: review it in the app's Review tab, "
              f"then run `python -m pipelines.ipr --out {args.out} --resume --reviewed`.")
    else:
        print(f"done: adapter {result['adapter']} ({result['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
