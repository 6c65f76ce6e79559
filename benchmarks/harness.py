"""Shared timing harness for curvlab's benchmarks: medians, one-gradient unit, matmul floor, peak memory.

Conventions (the same as ``shared/reference/peer-benchmarks.md`` so figures compare):
* every figure is the median of ``repeats`` timed runs after one warm-up run;
* the unit is one plain gradient of the whole batch (median of 50);
* the machine's floor is a flop count divided by the float matmul rate measured in the same run;
* peak extra memory is VmHWM − VmRSS around one run (the result included), measured by resetting
  the high-water mark through /proc/self/clear_refs; benchmarks warm every method up once first,
  so that one-time allocations of the process are charged to none of them;
* glibc keeps freed memory for reuse (``MALLOC_MMAP_MAX_=0``, large ``MALLOC_TRIM_THRESHOLD_``),
  set by :func:`reexec_with_heap_reuse` before torch allocates anything.
"""

from __future__ import annotations

import ctypes
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

HEAP_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(64 * 2**30)}


def reexec_with_heap_reuse() -> None:
    """Restart the interpreter once with the allocator settings above (no-op if already set)."""
    if all(os.environ.get(k) == v for k, v in HEAP_ENV.items()):
        return
    os.environ.update(HEAP_ENV)
    os.execv(sys.executable, [sys.executable, *sys.argv])


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # pragma: no cover - not glibc
        pass


def peak_extra_memory(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run fn once; return (its result, peak resident bytes above the starting point)."""
    _trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # pragma: no cover - no permission: fall back to the process-wide peak
        pass
    base = _status("VmRSS:")
    out = fn()
    return out, max(0, _status("VmHWM:") - base)


def median_time(fn: Callable[[], Any], repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def gradient_time(prob) -> float:
    """Median seconds of one plain gradient over the whole batch (the unit)."""
    prob.gradient()
    return median_time(prob.gradient, 50)


def matmul_rate(dtype: torch.dtype, n: int = 2048) -> float:
    """Measured flop/s of a square matmul in ``dtype`` on this machine (best of 10 after warm-up)."""
    A = torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        A @ A
    best = min(median_time(lambda: A @ A, 1) for _ in range(10))
    return 2 * n**3 / best


def fmt_seconds(t: float) -> str:
    return f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s"


def fmt_bytes(b: float) -> str:
    return f"{b / 2**20:.0f} MiB"


def table(rows: list[list[str]], header: list[str]) -> str:
    cols = list(zip(header, *rows))
    width = [max(len(str(c)) for c in col) for col in cols]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, width)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in width) + "|", *map(line, rows)])
