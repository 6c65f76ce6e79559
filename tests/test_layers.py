"""The survey of a model (curvlab.layers): which layers take the layer-structured fast paths, and why."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab as cl
from curvlab import layers, reference
from curvlab.layers import survey


def _prob(model: nn.Module, d_in: int = 4, n: int = 5) -> cl.Problem:
    torch.manual_seed(0)
    model = model.double()
    X = torch.randn(n, d_in, dtype=torch.float64)
    return cl.Problem(model, nn.CrossEntropyLoss(), X, torch.randint(0, 2, (n,)))


def test_plain_mlp_layers_are_all_structured_and_cached():
    prob = _prob(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)))
    sv = survey(prob)
    assert list(sv.layers) == ["0", "2"]
    assert sv.rejected == {}
    assert sv.calls["0"] == sv.calls["2"] == 1
    assert [str(u) for u in sv.uses["0.weight"]] == ["linear in 0"]
    assert sv.layers["0"].single_position and (sv.layers["0"].start, sv.layers["0"].stop) == (0, 15)
    assert survey(prob) is sv and survey(prob.subset(slice(0, 2))) is sv and survey(prob.at(prob.theta * 2)) is sv
    # activations per sample: 3 + 3 + 2 leaf outputs
    assert sv.activations_per_sample == 8


class CalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.shared, self.out = nn.Linear(4, 3), nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.shared(torch.tanh(self.shared(torch.tanh(self.inp(x)))))))


class WeightUsedTwiceInOneModule(nn.Module):
    """The weight also scales the layer's own input: a second use inside the same module's call."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.out = nn.Linear(4, 3), nn.Linear(3, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.lin(x * self.lin.weight.sum())))


class DeadBranch(nn.Module):
    """A layer whose output never reaches the loss: single-use, zero gradient — still exact."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.dead, self.out = nn.Linear(4, 3), nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        self.dead(h)
        return self.out(h)


@pytest.mark.parametrize("model,name,reason", [
    (CalledTwice(), "shared", "called 2 times"),
    (WeightUsedTwiceInOneModule(), "lin", "reaches the loss through 2 operation"),
])
def test_rejections_say_why(model, name, reason):
    prob = _prob(model)
    sv = survey(prob)
    assert name not in sv.layers
    assert reason in sv.rejected[name]
    H = cl.exact.hessian(prob).to_dense()
    assert float((H - reference.hessian(prob)).abs().max()) < 1e-12


def test_frozen_weight_and_grouped_conv_are_rejected_with_reasons():
    m = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    m[0].weight.requires_grad_(False)
    sv = survey(_prob(m))
    assert "0" not in sv.layers and "not a trainable parameter" in sv.rejected["0"]
    conv = nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten(), nn.Linear(8, 2)).double()
    X = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    sv = survey(cl.Problem(conv, nn.CrossEntropyLoss(), X, torch.randint(0, 2, (3,))))
    assert "groups=2" in sv.rejected["0"] and list(sv.layers) == ["2"]


def test_dead_branch_layer_is_structured_and_exact():
    prob = _prob(DeadBranch())
    assert "dead" in survey(prob).layers
    for fn, ref in ((cl.exact.ggn, reference.ggn), (cl.exact.hessian, reference.hessian)):
        assert float((fn(prob).to_dense() - ref(prob)).abs().max()) < 1e-12


def test_a_use_the_trace_cannot_see_is_caught_by_the_gradient_check(monkeypatch):
    """With the structural check disabled, the gradient comparison alone rejects a tied weight."""

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.Linear(4, 2)

        def forward(self, x):
            return F.linear(torch.tanh(self.enc(x)), self.enc.weight.t())

    monkeypatch.setattr(layers, "_single_use", lambda *a: None)
    sv = survey(_prob(Tied()))
    assert "enc" not in sv.layers
    assert "gradient assembled" in sv.rejected["enc"]


def test_reason_for_generic_parameters():
    m = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2))
    prob = _prob(m)
    sv = survey(prob)
    assert sv.generic_parameters(prob.param_names) == ["1.weight", "1.bias"]
    assert "not a parameter of nn.Linear" in sv.reason("1.weight") and "layer_norm in 1" in sv.reason("1.weight")
    assert sv.reason("0.weight") == ""


def test_survey_refuses_non_problems():
    with pytest.raises(TypeError, match="Problem"):
        survey("not a problem")
