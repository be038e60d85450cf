"""Captioners (BLIP, BLIP-2) and taggers (CLIP zero-shot, RAM) for real images, offline.

Tiny random BLIP / BLIP-2 / CLIP models are built from configs with locally made tokenizers, saved with
save_pretrained and loaded by path through the backend table, the code path real weights take. A random
model says nothing sensible, so what is checked is what a user sees: a plain string from the model's
vocabulary, the documented lengths of the two modes, the prompt never echoed, missing weights named.
"""

import re
import sys
import textwrap

import huggingface_hub
import pytest
import torch
from PIL import Image

from workbench.errors import InvalidInput, ModelNotAvailable
from workbench.perception.backends import check_backend, get_captioner, get_tagger
from workbench.perception.base import Captioner, Tag, Tagger
from workbench.perception.clip_tagger import DEFAULT_TAGS, ClipTagger
from workbench.tiny_models import build_tiny_clip

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
WORDS = ["a", "picture", "of", "question", "describe", "this", "image", "in", "detail", "answer", ":", ".",
         "red", "blue", "green", "circle", "square", "triangle", "cat", "dog", "on", "left", "right", "and",
         "with", "sitting", "table", "two", "small", "big"]


def _tokenizer(folder):
    from transformers import BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(SPECIAL + WORDS) + "\n")
    return BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]")


def build_tiny_blip(folder, seed=0):
    """A random 2-layer BLIP captioner on 32x32 images, saved as Salesforce/blip-image-captioning-* is.

    Its decoder never picks a special token (their output bias is pushed down), so it never stops early
    and never writes [UNK]: every caption runs to the mode's token limit, one vocabulary word per token.
    """
    from transformers import (BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor,
                              BlipTextConfig, BlipVisionConfig)

    torch.manual_seed(seed)
    tokenizer = _tokenizer(folder)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL}
    text = BlipTextConfig(vocab_size=len(tokenizer), hidden_size=32, encoder_hidden_size=32, intermediate_size=37,
                          num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=128,
                          bos_token_id=ids["[DEC]"], eos_token_id=ids["[SEP]"], sep_token_id=ids["[SEP]"],
                          pad_token_id=ids["[PAD]"])
    vision = BlipVisionConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                              image_size=32, patch_size=8)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                                    projection_dim=16, image_text_hidden_size=16))
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[list(ids.values())] = -1e4
    model.save_pretrained(folder)
    BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer).save_pretrained(folder)
    return folder


def build_tiny_blip2(folder, seed=0):
    """A random BLIP-2 (ViT, Q-Former with 4 queries, 2-layer OPT) on 32x32 images, saved as Salesforce/blip2-* is."""
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, Blip2QFormerConfig,
                              Blip2VisionConfig, BlipImageProcessor, OPTConfig)

    torch.manual_seed(seed)
    tokenizer = _tokenizer(folder)
    processor = Blip2Processor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer, num_query_tokens=4)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL}
    # OPT ends on its own eos ([DEC] here), so the [SEP] the BERT tokenizer appends is prompt, not an end.
    text = OPTConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, ffn_dim=37, num_attention_heads=4,
                     max_position_embeddings=256, word_embed_proj_dim=32, bos_token_id=ids["[CLS]"],
                     eos_token_id=ids["[DEC]"], pad_token_id=ids["[PAD]"])
    vision = Blip2VisionConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                               image_size=32, patch_size=8)
    qformer = Blip2QFormerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                                 encoder_hidden_size=32, vocab_size=len(tokenizer))
    config = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
                         num_query_tokens=4, image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    Blip2ForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def blip_folder(tmp_path_factory):
    return build_tiny_blip(tmp_path_factory.mktemp("blip"))


@pytest.fixture(scope="module")
def blip(blip_folder):
    return get_captioner("blip", model=str(blip_folder), device="cpu")


@pytest.fixture(scope="module")
def blip2(tmp_path_factory):
    return get_captioner("blip2", model=str(build_tiny_blip2(tmp_path_factory.mktemp("blip2"))), device="cpu")


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    for name in ("WORKBENCH_BLIP_MODEL", "WORKBENCH_BLIP2_MODEL", "WORKBENCH_CLIP_MODEL"):
        monkeypatch.delenv(name, raising=False)


def words(caption):
    """The caption's tokens: words and punctuation apart (decoding writes "cat." for "cat ." )."""
    return re.findall(r"\w+|[^\w\s]", caption)


