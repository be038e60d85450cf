"""Does ReFL's reward rank the images ShapesBench scores correct above the ones it scores wrong?

Reads a finished ShapesBench evaluation (`verdicts.jsonl` and its images, as `workbench eval` or any
pipeline's eval folder writes them) and scores every (image, prompt) with the shapes captioner's
likelihood reward: plain (mean log-probability of the prompt) and contrastive (against
`--negatives` hard negatives, what `pipelines.realign --negatives K` descends). Prints, per tag, the
AUC of each reward for correct against wrong images: 0.5 is chance, and a reward below it pushes the
model away from what the benchmark counts as right. It also prints the mean contrastive reward of the
correct and the wrong images and of a blank white canvas under the same prompts: a canvas that shows
nothing scores about log(1 / (K + 1)), and where that beats the model's own images, ReFL can climb the
reward by making images unreadable.

    python bench/reward_ranking.py --eval data/runs/RUN/eval-base [--captioner FOLDER ...] [--negatives 4]
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

from workbench.likelihood_reward import get_likelihood_reward  # noqa: E402


def auc(positive: list[float], negative: list[float]) -> float:
    """P(a correct image outscores a wrong one), ties counted half."""
    if not positive or not negative:
        return float("nan")
    p, n = np.asarray(positive)[:, None], np.asarray(negative)[None, :]
    return float((p > n).mean() + 0.5 * (p == n).mean())


def pixels(path: Path) -> torch.Tensor:
    array = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


def score(rows: list[dict], folder: Path, captioner: str | None, negatives: int, batch: int = 64) -> None:
    options = {"model": captioner} if captioner else {}
    plain = get_likelihood_reward("shapes", **options)
    contrastive = get_likelihood_reward("shapes", negatives=negatives, seed=0, **options)
    with torch.no_grad():
        for start in range(0, len(rows), batch):
            chunk = rows[start:start + batch]
            images = torch.stack([pixels(folder / row["path"]) for row in chunk])
            prompts = [row["prompt"] for row in chunk]
            # The negatives of a chunk are drawn from its own seeded generator: the same for every captioner.
            drawn = contrastive(images, prompts, rng=np.random.default_rng(start))
            blank = contrastive(torch.ones_like(images), prompts, rng=np.random.default_rng(start))
            for row, a, b, c in zip(chunk, plain(images, prompts).tolist(), drawn.tolist(), blank.tolist()):
                row["plain"], row["contrastive"], row["blank"] = a, b, c


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--eval", type=Path, required=True, help="an evaluation folder holding verdicts.jsonl")
    parser.add_argument("--captioner", action="append", default=None,
                        help="captioner folder (repeatable; default: the shipped one)")
    parser.add_argument("--negatives", type=int, default=4)
    args = parser.parse_args(argv)
    rows = [json.loads(line) for line in (args.eval / "verdicts.jsonl").read_text().splitlines() if line.strip()]
    tags = sorted({row["tag"] for row in rows})
    for captioner in args.captioner or [None]:
        score(rows, args.eval, captioner, args.negatives)
        print(f"captioner {captioner or 'shipped'} on {args.eval} ({len(rows)} images)")
        print(f"{'tag':<15}{'correct':>9}{'AUC plain':>11}{'AUC contrastive':>17}"
              f"{'mean r right':>14}{'mean r wrong':>14}{'mean r blank':>14}")
        for tag in tags:
            tagged = [row for row in rows if row["tag"] == tag]
            right = [row for row in tagged if row["correct"]]
            wrong = [row for row in tagged if not row["correct"]]
            print(f"{tag:<15}{len(right):>5}/{len(tagged):<3}"
                  f"{auc([r['plain'] for r in right], [r['plain'] for r in wrong]):>11.3f}"
                  f"{auc([r['contrastive'] for r in right], [r['contrastive'] for r in wrong]):>17.3f}"
                  + "".join(f"{np.mean([r[key] for r in group]) if group else float('nan'):>14.3f}"
                            for key, group in (("contrastive", right), ("contrastive", wrong), ("blank", tagged))))


if __name__ == "__main__":
    main()
