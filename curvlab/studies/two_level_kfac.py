"""Two-level KFAC: whether coarse-space corrections of KFAC's cross-layer curvature help.

After Koroko, Anciaux-Sedrakian, Ben Gharbia, Garès, Haddou & Tran 2023, "Analysis and Comparison of
Two-Level KFAC Methods for Training Deep Neural Networks", arXiv 2303.18083.

**Linear algebra** (cells ``part="algebra"``, one per problem × checkpoint). Problems
``digits-mlp-deep`` (L = 4 layers) and ``digits-autoencoder-relu`` (L = 6). A plain SGD trajectory
(``cl.optim.train(prob, "sgd", …)`` on ``cl.problems.load(problem, n=train_n, seed=seed)``, batch
``batch_size``, lr ``trajectory_lr[problem]``, momentum ``trajectory_momentum``) gives θ at the steps
``checkpoints`` (stored in ``theta``); at each, on the curvature batch
``cl.problems.load(problem, n=n[problem], seed=seed).at(θ)`` with its gradient g, its exact GGN F
(``cl.exact.ggn(batch, "low_rank")``, = the Fisher for these losses) and its KFAC K (type-2), for
every λ in ``damping``:

* x* = (F + λI)⁻¹g (Woodbury), x_K = M_λ⁻¹g with the fine rule of the paper's code, λ on each factor,
  M_λ = (A + λI) ⊗ (G + λI) per layer (``"koroko"``);
* for every coarse space (``cl.approx.two_level_kfac(batch, coarse=…, damping=λ, fine=K, gradient=g)``)
  the additive two-level update x_A = −T.direction(g, λ) (the one the paper trains with) and the
  deflated update x_D = −T.deflated_direction(g, λ) = x_K + Zβ*, and T.energy_gain(g, λ) =
  [E(β*) − E(0)] / ‖x_K − x*‖²_{F+λI};
* the energy errors ‖x − x*‖_{F+λI} / ‖x*‖_{F+λI} and cos(x, x*) of x_K, x_A, x_D.

The six TwoLevel objects of one batch and λ share one LowRank F (the same matrix, the GGN of the same
batch), so that its Woodbury factorisation is computed once per λ.

**Training** (cells ``part="train"``, problem × method × seed): KFAC, the six ``kfac-2l-<coarse>``
methods of :mod:`curvlab.optim`, SGD (momentum 0.9) and Adam, ``epochs`` epochs of minibatches
``batch_size`` on ``cl.problems.load(problem, n=train_n, seed=s)`` for s = 0 … ``seeds`` − 1 (the
seed fixes the initial parameters, the minibatch order and the sampled labels), each with
:func:`curvlab.studies.kbfgs_autoencoder.timed_training` (one torch thread, a warm-up step,
per-step wall-clock and CPU time). KFAC and the two-level methods share lr, λ, the Monte-Carlo Fisher
of ``curvature_fraction`` of each batch (the authors' quarter of the batch, sampled labels), KL
clipping 10⁻², momentum 0.9 and the fine damping λ on each factor: the KFAC baseline is ``kfac`` with
``damping_rule="factored"`` and damping λ², which is (A + √λ²I) ⊗ (G + √λ²I) = the ``"koroko"`` rule.
The time comparison uses the CPU time of the steps (``cpu_seconds``; ``seconds`` is the wall-clock
as measured, which on a shared machine includes other processes' load).

Layout: the algebra variables have dimensions (problem, checkpoint, damping[, coarse]), ``theta``
(problem, checkpoint, param) — θ of problem p is ``theta[p, c, :num_params[p]]`` (NaN padding) — and
the coordinates ``n`` (problem: the curvature batch size) and ``num_params``; the attrs ``seed`` and
``train_n`` complete the recipe of the curvature batch, ``cl.problems.load(problem, n=n[problem],
seed=seed)``. The training variables have dimensions (problem, method, seed, step); ``theta_final``
(problem, method, seed, param) is the final θ of the run on ``cl.problems.load(problem, n=train_n,
seed=seed)``. ``loss_floor`` (problem) is the infimum of the loss (0 for cross-entropy on labels, the
mean binary entropy of the grey levels for the autoencoder).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from curvlab.studies import Claim, Study

__all__ = ["STUDY", "CONFIG", "COARSE", "TWO_LEVEL", "training_options", "total_steps", "algebra"]

COARSE = ("nicolaides", "spectral", "residual", "krylov-nicolaides", "krylov-residual", "tselepidis")
TWO_LEVEL = tuple(f"kfac-2l-{c}" for c in COARSE)
METHODS = ("kfac", *TWO_LEVEL, "sgd", "adam")
LABELS = {"nicolaides": "NICO", "spectral": "SPECTRAL", "residual": "RESIDU", "krylov-nicolaides": "KRY-NICO",
          "krylov-residual": "KRY-RESIDU", "tselepidis": "PREVIOUS (Tselepidis)"}
#: C1: a "meaningful" improvement of the final excess loss over KFAC's (relative, mean over seeds)
MEANINGFUL = 0.05
#: C3: a "small" reduction of KFAC's energy error (relative)
SMALL = 0.1
#: C2: rounding allowance of the deflated error against KFAC's (relative)
ROUNDING = 1e-9
#: figures: energy gains below this are drawn at it (a log axis)
GAIN_FLOOR = 1e-12

PROBLEMS = ["digits-mlp-deep", "digits-autoencoder-relu"]
CONFIG: dict[str, Any] = {
    "problems": PROBLEMS, "seed": 0, "train_n": 1797, "batch_size": 256,
    "n": {"digits-mlp-deep": 256, "digits-autoencoder-relu": 64},
    "damping": [1e-4, 1e-3, 1e-2, 1e-1, 1.0], "coarse": list(COARSE),
    "trajectory_lr": {"digits-mlp-deep": 0.1, "digits-autoencoder-relu": 3.0}, "trajectory_momentum": 0.9,
    "checkpoints": [0, 14, 70, 210],
    "methods": list(METHODS), "epochs": 20, "seeds": 5,
    "hyper": {"digits-mlp-deep": {"kfac": {"lr": 0.03, "damping": 0.1}, "sgd": {"lr": 0.3}, "adam": {"lr": 0.03}},
              "digits-autoencoder-relu": {"kfac": {"lr": 0.1, "damping": 0.1}, "sgd": {"lr": 1.0},
                                          "adam": {"lr": 0.03}}},
    "fisher": "mc", "curvature_fraction": 0.25, "kl_clip": 1e-2,
}
QUICK: dict[str, Any] = {
    "n": {"digits-mlp-deep": 32, "digits-autoencoder-relu": 8}, "damping": [1e-3, 1e-1],
    "checkpoints": [0, 7], "train_n": 512, "epochs": 2, "seeds": 2,
}


# ------------------------------------------------------------------------------------------ configuration
def steps_per_epoch(config: Mapping[str, Any]) -> int:
    return max(1, config["train_n"] // min(config["batch_size"], config["train_n"]))


def total_steps(config: Mapping[str, Any]) -> int:
    """Return the number of optimizer steps of a run, epochs × steps per epoch."""
    return config["epochs"] * steps_per_epoch(config)


def training_options(problem: str, method: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """Return the options of :func:`curvlab.optim.make` of one training run (see the module docstring)."""
    hyper = config["hyper"][problem]
    if method in ("sgd", "adam"):
        return {"lr": hyper[method]["lr"], **({"momentum": 0.9} if method == "sgd" else {})}
    lam = hyper["kfac"]["damping"]
    common = {"lr": hyper["kfac"]["lr"], "fisher": config["fisher"], "curvature_fraction": config["curvature_fraction"],
              "kl_clip": config["kl_clip"]}
    if method == "kfac":  # (A + √(λ²)I) ⊗ (G + √(λ²)I): λ on each factor, the two-level methods' fine level
        return {**common, "damping": lam * lam, "damping_rule": "factored"}
    return {**common, "damping": lam, "fine_rule": "koroko"}


def _check(config: Mapping[str, Any]) -> None:
    for p in config["problems"]:
        for key in ("n", "trajectory_lr", "hyper"):
            if p not in config[key]:
                raise ValueError(f"{key} has no entry for the problem {p!r}")
        if config["n"][p] < 1:
            raise ValueError(f"n[{p!r}] must be ≥ 1")
    unknown = [c for c in config["coarse"] if c not in COARSE]
    if unknown:
        raise ValueError(f"unknown coarse spaces {unknown}; use some of {list(COARSE)}")
    bad = [m for m in config["methods"] if m not in METHODS]
    if bad:
        raise ValueError(f"unknown methods {bad}; use some of {list(METHODS)}")
    if not config["damping"] or any(v <= 0 for v in config["damping"]):
        raise ValueError(f"damping must be positive numbers; got {config['damping']}")
    if any(c < 0 for c in config["checkpoints"]) or config["seeds"] < 1 or config["epochs"] < 1:
        raise ValueError("checkpoints must be ≥ 0, seeds and epochs ≥ 1")


def _cells(config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Algebra cells (problem × checkpoint), then training cells (problem × method × seed).

    ``theta_step`` is the step whose θ a cell stores (the checkpoint; the last training step). The
    algebra cells carry the first method and seed 0 on the training axes (their trajectory is SGD
    with ``seed``), values the training cells have, so that the merged grid gains no empty entries.
    """
    cells = [{"part": "algebra", "problem": p, "method": config["methods"][0], "seed": 0, "theta_step": c}
             for p in config["problems"] for c in sorted(set(config["checkpoints"]))]
    steps = total_steps(config)
    cells += [{"part": "train", "problem": p, "method": m, "seed": s, "theta_step": steps}
              for p in config["problems"] for m in config["methods"] for s in range(config["seeds"])]
    return cells


