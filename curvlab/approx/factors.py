"""Kronecker factors and per-sample statistics, collected with the shared capture engine.

Every KFAC-family method starts from one call to :func:`curvlab.capture.capture`: a forward pass
records each ``nn.Linear`` / ``nn.Conv2d`` input a (N, T, d_in) (T > 1: weight sharing — extra
input dimensions or convolution patches) and one batched backward pass gives the backpropagated
output cotangents g (k, N, T, d_out) for k output cotangents per sample, already scaled by √R
(R: the loss's reduction factor, ``curvlab.losses``):

=============  ==========================================================  ========
``fisher``     cotangents u_nk                                              k
=============  ==========================================================  ========
``"type2"``    √R × the columns of a symmetric factor of ∇²_f ℓ_n           outputs
``"mc"``       √(R/S) × ∇_f ℓ_n(ŷ_s), ŷ_s ~ the model's predictive          S
``"empirical"`` √R × ∇_f ℓ_n(y_n) at the data labels                        1
=============  ==========================================================  ========

so that the exact layer block of the matching oracle matrix (``cl.exact.ggn``, ``fisher_mc`` with
the same samples and seed, ``empirical_fisher``) is

    F = Σ_n Σ_k vec(V_nk) vec(V_nk)ᵀ,   V_nk = Σ_t g_nkt a_ntᵀ  (the per-sample weight gradient).

KFAC's factors (Martens & Grosse 2015; weight sharing: Eschenhagen et al. 2023) in curvlab's scale,
which is curvlinops' (Dangel et al.; checked entry by entry in tests/approx/test_curvlinops.py):

* ``approx="expand"`` (positions are extra samples):
  A = 1/(N·T) Σ_{n,t} a_nt a_ntᵀ,   G = Σ_{n,k,t} g_nkt g_nktᵀ;
* ``approx="reduce"`` (positions are pooled first):
  A = 1/N Σ_n ā_n ā_nᵀ with ā_n = 1/T Σ_t a_nt,   G = Σ_{n,k} ḡ_nk ḡ_nkᵀ with ḡ_nk = Σ_t g_nkt.

Without weight sharing (T = 1) both read A = 1/N Σ a aᵀ, G = Σ_nk g gᵀ and F = Σ_n M_n ⊗ a_n a_nᵀ
with M_n = Σ_k g_nk g_nkᵀ, so A ⊗ G = F whenever M_n or a_n does not depend on n (one sample,
identical inputs, a deep linear network with squared error); expand (reduce) is exact in the
corresponding weight-sharing regimes. A bias is an input that is always 1 (folded into A when the
weight and bias sit in the same partition block).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from numbers import Integral

import torch
from torch import Tensor
from torch.nn import functional as F

from curvlab.capture import (
    FISHER_TYPES,
    Capture,
    LayerIO,
    capture,
    capture_with_gradient,
    output_cotangents,
    supported_layers,
)
from curvlab.exact.outer import block_from_capture
from curvlab.layers import survey
from curvlab.linalg import CurvatureMatrix
from curvlab.problem import Block, Partition, Problem
from curvlab.vocabulary import fisher_type

__all__ = ["FISHER_TYPES", "APPROXIMATIONS", "UNSUPPORTED", "KronPiece", "BlockPlan", "Collection",
           "collect", "check_options"]

APPROXIMATIONS = ("expand", "reduce")
UNSUPPORTED = ("error", "exact")

_CHUNK_BYTES = 32 * 2**20


@dataclass
class KronPiece:
    """One Kronecker block: a layer's weight and/or bias inside one partition block.

    Its parameters sit in θ[start:stop] as the weight (row-major) followed by the bias when both
    are included (``folded``: the bias is the last input of A); a bias alone is a layer whose only
    input is the constant 1.
    """

    name: str
    io: LayerIO
    weight: bool
    bias: bool
    start: int
    stop: int
    _inputs: Tensor | None = field(default=None, repr=False)

    @property
    def folded(self) -> bool:
        """Whether the bias is folded into A as the last input (weight and bias both included)."""
        return self.weight and self.bias

    @property
    def size(self) -> int:
        """The number of parameters, stop − start."""
        return self.stop - self.start

    @property
    def d_out(self) -> int:
        """The layer's number of outputs (the size of G)."""
        return self.io.g.shape[-1]

    @property
    def d_in(self) -> int:
        """Size of the input factor A (d_in, d_in + 1 with a folded bias, 1 for a bias alone)."""
        if not self.weight:
            return 1
        return self.io.d_in + (1 if self.bias else 0)

    @property
    def positions(self) -> int:
        """T, the layer's number of positions per sample (1 without weight sharing)."""
        return self.io.positions

    def inputs(self) -> Tensor:
        """Return the inputs of this piece, (N, T, d_in): a, [a, 1] or 1."""
        if self._inputs is None:
            a = self.io.a
            if not self.weight:
                self._inputs = torch.ones(a.shape[0], a.shape[1], 1, dtype=a.dtype, device=a.device)
            elif self.bias:
                self._inputs = torch.cat([a, torch.ones_like(a[..., :1])], dim=2)
            else:
                self._inputs = a
        return self._inputs

    @property
    def grads(self) -> Tensor:
        """The output cotangents g (k, N, T, d_out)."""
        return self.io.g

    def input_rows(self, approx: str = "expand") -> tuple[Tensor, int]:
        """Return (X, r) with A = XᵀX / r: the input rows (a, [a 1] or 1; positions pooled for "reduce")."""
        a = self.io.a
        n, t, d = a.shape
        if not self.weight:  # the constant input 1
            return torch.ones(1, 1, dtype=a.dtype, device=a.device), 1
        if t > 1 and approx == "reduce":
            a, rows = a.mean(dim=1), n
        else:
            a, rows = a.reshape(-1, d), n * t
        if self.bias:  # one copy, as reshaping a strided (convolution) input costs anyway
            a = F.pad(a, (0, 1), value=1.0)
        return a, rows

    def input_factor(self, approx: str = "expand") -> Tensor:
        """Return the input factor A (see the module docstring)."""
        X, rows = self.input_rows(approx)
        return torch.mm(X.T, X).div_(rows)

    def output_rows(self, approx: str = "expand") -> Tensor:
        """Return Y with G = YᵀY: the backpropagated cotangent rows (summed over positions for "reduce")."""
        g = self.grads
        if g.shape[2] > 1 and approx == "reduce":
            g = g.sum(dim=2)
        return g.reshape(-1, g.shape[-1])

    def output_factor(self, approx: str = "expand") -> Tensor:
        """Return the output factor G (see the module docstring)."""
        Y = self.output_rows(approx)
        return Y.T @ Y

    def eigen_second_moments(self, Q_A: Tensor, Q_G: Tensor) -> Tensor:
        """S*_ij = Σ_n Σ_k ((Q_Gᵀ V_nk Q_A)_ij)², V_nk = Σ_t g_nkt a_ntᵀ (George et al. 2018), (p, q).

        Without weight sharing Q_Gᵀ V_nk Q_A = (Q_Gᵀ g_nk)(Q_Aᵀ a_n)ᵀ and S* is one product of the
        squared projections; with T > 1 the per-sample gradients are formed in chunks of samples.
        """
        if self.positions == 1:
            a = self.inputs()[:, 0] @ Q_A  # (N, q)
            g = self.grads[:, :, 0] @ Q_G  # (k, N, p)
            return (g**2).sum(0).T @ (a**2)
        S = torch.zeros(self.d_out, self.d_in, dtype=Q_A.dtype, device=Q_A.device)
        for s, e in self.per_sample_chunks():
            S += (self.per_sample_gradients(s, e, Q_A, Q_G) ** 2).sum(dim=(0, 1))
        return S

    @property
    def explicit_is_cheaper(self) -> bool:
        """Per-sample gradients V_nk (T·p·q per row) cost less than T×T Gram matrices (T²·(p+q))."""
        t = self.positions
        p, q = self.d_out, self.d_in
        return t > 1 and t * p * q <= t * t * (p + q)

    def per_sample_gradients(self, s: int = 0, e: int | None = None, Q_A: Tensor | None = None,
                             Q_G: Tensor | None = None) -> Tensor:
        """V_nk = Σ_t g_nkt a_ntᵀ for samples s:e, shape (k, e − s, p, q) (bias column last when folded).

        With bases Q_A, Q_G: Q_Gᵀ V_nk Q_A, projecting a and g before the contraction.
        """
        e = self.io.a.shape[0] if e is None else e
        a, g = self.inputs()[s:e], self.grads[:, s:e]
        if Q_A is not None:
            a = a @ Q_A
        if Q_G is not None:
            g = g @ Q_G
        return torch.einsum("kntp,ntq->knpq", g, a)

    def per_sample_chunks(self) -> list[tuple[int, int]]:
        """Sample ranges whose per-sample gradients fit the chunk budget."""
        k, n = self.grads.shape[:2]
        return _chunks(n, k * self.d_out * self.d_in * self.io.a.element_size())

    def exact_trace(self) -> Tensor:
        """Return tr F = Σ_n Σ_k ‖V_nk‖²_F, the trace of the exact block (without forming it)."""
        a, g = self.inputs(), self.grads
        k, n, t, _ = g.shape
        if t == 1:
            return ((g[:, :, 0] ** 2).sum((0, 2)) * (a[:, 0] ** 2).sum(1)).sum()
        total = torch.zeros((), dtype=a.dtype, device=a.device)
        if self.explicit_is_cheaper:
            for s, e in self.per_sample_chunks():
                total = total + (self.per_sample_gradients(s, e) ** 2).sum()
            return total
        for s, e in _chunks(n, (k + 1) * t * t * a.element_size()):  # ‖Σ_t g_t a_tᵀ‖² via Gram matrices
            Ka = torch.einsum("ntq,nsq->nts", a[s:e], a[s:e])
            Kg = torch.einsum("kntp,knsp->knts", g[:, s:e], g[:, s:e])
            total = total + (Kg * Ka).sum()
        return total


