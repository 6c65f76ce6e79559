"""Dense, block and diagonal matrices C = Σ_n Σ_k v_nk v_nkᵀ from a :class:`~curvlab.capture.Capture`.

The block of C between two layers l, m that are applied once per sample is contracted without
forming any per-sample Jacobian (row-major weights):

    C_lm = Σ_n M_n ⊗ (a_n,l a_n,mᵀ),   M_n = Σ_k g_nk,l g_nk,mᵀ = B_n,lᵀ Λ_n B_n,m,

as one matrix product per pair of layers: W[n, (o, i, p)] = M_n[o, p] a_n,l[i] then Wᵀ a_m, which
costs 2·N·P_l·P_m flops — C times less than Σ_n J_nᵀ Λ_n J_n from per-sample Jacobians. Layers with
weight sharing (convolutions, sequence inputs) and parameters of any other module use the
explicit rows v_nk (2·N·k·P_l·P_m). ``block`` computes only the pairs inside a partition block,
``diag`` only Σ_n Σ_k v_nk², in O(N·k·P).
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvlab import memory
from curvlab.capture import Capture, GenericRows, LayerIO
from curvlab.linalg import BlockDiagonal, Dense, Diagonal, KronLayout
from curvlab.problem import Partition

__all__ = ["dense_from_capture", "block_from_capture", "diag_from_capture", "symmetrize_", "kron_parts_into"]

_CHUNK_BYTES = 8 * 2**20


def symmetrize_(M: Tensor, tile: int = 512) -> Tensor:
    """M ← (M + Mᵀ)/2 in place, tile by tile (temporaries of one tile, not of M)."""
    n = M.shape[0]
    for r in range(0, n, tile):
        D = M[r:r + tile, r:r + tile]
        D.copy_(0.5 * (D + D.T))
        for c in range(r + tile, n, tile):
            U, L = M[r:r + tile, c:c + tile], M[c:c + tile, r:r + tile]
            avg = 0.5 * (U + L.T)
            U.copy_(avg)
            L.copy_(avg.T)
    return M


def _is_kron(p: LayerIO | GenericRows) -> bool:
    return isinstance(p, LayerIO) and p.positions == 1


def _rows(p: LayerIO | GenericRows) -> Tensor:
    return p.rows if isinstance(p, GenericRows) else p.jacobian_rows()


def _by_pairs(rows: int, cols: int) -> bool:
    """Return whether Σ_n M_n ⊗ a_n b_nᵀ runs faster as one GEMM per (o, p) than as one GEMM with o·p rows.

    True for few outputs and many inputs (measured on 2 cores, float64: 10 × 513, the head of
    digits-cnn, 2× faster by pairs; 16 × 129 and every MLP layer of the canned problems faster as
    one GEMM).
    """
    return 256 * rows <= cols


def _kron_sum_pairs_into(out: Tensor, M: Tensor, a: Tensor, b: Tensor, symmetric: bool) -> None:
    """out[(o, i), (p, j)] = Σ_n M_n[o, p] a_n[i] b_n[j] as one GEMM (aᵀ diag(M[:, o, p])) b per (o, p).

    Each GEMM is (i × N)·(N × j), row-major operands, written into the (o, ·, p, ·) sub-block; with
    ``symmetric`` (a = b, M_n symmetric) only o ≤ p is computed, the (p, ·, o, ·) sub-block is its
    transpose and the o = p sub-blocks are averaged with their transposes (exactly symmetric).
    """
    n, o, p = M.shape
    i, j = a.shape[1], b.shape[1]
    out4 = out.view(o, i, p, j)
    aT = a.T.contiguous()  # (i, N)
    for r in range(o):
        for c in range(r if symmetric else 0, p):
            dst = out4[r, :, c, :]
            torch.mm(aT * M[:, r, c], b, out=dst)  # written in place (a strided view: ld = p·j)
            if symmetric and r == c:
                dst.copy_(0.5 * (dst + dst.T))
            elif symmetric:
                out4[c, :, r, :] = dst.T


def _kron_sum_into(out: Tensor, M: Tensor, a: Tensor, b: Tensor) -> None:
    """out[(o, i), (p, j)] = Σ_n M_n[o, p] a_n[i] b_n[j]: M (N,o,p), a (N,i), b (N,j).

    One GEMM T[(o, p), (i, j)] = M̃ (a ⊙ b) with inner dimension N — rows o·p, columns i·j, both
    operands row-major, and only the N×(i·j) products a_n ⊗ b_n formed — then one permuted copy
    into ``out`` (a strided view of the result matrix); chunked over i to bound memory.
    """
    n, o, p = M.shape
    i, j = a.shape[1], b.shape[1]
    if _by_pairs(o * p, i * j):
        _kron_sum_pairs_into(out, M, a, b, symmetric=False)
        return
    Mt = M.permute(1, 2, 0).reshape(o * p, n)  # small: N·o·p
    out4 = out.view(o, i, p, j)
    step = max(1, _CHUNK_BYTES // max(1, max(n, o * p) * j * M.element_size()))
    for s in range(0, i, step):
        e = min(i, s + step)
        AB = (a[:, s:e, None] * b[:, None, :]).reshape(n, -1)
        T = Mt @ AB  # ((o, p), (i-chunk, j))
        out4[:, s:e].copy_(T.view(o, p, e - s, j).permute(0, 2, 1, 3))


def _kron_sum_symmetric_into(out: Tensor, M: Tensor, a: Tensor) -> None:
    """out[(o, i), (p, j)] = Σ_n M_n[o, p] a_n[i] a_n[j] for symmetric M_n: half the work.

    The block is symmetric under (o, i) ↔ (p, j), so only the rows (o, p) with o ≤ p of the GEMM
    of :func:`_kron_sum_into` are computed; each is written to (o, ·, p, ·) and, transposed, to
    (p, ·, o, ·). The o = p rows are averaged with their transposes, so the result is exactly
    symmetric (no separate symmetrisation pass).
    """
    n, o, _ = M.shape
    i = a.shape[1]
    if _by_pairs(o * o, i * i):
        _kron_sum_pairs_into(out, M, a, a, symmetric=True)
        return
    r, c = torch.triu_indices(o, o, device=M.device)
    Mt = M[:, r, c].T.contiguous()  # (rows o ≤ p, N)
    out4 = out.view(o, i, o, i)
    step = max(1, _CHUNK_BYTES // max(1, max(n, len(r)) * i * M.element_size()))
    for s in range(0, i, step):
        e = min(i, s + step)
        AA = (a[:, s:e, None] * a[:, None, :]).reshape(n, -1)
        T = (Mt @ AA).view(-1, e - s, i)  # (rows, i-chunk, i)
        out4[r, s:e, c, :] = T  # advanced indices first: (rows, i-chunk, i)
        out4[c, :, r, s:e] = T.transpose(1, 2)
    diag = torch.arange(o, device=M.device)
    D = out4[diag, :, diag, :]  # (o, i, i): the o = p sub-blocks
    out4[diag, :, diag, :] = 0.5 * (D + D.transpose(1, 2))


#: up to this many cotangents per sample, C_pq = V_pᵀ V_q with explicit rows (one GEMM with inner
#: dimension k·N at full efficiency, 2·N·k·P_p·P_q flops) beats the M_n contraction
_ROWS_UP_TO = 2


def _layer_pair(p: LayerIO, q: LayerIO, out: Tensor) -> None:
    """Write C_pq (p, q: single-position layers) into ``out`` of shape (p.size, q.size).

    Each part (weight or bias columns of ā = [a, 1], :meth:`KronLayout.parts`) of the two layers is
    Σ_n M_n ⊗ ā_n,p[rows] ā_n,q[cols]ᵀ, the GEMM of :func:`_kron_sum_into` (by halves for the weight
    part of a diagonal block), written into its range in parameter order. On a diagonal block
    (p is q) the parts below the diagonal are copies of the transposed parts above it, so the
    block is exactly symmetric.
    """
    if p.g.shape[0] <= _ROWS_UP_TO:
        Rp, Rq = p.jacobian_rows(), q.jacobian_rows()
        torch.matmul(Rp.reshape(-1, Rp.shape[2]).T, Rq.reshape(-1, Rq.shape[2]), out=out)
        if p is q:
            symmetrize_(out)
        return
    M = torch.einsum("kno,knp->nop", p.g[:, :, 0], q.g[:, :, 0])
    kron_parts_into(out, M, p.layout.augment(p.a[:, 0]), q.layout.augment(q.a[:, 0]), p.layout, q.layout,
                    symmetric=p is q)


def kron_parts_into(out: Tensor, M: Tensor, ap: Tensor, aq: Tensor, lp: KronLayout, lq: KronLayout,
                    symmetric: bool) -> None:
    """Write out = Σ_n M_n ⊗ ā_n,p ā_n,qᵀ in parameter order (rows lp, columns lq), part by part.

    ``ap`` (N, q_p) and ``aq`` (N, q_q) are augmented inputs; each part of :meth:`KronLayout.parts`
    is one :func:`_kron_sum_into`, written into its range. With ``symmetric`` (a diagonal block:
    M_n symmetric, ap = aq) the weight part is computed by halves, the parts below the diagonal are
    the transposes of those above it, and the block is exactly symmetric.
    """
    for a, (rcols, rrange) in enumerate(lp.parts()):
        for b, (ccols, crange) in enumerate(lq.parts()):
            dst = out[rrange, crange]
            if symmetric and b < a:  # below the diagonal of a diagonal block: the transpose
                dst.copy_(out[crange, rrange].T)
            elif symmetric and a == b == 0:  # the weight part of a diagonal block: by halves
                _kron_sum_symmetric_into(dst, M, ap[:, rcols])
            else:
                _kron_sum_into(dst, M, ap[:, rcols], aq[:, ccols])
                if symmetric and a == b:  # bias × bias of a diagonal block: Σ_n M_n, symmetrised
                    dst.copy_(0.5 * (dst + dst.T))


def _rows_layer_pair(R: Tensor, q: LayerIO, out: Tensor) -> None:
    """Write Σ_nk r_nk (g_nk,q ⊗ ā_n,q)ᵀ for explicit rows R (k, N, w) into out (w, q.size).

    One GEMM (Y_n[w, o] = Σ_k r_nk g_nk,q, then Yᵀ ā over the samples) per part of q's folded
    columns (:meth:`KronLayout.parts`; the bias column of ā is 1).
    """
    gq, aq = q.g[:, :, 0], q.layout.augment(q.a[:, 0])
    Y = torch.einsum("knw,kno->nwo", R, gq)  # (N, w, o)
    w = R.shape[2]
    Yt = Y.reshape(Y.shape[0], -1).T
    for cols, rng in q.layout.parts():
        out[:, rng] = (Yt @ aq[:, cols]).reshape(w, -1)


def _pair(p: LayerIO | GenericRows, q: LayerIO | GenericRows, out: Tensor) -> None:
    if _is_kron(p) and _is_kron(q):
        _layer_pair(p, q, out)
    elif _is_kron(q):
        _rows_layer_pair(_rows(p), q, out)
    elif _is_kron(p):
        tmp = torch.empty(out.shape[::-1], dtype=out.dtype, device=out.device)
        _rows_layer_pair(_rows(q), p, tmp)
        out.copy_(tmp.T)
    else:
        Rp, Rq = _rows(p), _rows(q)
        out.copy_(Rp.reshape(-1, Rp.shape[2]).T @ Rq.reshape(-1, Rq.shape[2]))


def _fill(pieces: list, out: Tensor, offset: int) -> None:
    """Fill the symmetric matrix ``out`` (covering θ[offset:offset+len(out)]) from ``pieces``."""
    for i, p in enumerate(pieces):
        for q in pieces[i:]:
            block = out[p.start - offset:p.stop - offset, q.start - offset:q.stop - offset]
            _pair(p, q, block)
            if q is p:  # exactly symmetric, not just up to rounding
                if not _is_kron(p):  # (single-position layers write exactly symmetric diagonal blocks)
                    symmetrize_(block)
            else:
                out[q.start - offset:q.stop - offset, p.start - offset:p.stop - offset] = block.T


def dense_from_capture(cap: Capture, size: int) -> Dense:
    """Return C = Σ_n Σ_k v_nk v_nkᵀ as a dense size×size matrix (see the module docstring)."""
    dtype, device = cap.output.dtype, cap.output.device
    memory.check((size, size), dtype, "the dense curvature matrix")
    out = torch.empty(size, size, dtype=dtype, device=device)
    _fill(cap.pieces, out, 0)
    return Dense(out)


def _restrict(p: LayerIO | GenericRows, start: int, stop: int) -> GenericRows | LayerIO:
    if p.start >= start and p.stop <= stop:
        return p
    R = _rows(p)
    lo, hi = max(start, p.start), min(stop, p.stop)
    return GenericRows(("part",), lo, R[:, :, lo - p.start:hi - p.start])


def block_from_capture(cap: Capture, partition: Partition) -> BlockDiagonal:
    """Exact diagonal blocks; only pairs of pieces inside a block are contracted."""
    dtype, device = cap.output.dtype, cap.output.device
    blocks = []
    for b in partition:
        s = b.slice
        pieces = [_restrict(p, s.start, s.stop) for p in cap.pieces if p.start < s.stop and p.stop > s.start]
        memory.check((b.size, b.size), dtype, f"block {b.name!r}")
        out = torch.empty(b.size, b.size, dtype=dtype, device=device)
        _fill(pieces, out, s.start)
        blocks.append(Dense(out))
    return BlockDiagonal(blocks, partition.names)


def diag_from_capture(cap: Capture, size: int) -> Diagonal:
    """Return diag(C) = Σ_n Σ_k v_nk², shape (size,), in O(N·k·P)."""
    dtype, device = cap.output.dtype, cap.output.device
    out = torch.empty(size, dtype=dtype, device=device)
    for p in cap.pieces:
        if _is_kron(p):  # Σ_n (Σ_k g_nk²) ⊗ ā_n², part by part of the folded columns
            gsq = (p.g[:, :, 0] ** 2).sum(0)  # (N, o)
            a = p.layout.augment(p.a[:, 0])
            for cols, rng in p.layout.parts():
                out[p.start + rng.start:p.start + rng.stop] = (gsq.T @ a[:, cols] ** 2).reshape(-1)
        else:
            out[p.start:p.stop] = (_rows(p) ** 2).sum(dim=(0, 1))
    return Diagonal(out)
