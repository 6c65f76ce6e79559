"""K-BFGS on the digits ReLU autoencoder (Goldfarb, Ren & Bahamou 2020, arXiv 2006.08877).

Training curves, the BFGS factors against the exact pre-activation curvature, and the
double-damping statistics, after Goldfarb, Ren & Bahamou, "Practical Quasi-Newton Methods for
Training Deep Neural Networks".

Problem: ``digits-autoencoder-relu`` (64-32-16-8-16-32-64, ReLU, linear code layer — the papers'
autoencoder design at digits scale), sigmoid cross-entropy. The canned loss is the **mean over
pixels and images** (``BCEWithLogitsLoss(reduction="mean")``); the paper sums over the 784 pixels
and averages over images, a loss 64× ours here. The output-side curvature G is therefore 64× smaller
than in the paper while K-BFGS uses one λ for both sides (A + √λI, μ₂ = √λ), so the λ that work
here are smaller than the paper's grid {0.01 … 3}; the default grid is shifted accordingly.

**Training** (one run per method × lr × λ, cells ``part="train"``). Every run trains a copy of the
problem (``train_n`` samples, ``seed``) for ``epochs`` epochs of minibatches of ``batch_size``
(:func:`curvlab.optim.batches`, seeded with ``seed``), with :func:`curvlab.optim.make` and the
options of :func:`method_options`:

* ``kbfgs``, ``kbfgs-l`` (memory ``history`` = 10: the authors keep 100 pairs for layers of up to 1,000
  units; 10 keeps that ratio of memory to width at widths ≤ 64, where 100 pairs would hold more than
  the dense H_g): the authors' defaults otherwise (gradient momentum 0.9, weight decay 1e-5, A decay 0.9);
* ``kfac``: the paper's baseline — true Fisher (``fisher="mc"``, one sampled label per example),
  factored damping √λ on each factor (``damping_rule="factored"``), factor EMA 0.9, inverses every
  ``kfac_inverse_period`` = 20 steps (the authors also refresh at each of the first 20 steps; here
  only at step 0), heavy-ball momentum 0.9 on the direction, no KL clipping;
* ``adam``, ``rmsprop``, ``sgd`` (momentum ``sgd_momentum``): torch's optimizers, default ε
  (the paper's tuned ε = 1e-4 is for its 64× larger loss), no damping (λ coordinate 0).

All use weight decay ``weight_decay``. A run stops when a step raises (non-finite loss or gradient)
or the training loss exceeds 10× its initial value (``diverged_step``); its later values are NaN.
``loss`` is the loss on all ``train_n`` samples after each step; ``seconds`` the cumulative
wall-clock time of the optimizer steps only (no loss evaluations, no analysis) and ``cpu_seconds``
their CPU time. Runs execute with one torch thread, after one warm-up step of the method on a
throw-away copy (no run pays one-time costs); the time comparisons use ``cpu_seconds``, which on a
machine shared with other work is the reproducible measure (≈ wall-clock on an idle core), and
``seconds`` is kept as measured. The **best run of a method** is the
one with the lowest final loss (:func:`best_runs`). ``loss_floor`` is the infimum of the loss, the
mean binary entropy of the grey levels (prediction = target); ``loss − loss_floor`` is the mean KL
divergence per pixel.

**Curvature analysis** at the checkpoints (``checkpoint_epochs``) of every K-BFGS, K-BFGS(L) and
KFAC run, on the curvature batch ``cl.problems.load(problem, n=curvature_n, seed=seed)`` at the
run's θ (``theta``):

* ``factor_cosine``, ``top_overlap``: per layer, the method's output factor G (K-BFGS: H_g⁻¹ from
  ``opt.curvature()``, a Kron block with G = H_g⁻¹; KFAC: its running-average Monte-Carlo G)
  against the exact pre-activation GGN of the batch, R Σ_n J_zᵀ ∇²ℓ_n J_z — which is exactly KFAC's
  type-2 factor of the same batch, ``cl.approx.kfac(batch).blocks[i].G`` — by the Frobenius cosine
  and the squared cosine of their top eigenvectors;
* ``step_cosine``: the cosine of the method's step for the batch gradient (its own damping:
  ``C.direction(g, 0)`` for K-BFGS, whose damping is inside its factors; factored √λ for KFAC) with
  the exact block-diagonal damped GGN step −(F_l + λI)⁻¹g_l (``cl.exact.ggn(batch, "block")``) for
  each λ of ``exact_damping`` — a sweep, because the exact GGN's eigenvalues here are ≲ 10⁻², so
  at the runs' own λ the exact step is nearly −g/λ; ``gradient_cosine``: the same for −g;
* ``hg_eig_min``, ``hg_eig_max``: the extreme eigenvalues of H_g; ``exact_g_eig_max``: the largest
  eigenvalue of the exact G (to set against μ₂ = √λ); ``dd_count``: the cumulative double-damping
  counters of ``opt.state_summary()["counters"]`` (pairs offered, Powell and LM stages triggered,
  updates skipped), per layer.

The K-BFGS state is a function of the whole trajectory, not of θ: numbers that depend on it are
recomputed by replaying the run from its settings (deterministic); the exact references from θ alone.

**Hessian-action check** (cells ``part="k3"``, one per λ in ``k3_damping``): for each layer, A is the
input factor (bias folded) of the curvature batch at the initial θ, A_LM = A + √λI fixed; H_a starts
at I and receives ``k3_updates`` Hessian-action BFGS updates
(:meth:`curvlab.approx.KBFGSLayerState.update_inputs`: s = H_a h̄, y = A_LM s) with h̄ varied:
``source="gaussian"`` standard normal vectors (``torch.Generator`` seeded with 1000·seed + the layer's
index), ``source="data"`` the single-sample inputs
[a_n; 1] of the batch in turn. ``k3_error`` is ‖A_LM^½ H_a A_LM^½ − I‖_F/√d — the update maps
E = A_LM^½ H_a A_LM^½ − I to (I − P)E(I − P) with P the projector on A_LM^½ s, so this error cannot
increase (derived) and reaches 0 once the s span the space — and ``k3_error_plain`` is
‖H_a A_LM − I‖_F/√d (same eigenvalues, not monotone). With data h̄ nothing is learnt along input
directions the data never visit (the always-blank pixels): K-BFGS avoids this by its one explicit
inverse at the start.

Layout: dimension ``run`` (coordinates ``method``, ``lr``, ``damping``), ``step`` (coordinate
``epoch``), ``checkpoint`` (the step number; ``checkpoint_epoch``), ``layer`` (module names;
``layer_shape``), ``counter``, ``param``; the check has ``k3_damping``, ``source``, ``update``. The
attrs ``problem``, ``n`` (= ``curvature_n``) and ``seed`` name the curvature batch; ``train_n`` the
training set ``cl.problems.load(problem, n=train_n, seed=seed)``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from curvlab.studies import Claim, Study

__all__ = ["STUDY", "CONFIG", "METHODS", "method_options", "best_runs", "loss_floor", "checkpoint_steps",
           "total_steps", "timed_training", "layer_table", "one_thread"]

KBFGS_METHODS = ("kbfgs", "kbfgs-l")
SECOND_ORDER = (*KBFGS_METHODS, "kfac")
FIRST_ORDER = ("adam", "rmsprop", "sgd")
METHODS = SECOND_ORDER + FIRST_ORDER
COUNTERS = ("pairs", "powell", "lm", "skipped")
SOURCES = ("gaussian", "data")
TITLES = {"kbfgs": "K-BFGS", "kbfgs-l": "K-BFGS(L)", "kfac": "KFAC", "adam": "Adam", "rmsprop": "RMSprop",
          "sgd": "SGD-m", "gradient": "gradient"}
#: K1-kfac: "comparable to KFAC" means at most this multiple of KFAC's excess loss
COMPARABLE = 1.25
#: a run whose training loss exceeds this multiple of its initial loss is stopped as diverged
DIVERGED = 10.0

CONFIG: dict[str, Any] = {
    "problem": "digits-autoencoder-relu", "seed": 0, "train_n": 1797, "curvature_n": 256, "batch_size": 256,
    "epochs": 40, "checkpoint_epochs": [1, 10, 40], "exact_damping": [1e-5, 1e-4, 1e-3],
    "weight_decay": 1e-5, "history": 10,
    "kfac_inverse_period": 20, "sgd_momentum": 0.9,
    "grid": {"kbfgs": {"lr": [0.3, 1.0, 3.0], "damping": [1e-4, 1e-3, 1e-2]},
             "kbfgs-l": {"lr": [0.3, 1.0, 3.0], "damping": [1e-4, 1e-3, 1e-2]},
             "kfac": {"lr": [0.1, 0.3, 1.0], "damping": [1e-2, 1e-1, 1.0]},
             "adam": {"lr": [3e-3, 1e-2, 3e-2]}, "rmsprop": {"lr": [1e-3, 3e-3, 1e-2]},
             "sgd": {"lr": [1.0, 3.0, 10.0]}},
    "k3_damping": [1e-4, 1e-3, 1e-2], "k3_updates": 800,
}

QUICK: dict[str, Any] = {
    "train_n": 512, "curvature_n": 32, "epochs": 3, "checkpoint_epochs": [1, 3],
    "grid": {"kbfgs": {"lr": [1.0], "damping": [1e-3]}, "kbfgs-l": {"lr": [1.0], "damping": [1e-3]},
             "kfac": {"lr": [1.0], "damping": [1e-1]}, "adam": {"lr": [1e-2]}, "rmsprop": {"lr": [3e-3]},
             "sgd": {"lr": [3.0]}},
    "k3_damping": [1e-3], "k3_updates": 60,
}


# ------------------------------------------------------------------------------------------ configuration
def steps_per_epoch(config: Mapping[str, Any]) -> int:
    """Minibatches per epoch (the last incomplete one dropped, as :func:`curvlab.optim.batches`)."""
    return max(1, config["train_n"] // min(config["batch_size"], config["train_n"]))


def total_steps(config: Mapping[str, Any]) -> int:
    """Return the number of optimizer steps of a run, epochs × steps per epoch."""
    return config["epochs"] * steps_per_epoch(config)


def checkpoint_steps(config: Mapping[str, Any]) -> list[int]:
    """Return the analysed steps: each of ``checkpoint_epochs`` and the last step."""
    per = steps_per_epoch(config)
    return sorted({e * per for e in config["checkpoint_epochs"]} | {total_steps(config)})


def method_options(method: str, lr: float, damping: float, config: Mapping[str, Any]) -> dict[str, Any]:
    """Return the options of :func:`curvlab.optim.make` for one run (see the module docstring)."""
    common = {"lr": lr, "weight_decay": config["weight_decay"]}
    if method == "kbfgs":
        return {**common, "damping": damping}
    if method == "kbfgs-l":
        return {**common, "damping": damping, "history": config["history"]}
    if method == "kfac":
        return {**common, "damping": damping, "damping_rule": "factored", "fisher": "mc", "ema_decay": 0.9,
                "inverse_period": config["kfac_inverse_period"], "kl_clip": None, "seed": config["seed"]}
    if method == "sgd":
        return {**common, "momentum": config["sgd_momentum"]}
    return common


def _check(config: Mapping[str, Any]) -> None:
    grid = config["grid"]
    if not isinstance(grid, dict) or not grid:
        raise ValueError("grid must map method names to {'lr': [...], 'damping': [...]}")
    for method, axes in grid.items():
        if method not in METHODS:
            raise ValueError(f"grid: unknown method {method!r}; use some of {list(METHODS)}")
        need = ("lr", "damping") if method in SECOND_ORDER else ("lr",)
        for key in need:
            values = axes.get(key) if isinstance(axes, dict) else None
            if not isinstance(values, list) or not values or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values):
                raise ValueError(f"grid[{method!r}][{key!r}] must be a non-empty list of positive numbers; "
                                 f"got {values!r}")
    if config["epochs"] < 1 or any(not 1 <= e <= config["epochs"] for e in config["checkpoint_epochs"]):
        raise ValueError(f"checkpoint_epochs must lie in [1, epochs={config['epochs']}]; got "
                         f"{config['checkpoint_epochs']}")
    if config["train_n"] < config["batch_size"]:
        raise ValueError(f"train_n ({config['train_n']}) must be at least batch_size ({config['batch_size']})")
    if not config["k3_damping"] or any(v <= 0 for v in config["k3_damping"]) or config["k3_updates"] < 1:
        raise ValueError("k3_damping must be positive numbers and k3_updates ≥ 1")


def _cells(config: Mapping[str, Any]) -> list[dict[str, Any]]:
    cells = []
    for method, axes in config["grid"].items():
        dampings = axes["damping"] if method in SECOND_ORDER else [0.0]
        cells += [{"part": "train", "method": method, "lr": float(lr), "damping": float(lam)}
                  for lr in axes["lr"] for lam in dampings]
    cells += [{"part": "k3", "method": "kbfgs", "lr": 0.0, "damping": float(lam)} for lam in config["k3_damping"]]
    return cells


# ------------------------------------------------------------------------------------------ shared helpers
def loss_floor(prob) -> float:
    """Return the infimum of the problem's loss over network outputs.

    The mean binary entropy of the targets for ``BCEWithLogitsLoss`` (prediction = target), 0 for
    cross-entropy on class labels and MSE.
    """
    import torch

    if isinstance(prob.loss_fn, torch.nn.BCEWithLogitsLoss):
        y = prob.y
        return float(-(torch.xlogy(y, y) + torch.xlogy(1 - y, 1 - y)).mean())
    return 0.0


def layer_table(prob) -> tuple[list[str], list[str]]:
    """(partition block names, "d_in→d_out" of each) for a problem whose blocks are nn.Linear layers."""
    import torch

    modules = dict(prob.model.named_modules())
    names = list(prob.partition.names)
    shapes = []
    for n in names:
        m = modules[n]
        shapes.append(f"{m.in_features}→{m.out_features}" if isinstance(m, torch.nn.Linear) else n)
    return names, shapes


def _cos(a, b) -> float:
    return float(a @ b) / float(a.norm() * b.norm())


# ------------------------------------------------------------------------------------------ one run
def _analysis(method: str, C, batch, damping: float, layers: list[str], exact_damping: list[float]) -> dict:
    """Factor and step agreement of a method's curvature C with the exact GGN of ``batch``."""
    import numpy as np

    import curvlab as cl
    from curvlab.linalg import Dense

    K = cl.approx.kfac(batch)  # type-2: its G is the exact pre-activation GGN of the batch
    F = cl.exact.ggn(batch, structure="block")
    g = batch.gradient()
    own = C.direction(g, 0.0) if method in KBFGS_METHODS else C.direction(g, damping, mode="factored")
    exact = [F.direction(g, lam) for lam in exact_damping]
    out = {"step_cosine": [_cos(own, x) for x in exact], "gradient_cosine": [_cos(-g, x) for x in exact]}
    L = len(layers)
    cosine, overlap, g_max, eig = np.full(L, np.nan), np.full(L, np.nan), np.full(L, np.nan), np.full((2, L), np.nan)
    for i, (kb, cb) in enumerate(zip(K.blocks, C.blocks)):
        approx, reference = Dense(cb.G), Dense(kb.G)
        cosine[i] = float(cl.compare.cosine(approx, reference))
        overlap[i] = cl.compare.spectra(approx, reference, k=1, full=False).overlap
        g_max[i] = float(reference.eigvalsh()[-1])
        if method in KBFGS_METHODS:
            info = C.info[layers[i]]
            eig[:, i] = info["H_g_eig_min"], info["H_g_eig_max"]
    out.update(factor_cosine=cosine, top_overlap=overlap, hg_eig=eig, exact_g_eig_max=g_max)
    return out


