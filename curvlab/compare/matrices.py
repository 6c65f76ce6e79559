"""Matrix agreement: Frobenius cosine, relative error, trace ratio and logdet difference.

For two symmetric P×P matrices A and B (any two CurvatureMatrix objects over the same flat
parameter vector):

    inner(A, B)              = ⟨A, B⟩_F = Σ_ij A_ij B_ij = tr(A B)
    cosine(A, B)             = ⟨A, B⟩_F / (‖A‖_F ‖B‖_F)               (1 for A = cB, c > 0)
    relative_error(A, B)     = ‖A − B‖_F / ‖B‖_F                      (B is the reference)
    trace_ratio(A, B, λ)     = tr(A + λI) / tr(B + λI)
    logdet_difference(A,B,λ) = log det(A + λI) − log det(B + λI)

Each returns a :class:`Blockwise`: the value for the whole matrix and, for every block of a
partition, the same quantity on the diagonal blocks A_bb and B_bb (principal submatrices). The
partition is the block structure of A (or of B when A has a single block) unless one is given.

Everything is computed by the CurvatureMatrix protocol (``A.inner(B)``, ``A.difference_norm(B)``,
``A.restrict(s)``), from the structures where an identity exists, so nothing is densified beyond
what one of the two operands already stores:

- diagonal vs anything: ⟨diag(d), B⟩ = Σ_i d_i B_ii (only B's diagonal);
- block-diagonal vs anything: ⟨blockdiag(A_b), B⟩ = Σ_b ⟨A_b, B_bb⟩ (only B's diagonal blocks);
  ‖A − B‖² = Σ_b ‖A_b − B_bb‖² + ‖offdiag(B)‖²;
- Kronecker blocks (``curvlab.linalg.kron``): ⟨A⊗G, A'⊗G'⟩ = ⟨A,A'⟩⟨G,G'⟩, the Van Loan
  rearrangement against a dense block, the eigenbasis for EigenKron;
- dense vs dense: elementwise;
- anything else (matrix-free operators, mixed structures without an identity): P products with
  each matrix, in chunks of columns, ⟨A, B⟩ = Σ_J ⟨A E_J, B E_J⟩ (never more than P × chunk extra).

When no identity gives ‖A − B‖ directly, it is ‖A‖² + ‖B‖² − 2⟨A, B⟩ (clamped at 0). That loses
digits when A ≈ B (relative error below ~1e-4), so then, if one operand is dense, the other is
densified (it is no larger than the dense one) and ‖A − B‖ is computed directly; between two
structured matrices the expansion stands (relative errors below ~1e-7 are then at the level of
float64 cancellation).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import Tensor

from curvlab.linalg import CurvatureMatrix

__all__ = ["Blockwise", "inner", "frobenius", "difference_norm", "cosine", "relative_error", "trace_ratio",
           "logdet_difference", "restrict", "partition_of"]

BlockSpec = Sequence[tuple[str, slice]]


@dataclass(frozen=True)
class Blockwise:
    """A comparison value for the whole matrix (``total``) and per block (``blocks``: name → value).

    ``float(x)`` is ``x.total``.
    """

    total: float
    blocks: dict[str, float] = field(default_factory=dict)

    def __float__(self) -> float:
        return self.total

    def __getitem__(self, name: str) -> float:
        return self.total if name == "all" else self.blocks[name]


# ---------------------------------------------------------------------------------------- helpers
def _check_pair(A: CurvatureMatrix, B: CurvatureMatrix) -> None:
    for name, M in (("A", A), ("B", B)):
        if not isinstance(M, CurvatureMatrix):
            raise TypeError(f"{name} must be a curvlab CurvatureMatrix; got {type(M).__name__}")
    if A.size != B.size:
        raise ValueError(f"cannot compare matrices of sizes {A.size} and {B.size}")


def restrict(C: CurvatureMatrix, s: slice) -> CurvatureMatrix:
    """Return the principal submatrix C[s, s] (``C.restrict(s)``: in C's structure, cached on C)."""
    if not isinstance(C, CurvatureMatrix):
        raise TypeError(f"C must be a curvlab CurvatureMatrix; got {type(C).__name__}")
    return C.restrict(s)


def partition_of(A: CurvatureMatrix, B: CurvatureMatrix | None = None,
                 blocks: BlockSpec | None = None) -> list[tuple[str, slice]]:
    """Return the blocks a comparison reports: ``blocks`` if given, else A's, else B's (one block "all")."""
    if blocks is not None:
        out = [(str(n), s) for n, s in blocks]
    elif len(A.blocks) > 1 or B is None:
        out = list(zip(A.block_names, A.block_slices))
    else:
        out = list(zip(B.block_names, B.block_slices))
    for name, s in out:
        if not isinstance(s, slice) or s.stop > A.size or s.start < 0:
            raise ValueError(f"block {name!r}: {s} is not a slice inside [0, {A.size})")
    return out


# ---------------------------------------------------------------------------------------- primitives
_INNER: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def inner(A: CurvatureMatrix, B: CurvatureMatrix) -> Tensor:
    """Return ⟨A, B⟩_F = Σ_ij A_ij B_ij (``A.inner(B)``: from the structures, see the module docstring).

    Matrices are immutable, so the value is memoised per pair (a cosine and a relative error of the
    same pair share it).
    """
    _check_pair(A, B)
    memo = _INNER.setdefault(A, {})
    key = weakref.ref(B)
    if key not in memo:
        memo[key] = A.inner(B)
    return memo[key]


def frobenius(C: CurvatureMatrix) -> Tensor:
    """‖C‖_F from C's structure."""
    return C.frobenius_norm()


def difference_norm(A: CurvatureMatrix, B: CurvatureMatrix) -> Tensor:
    """Return ‖A − B‖_F without forming A − B densely when a structure allows it (``A.difference_norm(B)``)."""
    _check_pair(A, B)
    return A.difference_norm(B)


# ---------------------------------------------------------------------------------------- comparisons
def _blockwise(A: CurvatureMatrix, B: CurvatureMatrix, blocks: BlockSpec | None,
               fn: Callable[[CurvatureMatrix, CurvatureMatrix], float]) -> Blockwise:
    _check_pair(A, B)
    parts = partition_of(A, B, blocks)
    total = fn(A, B)
    per = {}
    if not (len(parts) == 1 and parts[0][1].start == 0 and parts[0][1].stop == A.size):
        per = {name: fn(restrict(A, s), restrict(B, s)) for name, s in parts}
    return Blockwise(total, per)


def _safe_div(a: Tensor | float, b: Tensor | float) -> float:
    a, b = float(a), float(b)
    return a / b if b != 0 else math.nan


def cosine(A: CurvatureMatrix, B: CurvatureMatrix, blocks: BlockSpec | None = None) -> Blockwise:
    """Frobenius cosine ⟨A, B⟩_F / (‖A‖_F ‖B‖_F), whole and per block (NaN if either norm is 0).

    Symmetric in A and B, 1 for A = cB with c > 0, invariant to positive scaling of either.
    """
    return _blockwise(A, B, blocks, lambda a, b: _safe_div(inner(a, b), a.frobenius_norm() * b.frobenius_norm()))


def relative_error(A: CurvatureMatrix, B: CurvatureMatrix, blocks: BlockSpec | None = None) -> Blockwise:
    """Return ‖A − B‖_F / ‖B‖_F with B the reference, whole and per block (NaN if ‖B‖_F = 0).

    The whole-matrix value counts everything A misses, e.g. for a block-diagonal A the cross-block
    mass of B; a per-block value compares only the diagonal blocks A_bb and B_bb.
    """
    return _blockwise(A, B, blocks, lambda a, b: _safe_div(difference_norm(a, b), b.frobenius_norm()))


def trace_ratio(A: CurvatureMatrix, B: CurvatureMatrix, damping: float = 0.0,
                blocks: BlockSpec | None = None) -> Blockwise:
    """tr(A + λI) / tr(B + λI) = (tr A + λn) / (tr B + λn), n the (block) dimension."""
    return _blockwise(A, B, blocks, lambda a, b: _safe_div(a.trace() + damping * a.size, b.trace() + damping * b.size))


def logdet_difference(A: CurvatureMatrix, B: CurvatureMatrix, damping: float = 0.0,
                      blocks: BlockSpec | None = None) -> Blockwise:
    """Return log det(A + λI) − log det(B + λI), whole and per block.

    Uses each matrix's own logdet (cached eigenvalues, a Cholesky factor, or per-block / per-factor
    structure). Raises ValueError when A + λI or B + λI is not positive definite (e.g. an
    indefinite Hessian with too little damping).
    """
    return _blockwise(A, B, blocks, lambda a, b: float(a.logdet(damping)) - float(b.logdet(damping)))
