"""LowRank and its factors against the same quantities of explicit dense matrices (float64, 1e-10)."""

from __future__ import annotations

import pytest
import torch

from curvlab import memory
from curvlab.linalg import (
    BlockDiagonal,
    ConcatFactor,
    CurvatureMatrix,
    Dense,
    DenseFactor,
    KronRowsFactor,
    LowRank,
    StackFactor,
    TransformedFactor,
)

TOL = 1e-10
f64 = torch.float64


def close(a, b, tol=TOL):
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    err = float((a - b).abs().max()) if a.numel() else 0.0
    assert err <= tol * max(1e-300, float(b.abs().max()) if b.numel() else 0.0, 1e-300), (err, float(b.abs().max()))


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=f64)


def overlap(A: torch.Tensor, B: torch.Tensor) -> float:
    """‖AᵀB‖²_F / k for two P×k orthonormal bases: 1 when they span the same subspace."""
    return float((A.T @ B).pow(2).sum() / A.shape[1])


def top_k_with_gap(ev_desc: torch.Tensor, limit: int = 8) -> int:
    """A k ≤ limit with a clear gap ev[k-1] − ev[k] (so the top-k subspace is well defined)."""
    limit = min(limit, ev_desc.numel() - 1)
    gaps = (ev_desc[:limit] - ev_desc[1:limit + 1]) / ev_desc.abs().max()
    return int(torch.argmax(gaps)) + 1


def assert_matches_dense(C: CurvatureMatrix, M: torch.Tensor, eigen: bool = True) -> None:
    """Every protocol result of C against the dense symmetric M (the checks of both test files)."""
    P = M.shape[0]
    eye = torch.eye(P, dtype=f64)
    close(C.to_dense(), M)
    V = randn(P, 3, seed=1)
    close(C @ V, M @ V)
    close(C @ V[:, 0], M @ V[:, 0])
    close(C.diagonal(), M.diagonal())
    close(C.trace(), M.trace())
    close(C.frobenius_norm(), torch.linalg.matrix_norm(M))
    scale = float(torch.linalg.matrix_norm(M, 2))
    for lam in (1e-3 * scale, 0.1 * scale, 10.0 * scale):
        Md = M + lam * eye
        close(C.solve(V, lam), torch.linalg.solve(Md, V), 1e-9)
        close(C.inverse(lam).to_dense(), torch.linalg.inv(Md), 1e-9)
        close(C.logdet(lam), torch.logdet(Md))
    if eigen:
        assert_spectrum_matches(C, M)


def assert_spectrum_matches(C: CurvatureMatrix, M: torch.Tensor) -> None:
    ev = torch.linalg.eigvalsh(M)
    w = C.eigvalsh()
    close(w, ev)  # the nonzero part and the zeros, in order
    if isinstance(C, LowRank):
        zeros = C.size - C.rank
        assert int((w == C.shift).sum()) >= zeros  # reported exactly as the shift (c = 0: zeros)
        rest = ev[:zeros] if C.scale >= 0 else ev.flip(0)[:zeros]  # the eigenvalues equal to c
        assert zeros == 0 or float((rest - C.shift).abs().max()) <= TOL * float(ev.abs().max())
    evd = ev.flip(0)
    k = top_k_with_gap(evd)
    top = C._top_eigen(k) if isinstance(C, LowRank) else None
    if top is not None:
        close(top.values, evd[:k])
        Qd = torch.linalg.eigh(M).eigenvectors.flip(1)[:, :k]
        assert abs(overlap(top.vectors, Qd) - 1) < 1e-8
        close(top.vectors.T @ top.vectors, torch.eye(k, dtype=f64), 1e-8)


def low_rank_case(P=9, r=4, seed=0, shift=0.0, scale=1.0):
    U = randn(r, P, seed=seed)
    return LowRank(DenseFactor(U), scale, shift), shift * torch.eye(P, dtype=f64) + scale * U.T @ U


