"""Low-rank curvature matrices C = c·I + s·UᵀU whose factor U (r × P) is never formed.

The GGN, the Monte-Carlo Fisher and the empirical Fisher of N samples are sums of outer products,
C = Σ_n Σ_k v_nk v_nkᵀ = UᵀU with the r = N·k rows v_nkᵀ of U (k = outputs, label samples or 1).
When r ≪ P everything about C follows from the r×r Gram matrix G = UUᵀ and from products with U
and Uᵀ — the exact subsampled natural gradient of Benzing (2022, arXiv 2201.12250), who credits
earlier Sherman-Morrison-Woodbury work for it:

* damped solves by Woodbury, (c'I + sUᵀU)⁻¹v = (v − s Uᵀ(sG + c'I_r)⁻¹Uv)/c' with c' = c + λ,
  one Cholesky factorisation of an r×r matrix per damping;
* the spectrum from G = V diag(σ) Vᵀ: the eigenvalues s·σ_i + c for the numerically nonzero σ_i
  (σ_i > rtol·σ_max) with eigenvectors Uᵀ V σ^{-1/2}, and c with multiplicity P − rank;
* log det by the matrix-determinant lemma, det(c'I_P + sUᵀU) = c'^{P−r} det(c'I_r + sG);
* trace and Frobenius norm from ‖U‖²_F and ‖G‖_F.

A **factor** is the protocol :class:`Factor` (rank r, size P, ``gram``, ``apply`` = U V,
``apply_t`` = Uᵀ W, ``column_sq_norms`` = diag UᵀU, ``restrict`` = U[:, s], ``rows`` = U,
``cross_gram`` = U Vᵀ). :class:`KronRowsFactor` is one layer z = W a (+ b) whose rows are
per-sample weight gradients u_nk = vec_r(Σ_t g_nkt a_ntᵀ) (then Σ_t g_nkt for the bias): its Gram
is the Hadamard product of the input Gram and the cotangent Gram (Benzing 2022; summed over the
T positions of weight sharing), and it never forms the rows. :class:`ConcatFactor` puts factors
with the same rows side by side (a network's parameters), :class:`StackFactor` stacks rows (sums
of matrices), :class:`TransformedFactor` takes linear combinations of rows (inverses).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from curvlab import memory
from curvlab.linalg.base import CurvatureMatrix, Eigh

__all__ = ["Factor", "DenseFactor", "KronRowsFactor", "ConcatFactor", "StackFactor", "TransformedFactor",
           "LowRank"]

#: temporaries of chunked loops stay near this size
_CHUNK_BYTES = 64 * 2**20


def _span(s: slice, size: int) -> tuple[int, int]:
    """(start, stop) of a contiguous, non-empty slice within range(size)."""
    if not isinstance(s, slice):
        raise TypeError(f"expected a slice; got {type(s).__name__}")
    lo, hi, step = s.indices(size)
    if step != 1 or hi <= lo:
        raise ValueError(f"expected a non-empty contiguous slice of range({size}); got {s}")
    return lo, hi


def _chunk(per_item_bytes: int, total: int) -> int:
    return max(1, min(total, _CHUNK_BYTES // max(1, per_item_bytes)))


class Factor:
    """A factor U of shape (rank, size) known through products; see the module docstring.

    Subclasses implement ``_apply``, ``_apply_t`` and ``_restrict``, and override the others where
    their structure gives something cheaper than the generic fallbacks (which go through
    products with unit vectors in chunks).
    """

    rank: int
    size: int
    dtype: torch.dtype
    device: torch.device

    def __init__(self, rank: int, size: int, dtype: torch.dtype, device: torch.device) -> None:
        self.rank, self.size, self.dtype, self.device = int(rank), int(size), dtype, torch.device(device)
        self._cache: dict[str, object] = {}

    # ------------------------------------------------------------------ to implement
    def _apply(self, V: Tensor) -> Tensor:
        raise NotImplementedError

    def _apply_t(self, W: Tensor) -> Tensor:
        raise NotImplementedError

    def _restrict(self, lo: int, hi: int) -> Factor:
        raise NotImplementedError

    # ------------------------------------------------------------------ generic fallbacks
    def _rows(self) -> Tensor:
        return self.apply_t(torch.eye(self.rank, dtype=self.dtype, device=self.device)).T

    def _cross(self, other: Factor) -> Tensor:
        """U Vᵀ for another factor V of the same size: U applied to Vᵀ, built in column chunks."""
        if isinstance(other, DenseFactor):
            return self.apply(other.U.T)
        out = torch.empty(self.rank, other.rank, dtype=self.dtype, device=self.device)
        step = _chunk(8 * self.size, other.rank)
        eye = torch.eye(other.rank, dtype=self.dtype, device=self.device)
        for j in range(0, other.rank, step):
            out[:, j:j + step] = self.apply(other.apply_t(eye[:, j:j + step]))
        return out

    def _gram(self) -> Tensor:
        return self._cross(self)

    def column_sq_norms(self) -> Tensor:
        """diag(UᵀU), shape (size,): Σ over rows of U², here from explicit column chunks."""
        step = _chunk(8 * self.rank, self.size)
        return torch.cat([(self.restrict(slice(j, min(self.size, j + step))).rows() ** 2).sum(0)
                          for j in range(0, self.size, step)])

    # ------------------------------------------------------------------ public
    def gram(self) -> Tensor:
        """G = UUᵀ (rank × rank), exactly symmetric; computed once and cached."""
        if "gram" not in self._cache:
            memory.check((self.rank, self.rank), self.dtype, "the Gram matrix of a low-rank factor")
            G = self._gram()
            self._cache["gram"] = 0.5 * (G + G.T)
        return self._cache["gram"]

    def gram_eigh(self) -> tuple[Tensor, Tensor]:
        """Return the eigendecomposition of :meth:`gram`, eigenvalues descending; cached."""
        if "gram_eigh" not in self._cache:
            w, V = torch.linalg.eigh(self.gram())
            self._cache["gram_eigh"] = (w.flip(0), V.flip(1))
        return self._cache["gram_eigh"]

    def gram_eigvalsh(self) -> Tensor:
        """Return the eigenvalues of :meth:`gram`, descending (without eigenvectors unless they are cached)."""
        if "gram_eigh" in self._cache:
            return self._cache["gram_eigh"][0]
        if "gram_eigvalsh" not in self._cache:
            self._cache["gram_eigvalsh"] = torch.linalg.eigvalsh(self.gram()).flip(0)
        return self._cache["gram_eigvalsh"]

    def sq_norm(self) -> Tensor:
        """‖U‖²_F = tr G (from the Gram when it is cached, otherwise from the column norms)."""
        if "gram" in self._cache:
            return self._cache["gram"].trace()
        return self.column_sq_norms().sum()

    def apply(self, V: Tensor) -> Tensor:
        """U V for V of shape (size, m): shape (rank, m)."""
        if V.ndim != 2 or V.shape[0] != self.size:
            raise ValueError(f"apply needs V of shape ({self.size}, m); got {tuple(V.shape)}")
        return self._apply(V)

    def apply_t(self, W: Tensor) -> Tensor:
        """Uᵀ W for W of shape (rank, m): shape (size, m)."""
        if W.ndim != 2 or W.shape[0] != self.rank:
            raise ValueError(f"apply_t needs W of shape ({self.rank}, m); got {tuple(W.shape)}")
        return self._apply_t(W)

    def restrict(self, s: slice) -> Factor:
        """U[:, s], the factor of the principal submatrix C[s, s]."""
        lo, hi = _span(s, self.size)
        return self if (lo, hi) == (0, self.size) else self._restrict(lo, hi)

    def rows(self) -> Tensor:
        """U itself (rank × size), under the memory budget."""
        memory.check((self.rank, self.size), self.dtype, "the explicit rows of a low-rank factor")
        return self._rows()

    def cross_gram(self, other: Factor) -> Tensor:
        """U Vᵀ (rank × other.rank) for a factor V over the same columns."""
        if not isinstance(other, Factor) or other.size != self.size:
            raise ValueError(f"cross_gram needs a factor of size {self.size}; got {other!r}")
        return self.gram() if other is self else self._cross(other)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"


class DenseFactor(Factor):
    """U given explicitly as a (rank × size) tensor."""

    def __init__(self, U: Tensor) -> None:
        if not isinstance(U, Tensor) or U.ndim != 2 or not torch.is_floating_point(U):
            raise ValueError(f"DenseFactor needs a 2-D floating tensor; got {getattr(U, 'shape', U)!r}")
        super().__init__(U.shape[0], U.shape[1], U.dtype, U.device)
        self.U = U

    def _apply(self, V: Tensor) -> Tensor:
        return self.U @ V

    def _apply_t(self, W: Tensor) -> Tensor:
        return self.U.T @ W

    def _restrict(self, lo: int, hi: int) -> Factor:
        return DenseFactor(self.U[:, lo:hi])

    def _rows(self) -> Tensor:
        return self.U

    def _gram(self) -> Tensor:
        return self.U @ self.U.T

    def _cross(self, other: Factor) -> Tensor:
        return self.U @ other.U.T if isinstance(other, DenseFactor) else other.apply(self.U.T).T

    def column_sq_norms(self) -> Tensor:
        """Return diag(UᵀU) = Σ over rows of U², shape (size,)."""
        return (self.U**2).sum(0)


class KronRowsFactor(Factor):
    """The per-sample gradient rows of one layer z = W a (+ b), never formed.

    ``a`` (N, T, d_in) are the layer inputs at T positions (T = 1 without weight sharing) and
    ``g`` (k, N, T, d_out) the cotangents at z. Row (k, n) (index k·N + n) is
    u_nk = vec_r(Σ_t g_nkt a_ntᵀ), followed by Σ_t g_nkt when ``bias``: the weight row-major,
    then the bias. With β = 1 for a bias (else 0),

        (U Uᵀ)_{(k,n),(j,m)} = Σ_{t,t'} (a_nt·a_mt' + β)(g_nkt·g_mjt'),

    for T = 1 the Hadamard product of the input Gram and the cotangent Gram (Benzing 2022,
    arXiv 2201.12250), costing r²(d_in + d_out); U V = [Σ_t g_nktᵀ (W_V a_nt + b_V)] and
    Uᵀ W = [Σ_nk w_nk Σ_t g_nkt a_ntᵀ, Σ_nk w_nk Σ_t g_nkt] are GEMMs over the N·T inputs.
    For T > 1 the Gram sums over position pairs (cost N²T²(d_in + k·d_out)); ``gram="auto"``
    uses explicit rows instead (cost r²·size, memory r·size under the budget) when that is
    cheaper, as for small convolutions with many positions. ``gram`` forces either path.
    """

    def __init__(self, a: Tensor, g: Tensor, bias: bool = False, gram: str = "auto") -> None:
        if a.ndim != 3 or g.ndim != 4 or g.shape[1:3] != a.shape[:2]:
            raise ValueError(f"KronRowsFactor needs a (N, T, d_in) and g (k, N, T, d_out) with matching N, T; "
                             f"got {tuple(a.shape)} and {tuple(g.shape)}")
        if gram not in ("auto", "hadamard", "rows"):
            raise ValueError(f"gram must be 'auto', 'hadamard' or 'rows'; got {gram!r}")
        if a.dtype != g.dtype or a.device != g.device:
            raise TypeError(f"a and g must share dtype and device; got {a.dtype}/{a.device} and {g.dtype}/{g.device}")
        self.a, self.g, self.bias, self.gram_path = a, g, bool(bias), gram
        k, n, self.positions, self.d_out = g.shape
        self.d_in = a.shape[2]
        self.k, self.n = k, n
        super().__init__(k * n, self.d_out * self.d_in + (self.d_out if bias else 0), g.dtype, g.device)

    @property
    def _wsize(self) -> int:
        return self.d_out * self.d_in

    def _same_layout(self, other: Factor) -> bool:
        return (isinstance(other, KronRowsFactor) and (other.d_in, other.d_out, other.bias, other.positions)
                == (self.d_in, self.d_out, self.bias, self.positions))

    # ---------------------------------------------------------------- products
    def _apply(self, V: Tensor) -> Tensor:
        n, T, o, m = self.n, self.positions, self.d_out, V.shape[1]
        a2 = self.a.reshape(n * T, self.d_in)
        gt = self.g.permute(1, 0, 2, 3).reshape(n, self.k, T * o)  # (N, k, T·o)
        out = torch.empty(n, self.k, m, dtype=self.dtype, device=self.device)
        step = _chunk(8 * n * T * o, m)
        for c0 in range(0, m, step):
            Vc = V[:, c0:c0 + step]
            mc = Vc.shape[1]
            Z = (a2 @ Vc[:self._wsize].T.reshape(mc * o, self.d_in).T).view(n, T, mc, o)
            if self.bias:
                Z = Z + Vc[self._wsize:].T[None, None]
            out[:, :, c0:c0 + mc] = torch.bmm(gt, Z.permute(0, 1, 3, 2).reshape(n, T * o, mc))
        return out.permute(1, 0, 2).reshape(self.rank, m)

    def _apply_t(self, W: Tensor) -> Tensor:
        n, T, o, m = self.n, self.positions, self.d_out, W.shape[1]
        a2 = self.a.reshape(n * T, self.d_in)
        gt = self.g.permute(1, 0, 2, 3).reshape(n, self.k, T * o)
        out = torch.empty(self.size, m, dtype=self.dtype, device=self.device)
        step = _chunk(8 * n * T * o, m)
        for c0 in range(0, m, step):
            Wc = W[:, c0:c0 + step].reshape(self.k, n, -1)
            mc = Wc.shape[2]
            H = torch.bmm(Wc.permute(1, 2, 0), gt).view(n, mc, T, o)  # Σ_k w_nk g_nkt
            Hm = H.permute(1, 3, 0, 2).reshape(mc * o, n * T)  # rows (c, p), columns (n, t)
            out[:self._wsize, c0:c0 + mc] = (Hm @ a2).view(mc, self._wsize).T
            if self.bias:
                out[self._wsize:, c0:c0 + mc] = Hm.view(mc, o, n * T).sum(2).T
        return out

    def _rows(self) -> Tensor:
        w = torch.einsum("kntp,nti->knpi", self.g, self.a).reshape(self.k, self.n, -1)
        if self.bias:
            w = torch.cat([w, self.g.sum(dim=2)], dim=2)
        return w.reshape(self.rank, self.size)

    def column_sq_norms(self) -> Tensor:
        """Return diag(UᵀU) = Σ over rows of U², shape (size,), in chunks of samples."""
        if self.positions == 1:
            gsq = (self.g[:, :, 0] ** 2).sum(0)  # (N, d_out)
            w = (gsq.T @ self.a[:, 0] ** 2).reshape(-1)
            return torch.cat([w, gsq.sum(0)]) if self.bias else w
        out = torch.zeros(self.size, dtype=self.dtype, device=self.device)
        step = _chunk(8 * self.k * self.size, self.n)
        for s in range(0, self.n, step):
            part = KronRowsFactor(self.a[s:s + step], self.g[:, s:s + step], self.bias)
            out += (part._rows() ** 2).sum(0)
        return out

    # ---------------------------------------------------------------- Gram
    def _cross(self, other: Factor) -> Tensor:
        if not self._same_layout(other):
            return super()._cross(other)
        if self.positions == 1:
            return self._cross_hadamard(other)
        path = self.gram_path if self.gram_path != "auto" else self._cheaper_path(other)
        if path == "rows":
            return self.rows() @ other.rows().T
        return self._cross_positions(other)

    def _cross_hadamard(self, other: KronRowsFactor) -> Tensor:
        Gg = self.g.reshape(self.rank, self.d_out) @ other.g.reshape(other.rank, self.d_out).T
        Aa = self.a[:, 0] @ other.a[:, 0].T
        if self.bias:
            Aa = Aa + 1.0
        return (Gg.view(self.k, self.n, other.k, other.n) * Aa[None, :, None, :]).reshape(self.rank, other.rank)

    def _cross_positions(self, other: KronRowsFactor) -> Tensor:
        """Σ_{t,t'} (a_nt·a_mt' + β)(g_nkt·g_mjt') in chunks of samples n (never the rows)."""
        T, o = self.positions, self.d_out
        out = torch.empty(self.k, self.n, other.k, other.n, dtype=self.dtype, device=self.device)
        step = _chunk(8 * T * (other.rank * o + other.n * T), self.n)
        for s in range(0, self.n, step):
            Aa = torch.einsum("nti,msi->ntms", self.a[s:s + step], other.a)
            if self.bias:
                Aa = Aa + 1.0
            X = torch.einsum("ntms,jmsp->ntjmp", Aa, other.g)
            out[:, s:s + step] = torch.einsum("kntp,ntjmp->knjm", self.g[:, s:s + step], X)
        return out.reshape(self.rank, other.rank)

    def _cheaper_path(self, other: KronRowsFactor) -> str:
        T = self.positions
        by_positions = 2 * self.n * other.n * T * T * (self.d_in + other.k * self.d_out)
        by_rows = 2 * (self.rank + other.rank) * T * self._wsize + 2 * self.rank * other.rank * self.size
        fits = memory.nbytes((self.rank + other.rank, self.size), self.dtype) <= memory.get_budget()
        return "rows" if fits and by_rows <= by_positions else "hadamard"

    # ---------------------------------------------------------------- restriction
    def _restrict(self, lo: int, hi: int) -> Factor:
        """U[:, lo:hi] as Kronecker-row factors: whole weight rows, partial rows, bias entries."""
        d_in, parts = self.d_in, []
        if lo < self._wsize:
            wlo, whi = lo, min(hi, self._wsize)
            p0, p1 = -(-wlo // d_in), whi // d_in  # the whole output rows inside [wlo, whi)
            if p0 > p1:  # inside a single output row
                parts.append(self._piece(p1, p1 + 1, wlo - p1 * d_in, whi - p1 * d_in))
            else:
                if wlo < p0 * d_in:
                    parts.append(self._piece(p0 - 1, p0, wlo - (p0 - 1) * d_in, d_in))
                if p1 > p0:
                    parts.append(self._piece(p0, p1, 0, d_in))
                if whi > p1 * d_in:
                    parts.append(self._piece(p1, p1 + 1, 0, whi - p1 * d_in))
        if hi > self._wsize:  # bias entries: rows Σ_t g_nkt, a layer whose input is constantly 1
            b0, b1 = max(lo, self._wsize) - self._wsize, hi - self._wsize
            ones = torch.ones(self.n, self.positions, 1, dtype=self.dtype, device=self.device)
            parts.append(KronRowsFactor(ones, self.g[..., b0:b1], False, self.gram_path))
        return parts[0] if len(parts) == 1 else ConcatFactor(parts)

    def _piece(self, p0: int, p1: int, i0: int, i1: int) -> KronRowsFactor:
        return KronRowsFactor(self.a[..., i0:i1], self.g[..., p0:p1], False, self.gram_path)


class ConcatFactor(Factor):
    """[U_1 U_2 …]: factors with the same rows side by side over consecutive columns.

    Gram = Σ_i G_i, U V = Σ_i U_i V_i, Uᵀ W = [U_iᵀ W], and a restriction keeps (parts of) the
    pieces it covers.
    """

    def __init__(self, factors: Sequence[Factor]) -> None:
        flat: list[Factor] = []
        for f in factors:
            if not isinstance(f, Factor):
                raise TypeError(f"ConcatFactor needs factors; got {type(f).__name__}")
            flat.extend(f.factors if isinstance(f, ConcatFactor) else [f])
        if not flat:
            raise ValueError("ConcatFactor needs at least one factor")
        if len({(f.rank, f.dtype, f.device) for f in flat}) != 1:
            raise ValueError(f"concatenated factors must share rank, dtype and device; got "
                             f"{[(f.rank, str(f.dtype)) for f in flat]}")
        self.factors = tuple(flat)
        self.offsets = [0]
        for f in flat:
            self.offsets.append(self.offsets[-1] + f.size)
        super().__init__(flat[0].rank, self.offsets[-1], flat[0].dtype, flat[0].device)

    def _slices(self):
        return zip(self.factors, self.offsets[:-1], self.offsets[1:])

    def _apply(self, V: Tensor) -> Tensor:
        return sum(f.apply(V[lo:hi]) for f, lo, hi in self._slices())

    def _apply_t(self, W: Tensor) -> Tensor:
        return torch.cat([f.apply_t(W) for f in self.factors], dim=0)

    def _rows(self) -> Tensor:
        return torch.cat([f.rows() for f in self.factors], dim=1)

    def _gram(self) -> Tensor:
        # the pieces' Grams are summed, not kept (r×r each); a piece reuses a Gram it already has
        out = None
        for f in self.factors:
            G = f._cache["gram"] if "gram" in f._cache else f._gram()
            out = G.clone() if out is None else out.add_(G)
        return out

    def _cross(self, other: Factor) -> Tensor:
        return sum(f.cross_gram(other.restrict(slice(lo, hi))) for f, lo, hi in self._slices())

    def column_sq_norms(self) -> Tensor:
        """Return the factors' column norms² concatenated (column blocks side by side)."""
        return torch.cat([f.column_sq_norms() for f in self.factors])

    def _restrict(self, lo: int, hi: int) -> Factor:
        parts = [f.restrict(slice(max(lo, a) - a, min(hi, b) - a)) for f, a, b in self._slices()
                 if a < hi and b > lo]
        return parts[0] if len(parts) == 1 else ConcatFactor(parts)


class StackFactor(Factor):
    """[U_1; U_2; …]: factors over the same columns with their rows stacked (UᵀU = Σ_i U_iᵀU_i)."""

    def __init__(self, factors: Sequence[Factor]) -> None:
        factors = tuple(factors)
        if not factors or len({(f.size, f.dtype, f.device) for f in factors}) != 1:
            raise ValueError("StackFactor needs one or more factors sharing size, dtype and device")
        self.factors = factors
        self.offsets = [0]
        for f in factors:
            self.offsets.append(self.offsets[-1] + f.rank)
        super().__init__(self.offsets[-1], factors[0].size, factors[0].dtype, factors[0].device)

    def _apply(self, V: Tensor) -> Tensor:
        return torch.cat([f.apply(V) for f in self.factors], dim=0)

    def _apply_t(self, W: Tensor) -> Tensor:
        return sum(f.apply_t(W[lo:hi]) for f, lo, hi in zip(self.factors, self.offsets[:-1], self.offsets[1:]))

    def _rows(self) -> Tensor:
        return torch.cat([f.rows() for f in self.factors], dim=0)

    def _gram(self) -> Tensor:
        return torch.cat([torch.cat([f.cross_gram(h) for h in self.factors], dim=1) for f in self.factors])

    def _cross(self, other: Factor) -> Tensor:
        return torch.cat([f.cross_gram(other) for f in self.factors], dim=0)

    def column_sq_norms(self) -> Tensor:
        """Return the sum of the factors' column norms² (row blocks stacked)."""
        return sum(f.column_sq_norms() for f in self.factors)

    def _restrict(self, lo: int, hi: int) -> Factor:
        return StackFactor([f.restrict(slice(lo, hi)) for f in self.factors])


class TransformedFactor(Factor):
    """M U: linear combinations (M of shape r' × r) of the rows of a factor U."""

    def __init__(self, base: Factor, M: Tensor) -> None:
        if M.ndim != 2 or M.shape[1] != base.rank:
            raise ValueError(f"TransformedFactor needs M of shape (r', {base.rank}); got {tuple(M.shape)}")
        super().__init__(M.shape[0], base.size, base.dtype, base.device)
        self.base, self.M = base, M.to(base.dtype)

    def _apply(self, V: Tensor) -> Tensor:
        return self.M @ self.base.apply(V)

    def _apply_t(self, W: Tensor) -> Tensor:
        return self.base.apply_t(self.M.T @ W)

    def _rows(self) -> Tensor:
        return self.M @ self.base.rows()

    def _gram(self) -> Tensor:
        return self.M @ self.base.gram() @ self.M.T

    def _cross(self, other: Factor) -> Tensor:
        if isinstance(other, TransformedFactor):
            return self.M @ self.base.cross_gram(other.base) @ other.M.T
        return self.M @ self.base.cross_gram(other)

    def _restrict(self, lo: int, hi: int) -> Factor:
        return TransformedFactor(self.base.restrict(slice(lo, hi)), self.M)


class LowRank(CurvatureMatrix):
    """C = shift·I + scale·UᵀU from a :class:`Factor` U (r × P); never a P×P matrix unless asked.

    Every operation goes through the r×r Gram matrix G = UUᵀ and products with U and Uᵀ (see
    the module docstring for the formulas). With c = ``shift``, s = ``scale`` and c' = c + λ:

    * ``solve(v, λ)``: Woodbury, (v − s Uᵀ(sG + c'I_r)⁻¹Uv)/c', one Cholesky of sG + c'I_r per
      damping, kept for later solves (an eigendecomposition of G when sG + c'I_r is not positive
      definite); λ < 0 raises, and c' = 0 with rank < P is singular: a ValueError asks for a damping.
      When P < r (a small block, more rows than columns) the P×P system c'I + sUᵀU is the smaller
      one and is factorised instead (same result; ``logdet`` and ``inverse`` use it too).
    * ``inverse(λ)``: again a LowRank, (C + λI)⁻¹ = c'⁻¹I − Uᵀ V diag(d) Vᵀ U with G = V diag(σ) Vᵀ
      and d_i = s/(c'(sσ_i + c')), i.e. shift 1/c', scale −sign(d), factor diag(√|d|) Vᵀ U
      (a :class:`TransformedFactor`); a Dense P×P matrix when P < r (the smaller form) or, under
      the memory budget, when the d_i change sign.
    * ``eigvalsh``/``eigh``/``_top_eigen``: s·σ_i + c for the Gram eigenvalues σ_i > rtol·σ_max
      (default rtol = r·eps: smaller ones are numerically zero), eigenvectors Uᵀ V σ^{-1/2}, and
      c for the other P − rank eigenvalues; ``eigh`` completes the eigenvectors to an orthonormal
      basis (a complete QR, P×P under the budget), ``_top_eigen`` draws only the few it needs.
    * ``logdet(λ)``: 2 Σ log diag(chol(sG + c'I_r)) + (P − r) log c' (determinant lemma).
    * ``trace`` = cP + s‖U‖²_F, ``frobenius_norm`` = (c²P + 2cs‖U‖²_F + s²‖G‖²_F)^{1/2},
      ``diagonal`` = c + s·diag(UᵀU), ``_inner`` (Frobenius product) from U Vᵀ for two LowRank,
      from s·tr(U B Uᵀ) + c·tr B otherwise, ``_restrict`` restricts the factor.
    """

    modes = ("exact",)

    def __init__(self, factor: Factor, scale: float = 1.0, shift: float = 0.0, rtol: float | None = None) -> None:
        if not isinstance(factor, Factor):
            raise TypeError(f"LowRank needs a Factor; got {type(factor).__name__}")
        for name, v in (("scale", scale), ("shift", shift)):
            if not math.isfinite(float(v)):
                raise ValueError(f"{name} must be finite; got {v}")
        super().__init__(factor.size, factor.dtype, factor.device)
        self.factor, self.scale, self.shift = factor, float(scale), float(shift)
        self.rtol = factor.rank * torch.finfo(factor.dtype).eps if rtol is None else float(rtol)

    @property
    def structure(self) -> str:
        """``low_rank``."""
        return "low_rank"

    def __repr__(self) -> str:
        return (f"LowRank(P={self.size}, r={self.factor.rank}, scale={self.scale:g}, shift={self.shift:g}, "
                f"dtype={str(self.dtype).replace('torch.', '')})")

    # ---------------------------------------------------------------- the Gram spectrum
    def _sigma(self) -> Tensor:
        """Return the numerically nonzero Gram eigenvalues σ_i > rtol·σ_max, descending."""
        if "sigma" not in self._cache:
            w = self.factor.gram_eigvalsh()
            if self.scale == 0 or w.numel() == 0 or float(w[0]) <= 0:
                self._cache["sigma"] = w[:0]
            else:
                self._cache["sigma"] = w[w > self.rtol * w[0]]
        return self._cache["sigma"]

    def _spectrum(self) -> tuple[Tensor, Tensor]:
        """(σ, V): the numerically nonzero Gram eigenvalues (descending) and their eigenvectors."""
        if "spectrum" not in self._cache:
            w, V = self.factor.gram_eigh()
            r = self.rank
            self._cache["spectrum"] = (w[:r], V[:, :r])
        return self._cache["spectrum"]

    @property
    def rank(self) -> int:
        """The numerical rank: how many eigenvalues differ from the shift (c)."""
        return int(self._sigma().numel())

    def _constant(self, m: int) -> Tensor:
        """Return the eigenvalue c = shift, m times."""
        return torch.full((m,), self.shift, dtype=self.dtype, device=self.device)

    def _vectors(self, sigma: Tensor, V: Tensor) -> Tensor:
        memory.check((self.size, sigma.numel()), self.dtype, "eigenvectors of a low-rank matrix")
        return self.factor.apply_t(V / sigma.sqrt())

    # ---------------------------------------------------------------- products and scalars
    def to_dense(self) -> Tensor:
        """Return s UᵀU + c I densely (symmetrised)."""
        memory.check(self.shape, self.dtype, "the dense form of a low-rank matrix",
                     hint="use its solve, spectrum and products, which work from the factor")
        U = self.factor.rows()
        out = self.scale * (U.T @ U)
        out.diagonal().add_(self.shift)
        return 0.5 * (out + out.T)

    def _matmat(self, V: Tensor) -> Tensor:
        out = self.scale * self.factor.apply_t(self.factor.apply(V))
        return out + self.shift * V if self.shift else out

    def diagonal(self) -> Tensor:
        """Return s diag(UᵀU) + c, shape (P,)."""
        return self.scale * self.factor.column_sq_norms() + self.shift

    def trace(self) -> Tensor:
        """Return tr C = c P + s ‖U‖²_F."""
        return self.shift * self.size + self.scale * self.factor.sq_norm()

    def frobenius_norm(self) -> Tensor:
        """Return ‖C‖_F from ‖C‖²_F = s² ‖UUᵀ‖²_F + c² P + 2cs ‖U‖²_F."""
        c, s = self.shift, self.scale
        sq = s * s * (self.factor.gram() ** 2).sum() if s else torch.zeros((), dtype=self.dtype)
        sq = sq + c * c * self.size + (2 * c * s * self.factor.sq_norm() if c and s else 0.0)
        return sq.clamp_min(0).sqrt()

    def _scaled(self, alpha: float) -> CurvatureMatrix:
        return LowRank(self.factor, alpha * self.scale, alpha * self.shift, self.rtol)

    # ---------------------------------------------------------------- damped solves
    def _identity_part(self, damping: float) -> float:
        """Return c' = shift + λ, refusing a negative λ and a singular C + λI."""
        if damping < 0:
            raise ValueError(f"damping must be ≥ 0 for a low-rank matrix; got {damping}")
        mu = self.shift + damping
        if mu == 0 and self.rank < self.size:
            raise ValueError(f"C + {damping}·I is singular: the low-rank matrix has rank {self.rank} < P = "
                             f"{self.size} (from {self.factor.rank} factor rows); pass a damping λ > 0 "
                             "(e.g. solve(v, 1e-3)), which the Woodbury solve needs")
        return mu

    def _primal(self) -> bool:
        """Whether the P×P system is the smaller one (P < r) and fits the memory budget."""
        P, r = self.size, self.factor.rank
        return P < r and memory.nbytes((r + P, P), self.dtype) <= memory.get_budget()

    def _core(self, mu: float) -> tuple[str, Tensor, Tensor | None]:
        """Return a factorisation for the damping.

        ("primal", chol(sUᵀU + μI_P), None) when P < r, else ("cholesky", chol(sG + μI_r), None), or
        ("eigh", d, V) with d = sσ + μ if that is not definite.
        """
        key = ("core", mu)
        if key not in self._cache:
            self._cache = {k: v for k, v in self._cache.items() if not (isinstance(k, tuple) and k[0] == "core")}
            if self._primal():
                U = self.factor.rows()
                L, info = torch.linalg.cholesky_ex(self.scale * (U.T @ U) + mu * torch.eye(
                    self.size, dtype=self.dtype, device=self.device))
                if int(info) == 0:
                    self._cache[key] = ("primal", L, None)
                    return self._cache[key]
            G = self.factor.gram()
            L, info = torch.linalg.cholesky_ex(self.scale * G + mu * torch.eye(G.shape[0], dtype=G.dtype,
                                                                                 device=G.device))
            if int(info) == 0:
                self._cache[key] = ("cholesky", L, None)
            else:
                w, V = self.factor.gram_eigh()
                d = self.scale * w + mu
                if bool((d.abs() <= self.rtol * d.abs().max()).any()):
                    raise ValueError(f"C + λI is singular (shift + λ = {mu}); change the damping")
                self._cache[key] = ("eigh", d, V)
        return self._cache[key]

    def _solve(self, V: Tensor, damping: float) -> Tensor:
        mu = self._identity_part(damping)
        if self.scale == 0:
            return V / mu
        if mu == 0:  # full rank without damping: C⁻¹ = Uᵀ V diag(1/(sσ²)) Vᵀ U
            sigma, Vg = self._spectrum()
            return self.factor.apply_t(Vg @ ((Vg.T @ self.factor.apply(V)) / (self.scale * sigma**2)[:, None]))
        kind, F, Vg = self._core(mu)
        if kind == "primal":
            return torch.cholesky_solve(V, F)
        UV = self.factor.apply(V)
        X = torch.cholesky_solve(UV, F) if kind == "cholesky" else Vg @ ((Vg.T @ UV) / F[:, None])
        return (V - self.scale * self.factor.apply_t(X)) / mu

    def _inverse(self, damping: float) -> CurvatureMatrix:
        mu = self._identity_part(damping)
        if self.scale == 0:
            return LowRank(self.factor, 0.0, 1.0 / mu, self.rtol)
        from curvlab.linalg.dense import Dense

        if mu != 0 and self._core(mu)[0] == "primal":  # P < r: the P×P inverse is the smaller form
            return Dense(torch.cholesky_inverse(self._core(mu)[1]), symmetrize=True)
        if mu == 0:
            sigma, Vg = self._spectrum()
            return LowRank(TransformedFactor(self.factor, (Vg / sigma).T), 1.0 / self.scale, 0.0, self.rtol)
        w, Vg = self.factor.gram_eigh()
        d = self.scale / (mu * (self.scale * w + mu))
        if bool((d > 0).all()) or bool((d < 0).all()):
            sign = 1.0 if bool((d > 0).all()) else -1.0
            return LowRank(TransformedFactor(self.factor, (Vg * d.abs().sqrt()).T), -sign, 1.0 / mu, self.rtol)
        memory.check(self.shape, self.dtype, "the inverse of an indefinite low-rank matrix (dense)")
        eye = torch.eye(self.size, dtype=self.dtype, device=self.device)
        return Dense(self._solve(eye, damping), symmetrize=True)

    def _logdet(self, damping: float) -> Tensor:
        """Return log det(C + λI) by the matrix-determinant lemma; raise unless C + λI is positive definite."""
        mu = self._identity_part(damping)
        if self.scale != 0 and mu > 0:
            kind, F, _ = self._core(mu)
            if kind == "primal":
                return 2.0 * torch.log(F.diagonal()).sum()
            if kind == "cholesky":
                return 2.0 * torch.log(F.diagonal()).sum() + (self.size - self.factor.rank) * math.log(mu)
        return super()._logdet(damping)

    # ---------------------------------------------------------------- spectra
    def _eigvalsh(self) -> Tensor:
        sigma = self._spectrum()[0] if "spectrum" in self._cache else self._sigma()
        values = torch.cat([self.scale * sigma + self.shift, self._constant(self.size - sigma.numel())])
        return torch.sort(values).values

    def _eigh(self) -> Eigh:
        sigma, Vg = self._spectrum()
        Q = self._vectors(sigma, Vg)
        if Q.shape[1]:
            full = torch.linalg.qr(Q, mode="complete").Q
            full[:, :Q.shape[1]] = Q
        else:
            full = torch.eye(self.size, dtype=self.dtype, device=self.device)
        values = torch.cat([self.scale * sigma + self.shift, self._constant(self.size - Q.shape[1])])
        values, order = torch.sort(values)
        return Eigh(values, full[:, order])

    def _complement(self, Q: Tensor, m: int) -> Tensor:
        """Return m orthonormal vectors orthogonal to the orthonormal columns of Q (seeded Gaussian, projected)."""
        if m == 0:
            return torch.empty(self.size, 0, dtype=self.dtype, device=self.device)
        gen = torch.Generator(device=self.device).manual_seed(0)
        X = torch.randn(self.size, m, generator=gen, dtype=self.dtype, device=self.device)
        for _ in range(2):
            X = X - Q @ (Q.T @ X)
            X = torch.linalg.qr(X).Q
        return X

    def _top_eigen(self, k: int) -> Eigh:
        """Return the k largest eigenpairs, eigenvalues descending, eigenvectors (P, k)."""
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= self.size:
            raise ValueError(f"k must be an integer in [0, {self.size}]; got {k!r}")
        sigma, Vg = self._spectrum()
        zeros = self.size - sigma.numel()
        if self.scale >= 0:  # the nonzero part first (descending σ), then the eigenvalue c
            take = min(k, sigma.numel())
            Q = self._vectors(sigma[:take], Vg[:, :take])
            Z = self._complement(self._vectors(sigma, Vg) if k > take else Q, k - take)
            vals = torch.cat([self.scale * sigma[:take] + self.shift, self._constant(k - take)])
            return Eigh(vals, torch.cat([Q, Z], dim=1))
        nz = max(0, k - zeros)  # c first, then the nonzero part from the smallest σ
        Qall = self._vectors(sigma, Vg)
        Z = self._complement(Qall, min(k, zeros))
        Q = Qall.flip(1)[:, :nz]
        vals = torch.cat([self._constant(min(k, zeros)), self.scale * sigma.flip(0)[:nz] + self.shift])
        return Eigh(vals, torch.cat([Z, Q], dim=1))

    # ---------------------------------------------------------------- structure hooks
    def _restrict(self, s: slice) -> CurvatureMatrix:
        """C[s, s] = c·I + s·U[:, s]ᵀU[:, s]."""
        return LowRank(self.factor.restrict(s), self.scale, self.shift, self.rtol)

    def _inner(self, other: CurvatureMatrix) -> Tensor:
        """⟨C, B⟩_F: from U Vᵀ for B low-rank, from s·tr(U B Uᵀ) + c·tr B otherwise."""
        c, s = self.shift, self.scale
        if isinstance(other, LowRank):
            d, t = other.shift, other.scale
            out = torch.zeros((), dtype=self.dtype, device=self.device) + c * d * self.size
            if s and t:
                out = out + s * t * (self.factor.cross_gram(other.factor) ** 2).sum()
            if c and t:
                out = out + c * t * other.factor.sq_norm()
            if d and s:
                out = out + d * s * self.factor.sq_norm()
            return out
        out = c * other.trace() if c else torch.zeros((), dtype=self.dtype, device=self.device)
        if s:
            step = _chunk(16 * self.size, self.factor.rank)
            memory.check((self.size, 2 * step), self.dtype, "columns of Uᵀ for a Frobenius product")
            eye = torch.eye(self.factor.rank, dtype=self.dtype, device=self.device)
            for j in range(0, self.factor.rank, step):
                X = self.factor.apply_t(eye[:, j:j + step])
                out = out + s * (X * (other @ X)).sum()
        return out

    def _add(self, other: CurvatureMatrix, sign: float) -> CurvatureMatrix | None:
        """Two LowRank whose scales share a sign: one LowRank with the rows stacked."""
        if not isinstance(other, LowRank):
            return None
        s, t, shift = self.scale, sign * other.scale, self.shift + sign * other.shift
        if t == 0 or s == 0:
            return LowRank(self.factor if t == 0 else other.factor, s if t == 0 else t, shift)
        if (s > 0) != (t > 0):
            return None
        if t == s:
            return LowRank(StackFactor([self.factor, other.factor]), s, shift)
        eye = torch.eye(other.factor.rank, dtype=self.dtype, device=self.device)
        return LowRank(StackFactor([self.factor, TransformedFactor(other.factor, math.sqrt(t / s) * eye)]), s, shift)
