"""Conv2d KFAC/EKFAC/TKFAC against a dense reference built from explicitly extracted patches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab as cl
from curvlab.capture import output_cotangents
from curvlab.linalg import Kron
from tests.approx.cases import exact_of, rel


def patches(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """(N, T, C·kh·kw) by slicing the padded input position by position (channel-major like the weight)."""
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    dh, dw = conv.dilation
    ph, pw = conv.padding
    xp = F.pad(x, (pw, pw, ph, ph))
    H = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    W = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    out = []
    for i in range(H):
        for j in range(W):
            win = xp[:, :, i * sh:i * sh + dh * (kh - 1) + 1:dh, j * sw:j * sw + dw * (kw - 1) + 1:dw]
            out.append(win.reshape(x.shape[0], -1))
    return torch.stack(out, dim=1)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, padding=1)
        self.c2 = nn.Conv2d(3, 4, 2, stride=2, dilation=1, bias=False)
        self.c3 = nn.Conv2d(4, 2, 2, padding=1, dilation=2)
        self.fc = nn.Linear(2 * 2 * 2, 3)

    def forward(self, x):
        h = torch.tanh(self.c1(x))
        h = torch.sigmoid(self.c2(h))
        h = torch.tanh(self.c3(h))
        return self.fc(h.flatten(1))


def explicit(prob: cl.Problem, fisher: str):
    """Per conv layer: patches a (N,T,q) with the bias input, and cotangents g (k,N,T,p) by a loop over k."""
    m = prob.model
    x = prob.X
    zs, ins = [], []
    h = x.clone().requires_grad_(True)  # every z below is a node of one graph
    acts = [torch.tanh, torch.sigmoid, torch.tanh]
    for conv, act in zip([m.c1, m.c2, m.c3], acts):
        P = patches(h, conv)
        ins.append(P.detach())
        Wm = conv.weight.detach().reshape(conv.out_channels, -1)
        z = P @ Wm.T + (conv.bias.detach() if conv.bias is not None else 0.0)  # (N, T, p)
        zs.append(z)
        Hh = (h.shape[2] + 2 * conv.padding[0] - conv.dilation[0] * (conv.kernel_size[0] - 1) - 1) // conv.stride[0] + 1
        h = act(z.transpose(1, 2).reshape(x.shape[0], conv.out_channels, Hh, -1))
    f = m.fc(h.flatten(1))
    assert rel(f.detach(), prob.output()) < 1e-12
    U = output_cotangents(prob, fisher, samples=2, seed=5)(f.detach())
    gs = [[] for _ in zs]
    for k in range(U.shape[0]):
        grads = torch.autograd.grad(f, zs, grad_outputs=U[k], retain_graph=True)
        for i, gr in enumerate(grads):
            gs[i].append(gr)
    out = []
    for conv, P, g in zip([m.c1, m.c2, m.c3], ins, gs):
        if conv.bias is not None:
            P = torch.cat([P, torch.ones_like(P[..., :1])], dim=2)
        out.append((P, torch.stack(g).detach()))
    return out


@pytest.fixture(scope="module")
def prob():
    torch.manual_seed(0)
    model = Net().double().eval()
    X = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    return cl.Problem(model, nn.CrossEntropyLoss(), X, torch.randint(0, 3, (5,)))


@pytest.mark.parametrize("fisher", ["type2", "mc", "empirical"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_conv_kfac_matches_explicit_patches(prob, fisher, approx):
    K = cl.approx.kfac(prob, fisher=fisher, approx=approx, mc_samples=2, seed=5)
    for blk, (P, g) in zip(K.blocks[:3], explicit(prob, fisher)):
        n, t, q = P.shape
        if approx == "expand":
            A = P.reshape(-1, q).T @ P.reshape(-1, q) / (n * t)
            gg = g.reshape(-1, g.shape[-1])
        else:
            Pm = P.mean(1)
            A = Pm.T @ Pm / n
            gg = g.sum(2).reshape(-1, g.shape[-1])
        G = gg.T @ gg
        assert rel(blk.A, A) < 1e-12
        assert rel(blk.G, G) < 1e-12
        assert rel(blk.to_dense(), Kron(A, G, blk.bias).to_dense()) < 1e-12


@pytest.mark.parametrize("fisher", ["type2", "empirical"])
def test_conv_exact_block_and_eigen_correction_from_explicit_per_sample_gradients(prob, fisher):
    Fx = exact_of(prob, fisher)
    E = cl.approx.ekfac(prob, fisher=fisher)
    T = cl.approx.tkfac(prob, fisher=fisher)
    for i, (P, g) in enumerate(explicit(prob, fisher)):
        V = torch.einsum("kntp,ntq->knpq", g, P)  # per-sample weight gradients [W b]
        blk = E.blocks[i]
        if blk.bias:
            flat = torch.cat([V[..., :-1].flatten(2), V[..., -1]], dim=2)
        else:
            flat = V.flatten(2)
        flat = flat.reshape(-1, flat.shape[-1])
        D = flat.T @ flat
        assert rel(D, Fx.blocks[i].to_dense()) < 1e-12  # the reference really is the exact block
        S = (torch.einsum("op,knpq,qi->knoi", blk.Q_G.T, V, blk.Q_A) ** 2).sum((0, 1))
        assert rel(blk.S, S) < 1e-12
        assert float(T.blocks[i].trace()) == pytest.approx(float(D.trace()), rel=1e-12)
