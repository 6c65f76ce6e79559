"""K-BFGS's passes as plain calls of the model.

One forward with hooks on its layers, one backward to the pre-activations.

:func:`curvlab.approx.kbfgs.kbfgs_statistics` goes through :func:`curvlab.capture.capture`, which
evaluates the model at a flat θ (``functional_call``) on a copied problem. Inside the optimizer the
model's own parameters already hold θ, so :func:`layer_pass` calls the model itself: hooks registered
on its ``nn.Linear`` / ``nn.Conv2d`` layers for the pass record each layer's input a and output z, and
one backward pass of the user's loss L = R Σ_n ℓ_n differentiates only those z (no parameter
gradients): g = ∇_z L. The statistics are then :func:`kbfgs_statistics`'s (the same per-layer
formulas: ∇W = Σ g aᵀ, ∇b = Σ g, h̄, z̄, ḡ, A), equal up to rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from curvlab.approx.kbfgs import KBFGSStatistics, _layer_statistics
from curvlab.capture import Records, layer_piece, model_holds_theta, recording
from curvlab.layers import structured_layers
from curvlab.problem import Problem

__all__ = ["layer_pass"]


def _recorded_call(model: nn.Module, X: Tensor, layers: dict[str, nn.Module]) -> tuple[Tensor, Records]:
    """Return f = model(X) with each layer's (input, output) recorded; hooks exist only during the call."""
    with recording(layers) as records, torch.enable_grad():
        f = model(X)
    return f, records


def layer_pass(prob: Problem, theta: Tensor, input_factors: bool = True,
               gradient: bool = True) -> KBFGSStatistics | None:
    """Return ``kbfgs_statistics(prob, theta, input_factors)`` for a model whose parameters hold θ.

    The statistics come from a plain forward and a backward pass to the pre-activations (see the
    module docstring). ``gradient=False`` leaves out the parameter gradient (``gradient`` is None):
    the pass after a K-BFGS step needs only the pairs' z̄ and ḡ.

    Returns None when the pass does not fit the layer structure (a layer not called exactly once on these
    data, or parameters outside the layers) or the model's parameters do not hold ``theta`` (checked):
    :func:`kbfgs_statistics` then applies, with its checks.
    """
    if not model_holds_theta(prob, theta):
        return None
    layers = structured_layers(prob)
    f, records = _recorded_call(prob.model, prob.X, layers)
    if any(len(r) != 1 for r in records.values()):
        return None
    loss = prob.likelihood.loss(f, prob.y)
    zs = [records[name][0][1] for name in layers]
    gzs = torch.autograd.grad(loss, zs, allow_unused=True)
    grad = torch.empty(prob.num_params, dtype=theta.dtype, device=theta.device) if gradient else None
    covered, stats = 0, {}
    for (name, m), z, gz in zip(layers.items(), zs, gzs):
        io = layer_piece(prob, name, m, records[name][0][0], (torch.zeros_like(z) if gz is None else gz)[None])
        params = {io.weight: m.weight.detach(), **({io.bias: m.bias.detach()} if io.bias else {})}
        st = _layer_statistics(io, params, 1.0, input_factors, grad)
        stats[st.name] = st
        covered += io.size
    if covered != prob.num_params:
        return None
    return KBFGSStatistics(theta, float(loss.detach()), grad, prob.num_samples, stats)
