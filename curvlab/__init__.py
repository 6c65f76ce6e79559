"""curvlab: how close KFAC-family curvature approximations come to the exact Hessian, GGN and Fisher.

    import curvlab as cl
    prob = cl.problems.load("digits-mlp")
    G = cl.exact.ggn(prob, structure="block")

Sub-packages are imported on first use (``cl.approx``, ``cl.compare``, ``cl.studies`` …), so
``import curvlab`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from curvlab import exact, linalg, memory
from curvlab.linalg import BlockDiagonal, CurvatureMatrix, Dense, Diagonal, MatrixFree
from curvlab.problem import Block, Partition, Problem

__version__ = "0.1.0"

_LAZY = ("approx", "compare", "problems", "data", "plot", "capture", "losses", "reference", "cli", "optim",
         "studies")

__all__ = ["Problem", "Block", "Partition", "CurvatureMatrix", "Dense", "BlockDiagonal", "Diagonal",
           "MatrixFree", "exact", "linalg", "memory", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return importlib.import_module(f"curvlab.{name}")
    raise AttributeError(f"module 'curvlab' has no attribute {name!r}")
