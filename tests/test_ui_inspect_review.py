"""The Inspect & Relabel and Review tabs' handlers, called as the page calls them (no browser)."""

import json

import numpy as np
import pandas as pd
import gradio as gr
import pytest
from PIL import Image

from test_reviews import FAKE_SAMPLES, make_fake_run
from workbench.perception.base import Detection
from workbench.reviews import ReviewStore
from workbench.shapes.render import render
from workbench.shapes.scene import Scene, ShapeObject
from workbench.ui import inspect, review

IDS = [sample[0] for sample in FAKE_SAMPLES]


# --- Inspect & Relabel ---------------------------------------------------------------------------


def scene_image(*objects) -> Image.Image:
    return render(Scene(tuple(ShapeObject(shape, color, cx, cy, 16.0) for shape, color, cx, cy in objects)))


def readable(tokens, keep=(None, "added")) -> str:
    return " ".join("".join(text for text, category in tokens if category in keep).split())


def test_word_diff_marks_only_the_changed_words():
    tokens = inspect.word_diff("two blue squares above a red circle", "a green square above a red circle")
    assert [text for text, category in tokens if category == "removed"] == ["two blue squares"]
    assert [text for text, category in tokens if category == "added"] == ["a green square"]
    assert readable(tokens) == "a green square above a red circle"
    assert readable(tokens, keep=(None, "removed")) == "two blue squares above a red circle"
    assert all(category is None for _, category in inspect.word_diff("a red circle", "a red circle"))


def test_annotations_enlarge_small_images_and_label_each_box():
    image = scene_image(("circle", "red", 20, 32))
    det = Detection("circle", (12.0, 24.0, 28.0, 40.0), 0.98, "red")
    mask = np.zeros((64, 64), dtype=bool)
    mask[26:38, 14:26] = True
    big, layers = inspect.annotated(image, [det, Detection("square", (40, 40, 50, 50), 0.1, "blue")],
                                    [mask, None], threshold=0.3)
    assert big.size == (384, 384)
    assert [label for _, label in layers] == ["red circle 0.98", "blue square 0.10 (ignored)"]
    layer = layers[0][0]
    assert layer.shape == (384, 384)
    assert layer[24 * 6, 20 * 6] == 1.0  # top edge of the box, scaled 6x
    assert 0 < layer[32 * 6, 20 * 6] < 1  # inside the mask: shaded
    assert layer[5, 5] == 0


def test_inspect_without_an_image_or_with_a_non_image_says_so(tmp_path):
    *values, message = inspect.inspect_image(None, "a red circle", "shapes")
    assert message.startswith("Cannot inspect: No image yet")
    assert values[0] is None
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    message = inspect.inspect_image(str(not_an_image), "a red circle", "shapes")[-1]
    assert "'notes.png' is not an image file" in message
    message = inspect.inspect_image(scene_image(("circle", "red", 32, 32)), "  ", "shapes")[-1]
    assert "Give the prompt" in message


def test_a_wrong_prompt_is_relabeled_to_what_the_image_shows():
    image = scene_image(("square", "green", 32, 32))
    shown, parsed, detected, diff, relabeled, verdict, message = inspect.inspect_image(
        image, "a blue square", "shapes", "auto", 0.3)
    assert relabeled != "a blue square" and "green" in relabeled
    assert ("blue", "removed") in diff and any(cat == "added" and "green" in text for text, cat in diff)
    assert parsed["include"][0]["color"] == "blue"
    assert detected["include"][0]["color"] == "green"
    assert "Changed" in verdict
    big, layers = shown
    assert big.size == (384, 384)
    assert [label.rsplit(" ", 1)[0] for _, label in layers] == ["green square"]
    assert layers[0][0].max() == 1.0 and (layers[0][0] == inspect.MASK_ALPHA).any()  # box and mask
    assert "1 detection(s) with `shapes`" in message


