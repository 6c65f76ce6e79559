"""Validation of study configurations shared by the canned studies.

Each function raises ``ValueError`` naming the key and the offending value, before any cell runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def canned_problem(config: Mapping[str, Any], key: str = "problem") -> None:
    """Check that ``config[key]`` names a canned problem (``curvlab.problems.names()``)."""
    import curvlab as cl

    if config[key] not in cl.problems.names():
        raise ValueError(f"{key} {config[key]!r} is not a canned problem; valid: {cl.problems.names()}")


def positive_integers(config: Mapping[str, Any], keys: Iterable[str]) -> None:
    """Check that every ``config[key]`` is an integer ≥ 1."""
    for key in keys:
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive integer; got {value!r}")


def non_negative_integers(config: Mapping[str, Any], keys: Iterable[str]) -> None:
    """Check that every ``config[key]`` is an integer ≥ 0 (``threads``: 0 leaves torch's setting)."""
    for key in keys:
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{key} must be an integer ≥ 0; got {value!r}")


def distinct_steps(config: Mapping[str, Any], key: str = "checkpoints") -> None:
    """Check that ``config[key]`` is a non-empty list of distinct integer steps ≥ 0."""
    steps = config[key]
    if (not isinstance(steps, list) or not steps or len(set(steps)) != len(steps)
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in steps)):
        raise ValueError(f"{key} must be a non-empty list of distinct steps ≥ 0; got {steps!r}")


def positive_numbers(config: Mapping[str, Any], key: str) -> None:
    """Check that ``config[key]`` is a non-empty list of numbers > 0 (a damping or learning-rate grid)."""
    values = config[key]
    if (not isinstance(values, list) or not values
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 for v in values)):
        raise ValueError(f"{key} must be a non-empty list of numbers > 0; got {values!r}")
