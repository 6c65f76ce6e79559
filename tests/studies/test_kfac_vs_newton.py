"""The kfac-vs-newton study: its quick run, its documented variables, numbers recomputed from the stored θ
by an independent (dense, explicit-factor) route, and verdicts that follow the data."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

import curvlab as cl
from curvlab.studies import kfac_vs_newton as kvn

#: the quick run, smaller still (seconds): n = 128 keeps the exact GGN in its low-rank (Woodbury) form
OVERRIDES = {"n": 128, "checkpoints": [0, 20], "damping": [1e-3, 1.0], "train_steps": 8}


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    out = tmp_path_factory.mktemp("kfac-vs-newton")
    return cl.studies.run("kfac-vs-newton", quick=True, out=out, progress=False, **OVERRIDES)


# ---------------------------------------------------------------------------------------------- the Dataset
def test_quick_run_has_the_documented_variables(ds):
    assert ds["cosine"].dims == ("checkpoint", "damping", "method", "versus")
    assert list(ds["method"].values) == list(kvn.DIRECTION_METHODS) == list(ds["versus"].values)
    assert ds["theta"].dims == ("checkpoint", "param")
    assert ds["block_cosine"].dims == ("checkpoint", "damping", "block", "method", "versus")
    for name in ("A_below", "G_below", "damping_ratio_A", "damping_ratio_G"):
        assert ds[name].dims == ("checkpoint", "damping", "block")
    assert ds["train_loss"].dims == ("run", "step")
    assert sorted(set(ds["train_method"].values)) == sorted(kvn.TRAIN_METHODS)
    assert list(ds["checkpoint"].values) == OVERRIDES["checkpoints"]
    assert ds.attrs["problem"] == "digits-mlp" and ds.attrs["n"] == 128 and ds.attrs["seed"] == 0
    for name in kvn.STUDY.variables:
        assert ds[name].attrs["units"] and ds[name].attrs["description"], name
    assert list(ds["claim"].values) == [c.id for c in kvn.CLAIMS]
    assert not cl.studies.failed_cells(ds)
    # a cosine matrix: symmetric with a unit diagonal
    C = ds["cosine"].values
    np.testing.assert_allclose(C, np.swapaxes(C, -1, -2), atol=1e-12)
    np.testing.assert_allclose(np.diagonal(C, axis1=-2, axis2=-1), 1.0, atol=1e-12)


def test_theta_is_the_sgd_trajectory(ds):
    prob = cl.problems.load(ds.attrs["problem"], n=int(ds.attrs["n"]), seed=int(ds.attrs["seed"]))
    np.testing.assert_array_equal(ds["theta"].sel(checkpoint=0).values, prob.theta.numpy())
    losses = [prob.loss(torch.as_tensor(ds["theta"].sel(checkpoint=c).values)) for c in ds["checkpoint"].values]
    np.testing.assert_allclose(losses, ds["loss"].values, rtol=1e-12)
    assert losses[-1] < losses[0]


# ---------------------------------------------------------------------------------------------- recomputation
def _folded(g: torch.Tensor, p: int, q: int) -> torch.Tensor:
    """A layer's flat gradient (W row-major, then b) as the p × (q+1) matrix [∇W ∇b]."""
    return torch.cat([g[: p * q].reshape(p, q), g[p * q:].reshape(p, 1)], dim=1)


def _flat(X: torch.Tensor) -> torch.Tensor:
    return torch.cat([X[:, :-1].reshape(-1), X[:, -1]])


