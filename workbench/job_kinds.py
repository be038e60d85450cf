"""The kinds of background job the app runs, and the functions that run them.

Each job function takes JSON parameters and a JobContext, reports progress through it, writes its
files under ctx.run_dir and returns JSON outputs. Later issues add training, evaluation, relabeling.
"""

from __future__ import annotations

from .benchmark import BenchmarkConfig, format_scores, run_benchmark
from .generation import GenerationRequest, generate


def run_generate_job(params: dict, ctx) -> dict:
    request = GenerationRequest.from_dict(params)
    ctx.log(f"generating {len(request.seeds)} image(s) with {request.model}: {request.prompt!r}")
    results = generate(request, out_dir=ctx.run_dir / "images",
                       on_progress=lambda fraction, stage: ctx.progress(fraction, stage),
                       should_stop=lambda: ctx.cancelled)
    return {"images": [str(result.path) for result in results]}


def run_eval_job(params: dict, ctx) -> dict:
    config = BenchmarkConfig.from_dict(params)
    ctx.log(f"evaluating {config.model} on {config.prompts} with {config.seeds} seed(s) per prompt")
    summary = run_benchmark(config, ctx.run_dir, on_progress=lambda fraction, stage: ctx.progress(fraction, stage),
                            should_stop=lambda: ctx.cancelled)
    ctx.log("\n" + format_scores(summary))
    return {"scores": str(ctx.run_dir / "scores.json"), "per_tag": summary["per_tag"], "overall": summary["overall"]}


JOB_KINDS = {
    "generate": run_generate_job,
    "eval": run_eval_job,
}


def register_all(runner) -> None:
    for kind, function in JOB_KINDS.items():
        runner.register(kind, function)
