"""The training methods by name: each one's preconditioner, options and defaults (with their sources).

``make(name, model, loss_fn, **options)`` builds the optimizer; every option is an explicit,
documented argument, checked before any step (an unknown option or value raises ``ValueError``).

Defaults and where they come from:

* **sgd, adam, rmsprop**: torch's own optimizers and defaults (``lr`` required for sgd).
* **kfac, ekfac, tkfac, tekfac, foof** (Martens & Grosse 2015; George et al. 2018; Gao et al. 2021;
  Benzing 2022): ``ema_decay=0.95`` (Koroko et al.'s and Wolinski's KFAC baselines), statistics every
  step, inverses every 10 steps, ``damping=1e-2`` with the method's own rule (π-damping for KFAC),
  ``momentum=0.9``, ``kl_clip=1e-2`` (Koroko et al. 2023's MLP setting), ``lr=0.1``; the output factor G
  from one label per example sampled from the model's predictive (``fisher="fisher_mc"``,
  ``mc_samples=1``: the true Fisher's Monte-Carlo estimate of Martens & Grosse 2015, §5, as in Benzing
  2022's and Koroko et al.'s KFAC); ``fisher="ggn"`` takes the exact type-2 Fisher instead (C
  backpropagated cotangents per example for C outputs: about C times the backward work).
* **ng, ng-block** (exact subsampled natural gradient, Woodbury on the low-rank factor; Benzing 2022):
  ``damping=1e-1``, ``lr=1``, no momentum, curvature recomputed every step; the Fisher of one sampled
  label per example (``fisher="fisher_mc"``: F = (1/m) Σ_n u_n u_nᵀ with u_n the per-example gradient at
  the sampled label, the subsampled natural gradient of Benzing 2022 and Koroko et al. 2023's ExactNG),
  so the Woodbury system has m = N rows; ``fisher="ggn"`` is the exact GGN of the batch (N·C rows: on
  digits-mlp, batch 128, a 1,280 × 1,280 factorisation every step, ~15× the sampled one's cost).
  (Measured on digits-mlp, batch 64, GGN: λ = 1e-3 diverges within 10 steps — the batch GGN has rank
  ≤ 576 of 3,466 — λ = 1e-1 trains.)
* **newton, newton-block**: exact damped Hessian of the batch (small problems), ``damping=1e-1``, ``lr=1``.
* **kfac-2l-<coarse>** (two-level KFAC, Koroko et al. 2023; coarse ∈ nicolaides, spectral, residual,
  krylov-nicolaides, krylov-residual, tselepidis): KFAC's defaults with λ on each factor
  (``fine_rule="koroko"``) and the coarse matrix averaged with ρ = min(1 − 1/k, 0.95); the authors
  refresh statistics and inverses every 100 steps on MNIST-scale runs, here every 1 and 10 steps.
* **grouped-newton** (Wolinski 2023–2025; the authors' ``grnewt`` defaults): ``lr=0.1`` (their λ₁),
  ``damping_int=1``, ``period=10``, ``lr_decay=0.5``, negative rates clipped, SGD-momentum base direction
  (0.9, dampening 0.9), canonical partition, order 3; ``diagonal=True`` is the diagonal-H̄ ablation.
* **kbfgs, kbfgs-l** (Goldfarb, Ren & Bahamou 2020; the authors' ``kbfgs_neurips2020_public``):
  ``lr=0.3``, ``damping=0.3`` (λ: √λ on A, μ₂ = √λ), gradient momentum 0.9, ``weight_decay=1e-5``,
  input-factor decay 0.9, L-BFGS memory 100.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from curvlab.optim.optimizer import CurvatureOptimizer, TorchOptimizer, _check_number
from curvlab.optim.preconditioners import (
    ExactPreconditioner,
    GroupedNewtonPreconditioner,
    KBFGSPreconditioner,
    KroneckerPreconditioner,
    TwoLevelPreconditioner,
)
from curvlab.vocabulary import fisher_type

__all__ = ["TrainingMethod", "METHODS", "names", "make"]

_COMMON = {"lr", "momentum", "weight_decay", "kl_clip", "curvature_fraction", "seed"}
_KRON_METHODS = ("kfac", "ekfac", "tkfac", "tekfac", "foof")


@dataclass(frozen=True)
class TrainingMethod:
    """A training method: what it is, its defaults, and how its preconditioner is built."""

    name: str
    description: str
    defaults: dict[str, Any]
    build: Callable[[dict[str, Any]], Any] | None = field(default=None, repr=False)  # options → Preconditioner
    extra: frozenset[str] = frozenset()   # options of the preconditioner (besides the common ones)


def _check_rule(rule: str, allowed: tuple[str, ...], what: str) -> str:
    if rule not in allowed:
        raise ValueError(f"unknown {what} {rule!r}: use one of {list(allowed)}")
    return rule


def _fisher(value: Any) -> str:
    try:
        return fisher_type(value)
    except ValueError:
        raise ValueError(f"unknown fisher {value!r}: use 'ggn', 'fisher_mc' or 'empirical_fisher' (or 'type2', 'mc', "
                         "'empirical')") from None


def _check_period(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer; got {value!r}")
    return value


def _kronecker(method: str) -> Callable[[dict[str, Any]], KroneckerPreconditioner]:
    def build(o: dict[str, Any]) -> KroneckerPreconditioner:
        _check_rule(o["damping_rule"], ("own", "exact", "factored", "pi", "trace"), "damping_rule")
        fisher = None if method == "foof" else _fisher(o["fisher"])
        return KroneckerPreconditioner(
            method, _check_number(o["damping"], "damping"), o["damping_rule"], fisher,
            _check_period(o["mc_samples"], "mc_samples"), o["seed"],
            _check_rule(o["approx"], ("expand", "reduce"), "approx"),
            _check_rule(o["unsupported"], ("error", "exact"), "unsupported"),
            _check_number(o["ema_decay"], "ema_decay", high=1.0 - 1e-12),
            _check_period(o["stats_period"], "stats_period"), _check_period(o["inverse_period"], "inverse_period"))

    return build


def _two_level(coarse: str) -> Callable[[dict[str, Any]], TwoLevelPreconditioner]:
    def build(o: dict[str, Any]) -> TwoLevelPreconditioner:
        kron = _kronecker("kfac")(o)  # checks the KFAC options
        rule = _check_rule(o["fine_rule"], ("koroko", "exact", "pi", "factored", "trace"), "fine_rule")
        return TwoLevelPreconditioner(coarse, kron.damping, rule, damping_rule="own", fisher=kron.fisher,
                                      mc_samples=kron.mc_samples, seed=kron.seed, approx=kron.approx,
                                      unsupported=kron.unsupported, ema_decay=kron.ema_decay,
                                      stats_period=kron.stats_period, inverse_period=kron.inverse_period)

    return build


def _grouped(o: dict[str, Any]) -> GroupedNewtonPreconditioner:
    if o["order"] not in (2, 3):
        raise ValueError(f"order must be 2 or 3; got {o['order']!r}")
    if not isinstance(o["remove_negative"], bool) or not isinstance(o["diagonal"], bool):
        raise ValueError("remove_negative and diagonal must be True or False")
    return GroupedNewtonPreconditioner(o["partition"], o["order"], _check_number(o["damping_int"], "damping_int"),
                                       _check_period(o["period"], "period"),
                                       _check_number(o["lr_decay"], "lr_decay", high=1.0), o["remove_negative"],
                                       _check_number(o["base_momentum"], "base_momentum", high=1.0),
                                       _check_number(o["base_dampening"], "base_dampening", high=1.0),
                                       o["diagonal"])


def _exact(kind: str, structure: str) -> Callable[[dict[str, Any]], ExactPreconditioner]:
    def build(o: dict[str, Any]) -> ExactPreconditioner:
        damping = _check_number(o["damping"], "damping")
        if kind == "hessian":
            rule = _check_rule(o["hessian_rule"], ("exact", "abs"), "hessian_rule")
            return ExactPreconditioner(kind, structure, damping, inverse_period=_check_period(
                o["inverse_period"], "inverse_period"), hessian_rule=rule)
        return ExactPreconditioner(kind, structure, damping, _fisher(o["fisher"]),
                                   _check_period(o["mc_samples"], "mc_samples"), o["seed"],
                                   _check_period(o["inverse_period"], "inverse_period"))

    return build


def _kbfgs(method: str) -> Callable[[dict[str, Any]], KBFGSPreconditioner]:
    def build(o: dict[str, Any]) -> KBFGSPreconditioner:
        return KBFGSPreconditioner(method, _check_number(o["damping"], "damping", low_open=True),
                                   _check_period(o["history"], "history"),
                                   _check_number(o["input_decay"], "input_decay", high=1.0),
                                   None if o["pair_decay"] is None else _check_number(o["pair_decay"], "pair_decay",
                                                                                      high=1.0))

    return build


_KRON_DEFAULTS = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0, "kl_clip": 1e-2, "damping": 1e-2,
                  "damping_rule": "own", "fisher": "fisher_mc", "mc_samples": 1, "approx": "expand",
                  "unsupported": "error", "ema_decay": 0.95, "stats_period": 1, "inverse_period": 10}
_NG_DEFAULTS = {"lr": 1.0, "momentum": 0.0, "weight_decay": 0.0, "kl_clip": None, "damping": 1e-1,
                "fisher": "fisher_mc", "mc_samples": 1, "inverse_period": 1}
_NEWTON_DEFAULTS = {"lr": 1.0, "momentum": 0.0, "weight_decay": 0.0, "kl_clip": None, "damping": 1e-1,
                    "inverse_period": 1, "hessian_rule": "exact"}
_GROUPED_DEFAULTS = {"lr": 0.1, "momentum": 0.0, "weight_decay": 0.0, "kl_clip": None, "partition": "canonical",
                     "order": 3, "damping_int": 1.0, "period": 10, "lr_decay": 0.5, "remove_negative": True,
                     "base_momentum": 0.9, "base_dampening": 0.9, "diagonal": False}
_KBFGS_DEFAULTS = {"lr": 0.3, "momentum": 0.9, "weight_decay": 1e-5, "kl_clip": None, "damping": 0.3,
                   "history": 100, "input_decay": 0.9, "pair_decay": None}


def _registry() -> dict[str, TrainingMethod]:
    reg: dict[str, TrainingMethod] = {
        "sgd": TrainingMethod("sgd", "torch.optim.SGD (momentum, weight decay, Nesterov as torch)", {}),
        "adam": TrainingMethod("adam", "torch.optim.Adam", {}),
        "rmsprop": TrainingMethod("rmsprop", "torch.optim.RMSprop", {}),
    }
    kron = {"kfac": "KFAC, A ⊗ G with running averages and amortised inverses",
            "ekfac": "EKFAC, KFAC's eigenbasis with running second moments S*",
            "tkfac": "TKFAC, trace-restricted KFAC", "tekfac": "TEKFAC (provisional), EKFAC with TKFAC's damping",
            "foof": "FOOF, (A + λI) ⊗ I: gradient descent on neurons"}
    for name, desc in kron.items():
        defaults = dict(_KRON_DEFAULTS)
        if name == "foof":
            defaults.pop("fisher")
        reg[name] = TrainingMethod(name, desc, defaults, _kronecker(name), frozenset(defaults) - _COMMON)
    for name, structure, desc in (("ng", "low_rank", "exact subsampled natural gradient (sampled labels), Woodbury"),
                                  ("ng-block", "block_low_rank", "block-diagonal exact natural gradient")):
        reg[name] = TrainingMethod(name, desc, dict(_NG_DEFAULTS), _exact("ggn", structure),
                                   frozenset(_NG_DEFAULTS) - _COMMON)
    for name, structure, desc in (("newton", "full", "exact damped Newton (dense Hessian of the batch)"),
                                  ("newton-block", "block", "block-diagonal exact damped Newton")):
        reg[name] = TrainingMethod(name, desc, dict(_NEWTON_DEFAULTS), _exact("hessian", structure),
                                   frozenset(_NEWTON_DEFAULTS) - _COMMON)
    for name, desc in (("kbfgs", "K-BFGS: BFGS on the pre-activation factor, Hessian-action BFGS on A"),
                       ("kbfgs-l", "K-BFGS(L): L-BFGS memory for the pre-activation factor")):
        reg[name] = TrainingMethod(name, desc, dict(_KBFGS_DEFAULTS), _kbfgs(name),
                                   frozenset(_KBFGS_DEFAULTS) - _COMMON)
    from curvlab.approx.two_level import COARSE_SPACES

    for coarse in COARSE_SPACES:
        defaults = {**_KRON_DEFAULTS, "fine_rule": "koroko"}
        reg[f"kfac-2l-{coarse}"] = TrainingMethod(f"kfac-2l-{coarse}", f"two-level KFAC, {coarse} coarse space",
                                                  defaults, _two_level(coarse), frozenset(defaults) - _COMMON)
    reg["grouped-newton"] = TrainingMethod("grouped-newton", "GroupedNewton's NewtonSummary: per-subset step "
                                           "sizes from order-2/3 summaries along SGD-momentum",
                                           dict(_GROUPED_DEFAULTS), _grouped, frozenset(_GROUPED_DEFAULTS) - _COMMON)
    return reg


METHODS: dict[str, TrainingMethod] = _registry()


def names() -> list[str]:
    """Every training method's name."""
    return list(METHODS)


