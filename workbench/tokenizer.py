"""Build a small CLIP BPE tokenizer whose vocabulary holds whole words of a closed world.

The shapes model (and the tiny test models) need a real `CLIPTokenizer` that diffusers pipelines can
use and `save_pretrained` can ship, but no hub download. Every listed word becomes one token; any
other text still tokenizes, character by character (letters, digits and punctuation are in the base
alphabet), so no prompt is ever rejected by the tokenizer.
"""

from __future__ import annotations

import string
from collections.abc import Iterable

from transformers import CLIPTokenizer

SPECIAL_TOKENS = ["<|startoftext|>", "<|endoftext|>"]
BASE_ALPHABET = string.ascii_lowercase + string.digits + string.punctuation


def build_word_tokenizer(words: Iterable[str], model_max_length: int = 77) -> CLIPTokenizer:
    vocab: dict[str, int] = {}
    merges: list[tuple[str, str]] = []

    def add(token: str) -> None:
        if token not in vocab:
            vocab[token] = len(vocab)

    for token in SPECIAL_TOKENS:
        add(token)
    for char in BASE_ALPHABET:
        add(char)
        add(char + "</w>")
    # A chain of merges per word (w o r d</w> -> wo r d</w> -> wor d</w> -> word</w>) makes
    # BPE emit the whole word as one token.
    for word in sorted({w.lower() for w in words if w}):
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        for char in symbols:
            add(char)
        while len(symbols) > 1:
            merge = (symbols[0], symbols[1])
            if merge not in merges:
                merges.append(merge)
            symbols = [symbols[0] + symbols[1]] + symbols[2:]
            add(symbols[0])
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
