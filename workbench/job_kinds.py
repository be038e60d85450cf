"""The kinds of background job the app runs, and the functions that run them.

Each job function takes JSON parameters and a JobContext, reports progress through it, writes its
files under ctx.run_dir and returns JSON outputs. Later issues add training, evaluation, relabeling.
"""

from __future__ import annotations

from pathlib import Path

from .benchmark import BenchmarkConfig, format_scores, run_benchmark
from .compare import run_compare_job
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


def run_ipr_job(params: dict, ctx) -> dict:
    """An IPR run in the job's folder, or, with `resume_dir`, the continuation of an earlier one."""
    from pipelines.ipr import IPRConfig, load_config, mark_reviewed, paused_iteration, run_ipr

    out = Path(params["resume_dir"]) if params.get("resume_dir") else ctx.run_dir
    config = load_config(out) if params.get("resume_dir") else IPRConfig.from_dict(params)
    if params.get("reviewed"):
        mark_reviewed(out, paused_iteration(out))
    ctx.log(f"IPR on {config.model}: {config.iterations} iteration(s), run folder {out}")
    return run_ipr(config, out, on_progress=lambda fraction, stage: ctx.progress(fraction, stage),
                   should_stop=lambda: ctx.cancelled, log=ctx.log)


JOB_KINDS = {
    "generate": run_generate_job,
    "eval": run_eval_job,
    "ipr": run_ipr_job,
    "compare": run_compare_job,
}


def register_all(runner) -> None:
    for kind, function in JOB_KINDS.items():
        runner.register(kind, function)
