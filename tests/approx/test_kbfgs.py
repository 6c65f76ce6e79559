"""K-BFGS / K-BFGS(L): the BFGS and damping identities, the L-BFGS two-loop recursion against dense
BFGS, the Hessian-action update, the direction against a hand computation, the batch statistics
against autograd, and short training loops."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

import curvlab as cl
from curvlab.approx.kbfgs import KBFGSLayerState
from tests.approx.cases import cnn, mlp, rel

D64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _spd(d: int, seed: int, cond: float = 10.0) -> torch.Tensor:
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=_gen(seed), dtype=D64))
    return (Q * torch.logspace(0, math.log10(cond), d, dtype=D64)) @ Q.T


def _pairs(d: int, k: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pairs with sᵀy > 0: y = B s plus a small perturbation, B SPD."""
    B, g = _spd(d, seed), _gen(seed + 1)
    out = []
    for _ in range(k):
        s = torch.randn(d, generator=g, dtype=D64)
        out.append((s, B @ s + 0.1 * torch.randn(d, generator=g, dtype=D64)))
    assert all(float(s @ y) > 0 for s, y in out)
    return out


def _bfgs_product_form(H: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    rho = 1 / (s @ y)
    eye = torch.eye(H.shape[0], dtype=D64)
    return (eye - rho * torch.outer(s, y)) @ H @ (eye - rho * torch.outer(y, s)) + rho * torch.outer(s, s)


# -- BFGS, L-BFGS ---------------------------------------------------------------------------------
def test_bfgs_update_secant_symmetric_spd():
    H = _spd(7, 0)
    for s, y in _pairs(7, 5, 1):
        H_new = cl.approx.bfgs_inverse_update(H, s, y)
        assert rel(H_new @ y, s) < 1e-12
        assert torch.equal(H_new, H_new.T)
        assert rel(H_new, _bfgs_product_form(H, s, y)) < 1e-12
        assert float(torch.linalg.eigvalsh(H_new)[0]) > 0
        H = H_new
    s, y = _pairs(7, 1, 2)[0]
    with pytest.raises(ValueError, match="sᵀy > 0"):
        cl.approx.bfgs_inverse_update(H, s, -y)


@pytest.mark.parametrize("history,count", [(8, 5), (3, 7)])
def test_lbfgs_two_loop_equals_dense_bfgs(history, count):
    d, gamma = 6, 0.7
    pairs = _pairs(d, count, 3)
    mem = cl.approx.LBFGSMemory(d, history=history, gamma=gamma)
    for s, y in pairs:
        mem.push(s, y)
    assert len(mem) == min(history, count)
    H = gamma * torch.eye(d, dtype=D64)
    for s, y in pairs[-history:]:  # the kept pairs, oldest first, from γI
        H = cl.approx.bfgs_inverse_update(H, s, y)
    v = torch.randn(d, generator=_gen(4), dtype=D64)
    V = torch.randn(d, 3, generator=_gen(5), dtype=D64)
    assert rel(mem.apply(v), H @ v) < 1e-12
    assert rel(mem.apply(V), H @ V) < 1e-12
    assert rel(mem.dense(), H) < 1e-12
    with pytest.raises(ValueError, match="sᵀy > 0"):
        mem.push(pairs[0][0], -pairs[0][1])


# -- damping ----------------------------------------------------------------------------------------
def test_powell_stage_reaches_mu1_yHy():
    H, mu1 = _spd(5, 6), 0.2
    g = _gen(7)
    y = torch.randn(5, generator=g, dtype=D64)
    s = -0.3 * y + 0.01 * torch.randn(5, generator=g, dtype=D64)  # sᵀy < 0
    Hy = H @ y
    s_new, triggered = cl.approx.powell_damping(s, y, Hy, mu1)
    assert triggered
    assert rel(s_new @ y, mu1 * (y @ Hy)) < 1e-12
    s_ok = 2 * Hy  # sᵀy = 2 yᵀHy > μ₁ yᵀHy
    same, triggered = cl.approx.powell_damping(s_ok, y, Hy, mu1)
    assert not triggered and same is s_ok


@pytest.mark.parametrize("mu2", [0.3, 1.7])
def test_lm_stage_reaches_mu2_ss(mu2):
    g = _gen(8)
    s = torch.randn(5, generator=g, dtype=D64)
    y = -s + 0.1 * torch.randn(5, generator=g, dtype=D64)
    y_new, triggered = cl.approx.lm_damping(s, y, mu2)
    assert triggered
    assert rel(s @ y_new, mu2 * (s @ s)) < 1e-12
    y_same, triggered = cl.approx.lm_damping(s, 2 * mu2 * s, mu2)
    assert not triggered
    # μ₂ > 1 and sᵀy = sᵀs: the interpolation has no solution; the shift still reaches μ₂‖s‖²
    y_new, triggered = cl.approx.lm_damping(s, s.clone(), 1.7)
    assert triggered and rel(s @ y_new, 1.7 * (s @ s)) < 1e-12


@pytest.mark.parametrize("history", [None, 4])
def test_double_damping_keeps_h_g_spd_over_random_pairs(history):
    d, mu1, mu2 = 5, 0.2, math.sqrt(0.3)
    layer = KBFGSLayerState("l", "l.weight", None, 0, 10, 2, d, history=history)
    B, g = _spd(d, 9, cond=100.0), _gen(10)
    for k in range(60):
        s = torch.randn(d, generator=g, dtype=D64)
        y = B @ s if k % 3 else -B @ s + torch.randn(d, generator=g, dtype=D64)  # every third: sᵀy < 0 mostly
        y = y * (0.01 if k % 5 == 0 else 1.0)
        Hy = layer.apply_output_inverse(y)
        pair = layer.update_outputs(s, y, torch.zeros(d, dtype=D64), mu2=mu2, mu1=mu1)
        # LM changes y only, so the final s is Powell's: sᵀy = μ₁ yᵀHy with the original y
        if pair.powell:
            assert rel(pair.s @ y, mu1 * (y @ Hy)) < 1e-12
        sy, ss = float(pair.s @ pair.y), float(pair.s @ pair.s)
        assert sy >= mu2 * ss * (1 - 1e-12)
        if pair.lm:
            assert abs(sy - mu2 * ss) <= 1e-12 * mu2 * ss
        assert pair.skipped is None
        H = layer.output_inverse()
        if history is None:
            assert torch.equal(H, H.T)
        assert float(torch.linalg.eigvalsh(H)[0]) > 0
    c = layer.counters
    assert c.pairs == 60 and c.skipped == 0 and c.powell > 0 and c.lm > 0 and c.powell < 60


def test_skip_rule():
    s = torch.tensor([1.0, 0.0], dtype=D64)
    assert cl.approx.bfgs_skip_reason(s, torch.tensor([-1.0, 0.0], dtype=D64), s) == "nonpositive"
    assert cl.approx.bfgs_skip_reason(0 * s, s, s) == "nonpositive"
    y = torch.tensor([1e-3, 5.0], dtype=D64)  # sᵀy = 1e-3 ≤ 1e-4 · 1 · ‖v‖ for ‖v‖ = 100
    assert cl.approx.bfgs_skip_reason(s, y, torch.tensor([100.0, 0.0], dtype=D64)) == "small"
    assert cl.approx.bfgs_skip_reason(s, y, s) is None
    assert cl.approx.bfgs_skip_reason(s, torch.tensor([math.nan, 0.0], dtype=D64), s) == "nonfinite"
    layer = KBFGSLayerState("l", "l.weight", None, 0, 4, 2, 2)  # H_g = I: no Powell for sᵀy = 0.5 ≥ 0.2 yᵀy
    H = layer.output_inverse()
    pair = layer.update_outputs(s, 0.5 * s, torch.tensor([1e4, 0.0], dtype=D64), mu2=1e-6)
    assert not pair.powell and not pair.lm
    assert pair.skipped == "small" and layer.counters.skipped == 1 and torch.equal(layer.output_inverse(), H)


# -- Hessian action -----------------------------------------------------------------------------------
def test_hessian_action_update_converges_to_damped_inverse():
    d, lam = 6, 0.3
    layer = KBFGSLayerState("l", "l.weight", "l.bias", 0, 12, d, 2)
    A = _spd(d, 11, cond=50.0)
    layer.observe(A, 0.9, lam)
    A_LM = A + math.sqrt(lam) * torch.eye(d, dtype=D64)
    assert rel(layer.A_LM, A_LM) < 1e-15
    assert rel(layer.H_a @ A_LM, torch.eye(d, dtype=D64)) < 1e-12  # the first call: the explicit inverse
    layer.H_a = torch.eye(d, dtype=D64)  # start away from A_LM⁻¹
    e, Q = torch.linalg.eigh(A_LM)
    root = (Q * e.sqrt()) @ Q.T
    eye = torch.eye(d, dtype=D64)

    def errors() -> tuple[float, float]:
        return (float(torch.linalg.matrix_norm(root @ layer.H_a @ root - eye)),
                float(torch.linalg.matrix_norm(layer.H_a @ A_LM - eye)))

    first, first_plain = errors()
    prev, g = first, _gen(12)
    for _ in range(300):
        assert layer.update_inputs(torch.randn(d, generator=g, dtype=D64))
        err, _ = errors()
        assert err <= prev * (1 + 1e-9) + 1e-13  # E ← P E P in the A_LM-scaled space: never grows
        prev = err
    assert errors()[1] < 1e-9 * first_plain
    assert layer.counters.input_updates == 300 and layer.counters.input_skipped == 0


# -- direction, curvature view --------------------------------------------------------------------------
def _run(prob: cl.Problem, state: cl.approx.KBFGS, steps: int, lr: float = 0.1) -> tuple[torch.Tensor, list[float]]:
    theta, losses = prob.theta.clone(), []
    for _ in range(steps):
        before = cl.approx.kbfgs_statistics(prob, theta)
        state.observe_inputs(before)
        theta = theta + lr * state.precondition(before.gradient)
        assert bool(torch.isfinite(theta).all())
        state.update_from_step(before, cl.approx.kbfgs_statistics(prob, theta, input_factors=False))
        losses.append(before.loss)
    losses.append(prob.loss(theta))
    return theta, losses


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("method", ["kbfgs", "kbfgs-l"])
def test_precondition_by_hand_and_curvature_view(bias, method):
    prob = mlp(n=12, bias=bias)
    state = cl.approx.KBFGS(prob, damping=0.3, method=method, history=3)
    _run(prob, state, 4)
    g = torch.randn(prob.num_params, generator=_gen(13), dtype=D64)
    parts = prob.unflatten(g)
    expected = {}
    for name, layer in state.layers.items():  # -H_g D̄ H_a on [∇W ∇b]
        D = parts[f"{name}.weight"]
        if bias:
            D = torch.cat([D, parts[f"{name}.bias"][:, None]], dim=1)
        P = -layer.output_inverse() @ D @ layer.H_a
        expected[f"{name}.weight"] = P[:, :-1] if bias else P
        if bias:
            expected[f"{name}.bias"] = P[:, -1]
    by_hand = prob.flatten(expected)
    d = state.precondition(g)
    assert rel(d, by_hand) < 1e-12
    C = state.curvature()
    assert C.structure == "quasi_newton" and C.method == method
    assert rel(C.direction(g, 0.0), d) < 1e-10
    assert rel(-C.solve(g, 0.0), d) < 1e-10
    F = cl.exact.ggn(prob, structure="block")
    assert C.block_names == F.block_names and C.block_slices == F.block_slices
    assert set(C.info) == set(F.block_names) and C.info["0"]["pairs"] == 4


def test_curvature_nests_layers_of_one_block():
    prob = mlp(n=10, partition="all")
    state = cl.approx.KBFGS(prob)
    _run(prob, state, 2)
    C = state.curvature()
    assert C.block_names == ("all",) and C.blocks[0].block_names == ("0", "2", "4")
    g = prob.gradient()
    assert rel(C.direction(g, 0.0), state.precondition(g)) < 1e-10


def test_unsupported_layers_and_split_partitions_raise():
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2)).double()
    prob = cl.Problem(model, nn.CrossEntropyLoss(), torch.randn(5, 4, dtype=D64), torch.randint(0, 2, (5,)))
    with pytest.raises(ValueError, match=r"'1.weight' \(LayerNorm\)") as err:
        cl.approx.KBFGS(prob)
    assert "unsupported='exact'" not in str(err.value)
    with pytest.raises(ValueError, match="holds only part of layer '0'"):
        cl.approx.KBFGS(mlp(n=6, partition="per_tensor"))
    cl.approx.KBFGS(mlp(n=6, bias=False, partition="per_tensor"))  # a weight alone is a whole layer
    with pytest.raises(ValueError, match="unknown method"):
        cl.approx.KBFGS(mlp(n=6), method="lbfgs")
    with pytest.raises(ValueError, match="damping"):
        cl.approx.KBFGS(mlp(n=6), damping=0.0)
    with pytest.raises(RuntimeError, match="observe_inputs"):
        cl.approx.KBFGS(mlp(n=6)).precondition(torch.zeros(mlp(n=6).num_params, dtype=D64))