def _options(spec: TrainingMethod, options: dict[str, Any]) -> dict[str, Any]:
    allowed = _COMMON | spec.extra
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {spec.name!r}; it takes {sorted(allowed)}")
    return {"seed": 0, **spec.defaults, **options}


def _check_layers(model: nn.Module, method: str) -> None:
    """Check, for layer-structured methods, that every trainable parameter belongs to a supported layer.

    This is the static part of the check; tied or repeated layers are found by the survey at the first
    step, before any update.
    """
    from curvlab.layers import RULES

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    bad = []
    for mname, m in model.named_modules():
        own = [n for n, p in m.named_parameters(prefix=mname, recurse=False) if p.requires_grad]
        rule = RULES.get(type(m))
        why = "not nn.Linear / nn.Conv2d" if rule is None else rule.unsupported(m)
        if own and why:
            bad.extend(f"{n!r} ({type(m).__name__}: {why})" for n in own)
    if bad:
        raise ValueError(f"{method} preconditions nn.Linear and nn.Conv2d layers only; unsupported parameters: "
                         f"{', '.join(bad)}. Freeze them (requires_grad=False) or use a method for any model "
                         "(ng, newton, sgd, adam)")


def make(method: str, model: nn.Module, loss_fn: nn.Module, **options: Any) -> CurvatureOptimizer | TorchOptimizer:
    """Return the optimizer for ``method`` (see :data:`METHODS` and the module docstring for the options).

    Every option is checked here, before any step; layers the method does not support raise at the
    first step, before any parameter changes. ``opt.options`` holds every option in effect, the
    method's defaults included.
    """
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown training method {method!r}; valid names: {', '.join(METHODS)}")
    spec = METHODS[method]
    if spec.build is None:
        return TorchOptimizer(model, loss_fn, method, **options)
    o = _options(spec, options)
    layered = method in ("kbfgs", "kbfgs-l") or (
        (method in _KRON_METHODS or method.startswith("kfac-2l-")) and o["unsupported"] == "error")
    if layered:
        _check_layers(model, method)
    pre = spec.build(o)
    opt = CurvatureOptimizer(model, loss_fn, pre, method, lr=o["lr"], momentum=o["momentum"],
                             weight_decay=o["weight_decay"], kl_clip=o["kl_clip"],
                             curvature_fraction=o.get("curvature_fraction", 1.0), seed=o["seed"])
    opt.options.update(o)  # every option in effect, the method's defaults included (cl.optim.train records them)
    return opt
