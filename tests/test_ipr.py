"""The IPR loop end to end on the tiny random model, with a scripted detector (the tiny model draws
noise, so what it "shows" is decided here): folders, relabels, weights, accumulation, adapters,
metrics, cancel and resume, and the manual review pause."""

import json
from pathlib import Path

import pytest

from pipelines.ipr import IPRConfig, main as ipr_main, mark_reviewed, run_ipr, sample_weight
from workbench.benchmark import DETECTORS
from workbench.config import get_settings
from workbench.generation import lora_weights_file, read_png_metadata
from workbench.jobs import JobCancelled
from workbench.perception.base import Detection
from workbench.reviews import ReviewStore


class ScriptedDetector:
    """Sees one red circle on the left and one blue square on the right in every (32x32) image."""

    def detect(self, image, labels=None):
        return [Detection("circle", (1.0, 12.0, 9.0, 20.0), 0.9, "red"),
                Detection("square", (22.0, 12.0, 30.0, 20.0), 0.6, "blue")]


@pytest.fixture(autouse=True)
def scripted_detector(monkeypatch):
    monkeypatch.setitem(DETECTORS, "scripted", ScriptedDetector)


def config(tiny_sd, eval_prompts, **overrides) -> IPRConfig:
    settings = dict(model=str(tiny_sd), iterations=2, continue_adapter=True, prompts=8, samples_per_prompt=2,
                    detector="scripted", steps=2, batch_size=2, sample_steps=2, eval_prompts=eval_prompts, eval_seeds=1)
    return IPRConfig(**{**settings, **overrides})


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_two_iterations_relabel_accumulate_and_continue_the_adapter(tiny_sd, eval_prompts, tmp_path):
    out = tmp_path / "run"
    result = run_ipr(config(tiny_sd, eval_prompts), out, log=lambda m: None)
    assert result["status"] == "done"

    kept_so_far = 0
    for k in range(2):
        folder = out / f"iteration-{k}"
        samples = read_jsonl(folder / "samples.jsonl")
        assert len(samples) == 8 * 2
        for s in samples:
            assert (out / s["image"]).is_file()
            # IPR's loss re-scaling: matched pairs count fully, relabeled ones half.
            assert s["weight"] == (0.5 if s["changed"] else 1.0)
            if s["changed"] and s["keep"]:
                assert s["relabeled"] != s["prompt"] and s["reasons"]
        assert any(s["changed"] for s in samples)
        kept_so_far += sum(s["keep"] for s in samples)
        # Training sets accumulate: iteration k trains on the kept pairs of iterations 0..k.
        rows = read_jsonl(folder / "train" / "metadata.jsonl")
        assert len(rows) == kept_so_far
        assert lora_weights_file(str(folder / "adapter")) is not None
        assert (folder / "eval" / "scores.json").is_file()

    # Iteration 2 samples with iteration 1's adapter, and continues training it.
    first_image = out / read_jsonl(out / "iteration-1" / "samples.jsonl")[0]["image"]
    loras = read_png_metadata(first_image)["loras"]
    assert [lora["path"] for lora in loras] == [str(out / "iteration-0" / "adapter")]
    train_config = json.loads((out / "iteration-1" / "adapter" / "train_config.json").read_text())
    assert train_config["init_lora"] == str(out / "iteration-0" / "adapter")

    metrics = result["metrics"]
    assert [m["label"] for m in metrics] == ["base", "iteration 1", "iteration 2"]
    assert all("single_object" in m["per_tag"] for m in metrics)


def test_a_cancelled_run_continues_without_redoing_finished_stages(tiny_sd, eval_prompts, tmp_path):
    out = tmp_path / "run"
    calls = {"n": 0}

    def stop_during_training():
        calls["n"] += 1
        return (out / "iteration-0" / "train").exists()  # stop once training has started

    with pytest.raises(JobCancelled):
        run_ipr(config(tiny_sd, eval_prompts, iterations=1), out, should_stop=stop_during_training,
                log=lambda m: None)
    samples_file = out / "iteration-0" / "samples.jsonl"
    written = samples_file.stat().st_mtime_ns
    assert lora_weights_file(str(out / "iteration-0" / "adapter")) is None or \
        not (out / "iteration-0" / "adapter" / "done").exists()

    result = run_ipr(config(tiny_sd, eval_prompts, iterations=1), out, log=lambda m: None)
    assert result["status"] == "done"
    assert samples_file.stat().st_mtime_ns == written  # sampling and relabeling were not redone
    assert (out / "iteration-0" / "adapter" / "done").exists()


