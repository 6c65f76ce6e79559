"""The comparators take low-rank matrices like any other: the same numbers as from the dense twins.

Issue 9, item 4: ``cl.compare.spectra``, ``fraction_below``, ``directions`` (and the scalar
comparisons) on ``structure="low_rank"`` / ``"block_low_rank"`` oracle results equal those on the
dense ``structure="full"`` / ``"block"`` matrices, float64, to 1e-10 relative.
"""

from __future__ import annotations

import pytest
import torch

import curvlab as cl

TOL = 1e-10


@pytest.fixture(scope="module", params=["diabetes-mlp", "digits-mlp"])
def pair(request):
    """(problem, low-rank GGN, dense GGN, low-rank EF, dense EF) on a batch whose rank r < P."""
    prob = cl.problems.load(request.param, n=16)
    return (prob, cl.exact.ggn(prob, structure="low_rank"), cl.exact.ggn(prob),
            cl.exact.empirical_fisher(prob, structure="low_rank"), cl.exact.empirical_fisher(prob))


def _close(a, b):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max()) <= TOL * max(1.0, float(b.abs().max()))


def test_spectra_of_low_rank_equal_dense(pair):
    _, G_lr, G, E_lr, E = pair
    lr, dense = cl.compare.spectra(E_lr, G_lr, k=5), cl.compare.spectra(E, G, k=5)
    assert _close(lr.eig_a, dense.eig_a) and _close(lr.eig_b, dense.eig_b)
    assert _close(lr.top_ratio, dense.top_ratio)
    assert abs(lr.wasserstein - dense.wasserstein) <= TOL * max(1.0, abs(dense.wasserstein))
    assert abs(lr.overlap - dense.overlap) <= 1e-8


@pytest.mark.parametrize("damping", [1e-6, 1e-3, 1e-1])
def test_fraction_below_of_low_rank_equals_dense(pair, damping):
    _, G_lr, G, E_lr, E = pair
    assert cl.compare.fraction_below(G_lr, damping) == cl.compare.fraction_below(G, damping)
    assert cl.compare.fraction_below(E_lr, damping) == cl.compare.fraction_below(E, damping)


@pytest.mark.parametrize("damping", [1e-3, 1e-1])
def test_directions_with_low_rank_equal_dense(pair, damping):
    prob, G_lr, G, E_lr, E = pair
    g = torch.randn(prob.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    lr = cl.compare.directions({"ggn": G_lr, "ef": E_lr}, g, damping, reference="ggn")
    dense = cl.compare.directions({"ggn": G, "ef": E}, g, damping, reference="ggn")
    for name in ("ggn", "ef"):
        x, y = lr.directions[name], dense.directions[name]
        assert float((x - y).norm() / y.norm()) <= TOL
    assert _close(lr.cosine, dense.cosine) and _close(lr.energy_error, dense.energy_error)


def test_scalar_comparisons_with_low_rank_equal_dense(pair):
    prob, G_lr, G, E_lr, E = pair
    blocks = prob.partition  # the layers: the per-block values as well as the whole matrix
    for f in (cl.compare.cosine, cl.compare.relative_error, cl.compare.trace_ratio):
        lr, dense = f(E_lr, G_lr, blocks=blocks), f(E, G, blocks=blocks)
        assert abs(float(lr) - float(dense)) <= TOL * max(1.0, abs(float(dense)))
        assert dense.blocks and all(abs(lr.blocks[b] - v) <= TOL * max(1.0, abs(v)) for b, v in dense.blocks.items())
    a, b = cl.compare.logdet_difference(E_lr, G_lr, 1e-2), cl.compare.logdet_difference(E, G, 1e-2)
    assert abs(float(a) - float(b)) <= 1e-8 * max(1.0, abs(float(b)))
