import json

import numpy as np
import pandas as pd
from PIL import Image

from workbench.cli import main as cli_main
from workbench.evaluation import load_prompt_file, score_detections
from workbench.perception.shapes import ShapesDetector


def write_prompts(path, count_per_tag=1):
    lines = []
    seen = {}
    for line in open("assets/prompts/shapesbench.jsonl"):
        tag = json.loads(line)["tag"]
        if seen.get(tag, 0) < count_per_tag:
            seen[tag] = seen.get(tag, 0) + 1
            lines.append(line)
    path.write_text("".join(lines))
    return path


def test_eval_writes_images_verdicts_and_scores_that_agree(tiny_sd, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p.jsonl")
    out = tmp_path / "eval"
    code = cli_main(["eval", "--model", str(tiny_sd), "--detector", "shapes", "--prompts", str(prompts),
                     "--seeds", "2", "--steps", "2", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    records = load_prompt_file(prompts)
    verdicts = pd.read_csv(out / "verdicts.csv")
    assert len(verdicts) == len(records) * 2
    scores = json.loads((out / "scores.json").read_text())
    assert set(scores["per_tag"]) == {r["tag"] for r in records}
    assert "overall" in printed and "color_attr" in printed
    # Every verdict is what the scorer says about the saved image (GenEval layout on disk).
    detector = ShapesDetector()
    for row in verdicts.itertuples():
        record = json.loads((out / "images" / f"{row.index:05d}" / "metadata.jsonl").read_text())
        assert record["prompt"] == row.prompt
        image = Image.open(out / row.path).convert("RGB")
        assert score_detections(record, detector.detect(image)).correct == row.correct


def test_eval_from_a_later_first_seed_draws_only_those_seeds_and_the_same_images(tiny_sd, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(open("assets/prompts/shapesbench.jsonl").readline())
    common = ["eval", "--model", str(tiny_sd), "--detector", "shapes", "--prompts", str(prompts), "--steps", "2"]
    assert cli_main([*common, "--seeds", "3", "--out", str(tmp_path / "all")]) == 0
    assert cli_main([*common, "--seeds", "1", "--first-seed", "2", "--out", str(tmp_path / "held-out")]) == 0
    verdicts = pd.read_csv(tmp_path / "held-out" / "verdicts.csv")
    assert verdicts["seed"].tolist() == [2]

    def pixels(path):
        return np.asarray(Image.open(path), dtype=np.int16)

    held_out = pixels(tmp_path / "held-out" / verdicts.path[0])
    # The same seed draws the same image (up to one 8-bit step: batches of 3 and 1 round differently).
    assert np.abs(held_out - pixels(tmp_path / "all" / "images/00000/0002.png")).max() <= 1
    assert np.abs(held_out - pixels(tmp_path / "all" / "images/00000/0000.png")).mean() > 5
    capsys.readouterr()
    assert cli_main([*common, "--first-seed", "-1", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "first seed" in err and "Traceback" not in err


def test_eval_rejects_a_malformed_prompt_file_with_its_line_number(tiny_sd, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"tag": "colors", "include": [{"class": "circle", "count": 1}], "prompt": "a circle"}\n'
                   "not json\n")
    code = cli_main(["eval", "--model", str(tiny_sd), "--detector", "shapes", "--prompts", str(bad),
                     "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "line 2" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_an_output_path_taken_by_a_file_is_refused_before_any_image_is_drawn(tiny_sd, tmp_path, capsys, monkeypatch):
    import workbench.generation

    drawn = []
    monkeypatch.setattr(workbench.generation, "load_pipeline", lambda *a: drawn.append(1))
    taken = tmp_path / "taken"
    taken.write_text("a file")
    for command in (["eval", "--detector", "shapes"], ["generate", "--prompt", "a red circle"]):
        assert cli_main([*command, "--model", str(tiny_sd), "--out", str(taken)]) == 2
        err = capsys.readouterr().err
        assert "is a file; give a folder" in err and "Traceback" not in err
    assert not drawn and taken.read_text() == "a file"


def test_eval_of_a_real_model_without_its_detector_says_so(tiny_sd, tmp_path, capsys):
    code = cli_main(["eval", "--model", str(tiny_sd), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "detector" in err and "--detector shapes" in err


def test_eval_runs_as_a_background_job_with_per_tag_outputs(tiny_sd, tmp_path):
    from workbench.job_kinds import register_all
    from workbench.jobs import JobRunner, JobStatus

    prompts = write_prompts(tmp_path / "p.jsonl")
    runner = JobRunner(tmp_path / "db.sqlite", tmp_path / "runs")
    register_all(runner)
    try:
        job_id = runner.submit("eval", {"model": str(tiny_sd), "detector": "shapes", "prompts": str(prompts),
                                        "seeds": 1, "first_seed": 3, "steps": 2, "loras": []})
        job = runner.wait(job_id, timeout=120)
        assert job.status == JobStatus.DONE, job.error
        assert set(job.outputs["per_tag"]) == {r["tag"] for r in load_prompt_file(prompts)}
        assert (tmp_path / "runs" / job_id / "scores.json").is_file()
        # The UI's "First seed" reaches the job: every image is seed 3.
        assert set(pd.read_csv(tmp_path / "runs" / job_id / "verdicts.csv")["seed"]) == {3}
    finally:
        runner.shutdown()


def test_a_missing_model_and_its_missing_detector_are_named_together(tmp_path, capsys):
    code = cli_main(["eval", "--model", "sd15", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "hf download stable-diffusion-v1-5/stable-diffusion-v1-5" in err and "GroundingDINO" in err
    assert not (tmp_path / "o").exists()
