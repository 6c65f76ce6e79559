"""A study's result: the cells merged into one Dataset, its provenance, netCDF files and PNG figures.

    ds = curvlab.studies.load("data/results/kfac-vs-newton.nc")
    curvlab.studies.failed_cells(ds)                 # [{"cell": {...}, "error": "ValueError: ..."}]
    curvlab.studies.figures(ds)                      # {"cosines": Figure, ...}, redrawn from the file
    curvlab.studies.save_figures(ds, "out/kfac-vs-newton")   # out/kfac-vs-newton-cosines.png, ...

netCDF is written by ``curvlab.compare.save`` (h5netcdf, atomic), with every numeric array
gzip-compressed. Provenance attrs: the study (name, version, paper), ``quick``, the resolved
configuration (``config``, JSON) and its hash, the cell seeds, the library versions, the machine
that ran the runner (platform, CPU count), the command line and the executor, the failed cells.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import xarray as xr

    from curvlab.studies.study import Study

__all__ = ["save", "load", "expand", "merge_cells", "provenance", "failed_cells", "figures", "save_figures",
           "VOLATILE_ATTRS", "FIGURE_DPI"]

#: provenance attrs that differ between two runs of the same configuration (time, command, executor …)
VOLATILE_ATTRS = ("created", "command_line", "executor", "run_seconds", "cells_computed", "cells_resumed")
#: resolution of the PNG figures: screen resolution, small files
FIGURE_DPI = 100

_COMPRESSION = {"compression": "gzip", "compression_opts": 4, "shuffle": True}


# ------------------------------------------------------------------------------------------ files
def save(ds: xr.Dataset, path: str | os.PathLike) -> Path:
    """Write ``ds`` as compressed netCDF (h5netcdf) atomically; returns the path."""
    from curvlab.compare.report import save as save_netcdf

    out = ds.copy(deep=False)
    for var in out.variables.values():
        var.encoding = dict(_COMPRESSION) if var.ndim and var.dtype.kind in "biuf" else {}
    return save_netcdf(out, path)


def load(path: str | os.PathLike) -> xr.Dataset:
    """Read a study's Dataset (or a cell file) fully into memory."""
    from curvlab.compare.report import load as load_netcdf

    return load_netcdf(path)


# ------------------------------------------------------------------------------------------ cells
def expand(ds: xr.Dataset, cell: Mapping[str, Any]) -> xr.Dataset:
    """``ds`` with each of the cell's coordinates as a length-1 dimension (first, in the cell's order).

    A dimension or scalar coordinate ``ds`` already has must hold the cell's value (else ValueError).
    """
    missing = {}
    for k, v in cell.items():
        if k in ds.dims or k in ds.coords:
            have = ds[k].values.reshape(-1).tolist()
            if have != [v]:
                raise ValueError(f"run_cell returned {k}={have} for the cell {dict(cell)}")
            if k in ds.dims:
                continue
            ds = ds.drop_vars(k)
        missing[k] = [v]
    return ds.expand_dims(missing) if missing else ds


def _default_merge(datasets: list[xr.Dataset]) -> xr.Dataset:
    """``combine_by_coords`` (a full grid keeps every dtype); ``merge`` with NaN holes otherwise."""
    import xarray as xr

    options = dict(compat="no_conflicts", join="outer", combine_attrs="drop_conflicts")
    try:
        return xr.combine_by_coords(datasets, data_vars="all", coords="different", **options)
    except ValueError:
        return xr.merge(datasets, **options)


def merge_cells(study: Study, datasets: list[xr.Dataset], cells: Sequence[Mapping[str, Any]]) -> xr.Dataset:
    """Return the finished cells' Datasets merged (the study's ``merge`` or the default).

    Each cell dimension is in the order of first appearance in ``cells`` over the whole grid (failed cells:
    NaN).
    """
    from curvlab.studies.store import CELL_ATTRS

    datasets = [d.copy(deep=False) for d in datasets]
    for d in datasets:
        d.attrs = {k: v for k, v in d.attrs.items() if k not in CELL_ATTRS}
    try:
        ds = (study.merge or _default_merge)(datasets)
    except ValueError as exc:
        raise ValueError(f"study {study.name}: cannot merge the cells ({exc}); give the study a merge "
                         "function") from None
    order = {k: list(dict.fromkeys(c[k] for c in cells)) for k in (cells[0] if cells else {})}
    ds = ds.reindex({k: v for k, v in order.items() if k in ds.dims})
    for var in ds.variables.values():
        var.encoding = {}  # the cell files' chunking and compression describe the cells, not the merge
    return ds


