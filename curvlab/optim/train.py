"""A short training run in one call: ``cl.optim.train(prob, method, steps, ...)`` → ``xarray.Dataset``.

Minibatches are drawn reproducibly from the problem's data: epochs of a permutation from a
generator seeded with ``seed`` (the last, incomplete batch of an epoch is dropped, as a
``DataLoader(drop_last=True)``). The model is a copy of the problem's, started at ``prob.theta``;
the problem is never mutated. The Dataset has one row per step (0 = before the first update):

    loss         training loss on the whole problem (all of prob's samples)
    batch_loss   loss of the minibatch the step was taken on (NaN at step 0)
    step_norm    ‖θ_t − θ_{t−1}‖ (0 at step 0)
    seconds      wall-clock time since the start, excluding the full-data loss evaluations
    theta        the flat parameters at the requested ``checkpoints`` (dims checkpoint, param)

and the settings (method, every option, seed, batch size, the problem's provenance) and library
versions in its attributes. Methods with per-step diagnostics add variables (KL-clipping factor;
K-BFGS's damping counters at the end in the attributes).
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from curvlab.optim.methods import METHODS, make
from curvlab.problem import Problem

__all__ = ["train", "batches"]


def batches(num_samples: int, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """Return the sample indices of each of ``steps`` minibatches (seeded epochs of permutations)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
    batch_size = min(batch_size, num_samples)
    gen = torch.Generator().manual_seed(int(seed))
    out: list[torch.Tensor] = []
    while len(out) < steps:
        perm = torch.randperm(num_samples, generator=gen)
        for s in range(0, num_samples - batch_size + 1, batch_size):
            out.append(perm[s:s + batch_size])
            if len(out) == steps:
                break
    return out


def _check(prob: Problem, steps: int, checkpoints: Sequence[int] | None) -> list[int]:
    if not isinstance(prob, Problem):
        raise TypeError(f"expected a curvlab.Problem; got {type(prob).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer; got {steps!r}")
    cps = [0, steps] if checkpoints is None else sorted({int(c) for c in checkpoints})
    bad = [c for c in cps if not 0 <= c <= steps]
    if bad:
        raise ValueError(f"checkpoints must lie in [0, {steps}]; got {bad}")
    return cps


def _progress(total: int, desc: str, progress: bool | None):
    show = sys.stderr.isatty() if progress is None else bool(progress)
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False)


def train(prob: Problem, method: str, steps: int, batch_size: int = 64, seed: int = 0,
          checkpoints: Sequence[int] | None = None, progress: bool | None = None, **options: Any):
    """Train a copy of ``prob``'s model with ``method`` for ``steps`` minibatch steps; see the module docstring.

    ``options`` go to :func:`curvlab.optim.make` (lr, damping, momentum …). ``progress``: a progress bar
    (default: only when stderr is a terminal). Raises ``FloatingPointError`` if the loss diverges.
    """
    import xarray as xr

    cps = _check(prob, steps, checkpoints)
    model = copy.deepcopy(prob.model)
    with torch.no_grad():
        for p, t in zip((p for p in model.parameters() if p.requires_grad), prob.unflatten(prob.theta).values()):
            p.copy_(t)
    curvature = method in METHODS and METHODS[method].build is not None
    opt = make(method, model, prob.loss_fn, **({"seed": seed} if curvature and "seed" not in options else {}),
               **options)
    idx = batches(prob.num_samples, batch_size, steps, seed)
    loss = np.full(steps + 1, np.nan)
    batch_loss, step_norm, seconds, clip = (np.full(steps + 1, np.nan) for _ in range(4))
    step_norm[0], seconds[0] = 0.0, 0.0
    thetas = {}
    theta = prob.theta.detach().clone()
    loss[0] = prob.loss(theta)
    if 0 in cps:
        thetas[0] = theta.cpu().numpy()
    bar = _progress(steps, f"{prob.name}: {method}", progress)
    records: dict[int, dict[str, Any]] = {}
    recorder = getattr(getattr(opt, "preconditioner", None), "record", None)
    elapsed = 0.0
    for t, ix in enumerate(idx, start=1):
        start = time.perf_counter()
        batch_loss[t] = opt.step(prob.X[ix], prob.y[ix])
        elapsed += time.perf_counter() - start
        new = opt.theta()
        step_norm[t], seconds[t] = float((new - theta).norm()), elapsed
        clip[t] = getattr(opt, "last_clip", math.nan)
        theta = new
        if recorder is not None:
            records[t] = recorder()
        loss[t] = prob.loss(theta)
        if t in cps:
            thetas[t] = theta.cpu().numpy()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss[t]:.4g}")
    if bar is not None:
        bar.close()
    ds = _dataset(prob, method, opt, seed, batch_size, steps, cps, thetas,
                  {"loss": loss, "batch_loss": batch_loss, "step_norm": step_norm, "seconds": seconds,
                   "clip": clip}, xr)
    return _add_records(ds, records, steps)


def _add_records(ds, records: dict[int, dict[str, Any]], steps: int):
    """Per-step diagnostics of the method (e.g. GroupedNewton's per-subset learning rates) as (step, dim)."""
    names = {name for rec in records.values() for name in rec}
    for name in sorted(names):
        dim, coords = next((rec[name][0], rec[name][1]) for rec in records.values() if name in rec)
        values = np.full((steps + 1, len(coords)), np.nan)
        for t, rec in records.items():
            if name in rec:
                values[t] = rec[name][2]
        ds[name] = (("step", dim), values, {"units": "1", "description": f"{name} after the step (per {dim})"})
        ds = ds.assign_coords({dim: np.array(coords, dtype=str)})
    return ds


_UNITS = {"loss": ("loss", "training loss L(theta) on all of the problem's samples"),
          "batch_loss": ("loss", "loss of the minibatch the step was taken on (before the step)"),
          "step_norm": ("parameter", "Euclidean norm of the update theta_t - theta_{t-1}"),
          "seconds": ("s", "wall-clock time since the start (optimizer steps only)"),
          "clip": ("1", "KL-clipping factor applied to the direction (1: not clipped; NaN: no clipping rule)")}


def _dataset(prob, method, opt, seed, batch_size, steps, cps, thetas, series, xr):
    from curvlab.compare.report import _attr, _versions

    data = {k: ("step", v, {"units": u, "description": d}) for k, (u, d) in _UNITS.items() for v in [series[k]]}
    data["theta"] = (("checkpoint", "param"), np.stack([thetas[c] for c in cps]),
                     {"units": "parameter", "description": "flat parameters (the problem's parameter order)"})
    attrs = {"method": method, "batch_seed": seed, "batch_size": batch_size, "steps": steps,
             **{f"option_{k}": _attr(v) for k, v in opt.options.items() if v is not None},
             **{f"problem_{k}": _attr(v) for k, v in prob.summary().items()},
             "problem": prob.name, "n": int(prob.meta.get("n", prob.num_samples)),
             "seed": int(prob.meta.get("seed", 0)),
             **_versions()}
    state = getattr(opt, "state_summary", lambda: {})()
    for k, v in state.items():
        attrs[f"state_{k}"] = _attr(v) if isinstance(v, (int, float, str)) else str(v)
    return xr.Dataset(data, coords={"step": np.arange(steps + 1), "checkpoint": np.array(cps),
                                    "param": np.arange(prob.num_params)}, attrs=attrs)
