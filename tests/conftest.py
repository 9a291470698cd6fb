"""Shared test fixtures."""
import os

import pytest
import torch

# the kernels' launch configuration stays the model's choice in tests (a test that wants the timed choice sets it)
os.environ.setdefault("FASTMCL_TUNING", "off")


@pytest.fixture
def fp64():
    """Default dtype float64 for the test (method losses against hand formulas at ≤ 1e-6), restored after."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """One small trained run per cohort layout (`support.runs.RUNS`), shared by the evaluate and export tests."""
    from support.runs import train_runs
    return train_runs(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: on a shared 2-core machine a second one spin-waits and slows small forwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