def test_the_relabel_shown_is_the_one_an_ipr_run_trains_on_unless_options_are_unticked():
    # A blue circle above a red one, asked as two red circles: IPR's relabel names both colours and
    # where the two circles are; with every option unticked the bare relabel drops the mixed colours.
    image = scene_image(("circle", "blue", 32, 16), ("circle", "red", 32, 48))
    *_, relabeled, _verdict, _message = inspect.inspect_image(image, "two red circles", "shapes")
    assert "blue circle" in relabeled and "red circle" in relabeled and "above" in relabeled
    *_, bare, _verdict, _message = inspect.inspect_image(image, "two red circles", "shapes", options=[])
    assert bare == "two circles"
    assert inspect.ipr_relabel_options() == ["one clause per colour of a class", "say where two single objects are"]


def test_a_sample_ipr_would_leave_out_as_unsure_is_shown_as_not_kept(monkeypatch):
    class UnsureOfTheSquare:  # as the shapes detector: sure from 0.9
        confident_score = 0.9

        def detect(self, image, labels=None):
            return [Detection("circle", (10, 10, 30, 30), 0.99, "red"), Detection("square", (34, 10, 54, 30), 0.6, "blue")]

    monkeypatch.setattr(inspect, "_detector", lambda name: UnsureOfTheSquare())
    image = scene_image(("circle", "red", 20, 20), ("square", "blue", 44, 20))
    *_, verdict, _message = inspect.inspect_image(image, "a red circle and a blue square", "shapes")
    assert "not kept for training" in verdict
    assert "the detector is unsure of a square (score 0.60 < 0.9): not trained on" in verdict


def test_inspecting_names_each_stage_while_it_works():
    shown = []
    inspect.inspect_image(scene_image(("circle", "red", 32, 32)), "a red circle", "shapes",
                          progress=lambda fraction, desc: shown.append((fraction, desc)))
    assert [desc.split()[0] for _, desc in shown] == ["loading", "detecting", "segmenting"]
    assert [fraction for fraction, _ in shown] == sorted(fraction for fraction, _ in shown)


def test_a_right_prompt_stays_as_it_is():
    image = scene_image(("circle", "red", 20, 32), ("square", "blue", 44, 32))
    *_, diff, relabeled, verdict, _message = inspect.inspect_image(
        image, "a red circle to the left of a blue square", "shapes")
    assert "Unchanged" in verdict
    assert all(category is None for _, category in diff)


def test_a_missing_detector_backend_is_a_message_not_an_exception():
    message = inspect.inspect_image(scene_image(("circle", "red", 32, 32)), "a red circle", "sd15",
                                    "groundingdino")[-1]
    assert message.startswith("Cannot inspect:") and "groundingdino" in message.lower()


def test_an_uploaded_workbench_png_fills_in_its_prompt_and_model(tmp_path):
    from workbench.generation import save_png

    metadata = {"prompt": "two red circles", "model": "sd15", "steps": 20, "guidance": 7.5, "seed": 4,
                "width": 64, "height": 64}
    path = save_png(scene_image(("circle", "red", 20, 32)), metadata, tmp_path, name="made.png")
    prompt, model, message = inspect.fill_from_metadata(str(path))  # the tab's image input gives a file path
    assert (prompt, model) == ("two red circles", "sd15") and "filled in" in message
    scene_image(("circle", "red", 20, 32)).save(tmp_path / "plain.png")
    prompt, model, message = inspect.fill_from_metadata(str(tmp_path / "plain.png"))
    assert prompt == model == {"__type__": "update"}  # a plain image leaves the fields as they are