def _chunks(n: int, per_sample_bytes: int) -> list[tuple[int, int]]:
    """Ranges of samples whose temporaries stay near 32 MiB."""
    step = max(1, min(n, _CHUNK_BYTES // max(1, per_sample_bytes)))
    return [(s, min(n, s + step)) for s in range(0, n, step)]


@dataclass
class BlockPlan:
    """One partition block: Kronecker pieces, or ``None`` when it needs the exact block."""

    block: Block
    pieces: list[KronPiece] | None


@dataclass
class Collection:
    """What :func:`collect` returns: the capture and a plan per partition block."""

    prob: Problem
    fisher: str | None
    approx: str
    cap: Capture
    plans: list[BlockPlan]
    #: with ``collect(..., gradient=True)``: the batch loss L(θ) and its flat gradient ∇L(θ)
    loss: Tensor | None = None
    gradient: Tensor | None = None

    def exact_block(self, block: Block) -> CurvatureMatrix:
        """Return the oracle's exact block (same Fisher type, same samples) for a non-Kronecker block."""
        return block_from_capture(self.cap, Partition([block])).blocks[0]


def _unsupported_error(prob: Problem, names: list[str], method: str, offer_exact: bool = True) -> ValueError:
    sv = survey(prob)
    mods = dict(prob.model.named_modules())

    def owner(n: str) -> str:
        return type(mods.get(n.rsplit(".", 1)[0] if "." in n else "", prob.model)).__name__

    listed = "; ".join(f"{n!r} ({owner(n)}) — {sv.reason(n)}" for n in names)
    instead = ("Pass unsupported='exact' to take the blocks that contain them from the oracle's exact block "
               "instead, or freeze them (requires_grad=False)." if offer_exact else
               "Freeze them (requires_grad=False), or use a method that takes the exact block of any module "
               "(the KFAC family's exact fallback, the oracle's block structure).")
    return ValueError(
        f"{method} supports the parameters of nn.Linear and nn.Conv2d layers (groups=1, zero padding, "
        f"each reaching the loss only through one call of its module); these parameters are not: {listed}. "
        f"{instead}")


def check_options(fisher: str | None, mc_samples: int, seed: int, approx: str, unsupported: str) -> None:
    """Check the options every approximator shares before any pass over the data (raise ValueError/TypeError)."""
    if fisher is not None:
        try:
            fisher_type(fisher)
        except ValueError:
            raise ValueError(f"unknown fisher type {fisher!r}: use 'ggn', 'fisher_mc' or 'empirical_fisher' (or "
                             f"the older spellings {FISHER_TYPES})") from None
    if not isinstance(mc_samples, Integral) or isinstance(mc_samples, bool) or mc_samples < 1:
        raise ValueError(f"mc_samples must be a positive integer; got {mc_samples!r}")
    if not isinstance(seed, Integral) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer; got {seed!r}")
    if approx not in APPROXIMATIONS:
        raise ValueError(f"unknown approx {approx!r}: use one of {APPROXIMATIONS}")
    if unsupported not in UNSUPPORTED:
        raise ValueError(f"unknown unsupported={unsupported!r}: use one of {UNSUPPORTED}")


def collect(prob: Problem, fisher: str | None, mc_samples: int = 1, seed: int = 0, approx: str = "expand",
            unsupported: str = "error", method: str = "kfac", exact_option: bool = True,
            gradient: bool = False, plain: bool = False) -> Collection:
    """One forward and one batched backward pass; a Kronecker plan for every partition block.

    ``fisher=None`` collects the layer inputs only (no backward pass: forward-only methods).
    ``exact_option=False``: the method has no ``unsupported="exact"`` fallback, so the error for
    unsupported parameters does not suggest it (always so for ``fisher=None``).
    ``gradient=True``: the same passes also give the batch loss and gradient (``Collection.loss``,
    ``Collection.gradient``; :func:`curvlab.capture.capture_with_gradient`); with ``plain=True`` as well,
    by a plain call of the model, whose parameters must then hold ``prob.theta`` (the optimizer's case).
    """
    if not isinstance(prob, Problem):
        raise TypeError(f"expected a curvlab.Problem; got {type(prob).__name__}")
    check_options(fisher, mc_samples, seed, approx, unsupported)
    fisher = None if fisher is None else fisher_type(fisher)  # the capture engine's name of the Fisher type
    mc_samples, seed = int(mc_samples), int(seed)
    if fisher is None:
        if unsupported == "exact":
            raise ValueError(f"{method} has no exact counterpart for unsupported parameters: it uses no Fisher "
                             "(no output factor, no backward pass), so no oracle block matches its scale; "
                             "use unsupported='error' and freeze those parameters (requires_grad=False), or "
                             "a method with an exact fallback such as kfac(prob, unsupported='exact')")

        def cot(f: Tensor) -> Tensor:
            return f.new_zeros((0, *f.shape))
    else:
        cot = output_cotangents(prob, fisher, mc_samples, seed)

    layers = supported_layers(prob)
    offer_exact = exact_option and fisher is not None
    missing = survey(prob).generic_parameters(prob.param_names)
    if missing and unsupported == "error":
        raise _unsupported_error(prob, missing, method, offer_exact)

    generic = bool(missing) and unsupported == "exact"
    loss = grad = None
    if gradient:
        row = prob.loss_scale**0.5 if fisher == "empirical" else None  # its cotangent is √R ∇_f ℓ_n = ∇_f L / √R
        cap, loss, grad = capture_with_gradient(prob, cot, layers=layers, generic=generic, loss_row=row,
                                                plain=plain)
    else:
        cap = capture(prob, cot, layers=layers, generic=generic)
    ios = [p for p in cap.pieces if isinstance(p, LayerIO)]
    covered = {n for io in ios for n in ([io.weight] + ([io.bias] if io.bias else []))}
    missing = [n for n in prob.param_names if n not in covered]
    if missing and unsupported == "error":  # a layer called a different number of times on these data
        raise _unsupported_error(prob, missing, method, offer_exact)

    plans = []
    for block in prob.partition:
        if any(n not in covered for n in block.params):
            plans.append(BlockPlan(block, None))
            continue
        pieces = []
        for io in ios:
            w, b = io.weight in block.params, io.bias is not None and io.bias in block.params
            if not (w or b):
                continue
            wslice, bslice = prob.param_slices[io.weight], prob.param_slices[io.bias] if io.bias else None
            start = wslice.start if w else bslice.start
            stop = bslice.stop if b else wslice.stop
            pieces.append(KronPiece(io.name or "(root)", io, w, b, start, stop))
        pieces.sort(key=lambda p: p.start)
        plans.append(BlockPlan(block, pieces))
    return Collection(prob, fisher, approx, cap, plans, loss, grad)
