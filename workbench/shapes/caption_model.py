"""A tiny differentiable captioner of shapes scenes: the caption reward's gradient path in the shapes world.

RealignDiff's caption reward (arXiv 2305.19599, eq. 4) captions a generated image and compares the
caption with the prompt in a sentence-embedding space. Generated text is not differentiable, so
reward feedback learning (ReFL) cannot push a gradient through it. What can carry one is the
captioner's own belief that the prompt describes the image: the teacher-forced likelihood
log p(prompt | image), differentiable in the image's pixels (with BLIP on real models, this model
in the shapes world). Both measure the same thing, whether the captioner would say the prompt of
this image; `pipelines.realign` logs the caption reward and descends this one.

Architecture (about 1M parameters): a conv encoder turns a 64x64 image into an 8x8 grid of features
with learned positions, one transformer layer mixes them (so "left of" can be read off two
objects' places), and a two-layer transformer decoder over the world's words reads the prompt
token by token with cross-attention to the grid. It is trained by `pipelines.train_shapes_captioner`
on freshly rendered scenes of the training-prompt grammar (never ShapesBench's prompts).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from workbench.errors import ModelNotAvailable

CAPTION_MODEL_DIR = Path(__file__).resolve().parents[2] / "assets" / "models" / "shapes-captioner"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
PAD, BOS, EOS, UNK = range(4)


def words_of(text: str) -> list[str]:
    return re.findall(r"[a-z]+|\d", text.lower())


@dataclass
class CaptionerConfig:
    vocab: list[str]  # the world's words; ids follow SPECIALS
    width: int = 128
    heads: int = 4
    decoder_layers: int = 2
    max_words: int = 32
    image_size: int = 64


class WordTokenizer:
    """Words to ids over a closed vocabulary (unknown words -> <unk>); BOS ... EOS, padded."""

    def __init__(self, vocab: list[str], max_words: int):
        self.index = {word: k + len(SPECIALS) for k, word in enumerate(vocab)}
        self.max_words = max_words

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [[BOS] + [self.index.get(w, UNK) for w in words_of(t)][: self.max_words] + [EOS] for t in texts]
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), PAD, dtype=torch.long)
        for k, row in enumerate(rows):
            ids[k, : len(row)] = torch.tensor(row)
        return ids, ids != PAD


class CaptionModel(nn.Module):
    def __init__(self, config: CaptionerConfig):
        super().__init__()
        self.config = config
        d = config.width
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 64, 4, stride=4), nn.GELU(),  # 4x4 patches -> 16x16
            nn.Conv2d(64, 128, 3, padding=1), nn.GELU(),
            nn.Conv2d(128, d, 4, stride=2, padding=1),  # 8x8
        )
        grid = (config.image_size // 8) ** 2
        self.grid_position = nn.Parameter(torch.randn(1, grid, d) * 0.02)
        self.mixer = nn.TransformerEncoderLayer(d, config.heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.embed = nn.Embedding(len(config.vocab) + len(SPECIALS), d)
        self.word_position = nn.Parameter(torch.randn(1, config.max_words + 2, d) * 0.02)
        layer = nn.TransformerDecoderLayer(d, config.heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, config.decoder_layers)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, len(config.vocab) + len(SPECIALS))
        self.tokenizer = WordTokenizer(config.vocab, config.max_words)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """images: [B, 3, 64, 64] in [-1, 1] (what a VAE decodes) -> [B, 64, width] features."""
        grid = self.encoder(images).flatten(2).transpose(1, 2)
        return self.mixer(grid + self.grid_position)

    def logits(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode_images(images), ids)

    def decode(self, memory: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Next-word logits for ids (BOS ... EOS, padded) given encoded images: [B, words - 1, vocab]."""
        inputs = ids[:, :-1]
        x = self.embed(inputs) + self.word_position[:, : inputs.shape[1]]
        causal = nn.Transformer.generate_square_subsequent_mask(inputs.shape[1], device=ids.device)
        x = self.decoder(x, memory, tgt_mask=causal, tgt_is_causal=True, tgt_key_padding_mask=inputs == PAD)
        return self.head(self.norm(x))

    def log_likelihood(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Mean log-probability per word (EOS included) of each prompt given its image: [B], differentiable."""
        ids, mask = self.tokenizer(prompts)
        ids, mask = ids.to(images.device), mask.to(images.device)
        logp = F.log_softmax(self.logits(images, ids).float(), dim=-1)
        target, target_mask = ids[:, 1:], mask[:, 1:].float()
        picked = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        return (picked * target_mask).sum(1) / target_mask.sum(1)

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(folder / WEIGHTS_FILE))
        (folder / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=1))


def check_caption_model(folder: Path | str | None = None) -> Path:
    """The captioner's folder; ModelNotAvailable, saying how to make it, when its files are not there."""
    folder = Path(folder) if folder is not None else CAPTION_MODEL_DIR
    if not (folder / WEIGHTS_FILE).is_file() or not (folder / CONFIG_FILE).is_file():
        raise ModelNotAvailable(
            f"The shapes captioner (the caption reward of the shapes world) is not in {folder}. "
            f"Train it with `python -m pipelines.train_shapes_captioner --negatives 4 --steps 2000 --out {folder}` "
            "(about half an hour on a 2-core CPU).")
    return folder


def load_caption_model(folder: Path | str | None = None, device: str = "cpu") -> CaptionModel:
    """The shipped (or given) shapes captioner, eval mode, weights from safetensors only."""
    from safetensors.torch import load_file

    folder = check_caption_model(folder)
    model = CaptionModel(CaptionerConfig(**json.loads((folder / CONFIG_FILE).read_text())))
    model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    return model.to(device).eval()
