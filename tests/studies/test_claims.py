"""The verdict table is computed from the data: change the data and the verdict follows."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import curvlab as cl


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    from tests.studies import toy_study  # noqa: F401  (registers the toy)

    return cl.studies.run("toy", out=tmp_path_factory.mktemp("claims"), progress=False)


def _steps_in_a(mean: np.ndarray) -> float:
    """min over b of mean[a+1, b] − mean[a, b] (the toy's claim T1, recomputed with NumPy)."""
    return float(np.min(mean[1:] - mean[:-1]))


def test_the_stored_verdicts_are_the_claims_on_the_data(ds):
    assert ds["claim"].values.tolist() == ["T1", "T2"]
    mean, y = ds["mean"].values, ds["y"].values
    np.testing.assert_allclose(ds["claim_value"].values, [_steps_in_a(mean), y.max()], rtol=1e-15)
    assert ds["claim_holds"].values.tolist() == [_steps_in_a(mean) > 0, bool(y.max() <= 10)] == [True, False]
    assert ds["claim_value"].dtype == np.float64 and ds["claim_holds"].dtype == bool
    assert ds.attrs["claim_T1_statement"] == "the mean of y grows with a"
    assert ds.attrs["claim_T2_criterion"] == "max of y ≤ 10"
    assert ds["claim_criterion"].values.tolist() == [c.criterion for c in cl.studies.get("toy").claims]


def test_changing_the_data_changes_the_verdicts(ds):
    flipped = ds.copy()
    flipped["mean"] = -ds["mean"]
    flipped["y"] = ds["y"] / 10
    again = cl.studies.verdicts(flipped)
    assert again["claim_holds"].values.tolist() == [False, True]
    expected = [_steps_in_a(-ds["mean"].values), ds["y"].values.max() / 10]
    np.testing.assert_allclose(again["claim_value"].values, expected, rtol=1e-15)
    # the verdicts of the unchanged data are those stored
    np.testing.assert_array_equal(cl.studies.verdicts(ds)["claim_value"].values, ds["claim_value"].values)


def test_a_claim_that_cannot_be_decided_does_not_hold_and_says_why(ds):
    claims = [cl.studies.Claim("E1", "divides by zero", "never", lambda d: (1 / 0, True)),
              cl.studies.Claim("E2", "returns a float for holds", "never", lambda d: (1.0, 1.0)),
              cl.studies.Claim("E3", "measures NaN", "never", lambda d: (float("nan"), True))]
    study = dataclasses.replace(cl.studies.get("toy"), claims=claims)
    out = cl.studies.verdicts(ds, study=study)
    assert out["claim"].values.tolist() == ["E1", "E2", "E3"]
    assert out["claim_holds"].values.tolist() == [False, False, False]
    assert "ZeroDivisionError" in out.attrs["claim_E1_error"]
    assert "second item is float" in out.attrs["claim_E2_error"]
    assert out.attrs["claim_E3_error"] == "the measured value is NaN"
    assert "claim_T1_statement" not in out.attrs  # the earlier table is replaced, not mixed in
    table = cl.studies.format_verdicts(out)
    assert [line.split()[:2] for line in table.splitlines()[2:5]] == [["E1", "error"], ["E2", "error"], ["E3", "no"]]


def test_the_printed_table(ds):
    lines = cl.studies.format_verdicts(ds).splitlines()
    assert lines[0].split() == ["claim", "holds", "value", "statement", "criterion"]
    assert lines[2].split()[:3] == ["T1", "yes", f"{float(ds['claim_value'][0]):.4g}"]
    assert lines[3].split()[:3] == ["T2", "no", f"{float(ds['claim_value'][1]):.4g}"]