# ------------------------------------------------------------------------------------------ the linear algebra
def algebra(batch, dampings: list[float], coarse: list[str]) -> dict[str, Any]:
    """Return the energy errors, cosines and energy gains of KFAC and every coarse space on ``batch``.

    See the module docstring: arrays over (damping,) and (damping, coarse), and the coarse columns (coarse,).
    """
    import numpy as np

    import curvlab as cl
    from curvlab.compare import energy_norm

    K = cl.approx.kfac(batch)
    F = cl.exact.ggn(batch, structure="low_rank")
    g = batch.gradient()
    D, C = len(dampings), len(coarse)
    out = {k: np.full(D, np.nan) for k in ("kfac_error", "kfac_cosine")}
    out.update({k: np.full((D, C), np.nan) for k in ("additive_error", "additive_cosine", "deflated_error",
                                                      "deflated_cosine", "energy_gain")})
    out["columns"] = np.zeros(C, dtype=np.int64)
    for i, lam in enumerate(dampings):
        x_star = F.solve(g, lam)
        scale = energy_norm(F, x_star, lam)

        def error(x, lam=lam, x_star=x_star, scale=scale) -> float:
            return energy_norm(F, x - x_star, lam) / scale

        def cosine(x, x_star=x_star) -> float:
            return float(x @ x_star) / float(x.norm() * x_star.norm())

        x_k = K.solve(g, (lam, lam), mode="factored")
        out["kfac_error"][i], out["kfac_cosine"][i] = error(x_k), cosine(x_k)
        for j, space in enumerate(coarse):
            T = cl.approx.two_level_kfac(batch, coarse=space, damping=lam, fine=K, gradient=g)
            T.fisher = F  # the same matrix (GGN of this batch): one factorisation per λ for all coarse spaces
            x_a, x_d = -T.direction(g, lam), -T.deflated_direction(g, lam)
            out["additive_error"][i, j], out["additive_cosine"][i, j] = error(x_a), cosine(x_a)
            out["deflated_error"][i, j], out["deflated_cosine"][i, j] = error(x_d), cosine(x_d)
            out["energy_gain"][i, j] = T.energy_gain(g, lam)
            out["columns"][j] = T.basis.shape[1]
    return out


