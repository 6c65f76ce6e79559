"""KFAC: Kronecker-factored approximate curvature (Martens & Grosse 2015).

Weight sharing: Grosse & Martens 2016 for convolutions, Eschenhagen et al. 2023 for expand/reduce.

Each layer's block of the Fisher/GGN, F = Σ_n Σ_k vec(V_nk) vec(V_nk)ᵀ with per-sample weight
gradients V_nk = Σ_t g_nkt a_ntᵀ, is approximated by a single Kronecker product

    F ≈ A ⊗ G,   A = E[a aᵀ]  (input factor),   G = Σ g gᵀ  (output-gradient factor),

with the scales of ``curvlab.approx.factors`` (curvlinops' conventions), chosen so that A ⊗ G is
the exact block whenever the per-sample output-gradient second moments or the inputs do not vary
across samples (a single sample, identical inputs, a deep linear network with squared error).
"""

from __future__ import annotations

from typing import Any

from curvlab.approx.base import OWN_MODES, Approximation, assemble
from curvlab.approx.factors import Collection, collect
from curvlab.approx.statistics import FAMILIES, one_batch
from curvlab.problem import Problem

__all__ = ["kfac"]


def _options(col: Collection, mc_samples: int, seed: int, unsupported: str) -> dict[str, Any]:
    opts: dict[str, Any] = {"fisher": col.fisher, "approx": col.approx, "unsupported": unsupported}
    if col.fisher == "mc":
        opts.update(mc_samples=mc_samples, seed=seed)
    return opts


def kfac(prob: Problem, fisher: str = "type2", mc_samples: int = 1, seed: int = 0, approx: str = "expand",
         unsupported: str = "error") -> Approximation:
    """KFAC: one Kronecker product A ⊗ G per layer (``structure="kron"``).

    Parameters
    ----------
    prob:
        the problem; every trainable parameter must belong to an ``nn.Linear`` or ``nn.Conv2d``
        (groups=1) applied once per forward pass, unless ``unsupported="exact"``.
    fisher:
        the curvature approximated (``curvlab.vocabulary``): ``"ggn"`` (also ``"type2"``): G from the
        columns of a symmetric factor of the loss Hessian (the exact expectation over the model's
        predictive distribution; one backward pass per column, all batched); ``"fisher_mc"`` (``"mc"``):
        from ``mc_samples`` labels sampled from the model (``seed``); ``"empirical_fisher"``
        (``"empirical"``, ``"ef"``): from the data labels.
    approx:
        weight sharing (inputs with extra dimensions, convolution patches): ``"expand"`` treats
        the T positions as extra samples, A = 1/(NT) Σ a aᵀ, G = Σ_{n,t} g gᵀ; ``"reduce"`` pools
        them first, A = 1/N Σ ā āᵀ (ā: mean over positions), G = Σ_n ḡ ḡᵀ (ḡ: sum).
    unsupported:
        ``"error"`` (default) raises, naming parameters of other module types; ``"exact"`` takes
        the partition blocks that contain them from the oracle's exact block (same Fisher type).

    Returns an :class:`~curvlab.approx.Approximation` aligned with ``prob.partition`` whose own
    damping rule (``direction(g, λ, mode="own")``) is Martens & Grosse's π-damping; the exact
    (C + λI)⁻¹ is ``mode="exact"``, factored damping ``mode="factored"``.
    """
    col = collect(prob, fisher, mc_samples, seed, approx, unsupported, method="kfac")
    return assemble(col, one_batch("kfac", approx), "kfac", FAMILIES["kfac"].structure, OWN_MODES["kfac"],
                    _options(col, mc_samples, seed, unsupported))
