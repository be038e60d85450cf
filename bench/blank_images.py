"""How often does a model draw nothing at all for a single-object prompt, at several guidance scales?

A fine-tune on one kind of image (IPR's or SELMA's own two-object samples) can move the unconditional
prediction that classifier-free guidance subtracts; guidance then erases objects where the
unconditional branch expects them, and single-object prompts come out blank. Blank at guidance 7.5
but not at 1 points at the unconditional branch, not at the prompt's own prediction.

An image is blank when no pixel is darker than `--threshold` in grey (the shapes world draws
saturated shapes on a near-white background). Prints one line per (adapter, guidance).

    python bench/blank_images.py [--model shapes] [--lora PATH[:WEIGHT]] [--seeds 8] [--guidance 7.5 4 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workbench.generation import GenerationRequest, LoraSpec, generate  # noqa: E402

PROMPTS = ("a circle", "a photo of a circle", "a triangle", "one square")


def is_blank(image, threshold: int) -> bool:
    return int(np.asarray(image.convert("L")).min()) > threshold


def count_blanks(model: str, loras: list[LoraSpec], guidance: float, seeds: int, threshold: int) -> tuple[int, int]:
    blank = total = 0
    for prompt in PROMPTS:
        request = GenerationRequest(prompt, model=model, seeds=list(range(seeds)), guidance=guidance, loras=loras)
        for result in generate(request):
            blank += is_blank(result.image, threshold)
            total += 1
    return blank, total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--lora", action="append", default=[], help="PATH[:WEIGHT]; repeatable (each alone)")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--guidance", type=float, nargs="+", default=[7.5, 4.0, 1.0])
    parser.add_argument("--threshold", type=int, default=200)
    args = parser.parse_args(argv)
    variants = [("base", [])] + [(text, [LoraSpec.parse(text)]) for text in args.lora]
    for name, loras in variants:
        for guidance in args.guidance:
            started = time.time()
            blank, total = count_blanks(args.model, loras, guidance, args.seeds, args.threshold)
            print(f"{name}  guidance {guidance:g}: blank {blank}/{total} ({time.time() - started:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
