"""The KFAC family on the canned problems: the README example's figures and the exact deep-linear case."""

from __future__ import annotations

import pytest
import torch

import curvlab as cl
from tests.approx.cases import rel


@pytest.fixture(scope="module")
def digits():
    prob = cl.problems.load("digits-mlp")
    return prob, cl.exact.ggn(prob, structure="block")


def test_readme_example_figures(digits):
    """The numbers printed by the README's approximation example (keep both in sync)."""
    prob, G = digits
    expected = {"kfac": (0.188, 0.983), "ekfac": (0.168, 0.986), "foof": (132.449, 0.286)}
    for name, (err, cos) in expected.items():
        K = getattr(cl.approx, name)(prob)
        assert float(cl.compare.relative_error(K, G)) == pytest.approx(err, abs=6e-4)
        assert float(cl.compare.cosine(K, G)) == pytest.approx(cos, abs=6e-4)
    g = prob.gradient()
    d = cl.approx.kfac(prob).direction(g, 1e-3, mode="own")
    assert float(torch.cosine_similarity(d, G.direction(g, 1e-3), dim=0)) == pytest.approx(0.891, abs=6e-4)


def test_ordering_on_digits(digits):
    prob, G = digits
    errs = {m: float(cl.compare.relative_error(getattr(cl.approx, m)(prob), G))
            for m in ("kfac", "ekfac", "tkfac", "kfoc")}
    assert errs["ekfac"] <= errs["kfac"] and errs["ekfac"] <= errs["tkfac"]
    assert errs["kfoc"] <= errs["kfac"] and errs["kfoc"] <= errs["tkfac"]


def test_canned_deep_linear_is_exact():
    prob = cl.problems.load("deep-linear", n=64)
    K, F = cl.approx.kfac(prob), cl.exact.ggn(prob, structure="block")
    for k, f in zip(K.blocks, F.blocks):
        assert rel(k.to_dense(), f.to_dense()) < 1e-10
