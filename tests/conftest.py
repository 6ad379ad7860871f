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
