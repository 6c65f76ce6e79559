"""Every approximator takes the same options, checks them the same way, and means the same by them."""

from __future__ import annotations

import inspect

import pytest
import torch

import curvlab as cl
from tests.approx import cases
from tests.approx.cases import rel
from tests.approx.test_kfac import WithNorm, _prob

METHODS = ["kfac", "ekfac", "tkfac", "tekfac", "foof", "kfoc"]
COMMON = ["prob", "fisher", "mc_samples", "seed", "approx", "unsupported"]


@pytest.mark.parametrize("method", METHODS)
def test_every_approximator_has_the_same_options(method):
    params = list(inspect.signature(getattr(cl.approx, method)).parameters.values())
    assert [p.name for p in params[:len(COMMON)]] == COMMON
    defaults = {p.name: p.default for p in params[1:len(COMMON)]}
    assert defaults == {"fisher": None if method == "foof" else "type2", "mc_samples": 1, "seed": 0,
                        "approx": "expand", "unsupported": "error"}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("option, value, message", [
    ("mc_samples", 0, "mc_samples must be a positive integer; got 0"),
    ("mc_samples", -2, "mc_samples must be a positive integer; got -2"),
    ("mc_samples", 1.5, "mc_samples must be a positive integer; got 1.5"),
    ("seed", -1, "seed must be a non-negative integer; got -1"),
    ("approx", "mean", "unknown approx 'mean'"),
    ("unsupported", "skip", "unknown unsupported='skip'"),
])
def test_bad_options_are_refused_by_every_approximator(method, option, value, message):
    with pytest.raises(ValueError, match=message):
        getattr(cl.approx, method)(cases.mlp(n=4), **{option: value})


@pytest.mark.parametrize("method", [m for m in METHODS if m != "foof"])
def test_unknown_fisher_is_refused(method):
    with pytest.raises(ValueError, match="unknown fisher type 'true'"):
        getattr(cl.approx, method)(cases.mlp(n=4), fisher="true")


def test_foof_takes_no_fisher():
    with pytest.raises(ValueError, match="foof uses no Fisher .*got fisher='type2'"):
        cl.approx.foof(cases.mlp(n=4), fisher="type2")
    K = cl.approx.foof(cases.mlp(n=4), mc_samples=3, seed=2)  # accepted, unused: no Monte-Carlo Fisher
    assert K.options == {"approx": "expand", "unsupported": "error"}


def test_foof_unsupported_exact_is_a_clear_error():
    """FOOF has no exact counterpart for other modules: the option raises, and no message suggests it."""
    prob = _prob(WithNorm())
    with pytest.raises(ValueError) as default:
        cl.approx.foof(prob)
    assert "'norm.weight' (LayerNorm)" in str(default.value)
    assert "Pass unsupported='exact'" not in str(default.value)
    assert "requires_grad=False" in str(default.value)
    with pytest.raises(ValueError, match="foof has no exact counterpart for unsupported parameters") as exact:
        cl.approx.foof(prob, unsupported="exact")
    assert "Pass unsupported='exact'" not in str(exact.value)
    # the advice works: with the LayerNorm frozen FOOF is built, one A ⊗ I block per linear layer
    for p in prob.model.norm.parameters():
        p.requires_grad_(False)
    frozen = cl.Problem(prob.model, prob.loss_fn, prob.X, prob.y)
    F = cl.approx.foof(frozen)
    assert F.block_names == ("inp", "out")


@pytest.mark.parametrize("method", [m for m in METHODS if m != "foof"])
def test_unsupported_exact_and_mc_options_for_every_fisher_method(method):
    prob = _prob(WithNorm())
    K = getattr(cl.approx, method)(prob, fisher="mc", mc_samples=2, seed=3, unsupported="exact")
    F = cl.exact.fisher_mc(prob, structure="block", samples=2, seed=3)
    assert rel(K.block("norm").to_dense(), F.block("norm").to_dense()) < 1e-10
    assert {k: K.options[k] for k in ("fisher", "mc_samples", "seed", "unsupported")} == \
        {"fisher": "mc", "mc_samples": 2, "seed": 3, "unsupported": "exact"}


def test_kfoc_approx_chooses_only_the_split_of_its_factors():
    prob = cases.shared_reduce()
    E, R = cl.approx.kfoc(prob, approx="expand"), cl.approx.kfoc(prob, approx="reduce")
    K = cl.approx.kfac(prob, approx="reduce")
    assert E.options["approx"] == "expand" and R.options["approx"] == "reduce"
    for e, r, k in zip(E.blocks, R.blocks, K.blocks):
        assert rel(e.to_dense(), r.to_dense()) < 1e-8  # the same nearest Kronecker product
        assert float(r.A.trace()) == pytest.approx(float(k.A.trace()), rel=1e-12)
    with pytest.raises(ValueError, match="tol must be a number in"):
        cl.approx.kfoc(prob, tol=0.0)
    with pytest.raises(ValueError, match="max_iter must be a positive integer"):
        cl.approx.kfoc(prob, max_iter=0)
    assert torch.isfinite(R.to_dense()).all()