def _algebra_cell(cell: Mapping[str, Any], config: Mapping[str, Any]):
    import numpy as np
    import torch
    import xarray as xr

    import curvlab as cl

    p, step = cell["problem"], cell["theta_step"]
    prob = cl.problems.load(p, n=config["train_n"], seed=config["seed"])
    traj = cl.optim.train(prob, "sgd", steps=step, batch_size=config["batch_size"], seed=config["seed"],
                          checkpoints=[step], progress=False, lr=config["trajectory_lr"][p],
                          momentum=config["trajectory_momentum"])
    theta = torch.as_tensor(traj["theta"].isel(checkpoint=0).values)
    batch = cl.problems.load(p, n=config["n"][p], seed=config["seed"]).at(theta)
    a = algebra(batch, config["damping"], config["coarse"])
    dc = ("damping", "coarse")
    ds = xr.Dataset(
        {**{k: ("damping", a[k]) for k in ("kfac_error", "kfac_cosine")},
         **{k: (dc, a[k]) for k in ("additive_error", "additive_cosine", "deflated_error", "deflated_cosine",
                                    "energy_gain")},
         "columns": ("coarse", a["columns"]), "theta": ("param", theta.numpy()),
         "checkpoint_loss": ((), float(traj["loss"].isel(step=-1))), "batch_loss": ((), batch.loss())},
        coords={"damping": np.array(config["damping"], dtype=float), "coarse": list(config["coarse"]),
                "param": np.arange(prob.num_params)})
    ds = ds.expand_dims(problem=[p], checkpoint=[step])
    return ds.assign_coords(n=("problem", [int(config["n"][p])]), num_params=("problem", [prob.num_params]))


