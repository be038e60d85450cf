"""Train tab, SELMA section: launch a SELMA run (`pipelines.selma`: LLM skill prompts, images, one LoRA
expert per skill, the mixed-data LoRA, the merge, ShapesBench) as a background job, follow its stages,
cancel, continue, and compare base, mixed LoRA and merged experts per tag.

Everything shown is read back from the run folder (config.json, prompts/, data/, experts/, mixed/,
merged/, eval-*/) and the job store on every timer tick, as in the other sections.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pandas as pd

from pipelines.selma import IMAGE_CHECKS, MERGES, SelmaConfig
from ..jobs import JobRunner
from ..llm import LLMS, check_llm
from ..rouge import DEFAULT_THRESHOLD
from ..skills import builtin_skills
from .data_skills import skill_choices, skills_update, stats_frame, world
from .train_runs import (adapted_layers_picker, continue_run, model_picker, number, read_json, run_and_config,
                         run_controls, runs_of_kind, starter, status_and_log, target_modules)

KIND = "selma"
AUTO = "auto"  # the LLM of the model's world
SCORE_EXPERTS = "Continue, scoring each expert"
ABOUT = ("SELMA: an LLM writes prompts for each skill (ROUGE-L filtered), the model draws them, one LoRA "
         "expert is trained per skill and the experts are merged; a single LoRA on all skills' data mixed is "
         "the baseline. Runs are background jobs; *Continue* resumes from the finished stages.")


def selma_runs() -> list[str]:
    """SELMA run folders under the data folder, newest first."""
    return runs_of_kind(KIND)


# --- reading a run ----------------------------------------------------------------------------------


def run_skills(config: dict) -> list[str]:
    """The skill names of a run's config.json (None there: its world's built-in skills)."""
    return config.get("skills") or list(builtin_skills(world(config.get("model", ""))))


def variant_folders(config: dict) -> dict[str, str]:
    """Table row -> evaluation folder, in the order the paper compares them."""
    rows = {"base model": "eval-base", "single LoRA, mixed data": "eval-mixed",
            f"merged experts ({config.get('merge', 'set_adapters')})": "eval-merged"}
    return rows | {f"expert {name}": f"eval-expert-{name}" for name in run_skills(config)}


def score_table(run: str | None) -> pd.DataFrame:
    """ShapesBench accuracy (%) per tag of every variant scored so far: base, mixed LoRA, merged, experts."""
    folder, config = run_and_config(run)
    if config is None:
        return pd.DataFrame(columns=["variant"])
    found = {label: scores for label, name in variant_folders(config).items()
             if (scores := read_json(folder / name / "scores.json"))}
    tags = list(dict.fromkeys(tag for scores in found.values() for tag in scores.get("per_tag", {})))
    rows = [[label] + [round(100 * scores["per_tag"][tag]["accuracy"], 1) if tag in scores["per_tag"] else None
                       for tag in tags] + [round(100 * scores["overall"], 1)] for label, scores in found.items()]
    return pd.DataFrame(rows, columns=["variant"] + tags + ["overall"])


def prompt_records(run: str | None) -> list[dict]:
    folder, config = run_and_config(run)
    records = [read_json(folder / "prompts" / f"{name}.json") for name in run_skills(config)] if config else []
    return [record for record in records if record]


def stage_line(run: str | None) -> str:
    """Which stages are done on disk: prompts, images, experts, mixed LoRA, merge, evaluations."""
    folder, config = run_and_config(run)
    if config is None:
        return ""
    skills = run_skills(config)

    def count(paths: list[Path]) -> str:
        return f"{sum(p.exists() for p in paths)}/{len(paths)}"

    # Experts are scored when the run asked, or when a continuation added it (config.json keeps the first ask).
    experts_scored = config.get("eval_experts") or any((folder / f"eval-expert-{s}").exists() for s in skills)
    evaluations = [folder / name / "scores.json" for label, name in variant_folders(config).items()
                   if experts_scored or not label.startswith("expert ")]
    if not config.get("baseline", True):
        evaluations = [path for path in evaluations if path.parent.name != "eval-mixed"]
    parts = [f"prompts {count([folder / 'prompts' / f'{s}.json' for s in skills])}",
             f"images {count([folder / 'data' / s / 'metadata.jsonl' for s in skills])}",
             *([f"checked {count([folder / 'data' / s / 'checked' / 'metadata.jsonl' for s in skills])}"]
               if config.get("image_check", "none") != "none" else []),
             f"experts {count([folder / 'experts' / s / 'done' for s in skills])}",
             f"mixed LoRA {count([folder / 'mixed' / 'done'] if config.get('baseline', True) else [])}",
             f"merge {count([folder / 'merged' / 'merge.json'])}",
             f"evaluations {count(evaluations if config.get('eval_seeds') else [])}"]
    return "Stages done: " + " · ".join(parts)


def adapters_markdown(run: str | None) -> str:
    """Where the run's adapters are (they are listed in the Compare tab too)."""
    folder, config = run_and_config(run)
    if config is None:
        return ""
    lines = [f"- {what}: `{path}`" for what, path in
             [("merged experts, one fused adapter", folder / "merged"), ("single LoRA on mixed data", folder / "mixed")]
             + [(f"expert {name}", folder / "experts" / name) for name in run_skills(config)]
             if (path / "pytorch_lora_weights.safetensors").is_file()]
    if not lines:
        return "No adapter trained yet."
    return ("**Adapters** (the Compare tab lists each, and all experts joined at the merge weights):\n"
            + "\n".join(lines))


