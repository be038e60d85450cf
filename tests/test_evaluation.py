"""The GenEval-style scorer: its rules on hand-made detections, prompt files and summaries."""

import json

import numpy as np
import pytest

from workbench.errors import InvalidInput
from workbench.evaluation import (
    COUNTING_THRESHOLD,
    POSITION_THRESHOLD,
    THRESHOLD,
    Verdict,
    group_detections,
    load_prompt_file,
    relative_position,
    score_detections,
    summarize,
)
from workbench.perception.base import Detection
from workbench.perception.shapes import ShapesDetector
from workbench.shapes.bench_prompts import shapesbench_prompts
from workbench.shapes.render import render
from workbench.shapes.scene import scene_from_spec


def det(label, x0, y0, size=10.0, score=0.95, color=None):
    return Detection(label, (x0, y0, x0 + size, y0 + size), score, color)


def spec(tag, include, exclude=None):
    record = {"tag": tag, "include": include, "prompt": "p"}
    if exclude:
        record["exclude"] = exclude
    return record


POSITION = spec("position", [{"class": "square", "count": 1}, {"class": "circle", "count": 1, "position": ["left of", 0]}])


# --- GenEval's position rule --------------------------------------------------------------------


def test_geneval_constants():
    assert (THRESHOLD, COUNTING_THRESHOLD, POSITION_THRESHOLD) == (0.3, 0.9, 0.1)


def test_relative_position_basic_directions():
    b = (20, 20, 30, 30)
    assert relative_position((0, 20, 10, 30), b) == {"left of"}
    assert relative_position((40, 20, 50, 30), b) == {"right of"}
    assert relative_position((20, 0, 30, 10), b) == {"above"}
    assert relative_position((20, 40, 30, 50), b) == {"below"}
    assert relative_position((0, 0, 10, 10), b) == {"left of", "above"}  # diagonal: both hold
    assert relative_position(b, b) == set()


def test_relative_position_right_at_the_threshold():
    # Two 10-px boxes side by side at horizontal offset d: the revised offset is d - 0.1 * 20 = d - 2,
    # and "left of" needs (d - 2) / d > 0.5, i.e. d > 4.
    b = (20, 20, 30, 30)

    def shifted_left(d):
        return (20 - d, 20, 30 - d, 30)

    assert relative_position(shifted_left(4.05), b) == {"left of"}
    assert relative_position(shifted_left(3.95), b) == set()
    assert relative_position(shifted_left(2.0), b) == set()  # within the dead zone: no relation at all
    # The shrunk offset is divided by the full offset's length, so a vertical shift v eats into the
    # horizontal share: at d = 6, 4 / sqrt(36 + v^2) > 0.5 needs v < sqrt(28) = 5.29.
    assert relative_position((14, 25.0, 24, 35.0), b) == {"left of"}
    assert relative_position((14, 25.6, 24, 35.6), b) == set()


def test_position_verdicts_on_both_sides_of_the_threshold():
    square = det("square", 20, 20)
    passing = score_detections(POSITION, [square, det("circle", 20 - 4.05, 20)])
    failing = score_detections(POSITION, [square, det("circle", 20 - 3.95, 20)])
    assert passing.correct and passing.requirements["position"] is True
    assert not failing.correct and failing.requirements["position"] is False
    assert failing.requirements["objects"] and failing.requirements["counts"]
    assert "expected circle left of target" in failing.reasons[0]
    wrong_side = score_detections(POSITION, [square, det("circle", 40, 20)])
    assert not wrong_side.correct and "right of" in wrong_side.reasons[0]


def test_position_uses_only_the_most_confident_object_and_needs_its_target():
    # The best circle is on the wrong side; a weaker one on the right side does not help.
    dets = [det("square", 20, 20), det("circle", 40, 20, score=0.9), det("circle", 0, 20, score=0.8)]
    assert not score_detections(POSITION, dets).correct
    no_target = score_detections(POSITION, [det("circle", 0, 20)])
    assert not no_target.correct
    assert no_target.requirements == {"objects": False, "counts": False, "colors": None, "position": False}


# --- counts, thresholds, exclude ----------------------------------------------------------------

COUNT_THREE = spec("counting", [{"class": "circle", "count": 3}], [{"class": "circle", "count": 4}])


