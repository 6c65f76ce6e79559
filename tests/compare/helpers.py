"""Random structured matrices for the comparator tests (float64)."""

from __future__ import annotations

import torch

from curvlab.linalg import BlockDiagonal, Dense, Diagonal, EigenKron, Kron, MatrixFree
from tests.matrices import orth, spd  # noqa: F401  (re-exported to the compare tests)


def kron(p: int, q: int, bias: bool, seed: int) -> Kron:
    return Kron(spd(q, seed), spd(p, seed + 1), bias=bias)


def eigen_kron(p: int, q: int, bias: bool, seed: int) -> EigenKron:
    g = torch.Generator().manual_seed(seed)
    S = torch.rand(p, q, generator=g, dtype=torch.float64) + 0.1
    return EigenKron(orth(q, seed), orth(p, seed + 1), S, bias=bias)


#: layer layouts (p, q, bias) of a tiny three-block "network": sizes 12, 10, 6
LAYOUT = [(3, 4, True), (2, 5, False), (2, 3, True)]
NAMES = ["l0", "l1", "l2"]
P = sum(p * q for p, q, _ in LAYOUT)


def structured(kind: str, seed: int):
    """A P×P matrix of the given structure."""
    if kind == "dense":
        return Dense(spd(P, seed))
    if kind == "diag":
        return Diagonal(torch.rand(P, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.1)
    if kind == "block":
        return BlockDiagonal([Dense(spd(p * q, seed + i)) for i, (p, q, _) in enumerate(LAYOUT)], NAMES)
    if kind == "kron":
        return BlockDiagonal([kron(p, q, b, seed + 3 * i) for i, (p, q, b) in enumerate(LAYOUT)], NAMES)
    if kind == "eigen_kron":
        return BlockDiagonal([eigen_kron(p, q, b, seed + 3 * i) for i, (p, q, b) in enumerate(LAYOUT)], NAMES)
    if kind == "mixed":  # Kron, EigenKron and a nested block-diagonal pair of Kron pieces
        p, q, b = LAYOUT[2]
        nested = BlockDiagonal([Dense(spd(p * (q - 1), seed)), Diagonal(torch.full((p,), 0.5, dtype=torch.float64))],
                               ["w", "b"])
        return BlockDiagonal([kron(*LAYOUT[0], seed), eigen_kron(*LAYOUT[1], seed + 1), nested], NAMES)
    if kind == "operator":
        M = spd(P, seed)
        return MatrixFree(P, lambda V: M @ V, torch.float64, chunk=7)
    raise ValueError(kind)


KINDS = ["dense", "diag", "block", "kron", "eigen_kron", "mixed", "operator"]
