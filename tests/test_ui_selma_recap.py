"""Train tab, SELMA and RECAP sections, and their job kinds: settings refused or submitted, a run that
reports its stages, is cancelled mid-training and continued in its own folder, its per-tag table and
adapters, and those adapters in the Compare tab under recognisable labels."""

import json
from dataclasses import asdict

import gradio as gr
import pytest

import pipelines.recap
import pipelines.selma
from pipelines.recap import RecapConfig
from pipelines.selma import SelmaConfig
from pipelines.trainer import TRANSFORMER_TARGETS, UNET_TARGETS
from workbench.compare import Variant
from workbench.config import get_settings
from workbench.generation import LoraSpec
from workbench.job_kinds import JOB_KINDS
from workbench.jobs import JobStatus
from workbench.ui import train, train_recap, train_selma
from workbench.ui.adapters import adapter_choices
from workbench.ui.compare import variants_from_text, variants_with

# fixtures: the scripted LLM and detector, a one-prompt evaluation file
from test_selma import SKILLS, config as selma_settings, scripted  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# model, image model, LLM, skills, prompts per skill, ROUGE-L threshold, images per prompt, steps, rank, lr,
# merge, eval seeds, eval experts, image check, text encoder, adapted layers, UNet: the order of the SELMA
# section's inputs
SELMA_GOOD = ["shapes", "", "auto", ["counting", "spatial"], 150, 0.8, 3, 400, 8, 5e-4, "set_adapters", 4, False,
              "none", False, None, True]
SELMA_NAMES = ["model", "image_model", "llm", "skills", "prompts", "rouge", "samples", "steps", "rank", "lr", "merge",
               "eval_seeds", "eval_experts", "image_check", "text_encoder", "layers", "unet"]
# model, data, images, captioner, captions, steps, rank, lr, prompt dropout, LoRA/Full, eval seeds, inline pairs,
# adapted layers, skip unreadable, text encoder, UNet: the order of the RECAP section's inputs
RECAP_GOOD = ["shapes", None, 2000, "auto", "mix", 700, 64, 1e-3, 0.14, "LoRA", 4, False, None, False, False, True]
RECAP_NAMES = ["model", "data", "images", "captioner", "captions", "steps", "rank", "lr", "dropout", "method",
               "eval_seeds", "inline_pairs", "layers", "skip_unreadable", "text_encoder", "unet"]


def with_changes(good, names, **changes) -> list:
    return [changes.get(name, value) for name, value in zip(names, good)]


def cancel_before(monkeypatch, module, name: str, when, runner):
    """Wrap module.name so that its first call for which when(*args) holds cancels every job first: the
    run stops at its next should_stop check (the trainer after one step, with a checkpoint)."""
    original, fired = getattr(module, name), []

    def wrapper(*args, **kwargs):
        if not fired and when(*args):
            fired.append(True)
            for job in runner.list_jobs():
                runner.cancel(job.id)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return fired


def test_the_kinds_are_registered_and_the_train_tab_has_their_sections(runner):
    assert {"selma", "recap", "skill_prompts", "recaption"} <= set(JOB_KINDS)
    with gr.Blocks() as demo:
        train.build_train_tab(runner)
    labels = {block.label for block in demo.blocks.values() if isinstance(block, gr.Tab)}
    assert {"SELMA: skill experts, merged", "RECAP: recaptioned fine-tuning"} <= labels
    buttons = {getattr(block, "value", None) for block in demo.blocks.values() if isinstance(block, gr.Button)}
    assert {"Start IPR run", "Start ReFL run", "Start SELMA run", "Start RECAP run", "Reviewed: continue",
            train_selma.SCORE_EXPERTS} <= buttons


