"""The fused step: the loss gradient read off the statistics pass equals autograd's, and training with it
takes the same steps as with a separate gradient pass."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab import optim
from curvlab.approx.factors import collect
from curvlab.capture import GenericRows, capture, capture_with_gradient, output_cotangents
from tests.approx.test_kfac import Tied, WithNorm
from tests.exact.test_tied import TiedAutoencoder, TiedModules

EXACT = 1e-12


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _autograd(prob: cl.Problem) -> tuple[torch.Tensor, torch.Tensor]:
    theta = prob.theta.detach().clone().requires_grad_(True)
    loss = prob.loss_fn(prob.output(theta), prob.y)  # the user's loss, not curvlab's formula for it
    (g,) = torch.autograd.grad(loss, theta)
    return loss.detach(), g


class ScaledOutput(nn.Module):
    """A linear layer followed by a raw trainable parameter (a per-output scale): a generic parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 3)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 3))

    def forward(self, x):
        return self.lin(torch.tanh(x)) * self.scale


def _custom(model: nn.Module, d_in: int, d_out: int, loss_fn: nn.Module, n: int = 9) -> cl.Problem:
    torch.manual_seed(3)
    model = model.double()
    X = torch.randn(n, d_in, dtype=torch.float64)
    y = torch.randint(0, d_out, (n,)) if isinstance(loss_fn, nn.CrossEntropyLoss) else \
        torch.randn(n, d_out, dtype=torch.float64)
    return cl.Problem(model, loss_fn, X, y)


PROBLEMS = {
    "digits-mlp": lambda: cl.problems.load("digits-mlp", n=48, seed=1),
    "digits-cnn": lambda: cl.problems.load("digits-cnn", n=12, seed=1),
    "digits-autoencoder": lambda: cl.problems.load("digits-autoencoder", n=16, seed=1),
    "layernorm": lambda: _custom(WithNorm(), 4, 2, nn.CrossEntropyLoss()),
    "raw-parameter": lambda: _custom(ScaledOutput(), 6, 3, nn.MSELoss(reduction="sum")),
    "tied-modules": lambda: _custom(TiedModules(), 8, 8, nn.MSELoss()),
    "tied-autoencoder": lambda: _custom(TiedAutoencoder(), 6, 6, nn.MSELoss()),
    "layer-applied-twice": lambda: _custom(Tied(), 4, 2, nn.CrossEntropyLoss()),
}


@pytest.mark.parametrize("name", list(PROBLEMS))
@pytest.mark.parametrize("fisher", ["type2", "mc", "empirical"])
def test_fused_gradient_is_autograds(name, fisher):
    prob = PROBLEMS[name]()
    cot = output_cotangents(prob, fisher, samples=2, seed=5)
    cap, loss, g = capture_with_gradient(prob, cot)
    loss_ref, g_ref = _autograd(prob)
    assert rel(g, g_ref) < EXACT
    assert float(abs(loss - loss_ref)) <= EXACT * float(abs(loss_ref))
    # the capture is the plain one: the gradient's cotangent is gone from every piece
    plain = capture(prob, cot)
    assert [(p.start, p.stop, type(p)) for p in cap.pieces] == [(p.start, p.stop, type(p)) for p in plain.pieces]
    for p, q in zip(cap.pieces, plain.pieces):
        pairs = [(p.rows, q.rows)] if isinstance(p, GenericRows) else [(p.a, q.a), (p.g, q.g)]
        for x, y in pairs:
            assert x.shape == y.shape and rel(x, y) < EXACT


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_fused_gradient_from_the_empirical_cotangent(name):
    """The empirical Fisher's cotangent √R ∇_f ℓ_n is ∇_f L / √R: the gradient is read off it (loss_row = √R),
    nothing is appended, and the capture is the plain one."""
    prob = PROBLEMS[name]()
    cot = output_cotangents(prob, "empirical")
    cap, _, g = capture_with_gradient(prob, cot, loss_row=prob.loss_scale**0.5)
    assert rel(g, _autograd(prob)[1]) < EXACT
    plain = capture(prob, cot)
    for p, q in zip(cap.pieces, plain.pieces):
        x, y = (p.rows, q.rows) if isinstance(p, GenericRows) else (p.g, q.g)
        assert x.shape == y.shape and rel(x, y) < EXACT
    col = collect(prob, "empirical", unsupported="exact", gradient=True)
    assert rel(col.gradient, _autograd(prob)[1]) < EXACT


