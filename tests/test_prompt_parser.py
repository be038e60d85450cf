"""The prompt parser and writer: GenEval specs from ShapesBench, training and COCO-style prompts."""

import json
import subprocess
import sys

import numpy as np
import pytest

from workbench.cli import main
from workbench.errors import InvalidInput
from workbench.prompt_parser import (
    COCO_CLASSES,
    GENEVAL_COLORS,
    MAX_PROMPT_CHARS,
    Vocabulary,
    default_vocabulary,
    describe,
    infer_tag,
    parse_prompt,
    shapes_vocabulary,
)
from workbench.shapes.bench_prompts import SHAPESBENCH_PATH, training_prompts
from workbench.shapes.world import COLORS as SHAPE_COLORS
from workbench.shapes.world import SHAPES


def expected_spec(record: dict) -> dict:
    spec = {"include": record["include"]}
    if record.get("exclude"):
        spec["exclude"] = record["exclude"]
    return spec


def mismatches(records: list[dict]) -> list[str]:
    wrong = []
    for record in records:
        got = parse_prompt(record["prompt"])
        if got != expected_spec(record) or infer_tag(got) != record["tag"]:
            wrong.append(f"{record['prompt']!r}: got {json.dumps(got)} ({infer_tag(got)}), want {json.dumps(expected_spec(record))} ({record['tag']})")
    return wrong


def test_every_shapesbench_prompt_parses_to_its_own_metadata():
    records = [json.loads(line) for line in SHAPESBENCH_PATH.read_text().splitlines() if line.strip()]
    assert len(records) == 300
    assert mismatches(records) == []


def test_training_prompts_parse_to_their_metadata():
    assert mismatches(training_prompts(500)) == []


def test_shapesbench_parses_the_same_with_the_shapes_vocabulary_alone():
    records = [json.loads(line) for line in SHAPESBENCH_PATH.read_text().splitlines() if line.strip()]
    for record in records:
        assert parse_prompt(record["prompt"], shapes_vocabulary()) == expected_spec(record), record["prompt"]


def one(cls, count=1, **extra):
    return {"class": cls, "count": count, **extra}


