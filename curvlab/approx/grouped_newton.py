"""GroupedNewton: order-2 and order-3 summaries of the loss over a partition, and per-subset learning rates.

Wolinski (2023–2025), "Gathering and Exploiting Higher-Order Information when Training Large Structured
Models" (arXiv 2312.03885, ECML PKDD 2025; v1 "Adapting Newton's Method to Neural Networks through a
Summary of Higher-Order Derivatives"). The parameters θ ∈ R^P are split into S subsets T_1..T_S and a
direction u (the update a base optimiser proposes) moves subset i by its own step size η_i:

    θ⁺ = θ − U I_{P:S} η,   i.e.   θ⁺_{T_i} = θ_{T_i} − η_i u_{T_i},

so that along this S-dimensional family

    L(θ⁺) ≈ L(θ) − ḡᵀη + ½ ηᵀH̄η + …,   ḡ_i = g_{T_i}ᵀ u_{T_i},   H̄_ij = u_{T_i}ᵀ H_{T_i T_j} u_{T_j},

and the diagonal order-3 term is D⁽³⁾_iii = Σ_{p,q,r ∈ T_i} ∂³L/∂θ_p∂θ_q∂θ_r u_p u_q u_r. The full
order-3 tensor D_ijk = Σ_{p∈T_i, q∈T_j, r∈T_k} ∂³L u_p u_q u_r is available on request.

Computation (as ``compute_Hg`` in the authors' code, github.com/p-wol/GroupedNewton, package
``grnewt``): one forward pass, the gradient with ``create_graph``, the S scalars ḡ_i; for each subset
one backward pass of ḡ_i contracted with u gives row i of H̄, and one more backward pass of H̄_ii
contracted with u_{T_i} gives D⁽³⁾_iii — 1 + 2S backward passes, no P×P matrix. Here the derivatives
are taken with respect to the flat θ, so each backward pass yields the whole row of H̄ (grnewt
differentiates only w.r.t. the subsets j ≥ i and mirrors that upper triangle); the returned H̄ is
(H̄ + H̄ᵀ)/2, equal to either triangle in exact arithmetic.

Learning rates (:func:`cubic_learning_rates`): the minimiser of the anisotropic cubic-regularised model

    m(η) = −ḡᵀη + ½ ηᵀH̄η + (λ_int/6) ‖Dη‖³,   D = Diag(|D⁽³⁾_iii|^{1/3}),

from its stationarity condition η = (H̄ + (λ_int/2) r D²)⁻¹ ḡ with r = ‖Dη‖, i.e. a root of the
secular function f(r) = ‖D (H̄ + (λ_int/2) r D²)⁻¹ ḡ‖ − r on [r₀, r₁], found by Brent's method
(``scipy.optimize.root_scalar``). On r > r₀ the matrix M(r) = H̄ + (λ_int/2) r D² is positive definite
and f is strictly decreasing, so the root there is unique and it is the stationary point of largest
‖Dη‖ — the global minimiser of m when D is nonsingular (Nesterov & Polyak's condition M(r) ⪰ 0).
The bracket and every fallback follow ``grnewt/nesterov.py`` (``nesterov_lrs``, ``compute_x0``):

* r₀ = 0 if H̄ ≻ 0 (all eigenvalues > 0); otherwise, if every entry of D exceeds ``d_threshold``
  (1e-5, grnewt's ``threshold_D_sing``), r₀ = (2/λ_int)·|λ_min(D⁻¹H̄D⁻¹)|, the largest r where M(r) is
  singular; otherwise ("D singular") r₀ is the root of λ_min(M(r)) found numerically on [0, 3^k].
  If λ_min(M(r)) stops increasing before turning positive (negative curvature where D vanishes),
  there is no r₀: status ``"no_r0"`` and η = 0 (grnewt: ``found = False``).
* r₁ = (r₀ + 1)·3^k for the first k with f(r₁) < 0 (grnewt loops without a bound; here at most
  ``max_expansions`` times, else status ``"no_bracket"`` and η = 0).
* f(r₀) ≤ 0 when H̄ is not PD (ḡ orthogonal to the most negative curvature, the trust-region "hard
  case") or a Brent run that does not converge: status ``"no_root"`` and η = 0 (grnewt: η = 0 for
  that refresh). When H̄ ≻ 0, f(0) = ‖DH̄⁻¹ḡ‖ ≥ 0 and f(0) = 0 means r = 0 solves it: η = H̄⁻¹ḡ
  (this covers D = 0, e.g. a quadratic loss; grnewt reports "not found" there, since it asks f(r₀) > 0).
  Where M(r₀) cannot be solved (exactly singular), r₀ is nudged up by a relative 1e-12 … 1e-3, as
  grnewt multiplies it by 1.001.
* λ_int = 0: η = H̄⁻¹ḡ (Newton on the summary) if H̄ ≻ 0, else ``ValueError`` (grnewt raises too).
* ``ridge`` ρ ≥ 0 replaces H̄ by H̄ + ρI throughout, i.e. adds ρ‖η‖²/2 to m (grnewt's ``ridge`` option,
  used there for the order-2 rule η = (H̄ + ρI)⁻¹ḡ). An order-2 summary has no D, so it accepts only
  λ_int = 0 (its default), optionally with a ridge.

A subset on which u vanishes identically has ḡ_i = 0, a zero row and column of H̄ and D⁽³⁾_iii = 0; its
learning rate does not change the step. It is left out of the solve and gets η_i = 0 (reported by
``LearningRates.active``); grnewt would pass the singular H̄ to the solver.

Invariance (Wolinski): under θ_{T_s} = α_s φ_{T_s} + β_s with u built from gradients in φ, the summaries
become AH̄A, Aḡ, AD with A = Diag(α_s²), so η′ = A⁻¹η and r is unchanged: the θ-steps are identical.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from curvlab import memory
from curvlab.problem import Block, Problem

__all__ = ["grouped_newton", "GroupedSummary", "LearningRates", "cubic_learning_rates", "PARTITIONS",
           "STATUSES", "MAX_THIRD_FULL_SUBSETS"]

#: the named partitions (plus the aliases "per_tensor" → canonical, "module" → layer, "all" → trivial)
PARTITIONS = ("canonical", "layer", "trivial", "wb", "scalar")
_ALIASES = {"per_tensor": "canonical", "module": "layer", "all": "trivial"}
#: the outcomes of :func:`cubic_learning_rates`; the first two are solutions, the others give η = 0
STATUSES = ("newton", "cubic", "zero_direction", "no_r0", "no_bracket", "no_root")
#: the largest S for which :attr:`GroupedSummary.third_full` is computed (S(S+1)/2 + S backward passes)
MAX_THIRD_FULL_SUBSETS = 64


# ---------------------------------------------------------------------------------------------- partitions
def _is_component(name: str, suffix: str) -> bool:
    """``name`` is ``suffix`` or ends with ``.suffix`` (grnewt's ``partition.check``)."""
    return name == suffix or name.endswith("." + suffix)


def _named_groups(prob: Problem, kind: str) -> list[tuple[str, list[str]]]:
    names = prob.param_names
    if kind == "canonical":
        return [(n, [n]) for n in names]
    if kind == "trivial":
        return [("all", list(names))]
    if kind == "layer":
        owners: dict[str, list[str]] = {}
        for n in names:
            owners.setdefault(n.rsplit(".", 1)[0] if "." in n else "(root)", []).append(n)
        return list(owners.items())
    weights = [n for n in names if _is_component(n, "weight")]
    biases = [n for n in names if n not in weights and _is_component(n, "bias")]
    rest = [n for n in names if n not in weights and n not in biases]
    return [(k, v) for k, v in (("weight", weights), ("bias", biases), ("other", rest)) if v]


def _custom_groups(prob: Problem, spec: Iterable[Any]) -> list[tuple[str, list[str]]]:
    groups = []
    for i, item in enumerate(spec):
        if isinstance(item, Block):
            groups.append((item.name, list(item.params)))
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and not isinstance(item[1], str):
            groups.append((item[0], list(item[1])))
        elif isinstance(item, str):
            groups.append((item, [item]))
        elif isinstance(item, Iterable):
            groups.append((f"subset{i}", list(item)))
        else:
            raise TypeError(f"partition entry {i} must be a list of parameter names, a (name, [names]) pair "
                            f"or a parameter name; got {type(item).__name__} {item!r}")
    flat = [p for _, ps in groups for p in ps]
    unknown = [p for p in flat if p not in prob.param_slices]
    if unknown:
        raise ValueError(f"partition names unknown parameters {unknown}; parameters are {prob.param_names}")
    twice = sorted({p for p in flat if flat.count(p) > 1})
    missing = [p for p in prob.param_names if p not in flat]
    if twice or missing:
        raise ValueError(f"a partition must list every trainable parameter exactly once; listed twice: {twice}, "
                         f"missing: {missing}")
    return groups


def _subsets(prob: Problem, spec: Any) -> tuple[str, list[str], list[tuple[str, ...]], Tensor]:
    """(kind, subset names, parameter names per subset, subset index of every coordinate of θ)."""
    if isinstance(spec, str):
        kind = _ALIASES.get(spec, spec)
        if kind not in PARTITIONS:
            raise ValueError(f"unknown partition {spec!r}: use one of {PARTITIONS}, an alias in "
                             f"{sorted(_ALIASES)}, or a sequence of parameter-name lists")
        if kind == "scalar":
            return _scalar_subsets(prob)
        groups = _named_groups(prob, kind)
    elif isinstance(spec, Iterable):
        kind, groups = "custom", _custom_groups(prob, spec)
    else:
        raise TypeError(f"partition must be one of {PARTITIONS} or a sequence of parameter-name lists; "
                        f"got {type(spec).__name__} {spec!r}")
    names = [g for g, _ in groups]
    if len(set(names)) != len(names):
        raise ValueError(f"subset names must be distinct; got {names}")
    empty = [g for g, ps in groups if not ps]
    if empty:
        raise ValueError(f"partition subsets {empty} are empty")
    group = torch.empty(prob.num_params, dtype=torch.long, device=prob.device)
    for i, (_, ps) in enumerate(groups):
        for p in ps:
            group[prob.param_slices[p]] = i
    return kind, names, [tuple(ps) for _, ps in groups], group


def _scalar_subsets(prob: Problem) -> tuple[str, list[str], list[tuple[str, ...]], Tensor]:
    """One subset per scalar parameter (S = P), named ``"param[k]"`` with k the row-major index."""
    names, params = [], []
    for n, size in zip(prob.param_names, prob.param_sizes):
        names += [f"{n}[{k}]" for k in range(size)]
        params += [(n,)] * size
    return "scalar", names, params, torch.arange(prob.num_params, device=prob.device)


# ---------------------------------------------------------------------------------------------- derivatives
def _segment_sum(v: Tensor, group: Tensor, num: int) -> Tensor:
    """(Σ_{p ∈ T_i} v_p)_i, differentiable."""
    return torch.zeros(num, dtype=v.dtype, device=v.device).index_add(0, group, v)


def _contracted_derivative(scalar: Tensor, theta: Tensor, u: Tensor, group: Tensor, num: int,
                           create_graph: bool) -> Tensor:
    """(Σ_{p ∈ T_j} ∂scalar/∂θ_p u_p)_j: one backward pass; zeros when ``scalar`` is constant in θ."""
    if not scalar.requires_grad:
        return torch.zeros(num, dtype=u.dtype, device=u.device)
    (d,) = torch.autograd.grad(scalar, theta, retain_graph=True, create_graph=create_graph, allow_unused=True,
                               materialize_grads=True)
    return _segment_sum(d * u, group, num)


def _forward(prob: Problem, theta: Tensor, u: Tensor, group: Tensor, num: int) -> tuple[Tensor, Tensor]:
    """θ as a fresh leaf and ḡ (S,) with its graph kept for differentiating again."""
    leaf = theta.detach().clone().requires_grad_(True)
    loss = prob.loss_tensor(leaf)
    if not bool(torch.isfinite(loss)):
        raise ValueError(f"the loss is not finite at theta (L = {float(loss)}): no summary exists there")
    (g,) = torch.autograd.grad(loss, leaf, create_graph=True)
    return leaf, _segment_sum(g * u, group, num)


def _summaries(prob: Problem, theta: Tensor, u: Tensor, group: Tensor, active: Tensor,
               order: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """H̄ (S×S), ḡ (S,) and, for order 3, D⁽³⁾_iii (S,) from 1 + 2S backward passes."""
    num = active.numel()
    H = torch.zeros(num, num, dtype=prob.dtype, device=prob.device)
    third = torch.zeros(num, dtype=prob.dtype, device=prob.device) if order == 3 else None
    with torch.enable_grad():
        leaf, gbar = _forward(prob, theta, u, group, num)
        for i in active.nonzero().flatten().tolist():
            row = _contracted_derivative(gbar[i], leaf, u, group, num, create_graph=order == 3)
            H[i] = row.detach()
            if third is not None:
                third[i] = _contracted_derivative(row[i], leaf, u, group, num, create_graph=False)[i]
    return (H + H.T) / 2, gbar.detach(), third


def _third_full(prob: Problem, theta: Tensor, u: Tensor, group: Tensor, active: Tensor) -> Tensor:
    """D_ijk for i ≤ j from the derivative of H̄_ij along u_{T_k}; D_jik filled by symmetry in (i, j)."""
    num = active.numel()
    T = torch.zeros(num, num, num, dtype=prob.dtype, device=prob.device)
    on = active.nonzero().flatten().tolist()
    with torch.enable_grad():
        leaf, gbar = _forward(prob, theta, u, group, num)
        for i in on:
            row = _contracted_derivative(gbar[i], leaf, u, group, num, create_graph=True)
            for j in (j for j in on if j >= i):
                T[i, j] = _contracted_derivative(row[j], leaf, u, group, num, create_graph=False)
                T[j, i] = T[i, j]
    return T


def _check_direction(prob: Problem, direction: Any) -> Tensor:
    if isinstance(direction, Mapping):
        direction = prob.flatten(direction)
    if not isinstance(direction, Tensor):
        raise TypeError(f"direction must be a flat tensor of shape ({prob.num_params},) (or a dict of tensors "
                        f"by parameter name); got {type(direction).__name__}")
    if direction.shape != (prob.num_params,):
        raise ValueError(f"direction must have shape ({prob.num_params},) in the problem's parameter order; "
                         f"got {tuple(direction.shape)}")
    if not torch.is_floating_point(direction):
        raise TypeError(f"direction must be a floating-point tensor; got {direction.dtype}")
    if not bool(torch.isfinite(direction).all()):
        k = int((~torch.isfinite(direction)).nonzero()[0])
        raise ValueError(f"direction contains NaN or inf (first at index {k}: {direction[k].item()})")
    return direction.detach().to(dtype=prob.dtype, device=prob.device)


# ---------------------------------------------------------------------------------------------- the summary
class GroupedSummary:
    """Wolinski's order-2 and order-3 summaries of L at θ along a direction u, over a partition.

    Attributes
    ----------
    hessian:
        H̄ (S×S), H̄_ij = u_{T_i}ᵀ H_{T_i T_j} u_{T_j}.
    gradient:
        ḡ (S,), ḡ_i = g_{T_i}ᵀ u_{T_i}.
    third:
        D⁽³⁾_iii (S,), the third derivative of L along u_{T_i} (signed); ``None`` for ``order=2``.
    subsets:
        the S subset names; ``subset_params`` the parameter tensors each one touches.
    partition:
        the partition kind: ``"canonical"``, ``"layer"``, ``"trivial"``, ``"wb"``, ``"scalar"``, ``"custom"``.
    subset_of:
        (P,) long tensor, the subset index of every coordinate of θ; ``indices`` the flat θ indices per subset.
    active:
        (S,) bool, whether u is nonzero somewhere on the subset (inactive subsets have zero rows).
    direction, theta, order:
        what it was computed from.
    """

    def __init__(self, prob: Problem, theta: Tensor, direction: Tensor, order: int, partition: str,
                 subsets: Sequence[str], subset_params: Sequence[tuple[str, ...]], subset_of: Tensor) -> None:
        self.problem = prob
        self.theta = theta.detach()
        self.direction = direction
        self.order = order
        self.partition = partition
        self.subsets: tuple[str, ...] = tuple(subsets)
        self.subset_params: tuple[tuple[str, ...], ...] = tuple(subset_params)
        self.subset_of = subset_of
        num = len(self.subsets)
        self.active: Tensor = _segment_sum((direction != 0).to(prob.dtype), subset_of, num) > 0
        self.hessian, self.gradient, self.third = _summaries(prob, self.theta, direction, subset_of,
                                                             self.active, order)
        self._third_full: Tensor | None = None

    @property
    def num_subsets(self) -> int:
        """S, the number of subsets of the partition."""
        return len(self.subsets)

    @property
    def indices(self) -> tuple[Tensor, ...]:
        """The flat θ indices of each subset (need not be contiguous)."""
        return tuple((self.subset_of == i).nonzero().flatten() for i in range(self.num_subsets))

    @property
    def third_full(self) -> Tensor:
        """The S×S×S tensor D_ijk (computed on first access; see :meth:`third_tensor`)."""
        if self._third_full is None:
            self._third_full = self.third_tensor()
        return self._third_full

    def third_tensor(self, max_subsets: int = MAX_THIRD_FULL_SUBSETS) -> Tensor:
        """D_ijk = Σ_{p∈T_i, q∈T_j, r∈T_k} ∂³L/∂θ_p∂θ_q∂θ_r u_p u_q u_r, from S + S(S+1)/2 backward passes.

        Raises ``ValueError`` when S > ``max_subsets`` (the cost grows as S²) and
        :class:`curvlab.memory.MemoryBudgetError` when S³ entries exceed the memory budget.
        """
        S = self.num_subsets
        if S > max_subsets:
            raise ValueError(f"the full order-3 tensor of S = {S} subsets needs {S * (S + 1) // 2 + S} backward "
                             f"passes, over max_subsets={max_subsets}: use the diagonal .third, a coarser "
                             "partition, or third_tensor(max_subsets=...)")
        memory.check((S, S, S), self.hessian.dtype, "the order-3 summary D_ijk")
        if self._third_full is None:
            self._third_full = _third_full(self.problem, self.theta, self.direction, self.subset_of, self.active)
        return self._third_full

    def step(self, eta: Tensor) -> Tensor:
        """Return the displacement θ⁺ − θ = −U I_{P:S} η, i.e. −η_i u_{T_i} on subset i (flat (P,))."""
        eta = torch.as_tensor(eta, dtype=self.direction.dtype, device=self.direction.device)
        if eta.shape != (self.num_subsets,):
            raise ValueError(f"eta must have shape ({self.num_subsets},); got {tuple(eta.shape)}")
        return -eta[self.subset_of] * self.direction

    def model(self, eta: Tensor, damping_int: float = 0.0, ridge: float = 0.0) -> float:
        """m(η) = −ḡᵀη + ½ηᵀ(H̄ + ρI)η + (λ_int/6)‖Dη‖³, the predicted change of L for the step η."""
        eta = torch.as_tensor(eta, dtype=self.hessian.dtype, device=self.hessian.device)
        value = -self.gradient @ eta + 0.5 * eta @ self.hessian @ eta + 0.5 * ridge * eta @ eta
        if damping_int:
            if self.third is None:
                raise ValueError("the cubic term needs the order-3 summary: build it with order=3")
            value = value + damping_int / 6 * float(torch.linalg.vector_norm(self.third.abs() ** (1 / 3) * eta)) ** 3
        return float(value)

    def learning_rates(self, damping_int: float | None = None, **options: Any) -> LearningRates:
        """Per-subset η minimising the cubic-regularised model (see :func:`cubic_learning_rates`).

        ``damping_int`` (λ_int) defaults to 1.0 for an order-3 summary and to 0.0 (Newton on H̄) for an
        order-2 one, which has no D and accepts only 0. ``options``: ``ridge``, ``d_threshold``,
        ``max_expansions``, ``maxiter``, ``xtol``.
        """
        if damping_int is None:
            damping_int = 1.0 if self.order == 3 else 0.0
        return cubic_learning_rates(self.hessian, self.gradient, self.third, damping_int, active=self.active,
                                    **options)

    def __repr__(self) -> str:
        return (f"GroupedSummary(partition={self.partition!r}, S={self.num_subsets}, order={self.order}, "
                f"P={self.direction.numel()})")


def grouped_newton(prob: Problem, direction: Any, partition: str | Sequence[Any] = "canonical", order: int = 3,
                   theta: Tensor | None = None) -> GroupedSummary:
    """Wolinski's summaries H̄, ḡ (and D⁽³⁾ for ``order=3``) of ``prob``'s loss at θ along ``direction``.

    Parameters
    ----------
    prob:
        the problem; its loss L(θ) is summarised.
    direction:
        u, a flat (P,) tensor in the problem's parameter order (or a dict of tensors by parameter name),
        finite. The step of subset i is −η_i u_{T_i}.
    partition:
        ``"canonical"`` (one subset per parameter tensor, grnewt's default), ``"layer"`` (one per module:
        weight and bias together; top-level parameters form ``"(root)"``), ``"trivial"`` (S = 1),
        ``"wb"`` (all weights / all biases / the rest, empty ones dropped; a weight is a parameter named
        ``weight`` or ``….weight``, likewise bias, as grnewt's ``partition.wb``), ``"scalar"`` (S = P, one
        subset per coordinate), or a sequence of subsets, each a list of parameter names, a
        ``(name, [parameter names])`` pair or a :class:`curvlab.Block` (``prob.partition`` works), listing
        every parameter exactly once in any order (subsets need not be contiguous in θ).
    order:
        2 (H̄, ḡ) or 3 (also D⁽³⁾_iii, S more backward passes).
    theta:
        where to evaluate (default ``prob.theta``).
    """
    if not isinstance(prob, Problem):
        raise TypeError(f"expected a curvlab.Problem; got {type(prob).__name__}")
    if isinstance(order, bool) or order not in (2, 3):
        raise ValueError(f"order must be 2 or 3; got {order!r}")
    theta = prob.check_theta(theta)
    u = _check_direction(prob, direction)
    kind, names, params, subset_of = _subsets(prob, partition)
    memory.check((len(names), len(names)), prob.dtype, "the order-2 summary H̄",
                 hint="use a coarser partition than one subset per coordinate")
    return GroupedSummary(prob, theta, u, order, kind, names, params, subset_of)


# ---------------------------------------------------------------------------------------------- learning rates
@dataclass(frozen=True)
class LearningRates:
    """The per-subset learning rates η and how they were found.

    Attributes
    ----------
    eta:
        (S,) learning rates; zero on inactive subsets and for every fallback status.
    status:
        ``"newton"`` (η = (H̄ + ρI)⁻¹ḡ, λ_int = 0), ``"cubic"`` (Brent root r of the secular equation),
        or a fallback with η = 0: ``"zero_direction"`` (u = 0 on every subset), ``"no_r0"`` (H̄ not PD,
        D singular, and no r makes H̄ + (λ_int/2) r D² PD), ``"no_bracket"`` (f(r₁) ≥ 0 after
        ``max_expansions`` triplings), ``"no_root"`` (f(r₀) ≤ 0 with H̄ not PD, or Brent did not converge).
    message:
        the path taken, in words.
    r:
        the root r = ‖Dη‖ for ``"cubic"``, else None.
    r0, r1, r0_method:
        the bracket and how r₀ was found: ``"hessian_pd"`` (r₀ = 0), ``"analytical"``, ``"numerical"``.
    hessian_pd, d_singular:
        whether H̄ + ρI (on the active subsets) is positive definite; whether some D_ii ≤ ``d_threshold``.
    iterations:
        Brent iterations for the root r.
    """

    eta: Tensor
    status: str
    message: str
    damping_int: float
    ridge: float
    active: Tensor
    r: float | None = None
    r0: float | None = None
    r1: float | None = None
    r0_method: str | None = None
    hessian_pd: bool | None = None
    d_singular: bool | None = None
    iterations: int | None = None

    @property
    def ok(self) -> bool:
        """Whether η solves the model (status ``"newton"`` or ``"cubic"``) rather than being a fallback 0."""
        return self.status in ("newton", "cubic")


def _real(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a real number; got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and non-negative; got {value}")
    return value


def _count(value: Any, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer ≥ {low}; got {value!r}")
    return value


def _as_array(t: Any, shape: tuple[int, ...], name: str) -> np.ndarray:
    a = np.asarray(t.detach().cpu() if isinstance(t, Tensor) else t, dtype=np.float64)
    if a.shape != shape:
        raise ValueError(f"{name} must have shape {shape}; got {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or inf: {a}")
    return a


def _inputs(hessian: Any, gradient: Any, third: Any, active: Any) -> tuple[np.ndarray, ...]:
    g = np.asarray(gradient.detach().cpu() if isinstance(gradient, Tensor) else gradient, dtype=np.float64)
    if g.ndim != 1:
        raise ValueError(f"gradient must be a vector (S,); got shape {g.shape}")
    S = g.shape[0]
    g = _as_array(g, (S,), "gradient")
    H = _as_array(hessian, (S, S), "hessian")
    if np.abs(H - H.T).max(initial=0.0) > 1e-10 * np.abs(H).max(initial=0.0):
        raise ValueError(f"hessian must be symmetric; got asymmetry {np.abs(H - H.T).max()}")
    d = None if third is None else np.abs(_as_array(third, (S,), "third")) ** (1 / 3)
    act = np.ones(S, dtype=bool) if active is None else np.asarray(
        active.cpu() if isinstance(active, Tensor) else active, dtype=bool)
    if act.shape != (S,):
        raise ValueError(f"active must have shape ({S},); got {act.shape}")
    return H, g, d, act


def cubic_learning_rates(hessian: Tensor, gradient: Tensor, third: Tensor | None = None, damping_int: float = 1.0,
                         *, ridge: float = 0.0, d_threshold: float = 1e-5, active: Tensor | None = None,
                         max_expansions: int = 100, maxiter: int = 100, xtol: float = 1e-14) -> LearningRates:
    """η minimising −ḡᵀη + ½ηᵀ(H̄ + ρI)η + (λ_int/6)‖Dη‖³ with D = Diag(|D⁽³⁾_iii|^{1/3}) (Wolinski, 2312.03885).

    Solves η = (H̄ + ρI + (λ_int/2) r D²)⁻¹ḡ, r = ‖Dη‖, by Brent's method on the secular function (module
    docstring: bracket, fallbacks and which details follow grnewt's ``nesterov.py``). Computed in float64;
    η is returned in ``gradient``'s dtype (float64 for arrays).

    Parameters
    ----------
    hessian, gradient, third:
        H̄ (S×S, symmetric), ḡ (S,), D⁽³⁾_iii (S,, signed; None: no cubic term, then λ_int must be 0).
    damping_int:
        λ_int ≥ 0, the weight of the cubic term; 0 gives Newton on H̄ (H̄ + ρI must be PD).
    ridge:
        ρ ≥ 0 added to the diagonal of H̄.
    d_threshold:
        D is "singular" when some D_ii ≤ this (grnewt's ``threshold_D_sing``); then r₀ is found numerically.
    active:
        (S,) bool; inactive subsets are left out and get η_i = 0 (default: all active).
    max_expansions, maxiter, xtol:
        at most this many triplings of r₁; Brent's iteration cap and absolute tolerance on r.
    """
    H, g, d, act = _inputs(hessian, gradient, third, active)
    lam, rho = _real(damping_int, "damping_int"), _real(ridge, "ridge")
    opts = dict(d_threshold=_real(d_threshold, "d_threshold"), max_expansions=_count(max_expansions,
                "max_expansions", 0), maxiter=_count(maxiter, "maxiter", 1), xtol=_real(xtol, "xtol"))
    if opts["xtol"] == 0:
        raise ValueError("xtol must be positive; got 0")
    if d is None and lam > 0:
        raise ValueError(f"damping_int={lam} needs the order-3 summary (D); build it with order=3, or use "
                         "damping_int=0 (Newton on H̄, optionally with a ridge)")
    dtype = gradient.dtype if isinstance(gradient, Tensor) else torch.float64
    device = gradient.device if isinstance(gradient, Tensor) else None
    common = dict(damping_int=lam, ridge=rho, active=torch.as_tensor(act, device=device))

    def result(eta_active: np.ndarray, **fields: Any) -> LearningRates:
        eta = np.zeros(g.shape[0])
        eta[act] = eta_active
        return LearningRates(eta=torch.as_tensor(eta, dtype=dtype, device=device), **common, **fields)

    if not act.any():
        return result(np.zeros(0), status="zero_direction", message="u vanishes on every subset: η = 0")
    Ha = H[np.ix_(act, act)] + rho * np.eye(int(act.sum()))
    ga = g[act]
    pd = bool(np.linalg.eigvalsh(Ha).min() > 0)
    if lam == 0:
        if not pd:
            raise ValueError("H̄ (+ ridge) is not positive definite and damping_int = 0: the quadratic model has "
                             "no minimiser; use damping_int > 0 (order=3) or a ridge")
        return result(np.linalg.solve(Ha, ga), status="newton", hessian_pd=True,
                      message="λ_int = 0 and H̄ ≻ 0: η = H̄⁻¹ḡ (Newton on the summary)")
    return result(**_nesterov(Ha, ga, d[act], lam, pd, **opts))


# ---------------------------------------------------------------------------------------------- the cubic solve
def _secular(H: np.ndarray, g: np.ndarray, d: np.ndarray, lam: float):
    """f(r) = ‖D (H + (λ/2) r D²)⁻¹ g‖ − r and the η at r."""
    d2 = np.diag(d * d)

    def eta(r: float) -> np.ndarray:
        return np.linalg.solve(H + 0.5 * lam * r * d2, g)

    def f(r: float) -> float:
        return float(np.linalg.norm(d * eta(r))) - r

    return f, eta


def _r0_numerical(H: np.ndarray, d: np.ndarray, lam: float, max_expansions: int) -> float | None:
    """Return the r where λ_min(H + (λ/2) r D²) crosses 0 (grnewt ``compute_x0``, "Numerical"); None if none.

    λ_min(H + (λ/2) r D²) is concave and non-decreasing in r, so once it stops increasing it never
    becomes positive (grnewt stops when it decreases; a constant one would loop there).
    """
    d2 = np.diag(d * d)

    def low(r: float) -> float:
        return float(np.linalg.eigvalsh(H + 0.5 * lam * r * d2).min())

    hi, last = 1.0, low(1.0)
    for _ in range(max_expansions):
        if last > 0:
            break
        hi *= 3
        cur = low(hi)
        if cur <= last:
            return None
        last = cur
    if last <= 0:
        return None
    from scipy.optimize import root_scalar

    sol = root_scalar(low, bracket=[0.0, hi], method="brentq", maxiter=200)
    return float(sol.root) if sol.converged else None


def _r0(H: np.ndarray, d: np.ndarray, lam: float, pd: bool, d_threshold: float,
        max_expansions: int) -> tuple[float | None, str]:
    if pd:
        return 0.0, "hessian_pd"
    if (d > d_threshold).all():
        low = float(np.linalg.eigvalsh(H / np.outer(d, d)).min())
        return 2.0 / lam * max(0.0, -low), "analytical"
    return _r0_numerical(H, d, lam, max_expansions), "numerical"


def _start(f, r0: float) -> tuple[float, float | None]:
    """(r₀, f(r₀)), nudging r₀ up (relative 1e-12 … 1e-3) where M(r₀) is singular or f is not finite."""
    for nudge in (0.0, 1e-12, 1e-9, 1e-6, 1e-3):
        r = r0 * (1 + nudge) + nudge
        try:
            value = f(r)
        except np.linalg.LinAlgError:
            continue
        if math.isfinite(value):
            return r, value
    return r0, None


def _nesterov(H: np.ndarray, g: np.ndarray, d: np.ndarray, lam: float, pd: bool, d_threshold: float,
              max_expansions: int, maxiter: int, xtol: float) -> dict[str, Any]:
    """Return the root r of the secular equation on [r₀, r₁] and η (grnewt ``nesterov_lrs``), or a fallback."""
    zero = np.zeros_like(g)
    report: dict[str, Any] = dict(hessian_pd=pd, d_singular=bool((d <= d_threshold).any()))
    r0, how = _r0(H, d, lam, pd, d_threshold, max_expansions)
    report["r0_method"] = how
    if r0 is None:
        return dict(eta_active=zero, status="no_r0", **report,
                    message="H̄ is not PD, D is singular, and λ_min(H̄ + (λ_int/2) r D²) never becomes positive "
                            "(negative curvature where D vanishes): η = 0")
    f, eta = _secular(H, g, d, lam)
    r0, f0 = _start(f, r0)
    report["r0"] = r0
    if f0 is None or (f0 <= 0 and not pd):
        why = "f cannot be evaluated near r₀" if f0 is None else f"f(r₀) = {f0:.3g} ≤ 0 (hard case)"
        return dict(eta_active=zero, status="no_root", **report, message=f"H̄ is not PD and {why}: η = 0")
    if f0 == 0:
        return dict(eta_active=eta(r0), status="cubic", r=r0, r1=r0, iterations=0, **report,
                    message=f"f(r₀) = 0: r = r₀ = {r0:.6g} solves the secular equation ({how})")
    r1 = r0 + 1.0
    for _ in range(max_expansions):
        if f(r1) < 0:
            break
        r1 *= 3
    report["r1"] = r1
    if not f(r1) < 0:
        return dict(eta_active=zero, status="no_bracket", **report,
                    message=f"f(r₁) ≥ 0 for r₁ up to {r1:.3g} after {max_expansions} triplings: η = 0")
    try:
        from scipy.optimize import root_scalar

        sol = root_scalar(f, bracket=[r0, r1], method="brentq", maxiter=maxiter, xtol=xtol)
    except (np.linalg.LinAlgError, ValueError) as exc:
        return dict(eta_active=zero, status="no_root", **report, message=f"Brent's method failed ({exc}): η = 0")
    if not sol.converged:
        return dict(eta_active=zero, status="no_root", iterations=sol.iterations, **report,
                    message=f"Brent's method did not converge in {maxiter} iterations ({sol.flag}): η = 0")
    return dict(eta_active=eta(sol.root), status="cubic", r=float(sol.root), iterations=sol.iterations, **report,
                message=f"root r = {sol.root:.6g} of the secular equation on [{r0:.3g}, {r1:.3g}] ({how} r₀)")
