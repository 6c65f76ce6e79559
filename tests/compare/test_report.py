"""The report Dataset: dimensions, attributes, netCDF round trip, text; the method registry."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import xarray as xr

import curvlab as cl
import curvlab.compare as cc
from curvlab.compare import methods as reg
from curvlab.linalg import CurvatureMatrix
from tests.compare.conftest import REPORT_DAMPING as DAMPING
from tests.compare.conftest import REPORT_METHODS as METHODS


@pytest.fixture()
def prob(small_prob) -> cl.Problem:
    return small_prob


@pytest.fixture()
def ds(small_report) -> xr.Dataset:
    return small_report


#: the dimensions of every report variable (the tables declare them; the catalogue holds units and descriptions)
DIMS = {
    "cosine": ("method", "reference", "block"), "relative_error": ("method", "reference", "block"),
    "trace_ratio": ("method", "reference", "block", "damping"),
    "logdet_difference": ("method", "reference", "block", "damping"), "eigenvalues": ("method", "eig"),
    "wasserstein": ("method", "reference"), "wasserstein_log": ("method", "reference", "damping"),
    "top_ratio": ("method", "reference", "top"), "subspace_overlap": ("method", "reference"),
    "fraction_below": ("method", "damping"), "factor_fraction_below": ("method", "block", "damping", "factor"),
    "negative_mass": ("method",), "min_eigenvalue": ("method",), "positive_definite": ("method", "damping"),
    "direction_cosine": ("damping", "method", "versus"), "step_norm": ("method", "damping"),
    "slope": ("method", "damping"), "energy_error": ("method", "reference", "damping"),
    "alpha": ("method", "damping"), "predicted_change": ("method", "reference", "damping"),
    "actual_change": ("method", "damping"), "reference_norm": ("reference", "block"), "build_seconds": ("method",),
    "loss": (), "gradient_norm": (),
}


def test_dimensions_coordinates_and_attributes(ds, prob):
    assert dict(ds.sizes) == {"method": len(METHODS), "reference": 2, "block": 1 + len(prob.partition),
                              "damping": 2, "eig": prob.num_params, "top": 5, "factor": 2, "versus": len(METHODS)}
    assert list(ds.method.values) == METHODS
    assert list(ds.block.values) == ["all", *prob.partition.names]
    np.testing.assert_array_equal(ds.damping.values, DAMPING)
    assert set(cc.VARIABLES) == set(DIMS) == set(ds.data_vars)
    for name, (units, desc) in cc.VARIABLES.items():
        dims = DIMS[name]
        assert ds[name].dims == dims, name
        assert ds[name].attrs == {"units": units, "description": desc}
    for key in ("problem", "model", "loss", "num_samples", "num_params", "dtype", "dataset", "seed",
                "torch_version", "xarray_version", "curvlab_version", "methods", "created"):
        assert key in ds.attrs, key
    assert ds.attrs["num_params"] == prob.num_params
    assert str(ds.rung.sel({"method": "kfac"}).values) == "kron"
    assert str(ds.mode.sel({"method": "kfac"}).values) == "own"
    assert str(ds.mode.sel({"method": "kfac-exact"}).values) == "exact"


def test_values_are_consistent_with_the_comparators(ds, prob):
    sel = lambda var, **kw: float(ds[var].sel(kw))  # noqa: E731
    assert sel("cosine", method="ggn", reference="ggn", block="all") == pytest.approx(1.0)
    assert sel("relative_error", method="ggn", reference="ggn", block="all") == 0.0
    assert sel("energy_error", method="ggn", reference="ggn", damping=0.1) == pytest.approx(0.0, abs=1e-10)
    assert sel("energy_error", method="hessian", reference="hessian", damping=0.1) == pytest.approx(0.0, abs=1e-10)
    # exact diagonal blocks agree with the reference's on each block, not on the whole matrix
    for b in prob.partition.names:
        assert sel("relative_error", method="ggn-block", reference="ggn", block=b) == pytest.approx(0.0, abs=1e-12)
    assert sel("relative_error", method="ggn-block", reference="ggn", block="all") > 0
    G, K = cl.exact.ggn(prob), cl.approx.kfac(prob)
    assert sel("cosine", method="kfac", reference="ggn", block="all") == pytest.approx(float(cc.cosine(K, G)))
    # matrix-free methods have no matrix values, but do have directions
    assert math.isnan(sel("cosine", method="sgd", reference="ggn", block="all"))
    assert np.isnan(ds["eigenvalues"].sel({"method": "sgd"}).values).all()
    assert sel("direction_cosine", method="sgd", versus="sgd", damping=0.1) == pytest.approx(1.0)
    C = ds["direction_cosine"].sel({"damping": 0.01}).values
    np.testing.assert_allclose(C, C.T, atol=1e-12)
    eig = ds["eigenvalues"].sel({"method": "ggn"}).values
    assert (np.diff(eig) <= 0).all()  # descending
    np.testing.assert_allclose(eig, torch.flip(G.eigvalsh(), (0,)).numpy(), rtol=1e-9, atol=1e-12)
    assert sel("negative_mass", method="ggn") == 0.0 and sel("negative_mass", method="hessian") > 0
    ffrac = ds["factor_fraction_below"].sel({"method": "kfac", "damping": 0.1}).values
    assert np.isfinite(ffrac[1:]).all() and np.isnan(ffrac[0]).all()  # per layer, not for 'all'
    g = prob.gradient()
    assert float(ds["gradient_norm"]) == pytest.approx(float(g.norm()))


def test_netcdf_round_trip_is_lossless_and_atomic(ds, tmp_path):
    path = cc.save(ds, tmp_path / "sub" / "report.nc")
    assert path.exists() and os.listdir(path.parent) == ["report.nc"]  # no temp file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # an ordinary file, not mkstemp's 0600
    back = cc.load(path)
    xr.testing.assert_identical(ds, back)
    cc.save(ds.isel(damping=[0]), path)  # overwrite in place
    assert cc.load(path).sizes["damping"] == 1


def test_failed_write_leaves_the_old_file(ds, tmp_path, monkeypatch):
    path = cc.save(ds, tmp_path / "r.nc")
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(xr.Dataset, "to_netcdf", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        cc.save(ds, path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["r.nc"]


def test_format_report(ds):
    text = cc.format_report(ds)
    for m in METHODS:
        assert m in text
    assert "Update directions at damping 0.1" in cc.format_report(ds, damping=0.1)
    assert "Matrix agreement with hessian" in cc.format_report(ds, reference="hessian")


def test_top_only_report_and_custom_methods(prob):
    G = cl.exact.ggn(prob)
    out = cc.report(prob, methods={"mine": 2.0 * G, "kfac": "kfac", "gd": lambda g, lam: -g}, damping=0.1,
                    references=["ggn"], k=3, full_spectrum=False, step=0.5, damping_rule="exact")
    assert "eig" not in out.dims and "eigenvalues" not in out
    assert float(out["cosine"].sel({"method": "mine", "reference": "ggn", "block": "all"})) == pytest.approx(1.0)
    assert float(out["alpha"].sel({"method": "gd", "damping": 0.1})) == 0.5
    assert str(out.mode.sel({"method": "kfac"}).values) == "exact"


def test_report_errors(prob):
    with pytest.raises(ValueError, match="unknown method 'nope'; valid names: hessian"):
        cc.report(prob, methods=["nope"])
    with pytest.raises(ValueError, match="damping"):
        cc.report(prob, methods=["ggn"], damping=[-1.0])
    with pytest.raises(ValueError, match="not a matrix method"):
        cc.report(prob, methods=["ggn"], references=["sgd"])
    with pytest.raises(ValueError, match="damping_rule"):
        cc.report(prob, methods=["ggn"], damping_rule="pi")
    # checked before anything is built: a typo must not turn into NaN columns
    with pytest.raises(ValueError, match="step must be .*got 'amijo'"):
        cc.report(prob, methods=["ggn"], step="amijo")
    with pytest.raises(ValueError, match="step must be .*got nan"):
        cc.report(prob, methods=["ggn"], step=math.nan)
    with pytest.raises(ValueError, match="k .* positive integer; got 0"):
        cc.report(prob, methods=["ggn"], k=0)
    small = cl.Dense(torch.eye(3, dtype=torch.float64))
    with pytest.raises(ValueError, match=f"'mine' is a 3×3 matrix; the problem has {prob.num_params} parameters"):
        cc.report(prob, methods={"mine": small})
    with pytest.raises(TypeError, match="'mine' must be .*got int"):
        cc.report(prob, methods={"mine": 3})


def test_every_registered_method_builds(prob):
    cache: dict = {}
    g = prob.gradient()
    for name in reg.names():
        m = reg.build(name, prob, cache)
        x = cc.direction_of(m, g, 10.0, reg.spec(name).mode)  # λ = 10: H + λI is positive definite (CG)
        assert x.shape == g.shape and torch.isfinite(x).all(), name
        if isinstance(m, CurvatureMatrix):
            assert m.size == prob.num_params
        if reg.spec(name).family == "approx":  # the report's structure coordinate is the matrix's (design.md)
            assert reg.spec(name).structure == m.structure, name
    # -block and -diag read off the full matrix give the oracle's numbers
    torch.testing.assert_close(cache["ggn-block"].to_dense(), cl.exact.ggn(prob, structure="block").to_dense())
    assert reg.canonical("Newton") == "hessian" and reg.canonical("empirical_fisher") == "ef"
    assert cache["kfac-pi"] is cache["kfac"]


def test_format_report_of_directions_only(prob):
    """A report without matrix methods (only sgd, or only callables) formats: no matrix table, no crash."""
    for methods in (["sgd"], {"gd": lambda g, lam: -g, "half": lambda g, lam: -0.5 * g}):
        out = cc.report(prob, methods=methods, damping=[0.1], k=2)
        text = cc.format_report(out)
        assert "no matrix methods in this report" in text
        assert "pairwise cosine" in text and "Step quality against ggn" in text
        for name in methods:
            assert name in text


def test_format_report_shows_every_reference(ds):
    text = cc.format_report(ds)
    for ref in ("ggn", "hessian"):
        assert text.count(f"Matrix agreement with {ref}:") == 1
        assert text.count(f"Step quality against {ref}:") == 1
    assert text.count("pairwise cosine") == 1
    only = cc.format_report(ds, reference="hessian")
    assert "Matrix agreement with hessian" in only and "Matrix agreement with ggn" not in only
    with pytest.raises(ValueError, match="reference 'ef' is not in the report; it has ggn, hessian"):
        cc.format_report(ds, reference="ef")
    with pytest.raises(ValueError, match="damping 0.5 is not in the report; it has 0.01, 0.1"):
        cc.format_report(ds, damping=0.5)
    with pytest.raises(ValueError, match="not a curvlab compare report"):
        cc.format_report(xr.Dataset({"temperature": ("time", [1.0, 2.0])}))
    with pytest.raises(TypeError, match="xarray.Dataset"):
        cc.format_report({"cosine": 1.0})


def test_arguments_are_checked_before_anything_is_built(prob, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("built something before checking the arguments")

    monkeypatch.setattr(reg, "build", boom)
    for kwargs, message in [
        ({"references": ["sgd"]}, "reference 'sgd' is not a matrix method; use one of hessian"),
        ({"references": ["ggn", "gd"]}, "reference 'gd' is not a matrix method"),
        ({"mc_samples": 0}, r"mc_samples .* positive integer; got 0"),
        ({"mc_samples": -2}, r"mc_samples .* positive integer; got -2"),
        ({"mc_samples": 1.5}, r"mc_samples .* positive integer; got 1.5"),
        ({"seed": -1}, "seed must be a non-negative integer"),
        ({"damping": [0.1, 0.1]}, "a damping is listed twice"),
        ({"damping": "abc"}, "damping must be a number or a list of numbers"),
        ({"methods": ["kfac", "kfac"]}, "listed twice"),
        ({"step": -0.1}, "finite positive learning rate; got -0.1"),
        ({"step": 0}, "finite positive learning rate; got 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            cc.report(prob, **{"methods": ["ggn", "kfac-mc"], **kwargs})
    with pytest.raises(ValueError, match="not a matrix method"):
        cc.check_arguments({"gd": lambda g, lam: -g}, references=["gd"])
    order, refs, custom, dampings = cc.check_arguments(["Newton", "kfac"], 0.1, "gn")
    assert (order, refs, custom, dampings) == (["hessian", "kfac"], ["ggn"], {}, [0.1])
