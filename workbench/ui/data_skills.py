"""Data tab, skill prompts: SELMA's prompt writing on its own. Choose skills (the model's world's built-in
ones and your own), let an LLM write prompts per skill, and see what the ROUGE-L filter kept and why the
rest was dropped.

The writing runs as a background job (`skill_prompts`, a real LLM can be slow) into a prompt set
`<data>/datasets/skill-prompts-<job id>/` (config.json, <skill>.json with the kept prompts and the
filter's statistics, prompts.jsonl), which reopens from *Saved prompt sets* after a restart.
User skills (name, description, examples) are saved in `<data>/skills.json` and offered here and in
the Train tab's SELMA section.
"""

from __future__ import annotations

from dataclasses import asdict

import gradio as gr
import pandas as pd

from pipelines.selma import SelmaConfig
from ..config import get_settings
from ..datasets import load_prompt_set, prompt_sets
from ..errors import WorkbenchError
from ..jobs import JobRunner, JobStatus
from ..llm import LLMS, check_llm
from .adapters import model_dropdown
from ..rouge import DEFAULT_THRESHOLD
from ..skills import (Skill, available_skills, builtin_skills, delete_user_skill, load_user_skills, save_user_skill,
                      world_of)
from .generate import follow_job_as
from .train_runs import number

# Statistics of one skill's prompt writing: written = kept + the four ways a prompt is dropped.
STATS_COLUMNS = {"skill": None, "asked": "asked", "written": "generated", "kept": "kept",
                 "near-duplicates": "near_duplicates", "evaluation prompts": "in_evaluation", "too long": "too_long",
                 "invalid": "invalid", "LLM requests": "requests", "unusable answers": "failed_requests"}
PROMPT_COLUMNS = ["skill", "#", "prompt"]
EXAMPLES = 3  # SELMA shows the LLM three examples per request


# --- skills ------------------------------------------------------------------------------------------


def world(model: str) -> str:
    """The model's world; "real" for a name that does not resolve (yet): its skills are the paper's."""
    try:
        return world_of(model)
    except WorkbenchError:
        return "real"


def offered_skills(model: str) -> tuple[dict, str | None]:
    """The skills a model's world offers (built-in, then the user's) and what is wrong with a broken
    skills.json, whose skills are then left out so the app still starts."""
    try:
        return available_skills(world(model)), None
    except WorkbenchError as error:
        return builtin_skills(world(model)), str(error)


def skill_choices(model: str) -> list[tuple[str, str]]:
    """(label, name) of the skills a model's world offers: its built-in ones, then the user's."""
    builtin = builtin_skills(world(model))
    return [(name if name in builtin else f"{name} (yours)", name) for name in offered_skills(model)[0]]


def default_llm(model: str) -> str:
    return "shapes" if world(model) == "shapes" else "openai"


def skills_markdown(model: str) -> str:
    """Each skill's description, so a choice is an informed one."""
    skills, problem = offered_skills(model)
    lines = [f"- **{s.name}**: {s.description}" for s in skills.values()]
    return "\n".join(lines + ([f"\n**Your skills are left out:** {problem}"] if problem else []))


def skills_update(model: str, chosen=None):
    """The skills checkboxes for a model: its built-in skills ticked, or the still offered ones of `chosen`."""
    choices = skill_choices(model)
    names = [name for _, name in choices]
    keep = [name for name in (chosen or []) if name in names]
    return gr.update(choices=choices, value=keep or list(builtin_skills(world(model))))


def user_skill_names() -> list[str]:
    try:
        return list(load_user_skills())
    except WorkbenchError:
        return []  # a broken skills.json: saving a skill says what is wrong with it


def save_skill(model, chosen, name, description, *examples):
    """Save a user skill from the form; (skills checkboxes, user-skill picker, message)."""
    try:
        skill = save_user_skill(Skill((name or "").strip(), description or "",
                                      tuple(e for e in examples if e and e.strip())))
    except WorkbenchError as error:
        return gr.update(), gr.update(), f"Not saved: {error}"
    note = "" if world(model) != "shapes" else (" The shapes LLM writes only the shapes world's skills: choose the "
                                                 "openai or transformers LLM to write prompts for it.")
    return (skills_update(model, list(chosen or []) + [skill.name]), gr.update(choices=user_skill_names()),
            f"Saved the skill `{skill.name}` in `{get_settings().data_dir / 'skills.json'}`.{note}")


