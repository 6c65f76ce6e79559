"""trace-restricted: how trace-restricted and eigenvalue-corrected KFAC approximate the exact layer blocks.

TKFAC (Gao et al., AAAI 2021, arXiv 2011.10741) rescales each layer's Kronecker product so that its
trace equals the exact block's, F_l ≈ c_l A ⊗ G with c_l = tr F_l / (tr A tr G); EKFAC (George et
al. 2018, arXiv 1806.03884) keeps KFAC's eigenbasis Q_A ⊗ Q_G and replaces its eigenvalues by the
second moments S* of the per-sample gradients in that basis; TEKFAC (Gao et al., arXiv 2011.13609)
combines both. The TEKFAC paper's own eigenvalue and damping rules could not be checked, so curvlab
defines TEKFAC *provisionally*: its matrix equals EKFAC's, only its damping (TKFAC's trace-normalised
factored damping applied to S*) differs — so TEKFAC's matrix errors and traces equal EKFAC's by
construction, and only its damped updates (``damping_rule="own"``) and its training differ. KFOC
(the Frobenius-optimal single Kronecker product, Van Loan & Pitsianis 1993) is the best any single
Kronecker product can do.

**Approximation** (one cell per checkpoint of an SGD trajectory on ``cl.problems.load(problem,
n=n, seed=seed)``: minibatches of ``batch_size``, ``trajectory_lr``, ``momentum``). At each
checkpoint the whole problem is the curvature batch. For the GGN (= the exact Fisher for
cross-entropy; ``fisher="ggn"``) and the empirical Fisher (``"empirical_fisher"``), the exact layer
blocks F_l (``cl.exact.ggn`` / ``cl.exact.empirical_fisher``, ``structure="block"``) against each
approximation F̂ of the same Fisher type built on the same batch (no running averages):

    relative_error = ‖F̂_l − F_l‖_F / ‖F_l‖_F,    trace_ratio = tr F̂_l / tr F_l,
    direction_cosine = cos(−(F̂_l ⊕ λ)⁻¹ g_l, −(F_l + λI)⁻¹ g_l)   per layer, for every λ of ``damping``,

where (F̂_l ⊕ λ)⁻¹ is the exact (F̂_l + λI)⁻¹ (``damping_rule="exact"``) or the method's own damping
(``"own"``: π-damping for KFAC and KFOC, trace-normalised factored damping for TKFAC and TEKFAC,
exact for EKFAC), and ``trace_factor`` = c_l of TKFAC.

**Training** (one cell per method × seed): ``cl.optim.train`` with ``kfac``, ``tkfac``, ``ekfac`` and
``tekfac`` at ``lr``, ``train_damping`` and the library's other defaults (momentum 0.9, KL-clipping
10⁻², running averages with decay 0.95, inverses every 10 steps, each method's own damping rule),
``train_steps`` steps of ``batch_size``. The run of ``train_seed`` s trains
``cl.problems.load(problem, n=n, seed=s)`` (its initialisation and data subset) with minibatch
seed s.

``threads`` as in :mod:`curvlab.studies.kfac_vs_newton` (one torch thread per cell; run the cells
in parallel with ``--processes``).

Claims T1–T4: T1 and T2 are exact identities (checked to a relative tolerance of 10⁻¹⁰), T3 is
empirical, T4 is a training claim (small or no differences are expected on a network this small;
the effect sizes are what the study reports).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from curvlab.studies import Claim, Study, checks
from curvlab.studies.kfac_vs_newton import torch_threads, trajectory_theta

if TYPE_CHECKING:  # pragma: no cover
    import xarray as xr
    from torch import Tensor

    from curvlab.problem import Problem

__all__ = ["STUDY", "CLAIMS", "METHODS", "FISHERS", "TRAIN_METHODS", "DAMPING_RULES", "run_cell", "approximations",
           "exact_blocks", "block_measures", "final_log_losses", "effect_sizes", "figures", "IDENTITY_TOLERANCE"]

#: the approximations compared with the exact blocks (``method`` coordinate)
METHODS = ("kfac", "tkfac", "ekfac", "tekfac", "kfoc")
#: the Fisher types (``fisher`` coordinate): the GGN (true Fisher) and the empirical Fisher
FISHERS = ("ggn", "empirical_fisher")
#: the damping rules of the direction cosines (``damping_rule`` coordinate)
DAMPING_RULES = ("exact", "own")
#: the training methods (``train_method`` coordinate)
TRAIN_METHODS = ("kfac", "tkfac", "ekfac", "tekfac")
#: relative tolerance of the exact identities T1 and T2 (float64)
IDENTITY_TOLERANCE = 1e-10
_CELL_KEYS = ("task", "trajectory_step", "optimizer", "seed")


def _problem(config: Mapping[str, Any], seed: int | None = None) -> Problem:
    import curvlab as cl

    return cl.problems.load(config["problem"], n=config["n"], seed=config["seed"] if seed is None else seed)


def _attrs(prob: Problem, config: Mapping[str, Any]) -> dict[str, Any]:
    return {"problem": prob.name, "n": int(prob.meta["n"]), "seed": int(config["seed"]),
            "loss_function": type(prob.loss_fn).__name__, "batch_size": int(config["batch_size"]),
            "momentum": float(config["momentum"]), "trajectory_lr": float(config["trajectory_lr"]),
            "tekfac_definition": "provisional: EKFAC's matrix with TKFAC's trace-normalised damping"}


# ---------------------------------------------------------------------------------------------- approximation
def exact_blocks(batch: Problem, fisher: str) -> Any:
    """Return the exact diagonal blocks of the GGN or the empirical Fisher (``structure="block"``)."""
    import curvlab as cl

    if fisher == "ggn":
        return cl.exact.ggn(batch, structure="block")
    if fisher == "empirical_fisher":
        return cl.exact.empirical_fisher(batch, structure="block")
    raise ValueError(f"unknown fisher {fisher!r}; use one of {FISHERS}")


def approximations(batch: Problem, fisher: str) -> dict[str, Any]:
    """Return {method: its approximation of the Fisher type ``fisher`` on the batch} for :data:`METHODS`."""
    import curvlab as cl

    return {m: getattr(cl.approx, m)(batch, fisher=fisher) for m in METHODS}


def _block_cos(x: Tensor, y: Tensor) -> float:
    nx, ny = float(x.norm()), float(y.norm())
    return float(x @ y) / (nx * ny) if nx > 0 and ny > 0 else math.nan


def block_measures(batch: Problem, fisher: str, dampings: list[float]) -> dict[str, Any]:
    """Return the per-method, per-layer measures of the block approximations.

    Relative Frobenius error, trace ratio, TKFAC's c_l, and the cosines of the damped block updates, as
    NumPy arrays (method, block), (block,) and (λ, rule, method, block).
    """
    import numpy as np

    import curvlab as cl

    F = exact_blocks(batch, fisher)
    approx = approximations(batch, fisher)
    names, slices = list(batch.partition.names), batch.partition.slices
    err = np.array([[cl.compare.relative_error(approx[m], F).blocks[b] for b in names] for m in METHODS])
    tr = np.array([[cl.compare.trace_ratio(approx[m], F).blocks[b] for b in names] for m in METHODS])
    c = np.array([approx["tkfac"].info[b]["c"] for b in names])
    g = batch.gradient()
    cos = np.zeros((len(dampings), len(DAMPING_RULES), len(METHODS), len(names)))
    for i, lam in enumerate(dampings):
        x_exact = F.direction(g, lam)
        for r, rule in enumerate(DAMPING_RULES):
            for k, m in enumerate(METHODS):
                x = approx[m].direction(g, lam, mode=rule)
                cos[i, r, k] = [_block_cos(x[s], x_exact[s]) for s in slices]
    return {"relative_error": err, "trace_ratio": tr, "trace_factor": c, "direction_cosine": cos}


def _approximation_cell(checkpoint: int, config: Mapping[str, Any]) -> xr.Dataset:
    import numpy as np
    import xarray as xr

    prob = _problem(config)
    theta = trajectory_theta(prob, checkpoint, config)
    batch = prob.at(theta)
    dampings = [float(d) for d in config["damping"]]
    per = [block_measures(batch, f, dampings) for f in config["fishers"]]
    stack = {k: np.stack([p[k] for p in per])[None] for k in per[0]}
    head = ("checkpoint", "fisher")
    data = {"theta": (("checkpoint", "param"), theta.numpy()[None]), "loss": (("checkpoint",), [batch.loss()]),
            "relative_error": ((*head, "method", "block"), stack["relative_error"]),
            "trace_ratio": ((*head, "method", "block"), stack["trace_ratio"]),
            "trace_factor": ((*head, "block"), stack["trace_factor"]),
            "direction_cosine": ((*head, "damping", "damping_rule", "method", "block"), stack["direction_cosine"])}
    coords = {"checkpoint": [checkpoint], "fisher": list(config["fishers"]), "method": list(METHODS),
              "block": list(prob.partition.names), "damping": dampings, "damping_rule": list(DAMPING_RULES),
              "param": np.arange(prob.num_params)}
    return xr.Dataset(data, coords=coords, attrs=_attrs(prob, config))


# ---------------------------------------------------------------------------------------------- training
def _training_cell(method: str, seed: int, config: Mapping[str, Any]) -> xr.Dataset:
    import numpy as np
    import xarray as xr

    import curvlab as cl

    prob = _problem(config, seed)
    steps = config["train_steps"]
    loss = seconds = np.full(steps + 1, np.nan)
    try:
        ds = cl.optim.train(prob, method, steps=steps, batch_size=config["batch_size"], seed=seed, progress=False,
                            lr=config["lr"], damping=config["train_damping"], fisher="ggn")
        loss, seconds = ds["loss"].values, ds["seconds"].values
    except FloatingPointError:  # the loss or gradient stopped being finite: a diverged run
        pass
    dims = ("train_method", "train_seed")
    return xr.Dataset({"train_loss": ((*dims, "step"), loss[None, None]),
                       "train_seconds": ((*dims, "step"), seconds[None, None])},
                      coords={"train_method": [method], "train_seed": [seed], "step": np.arange(steps + 1)},
                      attrs=_attrs(_problem(config), config))


def run_cell(cell: dict[str, Any], config: dict[str, Any]) -> xr.Dataset:
    """One cell: the block comparison at a checkpoint, or one training run (the cell's ``task``)."""
    with torch_threads(config["threads"]):
        if cell["task"] == "approximation":
            return _approximation_cell(cell["trajectory_step"], config)
        return _training_cell(cell["optimizer"], cell["seed"], config)


def _cells(config: Mapping[str, Any]) -> list[dict[str, Any]]:
    cells = [{"task": "approximation", "trajectory_step": int(c), "optimizer": "-", "seed": -1}
             for c in config["checkpoints"]]
    cells += [{"task": "training", "trajectory_step": -1, "optimizer": m, "seed": int(s)}
              for m in config["train_methods"] for s in range(config["train_seeds"])]
    return cells


def _merge(datasets: list[xr.Dataset]) -> xr.Dataset:
    """Approximation cells concatenated along ``checkpoint``, training runs combined by coordinates."""
    import xarray as xr

    parts: dict[str, list[xr.Dataset]] = {"approximation": [], "training": []}
    for d in datasets:
        task = str(d["task"].values.reshape(-1)[0])
        squeeze = {k: 0 for k in _CELL_KEYS if k in d.dims}
        parts[task].append(d.isel(squeeze, drop=True).drop_vars([k for k in _CELL_KEYS if k in d.coords],
                                                                errors="ignore"))
    merged = []
    if parts["approximation"]:
        merged.append(xr.concat(sorted(parts["approximation"], key=lambda d: int(d["checkpoint"].values[0])),
                                dim="checkpoint", data_vars="minimal", coords="minimal", compat="override",
                                combine_attrs="drop_conflicts"))
    if parts["training"]:
        merged.append(xr.combine_by_coords(parts["training"], combine_attrs="drop_conflicts"))
    return xr.merge(merged, combine_attrs="drop_conflicts")


# ---------------------------------------------------------------------------------------------- claims
def _t1(ds: xr.Dataset) -> tuple[float, bool]:
    """Return max |tr F̂ / tr F − 1| over TKFAC, EKFAC, TEKFAC and max |c_l tr(KFAC)/tr F − 1|."""
    import numpy as np

    tr = ds["trace_ratio"]
    exact = float(np.abs(tr.sel({"method": ["tkfac", "ekfac", "tekfac"]}) - 1).max())
    kfac = float(np.abs(tr.sel({"method": "kfac"}) * ds["trace_factor"] - 1).max())
    worst = max(exact, kfac)
    return worst, worst <= IDENTITY_TOLERANCE


def _t2(ds: xr.Dataset) -> tuple[float, bool]:
    """Return max of err(EKFAC) − min(err(KFAC), err(TKFAC)) (≤ 0 where the identity holds)."""
    err = ds["relative_error"]
    e = err.sel({"method": "ekfac"})
    other = err.sel({"method": ["kfac", "tkfac"]}).min("method")
    excess = float((e - other).max())
    return excess, excess <= IDENTITY_TOLERANCE


def _t3(ds: xr.Dataset) -> tuple[float, bool]:
    err = ds["relative_error"].sel({"fisher": "ggn"})
    share = float((err.sel({"method": "tkfac"}) < err.sel({"method": "kfac"})).mean())
    return share, share > 0.5


def final_log_losses(ds: xr.Dataset) -> xr.DataArray:
    """Return log10 of each run's final training loss (train_method, train_seed); +inf for a diverged run.

    The final loss is the mean over the last 10 % of the run's steps.
    """
    import numpy as np

    from curvlab.studies.kfac_vs_newton import final_loss

    final = final_loss(ds["train_loss"])
    return np.log10(final.where(np.isfinite(final) & (final > 0), np.inf))


def effect_sizes(ds: xr.Dataset, versus: str) -> tuple[float, float]:
    """Return the paired effect size of TEKFAC against ``versus`` from the final training losses.

    (mean over seeds of log10 L(tekfac) − log10 L(versus), that mean / its standard deviation: the
    paired effect size d_z), from the final training losses (NaN d_z for fewer than 2 seeds).
    """
    import numpy as np

    logs = final_log_losses(ds)
    diff = (logs.sel(train_method="tekfac") - logs.sel(train_method=versus)).values
    mean = float(np.mean(diff))
    sd = float(np.std(diff, ddof=1)) if diff.size > 1 else math.nan
    return mean, mean / sd if sd > 0 else math.nan


def _t4(ds: xr.Dataset) -> tuple[float, bool]:
    worst = max(effect_sizes(ds, "ekfac")[0], effect_sizes(ds, "tkfac")[0])
    return worst, worst < 0


CLAIMS = [
    Claim("T1", "TKFAC and EKFAC (and TEKFAC) have the exact block's trace; KFAC's trace ratio is 1/c_l",
          f"max over checkpoints, Fisher types and layers of |tr F̂/tr F − 1| (TKFAC, EKFAC, TEKFAC) and "
          f"|c_l · tr(KFAC)/tr F − 1| ≤ {IDENTITY_TOLERANCE:g}; value: the largest deviation", _t1),
    Claim("T2", "EKFAC's Frobenius error is at most TKFAC's and KFAC's (it is optimal in their eigenbasis)",
          f"max over checkpoints, Fisher types and layers of err(EKFAC) − min(err(KFAC), err(TKFAC)) ≤ "
          f"{IDENTITY_TOLERANCE:g}; value: that maximum", _t2),
    Claim("T3", "TKFAC's Frobenius error is typically below KFAC's",
          "share of layers × checkpoints (GGN) where err(TKFAC) < err(KFAC) > 1/2; value: the share", _t3),
    Claim("T4", "in training, TEKFAC (provisional definition) does at least as well as EKFAC and TKFAC",
          "mean over seeds of log10 L(tekfac) − log10 L(X) < 0 for X = ekfac and X = tkfac (L: the training "
          "loss averaged over the last 10 % of the steps); value: the larger of the two means, in decades", _t4),
]


# ---------------------------------------------------------------------------------------------- figures
_LABELS = {"kfac": "KFAC", "tkfac": "TKFAC", "ekfac": "EKFAC", "tekfac": "TEKFAC (provisional)", "kfoc": "KFOC"}
_COLORS = {"kfac": "C0", "tkfac": "C1", "ekfac": "C2", "tekfac": "C3", "kfoc": "C4"}
_STYLE = {"ggn": "-", "empirical_fisher": "--"}
_FISHER_LABEL = {"ggn": "GGN (true Fisher)", "empirical_fisher": "empirical Fisher"}


def _panels(n: int, height: float = 3.6, sharey: bool = True) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 3.6 * n + 2.2), height), layout="constrained")
    return fig, fig.subplots(1, n, sharey=sharey, squeeze=False)[0]


