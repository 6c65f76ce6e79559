"""What every approximator returns: a block-diagonal curvature matrix with damping modes.

An :class:`Approximation` is a :class:`~curvlab.linalg.BlockDiagonal` with one block per block of
the problem's partition (exactly aligned with ``cl.exact.ggn(prob, structure="block")``): a
:class:`~curvlab.linalg.Kron` or :class:`~curvlab.linalg.EigenKron` per layer, a nested
Approximation when a partition block holds several layers, or the oracle's exact dense block for
parameters outside ``nn.Linear``/``nn.Conv2d`` (``unsupported="exact"``).

Its damping modes are the CurvatureMatrix protocol's (``solve``, ``direction``, ``inverse`` and
``logdet`` take ``mode``): those of its blocks (``"exact"``, ``"factored"``, ``"pi"``, ``"trace"``, see
``curvlab.linalg.kron``) plus ``"own"``, the rule of the method's paper (:attr:`Approximation.own_mode`).
``solve(v, λ)`` is always the exact (C + λI)⁻¹v. Exact blocks under a factored mode take exact
damping with the scalar λ (a damping pair (λ_A, λ_G) raises for them), so comparators can always
separate "the matrix" from "the damping".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from curvlab.approx.factors import Collection, KronPiece
from curvlab.linalg import BlockDiagonal, CurvatureMatrix
from curvlab.linalg.kron import DAMPING_MODES

__all__ = ["Approximation", "assemble", "MODES", "OWN_MODES"]

#: the damping modes of every approximation ("own" resolves to the method's own rule)
MODES = (*DAMPING_MODES, "own")

#: each approximator's own damping rule (``mode="own"``): its paper's rule
OWN_MODES: dict[str, str] = {"kfac": "pi", "ekfac": "exact", "tkfac": "trace", "tekfac": "trace", "foof": "exact",
                             "kfoc": "pi"}


class Approximation(BlockDiagonal):
    """A model's curvature approximation, block-diagonal over the partition, with damping modes.

    Attributes
    ----------
    method:
        ``"kfac"``, ``"ekfac"``, ``"tkfac"``, ``"tekfac"``, ``"foof"``, ``"kfoc"``, ``"kbfgs"`` …
    own_mode:
        the damping rule of the method's paper, used by ``mode="own"``.
    options:
        how it was built (fisher type, samples, seed, approx …).
    info:
        per-block diagnostics (e.g. TKFAC's trace factor c, KFOC's singular values), by block name.
    """

    exact_fallback = True

    def __init__(self, blocks: Sequence[CurvatureMatrix], names: Sequence[str], method: str,
                 structure: str, own_mode: str = "exact", options: dict[str, Any] | None = None,
                 info: dict[str, Any] | None = None) -> None:
        super().__init__(blocks, names)
        self.method = method
        self._structure = structure
        if own_mode not in DAMPING_MODES:
            raise ValueError(f"own_mode must be one of {DAMPING_MODES}; got {own_mode!r}")
        self.own_mode = own_mode
        self.modes = MODES
        self.options = dict(options or {})
        self.info = dict(info or {})

    @property
    def structure(self) -> str:
        """The representation's short name (``kron``, ``eigen_kron``, ``block`` …), set by the builder."""
        return self._structure

    def resolve_mode(self, mode: str) -> str:
        """``"own"`` is the method's own rule (:attr:`own_mode`); other modes as the blocks define them."""
        return super().resolve_mode(self.own_mode if mode == "own" else mode)

    def _scaled(self, alpha: float) -> CurvatureMatrix:
        return Approximation([b._scaled(alpha) for b in self.blocks], self.block_names, self.method,
                             self._structure, self.own_mode, self.options, self.info)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return (f"Approximation({self.method}, P={self.size}, blocks={len(self.blocks)}, "
                f"dtype={str(self.dtype).replace('torch.', '')}{', ' + opts if opts else ''})")


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
