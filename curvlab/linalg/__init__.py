"""CurvatureMatrix family: one protocol, many structures (dense, block-diagonal, diagonal, low-rank, …).

Nothing in this package knows about networks: these are symmetric matrices over a flat vector.
"""

from curvlab.linalg.base import DENSE_EIGH_LIMIT, CurvatureMatrix, Eigh, check_damping
from curvlab.linalg.block import BlockDiagonal
from curvlab.linalg.dense import Dense
from curvlab.linalg.diagonal import Diagonal
from curvlab.linalg.kron import EigenKron, ForwardOnly, Kron, KroneckerFactored, TraceKron
from curvlab.linalg.layout import KronLayout
from curvlab.linalg.low_rank import (
    ConcatFactor,
    DenseFactor,
    Factor,
    KronRowsFactor,
    LowRank,
    StackFactor,
    TransformedFactor,
)
from curvlab.linalg.operator import MatrixFree

__all__ = ["CurvatureMatrix", "Eigh", "Dense", "BlockDiagonal", "Diagonal", "MatrixFree", "Kron", "EigenKron",
           "KroneckerFactored", "TraceKron", "ForwardOnly", "KronLayout", "check_damping", "DENSE_EIGH_LIMIT",
           "LowRank", "Factor", "DenseFactor", "KronRowsFactor", "ConcatFactor", "StackFactor", "TransformedFactor"]
