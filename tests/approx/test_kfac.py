"""KFAC against the oracle in the regimes where it is exact, plus layout, partitions and errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvlab as cl
from tests.approx import cases
from tests.approx.cases import exact_of, rel

TOL = 1e-10
FISHERS = ["type2", "mc", "empirical"]


def assert_blocks_equal(K: cl.CurvatureMatrix, F: cl.CurvatureMatrix, tol: float = TOL) -> None:
    assert K.block_slices == F.block_slices
    assert K.block_names == F.block_names
    for k, f in zip(K.blocks, F.blocks):
        assert rel(k.to_dense(), f.to_dense()) < tol


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias", [True, False])
def test_deep_linear_mse_type2_is_exact(reduction, bias):
    prob = cases.deep_linear(reduction=reduction, bias=bias)
    K = cl.approx.kfac(prob, fisher="type2")
    assert K.structure == "kron"
    assert all(isinstance(b, cl.linalg.Kron) for b in K.blocks)
    assert_blocks_equal(K, cl.exact.ggn(prob, structure="block"))


@pytest.mark.parametrize("fisher", FISHERS)
@pytest.mark.parametrize("loss", ["ce", "mse", "bce"])
def test_single_sample_is_exact(fisher, loss):
    prob = cases.mlp(n=1, loss=loss)
    K = cl.approx.kfac(prob, fisher=fisher, mc_samples=3, seed=4)
    assert_blocks_equal(K, exact_of(prob, fisher, mc_samples=3, seed=4))


@pytest.mark.parametrize("fisher", FISHERS)
def test_identical_inputs_are_exact(fisher):
    prob = cases.mlp(n=9, identical=True)
    K = cl.approx.kfac(prob, fisher=fisher, mc_samples=2, seed=1)
    assert_blocks_equal(K, exact_of(prob, fisher, mc_samples=2, seed=1))


def test_follows_the_problems_theta():
    prob = cases.mlp(n=1)
    moved = prob.at(prob.theta + 0.3 * torch.randn(prob.num_params, dtype=torch.float64))
    K = cl.approx.kfac(moved)
    assert_blocks_equal(K, cl.exact.ggn(moved, structure="block"))
    assert rel(K.to_dense(), cl.approx.kfac(prob).to_dense()) > 1e-3


def test_general_case_is_not_exact():
    prob = cases.mlp(n=16)
    K = cl.approx.kfac(prob)
    F = cl.exact.ggn(prob, structure="block")
    assert rel(K.to_dense(), F.to_dense()) > 1e-3


@pytest.mark.parametrize("bias", [True, False])
def test_weight_sharing_expand_exact_in_its_regime(bias):
    prob = cases.shared_expand(bias=bias)
    F = cl.exact.ggn(prob, structure="block")
    assert_blocks_equal(cl.approx.kfac(prob, approx="expand"), F)
    assert rel(cl.approx.kfac(prob, approx="reduce").to_dense(), F.to_dense()) > 1e-3


@pytest.mark.parametrize("bias", [True, False])
def test_weight_sharing_reduce_exact_in_its_regime(bias):
    prob = cases.shared_reduce(bias=bias)
    F = cl.exact.ggn(prob, structure="block")
    Kr = cl.approx.kfac(prob, approx="reduce")
    assert_blocks_equal(Kr, F)
    assert rel(cl.approx.kfac(prob, approx="expand").blocks[0].to_dense(), F.blocks[0].to_dense()) > 1e-3


def test_conv_expand_exact_in_its_regime():
    prob = cases.conv_expand()
    assert_blocks_equal(cl.approx.kfac(prob, approx="expand"), cl.exact.ggn(prob, structure="block"))


def test_conv_reduce_exact_in_its_regime():
    prob = cases.conv_reduce()
    F = cl.exact.ggn(prob, structure="block")
    assert_blocks_equal(cl.approx.kfac(prob, approx="reduce"), F)
    assert rel(cl.approx.kfac(prob, approx="expand").blocks[0].to_dense(), F.blocks[0].to_dense()) > 1e-3


def test_scale_matches_curvlinops_convention():
    """A = 1/N Σ a aᵀ, G = R Σ ĝ ĝᵀ (ĝ: unscaled backpropagated Hessian square roots)."""
    prob = cases.mlp(n=10)
    K = cl.approx.kfac(prob)
    last = K.blocks[-1]  # output layer: ĝ = columns of the CE Hessian square root
    with torch.no_grad():
        h = torch.tanh(prob.model[2](torch.tanh(prob.model[0](prob.X))))
    a = torch.cat([h, torch.ones(10, 1, dtype=torch.float64)], dim=1)
    assert rel(last.A, a.T @ a / 10) < TOL
    p = torch.softmax(prob.output(), dim=1)
    H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    assert rel(last.G, H.sum(0) / 10) < TOL


@pytest.mark.parametrize("partition", ["per_tensor", "all"])
def test_partitions_align_with_the_oracle(partition):
    prob = cases.mlp(n=1, partition=partition)  # one sample: every Kronecker piece is exact
    K = cl.approx.kfac(prob)
    F = cl.exact.ggn(prob, structure="block")
    assert K.block_slices == F.block_slices
    if partition == "all":  # one block holding three layers: KFAC is block-diagonal inside it
        (inner,) = K.blocks
        assert isinstance(inner, cl.approx.Approximation) and len(inner.blocks) == 3
        D = F.blocks[0].to_dense()
        for s, b in zip(inner.block_slices, inner.blocks):
            assert rel(b.to_dense(), D[s, s]) < TOL
    else:
        assert len(K.blocks) == 6
        assert_blocks_equal(K, F)


class WithNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)
        self.out = nn.Linear(3, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.norm(self.inp(x))))


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 3)
        self.shared = nn.Linear(3, 3)
        self.out = nn.Linear(3, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.shared(torch.tanh(self.shared(torch.tanh(self.inp(x)))))))


def _prob(model: nn.Module, n: int = 7) -> cl.Problem:
    torch.manual_seed(0)
    model = model.double()
    return cl.Problem(model, nn.CrossEntropyLoss(), torch.randn(n, 4, dtype=torch.float64), torch.randint(0, 2, (n,)))


@pytest.mark.parametrize("method", ["kfac", "ekfac", "tkfac", "tekfac", "kfoc"])
def test_unsupported_modules_error_or_exact(method):
    prob = _prob(WithNorm())
    fn = getattr(cl.approx, method)
    with pytest.raises(ValueError, match=r"'norm.weight' \(LayerNorm\).*unsupported='exact'"):
        fn(prob)
    K = fn(prob, unsupported="exact")
    F = cl.exact.ggn(prob, structure="block")
    assert K.block_names == F.block_names == ("inp", "norm", "out")
    assert isinstance(K.block("norm"), cl.Dense)
    assert rel(K.block("norm").to_dense(), F.block("norm").to_dense()) < TOL
    assert isinstance(K.block("inp"), (cl.linalg.Kron, cl.linalg.EigenKron))
    # damping modes fall back to exact damping on the exact block
    g = prob.gradient()
    d = K.direction(g, 0.1, mode="pi")
    s = K.block_slices[1]
    assert rel(d[s], -F.block("norm").solve(g[s], 0.1)) < 1e-9


def test_layer_applied_twice_is_unsupported():
    prob = _prob(Tied())
    with pytest.raises(ValueError, match="applied more than once"):
        cl.approx.kfac(prob)
    K = cl.approx.kfac(prob, unsupported="exact")
    assert isinstance(K.block("shared"), cl.Dense)


def test_foof_rejects_unsupported():
    with pytest.raises(ValueError, match="LayerNorm"):
        cl.approx.foof(_prob(WithNorm()))


def test_argument_errors():
    prob = cases.mlp(n=4)
    with pytest.raises(ValueError, match="unknown fisher"):
        cl.approx.kfac(prob, fisher="true")
    with pytest.raises(ValueError, match="unknown approx"):
        cl.approx.kfac(prob, approx="mean")
    with pytest.raises(ValueError, match="mc_samples"):
        cl.approx.kfac(prob, fisher="mc", mc_samples=0)
    with pytest.raises(ValueError, match="unsupported"):
        cl.approx.kfac(prob, unsupported="skip")
    with pytest.raises(TypeError, match="Problem"):
        cl.approx.kfac(prob.model)
    K = cl.approx.kfac(prob)
    with pytest.raises(ValueError, match="unknown damping mode"):
        K.direction(prob.gradient(), 0.1, mode="heuristic")


def test_mc_is_reproducible_and_seeded():
    prob = cases.mlp(n=8)
    a = cl.approx.kfac(prob, fisher="mc", mc_samples=2, seed=3).to_dense()
    b = cl.approx.kfac(prob, fisher="mc", mc_samples=2, seed=3).to_dense()
    c = cl.approx.kfac(prob, fisher="mc", mc_samples=2, seed=4).to_dense()
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_float32_follows_the_model():
    prob = cases.mlp(n=8)
    prob32 = cl.Problem(prob.model.float(), prob.loss_fn, prob.X.float(), prob.y)
    for fn in (cl.approx.kfac, cl.approx.ekfac, cl.approx.tkfac, cl.approx.foof):
        K = fn(prob32)
        assert K.dtype == torch.float32
        g = prob32.gradient()
        assert K.direction(g, 0.1, "own").dtype == torch.float32
    prob.model.double()
