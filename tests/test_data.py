"""curvlab.data: bundled digits and diabetes sets — shapes, scaling, seeded nested subsets, splits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_diabetes, load_digits

from curvlab import data


def test_digits_unit_scale_is_raw_over_16_in_seeded_order():
    X, y = data.digits(50, seed=3, scale="unit")
    raw = load_digits()
    idx = np.random.RandomState(3).permutation(1797)[:50]
    torch.testing.assert_close(X, torch.as_tensor(raw.data[idx] / 16.0), rtol=0, atol=0)
    assert torch.equal(y, torch.as_tensor(raw.target[idx]))
    assert X.dtype == torch.float64 and y.dtype == torch.long
    assert float(X.min()) >= 0.0 and float(X.max()) <= 1.0


def test_digits_standardized_uses_the_returned_samples():
    X, _ = data.digits(100, seed=0)
    assert X.shape == (100, 64)
    std = X.std(dim=0, unbiased=False)
    constant = std == 0
    assert bool(constant.any()), "some border pixels are constant on 100 digits"
    assert bool((X[:, constant] == 0).all())
    torch.testing.assert_close(X.mean(dim=0), torch.zeros(64, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(std[~constant], torch.ones(int((~constant).sum()), dtype=torch.float64))


def test_digits_images_are_the_flat_pixels_reshaped():
    X, y = data.digits(20, seed=1)
    imgs, y2 = data.digits(20, seed=1, images=True)
    assert imgs.shape == (20, 1, 8, 8)
    assert torch.equal(imgs.reshape(20, 64), X) and torch.equal(y, y2)
    # row-major pixels: the same 8×8 layout as sklearn's images array
    images, _ = data.digits(20, seed=1, scale="unit", images=True)
    idx = np.random.RandomState(1).permutation(1797)[:20]
    torch.testing.assert_close(images[:, 0], torch.as_tensor(load_digits().images[idx] / 16.0), rtol=0, atol=0)


def test_subsets_are_nested_and_seeded():
    Xa, ya = data.digits(30, seed=5, scale="unit")
    Xb, yb = data.digits(60, seed=5, scale="unit")
    assert torch.equal(Xa, Xb[:30]) and torch.equal(ya, yb[:30])
    Xc, _ = data.digits(30, seed=6, scale="unit")
    assert not torch.equal(Xa, Xc)
    X_all, y_all = data.digits(None)
    assert X_all.shape == (1797, 64) and set(y_all.tolist()) == set(range(10))


def test_dtype_float32():
    X, y = data.digits(10, dtype=torch.float32)
    assert X.dtype == torch.float32 and y.dtype == torch.long
    Xd, yd = data.diabetes(10, dtype=torch.float32)
    assert Xd.dtype == yd.dtype == torch.float32


@pytest.mark.parametrize("kwargs, error, message", [
    ({"n": 1798}, ValueError, "at most n=1797"),
    ({"n": 0}, ValueError, "at least 1"),
    ({"n": 2.5}, TypeError, "integer"),
    ({"scale": "minmax"}, ValueError, "unknown scale 'minmax'"),
    ({"dtype": torch.long}, TypeError, "floating"),
    ({"seed": -1}, ValueError, "seed"),
])
def test_digits_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        data.digits(**kwargs)


def test_diabetes_standardized_inputs_and_target():
    X, y = data.diabetes(200, seed=2)
    assert X.shape == (200, 10) and y.shape == (200, 1)
    torch.testing.assert_close(X.mean(0), torch.zeros(10, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(X.std(0, unbiased=False), torch.ones(10, dtype=torch.float64))
    assert float(y.mean()) == pytest.approx(0.0, abs=1e-12)
    assert float(y.std(unbiased=False)) == pytest.approx(1.0)
    raw = load_diabetes(scaled=False)
    idx = np.random.RandomState(2).permutation(442)[:200]
    t = raw.target[idx]
    torch.testing.assert_close(y[:, 0], torch.as_tensor((t - t.mean()) / t.std()))
    with pytest.raises(ValueError, match="at most n=442"):
        data.diabetes(443)


def test_split():
    X, y = data.digits(100, seed=0)
    s = data.split(X, y, test=0.25, seed=1)
    assert s.X_train.shape == (75, 64) and s.X_test.shape == (25, 64)
    assert s.y_train.shape == (75,) and s.y_test.shape == (25,)
    together = torch.cat([s.X_train, s.X_test])
    assert sorted(map(tuple, together.tolist())) == sorted(map(tuple, X.tolist()))
    assert torch.equal(data.split(X, y, test=25, seed=1).X_test, s.X_test)
    assert not torch.equal(data.split(X, y, test=25, seed=2).X_test, s.X_test)
    for bad in (0, 100, 1.0, 0.0):
        with pytest.raises(ValueError, match="test"):
            data.split(X, y, test=bad)
    with pytest.raises(ValueError, match="same number"):
        data.split(X, y[:-1])


def test_provenance_table_covers_every_loader():
    assert set(data.DATASETS) == {"digits", "diabetes"}
    for info in data.DATASETS.values():
        assert {"origin", "licence", "loader", "samples"} <= set(info)
