"""The oracle's low-rank structures against its dense ones, entry by entry (float64, 1e-10)."""

from __future__ import annotations

import pytest
import torch

import curvlab as cl
from curvlab import memory
from curvlab.linalg import BlockDiagonal, KronRowsFactor, LowRank
from tests.exact.cases import make
from tests.linalg.test_low_rank import assert_matches_dense, close

KINDS = {
    "ggn": lambda prob, structure: cl.exact.ggn(prob, structure=structure),
    "fisher_mc": lambda prob, structure: cl.exact.fisher_mc(prob, structure=structure, samples=3, seed=1),
    "empirical_fisher": lambda prob, structure: cl.exact.empirical_fisher(prob, structure=structure),
}

# small architectures with conv layers (T > 1), generic parameters (LayerNorm, a shared layer),
# no biases and a frozen bias; canned problems with a handful of samples
ARCHS = [("mlp", "ce"), ("cnn", "ce"), ("cnn-pool", "bce"), ("layernorm", "mse"), ("tied", "ce"),
         ("sequence", "mse"), ("mlp-nobias", "bce"), ("frozen-bias", "ce")]
CANNED = [("diabetes-mlp", 12, k) for k in KINDS] + [("digits-mlp", 3, k) for k in KINDS] + [
    ("deep-linear", 3, "ggn"), ("digits-cnn", 2, "ggn"), ("digits-autoencoder", 2, "ggn")]


def arch_problem(arch: str, loss: str) -> cl.Problem:
    return cl.Problem(*make(arch, loss, "mean", n=5))


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("arch,loss", ARCHS)
def test_low_rank_equals_full_on_architectures(arch, loss, kind):
    prob = arch_problem(arch, loss)
    L, D = KINDS[kind](prob, "low_rank"), KINDS[kind](prob, "full")
    assert isinstance(L, LowRank) and L.factor.rank == {"ggn": 3, "fisher_mc": 3, "empirical_fisher": 1}[kind] * 5
    assert_matches_dense(L, D.to_dense())


@pytest.mark.parametrize("name,n,kind", CANNED)
def test_low_rank_equals_full_on_canned_problems(name, n, kind):
    prob = cl.problems.load(name, n=n)
    L, D = KINDS[kind](prob, "low_rank"), KINDS[kind](prob, "full").to_dense()
    if prob.num_params < 2000:
        assert_matches_dense(L, D)
        return
    # larger P: the same quantities without dense eigendecompositions or inverses
    close(L.to_dense(), D)
    V = torch.randn(prob.num_params, 2, dtype=torch.float64)
    close(L @ V, D @ V)
    close(L.diagonal(), D.diagonal())
    close(L.trace(), D.trace())
    close(L.frobenius_norm(), torch.linalg.matrix_norm(D))
    lam = 1e-3 * float(D.diagonal().max())
    X = L.solve(V, lam)
    assert float((D @ X + lam * X - V).norm() / V.norm()) < 1e-10
    chol = torch.linalg.cholesky(D + lam * torch.eye(prob.num_params, dtype=torch.float64))
    close(L.logdet(lam), 2 * torch.log(chol.diagonal()).sum())
    w = L.eigvalsh()
    assert int((w == 0).sum()) == prob.num_params - L.rank
    top = L._top_eigen(3)
    close(D @ top.vectors, top.vectors * top.values)
    close(top.values, w.flip(0)[:3])


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("arch,loss", ARCHS[:4])
def test_block_low_rank_equals_the_dense_blocks(arch, loss, kind):
    prob = arch_problem(arch, loss)
    B, D = KINDS[kind](prob, "block_low_rank"), KINDS[kind](prob, "block")
    assert isinstance(B, BlockDiagonal) and all(isinstance(b, LowRank) for b in B.blocks)
    assert B.block_names == D.block_names and B.block_slices == D.block_slices
    for b, d in zip(B.blocks, D.blocks):
        assert_matches_dense(b, d.to_dense())
    assert_matches_dense(B, D.to_dense(), eigen=False)
    g = prob.gradient()
    close(B.direction(g, 0.1), D.direction(g, 0.1), 1e-9)


