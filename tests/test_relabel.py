"""IPR's relabeler: prompts rewritten to what the detections show, in agreement with GenEval's scorer."""

import json
import subprocess
import sys

import numpy as np
import pytest

from workbench.cli import main
from workbench.errors import InvalidInput
from workbench.evaluation import score_detections
from workbench.perception.base import Detection
from workbench.perception.shapes import ShapesDetector
from workbench.prompt_parser import framing, infer_tag, parse_prompt
from workbench.relabel import RelabelResult, relabel
from workbench.shapes.bench_prompts import training_prompts
from workbench.shapes.render import render
from workbench.shapes.scene import scene_from_spec
from workbench.shapes.world import COLORS, SHAPES


def det(label, x, y, color=None, score=1.0, size=10.0):
    return {"label": label, "box": [x, y, x + size, y + size], "score": score, "color": color}


def scorer_accepts(prompt: str, detections) -> bool:
    """GenEval's verdict on a prompt written by the relabeler, read back through the parser."""
    spec = parse_prompt(prompt)
    dets = [d if isinstance(d, Detection) else Detection.from_dict(d) for d in detections]
    return score_detections({**spec, "tag": infer_tag(spec)}, dets).correct


def check_against_scorer(record: dict, detections: list[Detection], say_relations: bool = False,
                         keep_framing: bool = False) -> RelabelResult:
    """The properties every relabel must have, judged with the record's own metadata and tag."""
    result = relabel(record["prompt"], detections, 64, 64, say_relations=say_relations, keep_framing=keep_framing)
    correct = score_detections(record, detections).correct
    assert result.changed == (not correct), (record, detections, result)
    if result.changed:
        assert result.prompt != record["prompt"]
        assert parse_prompt(result.prompt) == result.detected_spec if result.prompt else not result.detected_spec["include"]
        if result.prompt:
            assert scorer_accepts(result.prompt, detections), (record["prompt"], result.prompt, detections)
        assert result.reasons
    else:
        assert result.prompt == record["prompt"]
    asked = {clause["class"] for clause in record["include"]}
    assert result.keep == any(d.label in asked and d.score > 0.3 for d in detections)
    return result


# --- agreement with the scorer ------------------------------------------------------------------


def test_relabel_and_scorer_agree_on_rendered_scenes():
    """A few hundred images rendered from random training specs, each scored against its own
    prompt or another one: changed is False exactly when the scorer calls the image correct, and a
    changed prompt is one the scorer accepts for that image."""
    records = training_prompts(300, seed=3)
    rng = np.random.default_rng(0)
    detector = ShapesDetector()
    outcomes = []
    for k, record in enumerate(records):
        shown = record if k % 2 == 0 else records[(7 * k + 3) % len(records)]
        scene = scene_from_spec(shown, rng)
        if scene is None:
            continue
        outcomes.append(check_against_scorer(record, detector.detect(render(scene))).changed)
    assert len(outcomes) >= 250
    # Both verdicts are well represented, so the agreement above means something.
    assert 0.25 < np.mean(outcomes) < 0.75


def test_a_framed_relabel_keeps_the_framing_and_still_says_only_what_the_image_shows():
    """Every kind of training prompt (most of them framed: "a rendering of ...", "... on a light
    background"), shown another prompt's scene: the rewrite inside the framing parses to the detected
    scene, the scorer accepts it, and it starts and ends as the original does."""
    records = training_prompts(300, seed=5, kinds=["single_object", "two_object", "counting", "colors", "position",
                                                   "color_attr"])
    rng = np.random.default_rng(2)
    detector = ShapesDetector()
    framed = 0
    for k, record in enumerate(records):
        scene = scene_from_spec(records[(7 * k + 3) % len(records)], rng)
        if scene is None:
            continue
        result = check_against_scorer(record, detector.detect(render(scene)), keep_framing=True)
        prefix, suffix = framing(record["prompt"])
        if result.changed and result.prompt and (prefix or suffix):
            framed += 1
            assert result.prompt.startswith(prefix) and result.prompt.endswith(suffix), (record["prompt"], result.prompt)
    assert framed >= 50


def test_framing_is_the_words_around_the_scene_that_say_nothing_about_it():
    assert framing("a photo of two red dogs on a white background") == ("a photo of", "on a white background")
    assert framing("An image of a square.") == ("An image of", ".")
    assert framing("a lone square") == ("", "")  # the noun phrase's own adjective
    # Words that place or count objects are the scene's, not its framing.
    assert framing("two circles side by side") == ("", "")
    assert framing("a square by itself") == ("", "")
    assert framing("a circle and a square; the circle is above the square") == ("", "")
    detections = [det("circle", 5, 30, "red"), det("square", 40, 30, "green")]
    assert relabel("there are three circles on a light background", detections, 64, 64,
                   keep_framing=True).prompt == "there is a circle and a square on a light background"
    assert relabel("there are three circles on a light background", detections, 64, 64).prompt == "a circle and a square"


