"""The RECAP run end to end on the tiny random model (pipelines.recap.run_recap): shapes data, recaption,
alt-text and RECAP fine-tunes with the same settings, evaluation, summary, resume and stop, the CLI."""

import json

import pytest

from pipelines.recap import RecapConfig, format_table, main as recap_main, run_recap
from workbench.errors import InvalidInput, JobCancelled, ModelNotAvailable
from workbench.generation import lora_weights_file
from workbench.store import read_jsonl

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def eval_prompts(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps({"tag": "single_object", "include": [{"class": "circle", "count": 1}],
                                "prompt": "a circle"}) + "\n" +
                    json.dumps({"tag": "colors", "include": [{"class": "square", "count": 1, "color": "red"}],
                                "prompt": "a red square"}) + "\n")
    return str(path)


def config(tiny_sd, eval_prompts, **overrides) -> RecapConfig:
    settings = dict(model=str(tiny_sd), images=6, steps=2, batch_size=2, detector="shapes", sample_steps=2,
                    eval_prompts=eval_prompts, eval_seeds=1)
    return RecapConfig(**{**settings, **overrides})


def test_a_run_compares_alt_text_and_recap_fine_tunes_and_continues_without_redoing_stages(tiny_sd, eval_prompts,
                                                                                             tmp_path):
    out = tmp_path / "run"
    result = run_recap(config(tiny_sd, eval_prompts), out, log=lambda m: None)
    assert result["status"] == "done"
    assert json.loads((out / "config.json").read_text())["kind"] == "recap"

    # Web data rendered at the model's resolution (the tiny model: 32 px), then recaptioned.
    from PIL import Image

    assert Image.open(out / "data" / "images" / "00000.png").size == (32, 32)
    rows = read_jsonl(out / "recaptioned" / "metadata.jsonl")
    assert len(rows) == 6 and all({"alt_text", "short_caption", "long_caption"} <= set(r) for r in rows)

    # Two fine-tunes with the same images, settings and seed: only the captions differ.
    alt_rows = read_jsonl(out / "alt-text" / "train" / "metadata.jsonl")
    recap_rows = read_jsonl(out / "recap" / "train" / "metadata.jsonl")
    assert [r["file_name"] for r in alt_rows] == [r["file_name"] for r in recap_rows]
    assert [r["text"] for r in recap_rows] == [r[key] for r in rows for key in ("short_caption", "long_caption")]
    settings = [json.loads((out / v / "adapter" / "train_config.json").read_text()) for v in ("alt-text", "recap")]
    for s in settings:
        assert s["prompt_dropout"] == 0.14  # the paper's share of empty captions, passed to the engine
    same = ("steps", "batch_size", "lr", "seed", "rank", "alpha", "lora", "prompt_dropout")
    assert {k: settings[0][k] for k in same} == {k: settings[1][k] for k in same}
    for variant in ("alt_text", "recap"):
        assert lora_weights_file(result["adapters"][variant]) is not None  # diffusers-format LoRA

    # summary.json: per-tag table of base, alt-text and RECAP, and RECAP minus alt text.
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["variants"]) == {"base", "alt_text", "recap"}
    assert summary["tags"] == ["single_object", "colors"]
    assert set(summary["recap_minus_alt_text"]["per_tag"]) == {"single_object", "colors"}
    assert summary["captions"]["images"] == 6
    table = format_table(summary)
    assert "RECAP-alt" in table and "colors" in table and "overall" in table

    # Continue: every stage's output exists, so nothing is redone.
    watched = [out / "data" / "metadata.jsonl", out / "recaptioned" / "metadata.jsonl",
               out / "alt-text" / "adapter" / "pytorch_lora_weights.safetensors",
               out / "recap" / "adapter" / "pytorch_lora_weights.safetensors", out / "eval-base" / "scores.json",
               out / "recap" / "eval" / "scores.json"]
    before = [path.stat().st_mtime_ns for path in watched]
    progress = []
    run_recap(config(tiny_sd, eval_prompts), out, on_progress=lambda f, m: progress.append(f), log=lambda m: None)
    assert [path.stat().st_mtime_ns for path in watched] == before

    with pytest.raises(InvalidInput, match="other settings"):
        run_recap(config(tiny_sd, eval_prompts, lr=1.0), out, log=lambda m: None)


