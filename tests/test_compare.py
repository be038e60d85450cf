"""Comparisons: same seeds in every column, verdict marks that say what the scorer says, prompts from
text, a ShapesBench tag or a file, the 'compare' job, and the Compare tab's handlers."""

import json

import numpy as np
import pytest
from PIL import Image

from workbench import history
from workbench.benchmark import DETECTORS
from workbench.compare import (CompareConfig, Variant, accuracy_table, mark, prompts_from_tag, prompts_from_text,
                               run_compare, verdict_mark)
from workbench.errors import InvalidInput
from workbench.evaluation import score_detections, summarize
from workbench.generation import LoraSpec, read_png_metadata
from workbench.perception.base import Detection

CIRCLE_LEFT_OF_SQUARE = {"tag": "position", "prompt": "a red circle to the left of a blue square",
                         "include": [{"class": "square", "count": 1, "color": "blue"},
                                     {"class": "circle", "count": 1, "color": "red", "position": ["left of", 0]}]}
TWO_SQUARES = {"tag": "counting", "prompt": "two squares", "include": [{"class": "square", "count": 2}],
               "exclude": [{"class": "square", "count": 3}]}


class ScriptedDetector:
    """Sees one red circle on the left and one blue square on the right in every (32x32) image."""

    def detect(self, image, labels=None):
        return [Detection("circle", (1.0, 12.0, 9.0, 20.0), 0.95, "red"),
                Detection("square", (22.0, 12.0, 30.0, 20.0), 0.95, "blue")]


@pytest.fixture(autouse=True)
def scripted_detector(monkeypatch):
    monkeypatch.setitem(DETECTORS, "scripted", ScriptedDetector)


def pixels(folder, row):
    return np.asarray(Image.open(folder / row["path"]).convert("RGB"))


def test_every_variant_draws_the_same_seeds_and_an_adapter_at_weight_zero_is_the_base(tiny_sd, tiny_lora, tmp_path):
    variants = [Variant("base"), Variant.of([LoraSpec(str(tiny_lora), 0.0)]), Variant.of([LoraSpec(str(tiny_lora), 1.0)])]
    config = CompareConfig(model=str(tiny_sd), variants=variants, prompts=[CIRCLE_LEFT_OF_SQUARE, TWO_SQUARES],
                           prompt_set="hand-made", seeds=2, steps=2, detector="scripted")
    out = tmp_path / "cmp"
    result = run_compare(config, out)

    rows = result["rows"]
    assert len(rows) == 3 * 2 * 2
    by_key = {(r["variant"], r["index"], r["seed"]): r for r in rows}
    for index in range(2):
        for seed in range(2):
            base, zero, one = (pixels(out, by_key[(v, index, seed)]) for v in range(3))
            assert np.array_equal(base, zero), "weight 0 must give the base model's image"
            assert not np.array_equal(base, one), "the adapter at weight 1 changes the image"
        assert not np.array_equal(pixels(out, by_key[(0, index, 0)]), pixels(out, by_key[(0, index, 1)]))
    # The PNGs carry the variant's adapters, so each image can be reproduced on its own.
    assert read_png_metadata(out / by_key[(2, 0, 1)]["path"])["loras"] == [{"path": str(tiny_lora), "weight": 1.0}]

    # Each image's mark is the scorer's verdict on what the detector saw.
    for row in rows:
        prompt = [CIRCLE_LEFT_OF_SQUARE, TWO_SQUARES][row["index"]]
        expected = score_detections(prompt, ScriptedDetector().detect(None))
        assert (row["correct"], row["mark"]) == (expected.correct, verdict_mark(expected))
    assert {row["mark"] for row in rows} == {"✓", "✗ counts"}

    labels = [v["label"] for v in result["variants"]]
    assert labels[0] == "base" and labels[1].endswith(":0") and labels[2].endswith(":1")
    table = accuracy_table(result["variants"])
    assert list(table.columns) == ["tag"] + labels
    assert table.set_index("tag").loc["position"].tolist() == [100.0] * 3
    assert table.set_index("tag").loc["counting"].tolist() == [0.0] * 3
    assert json.loads((out / "compare.json").read_text())["rows"] == json.loads(json.dumps(rows))

    # Every variant is in the results history, pointing at this folder.
    recorded = history.load(source="compare")
    assert list(recorded["label"]) == labels
    assert set(recorded["folder"]) == {str(out.resolve())}
    assert list(recorded["prompt_set"]) == ["hand-made"] * 3


