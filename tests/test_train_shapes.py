"""The shapes-model training script, on a config that trains in seconds."""

import json
from dataclasses import replace

import pytest
import torch

import pipelines.train_shapes as train_shapes
from pipelines.train_shapes import TINY, train


def test_training_exports_a_pipeline_that_loads_and_generates(tmp_path):
    from diffusers import StableDiffusionPipeline

    out, work = tmp_path / "model", tmp_path / "work"
    facts = train(out, work, seed=0, cfg=TINY)
    assert facts["steps"] == TINY.steps

    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert pipe.vae.config.scaling_factor == pytest.approx(facts["scaling_factor"])
    assert pipe.tokenizer.tokenize("a red circle") == ["a</w>", "red</w>", "circle</w>"]
    pipe.set_progress_bar_config(disable=True)
    # No size given: the pipeline's default must be the 64x64 the model is trained at.
    image = pipe("a red circle", num_inference_steps=2, guidance_scale=7.5,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)

    assert all(p.suffix == ".safetensors" for p in out.rglob("*.safetensors"))
    assert not list(out.rglob("*.bin")), "weights are saved as safetensors only"
    card = (out / "README.md").read_text()
    assert "## ShapesBench scores" in card and "python -m workbench eval --model shapes" in card
    assert f"**{TINY.steps} steps**" in card

    with pytest.raises(SystemExit, match="--resume"):
        train(out, work, seed=0, cfg=TINY)  # never silently overwrites an earlier run's checkpoints


def test_a_killed_run_resumes_to_the_same_weights_as_a_straight_run(tmp_path, monkeypatch, capsys):
    cfg = replace(TINY, steps=6, checkpoint_every=2)
    train(tmp_path / "straight-model", tmp_path / "straight", seed=3, cfg=cfg)
    straight = torch.load(tmp_path / "straight" / "diffusion.pt", weights_only=True)

    # Kill the second run during its 4th diffusion step: its last checkpoint is from step 2.
    real_make_batch, calls = train_shapes.make_batch, []

    def dying_make_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_make_batch(*args, **kwargs)

    monkeypatch.setattr(train_shapes, "make_batch", dying_make_batch)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "model", tmp_path / "work", seed=3, cfg=cfg)
    monkeypatch.setattr(train_shapes, "make_batch", real_make_batch)
    assert torch.load(tmp_path / "work" / "diffusion.pt", weights_only=False)["step"] == 2
    capsys.readouterr()

    facts = train(tmp_path / "model", tmp_path / "work", seed=3, cfg=cfg, resume=True)
    assert "diffusion: resuming at step 2/6" in capsys.readouterr().out
    assert facts["steps"] == 6
    resumed = torch.load(tmp_path / "work" / "diffusion.pt", weights_only=False)
    for name, value in straight["unet"].items():
        torch.testing.assert_close(resumed["unet"][name], value, msg=f"unet {name} differs after resume")
    for a, b in zip(straight["ema"], resumed["ema"]):
        torch.testing.assert_close(a, b)
    assert (tmp_path / "model" / "model_index.json").exists()


def test_card_scores_replace_the_shapesbench_section(tmp_path):
    from pipelines.train_shapes import main

    (tmp_path / "README.md").write_text("# card\n\nfacts\n\n## ShapesBench scores\n\n_To be filled in._\n")
    scores = {"per_tag": {"single_object": {"correct": 190, "total": 200, "accuracy": 0.95},
                          "position": {"correct": 40, "total": 200, "accuracy": 0.2}},
              "overall": 0.575, "images": 400, "config": {"seeds": 4, "seconds": 60.0}}
    (tmp_path / "scores.json").write_text(json.dumps(scores))
    main(["--out", str(tmp_path), "--card-scores", str(tmp_path / "scores.json")])
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("# card\n\nfacts\n")
    assert "To be filled in" not in card
    assert "| `single_object` | 190/200 | 95.0% |" in card and "| `position` | 40/200 | 20.0% |" in card
    assert "**57.5%**" in card
