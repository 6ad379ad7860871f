import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
WIKITEXT = SHARED_DATA / "wikitext2_raw" / "wiki.valid.raw"

# Never wait on the network: a hub look-up fails at once instead of retrying for half a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _isolated_runs(tmp_path, monkeypatch):
    """Each test writes runs and the registry inside its own temporary folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LLMLAB_REGISTRY", raising=False)


@pytest.fixture(autouse=True)
def _threads(request):
    """Tiny models run fastest on one thread (two wait on each other); the built-in model gets them all."""
    import torch

    if "slow" in request.keywords:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_llama():
    from llmlab.models import load_model

    return load_model("tiny-llama")


@pytest.fixture(scope="session")
def builtin_model():
    from llmlab.models import load_model

    return load_model("smollm2-135m")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
