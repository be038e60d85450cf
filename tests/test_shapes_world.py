"""The shapes world: scenes, renderer, caption writers, ShapesBench and training prompts."""

import itertools
import json
import re
import time

import numpy as np
import pytest

from workbench.errors import InvalidInput
from workbench.evaluation import load_prompt_file, relative_position
from workbench.shapes import bench_prompts
from workbench.shapes.bench_prompts import (
    SHAPESBENCH_PATH,
    TAGS,
    normalize_prompt,
    shapesbench_prompts,
    training_prompts,
    vocabulary,
)
from workbench.shapes.captions import (
    CAPTION_RELATION_PHRASE,
    AltTextNoise,
    brief_caption,
    long_caption,
    noisy_alt_text,
    prompt_for_spec,
    short_caption,
)
from workbench.shapes.render import render
from workbench.shapes.scene import Scene, ShapeObject, sample_scene, scene_from_dict, scene_from_spec, scene_to_dict
from workbench.shapes.world import (
    BACKGROUND_RGB,
    BORDER_GAP,
    COLOR_RGB,
    COLORS,
    COUNT_WORDS,
    MAX_SIZE,
    MIN_SIZE,
    OBJECT_GAP,
    PLURALS,
    SHAPES,
)

ZERO_NOISE = AltTextNoise(**{name: 0.0 for name in vars(AltTextNoise())})


def scenes(seed, n, **kwargs):
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, **kwargs) for _ in range(n)]


def pair(a: ShapeObject, b: ShapeObject) -> Scene:
    return Scene((a, b))


# --- renderer -----------------------------------------------------------------------------------


def test_render_gives_64px_rgb_with_background_and_object_colours():
    scene = Scene((ShapeObject("square", "blue", 32, 32, 16),))
    image = render(scene)
    assert image.size == (64, 64) and image.mode == "RGB"
    pixels = np.asarray(image)
    assert tuple(pixels[0, 0]) == BACKGROUND_RGB
    assert tuple(pixels[32, 32]) == COLOR_RGB["blue"]
    # The square covers [24, 40) x [24, 40): 256 pixels of pure blue.
    assert (pixels == COLOR_RGB["blue"]).all(axis=-1).sum() == 256


def test_render_antialiases_edges_as_mixes_of_colour_and_background():
    image = np.asarray(render(Scene((ShapeObject("circle", "red", 31.3, 30.7, 17.0),)))).astype(float)
    bg, red = np.array(BACKGROUND_RGB, float), np.array(COLOR_RGB["red"], float)
    is_bg = (image == bg).all(-1)
    is_red = (image == red).all(-1)
    edge = ~is_bg & ~is_red
    assert edge.sum() >= 20  # a ring of intermediate pixels around the circle
    # Each edge pixel is bg + t * (red - bg) for some t strictly between 0 and 1 (up to rounding).
    t = ((image[edge] - bg) @ (red - bg)) / ((red - bg) @ (red - bg))
    assert ((t > 0) & (t < 1)).all()
    assert np.abs(bg + t[:, None] * (red - bg) - image[edge]).max() <= 1.0


def test_render_without_supersampling_has_hard_edges():
    image = np.asarray(render(Scene((ShapeObject("circle", "red", 31.3, 30.7, 17.0),)), supersample=1))
    values = {tuple(p) for p in image.reshape(-1, 3)}
    assert values == {BACKGROUND_RGB, COLOR_RGB["red"]}


def test_rendering_a_thousand_scenes_is_fast():
    sampled = scenes(1, 1000)
    start = time.perf_counter()
    for scene in sampled:
        render(scene)
    assert time.perf_counter() - start < 5.0


