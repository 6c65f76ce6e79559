"""The shared study-configuration validators refuse bad values by name, and accept the studies' own."""

import pytest

import curvlab.studies as studies
from curvlab.studies import checks


@pytest.mark.parametrize("name", ["kfac-vs-newton", "trace-restricted"])
@pytest.mark.parametrize("quick", [False, True])
def test_the_studies_configurations_pass(name, quick):
    config = studies.get(name).resolve(quick=quick)  # runs the study's check
    checks.canned_problem(config)
    checks.distinct_steps(config)
    checks.positive_numbers(config, "damping")


@pytest.mark.parametrize("check, key, value", [
    (lambda c: checks.canned_problem(c, "p"), "p", "mnist"),
    (lambda c: checks.positive_integers(c, ["p"]), "p", 0),
    (lambda c: checks.positive_integers(c, ["p"]), "p", 2.0),
    (lambda c: checks.positive_integers(c, ["p"]), "p", True),
    (lambda c: checks.non_negative_integers(c, ["p"]), "p", -1),
    (lambda c: checks.distinct_steps(c, "p"), "p", []),
    (lambda c: checks.distinct_steps(c, "p"), "p", [0, 5, 5]),
    (lambda c: checks.distinct_steps(c, "p"), "p", [-1]),
    (lambda c: checks.positive_numbers(c, "p"), "p", [1e-3, 0.0]),
    (lambda c: checks.positive_numbers(c, "p"), "p", "0.1"),
])
def test_bad_values_are_refused_by_name(check, key, value):
    with pytest.raises(ValueError, match=key) as info:
        check({key: value})
    assert repr(value) in str(info.value)


@pytest.mark.parametrize("name, key, value", [
    ("kfac-vs-newton", "inverse_period", 0), ("kfac-vs-newton", "checkpoints", [3, 3]),
    ("trace-restricted", "train_seeds", -1), ("trace-restricted", "damping", [0.1, -1.0]),
])
def test_prepare_refuses_before_running(name, key, value, tmp_path):
    with pytest.raises(ValueError, match=key):
        studies.prepare(name, quick=True, out=tmp_path, **{key: value})
