"""Matrix-free products with the exact curvature matrices, for networks too large to densify.

All take V of shape (P,) or (P, m) and vmap over the columns:

* ``hvp``           ∇²L V                        (forward-over-reverse: jvp of grad)
* ``ggn_vp``        R Jᵀ Λ J V                   (jvp → closed-form loss Hessian → vjp)
* ``ef_vp``         R Σ_n ∇ℓ_n (∇ℓ_nᵀ V)          (jvp → project on r_n = ∇_f ℓ_n → vjp; or per position)
* ``fisher_mc_vp``  R Σ_n mean_s r_ns (r_nsᵀ J_n V) with r_ns the gradient at sampled labels

Same scale conventions as the dense oracle (``curvlab.losses``).

Forward mode is the fast way to J V, but not every operation has a forward-mode derivative
(``nn.MultiheadAttention``'s fused attention kernel on CPU has none, nor a custom
``autograd.Function`` without ``jvp``). So the way is decided once per problem by trial runs on
two samples (cached on ``prob.structure_cache``, :func:`jvp_path`, :func:`hvp_path`) and falls
back to reverse mode:

* J V: ``"forward"`` (``jvp``) → ``"double_vjp"`` (J v = ∂/∂u ⟨Jᵀu, v⟩, the vjp of the vjp,
  needs double backward) → ``"rows"`` (the per-sample Jacobians J_n from vector-Jacobian
  products, stored: N·(outputs)·P numbers, first derivatives only);
* ∇²L V: ``"forward_over_reverse"`` → ``"reverse_over_reverse"`` (the vjp of ∇L: H is
  symmetric); without second derivatives there is no Hessian, and the error says which module
  refused and what to use instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp, vmap

from curvlab import memory
from curvlab.capture import AutodiffPath, Trial, autodiff_path, output_cotangents, per_sample_jacobian_rows
from curvlab.linalg import MatrixFree
from curvlab.linalg.base import as_vectors
from curvlab.problem import Problem

__all__ = ["hvp", "ggn_vp", "ef_vp", "fisher_mc_vp", "operator", "jvp_path", "hvp_path", "hessian_unavailable"]


def _checked(prob: Problem, theta: Tensor | None) -> Tensor:
    """Return the parameter vector to evaluate at (``prob.theta`` for None), after checking the arguments."""
    if not isinstance(prob, Problem):
        raise TypeError(f"expected a curvlab.Problem; got {type(prob).__name__}")
    return prob.check_theta(theta)


def _batched(fn: Callable[[Tensor], Tensor], prob: Problem, V: Tensor) -> Tensor:
    M, one = as_vectors(V, prob.num_params, prob.dtype, prob.device, "V")
    out = vmap(fn, in_dims=1, out_dims=1)(M)
    return out[:, 0] if one else out


# ---------------------------------------------------------------------------------------- paths
def _trial_slice(prob: Problem) -> tuple[Tensor, Tensor]:
    return prob.X[:2], prob.y[:2]


def jvp_path(prob: Problem) -> AutodiffPath:
    """How J v is computed for this model: ``"forward"``, ``"double_vjp"`` or ``"rows"`` (cached)."""
    def trials() -> list[Trial]:
        X, _ = _trial_slice(prob)
        th = prob.theta

        def out(t: Tensor) -> Tensor:
            return prob.output(t, X)

        def double_vjp() -> Tensor:
            f, pullback = vjp(out, th)
            _, pb2 = vjp(lambda u: pullback(u)[0], torch.zeros_like(f))
            return pb2(torch.ones_like(th))[0]

        # explicit rows need first derivatives only (capture.rows_path checks those when they are built)
        return [("forward", lambda: jvp(out, (th,), (torch.ones_like(th),))), ("double_vjp", double_vjp),
                ("rows", lambda: None)]

    return autodiff_path(prob, "autodiff.jvp", trials)


def hvp_path(prob: Problem) -> AutodiffPath:
    """How ∇²L v is computed: ``"forward_over_reverse"``, ``"reverse_over_reverse"`` or None (cached)."""
    def trials() -> list[Trial]:
        X, y = _trial_slice(prob)
        th = prob.theta
        g = grad(lambda t: prob.loss_tensor(t, X, y))
        v = torch.ones_like(th)
        return [("forward_over_reverse", lambda: jvp(g, (th,), (v,))),
                ("reverse_over_reverse", lambda: vjp(g, th)[1](v))]

    return autodiff_path(prob, "autodiff.hvp", trials)


def hessian_unavailable(prob: Problem, structure: str) -> str | None:
    """Why the exact Hessian in ``structure`` cannot be computed for this model (None: it can).

    The dense, block and diagonal Hessians use forward-over-reverse products; the operator
    falls back to reverse-over-reverse ones.
    """
    verdict = hvp_path(prob)
    if verdict.path == "forward_over_reverse" or (verdict.path and structure == "operator"):
        return None
    model = type(prob.model).__name__
    if verdict.path == "reverse_over_reverse":
        return (f"the {structure!r} Hessian of model {model} needs forward-mode derivatives, which torch lacks "
                f"for {verdict.module()} ({verdict.reasons()}); use cl.exact.hessian(prob, structure='operator') "
                "(reverse-over-reverse products; its .to_dense() is the full matrix)")
    hint = ""
    if "scaled_dot_product" in verdict.reasons():
        hint = ("; or compute it under `with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):` "
                "(the math attention kernel is twice differentiable), or call the attention with need_weights=True")
    return (f"the Hessian of model {model} needs second derivatives, and torch implements neither forward mode "
            f"nor double backward for {verdict.module()} ({verdict.reasons()}); use cl.exact.ggn, fisher_mc or "
            f"empirical_fisher, which need first derivatives only{hint}")


def _hvp_fn(prob: Problem, theta: Tensor) -> Callable[[Tensor], Tensor]:
    why = hessian_unavailable(prob, "operator")
    if why:
        raise ValueError(why)
    g = grad(prob.loss_tensor)
    if hvp_path(prob).path == "forward_over_reverse":
        return lambda v: jvp(g, (theta,), (v,))[1]
    _, pullback = vjp(g, theta)
    return lambda v: pullback(v)[0]


def _explicit_jacobian(prob: Problem, theta: Tensor) -> Tensor:
    """Return the per-sample output Jacobians as rows, (D, N, P) with D = outputs per sample."""
    d = prob.num_outputs
    memory.check((d, prob.num_samples, prob.num_params), prob.dtype, "the per-sample Jacobians (reverse-mode J v)",
                 "the model has neither forward-mode derivatives nor double backward "
                 "(curvlab.exact.products.jvp_path(prob).reasons()), so J v needs the stored Jacobians: "
                 "use fewer samples (prob.subset)")
    eye = torch.eye(d, dtype=prob.dtype, device=prob.device)
    E = eye[:, None, :].expand(d, prob.num_samples, d).reshape(d, prob.num_samples, *prob.output_shape)
    rows = per_sample_jacobian_rows(prob, theta, prob.param_names, E)
    return torch.cat([rows[n].reshape(d, prob.num_samples, -1) for n in prob.param_names], dim=2)


def _jvp_fn(prob: Problem, theta: Tensor, path: str | None, pullback: Callable, f: Tensor,
            J: Tensor | None) -> Callable[[Tensor], Tensor]:
    """Return v ↦ J v (shape of the output) by the model's :func:`jvp_path`."""
    if path == "forward":
        return lambda v: jvp(prob.output, (theta,), (v,))[1]
    if path == "double_vjp":
        _, pb2 = vjp(lambda u: pullback(u)[0], torch.zeros_like(f))
        return lambda v: pb2(v)[0]
    return lambda v: torch.einsum("dnp,p->nd", J, v).reshape(f.shape)


