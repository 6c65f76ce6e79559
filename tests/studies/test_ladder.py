"""The ladder study: its quick run, recomputation from the stored θ, the error split, verdicts from the data."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import xarray as xr

import curvlab as cl
from curvlab.studies import ladder as ld


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return cl.studies.run("ladder", quick=True, out=tmp_path_factory.mktemp("ladder"), progress=False)


def test_quick_run_has_the_documented_variables_and_dims(ds):
    cell = ("problem", "checkpoint")
    dims = {"relative_error": cell + ("reference", "method"), "block_error": cell + ("reference", "method", "block"),
            "within_block_error": cell + ("reference", "method"), "cross_block_fraction": cell + ("reference",),
            "theta": cell + ("param",), "loss": cell, "block_name": ("problem", "block")}
    for name, expected in dims.items():
        assert ds[name].dims == expected, name
    for name in ld.VARIABLES:
        assert name in ds.variables, name
        assert ds[name].attrs["units"] and ds[name].attrs["description"], name
    assert ds["method"].values.tolist() == list(ld.METHODS)
    assert ds["reference"].values.tolist() == list(ld.REFERENCES)
    assert ds["claim"].values.tolist() == ["L1", "L2", "L3", "L4"]
    for p in ds["problem"].values:  # θ padded with NaN beyond each problem's P, block names with ""
        P = int(ds["num_params"].sel(problem=p))
        theta = ds["theta"].sel(problem=p).values
        assert np.isfinite(theta[:, :P]).all() and np.isnan(theta[:, P:]).all()
        assert P == cl.problems.describe(str(p))["num_params"]
    # a matrix compared with itself has no error
    for ref in ld.REFERENCES:
        assert float(abs(ds["relative_error"].sel({"reference": ref, "method": ref})).max()) == 0.0


def _dense_relative_error(A: torch.Tensor, B: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(A - B) / torch.linalg.matrix_norm(B))


def test_three_random_cells_are_recomputed_from_the_stored_theta(ds):
    rng = random.Random(0)
    cells = [(str(p), int(c)) for p in ds["problem"].values for c in ds["checkpoint"].values]
    for problem, checkpoint in rng.sample(cells, 3):
        prob = cl.problems.load(problem, n=int(ds["n"].sel(problem=problem)), seed=int(ds.attrs["seed"]))
        P = int(ds["num_params"].sel(problem=problem))
        theta = torch.as_tensor(ds["theta"].sel(problem=problem, checkpoint=checkpoint).values[:P])
        p = prob.at(theta)
        G, H = cl.exact.ggn(p).to_dense(), cl.exact.hessian(p).to_dense()
        K, E = cl.approx.kfac(p, fisher="type2").to_dense(), cl.approx.kfac(p, fisher="empirical").to_dense()
        stored = ds["relative_error"].sel(problem=problem, checkpoint=checkpoint)
        for ref, R in (("ggn", G), ("hessian", H)):
            for method, A in (("kfac", K), ("kfac-ef", E), ("ggn", G)):
                want = float(stored.sel({"reference": ref, "method": method}))
                assert _dense_relative_error(A, R) == pytest.approx(want, rel=1e-9, abs=1e-13), (problem, ref, method)
        b = prob.partition[0].slice
        want = float(ds["block_error"].sel({"problem": problem, "checkpoint": checkpoint, "reference": "ggn",
                                            "method": "kfac-ef", "block": 0}))
        assert _dense_relative_error(E[b, b], G[b, b]) == pytest.approx(want, rel=1e-9)
        assert p.loss() == pytest.approx(float(ds["loss"].sel(problem=problem, checkpoint=checkpoint)), rel=1e-12)


def test_block_diagonal_errors_split_into_cross_block_and_within_block_parts(ds):
    """‖A − R‖² = ‖R − blockdiag R‖² + Σ_b ‖A_bb − R_bb‖² for every block-diagonal rung (Pythagoras)."""
    for ref in ld.REFERENCES:
        norm2 = ds["reference_norm"].sel(reference=ref) ** 2
        share_blocks = (ds["block_norm"].sel(reference=ref) ** 2).sum("block") / norm2
        for method in ("ggn-block", "hessian-block", "kfac", "kfac-mc", "kfac-ef"):
            whole = ds["relative_error"].sel({"reference": ref, "method": method}) ** 2
            parts = (ds["cross_block_fraction"].sel(reference=ref)
                     + ds["within_block_error"].sel({"reference": ref, "method": method}) ** 2 * share_blocks)
            np.testing.assert_allclose(whole.values, parts.values, rtol=1e-8, atol=1e-14)


def test_the_verdicts_follow_the_data(ds):
    assert ds["claim_holds"].sel(claim=["L1", "L2"]).values.all()
    changed = ds.copy(deep=True)
    changed["within_block_error"].loc[{"problem": "deep-linear", "reference": "ggn", "method": "kfac"}] = 0.1
    changed["cross_block_fraction"].loc[{"problem": "digits-mlp"}] = 0.0
    err = changed["relative_error"]
    err.loc[{"reference": "ggn", "method": "kfac-ef"}] = err.sel({"reference": "ggn", "method": "kfac-mc"}) + 10.0
    gn = {"reference": "hessian", "method": "ggn"}
    first = err.sel(gn).isel(checkpoint=0, drop=True)
    err.loc[gn] = first * xr.DataArray(np.linspace(1.0, 2.0, ds.sizes["checkpoint"]), dims="checkpoint")
    again = cl.studies.verdicts(changed)
    assert again["claim_holds"].sel(claim=["L1", "L2", "L3", "L4"]).values.tolist() == [False, False, True, False]
    assert float(again["claim_value"].sel(claim="L4")) == pytest.approx(2.0)
    assert float(again["claim_value"].sel(claim="L1")) == pytest.approx(0.1)
    assert float(again["claim_value"].sel(claim="L3")) == 1.0


def test_rung_increments_telescope_to_the_last_rung(ds):
    for ref in ld.REFERENCES:
        total = ld.rung_increments(ds, ref).sum("rung")
        last = ds["relative_error"].sel({"reference": ref, "method": ld.RUNGS[ref][-1][1]})
        first = ds["relative_error"].sel({"reference": ref, "method": ld.RUNGS[ref][0][1]})
        np.testing.assert_allclose(total.values, (last - first).values, rtol=1e-12, atol=1e-15)


def test_a_bad_configuration_is_refused():
    with pytest.raises(ValueError, match="problems"):
        ld.STUDY.resolve(problems=["no-such-problem"])
    with pytest.raises(ValueError, match="n_by_problem"):
        ld.STUDY.resolve(n_by_problem={"digits-cnn": 0})
