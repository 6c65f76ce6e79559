"""One layer's parameters: the flat parameter order versus the folded matrix [W b].

A layer z = W a + b with W ∈ R^{p×d} stores its parameters in θ as ``W.flatten()`` (row-major)
followed by ``b`` (when the layer has a trainable bias). Kronecker-factored matrices, the per-layer
contractions of the oracle and the per-sample factors all work on the **folded** p × q matrix
X = [W b] (q = d + 1 with a bias, the bias being the weight of an input that is always 1, else
q = d), row-major. The two orders differ only in where the bias entries sit:

    parameter order  [W_11 … W_1d, W_21 … W_pd, b_1 … b_p]
    folded order     [W_11 … W_1d, b_1, W_21 … W_2d, b_2, …]

:class:`KronLayout` is that permutation with its conversions; every module that moves between
the two orders uses it (``docs/layout.md`` derives the Kronecker identities in both orders).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = ["KronLayout"]


class KronLayout:
    """The folded p × q layout of one layer's parameters (bias, if any, as the last column).

    Parameters
    ----------
    rows:
        p, the layer's outputs.
    cols:
        q, the columns of the folded matrix: the inputs, plus one for a folded bias.
    bias:
        whether the last column is a bias (stored after the whole weight in parameter order).
    """

    def __init__(self, rows: int, cols: int, bias: bool) -> None:
        rows, cols = int(rows), int(cols)
        if rows < 1 or cols < 1:
            raise ValueError(f"a layer layout needs rows and columns ≥ 1; got {rows} × {cols}")
        if bias and cols < 1:
            raise ValueError("a folded bias needs at least one column")
        self.rows, self.cols, self.bias = rows, cols, bool(bias)
        self._perm: dict = {}  # device (or ("inverse", device)) → index

    @classmethod
    def of_layer(cls, d_out: int, d_in: int, bias: bool) -> KronLayout:
        """Return the layout of a layer with ``d_in`` inputs and ``d_out`` outputs (bias column added if any)."""
        return cls(d_out, d_in + (1 if bias else 0), bias)

    @property
    def size(self) -> int:
        """Number of parameters, p·q."""
        return self.rows * self.cols

    @property
    def in_features(self) -> int:
        """The weight's columns d (q without the bias column)."""
        return self.cols - (1 if self.bias else 0)

    @property
    def weight_size(self) -> int:
        """The number of weight entries, rows · in_features (the bias column excluded)."""
        return self.rows * self.in_features

    def __eq__(self, other: object) -> bool:
        return isinstance(other, KronLayout) and (self.rows, self.cols, self.bias) == (other.rows, other.cols,
                                                                                     other.bias)

    def __hash__(self) -> int:
        return hash((self.rows, self.cols, self.bias))

    def __repr__(self) -> str:
        return f"KronLayout(p={self.rows}, q={self.cols}{', bias folded' if self.bias else ''})"

    # -------------------------------------------------------------------- the permutation
    def perm(self, device: torch.device | str = "cpu") -> Tensor:
        """Index π with v_param = v_folded[π] (both flat, length p·q)."""
        device = torch.device(device)
        if device not in self._perm:
            idx = torch.arange(self.size, device=device).reshape(self.rows, self.cols)
            self._perm[device] = (idx.reshape(-1) if not self.bias
                                  else torch.cat([idx[:, :-1].reshape(-1), idx[:, -1]]))
        return self._perm[device]

    def inverse_perm(self, device: torch.device | str = "cpu") -> Tensor:
        """Index σ with v_folded = v_param[σ] (cached per device)."""
        device = torch.device(device)
        key = ("inverse", device)
        if key not in self._perm:
            self._perm[key] = torch.argsort(self.perm(device))
        return self._perm[key]

    def to_param_order(self, M: Tensor) -> Tensor:
        """Return a folded-order square matrix (p·q × p·q) in parameter order (rows and columns permuted)."""
        if not self.bias:
            return M
        p = self.perm(M.device)
        return M[p][:, p]

    def to_folded_order(self, M: Tensor) -> Tensor:
        """Return a parameter-order square matrix in the folded order."""
        if not self.bias:
            return M
        s = self.inverse_perm(M.device)
        return M[s][:, s]

    # -------------------------------------------------------------------- vectors ↔ matrices
    def to_mats(self, V: Tensor) -> Tensor:
        """Columns in parameter order (p·q, m) → m folded matrices (m, p, q)."""
        m = V.shape[1]
        if not self.bias:
            return V.T.reshape(m, self.rows, self.cols)
        w = self.weight_size
        W = V[:w].T.reshape(m, self.rows, self.cols - 1)
        b = V[w:].T.reshape(m, self.rows, 1)
        return torch.cat([W, b], dim=2)

    def from_mats(self, X: Tensor) -> Tensor:
        """Map m folded matrices (m, p, q) to columns in parameter order (p·q, m)."""
        m = X.shape[0]
        if not self.bias:
            return X.reshape(m, -1).T
        return torch.cat([X[:, :, :-1].reshape(m, -1), X[:, :, -1]], dim=1).T

    def fold(self, v: Tensor) -> Tensor:
        """Return one flat parameter-order vector (p·q,) as its folded p×q matrix [W b] (2-D: plain GEMMs)."""
        if not self.bias:
            return v.view(self.rows, self.cols)
        return torch.index_select(v, 0, self.inverse_perm(v.device)).view(self.rows, self.cols)  # one gather

    def unfold(self, X: Tensor) -> Tensor:
        """Return the folded p×q matrix X as a flat parameter-order vector (p·q,): the inverse of :meth:`fold`."""
        if not self.bias:
            return X.reshape(-1)
        return torch.index_select(X.reshape(-1), 0, self.perm(X.device))

    def rows_from_mats(self, X: Tensor) -> Tensor:
        """Folded matrices (..., p, q) → flat rows (..., p·q) in parameter order."""
        lead = X.shape[:-2]
        if not self.bias:
            return X.reshape(*lead, -1)
        return torch.cat([X[..., :-1].reshape(*lead, -1), X[..., -1]], dim=-1)

    def augment(self, a: Tensor) -> Tensor:
        """Layer inputs (..., d) → (..., q): a constant 1 appended for a folded bias."""
        if not self.bias:
            return a
        return torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)

    # -------------------------------------------------------------------- blocks between two layers
    def _row_range(self, rows: slice | None) -> tuple[int, int]:
        r0, r1 = (0, self.rows) if rows is None else (rows.start or 0, self.rows if rows.stop is None else rows.stop)
        if not 0 <= r0 <= r1 <= self.rows:
            raise ValueError(f"rows {rows!r} outside the layout's {self.rows} output rows")
        return r0, r1

    def parts(self, rows: slice | None = None) -> Iterator[tuple[slice, slice]]:
        """(columns of the folded matrix, range in parameter order) of the weight and of the bias.

        With ``rows`` = slice(r0, r1), the ranges are those of the folded rows r0 … r1 − 1 only:
        weight entries [r0·d, r1·d) and bias entries [p·d + r0, p·d + r1).
        """
        d = self.in_features
        r0, r1 = self._row_range(rows)
        yield slice(0, d), slice(r0 * d, r1 * d)
        if self.bias:
            yield slice(d, d + 1), slice(self.weight_size + r0, self.weight_size + r1)

    def scatter(self, out: Tensor, T: Tensor, other: KronLayout, rows: slice | None = None,
                accumulate: bool = False) -> None:
        """Write (or, with ``accumulate``, add) a block T between this layer (rows) and ``other``.

        ``T`` is in folded order on both sides, viewable as (p, q, p', q'); ``out`` is the
        (p·q, p'·q') block in parameter order. With ``rows`` = slice(r0, r1), ``T`` holds only the
        folded rows r0 … r1 − 1, viewable as (r1 − r0, q, p', q'), and only their entries of ``out``
        are written. Written part by part through strided views: no permuted copy of T is formed.
        """
        r0, r1 = self._row_range(rows)
        T4 = T.view(r1 - r0, self.cols, other.rows, other.cols)
        for rsel, rrange in self.parts(rows):
            for csel, crange in other.parts():
                src = T4[:, rsel, :, csel]
                dst = out[rrange, crange].view(src.shape)
                dst.add_(src) if accumulate else dst.copy_(src)
