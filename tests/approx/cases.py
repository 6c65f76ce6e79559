"""Small float64 problems for the KFAC family, including the regimes where KFAC is exact."""

from __future__ import annotations

import torch
from torch import nn

import curvlab as cl


def _data(n: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=torch.float64)


def _labels(n: int, c: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, c, (n,), generator=g)


def _init(model: nn.Module, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return model.double().eval()


def mlp(n: int = 16, loss: str = "ce", reduction: str = "mean", bias: bool = True, seed: int = 0,
        identical: bool = False, partition: str = "module") -> cl.Problem:
    """tanh MLP 6-5-4-3; ``identical``: every input is the same vector."""
    model = _init(nn.Sequential(nn.Linear(6, 5, bias=bias), nn.Tanh(), nn.Linear(5, 4, bias=bias), nn.Tanh(),
                                nn.Linear(4, 3, bias=bias)), seed)
    X = _data(n, (6,), seed + 1)
    if identical:
        X = X[:1].expand(n, 6).clone()
    if loss == "ce":
        return cl.Problem(model, nn.CrossEntropyLoss(reduction=reduction), X, _labels(n, 3, seed + 2),
                          partition=partition)
    if loss == "mse":
        return cl.Problem(model, nn.MSELoss(reduction=reduction), X, _data(n, (3,), seed + 2), partition=partition)
    y = (torch.rand(n, 3, generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64) > 0.5).double()
    return cl.Problem(model, nn.BCEWithLogitsLoss(reduction=reduction), X, y, partition=partition)


def deep_linear(n: int = 12, reduction: str = "mean", bias: bool = True, seed: int = 0) -> cl.Problem:
    """A deep linear network with squared error: KFAC-expand (type-2) is exact."""
    model = _init(nn.Sequential(nn.Linear(5, 4, bias=bias), nn.Linear(4, 4, bias=bias), nn.Linear(4, 3, bias=bias)),
                  seed)
    return cl.Problem(model, nn.MSELoss(reduction=reduction), _data(n, (5,), seed + 1), _data(n, (3,), seed + 2))


def shared_expand(n: int = 6, t: int = 5, bias: bool = True, seed: int = 0) -> cl.Problem:
    """Deep linear layers applied per position of (N, T, d) inputs, loss per position: expand is exact."""
    model = _init(nn.Sequential(nn.Linear(4, 3, bias=bias), nn.Linear(3, 2, bias=bias)), seed)
    return cl.Problem(model, nn.MSELoss(), _data(n, (t, 4), seed + 1), _data(n, (t, 2), seed + 2))


def sequence(n: int = 6, t: int = 2, seed: int = 0) -> cl.Problem:
    """A nonlinear per-position MLP on short sequences (N, T, 7) with wide layers: T² (p+q) < T p q."""
    model = _init(nn.Sequential(nn.Linear(7, 8), nn.Tanh(), nn.Linear(8, 3)), seed)
    return cl.Problem(model, nn.MSELoss(), _data(n, (t, 7), seed + 1), _data(n, (t, 3), seed + 2))


class MeanOverPositions(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


def shared_reduce(n: int = 6, t: int = 5, bias: bool = True, seed: int = 0) -> cl.Problem:
    """Linear layer on (N, T, d), positions averaged, then linear + squared error: reduce is exact."""
    model = _init(nn.Sequential(nn.Linear(4, 3, bias=bias), MeanOverPositions(), nn.Linear(3, 2, bias=bias)), seed)
    return cl.Problem(model, nn.MSELoss(), _data(n, (t, 4), seed + 1), _data(n, (2,), seed + 2))


def conv_expand(n: int = 4, seed: int = 0) -> cl.Problem:
    """Linear convolutions whose outputs stay per position (3×3 then 1×1), loss on every output: expand exact."""
    model = _init(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 2, 1), nn.Flatten()), seed)
    X = _data(n, (2, 4, 4), seed + 1)
    return cl.Problem(model, nn.MSELoss(), X, _data(n, (2 * 16,), seed + 2))


def conv_reduce(n: int = 4, seed: int = 0) -> cl.Problem:
    """Linear convolution, global average pooling, linear read-out, squared error: reduce is exact."""
    model = _init(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                nn.Linear(3, 2)), seed)
    return cl.Problem(model, nn.MSELoss(), _data(n, (2, 4, 4), seed + 1), _data(n, (2,), seed + 2))


def cnn(n: int = 5, seed: int = 0, loss: str = "ce") -> cl.Problem:
    """A nonlinear CNN with stride, dilation-free padding, bias and no bias: the general case."""
    model = _init(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 4, 2, stride=2, bias=False),
                                nn.Tanh(), nn.Flatten(), nn.Linear(16, 3)), seed)
    X = _data(n, (2, 4, 4), seed + 1)
    if loss == "ce":
        return cl.Problem(model, nn.CrossEntropyLoss(), X, _labels(n, 3, seed + 2))
    return cl.Problem(model, nn.MSELoss(reduction="sum"), X, _data(n, (3,), seed + 2))


def exact_of(prob: cl.Problem, fisher: str, mc_samples: int = 1, seed: int = 0) -> cl.CurvatureMatrix:
    """The oracle block matrix that a ``fisher`` type approximates (same samples for ``mc``)."""
    if fisher == "type2":
        return cl.exact.ggn(prob, structure="block")
    if fisher == "mc":
        return cl.exact.fisher_mc(prob, structure="block", samples=mc_samples, seed=seed)
    return cl.exact.empirical_fisher(prob, structure="block")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b|."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))