# ------------------------------------------------------------------------------------------ training
def _train_cell(cell: Mapping[str, Any], config: Mapping[str, Any]):
    import numpy as np
    import xarray as xr

    import curvlab as cl
    from curvlab.studies.kbfgs_autoencoder import loss_floor, timed_training

    p, method = cell["problem"], cell["method"]
    prob = cl.problems.load(p, n=config["train_n"], seed=cell["seed"])
    theta = {}

    def on_step(t: int, th, opt) -> None:
        if t == cell["theta_step"]:
            theta["final"] = th.numpy()

    options = {**training_options(p, method, config), **({"seed": cell["seed"]} if method not in ("sgd", "adam")
                                                        else {})}
    curves = timed_training(prob, method, options, cell["theta_step"], config["batch_size"], cell["seed"], on_step)
    step = np.arange(cell["theta_step"] + 1)
    ds = xr.Dataset(
        {"loss": ("step", curves["loss"]), "seconds": ("step", curves["seconds"]),
         "cpu_seconds": ("step", curves["cpu_seconds"]), "diverged_step": ((), curves["diverged_step"]),
         "theta_final": ("param", theta.get("final", np.full(prob.num_params, np.nan))),
         "loss_floor": ((), loss_floor(prob))},
        coords={"step": step, "epoch": ("step", step / steps_per_epoch(config)), "param": np.arange(prob.num_params)})
    return ds


def run_cell(cell: Mapping[str, Any], config: Mapping[str, Any]):
    """One problem × checkpoint of the linear-algebra study, or one training run."""
    from curvlab.studies.kbfgs_autoencoder import one_thread

    with one_thread():
        ds = _algebra_cell(cell, config) if cell["part"] == "algebra" else _train_cell(cell, config)
    ds.attrs.update(seed=int(config["seed"]), train_n=int(config["train_n"]), batch_size=int(config["batch_size"]),
                    curvature_batch="cl.problems.load(problem, n=n[problem], seed=seed)")
    return ds


def _nest(datasets: list, dims: list[str]) -> Any:
    """Return the datasets (length-1 ``dims``) concatenated along ``dims``, the last innermost.

    An outer join: θ of problems of different sizes is NaN-padded.
    """
    import xarray as xr

    if not dims:
        return datasets[0]
    groups: dict[Any, list] = {}
    for d in datasets:
        groups.setdefault(d[dims[0]].values.item(), []).append(d)
    parts = [_nest(g, dims[1:]) for g in groups.values()]
    return xr.concat(parts, dim=dims[0], data_vars="all", coords="different", compat="equals", join="outer")


