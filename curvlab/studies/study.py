"""What a study is: a named grid of cells, a function per cell, claims checked on the merged result.

    STUDY = Study(
        name="my-study", description="...", paper="Author et al. (2022), arXiv:xxxx.xxxxx",
        config={"methods": ["kfac", "sgd"], "damping": [1e-3, 1e-1], "seeds": 3, "steps": 200},
        quick={"seeds": 1, "steps": 20},
        cells=lambda c: grid(method=c["methods"], damping=c["damping"], seed=range(c["seeds"])),
        run_cell=run_cell,                       # module level: it runs in other processes
        claims=[Claim("M1", "KFAC tracks natural gradient", "median cosine > 0.9",
                      lambda ds: (v := float(ds.cosine.median()), v > 0.9))],
        figures=figures,                         # ds -> {"cosines": Figure, ...}
        variables={"cosine": ("1", "cosine between the update directions")},
    )

A cell is a small mapping of JSON scalars (its coordinates: ``{"method": "kfac", "damping": 1e-3,
"seed": 0}``); ``run_cell(cell, config)`` returns its ``xarray.Dataset``. The runner
(:mod:`curvlab.studies.runner`) gives each cell key a length-1 dimension (unless the Dataset already
has it), so the default merge builds the grid with ``xarray.combine_by_coords``. Nothing here imports
xarray: listing the studies stays cheap.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import xarray as xr
    from matplotlib.figure import Figure

__all__ = ["Study", "Claim", "Cell", "grid", "cell_key", "config_hash", "RESERVED_KEYS", "BadOverride"]

#: a cell: its coordinates, each a str, int, float or bool
Cell = dict[str, Any]

#: keyword arguments of ``curvlab.studies.run``: no configuration key may take these names
RESERVED_KEYS = ("name", "quick", "out", "executor", "restart", "progress")

_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_CLAIM_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SCALARS = (str, int, float, bool)


class BadOverride(ValueError):
    """An override names no configuration key, or has the wrong type for its key."""


def _canonical(value: Any, what: str) -> Any:
    """``value`` through JSON (tuples become lists, ranges lists): a ValueError if it is not JSON."""
    if isinstance(value, range):
        value = list(value)
    try:
        return json.loads(json.dumps(value, allow_nan=False, default=_listify))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be JSON data (str, int, float, bool, None, lists, dicts); {exc}") from None


def _listify(value: Any) -> Any:
    if isinstance(value, (range, tuple, set, frozenset)):
        return list(value)
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    raise TypeError(f"{type(value).__name__} {value!r} is not JSON")


def _digest(data: Any) -> str:
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def cell_key(cell: Mapping[str, Any]) -> str:
    """Return a cell's identity: the first 16 hex digits of the SHA-256 of its sorted JSON (its file name)."""
    return _digest(dict(cell))[:16]


def config_hash(study: Study, config: Mapping[str, Any], quick: bool) -> str:
    """SHA-256 of the study's name and version, the quick flag and the resolved configuration."""
    return _digest({"study": study.name, "version": study.version, "quick": bool(quick), "config": dict(config)})


def grid(**axes: Iterable[Any]) -> list[Cell]:
    """Return the Cartesian product of ``axes`` in the order given (the last varies fastest), as cells.

    ``grid(method=["kfac", "sgd"], seed=range(2))`` →
    ``[{"method": "kfac", "seed": 0}, {"method": "kfac", "seed": 1}, {"method": "sgd", "seed": 0}, …]``.
    """
    names = list(axes)
    values = [list(v) for v in axes.values()]
    return [dict(zip(names, combo)) for combo in itertools.product(*values)]


@dataclass(frozen=True)
class Claim:
    """A claim of a paper and how the study decides it from the merged Dataset.

    ``compute(ds) -> (value, holds)``: the measured number (a float) and whether the criterion is
    met (a bool). Verdicts are only ever computed this way — from the data, never written by hand.
    """

    id: str
    statement: str
    criterion: str
    compute: Callable[[xr.Dataset], tuple[float, bool]]

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not _CLAIM_ID.match(self.id):
            raise ValueError(f"claim id must be letters, digits, '_', '.' or '-'; got {self.id!r}")
        for what in ("statement", "criterion"):
            if not isinstance(getattr(self, what), str) or not getattr(self, what).strip():
                raise ValueError(f"claim {self.id}: {what} must be a non-empty string")
        if not callable(self.compute):
            raise TypeError(f"claim {self.id}: compute must be callable ds -> (value, holds)")


