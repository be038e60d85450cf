"""The embedded shapes perception: detector, segmenter, tagger and captioner."""

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from workbench.perception import Captioner, Detection, Detector, Segmenter, Tag, Tagger
from workbench.perception.shapes import (
    ShapesCaptioner,
    ShapesDetector,
    ShapesSegmenter,
    ShapesTagger,
    box_iou,
    connected_components,
    match_scene,
)
from workbench.shapes.captions import long_caption, short_caption
from workbench.shapes.render import render, render_array
from workbench.shapes.scene import Scene, ShapeObject, sample_scene
from workbench.shapes.world import BACKGROUND_RGB, COLOR_RGB

DETECTOR = ShapesDetector()


def sampled(seed, n, **kwargs):
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, **kwargs) for _ in range(n)]


def one(shape, color="red", cx=32.0, cy=32.0, size=18.0):
    return Scene((ShapeObject(shape, color, cx, cy, size),))


def draw_at_4x(draw_fn, color="blue") -> Image.Image:
    """An odd object drawn with PIL at 256 px and box-downsampled, like the renderer does."""
    image = Image.new("RGB", (256, 256), BACKGROUND_RGB)
    draw_fn(ImageDraw.Draw(image), COLOR_RGB[color])
    return image.resize((64, 64), Image.BOX)


def test_backends_implement_the_protocols():
    assert isinstance(ShapesDetector(), Detector)
    assert isinstance(ShapesSegmenter(), Segmenter)
    assert isinstance(ShapesTagger(), Tagger)
    assert isinstance(ShapesCaptioner(), Captioner)


def test_detection_round_trips_through_a_dict():
    det = Detection("circle", (1.0, 2.0, 3.0, 4.0), 0.5, "red")
    assert det.to_dict() == {"label": "circle", "box": [1.0, 2.0, 3.0, 4.0], "score": 0.5, "color": "red"}
    assert Detection.from_dict(det.to_dict()) == det


def test_connected_components_separates_blobs_and_joins_diagonals():
    mask = np.zeros((8, 8), bool)
    mask[0:2, 0:2] = True
    mask[2, 2] = True  # touches the first blob diagonally: 8-connected
    mask[5:8, 5] = True
    mask[0, 7] = True
    labels, n = connected_components(mask)
    assert n == 3
    assert labels[0, 0] == labels[2, 2] != labels[6, 5]
    assert (labels[~mask] == -1).all()


@pytest.mark.parametrize("shape", ["circle", "square", "triangle"])
@pytest.mark.parametrize("color", ["red", "green", "blue", "yellow", "purple", "orange"])
def test_detector_finds_each_shape_and_colour(shape, color):
    scene = one(shape, color, 30.4, 33.7, 14.0)
    (det,) = DETECTOR.detect(render(scene))
    assert (det.label, det.color) == (shape, color)
    assert det.score > 0.95
    assert box_iou(det.box, scene.objects[0].box) > 0.9


def test_detector_recovers_at_least_98_percent_of_scenes_exactly():
    results = [match_scene(scene, DETECTOR.detect(render(scene))) for scene in sampled(100, 200)]
    exact = np.mean([ok for ok, _ in results])
    ious = [iou for _, scene_ious in results for iou in scene_ious]
    assert exact >= 0.98
    assert np.mean(ious) >= 0.9


def test_detections_are_sorted_scored_and_inside_the_image():
    for scene in sampled(101, 30):
        dets = DETECTOR.detect(render(scene))
        assert [d.score for d in dets] == sorted((d.score for d in dets), reverse=True)
        for d in dets:
            assert 0.0 <= d.score <= 1.0
            x0, y0, x1, y1 = d.box
            assert -1 <= x0 < x1 <= 65 and -1 <= y0 < y1 <= 65


def test_match_scene_rejects_wrong_colour_or_missing_objects():
    scene = Scene((ShapeObject("circle", "red", 15, 15, 14), ShapeObject("square", "blue", 45, 45, 14)))
    dets = DETECTOR.detect(render(scene))
    assert match_scene(scene, dets)[0]
    recoloured = [Detection(d.label, d.box, d.score, "green" if d.label == "circle" else d.color) for d in dets]
    assert not match_scene(scene, recoloured)[0]
    assert not match_scene(scene, dets[:1])[0]


def test_labels_filter_detections():
    scene = Scene((
        ShapeObject("circle", "red", 12, 12, 14),
        ShapeObject("square", "red", 50, 12, 14),
        ShapeObject("square", "blue", 30, 50, 14),
    ))
    image = render(scene)
    assert {(d.label, d.color) for d in DETECTOR.detect(image, labels=["circle"])} == {("circle", "red")}
    assert {(d.label, d.color) for d in DETECTOR.detect(image, labels=["red squares"])} == {("square", "red")}
    either = DETECTOR.detect(image, labels=["a blue square", "circle"])
    assert {(d.label, d.color) for d in either} == {("square", "blue"), ("circle", "red")}
    assert len(DETECTOR.detect(image, labels=["red"])) == 2
    assert DETECTOR.detect(image, labels=["dog"]) == []


