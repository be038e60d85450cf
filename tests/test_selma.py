"""SELMA end to end on the tiny random model, with a scripted LLM and detector: skill prompts (ROUGE-L
filter, evaluation prompts held out), images from another model, one expert per skill, the mixed
baseline, merging (the fused adapter equals set_adapters), evaluation, stop and resume, validation."""

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from pipelines.selma import (Progress, SelmaConfig, finished_stages, main as selma_main, make_llm, merge_experts,
                             run_selma, write_skill_prompts)
from workbench.benchmark import DETECTORS
from workbench.errors import InvalidInput, JobCancelled, ModelNotAvailable
from workbench.generation import GenerationRequest, LoraSpec, generate_many, lora_weights_file, read_png_metadata
from workbench.llm import LLMS, _find_task
from workbench.perception.base import Detection
from workbench.rouge import rouge_l
from workbench.shapes.bench_prompts import normalize_prompt, shapesbench_prompts
from workbench.skills import SHAPES_SKILLS, Skill, save_user_skill
from workbench.tiny_models import build_tiny_lora, build_tiny_sd

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORDS = ["red", "green", "blue", "circle", "square", "triangle", "cat", "dog", "left", "right", "above", "below"]
SKILLS = ["counting", "everyday_scene"]


class ScriptedLLM:
    """Writes prompts of six of the tiny model's words from a stream seeded by the in-context examples
    (other examples, other prompts, as sampling would). Its first answer also holds an evaluation
    prompt, a prompt longer than the tiny text encoder reads (16 tokens) and a near-copy of the prompt
    before it (5 of 6 words: ROUGE-L 0.83), which SELMA must drop."""

    label = "scripted LLM"

    def __init__(self):
        self.answers = 0

    def chat(self, messages, *, max_tokens=512, temperature=0.0):
        payload = _find_task(messages)
        rng = random.Random(json.dumps(payload["examples"]) + payload["skill"])
        prompts = [" ".join(rng.choice(WORDS) for _ in range(6)) for _ in range(payload["n"] + 3)]
        if self.answers == 0:
            prompts[:4] = ["a circle", " ".join(WORDS + WORDS[:4]), prompts[4] + " dog", prompts[4] + " cat"]
        self.answers += 1
        return json.dumps({"prompts": prompts})


class ScriptedDetector:
    def detect(self, image, labels=None):
        return [Detection("circle", (1.0, 12.0, 9.0, 20.0), 0.9, "red")]


@pytest.fixture(autouse=True)
def scripted(monkeypatch):
    monkeypatch.setitem(LLMS, "scripted", ScriptedLLM)
    monkeypatch.setitem(DETECTORS, "scripted", ScriptedDetector)


@pytest.fixture(scope="module")
def weak_model(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("weak-sd"), seed=1)