COCO_CASES = [
    ("a photo of a potted plant", {"include": [one("potted plant")]}),
    ("a photo of a hair drier", {"include": [one("hair drier")]}),
    ("a photo of a tv", {"include": [one("tv")]}),
    # GenEval's own plurals ("benchs") as well as proper ones.
    ("a photo of four benchs", {"include": [one("bench", 4)], "exclude": [one("bench", 5)]}),
    ("four benches", {"include": [one("bench", 4)], "exclude": [one("bench", 5)]}),
    ("three knives", {"include": [one("knife", 3)], "exclude": [one("knife", 4)]}),
    ("two mice", {"include": [one("computer mouse", 2)], "exclude": [one("computer mouse", 3)]}),
    ("2 buses", {"include": [one("bus", 2)], "exclude": [one("bus", 3)]}),
    ("ten teddy bears", {"include": [one("teddy bear", 10)], "exclude": [one("teddy bear", 11)]}),
    ("a pair of dogs", {"include": [one("dog", 2)], "exclude": [one("dog", 3)]}),
    ("a couple of cats", {"include": [one("cat", 2)], "exclude": [one("cat", 3)]}),
    ("a pair of scissors", {"include": [one("scissors")]}),
    ("a photo of a skis", {"include": [one("skis")]}),
    # a plural with no number says "some": at least two, no upper bound
    ("wine glasses on a table", {"include": [one("wine glass", 2), one("dining table")]}),
    ("people", {"include": [one("person", 2)]}),
    ("a man riding a horse", {"include": [one("person"), one("horse")]}),
    ("a photo of a red car", {"include": [one("car", color="red")]}),
    ("a photo of a brown skis", {"include": [one("skis", color="brown")]}),
    ("an orange car", {"include": [one("car", color="orange")]}),
    ("an orange and a banana", {"include": [one("orange"), one("banana")]}),
    ("two oranges", {"include": [one("orange", 2)], "exclude": [one("orange", 3)]}),
    ("a photo of a purple backpack and a white umbrella",
     {"include": [one("backpack", color="purple"), one("umbrella", color="white")]}),
    ("a white fluffy dog sitting on a black couch", {"include": [one("dog", color="white"), one("couch", color="black")]}),
    ("a dog on a white background", {"include": [one("dog")]}),
    ("a hot dog next to a dog", {"include": [one("hot dog"), one("dog")]}),
    ("a cat beside a dog", {"include": [one("cat"), one("dog")]}),
    ("a cat near a dog", {"include": [one("cat"), one("dog")]}),
    ("a cat with a dog", {"include": [one("cat"), one("dog")]}),
    ("a photo of a tv remote left of an umbrella", {"include": [one("umbrella"), one("tv remote", position=["left of", 0])]}),
    ("a photo of a dog right of a teddy bear", {"include": [one("teddy bear"), one("dog", position=["right of", 0])]}),
    ("a cat on the left side of a dog", {"include": [one("dog"), one("cat", position=["left of", 0])]}),
    ("a cat to the right of a dog", {"include": [one("dog"), one("cat", position=["right of", 0])]}),
    ("a cat on the right of a dog", {"include": [one("dog"), one("cat", position=["right of", 0])]}),
    ("a kite flying over a boat", {"include": [one("boat"), one("kite", position=["above", 0])]}),
    ("a teddy bear on top of a bed", {"include": [one("bed"), one("teddy bear", position=["above", 0])]}),
    ("a cat sleeping under a chair", {"include": [one("chair"), one("cat", position=["below", 0])]}),
    ("a ball beneath a table", {"include": [one("dining table"), one("sports ball", position=["below", 0])]}),
    ("a photo of a hair drier below an elephant", {"include": [one("elephant"), one("hair drier", position=["below", 0])]}),
    ("two red apples above a blue bowl",
     {"include": [one("bowl", color="blue"), one("apple", 2, color="red", position=["above", 0])],
      "exclude": [one("apple", 3)]}),
    ("A Red Circle, LEFT OF a Blue Square.",
     {"include": [one("square", color="blue"), one("circle", color="red", position=["left of", 0])]}),
    ("a cat without a dog", {"include": [one("cat")], "exclude": [one("dog")]}),
    ("a photo of a unicorn", {"include": []}),
    # compound number words
    ("one hundred dogs", {"include": [one("dog", 100)], "exclude": [one("dog", 101)]}),
    ("twenty three cats", {"include": [one("cat", 23)], "exclude": [one("cat", 24)]}),
    ("one hundred twenty three cats", {"include": [one("cat", 123)], "exclude": [one("cat", 124)]}),
    ("two dozen donuts", {"include": [one("donut", 24)], "exclude": [one("donut", 25)]}),
    ("a dozen donuts", {"include": [one("donut", 12)], "exclude": [one("donut", 13)]}),
    ("an image of nothing in particular", {"include": []}),
]


@pytest.mark.parametrize("prompt, spec", COCO_CASES, ids=[case[0] for case in COCO_CASES])
def test_coco_style_prompts(prompt, spec):
    assert parse_prompt(prompt) == spec


DEFINITE_CASES = [
    # "the X" names an object said before: relations stated as a clause after the list
    ("a dog and a cat; the dog is to the left of the cat", {"include": [one("cat"), one("dog", position=["left of", 0])]}),
    ("a red circle and a blue square; the blue square is above the red circle",
     {"include": [one("circle", color="red"), one("square", color="blue", position=["above", 0])]}),
    # the colour picks which of two objects of a class is meant
    ("a red circle and a blue circle; the blue circle is below the red circle",
     {"include": [one("circle", color="red"), one("circle", color="blue", position=["below", 0])],
      "exclude": [one("circle", 3)]}),
    # with nothing said before, "the" is just an article
    ("the cat to the left of the dog", {"include": [one("dog"), one("cat", position=["left of", 0])]}),
    ("a photo of the dog", {"include": [one("dog")]}),
    # a second clause that would contradict the first (a cycle of relations) is ignored
    ("a dog and a cat; the dog is left of the cat; the cat is left of the dog",
     {"include": [one("cat"), one("dog", position=["left of", 0])]}),
]