# -- statistics --------------------------------------------------------------------------------------
def _autograd_statistics(prob: cl.Problem) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """z̄ (mean over samples and positions) and Σ_{n,t} ∇_z L per layer, with hooks and autograd."""
    outs: dict[str, torch.Tensor] = {}
    layers = {n: m for n, m in prob.model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: outs.__setitem__(n, o)) for n, m in layers.items()]
    try:
        params = {k: v.detach().clone().requires_grad_(True) for k, v in prob.unflatten(prob.theta).items()}
        loss = prob.likelihood.loss(functional_call(prob.model, params, (prob.X,)), prob.y)
    finally:
        for h in hooks:
            h.remove()
    grads = torch.autograd.grad(loss, [outs[n] for n in layers])
    out = {}
    for (n, z), gz in zip(outs.items(), grads):
        dims = (0, 2, 3) if z.ndim == 4 else (0,)
        out[n] = (z.detach().mean(dim=dims), gz.sum(dim=dims))
    return out


@pytest.mark.parametrize("make", [lambda: mlp(n=9), lambda: cnn(n=5)])
def test_statistics_against_autograd(make):
    prob = make()
    stats = cl.approx.kbfgs_statistics(prob)
    assert rel(stats.gradient, prob.gradient()) < 1e-12
    assert stats.loss == pytest.approx(prob.loss(), rel=1e-14)
    K = cl.approx.kfac(prob, fisher="empirical")
    for name, (z_mean, g_sum) in _autograd_statistics(prob).items():
        st = stats.layers[name]
        assert rel(st.preact_mean, z_mean) < 1e-12
        assert rel(st.preact_grad_sum, g_sum) < 1e-12
        assert rel(st.input_factor, K.block(name).A) < 1e-14  # KFAC's expand input factor
        assert st.input_mean.shape == (K.block(name).A.shape[0],)


