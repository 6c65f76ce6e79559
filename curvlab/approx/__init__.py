"""Approximators: the KFAC family as structured curvature matrices over the oracle's parameter space.

Every function takes a :class:`~curvlab.Problem` and returns an :class:`Approximation` — a
block-diagonal :class:`~curvlab.CurvatureMatrix` with one block per block of ``prob.partition``,
aligned entry by entry with ``cl.exact.ggn(prob, structure="block")`` — built from one forward and
one batched backward pass of the shared capture engine (``curvlab.capture``):

==============  =====================================================  ===========================
function        block (per nn.Linear / nn.Conv2d)                      own damping (``mode="own"``)
==============  =====================================================  ===========================
``kfac``        A ⊗ G                                  (``Kron``)      π-damping
``ekfac``       Q_A⊗Q_G diag(S*) (Q_A⊗Q_G)ᵀ             (``EigenKron``) exact (S* + λ)
``tkfac``       c · A ⊗ G, tr = tr F                   (``Kron``)      trace-normalised factored
``tekfac``      EKFAC's S* (provisional definition)    (``EigenKron``) TKFAC's, on S*
``foof``        A ⊗ I                                  (``Kron``)      exact: ΔW = −∇W (A + λI)⁻¹
``kfoc``        argmin ‖F − A ⊗ G‖_F                    (``Kron``)      π-damping
==============  =====================================================  ===========================

Every function takes the same options, ``f(prob, fisher, mc_samples, seed, approx, unsupported)``:
``fisher`` ∈ {"ggn", "fisher_mc", "empirical_fisher"} (also "type2", "mc", "empirical": see
:mod:`curvlab.vocabulary`) chooses the curvature being approximated (the GGN / true
Fisher, its Monte-Carlo estimate with ``mc_samples`` labels per input drawn with ``seed``, the
empirical Fisher; FOOF has no output factor and takes only ``None``); ``approx`` ∈ {"expand",
"reduce"} the treatment of weight sharing (KFOC: only the split between its factors);
``unsupported`` ∈ {"error", "exact"} what happens to parameters outside ``nn.Linear``/``nn.Conv2d``
("exact": their blocks come from the oracle's exact block of the same Fisher; FOOF has no such
counterpart and raises). ``C.direction(g, λ, mode)`` gives the update under any damping rule
(``"exact"``, ``"factored"``, ``"pi"``, ``"trace"``, ``"own"``); ``C.solve(g, λ)`` is always the
exact (C + λI)⁻¹g.

``grouped_newton`` (Wolinski's GroupedNewton) is not a matrix over θ: it returns a
:class:`GroupedSummary` (S×S H̄, S-vector ḡ, order-3 D over a partition) and per-subset learning rates.
"""

from curvlab.approx.base import MODES, Approximation
from curvlab.approx.ekfac import ekfac
from curvlab.approx.factors import APPROXIMATIONS, FISHER_TYPES
from curvlab.approx.foof import foof
from curvlab.approx.grouped_newton import GroupedSummary, LearningRates, cubic_learning_rates, grouped_newton
from curvlab.approx.kbfgs import (
    KBFGS,
    KBFGSLayerState,
    KBFGSStatistics,
    LBFGSMemory,
    bfgs_inverse_update,
    bfgs_skip_reason,
    double_damping,
    kbfgs_statistics,
    lm_damping,
    powell_damping,
)
from curvlab.approx.kfac import kfac
from curvlab.approx.kfoc import kfoc
from curvlab.approx.tkfac import tekfac, tkfac
from curvlab.approx.two_level import COARSE_SPACES, TwoLevel, two_level_kfac

__all__ = ["kfac", "ekfac", "tkfac", "tekfac", "foof", "kfoc", "Approximation", "MODES", "FISHER_TYPES",
           "APPROXIMATIONS", "grouped_newton", "GroupedSummary", "LearningRates", "cubic_learning_rates",
           "two_level_kfac", "TwoLevel", "COARSE_SPACES",
           "KBFGS", "KBFGSLayerState", "KBFGSStatistics", "LBFGSMemory", "kbfgs_statistics",
           "bfgs_inverse_update", "powell_damping", "lm_damping", "double_damping", "bfgs_skip_reason"]
