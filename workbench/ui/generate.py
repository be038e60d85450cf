"""Generate tab: prompt in, images out, through the job runner so long batches show live progress."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

import gradio as gr

from ..benchmark import BenchmarkConfig, check_detector
from ..config import get_settings
from ..errors import WorkbenchError
from ..generation import SCHEDULERS, GenerationRequest, LoraSpec, read_png_metadata
from ..jobs import JobStatus
from ..registry import resolve
from .adapters import adapter_choices, model_dropdown

EXAMPLE_PROMPTS = [
    "a red circle",
    "a blue square and a yellow triangle",
    "a green circle to the left of a purple square",
    "three orange triangles",
    "two red circles and a blue square",
]
FINISHED = {JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.INTERRUPTED}


def parse_loras(text: str) -> list[LoraSpec]:
    return [LoraSpec.parse(line) for line in (text or "").splitlines() if line.strip()]


def model_defaults(model: str):
    """Steps, guidance and size sliders follow the chosen model's defaults."""
    try:
        entry = resolve(model)
    except WorkbenchError as error:
        return gr.update(), gr.update(), gr.update(), gr.update(), str(error)
    return (entry.default_steps, entry.default_guidance, entry.default_size, entry.default_size,
            f"{entry.description}")


def follow_job(runner, job_id: str, interval: float):
    """Yield (unchanged output, status line) while the job runs; return the finished job.

    Handlers call it with `job = yield from follow_job(...)`.
    """
    while (job := runner.get(job_id)).status not in FINISHED:
        if job.status is JobStatus.QUEUED:
            yield gr.update(), f"Job `{job_id}` is queued. {runner.waiting_note(job)}".rstrip()
        else:
            yield gr.update(), f"Running job `{job_id}`: {job.progress:.0%} {job.stage or ''}"
        time.sleep(interval)
    return job


def follow_job_as(runner, job_id: str, interval: float, outputs: Callable[[str], tuple]):
    """follow_job, each status line turned into a handler's outputs by `outputs`; returns the finished job.

    Handlers call it with `job = yield from follow_job_as(runner, job_id, 0.5, lambda line: (line, ...))`.
    """
    follow = follow_job(runner, job_id, interval)
    while True:
        try:
            _, line = next(follow)
        except StopIteration as stop:
            return stop.value
        yield outputs(line)


def build_request(model, prompt, negative, seed, count, steps, guidance, width, height, scheduler,
                  loras_text) -> GenerationRequest:
    first_seed = random.randrange(2**31) if seed is None or int(seed) < 0 else int(seed)
    return GenerationRequest(prompt=prompt or "", model=model, negative_prompt=negative or "",
                             seeds=[first_seed + i for i in range(int(count))], steps=int(steps),
                             guidance=float(guidance), width=int(width), height=int(height),
                             scheduler=scheduler, loras=parse_loras(loras_text))