@pytest.mark.parametrize("name", ["digits-mlp", "digits-cnn", "tied-modules"])
def test_fused_gradient_without_statistics_cotangents(name):
    """No statistics cotangents (FOOF's forward-only pass): the one cotangent is the loss's, a plain backward."""
    prob = PROBLEMS[name]()
    cap, loss, g = capture_with_gradient(prob, lambda f: f.new_zeros((0, *f.shape)))
    assert rel(g, _autograd(prob)[1]) < EXACT
    assert all((p.rows if isinstance(p, GenericRows) else p.g).shape[0] == 0 for p in cap.pieces)


def test_fused_gradient_needs_every_parameter_covered():
    prob = PROBLEMS["layernorm"]()
    _, _, g = capture_with_gradient(prob, output_cotangents(prob, "type2"), generic=False)
    assert g is None


@pytest.mark.parametrize("name", ["digits-mlp", "layernorm", "layer-applied-twice"])
def test_collect_with_gradient(name):
    prob = PROBLEMS[name]()
    col = collect(prob, "type2", unsupported="exact", gradient=True)
    assert rel(col.gradient, _autograd(prob)[1]) < EXACT
    plain = collect(prob, "type2", unsupported="exact")
    assert plain.gradient is None and plain.loss is None
    assert rel(col.exact_block(col.plans[0].block).to_dense(), plain.exact_block(plain.plans[0].block).to_dense()) \
        < EXACT


def _forward_counter(model: nn.Module) -> list[int]:
    calls = [0]
    model.register_forward_pre_hook(lambda m, inp: calls.__setitem__(0, calls[0] + 1))
    return calls


