"""Kronecker-factored curvature matrices: ``Kron`` (A ⊗ G) and ``EigenKron`` (diagonal S in Q_A ⊗ Q_G).

One layer z = W a (+ b), W ∈ R^{p×q}. Its curvature block is approximated by a Kronecker product
of an *input* factor A (q×q, acting on the columns of W) and an *output* factor G (p×p, acting on
its rows). In the column-major notation of the papers (Martens & Grosse 2015; ``docs/layout.md``) this is
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
  rule could not be checked — this is the derived "normalised factors, equal damping" choice):
  λ_A = √(λ tr A / tr G), λ_G = √(λ tr G / tr A), i.e. δ(P + μI) ⊗ (Q + μI) with
  P = A/tr A, Q = G/tr G, δ = tr A tr G, μ = √(λ/δ).

In the eigenbasis a factored damping is (λ^A_j + λ_A)(λ^G_i + λ_G) = λ^G_i λ^A_j + λ_G λ^A_j + λ_A λ^G_i
+ λ_A λ_G — the expansion (A+λ_A I)⊗(G+λ_G I) = A⊗G + λ_G(A⊗I) + λ_A(I⊗G) + λ_Aλ_G I. An EigenKron
that keeps the eigenvalues of the Kronecker factors it came from (``factor_eigenvalues``) applies the
same structured terms to its own S: S_ij + λ_G λ^A_j + λ_A λ^G_i + λ_A λ_G (for KFAC this *is* the
factored damping; for EKFAC/TEKFAC it is the natural generalisation).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from curvlab import memory
from curvlab.linalg.base import CurvatureMatrix, Damping, Eigh, all_finite, check_damping, singular_tolerance
from curvlab.linalg.dense import Dense
from curvlab.linalg.layout import KronLayout

__all__ = ["Kron", "EigenKron", "TraceKron", "ForwardOnly", "KroneckerFactored", "DAMPING_MODES", "factor_damping"]

#: the damping modes every Kronecker matrix understands
DAMPING_MODES = ("exact", "factored", "pi", "trace")


def factor_damping(mode: str, damping: Damping, eig_A: Tensor, eig_G: Tensor) -> tuple[float, float]:
    """Return the factor dampings (λ_A, λ_G) of a factored ``mode`` (see the module docstring).

    ``"factored"`` takes a scalar λ (λ_A = λ_G = √λ) or a pair (λ_A, λ_G); ``"pi"`` and ``"trace"`` take
    a scalar λ ≥ 0. ``eig_A`` and ``eig_G`` are the eigenvalues of the input and output factors (only
    their sums and sizes are used).
    """
    if mode not in DAMPING_MODES or mode == "exact":
        raise ValueError(f"unknown factored damping mode {mode!r}: use one of {DAMPING_MODES[1:]}")
    damping = check_damping(damping, mode, pair=mode == "factored")
    if isinstance(damping, tuple):
        return damping
    lam = damping
    if mode == "factored":
        return math.sqrt(lam), math.sqrt(lam)
    tr_A, tr_G = float(eig_A.sum()), float(eig_G.sum())
    if mode == "pi":
        ratio = (tr_A / eig_A.numel()) / (tr_G / eig_G.numel()) if tr_A > 0 and tr_G > 0 else 1.0
    else:
        ratio = tr_A / tr_G if tr_A > 0 and tr_G > 0 else 1.0
    pi = math.sqrt(ratio)
    return pi * math.sqrt(lam), math.sqrt(lam) / pi


def _factor_errors(eA: Tensor, eG: Tensor) -> tuple[float, float]:
    """Return the rounding errors √q·ε·max|λ^A| and √p·ε·max|λ^G| of the factors' eigenvalues."""
    return (singular_tolerance(float(eA.abs().max()), eA.numel(), eA.dtype),
            singular_tolerance(float(eG.abs().max()), eG.numel(), eG.dtype))


