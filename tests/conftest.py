"""Shared test set-up: float64, fixed seeds, two threads (the CI machine has two cores)."""

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
