"""Preconditioners: how each training method turns a minibatch and its gradient into a direction.

A :class:`Preconditioner` keeps whatever state its method carries along a trajectory and answers
three questions for :class:`~curvlab.optim.CurvatureOptimizer`:

* ``update(batch, step)``: refresh its statistics / curvature from the curvature batch (a
  :class:`~curvlab.Problem` at the current θ), honouring its refresh periods;
* ``direction(g)``: the update direction for the (weight-decayed, possibly momentum-averaged)
  gradient g, e.g. −(C + λI)⁻¹g under the method's damping rule;
* ``curvature()``: the CurvatureMatrix in use (aligned with the oracle's blocks), for comparators.

Methods with a second pass after the step (K-BFGS) implement ``after_step``; methods whose
statistics pass already yields the loss and gradient (K-BFGS; the Kronecker family on the steps it
collects statistics) implement ``loss_and_gradient``, and the optimizer skips its own gradient pass.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

import curvlab.exact as exact
from curvlab.approx.base import OWN_MODES, Approximation, assemble
from curvlab.approx.factors import Collection, KronPiece, collect
from curvlab.approx.statistics import FAMILIES, Basis, kronecker_basis
from curvlab.capture import capture_with_gradient, output_cotangents
from curvlab.exact.curvature import from_capture
from curvlab.layers import survey
from curvlab.linalg import CurvatureMatrix
from curvlab.problem import Problem

__all__ = ["Preconditioner", "KroneckerPreconditioner", "ExactPreconditioner", "KBFGSPreconditioner",
           "TwoLevelPreconditioner", "GroupedNewtonPreconditioner"]


class Preconditioner:
    """The interface (see the module docstring); the base class is the identity (x = −g)."""

    #: where momentum acts: "direction" (heavy ball on the preconditioned step) or "gradient"
    momentum_on = "direction"

    def __init__(self, damping: float = 0.0) -> None:
        self.damping = float(damping)

    def loss_and_gradient(self, batch: Problem, step: int = 0,
                          curvature_batch: Problem | None = None) -> tuple[float, Tensor] | None:
        """Return the batch loss and gradient when this method computes them anyway (else None).

        ``step`` and ``curvature_batch`` are those ``update`` is called with next (None: ``batch``).
        """
        return None

    def update(self, batch: Problem, step: int) -> None:
        """Refresh statistics from the curvature batch at step ``step`` (0-based)."""

    def direction(self, g: Tensor) -> Tensor:
        """Return the update direction for the gradient ``g``: −g for the identity of the base class."""
        return -g

    def curvature(self) -> CurvatureMatrix | None:
        """Return the CurvatureMatrix in use (None for the identity of the base class)."""
        return None

    def after_step(self, batch: Problem, theta: Tensor) -> None:
        """Take the method's pass after the step: called with the same minibatch at the new θ (no-op here)."""

    def state(self) -> dict[str, Any]:
        """Diagnostics of the method's state (counters, refresh steps …)."""
        return {}


