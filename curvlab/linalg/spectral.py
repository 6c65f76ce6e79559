"""A curvature matrix given by its eigendecomposition, C = Q diag(w) Qᵀ.

The eigenvalues w (P,) may come in any order; Q (P × P) has orthonormal columns. Everything
follows from (w, Q) without a P×P product or a second decomposition:

    C V = Q (w ⊙ QᵀV)         (C + λI)⁻¹ V = Q ((QᵀV) / (w + λ))      log det(C + λI) = Σ log(w + λ)
    tr C = Σ w                ‖C‖_F = ‖w‖₂                            diag C = (Q ⊙ Q) w
    top-k eigenpairs: the k largest w with their columns of Q (no copy of the others)

This is the form of a *spectral function* f(H) = Q f(Λ) Qᵀ of a matrix whose eigendecomposition
H = Q Λ Qᵀ is already known: the saddle-free Newton matrix |H| = Q |Λ| Qᵀ (Dauphin et al. 2014,
arXiv 1406.2572) and the positive part max(H, 0) = Q max(Λ, 0) Qᵀ share H's eigenvectors, so they
cost a vector of P numbers beyond H's cached ``eigh``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvlab import memory
from curvlab.linalg.base import CurvatureMatrix, Eigh, singular_tolerance

__all__ = ["Spectral"]


class Spectral(CurvatureMatrix):
    """C = Q diag(w) Qᵀ from eigenvalues ``values`` (P,) and orthonormal eigenvectors ``vectors`` (P, P).

    ``vectors`` is kept as given (not copied), so a Spectral built from another matrix's cached
    ``eigh()`` shares its eigenvectors. A damped system whose smallest |w_i + λ| is below
    √P·ε·(max|w| + λ) (``singular_tolerance``) is numerically singular and raises.
    """

    def __init__(self, values: Tensor, vectors: Tensor) -> None:
        if not isinstance(values, Tensor) or not isinstance(vectors, Tensor):
            raise TypeError(f"Spectral needs tensors; got {type(values).__name__} and {type(vectors).__name__}")
        if values.ndim != 1 or vectors.shape != (values.shape[0], values.shape[0]):
            raise ValueError(f"Spectral needs values (P,) and vectors (P, P); got {tuple(values.shape)} and "
                             f"{tuple(vectors.shape)}")
        if not bool(torch.isfinite(values).all()):
            raise ValueError("Spectral: the eigenvalues contain NaN or inf")
        super().__init__(values.shape[0], vectors.dtype, vectors.device)
        self.values, self.vectors = values.to(vectors.dtype), vectors

    @property
    def structure(self) -> str:
        """``spectral``."""
        return "spectral"

    # ---------------------------------------------------------------- products and scalars
    def to_dense(self) -> Tensor:
        """Return Q diag(w) Qᵀ densely (symmetrised)."""
        memory.check(self.shape, self.dtype, "the dense form of a matrix given by its eigendecomposition")
        Q = self.vectors
        out = (Q * self.values) @ Q.T
        return 0.5 * (out + out.T)

    def _matmat(self, V: Tensor) -> Tensor:
        return self.vectors @ (self.values[:, None] * (self.vectors.T @ V))

    def _columns(self, j: int, k: int) -> Tensor:
        return self.vectors @ (self.values[:, None] * self.vectors[j:k].T)

    def diagonal(self) -> Tensor:
        """Return diag(C) = (Q∘Q) w, shape (P,)."""
        return (self.vectors**2) @ self.values

    def trace(self) -> Tensor:
        """Return tr C = Σ_i w_i."""
        return self.values.sum()

    def frobenius_norm(self) -> Tensor:
        """Return ‖C‖_F = ‖w‖₂."""
        return torch.linalg.vector_norm(self.values)

    def _scaled(self, alpha: float) -> CurvatureMatrix:
        return Spectral(alpha * self.values, self.vectors)

    # ---------------------------------------------------------------- damped solves
    def _shifted(self, damping: float) -> Tensor:
        d = self.values + damping
        scale = float(self.values.abs().max()) + damping if self.size else 0.0
        smallest = float(d.abs().min()) if self.size else 1.0
        tol = singular_tolerance(scale, self.size, self.dtype)
        if smallest <= tol:
            raise self.singular_error(damping, smallest, tolerance=tol)
        return d

    def _solve(self, V: Tensor, damping: float) -> Tensor:
        d = self._shifted(damping)
        return self.vectors @ ((self.vectors.T @ V) / d[:, None])

    def _inverse(self, damping: float) -> CurvatureMatrix:
        return Spectral(1.0 / self._shifted(damping), self.vectors)

    # ---------------------------------------------------------------- spectra
    def _eigh(self) -> Eigh:
        w, order = torch.sort(self.values)
        return Eigh(w, self.vectors[:, order])

    def _eigvalsh(self) -> Tensor:
        return torch.sort(self.values).values

    def _top_eigen(self, k: int) -> Eigh:
        w, order = torch.sort(self.values, descending=True)
        return Eigh(w[:k], self.vectors[:, order[:k]])

    # ---------------------------------------------------------------- structure hooks
    def _restrict(self, s: slice) -> CurvatureMatrix:
        """C[s, s] = Q[s] diag(w) Q[s]ᵀ, dense (|s|² entries)."""
        from curvlab.linalg.dense import Dense

        Qs = self.vectors[s]
        return Dense((Qs * self.values) @ Qs.T, symmetrize=True)

    def _inner(self, other: CurvatureMatrix) -> Tensor:
        """Return the Frobenius inner product ⟨C, B⟩_F with ``other``.

        ⟨C, B⟩_F = Σ_i w_i q_iᵀ B q_i (products of B with chunks of eigenvectors); Σ w_i w'_i for a
        Spectral B with the same eigenvectors.
        """
        if isinstance(other, Spectral) and other.vectors is self.vectors:
            return (self.values * other.values).sum()
        dtype = torch.promote_types(self.dtype, other.dtype)
        total = torch.zeros((), dtype=dtype, device=self.device)
        step = 256
        for j in range(0, self.size, step):
            X = self.vectors[:, j:j + step]
            quad = (X.to(dtype) * (other @ X).to(dtype)).sum(0)
            total = total + (self.values[j:j + step].to(dtype) * quad).sum()
        return total
