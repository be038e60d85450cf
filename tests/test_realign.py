"""RealignDiff's coarse stage (pipelines.realign, ReFL) and the differentiable caption rewards."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipelines.realign import ReFLConfig, run_refl
from test_trainer import generate_pixels, make_imagefolder
from workbench.errors import InvalidInput, WorkbenchError
from workbench.generation import LoraSpec
from workbench.jobs import JobCancelled
from workbench.shapes.bench_prompts import vocabulary
from workbench.shapes.caption_model import CaptionerConfig, CaptionModel


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def caption_model(tmp_path_factory) -> Path:
    """A random shapes captioner for 32x32 images (the tiny SD's size), saved as the real one is."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("captioner")
    CaptionModel(CaptionerConfig(vocab=vocabulary(), width=32, heads=2, decoder_layers=1, image_size=32)).save(folder)
    return folder


@pytest.fixture(scope="module")
def pretrain_data(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("pretrain"), 4, seed=2)


def tiny_refl(tiny_sd, caption_model, pretrain_data, **overrides) -> ReFLConfig:
    settings = dict(model=str(tiny_sd), reward="shapes", reward_model=str(caption_model), prompts=6, steps=3,
                    batch_size=2, lr=1e-2, rank=4, alpha=4.0, reward_weight=1.0, schedule_steps=4,
                    first_grad_step=2, guidance=2.0, pretrain_batch=2, pretrain_data=str(pretrain_data),
                    checkpoint_every=1, eval_seeds=0)
    settings.update(overrides)
    return ReFLConfig(**settings)


def test_the_likelihood_reward_is_differentiable_and_prefers_the_true_prompt(caption_model):
    from workbench.likelihood_reward import get_likelihood_reward

    reward = get_likelihood_reward("shapes", model=caption_model)
    images = torch.zeros(2, 3, 32, 32, requires_grad=True)
    r = reward(images, ["a red circle", "two blue squares left of a triangle"])
    assert r.shape == (2,) and bool((r < 0).all())
    r.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0  # the gradient reaches the pixels


def test_an_ensemble_reward_is_the_mean_of_its_captioners_and_reaches_the_pixels(caption_model, tmp_path):
    from workbench.likelihood_reward import get_likelihood_reward

    other = tmp_path / "other-captioner"
    torch.manual_seed(1)  # another seed: other weights, as a captioner trained with --seed 1 has
    CaptionModel(CaptionerConfig(vocab=vocabulary(), width=32, heads=2, decoder_layers=1, image_size=32)).save(other)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    prompts = ["a red circle", "two blue squares left of a triangle"]
    alone = [get_likelihood_reward("shapes", model=m)(images, prompts) for m in (caption_model, other)]
    assert not torch.allclose(alone[0], alone[1])
    ensemble = get_likelihood_reward("shapes", model=caption_model, ensemble=[str(other)])
    pixels = images.clone().requires_grad_(True)
    r = ensemble(pixels, prompts)
    assert torch.allclose(r, (alone[0] + alone[1]) / 2, atol=1e-5)
    r.sum().backward()
    assert pixels.grad.abs().sum() > 0


def test_the_blip_likelihood_reward_reaches_the_pixels(tmp_path):
    from test_captioning import build_tiny_blip
    from workbench.likelihood_reward import get_likelihood_reward

    reward = get_likelihood_reward("blip", model=str(build_tiny_blip(tmp_path / "blip")))
    images = torch.zeros(2, 3, 64, 64, requires_grad=True)
    r = reward(images, ["a red circle", "a dog"])
    assert r.shape == (2,) and torch.isfinite(r).all()
    r.sum().backward()
    assert images.grad.abs().sum() > 0


def test_refl_trains_a_lora_the_generation_service_loads(tiny_sd, caption_model, pretrain_data, tmp_path):
    result = run_refl(tiny_refl(tiny_sd, caption_model, pretrain_data), tmp_path / "run", log=lambda m: None)
    adapter = Path(result["adapter"])
    weights = load_file(str(adapter / "pytorch_lora_weights.safetensors"))
    assert any(".lora.up." in k and v.abs().sum() > 0 for k, v in weights.items())  # trained, not the zero init
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2, 3]
    assert all(2 <= h["grad_step"] < 4 and np.isfinite(h["reward"]) and h["pretrain_loss"] > 0 for h in history)
    assert all(h["reward_weight"] == 1.0 for h in history)  # lambda as given
    base = generate_pixels(tiny_sd, [])
    tuned = generate_pixels(tiny_sd, [LoraSpec(str(adapter), 1.0)])
    assert np.abs(base.astype(int) - tuned.astype(int)).max() > 0