@pytest.mark.parametrize("detections, expected", [
    ([Detection("square", (20, 10, 30, 20), 0.9, "blue"), Detection("circle", (0, 10, 8, 20), 0.9, "red")], "✓"),
    ([Detection("square", (0, 10, 8, 20), 0.9, "blue"), Detection("circle", (20, 10, 30, 20), 0.9, "red")],
     "✗ position"),
    ([Detection("square", (20, 10, 30, 20), 0.9, "blue"), Detection("circle", (0, 10, 8, 20), 0.9, "green")],
     "✗ colors, position"),  # GenEval does not check the position of a wrongly coloured object
    ([Detection("square", (20, 10, 30, 20), 0.9, "blue")], "✗ objects, counts, colors, position"),
    ([], "✗ objects, counts, colors, position"),
])
def test_marks_name_the_requirements_the_scorer_finds_unmet(detections, expected):
    verdict = score_detections(CIRCLE_LEFT_OF_SQUARE, detections)
    assert verdict_mark(verdict) == expected
    assert (expected == "✓") == verdict.correct


def test_counting_marks_too_many_and_too_few():
    squares = [Detection("square", (i * 8, 0, i * 8 + 6, 6), 0.95, "red") for i in range(3)]
    assert verdict_mark(score_detections(TWO_SQUARES, squares[:2])) == "✓"
    assert verdict_mark(score_detections(TWO_SQUARES, squares)) == "✗ counts"
    assert verdict_mark(score_detections(TWO_SQUARES, squares[:1])) == "✗ counts"
    # Counting prompts keep only detections above 0.9, as GenEval does.
    weak = [Detection(d.label, d.box, 0.5, d.color) for d in squares[:2]]
    assert verdict_mark(score_detections(TWO_SQUARES, weak)) == "✗ objects, counts"
    assert mark(False, {}) == "✗"


def test_prompts_from_text_a_tag_or_a_file():
    records = prompts_from_text("three red circles\n\na blue square to the left of a circle\n")
    assert [r["tag"] for r in records] == ["counting", "position"]
    assert records[0]["include"] == [{"class": "circle", "count": 3, "color": "red"}]
    with pytest.raises(InvalidInput, match="line 2"):
        prompts_from_text("a red circle\nsomething vague\n")

    counting = prompts_from_tag("counting", 3)
    assert len(counting) == 3 and {r["tag"] for r in counting} == {"counting"}
    assert len({r["tag"] for r in prompts_from_tag("all", 1)}) == 6
    with pytest.raises(InvalidInput, match="no prompts tagged"):
        prompts_from_tag("nonsense", 2)


