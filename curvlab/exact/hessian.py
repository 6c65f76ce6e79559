"""The exact Hessian ∇²L(θ).

Parameters of single-use ``nn.Linear`` layers (every MLP) get their blocks from pre-activation
second derivatives (:mod:`curvlab.exact.hessian_layers`): Σ_l d_out,l Hessian-vector products in
pre-activation space plus one matrix product per pair of layers, instead of one product per
parameter. Every other parameter (convolutions, normalisation, shared layers …) gets its columns
from vmapped Hessian-vector products over chunks of basis vectors: the forward-over-reverse
product ∂/∂ε ∇L(θ + ε e_j) (``torch.func.jvp`` of ``torch.func.grad``). For ``block`` each block
differentiates only its own sub-vector θ_b (H_bb = ∇²_{θ_b} L), and ``diag`` keeps only the
diagonal, so neither ever holds the rest of the matrix. Memory: one chunk of tangents through the
network (chunk × N × activations), the per-layer pre-activation curvature, and the result.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor
from torch.func import grad, jvp, vmap

from curvlab import memory
from curvlab.exact.conv_gemm import ConvAsGemm
from curvlab.exact.hessian_layers import LayerCurvature, layer_curvature, pair_block, single_use_linear_layers
from curvlab.exact.outer import symmetrize_
from curvlab.layers import survey
from curvlab.linalg import BlockDiagonal, Dense, Diagonal
from curvlab.problem import Problem

__all__ = ["hessian_dense", "hessian_block", "hessian_diag", "default_chunk", "activation_count"]


def activation_count(prob: Problem) -> int:
    """Entries of every leaf module's output over the whole batch (from the cached survey of the
    model): what one tangent or cotangent costs to push through the network."""
    return int(round(survey(prob).activations_per_sample * prob.num_samples))


def default_chunk(prob: Problem) -> int:
    """Basis vectors per vmapped chunk: ≈ 128 MiB of tangent activations, between 8 and 256."""
    per_vector = max(1, 4 * activation_count(prob) * prob.theta.element_size())
    return int(min(256, max(8, (128 * 2**20) // per_vector)))


def _fast_conv(prob: Problem):
    """float64: convolutions as im2col + GEMM (see :mod:`curvlab.exact.conv_gemm`); else nothing."""
    if prob.dtype == torch.float64 and any(isinstance(m, torch.nn.Conv2d) for m in prob.model.modules()):
        return ConvAsGemm()
    return contextlib.nullcontext()


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


class _Layout:
    """Where a linear layer's augmented [W, b] entries sit in θ (weight row-major, then bias)."""

    def __init__(self, prob: Problem, name: str, module: torch.nn.Linear) -> None:
        prefix = f"{name}." if name else ""
        self.start = prob.param_slices[prefix + "weight"].start
        self.o, self.i = module.out_features, module.in_features
        self.bias = prefix + "bias" in prob.param_slices
        self.w_stop = self.start + self.o * self.i
        self.stop = self.w_stop + (self.o if self.bias else 0)

    def parts(self):
        """(augmented column selector, θ range) for the weight part and the bias part."""
        yield slice(0, self.i), slice(self.start, self.w_stop)
        if self.bias:
            yield slice(self.i, self.i + 1), slice(self.w_stop, self.stop)


def _scatter(out: Tensor, T: Tensor, r: _Layout, c: _Layout, offset: int = 0) -> None:
    """Write an augmented-layout block T (rows r, columns c) into ``out`` in θ layout."""
    T4 = T.view(r.o, r.i + r.bias, c.o, c.i + c.bias)
    for rsel, rrange in r.parts():
        for csel, crange in c.parts():
            dst = out[rrange.start - offset:rrange.stop - offset, crange.start - offset:crange.stop - offset]
            src = T4[:, rsel, :, csel]
            dst.view(src.shape).copy_(src)  # a strided view of the block: no temporary


