"""A block-diagonal curvature matrix whose blocks are any CurvatureMatrix."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from curvlab import memory
from curvlab.linalg.base import CurvatureMatrix, Eigh

__all__ = ["BlockDiagonal"]


class BlockDiagonal(CurvatureMatrix):
    """C = blockdiag(C_1, …, C_B) over consecutive ranges of the parameter vector.

    Every operation works block by block (a solve is B small solves, the spectrum is the union of
    the blocks' spectra); only :meth:`to_dense` and :meth:`eigh` (whose eigenvectors are P×P)
    allocate a P×P tensor.
    """

    def __init__(self, blocks: Sequence[CurvatureMatrix], names: Sequence[str] | None = None) -> None:
        blocks = tuple(blocks)
        if not blocks:
            raise ValueError("BlockDiagonal needs at least one block")
        dtypes = {b.dtype for b in blocks}
        if len(dtypes) != 1:
            raise TypeError(f"all blocks must share one dtype; got {sorted(map(str, dtypes))}")
        slices, start = [], 0
        for b in blocks:
            slices.append(slice(start, start + b.size))
            start += b.size
        super().__init__(start, blocks[0].dtype, blocks[0].device)
        self._blocks = blocks
        self._slices = tuple(slices)
        names = tuple(names) if names is not None else tuple(f"block{i}" for i in range(len(blocks)))
        if len(names) != len(blocks):
            raise ValueError(f"{len(names)} names for {len(blocks)} blocks")
        self._names = names

    @property
    def structure(self) -> str:
        inner = {b.structure for b in self._blocks}
        return "block" if inner == {"dense"} else "block[" + ",".join(sorted(inner)) + "]"

    @property
    def blocks(self) -> tuple[CurvatureMatrix, ...]:
        return self._blocks

    @property
    def block_slices(self) -> tuple[slice, ...]:
        return self._slices

    @property
    def block_names(self) -> tuple[str, ...]:
        return self._names

    def block(self, name: str) -> CurvatureMatrix:
        """The block called ``name``."""
        try:
            return self._blocks[self._names.index(name)]
        except ValueError:
            raise KeyError(f"no block named {name!r}; blocks are {list(self._names)}") from None

    def _map(self, V: Tensor, fn) -> Tensor:
        return torch.cat([fn(b, V[s]) for b, s in zip(self._blocks, self._slices)], dim=0)

    def to_dense(self) -> Tensor:
        memory.check(self.shape, self.dtype, "the dense form of a block-diagonal matrix")
        out = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        for b, s in zip(self._blocks, self._slices):
            out[s, s] = b.to_dense()
        return out

    def _matmat(self, V: Tensor) -> Tensor:
        return self._map(V, lambda b, v: b._matmat(v))

    def _solve(self, V: Tensor, damping: float) -> Tensor:
        return self._map(V, lambda b, v: b._solve(v, damping))

    def direction(self, g: Tensor, damping: float = 0.0, mode: str = "exact") -> Tensor:
        """Each block's own update direction for its slice of g (modes as the blocks define them)."""
        if mode == "exact":
            return super().direction(g, damping, mode)
        if g.shape != (self.size,):
            raise ValueError(f"g must have shape ({self.size},); got {tuple(g.shape)}")
        return torch.cat([b.direction(g[s], damping, mode) for b, s in zip(self._blocks, self._slices)])

    def _inverse(self, damping: float) -> CurvatureMatrix:
        return BlockDiagonal([b._inverse(damping) for b in self._blocks], self._names)

    def _eigh(self) -> Eigh:
        values, vectors = [], torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        for b, s in zip(self._blocks, self._slices):
            w, Q = b.eigh()
            values.append(w)
            vectors[s, s] = Q
        w = torch.cat(values)
        w, order = torch.sort(w)
        return Eigh(w, vectors[:, order])

    def _eigvalsh(self) -> Tensor:
        return torch.sort(torch.cat([b.eigvalsh() for b in self._blocks])).values

    def diagonal(self) -> Tensor:
        return torch.cat([b.diagonal() for b in self._blocks])

    def trace(self) -> Tensor:
        return sum(b.trace() for b in self._blocks)

    def logdet(self, damping: float = 0.0) -> Tensor:
        return sum(b.logdet(damping) for b in self._blocks)

    def frobenius_norm(self) -> Tensor:
        return torch.sqrt(sum(b.frobenius_norm() ** 2 for b in self._blocks))

    def _scaled(self, alpha: float) -> CurvatureMatrix:
        return BlockDiagonal([b._scaled(alpha) for b in self._blocks], self._names)

    def _add(self, other: CurvatureMatrix, sign: float) -> CurvatureMatrix | None:
        if isinstance(other, BlockDiagonal) and other.block_slices == self._slices:
            return BlockDiagonal([a._combine(b, sign) for a, b in zip(self._blocks, other.blocks)], self._names)
        from curvlab.linalg.diagonal import Diagonal

        if isinstance(other, Diagonal):
            return BlockDiagonal([a._combine(Diagonal(other.diag[s]), sign)
                                  for a, s in zip(self._blocks, self._slices)], self._names)
        return None