def circles(n, score=0.95):
    return [det("circle", 15 * i, 0, score=score) for i in range(n)]


def test_counting_is_exact_through_the_exclude_clause():
    assert score_detections(COUNT_THREE, circles(3)).correct
    too_many = score_detections(COUNT_THREE, circles(4))
    assert not too_many.correct and too_many.requirements["counts"] is False
    assert too_many.reasons == ["expected circle<4, found 4"]
    too_few = score_detections(COUNT_THREE, circles(2))
    assert not too_few.correct and too_few.reasons == ["expected circle>=3, found 2"]
    # Without the exclude clause (GenEval's other tasks), extra objects do no harm.
    assert score_detections(spec("two_object", [{"class": "circle", "count": 3}]), circles(4)).correct


def test_counting_prompts_use_the_stricter_threshold():
    assert not score_detections(COUNT_THREE, circles(3, score=0.85)).correct
    assert score_detections(spec("two_object", [{"class": "circle", "count": 3}]), circles(3, score=0.85)).correct
    # A low-confidence fourth circle does not break an exact count of three...
    assert score_detections(COUNT_THREE, circles(3) + [det("circle", 50, 40, score=0.5)]).correct
    # ...and thresholds are strict: a score equal to the threshold does not count.
    assert not score_detections(spec("single_object", [{"class": "circle", "count": 1}]), circles(1, score=0.3)).correct
    assert score_detections(COUNT_THREE, circles(3, score=0.5), counting_threshold=0.4).correct


def test_missing_class_fails_objects_and_counts():
    verdict = score_detections(spec("two_object", [{"class": "circle", "count": 1}, {"class": "square", "count": 1}]), circles(1))
    assert isinstance(verdict, Verdict)
    assert not verdict.correct
    assert verdict.requirements == {"objects": False, "counts": False, "colors": None, "position": None}
    assert verdict.reasons == ["expected square>=1, found 0"]


def test_labels_match_class_names_case_insensitively():
    dets = [Detection("Circle", (0, 0, 10, 10), 0.9, "red")]
    assert score_detections(spec("single_object", [{"class": "circle", "count": 1}]), dets).correct


# --- colours ------------------------------------------------------------------------------------


def test_colour_mismatch_fails_only_the_colour_requirement():
    colors = spec("colors", [{"class": "circle", "count": 1, "color": "blue"}])
    assert score_detections(colors, [det("circle", 0, 0, color="blue")]).correct
    wrong = score_detections(colors, [det("circle", 0, 0, color="red")])
    assert not wrong.correct
    assert wrong.requirements == {"objects": True, "counts": True, "colors": False, "position": None}
    assert wrong.reasons == ["expected blue circle>=1, found 0 blue; and 1 red"]


def test_colour_is_judged_on_the_most_confident_objects_only():
    colors = spec("colors", [{"class": "circle", "count": 1, "color": "blue"}])
    dets = [det("circle", 0, 0, score=0.95, color="red"), det("circle", 20, 0, score=0.9, color="blue")]
    assert not score_detections(colors, dets).correct


def test_colour_attribution_needs_both_bindings():
    attr = spec("color_attr", [{"class": "circle", "count": 1, "color": "red"}, {"class": "square", "count": 1, "color": "blue"}])
    assert score_detections(attr, [det("circle", 0, 0, color="red"), det("square", 20, 0, color="blue")]).correct
    swapped = score_detections(attr, [det("circle", 0, 0, color="blue"), det("square", 20, 0, color="red")])
    assert not swapped.correct and len(swapped.reasons) == 2


def test_colour_failure_skips_the_position_check_like_geneval():
    circle = {"class": "circle", "count": 1, "color": "red", "position": ["left of", 0]}
    record = spec("position", [{"class": "square", "count": 1}, circle])
    verdict = score_detections(record, [det("square", 20, 20), det("circle", 0, 20, color="blue")])
    assert not verdict.correct and len(verdict.reasons) == 1
    assert verdict.requirements["colors"] is False and verdict.requirements["position"] is False


def test_nms_is_off_by_default_and_available():
    dets = [det("circle", 0, 0), det("circle", 1, 0, score=0.9)]
    assert len(group_detections(dets, 0.3)["circle"]) == 2
    assert len(group_detections(dets, 0.3, nms_threshold=0.5)["circle"]) == 1


# --- end to end on the shapes world -------------------------------------------------------------


