"""curvlab.capture on its own: (a, g), explicit rows and output cotangents against torch.func.

References: per-sample output Jacobians J_n from ``curvlab.reference.output_jacobians`` (vmapped
``jacrev``) give the rows v_nk = J_nᵀ u_nk; the cotangents at a layer's output come from a
vector-Jacobian product of the model with a perturbation injected at that output (a forward hook
written here); the Fisher-type matrices from ``curvlab.reference``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, vjp
from torch.nn import functional as F

import curvlab as cl
from curvlab import reference
from curvlab.capture import (
    GenericRows,
    LayerIO,
    capture,
    output_cotangents,
    per_sample_jacobian_rows,
    sampled_output_grads,
    supported_layers,
)


class Twice(nn.Module):
    """A Linear layer applied twice per forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.shared, self.out = nn.Linear(5, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.out(torch.tanh(self.shared(torch.tanh(self.shared(h)))))


ARCHS = {
    "mlp": (lambda: nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)), (5,)),
    "nobias": (lambda: nn.Sequential(nn.Linear(5, 4, bias=False), nn.Sigmoid(), nn.Linear(4, 3, bias=False)), (5,)),
    "sequence": (lambda: nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3)), (2, 5)),
    "cnn": (lambda: nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Conv2d(2, 2, 2, stride=2, bias=False),
                                  nn.Tanh(), nn.Flatten(), nn.Linear(8, 3)), (1, 4, 4)),
    "layernorm": (lambda: nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 3)), (5,)),
    "twice": (Twice, (5,)),
}


def make(arch: str, loss: str = "ce", reduction: str = "mean", n: int = 5, seed: int = 0) -> cl.Problem:
    builder, shape = ARCHS[arch]
    torch.manual_seed(seed)
    model = builder().double()
    g = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    if loss == "ce":
        return cl.Problem(model, nn.CrossEntropyLoss(reduction=reduction), X, torch.randint(0, 3, (n,), generator=g))
    if loss == "mse":
        y = torch.randn(n, 3, generator=g, dtype=torch.float64)
        return cl.Problem(model, nn.MSELoss(reduction=reduction), X, y)
    return cl.Problem(model, nn.BCEWithLogitsLoss(reduction=reduction), X,
                      torch.rand(n, 3, generator=g, dtype=torch.float64))


def random_cotangents(prob: cl.Problem, k: int, seed: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, prob.num_samples, *prob.output_shape, generator=g, dtype=torch.float64)


def reference_rows(prob: cl.Problem, U: torch.Tensor) -> torch.Tensor:
    """v_nk = J_nᵀ u_nk for all of θ, (k, N, P)."""
    J = reference.output_jacobians(prob)  # (N, C, P)
    return torch.einsum("knc,ncp->knp", U.reshape(U.shape[0], prob.num_samples, -1), J)


def rows_of(piece: LayerIO | GenericRows) -> torch.Tensor:
    return piece.jacobian_rows() if isinstance(piece, LayerIO) else piece.rows


def assembled_rows(cap) -> torch.Tensor:
    """The capture's rows, concatenated in parameter order (the pieces must tile θ)."""
    pos = 0
    for p in cap.pieces:
        assert p.start == pos, "pieces must be in parameter order and contiguous"
        pos = p.stop
    return torch.cat([rows_of(p) for p in cap.pieces], dim=2)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-11) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    if a.numel() == 0:
        return
    err = float((a - b).abs().max()) / max(1.0, float(b.abs().max()))
    assert err <= tol, err


