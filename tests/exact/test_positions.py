"""The oracle on outputs with extra dimensions: cross-entropy on (N, C, L) and (N, C, H, W) outputs
with (N, L) / (N, H, W) targets, every kind × structure, in float64, to 1e-10.

References: ``curvlab.reference`` (double-backward Hessian, R Σ J_nᵀ Λ_n J_n with torch.func
Jacobians, per-sample gradients); the per-position empirical Fisher R Σ_n Σ_t ∇ℓ_nt ∇ℓ_ntᵀ from
the Jacobian of torch's unreduced loss terms (``reduction="none"``), and entry by entry against
curvlinops' ``EFLinearOperator``, which flattens positions into the batch (skipped without
curvlinops); the loss and gradient against torch's own loss.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.autograd.functional import jacobian

import curvlab as cl
from curvlab import reference
from curvlab.exact.products import ef_vp

TOL = 1e-10
N, SAMPLES, SEED = 4, 3, 7
STRUCTURES = ("full", "block", "diag", "operator")


class SequenceHead(nn.Module):
    """Linear layers on a sequence (N, L, d) with the classes moved to dim 1: (N, C, L)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.inp(x))).transpose(1, 2)


# name -> (model, input shape per sample, classes, target shape per sample)
MODELS = {
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv1d(3, 4, 3, padding=1)),
               (2, 5), 4, (5,)),
    "sequence-linear": (SequenceHead, (5, 3), 3, (5,)),
    "conv2d": (lambda: nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Conv2d(2, 3, 1)),
               (1, 3, 3), 3, (3, 3)),
}
CASES = [(m, r) for m in MODELS for r in ("mean", "sum")]


def make(name: str, reduction: str) -> tuple[cl.Problem, nn.Module]:
    builder, shape, classes, target = MODELS[name]
    torch.manual_seed(0)
    model = builder().double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(N, *shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (N, *target), generator=g)
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    return cl.Problem(model, loss_fn, X, y), loss_fn


def per_position_ef(prob: cl.Problem) -> torch.Tensor:
    """R Σ_n Σ_t ∇ℓ_nt ∇ℓ_ntᵀ from the Jacobian of torch's unreduced loss terms of each sample,
    summed per position (over the features of MSE / BCE; CE has one term per position)."""
    terms = type(prob.loss_fn)(reduction="none")
    theta = prob.theta.detach()
    T = prob.likelihood.positions(prob.output()[:1])
    total = torch.zeros(prob.num_params, prob.num_params, dtype=torch.float64)
    for n in range(prob.num_samples):
        def ell(th, n=n):
            return terms(prob.output(th, prob.X[n:n + 1]), prob.y[n:n + 1]).reshape(T, -1).sum(1)

        J = jacobian(ell, theta)  # (T, P)
        total += J.T @ J
    return prob.loss_scale * total


@pytest.fixture(scope="module")
def refs():
    cache = {}

    def get(name, red):
        if (name, red) not in cache:
            prob, loss_fn = make(name, red)
            gen = torch.Generator().manual_seed(SEED)
            labels = prob.likelihood.sample(prob.output().detach(), SAMPLES, gen)
            cache[name, red] = prob, loss_fn, {
                "hessian": reference.hessian(prob), "ggn": reference.ggn(prob),
                "empirical_fisher": reference.empirical_fisher(prob),
                "fisher_mc": reference.fisher_mc_from(prob, labels), "ef_position": per_position_ef(prob)}
        return cache[name, red]

    return get


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def build(prob: cl.Problem, kind: str, structure: str) -> cl.CurvatureMatrix:
    if kind == "fisher_mc":
        return cl.exact.fisher_mc(prob, structure, samples=SAMPLES, seed=SEED)
    if kind == "ef_position":
        return cl.exact.empirical_fisher(prob, structure, per="position")
    return getattr(cl.exact, kind)(prob, structure)


def block_mask(prob: cl.Problem) -> torch.Tensor:
    m = torch.zeros(prob.num_params, prob.num_params, dtype=torch.bool)
    for s in prob.partition.slices:
        m[s, s] = True
    return m


def expected(prob: cl.Problem, ref: torch.Tensor, structure: str) -> torch.Tensor:
    if structure == "block":
        return ref * block_mask(prob)
    if structure == "diag":
        return torch.diag(ref.diagonal())
    return ref


@pytest.mark.parametrize("name,red", CASES)
def test_loss_and_gradient_are_torchs(refs, name, red):
    prob, loss_fn, _ = refs(name, red)
    model = prob.model
    out = model(prob.X)
    assert out.ndim >= 3 and out.shape[1] == MODELS[name][2]
    torch_loss = loss_fn(out, prob.y)
    value = torch_loss.item()
    assert abs(prob.loss() - value) <= 1e-12 * abs(value)
    grads = torch.autograd.grad(torch_loss, list(model.parameters()))
    assert rel(prob.gradient(), torch.cat([g.reshape(-1) for g in grads])) < TOL
    T = out[0, 0].numel()
    assert prob.loss_scale == (1.0 if red == "sum" else 1.0 / (N * T))


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("kind", ["hessian", "ggn", "fisher_mc", "empirical_fisher", "ef_position"])
@pytest.mark.parametrize("name,red", CASES)
def test_every_kind_and_structure_matches_the_reference(refs, name, red, kind, structure):
    prob, _, R = refs(name, red)
    C = build(prob, kind, structure)
    assert rel(C.to_dense(), expected(prob, R[kind], structure)) < TOL


