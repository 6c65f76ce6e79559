#!/usr/bin/env python
"""Per-step cost of every training method of ``curvlab.optim``, in SGD steps, next to ASDL's same methods.

    python benchmarks/optim.py                                   # digits-mlp, -autoencoder, -cnn; float32; batch 128
    python benchmarks/optim.py --problems digits-mlp --dtype float64 --no-peers
    python benchmarks/optim.py --no-steps                        # only the GroupedNewton summaries

What is measured
----------------
* **The unit**: one step of ``torch.optim.SGD`` (``zero_grad``, forward, loss, backward, update) on
  the same model and the same batches (batch 128, cycling through ``--batches`` fixed minibatches of
  the problem's data). It is re-measured right before every row (median of 20 blocks of 10 steps),
  and each row's multiples use the unit measured next to it, so a change of the machine's load
  during the run moves both; the table's header gives the range of the units.
* **A method's step**: ``opt.step(X, y)`` of ``cl.optim.make(method, model, loss_fn, **options)``
  with the method's defaults (its learning rate, momentum, damping, refresh periods), in the steady
  state: a warm-up of at least two refresh periods (and 10 steps), then the median over
  ``--repeats`` timed blocks of whole refresh periods (at least 10 steps each for fast methods)
  divided by the block's steps — so the amortised refreshes (e.g. KFAC's inverses every 10 steps)
  are included at their share. Steps over 0.1 s are timed one period at a time, and a block over
  5 s is repeated 3 times (over 30 s: once); a method whose first step takes over 20 s is
  reported by that step alone. A run that curvlab refuses as singular (its check of the damped
  eigenvalues or pivots against size·ε·scale) is measured again at λ = 1 and marked ``*``, with the
  step at which the default λ refused.
* **ASDL** (``asdfghjkl`` 0.1a5, imported as ``asdl``): the same blocks of
  ``zero_grad``; ``gm.setup_model_call(model, X)``; ``gm.setup_loss_call(loss_fn, out, y)``;
  ``gm.forward_and_backward()``; ``torch.optim.SGD(lr=1e-3, momentum=<curvlab's default>).step()``.
  ASDL has no KL-clipping, so it steps with a small fixed learning rate to stay finite over the run;
  a step's cost does not depend on the learning rate. Settings matched to curvlab's defaults:
  ``data_size`` = the number of unreduced loss terms (N for cross-entropy, N·D for BCE/MSE: curvlab's
  scale R); damping λ with ASDL's π-rule for KFAC (curvlab's KFAC default, λ = 1e-2); EMA decay
  ``1 − ema_decay`` (ASDL weighs the new batch by its ``ema_decay``); statistics every step and
  inverses every ``inverse_period`` steps (``curvature_upd_interval``, ``preconditioner_upd_interval``);
  K-BFGS with λ = 0.3 (√λ on A and μ₂ = √λ, as curvlab) and A's decay 0.9. ASDL's ``fisher_mc``
  (one sampled label) is curvlab's default ``fisher_mc``, its ``fisher_exact`` curvlab's ``ggn`` (one
  backward pass per class), ``fisher_emp`` its ``empirical``; its EKFAC
  takes only the latter and, as its EMA would sum eigenvector matrices, runs without one (the
  eigenbasis of each batch: matched by curvlab's EKFAC with ``ema_decay=0``, ``inverse_period=1``).
  Where ASDL lacks a method, a Fisher type or a loss, or fails, the row says so and why (the error
  is printed).
  ASDL's Kronecker preconditioners wrap their inverses in ``torch.cuda.nvtx.range``, which raises on
  a CPU-only torch build; the script replaces that one name in ``asdl.precondition.natural_gradient``
  by a no-op context (nothing else of ASDL is changed).
* **GroupedNewton's summaries** (second table): ``cl.approx.grouped_newton(prob, u, partition=
  "canonical", order=2 | 3)`` with u = −g (H̄ and ḡ: 1 + S backward passes; with D⁽³⁾: 1 + 2S)
  against forming the dense Hessian ``cl.exact.hessian(prob).to_dense()``, on every canned problem
  (N = batch), in seconds and multiples of one gradient (``harness.gradient_time``: median of 50
  ``prob.gradient()``), medians of ``--repeats`` runs after a warm-up (the dense Hessian of
  P > 4,000: one run).
* ``--profile METHOD …``: where one step's time goes (cProfile over 50 steady-state steps on the
  first problem): the optimizer's phases and the largest self times.

Targets (issue 10, digits-mlp, batch 128): K-BFGS ≤ 3×, KFAC with inverses every 10 steps ≤ 2×,
``ng`` ≤ 10× an SGD step. The script prints whether they hold, next to the plain-torch floors of
KFAC and K-BFGS (``benchmarks/floors.py``: the same steps written with nothing but their operations).
The 1-minute load average (/proc/loadavg) is printed before and after each problem: the figures are
only as quiet as the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import math
import os
import statistics
import sys
import time
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import fmt_seconds, gradient_time, median_time, reexec_with_heap_reuse, table  # noqa: E402

ASDL_LR = 1e-3
DEFAULT_PROBLEMS = "digits-mlp,digits-autoencoder,digits-cnn"
TARGETS = {"kbfgs": 3.0, "kfac": 2.0, "ng": 10.0}  # digits-mlp, multiples of an SGD step


@dataclass(frozen=True)
class Variant:
    """One row: a curvlab method with options (over its defaults) and its counterpart."""

    label: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    peer: str | None = None      # a key of ``asdl_makers`` or "torch:<optimizer>"; None: no counterpart
    why_none: str = ""           # why there is no counterpart


def variants(names: list[str]) -> list[Variant]:
    """The rows: every registered method with its defaults, plus the variants ASDL can match."""
    rows = [
        Variant("sgd", "sgd", {"lr": 0.1}, "torch:sgd"),
        Variant("adam", "adam", {}, "torch:adam"),
        Variant("rmsprop", "rmsprop", {}, "torch:rmsprop"),
        Variant("kfac", "kfac", {}, "kfac"),
        Variant("kfac, inverses every step", "kfac", {"inverse_period": 1}, "kfac"),
        Variant("kfac, exact type-2 Fisher", "kfac", {"fisher": "ggn"}, "kfac-exact"),
        Variant("kfac, empirical Fisher", "kfac", {"fisher": "empirical"}, "kfac-emp"),
        Variant("ekfac", "ekfac", {}, None, "ASDL's EKFAC takes the empirical Fisher only: see the next row"),
        Variant("ekfac, empirical, from the batch", "ekfac",
                {"fisher": "empirical", "ema_decay": 0.0, "inverse_period": 1}, "ekfac-emp"),
        Variant("tkfac", "tkfac", {}, None, "ASDL has no TKFAC"),
        Variant("tekfac", "tekfac", {}, None, "ASDL has no TEKFAC"),
        Variant("foof", "foof", {}, None, "ASDL has no FOOF"),
        Variant("ng", "ng", {}, "ng"),
        Variant("ng, exact GGN", "ng", {"fisher": "ggn"}, "ng-exact"),
        Variant("ng, empirical Fisher", "ng", {"fisher": "empirical"}, "ng-emp"),
        Variant("ng-block", "ng-block", {}, "ng-block"),
        Variant("newton", "newton", {}, "newton"),
        Variant("newton-block", "newton-block", {}, None, "ASDL's NewtonGradientMaker takes the full Hessian only"),
        Variant("kbfgs", "kbfgs", {}, "kbfgs"),
        Variant("kbfgs-l", "kbfgs-l", {}, None, "ASDL has no K-BFGS(L)"),
    ]
    known = {v.method for v in rows}
    rows += [Variant(n, n, {}, None, "no ASDL counterpart") for n in names if n not in known]
    return [v for v in rows if v.method in names]


def period_of(method: str, options: dict[str, Any]) -> int:
    """Steps in one refresh cycle: the largest ``period`` / ``*_period`` option (defaults included), else 1."""
    import curvlab as cl

    merged = {**cl.optim.METHODS[method].defaults, **options}
    periods = [v for k, v in merged.items() if (k == "period" or k.endswith("_period")) and isinstance(v, int)]
    return max(periods, default=1)


# ---------------------------------------------------------------------------------------------- timing
SLOW_STEP = 20.0  # seconds: a method whose first step takes longer is reported by that step alone


def steady_step_time(step: Callable[[], Any], period: int, repeats: int) -> tuple[float, str]:
    """Seconds per step in the steady state: warm-up, then the median of whole periods (see the docstring)."""
    t0 = time.perf_counter()
    step()  # the first step builds the method's state
    first = time.perf_counter() - t0
    if first > SLOW_STEP:
        return first, "first step only"
    per_period = max(1, math.ceil(10 / period)) if first < 0.1 else 1
    block = period * per_period
    warm = max(2 * period, 10) if first < 0.1 else min(2 * period, 2)
    for _ in range(warm - 1):
        step()
    times = []
    runs = repeats
    while len(times) < runs:
        t0 = time.perf_counter()
        for _ in range(block):
            step()
        times.append((time.perf_counter() - t0) / block)
        if len(times) == 1 and times[0] * block > 5:
            runs = 1 if times[0] * block > 30 else min(runs, 3)
    return statistics.median(times), f"{len(times)}×{block}"


def batches(prob, batch: int, count: int) -> list[tuple[Any, Any]]:
    Xs, ys = prob.X.split(batch), prob.y.split(batch)
    return [(X, y) for X, y in zip(Xs, ys) if X.shape[0] == batch][:count]


def torch_step(prob, data, name: str) -> Callable[[], None]:
    """One step of torch's own optimizer (SGD: the unit) on a fresh copy of the model."""
    import torch

    model, loss_fn = copy.deepcopy(prob.model), copy.deepcopy(prob.loss_fn)
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "rmsprop": torch.optim.RMSprop}[name]
    opt = cls(model.parameters(), **({"lr": 0.1} if name == "sgd" else {}))
    cycle = itertools.cycle(data)

    def step() -> None:
        X, y = next(cycle)
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()

    return step


