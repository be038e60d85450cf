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
