"""The shared fine-tuning engine (pipelines.trainer) on the tiny random SD and shapes-world images."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipelines.trainer import TrainConfig, main, train, training_target, weighted_loss
from workbench.errors import InvalidInput

REPO = Path(__file__).resolve().parent.parent


def make_imagefolder(folder: Path, n: int, seed: int = 0, weight: float | None = None) -> Path:
    """n rendered shapes scenes with their short captions, as an imagefolder (metadata.jsonl)."""
    from workbench.shapes.captions import short_caption
    from workbench.shapes.render import render
    from workbench.shapes.scene import sample_scene

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        scene = sample_scene(rng)
        render(scene).save(folder / f"{i:03d}.png")
        record = {"file_name": f"{i:03d}.png", "text": short_caption(scene)}
        if weight is not None:
            record["weight"] = weight
        lines.append(json.dumps(record))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("shapes-data"), 5, seed=1)


def tiny_config(model: Path, data: list[Path], out: Path, **overrides) -> TrainConfig:
    settings = dict(steps=4, batch_size=3, lr=1e-2, rank=4, alpha=4.0, log_every=1, checkpoint_every=2, seed=7)
    settings.update(overrides)
    return TrainConfig(model=str(model), data=[str(d) for d in data], out=str(out), **settings)


def log_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]


def generate_pixels(model: Path, loras: list) -> np.ndarray:
    from workbench.generation import GenerationRequest, generate

    request = GenerationRequest("a red circle", model=str(model), seeds=[0], steps=2, loras=loras)
    return np.asarray(generate(request)[0].image)


def generate_pixels_and_warnings(model: Path, loras: list) -> tuple[np.ndarray, list[str]]:
    """generate_pixels, and the warnings diffusers logged meanwhile (its loggers do not propagate to pytest's)."""
    seen: list[str] = []
    warnings = logging.Handler(logging.WARNING)
    warnings.emit = lambda record: seen.append(record.getMessage())
    logging.getLogger("diffusers").addHandler(warnings)
    try:
        return generate_pixels(model, loras), seen
    finally:
        logging.getLogger("diffusers").removeHandler(warnings)


def test_lora_training_writes_an_adapter_the_generation_service_loads(tiny_sd, shapes_data, tmp_path):
    from workbench.generation import LoraSpec

    out = tmp_path / "run"
    extra = make_imagefolder(tmp_path / "extra", 3, seed=5, weight=0.5)
    progress = []
    result = train(tiny_config(tiny_sd, [shapes_data, extra], out, log_every=2),
                   on_progress=lambda fraction, message: progress.append(fraction))

    assert result["steps"] == 4 and result["stopped"] is False and np.isfinite(result["loss"])
    assert result["lora"] == str(out / "pytorch_lora_weights.safetensors") and Path(result["lora"]).is_file()
    assert progress[-1] == 1.0
    config = json.loads((out / "train_config.json").read_text())
    assert config["model"] == str(tiny_sd) and config["rows"] == 5 + 3 and config["resolution_used"] == 32
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert set(records[0]) == {"step", "loss", "lr", "seconds"} and records[-1]["loss"] == pytest.approx(result["loss"])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]

    base = generate_pixels(tiny_sd, [])
    adapted, seen = generate_pixels_and_warnings(tiny_sd, [LoraSpec(str(out), 1.0)])
    muted = generate_pixels(tiny_sd, [LoraSpec(str(out), 0.0)])
    assert np.abs(adapted.astype(int) - base).max() > 0, "the trained LoRA changes nothing"
    assert not [m for m in seen if "No LoRA keys" in m], seen  # no warning about the text encoder it never had
    assert np.array_equal(muted, base), "a LoRA at weight 0 must give the base model's image"


