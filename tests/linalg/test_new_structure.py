"""A new structure is one CurvatureMatrix subclass: the comparators take it without any change.

``ScaledIdentity`` (c·I) implements only the primitives and two structural hooks, in this file;
``curvlab.compare`` knows nothing about it, yet cosine, relative error, spectra, directions and the
damping rules all work and agree with the dense computation.
"""

from __future__ import annotations

import pytest
import torch

import curvlab.compare as cc
from curvlab.linalg import CurvatureMatrix, Dense, Diagonal, Eigh
from tests.linalg.test_protocol import spd


class ScaledIdentity(CurvatureMatrix):
    """C = c·I: every operation in O(P), nothing dense unless asked."""

    def __init__(self, size: int, c: float) -> None:
        super().__init__(size, torch.float64)
        self.c = float(c)

    def to_dense(self):
        return self.c * torch.eye(self.size, dtype=self.dtype)

    def _matmat(self, V):
        return self.c * V

    def _solve(self, V, damping):
        d = self.c + damping
        if abs(d) <= 1e-300:
            raise self.singular_error(damping, abs(d))
        return V / d

    def _inverse(self, damping):
        return ScaledIdentity(self.size, 1.0 / (self.c + damping))

    def _eigh(self):
        return Eigh(torch.full((self.size,), self.c, dtype=self.dtype), torch.eye(self.size, dtype=self.dtype))

    def diagonal(self):
        return torch.full((self.size,), self.c, dtype=self.dtype)

    def frobenius_norm(self):
        return torch.tensor(abs(self.c) * self.size**0.5, dtype=self.dtype)

    def _scaled(self, alpha):
        return ScaledIdentity(self.size, alpha * self.c)

    def _inner(self, other):  # ⟨cI, B⟩ = c tr B
        return self.c * other.trace()

    def _restrict(self, s):
        return ScaledIdentity(s.stop - s.start, self.c)


def test_comparators_take_a_new_structure_unchanged():
    n = 9
    C, B = ScaledIdentity(n, 2.5), Dense(spd(n, 3))
    Cd, Bd = C.to_dense(), B.to_dense()
    cos = float((Cd * Bd).sum() / (Cd.norm() * Bd.norm()))
    assert float(cc.cosine(C, B)) == pytest.approx(cos, rel=1e-12)
    assert float(cc.relative_error(C, B)) == pytest.approx(float((Cd - Bd).norm() / Bd.norm()), rel=1e-10)
    blocks = [("a", slice(0, 4)), ("b", slice(4, 9))]
    per = cc.cosine(C, B, blocks=blocks)
    for name, s in blocks:
        ref = float((Cd[s, s] * Bd[s, s]).sum() / (Cd[s, s].norm() * Bd[s, s].norm()))
        assert per[name] == pytest.approx(ref, rel=1e-12)
    assert isinstance(C.restrict(slice(0, 4)), ScaledIdentity)
    s = cc.spectra(C, B, k=3)
    assert s.top_ratio.tolist() == pytest.approx((2.5 / torch.linalg.eigvalsh(Bd).flip(0)[:3]).tolist())
    g = torch.randn(n, dtype=torch.float64)
    d = cc.directions({"new": C, "dense": B, "diag": Diagonal(torch.full((n,), 2.5, dtype=torch.float64))},
                      g, 0.1, reference="dense")
    assert float(d.cosine[0, 2]) == pytest.approx(1.0, abs=1e-12)


def test_the_damping_rules_apply_to_a_new_structure():
    C = ScaledIdentity(4, 1.0)
    v = torch.ones(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="≥ 0"):
        C.solve(v, -0.5)
    with pytest.raises(ValueError, match="unknown damping mode 'pi'.*\\['exact'\\]"):
        C.solve(v, 0.1, mode="pi")
    with pytest.raises(ValueError, match="scalar damping"):
        C.direction(v, (0.1, 0.2))
    with pytest.raises(ValueError, match="singular"):
        ScaledIdentity(4, 0.0).solve(v, 0.0)