@dataclass(frozen=True)
class Study:
    """A named grid of cells, the function that computes one, and the claims checked on the result.

    Parameters
    ----------
    name : str
        Lower-case words joined by ``-`` (``curvlab run NAME``).
    description, paper : str
        One line each: what it measures; the paper whose claims it tests (authors, year, arXiv id).
    config : dict
        The full run's configuration (JSON data). Every key can be overridden (``run(name, key=v)``,
        ``curvlab run NAME --set key=v``); an override must have the default's type (an int where a
        float is expected is accepted; a scalar where a list is expected becomes a one-element list).
    quick : dict
        Overrides of ``config`` for ``quick=True`` (``--quick``): the same measurement, smaller.
    cells : callable
        ``cells(config) -> list[Cell]``: the grid, in the order the runner computes it.
    run_cell : callable
        ``run_cell(cell, config) -> xarray.Dataset``, a module-level function (it is pickled to
        worker processes or Dask workers). It runs after ``torch.manual_seed(seed)`` (and NumPy's and
        Python's), with ``seed = cell["seed"]`` when the cell has an integer ``seed``, else a number
        derived from the cell: so a cell's result does not depend on where or in which order it ran.
    merge : callable, optional
        ``merge(datasets) -> Dataset`` of the finished cells' Datasets (each with its cell's
        coordinates as length-1 dimensions). Default: ``xarray.combine_by_coords``, then every cell
        dimension in the order of first appearance in ``cells``.
    claims : sequence of Claim
        Checked on the merged Dataset; the verdicts are stored in it and printed.
    figures : callable, optional
        ``figures(ds) -> {name: matplotlib Figure}``, drawn from the merged (or a saved) Dataset.
    variables : dict, optional
        ``{variable or coordinate: (units, description)}``, set as attrs on the merged Dataset.
    check : callable, optional
        ``check(config)``: raise ValueError for a bad value (run before any computation).
    version : str
        Part of the configuration hash: change it when ``run_cell`` changes what it computes, so
        that a resumed run does not mix old and new cells.
    """

    name: str
    description: str
    paper: str
    config: Mapping[str, Any]
    cells: Callable[[Mapping[str, Any]], Sequence[Mapping[str, Any]]]
    run_cell: Callable[[Cell, Mapping[str, Any]], xr.Dataset]
    quick: Mapping[str, Any] = field(default_factory=dict)
    merge: Callable[[list[xr.Dataset]], xr.Dataset] | None = None
    claims: Sequence[Claim] = ()
    figures: Callable[[xr.Dataset], dict[str, Figure]] | None = None
    variables: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    check: Callable[[Mapping[str, Any]], None] | None = None
    version: str = "1"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(f"study name must be lower-case letters, digits and '-'; got {self.name!r}")
        if not isinstance(self.config, Mapping) or not all(isinstance(k, str) for k in self.config):
            raise TypeError(f"study {self.name}: config must be a dict with str keys")
        reserved = [k for k in self.config if k in RESERVED_KEYS]
        if reserved:
            raise ValueError(f"study {self.name}: configuration keys {reserved} are run()'s own arguments")
        unknown = [k for k in self.quick if k not in self.config]
        if unknown:
            raise ValueError(f"study {self.name}: quick overrides unknown keys {unknown}")
        object.__setattr__(self, "config", _canonical(dict(self.config), f"study {self.name}: config"))
        object.__setattr__(self, "quick", _canonical(dict(self.quick), f"study {self.name}: quick"))
        object.__setattr__(self, "claims", tuple(self.claims))
        ids = [c.id for c in self.claims]
        if len(set(ids)) != len(ids):
            raise ValueError(f"study {self.name}: claim ids repeat: {ids}")
        for what in ("cells", "run_cell"):
            if not callable(getattr(self, what)):
                raise TypeError(f"study {self.name}: {what} must be callable")

    # ------------------------------------------------------------------ configuration
    def resolve(self, quick: bool = False, **overrides: Any) -> dict[str, Any]:
        """Return the configuration of a run: ``config``, then ``quick``'s overrides, then ``overrides``.

        Raises ``ValueError`` naming the valid keys for an unknown key, and naming the key and the
        expected type for a value of the wrong type; then runs the study's ``check``.
        """
        unknown = [k for k in overrides if k not in self.config]
        if unknown:
            raise BadOverride(f"unknown configuration key{'s' if len(unknown) > 1 else ''} "
                             f"{', '.join(map(repr, unknown))} for study {self.name!r}; valid: "
                             + ", ".join(self.config))
        resolved = copy.deepcopy(dict(self.config))
        if quick:
            resolved.update(copy.deepcopy(dict(self.quick)))
        for key, value in overrides.items():
            try:
                resolved[key] = _conform(key, _canonical(value, f"{key}"), self.config[key])
            except ValueError as exc:
                raise BadOverride(str(exc)) from None
        if self.check is not None:
            self.check(resolved)
        return resolved

    def grid_of(self, config: Mapping[str, Any]) -> list[Cell]:
        """Return ``cells(config)``, checked.

        It must be a non-empty list of distinct mappings with the same str keys whose values are JSON
        scalars (str, int, float, bool).
        """
        cells = [dict(c) for c in self.cells(config)]
        if not cells:
            raise ValueError(f"study {self.name}: this configuration has no cells")
        keys = list(cells[0])
        for c in cells:
            if list(c) != keys:
                raise ValueError(f"study {self.name}: every cell needs the keys {keys} in that order; got {list(c)}")
            for k, v in c.items():
                if not isinstance(v, _SCALARS) or (isinstance(v, float) and not math.isfinite(v)):
                    raise ValueError(f"study {self.name}: cell value {k}={v!r} is not a str, int, bool or "
                                     "finite float")
        seen: dict[str, Cell] = {}
        for c in cells:
            key = cell_key(c)
            if key in seen:
                raise ValueError(f"study {self.name}: the cell {c} appears twice")
            seen[key] = c
        return cells


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean (true/false)"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "a JSON object"
    return type(value).__name__


def _conform(key: str, value: Any, default: Any) -> Any:
    """``value`` shaped like ``default``: int for float, a scalar wrapped for a list; else ValueError."""
    if default is None:
        return value
    if isinstance(default, list):
        items = value if isinstance(value, list) else [value]
        kinds = {type(d) for d in default}
        if len(kinds) == 1:  # a homogeneous default list: its elements' type is the expected one
            items = [_conform(f"{key}[{i}]", v, default[0]) for i, v in enumerate(items)]
        return items
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(value, bool) and isinstance(default, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float))
        value = float(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ValueError(f"{key}: expected {_type_name(default)} (like the default {json.dumps(default)}); "
                         f"got {json.dumps(value)}")
    return value
