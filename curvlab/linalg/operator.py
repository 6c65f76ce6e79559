"""A matrix-free curvature matrix: only products C @ V are available."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from curvlab import memory
from curvlab.linalg.base import CurvatureMatrix, Eigh
from curvlab.linalg.dense import Dense

__all__ = ["MatrixFree"]


class MatrixFree(CurvatureMatrix):
    """C given by a function V ↦ C V for V of shape (P, m), for matrices too large to densify.

    ``solve`` runs conjugate gradients on C + λI (requires C + λI positive definite; it raises if
    CG does not converge to ``rtol``). ``diagonal``/``trace``/``to_dense`` take P products
    (chunked, exact); spectra densify under the memory budget — for a large C use
    ``scipy.sparse.linalg.eigsh(C.as_linear_operator(), k)`` instead.
    """

    def __init__(self, size: int, matmat: Callable[[Tensor], Tensor], dtype: torch.dtype,
                 device: torch.device | str = "cpu", chunk: int = 64, name: str = "operator",
                 rtol: float = 1e-10, max_iter: int | None = None) -> None:
        super().__init__(size, dtype, device)
        self._fn = matmat
        self.chunk = chunk
        self.name = name
        self.rtol = rtol
        self.max_iter = max_iter or 10 * size

    @property
    def structure(self) -> str:
        """``operator``."""
        return "operator"

    def _matmat(self, V: Tensor) -> Tensor:
        return torch.cat([self._fn(V[:, j:j + self.chunk]) for j in range(0, V.shape[1], self.chunk)], dim=1)

    def _each_column_chunk(self, keep: Callable[[int, int, Tensor], None]) -> None:
        eye = torch.eye(self.size, dtype=self.dtype, device=self.device)
        for j in range(0, self.size, self.chunk):
            keep(j, min(self.size, j + self.chunk), self._fn(eye[:, j:j + self.chunk]))

    def to_dense(self) -> Tensor:
        """Return the dense P×P matrix from products with chunks of unit vectors (symmetrised)."""
        memory.check(self.shape, self.dtype, f"the dense form of the {self.name}")
        out = torch.empty(self.shape, dtype=self.dtype, device=self.device)

        def keep(j0: int, j1: int, cols: Tensor) -> None:
            out[:, j0:j1] = cols

        self._each_column_chunk(keep)
        return 0.5 * (out + out.T)

    def diagonal(self) -> Tensor:
        """Return the diagonal (P,) from products with chunks of unit vectors."""
        out = torch.empty(self.size, dtype=self.dtype, device=self.device)

        def keep(j0: int, j1: int, cols: Tensor) -> None:
            out[j0:j1] = cols[j0:j1].diagonal()

        self._each_column_chunk(keep)
        return out

    def _solve(self, V: Tensor, damping: float) -> Tensor:
        X = torch.zeros_like(V)
        R = V.clone()
        Pd = R.clone()
        rs = (R * R).sum(0)
        target = (self.rtol**2) * (V * V).sum(0)
        for _ in range(self.max_iter):
            if bool((rs <= target).all()):
                return X
            AP = self._matmat(Pd) + damping * Pd
            curv = (Pd * AP).sum(0)
            if bool((curv <= 0).any()):
                raise ValueError(f"conjugate gradients met non-positive curvature: C + {damping}·I is not "
                                 "positive definite; increase the damping or densify (to_dense) and solve")
            alpha = rs / curv
            X = X + alpha * Pd
            R = R - alpha * AP
            rs_new = (R * R).sum(0)
            Pd = R + (rs_new / rs) * Pd
            rs = rs_new
        if bool((rs <= target).all()):
            return X
        raise ValueError(f"conjugate gradients did not reach rtol={self.rtol} in {self.max_iter} iterations")

    def _dense(self) -> Dense:
        if "dense" not in self._cache:
            self._cache["dense"] = Dense(self.to_dense())
        return self._cache["dense"]

    def _inverse(self, damping: float) -> CurvatureMatrix:
        return self._dense()._inverse(damping)

    def _eigh(self) -> Eigh:
        return self._dense().eigh()

    def _eigvalsh(self) -> Tensor:
        return self._dense().eigvalsh()

    def frobenius_norm(self) -> Tensor:
        """Return ‖C‖_F from products with chunks of unit vectors."""
        total = torch.zeros((), dtype=self.dtype, device=self.device)

        def keep(j0: int, j1: int, cols: Tensor) -> None:
            nonlocal total
            total = total + (cols**2).sum()

        self._each_column_chunk(keep)
        return total.sqrt()

    def _scaled(self, alpha: float) -> CurvatureMatrix:
        return MatrixFree(self.size, lambda V: alpha * self._fn(V), self.dtype, self.device, self.chunk,
                          self.name, self.rtol, self.max_iter)

    def _add(self, other: CurvatureMatrix, sign: float) -> CurvatureMatrix | None:
        return MatrixFree(self.size, lambda V: self._fn(V) + sign * other._matmat(V), self.dtype,
                          self.device, self.chunk, self.name, self.rtol, self.max_iter)