# ---------------------------------------------------------------------------------------------- Kronecker family
class KroneckerPreconditioner(Preconditioner):
    """KFAC, EKFAC, TKFAC, TEKFAC, FOOF along a trajectory (Martens & Grosse 2015, arXiv 1503.05671).

    Every ``stats_period`` steps the method's batch statistics (:mod:`curvlab.approx.statistics`:
    A, G, tr F, S*) enter exponential moving averages with decay ``ema_decay`` (the first batch
    initialises them); every ``inverse_period`` steps the preconditioner is rebuilt from the averages
    — its damped inverse ``C.inverse(λ, rule)`` is computed then and reused until the next refresh, as
    KFAC's amortised inverses are (a Kron block's factored inverse: the factors' eigenvalues for the
    refusal test, Cholesky factorisations for the inverse factors). EKFAC/TEKFAC re-estimate their
    eigenbasis at each refresh from the averaged factors and restart the average of S* in the new basis
    (George et al. 2018). With ``ema_decay=0`` and both periods 1 each step uses exactly
    ``cl.approx.<method>`` on its batch. The direction is ``C.direction(g, damping, mode=damping_rule)``
    (``"own"``: the method's rule), taken through that inverse.

    On the steps that collect statistics from the step batch itself the loss and gradient come from
    the statistics pass (``loss_and_gradient``: the loss's output cotangent joins the batched backward
    pass, :func:`curvlab.capture.capture_with_gradient`): one forward and one backward pass per step;
    ``fused_gradient=False`` restores the separate gradient pass (same numbers up to rounding). That
    fused pass is a plain call of the model (its parameters hold θ in the optimizer; hooks on the layers,
    :func:`curvlab.capture.capture_plain`) where every structured layer is called once and no exact
    block is asked for; ``plain_passes=False`` takes it through ``functional_call`` at θ instead.
    """

    def __init__(self, method: str, damping: float, damping_rule: str = "own", fisher: str | None = "type2",
                 mc_samples: int = 1, seed: int = 0, approx: str = "expand", unsupported: str = "error",
                 ema_decay: float = 0.95, stats_period: int = 1, inverse_period: int = 10,
                 fused_gradient: bool = True, plain_passes: bool = True) -> None:
        super().__init__(damping)
        self.family = FAMILIES[method]
        self.method = method
        self.damping_rule = damping_rule
        self.fisher = fisher if self.family.uses_output else None
        self.mc_samples, self.seed, self.approx, self.unsupported = mc_samples, seed, approx, unsupported
        self.ema_decay, self.stats_period, self.inverse_period = ema_decay, stats_period, inverse_period
        self._stats: dict[tuple[int, int], dict[str, Tensor]] = {}
        self._basis: dict[tuple[int, int], Basis] = {}
        self._matrix: Approximation | None = None
        self._col: Collection | None = None
        self.refreshes: list[int] = []
        self.fused_gradient = fused_gradient
        self.plain_passes = plain_passes
        self._pending: tuple[Problem, int, Collection] | None = None
        self._inverted: tuple[Approximation, float, str] | None = None  # (matrix, λ, rule) of _inverse
        self._inverse: CurvatureMatrix | None = None

    @staticmethod
    def _key(p: KronPiece) -> tuple[int, int]:
        return p.start, p.stop  # a piece's range in θ identifies it

    def _collect(self, batch: Problem, step: int, gradient: bool = False) -> Collection:
        seed = self.seed + step  # fresh labels for Monte-Carlo Fisher statistics at every step
        return collect(batch, self.fisher, self.mc_samples, seed, self.approx, self.unsupported, method=self.method,
                       gradient=gradient, plain=gradient and self.plain_passes)

    def _refreshes(self, step: int) -> bool:
        return self._matrix is None or step % self.inverse_period == 0

    def _collects(self, step: int) -> bool:
        return step % self.stats_period == 0 or self._refreshes(step)

    def loss_and_gradient(self, batch: Problem, step: int = 0,
                          curvature_batch: Problem | None = None) -> tuple[float, Tensor] | None:
        """Return the loss and gradient from this step's statistics pass, kept for ``update``.

        None on steps without statistics, or when the curvature batch is not the step batch.
        """
        self._pending = None
        same = curvature_batch is None or curvature_batch is batch
        if not (self.fused_gradient and same and self._collects(step)):
            return None
        col = self._collect(batch, step, gradient=True)
        self._pending = (batch, step, col)
        if col.gradient is None:  # pragma: no cover - collect refuses uncovered parameters first
            return None
        return float(col.loss), col.gradient

    def _statistics(self, batch: Problem, step: int) -> Collection:
        """Return this step's collection: the one ``loss_and_gradient`` made for this batch, else a new one."""
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] is batch and pending[1] == step:
            return pending[2]
        return self._collect(batch, step)

    def _accumulate(self, col: Collection) -> None:
        for plan in col.plans:
            for p in plan.pieces or ():
                key = self._key(p)
                self._stats[key] = self.family.accumulate(self._stats.get(key), p, self.approx, self._basis.get(key),
                                                          self.ema_decay)

    def _rebasis(self, col: Collection) -> None:
        """EKFAC/TEKFAC: the eigenbasis of the averaged factors, and S* restarted in it on this batch."""
        for plan in col.plans:
            for p in plan.pieces or ():
                key = self._key(p)
                s = self._stats[key]
                self._basis[key] = kronecker_basis(s["A"], s["G"])
                (_, QA), (_, QG) = self._basis[key]
                s["S"] = p.eigen_second_moments(QA, QG)

    def update(self, batch: Problem, step: int) -> None:
        """Average the batch statistics into the moving averages; rebuild the matrix on refresh steps.

        See :meth:`Preconditioner.update`. Statistics are collected every ``stats_period`` steps and on
        every refresh step (the first step, then every ``inverse_period`` steps); a refresh of EKFAC or
        TEKFAC first re-estimates the eigenbasis (:meth:`_rebasis`).
        """
        refresh = self._refreshes(step)
        if not self._collects(step):
            return
        col = self._statistics(batch, step)
        self._accumulate(col)
        if refresh:
            if self.family.needs_basis:
                self._rebasis(col)
            self._matrix = self._build(col)
            self.refreshes.append(step)

    def _build(self, col: Collection) -> Approximation:
        def build(p: KronPiece) -> tuple[CurvatureMatrix, dict]:
            key = self._key(p)
            return self.family.block(self._stats[key], p, self._basis.get(key))

        return assemble(col, build, self.method, self.family.structure, OWN_MODES[self.method],
                        {"fisher": self.fisher, "approx": self.approx, "ema_decay": self.ema_decay,
                         "stats_period": self.stats_period, "inverse_period": self.inverse_period})

    def direction(self, g: Tensor) -> Tensor:
        """Return −(C + λ)⁻¹g under the damping rule, by the matrix's damped inverse ``C.inverse(λ, rule)``.

        The inverse is built once per refresh and damping (two small GEMMs per Kronecker factor pair
        then: a Kron block's (A + λ_A)⁻¹ ⊗ (G + λ_G)⁻¹) and refuses a (numerically) singular system
        exactly as the matrix's solve ``C.direction(g, λ, mode=rule)`` does, with the same numbers up
        to rounding (``tests/test_optim_fused.py``).
        """
        key = (self._matrix, self.damping, self.damping_rule)
        if self._inverted is None or self._inverted[0] is not key[0] or self._inverted[1:] != key[1:]:
            self._inverse = self._matrix.inverse(self.damping, self.damping_rule)
            self._inverted = key
        return -(self._inverse @ g)

    def curvature(self) -> Approximation | None:
        """Return the approximation built at the last refresh (None before the first step)."""
        return self._matrix

    def state(self) -> dict[str, Any]:
        """Return the diagnostics: the number of refreshes so far."""
        return {"refreshes": len(self.refreshes)}


