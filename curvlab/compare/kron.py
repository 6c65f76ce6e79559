"""Kronecker identities for the comparators: nothing here forms A ⊗ G densely.

A Kronecker block of one layer acts on the p×q matrix X = [W b] as X ↦ G X A; in the folded
row-major layout (see :mod:`curvlab.linalg.kron`) it is K_f = G ⊗ A, and in parameter order
K = K_f[π][:, π] for the layout's permutation π. Inner products are invariant under a common
permutation, so

    ⟨G ⊗ A, G' ⊗ A'⟩_F        = ⟨G, G'⟩_F ⟨A, A'⟩_F                               (two Kron)
    ⟨G ⊗ A, D⟩_F              = Σ_ijkl G_ij A_kl D̃_(ik),(jl) = ⟨G, R(D̃) A⟩     (Van Loan rearrangement;
                                 D̃ = D in the folded order, viewed as a p×q×p×q tensor)
    ⟨Q diag(S) Qᵀ, Q' diag(S') Q'ᵀ⟩ = Σ S_ij S'_i'j' (Q_Gᵀ Q'_G)²_ii' (Q_Aᵀ Q'_A)²_jj'  (two EigenKron,
                                 Q = Q_G ⊗ Q_A); the same basis gives ⟨S, S'⟩
    ⟨Q diag(S) Qᵀ, D⟩_F       = Σ_ij S_ij (Q_Gᵀ ⊗ Q_Aᵀ D̃ Q_G ⊗ Q_A)_(ij),(ij)  (rotate D̃ factor by factor)

The top-k eigenpairs of A ⊗ G are the k largest products λ^G_i λ^A_j with eigenvectors
q^G_i ⊗ q^A_j (only k columns are formed). :func:`factor_fraction_below` reports, per layer, the
share of each factor's eigenvalues that its own damping share (λ_A, λ_G) dominates — the quantity
that decides whether damping swamps a factor (papers.md §1.2, §1.4).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from curvlab.compare.matrices import register_inner
from curvlab.compare.spectra import register_top_eigen
from curvlab.linalg import BlockDiagonal, CurvatureMatrix, Dense, Eigh
from curvlab.linalg.kron import EigenKron, Kron, factor_damping

__all__ = ["factor_fraction_below", "kron_leaves"]


def _same_layout(a: Kron | EigenKron, b: Kron | EigenKron) -> bool:
    return (a.p, a.q, a.bias) == (b.p, b.q, b.bias)


def _folded(K: Kron | EigenKron, D: Tensor) -> Tensor:
    """D (parameter order) as the p×q×p×q tensor in K's folded layout."""
    if K.bias:
        inv = torch.argsort(K._perm())
        D = D[inv][:, inv]
    return D.reshape(K.p, K.q, K.p, K.q)


def _kron_dense_inner(K: Kron, D: Tensor) -> Tensor:
    """⟨G ⊗ A, D⟩ by the Van Loan rearrangement, on views of D (no permuted copy).

    With a folded bias the parameter order is [vec_r(W), b]: D splits into weight–weight,
    weight–bias and bias–bias parts, and A into its weight part A_ww, its bias column a_wb and
    its corner a_bb: ⟨K, D⟩ = Σ G_ij (A_ww)_kl D_ww[i,k,j,l] + 2 Σ G_ij (a_wb)_k D_wb[i,k,j]
    + a_bb Σ G_ij D_bb[i,j].
    """
    p, q = K.p, K.q
    if not K.bias:
        return torch.einsum("ij,ikjl,kl->", K.G, D.reshape(p, q, p, q), K.A)
    r, w = q - 1, p * (q - 1)
    Dww = D[:w, :w].reshape(p, r, p, r)
    Dwb = D[:w, w:].reshape(p, r, p)
    Dbb = D[w:, w:]
    out = torch.einsum("ij,ikjl,kl->", K.G, Dww, K.A[:r, :r])
    out = out + 2 * torch.einsum("ij,ikj,k->", K.G, Dwb, K.A[:r, r])
    return out + K.A[r, r] * (K.G * Dbb).sum()


