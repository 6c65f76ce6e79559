"""curvlab.exact.outer on its own: contractions of random captures against explicit Kronecker sums.

The reference builds every per-sample row v_nk = Σ_t g_nkt ⊗ a_nt (bias part Σ_t g_nkt) with
``torch.kron`` and sums v_nk v_nkᵀ, or Σ_n M_n ⊗ a_n b_nᵀ with ``torch.kron`` per sample; nothing is
shared with the module under test.
"""

from __future__ import annotations

import pytest
import torch

from curvlab import memory
from curvlab.capture import Capture, GenericRows, LayerIO
from curvlab.exact import outer
from curvlab.exact.outer import (
    _kron_sum_into,
    _kron_sum_symmetric_into,
    block_from_capture,
    dense_from_capture,
    diag_from_capture,
    symmetrize_,
)
from curvlab.layers import Layer
from curvlab.linalg import BlockDiagonal, Dense, Diagonal
from curvlab.problem import Block, Partition

N = 4


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def layer(name: str, start: int, k: int, t: int, d_in: int, d_out: int, bias: bool, seed: int) -> LayerIO:
    stop = start + d_out * d_in + (d_out if bias else 0)
    L = Layer(name, None, "linear", f"{name}.weight", f"{name}.bias" if bias else None, start, stop, 2 if t == 1 else 3)
    return LayerIO(L, _randn(N, t, d_in, seed=seed), _randn(k, N, t, d_out, seed=seed + 1))


def random_capture(k: int) -> Capture:
    """Single-position layers with and without bias, explicit rows, a weight-sharing layer: P = 40."""
    pieces = [
        layer("l0", 0, k, 1, 3, 2, True, 1),                      # 0:8
        GenericRows(("gen",), 8, _randn(k, N, 5, seed=3)),        # 8:13
        layer("l1", 13, k, 1, 4, 3, False, 5),                    # 13:25
        layer("l2", 25, k, 2, 2, 2, True, 7),                     # 25:31 (T = 2: explicit rows)
        layer("l3", 31, k, 1, 2, 3, True, 9),                     # 31:40
    ]
    return Capture(pieces, torch.zeros(N, 3, dtype=torch.float64), N)


P = 40


def explicit_rows(cap: Capture) -> torch.Tensor:
    """(k, N, P): v_nk = Σ_t kron(g_nkt, a_nt) (row-major weight), then the bias Σ_t g_nkt."""
    parts = []
    for p in cap.pieces:
        if isinstance(p, GenericRows):
            parts.append(p.rows)
            continue
        k = p.g.shape[0]
        R = torch.zeros(k, N, p.size, dtype=torch.float64)
        for kk in range(k):
            for n in range(N):
                w = sum(torch.kron(p.g[kk, n, t], p.a[n, t]) for t in range(p.positions))
                R[kk, n] = torch.cat([w, p.g[kk, n].sum(0)]) if p.has_bias else w
        parts.append(R)
    return torch.cat(parts, dim=2)


def reference_matrix(cap: Capture) -> torch.Tensor:
    V = explicit_rows(cap).reshape(-1, P)
    return V.T @ V


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-12) -> None:
    assert a.shape == b.shape
    err = float((a - b).abs().max()) / max(1.0, float(b.abs().max()))
    assert err <= tol, err


KS = [1, 2, 3, 5]  # k ≤ 2: rows path; k > 2: the M_n contraction


# ---------------------------------------------------------------------------------------- full, block, diag
@pytest.mark.parametrize("k", KS)
def test_dense_from_capture(k):
    cap = random_capture(k)
    C = dense_from_capture(cap, P)
    assert isinstance(C, Dense)
    close(C.matrix, reference_matrix(cap))
    assert torch.equal(C.matrix, C.matrix.T)  # exactly symmetric


def _partition(bounds: list[int]) -> Partition:
    return Partition(Block(f"b{i}", slice(lo, hi), (f"b{i}",)) for i, (lo, hi) in enumerate(zip(bounds, bounds[1:])))


PARTITIONS = {
    "per-piece": [0, 8, 13, 25, 31, 40],
    "pairs": [0, 13, 31, 40],
    "cutting": [0, 5, 11, 20, 28, 34, 40],  # cuts through weights, the generic rows and a bias
    "all": [0, 40],
}


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("bounds", list(PARTITIONS.values()), ids=list(PARTITIONS))
def test_block_from_capture(k, bounds):
    cap = random_capture(k)
    part = _partition(bounds)
    B = block_from_capture(cap, part)
    ref = reference_matrix(cap)
    assert isinstance(B, BlockDiagonal) and list(B.block_names) == part.names
    for blk, b in zip(B.blocks, part):
        close(blk.to_dense(), ref[b.slice, b.slice])
        assert torch.equal(blk.to_dense(), blk.to_dense().T)


@pytest.mark.parametrize("k", KS)
def test_diag_from_capture(k):
    cap = random_capture(k)
    D = diag_from_capture(cap, P)
    assert isinstance(D, Diagonal)
    close(D.diagonal(), reference_matrix(cap).diagonal())


def test_dense_over_budget_is_refused():
    with memory.budget(P * P * 8 - 1):
        with pytest.raises(memory.MemoryBudgetError):
            dense_from_capture(random_capture(2), P)


# ---------------------------------------------------------------------------------------- contraction helpers
def _kron_sum(M: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return sum(torch.kron(M[n], torch.outer(a[n], b[n])) for n in range(M.shape[0]))


@pytest.fixture(params=[False, True], ids=["one-chunk", "chunked"])
def chunking(request, monkeypatch):
    if request.param:  # one input index per chunk
        monkeypatch.setattr(outer, "_CHUNK_BYTES", 1)
    return request.param


@pytest.mark.parametrize("view", [False, True])
def test_kron_sum_into(chunking, view):
    o, p, i, j = 3, 2, 4, 5
    M, a, b = _randn(N, o, p, seed=1), _randn(N, i, seed=2), _randn(N, j, seed=3)
    if view:  # a strided window of a larger matrix, as the oracle passes it
        big = torch.full((o * i + 3, p * j + 2), float("nan"), dtype=torch.float64)
        out = big[1:1 + o * i, 2:2 + p * j]
    else:
        out = torch.empty(o * i, p * j, dtype=torch.float64)
    _kron_sum_into(out, M, a, b)
    close(out, _kron_sum(M, a, b))
    if view:  # nothing outside the window was touched
        assert bool(big[0].isnan().all()) and bool(big[:, :2].isnan().all()) and bool(big[-2:].isnan().all())


def test_kron_sum_symmetric_into(chunking):
    o, i, k = 3, 4, 5
    g, a = _randn(k, N, o, seed=4), _randn(N, i, seed=5)
    M = torch.einsum("kno,knp->nop", g, g)  # symmetric per sample
    out = torch.empty(o * i, o * i, dtype=torch.float64)
    _kron_sum_symmetric_into(out, M, a)
    close(out, _kron_sum(M, a, a))
    assert torch.equal(out, out.T)


@pytest.mark.parametrize("n,tile", [(10, 3), (10, 512), (7, 7), (1, 4)])
def test_symmetrize_(n, tile):
    M = _randn(n, n, seed=n)
    ref = 0.5 * (M + M.T)
    out = symmetrize_(M, tile)
    assert out is M
    assert torch.equal(M, ref) and torch.equal(M, M.T)
