"""Kronecker-factored curvature matrices: ``Kron`` (A ⊗ G) and ``EigenKron`` (diagonal S in Q_A ⊗ Q_G).

One layer z = W a (+ b), W ∈ R^{p×q}. Its curvature block is approximated by a Kronecker product
of an *input* factor A (q×q, acting on the columns of W) and an *output* factor G (p×p, acting on
its rows). In the column-major notation of the papers (``shared/reference/papers.md`` §0) this is
F ≈ A ⊗ G; curvlab's parameter order is row-major (``W.flatten()``), where the same matrix acts as

    K vec_r(X) = vec_r(G X A),      i.e. K = G ⊗ A in row-major Kronecker order.

**Bias.** With ``bias=True`` the bias is folded into A as a last input that is always 1: A is
(q+1)×(q+1), X = [W b] is p×(q+1), and ``to_dense`` / ``@`` are in curvlab's parameter order —
all of W row-major, then b — exactly aligned with the oracle's weight+bias blocks. Every
operation works on the p×(q+1) matrices, never on a dense P×P matrix (only ``to_dense`` and the
eigenvectors of ``eigh`` are P×P).

**One eigenbasis for the whole family.** With A = Q_A diag(λ_A) Q_Aᵀ and G = Q_G diag(λ_G) Q_Gᵀ,
A ⊗ G = (Q_A ⊗ Q_G) diag(S) (Q_A ⊗ Q_G)ᵀ with S_ij = λ^G_i λ^A_j (i over G's, j over A's
eigenvalues). KFAC, TKFAC (S = c λ^G λ^Aᵀ), EKFAC (S = second moments of per-sample gradients in
that basis; George et al. 2018) and TEKFAC all are an :class:`EigenKron`: ``Kron.eigen()`` returns
it, and every damped solve of a Kron goes through it.

**Damping** (``solve``, ``direction``, ``inverse``, ``logdet`` take ``mode``):

* ``"exact"``: (K + λI)⁻¹, Tikhonov damping, in the eigenbasis: S_ij + λ.
* ``"factored"``: (A + λ_A I) ⊗ (G + λ_G I); ``damping`` is a pair (λ_A, λ_G), or a scalar λ giving
  λ_A = λ_G = √λ (so the isotropic term λ_A λ_G of the expansion below equals λ).
* ``"pi"``: factored with Martens & Grosse's (2015) π-rule, λ_A = π√λ, λ_G = √λ/π,
  π = √((tr A / dim A) / (tr G / dim G)) (π = 1 when a factor has zero trace).
* ``"trace"``: factored with the trace-normalised split of TKFAC (Gao et al. 2021; the paper's own
  rule is not public — this is the derived "normalised factors, equal damping" choice of papers.md
  §2.2): λ_A = √(λ tr A / tr G), λ_G = √(λ tr G / tr A), i.e. δ(P + μI) ⊗ (Q + μI) with
  P = A/tr A, Q = G/tr G, δ = tr A tr G, μ = √(λ/δ).

In the eigenbasis a factored damping is (λ^A_j + λ_A)(λ^G_i + λ_G) = λ^G_i λ^A_j + λ_G λ^A_j + λ_A λ^G_i
+ λ_A λ_G — the expansion (A+λ_A I)⊗(G+λ_G I) = A⊗G + λ_G(A⊗I) + λ_A(I⊗G) + λ_Aλ_G I. An EigenKron
that keeps the eigenvalues of the Kronecker factors it came from (``factor_eigenvalues``) applies the
same structured terms to its own S: S_ij + λ_G λ^A_j + λ_A λ^G_i + λ_A λ_G (for KFAC this *is* the
factored damping; for EKFAC/TEKFAC it is the natural generalisation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from curvlab import memory
from curvlab.linalg.base import CurvatureMatrix, Eigh, _check_damping, as_vectors

__all__ = ["Kron", "EigenKron", "DAMPING_MODES", "factor_damping"]

#: the damping modes every Kronecker matrix understands
DAMPING_MODES = ("exact", "factored", "pi", "trace")

Damping = float | Sequence[float]


def factor_damping(mode: str, damping: Damping, eig_A: Tensor, eig_G: Tensor) -> tuple[float, float]:
    """The factor dampings (λ_A, λ_G) of a factored ``mode`` (see the module docstring).

    ``eig_A`` and ``eig_G`` are the eigenvalues of the input and output factors (only their sums
    and sizes are used).
    """
    if mode == "factored":
        if isinstance(damping, (tuple, list)):
            if len(damping) != 2:
                raise ValueError(f"factored damping takes a scalar λ or a pair (λ_A, λ_G); got {damping!r}")
            return _check_damping(damping[0]), _check_damping(damping[1])
        lam = _check_damping(damping)
        if lam < 0:
            raise ValueError(f"factored damping with a scalar λ needs λ ≥ 0 (λ_A = λ_G = √λ); got {lam}")
        return math.sqrt(lam), math.sqrt(lam)
    if isinstance(damping, (tuple, list)):
        raise ValueError(f"mode {mode!r} takes a scalar damping λ; a pair (λ_A, λ_G) is for mode='factored'")
    lam = _check_damping(damping)
    if lam < 0:
        raise ValueError(f"mode {mode!r} needs a damping λ ≥ 0; got {lam}")
    tr_A, tr_G = float(eig_A.sum()), float(eig_G.sum())
    if mode == "pi":
        ratio = (tr_A / eig_A.numel()) / (tr_G / eig_G.numel()) if tr_A > 0 and tr_G > 0 else 1.0
    elif mode == "trace":
        ratio = tr_A / tr_G if tr_A > 0 and tr_G > 0 else 1.0
    else:
        raise ValueError(f"unknown damping mode {mode!r}: use one of {DAMPING_MODES}")
    pi = math.sqrt(ratio)
    return pi * math.sqrt(lam), math.sqrt(lam) / pi


class _KronLayout(CurvatureMatrix):
    """Shared layout: flat vectors in parameter order ↔ p×q matrices [W b] (bias folded last)."""

    def __init__(self, p: int, q: int, bias: bool, dtype: torch.dtype, device: torch.device) -> None:
        if bias and q < 1:
            raise ValueError("a folded bias needs an input factor of size ≥ 1")
        self.p, self.q, self.bias = int(p), int(q), bool(bias)
        super().__init__(self.p * self.q, dtype, device)

    # -- layout --------------------------------------------------------------------------------
    def _to_mats(self, V: Tensor) -> Tensor:
        """(P, m) in parameter order → (m, p, q)."""
        m = V.shape[1]
        if not self.bias:
            return V.T.reshape(m, self.p, self.q)
        w = self.p * (self.q - 1)
        W = V[:w].T.reshape(m, self.p, self.q - 1)
        b = V[w:].T.reshape(m, self.p, 1)
        return torch.cat([W, b], dim=2)

    def _from_mats(self, X: Tensor) -> Tensor:
        """(m, p, q) → (P, m) in parameter order."""
        m = X.shape[0]
        if not self.bias:
            return X.reshape(m, -1).T
        W = X[:, :, :-1].reshape(m, -1)
        b = X[:, :, -1]
        return torch.cat([W, b], dim=1).T

    def _perm(self) -> Tensor:
        """Index π with v_param = v_folded[π] (v_folded: row-major p×q)."""
        idx = torch.arange(self.size, device=self.device).reshape(self.p, self.q)
        if not self.bias:
            return idx.reshape(-1)
        return torch.cat([idx[:, :-1].reshape(-1), idx[:, -1]])

    def _kron_vectors(self, Q_A: Tensor, Q_G: Tensor) -> Tensor:
        """Q_G ⊗ Q_A with rows in parameter order; column (i, j) = eigenvector of S_ij."""
        memory.check(self.shape, self.dtype, "the eigenvectors of a Kronecker block")
        return torch.kron(Q_G, Q_A)[self._perm()]

    @property
    def layout(self) -> str:
        return f"p={self.p}, q={self.q}{' (bias folded)' if self.bias else ''}"

    # -- damped operations, shared ---------------------------------------------------------------
    def solve(self, v: Tensor, damping: Damping = 0.0, mode: str = "exact") -> Tensor:
        """(K + λI)⁻¹v for ``mode="exact"``; the factored modes of the module docstring otherwise."""
        V, one = as_vectors(v, self.size, self.dtype, self.device)
        out = self._solve_mode(V, damping, mode)
        return out[:, 0] if one else out

    def direction(self, g: Tensor, damping: Damping = 0.0, mode: str = "exact") -> Tensor:
        """The update −(damped K)⁻¹ g under ``mode`` (``"exact"``, ``"factored"``, ``"pi"``, ``"trace"``)."""
        return -self.solve(g, damping, mode)

    def inverse(self, damping: Damping = 0.0, mode: str = "exact") -> CurvatureMatrix:
        """The inverse of the damped matrix under ``mode``, in Kronecker structure."""
        return self._inverse_mode(damping, mode)

    def logdet(self, damping: Damping = 0.0, mode: str = "exact") -> Tensor:
        """log det of the damped matrix under ``mode``."""
        d = self._denominators(damping, mode)
        if bool((d <= 0).any()):
            raise ValueError(f"logdet: the damped Kronecker block is not positive definite (smallest "
                             f"eigenvalue {float(d.min()):.3e}); increase the damping")
        return torch.log(d).sum()

    def _solve(self, V: Tensor, damping: float) -> Tensor:
        return self._solve_mode(V, damping, "exact")

    def _inverse(self, damping: float) -> CurvatureMatrix:
        return self._inverse_mode(damping, "exact")


class EigenKron(_KronLayout):
    """K = (Q_A ⊗ Q_G) diag(S) (Q_A ⊗ Q_G)ᵀ: any positive diagonal S in a Kronecker eigenbasis.

    Parameters
    ----------
    Q_A, Q_G:
        orthogonal q×q and p×p matrices (the eigenvectors of the input and output factors).
    S:
        the eigenvalues, shape (p, q): S[i, j] belongs to the eigenvector Q_G[:, i] ⊗ Q_A[:, j]
        (in the row-major layout of the module docstring).
    bias:
        the last input index is a folded bias (parameter order: W row-major, then b).
    factor_eigenvalues:
        optional (λ_A, λ_G) of the Kronecker factors the basis came from; needed by the factored
        damping modes (``"factored"``, ``"pi"``, ``"trace"``), which add
        λ_G λ^A_j + λ_A λ^G_i + λ_A λ_G to S_ij.

    Used for KFAC's eigendecomposition (``Kron.eigen()``), EKFAC (George et al. 2018), TEKFAC and
    the inverses of all of them.
    """

    def __init__(self, Q_A: Tensor, Q_G: Tensor, S: Tensor, bias: bool = False,
                 factor_eigenvalues: tuple[Tensor, Tensor] | None = None) -> None:
        q, p = Q_A.shape[0], Q_G.shape[0]
        if Q_A.shape != (q, q) or Q_G.shape != (p, p):
            raise ValueError(f"Q_A and Q_G must be square; got {tuple(Q_A.shape)} and {tuple(Q_G.shape)}")
        if S.shape != (p, q):
            raise ValueError(f"S must have shape (dim G, dim A) = ({p}, {q}); got {tuple(S.shape)}")
        if Q_A.dtype != Q_G.dtype or S.dtype != Q_A.dtype:
            raise TypeError("Q_A, Q_G and S must share one dtype")
        super().__init__(p, q, bias, S.dtype, S.device)
        self.Q_A, self.Q_G, self.S = Q_A.contiguous(), Q_G.contiguous(), S.contiguous()
        if factor_eigenvalues is not None:
            eA, eG = factor_eigenvalues
            if eA.shape != (q,) or eG.shape != (p,):
                raise ValueError(f"factor_eigenvalues must have shapes ({q},) and ({p},); got "
                                 f"{tuple(eA.shape)} and {tuple(eG.shape)}")
        self.factor_eigenvalues = factor_eigenvalues

    @property
    def structure(self) -> str:
        return "eigen_kron"

    def __repr__(self) -> str:
        return f"EigenKron({self.layout}, dtype={str(self.dtype).replace('torch.', '')})"

    # -- primitives --------------------------------------------------------------------------------
    def _rotate(self, X: Tensor) -> Tensor:  # into the eigenbasis: Q_Gᵀ X Q_A
        return self.Q_G.T @ X @ self.Q_A

    def _unrotate(self, Y: Tensor) -> Tensor:
        return self.Q_G @ Y @ self.Q_A.T

    def to_dense(self) -> Tensor:
        Q = self._kron_vectors(self.Q_A, self.Q_G)
        return (Q * self.S.reshape(-1)) @ Q.T

    def _matmat(self, V: Tensor) -> Tensor:
        return self._from_mats(self._unrotate(self._rotate(self._to_mats(V)) * self.S))

    def _denominators(self, damping: Damping, mode: str) -> Tensor:
        if mode == "exact":
            if isinstance(damping, (tuple, list)):
                raise ValueError("mode='exact' takes a scalar damping λ; a pair (λ_A, λ_G) is for "
                                 "mode='factored'")
            return self.S + _check_damping(damping)
        if mode not in DAMPING_MODES:
            raise ValueError(f"unknown damping mode {mode!r}: use one of {DAMPING_MODES}")
        if self.factor_eigenvalues is None:
            raise ValueError(f"damping mode {mode!r} needs the eigenvalues of the Kronecker factors, which "
                             "this EigenKron does not keep (e.g. it is an inverse); use mode='exact'")
        eA, eG = self.factor_eigenvalues
        dA, dG = factor_damping(mode, damping, eA, eG)
        return self.S + dG * eA[None, :] + dA * eG[:, None] + dA * dG

    def _checked_denominators(self, damping: Damping, mode: str) -> Tensor:
        """The damped eigenvalues, refusing (numerically) singular ones."""
        d = self._denominators(damping, mode)
        tiny = float(self.S.abs().max()) * self.S.numel() * torch.finfo(self.dtype).eps
        if bool((d.abs() <= tiny).any()):
            raise ValueError(f"the damped Kronecker block is singular (damping {damping!r}, mode {mode!r}; "
                             f"smallest damped eigenvalue {float(d.abs().min()):.3e}); increase the damping")
        return d

    def _solve_mode(self, V: Tensor, damping: Damping, mode: str) -> Tensor:
        d = self._checked_denominators(damping, mode)
        return self._from_mats(self._unrotate(self._rotate(self._to_mats(V)) / d))

    def _inverse_mode(self, damping: Damping, mode: str) -> CurvatureMatrix:
        d = self._checked_denominators(damping, mode)
        return EigenKron(self.Q_A, self.Q_G, 1.0 / d, self.bias)

    def _eigh(self) -> Eigh:
        w, order = torch.sort(self.S.reshape(-1))
        return Eigh(w, self._kron_vectors(self.Q_A, self.Q_G)[:, order])

    def _eigvalsh(self) -> Tensor:
        return torch.sort(self.S.reshape(-1)).values

    def diagonal(self) -> Tensor:
        D = (self.Q_G**2) @ self.S @ (self.Q_A**2).T
        return self._from_mats(D[None])[:, 0]

    def trace(self) -> Tensor:
        return self.S.sum()

    def frobenius_norm(self) -> Tensor:
        return torch.linalg.vector_norm(self.S)

    def _scaled(self, alpha: float) -> CurvatureMatrix:
        fe = self.factor_eigenvalues
        if fe is not None:
            fe = (fe[0], alpha * fe[1])
        return EigenKron(self.Q_A, self.Q_G, alpha * self.S, self.bias, fe)

    def _same_basis(self, other: EigenKron) -> bool:
        if (self.p, self.q, self.bias) != (other.p, other.q, other.bias):
            return False
        same = lambda x, y: x is y or (x.shape == y.shape and bool(torch.equal(x, y)))  # noqa: E731
        return same(self.Q_A, other.Q_A) and same(self.Q_G, other.Q_G)

    def _add(self, other: CurvatureMatrix, sign: float) -> CurvatureMatrix | None:
        if isinstance(other, Kron):
            other = other.eigen()
        if isinstance(other, EigenKron) and self._same_basis(other):
            return EigenKron(self.Q_A, self.Q_G, self.S + sign * other.S.to(self.dtype), self.bias,
                             self._sum_factor_eigenvalues(other, sign))
        return None

    def _sum_factor_eigenvalues(self, other: EigenKron, sign: float) -> tuple[Tensor, Tensor] | None:
        """Factor eigenvalues of a sum that is still one Kronecker product: A ⊗ G ± A ⊗ G' =
        A ⊗ (G ± G') (shared A), likewise for a shared G; otherwise None (no factored damping)."""
        fa, fb = self.factor_eigenvalues, other.factor_eigenvalues
        if fa is None or fb is None:
            return None
        if torch.equal(fa[0], fb[0]):
            return fa[0], fa[1] + sign * fb[1]
        if torch.equal(fa[1], fb[1]):
            return fa[0] + sign * fb[0], fa[1]
        return None


class Kron(_KronLayout):
    """K = A ⊗ G (papers' column-major notation) for one layer: G X A on the p×q matrix X = [W b].

    Parameters
    ----------
    A:
        the input factor, q×q (with ``bias=True`` its last row/column is the constant input 1).
    G:
        the output factor, p×p.
    bias:
        the bias is folded into A (parameter order: W row-major, then b).

    Matrix-vector products cost O(pq(p+q)); solves, inverses, eigenvalues and log-determinants go
    through the factors' eigendecompositions (computed once, cached); nothing is densified except
    by ``to_dense`` and ``eigh``'s eigenvectors. See the module docstring for the damping modes.
    """

    def __init__(self, A: Tensor, G: Tensor, bias: bool = False) -> None:
        if A.ndim != 2 or A.shape[0] != A.shape[1] or G.ndim != 2 or G.shape[0] != G.shape[1]:
            raise ValueError(f"Kron needs square factors; got A {tuple(A.shape)} and G {tuple(G.shape)}")
        if A.dtype != G.dtype:
            raise TypeError(f"A and G must share one dtype; got {A.dtype} and {G.dtype}")
        super().__init__(G.shape[0], A.shape[0], bias, A.dtype, A.device)
        self.A, self.G = A.contiguous(), G.contiguous()

    @property
    def structure(self) -> str:
        return "kron"

    def __repr__(self) -> str:
        return f"Kron({self.layout}, dtype={str(self.dtype).replace('torch.', '')})"

    # -- the shared eigenbasis -------------------------------------------------------------------
    def factor_eigh(self) -> tuple[Eigh, Eigh]:
        """Eigendecompositions of A and G (cached)."""
        if "factors" not in self._cache:
            eA, QA = torch.linalg.eigh(self.A)
            eG, QG = torch.linalg.eigh(self.G)
            self._cache["factors"] = (Eigh(eA, QA), Eigh(eG, QG))
        return self._cache["factors"]

    def eigen(self) -> EigenKron:
        """The same matrix as an :class:`EigenKron`: basis Q_A ⊗ Q_G, S = λ_G λ_Aᵀ (cached)."""
        if "eigen" not in self._cache:
            (eA, QA), (eG, QG) = self.factor_eigh()
            self._cache["eigen"] = EigenKron(QA, QG, eG[:, None] * eA[None, :], self.bias, (eA, eG))
        return self._cache["eigen"]

    # -- primitives --------------------------------------------------------------------------------
    def to_dense(self) -> Tensor:
        memory.check(self.shape, self.dtype, "the dense form of a Kronecker block")
        perm = self._perm()
        return torch.kron(self.G, self.A)[perm][:, perm]

    def _matmat(self, V: Tensor) -> Tensor:
        return self._from_mats(self.G @ self._to_mats(V) @ self.A)

    def _denominators(self, damping: Damping, mode: str) -> Tensor:
        return self.eigen()._denominators(damping, mode)

    def _solve_mode(self, V: Tensor, damping: Damping, mode: str) -> Tensor:
        return self.eigen()._solve_mode(V, damping, mode)

    def _inverse_mode(self, damping: Damping, mode: str) -> CurvatureMatrix:
        if mode == "exact":
            return self.eigen()._inverse_mode(damping, mode)
        (eA, QA), (eG, QG) = self.factor_eigh()
        dA, dG = factor_damping(mode, damping, eA, eG)
        tiny = lambda e: float(e.abs().max()) * e.numel() * torch.finfo(self.dtype).eps  # noqa: E731
        if bool(((eA + dA).abs() <= tiny(eA)).any()) or bool(((eG + dG).abs() <= tiny(eG)).any()):
            raise ValueError(f"a damped Kronecker factor is singular (damping {damping!r}, mode {mode!r}); "
                             "increase the damping")
        return Kron((QA / (eA + dA)) @ QA.T, (QG / (eG + dG)) @ QG.T, self.bias)

    def _eigh(self) -> Eigh:
        return self.eigen()._eigh()

    def _eigvalsh(self) -> Tensor:
        return self.eigen()._eigvalsh()

    def diagonal(self) -> Tensor:
        D = self.G.diagonal()[:, None] * self.A.diagonal()[None, :]
        return self._from_mats(D[None])[:, 0]

    def trace(self) -> Tensor:
        return self.A.diagonal().sum() * self.G.diagonal().sum()

    def frobenius_norm(self) -> Tensor:
        return torch.linalg.matrix_norm(self.A) * torch.linalg.matrix_norm(self.G)

    def _scaled(self, alpha: float) -> CurvatureMatrix:
        return Kron(self.A, alpha * self.G, self.bias)

    def _add(self, other: CurvatureMatrix, sign: float) -> CurvatureMatrix | None:
        if isinstance(other, Kron) and (self.p, self.q, self.bias) == (other.p, other.q, other.bias):
            if other.A is self.A or bool(torch.equal(other.A, self.A)):
                return Kron(self.A, self.G + sign * other.G, self.bias)
            if other.G is self.G or bool(torch.equal(other.G, self.G)):
                return Kron(self.A + sign * other.A, self.G, self.bias)
        if isinstance(other, EigenKron):
            return self.eigen()._add(other, sign)
        return None