@pytest.mark.parametrize("say_relations", [False, True])
def test_relabel_and_scorer_agree_on_noisy_detections(say_relations):
    """Hand-made detections with scores around both thresholds, missing colours and classes the
    prompt never asked for."""
    records = training_prompts(200, seed=11)
    rng = np.random.default_rng(1)
    for k in range(1500):
        detections = []
        for _ in range(int(rng.integers(0, 7))):
            x, y, size = rng.uniform(0, 50), rng.uniform(0, 50), rng.uniform(4, 14)
            color = str(rng.choice(COLORS[:3])) if rng.random() < 0.95 else None
            score = float(rng.choice([1.0, 0.95, 0.6, 0.31, 0.3, 0.1]))
            detections.append(Detection(str(rng.choice(SHAPES + ("dog",))), (x, y, x + size, y + size), score, color))
        check_against_scorer(records[k % len(records)], detections, say_relations)


# --- what gets written --------------------------------------------------------------------------


def test_a_wrong_relation_is_rewritten_to_the_observed_one():
    detections = [det("circle", 40, 10, "red"), det("square", 5, 10, "blue")]
    result = relabel("a red circle to the left of a blue square", detections, 64, 64)
    assert result.changed and result.keep
    assert result.prompt == "a red circle to the right of a blue square"
    assert any("left of" in r and "observed right of" in r for r in result.reasons)


def test_no_clear_relation_writes_the_pair_with_and():
    # Centres 2 px apart: GenEval's rule finds no relation between boxes that large.
    detections = [det("circle", 20, 20, "red"), det("square", 22, 21, "blue")]
    result = relabel("a red circle above a blue square", detections, 64, 64)
    assert result.prompt == "a red circle and a blue square"
    assert any("no clear relation" in r for r in result.reasons)


def test_a_relation_prompt_keeps_where_the_two_objects_it_shows_are():
    # Asked a circle above a triangle; the image shows a circle above a square.
    detections = [det("circle", 20, 5, "red"), det("square", 20, 40, "blue")]
    result = relabel("a circle above a triangle", detections, 64, 64)
    assert result.changed and result.keep
    assert result.prompt == "a circle above a square"
    assert scorer_accepts(result.prompt, detections)
    # Side by side, the observed relation is written, not the asked one.
    side_by_side = [det("square", 40, 20), det("circle", 5, 20)]
    assert relabel("a circle above a triangle", side_by_side, 64, 64).prompt == "a circle to the left of a square"
    # Prompts that asked no relation get none; a group of two is not paired with anything.
    assert relabel("a circle and a triangle", detections, 64, 64).prompt == "a circle and a square"
    with_two_squares = detections + [det("square", 45, 45, "blue")]
    assert relabel("a circle above a triangle", with_two_squares, 64, 64).prompt == "a circle and two squares"


def test_say_relations_writes_where_two_objects_are_for_any_prompt():
    # Asked a red circle and a blue square; the image shows a green circle left of a blue square.
    detections = [det("circle", 5, 20, "green"), det("square", 40, 20, "blue")]
    plain = relabel("a red circle and a blue square", detections, 64, 64)
    assert plain.prompt == "a green circle and a blue square"
    said = relabel("a red circle and a blue square", detections, 64, 64, say_relations=True)
    assert said.changed and said.prompt == "a green circle to the left of a blue square"
    assert scorer_accepts(said.prompt, detections)
    # An image that already satisfies its prompt keeps it (IPR keeps matched pairs as they are).
    matched = relabel("a green circle and a blue square", detections, 64, 64, say_relations=True)
    assert not matched.changed and matched.prompt == "a green circle and a blue square"
    # Two objects of one class told apart by colour only when colours are split.
    triangles = [det("triangle", 20, 2, "yellow"), det("triangle", 20, 40, "orange")]
    asked = "an orange triangle under a yellow square"
    assert relabel(asked, triangles, 64, 64, say_relations=True).prompt == "two triangles"
    split = relabel(asked, triangles, 64, 64, split_colors=True, say_relations=True)
    assert split.prompt == "a yellow triangle above an orange triangle"
    # No relation is said for groups or for boxes too close for GenEval's rule.
    with_two_squares = detections + [det("square", 45, 45, "blue")]
    assert relabel("a red circle and a blue square", with_two_squares, 64, 64,
                   say_relations=True).prompt == "a green circle and two blue squares"
    overlapping = [det("circle", 20, 20, "green"), det("square", 22, 21, "blue")]
    assert relabel("a red circle and a blue square", overlapping, 64, 64,
                   say_relations=True).prompt == "a green circle and a blue square"


