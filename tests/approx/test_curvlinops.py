"""Entry-by-entry agreement with curvlinops' KFAC and EKFAC (skipped when curvlinops is not installed).

curvlab's scale and layout conventions are curvlinops' (``shared/reference/peer-benchmarks.md``,
"Scale conventions"); with ``separate_weight_and_bias=False`` both fold the bias into A.
"""

from __future__ import annotations

import pytest
import torch

import curvlab as cl
from tests.approx import cases
from tests.approx.cases import rel

curvlinops = pytest.importorskip("curvlinops")


def dense(op, P: int) -> torch.Tensor:
    return op @ torch.eye(P, dtype=torch.float64)


def peer(prob: cl.Problem, cls, fisher: str, approx: str):
    from curvlinops.kfac import FisherType, KFACType

    params = [p for p in prob.model.parameters() if p.requires_grad]
    fisher_type = {"type2": FisherType.TYPE2, "empirical": FisherType.EMPIRICAL}[fisher]
    kfac_approx = {"expand": KFACType.EXPAND, "reduce": KFACType.REDUCE}[approx]
    return cls(prob.model, prob.loss_fn, params, [(prob.X, prob.y)], fisher_type=fisher_type,
               kfac_approx=kfac_approx, separate_weight_and_bias=False, check_deterministic=False,
               num_data=prob.num_samples)


PROBLEMS = {
    "mlp-ce": lambda: cases.mlp(n=10),
    "mlp-mse-mean": lambda: cases.mlp(n=10, loss="mse"),
    "mlp-bce-sum-nobias": lambda: cases.mlp(n=10, loss="bce", reduction="sum", bias=False),
    "cnn": lambda: cases.cnn(n=4),
    "sequence": lambda: cases.shared_expand(),
}
CASES = [(p, f, a) for p in PROBLEMS for f in ("type2", "empirical") for a in ("expand", "reduce")
         if a == "expand" or p == "cnn"]


@pytest.mark.parametrize("name,fisher,approx", CASES)
def test_kfac_matches_curvlinops(name, fisher, approx):
    prob = PROBLEMS[name]()
    ours = cl.approx.kfac(prob, fisher=fisher, approx=approx).to_dense()
    theirs = dense(peer(prob, curvlinops.KFACLinearOperator, fisher, approx), prob.num_params)
    assert rel(ours, theirs) < 1e-10


@pytest.mark.parametrize("name,fisher", [("mlp-ce", "type2"), ("mlp-mse-mean", "empirical"), ("cnn", "type2")])
def test_ekfac_matches_curvlinops(name, fisher):
    prob = PROBLEMS[name]()
    ours = cl.approx.ekfac(prob, fisher=fisher).to_dense()
    theirs = dense(peer(prob, curvlinops.EKFACLinearOperator, fisher, "expand"), prob.num_params)
    assert rel(ours, theirs) < 1e-9
