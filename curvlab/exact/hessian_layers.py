"""The exact Hessian of verified layers from pre-activation second derivatives.

**Single-position layers.** For a layer z_l = W_l a_l + b_l applied once per sample (a_l its input,
δ_l = ∂L/∂z_l), write the bias into an augmented input ā_l = [a_l, 1] and W̄_l = [W_l, b_l]
(:class:`~curvlab.linalg.layout.KronLayout`). Then, with

    Ξ_n^{lm} = ∂²L / ∂z_n,l ∂z_n,m        (per-sample Hessian w.r.t. pre-activations)
    Ψ_n^{lm} = ∂ā_n,l / ∂z_n,m            (how layer l's input responds to layer m's output),

the Hessian block between the weights of layers l and m is (rows (i, j), columns (k, q))

    H[W̄_l(i,j), W̄_m(k,q)] = Σ_n Ξ_n^{lm}[i,k] ā_n,l[j] ā_n,m[q]
                           + Σ_n δ_n,l[i] Ψ_n^{lm}[j,k] ā_n,m[q]  + (the same with l ↔ m, transposed).

Ψ^{lm} vanishes unless layer m comes before layer l, so each pair needs one of the two extra
terms, and the pair contracts as ONE matrix product Σ_n X_n ā_n,mᵀ with X_n = Ξ_n ⊗ ā_n,l + δ_n ⊗ Ψ_n
(2·N·P_l·P_m flops: the same floor as the GGN; a diagonal block by halves, as the GGN's). Ξ and Ψ
for all layers come from Σ_l d_out,l forward-over-reverse products in pre-activation space — one
per output unit of a layer, not one per parameter — each covering all samples at once (samples
are independent). This is the Hessian analogue of the layer-structured GGN in
:mod:`curvlab.exact.outer`.

**Layers with several positions** (``nn.Conv2d`` on unfolded patches, ``nn.Linear`` on (N, …, d_in)
inputs): z_l has T_l·d_l entries per sample, a_nt the input at position t, and

    H[W̄_l(o,i), W̄_m(p,j)] = Σ_n Σ_{t,t'} Ξ_n^{lm}[(t,o),(t',p)] ā_nt,l[i] ā_nt',m[j]
                           + Σ_n Σ_{t,t'} δ_nt,l[o] Ψ_n^{lm}[(t,i),(t',p)] ā_nt',m[j]   (m before l).

Ξ_n^{lm} is (T_l·d_l) × (T_m·d_m) per sample, so the products that give it are many and large
(digits-cnn: 512 per convolution, each N × 512 wide), and they are memory-bound. Two routes:

* **GGN plus the Ψ terms** (used for a layer m when it holds): split Ξ = Bᵀ Λ B + D, where
  Bᵀ Λ B is the Gauss-Newton part (the GGN of :mod:`curvlab.exact.outer`, at the floor) and
  D = ∇²_z ⟨ĝ, f(z)⟩ the residual (ĝ = ∂L/∂f fixed): the curvature of the network's own
  nonlinearities. D vanishes for piecewise-linear networks (ReLU, max-pooling) — and then
  H = GGN + the Ψ terms. Moreover, when every layer after m reads its input as an elementwise
  function of the previous layer's output only (activation, reshape: a *chain*), Ψ needs no
  product through the network at all: the first step is the elementwise derivative s = ∂a/∂z
  times the parameter direction e_p ⊗ ā_m[:, :, j], which lives in one output channel p, and later
  steps apply the layers' own weights. Both conditions are tested numerically on the problem at
  θ (:func:`structure`): D's rows vanish when one product D τ with a Gaussian τ does (D ≠ 0 gives
  D τ ≠ 0 with probability one), and a link is elementwise when one forward tangent τ through the
  whole network gives d a_next = s ⊙ dz at the next layer, s from the tangent 1 (tolerance 1000·ε
  relative; a non-elementwise or skipping dependence gives an O(1) difference).
* **Direct** (otherwise): Ξ and Ψ from forward-over-reverse products at z_m, for the pairs of m
  with itself and the layers after it. The tangents are either the T_m·d_m unit pre-activation
  directions (expanded afterwards into parameter directions, Σ_t' ā_nt',m[j] · response(t', p)) or
  the P_m = d_m·(d_in,m + 1) parameter directions e_p ⊗ ā_m[:, :, j] directly, whichever are fewer
  by a factor two: pre-activation directions when T_m·d_m ≤ P_m / 2, i.e. T_m ≤ (d_in,m + 1)/2 (a
  short sequence), parameter directions otherwise (a convolution over many positions: 64
  positions against 9 or 73 patch entries in digits-cnn).

Either way each pair of layers is contracted with GEMMs whose inner dimension is N·T (samples and
positions innermost), written by rows of folded [W b] blocks (:meth:`KronLayout.scatter`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap

from curvlab.exact.conv_gemm import gemm_convolutions
from curvlab.exact.outer import _CHUNK_BYTES, _kron_sum_symmetric_into
from curvlab.layers import Layer, Rule, survey
from curvlab.linalg.layout import KronLayout
from curvlab.problem import Problem

__all__ = ["single_use_linear_layers", "LayerCurvature", "layer_curvature", "pair_block", "Site", "layer_sites",
           "Structure", "structure", "tangent_mode", "chain_rows", "direct_rows"]


def single_use_linear_layers(prob: Problem, theta: Tensor | None = None) -> dict[str, nn.Linear]:
    """Return the verified layers (:func:`curvlab.layers.survey`) that are ``nn.Linear`` on (N, d_in) inputs.

    These are the layers whose Hessian blocks :func:`pair_block` computes. ``theta`` is accepted for
    compatibility; the survey is structural and cached on the problem.
    """
    return {k: L.module for k, L in survey(prob).layers.items() if L.single_position}


class LayerCurvature:
    """δ, ā, Ξ and Ψ of the single-use linear layers of a problem at θ (see the module docstring)."""

    def __init__(self, names: list[str], sizes: list[int], delta: dict[str, Tensor], acts: dict[str, Tensor],
                 xi: dict[str, Tensor], psi: dict[str, Tensor], has_bias: dict[str, bool]) -> None:
        self.names = names
        self.offset = dict(zip(names, [sum(sizes[:i]) for i in range(len(sizes))]))
        self.d_out = dict(zip(names, sizes))
        self.delta, self.acts, self.xi, self.psi, self.has_bias = delta, acts, xi, psi, has_bias

    def layout(self, name: str) -> KronLayout:
        """Return the folded layout [W b] of layer ``name``."""
        return KronLayout.of_layer(self.d_out[name], self.acts[name].shape[1], self.has_bias[name])

    def abar(self, name: str) -> Tensor:
        """ā = [a, 1] (or a without a trainable bias), shape (N, d_in(+1))."""
        return self.layout(name).augment(self.acts[name])

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
    T2[(i, p), (o, q)] = Ψ̃ (δ_l ⊙ ā_m) (i·p rows, a small right operand), added permuted. A diagonal block (l = m, where
    Ψ = 0) is computed by halves and is exactly symmetric.
    """
    Psi_lm = lc.Psi(l, m)
    if Psi_lm is None and lc.Psi(m, l) is not None:
        return pair_block(lc, m, l).T
    al, am, Xi = lc.abar(l), lc.abar(m), lc.Xi(l, m)
    N, o, p = Xi.shape
    i, q = al.shape[1], am.shape[1]
    if l == m:
        out = torch.empty(o * i, o * i, dtype=Xi.dtype, device=Xi.device)
        _kron_sum_symmetric_into(out, Xi, al)
        return out
    Xt = Xi.permute(1, 2, 0).reshape(o * p, N)
    out = torch.empty(o, i, p, q, dtype=Xi.dtype, device=Xi.device)
    step = max(1, _CHUNK_BYTES // max(1, max(N, o * p) * q * Xi.element_size()))
    for s in range(0, i, step):  # chunks of the input dimension keep a ⊙ a and the product small
        e = min(i, s + step)
        AB = (al[:, s:e, None] * am[:, None, :]).reshape(N, -1)
        out[:, s:e] = (Xt @ AB).view(o, p, e - s, q).permute(0, 2, 1, 3)
    if Psi_lm is not None:  # Σ_n Ψ_n[i, p] (δ_n[o] ā_n,m[q]): rows (i, p), inner N, columns (o, q)
        da = (lc.delta[l][:, :, None] * am[:, None, :]).reshape(N, o * q)
        d_in = lc.acts[l].shape[1]  # the bias row of Ψ is zero
        Pt = Psi_lm[:, :d_in].permute(1, 2, 0)  # (i, p, N)
        step = max(1, _CHUNK_BYTES // max(1, p * max(N, o * q) * Xi.element_size()))
        for s in range(0, d_in, step):
            e = min(d_in, s + step)
            T = Pt[s:e].reshape((e - s) * p, N) @ da  # ((i-chunk, p), (o, q))
            out[:, s:e].add_(T.view(e - s, p, o, q).permute(2, 0, 1, 3))
    return out.view(o * i, p * q)


# ============================================================================ layers at several positions
@dataclass
class Site:
    """One verified layer at θ: where its parameters sit, its shapes and its first-order quantities.

    ``delta`` is δ = ∂L/∂z as (N, T, d_out), ``abar`` the augmented input ā = [a, 1] as (N, T, q)
    (convolutions: unfolded patches), ``order`` the position of the layer's call in the forward pass.
    """

    name: str
    layer: Layer
    layout: KronLayout
    order: int
    z_shape: tuple[int, ...]
    in_shape: tuple[int, ...]
    delta: Tensor
    abar: Tensor
    weight: Tensor

    @property
    def module(self) -> nn.Module:
        """The layer's module."""
        return self.layer.module

    @property
    def rule(self) -> Rule:
        """The layer's verified rule (linear or convolution)."""
        return self.layer.rule

    @property
    def start(self) -> int:
        """Where the layer's parameters start in θ."""
        return self.layer.start

    @property
    def stop(self) -> int:
        """Where the layer's parameters stop in θ."""
        return self.layer.stop

    @property
    def single(self) -> bool:
        """Whether the layer is applied at a single position per sample."""
        return self.layer.single_position

    @property
    def positions(self) -> int:
        """T, the layer's number of positions per sample."""
        return self.abar.shape[1]

    @property
    def d_out(self) -> int:
        """The layer's number of outputs (rows of [W b])."""
        return self.layout.rows

    @property
    def d_in(self) -> int:
        """The layer's number of inputs (without the bias column)."""
        return self.layout.in_features

    def from_z(self, x: Tensor) -> Tensor:
        """(c, N, *z_shape) → (c, N, T, d_out)."""
        return self.rule.grads(x, x.shape[1])

    def to_z(self, x: Tensor) -> Tensor:
        """(c, N, T, d_out) → (c, N, *z_shape), the inverse of :meth:`from_z`."""
        c, n = x.shape[:2]
        if self.layer.kind == "conv2d":
            return x.transpose(2, 3).reshape(c, n, *self.z_shape)
        return x.reshape(c, n, *self.z_shape)

    def patches(self, x: Tensor) -> Tensor:
        """Layer inputs (c, N, *in_shape) → (c, N, T, d_in) (convolutions: unfolded)."""
        c, n = x.shape[:2]
        a = self.rule.inputs(self.module, x.reshape(c * n, *self.in_shape))
        return a.reshape(c, n, *a.shape[1:])


class _Stop(Exception):
    """Raised in a forward hook once everything a tangent map needs has been recorded."""


def _hooked(prob: Problem, params: dict[str, Tensor], sites: dict[str, Site] | dict[str, nn.Module],
            add: dict[str, Tensor], inputs: tuple[str, ...] = (), outputs: tuple[str, ...] = (),
            stop: str | None = None) -> tuple[Tensor | None, dict[str, Tensor], dict[str, Tensor], list[str]]:
    """One forward pass with ε added to the outputs of the layers in ``add``.

    Returns the model output (None when stopped after recording the input of ``stop``), the
    inputs and the (perturbed) outputs of the named layers, and the layers' firing order.
    """
    modules = {n: (s.module if isinstance(s, Site) else s) for n, s in sites.items()}
    ins: dict[str, Tensor] = {}
    outs: dict[str, Tensor] = {}
    order: list[str] = []

    def pre(name: str) -> Callable:
        def hook(_m: nn.Module, inp: tuple) -> None:
            ins[name] = inp[0]
            if name == stop:
                raise _Stop

        return hook

    def post(name: str) -> Callable:
        def hook(_m: nn.Module, _inp: tuple, out: Tensor) -> Tensor:
            order.append(name)
            out = out + add[name] if name in add else out
            if name in outputs:
                outs[name] = out
                return out.clone()  # in-place operations downstream must not touch the recorded z
            return out

        return hook

    handles = [modules[n].register_forward_pre_hook(pre(n)) for n in set(inputs) | ({stop} - {None})]
    handles += [m.register_forward_hook(post(n)) for n, m in modules.items()]
    try:
        f = functional_call(prob.model, params, (prob.X,))
    except _Stop:
        f = None
    finally:
        for h in handles:
            h.remove()
    return f, {n: ins[n] for n in inputs}, {n: outs[n] for n in outputs}, order


def _params(prob: Problem, theta: Tensor) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in prob.params(theta).items()}


def layer_sites(prob: Problem, theta: Tensor | None = None, names: list[str] | None = None) -> dict[str, Site]:
    """Return the :class:`Site` of every verified layer (or of ``names``) at θ, in firing order.

    One gradient of L with respect to perturbations ε added to every layer's output gives δ; the
    layers' inputs are recorded on the way.
    """
    theta = prob.theta if theta is None else theta
    layers = survey(prob).layers
    names = list(layers) if names is None else list(names)
    params = _params(prob, theta)
    mods = {n: layers[n].module for n in names}
    f0, ins, outs, order = _hooked(prob, params, mods, {}, tuple(names), tuple(names))
    shapes = {n: tuple(outs[n].shape[1:]) for n in names}

    def loss(eps: dict[str, Tensor]) -> Tensor:
        return prob.likelihood.loss(_hooked(prob, params, mods, eps)[0], prob.y)

    zeros = {n: torch.zeros(outs[n].shape, dtype=prob.dtype, device=prob.device) for n in names}
    delta = grad(loss)(zeros)
    sites = {}
    for n in sorted(names, key=order.index):
        L = layers[n]
        a = L.rule.inputs(L.module, ins[n].detach())
        lay = KronLayout.of_layer(shapes[n][0] if L.kind == "conv2d" else shapes[n][-1], a.shape[-1],
                                  L.bias is not None)
        sites[n] = Site(n, L, lay, order.index(n), shapes[n], tuple(ins[n].shape[1:]),
                        L.rule.grads(delta[n][None].detach(), prob.num_samples)[0],
                        lay.augment(a).contiguous(), params[L.weight].reshape(lay.rows, -1))
    return sites


# ---------------------------------------------------------------------------------- structure tests
@dataclass
class Structure:
    """What the numerical tests of the module docstring found at θ.

    ``residual``: the layers whose row of D = ∇²_z ⟨ĝ, f⟩ is nonzero; ``links``: for each layer v
    whose input is an elementwise function of the previous layer u's output only, s = ∂a_v/∂z_u
    (shape (N, *z_shape of u)); ``previous``: v → u for consecutive layers in firing order.
    """

    residual: set[str]
    links: dict[str, Tensor]
    previous: dict[str, str]

    def chained(self, names: list[str], u: str) -> bool:
        """Whether every link from u to the last of ``names`` (firing order) is elementwise."""
        after = names[names.index(u) + 1:]
        return all(v in self.links for v in after)

    def fast(self, names: list[str], u: str) -> bool:
        """Whether layer u's pairs with the layers after it are GGN + the chained Ψ terms."""
        return u not in self.residual and self.chained(names, u)


def _gaussian(shape: tuple[int, ...], like: Tensor, seed: int) -> Tensor:
    gen = torch.Generator(device=like.device).manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=like.dtype, device=like.device)


