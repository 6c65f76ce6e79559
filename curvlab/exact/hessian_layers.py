"""The exact Hessian of single-use linear layers from pre-activation second derivatives.

For a layer z_l = W_l a_l + b_l applied once per sample (a_l its input, δ_l = ∂L/∂z_l), write the
bias into an augmented input ā_l = [a_l, 1] and W̄_l = [W_l, b_l]. Then, with

    Ξ_n^{lm} = ∂²L / ∂z_n,l ∂z_n,m        (per-sample Hessian w.r.t. pre-activations)
    Ψ_n^{lm} = ∂ā_n,l / ∂z_n,m            (how layer l's input responds to layer m's output),

the Hessian block between the weights of layers l and m is (rows (i, j), columns (k, q))

    H[W̄_l(i,j), W̄_m(k,q)] = Σ_n Ξ_n^{lm}[i,k] ā_n,l[j] ā_n,m[q]
                           + Σ_n δ_n,l[i] Ψ_n^{lm}[j,k] ā_n,m[q]  + (the same with l ↔ m, transposed).

Ψ^{lm} vanishes unless layer m comes before layer l, so each pair needs one of the two extra
terms, and the pair contracts as ONE matrix product Σ_n X_n ā_n,mᵀ with X_n = Ξ_n ⊗ ā_n,l + δ_n ⊗ Ψ_n
(2·N·P_l·P_m flops: the same floor as the GGN). Ξ and Ψ for all layers come from
Σ_l d_out,l forward-over-reverse products in pre-activation space — one per output unit of a
layer, not one per parameter — each covering all samples at once (samples are independent).
This is the Hessian analogue of the layer-structured GGN in :mod:`curvlab.exact.outer`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap

from curvlab.exact.outer import _CHUNK_BYTES
from curvlab.layers import survey
from curvlab.problem import Problem

__all__ = ["single_use_linear_layers", "LayerCurvature", "layer_curvature", "pair_block"]


def single_use_linear_layers(prob: Problem, theta: Tensor | None = None) -> dict[str, nn.Linear]:
    """The verified layers (:func:`curvlab.layers.survey`) that are ``nn.Linear`` on (N, d_in)
    inputs — the layers whose Hessian blocks :func:`pair_block` computes. ``theta`` is accepted for
    compatibility; the survey is structural and cached on the problem."""
    return {k: L.module for k, L in survey(prob).layers.items() if L.single_position}


class LayerCurvature:
    """δ, ā, Ξ and Ψ of the single-use linear layers of a problem at θ (see the module docstring)."""

    def __init__(self, names: list[str], sizes: list[int], delta: dict[str, Tensor], acts: dict[str, Tensor],
                 xi: dict[str, Tensor], psi: dict[str, Tensor], has_bias: dict[str, bool]) -> None:
        self.names = names
        self.offset = dict(zip(names, [sum(sizes[:i]) for i in range(len(sizes))]))
        self.d_out = dict(zip(names, sizes))
        self.delta, self.acts, self.xi, self.psi, self.has_bias = delta, acts, xi, psi, has_bias

    def abar(self, name: str) -> Tensor:
        """ā = [a, 1] (or a without a trainable bias), shape (N, d_in(+1))."""
        a = self.acts[name]
        if self.has_bias[name]:
            return torch.cat([a, torch.ones_like(a[:, :1])], dim=1)
        return a

    def Xi(self, l: str, m: str) -> Tensor:
        """Ξ^{lm}, shape (N, d_l, d_m)."""
        o = self.offset[m]
        return self.xi[l][o:o + self.d_out[m]].permute(1, 2, 0)

    def Psi(self, l: str, m: str) -> Tensor | None:
        """Ψ^{lm} with the bias row (zero), shape (N, d_in(+1), d_m); None when identically zero."""
        o = self.offset[m]
        P = self.psi[l][o:o + self.d_out[m]]
        if not bool(P.any()):
            return None
        P = P.permute(1, 2, 0)
        if self.has_bias[l]:
            P = torch.cat([P, torch.zeros_like(P[:, :1])], dim=1)
        return P


def layer_curvature(prob: Problem, layers: dict[str, nn.Linear], theta: Tensor | None = None) -> LayerCurvature:
    """Ξ and Ψ by Σ d_out forward-over-reverse products in pre-activation space (vmapped)."""
    theta = prob.theta if theta is None else theta
    names = list(layers)
    params = {k: v.detach() for k, v in prob.params(theta).items()}
    X, y, lik, model = prob.X, prob.y, prob.likelihood, prob.model

    def loss_and_inputs(eps: dict[str, Tensor]):
        inputs: dict[str, Tensor] = {}

        def mk(name: str):
            def hook(_m, inp, out):
                inputs[name] = inp[0]
                return out + eps[name]

            return hook

        hs = [layers[n].register_forward_hook(mk(n)) for n in names]
        try:
            f = functional_call(model, params, (X,))
        finally:
            for h in hs:
                h.remove()
        return lik.loss(f, y), tuple(inputs[n] for n in names)

    g = grad(loss_and_inputs, has_aux=True)
    sizes = [layers[n].out_features for n in names]
    N, total = X.shape[0], sum(sizes)
    eps0 = {n: torch.zeros(N, d, dtype=prob.dtype, device=prob.device) for n, d in zip(names, sizes)}
    delta, acts = g(eps0)
    # one tangent per output unit of every layer: e_k at layer m, for all samples at once
    tangents = {}
    start = 0
    for n, d in zip(names, sizes):
        t = torch.zeros(total, N, d, dtype=prob.dtype, device=prob.device)
        t[torch.arange(start, start + d), :, torch.arange(d)] = 1.0
        tangents[n] = t
        start += d

    def response(t: dict[str, Tensor]):
        return jvp(g, (eps0,), (t,))[1]

    # chunks of tangents bound the vmapped forward/backward to ≈ 128 MiB (measured: ≈ 2.5× the
    # layers' inputs and outputs per tangent); one chunk is fastest where it fits
    acts_bytes = max(1, N * sum(a.shape[1] + d for a, d in zip(acts, sizes)) * X.element_size())
    step = max(1, min(total, (128 * 2**20) // (3 * acts_bytes)))
    parts = [vmap(response)({n: t[c:c + step] for n, t in tangents.items()}) for c in range(0, total, step)]
    xi = {n: torch.cat([p[0][n] for p in parts]) for n in names}
    psi = [torch.cat([p[1][i] for p in parts]) for i in range(len(names))]
    return LayerCurvature(names, sizes, {n: delta[n].detach() for n in names},
                          {n: a.detach() for n, a in zip(names, acts)},
                          {n: xi[n] for n in names}, {n: p for n, p in zip(names, psi)},
                          {n: (f"{n}." if n else "") + "bias" in prob.param_slices for n in names})


def pair_block(lc: LayerCurvature, l: str, m: str) -> Tensor:
    """H[W̄_l, W̄_m] in augmented layout (d_l·(in_l+1), d_m·(in_m+1)).

    Two row-major GEMMs with inner dimension N: T1[(o, p), (i, q)] = Ξ̃ (ā_l ⊙ ā_m) (as for the
    GGN, then permuted to (o, i, p, q)) and, when layer m feeds layer l,
    T2[o, (i, p, q)] = δ̃_l (Ψ ⊙ ā_m), already in (o, i, p, q) order.
    """
    Psi_lm = lc.Psi(l, m)
    if Psi_lm is None and lc.Psi(m, l) is not None:
        return pair_block(lc, m, l).T
    al, am, Xi = lc.abar(l), lc.abar(m), lc.Xi(l, m)
    N, o, p = Xi.shape
    i, q = al.shape[1], am.shape[1]
    Xt = Xi.permute(1, 2, 0).reshape(o * p, N)
    out = torch.empty(o, i, p, q, dtype=Xi.dtype, device=Xi.device)
    step = max(1, _CHUNK_BYTES // max(1, max(N, o * p) * q * Xi.element_size()))
    for s in range(0, i, step):  # chunks of the input dimension keep a ⊙ a and the product small
        e = min(i, s + step)
        AB = (al[:, s:e, None] * am[:, None, :]).reshape(N, -1)
        out[:, s:e] = (Xt @ AB).view(o, p, e - s, q).permute(0, 2, 1, 3)
    if Psi_lm is not None:
        dt = lc.delta[l].T.contiguous()  # (o, N)
        out4 = out.view(o, i, p * q)
        step = max(1, _CHUNK_BYTES // max(1, N * p * q * Xi.element_size()))
        for s in range(0, i, step):
            e = min(i, s + step)
            PA = (Psi_lm[:, s:e, :, None] * am[:, None, None, :]).reshape(N, -1)  # (N, (i-chunk, p, q))
            out4[:, s:e].add_((dt @ PA).view(o, e - s, p * q))
    return out.view(o * i, p * q)
