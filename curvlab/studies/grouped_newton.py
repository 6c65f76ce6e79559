"""The ``grouped-newton`` study: Wolinski's GroupedNewton measured on digits (claims W1–W5).

Wolinski (2023–2025), "Gathering and Exploiting Higher-Order Information when Training Large Structured
Models" (arXiv 2312.03885; v1 "Adapting Newton's Method to Neural Networks through a Summary of
Higher-Order Derivatives"). The parameters are split into S subsets (the canonical partition: one subset
per parameter tensor, S = 6 on ``digits-mlp``) and a direction u moves subset i by its own step size η_i;
the step sizes come from the order-2 summary H̄_ij = u_{T_i}ᵀ H_{T_i T_j} u_{T_j}, ḡ_i = g_{T_i}ᵀ u_{T_i} and
the order-3 diagonal D⁽³⁾_iii (:func:`curvlab.approx.grouped_newton`).

Four parts, one grid (every cell has the keys ``part``, ``method``, ``lr``, ``seed``):

``exactness`` (one cell)
    Along the GroupedNewton training trajectory of problem seed 0 (λ₁ = the middle of ``gn_lr``), at the
    steps ``exact_steps``, with u = −∇L(θ) on the curvature batch: H̄ and ḡ against the projections
    I_{S:P} U H U I_{P:S} and I_{S:P} U g of the dense Hessian :func:`curvlab.exact.hessian` and the
    gradient; D⁽³⁾_iii against d³/dt³ L(θ + t u_{T_i}) at t = 0 by nested autograd in the scalar t, and
    against the central difference (H̄_ii(θ + h u_{T_i}) − H̄_ii(θ − h u_{T_i}))/(2h), h = ``fd_step`` /
    ‖u_{T_i}‖ (W1). The extremes (W2): S = 1 (partition ``"trivial"``, λ_int = 0) gives η = gᵀu/uᵀHu
    at the same checkpoints; S = P (partition ``"scalar"``, u = −g, λ_int = 0) on a convex problem —
    logistic regression of "diabetes target above its mean" on the ten standardised diabetes inputs
    (``nn.Linear(10, 1)``, ``BCEWithLogitsLoss``, all 442 samples; PyTorch's initialisation under
    ``torch.manual_seed(0)``) — gives Newton's step −H⁻¹g, checked at ``newton_iterates`` successive
    iterates of that very step.
``invariance`` (one cell per method: grouped-newton, sgd, adam)
    Train ``invariance_steps`` minibatch steps from the same start in two parametrisations of the same
    network: as is, and with the first layer's weight stored as φ = θ/α (α = ``invariance_alpha``, the
    layer computes α·φ). The deviation of the trajectories is measured in θ-coordinates (W3).
``training`` (one cell per method × lr × seed)
    ``cl.optim.train`` on ``problem`` (n samples, problem seed = batch-order seed = the ``seed``
    coordinate) for ``steps`` steps of ``batch_size``: GroupedNewton (``grouped-newton``: SGD-momentum
    direction, refreshed every ``period`` steps on the step's minibatch, λ_int = ``damping_int``, λ₁ ∈
    ``gn_lr``), its diagonal-H̄ ablation (``grouped-newton-diagonal``, same λ₁ grid), Adam, KFAC
    (curvlab's defaults: π-damping 1e-2, momentum 0.9, KL-clip 1e-2) and SGD with momentum 0.9 over their
    ``*_lr`` grids. The per-subset learning rates η_s (``subset_lr``) and the solver's fallback count are
    recorded (W4, W5).

Recomputing from the file: the attrs ``problem``, ``n``, ``seed`` (= 0) name the curvature batch
``cl.problems.load(problem, n=n, seed=seed)`` of the exactness trajectory, whose parameters are
``theta`` (checkpoint, param); a training run's data and start are ``cl.problems.load(problem, n=n,
seed=s)`` with s its ``seed`` coordinate, and ``final_theta`` (run, seed, param) its parameters after the
last step (so ``final_loss`` is recomputable). Tuning: a method's tuned run is the lr whose geometric mean
over seeds of the final training loss is smallest (selected on the same seeds it is reported on).

The curvature batch of GroupedNewton's refreshes is the step's minibatch (``cl.optim``), not a separate
batch of 1000 as in the authors' ``grnewt`` scripts.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from curvlab.studies import Claim, Study

__all__ = ["STUDY", "run_cell", "merge", "figures", "summary_checks", "newton_extreme", "invariance_deviation",
           "Rescaled", "RUN_METHODS", "tuned"]

#: the training runs' methods: name → (grid key of the config, curvlab.optim method, fixed options)
RUN_METHODS = {
    "grouped-newton": ("gn_lr", "grouped-newton", {}),
    "grouped-newton-diagonal": ("gn_lr", "grouped-newton", {"diagonal": True}),
    "adam": ("adam_lr", "adam", {}),
    "kfac": ("kfac_lr", "kfac", {"fisher": "ggn"}),  # the exact GGN, as the committed runs used
    "sgd": ("sgd_lr", "sgd", {"momentum": 0.9}),
}
INVARIANCE_METHODS = ("grouped-newton", "sgd", "adam")


def _middle(values: list[float]) -> float:
    return values[len(values) // 2]


def _cells(c: dict[str, Any]) -> list[dict[str, Any]]:
    cells = [{"part": "exactness", "method": "grouped-newton", "lr": float(_middle(c["gn_lr"])), "seed": 0}]
    cells += [{"part": "invariance", "method": m, "lr": float(c["invariance_lr"][m]), "seed": 0}
              for m in INVARIANCE_METHODS]
    for name, (key, _, _) in RUN_METHODS.items():
        cells += [{"part": "training", "method": name, "lr": float(lr), "seed": s}
                  for lr in c[key] for s in range(c["seeds"])]
    return cells


def _check(c: dict[str, Any]) -> None:
    for key in ("gn_lr", "adam_lr", "kfac_lr", "sgd_lr"):
        if not c[key] or any(not (isinstance(v, (int, float)) and v > 0) for v in c[key]):
            raise ValueError(f"{key} must be a non-empty list of positive learning rates; got {c[key]}")
    missing = [m for m in INVARIANCE_METHODS if m not in c["invariance_lr"]]
    if missing:
        raise ValueError(f"invariance_lr must give a learning rate for {missing}; got {c['invariance_lr']}")
    if c["seeds"] < 1 or c["steps"] < 1 or c["invariance_steps"] < 1:
        raise ValueError(f"seeds, steps and invariance_steps must be ≥ 1; got {c['seeds']}, {c['steps']}, "
                         f"{c['invariance_steps']}")
    bad = [s for s in c["exact_steps"] if not 0 <= s <= c["steps"]]
    if bad or not c["exact_steps"]:
        raise ValueError(f"exact_steps must be a non-empty list of steps in [0, steps={c['steps']}]; got "
                         f"{c['exact_steps']}")


# ---------------------------------------------------------------------------------------------- W1, W2
def _indicator(subset_of, num: int):
    """E (P×S) with E_ps = 1 when coordinate p is in subset s."""
    E = torch.zeros(subset_of.numel(), num, dtype=torch.float64)
    E[torch.arange(subset_of.numel()), subset_of.cpu()] = 1.0
    return E


def _rel(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm()) if float(b.norm()) > 0 else float((a - b).norm())


def _third_along(prob, theta, v):
    """d³/dt³ L(θ + t v) at t = 0, by nested autograd in the scalar t (independent of the θ-gradients)."""
    t = torch.zeros((), dtype=theta.dtype, requires_grad=True)
    with torch.enable_grad():
        phi = prob.loss_tensor(theta + t * v)
        (d1,) = torch.autograd.grad(phi, t, create_graph=True)
        (d2,) = torch.autograd.grad(d1, t, create_graph=True)
        (d3,) = torch.autograd.grad(d2, t)
    return float(d3)


def summary_checks(prob, theta, fd_step: float = 1e-4) -> dict[str, Any]:
    """W1 and the S = 1 extreme at θ with u = −∇L(θ): relative errors of H̄, ḡ, D⁽³⁾ and η (S = 1).

    Returns the summaries' values too (``hbar`` S×S, ``third`` S) and the references.
    """
    import curvlab as cl

    p = prob.at(theta)
    g = p.gradient()
    u = -g
    H = cl.exact.hessian(p).to_dense()
    S = cl.approx.grouped_newton(p, u, partition="canonical", order=3)
    E = _indicator(S.subset_of, S.num_subsets)
    hbar_ref = E.T @ (u[:, None] * H * u[None, :]) @ E
    gbar_ref = E.T @ (u * g)
    masks = [(S.subset_of == i).to(u.dtype) * u for i in range(S.num_subsets)]
    third_ref = torch.tensor([_third_along(p, p.theta, m) for m in masks], dtype=torch.float64)
    third_fd = torch.zeros(S.num_subsets, dtype=torch.float64)
    for i, m in enumerate(masks):
        h = fd_step / float(m.norm())
        up, down = (cl.approx.grouped_newton(p, u, "canonical", order=2, theta=p.theta + s * h * m).hessian[i, i]
                    for s in (1.0, -1.0))
        third_fd[i] = (up - down) / (2 * h)
    trivial = cl.approx.grouped_newton(p, u, partition="trivial", order=2)
    try:
        eta1 = float(trivial.learning_rates(damping_int=0.0).eta[0])
    except ValueError:  # uᵀHu ≤ 0: the S = 1 quadratic model has no minimiser
        eta1 = math.nan
    cauchy = float(g @ u) / float(u @ H @ u)
    return {"hbar_error": _rel(S.hessian, hbar_ref), "gbar_error": _rel(S.gradient, gbar_ref),
            "third_error": _rel(S.third, third_ref), "third_fd_error": _rel(third_fd, third_ref),
            "trivial_error": abs(eta1 - cauchy) / abs(cauchy), "hbar": S.hessian.numpy(),
            "third": S.third.numpy(), "trivial_lr": eta1, "cauchy_lr": cauchy, "subsets": list(S.subsets)}


def convex_problem():
    """Logistic regression of "diabetes target above its mean" on the 10 standardised inputs (P = 11)."""
    from torch import nn

    import curvlab as cl

    X, y = cl.data.diabetes(None, 0, torch.float64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Linear(10, 1).to(torch.float64)
    return cl.Problem(model, nn.BCEWithLogitsLoss(), X, (y > 0).to(torch.float64), name="diabetes-logistic")


def newton_extreme(iterates: int) -> list[float]:
    """S = P, u = −g: ‖Δθ_GN − (−H⁻¹g)‖/‖H⁻¹g‖ at ``iterates`` successive iterates of that step (W2)."""
    import curvlab as cl

    prob = convex_problem()
    theta, errors = prob.theta.clone(), []
    for _ in range(iterates):
        p = prob.at(theta)
        g = p.gradient()
        newton = -torch.linalg.solve(cl.exact.hessian(p).to_dense(), g)
        S = cl.approx.grouped_newton(p, -g, partition="scalar", order=2)
        step = S.learning_rates(damping_int=0.0).eta * g  # θ⁺ = θ − η ⊙ u with u = −g
        errors.append(_rel(step, newton))
        theta = theta + step
    return errors


def _exactness(cell: dict[str, Any], config: dict[str, Any]):
    import numpy as np
    import xarray as xr

    import curvlab as cl

    prob = cl.problems.load(config["problem"], n=config["n"], seed=0)
    steps = sorted(set(config["exact_steps"]))
    traj = cl.optim.train(prob, "grouped-newton", steps=max(steps), batch_size=config["batch_size"], seed=0,
                          checkpoints=steps, progress=False, lr=cell["lr"], damping_int=config["damping_int"],
                          period=config["period"])
    thetas = torch.as_tensor(traj["theta"].values)
    checks = [summary_checks(prob, th, config["fd_step"]) for th in thetas]
    scalars = ("hbar_error", "gbar_error", "third_error", "third_fd_error", "trivial_error", "trivial_lr",
               "cauchy_lr")
    data = {k: ("checkpoint", np.array([c[k] for c in checks])) for k in scalars}
    data["hbar"] = (("checkpoint", "subset", "subset_j"), np.stack([c["hbar"] for c in checks]))
    data["third"] = (("checkpoint", "subset"), np.stack([c["third"] for c in checks]))
    data["theta"] = (("checkpoint", "param"), thetas.numpy())
    data["checkpoint_loss"] = ("checkpoint", np.array([prob.loss(th) for th in thetas]))
    data["newton_error"] = ("newton_iterate", np.array(newton_extreme(config["newton_iterates"])))
    subsets = checks[0]["subsets"]
    return xr.Dataset(data, coords={"checkpoint": steps, "subset": subsets, "subset_j": subsets,
                                    "newton_iterate": np.arange(config["newton_iterates"])})


# ---------------------------------------------------------------------------------------------- W3
class Rescaled(nn.Module):
    """``nn.Linear`` ``lin`` reparametrised: its weight stored as φ = W/α, the layer computing α·φ x + b."""

    def __init__(self, lin: nn.Linear, alpha: float) -> None:
        super().__init__()
        self.alpha = float(alpha)
        self.weight = nn.Parameter(lin.weight.detach() / alpha)
        self.bias = nn.Parameter(lin.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return x (αW)ᵀ + b: the linear layer with its weight scaled by α."""
        return nn.functional.linear(x, self.alpha * self.weight, self.bias)


