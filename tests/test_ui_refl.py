"""Train tab, RealignDiff section, and the 'refl' job kind: start, follow, cancel, continue, history, comparison."""

import json
import time
from dataclasses import asdict

import gradio as gr
import pytest
from PIL import Image

from pipelines.realign import ReFLConfig
from workbench.config import get_settings
from workbench.errors import InvalidInput
from workbench.job_kinds import JOB_KINDS, saved_config
from workbench.jobs import JobStatus
from workbench.ui import train, train_refl as tab
from workbench.ui.train_runs import cancel_run

from test_realign import caption_model, pretrain_data, tiny_refl  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# model, steps, batch, lr, rank, reward weight, sampling steps, first gradient step, guidance,
# pretrain batch, pretrain data, eval seeds, hard negatives, text-encoder LoRA, UNet LoRA: the order of the tab's
# inputs
GOOD = ["shapes", 300, 8, 1e-4, 8, 1e-3, 20, 15, None, 16, "", 4, 0, False, True]


def settings_with(**changes) -> list:
    names = ["model", "steps", "batch", "lr", "rank", "reward_weight", "schedule_steps", "first_grad_step",
             "guidance", "pretrain_batch", "pretrain_data", "eval_seeds", "negatives", "train_text_encoder",
             "train_unet"]
    return [changes.get(name, value) for name, value in zip(names, GOOD)]


def history_steps(folder) -> list[int]:
    path = folder / "history.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def test_the_refl_kind_is_registered():
    assert "refl" in JOB_KINDS


@pytest.mark.parametrize("changes, words", [
    ({"first_grad_step": 20}, "first_grad_step"),
    ({"steps": 0}, "at least one training step (got 0)"),
    ({"steps": None}, "Steps needs a value"),
    ({"lr": -1.0}, "The learning rate must be positive (got -1.0)"),
    ({"reward_weight": -2.0}, "The reward weight lambda must be positive"),
    ({"model": "no-such-model"}, "Unknown model"),
    ({"eval_seeds": 20}, "between 0 and 16"),
    ({"rank": 0}, "LoRA rank"),
    ({"model": "org/some-model"}, "pre-training data"),
    ({"pretrain_data": "/no/such/folder"}, "outside the data folder"),
    ({"pretrain_data": "datasets/no-such-folder"}, "not an imagefolder"),
    ({"model": ""}, "No model given"),
    ({"model": None}, "No model given"),
    ({"negatives": -1}, "negatives must be between 0 and 32"),
    ({"train_unet": False}, "needs a LoRA on the text encoder"),  # nothing would train
])
def test_bad_settings_are_refused_with_a_message(runner, changes, words):
    run, job, message = tab.start_refl_run(runner, *settings_with(**changes))
    assert job is None
    assert message.startswith("Not started") and words in message
    assert not runner.list_jobs()


def test_good_settings_submit_a_refl_job(runner):
    runner.register("refl", lambda params, ctx: {"params": params})  # record instead of training
    run, job_id, message = tab.start_refl_run(runner, *settings_with(steps=120, guidance=3.5, pretrain_batch=0, negatives=4,
                                                                     train_text_encoder=True))
    assert job_id and job_id in message and run["value"] == job_id and job_id in run["choices"]
    params = runner.wait(job_id, timeout=30).outputs["params"]
    config = ReFLConfig.from_dict(params)
    assert (config.steps, config.guidance, config.pretrain_batch, config.rank, config.alpha, config.negatives,
            config.train_text_encoder) == (120, 3.5, 0, 8, 8.0, 4, True)
    assert config.train_unet is True  # the tab's default


