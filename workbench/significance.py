"""How sure is a difference in accuracy? Paired, prompt-clustered statistics for two evaluations.

Two evaluations of the same prompts and seeds (a base model and an adapter, say) differ image by
image. This module says how far their per-tag and overall accuracies differ, with

* a 95% confidence interval from a cluster bootstrap: prompts are redrawn with replacement within
  each tag and keep all their seeds, because the seeds of one prompt are not independent samples
  (a prompt the model cannot draw fails on every seed). Both evaluations are redrawn together, so
  the interval is that of the paired difference;
* a two-sided p-value from a paired sign-flip (randomisation) test: if the two models were
  exchangeable, swapping which one drew a prompt's images would not change the difference's law,
  so each prompt's difference has its sign flipped at random.

overall is GenEval's: the mean of the per-tag accuracies (`workbench.evaluation.summarize`), and its
bootstrap redraws every tag in the same replicate.

What this does not measure: the spread between adapters trained with different seeds. These figures
say how well one adapter's score is pinned down by these prompts and seeds; a second training run
can land elsewhere (the adapter cards report that separately).

    python -m workbench diff EVAL_BASE EVAL_ADAPTER   # two `workbench eval` folders
    python -m workbench diff RUN                       # a comparison's variants, or an IPR run's
                                                       # iterations, each against the first
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InvalidInput

RESAMPLES = 10_000
LEVEL = 0.95
CHUNK_VALUES = 2_000_000  # resampling weights held at once (16 MB)


@dataclass
class Difference:
    tag: str  # a ShapesBench tag, or "overall"
    base: float  # accuracy, 0..1
    other: float
    low: float  # the confidence interval of other - base
    high: float
    p_value: float  # two-sided, paired sign-flip test of "no difference"
    prompts: int
    images: int

    @property
    def diff(self) -> float:
        return self.other - self.base

    def interval_text(self) -> str:
        """"[+3.6, +9.6]": the confidence interval, in points."""
        return f"[{100 * self.low:+.1f}, {100 * self.high:+.1f}]"

    def summary_text(self) -> str:
        """"+6.6 [+3.6, +9.6]": the difference and its interval, in points."""
        return f"{100 * self.diff:+.1f} {self.interval_text()}"

    def to_dict(self) -> dict:
        return {"tag": self.tag, "base": self.base, "other": self.other, "diff": self.diff, "low": self.low,
                "high": self.high, "p_value": self.p_value, "prompts": self.prompts, "images": self.images}


def _per_prompt_counts(base_rows: list[dict], other_rows: list[dict]) -> dict[str, np.ndarray]:
    """tag -> array [prompts, 3] of (base correct, other correct, images), matched by (prompt index, seed)."""

    def keyed(rows: list[dict], name: str) -> dict:
        table = {}
        for row in rows:
            key = (int(row["index"]), int(row["seed"]))
            if key in table:
                raise InvalidInput(f"the {name} evaluation scores prompt {key[0]} with seed {key[1]} twice")
            table[key] = (row["tag"], bool(row["correct"]), row.get("prompt"))
        return table

    base, other = keyed(base_rows, "first"), keyed(other_rows, "second")
    if not base:
        raise InvalidInput("the evaluations hold no scored images")
    if base.keys() != other.keys():
        only = sorted(base.keys() ^ other.keys())[:3]
        raise InvalidInput("the two evaluations are not of the same prompts and seeds, so they cannot be "
                           f"compared image by image (e.g. prompt, seed {only[0]} is in only one); "
                           "evaluate both with the same prompt file and seeds")
    counts: dict[str, dict[int, list[int]]] = {}
    for key, (tag, correct, prompt) in base.items():
        other_tag, other_correct, other_prompt = other[key]
        if other_tag != tag or (prompt is not None and other_prompt is not None and prompt != other_prompt):
            raise InvalidInput(f"prompt {key[0]} is '{prompt}' ({tag}) in one evaluation and '{other_prompt}' "
                               f"({other_tag}) in the other: they were not made from the same prompt file")
        cell = counts.setdefault(tag, {}).setdefault(key[0], [0, 0, 0])
        cell[0] += correct
        cell[1] += other_correct
        cell[2] += 1
    return {tag: np.array(list(by_prompt.values()), dtype=np.float64) for tag, by_prompt in counts.items()}


def paired_differences(base_rows: list[dict], other_rows: list[dict], resamples: int = RESAMPLES,
                       level: float = LEVEL, seed: int = 0) -> list[Difference]:
    """Per-tag differences (tags in order of first appearance), then "overall"; see the module doc."""
    if resamples < 100:
        raise InvalidInput(f"use at least 100 resamples (got {resamples})")
    if not 0 < level < 1:
        raise InvalidInput(f"the confidence level must be between 0 and 1 (got {level})")
    counts = _per_prompt_counts(base_rows, other_rows)
    rng = np.random.default_rng(seed)
    tail = (1 - level) / 2
    results, boot_diffs, flip_diffs, observed = [], [], [], []
    for tag, c in counts.items():
        base_correct, other_correct, images = c[:, 0], c[:, 1], c[:, 2]
        n_prompts = len(c)
        diff = (other_correct.sum() - base_correct.sum()) / images.sum()
        gained = other_correct - base_correct
        boot, flips = np.empty(resamples), np.empty(resamples)
        chunk = max(1, CHUNK_VALUES // n_prompts)  # a file of many prompts must not fill the memory
        for start in range(0, resamples, chunk):
            rows = slice(start, min(resamples, start + chunk))
            n = rows.stop - rows.start
            # Cluster bootstrap: how often each prompt is drawn in each replicate.
            weights = rng.multinomial(n_prompts, np.full(n_prompts, 1 / n_prompts), size=n).astype(np.float64)
            boot[rows] = weights @ gained / (weights @ images)
            # Sign flips: each prompt's difference counted with a random sign.
            flips[rows] = rng.choice([-1.0, 1.0], size=(n, n_prompts)) @ gained / images.sum()
        results.append(Difference(tag, base_correct.sum() / images.sum(), other_correct.sum() / images.sum(),
                                  *np.quantile(boot, [tail, 1 - tail]), _p_value(flips, diff),
                                  n_prompts, int(images.sum())))
        boot_diffs.append(boot)
        flip_diffs.append(flips)
        observed.append(diff)
    overall_boot, overall_flips = np.mean(boot_diffs, axis=0), np.mean(flip_diffs, axis=0)
    results.append(Difference("overall", float(np.mean([r.base for r in results])),
                              float(np.mean([r.other for r in results])),
                              *np.quantile(overall_boot, [tail, 1 - tail]),
                              _p_value(overall_flips, float(np.mean(observed))),
                              sum(r.prompts for r in results), sum(r.images for r in results)))
    return results


def _p_value(null: np.ndarray, observed: float) -> float:
    """Two-sided randomisation p-value, counting the observed assignment itself (never exactly 0)."""
    extreme = np.sum(np.abs(null) >= abs(observed) - 1e-12)
    return float((extreme + 1) / (len(null) + 1))


# --- runs ------------------------------------------------------------------------------------------


def against_first(variants: list[dict], rows: list[dict], resamples: int = RESAMPLES, level: float = LEVEL,
                  seed: int = 0) -> list[tuple[str, list[Difference]]]:
    """(label, differences from the first variant) for every later variant of a comparison
    (`workbench.report.load_comparison`'s variants and rows: a comparison, an evaluation or an IPR run)."""
    by_variant: dict[int, list[dict]] = {}
    for row in rows:
        by_variant.setdefault(int(row["variant"]), []).append(row)
    return [(variant["label"], paired_differences(by_variant.get(0, []), by_variant.get(v, []), resamples, level, seed))
            for v, variant in enumerate(variants) if v > 0]


def format_differences(differences: list[Difference], base_label: str = "base", other_label: str = "other",
                       level: float = LEVEL) -> str:
    """A plain-text table in percentage points."""
    width = max(7, len(base_label), len(other_label))
    head = (f"{'tag':<14} {base_label:>{width}} {other_label:>{width}} {'diff':>7} "
            f"{f'{round(100 * level)}% CI':>16} {'p':>7}  sample")
    lines = [head]
    for d in differences:
        lines.append(f"{d.tag:<14} {100 * d.base:>{width}.1f} {100 * d.other:>{width}.1f} {100 * d.diff:>+7.1f} "
                     f"{d.interval_text():>16} {d.p_value:>7.4f}  "
                     f"{d.prompts} prompts, {d.images} images")
    return "\n".join(lines)
