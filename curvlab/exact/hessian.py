"""The exact Hessian ∇²L(θ) from vmapped Hessian-vector products over chunks of basis vectors.

Column j of the Hessian is the forward-over-reverse product ∂/∂ε ∇L(θ + ε e_j), computed with
``torch.func.jvp`` of ``torch.func.grad`` and vmapped over a chunk of basis vectors at once. For
``block`` each block differentiates only its own sub-vector θ_b (H_bb = ∇²_{θ_b} L), and ``diag``
keeps only the diagonal of each block's chunk, so neither ever holds the rest of the matrix.
Memory: one chunk of tangents through the network (chunk × N × activations) plus the result.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import grad, jvp, vmap

from curvlab import memory
from curvlab.linalg import BlockDiagonal, Dense, Diagonal
from curvlab.problem import Problem

__all__ = ["hessian_dense", "hessian_block", "hessian_diag", "default_chunk"]


def default_chunk(prob: Problem) -> int:
    """Basis vectors per vmapped chunk: ≈ 128 MiB of tangent activations, between 8 and 256."""
    with torch.no_grad():
        acts = [0]

        def hook(_m, _i, o):
            if isinstance(o, Tensor):
                acts[0] += o.numel()

        handles = [m.register_forward_hook(hook) for m in prob.model.modules() if not list(m.children())]
        try:
            prob.output()
        finally:
            for h in handles:
                h.remove()
    per_vector = max(1, 4 * acts[0] * prob.theta.element_size())
    return int(min(256, max(8, (128 * 2**20) // per_vector)))


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
        yield j0, j1, vmap(hvp)(eye[j0:j1]).T  # (n, j1 - j0)


def hessian_dense(prob: Problem, theta: Tensor | None = None, chunk: int | None = None) -> Dense:
    theta = prob.theta if theta is None else theta
    P = prob.num_params
    memory.check((P, P), prob.dtype, "the dense Hessian")
    chunk = chunk or default_chunk(prob)
    H = torch.empty(P, P, dtype=prob.dtype, device=prob.device)
    for j0, j1, cols in _columns(prob, theta, slice(0, P), chunk):
        H[:, j0:j1] = cols
    H = 0.5 * (H + H.T)
    return Dense(H)


def hessian_block(prob: Problem, theta: Tensor | None = None, chunk: int | None = None) -> BlockDiagonal:
    theta = prob.theta if theta is None else theta
    chunk = chunk or default_chunk(prob)
    blocks = []
    for b in prob.partition:
        memory.check((b.size, b.size), prob.dtype, f"Hessian block {b.name!r}")
        Hb = torch.empty(b.size, b.size, dtype=prob.dtype, device=prob.device)
        for j0, j1, cols in _columns(prob, theta, b.slice, chunk):
            Hb[:, j0:j1] = cols
        blocks.append(Dense(0.5 * (Hb + Hb.T)))
    return BlockDiagonal(blocks, prob.partition.names)


def hessian_diag(prob: Problem, theta: Tensor | None = None, chunk: int | None = None) -> Diagonal:
    theta = prob.theta if theta is None else theta
    chunk = chunk or default_chunk(prob)
    d = torch.empty(prob.num_params, dtype=prob.dtype, device=prob.device)
    for b in prob.partition:
        for j0, j1, cols in _columns(prob, theta, b.slice, chunk):
            d[b.slice.start + j0:b.slice.start + j1] = cols[j0:j1].diagonal()
    return Diagonal(d)
