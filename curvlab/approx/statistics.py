"""The KFAC family as statistics and blocks: what each method measures on a batch, and what it builds.

Every Kronecker-family method is two steps per layer piece (:class:`~curvlab.approx.factors.KronPiece`):

1. **statistics** of a batch — tensors that average over batches (an exponential moving average
   of them is again a valid statistic): KFAC's factors A, G; TKFAC's exact block trace tr F; EKFAC's
   second moments S* in a given Kronecker eigenbasis; FOOF's A alone;
2. a **block** built from (possibly averaged) statistics: A ⊗ G, c·A ⊗ G, Q diag(S*) Qᵀ, A ⊗ I.

The one-batch approximators (``cl.approx.kfac`` …) run both steps on one batch; ``curvlab.optim``
averages step 1 over a trajectory (with its own refresh periods) and runs step 2 when it refreshes
the preconditioner. EKFAC and TEKFAC measure S* in the eigenbasis of the KFAC factors (George et
al. 2018, arXiv 1806.03884): on one batch that of the batch's factors, along a trajectory that of
the averaged factors at the last basis refresh (``basis``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from curvlab.approx.factors import KronPiece
from curvlab.linalg import CurvatureMatrix, Eigh
from curvlab.linalg.kron import EigenKron, ForwardOnly, Kron, TraceKron

__all__ = ["Family", "FAMILIES", "Basis", "kronecker_basis", "average", "one_batch"]

Stats = dict[str, Tensor]
#: the Kronecker eigenbasis of a piece: the eigendecompositions of its factors A and G
Basis = tuple[Eigh, Eigh]


def kronecker_basis(A: Tensor, G: Tensor) -> Basis:
    """Return the eigendecompositions (λ_A, Q_A), (λ_G, Q_G) of the factors."""
    eA, QA = torch.linalg.eigh(A)
    eG, QG = torch.linalg.eigh(G)
    return Eigh(eA, QA), Eigh(eG, QG)


def _trace_factor(tr_F: Tensor | float, A: Tensor, G: Tensor) -> float:
    """Return c = tr F / (tr A · tr G): the scalar that gives A ⊗ G the exact block's trace (1 if undefined)."""
    denom = float(A.diagonal().sum() * G.diagonal().sum())
    return float(tr_F) / denom if denom > 0 else 1.0


# ---------------------------------------------------------------------------------------------- per method
# Each method's statistics are the factor Gram matrices it names (``grams``: "A" = the piece's
# input_factor, "G" = its output_factor) plus, for some, further statistics (``extra``).
def _tkfac_extra(p: KronPiece, approx: str, basis: Basis | None, grams: Stats) -> Stats:
    return {"trace": p.exact_trace()}


def _eigen_extra(p: KronPiece, approx: str, basis: Basis | None, grams: Stats) -> Stats:
    (_, QA), (_, QG) = basis if basis is not None else kronecker_basis(grams["A"], grams["G"])
    return {"S": p.eigen_second_moments(QA, QG)}  # Σ S = tr F


def _kfac_block(s: Mapping[str, Tensor], p: KronPiece, basis: Basis | None) -> tuple[CurvatureMatrix, dict]:
    return Kron(s["A"], s["G"], bias=p.folded), {}


def _tkfac_block(s: Mapping[str, Tensor], p: KronPiece, basis: Basis | None) -> tuple[CurvatureMatrix, dict]:
    c = _trace_factor(s["trace"], s["A"], s["G"])
    return TraceKron(s["A"], s["G"], c, bias=p.folded), {"c": c, "trace": float(s["trace"])}


def _eigen_block(trace_factors: bool) -> Callable:
    def block(s: Mapping[str, Tensor], p: KronPiece, basis: Basis | None) -> tuple[CurvatureMatrix, dict]:
        (eA, QA), (eG, QG) = basis if basis is not None else kronecker_basis(s["A"], s["G"])
        denom = float(eA.sum() * eG.sum())
        c = float(s["S"].sum()) / denom if denom > 0 else 1.0
        E = EigenKron(QA, QG, s["S"], p.folded, (eA, c * eG if trace_factors else eG), squares=True)
        return E, ({"c": c} if trace_factors else {"kfac_trace_ratio": 1.0 / c if c else float("inf")})

    return block