def _steps_axis(ax: Any, ds: xr.Dataset) -> None:
    """Checkpoint steps on a symmetric-log axis: linear up to the first nonzero checkpoint, then log."""
    steps = sorted(int(c) for c in ds["checkpoint"].values)
    linthresh = max(1, steps[1] if len(steps) > 1 else 1)
    ax.set_xscale("symlog", linthresh=linthresh)
    ax.set_xlim(-0.2 * linthresh, 1.3 * max(steps[-1], linthresh))
    ax.set_xlabel("SGD step (checkpoint)")
    ax.grid(alpha=0.3)


def _errors_figure(ds: xr.Dataset) -> Any:
    blocks = list(ds["block"].values)
    fig, axes = _panels(len(blocks))
    steps = ds["checkpoint"].values
    for ax, block in zip(axes, blocks):
        for fisher in ds["fisher"].values:
            for m in METHODS:
                if m == "tekfac":  # its matrix is EKFAC's (provisional definition)
                    continue
                err = ds["relative_error"].sel({"fisher": fisher, "method": m, "block": block})
                ax.plot(steps, err, _STYLE[str(fisher)], marker="o", ms=3, color=_COLORS[m],
                        label=f"{_LABELS[m]}, {_FISHER_LABEL[str(fisher)]}")
        ax.set(yscale="log", title=f"layer {block}")
        _steps_axis(ax, ds)
    axes[0].set_ylabel("relative error ‖F̂_l − F_l‖_F / ‖F_l‖_F")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=8,
               title="TEKFAC's matrix = EKFAC's\n(provisional definition)", title_fontsize=8)
    fig.suptitle(f"{ds.attrs.get('problem', '')}: how far each Kronecker approximation is from the exact layer "
                 "block along SGD training", fontsize=10)
    return fig