def test_render_draws_each_shape_with_its_expected_area():
    for shape, expected in (("circle", np.pi / 4), ("square", 1.0), ("triangle", 0.5)):
        image = np.asarray(render(Scene((ShapeObject(shape, "green", 32, 32, 20),)))).astype(float)
        bg, green = np.array(BACKGROUND_RGB, float), np.array(COLOR_RGB["green"], float)
        coverage = ((image - bg) @ (green - bg)) / ((green - bg) @ (green - bg))
        assert coverage.sum() / 400 == pytest.approx(expected, abs=0.01), shape


# --- scenes -------------------------------------------------------------------------------------


def test_sampled_scenes_keep_objects_apart_and_inside_the_image():
    for scene in scenes(2, 500):
        assert 1 <= len(scene.objects) <= 4
        for obj in scene.objects:
            assert obj.shape in SHAPES and obj.color in COLORS
            assert MIN_SIZE <= obj.size <= MAX_SIZE
            x0, y0, x1, y1 = obj.box
            assert x0 >= BORDER_GAP - 1e-6 and y0 >= BORDER_GAP - 1e-6
            assert x1 <= 64 - BORDER_GAP + 1e-6 and y1 <= 64 - BORDER_GAP + 1e-6
        for a, b in itertools.combinations(scene.objects, 2):
            gap_x = max(b.box[0] - a.box[2], a.box[0] - b.box[2])
            gap_y = max(b.box[1] - a.box[3], a.box[1] - b.box[3])
            assert max(gap_x, gap_y) >= OBJECT_GAP - 0.02  # positions are rounded to 0.01 px


def test_sampled_scenes_mix_singles_pairs_and_counting_groups():
    sampled = scenes(3, 600)
    sizes = [len(s.objects) for s in sampled]
    assert all(sizes.count(n) >= 50 for n in (1, 2, 3, 4))
    identical_groups = sum(1 for s in sampled if len(s.objects) >= 2 and len({(o.shape, o.color) for o in s.objects}) == 1)
    assert identical_groups >= 50
    # Pairs of different objects mostly stand in one clear relation, and all four relations occur.
    relations = []
    for s in sampled:
        if len(s.objects) == 2:
            a, b = s.objects
            if (a.shape, a.color) != (b.shape, b.color):
                rel = relative_position(b.box, a.box)
                if len(rel) == 1:
                    relations.append(rel.pop())
    assert {"left of", "right of", "above", "below"} <= set(relations)
    assert len(relations) >= 100


def test_sample_scene_honours_object_bounds():
    assert all(2 <= len(s.objects) <= 3 for s in scenes(4, 200, min_objects=2, max_objects=3))
    assert all(len(s.objects) == 4 for s in scenes(4, 50, min_objects=4, max_objects=4))
    with pytest.raises(ValueError):
        sample_scene(np.random.default_rng(0), min_objects=3, max_objects=2)


def test_sampling_is_deterministic_for_a_seed():
    assert scenes(5, 20) == scenes(5, 20)
    assert scenes(5, 20) != scenes(6, 20)


def test_scene_round_trips_through_json():
    for scene in scenes(7, 30):
        data = json.loads(json.dumps(scene_to_dict(scene)))
        assert scene_from_dict(data) == scene
        assert Scene.from_dict(scene.to_dict()) == scene


@pytest.mark.parametrize(
    "bad",
    [{"objects": [{"shape": "hexagon", "color": "red", "cx": 5, "cy": 5, "size": 10}]},
     {"objects": [{"shape": "circle", "color": "red"}]},
     {"things": []}],
)
def test_scene_from_bad_json_is_invalid_input(bad):
    with pytest.raises(InvalidInput):
        scene_from_dict(bad)


def test_scene_from_spec_satisfies_every_shapesbench_record():
    rng = np.random.default_rng(8)
    for record in shapesbench_prompts():
        scene = scene_from_spec(record, rng)
        assert scene is not None, record
        groups = []
        for clause in record["include"]:
            members = [o for o in scene.objects if o.shape == clause["class"] and clause.get("color") in (None, o.color)]
            assert len(members) >= clause["count"], record
            groups.append(members)
            if "position" in clause:
                relation, target = clause["position"]
                for obj in members:
                    for ref in groups[target]:
                        assert relative_position(obj.box, ref.box) == {relation}, record
        for clause in record.get("exclude", []):
            assert sum(o.shape == clause["class"] for o in scene.objects) < clause["count"]


