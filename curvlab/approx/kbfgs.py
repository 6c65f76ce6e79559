"""K-BFGS and K-BFGS(L): Kronecker-factored BFGS curvature along a trajectory.

Goldfarb, Ren & Bahamou, NeurIPS 2020, arXiv 2006.08877; convolutions: Ren, Bahamou & Goldfarb 2021,
arXiv 2102.06737.

Each layer z = W h (+ b) keeps a Kronecker-factored inverse-curvature model H_a ⊗ H_g with

* **input side** A = EMA_β(1/(NT) Σ h̄ h̄ᵀ) (h̄: input with a 1 appended for the bias; β = 0.9),
  A_LM = A + √λ I, and H_a ≈ A_LM⁻¹ — the explicit inverse at the first observation, afterwards only
  *Hessian-action* BFGS updates with s_a = H_a h̄, y_a = A_LM s_a (h̄: the minibatch mean input),
  so H_a tracks A_LM⁻¹ without further inversions;
* **output side** H_g ≈ G⁻¹, G the curvature w.r.t. the pre-activations, started at I and updated
  by BFGS (K-BFGS; dense) or held as an L-BFGS memory of the last p pairs with H0 = γI (K-BFGS(L))
  from the pair s_g = z̄ − z̄⁺, y_g = ḡ − ḡ⁺ of the same minibatch before and after a step
  (z̄ = mean pre-activation, ḡ = Σ_n ∇_{z_n} L, the batch-summed gradient of the user's loss),
  optionally smoothed by an EMA, after **double damping** (:func:`double_damping`, μ₁ = 0.2,
  μ₂ = √λ) that keeps sᵀy ≥ μ₂‖s‖² > 0 and hence H_g symmetric positive definite.

The step direction is P = −H_g D̄ H_a, D̄ = [∇W ∇b] the (momentum) gradient as a d_out × (d_in + 1)
matrix. BFGS inverse update: H⁺ = (I − ρsyᵀ) H (I − ρysᵀ) + ρssᵀ, ρ = 1/sᵀy.

Details settled from the authors' code (renyiryry/kbfgs_neurips2020_public, ``kbfgs_utils.py``,
``training_utils.py``): the order of the two damping stages (Powell first, on the H side, then
Levenberg–Marquardt), μ₂ = √λ and A_LM = A + √λI from one λ, the Powell trigger sᵀy/yᵀHy ≤ μ₁ and the
LM trigger sᵀy/sᵀs ≤ μ₂ (strict ``<`` here: at equality both leave the pair unchanged), the skip
rule (no update if sᵀy ≤ 0 or sᵀy ≤ 10⁻⁴ ‖s‖² ‖v‖, v = ḡ before the step on the output side, h̄ on
the input side; also when the update overflows), the EMA of (s, y) started at zero with decay 0.9
when the minibatch is smaller than the data set (BFGS, both damping stages and the skip rule are
invariant to a common scale of s and y, so the zero start only matters through the averaging), the
sign convention s = z̄ − z̄⁺, y = ḡ − ḡ⁺, ḡ = mean_n(m ∇_{z_n} L_mean) = Σ_n ∇_{z_n} L, H_g(0) = I, the
L-BFGS initial scaling γ = 1 and memory p = 100, the order of the per-iteration calls (A's EMA and
the first explicit inverse before the direction, H_g then H_a after the step). One difference: the
authors start A's EMA from zero (full batch) or from a pass over the data (minibatches); here the
first observed batch sets A. The authors' code knows only fully connected layers.

**Convolutions** (``nn.Conv2d``, and ``nn.Linear`` on inputs with extra dimensions: T positions).
The CNN paper's rules (its "DDV2" and "HessianActionV2") are not public. curvlab treats positions
like extra samples, the *expand* convention of its KFAC (Grosse & Martens 2016; Eschenhagen et al.
2023): A = 1/(NT) Σ_{n,t} h̄ h̄ᵀ over the unfolded patches, h̄ = their mean over samples and positions,
z̄ = mean_{n,t} z_nt and ḡ = Σ_{n,t} ∇_{z_nt} L, so that the implied G ≈ Σ_{n,t} ∇²_{z_nt} L has the
scale of KFAC-expand's G = Σ_{n,t} g gᵀ. The third-party adaptation in ASDL
(kazukiosawa/asdl, ``KronBfgsGradientMaker``) also averages the pre-activations over positions but
averages (not sums) their gradients and rescales the dampings by √T; both differ from this choice by
the factor T in y. The damping is √λ on both sides for every layer type.

Use (one minibatch per step; the wrapper adds momentum and weight decay)::

    state = KBFGS(prob, damping=0.3, method="kbfgs")          # or "kbfgs-l", history=100
    before = kbfgs_statistics(batch, theta)                    # loss, gradient, A, h̄, z̄, ḡ
    state.observe_inputs(before)                               # A's EMA, H_a at the first call
    theta_new = theta + lr * state.precondition(before.gradient)
    after = kbfgs_statistics(batch, theta_new, input_factors=False)
    state.update_from_step(before, after)                      # H_g (damped BFGS), then H_a
    C = state.curvature()                                      # Kron(H_a⁻¹, H_g⁻¹) per layer
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from curvlab import memory
from curvlab.approx.base import Approximation
from curvlab.approx.factors import collect
from curvlab.capture import LayerIO
from curvlab.linalg.base import all_finite
from curvlab.linalg.kron import Kron
from curvlab.linalg.layout import KronLayout
from curvlab.problem import Problem

__all__ = ["bfgs_inverse_update", "powell_damping", "lm_damping", "double_damping", "bfgs_skip_reason",
           "DampedPair", "LBFGSMemory", "KBFGSCounters", "KBFGSLayerState", "KBFGS", "LayerStatistics",
           "KBFGSStatistics", "kbfgs_statistics", "KBFGS_METHODS"]

#: the two variants: dense BFGS for H_g, or an L-BFGS memory
KBFGS_METHODS = ("kbfgs", "kbfgs-l")

_TITLES = {"kbfgs": "K-BFGS", "kbfgs-l": "K-BFGS(L)"}


# ---------------------------------------------------------------------------------------------
# pure functions on tensors
# ---------------------------------------------------------------------------------------------
def _check_pair(s: Tensor, y: Tensor, dim: int | None = None) -> None:
    if s.ndim != 1 or y.shape != s.shape:
        raise ValueError(f"s and y must be vectors of one shape; got {tuple(s.shape)} and {tuple(y.shape)}")
    if dim is not None and s.shape[0] != dim:
        raise ValueError(f"s and y must have length {dim}; got {s.shape[0]}")


def bfgs_inverse_update(H: Tensor, s: Tensor, y: Tensor) -> Tensor:
    """Return the BFGS update of an inverse-Hessian approximation: H⁺ = (I − ρsyᵀ) H (I − ρysᵀ) + ρssᵀ.

    ρ = 1/sᵀy. Computed in O(d²) as H + (ρ + ρ² yᵀHy) ssᵀ − ρ(Hy sᵀ + s (Hy)ᵀ) and symmetrised, so
    the result is exactly symmetric; it satisfies the secant equation H⁺y = s and is positive
    definite whenever H is and sᵀy > 0. Raises ``ValueError`` unless sᵀy > 0 (apply a skip rule,
    :func:`bfgs_skip_reason`, or damping first).
    """
    if H.ndim != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"H must be a square matrix; got shape {tuple(H.shape)}")
    _check_pair(s, y, H.shape[0])
    sy = torch.dot(s, y)
    if not bool(sy > 0):
        raise ValueError(f"the BFGS update needs sᵀy > 0; got sᵀy = {float(sy):.3e}")
    rho = 1.0 / sy
    Hy = H @ y
    out = H + (rho + rho * rho * torch.dot(y, Hy)) * torch.outer(s, s) - rho * (torch.outer(Hy, s) + torch.outer(s, Hy))
    return (out + out.T) / 2


def powell_damping(s: Tensor, y: Tensor, Hy: Tensor, mu1: float = 0.2) -> tuple[Tensor, bool]:
    """Powell's damping on the H side (bounds the implied B = H⁻¹ from above).

    If sᵀy < μ₁ yᵀHy: θ = (1 − μ₁) yᵀHy / (yᵀHy − sᵀy) and s ← θs + (1 − θ)Hy, after which
    sᵀy = μ₁ yᵀHy. ``Hy`` is H applied to y. Returns the (new) s and whether the stage triggered
    (never when yᵀHy ≤ 0, e.g. y = 0).
    """
    _check_pair(s, y)
    if Hy.shape != y.shape:
        raise ValueError(f"Hy must have the shape of y {tuple(y.shape)}; got {tuple(Hy.shape)}")
    sy, yHy = torch.dot(s, y), torch.dot(y, Hy)
    if not bool(yHy > 0) or not bool(sy < mu1 * yHy):
        return s, False
    theta = (1 - mu1) * yHy / (yHy - sy)
    return theta * s + (1 - theta) * Hy, True


def lm_damping(s: Tensor, y: Tensor, mu2: float) -> tuple[Tensor, bool]:
    """Levenberg–Marquardt-type damping (bounds B = H⁻¹ from below, like adding μ₂I).

    If sᵀy < μ₂ sᵀs: θ = (1 − μ₂) sᵀs / (sᵀs − sᵀy) and y ← θy + (1 − θ)s, after which
    sᵀy = μ₂‖s‖². For μ₂ > 1 the interpolation is an extrapolation; in the one case it cannot
    reach the target (sᵀy = sᵀs) y ← y + (μ₂ − 1)s is used instead, with the same result sᵀy = μ₂‖s‖².
    Returns the (new) y and whether the stage triggered (never for s = 0).
    """
    _check_pair(s, y)
    ss, sy = torch.dot(s, s), torch.dot(s, y)
    if not bool(sy < mu2 * ss):
        return y, False
    gap = ss - sy
    if bool(gap == 0):
        return y + (mu2 - 1) * s, True
    theta = (1 - mu2) * ss / gap
    return theta * y + (1 - theta) * s, True


@dataclass
class DampedPair:
    """A curvature pair after :func:`double_damping`, and which stages triggered.

    ``skipped`` names the reason the update was skipped (:func:`bfgs_skip_reason`), ``None`` when it
    was applied.
    """

    s: Tensor
    y: Tensor
    powell: bool
    lm: bool
    skipped: str | None = None


def double_damping(s: Tensor, y: Tensor, Hy: Tensor, *, mu2: float, mu1: float = 0.2) -> DampedPair:
    """Apply the double damping (DD) of Goldfarb, Ren & Bahamou (2020) to a pair (s, y).

    :func:`powell_damping` with μ₁ on the H side, then :func:`lm_damping` with μ₂ (= √λ in K-BFGS)
    on the new pair.

    Afterwards sᵀy ≥ μ₂‖s‖² (with equality when the LM stage triggered), so sᵀy > 0 for s ≠ 0 and
    the BFGS update keeps H positive definite. ``Hy`` is the current H applied to y.
    """
    s, powell = powell_damping(s, y, Hy, mu1)
    y, lm = lm_damping(s, y, mu2)
    return DampedPair(s, y, powell, lm)


def bfgs_skip_reason(s: Tensor, y: Tensor, v: Tensor, threshold: float = 1e-4) -> str | None:
    """Why a BFGS update with (s, y) is skipped, or ``None`` to apply it (the authors' rule).

    ``"nonfinite"`` if s or y has NaN/inf, ``"nonpositive"`` if sᵀy ≤ 0, ``"small"`` if
    sᵀy ≤ threshold · ‖s‖² · ‖v‖, with v the reference vector of the side (ḡ before the step on the
    output side, h̄ on the input side; renyiryry/kbfgs_neurips2020_public, ``get_BFGS_formula``).
    """
    _check_pair(s, y)
    if not (all_finite(s) and all_finite(y)):
        return "nonfinite"
    sy = torch.dot(s, y)
    if not bool(sy > 0):
        return "nonpositive"
    if bool(sy <= threshold * torch.dot(s, s) * torch.linalg.vector_norm(v)):
        return "small"
    return None


def _gram(*vectors: Tensor) -> list[list[float]]:
    """All dot products of the vectors, from one small product and one transfer to the host."""
    V = torch.stack(vectors)
    return (V @ V.T).tolist()


def _skip_reason_from(ss: float, sy: float, vv: float, threshold: float) -> str | None:
    """:func:`bfgs_skip_reason` from the pair's dot products sᵀs, sᵀy and vᵀv.

    A NaN or infinity in s or y makes sᵀs or sᵀy non-finite; so does an overflow of the products of
    finite vectors, which :func:`bfgs_skip_reason` calls "nonpositive" or "small" (skipped either way).
    """
    if not (math.isfinite(ss) and math.isfinite(sy)):
        return "nonfinite"
    if not sy > 0:
        return "nonpositive"
    if sy <= threshold * ss * math.sqrt(vv):
        return "small"
    return None


def _bfgs_update_from(H: Tensor, s: Tensor, Hy: Tensor, sy: float, yHy: float) -> Tensor:
    """:func:`bfgs_inverse_update` given Hy, sᵀy > 0 and yᵀHy (no checks, no host transfer).

    H⁺ = H + (ρ + ρ² yᵀHy) s sᵀ − ρ (s (Hy)ᵀ + Hy sᵀ) = H + U C Uᵀ with U = [s Hy] and
    C = [[ρ + ρ² yᵀHy, −ρ], [−ρ, 0]]: one small product and one ``addmm``, then symmetrised.
    """
    rho = 1.0 / sy
    U = torch.stack([s, Hy], dim=1)  # (d, 2)
    C = torch.tensor([[rho + rho * rho * yHy, -rho], [-rho, 0.0]], dtype=H.dtype, device=H.device)
    out = torch.addmm(H, U @ C, U.T)
    return torch.add(out, out.T).mul_(0.5)


def _double_damping_from(s: Tensor, y: Tensor, Hy: Tensor, gram: list[list[float]], mu1: float,
                         mu2: float) -> tuple[DampedPair, float, float | None]:
    """:func:`double_damping` with the decisions taken on host floats; also the final sᵀs and sᵀy.

    ``gram`` holds the dot products of (s, y, Hy) in that order (:func:`_gram`). After Powell's stage
    sᵀs and sᵀy are taken afresh from the new s; after the LM stage sᵀy is returned as ``None`` (the
    caller computes it with what else it needs of the new y).
    """
    ss, sy, yHy = gram[0][0], gram[0][1], gram[1][2]
    powell = yHy > 0 and sy < mu1 * yHy
    if powell:
        theta = (1 - mu1) * yHy / (yHy - sy)
        s = theta * s + (1 - theta) * Hy
        ss, sy = torch.mv(torch.stack([s, y]), s).tolist()
    lm = sy < mu2 * ss
    if not lm:
        return DampedPair(s, y, powell, lm), ss, sy
    gap = ss - sy
    if gap == 0:
        y = y + (mu2 - 1) * s
    else:
        theta = (1 - mu2) * ss / gap
        y = theta * y + (1 - theta) * s
    return DampedPair(s, y, powell, lm), ss, None


# ---------------------------------------------------------------------------------------------
# L-BFGS memory
# ---------------------------------------------------------------------------------------------
class LBFGSMemory:
    """The last ``history`` curvature pairs (s_i, y_i) of an L-BFGS inverse H, started at H0 = γI.

    H is the dense BFGS inverse obtained by applying the kept pairs, oldest first, to γI
    (:func:`bfgs_inverse_update`); :meth:`apply` computes Hv by the two-loop recursion (Nocedal 1980)
    in O(d·len) without forming it. When full, :meth:`push` drops the oldest pair.
    """

    def __init__(self, dim: int, history: int = 100, gamma: float = 1.0, dtype: torch.dtype = torch.float64,
                 device: torch.device | str = "cpu") -> None:
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer; got {dim!r}")
        if not isinstance(history, int) or isinstance(history, bool) or history < 1:
            raise ValueError(f"history must be a positive integer; got {history!r}")
        if not (math.isfinite(gamma) and gamma > 0):
            raise ValueError(f"gamma must be positive; got {gamma!r}")
        self.dim, self.history, self.gamma = dim, history, float(gamma)
        self.dtype, self.device = dtype, torch.device(device)
        self._s: list[Tensor] = []
        self._y: list[Tensor] = []
        self._rho: list[float] = []

    def __len__(self) -> int:
        return len(self._s)

    @property
    def pairs(self) -> list[tuple[Tensor, Tensor]]:
        """The kept pairs, oldest first."""
        return list(zip(self._s, self._y))

    def push(self, s: Tensor, y: Tensor, sy: float | None = None) -> None:
        """Append a pair (needs sᵀy > 0); drop the oldest one when the memory is full.

        Parameters
        ----------
        s, y:
            the pair, vectors of length ``dim``.
        sy:
            sᵀy when the caller has it already (saves a product and a transfer); computed otherwise.
        """
        _check_pair(s, y, self.dim)
        sy = float(torch.dot(s, y)) if sy is None else float(sy)
        if not (math.isfinite(sy) and sy > 0):
            raise ValueError(f"an L-BFGS pair needs a finite sᵀy > 0; got sᵀy = {sy:.3e}")
        if len(self._s) == self.history:
            del self._s[0], self._y[0], self._rho[0]
        self._s.append(s.detach().to(self.dtype).clone())
        self._y.append(y.detach().to(self.dtype).clone())
        self._rho.append(1.0 / sy)

    def apply(self, v: Tensor) -> Tensor:
        """Hv for a vector (d,) or H V for a matrix of columns (d, m), by the two-loop recursion."""
        if v.ndim not in (1, 2) or v.shape[0] != self.dim:
            raise ValueError(f"v must have shape ({self.dim},) or ({self.dim}, m); got {tuple(v.shape)}")
        q = v.to(self.dtype).clone()
        alphas = []
        for s, y, rho in zip(reversed(self._s), reversed(self._y), reversed(self._rho)):
            a = rho * (s @ q)
            q -= torch.outer(y, a) if q.ndim == 2 else a * y
            alphas.append(a)
        r = self.gamma * q
        for s, y, rho, a in zip(self._s, self._y, self._rho, reversed(alphas)):
            b = rho * (y @ r)
            r += torch.outer(s, a - b) if r.ndim == 2 else (a - b) * s
        return r

    def dense(self) -> Tensor:
        """H as a dense d×d matrix (the two-loop recursion on the identity), symmetrised."""
        memory.check((self.dim, self.dim), self.dtype, "the dense L-BFGS inverse H_g",
                     hint="use K-BFGS(L)'s matrix-free products (LBFGSMemory.apply)")
        H = self.apply(torch.eye(self.dim, dtype=self.dtype, device=self.device))
        return (H + H.T) / 2


# ---------------------------------------------------------------------------------------------
# per-layer state
# ---------------------------------------------------------------------------------------------
@dataclass
class KBFGSCounters:
    """How often each stage of a layer's updates ran (output side unless named ``inputs_*``)."""

    pairs: int = 0          # output-side pairs offered (calls of update_outputs)
    powell: int = 0         # Powell stage triggered
    lm: int = 0             # Levenberg–Marquardt stage triggered
    skipped: int = 0        # output-side updates skipped
    input_updates: int = 0  # input-side Hessian-action updates offered
    input_skipped: int = 0  # of which skipped

    def as_dict(self) -> dict[str, int]:
        """Return the counters as a plain dict {stage: count}."""
        return dict(self.__dict__)


def _spd_inverse(M: Tensor, what: str) -> Tensor:
    L, info = torch.linalg.cholesky_ex(M)
    if int(info) != 0:
        raise ValueError(f"{what} is not positive definite; increase the damping")
    inv = torch.cholesky_inverse(L)
    return (inv + inv.T) / 2


def _spd_eig_inverse(H: Tensor, what: str) -> tuple[Tensor, Tensor]:
    """H⁻¹ through H's eigendecomposition, and H's eigenvalues; refuses a non-SPD H."""
    e, Q = torch.linalg.eigh((H + H.T) / 2)
    if not bool(e[0] > 0):
        raise ValueError(f"{what} is not positive definite (smallest eigenvalue {float(e[0]):.3e})")
    inv = (Q / e) @ Q.T
    return (inv + inv.T) / 2, e


@dataclass
class KBFGSLayerState:
    """One layer's K-BFGS state: H_a ⊗ H_g over its d_out × d_in matrix [W b].

    ``d_in`` counts the folded bias column (a layer's parameters sit in θ[start:stop] as the weight
    row-major, then the bias). ``history=None``: dense BFGS H_g (K-BFGS); an integer: an
    :class:`LBFGSMemory` of that many pairs with H0 = γI (K-BFGS(L)). ``A`` / ``A_LM`` / ``H_a``
    are ``None`` until the first :meth:`observe`.
    """

    name: str
    weight: str
    bias: str | None
    start: int
    stop: int
    d_in: int
    d_out: int
    dtype: torch.dtype = torch.float64
    device: torch.device | str = "cpu"
    history: int | None = None
    gamma: float = 1.0
    A: Tensor | None = field(default=None, repr=False)
    A_LM: Tensor | None = field(default=None, repr=False)
    H_a: Tensor | None = field(default=None, repr=False)
    H_g: Tensor | None = field(default=None, repr=False)
    lbfgs: LBFGSMemory | None = field(default=None, repr=False)
    counters: KBFGSCounters = field(default_factory=KBFGSCounters)

    def __post_init__(self) -> None:
        self.layout = KronLayout(self.d_out, self.d_in, self.has_bias)  # [W b] ↔ parameter order
        if self.history is None:
            self.H_g = self.gamma * torch.eye(self.d_out, dtype=self.dtype, device=self.device)
        else:
            self.lbfgs = LBFGSMemory(self.d_out, self.history, self.gamma, self.dtype, self.device)
        self.s_avg = torch.zeros(self.d_out, dtype=self.dtype, device=self.device)
        self.y_avg = torch.zeros(self.d_out, dtype=self.dtype, device=self.device)

    @property
    def has_bias(self) -> bool:
        """Whether the layer has a bias (folded into H_a as the last input)."""
        return self.bias is not None

    # -- layout --------------------------------------------------------------------------------
    def to_matrix(self, v: Tensor) -> Tensor:
        """Reshape this layer's slice of a flat parameter-order vector into the d_out × d_in matrix [W b]."""
        if v.shape != (self.stop - self.start,):
            raise ValueError(f"layer {self.name!r} takes a vector of length {self.stop - self.start}; "
                             f"got shape {tuple(v.shape)}")
        return self.layout.fold(v)

    def from_matrix(self, X: Tensor) -> Tensor:
        """Flatten the d_out × d_in matrix [W b] into parameter order (weight row-major, then bias)."""
        return self.layout.unfold(X)

    # -- input side ------------------------------------------------------------------------------
    def observe(self, A_batch: Tensor, decay: float, damping: float) -> None:
        """Update the input factor: A ← A_batch at the first call, else βA + (1 − β)A_batch.

        A_LM = A + √λI; at the first call H_a = A_LM⁻¹ (the only explicit inverse).
        """
        if A_batch.shape != (self.d_in, self.d_in):
            raise ValueError(f"layer {self.name!r}: the input factor must be {self.d_in}×{self.d_in}; got "
                             f"{tuple(A_batch.shape)}")
        A_batch = A_batch.to(self.dtype)
        self.A = A_batch.clone() if self.A is None else torch.lerp(self.A, A_batch, 1 - decay)  # βA + (1 − β)A_batch
        self.A_LM = self.A.clone()
        self.A_LM.diagonal().add_(math.sqrt(damping))
        if self.H_a is None:
            self.H_a = _spd_inverse(self.A_LM, f"layer {self.name!r}: A + √λI")

    def update_inputs(self, h_bar: Tensor, threshold: float = 1e-4) -> bool:
        """Hessian-action BFGS on H_a: s_a = H_a h̄, y_a = A_LM s_a; returns whether it was applied."""
        self._require_inputs()
        if h_bar.shape != (self.d_in,):
            raise ValueError(f"layer {self.name!r}: h̄ must have shape ({self.d_in},); got {tuple(h_bar.shape)}")
        s = self.H_a @ h_bar
        y = self.A_LM @ s
        Hy = self.H_a @ y
        gram = _gram(s, y, h_bar, Hy)  # one transfer for the skip rule and the update
        self.counters.input_updates += 1
        if _skip_reason_from(gram[0][0], gram[0][1], gram[2][2], threshold) is None:
            H = _bfgs_update_from(self.H_a, s, Hy, gram[0][1], gram[1][3])
            if all_finite(H):
                self.H_a = H
                return True
        self.counters.input_skipped += 1
        return False

    def _require_inputs(self) -> None:
        if self.H_a is None:
            raise RuntimeError(f"layer {self.name!r} has no input factor yet: call observe_inputs first")

    # -- output side -----------------------------------------------------------------------------
    def apply_output_inverse(self, V: Tensor) -> Tensor:
        """H_g V for a vector (d_out,) or a matrix (d_out, m)."""
        return self.H_g @ V if self.lbfgs is None else self.lbfgs.apply(V)

    def output_inverse(self) -> Tensor:
        """H_g as a dense d_out × d_out matrix (K-BFGS(L): the two-loop recursion on I)."""
        return self.H_g.clone() if self.lbfgs is None else self.lbfgs.dense()

    def update_outputs(self, s: Tensor, y: Tensor, v: Tensor, *, mu2: float, decay: float = 0.0,
                       mu1: float = 0.2, threshold: float = 1e-4) -> DampedPair:
        """One output-side update from the pair (s, y) = (z̄ − z̄⁺, ḡ − ḡ⁺).

        With ``decay`` > 0 the pair is first replaced by its EMA (started at zero); then
        :func:`double_damping` (μ₁, μ₂), the skip rule with reference ``v`` (ḡ before the step), and the
        BFGS update of H_g or a push onto the L-BFGS memory. Returns the damped pair as used.
        """
        _check_pair(s, y, self.d_out)
        self.counters.pairs += 1
        if decay > 0:
            self.s_avg = torch.lerp(self.s_avg, s, 1 - decay)  # decay · s_avg + (1 − decay) · s
            self.y_avg = torch.lerp(self.y_avg, y, 1 - decay)
            s, y = self.s_avg, self.y_avg
        Hy = self.apply_output_inverse(y)
        gram = _gram(s, y, Hy, v)  # one transfer for both damping stages and the skip rule
        pair, ss, sy = _double_damping_from(s, y, Hy, gram, mu1, mu2)
        self.counters.powell += pair.powell
        self.counters.lm += pair.lm
        yHy = gram[1][2]
        if sy is None and self.lbfgs is None:  # the LM stage changed y
            Hy = self.H_g @ pair.y
            sy, yHy = torch.mv(torch.stack([pair.s, Hy]), pair.y).tolist()
        elif sy is None:
            sy = float(torch.dot(pair.s, pair.y))
        pair.skipped = _skip_reason_from(ss, sy, gram[3][3], threshold)
        if pair.skipped is None and self.lbfgs is not None:
            self.lbfgs.push(pair.s, pair.y, sy)
        elif pair.skipped is None:
            H = _bfgs_update_from(self.H_g, pair.s, Hy, sy, yHy)
            if all_finite(H):
                self.H_g = H
            else:
                pair.skipped = "nonfinite"
        self.counters.skipped += pair.skipped is not None
        return pair

    # -- the model -------------------------------------------------------------------------------
    def precondition(self, D: Tensor) -> Tensor:
        """P = −H_g D H_a for the d_out × d_in gradient matrix D = [∇W ∇b]."""
        self._require_inputs()
        if D.shape != (self.d_out, self.d_in):
            raise ValueError(f"layer {self.name!r}: D must be {self.d_out}×{self.d_in}; got {tuple(D.shape)}")
        return -(self.apply_output_inverse(D) @ self.H_a)

    def curvature_block(self) -> tuple[Kron, dict[str, Any]]:
        """Kron(A = H_a⁻¹, G = H_g⁻¹, bias folded) and diagnostics (counters, extreme eigenvalues)."""
        self._require_inputs()
        what = f"layer {self.name!r}:"
        A, eA = _spd_eig_inverse(self.H_a, f"{what} H_a")
        G, eG = _spd_eig_inverse(self.output_inverse(), f"{what} H_g")
        info = {**self.counters.as_dict(), "H_g_eig_min": float(eG[0]), "H_g_eig_max": float(eG[-1]),
                "H_a_eig_min": float(eA[0]), "H_a_eig_max": float(eA[-1])}
        if self.lbfgs is not None:
            info["pairs_kept"] = len(self.lbfgs)
        return Kron(A, G, bias=self.has_bias), info


# ---------------------------------------------------------------------------------------------
# batch statistics
# ---------------------------------------------------------------------------------------------
@dataclass
class LayerStatistics:
    """One layer's minibatch statistics at one θ (positions count as samples, see the module docstring).

    ``input_mean`` h̄ (d_in, a 1 appended for the bias), ``input_factor`` 1/(NT) Σ h̄ h̄ᵀ (or ``None``),
    ``preact_mean`` z̄ = W ā + b (d_out,), ``preact_grad_sum`` ḡ = Σ_{n,t} ∇_{z_nt} L (d_out,).
    """

    name: str
    input_mean: Tensor
    input_factor: Tensor | None
    preact_mean: Tensor
    preact_grad_sum: Tensor


@dataclass
class KBFGSStatistics:
    """What :func:`kbfgs_statistics` returns.

    The loss and flat gradient ∇L(θ) of the batch, and the per-layer statistics by layer name
    (module name; ``"(root)"`` for a bare layer).
    """

    theta: Tensor
    loss: float
    gradient: Tensor | None  # None from a pass that skipped it (the optimizer's pass after the step)
    num_samples: int
    layers: dict[str, LayerStatistics]


def _layer_name(io: LayerIO) -> str:
    return io.name or "(root)"


def _layer_statistics(io: LayerIO, params: dict[str, Tensor], sqrt_R: float, input_factor: bool,
                      grad: Tensor | None) -> LayerStatistics:
    """One layer's statistics; writes its gradient ∇W = Σ g aᵀ, ∇b = Σ g into ``grad`` (None: no gradient).

    Positions count as samples (the rows of a and g); A is KFAC's expand input factor
    (:meth:`curvlab.approx.factors.KronPiece.input_factor`), formed here from the same rows.
    """
    n, t, d_in = io.a.shape
    d_out = io.d_out
    a = io.a.reshape(n * t, d_in)
    g = io.g[0].reshape(n * t, d_out)
    if sqrt_R != 1.0:
        g = g * sqrt_R  # ∇_z L, since the cotangents are √R ∇_f ℓ_n
    g_sum = g.sum(dim=0)
    W = params[io.weight].reshape(d_out, d_in)
    if grad is not None:
        w_stop = io.start + d_out * d_in
        torch.mm(g.T, a, out=grad[io.start:w_stop].view(d_out, d_in))
        if io.has_bias:
            grad[w_stop:io.stop] = g_sum
    a_bar = a.mean(dim=0)
    if io.has_bias:
        h_bar = torch.cat([a_bar, a_bar.new_ones(1)])  # h̄ = [ā 1]
        z_mean = torch.addmv(params[io.bias], W, a_bar)
    else:
        h_bar, z_mean = a_bar, W @ a_bar
    A = None
    if input_factor:
        h = F.pad(a, (0, 1), value=1.0) if io.has_bias else a
        A = torch.mm(h.T, h).div_(n * t)
    return LayerStatistics(_layer_name(io), h_bar, A, z_mean, g_sum)


def kbfgs_statistics(prob: Problem, theta: Tensor | None = None, input_factors: bool = True) -> KBFGSStatistics:
    """Loss, gradient and K-BFGS layer statistics of ``prob`` (a minibatch) at θ.

    One forward and one backward pass (:func:`curvlab.capture.capture` with the empirical
    cotangents √R ∇_f ℓ_n, so ∇_z L = √R g). ``input_factors=False`` skips the input factors (not
    needed after the step). Raises ``ValueError`` naming parameters outside ``nn.Linear`` /
    ``nn.Conv2d`` layers applied once per forward pass.
    """
    if not isinstance(prob, Problem):
        raise TypeError(f"expected a curvlab.Problem; got {type(prob).__name__}")
    theta = prob.check_theta(theta)
    at = prob.at(theta)
    col = collect(at, "empirical", method="K-BFGS", exact_option=False)
    params = at.params(theta)
    sqrt_R = math.sqrt(at.loss_scale)
    grad = torch.zeros(prob.num_params, dtype=prob.dtype, device=prob.device)
    layers = {}
    for io in col.cap.pieces:
        st = _layer_statistics(io, params, sqrt_R, input_factors, grad)
        layers[st.name] = st
    with torch.no_grad():
        loss = float(at.likelihood.loss(col.cap.output, at.y))
    return KBFGSStatistics(theta, loss, grad, at.num_samples, layers)


# ---------------------------------------------------------------------------------------------
# the model-level state
# ---------------------------------------------------------------------------------------------
def _check_unit(value: float, what: str, low_open: bool = False) -> float:
    value = float(value)
    ok = (0 < value < 1) if low_open else (0 <= value < 1)
    if not ok:
        raise ValueError(f"{what} must lie in {'(0, 1)' if low_open else '[0, 1)'}; got {value!r}")
    return value


class KBFGS:
    """K-BFGS / K-BFGS(L) state of a model, driven by explicit calls (see the module docstring).

    Parameters
    ----------
    prob:
        the problem (its model, loss and parameter layout; its data are used once, to check the
        layers). Every trainable parameter must belong to an ``nn.Linear`` or ``nn.Conv2d``
        (groups=1, zero padding) applied once per forward pass, and each partition block must hold
        whole layers (weight and bias together); otherwise ``ValueError`` naming the parameter or block.
    damping:
        λ > 0: A_LM = A + √λI and the LM bound μ₂ = √λ (read at every call; may be changed).
    method:
        ``"kbfgs"`` (dense BFGS H_g) or ``"kbfgs-l"`` (L-BFGS memory of ``history`` pairs).
    history:
        L-BFGS memory p (K-BFGS(L) only; 100 in the authors' code, 10–100 for small problems).
    input_decay:
        β of A's EMA (0.9).
    pair_decay:
        decay of the (s, y) EMA; ``None``: the authors' rule, 0.9 when the batch has fewer samples
        than ``prob`` and 0 (no averaging) otherwise.
    mu1, skip_threshold, gamma:
        Powell's μ₁ (0.2), the skip rule's 10⁻⁴, the initial H_g = γI (1).
    """

    def __init__(self, prob: Problem, damping: float = 0.3, method: str = "kbfgs", history: int = 100,
                 input_decay: float = 0.9, pair_decay: float | None = None, mu1: float = 0.2,
                 skip_threshold: float = 1e-4, gamma: float = 1.0) -> None:
        if not isinstance(prob, Problem):
            raise TypeError(f"expected a curvlab.Problem; got {type(prob).__name__}")
        if method not in KBFGS_METHODS:
            raise ValueError(f"unknown method {method!r}: use one of {KBFGS_METHODS}")
        if not isinstance(history, int) or isinstance(history, bool) or history < 1:
            raise ValueError(f"history must be a positive integer; got {history!r}")
        if not (math.isfinite(float(skip_threshold)) and skip_threshold >= 0):
            raise ValueError(f"skip_threshold must be ≥ 0; got {skip_threshold!r}")
        self.damping = damping
        self.method = method
        self.history = history if method == "kbfgs-l" else None
        self.input_decay = _check_unit(input_decay, "input_decay")
        self.pair_decay = None if pair_decay is None else _check_unit(pair_decay, "pair_decay")
        self.mu1 = _check_unit(mu1, "mu1", low_open=True)
        self.skip_threshold = float(skip_threshold)
        self.gamma = float(gamma)
        self.num_params, self.num_samples = prob.num_params, prob.num_samples
        self.partition_names = prob.partition.names
        self.layers, self._blocks = self._layout(prob)

    @property
    def damping(self) -> float:
        """λ > 0: A_LM = A + √λI and μ₂ = √λ (settable; must be finite and positive)."""
        return self._damping

    @damping.setter
    def damping(self, value: float) -> None:
        value = float(value)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"damping λ must be positive (A + √λI, μ₂ = √λ); got {value!r}")
        self._damping = value

    def _layout(self, prob: Problem) -> tuple[dict[str, KBFGSLayerState], list[tuple[str, list[str]]]]:
        col = collect(prob, None, method=_TITLES[self.method], exact_option=False)  # forward only: checks
        layers: dict[str, KBFGSLayerState] = {}
        blocks = []
        for plan in col.plans:
            names = []
            for piece in plan.pieces:
                if piece.io.has_bias and not piece.folded:
                    raise ValueError(
                        f"partition block {plan.block.name!r} holds only part of layer {piece.name!r} (its "
                        f"weight or its bias); {_TITLES[self.method]} keeps one Kronecker model per layer, "
                        "weight and bias together: use a partition that keeps them in one block, e.g. 'module'")
                io = piece.io
                layers[piece.name] = KBFGSLayerState(
                    piece.name, io.weight, io.bias, io.start, io.stop, piece.d_in, io.d_out, prob.dtype,
                    prob.device, self.history, self.gamma)
                names.append(piece.name)
            blocks.append((plan.block.name, names))
        return layers, blocks

    # -- the calls of one iteration ----------------------------------------------------------------
    def _check_stats(self, stats: KBFGSStatistics, what: str) -> None:
        if not isinstance(stats, KBFGSStatistics):
            raise TypeError(f"{what} must be KBFGSStatistics (from kbfgs_statistics); got {type(stats).__name__}")
        if set(stats.layers) != set(self.layers):
            raise ValueError(f"{what} has layers {sorted(stats.layers)}; this state has {sorted(self.layers)}")

    def observe_inputs(self, stats: KBFGSStatistics) -> None:
        """Update every layer's A by its EMA from this batch (the first call sets A and H_a = A_LM⁻¹)."""
        self._check_stats(stats, "stats")
        for name, layer in self.layers.items():
            A = stats.layers[name].input_factor
            if A is None:
                raise ValueError("stats has no input factors: compute them with kbfgs_statistics(..., "
                                 "input_factors=True)")
            layer.observe(A, self.input_decay, self.damping)

    def precondition(self, grad: Tensor) -> Tensor:
        """Return the K-BFGS direction −H_g D̄ H_a per layer for a flat (momentum) gradient (P,), flat (P,)."""
        if not isinstance(grad, Tensor) or grad.shape != (self.num_params,):
            raise ValueError(f"grad must be a flat tensor of shape ({self.num_params},); got "
                             f"{tuple(getattr(grad, 'shape', ()))}")
        out = torch.empty_like(grad)
        for layer in self.layers.values():
            D = layer.to_matrix(grad[layer.start:layer.stop])
            out[layer.start:layer.stop] = layer.from_matrix(layer.precondition(D))
        return out

    def update_from_step(self, before: KBFGSStatistics, after: KBFGSStatistics) -> dict[str, DampedPair]:
        """Update after a step, from the statistics of the *same* minibatch before and after it.

        Per layer, H_g from (z̄ − z̄⁺, ḡ − ḡ⁺) (EMA, double damping, skip rule), then the
        Hessian-action update of H_a with the batch's h̄ (before). Returns the damped pairs by layer.
        """
        self._check_stats(before, "before")
        self._check_stats(after, "after")
        if before.num_samples != after.num_samples:
            raise ValueError(f"before and after must come from the same minibatch; got {before.num_samples} "
                             f"and {after.num_samples} samples")
        decay = self.pair_decay
        if decay is None:
            decay = 0.9 if before.num_samples < self.num_samples else 0.0
        mu2 = math.sqrt(self.damping)
        pairs = {}
        for name, layer in self.layers.items():
            b, a = before.layers[name], after.layers[name]
            pairs[name] = layer.update_outputs(b.preact_mean - a.preact_mean, b.preact_grad_sum - a.preact_grad_sum,
                                               b.preact_grad_sum, mu2=mu2, decay=decay, mu1=self.mu1,
                                               threshold=self.skip_threshold)
            layer.update_inputs(b.input_mean, self.skip_threshold)
        return pairs

    # -- views -------------------------------------------------------------------------------------
    @property
    def counters(self) -> dict[str, dict[str, int]]:
        """Every layer's :class:`KBFGSCounters` as a dict, by layer name."""
        return {name: layer.counters.as_dict() for name, layer in self.layers.items()}

    @property
    def options(self) -> dict[str, Any]:
        """The state's hyperparameters as keyword arguments (damping, decays, μ₁, skip threshold, γ, history)."""
        opts: dict[str, Any] = {"damping": self.damping, "input_decay": self.input_decay,
                                "pair_decay": self.pair_decay, "mu1": self.mu1,
                                "skip_threshold": self.skip_threshold, "gamma": self.gamma}
        if self.history is not None:
            opts["history"] = self.history
        return opts

    def curvature(self) -> Approximation:
        """Return the curvature the state stands for, aligned with ``prob.partition`` (``structure="quasi_newton"``).

        One ``Kron(A = H_a⁻¹, G = H_g⁻¹, bias folded)`` per layer (a nested Approximation when a block
        holds several layers), so ``direction(g, 0)`` = −``solve(g, 0)`` = :meth:`precondition` (g):
        the method's own damping is already inside the factors (own mode ``"exact"``, use λ = 0).
        ``info`` holds each layer's counters and the extreme eigenvalues of H_g and H_a.
        """
        blocks, info = [], {}
        for bname, lnames in self._blocks:
            built = [self.layers[n].curvature_block() for n in lnames]
            if len(built) == 1:
                blocks.append(built[0][0])
                info[bname] = built[0][1]
            else:
                sub = {n: i for n, (_, i) in zip(lnames, built)}
                blocks.append(Approximation([b for b, _ in built], lnames, self.method, "quasi_newton", "exact",
                                            self.options, sub))
                info[bname] = sub
        return Approximation(blocks, self.partition_names, self.method, "quasi_newton", "exact", self.options, info)

    def __repr__(self) -> str:
        return f"KBFGS({_TITLES[self.method]}, layers={list(self.layers)}, damping={self.damping})"