def test_pair_average_follows_the_batch_size():
    prob = mlp(n=16)
    state = cl.approx.KBFGS(prob)
    batch = prob.subset(slice(0, 8))
    before = cl.approx.kbfgs_statistics(batch)
    state.observe_inputs(before)
    theta = batch.theta + 0.1 * state.precondition(before.gradient)
    after = cl.approx.kbfgs_statistics(batch, theta, input_factors=False)
    state.update_from_step(before, after)
    for name, layer in state.layers.items():  # the EMA (decay 0.9, started at zero) is on for a minibatch
        s = before.layers[name].preact_mean - after.layers[name].preact_mean
        assert rel(layer.s_avg, 0.1 * s) < 1e-14
    full = cl.approx.KBFGS(prob)
    _run(prob, full, 1)
    assert all(float(layer.s_avg.abs().max()) == 0 for layer in full.layers.values())


# -- training loops ----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["kbfgs", "kbfgs-l"])
def test_training_loop_lowers_the_loss(method):
    prob = mlp(n=32)
    state = cl.approx.KBFGS(prob, damping=0.3, method=method, history=10)
    theta, losses = _run(prob, state, 20)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.95 * losses[0]
    C = state.curvature()
    for info in C.info.values():
        assert info["H_g_eig_min"] > 0 and info["pairs"] == 20


