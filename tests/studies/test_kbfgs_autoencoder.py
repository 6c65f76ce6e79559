"""The kbfgs-autoencoder study: its quick run has the documented layout, its numbers recompute from the
stored θ (and, for the K-BFGS state, from a replay of the run through curvlab.optim), and its verdicts
follow the data."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

import curvlab as cl
from curvlab.studies import kbfgs_autoencoder as study

DIMS = {"loss": ("run", "step"), "seconds": ("run", "step"), "cpu_seconds": ("run", "step"), "diverged_step": ("run",),
        "theta": ("run", "checkpoint", "param"), "factor_cosine": ("run", "checkpoint", "layer"),
        "top_overlap": ("run", "checkpoint", "layer"), "hg_eig_min": ("run", "checkpoint", "layer"),
        "hg_eig_max": ("run", "checkpoint", "layer"), "exact_g_eig_max": ("run", "checkpoint", "layer"),
        "step_cosine": ("run", "checkpoint", "exact_damping"),
        "gradient_cosine": ("run", "checkpoint", "exact_damping"),
        "dd_count": ("run", "checkpoint", "layer", "counter"), "loss_floor": (),
        "k3_error": ("k3_damping", "source", "layer", "update"),
        "k3_error_plain": ("k3_damping", "source", "layer", "update")}


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return cl.studies.run("kbfgs-autoencoder", quick=True, out=tmp_path_factory.mktemp("kbfgs"), progress=False)


@pytest.fixture(scope="module")
def config(ds):
    return json.loads(ds.attrs["config"])


def test_the_quick_run_has_the_documented_variables(ds, config):
    for name, dims in DIMS.items():
        assert ds[name].dims == dims, name
        assert ds[name].attrs["units"] is not None and ds[name].attrs["description"], name
    assert sorted(set(ds["method"].values.astype(str))) == sorted(study.METHODS)
    assert ds.sizes["run"] == sum(len(a["lr"]) * len(a.get("damping", [0])) for a in config["grid"].values())
    assert ds["checkpoint"].values.tolist() == study.checkpoint_steps(config)
    assert ds.sizes["step"] == study.total_steps(config) + 1
    assert ds["layer"].values.tolist() == ["0", "2", "4", "5", "7", "9"]
    assert ds["layer_shape"].values.tolist() == ["64→32", "32→16", "16→8", "8→16", "16→32", "32→64"]
    assert (ds.attrs["problem"], ds.attrs["n"], ds.attrs["seed"]) == (config["problem"], config["curvature_n"],
                                                                      config["seed"])
    assert ds["claim"].values.tolist() == ["K1", "K1-time", "K1-kfac", "K2", "K2-skip", "K3", "K3-limit"]
    first_order = np.isin(ds["method"].values.astype(str), study.FIRST_ORDER)
    assert np.isnan(ds["factor_cosine"].values[first_order]).all()
    assert np.isfinite(ds["factor_cosine"].values[~first_order]).all()  # no quick run diverges


def test_the_loss_floor_is_the_infimum_of_the_loss(config):
    prob = cl.problems.load(config["problem"], n=config["train_n"], seed=config["seed"])
    logits = torch.logit(prob.y.clamp(1e-13, 1 - 1e-13))  # prediction = target (0 and 1 at ±30)
    at_target = float(torch.nn.functional.binary_cross_entropy_with_logits(logits, prob.y))
    assert study.loss_floor(prob) == pytest.approx(at_target, abs=1e-10)
    assert prob.loss() > study.loss_floor(prob)


def _batch(ds, config, run, j):
    theta = torch.as_tensor(ds["theta"].isel(run=run, checkpoint=j).values)
    return cl.problems.load(ds.attrs["problem"], n=ds.attrs["n"], seed=ds.attrs["seed"]).at(theta)


def _ggn_blocks(batch) -> list[torch.Tensor]:
    """The exact GGN blocks R J_lᵀ diag(σ(1 − σ)) J_l of every layer, from the autograd Jacobian of the outputs."""
    def outputs(theta):
        return torch.func.functional_call(batch.model, batch.params(theta), (batch.X,)).reshape(-1)

    J = torch.func.jacrev(outputs)(batch.theta)  # (N·D, P)
    p = torch.sigmoid(outputs(batch.theta))
    h = batch.loss_scale * p * (1 - p)
    return [J[:, s].T @ (h[:, None] * J[:, s]) for s in batch.partition.slices]


def test_numbers_of_theta_alone_recompute_from_the_file(ds, config):
    rng = np.random.default_rng(0)
    prob = cl.problems.load(config["problem"], n=config["train_n"], seed=config["seed"])
    analysed = np.flatnonzero(np.isin(ds["method"].values.astype(str), study.SECOND_ORDER))
    for _ in range(3):
        run = int(rng.integers(ds.sizes["run"]))
        theta = torch.as_tensor(ds["theta"].isel(run=run, checkpoint=-1).values)
        assert prob.loss(theta) == pytest.approx(float(ds["loss"].isel(run=run, step=-1)), rel=1e-12)
        run, j = int(rng.choice(analysed)), int(rng.integers(ds.sizes["checkpoint"]))
        lam_i, layer = int(rng.integers(ds.sizes["exact_damping"])), int(rng.integers(ds.sizes["layer"]))
        batch = _batch(ds, config, run, j)
        g, lam = batch.gradient(), float(ds["exact_damping"].values[lam_i])
        exact = torch.cat([-torch.linalg.solve(F + lam * torch.eye(F.shape[0], dtype=F.dtype), g[s])
                           for F, s in zip(_ggn_blocks(batch), batch.partition.slices)])
        cos = float(-g @ exact) / float(g.norm() * exact.norm())
        assert cos == pytest.approx(float(ds["gradient_cosine"].isel(run=run, checkpoint=j, exact_damping=lam_i)),
                                    rel=1e-9)
        G = _preactivation_ggn(batch, layer)
        assert float(torch.linalg.eigvalsh(G)[-1]) == pytest.approx(
            float(ds["exact_g_eig_max"].isel(run=run, checkpoint=j, layer=layer)), rel=1e-9)


def _preactivation_ggn(batch, layer: int) -> torch.Tensor:
    """R Σ_n J_zᵀ ∇²_f ℓ_n J_z of the layer's pre-activations z_n, by autograd on a bias perturbation.

    Adding ε to the bias adds ε to every z_n: the Hessian of the loss in ε through the linearised
    network below z (GGN) is Σ_n J_nᵀ H_n J_n with J_n = ∂f_n/∂z_n — the pre-activation GGN summed over
    the batch, which is what KFAC's type-2 G is.
    """
    model = batch.model
    name = batch.partition.names[layer]
    params = batch.params(batch.theta)
    bias = f"{name}.bias"
    f0 = torch.func.functional_call(model, params, (batch.X,))

    def outputs(eps):
        p = dict(params)
        p[bias] = params[bias] + eps
        return torch.func.functional_call(model, p, (batch.X,))

    eps0 = torch.zeros_like(params[bias])
    J = torch.func.jacrev(outputs)(eps0)  # (N, D, d_out)
    p = torch.sigmoid(f0)
    H = p * (1 - p)  # ∇²_f ℓ for sigmoid cross-entropy, per output
    R = batch.loss_scale
    return R * torch.einsum("ndi,nd,ndj->ij", J, H, J)


def _replay(ds, config, run: int, upto: int):
    """Train the run again with curvlab.optim to step ``upto``: the optimizer and θ."""
    method, lr, lam = (str(ds["method"].values[run]), float(ds["lr"].values[run]), float(ds["damping"].values[run]))
    prob = cl.problems.load(config["problem"], n=config["train_n"], seed=config["seed"])
    opt = cl.optim.make(method, copy.deepcopy(prob.model), prob.loss_fn,
                        **study.method_options(method, lr, lam, config))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for ix in cl.optim.batches(prob.num_samples, config["batch_size"], upto, config["seed"]):
            opt.step(prob.X[ix], prob.y[ix])
    finally:
        torch.set_num_threads(threads)
    return opt


def test_state_dependent_numbers_recompute_by_replaying_the_run(ds, config):
    rng = np.random.default_rng(1)
    kbfgs = np.flatnonzero(np.isin(ds["method"].values.astype(str), study.KBFGS_METHODS))
    for _ in range(3):
        run, j = int(rng.choice(kbfgs)), int(rng.integers(ds.sizes["checkpoint"]))
        layer = int(rng.integers(ds.sizes["layer"]))
        opt = _replay(ds, config, run, int(ds["checkpoint"].values[j]))
        np.testing.assert_allclose(opt.theta().numpy(), ds["theta"].isel(run=run, checkpoint=j).values, rtol=0,
                                   atol=1e-12)
        B = opt.curvature().blocks[layer].G  # H_g⁻¹ of the replayed state
        G = _preactivation_ggn(_batch(ds, config, run, j), layer)
        cos = float((B * G).sum() / (B.norm() * G.norm()))
        assert cos == pytest.approx(float(ds["factor_cosine"].isel(run=run, checkpoint=j, layer=layer)), rel=1e-8)
        e = torch.linalg.eigvalsh(B)
        assert 1 / float(e[-1]) == pytest.approx(float(ds["hg_eig_min"].isel(run=run, checkpoint=j, layer=layer)),
                                                 rel=1e-8)
        top_b, top_g = torch.linalg.eigh(B)[1][:, -1], torch.linalg.eigh(G)[1][:, -1]
        assert float(top_b @ top_g) ** 2 == pytest.approx(
            float(ds["top_overlap"].isel(run=run, checkpoint=j, layer=layer)), rel=1e-6, abs=1e-10)
        counts = opt.state_summary()["counters"][ds["layer"].values[layer]]
        stored = ds["dd_count"].isel(run=run, checkpoint=j, layer=layer).values.tolist()
        assert [counts[c] for c in study.COUNTERS] == stored


def test_the_hessian_action_check_recomputes(ds, config):
    """BFGS from I with y = A_LM s, s = H h̄ (h̄ ~ N(0, I), generator seeded 1000·seed + layer), written out here."""
    batch = cl.problems.load(ds.attrs["problem"], n=ds.attrs["n"], seed=ds.attrs["seed"])
    layer = 3
    lam = float(ds["k3_damping"].values[0])
    K = cl.approx.kfac(batch)
    A = K.blocks[layer].A
    A_LM = A + math.sqrt(lam) * torch.eye(A.shape[0], dtype=A.dtype)
    gen = torch.Generator().manual_seed(config["seed"] * 1000 + layer)
    h_bars = torch.randn(config["k3_updates"], A.shape[0], generator=gen, dtype=A.dtype)
    H, I = torch.eye(A.shape[0], dtype=A.dtype), torch.eye(A.shape[0], dtype=A.dtype)
    w, Q = torch.linalg.eigh(A_LM)
    root = (Q * w.sqrt()) @ Q.T
    errors = [float(torch.linalg.matrix_norm(root @ H @ root - I)) / math.sqrt(A.shape[0])]
    for h in h_bars:
        s = H @ h
        y = A_LM @ s
        rho = 1 / float(s @ y)
        H = (I - rho * torch.outer(s, y)) @ H @ (I - rho * torch.outer(y, s)) + rho * torch.outer(s, s)
        errors.append(float(torch.linalg.matrix_norm(root @ H @ root - I)) / math.sqrt(A.shape[0]))
    stored = ds["k3_error"].sel(source="gaussian").isel(k3_damping=0, layer=layer).values
    np.testing.assert_allclose(stored, errors, rtol=1e-8)
    assert np.all(np.diff(errors) <= 1e-12 * errors[0])  # the derived monotonicity


def _excess(ds, method: str) -> float:
    idx = np.flatnonzero(ds["method"].values.astype(str) == method)
    return float(np.nanmin(ds["loss"].values[idx, -1])) - float(ds["loss_floor"])


def test_the_verdicts_are_computed_from_the_data(ds):
    k1 = max(_excess(ds, m) for m in study.KBFGS_METHODS) / min(_excess(ds, m) for m in study.FIRST_ORDER)
    value = dict(zip(ds["claim"].values.tolist(), ds["claim_value"].values.tolist()))
    holds = dict(zip(ds["claim"].values.tolist(), ds["claim_holds"].values.tolist()))
    assert value["K1"] == pytest.approx(k1, rel=1e-12) and holds["K1"] == (k1 < 1)
    kfac = max(_excess(ds, m) for m in study.KBFGS_METHODS) / _excess(ds, "kfac")
    assert value["K1-kfac"] == pytest.approx(kfac, rel=1e-12)
    kb = np.isin(ds["method"].values.astype(str), study.KBFGS_METHODS)
    assert value["K2"] == pytest.approx(float(np.nanmin(ds["hg_eig_min"].values[kb])), rel=1e-12)

    changed = ds.copy(deep=True)
    loss = changed["loss"].values
    loss[kb, -1] = float(ds["loss_floor"]) + 1e-9  # K-BFGS runs reach the floor: K1 must hold
    changed["hg_eig_min"].values[kb] = -1.0
    counts = changed["dd_count"].values
    counts[kb, :, :, study.COUNTERS.index("skipped")] = 1
    changed["k3_error"].values[..., -1] = 10 * changed["k3_error"].values[..., 0]
    again = cl.studies.verdicts(changed)
    flipped = dict(zip(again["claim"].values.tolist(), again["claim_holds"].values.tolist()))
    assert flipped["K1"] and flipped["K1-kfac"]
    assert not flipped["K2"] and not flipped["K2-skip"] and not flipped["K3"]
    assert value["K3-limit"] == pytest.approx(float((ds["k3_error"].sel(source="gaussian").isel(update=-1)
                                                     / ds["k3_error"].sel(source="gaussian").isel(update=0)).max()))