def test_a_text_encoder_only_lora_leaves_the_unet_alone_and_loads_and_resumes(tiny_sd, shapes_data, tmp_path):
    from workbench.generation import LoraSpec

    out = tmp_path / "run"
    config = tiny_config(tiny_sd, [shapes_data], out, train_text_encoder=True, train_unet=False)
    train(replace(config, steps=2))
    result = train(config)  # resumes from the step-2 checkpoint, through the same save and load hooks
    assert result["steps"] == 4 and log_steps(out) == [1, 2, 3, 4]
    keys = load_file(result["lora"]).keys()
    assert keys and all(k.startswith("text_encoder.") for k in keys)
    assert json.loads((out / "train_config.json").read_text())["lora_config"]["target_modules"]

    base = generate_pixels(tiny_sd, [])
    adapted, seen = generate_pixels_and_warnings(tiny_sd, [LoraSpec(str(out), 1.0)])
    assert np.abs(adapted.astype(int) - base).max() > 0, "the text-encoder LoRA changes nothing"
    assert not [m for m in seen if "No LoRA keys" in m], seen  # no warning about the UNet it never had
    with pytest.raises(InvalidInput, match="needs a LoRA on the text encoder"):
        train(replace(config, train_text_encoder=False, out=str(tmp_path / "unet-off")))


def test_a_lora_beyond_the_attention_layers_loads_back_whole(tiny_sd, shapes_data, tmp_path):
    # Adapting the transformer blocks' projections and feed-forward layers too: every adapted layer
    # must come back through diffusers' own loader with its trained weights, not only the attention.
    from diffusers import StableDiffusionPipeline

    targets = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
    out = tmp_path / "wide"
    train(tiny_config(tiny_sd, [shapes_data], out, steps=2, target_modules=targets))

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd))
    expected = {name for name, _ in pipe.unet.named_modules() if name.endswith(targets)}
    pipe.load_lora_weights(str(out), adapter_name="wide")
    loaded = {name: module for name, module in pipe.unet.named_modules()
              if "wide" in getattr(module, "lora_B", {})}
    assert set(loaded) == expected
    assert {"ff.net.2", "proj_in", "to_q"} <= {next(t for t in targets if n.endswith(t)) for n in loaded}
    saved = load_file(out / "pytorch_lora_weights.safetensors")
    for name, module in loaded.items():
        up = next(v for k, v in saved.items() if k.startswith(f"unet.{name}.") and (".lora_B." in k or ".lora.up." in k))
        assert torch.equal(module.lora_B["wide"].weight, up), name


def test_full_fine_tune_exports_unet_and_a_pipeline_the_registry_loads(tiny_sd, shapes_data, tmp_path):
    from workbench.registry import resolve

    out = tmp_path / "full"
    result = train(tiny_config(tiny_sd, [shapes_data], out, lora=False, steps=2, lr=1e-3))
    assert result["lora"] is None and not (out / "pytorch_lora_weights.safetensors").exists()
    assert result["pipeline"] == str(out / "pipeline")
    trained = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    original = load_file(tiny_sd / "unet" / "diffusion_pytorch_model.safetensors")
    assert trained.keys() == original.keys()
    assert any(not torch.equal(trained[k], original[k]) for k in trained), "full fine-tune left the UNet unchanged"
    # The exported pipeline is a local model like any other: resolvable, loadable, and it draws differently.
    # It names the model it came from (which, when registered, lends it its sampling defaults).
    assert resolve(str(out / "pipeline")).default_size == 32
    assert json.loads((out / "pipeline" / "workbench_model.json").read_text()) == {"base_model": resolve(str(tiny_sd)).name}
    assert np.abs(generate_pixels(out / "pipeline", []).astype(int) - generate_pixels(tiny_sd, [])).max() > 0


