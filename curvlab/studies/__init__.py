"""Canned studies: grids of (problem × method × hyperparameters × seed) cells that test papers' claims.

    import curvlab as cl
    cl.studies.names()                                   # the registered studies
    ds = cl.studies.run("kfac-vs-newton", quick=True)    # -> xarray.Dataset (netCDF + PNGs under data/results/)
    ds = cl.studies.run("kfac-vs-newton", damping=[1e-2], executor="dask")   # grid changed, on Dask
    print(cl.studies.format_verdicts(ds))                # each claim: measured value, holds or not

A study is a :class:`Study` (configuration, cells, a function per cell, claims, figures; see
:mod:`curvlab.studies.study`). The canned ones live one per module in this package, each module
defining ``STUDY = Study(...)``; they are found on first use of :func:`names` or :func:`get`
(modules should import heavy libraries inside their functions: listing the studies imports every
module). :func:`register` adds one from anywhere. The runner is :mod:`curvlab.studies.runner`.
"""

from __future__ import annotations

import importlib
import pkgutil
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from curvlab.studies.study import Cell, Claim, Study, grid

if TYPE_CHECKING:  # pragma: no cover
    import os

    import xarray as xr

    from curvlab.studies.progress import CellEvent

__all__ = ["Study", "Claim", "Cell", "grid", "names", "get", "register", "run", "script", "prepare", "verdicts",
           "format_verdicts", "failed_cells", "figures", "save_figures", "load", "result_paths",
           "ConfigurationChanged", "StudyFailed", "CellFailedWarning", "VOLATILE_ATTRS"]

#: modules of this package that are the runner, not studies
_INFRASTRUCTURE = frozenset({"study", "runner", "store", "executors", "results", "claims", "progress", "checks"})
_REGISTRY: dict[str, Study] = {}
_discovered = False


def register(study: Study, replace: bool = False) -> Study:
    """Add ``study`` to the registry (ValueError if another study has its name, unless ``replace``)."""
    if not isinstance(study, Study):
        raise TypeError(f"expected a curvlab.studies.Study; got {type(study).__name__}")
    old = _REGISTRY.get(study.name)
    if old is not None and old is not study and not replace:
        raise ValueError(f"a study named {study.name!r} is already registered (pass replace=True)")
    _REGISTRY[study.name] = study
    return study


def _discover() -> None:
    """Import every study module of this package once and register its ``STUDY``."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name in _INFRASTRUCTURE:
            continue
        try:
            module = importlib.import_module(f"{__name__}.{info.name}")
        except Exception as exc:  # one broken study must not hide the others
            warnings.warn(f"curvlab.studies: cannot import the study module {info.name}: {type(exc).__name__}: "
                          f"{exc}", stacklevel=3)
            continue
        study = getattr(module, "STUDY", None)
        if isinstance(study, Study):
            register(study, replace=True)


def names() -> list[str]:
    """Return the registered studies' names, sorted."""
    _discover()
    return sorted(_REGISTRY)


def get(name: str) -> Study:
    """Return the study called ``name`` (ValueError naming the valid ones otherwise)."""
    if isinstance(name, Study):
        return name
    _discover()
    if name not in _REGISTRY:
        valid = ", ".join(sorted(_REGISTRY)) or "none registered"
        raise ValueError(f"unknown study {name!r}; valid: {valid} (see `curvlab studies`)")
    return _REGISTRY[name]