@pytest.mark.parametrize("name,red", CASES)
def test_per_position_and_per_sample_ef_differ_by_the_cross_position_terms(refs, name, red):
    prob, _, R = refs(name, red)
    v = torch.randn(prob.num_params, 2, dtype=torch.float64)
    assert rel(ef_vp(prob, v, per="position"), R["ef_position"] @ v) < TOL
    assert rel(ef_vp(prob, v), R["empirical_fisher"] @ v) < TOL
    # with interacting positions they are different matrices (both PSD, same trace only by accident)
    assert rel(R["ef_position"], R["empirical_fisher"]) > 1e-3


def test_without_positions_per_position_is_per_sample():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    prob = cl.Problem(model, nn.CrossEntropyLoss(), torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 3, (5,)))
    for structure in STRUCTURES:
        a = cl.exact.empirical_fisher(prob, structure, per="position").to_dense()
        b = cl.exact.empirical_fisher(prob, structure).to_dense()
        assert rel(a, b) < 1e-14


def test_bad_per_is_refused():
    prob, _ = make("conv1d", "mean")
    for structure in ("full", "operator"):
        with pytest.raises(ValueError, match="per='each'"):
            cl.exact.empirical_fisher(prob, structure, per="each")
    with pytest.raises(ValueError, match=r"targets must have shape \(N, d1\) = \(4, 5\)"):
        cl.Problem(prob.model, nn.CrossEntropyLoss(), prob.X, prob.y[:, :3])


# ---------------------------------------------------------------------------------------- curvlinops
def _curvlinops_dense(cls, prob: cl.Problem) -> torch.Tensor:
    params = [p for p in prob.model.parameters() if p.requires_grad]
    op = cls(prob.model, prob.loss_fn, params, [(prob.X, prob.y)], check_deterministic=False,
             num_data=prob.num_samples)
    return op @ torch.eye(prob.num_params, dtype=torch.float64)


@pytest.mark.parametrize("name,red", CASES)
def test_per_position_ef_is_curvlinops_ef(refs, name, red):
    curvlinops = pytest.importorskip("curvlinops")
    prob, _, R = refs(name, red)
    theirs = _curvlinops_dense(curvlinops.EFLinearOperator, prob)
    assert rel(cl.exact.empirical_fisher(prob, per="position").to_dense(), theirs) < TOL
    assert rel(R["ef_position"], theirs) < TOL
    # the GGN does not depend on how positions are grouped: it is curvlinops' GGN too
    assert rel(cl.exact.ggn(prob).to_dense(), _curvlinops_dense(curvlinops.GGNLinearOperator, prob)) < TOL


@pytest.mark.parametrize("loss", ["mse", "bce"])
@pytest.mark.parametrize("red", ["mean", "sum"])
def test_per_position_ef_of_elementwise_losses_is_curvlinops_ef(loss, red):
    """MSE / BCE on (N, L, D) outputs: the positions are the axes between batch and features."""
    curvlinops = pytest.importorskip("curvlinops")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X = torch.randn(N, 5, 3, dtype=torch.float64)
    y = torch.rand(N, 5, 2, dtype=torch.float64)
    loss_fn = (nn.MSELoss if loss == "mse" else nn.BCEWithLogitsLoss)(reduction=red)
    prob = cl.Problem(model, loss_fn, X, y)
    theirs = _curvlinops_dense(curvlinops.EFLinearOperator, prob)
    assert rel(cl.exact.empirical_fisher(prob, per="position").to_dense(), theirs) < TOL
    assert rel(per_position_ef(prob), theirs) < TOL
    assert rel(cl.exact.empirical_fisher(prob).to_dense(), reference.empirical_fisher(prob)) < TOL


def test_cotangent_memory_is_budgeted():
    """Type-2 cotangents are outputs² numbers per sample, per-position ones positions × outputs:
    both are refused over the memory budget with a way out; the per-position operator forms neither."""
    prob, _ = make("conv2d", "mean")
    v = torch.randn(prob.num_params, dtype=torch.float64)
    ref = per_position_ef(prob) @ v
    with cl.memory.budget(2000):
        with pytest.raises(cl.memory.MemoryBudgetError, match='type-2 output cotangents.*fisher="mc"'):
            cl.exact.ggn(prob, "diag")
        with pytest.raises(cl.memory.MemoryBudgetError, match='per-position output cotangents.*"operator"'):
            cl.exact.empirical_fisher(prob, "diag", per="position")
        assert rel(cl.exact.empirical_fisher(prob, "operator", per="position") @ v, ref) < TOL
