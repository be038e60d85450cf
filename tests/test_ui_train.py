"""Train tab handlers and the 'ipr' job kind: start, follow, cancel, continue, metrics."""

import json
import re
import threading
import time

import pytest

from pipelines.trainer import TRANSFORMER_TARGETS, UNET_TARGETS
from workbench.benchmark import DETECTORS
from workbench.config import get_settings
from workbench.job_kinds import register_all
from workbench.jobs import JobRunner, JobStatus
from workbench.ui import train as tab
from workbench.ui.train_runs import cancel_run

from test_ipr import ScriptedDetector


@pytest.fixture
def runner(monkeypatch, tmp_path):
    monkeypatch.setitem(DETECTORS, "scripted", ScriptedDetector)
    settings = get_settings()
    runner = JobRunner(settings.db_path, settings.runs_dir)
    register_all(runner)
    yield runner
    runner.shutdown()


def tiny_params(tiny_sd, tmp_path, **overrides):
    prompts = tmp_path / "eval.jsonl"
    prompts.write_text(json.dumps({"tag": "single_object", "include": [{"class": "circle", "count": 1}],
                                   "prompt": "a circle"}) + "\n")
    return {"model": str(tiny_sd), "iterations": 1, "prompts": 4, "samples_per_prompt": 2, "detector": "scripted",
            "steps": 2, "batch_size": 2, "sample_steps": 2, "eval_prompts": str(prompts), "eval_seeds": 1,
            **overrides}


def test_bad_settings_are_refused_with_a_message(runner):
    run, job, message = tab.start_run(runner, "shapes", 0, 500, 3, "LoRA", 8, 800, 32, 5e-4, "relabel", False, 4)
    assert job is None
    assert "Not started" in message and "Iterations" in message


@pytest.mark.parametrize("position, value, expected", [
    (1, None, "Iterations needs a value"),
    (2, None, "Training prompts needs a value"),  # a cleared number box reaches the handler as None
    (7, None, "Batch size needs a value"),
    (8, "fast", "Learning rate must be a number"),
    (0, "", "No model given"),
    (0, "no-such-model", "Unknown model"),
])
def test_cleared_or_wrong_boxes_are_named_in_the_message(runner, position, value, expected):
    settings = ["shapes", 2, 500, 3, "LoRA", 8, 800, 32, 5e-4, "relabel", False, 4]
    settings[position] = value
    run, job, message = tab.start_run(runner, *settings)
    assert job is None
    assert message.startswith("Not started") and expected in message
    assert not runner.list_jobs()


def test_continue_refuses_a_run_whose_job_is_still_queued_or_running(runner, tiny_sd, tmp_path):
    started = threading.Event()
    release = threading.Event()

    def slow_ipr(params, ctx):
        started.set()
        release.wait(30)
        return {}

    runner.register("ipr", slow_ipr)
    first = runner.submit("ipr", tiny_params(tiny_sd, tmp_path))
    assert started.wait(30)
    try:
        job_id, message = tab.continue_run(runner, first, reviewed=True)
        assert job_id == first and "already running" in message
        assert [job.id for job in runner.list_jobs()] == [first]  # nothing queued twice
    finally:
        release.set()
    assert runner.wait(first, timeout=30).status is JobStatus.DONE
    # Finished: Continue and Reviewed: continue say so and queue no job that would have nothing to do.
    finished, message = tab.continue_run(runner, first, reviewed=False)
    assert finished == first and "has finished" in message
    finished, message = tab.continue_run(runner, first, reviewed=True)
    assert finished == first and "no iteration waits for a review" in message
    assert [job.id for job in runner.list_jobs()] == [first]