def test_specks_and_empty_images_give_no_detections():
    blank = Image.new("RGB", (64, 64), BACKGROUND_RGB)
    assert DETECTOR.detect(blank) == []
    speck = np.asarray(blank).copy()
    speck[30:32, 30:32] = COLOR_RGB["red"]
    assert DETECTOR.detect(Image.fromarray(speck)) == []


def test_clean_shapes_score_high_and_garbled_blobs_score_low():
    clean = [DETECTOR.detect(render(one(s)))[0].score for s in ("circle", "square", "triangle")]
    assert min(clean) > 0.95

    def ring(d, c):
        d.ellipse([88, 88, 168, 168], fill=c)
        d.ellipse([108, 108, 148, 148], fill=BACKGROUND_RGB)

    def merged(d, c):  # a circle and a square of one colour run together
        d.ellipse([60, 100, 120, 160], fill=c)
        d.rectangle([116, 100, 176, 160], fill=c)

    def flat_rectangle(d, c):
        d.rectangle([70, 110, 190, 150], fill=c)

    for draw_fn in (ring, merged, flat_rectangle):
        dets = DETECTOR.detect(draw_at_4x(draw_fn))
        assert all(d.score < 0.3 for d in dets), (draw_fn.__name__, dets)


def test_blur_lowers_the_score_gradually():
    image = render(one("square", "green", size=16))
    blurred = [image] + [image.filter(ImageFilter.GaussianBlur(radius)) for radius in (1.2, 2.5)]
    scores = [DETECTOR.detect(im)[0].score for im in blurred]
    assert scores[0] > scores[1] > scores[2]
    assert scores[2] < 0.5


def test_detector_tolerates_generative_noise_and_colour_drift():
    rng = np.random.default_rng(7)
    scenes = sampled(102, 60)
    exact = 0
    for scene in scenes:
        pixels = render_array(scene)
        pixels = pixels + rng.normal(0, 8, pixels.shape) + rng.normal(0, 10, 3)  # grain and a tint
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
        exact += match_scene(scene, [d for d in DETECTOR.detect(image) if d.score > 0.3])[0]
    assert exact / len(scenes) >= 0.95


def test_touching_objects_of_different_colours_are_split():
    draw = Image.new("RGB", (256, 256), BACKGROUND_RGB)
    d = ImageDraw.Draw(draw)
    d.rectangle([60, 100, 120, 160], fill=COLOR_RGB["red"])
    d.rectangle([120, 100, 180, 160], fill=COLOR_RGB["blue"])
    image = draw.resize((64, 64), Image.BOX)
    dets = DETECTOR.detect(image)
    assert sorted((d.label, d.color) for d in dets) == [("square", "blue"), ("square", "red")]


def test_detector_works_on_other_image_sizes():
    scene = Scene((ShapeObject("triangle", "orange", 40, 80, 36), ShapeObject("circle", "purple", 90, 30, 30)), 128, 128)
    assert match_scene(scene, DETECTOR.detect(render(scene)))[0]


def test_segmenter_returns_the_objects_pixels():
    scene = Scene((ShapeObject("circle", "red", 16, 16, 20), ShapeObject("square", "blue", 46, 46, 16)))
    image = render(scene)
    masks = ShapesSegmenter().segment(image, [o.box for o in scene.objects])
    assert len(masks) == 2
    for mask, obj in zip(masks, scene.objects):
        assert mask.shape == (64, 64) and mask.dtype == bool
        expected = obj.size**2 * (np.pi / 4 if obj.shape == "circle" else 1.0)
        assert mask.sum() == pytest.approx(expected, rel=0.08)
        ys, xs = np.nonzero(mask)
        assert obj.box[0] - 1 <= xs.min() and xs.max() <= obj.box[2] + 1
    assert not (masks[0] & masks[1]).any()
    empty = ShapesSegmenter().segment(image, [(0, 40, 10, 60)])[0]
    assert not empty.any()


def test_tagger_reports_shapes_colours_and_pairs():
    scene = Scene((ShapeObject("circle", "red", 15, 15, 14), ShapeObject("triangle", "yellow", 45, 45, 16)))
    tags = ShapesTagger().tag(render(scene))
    assert all(isinstance(t, Tag) and 0 <= t.score <= 1 for t in tags)
    names = {t.name for t in tags}
    assert names == {"circle", "triangle", "red", "yellow", "red circle", "yellow triangle"}


def test_captioner_writes_the_scenes_captions():
    scene = Scene((
        ShapeObject("circle", "red", 12, 20, 12),
        ShapeObject("circle", "red", 14, 48, 12),
        ShapeObject("square", "blue", 46, 32, 14),
    ))
    image = render(scene)
    captioner = ShapesCaptioner()
    assert captioner.caption(image) == short_caption(scene) == "two red circles and a blue square"
    assert captioner.caption(image, mode="long") == long_caption(scene)
    with pytest.raises(ValueError):
        captioner.caption(image, mode="poem")


def test_captioner_agrees_with_the_exact_captions_on_most_scenes():
    scenes = sampled(103, 100)
    captioner = ShapesCaptioner()
    agree = np.mean([captioner.caption(render(s), "short") == short_caption(s) for s in scenes])
    assert agree >= 0.98