def delete_skill(model, chosen, name):
    """Delete a user skill; (skills checkboxes, user-skill picker, message)."""
    try:
        delete_user_skill(name or "")
    except WorkbenchError as error:
        return gr.update(), gr.update(), f"Not deleted: {error}"
    return (skills_update(model, [c for c in chosen or [] if c != name]),
            gr.update(choices=user_skill_names(), value=None), f"Deleted the skill `{name}`.")


# --- a prompt set ------------------------------------------------------------------------------------


def prompt_set_settings(model, llm, skills, prompts_per_skill, rouge_threshold) -> dict:
    """The job's settings, validated as SELMA validates them (unknown model or skill, LLM that cannot
    write a skill, bounds); InvalidInput says what is wrong."""
    config = SelmaConfig(model=(model or "").strip(), llm=llm or None, skills=list(skills or []),
                         prompts_per_skill=number(prompts_per_skill, "Prompts per skill"),
                         rouge_threshold=number(rouge_threshold, "ROUGE-L threshold", float))
    config.validate()  # also resolves the skills: none chosen, or one deleted meanwhile
    check_llm(config.llm_name())
    return asdict(config)


def stats_frame(records: list[dict]) -> pd.DataFrame:
    """One row per skill (and a total): prompts written, kept, and dropped for each reason."""
    rows = [[record["skill"]["name"]] + [record["stats"].get(key, 0) for key in list(STATS_COLUMNS.values())[1:]]
            for record in records]
    if len(rows) > 1:
        rows.append(["total"] + [sum(row[i] for row in rows) for i in range(1, len(STATS_COLUMNS))])
    return pd.DataFrame(rows, columns=list(STATS_COLUMNS))


def prompts_frame(records: list[dict]) -> pd.DataFrame:
    rows = [[record["skill"]["name"], number, prompt] for record in records
            for number, prompt in enumerate(record["prompts"], 1)]
    return pd.DataFrame(rows, columns=PROMPT_COLUMNS)


def open_prompt_set(name: str | None):
    """(status, statistics table, prompts table) of a saved prompt set."""
    if not name:
        return "Choose a prompt set, or write one.", stats_frame([]), prompts_frame([])
    try:
        config, records = load_prompt_set(name)
    except WorkbenchError as error:
        return f"Cannot open: {error}", stats_frame([]), prompts_frame([])
    kept = sum(len(r["prompts"]) for r in records)
    missing = [s for s in config.get("skills", []) if s not in {r["skill"]["name"] for r in records}]
    status = (f"Prompt set `{name}`: {kept} prompts for {len(records)} skill(s), written by the {config.get('llm')} "
              f"LLM for {config.get('model')}, ROUGE-L threshold {config.get('rouge_threshold')}."
              + (f" Not written (stopped before): {', '.join(missing)}." if missing else ""))
    return status, stats_frame(records), prompts_frame(records)


def holds_prompts(name: str) -> bool:
    """Whether a prompt set has any skill's prompts written (a job can stop before the first)."""
    try:
        return name in prompt_sets() and any(record["prompts"] for record in load_prompt_set(name)[1])
    except (WorkbenchError, ValueError, KeyError, TypeError):
        return False


def write_prompt_set(runner: JobRunner, model, llm, skills, prompts_per_skill, rouge_threshold):
    """Submit the prompt writing and follow it; yields (status, statistics, prompts, saved-set picker, job id)."""
    keep = (gr.update(),) * 3
    try:
        job_id = runner.submit("skill_prompts", prompt_set_settings(model, llm, skills, prompts_per_skill,
                                                                    rouge_threshold))
    except WorkbenchError as error:
        yield (f"Not started: {error}",) + keep + (None,)
        return
    job = yield from follow_job_as(runner, job_id, 0.5, lambda line: (line,) + keep + (job_id,))
    name = f"skill-prompts-{job_id}"
    if job.status is not JobStatus.DONE:
        ended = f"Job `{job_id}` {job.status.value}" + (f": {job.error}" if job.error else "")
        saved = f" The skills finished before are saved as `{name}`." if holds_prompts(name) else ""
        yield (ended.rstrip(".") + "." + saved,) + keep + (job_id,)
        return
    status, stats, prompts = open_prompt_set(name)
    yield status, stats, prompts, gr.update(choices=prompt_sets(), value=name), job_id


