"""Overhead of the workbench generation service over calling the same diffusers pipeline directly.

Same model, prompt, seeds, steps and size, in one process, alternating service and direct calls so
that machine noise hits both alike. Prints both timings and the ratio (target: <= 1.05).

    python bench/generation_overhead.py [--model shapes] [--images 16] [--steps 20] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workbench.generation import GenerationRequest, generate  # noqa: E402
from workbench.registry import load_pipeline  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--prompt", default="a red circle to the left of a blue square")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    pipe = load_pipeline(args.model)
    entry = pipe.workbench_entry
    size, guidance = entry.default_size, entry.default_guidance
    seeds = list(range(args.images))
    request = GenerationRequest(args.prompt, model=args.model, seeds=seeds, steps=args.steps,
                                guidance=guidance, width=size, height=size, batch_size=args.images)

    def direct() -> None:
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        pipe(prompt=[args.prompt] * len(seeds), num_inference_steps=args.steps, guidance_scale=guidance,
             width=size, height=size, generator=generators)

    with tempfile.TemporaryDirectory() as out_dir:
        def service() -> None:
            generate(request, out_dir=Path(out_dir))

        direct(), service()  # warm-up: first calls pay for allocations and lazy imports
        direct_times, service_times = [], []
        for _ in range(args.rounds):
            for timings, call in ((direct_times, direct), (service_times, service)):
                start = time.perf_counter()
                call()
                timings.append(time.perf_counter() - start)

    direct_s, service_s = statistics.median(direct_times), statistics.median(service_times)
    print(f"model={args.model} images={args.images} steps={args.steps} size={size} rounds={args.rounds} "
          f"threads={torch.get_num_threads()}")
    print(f"direct pipeline : median {direct_s:.3f} s  ({direct_s / args.images * 1000:.1f} ms/image)")
    print(f"workbench service: median {service_s:.3f} s  ({service_s / args.images * 1000:.1f} ms/image, "
          f"PNGs with metadata written)")
    print(f"ratio service/direct = {service_s / direct_s:.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()