# --- SELMA -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("changes, words", [
    ({"skills": []}, "at least one skill"),
    ({"skills": ["counting", "everyday_scene"]}, "Unknown skill 'everyday_scene'"),
    ({"prompts": 0}, "Prompts per skill must be between"),
    ({"rouge": 1.5}, "ROUGE-L threshold must be between 0 and 1"),
    ({"model": "no-such-model"}, "Unknown model"),
    ({"steps": None}, "Steps per expert needs a value"),
    ({"steps": 0}, "Steps per expert must be at least 1 (got 0)"),
    ({"rank": 0}, "The LoRA rank must be at least 1 (got 0)"),  # the section has no alpha to blame
    ({"merge": "average"}, "Unknown merge"),
    ({"layers": "everything"}, "Unknown choice of adapted layers 'everything'"),
    ({"unet": False}, "needs a LoRA on the text encoder"),  # nothing would train
])
def test_bad_selma_settings_are_refused_with_a_message(runner, changes, words):
    run, job, message = train_selma.start_selma_run(runner, *with_changes(SELMA_GOOD, SELMA_NAMES, **changes))
    assert job is None and message.startswith("Not started") and words in message, message
    assert not runner.list_jobs()


def test_a_selma_run_with_an_llm_server_without_a_model_name_is_refused(runner, monkeypatch):
    monkeypatch.delenv("WORKBENCH_LLM_MODEL", raising=False)
    run, job, message = train_selma.start_selma_run(runner, *with_changes(SELMA_GOOD, SELMA_NAMES, llm="openai"))
    assert job is None and message.startswith("Not started") and "set WORKBENCH_LLM_MODEL" in message, message
    assert not runner.list_jobs()


def test_good_selma_settings_submit_a_selma_job(runner):
    runner.register("selma", lambda params, ctx: {"params": params})  # record instead of training
    run, job_id, message = train_selma.start_selma_run(
        runner, *with_changes(SELMA_GOOD, SELMA_NAMES, merge="ties", rank=16, eval_experts=True, image_check="relabel",
                              text_encoder=True))
    assert job_id in message and run["value"] == job_id
    config = SelmaConfig.from_dict(runner.wait(job_id, timeout=30).outputs["params"])
    assert (config.skills, config.merge, config.rank, config.alpha, config.llm, config.image_model,
            config.eval_experts, config.image_check, config.train_text_encoder) == (
        ["counting", "spatial"], "ties", 16, 16.0, None, None, True, "relabel", True)
    assert tuple(config.target_modules) == UNET_TARGETS  # the section's default: SELMA's
    assert config.train_unet is True  # the section's default


@pytest.mark.parametrize("kind, start, good, names, config_class", [
    ("selma", train_selma.start_selma_run, SELMA_GOOD, SELMA_NAMES, SelmaConfig),
    ("recap", train_recap.start_recap_run, RECAP_GOOD, RECAP_NAMES, RecapConfig),
])
def test_text_encoder_adapters_alone_leave_the_unet_untrained(runner, kind, start, good, names, config_class):
    runner.register(kind, lambda params, ctx: {"params": params})
    _, job_id, _ = start(runner, *with_changes(good, names, text_encoder=True, unet=False))
    config = config_class.from_dict(runner.wait(job_id, timeout=30).outputs["params"])
    assert (config.train_text_encoder, config.train_unet) == (True, False)
    _, default_job, _ = start(runner, *good)
    config = config_class.from_dict(runner.wait(default_job, timeout=30).outputs["params"])
    assert (config.train_text_encoder, config.train_unet) == (False, True)  # the methods' defaults


def test_the_adapted_layers_chosen_reach_the_selma_and_recap_runs(runner):
    runner.register("selma", lambda params, ctx: {"params": params})
    runner.register("recap", lambda params, ctx: {"params": params})
    _, selma_job, _ = train_selma.start_selma_run(runner, *with_changes(SELMA_GOOD, SELMA_NAMES, layers="transformer"))
    _, recap_job, _ = train_recap.start_recap_run(runner, *with_changes(RECAP_GOOD, RECAP_NAMES, layers="attention"))
    _, recap_default, _ = train_recap.start_recap_run(runner, *RECAP_GOOD)
    assert tuple(SelmaConfig.from_dict(runner.wait(selma_job, timeout=30).outputs["params"]).target_modules) == \
        TRANSFORMER_TARGETS
    assert tuple(RecapConfig.from_dict(runner.wait(recap_job, timeout=30).outputs["params"]).target_modules) == \
        UNET_TARGETS
    assert tuple(RecapConfig.from_dict(runner.wait(recap_default, timeout=30).outputs["params"]).target_modules) == \
        TRANSFORMER_TARGETS  # RECAP's own default


