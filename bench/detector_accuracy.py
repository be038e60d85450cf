"""How exactly the embedded shapes detector reads rendered scenes.

Renders fresh scenes (seeded, so runs compare), detects, and counts a scene as recovered when the
detections match its objects one to one (IoU >= 0.5) with the right shape and colour and nothing
extra. Prints that fraction (target: >= 0.98), the mean box IoU, and the time per image; exits 1
below target.

    python bench/detector_accuracy.py [--scenes 1000] [--seed 2024]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workbench.perception.shapes import ShapesDetector, match_scene  # noqa: E402
from workbench.shapes.captions import short_caption  # noqa: E402
from workbench.shapes.render import render  # noqa: E402
from workbench.shapes.scene import sample_scene  # noqa: E402

TARGET = 0.98


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=2024)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    scenes = [sample_scene(rng) for _ in range(args.scenes)]
    images = [render(scene) for scene in scenes]
    detector = ShapesDetector()

    start = time.perf_counter()
    detections = [detector.detect(image) for image in images]
    seconds = time.perf_counter() - start

    exact, ious, by_size, misses = 0, [], Counter(), []
    for scene, dets in zip(scenes, detections):
        ok, scene_ious = match_scene(scene, dets)
        exact += ok
        ious += scene_ious
        by_size[len(scene.objects), ok] += 1
        if not ok:
            misses.append((short_caption(scene), [(d.color, d.label, round(d.score, 2)) for d in dets]))

    fraction = exact / len(scenes)
    print(f"scenes: {len(scenes)} (seed {args.seed}), objects: {sum(len(s.objects) for s in scenes)}")
    print(f"exact scene recovery: {fraction:.4f} (target >= {TARGET})")
    print(f"mean box IoU (matched objects): {np.mean(ious):.4f}")
    exact_scores = [d.score for s, ds in zip(scenes, detections) if match_scene(s, ds)[0] for d in ds]
    print(f"min detection score on exact scenes: {min(exact_scores, default=float('nan')):.3f}")
    for n in sorted({n for n, _ in by_size}):
        total = by_size[n, True] + by_size[n, False]
        print(f"  {n} object(s): {by_size[n, True]}/{total}")
    print(f"detector time: {1000 * seconds / len(images):.2f} ms/image")
    for caption, dets in misses[:10]:
        print(f"  missed: {caption!r} -> {dets}")
    return 0 if fraction >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
