"""TKFAC and TEKFAC: trace-restricted Kronecker factorisations.

Gao et al., AAAI 2021, arXiv 2011.10741; Gao et al., arXiv 2011.13609.

**TKFAC** keeps the trace of each exact block: F ≈ c · A ⊗ G with

    c = tr F / (tr A · tr G),   tr F = Σ_n Σ_k ‖V_nk‖²_F   (per-sample gradient norms),

i.e. δ P ⊗ Q with P = A/tr A, Q = G/tr G and δ = tr F (the normalisation is not stated in the
abstract, which is all that could be checked; any split of δ gives the same matrix). KFAC is c = 1
(its trace is tr A tr G = E‖a‖²E‖g‖², wrong whenever ‖a‖ and ‖g‖
are correlated across samples). Stored as ``Kron(A, c·G)``. Its own damping (``mode="trace"``) is
the trace-normalised factored damping δ⁻¹(P + μI)⁻¹ ⊗ (Q + μI)⁻¹ with μ = √(λ/δ) — the natural
"TKFAC_nor" rule; the paper's conv-specific "new damping" is not public and is not implemented.

**TEKFAC** (provisional). The TEKFAC paper's exact eigenvalue and damping rules could not be
checked (only its abstract was available). EKFAC is already trace-exact (Σ S* = tr F), so TEKFAC's difference
from EKFAC can only lie in its damping. curvlab therefore defines TEKFAC *provisionally* as EKFAC's
eigenvalues S* in KFAC's eigenbasis with TKFAC's damping: in the eigenbasis

    S*_ij + λ + √(λδ) (p_j + q_i),   p = λ_A / tr A,  q = λ_G / tr G,  δ = tr F,

which is TKFAC's damped matrix δ(P + μI) ⊗ (Q + μI) with its Kronecker term replaced by S*. The
matrix itself equals EKFAC; only ``mode="own"`` (= ``"trace"``) differs. Replace this definition
when the paper's rule is known.
"""

from __future__ import annotations

from curvlab.approx.base import OWN_MODES, Approximation, assemble
from curvlab.approx.factors import collect
from curvlab.approx.kfac import _options
from curvlab.approx.statistics import FAMILIES, one_batch
from curvlab.problem import Problem

__all__ = ["tkfac", "tekfac"]


def tkfac(prob: Problem, fisher: str = "type2", mc_samples: int = 1, seed: int = 0, approx: str = "expand",
          unsupported: str = "error") -> Approximation:
    """TKFAC: c · A ⊗ G with c such that the trace equals the exact block's (``structure="trace_kron"``).

    Same arguments as :func:`curvlab.approx.kfac`. ``info[block]["c"]`` holds each layer's c.
    Own damping: ``mode="trace"`` (see the module docstring); all Kron modes are available.
    """
    col = collect(prob, fisher, mc_samples, seed, approx, unsupported, method="tkfac")
    return assemble(col, one_batch("tkfac", approx), "tkfac", FAMILIES["tkfac"].structure, OWN_MODES["tkfac"],
                    _options(col, mc_samples, seed, unsupported))


def tekfac(prob: Problem, fisher: str = "type2", mc_samples: int = 1, seed: int = 0, approx: str = "expand",
           unsupported: str = "error") -> Approximation:
    """TEKFAC (provisional definition): EKFAC's eigenvalues with TKFAC's trace-normalised damping.

    The paper's exact rule is not available; see the module docstring for the definition used.
    The matrix equals :func:`curvlab.approx.ekfac`'s; ``direction(g, λ, mode="own")`` adds
    λ + √(λ tr F)(p_j + q_i) to S*_ij. Same arguments as :func:`curvlab.approx.kfac`.
    """
    col = collect(prob, fisher, mc_samples, seed, approx, unsupported, method="tekfac")
    opts = _options(col, mc_samples, seed, unsupported)
    opts["provisional"] = True
    return assemble(col, one_batch("tekfac", approx), "tekfac", FAMILIES["tekfac"].structure, OWN_MODES["tekfac"],
                    opts)