def cancel_job(runner: JobRunner, job_id) -> str:
    if job_id and runner.cancel(job_id):
        return f"Cancelling job `{job_id}`; what is finished is kept."
    return "Nothing to cancel."


# --- the section -------------------------------------------------------------------------------------


def build_skill_prompts_section(runner: JobRunner):
    """Create the section inside the current Gradio context; returns what refreshes it when the page
    loads: (function, inputs, outputs)."""
    default_model = get_settings().default_model
    gr.Markdown("SELMA's first stage: for each skill an LLM writes prompts from three examples (the skill's and "
                "the ones kept so far); a prompt is kept when its ROUGE-L to every kept prompt is at most the "
                "threshold, it is no evaluation prompt and it fits the text encoder. *written* = kept + "
                "near-duplicates + evaluation prompts + too long + invalid.")
    with gr.Row():
        with gr.Column():
            model = model_dropdown(default_model, label="Model (its world's skills, its text encoder's length)")
            llm = gr.Dropdown(list(LLMS), value=default_llm(default_model), label="LLM backend",
                              info="shapes: embedded rules; openai: WORKBENCH_LLM_BASE_URL; transformers: a local LM")
            skills = gr.CheckboxGroup(skill_choices(default_model), value=list(builtin_skills(world(default_model))),
                                      label="Skills", elem_id="data-skills")
            with gr.Row():
                prompts_per_skill = gr.Number(150, label="Prompts per skill", precision=0)
                rouge_threshold = gr.Slider(0, 1, value=DEFAULT_THRESHOLD, step=0.05, label="ROUGE-L threshold")
            with gr.Row():
                write = gr.Button("Write prompts", variant="primary")
                cancel = gr.Button("Cancel", variant="stop")
        with gr.Column():
            with gr.Accordion("Skill descriptions", open=False):
                descriptions = gr.Markdown(skills_markdown(default_model))
            with gr.Accordion("Add a skill of your own", open=False):
                name = gr.Textbox(label="Name (lowercase letters, digits, _)", placeholder="animals")
                description = gr.Textbox(label="Description (what its prompts look like)", lines=2)
                examples = [gr.Textbox(label=f"Example prompt {i + 1}") for i in range(EXAMPLES)]
                save = gr.Button("Save skill")
                with gr.Row():
                    user_skill = gr.Dropdown(user_skill_names(), value=None, label="Your skills", scale=3)
                    delete = gr.Button("Delete skill", variant="stop", scale=1)
            skill_message = gr.Markdown()
    job = gr.State(None)
    status = gr.Markdown(elem_id="data-prompts-status")
    saved = gr.Dropdown(prompt_sets(), value=None, label="Saved prompt sets")
    stats = gr.Dataframe(stats_frame([]), interactive=False, label="Per skill: prompts written, kept, and dropped")
    prompts = gr.Dataframe(prompts_frame([]), interactive=False, wrap=True, max_height=400, label="Kept prompts")

    def model_changed(name):  # another world: its built-in skills, its LLM
        return skills_update(name), default_llm(name), skills_markdown(name)

    model.change(model_changed, model, [skills, llm, descriptions])
    save.click(save_skill, [model, skills, name, description, *examples], [skills, user_skill, skill_message])
    delete.click(delete_skill, [model, skills, user_skill], [skills, user_skill, skill_message])

    def on_write(*values):
        yield from write_prompt_set(runner, *values)

    write.click(on_write, [model, llm, skills, prompts_per_skill, rouge_threshold],
                [status, stats, prompts, saved, job])
    cancel.click(lambda j: cancel_job(runner, j), job, status)
    saved.input(open_prompt_set, saved, [status, stats, prompts])

    def refresh(name, chosen):
        return (gr.update(choices=prompt_sets()), gr.update(choices=user_skill_names()), skills_update(name, chosen),
                skills_markdown(name))

    return refresh, [model, skills], [saved, user_skill, skills, descriptions]
