"""Train tab, RealignDiff section: launch a ReFL run (the coarse stage, `pipelines.realign`) as a
background job, follow its reward per step, cancel, continue, compare base and ReFL on ShapesBench.

As in the IPR section, everything shown is read back from the job store and the run folder
(config.json, history.jsonl, eval-base/ and eval/, summary.json) on every timer tick.
"""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr
import pandas as pd

from ..datasets import imagefolder
from ..errors import InvalidInput
from ..registry import resolve
from ..skills import world_of
from ..jobs import JobRunner
from .train_runs import (model_picker, number, optional_number, read_json, run_and_config, run_controls,
                         run_folder, runs_of_kind, starter, status_and_log)

KIND = "refl"
HISTORY_COLUMNS = ["step", "reward", "pretrain_loss", "grad_step"]
COMPARISON_COLUMNS = ["metric", "base", "ReFL", "change"]
EVALUATIONS = {"base": "eval-base", "ReFL": "eval"}  # table column -> evaluation folder


def refl_runs() -> list[str]:
    """ReFL run folders under the data folder, newest first."""
    return runs_of_kind(KIND)


# --- reading a run ----------------------------------------------------------------------------------


def history_rows(folder: Path | None) -> list[dict]:
    """history.jsonl's rows, the last one per step (a crash redoes the steps after its checkpoint)."""
    path = folder / "history.jsonl" if folder else None
    if path is None or not path.exists():
        return []
    by_step = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # the line being appended right now
        if isinstance(row, dict) and "step" in row:
            by_step[row["step"]] = row
    return [by_step[step] for step in sorted(by_step)]


def history_frame(run: str | None, smoothing: int = 1) -> pd.DataFrame:
    """Reward and pre-training loss per step; smoothing > 1 is a trailing moving average over that many steps."""
    frame = pd.DataFrame(history_rows(run_folder(run)), columns=HISTORY_COLUMNS)
    window = max(1, int(smoothing or 1))
    if window > 1 and not frame.empty:
        for column in ("reward", "pretrain_loss"):
            frame[column] = frame[column].astype(float).rolling(window, min_periods=1).mean()
    return frame


def evaluation(folder: Path, name: str) -> dict | None:
    """An evaluation's scores (per_tag, overall) and eq. 4 caption reward, from summary.json when the
    run has finished, else from the evaluation folder as far as it got."""
    summary = read_json(folder / "summary.json") or {}
    scores = summary.get(name) or read_json(folder / name / "scores.json")
    if scores is None:
        return None
    if "caption_reward" not in scores and (cached := read_json(folder / name / "caption_reward.json")):
        scores = {**scores, "caption_reward": cached.get("mean")}
    return scores


def comparison_table(run: str | None) -> pd.DataFrame:
    """Base model vs ReFL adapter: ShapesBench accuracy (%) per tag and overall, and the caption reward."""
    folder = run_folder(run)
    found = {column: evaluation(folder, name) for column, name in EVALUATIONS.items()} if folder else {}
    found = {column: scores for column, scores in found.items() if scores}
    if not found:
        return pd.DataFrame(columns=COMPARISON_COLUMNS)
    tags = list(dict.fromkeys(tag for scores in found.values() for tag in scores.get("per_tag", {})))

    def accuracy(scores: dict, tag: str):
        value = scores.get("overall") if tag == "overall" else scores.get("per_tag", {}).get(tag, {}).get("accuracy")
        return None if value is None else round(100 * value, 1)

    def row(metric: str, values: dict) -> list:
        base, tuned = values.get("base"), values.get("ReFL")
        change = None if base is None or tuned is None else round(tuned - base, 4)
        return [metric, base, tuned, change]

    rows = [row(f"{tag} (%)", {c: accuracy(s, tag) for c, s in found.items()}) for tag in tags + ["overall"]]
    rewards = {c: round(s["caption_reward"], 4) for c, s in found.items() if s.get("caption_reward") is not None}
    rows.append(row("caption reward (eq. 4)", rewards))
    return pd.DataFrame(rows, columns=COMPARISON_COLUMNS)


def run_progress(run: str | None) -> str:
    """Where a run stands on disk: steps done, recent reward, adapter, evaluations."""
    folder, config = run_and_config(run)
    if config is None:
        return ""
    rows = history_rows(folder)
    parts = [f"step {rows[-1]['step'] if rows else 0}/{config.get('steps', '?')}"]
    if rows:
        recent = rows[-10:]
        parts.append(f"reward (last {len(recent)} steps) {sum(r['reward'] for r in recent) / len(recent):.4f}")
    if (folder / "adapter" / "done").exists():
        parts.append(f"adapter in `{folder / 'adapter'}`")
    if (folder / "summary.json").exists():
        parts.append("evaluated" if config.get("eval_seeds") else "finished (no evaluation)")
    return "Run: " + ", ".join(parts)


def refl_status(runner: JobRunner, run, job_id, smoothing=1):
    """Status line, log, history plot data and comparison table for the chosen run."""
    status, log = status_and_log(runner, run, job_id, KIND, run_progress(run))
    return status, log, history_frame(run, smoothing), comparison_table(run)


# --- starting ---------------------------------------------------------------------------------------