def test_bad_settings_are_refused_before_anything_is_generated(tiny_sd, tmp_path):
    config = CompareConfig(model=str(tiny_sd), prompts=[TWO_SQUARES], detector="scripted", steps=2,
                           variants=[Variant("base"), Variant.of([LoraSpec(str(tmp_path / "missing"), 1.0)])])
    with pytest.raises(InvalidInput, match="LoRA adapter not found"):
        run_compare(config, tmp_path / "out")
    config.variants = [Variant("base"), Variant("base")]
    with pytest.raises(InvalidInput, match="same name"):
        run_compare(config, tmp_path / "out")
    config.variants, config.prompts = [Variant("base")], []
    with pytest.raises(InvalidInput, match="No prompts"):
        run_compare(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_comparison_runs_as_a_background_job(tiny_sd, tmp_path):
    from workbench.job_kinds import register_all
    from workbench.jobs import JobRunner, JobStatus

    runner = JobRunner(tmp_path / "db.sqlite", tmp_path / "runs")
    register_all(runner)
    try:
        config = CompareConfig(model=str(tiny_sd), prompts=[TWO_SQUARES], seeds=1, steps=2, detector="scripted")
        job = runner.wait(runner.submit("compare", config.to_dict()), timeout=300)
        assert job.status == JobStatus.DONE, job.error
        assert job.outputs["overall"] == {"base": 0.0}
        assert (tmp_path / "runs" / job.id / "compare.json").is_file()
        assert "counting" in job.log and "base" in job.log
    finally:
        runner.shutdown()


# --- the Compare tab's handlers --------------------------------------------------------------------------


def test_a_wrongly_formatted_upload_gives_a_clear_message_not_an_exception(tiny_sd, tmp_path):
    from workbench.ui.compare import build_config

    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "a red circle", "include": [{"class": "circle", "count": 1}]}\n')
    with pytest.raises(InvalidInput, match=r'prompts.jsonl, line 1: missing "tag"'):
        build_config(str(tiny_sd), "", "File", "", "counting", 2, str(bad), 1, 2, "scripted")
    csv = tmp_path / "prompts.csv"
    csv.write_text("prompt,tag\na red circle,colors\n")
    with pytest.raises(InvalidInput, match="not valid JSON"):
        build_config(str(tiny_sd), "", "File", "", "counting", 2, str(csv), 1, 2, "scripted")
    with pytest.raises(InvalidInput, match="upload"):
        build_config(str(tiny_sd), "", "File", "", "counting", 2, None, 1, 2, "scripted")
    with pytest.raises(InvalidInput, match="Prompts per tag needs a value"):  # the box cleared
        build_config(str(tiny_sd), "", "ShapesBench tag", "", "counting", None, None, 1, 2, "scripted")


def test_the_tab_builds_base_first_then_one_variant_per_line(tiny_sd, tiny_lora):
    from workbench.ui.compare import build_config

    config = build_config(str(tiny_sd), f"{tiny_lora}:0.5\n\n{tiny_lora}:1 + {tiny_lora}:0.25\n", "ShapesBench tag",
                          "", "position", 2, None, 3, 2, "auto")
    assert [len(v.loras) for v in config.variants] == [0, 1, 2]
    assert config.variants[0].label == "base"
    assert config.variants[1].loras == [LoraSpec(str(tiny_lora), 0.5)]
    assert config.variants[2].loras[1].weight == 0.25
    assert [r["tag"] for r in config.prompts] == ["position", "position"]
    assert (config.seeds, config.steps, config.detector, config.prompt_set) == (3, 2, None, "shapesbench.jsonl:position")


def test_the_held_out_wordings_are_a_source_of_other_prompts_for_the_same_tasks(tiny_sd):
    from workbench.shapes.bench_prompts import heldout_prompts
    from workbench.ui.compare import build_config

    bench = build_config(str(tiny_sd), "", "ShapesBench tag", "", "position", 3, None, 1, 2, "auto")
    held = build_config(str(tiny_sd), "", "Held-out wordings tag", "", "position", 3, None, 1, 2, "auto")
    assert held.prompts == [r for r in heldout_prompts() if r["tag"] == "position"][:3]
    assert not {r["prompt"] for r in held.prompts} & {r["prompt"] for r in bench.prompts}
    assert held.prompt_set == "shapesbench-heldout.jsonl:position"


def test_a_long_comparison_shows_a_sample_of_each_tag_in_the_tab(data_dir):
    from workbench.ui.compare import GRID_PROMPTS_PER_TAG, show_result

    folder = data_dir / "runs" / "long"
    (folder / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8), "blue").save(folder / "images" / "x.png")
    rows = [{"variant": 0, "label": "base", "index": i, "tag": ["counting", "colors"][i % 2], "prompt": f"p{i}",
             "seed": 0, "path": "images/x.png", "correct": True, "mark": "✓", "reasons": []} for i in range(70)]
    variants = [{"label": "base", "loras": [], "per_tag": {"counting": 1.0, "colors": 1.0}, "overall": 1.0}]
    (folder / "compare.json").write_text(json.dumps({"config": {"model": "m"}, "variants": variants, "rows": rows}))

    grid, table, _, _ = show_result("long")
    assert grid.count("<img ") == 2 * GRID_PROMPTS_PER_TAG and "of 70" in grid
    assert list(table["base"]) == [100.0, 100.0, 100.0]
    with pytest.raises(InvalidInput, match="at least 1"):
        prompts_from_tag("counting", 0)