def test_review_pause_uses_rejections_and_edits(tiny_sd, eval_prompts, tmp_path):
    out = get_settings().runs_dir / "review-run"
    cfg = config(tiny_sd, eval_prompts, iterations=1, review=True)
    paused = run_ipr(cfg, out, log=lambda m: None)
    assert paused["status"] == "awaiting_review"
    assert not (out / "iteration-0" / "train").exists()

    samples = [s for s in read_jsonl(out / "iteration-0" / "samples.jsonl") if s["keep"]]
    rejected, edited = samples[0], samples[1]
    store = ReviewStore(get_settings().db_path)
    store.set("review-run", rejected["id"], "rejected")
    store.set("review-run", edited["id"], "edited", prompt="a red circle to the left of a blue square")

    # Without the review mark the run stays paused; with it, training reads the reviews.
    assert run_ipr(cfg, out, log=lambda m: None)["status"] == "awaiting_review"
    mark_reviewed(out, 0)
    assert run_ipr(cfg, out, log=lambda m: None)["status"] == "done"
    rows = read_jsonl(out / "iteration-0" / "train" / "metadata.jsonl")
    texts = {row["text"] for row in rows}
    assert len(rows) == len(samples) - 1
    assert "a red circle to the left of a blue square" in texts
    assert str((out / rejected["image"]).resolve()) not in {row["file_name"] for row in rows}


def test_mirrored_pairs_swap_left_and_right_where_the_detections_confirm_it(tiny_sd, eval_prompts, tmp_path):
    out = get_settings().runs_dir / "mirror-run"
    cfg = config(tiny_sd, eval_prompts, iterations=1, review=True, mirror=True, eval_seeds=0)
    run_ipr(cfg, out, log=lambda m: None)
    kept = [s for s in read_jsonl(out / "iteration-0" / "samples.jsonl") if s["keep"]]
    store = ReviewStore(get_settings().db_path)
    # Two edits: one the detections confirm in the mirror image, one they contradict (a person saw more).
    store.set("mirror-run", kept[0]["id"], "edited", prompt="a blue square on the right side of a red circle")
    store.set("mirror-run", kept[1]["id"], "edited", prompt="a red circle to the left of a green triangle")
    mark_reviewed(out, 0)
    assert run_ipr(cfg, out, log=lambda m: None)["status"] == "done"

    rows = read_jsonl(out / "iteration-0" / "train" / "metadata.jsonl")
    by_text = {row["text"]: row for row in rows}
    assert by_text["a blue square on the right side of a red circle"]["flip_text"] == \
        "a blue square on the left side of a red circle"
    assert by_text["a red circle to the left of a green triangle"]["flip_text"] is None  # never mirrored
    relabeled = [row for row in rows if "square on the right" not in row["text"] and "triangle" not in row["text"]]
    sides = {"left of": "right of", "right of": "left of"}
    assert relabeled and all(any(side in row["text"] for side in sides) for row in relabeled)
    for row in relabeled:  # the same caption with left and right swapped
        side = next(side for side in sides if side in row["text"])
        assert row["flip_text"] == row["text"].replace(side, sides[side])
    train_config = json.loads((out / "iteration-0" / "adapter" / "train_config.json").read_text())
    assert train_config["random_flip"] is True


def test_detector_weighting_scales_by_confidence():
    detections = [{"label": "circle", "box": [0, 0, 4, 4], "score": 0.9},
                  {"label": "square", "box": [8, 8, 12, 12], "score": 0.5},
                  {"label": "square", "box": [8, 8, 12, 12], "score": 0.1}]  # under the threshold
    assert sample_weight("relabel", False, detections, 0.3) == 1.0
    assert sample_weight("relabel", True, detections, 0.3) == 0.5
    assert sample_weight("detector", False, detections, 0.3) == pytest.approx(0.7)
    assert sample_weight("detector", True, detections, 0.3) == pytest.approx(0.35)


