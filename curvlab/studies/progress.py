"""How a run shows its progress: a tqdm bar on a terminal (cells done, time left), quiet otherwise.

``progress`` of ``curvlab.studies.run``: ``None`` a bar when stderr is a terminal, else nothing;
``True`` always a bar (on stderr); ``False`` nothing; a callable is called with a :class:`CellEvent`
after every finished or failed cell.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["CellEvent", "Progress"]


@dataclass(frozen=True)
class CellEvent:
    """One cell finished (``status`` "done") or failed ("failed", with ``error``)."""

    study: str
    cell: dict[str, Any]
    status: str
    done: int  # cells finished so far, including those resumed from disk
    failed: int
    total: int
    seconds: float
    error: str | None = None


class Progress:
    """The display of one run; :meth:`update` after each cell, :meth:`close` at the end."""

    def __init__(self, spec: bool | Callable[[CellEvent], Any] | None, study: str, total: int, resumed: int) -> None:
        self.callback = spec if callable(spec) and not isinstance(spec, bool) else None
        self.study, self.total, self.done, self.failed = study, total, resumed, 0
        show = (sys.stderr.isatty() if spec is None else spec is True) and self.callback is None
        self.bar = None
        if show:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=resumed, desc=study, unit="cell", file=sys.stderr,
                            dynamic_ncols=True, smoothing=0.1)

    def update(self, cell: dict[str, Any], status: str, seconds: float, error: str | None = None) -> None:
        """Count a finished cell (``status`` done or failed), advance the bar and tell the callback."""
        self.done += status == "done"
        self.failed += status == "failed"
        if self.bar is not None:
            self.bar.update(1)
            if self.failed:
                self.bar.set_postfix(failed=self.failed)
        if self.callback is not None:
            self.callback(CellEvent(self.study, dict(cell), status, self.done, self.failed, self.total, seconds,
                                    error))

    def close(self) -> None:
        """Close the progress bar, if there is one."""
        if self.bar is not None:
            self.bar.close()
