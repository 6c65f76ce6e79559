"""KFOC: the Frobenius-optimal single Kronecker product of each exact block (Van Loan & Pitsianis 1993).

For curvature: Schnaus et al. 2021, Koroko et al. 2022; curvlinops' ``KFOCLinearOperator``.

For a layer block F (bias folded, rows and columns indexed (output o, input i)), the Van Loan
rearrangement R(F)[(o,o'), (i,i')] = F[(o,i), (o',i')] turns Kronecker products into rank-one
matrices: ‖F − A ⊗ G‖_F = ‖R(F) − vec(G) vec(A)ᵀ‖_F. The best Kronecker product is therefore
given by the top singular pair σ, u, v of R(F): G ∝ mat(u), A ∝ mat(v), σ = ‖A‖_F‖G‖_F — the
best any Kronecker method (KFAC, TKFAC, KFOC) can do for that block.

Without weight sharing R(F) is never formed. With per-sample gradients V_nk = g_nkᵀ a_n
(g_nk: T×p, a_n: T×q),

    R(F) vec(X) = vec(Σ_nk g_nkᵀ (a_n X a_nᵀ) g_nk),    R(F)ᵀ vec(Y) = vec(Σ_nk a_nᵀ (g_nk Y g_nkᵀ) a_n),

so each product costs O(N k T² (p + q)) (O(N k (p² + q²)) without weight sharing). The top pair is
found by subspace iteration on R(F)ᵀR(F), started from KFAC's A (usually already close). For a
weight-sharing layer (T > 1) whose explicit per-sample gradients are cheaper than T×T Gram
matrices and whose block fits 64 MiB, F is formed once from them (one GEMM) and the top pair comes
from the eigendecomposition of the smaller of R Rᵀ (p²×p²) and RᵀR (q²×q²), without iterating. The split
of σ between the factors is fixed so that tr A equals KFAC's tr A (the Kronecker product does not
depend on it; π-damping neither).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from curvlab.approx.base import OWN_MODES, Approximation, assemble
from curvlab.approx.factors import KronPiece, _chunks, collect
from curvlab.approx.kfac import _options
from curvlab.linalg.kron import Kron
from curvlab.problem import Problem

__all__ = ["kfoc", "rearranged_products"]

_DENSE_BYTES = 64 * 2**20  # form a weight-sharing layer's block explicitly up to this size


def rearranged_products(piece: KronPiece) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """(R, Rᵀ): batched products with the rearranged exact block, X (r, q, q) → (r, p, p) and back."""
    a, g = piece.inputs(), piece.grads  # (N, T, q), (k, N, T, p)
    k, n, t, p = g.shape
    q = a.shape[-1]
    if t == 1:
        a1, g1 = a[:, 0], g[:, :, 0]

        def R(X: Tensor) -> Tensor:
            z = torch.einsum("ni,rij,nj->rn", a1, X, a1)
            return torch.einsum("knp,rn,kno->rpo", g1, z, g1)

        def Rt(Y: Tensor) -> Tensor:
            w = torch.einsum("knp,rpo,kno->rn", g1, Y, g1)
            return torch.einsum("ni,rn,nj->rij", a1, w, a1)

        return R, Rt

    def R(X: Tensor) -> Tensor:
        out = X.new_zeros(X.shape[0], p, p)
        for s, e in _chunks(n, (X.shape[0] + k) * t * t * a.element_size()):
            Z = torch.einsum("nti,rij,nsj->rnts", a[s:e], X, a[s:e])
            out += torch.einsum("kntp,rnts,knso->rpo", g[:, s:e], Z, g[:, s:e])
        return out

    def Rt(Y: Tensor) -> Tensor:
        out = Y.new_zeros(Y.shape[0], q, q)
        for s, e in _chunks(n, (Y.shape[0] + k) * t * t * a.element_size()):
            W = torch.einsum("kntp,rpo,knso->rnts", g[:, s:e], Y, g[:, s:e])
            out += torch.einsum("nti,rnts,nsj->rij", a[s:e], W, a[s:e])
        return out

    return R, Rt


def _finish(v: Tensor, u: Tensor, info: dict) -> tuple[Tensor, Tensor, dict]:
    """Symmetrise, fix the sign (positive traces), record σ = ‖u‖_F."""
    v, u = 0.5 * (v + v.T), 0.5 * (u + u.T)
    if float(u.diagonal().sum()) < 0:
        u, v = -u, -v
    info["sigma"] = float(torch.linalg.matrix_norm(u))
    return v, u, info


def _top_pair_dense(piece: KronPiece) -> tuple[Tensor, Tensor, dict]:
    """Top singular pair from the explicit block F = Σ vec(V_nk)vec(V_nk)ᵀ, rearranged (weight sharing).

    One GEMM over the per-sample gradients (as cheap as a single power iteration when T is large),
    then the eigendecomposition of the smaller Gram matrix R Rᵀ (p²×p²) or RᵀR (q²×q²).
    """
    p, q = piece.d_out, piece.d_in
    a = piece.io.a
    F = torch.zeros(p * q, p * q, dtype=a.dtype, device=a.device)
    for s, e in piece.per_sample_chunks():
        X = piece.per_sample_gradients(s, e).reshape(-1, p * q)
        F.addmm_(X.T, X)
    R = F.reshape(p, q, p, q).permute(0, 2, 1, 3).reshape(p * p, q * q)
    if p * p <= q * q:
        w, U = torch.linalg.eigh(R @ R.T)
        u = U[:, -1]
        v = R.T @ u
        v = v / torch.linalg.vector_norm(v).clamp_min(torch.finfo(a.dtype).tiny)
    else:
        w, U = torch.linalg.eigh(R.T @ R)
        v = U[:, -1]
    u = R @ v
    return _finish(v.reshape(q, q), u.reshape(p, p), {"method": "dense", "converged": True})


def _top_pair(piece: KronPiece, A0: Tensor, tol: float, max_iter: int, seed: int = 0) -> tuple[Tensor, Tensor, dict]:
    """Top singular pair of R(F) by subspace iteration on RᵀR, started from A0."""
    if piece.explicit_is_cheaper and piece.size**2 * A0.element_size() <= _DENSE_BYTES:
        return _top_pair_dense(piece)
    R, Rt = rearranged_products(piece)
    q = A0.shape[0]
    r = min(4, q * q)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    X = torch.randn(r, q, q, generator=gen, dtype=A0.dtype).to(A0.device)
    X = X + X.transpose(1, 2)
    X[0] = A0
    info = {"iterations": 0, "converged": False}
    for it in range(1, max_iter + 1):
        Qm, _ = torch.linalg.qr(X.reshape(r, -1).T)  # (q², r) orthonormal
        X = Qm.T.reshape(r, q, q)
        Y = Rt(R(X)).reshape(r, -1)  # (RᵀR) X
        H = Qm.T @ Y.T  # Rayleigh quotient (r, r)
        w, U = torch.linalg.eigh(0.5 * (H + H.T))
        order = torch.argsort(w, descending=True)
        w, U = w[order], U[:, order]
        X = (Y.T @ U).T.reshape(r, q, q)  # next block, Ritz-rotated
        v = (Qm @ U[:, 0]).reshape(q, q)
        sigma2 = float(w[0])
        resid = float(torch.linalg.vector_norm(Y.T @ U[:, 0] - sigma2 * v.reshape(-1)))
        info.update(iterations=it, residual=resid / max(sigma2, 1e-300))
        if sigma2 <= 0:
            info["converged"] = True
            break
        if resid <= tol * sigma2:
            info["converged"] = True
            break
    v = 0.5 * (v + v.T)
    v = v / torch.linalg.matrix_norm(v)
    info["method"] = "subspace iteration"
    return _finish(v, R(v[None])[0], info)  # R v = σ mat(u₁), ‖R v‖_F = σ


def kfoc(prob: Problem, fisher: str = "type2", mc_samples: int = 1, seed: int = 0, approx: str = "expand",
         unsupported: str = "error", tol: float | None = None, max_iter: int = 500) -> Approximation:
    """KFOC: per layer, the Kronecker product A ⊗ G closest to the exact block in Frobenius norm.

    ``fisher``, ``mc_samples``, ``seed`` and ``unsupported`` as in :func:`curvlab.approx.kfac`
    (the exact block is that of the same Fisher type). Weight sharing needs no expand/reduce
    approximation, since the exact block is used: ``approx`` only chooses which KFAC input factor
    starts the iteration and fixes the split of σ between the factors (tr A = tr A of KFAC with
    that ``approx``), which leaves A ⊗ G unchanged and matters only for the factored and π
    damping modes. ``tol`` bounds the relative residual ‖RᵀRv − σ²v‖/σ² of the top singular
    vector (default 1e-10 in float64, 1e-4 in float32); a warning is issued when ``max_iter``
    iterations do not reach it. ``info[block]`` holds σ, iterations and the residual.
    """
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < 1):
        raise ValueError(f"tol must be a number in (0, 1) or None; got {tol!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer; got {max_iter!r}")
    col = collect(prob, fisher, mc_samples, seed, approx, unsupported, method="kfoc")
    if tol is None:
        tol = 1e-10 if prob.dtype == torch.float64 else 1e-4

    def build(p: KronPiece) -> tuple[Kron, dict]:
        A0 = p.input_factor(approx)
        v, u, info = _top_pair(p, A0, tol, max_iter)
        tr_v, tr_A0 = float(v.diagonal().sum()), float(A0.diagonal().sum())
        s = tr_A0 / tr_v if tr_v > 0 and tr_A0 > 0 else 1.0
        if not info["converged"]:
            warnings.warn(f"kfoc: the top singular pair of block {p.name!r} did not converge in {max_iter} "
                          f"iterations (relative residual {info.get('residual', float('nan')):.2e})",
                          RuntimeWarning, stacklevel=3)
        return Kron(s * v, u / s, bias=p.folded), info

    return assemble(col, build, "kfoc", "kron", OWN_MODES["kfoc"], _options(col, mc_samples, seed, unsupported))