def test_a_fresh_adapter_per_iteration_still_samples_with_the_last_one(tiny_sd, eval_prompts, tmp_path):
    out = tmp_path / "run"
    run_ipr(config(tiny_sd, eval_prompts, continue_adapter=False, eval_seeds=0), out, log=lambda m: None)
    first_image = out / read_jsonl(out / "iteration-1" / "samples.jsonl")[0]["image"]
    assert [lora["path"] for lora in read_png_metadata(first_image)["loras"]] == [str(out / "iteration-0" / "adapter")]
    train_config = json.loads((out / "iteration-1" / "adapter" / "train_config.json").read_text())
    assert train_config["init_lora"] is None
    assert train_config["rows"] == sum(len(read_jsonl(out / f"iteration-{k}" / "samples.jsonl")) for k in range(2))


def test_scaled_steps_give_later_iterations_as_many_passes_over_their_accumulated_pairs(tiny_sd, eval_prompts,
                                                                                          tmp_path):
    out = tmp_path / "run"
    run_ipr(config(tiny_sd, eval_prompts, continue_adapter=False, eval_seeds=0, steps=3, scale_steps=True), out,
            log=lambda m: None)
    first = json.loads((out / "iteration-0" / "adapter" / "train_config.json").read_text())
    second = json.loads((out / "iteration-1" / "adapter" / "train_config.json").read_text())
    # Every sample is kept here, so iteration 2 holds twice iteration 1's pairs.
    assert second["rows"] == 2 * first["rows"]
    assert (first["steps"], second["steps"]) == (3, 6)


def test_adapter_seeds_average_adapters_trained_with_different_seeds(tiny_sd, eval_prompts, tmp_path):
    import numpy as np
    from safetensors.torch import load_file

    from workbench.errors import InvalidInput

    out = tmp_path / "run"
    run_ipr(config(tiny_sd, eval_prompts, continue_adapter=False, eval_seeds=0, adapter_seeds=2), out,
            log=lambda m: None)
    folder = out / "iteration-0"
    members = [folder / "adapter-seed0", folder / "adapter-seed1"]
    seeds = [json.loads((m / "train_config.json").read_text())["seed"] for m in members]
    assert seeds[0] != seeds[1]
    weights = [load_file(lora_weights_file(str(m))) for m in members]
    assert any(not np.allclose(weights[0][key].numpy(), weights[1][key].numpy()) for key in weights[0])
    # The iteration's adapter is the mean of the members' weight updates (up @ down, alpha = rank).
    merged = load_file(lora_weights_file(str(folder / "adapter")))
    ups = [key for key in merged if key.endswith("up.weight")]
    assert ups and set(merged) == set(weights[0])
    for up in ups:
        down = up.replace("up.weight", "down.weight")
        members_mean = sum(w[up] @ w[down] for w in weights) / 2
        assert np.allclose((merged[up] @ merged[down]).numpy(), members_mean.numpy(), atol=1e-6)
    # Iteration 2 samples with the averaged adapter.
    first_image = out / read_jsonl(out / "iteration-1" / "samples.jsonl")[0]["image"]
    assert [lora["path"] for lora in read_png_metadata(first_image)["loras"]] == [str(folder / "adapter")]
    with pytest.raises(InvalidInput, match="trained afresh"):
        run_ipr(config(tiny_sd, eval_prompts, adapter_seeds=2), tmp_path / "bad", log=lambda m: None)


def test_an_ema_run_exports_the_averaged_adapter_weights(tiny_sd, eval_prompts, tmp_path):
    from safetensors.torch import load_file

    from workbench.errors import InvalidInput

    runs = {}
    for name, decay in (("last", None), ("ema", 0.9)):
        out = tmp_path / name
        run_ipr(config(tiny_sd, eval_prompts, iterations=1, eval_seeds=0, steps=4, ema_decay=decay), out,
                log=lambda m: None)
        trained = json.loads((out / "iteration-0" / "adapter" / "train_config.json").read_text())
        assert trained["ema_decay"] == decay
        runs[name] = load_file(lora_weights_file(str(out / "iteration-0" / "adapter")))
    with pytest.raises(InvalidInput, match="EMA decay"):  # refused before any image is drawn
        run_ipr(config(tiny_sd, eval_prompts, ema_decay=1.5), tmp_path / "bad", log=lambda m: None)
    assert not (tmp_path / "bad" / "iteration-0").exists()
    # Same data, seed and steps: only the export differs, so the weights do.
    assert runs["ema"].keys() == runs["last"].keys()
    assert any(not (runs["ema"][key] == runs["last"][key]).all() for key in runs["ema"])


