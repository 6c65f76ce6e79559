"""Naive reference implementations with plain ``torch.func``: slow, memory-hungry, obviously correct.

They share nothing with the oracle but :class:`~curvlab.Problem`'s parameter flattening and
loss, and are what the test-suite checks the oracle against and what the benchmarks time as
"the naive way":

* ``hessian``          double-backward autograd (``torch.autograd.functional.hessian``) of the
                        loss of the flat parameter vector. Not ``torch.func.hessian``: in torch
                        2.13 it returns a wrong, asymmetric Hessian through ``nn.LayerNorm``
                        (rows of the LayerNorm weight; relative error 4e-2 on a 47-parameter
                        net, where finite differences agree with double backward to 1e-10).
* ``ggn``              R Σ_n J_nᵀ Λ_n J_n with J_n from per-sample ``jacrev`` and Λ_n from
                        ``torch.func.hessian`` of the per-sample loss w.r.t. the output
* ``empirical_fisher`` R Σ_n ∇ℓ_n ∇ℓ_nᵀ from per-sample gradients (``vmap(grad)``)
* ``fisher_mc_from``   R Σ_n mean_s ∇ℓ_n(ŷ_s)∇ℓ_n(ŷ_s)ᵀ for given sampled labels ŷ
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import functional_call, grad, jacrev, vmap
from torch.func import hessian as _fhessian

from curvlab.problem import Problem

__all__ = ["hessian", "hessian_func", "ggn", "empirical_fisher", "fisher_mc_from", "per_sample_gradients",
           "output_jacobians"]


def _single_output(prob: Problem):
    def f1(theta: Tensor, x: Tensor) -> Tensor:
        return functional_call(prob.model, prob.params(theta), (x[None],))[0]

    return f1


def _per_sample_loss(prob: Problem):
    f1 = _single_output(prob)

    def ell(theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        return prob.likelihood.per_sample(f1(theta, x)[None], y[None])[0]

    return ell


def hessian(prob: Problem) -> Tensor:
    """∇²L by reverse-over-reverse autograd of L(θ) (θ flat), one row at a time."""
    return torch.autograd.functional.hessian(prob.loss_tensor, prob.theta.detach())


def hessian_func(prob: Problem) -> Tensor:
    """∇²L by ``torch.func.hessian`` (fast, but see the LayerNorm caveat above)."""
    return _fhessian(prob.loss_tensor)(prob.theta.detach())


def output_jacobians(prob: Problem) -> Tensor:
    """Per-sample output Jacobians J_n, shape (N, C, P) with C = outputs per sample (flattened)."""
    J = vmap(jacrev(_single_output(prob)), in_dims=(None, 0))(prob.theta.detach(), prob.X)
    return J.reshape(prob.num_samples, -1, prob.num_params)


def ggn(prob: Problem) -> Tensor:
    """R Σ_n J_nᵀ Λ_n J_n with Λ_n = ∇²_f ℓ_n by autodiff of the per-sample loss."""
    J = output_jacobians(prob)
    f = prob.output().detach()

    def ell(fn: Tensor, yn: Tensor) -> Tensor:
        return prob.likelihood.per_sample(fn[None], yn[None])[0]

    C = J.shape[1]
    Lam = vmap(_fhessian(ell))(f, prob.y).reshape(prob.num_samples, C, C)
    return prob.loss_scale * torch.einsum("nci,ncd,ndj->ij", J, Lam, J)


def per_sample_gradients(prob: Problem, y: Tensor | None = None) -> Tensor:
    """∇_θ ℓ_n for every sample, shape (N, P) (labels ``y``, default the data labels)."""
    y = prob.y if y is None else y
    return vmap(grad(_per_sample_loss(prob)), in_dims=(None, 0, 0))(prob.theta.detach(), prob.X, y)


def empirical_fisher(prob: Problem) -> Tensor:
    """R Σ_n ∇ℓ_n ∇ℓ_nᵀ."""
    G = per_sample_gradients(prob)
    return prob.loss_scale * G.T @ G


def fisher_mc_from(prob: Problem, labels: Tensor) -> Tensor:
    """R Σ_n mean_s ∇ℓ_n(ŷ_s)∇ℓ_n(ŷ_s)ᵀ for sampled labels of shape (S, N, …)."""
    total = torch.zeros(prob.num_params, prob.num_params, dtype=prob.dtype, device=prob.device)
    for ys in labels:
        G = per_sample_gradients(prob, ys)
        total += G.T @ G
    return prob.loss_scale * total / labels.shape[0]