def test_a_run_stopped_in_training_continues_from_there(tiny_sd, eval_prompts, tmp_path):
    out = tmp_path / "run"
    cfg = config(tiny_sd, eval_prompts, eval_seeds=0)
    fractions = []

    def stop_in_recap_training():
        return (out / "recap" / "train").exists()

    with pytest.raises(JobCancelled):
        run_recap(cfg, out, on_progress=lambda f, m: fractions.append(f), should_stop=stop_in_recap_training,
                  log=lambda m: None)
    assert (out / "alt-text" / "adapter" / "done").exists() and not (out / "recap" / "adapter" / "done").exists()
    assert fractions == sorted(fractions) and 0 < fractions[-1] < 1
    alt_weights = (out / "alt-text" / "adapter" / "pytorch_lora_weights.safetensors").stat().st_mtime_ns

    result = run_recap(cfg, out, log=lambda m: None)
    assert (out / "recap" / "adapter" / "done").exists()
    assert (out / "alt-text" / "adapter" / "pytorch_lora_weights.safetensors").stat().st_mtime_ns == alt_weights
    assert result["summary"]["variants"] == {}  # eval_seeds 0 skips evaluation
    assert not (out / "eval-base").exists()


def test_a_run_on_the_users_imagefolder_recaptions_it_into_the_run(tiny_sd, eval_prompts, tmp_path):
    from pipelines.recap import make_shapes_dataset

    data = tmp_path / "web"
    make_shapes_dataset(data, 4, seed=1)
    source = (data / "metadata.jsonl").read_bytes()
    out = tmp_path / "run"
    run_recap(config(tiny_sd, eval_prompts, data=str(data), captioner="shapes", eval_seeds=0), out, log=lambda m: None)
    assert not (out / "data").exists()
    assert len(read_jsonl(out / "recaptioned" / "metadata.jsonl")) == 4
    assert (data / "metadata.jsonl").read_bytes() == source


def test_a_run_saved_before_inline_pairs_existed_continues_as_it_was_captioned(tiny_sd, eval_prompts, tmp_path):
    from pipelines.recap import load_config

    out = tmp_path / "run"
    run_recap(config(tiny_sd, eval_prompts, inline_pairs=False, eval_seeds=0), out, log=lambda m: None)
    saved = json.loads((out / "config.json").read_text())
    del saved["inline_pairs"], saved["target_modules"]  # as older versions wrote it
    (out / "config.json").write_text(json.dumps(saved))
    weights = out / "recap" / "adapter" / "pytorch_lora_weights.safetensors"
    before = weights.stat().st_mtime_ns

    resumed = load_config(out)
    assert resumed.inline_pairs is False and resumed.target_modules == ["to_q", "to_k", "to_v", "to_out.0"]
    # The recaptioner is built as before the option existed, so its folder's settings still match.
    assert resumed.captioner_options() == {"brief_short": True}
    assert RecapConfig(inline_pairs=True).captioner_options() == {"brief_short": True, "inline_pairs": True}
    run_recap(resumed, out, log=lambda m: None)
    assert weights.stat().st_mtime_ns == before
    with pytest.raises(InvalidInput, match="inline_pairs"):
        run_recap(config(tiny_sd, eval_prompts, inline_pairs=True, eval_seeds=0), out, log=lambda m: None)


