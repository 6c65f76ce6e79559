"""Canned problems: small networks on real bundled data, built identically from a name and a seed.

    prob = curvlab.problems.load("digits-mlp", n=256, seed=0)
    curvlab.problems.names()          # every canned name
    curvlab.problems.describe(name)   # what it is, P, loss, data set

``seed`` fixes both the data subset (see :mod:`curvlab.data`) and the initial parameters
(PyTorch's default initialisation under ``torch.manual_seed(seed)``, drawn in float32 and then
cast, so float32 and float64 problems start at the same point). The global random state is left
untouched. Every model is returned in ``eval()`` mode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from curvlab import data
from curvlab.problem import Problem

__all__ = ["load", "names", "describe", "REGISTRY", "Spec", "DEFAULT_N"]

#: The number of samples :func:`load` takes unless told otherwise.
DEFAULT_N = 256


@dataclass(frozen=True)
class Spec:
    """One canned problem: how to build its model and data, and what to say about it."""

    description: str
    dataset: str
    loss: type[nn.Module]
    model: Callable[[], nn.Module]
    data: Callable[[int, int, torch.dtype], tuple[Tensor, Tensor]]
    architecture: str

    @property
    def max_n(self) -> int:
        """The data set's number of samples, the largest n the problem allows."""
        return int(data.DATASETS[self.dataset]["samples"])


def _mlp(widths: list[int], activation: type[nn.Module] | None) -> nn.Sequential:
    """Linear layers ``widths[0] → … → widths[-1]`` with ``activation`` between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if activation is not None and i < len(widths) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


def _relu_autoencoder() -> nn.Sequential:
    """64-32-16-8-16-32-64, ReLU hidden layers, a linear 8-unit code layer (the K-BFGS papers' design)."""
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8),
                         nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 64))


def _cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 8 * 8, 10),
    )


def _digits_standardized(n: int, seed: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return data.digits(n, seed, dtype, scale="standardize")


def _digits_images(n: int, seed: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return data.digits(n, seed, dtype, scale="standardize", images=True)


def _digits_reconstruction(n: int, seed: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    X, _ = data.digits(n, seed, dtype, scale="unit")
    return X, X.clone()


def _digits_one_hot(n: int, seed: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    X, labels = data.digits(n, seed, dtype, scale="standardize")
    return X, nn.functional.one_hot(labels, 10).to(dtype)


def _diabetes(n: int, seed: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return data.diabetes(n, seed, dtype)


#: name → Spec. Add a problem by adding an entry; everything else (CLI, tests) reads this table.
REGISTRY: dict[str, Spec] = {
    "digits-mlp": Spec(
        description="MLP classifier on standardised digits",
        dataset="digits", loss=nn.CrossEntropyLoss,
        model=lambda: _mlp([64, 32, 32, 10], nn.Tanh), data=_digits_standardized,
        architecture="64-32-32-10, tanh"),
    "digits-mlp-wide": Spec(
        description="wider MLP classifier on standardised digits (benchmark size)",
        dataset="digits", loss=nn.CrossEntropyLoss,
        model=lambda: _mlp([64, 64, 64, 10], nn.Tanh), data=_digits_standardized,
        architecture="64-64-64-10, tanh"),
    "digits-mlp-1m": Spec(
        description="million-parameter MLP classifier on standardised digits (dense matrices refuse; low-rank)",
        dataset="digits", loss=nn.CrossEntropyLoss,
        model=lambda: _mlp([64, 1024, 1024, 10], nn.Tanh), data=_digits_standardized,
        architecture="64-1024-1024-10, tanh"),
    "digits-autoencoder": Spec(
        description="autoencoder reconstructing digit pixels in [0, 1]",
        dataset="digits", loss=nn.BCEWithLogitsLoss,
        model=lambda: _mlp([64, 32, 8, 32, 64], nn.Sigmoid), data=_digits_reconstruction,
        architecture="64-32-8-32-64, sigmoid hidden, linear output"),
    "digits-autoencoder-relu": Spec(
        description="deeper ReLU autoencoder of digit pixels in [0, 1] (the K-BFGS and two-level KFAC studies)",
        dataset="digits", loss=nn.BCEWithLogitsLoss,
        model=_relu_autoencoder, data=_digits_reconstruction,
        architecture="64-32-16-8-16-32-64, relu hidden, linear code and output"),
    "digits-mlp-deep": Spec(
        description="four-layer MLP classifier on standardised digits (L = 4 layers)",
        dataset="digits", loss=nn.CrossEntropyLoss,
        model=lambda: _mlp([64, 32, 32, 32, 10], nn.Tanh), data=_digits_standardized,
        architecture="64-32-32-32-10, tanh"),
    "digits-cnn": Spec(
        description="small CNN classifier on 8x8 digit images",
        dataset="digits", loss=nn.CrossEntropyLoss,
        model=_cnn, data=_digits_images,
        architecture="conv3x3(1→8)-relu-conv3x3(8→8)-relu-linear(512→10)"),
    "deep-linear": Spec(
        description="deep linear network regressing one-hot labels (KFAC is exact)",
        dataset="digits", loss=nn.MSELoss,
        model=lambda: _mlp([64, 16, 16, 10], None), data=_digits_one_hot,
        architecture="64-16-16-10, no activations"),
    "diabetes-mlp": Spec(
        description="small MLP regression on standardised diabetes data",
        dataset="diabetes", loss=nn.MSELoss,
        model=lambda: _mlp([10, 16, 1], nn.Tanh), data=_diabetes,
        architecture="10-16-1, tanh"),
}


def names() -> list[str]:
    """Return the canned problem names, in registry order."""
    return list(REGISTRY)


def _spec(name: str) -> Spec:
    if not isinstance(name, str) or name not in REGISTRY:
        raise ValueError(f"unknown problem {name!r}; valid names: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def _build_model(spec: Spec, seed: int, dtype: torch.dtype) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = spec.model()
    return model.to(dtype).eval()


def load(name: str, n: int | None = DEFAULT_N, seed: int = 0, dtype: torch.dtype = torch.float64) -> Problem:
    """Build the canned problem ``name`` on ``n`` samples (``None``: the whole data set).

    Raises ``ValueError`` for an unknown name (listing the valid ones) or an ``n`` larger than the
    data set (naming the maximum).
    """
    spec = _spec(name)
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64; got {dtype!r}")
    X, y = spec.data(n, seed, dtype)
    model = _build_model(spec, seed, dtype)
    meta = {"dataset": spec.dataset, "n": int(X.shape[0]), "seed": int(seed),
            "architecture": spec.architecture, "description": spec.description}
    return Problem(model, spec.loss(), X, y, name=name, meta=meta)


def describe(name: str) -> dict[str, Any]:
    """Return what the canned problem ``name`` is: description, architecture, loss, data set, P, default and max n."""
    spec = _spec(name)
    model = _build_model(spec, 0, torch.float32)
    return {
        "name": name,
        "description": spec.description,
        "architecture": spec.architecture,
        "loss": f"{spec.loss.__name__}(mean)",
        "dataset": spec.dataset,
        "num_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "n_default": min(DEFAULT_N, spec.max_n),
        "n_max": spec.max_n,
    }