def picture(colour=(220, 30, 30), size=(64, 48)):
    image = Image.new("RGB", size, (250, 250, 250))
    image.paste(colour, (10, 10, 40, 40))
    return image


# --- BLIP ---------------------------------------------------------------------------------------


def test_blip_loaded_by_path_captions_an_image_with_words_of_its_vocabulary(blip):
    assert isinstance(blip, Captioner)
    caption = blip.caption(picture())
    assert isinstance(caption, str) and caption
    assert set(words(caption)) <= set(WORDS)  # decoded text: no [DEC]/[SEP] or ids left in it
    assert caption == blip.caption(picture())  # beam search: the same image gets the same caption


def test_short_captions_are_capped_and_long_ones_are_longer_without_their_prompt(blip):
    short, long = blip.caption(picture(), "short"), blip.caption(picture(), mode="long")
    # Short: at most 20 new tokens; long: 15 to 60 (this model never stops early, so it hits the caps).
    assert len(words(short)) == 20
    assert len(words(long)) == 60
    # The prompt "a picture of" is fed to the model (BLIP hands it back first) and cut from the caption.
    assert not long.startswith("a picture of")
    custom = get_captioner("blip", model=str(blip.name), device="cpu", long_prompt="two red circles")
    assert not custom.caption(picture(), "long").startswith("two red circles")
    with pytest.raises(InvalidInput, match="'short' or 'long'"):
        blip.caption(picture(), mode="detailed")


def test_captioning_a_batch_gives_each_image_its_own_caption(blip):
    images = [picture((220, 30, 30)), picture((30, 30, 220), size=(40, 80)), picture((30, 200, 30))]
    for mode in ("short", "long"):
        assert blip.caption_many(images, mode, batch_size=2) == [blip.caption(image, mode) for image in images]
    assert blip.caption_many([]) == []


def test_blip_from_the_environment(blip_folder, monkeypatch):
    monkeypatch.setenv("WORKBENCH_BLIP_MODEL", str(blip_folder))
    check_backend("captioner", "blip")  # found: no error
    assert get_captioner("blip", device="cpu").caption(picture())


@pytest.mark.parametrize("backend, env, default", [
    ("blip", "WORKBENCH_BLIP_MODEL", "Salesforce/blip-image-captioning-large"),
    ("blip2", "WORKBENCH_BLIP2_MODEL", "Salesforce/blip2-opt-2.7b"),
])
def test_a_missing_captioner_says_what_to_download_and_which_variable_to_set(backend, env, default,
                                                                             empty_hf_cache, tmp_path, monkeypatch):
    with pytest.raises(ModelNotAvailable) as caught:
        get_captioner(backend)
    message = str(caught.value)
    assert f"`hf download {default}`" in message and env in message and "Hugging Face cache" in message
    with pytest.raises(ModelNotAvailable) as checked:
        check_backend("captioner", backend)
    assert str(checked.value) == message  # the quick check says exactly what loading would
    monkeypatch.setenv(env, str(tmp_path / "my-model"))
    with pytest.raises(ModelNotAvailable) as caught:
        get_captioner(backend)
    assert str(tmp_path / "my-model") in str(caught.value) and env in str(caught.value)
    (tmp_path / "my-model").mkdir()
    (tmp_path / "my-model" / "config.json").write_text("{}")
    with pytest.raises(ModelNotAvailable, match="has no model.safetensors"):
        get_captioner(backend)


# --- BLIP-2 -------------------------------------------------------------------------------------


def test_blip2_captions_without_echoing_its_image_tokens_or_question(blip2):
    short = blip2.caption(picture())
    long = blip2.caption(picture(), "long")
    for caption in (short, long):
        assert isinstance(caption, str)
        assert set(words(caption)) <= set(WORDS)  # no <image> tokens, no special tokens
    # The long prompt ("Question: Describe this image in detail. Answer:") is fed, then cut.
    assert not long.startswith("question")
    assert 15 <= len(words(long)) <= 60
    assert blip2.caption_many([picture(), picture((30, 30, 220))], "long") == [
        long, blip2.caption(picture((30, 30, 220)), "long")]


# --- CLIP tagger --------------------------------------------------------------------------------