def _merge(datasets: list) -> Any:
    """Algebra cells along (problem, checkpoint); training cells along (problem, method, seed)."""
    import xarray as xr

    algebra_parts = [d.squeeze(["part", "method", "seed", "theta_step"], drop=True) for d in datasets
                     if str(d["part"].values[0]) == "algebra"]
    train = [d.squeeze(["part", "theta_step"], drop=True) for d in datasets if str(d["part"].values[0]) == "train"]
    parts = []
    if algebra_parts:
        algebra_ds = _nest(algebra_parts, ["problem", "checkpoint"])
        parts.append(algebra_ds.assign(columns=algebra_ds["columns"].max("checkpoint")))  # the same at every step
    if train:
        runs = _nest(train, ["problem", "method", "seed"])
        floor = runs["loss_floor"].max(["method", "seed"])
        parts.append(runs.drop_vars("loss_floor").assign(loss_floor=floor))
    return xr.merge(parts, compat="no_conflicts", join="outer", combine_attrs="drop_conflicts")


# ------------------------------------------------------------------------------------------ claims
def _final_excess(ds):
    """Return final loss − floor per (problem, method, seed); a diverged run counts as +inf."""
    import numpy as np

    final = ds["loss"].isel(step=-1) - ds["loss_floor"]
    return final.where(np.isfinite(final), np.inf)


def _c1(ds) -> tuple[float, bool]:
    import numpy as np

    excess = _final_excess(ds)
    variants = [m for m in TWO_LEVEL if m in ds["method"].values]
    if "kfac" not in ds["method"].values or not variants:
        return math.nan, False
    base = excess.sel({"method": "kfac"})
    worst, consistent = -math.inf, False
    for m in variants:
        gain = (base - excess.sel({"method": m})) / base  # relative improvement over KFAC, per problem and seed
        gain = gain.where(np.isfinite(gain), -np.inf)
        mean = gain.mean("seed")
        worst = max(worst, float(mean.max()))
        consistent |= bool(((gain > 0).all("seed") & (mean > MEANINGFUL)).any())
    return worst, not consistent


def _time_per_step(ds, method: str):
    steps = ds["cpu_seconds"].notnull().sum("step") - 1
    return ds["cpu_seconds"].max("step").sel({"method": method}) / steps.sel({"method": method})


def _c1_time(ds) -> tuple[float, bool]:
    variants = [m for m in TWO_LEVEL if m in ds["method"].values]
    if "kfac" not in ds["method"].values or not variants:
        return math.nan, False
    base = _time_per_step(ds, "kfac").mean("seed")
    ratio = min(float((_time_per_step(ds, m).mean("seed") / base).min()) for m in variants)
    return ratio, ratio > 1


def _c2(ds) -> tuple[float, bool]:
    import numpy as np

    ratio = float((ds["deflated_error"] / ds["kfac_error"]).max())
    gain = float(ds["energy_gain"].max())
    return ratio, bool(ratio <= 1 + ROUNDING and gain <= 0 and np.isfinite(ratio))


def _reduction(ds):
    """1 − e_D / e_K: the share of KFAC's energy error the optimal coarse correction removes."""
    return 1 - ds["deflated_error"] / ds["kfac_error"]


def _c3(ds) -> tuple[float, bool]:
    value = float(_reduction(ds).median(["problem", "checkpoint", "damping"]).max())
    return value, value < SMALL


def _spearman(x, y) -> float:
    import numpy as np
    from scipy.stats import spearmanr

    if np.ptp(y) == 0:
        return 0.0
    return float(spearmanr(x, y).statistic)


def _c3_lambda(ds) -> tuple[float, bool]:
    import numpy as np

    red = _reduction(ds).transpose("problem", "checkpoint", "coarse", "damping").values
    lam = np.log(ds["damping"].values)
    rho = [_spearman(lam, red[i, j, k]) for i in range(red.shape[0]) for j in range(red.shape[1])
           for k in range(red.shape[2])]
    value = float(np.median(rho))
    return value, value < 0