# ---------------------------------------------------------------------------- KronRowsFactor


def kron_case(T: int, bias: bool, k=3, n=4, d_in=5, d_out=2, seed=0):
    a, g = randn(n, T, d_in, seed=seed), randn(k, n, T, d_out, seed=seed + 1)
    rows = torch.einsum("kntp,nti->knpi", g, a).reshape(k, n, -1)
    if bias:
        rows = torch.cat([rows, g.sum(2)], dim=2)
    return a, g, rows.reshape(k * n, -1)


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("path", ["auto", "hadamard", "rows"])
def test_kron_rows_factor_against_explicit_rows(T, bias, path):
    a, g, U = kron_case(T, bias)
    F = KronRowsFactor(a, g, bias, gram=path)
    assert (F.rank, F.size) == U.shape
    close(F.rows(), U)
    close(F.gram(), U @ U.T)
    V, W = randn(U.shape[1], 4, seed=5), randn(U.shape[0], 3, seed=6)
    close(F.apply(V), U @ V)
    close(F.apply_t(W), U.T @ W)
    close(F.column_sq_norms(), (U**2).sum(0))
    other = KronRowsFactor(*kron_case(T, bias, k=2, n=3, seed=9)[:2], bias, gram=path)
    close(F.cross_gram(other), U @ other.rows().T)


@pytest.mark.parametrize("T", [1, 2])
@pytest.mark.parametrize("bias", [False, True])
def test_kron_rows_factor_restrict_any_slice(T, bias):
    a, g, U = kron_case(T, bias, d_in=4, d_out=3)
    F = KronRowsFactor(a, g, bias)
    for lo, hi in [(0, U.shape[1]), (0, 12), (4, 8), (1, 3), (3, 9), (2, U.shape[1]), (12, U.shape[1]),
                   (5, 6)]:
        if hi > U.shape[1] or hi <= lo:
            continue
        R = F.restrict(slice(lo, hi))
        close(R.rows(), U[:, lo:hi])
        close(R.gram(), U[:, lo:hi] @ U[:, lo:hi].T)
        close(R.apply(randn(hi - lo, 2, seed=3)), U[:, lo:hi] @ randn(hi - lo, 2, seed=3))


def test_kron_rows_factor_validates():
    with pytest.raises(ValueError, match="matching N, T"):
        KronRowsFactor(randn(4, 1, 3), randn(2, 5, 1, 2))
    with pytest.raises(ValueError, match="gram must be"):
        KronRowsFactor(randn(4, 1, 3), randn(2, 4, 1, 2), gram="fast")
    F = KronRowsFactor(randn(4, 1, 3), randn(2, 4, 1, 2))
    with pytest.raises(ValueError, match=r"shape \(6, m\)"):
        F.apply(randn(5, 1))
    with pytest.raises(ValueError, match="contiguous slice"):
        F.restrict(slice(0, 6, 2))


# ---------------------------------------------------------------------------- composite factors


def composite_factors():
    """(factor, explicit U) pairs covering every factor class and their compositions."""
    a, g, Uk = kron_case(1, True, k=2, n=3, d_in=3, d_out=2)  # rank 6, size 8
    a2, g2, Uk2 = kron_case(2, False, k=2, n=3, d_in=2, d_out=2, seed=4)  # rank 6, size 4
    D = randn(6, 5, seed=7)
    cat = ConcatFactor([KronRowsFactor(a, g, True), DenseFactor(D), KronRowsFactor(a2, g2)])
    Ucat = torch.cat([Uk, D, Uk2], dim=1)
    M = randn(4, 6, seed=8)
    return {
        "dense": (DenseFactor(D), D),
        "concat": (cat, Ucat),
        "stack": (StackFactor([cat, DenseFactor(randn(2, 17, seed=2))]), torch.cat([Ucat, randn(2, 17, seed=2)])),
        "transformed": (TransformedFactor(cat, M), M @ Ucat),
    }


