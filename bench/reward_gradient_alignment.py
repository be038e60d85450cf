"""Does the caption reward's pixel gradient change what an image shows, or only what the captioner reads?

ReFL moves a model along the reward's gradient on its images. That helps only if climbing the reward
in pixel space changes the image's content (a second object appears, a colour moves to the right
shape), and not if it finds a small adversarial pattern that fools the captioner. This script asks
the question directly, without any diffusion model in the loop: it takes the images a finished
ShapesBench evaluation scored wrong, climbs the reward on their pixels by normalised gradient steps
inside an L2 ball of radius eps around each image (pixels in [-1, 1]; 64x64x3 values, so eps 8 is an
RMS change of 0.07 per value, eps 32 of 0.29), and scores the edited images again with the
benchmark's own detector and verdict. Printed per radius: the mean reward before and after, and the
share of wrong images the edit made right. A reward with perceptually aligned gradients turns some
wrong images right as eps grows; an adversarially fragile one gains reward with nothing flipped.

    python bench/reward_gradient_alignment.py --eval data/runs/RUN/eval-base [--captioner FOLDER ...]
        [--ensemble] [--negatives 4] [--per-tag 30] [--eps 4 16 32]

With --ensemble the captioners given are also climbed together, as one reward: the mean of theirs
(`workbench.likelihood_reward.EnsembleReward`, ReFL's --reward-ensemble).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.train_shapes_captioner import adversarial_images  # noqa: E402
from workbench.evaluation import score_detections  # noqa: E402
from workbench.likelihood_reward import get_likelihood_reward  # noqa: E402
from workbench.perception.shapes import ShapesDetector  # noqa: E402


def pixels(path: Path) -> torch.Tensor:
    array = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


def to_image(x: torch.Tensor) -> Image.Image:
    array = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def score(reward, x: torch.Tensor, prompts: list[str], seed: int) -> torch.Tensor:
    """The reward of each image; a contrastive reward draws its hard negatives from `seed`, so every
    call on the same prompts (each climbing step, before and after) contrasts with the same ones."""
    return reward(x, prompts, rng=np.random.default_rng(seed)) if hasattr(reward, "k") else reward(x, prompts)


def climb(reward, images: torch.Tensor, prompts: list[str], eps: float, steps: int, seed: int) -> torch.Tensor:
    """images moved up the reward by `steps` normalised gradient steps, kept within L2 radius eps."""
    return adversarial_images(images, lambda x: score(reward, x, prompts, seed).sum(), eps, steps)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--eval", type=Path, required=True, help="a ShapesBench evaluation folder")
    parser.add_argument("--captioner", action="append", default=None,
                        help="captioner folder (repeatable; default: the shipped one)")
    parser.add_argument("--negatives", type=int, default=4, help="hard negatives of the contrastive reward (0: plain)")
    parser.add_argument("--per-tag", type=int, default=30, help="wrong images per tag")
    parser.add_argument("--eps", type=float, nargs="+", default=[4.0, 16.0, 32.0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ensemble", action="store_true",
                        help="also climb the mean reward of all --captioner folders (at least two)")
    parser.add_argument("--blur", type=float, nargs="+", default=[0.0],
                        help="Gaussian blur sigmas (pixels) applied before the captioner, one pass each (0: none)")
    args = parser.parse_args(argv)

    rows = [json.loads(line) for line in (args.eval / "verdicts.jsonl").read_text().splitlines() if line.strip()]
    rng = np.random.default_rng(args.seed)
    chosen = []
    for tag in sorted({row["tag"] for row in rows}):
        wrong = [row for row in rows if row["tag"] == tag and not row["correct"]]
        chosen += [wrong[k] for k in sorted(rng.permutation(len(wrong))[:args.per_tag])]
    records = {row["index"]: json.loads((args.eval / "images" / f"{row['index']:05d}" / "metadata.jsonl")
                                        .read_text().splitlines()[0]) for row in chosen}
    images = torch.stack([pixels(args.eval / row["path"]) for row in chosen])
    prompts = [row["prompt"] for row in chosen]
    detector = ShapesDetector()
    print(f"{len(chosen)} wrong images from {args.eval}", flush=True)

    captioners = [[c] for c in args.captioner or [None]]
    if args.ensemble:
        if len(args.captioner or []) < 2:
            parser.error("--ensemble needs at least two --captioner folders")
        captioners.append(args.captioner)
    for members, sigma in [(c, b) for c in captioners for b in args.blur]:
        options = {"model": members[0], "ensemble": members[1:]} if members[0] else {}
        reward = get_likelihood_reward("shapes", negatives=args.negatives, seed=args.seed, blur=sigma, **options)
        captioner = " + ".join(members) if members[0] else None
        print(f"\ncaptioner {captioner or '(shipped)'}, blur {sigma:g}, reward "
              f"{'contrastive, ' + str(args.negatives) + ' negatives' if args.negatives else 'plain'}")
        print("| eps | tag | images | reward before | reward after | made right |")
        print("|---|---|---|---|---|---|")
        for eps in args.eps:
            starts = range(0, len(chosen), 32)
            edited = torch.cat([climb(reward, images[s:s + 32], prompts[s:s + 32], eps, args.steps, args.seed + s)
                                for s in starts])
            with torch.no_grad():
                before, after = (torch.cat([score(reward, x[s:s + 32], prompts[s:s + 32], args.seed + s) for s in starts])
                                 for x in (images, edited))
            fixed = [score_detections(records[row["index"]], detector.detect(to_image(x))).correct
                     for row, x in zip(chosen, edited)]
            for tag in sorted({row["tag"] for row in chosen}) + ["all"]:
                idx = [k for k, row in enumerate(chosen) if tag in ("all", row["tag"])]
                print(f"| {eps:g} | {tag} | {len(idx)} | {before[idx].mean():.3f} | {after[idx].mean():.3f} | "
                      f"{100 * np.mean([fixed[k] for k in idx]):.1f}% |", flush=True)


if __name__ == "__main__":
    main()
