"""What every approximator returns: a block-diagonal curvature matrix with damping modes.

An :class:`Approximation` is a :class:`~curvlab.linalg.BlockDiagonal` with one block per block of
the problem's partition (exactly aligned with ``cl.exact.ggn(prob, structure="block")``): a
:class:`~curvlab.linalg.Kron` or :class:`~curvlab.linalg.EigenKron` per layer, a nested
Approximation when a partition block holds several layers, or the oracle's exact dense block for
parameters outside ``nn.Linear``/``nn.Conv2d`` (``unsupported="exact"``).

Beyond the CurvatureMatrix protocol (where ``solve`` is always the exact (C + λI)⁻¹), it exposes
each method's own damping rules: ``solve``, ``direction``, ``inverse`` and ``logdet`` take
``mode`` ∈ {``"exact"``, ``"factored"``, ``"pi"``, ``"trace"``} (see ``curvlab.linalg.kron``) or
``"own"``, the rule of the method's paper (:attr:`Approximation.own_mode`). Exact blocks under a
non-exact mode use exact damping with λ (λ_A λ_G for a pair (λ_A, λ_G)), so comparators can always
separate "the matrix" from "the damping".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from curvlab.approx.factors import Collection, KronPiece
from curvlab.linalg import BlockDiagonal, CurvatureMatrix
from curvlab.linalg.base import as_vectors
from curvlab.linalg.kron import DAMPING_MODES, _KronLayout

__all__ = ["Approximation", "assemble", "MODES", "OWN_MODES"]

#: the damping modes of every approximation ("own" resolves to the method's own rule)
MODES = (*DAMPING_MODES, "own")

#: each approximator's own damping rule (``mode="own"``): its paper's rule
OWN_MODES: dict[str, str] = {"kfac": "pi", "ekfac": "exact", "tkfac": "trace", "tekfac": "trace", "foof": "exact",
                             "kfoc": "pi"}


def _exact_damping(damping: Any) -> float:
    if isinstance(damping, (tuple, list)):
        return float(damping[0]) * float(damping[1])
    return float(damping)


class Approximation(BlockDiagonal):
    """A model's curvature approximation, block-diagonal over the partition, with damping modes.

    Attributes
    ----------
    method:
        ``"kfac"``, ``"ekfac"``, ``"tkfac"``, ``"tekfac"``, ``"foof"`` or ``"kfoc"``.
    own_mode:
        the damping rule of the method's paper, used by ``mode="own"``.
    options:
        how it was built (fisher type, samples, seed, approx …).
    info:
        per-block diagnostics (e.g. TKFAC's trace factor c, KFOC's singular values), by block name.
    """

    def __init__(self, blocks: Sequence[CurvatureMatrix], names: Sequence[str], method: str,
                 structure: str, own_mode: str = "exact", options: dict[str, Any] | None = None,
                 info: dict[str, Any] | None = None) -> None:
        super().__init__(blocks, names)
        self.method = method
        self._structure = structure
        if own_mode not in DAMPING_MODES:
            raise ValueError(f"own_mode must be one of {DAMPING_MODES}; got {own_mode!r}")
        self.own_mode = own_mode
        self.options = dict(options or {})
        self.info = dict(info or {})

    @property
    def structure(self) -> str:
        return self._structure

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return (f"Approximation({self.method}, P={self.size}, blocks={len(self.blocks)}, "
                f"dtype={str(self.dtype).replace('torch.', '')}{', ' + opts if opts else ''})")

    def _mode(self, mode: str) -> str:
        mode = self.own_mode if mode == "own" else mode
        if mode not in DAMPING_MODES:
            raise ValueError(f"unknown damping mode {mode!r}: use one of {MODES}")
        return mode

    @staticmethod
    def _block_solve(b: CurvatureMatrix, V: Tensor, damping: Any, mode: str) -> Tensor:
        if isinstance(b, (_KronLayout, Approximation)):
            return b._solve_mode(V, damping, mode)
        return b._solve(V, _exact_damping(damping))

    def _solve_mode(self, V: Tensor, damping: Any, mode: str) -> Tensor:
        if mode == "exact":
            return self._solve(V, _exact_damping(damping))
        return self._map(V, lambda b, v: self._block_solve(b, v, damping, mode))

    def solve(self, v: Tensor, damping: Any = 0.0, mode: str = "exact") -> Tensor:
        """The damped solve under ``mode``: (C + λI)⁻¹v for ``"exact"`` (block by block)."""
        mode = self._mode(mode)
        V, one = as_vectors(v, self.size, self.dtype, self.device)
        if mode == "exact" and isinstance(damping, (tuple, list)):
            raise ValueError("mode='exact' takes a scalar damping λ; a pair (λ_A, λ_G) is for mode='factored'")
        out = self._solve_mode(V, damping, mode)
        return out[:, 0] if one else out

    def direction(self, g: Tensor, damping: Any = 0.0, mode: str = "exact") -> Tensor:
        """The update −(damped C)⁻¹ g this approximation takes under ``mode`` (``"own"``: its paper's rule)."""
        if g.ndim != 1:
            raise ValueError(f"g must be a flat gradient of shape ({self.size},); got {tuple(g.shape)}")
        return -self.solve(g, damping, mode)

    def inverse(self, damping: Any = 0.0, mode: str = "exact") -> CurvatureMatrix:
        """The inverse of the damped matrix under ``mode``, block by block, in the same structures."""
        mode = self._mode(mode)
        blocks = []
        for b in self.blocks:
            if isinstance(b, (_KronLayout, Approximation)):
                blocks.append(b.inverse(damping, mode))
            else:
                blocks.append(b.inverse(_exact_damping(damping)))
        return BlockDiagonal(blocks, self.block_names)

    def logdet(self, damping: Any = 0.0, mode: str = "exact") -> Tensor:
        """log det of the damped matrix under ``mode``."""
        mode = self._mode(mode)
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        for b in self.blocks:
            if isinstance(b, (_KronLayout, Approximation)):
                total = total + b.logdet(damping, mode)
            else:
                total = total + b.logdet(_exact_damping(damping))
        return total


def _piece_name(piece: KronPiece) -> str:
    if piece.weight and not piece.bias and piece.io.has_bias:
        return f"{piece.name}.weight"
    if piece.bias and not piece.weight:
        return f"{piece.name}.bias"
    return piece.name


def assemble(col: Collection, build: Callable[[KronPiece], tuple[CurvatureMatrix, dict[str, Any]]],
             method: str, structure: str, own_mode: str, options: dict[str, Any]) -> Approximation:
    """One block per partition block: ``build(piece)`` for Kronecker pieces, the exact block otherwise."""
    blocks: list[CurvatureMatrix] = []
    info: dict[str, Any] = {}
    for plan in col.plans:
        if plan.pieces is None:
            blocks.append(col.exact_block(plan.block))
            info[plan.block.name] = {"exact": True}
            continue
        built = [build(p) for p in plan.pieces]
        if len(built) == 1:
            blocks.append(built[0][0])
            info[plan.block.name] = built[0][1]
        else:
            names = [_piece_name(p) for p in plan.pieces]
            blocks.append(Approximation([b for b, _ in built], names, method, structure, own_mode, options,
                                        {n: i for n, (_, i) in zip(names, built)}))
            info[plan.block.name] = {n: i for n, (_, i) in zip(names, built)}
    return Approximation(blocks, col.prob.partition.names, method, structure, own_mode, options, info)
