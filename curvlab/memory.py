"""The memory budget: estimate the bytes of a dense result before allocating it, and refuse early.

The budget defaults to 4 GiB, or to the ``CURVLAB_MAX_DENSE_BYTES`` environment variable, read on
first use (not at import, so that a bad value cannot break ``import curvlab``): a size with an
optional unit, ``4GB``, ``512MiB``, ``1e9``, ``2 GiB`` (see :func:`parse_size`). It is changed with
:func:`set_budget` or temporarily with the :func:`budget` context manager.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Iterator

import torch

__all__ = ["MemoryBudgetError", "get_budget", "set_budget", "budget", "check", "nbytes", "parse_size",
           "ENV_VAR", "DEFAULT_BUDGET"]

#: the environment variable that sets the initial budget
ENV_VAR = "CURVLAB_MAX_DENSE_BYTES"
#: the budget when the environment variable is not set (bytes)
DEFAULT_BUDGET = 4 * 2**30

#: unit → bytes; decimal (kB = 1000 B) and binary (KiB = 1024 B), case-insensitive
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*([+-]?[0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?|[0-9]+\.)\s*([a-z]*)\s*$", re.IGNORECASE)

_budget: int | None = None  # None: not read from the environment yet


class MemoryBudgetError(MemoryError):
    """A dense result would exceed the configured memory budget."""


def parse_size(text: str | int | float, what: str = "size") -> int:
    """Bytes from a size such as ``4GB``, ``512MiB``, ``1e9``, ``1.5 GiB`` or ``4096`` (an int passes).

    Units (case-insensitive): B, KB/MB/GB/TB (powers of 1000; K/M/G/T alone too) and
    KiB/MiB/GiB/TiB (powers of 1024). The result must be a positive whole number of bytes
    (fractions are rounded); anything else raises ``ValueError`` naming ``what`` and the value.
    """
    if isinstance(text, bool):
        raise TypeError(f"{what} must be a number of bytes or a size such as '4GB'; got {text!r}")
    if isinstance(text, int):
        if text < 1:
            raise ValueError(f"{what}={text!r} must be a positive number of bytes (e.g. 4GB, 512MiB, 1e9)")
        return int(text)
    if isinstance(text, float):
        value = text
    elif isinstance(text, str):
        m = _SIZE.match(text)
        if m is None or m.group(2).lower() not in _UNITS:
            raise ValueError(f"{what}={text!r} is not a size: use a number of bytes with an optional unit "
                             "B, KB, MB, GB, KiB, MiB, GiB (e.g. 4GB, 512MiB, 1e9)")
        value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    else:
        raise TypeError(f"{what} must be a number of bytes or a size such as '4GB'; got {type(text).__name__}")
    if not math.isfinite(value) or round(value) < 1:
        raise ValueError(f"{what}={text!r} must be a positive, finite number of bytes (e.g. 4GB, 512MiB, 1e9)")
    return int(round(value))


def _from_environment() -> int:
    text = os.environ.get(ENV_VAR)
    if text is None or not text.strip():
        return DEFAULT_BUDGET
    return parse_size(text, what=f"the environment variable {ENV_VAR}")


def get_budget() -> int:
    """Return the current budget in bytes (read from ``CURVLAB_MAX_DENSE_BYTES`` on first use).

    Raises ``ValueError`` naming the variable when it holds something that is not a size.
    """
    global _budget
    if _budget is None:
        _budget = _from_environment()
    return _budget


def set_budget(num_bytes: int | float | str) -> None:
    """Set the budget for any single dense allocation curvlab makes: bytes, or a size such as ``"4GB"``."""
    global _budget
    _budget = parse_size(num_bytes, what="the memory budget")


@contextlib.contextmanager
def budget(num_bytes: int | float | str) -> Iterator[None]:
    """Temporarily change the budget: ``with curvlab.memory.budget("1GiB"): ...``."""
    global _budget
    old = _budget
    set_budget(num_bytes)
    try:
        yield
    finally:
        _budget = old


def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Return the bytes of a tensor of ``shape`` and ``dtype`` (Π shape · element size)."""
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


def _fmt(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if b < 1024 or unit == "TiB":
            return f"{b:.1f} {unit}"
        b /= 1024
    return f"{b:.1f} TiB"  # pragma: no cover


def check(shape: tuple[int, ...], dtype: torch.dtype, what: str, hint: str | None = None) -> None:
    """Raise :class:`MemoryBudgetError` if a tensor of ``shape`` and ``dtype`` exceeds the budget."""
    need = nbytes(shape, dtype)
    limit = get_budget()
    if need > limit:
        hint = hint or ('use structure="block" or "diag", or the matrix-free products '
                        "(curvlab.exact.*_vp, C.as_linear_operator())")
        raise MemoryBudgetError(
            f"{what} would need {_fmt(need)} as a dense {tuple(shape)} {str(dtype).replace('torch.', '')} "
            f"tensor, over the memory budget of {_fmt(limit)}: {hint}; or raise the budget with "
            "curvlab.memory.set_budget(bytes)")
