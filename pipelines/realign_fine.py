"""RealignDiff's fine stage, training-free (Huang et al., "RealignDiff: Boosting Text-to-Image Diffusion Model
with Coarse-to-fine Semantic Re-alignment", arXiv 2305.19599, Sec. 3.3, eqs. 7-10).

    python -m pipelines.realign_fine --model shapes --prompt "an orange square and a red circle" --seed 0 --out DIR

Read top to bottom in `realign_fine` (steps 2-5 in `find_regions`, which the bench shares):

1. generate the image for the prompt and seed;
2. tag it (a Tagger) and let an LLM score each tag against the prompt: 2 certain, 0.5 possible, 0 unlikely;
3. find the objects with Grounded-SAM (a detector, then a segmenter on each box);
4. write a local caption for each object the prompt names (the LLM: "circle" -> "a red circle");
5. give each local caption's words (their tokens in the prompt) the mask of its object;
6. generate again with the same seed, the cross-attention modulated towards those regions
   (`workbench.attention_modulation`).

Which object gets which caption (step 4-5), exactly:
* an object class is realigned when the detector finds it (score >= min_score) and its class tag scored above 0
  (2 or 0.5: the prompt names or allows that class);
* its region is the union of the masks of every detection of that class, whatever colour each was drawn in
  (the prompt's attributes are meant for every object of the class it names);
* the class's local caption is looked up in the prompt (`token_regions`: as a run of words, else word by word;
  function words get no region), and each of its words' tokens gets that region;
* tags scored 0 (unlikely: a wrong colour such as "blue circle" for "a red circle", or a class the prompt does
  not name) get no tokens. That is how the modulation suppresses them: the prompt's own attribute is pulled
  into the wrongly drawn object, and every region's tokens are pushed out of objects of unnamed classes and of
  the background. Objects the prompt names but the image lacks get no region (the fine stage edits what is
  drawn; a missing object is the coarse stage's job).

Outputs in --out: original.png, realigned.png, result.json (tags, scores, captions, detections, which tokens
got which mask), masks/<object>.png and attention.png (per-token cross-attention maps before and after the
modulation, from the realigned run) with the raw maps in attention.npz.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from workbench.attention_modulation import (AttentionCapture, TokenRegions, attention_map_image, check_layers,
                                            modulated_generation, token_regions)
from workbench.errors import InvalidInput, ModelNotAvailable, WorkbenchError
from workbench.evaluation import THRESHOLD
from workbench.store import check_output_folder, refuse_run_folder


@dataclass
class FineStageConfig:
    model: str = "shapes"
    # Backends by name; None: the model's own world (the shapes model -> "shapes" for each), otherwise
    # RAM when installed (else a CLIP tagger), GroundingDINO + SAM and a local LLM from disk.
    llm: str | None = None
    tagger: str | None = None
    detector: str | None = None
    segmenter: str | None = None
    strength: float = 1.0  # S of eq. 8; 0 regenerates the original image exactly
    time_power: float = 1.0  # lambda_t = (t / T) ** time_power
    edges: str = "neutral"  # cells a region covers in part: "neutral" (left alone) or "outside" (eq. 8)
    layers: list[str] | None = None  # UNet layer name prefixes to modulate; None: every cross-attention layer
    min_score: float = THRESHOLD  # detections below it are not objects (the scorer's own threshold)
    steps: int | None = None
    guidance: float | None = None
    capture_resolution: int | None = None  # grid height of the captured maps' layers; None: all layers

    def validate(self) -> None:
        """InvalidInput for settings that would fail late or, worse, write a wrong image without a word."""
        checks = [
            (math.isfinite(self.strength) and self.strength >= 0,
             f"The strength S must be a number of 0 or more (got {self.strength})."),
            (math.isfinite(self.time_power) and self.time_power > 0,
             f"The time power must be a positive number (got {self.time_power})."),
            (self.edges in ("neutral", "outside"), f"edges must be neutral or outside (got {self.edges!r})."),
            (self.steps is None or self.steps >= 1, f"Steps must be at least 1 (got {self.steps})."),
            (self.guidance is None or 0 <= self.guidance <= 50,
             f"Guidance must be between 0 and 50 (got {self.guidance}), as for generating."),
            (self.layers is None or len(self.layers) > 0, "Name at least one layer to modulate, or none for all."),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidInput(message)


def backend_names(config: FineStageConfig) -> dict[str, str]:
    from workbench.perception.backends import default_real_tagger
    from workbench.registry import resolve

    if resolve(config.model).world == "shapes":
        defaults = {"llm": "shapes", "tagger": "shapes", "detector": "shapes", "segmenter": "shapes"}
    else:
        defaults = {"llm": "transformers", "tagger": config.tagger or default_real_tagger(),
                    "detector": "groundingdino", "segmenter": "sam"}
    return {kind: getattr(config, kind) or name for kind, name in defaults.items()}


@dataclass
class Perception:
    """The models the fine stage reads images and prompts with."""

    llm: object
    tagger: object
    grounded: object  # GroundedSam

    @classmethod
    def load(cls, config: FineStageConfig) -> "Perception":
        from workbench.llm import get_llm
        from workbench.perception.backends import check_all, check_backend, get_grounded_sam, get_tagger

        names = backend_names(config)
        # Everything missing in one message (the real defaults need four downloads), not one per rerun:
        # the perception backends are checked without loading, then the LLM loads or says what is missing.
        problems = []
        try:
            check_all([lambda kind=kind: check_backend(kind, names[kind]) for kind in ("tagger", "detector", "segmenter")])
        except ModelNotAvailable as error:
            problems.append(str(error))
        try:
            llm = get_llm(names["llm"])
        except ModelNotAvailable as error:
            problems.append(str(error))
        if problems:
            raise ModelNotAvailable("\n".join(problems))
        return cls(llm, get_tagger(names["tagger"]), get_grounded_sam(names["detector"], names["segmenter"]))


@dataclass
class RegionPlan:
    """What the fine stage found in one image and which prompt tokens it gives which region."""

    tags: list  # perception.base.Tag, best first
    scores: dict[str, float]  # tag -> 2 / 0.5 / 0
    objects: list[str]  # classes realigned (detected, tag scored above 0)
    captions: dict[str, str]  # object -> local caption
    detections: list  # grounded_sam.SegmentedDetection, best first
    object_detections: dict[str, list[int]]  # object -> indices into detections whose masks make its region
    masks: dict[str, np.ndarray]  # object -> its region
    regions: TokenRegions
    suppressed: list[str] = field(default_factory=list)  # tags scored 0

    def to_dict(self) -> dict:
        regions = self.regions.to_dict()
        return {
            "tags": [{"name": t.name, "confidence": float(t.score), "llm_score": self.scores.get(t.name)}
                     for t in self.tags],
            "suppressed_tags": self.suppressed,
            "objects": self.objects,
            "local_captions": self.captions,
            "detections": [{**d.detection.to_dict(), "object": next((o for o, ks in self.object_detections.items()
                                                                     if k in ks), None)}
                           for k, d in enumerate(self.detections)],
            "regions": [{"object": name, "caption": self.captions[name], "mask": f"masks/{name}.png",
                         "area": float(self.masks[name].mean()),
                         "tokens": regions["phrases"].get(self.captions[name], {}).get("tokens", {}),
                         "missing_words": regions["missing"].get(self.captions[name], [])}
                        for name in self.masks],
        }


def find_regions(image: Image.Image, prompt: str, tokenizer, perception: Perception,
                 min_score: float = THRESHOLD) -> RegionPlan:
    """Steps 2-5: tags and their scores, objects and their masks, local captions, tokens -> regions."""
    from workbench.llm import local_captions, score_tags

    # 2. What the image shows, and what of it the prompt asked for.
    tags = perception.tagger.tag(image)
    scores = score_tags(perception.llm, prompt, [t.name for t in tags]) if tags else {}

    # 3. Grounded-SAM on every tag, so that each tagged thing gets its box and mask.
    detections = [d for d in perception.grounded.detect_and_segment(image, [t.name for t in tags] or None)
                  if d.detection.score >= min_score]

    # 4. Objects the prompt names (their class tag scored 2 or 0.5) get the prompt's caption of them.
    objects = list(dict.fromkeys(d.detection.label for d in detections if scores.get(d.detection.label, 0) > 0))
    captions = local_captions(perception.llm, prompt, objects) if objects else {}

    # 5. Each caption's words in the prompt get the union of its class's masks.
    object_detections = {name: [k for k, d in enumerate(detections) if d.detection.label == name] for name in objects}
    masks = {name: np.logical_or.reduce([detections[k].mask for k in ks]) for name, ks in object_detections.items()}
    phrases: dict[str, np.ndarray] = {}
    for name in objects:  # two objects with the same caption share one region
        caption = captions[name]
        phrases[caption] = phrases[caption] | masks[name] if caption in phrases else masks[name]
    regions = token_regions(tokenizer, prompt, phrases)
    return RegionPlan(tags, scores, objects, captions, detections, object_detections, masks, regions,
                      suppressed=[name for name, score in scores.items() if score == 0])


def realign_fine(prompt: str, seed: int, out_dir: Path | None = None, config: FineStageConfig | None = None,
                 perception: Perception | None = None, log=print,
                 on_progress: Callable[[float, str], None] | None = None) -> dict:
    """Generate, find what to realign, regenerate under the modulation; write the outputs to `out_dir`.

    on_progress(fraction, stage) is called as each stage starts (the UI shows it while a real model works).

    Returns result.json's content plus the two images ("original", "realigned"), the RegionPlan ("plan") and
    the AttentionCapture of the realigned run ("capture").
    """
    from workbench.registry import load_pipeline

    from workbench.prompt_parser import check_prompt

    config = config or FineStageConfig()
    config.validate()
    if not 0 <= seed < 2**32:
        raise InvalidInput(f"The seed must be between 0 and {2**32 - 1} (got {seed}).")
    check_prompt(prompt)  # the LLM step's limits, before any image is drawn
    if out_dir is not None:
        _check_out_dir(check_output_folder(out_dir), prompt, seed)
    started = time.time()
    progress = on_progress or (lambda fraction, stage: None)
    progress(0.0, "loading the model and the perception models")
    pipe = load_pipeline(config.model)
    check_layers(pipe.unet, config.layers)
    perception = perception or Perception.load(config)
    sampling = dict(steps=config.steps, guidance=config.guidance)

    # 1. The image as the model draws it.
    progress(0.2, f"generating the original image (seed {seed})")
    [original], _ = modulated_generation(pipe, prompt, None, seed, **sampling)
    log(f"generated the original image (seed {seed})")

    # 2-5. Tags, scores, objects, masks, local captions, and the region of each of their tokens.
    progress(0.45, "tagging the image, scoring the tags with the LLM, finding and segmenting the objects")
    plan = find_regions(original, prompt, pipe.tokenizer, perception, config.min_score)
    log(f"tags {plan.scores}; realigning {plan.captions or 'nothing'}")

    # 6. The same seed again, the cross-attention pulled towards the objects' regions.
    progress(0.65, "regenerating the same seed with the cross-attention modulated")
    capture = AttentionCapture(resolution=config.capture_resolution)
    [realigned], capture = modulated_generation(pipe, prompt, plan.regions, seed, config.strength, capture,
                                                time_power=config.time_power, layers=config.layers, edges=config.edges,
                                                **sampling)
    result = {"prompt": prompt, "seed": seed, "config": asdict(config), "backends": backend_names(config),
              **plan.to_dict(), "seconds": round(time.time() - started, 2)}
    if out_dir is not None:
        _write(Path(out_dir), original, realigned, plan, capture, pipe.tokenizer, result)
        log(f"wrote {out_dir}")
    return {**result, "original": original, "realigned": realigned, "plan": plan, "capture": capture}


def prompt_tokens(tokenizer, prompt: str) -> dict[int, str]:
    """Token index -> text for the prompt's own tokens (no start/end/padding), as the text encoder sees them."""
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length)["input_ids"]
    special = set(tokenizer.all_special_ids)
    return {k: tokenizer.convert_ids_to_tokens(i).replace("</w>", "") for k, i in enumerate(ids) if i not in special}


