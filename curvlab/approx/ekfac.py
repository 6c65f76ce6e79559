"""EKFAC: eigenvalue-corrected KFAC (George, Laurent, Bouthillier, Ballas & Vincent, NeurIPS 2018).

KFAC's eigenbasis Q = Q_A ⊗ Q_G is kept; its eigenvalues λ^G_i λ^A_j are replaced by the second
moments of the per-sample gradients projected on it,

    S*_ij = Σ_n Σ_k ((Q_Gᵀ V_nk Q_A)_ij)²,   V_nk = Σ_t g_nkt a_ntᵀ,

which is the Frobenius-optimal diagonal in that basis: ‖F − Q diag(S*) Qᵀ‖_F ≤ ‖F − KFAC‖_F, and
tr(EKFAC) = Σ S* = tr F exactly (``shared/reference/papers.md`` §2.2). The matrix is an
:class:`~curvlab.linalg.EigenKron`; its damping is the paper's (S* + λ in the eigenbasis, i.e. exact
Tikhonov damping), and it keeps KFAC's factor eigenvalues so the factored modes also apply.
"""

from __future__ import annotations

from curvlab.approx.base import OWN_MODES, Approximation, assemble
from curvlab.approx.factors import KronPiece, collect
from curvlab.approx.kfac import _options, kron_block
from curvlab.linalg.kron import EigenKron
from curvlab.problem import Problem

__all__ = ["ekfac", "eigen_corrected"]


def eigen_corrected(piece: KronPiece, approx: str, trace_factors: bool = False) -> tuple[EigenKron, float]:
    """A piece's EKFAC block and the TKFAC trace factor c = tr F / (tr A tr G) of its KFAC factors.

    The block keeps the factor eigenvalues (λ_A, λ_G) for the factored damping modes; with
    ``trace_factors`` (TEKFAC) they are TKFAC's, (λ_A, c λ_G), whose Kronecker product has the
    exact block's trace.
    """
    K = kron_block(piece, approx)
    (eA, QA), (eG, QG) = K.factor_eigh()
    S = piece.eigen_second_moments(QA, QG)  # Σ S = tr F
    denom = float(eA.sum() * eG.sum())
    c = float(S.sum()) / denom if denom > 0 else 1.0
    return EigenKron(QA, QG, S, piece.folded, (eA, c * eG if trace_factors else eG)), c


def ekfac(prob: Problem, fisher: str = "type2", mc_samples: int = 1, seed: int = 0, approx: str = "expand",
          unsupported: str = "error") -> Approximation:
    """EKFAC: KFAC's eigenbasis with eigenvalues from per-sample gradients (``structure="eigen_kron"``).

    Same arguments as :func:`curvlab.approx.kfac` (the eigenbasis comes from KFAC with that
    ``fisher`` and ``approx``; S* always uses the true per-sample gradients, summed over positions).
    One forward and one batched backward pass; the per-sample gradients are projected, never stored
    in weight space (for layers without weight sharing S* is a single matrix product).
    """
    col = collect(prob, fisher, mc_samples, seed, approx, unsupported, method="ekfac")

    def build(p: KronPiece) -> tuple[EigenKron, dict[str, float]]:
        E, c = eigen_corrected(p, approx)
        return E, {"kfac_trace_ratio": 1.0 / c if c else float("inf")}

    return assemble(col, build, "ekfac", "eigen_kron", OWN_MODES["ekfac"], _options(col, mc_samples, seed, unsupported))
