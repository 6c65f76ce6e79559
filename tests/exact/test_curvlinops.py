"""The oracle entry by entry against curvlinops' Hessian, GGN and EF operators (an independent
implementation with the same scale conventions; skipped when curvlinops is not installed)."""

from __future__ import annotations

import pytest
import torch

import curvlab as cl
from tests.exact.cases import LOSSES, REDUCTIONS, make

curvlinops = pytest.importorskip("curvlinops")


@pytest.mark.parametrize("arch", ["mlp", "cnn", "sequence"])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("red", REDUCTIONS)
def test_oracle_matches_curvlinops(arch, loss, red):
    model, loss_fn, X, y = make(arch, loss, red, n=5)
    prob = cl.Problem(model, loss_fn, X, y)
    params = [p for p in model.parameters() if p.requires_grad]
    kw = dict(check_deterministic=False, num_data=prob.num_samples)
    eye = torch.eye(prob.num_params, dtype=torch.float64)
    for ours, theirs in ((cl.exact.hessian, curvlinops.HessianLinearOperator),
                         (cl.exact.ggn, curvlinops.GGNLinearOperator),
                         (cl.exact.empirical_fisher, curvlinops.EFLinearOperator)):
        ref = theirs(model, loss_fn, params, [(X, y)], **kw) @ eye
        got = ours(prob).to_dense()
        assert float((got - ref).abs().max() / ref.abs().max()) < 1e-10, (ours.__name__, arch, loss, red)