def config(tiny_sd, eval_prompts, **overrides) -> SelmaConfig:
    settings = dict(model=str(tiny_sd), llm="scripted", skills=list(SKILLS), prompts_per_skill=3,
                    prompts_per_request=4, samples_per_prompt=1, sample_steps=2, rank=4, alpha=4.0, steps=2,
                    batch_size=2, eval_prompts=eval_prompts, eval_seeds=1, detector="scripted")
    return SelmaConfig(**{**settings, **overrides})


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_selma_end_to_end_with_images_from_another_model(tiny_sd, weak_model, eval_prompts, tmp_path):
    out = tmp_path / "run"
    reports = []
    summary = run_selma(config(tiny_sd, eval_prompts, image_model=str(weak_model), eval_experts=True), out,
                        on_progress=lambda f, m: reports.append((f, m)), log=lambda m: None)

    # Prompts: kept ones are diverse (ROUGE-L <= 0.8 to each other and to the seeds), none is an
    # evaluation prompt, and the statistics add up.
    for k, name in enumerate(SKILLS):
        record = json.loads((out / "prompts" / f"{name}.json").read_text())
        prompts, stats = record["prompts"], record["stats"]
        assert len(prompts) == 3 and "a circle" not in prompts
        pool = prompts + record["skill"]["examples"]
        assert all(rouge_l(a, b) <= 0.8 for i, a in enumerate(pool) for b in pool[i + 1:])
        assert stats["generated"] == (stats["kept"] + stats["near_duplicates"] + stats["invalid"]
                                      + stats["in_evaluation"] + stats["too_long"])
        if k == 0:  # the scripted LLM's first answer: an evaluation prompt, a long one, a near-copy
            assert (stats["in_evaluation"], stats["too_long"]) == (1, 1) and stats["near_duplicates"] >= 1
        assert summary["skills"][name]["prompts"] == 3 and summary["skills"][name]["images"] == 3

    # Images come from the image model (weak-to-strong); each skill's folder is an imagefolder.
    rows = read_jsonl(out / "data" / "counting" / "metadata.jsonl")
    assert [r["text"] for r in rows] == json.loads((out / "prompts" / "counting.json").read_text())["prompts"]
    assert read_png_metadata(out / "data" / "counting" / rows[0]["file_name"])["model"] == str(weak_model)

    # One expert per skill on its own data; the mixed LoRA on all of it, n_skills x steps.
    for name in SKILLS:
        trained = json.loads((out / "experts" / name / "train_config.json").read_text())
        assert (trained["rows"], trained["steps"], trained["model"]) == (3, 2, str(tiny_sd))
    mixed = json.loads((out / "mixed" / "train_config.json").read_text())
    assert (mixed["rows"], mixed["steps"], mixed["lora_config"]["r"]) == (6, 4, 4)
    # Every expert loads and generates.
    for name in SKILLS:
        assert generate_many([GenerationRequest("red circle", model=str(tiny_sd), steps=2,
                                                loras=[LoraSpec(str(out / "experts" / name), 1.0)])])

    # Merged: set_adapters at 1/2 each (the authors' inference) is what was scored; merged/ is the fused adapter.
    merge = json.loads((out / "merged" / "merge.json").read_text())
    assert (merge["combination"], merge["weights"], merge["rank"]) == ("cat", [0.5, 0.5], 8)
    scored = json.loads((out / "eval-merged" / "scores.json").read_text())["config"]["loras"]
    assert scored == [{"path": str(out / "experts" / name), "weight": 0.5} for name in SKILLS]

    assert [row["variant"] for row in summary["table"]["rows"]] == ["base", "mixed", "merged", "expert counting",
                                                                    "expert everyday_scene"]
    assert summary["table"]["tags"] == ["single_object"]
    assert json.loads((out / "summary.json").read_text())["table"] == summary["table"]
    assert json.loads((out / "config.json").read_text())["kind"] == "selma"

    fractions = [f for f, _ in reports]
    assert fractions == sorted(fractions) and 0 <= fractions[0] and 0.99 <= fractions[-1] <= 1.0
    assert reports[0][1].startswith("prompts counting:") and reports[-1][1].startswith("eval expert everyday_scene:")


def test_experts_and_the_mixed_lora_adapt_the_layers_asked_for(tiny_sd, eval_prompts, tmp_path):
    from pipelines.trainer import TRANSFORMER_TARGETS

    out = tmp_path / "run"
    run_selma(config(tiny_sd, eval_prompts, eval_seeds=0, skills=list(SKILLS)[:2],
                     target_modules=list(TRANSFORMER_TARGETS)), out, log=lambda m: None)
    trained = sorted(out.glob("**/train_config.json"))
    assert len(trained) == 3  # two experts and the mixed LoRA
    for path in trained:
        assert json.loads(path.read_text())["target_modules"] == list(TRANSFORMER_TARGETS)
    # The merged adapter carries the feed-forward layers too, and loads whole.
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd))
    pipe.load_lora_weights(str(out / "merged"), adapter_name="merged")
    assert any(name.endswith("ff.net.2") and "merged" in getattr(m, "lora_B", {}) for name, m in pipe.unet.named_modules())


