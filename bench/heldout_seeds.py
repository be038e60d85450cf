"""Do the shipped adapters' gains hold on seeds, or prompts, that no run's own evaluation drew?

Every pipeline scores ShapesBench on seeds 0..3, and every setting in the adapter cards was chosen on
those images. This scores the base model and each adapter on the next seeds instead (default 4..7;
`workbench eval --first-seed`), keeps each evaluation in OUT/<name>/ (an existing one is reused, so a
stopped run continues), and prints the per-tag table with every adapter's gain over the base, its 95%
CI and paired p-value (`workbench.significance`).

    python bench/heldout_seeds.py [--adapter NAME=PATH[:WEIGHT] ...] [--first-seed 4] [--seeds 4]
                                  [--prompts shapesbench|heldout|FILE] [--out data/runs/heldout]
                                  [--against base|NAME]

Without --adapter it scores the four shipped adapters in assets/adapters/ and RECAP's alt-text twin;
`--against recap-alt-text` measures every gain from that twin instead of the base (RECAP's target).
`--prompts heldout` scores ShapesBench's six tasks in other wordings (and color_attr's other colour
pairs), none of them a ShapesBench prompt (assets/prompts/shapesbench-heldout.jsonl, from
`bench_prompts.heldout_prompts`); with `--first-seed 0` that is new prompts on the usual seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workbench.benchmark import BenchmarkConfig, run_benchmark  # noqa: E402
from workbench.config import get_settings  # noqa: E402
from workbench.generation import LoraSpec  # noqa: E402
from workbench.shapes.bench_prompts import HELDOUT_PATH, SHAPESBENCH_PATH, TAGS  # noqa: E402
from workbench.significance import paired_differences  # noqa: E402

SHIPPED = {name: f"assets/adapters/{name}-shapes:1.0" for name in ("ipr", "selma", "recap", "refl")}
SHIPPED["recap-alt-text"] = "assets/adapters/recap-shapes/alt-text:1.0"  # RECAP's target is measured against it


def evaluate(name: str, loras: list[LoraSpec], first_seed: int, seeds: int, out: Path,
             prompts: Path = SHAPESBENCH_PATH) -> dict:
    folder = out / name
    config = BenchmarkConfig(model="shapes", loras=loras, seeds=seeds, first_seed=first_seed, prompts=str(prompts))
    if (folder / "scores.json").is_file():
        saved = json.loads((folder / "scores.json").read_text())
        # Reuse only an evaluation of the same adapters on the same seeds; a stale folder would
        # otherwise slip other images into the table.
        asked = config.to_dict()
        if all(saved["config"].get(key) == asked[key] for key in ("loras", "seeds", "first_seed", "prompts")):
            return saved
        raise SystemExit(f"{folder} holds an evaluation with other adapters, seeds or prompts; "
                         f"give another --out or remove that folder.")
    started = time.time()
    summary = run_benchmark(config, folder)
    print(f"  {name}: {100 * summary['overall']:.1f} overall ({time.time() - started:.0f} s)", flush=True)
    return summary


def row(name: str, summary: dict, folder: Path | None = None, reference: Path | None = None) -> str:
    cells = [100 * summary["per_tag"][tag]["accuracy"] for tag in TAGS] + [100 * summary["overall"]]
    text = " | ".join(f"{value:.1f}" for value in cells)
    gain = " |"
    if reference is not None and reference != folder:
        # The overall gain with its 95% CI and paired p-value (workbench.significance: prompts redrawn
        # with all their seeds), so a gain is read against the noise of these images.
        overall = paired_differences(eval_rows(reference), eval_rows(folder))[-1]
        gain = f" | {overall.summary_text()}, p {overall.p_value:.2g} |"
    return f"| {name} | {text}{gain}"


def eval_rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "verdicts.jsonl").read_text().splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH[:WEIGHT]")
    parser.add_argument("--first-seed", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--prompts", default="shapesbench", help="shapesbench, heldout or a GenEval metadata file")
    parser.add_argument("--out", type=Path, default=get_settings().runs_dir / "heldout",
                        help="evaluations folder (default: runs/heldout in $WORKBENCH_DATA)")
    parser.add_argument("--against", default="base",
                        help="the variant every gain is measured from (e.g. recap-alt-text for RECAP's target)")
    args = parser.parse_args()
    adapters = dict(text.split("=", 1) for text in args.adapter) if args.adapter else SHIPPED
    if args.prompts == "shapesbench":
        prompts = SHAPESBENCH_PATH
    elif args.prompts == "heldout":
        prompts = HELDOUT_PATH
    else:
        prompts = Path(args.prompts)

    print(f"{prompts.name} on seeds {args.first_seed}..{args.first_seed + args.seeds - 1}, evaluations in {args.out}")
    base = evaluate("base", [], args.first_seed, args.seeds, args.out, prompts)
    scores = {"base": base}
    scores.update({name: evaluate(name, [LoraSpec.parse(spec)], args.first_seed, args.seeds, args.out, prompts)
                   for name, spec in adapters.items()})
    if args.against not in scores:
        raise SystemExit(f"--against {args.against}: no such variant; choose one of {', '.join(scores)}")
    print("\n| variant | " + " | ".join(TAGS) + f" | overall | gain over {args.against} [95% CI], p |")
    print("|---" * (len(TAGS) + 3) + "|")
    for name, summary in scores.items():
        print(row(name, summary, args.out / name, args.out / args.against))


if __name__ == "__main__":
    main()