def build_generate_tab(runner):
    default_model = get_settings().default_model
    with gr.Row():
        with gr.Column(scale=2):
            model = model_dropdown(default_model, info="A registry name, a full fine-tune from a run, a local "
                                                       "diffusers folder, or a hub id (org/name).")
            model_info = gr.Markdown()
            prompt = gr.Textbox(label="Prompt", lines=2, placeholder="a red circle to the left of a blue square",
                                elem_id="prompt-box")
            negative = gr.Textbox(label="Negative prompt", lines=1)
            gr.Examples([[p] for p in EXAMPLE_PROMPTS], inputs=[prompt], label="Example prompts")
            with gr.Row():
                seed = gr.Number(value=0, precision=0, label="Seed (-1: random)")
                count = gr.Slider(1, 16, value=4, step=1, label="Images")
            with gr.Accordion("Sampling", open=False):
                steps = gr.Slider(1, 100, value=20, step=1, label="Steps")
                guidance = gr.Slider(0, 20, value=7.5, step=0.5, label="Guidance scale")
                with gr.Row():
                    width = gr.Slider(32, 1024, value=64, step=8, label="Width")
                    height = gr.Slider(32, 1024, value=64, step=8, label="Height")
                scheduler = gr.Dropdown(list(SCHEDULERS), value="default", label="Scheduler")
            with gr.Accordion("LoRA adapters", open=False) as adapters_accordion:
                adapter_picker = gr.Dropdown(adapter_choices(), label="Add an adapter", value=None,
                                             allow_custom_value=True)
                loras = gr.Textbox(label="Adapters, one per line: PATH[:WEIGHT]", lines=3)
            run_button = gr.Button("Generate", variant="primary", elem_id="generate-button")
            with gr.Accordion("Evaluate on ShapesBench", open=False):
                with gr.Row():
                    eval_seeds = gr.Slider(1, 4, value=4, step=1, label="Seeds per prompt")
                    eval_first_seed = gr.Number(0, precision=0, label="First seed",
                                                info="4: seeds 4..7, images no run's own evaluation drew")
                eval_button = gr.Button("Evaluate this model (background job)", elem_id="eval-button")
                eval_status = gr.Markdown(elem_id="eval-status")
                eval_table = gr.Dataframe(headers=["tag", "correct", "total", "accuracy"], interactive=False,
                                          elem_id="eval-table")
        with gr.Column(scale=3):
            status = gr.Markdown(elem_id="generate-status")
            # An output only: without interactive=False the select event below makes Gradio offer uploads.
            gallery = gr.Gallery(label="Images", columns=4, height="auto", elem_id="generate-gallery",
                                 object_fit="contain", interactive=False)
            metadata = gr.JSON(label="Parameters of the selected image (embedded in the PNG)")

    # Adapters trained since the app was built appear whenever the list is opened.
    adapters_accordion.expand(lambda: gr.update(choices=adapter_choices()), None, adapter_picker)

    def add_adapter(path, current):
        if not path:
            return gr.update(), current
        lines = [line for line in (current or "").splitlines() if line.strip()]
        return None, "\n".join(lines + [f"{path}:1.0"])

    def on_generate(*inputs):
        try:
            request = build_request(*inputs)
            request.validate()
        except WorkbenchError as error:
            yield gr.update(), f"Cannot generate: {error}"
            return
        job_id = runner.submit("generate", request.to_dict())
        job = yield from follow_job(runner, job_id, 0.25)
        if job.status == JobStatus.DONE:
            images = job.outputs.get("images", [])
            took = (job.finished_at or 0) - (job.started_at or 0)
            yield images, f"Done: {len(images)} image(s) in {took:.1f} s (job `{job_id}`)"
        elif job.status == JobStatus.CANCELLED:
            yield gr.update(), f"Job `{job_id}` was cancelled."
        else:
            yield gr.update(), f"Failed: {job.error}"

    def on_select(images, event: gr.SelectData):
        item = images[event.index]
        path = item[0] if isinstance(item, (list, tuple)) else (item.get("image", {}).get("path")
                                                                if isinstance(item, dict) else item)
        try:
            return read_png_metadata(Path(path))
        except (WorkbenchError, TypeError):
            return None

    def on_evaluate(model_name, seeds, first_seed, steps_value, guidance_value, loras_text):
        try:
            config = BenchmarkConfig(model=model_name, seeds=int(seeds), first_seed=int(first_seed or 0),
                                     steps=int(steps_value), guidance=float(guidance_value),
                                     loras=parse_loras(loras_text))
            config.check_seeds()  # before a job is queued
            check_detector(config)
        except WorkbenchError as error:
            yield gr.update(), f"Cannot evaluate: {error}"
            return
        job_id = runner.submit("eval", config.to_dict())
        job = yield from follow_job(runner, job_id, 1.0)
        if job.status != JobStatus.DONE:
            yield gr.update(), f"Evaluation {job.status.value}: {job.error or ''}"
            return
        rows = [[tag, s["correct"], s["total"], round(100 * s["accuracy"], 1)]
                for tag, s in job.outputs["per_tag"].items()]
        rows.append(["overall", "", "", round(100 * job.outputs["overall"], 1)])
        yield rows, f"Done (job `{job_id}`); images and verdicts are in the run folder."

    eval_button.click(on_evaluate, [model, eval_seeds, eval_first_seed, steps, guidance, loras],
                      [eval_table, eval_status])

    inputs = [model, prompt, negative, seed, count, steps, guidance, width, height, scheduler, loras]
    model.change(model_defaults, model, [steps, guidance, width, height, model_info])
    adapter_picker.change(add_adapter, [adapter_picker, loras], [adapter_picker, loras])
    run_button.click(on_generate, inputs, [gallery, status])
    prompt.submit(on_generate, inputs, [gallery, status])
    gallery.select(on_select, gallery, metadata)
    return model, model_info, [steps, guidance, width, height]