def test_both_fine_tunes_adapt_the_layers_asked_for(tiny_sd, eval_prompts, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "run"
    assert recap_main(["run", "--model", str(tiny_sd), "--images", "4", "--steps", "2", "--batch-size", "2",
                       "--eval-seeds", "0", "--target-modules", "transformer", "--out", str(out)]) == 0
    for folder in ("alt-text", "recap"):
        adapter = out / folder / "adapter"
        assert json.loads((adapter / "train_config.json").read_text())["target_modules"] == [
            "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
        with safe_open(str(adapter / "pytorch_lora_weights.safetensors"), "pt") as weights:
            layers = {key.split(".lora")[0].rsplit(".", 1)[-1] for key in weights.keys()}
        assert {"to_q", "proj_in", "2"} <= layers  # attention, the 1x1 projections and ff.net.2


def test_text_encoder_only_fine_tunes_leave_the_unet_as_the_base_models(tiny_sd, tmp_path, capsys):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    assert recap_main(["run", "--model", str(tiny_sd), "--images", "4", "--steps", "2", "--batch-size", "2",
                       "--eval-seeds", "0", "--train-text-encoder", "--no-train-unet", "--out", str(out)]) == 0
    for folder in ("alt-text", "recap"):
        keys = load_file(out / folder / "adapter" / "pytorch_lora_weights.safetensors").keys()
        assert keys and all(key.startswith("text_encoder.") for key in keys)
    assert recap_main(["run", "--model", str(tiny_sd), "--no-train-unet", "--out", str(tmp_path / "bad")]) == 2
    assert "needs a LoRA on the text encoder" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_bad_settings_are_refused_before_any_work(tmp_path):
    with pytest.raises(InvalidInput, match="caption choice"):
        run_recap(RecapConfig(captions="medium"), tmp_path / "run", log=lambda m: None)
    with pytest.raises(InvalidInput, match="prompt_dropout"):
        run_recap(RecapConfig(prompt_dropout=1.0), tmp_path / "run", log=lambda m: None)
    # The evaluation's detector is checked now, not after both fine-tunes.
    with pytest.raises(ModelNotAvailable, match="No 'nosuch' detector"):
        run_recap(RecapConfig(detector="nosuch"), tmp_path / "run", log=lambda m: None)
    RecapConfig(detector="nosuch", eval_seeds=0).validate()  # nothing is scored, so no detector is needed
    # The captioner is checked before any scene is rendered.
    with pytest.raises(InvalidInput, match="Unknown captioner 'nosuch'"):
        run_recap(RecapConfig(captioner="nosuch"), tmp_path / "run", log=lambda m: None)
    assert not (tmp_path / "run").exists()


def test_the_captioner_follows_the_datas_world():
    assert RecapConfig().captioner_name() == "shapes"  # rendered scenes
    assert RecapConfig(data="/some/shapes/data").captioner_name() == "shapes"  # data for the shapes model
    assert RecapConfig(model="sd15", data="/web/data").captioner_name() == "blip"
    assert RecapConfig(model="sd15", data="/web/data", captioner="blip2").captioner_name() == "blip2"


def test_cli(tmp_path, capsys):
    assert recap_main(["make-shapes-data", "--n", "3", "--out", str(tmp_path / "data")]) == 0
    assert "3 images" in capsys.readouterr().out
    assert recap_main(["recaption", "--data", str(tmp_path / "data"), "--captioner", "shapes",
                       "--out", str(tmp_path / "recap")]) == 0
    assert "3 images captioned" in capsys.readouterr().out
    # Without --captioner, data that make-shapes-data rendered is read by the shapes captioner (no BLIP needed).
    assert recap_main(["recaption", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "recap-default")]) == 0
    assert "captioner: shapes" in capsys.readouterr().out
    assert json.loads((tmp_path / "recap-default" / "recaption.json").read_text())["settings"]["captioner"] == "shapes"
    # Pairs in one phrase by default; --no-inline-pairs writes the clause form.
    settings = json.loads((tmp_path / "recap" / "recaption.json").read_text())["settings"]
    assert settings["captioner_options"] == {"brief_short": True, "inline_pairs": True}
    assert recap_main(["recaption", "--data", str(tmp_path / "data"), "--captioner", "shapes", "--no-inline-pairs",
                       "--out", str(tmp_path / "recap-clauses")]) == 0
    settings = json.loads((tmp_path / "recap-clauses" / "recaption.json").read_text())["settings"]
    assert settings["captioner_options"] == {"brief_short": True}
    assert recap_main(["recaption", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    assert "not found" in capsys.readouterr().err
    assert recap_main(["run", "--out", str(tmp_path / "nothing"), "--resume"]) == 2
    assert "is not a RECAP run" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a resumed run keeps its saved settings: a new value would be ignored
        recap_main(["run", "--out", str(tmp_path / "nothing"), "--resume", "--steps", "5"])
    assert "--steps would be ignored" in capsys.readouterr().err
    # A captioner that does not exist is named before the output folder is claimed.
    assert recap_main(["recaption", "--data", str(tmp_path / "data"), "--captioner", "bogus",
                       "--out", str(tmp_path / "recap-bogus")]) == 2
    assert not (tmp_path / "recap-bogus" / "recaption.json").exists()
    assert recap_main(["recaption", "--data", str(tmp_path / "data"), "--captioner", "shapes",
                       "--out", str(tmp_path / "recap-bogus")]) == 0
