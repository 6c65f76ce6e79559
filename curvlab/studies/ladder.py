"""The ``ladder`` study: KFAC's distance to the exact curvature split rung by rung, on every canned problem.

Along an SGD trajectory of each problem, at a few checkpoints, every rung of the approximation ladder

    full GGN → exact diagonal blocks (``ggn-block``) → Kronecker factors, type-2 (``kfac``) →
    Monte-Carlo labels (``kfac-mc``) → empirical labels (``kfac-ef``)

is compared with two references, the exact GGN and the exact Hessian, by the relative Frobenius error
‖A − R‖_F/‖R‖_F (:func:`curvlab.compare.relative_error`), on the whole matrix and on each diagonal block
(layer) of the problem's partition. The Hessian's own block diagonal (``hessian-block``) and the GGN
as an approximation of the Hessian (the Gauss-Newton rung) are compared too.

Because every rung from ``ggn-block`` on is block diagonal, its squared error splits exactly into the
reference's cross-block energy and the within-block error (the Pythagorean identity of the Frobenius
norm):

    ‖A − R‖² = ‖R − blockdiag(R)‖² + Σ_b ‖A_bb − R_bb‖²,

which is what the variables ``cross_block_fraction`` (‖R − blockdiag(R)‖²/‖R‖²) and ``within_block_error``
(√(Σ_b ‖A_bb − R_bb‖²/Σ_b ‖R_bb‖²)) store. The claims are this study's own measurable statements (not
a single paper's), labelled as such.

Each cell (problem, checkpoint) trains SGD from the problem's initialisation on its n samples
(minibatches of ``batch_size``, learning rate ``lr``, momentum ``momentum``, batch-order seed
``seed``) for ``checkpoint`` steps and compares the curvature of all n samples at the θ reached.
Recomputing from the file: ``cl.problems.load(problem, n=<the n coordinate of that problem>,
seed=<attrs seed>)`` at ``theta.sel(problem=…, checkpoint=…)[:num_params]`` (``theta`` is padded with
NaN to the largest problem's P; the ``n`` coordinate differs from the attrs ``n`` where ``n_by_problem``
overrides it). KFAC with sampled labels draws ``mc_samples`` labels per input with seed ``mc_seed``.
"""

from __future__ import annotations

from typing import Any

from curvlab.studies import Claim, Study, grid

__all__ = ["STUDY", "run_cell", "merge", "figures", "ladder_errors", "RUNGS", "METHODS", "REFERENCES",
           "rung_increments"]

#: the references the approximations are compared with
REFERENCES = ("ggn", "hessian")
#: every matrix compared with each reference (curvlab.compare.methods names)
METHODS = ("hessian", "hessian-block", "ggn", "ggn-block", "kfac", "kfac-mc", "kfac-ef")
#: each reference's ladder: (rung label, method), from the reference itself down
RUNGS = {"ggn": (("full", "ggn"), ("block", "ggn-block"), ("kron", "kfac"), ("MC", "kfac-mc"),
                 ("empirical", "kfac-ef")),
         "hessian": (("full", "hessian"), ("Gauss-Newton", "ggn"), ("block", "ggn-block"), ("kron", "kfac"),
                     ("MC", "kfac-mc"), ("empirical", "kfac-ef"))}
#: the tanh MLP classifiers claim L2 is about
MLP_CLASSIFIERS = ("digits-mlp", "digits-mlp-wide")


def _n_of(config: dict[str, Any], problem: str) -> int:
    return int(config["n_by_problem"].get(problem, config["n"]))


def _check(c: dict[str, Any]) -> None:
    import curvlab as cl

    unknown = [p for p in c["problems"] if p not in cl.problems.names()]
    if unknown or not c["problems"]:
        raise ValueError(f"problems must be canned problem names ({', '.join(cl.problems.names())}); got "
                         f"{c['problems']}")
    bad = {k: v for k, v in c["n_by_problem"].items() if not (isinstance(v, int) and v > 0)}
    if bad:
        raise ValueError(f"n_by_problem must map problem names to positive sample counts; got {bad}")
    if not c["checkpoints"] or any(not isinstance(s, int) or s < 0 for s in c["checkpoints"]):
        raise ValueError(f"checkpoints must be a non-empty list of steps ≥ 0; got {c['checkpoints']}")