# ---------------------------------------------------------------------------------------------- exact curvature
class ExactPreconditioner(Preconditioner):
    """Exact curvature of the current curvature batch: natural gradient / GGN or Newton.

    ``"ng"`` / ``"ng-block"``: the exact subsampled natural gradient, −(F + λI)⁻¹g with F the Fisher
    of one sampled label per example (``fisher="mc"``, the methods' default: N rows), the GGN
    (``fisher="type2"``; the exact Fisher for the supported losses: N·C rows) or the empirical Fisher
    of the curvature batch, full or block-diagonal over the partition, solved by Woodbury on its
    low-rank factor (F = UᵀU: a few GEMMs of the size of its rows, never P×P — unless the rows
    outnumber the parameters, when the layer-structured dense matrix is the cheaper form; Benzing
    2022, arXiv 2201.12250; Koroko et al. 2023, arXiv 2303.18083). Its pass also gives the step's
    loss and gradient (:meth:`loss_and_gradient`; ``fused_gradient=False``: a separate pass). ``"newton"`` /
    ``"newton-block"``: the exact damped Hessian (dense, for small problems); an indefinite H + λI
    gives a step that need not descend (a saddle-free variant is ``hessian_rule="abs"``: |H| from the
    eigendecomposition, Dauphin et al. 2014, arXiv 1406.2572). Rebuilt every ``inverse_period`` steps.
    """

    def __init__(self, kind: str, structure: str, damping: float, fisher: str = "type2", mc_samples: int = 1,
                 seed: int = 0, inverse_period: int = 1, hessian_rule: str = "exact",
                 fused_gradient: bool = True) -> None:
        super().__init__(damping)
        self.kind, self.structure, self.fisher = kind, structure, fisher
        self.mc_samples, self.seed, self.inverse_period = mc_samples, seed, inverse_period
        self.hessian_rule = hessian_rule
        self.fused_gradient = fused_gradient
        self._matrix: CurvatureMatrix | None = None
        self._pending: tuple[Problem, int, CurvatureMatrix] | None = None

    def _rebuilds(self, step: int) -> bool:
        return self._matrix is None or step % self.inverse_period == 0

    def loss_and_gradient(self, batch: Problem, step: int = 0,
                          curvature_batch: Problem | None = None) -> tuple[float, Tensor] | None:
        """Return the loss and gradient from the pass that builds this step's Fisher (kept for ``update``).

        On the steps that rebuild a Fisher-type matrix from the step batch itself, the loss's output
        cotangent joins that pass's cotangents (:func:`curvlab.capture.capture_with_gradient`; a plain
        call of the model when every parameter sits in a structured layer, its precondition checked);
        None otherwise (the Hessian, other steps, another curvature batch: the optimizer's gradient pass).
        """
        self._pending = None
        same = curvature_batch is None or curvature_batch is batch
        if self.kind == "hessian" or not (self.fused_gradient and same and self._rebuilds(step)):
            return None
        cot = output_cotangents(batch, self.fisher, self.mc_samples, self.seed + step)
        row = batch.loss_scale**0.5 if self.fisher == "empirical" else None  # ∇_f L = √R × its cotangent
        generic = bool(survey(batch).generic_parameters(batch.param_names))
        cap, loss, grad = capture_with_gradient(batch, cot, generic=generic, loss_row=row, plain=not generic)
        if grad is None:  # a layer called more than once on these data: the generic rows cover it
            cap, loss, grad = capture_with_gradient(batch, cot, generic=True, loss_row=row)
        self._pending = (batch, step, from_capture(batch, self._structure(batch), cap))
        return float(loss), grad

    def _structure(self, batch: Problem) -> str:
        """Return the structure to build: the low-rank form while its rows are fewer, else dense.

        The low-rank form is kept while its r = N·k rows are fewer than the parameters it covers, else
        dense: with r ≥ P the Woodbury system is the larger one and the layer-structured dense build is
        cheaper. Structures other than the low-rank ones are returned unchanged.
        """
        if self.structure not in ("low_rank", "block_low_rank"):
            return self.structure
        k = {"type2": batch.num_outputs, "mc": self.mc_samples, "empirical": 1}[self.fisher]
        rows = batch.num_samples * k
        if self.structure == "low_rank":
            return "low_rank" if rows < batch.num_params else "full"
        return "block_low_rank" if rows < batch.num_params / len(batch.partition) else "block"

    def _build(self, batch: Problem, step: int) -> CurvatureMatrix:
        if self.kind == "hessian":
            H = exact.hessian(batch, structure=self.structure)
            return _absolute(H) if self.hessian_rule == "abs" else H
        structure = self._structure(batch)
        if self.fisher == "type2":
            return exact.ggn(batch, structure=structure)
        if self.fisher == "mc":
            return exact.fisher_mc(batch, structure=structure, mc_samples=self.mc_samples, seed=self.seed + step)
        return exact.empirical_fisher(batch, structure=structure)

    def update(self, batch: Problem, step: int) -> None:
        """Rebuild the exact matrix at the first step and every ``inverse_period`` steps.

        See :meth:`Preconditioner.update`.
        """
        if self._rebuilds(step):
            pending, self._pending = self._pending, None
            fused = pending is not None and pending[0] is batch and pending[1] == step
            self._matrix = pending[2] if fused else self._build(batch, step)

    def direction(self, g: Tensor) -> Tensor:
        """Return −(C + λI)⁻¹g, the exact matrix's damped direction."""
        return self._matrix.direction(g, self.damping)

    def curvature(self) -> CurvatureMatrix | None:
        """Return the exact matrix in use (None before the first step)."""
        return self._matrix