CLAIMS = [
    Claim("C1", "no two-level variant gives a consistent, meaningful improvement over KFAC in training loss per epoch",
          f"per problem and variant, the relative improvement (e_KFAC − e_2L)/e_KFAC of the final excess loss "
          f"(loss − floor, after the last epoch, paired by seed); a variant improves consistently and meaningfully "
          f"if it is > 0 in every seed and its mean > {MEANINGFUL}; holds if none does (value: the largest mean "
          f"improvement)", _c1),
    Claim("C1-time", "every two-level variant is slower per step than KFAC",
          "min over problems and variants of (mean CPU seconds per step of the variant) / (that of KFAC), same lr, λ "
          "and Fisher batch; holds if > 1", _c1_time),
    Claim("C2", "E(β*) ≤ 0 always: the deflated correction never worsens KFAC's energy error",
          f"max over problems, checkpoints, λ and coarse spaces of e_D / e_K (energy errors ‖x − x*‖_(F+λI) / "
          f"‖x*‖_(F+λI)); holds if ≤ 1 + {ROUNDING:g} and every stored E(β*) − E(0) ≤ 0", _c2),
    Claim("C3", "the energy-error reduction of the coarse spaces is small relative to KFAC's own error",
          f"the largest, over coarse spaces, median (over problems, checkpoints, λ) of 1 − e_D / e_K; holds if "
          f"< {SMALL}", _c3),
    Claim("C3-lambda", "the energy-error reduction of the coarse spaces shrinks as λ grows",
          "median over (problem, checkpoint, coarse space) of the Spearman correlation between log λ and "
          "1 − e_D / e_K; holds if < 0", _c3_lambda),
]


# ------------------------------------------------------------------------------------------ figures
def _colors() -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {name: cmap(i) for i, name in enumerate(("kfac", *COARSE, "sgd", "adam"))}


def _method_color(method: str) -> Any:
    return _colors()[method.removeprefix("kfac-2l-")]


def _method_label(method: str) -> str:
    if method.startswith("kfac-2l-"):
        return f"2L {LABELS[method.removeprefix('kfac-2l-')]}"
    return {"kfac": "KFAC", "sgd": "SGD-m", "adam": "Adam"}[method]


def _energy_figure(ds):
    from matplotlib.figure import Figure

    problems, cps = ds["problem"].values, ds["checkpoint"].values
    fig = Figure(figsize=(4.4 * len(problems), 2.9 * len(cps) + 0.8), layout="constrained")
    axes = fig.subplots(len(cps), len(problems), squeeze=False, sharex=True)
    colors = _colors()
    lam = ds["damping"].values
    for j, p in enumerate(problems):
        for i, c in enumerate(cps):
            ax = axes[i, j]
            at = ds.sel(problem=p, checkpoint=c)
            ax.plot(lam, at["kfac_error"].values, "k-o", lw=2, label="KFAC")
            for space in ds["coarse"].values:
                ax.plot(lam, at["deflated_error"].sel(coarse=space).values, "-", color=colors[space],
                        label=f"{LABELS[space]} deflated")
                ax.plot(lam, at["additive_error"].sel(coarse=space).values, ":", color=colors[space],
                        label=f"{LABELS[space]} additive")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{p}, SGD step {c}", fontsize=9)
            ax.set_ylabel("‖x − x*‖_(F+λI) / ‖x*‖_(F+λI)" if j == 0 else "")
            ax.grid(alpha=0.3, which="both")
        axes[-1, j].set_xlabel("damping λ")
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside lower center", ncol=5, fontsize=7)
    fig.suptitle("energy error against x* = (F + λI)⁻¹g: KFAC, additive (dotted) and deflated (solid) two-level")
    return fig