def test_each_section_shows_its_methods_default_adapted_layers(runner):
    with gr.Blocks() as demo:
        train.build_train_tab(runner)
    pickers = [block for block in demo.blocks.values()
               if isinstance(block, gr.Radio) and block.label == "LoRA on the UNet's"]
    assert [picker.value for picker in pickers] == ["attention", "attention", "transformer"]  # IPR, SELMA, RECAP
    # Each hint names its own method's default, not a list of every method's.
    assert [picker.info.split(": ")[1].split(" (")[0] for picker in pickers] == \
        ["attention projections", "attention projections", "whole transformer blocks"]


def test_a_selma_run_is_cancelled_continued_and_shows_its_table_and_adapters(runner, tiny_sd, eval_prompts,
                                                                           monkeypatch):
    fired = cancel_before(monkeypatch, pipelines.selma, "train_adapter",
                          lambda config, data, out, *rest: out.name == SKILLS[1], runner)
    job_id = runner.submit("selma", asdict(selma_settings(tiny_sd, eval_prompts)))
    job = runner.wait(job_id, timeout=300)
    assert fired and job.status is JobStatus.CANCELLED, job.log

    # The section shows where the run stopped: its stage, the stages done on disk, the prompt statistics.
    status, log, table, stats, adapters = train_selma.selma_status(runner, job_id, None)
    assert f"expert {SKILLS[1]}:" in status and "cancelled" in status
    assert "prompts 2/2 · images 2/2 · experts 1/2 · mixed LoRA 0/1 · merge 0/1 · evaluations 0/3" in status
    assert list(stats["skill"]) == SKILLS + ["total"] and (stats["kept"][:2] == 3).all()
    assert table.empty and f"expert {SKILLS[0]}" in adapters
    assert job_id in train_selma.selma_runs()

    # "Continue, scoring each expert": the same folder, on from the checkpoint, each expert scored too.
    resumed, message = train.continue_run(runner, job_id, False, "selma", {"eval_experts": True})
    assert resumed and job_id in message
    job = runner.wait(resumed, timeout=300)
    assert job.status is JobStatus.DONE, job.log
    assert train.latest_job_for(runner, job_id, None, "selma").id == resumed

    status, log, table, stats, adapters = train_selma.selma_status(runner, job_id, None)
    assert "evaluations 5/5" in status and "done" in status
    assert list(table["variant"]) == ["base model", "single LoRA, mixed data", "merged experts (set_adapters)",
                                      f"expert {SKILLS[0]}", f"expert {SKILLS[1]}"]
    assert list(table.columns) == ["variant", "single_object", "overall"]
    assert table["overall"].between(0, 100).all()
    folder = get_settings().runs_dir / job_id
    for path in (folder / "merged", folder / "mixed", folder / "experts" / SKILLS[0]):
        assert f"`{path}`" in adapters

    # Compare: every adapter under a recognisable label, and the experts joined at 1/2 each in one click.
    choices = dict(adapter_choices(joined=True))
    labels = {label: value for label, value in choices.items() if job_id in label}
    assert labels[f"SELMA {job_id} · merged experts, fused (cat)"] == str(folder / "merged")
    assert labels[f"SELMA {job_id} · single LoRA on all skills' data mixed"] == str(folder / "mixed")
    assert labels[f"SELMA {job_id} · expert {SKILLS[1]}"] == str(folder / "experts" / SKILLS[1])
    joined = labels[f"SELMA {job_id} · all 2 experts joined (set_adapters, 1/2 each)"]
    variants = variants_from_text(variants_with("", joined, 1.0))
    assert variants[1] == Variant.of([LoraSpec(str(folder / "experts" / name), 0.5) for name in SKILLS])


# --- RECAP -------------------------------------------------------------------------------------------


def make_imagefolder(folder):
    from PIL import Image

    (folder / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "images" / "a.png")
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "images/a.png", "text": "a circle"}) + "\n")
    return folder