def _output_space_fn(prob: Problem, theta: Tensor,
                     apply: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """Return v ↦ R Jᵀ apply(f, J v): every Fisher-type product, with the output-space action ``apply``."""
    path = jvp_path(prob).path
    # explicit rows first: where reverse mode itself fails, their construction says so clearly
    J = _explicit_jacobian(prob, theta) if path == "rows" else None
    f, pullback = vjp(prob.output, theta)
    f = f.detach()
    R = prob.loss_scale
    jv = _jvp_fn(prob, theta, path, pullback, f, J)

    def mv(v: Tensor) -> Tensor:
        return R * pullback(apply(f, jv(v)))[0]

    return mv


def _apply_cotangents(U: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """Λ = Σ_k U_k U_kᵀ per sample, applied to J v."""
    def apply(_f: Tensor, Jv: Tensor) -> Tensor:
        dims = tuple(range(2, U.ndim))
        s = (U * Jv[None]).sum(dim=dims, keepdim=True)  # (k, N, 1, …)
        return (U * s).sum(0)

    return apply


def _per_position_apply(prob: Problem, r: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """Return the output-space action J v ↦ Σ_t r_t (r_tᵀ J v) per sample.

    r_t = ∇_f ℓ_nt on position t alone: r ⊙ ⟨r, J v⟩ over the feature axis, without forming the T
    per-position cotangents.
    """
    axis = prob.likelihood.feature_axis if r.ndim > 1 else None

    def apply(_f: Tensor, Jv: Tensor) -> Tensor:
        s = r * Jv
        return r * (s if axis is None else s.sum(dim=axis, keepdim=True))

    return apply


def _fisher_apply(prob: Problem, theta: Tensor, kind: str, samples: int = 1, seed: int = 0,
                  per: str = "sample") -> Callable[[Tensor, Tensor], Tensor]:
    """Return the output-space action of a Fisher-type kind: J v ↦ Λ J v.

    Λ = Σ_k u_k u_kᵀ per sample for the (unscaled: R is applied once, in :func:`_output_space_fn`)
    cotangents of ``capture.output_cotangents``.
    """
    if kind == "ggn":
        return prob.likelihood.hvp_output
    if kind == "empirical_fisher" and per == "position":
        with torch.no_grad():
            return _per_position_apply(prob, prob.likelihood.grad_output(prob.output(theta), prob.y))
    fisher = {"empirical_fisher": "empirical", "fisher_mc": "mc"}[kind]
    cotangents = output_cotangents(prob, fisher, samples, seed, per)
    with torch.no_grad():
        U = cotangents(prob.output(theta)) / prob.loss_scale**0.5
    return _apply_cotangents(U)


def hvp(prob: Problem, V: Tensor, theta: Tensor | None = None) -> Tensor:
    """∇²L(θ) V."""
    theta = _checked(prob, theta)
    return _batched(_hvp_fn(prob, theta), prob, V)


def ggn_vp(prob: Problem, V: Tensor, theta: Tensor | None = None) -> Tensor:
    """G V = R Σ_n J_nᵀ ∇²_f ℓ_n J_n V."""
    theta = _checked(prob, theta)
    return _batched(_output_space_fn(prob, theta, _fisher_apply(prob, theta, "ggn")), prob, V)


def ef_vp(prob: Problem, V: Tensor, theta: Tensor | None = None, per: str = "sample") -> Tensor:
    """Return the empirical-Fisher product EF V = R Σ_n ∇ℓ_n ∇ℓ_nᵀ V (data labels).

    ``per="position"``: R Σ_n Σ_t ∇ℓ_nt ∇ℓ_ntᵀ V (see ``cl.exact.empirical_fisher``).
    """
    theta = _checked(prob, theta)
    apply = _fisher_apply(prob, theta, "empirical_fisher", per=per)
    return _batched(_output_space_fn(prob, theta, apply), prob, V)


def fisher_mc_vp(prob: Problem, V: Tensor, samples: int = 1, seed: int = 0, theta: Tensor | None = None) -> Tensor:
    """F_MC V = R Σ_n mean_s ∇ℓ_n(ŷ_s) ∇ℓ_n(ŷ_s)ᵀ V with the same draws as ``exact.fisher_mc``."""
    theta = _checked(prob, theta)
    apply = _fisher_apply(prob, theta, "fisher_mc", samples, seed)
    return _batched(_output_space_fn(prob, theta, apply), prob, V)


def operator(prob: Problem, kind: str, theta: Tensor | None = None, samples: int = 1, seed: int = 0,
             chunk: int = 64, per: str = "sample") -> MatrixFree:
    """Return the exact curvature ``kind`` as a matrix-free CurvatureMatrix (products only)."""
    theta = _checked(prob, theta)
    if kind == "hessian":
        fn = _hvp_fn(prob, theta)
    elif kind in ("ggn", "empirical_fisher", "fisher_mc"):
        fn = _output_space_fn(prob, theta, _fisher_apply(prob, theta, kind, samples, seed, per))
    else:
        raise ValueError(f"unknown curvature kind {kind!r}")
    batched = vmap(fn, in_dims=1, out_dims=1)
    return MatrixFree(prob.num_params, batched, prob.dtype, prob.device, chunk=chunk, name=kind)
