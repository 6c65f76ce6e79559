"""Shared set-up of the runner's tests: the toy study, registered, with its call log emptied."""

from __future__ import annotations

import pytest

from tests.studies import toy_study


@pytest.fixture
def toy():
    """The toy study module (``toy.STUDY``, ``toy.CALLS`` emptied before each test)."""
    toy_study.CALLS.clear()
    yield toy_study
    toy_study.CALLS.clear()
