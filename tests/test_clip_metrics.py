"""Evaluation metrics for real models: GenEval's CLIP colour classifier and CLIPScore, offline.

A tiny random CLIP (saved the way openai/clip-vit-large-patch14 is) exercises the real loading and
embedding code; a scripted stand-in whose embeddings are controlled checks the logic around it
(crop -> colour prompts -> argmax; cosine -> score), which a random model cannot show.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from workbench.benchmark import BenchmarkConfig, check_detector, detector_name
from workbench.clipscore import clip_score, clip_score_for_run
from workbench.errors import InvalidInput, ModelNotAvailable
from workbench.evaluation import score_detections
from workbench.perception.backends import check_backend, get_colour_classifier, get_detector
from workbench.perception.base import Detection, Detector
from workbench.perception.clip_metrics import (
    COLOR_TEMPLATES,
    GENEVAL_COLORS,
    Clip,
    ColourClassifier,
    ColourDetector,
    crop_box,
    load_clip,
)
from workbench.tiny_models import build_tiny_clip

RGB = {"red": (230, 20, 20), "green": (20, 200, 40), "blue": (20, 40, 230), "white": (250, 250, 250),
       "black": (5, 5, 5), "yellow": (240, 230, 20), "gray": (153, 153, 153)}


@pytest.fixture(scope="module")
def tiny_clip_folder(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def tiny_clip(tiny_clip_folder):
    return load_clip(str(tiny_clip_folder), device="cpu")


class ScriptedClip:
    """A "CLIP" that sees only colour: a text's embedding is its colour word's axis, an image's is the
    mean of its pixels' nearest colours' axes. Records what it was shown."""

    def __init__(self, colours=tuple(RGB)):
        self.colours = list(colours)
        self.texts, self.images = [], []

    def embed_texts(self, texts, batch_size=64):
        self.texts += list(texts)
        rows = torch.zeros(len(texts), len(self.colours))
        for i, text in enumerate(texts):
            for j, colour in enumerate(self.colours):
                if f" {colour} " in f" {text.replace('-', ' ')} ":
                    rows[i, j] = 1.0
        return torch.nn.functional.normalize(rows + 1e-6, dim=-1)

    def embed_images(self, images, batch_size=16):
        self.images += list(images)
        table = np.array([RGB[c] for c in self.colours], dtype=float)
        rows = []
        for image in images:
            pixels = np.asarray(image.convert("RGB"), dtype=float).reshape(-1, 3)
            nearest = np.argmin(((pixels[:, None] - table[None]) ** 2).sum(-1), axis=1)
            rows.append(np.bincount(nearest, minlength=len(self.colours)) / len(pixels))
        return torch.nn.functional.normalize(torch.tensor(np.array(rows), dtype=torch.float32), dim=-1)


def two_squares():
    """64x48 white image: a red square on the left, a blue one on the right."""
    image = Image.new("RGB", (64, 48), RGB["white"])
    image.paste(RGB["red"], (4, 10, 24, 30))
    image.paste(RGB["blue"], (40, 10, 60, 30))
    return image


class FixedDetector:
    def __init__(self, detections):
        self.detections = detections
        self.calls = []

    def detect(self, image, labels=None):
        self.calls.append(labels)
        return list(self.detections)


# --- the colour classifier: logic, with a scripted CLIP -----------------------------------------


def test_each_box_is_classified_from_its_own_crop_with_genevals_prompts():
    clip = ScriptedClip()
    classifier = ColourClassifier(clip, colours=("red", "green", "blue"))
    colours = classifier.classify(two_squares(), [(40, 10, 60, 30), (4, 10, 24, 30)], "car")
    assert colours == ["blue", "red"]  # crop -> prompts -> argmax, in the order of the boxes
    assert [image.size for image in clip.images] == [(20, 20), (20, 20)]  # the crops, not the whole image
    assert clip.texts[:3] == ["a photo of a red car", "a photo of a red-colored car", "a photo of a red object"]
    assert len(clip.texts) == 3 * 3
    classifier.classify(two_squares(), [(4, 10, 24, 30)], "car")
    assert len(clip.texts) == 9  # the colour prompts of a class are embedded once


def test_a_mask_keeps_the_surroundings_out_of_the_colour():
    clip = ScriptedClip()
    classifier = ColourClassifier(clip, colours=("red", "white", "blue"))
    image = Image.new("RGB", (40, 40), RGB["white"])
    image.paste(RGB["red"], (15, 15, 20, 20))  # a small red object in a big white box
    box = (0, 0, 40, 40)
    assert classifier.classify(image, [box], "ball") == ["white"]
    mask = np.zeros((40, 40), dtype=bool)
    mask[15:20, 15:20] = True
    # GenEval pastes the masked object on #999 grey, a colour no prompt names: what is left is red.
    assert classifier.classify(image, [box], "ball", masks=[mask]) == ["red"]
    assert np.asarray(clip.images[-1])[0, 0].tolist() == [153, 153, 153]


def test_boxes_partly_outside_degenerate_or_missing_the_image():
    image = two_squares()
    assert crop_box(image, (-10, -10, 24, 30)).size == (24, 30)  # clamped to the image
    assert crop_box(image, (30, 30, 10, 10)).size == (20, 20)  # corners given the other way round
    assert crop_box(image, (10.2, 20.2, 10.3, 20.3)).size == (1, 1)  # thinner than a pixel: one pixel
    assert crop_box(image, (64, 10, 64, 20)).size == (1, 10)  # on the right edge: the edge column
    for outside in [(70, 0, 90, 10), (0, -20, 10, -5), (float("nan"), 0, 1, 1)]:
        assert crop_box(image, outside) is None
    classifier = ColourClassifier(ScriptedClip(), colours=("red", "blue"))
    assert classifier.classify(image, [(70, 0, 90, 10), (4, 10, 24, 30)], "car") == [None, "red"]
    assert classifier.classify(image, [(70, 0, 90, 10)], "car") == [None]
    assert classifier.classify(image, [], "car") == []


def test_the_colour_detector_fills_colours_and_the_scorer_uses_them():
    detections = [Detection("car", (40, 10, 60, 30), 0.9), Detection("car", (4, 10, 24, 30), 0.8),
                  Detection("dog", (4, 10, 24, 30), 0.7)]
    inner = FixedDetector(detections)
    detector = ColourDetector(inner, ColourClassifier(ScriptedClip(), colours=("red", "blue", "green")))
    assert isinstance(detector, Detector)
    found = detector.detect(two_squares(), ["car", "dog"])
    assert inner.calls == [["car", "dog"]]  # labels reach the wrapped detector
    assert [(d.label, d.box, d.score, d.color) for d in found] == [
        ("car", (40, 10, 60, 30), 0.9, "blue"), ("car", (4, 10, 24, 30), 0.8, "red"),
        ("dog", (4, 10, 24, 30), 0.7, "red")]
    blue_car = {"tag": "colors", "prompt": "a photo of a blue car", "include": [{"class": "car", "count": 1, "color": "blue"}]}
    green_car = {**blue_car, "include": [{"class": "car", "count": 1, "color": "green"}]}
    assert score_detections(blue_car, found).correct
    verdict = score_detections(green_car, found)
    assert not verdict.correct and "found 0 green; and 1 blue" in verdict.reasons[0]


# --- the colour classifier on a real (tiny, random) CLIP ----------------------------------------


def test_tiny_clip_gives_one_of_the_colours_for_each_box_deterministically(tiny_clip):
    assert isinstance(tiny_clip, Clip)
    classifier = ColourClassifier(tiny_clip)
    image = two_squares()
    boxes = [(4, 10, 24, 30), (40, 10, 60, 30), (0, 0, 64, 48), (30.4, 5.0, 30.4, 5.0), (-30, -30, 200, 200),
             (100, 100, 120, 130)]
    colours = classifier.classify(image, boxes, "car")
    assert all(colour in GENEVAL_COLORS for colour in colours[:5]) and colours[5] is None
    assert ColourClassifier(tiny_clip).classify(image, boxes, "car") == colours  # same input, same answer
    weights = classifier.colour_embeddings("car")
    assert weights.shape == (len(GENEVAL_COLORS), 16)
    assert torch.allclose(weights.norm(dim=-1), torch.ones(len(GENEVAL_COLORS)), atol=1e-5)


def test_colour_weights_are_the_normalised_mean_of_the_prompt_embeddings(tiny_clip):
    classifier = ColourClassifier(tiny_clip, colours=("red", "blue"))
    red = tiny_clip.embed_texts([t.format(color="red", object="dog") for t in COLOR_TEMPLATES])
    expected = torch.nn.functional.normalize(red.mean(dim=0), dim=-1)
    assert torch.allclose(classifier.colour_embeddings("dog")[0], expected, atol=1e-5)


# --- loading, and the message when the model is missing -----------------------------------------


def test_missing_clip_names_the_metric_the_model_and_the_download(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("WORKBENCH_CLIP_MODEL", raising=False)
    with pytest.raises(ModelNotAvailable) as caught:
        get_colour_classifier()
    message = str(caught.value)
    assert "colour classifier" in message and "'openai/clip-vit-large-patch14'" in message
    assert "`hf download openai/clip-vit-large-patch14`" in message and "WORKBENCH_CLIP_MODEL" in message

    monkeypatch.setenv("WORKBENCH_CLIP_MODEL", str(tmp_path / "my-clip"))
    with pytest.raises(ModelNotAvailable) as caught:
        load_clip(metric="CLIPScore")
    message = str(caught.value)
    assert message.startswith("CLIPScore needs the CLIP model") and str(tmp_path / "my-clip") in message
    assert f"--local-dir {tmp_path / 'my-clip'}" in message


def test_a_clip_folder_without_safetensors_weights_is_refused(tiny_clip_folder, tmp_path):
    import shutil

    folder = tmp_path / "clip-bin"
    shutil.copytree(tiny_clip_folder, folder)
    (folder / "model.safetensors").unlink()
    torch.save({}, folder / "pytorch_model.bin")  # a pickle: never read
    with pytest.raises(ModelNotAvailable, match="has no model.safetensors"):
        load_clip(str(folder), metric="CLIPScore")


def test_colour_classifier_from_the_environment(tiny_clip_folder, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CLIP_MODEL", str(tiny_clip_folder))
    classifier = get_colour_classifier(colours=("red", "blue"), device="cpu")
    assert classifier.clip.name == str(tiny_clip_folder) and classifier.colours == ("red", "blue")
    assert classifier.classify(two_squares(), [(4, 10, 24, 30)], "car")[0] in ("red", "blue")


# --- the groundingdino+clip backend and the benchmark's choice ---------------------------------


def test_groundingdino_clip_backend_wraps_groundingdino_with_the_classifier(tiny_clip_folder, monkeypatch):
    from workbench.perception import backends

    seen = {}

    def fake_groundingdino(**options):
        seen.update(options)
        return FixedDetector([Detection("car", (4, 10, 24, 30), 0.9)])

    monkeypatch.setattr(backends, "_groundingdino", fake_groundingdino)
    monkeypatch.setattr(backends, "_check_groundingdino", lambda **options: None)
    detector = get_detector("groundingdino+clip", clip_model=str(tiny_clip_folder), colours=("red", "blue"),
                            box_threshold=0.4, device="cpu")
    assert isinstance(detector, ColourDetector) and seen == {"box_threshold": 0.4, "device": "cpu"}
    [found] = detector.detect(two_squares())
    assert found.label == "car" and found.color in ("red", "blue")


def test_missing_weights_for_groundingdino_clip_are_named_together(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    for name in ("WORKBENCH_CLIP_MODEL", "WORKBENCH_GROUNDINGDINO_CHECKPOINT", "WORKBENCH_GROUNDINGDINO_TEXT_ENCODER"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ModelNotAvailable) as caught:
        check_backend("detector", "groundingdino+clip")
    message = str(caught.value)
    assert "groundingdino_swint_ogc.pth" in message and "hf download openai/clip-vit-large-patch14" in message
    with pytest.raises(ModelNotAvailable) as loaded:
        get_detector("groundingdino+clip")
    assert str(loaded.value) == message  # the quick check says what loading would

    with pytest.raises(ModelNotAvailable) as eval_check:  # what the Evaluate button answers for sd15
        check_detector(BenchmarkConfig(model="sd15"))
    assert "openai/clip-vit-large-patch14" in str(eval_check.value) and "--detector shapes" in str(eval_check.value)


def test_eval_of_a_real_model_names_every_missing_file_before_generating(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    from workbench.cli import main as cli_main

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    for name in ("WORKBENCH_CLIP_MODEL", "WORKBENCH_GROUNDINGDINO_CHECKPOINT"):
        monkeypatch.delenv(name, raising=False)
    code = cli_main(["eval", "--model", "sd15", "--out", str(tmp_path / "out")])  # ShapesBench asks for colours
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "groundingdino_swint_ogc.pth" in err and "hf download openai/clip-vit-large-patch14" in err
    assert "--detector shapes" in err and not (tmp_path / "out").exists()


def test_real_models_get_colours_only_when_the_prompts_ask_for_them(tmp_path):
    colour = {"tag": "colors", "prompt": "a red car", "include": [{"class": "car", "count": 1, "color": "red"}]}
    plain = {"tag": "single_object", "prompt": "a car", "include": [{"class": "car", "count": 1}]}
    (tmp_path / "colour.jsonl").write_text(json.dumps(plain) + "\n" + json.dumps(colour) + "\n")
    (tmp_path / "plain.jsonl").write_text(json.dumps(plain) + "\n")
    assert detector_name(BenchmarkConfig(model="sd15", prompts=str(tmp_path / "colour.jsonl"))) == "groundingdino+clip"
    assert detector_name(BenchmarkConfig(model="sd15")) == "groundingdino+clip"  # ShapesBench asks for colours
    assert detector_name(BenchmarkConfig(model="sd15", prompts=str(tmp_path / "plain.jsonl"))) == "groundingdino"
    assert detector_name(BenchmarkConfig(model="shapes")) == "shapes"  # the embedded world stays exact
    assert detector_name(BenchmarkConfig(model="sd15", detector="groundingdino")) == "groundingdino"
    with pytest.raises(InvalidInput, match="does not exist"):
        detector_name(BenchmarkConfig(model="sd15", prompts=str(tmp_path / "nope.jsonl")))


# --- CLIPScore -----------------------------------------------------------------------------------


class AngleClip:
    """Embeddings on a circle: a prompt "at N degrees" and an image whose red channel is N sit at angle N."""

    name = "angle-clip"

    @staticmethod
    def _unit(degrees):
        radians = torch.tensor(float(degrees)) * torch.pi / 180
        return torch.stack([torch.cos(radians), torch.sin(radians)])

    def embed_texts(self, texts, batch_size=64):
        return torch.stack([self._unit(text.split()[1]) for text in texts])

    def embed_images(self, images, batch_size=16):
        return torch.stack([self._unit(image.getpixel((0, 0))[0]) for image in images])


def angle_image(degrees):
    return Image.new("RGB", (8, 8), (degrees, 0, 0))


def test_clip_score_is_100_times_the_positive_cosine():
    images = [angle_image(30), angle_image(0), angle_image(0), angle_image(0)]
    prompts = ["at 30 degrees", "at 60 degrees", "at 90 degrees", "at 135 degrees"]
    assert clip_score(images, prompts, AngleClip()) == pytest.approx([100.0, 50.0, 0.0, 0.0], abs=1e-4)
    assert clip_score([], [], AngleClip()) == []
    with pytest.raises(InvalidInput, match="one prompt per image"):
        clip_score(images, prompts[:2], AngleClip())


def test_clip_score_with_tiny_clip_is_bounded_repeatable_and_batch_independent(tiny_clip, tiny_clip_folder):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(40, 30), (64, 64), (20, 50)]]
    images += [images[0]]
    prompts = ["a photo of a red car", "a blue dog", "three green triangles above a purple circle", "a photo of a red car"]
    batched = clip_score(images, prompts, tiny_clip, batch_size=4)
    one_by_one = [clip_score([image], [prompt], tiny_clip)[0] for image, prompt in zip(images, prompts)]
    assert all(0.0 <= score <= 100.0 for score in batched)
    assert batched == pytest.approx(one_by_one, abs=1e-3)
    assert batched[0] == pytest.approx(batched[3], abs=1e-4)  # same image and prompt, same score
    assert clip_score(images[:2], prompts[:2], str(tiny_clip_folder), device="cpu") == pytest.approx(batched[:2], abs=1e-4)
    assert len(set(round(s, 3) for s in batched[:3])) > 1  # the scores do depend on the pair


def test_clip_score_without_the_model_says_what_to_download(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("WORKBENCH_CLIP_MODEL", raising=False)
    with pytest.raises(ModelNotAvailable) as caught:
        clip_score([angle_image(0)], ["a prompt"])
    message = str(caught.value)
    assert message.startswith("CLIPScore needs the CLIP model 'openai/clip-vit-large-patch14'")
    assert "`hf download openai/clip-vit-large-patch14`" in message and "WORKBENCH_CLIP_MODEL" in message


def write_eval_folder(folder, rows):
    """A `workbench eval` output folder: images/<index>/<seed>.png and verdicts.jsonl."""
    lines = []
    for index, (tag, prompt, degrees) in enumerate(rows):
        path = f"images/{index:05d}/0000.png"
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        angle_image(degrees).save(folder / path)
        lines.append(json.dumps({"index": index, "tag": tag, "prompt": prompt, "seed": 0, "path": path, "correct": True}))
    (folder / "verdicts.jsonl").write_text("\n".join(lines) + "\n")


def test_clip_score_for_an_eval_run_writes_the_mean_and_per_tag_table(tmp_path):
    write_eval_folder(tmp_path, [("colors", "at 0 degrees", 0), ("position", "at 60 degrees", 0),
                                 ("colors", "at 90 degrees", 0), ("position", "at 10 degrees", 10)])
    summary = clip_score_for_run(tmp_path, AngleClip(), batch_size=3)
    assert summary == json.loads((tmp_path / "clipscore.json").read_text())
    assert summary["model"] == "angle-clip" and summary["images"] == 4 and "100 * max(cos" in summary["formula"]
    assert summary["mean"] == pytest.approx((100 + 50 + 0 + 100) / 4, abs=1e-3)
    assert list(summary["per_tag"]) == ["colors", "position"]
    assert summary["per_tag"]["colors"] == {"mean": pytest.approx(50.0, abs=1e-3), "images": 2}
    assert summary["per_tag"]["position"] == {"mean": pytest.approx(75.0, abs=1e-3), "images": 2}
    assert [item["path"] for item in summary["per_image"]][1] == "images/00001/0000.png"


def test_clip_score_for_a_folder_that_is_not_an_eval_run_says_so(tmp_path):
    with pytest.raises(InvalidInput, match="has no verdicts.jsonl"):
        clip_score_for_run(tmp_path, AngleClip())
    write_eval_folder(tmp_path, [("colors", "at 0 degrees", 0)])
    (tmp_path / "images/00000/0000.png").unlink()
    with pytest.raises(InvalidInput, match="0000.png is missing"):
        clip_score_for_run(tmp_path, AngleClip())
    assert not (tmp_path / "clipscore.json").exists()


def test_eval_cli_adds_clipscore_or_says_which_clip_to_download(tiny_sd, tmp_path, monkeypatch, capsys):
    from workbench.cli import main as cli_main
    from workbench.tiny_models import build_tiny_clip

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"tag": "single_object", "include": [{"class": "circle", "count": 1}],
                                   "prompt": "a circle"}) + "\n")
    args = ["eval", "--model", str(tiny_sd), "--detector", "shapes", "--prompts", str(prompts), "--seeds", "2",
            "--steps", "2", "--clip-score"]
    monkeypatch.setenv("WORKBENCH_CLIP_MODEL", str(tmp_path / "no-clip-here"))
    assert cli_main(args + ["--out", str(tmp_path / "missing")]) == 2
    assert "hf download" in capsys.readouterr().err
    assert not (tmp_path / "missing" / "scores.json").exists()  # refused before any image was drawn

    monkeypatch.setenv("WORKBENCH_CLIP_MODEL", str(build_tiny_clip(tmp_path / "clip")))
    assert cli_main(args + ["--out", str(tmp_path / "out")]) == 0
    assert "CLIPScore" in capsys.readouterr().out
    scores = json.loads((tmp_path / "out" / "clipscore.json").read_text())
    assert len(scores["per_image"]) == 2 and 0 <= scores["mean"] <= 100
