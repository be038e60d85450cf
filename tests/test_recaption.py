"""RECAP's data side (pipelines.recap): the shapes world's web data with noisy alt text, and the
recaptioner that writes short and long captions from the pixels into a new imagefolder."""

import json

import numpy as np
import pytest

from pipelines.recap import make_shapes_dataset, recap_training_rows, recaption
from pipelines.trainer import read_rows
from workbench.errors import InvalidInput, ModelNotAvailable
from workbench.perception import backends
from workbench.perception.shapes import ShapesCaptioner
from workbench.prompt_parser import parse_prompt
from workbench.shapes.captions import AltTextNoise, brief_caption, long_caption
from workbench.shapes.render import render
from workbench.shapes.scene import Scene, ShapeObject
from workbench.shapes.world import COLORS, OPPOSITE_RELATION
from workbench.store import read_jsonl

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def web_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("web") / "data"
    make_shapes_dataset(folder, 30, seed=3)
    return folder


class CountingCaptioner(ShapesCaptioner):
    calls = 0

    def caption(self, image, mode="short"):
        CountingCaptioner.calls += 1
        return super().caption(image, mode)


@pytest.fixture
def counting_captioner(monkeypatch):
    CountingCaptioner.calls = 0
    monkeypatch.setitem(backends.CAPTIONERS, "counting", lambda **options: CountingCaptioner(**options))
    return CountingCaptioner


def test_the_shapes_dataset_is_deterministic_and_its_alt_text_is_noisy(web_data, tmp_path):
    again = tmp_path / "again"
    info = make_shapes_dataset(again, 30, seed=3)
    assert (again / "metadata.jsonl").read_bytes() == (web_data / "metadata.jsonl").read_bytes()
    for i in (0, 17, 29):
        assert (again / f"images/{i:05d}.png").read_bytes() == (web_data / f"images/{i:05d}.png").read_bytes()
    make_shapes_dataset(tmp_path / "other", 5, seed=4)
    assert read_jsonl(tmp_path / "other" / "metadata.jsonl") != read_jsonl(web_data / "metadata.jsonl")[:5]

    # A valid imagefolder: the training engine reads every row and finds every image, at 64 px.
    rows = read_rows([str(web_data)])
    assert len(rows.paths) == 30
    from PIL import Image

    assert Image.open(rows.paths[0]).size == (64, 64)
    # At the default noise rates most alt text misstates its scene; with no noise it is exact.
    assert info["alt_text_exact"] < 0.5
    truth = read_jsonl(web_data / "scenes.jsonl")
    assert sum(r["text"] != s["caption"] for r, s in zip(read_jsonl(web_data / "metadata.jsonl"), truth)) >= 15
    clean = tmp_path / "clean"
    zero = AltTextNoise(**{name: 0.0 for name in vars(AltTextNoise())})
    assert make_shapes_dataset(clean, 10, seed=3, noise=zero)["alt_text_exact"] == 1.0
    # Scenes follow the shapes model's own pre-training mix of single objects, unless told otherwise.
    from pipelines.train_shapes import Config

    assert info["settings"]["single_share"] == Config().single_share
    singles = tmp_path / "singles"
    make_shapes_dataset(singles, 8, seed=3, single_share=1.0)
    assert all(len(s["scene"]["objects"]) == 1 for s in read_jsonl(singles / "scenes.jsonl"))
    # Image i depends on (seed, i) alone: a smaller set is the start of a larger one.
    assert (clean / "images/00004.png").read_bytes() == (web_data / "images/00004.png").read_bytes()


