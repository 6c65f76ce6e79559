"""The CurvatureMatrix protocol: one algebra for every representation of a curvature matrix.

A CurvatureMatrix C is a symmetric P×P matrix over the flat parameter vector of a Problem
(``named_parameters()`` order, row-major). Subclasses implement a handful of primitives
(``to_dense``, ``_matmat``, ``_solve``, ``_inverse``, ``_eigh``, ``diagonal``, ``frobenius_norm``,
``_scaled``) from their structure; this base class turns them into the public protocol:

    C.to_dense()  C @ v  C.solve(v, damping)  C.inverse(damping)  C.eigh()  C.eigvalsh()
    C.trace()  C.logdet(damping)  C.frobenius_norm()  C.blocks  C.as_linear_operator()
    C + D   C - D   a * C   -C   C / a

``solve(v, damping)`` is always the exact (C + λI)⁻¹v. Methods with their own damping rules
(factored, π-damping …) expose them through :meth:`direction` with a ``mode``.
Eigendecompositions are computed once and cached on the matrix (matrices are immutable).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from curvlab import memory

__all__ = ["CurvatureMatrix", "Eigh", "as_vectors"]


class Eigh(NamedTuple):
    """Eigenvalues in ascending order and the matching orthonormal eigenvectors as columns."""

    values: Tensor
    vectors: Tensor


def as_vectors(v: Tensor, size: int, dtype: torch.dtype, device: torch.device, what: str = "v") -> tuple[Tensor, bool]:
    """Check a vector (P,) or a matrix of columns (P, m); return it as (P, m) and whether it was 1-D."""
    if not isinstance(v, Tensor):
        v = torch.as_tensor(v)
    if v.ndim not in (1, 2) or v.shape[0] != size:
        raise ValueError(f"{what} must have shape ({size},) or ({size}, m); got {tuple(v.shape)}")
    if not torch.is_floating_point(v):
        v = v.to(dtype)
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"{what} contains NaN or inf")
    v = v.to(dtype=dtype, device=device)
    return (v[:, None], True) if v.ndim == 1 else (v, False)


def _check_damping(damping: float) -> float:
    damping = float(damping)
    if not np.isfinite(damping):
        raise ValueError(f"damping must be finite; got {damping}")
    return damping


class CurvatureMatrix:
    """Abstract symmetric P×P curvature matrix. See the module docstring for the protocol."""

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
        """The dense P×P matrix (in parameter order)."""
        raise NotImplementedError

    def _matmat(self, V: Tensor) -> Tensor:
        """C @ V for V of shape (P, m)."""
        raise NotImplementedError

    def _solve(self, V: Tensor, damping: float) -> Tensor:
        """(C + λI)⁻¹ V for V of shape (P, m)."""
        raise NotImplementedError

    def _inverse(self, damping: float) -> CurvatureMatrix:
        raise NotImplementedError

    def _eigh(self) -> Eigh:
        raise NotImplementedError

    def _eigvalsh(self) -> Tensor:
        return self.eigh().values

    def diagonal(self) -> Tensor:
        """The diagonal (P,)."""
        raise NotImplementedError

    def frobenius_norm(self) -> Tensor:
        """‖C‖_F."""
        raise NotImplementedError

    def _scaled(self, alpha: float) -> CurvatureMatrix:
        """α C in the same structure."""
        raise NotImplementedError

    def _add(self, other: CurvatureMatrix, sign: float) -> CurvatureMatrix | None:
        """C + sign·other in a shared structure, or None when there is none."""
        return None

    # ------------------------------------------------------------------ structure
    @property
    def shape(self) -> tuple[int, int]:
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
        return ("all",)

    @property
    def structure(self) -> str:
        """A short name of the representation (``dense``, ``block``, ``diag``, ``kron`` …)."""
        return type(self).__name__.lower()

    # ------------------------------------------------------------------ public protocol
    def __matmul__(self, v: Tensor) -> Tensor:
        V, one = as_vectors(v, self.size, self.dtype, self.device)
        out = self._matmat(V)
        return out[:, 0] if one else out

    def matvec(self, v: Tensor) -> Tensor:
        return self @ v

    def solve(self, v: Tensor, damping: float = 0.0) -> Tensor:
        """(C + λI)⁻¹ v, exactly, for v of shape (P,) or (P, m)."""
        V, one = as_vectors(v, self.size, self.dtype, self.device)
        out = self._solve(V, _check_damping(damping))
        return out[:, 0] if one else out

    def direction(self, g: Tensor, damping: float = 0.0, mode: str = "exact") -> Tensor:
        """The update direction −(C + λI)⁻¹ g this matrix would take for a gradient g.

        ``mode="exact"`` is the exact Tikhonov damping; approximators add their own modes
        (e.g. KFAC's ``"factored"`` and ``"pi"``).
        """
        if mode != "exact":
            raise ValueError(f"{type(self).__name__} has no damping mode {mode!r}; it supports 'exact'")
        return -self.solve(g, damping)

    def inverse(self, damping: float = 0.0) -> CurvatureMatrix:
        """(C + λI)⁻¹ in the same structure."""
        return self._inverse(_check_damping(damping))

    def eigh(self) -> Eigh:
        """All eigenpairs, ascending; computed once and cached."""
        if "eigh" not in self._cache:
            memory.check((self.size, self.size), self.dtype, "the eigenvectors of a curvature matrix",
                         hint="use eigvalsh() for the eigenvalues alone, or compare per block")
            self._cache["eigh"] = self._eigh()
        return self._cache["eigh"]

    def eigvalsh(self) -> Tensor:
        """All eigenvalues, ascending; cached (reuses a cached eigh)."""
        if "eigh" in self._cache:
            return self._cache["eigh"].values
        if "eigvalsh" not in self._cache:
            self._cache["eigvalsh"] = self._eigvalsh()
        return self._cache["eigvalsh"]

    def trace(self) -> Tensor:
        return self.diagonal().sum()

    def logdet(self, damping: float = 0.0) -> Tensor:
        """log det(C + λI); raises if C + λI is not positive definite."""
        damping = _check_damping(damping)
        ev = self.eigvalsh() + damping
        if bool((ev <= 0).any()):
            raise ValueError(f"logdet: C + {damping}·I is not positive definite (smallest eigenvalue "
                             f"{float(ev.min()):.3e}); increase the damping")
        return torch.log(ev).sum()

    def as_linear_operator(self) -> Any:
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 NumPy in and out)."""
        from scipy.sparse.linalg import LinearOperator

        def mv(x: np.ndarray) -> np.ndarray:
            t = torch.as_tensor(np.asarray(x), dtype=self.dtype, device=self.device)
            return (self @ t.reshape(self.size, -1)).cpu().numpy().reshape(x.shape)

        np_dtype = np.float64 if self.dtype == torch.float64 else np.float32
        return LinearOperator(self.shape, matvec=mv, rmatvec=mv, matmat=mv, rmatmat=mv, dtype=np_dtype)

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