def test_scene_from_spec_refuses_what_the_world_cannot_hold():
    rng = np.random.default_rng(0)
    assert scene_from_spec({"include": [{"class": "dog", "count": 1}]}, rng) is None
    assert scene_from_spec({"include": [{"class": "circle", "count": 1, "color": "pink"}]}, rng) is None
    assert scene_from_spec({"include": [{"class": "circle", "count": 5}]}, rng) is None
    contradiction = {"include": [{"class": "circle", "count": 2}], "exclude": [{"class": "circle", "count": 2}]}
    assert scene_from_spec(contradiction, rng) is None


# --- captions -----------------------------------------------------------------------------------


def test_long_caption_follows_the_grammar():
    scene = Scene((
        ShapeObject("circle", "red", 10, 20, 12),
        ShapeObject("square", "blue", 45, 32, 14),
        ShapeObject("circle", "red", 12, 45, 12),
    ))
    assert long_caption(scene) == "two red circles and a blue square; the blue square is to the right of the red circles"
    assert short_caption(scene) == "two red circles and a blue square"
    above = pair(ShapeObject("circle", "orange", 40, 45, 12), ShapeObject("triangle", "purple", 40, 12, 12))
    # Same x: the higher object is listed first, and the lower one is placed relative to it.
    assert long_caption(above) == "a purple triangle and an orange circle; the orange circle is below the purple triangle"


def test_inline_pairs_say_a_related_pair_in_one_phrase_and_leave_other_scenes_alone():
    above = pair(ShapeObject("circle", "orange", 40, 45, 12), ShapeObject("triangle", "purple", 40, 12, 12))
    assert long_caption(above, inline_pairs=True) == "an orange circle below a purple triangle"
    groups = Scene((
        ShapeObject("circle", "red", 10, 20, 12),
        ShapeObject("square", "blue", 45, 32, 14),
        ShapeObject("circle", "red", 12, 45, 12),
    ))
    assert long_caption(groups, inline_pairs=True) == "a blue square to the right of two red circles"
    inline = 0
    for scene in scenes(9, 300):
        written = long_caption(scene, inline_pairs=True)
        if written != long_caption(scene):
            inline += 1
            # Same objects and relation as the clause form, said in one phrase.
            assert ";" not in written and ";" in long_caption(scene), written
    assert 0 < inline < 300


def test_inline_pairs_place_the_smaller_group_so_every_relation_gets_said_and_holds():
    # Two red circles on the right of a small blue square: the square is the figure, placed to the
    # left of the circles, although the circles come later in left-to-right order.
    left = Scene((
        ShapeObject("square", "blue", 12, 32, 10),
        ShapeObject("circle", "red", 45, 20, 12),
        ShapeObject("circle", "red", 47, 45, 12),
    ))
    assert long_caption(left, inline_pairs=True) == "a blue square to the left of two red circles"
    assert brief_caption(left, inline_pairs=True) == "a square to the left of two circles"
    assert brief_caption(left) == "a square and two circles"
    said = set()
    for scene in scenes(9, 400):
        brief = brief_caption(scene, inline_pairs=True)
        if brief == brief_caption(scene):
            continue
        match = re.fullmatch(r"(?:a|an|\w+) (\w+?)s? (to the left of|to the right of|above|below) (?:a|an|\w+) (\w+?)s?", brief)
        assert match, brief
        figure, phrase, ground = match.groups()
        relation = {v: k for k, v in CAPTION_RELATION_PHRASE.items()}[phrase]
        said.add(relation)
        # What the caption says holds for every figure-ground pair of objects, by GenEval's rule.
        for a in (o for o in scene.objects if o.shape.startswith(figure)):
            for b in (o for o in scene.objects if o.shape.startswith(ground)):
                assert relation in relative_position(a.box, b.box), (brief, a, b)
    assert said == {"left of", "right of", "above", "below"}


