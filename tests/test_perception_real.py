"""Real perception backends (GroundingDINO, SAM, Grounded-SAM) on tiny random models, offline.

The tiny models are saved the way the released files are (a config .py, a {"model": ...} checkpoint,
a BERT folder; a plain SAM state_dict) and read back through the same loading code.
"""

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from workbench.cli import main as cli_main
from workbench.errors import InvalidInput, ModelNotAvailable
from workbench.perception.backends import check_backend, get_detector, get_segmenter, get_tagger
from workbench.perception.base import Detection, Detector, Segmenter
from workbench.perception.checkpoints import load_state_dict
from workbench.perception.coco import COCO_CLASSES
from workbench.perception.grounded_sam import GroundedSam
from workbench.perception.groundingdino import GroundingDinoDetector, caption_spans
from workbench.perception.sam import SamSegmenter
from workbench.perception.shapes import ShapesDetector, ShapesSegmenter, ShapesTagger
from workbench.shapes.render import render
from workbench.shapes.scene import Scene, ShapeObject
from workbench.tiny_models import build_tiny_groundingdino, build_tiny_sam, tiny_sam_architecture

# Tiny models see small images; the released ones resize to 800 (GroundingDINO) and 1024 (SAM).
SMALL = {"image_size": 64, "max_size": 128}


@pytest.fixture(scope="module")
def tiny_gd(tmp_path_factory):
    return build_tiny_groundingdino(tmp_path_factory.mktemp("gd"))


@pytest.fixture(scope="module")
def detector(tiny_gd):
    config, checkpoint, bert = tiny_gd
    # Thresholds 0: a random model's scores say nothing, but every query then comes back.
    return GroundingDinoDetector(config, checkpoint, text_encoder=str(bert), box_threshold=0.0,
                                 text_threshold=0.0, nms_iou=None, device="cpu", **SMALL)


@pytest.fixture(scope="module")
def tiny_sam(tmp_path_factory):
    return build_tiny_sam(tmp_path_factory.mktemp("sam"))


@pytest.fixture(scope="module")
def segmenter(tiny_sam):
    return SamSegmenter(tiny_sam, architecture=tiny_sam_architecture(), device="cpu")


def noise_image(width=72, height=48, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def assert_valid_detections(detections, width, height, allowed_labels):
    assert detections and all(isinstance(d, Detection) for d in detections)
    scores = [d.score for d in detections]
    assert scores == sorted(scores, reverse=True) and all(0.0 <= s <= 1.0 for s in scores)
    for d in detections:
        x0, y0, x1, y1 = d.box
        assert 0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height
        assert d.label in allowed_labels


# --- GroundingDINO ------------------------------------------------------------------------------


def test_caption_is_built_the_groundingdino_way():
    caption, spans = caption_spans(["cat", "traffic light"])
    assert caption == "cat . traffic light ."
    assert [caption[a:b] for a, b in spans] == ["cat", "traffic light"]


def test_groundingdino_loads_the_checkpoint_and_detects_the_given_labels(tiny_gd, detector):
    assert isinstance(detector, Detector)
    saved = torch.load(tiny_gd[1], weights_only=True)["model"]
    loaded = detector.model.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in saved.items())  # the file's weights, not random ones

    detections = detector.detect(noise_image(), ["cat", "Dog"])
    assert_valid_detections(detections, 72, 48, {"cat", "Dog"})  # labels come back as the caller wrote them
    assert len(detections) <= 20  # one per query of the tiny model at most


def test_groundingdino_reads_labels_scores_and_pixel_boxes_off_the_model_output(detector, monkeypatch):
    """Post-processing on a scripted model output: caption "cat . dog ." is [CLS] cat . dog . [SEP]."""
    raw = torch.full((1, 5, 256), float("-inf"))
    raw[0, :, :6] = -10.0
    raw[0, 0, 3] = 2.0  # query 0 matches "dog" (score 0.88)
    raw[0, 1, 1] = 0.0  # query 1 matches "cat" (score 0.5)
    raw[0, 2, 2] = 5.0  # query 2 matches only the "." separator: no label
    raw[0, 3, 1] = -2.0  # query 3 matches "cat" below the box threshold (0.12 < 0.35)
    raw[0, 4, 3] = 1.0  # query 4: "dog" near the right edge, its box runs past it
    boxes = torch.tensor([[[0.5, 0.5, 0.5, 0.5], [0.25, 0.5, 0.2, 0.4], [0.5, 0.5, 0.1, 0.1],
                           [0.5, 0.5, 0.1, 0.1], [0.95, 0.5, 0.3, 0.2]]])
    captions = []

    def scripted(pixels, captions_arg):
        captions.append(captions_arg)
        return {"pred_logits": raw, "pred_boxes": boxes}

    monkeypatch.setattr(detector, "model", lambda pixels, captions: scripted(pixels, captions))
    monkeypatch.setattr(detector, "box_threshold", 0.35)
    monkeypatch.setattr(detector, "text_threshold", 0.25)
    found = detector.detect(noise_image(100, 50), ["Cat", "dog."])
    assert captions == [["cat . dog ."]]
    assert [(d.label, round(d.score, 3)) for d in found] == [("dog.", 0.881), ("dog.", 0.731), ("Cat", 0.5)]
    assert found[0].box == pytest.approx((25.0, 12.5, 75.0, 37.5))
    assert found[1].box == pytest.approx((80.0, 20.0, 100.0, 30.0))  # clamped to the image
    assert found[2].box == pytest.approx((15.0, 15.0, 35.0, 35.0))


