"""The oracle on models torch can differentiate only partly, every kind × structure, in float64.

* ``nn.LSTM`` / ``nn.GRU`` (batch_first, a Linear head on the last step): vmap cannot batch them
  over samples (their forward writes into unbatched state), so per-sample Jacobian rows loop over
  the samples in reverse mode;
* ``nn.MultiheadAttention`` called with ``need_weights=False`` uses a fused attention kernel that
  has no forward-mode derivative and no double backward: J v comes from explicit reverse-mode
  rows, and the Hessian, which needs second derivatives, is refused with an error that names the
  module — under the math kernel (``sdpa_kernel(SDPBackend.MATH)``) it is computed;
* a custom ``autograd.Function`` with a backward but no ``jvp``: forward mode is refused, J v is
  the vjp of the vjp and ∇²L v is reverse-over-reverse.

References: ``curvlab.reference`` where its vmapped per-sample derivatives work (attention, the
custom function); for the recurrent models, which ``torch.func.vmap`` cannot batch, the same
formulas with a Python loop over the samples and ``torch.autograd.functional`` Jacobians and
Hessians; the Hessian always by double-backward autograd (``reference.hessian``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import curvlab as cl
from curvlab import reference
from curvlab.capture import rows_path
from curvlab.exact.products import ef_vp, fisher_mc_vp, ggn_vp, hvp, hvp_path, jvp_path

TOL = 1e-10
N, SAMPLES, SEED = 5, 3, 5
KINDS = ("hessian", "ggn", "fisher_mc", "empirical_fisher")


class Recurrent(nn.Module):
    def __init__(self, cell: type[nn.Module]) -> None:
        super().__init__()
        self.rnn = cell(3, 4, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h, _ = self.rnn(x)
        return self.head(h[:, -1])


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.att = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h, _ = self.att(x, x, x, need_weights=False)
        return self.head(torch.tanh(h).mean(1))


class Cube(torch.autograd.Function):
    """x³ with a hand-written backward and no jvp: reverse mode works (twice), forward mode does not."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x**3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * g


class CubeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 3)
        self.out = nn.Linear(3, 3)

    def forward(self, x):
        return self.out(Cube.apply(self.inp(x)))


# name -> (model, input shape per sample, loss, reduction, vmappable by curvlab.reference)
MODELS = {
    "lstm": (lambda: Recurrent(nn.LSTM), (4, 3), "ce", "mean", False),
    "gru": (lambda: Recurrent(nn.GRU), (4, 3), "mse", "sum", False),
    "attention": (Attention, (3, 4), "ce", "mean", True),
    "custom-function": (CubeNet, (4,), "bce", "mean", True),
}


def make(name: str) -> cl.Problem:
    builder, shape, loss, red, _ = MODELS[name]
    torch.manual_seed(0)
    model = builder().double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(N, *shape, generator=g, dtype=torch.float64)
    if loss == "ce":
        return cl.Problem(model, nn.CrossEntropyLoss(reduction=red), X, torch.randint(0, 3, (N,), generator=g))
    if loss == "mse":
        return cl.Problem(model, nn.MSELoss(reduction=red), X, torch.randn(N, 3, generator=g, dtype=torch.float64))
    return cl.Problem(model, nn.BCEWithLogitsLoss(reduction=red), X, torch.rand(N, 3, generator=g, dtype=torch.float64))


def mc_labels(prob: cl.Problem) -> torch.Tensor:
    gen = torch.Generator().manual_seed(SEED)
    return prob.likelihood.sample(prob.output().detach(), SAMPLES, gen)


