"""The Data tab as the page calls it: skill prompts (with the ROUGE-L filter's statistics, user skills,
saved prompt sets), recaptioning a dataset (original vs short vs long, cancel and continue), browsing
imagefolders, and the data-folder-only rule for every path the page sends."""

import json
import os

import pytest

from workbench.datasets import find_imagefolders, inside_data_folder, prompt_sets, row_image
from workbench.llm import LLMS, ShapesLLM
from workbench.perception import backends
from workbench.perception.shapes import ShapesCaptioner
from workbench.ui import data as browse, data_recaption as recaption, data_skills as skills

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def last(generator):
    """What the page shows when a handler's generator is done."""
    outputs = None
    for outputs in generator:
        pass
    return outputs


# --- skill prompts -----------------------------------------------------------------------------------


def test_skill_prompts_are_written_counted_saved_and_reopen_after_a_restart(runner, data_dir):
    status, stats, prompts, picker, job_id = last(skills.write_prompt_set(runner, "shapes", "shapes",
                                                                          ["counting", "spatial"], 8, 0.5))
    assert "2 skill(s)" in status, status
    name = f"skill-prompts-{job_id}"
    assert picker["value"] == name and (data_dir / "datasets" / name / "counting.json").is_file()

    # Per skill: written = kept + near-duplicates + evaluation prompts + too long + invalid; a total row.
    rows = stats.set_index("skill")
    assert list(rows.index) == ["counting", "spatial", "total"]
    dropped = rows[["near-duplicates", "evaluation prompts", "too long", "invalid"]].sum(axis=1)
    assert (rows["written"] == rows["kept"] + dropped).all()
    assert rows.loc["total", "kept"] == rows.loc["counting", "kept"] + rows.loc["spatial", "kept"]
    assert rows.loc["total", "near-duplicates"] > 0  # a low threshold rejects many
    # The kept prompts, per skill, as many as the statistics say.
    assert (prompts.groupby("skill").size() == rows["kept"].drop("total")).all()
    saved = (data_dir / "datasets" / name / "prompts.jsonl").read_text().splitlines()
    assert len(saved) == len(prompts) == rows.loc["total", "kept"]

    # After a restart the saved set is listed and shows the same tables.
    runner.shutdown()
    assert prompt_sets() == [name]
    status_again, stats_again, prompts_again = skills.open_prompt_set(name)
    assert stats_again.equals(stats) and prompts_again.equals(prompts)
    assert "ROUGE-L threshold 0.5" in status_again


class CancellingLLM(ShapesLLM):
    """The shapes LLM, which cancels every job of the runner as it answers its first request: the first
    skill is still written from that answer, the next one is not started."""

    runner = None

    def chat(self, messages, **options):
        for job in self.runner.list_jobs():
            self.runner.cancel(job.id)
        return super().chat(messages, **options)


def test_a_cancelled_prompt_set_keeps_its_finished_skills(runner, monkeypatch):
    CancellingLLM.runner = runner
    monkeypatch.setitem(LLMS, "cancelling", lambda **options: CancellingLLM(**options))
    status, stats, prompts, picker, job_id = last(skills.write_prompt_set(runner, "shapes", "cancelling",
                                                                          ["counting", "spatial"], 5, 0.8))
    name = f"skill-prompts-{job_id}"
    assert "cancelled" in status and f"saved as `{name}`" in status, status
    status, stats, prompts = skills.open_prompt_set(name)
    assert list(stats["skill"]) == ["counting"] and "Not written (stopped before): spatial" in status
    assert list(prompts["skill"].unique()) == ["counting"]


@pytest.mark.parametrize("chosen, llm, words", [
    ([], "shapes", "at least one skill"),
    (["counting", "everyday_scene"], "shapes", "Unknown skill 'everyday_scene'"),
    (["counting"], "nope", "Unknown LLM backend"),
])
def test_bad_prompt_settings_are_refused_with_a_message(runner, chosen, llm, words):
    status, *_, job_id = last(skills.write_prompt_set(runner, "shapes", llm, chosen, 8, 0.8))
    assert status.startswith("Not started") and words in status and job_id is None
    assert not runner.list_jobs()


