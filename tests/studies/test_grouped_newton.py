"""The grouped-newton study: its quick run, recomputation from the stored θ, verdicts from the data."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import curvlab as cl
from curvlab.studies import grouped_newton as gn


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return cl.studies.run("grouped-newton", quick=True, out=tmp_path_factory.mktemp("gn"), progress=False)


def test_quick_run_has_the_documented_variables_and_dims(ds):
    dims = {"theta": ("checkpoint", "param"), "hbar": ("checkpoint", "subset", "subset_j"),
            "hbar_error": ("checkpoint",), "newton_error": ("newton_iterate",),
            "deviation": ("invariance_method", "invariance_step"), "loss": ("run", "seed", "step"),
            "subset_lr": ("run", "seed", "step", "subset"), "final_theta": ("run", "seed", "param"),
            "final_loss": ("run", "seed"), "fallbacks": ("run", "seed")}
    for name, expected in dims.items():
        assert ds[name].dims == expected, name
    for name in gn.VARIABLES:
        assert name in ds.variables, name
        assert ds[name].attrs["units"] and ds[name].attrs["description"], name
    assert set(ds["run_method"].values) == set(gn.RUN_METHODS)
    assert ds["claim"].values.tolist() == ["W1", "W2", "W3", "W4", "W5"]
    assert ds.attrs["problem"] == "digits-mlp" and ds.attrs["seed"] == 0
    gn_runs = ds["run_method"] == "grouped-newton"
    assert bool(np.isfinite(ds["subset_lr"].where(gn_runs, drop=True).isel(step=slice(1, None))).all())
    assert bool(np.isnan(ds["subset_lr"].sel(run=ds["run"][ds["run_method"] == "adam"]).values).all())


def test_three_random_cells_are_recomputed_from_the_stored_theta(ds):
    rng = random.Random(0)
    # an exactness checkpoint: H̄ and the loss at the stored θ, u = −∇L on the curvature batch
    cp = rng.choice(ds["checkpoint"].values.tolist())
    prob = cl.problems.load(ds.attrs["problem"], n=int(ds.attrs["n"]), seed=int(ds.attrs["seed"]))
    theta = torch.as_tensor(ds["theta"].sel(checkpoint=cp).values)
    S = cl.approx.grouped_newton(prob.at(theta), -prob.at(theta).gradient(), partition="canonical", order=3)
    np.testing.assert_allclose(S.hessian.numpy(), ds["hbar"].sel(checkpoint=cp).values, rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(S.third.numpy(), ds["third"].sel(checkpoint=cp).values, rtol=1e-12)
    assert prob.loss(theta) == pytest.approx(float(ds["checkpoint_loss"].sel(checkpoint=cp)), rel=1e-13)
    # a training run: its final loss from its final θ, its start from the problem of its seed
    run, seed = rng.choice(ds["run"].values.tolist()), rng.choice(ds["seed"].values.tolist())
    start = cl.problems.load(ds.attrs["problem"], n=int(ds.attrs["n"]), seed=int(seed))
    final = torch.as_tensor(ds["final_theta"].sel(run=run, seed=seed).values)
    assert start.loss(final) == pytest.approx(float(ds["final_loss"].sel(run=run, seed=seed)), rel=1e-12)
    assert start.loss() == pytest.approx(float(ds["loss"].sel(run=run, seed=seed, step=0)), rel=1e-13)
    # an invariance cell: the deviation of the two parametrisations' trajectories, rerun
    method = rng.choice(ds["invariance_method"].values.tolist())
    config = gn.STUDY.resolve(quick=True)
    name, options = gn._method_options(method, float(ds["invariance_lr"].sel(invariance_method=method)), config)
    dev = gn.invariance_deviation(config["problem"], config["invariance_n"], name, config["invariance_steps"],
                                  config["invariance_alpha"], config["batch_size"], **options)
    np.testing.assert_allclose(dev, ds["deviation"].sel(invariance_method=method).values, rtol=1e-9, atol=1e-15)


def test_the_verdicts_follow_the_data(ds):
    assert ds["claim_holds"].sel(claim=["W1", "W2", "W3"]).values.all()
    changed = ds.copy(deep=True)
    changed["hbar_error"][0] = 1e-3
    changed["newton_error"][-1] = 1e-6
    changed["deviation"].loc[{"invariance_method": "sgd"}] = 0.0
    again = cl.studies.verdicts(changed)
    assert not again["claim_holds"].sel(claim=["W1", "W2", "W3"]).values.any()
    assert float(again["claim_value"].sel(claim="W1")) == 1e-3
    # W4/W5: scale GroupedNewton's final losses far down, then far up
    full = changed["run_method"] == "grouped-newton"
    for factor, w4, w5 in ((1e-6, True, True), (1e6, False, False)):
        scaled = changed.copy(deep=True)
        scaled["final_loss"] = changed["final_loss"].where(~full, changed["final_loss"] * factor)
        out = cl.studies.verdicts(scaled)
        assert bool(out["claim_holds"].sel(claim="W4")) is w4
        assert bool(out["claim_holds"].sel(claim="W5")) is w5


def test_tuned_takes_the_smallest_geometric_mean_and_a_diverged_seed_loses():
    import xarray as xr

    final = np.array([[1.0, 1.0], [0.1, np.nan], [0.5, 0.5]])
    ds = xr.Dataset({"final_loss": (("run", "seed"), final)},
                    coords={"run": ["a lr=1", "a lr=2", "a lr=3"], "run_method": ("run", ["a", "a", "a"])})
    assert gn.tuned(ds, "a") == ("a lr=3", pytest.approx(0.5))
    with pytest.raises(ValueError, match="no training run"):
        gn.tuned(ds, "b")


def test_rescaled_layer_computes_the_same_function():
    lin = torch.nn.Linear(4, 3).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    other = gn.Rescaled(lin, 10.0)
    torch.testing.assert_close(other(x), lin(x), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(other.weight * 10.0, lin.weight, rtol=1e-15, atol=0.0)


def test_newton_extreme_on_the_convex_problem_is_newton():
    prob = gn.convex_problem()
    assert prob.num_params == 11
    assert bool((torch.linalg.eigvalsh(cl.exact.hessian(prob).to_dense()) > 0).all())  # strictly convex here
    assert max(gn.newton_extreme(2)) < 1e-10


def test_a_bad_configuration_is_refused():
    with pytest.raises(ValueError, match="gn_lr"):
        gn.STUDY.resolve(gn_lr=[])
    with pytest.raises(ValueError, match="exact_steps"):
        gn.STUDY.resolve(quick=True, exact_steps=[10_000])
    with pytest.raises(ValueError, match="invariance_lr"):
        gn.STUDY.resolve(invariance_lr={"sgd": 0.1})