def _flat_theta(model: nn.Module) -> torch.Tensor:
    """Return the flat θ of ``model`` in θ-coordinates (a :class:`Rescaled` first layer's weight times α)."""
    first = model[0]
    w = first.weight.detach() * getattr(first, "alpha", 1.0)
    return torch.cat([w.reshape(-1), *[p.detach().reshape(-1) for p in list(model.parameters())[1:]]])


def invariance_deviation(problem: str, n: int, method: str, steps: int, alpha: float, batch_size: int,
                         **options: Any) -> list[float]:
    """‖θ_t − θ′_t‖/‖θ_t‖ for t = 0..steps: θ trained as is, θ′ with the first layer's weight stored as θ/α."""
    import curvlab as cl

    prob = cl.problems.load(problem, n=n, seed=0)
    base = cl.problems.load(problem, n=n, seed=0).model
    other = cl.problems.load(problem, n=n, seed=0).model
    other[0] = Rescaled(other[0], alpha)
    trajectories = []
    for model in (base, other):
        opt = cl.optim.make(method, model, prob.loss_fn, **options)
        thetas = [_flat_theta(model)]
        for ix in cl.optim.batches(prob.num_samples, batch_size, steps, seed=0):
            opt.step(prob.X[ix], prob.y[ix])
            thetas.append(_flat_theta(model))
        trajectories.append(thetas)
    return [_rel(b, a) for a, b in zip(*trajectories)]


