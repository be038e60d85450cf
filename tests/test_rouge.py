"""ROUGE-L as the rouge_score package computes it, and SELMA's near-duplicate filter."""

import random

import pytest

from workbench.errors import InvalidInput
from workbench.rouge import RougeFilter, filter_prompts, lcs_length, rouge_l, tokenize


def lcs_table(a, b):
    """The textbook dynamic programme, to check the bit-parallel LCS against."""
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            table[i][j] = table[i - 1][j - 1] + 1 if a[i - 1] == b[j - 1] else max(table[i - 1][j], table[i][j - 1])
    return table[-1][-1]


def test_tokenize_like_rouge_score():
    # Lowercase, anything but a-z0-9 splits (accented letters are dropped, as rouge_score does), no stemming.
    assert tokenize("Hello, World! 3D-printed cats") == ["hello", "world", "3d", "printed", "cats"]
    assert tokenize("Café déjà") == ["caf", "d", "j"]
    assert tokenize("  ...  ") == []


def test_identical_prompts_score_one_and_disjoint_ones_zero():
    assert rouge_l("a red circle above a square", "A red circle, above a square.") == 1.0
    assert rouge_l("a red circle", "two blue squares") == 0.0
    assert rouge_l("", "a circle") == 0.0 and rouge_l("!!", "!!") == 0.0


def test_hand_computed_lcs():
    # LCS("the cat sat on the mat", "the cat lay on a mat") = the cat on mat = 4 of 6 and 6 tokens.
    assert lcs_length(tokenize("the cat sat on the mat"), tokenize("the cat lay on a mat")) == 4
    assert rouge_l("the cat sat on the mat", "the cat lay on a mat") == pytest.approx(4 / 6)
    # Unequal lengths: LCS 3, precision 3/4, recall 3/3, F = 2PR/(P+R) = 6/7.
    assert rouge_l("a red circle", "a big red circle") == pytest.approx(6 / 7)
    assert rouge_l("a big red circle", "a red circle") == pytest.approx(6 / 7)  # symmetric
    # rouge_score's README example: rougeL precision 0.625, recall 0.556, F 0.588.
    assert rouge_l("The quick brown fox jumps over the lazy dog",
                   "The quick brown dog jumps on the log.") == pytest.approx(0.5882352941176471)


def test_bit_parallel_lcs_matches_the_dynamic_programme():
    rng = random.Random(0)
    for _ in range(300):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 80))]
        b = [rng.choice("abcd") for _ in range(rng.randint(0, 80))]
        assert lcs_length(a, b) == lcs_table(a, b)


def test_filter_rejects_near_duplicates_and_keeps_diverse_prompts():
    seeds = ["three red circles on a plain background"]
    candidates = [
        "three red circles on a plain white background",  # LCS 7 of 7 and 8 tokens: 14/15 > 0.8
        "a blue square to the left of a green triangle",
        "a blue square to the left of a green circle",  # near-duplicate of the kept one above
        "two purple triangles",
        "   ",  # nothing rouge counts
        "a blue square to the left of a green triangle",  # exact repeat
        "an orange circle above a yellow square",
    ]
    kept, stats = filter_prompts(candidates, existing=seeds, threshold=0.8)
    assert kept == ["a blue square to the left of a green triangle", "two purple triangles",
                    "an orange circle above a yellow square"]
    assert (stats.generated, stats.kept, stats.near_duplicates, stats.invalid) == (7, 3, 3, 1)
    assert stats.generated == stats.kept + stats.near_duplicates + stats.invalid
    assert len(stats.max_rouge) == stats.generated and stats.max_rouge[4] is None
    assert stats.max_rouge[0] == pytest.approx(14 / 15) and stats.max_rouge[5] == 1.0
    assert all(score > 0.8 for score, prompt in zip(stats.max_rouge, candidates)
               if score is not None and prompt not in kept)
    # Every kept prompt is at most 0.8 from every other kept prompt and from the seeds.
    for i, a in enumerate(kept + seeds):
        for b in (kept + seeds)[i + 1:]:
            assert rouge_l(a, b) <= 0.8


def test_threshold_is_inclusive():
    # "a red circle" vs "a red circle on grass": LCS 3 of 3 and 5, F = 2 * 0.6 / 1.6 = 0.75.
    score = rouge_l("a red circle", "a red circle on grass")
    assert score == pytest.approx(0.75)
    assert filter_prompts(["a red circle on grass"], existing=["a red circle"], threshold=score)[0]
    assert not filter_prompts(["a red circle on grass"], existing=["a red circle"], threshold=0.7)[0]
    # Only scores above the threshold are rejected: 1.0 keeps even repeats, 0 keeps only prompts
    # that share no word with any kept one.
    assert filter_prompts(["A circle.", "a circle"], threshold=1.0)[0] == ["A circle.", "a circle"]
    kept, stats = filter_prompts(["a circle", "a square", "two squares"], threshold=0.0)
    assert kept == ["a circle", "two squares"] and stats.near_duplicates == 1
    # As in rouge_score (and so the authors' filter), 4 shared words of 5 computes to just above 0.8.
    assert rouge_l("a b c d e", "a b c d f") == 2 * 0.8 * 0.8 / 1.6 > 0.8


def test_seeds_start_the_pool_without_counting_as_kept():
    rouge_filter = RougeFilter(["a red circle"], threshold=0.8)
    assert rouge_filter.best_match("a red circle") == 1.0
    assert not rouge_filter.offer("A red circle")
    assert rouge_filter.offer("two green squares below a triangle")
    assert rouge_filter.stats.to_dict()["kept"] == 1
    # Best matches: 1.0, then "a" shared with "a red circle" (LCS 1 of 3 and 6 tokens: F = 2/9).
    assert rouge_filter.stats.to_dict()["mean_max_rouge"] == pytest.approx((1.0 + 2 / 9) / 2, abs=1e-4)


def test_bad_threshold_is_refused():
    with pytest.raises(InvalidInput, match="between 0 and 1"):
        RougeFilter(threshold=1.5)
