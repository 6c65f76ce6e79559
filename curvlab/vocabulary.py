"""One spelling per idea: the curvature kinds and the structures, as string enums.

**Curvature** (what matrix): ``hessian``, ``ggn``, ``fisher_mc``, ``empirical_fisher`` — the oracle's
function names (``cl.exact.ggn`` …). Wherever a Fisher-type curvature is chosen (``fisher=`` of the
approximators and training methods, ``kind`` of ``cl.exact.get``) these are the names; the older
spellings stay accepted where they are public: ``type2`` (the exact expectation, = ``ggn``), ``mc``
(= ``fisher_mc``) and ``empirical`` / ``ef`` (= ``empirical_fisher``), as in curvlinops' FisherType.

**Structure** (how it is represented): the ``structure=`` of the oracle (``full``, ``block``,
``diag``, ``operator``, ``low_rank``, ``block_low_rank``) and the representations of the
approximations (``kron``, ``eigen_kron``, ``trace_kron``, ``forward_only``, ``quasi_newton``,
``two_level``), and ``spectral`` / ``block_spectral`` for a matrix given by its eigendecomposition
(the remedies for indefinite curvature: saddle-free Newton |H|, the positive part of H);
``C.structure`` of every CurvatureMatrix is one of them.

The number of Monte-Carlo label samples is ``mc_samples`` everywhere (``samples=`` is accepted by the
oracle's ``fisher_mc`` as its older spelling).
"""

from __future__ import annotations

from enum import Enum
from typing import Any

__all__ = ["Curvature", "Structure", "curvature", "fisher_type", "mc_samples_of", "FISHER_SPELLINGS"]


class Curvature(str, Enum):
    """The curvature kinds (``str`` values: ``Curvature.GGN == "ggn"``)."""

    HESSIAN = "hessian"
    GGN = "ggn"
    FISHER_MC = "fisher_mc"
    EMPIRICAL_FISHER = "empirical_fisher"

    def __str__(self) -> str:
        return self.value


class Structure(str, Enum):
    """The representations of a CurvatureMatrix (``C.structure``)."""

    FULL = "full"
    BLOCK = "block"
    DIAG = "diag"
    OPERATOR = "operator"
    LOW_RANK = "low_rank"
    BLOCK_LOW_RANK = "block_low_rank"
    KRON = "kron"
    EIGEN_KRON = "eigen_kron"
    TRACE_KRON = "trace_kron"
    FORWARD_ONLY = "forward_only"
    QUASI_NEWTON = "quasi_newton"
    TWO_LEVEL = "two_level"
    SPECTRAL = "spectral"
    BLOCK_SPECTRAL = "block_spectral"

    def __str__(self) -> str:
        return self.value


#: accepted spellings of the Fisher-type kinds → the canonical kind
FISHER_SPELLINGS: dict[str, Curvature] = {
    "ggn": Curvature.GGN, "type2": Curvature.GGN, "type-2": Curvature.GGN, "gauss-newton": Curvature.GGN,
    "fisher_mc": Curvature.FISHER_MC, "fisher-mc": Curvature.FISHER_MC, "mc": Curvature.FISHER_MC,
    "empirical_fisher": Curvature.EMPIRICAL_FISHER, "empirical-fisher": Curvature.EMPIRICAL_FISHER,
    "empirical": Curvature.EMPIRICAL_FISHER, "ef": Curvature.EMPIRICAL_FISHER,
}


def curvature(value: Any) -> Curvature:
    """Return the curvature kind named ``value`` (any accepted spelling; ``hessian`` included)."""
    if isinstance(value, Curvature):
        return value
    if isinstance(value, str):
        key = value.strip().lower()
        if key == "hessian":
            return Curvature.HESSIAN
        if key in FISHER_SPELLINGS:
            return FISHER_SPELLINGS[key]
    others = sorted(k for k in FISHER_SPELLINGS if k not in {c.value for c in Curvature})
    raise ValueError(f"unknown curvature (fisher type) {value!r}: use one of {[c.value for c in Curvature]} "
                     f"(also accepted: {others})")


#: the internal names of the output cotangents of each Fisher-type kind (curvlab.capture)
_COTANGENTS = {Curvature.GGN: "type2", Curvature.FISHER_MC: "mc", Curvature.EMPIRICAL_FISHER: "empirical"}


def fisher_type(value: Any) -> str:
    """Return the Fisher type ``value`` names, as the capture engine's cotangent name.

    The names are ``type2``, ``mc`` and ``empirical``; raises for an unknown name or for ``hessian`` (not a
    sum of outer products).
    """
    kind = curvature(value)
    if kind is Curvature.HESSIAN:
        raise ValueError("the Hessian is not a Fisher-type curvature (not a sum of outer products): use 'ggn', "
                         "'fisher_mc' or 'empirical_fisher'")
    return _COTANGENTS[kind]


def mc_samples_of(mc_samples: Any = None, samples: Any = None, default: int = 1) -> int:
    """Return the Monte-Carlo sample count from ``mc_samples`` or its older spelling ``samples`` (not both)."""
    if mc_samples is not None and samples is not None and mc_samples != samples:
        raise ValueError(f"give the number of Monte-Carlo samples once: mc_samples={mc_samples!r} and "
                         f"samples={samples!r}")
    value = default if mc_samples is None and samples is None else (mc_samples if mc_samples is not None else samples)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"mc_samples must be a positive integer; got {value!r}")
    return value