def test_the_tab_says_how_sure_each_variants_difference_from_the_base_is(data_dir):
    from workbench.ui.compare import show_result

    folder = data_dir / "runs" / "sure"
    (folder / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8), "blue").save(folder / "images" / "x.png")
    # 40 prompts x 2 seeds; "fixed" gets every position image right where the base gets none,
    # "same" is the base's verdicts again.
    base = [{"index": i, "tag": ["position", "counting"][i % 2], "prompt": f"p{i}", "seed": s,
             "path": "images/x.png", "correct": i % 2 == 1 and s == 0, "mark": "", "reasons": []}
            for i in range(40) for s in range(2)]
    variants_rows = {"base": base, "fixed": [{**r, "correct": r["correct"] or r["tag"] == "position"} for r in base],
                     "same": base}
    rows, variants = [], []
    for v, (label, variant_rows) in enumerate(variants_rows.items()):
        rows += [{**r, "variant": v, "label": label} for r in variant_rows]
        summary = summarize(variant_rows)
        variants.append({"label": label, "loras": [], "per_tag": summary["per_tag"], "overall": summary["overall"]})
    (folder / "compare.json").write_text(json.dumps({"config": {"model": "m"}, "variants": variants, "rows": rows}))

    _, _, differences, _ = show_result("sure")
    cells = differences.set_index("tag")
    assert list(cells.index) == ["position", "counting", "overall"]
    assert cells.loc["position", "fixed − base"].startswith("+100.0 [+100.0, +100.0]")
    assert cells.loc["overall", "fixed − base"].startswith("+50.0")
    assert cells.loc["overall", "same − base"] == "+0.0 [+0.0, +0.0] p=1"


def fine_tune_of(tiny_sd, folder, scale: float):
    """A full fine-tune's exported pipeline: the tiny model's folder with its UNet's output layer scaled."""
    import shutil

    from safetensors.torch import load_file, save_file

    from workbench.registry import resolve, write_fine_tune_origin

    shutil.copytree(tiny_sd, folder)
    weights_file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights = load_file(weights_file)
    weights["conv_out.weight"] = weights["conv_out.weight"] * scale
    save_file(weights, weights_file)
    write_fine_tune_origin(folder, resolve(str(tiny_sd)))
    return folder


