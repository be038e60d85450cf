"""The kinds of background job the app runs, and the functions that run them.

Each job function takes JSON parameters and a JobContext, reports progress through it, writes its
files under ctx.run_dir (the Data tab's `skill_prompts` and `recaption`: under the data folder's
datasets/) and returns JSON outputs. Training kinds continue a stopped run in its own folder when
given `resume_dir`.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from .benchmark import BenchmarkConfig, format_scores, run_benchmark
from .compare import run_compare_job
from .errors import InvalidInput, JobCancelled
from .generation import GenerationRequest, generate
from .store import write_json


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

    out, settings = run_settings(params, ctx, "refl")
    config = ReFLConfig.from_dict(settings)
    ctx.log(f"ReFL on {config.model}: {config.steps} step(s), run folder {out}")
    return run_refl(config, out, on_progress=_progress_without_stopping(ctx), should_stop=lambda: ctx.cancelled,
                    log=ctx.log)


def run_selma_job(params: dict, ctx) -> dict:
    """A SELMA run in the job's folder, or, with `resume_dir`, the continuation of an earlier one;
    `eval_experts` may be added when continuing (it only adds evaluations)."""
    from pipelines.selma import SelmaConfig, run_selma

    out, settings = run_settings(params, ctx, "selma")
    config = SelmaConfig.from_dict(settings)
    config.eval_experts = bool(config.eval_experts or params.get("eval_experts"))
    ctx.log(f"SELMA on {config.model}: skills {', '.join(s.name for s in config.skill_list())}, run folder {out}")
    summary = run_selma(config, out, on_progress=_progress_without_stopping(ctx), should_stop=lambda: ctx.cancelled,
                        log=ctx.log)
    return {key: summary[key] for key in ("run", "merged_adapter", "mixed_adapter", "table")}


def run_recap_job(params: dict, ctx) -> dict:
    """A RECAP run in the job's folder, or, with `resume_dir`, the continuation of an earlier one."""
    from pipelines.recap import RecapConfig, run_recap

    out, settings = run_settings(params, ctx, "recap")
    config = RecapConfig.from_dict(settings)
    ctx.log(f"RECAP on {config.model}: {config.data or f'{config.images} shapes scenes'}, run folder {out}")
    result = run_recap(config, out, on_progress=_progress_without_stopping(ctx), should_stop=lambda: ctx.cancelled,
                       log=ctx.log)
    return {"run": result["run"], "adapters": result["adapters"], "variants": result["summary"].get("variants", {})}


def run_skill_prompts_job(params: dict, ctx) -> dict:
    """SELMA's prompt writing alone (the Data tab): per skill, the LLM's prompts kept by the ROUGE-L filter
    (evaluation prompts and over-long ones dropped), saved as a prompt set under datasets/, one file per
    skill as soon as it is written (a cancelled set keeps its finished skills)."""
    from pipelines.selma import Progress, SelmaConfig, make_llm, prompt_summary, write_skill_prompts

    from .datasets import PROMPT_SET_KIND, PROMPT_SET_PREFIX, datasets_dir

    out = datasets_dir() / f"{PROMPT_SET_PREFIX}{ctx.job_id}"
    config = SelmaConfig.from_dict(params)
    config.validate()
    skills = config.skill_list()
    write_json(out / "config.json", {"kind": PROMPT_SET_KIND, "model": config.model, "llm": config.llm_name(),
                                      "skills": [s.name for s in skills], "prompts_per_skill": config.prompts_per_skill,
                                      "prompts_per_request": config.prompts_per_request,
                                      "rouge_threshold": config.rouge_threshold, "seed": config.seed})
    progress = Progress(_progress_without_stopping(ctx), {f"prompts {s.name}": 1.0 for s in skills})
    ctx.log(f"writing prompts for {', '.join(s.name for s in skills)} with the {config.llm_name()} LLM into {out}")
    llm, stats, rows = make_llm(config), {}, []
    for skill in skills:
        record = write_skill_prompts(config, skill, llm, progress, lambda: ctx.cancelled)
        write_json(out / f"{skill.name}.json", record)
        stats[skill.name] = {k: v for k, v in record["stats"].items() if k != "max_rouge"}
        rows += [{"skill": skill.name, "prompt": prompt} for prompt in record["prompts"]]
        ctx.log(f"{skill.name}: {prompt_summary(record['stats'])}")
    (out / "prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {"folder": str(out), "stats": stats}


def run_recaption_job(params: dict, ctx) -> dict:
    """Recaption an imagefolder inside the data folder (or first render the shapes world's alt-text
    dataset of `images` scenes) into `out`; submitting the same again continues a stopped recaption."""
    from pipelines.recap import make_shapes_dataset, recaption

    from .datasets import datasets_dir, imagefolder, inside_data_folder, shapes_dataset_folder

    report = _progress_without_stopping(ctx)
    share = 0.0  # of the progress bar taken by rendering the dataset
    if params.get("data"):
        data = imagefolder(params["data"])
    else:
        images, seed = int(params["images"]), int(params.get("seed", 0))
        data, share = shapes_dataset_folder(images, seed), 0.2
        made = make_shapes_dataset(data, images, seed=seed, on_progress=lambda f, m: report(share * f, f"data: {m}"),
                                   should_stop=lambda: ctx.cancelled)
        ctx.log(f"{made['images']} shapes scenes with noisy alt text in {data}")
    out = inside_data_folder(params["out"])
    if datasets_dir() not in out.parents:
        raise InvalidInput(f"A recaptioned dataset goes into {datasets_dir()}, not {out}.")
    ctx.log(f"recaptioning {data} with the {params['captioner']} captioner into {out}")
    info = recaption(data, out, captioner=params["captioner"], skip_unreadable=bool(params.get("skip_unreadable")),
                     on_progress=lambda f, m: report(share + (1 - share) * f, f"recaption: {m}"),
                     should_stop=lambda: ctx.cancelled)
    if info.get("stopped"):
        raise JobCancelled("recaptioning was stopped; recaption the same folder again to continue where it stopped")
    return {"data": str(data), "folder": str(out), "images": info["images"], "skipped": info["skipped"]}


def run_settings(params: dict, ctx, kind: str) -> tuple[Path, dict]:
    """(run folder, settings): the job's own folder and its parameters, or, with `resume_dir`, that
    folder and the settings its config.json saved."""
    if params.get("resume_dir"):
        out = Path(params["resume_dir"])
        return out, saved_config(out, kind)
    return ctx.run_dir, params


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
    """ctx.progress, minus its cancel check: the training pipelines stop at should_stop once the step
    or image batch is saved, where stopping inside progress would lose the work since the last save."""
    def report(fraction: float, stage: str) -> None:
        with contextlib.suppress(JobCancelled):
            ctx.progress(fraction, stage)
    return report


JOB_KINDS = {
    "generate": run_generate_job,
    "eval": run_eval_job,
    "ipr": run_ipr_job,
    "refl": run_refl_job,
    "selma": run_selma_job,
    "recap": run_recap_job,
    "skill_prompts": run_skill_prompts_job,
    "recaption": run_recaption_job,
    "compare": run_compare_job,
}


def register_all(runner) -> None:
    for kind, function in JOB_KINDS.items():
        runner.register(kind, function)