def _residual_rows(prob: Problem, params: dict[str, Tensor], sites: dict[str, Site]) -> set[str]:
    """Layers v with (D τ)_v ≠ 0 for a Gaussian τ: D = ∇²_ε ⟨ĝ, f(ε)⟩, ĝ = ∂L/∂f (module docstring)."""
    with torch.no_grad():
        f0 = functional_call(prob.model, params, (prob.X,))
    ghat = (prob.loss_scale * prob.likelihood.grad_output(f0, prob.y)).detach()

    def phi(eps: dict[str, Tensor]) -> Tensor:
        return (ghat * _hooked(prob, params, sites, eps)[0]).sum()

    zeros = {n: torch.zeros(prob.num_samples, *s.z_shape, dtype=prob.dtype, device=prob.device)
             for n, s in sites.items()}
    tau = {n: _gaussian(z.shape, z, 1 + i) for i, (n, z) in enumerate(zeros.items())}
    Dt = jvp(grad(phi), (zeros,), (tau,))[1]
    return {n for n in sites if bool(Dt[n].ne(0).any())}


def _elementwise_links(prob: Problem, params: dict[str, Tensor], sites: dict[str, Site],
                       previous: dict[str, str]) -> dict[str, Tensor]:
    """Return v → s = ∂a_v/∂z_u for the consecutive pairs (u, v) that pass the link test (module docstring)."""
    N = prob.num_samples
    zeros = {n: torch.zeros(N, *s.z_shape, dtype=prob.dtype, device=prob.device) for n, s in sites.items()}
    cand = {}
    for v, u in previous.items():
        if math.prod(sites[v].in_shape) != math.prod(sites[u].z_shape):
            continue

        def to_input(eu: Tensor, u: str = u, v: str = v) -> Tensor:
            return _hooked(prob, params, sites, {u: eu}, (v,), stop=v)[1][v]

        cand[v] = jvp(to_input, (zeros[u],), (torch.ones_like(zeros[u]),))[1].reshape(N, *sites[u].z_shape)
    if not cand:
        return {}

    def everything(eps: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        _, ins, outs, _ = _hooked(prob, params, sites, eps, tuple(cand), tuple(previous[v] for v in cand))
        return ins, outs

    tau = {n: _gaussian(z.shape, z, 101 + i) for i, (n, z) in enumerate(zeros.items())}
    d_in, d_out = jvp(everything, (zeros,), (tau,))[1]
    tol = 1e3 * torch.finfo(prob.dtype).eps
    links = {}
    for v, s in cand.items():
        got, want = d_in[v].reshape(N, -1), (s * d_out[previous[v]]).reshape(N, -1)
        if float((got - want).abs().max()) <= tol * max(float(got.abs().max()), float(want.abs().max()), 1e-300):
            links[v] = s.detach()
    return links


def structure(prob: Problem, sites: dict[str, Site], theta: Tensor | None = None) -> Structure:
    """Test D = 0 and the elementwise links at θ (one product D τ, one forward tangent per layer)."""
    theta = prob.theta if theta is None else theta
    params = _params(prob, theta)
    names = list(sites)  # firing order
    previous = {names[i + 1]: names[i] for i in range(len(names) - 1)}
    return Structure(_residual_rows(prob, params, sites), _elementwise_links(prob, params, sites, previous),
                     previous)


# ---------------------------------------------------------------------------------- tangents and rows
def tangent_mode(site: Site) -> str:
    """``"pre"`` (T·d_out unit pre-activation directions) when T·d_out ≤ P/2, else ``"param"``."""
    return "pre" if site.positions * site.d_out <= site.layout.size // 2 else "param"


def _groups(count: int, per: int, budget: int) -> Iterator[tuple[int, int]]:
    """Consecutive ranges of ``count`` output channels, ≈ ``budget`` tangents (``per`` each) at a time."""
    step = max(1, budget // max(1, per))
    for p0 in range(0, count, step):
        yield p0, min(count, p0 + step)


def _pre_tangents(u: Site, p0: int, p1: int) -> Tensor:
    """One-hot directions at z_u for channels p0 … p1 − 1 and every position, ordered (p, t)."""
    T, g = u.positions, p1 - p0
    t = torch.zeros(g * T, u.delta.shape[0], T, u.d_out, dtype=u.abar.dtype, device=u.abar.device)
    k = torch.arange(g * T, device=t.device)
    t[k, :, k % T, p0 + k // T] = 1.0
    return u.to_z(t)


def _param_tangents(u: Site, p0: int, p1: int) -> Tensor:
    """Parameter directions e_p ⊗ ā_u[:, :, j] at z_u for folded rows (p, j), p in p0 … p1 − 1."""
    q, g = u.layout.cols, p1 - p0
    t = torch.zeros(g * q, u.delta.shape[0], u.positions, u.d_out, dtype=u.abar.dtype, device=u.abar.device)
    k = torch.arange(g * q, device=t.device)
    t[k, :, :, p0 + k // q] = u.abar[:, :, k % q].permute(2, 0, 1)
    return u.to_z(t)


def _expand(u: Site, g: int, R: Tensor) -> Tensor:
    """Map responses R (g·T, …) to pre-activation directions (p, t) to parameter directions (p, j).

    Σ_t ā_nt[j] R[(p, t), n, …], shape (g·q, …).
    """
    T, q = u.positions, u.layout.cols
    Rv = R.reshape(g, T, *R.shape[1:])
    out = torch.einsum("ptn...,ntj->pjn...", Rv, u.abar)
    return out.reshape(g * q, *R.shape[1:])


def _weight_rows(v: Site, d_delta: Tensor | None, d_patches: Tensor | None) -> Tensor:
    """X[k, o, i] = Σ_{n,t} dδ_k[n,t,o] ā_v[n,t,i] + δ_v[n,t,o] dā_k[n,t,i]: (c, d_out, q) folded.

    ``d_delta`` (c, N, T, d_out) and ``d_patches`` (c, N, T, d_in) are responses to c directions;
    the bias column of dā is zero (the constant input does not move).
    """
    c = (d_delta if d_delta is not None else d_patches).shape[0]
    n, T = v.delta.shape[:2]
    X = torch.zeros(c, v.d_out, v.layout.cols, dtype=v.abar.dtype, device=v.abar.device)
    if d_delta is not None:
        left = d_delta.permute(0, 3, 1, 2).reshape(c * v.d_out, n * T)  # samples and positions innermost
        X += (left @ v.abar.reshape(n * T, -1)).view(c, v.d_out, -1)
    if d_patches is not None:
        dT = v.delta.reshape(n * T, v.d_out).T.contiguous()
        X[:, :, :v.d_in] += torch.matmul(dT, d_patches.reshape(c, n * T, v.d_in))
    return X


# ---------------------------------------------------------------------------------- the direct route
def _direct_map(prob: Problem, params: dict[str, Tensor], sites: dict[str, Site], u: str,
                targets: list[str]) -> Callable[[Tensor], tuple[dict[str, Tensor], dict[str, Tensor]]]:
    """Return t ↦ (dδ_v for v in targets, d a_v for v after u): jvp of ∇_ε L in direction t at z_u."""
    after = tuple(v for v in targets if v != u)
    zeros = {v: torch.zeros(prob.num_samples, *sites[v].z_shape, dtype=prob.dtype, device=prob.device)
             for v in {*targets, u}}

    def loss(eps: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        f, ins, _, _ = _hooked(prob, params, sites, eps, after)
        return prob.likelihood.loss(f, prob.y), ins

    def response(eu: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        g, ins = grad(loss, has_aux=True)({**zeros, u: eu})
        return {v: g[v] for v in targets}, ins

    return lambda t: jvp(response, (zeros[u],), (t,))[1]


def direct_rows(prob: Problem, sites: dict[str, Site], u: str, targets: list[str],
                theta: Tensor | None = None) -> Iterator[tuple[int, int, dict[str, Tensor]]]:
    """Yield the rows of H[W̄_u, W̄_v] for the layers v in ``targets`` by the direct route.

    Each item is (p0, p1, {v: X}) with X the folded rows (p, j), p0 ≤ p < p1, of H[W̄_u, W̄_v] for
    every v in ``targets`` (u and layers after it), shape ((p1 − p0)·q_u, d_v·q_v).
    """
    theta = prob.theta if theta is None else theta
    su = sites[u]
    resp = vmap(_direct_map(prob, _params(prob, theta), sites, u, targets))
    mode = tangent_mode(su)
    per = su.positions if mode == "pre" else su.layout.cols
    width = sum(math.prod(sites[v].z_shape) + math.prod(sites[v].in_shape) for v in {*targets, u})
    budget = max(1, (128 * 2**20) // (4 * prob.num_samples * width * su.abar.element_size()))
    for p0, p1 in _groups(su.d_out, per, budget):
        t = _pre_tangents(su, p0, p1) if mode == "pre" else _param_tangents(su, p0, p1)
        with gemm_convolutions(prob.model, prob.dtype):
            d_delta, d_in = resp(t)
        out = {}
        for v in targets:
            sv = sites[v]
            dd = sv.from_z(d_delta[v])
            dp = sv.patches(d_in[v]) if v in d_in else None
            if mode == "pre":
                dd = _expand(su, p1 - p0, dd)
                dp = None if dp is None else _expand(su, p1 - p0, dp)
            out[v] = _weight_rows(sv, dd, dp).reshape(-1, sv.layout.size)
        yield p0, p1, out


# ---------------------------------------------------------------------------------- the chained route
def _index_maps(u: Site, v: Site) -> tuple[Tensor, Tensor, Tensor]:
    """Return, for each patch entry (t, i) of v, the channel and position of u that it reads.

    For the patches of v whose inputs are u's outputs reshaped: the channel and position of u that
    each patch entry (t, i) reads, and whether it reads one at all (not padding); (T_v, d_in,v).
    """
    size = math.prod(u.z_shape)
    flat = torch.arange(size, dtype=torch.float64, device=u.abar.device)
    grid = u.from_z(flat.reshape(1, 1, *u.z_shape))[0, 0].long()  # (T_u, d_u): flat index of (t, p)
    chan = torch.empty(size, dtype=torch.long, device=flat.device)
    pos = torch.empty_like(chan)
    chan[grid] = torch.arange(u.d_out, device=flat.device).expand_as(grid)
    pos[grid] = torch.arange(u.positions, device=flat.device)[:, None].expand_as(grid)
    idx = v.patches((flat + 1).reshape(1, 1, *v.in_shape).to(v.abar.dtype))[0, 0].round().long() - 1
    valid = idx >= 0
    idx = idx.clamp(min=0)
    return chan[idx], pos[idx], valid


def chain_rows(sites: dict[str, Site], links: dict[str, Tensor], u: str,
               targets: list[str]) -> Iterator[tuple[int, int, dict[str, Tensor]]]:
    """Yield the Ψ-term rows of H[W̄_u, W̄_v] for the layers v in ``targets`` after u by the chained route.

    Each item is (p0, p1, {v: X}) with X the folded rows (p, j), p0 ≤ p < p1, of the Ψ terms of
    H[W̄_u, W̄_v], shape ((p1 − p0)·q_u, d_v·q_v) — the chained route (module docstring). Needs the
    elementwise links of every layer after u (``links``, from :func:`structure`).

    The direction (p, j) reaches the patches of the next layer v1 as dā[n,t,i] = s ⊙ ā_u[n, pos(t,i), j]
    on the entries (t, i) that read channel p of z_u (Z below, gathered once per group of channels,
    patch column outermost and samples × positions innermost), so its Ψ rows are one GEMM Z δ_v1 for
    the whole group, and its pre-activation tangent at v1 is W_v1 Z on channel p's columns; later
    layers take the tangents densely.
    """
    names = list(sites)
    chain = names[names.index(u) + 1:]
    last = max((chain.index(v) for v in targets if v in chain), default=-1)
    if last < 0:
        return
    chain = chain[:last + 1]
    su, v1 = sites[u], sites[chain[0]]
    chan, pos, valid = _index_maps(su, v1)
    if v1.positions == 1:  # a single-position layer on u's reshaped output (a classifier head)
        yield from _flat_rows(sites, links, u, chain, targets, chan[0], pos[0])
        return
    col_chan = torch.where(valid, chan, -1).amax(0)  # a channel each patch column reads (−1: none)
    uniform = bool(((chan == col_chan) | ~valid).all())  # every column reads one channel only
    S1 = v1.patches(links[chain[0]].reshape(1, -1, *v1.in_shape))[0]  # (N, T1, d_in1): s at each patch entry
    n, T1 = v1.delta.shape[:2]
    q = su.layout.cols
    d1 = v1.delta.reshape(n * T1, v1.d_out)  # ((n, t), o)
    aQ = su.abar.permute(2, 0, 1).contiguous()  # (q, N, T_u)
    per = n * T1 * q * max(1, v1.d_in // su.d_out)  # entries of Z per channel
    for p0, p1 in _groups(su.d_out, per, 4 * _CHUNK_BYTES // su.abar.element_size() if uniform else 1):
        inside = valid & (chan >= p0) & (chan < p1)
        cols = inside.any(0).nonzero().flatten()
        # Z[c, j, n, t] = s ⊙ ā_u[n, pos(t, c), j] on the entries of channels p0 … p1 − 1: (C, q, N, T1)
        patterns, which = torch.unique(pos[:, cols], dim=1, return_inverse=True)  # conv: one per kernel offset
        G = aQ[:, :, patterns.T].permute(2, 0, 1, 3)  # (patterns, q, N, T1): ā_u at each pattern's positions
        factor = (S1[:, :, cols] * inside[:, cols]).permute(2, 0, 1).contiguous()  # (C, N, T1)
        Z = torch.empty(len(cols), q, n, T1, dtype=aQ.dtype, device=aQ.device)
        for k in range(len(cols)):
            torch.mul(G[which[k]], factor[k], out=Z[k])
        Y = (Z.view(-1, n * T1) @ d1).view(len(cols), q, v1.d_out)  # Ψ rows of v1 for the group
        out: dict[str, list[Tensor]] = {v: [] for v in chain if v in targets}
        for p in range(p0, p1):
            here = (chan[:, cols] == p) & valid[:, cols]  # entries (t, c) that read channel p
            mine = here.any(0).nonzero().flatten()
            if chain[0] in targets:
                X = torch.zeros(q, v1.d_out, v1.layout.cols, dtype=Z.dtype, device=Z.device)
                X[:, :, cols[mine]] = Y[mine].permute(1, 2, 0)
                out[chain[0]].append(X.reshape(q, -1))
            if len(chain) > 1:  # the tangents at z_v1 of the directions (p, j): (q, N, T1, d_v1)
                Zp = _take(Z, mine) if uniform else Z * here.T[:, None, None, :]
                dz = v1.weight[:, cols[mine] if uniform else cols] @ Zp.reshape(Zp.shape[0], -1)
                dz = dz.view(v1.d_out, q, n, T1).permute(1, 2, 3, 0)
                for v, Xv in _propagate(sites, links, chain, dz, targets).items():
                    out[v].append(Xv)
        yield p0, p1, {v: torch.cat(Xs) for v, Xs in out.items()}


def _take(Z: Tensor, idx: Tensor) -> Tensor:
    """Z[idx] along the first dimension, as a view when ``idx`` is a contiguous range."""
    if len(idx) and int(idx[-1] - idx[0]) + 1 == len(idx):
        return Z[int(idx[0]):int(idx[-1]) + 1]
    return Z[idx]


def _flat_rows(sites: dict[str, Site], links: dict[str, Tensor], u: str, chain: list[str], targets: list[str],
               chan: Tensor, pos: Tensor) -> Iterator[tuple[int, int, dict[str, Tensor]]]:
    """:func:`chain_rows` when the next layer v1 reads u's output reshaped, at one position.

    Input column c of v1 is channel chan(c), position pos(c) of z_u, so the Ψ rows are, for each
    position t of u, one GEMM (δ_v1 ⊗ s[:, c(·, t)])ᵀ ā_u[:, t, :] over the samples — no tensor of
    all directions' patches is formed; the tangents at z_v1 are Σ_t (W_v1 ⊙ s)[·, c(p, t)] ā_u[t].
    """
    su, v1 = sites[u], sites[chain[0]]
    n, q, d_u, o = su.abar.shape[0], su.layout.cols, su.d_out, v1.d_out
    S = links[chain[0]].reshape(n, -1)  # (N, d_in1): s at each input of v1
    dT, sT = v1.delta[:, 0].T.contiguous(), S.T.contiguous()  # (o, N), (d_in1, N)
    col = torch.empty(d_u, su.positions, dtype=torch.long, device=S.device)
    col[chan, pos] = torch.arange(len(chan), device=S.device)  # c(p, t)
    X = torch.zeros(d_u, q, o, v1.layout.cols, dtype=S.dtype, device=S.device)
    every = torch.arange(d_u, device=S.device)
    for t in range(su.positions):
        c = col[:, t]
        left = (dT[:, None] * sT[c][None]).reshape(o * d_u, n)  # ((o, p), N), row-major
        X[every, :, :, c] = (left @ su.abar[:, t, :]).view(o, d_u, q).permute(1, 2, 0)
    out = {v1.name: X.reshape(d_u * q, -1)} if v1.name in targets else {}
    if len(chain) > 1:  # dz[(p, j), n, o2] = Σ_t W[o2, c(p,t)] s[n, c(p,t)] ā_u[n, t, j]
        K = v1.weight[:, col].permute(1, 0, 2)[None] * S[:, col][:, :, None, :]  # (N, d_u, o2, T_u)
        dz = (K.reshape(n, d_u * o, -1) @ su.abar).view(n, d_u, o, q).permute(1, 3, 0, 2)
        for v, Xv in _propagate(sites, links, chain, dz.reshape(d_u * q, n, 1, o), targets).items():
            out[v] = Xv
    yield 0, d_u, out


def _propagate(sites: dict[str, Site], links: dict[str, Tensor], chain: list[str], dz: Tensor,
               targets: list[str]) -> dict[str, Tensor]:
    """Push tangents dz (c, N, T, d) at the first layer of ``chain`` through the later links (densely).

    Return the Ψ rows (c, d_v·q_v) of every target among them.
    """
    out = {}
    for prev, v in zip(chain, chain[1:]):
        sp, sv = sites[prev], sites[v]
        d_input = torch.empty(dz.shape[0], *links[v].shape, dtype=dz.dtype, device=dz.device)
        torch.mul(links[v][None], sp.to_z(dz), out=d_input)  # one pass: the layout change and s ⊙
        d_input = d_input.view(dz.shape[0], -1, *sv.in_shape)
        da = sv.patches(d_input)  # (c, N, T_v, d_in)
        if v in targets:
            out[v] = _weight_rows(sv, None, da).reshape(dz.shape[0], -1)
        if v != chain[-1]:
            dz = da @ sv.weight.T
    return out