def test_clip_tagger_returns_only_the_given_tags_best_first(clip_folder):
    tags = ["red", "blue", "green", "cat", "dog", "circle", "square"]
    tagger = get_tagger("clip", model=str(clip_folder), tags=tags, threshold=0.0, device="cpu")
    assert isinstance(tagger, Tagger)
    found = tagger.tag(picture())
    assert all(isinstance(tag, Tag) for tag in found)
    assert sorted(tag.name for tag in found) == sorted(tags)  # threshold 0: every tag, each once
    scores = [tag.score for tag in found]
    assert scores == sorted(scores, reverse=True) and all(0.0 <= s <= 1.0 for s in scores)
    # A threshold keeps the tags that reach it, in the same order.
    middle = scores[len(scores) // 2]
    strict = get_tagger("clip", model=str(clip_folder), tags=tags, threshold=middle, device="cpu")
    assert strict.tag(picture()) == [tag for tag in found if tag.score >= middle]
    # Softmax scoring (the default): CLIP's zero-shot classification over the list, which sums to one.
    assert sum(tag.score for tag in found) == pytest.approx(1.0, abs=1e-5)
    sigmoid = get_tagger("clip", model=str(clip_folder), tags=tags, scoring="sigmoid", threshold=0.0, device="cpu")
    assert sorted(tag.name for tag in sigmoid.tag(picture())) == sorted(tags)
    default = get_tagger("clip", model=str(clip_folder), device="cpu")
    assert default.tags == DEFAULT_TAGS and {"person", "tv remote", "red", "white"} <= set(default.tags)
    assert len(default.tags) == 89  # 80 COCO classes and 10 colours, "orange" being both
    assert {tag.name for tag in default.tag(picture())} <= set(DEFAULT_TAGS)
    with pytest.raises(InvalidInput, match="scoring"):
        get_tagger("clip", model=str(clip_folder), scoring="argmax", device="cpu")


def test_a_missing_clip_for_the_tagger_says_what_to_download(empty_hf_cache):
    for call in (lambda: get_tagger("clip"), lambda: check_backend("tagger", "clip")):
        with pytest.raises(ModelNotAvailable) as caught:
            call()
        message = str(caught.value)
        assert "tagger 'clip'" in message and "`hf download openai/clip-vit-large-patch14`" in message
        assert "WORKBENCH_CLIP_MODEL" in message


class ColourClip:
    """A "CLIP" that sees only colour, to check what the tagger does with the similarities: a text's
    embedding is the axis of the colour (or "dog") it names, an image's the share of each colour in it."""

    colours = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "white": (250, 250, 250)}
    concepts = [*colours, "dog"]

    def embed_texts(self, texts, batch_size=64):
        rows = torch.full((len(texts), len(self.concepts)), 1e-3)
        for i, text in enumerate(texts):
            for j, concept in enumerate(self.concepts):
                rows[i, j] += float(f" {concept} " in f" {text} ")
        return torch.nn.functional.normalize(rows, dim=-1)

    def embed_images(self, images, batch_size=16):
        table = torch.tensor(list(self.colours.values()), dtype=torch.float32)
        rows = []
        for image in images:
            pixels = torch.tensor(list(image.convert("RGB").getdata()), dtype=torch.float32)
            nearest = torch.cdist(pixels, table).argmin(dim=1)
            rows.append(torch.bincount(nearest, minlength=len(self.concepts)).float())
        return torch.nn.functional.normalize(torch.stack(rows), dim=-1)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_clip_tagger_keeps_the_tags_the_image_shows(scoring):
    tagger = ClipTagger(ColourClip(), tags=["red", "blue", "green", "dog"], scoring=scoring)
    for colour in ("blue", "red"):
        found = tagger.tag(Image.new("RGB", (32, 32), ColourClip.colours[colour]))
        assert [tag.name for tag in found] == [colour] and found[0].score > 0.99
    two = Image.new("RGB", (32, 32), ColourClip.colours["red"])
    two.paste(ColourClip.colours["green"], (0, 0, 32, 12))
    everything = ClipTagger(ColourClip(), tags=["dog", "green", "blue", "red"], scoring=scoring, threshold=0.0)
    ranked = everything.tag(two)
    assert [tag.name for tag in ranked[:2]] == ["red", "green"]  # more red than green, then what is absent
    assert ranked[1].score > ranked[2].score
    assert everything.tag_many([two, two]) == [ranked] * 2


# --- RAM ----------------------------------------------------------------------------------------


