"""One torch thread for the comparator tests.

These tests make many small LAPACK calls (eigvalsh/eigh of 20–200-dimensional blocks). With two
OpenMP threads on a machine whose two cores are busy, each such call can stall for seconds in
thread synchronisation (measured: eigvalsh of a 193×193 matrix 2.7 s with 2 threads vs 1 ms with 1);
a single thread keeps them in milliseconds whatever the load.
"""

import pytest
import torch
import xarray as xr

import curvlab as cl

#: methods of the shared report: every rung of the ladder, a Hessian, structured approximations, SGD
REPORT_METHODS = ["hessian", "ggn", "ggn-block", "ggn-diag", "ef", "kfac", "kfac-exact", "kfac-mc", "kfac-ef",
                  "ekfac", "foof", "sgd"]
REPORT_DAMPING = [1e-2, 1e-1]


@pytest.fixture(autouse=True, scope="package")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="package")
def small_prob(_one_thread) -> cl.Problem:
    return cl.problems.load("diabetes-mlp", n=32)


@pytest.fixture(scope="package")
def small_report(small_prob) -> xr.Dataset:
    """A real report on a small problem (P = 193), made once for the report, plot and CLI tests."""
    return cl.compare.report(small_prob, methods=REPORT_METHODS, damping=REPORT_DAMPING,
                             references=["ggn", "hessian"], k=5)
