"""Matrix-free products with the exact curvature matrices, for networks too large to densify.

All take V of shape (P,) or (P, m) and vmap over the columns:

* ``hvp``           ∇²L V                        (forward-over-reverse: jvp of grad)
* ``ggn_vp``        R Jᵀ Λ J V                   (jvp → closed-form loss Hessian → vjp)
* ``ef_vp``         R Σ_n ∇ℓ_n (∇ℓ_nᵀ V)          (jvp → project on r_n = ∇_f ℓ_n → vjp)
* ``fisher_mc_vp``  R Σ_n mean_s r_ns (r_nsᵀ J_n V) with r_ns the gradient at sampled labels

Same scale conventions as the dense oracle (``curvlab.losses``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp, vmap

from curvlab.capture import sampled_output_grads
from curvlab.linalg import MatrixFree
from curvlab.linalg.base import as_vectors
from curvlab.problem import Problem

__all__ = ["hvp", "ggn_vp", "ef_vp", "fisher_mc_vp", "operator"]


def _checked(prob: Problem, theta: Tensor | None) -> Tensor:
    """The parameter vector to evaluate at (``prob.theta`` for None), after checking the arguments."""
    if not isinstance(prob, Problem):
        raise TypeError(f"expected a curvlab.Problem; got {type(prob).__name__}")
    return prob.check_theta(theta)


def _batched(fn: Callable[[Tensor], Tensor], prob: Problem, V: Tensor) -> Tensor:
    M, one = as_vectors(V, prob.num_params, prob.dtype, prob.device, "V")
    out = vmap(fn, in_dims=1, out_dims=1)(M)
    return out[:, 0] if one else out


def _hvp_fn(prob: Problem, theta: Tensor) -> Callable[[Tensor], Tensor]:
    g = grad(prob.loss_tensor)
    return lambda v: jvp(g, (theta,), (v,))[1]


def _output_space_fn(prob: Problem, theta: Tensor,
                     apply: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """v ↦ R Jᵀ apply(f, J v): every Fisher-type product, with the output-space action ``apply``."""
    f, pullback = vjp(prob.output, theta)
    f = f.detach()
    R = prob.loss_scale

    def mv(v: Tensor) -> Tensor:
        _, Jv = jvp(prob.output, (theta,), (v,))
        return R * pullback(apply(f, Jv))[0]

    return mv


def _apply_cotangents(U: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """Λ = Σ_k U_k U_kᵀ per sample, applied to J v."""
    def apply(_f: Tensor, Jv: Tensor) -> Tensor:
        dims = tuple(range(2, U.ndim))
        s = (U * Jv[None]).sum(dim=dims, keepdim=True)  # (k, N, 1, …)
        return (U * s).sum(0)

    return apply


def hvp(prob: Problem, V: Tensor, theta: Tensor | None = None) -> Tensor:
    """∇²L(θ) V."""
    theta = _checked(prob, theta)
    return _batched(_hvp_fn(prob, theta), prob, V)


def ggn_vp(prob: Problem, V: Tensor, theta: Tensor | None = None) -> Tensor:
    """G V = R Σ_n J_nᵀ ∇²_f ℓ_n J_n V."""
    theta = _checked(prob, theta)
    return _batched(_output_space_fn(prob, theta, prob.likelihood.hvp_output), prob, V)


def ef_vp(prob: Problem, V: Tensor, theta: Tensor | None = None) -> Tensor:
    """EF V = R Σ_n ∇ℓ_n ∇ℓ_nᵀ V (data labels)."""
    theta = _checked(prob, theta)
    with torch.no_grad():
        r = prob.likelihood.grad_output(prob.output(theta), prob.y)
    return _batched(_output_space_fn(prob, theta, _apply_cotangents(r[None])), prob, V)


def fisher_mc_vp(prob: Problem, V: Tensor, samples: int = 1, seed: int = 0, theta: Tensor | None = None) -> Tensor:
    """F_MC V = R Σ_n mean_s ∇ℓ_n(ŷ_s) ∇ℓ_n(ŷ_s)ᵀ V with the same draws as ``exact.fisher_mc``."""
    theta = _checked(prob, theta)
    with torch.no_grad():
        U = sampled_output_grads(prob, prob.output(theta), samples, seed) / samples**0.5
    return _batched(_output_space_fn(prob, theta, _apply_cotangents(U)), prob, V)


def operator(prob: Problem, kind: str, theta: Tensor | None = None, samples: int = 1, seed: int = 0,
             chunk: int = 64) -> MatrixFree:
    """The exact curvature ``kind`` as a matrix-free CurvatureMatrix (products only)."""
    theta = _checked(prob, theta)
    if kind == "hessian":
        fn = _hvp_fn(prob, theta)
    elif kind == "ggn":
        fn = _output_space_fn(prob, theta, prob.likelihood.hvp_output)
    elif kind == "empirical_fisher":
        with torch.no_grad():
            r = prob.likelihood.grad_output(prob.output(theta), prob.y)
        fn = _output_space_fn(prob, theta, _apply_cotangents(r[None]))
    elif kind == "fisher_mc":
        with torch.no_grad():
            U = sampled_output_grads(prob, prob.output(theta), samples, seed) / samples**0.5
        fn = _output_space_fn(prob, theta, _apply_cotangents(U))
    else:
        raise ValueError(f"unknown curvature kind {kind!r}")
    batched = vmap(fn, in_dims=1, out_dims=1)
    return MatrixFree(prob.num_params, batched, prob.dtype, prob.device, chunk=chunk, name=kind)
