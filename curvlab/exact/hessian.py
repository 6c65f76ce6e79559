"""The exact Hessian ∇²L(θ).

Parameters of verified layers (:func:`curvlab.layers.survey`: ``nn.Linear`` and ``nn.Conv2d``
whose weights reach the loss through one call) get their blocks from pre-activation quantities
(:mod:`curvlab.exact.hessian_layers`): pairs of single-position linear layers from Σ_l d_out,l
Hessian-vector products in pre-activation space plus one matrix product per pair; pairs with a
layer at several positions (convolutions, linear layers on sequences) from the tangents of the
earlier layer — as GGN + Ψ terms along a chain of elementwise links when the network's residual
curvature vanishes there (ReLU networks; tested at θ), directly otherwise — with GEMMs over
samples and positions. Every other parameter (normalisation, shared or tied layers …) gets its
columns from vmapped Hessian-vector products over chunks of basis vectors: the forward-over-reverse
product ∂/∂ε ∇L(θ + ε e_j) (``torch.func.jvp`` of ``torch.func.grad``). For ``block`` each block
differentiates only its own sub-vector θ_b (H_bb = ∇²_{θ_b} L), and ``diag`` keeps only the
diagonal, so neither ever holds the rest of the matrix. Memory: one chunk of tangents through the
network (chunk × N × activations), the per-layer pre-activation curvature, and the result.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import grad, jvp, vmap

from curvlab import memory
from curvlab.capture import Capture, GenericRows, LayerIO, capture, output_cotangents
from curvlab.exact.conv_gemm import gemm_convolutions
from curvlab.exact.hessian_layers import (
    Site,
    Structure,
    chain_rows,
    direct_rows,
    layer_curvature,
    layer_sites,
    pair_block,
    structure,
)
from curvlab.exact.outer import _pair, diag_from_capture, kron_parts_into, symmetrize_
from curvlab.layers import survey
from curvlab.linalg import BlockDiagonal, Dense, Diagonal, KronLayout
from curvlab.problem import Problem

__all__ = ["hessian_dense", "hessian_block", "hessian_diag", "default_chunk", "activation_count"]


def activation_count(prob: Problem) -> int:
    """Return the entries of every leaf module's output over the whole batch.

    From the cached survey of the model: what one tangent or cotangent costs to push through the
    network.
    """
    return int(round(survey(prob).activations_per_sample * prob.num_samples))


def default_chunk(prob: Problem) -> int:
    """Basis vectors per vmapped chunk: ≈ 128 MiB of tangent activations, between 8 and 256."""
    per_vector = max(1, 4 * activation_count(prob) * prob.theta.element_size())
    return int(min(256, max(8, (128 * 2**20) // per_vector)))


def _fast_conv(prob: Problem):
    """float64: convolutions as im2col + GEMM (see :mod:`curvlab.exact.conv_gemm`); else nothing."""
    return gemm_convolutions(prob.model, prob.dtype)


def _sub_loss(prob: Problem, theta: Tensor, s: slice):
    before, after = theta[:s.start], theta[s.stop:]

    def loss(sub: Tensor) -> Tensor:
        return prob.loss_tensor(torch.cat([before, sub, after]))

    return loss


def _columns(prob: Problem, theta: Tensor, s: slice, chunk: int):
    """Yield (j0, j1, H[s, s.start+j0 : s.start+j1]) for consecutive chunks of the block's columns."""
    sub = theta[s].detach()
    g = grad(_sub_loss(prob, theta.detach(), s))

    def hvp(v: Tensor) -> Tensor:
        return jvp(g, (sub,), (v,))[1]

    n = s.stop - s.start
    eye = torch.eye(n, dtype=theta.dtype, device=theta.device)
    for j0 in range(0, n, chunk):
        j1 = min(n, j0 + chunk)
        with _fast_conv(prob):
            cols = vmap(hvp)(eye[j0:j1]).T  # (n, j1 - j0)
        yield j0, j1, cols


def _hvp_columns(prob: Problem, theta: Tensor, idx: Tensor, chunk: int):
    """Yield (positions, H[:, positions]) for chunks of the parameter positions ``idx``."""
    g = grad(prob.loss_tensor)
    th = theta.detach()

    def hvp(v: Tensor) -> Tensor:
        return jvp(g, (th,), (v,))[1]

    for c in range(0, len(idx), chunk):
        pos = idx[c:c + chunk]
        E = torch.zeros(len(pos), prob.num_params, dtype=prob.dtype, device=prob.device)
        E[torch.arange(len(pos)), pos] = 1.0
        with _fast_conv(prob):
            cols = vmap(hvp)(E).T
        yield pos, cols


