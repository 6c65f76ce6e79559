"""Comparators: how close is one curvature matrix (or update direction) to another?

    cl.compare.cosine(A, B)            # Frobenius cosine, whole and per block   (matrices.py)
    cl.compare.relative_error(A, B)    # ‖A − B‖_F / ‖B‖_F, whole and per block
    cl.compare.spectra(A, B, k=10)     # eigenvalue distributions, top-k ratios, subspace overlap (spectra.py)
    cl.compare.directions({"ggn": G, "kfac": K, "sgd": lambda g, lam: -g}, g, damping)   (directions.py)
    ds = cl.compare.report(prob, methods=["ggn-block", "kfac"], damping=[1e-3])  # xarray.Dataset (report.py)

Everything here sees only CurvatureMatrix objects and tensors, except ``report`` and the method
registry (``methods.py``), which take a Problem.
"""

from curvlab.compare import methods
from curvlab.compare.directions import DirectionComparison, direction_of, directions, energy_norm, step_size
from curvlab.compare.kron import factor_fraction_below
from curvlab.compare.matrices import (
    Blockwise,
    cosine,
    difference_norm,
    inner,
    logdet_difference,
    relative_error,
    restrict,
    trace_ratio,
)
from curvlab.compare.report import DEFAULT_DAMPING, VARIABLES, format_report, load, report, save
from curvlab.compare.spectra import (
    SpectralComparison,
    eigenvalues,
    fraction_below,
    negative_mass,
    spectra,
    subspace_overlap,
    top_eigen,
    wasserstein,
)

__all__ = ["cosine", "relative_error", "inner", "difference_norm", "trace_ratio", "logdet_difference", "restrict",
           "Blockwise", "spectra", "SpectralComparison", "eigenvalues", "top_eigen", "subspace_overlap",
           "wasserstein", "fraction_below", "negative_mass", "factor_fraction_below", "directions",
           "DirectionComparison", "direction_of", "energy_norm", "step_size", "report", "save", "load",
           "format_report", "VARIABLES", "DEFAULT_DAMPING", "methods"]
