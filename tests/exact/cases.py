"""Small architectures × losses for checking the oracle against the naive references."""

from __future__ import annotations

import torch
from torch import nn


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 4)
        self.inner = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = h + torch.sin(self.inner(h))
        return self.out(h)


class Tied(nn.Module):
    """One Linear layer applied twice: not a single-use layer, handled generically."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 4)
        self.shared = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(h))
        h = torch.tanh(self.shared(h))
        return self.out(h)


def _frozen():
    m = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    m[0].bias.requires_grad_(False)
    return m


# name -> (builder, input shape per sample, outputs per sample)
ARCHS = {
    "mlp": (lambda: nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)), (5,)),
    "mlp-nobias": (lambda: nn.Sequential(nn.Linear(5, 4, bias=False), nn.Sigmoid(), nn.Linear(4, 3)), (5,)),
    "cnn": (lambda: nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 2, 2, stride=2),
                                  nn.Tanh(), nn.Flatten(), nn.Linear(8, 3)), (1, 4, 4)),
    "cnn-pool": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3, bias=False), nn.Sigmoid(), nn.AvgPool2d(2),
                                       nn.Flatten(), nn.Linear(3, 3)), (2, 4, 4)),
    "batchnorm-eval": (lambda: nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Tanh(),
                                             nn.Linear(4, 3)).eval(), (5,)),
    "layernorm": (lambda: nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 3)), (5,)),
    "sequence": (lambda: nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3)), (2, 5)),
    "residual": (Residual, (5,)),
    "tied": (Tied, (5,)),
    "frozen-bias": (_frozen, (5,)),
}

LOSSES = ("ce", "mse", "bce")
REDUCTIONS = ("mean", "sum")


def make(arch: str, loss: str, reduction: str, n: int = 6, seed: int = 0):
    """A float64 problem: model, loss_fn, X, y."""
    builder, in_shape = ARCHS[arch]
    torch.manual_seed(seed)
    model = builder().double()
    if any(isinstance(m, nn.BatchNorm1d) for m in model.modules()):
        bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm1d))
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    X = torch.randn(n, *in_shape, dtype=torch.float64)
    if loss == "ce":
        return model, nn.CrossEntropyLoss(reduction=reduction), X, torch.randint(0, 3, (n,))
    if loss == "mse":
        return model, nn.MSELoss(reduction=reduction), X, torch.randn(n, 3, dtype=torch.float64)
    return model, nn.BCEWithLogitsLoss(reduction=reduction), X, torch.rand(n, 3, dtype=torch.float64)
