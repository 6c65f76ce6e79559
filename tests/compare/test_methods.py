"""curvlab.compare.methods on its own: every registered name builds what it says, on a tiny problem.

References: the public oracle and approximator functions called directly (``cl.exact.*``,
``cl.approx.*``) with the arguments each name stands for.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab.approx import Approximation
from curvlab.compare import methods
from curvlab.linalg import BlockDiagonal, CurvatureMatrix, Dense, Diagonal, LowRank, MatrixFree
from curvlab.linalg.spectral import Spectral


@pytest.fixture(scope="module")
def prob() -> cl.Problem:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(6, 3, generator=g, dtype=torch.float64)
    return cl.Problem(model, nn.CrossEntropyLoss(), X, torch.randint(0, 2, (6,), generator=g))


EXACT_CLASS = {"full": Dense, "block": BlockDiagonal, "diag": Diagonal, "operator": MatrixFree, "low_rank": LowRank,
               "block_low_rank": BlockDiagonal, "spectral": Spectral, "block_spectral": BlockDiagonal}
KIND = {"hessian": "hessian", "ggn": "ggn", "fisher-mc": "fisher_mc", "ef": "empirical_fisher"}
OPTIONS = {"mc_samples": 3, "seed": 4}
SUFFIXES = (("", "full"), ("-block", "block"), ("-diag", "diag"), ("-operator", "operator"),
            ("-low-rank", "low_rank"), ("-block-low-rank", "block_low_rank"))
#: remedy → what it does to the eigenvalues of the dense Hessian
REMEDIES = {"saddle-free-newton": torch.abs, "hessian-positive": lambda w: w.clamp_min(0.0)}


def spectral_function(H: torch.Tensor, fn) -> torch.Tensor:
    """Q fn(Λ) Qᵀ from a dense eigendecomposition of H."""
    w, Q = torch.linalg.eigh(H)
    return (Q * fn(w)) @ Q.T


def remedy(name: str, prob: cl.Problem) -> Dense:
    """The dense remedy matrix: |H| or max(H, 0), of the whole Hessian or block by block."""
    fn = REMEDIES[name.removesuffix("-block")]
    H = cl.exact.hessian(prob).to_dense()
    if not name.endswith("-block"):
        return Dense(spectral_function(H, fn))
    out = torch.zeros_like(H)
    for b in prob.partition:
        out[b.slice, b.slice] = spectral_function(H[b.slice, b.slice], fn)
    return Dense(out)


def direct(name: str, prob: cl.Problem) -> CurvatureMatrix:
    """What a registered name stands for, built by the public functions."""
    for alias, kind in KIND.items():
        for suffix, structure in SUFFIXES:
            if name == alias + suffix:
                kw = {"samples": 3, "seed": 4} if kind == "fisher_mc" else {}
                return getattr(cl.exact, kind)(prob, structure=structure, **kw)
    if name.removesuffix("-block") in REMEDIES:
        return remedy(name, prob)
    if name in ("kfac", "kfac-exact", "kfac-pi", "kfac-factored"):
        return cl.approx.kfac(prob)
    if name in ("kfac-mc", "kfac-ef"):
        fisher = {"kfac-mc": "mc", "kfac-ef": "empirical"}[name]
        kw = {"mc_samples": 3, "seed": 4} if fisher == "mc" else {}
        return cl.approx.kfac(prob, fisher=fisher, **kw)
    return getattr(cl.approx, name)(prob)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-12) -> None:
    err = float((a - b).abs().max()) / max(1e-300, float(b.abs().max()))
    assert err <= tol, err


@pytest.mark.parametrize("name", methods.names())
def test_every_name_builds_what_it_says(prob, name):
    s = methods.spec(name)
    assert s.name == name and s.family in ("exact", "approx", "first-order")
    out = methods.build(name, prob, **OPTIONS)
    if s.structure == "vector":  # sgd: a direction callable, x = −g
        assert callable(out) and not isinstance(out, CurvatureMatrix)
        g = torch.randn(prob.num_params, dtype=torch.float64)
        assert torch.equal(out(g, 0.1), -g)
        return
    assert isinstance(out, CurvatureMatrix) and out.size == prob.num_params
    ref = direct(name, prob)
    if s.family == "exact":
        assert type(out) is EXACT_CLASS[s.structure]
        assert type(ref) is type(out) or name.removesuffix("-block") in REMEDIES
    else:
        assert isinstance(out, Approximation) and out.method == ref.method
        assert out.structure == s.structure
        assert list(out.block_names) == prob.partition.names
    close(out.to_dense(), ref.to_dense())


def test_names_and_specs():
    names = methods.names()
    assert names == list(methods.REGISTRY) and len(set(names)) == len(names)
    assert "sgd" in names
    for alias in KIND:
        for suffix in ("", "-block", "-diag", "-operator"):
            assert methods.spec(alias + suffix).structure == (suffix[1:] or "full")
        for suffix, structure in SUFFIXES[4:]:  # the low-rank forms of the sums of outer products only
            if alias == "hessian":
                with pytest.raises(ValueError, match="unknown method"):
                    methods.spec(alias + suffix)
            else:
                assert methods.spec(alias + suffix).structure == structure
    for mode in ("exact", "pi", "factored"):
        assert methods.spec(f"kfac-{mode}").mode == mode
    assert methods.spec("kfac").mode == "own" and methods.spec("ggn").mode == "exact"


def test_canonical_aliases_and_unknown_names():
    for alias, target in methods.ALIASES.items():
        assert target in methods.REGISTRY
        assert methods.canonical(alias) == target
        assert methods.canonical(f"  {alias.upper()} ") == target
    for name in methods.names():
        assert methods.canonical(name) == name
    assert methods.canonical("Newton") == "hessian" and methods.canonical("empirical_fisher") == "ef"
    with pytest.raises(ValueError, match="unknown method 'shampoo'.*kfac"):
        methods.canonical("shampoo")
    with pytest.raises(ValueError, match="'shampoo'"):
        methods.spec("shampoo")
    with pytest.raises(TypeError, match="int"):
        methods.canonical(3)


def test_ladder_and_default_methods_are_registered():
    for rung, name in methods.LADDER:
        assert name in methods.REGISTRY
        assert methods.spec(name).rung == rung
    assert [r for r, _ in methods.LADDER] == ["full", "block", "kron", "MC", "empirical"]
    assert len(set(methods.DEFAULT_METHODS)) == len(methods.DEFAULT_METHODS)
    for name in methods.DEFAULT_METHODS:
        assert name in methods.REGISTRY


@pytest.mark.parametrize("alias", list(KIND))
def test_block_and_diag_read_off_a_cached_full_matrix(prob, alias, monkeypatch):
    cache: dict = {}
    full = methods.build(alias, prob, cache, **OPTIONS)
    assert cache[alias] is full
    kind = KIND[alias]
    kw = {"samples": 3, "seed": 4} if kind == "fisher_mc" else {}
    ref_block = getattr(cl.exact, kind)(prob, structure="block", **kw)
    ref_diag = getattr(cl.exact, kind)(prob, structure="diag", **kw)

    def refuse(*args, **kwargs):
        raise AssertionError("the oracle was called although the full matrix is cached")

    monkeypatch.setattr(cl.exact, kind, refuse)
    block = methods.build(f"{alias}-block", prob, cache, **OPTIONS)
    diag = methods.build(f"{alias}-diag", prob, cache, **OPTIONS)
    assert isinstance(block, BlockDiagonal) and isinstance(diag, Diagonal)
    assert list(block.block_names) == list(ref_block.block_names) == prob.partition.names
    for a, b in zip(block.blocks, ref_block.blocks):
        assert isinstance(a, Dense)
        close(a.to_dense(), b.to_dense())
    close(diag.diagonal(), ref_diag.diagonal())
    # without the cache the oracle is asked
    with pytest.raises(AssertionError, match="oracle was called"):
        methods.build(f"{alias}-block", prob, {}, **OPTIONS)


def test_variants_share_the_matrix_they_differ_from_only_in_damping(prob):
    cache: dict = {}
    base = methods.build("kfac", prob, cache)
    for mode in ("exact", "pi", "factored"):
        assert methods.build(f"kfac-{mode}", prob, cache) is base
    assert methods.build("kfac", prob, cache) is base  # built once, then cached
    fresh: dict = {}
    pinned = methods.build("kfac-pi", prob, fresh)
    assert fresh["kfac"] is pinned


def test_options_reach_the_monte_carlo_methods(prob):
    a = methods.build("fisher-mc", prob, mc_samples=2, seed=1)
    close(a.to_dense(), cl.exact.fisher_mc(prob, samples=2, seed=1).to_dense())
    assert not torch.allclose(a.to_dense(), methods.build("fisher-mc", prob, mc_samples=2, seed=2).to_dense())
    k = methods.build("kfac-mc", prob, mc_samples=5, seed=7)
    assert k.options["mc_samples"] == 5 and k.options["seed"] == 7
    close(k.to_dense(), cl.approx.kfac(prob, fisher="mc", mc_samples=5, seed=7).to_dense())


def test_build_bad_arguments(prob, monkeypatch):
    with pytest.raises(TypeError, match="Problem"):
        methods.build("ggn", "not a problem")
    with pytest.raises(ValueError, match="unknown method"):
        methods.build("nope", prob)
    wrong = methods.MethodSpec("wrong", "a matrix of the wrong size", "exact", "full",
                               lambda p, cache, options: Dense(torch.eye(3, dtype=torch.float64)))
    monkeypatch.setitem(methods.REGISTRY, "wrong", wrong)
    with pytest.raises(RuntimeError, match=f"3×3 matrix for a problem with {prob.num_params}"):
        methods.build("wrong", prob)