def sgd_unit(prob, data) -> float:
    return steady_step_time(torch_step(prob, data, "sgd"), 10, 20)[0]


def curvlab_step(prob, data, variant: Variant) -> Callable[[], None]:
    import curvlab as cl

    model = copy.deepcopy(prob.model)
    opt = cl.optim.make(variant.method, model, copy.deepcopy(prob.loss_fn), **variant.options)
    cycle = itertools.cycle(data)

    def step() -> None:
        X, y = next(cycle)
        opt.step(X, y)

    step.optimizer = opt  # type: ignore[attr-defined]
    return step


RETRY_DAMPING = 1.0


def curvlab_row(prob, data, variant: Variant, repeats: int) -> tuple[float | None, str, Variant, str]:
    """(seconds or None, runs or the failure, the variant measured, a note). A run that curvlab refuses as
    singular (its check of damped eigenvalues or pivots) is measured again with λ = 1, and the note says
    so: a step's cost does not depend on λ."""
    period = period_of(variant.method, variant.options)
    built: list[Any] = []

    def make() -> Callable[[], None]:
        built.append(curvlab_step(prob, data, variant))
        return built[-1]

    t, runs = measure(make, period, repeats)
    if t is not None or "singular" not in runs or not built:
        return t, runs, variant, ""
    opt = built[-1].optimizer
    damping = {**cl_defaults(variant.method), **variant.options}.get("damping")
    if damping is None or damping >= RETRY_DAMPING:
        return t, runs, variant, ""
    note = (f"curvlab at λ = {RETRY_DAMPING:g}: at its default λ = {damping:g} it refuses at step "
            f"{opt.steps_taken} ({runs.removeprefix('fails: ')})")
    retry = Variant(variant.label, variant.method, {**variant.options, "damping": RETRY_DAMPING}, variant.peer,
                    variant.why_none)
    t, runs = measure(lambda: curvlab_step(prob, data, retry), period, repeats)
    return t, runs, retry, note


