import pytest
import torch


@pytest.fixture
def gen():
    """A fresh seeded generator per test: random inputs, reproducible failures."""
    return torch.Generator().manual_seed(1234)