def test_pretraining_data_named_relative_to_the_data_folder_is_found_there(runner):
    runner.register("refl", lambda params, ctx: {"params": params})
    folder = get_settings().data_dir / "datasets" / "alt-text"
    folder.mkdir(parents=True)
    (folder / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a red circle"}\n')
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    _, job_id, message = tab.start_refl_run(runner, *settings_with(pretrain_data="datasets/alt-text"))
    assert job_id, message
    assert ReFLConfig.from_dict(runner.wait(job_id, timeout=30).outputs["params"]).pretrain_data == str(folder.resolve())


def test_a_text_encoder_only_refl_job_leaves_the_unet_untrained(runner):
    runner.register("refl", lambda params, ctx: {"params": params})
    _, job_id, _ = tab.start_refl_run(runner, *settings_with(train_text_encoder=True, train_unet=False))
    config = ReFLConfig.from_dict(runner.wait(job_id, timeout=30).outputs["params"])
    assert (config.train_text_encoder, config.train_unet) == (True, False)


def test_a_refl_job_runs_lists_its_run_and_plots_its_history(runner, tiny_sd, caption_model, pretrain_data):
    job_id = runner.submit("refl", asdict(tiny_refl(tiny_sd, caption_model, pretrain_data, steps=4)))
    job = runner.wait(job_id, timeout=300)
    assert job.status is JobStatus.DONE, job.log
    assert job_id in tab.refl_runs() and job_id not in train.ipr_runs()

    status, log, frame, table = tab.refl_status(runner, job_id, None, 1)
    assert "done" in status and "step 4/4" in status and "ReFL on" in log
    assert list(frame["step"]) == [1, 2, 3, 4]
    assert set(tab.HISTORY_COLUMNS) <= set(frame.columns)
    smoothed = tab.history_frame(job_id, 2)
    assert smoothed["reward"].iloc[1] == pytest.approx(frame["reward"].iloc[:2].mean())
    assert table.empty  # eval_seeds 0: nothing to compare


def write_scores(folder, accuracies: dict, caption_reward: float | None = None) -> None:
    folder.mkdir(parents=True)
    per_tag = {tag: {"correct": int(a * 10), "total": 10, "accuracy": a} for tag, a in accuracies.items()}
    overall = sum(accuracies.values()) / len(accuracies)
    (folder / "scores.json").write_text(json.dumps({"per_tag": per_tag, "overall": overall, "images": 20}))
    if caption_reward is not None:
        (folder / "caption_reward.json").write_text(json.dumps({"mean": caption_reward, "images": 20}))


def test_the_comparison_table_shows_base_and_refl_as_far_as_evaluated():
    folder = get_settings().runs_dir / "refl-run"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"kind": "refl", **asdict(ReFLConfig())}))
    assert tab.comparison_table("refl-run").empty

    write_scores(folder / "eval-base", {"single_object": 0.9, "counting": 0.2}, caption_reward=0.5)
    table = tab.comparison_table("refl-run").set_index("metric")
    assert table.loc["counting (%)", "base"] == 20.0 and table.loc["overall (%)", "base"] == 55.0
    assert table["ReFL"].isna().all() and table["change"].isna().all()
    assert table.loc["caption reward (eq. 4)", "base"] == 0.5

    write_scores(folder / "eval", {"single_object": 1.0, "counting": 0.3}, caption_reward=0.6)
    table = tab.comparison_table("refl-run").set_index("metric")
    assert list(table.index) == ["single_object (%)", "counting (%)", "overall (%)", "caption reward (eq. 4)"]
    assert table.loc["counting (%)", "ReFL"] == 30.0 and table.loc["counting (%)", "change"] == 10.0
    assert table.loc["caption reward (eq. 4)", "change"] == pytest.approx(0.1)

    # A finished run's summary.json is read first.
    summary = {"eval-base": {"per_tag": {"counting": {"accuracy": 0.25}}, "overall": 0.25, "caption_reward": 0.4},
               "eval": {"per_tag": {"counting": {"accuracy": 0.5}}, "overall": 0.5, "caption_reward": 0.45}}
    (folder / "summary.json").write_text(json.dumps(summary))
    table = tab.comparison_table("refl-run").set_index("metric")
    assert table.loc["counting (%)", "change"] == 25.0
    assert "evaluated" in tab.run_progress("refl-run")


def test_a_cancelled_run_continues_in_its_own_folder(runner, tiny_sd, caption_model, pretrain_data):
    config = tiny_refl(tiny_sd, caption_model, pretrain_data, steps=60, checkpoint_every=50)
    job_id = runner.submit("refl", asdict(config))
    folder = get_settings().runs_dir / job_id
    for _ in range(600):
        if len(history_steps(folder)) >= 2:
            break
        time.sleep(0.2)
    assert "Cancelling" in cancel_run(runner, job_id, None, "refl")
    assert runner.wait(job_id, timeout=120).status is JobStatus.CANCELLED
    done = history_steps(folder)
    assert 2 <= len(done) < 60 and not (folder / "adapter" / "done").exists()
    assert f"step {len(done)}/60" in tab.refl_status(runner, job_id, None, 1)[0]

    # "Continue" resumes the same folder with its saved settings from the step it stopped at.
    resumed, message = train.continue_run(runner, job_id, False, "refl")
    assert resumed and job_id in message
    job = runner.wait(resumed, timeout=600)
    assert job.status is JobStatus.DONE, job.log
    assert history_steps(folder) == list(range(1, 61))  # each step once: the stop checkpointed its step
    assert (folder / "adapter" / "done").exists()
    assert train.latest_job_for(runner, job_id, None, "refl").id == resumed
    assert cancel_run(runner, job_id, None, "refl").startswith("Nothing to cancel")


def test_only_a_refl_run_can_be_continued_as_one(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"kind": "ipr"}))
    with pytest.raises(InvalidInput, match="no refl run"):
        saved_config(tmp_path, "refl")
    assert train.continue_run(None, None, False, "refl") == (None, "Choose a run to continue.")


def test_the_train_tab_has_a_section_per_method(runner):
    with gr.Blocks() as demo:
        train.build_train_tab(runner)
    labels = {block.label for block in demo.blocks.values() if isinstance(block, gr.Tab)}
    assert {"IPR: Iterative Prompt Relabeling", "RealignDiff: ReFL (coarse stage)"} <= labels
    assert any(getattr(block, "value", None) == "Start ReFL run" for block in demo.blocks.values())