def test_rendered_shapesbench_scenes_are_judged_correct_and_mismatches_are_not():
    rng = np.random.default_rng(0)
    detector = ShapesDetector()
    records = shapesbench_prompts()
    verdicts = [score_detections(r, detector.detect(render(scene_from_spec(r, rng)))) for r in records]
    assert np.mean([v.correct for v in verdicts]) >= 0.98
    # The same images judged against another record of the same tag are mostly wrong.
    shifted = [
        score_detections(records[i + 1], detector.detect(render(scene_from_spec(records[i], rng))))
        for i in range(0, len(records) - 1)
        if records[i]["tag"] == records[i + 1]["tag"] and records[i]["include"] != records[i + 1]["include"]
        and records[i]["tag"] in ("colors", "position", "color_attr", "counting")
    ]
    assert np.mean([v.correct for v in shifted]) < 0.2


# --- prompt files -------------------------------------------------------------------------------

GOOD = {"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}], "prompt": "a red circle"}


def write_lines(tmp_path, lines):
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_load_prompt_file_reads_geneval_metadata(tmp_path):
    include = [{"class": "square", "count": 1}, {"class": "circle", "count": 1, "position": ["above", 0]}]
    position = {"tag": "position", "include": include, "prompt": "a circle above a square"}
    path = write_lines(tmp_path, [json.dumps(GOOD), "", json.dumps(position)])
    assert load_prompt_file(path) == [GOOD, position]


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"tag": "colors", "include": [', "not valid JSON"),
        ('["a", "list"]', "expected a JSON object"),
        ('{"include": [{"class": "circle", "count": 1}], "prompt": "a circle"}', '"tag"'),
        ('{"tag": "x", "include": [{"class": "circle", "count": 1}]}', '"prompt"'),
        ('{"tag": "x", "include": [], "prompt": "p"}', '"include"'),
        ('{"tag": "x", "include": [{"class": "circle", "count": 0}], "prompt": "p"}', "count"),
        ('{"tag": "x", "include": [{"count": 1}], "prompt": "p"}', '"class"'),
        (
            '{"tag": "x", "include": [{"class": "circle", "count": 1, "position": ["left of", 0]}], "prompt": "p"}',
            "earlier include",
        ),
        (
            '{"tag": "x", "include": [{"class": "a", "count": 1}, {"class": "b", "count": 1, "position": ["near", 0]}],'
            ' "prompt": "p"}',
            "near",
        ),
        ('{"tag": "x", "include": [{"class": "a", "count": 1}], "exclude": {"class": "a"}, "prompt": "p"}', '"exclude"'),
    ],
)
def test_malformed_prompt_file_names_the_line(tmp_path, bad_line, message):
    path = write_lines(tmp_path, [json.dumps(GOOD), json.dumps(GOOD), bad_line, json.dumps(GOOD)])
    with pytest.raises(InvalidInput) as error:
        load_prompt_file(path)
    assert "line 3" in str(error.value)
    assert message in str(error.value)


def test_missing_or_empty_prompt_file_is_invalid_input(tmp_path):
    with pytest.raises(InvalidInput, match="does not exist"):
        load_prompt_file(tmp_path / "nope.jsonl")
    with pytest.raises(InvalidInput, match="no prompts"):
        load_prompt_file(write_lines(tmp_path, ["", "  "]))


# --- summaries ----------------------------------------------------------------------------------


def test_summary_overall_is_the_mean_of_per_tag_accuracies():
    rows = (
        [{"tag": "counting", "prompt": f"c{i % 2}", "correct": i == 0} for i in range(4)]  # 1/4
        + [{"tag": "colors", "prompt": "k", "correct": True}]  # 1/1
    )
    summary = summarize(rows)
    assert summary["per_tag"]["counting"] == {"correct": 1, "total": 4, "accuracy": 0.25}
    assert summary["per_tag"]["colors"]["accuracy"] == 1.0
    assert summary["overall"] == pytest.approx(0.625)  # not 2/5, the per-image mean
    assert summary["image_accuracy"] == pytest.approx(0.4)
    assert summary["prompts"] == 3 and summary["prompt_accuracy"] == pytest.approx(2 / 3)
    assert list(summary["per_tag"]) == ["counting", "colors"]
    assert summarize([])["overall"] is None