def _traces_figure(ds: xr.Dataset) -> Any:
    fishers = [str(f) for f in ds["fisher"].values]
    fig, axes = _panels(len(fishers))
    steps = ds["checkpoint"].values
    for ax, fisher in zip(axes, fishers):
        for j, block in enumerate(ds["block"].values):
            sel = {"fisher": fisher, "block": block}
            ax.plot(steps, ds["trace_ratio"].sel({**sel, "method": "kfac"}), "-", marker="o", ms=3, color=f"C{j}",
                    label=f"KFAC, layer {block} (= 1/c_l)")
            ax.plot(steps, ds["trace_ratio"].sel({**sel, "method": "kfoc"}), ":", marker="s", ms=3, color=f"C{j}",
                    label=f"KFOC, layer {block}")
        ax.axhline(1.0, color="k", lw=1.5, alpha=0.6, label="TKFAC, EKFAC, TEKFAC (exactly 1)")
        ax.set(title=_FISHER_LABEL[fisher])
        _steps_axis(ax, ds)
    axes[0].set_ylabel("trace ratio tr F̂ / tr F of the layer block")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=8)
    fig.suptitle(f"{ds.attrs.get('problem', '')}: KFAC's trace is off by the factor c_l that TKFAC restores",
                 fontsize=10)
    return fig


