"""Results history: rows written by one process are read by the next; evaluations record themselves."""

import json
import os
import subprocess
import sys

import pandas as pd

from workbench import history
from workbench.benchmark import BenchmarkConfig
from workbench.config import PROJECT_ROOT, get_settings
from workbench.generation import LoraSpec

SUMMARY = {"per_tag": {"counting": {"correct": 1, "total": 4, "accuracy": 0.25},
                       "colors": {"correct": 3, "total": 4, "accuracy": 0.75}},
           "overall": 0.5, "images": 8}


def test_a_row_written_by_another_process_is_in_the_history(data_dir):
    # A separate interpreter records, as the CLI or a crashed app would; this one reads afterwards.
    script = ("from workbench import history; history.record(model='shapes', adapters=[{'path': '/x/ipr-shapes',"
              " 'weight': 0.8}], prompt_set='shapesbench.jsonl', seeds=4, per_tag={'counting': 0.5},"
              " overall=0.5, source='compare', source_id='run-1', folder='/tmp/run-1')")
    subprocess.run([sys.executable, "-c", script], check=True, cwd=PROJECT_ROOT,
                   env={**os.environ, "WORKBENCH_DATA": str(data_dir)})
    assert (data_dir / "workbench.db").is_file()

    frame = history.load()
    assert len(frame) == 1
    row = frame.iloc[0]
    assert (row.model, row.label, row.source, row.source_id) == ("shapes", "ipr-shapes:0.8", "compare", "run-1")
    assert row.per_tag == {"counting": 0.5}
    assert json.loads(row.adapters) == [{"path": "/x/ipr-shapes", "weight": 0.8}]
    expected = subprocess.run(["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True,
                              text=True).stdout.strip() or "unknown"
    assert row.git_revision == expected


def test_filters_and_csv_with_one_column_per_tag(tmp_path):
    history.record(model="shapes", adapters=[], prompt_set="p", seeds=2, per_tag=SUMMARY["per_tag"],
                   overall=0.5, source="eval", created=100.0)
    history.record(model="sd15", adapters=[], prompt_set="p", seeds=2, per_tag={"colors": 1.0}, overall=1.0,
                   source="eval", created=200.0)
    assert list(history.load(model="sd15")["overall"]) == [1.0]
    assert list(history.load()["model"]) == ["shapes", "sd15"]  # oldest first

    csv = pd.read_csv(history.to_csv(tmp_path / "out" / "results.csv"))
    assert list(csv["counting"].fillna(-1)) == [0.25, -1]
    assert list(csv["colors"]) == [0.75, 1.0]
    assert "per_tag" not in csv.columns


def test_evaluations_are_recorded_with_their_folder_and_ipr_iteration(tmp_path):
    config = BenchmarkConfig(model="shapes", loras=[LoraSpec("/runs/r1/iteration-1/adapter", 1.0)], seeds=4)
    run = get_settings().runs_dir / "r1"
    (run / "iteration-1" / "eval").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"kind": "ipr"}))
    history.record_evaluation(config, SUMMARY, run / "iteration-1" / "eval")
    history.record_evaluation(BenchmarkConfig(model="shapes"), SUMMARY, run / "eval-base")
    history.record_evaluation(BenchmarkConfig(model="shapes"), SUMMARY, tmp_path / "my-eval")

    frame = history.load()
    assert list(frame["source"]) == ["ipr", "ipr", "eval"]
    assert list(frame["label"]) == ["iteration 2", "base", "base"]
    assert list(frame["iteration"].fillna(-1)) == [2, 0, -1]
    assert list(frame["source_id"]) == ["r1", "r1", "my-eval"]
    assert frame["folder"].iloc[2] == str((tmp_path / "my-eval").resolve())
    assert frame["prompt_set"].iloc[0] == "shapesbench.jsonl"


def test_a_broken_database_does_not_fail_the_evaluation(data_dir):
    data_dir.mkdir(parents=True)
    (data_dir / "workbench.db").write_text("this is not a database")
    assert history.record_evaluation(BenchmarkConfig(), SUMMARY, data_dir / "e") is None


def test_results_tab_shows_newest_first_plots_every_tag_and_exports_what_is_shown(data_dir):
    from workbench.ui import results

    assert results.export_csv("all", "all")[1] == "Nothing to export: no results match the filters."
    history.record(model="shapes", adapters=[], prompt_set="p", seeds=2, per_tag=SUMMARY["per_tag"], overall=0.5,
                   source="eval", created=100.0)
    history.record(model="shapes", adapters=[{"path": "/a/ipr-shapes", "weight": 1.0}], prompt_set="p", seeds=2,
                   per_tag={"counting": 0.5, "colors": 1.0}, overall=0.75, source="compare", created=200.0)
    history.record(model="sd15", adapters=[], prompt_set="p", seeds=2, per_tag={"colors": 1.0}, overall=1.0,
                   source="eval", created=300.0)

    table, plot, models = results.show("shapes", "all")
    assert list(table["variant"]) == ["ipr-shapes:1", "base"]
    assert list(table["counting %"]) == [50.0, 25.0] and list(table["overall %"]) == [75.0, 50.0]
    assert models["choices"] == ["all", "sd15", "shapes"]
    assert sorted(plot[plot["entry"] == f"{table['entry'][1]:04d} base"]["tag"]) == ["colors", "counting", "overall"]

    update, message = results.export_csv("shapes", "compare")
    path = update["value"]
    assert path.startswith(str(data_dir / "exports")) and "1 row(s)" in message
    assert list(pd.read_csv(path)["label"]) == ["ipr-shapes:1"]
