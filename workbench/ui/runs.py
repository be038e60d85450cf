"""Runs tab: the job history, refreshed live, with the details of one job, Cancel, and Run again."""

from __future__ import annotations

import time
from pathlib import Path

import gradio as gr
import pandas as pd

from workbench.errors import WorkbenchError
from workbench.jobs import Job, JobRunner

from .train_runs import continue_run

TABLE_COLUMNS = ["id", "kind", "status", "progress %", "stage", "created", "duration"]
REFRESH_EVERY_S = 1.0
TRAINING_KINDS = {"ipr", "refl", "selma", "recap"}  # continue in their own folder, from their last checkpoint


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s"


def jobs_table(jobs: list[Job]) -> pd.DataFrame:
    rows = [
        [
            job.id,
            job.kind,
            job.status.value,
            round(job.progress * 100),
            job.stage,
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.created_at)),
            format_duration(job.duration),
        ]
        for job in jobs
    ]
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def job_details(runner: JobRunner, job_id: str | None) -> tuple[dict, str, dict, str]:
    """(params, log, outputs, error) of the selected job; empty values if none is selected."""
    job = runner.get(job_id) if job_id else None
    if job is None:
        return {}, "", {}, ""
    return job.params, job.log, job.outputs, job.error or ""


def run_again(runner: JobRunner, job_id: str | None) -> str:
    """Start a finished, failed, cancelled or interrupted job again: a training run continues in its own
    folder from its last checkpoint; any other job runs anew with the same settings."""
    job = runner.get(job_id) if job_id else None
    if job is None:
        return "Select a job first."
    if not job.status.is_finished:
        return f"`{job.id}` is still {job.status.value}."
    if job.kind in TRAINING_KINDS:
        run = Path(job.params["resume_dir"]).name if job.params.get("resume_dir") else job.id
        return continue_run(runner, run, False, job.kind)[1]
    try:
        new_id = runner.submit(job.kind, job.params)
    except WorkbenchError as error:
        return f"Not started: {error}"
    return f"Started `{new_id}`: the {job.kind} job `{job.id}` again, with the same settings."


def build_runs_tab(runner: JobRunner) -> None:
    """Create the tab's components inside the current Gradio context."""
    timer = gr.Timer(REFRESH_EVERY_S)
    table = gr.Dataframe(jobs_table([]), headers=TABLE_COLUMNS, interactive=False, label="Jobs (newest first)",
                         elem_id="runs-table")
    with gr.Row():
        selected = gr.Dropdown(choices=[], value=None, label="Job", allow_custom_value=True, scale=3)
        cancel_button = gr.Button("Cancel job", variant="stop", scale=1)
        again_button = gr.Button("Run again", scale=1, elem_id="runs-again")
    message = gr.Markdown()
    with gr.Row():
        params = gr.JSON(label="Parameters")
        outputs = gr.JSON(label="Outputs")
    error = gr.Textbox(label="Error", interactive=False)
    log = gr.Textbox(label="Log", lines=12, max_lines=30, interactive=False, autoscroll=True)
    details = [params, log, outputs, error]

    def refresh(job_id: str | None):
        jobs = runner.list_jobs(with_log=False)  # polled every second; the chosen job's log comes apart
        choices = [(f"{job.id} ({job.kind})", job.id) for job in jobs]
        return jobs_table(jobs), gr.update(choices=choices), *job_details(runner, job_id)

    def select_row(event: gr.SelectData):
        return event.row_value[0] if event.row_value else None

    def cancel(job_id: str | None) -> str:
        if not job_id:
            return "Select a job first."
        if runner.cancel(job_id):
            return f"Cancel requested for `{job_id}`."
        return f"`{job_id}` is not queued or running."

    timer.tick(
        refresh, inputs=selected, outputs=[table, selected, *details], show_progress="hidden", api_name="runs_refresh"
    )
    table.select(select_row, outputs=selected, api_name="runs_select")
    selected.change(
        lambda job_id: job_details(runner, job_id), inputs=selected, outputs=details, api_name="runs_details"
    )
    cancel_button.click(cancel, inputs=selected, outputs=message, api_name="runs_cancel")
    again_button.click(lambda job_id: run_again(runner, job_id), inputs=selected, outputs=message,
                       api_name="runs_again")