def _directions_figure(ds: xr.Dataset) -> Any:
    blocks = list(ds["block"].values)
    fig, axes = _panels(len(blocks))
    lam = ds["damping"].values
    cos = ds["direction_cosine"].sel({"fisher": "ggn"}).median("checkpoint")
    for ax, block in zip(axes, blocks):
        for m in METHODS:
            for rule, style in (("exact", "-"), ("own", "--")):
                ax.plot(lam, cos.sel({"method": m, "block": block, "damping_rule": rule}), style, marker="o", ms=3,
                        color=_COLORS[m], label=f"{_LABELS[m]}, {'(F̂ + λI)⁻¹' if rule == 'exact' else 'own damping'}")
        ax.set(xscale="log", xlabel="damping λ", title=f"layer {block}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("cosine with the exact damped block update\n−(F_l + λI)⁻¹ g_l (median over checkpoints)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=8)
    fig.suptitle(f"{ds.attrs.get('problem', '')}: do the approximations' damped updates point where the exact "
                 "block's does? (GGN)", fontsize=10)
    return fig


def _training_figure(ds: xr.Dataset) -> Any:
    fig, axes = _panels(2, sharey=False)
    left, right = axes
    steps = ds["step"].values
    logs = final_log_losses(ds)
    for m in ds["train_method"].values:
        m = str(m)
        loss = ds["train_loss"].sel(train_method=m)
        left.plot(steps, loss.median("train_seed"), color=_COLORS[m], label=_LABELS[m])
        left.fill_between(steps, loss.min("train_seed"), loss.max("train_seed"), color=_COLORS[m], alpha=0.15, lw=0)
        right.scatter(logs.sel(train_method=m).values, [_LABELS[m]] * ds.sizes["train_seed"], color=_COLORS[m], s=20)
    left.set(yscale="log", xlabel="optimizer step", ylabel=f"training loss ({ds.attrs.get('loss_function', '')})")
    left.legend(fontsize=8, title=f"median and range over {ds.sizes['train_seed']} seeds", title_fontsize=8)
    right.set(xlabel="log10 final training loss (mean over the last 10 % of the steps; a dot per seed)")
    notes = []
    for other in ("ekfac", "tkfac"):
        if "tekfac" in ds["train_method"].values and other in ds["train_method"].values:
            mean, dz = effect_sizes(ds, other)
            notes.append(f"TEKFAC − {_LABELS[other]}: {mean:+.3f} decades (d_z = {dz:+.2f})")
    right.set_title("\n".join(notes) or "final losses", fontsize=9)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"{ds.attrs.get('problem', '')}: training with KFAC, TKFAC, EKFAC and TEKFAC (provisional)",
                 fontsize=10)
    return fig


