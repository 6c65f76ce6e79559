"""Random test matrices shared by the linalg and compare tests (float64, seeded)."""

from __future__ import annotations

import torch


def spd(n: int, seed: int, rank: int | None = None) -> torch.Tensor:
    """A random symmetric positive semi-definite n×n matrix BBᵀ/r (full rank unless ``rank`` < n)."""
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(n, rank or n + 2, generator=g, dtype=torch.float64)
    return B @ B.T / B.shape[1]


def orth(n: int, seed: int) -> torch.Tensor:
    """A random n×n orthogonal matrix (Q of a QR factorisation)."""
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
