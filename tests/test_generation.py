import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from workbench.cli import main as cli_main
from workbench.errors import InvalidInput, ModelNotAvailable
from workbench.generation import GenerationRequest, LoraSpec, generate, read_png_metadata, request_from_png
from workbench.registry import load_pipeline, resolve

FAST = dict(steps=3, width=32, height=32)


def pixels(result):
    return np.asarray(result.image, dtype=np.int16)


def test_registry_loads_local_sd_and_sdxl_through_the_same_path(tiny_sd, tiny_sdxl):
    assert type(load_pipeline(str(tiny_sd))).__name__ == "StableDiffusionPipeline"
    assert type(load_pipeline(str(tiny_sdxl))).__name__ == "StableDiffusionXLPipeline"
    assert resolve(str(tiny_sdxl)).family == "sdxl"
    assert resolve(str(tiny_sd)).default_size == 32, "size defaults to the size the model was built for"
    assert load_pipeline(str(tiny_sd)) is load_pipeline(str(tiny_sd)), "loaded pipelines are cached"


def test_a_full_fine_tune_of_the_shapes_model_samples_and_is_scored_like_it(tiny_sd, tmp_path):
    import shutil

    from workbench.benchmark import BenchmarkConfig, detector_name
    from workbench.registry import FINE_TUNE_FILE, write_fine_tune_origin
    from workbench.skills import world_of

    folder = tmp_path / "pipeline"
    shutil.copytree(tiny_sd, folder)
    plain = resolve(str(folder))
    assert (plain.default_steps, plain.world, plain.base_model) == (30, "real", "")
    write_fine_tune_origin(folder, resolve("shapes"))  # what the trainer writes beside a full fine-tune
    entry = resolve(str(folder))
    shapes = resolve("shapes")
    assert (entry.default_steps, entry.default_guidance) == (shapes.default_steps, shapes.default_guidance)
    assert entry.default_size == 32, "the size is still the folder's own"
    assert entry.world == "shapes" and world_of(str(folder)) == "shapes"
    assert "fine-tune of shapes" in entry.description
    assert detector_name(BenchmarkConfig(model=str(folder))) == "shapes"
    # A fine-tune of that fine-tune still names the registered model it all came from.
    write_fine_tune_origin(tmp_path, entry)
    assert '"shapes"' in (tmp_path / FINE_TUNE_FILE).read_text()
    (folder / FINE_TUNE_FILE).write_text("{not json")  # a damaged note: the folder is a plain local model
    assert resolve(str(folder)).default_steps == 30


def test_builtin_names_resolve_to_hub_ids():
    assert resolve("sd15").source == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert resolve("sd21").source == "stabilityai/stable-diffusion-2-1"
    assert resolve("sdxl").source == "stabilityai/stable-diffusion-xl-base-1.0"


def test_missing_hub_weights_name_the_id_and_the_download_command():
    with pytest.raises(ModelNotAvailable) as error:
        load_pipeline("sdxl")
    message = str(error.value)
    assert "stabilityai/stable-diffusion-xl-base-1.0" in message
    assert "download stabilityai/stable-diffusion-xl-base-1.0" in message


def test_folder_without_pipeline_is_rejected(tmp_path):
    with pytest.raises(InvalidInput, match="model_index.json"):
        resolve(str(tmp_path))


def test_same_seed_same_image_and_other_seed_differs(tiny_sd):
    first = generate(GenerationRequest("a red circle", model=str(tiny_sd), seeds=[3, 4], **FAST))
    again = generate(GenerationRequest("a red circle", model=str(tiny_sd), seeds=[3], **FAST))
    assert np.array_equal(pixels(first[0]), pixels(again[0]))
    assert not np.array_equal(pixels(first[0]), pixels(first[1]))


def test_sdxl_generates_at_requested_size(tiny_sdxl):
    [result] = generate(GenerationRequest("a blue square", model=str(tiny_sdxl), seeds=[0], **FAST))
    assert result.image.size == (32, 32)


def test_lora_with_nonzero_weight_changes_output_and_zero_weight_does_not(tiny_sd, tiny_lora):
    base = generate(GenerationRequest("a red circle", model=str(tiny_sd), seeds=[5], **FAST))[0]
    with_lora = generate(GenerationRequest("a red circle", model=str(tiny_sd), seeds=[5],
                                           loras=[LoraSpec(str(tiny_lora), 1.0)], **FAST))[0]
    zero = generate(GenerationRequest("a red circle", model=str(tiny_sd), seeds=[5],
                                      loras=[LoraSpec(str(tiny_lora), 0.0)], **FAST))[0]
    after = generate(GenerationRequest("a red circle", model=str(tiny_sd), seeds=[5], **FAST))[0]
    assert np.abs(pixels(base) - pixels(with_lora)).max() > 0
    assert np.abs(pixels(base) - pixels(zero)).max() <= 1
    assert np.array_equal(pixels(base), pixels(after)), "adapters are switched off when none is asked for"


