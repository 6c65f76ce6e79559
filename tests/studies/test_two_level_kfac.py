"""The two-level-kfac study: its quick run has the documented layout, its numbers recompute from the stored
θ with dense linear algebra written out here, and its verdicts follow the data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import curvlab as cl
from curvlab.linalg import Kron
from curvlab.studies import two_level_kfac as study

ALGEBRA = ("problem", "checkpoint", "damping")
DIMS = {"kfac_error": ALGEBRA, "kfac_cosine": ALGEBRA, "additive_error": (*ALGEBRA, "coarse"),
        "additive_cosine": (*ALGEBRA, "coarse"), "deflated_error": (*ALGEBRA, "coarse"),
        "deflated_cosine": (*ALGEBRA, "coarse"), "energy_gain": (*ALGEBRA, "coarse"), "columns": ("problem", "coarse"),
        "theta": ("problem", "checkpoint", "param"), "checkpoint_loss": ("problem", "checkpoint"),
        "batch_loss": ("problem", "checkpoint"), "loss": ("problem", "method", "seed", "step"),
        "seconds": ("problem", "method", "seed", "step"), "cpu_seconds": ("problem", "method", "seed", "step"),
        "diverged_step": ("problem", "method", "seed"), "theta_final": ("problem", "method", "seed", "param"),
        "loss_floor": ("problem",)}


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return cl.studies.run("two-level-kfac", quick=True, out=tmp_path_factory.mktemp("two-level"), progress=False)


@pytest.fixture(scope="module")
def config(ds):
    return json.loads(ds.attrs["config"])


def test_the_quick_run_has_the_documented_variables(ds, config):
    for name, dims in DIMS.items():
        assert ds[name].dims == dims, name
        assert ds[name].attrs["units"] is not None and ds[name].attrs["description"], name
    assert ds["problem"].values.tolist() == config["problems"]
    assert ds["n"].values.tolist() == [config["n"][p] for p in config["problems"]]
    assert ds["checkpoint"].values.tolist() == sorted(config["checkpoints"])
    assert ds["method"].values.tolist() == config["methods"] == ["kfac", *study.TWO_LEVEL, "sgd", "adam"]
    assert ds["seed"].values.tolist() == list(range(config["seeds"]))
    assert ds["coarse"].values.tolist() == list(study.COARSE)
    assert ds.sizes["step"] == study.total_steps(config) + 1
    assert ds["claim"].values.tolist() == ["C1", "C1-time", "C2", "C3", "C3-lambda"]
    for p, P in zip(ds["problem"].values, ds["num_params"].values):  # θ is NaN-padded beyond the problem's size
        theta = ds["theta"].sel(problem=p).values
        assert np.isfinite(theta[:, :P]).all() and np.isnan(theta[:, P:]).all()
    assert (ds["diverged_step"].values == -1).all()


def _dense_ggn(batch) -> torch.Tensor:
    """R Σ_n J_nᵀ ∇²_f ℓ_n J_n from the autograd Jacobian of the outputs (CE or sigmoid cross-entropy)."""
    def outputs(theta):
        return torch.func.functional_call(batch.model, batch.params(theta), (batch.X,))

    f = outputs(batch.theta)
    J = torch.func.jacrev(outputs)(batch.theta)  # (N, C, P)
    if isinstance(batch.loss_fn, torch.nn.CrossEntropyLoss):
        p = torch.softmax(f, dim=1)
        H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    else:
        s = torch.sigmoid(f)
        H = torch.diag_embed(s * (1 - s))
    return batch.loss_scale * torch.einsum("ncp,ncd,ndq->pq", J, H, J)


def _fine(batch, lam: float) -> torch.Tensor:
    """blockdiag_l (A_l + λI) ⊗ (G_l + λI), dense, in the parameter order."""
    K = cl.approx.kfac(batch)
    M = torch.zeros(batch.num_params, batch.num_params, dtype=batch.dtype)
    for blk, s in zip(K.blocks, batch.partition.slices):
        eye_a, eye_g = torch.eye(blk.A.shape[0], dtype=M.dtype), torch.eye(blk.G.shape[0], dtype=M.dtype)
        M[s, s] = Kron(blk.A + lam * eye_a, blk.G + lam * eye_g, bias=True).to_dense()
    return M


def test_the_energy_errors_recompute_from_theta(ds, config):
    rng = np.random.default_rng(0)
    for _ in range(3):
        p = str(rng.choice(ds["problem"].values))
        j, i = int(rng.integers(ds.sizes["checkpoint"])), int(rng.integers(ds.sizes["damping"]))
        k = int(rng.integers(ds.sizes["coarse"]))
        P = int(ds["num_params"].sel(problem=p))
        theta = torch.as_tensor(ds["theta"].sel(problem=p).isel(checkpoint=j).values[:P])
        batch = cl.problems.load(p, n=int(ds["n"].sel(problem=p)), seed=ds.attrs["seed"]).at(theta)
        at = ds.sel(problem=p).isel(checkpoint=j, damping=i)
        lam, space = float(at["damping"]), str(ds["coarse"].values[k])
        g, F = batch.gradient(), _dense_ggn(batch)
        F_lam = F + lam * torch.eye(P, dtype=F.dtype)
        x_star = torch.linalg.solve(F_lam, g)

        def energy(v, F_lam=F_lam):
            return float(v @ F_lam @ v) ** 0.5

        x_k = torch.linalg.solve(_fine(batch, lam), g)
        e_k = energy(x_k - x_star) / energy(x_star)
        assert e_k == pytest.approx(float(at["kfac_error"]), rel=1e-7)
        assert float(x_k @ x_star) / float(x_k.norm() * x_star.norm()) == pytest.approx(float(at["kfac_cosine"]),
                                                                                          rel=1e-7)
        Z = cl.approx.two_level_kfac(batch, coarse=space, damping=lam, gradient=g).basis
        r = g - F_lam @ x_k
        x_d = x_k + Z @ torch.linalg.solve(Z.T @ F_lam @ Z, Z.T @ r)
        e_d = energy(x_d - x_star) / energy(x_star)
        assert e_d == pytest.approx(float(at["deflated_error"].isel(coarse=k)), rel=1e-7)
        assert float(at["energy_gain"].isel(coarse=k)) == pytest.approx((e_d**2 - e_k**2) / e_k**2, rel=1e-6,
                                                                       abs=1e-12)
        assert e_d <= e_k * (1 + 1e-12)


def test_the_additive_update_recomputes(ds):
    p = str(ds["problem"].values[0])
    P = int(ds["num_params"].sel(problem=p))
    theta = torch.as_tensor(ds["theta"].sel(problem=p).isel(checkpoint=-1).values[:P])
    batch = cl.problems.load(p, n=int(ds["n"].sel(problem=p)), seed=ds.attrs["seed"]).at(theta)
    lam = float(ds["damping"].values[-1])
    g, F = batch.gradient(), _dense_ggn(batch)
    F_lam = F + lam * torch.eye(P, dtype=F.dtype)
    x_star = torch.linalg.solve(F_lam, g)
    Z = cl.approx.two_level_kfac(batch, coarse="nicolaides", damping=lam).basis
    sizes = torch.tensor([float((Z[:, c] != 0).sum()) for c in range(Z.shape[1])], dtype=Z.dtype)
    x_a = torch.linalg.solve(_fine(batch, lam), g) + Z @ torch.linalg.solve(Z.T @ F @ Z + lam * torch.diag(sizes),
                                                                            Z.T @ g)
    e_a = float((x_a - x_star) @ F_lam @ (x_a - x_star)) ** 0.5 / float(x_star @ F_lam @ x_star) ** 0.5
    stored = ds["additive_error"].sel(problem=p, coarse="nicolaides").isel(checkpoint=-1, damping=-1)
    assert e_a == pytest.approx(float(stored), rel=1e-7)


def test_the_final_training_losses_recompute_from_theta_final(ds, config):
    rng = np.random.default_rng(1)
    for _ in range(3):
        p, m = str(rng.choice(ds["problem"].values)), str(rng.choice(ds["method"].values))
        s = int(rng.integers(ds.sizes["seed"]))
        run = ds.sel({"problem": p, "method": m, "seed": s})
        prob = cl.problems.load(p, n=config["train_n"], seed=s)
        theta = torch.as_tensor(run["theta_final"].values[:prob.num_params])
        assert prob.loss(theta) == pytest.approx(float(run["loss"].isel(step=-1)), rel=1e-12)


def test_the_kfac_baseline_has_the_two_level_fine_damping(ds, config):
    """kfac with damping_rule='factored' and damping λ² steps with (A + λI) ⊗ (G + λI), the 'koroko' rule."""
    p = config["problems"][0]
    opts = study.training_options(p, "kfac", config)
    lam = config["hyper"][p]["kfac"]["damping"]
    assert opts["damping_rule"] == "factored" and opts["damping"] == pytest.approx(lam * lam)
    batch = cl.problems.load(p, n=32, seed=0)
    g = batch.gradient()
    K = cl.approx.kfac(batch)
    np.testing.assert_allclose(K.direction(g, opts["damping"], mode="factored"),
                               -torch.linalg.solve(_fine(batch, lam), g), rtol=1e-10, atol=1e-14)
    assert study.training_options(p, "kfac-2l-spectral", config)["fine_rule"] == "koroko"


def test_the_verdicts_are_computed_from_the_data(ds):
    value = dict(zip(ds["claim"].values.tolist(), ds["claim_value"].values.tolist()))
    ratio = (ds["deflated_error"] / ds["kfac_error"]).values
    assert value["C2"] == pytest.approx(float(ratio.max()), rel=1e-14)
    reduction = 1 - ratio  # (problem, checkpoint, damping, coarse)
    c3 = np.median(reduction.reshape(-1, reduction.shape[-1]), axis=0).max()
    assert value["C3"] == pytest.approx(float(c3), rel=1e-12)
    per_step = ds["cpu_seconds"].isel(step=-1) / (ds.sizes["step"] - 1)
    kfac = per_step.sel({"method": "kfac"}).mean("seed")
    time_ratio = min(float((per_step.sel({"method": m}).mean("seed") / kfac).min()) for m in study.TWO_LEVEL)
    assert value["C1-time"] == pytest.approx(time_ratio, rel=1e-12)

    changed = ds.copy(deep=True)
    two_level = np.isin(changed["method"].values, study.TWO_LEVEL)
    loss = changed["loss"].values
    floor = changed["loss_floor"].values[:, None, None]
    loss[..., -1] = np.where(two_level[None, :, None], floor + 1e-12, loss[..., -1])  # far better in every seed
    changed["cpu_seconds"].values[:, two_level] = 0.0
    changed["deflated_error"].values[...] = 2 * changed["kfac_error"].values[..., None]
    again = cl.studies.verdicts(changed)
    holds = dict(zip(again["claim"].values.tolist(), again["claim_holds"].values.tolist()))
    assert not holds["C1"] and not holds["C1-time"] and not holds["C2"]
    tiny = ds.copy(deep=True)
    lam = tiny["damping"].values
    tiny["deflated_error"].values[...] = tiny["kfac_error"].values[..., None] * (1 - 1e-3 * lam.min() / lam[:, None])
    again = dict(zip(*(cl.studies.verdicts(tiny)[k].values.tolist() for k in ("claim", "claim_holds"))))
    assert again["C3"] and again["C3-lambda"]  # a small reduction that shrinks as λ grows