def test_block_low_rank_with_a_partition_that_cuts_layers():
    model, loss_fn, X, y = make("mlp", "ce", "mean", n=5)
    prob = cl.Problem(model, loss_fn, X, y, partition="per_tensor")
    B, D = cl.exact.ggn(prob, "block_low_rank"), cl.exact.ggn(prob, "block")
    close(B.to_dense(), D.to_dense())
    close(B.solve(prob.gradient(), 0.05), D.solve(prob.gradient(), 0.05), 1e-9)


def test_inner_and_restrict_against_dense():
    prob = arch_problem("cnn", "ce")
    G, E = cl.exact.ggn(prob, "low_rank"), cl.exact.empirical_fisher(prob, "low_rank")
    Gd, Ed = G.to_dense(), E.to_dense()
    close(G._inner(E), (Gd * Ed).sum())  # two factors with the same layout: Hadamard cross Grams
    close(G._inner(cl.exact.empirical_fisher(prob)), (Gd * Ed).sum())
    close(G._inner(G), (Gd * Gd).sum())
    for b in prob.partition:
        R = G._restrict(b.slice)
        assert isinstance(R, LowRank)
        assert_matches_dense(R, Gd[b.slice, b.slice])
    s = slice(5, prob.num_params - 7)  # cuts a conv layer and the last linear layer
    close(G._restrict(s).to_dense(), Gd[s, s])


def test_layers_keep_their_factors():
    prob = cl.problems.load("digits-cnn", n=2)
    factors = cl.exact.ggn(prob, "low_rank").factor.factors
    assert [type(f) for f in factors] == [KronRowsFactor] * 3
    assert [f.positions for f in factors] == [64, 64, 1]


def test_hessian_refuses_low_rank():
    prob = arch_problem("mlp", "ce")
    for structure in ("low_rank", "block_low_rank"):
        with pytest.raises(ValueError, match="not a sum of outer products|the Hessian is not one"):
            cl.exact.hessian(prob, structure=structure)
    with pytest.raises(ValueError, match="unknown structure"):
        cl.exact.ggn(prob, structure="lowrank")


# ---------------------------------------------------------------------------- a million parameters


@pytest.fixture(scope="module")
def big():
    return cl.problems.load("digits-mlp-1m", n=6)


def test_million_parameter_dense_matrices_refuse(big):
    assert big.num_params == 1_126_410
    for call in (lambda: cl.exact.ggn(big), lambda: cl.exact.empirical_fisher(big), lambda: cl.exact.hessian(big),
                 lambda: cl.exact.ggn(big, "block")):
        with pytest.raises(memory.MemoryBudgetError, match="over the memory budget"):
            call()
    with pytest.raises(memory.MemoryBudgetError):
        cl.exact.ggn(big, "low_rank").to_dense()


def assert_damped_step(big: cl.Problem, C, vp, lam: float = 1e-3) -> None:
    """(C + λI)x = g solved to a residual < 1e-10: whole (products from ``vp``) or block by block."""
    g = big.gradient()
    x = C.solve(g, lam)
    if isinstance(C, LowRank):
        assert float((vp(big, x) + lam * x - g).norm() / g.norm()) < 1e-10
    else:  # block b of C is the oracle's product with x restricted to the block, restricted again
        padded = torch.zeros(big.num_params, len(C.blocks), dtype=x.dtype)
        for j, s in enumerate(C.block_slices):
            padded[s, j] = x[s]
        Cx = vp(big, padded)
        for j, s in enumerate(C.block_slices):
            assert float((Cx[s, j] + lam * x[s] - g[s]).norm() / g[s].norm()) < 1e-10


@pytest.mark.parametrize("structure", ["low_rank", "block_low_rank"])
def test_million_parameter_damped_natural_gradient(big, structure):
    assert_damped_step(big, cl.exact.ggn(big, structure), cl.exact.ggn_vp)
    assert_damped_step(big, cl.exact.empirical_fisher(big, structure), cl.exact.ef_vp)


def test_million_parameter_top_spectrum(big):
    G = cl.exact.ggn(big, "low_rank")
    top = G._top_eigen(4)
    assert bool((top.values[:-1] >= top.values[1:]).all())
    GQ = cl.exact.ggn_vp(big, top.vectors)
    close(GQ, top.vectors * top.values, 1e-9)
    close(top.vectors.T @ top.vectors, torch.eye(4, dtype=torch.float64), 1e-9)
    assert G.rank == 6 * 9  # softmax: each sample's output Hessian has rank C − 1
    assert float(G.trace()) == pytest.approx(float(G.eigvalsh().sum()), rel=1e-10)