@pytest.mark.parametrize("name", ["dense", "concat", "stack", "transformed"])
def test_composite_factors_against_explicit_rows(name):
    F, U = composite_factors()[name]
    assert (F.rank, F.size) == U.shape
    close(F.rows(), U)
    close(F.gram(), U @ U.T)
    close(F.gram_eigvalsh(), torch.linalg.eigvalsh(U @ U.T).flip(0))
    close(F.apply(randn(U.shape[1], 2, seed=1)), U @ randn(U.shape[1], 2, seed=1))
    close(F.apply_t(randn(U.shape[0], 2, seed=2)), U.T @ randn(U.shape[0], 2, seed=2))
    close(F.column_sq_norms(), (U**2).sum(0))
    close(F.sq_norm(), (U**2).sum())
    for lo, hi in [(0, U.shape[1]), (1, 4), (2, U.shape[1] - 1), (7, 10)]:
        if hi <= U.shape[1]:
            close(F.restrict(slice(lo, hi)).rows(), U[:, lo:hi])
    W = randn(3, U.shape[1], seed=3)
    close(F.cross_gram(DenseFactor(W)), U @ W.T)
    close(DenseFactor(W).cross_gram(F), W @ U.T)


def test_concat_cross_gram_with_the_same_layout():
    F, U = composite_factors()["concat"]
    G, V = composite_factors()["transformed"]
    close(F.cross_gram(G), U @ V.T)
    close(G.cross_gram(F), V @ U.T)


def test_factor_rows_respect_the_memory_budget():
    F = DenseFactor(randn(4, 300))
    with memory.budget(1000), pytest.raises(memory.MemoryBudgetError, match="explicit rows"):
        F.rows()


# ---------------------------------------------------------------------------- LowRank


@pytest.mark.parametrize("P,r,shift,scale", [(9, 4, 0.0, 1.0), (9, 4, 0.3, 2.0), (6, 9, 0.0, 1.0),
                                             (8, 3, 0.5, -0.2)])
def test_low_rank_against_dense(P, r, shift, scale):
    C, M = low_rank_case(P, r, shift=shift, scale=scale)
    assert C.structure == "low_rank" and C.modes == ("exact",)
    if scale > 0:
        assert_matches_dense(C, M)
    else:  # indefinite once damped: products, scalars and spectra only
        close(C.to_dense(), M)
        close(C.frobenius_norm(), torch.linalg.matrix_norm(M))
        close(C.trace(), M.trace())
        assert_spectrum_matches(C, M)
        close(C.solve(randn(P, 2), 2.0), torch.linalg.solve(M + 2 * torch.eye(P, dtype=f64), randn(P, 2)))
        close(C.inverse(2.0).to_dense(), torch.linalg.inv(M + 2 * torch.eye(P, dtype=f64)))


def test_full_eigh_completes_the_basis():
    C, M = low_rank_case(10, 4)
    w, Q = C.eigh()
    close(w, torch.linalg.eigvalsh(M))
    close(Q.T @ Q, torch.eye(10, dtype=f64))
    close(Q @ torch.diag(w) @ Q.T, M)
    assert int((w == 0).sum()) == 6 and C.rank == 4


def test_numerically_zero_gram_eigenvalues_count_as_zeros():
    U = randn(3, 12)
    U = torch.cat([U, U[:1] + U[1:2]])  # four rows, rank three
    C = LowRank(DenseFactor(U))
    assert C.rank == 3
    assert int((C.eigvalsh() == 0).sum()) == 9
    close(C.eigvalsh(), torch.linalg.eigvalsh(U.T @ U))
    close(C.logdet(0.5), torch.logdet(U.T @ U + 0.5 * torch.eye(12, dtype=f64)))