def test_a_run_paused_for_review_continues(runner, tiny_sd, tmp_path):
    runner.register("ipr", lambda params, ctx: {} if params.get("reviewed") else {"status": "awaiting_review",
                                                                                   "iteration": 0})
    first = runner.submit("ipr", tiny_params(tiny_sd, tmp_path))
    assert runner.wait(first, timeout=30).status is JobStatus.DONE
    assert "Iteration 1 waits for review" in tab.run_status(runner, first, None)[0]
    resumed, message = tab.continue_run(runner, first, reviewed=True)
    assert resumed != first and "marked the paused iteration as reviewed" in message
    assert runner.wait(resumed, timeout=30).status is JobStatus.DONE


def test_a_queued_run_is_followed_and_cancelled_by_its_name(runner, tiny_sd, tmp_path):
    release = threading.Event()
    runner.register("ipr", lambda params, ctx: release.wait(30) and {})  # holds the runner's one worker
    running = runner.submit("ipr", tiny_params(tiny_sd, tmp_path))
    queued = runner.submit("ipr", tiny_params(tiny_sd, tmp_path))
    try:
        # Its folder does not exist until it starts; after a page reload only its name is known.
        assert not (get_settings().runs_dir / queued).exists()
        assert tab.latest_job_for(runner, queued, None).id == queued
        assert "Cancelling job" in cancel_run(runner, queued, None)
        assert runner.get(queued).status is JobStatus.CANCELLED
    finally:
        release.set()
    assert runner.wait(running, timeout=30).status is JobStatus.DONE


@pytest.mark.parametrize("extra, expected", [
    (dict(min_confidence=1.5), "minimum confidence"),
    (dict(prompt_kinds=[]), "at least one kind"),
    (dict(prompt_kinds=["spatial"]), "Unknown kind of training prompt spatial"),
])
def test_bad_relabel_settings_are_refused_with_a_message(runner, extra, expected):
    run, job, message = tab.start_run(runner, "shapes", 2, 500, 3, "LoRA", 8, 800, 32, 5e-4, "relabel", False, 4,
                                      **extra)
    assert job is None
    assert "Not started" in message and expected in message


def test_the_tab_settings_reach_the_run(runner, monkeypatch):
    submitted = {}
    monkeypatch.setattr(runner, "submit", lambda kind, settings: submitted.update(settings) or "job-1")
    tab.start_run(runner, "shapes", 2, 500, 3, "LoRA", 8, 800, 32, 5e-4, "relabel", False, 4, 0.8,
                  tab.ADAPTER_STARTS[1], ["position", "two_object"], False, train_unet=True)
    assert submitted["min_confidence"] == 0.8 and submitted["continue_adapter"] is False
    assert submitted["prompt_kinds"] == ["position", "two_object"] and submitted["train_text_encoder"] is False
    tab.start_run(runner, "shapes", 2, 500, 3, "LoRA", 8, 800, 32, 5e-4, "relabel", False, 4)
    assert submitted["prompt_kinds"] == ["position"] and submitted["train_text_encoder"] is True  # the defaults
    assert submitted["prior_images"] == 0 and submitted["prior_data"] is None
    tab.start_run(runner, "shapes", 2, 500, 3, "LoRA", 8, 800, 32, 5e-4, "relabel", False, 4, None, None, None, True,
                  1000)
    assert submitted["prior_images"] == 1000


def test_the_adapted_layers_chosen_reach_the_run(runner, monkeypatch):
    submitted = {}
    monkeypatch.setattr(runner, "submit", lambda kind, settings: submitted.update(settings) or "job-1")
    settings = ["shapes", 2, 500, 3, "LoRA", 8, 800, 32, 5e-4, "relabel", False, 4]
    tab.start_run(runner, *settings, adapted_layers="transformer")
    assert tuple(submitted["target_modules"]) == TRANSFORMER_TARGETS
    tab.start_run(runner, *settings)
    assert tuple(submitted["target_modules"]) == UNET_TARGETS  # IPR's default
    run, job, message = tab.start_run(runner, *settings, adapted_layers="everything")
    assert job is None and "Unknown choice of adapted layers" in message


