"""Comparators: how close one curvature matrix (or update direction) is to another.

    cl.compare.cosine(A, B)            # Frobenius cosine, whole and per block   (matrices.py)
    cl.compare.relative_error(A, B)    # ‖A − B‖_F / ‖B‖_F, whole and per block
    cl.compare.spectra(A, B, k=10)     # eigenvalue distributions, top-k ratios, subspace overlap (spectra.py)
    cl.compare.directions({"ggn": G, "kfac": K, "sgd": lambda g, lam: -g}, g, damping)   (directions.py)
    ds = cl.compare.report(prob, methods=["ggn-block", "kfac"], damping=[1e-3])  # xarray.Dataset (report.py)

Everything here sees only CurvatureMatrix objects and tensors, except ``report`` and the method
registry (``methods.py``), which take a Problem. The report (and with it xarray) is imported on
first use of one of its names, so that ``curvlab.compare.methods`` stays light.
"""

import importlib
import sys
import types
from typing import Any

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
           "format_report", "check_arguments", "VARIABLES", "DEFAULT_DAMPING", "methods"]

#: names of ``curvlab.compare.report`` (xarray), imported when first asked for
_REPORT = ("report", "check_arguments", "save", "load", "format_report", "VARIABLES", "DEFAULT_DAMPING")


def __getattr__(name: str) -> Any:
    if name in _REPORT:
        importlib.import_module("curvlab.compare.report")  # binds the names (see _Package)
        return globals()[name]
    raise AttributeError(f"module 'curvlab.compare' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_REPORT})


class _Package(types.ModuleType):
    """``curvlab.compare`` itself: importing the submodule ``report`` binds its names, not the module.

    Python sets the attribute ``report`` of a package to its submodule once that is imported; here
    the function of the same name must win (``cl.compare.report(prob)``), whoever imports first.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "report" and isinstance(value, types.ModuleType):
            for n in _REPORT:
                super().__setattr__(n, getattr(value, n))
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