class _Record:
    """The checkpoint arrays of one run."""

    def __init__(self, steps: int, checkpoints: list[int], num_layers: int, num_params: int,
                 num_exact: int) -> None:
        import numpy as np

        nan = np.nan
        self.cps = checkpoints
        c, L = len(checkpoints), num_layers
        self.theta = np.full((c, num_params), nan)
        self.factor_cosine, self.top_overlap, self.exact_g_eig_max = (np.full((c, L), nan) for _ in range(3))
        self.hg_eig = np.full((2, c, L), nan)
        self.step_cosine, self.gradient_cosine = np.full((c, num_exact), nan), np.full((c, num_exact), nan)
        self.dd_count = np.full((c, L, len(COUNTERS)), nan)

    def checkpoint(self, t: int, theta, method: str, opt, batch, damping: float, layers: list[str],
                   exact_damping: list[float]) -> None:
        j = self.cps.index(t)
        self.theta[j] = theta.cpu().numpy()
        if method not in SECOND_ORDER:
            return
        a = _analysis(method, opt.curvature(), batch.at(theta), damping, layers, exact_damping)
        self.factor_cosine[j], self.top_overlap[j] = a["factor_cosine"], a["top_overlap"]
        self.hg_eig[:, j] = a["hg_eig"]
        self.exact_g_eig_max[j] = a["exact_g_eig_max"]
        self.step_cosine[j], self.gradient_cosine[j] = a["step_cosine"], a["gradient_cosine"]
        if method in KBFGS_METHODS:
            counters = opt.state_summary()["counters"]
            for i, name in enumerate(layers):
                self.dd_count[j, i] = [counters[name][k] for k in COUNTERS]