def test_groundingdino_defaults_to_the_coco_classes(detector):
    assert len(COCO_CLASSES) == 80 and "traffic light" in COCO_CLASSES
    assert_valid_detections(detector.detect(noise_image(seed=1)), 72, 48, set(COCO_CLASSES))


def test_groundingdino_thresholds_and_duplicate_suppression_filter(tiny_gd):
    config, checkpoint, bert = tiny_gd
    strict = GroundingDinoDetector(config, checkpoint, text_encoder=str(bert), box_threshold=1.0, device="cpu", **SMALL)
    assert strict.detect(noise_image(), ["cat"]) == []  # sigmoid scores never exceed 1
    merged = GroundingDinoDetector(config, checkpoint, text_encoder=str(bert), box_threshold=0.0,
                                   text_threshold=0.0, nms_iou=0.0, device="cpu", **SMALL)
    detections = merged.detect(noise_image(), ["cat"])
    assert detections  # NMS at IoU 0 keeps only boxes that do not overlap a better "cat" at all
    for i, a in enumerate(detections):
        for b in detections[i + 1:]:
            overlap_w = min(a.box[2], b.box[2]) - max(a.box[0], b.box[0])
            overlap_h = min(a.box[3], b.box[3]) - max(a.box[1], b.box[1])
            assert overlap_w <= 0 or overlap_h <= 0


def test_groundingdino_checkpoint_that_does_not_fit_the_config_is_named(tiny_gd, tmp_path):
    config, checkpoint, bert = tiny_gd
    state = torch.load(checkpoint, weights_only=True)["model"]
    del state["transformer.tgt_embed.weight"]
    torch.save({"model": state, "args": argparse.Namespace(lr=1e-4)}, tmp_path / "partial.pth")  # args: as in training
    with pytest.raises(ModelNotAvailable, match="does not fit the config") as caught:
        GroundingDinoDetector(config, tmp_path / "partial.pth", text_encoder=str(bert), device="cpu")
    assert "transformer.tgt_embed.weight" in str(caught.value)


def test_groundingdino_from_the_environment_through_the_backend_table(tiny_gd, monkeypatch):
    config, checkpoint, bert = tiny_gd
    monkeypatch.setenv("WORKBENCH_GROUNDINGDINO_CONFIG", str(config))
    monkeypatch.setenv("WORKBENCH_GROUNDINGDINO_CHECKPOINT", str(checkpoint))
    monkeypatch.setenv("WORKBENCH_GROUNDINGDINO_TEXT_ENCODER", str(bert))
    check_backend("detector", "groundingdino")  # everything is there: no error
    detector = get_detector("groundingdino", box_threshold=0.0, text_threshold=0.0, device="cpu", **SMALL)
    assert isinstance(detector, GroundingDinoDetector) and detector.checkpoint_path == checkpoint
    assert_valid_detections(detector.detect(noise_image(), ["dog"]), 72, 48, {"dog"})