def test_an_llm_server_without_a_model_name_is_refused_before_a_job_starts(runner, monkeypatch):
    monkeypatch.delenv("WORKBENCH_LLM_MODEL", raising=False)
    status, *_, job_id = last(skills.write_prompt_set(runner, "shapes", "openai", ["counting"], 8, 0.8))
    assert status.startswith("Not started") and "set WORKBENCH_LLM_MODEL" in status and job_id is None
    assert ".." not in status and not runner.list_jobs()


def test_user_skills_are_saved_offered_and_deleted(runner, data_dir):
    checkboxes, picker, message = skills.save_skill("shapes", ["counting"], "animals", "Animals doing things.",
                                                    "a cat on a mat", "a dog in a park", "")
    assert message.startswith("Saved the skill `animals`") and "openai or transformers" in message
    assert ("animals (yours)", "animals") in checkboxes["choices"] and checkboxes["value"] == ["counting", "animals"]
    assert picker["choices"] == ["animals"]
    assert json.loads((data_dir / "skills.json").read_text())["skills"][0]["examples"] == ["a cat on a mat",
                                                                                           "a dog in a park"]
    # The shapes LLM cannot write it: the message says which LLM can.
    status, *_ = last(skills.write_prompt_set(runner, "shapes", "shapes", ["animals"], 8, 0.8))
    assert "needs an \"openai\" or \"transformers\" LLM" in status

    assert skills.save_skill("shapes", [], "Bad Name", "x", "a")[2].startswith("Not saved")
    assert skills.save_skill("shapes", [], "counting", "x", "a")[2].startswith("Not saved")  # a built-in name
    checkboxes, picker, message = skills.delete_skill("shapes", ["counting", "animals"], "animals")
    assert message == "Deleted the skill `animals`." and checkboxes["value"] == ["counting"]
    assert "animals" not in [name for _, name in skills.skill_choices("shapes")]


def test_the_model_chooses_the_skills_and_the_llm():
    assert skills.default_llm("shapes") == "shapes" and skills.default_llm("sd15") == "openai"
    assert "long_description" in skills.skills_update("shapes")["value"]
    assert "everyday_scene" in skills.skills_update("sd15")["value"]


# --- recaption ---------------------------------------------------------------------------------------


class CancellingCaptioner(ShapesCaptioner):
    """The shapes captioner, which cancels every job of the runner on its first caption (once), so a
    recaption stops after its first batch."""

    runner = None
    calls = 0

    def caption(self, image, mode="short"):
        if CancellingCaptioner.calls == 0:
            for job in self.runner.list_jobs():
                self.runner.cancel(job.id)
        CancellingCaptioner.calls += 1
        return super().caption(image, mode)


def test_a_recaption_shows_alt_text_short_and_long_and_continues_after_a_cancel(runner, monkeypatch, data_dir):
    CancellingCaptioner.runner, CancellingCaptioner.calls = runner, 0
    monkeypatch.setitem(backends.CAPTIONERS, "scripted", lambda **options: CancellingCaptioner(**options))

    # Empty source: the shapes alt-text dataset is rendered into datasets/, then recaptioned; cancelled
    # after its first batch of 16 images.
    status, table, picker, job_id = last(recaption.recaption_dataset(runner, None, 20, 0, "scripted"))
    assert "cancelled" in status and "continue where it stopped" in status, status
    out = data_dir / "datasets" / "shapes-alt-text-20-seed0-recap-scripted"
    assert len((out / "metadata.partial.jsonl").read_text().splitlines()) == 16

    # The same again continues: only the last 4 images are captioned (short and long each).
    status, table, picker, job_id = last(recaption.recaption_dataset(runner, None, 20, 0, "scripted"))
    assert CancellingCaptioner.calls == 2 * 20, status
    name = "datasets/shapes-alt-text-20-seed0-recap-scripted"
    assert picker["value"] == name and name in picker["choices"]
    assert f"`{name}`: 20 images captioned by the scripted captioner" in status

    # The table: a thumbnail, then the original alt text, the short and the long caption of each image.
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert table.count("<img ") == 20 and "original alt text" in table and "long caption" in table
    for row in rows:
        assert all(f">{text}<" in table for text in (row["alt_text"], row["short_caption"], row["long_caption"]))
    assert any(row["alt_text"] != row["long_caption"] for row in rows)  # the alt text is noisy

    # Reopened from the list after a restart.
    assert recaption.open_recaptioned(name) == (status, table)


