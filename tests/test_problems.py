"""curvlab.problems: every canned problem loads with its documented size; seeds reproduce it exactly."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab import problems

# P by hand: a Linear(a, b) has a·b + b parameters, a Conv2d(c, d, 3) has c·d·9 + d.
EXPECTED_P = {
    "digits-mlp": (64 * 32 + 32) + (32 * 32 + 32) + (32 * 10 + 10),              # 3466
    "digits-mlp-wide": (64 * 64 + 64) + (64 * 64 + 64) + (64 * 10 + 10),         # 8970
    "digits-mlp-1m": (64 * 1024 + 1024) + (1024 * 1024 + 1024) + (1024 * 10 + 10),  # 1126410
    "digits-autoencoder": (64 * 32 + 32) + (32 * 8 + 8) + (8 * 32 + 32) + (32 * 64 + 64),  # 4744
    "digits-autoencoder-relu": (64 * 32 + 32) + (32 * 16 + 16) + (16 * 8 + 8) + (8 * 16 + 16) + (16 * 32 + 32)
    + (32 * 64 + 64),                                                            # 5544
    "digits-mlp-deep": (64 * 32 + 32) + 2 * (32 * 32 + 32) + (32 * 10 + 10),     # 4522
    "digits-cnn": (1 * 8 * 9 + 8) + (8 * 8 * 9 + 8) + (512 * 10 + 10),           # 5794
    "deep-linear": (64 * 16 + 16) + (16 * 16 + 16) + (16 * 10 + 10),             # 1482
    "diabetes-mlp": (10 * 16 + 16) + (16 * 1 + 1),                                # 193
}
LOSSES = {"digits-mlp": nn.CrossEntropyLoss, "digits-mlp-wide": nn.CrossEntropyLoss,
          "digits-mlp-1m": nn.CrossEntropyLoss,
          "digits-autoencoder": nn.BCEWithLogitsLoss, "digits-autoencoder-relu": nn.BCEWithLogitsLoss,
          "digits-mlp-deep": nn.CrossEntropyLoss, "digits-cnn": nn.CrossEntropyLoss,
          "deep-linear": nn.MSELoss, "diabetes-mlp": nn.MSELoss}


def test_names_are_the_registry():
    assert problems.names() == list(EXPECTED_P)
    assert cl.problems.names() == problems.names()


@pytest.mark.parametrize("name", list(EXPECTED_P))
def test_canned_problem_loads(name):
    prob = problems.load(name, n=64)
    assert isinstance(prob, cl.Problem)
    assert prob.name == name
    assert prob.num_params == EXPECTED_P[name] == problems.describe(name)["num_params"]
    assert prob.num_samples == 64 and prob.dtype == torch.float64
    assert type(prob.loss_fn) is LOSSES[name] and prob.likelihood.reduction == "mean"
    assert math.isfinite(prob.loss())
    assert bool(torch.isfinite(prob.gradient()).all())
    assert not prob.model.training
    assert prob.meta["n"] == 64 and prob.meta["seed"] == 0
    assert prob.meta["dataset"] == problems.describe(name)["dataset"]


@pytest.mark.parametrize("name", ["digits-mlp", "digits-cnn", "diabetes-mlp"])
def test_same_seed_same_problem(name):
    a, b = problems.load(name, n=40, seed=7), problems.load(name, n=40, seed=7)
    assert torch.equal(a.X, b.X) and torch.equal(a.y, b.y) and torch.equal(a.theta, b.theta)
    c = problems.load(name, n=40, seed=8)
    assert not torch.equal(a.theta, c.theta)
    assert not torch.equal(a.X, c.X)


def test_global_random_state_untouched():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    problems.load("digits-mlp", n=16, seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_float32_starts_where_float64_does():
    p64 = problems.load("digits-mlp", n=16)
    p32 = problems.load("digits-mlp", n=16, dtype=torch.float32)
    assert p32.dtype == torch.float32 and p32.X.dtype == torch.float32
    assert torch.equal(p32.theta.double(), p64.theta)


def test_data_of_each_problem():
    auto = problems.load("digits-autoencoder", n=32)
    assert torch.equal(auto.X, auto.y) and float(auto.X.min()) >= 0 and float(auto.X.max()) <= 1
    cnn = problems.load("digits-cnn", n=32)
    assert cnn.X.shape == (32, 1, 8, 8) and cnn.y.dtype == torch.long
    mlp = problems.load("digits-mlp", n=32)
    assert torch.equal(cnn.X.reshape(32, 64), mlp.X) and torch.equal(cnn.y, mlp.y)
    lin = problems.load("deep-linear", n=32)
    assert torch.equal(lin.y, nn.functional.one_hot(mlp.y, 10).double())
    assert all(isinstance(m, (nn.Sequential, nn.Linear)) for m in lin.model.modules())  # no activations
    dia = problems.load("diabetes-mlp", n=None)
    assert dia.X.shape == (442, 10) and dia.y.shape == (442, 1)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown problem 'digits-rnn'; valid names: digits-mlp, .*diabetes-mlp"):
        problems.load("digits-rnn")
    with pytest.raises(ValueError, match="valid names"):
        problems.describe("nope")


def test_n_too_large_names_the_maximum():
    with pytest.raises(ValueError, match="at most n=442"):
        problems.load("diabetes-mlp", n=500)
    with pytest.raises(ValueError, match="at most n=1797"):
        problems.load("digits-mlp", n=1798)


def test_bad_dtype():
    with pytest.raises(TypeError, match="float32 or torch.float64"):
        problems.load("digits-mlp", n=8, dtype=torch.float16)