def test_samples_with_an_object_the_detector_is_unsure_of_are_not_trained_on():
    from PIL import Image

    from pipelines.ipr import Stages, annotate, relabel_counts

    def items():
        return [{"id": "a", "prompt": "a red circle and a blue square", "pil": Image.new("RGB", (32, 32))},
                {"id": "b", "prompt": "two red circles", "pil": Image.new("RGB", (32, 32))}]

    stages = Stages(None, iterations=1, evaluate=False)
    kept = annotate(IPRConfig(), items(), 0, ScriptedDetector(), stages)
    assert [s["keep"] for s in kept] == [True, True]  # default: every detection above the box threshold counts

    strict = annotate(IPRConfig(min_confidence=0.8), items(), 0, ScriptedDetector(), stages)
    assert [s["keep"] for s in strict] == [False, False]  # the square scores 0.6
    assert all("unsure of a square (score 0.60" in s["reasons"][-1] for s in strict)
    assert relabel_counts(strict) == {"samples": 2, "matched": 0, "relabeled": 0, "dropped": 0, "unsure": 2}
    assert strict[0]["relabeled"] == kept[0]["relabeled"]  # the relabel itself is unchanged

    class SureFromPoint8(ScriptedDetector):
        confident_score = 0.8

    by_detector = annotate(IPRConfig(), items(), 0, SureFromPoint8(), stages)  # the detector's own default
    assert [s["keep"] for s in by_detector] == [False, False]
    assert [s["keep"] for s in annotate(IPRConfig(min_confidence=0.0), items(), 0, SureFromPoint8(), stages)] == [True, True]


def test_the_relabel_stage_reports_its_last_image_so_a_paused_run_does_not_show_zero_done():
    from PIL import Image

    from pipelines.ipr import Stages, annotate

    reports = []
    stages = Stages(lambda fraction, message: reports.append((fraction, message)), iterations=1, evaluate=False)
    items = [{"id": str(i), "prompt": "two red circles", "pil": Image.new("RGB", (32, 32))} for i in range(3)]
    annotate(IPRConfig(), items, 0, ScriptedDetector(), stages)
    assert reports[-1][1] == "iteration 1/1: relabel: 3/3 images"
    assert reports[-1][0] == pytest.approx((0.2 + 0.05) / 0.8)  # sampling and relabelling of one iteration done


def test_keep_framing_writes_each_relabel_inside_its_prompts_framing():
    from PIL import Image

    from pipelines.ipr import Stages, annotate

    def items():
        return [{"id": "a", "prompt": "a rendering of two red circles on a light background",
                 "pil": Image.new("RGB", (32, 32))}]

    stages = Stages(None, iterations=1, evaluate=False)
    bare = annotate(IPRConfig(), items(), 0, ScriptedDetector(), stages)[0]
    framed = annotate(IPRConfig(keep_framing=True), items(), 0, ScriptedDetector(), stages)[0]
    assert bare["relabeled"] == "a red circle to the left of a blue square"
    assert framed["relabeled"] == "a rendering of a red circle to the left of a blue square on a light background"
    assert framed["reasons"] == bare["reasons"]


def test_a_run_saved_before_the_newer_settings_continues_with_what_it_had(tmp_path):
    from dataclasses import asdict

    from pipelines.ipr import _check_same_config, load_config

    saved = {"kind": "ipr", **asdict(IPRConfig())}
    for key in ("min_confidence", "continue_adapter", "prompt_kinds", "prior_images", "prior_data", "clause_share"):
        saved.pop(key)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    config = load_config(tmp_path)
    assert (config.min_confidence, config.continue_adapter, config.prompt_kinds, config.prior_images,
            config.prior_data, config.clause_share) == (0.0, True, None, 0, None, 0.5)
    _check_same_config(config, tmp_path)  # no "other settings" refusal
    assert IPRConfig().prompt_kinds == ["position"] and IPRConfig().min_confidence is None  # new runs
    assert IPRConfig().continue_adapter is False