@pytest.mark.parametrize("prompt, spec", DEFINITE_CASES, ids=[case[0] for case in DEFINITE_CASES])
def test_definite_references_name_earlier_objects(prompt, spec):
    assert parse_prompt(prompt) == spec


def test_shapes_long_captions_parse_to_the_scene_they_describe():
    """Every long caption of the shapes world (its relation clauses included) parses to a spec that
    the scene's own exact detections satisfy under GenEval's scorer (scenes with one colour per
    class: GenEval checks every clause of a class on the same top detections)."""
    from workbench.evaluation import score_detections
    from workbench.perception.base import Detection
    from workbench.shapes.captions import long_caption
    from workbench.shapes.scene import sample_scene

    rng = np.random.default_rng(0)
    wrong = []
    for _ in range(300):
        scene = sample_scene(rng)
        if len({o.shape for o in scene.objects}) != len({(o.shape, o.color) for o in scene.objects}):
            continue
        caption = long_caption(scene)
        spec = parse_prompt(caption)
        detections = [Detection(o.shape, o.box, 1.0, o.color) for o in scene.objects]
        if sum(c["count"] for c in spec["include"]) != len(scene.objects) or \
                not score_detections(spec, detections).correct:
            wrong.append(f"{caption!r} -> {spec}")
    assert not wrong, "\n".join(wrong[:5])


def test_default_vocabulary_holds_genevals_80_classes_and_10_colours_plus_the_shapes_world():
    vocabulary = default_vocabulary()
    assert len(COCO_CLASSES) == len(set(COCO_CLASSES)) == 80
    assert set(COCO_CLASSES) | set(SHAPES) == set(vocabulary.classes)
    assert set(GENEVAL_COLORS) | set(SHAPE_COLORS) == set(vocabulary.colors)
    for cls in vocabulary.classes:
        assert parse_prompt(f"a photo of a {cls}") == {"include": [one(cls)]}, cls
        assert parse_prompt(f"three {vocabulary.plural(cls)}")["include"] == [one(cls, 3)], cls


def test_vocabulary_is_extensible_without_touching_the_default():
    assert parse_prompt("two unicorns") == {"include": []}
    vocabulary = default_vocabulary().extend(["unicorn"], colors=["silver"], plurals={"cactus": "cacti"})
    assert parse_prompt("two silver unicorns and a dog", vocabulary) == {
        "include": [one("unicorn", 2, color="silver"), one("dog")],
        "exclude": [one("unicorn", 3)],
    }
    assert parse_prompt("two unicorns") == {"include": []}  # the default did not change
    cacti = default_vocabulary().extend(["cactus"], plurals={"cactus": "cacti"})
    assert parse_prompt("three cacti", cacti)["include"] == [one("cactus", 3)]


def test_a_vocabulary_of_its_own_knows_only_its_words():
    vocabulary = Vocabulary(classes=["unicorn", "dragon"], colors=["silver"])
    assert parse_prompt("a silver unicorn left of a dog and a red dragon", vocabulary) == {"include": [one("unicorn", color="silver"), one("dragon")]}


def test_empty_and_overlong_prompts_are_refused():
    for prompt in ("", "   \n"):
        with pytest.raises(InvalidInput, match="empty"):
            parse_prompt(prompt)
    with pytest.raises(InvalidInput, match="the limit is 1000"):
        parse_prompt("a circle " * 200)
    assert parse_prompt(("a circle" + " " * MAX_PROMPT_CHARS)[:MAX_PROMPT_CHARS])["include"] == [one("circle")]