def _trained_theta(prob, checkpoint: int, config: dict[str, Any]):
    import curvlab as cl

    if checkpoint == 0:
        return prob.theta.clone(), prob.loss()
    ds = cl.optim.train(prob, "sgd", steps=checkpoint, batch_size=config["batch_size"], seed=config["seed"],
                        checkpoints=[checkpoint], progress=False, lr=config["lr"], momentum=config["momentum"])
    import torch

    return torch.as_tensor(ds["theta"].values[-1]), float(ds["loss"].values[-1])


def ladder_errors(prob, mc_samples: int = 1, mc_seed: int = 0) -> dict[str, Any]:
    """Every method of :data:`METHODS` against every reference of :data:`REFERENCES` at ``prob.theta``.

    Returns arrays: ``relative_error`` (reference, method), ``block_error`` (reference, method, block),
    ``within_block_error`` (reference, method), ``cross_block_fraction`` (reference,), ``block_norm``
    (reference, block) = ‖R_bb‖_F, ``norm`` (reference,) = ‖R‖_F.
    """
    import numpy as np

    import curvlab as cl
    from curvlab.compare import matrices
    from curvlab.compare.methods import build

    cache: dict[str, Any] = {}
    built = {m: build(m, prob, cache, mc_samples=mc_samples, seed=mc_seed) for m in METHODS}
    blocks = [(b.name, b.slice) for b in prob.partition]
    shape = (len(REFERENCES), len(METHODS))
    rel, within = np.full(shape, np.nan), np.full(shape, np.nan)
    per_block = np.full(shape + (len(blocks),), np.nan)
    block_norm, norm = np.zeros((len(REFERENCES), len(blocks))), np.zeros(len(REFERENCES))
    for i, ref in enumerate(REFERENCES):
        R = built[ref]
        norm[i] = float(R.frobenius_norm())
        block_norm[i] = [float(matrices.restrict(R, s).frobenius_norm()) for _, s in blocks]
        for j, m in enumerate(METHODS):
            err = cl.compare.relative_error(built[m], R, blocks=blocks)
            rel[i, j] = err.total
            per_block[i, j] = [err.blocks[name] for name, _ in blocks]
            within[i, j] = np.sqrt(np.sum((per_block[i, j] * block_norm[i]) ** 2) / np.sum(block_norm[i] ** 2))
    cross = 1.0 - np.sum(block_norm**2, axis=1) / norm**2
    return {"relative_error": rel, "block_error": per_block, "within_block_error": within,
            "cross_block_fraction": np.maximum(cross, 0.0), "block_norm": block_norm, "norm": norm,
            "block_names": [name for name, _ in blocks]}


def run_cell(cell: dict[str, Any], config: dict[str, Any]):
    """One (problem, checkpoint): train SGD to the checkpoint, compare the ladder with both references."""
    import numpy as np
    import xarray as xr

    import curvlab as cl

    prob = cl.problems.load(cell["problem"], n=_n_of(config, cell["problem"]), seed=config["seed"])
    theta, loss = _trained_theta(prob, cell["checkpoint"], config)
    out = ladder_errors(prob.at(theta), config["mc_samples"], config["mc_seed"])
    nb = len(out["block_names"])
    rm, rmb = ("reference", "method"), ("reference", "method", "block")
    data = {"relative_error": (rm, out["relative_error"]), "block_error": (rmb, out["block_error"]),
            "within_block_error": (rm, out["within_block_error"]),
            "cross_block_fraction": ("reference", out["cross_block_fraction"]),
            "block_norm": (("reference", "block"), out["block_norm"]), "reference_norm": ("reference", out["norm"]),
            "block_name": ("block", np.array(out["block_names"], dtype=str)),
            "block_size": ("block", np.array([b.size for b in prob.partition])),
            "theta": ("param", theta.numpy()), "loss": ((), loss), "num_params": ((), prob.num_params),
            "n": ((), prob.num_samples)}
    ds = xr.Dataset(data, coords={"reference": list(REFERENCES), "method": list(METHODS), "block": np.arange(nb),
                                  "param": np.arange(prob.num_params)})
    ds.attrs.update(n=int(config["n"]), seed=int(config["seed"]))
    return ds