def test_prior_preservation_mixes_pretraining_pairs_into_every_iteration(tiny_sd, eval_prompts, tmp_path):
    from PIL import Image

    prior = tmp_path / "prior"
    (prior / "images").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (32, 32), (80 * i, 0, 0)).save(prior / "images" / f"{i}.png")
    (prior / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"images/{i}.png", "text": "a circle"}) + "\n"
                                                  for i in range(3)))
    out = tmp_path / "run"
    run_ipr(config(tiny_sd, eval_prompts, eval_seeds=0, prior_data=str(prior)), out, log=lambda m: None)
    for k in range(2):
        pairs = len(read_jsonl(out / f"iteration-{k}" / "train" / "metadata.jsonl"))
        trained = json.loads((out / f"iteration-{k}" / "adapter" / "train_config.json").read_text())
        assert trained["data"][1:] == [str(prior)] and trained["rows"] == pairs + 3


def test_mirrored_training_never_flips_a_prior_caption_that_says_a_side(tiny_sd, eval_prompts, tmp_path):
    from PIL import Image

    prior = tmp_path / "prior"
    (prior / "images").mkdir(parents=True)
    texts = ["a circle left of a square", "a red circle", "a square to the right of a circle"]
    for i in range(3):
        Image.new("RGB", (32, 32), (80 * i, 0, 0)).save(prior / "images" / f"{i}.png")
    (prior / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"images/{i}.png", "text": text}) + "\n"
                                                  for i, text in enumerate(texts)))
    out = tmp_path / "run"
    run_ipr(config(tiny_sd, eval_prompts, iterations=1, eval_seeds=0, mirror=True, prior_data=str(prior)), out,
            log=lambda m: None)
    trained = json.loads((out / "iteration-0" / "adapter" / "train_config.json").read_text())
    copy = read_jsonl(Path(trained["data"][1]) / "metadata.jsonl")
    assert [row["flip_text"] for row in copy] == [None, "a red circle", None]
    assert all(Path(row["file_name"]).is_file() for row in copy)
    assert read_jsonl(prior / "metadata.jsonl")[0].get("flip_text", "unset") == "unset"  # the user's folder untouched


def test_prior_preservation_renders_the_shapes_worlds_pretraining_data_or_asks_for_a_folder(tmp_path):
    from pipelines.ipr import prior_folder
    from workbench.errors import InvalidInput

    folder = prior_folder(IPRConfig(prior_images=5), tmp_path)
    rows = read_jsonl(folder / "metadata.jsonl")
    assert len(rows) == 5 and all((folder / r["file_name"]).is_file() and r["text"] for r in rows)
    assert prior_folder(IPRConfig(), tmp_path / "off") is None
    with pytest.raises(InvalidInput, match="needs --prior-data"):
        IPRConfig(model="sd15", prior_images=100).validate()


