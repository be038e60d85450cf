"""Train tab, RECAP section: launch a RECAP run (`pipelines.recap`: alt-text data, recaption, a fine-tune on
the alt text and one on the RECAP captions with the same settings, ShapesBench) as a background job,
follow its stages, cancel, continue, and compare base, alt-text and RECAP fine-tunes per tag.

The web data is an imagefolder inside the data folder (the app reads no other), or, left empty, the
shapes world's alt-text dataset rendered into the run. Everything shown is read back from the run
folder and the job store on every timer tick, as in the other sections.
"""

from __future__ import annotations

import gradio as gr
import pandas as pd

from pipelines.recap import CAPTION_MIXES, RecapConfig
from ..datasets import find_imagefolders, imagefolder
from ..errors import InvalidInput
from ..jobs import JobRunner
from ..perception.backends import CAPTIONERS
from ..registry import resolve
from .train_runs import (adapted_layers_picker, model_picker, number, read_json, run_and_config, run_controls,
                         run_folder, runs_of_kind, starter, status_and_log, target_modules)

KIND = "recap"
AUTO = "auto"  # the captioner of the data's world
# table column -> evaluation folder; the two fine-tunes share every setting but their captions
EVALUATIONS = {"base": "eval-base", "alt-text fine-tune": "alt-text/eval", "RECAP fine-tune": "recap/eval"}
DELTA = "RECAP − alt text"
FINE_TUNES = {"alt-text fine-tune": "alt-text", "RECAP fine-tune": "recap"}
ABOUT = ("RECAP: recaption web data (alt text) from the pixels, then fine-tune the model twice with the same "
         "images, settings and seed, once on the alt text and once on the new captions, and compare. Runs are "
         "background jobs; *Continue* resumes from the finished stages and the trainer's checkpoints.")


def recap_runs() -> list[str]:
    """RECAP run folders under the data folder, newest first."""
    return runs_of_kind(KIND)


# --- reading a run ----------------------------------------------------------------------------------


def score_table(run: str | None) -> pd.DataFrame:
    """ShapesBench accuracy (%) per tag and overall of base, alt-text and RECAP fine-tunes, as far as scored."""
    folder = run_folder(run)
    found = {column: scores for column, name in EVALUATIONS.items()
             if folder and (scores := read_json(folder / name / "scores.json"))}
    columns = ["tag", *EVALUATIONS, DELTA]
    tags = list(dict.fromkeys(tag for scores in found.values() for tag in scores.get("per_tag", {})))
    rows = []
    for tag in tags + (["overall"] if found else []):
        values = {c: s["overall"] if tag == "overall" else s["per_tag"].get(tag, {}).get("accuracy")
                  for c, s in found.items()}
        values = {c: None if v is None else round(100 * v, 1) for c, v in values.items()}
        recap, alt = values.get("RECAP fine-tune"), values.get("alt-text fine-tune")
        rows.append([tag, *(values.get(c) for c in EVALUATIONS), None if recap is None or alt is None
                     else round(recap - alt, 1)])
    return pd.DataFrame(rows, columns=columns)


def stage_line(run: str | None) -> str:
    """Which stages are done on disk: data, recaption, the two fine-tunes, evaluations."""
    folder, config = run_and_config(run)
    if config is None:
        return ""
    def mark(done: bool) -> str:
        return "✓" if done else "–"

    recaption = read_json(folder / "recaptioned" / "recaption.json") or {}
    marks = {"data": "given" if config.get("data") else mark((folder / "data" / "dataset.json").exists()),
             "recaption": mark(recaption.get("done"))}
    marks |= {what: mark((folder / name / "adapter" / "done").exists()) for what, name in FINE_TUNES.items()}
    scored = sum((folder / name / "scores.json").exists() for name in EVALUATIONS.values())
    marks["evaluations"] = f"{scored}/{len(EVALUATIONS)}" if config.get("eval_seeds") else "none asked"
    return "Stages done: " + " · ".join(f"{what} {done}" for what, done in marks.items())


def adapters_markdown(run: str | None) -> str:
    """Where the two fine-tunes are, and how good each caption is where the truth is known."""
    folder, config = run_and_config(run)
    if config is None:
        return ""
    lines = []
    for what, name in FINE_TUNES.items():
        if (folder / name / "adapter" / "done").exists():
            where = folder / name / "adapter"
            lines.append(f"- {what}: `{where}`" if config.get("lora", True) else
                         f"- {what}: a whole model, `{where / 'pipeline'}` (choose it as the model to use it)")
    text = ("**Fine-tunes** (LoRAs are listed in the Compare tab):\n" + "\n".join(lines)) if lines else \
        "No fine-tune finished yet."
    exact = ((read_json(folder / "summary.json") or {}).get("captions") or {}).get("exact_share")
    if exact:
        text += (f"\n\nCaptions that state the scene exactly: alt text {exact['alt_text']:.0%}, RECAP long caption "
                 f"{exact['long_caption']:.0%}.")
    return text


def recap_status(runner: JobRunner, run, job_id):
    """Status, log, per-tag table and fine-tunes of the chosen run."""
    status, log = status_and_log(runner, run, job_id, KIND, stage_line(run))
    return status, log, score_table(run), adapters_markdown(run)