def test_ipr_adapters_are_named_by_iteration_as_the_train_tab_counts_them(data_dir):
    from workbench.ui.adapters import adapter_choices

    run = data_dir / "runs" / "ipr-two"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"kind": "ipr"}))
    for folder in ("iteration-0", "iteration-1"):
        (run / folder / "adapter").mkdir(parents=True)
        (run / folder / "adapter" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    labels = {label: value for label, value in adapter_choices() if "ipr-two" in label}
    # Train's plot and Results call the first iteration 1 (0 is the base model).
    assert labels == {"IPR ipr-two · iteration 1": str(run / "iteration-0" / "adapter"),
                      "IPR ipr-two · iteration 2": str(run / "iteration-1" / "adapter")}


def test_a_full_fine_tune_is_a_variant_drawn_in_place_of_the_base_model(tiny_sd, tiny_lora, data_dir):
    from workbench.ui.adapters import adapter_choices, model_choices
    from workbench.ui.compare import build_config, variants_with

    # A RECAP run whose fine-tune was full: its exported pipeline is offered beside the LoRAs, and as a model.
    run = data_dir / "runs" / "recap-full"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"kind": "recap"}))
    tuned = fine_tune_of(tiny_sd, run / "recap" / "adapter" / "pipeline", scale=3.0)
    same = fine_tune_of(tiny_sd, data_dir / "runs" / "copy" / "pipeline", scale=1.0)
    label = "RECAP recap-full · RECAP fine-tune (full fine-tune)"
    assert dict(adapter_choices(joined=True))[label] == str(tuned)
    assert label not in dict(adapter_choices()), "the Generate tab's adapter list holds LoRAs only"
    assert (label, str(tuned)) in model_choices() and "shapes" in model_choices()
    assert variants_with("", str(tuned), 0.7) == str(tuned), "a full fine-tune has no weight"

    text = f"{variants_with('', str(same), 1)}\n{tuned}\n{tuned} + {tiny_lora}:1"
    config = build_config(str(tiny_sd), text, "Text", "two squares", "all", 1, None, 1, 2, "scripted")
    assert [v.model for v in config.variants] == [None, str(same), str(tuned), str(tuned)]
    assert [len(v.loras) for v in config.variants] == [0, 0, 0, 1]
    labels = [v.label for v in config.variants]
    assert labels[2] == "recap-full/recap (full)" and labels[3].startswith("recap-full/recap (full) + ")
    with pytest.raises(InvalidInput, match="line 1 names 2 full fine-tunes"):
        build_config(str(tiny_sd), f"{tuned} + {same}", "Text", "two squares", "all", 1, None, 1, 2, "scripted")
    with pytest.raises(InvalidInput, match=f"line 2: {run / 'recap' / 'adapter'} is a full fine-tune's output folder; "
                                           f"its model is {tuned}"):
        build_config(str(tiny_sd), f"{same}\n{run / 'recap' / 'adapter'}", "Text", "two squares", "all", 1, None, 1, 2,
                     "scripted")
    with pytest.raises(InvalidInput, match="neither a LoRA adapter .* nor a full fine-tune's pipeline"):
        build_config(str(tiny_sd), str(run / "gone"), "Text", "two squares", "all", 1, None, 1, 2, "scripted")

    result = run_compare(config, data_dir / "runs" / "cmp")
    out = data_dir / "runs" / "cmp"
    by_variant = {row["variant"]: pixels(out, row) for row in result["rows"]}
    assert np.array_equal(by_variant[0], by_variant[1]), "an unchanged copy of the model draws the base's images"
    assert not np.array_equal(by_variant[0], by_variant[2]), "the fine-tuned weights draw other images"
    assert not np.array_equal(by_variant[2], by_variant[3]), "a LoRA on top of the fine-tune changes them again"
    assert read_png_metadata(out / result["rows"][2]["path"])["model"] == str(tuned.resolve())
    assert list(history.load(source="compare")["model"]) == [str(tiny_sd), str(same), str(tuned), str(tuned)]
    assert CompareConfig.from_dict(json.loads((out / "compare.json").read_text())["config"]).variants == config.variants


def test_a_comparison_can_draw_seeds_no_evaluation_drew(tiny_sd, data_dir):
    from workbench.generation import GenerationRequest, generate_many
    from workbench.report import build_report
    from workbench.ui.compare import build_config

    config = build_config(str(tiny_sd), "", "Text", "two squares", "all", 1, None, 2, 2, "scripted", first_seed=4)
    out = data_dir / "runs" / "held-out-seeds"
    result = run_compare(config, out)
    assert [row["seed"] for row in result["rows"]] == [4, 5]
    # The same image that generating the prompt with seed 5 gives.
    alone = generate_many([GenerationRequest("two squares", model=str(tiny_sd), seeds=[5], steps=2)])[0]
    assert np.array_equal(pixels(out, result["rows"][1]), np.asarray(alone.image.convert("RGB")))
    assert list(history.load(source="compare")["prompt_set"]) == ["typed prompts (seeds 4-5)"]
    assert "typed prompts (seeds 4-5)" in build_report(out)

    with pytest.raises(InvalidInput, match="first seed"):
        build_config(str(tiny_sd), "", "Text", "two squares", "all", 1, None, 2, 2, "scripted", first_seed=-1).validate()
    with pytest.raises(InvalidInput, match="First seed needs a value"):
        build_config(str(tiny_sd), "", "Text", "two squares", "all", 1, None, 2, 2, "scripted", first_seed=None)