def test_a_clause_share_outside_zero_to_one_is_refused_before_any_work(tmp_path, capsys):
    from pipelines.ipr import main

    assert main(["--clause-share", "1.5", "--out", str(tmp_path / "run")]) == 2
    assert "clause share must be in [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_timestep_range_reaches_every_iterations_trainer_and_a_bad_one_is_refused(tiny_sd, eval_prompts, tmp_path,
                                                                                    capsys):
    from pipelines.ipr import main

    out = tmp_path / "run"
    run_ipr(config(tiny_sd, eval_prompts, eval_seeds=0, timestep_range=[0.5, 1.0]), out, log=lambda m: None)
    for k in range(2):
        trained = json.loads((out / f"iteration-{k}" / "adapter" / "train_config.json").read_text())
        assert trained["timestep_range"] == [0.5, 1.0]
    assert main(["--timestep-range", "0.8", "0.2", "--out", str(tmp_path / "bad")]) == 2
    assert "timestep range must be two shares" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_a_text_encoder_only_run_leaves_the_unet_as_the_base_models(tiny_sd, eval_prompts, tmp_path, capsys):
    from safetensors.torch import load_file

    from pipelines.ipr import main

    out = tmp_path / "run"
    run_ipr(config(tiny_sd, eval_prompts, eval_seeds=0, train_unet=False), out, log=lambda m: None)
    for k in range(2):
        keys = load_file(out / f"iteration-{k}" / "adapter" / "pytorch_lora_weights.safetensors").keys()
        assert keys and all(key.startswith("text_encoder.") for key in keys)
    assert main(["--no-train-unet", "--no-train-text-encoder", "--out", str(tmp_path / "bad")]) == 2
    assert "needs a LoRA on the text encoder" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_a_run_folder_refuses_other_settings(tiny_sd, eval_prompts, tmp_path):
    out = tmp_path / "run"
    run_ipr(config(tiny_sd, eval_prompts, iterations=1, eval_seeds=0), out, log=lambda m: None)
    from workbench.errors import InvalidInput

    with pytest.raises(InvalidInput, match="other settings"):
        run_ipr(config(tiny_sd, eval_prompts, iterations=1, eval_seeds=0, lr=1.0), out, log=lambda m: None)


def test_cli_explains_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert ipr_main(["--out", str(tmp_path / "nothing"), "--resume"]) == 2
    assert "is not an IPR run" in capsys.readouterr().err


def test_a_resumed_run_keeps_pausing_for_review_unless_told_otherwise(tiny_sd, eval_prompts, tmp_path, monkeypatch,
                                                                      capsys):
    import pipelines.ipr as ipr

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"kind": "ipr", **config(tiny_sd, eval_prompts, review=True).__dict__}))
    seen = []
    monkeypatch.setattr(ipr, "run_ipr", lambda cfg, *a, **k: seen.append(cfg.review) or {"status": "awaiting_review",
                                                                                            "iteration": 1})
    assert ipr_main(["--out", str(out), "--resume"]) == 0  # what the pause message tells the user to run
    assert ipr_main(["--out", str(out), "--resume", "--no-review"]) == 0
    assert seen == [True, False]
    assert "--resume --reviewed" in capsys.readouterr().out

    with pytest.raises(SystemExit) as stop:  # the run keeps its saved settings: a new value would be ignored
        ipr_main(["--out", str(out), "--resume", "--iterations", "3"])
    assert stop.value.code == 2 and "--iterations would be ignored" in capsys.readouterr().err
    assert seen == [True, False]

    with pytest.raises(SystemExit) as stop:  # without --resume it would silently start a fresh run
        ipr_main(["--out", str(tmp_path / "fresh"), "--reviewed"])
    assert stop.value.code == 2 and "use it with --resume" in capsys.readouterr().err
    assert not (tmp_path / "fresh").exists()


@pytest.mark.parametrize("args, words", [
    (["--lr", "-1"], "lr must be a positive number"),
    (["--rank", "0"], "LoRA rank must be at least 1"),
    (["--model", "/no/such/model"], "No model folder at"),
    (["--eval-prompts", "/no/such/prompts.jsonl"], "does not exist"),
])
def test_settings_the_engine_or_the_evaluation_would_refuse_are_refused_before_sampling(tmp_path, capsys, args, words):
    assert ipr_main([*args, "--out", str(tmp_path / "run")]) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_training_images_are_drawn_at_the_sampling_guidance_and_a_bad_one_is_refused(tiny_sd, eval_prompts, tmp_path,
                                                                                     capsys):
    from pipelines.ipr import main
    from workbench.generation import read_png_metadata

    out = tmp_path / "run"
    run_ipr(config(tiny_sd, eval_prompts, eval_seeds=0, iterations=1, guidance=2.5), out, log=lambda m: None)
    images = sorted((out / "iteration-0" / "images").glob("*.png"))
    assert images and {read_png_metadata(path)["guidance"] for path in images} == {2.5}
    assert main(["--sample-guidance", "0", "--out", str(tmp_path / "bad")]) == 2
    assert "sampling guidance must be in (0, 50]" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