def layer_output_cotangents(prob: cl.Problem, module: nn.Module, U: torch.Tensor):
    """(layer input, ∂(u_k · f)/∂z_k at the layer output) by a vjp w.r.t. an injected perturbation."""
    seen = {}

    def hook(_m, inp, out):
        seen["a"], seen["z"] = inp[0], out
        return out + seen["eps"]

    def shape_hook(_m, _inp, out) -> None:
        seen["shape"] = out.shape

    with torch.no_grad():
        h = module.register_forward_hook(shape_hook)
        prob.output()
        h.remove()
    eps = torch.zeros(seen["shape"], dtype=torch.float64)

    def f(e):
        seen["eps"] = e
        h = module.register_forward_hook(hook)
        try:
            return functional_call(prob.model, prob.params(), (prob.X,))
        finally:
            h.remove()

    _, pull = vjp(f, eps)
    gz = torch.stack([pull(u)[0] for u in U]) if len(U) else eps.new_zeros((0, *eps.shape))
    return seen["a"].detach(), gz


# ---------------------------------------------------------------------------------------- layer (a, g)
@pytest.mark.parametrize("arch", ["mlp", "nobias", "sequence", "cnn"])
@pytest.mark.parametrize("k", [0, 1, 3])
def test_layer_inputs_and_cotangents(arch, k):
    prob = make(arch)
    U = random_cotangents(prob, k)
    cap = capture(prob, lambda f: U)
    ios = [p for p in cap.pieces if isinstance(p, LayerIO)]
    assert [io.name for io in ios] == list(supported_layers(prob)) and ios
    for io in ios:
        a, gz = layer_output_cotangents(prob, io.module, U)
        n = prob.num_samples
        if isinstance(io.module, nn.Linear):
            assert io.kind == "linear"
            t = a[0, ..., 0].numel()  # positions: the extra input dimensions
            close(io.a, a.reshape(n, t, a.shape[-1]), 0)
            close(io.g, gz.reshape(k, n, t, gz.shape[-1]), 1e-13)
        else:  # conv: a = patches with W_flat a_nt + b = z_nt at every position t
            assert io.kind == "conv2d"
            W = io.module.weight.detach().flatten(1)
            z = io.module(a).detach().flatten(2).transpose(1, 2)  # (N, T, d_out)
            b = io.module.bias.detach() if io.module.bias is not None else 0.0
            close(io.a @ W.T + b, z)
            close(io.g, gz.flatten(3).transpose(2, 3), 1e-13)
        assert io.has_bias == (io.module.bias is not None)
        assert io.size == io.module.weight.numel() + (io.module.bias.numel() if io.has_bias else 0)
        assert io.start == prob.param_slices[io.weight].start
        assert io.g.shape == (k, n, io.positions, io.d_out)


def test_conv_inputs_are_channel_major_patches():
    prob = make("cnn")
    io = next(p for p in capture(prob, lambda f: random_cotangents(prob, 1)).pieces if isinstance(p, LayerIO))
    ref = F.unfold(prob.X, 3, padding=1).transpose(1, 2)
    close(io.a, ref, 0)
    assert io.positions == 16 and io.d_in == 9


@pytest.mark.parametrize("arch", ["mlp", "nobias", "sequence", "cnn", "layernorm", "twice"])
@pytest.mark.parametrize("k", [1, 3])
def test_jacobian_rows_are_per_sample_jacobian_transposes_times_u(arch, k):
    prob = make(arch)
    U = random_cotangents(prob, k)
    cap = capture(prob, lambda f: U)
    close(cap.output, prob.output().detach(), 0)
    assert cap.num_samples == prob.num_samples
    close(assembled_rows(cap), reference_rows(prob, U))


def test_generic_pieces_hold_the_parameters_outside_layers():
    prob = make("layernorm")
    cap = capture(prob, lambda f: random_cotangents(prob, 2))
    generic = [p for p in cap.pieces if isinstance(p, GenericRows)]
    assert [p.names for p in generic] == [("1.weight", "1.bias")]
    assert generic[0].start == prob.param_slices["1.weight"].start and generic[0].size == 8