def test_long_caption_mentions_every_object_colour_count_and_clear_relation():
    for scene in scenes(9, 300):
        caption = long_caption(scene)
        listed, _, relations = caption.partition("; ")
        for (shape, color), members in itertools.groupby(sorted((o.shape, o.color) for o in scene.objects)):
            n = len(list(members))
            phrase = f"(a|an) {color} {shape}" if n == 1 else f"{COUNT_WORDS[n]} {color} {PLURALS[shape]}"
            assert re.search(rf"(^|, | and ){phrase}(,|$| and)", listed), (caption, phrase)
        assert short_caption(scene) == listed
        if len(scene.objects) == 2 and len({(o.shape, o.color) for o in scene.objects}) == 2:
            a, b = scene.objects
            rel = relative_position(b.box, a.box)
            if len(rel) == 1:  # a clear relation is always stated, in one direction or the other
                assert relations, caption
                stated = relations.split(" the ")[-1]
                assert any(w in relations for w in ("left of", "right of", "above", "below")), caption
                assert stated in (f"{a.color} {a.shape}", f"{b.color} {b.shape}")


def test_short_caption_never_mentions_layout():
    for scene in scenes(10, 200):
        caption = short_caption(scene)
        assert ";" not in caption and " of " not in caption and "above" not in caption and "below" not in caption


def test_zero_noise_alt_text_is_the_exact_long_caption():
    rng = np.random.default_rng(11)
    for scene in scenes(11, 200):
        assert noisy_alt_text(scene, rng, ZERO_NOISE) == long_caption(scene)


def noisy_rate(scene, seed, n=3000, **rates):
    """Captions written with only the given noise rates switched on."""
    rng = np.random.default_rng(seed)
    noise = AltTextNoise(**{**vars(ZERO_NOISE), **rates})
    return [noisy_alt_text(scene, rng, noise) for _ in range(n)]


def assert_rate(fraction, rate, n=3000):
    assert abs(fraction - rate) <= 4 * np.sqrt(rate * (1 - rate) / n) + 1e-9, (fraction, rate)


SINGLE = Scene((ShapeObject("square", "green", 30, 30, 16),))
GROUP = Scene(tuple(ShapeObject("circle", "yellow", x, 30, 12) for x in (12, 32, 52)))
TWO = pair(ShapeObject("circle", "red", 15, 30, 14), ShapeObject("square", "blue", 48, 30, 14))


def test_noise_rates_are_honoured():
    caps = noisy_rate(SINGLE, 1, drop_color=0.35)
    assert_rate(np.mean(["green" not in c for c in caps]), 0.35)
    caps = noisy_rate(TWO, 2, drop_object=0.3)
    assert_rate(np.mean(["square" not in c for c in caps]), 0.3)
    assert all("circle" in c for c in caps)  # the first group is never dropped
    caps = noisy_rate(TWO, 3, omit_relation=0.6)
    assert_rate(np.mean([";" not in c for c in caps]), 0.6)
    caps = noisy_rate(TWO, 4, swap_relation=0.3)
    assert_rate(np.mean(["to the left of" in c for c in caps]), 0.3)
    caps = noisy_rate(GROUP, 5, wrong_count=0.3)
    assert_rate(np.mean([not c.startswith("three") for c in caps]), 0.3)
    caps = noisy_rate(GROUP, 6, drop_count=0.3)
    assert_rate(np.mean([c == "yellow circles" for c in caps]), 0.3)
    caps = noisy_rate(TWO, 7, swap_color=0.25)
    assert_rate(np.mean([c.startswith("a blue circle and a red square") for c in caps]), 0.25)
    caps = noisy_rate(SINGLE, 8, prefix=0.4)
    assert_rate(np.mean([c != "a green square" for c in caps]), 0.4)


