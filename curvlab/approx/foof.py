"""FOOF: gradient descent on neurons (Benzing, ICML 2022, "Gradient Descent on Neurons and its Link
to Approximate Second-Order Optimization"; also curvlinops' ``FisherType.FORWARD_ONLY``, ISAAC).

Take a gradient step on every sample's pre-activations, Δz_n = −η g_n, and find the weight change
that realises these changes best in least squares,

    min_ΔW Σ_n ‖ΔW a_n − Δz_n‖² + λ′‖ΔW‖²   ⇒   ΔW = −η ∇W (A + λI)⁻¹,

with A = 1/N Σ a aᵀ the KFAC input factor and λ = λ′/N (papers.md §1.2). The preconditioner is
(A + λI) ⊗ I — KFAC with G replaced by the identity — so FOOF needs no backward statistics: one
forward pass collects A. The matrix is ``Kron(A, I)`` (``structure="forward_only"``), and its exact
damped solve (I⊗A + λI)⁻¹ = I ⊗ (A + λI)⁻¹ *is* FOOF's update, ΔW = ∇W (A + λI)⁻¹ (own mode
``"exact"``). Its scale is not that of a Fisher (G = I): compare it with scale-free measures.
"""

from __future__ import annotations

import torch

from curvlab.approx.base import Approximation, assemble
from curvlab.approx.factors import KronPiece, collect
from curvlab.linalg.kron import Kron
from curvlab.problem import Problem

__all__ = ["foof"]


def foof(prob: Problem, approx: str = "expand") -> Approximation:
    """FOOF: (A + λI) ⊗ I per layer, from one forward pass (no backward pass).

    ``approx`` chooses A for weight-sharing layers as in :func:`curvlab.approx.kfac`. Parameters
    outside ``nn.Linear``/``nn.Conv2d`` raise (FOOF has no Fisher to take an exact block from).
    ``direction(g, λ)`` is −∇W (A + λI)⁻¹ for every layer.
    """
    col = collect(prob, None, approx=approx, unsupported="error", method="foof")

    def build(p: KronPiece) -> tuple[Kron, dict]:
        A = p.input_factor(approx)
        eye = torch.eye(p.d_out, dtype=A.dtype, device=A.device)
        return Kron(A, eye, bias=p.folded), {}

    return assemble(col, build, "foof", "forward_only", "exact", {"approx": approx})