def test_a_missing_captioner_says_what_to_download(runner, monkeypatch, tmp_path):
    monkeypatch.setenv("WORKBENCH_BLIP_MODEL", str(tmp_path / "no-blip-here"))
    status, *_ = last(recaption.recaption_dataset(runner, None, 4, 0, "blip"))
    assert status.startswith("Not started") and "no-blip-here" in status
    assert not runner.list_jobs()


def make_imagefolder(folder, rows=30):
    from PIL import Image

    (folder / "images").mkdir(parents=True)
    for i in range(rows):
        Image.new("RGB", (8, 8), (i * 8, 0, 0)).save(folder / "images" / f"{i}.png")
    lines = [json.dumps({"file_name": f"images/{i}.png", "text": f"prompt {i}", "skill": "counting", "seed": i})
             for i in range(rows)]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_paths_outside_the_data_folder_are_refused(runner, data_dir, tmp_path):
    outside = make_imagefolder(tmp_path / "outside")
    (data_dir / "datasets").mkdir(parents=True)
    os.symlink(outside, data_dir / "datasets" / "link")  # a link inside that leads outside
    for path in (str(outside), "../outside", "datasets/link", "/etc"):
        status, *_ = last(recaption.recaption_dataset(runner, path, 4, 0, "shapes"))
        assert status.startswith("Not started") and "outside the data folder" in status, (path, status)
        assert "outside the data folder" in browse.browse_page(path)[2]
        with pytest.raises(Exception, match="outside the data folder"):
            inside_data_folder(path)
    assert not runner.list_jobs()
    # A row naming a file outside is shown without its image.
    assert row_image(data_dir, {"file_name": str(outside / "images" / "0.png")}) is None
    assert row_image(data_dir, {"file_name": "../outside/images/0.png"}) is None
    assert "not an imagefolder" in browse.browse_page("datasets")[2]


def test_a_dataset_inside_whose_rows_name_files_outside_is_not_recaptioned(runner, data_dir, tmp_path):
    outside = make_imagefolder(tmp_path / "outside")
    folder = make_imagefolder(data_dir / "datasets" / "escape", rows=1)
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": str(outside / "images" / "0.png"),
                                                       "text": "a circle"}) + "\n")
    status, *_ = last(recaption.recaption_dataset(runner, "datasets/escape", 0, 0, "shapes"))
    assert status.startswith("Not started") and "names an image outside the data folder" in status
    assert not runner.list_jobs()
    gallery, _, summary, _ = browse.browse_page("datasets/escape")  # browsing shows the row, not the file
    assert gallery == [] and "1 rows" in summary


@pytest.mark.parametrize("name", ["../../workbench.db", "../../workbench.db-wal", "../../weights/private.png"])
def test_a_dataset_whose_rows_name_the_database_or_the_weights_is_neither_read_nor_shown(runner, data_dir, name):
    """Opening and closing the database file would drop the app's locks on it (reviews saved afterwards can
    be lost), and a copy of a file in weights/ would be served: rows naming them are refused like rows
    naming files outside the data folder."""
    from PIL import Image

    (data_dir / "weights").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(data_dir / "weights" / "private.png")
    (data_dir / "workbench.db-wal").touch()  # workbench.db itself is the runner's
    folder = make_imagefolder(data_dir / "datasets" / "private", rows=1)
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": name, "text": "a circle"}) + "\n")
    status, *_ = last(recaption.recaption_dataset(runner, "datasets/private", 0, 0, "shapes", True))
    assert status.startswith("Not started") and "database or its weights folder" in status
    assert not runner.list_jobs()
    assert row_image(folder, {"file_name": name}) is None
    gallery, _, summary, _ = browse.browse_page("datasets/private")
    assert gallery == [] and "1 rows" in summary


