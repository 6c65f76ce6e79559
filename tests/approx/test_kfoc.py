"""curvlab.approx.kfoc on its own: the nearest Kronecker product of each exact block, and its info.

Reference: the dense exact block F from ``curvlab.reference`` (torch.func Jacobians), brought into
the folded (output o, input i) order by an index map written here, rearranged as
R(F)[(o,o'),(i,i')] = F[(o,i),(o',i')] (Van Loan & Pitsianis 1993) and decomposed with
``torch.linalg.svd``: the best G ⊗ A (row-major) is σ₁ mat(u₁) ⊗ mat(v₁).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab import reference
from curvlab.approx.factors import collect
from curvlab.approx.kfoc import kfoc, rearranged_products

ARCHS = {
    # T = 1: subspace iteration with the closed-form rearranged products
    "mlp": (lambda: nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3)), (4,)),
    # T = 2, Gram matrices cheaper than per-sample gradients: subspace iteration, T > 1 products
    "sequence": (lambda: nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Flatten(), nn.Linear(10, 3)), (2, 6)),
    # T = 4 patches, per-sample gradients cheaper: the block is formed once ("dense")
    "cnn": (lambda: nn.Sequential(nn.Conv2d(1, 2, 2), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3)), (1, 3, 3)),
}
METHOD = {"mlp": ["subspace iteration"] * 2, "sequence": ["subspace iteration"] * 2,
          "cnn": ["dense", "subspace iteration"]}
N = 6


def make(arch: str, partition: str = "module") -> cl.Problem:
    builder, shape = ARCHS[arch]
    torch.manual_seed(0)
    model = builder().double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(N, *shape, generator=g, dtype=torch.float64)
    return cl.Problem(model, nn.CrossEntropyLoss(), X, torch.randint(0, 3, (N,), generator=g), partition=partition)


def folded_index(p: int, q: int, bias: bool) -> torch.Tensor:
    """θ offset of folded entry (o, i) of a layer's [W b] (bias = last input), row-major over (o, i)."""
    if not bias:
        return torch.arange(p * q)
    qw = q - 1
    W = torch.arange(p * qw).reshape(p, qw)
    return torch.cat([W, (p * qw + torch.arange(p))[:, None]], dim=1).reshape(-1)


def rearranged(F: torch.Tensor, p: int, q: int, bias: bool) -> torch.Tensor:
    """R(F) (p², q²) of a block F given in parameter order."""
    idx = folded_index(p, q, bias)
    return F[idx][:, idx].reshape(p, q, p, q).permute(0, 2, 1, 3).reshape(p * p, q * q)


def nearest_kron(F: torch.Tensor, p: int, q: int, bias: bool):
    """(σ₁, σ₂, best G ⊗ A in folded order) by the SVD of R(F)."""
    U, s, Vh = torch.linalg.svd(rearranged(F, p, q, bias))
    return s[0], s[1], s[0] * torch.kron(U[:, 0].reshape(p, p), Vh[0].reshape(q, q))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b))


def leaves(prob: cl.Problem, fisher: str):
    """(Kron block, its info, the dense exact block from the reference, KFAC's block)."""
    ref = {"type2": reference.ggn, "empirical": reference.empirical_fisher}[fisher](prob)
    K = kfoc(prob, fisher=fisher)
    kfac = cl.approx.kfac(prob, fisher=fisher)
    for name, b, block in zip(K.block_names, K.blocks, prob.partition):
        yield b, K.info[name], ref[block.slice, block.slice], kfac.block(name)


@pytest.mark.parametrize("fisher", ["type2", "empirical"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_kfoc_is_the_rank_one_svd_of_the_rearranged_exact_block(arch, fisher):
    prob = make(arch)
    for i, (K, info, F, kf) in enumerate(leaves(prob, fisher)):
        s1, s2, best = nearest_kron(F, K.p, K.q, K.bias)
        assert rel(torch.kron(K.G, K.A), best) < 1e-9
        # the info values
        assert info["method"] == METHOD[arch][i] and info["converged"] is True
        assert info["sigma"] == pytest.approx(float(s1), rel=1e-10)
        if info["method"] == "subspace iteration":
            assert 1 <= info["iterations"] <= 500 and info["residual"] <= 1e-10
        # the split: symmetric factors, positive traces, tr A = tr A_KFAC
        assert torch.equal(K.A, K.A.T) and torch.equal(K.G, K.G.T)
        assert float(K.A.trace()) == pytest.approx(float(kf.A.trace()), rel=1e-12)
        assert float(K.G.trace()) > 0
        # and it is at least as close to F as KFAC: ‖F − K‖² = ‖F‖² − σ₁² ≤ ‖F − KFAC‖²
        err, err_kfac = rel(K.to_dense(), F), rel(kf.to_dense(), F)
        assert err <= err_kfac + 1e-12
        assert err == pytest.approx(float((torch.linalg.matrix_norm(F) ** 2 - s1**2).sqrt()
                                          / torch.linalg.matrix_norm(F)), rel=1e-6, abs=1e-12)
        assert float(s2) < float(s1)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_rearranged_products(arch):
    prob = make(arch)
    F = reference.ggn(prob)
    for piece in [p for plan in collect(prob, "type2").plans for p in plan.pieces]:
        p, q = piece.d_out, piece.d_in
        R = rearranged(F[piece.start:piece.stop, piece.start:piece.stop], p, q, piece.folded)
        Rf, Rt = rearranged_products(piece)
        X = torch.randn(3, q, q, dtype=torch.float64)
        Y = torch.randn(3, p, p, dtype=torch.float64)
        assert rel(Rf(X).reshape(3, -1), (R @ X.reshape(3, -1).T).T) < 1e-12
        assert rel(Rt(Y).reshape(3, -1), (R.T @ Y.reshape(3, -1).T).T) < 1e-12


def test_nested_blocks_keep_info_per_piece():
    prob = make("mlp", partition="all")
    K = kfoc(prob)
    F = reference.ggn(prob)
    info = K.info["all"]
    assert set(info) == {"0", "2"}
    nested = K.blocks[0]
    for name, b, (lo, hi) in zip(nested.block_names, nested.blocks, [(0, 15), (15, 27)]):
        s1, _, best = nearest_kron(F[lo:hi, lo:hi], b.p, b.q, b.bias)
        assert info[name]["sigma"] == pytest.approx(float(s1), rel=1e-10)
        assert rel(torch.kron(b.G, b.A), best) < 1e-9


def test_unconverged_iteration_warns_and_says_so():
    prob = make("mlp")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        K = kfoc(prob, max_iter=1, tol=1e-300)
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 2 and all("did not converge in 1 iterations" in m for m in msgs)
    for name in K.block_names:
        assert K.info[name]["converged"] is False and K.info[name]["iterations"] == 1
