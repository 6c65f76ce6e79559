"""Two-level KFAC: block-diagonal KFAC plus a coarse-space correction for the cross-layer curvature.

Koroko, Anciaux-Sedrakian, Ben Gharbia, Garès, Haddou & Tran (2023), "Analysis and Comparison of
Two-Level KFAC Methods for Training Deep Neural Networks", arXiv 2303.18083 (domain-decomposition
coarse corrections; Tselepidis, Kohler & Orvieto 2020, "Two-Level K-FAC Preconditioning", for the
``"tselepidis"`` coarse matrix). With M the KFAC preconditioner (one damped Kronecker block per
layer), F the exact Fisher of the curvature batch and Z ∈ R^{P×k} a coarse basis (every column
supported on one layer, scaled to max-abs 1), the **additive two-level update** is

    x = M_λ⁻¹ g + Z (ZᵀFZ + λD)⁻¹ Zᵀ g,          D = diag(N_i), N_i = entries of column i's layer,

(the coarse right-hand side is the raw gradient and the coarse damping λN_i = λ‖z_i‖² for
Nicolaides, as in the authors' code ``optimizers/twolevel_kfac.py``: ``compute_Fv_Ru``,
``compute_f_coarse``). ZᵀFZ is exact, from the per-sample factor of F (F = s·UᵀU, ZᵀFZ = s(UZ)ᵀ(UZ):
k products with the factor, never a dense F). Coarse spaces, per layer i with slice T_i:

* ``"nicolaides"``: z_i = 1 on T_i;
* ``"spectral"``: the KFAC eigenvector of the smallest eigenvalue, q^A_min ⊗ q^G_min (matrix form
  q_G q_Aᵀ; the code's row-major kron reshape is transposed — papers' implementer's note);
* ``"residual"``: z_i = M_i⁻¹ r_i, r = g − (F + λI) M_λ⁻¹ g the residual of the KFAC solution;
* ``"krylov-nicolaides"``, ``"krylov-residual"``: two columns per layer, {z_i, M_i⁻¹ z_i};
* ``"tselepidis"``: z_i = 1, with the coarse matrix from cross-layer Kronecker factors,
  (F_c)_ij = ⟨Z_i, G_ij Z_j A_ijᵀ⟩, A_ij = (1/N) Σ_n ā_n,i ā_n,jᵀ, G_ij = Σ_nk g_nk,i g_nk,jᵀ (KFAC's
  scale; the diagonal is KFAC's quadratic form); layers must share their number of positions;
* a tensor (P, k): any basis, e.g. the identity (then the deflated correction is exact).

The fine damping ``fine_rule`` is ``"koroko"`` by default, λ on each factor, (A + λI) ⊗ (G + λI), as
the authors' ``multiply_by_inverse``; or any Kronecker mode (``"exact"``, ``"pi"``, ``"factored"``).

**Diagnostics** (the paper's error study): with F_λ = F + λI, x* = F_λ⁻¹ g and r = g − F_λ x_K the
residual of the KFAC step x_K = M_λ⁻¹ g, the energy E(β) = ‖x_K + Zβ − x*‖²_{F_λ} − ‖x_K − x*‖²_{F_λ}
= βᵀ(ZᵀF_λZ)β − 2βᵀZᵀr is minimised by β* = (ZᵀF_λZ)⁻¹Zᵀr (the deflated correction), where
E(β*) − E(0) = −rᵀZ(ZᵀF_λZ)⁻¹Zᵀr ≤ 0; :meth:`TwoLevel.energy_gain` reports it divided by
‖x_K − x*‖²_{F_λ} (the share of KFAC's energy error the coarse space can remove, in [−1, 0]).

**As a matrix** the two-level method is M₂ with M₂⁻¹ = K⁻¹ + Z(ZᵀFZ)⁻¹Zᵀ (K the undamped KFAC
matrix), by Woodbury M₂ = K − KZ (ZᵀFZ + ZᵀKZ)⁻¹ ZᵀK: block-diagonal KFAC minus a rank-k term
(``structure="two_level"``). Its ``solve(v, λ)`` is the exact (M₂ + λI)⁻¹v; the paper's update with
its separate damping of the two levels is the mode ``"additive"`` (``"own"``), the default of
:meth:`TwoLevel.direction`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from curvlab import memory
from curvlab.approx.base import Approximation
from curvlab.approx.factors import check_options, collect
from curvlab.approx.kfac import kfac
from curvlab.linalg import BlockDiagonal, CurvatureMatrix, Dense, Eigh, Kron, LowRank
from curvlab.linalg.base import Damping, check_damping
from curvlab.problem import Problem
from curvlab.vocabulary import fisher_type

__all__ = ["two_level_kfac", "TwoLevel", "COARSE_SPACES", "FINE_RULES"]

COARSE_SPACES = ("nicolaides", "spectral", "residual", "krylov-nicolaides", "krylov-residual", "tselepidis")
FINE_RULES = ("koroko", "exact", "pi", "factored", "trace")


def _leaves(C: CurvatureMatrix, offset: int = 0) -> Iterator[tuple[slice, CurvatureMatrix]]:
    """(θ slice, block) of every leaf of a (nested) block-diagonal approximation."""
    if isinstance(C, BlockDiagonal):
        for b, s in zip(C.blocks, C.block_slices):
            yield from _leaves(b, offset + s.start)
    else:
        yield slice(offset, offset + C.size), C


def fine_solve(K: Approximation, V: Tensor, damping: float, rule: str) -> Tensor:
    """M_λ⁻¹ V, the KFAC level under ``rule`` (``"koroko"``: λ on each factor)."""
    if rule == "koroko":
        return K.solve(V, (damping, damping), mode="factored")
    return K.solve(V, damping, mode=rule)


def _unit_max(v: Tensor) -> Tensor:
    m = float(v.abs().max())
    return v / m if m > 0 else v


class _Basis:
    """Builds the coarse columns of one coarse space from the KFAC leaves."""

    def __init__(self, K: Approximation, damping: float, rule: str) -> None:
        self.K, self.damping, self.rule = K, damping, rule
        self.leaves = list(_leaves(K))

    def _leaf_solve(self, leaf: CurvatureMatrix, v: Tensor) -> Tensor:
        if isinstance(leaf, Kron) and self.rule == "koroko":
            return leaf.solve(v, (self.damping, self.damping), mode="factored")
        if self.rule in leaf.modes:
            return leaf.solve(v, self.damping, mode=self.rule)
        return leaf.solve(v, self.damping)

    def _spectral(self, leaf: CurvatureMatrix) -> Tensor:
        if not isinstance(leaf, Kron):
            return leaf.eigh().vectors[:, 0]  # an exact block: its lowest eigenvector
        (_, QA), (_, QG) = leaf.factor_eigh()  # damping shifts eigenvalues, not eigenvectors
        X = QG[:, 0:1] @ QA[:, 0:1].T  # the eigenvector q_A ⊗ q_G in matrix form: q_G q_Aᵀ
        return leaf.layout.rows_from_mats(X)

    def columns(self, space: str, residual: Tensor | None) -> tuple[list[Tensor], list[int]]:
        """(columns on their layer's slice, the leaf index of every column)."""
        cols, owner = [], []
        for i, (s, leaf) in enumerate(self.leaves):
            if space in ("nicolaides", "tselepidis", "krylov-nicolaides"):
                z = torch.ones(leaf.size, dtype=leaf.dtype, device=leaf.device)
            elif space == "spectral":
                z = self._spectral(leaf)
            else:
                z = self._leaf_solve(leaf, residual[s])
            group = [z]
            if space.startswith("krylov"):
                group.append(self._leaf_solve(leaf, z))
            cols.extend(_unit_max(c) for c in group)
            owner.extend([i] * len(group))
        return cols, owner

    def assemble(self, cols: list[Tensor], owner: list[int]) -> Tensor:
        P = self.K.size
        memory.check((P, len(cols)), self.K.dtype, "the coarse basis Z")
        Z = torch.zeros(P, len(cols), dtype=self.K.dtype, device=self.K.device)
        for j, (c, i) in enumerate(zip(cols, owner)):
            Z[self.leaves[i][0], j] = c
        return Z


def _tselepidis_matrix(prob: Problem, col, Z: Tensor, owner_slices: list[slice]) -> Tensor:
    """(F_c)_ij = ⟨Z_i, G_ij Z_j A_ijᵀ⟩ with cross-layer Kronecker factors (KFAC's scale)."""
    pieces = [p for plan in col.plans for p in (plan.pieces or ())]
    if len(pieces) != len(owner_slices) or any(p.start != s.start for p, s in zip(pieces, owner_slices)):
        raise ValueError("the 'tselepidis' coarse space needs one Kronecker layer per coarse column "
                         "(no exact blocks, no split weight and bias); use another coarse space")
    T = {p.positions for p in pieces}
    if len(T) != 1:
        raise ValueError(f"the 'tselepidis' coarse matrix pairs positions of layers; these layers have different "
                         f"numbers of positions {sorted(T)} (the authors interpolate them): use another coarse space")
    n, t = pieces[0].inputs().shape[:2]
    a = [p.inputs().reshape(n * t, -1) for p in pieces]
    g = [p.grads.reshape(-1, p.grads.shape[-1]) for p in pieces]  # (k·N·T, p)
    k = len(pieces)
    Fc = torch.zeros(k, k, dtype=Z.dtype, device=Z.device)
    for i in range(k):
        Zi = _folded(pieces[i], Z[owner_slices[i], i])
        for j in range(i, k):
            Zj = _folded(pieces[j], Z[owner_slices[j], j])
            A_ij = a[i].T @ a[j] / (n * t)
            G_ij = g[i].T @ g[j]
            Fc[i, j] = Fc[j, i] = (Zi * (G_ij @ Zj @ A_ij.T)).sum()
    return Fc


def _folded(piece, v: Tensor) -> Tensor:
    """Return a piece's column in its folded (p, q) layout."""
    from curvlab.linalg.layout import KronLayout

    return KronLayout(piece.d_out, piece.d_in, piece.folded).to_mats(v[:, None])[0]


def _fisher(prob: Problem, fisher: str, mc_samples: int, seed: int) -> LowRank:
    import curvlab.exact as exact

    if fisher == "type2":
        return exact.ggn(prob, structure="low_rank")
    if fisher == "mc":
        return exact.fisher_mc(prob, structure="low_rank", samples=mc_samples, seed=seed)
    return exact.empirical_fisher(prob, structure="low_rank")


def two_level_kfac(prob: Problem, coarse: str | Tensor = "nicolaides", fisher: str = "type2", mc_samples: int = 1,
                   seed: int = 0, approx: str = "expand", unsupported: str = "error", damping: float = 1e-3,
                   fine_rule: str = "koroko", gradient: Tensor | None = None,
                   fine: Approximation | None = None) -> TwoLevel:
    """Two-level KFAC on ``prob``'s data (the curvature batch); see the module docstring.

    Parameters
    ----------
    coarse:
        one of :data:`COARSE_SPACES` or a basis tensor (P, k).
    fisher, mc_samples, seed, approx, unsupported:
        as in :func:`curvlab.approx.kfac`; the exact F of the coarse level is the same kind (the GGN,
        the Monte-Carlo Fisher with the same draws, the empirical Fisher).
    damping, fine_rule, gradient:
        the λ and fine rule with which the residual-based spaces are built (``gradient``: the g of
        their residual, default the problem's gradient); ``direction(g, λ)`` may use any λ.
    fine:
        a KFAC approximation to use as the fine level instead of ``kfac(prob)`` on these data (e.g.
        running averages along a trajectory, as ``curvlab.optim``'s ``kfac-2l-*`` methods do).
    """
    check_options(fisher, mc_samples, seed, approx, unsupported)
    fisher = fisher_type(fisher)
    lam = check_damping(damping)
    if fine_rule not in FINE_RULES:
        raise ValueError(f"unknown fine_rule {fine_rule!r}: use one of {FINE_RULES}")
    if isinstance(coarse, str) and coarse not in COARSE_SPACES:
        raise ValueError(f"unknown coarse space {coarse!r}: use one of {COARSE_SPACES} or a basis tensor (P, k)")
    if fine is None:
        K = kfac(prob, fisher, mc_samples, seed, approx, unsupported)
    elif not isinstance(fine, Approximation) or fine.block_slices != tuple(prob.partition.slices):
        raise ValueError("fine must be a KFAC Approximation aligned with the problem's partition")
    else:
        K = fine
    F = _fisher(prob, fisher, mc_samples, seed)
    basis = _Basis(K, lam, fine_rule)
    if isinstance(coarse, Tensor):
        if coarse.ndim != 2 or coarse.shape[0] != prob.num_params or not bool(torch.isfinite(coarse).all()):
            raise ValueError(f"a coarse basis must be a finite (P, k) = ({prob.num_params}, k) tensor; got "
                             f"shape {tuple(coarse.shape)}")
        Z = coarse.to(dtype=prob.dtype, device=prob.device)
        return TwoLevel(K, F, Z, None, (Z**2).sum(0), "custom", fine_rule)  # coarse damping λ‖z_i‖²
    residual = None
    if coarse in ("residual", "krylov-residual"):
        g = prob.gradient() if gradient is None else prob.check_theta(gradient)
        x = fine_solve(K, g, lam, fine_rule)
        residual = g - F @ x - lam * x
    cols, owner = basis.columns(coarse, residual)
    Z = basis.assemble(cols, owner)
    sizes = torch.tensor([float(basis.leaves[i][1].size) for i in owner], dtype=prob.dtype, device=prob.device)
    Fc = None
    if coarse == "tselepidis":
        col = collect(prob, fisher, mc_samples, seed, approx, unsupported, method="two_level_kfac")
        Fc = _tselepidis_matrix(prob, col, Z, [basis.leaves[i][0] for i in owner])
    return TwoLevel(K, F, Z, Fc, sizes, coarse, fine_rule)


class TwoLevel(CurvatureMatrix):
    """KFAC plus a coarse correction (see the module docstring).

    Attributes
    ----------
    kfac, fisher:
        the fine level (an :class:`~curvlab.approx.Approximation`) and the exact F of the batch (LowRank).
    basis:
        Z, (P, k).
    coarse_matrix:
        the undamped coarse matrix, ZᵀFZ (or the cross-layer Kronecker one for ``"tselepidis"``).
    coarse_sizes:
        N_i of every column (the coarse damping is λ·diag(N_i)).
    """

    modes = ("exact", "additive", "own")

    def __init__(self, kfac: Approximation, fisher: LowRank, basis: Tensor, coarse_matrix: Tensor | None,
                 coarse_sizes: Tensor, coarse: str, fine_rule: str) -> None:
        super().__init__(kfac.size, kfac.dtype, kfac.device)
        self.kfac, self.fisher, self.basis = kfac, fisher, basis
        self.FZ = fisher @ basis  # F Z (P, k), reused by every coarse solve
        exact_coarse = basis.T @ self.FZ
        self.coarse_matrix = 0.5 * (exact_coarse + exact_coarse.T) if coarse_matrix is None else coarse_matrix
        self._exact_coarse = 0.5 * (exact_coarse + exact_coarse.T)
        self.coarse_sizes, self.coarse, self.fine_rule = coarse_sizes, coarse, fine_rule
        self.own_mode = "additive"

    @property
    def structure(self) -> str:
        """``two_level``."""
        return "two_level"

    def __repr__(self) -> str:
        return f"TwoLevel({self.coarse}, P={self.size}, k={self.basis.shape[1]}, fine={self.fine_rule})"

    def resolve_mode(self, mode: str) -> str:
        """See CurvatureMatrix.resolve_mode; ``own`` is the additive two-level step."""
        return super().resolve_mode("additive" if mode == "own" else mode)

    # ---------------------------------------------------------------------------- the paper's update
    def _coarse_solve(self, W: Tensor, damping: float) -> Tensor:
        M = self.coarse_matrix + damping * torch.diag(self.coarse_sizes)
        return torch.linalg.solve(M, W)

    def _solve_mode(self, V: Tensor, damping: Damping, mode: str) -> Tensor:
        """additive: M_λ⁻¹V + Z(ZᵀFZ + λD)⁻¹ZᵀV."""
        lam = float(damping)
        return fine_solve(self.kfac, V, lam, self.fine_rule) + self.basis @ self._coarse_solve(self.basis.T @ V, lam)

    def direction(self, g: Tensor, damping: Damping = 0.0, mode: str = "additive") -> Tensor:
        """Return the update: the paper's additive two-level step by default (``mode="exact"``: −(M₂ + λI)⁻¹g)."""
        return super().direction(g, damping, mode)

    # ---------------------------------------------------------------------------- diagnostics
    def _damped_coarse(self, damping: float) -> Tensor:
        """Zᵀ(F + λI)Z: the coarse matrix of the energy norm."""
        return self._exact_coarse + damping * (self.basis.T @ self.basis)

    def _residual(self, g: Tensor, damping: float) -> tuple[Tensor, Tensor]:
        x = fine_solve(self.kfac, g, damping, self.fine_rule)
        return x, g - self.fisher @ x - damping * x

    def deflated_direction(self, g: Tensor, damping: float) -> Tensor:
        """−(x_K + Zβ*), β* = (ZᵀF_λZ)⁻¹Zᵀr: the energy-optimal coarse correction of the KFAC step."""
        lam = check_damping(damping)
        x, r = self._residual(g, lam)
        beta = torch.linalg.solve(self._damped_coarse(lam), self.basis.T @ r)
        return -(x + self.basis @ beta)

    def energy_gain(self, g: Tensor, damping: float) -> float:
        """[E(β*) − E(0)] / ‖x_K − x*‖²_{F_λ} ∈ [−1, 0] (see the module docstring)."""
        lam = check_damping(damping)
        x, r = self._residual(g, lam)
        Ztr = self.basis.T @ r
        gain = -float(Ztr @ torch.linalg.solve(self._damped_coarse(lam), Ztr))
        err = x - self.fisher.solve(g, lam)
        denom = float(err @ (self.fisher @ err) + lam * (err @ err))
        return gain / denom if denom > 0 else 0.0

    # ---------------------------------------------------------------------------- M₂ as a matrix
    def _low_rank_part(self) -> tuple[Tensor, Tensor]:
        """B = KZ and W = ZᵀFZ + ZᵀKZ, so that M₂ = K − B W⁻¹ Bᵀ."""
        if "lowrank" not in self._cache:
            B = self.kfac @ self.basis
            W = self.coarse_matrix + self.basis.T @ B
            W = 0.5 * (W + W.T)
            w = torch.linalg.eigvalsh(W)
            if float(w.min()) <= 1000 * W.shape[0] * torch.finfo(W.dtype).eps * float(w.abs().max()):
                raise ValueError("the two-level matrix M₂ = K − KZ(ZᵀFZ + ZᵀKZ)⁻¹ZᵀK is undefined here: a coarse "
                                 "column has no curvature (e.g. all-ones on a softmax layer, whose output factor "
                                 "annihilates it); the damped update direction(g, λ) is still defined")
            self._cache["lowrank"] = (B, W)
        return self._cache["lowrank"]

    def _matmat(self, V: Tensor) -> Tensor:
        B, W = self._low_rank_part()
        return self.kfac @ V - B @ torch.linalg.solve(W, B.T @ V)

    def to_dense(self) -> Tensor:
        """Return M₂ = K − B W⁻¹ Bᵀ densely (B = KZ, W = ZᵀFZ + ZᵀKZ; symmetrised)."""
        memory.check(self.shape, self.dtype, "the dense form of a two-level matrix")
        B, W = self._low_rank_part()
        M = self.kfac.to_dense() - B @ torch.linalg.solve(W, B.T)
        return 0.5 * (M + M.T)

    def _solve(self, V: Tensor, damping: float) -> Tensor:
        """(K + λI − BW⁻¹Bᵀ)⁻¹ by Woodbury: S⁻¹V + S⁻¹B (W − BᵀS⁻¹B)⁻¹ BᵀS⁻¹V, S = K + λI."""
        B, W = self._low_rank_part()
        SV, SB = self.kfac.solve(V, damping), self.kfac.solve(B, damping)
        return SV + SB @ torch.linalg.solve(W - B.T @ SB, B.T @ SV)

    def _inverse(self, damping: float) -> CurvatureMatrix:
        memory.check(self.shape, self.dtype, "the inverse of a two-level matrix (dense)")
        return Dense(self._solve(torch.eye(self.size, dtype=self.dtype, device=self.device), damping),
                     symmetrize=True)

    def _eigh(self) -> Eigh:
        w, Q = torch.linalg.eigh(self.to_dense())
        return Eigh(w, Q)

    def diagonal(self) -> Tensor:
        """Return diag(M₂) = diag(K) − diag(B W⁻¹ Bᵀ), shape (P,)."""
        B, W = self._low_rank_part()
        return self.kfac.diagonal() - (B * torch.linalg.solve(W, B.T).T).sum(1)

    def frobenius_norm(self) -> Tensor:
        """‖K − BW⁻¹Bᵀ‖_F from ‖K‖², ⟨K, BW⁻¹Bᵀ⟩ = tr(W⁻¹BᵀKB) and ‖BW⁻¹Bᵀ‖² = tr((W⁻¹BᵀB)²)."""
        B, W = self._low_rank_part()
        WB = torch.linalg.solve(W, B.T @ B)
        cross = torch.trace(torch.linalg.solve(W, B.T @ (self.kfac @ B)))
        sq = self.kfac.frobenius_norm() ** 2 - 2 * cross + torch.trace(WB @ WB)
        return torch.sqrt(torch.clamp(sq, min=0.0))

    def _scaled(self, alpha: float) -> CurvatureMatrix:
        if alpha <= 0:  # −M₂ is not a two-level matrix of PSD levels
            return Dense(alpha * self.to_dense())
        return TwoLevel(alpha * self.kfac, alpha * self.fisher, self.basis, alpha * self.coarse_matrix,
                        self.coarse_sizes, self.coarse, self.fine_rule)

    def info(self) -> dict[str, Any]:
        """Return the coarse space, its number of columns and the fine damping rule."""
        return {"coarse": self.coarse, "columns": int(self.basis.shape[1]), "fine_rule": self.fine_rule}
