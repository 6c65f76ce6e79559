"""A Kronecker-family preconditioner's damped inverse, prepared once per refresh.

Between two refreshes every step solves with the same matrix, damping and rule. :class:`DampedInverse`
takes what those solves share from the matrix once, after a first checked solve (which refuses a
(numerically) singular system exactly as ``CurvatureMatrix.direction`` does):

* a :class:`~curvlab.linalg.Kron` block (KFAC, TKFAC, FOOF) under a factored rule (``"pi"``,
  ``"factored"``, ``"trace"``): the damped factor inverses (A + λ_A I)⁻¹ and (G + λ_G I)⁻¹, so a solve is
  two small GEMMs, (G + λ_G I)⁻¹ X (A + λ_A I)⁻¹ on the folded gradient X = [∇W ∇b] (the factored
  damping's eigenvalues are products (λ^A_j + λ_A)(λ^G_i + λ_G), so this is the eigenbasis solve);
* any other Kronecker block (exact damping; EKFAC's S*): the eigenbasis Q_A, Q_G and the reciprocal
  damped eigenvalues, Q_G((Q_Gᵀ X Q_A) / d)Q_Aᵀ;
* any other block (the exact block of ``unsupported="exact"``): its own solve, as the matrix's.

The gradient is checked for finiteness once per step (by the optimizer), not per block.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from curvlab.linalg import CurvatureMatrix
from curvlab.linalg.block import BlockDiagonal
from curvlab.linalg.kron import EigenKron, Kron, factor_damping
from curvlab.linalg.layout import KronLayout

__all__ = ["DampedInverse"]

#: a block's solve on its own (P_b,) slice of the gradient, written into the output slice
Apply = Callable[[Tensor, Tensor], None]


def _folded(layout: KronLayout, v: Tensor) -> Tensor:
    """Return the p×q folded matrix [W b] of a flat parameter-order vector."""
    p, q = layout.rows, layout.cols
    if not layout.bias:
        return v.view(p, q)
    w = layout.weight_size
    return torch.cat([v[:w].view(p, q - 1), v[w:, None]], dim=1)


def _write(layout: KronLayout, Y: Tensor, out: Tensor) -> None:
    """Write the folded p×q matrix Y into ``out`` in parameter order."""
    p, q = layout.rows, layout.cols
    if not layout.bias:
        out.view(p, q).copy_(Y)
        return
    w = layout.weight_size
    out[:w].view(p, q - 1).copy_(Y[:, :-1])
    out[w:].copy_(Y[:, -1])


def _kron_apply(block: Kron, damping: float, mode: str) -> Apply:
    (eA, QA), (eG, QG) = block.factor_eigh()
    dA, dG = factor_damping(mode, damping, eA, eG)
    A_inv = (QA / (eA + dA)) @ QA.T
    G_inv = (QG / (eG + dG)) @ QG.T
    layout = block.layout

    def apply(v: Tensor, out: Tensor) -> None:
        _write(layout, G_inv @ _folded(layout, v) @ A_inv, out)

    return apply


def _eigen_apply(block: EigenKron, damping: float, mode: str) -> Apply:
    inv = block.inverse(damping, mode)  # EigenKron(Q_A, Q_G, 1/d): the checked, cached denominators
    QA, QG, r, layout = inv.Q_A, inv.Q_G, inv.S, block.layout

    def apply(v: Tensor, out: Tensor) -> None:
        _write(layout, QG @ ((QG.T @ _folded(layout, v) @ QA) * r) @ QA.T, out)

    return apply


def _block_applies(C: CurvatureMatrix, damping: float, mode: str, start: int = 0) -> list[tuple[slice, Apply]]:
    """One (slice, apply) per Kronecker or exact block of C, nested block-diagonals flattened."""
    if isinstance(C, BlockDiagonal):
        mode = C.resolve_mode(mode)
        out = []
        for b, s in zip(C.blocks, C.block_slices):
            out += _block_applies(b, damping, mode, start + s.start)
        return out
    where = slice(start, start + C.size)
    if mode not in C.modes:  # an exact block under a factored rule: exact damping (BlockDiagonal's rule)
        mode = "exact"
    if isinstance(C, Kron) and mode != "exact":
        return [(where, _kron_apply(C, damping, mode))]
    if isinstance(C, Kron | EigenKron):
        return [(where, _eigen_apply(C.eigen() if isinstance(C, Kron) else C, damping, mode))]

    def solve(v: Tensor, out: Tensor) -> None:
        out.copy_(C.solve(v, damping, mode))

    return [(where, solve)]


class DampedInverse:
    """g ↦ −(C + λ)⁻¹ g under a damping rule, for one matrix C and damping λ (see the module docstring).

    Build it after a checked ``C.direction(g, damping, mode)`` has succeeded on the same matrix, damping
    and mode (the solves here do not repeat the singularity check); ``matches`` says whether it is
    still the one to use.
    """

    def __init__(self, C: CurvatureMatrix, damping: float, mode: str) -> None:
        self.matrix, self.damping, self.mode = C, damping, mode
        self._applies = _block_applies(C, damping, mode)

    def matches(self, C: CurvatureMatrix, damping: float, mode: str) -> bool:
        """Return whether this inverse is the one for ``C`` (the same object), ``damping`` and ``mode``."""
        return C is self.matrix and damping == self.damping and mode == self.mode

    def direction(self, g: Tensor) -> Tensor:
        """Return −(C + λ)⁻¹ g: each block's prepared solve on its slice of ``g``, then the sign flipped."""
        out = torch.empty_like(g)
        for where, apply in self._applies:
            apply(g[where], out[where])
        return out.neg_()