@pytest.mark.parametrize("changes, words", [
    ({"data": "/etc"}, "outside the data folder"),
    ({"data": "datasets/none"}, "not an imagefolder: there is no folder"),
    ({"rank": 0}, "LoRA rank must be at least 1"),
    ({"lr": -1.0}, "The learning rate must be positive (got -1.0)"),
    ({"steps": -3}, "Training steps must be at least 1 (got -3)"),  # the section has no batch size to blame
    ({"images": 0}, "at least one image"),
    ({"model": "no-such-model"}, "Unknown model"),
    ({"dropout": 1.0}, "prompt_dropout must be in [0, 1)"),
    ({"layers": "everything"}, "Unknown choice of adapted layers 'everything'"),
    ({"captioner": "blip2"}, "hf download Salesforce/blip2"),  # its weights are not here: said before any work
    ({"unet": False}, "needs a LoRA on the text encoder"),
])
def test_bad_recap_settings_are_refused_with_a_message(runner, changes, words):
    run, job, message = train_recap.start_recap_run(runner, *with_changes(RECAP_GOOD, RECAP_NAMES, **changes))
    assert job is None and message.startswith("Not started") and words in message, message
    assert not runner.list_jobs()


def test_good_recap_settings_submit_a_recap_job_on_data_inside_the_data_folder(runner, data_dir):
    folder = make_imagefolder(data_dir / "datasets" / "web")
    runner.register("recap", lambda params, ctx: {"params": params})
    run, job_id, message = train_recap.start_recap_run(
        runner, *with_changes(RECAP_GOOD, RECAP_NAMES, data="datasets/web", captioner="shapes", method="Full",
                              inline_pairs=True))
    assert job_id in message and run["value"] == job_id
    config = RecapConfig.from_dict(runner.wait(job_id, timeout=30).outputs["params"])
    assert (config.data, config.captioner, config.lora, config.alpha) == (str(folder), "shapes", False, 64.0)
    assert config.inline_pairs is True

    # A data field of spaces is an empty one (render shapes scenes), as the IPR section's prior data field.
    run, job_id, message = train_recap.start_recap_run(runner, *with_changes(RECAP_GOOD, RECAP_NAMES, data="  "))
    assert job_id in message and RecapConfig.from_dict(runner.wait(job_id, timeout=30).outputs["params"]).data is None


def test_a_recap_run_is_cancelled_continued_and_shows_its_table_and_adapters(runner, tiny_sd, eval_prompts,
                                                                           monkeypatch):
    fired = cancel_before(monkeypatch, pipelines.recap, "fine_tune",
                          lambda config, rows, folder, stage, *rest: stage == "train RECAP", runner)
    config = RecapConfig(model=str(tiny_sd), images=6, steps=2, batch_size=2, detector="shapes", sample_steps=2,
                         eval_prompts=eval_prompts, eval_seeds=1)
    job_id = runner.submit("recap", asdict(config))
    job = runner.wait(job_id, timeout=300)
    assert fired and job.status is JobStatus.CANCELLED, job.log
    status, log, table, adapters = train_recap.recap_status(runner, job_id, None)
    assert "cancelled" in status and "train RECAP:" in status
    assert "data ✓ · recaption ✓ · alt-text fine-tune ✓ · RECAP fine-tune – · evaluations 0/3" in status
    assert table.empty and "alt-text fine-tune" in adapters and "RECAP fine-tune:" not in adapters

    resumed, message = train.continue_run(runner, job_id, False, "recap")
    job = runner.wait(resumed, timeout=300)
    assert job.status is JobStatus.DONE, job.log
    status, log, table, adapters = train_recap.recap_status(runner, job_id, None)
    assert "evaluations 3/3" in status and "done" in status
    assert list(table.columns) == ["tag", "base", "alt-text fine-tune", "RECAP fine-tune", "RECAP − alt text"]
    assert list(table["tag"]) == ["single_object", "overall"] and table.notna().all().all()
    folder = get_settings().runs_dir / job_id
    labels = {label: value for label, value in adapter_choices() if job_id in label}
    assert labels == {f"RECAP {job_id} · alt-text fine-tune": str(folder / "alt-text" / "adapter"),
                      f"RECAP {job_id} · RECAP fine-tune": str(folder / "recap" / "adapter")}
    assert all(f"`{path}`" in adapters for path in labels.values())
