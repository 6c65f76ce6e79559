"""curvlab.Problem: input validation, partitions, the flattening convention, evaluation at any θ."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvlab as cl

N = 6


def _mlp(d_in: int = 3, d_out: int = 4) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, 5), nn.Tanh(), nn.Linear(5, d_out)).double()


def _ce_data(n: int = N, c: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 3, dtype=torch.float64), torch.randint(0, c, (n,))


def _ref(loss_fn: nn.Module, model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    """The loss computed the plain PyTorch way."""
    with torch.no_grad():
        return float(loss_fn(model(X), y))


def _ce() -> cl.Problem:
    X, y = _ce_data()
    return cl.Problem(_mlp(), nn.CrossEntropyLoss(), X, y)


# ---------------------------------------------------------------------------- bad inputs
def test_x_y_length_mismatch():
    X, y = _ce_data()
    with pytest.raises(ValueError, match="same number of samples"):
        cl.Problem(_mlp(), nn.CrossEntropyLoss(), X, y[:-1])


def test_empty_data():
    X, y = _ce_data()
    with pytest.raises(ValueError, match="empty"):
        cl.Problem(_mlp(), nn.CrossEntropyLoss(), X[:0], y[:0])


def test_non_tensor_data():
    X, y = _ce_data()
    with pytest.raises(TypeError, match="torch tensors"):
        cl.Problem(_mlp(), nn.CrossEntropyLoss(), X.numpy(), y)


def test_non_module_model():
    X, y = _ce_data()
    with pytest.raises(TypeError, match="torch.nn.Module"):
        cl.Problem(lambda x: x, nn.CrossEntropyLoss(), X, y)


def test_cross_entropy_float_targets():
    X, _ = _ce_data()
    with pytest.raises(TypeError, match="integer class indices"):
        cl.Problem(_mlp(), nn.CrossEntropyLoss(), X, torch.rand(N, 4, dtype=torch.float64))


def test_cross_entropy_target_shape():
    X, _ = _ce_data()
    with pytest.raises(ValueError, match=r"shape \(N,\)"):
        cl.Problem(_mlp(), nn.CrossEntropyLoss(), X, torch.zeros(N, 1, dtype=torch.long))


@pytest.mark.parametrize("bad", [4, -1])
def test_cross_entropy_class_out_of_range(bad):
    X, y = _ce_data()
    y[2] = bad
    with pytest.raises(ValueError, match=rf"target {bad} is outside \[0, 4\)"):
        cl.Problem(_mlp(), nn.CrossEntropyLoss(), X, y)


def test_mse_shape_mismatch():
    X = torch.randn(N, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="MSELoss targets must have the model output's shape"):
        cl.Problem(_mlp(d_out=2), nn.MSELoss(), X, torch.randn(N, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="MSELoss targets"):  # (N,) against outputs (N, 1): no broadcasting
        cl.Problem(_mlp(d_out=1), nn.MSELoss(), X, torch.randn(N, dtype=torch.float64))


def test_mse_integer_targets():
    X = torch.randn(N, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="floating point"):
        cl.Problem(_mlp(d_out=2), nn.MSELoss(), X, torch.zeros(N, 2, dtype=torch.long))


@pytest.mark.parametrize("bad", [1.5, -0.1])
def test_bce_targets_outside_unit_interval(bad):
    X = torch.randn(N, 3, dtype=torch.float64)
    y = torch.rand(N, 2, dtype=torch.float64)
    y[1, 1] = bad
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        cl.Problem(_mlp(d_out=2), nn.BCEWithLogitsLoss(), X, y)


def test_bce_accepts_soft_targets_in_unit_interval():
    X = torch.randn(N, 3, dtype=torch.float64)
    y = torch.rand(N, 2, dtype=torch.float64)
    y[0, 0], y[0, 1] = 0.0, 1.0
    prob = cl.Problem(_mlp(d_out=2), nn.BCEWithLogitsLoss(), X, y)
    assert prob.loss() == pytest.approx(_ref(nn.BCEWithLogitsLoss(), prob.model, X, y), rel=1e-12)


@pytest.mark.parametrize("where", ["X", "y"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_data(where, value):
    X = torch.randn(N, 3, dtype=torch.float64)
    y = torch.randn(N, 2, dtype=torch.float64)
    (X if where == "X" else y)[3, 1] = value
    with pytest.raises(ValueError, match=rf"^{where} contains NaN or inf"):
        cl.Problem(_mlp(d_out=2), nn.MSELoss(), X, y)


def test_non_finite_parameter():
    model = _mlp()
    with torch.no_grad():
        model[2].bias[1] = float("nan")
    X, y = _ce_data()
    with pytest.raises(ValueError, match="parameter '2.bias' contains NaN"):
        cl.Problem(model, nn.CrossEntropyLoss(), X, y)


@pytest.mark.parametrize("loss", [nn.L1Loss(), nn.NLLLoss(), nn.HuberLoss(), nn.BCELoss()])
def test_unsupported_loss(loss):
    X, y = _ce_data()
    with pytest.raises(TypeError, match=f"unsupported loss {type(loss).__name__}"):
        cl.Problem(_mlp(), loss, X, y)


@pytest.mark.parametrize("loss", [nn.CrossEntropyLoss(reduction="none"), nn.MSELoss(reduction="none")])
def test_unsupported_reduction(loss):
    X, y = _ce_data()
    with pytest.raises(ValueError, match="unsupported reduction 'none'"):
        cl.Problem(_mlp(), loss, X, y)


def test_loss_class_instead_of_instance():
    X, y = _ce_data()
    with pytest.raises(TypeError, match=r"instance.*CrossEntropyLoss\(\)"):
        cl.Problem(_mlp(), nn.CrossEntropyLoss, X, y)


@pytest.mark.parametrize("loss", [nn.CrossEntropyLoss(weight=torch.ones(4)), nn.CrossEntropyLoss(label_smoothing=0.1)])
def test_cross_entropy_options_rejected(loss):
    X, y = _ce_data()
    with pytest.raises(ValueError, match="not supported"):
        cl.Problem(_mlp(), loss, X, y)


def test_model_without_trainable_parameters():
    X, y = _ce_data()
    with pytest.raises(ValueError, match="no trainable parameters"):
        cl.Problem(nn.Sequential(nn.Identity()), nn.CrossEntropyLoss(), torch.randn(N, 4, dtype=torch.float64), y)
    model = _mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        cl.Problem(model, nn.CrossEntropyLoss(), X, y)


@pytest.mark.parametrize("layer", [nn.Dropout(0.1), nn.BatchNorm1d(5)])
def test_training_mode_layers_rejected(layer):
    model = nn.Sequential(nn.Linear(3, 5), layer, nn.Linear(5, 4)).double()
    X, y = _ce_data()
    with pytest.raises(ValueError, match="training mode.*model.eval"):
        cl.Problem(model, nn.CrossEntropyLoss(), X, y)
    prob = cl.Problem(model.eval(), nn.CrossEntropyLoss(), X, y)  # fine once in eval mode
    assert prob.loss() == pytest.approx(_ref(nn.CrossEntropyLoss(), model, X, y), rel=1e-12)


def test_model_failing_on_inputs():
    X = torch.randn(N, 7, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"model failed on X of shape \(6, 7\)"):
        cl.Problem(_mlp(), nn.CrossEntropyLoss(), X, torch.zeros(N, dtype=torch.long))


def test_mixed_parameter_dtypes():
    X, y = _ce_data()
    model = _mlp()
    model[2].float()
    with pytest.raises(TypeError, match="share one dtype"):
        cl.Problem(model, nn.CrossEntropyLoss(), X, y)


# ---------------------------------------------------------------------------- partitions
def test_partition_module():
    prob = _ce()
    assert prob.partition.names == ["0", "2"]
    assert prob.partition.slices == [slice(0, 20), slice(20, 44)]
    assert prob.partition["2"].params == ("2.weight", "2.bias")


def test_partition_blocks_unpack_as_name_and_slice():
    """design.md: ``prob.partition`` is the ordered blocks (name, slice) over the flat vector."""
    prob = _ce()
    pairs = [(name, s) for name, s in prob.partition]
    assert pairs == [("0", slice(0, 20)), ("2", slice(20, 44))]
    theta = prob.theta
    assert torch.equal(torch.cat([theta[s] for _, s in prob.partition]), theta)
    name, s = prob.partition["2"]
    assert (name, s) == (prob.partition["2"].name, prob.partition["2"].slice)


def test_partition_per_tensor_and_all():
    X, y = _ce_data()
    per = cl.Problem(_mlp(), nn.CrossEntropyLoss(), X, y, partition="per_tensor")
    assert per.partition.names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert per.partition.sizes == [15, 5, 20, 4]
    one = cl.Problem(_mlp(), nn.CrossEntropyLoss(), X, y, partition="all")
    assert one.partition.names == ["all"] and one.partition.slices == [slice(0, 44)]


def test_partition_custom():
    X, y = _ce_data()
    prob = cl.Problem(_mlp(), nn.CrossEntropyLoss(), X, y,
                      partition=[("first", ["0.weight"]), ("rest", ["0.bias", "2.weight", "2.bias"])])
    assert prob.partition.names == ["first", "rest"]
    assert prob.partition.sizes == [15, 29]
    plain = cl.Problem(_mlp(), nn.CrossEntropyLoss(), X, y, partition=[["0.weight", "0.bias"], "2.weight", ["2.bias"]])
    assert plain.partition.names == ["block0", "block1", "block2"]
    assert plain.partition.slices == [slice(0, 20), slice(20, 40), slice(40, 44)]


@pytest.mark.parametrize("spec, message", [
    ("layers", "unknown partition 'layers'"),
    ([["0.weight", "0.bias"], ["2.weight"]], "every trainable parameter exactly once"),
    ([["0.weight", "0.bias", "2.weight", "2.bias", "0.bias"]], "every trainable parameter exactly once"),
    ([["0.weight", "2.weight"], ["0.bias", "2.bias"]], "contiguous"),
    ([["0.weight", "0.bias"], ["2.weight", "2.bias", "3.weight"]], r"unknown parameters \['3.weight'\]"),
    ([("a", ["0.weight", "0.bias"]), ("a", ["2.weight", "2.bias"])], "used twice"),
    ([("a", []), ("b", ["0.weight", "0.bias", "2.weight", "2.bias"])], "empty"),
])
def test_bad_partitions(spec, message):
    X, y = _ce_data()
    with pytest.raises(ValueError, match=message):
        cl.Problem(_mlp(), nn.CrossEntropyLoss(), X, y, partition=spec)


def test_partition_of_the_wrong_type():
    X, y = _ce_data()
    with pytest.raises(TypeError, match="partition must be .*got int 3"):
        cl.Problem(_mlp(), nn.CrossEntropyLoss(), X, y, partition=3)


def test_frozen_parameters_are_not_in_theta():
    model = _mlp()
    model[0].bias.requires_grad_(False)
    X, y = _ce_data()
    prob = cl.Problem(model, nn.CrossEntropyLoss(), X, y)
    assert prob.param_names == ["0.weight", "2.weight", "2.bias"]
    assert prob.num_params == 15 + 20 + 4
    assert prob.partition.names == ["0", "2"]
    assert prob.loss() == pytest.approx(_ref(nn.CrossEntropyLoss(), model, X, y), rel=1e-12)


# ---------------------------------------------------------------------------- flattening
def test_flatten_is_named_parameters_order_row_major():
    prob = _ce()
    expected = torch.cat([p.detach().flatten() for _, p in prob.model.named_parameters()])
    assert torch.equal(prob.theta, expected)
    # explicit row-major check on the first weight: entry (i, j) sits at i * d_in + j
    W = prob.model[0].weight
    assert prob.theta[1 * 3 + 2] == W[1, 2]
    assert prob.theta[15 + 4] == prob.model[0].bias[4]


def test_flatten_unflatten_round_trip():
    prob = _ce()
    theta = torch.randn(prob.num_params, dtype=torch.float64)
    parts = prob.unflatten(theta)
    assert list(parts) == prob.param_names
    assert [tuple(t.shape) for t in parts.values()] == [(5, 3), (5,), (4, 5), (4,)]
    assert torch.equal(parts["2.weight"], theta[20:40].reshape(4, 5))
    assert torch.equal(prob.flatten(parts), theta)
    assert torch.equal(prob.flatten(list(parts.values())), theta)
    with pytest.raises(ValueError, match=r"shape \(44,\)"):
        prob.unflatten(theta[:-1])
    with pytest.raises(ValueError, match="missing parameters"):
        prob.flatten({"0.weight": parts["0.weight"]})
    with pytest.raises(ValueError, match="entries"):
        prob.flatten([*list(parts.values())[:-1], torch.zeros(3)])


# ---------------------------------------------------------------------------- evaluation
@pytest.mark.parametrize("loss_fn, make_y", [
    (nn.CrossEntropyLoss(), lambda: torch.randint(0, 4, (N,))),
    (nn.CrossEntropyLoss(reduction="sum"), lambda: torch.randint(0, 4, (N,))),
    (nn.MSELoss(), lambda: torch.randn(N, 4, dtype=torch.float64)),
    (nn.MSELoss(reduction="sum"), lambda: torch.randn(N, 4, dtype=torch.float64)),
    (nn.BCEWithLogitsLoss(), lambda: torch.rand(N, 4, dtype=torch.float64)),
    (nn.BCEWithLogitsLoss(reduction="sum"), lambda: torch.rand(N, 4, dtype=torch.float64)),
])
def test_loss_and_gradient_match_autograd(loss_fn, make_y):
    model = _mlp()
    X, y = torch.randn(N, 3, dtype=torch.float64), make_y()
    prob = cl.Problem(model, loss_fn, X, y)
    reference = loss_fn(model(X), y)
    assert prob.loss() == pytest.approx(float(reference.detach()), rel=1e-13, abs=1e-15)
    grads = torch.autograd.grad(reference, list(model.parameters()))
    expected = torch.cat([g.flatten() for g in grads])
    torch.testing.assert_close(prob.gradient(), expected, rtol=1e-12, atol=1e-14)


def test_at_evaluates_elsewhere_without_mutating_the_model():
    prob = _ce()
    before = {n: p.detach().clone() for n, p in prob.model.named_parameters()}
    theta = prob.theta + 0.1 * torch.randn(prob.num_params, dtype=torch.float64)
    moved = prob.at(theta)
    for n, p in prob.model.named_parameters():
        assert torch.equal(p, before[n])
    assert torch.equal(prob.theta, prob.flatten(before))
    assert torch.equal(moved.theta, theta)
    # the moved problem's loss is the loss of a model holding theta
    other = _mlp()
    with torch.no_grad():
        for n, p in other.named_parameters():
            p.copy_(moved.unflatten(theta)[n])
    assert moved.loss() == pytest.approx(_ref(nn.CrossEntropyLoss(), other, prob.X, prob.y), rel=1e-13)
    assert moved.loss() != pytest.approx(prob.loss())
    with pytest.raises(ValueError, match="NaN or inf"):
        prob.at(torch.full((prob.num_params,), float("nan"), dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        prob.at(theta[:3])


def test_subset():
    prob = _ce()
    sub = prob.subset(slice(0, 2))
    assert sub.num_samples == 2 and prob.num_samples == N
    assert torch.equal(sub.X, prob.X[:2]) and torch.equal(sub.y, prob.y[:2])
    assert torch.equal(sub.theta, prob.theta)
    assert sub.loss() == pytest.approx(_ref(nn.CrossEntropyLoss(), prob.model, prob.X[:2], prob.y[:2]), rel=1e-13)
    picked = prob.subset([4, 1])
    assert torch.equal(picked.y, prob.y[[4, 1]])
    mse = cl.Problem(_mlp(), nn.MSELoss(), prob.X, torch.randn(N, 4, dtype=torch.float64))
    assert mse.subset(slice(0, 3)).loss_scale == pytest.approx(1 / (3 * 4))
    with pytest.raises(ValueError, match="empty"):
        prob.subset(slice(0, 0))


def test_loss_scale_convention():
    X, Y = torch.randn(N, 3, dtype=torch.float64), torch.randn(N, 4, dtype=torch.float64)
    assert cl.Problem(_mlp(), nn.CrossEntropyLoss(), X, torch.randint(0, 4, (N,))).loss_scale == pytest.approx(1 / N)
    assert cl.Problem(_mlp(), nn.MSELoss(), X, Y).loss_scale == pytest.approx(1 / (4 * N))
    assert cl.Problem(_mlp(), nn.MSELoss(reduction="sum"), X, Y).loss_scale == 1.0


def test_float32_problem_and_data_cast():
    model = _mlp().float()
    X, y = torch.randn(N, 3, dtype=torch.float64), torch.randint(0, 4, (N,))
    prob = cl.Problem(model, nn.CrossEntropyLoss(), X, y)
    assert prob.dtype == torch.float32 and prob.X.dtype == torch.float32 and prob.gradient().dtype == torch.float32


def test_cross_entropy_target_integer_types():
    """Narrow integer class indices are widened to long; bool targets are refused, not crashed on."""
    model = nn.Linear(3, 2).double()
    X = torch.randn(3, 3, dtype=torch.float64)
    prob = cl.Problem(model, nn.CrossEntropyLoss(), X, torch.tensor([0, 1, 1], dtype=torch.int32))
    assert prob.y.dtype == torch.long
    with torch.no_grad():
        assert prob.loss() == pytest.approx(float(nn.CrossEntropyLoss()(model(X), prob.y)))
    with pytest.raises(TypeError, match="torch.long"):
        cl.Problem(model, nn.CrossEntropyLoss(), X, torch.tensor([True, False, True]))
