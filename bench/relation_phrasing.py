"""Does a model know how relations are phrased? ShapesBench's position prompts as GenEval writes them
("a circle above a triangle") against the same scenes as a caption clause ("a circle and a triangle;
the circle is above the triangle", the way the shapes world's captions and alt text state relations).

Same scenes (the GenEval metadata is unchanged), same seeds; only the wording differs. Prints, for
each phrasing, the position accuracy and the share of images that show both named objects at all.
A model that draws both objects for one phrasing and not for the other has not learned the phrasing,
whatever it knows about space; IPR can only relabel relations in images that show both objects.

    python bench/relation_phrasing.py [--model shapes] [--lora PATH[:WEIGHT]] [--seeds 4] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workbench.benchmark import SHAPESBENCH, BenchmarkConfig, run_benchmark  # noqa: E402
from workbench.evaluation import load_prompt_file  # noqa: E402
from workbench.generation import LoraSpec  # noqa: E402
from workbench.shapes.captions import CAPTION_RELATION_PHRASE  # noqa: E402
from workbench.shapes.world import article  # noqa: E402


def _noun(clause: dict) -> str:
    return f"{clause['color']} {clause['class']}" if clause.get("color") else clause["class"]


def clause_form(record: dict) -> str:
    """The record's scene as a caption states it: both objects, then the relation as a clause."""
    target, subject = record["include"][0], record["include"][1]
    relation = CAPTION_RELATION_PHRASE[subject["position"][0]]
    return (f"{article(_noun(subject))} {_noun(subject)} and {article(_noun(target))} {_noun(target)}; "
            f"the {_noun(subject)} is {relation} the {_noun(target)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--lora", action="append", default=[], metavar="PATH[:WEIGHT]")
    parser.add_argument("--prompts", default=str(SHAPESBENCH))
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None, help="keep both evaluations here (default: a temp folder)")
    args = parser.parse_args()

    records = [r for r in load_prompt_file(args.prompts)
               if r["tag"] == "position" and len(r["include"]) == 2 and "position" in r["include"][1]]
    if not records:
        raise SystemExit(f"no two-object position prompt in {args.prompts}")
    loras = [LoraSpec.parse(text) for text in args.lora]
    out = args.out or Path(tempfile.mkdtemp(prefix="relation-phrasing-"))
    started = time.time()
    print(f"{len(records)} position prompts x {args.seeds} seeds, model {args.model}"
          f"{' + ' + ', '.join(args.lora) if args.lora else ''}")
    print(f"{'phrasing':<8} {'example':<58} {'position':>9} {'both drawn':>11}")
    for name, rewrite in (("inline", lambda r: r["prompt"]), ("clause", clause_form)):
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        prompt_file = folder / "prompts.jsonl"
        prompt_file.write_text("".join(json.dumps({**r, "prompt": rewrite(r)}) + "\n" for r in records))
        summary = run_benchmark(BenchmarkConfig(model=args.model, loras=loras, prompts=str(prompt_file),
                                                seeds=args.seeds), folder)
        verdicts = [json.loads(line) for line in (folder / "verdicts.jsonl").read_text().splitlines()]
        both = sum(bool(v["ok_objects"]) for v in verdicts) / len(verdicts)
        print(f"{name:<8} {rewrite(records[0]):<58} {summary['per_tag']['position']['accuracy']:>9.1%} {both:>11.1%}")
    print(f"{time.time() - started:.1f} s; images and verdicts in {out}")


if __name__ == "__main__":
    main()