def _gain_figure(ds):
    from matplotlib.figure import Figure

    problems = ds["problem"].values
    fig = Figure(figsize=(4.6 * len(problems), 3.8), layout="constrained")
    axes = fig.subplots(1, len(problems), squeeze=False)[0]
    colors = _colors()
    lam = ds["damping"].values
    for ax, p in zip(axes, problems):
        gain = (-ds["energy_gain"].sel(problem=p)).clip(min=GAIN_FLOOR)  # share of the squared error removed
        for space in ds["coarse"].values:
            g = gain.sel(coarse=space)
            ax.plot(lam, g.median("checkpoint").values, "-o", ms=3, color=colors[space], label=LABELS[space])
            ax.fill_between(lam, g.min("checkpoint").values, g.max("checkpoint").values, color=colors[space],
                            alpha=0.15)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("damping λ")
        ax.set_ylabel("−(E(β*) − E(0)) / ‖x_K − x*‖²_(F+λI)")
        ax.set_title(p, fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    fig.suptitle("share of KFAC's squared energy error the coarse space can remove (median, range over checkpoints; "
                 f"< {GAIN_FLOOR:g} drawn at {GAIN_FLOOR:g})", fontsize=10)
    return fig


def _cosine_figure(ds):
    from matplotlib.figure import Figure

    problems = ds["problem"].values
    fig = Figure(figsize=(4.6 * len(problems), 3.8), layout="constrained")
    axes = fig.subplots(1, len(problems), squeeze=False)[0]
    colors = _colors()
    lam = ds["damping"].values
    for ax, p in zip(axes, problems):
        at = ds.sel(problem=p).isel(checkpoint=-1)
        ax.plot(lam, at["kfac_cosine"].values, "k-o", lw=2, label="KFAC")
        for space in ds["coarse"].values:
            ax.plot(lam, at["deflated_cosine"].sel(coarse=space).values, "-", color=colors[space],
                    label=f"{LABELS[space]} deflated")
            ax.plot(lam, at["additive_cosine"].sel(coarse=space).values, ":", color=colors[space],
                    label=f"{LABELS[space]} additive")
        ax.set_xscale("log")
        ax.set_ylim(-0.05, 1.02)
        ax.set_xlabel("damping λ")
        ax.set_ylabel("cos(x, x*)")
        ax.set_title(f"{p}, SGD step {int(at['checkpoint'])}", fontsize=10)
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=5, fontsize=7)
    fig.suptitle("alignment of the solutions with the exact damped natural-gradient solution x*")
    return fig


def _loss_figure(ds, x: str):
    import numpy as np
    from matplotlib.figure import Figure

    problems = ds["problem"].values
    fig = Figure(figsize=(5.0 * len(problems), 4.0), layout="constrained")
    axes = fig.subplots(1, len(problems), squeeze=False)[0]
    for ax, p in zip(axes, problems):
        at = ds.sel(problem=p)
        floor = float(at["loss_floor"])
        for m in at["method"].values:
            run = at.sel({"method": m})
            excess = run["loss"].values - floor  # (seed, step)
            xs = run["epoch"].values if x == "epoch" else np.nanmean(run["cpu_seconds"].values, axis=0)
            ax.plot(xs, np.nanmedian(excess, axis=0), color=_method_color(str(m)), label=_method_label(str(m)),
                    ls="-" if str(m).startswith("kfac") else "--")
            ax.fill_between(xs, np.nanmin(excess, axis=0), np.nanmax(excess, axis=0), color=_method_color(str(m)),
                            alpha=0.12)
        ax.set_yscale("log")
        ax.set_xlabel("epoch" if x == "epoch" else "optimizer CPU time (s, one thread; mean over seeds)")
        ax.set_ylabel("training loss − floor")
        ax.set_title(p, fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"training: median and range over {ds.sizes['seed']} seeds, vs {'epochs' if x == 'epoch' else 'time'}")
    return fig