def _warm_up(method: str, prob, options: dict[str, Any], batch_size: int) -> None:
    """One step on a throw-away copy, so that no run's timing includes one-time costs (imports, caches)."""
    import copy

    import curvlab as cl

    opt = cl.optim.make(method, copy.deepcopy(prob.model), prob.loss_fn, **options)
    opt.step(prob.X[:batch_size], prob.y[:batch_size])


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Limit torch to one thread inside the context (restored after).

    Small matrices gain nothing from more, timings are reproducible, and on a machine shared with other work
    a thread pool only adds contention.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def timed_training(prob, method: str, options: dict[str, Any], steps: int, batch_size: int, seed: int,
                   on_step: Callable[[int, Any, Any], None] | None = None) -> dict[str, Any]:
    """Train a copy of ``prob``'s model with :func:`curvlab.optim.make` on :func:`curvlab.optim.batches`.

    One torch thread, after a warm-up step on a throw-away copy. Returns ``loss`` (on all of ``prob``'s
    samples, after each step; index 0: before the first), ``seconds`` and ``cpu_seconds`` (cumulative
    wall-clock and CPU time of the optimizer steps alone) — NaN after a divergence — and
    ``diverged_step`` (−1: none): the step that raised ``FloatingPointError`` or whose loss was not
    finite or above ``DIVERGED`` × the initial loss. ``on_step(t, θ, opt)`` runs after every step.
    """
    import copy
    import time

    import numpy as np

    import curvlab as cl

    with one_thread():  # reproducible timings: CPU time of one thread ≈ wall-clock on an idle core
        _warm_up(method, prob, options, batch_size)
        opt = cl.optim.make(method, copy.deepcopy(prob.model), prob.loss_fn, **options)
        out = {k: np.full(steps + 1, np.nan) for k in ("loss", "seconds", "cpu_seconds")}
        out["loss"][0], out["seconds"][0], out["cpu_seconds"][0], out["diverged_step"] = prob.loss(), 0.0, 0.0, -1
        wall = cpu = 0.0
        for t, ix in enumerate(cl.optim.batches(prob.num_samples, batch_size, steps, seed), 1):
            start, start_cpu = time.perf_counter(), time.process_time()
            try:
                opt.step(prob.X[ix], prob.y[ix])
            except FloatingPointError:
                out["diverged_step"] = t
                break
            wall, cpu = wall + time.perf_counter() - start, cpu + time.process_time() - start_cpu
            theta = opt.theta()
            out["loss"][t], out["seconds"][t], out["cpu_seconds"][t] = prob.loss(theta), wall, cpu
            if not math.isfinite(out["loss"][t]) or out["loss"][t] > DIVERGED * out["loss"][0]:
                out["diverged_step"] = t
                break
            if on_step is not None:
                on_step(t, theta, opt)
    return out


