"""Running out of memory is said in words a person can act on, and loses nothing.

A real GPU is not needed: the failing call raises what CUDA raises (torch.OutOfMemoryError).
"""

from __future__ import annotations

import threading

import pytest
import torch

from workbench import jobs
from workbench.errors import OutOfMemory
from workbench.generation import GenerationRequest, generate
from workbench.memory import is_out_of_memory
from workbench.registry import load_pipeline

CUDA_MESSAGE = "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 23.65 GiB total capacity)"


def raise_cuda_oom(*args, **kwargs):
    raise torch.OutOfMemoryError(CUDA_MESSAGE)


def test_what_counts_as_out_of_memory():
    assert is_out_of_memory(torch.OutOfMemoryError(CUDA_MESSAGE))
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 9.00 GB)"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_generation_out_of_memory_says_what_to_change_and_the_next_request_runs(tiny_sd, monkeypatch):
    pipe = load_pipeline(str(tiny_sd))
    with monkeypatch.context() as patch:
        patch.setattr(type(pipe), "__call__", raise_cuda_oom)
        with pytest.raises(OutOfMemory) as error:
            generate(GenerationRequest(prompt="a red circle", model=str(tiny_sd), seeds=[0, 1, 2], batch_size=2))
    message = str(error.value)
    assert message.startswith("Out of memory while generating 3 image(s)") and "fewer seeds" in message
    assert "2 at a time" in message and "Tried to allocate" not in message
    # The pipeline lock was released: the same model still draws.
    assert generate(GenerationRequest(prompt="a red circle", model=str(tiny_sd), seeds=[0]))[0].image is not None


def test_interactive_work_that_runs_out_of_memory_names_the_background_job(tiny_sd, runner, monkeypatch):
    started, release = threading.Event(), threading.Event()

    def long_fine_tune(params, ctx):
        started.set()
        release.wait(30)

    runner.register("hold-memory", long_fine_tune)
    monkeypatch.setattr(jobs, "_runner", runner)  # the app's process-wide runner
    job_id = runner.submit("hold-memory", {})
    try:
        assert started.wait(30)
        pipe = load_pipeline(str(tiny_sd))
        monkeypatch.setattr(type(pipe), "__call__", raise_cuda_oom)
        with pytest.raises(OutOfMemory, match=f"hold-memory job {job_id}.*cancel it in the Runs tab"):
            generate(GenerationRequest(prompt="a red circle", model=str(tiny_sd), seeds=[0]))
    finally:
        release.set()
    runner.wait(job_id, timeout=30)


def test_a_job_that_runs_out_of_memory_fails_with_advice_and_keeps_the_details_in_its_log(runner):
    runner.register("greedy", lambda params, ctx: raise_cuda_oom())
    job = runner.wait(runner.submit("greedy", {}), timeout=30)
    assert job.status is jobs.JobStatus.FAILED
    assert job.error.startswith("Out of memory while running this greedy job") and "smaller batch" in job.error
    assert "Runs tab" not in job.error  # no other job holds the memory: this one is the background run
    assert CUDA_MESSAGE in runner.get(job.id).log  # the original error stays for whoever debugs it


def test_a_fine_tune_that_runs_out_of_memory_keeps_its_checkpoint_and_resumes(tiny_sd, tmp_path, monkeypatch,
                                                                              capsys):
    from pipelines import trainer
    from test_trainer import log_steps, make_imagefolder, tiny_config

    data = make_imagefolder(tmp_path / "data", 4)
    config = tiny_config(tiny_sd, [data], tmp_path / "out", steps=4, checkpoint_every=2)
    calls = {"n": 0}
    real_loss = trainer.weighted_loss

    def loss_then_oom(*args):
        calls["n"] += 1
        if calls["n"] == 3:  # the third step, after the checkpoint at step 2
            raise_cuda_oom()
        return real_loss(*args)

    with monkeypatch.context() as patch:
        patch.setattr(trainer, "weighted_loss", loss_then_oom)
        with pytest.raises(OutOfMemory) as error:
            trainer.train(config)
    message = str(error.value)
    assert message.startswith("Out of memory while fine-tuning") and "smaller batch (now 3)" in message
    assert (tmp_path / "out" / "checkpoints" / "step-2" / "trainer_state.json").is_file()

    result = trainer.train(config)  # the same command again: it continues from step 2
    assert result["steps"] == 4 and log_steps(tmp_path / "out") == [1, 2, 3, 4]

    calls["n"] = 0
    monkeypatch.setattr(trainer, "weighted_loss", loss_then_oom)
    with pytest.raises(SystemExit) as exit_info:
        trainer.main(["--model", str(tiny_sd), "--data", str(data), "--out", str(tmp_path / "cli"), "--steps", "4",
                      "--batch-size", "2", "--checkpoint-every", "2"])
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err.strip()
    assert stderr.startswith("error: Out of memory while fine-tuning") and "Traceback" not in stderr


def test_the_inspect_tab_says_when_the_detector_runs_out_of_memory(monkeypatch):
    from PIL import Image

    from workbench.ui import inspect

    class GreedyDetector:
        def detect(self, image, labels=None):
            raise_cuda_oom()

    monkeypatch.setattr(inspect, "_detector", lambda name: GreedyDetector())
    message = inspect.inspect_image(Image.new("RGB", (64, 64), "white"), "a red circle", "shapes")[-1]
    assert message.startswith("Cannot inspect: Out of memory while detecting objects with shapes")
