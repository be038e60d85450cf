"""Train tab: launch a training run as a background job, follow it live, cancel, resume, plot its
metrics; one inner tab per method: IPR here, RealignDiff's ReFL (`train_refl`), SELMA
(`train_selma`) and RECAP (`train_recap`).

The sections share the run helpers and the start / follow / cancel / continue layout of `train_runs`.
Everything shown is read back from the job store and the run folder on every timer tick, so a page
reload or an app restart loses nothing: pick the run again and its state is there.
"""

from __future__ import annotations

import functools
from pathlib import Path

import gradio as gr
import pandas as pd

from ..errors import InvalidInput, WorkbenchError
from ..jobs import JobRunner
from ..registry import resolve
from .train_runs import (adapted_layers_picker, continue_run, latest_job_for, model_picker, number,
                         optional_number, run_controls, run_folder, runs_of_kind, status_and_log, submit_run, target_modules)

METRIC_COLUMNS = ["iteration", "tag", "accuracy"]


def ipr_runs() -> list[str]:
    """IPR run folders under the data folder, newest first."""
    return runs_of_kind("ipr")


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


GAIN_COLUMN = "overall − base [95% CI]"


def metrics_table(frame: pd.DataFrame, run: str | None = None) -> pd.DataFrame:
    """One row per iteration, one column per tag: what a researcher compares; with the run, each
    iteration's overall gain over the base model and how sure it is (`workbench.significance`)."""
    if frame.empty:
        return pd.DataFrame(columns=["iteration"])
    table = frame.pivot(index="iteration", columns="tag", values="accuracy").reset_index()
    table = table[["iteration"] + list(dict.fromkeys(frame["tag"]))]  # the benchmark's tag order, not A to Z
    table.columns.name = None
    folder = run_folder(run) if run else None
    if folder is not None:
        gains = overall_gains(str(folder), _verdict_times(folder))
        table[GAIN_COLUMN] = [gains.get(int(k), "") for k in table["iteration"]]
    return table


def _verdict_times(folder) -> tuple:
    """When each evaluation's verdicts last changed: the cache key of overall_gains."""
    files = [*folder.glob("eval-base/verdicts.jsonl"), *folder.glob("iteration-*/eval/verdicts.jsonl")]
    return tuple(sorted((str(p), p.stat().st_mtime_ns) for p in files))


@functools.lru_cache(maxsize=32)
def overall_gains(folder: str, verdict_times: tuple) -> dict[int, str]:
    """iteration -> "+6.6 [+3.6, +9.6]" against the run's base evaluation (cached: the timer polls).
    `load_comparison` labels an IPR run's evaluations "base", "iteration 1", "iteration 2", ..."""
    from ..report import load_comparison
    from ..significance import against_first

    try:
        comparison = load_comparison(Path(folder))
        if not comparison["variants"] or comparison["variants"][0]["label"] != "base":
            return {}
        results = against_first(comparison["variants"], comparison["rows"])
    except WorkbenchError:  # an evaluation being written, or of other prompts: no figure rather than a wrong one
        return {}
    gains = {}
    for label, differences in results:
        overall = differences[-1]
        iteration = int(label.split()[-1]) if label.startswith("iteration ") else None
        if iteration is not None:
            gains[iteration] = overall.summary_text()
    return gains