def _check_out_dir(out_dir: Path, prompt: str, seed: int) -> None:
    """Refuse a folder holding another run (of any kind), or the fine stage of another prompt or seed, whose
    masks would stay beside the new ones; the same prompt and seed again may redo it."""
    refuse_run_folder(out_dir, "the fine stage")
    try:
        earlier = json.loads((out_dir / "result.json").read_text())
    except OSError:
        return  # none there
    except ValueError:
        earlier = {}
    if (earlier.get("prompt"), earlier.get("seed")) != (prompt, seed):
        raise InvalidInput(f"{out_dir} holds the fine stage of another prompt or seed; give a new folder.")


def _write(out_dir: Path, original, realigned, plan: RegionPlan, capture: AttentionCapture, tokenizer,
           result: dict) -> None:
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    original.save(out_dir / "original.png")
    realigned.save(out_dir / "realigned.png")
    for name, mask in plan.masks.items():
        Image.fromarray(mask.astype(np.uint8) * 255, "L").save(out_dir / "masks" / f"{name}.png")
    tokens = prompt_tokens(tokenizer, result["prompt"])
    attention_map_image(capture, tokens).save(out_dir / "attention.png")
    np.savez_compressed(out_dir / "attention.npz", before=capture.before[0], after=capture.after[0],
                        tokens=np.array([f"{k}:{t}" for k, t in tokens.items()]))
    (out_dir / "result.json").write_text(json.dumps(result, indent=2))


