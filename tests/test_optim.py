"""curvlab.optim: the preconditioning optimizer against the oracle, known-exact regimes and training."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab import optim

TOL = 1e-10


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _least_squares(n: int = 40, d: int = 5, k: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    Y = torch.randn(n, k, generator=g, dtype=torch.float64)
    torch.manual_seed(seed)
    model = nn.Linear(d, k).double()
    return model, X, Y


def _ls_solution(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    Xa = torch.cat([X, torch.ones(X.shape[0], 1, dtype=X.dtype)], 1)
    sol = torch.linalg.lstsq(Xa, Y).solution  # (d+1, k)
    return torch.cat([sol[:-1].T.reshape(-1), sol[-1]])


def test_newton_reaches_the_minimiser_of_a_quadratic_in_one_step():
    model, X, Y = _least_squares()
    opt = optim.make("newton", model, nn.MSELoss(), lr=1.0, damping=0.0)
    opt.step(X, Y)
    assert rel(opt.theta(), _ls_solution(X, Y)) < 1e-10
    opt = optim.make("newton-block", *_least_squares()[:1], nn.MSELoss(), lr=1.0, damping=0.0)
    opt.step(X, Y)  # one layer: the block-diagonal Hessian is the Hessian
    assert rel(opt.theta(), _ls_solution(X, Y)) < 1e-10


def _deep_linear_single_sample():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)).double()
    X, Y = torch.randn(1, 4, dtype=torch.float64), torch.randn(1, 2, dtype=torch.float64)
    return model, X, Y


def test_kfac_with_one_sample_takes_the_exact_block_natural_gradient_step():
    """One sample: A ⊗ G is the exact GGN block, so KFAC with exact damping is block-diagonal NG."""
    model, X, Y = _deep_linear_single_sample()
    lam = 1e-2
    prob = cl.Problem(model, nn.MSELoss(), X, Y)
    ref = cl.exact.ggn(prob, structure="block").direction(prob.gradient(), lam)
    opt = optim.make("kfac", model, nn.MSELoss(), lr=1.0, damping=lam, damping_rule="exact", momentum=0.0,
                     kl_clip=None, ema_decay=0.0, inverse_period=1, fisher="ggn")
    before = opt.theta()
    opt.step(X, Y)
    assert rel(opt.theta() - before, ref) < 1e-10
    assert rel(opt.direction(), ref) < 1e-10


@pytest.mark.parametrize("method,fisher", [("kfac", "fisher_mc"), ("kfac", "ggn"), ("ekfac", "fisher_mc"),
                                           ("ekfac", "ggn"), ("tkfac", "fisher_mc"), ("tkfac", "ggn"),
                                           ("tekfac", "ggn"), ("foof", None)])
def test_without_averaging_each_step_is_the_one_batch_approximation(method, fisher):
    """EMA decay 0, statistics and inverses every step: the curvature and the direction of every step
    are exactly ``cl.approx.<method>`` on that step's batch, with its own damping rule — for the
    sampled Fisher (the default) with the labels of seed ``seed + step``."""
    prob = cl.problems.load("digits-mlp", n=96, seed=1)
    model = cl.problems.load("digits-mlp", n=96, seed=1).model
    lam, seed = 1e-2, 5
    kw = {} if fisher is None else {"fisher": fisher}
    opt = optim.make(method, model, prob.loss_fn, lr=0.05, damping=lam, momentum=0.0, kl_clip=None,
                     ema_decay=0.0, inverse_period=1, seed=seed, **kw)
    for step, ix in enumerate(optim.batches(prob.num_samples, 32, 3, seed=0)):
        batch = prob.with_batch(prob.X[ix], prob.y[ix], opt.theta())
        K = getattr(cl.approx, method)(batch, **kw, **({"seed": seed + step} if fisher == "fisher_mc" else {}))
        d_ref = K.direction(batch.gradient(), lam, mode="own")
        before = opt.theta()
        opt.step(prob.X[ix], prob.y[ix])
        C = opt.curvature()
        assert C.block_names == K.block_names and C.method == method
        assert rel(C.to_dense(), K.to_dense()) < TOL, step
        assert rel((opt.theta() - before) / 0.05, d_ref) < 1e-9, step


def test_averaging_and_amortised_inverses():
    """With decay ρ the factors are the running averages; the matrix changes only at refresh steps."""
    prob = cl.problems.load("digits-mlp", n=96, seed=2)
    opt = optim.make("kfac", cl.problems.load("digits-mlp", n=96, seed=2).model, prob.loss_fn, lr=0.05,
                     ema_decay=0.5, inverse_period=2, momentum=0.0, kl_clip=None)
    idx = optim.batches(prob.num_samples, 32, 3, seed=0)
    Ks, mats = [], []
    for ix in idx:
        Ks.append(cl.approx.kfac(prob.with_batch(prob.X[ix], prob.y[ix], opt.theta())))
        opt.step(prob.X[ix], prob.y[ix])
        mats.append(opt.curvature())
    assert mats[1] is mats[0]  # step 1 reuses the inverse of step 0
    A = [K.blocks[0].A for K in Ks]
    expected = 0.5 * (0.5 * A[0] + 0.5 * A[1]) + 0.5 * A[2]  # refreshed at step 2
    assert rel(mats[2].blocks[0].A, expected) < TOL
    assert opt.preconditioner.refreshes == [0, 2]


def test_kl_clipping_bounds_the_predicted_change():
    prob = cl.problems.load("digits-mlp", n=64)
    opt = optim.make("kfac", cl.problems.load("digits-mlp", n=64).model, prob.loss_fn, lr=10.0, kl_clip=1e-3,
                     momentum=0.0)
    g = prob.gradient()
    opt.step(prob.X, prob.y)
    d = opt.direction()  # ν v, v the unclipped direction: the quadratic change η² ν² |vᵀg| is κ
    nu = opt.last_clip
    assert nu < 1.0
    assert opt.lr**2 * nu**2 * abs(float((d / nu) @ g)) == pytest.approx(1e-3, rel=1e-8)


METHODS = ["sgd", "adam", "rmsprop", "kfac", "ekfac", "tkfac", "tekfac", "foof", "newton-block", "kbfgs", "kbfgs-l"]
OPTIONS = {"sgd": {"lr": 0.1, "momentum": 0.9}, "adam": {"lr": 3e-3}, "rmsprop": {"lr": 1e-3},
           "newton-block": {"damping": 1.0, "lr": 0.5}}


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_digits_mlp(method):
    prob = cl.problems.load("digits-mlp", n=256, seed=0)
    steps = 20 if method == "newton-block" else 50
    ds = optim.train(prob, method, steps=steps, batch_size=64, seed=0, checkpoints=[0, steps], progress=False,
                     **OPTIONS.get(method, {}))
    loss = ds["loss"].values
    assert bool(torch.isfinite(torch.as_tensor(loss)).all())
    assert loss[-1] < 0.9 * loss[0], (method, loss[0], loss[-1])
    assert ds["theta"].shape == (2, prob.num_params)
    assert float(abs(ds["theta"].values[0] - prob.theta.numpy()).max()) == 0.0
    assert list(ds["step"].values) == list(range(steps + 1)) and ds["seconds"].values[-1] > 0
    assert ds.attrs["method"] == method and ds.attrs["problem"] == "digits-mlp"


@pytest.mark.parametrize("method", ["kfac", "ekfac", "foof", "newton-block", "kbfgs", "sgd", "adam"])
def test_curvature_is_a_matrix_aligned_with_the_oracle(method):
    prob = cl.problems.load("digits-mlp", n=64)
    opt = optim.make(method, cl.problems.load("digits-mlp", n=64).model, prob.loss_fn,
                     **({"lr": 0.01} if method in ("sgd", "adam") else {}))
    opt.step(prob.X, prob.y)
    C = opt.curvature()
    assert isinstance(C, cl.CurvatureMatrix) and C.size == prob.num_params
    if method not in ("sgd", "adam"):
        assert C.block_names == tuple(prob.partition.names)
        assert C.block_slices == tuple(prob.partition.slices)
    d = opt.direction(prob.X, prob.y)
    assert d.shape == (prob.num_params,) and bool(torch.isfinite(d).all())


def test_kbfgs_direction_is_its_curvature_solve():
    prob = cl.problems.load("digits-autoencoder", n=64)
    opt = optim.make("kbfgs", cl.problems.load("digits-autoencoder", n=64).model, prob.loss_fn, momentum=0.0,
                     weight_decay=0.0)
    for _ in range(3):
        opt.step(prob.X, prob.y)
    batch = prob.with_batch(prob.X, prob.y, opt.theta())
    g = batch.gradient()
    assert rel(opt.direction(prob.X, prob.y), opt.curvature().direction(g, 0.0)) < 1e-9
    counters = opt.state_summary()["counters"]
    assert all(c["pairs"] == 3 for c in counters.values())


def test_closure_and_step_semantics():
    prob = cl.problems.load("diabetes-mlp", n=32)
    opt = optim.make("kfac", cl.problems.load("diabetes-mlp", n=32).model, prob.loss_fn)
    loss = opt.step(closure=lambda: (prob.X, prob.y))
    assert math.isfinite(loss)
    with pytest.raises(ValueError, match="closure must return the minibatch"):
        opt.step(closure=lambda: torch.tensor(1.0))
    with pytest.raises(ValueError, match="needs a minibatch"):
        opt.step()
    with pytest.raises(ValueError, match="batch's samples have shapes"):
        opt.step(prob.X[:, :3], prob.y)


class WithNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.norm, self.b = nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2)

    def forward(self, x):
        return self.b(self.norm(self.a(x)))


@pytest.mark.parametrize("method,options,match", [
    ("kfac", {"damping": -1.0}, "damping must be finite and ≥ 0"),
    ("kfac", {"damping_rule": "heuristic"}, "unknown damping_rule 'heuristic'"),
    ("kfac", {"fisher": "true"}, "unknown fisher 'true'"),
    ("kfac", {"ema_decay": 1.5}, "ema_decay"),
    ("kfac", {"inverse_period": 0}, "inverse_period must be a positive integer"),
    ("kfac", {"lr": 0.0}, "lr must be finite and > 0"),
    ("kfac", {"momentum": 1.0}, "momentum must be < 1"),
    ("kfac", {"betas": (0.9, 0.99)}, "unknown option"),
    ("kbfgs", {"damping": 0.0}, "damping must be finite and > 0"),
    ("newton", {"hessian_rule": "saddle"}, "unknown hessian_rule"),
    ("lbfgs", {}, "unknown training method 'lbfgs'"),
])
def test_bad_options_raise_before_any_step(method, options, match):
    with pytest.raises(ValueError, match=match):
        optim.make(method, nn.Linear(3, 2), nn.MSELoss(), **options)


@pytest.mark.parametrize("method", ["kfac", "foof", "kbfgs"])
def test_unsupported_layers_raise_before_any_step(method):
    with pytest.raises(ValueError, match=r"'norm.weight' \(LayerNorm"):
        optim.make(method, WithNorm().double(), nn.CrossEntropyLoss())


def test_tied_weights_raise_at_the_first_step_before_any_update():
    from tests.exact.test_tied import TiedModules

    model = TiedModules().double()
    before = [p.detach().clone() for p in model.parameters()]
    opt = optim.make("kfac", model, nn.MSELoss())
    with pytest.raises(ValueError, match="linear1.weight"):
        opt.step(torch.rand(4, 8, dtype=torch.float64), torch.rand(4, 8, dtype=torch.float64))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_train_arguments_are_checked():
    prob = cl.problems.load("diabetes-mlp", n=32)
    with pytest.raises(ValueError, match="checkpoints must lie"):
        optim.train(prob, "kfac", steps=5, checkpoints=[7], progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        optim.train(prob, "kfac", steps=5, batch_size=0, progress=False)
    with pytest.raises(TypeError, match="curvlab.Problem"):
        optim.train("digits", "kfac", steps=5)


def test_train_is_reproducible_and_leaves_the_problem_alone():
    prob = cl.problems.load("diabetes-mlp", n=64)
    theta = prob.theta.clone()
    a = optim.train(prob, "kfac", steps=8, batch_size=16, seed=3, progress=False)
    b = optim.train(prob, "kfac", steps=8, batch_size=16, seed=3, progress=False)
    assert (a["loss"].values == b["loss"].values).all()
    assert torch.equal(prob.theta, theta)
    assert a["loss"].attrs["units"] == "loss"


def test_ng_reaches_the_least_squares_solution_in_one_step():
    """A model linear in θ with squared error: GGN = Hessian, so NG with λ → 0 and lr 1 is Newton."""
    model, X, Y = _least_squares()
    opt = optim.make("ng", model, nn.MSELoss(), lr=1.0, damping=1e-12, fisher="ggn")
    opt.step(X, Y)
    assert rel(opt.theta(), _ls_solution(X, Y)) < 1e-8


@pytest.mark.parametrize("fisher", ["ggn", "fisher_mc"])
@pytest.mark.parametrize("method,structure", [("ng", "full"), ("ng-block", "block")])
def test_ng_step_is_the_dense_damped_ggn_solve_of_the_batch(method, structure, fisher):
    """The step is the oracle's dense (F + λI)⁻¹g on the batch: F the GGN, or the sampled-label Fisher
    (the default) with the same labels (seed ``seed + step``)."""
    prob = cl.problems.load("digits-mlp", n=128, seed=3)
    lam, seed = 1e-2, 7
    opt = optim.make(method, cl.problems.load("digits-mlp", n=128, seed=3).model, prob.loss_fn, lr=1.0, damping=lam,
                     fisher=fisher, seed=seed)
    ix = optim.batches(prob.num_samples, 48, 1, seed=0)[0]
    batch = prob.with_batch(prob.X[ix], prob.y[ix])
    F = cl.exact.ggn(batch, structure=structure) if fisher == "ggn" else \
        cl.exact.fisher_mc(batch, structure=structure, mc_samples=1, seed=seed)
    ref = F.direction(batch.gradient(), lam)
    before = opt.theta()
    opt.step(prob.X[ix], prob.y[ix])
    assert rel(opt.theta() - before, ref) < 1e-9
    assert opt.curvature().structure in ("low_rank", "block[low_rank]")


@pytest.mark.parametrize("method", ["ng", "ng-block"])
def test_ng_trains_digits_mlp(method):
    prob = cl.problems.load("digits-mlp", n=256, seed=0)
    ds = optim.train(prob, method, steps=50, batch_size=64, seed=0, progress=False)  # the defaults
    loss = ds["loss"].values
    assert bool(torch.isfinite(torch.as_tensor(loss)).all()) and loss[-1] < 0.9 * loss[0]


@pytest.mark.parametrize("method", ["kfac", "foof", "ekfac"])
def test_float32_kronecker_methods_take_their_default_damping(method):
    """Regression: a singularity tolerance of size·ε·scale refused KFAC's λ = 1e-2 in float32 (a damped
    eigenvalue of exactly λ); √size·ε·scale accepts it and still refuses singular systems."""
    prob = cl.problems.load("digits-cnn", n=128, dtype=torch.float32)
    ds = optim.train(prob, method, steps=12, batch_size=128, progress=False,
                     **({"inverse_period": 1, "ema_decay": 0.0} if method == "ekfac" else {}))
    assert bool(torch.isfinite(torch.as_tensor(ds["loss"].values)).all())


def test_a_non_finite_update_raises_before_the_model_changes():
    """A direction that overflows (or non-finite statistics in the solve) raises FloatingPointError naming the
    method and step, and leaves the model's parameters as they were."""
    prob = cl.problems.load("digits-mlp", n=64)
    for failure in ("direction", "statistics"):
        model = cl.problems.load("digits-mlp", n=64).model
        opt = optim.make("kfac", model, prob.loss_fn, lr=0.05)
        opt.step(prob.X[:32], prob.y[:32])
        before = opt.theta()
        if failure == "direction":
            opt.preconditioner.direction = lambda g: torch.full_like(g, float("inf"))
        else:
            def overflow(g):
                raise FloatingPointError("EigenKron: its damped eigenvalues are not finite")
            opt.preconditioner.direction = overflow
        with pytest.raises(FloatingPointError, match="kfac.*step 1"):
            opt.step(prob.X[32:], prob.y[32:])
        assert torch.equal(opt.theta(), before), failure