def _absolute(H: CurvatureMatrix) -> CurvatureMatrix:
    """|H| = Q |Λ| Qᵀ, block by block (the saddle-free Newton matrix of Dauphin et al. 2014)."""
    from curvlab.linalg import BlockDiagonal, Dense

    if isinstance(H, BlockDiagonal):
        return BlockDiagonal([_absolute(b) for b in H.blocks], H.block_names)
    w, Q = H.eigh()
    return Dense((Q * w.abs()) @ Q.T, symmetrize=True)


# ---------------------------------------------------------------------------------------------- K-BFGS
class KBFGSPreconditioner(Preconditioner):
    """K-BFGS / K-BFGS(L) (Goldfarb, Ren & Bahamou 2020, arXiv 2006.08877) along the trajectory.

    One statistics pass before the step gives the loss, the gradient and the layers' inputs (A's
    moving average, H_a); the direction is −H_g D̄ H_a with D̄ the momentum-averaged gradient
    (momentum acts on the gradient, as in the authors' code); after the step a second pass on the
    same minibatch gives the pre-activation pairs (s, y) that update H_g (double damping) and the
    Hessian-action update of H_a. The state is :class:`curvlab.approx.KBFGS`. Both passes are plain
    calls of the model (:func:`curvlab.optim.passes.layer_pass`); ``plain_passes=False`` takes them
    through :func:`curvlab.approx.kbfgs.kbfgs_statistics` instead (same numbers up to rounding).
    """

    momentum_on = "gradient"

    def __init__(self, method: str, damping: float, history: int = 100, input_decay: float = 0.9,
                 pair_decay: float | None = None, mu1: float = 0.2, plain_passes: bool = True) -> None:
        super().__init__(damping)
        self.method, self.history, self.input_decay, self.pair_decay, self.mu1 = method, history, input_decay, \
            pair_decay, mu1
        self.plain_passes = plain_passes
        self._state = None
        self._before = None

    def _ensure(self, batch: Problem) -> None:
        if self._state is None:
            from curvlab.approx.kbfgs import KBFGS

            self._state = KBFGS(batch, damping=self.damping, method=self.method, history=self.history,
                                input_decay=self.input_decay, pair_decay=self.pair_decay, mu1=self.mu1)

    def _statistics(self, batch: Problem, theta: Tensor, input_factors: bool) -> Any:
        """Return the batch statistics at θ (the model's parameters).

        They come from plain passes of the model (:func:`curvlab.optim.passes.layer_pass`; the pass
        after the step, ``input_factors=False``, without the gradient) unless ``plain_passes=False`` or
        they do not apply (then from :func:`curvlab.approx.kbfgs.kbfgs_statistics`).
        """
        from curvlab.approx.kbfgs import kbfgs_statistics
        from curvlab.optim.passes import layer_pass

        stats = layer_pass(batch, theta, input_factors, gradient=input_factors) if self.plain_passes else None
        return stats if stats is not None else kbfgs_statistics(batch, theta, input_factors=input_factors)

    def loss_and_gradient(self, batch: Problem, step: int = 0,
                          curvature_batch: Problem | None = None) -> tuple[float, Tensor]:
        """Return the loss and gradient of the statistics pass before the step (never None).

        See :meth:`Preconditioner.loss_and_gradient`. The pass's statistics (with the layers' input
        factors) are kept for ``update`` and ``after_step``; the first call creates the K-BFGS state.
        """
        self._ensure(batch)
        self._before = self._statistics(batch, batch.theta, True)
        return self._before.loss, self._before.gradient

    def update(self, batch: Problem, step: int) -> None:
        """Update each layer's input factor A (its moving average, H_a) from the pre-step pass.

        See :meth:`Preconditioner.update`; the statistics are those :meth:`loss_and_gradient` kept for
        this step, and the state takes the current damping first.
        """
        self._state.damping = self.damping
        self._state.observe_inputs(self._before)

    def direction(self, g: Tensor) -> Tensor:
        """Return −H_g D̄ H_a per layer, D̄ the (momentum-averaged) gradient ``g`` as a matrix."""
        return self._state.precondition(g)

    def after_step(self, batch: Problem, theta: Tensor) -> None:
        """Take the second pass on the same minibatch at the new θ and update H_g and H_a.

        See :meth:`Preconditioner.after_step`: the pairs (s, y) of the two passes update H_g (double
        damping), then the Hessian-action update of H_a follows (:meth:`curvlab.approx.KBFGS.update_from_step`).
        """
        after = self._statistics(batch, theta, False)
        self._state.update_from_step(self._before, after)

    def curvature(self) -> CurvatureMatrix | None:
        """Return the K-BFGS state's curvature, Kron(H_a⁻¹, H_g⁻¹) per layer (None before the first step)."""
        return None if self._state is None else self._state.curvature()

    def state(self) -> dict[str, Any]:
        """Return the diagnostics: the K-BFGS state's counters (empty before the first step)."""
        return {} if self._state is None else {"counters": self._state.counters}


