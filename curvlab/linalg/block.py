"""A block-diagonal curvature matrix whose blocks are any CurvatureMatrix.

Its damping modes are the modes every block supports (a block-diagonal of Kronecker blocks has
their factored modes; one dense block among them leaves only ``"exact"``). A subclass may widen this
(:attr:`BlockDiagonal.exact_fallback`): then a mode any block supports is accepted, and a block
without it takes exact damping with the same scalar λ — a damping pair (λ_A, λ_G), which only
Kronecker factors can take, raises for such a block.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from curvlab import memory
from curvlab.linalg.base import CurvatureMatrix, Damping, Eigh

__all__ = ["BlockDiagonal"]


class BlockDiagonal(CurvatureMatrix):
    """C = blockdiag(C_1, …, C_B) over consecutive ranges of the parameter vector.

    ``exact_fallback`` (class attribute, False here): whether blocks without a requested damping mode
    take exact damping instead of the mode being refused (see the module docstring).

    Every operation works block by block (a solve is B small solves, the spectrum is the union of
    the blocks' spectra); only :meth:`to_dense` and :meth:`eigh` (whose eigenvectors are P×P)
    allocate a P×P tensor.
    """

    exact_fallback = False

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
        union = tuple(dict.fromkeys(m for b in blocks for m in ("exact", *b.modes)))
        pairs = tuple(dict.fromkeys(m for b in blocks for m in b.pair_modes))
        if not self.exact_fallback:
            union = tuple(m for m in union if m == "exact" or all(m in b.modes for b in blocks))
            pairs = tuple(m for m in pairs if all(m in b.pair_modes for b in blocks))
        self.modes, self.pair_modes = union, pairs

    @property
    def structure(self) -> str:
        """``block`` for dense blocks, else ``block[s1,s2,…]`` naming the blocks' structures."""
        inner = {b.structure for b in self._blocks}
        return "block" if inner == {"full"} else "block[" + ",".join(sorted(inner)) + "]"

    @property
    def blocks(self) -> tuple[CurvatureMatrix, ...]:
        """The diagonal blocks, in parameter order."""
        return self._blocks

    @property
    def block_slices(self) -> tuple[slice, ...]:
        """Where each block sits in the flat parameter vector."""
        return self._slices

    @property
    def block_names(self) -> tuple[str, ...]:
        """The name of each block."""
        return self._names

    def block(self, name: str) -> CurvatureMatrix:
        """Return the block called ``name``."""
        try:
            return self._blocks[self._names.index(name)]
        except ValueError:
            raise KeyError(f"no block named {name!r}; blocks are {list(self._names)}") from None

    def _map(self, V: Tensor, fn) -> Tensor:
        return torch.cat([fn(b, V[s]) for b, s in zip(self._blocks, self._slices)], dim=0)

    def to_dense(self) -> Tensor:
        """Return the dense P×P matrix with the blocks on the diagonal and zeros elsewhere."""
        memory.check(self.shape, self.dtype, "the dense form of a block-diagonal matrix")
        out = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        for b, s in zip(self._blocks, self._slices):
            out[s, s] = b.to_dense()
        return out

    def _matmat(self, V: Tensor) -> Tensor:
        return self._map(V, lambda b, v: b._matmat(v))

    def _solve(self, V: Tensor, damping: float) -> Tensor:
        return self._map(V, lambda b, v: b._solve(v, damping))

    def _inverse(self, damping: float) -> CurvatureMatrix:
        return BlockDiagonal([b._inverse(damping) for b in self._blocks], self._names)

    def _per_block(self, b: CurvatureMatrix, damping: Damping, mode: str, name: str,
                   own: Callable, exact: Callable):
        """Apply a damped operation to block b: its own ``mode`` if it has it, else exact damping."""
        if mode in b.modes:
            return own(b, b.check_damping(damping, mode))
        if isinstance(damping, tuple):
            raise ValueError(f"block {name!r} ({type(b).__name__}) has no damping mode {mode!r} and takes exact "
                             f"damping with a scalar λ; the pair {damping!r} applies only to Kronecker factors: "
                             "pass a scalar damping")
        return exact(b, damping)

    def _solve_mode(self, V: Tensor, damping: Damping, mode: str) -> Tensor:
        out = []
        for b, s, n in zip(self._blocks, self._slices, self._names):
            v = V[s]
            out.append(self._per_block(b, damping, mode, n, lambda b, d, v=v: b._solve_mode(v, d, mode),
                                       lambda b, d, v=v: b._solve(v, d)))
        return torch.cat(out, dim=0)

    def _inverse_mode(self, damping: Damping, mode: str) -> CurvatureMatrix:
        return BlockDiagonal([self._per_block(b, damping, mode, n, lambda b, d: b._inverse_mode(d, mode),
                                              lambda b, d: b._inverse(d))
                              for b, n in zip(self._blocks, self._names)], self._names)

    def _logdet_mode(self, damping: Damping, mode: str) -> Tensor:
        return sum(self._per_block(b, damping, mode, n, lambda b, d: b._logdet_mode(d, mode),
                                   lambda b, d: b._logdet(d))
                   for b, n in zip(self._blocks, self._names))

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
        """Return the blocks' diagonals concatenated, shape (P,)."""
        return torch.cat([b.diagonal() for b in self._blocks])

    def trace(self) -> Tensor:
        """Return tr C = Σ_b tr C_b."""
        return sum(b.trace() for b in self._blocks)

    def _logdet(self, damping: float) -> Tensor:
        return sum(b._logdet(damping) for b in self._blocks)

    def frobenius_norm(self) -> Tensor:
        """Return ‖C‖_F = √(Σ_b ‖C_b‖²_F)."""
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

    # -- structural hooks ------------------------------------------------------------------------
    def _inner(self, other: CurvatureMatrix) -> Tensor:
        """⟨blockdiag(A_b), B⟩ = Σ_b ⟨A_b, B_bb⟩: only B's diagonal blocks."""
        if len(self._blocks) == 1:
            return self._blocks[0].inner(other)
        return sum(a.inner(other.restrict(s)) for a, s in zip(self._blocks, self._slices))

    def _difference_norm(self, other: CurvatureMatrix) -> Tensor:
        """Return ‖A − B‖ from ‖A − B‖² = Σ_b ‖A_b − B_bb‖² + ‖offdiag(B)‖²."""
        if len(self._blocks) == 1:
            return self._blocks[0].difference_norm(other)
        sq = sum(a.difference_norm(other.restrict(s)) ** 2 for a, s in zip(self._blocks, self._slices))
        return torch.sqrt(sq + other.offblock_sq(self._slices))

    def _offblock_sq(self, slices) -> Tensor | None:
        if list(slices) == list(self._slices):
            return torch.zeros((), dtype=self.dtype, device=self.device)
        return None

    def _restrict(self, s: slice) -> CurvatureMatrix:
        pieces, names = [], []
        for b, bs, name in zip(self._blocks, self._slices, self._names):
            lo, hi = max(s.start, bs.start), min(s.stop, bs.stop)
            if lo < hi:
                pieces.append(b.restrict(slice(lo - bs.start, hi - bs.start)))
                names.append(name)
        return pieces[0] if len(pieces) == 1 else BlockDiagonal(pieces, names)

    def _top_eigen(self, k: int) -> Eigh:
        """Return the top k of every block, merged."""
        values, owners, parts = [], [], []
        for b, s in zip(self._blocks, self._slices):
            wb, Qb = b.top_eigen(min(k, b.size))
            parts.append((s, Qb))
            values.append(wb)
            owners.extend((len(parts) - 1, j) for j in range(wb.shape[0]))
        w, order = torch.sort(torch.cat(values), descending=True)
        Q = torch.zeros(self.size, k, dtype=self.dtype, device=self.device)
        for col, i in enumerate(order[:k].tolist()):
            p, j = owners[i]
            s, Qb = parts[p]
            Q[s, col] = Qb[:, j]
        return Eigh(w[:k], Q)
