"""Where the cells run: in-process, a process pool, a Dask cluster, or any ``concurrent.futures`` executor.

    executor=None                 in this process, one cell after the other (the default)
    executor="processes"          a ProcessPoolExecutor with one worker per CPU ("processes:4": four)
    executor="dask"               a Dask LocalCluster on this machine ("dask:4": four worker processes)
    executor="tcp://host:8786"    an existing Dask scheduler (any address with "://")
    executor=client               a ``dask.distributed.Client`` (its ``get_executor()`` is used)
    executor=pool                 any ``concurrent.futures.Executor`` (left open: it is the caller's)

A cell runs as :func:`compute_cell` (module level, so it pickles): the cell's seeds are set, the
study's ``run_cell`` is called, and the outcome — the Dataset, or the error and its traceback — is
returned rather than raised, so that one cell's failure never stops the others. Dask is imported
only when asked for (``pip install "curvlab[studies]"``). With a cluster of several machines, the
workers need curvlab installed and the study's module importable; the runner process writes every
file, so the workers need no shared file system.
"""

from __future__ import annotations

import copy
import os
import random
import time
import traceback
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Outcome", "Pool", "compute_cell", "cell_seed", "plan_executor", "open_executor"]


@dataclass
class Outcome:
    """What one cell gave: ``status`` "done" with its Dataset, or "failed" with the error."""

    status: str
    dataset: Any = None
    error: str | None = None
    traceback: str | None = None
    seconds: float = float("nan")


def cell_seed(cell: Mapping[str, Any], key: str) -> int:
    """Return the cell's integer ``seed`` if it has one (≥ 0), else the first 8 hex digits of its key."""
    seed = cell.get("seed")
    if isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**63:
        return seed
    return int(key[:8], 16)


def compute_cell(run_cell: Callable[..., Any], cell: Mapping[str, Any], config: Mapping[str, Any],
                 seed: int) -> Outcome:
    """Return ``run_cell(cell, config)`` with torch's, NumPy's and Python's generators seeded by ``seed``.

    The generators are restored afterwards, so an in-process run leaves the caller's generators as they were.
    """
    import numpy as np
    import torch
    import xarray as xr

    t0 = time.perf_counter()
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            np.random.seed(seed % 2**32)
            random.seed(seed)
            ds = run_cell(dict(cell), copy.deepcopy(dict(config)))
        if not isinstance(ds, xr.Dataset):
            raise TypeError(f"run_cell must return an xarray.Dataset; got {type(ds).__name__}")
        return Outcome("done", dataset=ds, seconds=time.perf_counter() - t0)
    except Exception as exc:  # the cell failed: reported with its error, the other cells go on
        return Outcome("failed", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(),
                       seconds=time.perf_counter() - t0)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


def outcome_of(future: Future) -> Outcome:
    """Return a future's Outcome; an error of the executor itself (a worker killed, a pickling error) is a failure."""
    try:
        return future.result()
    except Exception as exc:
        return Outcome("failed", error=f"executor: {type(exc).__name__}: {exc}",
                       traceback="".join(traceback.format_exception(exc)))


@dataclass
class Pool:
    """An executor to submit cells to (``None``: run them in this process) and how to close it."""

    executor: Executor | None
    description: str
    close: Callable[[], None] = field(default=lambda: None)


def _limit_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _count(spec: str, prefix: str) -> int | None:
    """N from "prefix:N" (None for a bare prefix); ValueError for anything else."""
    if spec == prefix:
        return None
    text = spec[len(prefix) + 1:]
    if not spec.startswith(prefix + ":") or not text.isdigit() or int(text) < 1:
        raise ValueError(f"executor {spec!r}: use {prefix!r} or '{prefix}:N' with N ≥ 1 workers")
    return int(text)


def _processes(n: int | None) -> Pool:
    from concurrent.futures import ProcessPoolExecutor

    cpus = os.cpu_count() or 1
    n = n or cpus
    pool = ProcessPoolExecutor(max_workers=n, initializer=_limit_threads, initargs=(max(1, cpus // n),))
    return Pool(pool, f"processes ({n} workers)", lambda: pool.shutdown(wait=True, cancel_futures=True))


def _import_distributed() -> Any:
    try:
        import distributed
    except ImportError:
        raise ModuleNotFoundError("a Dask executor needs dask.distributed: pip install \"curvlab[studies]\" "
                                  "(or \"dask[distributed]\")") from None
    return distributed


def _dask_client(client: Any, description: str, close: Callable[[], None]) -> Pool:
    return Pool(client.get_executor(pure=False), description, close)


def _dask_local(n: int | None) -> Pool:
    import logging

    distributed = _import_distributed()
    # no dashboard (no port to bind); only errors logged (not the nanny's notes at shutdown)
    cluster = distributed.LocalCluster(n_workers=n, threads_per_worker=1, dashboard_address=None,
                                       silence_logs=logging.ERROR)
    client = distributed.Client(cluster)

    def close() -> None:
        client.close()
        cluster.close()

    return _dask_client(client, f"dask LocalCluster ({len(cluster.workers)} workers)", close)


def _dask_address(address: str) -> Pool:
    distributed = _import_distributed()
    try:
        client = distributed.Client(address, timeout="20s")
    except OSError as exc:
        raise ValueError(f"cannot reach the Dask scheduler at {address}: {exc}") from None
    return _dask_client(client, f"dask scheduler {address}", client.close)


def _is_dask_client(obj: Any) -> bool:
    return type(obj).__module__.startswith("distributed") and hasattr(obj, "get_executor")


def plan_executor(spec: Any) -> Callable[[], Pool]:
    """Check ``spec`` (see the module docstring; ValueError/TypeError) and return what opens its :class:`Pool`.

    Nothing is started here: a run refused for another reason starts no cluster.
    """
    if spec is None or spec == "inline":
        return lambda: Pool(None, "in-process")
    if isinstance(spec, str):
        if "://" in spec:
            return lambda: _dask_address(spec)
        if spec.startswith("processes"):
            n = _count(spec, "processes")
            return lambda: _processes(n)
        if spec.startswith("dask"):
            n = _count(spec, "dask")
            return lambda: _dask_local(n)
        raise ValueError(f"unknown executor {spec!r}; use None, 'processes', 'processes:N', 'dask', 'dask:N', "
                         "a scheduler address 'tcp://host:port', a dask Client or a concurrent.futures.Executor")
    if _is_dask_client(spec):
        address = getattr(getattr(spec, "scheduler", None), "address", "?")
        return lambda: _dask_client(spec, f"dask client of {address}", lambda: None)
    if isinstance(spec, Executor):
        return lambda: Pool(spec, type(spec).__name__)
    raise TypeError(f"executor must be None, a string, a dask Client or a concurrent.futures.Executor; "
                    f"got {type(spec).__name__}")


def open_executor(spec: Any) -> Pool:
    """Return the :class:`Pool` that ``spec`` names, started."""
    return plan_executor(spec)()