# ---------------------------------------------------------------------------------------------- two-level KFAC
class TwoLevelPreconditioner(KroneckerPreconditioner):
    """Two-level KFAC along a trajectory (Koroko et al. 2023, arXiv 2303.18083).

    Details follow the authors' code (repository Abdoulaye-Koroko/natural-gradients, its two-level
    KFAC optimizer): the fine level is KFAC with running averages (λ on each factor by default, as
    the authors'), the coarse basis Z is rebuilt at
    every step from the current gradient (residual-based spaces need it) and the coarse matrix ZᵀFZ —
    exact, from the low-rank factor of the curvature batch's Fisher — enters a moving average every
    ``stats_period`` steps with decay ρ = min(1 − 1/k, ``ema_decay``) at the k-th update. Direction:
    −(M_λ⁻¹g + Z(F_c + λD)⁻¹Zᵀg).
    """

    def __init__(self, coarse: str, damping: float, fine_rule: str = "koroko", **kron: Any) -> None:
        super().__init__("kfac", damping, **kron)
        self.coarse, self.fine_rule = coarse, fine_rule
        self._batch: Problem | None = None
        self._coarse_avg: Tensor | None = None
        self._coarse_updates = 0
        self._step = 0
        self._last: Any = None

    def update(self, batch: Problem, step: int) -> None:
        """See :meth:`KroneckerPreconditioner.update`; also keep the batch and step for the coarse level."""
        super().update(batch, step)
        self._batch, self._step = batch, step

    def direction(self, g: Tensor) -> Tensor:
        """Return −(M_λ⁻¹g + Z(F_c + λD)⁻¹Zᵀg), the coarse basis Z built from ``g``.

        F_c is the moving average of ZᵀFZ, updated every ``stats_period`` steps with decay
        ρ = min(1 − 1/k, ``ema_decay``) at the k-th update (restarted when its size changes).
        """
        from curvlab.approx.two_level import two_level_kfac

        T = two_level_kfac(self._batch, self.coarse, self.fisher or "type2", self.mc_samples, self.seed + self._step,
                           self.approx, self.unsupported, self.damping, self.fine_rule, gradient=g, fine=self._matrix)
        if self._coarse_avg is None or self._step % self.stats_period == 0:
            self._coarse_updates += 1
            rho = min(1.0 - 1.0 / self._coarse_updates, self.ema_decay)
            Fc = T.coarse_matrix
            self._coarse_avg = Fc if self._coarse_avg is None or Fc.shape != self._coarse_avg.shape \
                else rho * self._coarse_avg + (1 - rho) * Fc
        T.coarse_matrix = self._coarse_avg
        self._last = T
        return T.direction(g, self.damping)

    def curvature(self) -> CurvatureMatrix | None:
        """Return the two-level matrix of the last direction (None before the first step)."""
        return self._last

    def state(self) -> dict[str, Any]:
        """Return the Kronecker diagnostics plus the number of coarse-matrix updates."""
        return {**super().state(), "coarse_updates": self._coarse_updates}