def test_a_right_relation_is_kept_unchanged():
    detections = [det("circle", 5, 10, "red"), det("square", 40, 10, "blue")]
    result = relabel("a red circle on the left of a blue square", detections, 64, 64)
    assert not result.changed and result.keep and result.reasons == []
    assert result.prompt == "a red circle on the left of a blue square"


def test_counts_are_rewritten_to_what_was_found():
    three = [det("circle", 5, 5), det("circle", 25, 5), det("circle", 45, 5)]
    assert relabel("three circles", three, 64, 64).changed is False
    fewer = relabel("four circles", three, 64, 64)
    assert fewer.prompt == "three circles" and "asked for 4 circles, found 3" in fewer.reasons
    more = relabel("two circles", three, 64, 64)
    assert more.prompt == "three circles" and more.changed
    # "a circle" asks for at least one: three circles satisfy it
    assert relabel("a circle", three, 64, 64).changed is False


def test_a_wrong_colour_is_rewritten():
    result = relabel("a photo of a red square", [det("square", 10, 10, "blue")], 64, 64)
    assert result.prompt == "a blue square"
    assert result.reasons == ["asked red square, found blue square"]


def test_mixed_colours_are_written_without_colour_or_split_on_request():
    detections = [det("circle", 40, 10, "red"), det("circle", 5, 10, "blue", score=0.95)]
    result = relabel("two red circles", detections, 64, 64)
    assert result.prompt == "two circles"  # what GenEval's scorer can confirm
    assert scorer_accepts(result.prompt, detections)
    assert "1 red, 1 blue" in result.reasons[0]
    split = relabel("two red circles", detections, 64, 64, split_colors=True)
    assert split.prompt == "a red circle and a blue circle"


def test_colours_are_left_out_when_the_detector_reports_none():
    result = relabel("a red square", [det("square", 10, 10)], 64, 64)
    assert result.changed and result.prompt == "a square"


def test_objects_the_prompt_did_not_ask_for_are_added_when_it_changes():
    detections = [det("circle", 5, 5, "red"), det("triangle", 40, 40, "green")]
    assert relabel("a red circle", detections, 64, 64).changed is False
    result = relabel("two red circles", detections, 64, 64)
    assert result.prompt == "a red circle and a green triangle"
    assert "also found 1 triangle" in result.reasons


def test_keep_is_false_when_nothing_asked_for_was_found():
    result = relabel("a dog", [det("cat", 4, 4)], 64, 64)
    assert result.changed and not result.keep and result.prompt == "a cat"
    empty = relabel("a red circle", [], 64, 64)
    assert empty.changed and not empty.keep and empty.prompt == ""
    unknown = relabel("a photo of a unicorn", [det("cat", 4, 4)], 64, 64)
    assert not unknown.keep and not unknown.changed


def test_box_threshold_drops_weak_detections():
    weak = [det("circle", 10, 10, score=0.2)]
    assert relabel("a circle", weak, 64, 64).keep is False
    assert relabel("a circle", weak, 64, 64, box_threshold=0.1).changed is False


def test_a_count_is_only_written_as_far_as_the_counting_threshold_allows():
    # All three above the box threshold, one below GenEval's counting threshold (0.9).
    detections = [det("circle", 5, 5, score=0.95), det("circle", 25, 5, score=0.5), det("circle", 45, 5, score=0.97)]
    result = relabel("three circles", detections, 64, 64)
    assert result.changed
    assert result.prompt == "two circles"
    assert scorer_accepts(result.prompt, detections)
    assert any("counting threshold" in r for r in result.reasons)


def test_coco_prompt_with_a_relation():
    detections = [det("dog", 5, 20, score=0.8), det("teddy bear", 40, 20, score=0.7), det("dog", 5, 50, score=0.2)]
    result = relabel("a photo of a dog right of a teddy bear", detections, 64, 64)
    assert result.prompt == "a dog to the left of a teddy bear"
    assert result.keep


def test_relabel_takes_detection_objects_and_gives_a_json_dict():
    detections = [Detection("square", (10, 10, 20, 20), 0.9, "blue")]
    result = relabel("a red square", detections, 64, 64)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["prompt"] == "a blue square" and data["changed"] is True and data["keep"] is True
    assert data["spec"] == {"include": [{"class": "square", "count": 1, "color": "red"}]}
    assert data["reasons"]


