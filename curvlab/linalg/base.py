"""The CurvatureMatrix protocol: one algebra for every representation of a curvature matrix.

A CurvatureMatrix C is a symmetric P×P matrix over the flat parameter vector of a Problem
(``named_parameters()`` order, row-major). A structure is one subclass in ``curvlab.linalg``; it
implements a handful of primitives from its representation and may override structural hooks
where it can do better than the generic fallback. This base class turns them into the protocol:

    C.to_dense()  C @ v  C.solve(v, λ, mode)  C.direction(g, λ, mode)  C.inverse(λ, mode)
    C.logdet(λ, mode)  C.eigh()  C.eigvalsh()  C.top_eigen(k)  C.trace()  C.diagonal()
    C.frobenius_norm()  C.inner(D)  C.difference_norm(D)  C.restrict(s)  C.blocks
    C.as_linear_operator()  C + D  C - D  a * C  -C  C / a

Primitives (every structure): ``to_dense``, ``_matmat``, ``_solve`` (exact damping), ``_inverse``,
``_eigh``, ``diagonal``, ``frobenius_norm``, ``_scaled``. Optional hooks, each returning ``None``
when the structure has no shortcut for that operand: ``_add`` (a sum in a shared structure),
``_inner`` (⟨C, D⟩_F), ``_difference_norm`` (‖C − D‖_F), ``_restrict`` (a principal submatrix),
``_top_eigen`` (the k largest eigenpairs), ``_offblock_sq`` (mass outside given diagonal blocks),
and for damping modes other than ``"exact"``: ``_solve_mode``, ``_inverse_mode``, ``_logdet_mode``.

**Damping.** ``solve(v, λ)`` is always the exact (C + λI)⁻¹v. A structure with damping rules of
its own (KFAC's factored and π-damping …) lists them in :attr:`modes` (``"exact"`` first) and takes
``mode=`` in ``solve``, ``direction``, ``inverse`` and ``logdet``. Every mode takes a scalar λ ≥ 0;
the modes in :attr:`pair_modes` also take a pair (λ_A, λ_G). Anything else raises a ``ValueError``
naming the value: a negative or non-finite λ, a pair where a scalar is needed, an unknown mode
(the message lists the supported ones), and a damped system that is singular or numerically
singular against the matrix's own scale (with the suggestion to increase the damping).

**Generic fallbacks** (when no hook applies) and what they cost: ``inner`` and ``restrict`` take
products of C with chunks of unit vectors (P products, never more than P × 256 extra entries);
``difference_norm`` expands ‖C‖² + ‖D‖² − 2⟨C, D⟩ and densifies the structured operand only when
one operand is dense and the expansion has lost its digits; ``top_eigen`` runs a full ``eigh`` up to
:data:`DENSE_EIGH_LIMIT` (or when k ≥ P/3) and Lanczos (ARPACK) on ``as_linear_operator()`` beyond.
Decompositions and restrictions are computed once and cached on the matrix (matrices are immutable).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from curvlab import memory

__all__ = ["CurvatureMatrix", "Eigh", "as_vectors", "check_damping", "singular_tolerance", "DENSE_EIGH_LIMIT",
           "Damping"]

#: up to this size (or for k ≥ P/3) the top-k eigenpairs come from a full (cached) ``eigh``; above, Lanczos
DENSE_EIGH_LIMIT = 2000

#: a damping: a scalar λ, or for the modes that take one, a pair (λ_A, λ_G)
Damping = float | Sequence[float]


class Eigh(NamedTuple):
    """Eigenvalues and the matching orthonormal eigenvectors as columns.

    ``eigh()`` returns them in ascending order; ``top_eigen(k)`` the k largest, descending.
    """

    values: Tensor
    vectors: Tensor


def all_finite(t: Tensor) -> bool:
    """Whether every entry of the floating-point tensor ``t`` is finite.

    A finite sum implies finite entries (a NaN or ±inf entry makes the sum NaN or ±inf), so the
    elementwise test runs only when the sum is not finite (a bad entry, or a sum that overflows).
    """
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def as_vectors(v: Tensor, size: int, dtype: torch.dtype, device: torch.device, what: str = "v") -> tuple[Tensor, bool]:
    """Check a vector (P,) or a matrix of columns (P, m); return it as (P, m) and whether it was 1-D."""
    if not isinstance(v, Tensor):
        v = torch.as_tensor(v)
    if v.ndim not in (1, 2) or v.shape[0] != size:
        raise ValueError(f"{what} must have shape ({size},) or ({size}, m); got {tuple(v.shape)}")
    if not torch.is_floating_point(v):
        v = v.to(dtype)
    if not all_finite(v):
        raise ValueError(f"{what} contains NaN or inf")
    v = v.to(dtype=dtype, device=device)
    return (v[:, None], True) if v.ndim == 1 else (v, False)


def _scalar_damping(value: Any, mode: str) -> float:
    try:
        lam = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"damping must be a number; got {type(value).__name__} {value!r}") from None
    if not math.isfinite(lam):
        raise ValueError(f"damping must be finite; got {lam}")
    if lam < 0:
        raise ValueError(f"damping must be ≥ 0 (mode {mode!r}); got {lam}")
    return lam


def check_damping(damping: Any, mode: str = "exact", pair: bool = False) -> float | tuple[float, float]:
    """Return a damping checked for ``mode``: a finite scalar λ ≥ 0, or, where ``pair`` is allowed, (λ_A, λ_G).

    Raises ``ValueError``/``TypeError`` naming the value otherwise (never turns a pair into a scalar).
    """
    if isinstance(damping, (tuple, list)):
        if not pair:
            raise ValueError(f"mode {mode!r} takes a scalar damping λ; got the pair {tuple(damping)!r} (a pair "
                             "(λ_A, λ_G) is for mode='factored' of Kronecker-factored matrices)")
        if len(damping) != 2:
            raise ValueError(f"a factored damping is a scalar λ or a pair (λ_A, λ_G); got {damping!r}")
        return _scalar_damping(damping[0], mode), _scalar_damping(damping[1], mode)
    if isinstance(damping, Tensor) and damping.numel() != 1:
        raise ValueError(f"damping must be a scalar; got a tensor of shape {tuple(damping.shape)}")
    return _scalar_damping(damping, mode)


def singular_tolerance(scale: float, size: int, dtype: torch.dtype) -> float:
    """Below this magnitude a damped eigenvalue or pivot counts as zero: √size · ε · scale.

    Eigenvalues and pivots of a size-n system are known to about √n·ε relative to its scale (rounding
    errors of n terms add up like a random walk); n·ε, the worst case, refuses usable float32 systems
    (a KFAC block of 2,000 entries with condition number 10⁴).
    """
    return float(scale) * math.sqrt(max(1, size)) * torch.finfo(dtype).eps


class CurvatureMatrix:
    """Abstract symmetric P×P curvature matrix. See the module docstring for the protocol."""

    #: the damping modes this structure supports ("exact" first)
    modes: tuple[str, ...] = ("exact",)
    #: the modes that also take a damping pair (λ_A, λ_G)
    pair_modes: tuple[str, ...] = ()

    #: dimension P
    size: int
    dtype: torch.dtype
    device: torch.device

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        self.size = int(size)
        self.dtype = dtype
        self.device = torch.device(device)
        self._cache: dict[Any, Any] = {}

    # ------------------------------------------------------------------ primitives to implement
    def to_dense(self) -> Tensor:
        """Return the dense P×P matrix (in parameter order)."""
        raise NotImplementedError

    def _matmat(self, V: Tensor) -> Tensor:
        """C @ V for V of shape (P, m)."""
        raise NotImplementedError

    def _solve(self, V: Tensor, damping: float) -> Tensor:
        """(C + λI)⁻¹ V for V of shape (P, m), λ ≥ 0 checked."""
        raise NotImplementedError

    def _inverse(self, damping: float) -> CurvatureMatrix:
        raise NotImplementedError

    def _eigh(self) -> Eigh:
        raise NotImplementedError

    def _eigvalsh(self) -> Tensor:
        return self.eigh().values

    def diagonal(self) -> Tensor:
        """Return the diagonal (P,)."""
        raise NotImplementedError

    def frobenius_norm(self) -> Tensor:
        """Return the Frobenius norm ‖C‖_F."""
        raise NotImplementedError

    def _scaled(self, alpha: float) -> CurvatureMatrix:
        """α C in the same structure."""
        raise NotImplementedError

    # ------------------------------------------------------------------ optional hooks (None: no shortcut)
    def _add(self, other: CurvatureMatrix, sign: float) -> CurvatureMatrix | None:
        """C + sign·other in a shared structure."""
        return None

    def _inner(self, other: CurvatureMatrix) -> Tensor | None:
        """⟨C, other⟩_F from the structures."""
        return None

    def _difference_norm(self, other: CurvatureMatrix) -> Tensor | None:
        """‖C − other‖_F from the structures."""
        return None

    def _restrict(self, s: slice) -> CurvatureMatrix | None:
        """Return the principal submatrix C[s, s] in a structure of its own."""
        return None

    def _top_eigen(self, k: int) -> Eigh | None:
        """Return the k largest eigenpairs, descending."""
        return None

    def _offblock_sq(self, slices: Sequence[slice]) -> Tensor | None:
        """‖C − blockdiag(C_bb)‖²_F for the diagonal blocks ``slices``."""
        return None

    def _solve_mode(self, V: Tensor, damping: Damping, mode: str) -> Tensor:
        raise NotImplementedError

    def _inverse_mode(self, damping: Damping, mode: str) -> CurvatureMatrix:
        raise NotImplementedError

    def _logdet_mode(self, damping: Damping, mode: str) -> Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ structure
    @property
    def shape(self) -> tuple[int, int]:
        """(P, P)."""
        return (self.size, self.size)

    @property
    def blocks(self) -> tuple[CurvatureMatrix, ...]:
        """The diagonal blocks (one block: the matrix itself, unless block-structured)."""
        return (self,)

    @property
    def block_slices(self) -> tuple[slice, ...]:
        """Where each of :attr:`blocks` sits in the flat parameter vector."""
        return (slice(0, self.size),)

    @property
    def block_names(self) -> tuple[str, ...]:
        """The name of each of :attr:`blocks` (``("all",)`` for one block)."""
        return ("all",)

    @property
    def structure(self) -> str:
        """A short name of the representation (``dense``, ``block``, ``diag``, ``kron`` …)."""
        return type(self).__name__.lower()

    @property
    def has_eigh(self) -> bool:
        """Whether the full eigendecomposition is already computed (so spectra cost nothing more)."""
        return "eigh" in self._cache

    # ------------------------------------------------------------------ damping
    def resolve_mode(self, mode: str) -> str:
        """Return the damping mode this matrix applies for ``mode``; raises for an unsupported one."""
        if not isinstance(mode, str) or mode not in self.modes:
            raise ValueError(f"unknown damping mode {mode!r} for {type(self).__name__}: it supports "
                             f"{list(self.modes)}")
        return mode

    def check_damping(self, damping: Any, mode: str) -> Damping:
        """``damping`` checked for ``mode`` (see :func:`check_damping`)."""
        return check_damping(damping, mode, pair=mode in self.pair_modes)

    def _damped(self, damping: Any, mode: str) -> tuple[Damping, str]:
        mode = self.resolve_mode(mode)
        return self.check_damping(damping, mode), mode

    def singular_error(self, damping: Damping, smallest: float, mode: str = "exact",
                       tolerance: float | None = None, rule: str = "√n·ε·scale") -> ValueError:
        """Return the error for a (numerically) singular damped system.

        ``smallest`` is the smallest |damped eigenvalue| or pivot, ``tolerance`` the threshold it fell
        below (both absolute), ``rule`` how that threshold is formed (:func:`singular_tolerance`).
        """
        below = "" if tolerance is None else f" ≤ {tolerance:.3e} = {rule}, the numerical-zero threshold"
        return ValueError(f"{type(self).__name__} + damping is singular or numerically singular (damping "
                          f"{damping!r}, mode {mode!r}; smallest damped eigenvalue or pivot {smallest:.3e}"
                          f"{below}): increase the damping")

    # ------------------------------------------------------------------ public protocol
    def __matmul__(self, v: Tensor) -> Tensor:
        V, one = as_vectors(v, self.size, self.dtype, self.device)
        out = self._matmat(V)
        return out[:, 0] if one else out

    def matvec(self, v: Tensor) -> Tensor:
        """Return C v (the same as ``C @ v``)."""
        return self @ v

    def solve(self, v: Tensor, damping: Damping = 0.0, mode: str = "exact") -> Tensor:
        """Return the damped solve for v of shape (P,) or (P, m): (C + λI)⁻¹v for ``mode="exact"``."""
        damping, mode = self._damped(damping, mode)
        V, one = as_vectors(v, self.size, self.dtype, self.device)
        out = self._solve(V, damping) if mode == "exact" else self._solve_mode(V, damping, mode)
        return out[:, 0] if one else out

    def direction(self, g: Tensor, damping: Damping = 0.0, mode: str = "exact") -> Tensor:
        """Return the update direction this matrix takes for a gradient g: −(C + λI)⁻¹g for ``mode="exact"``."""
        if not isinstance(g, Tensor) or g.ndim != 1:
            raise ValueError(f"g must be a flat gradient of shape ({self.size},); got "
                             f"{tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__}")
        return -self.solve(g, damping, mode)

    def inverse(self, damping: Damping = 0.0, mode: str = "exact") -> CurvatureMatrix:
        """Return the inverse of the damped matrix, in the same structure: (C + λI)⁻¹ for ``mode="exact"``."""
        damping, mode = self._damped(damping, mode)
        return self._inverse(damping) if mode == "exact" else self._inverse_mode(damping, mode)

    def logdet(self, damping: Damping = 0.0, mode: str = "exact") -> Tensor:
        """Return log det of the damped matrix; raise if it is not positive definite."""
        damping, mode = self._damped(damping, mode)
        return self._logdet(damping) if mode == "exact" else self._logdet_mode(damping, mode)

    def _logdet(self, damping: float) -> Tensor:
        ev = self.eigvalsh() + damping
        if bool((ev <= 0).any()):
            raise ValueError(f"logdet: C + {damping}·I is not positive definite (smallest eigenvalue "
                             f"{float(ev.min()):.3e}); increase the damping")
        return torch.log(ev).sum()

    def eigh(self) -> Eigh:
        """All eigenpairs, ascending; computed once and cached."""
        if "eigh" not in self._cache:
            memory.check((self.size, self.size), self.dtype, "the eigenvectors of a curvature matrix",
                         hint="use eigvalsh() for the eigenvalues alone, top_eigen(k), or compare per block")
            self._cache["eigh"] = self._eigh()
        return self._cache["eigh"]

    def eigvalsh(self) -> Tensor:
        """All eigenvalues, ascending; cached (reuses a cached eigh)."""
        if "eigh" in self._cache:
            return self._cache["eigh"].values
        if "eigvalsh" not in self._cache:
            self._cache["eigvalsh"] = self._eigvalsh()
        return self._cache["eigvalsh"]

    def top_eigen(self, k: int) -> Eigh:
        """Return the k algebraically largest eigenpairs: values (k,) descending, vectors (P, k) orthonormal.

        Cached per k (a cached larger k is sliced). Cheapest first: a cached full ``eigh``; the
        structure's own rule; a full ``eigh`` up to :data:`DENSE_EIGH_LIMIT` or for k ≥ P/3; Lanczos.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= int(k) <= self.size:
            raise ValueError(f"k must be an integer in [1, {self.size}]; got {k!r}")
        k = int(k)
        memo = self._cache.setdefault("top", {})
        if k in memo:
            return memo[k]
        for kk in sorted(memo):
            if kk >= k:
                w, Q = memo[kk]
                return Eigh(w[:k], Q[:, :k])
        if "eigh" in self._cache:
            out = _descending(self._cache["eigh"], k)
        else:
            out = self._top_eigen(k)
            if out is None:
                out = self._generic_top_eigen(k)
        memo[k] = out
        return out

    def _generic_top_eigen(self, k: int) -> Eigh:
        if self.size <= DENSE_EIGH_LIMIT or 3 * k >= self.size:
            return _descending(self.eigh(), k)
        from scipy.sparse.linalg import eigsh

        w, Q = eigsh(self._lanczos_operand(), k=k, which="LA")
        order = np.argsort(w)[::-1].copy()
        return Eigh(torch.as_tensor(w[order], dtype=self.dtype, device=self.device),
                    torch.as_tensor(Q[:, order], dtype=self.dtype, device=self.device))

    def _columns(self, j: int, k: int) -> Tensor:
        """Return the columns C[:, j:k] (products with unit vectors; dense structures slice)."""
        return self @ _unit_columns(self.size, j, k, self.dtype, self.device)

    def _lanczos_operand(self) -> Any:
        """Return what ARPACK iterates with: a NumPy array for dense matrices, else a LinearOperator."""
        return self.as_linear_operator()

    def trace(self) -> Tensor:
        """Return tr C = Σ_i C_ii."""
        return self.diagonal().sum()

    def as_linear_operator(self) -> Any:
        """Return a ``scipy.sparse.linalg.LinearOperator`` (float64 NumPy in and out)."""
        from scipy.sparse.linalg import LinearOperator

        def mv(x: np.ndarray) -> np.ndarray:
            t = torch.as_tensor(np.asarray(x), dtype=self.dtype, device=self.device)
            return (self @ t.reshape(self.size, -1)).cpu().numpy().reshape(x.shape)

        np_dtype = np.float64 if self.dtype == torch.float64 else np.float32
        return LinearOperator(self.shape, matvec=mv, rmatvec=mv, matmat=mv, rmatmat=mv, dtype=np_dtype)

    # ------------------------------------------------------------------ structure-aware comparisons
    def _check_other(self, other: Any) -> None:
        if not isinstance(other, CurvatureMatrix):
            raise TypeError(f"expected a curvlab CurvatureMatrix; got {type(other).__name__}")
        if other.size != self.size:
            raise ValueError(f"cannot compare matrices of sizes {self.size} and {other.size}")

    def inner(self, other: CurvatureMatrix) -> Tensor:
        """⟨C, other⟩_F = Σ_ij C_ij other_ij = tr(C other), from the two structures where one knows how.

        Falls back to products with chunks of unit vectors (P products with each operand).
        """
        self._check_other(other)
        if other is self:
            return self.frobenius_norm() ** 2
        dtype = torch.promote_types(self.dtype, other.dtype)
        for a, b in ((self, other), (other, self)):
            out = a._inner(b)
            if out is not None:
                return out.to(dtype)
        return _columns_inner(self, other, dtype)

    def difference_norm(self, other: CurvatureMatrix) -> Tensor:
        """‖C − other‖_F without forming C − other densely when a structure allows it.

        Fallback: √(‖C‖² + ‖D‖² − 2⟨C, D⟩); when that has lost its digits (relative error below
        ~1e-4) and one operand is dense, the other is densified and the difference taken directly.
        """
        self._check_other(other)
        dtype = torch.promote_types(self.dtype, other.dtype)
        if other is self:
            return torch.zeros((), dtype=dtype, device=self.device)
        for a, b in ((self, other), (other, self)):
            out = a._difference_norm(b)
            if out is not None:
                return out.to(dtype)
        scale = self.frobenius_norm().to(dtype) ** 2 + other.frobenius_norm().to(dtype) ** 2
        sq = scale - 2 * self.inner(other)
        from curvlab.linalg.dense import Dense

        if float(sq) <= _CANCEL * float(scale) and (isinstance(self, Dense) or isinstance(other, Dense)):
            return torch.linalg.matrix_norm(self.to_dense().to(dtype) - other.to_dense().to(dtype))
        return torch.sqrt(torch.clamp(sq, min=0.0))

    def offblock_sq(self, slices: Sequence[slice]) -> Tensor:
        """‖C − blockdiag(C_bb)‖²_F: the mass of C outside the given diagonal blocks."""
        out = self._offblock_sq(slices)
        if out is not None:
            return out
        on = sum(self.restrict(s).frobenius_norm() ** 2 for s in slices)
        return torch.clamp(self.frobenius_norm() ** 2 - on, min=0.0)

    def restrict(self, s: slice) -> CurvatureMatrix:
        """Return the principal submatrix C[s, s] as a CurvatureMatrix, in C's structure where it has one.

        A slice covering all of C is C itself; results are cached per matrix (repeated calls return the
        same object, with its cached decompositions). Fallback: the columns C E_s (|s| products).
        """
        if not isinstance(s, slice):
            raise TypeError(f"restrict takes a slice; got {type(s).__name__}")
        start, stop, step = s.indices(self.size)
        if step != 1 or start >= stop:
            raise ValueError(f"restrict needs a non-empty contiguous slice; got {s}")
        if start == 0 and stop == self.size:
            return self
        memo = self._cache.setdefault("restrict", {})
        if (start, stop) not in memo:
            sub = slice(start, stop)
            out = self._restrict(sub)
            memo[(start, stop)] = out if out is not None else _columns_restrict(self, sub)
        return memo[(start, stop)]

    # ------------------------------------------------------------------ arithmetic
    def __add__(self, other: Any) -> CurvatureMatrix:
        return self._combine(other, 1.0)

    def __sub__(self, other: Any) -> CurvatureMatrix:
        return self._combine(other, -1.0)

    def _combine(self, other: Any, sign: float) -> CurvatureMatrix:
        if not isinstance(other, CurvatureMatrix):
            return NotImplemented
        if other.size != self.size:
            raise ValueError(f"cannot combine curvature matrices of sizes {self.size} and {other.size}")
        out = self._add(other, sign)
        if out is None:
            r = other._add(self, sign)
            out = None if r is None else (r if sign > 0 else r._scaled(-1.0))
        if out is None:  # no shared structure: the sum is dense
            from curvlab.linalg.dense import Dense

            memory.check(self.shape, self.dtype, f"{type(self).__name__} {'+' if sign > 0 else '-'} "
                         f"{type(other).__name__} (different structures add densely)")
            out = Dense(self.to_dense() + sign * other.to_dense().to(self.dtype))
        return out

    def __mul__(self, alpha: Any) -> CurvatureMatrix:
        if isinstance(alpha, Tensor) and alpha.numel() == 1:
            alpha = float(alpha)
        if not isinstance(alpha, (int, float)):
            return NotImplemented
        if not np.isfinite(alpha):
            raise ValueError(f"cannot scale a curvature matrix by {alpha}: the scalar must be finite")
        return self._scaled(float(alpha))

    __rmul__ = __mul__

    def __truediv__(self, alpha: Any) -> CurvatureMatrix:
        if float(alpha) == 0.0:
            raise ValueError("cannot divide a curvature matrix by zero")
        return self * (1.0 / float(alpha))

    def __neg__(self) -> CurvatureMatrix:
        return self._scaled(-1.0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(P={self.size}, dtype={str(self.dtype).replace('torch.', '')})"


#: below this ‖A − B‖² / (‖A‖² + ‖B‖²) the expansion ‖A‖² + ‖B‖² − 2⟨A, B⟩ is recomputed densely
_CANCEL = 1e-8


def _descending(e: Eigh, k: int) -> Eigh:
    w, Q = e
    return Eigh(torch.flip(w[-k:], (0,)), torch.flip(Q[:, -k:], (1,)))


def _unit_columns(size: int, j: int, k: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    E = torch.zeros(size, k - j, dtype=dtype, device=device)
    E[j:k] = torch.eye(k - j, dtype=dtype, device=device)
    return E


def _columns_inner(A: CurvatureMatrix, B: CurvatureMatrix, dtype: torch.dtype, chunk: int = 256) -> Tensor:
    """Return ⟨A, B⟩ = Σ_J ⟨A E_J, B E_J⟩ over chunks J of unit vectors."""
    total = torch.zeros((), dtype=dtype, device=A.device)
    for j in range(0, A.size, chunk):
        k = min(A.size, j + chunk)
        total = total + (A._columns(j, k).to(dtype) * B._columns(j, k).to(dtype)).sum()
    return total


def _columns_restrict(C: CurvatureMatrix, s: slice) -> CurvatureMatrix:
    from curvlab.linalg.dense import Dense

    return Dense(C._columns(s.start, s.stop)[s], symmetrize=True)
