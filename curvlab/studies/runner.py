"""``curvlab.studies.run``: compute a study's cells (resumably, anywhere), merge them, decide its claims.

    ds = cl.studies.run("kfac-vs-newton", quick=True)            # data/results/kfac-vs-newton-quick.nc
    ds = cl.studies.run("kfac-vs-newton", damping=[1e-2, 1e-1])  # the grid changed from Python
    ds = cl.studies.run("kfac-vs-newton", executor="dask")       # the same cells on a Dask LocalCluster

Files (``root`` = ``out`` or ``data/results``; ``stem`` = NAME, or NAME-quick for a quick run):

    root/stem/cells/           one file per finished cell and manifest.json (curvlab.studies.store)
    root/stem.nc               the merged Dataset with its verdict table and provenance
    root/stem-FIGURE.png       the study's figures

Steps: resolve the configuration (``config`` ← ``quick`` ← overrides; unknown keys and wrong types
refused), build and check the grid, open the cells folder (an earlier run of another configuration
is refused unless ``restart=True``), load the finished cells, compute the others through the
executor — each finished cell written atomically as soon as it arrives, each failure recorded with
its error while the others go on — then merge every cell file into one Dataset, compute the verdicts
from it, and write the netCDF and the figures. Because the result is always merged from the cell
files, a run interrupted at any point (even by SIGKILL) and resumed gives the same Dataset as an
uninterrupted one. A resumed run computes the cells that are missing or failed before.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from concurrent.futures import as_completed
from pathlib import Path
from typing import TYPE_CHECKING, Any

from curvlab.studies.executors import Outcome, Pool, cell_seed, compute_cell, outcome_of, plan_executor
from curvlab.studies.progress import CellEvent, Progress
from curvlab.studies.store import CellStore
from curvlab.studies.study import Study, cell_key, config_hash

if TYPE_CHECKING:  # pragma: no cover
    import os

    import xarray as xr

__all__ = ["run", "prepare", "Run", "StudyFailed", "CellFailedWarning", "result_paths"]


class StudyFailed(RuntimeError):
    """Every cell failed: there is nothing to merge. ``failures`` lists ``{"cell", "error"}``."""

    def __init__(self, message: str, failures: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.failures = failures


class CellFailedWarning(UserWarning):
    """Some cells failed; the others are merged (see ``failed_cells(ds)`` and the manifest)."""


def result_paths(name: str, quick: bool, out: str | os.PathLike | None) -> tuple[Path, Path]:
    """Return (the merged Dataset's path, the cells folder) of a run."""
    root = Path("data") / "results" if out is None else Path(out)
    if root.suffix == ".nc" or root.is_file():
        raise ValueError(f"out must be a folder (the results go into it); got {str(root)!r}")
    stem = f"{name}-quick" if quick else name
    return root / f"{stem}.nc", root / stem / "cells"


class Run:
    """A prepared run: configuration resolved, grid checked, paths known; nothing computed yet."""

    def __init__(self, study: Study, quick: bool, out: Any, overrides: dict[str, Any]) -> None:
        self.study, self.quick = study, bool(quick)
        self.config = study.resolve(quick=quick, **overrides)
        self.cells = study.grid_of(self.config)
        self.keys = [cell_key(c) for c in self.cells]
        self.digest = config_hash(study, self.config, quick)
        self.path, self.folder = result_paths(study.name, quick, out)
        self.figure_paths: list[Path] = []  # set by execute

    def store(self) -> CellStore:
        """Return the :class:`CellStore` of the run's cells folder, with its header (study, version, quick, config)."""
        header = {"study": self.study.name, "version": self.study.version, "quick": self.quick,
                  "config": self.config}
        return CellStore(self.folder, self.digest, header)


def prepare(study: Study, quick: bool = False, out: Any = None, **overrides: Any) -> Run:
    """Check a run without computing anything (the CLI calls this before any work)."""
    return Run(study, quick, out, overrides)


def _cell_dataset(run: Run, key: str, cell: dict[str, Any], outcome: Outcome) -> xr.Dataset:
    import json

    from curvlab.studies.results import expand

    ds = expand(outcome.dataset, cell)
    ds.attrs.update(curvlab_cell=json.dumps(cell), curvlab_cell_key=key, curvlab_config_hash=run.digest,
                    curvlab_cell_seconds=float(outcome.seconds), curvlab_cell_seed=cell_seed(cell, key))
    return ds


def _record(run: Run, store: CellStore, key: str, outcome: Outcome) -> Outcome:
    """Write a done cell (a Dataset netCDF cannot hold makes the cell fail) and mark it in the manifest."""
    cell = store.entries[key]["cell"]
    if outcome.status == "done":
        try:
            store.save_cell(key, _cell_dataset(run, key, cell, outcome))
        except (ValueError, TypeError) as exc:  # OSError (disk, permissions) stops the run instead
            outcome = Outcome("failed", error=f"cannot store the cell's Dataset: {type(exc).__name__}: {exc}",
                              seconds=outcome.seconds)
    if outcome.status == "done":
        store.mark(key, "done", seconds=outcome.seconds)
    else:
        store.mark(key, "failed", error=outcome.error, traceback=outcome.traceback, seconds=outcome.seconds)
    return outcome


def _execute(run: Run, pool: Pool, todo: list[str], on_outcome: Callable[[str, Outcome], None]) -> None:
    """Run the cells ``todo`` (keys) through the pool, handing each outcome over as soon as it is there."""
    cells = dict(zip(run.keys, run.cells))
    if pool.executor is None:
        for k in todo:
            on_outcome(k, compute_cell(run.study.run_cell, cells[k], run.config, cell_seed(cells[k], k)))
        return
    futures = {pool.executor.submit(compute_cell, run.study.run_cell, cells[k], run.config, cell_seed(cells[k], k)): k
               for k in todo}
    try:
        for fut in as_completed(futures):
            on_outcome(futures[fut], outcome_of(fut))
    except BaseException:
        for fut in futures:
            fut.cancel()
        raise


def _merge(run: Run, store: CellStore, finished: dict[str, xr.Dataset], executor: str,
           counts: dict[str, Any]) -> xr.Dataset:
    from curvlab.studies import results
    from curvlab.studies.claims import verdicts

    failures = store.failures()
    if not finished:
        first = failures[0] if failures else {"cell": None, "error": "no cell finished"}
        raise StudyFailed(f"study {run.study.name}: all {len(run.cells)} cells failed; the first, "
                          f"{first['cell']}: {first['error']} (errors in {store.folder / 'manifest.json'})",
                          failures)
    ds = results.merge_cells(run.study, [finished[k] for k in run.keys if k in finished], run.cells)
    ds = results.annotate(ds, run.study, list(run.cells[0]))
    seeds = [cell_seed(c, k) for c, k in zip(run.cells, run.keys)]
    ds.attrs.update(results.provenance(run.study, run.config, run.quick, run.digest, seeds, failures,
                                       executor, counts))
    return verdicts(ds, run.study)


def _compute_missing(run: Run, store: CellStore, start_pool: Callable[[], Pool], todo: list[str],
                     progress: Any) -> str:
    """Compute the cells ``todo``, each written and marked as it arrives; returns the executor's description."""
    if not todo:
        return "none (every cell was resumed)"
    pool = start_pool()
    shown = Progress(progress, run.study.name, len(run.keys), len(run.keys) - len(todo))
    try:
        def on_outcome(key: str, outcome: Outcome) -> None:
            outcome = _record(run, store, key, outcome)
            shown.update(store.entries[key]["cell"], outcome.status, outcome.seconds, outcome.error)

        _execute(run, pool, todo, on_outcome)
    finally:
        shown.close()
        pool.close()
    return pool.description


def execute(run: Run, executor: Any = None, restart: bool = False, progress: Any = None) -> xr.Dataset:
    """Compute a prepared run's missing cells, merge, decide the claims, write the netCDF and figures."""
    from curvlab.studies import results

    t0 = time.perf_counter()
    start_pool = plan_executor(executor)
    store = run.store()
    store.open(run.cells, run.keys, restart=restart)
    try:  # the folder's lock is held until the result and its figures are written
        finished = store.load_finished()
        todo = [k for k in run.keys if k not in finished]
        description = _compute_missing(run, store, start_pool, todo, progress)
        finished.update(store.load_finished(todo))  # every cell merged as read back from its file
        counts = {"cells": len(run.keys), "computed": len(todo), "resumed": len(run.keys) - len(todo),
                  "seconds": time.perf_counter() - t0}
        ds = _merge(run, store, finished, description, counts)
        failures = results.failed_cells(ds)
        if failures:
            warnings.warn(f"{len(failures)} of {len(run.keys)} cells of {run.study.name} failed (their errors: "
                          f"failed_cells(ds), {run.folder / 'manifest.json'}); the first, {failures[0]['cell']}: "
                          f"{failures[0]['error']}", CellFailedWarning, stacklevel=4)
        for stale in run.path.parent.glob(f".{run.path.name}.*.tmp"):  # left by a run killed while saving
            stale.unlink(missing_ok=True)
        results.save(ds, run.path)
        run.figure_paths = results.save_figures(ds, run.path.with_suffix(""), study=run.study)
    finally:
        store.close()
    return ds


def run(study: Study, quick: bool = False, out: Any = None, executor: Any = None, restart: bool = False,
        progress: bool | Callable[[CellEvent], Any] | None = None, **overrides: Any) -> xr.Dataset:
    """Run ``study``; see :func:`curvlab.studies.run` (which takes the name)."""
    return execute(prepare(study, quick=quick, out=out, **overrides), executor=executor, restart=restart,
                   progress=progress)