def cl_defaults(method: str) -> dict[str, Any]:
    import curvlab as cl

    return dict(cl.optim.METHODS[method].defaults)


# ---------------------------------------------------------------------------------------------- ASDL
def patch_asdl_nvtx() -> None:
    """ASDL calls ``torch.cuda.nvtx.range`` around its inverses; on a CPU-only torch that raises. Replace
    the name in ASDL's natural-gradient module by a no-op context (only when the real one fails)."""
    import torch

    try:
        with torch.cuda.nvtx.range("probe"):
            pass
    except RuntimeError:
        import asdl.precondition.natural_gradient as ng

        ng.nvtx = types.SimpleNamespace(range=lambda *a, **k: contextlib.nullcontext())


def asdl_version() -> str | None:
    try:
        from importlib.metadata import version

        import asdl  # noqa: F401
    except ImportError:
        return None
    return version("asdfghjkl")


def loss_terms(prob, batch: int) -> tuple[str | None, int]:
    """ASDL's ``loss_type`` for the problem's loss (None: unsupported by its Fisher) and its ``data_size``
    for a batch: the number of unreduced loss terms, 1/R."""
    name = type(prob.loss_fn).__name__
    if name == "CrossEntropyLoss":
        return "cross_entropy", batch
    return ("mse" if name == "MSELoss" else None), batch * prob.y[0].numel()


