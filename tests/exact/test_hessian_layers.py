"""curvlab.exact.hessian_layers on its own: δ, ā, Ξ, Ψ and the Hessian blocks of single-use layers.

Reference: the loss as a function of perturbations ε_l added to every layer's pre-activations
(forward hooks written here), differentiated with ``torch.autograd.functional``: δ = ∂L/∂ε,
Ξ = ∂²L/∂ε_l∂ε_m (``hessian``), Ψ = ∂a_l/∂ε_m (``jacobian`` of the recorded layer inputs); the
blocks of :func:`pair_block` against ``curvlab.reference.hessian`` (double-backward autograd).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call

import curvlab as cl
from curvlab import reference
from curvlab.exact.hessian_layers import layer_curvature, pair_block, single_use_linear_layers


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.inner, self.out = nn.Linear(3, 4), nn.Linear(4, 4, bias=False), nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.out(h + torch.sin(self.inner(h)))


ARCHS = {
    "mlp": lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3), nn.Sigmoid(),
                                 nn.Linear(3, 2, bias=False)),
    "residual": Residual,
}
N = 3


def make(arch: str, loss: str = "ce", seed: int = 0) -> cl.Problem:
    torch.manual_seed(seed)
    model = ARCHS[arch]().double()
    g = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(N, 3, generator=g, dtype=torch.float64)
    if loss == "ce":
        return cl.Problem(model, nn.CrossEntropyLoss(), X, torch.randint(0, 2, (N,), generator=g))
    if loss == "mse":
        return cl.Problem(model, nn.MSELoss(reduction="sum"), X, torch.randn(N, 2, generator=g, dtype=torch.float64))
    return cl.Problem(model, nn.BCEWithLogitsLoss(), X, torch.rand(N, 2, generator=g, dtype=torch.float64))


class PreActivation:
    """L and the layer inputs as functions of the flat pre-activation perturbation ε (all layers)."""

    def __init__(self, prob: cl.Problem, theta: torch.Tensor | None = None) -> None:
        self.prob, self.theta = prob, prob.theta if theta is None else theta
        mods = dict(prob.model.named_modules())
        self.names = list(single_use_linear_layers(prob))
        self.modules = [mods[n] for n in self.names]
        self.sizes = [m.out_features for m in self.modules]
        self.offsets = [N * sum(self.sizes[:i]) for i in range(len(self.sizes) + 1)]

    def _run(self, eps: torch.Tensor):
        inputs = {}

        def hook_for(i):
            def hook(_m, inp, out):
                inputs[i] = inp[0]
                return out + eps[self.offsets[i]:self.offsets[i + 1]].reshape(N, -1)
            return hook

        hs = [m.register_forward_hook(hook_for(i)) for i, m in enumerate(self.modules)]
        try:
            f = functional_call(self.prob.model, self.prob.params(self.theta), (self.prob.X,))
        finally:
            for h in hs:
                h.remove()
        return f, inputs

    def loss(self, eps):
        f, _ = self._run(eps)
        return self.prob.loss_fn(f, self.prob.y)

    def inputs(self, eps):
        _, inputs = self._run(eps)
        return tuple(inputs[i] for i in range(len(self.modules)))

    def zero(self):
        return torch.zeros(self.offsets[-1], dtype=torch.float64)

    def part(self, T: torch.Tensor, i: int) -> torch.Tensor:
        """Entries of layer i along the last axis of T, as (..., N, d_i)."""
        return T[..., self.offsets[i]:self.offsets[i + 1]].reshape(*T.shape[:-1], N, self.sizes[i])


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-11) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    err = float((a - b).abs().max()) / max(1.0, float(b.abs().max()))
    assert err <= tol, err


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("loss", ["ce", "mse", "bce"])
def test_delta_acts_xi_psi_against_autograd(arch, loss):
    prob = make(arch, loss)
    ref = PreActivation(prob)
    layers = single_use_linear_layers(prob)
    assert list(layers) == ref.names and len(layers) == 3
    lc = layer_curvature(prob, layers)
    e0 = ref.zero()
    delta = torch.autograd.grad(ref.loss(e0.requires_grad_(True)), e0)[0]
    H = hessian(ref.loss, ref.zero())  # (Σ N d, Σ N d)
    Jin = jacobian(ref.inputs, ref.zero())  # per layer: (N, d_in, Σ N d)
    ins = ref.inputs(ref.zero())
    idx = torch.arange(N)
    for i, l in enumerate(ref.names):
        close(lc.delta[l], ref.part(delta, i))
        close(lc.acts[l], ins[i], 0)
        bias = ref.modules[i].bias is not None
        abar = torch.cat([ins[i], torch.ones(N, 1, dtype=torch.float64)], 1) if bias else ins[i]
        close(lc.abar(l), abar, 0)
        Hl = H[ref.offsets[i]:ref.offsets[i + 1]].reshape(N, ref.sizes[i], -1)
        for j, m in enumerate(ref.names):
            Hlm = ref.part(Hl, j)  # (N, d_l, N, d_m): only the same-sample entries are nonzero
            close(lc.Xi(l, m), Hlm[idx, :, idx])
            Plm = ref.part(Jin[i], j)[idx, :, idx]  # (N, d_in_l, d_m) = ∂a_l / ∂z_m
            psi = lc.Psi(l, m)
            if j >= i:  # a layer's input does not depend on its own or later pre-activations
                assert float(Plm.abs().max()) == 0.0 and psi is None
                continue
            assert psi is not None
            if bias:  # the bias "input" 1 does not move
                assert float(psi[:, -1].abs().max()) == 0.0
                psi = psi[:, :-1]
            close(psi, Plm)


def augmented_index(prob: cl.Problem, name: str, module: nn.Linear) -> torch.Tensor:
    """θ positions of the augmented [W, b] entries (o, i) of a layer, row-major over (o, i)."""
    prefix = f"{name}." if name else ""
    s = prob.param_slices[prefix + "weight"].start
    o, i = module.out_features, module.in_features
    W = s + torch.arange(o * i).reshape(o, i)
    if module.bias is None:
        return W.reshape(-1)
    b = s + o * i + torch.arange(o)
    return torch.cat([W, b[:, None]], dim=1).reshape(-1)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("loss", ["ce", "mse", "bce"])
def test_pair_block_is_the_hessian_block(arch, loss):
    prob = make(arch, loss)
    layers = single_use_linear_layers(prob)
    lc = layer_curvature(prob, layers)
    H = reference.hessian(prob)
    for l, ml in layers.items():
        for m, mm in layers.items():  # both orders: pair_block(l, m) = pair_block(m, l)ᵀ
            rl, rm = augmented_index(prob, l, ml), augmented_index(prob, m, mm)
            close(pair_block(lc, l, m), H[rl][:, rm])


def test_layer_curvature_at_other_parameters():
    prob = make("mlp")
    theta = prob.theta + 0.5 * torch.randn(prob.num_params, dtype=torch.float64)
    layers = single_use_linear_layers(prob)
    lc = layer_curvature(prob, layers, theta)
    H = reference.hessian(prob.at(theta))
    ref = PreActivation(prob, theta)
    e0 = ref.zero().requires_grad_(True)
    delta = torch.autograd.grad(ref.loss(e0), e0)[0]
    for i, (l, ml) in enumerate(layers.items()):
        close(lc.delta[l], ref.part(delta, i))
        for m, mm in layers.items():
            close(pair_block(lc, l, m), H[augmented_index(prob, l, ml)][:, augmented_index(prob, m, mm)])
