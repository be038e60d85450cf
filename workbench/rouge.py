"""ROUGE-L (longest common subsequence) between prompts, and SELMA's near-duplicate filter.

    rouge_l("a red circle", "a big red circle")   -> 0.857...  (LCS 3; P 3/4, R 3/3)
    keep, stats = filter_prompts(candidates, existing=seeds, threshold=0.8)

The score matches the `rouge_score` package's `RougeScorer(["rougeL"], use_stemmer=False)` F-measure,
which SELMA's prompt generation (after Self-Instruct / Stanford Alpaca) uses: text lowercased, every
run of characters other than a-z and 0-9 replaced by a space (so accented letters and other scripts
are dropped, as there), split on whitespace; no stemming. The F-measure is 2PR / (P + R) with
P = LCS / len(prediction), R = LCS / len(target), and 0 when either side has no tokens. It is
symmetric, so which prompt is the "target" does not matter.

SELMA's filter (llm/prompt_generation.py in the authors' code) keeps a new prompt only when its
ROUGE-L against every prompt kept so far (the seed examples included) is at most 0.8.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

DEFAULT_THRESHOLD = 0.8  # the authors' code rejects a prompt whose best match scores above 0.8

_NON_ALPHANUMERIC = re.compile(r"[^a-z0-9]+")


def tokenize(text: str) -> list[str]:
    """rouge_score's tokenizer without a stemmer."""
    return _NON_ALPHANUMERIC.sub(" ", text.lower()).split()


def _masks(tokens: list[str]) -> dict[str, int]:
    """For each token, the bit set of the positions where it occurs."""
    masks: dict[str, int] = {}
    for i, token in enumerate(tokens):
        masks[token] = masks.get(token, 0) | (1 << i)
    return masks


def _lcs(masks: dict[str, int], n: int, other: list[str]) -> int:
    # Bit-parallel LCS (Allison & Dix 1986; Hyyro 2004): one big-integer update per token of `other`
    # instead of a len x len table, which keeps filtering thousands of prompts fast in pure Python.
    v = (1 << n) - 1
    for token in other:
        u = v & masks.get(token, 0)
        v = (v + u) | (v - u)
    return n - bin(v & ((1 << n) - 1)).count("1")


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists."""
    return _lcs(_masks(a), len(a), b) if a and b else 0


def _fmeasure(lcs: int, n_target: int, n_prediction: int) -> float:
    if not lcs:
        return 0.0
    precision, recall = lcs / n_prediction, lcs / n_target
    return 2 * precision * recall / (precision + recall)


def rouge_l(target: str, prediction: str) -> float:
    """ROUGE-L F-measure of two texts, as rouge_score computes it (see the module docstring)."""
    a, b = tokenize(target), tokenize(prediction)
    return _fmeasure(lcs_length(a, b), len(a), len(b)) if a and b else 0.0


@dataclass
class FilterStats:
    """What became of the candidates offered to a filter."""

    generated: int = 0  # candidates offered
    kept: int = 0
    near_duplicates: int = 0  # ROUGE-L above the threshold against a kept prompt
    invalid: int = 0  # not text, empty, or no word rouge counts
    max_rouge: list[float | None] = field(default_factory=list)  # per candidate, None for invalid ones

    def to_dict(self) -> dict:
        scores = [s for s in self.max_rouge if s is not None]
        return {"generated": self.generated, "kept": self.kept, "near_duplicates": self.near_duplicates,
                "invalid": self.invalid, "mean_max_rouge": round(sum(scores) / len(scores), 4) if scores else None,
                "max_rouge": [None if s is None else round(s, 4) for s in self.max_rouge]}


class RougeFilter:
    """Keeps prompts whose ROUGE-L F-measure against every prompt already in the pool is at most
    `threshold`; a kept prompt joins the pool. `existing` (e.g. the seed examples) starts the pool
    without being counted as kept."""

    def __init__(self, existing: Iterable[str] = (), threshold: float = DEFAULT_THRESHOLD):
        if not 0.0 <= threshold <= 1.0:
            from workbench.errors import InvalidInput

            raise InvalidInput(f"The ROUGE-L threshold must be between 0 and 1 (got {threshold}).")
        self.threshold = float(threshold)
        self.stats = FilterStats()
        self._pool: list[tuple[dict[str, int], int]] = []  # (position masks, length) of each pooled prompt
        self._seen: set[tuple[str, ...]] = set()
        for text in existing:
            tokens = tokenize(text) if isinstance(text, str) else []
            if tokens:
                self._add(tokens)

    def _add(self, tokens: list[str]) -> None:
        self._pool.append((_masks(tokens), len(tokens)))
        self._seen.add(tuple(tokens))

    def best_match(self, prompt: str) -> float:
        """The highest ROUGE-L of `prompt` against the pool (0 for an empty pool)."""
        tokens = tokenize(prompt)
        if not tokens:
            return 0.0
        if tuple(tokens) in self._seen:
            return 1.0
        best, n = 0.0, len(tokens)
        for masks, length in self._pool:
            if 2 * min(n, length) / (n + length) <= best:  # the best F this pair could reach
                continue
            best = max(best, _fmeasure(_lcs(masks, length, tokens), length, n))
        return best

    def offer(self, prompt) -> bool:
        """Score one candidate, keep it (and pool it) when it is diverse enough; True if kept."""
        self.stats.generated += 1
        tokens = tokenize(prompt) if isinstance(prompt, str) else []
        if not tokens:
            self.stats.invalid += 1
            self.stats.max_rouge.append(None)
            return False
        score = self.best_match(prompt)
        self.stats.max_rouge.append(score)
        # Plain ">" on rouge_score's arithmetic, as the authors' filter: 4 shared words of 5 comes out as
        # 0.8000000000000002 and is rejected at 0.8 there too. Kept so, so runs match the authors' and ours.
        if score > self.threshold:
            self.stats.near_duplicates += 1
            return False
        self.stats.kept += 1
        self._add(tokens)
        return True


def filter_prompts(candidates: Iterable, existing: Iterable[str] = (),
                   threshold: float = DEFAULT_THRESHOLD) -> tuple[list[str], FilterStats]:
    """The candidates kept in order (each compared with `existing` and the ones kept before it),
    and the filter's statistics. Kept prompts are returned with their whitespace normalised."""
    rouge_filter = RougeFilter(existing, threshold)
    kept = [" ".join(c.split()) for c in candidates if rouge_filter.offer(c)]
    return kept, rouge_filter.stats