@pytest.mark.parametrize("detections, width, message", [
    ([{"label": "circle", "box": [1, 2, 3], "score": 0.9}], 64, "four numbers"),
    ([{"label": "circle", "box": [10, 10, 5, 20], "score": 0.9}], 64, "before its left"),
    ([{"label": "circle", "box": [1, 2, 3, 4], "score": 1.5}], 64, "between 0 and 1"),
    ([{"box": [1, 2, 3, 4], "score": 0.9}], 64, "label"),
    ([{"label": "circle", "box": [100, 100, 120, 120], "score": 0.9}], 64, "outside the 64x64 image"),
    ([{"label": "circle", "box": [40, 10, 90, 30], "score": 0.9}], 64, "far past the edge of the 64x64 image"),
    ([{"label": "circle", "box": [0.1, 0.2, 0.3, 0.4], "score": 0.9},
      {"label": "square", "box": [0.6, 0.2, 0.9, 1.0], "score": 0.8}], 64, "look normalised.*width \\(64\\)"),
    (["circle"], 64, "must be an object"),
    ([], 0, "width"),
])
def test_invalid_detections_are_refused_with_a_clear_message(detections, width, message):
    with pytest.raises(InvalidInput, match=message):
        relabel("a circle", detections, width, 64)


def test_boxes_a_little_past_the_edge_are_clipped_to_the_image():
    # Detectors draw boxes a few pixels past the edge: what the image shows is the part inside it. Here the
    # circle's box reaches 15 px out on the left; as given it would be left of and below the square, the
    # 3-px-wide strip inside the image is only below it.
    detections = [{"label": "circle", "box": [-15, 20, 3, 40], "score": 0.9},
                  {"label": "square", "box": [0, 12, 12, 24], "score": 0.9}]
    result = relabel("a circle to the left of a square", detections, 64, 64)
    assert result.changed is True and result.prompt == "a circle below a square"
    assert relabel("a circle below a square", detections, 64, 64).changed is False


# --- command line -------------------------------------------------------------------------------


def test_cli_relabel_prints_the_result(tmp_path, capsys):
    path = tmp_path / "detections.json"
    path.write_text(json.dumps([det("circle", 40, 10, "red"), det("square", 5, 10, "blue")]))
    code = main(["relabel", "--prompt", "a red circle to the left of a blue square", "--detections", str(path),
                 "--width", "64", "--height", "64"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["prompt"] == "a red circle to the right of a blue square"
    assert result["changed"] is True and result["keep"] is True and result["reasons"]


def test_cli_relabel_can_keep_the_prompts_framing(tmp_path, capsys):
    path = tmp_path / "detections.json"
    path.write_text(json.dumps([det("circle", 40, 10, "red"), det("square", 5, 10, "blue")]))
    args = ["relabel", "--prompt", "a photo of a red circle to the left of a blue square", "--detections", str(path),
            "--width", "64", "--height", "64"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["prompt"] == "a red circle to the right of a blue square"
    assert main(args + ["--keep-framing"]) == 0
    assert json.loads(capsys.readouterr().out)["prompt"] == "a photo of a red circle to the right of a blue square"


def test_cli_relabel_box_threshold(tmp_path, capsys):
    path = tmp_path / "detections.json"
    path.write_text(json.dumps({"detections": [det("circle", 10, 10, score=0.5)]}))
    args = ["relabel", "--prompt", "a circle", "--detections", str(path), "--width", "64", "--height", "64"]
    assert main(args + ["--box-threshold", "0.6"]) == 0
    assert json.loads(capsys.readouterr().out)["keep"] is False
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["changed"] is False


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("[{\"label\": ", "not valid JSON"),
    ("{\"boxes\": []}", "JSON list of detections"),
    ("[{\"label\": \"circle\", \"score\": 0.9}]", "detection 0 needs a \"box\""),
])
def test_cli_relabel_bad_detections_file_exits_2_with_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "detections.json"
    if content is not None:
        path.write_text(content)
    code = main(["relabel", "--prompt", "a circle", "--detections", str(path), "--width", "64", "--height", "64"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert message in captured.err and len(captured.err.strip().splitlines()) == 1


def test_cli_relabel_missing_file_shows_no_traceback(tmp_path):
    run = subprocess.run([sys.executable, "-m", "workbench", "relabel", "--prompt", "a circle", "--detections",
                          str(tmp_path / "nope.json"), "--width", "64", "--height", "64"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "does not exist" in run.stderr and "Traceback" not in run.stderr
