"""Ctrl-C in a pipeline's command line: one line saying what is kept and how to continue, no stack trace."""

from __future__ import annotations

import importlib

import pytest

CASES = [
    ("pipelines.ipr", "run_ipr", ["--model", "shapes", "--out", "{out}"], "--resume"),
    ("pipelines.selma", "run_selma", ["--model", "shapes", "--out", "{out}"], "--resume"),
    ("pipelines.recap", "run_recap", ["run", "--model", "shapes", "--out", "{out}"], "--resume"),
    ("pipelines.realign", "run_refl", ["--model", "shapes", "--out", "{out}"], "run the same command again"),
]


@pytest.mark.parametrize("module_name, runner, argv, hint", CASES, ids=[case[0] for case in CASES])
def test_ctrl_c_stops_a_pipeline_with_a_message_that_says_how_to_continue(module_name, runner, argv, hint,
                                                                         tmp_path, monkeypatch, capsys):
    module = importlib.import_module(module_name)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, runner, interrupted)
    out = tmp_path / "run"
    try:
        code = module.main([arg.format(out=out) for arg in argv])
    except KeyboardInterrupt:  # escaping would stop pytest itself, not just fail this test
        pytest.fail(f"Ctrl-C escaped {module_name}.main")
    assert code == 130
    err = capsys.readouterr().err
    assert str(out) in err and hint in err
    assert len(err.strip().splitlines()) == 1


def test_ctrl_c_in_the_trainer_exits_130_and_names_the_checkpoint_folder(tmp_path, monkeypatch, capsys):
    from pipelines import trainer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "train", interrupted)
    with pytest.raises(SystemExit) as stopped:
        try:
            trainer.main(["--model", "shapes", "--data", str(tmp_path), "--out", str(tmp_path / "out")])
        except KeyboardInterrupt:
            pytest.fail("Ctrl-C escaped pipelines.trainer.main")
    assert stopped.value.code == 130
    err = capsys.readouterr().err
    assert str(tmp_path / "out") in err and "continues from the last" in err
