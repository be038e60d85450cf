"""The Local captions & masks tab (RealignDiff's fine stage) as the page calls it: run, show, reopen, refuse."""

import numpy as np
import pandas as pd
import pytest

from workbench.ui import local_captions as tab

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = "an orange square and a red circle"
STEPS = 8  # the shapes model's images are already recognisable; 20 is its default


def run(prompt=PROMPT, seed=0, strength=1.0, edges="neutral", **backends):
    """The tab's Realign button on the shapes model: (original, realigned, table, masks, before, after, status,
    saved-run picker)."""
    return tab.run_fine_stage("shapes", prompt, seed, strength, edges, STEPS, *(backends.get(kind) for kind in
                                                                              ("llm", "tagger", "detector",
                                                                               "segmenter")))


def pixels(image) -> np.ndarray:
    return np.asarray(image)


def test_a_run_shows_both_images_the_tags_the_masks_and_each_tokens_attention(data_dir):
    original, realigned, table, (masked, layers), before, after, status, picker = run()

    # The two images side by side, same seed and size; the modulation changed the second.
    assert original.size == realigned.size == masked.size
    assert not np.array_equal(pixels(original), pixels(realigned))

    # Every tag with its LLM score; the objects realigned with their local captions and tokens.
    assert isinstance(table, pd.DataFrame) and list(table.columns) == tab.TABLE_COLUMNS
    assert set(table["LLM score"]) <= {0.0, 0.5, 2.0} and {"circle", "square"} <= set(table["tag"])
    rows = table.set_index("tag")
    assert rows.loc["circle", "local caption"] == "a red circle"
    assert rows.loc["circle", "tokens given its mask"] == "6 red, 7 circle"
    assert rows.loc["square", "tokens given its mask"] == "2 orange, 3 square"
    assert rows.loc["circle", "LLM says"] == "certain"
    assert all(rows.loc[name, "tokens given its mask"] == "" for name in rows.index if rows.loc[name, "LLM score"] == 0)

    # One mask per object realigned, over the original, at the displayed size.
    assert sorted(label.split(":")[0] for _, label in layers) == ["circle", "square"]
    assert "circle: “a red circle” (tokens: red, circle)" in [label for _, label in layers]
    for mask, _ in layers:
        assert mask.shape == (masked.height, masked.width) and 0 < mask.mean() < 1

    # One attention map per prompt token, before and after, in prompt order; masked tokens changed.
    captions = [caption for _, caption in before]
    assert captions == [caption for _, caption in after]
    assert captions == ["1 an", "2 orange → square", "3 square → square", "4 and", "5 a", "6 red → circle",
                        "7 circle → circle"]
    assert all(image.size == (tab.ATTENTION_SIDE, tab.ATTENTION_SIDE) for image, _ in before + after)
    red = captions.index("6 red → circle")
    assert not np.array_equal(pixels(before[red][0]), pixels(after[red][0]))

    # Saved under the data folder and offered in the picker.
    folder = data_dir / "realign-fine" / picker["value"]
    assert (folder / "result.json").is_file() and (folder / "masks" / "circle.png").is_file()
    assert [name for _, name in picker["choices"]] == [picker["value"]]
    assert "seed 0" in status and str(folder) in status and "“a red circle”" in status


def test_the_page_shows_each_stage_while_it_works():
    shown = []
    tab.run_fine_stage("shapes", PROMPT, 0, 0.0, "neutral", STEPS,
                       progress=lambda fraction, desc: shown.append((fraction, desc)))
    fractions, stages = zip(*shown)
    assert list(fractions) == sorted(fractions) and fractions[-1] < 1
    assert [stage.split()[0] for stage in stages] == ["loading", "loading", "generating", "tagging", "regenerating"]
    assert "seed 0" in stages[2] and "LLM" in stages[3]