def test_a_stopped_run_resumes_without_redoing_finished_stages(tiny_sd, eval_prompts, tmp_path, capsys):
    out = tmp_path / "run"
    settings = config(tiny_sd, eval_prompts, eval_seeds=0)
    with pytest.raises(JobCancelled):  # stopped while the second expert trains
        run_selma(settings, out, should_stop=lambda: (out / "experts" / "everyday_scene").exists(),
                  log=lambda m: None)
    assert finished_stages(out) == {"prompts": True, "images": True, "check": True, "experts": False,
                                    "mixed": False, "merge": False, "eval": True}  # nothing to verify or score
    assert not (out / "experts" / "everyday_scene" / "done").exists()
    finished = [out / "prompts" / "counting.json", out / "data" / "everyday_scene" / "metadata.jsonl",
                lora_weights_file(str(out / "experts" / "counting"))]
    stamps = [path.stat().st_mtime_ns for path in finished]
    capsys.readouterr()

    summary = run_selma(config(tiny_sd, eval_prompts, eval_seeds=0), out, log=lambda m: None)
    assert all(finished_stages(out).values())
    assert [path.stat().st_mtime_ns for path in finished] == stamps  # prompts, images, expert 1 not redone
    assert summary["mixed_adapter"] == str(out / "mixed") and summary["table"]["rows"] == []
    printed = capsys.readouterr().out
    assert "resuming from" in printed and "(step 1/2)" in printed  # the trainer continued its checkpoint
    assert "experts/counting" not in printed  # the finished expert was not trained again

    with pytest.raises(InvalidInput, match="holds a SELMA run with other settings \\(lr\\)"):
        run_selma(config(tiny_sd, eval_prompts, eval_seeds=0, lr=1e-3), out, log=lambda m: None)


def unet_output(model, adapters: list[tuple[str, float]]) -> torch.Tensor:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model)
    names = []
    for i, (path, _) in enumerate(adapters):
        pipe.load_lora_weights(path, adapter_name=f"a{i}")
        names.append(f"a{i}")
    pipe.set_adapters(names, adapter_weights=[w for _, w in adapters])
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 16, 16, generator=generator)
    text = torch.randn(2, 16, 32, generator=generator)
    with torch.no_grad():
        return pipe.unet(latents, torch.tensor([10, 700]), text).sample


@pytest.fixture(scope="module")
def experts(tiny_sd, tmp_path_factory):
    """Three random LoRAs (both factors non-zero, unlike a freshly initialised one), ranks 2, 4, 4."""
    folder = tmp_path_factory.mktemp("experts")
    return [str(build_tiny_lora(tiny_sd, folder / f"e{i}", rank=rank, seed=10 + i)) for i, rank in enumerate((2, 4, 4))]


def test_fused_cat_adapter_equals_set_adapters(tiny_sd, experts, tmp_path):
    weights = [0.5, 0.3, -0.2]
    merged = merge_experts(str(tiny_sd), experts, weights, tmp_path / "merged", combination="cat")
    assert json.loads((merged / "merge.json").read_text())["rank"] == 2 + 4 + 4
    expected = unet_output(tiny_sd, list(zip(experts, weights)))
    fused = unet_output(tiny_sd, [(str(merged), 1.0)])
    base = unet_output(tiny_sd, [(experts[0], 0.0)])
    assert (expected - base).abs().max() > 1e-2  # the experts change the output...
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)  # ...and the fused adapter exactly so

    # "linear" averages A and B separately: it only approximates the weighted sum of the updates.
    linear = merge_experts(str(tiny_sd), experts[1:], [0.5, 0.5], tmp_path / "linear", combination="linear")
    assert (unet_output(tiny_sd, [(str(linear), 1.0)]) - unet_output(tiny_sd, list(zip(experts[1:], [0.5, 0.5])))
            ).abs().max() > 1e-4


def test_fused_cat_adapter_of_experts_beyond_the_attention_layers(tiny_sd, tmp_path):
    from pipelines.trainer import TRANSFORMER_TARGETS

    wide = [str(build_tiny_lora(tiny_sd, tmp_path / f"w{i}", rank=rank, seed=30 + i, target_modules=TRANSFORMER_TARGETS))
            for i, rank in enumerate((2, 4))]
    merged = merge_experts(str(tiny_sd), wide, [0.5, 0.5], tmp_path / "merged", combination="cat")
    expected = unet_output(tiny_sd, list(zip(wide, [0.5, 0.5])))
    assert (expected - unet_output(tiny_sd, [(wide[0], 0.0)])).abs().max() > 1e-2
    torch.testing.assert_close(unet_output(tiny_sd, [(str(merged), 1.0)]), expected, rtol=1e-5, atol=1e-5)