def product_tolerance(eA: Tensor, eG: Tensor, dA: float, dG: float) -> Tensor:
    """Return τ_ij, the rounding error of (λ^G_i + δ_G)(λ^A_j + δ_A) from the factor eigenvalues' own errors.

    τ_ij = √q·ε·max|λ^A|·(|λ^G_i| + δ_G) + √p·ε·max|λ^G|·(|λ^A_j| + δ_A), shape (p, q) (see
    :meth:`EigenKron._checked_denominators` and ``docs/damping.md``).
    """
    tA, tG = _factor_errors(eA, eG)
    return tA * (eG.abs() + abs(dG))[:, None] + tG * (eA.abs() + abs(dA))[None, :]


def refuse_singular(C: CurvatureMatrix, d: Tensor, tol: Tensor, damping: Damping, mode: str, rule: str) -> None:
    """Check the damped eigenvalues d of C against their thresholds ``tol`` (formed by ``rule``).

    Raises ``FloatingPointError`` if d is not finite, else ``C.singular_error`` at the d_ij furthest
    below its threshold if any |d_ij| ≤ tol_ij.
    """
    if not all_finite(d):
        raise FloatingPointError(f"{type(C).__name__}: its damped eigenvalues are not finite (NaN or inf: "
                                 "statistics that overflowed or came from non-finite data); nothing to solve")
    if bool((d.abs() <= tol).any()):
        k = int(torch.argmin(d.abs() - tol))
        raise C.singular_error(damping, float(d.abs().reshape(-1)[k]), mode, float(tol.reshape(-1)[k]), rule)


class KroneckerFactored(CurvatureMatrix):
    """What Kron and EigenKron share: the layer's folded layout and the damping modes.

    ``layout`` (:class:`~curvlab.linalg.layout.KronLayout`) converts between parameter order and the
    folded p×q matrices X = [W b] every operation works on. Subclasses implement the damped
    operations in the eigenbasis through ``_denominators(damping, mode)``.
    """

    modes = DAMPING_MODES
    pair_modes = ("factored",)

    def __init__(self, p: int, q: int, bias: bool, dtype: torch.dtype, device: torch.device) -> None:
        if bias and q < 1:
            raise ValueError("a folded bias needs an input factor of size ≥ 1")
        self.layout = KronLayout(p, q, bias)
        self.p, self.q, self.bias = self.layout.rows, self.layout.cols, self.layout.bias
        super().__init__(self.p * self.q, dtype, device)

    def kron_vectors(self, Q_A: Tensor, Q_G: Tensor) -> Tensor:
        """Q_G ⊗ Q_A with rows in parameter order; column (i, j) = eigenvector of S_ij."""
        memory.check(self.shape, self.dtype, "the eigenvectors of a Kronecker block")
        return torch.kron(Q_G, Q_A)[self.layout.perm(self.device)]

    def _describe(self) -> str:
        return f"p={self.p}, q={self.q}{' (bias folded)' if self.bias else ''}"

    def same_layout(self, other: CurvatureMatrix) -> bool:
        """Return whether ``other`` is Kronecker-factored with the same layer layout."""
        return isinstance(other, KroneckerFactored) and self.layout == other.layout

    # -- damped operations, shared: exact damping is the mode "exact" --------------------------------
    def _solve(self, V: Tensor, damping: float) -> Tensor:
        return self._solve_mode(V, damping, "exact")

    def _inverse(self, damping: float) -> CurvatureMatrix:
        return self._inverse_mode(damping, "exact")

    def _logdet(self, damping: float) -> Tensor:
        return self._logdet_mode(damping, "exact")

    def _logdet_mode(self, damping: Damping, mode: str) -> Tensor:
        d = self._denominators(damping, mode)
        if bool((d <= 0).any()):
            raise ValueError(f"logdet: the damped Kronecker block is not positive definite (smallest "
                             f"eigenvalue {float(d.min()):.3e}); increase the damping")
        return torch.log(d).sum()

    def _denominators(self, damping: Damping, mode: str) -> Tensor:  # pragma: no cover - overridden
        raise NotImplementedError