def test_a_contrastive_run_trains_on_the_prompt_against_its_hard_negatives(tiny_sd, caption_model, pretrain_data,
                                                                            tmp_path):
    result = run_refl(tiny_refl(tiny_sd, caption_model, pretrain_data, negatives=3), tmp_path / "run", log=lambda m: None)
    weights = load_file(str(Path(result["adapter"]) / "pytorch_lora_weights.safetensors"))
    assert any(".lora.up." in k and v.abs().sum() > 0 for k, v in weights.items())
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    # A log-softmax over the prompt and 3 negatives: at most 0, and not the plain likelihood's scale.
    assert len(history) == 3 and all(-20 < h["reward"] <= 0 for h in history)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["negatives"] == 3


def test_the_gradient_step_is_drawn_in_the_given_window_and_can_spare_the_unconditional_branch(
        tiny_sd, caption_model, pretrain_data, tmp_path):
    config = tiny_refl(tiny_sd, caption_model, pretrain_data, schedule_steps=6, first_grad_step=1, last_grad_step=3)
    run_refl(config, tmp_path / "both", log=lambda m: None)
    history = [json.loads(line) for line in (tmp_path / "both" / "history.jsonl").read_text().splitlines()]
    assert all(1 <= h["grad_step"] < 3 for h in history)
    spared = run_refl(replace(config, detach_uncond=True), tmp_path / "spared", log=lambda m: None)
    # Same draws, same prompts: only where the reward's gradient goes differs, and so does the adapter.
    a = load_file(str(tmp_path / "both" / "adapter" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(Path(spared["adapter"]) / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and any(not torch.allclose(a[k], b[k]) for k in a)
    with pytest.raises(InvalidInput, match="last_grad_step must lie after first_grad_step"):
        run_refl(replace(config, last_grad_step=1), tmp_path / "bad", log=lambda m: None)


def test_the_reward_can_score_the_finished_image_through_an_early_steps_prediction(tiny_sd, caption_model,
                                                                                    pretrain_data, tmp_path):
    config = tiny_refl(tiny_sd, caption_model, pretrain_data, schedule_steps=6, first_grad_step=1, last_grad_step=3)
    run_refl(config, tmp_path / "x0", log=lambda m: None)
    run_refl(replace(config, score_final_image=True), tmp_path / "finished", log=lambda m: None)
    x0, finished = ([json.loads(line) for line in (tmp_path / name / "history.jsonl").read_text().splitlines()]
                    for name in ("x0", "finished"))
    # Same draws (prompts, noise, gradient step); at step 1 the adapter is still the identity, so only the
    # image that is scored differs: a blurry early prediction in one run, the sampled image in the other.
    assert [h["grad_step"] for h in x0] == [h["grad_step"] for h in finished]
    assert all(1 <= h["grad_step"] < 3 for h in finished)
    assert x0[0]["reward"] != pytest.approx(finished[0]["reward"], abs=1e-6)
    weights = load_file(str(tmp_path / "finished" / "adapter" / "pytorch_lora_weights.safetensors"))
    assert any(".lora.up." in k and v.abs().sum() > 0 for k, v in weights.items())  # the gradient reached the LoRA


def test_a_shifted_reward_scores_moved_copies_of_the_image(tiny_sd, caption_model, pretrain_data, tmp_path):
    from pipelines.realign import random_shift

    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    moved = random_shift(images, torch.Generator().manual_seed(1))
    assert moved.shape == images.shape and not torch.equal(moved, images)
    moved.sum().backward()
    assert images.grad.abs().sum() > 0  # the reward's gradient still reaches the decoded image
    run_refl(tiny_refl(tiny_sd, caption_model, pretrain_data, negatives=2, reward_shifts=2), tmp_path / "run",
             log=lambda m: None)
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert len(history) == 3 and all(-20 < h["reward"] <= 0 for h in history)


@pytest.mark.parametrize("negatives, text_encoder, unet", [(0, False, True), (2, True, True), (0, True, False)])
def test_a_stopped_run_resumes_to_the_same_adapter(tiny_sd, caption_model, pretrain_data, tmp_path, negatives,
                                                   text_encoder, unet):
    # lambda left to the gradient balance: set once at step 1, kept through the resume; hard negatives
    # drawn as in the straight run; a text-encoder LoRA restored with the UNet's.
    config = tiny_refl(tiny_sd, caption_model, pretrain_data, reward_weight=None, negatives=negatives,
                       train_text_encoder=text_encoder, train_unet=unet)
    straight = run_refl(config, tmp_path / "straight", log=lambda m: None)
    calls = []
    with pytest.raises(JobCancelled, match="step 2"):
        run_refl(config, tmp_path / "resumed", should_stop=lambda: calls.append(1) or len(calls) == 2,
                 log=lambda m: None)
    assert not (tmp_path / "resumed" / "adapter" / "done").exists()
    resumed = run_refl(config, tmp_path / "resumed", log=lambda m: None)
    a = load_file(str(Path(straight["adapter"]) / "pytorch_lora_weights.safetensors"))
    b = load_file(str(Path(resumed["adapter"]) / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    text_encoder_keys = [k for k in a if k.startswith("text_encoder.")]
    assert bool(text_encoder_keys) == text_encoder
    trained_up = [k for k in text_encoder_keys if ".up." in k]  # diffusers' lora_linear_layer.up (the zero init)
    assert bool(trained_up) == text_encoder and all(a[k].abs().sum() > 0 for k in trained_up)
    assert any(k.startswith("unet.") for k in a) == unet  # text encoder only: the UNet stays the base model's
    weights = {json.loads(line)["reward_weight"] for line in (tmp_path / "resumed" / "history.jsonl").read_text().splitlines()}
    assert len(weights) == 1 and weights.pop() > 0
    # The same folder refuses other settings instead of mixing two runs.
    with pytest.raises(InvalidInput, match="other settings"):
        run_refl(replace(config, lr=1e-3), tmp_path / "resumed", log=lambda m: None)
    # A run saved before hard negatives existed continues as the plain-likelihood run it was.
    if not negatives and unet:
        saved = json.loads((tmp_path / "resumed" / "config.json").read_text())
        del saved["negatives"], saved["train_text_encoder"]
        (tmp_path / "resumed" / "config.json").write_text(json.dumps(saved))
        assert run_refl(config, tmp_path / "resumed", log=lambda m: None)["status"] == "done"


def test_a_real_model_without_pretraining_data_is_refused_with_a_hint(tmp_path):
    with pytest.raises(InvalidInput, match="--pretrain-data"):
        run_refl(ReFLConfig(model="org/some-model"), tmp_path / "run")


def test_a_full_fine_tune_of_the_shapes_model_is_trained_in_the_shapes_world(tiny_sd, tmp_path):
    # Its reward is the shapes captioner and its pre-training term rendered scenes, as for the shapes model.
    import shutil

    from pipelines.ipr import IPRConfig
    from workbench.registry import resolve, write_fine_tune_origin

    folder = tmp_path / "pipeline"
    shutil.copytree(tiny_sd, folder)
    assert ReFLConfig(model=str(folder)).reward_name == "blip"
    with pytest.raises(InvalidInput, match="--pretrain-data"):
        ReFLConfig(model=str(folder), eval_prompts=str(tmp_path / "none.jsonl")).validate()
    write_fine_tune_origin(folder, resolve("shapes"))
    assert ReFLConfig(model=str(folder)).reward_name == "shapes"
    with pytest.raises(InvalidInput, match="none.jsonl") as error:  # past the world's checks, to the next one
        ReFLConfig(model=str(folder), eval_prompts=str(tmp_path / "none.jsonl")).validate()
    assert "--pretrain-data" not in str(error.value)
    with pytest.raises(InvalidInput, match="none.jsonl") as error:
        IPRConfig(model=str(folder), prior_images=8, eval_prompts=str(tmp_path / "none.jsonl")).validate()
    assert "--prior-data" not in str(error.value)


def test_the_shapes_pretraining_term_trains_on_real_scenes_the_vae_can_decode():
    """Eq. 5's denoising term must see what the shapes model was trained on: latents of 8-bit renders in
    [-1, 1]. Encoded at the wrong scale, the latents decode to saturated noise, not to the scene."""
    from diffusers import AutoencoderKL

    from pipelines.realign import ShapesPretrainingData
    from pipelines.train_shapes import render_batch
    from workbench.registry import resolve
    from workbench.shapes.scene import sample_scene

    vae = AutoencoderKL.from_pretrained(resolve("shapes").source, subfolder="vae").eval()
    data = ShapesPretrainingData(vae)
    latents, captions = data.batch(4, np.random.default_rng(3), torch.Generator().manual_seed(0))
    rng = np.random.default_rng(3)
    scenes = [sample_scene(rng) for _ in range(4)]  # the same draws the batch made
    with torch.no_grad():
        decoded = vae.decode(latents).sample.clamp(-1, 1)
    assert len(captions) == 4 and all(isinstance(c, str) for c in captions)
    assert (decoded - render_batch(scenes)).abs().mean() < 0.05


@pytest.mark.parametrize("changes, words", [
    ({"reward": "blip"}, "The BLIP captioner .*no folder"),
    ({"reward_model": "/no/such/captioner"}, "pipelines.train_shapes_captioner"),
    ({"reward_ensemble": ["/no/such/second-captioner"]}, "/no/such/second-captioner"),
    ({"reward": "clip"}, "Unknown reward 'clip'"),
    ({"detector": "no-such-detector"}, "No 'no-such-detector' detector backend"),
])
def test_a_reward_model_that_is_not_there_is_named_before_anything_loads_or_is_written(tmp_path, monkeypatch,
                                                                                       changes, words):
    monkeypatch.setenv("WORKBENCH_BLIP_MODEL", str(tmp_path / "no-blip"))
    with pytest.raises(WorkbenchError, match=words):
        run_refl(ReFLConfig(**changes), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("changes, words", [
    ({"checkpoint_every": 0}, "checkpoint_every must be at least 1"),
    ({"prompts": 0}, "at least one training prompt"),
    ({"rank": 0}, "LoRA rank must be at least 1"),
    ({"eval_prompts": "/no/such/prompts.jsonl"}, "does not exist"),
    ({"eval_seeds": -1}, "Evaluation seeds must be between 0 and 16"),
    ({"model": "/no/such/model"}, "No model folder at"),
    ({"pretrain_data": "/no/such/folder"}, "Training data folder not found: /no/such/folder"),
])
def test_bad_refl_settings_are_refused_before_any_work(tmp_path, changes, words):
    with pytest.raises(InvalidInput, match=words):
        run_refl(ReFLConfig(**changes), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_every_refl_setting_is_explained_in_help(capsys):
    from dataclasses import fields

    from pipelines.realign import HELP, ReFLConfig, main

    with pytest.raises(SystemExit):
        main(["--help"])
    said = " ".join(capsys.readouterr().out.split())
    for f in fields(ReFLConfig):
        assert "--" + f.name.replace("_", "-") in said
        assert " ".join(HELP[f.name].split()[:4]) in said, f.name
    assert "lambda of eq. 5 (default: balanced at step 1" in said