def test_recaptioning_keeps_the_alt_text_and_reads_captions_from_the_pixels(web_data, tmp_path):
    source_bytes = (web_data / "metadata.jsonl").read_bytes()
    out = tmp_path / "recaptioned"
    info = recaption(web_data, out, captioner="shapes", batch_size=8)
    assert info["images"] == 30 and info["skipped"] == 0
    assert (web_data / "metadata.jsonl").read_bytes() == source_bytes  # the user's folder is untouched

    rows = read_jsonl(out / "metadata.jsonl")
    source = read_jsonl(web_data / "metadata.jsonl")
    truth = read_jsonl(web_data / "scenes.jsonl")
    assert [r["alt_text"] for r in rows] == [r["text"] for r in source] == [r["text"] for r in rows]
    # The embedded captioner recovers clean renders: its long captions are the scenes' exact ones.
    agree = np.mean([r["long_caption"] == t["caption"] for r, t in zip(rows, truth)])
    assert agree >= 0.9
    # Short captions are brief (what and how many, no colours: the paper's short mode); long ones say all.
    brief = np.mean([r["short_caption"] == brief_caption(Scene.from_dict(t["scene"])) for r, t in zip(rows, truth)])
    assert brief >= 0.9
    assert sum(r["long_caption"] != r["short_caption"] for r in rows) >= 5  # long ones add the layout
    assert len(read_rows([str(out)]).paths) == 30  # a trainable imagefolder of its own

    # Pixels, not the recorded scene: an image redrawn after the fact is captioned as it now looks.
    edited = tmp_path / "edited"
    make_shapes_dataset(edited, 4, seed=3)
    scene = Scene((ShapeObject("square", "purple", 20.0, 30.0, 16.0),
                   ShapeObject("square", "purple", 46.0, 30.0, 16.0)))
    render(scene).save(edited / "images/00001.png")
    recaption(edited, edited / "recap", captioner="shapes")
    rows = read_jsonl(edited / "recap" / "metadata.jsonl")
    assert rows[1]["long_caption"] == long_caption(scene) == "two purple squares"
    assert rows[1]["short_caption"] == "two squares"


def same_pair(caption: str, expected: str) -> bool:
    """Whether two one-phrase pair captions state the same objects and relation, either way round."""
    def read(text):
        target, subject = parse_prompt(text)["include"]
        relation = subject.pop("position")[0]
        return {(str(subject), relation, str(target)), (str(target), OPPOSITE_RELATION[relation], str(subject))}
    return read(caption) == read(expected)


def test_inline_pairs_recaption_a_related_pair_in_one_phrase(web_data, tmp_path):
    recaption(web_data, tmp_path / "plain", captioner="shapes")
    recaption(web_data, tmp_path / "inline", captioner="shapes",
              captioner_options={"brief_short": True, "inline_pairs": True})
    plain, inline = (read_jsonl(tmp_path / name / "metadata.jsonl") for name in ("plain", "inline"))
    truth = [Scene.from_dict(t["scene"]) for t in read_jsonl(web_data / "scenes.jsonl")]
    changed = [k for k, (p, i) in enumerate(zip(plain, inline)) if p["long_caption"] != i["long_caption"]]
    assert changed  # some scenes are related pairs
    for k in changed:
        # The same pair and relation as the truth; which object is placed may differ where the
        # detected sizes differ a little from the drawn ones.
        assert same_pair(inline[k]["long_caption"], long_caption(truth[k], inline_pairs=True))
        assert ";" not in inline[k]["long_caption"] and ";" in plain[k]["long_caption"]
    # Short captions stay brief (no colours) but place a pair of shapes the same way.
    short_changed = [k for k, (p, i) in enumerate(zip(plain, inline)) if p["short_caption"] != i["short_caption"]]
    assert short_changed
    for k in short_changed:
        assert same_pair(inline[k]["short_caption"], brief_caption(truth[k], inline_pairs=True))
        assert not any(color in inline[k]["short_caption"] for color in COLORS)


def test_the_recap_mix_is_half_short_half_long_on_the_same_images_as_the_alt_text(web_data, tmp_path):
    out = tmp_path / "recaptioned"
    recaption(web_data, out, captioner="shapes")
    rows = read_jsonl(out / "metadata.jsonl")
    mix = recap_training_rows(rows, out, "mix")
    alt = recap_training_rows(rows, out, "alt")
    assert [r["file_name"] for r in mix] == [r["file_name"] for r in alt]  # same images, same order
    assert len(mix) == 2 * len(rows)
    shorts = sum(r["text"] == row["short_caption"] for r, row in zip(mix[0::2], rows))
    longs = sum(r["text"] == row["long_caption"] for r, row in zip(mix[1::2], rows))
    assert shorts == longs == len(rows)
    assert [r["text"] for r in alt] == [row["alt_text"] for row in rows for _ in range(2)]
    assert {r["text"] for r in recap_training_rows(rows, out, "long")} == {row["long_caption"] for row in rows}