def _train_cell(cell: Mapping[str, Any], config: Mapping[str, Any]):
    import numpy as np
    import xarray as xr

    import curvlab as cl

    prob = cl.problems.load(config["problem"], n=config["train_n"], seed=config["seed"])
    batch = cl.problems.load(config["problem"], n=config["curvature_n"], seed=config["seed"])
    method, damping = cell["method"], cell["damping"]
    layers, shapes = layer_table(prob)
    steps = total_steps(config)
    rec = _Record(steps, checkpoint_steps(config), len(layers), prob.num_params, len(config["exact_damping"]))

    def on_step(t: int, theta, opt) -> None:
        if t in rec.cps:
            rec.checkpoint(t, theta, method, opt, batch, damping, layers, config["exact_damping"])

    curves = timed_training(prob, method, method_options(method, cell["lr"], damping, config), steps,
                            config["batch_size"], config["seed"], on_step)
    per = steps_per_epoch(config)
    step = np.arange(steps + 1)
    cl_ = ("checkpoint", "layer")
    return xr.Dataset(
        {"loss": ("step", curves["loss"]), "seconds": ("step", curves["seconds"]),
         "cpu_seconds": ("step", curves["cpu_seconds"]), "diverged_step": ((), curves["diverged_step"]),
         "theta": (("checkpoint", "param"), rec.theta), "factor_cosine": (cl_, rec.factor_cosine),
         "top_overlap": (cl_, rec.top_overlap), "hg_eig_min": (cl_, rec.hg_eig[0]),
         "hg_eig_max": (cl_, rec.hg_eig[1]), "exact_g_eig_max": (cl_, rec.exact_g_eig_max),
         "step_cosine": (("checkpoint", "exact_damping"), rec.step_cosine),
         "gradient_cosine": (("checkpoint", "exact_damping"), rec.gradient_cosine),
         "dd_count": (("checkpoint", "layer", "counter"), rec.dd_count), "loss_floor": ((), loss_floor(prob))},
        coords={"step": step, "epoch": ("step", step / per), "checkpoint": np.array(rec.cps),
                "checkpoint_epoch": ("checkpoint", np.array(rec.cps) / per), "layer": layers,
                "layer_shape": ("layer", shapes), "counter": list(COUNTERS),
                "exact_damping": np.array(config["exact_damping"], dtype=float),
                "param": np.arange(prob.num_params)})


# ------------------------------------------------------------------------------------------ the Hessian-action check
def _k3_errors(layer, A, h_bars, damping: float):
    """‖A_LM^½ H A_LM^½ − I‖_F/√d and ‖H A_LM − I‖_F/√d before and after each update (H starts at I)."""
    import numpy as np
    import torch

    layer.observe(A, 0.0, damping)  # A and A_LM = A + √λI, fixed from here on
    layer.H_a = torch.eye(A.shape[0], dtype=A.dtype)
    w, Q = torch.linalg.eigh(layer.A_LM)
    root = (Q * w.sqrt()) @ Q.T
    eye = torch.eye(A.shape[0], dtype=A.dtype)
    scale = math.sqrt(A.shape[0])
    errors = np.empty((2, len(h_bars) + 1))

    def measure(k: int) -> None:
        errors[0, k] = float(torch.linalg.matrix_norm(root @ layer.H_a @ root - eye)) / scale
        errors[1, k] = float(torch.linalg.matrix_norm(layer.H_a @ layer.A_LM - eye)) / scale

    measure(0)
    for k, h in enumerate(h_bars, 1):
        layer.update_inputs(h)
        measure(k)
    return errors