@pytest.mark.parametrize("interruption", ["stop", "crash"])
def test_an_interrupted_run_resumes_to_the_same_weights_as_a_straight_run(tiny_sd, shapes_data, tmp_path,
                                                                         interruption):
    # Everything that keeps state across steps: EMA, accumulation, a text-encoder LoRA, min-SNR, prompt
    # dropout, and batches (3 of 5 rows, x2 accumulation) that run across epochs.
    config = tiny_config(tiny_sd, [shapes_data], tmp_path / "straight", steps=5, grad_accum=2, ema_decay=0.9,
                         snr_gamma=5.0, train_text_encoder=True, warmup=2, prompt_dropout=0.5)
    straight = train(config)

    resumed = replace(config, out=str(tmp_path / "resumed"))
    if interruption == "stop":
        calls = []

        def should_stop() -> bool:
            calls.append(1)
            return len(calls) == 3

        first = train(resumed, should_stop=should_stop)
        assert first["stopped"] is True and first["steps"] == 3 and first["lora"] is None
        assert Path(first["checkpoint"]).name == "step-3"
        assert not (tmp_path / "resumed" / "pytorch_lora_weights.safetensors").exists()
    else:
        def on_progress(fraction: float, message: str) -> None:
            if fraction == 3 / 5:
                raise RuntimeError("killed")  # dies after step 3; its last checkpoint is step 2

        with pytest.raises(RuntimeError, match="killed"):
            train(resumed, on_progress=on_progress)
        assert log_steps(tmp_path / "resumed") == [1, 2, 3]
    second = train(resumed, resume=True)
    assert second["steps"] == 5 and second["stopped"] is False

    a = load_file(straight["lora"])
    b = load_file(second["lora"])
    assert a.keys() == b.keys() and any(k.startswith("text_encoder.") for k in a)
    for key in a:
        torch.testing.assert_close(b[key], a[key], msg=key)
    assert log_steps(tmp_path / "resumed") == [1, 2, 3, 4, 5]  # no step logged twice after the resume
    assert second["loss"] == pytest.approx(straight["loss"], rel=1e-5)

    with pytest.raises(InvalidInput, match=r"other settings \(rank\)"):
        train(replace(resumed, rank=2), resume=True)
    with pytest.raises(InvalidInput, match="already past steps=4"):
        train(replace(resumed, steps=4), resume=True)


def test_zero_loss_weights_leave_an_init_lora_untouched(tiny_sd, tiny_lora, tmp_path):
    ignored = make_imagefolder(tmp_path / "ignored", 4, seed=2, weight=0.0)
    config = tiny_config(tiny_sd, [ignored], tmp_path / "zero", init_lora=str(tiny_lora), steps=3, rank=8)
    result = train(config)
    init = load_file(tiny_lora / "pytorch_lora_weights.safetensors")
    trained = load_file(result["lora"])
    # Continued with the adapter's own rank (4), and with all weights 0 not a single value moved.
    assert trained.keys() == init.keys()
    for key in init:
        assert torch.equal(trained[key], init[key]), key

    counted = make_imagefolder(tmp_path / "counted", 4, seed=2, weight=1.0)
    moved = load_file(train(replace(config, data=[str(counted)], out=str(tmp_path / "one")))["lora"])
    assert any(not torch.equal(moved[k], init[k]) for k in init)


def test_per_sample_weights_scale_each_sample_loss_and_gradient():
    torch.manual_seed(0)
    pred = torch.randn(3, 4, 8, 8, requires_grad=True)
    target = torch.randn(3, 4, 8, 8)

    def grad(weights) -> torch.Tensor:
        pred.grad = None
        weighted_loss(pred, target, torch.tensor(weights)).backward()
        return pred.grad.clone()

    g = grad([1.0, 0.5, 0.0])
    torch.testing.assert_close(grad([2.0, 1.0, 0.0]), 2 * g)  # doubled weights, doubled gradient
    assert torch.count_nonzero(g[2]) == 0  # a weight-0 sample contributes nothing
    torch.testing.assert_close(g[1], grad([0.0, 0.5, 0.0])[1])  # each sample's gradient is its own
    per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    expected = (per_sample * torch.tensor([1.0, 0.5, 0.0])).mean()
    torch.testing.assert_close(weighted_loss(pred, target, torch.tensor([1.0, 0.5, 0.0])), expected)


def test_prompt_dropout_swaps_about_that_share_of_captions_for_the_empty_prompt():
    from pipelines.trainer import drop_prompts

    ids = torch.arange(1, 4001).view(2000, 2)
    empty = torch.zeros(1, 2, dtype=ids.dtype)
    dropped = drop_prompts(ids, empty, 0.1, torch.Generator().manual_seed(0))
    is_empty = (dropped == 0).all(dim=1)
    assert 0.08 < is_empty.float().mean().item() < 0.12
    assert torch.equal(dropped[~is_empty], ids[~is_empty])  # the others keep their own caption
    again = drop_prompts(ids, empty, 0.1, torch.Generator().manual_seed(0))
    assert torch.equal(dropped, again)  # same generator, same captions dropped: resumes stay exact
    assert drop_prompts(ids, empty, 0.0, torch.Generator()) is ids


