"""The trace-restricted study: its quick run, its documented variables, numbers recomputed from the stored θ
against exact blocks formed independently (per-sample Jacobians with torch.func), and verdicts that
follow the data."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from torch.func import functional_call, jacrev, vmap

import curvlab as cl
from curvlab.studies import trace_restricted as tr

OVERRIDES = {"n": 128, "checkpoints": [0, 20], "damping": [1e-3, 1e-1], "train_seeds": 2, "train_steps": 10}


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    out = tmp_path_factory.mktemp("trace-restricted")
    return cl.studies.run("trace-restricted", quick=True, out=out, progress=False, **OVERRIDES)


def _problem(ds):
    return cl.problems.load(ds.attrs["problem"], n=int(ds.attrs["n"]), seed=int(ds.attrs["seed"]))


# ---------------------------------------------------------------------------------------------- the Dataset
def test_quick_run_has_the_documented_variables(ds):
    for name in ("relative_error", "trace_ratio"):
        assert ds[name].dims == ("checkpoint", "fisher", "method", "block")
    assert list(ds["method"].values) == list(tr.METHODS)
    assert list(ds["fisher"].values) == list(tr.FISHERS)
    assert ds["trace_factor"].dims == ("checkpoint", "fisher", "block")
    assert ds["direction_cosine"].dims == ("checkpoint", "fisher", "damping", "damping_rule", "method", "block")
    assert ds["theta"].dims == ("checkpoint", "param")
    assert ds["train_loss"].dims == ("train_method", "train_seed", "step")
    assert list(ds["train_seed"].values) == list(range(OVERRIDES["train_seeds"]))
    assert ds.attrs["problem"] == "digits-mlp" and ds.attrs["n"] == 128 and ds.attrs["seed"] == 0
    assert "provisional" in ds.attrs["tekfac_definition"]
    for name in tr.STUDY.variables:
        assert ds[name].attrs["units"] and ds[name].attrs["description"], name
    assert not cl.studies.failed_cells(ds)


def test_the_exact_identities_hold(ds):
    """T1 and T2 are identities: they must hold on any data (here to 1e-10)."""
    holds = dict(zip(ds["claim"].values, ds["claim_holds"].values))
    assert holds["T1"] and holds["T2"]
    # TEKFAC's matrix is EKFAC's (provisional definition): same errors and traces
    for name in ("relative_error", "trace_ratio"):
        np.testing.assert_allclose(ds[name].sel({"method": "tekfac"}), ds[name].sel({"method": "ekfac"}), rtol=1e-12)
    # but its own damping differs
    own = ds["direction_cosine"].sel(damping_rule="own")
    assert float(np.abs(own.sel({"method": "tekfac"}) - own.sel({"method": "ekfac"})).max()) > 1e-6


# ---------------------------------------------------------------------------------------------- recomputation
def _exact_blocks(batch) -> dict[str, torch.Tensor]:
    """Dense GGN and empirical Fisher of a cross-entropy problem from per-sample Jacobians (torch.func):
    GGN = 1/N Σ J_nᵀ (diag p_n − p_n p_nᵀ) J_n, EF = 1/N Σ ∇ℓ_n ∇ℓ_nᵀ with ∇ℓ_n = J_nᵀ (p_n − e_{y_n})."""
    theta = batch.theta.detach()

    def logits(t, x):
        return functional_call(batch.model, batch.unflatten(t), (x[None],))[0]

    J = vmap(jacrev(logits), in_dims=(None, 0))(theta, batch.X)  # (N, C, P)
    z = vmap(logits, in_dims=(None, 0))(theta, batch.X)
    p = torch.softmax(z, dim=1)
    H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    r = p - torch.nn.functional.one_hot(batch.y, p.shape[1]).to(p.dtype)
    N = batch.X.shape[0]
    grads = torch.einsum("ncp,nc->np", J, r)
    return {"ggn": torch.einsum("ncp,ncd,ndq->pq", J, H, J) / N, "empirical_fisher": grads.T @ grads / N,
            "gradient": grads.mean(0)}


def test_three_random_cells_recomputed_from_theta(ds):
    rng = random.Random(7)
    prob = _problem(ds)
    for _ in range(3):
        c = rng.choice(list(ds["checkpoint"].values))
        fisher, method = rng.choice(tr.FISHERS), rng.choice(tr.METHODS)
        j = rng.randrange(ds.sizes["block"])
        block, lam = str(ds["block"].values[j]), float(rng.choice(list(ds["damping"].values)))
        batch = prob.at(torch.as_tensor(ds["theta"].sel(checkpoint=c).values))
        ref = _exact_blocks(batch)
        s = batch.partition.slices[j]
        F = ref[fisher][s, s]
        approx = getattr(cl.approx, method)(batch, fisher=fisher).blocks[j].to_dense()
        cell = {"checkpoint": c, "fisher": fisher, "method": method, "block": block}
        err = float(torch.linalg.matrix_norm(approx - F) / torch.linalg.matrix_norm(F))
        assert float(ds["relative_error"].sel(cell)) == pytest.approx(err, rel=1e-8)
        assert float(ds["trace_ratio"].sel(cell)) == pytest.approx(float(approx.trace() / F.trace()), rel=1e-10)
        g, eye = ref["gradient"][s], torch.eye(F.shape[0], dtype=F.dtype)
        x, x_exact = torch.linalg.solve(approx + lam * eye, g), torch.linalg.solve(F + lam * eye, g)
        cos = float(x @ x_exact / (x.norm() * x_exact.norm()))
        stored = ds["direction_cosine"].sel({**cell, "damping": lam, "damping_rule": "exact"})
        assert float(stored) == pytest.approx(cos, rel=1e-8)


def test_trace_factor_and_own_damping_recomputed(ds):
    prob = _problem(ds)
    c = int(ds["checkpoint"].values[-1])
    batch = prob.at(torch.as_tensor(ds["theta"].sel(checkpoint=c).values))
    F, lam = _exact_blocks(batch), float(ds["damping"].values[0])
    K = cl.approx.kfac(batch)
    for j, (s, block) in enumerate(zip(batch.partition.slices, K.blocks)):
        A, G = block.A, block.G
        c_l = float(F["ggn"][s, s].trace() / (A.trace() * G.trace()))
        name = str(ds["block"].values[j])
        assert float(ds["trace_factor"].sel(checkpoint=c, fisher="ggn", block=name)) == pytest.approx(c_l, rel=1e-10)
        # KFAC's own damping: π-damped factors, ΔW = (G + λ_G I)⁻¹ ∇W (A + λ_A I)⁻¹ (bias folded into A)
        p, q1 = G.shape[0], A.shape[0]
        pi = math.sqrt((float(A.trace()) / q1) / (float(G.trace()) / p))
        g = F["gradient"][s]
        X = torch.cat([g[: p * (q1 - 1)].reshape(p, q1 - 1), g[p * (q1 - 1):].reshape(p, 1)], dim=1)
        Y = torch.linalg.solve(G + math.sqrt(lam) / pi * torch.eye(p, dtype=G.dtype), X) @ torch.linalg.inv(
            A + pi * math.sqrt(lam) * torch.eye(q1, dtype=A.dtype))
        x = torch.cat([Y[:, :-1].reshape(-1), Y[:, -1]])
        x_exact = torch.linalg.solve(F["ggn"][s, s] + lam * torch.eye(len(g), dtype=g.dtype), g)
        stored = ds["direction_cosine"].sel({"checkpoint": c, "fisher": "ggn", "damping": lam, "damping_rule": "own",
                                             "method": "kfac", "block": name})
        assert float(stored) == pytest.approx(float(x @ x_exact / (x.norm() * x_exact.norm())), rel=1e-8)


def test_training_run_recomputed(ds):
    config = cl.studies.get("trace-restricted").resolve(quick=True, **OVERRIDES)
    prob = cl.problems.load(config["problem"], n=config["n"], seed=1)
    again = cl.optim.train(prob, "tkfac", steps=config["train_steps"], batch_size=config["batch_size"], seed=1,
                           progress=False, lr=config["lr"], damping=config["train_damping"], fisher="ggn")
    np.testing.assert_allclose(again["loss"].values, ds["train_loss"].sel(train_method="tkfac", train_seed=1),
                               rtol=1e-9)


def test_bad_configurations_are_refused():
    study = cl.studies.get("trace-restricted")
    with pytest.raises(ValueError, match="fishers"):
        study.resolve(fishers=["hessian"])
    with pytest.raises(ValueError, match="damping"):
        study.resolve(damping=[-1.0])


# ---------------------------------------------------------------------------------------------- verdicts
def _verdict(ds, claim):
    v = cl.studies.verdicts(ds)
    i = list(v["claim"].values).index(claim)
    return float(v["claim_value"].values[i]), bool(v["claim_holds"].values[i])


def test_claims_follow_the_data(ds):
    off = ds.copy(deep=True)
    off["trace_ratio"].loc[{"checkpoint": 0, "fisher": "ggn", "method": "tkfac"}] = 1.01
    assert _verdict(off, "T1") == (pytest.approx(0.01), False)
    worse = ds.copy(deep=True)
    worse["relative_error"].loc[{"method": "ekfac"}] = worse["relative_error"].sel({"method": "kfac"}) + 0.5
    value, holds = _verdict(worse, "T2")
    assert value >= 0.5 - 1e-12 and not holds
    for shift, expected in ((0.1, (0.0, False)), (-0.1, (1.0, True))):
        moved = ds.copy(deep=True)
        moved["relative_error"].loc[{"method": "tkfac"}] = moved["relative_error"].sel({"method": "kfac"}) + shift
        assert _verdict(moved, "T3") == expected
    for scale, holds in ((1e-3, True), (1e3, False)):
        scaled = ds.copy(deep=True)
        best = np.minimum(ds["train_loss"].sel(train_method="ekfac"), ds["train_loss"].sel(train_method="tkfac"))
        worst = np.maximum(ds["train_loss"].sel(train_method="ekfac"), ds["train_loss"].sel(train_method="tkfac"))
        scaled["train_loss"].loc[{"train_method": "tekfac"}] = (best if scale < 1 else worst) * scale
        assert _verdict(scaled, "T4")[1] is holds
    mean, dz = tr.effect_sizes(ds, "ekfac")
    logs = tr.final_log_losses(ds)
    assert mean == pytest.approx(float((logs.sel(train_method="tekfac") - logs.sel(train_method="ekfac")).mean()))
