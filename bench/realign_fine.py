"""RealignDiff's fine stage on ShapesBench: plain generation vs the fine stage, same prompts and seeds.

For every prompt of the chosen tags and every seed: the plain image, then the fine stage's regions found in it
(`pipelines.realign_fine.find_regions`) and the image regenerated with the same seed under the attention
modulation. Both are scored with the benchmark's detector and GenEval rules (as `python -m workbench eval`
scores them). Prints a per-tag table (plain, fine stage, difference, images fixed and broken) and the run time.
The issue's target: +10 points on color_attr over the same seeds without modulation.

    python bench/realign_fine.py [--model shapes] [--tags color_attr] [--seeds 4] [--first-seed 0]
                                 [--strength 1.0 ...] [--edges neutral] [--time-power 1] [--layers up_blocks ...]
                                 [--out DIR]

Several --strength values are measured on the same plain images and regions (strength 0 reproduces plain).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.realign_fine import FineStageConfig, Perception, find_regions  # noqa: E402
from workbench.attention_modulation import modulated_generation  # noqa: E402
from workbench.benchmark import SHAPESBENCH, BenchmarkConfig, pick_detector  # noqa: E402
from workbench.evaluation import load_prompt_file, score_detections  # noqa: E402
from workbench.registry import load_pipeline  # noqa: E402
from workbench.significance import paired_differences  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--prompts", default=str(SHAPESBENCH))
    parser.add_argument("--tags", nargs="+", default=["color_attr"], help="prompt tags to run ('all': every tag)")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    parser.add_argument("--strength", type=float, nargs="+", default=[1.0])
    parser.add_argument("--time-power", type=float, default=1.0)
    parser.add_argument("--edges", choices=("neutral", "outside"), default="neutral")
    parser.add_argument("--layers", nargs="+", default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None, help="write the per-image verdicts (verdicts.jsonl) here")
    args = parser.parse_args()

    started = time.time()
    records = [r for r in load_prompt_file(args.prompts) if "all" in args.tags or r["tag"] in args.tags]
    if not records:
        raise SystemExit(f"no prompt of the tags {args.tags} in {args.prompts}")
    pipe = load_pipeline(args.model)
    config = FineStageConfig(model=args.model, time_power=args.time_power, layers=args.layers)
    perception = Perception.load(config)
    detector = pick_detector(BenchmarkConfig(model=args.model, prompts=args.prompts))
    seed_range = range(args.first_seed, args.first_seed + args.seeds)
    items = [(record, seed) for record in records for seed in seed_range]
    batches = [items[i:i + args.batch_size] for i in range(0, len(items), args.batch_size)]

    rows = []
    seconds = {"plain": 0.0, "regions": 0.0, "fine": 0.0}
    for batch in batches:
        prompts, seeds = [r["prompt"] for r, _ in batch], [s for _, s in batch]
        clock = time.time()
        plain, _ = modulated_generation(pipe, prompts, None, seeds)
        seconds["plain"] += time.time() - clock
        clock = time.time()
        plans = [find_regions(image, prompt, pipe.tokenizer, perception, config.min_score)
                 for image, prompt in zip(plain, prompts)]
        seconds["regions"] += time.time() - clock
        fine = {}
        for strength in args.strength:
            clock = time.time()
            fine[strength], _ = modulated_generation(pipe, prompts, [p.regions for p in plans], seeds, strength,
                                                     time_power=args.time_power, layers=args.layers, edges=args.edges)
            seconds["fine"] += time.time() - clock
        for k, (record, seed) in enumerate(batch):
            row = {"tag": record["tag"], "prompt": record["prompt"], "seed": seed,
                   "regions": {p: len(t) for p, t in plans[k].regions.phrases.items()},
                   "plain": score_detections(record, detector.detect(plain[k])).correct}
            for strength in args.strength:
                row[f"fine@{strength:g}"] = score_detections(record, detector.detect(fine[strength][k])).correct
            rows.append(row)
        print(f"{len(rows)}/{len(items)} images", file=sys.stderr, flush=True)

    print(f"model={args.model} prompts={len(records)} seeds={seed_range.start}..{seed_range.stop - 1} images={len(items)} "
          f"edges={args.edges} time_power={args.time_power} layers={args.layers or 'all cross-attention'} "
          f"threads={torch.get_num_threads()}")
    print(format_table(rows, args.strength))
    print(intervals(rows, args.strength))
    modulated = sum(1 for row in rows if any(row["regions"].values()))
    print(f"images with regions to modulate: {modulated}/{len(rows)}")
    total = time.time() - started
    print(f"run time {total:.1f} s: plain generation {seconds['plain']:.1f} s, tags/LLM/Grounded-SAM "
          f"{seconds['regions']:.1f} s, modulated generation {seconds['fine']:.1f} s "
          f"({len(args.strength)} strength(s))")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "verdicts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def format_table(rows: list[dict], strengths: list[float]) -> str:
    lines = [f"{'tag':<14} {'images':>6} {'plain':>7} " + " ".join(
        f"{'S=' + format(s, 'g'):>7} {'diff':>6} {'fixed':>5} {'broke':>5}" for s in strengths)]
    for tag in dict.fromkeys(row["tag"] for row in rows):
        tagged = [row for row in rows if row["tag"] == tag]
        plain = sum(row["plain"] for row in tagged) / len(tagged)
        cells = []
        for s in strengths:
            key = f"fine@{s:g}"
            fine = sum(row[key] for row in tagged) / len(tagged)
            fixed = sum(row[key] and not row["plain"] for row in tagged)
            broke = sum(row["plain"] and not row[key] for row in tagged)
            cells.append(f"{fine:>7.1%} {100 * (fine - plain):>+6.1f} {fixed:>5} {broke:>5}")
        lines.append(f"{tag:<14} {len(tagged):>6} {plain:>7.1%} " + " ".join(cells))
    return "\n".join(lines)


def intervals(rows: list[dict], strengths: list[float]) -> str:
    """Each strength's difference from plain generation, with the paired 95% CI and p-value of
    `workbench.significance` (prompts redrawn with all their seeds)."""
    index = {prompt: k for k, prompt in enumerate(dict.fromkeys(row["prompt"] for row in rows))}
    plain = [{"index": index[row["prompt"]], "seed": row["seed"], "tag": row["tag"], "correct": row["plain"]}
             for row in rows]
    lines = []
    for s in strengths:
        fine = [{**p, "correct": row[f"fine@{s:g}"]} for p, row in zip(plain, rows)]
        for d in paired_differences(plain, fine):
            lines.append(f"S={s:g} {d.tag:<14} {d.summary_text()} p {d.p_value:.2g}")
    return "paired 95% CI, modulated minus plain:\n" + "\n".join(lines)


if __name__ == "__main__":
    main()
