"""The kinds of background job the app runs, and the functions that run them.

Each job function takes JSON parameters and a JobContext, reports progress through it, writes its
files under ctx.run_dir and returns JSON outputs.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from .benchmark import BenchmarkConfig, format_scores, run_benchmark
from .compare import run_compare_job
from .errors import InvalidInput, JobCancelled
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


def run_refl_job(params: dict, ctx) -> dict:
    """A ReFL run (RealignDiff's coarse stage) in the job's folder, or, with `resume_dir`, the
    continuation of an earlier one with the settings saved in its config.json."""
    from pipelines.realign import ReFLConfig, run_refl

    out = Path(params["resume_dir"]) if params.get("resume_dir") else ctx.run_dir
    config = ReFLConfig.from_dict(saved_config(out, "refl") if params.get("resume_dir") else params)
    ctx.log(f"ReFL on {config.model}: {config.steps} step(s), run folder {out}")
    return run_refl(config, out, on_progress=_progress_without_stopping(ctx), should_stop=lambda: ctx.cancelled,
                    log=ctx.log)


def saved_config(folder: Path, kind: str) -> dict:
    """The settings a run of `kind` saved in its folder's config.json."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    if not isinstance(config, dict) or config.get("kind") != kind:
        raise InvalidInput(f"{folder} holds no {kind} run to continue (no config.json of kind {kind!r}).")
    return config


def _progress_without_stopping(ctx):
    """ctx.progress, minus its cancel check: a ReFL run stops at should_stop once it has checkpointed
    the step, where stopping inside progress would lose the steps since the last checkpoint."""
    def report(fraction: float, stage: str) -> None:
        with contextlib.suppress(JobCancelled):
            ctx.progress(fraction, stage)
    return report


JOB_KINDS = {
    "generate": run_generate_job,
    "eval": run_eval_job,
    "ipr": run_ipr_job,
    "refl": run_refl_job,
    "compare": run_compare_job,
}


def register_all(runner) -> None:
    for kind, function in JOB_KINDS.items():
        runner.register(kind, function)