def test_unreadable_images_stop_a_recaption_unless_the_box_says_skip_them(runner, data_dir):
    folder = make_imagefolder(data_dir / "datasets" / "broken", rows=3)
    (folder / "images" / "1.png").write_bytes(b"not a png")
    status, *_ = last(recaption.recaption_dataset(runner, "datasets/broken", 0, 0, "shapes"))
    assert "failed" in status and "Cannot read image" in status and "'Skip unreadable images' box" in status
    status, table, *_ = last(recaption.recaption_dataset(runner, "datasets/broken", 0, 0, "shapes", True))
    # make_imagefolder's images are plain black and red squares of 8 pixels: nothing the shapes world draws
    assert "2 images captioned" in status and "(1 unreadable skipped, 2 with an empty caption" in status, status
    assert table.count("<img ") == 2


def test_browse_says_when_a_dataset_is_empty_and_shows_only_pictures(data_dir):
    folder = make_imagefolder(data_dir / "datasets" / "mixed", rows=1)
    (folder / "notes.txt").write_text("not a picture")
    with open(folder / "metadata.jsonl", "a") as handle:
        handle.write(json.dumps({"file_name": "notes.txt", "text": "a note"}) + "\n")
    gallery, table, summary, _ = browse.browse_page("datasets/mixed")
    assert len(table) == 2 and len(gallery) == 1 and gallery[0][0].endswith("images/0.png")
    (folder / "metadata.jsonl").write_text("")
    assert "lists no rows" in browse.browse_page("datasets/mixed")[2]


def test_an_imagefolder_inside_the_data_folder_is_recaptioned_into_datasets(runner, data_dir):
    make_imagefolder(data_dir / "runs" / "selma-run" / "data" / "counting", rows=3)
    status, table, picker, job_id = last(recaption.recaption_dataset(runner, "runs/selma-run/data/counting", 0, 0,
                                                                     "shapes"))
    assert picker["value"] == "datasets/runs-selma-run-data-counting-recap-shapes", status
    assert table.count("<img ") == 3 and ">prompt 2<" in table  # the source's alt text, beside its captions
    assert not (data_dir / "runs" / "selma-run" / "data" / "counting" / "recaption.json").exists()  # never written


# --- browse ------------------------------------------------------------------------------------------


def test_browse_lists_imagefolders_in_datasets_and_runs_and_pages_through_rows(data_dir):
    make_imagefolder(data_dir / "datasets" / "mine", rows=30)
    make_imagefolder(data_dir / "runs" / "selma-run" / "data" / "counting", rows=3)
    (data_dir / "runs" / "selma-run" / "experts" / "counting" / "images").mkdir(parents=True)  # not one
    assert set(find_imagefolders()) == {"datasets/mine", "runs/selma-run/data/counting"}

    gallery, table, summary, page = browse.browse_page("datasets/mine", 1, 12)
    assert "30 rows; page 1 of 3 (rows 1-12)" in summary and page == 1
    assert len(gallery) == 12 and gallery[0][1] == "prompt 0" and gallery[0][0].endswith("images/0.png")
    assert list(table.columns) == ["file_name", "text", "skill", "seed"] and list(table["seed"]) == list(range(12))

    gallery, table, summary, page = browse.browse_page("datasets/mine", 99, 12)  # past the end: the last page
    assert page == 3 and list(table["seed"]) == list(range(24, 30)) and "rows 25-30" in summary
    assert browse.browse_page(None)[2] == "Choose a dataset."


def test_the_app_has_the_data_tab_after_review(whole_app):
    demo, labels = whole_app
    assert labels.index("Data") == labels.index("Review") + 1
    assert {"Skill prompts", "Recaption a dataset", "Browse datasets"} <= set(labels)
    assert labels.index("Train") > labels.index("Browse datasets")


