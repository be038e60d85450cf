"""Compare tab: the base model and aligned variants side by side on the same prompts and seeds.

The comparison runs as a background job ('compare'); the grid (one column per variant, each image
marked with its verdict), the per-tag accuracy table and its bar chart are read back from the run
folder, so an earlier comparison can be shown again and written as an HTML report.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pandas as pd

from ..benchmark import DETECTORS, SHAPESBENCH, check_detector
from ..compare import (CompareConfig, Variant, accuracy_table, difference_table, prompt_tags, prompts_from_tag,
                       prompts_from_text)
from ..config import get_settings
from ..errors import InvalidInput, WorkbenchError
from ..evaluation import load_prompt_file
from ..generation import LoraSpec, lora_weights_file
from ..jobs import JobRunner, JobStatus, run_names
from ..registry import resolve
from ..report import STYLE, grid_html, load_comparison, write_report
from ..shapes.bench_prompts import HELDOUT_PATH
from .adapters import WEIGHTS_FILE, adapter_choices, is_pipeline_folder, model_choices, model_dropdown
from .generate import follow_job
from .train_runs import number

# The held-out set asks ShapesBench's tasks in other words: a gain shown on both is not one of its phrasings.
SOURCES = ["ShapesBench tag", "Held-out wordings tag", "Text", "File"]
BAR_COLUMNS = ["tag / variant", "accuracy", "variant"]
GRID_IMAGE_SIDE = 128  # the tab shows thumbnails; the report keeps more detail
# A page of thousands of inlined images is slow to send and to scroll: larger comparisons show a sample.
GRID_MAX_PROMPTS = 60
GRID_PROMPTS_PER_TAG = 8


def variants_from_text(text: str) -> list[Variant]:
    """The base model, then one variant per line: 'PATH[:WEIGHT]', several joined by '+'; a PATH that is a
    full fine-tune's pipeline folder (it holds model_index.json) is drawn instead of the base model."""
    variants = [Variant("base")]
    for line_number, line in enumerate((text or "").splitlines(), start=1):
        parts = [part.strip() for part in line.split("+") if part.strip()]
        pipelines = [part for part in parts if is_pipeline_folder(part)]
        if len(pipelines) > 1:
            raise InvalidInput(f"Variant line {line_number} names {len(pipelines)} full fine-tunes; a variant draws "
                               f"with one model (put each on its own line).")
        if parts:
            loras = [LoraSpec.parse(part) for part in parts if part not in pipelines]
            for lora in loras:
                check_variant_part(lora.path, line_number)
            variants.append(Variant.of(loras, model=pipelines[0] if pipelines else None))
    return variants


def check_variant_part(path: str, line_number: int) -> None:
    """InvalidInput when `path` is neither a LoRA adapter nor a full fine-tune, pointing at the pipeline
    inside a full fine-tune's output folder when that is what was given."""
    if lora_weights_file(path) is not None:
        return
    inside = Path(path).expanduser() / "pipeline"
    if is_pipeline_folder(inside):
        raise InvalidInput(f"Variant line {line_number}: {path} is a full fine-tune's output folder; its model is "
                           f"{inside} (pick it from the list, or write that path).")
    raise InvalidInput(f"Variant line {line_number}: {path} is neither a LoRA adapter (a .safetensors file or a "
                       f"folder holding {WEIGHTS_FILE}) nor a full fine-tune's pipeline (a folder holding "
                       f"model_index.json).")


def variants_with(current: str | None, choice: str | None, weight) -> str:
    """The variants text with the picked adapter added at `weight`; a SELMA run's joined experts (a line
    of adapters joined by '+') come with their own weights, and a full fine-tune has none."""
    lines = [line for line in (current or "").splitlines() if line.strip()]
    if choice:
        lines.append(choice if "+" in choice or is_pipeline_folder(choice) else f"{choice}:{float(weight):g}")
    return "\n".join(lines)


def collect_prompts(source: str, text: str, tag: str, count, upload) -> tuple[list[dict], str]:
    """(GenEval records, name of the prompt set) from the chosen source; InvalidInput says what is wrong."""
    if source == "Text":
        return prompts_from_text(text), "typed prompts"
    if source == "File":
        if not upload:
            raise InvalidInput("Choose File, then upload a GenEval-format .jsonl prompt file (one JSON record a line).")
        path = Path(upload)
        return load_prompt_file(path), path.name
    path = HELDOUT_PATH if source == "Held-out wordings tag" else SHAPESBENCH
    return prompts_from_tag(tag, number(count, "Prompts per tag"), path), f"{Path(path).name}:{tag}"


