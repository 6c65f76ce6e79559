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

Everything is computed from the structure where an identity exists, and nothing is densified
beyond what one of the two operands already stores:

- diagonal vs anything: ⟨diag(d), B⟩ = Σ_i d_i B_ii (only B's diagonal);
- block-diagonal vs anything: ⟨blockdiag(A_b), B⟩ = Σ_b ⟨A_b, B_bb⟩ (only B's diagonal blocks);
  ‖A − B‖² = Σ_b ‖A_b − B_bb‖² + ‖offdiag(B)‖²;
- Kronecker blocks: see :mod:`curvlab.compare.kron` (⟨A⊗G, A'⊗G'⟩ = ⟨A,A'⟩⟨G,G'⟩, and the Van
  Loan rearrangement for a Kronecker block against a dense block);
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

import torch
from torch import Tensor

from curvlab.linalg import BlockDiagonal, CurvatureMatrix, Dense, Diagonal

__all__ = ["Blockwise", "inner", "frobenius", "difference_norm", "cosine", "relative_error", "trace_ratio",
           "logdet_difference", "restrict", "partition_of", "register_inner", "register_restrict"]

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
_InnerRule = Callable[[CurvatureMatrix, CurvatureMatrix], "Tensor | None"]
_RestrictRule = Callable[[CurvatureMatrix, slice], "CurvatureMatrix | None"]
_INNER_RULES: list[_InnerRule] = []
_RESTRICT_RULES: list[_RestrictRule] = []


def register_inner(rule: _InnerRule) -> _InnerRule:
    """Add a structural rule ``rule(A, B) -> ⟨A, B⟩_F or None`` (None: the rule does not apply).

    Rules are tried (for (A, B) and then (B, A)) before the generic dense and column fallbacks.
    """
    _INNER_RULES.append(rule)
    return rule


def register_restrict(rule: _RestrictRule) -> _RestrictRule:
    """Add a rule ``rule(C, s) -> C[s, s] or None`` for a structure with a cheaper restriction."""
    _RESTRICT_RULES.append(rule)
    return rule


def _check_pair(A: CurvatureMatrix, B: CurvatureMatrix) -> None:
    for name, M in (("A", A), ("B", B)):
        if not isinstance(M, CurvatureMatrix):
            raise TypeError(f"{name} must be a curvlab CurvatureMatrix; got {type(M).__name__}")
    if A.size != B.size:
        raise ValueError(f"cannot compare matrices of sizes {A.size} and {B.size}")


def _dtype(A: CurvatureMatrix, B: CurvatureMatrix) -> torch.dtype:
    return torch.promote_types(A.dtype, B.dtype)


#: below this ‖A − B‖² / (‖A‖² + ‖B‖²) the expansion ‖A‖² + ‖B‖² − 2⟨A, B⟩ is recomputed densely
_CANCEL = 1e-8

_RESTRICTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def restrict(C: CurvatureMatrix, s: slice) -> CurvatureMatrix:
    """The principal submatrix C[s, s] as a CurvatureMatrix, in C's structure where it has one.

    Dense → Dense(M[s, s]); Diagonal → Diagonal(d[s]); BlockDiagonal → its blocks (restricted
    where s cuts through one); a slice covering all of C → C itself. Other structures use a
    registered rule or else the columns C E_s (|s| products). Results are memoised per matrix, so
    repeated calls return the same object (and reuse its cached eigendecompositions).
    """
    start, stop, step = s.indices(C.size)
    if step != 1 or start >= stop:
        raise ValueError(f"restrict needs a non-empty contiguous slice; got {s}")
    if start == 0 and stop == C.size:
        return C
    memo = _RESTRICTED.setdefault(C, {})
    key = (start, stop)
    if key not in memo:
        memo[key] = _restrict(C, slice(start, stop))
    return memo[key]


def _restrict(C: CurvatureMatrix, s: slice) -> CurvatureMatrix:
    if isinstance(C, Dense):
        return Dense(C.matrix[s, s])
    if isinstance(C, Diagonal):
        return Diagonal(C.diag[s])
    if isinstance(C, BlockDiagonal):
        pieces, names = [], []
        for b, bs, name in zip(C.blocks, C.block_slices, C.block_names):
            lo, hi = max(s.start, bs.start), min(s.stop, bs.stop)
            if lo < hi:
                pieces.append(restrict(b, slice(lo - bs.start, hi - bs.start)))
                names.append(name)
        return pieces[0] if len(pieces) == 1 else BlockDiagonal(pieces, names)
    for rule in _RESTRICT_RULES:
        out = rule(C, s)
        if out is not None:
            return out
    E = torch.zeros(C.size, s.stop - s.start, dtype=C.dtype, device=C.device)
    E[s] = torch.eye(s.stop - s.start, dtype=C.dtype, device=C.device)
    return Dense((C @ E)[s], symmetrize=True)


def partition_of(A: CurvatureMatrix, B: CurvatureMatrix | None = None,
                 blocks: BlockSpec | None = None) -> list[tuple[str, slice]]:
    """The blocks a comparison reports: ``blocks`` if given, else A's, else B's (one block "all")."""
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


def _columns_inner(A: CurvatureMatrix, B: CurvatureMatrix, chunk: int = 256) -> Tensor:
    dtype = _dtype(A, B)
    total = torch.zeros((), dtype=dtype, device=A.device)
    for j in range(0, A.size, chunk):
        k = min(A.size, j + chunk)
        E = torch.zeros(A.size, k - j, dtype=dtype, device=A.device)
        E[j:k] = torch.eye(k - j, dtype=dtype, device=A.device)
        ca = A.to_dense()[:, j:k] if isinstance(A, Dense) else A @ E.to(A.dtype)
        cb = B.to_dense()[:, j:k] if isinstance(B, Dense) else B @ E.to(B.dtype)
        total = total + (ca.to(dtype) * cb.to(dtype)).sum()
    return total


# ---------------------------------------------------------------------------------------- primitives
_INNER: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def inner(A: CurvatureMatrix, B: CurvatureMatrix) -> Tensor:
    """⟨A, B⟩_F = Σ_ij A_ij B_ij, from the structures (see the module docstring for the rules).

    Matrices are immutable, so the value is memoised per pair (a cosine and a relative error of the
    same pair share it).
    """
    _check_pair(A, B)
    if A is B:
        return A.frobenius_norm() ** 2
    memo = _INNER.setdefault(A, {})
    key = weakref.ref(B)
    if key not in memo:
        memo[key] = _inner(A, B)
    return memo[key]


def _inner(A: CurvatureMatrix, B: CurvatureMatrix) -> Tensor:
    dtype = _dtype(A, B)
    if isinstance(B, Diagonal) and not isinstance(A, Diagonal):
        A, B = B, A
    if isinstance(A, Diagonal):
        return (A.diag.to(dtype) * B.diagonal().to(dtype)).sum()
    if isinstance(B, BlockDiagonal) and not isinstance(A, BlockDiagonal):
        A, B = B, A
    if isinstance(A, BlockDiagonal) and len(A.blocks) > 1:
        return sum(inner(a, restrict(B, s)).to(dtype) for a, s in zip(A.blocks, A.block_slices))
    if isinstance(A, BlockDiagonal):
        return inner(A.blocks[0], B)
    for rule in _INNER_RULES:
        for x, y in ((A, B), (B, A)):
            out = rule(x, y)
            if out is not None:
                return out.to(dtype)
    if isinstance(A, Dense) and isinstance(B, Dense):
        return (A.matrix.to(dtype) * B.matrix.to(dtype)).sum()
    return _columns_inner(A, B)


def frobenius(C: CurvatureMatrix) -> Tensor:
    """‖C‖_F from C's structure."""
    return C.frobenius_norm()


def _offdiag_sq(B: CurvatureMatrix, slices: Sequence[slice]) -> Tensor:
    """‖B − blockdiag(B_bb)‖²_F: the mass of B outside the given diagonal blocks."""
    if isinstance(B, Dense):
        M = B.matrix
        total = torch.zeros((), dtype=M.dtype, device=M.device)
        for s in slices:
            total = total + (M[s, :s.start] ** 2).sum() + (M[s, s.stop:] ** 2).sum()
        return total
    if isinstance(B, Diagonal):
        return torch.zeros((), dtype=B.dtype, device=B.device)
    if isinstance(B, BlockDiagonal) and list(B.block_slices) == list(slices):
        return torch.zeros((), dtype=B.dtype, device=B.device)
    on = sum(restrict(B, s).frobenius_norm() ** 2 for s in slices)
    return torch.clamp(B.frobenius_norm() ** 2 - on, min=0.0)


def difference_norm(A: CurvatureMatrix, B: CurvatureMatrix) -> Tensor:
    """‖A − B‖_F without forming A − B densely when a structure allows it."""
    _check_pair(A, B)
    if A is B:
        return torch.zeros((), dtype=A.dtype, device=A.device)
    dtype = _dtype(A, B)
    if isinstance(A, Dense) and isinstance(B, Dense):
        return torch.linalg.matrix_norm(A.matrix.to(dtype) - B.matrix.to(dtype))
    if isinstance(A, Diagonal) and isinstance(B, Diagonal):
        return torch.linalg.vector_norm(A.diag.to(dtype) - B.diag.to(dtype))
    for X, Y in ((A, B), (B, A)):
        if isinstance(X, BlockDiagonal) and len(X.blocks) > 1:
            sq = sum(difference_norm(x, restrict(Y, s)).to(dtype) ** 2 for x, s in zip(X.blocks, X.block_slices))
            return torch.sqrt(sq + _offdiag_sq(Y, X.block_slices).to(dtype))
        if isinstance(X, BlockDiagonal):
            return difference_norm(X.blocks[0], Y) if X is A else difference_norm(Y, X.blocks[0])
    for X, Y in ((A, B), (B, A)):
        if isinstance(X, Diagonal):  # ‖d − diag(Y)‖² + off-diagonal mass of Y
            dY = Y.diagonal().to(dtype)
            off = torch.clamp(Y.frobenius_norm().to(dtype) ** 2 - (dY**2).sum(), min=0.0)
            return torch.sqrt(((X.diag.to(dtype) - dY) ** 2).sum() + off)
    scale = A.frobenius_norm().to(dtype) ** 2 + B.frobenius_norm().to(dtype) ** 2
    sq = scale - 2 * inner(A, B)
    if float(sq) <= _CANCEL * float(scale) and (isinstance(A, Dense) or isinstance(B, Dense)):
        # A ≈ B: the expansion has lost its digits; densify the other operand (the size of the dense one)
        return torch.linalg.matrix_norm(A.to_dense().to(dtype) - B.to_dense().to(dtype))
    return torch.sqrt(torch.clamp(sq, min=0.0))


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
    """‖A − B‖_F / ‖B‖_F with B the reference, whole and per block (NaN if ‖B‖_F = 0).

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
    """log det(A + λI) − log det(B + λI), whole and per block.

    Uses each matrix's own logdet (cached eigenvalues, a Cholesky factor, or per-block / per-factor
    structure). Raises ValueError when A + λI or B + λI is not positive definite (e.g. an
    indefinite Hessian with too little damping).
    """
    return _blockwise(A, B, blocks, lambda a, b: float(a.logdet(damping)) - float(b.logdet(damping)))
