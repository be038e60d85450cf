"""How well does the shapes captioner, the reward model of ReFL on the shapes world, tell a prompt from
its hard negatives on images the shapes model generates?

Images: the shapes model's own generations for held-out training-grammar prompts (never ShapesBench's),
kept only where the embedded detector finds exactly what the prompt asks for, so the prompt is true
of the image. For each kept image and each one-fact edit of its prompt (`workbench.hard_negatives`:
colours or objects swapped, a relation flipped, a colour, object or count replaced), the captioner
should find the prompt more likely than the edit. Prints that accuracy per kind of edit (0.5 is
chance): a reward can only teach the facts its captioner can see.

    python bench/captioner_resolution.py [--captioner FOLDER ...] [--prompts 150] [--seeds 2] [--images DIR]

Generated images are kept in --images (default data/bench/captioner-resolution) and reused.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workbench.hard_negatives import _edits  # noqa: E402
from workbench.prompt_parser import shapes_vocabulary  # noqa: E402
from workbench.shapes.world import MAX_OBJECTS  # noqa: E402

KINDS = ("swap", "flip", "replace", "count")


def matched_generations(folder: Path, n_prompts: int, seeds: int, prompt_seed: int) -> list[dict]:
    """[{"path", "prompt"}] of generated images the detector finds faithful to their prompt (cached)."""
    from workbench.generation import GenerationRequest, generate_many
    from workbench.perception.shapes import ShapesDetector
    from workbench.relabel import relabel
    from workbench.shapes.bench_prompts import training_prompts

    index = folder / "matched.jsonl"
    settings = {"prompts": n_prompts, "seeds": seeds, "prompt_seed": prompt_seed}
    if index.exists() and json.loads((folder / "settings.json").read_text()) == settings:
        return [json.loads(line) for line in index.read_text().splitlines()]
    folder.mkdir(parents=True, exist_ok=True)
    # A seed far from the ones IPR, ReFL and the captioner's own training draw their prompts with.
    records = training_prompts(n_prompts, seed=prompt_seed)
    requests = [GenerationRequest(r["prompt"], model="shapes", seeds=list(range(seeds)), batch_size=16) for r in records]
    results = generate_many(requests)
    detector = ShapesDetector()
    matched = []
    for k, result in enumerate(results):
        prompt = records[k // seeds]["prompt"]
        image = result.image
        verdict = relabel(prompt, detector.detect(image), image.width, image.height)
        if not verdict.changed and verdict.keep:
            path = folder / f"{k:05d}.png"
            image.save(path)
            matched.append({"path": str(path), "prompt": prompt})
    index.write_text("".join(json.dumps(m) + "\n" for m in matched))
    (folder / "settings.json").write_text(json.dumps(settings))
    return matched


@torch.no_grad()
def resolution(captioner: str | None, matched: list[dict]) -> dict[str, tuple[float, int]]:
    from PIL import Image

    from workbench.likelihood_reward import get_likelihood_reward

    reward = get_likelihood_reward("shapes", model=captioner)
    vocabulary = shapes_vocabulary()
    wins: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for item in matched:
        pixels = np.asarray(Image.open(item["path"]).convert("RGB"), dtype=np.float32) / 127.5 - 1
        image = torch.from_numpy(pixels).permute(2, 0, 1)[None]
        edits = _edits(item["prompt"], vocabulary, MAX_OBJECTS)
        if not edits:
            continue
        texts = [item["prompt"]] + [text for _, text in edits]
        scores = reward(image.expand(len(texts), -1, -1, -1), texts)
        for (kind, _), score in zip(edits, scores[1:]):
            wins[kind].append(float(scores[0] > score))
    return {kind: (float(np.mean(w)) if w else float("nan"), len(w)) for kind, w in wins.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captioner", nargs="+", default=[None], help="captioner folders (default: the shipped one)")
    parser.add_argument("--prompts", type=int, default=150)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--prompt-seed", type=int, default=9091)
    parser.add_argument("--images", type=Path, default=Path("data/bench/captioner-resolution"))
    args = parser.parse_args()

    started = time.time()
    matched = matched_generations(args.images, args.prompts, args.seeds, args.prompt_seed)
    print(f"{len(matched)} of {args.prompts * args.seeds} generated images match their prompt "
          f"({time.time() - started:.0f} s); true prompt more likely than its edit, per kind of edit (0.5 = chance):")
    print(f"{'captioner':<40} " + " ".join(f"{kind:>14}" for kind in KINDS))
    for captioner in args.captioner:
        result = resolution(captioner, matched)
        cells = " ".join(f"{result[k][0]:>8.1%} ({result[k][1]:>4})" for k in KINDS)
        print(f"{captioner or 'shipped (assets/models/shapes-captioner)':<40} {cells}")
    print(f"{time.time() - started:.1f} s")


if __name__ == "__main__":
    main()