def test_conv_problem_takes_steps():
    prob = cl.problems.load("digits-cnn", n=32)
    state = cl.approx.KBFGS(prob, damping=0.3)
    theta, losses = _run(prob, state, 4)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    C = state.curvature()
    g = prob.gradient(theta)
    assert rel(C.direction(g, 0.0), state.precondition(g)) < 1e-9


# -- the layer updates against the public functions --------------------------------------------------
@pytest.mark.parametrize("history", [None, 3])
def test_layer_updates_match_the_public_functions(history):
    """update_outputs / update_inputs (decisions on host floats) equal the composition of the public steps."""
    d, d_in, mu1, mu2, thr = 5, 4, 0.2, math.sqrt(0.3), 1e-4
    layer = KBFGSLayerState("l", "l.weight", None, 0, d * d_in, d_in, d, history=history)
    layer.observe(_spd(d_in, 3), 0.9, 0.3)
    H_g, H_a = torch.eye(d, dtype=D64), layer.H_a.clone()
    B, g = _spd(d, 9, cond=100.0), _gen(13)
    reasons = set()
    for k in range(40):
        s = torch.randn(d, generator=g, dtype=D64)
        y = B @ s if k % 3 else -B @ s + torch.randn(d, generator=g, dtype=D64)
        v = torch.randn(d, generator=g, dtype=D64) * (1e5 if k % 7 == 0 else 1.0)  # every 7th: "small"
        if k == 11:
            y = y.clone()
            y[0] = math.nan
        Hy = layer.apply_output_inverse(y) if history else H_g @ y
        ref = cl.approx.double_damping(s, y, Hy, mu2=mu2, mu1=mu1)
        ref.skipped = cl.approx.bfgs_skip_reason(ref.s, ref.y, v, thr)
        pair = layer.update_outputs(s, y, v, mu2=mu2, mu1=mu1, threshold=thr)
        assert (pair.powell, pair.lm, pair.skipped) == (ref.powell, ref.lm, ref.skipped)
        reasons.add(pair.skipped)
        if ref.skipped is None:
            assert rel(pair.s, ref.s) < 1e-12 and rel(pair.y, ref.y) < 1e-12
            if history is None:
                H_g = cl.approx.bfgs_inverse_update(H_g, ref.s, ref.y)
                assert rel(layer.H_g, H_g) < 1e-12 and torch.equal(layer.H_g, layer.H_g.T)
        h = torch.randn(d_in, generator=g, dtype=D64)
        s_a = H_a @ h
        H_a = cl.approx.bfgs_inverse_update(H_a, s_a, layer.A_LM @ s_a)
        assert layer.update_inputs(h, thr)
        assert rel(layer.H_a, H_a) < 1e-12
    assert {None, "small", "nonfinite"} <= reasons