def start_run(runner: JobRunner, model, iterations, prompts, samples, method, rank, steps, batch, lr, weighting,
              review, eval_seeds, min_confidence=None, adapter_start=None, prompt_kinds=None,
              train_text_encoder=None, prior_images=None, prior_data=None, adapted_layers=None, mirror=None,
              adapter_seeds=None, lowest_timestep=None, train_unet=None):
    from pipelines.ipr import IPRConfig
    from workbench.datasets import imagefolder

    defaults = IPRConfig()

    def settings() -> dict:
        resolve(model)  # an unknown model is refused now, not when the job starts
        if prompt_kinds is not None and not list(prompt_kinds):
            raise InvalidInput("Tick at least one kind of training prompt.")
        config = IPRConfig(model=model, iterations=number(iterations, "Iterations"),
                           prompts=number(prompts, "Training prompts"),
                           samples_per_prompt=number(samples, "Images per prompt"), lora=method == "LoRA",
                           rank=number(rank, "LoRA rank"), alpha=number(rank, "LoRA rank", float),
                           steps=number(steps, "Training steps per iteration"), batch_size=number(batch, "Batch size"),
                           lr=number(lr, "Learning rate", float), weighting=weighting,
                           review=bool(review), eval_seeds=number(eval_seeds, "ShapesBench seeds per prompt"),
                           min_confidence=(None if min_confidence in (None, "")
                                           else number(min_confidence, "Minimum detector confidence", float)),
                           continue_adapter=(defaults.continue_adapter if adapter_start is None
                                             else adapter_start == ADAPTER_STARTS[0]),
                           prompt_kinds=defaults.prompt_kinds if prompt_kinds is None else list(prompt_kinds),
                           train_text_encoder=(defaults.train_text_encoder if train_text_encoder is None
                                               else bool(train_text_encoder)),
                           train_unet=defaults.train_unet if train_unet is None else bool(train_unet),
                           prior_images=number(prior_images or 0, "Prior-preservation images"),
                           target_modules=target_modules(adapted_layers, defaults.target_modules),
                           mirror=defaults.mirror if mirror is None else bool(mirror),
                           adapter_seeds=(defaults.adapter_seeds if adapter_seeds in (None, "")
                                          else number(adapter_seeds, "Adapters averaged per iteration")),
                           timestep_range=(defaults.timestep_range if lowest_timestep in (None, "")
                                           else [number(lowest_timestep, "Lowest training timestep", float), 1.0]),
                           prior_data=str(imagefolder(prior_data.strip())) if (prior_data or "").strip() else None)
        config.validate()
        return config.__dict__

    return submit_run(runner, "ipr", "IPR", settings)


# How each iteration's adapter starts (IPRConfig.continue_adapter True / False).
ADAPTER_STARTS = ("continue the previous iteration's", "afresh from the base model")


def run_status(runner: JobRunner, run, job_id):
    """Status line, log, metrics plot data and table for the chosen run."""
    job = latest_job_for(runner, run, job_id)
    waiting = ""
    if job is not None and job.outputs.get("status") == "awaiting_review":
        waiting = (f"Iteration {job.outputs['iteration'] + 1} waits for review: check its relabels in the "
                   f"Review tab, then press *Reviewed: continue*.")
    status, log = status_and_log(runner, run, job.id if job else None, "ipr", waiting)
    frame = metrics_frame(run)
    # Iterations as categories on the plot's x axis: whole numbers, not ticks at 0.1, 0.2, ...
    plot = frame.assign(iteration=frame["iteration"].astype(str))
    return status, log, plot, metrics_table(frame, run)


def build_train_tab(runner: JobRunner) -> gr.Dropdown:
    """Create the tab inside the current Gradio context, one inner tab per method; returns the IPR run
    picker (refreshed on load); the other pickers (and SELMA's skills) refresh when their tab is opened."""
    from .train_recap import build_recap_section  # they build on train_runs, as this module does
    from .train_refl import build_refl_section
    from .train_selma import build_selma_section

    with gr.Tabs():
        with gr.Tab("IPR: Iterative Prompt Relabeling"):
            run = build_ipr_section(runner)
        for label, build in (("RealignDiff: ReFL (coarse stage)", build_refl_section),
                             ("SELMA: skill experts, merged", build_selma_section),
                             ("RECAP: recaptioned fine-tuning", build_recap_section)):
            with gr.Tab(label) as tab:
                refresh = build(runner)
            tab.select(*refresh)
    return run