def _k3_cell(cell: Mapping[str, Any], config: Mapping[str, Any]):
    import numpy as np
    import torch
    import xarray as xr

    import curvlab as cl
    from curvlab.approx.factors import collect

    batch = cl.problems.load(config["problem"], n=config["curvature_n"], seed=config["seed"])
    layers, shapes = layer_table(batch)
    state = cl.approx.KBFGS(batch, damping=cell["damping"])
    col = collect(batch, None, method="K-BFGS")
    pieces = {p.start: p for plan in col.plans for p in plan.pieces}
    K, n = config["k3_updates"], batch.num_samples
    out = np.empty((len(SOURCES), len(layers), 2, K + 1))
    for i, name in enumerate(layers):
        layer = state.layers[name]
        piece = pieces[layer.start]
        A, inputs = piece.input_factor("expand"), piece.inputs()[:, 0]
        gen = torch.Generator().manual_seed(config["seed"] * 1000 + i)
        sources = {"gaussian": torch.randn(K, A.shape[0], generator=gen, dtype=A.dtype),
                   "data": inputs[torch.arange(K) % n]}
        for s, src in enumerate(SOURCES):
            layer.H_a = None
            out[s, i] = _k3_errors(layer, A, list(sources[src]), cell["damping"])
    dims = ("source", "layer", "update")
    return xr.Dataset({"k3_error": (dims, out[:, :, 0]), "k3_error_plain": (dims, out[:, :, 1])},
                      coords={"source": list(SOURCES), "layer": layers, "layer_shape": ("layer", shapes),
                              "update": np.arange(K + 1)})


def run_cell(cell: Mapping[str, Any], config: Mapping[str, Any]):
    """Return a training run (``part="train"``) or the Hessian-action check at one λ (``part="k3"``)."""
    with one_thread():
        ds = _train_cell(cell, config) if cell["part"] == "train" else _k3_cell(cell, config)
    ds.attrs.update(problem=config["problem"], n=int(config["curvature_n"]), seed=int(config["seed"]),
                    train_n=int(config["train_n"]), batch_size=int(config["batch_size"]))
    return ds


def _merge(datasets: list) -> Any:
    """Merge the cells: training runs along ``run`` (method, lr, damping as coordinates), checks by ``k3_damping``."""
    import numpy as np
    import xarray as xr

    keys = ["part", "method", "lr", "damping"]
    train = [d.squeeze(keys).drop_vars("part") for d in datasets if str(d["part"].values[0]) == "train"]
    k3 = [d.squeeze(keys).drop_vars(["part", "method", "lr"]).rename(damping="k3_damping")
          for d in datasets if str(d["part"].values[0]) == "k3"]
    parts = []
    if train:
        runs = xr.concat(train, dim="run", data_vars="all", coords="different", compat="equals", join="outer")
        for c in ("method", "lr", "damping"):  # a coordinate equal in every run stays per run
            if runs[c].dims != ("run",):
                runs = runs.assign_coords({c: ("run", [runs[c].values.item()] * len(train))})
        floor = runs["loss_floor"].values
        runs["loss_floor"] = float(floor[0]) if np.all(floor == floor[0]) else runs["loss_floor"]
        parts.append(runs.assign_coords(run=np.arange(len(train))))
    if k3:
        parts.append(xr.concat(k3, dim="k3_damping", coords="different", compat="equals"))
    return xr.merge(parts, compat="no_conflicts", join="outer", combine_attrs="drop_conflicts")


# ------------------------------------------------------------------------------------------ claims
def best_runs(ds) -> dict[str, int]:
    """Return method → the run index with the lowest final training loss (diverged runs excluded)."""
    import numpy as np

    final = ds["loss"].isel(step=-1).values
    methods = ds["method"].values.astype(str)
    best = {}
    for m in METHODS:
        idx = np.flatnonzero((methods == m) & np.isfinite(final))
        if idx.size:
            best[m] = int(idx[np.argmin(final[idx])])
    return best


def _excess_final(ds) -> dict[str, float]:
    floor = float(ds["loss_floor"])
    return {m: float(ds["loss"].isel(run=r, step=-1)) - floor for m, r in best_runs(ds).items()}


def _excess_at_time(ds) -> dict[str, float]:
    """Excess loss of each best run at t* = the shortest total optimizer time among the best runs."""
    import numpy as np

    best = best_runs(ds)
    curves = {m: (ds["cpu_seconds"].isel(run=r).values, ds["loss"].isel(run=r).values) for m, r in best.items()}
    t_star = min(float(np.nanmax(s)) for s, _ in curves.values())
    floor = float(ds["loss_floor"])
    return {m: float(np.interp(t_star, s[np.isfinite(s)], v[np.isfinite(s)])) - floor for m, (s, v) in curves.items()}


def _ratio_first_order(excess: dict[str, float]) -> tuple[float, bool]:
    if not all(m in excess for m in METHODS):
        return math.nan, False
    r = max(excess[m] for m in KBFGS_METHODS) / min(excess[m] for m in FIRST_ORDER)
    return r, r < 1


def _k1(ds) -> tuple[float, bool]:
    return _ratio_first_order(_excess_final(ds))


def _k1_time(ds) -> tuple[float, bool]:
    return _ratio_first_order(_excess_at_time(ds))


def _k1_kfac(ds) -> tuple[float, bool]:
    excess = _excess_final(ds)
    if not all(m in excess for m in SECOND_ORDER):
        return math.nan, False
    r = max(excess[m] for m in KBFGS_METHODS) / excess["kfac"]
    return r, r <= COMPARABLE


