"""GroupedNewton (Wolinski, arXiv 2312.03885): summaries against dense derivatives, extremes, invariance, solver paths.

References are independent of the implementation: the dense Hessian (double backward,
``curvlab.reference.hessian``) and the full P×P×P third-derivative tensor by ``torch.func`` (forward over
forward over reverse), projected onto the subsets with a 0/1-times-u matrix built here from parameter names.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.optimize
import torch
from torch import nn

import curvlab as cl
from curvlab.approx.grouped_newton import STATUSES, cubic_learning_rates

DT = torch.float64


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


class Gained(nn.Module):
    """tanh MLP 3-4-3 times a scalar gain: a parameter that is neither a weight nor a bias (listed first)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
        self.gain = nn.Parameter(torch.tensor([1.3]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * self.gain


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ce_problem() -> cl.Problem:
    torch.manual_seed(1)
    X = torch.randn(12, 3, generator=_gen(2), dtype=DT)
    return cl.Problem(Gained().double(), nn.CrossEntropyLoss(), X, torch.randint(0, 3, (12,), generator=_gen(3)))


def mse_problem() -> cl.Problem:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    return cl.Problem(model, nn.MSELoss(), torch.randn(10, 3, generator=_gen(5), dtype=DT),
                      torch.randn(10, 2, generator=_gen(6), dtype=DT))


#: expected subsets (parameter names) of each named partition of the two problems
CE_PARTITIONS = {
    "canonical": [["gain"], ["net.0.weight"], ["net.0.bias"], ["net.2.weight"], ["net.2.bias"]],
    "layer": [["gain"], ["net.0.weight", "net.0.bias"], ["net.2.weight", "net.2.bias"]],
    "trivial": [["gain", "net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"]],
    "wb": [["net.0.weight", "net.2.weight"], ["net.0.bias", "net.2.bias"], ["gain"]],
    "custom": [["net.2.bias", "net.0.weight"], ["gain", "net.0.bias", "net.2.weight"]],
}
MSE_PARTITIONS = {
    "canonical": [["0.weight"], ["0.bias"], ["2.weight"], ["2.bias"]],
    "layer": [["0.weight", "0.bias"], ["2.weight", "2.bias"]],
    "trivial": [["0.weight", "0.bias", "2.weight", "2.bias"]],
    "wb": [["0.weight", "2.weight"], ["0.bias", "2.bias"]],
    "custom": [["0.bias", "2.weight"], ["2.bias"], ["0.weight"]],
}
PROBLEMS = {"ce": (ce_problem, CE_PARTITIONS), "mse": (mse_problem, MSE_PARTITIONS)}


class Reference:
    """Dense g, H and the third-derivative tensor T of a tiny problem, and their projections on subsets."""

    def __init__(self, prob: cl.Problem) -> None:
        theta = prob.theta.detach()
        self.prob = prob
        self.g = prob.gradient()
        self.H = cl.reference.hessian(prob)
        self.T = torch.func.jacfwd(torch.func.hessian(prob.loss_tensor))(theta)

    def lift(self, subsets: list[list[str]], u: torch.Tensor) -> torch.Tensor:
        """The S×P matrix I_{S:P} U: row i is u on the coordinates of subset i, zero elsewhere."""
        Ubar = torch.zeros(len(subsets), self.prob.num_params, dtype=DT)
        for i, names in enumerate(subsets):
            for n in names:
                s = self.prob.param_slices[n]
                Ubar[i, s] = u[s]
        return Ubar

    def summaries(self, subsets: list[list[str]], u: torch.Tensor):
        Ubar = self.lift(subsets, u)
        T3 = torch.einsum("pqr,ip,jq,kr->ijk", self.T, Ubar, Ubar, Ubar)
        return Ubar @ self.H @ Ubar.T, Ubar @ self.g, T3


_REFS: dict[str, Reference] = {}


def reference(key: str) -> Reference:
    if key not in _REFS:
        _REFS[key] = Reference(PROBLEMS[key][0]())
    return _REFS[key]


def direction(prob: cl.Problem, seed: int = 7) -> torch.Tensor:
    return torch.randn(prob.num_params, generator=_gen(seed), dtype=DT)


def spec(key: str, kind: str):
    return PROBLEMS[key][1][kind] if kind == "custom" else kind


# ---------------------------------------------------------------------------------------------- exactness
def test_reference_third_tensor_is_symmetric_and_differentiates_the_hessian():
    ref = reference("ce")
    T = ref.T
    for perm in itertools.permutations(range(3)):
        assert rel(T.permute(perm), T) < 1e-12
    v, t = direction(ref.prob, 1), 1e-4
    Hp = cl.reference.hessian(ref.prob.at(ref.prob.theta + t * v))
    Hm = cl.reference.hessian(ref.prob.at(ref.prob.theta - t * v))
    assert rel((Hp - Hm) / (2 * t), torch.einsum("pqr,r->pq", T, v)) < 1e-6  # central difference, O(t²)


@pytest.mark.parametrize("key", sorted(PROBLEMS))
@pytest.mark.parametrize("kind", ["canonical", "layer", "trivial", "wb", "custom"])
def test_summaries_equal_projections_of_dense_derivatives(key, kind):
    ref = reference(key)
    u = direction(ref.prob)
    S = cl.approx.grouped_newton(ref.prob, direction=u, partition=spec(key, kind), order=3)
    expected = PROBLEMS[key][1][kind]
    assert [list(p) for p in S.subset_params] == expected
    assert S.partition == kind and S.num_subsets == len(expected) and S.active.all()
    H, g, T3 = ref.summaries(expected, u)
    assert rel(S.hessian, H) < 1e-10
    assert rel(S.gradient, g) < 1e-10
    assert rel(S.third, torch.diagonal(torch.diagonal(T3)).clone()) < 1e-10
    assert torch.equal(S.hessian, S.hessian.T)
    S2 = cl.approx.grouped_newton(ref.prob, direction=u, partition=spec(key, kind), order=2)
    assert S2.third is None
    assert rel(S2.hessian, H) < 1e-10 and rel(S2.gradient, g) < 1e-10


@pytest.mark.parametrize("key,kind", [("ce", "canonical"), ("ce", "custom"), ("mse", "layer")])
def test_third_full_equals_reference_its_diagonal_is_third_and_it_is_symmetric(key, kind):
    ref = reference(key)
    u = direction(ref.prob, 11)
    S = cl.approx.grouped_newton(ref.prob, direction=u, partition=spec(key, kind))
    _, _, T3 = ref.summaries(PROBLEMS[key][1][kind], u)
    D = S.third_full
    assert D.shape == (S.num_subsets,) * 3
    assert rel(D, T3) < 1e-10
    assert rel(torch.diagonal(torch.diagonal(D)).clone(), S.third) < 1e-12
    for perm in itertools.permutations(range(3)):
        assert rel(D.permute(perm), D) < 1e-10
    assert S.third_full is D  # computed once


def test_summaries_at_another_theta_and_with_a_dict_direction():
    prob = mse_problem()
    theta = prob.theta + 0.3 * direction(prob, 2)
    u = direction(prob, 3)
    S = cl.approx.grouped_newton(prob, direction=prob.unflatten(u), partition="layer", theta=theta)
    ref = Reference(prob.at(theta))
    H, g, T3 = ref.summaries(MSE_PARTITIONS["layer"], u)
    assert rel(S.hessian, H) < 1e-10 and rel(S.gradient, g) < 1e-10
    assert rel(S.third, torch.diagonal(torch.diagonal(T3)).clone()) < 1e-10


def test_aliases_and_problem_partition_blocks():
    prob = ce_problem()
    u = direction(prob)
    layer = cl.approx.grouped_newton(prob, u, partition="layer")
    for alias, kind in (("module", "layer"), ("per_tensor", "canonical"), ("all", "trivial")):
        S = cl.approx.grouped_newton(prob, u, partition=alias)
        assert S.partition == kind
    blocks = cl.approx.grouped_newton(prob, u, partition=prob.partition)
    assert blocks.subsets == tuple(prob.partition.names)
    assert torch.allclose(blocks.hessian, layer.hessian, rtol=1e-13, atol=0)
    assert layer.subsets == ("(root)", "net.0", "net.2")
    wb = cl.approx.grouped_newton(prob, u, partition="wb")
    assert wb.subsets == ("weight", "bias", "other")
    idx = wb.indices
    assert sorted(torch.cat(idx).tolist()) == list(range(prob.num_params))
    w0, w2 = prob.param_slices["net.0.weight"], prob.param_slices["net.2.weight"]
    assert idx[0].tolist() == list(range(w0.start, w0.stop)) + list(range(w2.start, w2.stop))


def test_zero_direction_on_a_subset_gives_zero_rows_and_zero_learning_rate():
    prob = ce_problem()
    u = direction(prob)
    u[prob.param_slices["net.0.bias"]] = 0
    S = cl.approx.grouped_newton(prob, u, partition="canonical")
    assert S.active.tolist() == [True, True, False, True, True]
    assert torch.all(S.hessian[2] == 0) and torch.all(S.hessian[:, 2] == 0)
    assert S.gradient[2] == 0 and S.third[2] == 0
    lr = S.learning_rates(1.0)
    keep = torch.tensor([0, 1, 3, 4])
    sub = cubic_learning_rates(S.hessian[keep][:, keep], S.gradient[keep], S.third[keep], 1.0)
    assert lr.ok and lr.eta[2] == 0
    assert torch.allclose(lr.eta[keep], sub.eta, rtol=1e-13, atol=0)
    assert torch.equal(lr.active, S.active)


def test_zero_direction_everywhere():
    prob = ce_problem()
    S = cl.approx.grouped_newton(prob, torch.zeros(prob.num_params, dtype=DT), partition="layer")
    assert torch.all(S.hessian == 0) and torch.all(S.gradient == 0)
    lr = S.learning_rates()
    assert lr.status == "zero_direction" and not lr.ok and torch.all(lr.eta == 0)


# ---------------------------------------------------------------------------------------------- extremes
def test_trivial_partition_is_the_exact_line_search_of_the_quadratic_model():
    ref = reference("mse")
    u = ref.g + 0.5 * direction(ref.prob, 5)
    S = cl.approx.grouped_newton(ref.prob, u, partition="trivial")
    curv, slope = float(u @ ref.H @ u), float(ref.g @ u)
    assert curv > 0  # precondition: the quadratic model along u has a minimiser
    lr = S.learning_rates(0.0)
    assert lr.status == "newton"
    eta = float(lr.eta[0])
    assert abs(eta - slope / curv) < 1e-10 * abs(slope / curv)
    # q(t) = L(θ) − t gᵀu + ½ t² uᵀHu is stationary (and minimal) at t = η: q'(η) = 0
    assert abs(-slope + eta * curv) < 1e-10 * abs(slope)
    assert rel(S.step(lr.eta), -eta * u) < 1e-15


def test_trivial_partition_cubic_step_has_the_closed_form():
    ref = reference("mse")
    u = ref.g
    S = cl.approx.grouped_newton(ref.prob, u, partition="trivial")
    h, gb, c = float(S.hessian[0, 0]), float(S.gradient[0]), abs(float(S.third[0]))
    lam = 3.0
    lr = S.learning_rates(lam)
    # S = 1, η > 0: ḡ = hη + (λ/2) c η² with c = |D⁽³⁾| = d³
    eta = (-h + np.sqrt(h * h + 2 * lam * c * gb)) / (lam * c)
    assert lr.status == "cubic" and abs(float(lr.eta[0]) - eta) < 1e-10 * eta


def _linear_problem(loss: str) -> cl.Problem:
    torch.manual_seed(8)
    X = torch.randn(20, 3, generator=_gen(9), dtype=DT)
    if loss == "mse":
        return cl.Problem(nn.Linear(3, 1).double(), nn.MSELoss(), X, torch.randn(20, 1, generator=_gen(10), dtype=DT))
    y = (torch.rand(20, 1, generator=_gen(10), dtype=DT) > 0.5).to(DT)
    return cl.Problem(nn.Linear(3, 1).double(), nn.BCEWithLogitsLoss(), X, y)


@pytest.mark.parametrize("loss", ["mse", "logistic"])
def test_scalar_partition_with_minus_gradient_is_newtons_method(loss):
    prob = _linear_problem(loss)
    g, H = prob.gradient(), cl.reference.hessian(prob)
    assert torch.linalg.eigvalsh(H).min() > 0 and torch.all(g != 0)
    S = cl.approx.grouped_newton(prob, -g, partition="scalar")
    assert S.num_subsets == prob.num_params and S.subsets[0] == "weight[0]"
    newton = prob.theta - torch.linalg.solve(H, g)
    lr = S.learning_rates(0.0)
    assert lr.status == "newton"
    assert rel(prob.theta + S.step(lr.eta), newton) < 1e-10
    if loss == "mse":  # quadratic loss: D = 0, so the cubic term vanishes and r = 0 is the root
        assert torch.all(S.third.abs() < 1e-14)
        cubic = S.learning_rates(1.0)
        assert cubic.status == "cubic" and cubic.r == 0 and cubic.d_singular
        assert rel(prob.theta + S.step(cubic.eta), newton) < 1e-10


# ---------------------------------------------------------------------------------------------- invariance
class ScaledMLP(nn.Module):
    """tanh MLP 3-4-3 whose first weight is W₁ = α φ₁ + β (φ₁ is the parameter)."""

    def __init__(self, alpha: float, beta: float) -> None:
        super().__init__()
        self.alpha, self.beta = alpha, beta
        self.w1 = nn.Parameter(torch.zeros(4, 3, dtype=DT))
        self.b1 = nn.Parameter(torch.zeros(4, dtype=DT))
        self.w2 = nn.Parameter(torch.zeros(3, 4, dtype=DT))
        self.b2 = nn.Parameter(torch.zeros(3, dtype=DT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(x @ (self.alpha * self.w1 + self.beta).T + self.b1)
        return h @ self.w2.T + self.b2


def _scaled_problem(theta: torch.Tensor, alpha: float, beta: float) -> cl.Problem:
    model = ScaledMLP(alpha, beta)
    X, y = torch.randn(15, 3, generator=_gen(12), dtype=DT), torch.randint(0, 3, (15,), generator=_gen(13))
    prob = cl.Problem(model, nn.CrossEntropyLoss(), X, y)
    phi = theta.clone()
    s = prob.param_slices["w1"]
    phi[s] = (theta[s] - beta) / alpha
    return prob.at(phi)


@pytest.mark.parametrize("alpha,beta", [(10.0, 0.5), (0.1, -0.2)])
@pytest.mark.parametrize("damping_int", [1.0, 10.0])
def test_affine_reparameterisation_of_a_subset_leaves_the_theta_step_unchanged(alpha, beta, damping_int):
    theta = 0.8 * torch.randn(31, generator=_gen(14), dtype=DT)
    base, scaled = _scaled_problem(theta, 1.0, 0.0), _scaled_problem(theta, alpha, beta)
    S = cl.approx.grouped_newton(base, base.gradient(), partition="canonical")
    Sp = cl.approx.grouped_newton(scaled, scaled.gradient(), partition="canonical")
    A = torch.tensor([alpha**2, 1.0, 1.0, 1.0], dtype=DT)
    assert rel(Sp.hessian, A[:, None] * S.hessian * A[None, :]) < 1e-10
    assert rel(Sp.gradient, A * S.gradient) < 1e-10
    assert rel(Sp.third.abs() ** (1 / 3), A * S.third.abs() ** (1 / 3)) < 1e-10
    lr, lrp = S.learning_rates(damping_int), Sp.learning_rates(damping_int)
    assert lr.status == lrp.status == "cubic"
    assert abs(lr.r - lrp.r) < 1e-10 * lr.r
    assert rel(lrp.eta, lr.eta / A) < 1e-10
    step, stepp = S.step(lr.eta), Sp.step(lrp.eta)
    s = base.param_slices["w1"]
    stepp[s] *= alpha  # a φ₁ displacement moves W₁ by α times as much
    assert rel(stepp, step) < 1e-10


# ---------------------------------------------------------------------------------------------- the solver
def _model(H, g, d, lam):
    def m(eta):
        return -g @ eta + 0.5 * eta @ H @ eta + lam / 6 * np.linalg.norm(d * eta) ** 3
    return m


def _check_stationary_global_minimiser(H, g, third, lam, lr):
    H, g = H.numpy(), g.numpy()
    d = np.abs(third.numpy()) ** (1 / 3)
    eta = lr.eta.numpy()
    r = np.linalg.norm(d * eta)
    assert abs(r - lr.r) < 1e-12 * max(1.0, r)
    residual = -g + H @ eta + 0.5 * lam * r * d * d * eta
    assert np.linalg.norm(residual) < 1e-10 * np.linalg.norm(g)
    assert np.linalg.eigvalsh(H + 0.5 * lam * r * np.diag(d * d)).min() >= -1e-10  # the largest-‖Dη‖ root
    m = _model(H, g, d, lam)
    rng = np.random.default_rng(0)
    best = min(scipy.optimize.minimize(m, rng.normal(size=g.size) * 3, method="BFGS", tol=1e-12).fun
               for _ in range(20))
    assert m(eta) <= best + 1e-9


def _synthetic(eigs, seed=0):
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.normal(size=(len(eigs), len(eigs))))
    H = Q @ np.diag(eigs) @ Q.T
    return torch.tensor((H + H.T) / 2), torch.tensor(rng.normal(size=len(eigs)))


def test_cubic_with_positive_definite_summary():
    H, g = _synthetic([0.5, 1.0, 3.0])
    third = torch.tensor([0.7, -2.0, 0.3], dtype=DT)
    lr = cubic_learning_rates(H, g, third, 2.0)
    assert lr.status == "cubic" and lr.r0_method == "hessian_pd" and lr.r0 == 0 and lr.hessian_pd
    _check_stationary_global_minimiser(H, g, third, 2.0, lr)


def test_cubic_with_indefinite_summary_and_nonsingular_D_uses_the_analytical_r0():
    H, g = _synthetic([-1.0, 0.5, 2.0])
    third = torch.tensor([0.7, -2.0, 0.3], dtype=DT)
    lr = cubic_learning_rates(H, g, third, 1.0)
    assert lr.status == "cubic" and lr.r0_method == "analytical" and not lr.hessian_pd and not lr.d_singular
    d = third.abs() ** (1 / 3)
    assert abs(lr.r0 - 2 * abs(float(torch.linalg.eigvalsh(H / torch.outer(d, d)).min()))) < 1e-12
    assert lr.r0 < lr.r <= lr.r1
    _check_stationary_global_minimiser(H, g, third, 1.0, lr)


def test_cubic_with_indefinite_summary_and_singular_D_finds_r0_numerically():
    H = torch.tensor([[-1.0, 0.3, 0.1], [0.3, 2.0, 0.2], [0.1, 0.2, 1.5]], dtype=DT)
    g = torch.tensor([0.4, -1.0, 0.6], dtype=DT)
    third = torch.tensor([1.5, 0.0, 1e-18], dtype=DT)  # D_22 = 1e-6 ≤ 1e-5: singular
    lr = cubic_learning_rates(H, g, third, 1.0)
    assert lr.status == "cubic" and lr.r0_method == "numerical" and lr.d_singular
    d = third.abs() ** (1 / 3)
    assert abs(float(torch.linalg.eigvalsh(H + 0.5 * lr.r0 * torch.diag(d * d)).min())) < 1e-8
    _check_stationary_global_minimiser(H, g, third, 1.0, lr)


def test_negative_curvature_where_D_vanishes_has_no_r0():
    H = torch.tensor([[2.0, 0.1], [0.1, -1.0]], dtype=DT)
    lr = cubic_learning_rates(H, torch.tensor([1.0, 1.0], dtype=DT), torch.tensor([1.0, 0.0], dtype=DT), 1.0)
    assert lr.status == "no_r0" and not lr.ok and torch.all(lr.eta == 0) and "D vanishes" in lr.message


def test_hard_case_reports_no_root():
    H = torch.diag(torch.tensor([-1.0, 2.0], dtype=DT))
    g = torch.tensor([0.0, 1.0], dtype=DT)  # orthogonal to the negative-curvature eigenvector
    lr = cubic_learning_rates(H, g, torch.ones(2, dtype=DT), 1.0)
    assert lr.status == "no_root" and lr.r0_method == "analytical" and torch.all(lr.eta == 0)
    assert "hard case" in lr.message


def test_bracket_and_iteration_limits_are_reported():
    H, g, third = 1e-6 * torch.eye(2, dtype=DT), torch.ones(2, dtype=DT), torch.ones(2, dtype=DT)
    assert cubic_learning_rates(H, g, third, 1.0).status == "cubic"
    lr = cubic_learning_rates(H, g, third, 1.0, max_expansions=0)
    assert lr.status == "no_bracket" and torch.all(lr.eta == 0) and lr.r1 == 1.0
    lr = cubic_learning_rates(H, g, third, 1.0, maxiter=1)
    assert lr.status == "no_root" and "did not converge" in lr.message and torch.all(lr.eta == 0)


def test_newton_ridge_and_errors_without_cubic_term():
    H, g = _synthetic([-0.5, 1.0, 2.0])
    third = torch.ones(3, dtype=DT)
    with pytest.raises(ValueError, match="not positive definite"):
        cubic_learning_rates(H, g, third, 0.0)
    lr = cubic_learning_rates(H, g, None, 0.0, ridge=1.0)
    assert lr.status == "newton"
    assert rel(lr.eta, torch.linalg.solve(H + torch.eye(3, dtype=DT), g)) < 1e-12
    with pytest.raises(ValueError, match="order-3"):
        cubic_learning_rates(H, g, None, 1.0)
    Hpd, _ = _synthetic([0.5, 1.0, 2.0])
    assert rel(cubic_learning_rates(Hpd, g, third, 0.0).eta, torch.linalg.solve(Hpd, g)) < 1e-12


def test_order_two_summary_learning_rates():
    prob = _linear_problem("logistic")
    S = cl.approx.grouped_newton(prob, prob.gradient(), partition="canonical", order=2)
    lr = S.learning_rates()
    assert lr.status == "newton" and lr.damping_int == 0
    assert rel(lr.eta, torch.linalg.solve(S.hessian, S.gradient)) < 1e-12
    assert S.learning_rates(ridge=0.5).ridge == 0.5
    with pytest.raises(ValueError, match="order=3"):
        S.learning_rates(1.0)
    with pytest.raises(ValueError, match="order=3"):
        S.model(lr.eta, damping_int=1.0)


def test_model_value_is_the_cubic_model():
    prob = mse_problem()
    S = cl.approx.grouped_newton(prob, prob.gradient(), partition="layer")
    lr = S.learning_rates(2.0)
    m = _model(S.hessian.numpy(), S.gradient.numpy(), S.third.abs().numpy() ** (1 / 3), 2.0)
    assert abs(S.model(lr.eta, 2.0) - m(lr.eta.numpy())) < 1e-14
    assert S.model(lr.eta, 2.0) < 0  # the step decreases the model


def test_statuses_are_listed():
    assert set(STATUSES) == {"newton", "cubic", "zero_direction", "no_r0", "no_bracket", "no_root"}


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_bad_damping_raises(bad):
    H, g = _synthetic([0.5, 1.0])
    with pytest.raises(ValueError, match="damping_int"):
        cubic_learning_rates(H, g, torch.ones(2, dtype=DT), bad)
    with pytest.raises(ValueError, match="ridge"):
        cubic_learning_rates(H, g, torch.ones(2, dtype=DT), 1.0, ridge=bad)


def test_bad_solver_inputs_raise():
    H, g = _synthetic([0.5, 1.0])
    t = torch.ones(2, dtype=DT)
    with pytest.raises(TypeError, match="damping_int"):
        cubic_learning_rates(H, g, t, True)
    with pytest.raises(ValueError, match="hessian"):
        cubic_learning_rates(H.clone().fill_(float("nan")), g, t)
    with pytest.raises(ValueError, match="symmetric"):
        cubic_learning_rates(H + torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=DT), g, t)
    with pytest.raises(ValueError, match="third"):
        cubic_learning_rates(H, g, torch.ones(3, dtype=DT))
    with pytest.raises(ValueError, match="max_expansions"):
        cubic_learning_rates(H, g, t, max_expansions=-1)


def test_bad_summary_inputs_raise():
    prob = ce_problem()
    u = direction(prob)
    with pytest.raises(ValueError, match="shape"):
        cl.approx.grouped_newton(prob, u[:-1])
    bad = u.clone()
    bad[3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        cl.approx.grouped_newton(prob, bad)
    with pytest.raises(TypeError, match="direction"):
        cl.approx.grouped_newton(prob, u.tolist())
    with pytest.raises(ValueError, match="order"):
        cl.approx.grouped_newton(prob, u, order=4)
    with pytest.raises(ValueError, match="unknown partition"):
        cl.approx.grouped_newton(prob, u, partition="blocks")
    with pytest.raises(ValueError, match="missing"):
        cl.approx.grouped_newton(prob, u, partition=[["net.0.weight"], ["gain"]])
    with pytest.raises(ValueError, match="twice"):
        cl.approx.grouped_newton(prob, u, partition=[CE_PARTITIONS["trivial"][0], ["gain"]])
    with pytest.raises(ValueError, match="unknown parameters"):
        cl.approx.grouped_newton(prob, u, partition=[CE_PARTITIONS["trivial"][0] + ["nope"]])
    with pytest.raises(TypeError, match="Problem"):
        cl.approx.grouped_newton("prob", u)
    S = cl.approx.grouped_newton(prob, u, partition="layer")
    with pytest.raises(ValueError, match="eta"):
        S.step(torch.zeros(2, dtype=DT))


def test_third_full_refuses_many_subsets_and_respects_the_memory_budget():
    prob = ce_problem()  # P = 32
    S = cl.approx.grouped_newton(prob, direction(prob), partition="scalar", order=2)
    with pytest.raises(ValueError, match="max_subsets"):
        S.third_tensor(max_subsets=16)
    with cl.memory.budget(1000), pytest.raises(cl.memory.MemoryBudgetError):
        S.third_tensor()
    torch.manual_seed(0)
    big = cl.Problem(nn.Linear(10, 7).double(), nn.MSELoss(), torch.randn(5, 10, dtype=DT),
                     torch.randn(5, 7, dtype=DT))
    Sb = cl.approx.grouped_newton(big, direction(big), partition="scalar", order=2)
    with pytest.raises(ValueError, match="max_subsets"):
        _ = Sb.third_full