def build_config(model, variants_text, source, text, tag, count, upload, seeds, steps, detector,
                 first_seed=0) -> CompareConfig:
    prompts, prompt_set = collect_prompts(source, text, tag, count, upload)
    config = CompareConfig(model=model, variants=variants_from_text(variants_text), prompts=prompts,
                           prompt_set=prompt_set, seeds=int(seeds), steps=int(steps),
                           first_seed=number(first_seed, "First seed"),
                           detector=None if detector in (None, "", "auto") else detector)
    config.validate()
    return config


def compare_runs() -> list[str]:
    """Comparison folders under the data folder, newest first."""
    return run_names(get_settings().runs_dir, lambda folder: (folder / "compare.json").is_file())


def bar_frame(table: pd.DataFrame) -> pd.DataFrame:
    """Long form for the bar chart: one bar per (tag, variant), coloured by variant.

    Gradio's bar plot stacks bars of one x value, so each (tag, variant) pair gets its own x."""
    rows = [[f"{row['tag']} · {label}", row[label], label] for _, row in table.iterrows() for label in table.columns[1:]]
    return pd.DataFrame(rows, columns=BAR_COLUMNS)


def show_result(run: str | None):
    """(grid HTML, accuracy table, difference table, bar chart) of a finished comparison folder under runs/."""
    if not run:
        return ("", pd.DataFrame(columns=["tag"]), pd.DataFrame(columns=["tag"]),
                gr.update(value=pd.DataFrame(columns=BAR_COLUMNS)))
    folder = get_settings().runs_dir / Path(run).name
    comparison = load_comparison(folder)
    table = accuracy_table(comparison["variants"])
    bars = bar_frame(table)
    # The report's grid and style, at thumbnail size; the table and chart are Gradio's own.
    prompts = len({row["index"] for row in comparison["rows"]})
    per_tag = GRID_PROMPTS_PER_TAG if prompts > GRID_MAX_PROMPTS else None
    note = (f"<p>Showing the first {per_tag} prompts of each tag of {prompts}; the table counts all of them, "
            f"and the HTML report can show every image.</p>" if per_tag else "")
    grid = (f'<style>{STYLE}</style><div class="wb-report" id="compare-grid-table">{note}'
            f'{grid_html(comparison, folder, GRID_IMAGE_SIDE, per_tag)}</div>')
    differences = difference_table(comparison["variants"], comparison["rows"])
    return grid, table, differences, gr.update(value=bars, sort=list(bars["tag / variant"]))


def run_comparison(runner: JobRunner, *inputs):
    """Submit the comparison and follow it; yields (status, grid, table, differences, chart, run picker)."""
    keep = (gr.update(),) * 5
    try:
        config = build_config(*inputs)
        check_detector(config.benchmark())
    except WorkbenchError as error:
        yield (f"Cannot compare: {error}",) + keep
        return
    job_id = runner.submit("compare", config.to_dict())
    follow = follow_job(runner, job_id, 0.5)
    while True:
        try:
            _, line = next(follow)
        except StopIteration as stop:
            job = stop.value
            break
        yield (line,) + keep
    if job.status != JobStatus.DONE:
        yield (f"Comparison {job.status.value}: {job.error or ''}",) + keep
        return
    grid, table, differences, bars = show_result(job_id)
    took = (job.finished_at or 0) - (job.started_at or 0)
    images = len(config.prompts) * config.seeds
    yield (f"Done: {len(config.variants)} variant(s) x {images} image(s) in {took:.1f} s (run `{job_id}`).",
           grid, table, differences, bars, gr.update(choices=compare_runs(), value=job_id))


def report_file(run: str | None):
    """Write the chosen comparison's HTML report into its folder and offer it for download."""
    if not run:
        return gr.update(visible=False), "Choose a comparison first."
    folder = get_settings().runs_dir / Path(run).name
    try:
        path = write_report(folder, folder / "report.html")
    except WorkbenchError as error:
        return gr.update(visible=False), f"No report: {error}"
    return gr.update(value=str(path), visible=True), f"Report written to `{path}`."


def default_steps(model: str) -> int | None:
    """The model's own number of steps; None when the model name is not usable (yet)."""
    try:
        return resolve(model).default_steps
    except WorkbenchError:
        return None