# --- writing ------------------------------------------------------------------------------------


def test_describe_writes_plain_english():
    assert describe({"include": [one("dog", 2), one("car", color="red")], "exclude": [one("dog", 3)]}) == "two dogs and a red car"
    assert describe({"include": [one("boat"), one("kite", position=["above", 0])]}) == "a kite above a boat"
    assert describe({"include": [one("umbrella"), one("apple", position=["left of", 0])]}) == "an apple to the left of an umbrella"
    assert describe({"include": [one("knife", 3), one("person", 2)], "exclude": [one("knife", 4), one("person", 3)]}) == "three knives and two people"


def random_spec(rng: np.random.Generator, classes: list[str], colors: list[str]) -> dict:
    """A spec in canonical form: one clause per class, a relation target just before its subject."""
    picked = [str(c) for c in rng.choice(classes, size=int(rng.integers(1, 4)), replace=False)]
    include = []
    for cls in picked:
        clause = {"class": cls, "count": int(rng.choice([1, 1, 1, 2, 3, 4, 7, 12]))}
        if rng.random() < 0.5:
            clause["color"] = str(rng.choice(colors))
        include.append(clause)
    if len(include) >= 2 and rng.random() < 0.5:
        k = int(rng.integers(1, len(include)))
        include[k]["position"] = [str(rng.choice(["left of", "right of", "above", "below"])), k - 1]
    exclude = [one(c["class"], c["count"] + 1) for c in include if c["count"] >= 2 and rng.random() < 0.8]
    absent = [c for c in classes if c not in picked]
    if rng.random() < 0.2:
        exclude.append(one(str(rng.choice(absent))))
    spec = {"include": include}
    if exclude:
        spec["exclude"] = exclude
    return spec


def test_parse_of_describe_round_trips_on_many_specs():
    rng = np.random.default_rng(0)
    vocabulary = default_vocabulary()
    for _ in range(600):
        spec = random_spec(rng, list(vocabulary.classes), list(vocabulary.colors))
        text = describe(spec)
        assert parse_prompt(text) == spec, text


def test_round_trip_of_a_class_split_by_colour_and_of_user_classes():
    split = {"include": [one("circle", color="red"), one("circle", color="blue")], "exclude": [one("circle", 3)]}
    assert describe(split) == "a red circle and a blue circle"
    assert parse_prompt(describe(split)) == split
    vocabulary = default_vocabulary().extend(["unicorn"])
    spec = {"include": [one("unicorn", 3), one("dog", position=["below", 0])], "exclude": [one("unicorn", 4)]}
    assert parse_prompt(describe(spec, vocabulary), vocabulary) == spec


# --- command line -------------------------------------------------------------------------------


def test_cli_parse_prints_the_spec(capsys):
    assert main(["parse", "a photo of two red dogs to the left of a cat"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "include": [one("cat"), one("dog", 2, color="red", position=["left of", 0])],
        "exclude": [one("dog", 3)],
    }


def test_cli_parse_knows_added_classes(capsys):
    assert main(["parse", "a unicorn", "--add-class", "unicorn"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out) == {"include": [one("unicorn")]}
    assert out.err == ""


def test_cli_parse_says_when_it_knows_no_object_of_the_prompt(capsys):
    assert main(["parse", "a red cube on the left side of a blue sphere"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out) == {"include": []}
    assert "names no object the vocabulary knows" in out.err and "--add-class" in out.err


@pytest.mark.parametrize("prompt, message", [("", "empty"), ("x" * 1001, "the limit is 1000")])
def test_cli_parse_errors_are_one_line_and_exit_2(prompt, message):
    run = subprocess.run([sys.executable, "-m", "workbench", "parse", prompt], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stdout == ""
    assert message in run.stderr and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
