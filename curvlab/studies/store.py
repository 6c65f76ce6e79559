"""Where a run keeps its finished cells: one netCDF file per cell and a JSON manifest, all atomic.

    <cells>/manifest.json          the study, the configuration and its hash, each cell's status and error
    <cells>/cell-<key>.nc          a finished cell's Dataset (key: ``curvlab.studies.study.cell_key``)

Every file is written to a temporary name in the same folder and moved into place with
``os.replace``, so a run killed at any instant (even by SIGKILL) leaves each file either complete or
absent; a resumed run removes the temporary files a kill left behind. The cell files are the
record of what is done (a cell whose file loads is finished); the manifest says which run they
belong to (its configuration hash: another configuration is refused unless the run restarts) and
keeps the errors of failed cells. One run at a time may write into a folder (an advisory lock).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import xarray as xr

__all__ = ["CellStore", "ConfigurationChanged", "CELL_ATTRS"]

MANIFEST = "manifest.json"
_LOCK = ".lock"
#: attrs the runner puts on a cell file (removed again when the cells are merged)
CELL_ATTRS = ("curvlab_cell", "curvlab_cell_key", "curvlab_config_hash", "curvlab_cell_seconds", "curvlab_cell_seed")


class ConfigurationChanged(ValueError):
    """The cells folder holds a run of another configuration (pass ``restart=True`` to start over)."""


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    keys = [k for k in dict.fromkeys([*old, *new]) if old.get(k) != new.get(k)]
    return "; ".join(f"{k}: {json.dumps(old.get(k))} → {json.dumps(new.get(k))}" for k in keys[:4]) + \
        (" …" if len(keys) > 4 else "")


class CellStore:
    """The cells folder of one run of one study configuration."""

    def __init__(self, folder: Path, digest: str, header: Mapping[str, Any]) -> None:
        """``header``: what the manifest says about the run (study, version, quick, config)."""
        self.folder = Path(folder)
        self.digest, self.header = digest, dict(header)
        self.entries: dict[str, dict[str, Any]] = {}
        self._lock_fd: int | None = None

    # ---------------------------------------------------------------- opening
    def open(self, cells: list[dict[str, Any]], keys: list[str], restart: bool) -> None:
        """Take the folder's lock, check (or, with ``restart``, clear) an earlier run, write the manifest."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            self._remove_temporaries()
            if restart:
                self.clear()
            else:
                self._check_earlier_run()
            previous = self._read_manifest().get("cells", [])
            errors = {e["key"]: e for e in previous if e.get("status") == "failed"}
            self.entries = {k: {"key": k, "cell": c, "file": self.file(k).name, "status": "pending"}
                            for k, c in zip(keys, cells)}
            for k, e in errors.items():  # a failed cell is retried; its last error stays until then
                if k in self.entries:
                    self.entries[k].update(last_error=e.get("error"))
            self.write_manifest()
        except BaseException:
            self.close()
            raise

    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no lock
            return
        fd = os.open(self.folder / _LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ValueError(f"another run is writing into {self.folder}; wait for it or pass another out") from None
        self._lock_fd = fd

    def close(self) -> None:
        """Release the folder's lock (the files stay)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def _remove_temporaries(self) -> None:
        for p in self.folder.glob(".*.tmp"):
            p.unlink(missing_ok=True)

    def clear(self) -> None:
        """Remove this store's cell files and manifest (nothing else in the folder)."""
        for p in self.folder.glob("cell-*.nc"):
            p.unlink(missing_ok=True)
        (self.folder / MANIFEST).unlink(missing_ok=True)

    def _read_manifest(self) -> dict[str, Any]:
        path = self.folder / MANIFEST
        if not path.exists():
            return {}
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read {path}: {exc}; pass restart=True (--restart) to start over") from None

    def _check_earlier_run(self) -> None:
        manifest = self._read_manifest()
        if not manifest:
            if any(self.folder.glob("cell-*.nc")):
                raise ConfigurationChanged(f"{self.folder} holds cell files but no manifest; pass restart=True "
                                           "(--restart) to start over, or another out")
            return
        if manifest.get("config_hash") != self.digest:
            what = _diff(manifest.get("config", {}), self.header.get("config", {})) or (
                f"study {manifest.get('study')!r}, quick={manifest.get('quick')}, version {manifest.get('version')}")
            raise ConfigurationChanged(f"{self.folder} holds a run of another configuration ({what}); pass "
                                       "restart=True (curvlab run --restart) to start over, or another out")

    # ---------------------------------------------------------------- cells
    def file(self, key: str) -> Path:
        """Return the path of the file of cell ``key``, ``cell-<key>.nc``."""
        return self.folder / f"cell-{key}.nc"

    def load_finished(self, keys: Iterable[str] | None = None) -> dict[str, xr.Dataset]:
        """Return the cells (of ``keys``, default all) whose files load and belong to this configuration.

        An unreadable or foreign cell file is removed (the cell is computed again).
        """
        from curvlab.compare.report import load

        done = {}
        for key in self.entries if keys is None else keys:
            path = self.file(key)
            if not path.exists():
                continue
            try:
                ds = load(path)
            except (OSError, ValueError, KeyError):
                ds = None
            if ds is None or ds.attrs.get("curvlab_config_hash") != self.digest:
                path.unlink(missing_ok=True)  # unreadable or foreign: computed again
                continue
            done[key] = ds
            self.entries[key].update(status="done", seconds=ds.attrs.get("curvlab_cell_seconds"))
            self.entries[key].pop("last_error", None)
        return done

    def save_cell(self, key: str, ds: xr.Dataset) -> None:
        """Write a finished cell's Dataset (atomically, compressed)."""
        from curvlab.studies.results import save

        save(ds, self.file(key))

    def mark(self, key: str, status: str, **info: Any) -> None:
        """Record a cell's outcome (``done`` or ``failed`` with ``error`` and ``traceback``) in the manifest."""
        entry = self.entries[key]
        for k in ("error", "traceback", "last_error"):
            entry.pop(k, None)
        entry.update(status=status, **info)
        self.write_manifest()

    def write_manifest(self) -> None:
        """Write the manifest atomically: the header, the config hash, the status counts and every cell's entry."""
        counts = {s: sum(e["status"] == s for e in self.entries.values()) for s in ("done", "failed", "pending")}
        manifest = {**self.header, "config_hash": self.digest, "updated": _now(), "counts": counts,
                    "cells": list(self.entries.values())}
        write_atomic(self.folder / MANIFEST, json.dumps(manifest, indent=1, allow_nan=True) + "\n")

    def failures(self) -> list[dict[str, Any]]:
        """``[{"cell": …, "error": …}]`` of the failed cells, in grid order."""
        return [{"cell": e["cell"], "error": e["error"]} for e in self.entries.values() if e["status"] == "failed"]