# ---------------------------------------------------------------------------------------------- GroupedNewton
class GroupedNewtonPreconditioner(Preconditioner):
    """GroupedNewton's practical optimiser "NewtonSummary" (Wolinski 2023–2025, arXiv 2312.03885).

    Details follow the authors' ``grnewt``: the base direction u is SGD-momentum's buffer (momentum
    ``base_momentum``, dampening ``base_dampening``: b ← μb + (1 − d)g); every ``period`` steps the
    order-2/3 summaries H̄, ḡ, D of the curvature batch along u give per-subset step sizes η* (the
    anisotropic cubic model with weight ``damping_int``, :func:`curvlab.approx.grouped_newton`),
    smoothed by an exponential average (``lr_decay``, grnewt's ``mom_lrs``) and clipped at 0
    (``remove_negative``); the direction is −η ⊙ u per subset, which the optimizer scales by its lr
    (grnewt's λ₁, "damping"). A refresh whose solver falls back (no root, no bracket …) counts in
    ``fallbacks`` and contributes η = 0, as in grnewt.
    """

    def __init__(self, partition: Any = "canonical", order: int = 3, damping_int: float = 1.0,
                 period: int = 10, lr_decay: float = 0.5, remove_negative: bool = True,
                 base_momentum: float = 0.9, base_dampening: float = 0.9, diagonal: bool = False) -> None:
        super().__init__(0.0)
        self.partition, self.order, self.damping_int, self.period = partition, order, damping_int, period
        self.lr_decay, self.remove_negative, self.diagonal = lr_decay, remove_negative, diagonal
        self.base_momentum, self.base_dampening = base_momentum, base_dampening
        self._buffer: Tensor | None = None
        self._eta: Tensor | None = None
        self._subset_of: Tensor | None = None
        self._batch: Problem | None = None
        self._step = 0
        self.subsets: list[str] = []
        self.fallbacks = 0
        self.statuses: list[str] = []

    def update(self, batch: Problem, step: int) -> None:
        """Keep the curvature batch and step for ``direction``, which refreshes the step sizes (see the class)."""
        self._batch, self._step = batch, step

    def _refresh(self, u: Tensor) -> None:
        from curvlab.approx.grouped_newton import grouped_newton

        S = grouped_newton(self._batch, u, partition=self.partition, order=self.order)
        if self.diagonal:  # the ablation without cross-subset terms
            S.hessian = torch.diag(torch.diagonal(S.hessian))
        try:
            lr = S.learning_rates(damping_int=self.damping_int if self.order == 3 else 0.0)
            status, ok, eta = lr.status, lr.ok, torch.as_tensor(lr.eta, dtype=u.dtype, device=u.device)
        except ValueError:  # documented: λ_int = 0 (order 2) with H̄ not positive definite has no minimiser
            status, ok, eta = "not_positive_definite", False, torch.zeros(S.num_subsets, dtype=u.dtype,
                                                                           device=u.device)
        self.statuses.append(status)
        if not ok:
            self.fallbacks += 1
        if self._eta is None:
            self._eta, self.subsets = eta, list(S.subsets)
            self._subset_of = S.subset_of.to(u.device)
        else:
            self._eta = self.lr_decay * self._eta + (1 - self.lr_decay) * eta
        if self.remove_negative:
            self._eta = torch.clamp(self._eta, min=0.0)

    def direction(self, g: Tensor) -> Tensor:
        """Return −η ⊙ u per subset, u the base buffer b ← μb + (1 − d)g.

        The step sizes η are refreshed from ``u`` on the first call and every ``period`` steps.
        """
        mu, damp = self.base_momentum, self.base_dampening
        self._buffer = g.clone() if self._buffer is None else mu * self._buffer + (1 - damp) * g
        u = self._buffer
        if self._eta is None or self._step % self.period == 0:
            self._refresh(u)
        return -self._eta[self._subset_of] * u

    def curvature(self) -> CurvatureMatrix | None:
        """Return the diagonal metric whose inverse is the per-subset step.

        D = diag(1/η_s) on each subset's coordinates, defined only while every η_s > 0: None before the
        first refresh or when some η_s ≤ 0.
        """
        from curvlab.linalg import Diagonal

        if self._eta is None or not bool((self._eta > 0).all()):
            return None
        return Diagonal(1.0 / self._eta[self._subset_of])

    def record(self) -> dict[str, Any]:
        """Per-step diagnostics for cl.optim.train: the per-subset learning rates."""
        if self._eta is None:
            return {}
        return {"subset_lr": ("subset", self.subsets, self._eta.detach().cpu().numpy().copy())}

    def state(self) -> dict[str, Any]:
        """Return the diagnostics: the solver fallbacks and the number of refreshes."""
        return {"fallbacks": self.fallbacks, "refreshes": len(self.statuses)}