class _Plan:
    """The layer-structured part of the Hessian of a problem at θ: which layers, by which route.

    Single-position layers pair with each other through :func:`pair_block`; every pair with a
    layer at several positions is computed from the tangents of the earlier of the two layers (in
    firing order), either as GGN + chained Ψ terms or directly (:mod:`curvlab.exact.hessian_layers`).
    Sites, the structure tests and the GGN capture are computed once, when first needed.
    """

    def __init__(self, prob: Problem, theta: Tensor) -> None:
        self.prob, self.theta = prob, theta
        self.layers = survey(prob).layers
        self._sites: dict[str, Site] | None = None
        self._structure: Structure | None = None
        self._pieces: dict[str, LayerIO | GenericRows] | None = None

    @property
    def sites(self) -> dict[str, Site]:
        if self._sites is None:
            self._sites = layer_sites(self.prob, self.theta)
        return self._sites

    @property
    def structure(self) -> Structure:
        if self._structure is None:
            self._structure = structure(self.prob, self.sites, self.theta)
        return self._structure

    @property
    def pieces(self) -> dict[str, LayerIO | GenericRows]:
        """(a, g) of every verified layer under the GGN's output cotangents (curvlab.capture)."""
        if self._pieces is None:
            cap = capture(self.prob, output_cotangents(self.prob, "type2"), self.theta,
                          {n: L.module for n, L in self.layers.items()}, generic=False)
            # layers at several positions pair through their explicit rows: form them once
            self._pieces = {p.name: p if p.positions == 1 else GenericRows((p.name,), p.start, p.jacobian_rows())
                            for p in cap.pieces}
        return self._pieces

    def layout(self, name: str) -> KronLayout:
        L = self.layers[name]
        m = L.module
        d_out = m.out_channels if L.kind == "conv2d" else m.out_features
        return KronLayout(d_out, (L.stop - L.start) // d_out, L.bias is not None)

    def covering(self, b) -> list[str] | None:
        """Return the verified layers that make up partition block b exactly (θ order), or None."""
        inside = [n for n, L in self.layers.items() if L.start >= b.slice.start and L.stop <= b.slice.stop]
        if sum(self.layers[n].stop - self.layers[n].start for n in inside) != b.size:
            return None
        return inside

    def fill(self, out: Tensor, names: list[str], offset: int = 0) -> None:
        """Write H[θ_names, θ_names] into ``out`` (rows and columns θ[offset:…], symmetric)."""
        single = [n for n in names if self.layers[n].single_position]
        if single:
            self._fill_single(out, single, offset)
        if len(single) < len(names):
            self._fill_shared(out, names, offset)

    def _block(self, out: Tensor, l: str, m: str, offset: int) -> Tensor:
        L, M = self.layers[l], self.layers[m]
        return out[L.start - offset:L.stop - offset, M.start - offset:M.stop - offset]

    def _mirror(self, out: Tensor, l: str, m: str, offset: int) -> None:
        """H[m, l] = H[l, m]ᵀ, or exact symmetry of a diagonal block."""
        if l == m:
            symmetrize_(self._block(out, l, l, offset))
        else:
            self._block(out, m, l, offset).copy_(self._block(out, l, m, offset).T)

    def _fill_single(self, out: Tensor, names: list[str], offset: int) -> None:
        lc = layer_curvature(self.prob, {n: self.layers[n].module for n in names}, self.theta)
        for a, l in enumerate(names):
            for m in names[a:]:
                if l == m:  # Σ_n Ξ^{ll} ⊗ ā ā^T (Ψ^{ll} = 0), straight into θ layout, exactly symmetric
                    ab, lay = lc.abar(l), lc.layout(l)
                    kron_parts_into(self._block(out, l, l, offset), lc.Xi(l, l), ab, ab, lay, lay, symmetric=True)
                    continue
                T = pair_block(lc, l, m)
                lc.layout(l).scatter(self._block(out, l, m, offset), T, lc.layout(m))
                del T
                self._mirror(out, l, m, offset)  # the transposed block, copied from θ layout

    def _fill_shared(self, out: Tensor, names: list[str], offset: int) -> None:
        sites, st = self.sites, self.structure
        order = list(sites)
        inside = sorted(names, key=order.index)
        for a, u in enumerate(inside):
            single_u = self.layers[u].single_position
            targets = [v for v in inside[a:] if not (single_u and self.layers[v].single_position)]
            if not targets:
                continue
            lu, fast = self.layout(u), st.fast(order, u)
            if fast:  # GGN + the chained Ψ terms
                for v in targets:
                    _pair(self.pieces[u], self.pieces[v], self._block(out, u, v, offset))
                rows = chain_rows(sites, st.links, u, targets)
            else:
                rows = direct_rows(self.prob, sites, u, targets, self.theta)
            for p0, p1, X in rows:
                for v, Xv in X.items():
                    lu.scatter(self._block(out, u, v, offset), Xv, self.layout(v), slice(p0, p1), accumulate=fast)
            for v in targets:
                self._mirror(out, u, v, offset)

    def diagonal(self, out: Tensor, name: str) -> None:
        """Write diag H[θ_name, θ_name] into its range of ``out`` (the flat diagonal)."""
        L = self.layers[name]
        if L.single_position:  # diag of Σ_n Ξ^{ll} ⊗ ā ā^T (Ψ^{ll} = 0)
            lc = layer_curvature(self.prob, {name: L.module}, self.theta)
            D = lc.Xi(name, name).diagonal(dim1=1, dim2=2).T @ lc.abar(name) ** 2  # (o, i(+1))
            for cols, rng in lc.layout(name).parts():
                out[L.start + rng.start:L.start + rng.stop] = D[:, cols].reshape(-1)
        elif self.structure.fast(list(self.sites), name):  # the GGN's diagonal (Ψ^{ll} = 0, D^{ll} = 0)
            piece = self.pieces[name]
            out[L.start:L.stop] = diag_from_capture(Capture([piece], out, 0), L.stop).diag[L.start:]
        else:
            lay = self.layout(name)
            for p0, p1, X in direct_rows(self.prob, self.sites, name, [name], self.theta):
                rows = X[name].view(p1 - p0, lay.cols, lay.rows, lay.cols)
                fold = rows[torch.arange(p1 - p0), :, torch.arange(p0, p1), :].diagonal(dim1=1, dim2=2)
                for cols, rng in lay.parts(slice(p0, p1)):
                    out[L.start + rng.start:L.start + rng.stop] = fold[:, cols].reshape(-1)


def hessian_dense(prob: Problem, theta: Tensor | None = None, chunk: int | None = None) -> Dense:
    """Return the exact Hessian ∇²L(θ) as a dense P×P matrix (layer blocks, then HVP columns)."""
    theta = prob.theta if theta is None else theta
    P = prob.num_params
    memory.check((P, P), prob.dtype, "the dense Hessian")
    H = torch.empty(P, P, dtype=prob.dtype, device=prob.device)
    plan = _Plan(prob, theta)
    if plan.layers:
        plan.fill(H, list(plan.layers))
    covered = torch.zeros(P, dtype=torch.bool)
    for L in plan.layers.values():
        covered[L.start:L.stop] = True
    rest = (~covered).nonzero().flatten().to(prob.device)
    if len(rest):
        chunk = chunk or default_chunk(prob)
        for pos, cols in _hvp_columns(prob, theta, rest, chunk):
            H[:, pos] = cols
            H[pos, :] = cols.T
        Hr = H[rest[:, None], rest[None, :]]
        H[rest[:, None], rest[None, :]] = symmetrize_(Hr)
    return Dense(H)


def hessian_block(prob: Problem, theta: Tensor | None = None, chunk: int | None = None) -> BlockDiagonal:
    """Return the diagonal blocks H_bb = ∇²_{θ_b} L of the partition as a BlockDiagonal."""
    theta = prob.theta if theta is None else theta
    plan = _Plan(prob, theta)
    blocks = []
    for b in prob.partition:
        memory.check((b.size, b.size), prob.dtype, f"Hessian block {b.name!r}")
        Hb = torch.empty(b.size, b.size, dtype=prob.dtype, device=prob.device)
        names = plan.covering(b)
        if names:
            plan.fill(Hb, names, b.slice.start)
        else:
            for j0, j1, cols in _columns(prob, theta, b.slice, chunk or default_chunk(prob)):
                Hb[:, j0:j1] = cols
            symmetrize_(Hb)
        blocks.append(Dense(Hb))
    return BlockDiagonal(blocks, prob.partition.names)


def hessian_diag(prob: Problem, theta: Tensor | None = None, chunk: int | None = None) -> Diagonal:
    """Return the diagonal of ∇²L(θ), shape (P,), without forming the matrix."""
    theta = prob.theta if theta is None else theta
    plan = _Plan(prob, theta)
    d = torch.empty(prob.num_params, dtype=prob.dtype, device=prob.device)
    for b in prob.partition:
        names = plan.covering(b)
        if names:
            for n in names:
                plan.diagonal(d, n)
        else:
            for j0, j1, cols in _columns(prob, theta, b.slice, chunk or default_chunk(prob)):
                d[b.slice.start + j0:b.slice.start + j1] = cols[j0:j1].diagonal()
    return Diagonal(d)