def test_an_adapter_retrained_in_the_same_folder_is_loaded_afresh(tiny_sd, tmp_path):
    from workbench.registry import clear_cache
    from workbench.tiny_models import build_tiny_lora

    folder = build_tiny_lora(tiny_sd, tmp_path / "adapter", seed=1)
    request = GenerationRequest("a red circle", model=str(tiny_sd), seeds=[5], loras=[LoraSpec(str(folder), 1.0)],
                                **FAST)
    first = generate(request)[0]
    build_tiny_lora(tiny_sd, folder, seed=2)  # a new training run writes into the same folder
    second = generate(request)[0]
    clear_cache()  # what a restart would load
    fresh = generate(request)[0]
    assert np.abs(pixels(first) - pixels(second)).max() > 0
    assert np.array_equal(pixels(second), pixels(fresh))


def test_png_metadata_round_trips_to_the_same_image(tiny_sd, tiny_lora, tmp_path):
    request = GenerationRequest("a green triangle", model=str(tiny_sd), seeds=[11], negative_prompt="blurry",
                                scheduler="euler", loras=[LoraSpec(str(tiny_lora), 0.7)], **FAST)
    [original] = generate(request, out_dir=tmp_path / "out")
    meta = read_png_metadata(original.path)
    assert meta["seed"] == 11 and meta["model"] == str(tiny_sd) and meta["scheduler"] == "euler"
    assert meta["loras"] == [{"path": str(tiny_lora), "weight": 0.7}]
    [again] = generate(request_from_png(original.path))
    from PIL import Image
    assert np.array_equal(np.asarray(Image.open(original.path)), np.asarray(again.image))