def _kbfgs_runs(ds):
    return ds.isel(run=[i for i, m in enumerate(ds["method"].values.astype(str)) if m in KBFGS_METHODS])


def _k2(ds) -> tuple[float, bool]:
    import numpy as np

    eig = _kbfgs_runs(ds)["hg_eig_min"].values
    if not np.isfinite(eig).any():
        return math.nan, False
    v = float(np.nanmin(eig))
    return v, v > 0


def _last_counts(ds, run: int):
    """Return the run's double-damping counters (layer, counter) at its last recorded checkpoint (NaN if none)."""
    import numpy as np

    counts = ds["dd_count"].isel(run=run).values
    done = [j for j in range(counts.shape[0]) if np.isfinite(counts[j]).all()]
    return counts[done[-1]] if done else np.full(counts.shape[1:], np.nan)


def _k2_skip(ds) -> tuple[float, bool]:
    import numpy as np

    runs = _kbfgs_runs(ds)
    last = np.stack([_last_counts(runs, r) for r in range(runs.sizes["run"])])  # (run, layer, counter)
    pairs, skipped = np.nansum(last[..., COUNTERS.index("pairs")]), np.nansum(last[..., COUNTERS.index("skipped")])
    if pairs == 0:
        return math.nan, False
    return float(skipped / pairs), bool(skipped == 0)


def _k3(ds) -> tuple[float, bool]:
    import numpy as np

    err = ds["k3_error"].values  # (k3_damping, source, layer, update)
    rise = float((np.diff(err, axis=-1) / err[..., :1]).max())  # the largest increase over one update
    return rise, rise <= 1e-10


def _k3_limit(ds) -> tuple[float, bool]:
    gauss = ds["k3_error"].sel(source="gaussian")
    ratio = float((gauss.isel(update=-1) / gauss.isel(update=0)).max())
    return ratio, ratio < 1e-3


CLAIMS = [
    Claim("K1", "K-BFGS and K-BFGS(L) reach a lower training loss than Adam, RMSprop and SGD-momentum after the same "
                "number of epochs",
          "r = max(excess loss of K-BFGS, K-BFGS(L)) / min(excess loss of Adam, RMSprop, SGD-m) after the last epoch, "
          "each method at its best (lr, λ) by final loss; excess = loss − loss_floor; holds if r < 1", _k1),
    Claim("K1-time", "K-BFGS and K-BFGS(L) reach a lower training loss than Adam, RMSprop and SGD-momentum in the same "
                     "wall-clock time",
          "r as in K1 with each best run's loss at t* = the shortest total optimizer time among the best runs "
          "(cumulative CPU seconds of the steps, one torch thread; linear interpolation); holds if r < 1", _k1_time),
    Claim("K1-kfac", "K-BFGS and K-BFGS(L) perform comparably to KFAC (true Fisher) in training loss per epoch",
          f"r = max(excess loss of K-BFGS, K-BFGS(L)) / excess loss of KFAC after the last epoch (best settings); "
          f"holds if r ≤ {COMPARABLE}", _k1_kfac),
    Claim("K2", "after double damping H_g stays symmetric positive definite",
          "min eig(H_g) over every K-BFGS and K-BFGS(L) run, checkpoint and layer; holds if > 0", _k2),
    Claim("K2-skip", "after double damping (sᵀy ≥ μ₂‖s‖² > 0) no output-side BFGS update is skipped",
          "skipped / offered output-side updates over every K-BFGS and K-BFGS(L) run (the optimizer's counters "
          "at the last checkpoint reached); holds if 0", _k2_skip),
    Claim("K3", "with A fixed every Hessian-action update brings H_a closer to (A + √λI)⁻¹",
          "the largest increase of ‖A_LM^½ H_a A_LM^½ − I‖_F over one update, relative to its initial value, over "
          "every λ, layer and h̄ source (Gaussian, data); holds if ≤ 1e-10", _k3),
    Claim("K3-limit", "with A fixed and varied h̄ the Hessian-action updates drive H_a to (A + √λI)⁻¹",
          "the largest, over λ and layers, final/initial ratio of ‖A_LM^½ H_a A_LM^½ − I‖_F after k3_updates "
          "updates with Gaussian h̄; holds if < 1e-3", _k3_limit),
]


# ------------------------------------------------------------------------------------------ figures
def _label(ds, run: int) -> str:
    m = str(ds["method"].values[run])
    lam = float(ds["damping"].values[run])
    return f"{TITLES[m]} (lr {float(ds['lr'].values[run]):g}" + (f", λ {lam:g})" if m in SECOND_ORDER else ")")


def _colors() -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {m: cmap(i) for i, m in enumerate((*METHODS, "gradient"))}