def test_missing_groundingdino_files_give_one_message_with_what_to_download(data_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    for name in ("CONFIG", "CHECKPOINT", "TEXT_ENCODER"):
        monkeypatch.delenv(f"WORKBENCH_GROUNDINGDINO_{name}", raising=False)
    with pytest.raises(ModelNotAvailable) as caught:
        get_detector("groundingdino")
    message = str(caught.value)
    assert str(data_dir / "weights" / "groundingdino" / "groundingdino_swint_ogc.pth") in message
    assert "hf download ShilongLiu/GroundingDINO groundingdino_swint_ogc.pth" in message
    assert "IDEA-Research/GroundingDINO" in message and "WORKBENCH_GROUNDINGDINO_CHECKPOINT" in message
    assert "hf download bert-base-uncased" in message  # the text encoder is missing too, in the same message
    assert "2 required file(s)" in message and "GroundingDINO config:" not in message  # groundingdino-py ships it
    with pytest.raises(ModelNotAvailable) as checked:
        check_backend("detector", "groundingdino")
    assert str(checked.value) == message  # the quick check says exactly what loading would


def test_missing_config_and_text_folder_are_named_with_their_paths(tmp_path):
    with pytest.raises(ModelNotAvailable) as caught:
        GroundingDinoDetector(tmp_path / "nope.py", tmp_path / "nope.pth", text_encoder=str(tmp_path / "bert"))
    message = str(caught.value)
    assert "3 required file(s)" in message
    for path in ("nope.py", "nope.pth", str(tmp_path / "bert")):
        assert path in message


def test_a_text_encoder_folder_without_weights_is_missing_for_the_quick_check_too(tmp_path, tiny_gd):
    import shutil

    config, checkpoint, bert = tiny_gd
    partial = tmp_path / "bert-config-only"
    partial.mkdir()
    shutil.copy(Path(bert) / "config.json", partial / "config.json")  # an interrupted download
    with pytest.raises(ModelNotAvailable, match="no weights"):
        GroundingDinoDetector(config, checkpoint, text_encoder=str(partial), device="cpu", **SMALL)


def test_eval_of_a_real_model_asks_for_the_groundingdino_weights(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORKBENCH_GROUNDINGDINO_CHECKPOINT", raising=False)
    code = cli_main(["eval", "--model", "sd15", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "groundingdino_swint_ogc.pth" in err and "--detector shapes" in err
    assert not (tmp_path / "o").exists()


# --- checkpoints are read as tensors only -------------------------------------------------------


class _Trap:
    """Unpickling this would create a file: a stand-in for code hidden in a checkpoint."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_checkpoints_with_pickled_code_are_refused_and_not_run(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"model": {"w": torch.zeros(2)}, "trap": _Trap(marker)}, tmp_path / "evil.pth")
    with pytest.raises(ModelNotAvailable, match="holds pickled objects besides tensors") as caught:
        load_state_dict(tmp_path / "evil.pth", "test checkpoint", key="model")
    assert not marker.exists()
    assert "weights_only=False" in str(caught.value)  # says how to convert a file one trusts

    (tmp_path / "page.pth").write_text("<html>404</html>")
    with pytest.raises(ModelNotAvailable, match="not a PyTorch checkpoint"):
        load_state_dict(tmp_path / "page.pth", "test checkpoint")


# --- SAM ----------------------------------------------------------------------------------------


def test_sam_loads_the_checkpoint_and_gives_one_boolean_mask_per_box(tiny_sam, segmenter):
    assert isinstance(segmenter, Segmenter)
    saved = torch.load(tiny_sam, weights_only=True)
    loaded = segmenter.predictor.model.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in saved.items())

    image = noise_image(56, 40)
    masks = segmenter.segment(image, [(2.0, 3.0, 30.0, 20.0), (10.0, 10.0, 55.0, 39.0), (0, 0, 56, 40)])
    assert len(masks) == 3
    for mask in masks:
        assert isinstance(mask, np.ndarray) and mask.dtype == bool and mask.shape == (40, 56)
    assert segmenter.segment(image, []) == []


def test_sam_checkpoint_of_another_size_is_named(tiny_sam):
    with pytest.raises(ModelNotAvailable, match="does not fit model type 'vit_b'") as caught:
        SamSegmenter(tiny_sam, model_type="vit_b", device="cpu")  # a tiny file for the real vit_b
    assert "WORKBENCH_SAM_MODEL_TYPE" in str(caught.value)


def test_missing_sam_checkpoint_says_what_to_download(data_dir, monkeypatch):
    monkeypatch.delenv("WORKBENCH_SAM_CHECKPOINT", raising=False)
    monkeypatch.delenv("WORKBENCH_SAM_MODEL_TYPE", raising=False)
    with pytest.raises(ModelNotAvailable) as caught:
        get_segmenter("sam")
    message = str(caught.value)
    assert str(data_dir / "weights" / "sam" / "sam_vit_b_01ec64.pth") in message
    assert "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth" in message

    monkeypatch.setenv("WORKBENCH_SAM_MODEL_TYPE", "vit_h")
    with pytest.raises(ModelNotAvailable, match="sam_vit_h_4b8939.pth"):
        get_segmenter("sam")
    monkeypatch.setenv("WORKBENCH_SAM_MODEL_TYPE", "vit_x")
    with pytest.raises(InvalidInput, match="vit_b, vit_l, vit_h"):
        get_segmenter("sam")

    monkeypatch.setenv("WORKBENCH_SAM_MODEL_TYPE", "vit_b")
    (data_dir / "weights" / "sam").mkdir(parents=True)
    monkeypatch.setenv("WORKBENCH_SAM_CHECKPOINT", str(data_dir / "weights" / "sam"))  # the folder, not the file
    with pytest.raises(ModelNotAvailable, match="is a folder; point the setting at the file inside it"):
        get_segmenter("sam")


def test_sam_from_the_environment(tiny_sam, monkeypatch):
    monkeypatch.setenv("WORKBENCH_SAM_CHECKPOINT", str(tiny_sam))
    segmenter = get_segmenter("sam", architecture=tiny_sam_architecture(), device="cpu")
    assert isinstance(segmenter, SamSegmenter) and segmenter.checkpoint_path == tiny_sam


# --- Grounded-SAM and the backend tables -------------------------------------------------------


def test_grounded_sam_pairs_each_detection_with_a_full_size_mask(detector, segmenter):
    image = noise_image(64, 40, seed=2)
    results = GroundedSam(detector, segmenter).detect_and_segment(image, ["cat"])
    assert results and [r.detection for r in results] == detector.detect(image, ["cat"])
    assert all(r.mask.shape == (40, 64) and r.mask.dtype == bool for r in results)


def test_grounded_sam_with_the_shapes_backends_masks_each_object():
    scene = Scene((ShapeObject("circle", "red", 18.0, 20.0, 16.0), ShapeObject("square", "blue", 44.0, 42.0, 14.0)))
    results = GroundedSam(get_detector("shapes"), get_segmenter("shapes")).detect_and_segment(render(scene))
    assert sorted(r.detection.label for r in results) == ["circle", "square"]
    for r in results:
        ys, xs = np.nonzero(r.mask)
        x0, y0, x1, y1 = r.detection.box
        assert len(xs) > 50 and x0 - 1 <= xs.min() and xs.max() <= x1 + 1 and y0 - 1 <= ys.min() <= ys.max() <= y1 + 1


def test_backends_are_chosen_by_name():
    assert isinstance(get_detector("shapes"), ShapesDetector)
    assert isinstance(get_segmenter("shapes"), ShapesSegmenter)
    assert isinstance(get_tagger("shapes"), ShapesTagger)
    assert get_detector("shapes", min_score=0.9).min_score == 0.9  # options reach the backend
    with pytest.raises(InvalidInput, match="shapes, groundingdino"):
        get_detector("yolo")
    with pytest.raises(InvalidInput, match="Unknown segmenter backend 'groundingdino'"):
        check_backend("segmenter", "groundingdino")
    check_backend("detector", "shapes")


def test_bert_shim_matches_bert_and_keeps_phrases_apart(tiny_gd):
    """The transformers-5 stand-in for groundingdino-py's BertModelWarper computes what BERT computes."""
    from workbench.perception.groundingdino import _BertWrapper, load_text_encoder

    tokenizer, bert = load_text_encoder(str(tiny_gd[2]))
    bert.eval()
    wrapper = _BertWrapper(bert)
    ids = torch.tensor([tokenizer("cat . red dog .")["input_ids"]])
    padding = torch.ones_like(ids)
    assert torch.allclose(wrapper(input_ids=ids, attention_mask=padding).last_hidden_state,
                          bert(input_ids=ids, attention_mask=padding).last_hidden_state, atol=1e-5)

    # GroundingDINO's per-phrase mask: tokens attend only within their own phrase.
    n = ids.shape[1]
    blocks = torch.zeros(1, n, n, dtype=torch.bool)
    blocks[0, :3, :3] = True
    blocks[0, 3:, 3:] = True
    changed = ids.clone()
    changed[0, 4] = tokenizer.convert_tokens_to_ids("blue")
    first = wrapper(input_ids=ids, attention_mask=blocks).last_hidden_state
    second = wrapper(input_ids=changed, attention_mask=blocks).last_hidden_state
    assert torch.allclose(first[0, :3], second[0, :3], atol=1e-6)  # "[CLS] cat ." did not see "dog" -> "blue"
    assert not torch.allclose(first[0, 3:], second[0, 3:])
