"""The oracle against naive torch.func references (curvlab.reference), in float64, to 1e-10."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab import reference
from tests.exact.cases import ARCHS, LOSSES, REDUCTIONS, make

TOL = 1e-10


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b| (the peers' agreement measure)."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def block_mask(prob: cl.Problem) -> torch.Tensor:
    m = torch.zeros(prob.num_params, prob.num_params, dtype=torch.bool)
    for s in prob.partition.slices:
        m[s, s] = True
    return m


CASES = [(a, loss, r) for a in ARCHS for loss in LOSSES for r in REDUCTIONS]


@pytest.fixture(scope="module")
def refs():
    cache = {}

    def get(arch, loss, red):
        key = (arch, loss, red)
        if key not in cache:
            prob = cl.Problem(*make(arch, loss, red))
            cache[key] = (prob, reference.hessian(prob), reference.ggn(prob), reference.empirical_fisher(prob))
        return cache[key]

    return get


@pytest.mark.parametrize("arch,loss,red", CASES)
def test_full_matrices_match_reference(refs, arch, loss, red):
    prob, H, G, EF = refs(arch, loss, red)
    assert rel(cl.exact.hessian(prob).to_dense(), H) < TOL
    assert rel(cl.exact.ggn(prob).to_dense(), G) < TOL
    assert rel(cl.exact.empirical_fisher(prob).to_dense(), EF) < TOL


@pytest.mark.parametrize("arch,loss,red", CASES)
def test_block_and_diag_are_slices_of_full(refs, arch, loss, red):
    prob, H, G, EF = refs(arch, loss, red)
    mask = block_mask(prob)
    for fn, ref in ((cl.exact.hessian, H), (cl.exact.ggn, G), (cl.exact.empirical_fisher, EF)):
        B = fn(prob, structure="block")
        assert isinstance(B, cl.BlockDiagonal)
        assert B.block_names == tuple(prob.partition.names)
        assert rel(B.to_dense(), ref * mask) < TOL
        D = fn(prob, structure="diag")
        assert isinstance(D, cl.Diagonal)
        assert rel(D.diagonal(), ref.diagonal()) < TOL


@pytest.mark.parametrize("arch", ["mlp", "cnn", "batchnorm-eval", "sequence", "tied"])
def test_matrix_free_products(refs, arch):
    prob, H, G, EF = refs(arch, "ce", "mean")
    V = torch.randn(prob.num_params, 3, dtype=torch.float64)
    assert rel(cl.exact.hvp(prob, V), H @ V) < TOL
    assert rel(cl.exact.ggn_vp(prob, V), G @ V) < TOL
    assert rel(cl.exact.ef_vp(prob, V[:, 0]), EF @ V[:, 0]) < TOL
    F = cl.exact.fisher_mc(prob, samples=3, seed=4).to_dense()
    assert rel(cl.exact.fisher_mc_vp(prob, V, samples=3, seed=4), F @ V) < TOL
    for kind, ref in (("hessian", H), ("ggn", G), ("empirical_fisher", EF)):
        op = cl.exact.get(kind)(prob, structure="operator")
        assert isinstance(op, cl.MatrixFree)
        assert rel(op @ V, ref @ V) < TOL
        assert rel(op.to_dense(), ref) < TOL
        assert rel(op.diagonal(), ref.diagonal()) < TOL


@pytest.mark.parametrize("partition", ["per_tensor", "all", [["0.weight"], ["0.bias", "2.weight", "2.bias"]]])
def test_other_partitions(partition):
    model, loss_fn, X, y = make("mlp", "mse", "mean")
    prob = cl.Problem(model, loss_fn, X, y, partition=partition)
    G, H = reference.ggn(prob), reference.hessian(prob)
    mask = block_mask(prob)
    assert rel(cl.exact.ggn(prob, "block").to_dense(), G * mask) < TOL
    assert rel(cl.exact.hessian(prob, "block").to_dense(), H * mask) < TOL
    assert rel(cl.exact.empirical_fisher(prob, "block").to_dense(), reference.empirical_fisher(prob) * mask) < TOL


@pytest.mark.parametrize("loss", LOSSES)
def test_ggn_equals_hessian_for_model_linear_in_parameters(loss):
    torch.manual_seed(1)
    model = nn.Linear(6, 3).double()
    _, loss_fn, X, y = make("mlp", loss, "mean", n=9)
    X = torch.randn(9, 6, dtype=torch.float64)
    prob = cl.Problem(model, loss_fn, X, y)
    H, G = cl.exact.hessian(prob).to_dense(), cl.exact.ggn(prob).to_dense()
    assert rel(G, H) < TOL
    assert rel(H, reference.hessian(prob)) < TOL


@pytest.mark.parametrize("loss", LOSSES)
def test_ggn_and_ef_are_symmetric_psd(loss):
    prob = cl.Problem(*make("cnn", loss, "sum"))
    for C in (cl.exact.ggn(prob), cl.exact.empirical_fisher(prob), cl.exact.fisher_mc(prob, samples=2)):
        M = C.to_dense()
        assert torch.equal(M, M.T)
        ev = torch.linalg.eigvalsh(M)
        assert float(ev.min()) > -1e-12 * float(ev.abs().max())
    H = cl.exact.hessian(prob).to_dense()
    assert torch.equal(H, H.T)


@pytest.mark.parametrize("loss", LOSSES)
def test_fisher_mc_matches_its_formula_for_the_same_draws(loss):
    prob = cl.Problem(*make("mlp", loss, "mean"))
    samples, seed = 5, 11
    gen = torch.Generator().manual_seed(seed)
    labels = prob.likelihood.sample(prob.output().detach(), samples, gen)
    ref = reference.fisher_mc_from(prob, labels)
    assert rel(cl.exact.fisher_mc(prob, samples=samples, seed=seed).to_dense(), ref) < TOL
    assert rel(cl.exact.fisher_mc(prob, "block", samples=samples, seed=seed).to_dense(), ref * block_mask(prob)) < TOL
    assert rel(cl.exact.fisher_mc(prob, "diag", samples=samples, seed=seed).diagonal(), ref.diagonal()) < TOL


@pytest.mark.parametrize("loss", LOSSES)
def test_fisher_mc_converges_to_ggn(loss):
    """E[fisher_mc] = ggn: with S samples the relative Frobenius error shrinks like 1/√S.

    Stated tolerance: at S = 20,000 the error of a 39-parameter MLP is ≈ 0.005–0.01; we require
    < 0.03, and require it to be at least 4× smaller than at S = 200 (√100 = 10 expected).
    """
    prob = cl.Problem(*make("mlp", loss, "mean", n=4))
    G = cl.exact.ggn(prob).to_dense()
    err = {}
    for S in (200, 20_000):
        F = cl.exact.fisher_mc(prob, samples=S, seed=0).to_dense()
        err[S] = float((F - G).norm() / G.norm())
    assert err[20_000] < 0.03
    assert err[20_000] < err[200] / 4


def test_fisher_mc_seeded():
    prob = cl.Problem(*make("mlp", "ce", "mean"))
    a = cl.exact.fisher_mc(prob, samples=2, seed=3).to_dense()
    assert torch.equal(a, cl.exact.fisher_mc(prob, samples=2, seed=3).to_dense())
    assert not torch.equal(a, cl.exact.fisher_mc(prob, samples=2, seed=4).to_dense())


def test_other_parameter_values():
    prob = cl.Problem(*make("mlp", "ce", "mean"))
    theta = prob.theta + 0.1 * torch.randn_like(prob.theta)
    moved = prob.at(theta)
    for kind in ("hessian", "ggn", "empirical_fisher"):
        a = cl.exact.get(kind)(prob, theta=theta).to_dense()
        b = cl.exact.get(kind)(moved).to_dense()
        assert rel(a, b) < TOL
    assert rel(cl.exact.hessian(moved).to_dense(), reference.hessian(moved)) < TOL


def test_float32_close_to_float64():
    model, loss_fn, X, y = make("mlp", "ce", "mean")
    p64 = cl.Problem(model, loss_fn, X, y)
    p32 = cl.Problem(model.float(), loss_fn, X.float(), y)
    for kind in ("hessian", "ggn", "empirical_fisher"):
        a = cl.exact.get(kind)(p32).to_dense()
        assert a.dtype == torch.float32
        assert rel(a.double(), cl.exact.get(kind)(p64).to_dense()) < 1e-5


def test_dense_result_over_budget_is_refused_before_allocating():
    prob = cl.Problem(*make("mlp", "ce", "mean"))
    with cl.memory.budget(1000):
        for kind in ("hessian", "ggn", "empirical_fisher", "fisher_mc"):
            with pytest.raises(cl.memory.MemoryBudgetError, match='structure="block"'):
                cl.exact.get(kind)(prob)
        # blocks that fit are still fine
        assert cl.exact.ggn(prob, "diag").size == prob.num_params


def test_bad_arguments():
    prob = cl.Problem(*make("mlp", "ce", "mean"))
    with pytest.raises(ValueError, match="unknown structure"):
        cl.exact.ggn(prob, structure="kron")
    with pytest.raises(TypeError, match="Problem"):
        cl.exact.ggn("digits-mlp")
    with pytest.raises(ValueError, match="samples"):
        cl.exact.fisher_mc(prob, samples=0)
    with pytest.raises(ValueError, match="unknown curvature kind"):
        cl.exact.get("fisher")
    with pytest.raises(ValueError, match="shape"):
        cl.exact.hvp(prob, torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_or_misshapen_theta_is_refused(bad):
    """Evaluating at other parameter values checks them like the model's own (shape, NaN/inf)."""
    prob = cl.Problem(*make("mlp", "ce", "mean"))
    theta = prob.theta.clone()
    theta[5] = bad
    V = torch.ones(prob.num_params, dtype=torch.float64)
    calls = [lambda kind=kind, s=s: cl.exact.get(kind)(prob, structure=s, theta=theta)
             for kind in ("hessian", "ggn", "fisher_mc", "empirical_fisher") for s in ("full", "block", "diag")]
    calls += [lambda: cl.exact.ggn(prob, structure="operator", theta=theta), lambda: prob.gradient(theta)]
    calls += [lambda fn=fn: fn(prob, V, theta=theta)
              for fn in (cl.exact.hvp, cl.exact.ggn_vp, cl.exact.ef_vp, cl.exact.fisher_mc_vp)]
    for call in calls:
        with pytest.raises(ValueError, match=r"theta contains NaN or inf \(first at index \(5,\)"):
            call()
    with pytest.raises(ValueError, match=r"shape \(39,\)"):
        cl.exact.ggn(prob, theta=prob.theta[:3])
    with pytest.raises(TypeError, match="Problem"):
        cl.exact.hvp("digits-mlp", V)