def test_strength_zero_regenerates_the_original_exactly():
    original, realigned, _, _, before, after, _, _ = run(strength=0)
    assert np.array_equal(pixels(original), pixels(realigned))
    assert all(np.array_equal(pixels(b), pixels(a)) for (b, _), (a, _) in zip(before, after))


def test_a_saved_run_reopens_from_disk_as_it_was_shown(monkeypatch):
    shown = run(seed=1, edges="outside")
    name = shown[-1]["value"]

    # A restart: nothing in memory, and the pipeline must not run again.
    tab._perception.cache_clear()
    monkeypatch.setattr(tab, "realign_fine", lambda *args, **kwargs: pytest.fail("a reopen must not recompute"))
    assert tab.past_runs()[0] == (f"{name} · {PROMPT} (seed 1, S 1)", name)
    reopened = tab.open_run(name)

    original, realigned, table, (masked, layers), before, after, status = reopened
    assert np.array_equal(pixels(original), pixels(shown[0])) and np.array_equal(pixels(realigned), pixels(shown[1]))
    assert table.equals(shown[2])
    assert np.array_equal(pixels(masked), pixels(shown[3][0]))
    assert [label for _, label in layers] == [label for _, label in shown[3][1]]
    assert all(np.array_equal(mask, old) for (mask, _), (old, _) in zip(layers, shown[3][1]))
    for gallery, old in ((before, shown[4]), (after, shown[5])):
        assert [c for _, c in gallery] == [c for _, c in old]
        assert all(np.array_equal(pixels(image), pixels(o)) for (image, _), (o, _) in zip(gallery, old))
    assert status == shown[6] and "edges outside" in status


@pytest.mark.parametrize("changes, words", [
    ({"prompt": "   "}, "The prompt is empty"),
    ({"prompt": "a red circle " * 200}, "the limit is 1000"),
    ({"prompt": "a red circle " * 100}, "the limit is 1000"),  # one limit, whichever step refuses it
    ({"model": "no-such-model"}, "Unknown model 'no-such-model'"),
    ({"seed": -1}, "Seeds must be whole numbers"),
    ({"seed": None}, "Give a seed"),
    ({"strength": -0.5}, "strength S must be between 0"),
    ({"edges": "inside"}, "Edge handling must be one of"),
    ({"tagger": "magic"}, "Unknown tagger backend 'magic'"),
    ({"tagger": "clip"}, "hf download openai/clip-vit-large-patch14"),  # real backend, weights not on disk
    ({"model": "sdxl"}, "hf download stabilityai/stable-diffusion-xl-base-1.0"),
])
def test_bad_input_is_a_message_and_leaves_the_page_as_it_was(data_dir, changes, words):
    inputs = {"model": "shapes", "prompt": PROMPT, "seed": 0, "strength": 1.0, "edges": "neutral", "steps": STEPS,
              "llm": None, "tagger": None, "detector": None, "segmenter": None, **changes}
    *shown, status, picker = tab.run_fine_stage(*inputs.values())
    assert status.startswith("Cannot realign:") and words in status
    assert all(value == {"__type__": "update"} for value in shown + [picker])
    assert not (data_dir / "realign-fine").exists() or not any((data_dir / "realign-fine").iterdir())


def test_opening_nothing_or_a_broken_run_says_so(data_dir):
    assert tab.open_run(None)[-1] == "Choose a saved run."
    assert "'gone' is incomplete or gone" in tab.open_run("gone")[-1]
    broken = data_dir / "realign-fine" / "broken"
    broken.mkdir(parents=True)
    (broken / "result.json").write_text("{not json")
    assert tab.open_run("../../broken")[-1].startswith("Cannot open: The run 'broken' cannot be read")
    assert tab.past_runs() == [("broken", "broken")]


def test_the_app_has_the_tab(whole_app):
    demo, labels = whole_app
    assert labels.index("Local captions & masks") == labels.index("Inspect & Relabel") + 1
    assert any(getattr(block, "elem_id", None) == "fine-run" for block in demo.blocks.values())
