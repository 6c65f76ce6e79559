"""The memory budget: estimate the bytes of a dense result before allocating it, and refuse early.

The budget defaults to 4 GiB (or the ``CURVLAB_MAX_DENSE_BYTES`` environment variable) and is
changed with :func:`set_budget` or temporarily with the :func:`budget` context manager.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

__all__ = ["MemoryBudgetError", "get_budget", "set_budget", "budget", "check", "nbytes"]

_DEFAULT = int(os.environ.get("CURVLAB_MAX_DENSE_BYTES", 4 * 2**30))
_budget = _DEFAULT


class MemoryBudgetError(MemoryError):
    """A dense result would exceed the configured memory budget."""


def get_budget() -> int:
    """The current budget in bytes."""
    return _budget


def set_budget(num_bytes: int) -> None:
    """Set the budget (bytes) for any single dense allocation curvlab makes."""
    global _budget
    if num_bytes <= 0:
        raise ValueError(f"the memory budget must be positive; got {num_bytes}")
    _budget = int(num_bytes)


@contextlib.contextmanager
def budget(num_bytes: int) -> Iterator[None]:
    """Temporarily change the budget: ``with curvlab.memory.budget(2**30): ...``."""
    old = _budget
    set_budget(num_bytes)
    try:
        yield
    finally:
        set_budget(old)


def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
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
    if need > _budget:
        hint = hint or ('use structure="block" or "diag", or the matrix-free products '
                        "(curvlab.exact.*_vp, C.as_linear_operator())")
        raise MemoryBudgetError(
            f"{what} would need {_fmt(need)} as a dense {tuple(shape)} {str(dtype).replace('torch.', '')} "
            f"tensor, over the memory budget of {_fmt(_budget)}: {hint}; or raise the budget with "
            "curvlab.memory.set_budget(bytes)")