def figures(ds: xr.Dataset) -> dict[str, Any]:
    """Return the study's figures.

    ``errors`` (relative Frobenius error per layer over training), ``traces`` (trace ratios and c_l),
    ``directions`` (cosines of the damped block updates vs λ) and ``training`` (curves over seeds).
    """
    out = {}
    if "relative_error" in ds:
        out.update(errors=_errors_figure(ds), traces=_traces_figure(ds), directions=_directions_figure(ds))
    if "train_loss" in ds:
        out["training"] = _training_figure(ds)
    return out


# ---------------------------------------------------------------------------------------------- the study
def _check(config: Mapping[str, Any]) -> None:
    checks.canned_problem(config)
    checks.positive_integers(config, ("n", "batch_size", "train_steps"))
    checks.non_negative_integers(config, ("train_seeds", "threads"))
    checks.distinct_steps(config, "checkpoints")
    checks.positive_numbers(config, "damping")
    bad = [f for f in config["fishers"] if f not in FISHERS] + \
          [m for m in config["train_methods"] if m not in TRAIN_METHODS]
    if bad or not config["fishers"]:
        raise ValueError(f"fishers must be a non-empty subset of {list(FISHERS)} and train_methods of "
                         f"{list(TRAIN_METHODS)}; got {bad or config['fishers']}")


