"""Paired statistics of two evaluations: intervals that cover what they should, clustered by prompt."""

import json

import numpy as np
import pytest

from workbench.cli import main as cli_main
from workbench.errors import InvalidInput
from workbench.evaluation import summarize
from workbench.significance import paired_differences


def rows(correct: dict[tuple[int, int], bool], tags: dict[int, str] | None = None) -> list[dict]:
    """Verdict rows from {(prompt index, seed): correct}."""
    return [{"index": index, "seed": seed, "tag": (tags or {}).get(index, "counting"), "prompt": f"prompt {index}",
             "correct": ok} for (index, seed), ok in sorted(correct.items())]


def random_rows(n_prompts: int, n_seeds: int, p: float, seed: int, tags=None) -> list[dict]:
    rng = np.random.default_rng(seed)
    return rows({(i, s): bool(rng.random() < p) for i in range(n_prompts) for s in range(n_seeds)}, tags)


def by_tag(differences):
    return {d.tag: d for d in differences}


def test_an_evaluation_against_itself_differs_by_nothing():
    base = random_rows(40, 4, 0.5, seed=0)
    overall = by_tag(paired_differences(base, base))["overall"]
    assert (overall.diff, overall.low, overall.high) == (0.0, 0.0, 0.0)
    assert overall.p_value == 1.0


def test_a_real_gain_is_called_one_and_noise_is_not():
    tags = {i: ("position" if i < 50 else "counting") for i in range(100)}
    base = random_rows(100, 4, 0.3, seed=1, tags=tags)
    # The other model gets every position image right, and counting by a fresh coin of the same bias.
    better = [{**row, "correct": True} if row["tag"] == "position" else row
              for row in random_rows(100, 4, 0.3, 2, tags)]
    result = by_tag(paired_differences(base, better))
    assert result["position"].low > 0.5 and result["position"].p_value < 0.001
    assert result["counting"].low < 0 < result["counting"].high  # same bias: the interval holds 0
    assert result["counting"].p_value > 0.05
    assert result["overall"].diff == pytest.approx((result["position"].diff + result["counting"].diff) / 2)
    assert result["overall"].base == pytest.approx(summarize(base)["overall"])
    assert result["overall"].other == pytest.approx(summarize(better)["overall"])


def test_a_gain_on_one_prompt_is_less_sure_than_the_same_gain_spread_over_prompts():
    # 20 prompts x 8 seeds, the base wrong everywhere. Both others get 8 more images right: all eight
    # seeds of one prompt, or one seed of eight prompts. The seeds of one prompt are not eight
    # independent tries, so the first is far less sure.
    base = rows({(i, s): False for i in range(20) for s in range(8)})
    one_prompt = rows({(i, s): i == 0 for i in range(20) for s in range(8)})
    spread = rows({(i, s): i < 8 and s == 0 for i in range(20) for s in range(8)})
    concentrated = by_tag(paired_differences(base, one_prompt))["counting"]
    wide = by_tag(paired_differences(base, spread))["counting"]
    assert concentrated.diff == wide.diff == pytest.approx(8 / 160)
    assert concentrated.p_value > 0.5 and wide.p_value < 0.01  # one prompt of 20: its sign is a coin flip
    assert concentrated.low == 0.0 and wide.low > 0.0


def test_evaluations_of_different_prompts_or_seeds_are_refused():
    base = random_rows(10, 4, 0.5, seed=0)
    with pytest.raises(InvalidInput, match="not of the same prompts and seeds"):
        paired_differences(base, random_rows(10, 3, 0.5, seed=1))
    with pytest.raises(InvalidInput, match="not made from the same prompt file"):
        paired_differences(base, [{**row, "tag": "colors"} for row in base])
    with pytest.raises(InvalidInput, match="not made from the same prompt file"):  # other words, same tags
        paired_differences(base, [{**row, "prompt": "other words"} for row in base])
    with pytest.raises(InvalidInput, match="twice"):
        paired_differences(base + base[:1], base)


def write_eval(folder, verdicts: list[dict]) -> None:
    folder.mkdir(parents=True)
    summary = summarize(verdicts)
    (folder / "scores.json").write_text(json.dumps({**summary, "config": {"model": "shapes", "loras": []}}))
    lines = [json.dumps({**row, "path": f"images/{row['index']}-{row['seed']}.png"}) for row in verdicts]
    (folder / "verdicts.jsonl").write_text("".join(line + "\n" for line in lines))


def test_cli_diff_prints_the_table_of_two_evaluation_folders(tmp_path, capsys):
    tags = {i: ("position" if i % 2 else "two_object") for i in range(30)}
    base, other = random_rows(30, 4, 0.2, 3, tags), random_rows(30, 4, 0.9, 4, tags)
    write_eval(tmp_path / "base", base)
    write_eval(tmp_path / "adapter", other)
    assert cli_main(["diff", str(tmp_path / "base"), str(tmp_path / "adapter"), "--resamples", "2000"]) == 0
    out = capsys.readouterr().out
    overall = next(line for line in out.splitlines() if line.startswith("overall"))
    expected = 100 * (summarize(other)["overall"] - summarize(base)["overall"])
    assert f"{expected:+.1f}" in overall and "95% CI" in out
    assert cli_main(["diff", str(tmp_path / "base"), str(tmp_path / "adapter"), "--json", "--resamples", "500"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data[0]["differences"][-1]["tag"] == "overall"
    assert data[0]["differences"][-1]["low"] > 0


def test_cli_diff_of_one_evaluation_or_of_mismatched_ones_says_what_to_do(tmp_path, capsys):
    write_eval(tmp_path / "base", random_rows(10, 4, 0.5, 0))
    write_eval(tmp_path / "fewer-seeds", random_rows(10, 2, 0.5, 1))
    assert cli_main(["diff", str(tmp_path / "base")]) == 2
    assert "give a second one" in capsys.readouterr().err
    assert cli_main(["diff", str(tmp_path / "base"), str(tmp_path / "fewer-seeds")]) == 2
    assert "same prompt file and seeds" in capsys.readouterr().err
    assert cli_main(["diff", str(tmp_path / "base"), str(tmp_path / "missing")]) == 2
    assert "No run or evaluation" in capsys.readouterr().err