def _reference_directions(batch, lam: float) -> dict[str, torch.Tensor]:
    """Every direction by an independent route: dense GGN solves, explicit factor solves, NumPy eigenvalues."""
    g = batch.gradient()
    F = cl.exact.ggn(batch, structure="full").to_dense()
    eye = torch.eye(F.shape[0], dtype=F.dtype)
    out = {"ng": -torch.linalg.solve(F + lam * eye, g), "sgd": -g}
    K = cl.approx.kfac(batch)
    parts = {m: [] for m in ("ng-block", "kfac", "kfac-exact", "foof", "foof-matched", "foof-layerwise")}
    for s, block in zip(batch.partition.slices, K.blocks):
        Fb, gb = F[s, s], g[s]
        A, G = block.A, block.G
        p, q1 = G.shape[0], A.shape[0]
        I_A, I_G = torch.eye(q1, dtype=A.dtype), torch.eye(p, dtype=A.dtype)
        pi = math.sqrt((float(torch.trace(A)) / q1) / (float(torch.trace(G)) / p))
        lam_A, lam_G = pi * math.sqrt(lam), math.sqrt(lam) / pi
        X = _folded(gb, p, q1 - 1)
        Kb = block.to_dense()
        parts["ng-block"].append(-torch.linalg.solve(Fb + lam * torch.eye(len(gb), dtype=F.dtype), gb))
        parts["kfac"].append(-_flat(torch.linalg.solve(G + lam_G * I_G, X) @ torch.linalg.inv(A + lam_A * I_A)))
        parts["kfac-exact"].append(-torch.linalg.solve(Kb + lam * torch.eye(len(gb), dtype=F.dtype), gb))
        parts["foof"].append(-_flat(X @ torch.linalg.inv(A + lam * I_A)))
        parts["foof-matched"].append(-_flat(X @ torch.linalg.inv(A + lam_A * I_A)))
        parts["foof-layerwise"].append(parts["foof-matched"][-1] / lam_G)
    out.update({m: torch.cat(v) for m, v in parts.items()})
    return out


