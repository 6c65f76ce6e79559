"""A diagonal curvature matrix."""

from __future__ import annotations

import torch
from torch import Tensor

from curvlab import memory
from curvlab.linalg.base import CurvatureMatrix, Eigh, singular_tolerance

__all__ = ["Diagonal"]


class Diagonal(CurvatureMatrix):
    """C = diag(d). Every operation is elementwise; nothing is densified except by ``to_dense``."""

    def __init__(self, diag: Tensor) -> None:
        if diag.ndim != 1:
            raise ValueError(f"Diagonal needs a 1-D tensor; got shape {tuple(diag.shape)}")
        super().__init__(diag.shape[0], diag.dtype, diag.device)
        self.diag = diag

    @property
    def structure(self) -> str:
        """``diag``."""
        return "diag"

    def to_dense(self) -> Tensor:
        """Return diag(d) as a dense P×P matrix."""
        memory.check(self.shape, self.dtype, "the dense form of a diagonal matrix")
        return torch.diag(self.diag)

    def _matmat(self, V: Tensor) -> Tensor:
        return self.diag[:, None] * V

    def _shifted(self, damping: float) -> Tensor:
        d = self.diag + damping
        tol = singular_tolerance(float(self.diag.abs().max()) + damping, self.size, self.dtype) if self.size else 0
        small = d.abs() <= tol
        if bool(small.any()):
            i = int(small.nonzero()[0])
            raise ValueError(f"C + {damping}·I is singular or numerically singular (diagonal entry {i} is "
                             f"{float(self.diag[i])}); increase the damping")
        return d

    def _solve(self, V: Tensor, damping: float) -> Tensor:
        return V / self._shifted(damping)[:, None]

    def _inverse(self, damping: float) -> CurvatureMatrix:
        return Diagonal(1.0 / self._shifted(damping))

    def _eigh(self) -> Eigh:
        w, order = torch.sort(self.diag)
        Q = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        Q[order, torch.arange(self.size, device=self.device)] = 1.0
        return Eigh(w, Q)

    def _eigvalsh(self) -> Tensor:
        return torch.sort(self.diag).values

    def diagonal(self) -> Tensor:
        """Return the stored diagonal d, shape (P,)."""
        return self.diag

    def frobenius_norm(self) -> Tensor:
        """Return ‖C‖_F = ‖d‖₂."""
        return torch.linalg.vector_norm(self.diag)

    def _scaled(self, alpha: float) -> CurvatureMatrix:
        return Diagonal(alpha * self.diag)

    def _add(self, other: CurvatureMatrix, sign: float) -> CurvatureMatrix | None:
        if isinstance(other, Diagonal):
            return Diagonal(self.diag + sign * other.diag)
        return None

    # -- structural hooks ------------------------------------------------------------------------
    def _inner(self, other: CurvatureMatrix) -> Tensor:
        """⟨diag(d), B⟩ = Σ_i d_i B_ii: only B's diagonal."""
        dtype = torch.promote_types(self.dtype, other.dtype)
        return (self.diag.to(dtype) * other.diagonal().to(dtype)).sum()

    def _difference_norm(self, other: CurvatureMatrix) -> Tensor:
        """‖d − diag(B)‖² + the off-diagonal mass of B."""
        dtype = torch.promote_types(self.dtype, other.dtype)
        dB = other.diagonal().to(dtype)
        if isinstance(other, Diagonal):
            return torch.linalg.vector_norm(self.diag.to(dtype) - dB)
        off = torch.clamp(other.frobenius_norm().to(dtype) ** 2 - (dB**2).sum(), min=0.0)
        return torch.sqrt(((self.diag.to(dtype) - dB) ** 2).sum() + off)

    def _restrict(self, s: slice) -> CurvatureMatrix:
        return Diagonal(self.diag[s])

    def _offblock_sq(self, slices) -> Tensor:
        return torch.zeros((), dtype=self.dtype, device=self.device)

    def _top_eigen(self, k: int) -> Eigh:
        w, idx = torch.topk(self.diag, k)
        Q = torch.zeros(self.size, k, dtype=self.dtype, device=self.device)
        Q[idx, torch.arange(k, device=self.device)] = 1.0
        return Eigh(w, Q)
