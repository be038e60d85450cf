"""What every method section of the Train tab shares: finding runs of a job kind and the job working on
one, continuing and cancelling it, and the start / run picker / continue / cancel / follow layout.

Each section (IPR, ReFL, SELMA, RECAP) adds only its settings and what it shows of a run. Everything
shown is read back from the job store and the run folder on every timer tick, so a page reload or an
app restart loses nothing: pick the run again and its state is there.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gradio as gr

from ..config import get_settings
from ..errors import InvalidInput, WorkbenchError
from ..jobs import JobRunner, JobStatus, run_names

REFRESH_EVERY_S = 2.0


# --- runs and their jobs ----------------------------------------------------------------------------


def runs_of_kind(kind: str) -> list[str]:
    """Run folders of one kind ("ipr", "refl", "selma", "recap") under the data folder, newest first."""
    return run_names(get_settings().runs_dir, lambda folder: run_kind(folder) == kind)


def run_kind(folder: Path) -> str | None:
    """The "kind" a run folder's config.json names."""
    config = read_json(folder / "config.json")
    return config.get("kind") if config else None


def read_json(path: Path) -> dict | None:
    """A JSON object from disk, or None when it is not there yet, half-written or no object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def picker_with(job_id: str, kind: str):
    """The run picker showing a job just submitted: its config.json is written only once it starts,
    so its folder is named before it is listed."""
    choices = [job_id] + [r for r in runs_of_kind(kind) if r != job_id]
    return gr.update(choices=choices, value=job_id)


def run_path(run: str | None) -> Path | None:
    """Where a run's folder is or will be (a queued job's folder is made when it starts); only names
    inside the runs folder are accepted."""
    return (get_settings().runs_dir / Path(run).name).resolve() if run else None


def run_folder(run: str | None) -> Path | None:
    """The folder of a run name, if it exists."""
    folder = run_path(run)
    return folder if folder is not None and folder.is_dir() else None


def run_and_config(run: str | None) -> tuple[Path | None, dict | None]:
    """A run's folder and its config.json; (None, None) for no run, or one whose job has not started."""
    folder = run_folder(run)
    config = read_json(folder / "config.json") if folder else None
    return (folder, config) if config else (None, None)


def continue_run(runner: JobRunner, run, reviewed: bool, kind: str = "ipr", extra: dict | None = None):
    """Submit the continuation of a run in its own folder; `reviewed` (IPR) also marks its paused
    iteration as reviewed; `extra` adds parameters the kind reads when it continues."""
    folder = run_folder(run)
    if folder is None:
        return None, "Choose a run to continue."
    active = latest_job_for(runner, run, None, kind)
    if active is not None and active.status in (JobStatus.QUEUED, JobStatus.RUNNING):
        return active.id, (f"Run `{run}` is already {active.status.value} as job `{active.id}`; "
                           f"cancel it first to continue it another way.")
    paused = active is not None and active.outputs.get("status") == "awaiting_review"
    if active is not None and active.status is JobStatus.DONE and not paused and not extra:
        # A job that finished its whole run: continuing would start a job with nothing to do.
        return active.id, (f"Run `{run}` has finished (job `{active.id}`): nothing to continue" +
                           (", and no iteration waits for a review." if reviewed else "."))
    params = {"resume_dir": str(folder), **({"reviewed": True} if reviewed else {}), **(extra or {})}
    try:
        job_id = runner.submit(kind, params)
    except WorkbenchError as error:
        return None, f"Not continued: {error}"
    what = "marked the paused iteration as reviewed and continued" if reviewed else "continuing"
    return job_id, f"Run `{run}`: {what} as job `{job_id}`."


def latest_job_for(runner: JobRunner, run: str | None, job_id: str | None, kind: str = "ipr"):
    """The job to follow for a run: the one just started, else the newest job of `kind` working on that run."""
    if job_id and (job := runner.get(job_id)) is not None:
        return job
    folder = run_path(run)
    if folder is None:
        return None
    for job in runner.list_jobs(200, with_log=False):  # polled: the one job found is read whole
        if job.kind == kind and (job.id == folder.name or job.params.get("resume_dir") == str(folder)):
            return runner.get(job.id)
    return None


def cancel_run(runner: JobRunner, run, job_id, kind: str = "ipr") -> str:
    job = latest_job_for(runner, run, job_id, kind)
    if job is None or not runner.cancel(job.id):
        return "Nothing to cancel: no job of this run is queued or running."
    return f"Cancelling job `{job.id}`; its finished stages and checkpoints are kept (*Continue* resumes)."


def job_line(job, waiting: str = "") -> str:
    """A job's status, progress and stage, what it waits for if queued, and its error if it failed."""
    line = f"Job `{job.id}`: **{job.status.value}** {job.progress:.0%} {job.stage}"
    return line + (f" {waiting}" if waiting else "") + (f"\n\nError: {job.error}" if job.error else "")


def status_and_log(runner: JobRunner, run, job_id, kind: str, *details: str) -> tuple[str, str]:
    """The status text of the chosen run (its job's line, then `details` read from its folder) and the job's log."""
    job = latest_job_for(runner, run, job_id, kind)
    if job is None:
        head = "Choose a run, or start one." if not run else f"Run `{run}`: no job of this app is working on it."
        return "\n\n".join(filter(None, [head, *details])), ""
    return "\n\n".join(filter(None, [job_line(job, runner.waiting_note(job)), *details])), job.log[-20000:]