def _foof_block(s: Mapping[str, Tensor], p: KronPiece, basis: Basis | None) -> tuple[CurvatureMatrix, dict]:
    return ForwardOnly(s["A"], p.d_out, bias=p.folded), {}


@dataclass(frozen=True)
class Family:
    """One Kronecker-family method: its batch statistics and its block.

    ``statistics(piece, approx, basis)`` measures a batch: the factor Gram matrices named in ``grams``
    ("A": :meth:`~curvlab.approx.factors.KronPiece.input_factor`, "G": ``output_factor``) and the
    ``extra`` statistics, if any; ``accumulate`` averages them into running ones; ``block(stats,
    piece, basis)`` builds the block and its diagnostics; ``needs_basis``: the statistics depend on a
    Kronecker eigenbasis (EKFAC's S*), given by ``basis`` (``None``: the batch's own factors');
    ``uses_output``: the method needs backward statistics (FOOF does not); ``structure``: the
    representation of its blocks.
    """

    name: str
    block: Callable[[Mapping[str, Tensor], KronPiece, Basis | None], tuple[CurvatureMatrix, dict]]
    structure: str
    grams: tuple[str, ...] = ("A", "G")
    extra: Callable[[KronPiece, str, Basis | None, Stats], Stats] | None = None
    needs_basis: bool = False
    uses_output: bool = True

    def statistics(self, p: KronPiece, approx: str, basis: Basis | None) -> Stats:
        """Return the batch statistics of piece ``p``: its factor Gram matrices, then the extra ones."""
        stats = {k: p.input_factor(approx) if k == "A" else p.output_factor(approx) for k in self.grams}
        if self.extra is not None:
            stats.update(self.extra(p, approx, basis, stats))
        return stats

    def accumulate(self, old: Stats | None, p: KronPiece, approx: str, basis: Basis | None,
                   decay: float) -> Stats:
        """Return ``average(old, self.statistics(p, approx, basis), decay)``, the Gram factors in one GEMM each.

        A ← decay·A + (1 − decay)·XᵀX/r and G ← decay·G + (1 − decay)·YᵀY as one ``addmm`` each (X, r and
        Y from :meth:`~curvlab.approx.factors.KronPiece.input_rows` / ``output_rows``), the extra
        statistics by :func:`average` (a method whose extra statistics need the batch's own basis,
        ``basis=None``, averages its plain statistics).
        """
        if old is None or (self.needs_basis and basis is None):
            return average(old, self.statistics(p, approx, basis), decay)
        new = {}
        for k in self.grams:
            X, r = p.input_rows(approx) if k == "A" else (p.output_rows(approx), 1)
            new[k] = torch.addmm(old[k], X.T, X, beta=decay, alpha=(1.0 - decay) / r)
        if self.extra is not None:
            extra = self.extra(p, approx, basis, new)
            new.update(average({k: old[k] for k in extra}, extra, decay))
        return new


FAMILIES: dict[str, Family] = {
    "kfac": Family("kfac", _kfac_block, "kron"),
    "tkfac": Family("tkfac", _tkfac_block, "trace_kron", extra=_tkfac_extra),
    "ekfac": Family("ekfac", _eigen_block(False), "eigen_kron", extra=_eigen_extra, needs_basis=True),
    "tekfac": Family("tekfac", _eigen_block(True), "eigen_kron", extra=_eigen_extra, needs_basis=True),
    "foof": Family("foof", _foof_block, "forward_only", grams=("A",), uses_output=False),
}


def average(old: Stats | None, new: Stats, decay: float) -> Stats:
    """Return the exponential moving average decay·old + (1 − decay)·new (``new`` when there is no ``old``)."""
    if old is None:
        return dict(new)
    return {k: torch.lerp(old[k], v, 1.0 - decay) for k, v in new.items()}  # old + (1 − decay)(new − old)


def one_batch(name: str, approx: str) -> Callable[[KronPiece], tuple[CurvatureMatrix, dict]]:
    """Return the block builder of method ``name`` on one batch: its statistics of the piece, then its block."""
    family = FAMILIES[name]

    def build(p: KronPiece) -> tuple[CurvatureMatrix, dict]:
        return family.block(family.statistics(p, approx, None), p, None)

    return build
