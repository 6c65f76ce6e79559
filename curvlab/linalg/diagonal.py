"""A diagonal curvature matrix."""

from __future__ import annotations

import torch
from torch import Tensor

from curvlab import memory
from curvlab.linalg.base import CurvatureMatrix, Eigh

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
        return "diag"

    def to_dense(self) -> Tensor:
        memory.check(self.shape, self.dtype, "the dense form of a diagonal matrix")
        return torch.diag(self.diag)

    def _matmat(self, V: Tensor) -> Tensor:
        return self.diag[:, None] * V

    def _shifted(self, damping: float) -> Tensor:
        d = self.diag + damping
        if bool((d == 0).any()):
            i = int((d == 0).nonzero()[0])
            raise ValueError(f"C + {damping}·I is singular (diagonal entry {i} is {float(self.diag[i])}); "
                             "increase the damping")
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
        return self.diag

    def frobenius_norm(self) -> Tensor:
        return torch.linalg.vector_norm(self.diag)

    def _scaled(self, alpha: float) -> CurvatureMatrix:
        return Diagonal(alpha * self.diag)

    def _add(self, other: CurvatureMatrix, sign: float) -> CurvatureMatrix | None:
        if isinstance(other, Diagonal):
            return Diagonal(self.diag + sign * other.diag)
        return None