class EigenKron(KroneckerFactored):
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
    product:
        S is exactly the product λ^G λ^Aᵀ of those factor eigenvalues (the eigen form of a
        :class:`Kron`, ``Kron.eigen()``): the damped eigenvalues are then products of damped factor
        eigenvalues, and the singularity test uses their rounding errors (see
        :meth:`_checked_denominators`).
    squares:
        S is a sum of squared projections onto this very basis, S_ij = Σ_n ((Q_Gᵀ V_n Q_A)_ij)² (EKFAC's
        second moments, George et al. 2018): nonnegative, and its rounding errors follow from the
        rotations (see :meth:`_checked_denominators`).

    Used for KFAC's eigendecomposition (``Kron.eigen()``), EKFAC (George et al. 2018), TEKFAC and
    the inverses of all of them.
    """

    def __init__(self, Q_A: Tensor, Q_G: Tensor, S: Tensor, bias: bool = False,
                 factor_eigenvalues: tuple[Tensor, Tensor] | None = None, product: bool = False,
                 squares: bool = False) -> None:
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
        if product and factor_eigenvalues is None:
            raise ValueError("product=True needs the factor eigenvalues (S = λ_G λ_Aᵀ)")
        self.factor_eigenvalues = factor_eigenvalues
        self.product, self.squares = bool(product), bool(squares)

    @property
    def structure(self) -> str:
        """``eigen_kron``."""
        return "eigen_kron"

    def __repr__(self) -> str:
        return f"EigenKron({self._describe()}, dtype={str(self.dtype).replace('torch.', '')})"

    # -- primitives --------------------------------------------------------------------------------
    def _rotate(self, X: Tensor) -> Tensor:  # into the eigenbasis: Q_Gᵀ X Q_A
        return self.Q_G.T @ X @ self.Q_A

    def _unrotate(self, Y: Tensor) -> Tensor:
        return self.Q_G @ Y @ self.Q_A.T

    def to_dense(self) -> Tensor:
        """Return Q diag(S) Qᵀ densely, Q = Q_A ⊗ Q_G in parameter order."""
        Q = self.kron_vectors(self.Q_A, self.Q_G)
        return (Q * self.S.reshape(-1)) @ Q.T

    def _matmat(self, V: Tensor) -> Tensor:
        if V.shape[1] == 1:  # one vector: 2-D GEMMs (batched ones cost twice as much at this size)
            return self.layout.unfold(self._unrotate(self._rotate(self.layout.fold(V[:, 0])) * self.S))[:, None]
        return self.layout.from_mats(self._unrotate(self._rotate(self.layout.to_mats(V)) * self.S))

    def _denominators(self, damping: Damping, mode: str) -> Tensor:
        if mode == "exact":
            return self.S + check_damping(damping, mode)
        if self.factor_eigenvalues is None:
            raise ValueError(f"damping mode {mode!r} needs the eigenvalues of the Kronecker factors, which "
                             "this EigenKron does not keep (e.g. it is an inverse); use mode='exact'")
        eA, eG = self.factor_eigenvalues
        dA, dG = factor_damping(mode, damping, eA, eG)
        return self.S + dG * eA[None, :] + dA * eG[:, None] + dA * dG

    def _checked_denominators(self, damping: Damping, mode: str) -> Tensor:
        """Return the damped eigenvalues d, refusing (numerically) singular ones; cached per (damping, mode).

        d_ij counts as zero when |d_ij| ≤ its rounding error. For a general S that error is taken as
        √n·ε·max|S| (S known to working precision relative to its largest entry; n = p·q). For the eigen
        form of a Kronecker product (``product``), d_ij = (λ^G_i + δ_G)(λ^A_j + δ_A) + λ — δ_A, δ_G the
        factor dampings of a factored mode, λ the damping of the exact one — is a product of factor
        eigenvalues, each known to √q·ε·max|λ^A| (√p·ε·max|λ^G|); its error is then elementwise
        τ_ij = √q·ε·max|λ^A|·(|λ^G_i| + δ_G) + √p·ε·max|λ^G|·(|λ^A_j| + δ_A). That refuses exactly where a
        damped factor is itself numerically singular (to within a factor 2) or where the undamped product
        cancels λ, and accepts a usable system whose smallest d_ij merely lies below √n·ε·max|S| (a
        float32 KFAC block of 5,000 entries with δ_A = δ_G = 0.01). For a sum of squared projections
        (``squares``) a projection computed with error ε'‖v‖ (ε' = √n·ε) makes S_ij's error at most
        √n·ε·S_ij + 2ε'·√(S_ij·ΣS) + ε'²·ΣS (Cauchy–Schwarz over the samples), to which the factored modes
        add the factor eigenvalues' errors times the other factor's damping: an S_ij = 0 is refused
        undamped and accepted with any damping far above ε'²·ΣS (EKFAC refused λ = 1e-2 in float32 on
        digits-cnn under √n·ε·max|S|).
        """
        key = ("denominators", mode, damping if not isinstance(damping, list) else tuple(damping))
        if key in self._cache:
            return self._cache[key]
        d = self._denominators(damping, mode)
        factored = mode != "exact" and self.factor_eigenvalues is not None
        if factored and (self.product or self.squares):
            eA, eG = self.factor_eigenvalues
            dA, dG = factor_damping(mode, damping, eA, eG)
        if self.product:
            tol = product_tolerance(*self.factor_eigenvalues, *((dA, dG) if factored else (0.0, 0.0)))
        elif self.squares:
            eps = singular_tolerance(1.0, self.S.numel(), self.dtype)  # ε' = √n·ε
            total = float(self.S.sum())
            tol = eps * self.S + 2 * eps * (self.S.clamp(min=0) * total).sqrt() + eps * eps * total
            if factored:
                tA, tG = _factor_errors(eA, eG)
                tol = tol + (tA * abs(dG) + tG * abs(dA))
        else:
            tol = torch.full_like(d, singular_tolerance(float(self.S.abs().max()), self.S.numel(), self.dtype))
        rule = ("the rounding error of the damped factor eigenvalues' product" if self.product else
                "the rounding error of the squared projections" if self.squares else "√n·ε·scale")
        refuse_singular(self, d, tol, damping, mode, rule)
        self._cache[key] = d
        return d

    def _solve_mode(self, V: Tensor, damping: Damping, mode: str) -> Tensor:
        d = self._checked_denominators(damping, mode)
        return self.layout.from_mats(self._unrotate(self._rotate(self.layout.to_mats(V)) / d))

    def _inverse_mode(self, damping: Damping, mode: str) -> CurvatureMatrix:
        d = self._checked_denominators(damping, mode)
        return EigenKron(self.Q_A, self.Q_G, 1.0 / d, self.bias)

    def _eigh(self) -> Eigh:
        w, order = torch.sort(self.S.reshape(-1))
        return Eigh(w, self.kron_vectors(self.Q_A, self.Q_G)[:, order])

    def _eigvalsh(self) -> Tensor:
        return torch.sort(self.S.reshape(-1)).values

    def diagonal(self) -> Tensor:
        """Return diag(C) = (Q_G∘Q_G) S (Q_A∘Q_A)ᵀ in parameter order, shape (P,)."""
        D = (self.Q_G**2) @ self.S @ (self.Q_A**2).T
        return self.layout.from_mats(D[None])[:, 0]

    def trace(self) -> Tensor:
        """Return tr C = Σ_ij S_ij."""
        return self.S.sum()

    def frobenius_norm(self) -> Tensor:
        """Return ‖C‖_F = ‖S‖_F."""
        return torch.linalg.vector_norm(self.S)

    def _scaled(self, alpha: float) -> CurvatureMatrix:
        fe = self.factor_eigenvalues
        if fe is not None:
            fe = (fe[0], alpha * fe[1])
        return EigenKron(self.Q_A, self.Q_G, alpha * self.S, self.bias, fe, self.product, self.squares and alpha >= 0)

    def same_basis(self, other: EigenKron) -> bool:
        """Return whether ``other`` has the same layout and identical eigenbases Q_A and Q_G."""
        if (self.p, self.q, self.bias) != (other.p, other.q, other.bias):
            return False
        same = lambda x, y: x is y or (x.shape == y.shape and bool(torch.equal(x, y)))  # noqa: E731
        return same(self.Q_A, other.Q_A) and same(self.Q_G, other.Q_G)

    def _add(self, other: CurvatureMatrix, sign: float) -> CurvatureMatrix | None:
        if isinstance(other, Kron):
            other = other.eigen()
        if isinstance(other, EigenKron) and self.same_basis(other):
            fe = self._sum_factor_eigenvalues(other, sign)  # not None: the sum is one Kronecker product
            return EigenKron(self.Q_A, self.Q_G, self.S + sign * other.S.to(self.dtype), self.bias, fe,
                             self.product and other.product and fe is not None,
                             self.squares and getattr(other, "squares", False) and sign > 0)
        return None

    def _sum_factor_eigenvalues(self, other: EigenKron, sign: float) -> tuple[Tensor, Tensor] | None:
        """Return the factor eigenvalues of a sum that is still one Kronecker product.

        A ⊗ G ± A ⊗ G' = A ⊗ (G ± G') (shared A), likewise for a shared G; otherwise None (no factored
        damping).
        """
        fa, fb = self.factor_eigenvalues, other.factor_eigenvalues
        if fa is None or fb is None:
            return None
        if torch.equal(fa[0], fb[0]):
            return fa[0], fa[1] + sign * fb[1]
        if torch.equal(fa[1], fb[1]):
            return fa[0] + sign * fb[0], fa[1]
        return None

    # -- structural hooks: nothing forms A ⊗ G densely ----------------------------------------------
    def _inner(self, other: CurvatureMatrix) -> Tensor | None:
        """Return the Frobenius inner product with ``other`` from the eigenbases, or None.

        ⟨Q diag(S) Qᵀ, Q' diag(S') Q'ᵀ⟩ = Σ S_ij S'_i'j' (Q_GᵀQ'_G)²_ii' (Q_AᵀQ'_A)²_jj' (⟨S, S'⟩ in one
        basis); against a dense block, Σ_ij S_ij (Qᵀ D̃ Q)_(ij),(ij), rotating D̃ one factor at a time.
        """
        if isinstance(other, Kron):
            other = other.eigen()
        if isinstance(other, EigenKron) and self.same_layout(other):
            if self.same_basis(other):
                return (self.S * other.S).sum()
            MG = (self.Q_G.T @ other.Q_G) ** 2
            MA = (self.Q_A.T @ other.Q_A) ** 2
            return (self.S * (MG @ other.S @ MA.T)).sum()
        if isinstance(other, Dense) and other.size == self.size:
            D4 = self.layout.to_folded_order(other.to_dense().to(self.dtype)).reshape(self.p, self.q, self.p, self.q)
            T = torch.einsum("ai,abcd->ibcd", self.Q_G, D4)
            T = torch.einsum("ci,ibcd->ibd", self.Q_G, T)
            T = torch.einsum("bj,ibd->ijd", self.Q_A, T)
            return (self.S * torch.einsum("dj,ijd->ij", self.Q_A, T)).sum()
        return None

    def _top_eigen(self, k: int) -> Eigh:
        """Return the k largest S_ij with eigenvectors q^G_i ⊗ q^A_j (only k columns are formed)."""
        w, idx = torch.topk(self.S.reshape(-1), k)
        i, j = idx // self.q, idx % self.q
        V = (self.Q_G[:, i][:, None, :] * self.Q_A[:, j][None, :, :]).reshape(self.p * self.q, k)  # folded
        return Eigh(w, V[self.layout.perm(self.device)])


class Kron(KroneckerFactored):
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
        """``kron``."""
        return "kron"

    def __repr__(self) -> str:
        return f"Kron({self._describe()}, dtype={str(self.dtype).replace('torch.', '')})"

    # -- the shared eigenbasis -------------------------------------------------------------------
    def factor_eigh(self) -> tuple[Eigh, Eigh]:
        """Eigendecompositions of A and G (cached)."""
        if "factors" not in self._cache:
            eA, QA = torch.linalg.eigh(self.A)
            eG, QG = torch.linalg.eigh(self.G)
            self._cache["factors"] = (Eigh(eA, QA), Eigh(eG, QG))
        return self._cache["factors"]

    def eigen(self) -> EigenKron:
        """Return the same matrix as an :class:`EigenKron`: basis Q_A ⊗ Q_G, S = λ_G λ_Aᵀ (cached)."""
        if "eigen" not in self._cache:
            (eA, QA), (eG, QG) = self.factor_eigh()
            self._cache["eigen"] = EigenKron(QA, QG, eG[:, None] * eA[None, :], self.bias, (eA, eG), product=True)
        return self._cache["eigen"]

    # -- primitives --------------------------------------------------------------------------------
    def to_dense(self) -> Tensor:
        """Return A ⊗ G densely, in parameter order."""
        memory.check(self.shape, self.dtype, "the dense form of a Kronecker block")
        return self.layout.to_param_order(torch.kron(self.G, self.A))

    def _matmat(self, V: Tensor) -> Tensor:
        if V.shape[1] == 1:  # one vector: 2-D GEMMs (batched ones cost twice as much at this size)
            return self.layout.unfold(self.G @ self.layout.fold(V[:, 0]) @ self.A)[:, None]
        return self.layout.from_mats(self.G @ self.layout.to_mats(V) @ self.A)

    def _denominators(self, damping: Damping, mode: str) -> Tensor:
        return self.eigen()._denominators(damping, mode)

    def _solve_mode(self, V: Tensor, damping: Damping, mode: str) -> Tensor:
        return self.eigen()._solve_mode(V, damping, mode)

    def factor_eigvalsh(self) -> tuple[Tensor, Tensor]:
        """Return the eigenvalues of A and G (ascending; those of :meth:`factor_eigh` when it has run, cached)."""
        if "factors" in self._cache:
            (eA, _), (eG, _) = self._cache["factors"]
            return eA, eG
        if "factor_values" not in self._cache:
            self._cache["factor_values"] = (torch.linalg.eigvalsh(self.A), torch.linalg.eigvalsh(self.G))
        return self._cache["factor_values"]

    def _inverse_mode(self, damping: Damping, mode: str) -> CurvatureMatrix:
        """Return (A + δ_A I)⁻¹ ⊗ (G + δ_G I)⁻¹ for a factored mode (exact: through the eigen form).

        The refusal is the solve's (:func:`product_tolerance` on the factor eigenvalues, which need no
        eigenvectors); the inverse factors come from Cholesky factorisations, or from the factors'
        eigendecompositions when a damped factor is not positive definite (a product of two negative
        definite ones).
        """
        if mode == "exact":
            return self.eigen()._inverse_mode(damping, mode)
        eA, eG = self.factor_eigvalsh()
        dA, dG = factor_damping(mode, damping, eA, eG)
        d = (eG + dG)[:, None] * (eA + dA)[None, :]
        refuse_singular(self, d, product_tolerance(eA, eG, dA, dG), damping, mode,
                        "the rounding error of the damped factor eigenvalues' product")
        inverses = []
        for M, delta in ((self.A, dA), (self.G, dG)):
            L, info = torch.linalg.cholesky_ex(M + delta * torch.eye(M.shape[0], dtype=M.dtype, device=M.device))
            inverses.append(torch.cholesky_inverse(L) if int(info) == 0 else None)
        if inverses[0] is None or inverses[1] is None:
            (eA, QA), (eG, QG) = self.factor_eigh()
            inverses = [(QA / (eA + dA)) @ QA.T, (QG / (eG + dG)) @ QG.T]
        return Kron(inverses[0], inverses[1], self.bias)

    def _eigh(self) -> Eigh:
        return self.eigen()._eigh()

    def _eigvalsh(self) -> Tensor:
        return self.eigen()._eigvalsh()

    def diagonal(self) -> Tensor:
        """Return diag(A ⊗ G) = diag(G) diag(A)ᵀ in parameter order, shape (P,)."""
        D = self.G.diagonal()[:, None] * self.A.diagonal()[None, :]
        return self.layout.from_mats(D[None])[:, 0]

    def trace(self) -> Tensor:
        """Return tr(A ⊗ G) = tr A · tr G."""
        return self.A.diagonal().sum() * self.G.diagonal().sum()

    def frobenius_norm(self) -> Tensor:
        """Return ‖A ⊗ G‖_F = ‖A‖_F ‖G‖_F."""
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

    # -- structural hooks ------------------------------------------------------------------------------
    def _inner(self, other: CurvatureMatrix) -> Tensor | None:
        """Return the Frobenius inner product with ``other`` without forming A ⊗ G, or None.

        ⟨A ⊗ G, A' ⊗ G'⟩ = ⟨A, A'⟩⟨G, G'⟩; against a dense block, the Van Loan rearrangement; against
        an EigenKron, in the eigenbasis.
        """
        if isinstance(other, Kron) and self.same_layout(other):
            return (self.A * other.A).sum() * (self.G * other.G).sum()
        if isinstance(other, Dense) and other.size == self.size:
            return self._dense_inner(other.to_dense().to(self.dtype))
        if isinstance(other, EigenKron):
            return self.eigen()._inner(other)
        return None

    def _dense_inner(self, D: Tensor) -> Tensor:
        """⟨G ⊗ A, D⟩ by the Van Loan rearrangement, on views of D (no permuted copy).

        With a folded bias the parameter order is [vec_r(W), b]: D splits into weight–weight,
        weight–bias and bias–bias parts, and A into its weight part A_ww, its bias column a_wb and
        its corner a_bb: ⟨K, D⟩ = Σ G_ij (A_ww)_kl D_ww[i,k,j,l] + 2 Σ G_ij (a_wb)_k D_wb[i,k,j]
        + a_bb Σ G_ij D_bb[i,j].
        """
        p, q = self.p, self.q
        if not self.bias:
            return torch.einsum("ij,ikjl,kl->", self.G, D.reshape(p, q, p, q), self.A)
        r, w = q - 1, p * (q - 1)
        Dww = D[:w, :w].reshape(p, r, p, r)
        Dwb = D[:w, w:].reshape(p, r, p)
        out = torch.einsum("ij,ikjl,kl->", self.G, Dww, self.A[:r, :r])
        out = out + 2 * torch.einsum("ij,ikj,k->", self.G, Dwb, self.A[:r, r])
        return out + self.A[r, r] * (self.G * D[w:, w:]).sum()

    def _top_eigen(self, k: int) -> Eigh:
        return self.eigen()._top_eigen(k)


class TraceKron(Kron):
    """c · (A ⊗ G): a Kronecker product rescaled to a prescribed trace (TKFAC; Gao et al. 2021).

    Stored as the Kron (A, c·G) — every operation is Kron's — with the unscaled output factor and
    c kept (``trace_factor``, ``unscaled_G``); scaling keeps the structure.
    """

    def __init__(self, A: Tensor, G: Tensor, trace_factor: float, bias: bool = False) -> None:
        super().__init__(A, trace_factor * G, bias)
        self.trace_factor, self.unscaled_G = float(trace_factor), G

    @property
    def structure(self) -> str:
        """``trace_kron``."""
        return "trace_kron"

    def _scaled(self, alpha: float) -> CurvatureMatrix:
        return TraceKron(self.A, self.unscaled_G, alpha * self.trace_factor, self.bias)


class ForwardOnly(Kron):
    """A ⊗ I: an input factor only, no output statistics (FOOF; Benzing 2022, arXiv 2201.12250)."""

    def __init__(self, A: Tensor, outputs: int, bias: bool = False) -> None:
        super().__init__(A, torch.eye(outputs, dtype=A.dtype, device=A.device), bias)

    @property
    def structure(self) -> str:
        """``forward_only``."""
        return "forward_only"
