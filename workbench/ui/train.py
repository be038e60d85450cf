"""Train tab: launch a training run (IPR, or RealignDiff's ReFL in `train_refl`) as a background job,
follow it live, cancel, resume, plot its metrics.

The helpers here that find runs and their jobs take the job kind, so every method's section shares them.
Everything shown is read back from the job store and the run folder on every timer tick, so a page
reload or an app restart loses nothing: pick the run again and its state is there.
"""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr
import pandas as pd

from ..config import get_settings
from ..errors import WorkbenchError
from ..jobs import JobRunner, run_names
from ..registry import model_names

REFRESH_EVERY_S = 2.0
METRIC_COLUMNS = ["iteration", "tag", "accuracy"]


def runs_of_kind(kind: str) -> list[str]:
    """Run folders of one kind ("ipr", "refl") under the data folder, newest first."""
    return run_names(get_settings().runs_dir, lambda folder: run_kind(folder) == kind)


def ipr_runs() -> list[str]:
    """IPR run folders under the data folder, newest first."""
    return runs_of_kind("ipr")


def run_kind(folder: Path) -> str | None:
    """The "kind" a run folder's config.json names."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None  # no config, a half-written or a foreign file: no run
    return config.get("kind") if isinstance(config, dict) else None


def picker_with(job_id: str, kind: str):
    """The run picker showing a job just submitted: its config.json is written only once it starts,
    so its folder is named before it is listed."""
    choices = [job_id] + [r for r in runs_of_kind(kind) if r != job_id]
    return gr.update(choices=choices, value=job_id)


def run_folder(run: str | None) -> Path | None:
    """The folder of a run name; only names of folders inside the runs folder are accepted."""
    if not run:
        return None
    folder = (get_settings().runs_dir / Path(run).name).resolve()
    return folder if folder.is_dir() else None


def metrics_frame(run: str | None) -> pd.DataFrame:
    """Per-iteration accuracies of a run in long form (iteration, tag, accuracy), overall included."""
    from pipelines.ipr import read_metrics

    folder = run_folder(run)
    rows = []
    for entry in read_metrics(folder) if folder else []:
        if "per_tag" not in entry:
            continue
        rows += [[entry["iteration"], tag, round(100 * value, 1)] for tag, value in entry["per_tag"].items()]
        rows.append([entry["iteration"], "overall", round(100 * entry["overall"], 1)])
    return pd.DataFrame(rows, columns=METRIC_COLUMNS)


def metrics_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per iteration, one column per tag: what a researcher compares."""
    if frame.empty:
        return pd.DataFrame(columns=["iteration"])
    return frame.pivot(index="iteration", columns="tag", values="accuracy").reset_index()


def start_run(runner: JobRunner, model, iterations, prompts, samples, method, rank, steps, batch, lr, weighting,
              review, eval_seeds):
    from pipelines.ipr import IPRConfig

    config = IPRConfig(model=model, iterations=int(iterations), prompts=int(prompts),
                       samples_per_prompt=int(samples), lora=method == "LoRA", rank=int(rank), alpha=float(rank),
                       steps=int(steps), batch_size=int(batch), lr=float(lr), weighting=weighting,
                       review=bool(review), eval_seeds=int(eval_seeds))
    try:
        config.validate()
        job_id = runner.submit("ipr", config.__dict__)
    except WorkbenchError as error:
        return gr.update(), None, f"Not started: {error}"
    return picker_with(job_id, "ipr"), job_id, f"Started IPR run `{job_id}`."


def continue_run(runner: JobRunner, run, reviewed: bool, kind: str = "ipr"):
    """Submit the continuation of a run in its own folder; `reviewed` (IPR) also marks its paused
    iteration as reviewed."""
    folder = run_folder(run)
    if folder is None:
        return None, "Choose a run to continue."
    try:
        job_id = runner.submit(kind, {"resume_dir": str(folder), **({"reviewed": True} if reviewed else {})})
    except WorkbenchError as error:
        return None, f"Not continued: {error}"
    what = "marked the paused iteration as reviewed and continued" if reviewed else "continuing"
    return job_id, f"Run `{run}`: {what} as job `{job_id}`."


def latest_job_for(runner: JobRunner, run: str | None, job_id: str | None, kind: str = "ipr"):
    """The job to follow for a run: the one just started, else the newest job of `kind` working on that run."""
    if job_id and (job := runner.get(job_id)) is not None:
        return job
    folder = run_folder(run)
    if folder is None:
        return None
    for job in runner.list_jobs(200):
        if job.kind == kind and (job.id == folder.name or job.params.get("resume_dir") == str(folder)):
            return job
    return None


def cancel_run(runner: JobRunner, run, job_id, kind: str = "ipr") -> str:
    job = latest_job_for(runner, run, job_id, kind)
    if job is None or not runner.cancel(job.id):
        return "Nothing to cancel: no job of this run is queued or running."
    return f"Cancelling job `{job.id}`; its finished stages and checkpoints are kept (*Continue* resumes)."