# --- command line -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    defaults = FineStageConfig()
    parser = argparse.ArgumentParser(prog="python -m pipelines.realign_fine", description="RealignDiff's fine stage: attention modulation towards "
                                                 "the objects' masks, training-free.")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default=defaults.model)
    parser.add_argument("--strength", type=float, default=defaults.strength, help="S of eq. 8 (0: no change)")
    parser.add_argument("--time-power", type=float, default=defaults.time_power,
                        help="lambda_t = (t / T) ** p; 1 is the paper's linear fade")
    parser.add_argument("--edges", choices=("neutral", "outside"), default=defaults.edges,
                        help="grid cells a mask covers in part: left alone (neutral) or pushed out as eq. 8 does")
    parser.add_argument("--layers", nargs="+", default=None,
                        help="UNet layer name prefixes to modulate (e.g. up_blocks); default: all cross-attention")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=None)
    for kind in ("llm", "tagger", "detector", "segmenter"):
        parser.add_argument(f"--{kind}", default=None, help=f"{kind} backend (default: the model's own world)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = FineStageConfig(model=args.model, llm=args.llm, tagger=args.tagger, detector=args.detector,
                             segmenter=args.segmenter, strength=args.strength, time_power=args.time_power, edges=args.edges,
                             layers=args.layers, steps=args.steps, guidance=args.guidance)
    try:
        result = realign_fine(args.prompt, args.seed, args.out, config)
    except WorkbenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
        return 130
    print(f"done in {result['seconds']} s: {args.out / 'original.png'} -> {args.out / 'realigned.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
