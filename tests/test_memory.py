"""The memory budget: sizes with units, the environment variable read lazily, one-line refusals."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from curvlab import memory

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("text, expected", [
    ("1e9", 10**9), ("4GB", 4 * 10**9), ("4gb", 4 * 10**9), ("512MiB", 512 * 2**20), ("2 GiB", 2 * 2**30),
    ("1.5GiB", 3 * 2**29), ("64KB", 64_000), ("64KiB", 65_536), ("4096", 4096), ("4096B", 4096), ("1TiB", 2**40),
    (4096, 4096), (1e9, 10**9), (10**30, 10**30),
])
def test_sizes_with_units(text, expected):
    assert memory.parse_size(text) == expected


@pytest.mark.parametrize("text, message", [
    ("abc", "is not a size"), ("4 parsecs", "is not a size"), ("", "is not a size"), ("inf", "is not a size"),
    ("-5", "positive"), ("0", "positive"), ("0.2", "positive"), ("1e400", "finite"), (-5, "positive"),
    (float("nan"), "finite"),
])
def test_nonsense_sizes_are_refused(text, message):
    with pytest.raises(ValueError, match=message):
        memory.parse_size(text, what="X")
    with pytest.raises(ValueError, match="memory budget"):
        memory.set_budget(text)


def test_types_are_checked():
    with pytest.raises(TypeError):
        memory.parse_size(True)
    with pytest.raises(TypeError):
        memory.set_budget(None)


@pytest.mark.parametrize("value, expected", [("1e9", 10**9), ("4GB", 4 * 10**9), ("512MiB", 2**29), (None, 4 * 2**30)])
def test_environment_variable_is_read_on_first_use(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv(memory.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(memory.ENV_VAR, value)
    monkeypatch.setattr(memory, "_budget", None)  # as after import: not read yet
    assert memory.get_budget() == expected


@pytest.mark.parametrize("value", ["abc", "-5", "0"])
def test_bad_environment_variable_names_itself(monkeypatch, value):
    monkeypatch.setenv(memory.ENV_VAR, value)
    monkeypatch.setattr(memory, "_budget", None)
    with pytest.raises(ValueError, match=f"environment variable {memory.ENV_VAR}='{value}'"):
        memory.check((10,), torch.float64, "a vector")
    memory.set_budget("1GiB")  # an explicit budget needs no environment
    assert memory.get_budget() == 2**30


def test_budget_context_and_check(monkeypatch):
    monkeypatch.setattr(memory, "_budget", 2**30)
    with memory.budget("1KiB"):
        assert memory.get_budget() == 1024
        memory.check((128,), torch.float64, "x")  # exactly 1 KiB fits
        with pytest.raises(memory.MemoryBudgetError, match=r"x would need 1\.0 KiB.*budget of 1\.0 KiB"):
            memory.check((129,), torch.float64, "x")
    assert memory.get_budget() == 2**30


def test_bad_environment_variable_does_not_break_import_or_help():
    """Import and ``--help`` work; a command fails with one line naming the variable, status 2."""
    env = {**os.environ, memory.ENV_VAR: "abc", "PYTHONPATH": str(ROOT)}
    code = ("import curvlab, sys; from curvlab.cli import main; assert main(['--help']) == 0; "
            "sys.exit(main(['problems']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"curvlab problems: error: the environment variable {memory.ENV_VAR}='abc' is not a size: use a number "
        "of bytes with an optional unit B, KB, MB, GB, KiB, MiB, GiB (e.g. 4GB, 512MiB, 1e9)"]
    assert "usage: curvlab" in done.stdout