def test_random_flips_train_mirror_images_under_their_own_caption(tiny_sd, shapes_data, tmp_path, monkeypatch):
    """With random_flip, a row's "flip_text" is the caption of its mirror image; "flip_text": null keeps
    the row unflipped (IPR's relabeled pairs say left and right)."""
    import pipelines.trainer as trainer
    from transformers import CLIPTokenizer

    said, original = [], trainer.drop_prompts
    monkeypatch.setattr(trainer, "drop_prompts", lambda ids, *rest: said.append(ids.clone()) or original(ids, *rest))
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")

    def ids(text: str) -> tuple:
        return tuple(tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length,
                               truncation=True).input_ids)

    def captions_trained(flip_text, random_flip=True) -> set:
        folder = tmp_path / f"data-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(shapes_data, folder)
        rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
        (folder / "metadata.jsonl").write_text("".join(
            json.dumps({**row, "text": "a circle left of a square", "flip_text": flip_text}) + "\n" for row in rows))
        said.clear()
        train(tiny_config(tiny_sd, [folder], folder.with_name(folder.name + "-out"), steps=6, checkpoint_every=100,
                          random_flip=random_flip))
        return {tuple(row.tolist()) for batch in said for row in batch}

    asked, mirrored = ids("a circle left of a square"), ids("a circle right of a square")
    assert captions_trained("a circle right of a square") == {asked, mirrored}  # 18 draws: both occur
    assert captions_trained(None) == {asked}  # never flipped
    assert captions_trained("a circle right of a square", random_flip=False) == {asked}


def test_a_timestep_range_trains_on_that_share_of_the_schedule_only(tiny_sd, shapes_data, tmp_path, monkeypatch):
    """timestep_range (0.5, 1.0) trains the noisier half of the schedule only; the default draws from all of it."""
    from diffusers import DDPMScheduler

    drawn, original = [], DDPMScheduler.add_noise
    monkeypatch.setattr(DDPMScheduler, "add_noise",
                        lambda self, x, noise, t: drawn.append(t.clone()) or original(self, x, noise, t))

    def timesteps(name: str, **overrides) -> torch.Tensor:
        drawn.clear()
        train(tiny_config(tiny_sd, [shapes_data], tmp_path / name, steps=8, checkpoint_every=100, **overrides))
        return torch.cat(drawn)

    total = DDPMScheduler.from_pretrained(tiny_sd, subfolder="scheduler").config.num_train_timesteps
    late = timesteps("late", timestep_range=(0.5, 1.0))
    assert len(late) == 24 and late.min() >= total // 2 and late.max() < total
    everywhere = timesteps("all")
    assert everywhere.min() < total // 2 <= everywhere.max()  # 24 uniform draws: both halves, all but surely


def test_the_target_follows_the_scheduler_prediction_type():
    from diffusers import DDPMScheduler

    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    v = DDPMScheduler(prediction_type="v_prediction")
    torch.testing.assert_close(training_target(v, latents, noise, t), v.get_velocity(latents, noise, t))
    assert not torch.allclose(training_target(v, latents, noise, t), noise)
    assert training_target(DDPMScheduler(prediction_type="epsilon"), latents, noise, t) is noise
    with pytest.raises(InvalidInput, match="sample"):
        training_target(DDPMScheduler(prediction_type="sample"), latents, noise, t)


def _broken_missing_metadata(folder: Path) -> str:
    (folder / "metadata.jsonl").unlink()
    return "no metadata.jsonl"


def _broken_empty(folder: Path) -> str:
    (folder / "metadata.jsonl").write_text("\n")
    return "No training images"


def _broken_missing_images(folder: Path) -> str:
    (folder / "001.png").unlink()
    (folder / "002.png").unlink()
    return "2 image file(s) listed in"


def _broken_weight(folder: Path) -> str:
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "000.png", "text": "", "weight": -1}) + "\n")
    return "weight"