def asdl_makers(prob, batch: int) -> dict[str, Callable[[Any, dict[str, Any]], Any] | str]:
    """ASDL's gradient maker for each peer key, as a factory of (model, the row's curvlab options with
    its method's defaults), or why there is none. Damping, periods and decays come from those options."""
    import asdl
    from asdl import PreconditioningConfig

    loss_type, data_size = loss_terms(prob, batch)

    def config(o: dict[str, Any], ema: bool = True, period: bool = True) -> PreconditioningConfig:
        return PreconditioningConfig(data_size=data_size, damping=o["damping"],
                                     ema_decay=1.0 - o["ema_decay"] if ema else -1,
                                     preconditioner_upd_interval=o["inverse_period"] if period else 1,
                                     curvature_upd_interval=o.get("stats_period", 1))

    def fisher(cls, ema: bool = True, kind: str = "fisher_mc") -> Callable[[Any, dict[str, Any]], Any] | str:
        if loss_type is None:
            return (f"ASDL's Fisher supports cross-entropy and MSE only, not {type(prob.loss_fn).__name__} "
                    "(see the empirical-Fisher rows)")
        return lambda m, o: cls(m, config(o, ema, ema), fisher_type=kind, loss_type=loss_type)

    return {
        "kfac": fisher(asdl.KfacGradientMaker),
        "kfac-exact": fisher(asdl.KfacGradientMaker, kind="fisher_exact"),
        "kfac-emp": lambda m, o: asdl.KfacGradientMaker(m, config(o), fisher_type="fisher_emp"),
        # ASDL's EKFAC under an EMA sums eigenvector matrices across batches: run it without one
        "ekfac-emp": lambda m, o: asdl.EkfacGradientMaker(m, config(o, ema=False, period=False),
                                                          fisher_type="fisher_emp"),
        "ng": fisher(asdl.FullNaturalGradientMaker, ema=False),
        "ng-exact": fisher(asdl.FullNaturalGradientMaker, ema=False, kind="fisher_exact"),
        "ng-emp": lambda m, o: asdl.SmwEmpNaturalGradientMaker(
            m, asdl.SmwEmpNaturalGradientConfig(data_size=batch, damping=o["damping"])),
        "ng-block": fisher(asdl.LayerWiseNaturalGradientMaker, ema=False),
        "newton": lambda m, o: asdl.NewtonGradientMaker(m, asdl.NewtonGradientConfig(damping=o["damping"])),
        "kbfgs": lambda m, o: asdl.KronBfgsGradientMaker(m, PreconditioningConfig(
            data_size=data_size, damping=o["damping"], ema_decay=1.0 - o["input_decay"])),
    }


ASDL_SETTINGS = {
    "kfac": "KfacGradientMaker, fisher_mc (one sampled label), π-damping, EMA",
    "kfac-exact": "KfacGradientMaker, fisher_exact, π-damping, EMA",
    "kfac-emp": "KfacGradientMaker, fisher_emp, π-damping, EMA",
    "ekfac-emp": "EkfacGradientMaker, fisher_emp, eigenbasis of the batch every step",
    "ng": "FullNaturalGradientMaker, fisher_mc: dense P×P, Cholesky every step",
    "ng-exact": "FullNaturalGradientMaker, fisher_exact: dense P×P, Cholesky every step",
    "ng-emp": "SmwEmpNaturalGradientMaker: Woodbury on the N×N Gram",
    "ng-block": "LayerWiseNaturalGradientMaker, fisher_mc",
    "newton": "NewtonGradientMaker: dense Hessian row by row, solve",
    "kbfgs": "KronBfgsGradientMaker (minibatch_hessian_action=False)",
}