@pytest.mark.parametrize("change, message", [
    (dict(prompt="   "), "prompt is empty"),
    (dict(prompt="x" * 5000), "The prompt is 5000 characters long"),
    (dict(negative_prompt="x" * 3000), "The negative prompt is 3000 characters long"),
    (dict(width=100000), "width"),
    (dict(height=30), "height"),
    (dict(steps=0), "Steps"),
    (dict(steps=10**6), "Steps"),
    (dict(seeds=[]), "seeds"),
    (dict(model="no-such-model"), "Unknown model"),
    (dict(scheduler="warp"), "scheduler"),
    (dict(loras=[LoraSpec("/nope/adapter")]), "LoRA adapter not found"),
])
def test_bad_requests_fail_clearly_and_write_nothing(tiny_sd, tmp_path, change, message):
    request = GenerationRequest(**{**dict(prompt="a red circle", model=str(tiny_sd), **FAST), **change})
    with pytest.raises(InvalidInput, match=message):
        generate(request, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_generate_writes_pngs_and_reports_errors_without_traceback(tiny_sd, tmp_path, capsys):
    code = cli_main(["generate", "--model", str(tiny_sd), "--prompt", "a red circle", "--seed", "1",
                     "--seed", "2", "--steps", "2", "--width", "32", "--height", "32", "--out", str(tmp_path)])
    assert code == 0
    paths = capsys.readouterr().out.split()
    assert len(paths) == 2 and all(read_png_metadata(p)["prompt"] == "a red circle" for p in paths)

    code = cli_main(["generate", "--model", "sd15", "--prompt", "a cat", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "hf download stable-diffusion-v1-5/stable-diffusion-v1-5" in err
    assert "Traceback" not in err and not (tmp_path / "x").exists()


def test_request_serialises_to_json_for_jobs(tiny_sd):
    request = GenerationRequest("a red circle", model=str(tiny_sd), loras=[LoraSpec("/a/b", 0.5)])
    assert GenerationRequest.from_dict(json.loads(json.dumps(request.to_dict()))) == request


def test_generate_many_batches_prompts_and_matches_single_generation(tiny_sd):
    from workbench.generation import generate_many

    requests = [GenerationRequest(prompt, model=str(tiny_sd), seeds=[1, 2], batch_size=4, **FAST)
                for prompt in ("a red circle", "a blue square", "a green triangle")]
    results = generate_many(requests)
    assert [(r.metadata["prompt"], r.seed) for r in results] == [
        (p, s) for p in ("a red circle", "a blue square", "a green triangle") for s in (1, 2)]
    alone = generate(GenerationRequest("a blue square", model=str(tiny_sd), seeds=[2], **FAST))[0]
    assert np.abs(pixels(results[3]) - pixels(alone)).max() <= 2, "batching does not change an image"
    with pytest.raises(InvalidInput, match="share"):
        generate_many([requests[0], GenerationRequest("x", model=str(tiny_sd), steps=5)])


def test_text_encoder_loras_load_with_their_weights_and_no_false_load_report(capfd):
    # The shipped IPR and SELMA adapters of the shipped shapes model adapt the text encoder too. From the
    # second adapter on a text encoder, transformers 5 logs a load report calling its weights MISSING while
    # diffusers injects them; they load, so the report is silenced.
    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from workbench.generation import _set_adapters, lora_weights_file

    pipe = StableDiffusionPipeline.from_pretrained(resolve("shapes").source, safety_checker=None, local_files_only=True)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        # one after the other on the same pipeline, as a session does
        for name in ("ipr-shapes", "selma-shapes", "selma-shapes/mixed"):
            adapter = Path(__file__).resolve().parents[1] / "assets" / "adapters" / name
            saved = {k: v for k, v in load_file(str(lora_weights_file(str(adapter)))).items()
                     if k.startswith("text_encoder.") and ".up." in k}
            assert saved
            spec = LoraSpec(str(adapter), 1.0)
            _set_adapters(pipe, [spec])
            loaded = {n: p for n, p in pipe.text_encoder.named_parameters() if f".lora_B.{spec.adapter_name()}." in n}
            for key, value in saved.items():
                module = key.removeprefix("text_encoder.").removesuffix(".lora_linear_layer.up.weight")
                match = [p for n, p in loaded.items() if n.startswith(module + ".lora_B.")]
                assert len(match) == 1 and torch.equal(match[0], value), key
    assert "LOAD REPORT" not in "".join(capfd.readouterr())
    # nor peft's warning that a second adapter was found: keeping several loaded is what a session does
    assert not [w for w in shown if "peft_config" in str(w.message)]


def test_an_adapter_listed_twice_acts_as_once_with_the_summed_weight(tiny_sd, tiny_lora):
    twice = generate(GenerationRequest("a red circle", model=str(tiny_sd), seeds=[5],
                                       loras=[LoraSpec(str(tiny_lora), 0.5), LoraSpec(str(tiny_lora), 0.5)], **FAST))[0]
    once = generate(GenerationRequest("a red circle", model=str(tiny_sd), seeds=[5],
                                      loras=[LoraSpec(str(tiny_lora), 1.0)], **FAST))[0]
    assert np.abs(pixels(twice) - pixels(once)).max() <= 1


@pytest.mark.parametrize("content", [b"not a safetensors file", "foreign"])
def test_a_broken_or_foreign_adapter_file_is_named_and_the_model_still_works(tiny_sd, tmp_path, content):
    from safetensors.torch import save_file
    import torch

    folder = tmp_path / "adapter"
    folder.mkdir()
    weights = folder / "pytorch_lora_weights.safetensors"
    if content == "foreign":  # another tool's keys
        save_file({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8)}, str(weights))
    else:
        weights.write_bytes(content)
    with pytest.raises(InvalidInput, match="is not a LoRA adapter in diffusers format"):
        generate(GenerationRequest("a red circle", model=str(tiny_sd), seeds=[5], loras=[LoraSpec(str(folder))],
                                   **FAST))
    base = generate(GenerationRequest("a red circle", model=str(tiny_sd), seeds=[5], **FAST))
    assert len(base) == 1


def test_shipped_adapter_records_name_no_path_of_the_machine_they_were_made_on():
    # A clone (or the Space) lives elsewhere: settings and scores that name files do so relative to the repo.
    import json

    assets = Path(__file__).resolve().parents[1] / "assets"
    absolute = []

    def walk(value, where):
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{where}.{key}")
        elif isinstance(value, list):
            for index, item in enumerate(value):
                walk(item, f"{where}[{index}]")
        elif isinstance(value, str) and (value.startswith("/") or value.startswith("~")):
            absolute.append(f"{where} = {value}")

    files = sorted((assets / "adapters").rglob("*.json"))
    assert files
    for path in files:
        walk(json.loads(path.read_text()), path.relative_to(assets).as_posix())
    assert not absolute, absolute


def test_a_lora_weight_that_is_no_number_is_named(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    assert LoraSpec.parse(f"{adapter}:0.5") == LoraSpec(str(adapter), 0.5)
    assert LoraSpec.parse(str(adapter)) == LoraSpec(str(adapter), 1.0)
    with pytest.raises(InvalidInput, match=r"weight after the colon .* is not a number; write PATH or PATH:WEIGHT"):
        LoraSpec.parse(f"{adapter}:abc")
    odd = tmp_path / "odd:name"  # a folder whose own name holds a colon stays a path
    odd.mkdir()
    assert LoraSpec.parse(str(odd)).path == str(odd)


def test_saved_images_are_as_readable_as_the_files_beside_them(tmp_path):
    import os
    import stat

    from PIL import Image

    from workbench.generation import save_png

    metadata = {"prompt": "a circle", "steps": 1, "guidance": 1.0, "seed": 0, "width": 8, "height": 8, "model": "m"}
    path = save_png(Image.new("RGB", (8, 8)), metadata, tmp_path)
    beside = tmp_path / "scores.json"
    beside.write_text("{}")
    assert stat.S_IMODE(os.stat(path).st_mode) == stat.S_IMODE(os.stat(beside).st_mode)
