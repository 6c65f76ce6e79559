"""Update-direction agreement: whether the steps of different curvatures point the same way.

For a gradient g and a damping λ, method m gives a direction x_m: a CurvatureMatrix C_m gives
``C_m.direction(g, λ, mode)`` (``mode="exact"``: x = −(C_m + λI)⁻¹ g; other modes are the method's
own damping rule, e.g. KFAC's ``"pi"``), a callable gives ``f(g, λ)`` (e.g. SGD: −g, or a stateful
optimizer's next step). Then

    cosine[m, m']   = ⟨x_m, x_m'⟩ / (‖x_m‖ ‖x_m'‖)
    energy_error[m] = ‖x_m − x*‖_{C+λI} / ‖x*‖_{C+λI},  ‖v‖²_{C+λI} = vᵀ(C + λI)v,
                      x* = −(C + λI)⁻¹ g the exact damped step of the reference curvature C
                      (NaN when C + λI is not positive definite along the vectors involved)
    slope[m]        = gᵀ x_m                  (< 0: a descent direction)
    predicted[m]    = α gᵀx_m + ½ α² x_mᵀ M x_m, the change of the local quadratic model with
                      curvature M (default: the reference C) for the step α x_m
    actual[m]       = L(θ + α x_m) − L(θ)

The step size α is a given learning rate (``step=0.1``), ``"model"`` (the minimiser of the
quadratic model along x: α = −gᵀx / xᵀMx, or 1 where xᵀMx ≤ 0), or ``"armijo"`` (backtracking from
α = 1, halving until L(θ + αx) ≤ L(θ) + 10⁻⁴ α gᵀx; α = 1 is kept for a non-descent direction).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from curvlab.linalg import CurvatureMatrix

__all__ = ["DirectionComparison", "directions", "direction_of", "energy_norm", "step_size"]

DirectionFn = Callable[[Tensor, float], Tensor]
Method = CurvatureMatrix | DirectionFn


@dataclass(frozen=True)
class DirectionComparison:
    """The result of :func:`directions`; every array is indexed like ``names``."""

    names: list[str]
    directions: dict[str, Tensor]
    cosine: Tensor          # (M, M) pairwise cosines
    norm: Tensor            # (M,) ‖x_m‖
    slope: Tensor           # (M,) gᵀ x_m
    energy_error: Tensor    # (M,) relative error in the (C + λI)-norm against x* (NaN without reference)
    alpha: Tensor           # (M,) step sizes used
    predicted: Tensor       # (M,) quadratic-model change (NaN without a model)
    actual: Tensor          # (M,) actual loss change (NaN without a loss)
    reference: str | None
    damping: float

    def table(self) -> str:
        """Return a plain-text table of the per-method numbers."""
        head = f"{'method':<14}{'‖x‖':>11}{'gᵀx':>11}{'energy err':>12}{'α':>9}{'predicted':>12}{'actual':>12}"
        rows = [head]
        for i, n in enumerate(self.names):
            rows.append(f"{n:<14}{float(self.norm[i]):>11.3e}{float(self.slope[i]):>11.3e}"
                        f"{float(self.energy_error[i]):>12.3e}{float(self.alpha[i]):>9.3g}"
                        f"{float(self.predicted[i]):>12.3e}{float(self.actual[i]):>12.3e}")
        return "\n".join(rows)


def direction_of(method: Method, g: Tensor, damping: float, mode: str = "exact") -> Tensor:
    """Return the direction a method takes: ``C.direction(g, λ, mode)`` or ``f(g, λ)`` for a callable."""
    if isinstance(method, CurvatureMatrix):
        return method.direction(g, damping, mode=mode)
    if callable(method):
        x = method(g, damping)
        if not isinstance(x, Tensor) or x.shape != g.shape:
            raise ValueError(f"a direction callable must return a tensor of shape {tuple(g.shape)}; got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        return x
    raise TypeError(f"a method must be a CurvatureMatrix or a callable (g, damping) -> direction; got "
                    f"{type(method).__name__}")


def energy_norm(C: CurvatureMatrix, v: Tensor, damping: float = 0.0) -> float:
    """‖v‖_{C+λI} = sqrt(vᵀ(C + λI)v); NaN when the quadratic form is negative."""
    q = float(v @ (C @ v)) + damping * float(v @ v)
    return math.sqrt(q) if q >= 0 else math.nan


def step_size(step: float | str, x: Tensor, g: Tensor, model: CurvatureMatrix | None,
              loss: Callable[[Tensor], float] | None, loss0: float | None = None) -> float:
    """Return the step size α for direction x under the rule ``step`` (see the module docstring)."""
    if isinstance(step, (int, float)) and not isinstance(step, bool):
        if not math.isfinite(step):
            raise ValueError(f"a learning rate must be finite; got {step}")
        return float(step)
    slope = float(g @ x)
    if step == "model":
        if model is None:
            raise ValueError('step="model" needs a quadratic model: pass model= (or a reference matrix)')
        curv = float(x @ (model @ x))
        return -slope / curv if curv > 0 else 1.0
    if step == "armijo":
        if loss is None:
            raise ValueError('step="armijo" needs loss=, a callable d -> L(θ + d)')
        if slope >= 0:
            return 1.0
        f0 = loss(torch.zeros_like(x)) if loss0 is None else loss0
        alpha = 1.0
        for _ in range(50):
            f = loss(alpha * x)
            if math.isfinite(f) and f <= f0 + 1e-4 * alpha * slope:
                return alpha
            alpha *= 0.5
        return alpha
    raise ValueError(f'unknown step rule {step!r}: use a number (learning rate), "model" or "armijo"')


def directions(methods: Mapping[str, Method], g: Tensor, damping: float = 0.0, *,
               mode: str | Mapping[str, str] = "exact",
               reference: str | Tensor | None = None,
               metric: CurvatureMatrix | None = None,
               model: CurvatureMatrix | None = None,
               loss: Callable[[Tensor], float] | None = None,
               step: float | str = 1.0) -> DirectionComparison:
    """Compare the update directions of several methods for one gradient and damping.

    Parameters
    ----------
    methods:
        name → CurvatureMatrix or callable ``(g, damping) -> direction``.
    mode:
        damping rule passed to ``C.direction``: one string for every matrix, or name → mode
        (missing names use ``"exact"``, the exact (C + λI)⁻¹). Ignored for callables.
    reference:
        the name of a matrix method (x* = −(C + λI)⁻¹ g, exact damping whatever its mode) or a
        direction x* itself (then ``metric`` is required); None: no energy errors.
    metric:
        C of the energy norm (default: the reference matrix).
    model:
        curvature M of the quadratic model for ``predicted`` (default: the metric).
    loss:
        ``d -> L(θ + d)`` for the actual change (and for ``step="armijo"``).
    step:
        a learning rate, ``"model"`` or ``"armijo"`` (module docstring).
    """
    if not methods:
        raise ValueError("directions needs at least one method")
    if not isinstance(g, Tensor) or g.ndim != 1:
        raise ValueError(f"g must be a flat gradient vector (P,); got {getattr(g, 'shape', type(g).__name__)}")
    damping = float(damping)
    names = list(methods)
    modes = {n: (mode if isinstance(mode, str) else mode.get(n, "exact")) for n in names}
    xs = {n: direction_of(methods[n], g, damping, modes[n]).to(g.dtype) for n in names}

    ref_name: str | None = None
    x_star: Tensor | None = None
    if isinstance(reference, str):
        if reference not in methods:
            raise ValueError(f"reference {reference!r} is not one of the methods {names}")
        C = methods[reference]
        if not isinstance(C, CurvatureMatrix):
            raise ValueError(f"reference {reference!r} must be a CurvatureMatrix to define x* = −(C + λI)⁻¹ g")
        ref_name = reference
        x_star = -C.solve(g, damping)
        metric = C if metric is None else metric
    elif isinstance(reference, Tensor):
        if metric is None:
            raise ValueError("a direction given as reference needs metric=, the matrix C of the energy norm")
        x_star = reference.to(g.dtype)
    elif reference is not None:
        raise TypeError(f"reference must be a method name, a tensor or None; got {type(reference).__name__}")
    model = metric if model is None else model

    X = torch.stack([xs[n] for n in names])
    norms = torch.linalg.vector_norm(X, dim=1)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    U = X / safe[:, None]
    cos = U @ U.T
    zero = norms == 0
    cos[zero, :] = math.nan
    cos[:, zero] = math.nan
    slope = X @ g

    nan = torch.full((len(names),), math.nan, dtype=torch.float64)
    err, alpha, pred, act = nan.clone(), nan.clone(), nan.clone(), nan.clone()
    if x_star is not None and metric is not None:
        denom = energy_norm(metric, x_star, damping)
        for i, n in enumerate(names):
            num = energy_norm(metric, xs[n] - x_star, damping)
            err[i] = num / denom if denom > 0 else math.nan
    loss0 = loss(torch.zeros_like(g)) if loss is not None else None
    for i, n in enumerate(names):
        x = xs[n]
        a = step_size(step, x, g, model, loss, loss0)
        alpha[i] = a
        if model is not None:
            pred[i] = a * float(g @ x) + 0.5 * a * a * float(x @ (model @ x))
        if loss is not None:
            act[i] = loss(a * x) - loss0
    return DirectionComparison(names, xs, cos, norms, slope, err, alpha, pred, act, ref_name, damping)