@pytest.mark.parametrize("method", ["sgd", "adam", "kfac", "ng", "kbfgs"])
def test_every_step_checks_its_batch(method):
    """A NaN in a later minibatch, or a sample of another shape, raises ValueError before any update."""
    prob = cl.problems.load("digits-mlp", n=64)
    opt = optim.make(method, cl.problems.load("digits-mlp", n=64).model, prob.loss_fn,
                     **({"lr": 0.1} if method == "sgd" else {}))
    opt.step(prob.X[:32], prob.y[:32])
    before = opt.theta()
    X = prob.X[32:].clone()
    X[3, 5] = float("nan")
    with pytest.raises(ValueError, match="X contains NaN"):
        opt.step(X, prob.y[32:])
    with pytest.raises(ValueError, match="shapes"):
        opt.step(prob.X[32:, :10], prob.y[32:])
    assert torch.equal(opt.theta(), before)


def test_train_records_every_option_in_effect():
    """The dataset's attributes hold the method's defaults as well as the options given (option_*)."""
    prob = cl.problems.load("digits-mlp", n=64)
    ds = optim.train(prob, "kfac", steps=1, batch_size=32, progress=False, damping=0.05)
    assert ds.attrs["option_fisher"] == "fisher_mc" and ds.attrs["option_damping"] == 0.05
    assert ds.attrs["option_inverse_period"] == 10 and ds.attrs["option_lr"] == 0.1
    sgd = optim.train(prob, "sgd", steps=1, batch_size=32, progress=False, lr=0.2)
    assert sgd.attrs["option_lr"] == 0.2 and sgd.attrs["option_momentum"] == 0
