"""One damping rule for every structure: λ ≥ 0 and finite, a pair only where a mode takes one, and a
(numerically) singular damped system raises with the suggestion to damp."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab.linalg import BlockDiagonal, Dense, Diagonal, EigenKron, Kron, MatrixFree
from tests.linalg.test_protocol import spd


def _structures():
    M = spd(6, 0)
    K = Kron(spd(3, 1), spd(2, 2), bias=True)
    return {
        "dense": Dense(M),
        "diag": Diagonal(torch.linspace(0.5, 2.0, 6, dtype=torch.float64)),
        "block": BlockDiagonal([Dense(spd(3, 3)), Diagonal(torch.ones(3, dtype=torch.float64))]),
        "operator": MatrixFree(6, lambda V: M @ V, torch.float64),
        "kron": K,
        "eigen_kron": K.eigen(),
    }


@pytest.mark.parametrize("name", ["dense", "diag", "block", "operator", "kron", "eigen_kron"])
@pytest.mark.parametrize("bad", [-1e-3, -1.0, math.nan, math.inf])
def test_negative_or_non_finite_damping_raises_everywhere(name, bad):
    C = _structures()[name]
    v = torch.ones(C.size, dtype=torch.float64)
    for op in (lambda: C.solve(v, bad), lambda: C.direction(v, bad), lambda: C.inverse(bad),
               lambda: C.logdet(bad)):
        with pytest.raises(ValueError, match="damping"):
            op()
    for mode in C.modes:
        with pytest.raises(ValueError, match="damping"):
            C.solve(v, bad, mode=mode)


@pytest.mark.parametrize("name", ["dense", "diag", "block", "operator", "kron", "eigen_kron"])
def test_unknown_mode_lists_the_supported_ones_and_pairs_need_factored(name):
    C = _structures()[name]
    v = torch.ones(C.size, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"unknown damping mode 'heuristic'.*'exact'"):
        C.solve(v, 0.1, mode="heuristic")
    with pytest.raises(ValueError, match="scalar damping"):
        C.solve(v, (0.1, 0.2))
    if "factored" in C.modes:
        C.solve(v, (0.1, 0.2), mode="factored")
        with pytest.raises(ValueError, match="scalar damping"):
            C.solve(v, (0.1, 0.2), mode="pi")


def test_a_mixed_block_matrix_offers_only_the_modes_every_block_has():
    C = BlockDiagonal([Kron(spd(2, 1), spd(2, 2)), Dense(spd(3, 3))])
    assert C.modes == ("exact",)
    assert BlockDiagonal([Kron(spd(2, 1), spd(2, 2))]).modes == ("exact", "factored", "pi", "trace")


def test_an_approximation_damps_its_exact_blocks_exactly_but_refuses_a_pair_for_them():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2)).double()
    prob = cl.Problem(model, nn.CrossEntropyLoss(), torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 2, (6,)))
    K = cl.approx.kfac(prob, unsupported="exact")
    g = prob.gradient()
    K.direction(g, 0.1, mode="factored")
    with pytest.raises(ValueError, match=r"block '1'.*pair"):
        K.direction(g, (0.1, 0.2), mode="factored")


def _rank_deficient_ggn() -> tuple[cl.CurvatureMatrix, torch.Tensor]:
    """The README's quick-start problem: P = 67 parameters, a GGN of rank < P."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    X, y = torch.randn(32, 4, dtype=torch.float64), torch.randint(0, 3, (32,))
    prob = cl.Problem(model, nn.CrossEntropyLoss(), X, y)
    return cl.exact.ggn(prob), prob.gradient()


def test_a_singular_system_raises_with_the_suggestion_to_damp():
    G, g = _rank_deficient_ggn()
    w = G.eigvalsh()
    assert int((w.abs() <= G.size * torch.finfo(w.dtype).eps * float(w.max())).sum()) > 0  # it is singular
    G = Dense(G.to_dense())  # no cached eigendecomposition: the factorisation must notice
    for op in (lambda: G.solve(g, 0.0), lambda: G.inverse(0.0), lambda: G.direction(g, 0.0)):
        with pytest.raises(ValueError, match="singular.*increase the damping"):
            op()
    x = G.solve(g, 1e-3)
    assert float((G @ x + 1e-3 * x - g).norm() / g.norm()) < 1e-8
    with pytest.raises(ValueError, match="singular"):
        Diagonal(torch.tensor([1.0, 0.0], dtype=torch.float64)).solve(torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="singular"):
        EigenKron(torch.eye(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64),
                  torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)).solve(torch.ones(4, dtype=torch.float64))


def test_an_indefinite_but_regular_system_still_solves():
    H = Dense(torch.diag(torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)))
    x = H.solve(torch.ones(3, dtype=torch.float64), 0.1)
    assert torch.allclose(x, 1 / torch.tensor([2.1, -0.9, 0.6], dtype=torch.float64))


def test_the_singular_error_names_the_smallest_pivot_and_the_threshold():
    """The refusal prints the absolute smallest damped eigenvalue and the √n·ε·scale threshold it fell below."""
    import re

    import curvlab as cl

    U = torch.randn(3, 8, dtype=torch.float64)
    C = cl.Dense(U.T @ U)  # rank 3 < 8
    with pytest.raises(ValueError, match="numerically singular") as info:
        C.solve(torch.ones(8, dtype=torch.float64), 0.0)
    smallest, tol = map(float, re.search(r"pivot (\S+) ≤ (\S+) = √n·ε·scale", str(info.value)).groups())
    scale = float(torch.linalg.eigvalsh(U.T @ U).abs().max())
    assert smallest <= tol <= 10 * math.sqrt(8) * torch.finfo(torch.float64).eps * scale