def test_images_generated_earlier_can_be_picked_with_their_prompt_and_model(data_dir):
    import os

    from workbench.generation import save_png

    assert inspect.saved_gallery() == ([], [])  # a fresh install has none, and says nothing is wrong
    metadata = {"prompt": "a red circle", "model": "shapes", "steps": 20, "guidance": 7.5, "seed": 3,
                "width": 64, "height": 64}
    older = save_png(scene_image(("circle", "red", 20, 32)), metadata, data_dir / "runs" / "job-a" / "images")
    newer = save_png(scene_image(("square", "blue", 32, 32)), {**metadata, "prompt": "a blue square", "seed": 5},
                     data_dir / "runs" / "job-b" / "images")
    os.utime(older, (1, 1))  # made long before the other
    plain = data_dir / "runs" / "job-c" / "images" / "plain.png"  # no embedded parameters
    plain.parent.mkdir(parents=True)
    scene_image(("triangle", "green", 32, 32)).save(plain)
    os.utime(plain, (0, 0))
    (data_dir / "runs" / "job-c" / "images" / "broken.png").write_text("not a png")

    items, paths = inspect.saved_gallery()
    assert items == [(str(newer), "a blue square"), (str(older), "a red circle"), (str(plain), "plain.png")]
    picture, prompt, model, message = inspect.pick_saved(paths, 0)
    assert (prompt, model) == ("a blue square", "shapes") and "seed 5" in message
    assert picture.size == (64, 64) and picture.getpixel((32, 32)) != picture.getpixel((2, 2))
    picture, prompt, model, _ = inspect.pick_saved(paths, 2)
    assert picture.size == (64, 64) and prompt == model == {"__type__": "update"}  # kept as typed
    assert inspect.pick_saved(paths, 7)[-1] == "Pick an image in the gallery."
    outside = data_dir.parent / "elsewhere.png"
    scene_image(("circle", "red", 20, 32)).save(outside)
    assert inspect.pick_saved([str(outside)], 0)[-1].startswith("Cannot open `elsewhere.png`")

    # An evaluation made afterwards (an image per prompt and seed, in folders) comes after them.
    for index in range(3):
        save_png(scene_image(("circle", "red", 20, 32)), metadata,
                 data_dir / "runs" / "eval-job" / "images" / f"{index:05d}")
    items, _ = inspect.saved_gallery()
    assert [prompt for _, prompt in items[:3]] == ["a blue square", "a red circle", "plain.png"]
    assert len(items) == 6


def test_generate_reports_a_missing_model_or_bad_input_as_text():
    image, message = inspect.generate_image("sdxl", "a cat", 0, current="/shown/before.png")
    assert image == "/shown/before.png"  # the image shown stays, given back as it is (no gr.update())
    assert "hf download stabilityai/stable-diffusion-xl-base-1.0" in message
    _, message = inspect.generate_image("sdxl", "", 0)
    assert "The prompt is empty" in message


def test_generate_gives_one_image_to_inspect(tiny_sd):
    image, message = inspect.generate_image(str(tiny_sd), "a red circle", 3)
    assert isinstance(image, Image.Image) and "seed 3" in message


# --- Review --------------------------------------------------------------------------------------


@pytest.fixture
def store(data_dir):
    make_fake_run(data_dir / "runs")
    store = ReviewStore(data_dir / "workbench.db")
    yield store
    store.close()


def test_with_no_ipr_run_yet_the_tab_says_how_to_make_one(data_dir, whole_app):
    demo, _ = whole_app
    summary = next(block for block in demo.blocks.values() if getattr(block, "elem_id", None) == "review-summary")
    loads = [fn for fn in demo.fns.values() if summary in fn.outputs and any(e == "load" for _, e in fn.targets)]
    assert len(loads) == 1
    run_list, text = loads[0].fn()  # what opening the page shows
    assert run_list["choices"] == [] and "No IPR run has relabeled samples yet" in text and "Train tab" in text
    store = ReviewStore(data_dir / "workbench.db")
    assert "No IPR run has relabeled samples yet" in review.show_table(store, None)[1]  # Refresh says so too
    store.close()


def test_no_run_chosen_gives_an_empty_table_and_a_hint(store):
    table, summary = review.show_table(store, None)
    assert table.empty and "Choose an IPR run first" in summary
    assert review.record_verdict(store, None, IDS[0], "accepted").startswith("Not saved: Choose an IPR run")
    assert "Not exported: Choose an IPR run" in review.export_run(store, "")
    assert "is not a run id" in review.show_table(store, "../runs")[1]