def build_compare_tab(runner: JobRunner) -> tuple:
    """Create the tab inside the current Gradio context; returns (fn, inputs, outputs) that refresh its
    comparison and adapter pickers, for the page load."""
    default_model = get_settings().default_model
    gr.Markdown("Same prompts, same seeds: the base model in the first column, each variant next to it. "
                "✓ the image meets its prompt; ✗ names what it misses (objects, counts, colors, position).")
    with gr.Row():
        with gr.Column():
            model = model_dropdown(default_model)
            with gr.Row():
                adapter_picker = gr.Dropdown(adapter_choices(joined=True), value=None,
                                             label="Add a variant (LoRA adapter, a SELMA run's experts joined, "
                                                   "or a full fine-tune)",
                                             allow_custom_value=True, scale=3, elem_id="compare-adapter")
                weight = gr.Slider(0, 2, value=1.0, step=0.05, label="Weight", scale=1)
            variants = gr.Textbox(label="Variants after the base model, one per line: PATH[:WEIGHT] (join adapters "
                                        "with +; a full fine-tune's pipeline folder replaces the base model)",
                                  lines=3, elem_id="compare-variants")
        with gr.Column():
            source = gr.Radio(SOURCES, value=SOURCES[0], label="Prompts from", elem_id="compare-source")
            with gr.Row():
                tag = gr.Dropdown(["all"] + prompt_tags(), value="all", label="Tag")
                count = gr.Number(4, precision=0, label="Prompts per tag")
            text = gr.Textbox(label="Prompts, one per line", lines=3, elem_id="compare-prompts",
                              placeholder="three red circles\na blue square to the left of a yellow triangle")
            upload = gr.File(label="GenEval prompt file (.jsonl)", file_types=[".jsonl"], type="filepath",
                             elem_id="compare-upload")
            with gr.Row():
                seeds = gr.Slider(1, 8, value=2, step=1, label="Seeds per prompt")
                first_seed = gr.Number(0, precision=0, label="First seed", elem_id="compare-first-seed",
                                       info="4: seeds 4.., images no run's own evaluation drew")
                steps = gr.Slider(1, 100, value=default_steps(default_model) or 20, step=1, label="Steps",
                                  elem_id="compare-steps")
                detector = gr.Dropdown(["auto"] + list(DETECTORS), value="auto", label="Detector",
                                       info="auto: the model's own world", elem_id="compare-detector")
    run_button = gr.Button("Compare", variant="primary", elem_id="compare-button")
    status = gr.Markdown(elem_id="compare-status")
    with gr.Row():  # pictures first, the numbers next to them
        with gr.Column(scale=3):
            grid = gr.HTML(elem_id="compare-grid")
        with gr.Column(scale=2):
            table = gr.Dataframe(pd.DataFrame(columns=["tag"]), label="Accuracy (%) per tag", interactive=False,
                                 elem_id="compare-table")
            differences = gr.Dataframe(
                pd.DataFrame(columns=["tag"]), interactive=False, elem_id="compare-differences",
                label="Each variant minus the first column, in points: [95% CI] of a bootstrap over prompts "
                      "(all their seeds together), p of a paired sign-flip test. These prompts and seeds only; "
                      "another training run can land elsewhere.")
            bars = gr.BarPlot(pd.DataFrame(columns=BAR_COLUMNS), x="tag / variant", y="accuracy", color="variant",
                              y_lim=[0, 100], x_label_angle=-45, title="Accuracy (%) per tag and variant",
                              elem_id="compare-bars")
    with gr.Row():
        run = gr.Dropdown(compare_runs(), value=None, label="Earlier comparisons", scale=3, elem_id="compare-run")
        refresh = gr.Button("Refresh", scale=1)
        report = gr.Button("Write HTML report", scale=1, elem_id="compare-report")
    report_download = gr.File(label="HTML report", interactive=False, visible=False, elem_id="compare-report-file")

    def add_variant(path, current, w):
        if not path:
            return gr.update(), current
        return None, variants_with(current, path, w)

    def show(run_name):
        try:
            return ("",) + show_result(run_name)
        except WorkbenchError as error:
            return (str(error), "", pd.DataFrame(), pd.DataFrame(), gr.update())

    inputs = [model, variants, source, text, tag, count, upload, seeds, steps, detector, first_seed]
    adapter_picker.change(add_variant, [adapter_picker, variants, weight], [adapter_picker, variants])
    model.change(lambda name: default_steps(name) or gr.update(), model, steps)
    upload.upload(lambda: "File", None, source)
    def on_compare(*values):
        yield from run_comparison(runner, *values)

    run_button.click(on_compare, inputs, [status, grid, table, differences, bars, run])
    run.input(show, run, [status, grid, table, differences, bars])
    def runs_and_variants():  # finished since the page was built
        return gr.update(choices=compare_runs()), gr.update(choices=adapter_choices(joined=True))

    refresh.click(lambda: (*runs_and_variants(), gr.update(choices=model_choices())), None, [run, adapter_picker, model])
    report.click(report_file, run, [report_download, status])
    # On page load the app refreshes every model list, this one included.
    return runs_and_variants, None, [run, adapter_picker]