def test_damping_zero_is_singular_below_full_rank():
    C, _ = low_rank_case(9, 4)
    for call in (lambda: C.solve(randn(9), 0.0), lambda: C.inverse(0.0), lambda: C.logdet(0.0)):
        with pytest.raises(ValueError, match=r"singular.*rank 4 < P = 9.*damping"):
            call()
    with pytest.raises(ValueError, match="damping must be ≥ 0"):
        C.solve(randn(9), -1e-3)
    F, M = low_rank_case(6, 9)  # more rows than columns: invertible without damping
    close(F.solve(randn(6, 2), 0.0), torch.linalg.solve(M, randn(6, 2)))
    close(F.inverse(0.0).to_dense(), torch.linalg.inv(M))
    close(F.logdet(0.0), torch.logdet(M))


def test_inverse_is_low_rank_plus_identity():
    C, M = low_rank_case(9, 4, shift=0.2)
    inv = C.inverse(0.3)
    assert isinstance(inv, LowRank) and inv.shift == pytest.approx(1 / 0.5) and inv.scale == -1.0
    close(inv.inverse(0.0).to_dense(), M + 0.3 * torch.eye(9, dtype=f64), 1e-9)
    tall, N = low_rank_case(5, 8)  # more rows than columns: the P×P system is the smaller one
    assert isinstance(tall.inverse(0.1), Dense)
    close(tall.inverse(0.1).to_dense(), torch.linalg.inv(N + 0.1 * torch.eye(5, dtype=f64)))


def test_scaled_and_added():
    C, M = low_rank_case(9, 3, seed=0)
    D, N = low_rank_case(9, 2, seed=1)
    for out, ref in [(2.5 * C, 2.5 * M), (-C, -M), (C + D, M + N), (C - (-D), M + N), (C + 3 * D, M + 3 * N)]:
        close(out.to_dense(), ref)
    assert isinstance(C + D, LowRank) and (C + D).factor.rank == 5
    assert isinstance(C + 3 * D, LowRank)
    close((C - D).to_dense(), M - N)  # scales of opposite signs: dense
    assert not isinstance(C - D, LowRank)
    close((C + Dense(N)).to_dense(), M + N)


def test_inner_and_restrict():
    C, M = low_rank_case(9, 3, seed=0, shift=0.1)
    D, N = low_rank_case(9, 4, seed=1, shift=-0.2, scale=0.5)
    close(C._inner(D), (M * N).sum())
    close(C._inner(Dense(N)), (M * N).sum())
    B = BlockDiagonal([Dense(N[:4, :4]), Dense(N[4:, 4:])])
    close(C._inner(B), (M * torch.block_diag(N[:4, :4], N[4:, 4:])).sum())
    for s in (slice(0, 9), slice(2, 7), slice(8, 9)):
        R = C._restrict(s)
        assert isinstance(R, LowRank)
        close(R.to_dense(), M[s, s])
        close(R.solve(randn(R.size), 0.1), torch.linalg.solve(M[s, s] + 0.1 * torch.eye(R.size, dtype=f64),
                                                              randn(R.size)))


def test_top_eigen_beyond_the_rank_uses_the_complement():
    C, M = low_rank_case(9, 3, seed=2)
    top = C._top_eigen(5)
    close(top.values[:3], torch.linalg.eigvalsh(M).flip(0)[:3])
    assert bool((top.values[3:] == 0).all())
    close(top.vectors.T @ top.vectors, torch.eye(5, dtype=f64))
    close(M @ top.vectors, top.vectors * top.values)
    with pytest.raises(ValueError, match="k must be an integer"):
        C._top_eigen(10)


def test_dense_form_respects_the_budget():
    C, _ = low_rank_case(400, 2)
    with memory.budget(400 * 400 * 8 - 1), pytest.raises(memory.MemoryBudgetError, match="low-rank"):
        C.to_dense()
    C.solve(randn(400), 0.1)  # the solve needs no dense matrix
