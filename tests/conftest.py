"""Shared test set-up: fixed seeds, one thread (the test problems are tiny)."""

import pytest
import torch

torch.set_num_threads(1)  # tiny problems: threads only add spin-wait stalls on a busy 2-core machine


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