def test_a_layer_called_twice_takes_the_generic_path():
    prob = make("twice")
    assert "shared" not in supported_layers(prob)
    modules = dict(prob.model.named_modules())
    layers = {n: modules[n] for n in ("inp", "shared", "out")}  # claim it is single-use anyway
    U = random_cotangents(prob, 2)
    cap = capture(prob, lambda f: U, layers=layers)
    kinds = {p.name if isinstance(p, LayerIO) else p.names: type(p).__name__ for p in cap.pieces}
    assert kinds == {"inp": "LayerIO", ("shared.weight", "shared.bias"): "GenericRows", "out": "LayerIO"}
    close(assembled_rows(cap), reference_rows(prob, U))


def test_generic_false_covers_only_the_layers():
    prob = make("layernorm")
    cap = capture(prob, lambda f: random_cotangents(prob, 1), generic=False)
    assert all(isinstance(p, LayerIO) for p in cap.pieces)
    assert [p.name for p in cap.pieces] == ["0", "3"]


def test_capture_at_other_parameters():
    prob = make("mlp")
    theta = prob.theta + 0.3 * torch.randn(prob.num_params, dtype=torch.float64)
    U = random_cotangents(prob, 2)
    cap = capture(prob, lambda f: U, theta=theta)
    close(assembled_rows(cap), reference_rows(prob.at(theta), U))


# ---------------------------------------------------------------------------------------- generic rows
@pytest.mark.parametrize("chunk", [None, 2])
def test_per_sample_jacobian_rows(chunk):
    prob = make("layernorm")
    U = random_cotangents(prob, 3)
    names = ["1.weight", "1.bias", "3.weight"]
    out = per_sample_jacobian_rows(prob, prob.theta, names, U, chunk=chunk)
    ref = reference_rows(prob, U)
    assert list(out) == names
    for n in names:
        s = prob.param_slices[n]
        assert out[n].shape == (3, prob.num_samples, *prob.unflatten(prob.theta)[n].shape)
        close(out[n].reshape(3, prob.num_samples, -1), ref[:, :, s])


# ---------------------------------------------------------------------------------------- cotangents
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss", ["ce", "mse", "bce"])
def test_output_cotangents_reproduce_the_fisher_type_matrices(loss, reduction):
    prob = make("layernorm", loss, reduction)
    for fisher, ref in (("type2", reference.ggn(prob)), ("empirical", reference.empirical_fisher(prob))):
        V = assembled_rows(capture(prob, output_cotangents(prob, fisher)))
        V = V.reshape(-1, prob.num_params)
        close(V.T @ V, ref)
    S, seed = 3, 11
    gen = torch.Generator().manual_seed(seed)
    labels = prob.likelihood.sample(prob.output().detach(), S, gen)
    V = assembled_rows(capture(prob, output_cotangents(prob, "mc", S, seed))).reshape(-1, prob.num_params)
    close(V.T @ V, reference.fisher_mc_from(prob, labels))


def test_output_cotangents_shapes_and_bad_arguments():
    prob = make("mlp")
    f = prob.output().detach()
    assert output_cotangents(prob, "type2")(f).shape == (3, 5, 3)
    assert output_cotangents(prob, "mc", 4)(f).shape == (4, 5, 3)
    assert output_cotangents(prob, "empirical")(f).shape == (1, 5, 3)
    with pytest.raises(ValueError, match="'fisher'"):
        output_cotangents(prob, "fisher")
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            output_cotangents(prob, "mc", bad)


def test_sampled_output_grads_seeding():
    prob = make("mlp")
    f = prob.output().detach()
    a, b, c = (sampled_output_grads(prob, f, 6, s) for s in (0, 0, 1))
    assert a.shape == (6, 5, 3)
    assert torch.equal(a, b) and not torch.equal(a, c)
    gen = torch.Generator().manual_seed(0)
    close(a, prob.likelihood.grad_output(f, prob.likelihood.sample(f, 6, gen)), 0)
    for bad in (0, -1, 2.0, False):
        with pytest.raises(ValueError, match="positive integer"):
            sampled_output_grads(prob, f, bad, 0)
