"""A dense symmetric curvature matrix."""

from __future__ import annotations

import torch
from torch import Tensor

from curvlab.linalg.base import CurvatureMatrix, Eigh, _check_damping

__all__ = ["Dense"]


class Dense(CurvatureMatrix):
    """C stored as a dense symmetric P×P tensor.

    ``solve`` factorises C + λI once per damping (Cholesky when positive definite, otherwise an
    LU factorisation, e.g. for an indefinite Hessian) and keeps the factor for later solves; when
    the eigendecomposition is already cached it is used instead.
    """

    def __init__(self, matrix: Tensor, symmetrize: bool = False) -> None:
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"Dense needs a square matrix; got shape {tuple(matrix.shape)}")
        super().__init__(matrix.shape[0], matrix.dtype, matrix.device)
        self.matrix = 0.5 * (matrix + matrix.T) if symmetrize else matrix

    @property
    def structure(self) -> str:
        return "dense"

    def to_dense(self) -> Tensor:
        return self.matrix

    def _matmat(self, V: Tensor) -> Tensor:
        return self.matrix @ V

    def _factor(self, damping: float) -> tuple[str, Tensor, Tensor | None]:
        key = ("factor", damping)
        if key not in self._cache:
            self._cache = {k: v for k, v in self._cache.items() if not (isinstance(k, tuple) and k[0] == "factor")}
            M = self.matrix + damping * torch.eye(self.size, dtype=self.dtype, device=self.device)
            L, info = torch.linalg.cholesky_ex(M)
            if int(info) == 0:
                self._cache[key] = ("cholesky", L, None)
            else:
                LU, piv, info = torch.linalg.lu_factor_ex(M)
                if int(info) != 0:
                    raise ValueError(f"C + {damping}·I is singular; increase the damping")
                self._cache[key] = ("lu", LU, piv)
        return self._cache[key]

    def _solve(self, V: Tensor, damping: float) -> Tensor:
        if "eigh" in self._cache:
            w, Q = self._cache["eigh"]
            d = w + damping
            if bool((d == 0).any()):
                raise ValueError(f"C + {damping}·I is singular; increase the damping")
            return Q @ ((Q.T @ V) / d[:, None])
        kind, F, piv = self._factor(damping)
        if kind == "cholesky":
            return torch.cholesky_solve(V, F)
        return torch.linalg.lu_solve(F, piv, V)

    def _inverse(self, damping: float) -> CurvatureMatrix:
        kind, F, piv = self._factor(damping)
        if kind == "cholesky":
            inv = torch.cholesky_inverse(F)
        else:
            inv = torch.linalg.lu_solve(F, piv, torch.eye(self.size, dtype=self.dtype, device=self.device))
        return Dense(inv, symmetrize=True)

    def _eigh(self) -> Eigh:
        w, Q = torch.linalg.eigh(self.matrix)
        return Eigh(w, Q)

    def _eigvalsh(self) -> Tensor:
        return torch.linalg.eigvalsh(self.matrix)

    def diagonal(self) -> Tensor:
        return self.matrix.diagonal()

    def trace(self) -> Tensor:
        return self.matrix.diagonal().sum()

    def logdet(self, damping: float = 0.0) -> Tensor:
        damping = _check_damping(damping)
        if "eigh" in self._cache or "eigvalsh" in self._cache:
            return super().logdet(damping)
        kind, F, _ = self._factor(damping)
        if kind != "cholesky":
            raise ValueError(f"logdet: C + {damping}·I is not positive definite; increase the damping")
        return 2.0 * torch.log(F.diagonal()).sum()

    def frobenius_norm(self) -> Tensor:
        return torch.linalg.matrix_norm(self.matrix)

    def _scaled(self, alpha: float) -> CurvatureMatrix:
        return Dense(alpha * self.matrix)

    def _add(self, other: CurvatureMatrix, sign: float) -> CurvatureMatrix | None:
        return Dense(self.matrix + sign * other.to_dense().to(self.dtype))
