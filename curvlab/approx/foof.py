"""FOOF: gradient descent on neurons (Benzing, ICML 2022).

Benzing, "Gradient Descent on Neurons and its Link to Approximate Second-Order Optimization";
also curvlinops' ``FisherType.FORWARD_ONLY``, ISAAC.

Take a gradient step on every sample's pre-activations, Δz_n = −η g_n, and find the weight change
that realises these changes best in least squares,

    min_ΔW Σ_n ‖ΔW a_n − Δz_n‖² + λ′‖ΔW‖²   ⇒   ΔW = −η ∇W (A + λI)⁻¹,

with A = 1/N Σ a aᵀ the KFAC input factor and λ = λ′/N. The preconditioner is
(A + λI) ⊗ I — KFAC with G replaced by the identity — so FOOF needs no backward statistics: one
forward pass collects A. The matrix is ``Kron(A, I)`` (``structure="forward_only"``), and its exact
damped solve (I⊗A + λI)⁻¹ = I ⊗ (A + λI)⁻¹ *is* FOOF's update, ΔW = ∇W (A + λI)⁻¹ (own mode
``"exact"``). Its scale is not that of a Fisher (G = I): compare it with scale-free measures.
"""

from __future__ import annotations

from curvlab.approx.base import OWN_MODES, Approximation, assemble
from curvlab.approx.factors import collect
from curvlab.approx.statistics import FAMILIES, one_batch
from curvlab.problem import Problem

__all__ = ["foof"]


def foof(prob: Problem, fisher: str | None = None, mc_samples: int = 1, seed: int = 0, approx: str = "expand",
         unsupported: str = "error") -> Approximation:
    """FOOF: (A + λI) ⊗ I per layer, from one forward pass (no backward pass).

    Takes the options of every approximator (:func:`curvlab.approx.kfac`), with these meanings:

    fisher:
        must be ``None``: FOOF has no output factor, so no Fisher type applies (any other value
        raises ``ValueError``). ``mc_samples`` and ``seed`` are checked but, as for KFAC with a
        non-Monte-Carlo Fisher, unused.
    approx:
        A for weight-sharing layers, as in :func:`curvlab.approx.kfac`.
    unsupported:
        ``"error"`` (default) raises, naming parameters outside ``nn.Linear``/``nn.Conv2d``.
        ``"exact"`` raises ``ValueError`` too: FOOF has no exact counterpart for such blocks. Its
        block of a layer z = W a is the Gauss-Newton matrix of the layer's own outputs with an
        identity output curvature, 1/N Σ_n J_nᵀJ_n = A ⊗ I (Benzing 2022: least-squares fit of
        the pre-activation changes), which the oracle does not provide for other modules; and the
        oracle's blocks (Hessian, GGN, Fisher) have the loss's scale, not FOOF's, so mixing them
        would make the relative step sizes of the blocks meaningless. Freeze such parameters
        (``requires_grad=False``) or use a method with an exact fallback (``kfac(prob,
        unsupported="exact")``).

    ``direction(g, λ)`` is −∇W (A + λI)⁻¹ for every layer.
    """
    if fisher is not None:
        raise ValueError(f"foof uses no Fisher (no output factor: its matrix is A ⊗ I); got fisher={fisher!r}, "
                         "leave it None")
    col = collect(prob, None, mc_samples, seed, approx=approx, unsupported=unsupported, method="foof")
    return assemble(col, one_batch("foof", approx), "foof", FAMILIES["foof"].structure, OWN_MODES["foof"],
                    {"approx": approx, "unsupported": unsupported})
