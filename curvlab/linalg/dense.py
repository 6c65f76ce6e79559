"""A dense symmetric curvature matrix."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from curvlab.linalg.base import CurvatureMatrix, Eigh, singular_tolerance

__all__ = ["Dense"]


class Dense(CurvatureMatrix):
    """C stored as a dense symmetric P×P tensor.

    ``solve`` factorises C + λI once per damping (Cholesky when positive definite, otherwise an
    LU factorisation, e.g. for an indefinite Hessian) and keeps the factor for later solves; when
    the eigendecomposition is already cached it is used instead. A damped system whose smallest
    pivot (or eigenvalue) is below P·ε·max|C_ij| is numerically singular and raises.
    """

    def __init__(self, matrix: Tensor, symmetrize: bool = False) -> None:
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"Dense needs a square matrix; got shape {tuple(matrix.shape)}")
        super().__init__(matrix.shape[0], matrix.dtype, matrix.device)
        self.matrix = 0.5 * (matrix + matrix.T) if symmetrize else matrix

    @property
    def structure(self) -> str:
        """``full``."""
        return "full"

    def to_dense(self) -> Tensor:
        """Return the stored P×P matrix itself."""
        return self.matrix

    def _matmat(self, V: Tensor) -> Tensor:
        return self.matrix @ V

    def _columns(self, j: int, k: int) -> Tensor:
        return self.matrix[:, j:k]

    def _lanczos_operand(self) -> Any:
        return self.matrix.detach().cpu().numpy()

    def _scale(self) -> float:
        if "scale" not in self._cache:
            self._cache["scale"] = float(self.matrix.abs().max()) if self.size else 0.0
        return self._cache["scale"]

    def _factor(self, damping: float) -> tuple[str, Tensor, Tensor | None]:
        key = ("factor", damping)
        if key not in self._cache:
            self._cache = {k: v for k, v in self._cache.items() if not (isinstance(k, tuple) and k[0] == "factor")}
            M = self.matrix + damping * torch.eye(self.size, dtype=self.dtype, device=self.device)
            tol = singular_tolerance(self._scale() + damping, self.size, self.dtype)
            L, info = torch.linalg.cholesky_ex(M)
            if int(info) == 0 and float(L.diagonal().min()) ** 2 > tol:
                self._cache[key] = ("cholesky", L, None)
            else:
                LU, piv, info = torch.linalg.lu_factor_ex(M)
                smallest = float(LU.diagonal().abs().min())
                if int(info) != 0 or smallest <= tol:
                    raise self.singular_error(damping, smallest, tolerance=tol)
                self._cache[key] = ("lu", LU, piv)
        return self._cache[key]

    def _solve(self, V: Tensor, damping: float) -> Tensor:
        if "eigh" in self._cache:
            w, Q = self._cache["eigh"]
            d = w + damping
            smallest = float(d.abs().min())
            tol = singular_tolerance(float(w.abs().max()) + damping, self.size, self.dtype)
            if smallest <= tol:
                raise self.singular_error(damping, smallest, tolerance=tol)
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
        """Return the diagonal (P,)."""
        return self.matrix.diagonal()

    def trace(self) -> Tensor:
        """Return tr C = Σ_i C_ii."""
        return self.matrix.diagonal().sum()

    def _logdet(self, damping: float) -> Tensor:
        if "eigh" in self._cache or "eigvalsh" in self._cache:
            return super()._logdet(damping)
        try:
            kind, F, _ = self._factor(damping)
        except ValueError:
            kind = "singular"
        if kind != "cholesky":
            raise ValueError(f"logdet: C + {damping}·I is not positive definite; increase the damping")
        return 2.0 * torch.log(F.diagonal()).sum()

    def frobenius_norm(self) -> Tensor:
        """Return ‖C‖_F."""
        return torch.linalg.matrix_norm(self.matrix)

    def _scaled(self, alpha: float) -> CurvatureMatrix:
        return Dense(alpha * self.matrix)

    def _add(self, other: CurvatureMatrix, sign: float) -> CurvatureMatrix | None:
        return Dense(self.matrix + sign * other.to_dense().to(self.dtype))

    # -- structural hooks ------------------------------------------------------------------------
    def _inner(self, other: CurvatureMatrix) -> Tensor | None:
        if isinstance(other, Dense):
            dtype = torch.promote_types(self.dtype, other.dtype)
            return (self.matrix.to(dtype) * other.matrix.to(dtype)).sum()
        return None

    def _difference_norm(self, other: CurvatureMatrix) -> Tensor | None:
        if isinstance(other, Dense):
            dtype = torch.promote_types(self.dtype, other.dtype)
            return torch.linalg.matrix_norm(self.matrix.to(dtype) - other.matrix.to(dtype))
        return None

    def _restrict(self, s: slice) -> CurvatureMatrix:
        return Dense(self.matrix[s, s])

    def _offblock_sq(self, slices) -> Tensor:
        M = self.matrix
        total = torch.zeros((), dtype=M.dtype, device=M.device)
        for s in slices:
            total = total + (M[s, :s.start] ** 2).sum() + (M[s, s.stop:] ** 2).sum()
        return total
