"""The oracle's public functions: exact Hessian, GGN, Monte-Carlo Fisher and empirical Fisher.

Scale (``docs/conventions.md``): with L(θ) = R Σ_n ℓ_n,

    hessian           = ∇²L
    ggn               = R Σ_n J_nᵀ ∇²_f ℓ_n J_n            (= the exact Fisher for CE, MSE, BCE)
    fisher_mc         = R Σ_n (1/S) Σ_s ∇ℓ_n(ŷ_s) ∇ℓ_n(ŷ_s)ᵀ, ŷ_s ~ the model's predictive; E = ggn
    empirical_fisher  = R Σ_n ∇ℓ_n(y_n) ∇ℓ_n(y_n)ᵀ

``structure``: ``"full"`` (Dense P×P), ``"block"`` (BlockDiagonal of the exact diagonal blocks of
``prob.partition``), ``"diag"`` (Diagonal), ``"operator"`` (MatrixFree: products only), and for the
Fisher-type kinds ``"low_rank"`` (LowRank UᵀU from the per-sample factor rows) and
``"block_low_rank"`` (BlockDiagonal with one LowRank per partition block).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from curvlab.capture import Capture, capture, output_cotangents
from curvlab.exact import hessian as _hessian
from curvlab.exact.low_rank import block_low_rank_from_capture, low_rank_from_capture
from curvlab.exact.outer import block_from_capture, dense_from_capture, diag_from_capture
from curvlab.exact.products import hessian_unavailable, operator
from curvlab.linalg import CurvatureMatrix
from curvlab.problem import Problem
from curvlab.vocabulary import Curvature, curvature, mc_samples_of

__all__ = ["hessian", "ggn", "fisher_mc", "empirical_fisher", "from_capture", "STRUCTURES", "KINDS"]

STRUCTURES = ("full", "block", "diag", "operator", "low_rank", "block_low_rank")
#: structures built from the factor rows of a sum of outer products (not for the Hessian)
LOW_RANK = ("low_rank", "block_low_rank")
KINDS = ("hessian", "ggn", "fisher_mc", "empirical_fisher")


def _check(prob: Problem, structure: str, theta: Tensor | None) -> Tensor | None:
    """Validate the arguments; returns ``theta`` checked (shape (P,), finite) or None."""
    if not isinstance(prob, Problem):
        raise TypeError(f"expected a curvlab.Problem; got {type(prob).__name__}")
    if structure not in STRUCTURES:
        hint = ("; Kronecker-factored structures are approximations: cl.approx.kfac, ekfac, tkfac, foof, kfoc"
                if "kron" in str(structure) or structure in ("forward_only", "eigen_kron", "trace_kron") else "")
        raise ValueError(f"unknown structure {structure!r}: use one of {STRUCTURES}{hint}")
    return None if theta is None else prob.check_theta(theta)


def _from_cotangents(prob: Problem, structure: str, cotangents: Callable[[Tensor], Tensor],
                     theta: Tensor | None) -> CurvatureMatrix:
    return from_capture(prob, structure, capture(prob, cotangents, theta))


def from_capture(prob: Problem, structure: str, cap: Capture) -> CurvatureMatrix:
    """Return Σ_n Σ_k u_nk u_nkᵀ of a capture covering all of θ in ``structure`` (not ``"operator"``).

    The rows u_nk are the capture's per-sample parameter gradients of its output cotangents (for
    :func:`ggn`, :func:`fisher_mc`, :func:`empirical_fisher`: :func:`curvlab.capture.output_cotangents`).
    """
    if structure == "full":
        return dense_from_capture(cap, prob.num_params)
    if structure == "block":
        return block_from_capture(cap, prob.partition)
    if structure == "low_rank":
        return low_rank_from_capture(cap, prob.num_params)
    if structure == "block_low_rank":
        return block_low_rank_from_capture(cap, prob.partition)
    return diag_from_capture(cap, prob.num_params)


def hessian(prob: Problem, structure: str = "full", theta: Tensor | None = None,
            chunk: int | None = None) -> CurvatureMatrix:
    """Return the exact Hessian ∇²L(θ) (vmapped Hessian-vector products over chunks of basis vectors)."""
    theta = _check(prob, structure, theta)
    if structure in LOW_RANK:
        raise ValueError(f"structure {structure!r} is for ggn, fisher_mc and empirical_fisher (sums of outer "
                         "products UᵀU); the Hessian is not one (it can be indefinite): use 'full', 'block', "
                         "'diag' or 'operator'")
    why = hessian_unavailable(prob, structure)  # a model without (forward-mode) second derivatives
    if why:
        raise ValueError(why)
    if structure == "operator":
        return operator(prob, "hessian", theta)
    fn = {"full": _hessian.hessian_dense, "block": _hessian.hessian_block, "diag": _hessian.hessian_diag}
    return fn[structure](prob, theta, chunk)


def ggn(prob: Problem, structure: str = "full", theta: Tensor | None = None) -> CurvatureMatrix:
    """Return the exact generalised Gauss-Newton matrix R Σ_n J_nᵀ ∇²_f ℓ_n J_n."""
    theta = _check(prob, structure, theta)
    if structure == "operator":
        return operator(prob, "ggn", theta)
    return _from_cotangents(prob, structure, output_cotangents(prob, "type2"), theta)


def fisher_mc(prob: Problem, structure: str = "full", samples: int | None = None, seed: int = 0,
              theta: Tensor | None = None, *, mc_samples: int | None = None) -> CurvatureMatrix:
    """Return the Monte-Carlo Fisher with ``mc_samples`` labels per input drawn from the model (unbiased for ggn).

    ``samples`` is the older spelling of ``mc_samples`` (default 1). Draws come from a
    ``torch.Generator`` seeded with ``seed``: the same seed gives the same matrix.
    """
    theta = _check(prob, structure, theta)
    samples = mc_samples_of(mc_samples, samples)
    if structure == "operator":
        return operator(prob, "fisher_mc", theta, samples=samples, seed=seed)
    return _from_cotangents(prob, structure, output_cotangents(prob, "mc", samples, seed), theta)


def empirical_fisher(prob: Problem, structure: str = "full", theta: Tensor | None = None,
                     per: str = "sample") -> CurvatureMatrix:
    """Return the empirical Fisher with the data labels, per sample or per output position.

    ``per="sample"`` (default): R Σ_n ∇ℓ_n ∇ℓ_nᵀ, with ℓ_n sample n's loss summed over its output
    positions — the Monte-Carlo Fisher with the true labels in place of the samples.
    ``per="position"``: R Σ_n Σ_t ∇ℓ_nt ∇ℓ_ntᵀ, one outer product per loss term ℓ_nt of the T
    output positions t of each sample: the axes after the class axis for CrossEntropyLoss's
    (N, C, d₁, …) outputs, the axes between the batch and the last (feature) axis for MSE and BCE.
    That is curvlinops' ``EFLinearOperator``, which flattens positions into the batch. The two
    agree when outputs have no positions (T = 1); otherwise they differ by the cross-position
    terms R Σ_n Σ_{t≠t'} ∇ℓ_nt ∇ℓ_nt'ᵀ. Both have the same scale R (``curvlab.losses``).
    """
    theta = _check(prob, structure, theta)
    if structure == "operator":
        return operator(prob, "empirical_fisher", theta, per=per)
    return _from_cotangents(prob, structure, output_cotangents(prob, "empirical", per=per), theta)


def get(kind: str) -> Callable[..., CurvatureMatrix]:
    """Return the oracle function for a curvature kind.

    The kinds are ``hessian``, ``ggn``, ``fisher_mc``, ``empirical_fisher``, or an older spelling:
    ``ef``, ``type2``, ``mc`` …; see :mod:`curvlab.vocabulary`.
    """
    table = {Curvature.HESSIAN: hessian, Curvature.GGN: ggn, Curvature.FISHER_MC: fisher_mc,
             Curvature.EMPIRICAL_FISHER: empirical_fisher}
    try:
        return table[curvature(kind)]
    except ValueError:
        raise ValueError(f"unknown curvature kind {kind!r}: use one of {[c.value for c in Curvature]}") from None

