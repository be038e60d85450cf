"""HTML reports: self-contained (images inlined), the grid and tables, escaped text, every folder kind."""

import base64
import html
import io
import json
import re

import pytest
from PIL import Image

from workbench.benchmark import DETECTORS, BenchmarkConfig, run_benchmark
from workbench.cli import main as cli_main
from workbench.compare import CompareConfig, Variant, run_compare
from workbench.config import get_settings
from workbench.generation import LoraSpec
from workbench.report import build_report

from test_compare import TWO_SQUARES, ScriptedDetector

LABEL = "aligned <img src=x onerror=alert(1)>"
EVIL = {"tag": "single_object", "prompt": "a circle <script>alert('x')</script>",
        "include": [{"class": "circle", "count": 1}]}


@pytest.fixture(autouse=True)
def scripted_detector(monkeypatch):
    monkeypatch.setitem(DETECTORS, "scripted", ScriptedDetector)


def inlined_images(page: str) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(data)))
            for data in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_report_of_a_comparison_inlines_every_image_and_escapes_prompts(tiny_sd, tiny_lora, capsys):
    run = get_settings().runs_dir / "cmp-1"
    config = CompareConfig(model=str(tiny_sd), prompts=[EVIL, TWO_SQUARES], seeds=1, steps=2, detector="scripted",
                           variants=[Variant("base"), Variant(LABEL, [LoraSpec(str(tiny_lora), 1.0)])])
    run_compare(config, run)
    out = run.parent.parent / "shared" / "report.html"

    assert cli_main(["report", "cmp-1", "--out", str(out)]) == 0  # a run name under runs/
    assert "wrote" in capsys.readouterr().out
    page = out.read_text()

    # Self-contained: 2 prompts x 1 seed x 2 variants, all inlined, nothing fetched from elsewhere.
    images = inlined_images(page)
    assert len(images) == 4 and all(image.size == (32, 32) for image in images)
    assert not re.search(r'(src|href)="(?!data:)', page)
    # Text from the run is escaped: the prompt's script and the label's tag are shown, not run.
    assert "<script>" not in page and "<img src=x" not in page
    assert html.escape(EVIL["prompt"]) in page and html.escape(LABEL) in page
    # Verdicts under the images and the per-tag table, one column per variant.
    assert page.count('"wb-ok">✓</figcaption>') == 2 and page.count('"wb-fail">✗ counts</figcaption>') == 2
    table = page[page.index("Accuracy (%) per tag"):page.index("<h2>Difference")]
    assert "single_object" in table and "counting" in table and "100.0" in table and html.escape(LABEL) in table
    # How sure the difference is: the adapter draws what the base draws here, so nothing, for sure.
    differences = page[page.index("<h2>Difference"):page.index("<h2>Images")]
    assert html.escape(LABEL) in differences and "+0.0 [+0.0, +0.0] p=1" in differences


def test_report_of_an_evaluation_folder_given_by_path(tiny_sd, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps(TWO_SQUARES) + "\n")
    run_benchmark(BenchmarkConfig(model=str(tiny_sd), prompts=str(prompts), seeds=2, steps=2, detector="scripted"),
                  tmp_path / "eval")
    page = build_report(tmp_path / "eval")
    assert len(inlined_images(page)) == 2
    assert page.count(">✗ counts</figcaption>") == 2 and "two squares" in page


def test_report_of_an_ipr_run_has_the_iterations_table_and_a_column_per_evaluation(tmp_path):
    run = tmp_path / "ipr-run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"kind": "ipr", "model": "shapes", "iterations": 1,
                                                 "eval_prompts": "x/shapesbench.jsonl"}))
    for folder, correct in ((run / "eval-base", False), (run / "iteration-0" / "eval", True)):
        (folder / "images" / "00000").mkdir(parents=True)
        Image.new("RGB", (64, 64), "red").save(folder / "images" / "00000" / "0000.png")
        (folder / "scores.json").write_text(json.dumps({
            "per_tag": {"counting": {"correct": int(correct), "total": 1, "accuracy": float(correct)}},
            "overall": float(correct), "config": {"loras": []}}))
        (folder / "verdicts.jsonl").write_text(json.dumps({
            "index": 0, "tag": "counting", "prompt": "two squares", "seed": 0, "path": "images/00000/0000.png",
            "correct": correct, "reasons": "" if correct else "expected square>=2, found 1",
            "ok_objects": True, "ok_counts": correct, "ok_colors": None, "ok_position": None}) + "\n")
    (run / "metrics.jsonl").write_text(json.dumps({"iteration": 1, "label": "iteration 1", "samples": 16,
                                                   "matched": 5, "relabeled": 9, "dropped": 2, "training_pairs": 14,
                                                   "overall": 1.0, "per_tag": {"counting": 1.0}}) + "\n")
    page = build_report(run)
    assert "IPR iterations" in page and "<td>14</td>" in page
    header = page[page.index('<table class="wb-grid">'):page.index("</thead>", page.index('<table class="wb-grid">'))]
    assert "<th>base</th>" in header and "<th>iteration 1</th>" in header
    assert page.count(">✗ counts</figcaption>") == 1 and "expected square&gt;=2, found 1" in page


def test_an_unknown_id_is_a_clear_error(tmp_path, capsys):
    assert cli_main(["report", "no-such-run", "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert "No run or evaluation 'no-such-run'" in err and "Traceback" not in err
    (tmp_path / "empty").mkdir()
    assert cli_main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r.html")]) == 2
    assert "is not a comparison" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()
    # A folder where the HTML file should go, or a negative size, is named, not a traceback.
    evaluation = tmp_path / "eval"
    evaluation.mkdir()
    assert cli_main(["report", str(evaluation), "--out", str(tmp_path / "empty")]) == 2
    assert "is a folder; give the name of the HTML file" in capsys.readouterr().err
    assert cli_main(["report", str(evaluation), "--out", str(tmp_path / "r.html"), "--max-side", "-5"]) == 2
    assert "max_side must be 0" in capsys.readouterr().err
