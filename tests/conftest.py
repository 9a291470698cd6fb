"""Shared test fixtures."""
import pytest
import torch


@pytest.fixture
def fp64():
    """Default dtype float64 for the test (method losses against hand formulas at ≤ 1e-6), restored after."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)