def text_encoder_output(model, adapters: list[tuple[str, float]]) -> torch.Tensor:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model)
    for i, (path, _) in enumerate(adapters):
        pipe.load_lora_weights(path, adapter_name=f"a{i}")
    pipe.set_adapters([f"a{i}" for i in range(len(adapters))], adapter_weights=[w for _, w in adapters])
    ids = pipe.tokenizer(["red circle"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def test_fused_cat_adapter_merges_text_encoder_adapters_too(tiny_sd, experts, tmp_path):
    with_te = [str(build_tiny_lora(tiny_sd, tmp_path / f"te{i}", rank=rank, seed=20 + i, text_encoder=True))
               for i, rank in enumerate((2, 4))]
    adapters = with_te + experts[:1]  # the last adapts the UNet only
    weights = [0.6, 0.4, 0.5]
    merged = merge_experts(str(tiny_sd), adapters, weights, tmp_path / "merged", combination="cat")
    assert json.loads((merged / "merge.json").read_text())["text_encoder_rank"] == 2 + 4
    expected = text_encoder_output(tiny_sd, list(zip(adapters, weights)))
    base = text_encoder_output(tiny_sd, [(experts[0], 1.0)])
    assert (expected - base).abs().max() > 1e-2  # the text-encoder experts change the prompt's encoding...
    torch.testing.assert_close(text_encoder_output(tiny_sd, [(str(merged), 1.0)]), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unet_output(tiny_sd, [(str(merged), 1.0)]),  # ...and the UNet's merge holds as before
                               unet_output(tiny_sd, list(zip(adapters, weights))), rtol=1e-5, atol=1e-5)


def test_text_encoder_only_adapters_merge_without_a_unet_part(tiny_sd, tmp_path):
    from safetensors.torch import load_file

    only_te = [str(build_tiny_lora(tiny_sd, tmp_path / f"te{i}", rank=2, seed=40 + i, text_encoder=True, unet=False))
               for i in range(2)]
    merged = merge_experts(str(tiny_sd), only_te, [0.5, 0.5], tmp_path / "merged", combination="cat")
    assert all(key.startswith("text_encoder.") for key in load_file(merged / "pytorch_lora_weights.safetensors"))
    assert json.loads((merged / "merge.json").read_text())["rank"] is None
    expected = text_encoder_output(tiny_sd, list(zip(only_te, [0.5, 0.5])))
    torch.testing.assert_close(text_encoder_output(tiny_sd, [(str(merged), 1.0)]), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("combination", ["linear", "ties", "dare_linear", "dare_ties"])
def test_weighted_adapter_combinations_load_and_generate(tiny_sd, experts, tmp_path, combination):
    out = merge_experts(str(tiny_sd), experts[1:], [0.5, 0.5], tmp_path / combination, combination=combination,
                        density=0.5, seed=3)
    assert json.loads((out / "merge.json").read_text())["rank"] == 4
    image = generate_many([GenerationRequest("red circle", model=str(tiny_sd), steps=2, seeds=[0],
                                             loras=[LoraSpec(str(out), 1.0)])])[0].image
    assert image.size == (32, 32)
    if combination.startswith("dare"):  # random drops follow the seed
        again = merge_experts(str(tiny_sd), experts[1:], [0.5, 0.5], tmp_path / "again", combination=combination,
                              density=0.5, seed=3)
        first, second = (load_file(str(path / "pytorch_lora_weights.safetensors")) for path in (out, again))
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_merging_needs_what_each_combination_reads(tiny_sd, experts, tmp_path):
    with pytest.raises(InvalidInput, match="ties needs a density"):
        merge_experts(str(tiny_sd), experts, [1, 1, 1], tmp_path / "m", combination="ties", density=None)
    with pytest.raises(InvalidInput, match="Cannot merge these adapters with linear: All adapters must have the same"):
        merge_experts(str(tiny_sd), experts, [1, 1, 1], tmp_path / "m", combination="linear")
    with pytest.raises(InvalidInput, match="LoRA adapter not found"):
        merge_experts(str(tiny_sd), [str(tmp_path / "none")], [1.0], tmp_path / "m")


def test_shapes_skill_prompts_stay_out_of_shapesbench():
    bench = {normalize_prompt(r["prompt"]) for r in shapesbench_prompts()}
    settings = SelmaConfig(model="shapes", prompts_per_skill=25)
    settings.validate()
    llm, held_out = make_llm(settings), 0
    for skill in SHAPES_SKILLS:
        record = write_skill_prompts(settings, skill, llm, Progress(None, {}), None)
        prompts, stats = record["prompts"], record["stats"]
        assert len(prompts) == 25 and not {normalize_prompt(p) for p in prompts} & bench, skill.name
        pool = prompts + list(skill.examples)
        assert all(rouge_l(a, b) <= 0.8 for i, a in enumerate(pool) for b in pool[i + 1:]), skill.name
        assert stats["generated"] == (stats["kept"] + stats["near_duplicates"] + stats["invalid"]
                                      + stats["in_evaluation"] + stats["too_long"])
        assert stats["too_long"] == 0 or skill.name == "long_description"  # the shapes model reads 32 tokens
        held_out += stats["in_evaluation"]
    assert held_out > 0  # the shapes LLM does write ShapesBench prompts; they were dropped


def test_the_shapes_llm_samples_other_prompts_for_other_examples():
    from workbench.llm import get_llm, write_prompts

    shapes, a, b = get_llm("shapes"), ["two red circles"], ["three blue squares"]
    assert write_prompts(shapes, "counting", "", a, 5) == write_prompts(shapes, "counting", "", b, 5)[:5]
    assert write_prompts(shapes, "counting", "", a, 5, temperature=1.0) != \
        write_prompts(shapes, "counting", "", b, 5, temperature=1.0)
    assert write_prompts(shapes, "counting", "", a, 5, temperature=1.0) == \
        write_prompts(shapes, "counting", "", a, 5, temperature=1.0)  # deterministic all the same


def test_text_encoder_only_experts_merge_into_a_text_encoder_adapter(tiny_sd, eval_prompts, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    run_selma(config(tiny_sd, eval_prompts, eval_seeds=0, skills=list(SKILLS)[:2], train_text_encoder=True,
                     train_unet=False), out, log=lambda m: None)
    for adapter in ("experts/" + list(SKILLS)[0], "mixed", "merged"):
        keys = load_file(out / adapter / "pytorch_lora_weights.safetensors").keys()
        assert keys and all(key.startswith("text_encoder.") for key in keys), adapter


@pytest.mark.parametrize("overrides, message", [
    (dict(merge="average"), "Unknown merge 'average'"),
    (dict(merge_weights=[1.0]), "one merge weight per skill \\(2\\)"),
    (dict(skills=["humour"]), "Unknown skill 'humour' for the real world"),
    (dict(prompts_per_skill=0), "Prompts per skill must be between 1 and"),
    (dict(rouge_threshold=1.5), "ROUGE-L threshold must be between 0 and 1"),
    (dict(llm="gpt"), "Unknown LLM backend 'gpt'"),
    (dict(model="sdxl"), "trains SD-style models .* 'sdxl' is sdxl"),
    (dict(merge="ties", merge_density=0.0), "merge_density must be in \\(0, 1\\]"),
    (dict(eval_seeds=17), "Evaluation seeds must be between 0 and 16"),
    (dict(prompt_dropout=1.0), "prompt_dropout must be in \\[0, 1\\)"),
    (dict(train_unet=False), "needs a LoRA on the text encoder"),
])
def test_bad_settings_are_refused_before_anything_runs(tiny_sd, eval_prompts, tmp_path, overrides, message):
    with pytest.raises(InvalidInput, match=message):
        run_selma(config(tiny_sd, eval_prompts, **overrides), tmp_path / "run", log=lambda m: None)
    assert not (tmp_path / "run").exists()


def test_the_shapes_llm_refuses_user_skills_up_front():
    save_user_skill(Skill("animals", "Animals doing things.", ("a dog riding a bike",)))
    with pytest.raises(InvalidInput, match="shapes LLM writes prompts only for .* animals needs an \"openai\""):
        SelmaConfig(model="shapes", skills=["counting", "animals"]).validate()


def test_cli(tmp_path, capsys):
    assert selma_main(["--out", str(tmp_path / "nothing"), "--resume"]) == 2
    assert "is not a SELMA run" in capsys.readouterr().err
    assert selma_main(["--list-skills", "--model", "shapes"]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("counting: ")


# --- image checks: verify or relabel the images before training -----------------------------------


class FixedLLM:
    """Writes the same diverse prompts whatever it is shown; only "a red circle" is what the scripted
    detector (one confident red circle in every image) sees."""

    label = "fixed LLM"

    def chat(self, messages, *, max_tokens=512, temperature=0.0):
        return json.dumps({"prompts": ["a red circle", "two blue squares", "a green triangle above a dog",
                                       "three cats"][:_find_task(messages)["n"]]})


class ColourKeyedDetector:
    """Finds, in a solid-colour image, the detections listed for its colour; confident above 0.9."""

    confident_score = 0.9

    def __init__(self, by_colour):
        self.by_colour = by_colour

    def detect(self, image, labels=None):
        return self.by_colour[image.getpixel((0, 0))]


CHECK_CASES = [  # colour key, prompt, detections
    ((255, 0, 0), "two red circles", [Detection("circle", (1, 1, 9, 9), 0.95, "red"),
                                      Detection("circle", (20, 1, 29, 9), 0.97, "red")]),
    ((0, 255, 0), "two red circles", [Detection("circle", (1, 1, 9, 9), 0.95, "red")]),  # one: a miss
    ((0, 0, 255), "a blue square", [Detection("square", (1, 1, 9, 9), 0.6, "blue")]),  # unsure of it
    ((9, 9, 9), "a blue square", []),  # nothing asked for
]


@pytest.fixture
def skill_folder(tmp_path):
    from PIL import Image

    folder = tmp_path / "skill"
    (folder / "images").mkdir(parents=True)
    rows = []
    for i, (colour, prompt, _) in enumerate(CHECK_CASES):
        Image.new("RGB", (32, 32), colour).save(folder / "images" / f"{i}.png")
        rows.append({"file_name": f"images/{i}.png", "text": prompt})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.mark.parametrize("mode, expected", [
    ("verify", [("../images/0.png", "two red circles", 1.0)]),
    ("relabel", [("../images/0.png", "two red circles", 1.0), ("../images/1.png", "a red circle", 0.5)]),
])
def test_the_image_check_keeps_matches_and_drops_or_relabels_misses(skill_folder, mode, expected):
    from pipelines.selma import check_images
    from workbench.imagefolder import read_imagefolder

    stats = check_images(skill_folder, ColourKeyedDetector({c: d for c, _, d in CHECK_CASES}), mode)
    relabeled = 1 if mode == "relabel" else 0
    assert stats == {"mode": mode, "images": 4, "kept": 1 + relabeled, "matched": 1, "relabeled": relabeled,
                     "missed": 1 - relabeled, "dropped": 1, "unsure": 1}
    # The checked set is an imagefolder of its own that the trainer reads, naming the original images.
    _, kept = read_imagefolder(skill_folder / "checked")
    assert [(r["file_name"], r["text"], r["weight"]) for r in kept] == expected
    assert not (skill_folder / "checked" / "images").exists()


def test_an_image_check_that_keeps_nothing_says_what_to_do(skill_folder):
    from pipelines.selma import check_images

    (skill_folder / "metadata.jsonl").write_text(json.dumps({"file_name": "images/1.png", "text": "two red circles"}))
    with pytest.raises(InvalidInput, match="kept none of the 1 images .* try the image check \"relabel\""):
        check_images(skill_folder, ColourKeyedDetector({c: d for c, _, d in CHECK_CASES}), "verify")
    with pytest.raises(InvalidInput, match="Unknown image check"):
        SelmaConfig(image_check="filter").validate()
    # A detector the run will need is checked before any prompt is written or image drawn.
    with pytest.raises(ModelNotAvailable, match="No 'nosuch' detector"):
        SelmaConfig(model="shapes", detector="nosuch", eval_seeds=0, image_check="verify").validate()
    with pytest.raises(ModelNotAvailable, match="No 'nosuch' detector"):
        SelmaConfig(model="shapes", detector="nosuch").validate()  # for the evaluation
    SelmaConfig(model="shapes", detector="nosuch", eval_seeds=0).validate()  # neither checks nor scores


def test_a_checked_run_trains_each_expert_on_the_images_that_show_their_prompt(tiny_sd, eval_prompts, tmp_path,
                                                                                monkeypatch):
    monkeypatch.setitem(LLMS, "fixed", FixedLLM)
    out = tmp_path / "run"
    summary = run_selma(config(tiny_sd, eval_prompts, llm="fixed", eval_seeds=0, image_check="verify"), out,
                        log=lambda m: None)
    for name in SKILLS:
        assert len(read_jsonl(out / "data" / name / "metadata.jsonl")) == 3  # every prompt was drawn
        kept = read_jsonl(out / "data" / name / "checked" / "metadata.jsonl")
        assert [r["text"] for r in kept] == ["a red circle"]
        trained = json.loads((out / "experts" / name / "train_config.json").read_text())
        assert trained["rows"] == 1 and trained["data"] == [str(out / "data" / name / "checked")]
        assert summary["skills"][name]["check"]["kept"] == 1
    assert json.loads((out / "mixed" / "train_config.json").read_text())["rows"] == 2
    assert finished_stages(out)["check"]


NEW_PROMPTS = ["red circle left dog", "blue square above cat", "green triangle below"]  # words the tiny model knows


class CopyingLLM:
    """Copies an in-context example into every answer beside one new prompt of its own, or (prose=True)
    answers with no JSON at all."""

    label = "copying LLM"

    def __init__(self, prose=False):
        self.prose, self.answers = prose, 0

    def chat(self, messages, *, max_tokens=512, temperature=0.0):
        if self.prose:
            return "Sure! Here are some prompts you might like."
        new = NEW_PROMPTS[self.answers % len(NEW_PROMPTS)]
        self.answers += 1
        return json.dumps({"prompts": [_find_task(messages)["examples"][0], new]})


def test_an_answer_that_copies_an_example_still_gives_its_new_prompts(tiny_sd, eval_prompts):
    settings = config(tiny_sd, eval_prompts, prompts_per_skill=3, prompts_per_request=4)
    skill = Skill("pets", "pets", ["a cat on a sofa", "a dog on a rug", "a rabbit in a box"])
    record = write_skill_prompts(settings, skill, CopyingLLM(), Progress(None, {}), None)
    assert record["prompts"] == NEW_PROMPTS
    assert record["stats"]["failed_requests"] == 0


def test_a_skill_without_any_usable_answer_says_why(tiny_sd, eval_prompts):
    settings = config(tiny_sd, eval_prompts)
    skill = Skill("pets", "pets", ["a cat on a sofa", "a dog on a rug", "a rabbit in a box"])
    with pytest.raises(InvalidInput) as caught:
        write_skill_prompts(settings, skill, CopyingLLM(prose=True), Progress(None, {}), None)
    message = str(caught.value)
    assert "wrote no usable prompt for the skill 'pets'" in message
    assert "the last because the answer holds no JSON" in message


def test_a_drawing_model_that_is_not_here_is_named_before_any_prompt_is_written(tmp_path):
    with pytest.raises(ModelNotAvailable, match="hf download stable-diffusion-v1-5"):
        SelmaConfig(model="shapes", image_model="sd15", eval_seeds=0).validate()
    with pytest.raises(ModelNotAvailable, match="not in the local Hugging Face cache"):
        run_selma(SelmaConfig(model="shapes", image_model="org/weak-model", eval_seeds=0), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_tokenizer_folder_that_cannot_be_read_is_not_taken_for_one(tmp_path):
    from pipelines.selma import prompt_fits

    (tmp_path / "weak" / "tokenizer").mkdir(parents=True)  # a pipeline folder without the tokenizer's files
    (tmp_path / "weak" / "model_index.json").write_text("{}")
    with pytest.raises(ModelNotAvailable, match="tokenizer of"):
        prompt_fits(SelmaConfig(model="shapes", image_model=str(tmp_path / "weak")))