def looped_references(prob: cl.Problem, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """R Σ_n J_nᵀ Λ_n J_n, R Σ_n ∇ℓ_n∇ℓ_nᵀ and R Σ_n mean_s ∇ℓ_n(ŷ_s)∇ℓ_n(ŷ_s)ᵀ, one sample at a time."""
    from torch.autograd.functional import hessian, jacobian

    lik, theta, P = prob.likelihood, prob.theta.detach(), prob.num_params
    G, EF, F = (torch.zeros(P, P, dtype=torch.float64) for _ in range(3))
    for n in range(prob.num_samples):
        x = prob.X[n:n + 1]

        def out(th, x=x):
            return prob.output(th, x)

        def loss_at(y, x=x):
            return lambda th: lik.per_sample(prob.output(th, x), y)[0]

        J = jacobian(out, theta).reshape(-1, P)
        Lam = hessian(lambda f, n=n: lik.per_sample(f, prob.y[n:n + 1])[0], out(theta).detach())
        G += J.T @ Lam.reshape(J.shape[0], J.shape[0]) @ J
        g = jacobian(loss_at(prob.y[n:n + 1]), theta)
        EF += torch.outer(g, g)
        for ys in labels:
            gs = jacobian(loss_at(ys[n:n + 1]), theta)
            F += torch.outer(gs, gs) / labels.shape[0]
    R = prob.loss_scale
    return {"ggn": R * G, "empirical_fisher": R * EF, "fisher_mc": R * F}


def references(name: str, prob: cl.Problem) -> dict[str, torch.Tensor]:
    labels = mc_labels(prob)
    if MODELS[name][4]:
        refs = {"ggn": reference.ggn(prob), "empirical_fisher": reference.empirical_fisher(prob),
                "fisher_mc": reference.fisher_mc_from(prob, labels)}
    else:
        refs = looped_references(prob, labels)
    with sdpa_kernel([SDPBackend.MATH]):  # the math attention kernel is twice differentiable
        refs["hessian"] = reference.hessian(prob)
    return refs


@pytest.fixture(scope="module", params=list(MODELS))
def case(request):
    prob = make(request.param)
    return request.param, prob, references(request.param, prob)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def oracle(prob: cl.Problem, kind: str, structure: str):
    fn = getattr(cl.exact, kind)
    if kind == "fisher_mc":
        return fn(prob, structure, samples=SAMPLES, seed=SEED)
    return fn(prob, structure)


def block_mask(prob: cl.Problem) -> torch.Tensor:
    m = torch.zeros(prob.num_params, prob.num_params, dtype=torch.bool)
    for s in prob.partition.slices:
        m[s, s] = True
    return m


def needs_math_kernel(name: str, kind: str) -> bool:
    return name == "attention" and kind == "hessian"


def kernel(name: str, kind: str):
    return sdpa_kernel([SDPBackend.MATH]) if needs_math_kernel(name, kind) else torch.enable_grad()


@pytest.mark.parametrize("kind", KINDS)
def test_full_block_diag_match_the_reference(case, kind):
    name, prob, refs = case
    ref = refs[kind]
    if name == "custom-function" and kind == "hessian":  # no forward mode: see test_forward_mode_free_hessian
        with pytest.raises(ValueError, match="structure='operator'"):
            oracle(prob, kind, "full")
        return
    with kernel(name, kind):
        assert rel(oracle(prob, kind, "full").to_dense(), ref) < TOL
        B = oracle(prob, kind, "block")
        assert isinstance(B, cl.BlockDiagonal)
        assert rel(B.to_dense(), ref * block_mask(prob)) < TOL
        assert rel(oracle(prob, kind, "diag").diagonal(), ref.diagonal()) < TOL


PRODUCTS = {"hessian": hvp, "ggn": ggn_vp, "empirical_fisher": ef_vp,
            "fisher_mc": lambda prob, V: fisher_mc_vp(prob, V, SAMPLES, SEED)}


@pytest.mark.parametrize("kind", KINDS)
def test_operator_and_products_match_the_reference(case, kind):
    name, prob, refs = case
    ref = refs[kind]
    V = torch.randn(prob.num_params, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with kernel(name, kind):
        C = oracle(prob, kind, "operator")
        assert isinstance(C, cl.MatrixFree)
        assert rel(C.to_dense(), ref) < TOL
        assert rel(PRODUCTS[kind](prob, V), ref @ V) < TOL
        assert rel(PRODUCTS[kind](prob, V[:, 0]), ref @ V[:, 0]) < TOL


def test_the_paths_taken_and_why():
    for name, cell in (("lstm", "LSTM"), ("gru", "GRU")):
        prob = make(name)
        verdict = rows_path(prob)
        assert verdict.path == "per_sample"
        assert verdict.refused[0][0] == "vmap" and verdict.refused[0][1] == f"'rnn' ({cell})"
        assert jvp_path(prob).path == "forward" and hvp_path(prob).path == "forward_over_reverse"
    prob = make("attention")
    assert rows_path(prob).path == "vmap"
    verdict = jvp_path(prob)
    assert verdict.path == "rows"
    assert [r[0] for r in verdict.refused] == ["forward", "double_vjp"]
    assert verdict.module() == "module 'att' (MultiheadAttention)"
    assert hvp_path(prob).path is None
    with sdpa_kernel([SDPBackend.MATH]):  # the verdict is per attention-kernel setting
        assert jvp_path(prob).path == "forward" and hvp_path(prob).path == "forward_over_reverse"
    prob = make("custom-function")
    assert jvp_path(prob).path == "double_vjp"
    assert hvp_path(prob).path == "reverse_over_reverse"
    assert rows_path(prob).path == "vmap"


@pytest.mark.parametrize("structure", ["full", "block", "diag", "operator"])
def test_the_fused_attention_hessian_is_refused_naming_the_module(structure):
    prob = make("attention")
    with pytest.raises(ValueError, match=r"module 'att' \(MultiheadAttention\).*cl\.exact\.ggn.*SDPBackend\.MATH"):
        cl.exact.hessian(prob, structure)
    with pytest.raises(ValueError, match="MultiheadAttention"):
        hvp(prob, torch.ones(prob.num_params, dtype=torch.float64))


def test_forward_mode_free_hessian():
    """A custom Function without jvp: the dense structures are refused with the operator as the
    way out, and the operator's reverse-over-reverse products are the exact Hessian."""
    prob = make("custom-function")
    for structure in ("full", "block", "diag"):
        with pytest.raises(ValueError, match=r"forward-mode.*structure='operator'"):
            cl.exact.hessian(prob, structure)
    H = reference.hessian(prob)
    assert rel(cl.exact.hessian(prob, "operator").to_dense(), H) < TOL


class OldStyleSquare(torch.autograd.Function):
    """x² as an old-style Function (no setup_context): torch.func cannot transform it at all."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class OldStyleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(OldStyleSquare.apply(self.inp(x)))


def test_what_torch_func_cannot_transform_is_refused_clearly():
    torch.manual_seed(0)
    X = torch.randn(N, 3, dtype=torch.float64)
    prob = cl.Problem(OldStyleNet().double(), nn.CrossEntropyLoss(), X, torch.randint(0, 3, (N,)))
    for kind in ("ggn", "empirical_fisher", "fisher_mc"):
        with pytest.raises(ValueError, match=r"torch\.func cannot differentiate model OldStyleNet.*setup_context"):
            oracle(prob, kind, "operator")
    for structure in ("full", "operator"):
        with pytest.raises(ValueError, match=r"Hessian of model OldStyleNet needs second derivatives.*setup_context"):
            cl.exact.hessian(prob, structure)
    # its Linear layers take the layer-structured path (plain autograd): the dense GGN still works
    G = cl.exact.ggn(prob).to_dense()
    assert rel(G, looped_references(prob, mc_labels(prob))["ggn"]) < TOL


@pytest.mark.parametrize("name", ["lstm", "attention"])
def test_kfac_with_exact_blocks_for_other_modules(name):
    """``unsupported="exact"`` takes the recurrent / attention block from the (now working) oracle."""
    prob = make(name)
    K = cl.approx.kfac(prob, unsupported="exact")
    G = cl.exact.ggn(prob, "block")
    inner = prob.partition.names[0]  # 'rnn' / 'att': the exact block
    b = prob.partition[inner].slice
    assert rel(K.to_dense()[b, b], G.to_dense()[b, b]) < TOL