# --- starting ---------------------------------------------------------------------------------------


def recap_config(model, data, images, captioner, captions, steps, rank, lr, prompt_dropout, method,
                 eval_seeds, inline_pairs=RecapConfig.inline_pairs, adapted_layers=None,
                 skip_unreadable=False, train_text_encoder=RecapConfig.train_text_encoder,
                 train_unet=RecapConfig.train_unet) -> RecapConfig:
    """The section's settings as a validated RecapConfig; InvalidInput says what is wrong."""
    resolve(model)  # an unknown model is refused now, not when the job starts
    rank, lr = number(rank, "LoRA rank"), number(lr, "Learning rate", float)
    if rank < 1:
        raise InvalidInput(f"The LoRA rank must be at least 1 (got {rank}).")
    if not lr > 0:
        raise InvalidInput(f"The learning rate must be positive (got {lr}).")
    config = RecapConfig(model=model.strip(), data=str(imagefolder(data)) if (data or "").strip() else None,
                         images=number(images, "Images to render"),
                         captioner=None if captioner in (None, "", AUTO) else captioner, captions=captions,
                         steps=number(steps, "Steps"), rank=rank, alpha=float(rank), lr=lr,
                         prompt_dropout=number(prompt_dropout, "Prompt dropout", float), lora=method == "LoRA",
                         eval_seeds=number(eval_seeds, "ShapesBench seeds"), inline_pairs=bool(inline_pairs),
                         target_modules=target_modules(adapted_layers, RecapConfig().target_modules),
                         skip_unreadable=bool(skip_unreadable), train_text_encoder=bool(train_text_encoder),
                         train_unet=bool(train_unet))
    config.validate()
    return config


# start_recap_run(runner, *settings): submit a RECAP job from the section's settings, in recap_config's order
start_recap_run = starter(KIND, "RECAP", recap_config)


# --- the section ------------------------------------------------------------------------------------


def build_recap_section(runner: JobRunner):
    """Create the section in the current Gradio context; returns (function, inputs, outputs) for its tab's select."""
    defaults = RecapConfig()
    gr.Markdown(ABOUT)
    with gr.Row():
        with gr.Column():
            model = model_picker()
            data = gr.Dropdown(find_imagefolders(), value=None, allow_custom_value=True,
                               label="Web data: an imagefolder in the data folder (empty: render the shapes world's "
                                     "alt-text dataset)")
            images = gr.Number(defaults.images, label="Shapes images to render", precision=0)
            captioner = gr.Dropdown([AUTO] + list(CAPTIONERS), value=AUTO,
                                    label="Captioner (auto: shapes for rendered data, else blip)")
            captions = gr.Radio(list(CAPTION_MIXES), value=defaults.captions, label="RECAP captions",
                                info="mix: short or long with p = 0.5 each time an image is drawn (the paper's best)")
            inline_pairs = gr.Checkbox(defaults.inline_pairs, label="Shapes captioner: say a related pair in one "
                                                                    "phrase (\"a circle to the left of a square\")")
            skip_unreadable = gr.Checkbox(False, label="Skip unreadable images",
                                          info="leave out images that cannot be read instead of stopping the run")
        with gr.Column():
            steps = gr.Number(defaults.steps, label="Training steps (each fine-tune)", precision=0)
            rank = gr.Number(defaults.rank, label="LoRA rank", precision=0)
            adapted_layers = adapted_layers_picker(defaults.target_modules)
            train_text_encoder = gr.Checkbox(defaults.train_text_encoder, label="LoRA on the text encoder too")
            train_unet = gr.Checkbox(defaults.train_unet, label="LoRA on the UNet",
                                     info="off (with the text encoder on): both fine-tunes adapt the text encoder "
                                          "only; the UNet stays the base model's")
            lr = gr.Number(defaults.lr, label="Learning rate")
            prompt_dropout = gr.Number(defaults.prompt_dropout, label="Prompt dropout (the paper: 0.14)")
            method = gr.Radio(["LoRA", "Full"], value="LoRA", label="Fine-tuning")
            eval_seeds = gr.Number(defaults.eval_seeds, label="ShapesBench seeds per prompt (0: no evaluation)",
                                   precision=0)
    controls = run_controls(runner, KIND, "RECAP", start_recap_run,
                            [model, data, images, captioner, captions, steps, rank, lr, prompt_dropout, method,
                             eval_seeds, inline_pairs, adapted_layers, skip_unreadable, train_text_encoder,
                             train_unet], "recap-status")
    table = gr.Dataframe(pd.DataFrame(columns=["tag", *EVALUATIONS, DELTA]), interactive=False,
                         label="ShapesBench accuracy (%) per tag: base vs alt-text vs RECAP fine-tune")
    adapters = gr.Markdown(elem_id="recap-adapters")
    log = gr.Textbox(label="Log", lines=12, max_lines=24, autoscroll=True)
    controls.follow(lambda r, j: recap_status(runner, r, j), outputs=[log, table, adapters])

    def refresh():  # runs started elsewhere, datasets made in the Data tab
        return gr.update(choices=recap_runs()), gr.update(choices=find_imagefolders())

    return refresh, None, [controls.run, data]
