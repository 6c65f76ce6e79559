"""Comparators of the Kronecker factors themselves: how much of each factor its damping swamps.

:func:`factor_fraction_below` reports, per layer, the share of each factor's eigenvalues that its own
damping share (λ_A, λ_G) dominates — the quantity that decides whether damping swamps a factor, and
with it whether KFAC behaves like FOOF (Benzing 2022, arXiv 2201.12250). The Kronecker identities of
the matrix comparators (inner products, top eigenpairs) are methods of
:class:`curvlab.linalg.Kron` and :class:`curvlab.linalg.EigenKron`.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor

from curvlab.linalg import BlockDiagonal, CurvatureMatrix
from curvlab.linalg.kron import EigenKron, Kron, factor_damping

__all__ = ["factor_fraction_below", "kron_leaves"]


def kron_leaves(C: CurvatureMatrix, prefix: str = "") -> Iterator[tuple[str, CurvatureMatrix]]:
    """(block name, leaf) for every leaf of a (nested) block-diagonal matrix."""
    if isinstance(C, BlockDiagonal):
        for name, b in zip(C.block_names, C.blocks):
            yield from kron_leaves(b, f"{prefix}.{name}" if prefix else name)
    else:
        yield prefix or "all", C


def _factor_eigenvalues(C: CurvatureMatrix) -> tuple[Tensor, Tensor] | None:
    if isinstance(C, Kron):
        (eA, _), (eG, _) = C.factor_eigh()
        return eA, eG
    if isinstance(C, EigenKron):
        return C.factor_eigenvalues
    return None


def factor_fraction_below(C: CurvatureMatrix, damping: float, mode: str = "pi") -> dict[str, tuple[float, float]]:
    """Per Kronecker leaf: (share of eig(A) below λ_A, share of eig(G) below λ_G).

    (λ_A, λ_G) is the factor damping of ``mode`` (``"pi"``: λ_A = π√λ, λ_G = √λ/π; ``"factored"``:
    √λ each; ``"trace"``: the trace-normalised split; see :func:`curvlab.linalg.kron.factor_damping`).
    Leaves without Kronecker factors are left out; top-level block names are used, nested leaves
    are named ``block.leaf``.
    """
    if not isinstance(C, CurvatureMatrix):
        raise TypeError(f"C must be a curvlab CurvatureMatrix; got {type(C).__name__}")
    out: dict[str, tuple[float, float]] = {}
    for name, leaf in kron_leaves(C):
        fe = _factor_eigenvalues(leaf)
        if fe is None:
            continue
        eA, eG = fe
        lam_A, lam_G = factor_damping(mode, damping, eA, eG)
        out[name] = (float((eA < lam_A).double().mean()), float((eG < lam_G).double().mean()))
    return out