def submit_run(runner: JobRunner, kind: str, method: str, make_settings: Callable[[], dict]):
    """Submit a run from settings made (and validated) by `make_settings`; (run picker, job id, message)."""
    try:
        job_id = runner.submit(kind, make_settings())
    except WorkbenchError as error:
        return gr.update(), None, f"Not started: {error}"
    return picker_with(job_id, kind), job_id, f"Started {method} run `{job_id}`."


def starter(kind: str, method: str, make_config: Callable) -> Callable:
    """start(runner, *settings): submit a run of `kind` with the dataclass config make_config(*settings)
    makes and validates (InvalidInput says what is wrong)."""
    def start(runner: JobRunner, *settings):
        return submit_run(runner, kind, method, lambda: asdict(make_config(*settings)))
    return start


def number(value, label: str, kind=int):
    """A setting typed into a number box, or InvalidInput naming it."""
    if value is None or value == "":
        raise InvalidInput(f"{label} needs a value.")
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"{label} must be a number (got {value!r}).") from None


def optional_number(label: str, info: str | None = None, elem_id: str | None = None) -> gr.Number:
    """A number box that starts blank, for settings whose blank means "the method's own default".

    Gradio shows a None value as 0 and sends 0 (gradio-app/gradio#6728), which would silently replace
    the default by 0; a value callable that returns None is shown and sent as blank."""
    return gr.Number(lambda: None, label=label, info=info, elem_id=elem_id)


# The layers a LoRA adapts, as the sections offer them: (label, pipelines.trainer.TARGET_PRESETS name).
ADAPTED_LAYERS = [("attention projections (to_q, to_k, to_v, to_out.0)", "attention"),
                  ("whole transformer blocks (attention, feed-forward, proj_in, proj_out)", "transformer")]


def target_modules(choice: str | None, default: Sequence[str]) -> list[str]:
    """The UNet module names of an adapted-layers choice (None or empty: the method's default)."""
    from pipelines.trainer import TARGET_PRESETS

    if not choice:
        return list(default)
    if choice not in TARGET_PRESETS:
        raise InvalidInput(f"Unknown choice of adapted layers {choice!r}; use one of {', '.join(TARGET_PRESETS)}.")
    return list(TARGET_PRESETS[choice])


# --- the shared layout ------------------------------------------------------------------------------


def adapted_layers_picker(default: Sequence[str]) -> gr.Radio:
    """The choice of layers the LoRA adapts, on the method's default preset."""
    from pipelines.trainer import TARGET_PRESETS

    value = next((name for name, targets in TARGET_PRESETS.items() if tuple(targets) == tuple(default)), None)
    label = next((label for label, name in ADAPTED_LAYERS if name == value), ", ".join(default))
    return gr.Radio(ADAPTED_LAYERS, value=value, label="LoRA on the UNet's", info=f"this method's default: {label}")


def model_picker(label: str = "Model") -> gr.Dropdown:
    """The model a section trains (a registry name, a full fine-tune from a run, a local diffusers folder or a
    hub id), the default one chosen."""
    from .adapters import model_dropdown  # adapters reads run folders through this module

    return model_dropdown(get_settings().default_model, label=label)


@dataclass
class RunControls:
    """The components every method section has; `buttons` holds a section's extra buttons by label.
    `notice` says what the last click did (a refusal stays until the next click); `status` follows the
    run, rewritten on every timer tick."""

    run: gr.Dropdown
    job: gr.State
    notice: gr.Markdown
    status: gr.Markdown
    buttons: dict[str, gr.Button] = field(default_factory=dict)

    def follow(self, show: Callable, inputs: Sequence = (), outputs: Sequence = (), triggers: Sequence = ()) -> None:
        """Call show(run, job id, *inputs) on every timer tick (and on `triggers`); it returns the status
        text, then the values of `outputs`."""
        timer = gr.Timer(REFRESH_EVERY_S)
        gr.on([timer.tick, *triggers], show, [self.run, self.job, *inputs], [self.status, *outputs],
              show_progress="hidden")


def run_controls(runner: JobRunner, kind: str, method: str, start: Callable, settings: Sequence, status_id: str,
                 extra_buttons: Sequence[str] = ()) -> RunControls:
    """Start button, run picker with Refresh / Continue / (extra buttons) / Cancel, and the status line,
    wired to start(runner, *settings) -> (picker, job id, message) and to the shared continue and cancel."""
    start_button = gr.Button(f"Start {method} run", variant="primary")
    with gr.Row():
        run = gr.Dropdown(runs_of_kind(kind), value=None, label="Run", allow_custom_value=False, scale=3)
        refresh = gr.Button("Refresh runs", scale=1)
        resume = gr.Button("Continue", scale=1)
        buttons = {label: gr.Button(label, scale=1) for label in extra_buttons}
        cancel = gr.Button("Cancel", variant="stop", scale=1)
    job = gr.State(None)
    notice = gr.Markdown(elem_id=f"{status_id}-notice")
    status = gr.Markdown(elem_id=status_id)

    start_button.click(lambda *values: start(runner, *values), list(settings), [run, job, notice])
    refresh.click(lambda: gr.update(choices=runs_of_kind(kind)), None, run)
    # The user chose another run: follow that run's newest job; what was said of the last one is stale.
    run.input(lambda: (None, ""), None, [job, notice])
    resume.click(lambda r: continue_run(runner, r, False, kind), run, [job, notice])
    cancel.click(lambda r, j: cancel_run(runner, r, j, kind), [run, job], notice)
    return RunControls(run, job, notice, status, buttons)