def _eigen_of(K: CurvatureMatrix) -> EigenKron | None:
    if isinstance(K, Kron):
        return K.eigen()
    return K if isinstance(K, EigenKron) else None


@register_inner
def _kron_inner(A: CurvatureMatrix, B: CurvatureMatrix) -> Tensor | None:
    if isinstance(A, Kron) and isinstance(B, Kron) and _same_layout(A, B):
        return (A.A * B.A).sum() * (A.G * B.G).sum()
    if isinstance(A, Kron) and isinstance(B, Dense) and A.size == B.size:
        return _kron_dense_inner(A, B.matrix.to(A.dtype))
    ea, eb = _eigen_of(A), _eigen_of(B)
    if ea is not None and eb is not None and _same_layout(ea, eb):
        if ea._same_basis(eb):
            return (ea.S * eb.S).sum()
        MG = (ea.Q_G.T @ eb.Q_G) ** 2
        MA = (ea.Q_A.T @ eb.Q_A) ** 2
        return (ea.S * (MG @ eb.S @ MA.T)).sum()
    if isinstance(A, EigenKron) and isinstance(B, Dense) and A.size == B.size:
        D4 = _folded(A, B.matrix.to(A.dtype))
        # diag of (Q_G ⊗ Q_A)ᵀ D̃ (Q_G ⊗ Q_A), one factor at a time
        T = torch.einsum("ai,abcd->ibcd", A.Q_G, D4)
        T = torch.einsum("ci,ibcd->ibd", A.Q_G, T)
        T = torch.einsum("bj,ibd->ijd", A.Q_A, T)
        diag = torch.einsum("dj,ijd->ij", A.Q_A, T)
        return (A.S * diag).sum()
    return None


@register_top_eigen
def _kron_top(C: CurvatureMatrix, k: int) -> Eigh | None:
    E = _eigen_of(C)
    if E is None:
        return None
    w, idx = torch.topk(E.S.reshape(-1), k)
    i, j = idx // E.q, idx % E.q
    V = (E.Q_G[:, i][:, None, :] * E.Q_A[:, j][None, :, :]).reshape(E.p * E.q, k)  # folded order
    return Eigh(w, V[E._perm()])


def kron_leaves(C: CurvatureMatrix, prefix: str = "") -> Iterator[tuple[str, CurvatureMatrix]]:
    """(block name, leaf) for every leaf of a (nested) block-diagonal matrix."""
    if isinstance(C, BlockDiagonal):
        for name, b in zip(C.block_names, C.blocks):
            yield from kron_leaves(b, f"{prefix}.{name}" if prefix else name)
    else:
        yield prefix or "all", C


def _factor_eigenvalues(C: CurvatureMatrix) -> tuple[Tensor, Tensor] | None:
    if isinstance(C, Kron):
        (eA, _), (eG, _) = C.factor_eigh()
        return eA, eG
    if isinstance(C, EigenKron):
        return C.factor_eigenvalues
    return None


def factor_fraction_below(C: CurvatureMatrix, damping: float, mode: str = "pi") -> dict[str, tuple[float, float]]:
    """Per Kronecker leaf: (share of eig(A) below λ_A, share of eig(G) below λ_G).

    (λ_A, λ_G) is the factor damping of ``mode`` (``"pi"``: λ_A = π√λ, λ_G = √λ/π; ``"factored"``:
    √λ each; ``"trace"``: the trace-normalised split; see :func:`curvlab.linalg.kron.factor_damping`).
    Leaves without Kronecker factors are left out; top-level block names are used, nested leaves
    are named ``block.leaf``.
    """
    if not isinstance(C, CurvatureMatrix):
        raise TypeError(f"C must be a curvlab CurvatureMatrix; got {type(C).__name__}")
    out: dict[str, tuple[float, float]] = {}
    for name, leaf in kron_leaves(C):
        fe = _factor_eigenvalues(leaf)
        if fe is None:
            continue
        eA, eG = fe
        lam_A, lam_G = factor_damping(mode, damping, eA, eG)
        out[name] = (float((eA < lam_A).double().mean()), float((eG < lam_G).double().mean()))
    return out