def _cos(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(x @ y / (x.norm() * y.norm()))


def test_three_random_cells_recomputed_from_theta(ds):
    rng = random.Random(12)
    prob = cl.problems.load(ds.attrs["problem"], n=int(ds.attrs["n"]), seed=int(ds.attrs["seed"]))
    for _ in range(3):
        c, lam = rng.choice(list(ds["checkpoint"].values)), rng.choice(list(ds["damping"].values))
        a, b = rng.sample(kvn.DIRECTION_METHODS, 2)
        batch = prob.at(torch.as_tensor(ds["theta"].sel(checkpoint=c).values))
        ref = _reference_directions(batch, float(lam))
        stored = ds["cosine"].sel({"checkpoint": c, "damping": lam, "method": a, "versus": b})
        assert float(stored) == pytest.approx(_cos(ref[a], ref[b]), rel=1e-8, abs=1e-10), (c, lam, a, b)
        block, s = rng.choice(list(zip(batch.partition.names, batch.partition.slices)))
        stored = ds["block_cosine"].sel({"checkpoint": c, "damping": lam, "block": block, "method": a, "versus": b})
        assert float(stored) == pytest.approx(_cos(ref[a][s], ref[b][s]), rel=1e-8, abs=1e-10)


def test_damping_diagnostics_recomputed_from_theta(ds):
    prob = cl.problems.load(ds.attrs["problem"], n=int(ds.attrs["n"]), seed=int(ds.attrs["seed"]))
    c, lam = int(ds["checkpoint"].values[-1]), float(ds["damping"].values[0])
    K = cl.approx.kfac(prob.at(torch.as_tensor(ds["theta"].sel(checkpoint=c).values)))
    for name, block in zip(K.block_names, K.blocks):
        eA, eG = np.linalg.eigvalsh(block.A.numpy()), np.linalg.eigvalsh(block.G.numpy())
        pi = math.sqrt(eA.mean() / eG.mean())
        lam_A, lam_G = pi * math.sqrt(lam), math.sqrt(lam) / pi
        cell = {"checkpoint": c, "damping": lam, "block": name}
        assert float(ds["G_below"].sel(cell)) == pytest.approx(np.mean(eG < lam_G), abs=1e-12)
        assert float(ds["A_below"].sel(cell)) == pytest.approx(np.mean(eA < lam_A), abs=1e-12)
        assert float(ds["damping_ratio_G"].sel(cell)) == pytest.approx(lam_G / eG.max(), rel=1e-9)
        assert float(ds["damping_ratio_A"].sel(cell)) == pytest.approx(lam_A / eA.max(), rel=1e-9)
        assert float(ds["pi"].sel({"checkpoint": c, "block": name})) == pytest.approx(pi, rel=1e-9)


def test_training_run_recomputed(ds):
    run = str(ds["run"].values[1])
    r = ds.sel(run=run)
    method, lr, lam = str(r["train_method"].values), float(r["train_lr"]), float(r["train_damping"])
    config = cl.studies.get("kfac-vs-newton").resolve(quick=True, **OVERRIDES)
    name, options = kvn.train_options(method, lr, lam, config)
    prob = cl.problems.load(ds.attrs["problem"], n=int(ds.attrs["n"]), seed=int(ds.attrs["seed"]))
    again = cl.optim.train(prob, name, steps=config["train_steps"], batch_size=config["batch_size"],
                           seed=config["seed"], progress=False, **options)
    np.testing.assert_allclose(again["loss"].values, r["train_loss"].values, rtol=1e-9)


def test_train_options_name_each_method():
    config = kvn.STUDY.config
    assert kvn.train_options("kfac-exact", 0.1, 0.3, config) == (
        "kfac", {"lr": 0.1, "momentum": 0.9, "damping": 0.3, "kl_clip": None, "inverse_period": 1,
                 "damping_rule": "exact", "fisher": "ggn"})
    assert kvn.train_options("sgd", 0.3, 0.0, config) == ("sgd", {"lr": 0.3, "momentum": 0.9})
    name, options = kvn.train_options("ng-block", 0.1, 0.1, config)
    assert name == "ng-block" and "inverse_period" not in options and options["damping"] == 0.1
    assert options["fisher"] == "ggn"  # the exact GGN the committed runs used (cl.optim defaults to fisher_mc)
    assert "fisher" not in kvn.train_options("foof", 0.1, 0.1, config)[1]


def test_bad_configurations_are_refused():
    study = cl.studies.get("kfac-vs-newton")
    with pytest.raises(ValueError, match="train_methods"):
        study.resolve(train_methods=["kfac", "lbfgs"])
    with pytest.raises(ValueError, match="damping"):
        study.resolve(damping=[0.0, 1.0])
    with pytest.raises(ValueError, match="grid"):
        study.resolve(grid={"sgd": {"lr": [0.1]}})
    with pytest.raises(ValueError, match="checkpoints"):
        study.resolve(checkpoints=[0, 0])


# ---------------------------------------------------------------------------------------------- verdicts
def _set(ds, var, sel, value):
    out = ds.copy(deep=True)
    out[var].loc[sel] = value
    return out


def _verdict(ds, claim):
    v = cl.studies.verdicts(ds)
    i = list(v["claim"].values).index(claim)
    return float(v["claim_value"].values[i]), bool(v["claim_holds"].values[i])


def test_direction_claims_follow_the_data(ds):
    closer = _set(_set(ds, "cosine", {"method": "kfac", "versus": "foof-matched"}, 0.99),
                  "cosine", {"method": "kfac", "versus": "ng"}, 0.1)
    assert _verdict(closer, "B4a") == (1.0, True)
    farther = _set(_set(ds, "cosine", {"method": "kfac", "versus": "foof-matched"}, 0.1),
                   "cosine", {"method": "kfac", "versus": "ng"}, 0.99)
    assert _verdict(farther, "B4a") == (0.0, False)
    worse = _set(_set(ds, "cosine", {"method": "kfac", "versus": "foof-matched"}, 0.2),
                 "cosine", {"method": "kfac-exact", "versus": "foof-matched"}, 0.7)
    assert _verdict(worse, "B4b") == (pytest.approx(-0.5), False)


def test_training_claims_follow_the_data(ds):
    kfac_run = str(ds["run"].values[list(ds["train_method"].values).index("kfac")])
    ng_run = str(ds["run"].values[list(ds["train_method"].values).index("ng")])
    good = _set(_set(ds, "train_loss", {"run": kfac_run}, 1e-4), "train_loss", {"run": ng_run}, 1e-2)
    assert _verdict(good, "B1") == (pytest.approx(1e-2), True)
    bad = _set(_set(ds, "train_loss", {"run": kfac_run}, 1e-2), "train_loss", {"run": ng_run}, 1e-4)
    assert _verdict(bad, "B1") == (pytest.approx(1e2), False)
    diverged = ds.copy(deep=True)
    diverged["train_diverged"].loc[{"run": kfac_run}] = True
    assert _verdict(diverged, "B1") == (math.inf, False)
    assert kvn.best_runs(diverged)["kfac"] is None


def test_matched_foof_is_foof_at_each_layers_input_damping():
    prob = cl.problems.load("digits-mlp", n=64)
    K, g, lam = cl.approx.kfac(prob), prob.gradient(), 1e-2
    x, y = kvn.matched_foof_direction(K, g, lam), kvn.matched_foof_direction(K, g, lam, layerwise=True)
    for s, block in zip(prob.partition.slices, K.blocks):
        (eA, _), (eG, _) = block.factor_eigh()
        lam_A = math.sqrt(lam) * math.sqrt((float(eA.sum()) / len(eA)) / (float(eG.sum()) / len(eG)))
        foof = cl.approx.foof(prob).direction(g, lam_A)[s]
        torch.testing.assert_close(x[s], foof, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(y[s], foof * lam_A / lam, rtol=1e-12, atol=1e-14)