def test_default_noise_is_often_wrong_about_composition():
    rng = np.random.default_rng(12)
    multi = [s for s in scenes(12, 600) if len(s.objects) >= 2]
    wrong = np.mean([noisy_alt_text(s, rng) != long_caption(s) for s in multi])
    assert wrong > 0.8
    # Yet it is short web text: on average clearly shorter than the exact caption.
    assert np.mean([len(noisy_alt_text(s, rng)) for s in multi]) < 0.8 * np.mean([len(long_caption(s)) for s in multi])


def test_noise_rates_outside_unit_interval_are_refused():
    with pytest.raises(ValueError):
        AltTextNoise(drop_color=1.5)


def test_prompt_for_spec_writes_geneval_style_prompts():
    circle = {"class": "circle", "count": 1, "color": "green", "position": ["left of", 0]}
    position = {"include": [{"class": "square", "count": 1}, circle]}
    assert prompt_for_spec(position) == "a green circle left of a square"
    mixed = {"include": [{"class": "circle", "count": 2, "color": "red"}, {"class": "square", "count": 1, "color": "blue"}]}
    assert prompt_for_spec(mixed) == "two red circles and a blue square"
    counting = {"include": [{"class": "triangle", "count": 3}], "exclude": [{"class": "triangle", "count": 4}]}
    assert prompt_for_spec(counting) == "three triangles"
    assert prompt_for_spec(counting, numerals=True) == "3 triangles"
    assert prompt_for_spec({"include": [{"class": "circle", "count": 1, "color": "orange"}]}) == "an orange circle"


# --- ShapesBench --------------------------------------------------------------------------------


def test_shapesbench_has_fifty_distinct_prompts_per_tag_in_geneval_form():
    records = shapesbench_prompts()
    for tag in TAGS:
        prompts = [r["prompt"] for r in records if r["tag"] == tag]
        assert len(prompts) >= 50 and len(set(prompts)) == len(prompts), tag
    for r in records:
        if r["tag"] == "counting":
            (inc,), (exc,) = r["include"], r["exclude"]
            assert exc == {"class": inc["class"], "count": inc["count"] + 1} and 2 <= inc["count"] <= 4
        if r["tag"] == "position":
            target, obj = r["include"]
            assert obj["position"][1] == 0 and target["class"] != obj["class"]
        if r["tag"] == "color_attr":
            a, b = r["include"]
            assert a["class"] != b["class"] and a["color"] != b["color"]
        if r["tag"] == "two_object":
            assert len({c["class"] for c in r["include"]}) == 2


def test_shapesbench_file_is_the_generators_output():
    assert load_prompt_file(SHAPESBENCH_PATH) == shapesbench_prompts()
    assert shapesbench_prompts() == shapesbench_prompts()  # deterministic


def test_shapesbench_prompts_read_as_their_specs():
    for r in shapesbench_prompts():
        words = normalize_prompt(r["prompt"]).split()
        for clause in r["include"]:
            assert clause["class"] in words or PLURALS[clause["class"]] in words, r
            if "color" in clause:
                assert clause["color"] in words, r


