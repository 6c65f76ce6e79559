"""Low-rank and block-low-rank matrices C = UᵀU from a :class:`~curvlab.capture.Capture`.

The rows of U are the per-sample rows v_nk = J_nᵀ u_nk of the capture (r = k·N rows, row index
k·N + n), already scaled so that UᵀU is exactly the oracle's matrix. A single-use ``nn.Linear`` or
``nn.Conv2d`` contributes a :class:`~curvlab.linalg.KronRowsFactor` built from its inputs a and
cotangents g (its rows are never formed); any other parameters contribute their explicit rows
(:class:`~curvlab.linalg.DenseFactor`). The pieces sit side by side in parameter order
(:class:`~curvlab.linalg.ConcatFactor`).
"""

from __future__ import annotations

from curvlab.capture import Capture, GenericRows, LayerIO
from curvlab.linalg import BlockDiagonal, ConcatFactor, DenseFactor, Factor, KronRowsFactor, LowRank
from curvlab.problem import Partition

__all__ = ["factor_from_capture", "low_rank_from_capture", "block_low_rank_from_capture"]


def _piece_factor(p: LayerIO | GenericRows) -> Factor:
    if isinstance(p, LayerIO):
        return KronRowsFactor(p.a, p.g, bias=p.has_bias)
    k, n, w = p.rows.shape
    return DenseFactor(p.rows.reshape(k * n, w))


def factor_from_capture(cap: Capture, size: int) -> Factor:
    """U (k·N × P) with UᵀU = Σ_n Σ_k v_nk v_nkᵀ over all of θ."""
    stops = 0
    for p in cap.pieces:
        if p.start != stops:
            raise ValueError(f"the capture does not cover θ contiguously (a piece starts at {p.start}, "
                             f"expected {stops}); capture with generic=True")
        stops = p.stop
    if stops != size:
        raise ValueError(f"the capture covers {stops} of {size} parameters; capture with generic=True")
    factors = [_piece_factor(p) for p in cap.pieces]
    return factors[0] if len(factors) == 1 else ConcatFactor(factors)


def low_rank_from_capture(cap: Capture, size: int) -> LowRank:
    """Return C = UᵀU as a LowRank matrix, U the rows of :func:`factor_from_capture`."""
    return LowRank(factor_from_capture(cap, size))


def block_low_rank_from_capture(cap: Capture, partition: Partition) -> BlockDiagonal:
    """One LowRank per partition block: the factor's columns of that block."""
    U = factor_from_capture(cap, partition[-1].slice.stop)
    return BlockDiagonal([LowRank(U.restrict(b.slice)) for b in partition], partition.names)
