"""The oracle: exact Hessian, GGN, Monte-Carlo and empirical Fisher — full, block, diagonal, matrix-free."""

from curvlab.exact.curvature import KINDS, STRUCTURES, empirical_fisher, fisher_mc, get, ggn, hessian
from curvlab.exact.products import ef_vp, fisher_mc_vp, ggn_vp, hvp, operator

__all__ = ["hessian", "ggn", "fisher_mc", "empirical_fisher", "get", "hvp", "ggn_vp", "ef_vp",
           "fisher_mc_vp", "operator", "KINDS", "STRUCTURES"]