def job_line(job) -> str:
    """A job's status, progress and stage, and its error if it failed."""
    line = f"Job `{job.id}`: **{job.status.value}** {job.progress:.0%} {job.stage}"
    return line + (f"\n\nError: {job.error}" if job.error else "")


def run_status(runner: JobRunner, run, job_id):
    """Status line, log, metrics plot data and table for the chosen run."""
    job = latest_job_for(runner, run, job_id)
    frame = metrics_frame(run)
    if job is None:
        status = "Choose a run, or start one." if not run else f"Run `{run}`: no job of this app is working on it."
        return status, "", frame, metrics_table(frame)
    status = job_line(job)
    if job.outputs.get("status") == "awaiting_review":
        status += (f"\n\nIteration {job.outputs['iteration'] + 1} waits for review: check its relabels in the "
                   f"Review tab, then press *Reviewed: continue*.")
    return status, job.log[-20000:], frame, metrics_table(frame)


def build_train_tab(runner: JobRunner) -> gr.Dropdown:
    """Create the tab inside the current Gradio context, one inner tab per method; returns the IPR run
    picker (refreshed on load); the ReFL picker refreshes when its tab is opened."""
    from .train_refl import build_refl_section, refl_runs  # it builds on this module's helpers

    with gr.Tabs():
        with gr.Tab("IPR: Iterative Prompt Relabeling"):
            run = build_ipr_section(runner)
        with gr.Tab("RealignDiff: ReFL (coarse stage)") as refl_tab:
            refl_run = build_refl_section(runner)
    refl_tab.select(lambda: gr.update(choices=refl_runs()), None, refl_run)
    return run


def build_ipr_section(runner: JobRunner) -> gr.Dropdown:
    gr.Markdown("Iterative Prompt Relabeling: sample, detect, relabel, fine-tune, evaluate, repeat. "
                "Runs are background jobs; they continue after a crash or cancel with *Continue*.")
    with gr.Row():
        with gr.Column():
            model = gr.Dropdown(model_names(), value=get_settings().default_model, label="Model",
                                allow_custom_value=True)
            iterations = gr.Slider(1, 5, value=2, step=1, label="Iterations")
            prompts = gr.Number(500, label="Training prompts", precision=0)
            samples = gr.Number(3, label="Images per prompt", precision=0)
            method = gr.Radio(["LoRA", "Full"], value="LoRA", label="Fine-tuning")
            rank = gr.Number(8, label="LoRA rank", precision=0)
        with gr.Column():
            steps = gr.Number(800, label="Training steps per iteration", precision=0)
            batch = gr.Number(32, label="Batch size", precision=0)
            lr = gr.Number(5e-4, label="Learning rate")
            weighting = gr.Radio(["relabel", "detector"], value="relabel", label="Loss re-scaling",
                                 info="relabel: 1.0 matched / 0.5 relabeled; detector: also x detector confidence")
            review = gr.Checkbox(False, label="Pause after each relabeling for a manual review")
            eval_seeds = gr.Number(4, label="ShapesBench seeds per prompt (0: no evaluation)", precision=0)
    start = gr.Button("Start IPR run", variant="primary")
    with gr.Row():
        run = gr.Dropdown(ipr_runs(), value=None, label="Run", allow_custom_value=False, scale=3)
        refresh = gr.Button("Refresh runs", scale=1)
        resume = gr.Button("Continue", scale=1)
        reviewed = gr.Button("Reviewed: continue", scale=1)
        cancel = gr.Button("Cancel", variant="stop", scale=1)
    job_state = gr.State(None)
    status = gr.Markdown(elem_id="train-status")
    plot = gr.LinePlot(pd.DataFrame(columns=METRIC_COLUMNS), x="iteration", y="accuracy", color="tag",
                       title="ShapesBench accuracy (%) per iteration (0 = base model)")
    table = gr.Dataframe(label="Accuracy (%) per tag", interactive=False)
    log = gr.Textbox(label="Log", lines=12, max_lines=24, autoscroll=True)

    start.click(lambda *a: start_run(runner, *a),
                [model, iterations, prompts, samples, method, rank, steps, batch, lr, weighting, review, eval_seeds],
                [run, job_state, status])
    refresh.click(lambda: gr.update(choices=ipr_runs()), None, run)
    run.change(lambda: None, None, job_state)
    resume.click(lambda r: continue_run(runner, r, False), run, [job_state, status])
    reviewed.click(lambda r: continue_run(runner, r, True), run, [job_state, status])
    cancel.click(lambda r, j: cancel_run(runner, r, j), [run, job_state], status)
    timer = gr.Timer(REFRESH_EVERY_S)
    timer.tick(lambda r, j: run_status(runner, r, j), [run, job_state], [status, log, plot, table])
    return run