def test_a_stopped_recaption_continues_where_it_stopped(web_data, tmp_path, counting_captioner):
    out = tmp_path / "recaptioned"
    stopped = recaption(web_data, out, captioner="counting", batch_size=8, should_stop=lambda: True)
    assert stopped["stopped"] and stopped["images"] == 8
    assert not (out / "metadata.jsonl").exists()  # only complete results appear under the final name
    assert len(read_jsonl(out / "metadata.partial.jsonl")) == 8
    with open(out / "metadata.partial.jsonl", "a") as handle:
        handle.write('{"file_name": "images/000')  # killed in the middle of a write

    info = recaption(web_data, out, captioner="counting", batch_size=8)
    assert info["images"] == 30
    assert counting_captioner.calls == 2 * 30  # short and long, each image once
    straight = tmp_path / "straight"
    recaption(web_data, straight, captioner="shapes", captioner_options={})  # "counting" is the plain captioner
    assert read_jsonl(out / "metadata.jsonl") == read_jsonl(straight / "metadata.jsonl")
    assert not (out / "metadata.partial.jsonl").exists()

    # Finished: run again, nothing is captioned; other settings are refused.
    recaption(web_data, out, captioner="counting", batch_size=8)
    assert counting_captioner.calls == 60
    with pytest.raises(InvalidInput, match="captioner"):
        recaption(web_data, out, captioner="shapes")


def write_folder(folder, lines, images=("a.png",)):
    folder.mkdir(parents=True, exist_ok=True)
    for name in images:
        render(Scene((ShapeObject("circle", "red", 32.0, 32.0, 16.0),))).save(folder / name)
    (folder / "metadata.jsonl").write_text("".join(line + "\n" for line in lines))
    return folder


@pytest.mark.parametrize("lines, images, message", [
    (None, (), "has no metadata.jsonl"),
    (['{"file_name": "a.png", "text": "a circle"}', "{not json"], ("a.png",), "line 2 is not valid JSON"),
    (['{"file_name": "a.png"}'], ("a.png",), 'no "text" string'),
    (['{"text": "a circle"}'], ("a.png",), 'no "file_name"'),
    (['{"file_name": "b.png", "text": "a circle"}'], ("a.png",), "missing: b.png"),
    ([], ("a.png",), "lists no images"),
])
def test_bad_folders_fail_with_a_clear_message(tmp_path, lines, images, message):
    folder = tmp_path / "data"
    if lines is None:
        folder.mkdir()
    else:
        write_folder(folder, lines, images)
    with pytest.raises(InvalidInput, match=message):
        recaption(folder, tmp_path / "out", captioner="shapes")


def test_unreadable_images_stop_with_their_name_or_are_skipped_when_asked(tmp_path):
    folder = write_folder(tmp_path / "data", ['{"file_name": "a.png", "text": "a circle"}',
                                              '{"file_name": "broken.png", "text": "a square"}'])
    (folder / "broken.png").write_bytes(b"not a png")
    with pytest.raises(InvalidInput, match="Cannot read image .*broken.png .*line 2"):
        recaption(folder, tmp_path / "out", captioner="shapes")
    info = recaption(folder, tmp_path / "out2", captioner="shapes", skip_unreadable=True)
    assert info["images"] == 1 and info["skipped"] == 1 and info["skipped_files"] == ["broken.png"]
    assert [r["file_name"] for r in read_jsonl(tmp_path / "out2" / "metadata.jsonl")] == ["a.png"]


def test_missing_captioner_weights_and_overwriting_the_source_are_refused(tmp_path, monkeypatch):
    folder = write_folder(tmp_path / "data", ['{"file_name": "a.png", "text": "a circle"}'])
    monkeypatch.setenv("WORKBENCH_BLIP_MODEL", str(tmp_path / "no-blip-here"))
    with pytest.raises(ModelNotAvailable, match="no-blip-here"):
        recaption(folder, tmp_path / "out", captioner="blip")
    with pytest.raises(InvalidInput, match="Unknown captioner"):
        recaption(folder, tmp_path / "out3", captioner="nope")
    with pytest.raises(InvalidInput, match="never overwritten"):
        recaption(folder, folder, captioner="shapes")
    assert json.loads((folder / "metadata.jsonl").read_text()) == {"file_name": "a.png", "text": "a circle"}