def _curves(ds, x: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.subplots()
    colors, floor = _colors(), float(ds["loss_floor"])
    for m, r in best_runs(ds).items():
        run = ds.isel(run=r)
        xs = run["epoch"].values if x == "epoch" else run["cpu_seconds"].values
        ax.plot(xs, run["loss"].values - floor, color=colors[m], label=_label(ds, r),
                ls="-" if m in SECOND_ORDER else "--")
    ax.set_yscale("log")
    ax.set_xlabel("epoch" if x == "epoch" else "optimizer time (s; CPU time, one thread ≈ wall-clock on an idle core)")
    ax.set_ylabel("training loss − entropy floor (nats / pixel)")
    ax.set_title(f"{ds.attrs.get('problem', '')}: best run per method, vs {'epochs' if x == 'epoch' else 'time'}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return fig


def _grid_figure(ds):
    import numpy as np
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    methods = [m for m in METHODS if m in set(ds["method"].values.astype(str))]
    fig = Figure(figsize=(3.2 * min(3, len(methods)), 2.8 * math.ceil(len(methods) / 3)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(math.ceil(len(methods) / 3), min(3, len(methods)), squeeze=False)).ravel()
    final = ds["loss"].isel(step=-1) - float(ds["loss_floor"])
    for ax, m in zip(axes, methods):
        runs = np.flatnonzero(ds["method"].values.astype(str) == m)
        for lam in sorted(set(ds["damping"].values[runs])):
            sel = [r for r in runs if ds["damping"].values[r] == lam]
            lr = ds["lr"].values[sel]
            order = np.argsort(lr)
            ax.plot(lr[order], final.values[sel][order], marker="o",
                    label=f"λ {lam:g}" if m in SECOND_ORDER else "no damping")
        ax.set_xscale("log")
        lrs = sorted(set(ds["lr"].values[runs]))
        ax.set_xticks(lrs, [f"{v:g}" for v in lrs])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(TITLES[m])
        ax.set_xlabel("learning rate")
        ax.set_ylabel("final loss − floor (nats / pixel)")
        ax.legend(fontsize=7, title="missing: diverged", title_fontsize=7)
    for ax in axes[len(methods):]:
        ax.set_visible(False)
    fig.suptitle("final excess training loss of every setting of the grid")
    return fig


def _factor_figure(ds):
    import numpy as np
    from matplotlib.figure import Figure

    best = {m: r for m, r in best_runs(ds).items() if m in SECOND_ORDER}
    cps = ds["checkpoint_epoch"].values
    fig = Figure(figsize=(3.3 * len(cps), 5.4), layout="constrained")
    axes = fig.subplots(2, len(cps), squeeze=False)
    colors = _colors()
    x = np.arange(ds.sizes["layer"])
    width = 0.8 / max(1, len(best))
    for row, (var, ylabel) in enumerate((("factor_cosine", "cosine(G_method, G_exact)"),
                                         ("top_overlap", "top-eigenvector overlap (cos²)"))):
        for j, ax in enumerate(axes[row]):
            for k, (m, r) in enumerate(best.items()):
                ax.bar(x + (k - (len(best) - 1) / 2) * width, ds[var].isel(run=r, checkpoint=j).values, width,
                       color=colors[m], label=TITLES[m] + (" H_g⁻¹" if m in KBFGS_METHODS else " G (MC, EMA)"))
            ax.set_ylim(0, 1.02)
            ax.set_xticks(x, ds["layer_shape"].values, rotation=30, fontsize=8)
            ax.set_title(f"epoch {cps[j]:g}", fontsize=9)
            ax.set_ylabel(ylabel if j == 0 else "")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("output factor G vs the exact pre-activation GGN (best runs)")
    return fig


def _step_figure(ds):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.subplots()
    colors = _colors()
    lams = ds["exact_damping"].values
    best = {m: r for m, r in best_runs(ds).items() if m in SECOND_ORDER}
    for m, r in best.items():
        run = ds.isel(run=r)
        for j, e in enumerate(run["checkpoint_epoch"].values):
            last = j == run.sizes["checkpoint"] - 1
            ax.plot(lams, run["step_cosine"].isel(checkpoint=j).values, marker="o", color=colors[m],
                    alpha=1.0 if last else 0.35, label=f"{_label(ds, r)}, epoch {e:g}")
    if best:
        run = ds.isel(run=next(iter(best.values())))
        ax.plot(lams, run["gradient_cosine"].isel(checkpoint=-1).values, marker="x", ls=":",
                color=colors["gradient"], label=f"−g (on the {TITLES[next(iter(best))]} run, last epoch)")
    ax.set_xscale("log")
    ax.set_ylim(-0.05, 1.02)
    ax.set_xlabel("damping λ of the exact step −(F_block + λI)⁻¹g")
    ax.set_ylabel("cosine with the exact step")
    ax.set_title("steps vs the exact block-diagonal damped GGN step (curvature batch)", fontsize=10)
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    return fig


def _last_checkpoint(ds, run: int) -> int:
    """Index of the run's last checkpoint with an analysis (it may have diverged before the end)."""
    import numpy as np

    done = np.flatnonzero(np.isfinite(ds["factor_cosine"].isel(run=run).values).all(axis=1))
    return int(done[-1]) if done.size else ds.sizes["checkpoint"] - 1


def _damping_figure(ds):
    import numpy as np
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11.0, 3.9), layout="constrained")
    axes = fig.subplots(1, 3)
    colors = _colors()
    x = np.arange(ds.sizes["layer"])
    best = {m: r for m, r in best_runs(ds).items() if m in KBFGS_METHODS}
    for k, (m, r) in enumerate(best.items()):
        last = _last_counts(ds, r)
        pairs = last[:, COUNTERS.index("pairs")]
        off = (k - (len(best) - 1) / 2) * 0.4
        for ax, stage in zip(axes[:2], ("powell", "lm")):
            ax.bar(x + off, last[:, COUNTERS.index(stage)] / pairs, 0.4, color=colors[m], label=_label(ds, r))
        j = _last_checkpoint(ds, r)
        at = ds.isel(run=r, checkpoint=j)
        low, high = 1 / at["hg_eig_max"].values, 1 / at["hg_eig_min"].values
        axes[2].vlines(x + off / 2, low, high, color=colors[m], lw=4, label=f"{TITLES[m]}: eig(H_g⁻¹)")
        axes[2].plot(x + off / 2, ds["exact_g_eig_max"].isel(run=r, checkpoint=j).values, "x", color=colors[m],
                     ms=8, label=f"{TITLES[m]} run: max eig(exact G)")
        axes[2].axhline(math.sqrt(float(ds["damping"].values[r])), color=colors[m], ls=":", lw=1,
                        label=f"μ₂ = √λ = {math.sqrt(float(ds['damping'].values[r])):.3g}")
    for ax, title in zip(axes, ("Powell stage triggered", "Levenberg–Marquardt stage triggered",
                                "output-side spectra, last checkpoint")):
        ax.set_xticks(x, ds["layer_shape"].values, rotation=30, fontsize=8)
        ax.set_title(title, fontsize=10)
    for ax in axes[:2]:
        ax.set_ylim(0, 1.05)
    axes[0].set_ylabel("share of output-side updates")
    axes[2].set_yscale("log")
    axes[2].set_ylabel("eigenvalue")
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=6)
    fig.suptitle("double damping of the best K-BFGS runs (whole run; H_g⁻¹ > 0 everywhere: SPD)")
    return fig