def _method_options(method: str, lr: float, config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    if method in RUN_METHODS:
        _, opt_method, fixed = RUN_METHODS[method]
    else:
        opt_method, fixed = method, ({"momentum": 0.9} if method == "sgd" else {})
    options = {"lr": lr, **fixed}
    if opt_method == "grouped-newton":
        options.update(damping_int=config["damping_int"], period=config["period"])
    return opt_method, options


def _invariance(cell: dict[str, Any], config: dict[str, Any]):
    import numpy as np
    import xarray as xr

    method, options = _method_options(cell["method"], cell["lr"], config)
    dev = invariance_deviation(config["problem"], config["invariance_n"], method, config["invariance_steps"],
                               config["invariance_alpha"], config["batch_size"], **options)
    return xr.Dataset({"deviation": ("invariance_step", np.array(dev))},
                      coords={"invariance_step": np.arange(len(dev))})


# ---------------------------------------------------------------------------------------------- W4, W5
def _training(cell: dict[str, Any], config: dict[str, Any]):
    import numpy as np
    import xarray as xr

    import curvlab as cl

    prob = cl.problems.load(config["problem"], n=config["n"], seed=cell["seed"])
    method, options = _method_options(cell["method"], cell["lr"], config)
    steps, subsets = config["steps"], list(prob.param_names)
    nan = np.full(steps + 1, np.nan)
    out = {"loss": nan.copy(), "subset_lr": np.full((steps + 1, len(subsets)), np.nan),
           "final_theta": np.full(prob.num_params, np.nan), "fallbacks": -1, "refreshes": -1, "diverged": True}
    try:
        ds = cl.optim.train(prob, method, steps=steps, batch_size=config["batch_size"], seed=cell["seed"],
                            checkpoints=[steps], progress=False, **options)
    except FloatingPointError:
        ds = None
    if ds is not None:
        out.update(loss=ds["loss"].values, final_theta=ds["theta"].values[-1], diverged=False)
        if method == "grouped-newton":
            out.update(fallbacks=int(ds.attrs["state_fallbacks"]), refreshes=int(ds.attrs["state_refreshes"]),
                       subset_lr=ds["subset_lr"].sel(subset=subsets).values)
    return xr.Dataset({"loss": ("step", out["loss"]), "subset_lr": (("step", "subset"), out["subset_lr"]),
                       "final_theta": ("param", out["final_theta"]),
                       "final_loss": ((), float(out["loss"][-1])), "fallbacks": ((), out["fallbacks"]),
                       "refreshes": ((), out["refreshes"]), "diverged": ((), out["diverged"])},
                      coords={"step": np.arange(steps + 1), "subset": subsets, "param": np.arange(prob.num_params)})


def run_cell(cell: dict[str, Any], config: dict[str, Any]):
    """One cell of the study (see the module docstring for the parts)."""
    part = {"exactness": _exactness, "invariance": _invariance, "training": _training}[cell["part"]]
    return _attrs(part(cell, config), config)


# ---------------------------------------------------------------------------------------------- merging
def _training_part(datasets: list):
    import xarray as xr

    rows = []
    for d in datasets:
        method, lr = str(d["method"].values[0]), float(d["lr"].values[0])
        d = d.squeeze(["part", "method", "lr"], drop=True)
        rows.append(d.expand_dims(run=[f"{method} lr={lr:g}"]).assign_coords(
            run_method=("run", [method]), run_lr=("run", [lr])))
    out = xr.combine_by_coords(rows, data_vars="all", coords="different", compat="no_conflicts", join="outer",
                               combine_attrs="drop_conflicts")
    order = list(dict.fromkeys(str(r["run"].values[0]) for r in rows))
    return out.reindex(run=order)


def merge(datasets: list):
    """Return the cells' Datasets (each with length-1 dims part, method, lr, seed) as one Dataset.

    The exactness part on ``checkpoint``, the invariance part on (invariance_method, invariance_step), the training
    runs on (run, seed) with the non-index coordinates ``run_method`` and ``run_lr``.
    """
    import xarray as xr

    parts: dict[str, list] = {"exactness": [], "invariance": [], "training": []}
    for d in datasets:
        parts[str(d["part"].values[0])].append(d)
    pieces = [d.squeeze(["part", "method", "lr", "seed"], drop=True) for d in parts["exactness"]]
    inv = [d.squeeze(["part", "lr", "seed"]).drop_vars(["part", "seed"]).rename(
        method="invariance_method", lr="invariance_lr").set_coords("invariance_lr") for d in parts["invariance"]]
    if inv:
        inv = xr.concat(inv, "invariance_method", coords="different", compat="equals", join="outer")
        pieces.append(inv.assign_coords(invariance_method=inv["invariance_method"].values.astype(str)))
    if parts["training"]:
        pieces.append(_training_part(parts["training"]))
    return xr.merge(pieces, compat="no_conflicts", join="outer", combine_attrs="drop_conflicts")


# ---------------------------------------------------------------------------------------------- claims
def tuned(ds, method: str) -> tuple[str, float]:
    """Return (run, value) of ``method``'s tuned run.

    The tuned run has the lr whose geometric mean over seeds of the final training loss is smallest (a run
    with a diverged or non-finite seed counts as +inf).
    """
    import numpy as np

    runs = [str(r) for r, m in zip(ds["run"].values, ds["run_method"].values) if str(m) == method]
    if not runs:
        raise ValueError(f"no training run of {method!r} in the Dataset")
    final = ds["final_loss"].sel(run=runs).values
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.where(np.isfinite(final) & (final > 0), np.log(np.where(final > 0, final, 1.0)), np.inf)
    geo = np.exp(logs.mean(axis=1))
    best = int(np.argmin(geo))
    return runs[best], float(geo[best])


def _w1(ds) -> tuple[float, bool]:
    exact = max(float(ds[v].max()) for v in ("hbar_error", "gbar_error", "third_error"))
    fd = float(ds["third_fd_error"].max())
    return exact, exact < 1e-10 and fd < 1e-6


def _w2(ds) -> tuple[float, bool]:
    value = max(float(ds["trivial_error"].max()), float(ds["newton_error"].max()))
    return value, value < 1e-10


def _w3(ds) -> tuple[float, bool]:
    dev = ds["deviation"]
    gn = float(dev.sel(invariance_method="grouped-newton").max())
    others = min(float(dev.sel(invariance_method=m).isel(invariance_step=-1)) for m in ("sgd", "adam"))
    return gn, gn < 1e-8 and others > 1e-3


def _w4(ds) -> tuple[float, bool]:
    gn = tuned(ds, "grouped-newton")[1]
    ratio = gn / max(tuned(ds, "adam")[1], tuned(ds, "kfac")[1])
    return ratio, ratio <= 1.0


def _w5(ds) -> tuple[float, bool]:
    ratio = tuned(ds, "grouped-newton-diagonal")[1] / tuned(ds, "grouped-newton")[1]
    return ratio, ratio >= 1.0


CLAIMS = [
    Claim("W1", "H̄ and ḡ from the 1 + 2S backward passes are the projections I_{S:P} U H U I_{P:S} and "
                "I_{S:P} U g of the exact Hessian and gradient, and D⁽³⁾_iii is the third directional derivative "
                "of L along u restricted to subset i (Wolinski, derived)",
          "max over checkpoints of the relative errors of H̄, ḡ and D⁽³⁾ (vs nested autograd in t) < 1e-10, "
          "and D⁽³⁾ vs the central difference of H̄_ii < 1e-6; value: the largest of the first three",
          _w1),
    Claim("W2", "the extremes: S = 1 gives the optimal step along u, η = gᵀu/uᵀHu; S = P with u = −g gives "
                "Newton's step −H⁻¹g (Wolinski, abstract v1)",
          "max relative error of η (S = 1, over the checkpoints) and of the step (S = P, over the convex "
          "problem's iterates) < 1e-10", _w2),
    Claim("W3", "the trajectory is invariant under an affine reparametrisation of a subset (θ = αφ), SGD's "
                "and Adam's are not (Wolinski, abstract v3/v4)",
          "max over steps of ‖θ_t − θ′_t‖/‖θ_t‖ for GroupedNewton < 1e-8, and at the last step > 1e-3 for "
          "both SGD and Adam; value: GroupedNewton's maximum", _w3),
    Claim("W4", "GroupedNewton's training loss is competitive with tuned Adam and K-FAC (a clear win is not "
                "claimed; secondary summary of Wolinski v4)",
          "tuned GroupedNewton's geometric-mean (over seeds) final training loss ≤ the larger of tuned Adam's "
          "and tuned KFAC's; value: their ratio", _w4),
    Claim("W5", "hypothesis (not a paper claim): dropping H̄'s cross-subset terms (diagonal H̄) does no better "
                "than the full H̄",
          "tuned diagonal-H̄ geometric-mean final training loss ≥ tuned full-H̄'s; value: diagonal / full",
          _w5),
]


# ---------------------------------------------------------------------------------------------- figures
#: where exact zeros are drawn on the log-scale error plots
FLOOR = 1e-18


def _figure(width: float, height: float, ncols: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _exactness_figure(ds):
    import numpy as np

    fig, (ax, bx) = _figure(10.0, 4.2, 2)
    series = [("hbar_error", "H̄ vs I U H U I (dense Hessian)", "o"), ("gbar_error", "ḡ vs I U g", "s"),
              ("third_error", "D⁽³⁾ vs nested autograd in t", "^"),
              ("third_fd_error", "D⁽³⁾ vs central difference of H̄_ii", "v"),
              ("trivial_error", "S = 1: η vs gᵀu / uᵀHu", "D")]
    for var, label, marker in series:
        ax.plot(ds["checkpoint"].values, np.maximum(ds[var].values, FLOOR), marker=marker, label=label)
    ax.set(yscale="log", xlabel="training step of the GroupedNewton trajectory (seed 0)",
           ylabel="relative error (1)",
           title=f"W1/W2 on {ds.attrs.get('problem', '')}: exact to rounding; the central difference\n"
                 f"to its truncation error (exact zeros drawn at {FLOOR:g})")
    ax.title.set_fontsize(10)
    ax.axhline(1e-10, color="0.4", ls=":", lw=1, label="criterion 1e-10")
    ax.axhline(1e-6, color="tab:red", ls=":", lw=1, label="criterion 1e-6 (central difference)")
    ax.legend(fontsize=8, loc="center right")
    bx.plot(ds["newton_iterate"].values, np.maximum(ds["newton_error"].values, FLOOR), marker="o")
    bx.axhline(1e-10, color="0.4", ls=":", lw=1)
    bx.set(yscale="log", xlabel="iterate of the S = P step (convex logistic regression)",
           ylabel="‖Δθ − (−H⁻¹g)‖ / ‖H⁻¹g‖ (1)", title="W2: S = P, u = −g is Newton's step")
    bx.set_xticks(ds["newton_iterate"].values)
    return fig


def _subset_lr_figure(ds):
    import numpy as np

    run, _ = tuned(ds, "grouped-newton")
    lr = float(ds["run_lr"].sel(run=run))
    rates = lr * ds["subset_lr"].sel(run=run, seed=int(ds["seed"].values[0]))
    fig, (ax,) = _figure(7.5, 4.5)
    for s in ds["subset"].values:
        y = rates.sel(subset=s).values
        ax.plot(ds["step"].values, np.where(y > 0, y, np.nan), label=str(s))
    fb = ds["fallbacks"].sel(run=run).values
    ref = ds["refreshes"].sel(run=run).values
    clipped = float((ds["subset_lr"].sel(run=run).isel(step=slice(1, None)) == 0).mean())
    ax.set(yscale="log", xlabel="training step", ylabel="per-subset learning rate λ₁·η_s (1)",
           title=f"GroupedNewton's per-subset learning rates ({run}, seed {int(ds['seed'].values[0])})\n"
                 f"over all seeds: solver fallbacks in {int(fb.sum())} of {int(ref.sum())} refreshes, η_s clipped "
                 f"to 0 (gaps) in {100 * clipped:.0f}% of (step, subset)")
    ax.title.set_fontsize(9)
    ax.legend(title="subset", fontsize=8, ncols=2)
    return fig


def _invariance_figure(ds):
    import numpy as np

    fig, (ax,) = _figure(6.5, 4.2)
    for m in ds["invariance_method"].values:
        dev = ds["deviation"].sel(invariance_method=m)
        lr = float(ds["invariance_lr"].sel(invariance_method=m))
        ax.plot(ds["invariance_step"].values, np.maximum(dev.values, FLOOR), marker=".", label=f"{m} (lr {lr:g})")
    alpha = ds.attrs.get("invariance_alpha", "α")
    ax.set(yscale="log", xlabel="training step", ylabel="‖θ_t − θ′_t‖ / ‖θ_t‖ (1)",
           title=f"W3: trajectories with the first layer's weight stored as θ/{alpha}\n"
                 f"(exact zeros drawn at {FLOOR:g})")
    ax.title.set_fontsize(10)
    ax.legend(fontsize=9)
    return fig


def _training_figure(ds):
    import numpy as np

    fig, (ax,) = _figure(7.5, 4.8)
    steps = ds["step"].values
    for method in dict.fromkeys(str(m) for m in ds["run_method"].values):
        run, _ = tuned(ds, method)
        loss = ds["loss"].sel(run=run).values  # (seed, step)
        with np.errstate(divide="ignore", invalid="ignore"):
            geo = np.exp(np.nanmean(np.log(loss), axis=0))
        line, = ax.plot(steps, geo, label=f"{run}")
        ax.fill_between(steps, np.nanmin(loss, axis=0), np.nanmax(loss, axis=0), color=line.get_color(), alpha=0.15)
    ax.set(yscale="log", xlabel="training step", ylabel="training loss (nats)",
           title=f"Tuned runs on {ds.attrs.get('problem', '')} (n = {ds.attrs.get('n', '')}): geometric mean "
                 f"over {ds.sizes['seed']} seeds, band min–max")
    ax.title.set_fontsize(10)
    ax.legend(fontsize=8)
    return fig


def _tuning_figure(ds):
    import numpy as np

    fig, (ax,) = _figure(8.5, 4.5)
    cap = 3.0 * float(np.nanmax(ds["loss"].isel(step=0).values))  # above: a diverging run
    for method in dict.fromkeys(str(m) for m in ds["run_method"].values):
        runs = [str(r) for r, m in zip(ds["run"].values, ds["run_method"].values) if str(m) == method]
        lrs = ds["run_lr"].sel(run=runs).values
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            geo = np.exp(np.log(ds["final_loss"].sel(run=runs).values).mean(axis=1))
        line, = ax.plot(lrs, np.where(geo <= cap, geo, np.nan), marker="o", label=method,
                        ls="--" if "diagonal" in method else "-")
        high = ~(geo <= cap)
        ax.plot(lrs[high], np.full(int(high.sum()), cap), marker="^", ms=9, ls="none", color=line.get_color())
        best, value = tuned(ds, method)
        if math.isfinite(value):
            ax.plot(float(ds["run_lr"].sel(run=best)), value, marker="*", ms=14, color=line.get_color(), ls="none")
    ax.set(xscale="log", yscale="log", xlabel="learning rate (λ₁ for GroupedNewton)",
           ylabel="final training loss, geometric mean over seeds (nats)",
           title="Learning-rate grids (W4; W5: full vs diagonal H̄ on the same λ₁)\n★ tuned; ▲ above 3× the "
                 "initial loss or diverged")
    ax.title.set_fontsize(9)
    fig.legend(fontsize=8, loc="outside right center")
    return fig


def figures(ds) -> dict:
    """Return the study's figures: exactness, subset-lr, invariance, training, tuning (each when its part is there)."""
    out = {}
    if "hbar_error" in ds:
        out["exactness"] = _exactness_figure(ds)
    if "final_loss" in ds:
        out["subset-lr"] = _subset_lr_figure(ds)
        out["training"] = _training_figure(ds)
        out["tuning"] = _tuning_figure(ds)
    if "deviation" in ds:
        out["invariance"] = _invariance_figure(ds)
    return out


# ---------------------------------------------------------------------------------------------- the study
VARIABLES = {
    "theta": ("parameter", "flat parameters of the exactness trajectory at each checkpoint (problem seed 0)"),
    "checkpoint": ("step", "training step of the GroupedNewton trajectory where the summaries are checked"),
    "checkpoint_loss": ("nats", "training loss at the checkpoint"),
    "hbar_error": ("1", "‖H̄ − I_{S:P} U H U I_{P:S}‖_F / ‖I_{S:P} U H U I_{P:S}‖_F, u = −∇L, dense exact Hessian"),
    "gbar_error": ("1", "‖ḡ − I_{S:P} U g‖ / ‖I_{S:P} U g‖"),
    "third_error": ("1", "‖D⁽³⁾ − (d³/dt³ L(θ + t u_{T_i}))_i‖ / ‖·‖, the reference by nested autograd in t"),
    "third_fd_error": ("1", "relative error of the central difference of H̄_ii along u_{T_i} against the nested "
                            "autograd reference (h = fd_step/‖u_{T_i}‖)"),
    "trivial_error": ("1", "S = 1: |η − gᵀu/uᵀHu| / |gᵀu/uᵀHu| (λ_int = 0)"),
    "trivial_lr": ("1", "S = 1: η from the summary's solver"),
    "cauchy_lr": ("1", "gᵀu/uᵀHu from the dense Hessian"),
    "hbar": ("loss", "H̄ (S×S), u = −∇L"),
    "third": ("loss", "D⁽³⁾_iii (S), u = −∇L"),
    "subset": ("1", "subset of the canonical partition (one per parameter tensor)"),
    "subset_j": ("1", "second subset index of H̄"),
    "newton_iterate": ("1", "iterate of the S = P step on the convex logistic regression (0 = its initialisation)"),
    "newton_error": ("1", "‖Δθ_GN − (−H⁻¹g)‖ / ‖H⁻¹g‖ for S = P, u = −g, λ_int = 0"),
    "invariance_method": ("1", "method trained in both parametrisations"),
    "invariance_lr": ("1", "its learning rate (λ₁ for grouped-newton)"),
    "invariance_step": ("step", "training step (0 = the common start)"),
    "deviation": ("1", "‖θ_t − θ′_t‖ / ‖θ_t‖, θ′ the trajectory of the reparametrised network in θ-coordinates"),
    "run": ("1", "training run: method and learning rate"),
    "run_method": ("1", "the run's method (grouped-newton-diagonal: the diagonal-H̄ ablation)"),
    "run_lr": ("1", "the run's learning rate (λ₁ for GroupedNewton)"),
    "seed": ("1", "problem seed (data subset and initialisation) and minibatch-order seed of a training run"),
    "step": ("step", "optimizer step (0 = before the first update)"),
    "loss": ("nats", "training loss on all n samples after the step (NaN: the run diverged)"),
    "final_loss": ("nats", "training loss after the last step"),
    "final_theta": ("parameter", "flat parameters after the last step"),
    "subset_lr": ("1", "GroupedNewton's η_s after the step (EMA of the solver's η, negatives clipped); the step "
                       "of subset s is −λ₁ η_s u_s; NaN for other methods"),
    "fallbacks": ("1", "refreshes whose cubic solve fell back to η = 0 (−1: not GroupedNewton or diverged)"),
    "refreshes": ("1", "summary refreshes during the run (−1: not GroupedNewton or diverged)"),
    "diverged": ("1", "the loss or gradient became non-finite (cl.optim.train raised)"),
    "param": ("1", "index into the flat parameter vector (the problem's parameter order)"),
}


def _attrs(ds, config: dict[str, Any]):
    ds.attrs.update(problem=config["problem"], n=int(config["n"]), seed=0,
                    invariance_alpha=float(config["invariance_alpha"]), invariance_n=int(config["invariance_n"]),
                    seed_note="attrs seed: the exactness trajectory's problem seed; a training run's problem is "
                              "cl.problems.load(problem, n=n, seed=<its seed coordinate>)")
    return ds


STUDY = Study(
    name="grouped-newton",
    description="GroupedNewton on digits: exactness of H̄ and D, the S = 1 / S = P extremes, invariance to "
                "rescaling a layer, training against Adam, KFAC and SGD, and the diagonal-H̄ ablation",
    paper="Wolinski (2023-2025), arXiv:2312.03885",
    config={"problem": "digits-mlp", "n": 1437, "steps": 200, "batch_size": 128, "seeds": 5,
            "damping_int": 1.0, "period": 10, "gn_lr": [0.03, 0.1, 0.3, 1.0],
            "adam_lr": [0.003, 0.01, 0.03, 0.1], "kfac_lr": [0.003, 0.01, 0.03, 0.1], "sgd_lr": [0.03, 0.1, 0.3, 1.0],
            "exact_steps": [0, 50, 100, 200],
            "fd_step": 1e-5, "newton_iterates": 4,
            "invariance_lr": {"grouped-newton": 0.1, "sgd": 0.1, "adam": 0.01}, "invariance_steps": 50,
            "invariance_alpha": 10.0, "invariance_n": 256},
    quick={"n": 256, "steps": 30, "seeds": 2, "gn_lr": [0.1], "adam_lr": [0.01], "kfac_lr": [0.01],
           "sgd_lr": [0.1], "exact_steps": [0, 30], "newton_iterates": 2, "invariance_steps": 10},
    cells=_cells,
    run_cell=run_cell,
    merge=merge,
    claims=CLAIMS,
    figures=figures,
    variables=VARIABLES,
    check=_check,
    version="1",
)
