"""curvlab: how close are KFAC-family curvature approximations to the exact Hessian, GGN and Fisher?

    import curvlab as cl
    prob = cl.problems.load("digits-mlp")
    G = cl.exact.ggn(prob, structure="block")
"""

from curvlab import exact, linalg, memory
from curvlab.linalg import BlockDiagonal, CurvatureMatrix, Dense, Diagonal, MatrixFree
from curvlab.problem import Block, Partition, Problem

__version__ = "0.1.0"

__all__ = ["Problem", "Block", "Partition", "CurvatureMatrix", "Dense", "BlockDiagonal", "Diagonal",
           "MatrixFree", "exact", "linalg", "memory", "__version__"]