def test_ram_without_its_package_says_how_to_install_it_and_what_to_use_instead(monkeypatch):
    import importlib.util

    if importlib.util.find_spec("ram") is not None:
        pytest.skip("the recognize-anything package is installed here")
    for call in (lambda: get_tagger("ram"), lambda: check_backend("tagger", "ram")):
        with pytest.raises(ModelNotAvailable) as caught:
            call()
        message = str(caught.value)
        assert "pip install git+https://github.com/xinyu1205/recognize-anything.git" in message
        assert "ram_plus_swin_large_14m.pth" in message and "WORKBENCH_RAM_CHECKPOINT" in message
        assert "'clip' tagger" in message
    assert "ram" not in sys.modules


FAKE_RAM = '''
import numpy as np
import torch


class _Ram(torch.nn.Module):
    """Stands in for RAM++: four tags, logits fixed, the package's thresholds and deleted tags."""

    def __init__(self, pretrained):
        super().__init__()
        self.pretrained = pretrained
        self.fc = torch.nn.Linear(2, 1)
        self.tag_list = np.array(["cat", "dog", "sofa", "person"])
        self.class_threshold = torch.tensor([0.5, 0.5, 0.9, 0.5])
        self.delete_tag_index = [3]

    def generate_tag(self, image):
        assert image.shape == (1, 3, 384, 384)
        embed = torch.tensor([[[2.0, 0.0], [0.0, 0.0], [1.5, 0.0], [3.0, 0.0]]])
        logits = self.fc(embed).squeeze(-1)
        return ["cat"], ["猫"]


def ram_plus(pretrained="", image_size=384, vit="swin_l"):
    model = _Ram(pretrained)
    with torch.no_grad():
        model.fc.weight.copy_(torch.tensor([[1.0, 0.0]]))
        model.fc.bias.zero_()
    return model
'''


def test_ram_tags_above_its_thresholds_best_first_when_installed(tmp_path, monkeypatch):
    package = tmp_path / "site" / "ram"
    (package / "models").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "models" / "__init__.py").write_text(textwrap.dedent(FAKE_RAM))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "ram", raising=False)
    monkeypatch.delitem(sys.modules, "ram.models", raising=False)
    checkpoint = tmp_path / "ram.pth"
    checkpoint.write_bytes(b"weights")
    monkeypatch.setenv("WORKBENCH_RAM_CHECKPOINT", str(checkpoint))
    tagger = get_tagger("ram", device="cpu")
    assert tagger.model.pretrained == str(checkpoint)
    found = tagger.tag(picture())
    # sigmoid(2) = 0.88 passes 0.5; sigmoid(0) = 0.5 does not pass; sofa's 0.82 misses its 0.9;
    # person is a deleted tag.
    assert [tag.name for tag in found] == ["cat"]
    assert found[0].score == pytest.approx(torch.sigmoid(torch.tensor(2.0)).item())
    sys.modules.pop("ram", None)
    sys.modules.pop("ram.models", None)


def test_real_models_tag_with_ram_when_it_is_installed_and_with_clip_otherwise(tmp_path, monkeypatch):
    import importlib.util

    from pipelines.realign_fine import FineStageConfig, backend_names

    monkeypatch.setenv("WORKBENCH_RAM_CHECKPOINT", str(tmp_path / "ram.pth"))
    monkeypatch.delitem(sys.modules, "ram", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    if importlib.util.find_spec("ram") is None:  # not installed here: CLIP stands in
        assert backend_names(FineStageConfig(model="sd15"))["tagger"] == "clip"
    (tmp_path / "site" / "ram").mkdir(parents=True)
    (tmp_path / "site" / "ram" / "__init__.py").write_text("")
    importlib.invalidate_caches()
    assert backend_names(FineStageConfig(model="sd15"))["tagger"] == "clip"  # installed, but no checkpoint yet
    (tmp_path / "ram.pth").write_bytes(b"weights")
    assert backend_names(FineStageConfig(model="sd15"))["tagger"] == "ram"
    assert backend_names(FineStageConfig(model="sd15", tagger="clip"))["tagger"] == "clip"  # a named one stands
    assert backend_names(FineStageConfig(model="shapes"))["tagger"] == "shapes"
    sys.modules.pop("ram", None)


def test_unknown_tagger_lists_the_backends():
    with pytest.raises(InvalidInput, match="shapes, clip, ram"):
        get_tagger("owl")
