"""RealignDiff's fine-stage attention modulation (workbench/attention_modulation.py) and pipelines/realign_fine.py."""

import json

import numpy as np
import pytest
import torch

from workbench.attention_modulation import (AttentionCapture, ModulatedAttnProcessor, ModulationState,
                                            TokenRegions, modulate, modulated_generation, token_regions)
from workbench.errors import InvalidInput
from workbench.generation import GenerationRequest, generate
from workbench.registry import load_pipeline

PROMPT = "a red circle and a blue square"  # tiny tokenizer: one token a word; red circle = 2, 3, blue square = 6, 7
FAST = dict(steps=3)


def pixels(image):
    return np.asarray(image, dtype=np.int16)


def left_right_regions(tokenizer, height=32, width=32):
    left, right = np.zeros((height, width), bool), np.zeros((height, width), bool)
    left[:, : width // 2], right[:, width // 2:] = True, True  # whole 8x8-grid cells at every layer
    return token_regions(tokenizer, PROMPT, {"red circle": left, "blue square": right}), left, right


# --- token_regions --------------------------------------------------------------------------------


def test_token_regions_finds_multi_word_phrases_with_the_shapes_tokenizer():
    tokenizer = load_pipeline("shapes").tokenizer
    prompt = "a photo of an orange square, and a red circle and a red triangle"
    # <start> a photo of an orange square , and a red circle and a red triangle
    #    0    1   2    3  4    5      6    7  8  9 10   11    12  13 14  15
    square, circle, triangle = (np.zeros((64, 64), bool) for _ in range(3))
    square[:10, :10], circle[20:30, 20:30], triangle[40:, 40:] = True, True, True
    regions = token_regions(tokenizer, prompt, {"a red triangle": triangle, "orange square": square,
                                                "red circle": circle})
    assert regions.phrases == {"a red triangle": [14, 15], "orange square": [5, 6], "red circle": [10, 11]}
    assert regions.tokens == {14: "red", 15: "triangle", 5: "orange", 6: "square", 10: "red", 11: "circle"}
    assert regions.masks[10] is circle and regions.masks[14] is triangle, "each 'red' keeps its own object"
    assert not regions.missing
    ids = tokenizer(prompt)["input_ids"]
    assert tokenizer.convert_ids_to_tokens([ids[5], ids[11], ids[15]]) == ["orange</w>", "circle</w>", "triangle</w>"]


def test_token_regions_words_split_into_several_tokens_and_words_not_in_the_prompt(tiny_sd):
    tokenizer = load_pipeline(str(tiny_sd)).tokenizer  # "purple" is not in its vocabulary: 5 tokens
    mask = np.ones((32, 32), bool)
    regions = token_regions(tokenizer, "a purple circle and a red square", {"purple circle": mask, "green square": mask})
    assert regions.phrases == {"purple circle": [2, 3, 4, 5, 6, 7], "green square": [11]}
    assert regions.tokens[2] == regions.tokens[6] == "purple"
    assert regions.missing == {"green square": ["green"]}
    with pytest.raises(ValueError, match="same"):
        token_regions(tokenizer, "a red circle", {"red": np.ones((8, 8)), "circle": np.ones((4, 4))})


# --- the modulation --------------------------------------------------------------------------------


def test_strength_zero_reproduces_the_unmodulated_image_exactly():
    pipe = load_pipeline("shapes")  # a trained model: the tiny random one barely listens to its prompt
    regions, _, _ = left_right_regions(pipe.tokenizer, 64, 64)
    [plain] = generate(GenerationRequest(PROMPT, model="shapes", seeds=[7], **FAST))
    [same], capture = modulated_generation(pipe, PROMPT, regions, 7, strength=0.0, capture=True, **FAST)
    [changed], _ = modulated_generation(pipe, PROMPT, regions, 7, strength=1.0, **FAST)
    assert np.array_equal(pixels(same), pixels(plain.image))
    assert np.array_equal(capture.before, capture.after)
    assert np.abs(pixels(changed) - pixels(plain.image)).mean() > 1.0, "strength 1 must change the image"


def test_modulation_moves_a_tokens_attention_into_its_region_non_square_latents():
    pipe = load_pipeline("shapes")  # 64x96 images: 16x24 latents, cross-attention at 8x12 and 4x6
    left, right = np.zeros((64, 96), bool), np.zeros((64, 96), bool)
    left[:, :32], right[:, 64:] = True, True  # a third each, whole cells of both grids
    regions = token_regions(pipe.tokenizer, PROMPT, {"red circle": left, "blue square": right})
    capture = AttentionCapture(resolution=8)
    modulated_generation(pipe, PROMPT, regions, 3, strength=1.0, capture=capture, width=96, height=64, **FAST)
    before, after = capture.before[0], capture.after[0]
    assert before.shape[1:] == (8, 12)
    in_left, in_right = np.zeros((8, 12), bool), np.zeros((8, 12), bool)
    in_left[:, :4], in_right[:, 8:] = True, True
    for token, inside in ((2, in_left), (3, in_left), (6, in_right), (7, in_right)):
        assert after[token][inside].sum() > 1.2 * before[token][inside].sum()
        assert after[token][~inside].sum() < 0.6 * before[token][~inside].sum()


def test_the_processor_computes_eq_8_on_the_conditional_half(tiny_sd):
    """One attention layer against A' = softmax((QK^T + S*M) / sqrt(d)) written out by hand."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(query_dim=8, cross_attention_dim=6, heads=1, dim_head=8)
    mask = np.zeros((4, 4), bool)
    mask[:2, :] = True  # top half of a 4x4 grid
    regions = TokenRegions("x", masks={2: mask}, tokens={2: "x"}, phrases={"x": [2]})
    capture = AttentionCapture(resolution=4)
    state = ModulationState([regions], strength=0.7, num_train_timesteps=1000, capture=capture)
    hidden, text = torch.randn(2, 16, 8), torch.randn(2, 5, 6)  # CFG batch: unconditional row first
    state.before_unet(None, (hidden.view(2, 8, 4, 4), torch.tensor(600)), {})
    processor = ModulatedAttnProcessor(state, AttnProcessor2_0())
    with torch.no_grad():
        out = processor(attn, hidden, text)
        qk = attn.to_q(hidden[1]) @ attn.to_k(text[1]).T
    inside = torch.from_numpy(mask.reshape(-1, 1).astype(np.float32))  # R for token 2
    m = torch.zeros_like(qk)
    push_up, push_down = qk.amax(-1, keepdim=True) - qk, qk - qk.amin(-1, keepdim=True)
    m[:, 2:3] = 0.6 * (1 - 0.5) * (inside * push_up[:, 2:3] - (1 - inside) * push_down[:, 2:3])  # lambda 0.6, B 0.5
    expected = ((qk + 0.7 * m) / np.sqrt(8)).softmax(-1)
    assert torch.allclose(torch.from_numpy(capture.after[0]).reshape(5, 16).T, expected, atol=1e-5)
    assert torch.allclose(torch.from_numpy(capture.before[0]).reshape(5, 16).T, (qk / np.sqrt(8)).softmax(-1), atol=1e-5)
    with torch.no_grad():  # the unconditional row (empty prompt, no regions) is plain attention
        assert torch.allclose(out[0], AttnProcessor2_0()(attn, hidden, text)[0], atol=1e-5)
        assert not torch.allclose(out[1], AttnProcessor2_0()(attn, hidden, text)[1], atol=1e-3)


@pytest.mark.parametrize("edges, pushed_out", [("outside", 15), ("neutral", 12)])
def test_cells_a_region_covers_in_part_are_left_alone_unless_edges_is_outside(edges, pushed_out):
    mask = np.zeros((16, 16), bool)
    mask[:5, :5] = True  # on a 4x4 grid: cell (0, 0) whole, (0, 1), (1, 0), (1, 1) in part
    regions = TokenRegions("x", masks={1: mask}, tokens={1: "x"}, phrases={"x": [1]})
    state = ModulationState([regions], strength=1.0, num_train_timesteps=1000, edges=edges)
    state.before_unet(None, (torch.zeros(2, 4, 4, 4), torch.tensor(500)), {})
    inside, outside, weight = state.region_tensors((4, 4), 3, "cpu", torch.float32)
    assert inside[0, :, 1].tolist() == [1.0] + [0.0] * 15
    assert outside[0, :, 1].sum() == pushed_out and outside[0, 0, 1] == 0
    assert not inside[0, :, [0, 2]].any() and not outside[0, :, [0, 2]].any(), "tokens without a region: M = 0"
    assert weight[0, 0].tolist() == pytest.approx([0.0, 1 - 25 / 256, 0.0])
    with pytest.raises(ValueError, match="edges"):
        ModulationState([regions], 1.0, 1000, edges="soft")


def test_batches_modulate_only_the_images_that_have_regions():
    pipe = load_pipeline("shapes")
    regions, _, _ = left_right_regions(pipe.tokenizer, 64, 64)
    for guidance in (7.5, 1.0):  # with and without classifier-free guidance
        plain, _ = modulated_generation(pipe, [PROMPT, PROMPT], None, [1, 2], guidance=guidance, **FAST)
        mixed, _ = modulated_generation(pipe, [PROMPT, PROMPT], [regions, None], [1, 2], guidance=guidance, **FAST)
        assert np.abs(pixels(mixed[0]) - pixels(plain[0])).mean() > 1.0
        assert np.abs(pixels(mixed[1]) - pixels(plain[1])).max() <= 1  # rounding of the explicit attention only


def test_original_processors_are_restored_also_after_an_error(tiny_sd):
    pipe = load_pipeline(str(tiny_sd))
    before = dict(pipe.unet.attn_processors)
    regions, _, _ = left_right_regions(pipe.tokenizer)
    with modulate(pipe, regions) as state:
        installed = pipe.unet.attn_processors
        assert all(isinstance(p, ModulatedAttnProcessor) == name.endswith("attn2.processor")
                   for name, p in installed.items())
        assert isinstance(state, ModulationState)
    assert pipe.unet.attn_processors == before and not pipe.unet._forward_pre_hooks
    with pytest.raises(RuntimeError, match="boom"):
        with modulate(pipe, regions, 2.0, layers=["up_blocks"]):
            assert any(isinstance(p, ModulatedAttnProcessor) for p in pipe.unet.attn_processors.values())
            raise RuntimeError("boom")
    assert all(pipe.unet.attn_processors[name] is processor for name, processor in before.items())
    assert not pipe.unet._forward_pre_hooks


# --- the fine stage pipeline -----------------------------------------------------------------------


def test_realign_fine_on_the_shapes_model_writes_its_files(tmp_path):
    from PIL import Image

    from pipelines.realign_fine import FineStageConfig, main, realign_fine

    prompt = "an orange square and a red circle"
    out = tmp_path / "run"
    result = realign_fine(prompt, 0, out, FineStageConfig(steps=12), log=lambda _: None)
    for name in ("original.png", "realigned.png", "attention.png", "attention.npz", "result.json"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "result.json").read_text())
    assert saved["local_captions"] == {"circle": "a red circle", "square": "an orange square"}
    regions = {region["object"]: region for region in saved["regions"]}
    assert regions["circle"]["tokens"] == {"6": "red", "7": "circle"}
    assert regions["square"]["tokens"] == {"2": "orange", "3": "square"}
    mask = np.asarray(Image.open(out / regions["circle"]["mask"])) > 0
    circles = [d for d in saved["detections"] if d["object"] == "circle"]
    assert circles and mask.any() and 0 < regions["circle"]["area"] == mask.mean()
    assert all(d["label"] == "circle" for d in circles)
    assert {t["name"] for t in saved["tags"]} >= {"circle", "square"}
    assert all(saved["tags"][k]["llm_score"] in (0.0, 0.5, 2.0) for k in range(len(saved["tags"])))
    assert not np.array_equal(np.asarray(result["original"]), np.asarray(result["realigned"]))
    assert main(["--prompt", prompt, "--seed", "0", "--out", str(tmp_path / "cli"), "--steps", "12",
                 "--strength", "0"]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "cli" / "realigned.png")),
                          np.asarray(Image.open(out / "original.png"))), "strength 0 regenerates the original"


@pytest.mark.parametrize("changes, seed, words", [
    ({"strength": float("nan")}, 0, "strength S must be a number"),
    ({"steps": 0}, 0, "Steps must be at least 1"),
    ({}, -1, "seed must be between"),
    ({"layers": ["bogus"]}, 0, "No cross-attention layer of the UNet starts with bogus"),
    ({"prompt": "   "}, 0, "the prompt is empty"),
    ({"prompt": "a red circle " * 100}, 0, "the limit is 1000"),
])
def test_realign_fine_refuses_settings_that_would_write_a_wrong_image(tmp_path, changes, seed, words):
    from pipelines.realign_fine import FineStageConfig, realign_fine

    changes = dict(changes)
    prompt = changes.pop("prompt", "a red circle")
    said = []
    with pytest.raises(InvalidInput, match=words):
        realign_fine(prompt, seed, tmp_path / "run", FineStageConfig(**{"steps": 2, **changes}), log=said.append)
    assert not (tmp_path / "run").exists()
    assert not said  # refused before the original image is drawn


def test_every_missing_fine_stage_backend_is_named_in_one_message():
    from pipelines.realign_fine import FineStageConfig, Perception
    from workbench.errors import ModelNotAvailable

    with pytest.raises(ModelNotAvailable) as caught:
        Perception.load(FineStageConfig(model="shapes", llm="transformers", tagger="clip", detector="groundingdino",
                                        segmenter="sam"))
    message = str(caught.value)
    for missing in ("CLIP tagger", "GroundingDINO", "SAM", "The LLM"):  # one rerun, not four
        assert missing in message
