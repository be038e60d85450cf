"""Command lines given a file where a folder goes, or a file of the wrong kind: one line, exit 2, and no work
done first (no image drawn, no VAE pass)."""

import json

import pytest
from PIL import Image

from pipelines.ipr import main as ipr_main
from pipelines.realign import main as refl_main
from pipelines.realign_fine import main as fine_main
from pipelines.recap import main as recap_main
from pipelines.selma import main as selma_main
from pipelines.trainer import main as trainer_main
from workbench.cli import main as workbench_main


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a folder")
    return path


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.startswith("error:"), err
    return err


@pytest.mark.parametrize("main, extra", [
    (ipr_main, []), (selma_main, []), (refl_main, []),
    (fine_main, ["--prompt", "a red circle"]), (recap_main, ["run"]),
])
def test_an_output_path_that_is_a_file_is_refused_before_any_work(main, extra, a_file, capsys):
    assert main([*extra, "--out", str(a_file)]) == 2
    assert "is a file; give a folder" in one_line_error(capsys)
    assert a_file.read_text() == "not a folder"


def imagefolder(folder, metadata: bytes):
    (folder / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "images" / "0.png")
    (folder / "metadata.jsonl").write_bytes(metadata)
    return folder


def test_the_trainer_refuses_a_file_as_out_a_png_as_metadata_and_a_png_as_lora(tmp_path, a_file, capsys):
    good = imagefolder(tmp_path / "good", (json.dumps({"file_name": "images/0.png", "text": "a circle"}) + "\n").encode())
    with pytest.raises(SystemExit) as stop:
        trainer_main(["--model", "shapes", "--data", str(good), "--out", str(a_file), "--steps", "1"])
    assert stop.value.code == 2 and "is a file; give a folder" in one_line_error(capsys)

    png = imagefolder(tmp_path / "png", (good / "images" / "0.png").read_bytes())  # metadata.jsonl is a PNG
    with pytest.raises(SystemExit) as stop:
        trainer_main(["--model", "shapes", "--data", str(png), "--out", str(tmp_path / "out"), "--steps", "1"])
    assert stop.value.code == 2 and "is not text" in one_line_error(capsys)

    fake_lora = tmp_path / "fake.safetensors"
    fake_lora.write_bytes((good / "images" / "0.png").read_bytes())
    with pytest.raises(SystemExit) as stop:
        trainer_main(["--model", "shapes", "--data", str(good), "--out", str(tmp_path / "out2"), "--steps", "1",
                      "--init-lora", str(fake_lora)])
    assert stop.value.code == 2 and "is not a readable LoRA" in one_line_error(capsys)


def test_report_and_diff_of_a_damaged_evaluation_are_one_line(tmp_path, capsys):
    damaged = tmp_path / "eval"
    damaged.mkdir()
    (damaged / "scores.json").write_text("{bad")
    (damaged / "verdicts.jsonl").write_bytes(b"\x89PNG\r\n")
    assert workbench_main(["report", str(damaged), "--out", str(tmp_path / "r.html")]) == 2
    assert "cannot read" in one_line_error(capsys)
    assert workbench_main(["diff", str(damaged), str(damaged)]) == 2
    assert "cannot read" in one_line_error(capsys)


def test_settings_other_commands_refuse_are_refused_by_the_fine_stage_and_the_report_too(tmp_path, capsys):
    assert fine_main(["--prompt", "a red circle", "--guidance", "-1", "--out", str(tmp_path / "f")]) == 2
    assert "Guidance must be between 0 and 50" in one_line_error(capsys)
    assert workbench_main(["report", str(tmp_path), "--per-tag", "0", "--out", str(tmp_path / "r.html")]) == 2
    assert "--per-tag" in one_line_error(capsys)


@pytest.mark.parametrize("main", [selma_main, refl_main])
def test_a_folder_holding_another_kind_of_run_is_named_as_such(main, tmp_path, capsys):
    run = tmp_path / "ipr-run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"kind": "ipr", "iterations": 2}))
    (run / "metrics.jsonl").write_text("")  # started: not a folder a rerun may take over
    assert main(["--out", str(run)]) == 2
    assert "holds another kind of run (ipr)" in one_line_error(capsys)


def test_an_interrupted_generate_lists_the_images_it_saved(tmp_path, capsys, monkeypatch):
    from workbench import cli

    def saves_one_then_stops(request, out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(out_dir / "first.png")
        raise KeyboardInterrupt

    monkeypatch.setattr("workbench.generation.generate", saves_one_then_stops)
    assert cli.main(["generate", "--prompt", "a circle", "--seed", "1", "--seed", "2", "--out", str(tmp_path)]) == 130
    out, err = capsys.readouterr()
    assert out.strip() == str(tmp_path / "first.png") and "1 image(s) saved before the stop" in err


def test_eval_refuses_a_folder_holding_a_run_or_an_evaluation_with_other_settings(tmp_path, capsys):
    from workbench.benchmark import SHAPESBENCH, BenchmarkConfig

    earlier = tmp_path / "eval"
    earlier.mkdir()
    settings = BenchmarkConfig(prompts=str(SHAPESBENCH), seeds=2).to_dict()
    (earlier / "scores.json").write_text(json.dumps({"config": {**settings, "seconds": 1.0}}))
    assert workbench_main(["eval", "--seeds", "1", "--first-seed", "5", "--out", str(earlier)]) == 2
    assert "holds an evaluation with other settings (first_seed, seeds)" in one_line_error(capsys)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"kind": "ipr"}))
    assert workbench_main(["eval", "--out", str(run)]) == 2
    assert "holds a run" in one_line_error(capsys)


def test_ipr_checks_its_prior_data_before_sampling(tmp_path, capsys):
    assert ipr_main(["--prior-data", str(tmp_path / "none"), "--out", str(tmp_path / "run")]) == 2
    assert "Prior-preservation data folder not found" in one_line_error(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, words", [
    (["--steps", "0"], "--steps must be at least 1"),
    (["--minutes", "0"], "--minutes above 0"),
])
def test_the_shapes_model_trainer_refuses_settings_that_would_train_nothing(tmp_path, capsys, args, words):
    from pipelines.train_shapes import main as train_shapes_main

    with pytest.raises(SystemExit) as stop:
        train_shapes_main([*args, "--out", str(tmp_path / "m"), "--work-dir", str(tmp_path / "w")])
    assert stop.value.code == 2 and words in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("args, words", [
    (["--steps", "0"], "--steps must be at least 1"),
    (["--negatives", "-1"], "--negatives must be at least 0"),
    (["--lr", "-1"], "--lr must be positive"),
])
def test_the_captioner_trainer_refuses_settings_that_would_train_nothing(tmp_path, capsys, args, words):
    from pipelines.train_shapes_captioner import main as captioner_main

    with pytest.raises(SystemExit) as stop:
        captioner_main([*args, "--out", str(tmp_path / "c")])
    assert stop.value.code == 2 and words in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_the_fine_stage_refuses_a_folder_holding_a_run_or_another_prompt(tmp_path, capsys):
    done = tmp_path / "fine"
    done.mkdir()
    (done / "result.json").write_text(json.dumps({"prompt": "a red circle", "seed": 0}))
    assert fine_main(["--prompt", "a blue square", "--out", str(done)]) == 2
    assert "another prompt or seed" in one_line_error(capsys)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"kind": "ipr"}))
    assert fine_main(["--prompt", "a blue square", "--out", str(run)]) == 2
    assert "holds a run" in one_line_error(capsys)