def _trajectory(method: str, fused: bool, steps: int = 5, prob_name: str = "digits-mlp", **options):
    prob = PROBLEMS[prob_name]()
    model = PROBLEMS[prob_name]().model
    calls = _forward_counter(model)
    opt = optim.make(method, model, prob.loss_fn, **options)
    opt.preconditioner.fused_gradient = fused
    thetas, losses, forwards = [], [], []
    for ix in optim.batches(prob.num_samples, prob.num_samples // 2, steps, seed=0):
        before = calls[0]
        losses.append(opt.step(prob.X[ix], prob.y[ix]))
        forwards.append(calls[0] - before)
        thetas.append(opt.theta())
    return thetas, losses, forwards


KRON = ["kfac", "ekfac", "tkfac", "tekfac", "foof", "kfac-2l-nicolaides"]


@pytest.mark.parametrize("method", KRON)
def test_fused_step_takes_the_two_pass_step(method):
    """Same θ and losses along a trajectory (refreshes, averages, momentum, clipping included), with one
    forward pass per step instead of two."""
    options = {"inverse_period": 2, "lr": 0.05}
    fused, loss_f, fw_f = _trajectory(method, True, **options)
    plain, loss_p, fw_p = _trajectory(method, False, **options)
    for a, b in zip(fused, plain):
        assert rel(a, b) < EXACT
    assert loss_f == pytest.approx(loss_p, rel=EXACT)
    fw_f, fw_p = fw_f[1:], fw_p[1:]  # the first step also builds the Problem and surveys the layers
    if method.startswith("kfac-2l"):  # its coarse space takes passes of its own
        assert all(f < p for f, p in zip(fw_f, fw_p))
    else:
        assert fw_f == [1] * len(fw_f) and fw_p == [2] * len(fw_p)


@pytest.mark.parametrize("options", [{"stats_period": 2, "inverse_period": 4}, {"curvature_fraction": 0.5},
                                     {"fisher": "mc", "mc_samples": 2}, {"fisher": "empirical"},
                                     {"weight_decay": 1e-2}])
def test_fused_step_with_other_options(options):
    """Steps without statistics (stats_period > 1) and a curvature batch other than the step batch take a
    plain gradient pass; the trajectory is the two-pass one in every case."""
    fused, _, fw = _trajectory("kfac", True, steps=6, lr=0.05, **options)
    plain, _, fw_plain = _trajectory("kfac", False, steps=6, lr=0.05, **options)
    for a, b in zip(fused, plain):
        assert rel(a, b) < EXACT
    if "stats_period" in options:  # statistics at even steps: there the fused pass saves one forward
        assert fw[1:] == [1] * 5 and fw_plain[1:] == [1, 2, 1, 2, 1]


def test_fused_step_with_an_exact_block():
    fused, _, fw = _trajectory("kfac", True, prob_name="layernorm", unsupported="exact", lr=0.05)
    plain, _, _ = _trajectory("kfac", False, prob_name="layernorm", unsupported="exact", lr=0.05)
    for a, b in zip(fused, plain):
        assert rel(a, b) < EXACT


# ---------------------------------------------------------------------------------------------- cached inverse
RULES = ["own", "exact", "pi", "factored", "trace"]


@pytest.mark.parametrize("method", ["kfac", "ekfac", "tkfac", "tekfac", "foof"])
@pytest.mark.parametrize("rule", RULES)
def test_damped_inverse_is_the_checked_solve(method, rule):
    prob = PROBLEMS["digits-mlp"]()
    g = prob.gradient()
    for partition in ("module", "all"):  # "all": one block of several layers (a nested approximation)
        p = cl.Problem(prob.model, prob.loss_fn, prob.X, prob.y, partition=partition)
        C = getattr(cl.approx, method)(p)
        ref = C.direction(g, 0.1, mode=rule)
        assert rel(-(C.inverse(0.1, rule) @ g), ref) < EXACT


@pytest.mark.parametrize("rule", ["own", "exact"])
def test_damped_inverse_with_an_exact_block(rule):
    prob = PROBLEMS["layernorm"]()
    g = prob.gradient()
    C = cl.approx.kfac(prob, unsupported="exact")
    assert rel(-(C.inverse(0.1, rule) @ g), C.direction(g, 0.1, mode=rule)) < EXACT


@pytest.mark.parametrize("method", ["kfac", "ekfac", "tkfac", "foof"])
def test_cached_inverse_takes_the_solve_step(method):
    """Between refreshes the direction comes from the cached inverse; the steps are the matrix's solves,
    also after the damping changes."""
    prob = PROBLEMS["digits-mlp"]()
    opt = optim.make(method, PROBLEMS["digits-mlp"]().model, prob.loss_fn, lr=0.05, momentum=0.0, kl_clip=None,
                     inverse_period=3)
    pre = opt.preconditioner
    inverses = []
    for step, ix in enumerate(optim.batches(prob.num_samples, 24, 6, seed=0)):
        if step == 4:
            pre.damping = 0.05
        batch = prob.with_batch(prob.X[ix], prob.y[ix], opt.theta())
        before = opt.theta()
        opt.step(prob.X[ix], prob.y[ix])
        ref = opt.curvature().direction(batch.gradient(), pre.damping, mode="own")
        assert rel((opt.theta() - before) / 0.05, ref) < 1e-10, step
        inverses.append(pre._inverse)
    rebuilt = [step for step in range(6) if step == 0 or inverses[step] is not inverses[step - 1]]
    assert rebuilt == [0, 3, 4]  # at each refresh (every 3 steps) and when the damping changed


@pytest.mark.parametrize("method", ["kfac", "ekfac", "tkfac", "tekfac", "foof"])
@pytest.mark.parametrize("rule", RULES)
def test_damped_inverse_refuses_where_the_checked_solve_refuses(method, rule):
    """Undamped factors of a batch of 6 samples are singular (A has rank ≤ 6 < 65): the inverse the
    optimizer steps with refuses exactly as the matrix's checked solve does."""
    prob = PROBLEMS["digits-mlp"]()
    p = prob.with_batch(prob.X[:6], prob.y[:6])
    C = getattr(cl.approx, method)(p)
    g = p.gradient()
    for op in (lambda: C.direction(g, 0.0, mode=rule), lambda: C.inverse(0.0, rule) @ g):
        with pytest.raises(ValueError, match="singular"):
            op()


# ---------------------------------------------------------------------------------------------- K-BFGS passes
class InplaceReluNet(nn.Module):
    """An in-place activation right after a layer: the recorded pre-activations must stay untouched."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.b(torch.relu_(self.a(x)))


@pytest.mark.parametrize("name", ["digits-mlp", "digits-cnn", "inplace-relu"])
@pytest.mark.parametrize("input_factors", [True, False])
def test_layer_pass_is_kbfgs_statistics(name, input_factors):
    from curvlab.approx.kbfgs import kbfgs_statistics
    from curvlab.optim.passes import layer_pass

    prob = _custom(InplaceReluNet(), 5, 3, nn.CrossEntropyLoss()) if name == "inplace-relu" else PROBLEMS[name]()
    fast = layer_pass(prob, prob.theta, input_factors)
    ref = kbfgs_statistics(prob, prob.theta, input_factors=input_factors)
    assert rel(fast.gradient, _autograd(prob)[1]) < EXACT and rel(fast.gradient, ref.gradient) < EXACT
    assert fast.loss == pytest.approx(ref.loss, rel=EXACT) and fast.num_samples == ref.num_samples
    assert list(fast.layers) == list(ref.layers)
    for n, st in fast.layers.items():
        r = ref.layers[n]
        for field in ("input_mean", "input_factor", "preact_mean", "preact_grad_sum"):
            x, y = getattr(st, field), getattr(r, field)
            assert (x is None) == (y is None) == (field == "input_factor" and not input_factors)
            if x is not None:
                assert rel(x, y) < EXACT, (n, field)


@pytest.mark.parametrize("name", ["digits-mlp", "digits-cnn"])
def test_layer_pass_without_gradient_keeps_the_pairs(name):
    """The pass after a K-BFGS step (``gradient=False``) gives the same z̄, ḡ, h̄ and loss, and no gradient."""
    from curvlab.optim.passes import layer_pass

    prob = PROBLEMS[name]()
    full = layer_pass(prob, prob.theta, False)
    pairs = layer_pass(prob, prob.theta, False, gradient=False)
    assert pairs.gradient is None and full.gradient is not None and pairs.loss == full.loss
    for n, st in pairs.layers.items():
        for field in ("input_mean", "preact_mean", "preact_grad_sum"):
            assert torch.equal(getattr(st, field), getattr(full.layers[n], field)), (n, field)


class SometimesTwice(nn.Module):
    """Applies its last layer twice once ``twice`` is set: a layer count that changes after the survey."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 4), nn.Linear(4, 4)
        self.twice = False

    def forward(self, x):
        h = self.b(torch.tanh(self.a(x)))
        return self.b(h) if self.twice else h


def test_layer_pass_declines_a_layer_applied_twice():
    """The pass returns None (and K-BFGS falls back to kbfgs_statistics, whose checks raise) when a layer
    is not called exactly once on these data."""
    from curvlab.optim.passes import layer_pass

    prob = _custom(SometimesTwice(), 5, 4, nn.MSELoss())
    assert layer_pass(prob, prob.theta) is not None  # surveyed (and cached) with one call per layer
    prob.model.twice = True
    assert layer_pass(prob, prob.theta) is None


@pytest.mark.parametrize("method", ["kbfgs", "kbfgs-l"])
@pytest.mark.parametrize("name", ["digits-mlp", "digits-cnn"])
def test_kbfgs_plain_passes_take_the_same_steps(method, name):
    def trajectory(plain: bool) -> list[torch.Tensor]:
        prob = PROBLEMS[name]()
        opt = optim.make(method, PROBLEMS[name]().model, prob.loss_fn, lr=0.1)
        opt.preconditioner.plain_passes = plain
        out = []
        for ix in optim.batches(prob.num_samples, prob.num_samples // 2, 5, seed=0):
            opt.step(prob.X[ix], prob.y[ix])
            out.append(opt.theta())
        return out

    for a, b in zip(trajectory(True), trajectory(False)):
        assert rel(a, b) < EXACT


# -- the KFAC family's statistics pass as a plain call of the model --------------------------------------
@pytest.mark.parametrize("name", ["digits-mlp", "digits-cnn", "digits-autoencoder", "tied-modules"])
@pytest.mark.parametrize("fisher", ["type2", "empirical"])
def test_plain_capture_is_capture(name, fisher):
    """capture_with_gradient(plain=True): the same pieces, loss and gradient as through functional_call."""
    from curvlab.capture import capture_plain, supported_layers

    prob = PROBLEMS[name]()
    cot = output_cotangents(prob, fisher, 1, 0)
    layers = supported_layers(prob)
    row = prob.loss_scale**0.5 if fisher == "empirical" else None
    assert capture_plain(prob, cot, layers) is not None
    ref, loss_r, grad_r = capture_with_gradient(prob, cot, layers=layers, generic=False, loss_row=row)
    cap, loss, grad = capture_with_gradient(prob, cot, layers=layers, generic=False, loss_row=row, plain=True)
    assert (grad is None) == (grad_r is None)
    if grad is not None:
        assert rel(grad, grad_r) < EXACT
    assert abs(float(loss) - float(loss_r)) <= EXACT * abs(float(loss_r))
    assert [p.start for p in cap.pieces] == [p.start for p in ref.pieces]
    for p, q in zip(cap.pieces, ref.pieces):
        assert rel(p.a, q.a) < EXACT and rel(p.g, q.g) < EXACT


def test_plain_capture_declines_a_layer_applied_twice():
    from curvlab.capture import capture_plain

    prob = _custom(SometimesTwice(), 5, 4, nn.MSELoss())
    cot = output_cotangents(prob, "type2", 1, 0)
    assert capture_plain(prob, cot) is not None  # surveyed (and cached) with one call per layer
    prob.model.twice = True
    assert capture_plain(prob, cot) is None


@pytest.mark.parametrize("method", KRON)
@pytest.mark.parametrize("name", ["digits-mlp", "digits-cnn"])
def test_plain_statistics_pass_takes_the_same_steps(method, name, monkeypatch):
    """KFAC family: trajectories with the plain statistics pass equal those through functional_call (float64)."""
    import curvlab.capture as capture_module

    taken, plain_capture = [0], capture_module.capture_plain

    def counted(*args, **kwargs):
        out = plain_capture(*args, **kwargs)
        taken[0] += out is not None
        return out

    monkeypatch.setattr(capture_module, "capture_plain", counted)

    def trajectory(plain: bool) -> tuple[list[torch.Tensor], list[float]]:
        prob = PROBLEMS[name]()
        opt = optim.make(method, PROBLEMS[name]().model, prob.loss_fn, inverse_period=2, lr=0.05)
        opt.preconditioner.plain_passes = plain
        thetas, losses = [], []
        for ix in optim.batches(prob.num_samples, prob.num_samples // 2, 5, seed=0):
            losses.append(opt.step(prob.X[ix], prob.y[ix]))
            thetas.append(opt.theta())
        return thetas, losses

    (plain, loss_p), (ref, loss_r) = trajectory(True), trajectory(False)
    assert plain[0].dtype == torch.float64 and taken[0] >= 5  # every step's statistics pass was a plain call
    for a, b in zip(plain, ref):
        assert rel(a, b) < EXACT
    assert loss_p == pytest.approx(loss_r, rel=EXACT)


def test_plain_capture_refuses_a_model_that_does_not_hold_theta():
    """capture_plain's precondition (the model's parameters are θ) is checked, not assumed."""
    from curvlab.capture import capture_plain, output_cotangents

    prob = cl.problems.load("digits-mlp", n=32)
    cot = output_cotangents(prob, "type2")
    assert capture_plain(prob, cot) is not None
    moved = prob.with_batch(prob.X, prob.y, theta=prob.theta + 1e-3)
    assert capture_plain(moved, cot) is None


def test_kbfgs_plain_pass_refuses_a_model_that_does_not_hold_theta():
    """layer_pass's precondition (the model's parameters are θ) is checked, not assumed."""
    from curvlab.optim.passes import layer_pass

    prob = cl.problems.load("digits-mlp", n=32)
    assert layer_pass(prob, prob.theta) is not None
    assert layer_pass(prob, prob.theta + 1e-3) is None


def test_fused_capture_at_another_theta_does_not_take_the_plain_call():
    """capture_with_gradient(theta=θ') with the model at θ must compute at θ', not at the model's θ."""
    prob = cl.problems.load("digits-mlp", n=32)
    other = prob.theta + 1e-2 * torch.randn(prob.num_params, dtype=prob.theta.dtype,
                                            generator=torch.Generator().manual_seed(0))
    cot = output_cotangents(prob, "type2")
    _, loss, grad = capture_with_gradient(prob, cot, theta=other, generic=False, plain=True)
    ref = prob.gradient(other)
    assert float((grad - ref).norm() / ref.norm()) < 1e-12 and abs(float(loss) - prob.loss(other)) < 1e-12


# ---------------------------------------------------------------------------------------------- fused averages
@pytest.mark.parametrize("name", ["digits-mlp", "digits-cnn"])
@pytest.mark.parametrize("method", ["kfac", "ekfac", "tkfac", "tekfac", "foof"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_accumulate_is_the_average_of_the_batch_statistics(name, method, approx):
    """Family.accumulate (the Gram factors averaged inside one GEMM) equals average(old, statistics)."""
    from curvlab.approx.statistics import FAMILIES, average, kronecker_basis

    family = FAMILIES[method]
    prob = PROBLEMS[name]()
    first = collect(prob.subset(slice(0, 5)), None if method == "foof" else "ggn", approx=approx)
    second = collect(prob.subset(slice(5, 9)), None if method == "foof" else "ggn", approx=approx)
    for p0, p1 in zip((p for plan in first.plans for p in plan.pieces),
                      (p for plan in second.plans for p in plan.pieces)):
        old = family.statistics(p0, approx, None)
        basis = kronecker_basis(old["A"], old["G"]) if family.needs_basis else None
        if basis is not None:
            old = family.statistics(p0, approx, basis)
        fused = family.accumulate(old, p1, approx, basis, 0.7)
        ref = average(old, family.statistics(p1, approx, basis), 0.7)
        assert set(fused) == set(ref)
        for k in ref:
            assert rel(fused[k], ref[k]) < EXACT, (p1.name, k)


# ---------------------------------------------------------------------------------------------- exact NG
@pytest.mark.parametrize("method", ["ng", "ng-block"])
@pytest.mark.parametrize("fisher", ["fisher_mc", "ggn", "empirical_fisher"])
@pytest.mark.parametrize("prob_name", ["digits-mlp", "digits-autoencoder", "layernorm", "layer-applied-twice"])
def test_fused_exact_natural_gradient_takes_the_two_pass_step(method, fisher, prob_name):
    """ng's Fisher pass also gives the loss and gradient (a plain model call where every parameter sits in a
    layer called once; the generic rows otherwise): the same trajectory with one pass per step fewer."""
    options = {"fisher": fisher, "inverse_period": 2 if method == "ng" else 1, "damping": 0.1, "lr": 0.5}
    fused, loss_f, fw_f = _trajectory(method, True, prob_name=prob_name, **options)
    plain, loss_p, fw_p = _trajectory(method, False, prob_name=prob_name, **options)
    for a, b in zip(fused, plain):
        assert rel(a, b) < EXACT
    assert loss_f == pytest.approx(loss_p, rel=EXACT)
    rebuilds = range(1, 5) if method == "ng-block" else (2, 4)
    assert all(fw_f[i] < fw_p[i] for i in rebuilds), (fw_f, fw_p)


def test_a_noted_theta_is_trusted_only_while_nothing_changed():
    """note_model_holds lets model_holds_theta skip the comparison; any change of a parameter (in place,
    new storage, replaced) or of θ sends it back to comparing values; the optimizer leaves no note."""
    from curvlab.capture import _HELD, forget_model_holds, model_holds_theta, note_model_holds

    prob = PROBLEMS["digits-mlp"]()
    theta = prob.theta
    wrong = theta + 1.0
    note_model_holds(prob.model, wrong)  # a false note: trusted while nothing changes …
    assert model_holds_theta(prob, wrong)
    w = prob.model[0].weight
    with torch.no_grad():
        w.add_(0.0)  # … an in-place write (version counter) sends it back to the comparison
    assert not model_holds_theta(prob, wrong) and model_holds_theta(prob, theta)
    note_model_holds(prob.model, wrong)
    w.data = w.data.clone()  # new storage, same version counter
    assert not model_holds_theta(prob, wrong)
    note_model_holds(prob.model, wrong)
    wrong.add_(0.0)  # θ itself written in place
    assert not model_holds_theta(prob, wrong)
    note_model_holds(prob.model, wrong)
    forget_model_holds(prob.model)
    assert not model_holds_theta(prob, wrong)
    opt = optim.make("kfac", PROBLEMS["digits-mlp"]().model, prob.loss_fn, lr=0.05)
    opt.step(prob.X, prob.y)
    assert opt.model not in _HELD