def build_ipr_section(runner: JobRunner) -> gr.Dropdown:
    from pipelines.ipr import IPRConfig
    from workbench.shapes.bench_prompts import TRAINING_KINDS

    defaults = IPRConfig()
    gr.Markdown("Iterative Prompt Relabeling: sample, detect, relabel, fine-tune, evaluate, repeat. "
                "Runs are background jobs; they continue after a crash or cancel with *Continue*.")
    with gr.Row():
        with gr.Column():
            model = model_picker()
            iterations = gr.Slider(1, 5, value=2, step=1, label="Iterations")
            prompts = gr.Number(500, label="Training prompts", precision=0)
            samples = gr.Number(3, label="Images per prompt", precision=0)
            method = gr.Radio(["LoRA", "Full"], value="LoRA", label="Fine-tuning")
            rank = gr.Number(8, label="LoRA rank", precision=0)
            adapted_layers = adapted_layers_picker(defaults.target_modules)
            train_text_encoder = gr.Checkbox(defaults.train_text_encoder, label="Train the text encoder (LoRA)")
            train_unet = gr.Checkbox(defaults.train_unet, label="Train the UNet too",
                                     info="off (the default): the text encoder's LoRA alone; the model learns to read "
                                          "prompts and draws as the base model does")
        with gr.Column():
            steps = gr.Number(800, label="Training steps per iteration", precision=0)
            batch = gr.Number(32, label="Batch size", precision=0)
            lr = gr.Number(5e-4, label="Learning rate")
            adapter_seeds = gr.Number(defaults.adapter_seeds, label="Adapters averaged per iteration", precision=0,
                                      info="trained on the same pairs with different seeds and averaged (a model "
                                           "soup; that many times the training time; LoRA trained afresh only)")
            lowest_timestep = gr.Slider(0.0, 0.9, value=defaults.timestep_range[0], step=0.05,
                                        label="Train timesteps from this share of the noise schedule up",
                                        info="0: all of it; 0.5: the noisier half only, where the layout is decided "
                                             "(not in the paper)")
            weighting = gr.Radio(["relabel", "detector"], value="relabel", label="Loss re-scaling",
                                 info="relabel: 1.0 matched / 0.5 relabeled; detector: also x detector confidence")
            min_confidence = optional_number("Minimum detector confidence",
                                             info="samples with an object the detector finds but scores below this "
                                                  "are not trained on (blank: the detector's own, 0.9 for the shapes "
                                                  "detector; 0: keep all)", elem_id="ipr-min-confidence")
            adapter_start = gr.Radio(list(ADAPTER_STARTS),
                                     value=ADAPTER_STARTS[0 if defaults.continue_adapter else 1],
                                     label="Each iteration's adapter starts from",
                                     info="either way it trains on the pairs of every iteration so far")
            prompt_kinds = gr.CheckboxGroup(list(TRAINING_KINDS), value=list(defaults.prompt_kinds or TRAINING_KINDS),
                                            label="Kinds of training prompt (the paper: position only)")
            with gr.Row():
                prior_images = gr.Number(0, label="Prior-preservation images (shapes model; 0: off)", precision=0,
                                         info="pre-training scenes mixed into every iteration's training set, "
                                              "against drift (not in the paper)")
                prior_data = gr.Textbox(label="Prior-preservation imagefolder (other models)")
            mirror = gr.Checkbox(defaults.mirror, label="Mirror images too, left and right swapped in their captions",
                                 info="each image flipped with p = 0.5 under the caption its mirror earns (not in "
                                      "the paper)")
            review = gr.Checkbox(False, label="Pause after each relabeling for a manual review")
            eval_seeds = gr.Number(4, label="ShapesBench seeds per prompt (0: no evaluation)", precision=0)
    controls = run_controls(runner, "ipr", "IPR", start_run,
                            [model, iterations, prompts, samples, method, rank, steps, batch, lr, weighting, review,
                             eval_seeds, min_confidence, adapter_start, prompt_kinds, train_text_encoder, prior_images,
                             prior_data, adapted_layers, mirror, adapter_seeds, lowest_timestep, train_unet],
                            "train-status",
                            extra_buttons=["Reviewed: continue"])
    plot = gr.LinePlot(pd.DataFrame(columns=METRIC_COLUMNS), x="iteration", y="accuracy", color="tag",
                       title="ShapesBench accuracy (%) per iteration (0 = base model)")
    table = gr.Dataframe(metrics_table(pd.DataFrame()), label="Accuracy (%) per tag", interactive=False)
    log = gr.Textbox(label="Log", lines=12, max_lines=24, autoscroll=True)

    controls.buttons["Reviewed: continue"].click(lambda r: continue_run(runner, r, True), controls.run,
                                                 [controls.job, controls.notice])
    controls.follow(lambda r, j: run_status(runner, r, j), outputs=[log, plot, table])
    return controls.run
