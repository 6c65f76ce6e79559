"""Spectral agreement: eigenvalue distributions, top-k eigenpairs and the overlap of eigenspaces.

For symmetric A (an approximation) and B (a reference) with eigenvalues λ_1 ≥ … ≥ λ_P:

    W1(A, B)          = ∫ |F_A(t) − F_B(t)| dt, F the empirical CDF of the eigenvalues; for equal
                        sizes W1 = (1/P) Σ_i |λ_i(A) − λ_i(B)| (both sorted)
    W1_log(A, B; λ)   = W1 of log10(max(λ_i, 0) + δ), δ = the damping λ if > 0, else 1e-12·max_i |λ_i(B)|
                        (the spectra of the damped matrices, on the scale where KFAC errors live)
    top_ratio_i       = λ_i(A) / λ_i(B), i = 1 … k
    overlap           = ‖U_Aᵀ U_B‖²_F / k = (1/k) Σ_i cos² θ_i, U the top-k eigenvectors (orthonormal
                        columns), θ_i the principal angles between the two k-dimensional eigenspaces
    fraction_below(C, λ) = #{i : λ_i(C) < λ} / P        (how much of C the damping swamps)
    negative_mass(H, G)  = Σ_{λ_i(H) < 0} |λ_i(H)| / tr(G)   (G a PSD reference such as the GGN;
                           without G: relative to Σ_i |λ_i(H)|)

Cost is dominated by linear algebra, so: full spectra come from each matrix's cached ``eigvalsh``
(structured matrices give them from their structure: per-block eigenvalues, products of Kronecker
factor eigenvalues); top-k eigenpairs come from :func:`top_eigen`, which reuses a cached ``eigh``,
works per block / per factor, and for a large unstructured matrix runs Lanczos (ARPACK ``eigsh``)
instead of a full ``eigh``. Results are cached per matrix.

Note: when λ_k = λ_{k+1} the top-k eigenspace is not unique and the overlap is not well defined.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from curvlab.linalg import DENSE_EIGH_LIMIT, CurvatureMatrix, Eigh

__all__ = ["eigenvalues", "top_eigen", "subspace_overlap", "wasserstein", "spectra", "SpectralComparison",
           "fraction_below", "negative_mass", "DENSE_EIGH_LIMIT"]

def _check_matrix(C: object, what: str) -> None:
    if not isinstance(C, CurvatureMatrix):
        raise TypeError(f"{what} must be a curvlab CurvatureMatrix; got {type(C).__name__}")


def _check_finite(x: float, what: str) -> float:
    try:
        x = float(x)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a number; got {x!r}") from None
    if not math.isfinite(x):
        raise ValueError(f"{what} must be finite; got {x}")
    return x


def eigenvalues(C: CurvatureMatrix, descending: bool = True) -> Tensor:
    """All eigenvalues of C (cached on C by ``eigvalsh``), largest first by default."""
    _check_matrix(C, "C")
    w = C.eigvalsh()
    return torch.flip(w, (0,)) if descending else w


def top_eigen(C: CurvatureMatrix, k: int) -> Eigh:
    """Return the k algebraically largest eigenpairs of C: values (k,) descending, vectors (P, k) orthonormal.

    ``C.top_eigen(k)``: computed once per (matrix, k) and cached; a cached full ``eigh``, the structure's
    own rule (per block, per Kronecker factor, from a low-rank Gram), a full ``eigh`` for small matrices,
    else Lanczos (ARPACK ``eigsh``) — see :class:`curvlab.linalg.CurvatureMatrix`.
    """
    _check_matrix(C, "C")
    return C.top_eigen(k)


def subspace_overlap(U: Tensor, V: Tensor) -> tuple[float, Tensor]:
    """Overlap of span(U) and span(V), U, V (P, k) with orthonormal columns.

    Returns (mean squared cosine, cosines): the cosines cos θ_i of the principal angles are the
    singular values of UᵀV (descending); the mean squared cosine ‖UᵀV‖²_F / k is 1 for the same
    subspace and 0 for orthogonal ones.
    """
    if U.ndim != 2 or V.ndim != 2 or U.shape != V.shape:
        raise ValueError(f"U and V must both be (P, k); got {tuple(U.shape)} and {tuple(V.shape)}")
    dtype = torch.promote_types(U.dtype, V.dtype)
    M = U.to(dtype).T @ V.to(dtype)
    cos = torch.clamp(torch.linalg.svdvals(M), 0.0, 1.0)
    return float((M**2).sum()) / U.shape[1], cos


def wasserstein(a: Tensor, b: Tensor) -> float:
    """W1 distance between the empirical distributions of the values in a and in b."""
    a = a.detach().to(torch.float64).cpu().flatten()
    b = b.detach().to(torch.float64).cpu().flatten()
    if a.numel() == b.numel():
        return float((torch.sort(a).values - torch.sort(b).values).abs().mean())
    from scipy.stats import wasserstein_distance

    return float(wasserstein_distance(a.numpy(), b.numpy()))


def _log_spectrum(w: Tensor, delta: float) -> Tensor:
    return torch.log10(torch.clamp(w.to(torch.float64), min=0.0) + delta)


@dataclass(frozen=True)
class SpectralComparison:
    """The result of :func:`spectra` (A the approximation, B the reference; eigenvalues descending)."""

    eig_a: Tensor                 # all eigenvalues of A (or its top k when full=False)
    eig_b: Tensor
    wasserstein: float            # W1 between the eigenvalue distributions (NaN when full=False)
    wasserstein_log: float        # W1 on log10(max(λ,0) + δ)
    top_ratio: Tensor             # (k,) λ_i(A) / λ_i(B)
    overlap: float                # mean squared cosine of the principal angles of the top-k eigenspaces
    principal_cosines: Tensor     # (k,) cos θ_i, descending
    k: int


def spectra(A: CurvatureMatrix, B: CurvatureMatrix, k: int = 10, full: bool = True,
            damping: float = 0.0) -> SpectralComparison:
    """Compare the spectra of A (approximation) and B (reference); see the module docstring.

    ``full=True`` computes every eigenvalue of both (cached; structured where possible) for the
    Wasserstein distances; ``full=False`` only the top ``k`` eigenpairs (Lanczos for large dense
    matrices) and the Wasserstein fields are NaN.
    """
    _check_matrix(A, "A")
    _check_matrix(B, "B")
    if A.size != B.size:
        raise ValueError(f"cannot compare spectra of sizes {A.size} and {B.size}")
    damping = _check_finite(damping, "damping")
    k = min(int(k), A.size)
    ta, tb = top_eigen(A, k), top_eigen(B, k)
    overlap, cos = subspace_overlap(ta.vectors, tb.vectors)
    ratio = ta.values.to(torch.float64) / tb.values.to(torch.float64)
    if full:
        ea, eb = eigenvalues(A), eigenvalues(B)
        w1 = wasserstein(ea, eb)
        delta = float(damping) if damping > 0 else 1e-12 * float(eb.abs().max())
        if delta <= 0:
            delta = 1e-300
        w1_log = wasserstein(_log_spectrum(ea, delta), _log_spectrum(eb, delta))
    else:
        ea, eb, w1, w1_log = ta.values, tb.values, math.nan, math.nan
    return SpectralComparison(ea, eb, w1, w1_log, ratio, overlap, cos, k)


def fraction_below(C: CurvatureMatrix, damping: float) -> float:
    """#{i : λ_i(C) < λ} / P: the share of C's spectrum that a damping λ dominates."""
    _check_matrix(C, "C")
    damping = _check_finite(damping, "damping")
    w = C.eigvalsh()
    return float((w < damping).sum()) / w.numel()


def negative_mass(H: CurvatureMatrix, reference: CurvatureMatrix | None = None) -> float:
    """Σ_{λ_i(H)<0} |λ_i(H)| / tr(reference), or / Σ_i |λ_i(H)| without a reference.

    With the GGN as reference (PSD, so tr = Σ|λ|) this is the negative-curvature mass of the
    Hessian relative to the GGN's total curvature. Eigenvalues above −P·ε·max|λ| (ε the dtype's
    machine epsilon) are rounding noise of zero and do not count.
    """
    _check_matrix(H, "H")
    if reference is not None:
        _check_matrix(reference, "reference")
    w = H.eigvalsh().to(torch.float64)
    tol = w.numel() * torch.finfo(H.dtype).eps * float(w.abs().max()) if w.numel() else 0.0
    neg = float(w[w < -tol].abs().sum())
    denom = float(reference.trace()) if reference is not None else float(w.abs().sum())
    return neg / denom if denom != 0 else math.nan
