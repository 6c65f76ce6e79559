"""The study runner: results, provenance, resume after SIGKILL, failures, changed configurations, executors.

Every check compares against the toy study's closed form, y = (a·x + b)², computed here with NumPy,
or against another run of the same configuration (an uninterrupted one, an in-process one).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

import curvlab as cl
from curvlab.studies import runner
from curvlab.studies.executors import cell_seed
from curvlab.studies.study import cell_key

ROOT = Path(__file__).resolve().parents[2]
GRID = [(a, b) for a in (1, 2, 3) for b in (0.5, 1.5)]  # the toy's default cells, in grid order


def stable(ds: xr.Dataset) -> xr.Dataset:
    """``ds`` without the attrs that legitimately differ between two runs (time, command, executor)."""
    out = ds.copy()
    out.attrs = {k: v for k, v in ds.attrs.items() if k not in cl.studies.VOLATILE_ATTRS}
    return out


def cell_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("cell-*.nc"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> xr.Dataset:
    """An uninterrupted in-process run of the toy's default configuration (volatile attrs dropped)."""
    from tests.studies import toy_study  # noqa: F401  (registers the toy)

    return stable(cl.studies.run("toy", out=tmp_path_factory.mktemp("reference"), progress=False))


def leftovers(root: Path) -> list[str]:
    """Temporary files anywhere under ``root`` (an atomic write that did not finish)."""
    return [str(p) for p in root.rglob("*") if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------------ results
def test_run_writes_the_merged_dataset_cells_figures_and_provenance(toy, tmp_path):
    ds = cl.studies.run("toy", out=tmp_path, progress=False)
    assert toy.CALLS == GRID
    assert (tmp_path / "toy.nc").is_file() and (tmp_path / "toy-mean.png").is_file()
    assert cell_files(tmp_path / "toy" / "cells") == sorted(f"cell-{cell_key({'a': a, 'b': b})}.nc" for a, b in GRID)
    assert leftovers(tmp_path) == []
    xr.testing.assert_identical(cl.studies.load(tmp_path / "toy.nc"), ds)

    # named dimensions in the grid's order, typed coordinates, the closed form
    assert ds["y"].dims == ("a", "b", "x") and ds["mean"].dims == ("a", "b")
    assert ds["a"].values.tolist() == [1, 2, 3] and ds["a"].dtype.kind == "i"
    assert ds["b"].values.tolist() == [0.5, 1.5] and ds["b"].dtype == np.float64
    x = np.linspace(0, 1, 5)
    expected = (np.array([1, 2, 3])[:, None, None] * x + np.array([0.5, 1.5])[None, :, None]) ** 2
    np.testing.assert_allclose(ds["y"].values, expected, rtol=1e-15, atol=0)
    np.testing.assert_allclose(ds["mean"].values, expected.mean(axis=2), rtol=1e-15)
    assert ds["y"].dtype == np.float64

    # each cell ran after torch.manual_seed(its seed)
    for a, b in GRID:
        torch.manual_seed(cell_seed({"a": a, "b": b}, cell_key({"a": a, "b": b})))
        np.testing.assert_array_equal(ds["draws"].sel(a=a, b=b).values, torch.randn(3, dtype=torch.float64).numpy())

    assert ds["y"].attrs == {"units": "1", "description": "(a x + b)^2"}
    assert "grid axis" in ds["a"].attrs["description"]
    attrs = ds.attrs
    assert attrs["study"] == "toy" and attrs["quick"] == 0 and attrs["paper"] == toy.STUDY.paper
    assert json.loads(attrs["config"]) == toy.STUDY.config
    assert attrs["torch_version"] == str(torch.__version__) and attrs["xarray_version"] == xr.__version__
    assert attrs["numpy_version"] == np.__version__ and attrs["curvlab_version"] == cl.__version__
    assert attrs["cpu_count"] == os.cpu_count() and attrs["platform"] and attrs["command_line"]
    assert json.loads(attrs["seeds"]) == sorted({cell_seed({"a": a, "b": b}, cell_key({"a": a, "b": b}))
                                                for a, b in GRID})
    assert attrs["failed_cells"] == "[]" and attrs["executor"] == "in-process"
    assert (attrs["cells"], attrs["cells_computed"], attrs["cells_resumed"]) == (6, 6, 0)
    assert ds["y"].encoding.get("zlib") is None  # the in-memory result; the file is compressed:
    assert cl.studies.load(tmp_path / "toy.nc")["y"].encoding["zlib"] is True


def test_quick_run_and_overrides(toy, tmp_path):
    ds = cl.studies.run("toy", quick=True, out=tmp_path, progress=False, b=2)
    assert (tmp_path / "toy-quick.nc").is_file() and (tmp_path / "toy-quick" / "cells").is_dir()
    assert toy.CALLS == [(1, 2.0), (2, 2.0)]
    assert ds.attrs["quick"] == 1 and json.loads(ds.attrs["config"]) == {"a": [1, 2], "b": [2.0], "points": 3,
                                                                          "fail": []}
    assert ds.sizes == {"a": 2, "b": 1, "x": 3, "draw": 3, "claim": 2}


def test_progress_events_and_silence(toy, tmp_path, capsys):
    events = []
    cl.studies.run("toy", out=tmp_path, progress=events.append, a=[1])
    assert [(e.cell, e.status, e.done, e.total) for e in events] == [({"a": 1, "b": 0.5}, "done", 1, 2),
                                                                     ({"a": 1, "b": 1.5}, "done", 2, 2)]
    cl.studies.run("toy", out=tmp_path / "2", progress=False, a=[1])
    assert capsys.readouterr().err == ""
    cl.studies.run("toy", out=tmp_path / "3", progress=True, a=[1])
    assert "2/2" in capsys.readouterr().err  # tqdm's bar: cells done of all


# ------------------------------------------------------------------------------------ SIGKILL and resume
def _start_blocked_run(out: Path, flags: Path, block: tuple[int, float]) -> subprocess.Popen:
    code = ("import tests.studies.toy_study, curvlab as cl\n"
            f"cl.studies.run('toy', out={str(out)!r}, progress=False)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT),
           "CURVLAB_TOY_BLOCK": json.dumps({"dir": str(flags), "cell": list(block)})}
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for(flag: Path, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not flag.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before blocking: {proc.communicate()[1].decode()}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("the run did not reach the blocking cell")
        time.sleep(0.05)


def test_a_run_killed_by_sigkill_resumes_to_the_uninterrupted_dataset(toy, tmp_path, reference):
    out, flags = tmp_path / "killed", tmp_path / "flags"
    flags.mkdir()
    proc = _start_blocked_run(out, flags, block=(2, 1.5))  # the fourth cell blocks
    _wait_for(flags / "started", proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the run's whole process group, mid-cell
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL

    cells = out / "toy" / "cells"
    done = [{"a": a, "b": b} for a, b in GRID[:3]]
    assert cell_files(cells) == sorted(f"cell-{cell_key(c)}.nc" for c in done)
    assert leftovers(out) == [] and not (out / "toy.nc").exists()
    for c in done:  # every file that exists is complete
        part = cl.studies.load(cells / f"cell-{cell_key(c)}.nc")
        np.testing.assert_allclose(part["y"].values.ravel(), (c["a"] * np.linspace(0, 1, 5) + c["b"]) ** 2,
                                   rtol=1e-15)
    manifest = json.loads((cells / "manifest.json").read_text())
    assert manifest["counts"] == {"done": 3, "failed": 0, "pending": 3}

    resumed = cl.studies.run("toy", out=out, progress=False)
    assert toy.CALLS == GRID[3:]  # the finished cells were not recomputed
    assert (resumed.attrs["cells_computed"], resumed.attrs["cells_resumed"]) == (3, 3)
    xr.testing.assert_identical(stable(resumed), reference)
    xr.testing.assert_identical(stable(cl.studies.load(out / "toy.nc")), reference)


def test_a_pool_worker_killed_by_sigkill_fails_its_cells_and_a_resume_completes_them(toy, tmp_path, reference,
                                                                                      monkeypatch):
    import threading

    flags = tmp_path / "flags"
    flags.mkdir()
    monkeypatch.setenv("CURVLAB_TOY_BLOCK", json.dumps({"dir": str(flags), "cell": [2, 1.5]}))
    killed = []

    def kill_the_worker() -> None:  # the worker computing the blocking cell, by its process id
        deadline = time.monotonic() + 180
        while not (flags / "started").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        pid = int((flags / "started").read_text())
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    killer = threading.Thread(target=kill_the_worker, daemon=True)
    killer.start()
    with pytest.warns(cl.studies.CellFailedWarning):
        broken = cl.studies.run("toy", out=tmp_path, progress=False, executor="processes:2")
    killer.join(timeout=10)
    assert killed and killed[0] != os.getpid()
    failures = cl.studies.failed_cells(broken)
    assert {"a": 2, "b": 1.5} in [f["cell"] for f in failures]
    assert all(f["error"].startswith("executor: BrokenProcessPool") for f in failures)
    cells = tmp_path / "toy" / "cells"
    assert f"cell-{cell_key({'a': 2, 'b': 1.5})}.nc" not in cell_files(cells) and leftovers(tmp_path) == []
    for name in cell_files(cells):
        cl.studies.load(cells / name)  # every file that exists is complete

    monkeypatch.delenv("CURVLAB_TOY_BLOCK")
    resumed = cl.studies.run("toy", out=tmp_path, progress=False)
    assert toy.CALLS == [c for c in GRID if {"a": c[0], "b": c[1]} in [f["cell"] for f in failures]]
    xr.testing.assert_identical(stable(resumed), reference)


def test_a_finished_run_is_merged_again_without_computing(toy, tmp_path):
    first = cl.studies.run("toy", out=tmp_path, progress=False, a=[1])
    toy.CALLS.clear()
    again = cl.studies.run("toy", out=tmp_path, progress=False, a=[1])
    assert toy.CALLS == []
    xr.testing.assert_identical(stable(first), stable(again))


# ------------------------------------------------------------------------------------ failures
def test_a_failed_cell_is_reported_and_the_others_are_kept(toy, tmp_path, reference):
    with pytest.warns(cl.studies.CellFailedWarning, match="toy failure at a=2, b=0.5"):
        ds = cl.studies.run("toy", out=tmp_path / "run", progress=False, fail=[[2, 0.5]])
    failure = {"cell": {"a": 2, "b": 0.5}, "error": "ValueError: toy failure at a=2, b=0.5"}
    assert cl.studies.failed_cells(ds) == [failure]
    assert cl.studies.failed_cells(cl.studies.load(tmp_path / "run" / "toy.nc")) == cl.studies.failed_cells(ds)
    assert ds.sizes["a"] == 3 and ds.sizes["b"] == 2  # the grid keeps its shape
    assert np.isnan(ds["y"].sel(a=2, b=0.5)).all()
    for a, b in GRID:
        if (a, b) != (2, 0.5):
            xr.testing.assert_identical(ds["y"].sel(a=a, b=b), reference["y"].sel(a=a, b=b))
    manifest = json.loads((tmp_path / "run" / "toy" / "cells" / "manifest.json").read_text())
    failed = [e for e in manifest["cells"] if e["status"] == "failed"]
    assert [e["cell"] for e in failed] == [{"a": 2, "b": 0.5}]
    assert "toy failure" in failed[0]["error"] and "Traceback" in failed[0]["traceback"]
    assert len(cell_files(tmp_path / "run" / "toy" / "cells")) == 5

    toy.CALLS.clear()  # resuming retries the failed cell only
    with pytest.warns(cl.studies.CellFailedWarning):
        cl.studies.run("toy", out=tmp_path / "run", progress=False, fail=[[2, 0.5]])
    assert toy.CALLS == [(2, 0.5)]


def test_every_cell_failing_raises_and_writes_no_result(toy, tmp_path):
    with pytest.raises(runner.StudyFailed, match="all 2 cells failed") as info:
        cl.studies.run("toy", out=tmp_path, progress=False, a=[1], fail=[[1, 0.5], [1, 1.5]])
    assert [f["cell"] for f in info.value.failures] == [{"a": 1, "b": 0.5}, {"a": 1, "b": 1.5}]
    assert not (tmp_path / "toy.nc").exists() and leftovers(tmp_path) == []


def _unstorable_cell(cell: dict, config: dict) -> xr.Dataset:
    ds = xr.Dataset({"v": ((), float(cell["k"]))})
    if cell["k"] == 1:
        ds.attrs["nested"] = {"netCDF": "cannot hold a dict"}
    return ds


UNSTORABLE = cl.studies.Study(name="toy-unstorable", description="a cell netCDF cannot hold", paper="none",
                              config={"k": [0, 1, 2]}, cells=lambda c: cl.studies.grid(k=c["k"]),
                              run_cell=_unstorable_cell)


def test_a_cell_that_cannot_be_written_fails_alone_and_leaves_no_partial_file(tmp_path):
    with pytest.warns(cl.studies.CellFailedWarning):
        ds = cl.studies.run(UNSTORABLE, out=tmp_path, progress=False)
    [failure] = cl.studies.failed_cells(ds)
    assert failure["cell"] == {"k": 1} and "cannot store the cell's Dataset" in failure["error"]
    assert ds["v"].values[[0, 2]].tolist() == [0.0, 2.0] and np.isnan(ds["v"].values[1])
    assert cell_files(tmp_path / "toy-unstorable" / "cells") == sorted(f"cell-{cell_key({'k': k})}.nc" for k in (0, 2))
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------ configuration changes
def test_a_changed_configuration_is_refused_and_restart_starts_over(toy, tmp_path, reference):
    cl.studies.run("toy", out=tmp_path, progress=False, a=[1, 2])
    toy.CALLS.clear()
    with pytest.raises(cl.studies.ConfigurationChanged, match=r"a: \[1, 2\] → \[1, 2, 3\].*restart"):
        cl.studies.run("toy", out=tmp_path, progress=False)
    assert toy.CALLS == []
    ds = cl.studies.run("toy", out=tmp_path, progress=False, restart=True)
    assert toy.CALLS == GRID  # everything again, not only the new cells
    assert len(cell_files(tmp_path / "toy" / "cells")) == 6
    xr.testing.assert_identical(stable(ds), reference)


def test_overrides_are_checked_before_anything_runs(toy, tmp_path):
    with pytest.raises(ValueError, match=r"unknown configuration key 'steps' for study 'toy'; valid: a, b, points, "):
        cl.studies.run("toy", out=tmp_path, steps=3)
    with pytest.raises(ValueError, match=r"points: expected an integer .* got 2.5"):
        cl.studies.run("toy", out=tmp_path, points=2.5)
    with pytest.raises(ValueError, match=r"b\[1\]: expected a number .* got \"x\""):
        cl.studies.run("toy", out=tmp_path, b=[1, "x"])
    with pytest.raises(ValueError, match="JSON"):
        cl.studies.run("toy", out=tmp_path, b=[float("nan")])
    with pytest.raises(ValueError, match="out must be a folder"):
        cl.studies.run("toy", out=tmp_path / "toy.nc")
    assert toy.CALLS == [] and list(tmp_path.iterdir()) == []
    assert toy.STUDY.resolve(b=1, a=2) == {"a": [2], "b": [1.0], "points": 5, "fail": []}


def test_study_definitions_are_checked():
    base = dict(description="d", paper="p", cells=lambda c: cl.studies.grid(k=c["k"]), run_cell=_unstorable_cell)
    with pytest.raises(ValueError, match="run\\(\\)'s own arguments"):
        cl.studies.Study(name="s", config={"k": [1], "quick": 1}, **base)
    with pytest.raises(ValueError, match="quick overrides unknown keys"):
        cl.studies.Study(name="s", config={"k": [1]}, quick={"j": 1}, **base)
    with pytest.raises(ValueError, match="study name"):
        cl.studies.Study(name="Bad Name", config={"k": [1]}, **base)
    with pytest.raises(ValueError, match="claim ids repeat"):
        claim = cl.studies.Claim("C1", "s", "c", lambda ds: (0.0, True))
        cl.studies.Study(name="s", config={"k": [1]}, claims=[claim, claim], **base)
    repeated = cl.studies.Study(name="s", config={"k": [1, 1]}, **base)
    with pytest.raises(ValueError, match="appears twice"):
        repeated.grid_of(repeated.config)
    nested = cl.studies.Study(name="s", config={"k": [[1]]}, **base)
    with pytest.raises(ValueError, match="is not a str, int, bool or finite float"):
        nested.grid_of(nested.config)


# ------------------------------------------------------------------------------------ executors
def test_a_process_pool_gives_the_in_process_dataset(toy, tmp_path, reference):
    pooled = cl.studies.run("toy", out=tmp_path / "pool", progress=False, executor="processes:2")
    assert pooled.attrs["executor"] == "processes (2 workers)"
    xr.testing.assert_identical(stable(pooled), reference)


def test_a_dask_local_cluster_gives_the_in_process_dataset(toy, tmp_path, reference):
    distributed = pytest.importorskip("distributed")
    inline_1 = cl.studies.run("toy", out=tmp_path / "inline-1", progress=False, a=[1])
    light = dict(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None)
    with distributed.LocalCluster(**light) as cluster, distributed.Client(cluster) as client:
        on_client = cl.studies.run("toy", out=tmp_path / "client", progress=False, executor=client)
        by_address = cl.studies.run("toy", out=tmp_path / "address", progress=False, a=[1],
                                    executor=cluster.scheduler_address)
    assert on_client.attrs["executor"].startswith("dask client")
    assert by_address.attrs["executor"] == f"dask scheduler {cluster.scheduler_address}"
    xr.testing.assert_identical(stable(on_client), reference)
    xr.testing.assert_identical(stable(by_address), stable(inline_1))


def test_bad_executors_are_refused(toy, tmp_path):
    with pytest.raises(ValueError, match="unknown executor 'threads'"):
        cl.studies.run("toy", out=tmp_path, executor="threads")
    with pytest.raises(ValueError, match="'processes:N' with N ≥ 1"):
        cl.studies.run("toy", out=tmp_path / "2", executor="processes:0")
    with pytest.raises(TypeError, match="executor must be"):
        cl.studies.run("toy", out=tmp_path / "3", executor=4)
    assert toy.CALLS == [] and list(tmp_path.iterdir()) == []  # refused before the cells folder is made
