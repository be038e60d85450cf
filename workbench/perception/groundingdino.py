"""GroundingDINO (open-vocabulary detection from a caption) through the `groundingdino-py` package.

How an image is read: the labels become one caption the GroundingDINO way ("cat . dog ."), the model
scores each of its queries against every caption token, and a query's label is the label whose tokens
it matches best; its score is that match, in [0, 1]. Boxes come back in pixels (x0, y0, x1, y1),
best first, with duplicates of the same label merged by non-maximum suppression.

Loading never touches the network: the text encoder (BERT) is read from a local folder or the
Hugging Face cache with `local_files_only=True`, and the checkpoint with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image

from workbench.errors import ModelNotAvailable
from workbench.perception.base import Detection
from workbench.perception.checkpoints import Missing, load_state_dict, raise_if_missing
from workbench.perception.coco import COCO_CLASSES

CHECKPOINT_NAME = "groundingdino_swint_ogc.pth"
CONFIG_NAME = "GroundingDINO_SwinT_OGC.py"
GROUNDINGDINO_PIP = "groundingdino-py==0.4.0"

_FETCH_CHECKPOINT = (
    f"Download {CHECKPOINT_NAME} (Swin-T OGC, ~700 MB) from the IDEA-Research/GroundingDINO GitHub releases "
    f"(https://github.com/IDEA-Research/GroundingDINO/releases/download/v0.1.0-alpha/{CHECKPOINT_NAME}) or with "
    f"`hf download ShilongLiu/GroundingDINO {CHECKPOINT_NAME} GroundingDINO_SwinT_OGC.cfg.py --local-dir DIR`, "
    f"and put it at that path (or set WORKBENCH_GROUNDINGDINO_CHECKPOINT to where it is).")
_FETCH_CONFIG = (
    f"groundingdino-py ships {CONFIG_NAME} in its groundingdino/config/ folder; the same file is "
    f"GroundingDINO_SwinT_OGC.cfg.py in `hf download ShilongLiu/GroundingDINO GroundingDINO_SwinT_OGC.cfg.py`. "
    f"Put it at that path or set WORKBENCH_GROUNDINGDINO_CONFIG to it.")


def packaged_config() -> Path | None:
    """The Swin-T config that groundingdino-py installs with itself (None when it is not installed)."""
    import importlib.util

    spec = importlib.util.find_spec("groundingdino")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "config" / CONFIG_NAME


def _require_package() -> None:
    import importlib.util

    if importlib.util.find_spec("groundingdino") is None:
        raise ModelNotAvailable(f"The GroundingDINO backend needs the groundingdino-py package: "
                                f"`pip install {GROUNDINGDINO_PIP}`.")


# --- the text encoder ----------------------------------------------------------------------------


def _text_encoder_missing(text_encoder: str) -> Missing | None:
    """Whether the BERT text encoder is on disk, checked without loading it."""
    fetch = (f"Download it once with `hf download {text_encoder}` (it goes to the Hugging Face cache, "
             f"~/.cache/huggingface/hub or $HF_HOME), or set WORKBENCH_GROUNDINGDINO_TEXT_ENCODER to a local "
             f"folder holding its config.json, vocabulary and weights.")
    path = Path(text_encoder).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            return Missing("text encoder (BERT)", f"{path} (no config.json)", fetch)
        if not any((path / name).is_file() for name in BERT_WEIGHTS):
            return Missing("text encoder (BERT)", f"{path} (no weights: {' or '.join(BERT_WEIGHTS)})", fetch)
        return None
    if path.is_absolute() or text_encoder.startswith((".", "~")):
        return Missing("text encoder (BERT)", str(path), fetch)
    from huggingface_hub import try_to_load_from_cache

    def cached(name: str) -> bool:
        return isinstance(try_to_load_from_cache(text_encoder, name), str)

    if cached("config.json") and any(cached(name) for name in BERT_WEIGHTS):
        return None
    return Missing("text encoder (BERT)", f"'{text_encoder}' in the Hugging Face cache (its config.json and "
                                          f"weights)", fetch)


# The files a saved BERT keeps its weights in (transformers reads either).
BERT_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def load_text_encoder(text_encoder: str):
    """(tokenizer, BertModel) from a local folder or the HF cache, never from the network."""
    import transformers
    from transformers import AutoTokenizer, BertModel

    transformers.utils.logging.disable_progress_bar()  # loading bars would flood the CLI and job logs
    source = str(Path(text_encoder).expanduser()) if Path(text_encoder).expanduser().is_dir() else text_encoder
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        bert = BertModel.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as error:  # huggingface_hub's not-found errors are OSErrors
        reason = str(error).splitlines()[0][:300]
        raise ModelNotAvailable(f"The GroundingDINO text encoder '{text_encoder}' could not be loaded from disk: "
                                f"{reason} Download it once with `hf download {text_encoder}` or point "
                                f"WORKBENCH_GROUNDINGDINO_TEXT_ENCODER at a local BERT folder.") from None
    if not getattr(tokenizer, "is_fast", False):
        raise ModelNotAvailable(f"The text encoder '{text_encoder}' has no fast tokenizer (tokenizer.json or "
                                f"vocab.txt); GroundingDINO needs one to map words to tokens.")
    return tokenizer, bert


def check_files(config_path: str | Path | None, checkpoint_path: str | Path, text_encoder: str) -> None:
    """Raise one ModelNotAvailable naming every missing file (cheap: nothing is loaded)."""
    _require_package()
    config = Path(config_path).expanduser() if config_path else packaged_config()
    checkpoint = Path(checkpoint_path).expanduser()
    missing = []
    if not config.is_file():
        missing.append(Missing("GroundingDINO config", str(config), _FETCH_CONFIG))
    if not checkpoint.is_file():
        missing.append(Missing("GroundingDINO checkpoint", str(checkpoint), _FETCH_CHECKPOINT))
    text_missing = _text_encoder_missing(str(text_encoder))
    if text_missing:
        missing.append(text_missing)
    raise_if_missing("GroundingDINO detector", missing)


# --- shim: groundingdino-py 0.4.0 against transformers 5 ----------------------------------------
# groundingdino-py wraps BERT in `BertModelWarper`, which copies `get_extended_attention_mask`,
# `invert_attention_mask` and `get_head_mask` from the BertModel and calls its encoder with
# transformers-4 arguments (head_mask, ...). transformers 5 removed those methods, so building the
# model fails with AttributeError. `_BertWrapper` below is a drop-in for it: the same submodules
# (so checkpoint keys `bert.embeddings.*`, `bert.encoder.*`, `bert.pooler.*` still match) and the same
# computation for the encoder-only use GroundingDINO makes of it: a per-phrase (B, T, T) or padding
# (B, T) attention mask turned into an additive mask, BERT embeddings with GroundingDINO's per-phrase
# position ids, the encoder, the pooler.


class _BertWrapper(torch.nn.Module):
    def __init__(self, bert_model):
        super().__init__()
        self.config = bert_model.config
        self.embeddings = bert_model.embeddings
        self.encoder = bert_model.encoder
        self.pooler = bert_model.pooler

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, **_):
        from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embedded = self.embeddings(input_ids=input_ids, position_ids=position_ids, token_type_ids=token_type_ids)
        # (B, T, T) -> (B, 1, T, T); (B, T) -> (B, 1, 1, T); 0 where attended, dtype-min where not.
        mask = attention_mask[:, None] if attention_mask.dim() == 3 else attention_mask[:, None, None, :]
        additive = (1.0 - mask.to(embedded.dtype)) * torch.finfo(embedded.dtype).min
        hidden = self.encoder(embedded, attention_mask=additive).last_hidden_state
        pooled = self.pooler(hidden) if self.pooler is not None else None
        return BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state=hidden, pooler_output=pooled)


_build_lock = threading.Lock()  # the patches below are module-global while a model is built


@contextmanager
def _groundingdino_uses(tokenizer, bert):
    """While building: groundingdino-py takes our offline-loaded tokenizer/BERT and our BERT wrapper.

    Its own loaders call `from_pretrained(name)` with network access allowed (and print); its
    wrapper breaks on transformers 5 (see above).
    """
    from groundingdino.models.GroundingDINO import groundingdino as gd_module
    from groundingdino.util import get_tokenlizer

    saved = (get_tokenlizer.get_tokenlizer, get_tokenlizer.get_pretrained_language_model, gd_module.BertModelWarper)
    with _build_lock:
        get_tokenlizer.get_tokenlizer = lambda _name: tokenizer
        get_tokenlizer.get_pretrained_language_model = lambda _name: bert
        gd_module.BertModelWarper = _BertWrapper
        try:
            yield
        finally:
            (get_tokenlizer.get_tokenlizer, get_tokenlizer.get_pretrained_language_model,
             gd_module.BertModelWarper) = saved


# --- the detector --------------------------------------------------------------------------------


def build_model(config_path: Path, tokenizer, bert):
    """GroundingDINO, randomly initialised, from a config file and an already loaded text encoder."""
    from groundingdino.models import build_model as gd_build_model
    from groundingdino.util.slconfig import SLConfig

    args = SLConfig.fromfile(str(config_path))
    args.device = "cpu"
    # Gradient checkpointing only saves memory in training; at inference it changes nothing but
    # goes through torch.utils.checkpoint, which newer torch versions warn about without use_reentrant.
    args.use_checkpoint = False
    args.use_transformer_ckpt = False
    with _groundingdino_uses(tokenizer, bert):
        return gd_build_model(args)


def caption_spans(labels: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """GroundingDINO's caption for the labels ("cat . dog .") and each label's character span in it."""
    caption, spans = "", []
    for label in labels:
        spans.append((len(caption), len(caption) + len(label)))
        caption += label + " . "
    return caption.strip(), spans


def vocabulary(labels: list[str] | None) -> dict[str, str]:
    """Caption form (lower case, single spaces, no dots) -> the label as the caller wrote it.

    GroundingDINO reads lower-case captions and splits phrases at dots; with no labels, the COCO classes.
    """
    words = {}
    for label in labels or COCO_CLASSES:
        text = " ".join(str(label).lower().replace(".", " ").split())
        if text and text not in words:
            words[text] = str(label).strip()
    return words or {name: name for name in COCO_CLASSES}


class GroundingDinoDetector:
    """Open-vocabulary detector: finds the objects named by `labels` (default: the 80 COCO classes)."""

    def __init__(self, config_path: str | Path | None, checkpoint_path: str | Path,
                 text_encoder: str = "bert-base-uncased", box_threshold: float = 0.35,
                 text_threshold: float = 0.25, device: str | None = None, nms_iou: float | None = 0.5,
                 image_size: int = 800, max_size: int = 1333):
        _require_package()
        self.config_path = Path(config_path).expanduser() if config_path else packaged_config()
        self.checkpoint_path = Path(checkpoint_path).expanduser()
        self.text_encoder = str(text_encoder)
        self.box_threshold = float(box_threshold)
        self.text_threshold = float(text_threshold)
        self.nms_iou = nms_iou
        self.image_size, self.max_size = int(image_size), int(max_size)  # GroundingDINO's resize: 800, max 1333

        check_files(self.config_path, self.checkpoint_path, self.text_encoder)

        from workbench.config import get_settings
        from workbench.devices import pick_device

        self.device = pick_device(device or get_settings().device)
        self.tokenizer, bert = load_text_encoder(self.text_encoder)
        model = build_model(self.config_path, self.tokenizer, bert)
        self._load_weights(model)
        self.model = model.eval().to(self.device)
        self.max_text_len = int(getattr(model, "max_text_len", 256))

    def _load_weights(self, model) -> None:
        import argparse

        from groundingdino.util.misc import clean_state_dict

        # The released checkpoints wrap the tensors as {"model": ...}; Namespace covers training args.
        state = clean_state_dict(load_state_dict(self.checkpoint_path, "GroundingDINO checkpoint", key="model",
                                                 allowed_globals=(argparse.Namespace,)))
        result = model.load_state_dict(state, strict=False)
        # BERT weights may come from the text encoder instead; every detector weight must be there.
        lost = [key for key in result.missing_keys if not key.startswith("bert.")]
        if lost:
            raise ModelNotAvailable(
                f"The GroundingDINO checkpoint {self.checkpoint_path} does not fit the config {self.config_path}: "
                f"{len(lost)} weights are missing (e.g. {', '.join(lost[:3])}). Use the config that came with the "
                f"checkpoint ({CONFIG_NAME} for {CHECKPOINT_NAME}).")

    # -- inference --

    def _chunks(self, labels: list[str]) -> list[list[str]]:
        """Label groups whose captions fit the model's text length (the 80 COCO names fit in one)."""
        chunks, current = [], []
        for label in labels:
            trial = current + [label]
            if current and len(self.tokenizer(caption_spans(trial)[0])["input_ids"]) > self.max_text_len:
                chunks.append(current)
                trial = [label]
            current = trial
        return chunks + [current]

    def _preprocess(self, image: Image.Image) -> torch.Tensor:
        import groundingdino.datasets.transforms as T

        resized, _ = T.resize(image, None, self.image_size, self.max_size)  # deterministic, unlike RandomResize
        tensor, _ = T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])(T.ToTensor()(resized, None)[0], None)
        return tensor

    @torch.no_grad()
    def _detect_chunk(self, pixels: torch.Tensor, labels: list[str], width: int, height: int) -> list[Detection]:
        """Detections for one caption; `labels` in caption form (see `vocabulary`)."""
        from torchvision.ops import box_convert

        caption, spans = caption_spans(labels)
        outputs = self.model(pixels[None].to(self.device), captions=[caption])
        logits = outputs["pred_logits"][0].float().sigmoid().cpu()  # (queries, max_text_len)
        boxes = outputs["pred_boxes"][0].float().cpu()  # (queries, 4) cx, cy, w, h in [0, 1]

        # Which tokens belong to which label (character span -> token indices).
        tokenized = self.tokenizer(caption)
        owner = torch.zeros(len(labels), logits.shape[1], dtype=torch.bool)
        for index, (start, end) in enumerate(spans):
            for char in range(start, end):
                token = tokenized.char_to_token(char)
                if token is not None and token < logits.shape[1]:
                    owner[index, token] = True
        # A query's match with a label: its best score over that label's tokens. (queries, labels)
        per_label = torch.stack([logits[:, tokens].amax(dim=1) if tokens.any() else torch.zeros(len(logits))
                                 for tokens in owner], dim=1)
        scores, label_index = per_label.max(dim=-1)
        keep = (scores > self.box_threshold) & (scores > self.text_threshold)

        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        xyxy = box_convert(boxes[keep] * scale, in_fmt="cxcywh", out_fmt="xyxy")
        xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, width)
        xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, height)
        return [Detection(labels[int(k)], tuple(float(v) for v in box), float(s))
                for box, s, k in zip(xyxy, scores[keep], label_index[keep])]

    def detect(self, image: Image.Image, labels: list[str] | None = None) -> list[Detection]:
        image = image.convert("RGB")
        width, height = image.size
        pixels = self._preprocess(image)
        words = vocabulary(labels)
        detections = []
        for chunk in self._chunks(list(words)):
            detections += [Detection(words[d.label], d.box, d.score)
                           for d in self._detect_chunk(pixels, chunk, width, height)]
        return _suppress_duplicates(detections, self.nms_iou)


def _suppress_duplicates(detections: list[Detection], iou: float | None) -> list[Detection]:
    """Best first; boxes of the same label overlapping a better one by more than `iou` dropped."""
    detections = sorted(detections, key=lambda d: d.score, reverse=True)
    if iou is None or not detections:
        return detections
    from torchvision.ops import batched_nms

    names = sorted({d.label for d in detections})
    kept = batched_nms(torch.tensor([d.box for d in detections], dtype=torch.float32),
                       torch.tensor([d.score for d in detections], dtype=torch.float32),
                       torch.tensor([names.index(d.label) for d in detections]), iou)
    return [detections[int(i)] for i in kept]  # batched_nms returns indices by decreasing score