def test_filters_choose_the_rows(store):
    assert review.run_choices() == ["ipr-test"]
    # Counted from 1, as the Train, Compare and Results tabs count iterations (folders iteration-0, -1).
    assert review.iteration_choices("ipr-test") == ["all", "1", "2"]
    table, summary = review.show_table(store, "ipr-test")
    assert table["id"].tolist() == IDS and summary == "4 samples (4 pending); 4 shown."
    assert review.show_table(store, "ipr-test", iteration="2")[0]["id"].tolist() == [IDS[3]]
    assert review.show_table(store, "ipr-test", changed_only=True)[0]["id"].tolist() == IDS[1:]
    store.set("ipr-test", IDS[1], "rejected")
    table, summary = review.show_table(store, "ipr-test", status="pending")
    assert table["id"].tolist() == [IDS[0], IDS[2], IDS[3]]
    assert summary == "4 samples (3 pending, 1 rejected); 3 shown."


def test_each_row_shows_its_own_image_as_a_thumbnail(store, data_dir):
    table, _ = review.show_table(store, "ipr-test")
    run_dir = (data_dir / "runs" / "ipr-test").resolve()
    # The two samples named p00000_s0000.png are different files of different iterations.
    for cell, (sample_id, iteration, file_name, *_) in zip(table["image"], FAKE_SAMPLES):
        assert cell.startswith('<img src="gradio_api/file=') and f'alt="{sample_id}"' in cell
        assert f"{run_dir}/iteration-{iteration}/images/{file_name}" in cell
    assert review.samples_table([]).columns.tolist() == review.TABLE_COLUMNS


def test_selecting_a_sample_shows_its_boxes_and_prefills_its_prompt(store):
    (big, layers), prompt, details, diff = review.sample_view(store, "ipr-test", IDS[1])
    assert big.size == (384, 384)
    assert [label for _, label in layers] == ["green square 0.98"]
    assert prompt == "a green square"
    assert "original: a blue square" in details and "status **pending**" in details
    assert ("blue", "removed") in diff
    assert review.sample_view(store, "ipr-test", "") == (None, "", "", None)


def test_save_edit_accept_and_reject_are_written_at_once(store, data_dir):
    message = review.record_verdict(store, "ipr-test", IDS[2], "edited", "   ")
    assert message.startswith("Not saved") and "empty" in message
    assert store.get_all("ipr-test") == {}

    assert "Saved the edit" in review.record_verdict(store, "ipr-test", IDS[2], "edited", "one yellow triangle")
    assert "rejected" in review.record_verdict(store, "ipr-test", IDS[1], "rejected")
    message = review.record_verdict(store, "ipr-test", IDS[0], "accepted", "a red circle, typed over")
    assert "use Save edit" in message  # accepting keeps the relabel, not the typed text

    # What another process (a restarted app, the IPR loop) reads from the same file.
    reopened = ReviewStore(data_dir / "workbench.db")
    assert {k: (r.status, r.prompt) for k, r in reopened.get_all("ipr-test").items()} == {
        IDS[0]: ("accepted", None), IDS[1]: ("rejected", None), IDS[2]: ("edited", "one yellow triangle")}
    reopened.close()
    table, _ = review.show_table(store, "ipr-test")
    row = table[table["id"] == IDS[2]].iloc[0]
    assert (row["status"], row["edit"]) == ("edited", "one yellow triangle")
    _, prompt, details, _ = review.sample_view(store, "ipr-test", IDS[2])
    assert prompt == "one yellow triangle" and "status **edited**" in details
    assert "not in run" in review.record_verdict(store, "ipr-test", "nope", "accepted")


def test_an_edit_naming_no_known_object_is_saved_with_a_note(store):
    message = review.record_verdict(store, "ipr-test", IDS[1], "edited", "qqq zzz")
    assert message.startswith(f"Saved the edit of `{IDS[1]}`: qqq zzz") and "names no object" in message
    assert "names no object" not in review.record_verdict(store, "ipr-test", IDS[1], "edited", "two green squares")