def merge(datasets: list):
    """Pad ``param`` and ``block`` to the largest problem (NaN, "" for names, 0 for sizes), then combine.

    ``n`` and ``num_params`` become per-problem coordinates.
    """
    import numpy as np
    import xarray as xr

    P = max(d.sizes["param"] for d in datasets)
    B = max(d.sizes["block"] for d in datasets)
    padded = [d.reindex(param=np.arange(P), block=np.arange(B), fill_value={"block_name": "", "block_size": 0})
              for d in datasets]
    ds = xr.combine_by_coords(padded, data_vars="all", coords="different", compat="no_conflicts", join="outer",
                              combine_attrs="drop_conflicts")
    for name in ("n", "num_params"):
        values = ds[name].max("checkpoint").values.astype(int)
        ds = ds.drop_vars(name).assign_coords({name: ("problem", values)})
    ds["block_name"] = ds["block_name"].isel(checkpoint=0, drop=True).astype(str)
    ds["block_size"] = ds["block_size"].isel(checkpoint=0, drop=True).astype(int)
    return ds


# ---------------------------------------------------------------------------------------------- claims
def rung_increments(ds, reference: str = "ggn"):
    """e(rung k) − e(rung k−1) of the relative error against ``reference`` (problem, checkpoint, rung)."""
    import xarray as xr

    rungs = RUNGS[reference]
    err = ds["relative_error"].sel(reference=reference)
    steps = [err.sel({"method": m}) - err.sel({"method": prev}) for (_, prev), (_, m) in zip(rungs[:-1], rungs[1:])]
    return xr.concat(steps, "rung", coords="minimal", compat="override").assign_coords(
        rung=[label for label, _ in rungs[1:]]).drop_vars("method", errors="ignore")


def cross_layer_share(ds, reference: str = "ggn"):
    """Share of KFAC's squared distance to ``reference`` in the dropped cross-block part (problem, checkpoint)."""
    err = ds["relative_error"].sel({"reference": reference, "method": "kfac"})
    return ds["cross_block_fraction"].sel(reference=reference) / err**2


def _l1(ds) -> tuple[float, bool]:
    value = float(ds["within_block_error"].sel({"problem": "deep-linear", "reference": "ggn", "method": "kfac"}).max())
    return value, value < 1e-10


def _l2(ds) -> tuple[float, bool]:
    present = [p for p in MLP_CLASSIFIERS if p in ds["problem"].values]
    if not present:
        raise ValueError(f"none of {MLP_CLASSIFIERS} is in this run")
    value = float(cross_layer_share(ds).sel(problem=present).min())
    return value, value > 0.5


def _l3(ds) -> tuple[float, bool]:
    inc = rung_increments(ds, "ggn")
    largest = inc.fillna(-float("inf")).argmax("rung")
    emp = list(inc["rung"].values).index("empirical")
    value = float((largest == emp).mean())
    return value, value > 0.5


def _l4(ds) -> tuple[float, bool]:
    gn = ds["relative_error"].sel({"reference": "hessian", "method": "ggn"})
    ratio = gn.isel(checkpoint=-1) / gn.isel(checkpoint=0)
    value = float(ratio.max())
    return value, value < 1.0


CLAIMS = [
    Claim("L1", "this study's claim (derived, not from one paper): on deep-linear (MSE, no activations) the "
                "Kronecker rung adds no error within the blocks — type-2 KFAC equals the GGN's diagonal blocks",
          "max over checkpoints of KFAC's within-block relative error against the GGN on deep-linear < 1e-10",
          _l1),
    Claim("L2", "this study's claim: on the tanh MLP classifiers (digits-mlp, digits-mlp-wide) most of KFAC's "
                "distance to the GGN is the dropped cross-layer blocks",
          "min over those problems and checkpoints of ‖G − blockdiag(G)‖²_F / ‖KFAC − G‖²_F > 0.5", _l2),
    Claim("L3", "this study's claim: the empirical-Fisher rung (MC labels → data labels) is the largest single "
                "rung of the GGN ladder",
          "fraction of (problem, checkpoint) where the empirical rung's increase of the relative error against "
          "the GGN is the largest of the four rungs (block, kron, MC, empirical) > 0.5", _l3),
    Claim("L4", "this study's claim (the Gauss-Newton rung; classical): the GGN approaches the Hessian as "
                "training lowers the residuals",
          "for every problem ‖GGN − H‖_F/‖H‖_F at the last checkpoint < at the first; value: the largest "
          "ratio last/first over the problems", _l4),
]


# ---------------------------------------------------------------------------------------------- figures
#: where exact zeros are drawn on the log-scale error plots
FLOOR = 1e-16


def _panels(count: int, width: float = 3.6, height: float = 3.2):
    from matplotlib.figure import Figure

    cols = min(3, count)
    rows = -(-count // cols)
    fig = Figure(figsize=(width * cols + 0.6, height * rows + 0.8), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[count:]:
        ax.set_visible(False)
    return fig, axes


def _ladder_figure(ds, reference: str):
    import numpy as np
    from matplotlib import colormaps

    rungs = RUNGS[reference][1:]  # the reference itself has error 0
    name = "GGN" if reference == "ggn" else "Hessian"
    problems = [str(p) for p in ds["problem"].values]
    fig, axes = _panels(len(problems))
    cps = ds["checkpoint"].values
    colors = colormaps["viridis"](np.linspace(0.0, 0.85, len(cps)))
    x = np.arange(len(rungs))
    for ax, p in zip(axes, problems):
        for cp, color in zip(cps, colors):
            sel = {"problem": p, "checkpoint": cp, "reference": reference}
            whole = [float(ds["relative_error"].sel({**sel, "method": m})) for _, m in rungs]
            within = [float(ds["within_block_error"].sel({**sel, "method": m})) for _, m in rungs]
            ax.plot(x, whole, marker="o", color=color, label=f"step {cp}")
            ax.plot(x, within, marker="x", ls="--", color=color)
        n, P = int(ds["n"].sel(problem=p)), int(ds["num_params"].sel(problem=p))
        ax.set(title=f"{p} (P = {P}, n = {n})", ylabel=f"relative error vs {name} (1)", ylim=(0, None))
        ax.set_xticks(x, [label for label, _ in rungs], rotation=30)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend(fontsize=7, title="SGD checkpoint", title_fontsize=7)
    fig.suptitle(f"Each rung adds one approximation of the exact {name}: solid ‖A − R‖_F/‖R‖_F on the whole "
                 "matrix, dashed within the diagonal blocks", fontsize=10)
    return fig


def _decomposition_figure(ds):

    problems = [str(p) for p in ds["problem"].values]
    cps = ds["checkpoint"].values
    fig, (ax,) = _panels(1, width=max(6.0, 0.45 * len(problems) * len(cps) + 2.0), height=4.0)
    share = cross_layer_share(ds).transpose("problem", "checkpoint").values
    err = ds["relative_error"].sel({"reference": "ggn", "method": "kfac"}).transpose("problem", "checkpoint").values
    width, pos, ticks, labels = 0.8, 0, [], []
    for i, p in enumerate(problems):
        for j, cp in enumerate(cps):
            cross = ax.bar(pos, share[i, j], width, color="tab:blue")
            within = ax.bar(pos, 1 - share[i, j], width, bottom=share[i, j], color="tab:orange")
            ax.annotate(f"{err[i, j]:.2f}", (pos, 1.0), xytext=(0, 2), textcoords="offset points", ha="center",
                        fontsize=7)
            ticks.append(pos)
            labels.append(f"{cp}")
            pos += 1
        ax.text(pos - (len(cps) + 1) / 2, 1.07, p, ha="center", va="bottom", fontsize=8)
        pos += 1
    cross.set_label("dropped cross-layer blocks ‖G − blockdiag G‖²")
    within.set_label("within the blocks Σ_b ‖K_bb − G_bb‖²")
    ax.set_xticks(ticks, labels, fontsize=7)
    ax.set(ylim=(0, 1.16), ylabel="share of ‖KFAC − GGN‖²_F (1)", xlabel="SGD checkpoint (step), by problem")
    fig.legend(fontsize=8, loc="outside lower center", ncols=2)
    ax.set_title("Where KFAC's distance to the GGN lies (numbers: ‖KFAC − G‖_F / ‖G‖_F)", fontsize=10)
    return fig


def _blocks_figure(ds):
    import numpy as np

    problems = [str(p) for p in ds["problem"].values]
    fig, axes = _panels(len(problems))
    last = ds["checkpoint"].values[-1]
    methods = [("kron", "kfac"), ("MC", "kfac-mc"), ("empirical", "kfac-ef"), ("Hessian block", "hessian-block")]
    for ax, p in zip(axes, problems):
        names = [str(b) for b in ds["block_name"].sel(problem=p).values if str(b)]
        x = np.arange(len(names))
        for k, (label, m) in enumerate(methods):
            e = ds["block_error"].sel({"problem": p, "checkpoint": last, "reference": "ggn", "method": m}).values
            ax.bar(x + (k - 1.5) * 0.2, np.maximum(e[:len(names)], FLOOR), 0.2, label=label)
        ax.set(yscale="log", title=p, ylabel="‖A_bb − G_bb‖ / ‖G_bb‖ (1)", xlabel="block (layer)")
        ax.set_xticks(x, names)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="outside lower center", ncols=len(methods))
    fig.suptitle(f"Within-block errors against the GGN's diagonal blocks at SGD step {last} "
                 f"(exact zeros at {FLOOR:g})", fontsize=10)
    return fig


def figures(ds) -> dict:
    """ladder-ggn, ladder-hessian, decomposition (KFAC vs GGN: cross-layer vs within-block), blocks."""
    out = {f"ladder-{r}": _ladder_figure(ds, r) for r in REFERENCES if r in ds["reference"].values}
    out["decomposition"] = _decomposition_figure(ds)
    out["blocks"] = _blocks_figure(ds)
    return out


# ---------------------------------------------------------------------------------------------- the study
VARIABLES = {
    "problem": ("1", "canned problem (cl.problems.load)"),
    "checkpoint": ("step", "SGD steps from the problem's initialisation"),
    "reference": ("1", "the exact matrix R compared with: ggn (= the exact Fisher here) or hessian"),
    "method": ("1", "the matrix A compared with R (curvlab.compare.methods name)"),
    "block": ("1", "index of the diagonal block (layer) of the problem's partition; block_name gives its name"),
    "block_name": ("1", "the block's name (its module); '' where a problem has fewer blocks"),
    "block_size": ("1", "parameters in the block (0: padding)"),
    "n": ("1", "samples of the problem: its curvature batch and training set"),
    "num_params": ("1", "P, the problem's parameter count (theta is padded with NaN beyond it)"),
    "relative_error": ("1", "‖A − R‖_F / ‖R‖_F on the whole matrix"),
    "block_error": ("1", "‖A_bb − R_bb‖_F / ‖R_bb‖_F on diagonal block b"),
    "within_block_error": ("1", "√(Σ_b ‖A_bb − R_bb‖²_F / Σ_b ‖R_bb‖²_F): the error within the diagonal blocks"),
    "cross_block_fraction": ("1", "‖R − blockdiag(R)‖²_F / ‖R‖²_F: what every block-diagonal rung drops"),
    "block_norm": ("loss", "‖R_bb‖_F"),
    "reference_norm": ("loss", "‖R‖_F"),
    "theta": ("parameter", "flat parameters at the checkpoint (NaN beyond num_params)"),
    "loss": ("loss", "training loss at the checkpoint (all n samples)"),
    "param": ("1", "index into the flat parameter vector (the problem's parameter order)"),
}

STUDY = Study(
    name="ladder",
    description="KFAC's distance to the exact GGN and Hessian split rung by rung (full → block → Kronecker → "
                "Monte-Carlo → empirical) on every canned problem along SGD trajectories",
    paper="this study's own claims (rungs: Martens & Grosse (2015), arXiv:1503.05671; Kunstner et al. (2019), "
          "arXiv:1905.12558)",
    config={"problems": ["digits-mlp", "digits-mlp-wide", "digits-autoencoder", "digits-cnn", "deep-linear",
                         "diabetes-mlp"],
            "n": 256, "n_by_problem": {"digits-cnn": 64}, "seed": 0, "checkpoints": [0, 30, 100, 300],
            "lr": 0.03, "momentum": 0.9, "batch_size": 64, "mc_samples": 1, "mc_seed": 0},
    quick={"problems": ["deep-linear", "diabetes-mlp", "digits-mlp"], "n": 128, "n_by_problem": {},
           "checkpoints": [0, 30]},
    cells=lambda c: grid(problem=c["problems"], checkpoint=c["checkpoints"]),
    run_cell=run_cell,
    merge=merge,
    claims=CLAIMS,
    figures=figures,
    variables=VARIABLES,
    check=_check,
    version="1",
)
