import os

# No test may reach a hub: everything is built locally.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def data_dir(tmp_path, monkeypatch):
    """Each test gets its own data folder, like a fresh install."""
    folder = tmp_path / "data"
    monkeypatch.setenv("WORKBENCH_DATA", str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    from workbench.tiny_models import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    from workbench.tiny_models import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="session")
def tiny_lora(tiny_sd, tmp_path_factory):
    from workbench.tiny_models import build_tiny_lora

    return build_tiny_lora(tiny_sd, tmp_path_factory.mktemp("tiny-lora"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine spinning threads
    cost a lot: modules that run many of them use one thread (`pytestmark`), then restore the count."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def runner():
    """A job runner on the test's data folder with every job kind registered (not the process-wide one)."""
    from workbench.config import get_settings
    from workbench.job_kinds import register_all
    from workbench.jobs import JobRunner

    settings = get_settings()
    runner = JobRunner(settings.db_path, settings.runs_dir)
    register_all(runner)
    yield runner
    runner.shutdown()


@pytest.fixture
def whole_app(monkeypatch):
    """The whole app as `python app.py` builds it, on a private job runner; (Blocks, its tab labels in order)."""
    import gradio as gr

    from workbench.config import get_settings
    from workbench.jobs import JobRunner
    from workbench.ui import app

    runner = JobRunner(get_settings().db_path, get_settings().runs_dir)  # not the process-wide one
    monkeypatch.setattr(app, "get_runner", lambda: runner)
    try:
        demo = app.build_app()
    finally:
        runner.shutdown()
    return demo, [block.label for block in demo.blocks.values() if isinstance(block, gr.Tab)]


@pytest.fixture
def eval_prompts(tmp_path):
    """A one-prompt benchmark file ("a circle"), enough to run a pipeline's evaluation stage."""
    import json

    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps({"tag": "single_object", "include": [{"class": "circle", "count": 1}],
                                "prompt": "a circle"}) + "\n")
    return str(path)
