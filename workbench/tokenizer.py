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
    words = [list(w[:-1]) + [w[-1] + "</w>"] for w in sorted({w.lower() for w in words if w})]
    for symbols in words:
        for symbol in symbols:
            add(symbol)
    # Learn merges the way BPE training does (most frequent pair first, applied to every word) until
    # each word is one symbol. Replaying merges in rank order then rebuilds every word whole; a chain
    # per word would not, since an earlier word's merge can pre-empt a later word's chain.
    while True:
        counts: dict[tuple[str, str], int] = {}
        for symbols in words:
            for pair in zip(symbols, symbols[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = min(counts, key=lambda pair: (-counts[pair], pair))  # ties: alphabetical, deterministic
        merges.append(best)
        add(best[0] + best[1])
        words = [_apply_merge(symbols, best) for symbols in words]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def _apply_merge(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    merged, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged
