"""kfac-vs-newton: whether KFAC is a second-order method or gradient descent on neurons (Benzing 2022).

Benzing (ICML 2022, "Gradient Descent on Neurons and its Link to Approximate Second-Order
Optimization", arXiv 2201.12250) argues that KFAC with its usual heuristic damping is not close
to the natural gradient it approximates, does better than the exact subsampled natural gradient,
and behaves like FOOF, a first-order method that does gradient descent on the neurons'
pre-activations. This study measures that on the digits MLP, in two parts on one problem
``cl.problems.load(problem, n=n, seed=seed)``:

**Directions** (one cell per checkpoint of an SGD trajectory on that problem: minibatches of
``batch_size``, ``trajectory_lr``, ``momentum``). At each checkpoint θ_c the whole problem is the
curvature batch: g = ∇L(θ_c), and for every λ of ``damping`` the update directions

=================  ===========================================================================
``kfac``           −((A + π√λ I)⁻¹ ⊗ (G + √λ/π I)⁻¹) g, π-damping (Martens & Grosse 2015)
``kfac-exact``     −(A ⊗ G + λI)⁻¹ g, exact (standard, Tikhonov) damping
``ng``             −(F + λI)⁻¹ g, F the exact GGN (= Fisher for cross-entropy) of the batch
``ng-block``       the same with F's diagonal blocks (one per layer)
``foof``           −∇W (A + λI)⁻¹ per layer (FOOF; ``cl.approx.foof``)
``foof-matched``   −∇W (A + λ_A I)⁻¹ with the input damping KFAC's π-rule gives that layer,
                   λ_A = π_l √λ (FOOF as an optimizer: one step size for every layer)
``foof-layerwise`` the same scaled per layer by 1/λ_G = π_l/√λ: the step π-damped KFAC
                   approaches when λ_G swamps G
``sgd``            −g
=================  ===========================================================================

and their pairwise cosines, whole (``cosine``) and per layer (``block_cosine``); KFAC's factors are
those of the batch itself (no running averages), so that every method sees the same data (the
"control" setting). With the expansion (A + λ_A I) ⊗ (G + λ_G I) = A⊗G + λ_G(A⊗I) + λ_A(I⊗G) +
λ_Aλ_G I, π-damping adds λ_G times FOOF's matrix A⊗I: when λ_G ≫ ‖G‖ the KFAC step of layer l
is λ_G,l⁻¹ times the matched FOOF step. Since π_l differs between layers (often by an order of
magnitude), KFAC then behaves like FOOF with layer-wise step sizes π_l/√λ (``foof-layerwise``) rather
than like FOOF with one step size (``foof-matched``): per layer both have the same direction, over the
whole network only the former. The damping diagnostics per layer — the share of eig(G) below λ_G
(``cl.compare.factor_fraction_below``), λ_G/‖G‖₂ and λ_A/‖A‖₂ — say where the limit is reached.

**Training** (one cell per method × learning rate × damping of ``grid``): ``cl.optim.train`` on the
same problem, minibatches of ``batch_size``, ``train_steps`` steps, for ``sgd``, ``kfac``
(π-damping), ``kfac-exact`` (KFAC with ``damping_rule="exact"``), ``ng``, ``ng-block`` and ``foof``.
Every method uses the same heavy-ball momentum and no KL-clipping (``kl_clip``), KFAC and FOOF
their factors of each step's batch in running averages (decay 0.95) refreshed every
``inverse_period`` steps, NG the exact GGN of each batch: the methods differ only in their
preconditioner. The best run per method is the one with the lowest final training loss (its mean
over the last 10 % of the steps; the whole grid is stored); a run whose loss stops being finite
counts as diverged. For the curvature methods the final loss depends mostly on lr/λ (a ridge of good
settings at lr ≈ λ for KFAC and NG, lr ≈ 0.3–3 λ for FOOF, measured in earlier full runs); each
grid spans its method's ridge around the best setting found.

``threads`` (default 1) sets torch's intra-op threads inside each cell: the cells are small dense
problems, fastest with one thread each and one cell per core (``curvlab run kfac-vs-newton
--processes 2``); the seconds per step of the training runs are measured under that setting.

The claims B1–B5 (Benzing's headlines in testable form; the paper's own numbers could not be
retrieved) are decided from the merged Dataset. On a network this small, exact natural gradient
may simply win (B1 then fails, and the study says so).

The exact GGN of the directions part is formed in whichever exact representation is cheaper: the
low-rank Woodbury form ``cl.exact.ggn(batch, structure="low_rank")`` when the batch has fewer
factor rows (N × outputs) than parameters, else the dense matrix (``structure="full"``); per layer
the dense blocks (``"block"``) unless the factor has fewer rows than the largest block
(``"block_low_rank"``). They are the same matrices (the tests check the directions against the
low-rank forms).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from curvlab.studies import Claim, Study, checks

if TYPE_CHECKING:  # pragma: no cover
    import xarray as xr
    from torch import Tensor

    from curvlab.problem import Problem

__all__ = ["STUDY", "CLAIMS", "DIRECTION_METHODS", "TRAIN_METHODS", "run_cell", "torch_threads", "direction_functions",
           "directions_at", "matched_foof_direction", "damping_diagnostics", "trajectory_theta", "train_options",
           "best_runs", "final_loss", "figures"]

#: the update directions compared at every checkpoint (``method`` and ``versus`` coordinates)
DIRECTION_METHODS = ("kfac", "kfac-exact", "ng", "ng-block", "foof", "foof-matched", "foof-layerwise", "sgd")
#: the training methods (``train_method`` coordinate)
TRAIN_METHODS = ("sgd", "kfac", "kfac-exact", "ng", "ng-block", "foof")
#: sentinel values of the cell keys a cell of the other part does not use
_NONE_METHOD, _NONE_CHECKPOINT = "-", -1


# ---------------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Set torch's intra-op threads to ``count`` (0: unchanged) while the cell runs, then restore them.

    The cells are small dense problems: several threads per cell mostly contend for the cores
    (measured: a KFAC step on digits-mlp is several times slower with 2 threads on a busy 2-core
    machine), so the studies run one thread per cell and one cell per core.
    """
    import torch

    old = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _problem(config: Mapping[str, Any]) -> Problem:
    import curvlab as cl

    return cl.problems.load(config["problem"], n=config["n"], seed=config["seed"])


def _attrs(prob: Problem, config: Mapping[str, Any]) -> dict[str, Any]:
    """Return what every cell records: the curvature batch and the settings shared by both parts.

    The curvature batch is ``cl.problems.load(problem, n=n, seed=seed)``.
    """
    return {"problem": prob.name, "n": int(prob.meta["n"]), "seed": int(config["seed"]),
            "loss_function": type(prob.loss_fn).__name__, "batch_size": int(config["batch_size"]),
            "momentum": float(config["momentum"]), "trajectory_lr": float(config["trajectory_lr"])}


def trajectory_theta(prob: Problem, checkpoint: int, config: Mapping[str, Any]) -> Tensor:
    """θ after ``checkpoint`` SGD steps from ``prob.theta`` (the study's trajectory; 0: the initialisation)."""
    import torch

    import curvlab as cl

    if checkpoint == 0:
        return prob.theta.detach().clone()
    ds = cl.optim.train(prob, "sgd", steps=checkpoint, batch_size=config["batch_size"], seed=config["seed"],
                        checkpoints=[checkpoint], progress=False, lr=config["trajectory_lr"],
                        momentum=config["momentum"])
    return torch.as_tensor(ds["theta"].values[-1], dtype=prob.dtype)


# ---------------------------------------------------------------------------------------------- directions
def _exact_ggns(batch: Problem) -> tuple[Any, Any]:
    """(F, blockdiag F) of the batch, each in its cheaper exact representation (module docstring)."""
    import curvlab as cl

    low = cl.exact.ggn(batch, structure="low_rank")
    rows = low.factor.rank
    F = low if rows < batch.num_params else cl.exact.ggn(batch, structure="full")
    largest = max(batch.partition.sizes)
    FB = cl.exact.ggn(batch, structure="block_low_rank" if rows < largest else "block")
    return F, FB


def _kron_blocks(K: Any) -> list[tuple[str, slice, Any]]:
    """(name, slice, Kron) per layer of a KFAC approximation; other structures are refused."""
    from curvlab.linalg.kron import Kron

    out = []
    for name, s, block in zip(K.block_names, K.block_slices, K.blocks):
        if not isinstance(block, Kron):
            raise ValueError(f"kfac-vs-newton needs one Kronecker block per partition block; block {name!r} is "
                             f"a {type(block).__name__} (use a problem whose blocks are single nn.Linear layers)")
        out.append((name, s, block))
    return out


def matched_foof_direction(K: Any, g: Tensor, damping: float, layerwise: bool = False) -> Tensor:
    """FOOF's step with KFAC's π-rule input damping: per layer −∇W (A + λ_A I)⁻¹, λ_A = π_l √λ.

    ``K`` is a KFAC approximation (``cl.approx.kfac``): its A factors and its π_l =
    √((tr A / dim A) / (tr G / dim G)) (``curvlab.linalg.kron.factor_damping("pi", ...)``).
    ``layerwise=True`` divides layer l's step by its output damping λ_G = √λ/π_l: the limit of
    KFAC's π-damped step (G + λ_G I)⁻¹ ∇W (A + λ_A I)⁻¹ when λ_G ≫ ‖G‖.
    """
    from curvlab.linalg.kron import ForwardOnly, factor_damping

    out = g.new_empty(g.shape)
    for _, s, block in _kron_blocks(K):
        (eA, _), (eG, _) = block.factor_eigh()
        lam_A, lam_G = factor_damping("pi", damping, eA, eG)
        out[s] = -ForwardOnly(block.A, block.p, block.bias).solve(g[s], lam_A) / (lam_G if layerwise else 1.0)
    return out


def direction_functions(batch: Problem) -> tuple[dict[str, Callable[[Tensor, float], Tensor]], Any]:
    """Return ({method: (g, λ) → direction} for :data:`DIRECTION_METHODS`, the KFAC approximation) at the batch."""
    import curvlab as cl

    K, Fo = cl.approx.kfac(batch), cl.approx.foof(batch)
    F, FB = _exact_ggns(batch)
    return {"kfac": lambda g, lam: K.direction(g, lam, mode="own"),
            "kfac-exact": lambda g, lam: K.direction(g, lam, mode="exact"),
            "ng": lambda g, lam: F.direction(g, lam),
            "ng-block": lambda g, lam: FB.direction(g, lam),
            "foof": lambda g, lam: Fo.direction(g, lam),
            "foof-matched": lambda g, lam: matched_foof_direction(K, g, lam),
            "foof-layerwise": lambda g, lam: matched_foof_direction(K, g, lam, layerwise=True),
            "sgd": lambda g, lam: -g}, K


def _cosines(X: Tensor) -> Tensor:
    """Pairwise cosines of the rows of X (NaN for a zero row)."""
    import torch

    norms = torch.linalg.vector_norm(X, dim=1)
    U = X / torch.where(norms > 0, norms, torch.ones_like(norms))[:, None]
    cos = U @ U.T
    cos[norms == 0, :] = math.nan
    cos[:, norms == 0] = math.nan
    return cos


def directions_at(batch: Problem, dampings: list[float]) -> dict[str, Any]:
    """Return every direction's cosines at the batch's θ.

    ``cosine`` (λ, M, M), ``block_cosine`` (λ, B, M, M), ``norm`` (λ, M) as NumPy arrays in the order of
    ``dampings`` × :data:`DIRECTION_METHODS` × blocks, and the KFAC approximation ``kfac`` (for the damping
    diagnostics).
    """
    import numpy as np
    import torch

    import curvlab as cl

    fns, K = direction_functions(batch)
    g = batch.gradient()
    slices = batch.partition.slices
    cos, block_cos, norm = [], [], []
    for lam in dampings:
        comparison = cl.compare.directions(fns, g, lam)
        X = torch.stack([comparison.directions[m] for m in DIRECTION_METHODS])
        cos.append(_cosines(X).numpy())
        block_cos.append(np.stack([_cosines(X[:, s]).numpy() for s in slices]))
        norm.append(torch.linalg.vector_norm(X, dim=1).numpy())
    return {"cosine": np.stack(cos), "block_cosine": np.stack(block_cos), "norm": np.stack(norm), "kfac": K,
            "gradient_norm": float(g.norm())}


def damping_diagnostics(K: Any, dampings: list[float]) -> dict[str, Any]:
    """Return the damping diagnostics per λ and layer.

    Shares of eig(A) below λ_A and of eig(G) below λ_G, λ_A/‖A‖₂, λ_G/‖G‖₂ (π-rule), and π_l per layer,
    as NumPy arrays (λ, block) and (block,).
    """
    import numpy as np

    import curvlab as cl
    from curvlab.linalg.kron import factor_damping

    blocks = _kron_blocks(K)
    out = {k: np.zeros((len(dampings), len(blocks))) for k in ("fraction_A", "fraction_G", "ratio_A", "ratio_G")}
    pis = np.zeros(len(blocks))
    for i, lam in enumerate(dampings):
        fractions = cl.compare.factor_fraction_below(K, lam, mode="pi")
        for j, (name, _, block) in enumerate(blocks):
            (eA, _), (eG, _) = block.factor_eigh()
            lam_A, lam_G = factor_damping("pi", lam, eA, eG)
            out["fraction_A"][i, j], out["fraction_G"][i, j] = fractions[name]
            out["ratio_A"][i, j] = lam_A / float(eA.max())
            out["ratio_G"][i, j] = lam_G / float(eG.max())
            pis[j] = math.sqrt(lam_A / lam_G) if lam > 0 else math.nan
    return {**out, "pi": pis}


def _directions_cell(checkpoint: int, config: Mapping[str, Any]) -> xr.Dataset:
    import numpy as np
    import xarray as xr

    prob = _problem(config)
    theta = trajectory_theta(prob, checkpoint, config)
    batch = prob.at(theta)
    dampings = [float(d) for d in config["damping"]]
    d = directions_at(batch, dampings)
    diag = damping_diagnostics(d["kfac"], dampings)
    M, lam, cp = list(DIRECTION_METHODS), ("checkpoint", "damping"), ("checkpoint",)
    data = {
        "theta": (("checkpoint", "param"), theta.numpy()[None]),
        "loss": (cp, [batch.loss()]), "gradient_norm": (cp, [d["gradient_norm"]]),
        "cosine": ((*lam, "method", "versus"), d["cosine"][None]),
        "block_cosine": ((*lam, "block", "method", "versus"), d["block_cosine"][None]),
        "direction_norm": ((*lam, "method"), d["norm"][None]),
        "pi": (("checkpoint", "block"), diag["pi"][None]),
        **{f"{k}_below": ((*lam, "block"), diag[f"fraction_{k}"][None]) for k in ("A", "G")},
        **{f"damping_ratio_{k}": ((*lam, "block"), diag[f"ratio_{k}"][None]) for k in ("A", "G")},
    }
    return xr.Dataset(data, coords={"checkpoint": [checkpoint], "damping": dampings, "method": M, "versus": M,
                                    "block": list(prob.partition.names), "param": np.arange(prob.num_params)},
                      attrs=_attrs(prob, config))


# ---------------------------------------------------------------------------------------------- training
def train_options(method: str, lr: float, damping: float, config: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """Return (the ``cl.optim`` method name, its options) of one training run of the grid."""
    options: dict[str, Any] = {"lr": lr, "momentum": config["momentum"]}
    if method == "sgd":
        return "sgd", options
    options.update(damping=damping, kl_clip=config["kl_clip"])
    if method != "foof":
        options.update(fisher="ggn")  # the exact GGN of each batch, as this study's committed runs used
    if method in ("kfac", "kfac-exact", "foof"):
        options.update(inverse_period=config["inverse_period"])
    if method == "kfac-exact":
        return "kfac", {**options, "damping_rule": "exact"}
    return method, options


def _run_label(method: str, lr: float, damping: float) -> str:
    return f"{method} lr={lr:g}" + ("" if method == "sgd" else f" damping={damping:g}")


def _training_cell(method: str, lr: float, damping: float, config: Mapping[str, Any]) -> xr.Dataset:
    import numpy as np
    import xarray as xr

    import curvlab as cl

    prob = _problem(config)
    name, options = train_options(method, lr, damping, config)
    steps = config["train_steps"]
    loss = seconds = np.full(steps + 1, np.nan)
    try:
        ds = cl.optim.train(prob, name, steps=steps, batch_size=config["batch_size"], seed=config["seed"],
                            progress=False, **options)
        loss, seconds = ds["loss"].values, ds["seconds"].values
    except FloatingPointError:  # the loss or gradient stopped being finite: a diverged run
        pass
    diverged = not bool(np.isfinite(loss).all())
    run = ("run",)
    return xr.Dataset(
        {"train_loss": (("run", "step"), loss[None]), "train_seconds": (("run", "step"), seconds[None]),
         "train_diverged": (run, [diverged])},
        coords={"run": [_run_label(method, lr, damping)], "train_method": (run, [method]), "train_lr": (run, [lr]),
                "train_damping": (run, [damping if method != "sgd" else math.nan]), "step": np.arange(steps + 1)},
        attrs=_attrs(prob, config))


def run_cell(cell: dict[str, Any], config: dict[str, Any]) -> xr.Dataset:
    """One cell: the directions at a checkpoint, or one training run (the cell's ``task``)."""
    with torch_threads(config["threads"]):
        if cell["task"] == "directions":
            return _directions_cell(cell["trajectory_step"], config)
        return _training_cell(cell["optimizer"], cell["lr"], cell["optimizer_damping"], config)


def _cells(config: Mapping[str, Any]) -> list[dict[str, Any]]:
    cells = [{"task": "directions", "trajectory_step": int(c), "optimizer": _NONE_METHOD, "lr": 0.0,
              "optimizer_damping": 0.0} for c in config["checkpoints"]]
    for method in config["train_methods"]:
        spec = config["grid"][method]
        for lr in spec["lr"]:
            for lam in ([0.0] if method == "sgd" else spec["damping"]):
                cells.append({"task": "training", "trajectory_step": _NONE_CHECKPOINT, "optimizer": method,
                              "lr": float(lr), "optimizer_damping": float(lam)})
    return cells


_CELL_KEYS = ("task", "trajectory_step", "optimizer", "lr", "optimizer_damping")


def _merge(datasets: list[xr.Dataset]) -> xr.Dataset:
    """Directions cells concatenated along ``checkpoint``, training runs along ``run``, then merged."""
    import xarray as xr

    parts: dict[str, list[xr.Dataset]] = {"directions": [], "training": []}
    for d in datasets:
        task = str(d["task"].values.reshape(-1)[0])
        squeeze = {k: 0 for k in _CELL_KEYS if k in d.dims}
        parts[task].append(d.isel(squeeze, drop=True).drop_vars([k for k in _CELL_KEYS if k in d.coords
                                                                   and k not in d.dims], errors="ignore"))
    merged = []
    if parts["directions"]:
        merged.append(xr.concat(sorted(parts["directions"], key=lambda d: int(d["checkpoint"].values[0])),
                                dim="checkpoint", data_vars="minimal", coords="minimal", compat="override",
                                combine_attrs="drop_conflicts"))
    if parts["training"]:
        merged.append(xr.concat(parts["training"], dim="run", data_vars="minimal", coords="minimal",
                                compat="override", combine_attrs="drop_conflicts"))
    ds = xr.merge(merged, combine_attrs="drop_conflicts")
    return ds


# ---------------------------------------------------------------------------------------------- claims
def final_loss(train_loss: xr.DataArray) -> xr.DataArray:
    """Return a run's final training loss: the mean of ``train_loss`` over the last 10 % of its steps.

    At least one step counts; the mean smooths the step-to-step oscillation of the momentum methods; NaN if
    any of them is.
    """
    steps = train_loss.sizes["step"] - 1
    return train_loss.isel(step=slice(-max(1, steps // 10), None)).mean("step", skipna=False)


def _final_losses(ds: xr.Dataset) -> xr.DataArray:
    """Each run's final training loss (:func:`final_loss`); +inf for a diverged run."""
    import numpy as np

    final = final_loss(ds["train_loss"])
    return final.where(~ds["train_diverged"] & np.isfinite(final), np.inf)


def best_runs(ds: xr.Dataset) -> dict[str, str | None]:
    """Return the run (label) of each training method with the lowest final training loss (None: all diverged)."""
    final = _final_losses(ds)
    out: dict[str, str | None] = {}
    for method in dict.fromkeys(str(m) for m in ds["train_method"].values):
        runs = final.where(ds["train_method"] == method, drop=True)
        i = int(runs.argmin("run"))
        out[method] = str(runs["run"].values[i]) if math.isfinite(float(runs[i])) else None
    return out


def _best_loss(ds: xr.Dataset, method: str) -> float:
    """Return the best final training loss of ``method`` over its grid (+inf: every run diverged)."""
    final = _final_losses(ds).where(ds["train_method"] == method, drop=True)
    if final.size == 0:
        raise ValueError(f"the Dataset has no training run of {method!r}")
    return float(final.min())


def _seconds_per_step(ds: xr.Dataset, method: str) -> float:
    """Median over ``method``'s finished runs of its optimizer seconds per step."""
    import numpy as np

    steps = int(ds["step"].values[-1])
    runs = ds["train_seconds"].isel(step=-1).where((ds["train_method"] == method) & ~ds["train_diverged"], drop=True)
    return float(np.nanmedian(runs.values)) / steps if runs.size else math.nan


def _cos(ds: xr.Dataset, a: str, b: str) -> xr.DataArray:
    return ds["cosine"].sel({"method": a, "versus": b})


def _ratio(ds: xr.Dataset, a: str, b: str) -> float:
    la, lb = _best_loss(ds, a), _best_loss(ds, b)
    return la / lb if lb > 0 and math.isfinite(lb) else math.nan


def _b1(ds: xr.Dataset) -> tuple[float, bool]:
    r = _ratio(ds, "kfac", "ng")
    return r, r < 1


def _b2(ds: xr.Dataset) -> tuple[float, bool]:
    r = _ratio(ds, "ng-block", "ng")
    return r, 0.5 <= r <= 2.0


def _b3(ds: xr.Dataset) -> tuple[float, bool]:
    r = _ratio(ds, "kfac-exact", "kfac")
    closer = float((_cos(ds, "kfac-exact", "ng") - _cos(ds, "kfac", "ng")).median())
    return r, r > 1 and closer > 0


def _b4a(ds: xr.Dataset) -> tuple[float, bool]:
    foof = _cos(ds, "kfac", "foof-matched").median("checkpoint")
    ng = _cos(ds, "kfac", "ng").median("checkpoint")
    share = float((foof > ng).mean())
    return share, share > 0.5


def _b4b(ds: xr.Dataset) -> tuple[float, bool]:
    gain = float((_cos(ds, "kfac", "foof-matched") - _cos(ds, "kfac-exact", "foof-matched")).median())
    return gain, gain > 0


def _b4c(ds: xr.Dataset) -> tuple[float, bool]:
    import numpy as np
    from scipy.stats import spearmanr

    ratio = ds["damping_ratio_G"].values.reshape(-1)
    cos = ds["block_cosine"].sel({"method": "kfac", "versus": "foof-matched"}).transpose(*ds["damping_ratio_G"].dims)
    cos = cos.values.reshape(-1)
    ok = np.isfinite(ratio) & np.isfinite(cos)
    rho = float(spearmanr(ratio[ok], cos[ok]).statistic)
    swamped = cos[ok & (ratio >= 10.0)]
    return rho, rho > 0.5 and swamped.size > 0 and float(np.median(swamped)) > 0.99


def _b5(ds: xr.Dataset) -> tuple[float, bool]:
    r = _ratio(ds, "foof", "kfac")
    cheaper = _seconds_per_step(ds, "foof") < _seconds_per_step(ds, "kfac")
    return r, r <= 1.25 and cheaper


CLAIMS = [
    Claim("B1", "with tuned hyperparameters, KFAC (heuristic π-damping) reaches a lower training loss per step than "
          "the exact subsampled natural gradient with standard damping",
          "best final training loss over the grid (mean over the last 10 % of the steps): L(kfac) / L(ng) < 1", _b1),
    Claim("B2", "block-diagonal exact NG trains about as well as full exact NG (the block-diagonal approximation "
          "does not explain KFAC's edge)", "1/2 ≤ L(ng-block) / L(ng) ≤ 2 (best final losses)", _b2),
    Claim("B3", "KFAC with standard damping is worse than KFAC with heuristic damping and behaves more like exact NG",
          "L(kfac-exact) / L(kfac) > 1 and the median over checkpoints × λ of cos(kfac-exact, ng) − cos(kfac, ng) "
          "> 0; value: the loss ratio", _b3),
    Claim("B4a", "over training, KFAC's update is closer to FOOF's than to exact NG's",
          "share of the λ grid at which the median over checkpoints of cos(kfac, foof-matched) exceeds that of "
          "cos(kfac, ng) > 1/2", _b4a),
    Claim("B4b", "at equal λ, heuristic damping makes KFAC's update more similar to FOOF's than standard damping",
          "median over checkpoints × λ of cos(kfac, foof-matched) − cos(kfac-exact, foof-matched) > 0", _b4b),
    Claim("B4c", "cos(KFAC, FOOF) → 1 as the damping λ_G swamps the output factor G",
          "per layer, checkpoint and λ: Spearman ρ(λ_G/‖G‖₂, layer cos(kfac, foof-matched)) > 0.5 and the "
          "median layer cosine where λ_G/‖G‖₂ ≥ 10 is > 0.99; value: ρ", _b4c),
    Claim("B5", "FOOF matches or beats KFAC per step and costs less per step",
          "L(foof) / L(kfac) ≤ 1.25 (best final losses) and the median seconds per step of FOOF's runs < "
          "KFAC's; value: the loss ratio", _b5),
]


# ---------------------------------------------------------------------------------------------- figures
_LABELS = {"kfac": "KFAC (π-damping)", "kfac-exact": "KFAC (exact damping)", "ng": "exact NG",
           "ng-block": "exact NG, block-diagonal", "foof": "FOOF (same λ)", "foof-matched": "FOOF (λ_A = π√λ)",
           "foof-layerwise": "FOOF (λ_A = π√λ), layer steps 1/λ_G",
           "sgd": "gradient (SGD)"}
_COLORS = {"kfac": "C0", "kfac-exact": "C1", "ng": "C3", "ng-block": "C4", "foof": "C2", "foof-matched": "C8",
           "foof-layerwise": "C9", "sgd": "C7"}


def _figure(width: float, height: float, ncols: int = 1, sharey: bool = False) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(1, ncols, sharey=sharey, squeeze=False)[0]


def _cosine_panel(ax: Any, ds: xr.Dataset, method: str) -> None:
    lam = ds["damping"].values
    for other in DIRECTION_METHODS:
        if other == method:
            continue
        c = _cos(ds, method, other)
        ax.plot(lam, c.median("checkpoint"), marker="o", ms=4, color=_COLORS[other], label=_LABELS[other])
        if ds.sizes["checkpoint"] > 1:
            ax.fill_between(lam, c.min("checkpoint"), c.max("checkpoint"), color=_COLORS[other], alpha=0.1, lw=0)
    ax.set_xscale("log")
    ax.set_xlabel("damping λ")
    ax.set_title(f"{_LABELS[method]} vs …", fontsize=10)
    ax.grid(alpha=0.3)


def _cosines_figure(ds: xr.Dataset) -> Any:
    fig, axes = _figure(10, 4.2, ncols=2, sharey=True)
    for ax, method in zip(axes, ("kfac", "kfac-exact")):
        _cosine_panel(ax, ds, method)
    axes[0].set_ylabel("cosine between update directions")
    axes[0].set_ylim(-0.05, 1.02)
    handles, labels = axes[0].get_legend_handles_labels()
    extra = axes[1].get_legend_handles_labels()
    order = dict(zip(labels, handles))
    order.update(zip(extra[1], extra[0]))
    fig.legend(list(order.values()), list(order), loc="outside right center", fontsize=9)
    cps = ", ".join(str(int(c)) for c in ds["checkpoint"].values)
    fig.suptitle(f"{ds.attrs.get('problem', '')}: which update does KFAC's resemble? (line: median over SGD "
                 f"checkpoints {cps}; band: range)", fontsize=10)
    return fig


def _damping_figure(ds: xr.Dataset) -> Any:
    import numpy as np

    fig, (left, right) = _figure(10, 4.2, ncols=2)
    lam = ds["damping"].values
    for j, block in enumerate(ds["block"].values):
        color = f"C{j}"
        left.plot(lam, ds["G_below"].sel(block=block).median("checkpoint"), marker="o", ms=4, color=color,
                  label=f"layer {block}: eig(G) < λ_G")
        left.plot(lam, ds["A_below"].sel(block=block).median("checkpoint"), ls="--", marker="s", ms=3, color=color,
                  label=f"layer {block}: eig(A) < λ_A")
        ratio = ds["damping_ratio_G"].sel(block=block).values.reshape(-1)
        cos = ds["block_cosine"].sel({"block": block, "method": "kfac", "versus": "foof-matched"})
        gap = np.clip(1 - cos.transpose(*ds["damping_ratio_G"].sel(block=block).dims).values.reshape(-1), 1e-16, None)
        right.scatter(ratio, gap, s=14, color=color, label=f"layer {block}")
    left.set(xscale="log", xlabel="damping λ", ylabel="share of the factor's eigenvalues below its damping",
             ylim=(-0.02, 1.02), title="how much of each factor π-damping swamps (median over checkpoints)")
    right.set(xscale="log", yscale="log", xlabel="λ_G / ‖G‖₂ (output-factor damping / largest eigenvalue)",
              ylabel="1 − cos(KFAC, FOOF with λ_A = π√λ), per layer",
              title="KFAC → FOOF as λ_G swamps G (every checkpoint and λ)")
    for ax in (left, right):
        ax.title.set_fontsize(10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def _training_figure(ds: xr.Dataset) -> Any:
    fig, (left, right) = _figure(10, 4.2, ncols=2, sharey=True)
    for method, run in best_runs(ds).items():
        if run is None:
            continue
        r = ds.sel(run=run)
        for ax, x in ((left, r["step"].values), (right, r["train_seconds"].values)):
            ax.plot(x, r["train_loss"].values, color=_COLORS.get(method, "k"), label=run)
    left.set(yscale="log", xlabel="optimizer step",
             ylabel=f"training loss ({ds.attrs.get('loss_function', '')}, all samples)")
    right.set(xscale="log", xlabel="wall-clock time of the optimizer steps [s]")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    right.legend(fontsize=8, title="best run of each method", title_fontsize=8)
    fig.suptitle(f"{ds.attrs.get('problem', '')}: training with tuned learning rate and damping "
                 f"(batch {ds.attrs.get('batch_size', '?')}, momentum {ds.attrs.get('momentum', '?')})", fontsize=10)
    return fig


def figures(ds: xr.Dataset) -> dict[str, Any]:
    """Return the study's figures, each when its data is there.

    ``cosines`` (directions vs λ), ``damping`` (spectral diagnostics, the KFAC → FOOF limit) and
    ``training`` (best run per method vs step and time).
    """
    out = {}
    if "cosine" in ds:
        out["cosines"] = _cosines_figure(ds)
        out["damping"] = _damping_figure(ds)
    if "train_loss" in ds:
        out["training"] = _training_figure(ds)
    return out


# ---------------------------------------------------------------------------------------------- the study
def _check(config: Mapping[str, Any]) -> None:
    checks.canned_problem(config)
    checks.positive_integers(config, ("n", "batch_size", "train_steps", "inverse_period"))
    checks.non_negative_integers(config, ("threads",))
    checks.distinct_steps(config, "checkpoints")
    checks.positive_numbers(config, "damping")
    if config["kl_clip"] is not None and not (isinstance(config["kl_clip"], (int, float)) and config["kl_clip"] > 0):
        raise ValueError(f"kl_clip must be null (no clipping) or a number > 0; got {config['kl_clip']!r}")
    unknown = [m for m in config["train_methods"] if m not in TRAIN_METHODS]
    if unknown:
        raise ValueError(f"unknown train_methods {unknown}; valid: {list(TRAIN_METHODS)}")
    for m in config["train_methods"]:
        spec = config["grid"].get(m)
        needed = ("lr",) if m == "sgd" else ("lr", "damping")
        if not isinstance(spec, dict) or any(not spec.get(k) for k in needed):
            raise ValueError(f"grid[{m!r}] must give non-empty lists {' and '.join(needed)}; got {spec!r}")


STUDY = Study(
    name="kfac-vs-newton",
    description="KFAC vs exact natural gradient vs FOOF: update directions along SGD training, the damping's "
                "spectral diagnostics, tuned training curves",
    paper="Benzing (2022), Gradient Descent on Neurons and its Link to Approximate Second-Order Optimization, "
          "arXiv:2201.12250",
    config={
        "problem": "digits-mlp", "n": 1024, "seed": 0, "batch_size": 64, "momentum": 0.9,
        "trajectory_lr": 0.1, "checkpoints": [0, 10, 25, 50, 100, 200, 400],
        "damping": [1e-4, 1e-3, 1e-2, 1e-1, 1.0],
        "train_methods": list(TRAIN_METHODS), "train_steps": 200, "kl_clip": None, "inverse_period": 1,
        "grid": {"sgd": {"lr": [0.1, 0.3, 1.0]},
                 "kfac": {"lr": [0.01, 0.03, 0.1], "damping": [0.01, 0.03, 0.1, 0.3]},
                 "kfac-exact": {"lr": [0.01, 0.03, 0.1], "damping": [0.01, 0.03, 0.1, 0.3]},
                 "ng": {"lr": [0.1, 0.3, 1.0], "damping": [0.1, 0.3, 1.0]},
                 "ng-block": {"lr": [0.1, 0.3, 1.0], "damping": [0.1, 0.3, 1.0]},
                 "foof": {"lr": [0.3, 1.0, 3.0], "damping": [0.1, 1.0, 10.0]}},
        "threads": 1,
    },
    quick={"n": 256, "checkpoints": [0, 100], "damping": [1e-3, 1e-2, 1e-1, 1.0], "train_steps": 50,
           "grid": {"sgd": {"lr": [0.3]}, "kfac": {"lr": [0.1], "damping": [0.1]},
                    "kfac-exact": {"lr": [0.1], "damping": [0.1]}, "ng": {"lr": [0.1], "damping": [0.1]},
                    "ng-block": {"lr": [0.1], "damping": [0.1]}, "foof": {"lr": [0.1], "damping": [0.1]}}},
    cells=_cells,
    run_cell=run_cell,
    merge=_merge,
    claims=CLAIMS,
    figures=figures,
    check=_check,
    variables={
        "theta": ("parameter", "flat parameters at the checkpoint (the problem's parameter order)"),
        "loss": ("loss", "training loss L(θ) on the curvature batch (all n samples) at the checkpoint"),
        "gradient_norm": ("loss/parameter", "‖∇L(θ)‖ on the curvature batch"),
        "cosine": ("1", "cosine between the update directions of method and versus (whole parameter vector)"),
        "block_cosine": ("1", "cosine between the parts of the two update directions in one layer (block)"),
        "direction_norm": ("parameter", "Euclidean norm of the method's update direction"),
        "pi": ("1", "π_l = sqrt((tr A / dim A) / (tr G / dim G)) of the layer's KFAC factors"),
        "A_below": ("1", "share of eig(A) below λ_A = π_l √λ (curvlab.compare.factor_fraction_below)"),
        "G_below": ("1", "share of eig(G) below λ_G = √λ / π_l (curvlab.compare.factor_fraction_below)"),
        "damping_ratio_A": ("1", "λ_A / ‖A‖₂ (π-rule input-factor damping over A's largest eigenvalue)"),
        "damping_ratio_G": ("1", "λ_G / ‖G‖₂ (π-rule output-factor damping over G's largest eigenvalue)"),
        "train_loss": ("loss", "training loss on all n samples after each step (NaN: diverged)"),
        "train_seconds": ("s", "wall-clock time of the optimizer steps since the start of the run"),
        "train_diverged": ("1", "the run's loss or gradient stopped being finite"),
        "checkpoint": ("step", "SGD step of the trajectory at which the directions are compared"),
        "damping": ("1", "λ of the update directions (same units as the curvature)"),
        "method": ("1", "update direction (kfac, kfac-exact, ng, ng-block, foof, foof-matched, foof-layerwise, sgd)"),
        "versus": ("1", "the other update direction of the pair (same names as method)"),
        "block": ("1", "layer: block of the problem's partition (nn.Sequential index)"),
        "param": ("1", "index into the flat parameter vector"),
        "run": ("1", "training run of the grid: method, learning rate, damping"),
        "train_method": ("1", "training method of the run (cl.optim; kfac-exact: kfac with damping_rule='exact')"),
        "train_lr": ("1", "learning rate of the run"),
        "train_damping": ("1", "damping λ of the run (NaN for sgd)"),
        "step": ("step", "optimizer step of the training runs (0: initialisation)"),
    },
    version="2",
)