def _structured(prob: Problem, theta: Tensor) -> tuple[LayerCurvature | None, dict[str, _Layout]]:
    layers = single_use_linear_layers(prob, theta)
    if not layers:
        return None, {}
    lay = {n: _Layout(prob, n, m) for n, m in layers.items()}
    return layer_curvature(prob, layers, theta), lay


def hessian_dense(prob: Problem, theta: Tensor | None = None, chunk: int | None = None) -> Dense:
    theta = prob.theta if theta is None else theta
    P = prob.num_params
    memory.check((P, P), prob.dtype, "the dense Hessian")
    H = torch.empty(P, P, dtype=prob.dtype, device=prob.device)
    lc, lay = _structured(prob, theta)
    names = sorted(lay, key=lambda n: lay[n].start)
    for a, l in enumerate(names):
        for m in names[a:]:
            T = pair_block(lc, l, m)
            _scatter(H, T, lay[l], lay[m])
            del T
            if l == m:  # exactly symmetric, not just up to rounding
                L = lay[l]
                symmetrize_(H[L.start:L.stop, L.start:L.stop])
            if l != m:  # the transposed block, copied from θ layout (no second gather)
                L, M = lay[l], lay[m]
                H[M.start:M.stop, L.start:L.stop] = H[L.start:L.stop, M.start:M.stop].T
    covered = torch.zeros(P, dtype=torch.bool)
    for L in lay.values():
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


def _block_layers(b, lay: dict[str, _Layout]) -> list[str] | None:
    """The structured layers that make up partition block b exactly, or None."""
    inside = [n for n, L in lay.items() if L.start >= b.slice.start and L.stop <= b.slice.stop]
    if sum(lay[n].stop - lay[n].start for n in inside) != b.size:
        return None
    return sorted(inside, key=lambda n: lay[n].start)


def hessian_block(prob: Problem, theta: Tensor | None = None, chunk: int | None = None) -> BlockDiagonal:
    theta = prob.theta if theta is None else theta
    lc, lay = _structured(prob, theta)
    blocks = []
    for b in prob.partition:
        memory.check((b.size, b.size), prob.dtype, f"Hessian block {b.name!r}")
        Hb = torch.empty(b.size, b.size, dtype=prob.dtype, device=prob.device)
        names = _block_layers(b, lay)
        if names:
            for a, l in enumerate(names):
                for m in names[a:]:
                    T = pair_block(lc, l, m)
                    _scatter(Hb, T, lay[l], lay[m], b.slice.start)
                    if l != m:
                        L, M, o = lay[l], lay[m], b.slice.start
                        Hb[M.start - o:M.stop - o, L.start - o:L.stop - o] = Hb[L.start - o:L.stop - o,
                                                                                M.start - o:M.stop - o].T
        else:
            for j0, j1, cols in _columns(prob, theta, b.slice, chunk or default_chunk(prob)):
                Hb[:, j0:j1] = cols
        blocks.append(Dense(symmetrize_(Hb)))
    return BlockDiagonal(blocks, prob.partition.names)


def hessian_diag(prob: Problem, theta: Tensor | None = None, chunk: int | None = None) -> Diagonal:
    theta = prob.theta if theta is None else theta
    lc, lay = _structured(prob, theta)
    d = torch.empty(prob.num_params, dtype=prob.dtype, device=prob.device)
    for b in prob.partition:
        names = _block_layers(b, lay)
        if names:
            for n in names:  # diag of Σ_n Ξ^{ll} ⊗ ā ā^T (Ψ^{ll} = 0)
                L = lay[n]
                xd = lc.Xi(n, n).diagonal(dim1=1, dim2=2)  # (N, o)
                D = xd.T @ lc.abar(n) ** 2  # (o, i(+1))
                d[L.start:L.w_stop] = D[:, :L.i].reshape(-1)
                if L.bias:
                    d[L.w_stop:L.stop] = D[:, L.i]
        else:
            for j0, j1, cols in _columns(prob, theta, b.slice, chunk or default_chunk(prob)):
                d[b.slice.start + j0:b.slice.start + j1] = cols[j0:j1].diagonal()
    return Diagonal(d)