def _broken_flip_text(folder: Path) -> str:
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "000.png", "text": "", "flip_text": 3}) + "\n")
    return '"flip_text" must be a caption or null'


@pytest.mark.parametrize("breakage", [_broken_missing_metadata, _broken_empty, _broken_missing_images, _broken_weight,
                                      _broken_flip_text])
def test_bad_data_fails_with_a_one_line_message(tiny_sd, shapes_data, tmp_path, capsys, breakage):
    folder = tmp_path / "data"
    shutil.copytree(shapes_data, folder)
    expected = breakage(folder)
    with pytest.raises(InvalidInput, match=re.escape(expected)) as error:
        train(tiny_config(tiny_sd, [shapes_data, folder], tmp_path / "out"))
    assert "\n" not in str(error.value)

    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(tiny_sd), "--data", str(folder), "--out", str(tmp_path / "out"), "--steps", "1"])
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err.strip()
    assert stderr.startswith("error: ") and expected in stderr and "\n" not in stderr and "Traceback" not in stderr
    assert not (tmp_path / "out").exists()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_accelerate_launch_with_two_processes_keeps_replicas_in_sync(tiny_sd, shapes_data, tmp_path):
    config_file = tmp_path / "accelerate.yaml"
    config_file.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_processes: 2\n"
                           "num_machines: 1\nmachine_rank: 0\nmixed_precision: 'no'\nuse_cpu: false\n"
                           "gpu_ids: all\nrdzv_backend: static\nsame_network: true\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    if torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "true"  # the test is about gloo on CPU, wherever it runs
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
               "--main_process_port", str(_free_port()), "-m", "pipelines.trainer",
               "--model", str(tiny_sd), "--data", str(shapes_data), "--out", str(out), "--steps", "3",
               "--batch-size", "2", "--lr", "1e-2", "--log-every", "1", "--checkpoint-every", "2", "--seed", "3"]
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]

    ranks = [json.loads((out / f"rank-{i}.json").read_text()) for i in range(2)]
    assert ranks[0]["step"] == ranks[1]["step"] == 3
    assert ranks[0]["params_sha256"] == ranks[1]["params_sha256"], "the replicas drifted apart"
    # Only the main process writes: each step logged once, one result printed, one adapter.
    assert log_steps(out) == [1, 2, 3]
    results = [line for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 1 and json.loads(results[0])["lora"] == str(out / "pytorch_lora_weights.safetensors")
    info = json.loads((out / "train_config.json").read_text())
    assert info["num_processes"] == 2 and info["global_batch"] == 4
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-3"]


@pytest.mark.parametrize("overrides, expected", [
    ({"steps": 0}, "steps must be at least 1"),
    ({"mixed_precision": "fp8"}, "mixed_precision must be no, fp16 or bf16"),
    ({"prompt_dropout": 1.0}, "prompt_dropout must be in"),
    ({"timestep_range": (0.6, 0.5)}, "timestep_range must be two shares"),
    ({"lora": False, "init_lora": "x"}, "init_lora continues a LoRA"),
    ({"model": "no-such-model"}, "Unknown model"),
])
def test_bad_settings_fail_before_any_work(tiny_sd, shapes_data, tmp_path, overrides, expected):
    config = tiny_config(tiny_sd, [shapes_data], tmp_path / "out")
    with pytest.raises(InvalidInput, match=expected):
        train(replace(config, **overrides))
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is refused on the CPU only")
def test_fp16_on_the_cpu_is_refused_with_a_hint(tiny_sd, shapes_data, tmp_path):
    with pytest.raises(InvalidInput, match="bf16"):
        train(tiny_config(tiny_sd, [shapes_data], tmp_path / "out", mixed_precision="fp16"))


def test_a_target_module_no_unet_layer_has_is_named_with_the_presets(tiny_sd, shapes_data, tmp_path):
    with pytest.raises(InvalidInput, match="No UNet layer matches the target modules bogus_layer.*attention, transformer"):
        train(tiny_config(tiny_sd, [shapes_data], tmp_path / "out", target_modules=("bogus_layer",)))