def test_mirroring_is_off_unless_ticked(runner, monkeypatch):
    submitted = {}
    monkeypatch.setattr(runner, "submit", lambda kind, settings: submitted.update(settings) or "job-1")
    settings = ["shapes", 2, 500, 3, "LoRA", 8, 800, 32, 5e-4, "relabel", False, 4]
    tab.start_run(runner, *settings)
    assert submitted["mirror"] is False
    tab.start_run(runner, *settings, mirror=True)
    assert submitted["mirror"] is True


def test_averaged_adapters_reach_the_run_and_need_fresh_lora_adapters(runner, monkeypatch):
    submitted = {}
    monkeypatch.setattr(runner, "submit", lambda kind, settings: submitted.update(settings) or "job-1")
    settings = ["shapes", 2, 500, 3, "LoRA", 8, 800, 32, 5e-4, "relabel", False, 4]
    tab.start_run(runner, *settings)
    assert submitted["adapter_seeds"] == 1  # one adapter per iteration, as in the paper
    tab.start_run(runner, *settings, adapter_seeds=3)
    assert submitted["adapter_seeds"] == 3
    run, job, message = tab.start_run(runner, *settings, adapter_start=tab.ADAPTER_STARTS[0], adapter_seeds=2)
    assert job is None and "trained afresh" in message


def test_the_lowest_trained_timestep_reaches_the_run(runner, monkeypatch):
    submitted = {}
    monkeypatch.setattr(runner, "submit", lambda kind, settings: submitted.update(settings) or "job-1")
    settings = ["shapes", 2, 500, 3, "LoRA", 8, 800, 32, 5e-4, "relabel", False, 4]
    tab.start_run(runner, *settings)
    assert submitted["timestep_range"] == [0.0, 1.0]  # the whole schedule, as in the paper
    tab.start_run(runner, *settings, lowest_timestep=0.5)
    assert submitted["timestep_range"] == [0.5, 1.0]


def test_a_text_encoder_only_run_starts_from_the_tab_and_needs_the_text_encoder(runner, monkeypatch):
    submitted = {}
    monkeypatch.setattr(runner, "submit", lambda kind, settings: submitted.update(settings) or "job-1")
    settings = ["shapes", 2, 500, 3, "LoRA", 8, 800, 32, 5e-4, "relabel", False, 4]
    tab.start_run(runner, *settings)
    assert submitted["train_unet"] is False and submitted["train_text_encoder"] is True  # the default
    tab.start_run(runner, *settings, train_unet=True)
    assert submitted["train_unet"] is True
    submitted.clear()
    run, job, message = tab.start_run(runner, *settings, train_text_encoder=False, train_unet=False)
    assert job is None and "needs a LoRA on the text encoder" in message and not submitted
    run, job, message = tab.start_run(runner, "shapes", 2, 500, 3, "Full", *settings[5:])
    assert job is None and "Train the UNet too" in message and not submitted


def test_a_prior_preservation_folder_outside_the_data_folder_is_refused(runner, monkeypatch, tmp_path):
    monkeypatch.setattr(runner, "submit", lambda kind, settings: pytest.fail("submitted"))
    run, job, message = tab.start_run(runner, "sd15", 2, 500, 3, "LoRA", 8, 800, 32, 5e-4, "relabel", False, 4,
                                      None, None, None, True, 0, str(tmp_path))
    assert job is None and "outside the data folder" in message


def test_an_ipr_job_runs_lists_its_run_and_plots_its_metrics(runner, tiny_sd, tmp_path):
    job_id = runner.submit("ipr", tiny_params(tiny_sd, tmp_path))
    job = runner.wait(job_id, timeout=300)
    assert job.status is JobStatus.DONE, job.log
    assert job_id in tab.ipr_runs()

    status, log, frame, table = tab.run_status(runner, job_id, None)
    assert "done" in status and "IPR" in log
    assert set(frame["iteration"]) == {"0", "1"}  # the base model and iteration 1, as the plot's categories
    assert "overall" in set(frame["tag"])
    assert list(table["iteration"]) == [0, 1]
    # Iteration 1's overall gain over the base, with its interval: the two accuracies' difference.
    overall = dict(zip(frame[frame["tag"] == "overall"]["iteration"].astype(int),
                       frame[frame["tag"] == "overall"]["accuracy"]))
    gain = table.set_index("iteration")[tab.GAIN_COLUMN]
    assert gain[0] == ""
    match = re.fullmatch(r"([+-]\d+\.\d) \[([+-]\d+\.\d), ([+-]\d+\.\d)\]", gain[1])
    assert match, gain[1]
    diff, low, high = (float(v) for v in match.groups())
    assert diff == pytest.approx(overall[1] - overall[0], abs=0.11) and low <= diff <= high