def _k3_figure(ds):
    from matplotlib.figure import Figure

    lams = ds["k3_damping"].values
    fig = Figure(figsize=(8.0, 2.6 * len(lams) + 0.6), layout="constrained")
    axes = fig.subplots(len(lams), len(SOURCES), squeeze=False, sharex=True)
    for i, lam in enumerate(lams):
        for j, src in enumerate(SOURCES):
            ax = axes[i, j]
            for layer, shape in zip(ds["layer"].values, ds["layer_shape"].values):
                ax.plot(ds["update"].values, ds["k3_error"].sel(k3_damping=lam, source=src, layer=layer).values,
                        label=f"layer {shape}")
            ax.set_yscale("log")
            ax.set_title(f"λ = {lam:g}, h̄ {'Gaussian' if src == 'gaussian' else 'single data inputs'}", fontsize=9)
            ax.set_ylabel("‖A_LM^½ H_a A_LM^½ − I‖_F / √d" if j == 0 else "")
            ax.grid(alpha=0.3, which="both")
        axes[-1, 0].set_xlabel("Hessian-action updates")
        axes[-1, 1].set_xlabel("Hessian-action updates")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("H_a from I towards (A + √λI)⁻¹ with A fixed (curvature batch, initial θ)")
    return fig


def figures(ds) -> dict[str, Any]:
    out = {}
    if "run" in ds.dims:
        out.update({"loss-epochs": _curves(ds, "epoch"), "loss-time": _curves(ds, "time"), "grid": _grid_figure(ds),
                    "factors": _factor_figure(ds), "steps": _step_figure(ds), "damping": _damping_figure(ds)})
    if "k3_damping" in ds.dims:
        out["k3"] = _k3_figure(ds)
    return out


VARIABLES = {
    "loss": ("nats / pixel", "training loss (mean sigmoid cross-entropy over pixels) on the train_n samples after each "
                             "step"),
    "seconds": ("s", "cumulative wall-clock time of the optimizer steps (no loss evaluations, no analysis; on a shared "
                     "machine it includes other processes' load)"),
    "cpu_seconds": ("s", "cumulative CPU time of this process over the optimizer steps (torch limited to one thread)"),
    "diverged_step": ("step", "the step at which the run was stopped as diverged (−1: it was not)"),
    "loss_floor": ("nats / pixel", "infimum of the loss: mean binary entropy of the grey levels of the training set"),
    "theta": ("parameter", "flat parameters at the checkpoint (the problem's parameter order; NaN after divergence)"),
    "factor_cosine": ("1", "Frobenius cosine of the method's output factor (K-BFGS: H_g⁻¹; KFAC: EMA of MC G) with the "
                           "exact pre-activation GGN G of the curvature batch at θ"),
    "top_overlap": ("1", "squared cosine between the top eigenvectors of the method's output factor and the exact G"),
    "hg_eig_min": ("1", "smallest eigenvalue of H_g (K-BFGS runs)"),
    "hg_eig_max": ("1", "largest eigenvalue of H_g (K-BFGS runs)"),
    "exact_g_eig_max": ("1", "largest eigenvalue of the layer's exact pre-activation GGN G (curvature batch at θ)"),
    "exact_damping": ("1", "damping λ of the exact block-diagonal GGN step −(F_l + λI)⁻¹g_l"),
    "step_cosine": ("1", "cosine of the method's step for the curvature-batch gradient with the exact block-diagonal "
                         "damped GGN step −(F_l + λI)⁻¹g_l at the run's λ"),
    "gradient_cosine": ("1", "cosine of −g with the exact block-diagonal damped GGN step"),
    "dd_count": ("updates", "cumulative double-damping counters of the K-BFGS state per layer (pairs offered, Powell "
                            "and LM stages triggered, updates skipped)"),
    "k3_error": ("1", "‖A_LM^½ H_a A_LM^½ − I‖_F / √d after each Hessian-action update (H_a starts at I)"),
    "k3_error_plain": ("1", "‖H_a A_LM − I‖_F / √d after each Hessian-action update"),
    "method": ("", "training method (curvlab.optim name)"),
    "lr": ("1", "learning rate"),
    "damping": ("1", "λ of the run (K-BFGS: A + √λI and μ₂ = √λ; KFAC: √λ on each factor; 0: no damping)"),
    "run": ("", "index of the training run (method × lr × λ)"),
    "step": ("step", "optimizer step (0: initial parameters)"),
    "epoch": ("epoch", "epochs completed (step / steps per epoch)"),
    "checkpoint": ("step", "step at which the curvature analysis ran"),
    "checkpoint_epoch": ("epoch", "epoch of the checkpoint"),
    "layer": ("", "layer (module name, the partition block)"),
    "layer_shape": ("", "inputs → outputs of the layer"),
    "counter": ("", "double-damping counter"),
    "param": ("", "index into the flat parameter vector"),
    "k3_damping": ("1", "λ of the Hessian-action check (A_LM = A + √λI)"),
    "source": ("", "how h̄ varies in the Hessian-action check"),
    "update": ("updates", "Hessian-action updates done"),
}


STUDY = Study(
    name="kbfgs-autoencoder",
    description="K-BFGS / K-BFGS(L) vs KFAC, Adam, RMSprop, SGD-m on the digits ReLU autoencoder; BFGS factors vs the "
                "exact pre-activation curvature; double damping",
    paper="Goldfarb, Ren & Bahamou (2020), Practical Quasi-Newton Methods for Training Deep Neural Networks, "
          "arXiv:2006.08877",
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