def refl_config(model, steps, batch, lr, rank, reward_weight, schedule_steps, first_grad_step, guidance,
                pretrain_batch, pretrain_data, eval_seeds, negatives=0, train_text_encoder=False, train_unet=True):
    """The tab's settings as a validated ReFLConfig; InvalidInput says what is wrong."""
    from pipelines.realign import ReFLConfig

    resolve(model)  # an unknown model is refused now, not when the job starts
    # Inside the data folder, relative paths read from there (as IPR's prior data and RECAP's data).
    pretrain_data = str(imagefolder(pretrain_data.strip())) if (pretrain_data or "").strip() else None
    rank = number(rank, "LoRA rank")
    config = ReFLConfig(model=model.strip(), steps=number(steps, "Steps"), batch_size=number(batch, "Batch size"),
                        lr=number(lr, "Learning rate", float), rank=rank, alpha=float(rank),
                        reward_weight=None if reward_weight in (None, "") else number(reward_weight, "Reward weight λ", float),
                        schedule_steps=number(schedule_steps, "Sampling steps"),
                        first_grad_step=number(first_grad_step, "First gradient step"),
                        guidance=None if guidance in (None, "") else number(guidance, "Guidance", float),
                        pretrain_batch=number(pretrain_batch, "Pre-training batch"), pretrain_data=pretrain_data,
                        eval_seeds=number(eval_seeds, "ShapesBench seeds"),
                        negatives=number(negatives, "Hard negatives"), train_text_encoder=bool(train_text_encoder),
                        train_unet=bool(train_unet))
    if config.rank < 1 or config.pretrain_batch < 0:
        raise InvalidInput("The LoRA rank must be at least 1 and the pre-training batch at least 0.")
    if world_of(config.model) != "shapes" and pretrain_data is None and config.pretrain_batch:
        raise InvalidInput("A model other than the shapes model needs pre-training data for eq. 5's denoising "
                           "term: give an imagefolder, or set the pre-training batch to 0 to train on the reward "
                           "alone.")
    config.validate()
    return config


# start_refl_run(runner, *settings): submit a ReFL job from the tab's settings, in refl_config's order
start_refl_run = starter(KIND, "ReFL", refl_config)


# --- the section ------------------------------------------------------------------------------------


def build_refl_section(runner: JobRunner):
    """Create the section in the current Gradio context; returns (function, inputs, outputs) for its tab's select."""
    gr.Markdown("RealignDiff's coarse stage: reward feedback learning (ReFL) of a LoRA. Each step samples "
                "prompts from noise down to a random late step, takes that step with gradients and descends "
                "λ · ReLU(−log p(prompt | x₀)) under the captioner, plus the ordinary denoising loss on "
                "pre-training data (eq. 5). Runs are background jobs; *Continue* resumes from the last checkpoint.")
    with gr.Row():
        with gr.Column():
            model = model_picker()
            steps = gr.Number(300, label="Training steps", precision=0)
            batch = gr.Number(8, label="Batch size (prompts per step)", precision=0)
            lr = gr.Number(1e-4, label="Learning rate")
            rank = gr.Number(8, label="LoRA rank", precision=0)
            train_text_encoder = gr.Checkbox(False, label="Train a text-encoder LoRA too")
            train_unet = gr.Checkbox(True, label="Train the UNet's LoRA",
                                     info="off (with the text encoder on): the reward reaches only the text "
                                          "encoder and cannot repaint pixels")
            reward_weight = optional_number("Reward weight λ (eq. 5; empty: balance the reward's and the denoising "
                                            "loss's gradients)", elem_id="refl-reward-weight")
            negatives = gr.Number(0, label="Hard negatives (0: the plain likelihood)", precision=0,
                                  info="k > 0: reward the prompt's likelihood against k copies with one fact "
                                       "changed (colours swapped, relation flipped, ...), which one-colour "
                                       "painting cannot game")
        with gr.Column():
            schedule_steps = gr.Number(20, label="Sampling steps", precision=0)
            first_grad_step = gr.Number(15, label="First gradient step", precision=0,
                                        info="the gradient step is drawn from [first, sampling steps)")
            guidance = optional_number("Guidance while training (empty: the model's default)", elem_id="refl-guidance",
                                       info="on the shapes model, 3 or more makes the one-step gradient blind "
                                            "to what a step does; 1 lets the reward climb "
                                            "(bench/refl_landscape.py)")
            pretrain_batch = gr.Number(16, label="Pre-training batch (0: reward only)", precision=0)
            pretrain_data = gr.Textbox(label="Pre-training data (imagefolder; the shapes model renders its own)",
                                       placeholder="path/to/imagefolder")
            eval_seeds = gr.Number(4, label="ShapesBench seeds per prompt (0: no evaluation)", precision=0)
    controls = run_controls(runner, KIND, "ReFL", start_refl_run,
                            [model, steps, batch, lr, rank, reward_weight, schedule_steps, first_grad_step, guidance,
                             pretrain_batch, pretrain_data, eval_seeds, negatives, train_text_encoder, train_unet],
                            "refl-status")
    smoothing = gr.Slider(1, 50, value=10, step=1, label="Smoothing (moving average over steps; 1: raw)")
    empty = pd.DataFrame(columns=HISTORY_COLUMNS)
    with gr.Row():
        reward_plot = gr.LinePlot(empty, x="step", y="reward", y_title="log p(prompt | x₀)",
                                  title="Reward per step (higher is better)")
        loss_plot = gr.LinePlot(empty, x="step", y="pretrain_loss", y_title="loss",
                                title="Pre-training denoising loss per step")
    table = gr.Dataframe(pd.DataFrame(columns=COMPARISON_COLUMNS), interactive=False,
                         label="Base model vs ReFL adapter: ShapesBench accuracy (%) per tag, caption reward")
    log = gr.Textbox(label="Log", lines=12, max_lines=24, autoscroll=True)

    def show(r, j, s):
        status_text, log_text, frame, comparison = refl_status(runner, r, j, s)
        return status_text, log_text, frame, frame, comparison

    controls.follow(show, [smoothing], [log, reward_plot, loss_plot, table], triggers=[smoothing.change])
    return lambda: gr.update(choices=refl_runs()), None, controls.run