def selma_status(runner: JobRunner, run, job_id):
    """Status, log, per-tag table, prompt statistics and adapters of the chosen run."""
    status, log = status_and_log(runner, run, job_id, KIND, stage_line(run))
    return status, log, score_table(run), stats_frame(prompt_records(run)), adapters_markdown(run)


# --- starting ---------------------------------------------------------------------------------------


def selma_config(model, image_model, llm, skills, prompts_per_skill, rouge_threshold, samples, steps, rank, lr,
                 merge, eval_seeds, eval_experts, image_check="none", train_text_encoder=False,
                 adapted_layers=None, train_unet=True) -> SelmaConfig:
    """The section's settings as a validated SelmaConfig; InvalidInput says what is wrong."""
    rank = number(rank, "LoRA rank")
    config = SelmaConfig(model=(model or "").strip(), image_model=(image_model or "").strip() or None,
                         llm=None if llm in (None, "", AUTO) else llm, skills=list(skills or []),
                         prompts_per_skill=number(prompts_per_skill, "Prompts per skill"),
                         rouge_threshold=number(rouge_threshold, "ROUGE-L threshold", float),
                         samples_per_prompt=number(samples, "Images per prompt"), image_check=image_check or "none",
                         steps=number(steps, "Steps per expert"), train_text_encoder=bool(train_text_encoder),
                         train_unet=bool(train_unet), rank=rank, alpha=float(rank),
                         lr=number(lr, "Learning rate", float), merge=merge,
                         target_modules=target_modules(adapted_layers, SelmaConfig().target_modules),
                         eval_seeds=number(eval_seeds, "ShapesBench seeds"), eval_experts=bool(eval_experts))
    config.validate()
    check_llm(config.llm_name())
    return config


# start_selma_run(runner, *settings): submit a SELMA job from the section's settings, in selma_config's order
start_selma_run = starter(KIND, "SELMA", selma_config)


# --- the section ------------------------------------------------------------------------------------


def build_selma_section(runner: JobRunner):
    """Create the section in the current Gradio context; returns (function, inputs, outputs) for its tab's select."""
    gr.Markdown(ABOUT)
    with gr.Row():
        with gr.Column():
            model = model_picker()
            image_model = gr.Textbox(label="Image model (empty: the model; a weaker one: weak-to-strong)")
            llm = gr.Dropdown([AUTO] + list(LLMS), value=AUTO, label="LLM (auto: shapes for the shapes model, "
                              "else openai)")
            skills = gr.CheckboxGroup(skill_choices(model.value), value=list(builtin_skills(world(model.value))),
                                      label="Skills (add your own in the Data tab)")
            with gr.Row():
                prompts_per_skill = gr.Number(150, label="Prompts per skill", precision=0)
                rouge_threshold = gr.Slider(0, 1, value=DEFAULT_THRESHOLD, step=0.05, label="ROUGE-L threshold")
        with gr.Column():
            samples = gr.Number(3, label="Images per prompt", precision=0)
            image_check = gr.Radio(list(IMAGE_CHECKS), value=IMAGE_CHECKS[0], label="Detector check of the images",
                                   info="not in the paper. verify: train only on images that show their prompt; "
                                        "relabel: the others under the prompt they show (IPR)")
            steps = gr.Number(400, label="Training steps per expert (mixed LoRA: n_skills x this)", precision=0)
            rank = gr.Number(8, label="LoRA rank", precision=0)
            adapted_layers = adapted_layers_picker(SelmaConfig().target_modules)
            train_text_encoder = gr.Checkbox(False, label="LoRA on the text encoder too (merged with the UNet's)")
            train_unet = gr.Checkbox(SelmaConfig().train_unet, label="LoRA on the UNet",
                                     info="off (with the text encoder on): text-encoder experts, the UNet stays the "
                                          "base model's (assets/adapters/selma-shapes)")
            lr = gr.Number(5e-4, label="Learning rate")
            merge = gr.Dropdown(list(MERGES), value=MERGES[0], label="Merge",
                                info="set_adapters: every expert at 1/n (the authors'); the rest: peft's combinations")
            eval_seeds = gr.Number(4, label="ShapesBench seeds per prompt (0: no evaluation)", precision=0)
            eval_experts = gr.Checkbox(False, label="Also score each expert alone")
    controls = run_controls(runner, KIND, "SELMA", start_selma_run,
                            [model, image_model, llm, skills, prompts_per_skill, rouge_threshold, samples, steps, rank,
                             lr, merge, eval_seeds, eval_experts, image_check, train_text_encoder, adapted_layers,
                             train_unet],
                            "selma-status",
                            extra_buttons=[SCORE_EXPERTS])
    table = gr.Dataframe(pd.DataFrame(columns=["variant"]), interactive=False,
                         label="ShapesBench accuracy (%) per tag: base, single LoRA on mixed data, merged experts")
    stats = gr.Dataframe(stats_frame([]), interactive=False, label="Prompts per skill: written, kept, dropped")
    adapters = gr.Markdown(elem_id="selma-adapters")
    log = gr.Textbox(label="Log", lines=12, max_lines=24, autoscroll=True)

    model.change(skills_update, model, skills)  # another world: its built-in skills
    controls.buttons[SCORE_EXPERTS].click(lambda r: continue_run(runner, r, False, KIND, {"eval_experts": True}),
                                          controls.run, [controls.job, controls.notice])
    controls.follow(lambda r, j: selma_status(runner, r, j), outputs=[log, table, stats, adapters])

    def refresh(name, chosen):  # runs started elsewhere, skills added in the Data tab
        return gr.update(choices=selma_runs()), skills_update(name, chosen)

    return refresh, [model, skills], [controls.run, skills]

