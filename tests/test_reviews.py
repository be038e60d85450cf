"""Review verdicts on IPR relabels: stored at once, survive restarts, shape the training export."""

import json
from pathlib import Path

import pytest
from PIL import Image

from workbench.errors import InvalidInput
from workbench.reviews import (
    ReviewStore,
    export_imagefolder,
    list_review_runs,
    load_samples,
    training_rows,
    with_reviews,
)
from workbench.shapes.render import render
from workbench.shapes.scene import Scene, ShapeObject

# (id, iteration, image file, original prompt, what the image shows, relabeled, keep, weight)
FAKE_SAMPLES = [
    ("i0-p00000-s0000", 0, "p00000_s0000.png", "a red circle", [("circle", "red", 20, 32)],
     "a red circle", True, 1.0),
    ("i0-p00001-s0000", 0, "p00001_s0000.png", "a blue square", [("square", "green", 32, 32)],
     "a green square", True, 0.5),
    ("i0-p00002-s0000", 0, "p00002_s0000.png", "two yellow triangles", [("triangle", "yellow", 20, 30)],
     "a yellow triangle", True, 0.5),
    # Same image file name as the first sample, in the next iteration: exports must not collide.
    ("i1-p00000-s0000", 1, "p00000_s0000.png", "a red circle", [("square", "purple", 40, 20)],
     "a purple square", False, 0.0),
]


def make_fake_run(runs_dir: Path, run_id: str = "ipr-test") -> Path:
    """An IPR run folder as the loop writes it, with rendered shapes images."""
    run_dir = Path(runs_dir) / run_id
    (run_dir / "config.json").parent.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps({"kind": "ipr", "model": "shapes"}))
    for sample_id, iteration, name, prompt, objects, relabeled, keep, weight in FAKE_SAMPLES:
        folder = run_dir / f"iteration-{iteration}"
        (folder / "images").mkdir(parents=True, exist_ok=True)
        scene = Scene(tuple(ShapeObject(shape, color, cx, cy, 16.0) for shape, color, cx, cy in objects))
        render(scene).save(folder / "images" / name)
        detections = [{"label": o.shape, "box": list(o.box), "score": 0.98, "color": o.color} for o in scene.objects]
        record = {"id": sample_id, "iteration": iteration, "image": f"iteration-{iteration}/images/{name}",
                  "prompt": prompt, "seed": 0, "spec": {"include": []}, "detections": detections,
                  "relabeled": relabeled, "changed": relabeled != prompt, "keep": keep,
                  "reasons": [] if relabeled == prompt else [f"found {relabeled}"], "weight": weight}
        with open(folder / "samples.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
    return run_dir


@pytest.fixture
def run_dir(data_dir):
    return make_fake_run(data_dir / "runs")


@pytest.fixture
def store(data_dir):
    store = ReviewStore(data_dir / "workbench.db")
    yield store
    store.close()


def test_reviews_are_written_at_once_and_survive_a_restart(data_dir, store):
    store.set("run", "a", "accepted")
    store.set("run", "b", "edited", "  a green   square ")
    store.set("run", "c", "rejected", "ignored for a rejection")
    store.set("other-run", "a", "rejected")
    store.close()

    reopened = ReviewStore(data_dir / "workbench.db")
    reviews = reopened.get_all("run")
    assert {key: (r.status, r.prompt) for key, r in reviews.items()} == {
        "a": ("accepted", None), "b": ("edited", "a green square"), "c": ("rejected", None)}
    # A later verdict replaces the earlier one.
    reopened.set("run", "b", "accepted")
    assert reopened.get_all("run")["b"].status == "accepted"
    assert reopened.get_all("run")["b"].prompt is None
    reopened.close()


def test_an_empty_overlong_edit_or_unknown_status_is_refused(store):
    with pytest.raises(InvalidInput, match="edited prompt is empty"):
        store.set("run", "a", "edited", "   ")
    with pytest.raises(InvalidInput, match="the limit is 1000"):
        store.set("run", "a", "edited", "a red circle " * 100)
    with pytest.raises(InvalidInput, match="Unknown review status"):
        store.set("run", "a", "maybe")
    assert store.get_all("run") == {}


def test_accept_pending_leaves_edits_and_rejections_alone(store):
    store.set("run", "b", "edited", "two circles")
    store.set("run", "c", "rejected")
    assert store.accept_pending("run", ["a", "b", "c", "d"]) == 2
    statuses = {key: r.status for key, r in store.get_all("run").items()}
    assert statuses == {"a": "accepted", "b": "edited", "c": "rejected", "d": "accepted"}
    assert store.get_all("run")["b"].prompt == "two circles"


def test_load_samples_reads_every_iteration_or_one(run_dir, data_dir):
    assert [s["id"] for s in load_samples(run_dir)] == [s[0] for s in FAKE_SAMPLES]
    assert [s["id"] for s in load_samples(run_dir, iteration=1)] == ["i1-p00000-s0000"]
    with pytest.raises(InvalidInput, match="iteration 7"):
        load_samples(run_dir, iteration=7)
    assert list_review_runs(data_dir / "runs") == ["ipr-test"]
    (data_dir / "runs" / "a-generate-job").mkdir()
    assert list_review_runs(data_dir / "runs") == ["ipr-test"]


def test_a_corrupt_line_names_file_and_line(run_dir):
    path = run_dir / "iteration-0" / "samples.jsonl"
    lines = path.read_text().splitlines()
    lines[1] = lines[1][:40]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InvalidInput) as error:
        load_samples(run_dir)
    assert str(path) in str(error.value) and "line 2" in str(error.value)