def annotate(ds: xr.Dataset, study: Study, cell_dims: Sequence[str]) -> xr.Dataset:
    """Units and descriptions from ``study.variables``; the cell dimensions described as grid axes."""
    for k in cell_dims:
        if k in ds.coords:
            ds[k].attrs.setdefault("description", f"grid axis of the study ({k} of each cell)")
    for name, (units, description) in study.variables.items():
        if name in ds.variables:
            ds[name].attrs.update(units=units, description=description)
    return ds


# ------------------------------------------------------------------------------------------ provenance
def _versions() -> dict[str, str]:
    import h5netcdf
    import numpy as np
    import torch
    import xarray as xr

    import curvlab

    return {"curvlab_version": str(curvlab.__version__), "torch_version": str(torch.__version__),
            "numpy_version": str(np.__version__), "xarray_version": str(xr.__version__),
            "h5netcdf_version": str(h5netcdf.__version__), "python_version": platform.python_version()}


def provenance(study: Study, config: Mapping[str, Any], quick: bool, digest: str, seeds: Sequence[int],
               failures: list[dict[str, Any]], executor: str, counts: Mapping[str, Any]) -> dict[str, Any]:
    """Return the Dataset attrs saying what was run, how, where and with what (netCDF-safe values)."""
    import shlex

    return {
        "study": study.name, "study_version": study.version, "description": study.description,
        "paper": study.paper, "quick": int(bool(quick)), "config": json.dumps(dict(config), sort_keys=True),
        "config_hash": digest, "cells": int(counts["cells"]), "seeds": json.dumps(sorted(set(seeds))),
        "cell_seeding": "torch.manual_seed(seed), numpy.random.seed(seed % 2**32), random.seed(seed) before "
                        "each cell; seed = the cell's integer 'seed', else from the SHA-256 of the cell",
        "failed_cells": json.dumps(failures), **_versions(),
        "platform": platform.platform(), "machine": platform.machine(), "cpu_count": os.cpu_count() or 0,
        "command_line": shlex.join(sys.argv), "executor": executor,
        "cells_computed": int(counts["computed"]), "cells_resumed": int(counts["resumed"]),
        "run_seconds": float(counts["seconds"]),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def failed_cells(ds: xr.Dataset) -> list[dict[str, Any]]:
    """Return the cells that failed in the run that wrote ``ds``: ``[{"cell": {...}, "error": "..."}]``."""
    return json.loads(ds.attrs.get("failed_cells", "[]"))


# ------------------------------------------------------------------------------------------ figures
def _study_of(ds: xr.Dataset) -> Study:
    from curvlab import studies

    name = ds.attrs.get("study")
    if not isinstance(name, str):
        raise ValueError("not a study's Dataset (it has no attribute 'study'); run one with curvlab.studies.run")
    return studies.get(name)


def figures(ds: xr.Dataset, study: Study | None = None) -> dict[str, Any]:
    """Return the study's figures drawn from ``ds`` (its study found from ``ds.attrs["study"]``)."""
    study = _study_of(ds) if study is None else study
    return {} if study.figures is None else dict(study.figures(ds))


def save_figures(ds: xr.Dataset, stem: str | os.PathLike, dpi: int = FIGURE_DPI,
                 study: Study | None = None) -> list[Path]:
    """Write each figure as ``{stem}-{name}.png`` (atomically); returns the paths written.

    A figure function that raises is reported as a warning (the Dataset is already saved).
    """
    stem = Path(stem)
    try:
        drawn = figures(ds, study)
    except Exception as exc:  # a figure bug must not lose the run: it is reported, the data is kept
        warnings.warn(f"the figures of {ds.attrs.get('study')} failed: {type(exc).__name__}: {exc}", stacklevel=2)
        return []
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in drawn.items():
        path = stem.parent / f"{stem.name}-{name}.png"
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a run killed while drawing
            stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            fig.savefig(tmp, dpi=dpi, format="png")
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        written.append(path)
    return written