def run(name: str | Study, quick: bool = False, out: str | os.PathLike | None = None, executor: Any = None,
        restart: bool = False, progress: bool | Callable[[CellEvent], Any] | None = None,
        **overrides: Any) -> xr.Dataset:
    """Run a study; return its merged Dataset (also written as netCDF, with PNG figures beside it).

    Parameters
    ----------
    name : str or Study
        A registered study (:func:`names`).
    quick : bool
        Apply the study's ``quick`` overrides (a smaller grid); results go to ``NAME-quick.*``.
    out : path, optional
        The results folder (default ``data/results``): ``out/NAME.nc``, ``out/NAME-FIGURE.png`` and the
        finished cells in ``out/NAME/cells/``.
    executor : optional
        Where the cells run: ``None`` (this process), ``"processes"`` / ``"processes:N"``, ``"dask"`` /
        ``"dask:N"`` (a LocalCluster), ``"tcp://host:port"`` (a Dask scheduler), a
        ``dask.distributed.Client`` or any ``concurrent.futures.Executor``.
    restart : bool
        Discard the cells of an earlier run in the same folder and start over (an earlier run of
        another configuration is refused otherwise; one of the same configuration is resumed).
    progress : bool or callable, optional
        ``None``: a progress bar when stderr is a terminal; ``True``/``False``: always/never; a callable
        gets a ``CellEvent`` after each cell.
    **overrides
        Configuration values replacing the study's (``damping=[1e-2, 1e-1]``); unknown keys and values
        of the wrong type raise ``ValueError`` before anything runs.

    Returns
    -------
    xarray.Dataset
        The cells merged (cell coordinates as dimensions), the verdict table (``claim``,
        ``claim_value``, ``claim_holds``) and the provenance in ``attrs`` (``failed_cells`` lists the
        cells that failed; a :class:`CellFailedWarning` says so). Raises :class:`StudyFailed` when
        every cell failed.
    """
    from curvlab.studies import runner

    return runner.run(get(name), quick=quick, out=out, executor=executor, restart=restart, progress=progress,
                      **overrides)


def script(name: str, overrides: dict[str, Any] | None = None, argv: list[str] | None = None) -> xr.Dataset:
    """Run study ``name`` as a script: the entry point of the thin scripts in the repository's ``studies/``.

    Parses ``--quick``, ``--out FOLDER``, ``--processes N`` and ``--restart`` from ``argv`` (default
    ``sys.argv[1:]``), runs the study with ``overrides`` (the script's ``OVERRIDES``), prints the
    verdict table and returns the merged Dataset. The same as ``curvlab run NAME`` with ``--set``.
    """
    import argparse

    from curvlab.studies.claims import format_verdicts

    study = get(name)
    parser = argparse.ArgumentParser(prog=f"studies/{name.replace('-', '_')}.py",
                                     description=f"{study.name}: {study.description}")
    parser.add_argument("--quick", action="store_true", help="the small configuration (minutes)")
    parser.add_argument("--out", default=None, help="results folder (default data/results)")
    parser.add_argument("--processes", type=int, default=None, help="run the cells in N worker processes")
    parser.add_argument("--restart", action="store_true", help="discard the cells of an earlier run")
    args = parser.parse_args(argv)
    if args.processes is not None and args.processes < 1:
        parser.error(f"--processes must be ≥ 1; got {args.processes}")
    executor = None if args.processes is None else f"processes:{args.processes}"
    ds = run(study, quick=args.quick, out=args.out, executor=executor, restart=args.restart,
             **(overrides or {}))
    print(format_verdicts(ds))
    return ds


def prepare(name: str | Study, quick: bool = False, out: Any = None, **overrides: Any) -> Any:
    """Check a run (configuration, grid, paths) without computing anything; returns a ``runner.Run``."""
    from curvlab.studies import runner

    return runner.prepare(get(name), quick=quick, out=out, **overrides)


# names of the runner's modules (xarray) bound on first use, so that listing the studies stays light
_LAZY = {"verdicts": "claims", "format_verdicts": "claims", "failed_cells": "results", "figures": "results",
         "save_figures": "results", "load": "results", "VOLATILE_ATTRS": "results", "result_paths": "runner",
         "StudyFailed": "runner", "CellFailedWarning": "runner", "ConfigurationChanged": "store"}


def __getattr__(attr: str) -> Any:
    if attr in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[attr]}"), attr)
    raise AttributeError(f"module 'curvlab.studies' has no attribute {attr!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