def asdl_step(prob, data, make: Callable[[Any, dict[str, Any]], Any], options: dict[str, Any]) -> Callable[[], None]:
    import torch

    model, loss_fn = copy.deepcopy(prob.model), copy.deepcopy(prob.loss_fn)
    gm = make(model, options)
    opt = torch.optim.SGD(model.parameters(), lr=ASDL_LR, momentum=options.get("momentum", 0.0))
    cycle = itertools.cycle(data)

    def step() -> None:
        X, y = next(cycle)
        opt.zero_grad()
        out = gm.setup_model_call(model, X)
        gm.setup_loss_call(loss_fn, out, y)
        gm.forward_and_backward()
        opt.step()

    return step


# ---------------------------------------------------------------------------------------------- tables
def failure(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    return f"fails: {type(exc).__name__}: {msg[:180]}{'…' if len(msg) > 180 else ''}"


def measure(make_step: Callable[[], Callable[[], None]], period: int, repeats: int) -> tuple[float | None, str]:
    try:
        t, runs = steady_step_time(make_step(), period, repeats)
    except Exception as exc:  # noqa: BLE001 - a failing method is reported in the table, not fatal
        return None, failure(exc)
    return t, runs


def peer_cell(prob, data, variant: Variant, makers, args) -> tuple[str, float | None, str]:
    """(peer name, seconds or None, note) for a row (with the options curvlab was measured with)."""
    if variant.peer is None:
        return "-", None, variant.why_none
    if variant.peer.startswith("torch:"):
        name = variant.peer.split(":")[1]
        t, runs = measure(lambda: torch_step(prob, data, name), 1, args.repeats)
        return "torch", t, f"torch.optim.{ {'sgd': 'SGD', 'adam': 'Adam', 'rmsprop': 'RMSprop'}[name]} ({runs})"
    if makers is None:
        return "ASDL", None, "skipped (--no-peers or not installed)"
    make = makers[variant.peer]
    if isinstance(make, str):
        return "ASDL", None, make
    options = {**cl_defaults(variant.method), **variant.options}
    period = period_of(variant.method, variant.options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t, runs = measure(lambda: asdl_step(prob, data, make, options), period, args.repeats)
    note = ASDL_SETTINGS[variant.peer] + (f" ({runs})" if t is not None else f"; {runs}")
    return "ASDL", t, note


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return f.read().split()[0]
    except OSError:  # pragma: no cover - not Linux
        return "?"


def bench_steps(name: str, args, dtype) -> dict[str, float]:
    """The per-step table of one problem; returns the multiples of the default rows (for the targets)."""
    import curvlab as cl

    prob = cl.problems.load(name, n=args.batch * args.batches, dtype=dtype)
    data = batches(prob, args.batch, args.batches)
    makers = None
    if not args.no_peers and asdl_version() is not None:
        makers = asdl_makers(prob, args.batch)
    load0 = loadavg()
    rows, units, multiples = [], [], {}
    for v in variants(cl.optim.names()):
        if args.methods and v.method not in args.methods:
            continue
        unit = sgd_unit(prob, data)
        units.append(unit)
        period = period_of(v.method, v.options)
        t, runs, measured, ours_note = curvlab_row(prob, data, v, args.repeats)
        peer, tp, note = peer_cell(prob, data, measured, makers, args)
        ours = [fmt_seconds(t), f"{t / unit:.1f}x"] if t is not None else [runs, ""]
        theirs = [fmt_seconds(tp), f"{tp / unit:.1f}x"] if tp is not None else ["-", ""]
        if ours_note:
            ours[0] += " *"
            note = f"* {ours_note}." + (f" {peer}: {note}" if peer != "-" else f" {note}")
        rows.append([v.label, str(period), *ours, peer, *theirs, note])
        if t is not None and v.label == v.method and not v.options and not ours_note:
            multiples[v.method] = t / unit
    if not rows:
        print(f"## {name}: no method selected\n")
        return multiples
    print(f"## {name}: P = {prob.num_params:,}, batch {args.batch} ({len(data)} batches cycled), "
          f"{str(dtype).split('.')[-1]}; SGD step {fmt_seconds(min(units))}–{fmt_seconds(max(units))} "
          f"(median {fmt_seconds(statistics.median(units))}); load average {load0} → {loadavg()}")
    print(table(rows, ["method", "period", "curvlab / step", "SGD steps", "peer", "peer / step", "SGD steps",
                       "the peer's setting or why none; * curvlab's retry"]))
    print()
    return multiples


def floor_multiples(args, dtype) -> dict[str, float]:
    """The plain-torch floors of KFAC and K-BFGS (``benchmarks/floors.py``) on digits-mlp, in SGD steps.

    Measured like the table's rows (the same batches, a unit right before each); float32 only.
    """
    import torch
    from floors import KbfgsFloor, KfacFloor

    import curvlab as cl

    if dtype != torch.float32:
        return {}
    prob = cl.problems.load("digits-mlp", n=args.batch * args.batches, dtype=dtype)
    data = batches(prob, args.batch, args.batches)
    out = {}
    for method, cls in (("kfac", KfacFloor), ("kbfgs", KbfgsFloor)):
        unit = sgd_unit(prob, data)
        obj, cycle = cls(copy.deepcopy(prob.model)), itertools.cycle(data)
        t, _ = steady_step_time(lambda obj=obj, cycle=cycle: obj.step(*next(cycle)),
                                period_of(method, {}), args.repeats)
        out[method] = t / unit
    return out


def report_targets(multiples: dict[str, float], floors: dict[str, float]) -> None:
    labels = {"kbfgs": "K-BFGS step", "kfac": "KFAC step, inverses every 10 steps", "ng": "ng step, batch 128"}
    rows = []
    for m, bound in TARGETS.items():
        x = multiples.get(m)
        got = "not measured" if x is None else f"{x:.1f}x"
        verdict = "" if x is None else ("met" if x <= bound else "missed")
        floor = f"{floors[m]:.1f}x" if m in floors else "-"
        rows.append([labels[m], f"≤ {bound:g}x SGD", got, floor, verdict])
    print("Targets (issue 10, digits-mlp):")
    print(table(rows, ["target", "bound", "measured", "plain-torch floor (benchmarks/floors.py)", ""]))
    print()


# ---------------------------------------------------------------------------------------------- GroupedNewton
def grouped_newton_rows(name: str, args, dtype) -> list[str]:
    import curvlab as cl

    prob = cl.problems.load(name, n=args.batch, dtype=dtype)
    unit = gradient_time(prob)
    u = -prob.gradient()
    cells = [name, f"{prob.num_params:,}"]
    S = None
    for order in (2, 3):
        fn = lambda order=order: cl.approx.grouped_newton(prob, u, partition="canonical", order=order)  # noqa: E731
        S = fn().num_subsets
        t = median_time(fn, args.repeats)
        cells += [fmt_seconds(t), f"{t / unit:,.0f}x"]
    cells.insert(2, str(S))
    try:
        dense = lambda: cl.exact.hessian(prob).to_dense()  # noqa: E731
        dense()
        t = median_time(dense, 1 if prob.num_params > 4000 else args.repeats)
        cells += [fmt_seconds(t), f"{t / unit:,.0f}x"]
    except (ValueError, MemoryError, RuntimeError) as exc:
        cells += [f"refused: {' '.join(str(exc).split())[:60]}…", ""]
    cells.insert(3, f"{unit * 1e3:.2f} ms")
    return cells


def bench_grouped_newton(args, dtype) -> None:
    import curvlab as cl

    names = args.gn_problems.split(",") if args.gn_problems else cl.problems.names()
    load0 = loadavg()
    rows = [grouped_newton_rows(n, args, dtype) for n in names]
    print(f"## GroupedNewton summaries vs the dense Hessian: N = {args.batch}, {str(dtype).split('.')[-1]}, "
          f"u = −g, canonical partition; load average {load0} → {loadavg()}")
    print(table(rows, ["problem", "P", "S", "one gradient", "H̄, ḡ (order 2)", "gradients", "H̄, ḡ, D (order 3)",
                       "gradients", "dense Hessian", "gradients"]))
    print()


# ---------------------------------------------------------------------------------------------- profile
PHASES = [  # (label, file suffix, function name): cumulative time of these calls inside the profiled steps
    ("whole step", "curvlab/optim/optimizer.py", "step"),
    ("batch as a Problem (with_batch)", "curvlab/optim/optimizer.py", "problem"),
    ("loss and gradient pass", "curvlab/optim/optimizer.py", "_gradient"),
    ("curvature statistics and refreshes", "curvlab/optim/preconditioners.py", "update"),
    ("direction (solve, momentum, clipping)", "curvlab/optim/optimizer.py", "_momentum_direction"),
    ("second pass after the step", "curvlab/optim/preconditioners.py", "after_step"),
    ("across phases: autograd backward passes", "~", "<method 'run_backward' of 'torch._C._EngineBase' objects>"),
    ("across phases: functional_call (forward passes)", "torch/_functorch/functional_call.py", "functional_call"),
    ("across phases: curvlab.capture (forward + backward)", "curvlab/capture.py", "capture"),
]


def profile_method(prob, data, variant: Variant, steps: int = 50) -> None:
    """Where the time of one step goes: cProfile over ``steps`` steady-state steps (after a warm-up)."""
    import cProfile
    import pstats

    step = curvlab_step(prob, data, variant)
    period = period_of(variant.method, variant.options)
    plain, _ = steady_step_time(step, period, 5)
    steps = period * math.ceil(steps / period)
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(steps):
        step()
    pr.disable()
    st = pstats.Stats(pr).stats
    cum = {label: sum(v[3] for (f, _, fn), v in st.items() if f.endswith(suffix) and fn == name)
           for label, suffix, name in PHASES}
    total = cum["whole step"]
    rows = [[label, fmt_seconds(cum[label] / steps), f"{cum[label] / total:.0%}"] for label, _, _ in PHASES
            if cum[label] >= 0.01 * total]
    top = sorted(st.items(), key=lambda kv: -kv[1][2])[:8]
    rows += [[f"self time: {os.path.basename(f)}:{fn}"[:70], fmt_seconds(v[2] / steps), f"{v[2] / total:.0%}"]
             for (f, _, fn), v in top]
    print(f"### profile of {variant.label!r} on {prob.name}: {fmt_seconds(plain)} per step unprofiled, "
          f"{fmt_seconds(total / steps)} under cProfile ({steps} steps)")
    print(table(rows, ["phase", "per step", "share"]))
    print()


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", default=DEFAULT_PROBLEMS, help="comma-separated canned problems (step table)")
    ap.add_argument("--gn-problems", default=None, help="problems of the GroupedNewton table (default: all canned)")
    ap.add_argument("--methods", nargs="*", default=None, help="only these curvlab methods")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--batches", type=int, default=8, help="minibatches cycled through")
    ap.add_argument("--repeats", type=int, default=5, help="timed blocks per figure (median)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-peers", action="store_true", help="skip ASDL")
    ap.add_argument("--no-steps", action="store_true", help="skip the per-step table")
    ap.add_argument("--no-grouped", action="store_true", help="skip the GroupedNewton table")
    ap.add_argument("--profile", nargs="*", default=None, metavar="METHOD",
                    help="also profile these methods' steps (defaults) on the first problem")
    args = ap.parse_args(argv)
    reexec_with_heap_reuse()

    import torch

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    version = asdl_version()
    if version is not None and not args.no_peers:
        patch_asdl_nvtx()
    peers = "skipped" if args.no_peers else (f"asdfghjkl {version}" if version else
                                             "not installed (pip install -c constraints.txt asdfghjkl)")
    print(f"torch {torch.__version__}, {args.threads} threads, {args.dtype}, ASDL: {peers}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}, allocator: glibc heap reuse (MALLOC_MMAP_MAX_=0)\n")
    if not args.no_steps:
        found = {}
        for name in args.problems.split(","):
            multiples = bench_steps(name, args, dtype)
            if name == "digits-mlp":
                found = multiples
        if "digits-mlp" in args.problems.split(","):
            report_targets(found, floor_multiples(args, dtype))
    if not args.no_grouped:
        bench_grouped_newton(args, dtype)
    if args.profile:
        import curvlab as cl

        name = args.problems.split(",")[0]
        prob = cl.problems.load(name, n=args.batch * args.batches, dtype=dtype)
        for method in args.profile:
            profile_method(prob, batches(prob, args.batch, args.batches), Variant(method, method))


if __name__ == "__main__":
    main()
