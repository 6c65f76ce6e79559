"""A tiny study for the runner's tests: each cell is a closed-form float64 computation (milliseconds).

Cell (a, b): y(x) = (a·x + b)² on ``points`` grid points of [0, 1], its mean, and three standard
normal draws (which show that a cell's seeding does not depend on where it ran). ``fail`` lists
[a, b] pairs whose cell raises. Outside the configuration (so as not to change its hash), the
environment variable ``CURVLAB_TOY_BLOCK`` = JSON ``{"dir": folder, "cell": [a, b]}`` makes that
cell write its process id to ``folder/started`` and wait for ``folder/release``: a run that a test
kills mid-way.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from curvlab import studies
from curvlab.studies import Claim, Study, grid

#: (a, b) of every run_cell call in this process
CALLS: list[tuple[int, float]] = []


def _block_if_asked(cell: dict) -> None:
    spec = os.environ.get("CURVLAB_TOY_BLOCK")
    if not spec:
        return
    spec = json.loads(spec)
    if [cell["a"], cell["b"]] != spec["cell"]:
        return
    folder = Path(spec["dir"])
    (folder / ".started").write_text(str(os.getpid()))  # the process computing the cell, written
    os.replace(folder / ".started", folder / "started")  # whole before the flag appears
    deadline = time.monotonic() + 120
    while not (folder / "release").exists():
        if time.monotonic() > deadline:
            raise TimeoutError("toy study: never released")
        time.sleep(0.01)


def run_cell(cell: dict, config: dict):
    import xarray as xr

    CALLS.append((cell["a"], cell["b"]))
    _block_if_asked(cell)
    if [cell["a"], cell["b"]] in config["fail"]:
        raise ValueError(f"toy failure at a={cell['a']}, b={cell['b']}")
    x = torch.linspace(0, 1, config["points"], dtype=torch.float64)
    y = (cell["a"] * x + cell["b"]) ** 2
    draws = torch.randn(3, dtype=torch.float64)
    return xr.Dataset({"y": (("x",), y.numpy()), "mean": ((), float(y.mean())), "draws": (("draw",), draws.numpy())},
                      coords={"x": x.numpy()})


def _mean_grows_with_a(ds) -> tuple[float, bool]:
    step = float(ds["mean"].diff("a").min())
    return step, step > 0


def _y_bounded(ds) -> tuple[float, bool]:
    top = float(ds["y"].max())
    return top, top <= 10.0


def figures(ds) -> dict:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 3), layout="constrained")
    ax = fig.subplots()
    for b in ds["b"].values:
        ax.plot(ds["a"].values, ds["mean"].sel(b=b).values, marker="o", label=f"b = {b:g}")
    ax.set_xlabel("a")
    ax.set_ylabel("mean of y")
    ax.legend()
    return {"mean": fig}


STUDY = studies.register(Study(
    name="toy",
    description="closed-form cells for the runner's tests",
    paper="none (a test fixture)",
    config={"a": [1, 2, 3], "b": [0.5, 1.5], "points": 5, "fail": []},
    quick={"a": [1, 2], "points": 3},
    cells=lambda c: grid(a=c["a"], b=c["b"]),
    run_cell=run_cell,
    claims=[Claim("T1", "the mean of y grows with a", "min over b of the step in mean(y) between consecutive a > 0",
                  _mean_grows_with_a),
            Claim("T2", "y stays at most 10", "max of y ≤ 10", _y_bounded)],
    figures=figures,
    variables={"y": ("1", "(a x + b)^2"), "mean": ("1", "mean of y over x"), "x": ("1", "grid point in [0, 1]"),
               "draws": ("1", "standard normal draws after the cell's seeding")},
), replace=True)

__all__ = ["STUDY", "CALLS", "run_cell"]
