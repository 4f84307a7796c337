"""Shared fixtures: the tiny model and a small synthetic catalog are built once per test session."""

import pytest
import torch

from agcl.modeling import tiny_mllm_path
from agcl.synthetic_catalog import make_synthetic_catalog


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return tiny_mllm_path(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def small_catalog_dir(tmp_path_factory):
    return make_synthetic_catalog(tmp_path_factory.mktemp("catalog") / "c", num_products=80, seed=0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: OpenMP spin-waiting makes 2 threads ~50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