def test_a_cancelled_run_continues_in_its_own_folder(runner, tiny_sd, tmp_path):
    job_id = runner.submit("ipr", tiny_params(tiny_sd, tmp_path, steps=400))
    folder = get_settings().runs_dir / job_id
    # Cancel once training has started; the samples stay on disk.
    for _ in range(600):
        if (folder / "iteration-0" / "train").exists():
            break
        time.sleep(0.5)
    assert runner.cancel(job_id)
    assert runner.wait(job_id, timeout=120).status is JobStatus.CANCELLED
    samples = (folder / "iteration-0" / "samples.jsonl").read_text()

    # "Continue" resumes the same folder with its saved settings.
    resumed, message = tab.continue_run(runner, job_id, reviewed=False)
    assert resumed and job_id in message
    job = runner.wait(resumed, timeout=600)
    assert job.status is JobStatus.DONE, job.log
    assert (folder / "iteration-0" / "samples.jsonl").read_text() == samples
    assert (folder / "iteration-0" / "adapter" / "done").exists()
    # The tab follows the newest job of the run.
    assert tab.latest_job_for(runner, job_id, None).id == resumed


def test_continue_needs_a_run():
    assert tab.continue_run(None, None, reviewed=False) == (None, "Choose a run to continue.")


def test_run_names_cannot_leave_the_runs_folder(tmp_path):
    assert tab.run_folder("../../etc") is None
    assert tab.run_folder(None) is None


def test_a_run_chosen_in_the_picker_shows_its_jobs_log(runner, tiny_sd, tmp_path):
    def logging_ipr(params, ctx):
        ctx.log("iteration 1: 12 samples, 3 matched their prompt")
        return {}

    runner.register("ipr", logging_ipr)
    job_id = runner.submit("ipr", tiny_params(tiny_sd, tmp_path))
    assert runner.wait(job_id, timeout=30).status is JobStatus.DONE
    # After a page reload only the run's name is known; the list polled for it carries no logs.
    assert all(job.log == "" for job in runner.list_jobs(with_log=False))
    status, log = tab.status_and_log(runner, job_id, None, "ipr")
    assert "done" in status and "3 matched their prompt" in log


def test_a_clicks_message_is_not_overwritten_by_the_status_that_follows_a_run(whole_app):
    """A refusal ('Not started: ...') must stay on screen: the timer that follows a run every two seconds
    writes other components than the buttons do, and shows no progress text of its own."""
    demo, _ = whole_app
    ticks = [fn for fn in demo.fns.values() if any(event == "tick" for _, event in fn.targets)]
    clicks = [fn for fn in demo.fns.values() if any(event == "click" for _, event in fn.targets)]
    followed = {id(output) for fn in ticks for output in fn.outputs}
    labels = {fn: [str(getattr(demo.blocks.get(target), "value", "")) for target, _ in fn.targets] for fn in clicks}
    start_buttons = [fn for fn in clicks if any(re.fullmatch(r"Start \w+ run", label) for label in labels[fn])]
    assert len(start_buttons) == 4  # IPR, ReFL, SELMA, RECAP
    for fn in clicks:
        overwritten = [getattr(output, "elem_id", None) for output in fn.outputs if id(output) in followed]
        assert not overwritten, (fn.name, overwritten)
    assert all(fn.show_progress == "hidden" for fn in ticks)