@pytest.fixture
def broken_skills_file(data_dir):
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "skills.json").write_text("{not json")  # hand-edited and left broken


def test_a_broken_skills_file_leaves_the_app_starting_and_says_what_is_wrong(broken_skills_file, whole_app):
    demo, labels = whole_app  # built after the file broke
    assert "Skill prompts" in labels
    assert [name for _, name in skills.skill_choices("shapes")] == list(skills.builtin_skills("shapes"))
    assert "skills.json is not a readable skills file" in skills.skills_markdown("shapes")


def test_adapter_pickers_offer_adapters_trained_after_the_app_started(whole_app):
    import gradio as gr

    from workbench.config import get_settings

    demo, _ = whole_app
    adapter = get_settings().runs_dir / "later-run" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "pytorch_lora_weights.safetensors").write_bytes(b"")  # enough to be listed
    pickers = [block for block in demo.blocks.values() if isinstance(block, gr.Dropdown)
               and (block.label == "Add an adapter" or block.elem_id == "compare-adapter")]
    assert len(pickers) == 2
    for picker in pickers:
        # What opening the Generate tab's adapter list, or loading the page, does to the picker.
        refreshes = [fn for fn in demo.fns.values() if picker in fn.outputs and fn.inputs == []
                     and any(event in ("expand", "load") for _, event in fn.targets)]
        assert refreshes, picker.label
        update = refreshes[0].fn()
        update = update[refreshes[0].outputs.index(picker)] if isinstance(update, tuple) else update
        assert str(adapter) in [value for _, value in update["choices"]]


@pytest.fixture
def full_fine_tune(data_dir):
    """A full fine-tune's exported pipeline in a run, made before the app starts (listing reads no weights)."""
    pipeline = data_dir / "runs" / "full-run" / "pipeline"
    pipeline.mkdir(parents=True)
    (pipeline / "model_index.json").write_text("{}")
    return pipeline


def test_every_model_list_offers_full_fine_tunes_and_on_page_load_those_made_later(full_fine_tune, whole_app):
    import gradio as gr

    from workbench.config import get_settings

    demo, _ = whole_app
    model_lists = [block for block in demo.blocks.values() if isinstance(block, gr.Dropdown)
                   and ("sd15", "sd15") in block.choices]
    # Generate, Inspect, Local captions, Data's skill prompts, and Compare, and each Train section's model.
    assert len(model_lists) >= 8
    for model_list in model_lists:
        assert ("runs/full-run (full fine-tune)", str(full_fine_tune)) in model_list.choices, model_list.label

    later = get_settings().runs_dir / "later-run" / "pipeline"
    later.mkdir(parents=True)
    (later / "model_index.json").write_text("{}")
    for model_list in model_lists:
        # What loading the page does to the list: exactly one refresh, which offers the new fine-tune.
        refreshes = [fn for fn in demo.fns.values() if model_list in fn.outputs and fn.inputs == []
                     and any(event == "load" for _, event in fn.targets)]
        assert len(refreshes) == 1, model_list.label
        updates = refreshes[0].fn()
        update = updates[refreshes[0].outputs.index(model_list)] if isinstance(updates, (tuple, list)) else updates
        assert ("runs/later-run (full fine-tune)", str(later)) in update["choices"], model_list.label


def test_a_negative_seed_reaches_the_tabs_own_message_not_a_gradio_error(whole_app):
    """Gradio refuses a number under a field's minimum before the handler runs (a toast, a traceback in
    the log, and the tab's status left as it was): seed fields leave the range to the handlers, which
    say what is wrong in the tab (tested with each handler)."""
    import gradio as gr

    demo, _ = whole_app
    seed_fields = [block for block in demo.blocks.values()
                   if isinstance(block, gr.Number) and "seed" in (block.label or "").lower()]
    assert len(seed_fields) >= 4, [field.label for field in seed_fields]  # Generate, Inspect, Local captions, Compare
    for field in seed_fields:
        assert field.preprocess(-3) == -3, field.label