def test_a_line_still_being_written_is_skipped_but_a_missing_key_is_not(run_dir):
    path = run_dir / "iteration-1" / "samples.jsonl"
    with open(path, "a") as handle:
        handle.write('{"id": "i1-p00009-s0000", "ima')  # the loop is mid-write
    assert len(load_samples(run_dir)) == len(FAKE_SAMPLES)
    path.write_text(json.dumps({"id": "x", "prompt": "a red circle"}) + "\n")
    with pytest.raises(InvalidInput, match=r"line 1 lacks image"):
        load_samples(run_dir)


def test_not_an_ipr_run_folder(tmp_path):
    with pytest.raises(InvalidInput, match="not an IPR run folder"):
        load_samples(tmp_path)


def test_final_prompts_and_training_rows_follow_the_verdicts(run_dir, store):
    ids = [s[0] for s in FAKE_SAMPLES]
    store.set("ipr-test", ids[0], "accepted")
    store.set("ipr-test", ids[1], "edited", "a blue square")  # edited back to the original prompt
    store.set("ipr-test", ids[2], "rejected")
    samples = with_reviews(load_samples(run_dir), store.get_all("ipr-test"))
    assert [s["status"] for s in samples] == ["accepted", "edited", "rejected", "pending"]
    assert [s["final_prompt"] for s in samples] == ["a red circle", "a blue square", "a yellow triangle",
                                                    "a purple square"]
    rows = training_rows(samples)
    # Rejected and keep=False samples are dropped; an edit back to the original prompt weighs 1.0.
    assert rows == [
        {"file_name": "iteration-0/images/p00000_s0000.png", "text": "a red circle", "weight": 1.0, "id": ids[0]},
        {"file_name": "iteration-0/images/p00001_s0000.png", "text": "a blue square", "weight": 1.0, "id": ids[1]},
    ]
    store.set("ipr-test", ids[1], "edited", "a dark green square")
    rows = training_rows(with_reviews(load_samples(run_dir), store.get_all("ipr-test")))
    assert rows[1]["text"] == "a dark green square" and rows[1]["weight"] == 0.5

    # A person's edit of a sample the loop dropped (keep=False) makes it a training pair.
    store.set("ipr-test", ids[3], "edited", "a purple square")
    rows = training_rows(with_reviews(load_samples(run_dir), store.get_all("ipr-test")))
    assert rows[-1]["id"] == ids[3] and rows[-1]["text"] == "a purple square" and rows[-1]["weight"] == 0.5


def test_export_is_an_imagefolder_with_text_and_weight(run_dir, store):
    ids = [s[0] for s in FAKE_SAMPLES]
    store.set("ipr-test", ids[1], "edited", "a green square")
    out = export_imagefolder(run_dir, "ipr-test", store, run_dir / "export")
    records = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["text"] for r in records] == ["a red circle", "a green square", "a yellow triangle"]
    assert [r["weight"] for r in records] == [1.0, 0.5, 0.5]
    for record in records:
        with Image.open(out / record["file_name"]) as image:
            assert image.size == (64, 64)
    assert sorted(p.name for p in out.iterdir()) == sorted([r["file_name"] for r in records] + ["metadata.jsonl"])

    # Re-exporting after a rejection replaces the folder: the rejected image is gone.
    store.set("ipr-test", ids[2], "rejected")
    export_imagefolder(run_dir, "ipr-test", store, run_dir / "export")
    records = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ids[:2]
    assert len(list(out.glob("*.png"))) == 2
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]  # no staging folders left


def test_export_loads_with_datasets_imagefolder_when_installed(run_dir, store):
    datasets = pytest.importorskip("datasets")
    out = export_imagefolder(run_dir, "ipr-test", store, run_dir / "export")
    dataset = datasets.load_dataset("imagefolder", data_dir=str(out), split="train")
    assert set(dataset.column_names) >= {"image", "text", "weight"}
    assert len(dataset) == 3


def test_export_refuses_a_foreign_folder_and_an_empty_dataset(run_dir, store, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(InvalidInput, match="not an export"):
        export_imagefolder(run_dir, "ipr-test", store, foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    for sample in FAKE_SAMPLES:
        store.set("ipr-test", sample[0], "rejected")
    with pytest.raises(InvalidInput, match="Nothing to export"):
        export_imagefolder(run_dir, "ipr-test", store, run_dir / "export")
