"""Every CurvatureMatrix operation against the same operation on the dense matrix (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import curvlab as cl
from curvlab.linalg import BlockDiagonal, Dense, Diagonal, MatrixFree

TOL = 1e-10


def spd(n: int, seed: int, shift: float = 0.1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n + 2, generator=g, dtype=torch.float64)
    return A @ A.T / n + shift * torch.eye(n, dtype=torch.float64)


def indefinite(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    return A + A.T


def make(kind: str) -> tuple[cl.CurvatureMatrix, torch.Tensor]:
    if kind == "dense":
        M = spd(7, 0)
        return Dense(M), M
    if kind == "diag":
        d = torch.linspace(0.5, 3.0, 6, dtype=torch.float64)
        return Diagonal(d), torch.diag(d)
    if kind == "block":
        A, B = spd(4, 1), spd(3, 2)
        d = torch.tensor([0.7, 1.3], dtype=torch.float64)
        C = BlockDiagonal([Dense(A), Dense(B), Diagonal(d)], names=["a", "b", "c"])
        return C, torch.block_diag(A, B, torch.diag(d))
    if kind == "nested":
        inner = BlockDiagonal([Dense(spd(2, 3)), Dense(spd(3, 4))])
        C = BlockDiagonal([inner, Dense(spd(2, 5))])
        return C, torch.block_diag(spd(2, 3), spd(3, 4), spd(2, 5))
    if kind == "operator":
        M = spd(6, 6)
        return MatrixFree(6, lambda V: M @ V, torch.float64, chunk=4), M
    raise KeyError(kind)


KINDS = ["dense", "diag", "block", "nested", "operator"]


def close(a, b, tol=TOL):
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max())), float((a - b).abs().max())


@pytest.mark.parametrize("kind", KINDS)
def test_products_and_scalars(kind):
    C, M = make(kind)
    n = M.shape[0]
    v, V = torch.randn(n, dtype=torch.float64), torch.randn(n, 3, dtype=torch.float64)
    close(C.to_dense(), M)
    close(C @ v, M @ v)
    close(C @ V, M @ V)
    close(C.trace(), torch.trace(M))
    close(C.diagonal(), M.diagonal())
    close(C.frobenius_norm(), torch.linalg.matrix_norm(M))
    assert C.shape == (n, n)
    op = C.as_linear_operator()
    close(torch.from_numpy(op.matvec(v.numpy())), M @ v)
    close(torch.from_numpy(op @ V.numpy()), M @ V)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("damping", [0.0, 0.3])
def test_solve_inverse_logdet(kind, damping):
    C, M = make(kind)
    n = M.shape[0]
    Md = M + damping * torch.eye(n, dtype=torch.float64)
    V = torch.randn(n, 2, dtype=torch.float64)
    close(C.solve(V, damping), torch.linalg.solve(Md, V), 1e-8)
    close(C.solve(V[:, 0], damping), torch.linalg.solve(Md, V[:, 0]), 1e-8)
    close(C.inverse(damping).to_dense(), torch.linalg.inv(Md), 1e-8)
    close(C.logdet(damping), torch.logdet(Md))
    close(C.direction(V[:, 0], damping), -torch.linalg.solve(Md, V[:, 0]), 1e-8)


@pytest.mark.parametrize("kind", KINDS)
def test_spectrum(kind):
    C, M = make(kind)
    w, Q = C.eigh()
    close(w, torch.linalg.eigvalsh(M))
    close(C.eigvalsh(), torch.linalg.eigvalsh(M))
    assert bool((w[1:] >= w[:-1]).all())
    close(Q @ torch.diag(w) @ Q.T, M)
    close(Q.T @ Q, torch.eye(M.shape[0], dtype=torch.float64))
    assert C.eigh() is C.eigh()  # cached


@pytest.mark.parametrize("kind", KINDS)
def test_arithmetic(kind):
    C, M = make(kind)
    close((2.5 * C).to_dense(), 2.5 * M)
    close((C * 2.5).to_dense(), 2.5 * M)
    close((C / 4).to_dense(), M / 4)
    close((-C).to_dense(), -M)
    close((C + C).to_dense(), 2 * M)
    close((C - 0.5 * C).to_dense(), 0.5 * M)
    D = Dense(spd(M.shape[0], 9))
    close((C + D).to_dense(), M + D.to_dense())
    close((D - C).to_dense(), D.to_dense() - M)
    I = Diagonal(torch.ones(M.shape[0], dtype=torch.float64))
    close((C + I).to_dense(), M + torch.eye(M.shape[0], dtype=torch.float64))
    close((I - C).to_dense(), torch.eye(M.shape[0], dtype=torch.float64) - M)


def test_structure_is_kept():
    C, _ = make("block")
    assert isinstance(C + C, BlockDiagonal)
    assert isinstance(2 * C, BlockDiagonal)
    assert isinstance(C.inverse(0.1), BlockDiagonal)
    assert isinstance(C + Diagonal(torch.ones(9, dtype=torch.float64)), BlockDiagonal)
    assert C.block_names == ("a", "b", "c")
    assert [s.start for s in C.block_slices] == [0, 4, 7]
    assert isinstance(C.block("b"), Dense)
    D, _ = make("diag")
    assert isinstance(D + D, Diagonal) and isinstance(D.inverse(1.0), Diagonal)


def test_indefinite_dense():
    M = indefinite(6, 0)
    C = Dense(M)
    v = torch.randn(6, dtype=torch.float64)
    close(C.solve(v, 0.05), torch.linalg.solve(M + 0.05 * torch.eye(6, dtype=torch.float64), v), 1e-8)
    with pytest.raises(ValueError, match="not positive definite"):
        C.logdet()
    C.eigh()  # after eigh, solves go through the eigenbasis
    close(C.solve(v, 0.05), torch.linalg.solve(M + 0.05 * torch.eye(6, dtype=torch.float64), v), 1e-8)


def test_singular_raises():
    C = Diagonal(torch.tensor([0.0, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="singular"):
        C.solve(torch.ones(2, dtype=torch.float64))
    D = Dense(torch.zeros(3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="singular"):
        D.solve(torch.ones(3, dtype=torch.float64))


def test_matrix_free_cg_refuses_indefinite():
    M = indefinite(5, 1)
    C = MatrixFree(5, lambda V: M @ V, torch.float64)
    with pytest.raises(ValueError, match="positive definite"):
        C.solve(torch.ones(5, dtype=torch.float64), 0.0)


@pytest.mark.parametrize("kind", KINDS)
def test_bad_inputs(kind):
    C, M = make(kind)
    n = M.shape[0]
    with pytest.raises(ValueError, match="shape"):
        C @ torch.ones(n + 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="shape"):
        C.solve(torch.ones(n, 2, 2, dtype=torch.float64))
    bad = torch.ones(n, dtype=torch.float64)
    bad[0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        C @ bad
    with pytest.raises(ValueError, match="damping"):
        C.solve(torch.ones(n, dtype=torch.float64), float("inf"))
    for method in (C.logdet, C.inverse):
        with pytest.raises(ValueError, match="damping must be finite; got nan"):
            method(float("nan"))
    for alpha in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"scale a curvature matrix by {alpha}"):
            alpha * C
    with pytest.raises(ValueError, match="divide a curvature matrix by zero"):
        C / 0
    with pytest.raises(ValueError, match="sizes"):
        C + Dense(spd(n + 1, 0))


def test_budget_refuses_dense_eigenvectors():
    C = Diagonal(torch.ones(100, dtype=torch.float64))
    with cl.memory.budget(1000), pytest.raises(cl.memory.MemoryBudgetError, match="eigenvectors"):
        C.eigh()
    assert C.eigvalsh().shape == (100,)  # no P×P needed
    assert np.isclose(float(C.logdet(1.0)), 100 * np.log(2.0))