def test_heldout_prompts_ask_shapesbenchs_tasks_in_words_it_never_uses(tmp_path):
    """The held-out set (bench/heldout_seeds.py --prompts heldout): 50 distinct prompts per task, none a
    ShapesBench prompt, color_attr pairs ShapesBench does not ask, every word one the shapes model's
    tokenizer holds whole, and each prompt read by the parser as exactly the request its record scores."""
    from transformers import CLIPTokenizer

    from workbench.prompt_parser import parse_prompt
    from workbench.registry import SHAPES_MODEL_DIR

    bench = shapesbench_prompts()
    records = bench_prompts.heldout_prompts()
    taken = {normalize_prompt(r["prompt"]) for r in bench}
    bench_pairs = {json.dumps(r["include"], sort_keys=True) for r in bench if r["tag"] == "color_attr"}
    tokenizer = CLIPTokenizer.from_pretrained(SHAPES_MODEL_DIR / "tokenizer")
    for tag in TAGS:
        prompts = [r["prompt"] for r in records if r["tag"] == tag]
        assert len(prompts) == 50 and len(set(prompts)) == 50, tag
    for r in records:
        assert normalize_prompt(r["prompt"]) not in taken, r
        if r["tag"] == "color_attr":
            assert json.dumps(r["include"], sort_keys=True) not in bench_pairs, r
        for word in re.findall(r"[a-z]+", r["prompt"]):
            assert len(tokenizer.tokenize(word)) == 1, (word, r["prompt"])
        spec = parse_prompt(r["prompt"])
        assert sorted(map(json.dumps, spec["include"])) == sorted(map(json.dumps, r["include"])), r
    path = bench_prompts.write_prompts(records, tmp_path / "heldout.jsonl")
    assert load_prompt_file(path) == records == bench_prompts.heldout_prompts()
    assert load_prompt_file(bench_prompts.HELDOUT_PATH) == records  # the shipped file is the generator's output


def test_training_prompts_never_repeat_shapesbench():
    bench = {normalize_prompt(r["prompt"]) for r in shapesbench_prompts()}
    held_out = {json.dumps(r["include"], sort_keys=True) for r in shapesbench_prompts() if r["tag"] == "color_attr"}
    records = training_prompts(2000, seed=3)
    assert len(records) == 2000
    assert len({r["prompt"] for r in records}) == 2000
    rng = np.random.default_rng(0)
    for r in records:
        assert normalize_prompt(r["prompt"]) not in bench
        assert json.dumps(r["include"], sort_keys=True) not in held_out
        assert scene_from_spec(r, rng) is not None, r
    assert training_prompts(50, seed=3) == records[:50]
    assert training_prompts(50, seed=4) != records[:50]
    assert {"colors", "counting", "position", "color_attr", "mixed"} <= {r["tag"] for r in records}


def test_training_prompts_of_chosen_kinds_state_relations_both_ways():
    records = training_prompts(300, seed=5, kinds=["position"])
    assert {r["tag"] for r in records} == {"position"}
    clause = [r for r in records if ";" in r["prompt"]]  # "a circle and a square; the circle is above the square"
    assert 0.3 < len(clause) / len(records) < 0.7
    assert all(" is " in r["prompt"].split(";")[1] for r in clause)
    with pytest.raises(InvalidInput, match="Unknown kind of training prompt spatial"):
        training_prompts(5, kinds=["spatial"])


def test_clause_share_picks_how_position_prompts_state_their_relation():
    all_clauses = training_prompts(100, seed=5, kinds=["position"], clause_share=1.0)
    assert all(";" in r["prompt"] and r["include"][1]["position"] for r in all_clauses)
    inline = training_prompts(100, seed=5, kinds=["position"], clause_share=0.0)
    assert not any(";" in r["prompt"] for r in inline)


def test_training_prompts_pass_the_prompt_file_validator(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in training_prompts(200, seed=1)))
    assert len(load_prompt_file(path)) == 200


def test_vocabulary_covers_every_word_of_bench_training_and_captions():
    vocab = set(vocabulary())
    texts = [r["prompt"] for r in shapesbench_prompts() + training_prompts(500, seed=2)]
    rng = np.random.default_rng(0)
    texts += [noisy_alt_text(s, rng) for s in scenes(13, 300)] + [long_caption(s) for s in scenes(14, 300)]
    for text in texts:
        for word in normalize_prompt(text).split():
            assert word in vocab or word.isdigit(), (word, text)
    assert bench_prompts.PROMPTS_PER_TAG >= 50