def _time_figure(ds):
    import numpy as np
    from matplotlib.figure import Figure

    problems, methods = ds["problem"].values, [str(m) for m in ds["method"].values]
    fig = Figure(figsize=(7.0, 3.8), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(problems)
    x = np.arange(len(methods))
    for k, p in enumerate(problems):
        per = [1e3 * float(_time_per_step(ds.sel(problem=p), m).mean("seed")) for m in methods]
        ax.bar(x + (k - (len(problems) - 1) / 2) * width, per, width, label=str(p))
    ax.set_xticks(x, [_method_label(m) for m in methods], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("CPU time per step (ms, one thread)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("cost of one optimizer step (mean over seeds)")
    ax.grid(alpha=0.3, axis="y", which="both")
    return fig


def figures(ds) -> dict[str, Any]:
    out = {}
    if "kfac_error" in ds:
        out.update({"energy-error": _energy_figure(ds), "energy-gain": _gain_figure(ds), "cosine": _cosine_figure(ds)})
    if "loss" in ds:
        out.update({"loss-epochs": _loss_figure(ds, "epoch"), "loss-time": _loss_figure(ds, "time"),
                    "time-per-step": _time_figure(ds)})
    return out


_ALG = "(F: exact GGN of the curvature batch at θ; x* = (F + λI)⁻¹g)"
VARIABLES = {
    "kfac_error": ("1", f"energy error ‖x_K − x*‖_(F+λI) / ‖x*‖_(F+λI) of KFAC, λ on each factor {_ALG}"),
    "kfac_cosine": ("1", "cos(x_K, x*)"),
    "additive_error": ("1", "energy error of the additive two-level update M_λ⁻¹g + Z(ZᵀFZ + λD)⁻¹Zᵀg"),
    "additive_cosine": ("1", "cos(x_A, x*) of the additive two-level update"),
    "deflated_error": ("1", "energy error of the deflated update x_K + Zβ*, β* = (Zᵀ(F + λI)Z)⁻¹Zᵀr"),
    "deflated_cosine": ("1", "cos(x_D, x*) of the deflated update"),
    "energy_gain": ("1", "[E(β*) − E(0)] / ‖x_K − x*‖²_(F+λI) (TwoLevel.energy_gain; ≤ 0)"),
    "columns": ("1", "number of coarse basis vectors (columns of Z) of the coarse space"),
    "theta": ("parameter", "θ of the SGD trajectory at the checkpoint (first num_params entries; NaN padding)"),
    "checkpoint_loss": ("loss", "training loss of the SGD trajectory at the checkpoint (train_n samples)"),
    "batch_loss": ("loss", "loss of the curvature batch at the checkpoint"),
    "loss": ("loss", "training loss on the train_n samples after each step"),
    "seconds": ("s", "cumulative wall-clock time of the optimizer steps (on a shared machine: includes others' load)"),
    "cpu_seconds": ("s", "cumulative CPU time of the optimizer steps (one torch thread)"),
    "diverged_step": ("step", "the step at which the run was stopped as diverged (−1: it was not)"),
    "theta_final": ("parameter", "final θ of the training run (first num_params entries; NaN padding)"),
    "loss_floor": ("loss", "infimum of the loss on the training set (0 for cross-entropy on class labels)"),
    "problem": ("", "canned problem"),
    "n": ("samples", "size of the curvature batch cl.problems.load(problem, n=n, seed=seed)"),
    "num_params": ("1", "number of parameters of the problem (θ's length)"),
    "checkpoint": ("step", "step of the SGD trajectory at which the linear algebra ran"),
    "damping": ("1", "λ (fine level: λ on each Kronecker factor; coarse level: λ·N_i; exact: F + λI)"),
    "coarse": ("", "coarse space (cl.approx.two_level_kfac)"),
    "method": ("", "training method (curvlab.optim name)"),
    "seed": ("", "seed of the training run (initial parameters, minibatch order, sampled labels)"),
    "step": ("step", "optimizer step (0: initial parameters)"),
    "epoch": ("epoch", "epochs completed"),
    "param": ("", "index into the flat parameter vector"),
}


STUDY = Study(
    name="two-level-kfac",
    description="two-level KFAC (six coarse spaces) vs KFAC: energy errors against the exact damped solution along "
                "SGD trajectories, and training curves",
    paper="Koroko, Anciaux-Sedrakian, Ben Gharbia, Garès, Haddou & Tran (2023), Analysis and Comparison of Two-Level "
          "KFAC Methods for Training Deep Neural Networks, arXiv:2303.18083",
    config=CONFIG,
    quick=QUICK,
    cells=_cells,
    run_cell=run_cell,
    merge=_merge,
    claims=CLAIMS,
    figures=figures,
    variables=VARIABLES,
    check=_check,
    version="1",
)