STUDY = Study(
    name="trace-restricted",
    description="KFAC, TKFAC, EKFAC, TEKFAC (provisional) and KFOC against the exact layer blocks: traces, "
                "Frobenius errors, damped-update cosines along SGD training; training over seeds",
    paper="Gao et al. (2021), Trace-restricted Kronecker-factored approximation, arXiv:2011.10741; Gao et al. "
          "(2020), TEKFAC, arXiv:2011.13609; George et al. (2018), EKFAC, arXiv:1806.03884",
    config={"problem": "digits-mlp", "n": 1024, "seed": 0, "batch_size": 64, "momentum": 0.9, "trajectory_lr": 0.1,
            "checkpoints": [0, 10, 25, 50, 100, 200, 400], "fishers": list(FISHERS),
            "damping": [1e-4, 1e-3, 1e-2, 1e-1, 1.0],
            "train_methods": list(TRAIN_METHODS), "train_seeds": 5, "train_steps": 200, "lr": 0.1,
            "train_damping": 0.01, "threads": 1},
    quick={"n": 256, "checkpoints": [0, 100], "damping": [1e-3, 1e-1], "train_seeds": 2, "train_steps": 30},
    cells=_cells,
    run_cell=run_cell,
    merge=_merge,
    claims=CLAIMS,
    figures=figures,
    check=_check,
    variables={
        "theta": ("parameter", "flat parameters at the checkpoint (the problem's parameter order)"),
        "loss": ("loss", "training loss L(θ) on the curvature batch (all n samples) at the checkpoint"),
        "relative_error": ("1", "‖F̂_l − F_l‖_F / ‖F_l‖_F: the approximation's layer block against the exact one "
                                "(TEKFAC's matrix equals EKFAC's: provisional definition)"),
        "trace_ratio": ("1", "tr F̂_l / tr F_l of the layer block"),
        "trace_factor": ("1", "TKFAC's c_l = tr F_l / (tr A tr G) of the layer"),
        "direction_cosine": ("1", "cosine of the method's damped update of the layer with the exact one, "
                                  "−(F_l + λI)⁻¹ g_l"),
        "train_loss": ("loss", "training loss on all n samples after each step (NaN: diverged)"),
        "train_seconds": ("s", "wall-clock time of the optimizer steps since the start of the run"),
        "checkpoint": ("step", "SGD step of the trajectory at which the blocks are compared"),
        "fisher": ("1", "curvature approximated: ggn (the true Fisher for these losses) or empirical_fisher"),
        "method": ("1", "approximation: kfac, tkfac, ekfac, tekfac (provisional), kfoc"),
        "block": ("1", "layer: block of the problem's partition (nn.Sequential index)"),
        "damping": ("1", "λ of the damped updates (same units as the curvature)"),
        "damping_rule": ("1", "exact: (F̂ + λI)⁻¹; own: the method's own damping rule (π for KFAC/KFOC, "
                              "trace-normalised for TKFAC/TEKFAC, exact for EKFAC)"),
        "param": ("1", "index into the flat parameter vector"),
        "train_method": ("1", "training method (cl.optim)"),
        "train_seed": ("1", "seed of the run: cl.problems.load(problem, n=n, seed=train_seed), minibatch seed"),
        "step": ("step", "optimizer step of the training runs (0: initialisation)"),
    },
    version="1",
)
