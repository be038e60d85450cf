"""Runs tab: the job history, refreshed live, with the details of one job and a Cancel button."""

from __future__ import annotations

import time

import gradio as gr
import pandas as pd

from workbench.jobs import Job, JobRunner

TABLE_COLUMNS = ["id", "kind", "status", "progress %", "stage", "created", "duration"]
REFRESH_EVERY_S = 1.0


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


def build_runs_tab(runner: JobRunner) -> None:
    """Create the tab's components inside the current Gradio context."""
    timer = gr.Timer(REFRESH_EVERY_S)
    table = gr.Dataframe(jobs_table([]), headers=TABLE_COLUMNS, interactive=False, label="Jobs (newest first)",
                         elem_id="runs-table")
    with gr.Row():
        selected = gr.Dropdown(choices=[], value=None, label="Job", allow_custom_value=True, scale=3)
        cancel_button = gr.Button("Cancel job", variant="stop", scale=1)
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