def test_leaving_a_sample_with_unsaved_text_names_that_text(store):
    assert review.unsaved_edit_note(store, "ipr-test", IDS[1], "a green square") == ""  # what trains
    assert review.unsaved_edit_note(store, "ipr-test", IDS[1], " a  green square ") == ""  # spacing only
    note = review.unsaved_edit_note(store, "ipr-test", IDS[1], "two green squares")
    assert f"Your edit of `{IDS[1]}` was not saved" in note and "two green squares" in note
    store.set("ipr-test", IDS[1], "edited", "two green squares")
    assert review.unsaved_edit_note(store, "ipr-test", IDS[1], "two green squares") == ""  # saved since
    assert review.unsaved_edit_note(store, "ipr-test", "", "anything") == ""  # no sample was shown


def test_accept_all_shown_accepts_only_the_pending_rows_shown(store):
    store.set("ipr-test", IDS[1], "edited", "a green square")
    table, _ = review.show_table(store, "ipr-test", iteration="1")
    message = review.accept_shown(store, "ipr-test", table)
    assert message.startswith("Accepted 2 pending sample(s) of the 3 shown")
    statuses = {k: r.status for k, r in store.get_all("ipr-test").items()}
    assert statuses == {IDS[0]: "accepted", IDS[1]: "edited", IDS[2]: "accepted"}  # iteration 2 untouched
    empty = pd.DataFrame([], columns=review.TABLE_COLUMNS)
    assert "No samples are shown" in review.accept_shown(store, "ipr-test", empty)


def test_the_table_says_which_samples_the_next_iteration_trains_on(store, data_dir):
    store.set("ipr-test", IDS[2], "rejected")
    trained = dict(zip(*(review.show_table(store, "ipr-test")[0][column] for column in ("id", "trained on"))))
    # IDS[3] is one the loop left out (nothing asked for was detected)
    assert trained == {IDS[0]: "yes", IDS[1]: "yes", IDS[2]: "no (rejected)", IDS[3]: "no (left out by the loop)"}
    store.set("ipr-test", IDS[3], "edited", "a purple square")  # a person's label: trained on after all
    table, _ = review.show_table(store, "ipr-test")
    assert table[table["id"] == IDS[3]].iloc[0]["trained on"] == "yes (your edit)"
    assert "trained on: yes (your edit)" in review.sample_view(store, "ipr-test", IDS[3])[2]
    review.export_run(store, "ipr-test")  # what the next iteration reads: the same three
    rows = [json.loads(line) for line in (data_dir / "runs" / "ipr-test" / "export" / "metadata.jsonl").open()]
    assert sorted(row["id"] for row in rows) == sorted([IDS[0], IDS[1], IDS[3]])


def test_export_writes_the_imagefolder_under_the_run(store, data_dir):
    store.set("ipr-test", IDS[2], "rejected")
    store.set("ipr-test", IDS[0], "accepted")
    message = review.export_run(store, "ipr-test")
    out = data_dir / "runs" / "ipr-test" / "export"
    assert f"Exported 2 image(s) with their prompts to `{out}`" in message
    # the message says which rows nobody has looked at yet (they go out with the relabeler's prompt)
    assert "1 accepted or edited by hand, 1 not reviewed yet" in message
    assert (out / "metadata.jsonl").read_text().count("\n") == 2


def test_an_upload_that_is_no_image_gives_a_message_and_leaves_prompt_and_model_alone(tmp_path):
    from gradio.data_classes import ImageData

    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "ok.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "ok.png").read_bytes()[:60])  # a download that broke off
    (tmp_path / "noise.png").write_bytes(bytes(range(256)) * 2)
    for name in ("cut.png", "noise.png"):
        prompt, model, message = inspect.fill_from_metadata(str(tmp_path / name))
        assert prompt == model == {"__type__": "update"}, name  # no error on the fields the user typed in
        assert message.startswith("Cannot read the upload") and f"'{name}' is not an image file" in message
        message = inspect.inspect_image(str(tmp_path / name), "a red circle", "shapes")[-1]
        assert message.startswith("Cannot inspect") and f"'{name}' is not an image file" in message
        # The tab's input hands such an upload to the handlers as its path (Gradio would refuse it first).
        component = inspect.readable_uploads(gr.Image(type="filepath"))
        assert component.preprocess(ImageData(path=str(tmp_path / name), orig_name=name)) == str(tmp_path / name)