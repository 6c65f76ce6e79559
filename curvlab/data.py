"""Small real data sets that ship with scikit-learn (nothing is downloaded).

* :func:`digits`   — 1,797 handwritten digits, 8×8 grey levels 0…16, ten classes
  (scikit-learn's copy of the test set of the UCI "Optical Recognition of Handwritten Digits").
* :func:`diabetes` — 442 patients, ten baseline variables, a disease-progression target one year on
  (Efron, Hastie, Johnstone & Tibshirani 2004, "Least Angle Regression").
* :func:`split`    — a seeded train/test split of any (X, y).

Every loader takes a fixed-seed permutation of the whole set and keeps its first ``n`` samples, so
``n`` grows a nested family of subsets for one seed. Standardisation uses the statistics of exactly
the samples returned (population standard deviation); a column that is constant on them becomes 0.
``data/README.md`` says where each set comes from and under which licence.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["DATASETS", "digits", "diabetes", "split", "Split"]

#: Provenance of every data set this module loads (also written out in ``data/README.md``).
DATASETS: dict[str, dict[str, Any]] = {
    "digits": {
        "samples": 1797,
        "features": 64,
        "task": "classification, 10 classes",
        "loader": "sklearn.datasets.load_digits",
        "origin": "UCI Machine Learning Repository, 'Optical Recognition of Handwritten Digits' "
                  "(Alpaydin & Kaynak, 1998), test set",
        "licence": "CC BY 4.0 (UCI); redistributed inside scikit-learn (BSD-3-Clause)",
    },
    "diabetes": {
        "samples": 442,
        "features": 10,
        "task": "regression, 1 target",
        "loader": "sklearn.datasets.load_diabetes",
        "origin": "Efron, Hastie, Johnstone & Tibshirani (2004), 'Least Angle Regression', "
                  "Annals of Statistics 32(2)",
        "licence": "no licence stated by the authors; redistributed inside scikit-learn (BSD-3-Clause)",
    },
}

_SCALES = ("standardize", "unit")


class Split(NamedTuple):
    """A train/test split: ``X_train, y_train, X_test, y_test``."""

    X_train: Tensor
    y_train: Tensor
    X_test: Tensor
    y_test: Tensor


@functools.cache
def _raw(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Return the bundled arrays, read once per process and marked read-only (callers index copies out)."""
    from sklearn import datasets

    if name == "digits":
        bunch = datasets.load_digits()
    elif name == "diabetes":
        bunch = datasets.load_diabetes(scaled=False)
    else:  # pragma: no cover - internal
        raise ValueError(f"unknown data set {name!r}")
    X = np.asarray(bunch.data, dtype=np.float64)
    y = np.asarray(bunch.target)
    X.setflags(write=False)
    y.setflags(write=False)
    return X, y


def _check_dtype(dtype: torch.dtype) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch dtype such as torch.float64; got {dtype!r}")


def _indices(name: str, n: int | None, seed: int) -> np.ndarray:
    """Return the first n entries of the data set's permutation for ``seed``."""
    total = DATASETS[name]["samples"]
    if n is None:
        n = total
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"n must be an integer or None; got {n!r}")
    if n < 1:
        raise ValueError(f"n must be at least 1; got {n}")
    if n > total:
        raise ValueError(f"n={n} exceeds the size of the {name} data set: at most n={total}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer; got {seed!r}")
    # The legacy RandomState stream is frozen by NumPy's compatibility policy: same seed, same subset.
    return np.random.RandomState(int(seed)).permutation(total)[: int(n)]


def _standardize(a: np.ndarray) -> np.ndarray:
    """Return (a − mean) / std per column; constant columns become 0."""
    mean = a.mean(axis=0)
    std = a.std(axis=0)
    return (a - mean) / np.where(std > 0, std, 1.0)


def digits(n: int | None = None, seed: int = 0, dtype: torch.dtype = torch.float64,
           scale: str = "standardize", images: bool = False) -> tuple[Tensor, Tensor]:
    """Return the handwritten-digits set: inputs and integer labels 0…9.

    Parameters
    ----------
    n:
        number of samples (``None``: all 1,797), the first ``n`` of a permutation fixed by ``seed``.
    scale:
        ``"standardize"`` (zero mean, unit variance per pixel over the returned samples; pixels
        constant on them stay 0) or ``"unit"`` (grey levels divided by 16, in [0, 1]).
    images:
        ``False``: X of shape (n, 64); ``True``: X of shape (n, 1, 8, 8) (row-major pixels).

    Returns
    -------
    X (floating, ``dtype``) and y (``torch.long``, shape (n,)).
    """
    _check_dtype(dtype)
    if scale not in _SCALES:
        raise ValueError(f"unknown scale {scale!r}: use one of {_SCALES}")
    idx = _indices("digits", n, seed)
    X_all, y_all = _raw("digits")
    X, y = X_all[idx], y_all[idx]
    X = _standardize(X) if scale == "standardize" else X / 16.0
    X_t = torch.as_tensor(X, dtype=dtype)
    if images:
        X_t = X_t.reshape(-1, 1, 8, 8)
    return X_t, torch.as_tensor(y, dtype=torch.long)


def diabetes(n: int | None = None, seed: int = 0, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Return the diabetes regression set: standardised inputs (n, 10) and standardised target (n, 1).

    Inputs and target are standardised with the statistics of the returned samples, so a model
    predicting 0 has mean squared error exactly 1. ``n``, ``seed`` as in :func:`digits`.
    """
    _check_dtype(dtype)
    idx = _indices("diabetes", n, seed)
    X_all, y_all = _raw("diabetes")
    X = _standardize(X_all[idx])
    y = _standardize(y_all[idx].astype(np.float64)[:, None])
    return torch.as_tensor(X, dtype=dtype), torch.as_tensor(y, dtype=dtype)


def split(X: Tensor, y: Tensor, test: int | float = 0.2, seed: int = 0) -> Split:
    """Return a seeded random split into train and test parts.

    ``test`` is the number of test samples (int) or their fraction in (0, 1) (float, rounded to
    the nearest count); both parts keep at least one sample.
    """
    if X.shape[0] != y.shape[0]:
        raise ValueError(f"X and y must have the same number of samples; got {X.shape[0]} and {y.shape[0]}")
    total = X.shape[0]
    if isinstance(test, bool):
        raise TypeError(f"test must be an int count or a float fraction; got {test!r}")
    if isinstance(test, float):
        if not 0.0 < test < 1.0:
            raise ValueError(f"a test fraction must lie in (0, 1); got {test}")
        n_test = int(round(test * total))
    elif isinstance(test, (int, np.integer)):
        n_test = int(test)
    else:
        raise TypeError(f"test must be an int count or a float fraction; got {test!r}")
    if not 1 <= n_test <= total - 1:
        raise ValueError(f"the split leaves {n_test} test and {total - n_test} training samples of "
                         f"{total}; each part needs at least one")
    perm = torch.as_tensor(np.random.RandomState(int(seed)).permutation(total), device=X.device)
    te, tr = perm[:n_test], perm[n_test:]
    return Split(X[tr], y[tr], X[te], y[te])
