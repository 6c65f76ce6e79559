"""EKFAC: eigenvalue-corrected KFAC (George, Laurent, Bouthillier, Ballas & Vincent, NeurIPS 2018).

KFAC's eigenbasis Q = Q_A ⊗ Q_G is kept; its eigenvalues λ^G_i λ^A_j are replaced by the second
moments of the per-sample gradients projected on it,

    S*_ij = Σ_n Σ_k ((Q_Gᵀ V_nk Q_A)_ij)²,   V_nk = Σ_t g_nkt a_ntᵀ,

which is the Frobenius-optimal diagonal in that basis: ‖F − Q diag(S*) Qᵀ‖_F ≤ ‖F − KFAC‖_F, and
tr(EKFAC) = Σ S* = tr F exactly. The matrix is an
:class:`~curvlab.linalg.EigenKron`; its damping is the paper's (S* + λ in the eigenbasis, i.e. exact
Tikhonov damping), and it keeps KFAC's factor eigenvalues so the factored modes also apply.
"""

from __future__ import annotations

from curvlab.approx.base import OWN_MODES, Approximation, assemble
from curvlab.approx.factors import collect
from curvlab.approx.kfac import _options
from curvlab.approx.statistics import FAMILIES, one_batch
from curvlab.problem import Problem

__all__ = ["ekfac"]


def ekfac(prob: Problem, fisher: str = "type2", mc_samples: int = 1, seed: int = 0, approx: str = "expand",
          unsupported: str = "error") -> Approximation:
    """EKFAC: KFAC's eigenbasis with eigenvalues from per-sample gradients (``structure="eigen_kron"``).

    Same arguments as :func:`curvlab.approx.kfac` (the eigenbasis comes from KFAC with that
    ``fisher`` and ``approx``; S* always uses the true per-sample gradients, summed over positions).
    One forward and one batched backward pass; the per-sample gradients are projected, never stored
    in weight space (for layers without weight sharing S* is a single matrix product).
    """
    col = collect(prob, fisher, mc_samples, seed, approx, unsupported, method="ekfac")

    return assemble(col, one_batch("ekfac", approx), "ekfac", FAMILIES["ekfac"].structure, OWN_MODES["ekfac"],
                    _options(col, mc_samples, seed, unsupported))
