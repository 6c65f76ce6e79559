"""The agreement report: every comparator over methods × references × blocks × dampings, as xarray.

    ds = curvlab.compare.report(prob, methods=["ggn-block", "kfac", "sgd"], references=["ggn"],
                                damping=[1e-3, 1e-2])
    curvlab.compare.save(ds, "data/results/digits-mlp.nc")     # atomic netCDF (h5netcdf)
    ds = curvlab.compare.load("data/results/digits-mlp.nc")

Dimensions: ``method`` (the compared methods), ``reference`` (exact matrices compared against),
``block`` ("all" = the whole matrix, then the blocks of ``prob.partition``), ``damping``, ``eig``
(eigenvalue index, 0 = largest), ``top`` (rank of the top-k eigenpairs, 1 … k), ``factor`` (A, G:
the Kronecker factors) and ``versus`` (the methods again, second axis of the direction-cosine
matrix). Every variable carries ``units`` and ``description`` attributes (see :data:`VARIABLES`);
the Dataset's attributes hold the problem's provenance (``prob.summary()``), the settings, the
library versions, how each matrix was represented and the memory plan. Values that do not exist
for a method (a spectrum of ``sgd``, a logdet of an indefinite Hessian) are NaN.

How it is built. Each table is one function returning an ``xarray.Dataset`` with its own named
dimensions: per method the spectrum (with the smallest eigenvalue and whether C + λI is positive
definite), the agreement with each reference, the damped comparisons and the directions, the
Kronecker factors, the step quality; then the reference norms and the pairwise direction cosines.
The methods are processed one at a time and a matrix is dropped as soon as its tables are done and
no later method reads it, so the report holds the references plus one or two matrices at once.

Representations. An exact Fisher-type matrix (``ggn``, ``fisher-mc``, ``ef`` and their ``-block``
variants) is a sum of r = N·k outer products; whenever r is smaller than the matrix (or the dense
matrix would not fit the memory budget) the report uses its low-rank form s·UᵀU (Woodbury solves,
spectra from the r×r Gram; the same numbers to rounding) and says so in the coordinate
``representation`` and the attribute ``representations``.

Memory. Before building, the bytes the report will hold at once (the matrices of every method and
reference in the chosen representations, their factorisations, eigendecompositions and LAPACK
workspaces, as they are processed and released) are estimated against
:func:`curvlab.memory.get_budget`; over it, the report refuses with a
:class:`~curvlab.memory.MemoryBudgetError` naming the largest items, before building anything. The
attribute ``memory_plan`` records the low-rank choices and the estimate.

Selecting: ``ds.sel(method="kfac")`` does not work, since ``method`` is also the name of ``sel``'s
own interpolation argument; write ``ds.sel({"method": "kfac"})`` or ``ds.loc[{"method": "kfac"}]``.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import Tensor

from curvlab import memory
from curvlab.compare import methods as _methods
from curvlab.compare.directions import direction_of, energy_norm, step_size
from curvlab.compare.kron import factor_fraction_below
from curvlab.compare.matrices import cosine, relative_error, restrict, trace_ratio
from curvlab.compare.spectra import eigenvalues, fraction_below, negative_mass, spectra
from curvlab.linalg import DENSE_EIGH_LIMIT, CurvatureMatrix
from curvlab.linalg.base import singular_tolerance
from curvlab.problem import Problem

__all__ = ["report", "check_arguments", "save", "load", "format_report", "VARIABLES", "DEFAULT_DAMPING"]

DEFAULT_DAMPING: tuple[float, ...] = (1e-3, 1e-2, 1e-1)

#: variable → (units, description); each table function declares its variables' dimensions
VARIABLES: dict[str, tuple[str, str]] = {
    "cosine": ("1", "Frobenius cosine <A,B>_F / (|A|_F |B|_F) of the method's matrix A and the reference B, "
                    "on the whole matrix (block 'all') or on the diagonal blocks A_bb, B_bb"),
    "relative_error": ("1", "relative Frobenius error |A - B|_F / |B|_F (block 'all' includes the cross-block "
                            "mass a block-diagonal A misses)"),
    "trace_ratio": ("1", "tr(A + damping I) / tr(B + damping I)"),
    "logdet_difference": ("nat", "log det(A + damping I) - log det(B + damping I) (NaN if not positive definite)"),
    "eigenvalues": ("loss / parameter^2", "all eigenvalues of the method's matrix, descending"),
    "wasserstein": ("loss / parameter^2", "Wasserstein-1 distance between the eigenvalue distributions of A and B"),
    "wasserstein_log": ("decade", "Wasserstein-1 distance between log10(max(eig, 0) + damping) of A and of B"),
    "top_ratio": ("1", "ratio of the i-th largest eigenvalues, eig_i(A) / eig_i(B)"),
    "subspace_overlap": ("1", "mean squared cosine of the principal angles between the top-k eigenspaces of A "
                              "and B (1: same subspace, 0: orthogonal)"),
    "fraction_below": ("1", "fraction of the method's eigenvalues below the damping (the share the damping swamps)"),
    "factor_fraction_below": ("1", "per Kronecker layer: fraction of the eigenvalues of factor A (inputs) or G "
                                   "(output gradients) below that factor's damping share (the method's factored "
                                   "rule, else pi)"),
    "negative_mass": ("1", "sum of |negative eigenvalues| of the method's matrix over tr(GGN) "
                           "(over sum |eig| without a GGN)"),
    "min_eigenvalue": ("loss / parameter^2", "smallest eigenvalue of the method's matrix (negative: indefinite)"),
    "positive_definite": ("1", "1 if the method's matrix C + damping I is positive definite (its smallest "
                               "eigenvalue above sqrt(P) eps (max|eig| + damping)), 0 if not (its step -(C + damping "
                               "I)^-1 g need not be a descent direction), NaN without a matrix"),
    "direction_cosine": ("1", "cosine between the update directions of two methods for the full-batch gradient"),
    "step_norm": ("parameter", "Euclidean norm of the update direction x (before the step size)"),
    "slope": ("loss", "directional derivative g^T x (negative: descent direction)"),
    "energy_error": ("1", "|x - x*|_{B + damping I} / |x*|_{B + damping I}, x* = -(B + damping I)^-1 g the exact "
                          "damped step of the reference"),
    "alpha": ("1", "step size taken along x (see attribute step_rule)"),
    "predicted_change": ("loss", "change of the local quadratic model alpha g^T x + alpha^2/2 x^T B x with the "
                                 "reference's curvature B"),
    "actual_change": ("loss", "actual loss change L(theta + alpha x) - L(theta)"),
    "reference_norm": ("loss / parameter^2", "Frobenius norm of the reference |B|_F (block 'all') or of its "
                                             "diagonal block |B_bb|_F"),
    "build_seconds": ("s", "wall-clock time to build the method's matrix"),
    "loss": ("loss", "loss L(theta) at the evaluation point"),
    "gradient_norm": ("loss / parameter", "Euclidean norm of the full-batch gradient"),
}

def _versions() -> dict[str, str]:
    import h5netcdf
    import scipy

    import curvlab

    return {"curvlab_version": curvlab.__version__, "torch_version": torch.__version__,
            "numpy_version": np.__version__, "scipy_version": scipy.__version__,
            "xarray_version": xr.__version__, "h5netcdf_version": h5netcdf.__version__,
            "python_version": platform.python_version()}


def _attr(v: Any) -> str | int | float:
    """Return a netCDF-safe attribute value (plain str, int or float)."""
    if isinstance(v, (bool, np.bool_)):
        return int(v)
    if isinstance(v, str):
        return str(v)
    if isinstance(v, np.generic):
        return _attr(v.item())
    if isinstance(v, (int, float)):
        return type(v)(v) if type(v) in (int, float) else float(v)
    if isinstance(v, (list, tuple)):
        return ", ".join(map(str, v))
    return str(v)


def _resolve_methods(methods: Sequence[str] | Mapping[str, Any], references: Sequence[str]):
    """-> (ordered method names, custom objects by name, registry spec by name or None)."""
    custom: dict[str, Any] = {}
    if isinstance(methods, Mapping):
        order = []
        for name, obj in methods.items():
            if isinstance(obj, str):
                order.append(_methods.canonical(obj))
            else:
                custom[str(name)] = obj
                order.append(str(name))
    else:
        if isinstance(methods, str):
            raise TypeError("methods must be a list of names (or a mapping), not one string")
        order = [_methods.canonical(m) for m in methods]
    refs = [r if r in custom else _methods.canonical(r) for r in references]
    if len(set(order)) != len(order):
        raise ValueError(f"a method is listed twice: {order}")
    if len(set(refs)) != len(refs):
        raise ValueError(f"a reference is listed twice: {refs}")
    return order, refs, custom


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def check_arguments(methods: Sequence[str] | Mapping[str, Any] = _methods.DEFAULT_METHODS,
                    damping: Sequence[float] | float = DEFAULT_DAMPING,
                    references: Sequence[str] | str = ("ggn",), *, k: int = 20, damping_rule: str = "own",
                    step: float | str = "armijo", mc_samples: int = 1,
                    seed: int | None = None) -> tuple[list[str], list[str], dict[str, Any], list[float]]:
    """Check :func:`report`'s arguments without building anything.

    Raise ``ValueError``/``TypeError`` naming the offending value.

    Returns (method names in order, reference names, custom objects by name, dampings as floats).
    The command line calls it before loading the problem, so that a typo costs no computation.
    """
    if damping_rule not in ("own", "exact"):
        raise ValueError(f"damping_rule must be 'own' or 'exact'; got {damping_rule!r}")
    if isinstance(step, bool) or not (step in ("armijo", "model") or
                                      (isinstance(step, (int, float)) and math.isfinite(step) and step > 0)):
        raise ValueError(f'step must be "armijo", "model" or a finite positive learning rate; got {step!r}')
    if not _is_int(k) or k < 1:
        raise ValueError(f"k (the number of top eigenpairs) must be a positive integer; got {k!r}")
    if not _is_int(mc_samples) or mc_samples < 1:
        raise ValueError(f"mc_samples (labels drawn per input) must be a positive integer; got {mc_samples!r}")
    if seed is not None and (not _is_int(seed) or seed < 0):
        raise ValueError(f"seed must be a non-negative integer or None; got {seed!r}")
    try:
        dampings = [float(d) for d in np.atleast_1d(np.asarray(damping, dtype=float)).ravel()]
    except (TypeError, ValueError):
        raise ValueError(f"damping must be a number or a list of numbers; got {damping!r}") from None
    if not dampings or any(not math.isfinite(d) or d < 0 for d in dampings):
        raise ValueError(f"damping must be a list of finite non-negative numbers; got {damping}")
    if len(set(dampings)) != len(dampings):
        raise ValueError(f"a damping is listed twice: {dampings}")
    if isinstance(references, str):
        references = [references]
    if not references:
        raise ValueError("report needs at least one reference (e.g. 'ggn')")
    order, refs, custom = _resolve_methods(methods, references)
    for name, obj in custom.items():
        if not (isinstance(obj, CurvatureMatrix) or callable(obj)):
            raise TypeError(f"method {name!r} must be a registered name, a CurvatureMatrix or a callable "
                            f"(g, damping) -> direction; got {type(obj).__name__}")
    for given, r in zip(references, refs):
        if (r in custom and not isinstance(custom[r], CurvatureMatrix)) or \
                (r not in custom and _methods.spec(r).family == "first-order"):
            matrices = [n for n, s in _methods.REGISTRY.items() if s.family != "first-order"]
            raise ValueError(f"reference {given!r} is not a matrix method; use one of {', '.join(matrices)}")
    return order, refs, custom, dampings




# ---------------------------------------------------------------------------------------- setup
@dataclass
class _Setup:
    """What every table of one report needs: the problem, the names, the settings and the coordinates."""

    prob: Problem
    order: list[str]
    refs: list[str]
    custom: dict[str, Any]
    dampings: list[float]
    k: int
    full_spectrum: bool
    damping_rule: str
    step: float | str
    mc_samples: int
    seed: int
    notes: list[str] = field(default_factory=list)

    @property
    def P(self) -> int:
        return self.prob.num_params

    @property
    def block_names(self) -> list[str]:
        return ["all", *self.prob.partition.names]

    @property
    def block_spec(self) -> list[tuple[str, slice]]:
        return [(b.name, b.slice) for b in self.prob.partition]

    @property
    def anchors(self) -> list[str]:
        """Matrices built first and kept to the end: the references, and the GGN (negative mass) if present."""
        return list(dict.fromkeys(self.refs + (["ggn"] if "ggn" in self.order else [])))

    def spec_of(self, name: str) -> _methods.MethodSpec | None:
        return None if name in self.custom else _methods.spec(name)

    def mode_of(self, name: str) -> str:
        """Return the damping rule of a method's directions (registry "own" follows damping_rule)."""
        s = self.spec_of(name)
        if s is None:
            return "exact"
        if s.mode == "own":
            return "own" if self.damping_rule == "own" else "exact"
        return s.mode

    def empty(self, *dims: str) -> xr.DataArray:
        """Return a NaN array with the named dimensions and their coordinates, to be filled by label."""
        values = {"reference": lambda: self.refs, "block": lambda: self.block_names, "damping": lambda: self.dampings,
                  "top": lambda: np.arange(1, self.k + 1), "factor": lambda: ["A", "G"],
                  "eig": lambda: np.arange(self.P), "method": lambda: self.order, "versus": lambda: self.order}
        coords = {d: values[d]() for d in dims}
        return xr.DataArray(np.full([len(c) for c in coords.values()], math.nan), coords=coords, dims=dims)


class _Progress:
    """Stage-by-stage progress of a report.

    A tqdm bar with time left on stderr (``progress=True``), a callable told each stage's message, or
    nothing (``None``/``False``).
    """

    def __init__(self, progress: bool | Callable[[str], None] | None, total: int, desc: str) -> None:
        self.say = progress if callable(progress) else None
        self.bar = None
        if progress is True:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="stage", file=sys.stderr, leave=False, dynamic_ncols=True)
        self.started = False

    def stage(self, msg: str) -> None:
        """Mark the previous stage done and start stage ``msg``."""
        if self.bar is not None:
            if self.started:
                self.bar.update(1)
            self.bar.set_postfix_str(msg)
        self.started = True
        if self.say is not None:
            self.say(msg)

    def close(self) -> None:
        if self.bar is not None:
            if self.started:
                self.bar.update(1)
            self.bar.close()


#: the tables of each method, one progress stage each (besides its build)
_METHOD_STAGES = ("spectrum", "agreement", "damped", "factors", "steps")


def _stage_count(s: _Setup) -> int:
    builds = sum(1 for n in dict.fromkeys(s.anchors + s.order) if n not in s.custom)
    return builds + len(_METHOD_STAGES) * len(s.order) + 1


# ---------------------------------------------------------------------------------------- memory plan
@dataclass
class _Plan:
    """How each method is built (registry entry), and the memory the report will hold at once."""

    entries: dict[str, str | None]    # report name → registry name to build (None: the caller's object)
    why: dict[str, str]               # report name → why a low-rank form was chosen (automatic choices)
    estimate: int                     # bytes held at once (peak estimate)
    messages: list[str] = field(default_factory=list)


def _choose_entry(s: _Setup, name: str) -> tuple[str | None, str]:
    """(registry name to build, reason) — the low-rank form of a Fisher-type matrix where it is cheaper."""
    if name in s.custom:
        return None, ""
    variant = _methods.low_rank_variant(name)
    if variant is None:
        return name, ""
    r = _methods.factor_rows(name, s.prob, s.mc_samples)
    largest = s.P if _methods.spec(name).structure == "full" else max(s.prob.partition.sizes)
    if r < largest:
        return variant, f"r = {r} factor rows < {largest}"
    if memory.nbytes((largest, largest), s.prob.dtype) > memory.get_budget():
        return variant, f"a dense {largest}×{largest} matrix is over the memory budget"
    return name, ""


def _footprint(s: _Setup, entry: str | None) -> tuple[int, int]:
    """(bytes held while the matrix is alive, extra bytes while it is built or decomposed)."""
    if entry is None:
        return 0, 0  # the caller's object: already in memory
    st = _methods.REGISTRY[entry].structure
    item = torch.empty((), dtype=s.prob.dtype).element_size()
    sizes = [s.P] if st in ("full", "operator", "spectral", "low_rank") else list(s.prob.partition.sizes)
    big = max(sizes)
    if st in ("low_rank", "block_low_rank"):
        r = _methods.factor_rows(entry, s.prob, s.mc_samples)
        held = sum(2 * r * r + n * s.k + (n * n if n <= r else 0) for n in sizes)  # Gram + eigh, vectors, primal
        return held * item, r * r * item
    blocks = sum(n * n for n in s.prob.partition.sizes)
    if st in ("spectral", "block_spectral"):  # the Hessian's eigenvectors (+ restricted blocks); H and its eigh
        return (sum(n * n for n in sizes) + blocks) * item, 3 * big * big * item
    if st in ("full", "operator", "block"):
        cached = sum(n * n for n in sizes if n <= DENSE_EIGH_LIMIT or 3 * s.k >= n)  # eigh for the top-k
        # the matrix, its factor of the last damping, a cached eigh; while factorised: the shifted copy, a failed
        # Cholesky and the LU of an indefinite matrix (or LAPACK's eigh workspace)
        return (2 * sum(n * n for n in sizes) + cached) * item, 3 * big * big * item
    if st == "diag":
        return s.P * item, 0
    return 0, 0  # Kronecker factors (layer-sized), directions


def _kind_of(entry: str | None) -> str:
    """Return how a method entry takes part in Frobenius products: "low", "cheap" or "other".

    "low" for an entry held through factors, "cheap" for one whose Frobenius products with those have a
    shortcut (a diagonal; a direction has none to take), else "other" (a dense twin is built for those, see
    ``_Builds.twin``).
    """
    st = _methods.REGISTRY[entry].structure if entry else "vector"
    return "low" if st in _LOW_RANK_REPS else "cheap" if st in ("diag", "vector") else "other"


def _twin_bytes(s: _Setup, entries: Mapping[str, str | None], m: str) -> int:
    """Return the bytes of the transient dense twin of a low-rank matrix compared with another structure (method m)."""
    kinds = {_kind_of(entries[a]) for a in s.anchors}
    mine = _kind_of(entries[m])
    if (mine == "other" and "low" in kinds) or (mine == "low" and "other" in kinds):
        return memory.nbytes((s.P, s.P), s.prob.dtype)
    return 0


def _needed_later(s: _Setup, entries: Mapping[str, str | None], pending: Sequence[str]) -> set[str]:
    """Report names whose matrices a pending method reads (its registry sources)."""
    keys: set[str] = set()
    for m in pending:
        e = entries.get(m)
        if e is not None:
            keys |= set(_methods.REGISTRY[e].sources)
    return {n for n, e in entries.items() if n in keys or (e is not None and e in keys)}


def _peak(s: _Setup, entries: Mapping[str, str | None]) -> tuple[int, dict[str, int]]:
    """Return the most bytes held at once when the methods are processed in order and released when done."""
    foot = {n: _footprint(s, e) for n, e in entries.items()}
    anchors = s.anchors
    peak = sum(foot[a][0] for a in anchors) + max([foot[a][1] for a in anchors] or [0])
    alive = set(anchors)
    for i, m in enumerate(s.order):
        alive.add(m)
        peak = max(peak, sum(foot[n][0] for n in alive) + foot[m][1] + _twin_bytes(s, entries, m))
        alive = set(anchors) | (alive & _needed_later(s, entries, s.order[i + 1:]))
    return peak, {n: held + extra for n, (held, extra) in foot.items()}


def _plan(s: _Setup) -> _Plan:
    """Choose each method's representation and check the whole report against the memory budget.

    Every exact Fisher-type matrix takes its low-rank form where that is cheaper (recorded per method);
    if what the report would hold at once still exceeds the budget, a MemoryBudgetError names the
    largest items and what to do, before anything is built.
    """
    chosen = {n: _choose_entry(s, n) for n in dict.fromkeys(s.anchors + s.order)}
    entries = {n: e for n, (e, _) in chosen.items()}
    why = {n: w for n, (_, w) in chosen.items() if w}
    budget = memory.get_budget()
    peak, per = _peak(s, entries)
    plan = _Plan(entries, why, peak)
    plan.messages += [f"{n}: low-rank form ({w})" for n, w in why.items()]
    if peak <= budget:
        return plan
    largest = ", ".join(f"{n} {_size(b)}" for n, b in sorted(per.items(), key=lambda t: -t[1])[:4] if b)
    raise memory.MemoryBudgetError(
        f"the report would hold about {_size(peak)} at once (largest: {largest}), over the memory budget of "
        f"{_size(budget)}: drop the largest methods or use their -block or -low-rank variants (`curvlab "
        "methods`), or raise the budget (CURVLAB_MAX_DENSE_BYTES, curvlab.memory.set_budget)")


def _size(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if b < 1024 or unit == "GiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return f"{b:.1f} GiB"  # pragma: no cover


# ---------------------------------------------------------------------------------------- building
#: representations held through factors (Woodbury, Gram spectra)
_LOW_RANK_REPS = ("low_rank", "block_low_rank")
#: representations whose Frobenius products with a low-rank matrix have a shortcut (or that have no matrix)
_CHEAP_WITH_LOW_RANK = ("low_rank", "block_low_rank", "diag", "vector")


def _representation(obj: Any) -> str:
    """Return what a built method is: its matrix's ``structure``, or ``vector`` for a direction callable.

    Structures are ``full``, ``low_rank``, ``kron`` …; a block-diagonal of one structure X is ``block_X``,
    e.g. ``block_low_rank``.
    """
    if not isinstance(obj, CurvatureMatrix):
        return "vector"
    rep = obj.structure
    inner = rep[len("block["):-1] if rep.startswith("block[") and rep.endswith("]") else ""
    return f"block_{inner}" if inner and "," not in inner else rep


class _Builds:
    """The matrices of one report: built on demand in the planned representation, dropped when done."""

    def __init__(self, s: _Setup, plan: _Plan, bar: _Progress, skip_unavailable: bool) -> None:
        self.s, self.plan, self.bar, self.skip = s, plan, bar, skip_unavailable
        self.cache: dict[str, Any] = {}
        self.built: dict[str, Any] = {}
        self.seconds: dict[str, float] = {}
        self.representation: dict[str, str] = {}
        self.skipped: list[str] = []

    def get(self, name: str) -> Any | None:
        """Return the method's matrix or direction callable (None: it failed and is skipped)."""
        if name not in self.built:
            obj = self._build(name)
            if obj is None:
                return None
            self.built[name] = obj
            self.representation[name] = _representation(obj)
        return self.built[name]

    def _build(self, name: str) -> Any | None:
        s = self.s
        if name in s.custom:
            self.seconds[name] = math.nan
            return s.custom[name]
        self.bar.stage(f"building {name}")
        t0 = time.perf_counter()
        try:
            obj = _methods.build(self.plan.entries[name], s.prob, self.cache, mc_samples=s.mc_samples, seed=s.seed)
        except Exception as exc:
            if not self.skip or name in s.anchors:
                raise
            self.skipped.append(name)
            warnings.warn(f"report: skipping {name!r}: {exc}", stacklevel=4)
            return None
        self.seconds[name] = time.perf_counter() - t0
        return obj

    def anchors(self) -> dict[str, CurvatureMatrix]:
        """Build the references (and the GGN); each must be a matrix."""
        out = {a: self.get(a) for a in self.s.anchors}
        for r in self.s.refs:
            if not isinstance(out[r], CurvatureMatrix):
                raise ValueError(f"reference {r!r} is not a matrix method")
        return out

    def prepare(self, name: str, pending: Sequence[str]) -> None:
        """Decompose a matrix whose eigendecomposition a pending method reads (so spectra reuse it)."""
        obj = self.built[name]
        wanted = {_methods.REGISTRY[e].eigh_of for m in pending if (e := self.plan.entries.get(m))}
        if isinstance(obj, CurvatureMatrix) and ({name, self.plan.entries.get(name)} & wanted):
            for b in obj.blocks:
                b.eigh()

    def frobenius_pair(self, name: str, C: CurvatureMatrix, ref: str, B: CurvatureMatrix) -> tuple[Any, Any]:
        """Return the operands of the Frobenius comparisons of method ``name`` with reference ``ref``.

        A matrix held low-rank is replaced by its dense twin when the other one is of a structure without a
        shortcut for low-rank operands (full, block, Kronecker …; see :meth:`twin`).
        """
        mine, theirs = self.representation.get(name), self.representation.get(ref)
        if mine in _LOW_RANK_REPS and theirs not in _CHEAP_WITH_LOW_RANK:
            return self.twin(name) or C, B
        if theirs in _LOW_RANK_REPS and mine not in _CHEAP_WITH_LOW_RANK:
            return C, self.twin(ref) or B
        return C, B

    def twin(self, name: str) -> CurvatureMatrix | None:
        """Return the oracle's dense form of an exact matrix held low-rank, built afresh (not kept), if it fits.

        ⟨A, s·UᵀU⟩ with a matrix A of another structure goes through products of A with the r rows of U
        (for a dense A 2·P²·r flops, r = N·C), and ‖A − s·UᵀU‖ through that again; the oracle builds the
        dense GGN at its floor 2·N·P², after which the comparisons take the dense (or Kronecker-vs-dense)
        shortcuts. The spectra and solves keep the low-rank form.
        """
        entry = self.plan.entries.get(name) or ""
        dense = entry.removesuffix("-low-rank")
        if dense == entry or dense not in _methods.REGISTRY:
            return None
        sizes = [self.s.P] if _methods.REGISTRY[dense].structure == "full" else self.s.prob.partition.sizes
        if memory.nbytes((max(sizes), max(sizes)), self.s.prob.dtype) > memory.get_budget():
            return None
        return _methods.build(dense, self.s.prob, {}, mc_samples=self.s.mc_samples, seed=self.s.seed)

    def release(self, pending: Sequence[str]) -> None:
        """Drop every built matrix that is not an anchor and that no pending method reads."""
        keep = set(self.s.anchors) | _needed_later(self.s, self.plan.entries, pending)
        keep_keys = {self.plan.entries.get(n) for n in keep} | set(keep)
        for e in (self.plan.entries.get(m) for m in pending):
            keep_keys |= set(_methods.REGISTRY[e].sources) if e else set()
        for name in [n for n in self.built if n not in keep]:
            obj = self.built.pop(name)
            for key in [k for k, v in self.cache.items() if v is obj and k not in keep_keys]:
                del self.cache[key]


# ---------------------------------------------------------------------------------------- references
class _References:
    """The built references and what every method is held against: x* = −(B + λI)⁻¹g, ‖x*‖_{B+λI}, log dets."""

    def __init__(self, s: _Setup, mats: Mapping[str, CurvatureMatrix], g: Tensor) -> None:
        self.s, self.mats, self.g = s, {r: mats[r] for r in s.refs}, g
        self._steps: dict[tuple[str, float], tuple[Tensor | None, float]] = {}
        self._logdets: dict[tuple[str, float], dict[str, float]] = {}

    def step(self, r: str, lam: float) -> tuple[Tensor | None, float]:
        """(x*, its energy norm) of reference r at damping λ; (None, NaN) when B + λI is singular."""
        key = (r, lam)
        if key not in self._steps:
            C = self.mats[r]
            try:
                x = -C.solve(self.g, lam)
            except (ValueError, RuntimeError) as exc:
                self.s.notes.append(f"reference {r} at damping {lam:g}: {exc}")
                self._steps[key] = (None, math.nan)
            else:
                self._steps[key] = (x, energy_norm(C, x, lam))
        return self._steps[key]

    def logdets(self, r: str, lam: float) -> dict[str, float]:
        key = (r, lam)
        if key not in self._logdets:
            self._logdets[key] = _logdets(self.s, self.mats[r], lam)
        return self._logdets[key]


def _logdets(s: _Setup, C: CurvatureMatrix, lam: float) -> dict[str, float]:
    """Return log det(C + λI) on the whole matrix ('all') and on each block; NaN where not positive definite."""
    out = {}
    for name, sl in [("all", slice(0, s.P)), *s.block_spec]:
        try:
            out[name] = float(restrict(C, sl).logdet(lam))
        except ValueError:
            out[name] = math.nan
    return out


# ---------------------------------------------------------------------------------------- per-method tables
def _extreme_eigenvalues(s: _Setup, C: CurvatureMatrix) -> tuple[float, float]:
    """Return the (smallest, largest) eigenvalue.

    From the (cached) eigenvalues, or by Lanczos for a large dense matrix in a report without full spectra.
    """
    dense_large = C.structure in ("full", "operator") and C.size > DENSE_EIGH_LIMIT and not C.has_eigh
    if s.full_spectrum or not dense_large:
        w = C.eigvalsh()
        return float(w[0]), float(w[-1])
    from scipy.sparse.linalg import ArpackNoConvergence, eigsh

    top = float(C.top_eigen(1).values[0])
    try:
        low = float(eigsh(C.as_linear_operator(), k=1, which="SA", tol=1e-10, maxiter=20 * C.size,
                          return_eigenvectors=False)[0])
    except ArpackNoConvergence:
        s.notes.append(f"the smallest eigenvalue of a {C.size}×{C.size} matrix did not converge (Lanczos)")
        low = math.nan
    return low, top


def _spectrum_table(s: _Setup, C: CurvatureMatrix | None, ggn: CurvatureMatrix | None) -> xr.Dataset:
    """Return the spectrum variables of one matrix.

    eigenvalues (eig), fraction_below (damping), negative_mass, min_eigenvalue; positive_definite (damping):
    C + λI counts as positive definite when its smallest eigenvalue exceeds the singularity threshold of the
    solves, ``curvlab.linalg.base.singular_tolerance(max|eig| + λ, P)`` (√P·ε·(max|eig| + λ)).
    """
    out = {"fraction_below": s.empty("damping"), "positive_definite": s.empty("damping"),
           "negative_mass": s.empty(), "min_eigenvalue": s.empty()}
    if s.full_spectrum:
        out["eigenvalues"] = s.empty("eig")
    if C is None:
        return xr.Dataset(out)
    if s.full_spectrum:
        out["eigenvalues"][:] = eigenvalues(C).detach().cpu().double().numpy()
        out["fraction_below"][:] = [fraction_below(C, lam) for lam in s.dampings]
        out["negative_mass"] = xr.DataArray(negative_mass(C, ggn))
    low, high = _extreme_eigenvalues(s, C)
    out["min_eigenvalue"] = xr.DataArray(low)
    if math.isfinite(low):
        scale = max(abs(low), abs(high))
        out["positive_definite"][:] = [float(low + lam > singular_tolerance(scale + lam, C.size, C.dtype))
                                       for lam in s.dampings]
    return xr.Dataset(out)


def _blockwise_values(value: Any, names: Sequence[str]) -> list[float]:
    """Return a comparator's Blockwise result in the order of ``names`` ('all', then the blocks)."""
    return [float(value.total) if n == "all" else float(value.blocks.get(n, value.total)) for n in names]


#: below this a relative error from ‖A‖² + ‖B‖² − 2⟨A, B⟩ is cancellation noise: recomputed densely
_CANCELLATION = 1e-6


def _relative_errors(s: _Setup, C: CurvatureMatrix, B: CurvatureMatrix) -> list[float]:
    """Return ‖C − B‖_F/‖B‖_F whole and per block.

    Where two structures left only the expansion
    ‖C‖² + ‖B‖² − 2⟨C, B⟩ (digits lost when C ≈ B, e.g. KFAC on a layer where it is exact against a
    low-rank GGN) and the block fits the budget thrice, the difference is taken densely.
    """
    out = _blockwise_values(relative_error(C, B, blocks=s.block_spec), s.block_names)
    for i, sl in enumerate(_slices(s)):
        a, b = restrict(C, sl), restrict(B, sl)
        n = sl.stop - sl.start
        if 0 < out[i] < _CANCELLATION and a is not b and 3 * memory.nbytes((n, n), C.dtype) <= memory.get_budget():
            out[i] = float(torch.linalg.matrix_norm(a.to_dense() - b.to_dense().to(a.dtype)) / b.frobenius_norm())
    return out


def _agreement_table(s: _Setup, name: str, C: CurvatureMatrix | None, refs: _References,
                     builds: _Builds) -> xr.Dataset:
    """Return the agreement variables of one method with the references.

    cosine, relative_error (reference, block); wasserstein, subspace_overlap (reference);
    top_ratio (reference, top); wasserstein_log (reference, damping).
    """
    out = {"cosine": s.empty("reference", "block"), "relative_error": s.empty("reference", "block"),
           "wasserstein": s.empty("reference"), "subspace_overlap": s.empty("reference"),
           "top_ratio": s.empty("reference", "top"), "wasserstein_log": s.empty("reference", "damping")}
    if C is None:
        return xr.Dataset(out)
    for r, B in refs.mats.items():
        at = {"reference": r}
        A_, B_ = builds.frobenius_pair(name, C, r, B)
        out["cosine"].loc[at] = _blockwise_values(cosine(A_, B_, blocks=s.block_spec), s.block_names)
        out["relative_error"].loc[at] = _relative_errors(s, A_, B_)
        del A_, B_
        sp = spectra(C, B, k=s.k, full=s.full_spectrum)
        out["wasserstein"].loc[at] = sp.wasserstein
        out["subspace_overlap"].loc[at] = sp.overlap
        out["top_ratio"].loc[at] = sp.top_ratio.detach().cpu().numpy()
        if s.full_spectrum:
            out["wasserstein_log"].loc[at] = [
                spectra(C, B, k=s.k, full=True, damping=lam).wasserstein_log if lam > 0 else sp.wasserstein_log
                for lam in s.dampings]
    return xr.Dataset(out)


def _damped_table(s: _Setup, name: str, method: Any, refs: _References,
                  g: Tensor) -> tuple[xr.Dataset, dict[float, Tensor]]:
    """trace_ratio, logdet_difference (reference, block, damping), and the method's direction at each damping.

    Per damping, so that a dense matrix is factorised once per damping (its logdet, then its solve).
    """
    tr, ld = s.empty("reference", "block", "damping"), s.empty("reference", "block", "damping")
    xs: dict[float, Tensor] = {}
    C = method if isinstance(method, CurvatureMatrix) else None
    for lam in s.dampings:
        if C is not None:
            mine = refs.logdets(name, lam) if refs.mats.get(name) is C else _logdets(s, C, lam)
            for r, B in refs.mats.items():
                at = {"reference": r, "damping": lam}
                tr.loc[at] = _blockwise_values(trace_ratio(C, B, lam, blocks=s.block_spec), s.block_names)
                theirs = refs.logdets(r, lam)
                ld.loc[at] = [mine[b] - theirs[b] for b in s.block_names]
        try:
            xs[lam] = direction_of(method, g, lam, s.mode_of(name)).to(g.dtype)
        except (ValueError, RuntimeError) as exc:
            s.notes.append(f"{name} at damping {lam:g}: {exc}")
    return xr.Dataset({"trace_ratio": tr, "logdet_difference": ld}), xs


def _slices(s: _Setup) -> list[slice]:
    return [slice(0, s.P), *(sl for _, sl in s.block_spec)]


def _factor_table(s: _Setup, C: CurvatureMatrix | None, mode: str) -> xr.Dataset:
    """Return factor_fraction_below (block, damping, factor) of one method.

    Per Kronecker layer, the share of each factor's eigenvalues below that factor's part of the damping
    (the method's factored rule, else π).
    """
    out = s.empty("block", "damping", "factor")
    if C is not None:
        for lam in s.dampings:
            for bname, shares in factor_fraction_below(C, lam, mode).items():
                if bname in s.block_names:
                    out.loc[{"block": bname, "damping": lam}] = list(shares)
    return xr.Dataset({"factor_fraction_below": out})


def _factor_mode(s: _Setup, name: str, C: Any) -> str:
    """Return the factored split (λ_A, λ_G) a method's factors see: its own rule if factored, else π."""
    m = s.mode_of(name)
    if m == "own":
        m = getattr(C, "own_mode", "exact")
    return m if m in ("pi", "factored", "trace") else "pi"


def _step_quality_table(s: _Setup, name: str, xs: Mapping[float, Tensor], refs: _References,
                g: Tensor, loss0: float) -> xr.Dataset:
    """step_norm, slope, alpha, actual_change (damping); energy_error, predicted_change (reference, damping)."""
    out = {v: s.empty("damping") for v in ("step_norm", "slope", "alpha", "actual_change")}
    out.update({v: s.empty("reference", "damping") for v in ("energy_error", "predicted_change")})

    def loss_at(d: Tensor) -> float:
        return s.prob.loss(s.prob.theta + d)

    for lam, x in xs.items():
        at = {"damping": lam}
        out["step_norm"].loc[at] = float(torch.linalg.vector_norm(x))
        out["slope"].loc[at] = float(g @ x)
        for r, B in refs.mats.items():
            x_star, denom = refs.step(r, lam)
            if x_star is not None and denom > 0:
                out["energy_error"].loc[{"reference": r, **at}] = energy_norm(B, x - x_star, lam) / denom
        try:
            a = step_size(s.step, x, g, refs.mats[s.refs[0]], loss_at, loss0)
        except ValueError as exc:
            s.notes.append(f"{name} step size at damping {lam:g}: {exc}")
            continue
        out["alpha"].loc[at] = a
        out["actual_change"].loc[at] = loss_at(a * x) - loss0
        for r, B in refs.mats.items():
            out["predicted_change"].loc[{"reference": r, **at}] = a * float(g @ x) + 0.5 * a * a * float(x @ (B @ x))
    return xr.Dataset(out)


def _method_tables(s: _Setup, name: str, method: Any, refs: _References, ggn: CurvatureMatrix | None,
                   g: Tensor, loss0: float, builds: _Builds) -> tuple[xr.Dataset, dict[float, Tensor]]:
    """Every per-method table of one method, merged (no ``method`` dimension yet), and its directions."""
    C = method if isinstance(method, CurvatureMatrix) else None
    bar = builds.bar
    bar.stage(f"spectrum of {name}")
    tables = [_spectrum_table(s, C, ggn)]
    bar.stage(f"{name} vs {', '.join(s.refs)}")
    tables.append(_agreement_table(s, name, C, refs, builds))
    bar.stage(f"{name}: trace ratios, logdets and directions")
    damped, xs = _damped_table(s, name, method, refs, g)
    tables.append(damped)
    bar.stage(f"{name}: Kronecker factors")
    tables.append(_factor_table(s, C, _factor_mode(s, name, method)))
    bar.stage(f"{name}: step quality")
    tables.append(_step_quality_table(s, name, xs, refs, g, loss0))
    return xr.merge(tables, join="exact", compat="no_conflicts"), xs


# ---------------------------------------------------------------------------------------- whole-report tables
def _reference_table(s: _Setup, refs: _References) -> xr.Dataset:
    """reference_norm (reference, block): |B|_F and |B_bb|_F."""
    out = s.empty("reference", "block")
    for r, B in refs.mats.items():
        out.loc[{"reference": r}] = [float(restrict(B, sl).frobenius_norm()) for sl in _slices(s)]
    return xr.Dataset({"reference_norm": out})


def _direction_cosine_table(s: _Setup, xs: Mapping[str, Mapping[float, Tensor]]) -> xr.Dataset:
    """direction_cosine (damping, method, versus): cos(x_m, x_m') for every pair with a direction."""
    out = s.empty("damping", "method", "versus")
    for lam in s.dampings:
        have = {m: x[lam] for m, x in xs.items() if lam in x}
        norms = {m: float(torch.linalg.vector_norm(x)) for m, x in have.items()}
        for m, x in have.items():
            out.loc[{"damping": lam, "method": m}] = [
                float(x @ have[v]) / (norms[m] * norms[v]) if v in have and norms[m] > 0 and norms[v] > 0
                else math.nan for v in s.order]
    return xr.Dataset({"direction_cosine": out})


def _scalar_table(s: _Setup, builds: _Builds, loss0: float, g: Tensor) -> xr.Dataset:
    """build_seconds (method); loss and gradient_norm (no dimension)."""
    seconds = s.empty("method")
    seconds[:] = [builds.seconds.get(m, math.nan) for m in s.order]
    return xr.Dataset({"build_seconds": seconds, "loss": xr.DataArray(float(loss0)),
                       "gradient_norm": xr.DataArray(float(torch.linalg.vector_norm(g)))})


def _stack(rows: Mapping[str, xr.Dataset], order: Sequence[str]) -> xr.Dataset:
    """Return the per-method tables along a new ``method`` dimension, in ``order``."""
    return xr.concat([rows[m].expand_dims(method=[m]) for m in order], dim="method", coords="minimal",
                     join="exact")


# ---------------------------------------------------------------------------------------- the report
def report(prob: Problem,
           methods: Sequence[str] | Mapping[str, Any] = _methods.DEFAULT_METHODS,
           damping: Sequence[float] | float = DEFAULT_DAMPING,
           references: Sequence[str] | str = ("ggn",),
           *,
           k: int = 20,
           full_spectrum: bool = True,
           damping_rule: str = "own",
           step: float | str = "armijo",
           mc_samples: int = 1,
           seed: int | None = None,
           skip_unavailable: bool = False,
           progress: bool | Callable[[str], None] | None = None) -> xr.Dataset:
    """Compare ``methods`` with the exact ``references`` on ``prob``; return an ``xarray.Dataset``.

    Parameters
    ----------
    methods:
        registered names (:mod:`curvlab.compare.methods`: every exact kind × structure, the KFAC
        family, the remedies ``saddle-free-newton`` and ``hessian-positive``, ``"sgd"``) or a mapping
        name → CurvatureMatrix / direction callable / registered name.
    damping:
        the dampings λ of the direction, trace, logdet, definiteness and spectral-fraction comparisons.
    references:
        matrix methods to compare against (built if not among ``methods``); the first one is also
        the quadratic model for ``step="model"``.
    k:
        number of top eigenpairs for ratios and subspace overlap.
    full_spectrum:
        compute every eigenvalue of every matrix (the ``eig`` dimension and the Wasserstein
        distances); False: top-k only (Lanczos for large dense matrices).
    damping_rule:
        ``"own"``: each method's registered damping rule (e.g. π-damping for ``kfac-pi``);
        ``"exact"``: (C + λI)⁻¹ for every matrix.
    step:
        step size for the predicted/actual loss changes: a learning rate, ``"model"`` or ``"armijo"``.
    mc_samples, seed:
        Monte-Carlo settings for ``fisher-mc`` and ``kfac-mc`` (seed defaults to the problem's seed).
    skip_unavailable:
        drop methods whose builder raises (e.g. an approximator this installation lacks) with a
        warning instead of failing; they are listed in the attribute ``skipped_methods``.
    progress:
        ``True``: a progress bar with the time left on stderr (one tick per method built and per
        table); a callable: called with a short message as each stage starts; ``None``/``False``
        (default): silent.

    Raises
    ------
    curvlab.memory.MemoryBudgetError
        when the matrices the report would hold at once (after choosing low-rank forms where they
        are cheaper) exceed the memory budget; checked before anything is built.
    """
    if not isinstance(prob, Problem):
        raise TypeError(f"expected a curvlab.Problem; got {type(prob).__name__}")
    order, refs, custom, dampings = check_arguments(methods, damping, references, k=k, damping_rule=damping_rule,
                                                    step=step, mc_samples=mc_samples, seed=seed)
    if not (progress is None or isinstance(progress, bool) or callable(progress)):
        raise TypeError(f"progress must be True, False, None or a callable (message) -> None; got "
                        f"{type(progress).__name__}")
    for name, obj in custom.items():
        if isinstance(obj, CurvatureMatrix) and obj.size != prob.num_params:
            raise ValueError(f"method {name!r} is a {obj.size}×{obj.size} matrix; the problem has "
                             f"{prob.num_params} parameters")
    s = _Setup(prob, order, refs, custom, dampings, max(1, min(int(k), prob.num_params)), bool(full_spectrum),
               damping_rule, step, mc_samples, int(prob.meta.get("seed", 0)) if seed is None else int(seed))
    plan = _plan(s)
    bar = _Progress(progress, _stage_count(s), f"compare {prob.name}")
    try:
        return _run(s, plan, bar, skip_unavailable)
    finally:
        bar.close()


def _run(s: _Setup, plan: _Plan, bar: _Progress, skip_unavailable: bool) -> xr.Dataset:
    """Build the anchors, then each method in turn (its tables, then release), then the whole-report tables."""
    builds = _Builds(s, plan, bar, skip_unavailable)
    anchors = builds.anchors()
    ggn = anchors.get("ggn") if isinstance(anchors.get("ggn"), CurvatureMatrix) else None
    g, loss0 = s.prob.gradient(), s.prob.loss()
    refs = _References(s, anchors, g)
    rows: dict[str, xr.Dataset] = {}
    xs: dict[str, dict[float, Tensor]] = {}
    names = list(s.order)
    for i, name in enumerate(names):
        method = builds.get(name)
        if method is not None:
            builds.prepare(name, names[i + 1:])
            rows[name], xs[name] = _method_tables(s, name, method, refs, ggn, g, loss0, builds)
        method = None  # nothing here keeps it alive past its release
        builds.release(names[i + 1:])
    s.order = [m for m in names if m in rows]
    if not s.order:
        raise ValueError(f"no method could be built (skipped: {builds.skipped})")
    bar.stage("direction cosines")
    tables = [_stack(rows, s.order), _reference_table(s, refs), _direction_cosine_table(s, xs),
              _scalar_table(s, builds, loss0, g)]
    return _assemble(s, plan, builds, xr.merge(tables, join="exact", compat="no_conflicts"), ggn is not None)


def _coordinates(s: _Setup, builds: _Builds) -> dict[str, xr.Variable]:
    """Return the dimension coordinates and the per-method / per-block labels, with descriptions."""

    def per_method(field_: str, default: str) -> np.ndarray:
        return np.array([getattr(s.spec_of(m), field_) if s.spec_of(m) is not None else default for m in s.order],
                        dtype=str)

    structures = [s.spec_of(m).structure if s.spec_of(m) is not None else builds.representation[m]
                  for m in s.order]
    coords = {
        "method": ("method", np.array(s.order, dtype=str), {"description": "compared method (registry name)"}),
        "reference": ("reference", np.array(s.refs, dtype=str), {"description": "exact matrix compared against"}),
        "block": ("block", np.array(s.block_names, dtype=str),
                  {"description": "'all' = whole matrix, else a block of the problem's partition"}),
        "damping": ("damping", np.array(s.dampings, dtype=np.float64),
                    {"units": "loss / parameter^2", "description": "Tikhonov damping lambda added as lambda I"}),
        "top": ("top", np.arange(1, s.k + 1), {"description": "rank of the top eigenpair (1 = largest)"}),
        "factor": ("factor", np.array(["A", "G"], dtype=str),
                   {"description": "Kronecker factor: A = input second moments, G = output-gradient second moments"}),
        "versus": ("versus", np.array(s.order, dtype=str), {"description": "second method of a pairwise comparison"}),
        "family": ("method", per_method("family", "custom"), {"description": "exact, approx or first-order"}),
        "structure": ("method", np.array(structures, dtype=str),
                      {"description": "representation of the method's matrix"}),
        "representation": ("method", np.array([builds.representation[m] for m in s.order], dtype=str),
                           {"description": "how the report held the method's matrix (full, low_rank, "
                                           "block_low_rank, kron …; vector: a direction only)"}),
        "mode": ("method", np.array([s.mode_of(m) for m in s.order], dtype=str),
                 {"description": "damping rule of the method's directions"}),
        "rung": ("method", per_method("rung", ""),
                 {"description": "rung on the error ladder full > block > kron > MC > empirical"}),
        "block_size": ("block", np.array([s.P, *s.prob.partition.sizes], dtype=np.int64),
                       {"description": "number of parameters in the block"}),
    }
    if s.full_spectrum:
        coords["eig"] = ("eig", np.arange(s.P), {"description": "eigenvalue index, 0 = largest"})
    return {n: xr.Variable(dims, v, attrs=a) for n, (dims, v, a) in coords.items()}


def _attributes(s: _Setup, plan: _Plan, builds: _Builds, have_ggn: bool) -> dict[str, Any]:
    """Provenance, settings, representations, the memory plan, notes and versions."""
    attrs: dict[str, Any] = {"title": f"curvlab agreement report: {s.prob.name}"}
    attrs.update({k_: _attr(v) for k_, v in s.prob.summary().items()})
    reps = [f"{m}: {builds.representation[m]}" + (f" ({plan.why[m]})" if m in plan.why else "")
            for m in dict.fromkeys(s.order + s.refs) if m in builds.representation]
    attrs.update({
        "methods": ", ".join(s.order), "references": ", ".join(s.refs), "skipped_methods": ", ".join(builds.skipped),
        "k": s.k, "full_spectrum": int(bool(s.full_spectrum)), "damping_rule": s.damping_rule,
        "step_rule": str(s.step), "mc_samples": int(s.mc_samples), "mc_seed": s.seed,
        "negative_mass_reference": "ggn" if have_ggn else "sum |eig|",
        "representations": "; ".join(reps),
        "memory_estimate_bytes": int(plan.estimate), "memory_budget_bytes": int(memory.get_budget()),
        "memory_plan": " | ".join([*plan.messages, f"about {_size(plan.estimate)} held at once, within the "
                                   f"budget of {_size(memory.get_budget())}"]),
        "notes": " | ".join(s.notes),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    })
    attrs.update({k_: _attr(v) for k_, v in _versions().items()})
    return attrs


def _assemble(s: _Setup, plan: _Plan, builds: _Builds, merged: xr.Dataset, have_ggn: bool) -> xr.Dataset:
    """Return the final Dataset: float64 variables with units and descriptions, coordinates, attributes."""
    data_vars = {name: xr.Variable(merged[name].dims, np.asarray(merged[name].values, dtype=np.float64),
                                   attrs={"units": VARIABLES[name][0], "description": VARIABLES[name][1]})
                 for name in VARIABLES if name in merged}
    return xr.Dataset(data_vars, coords=_coordinates(s, builds), attrs=_attributes(s, plan, builds, have_ggn))


# ---------------------------------------------------------------------------------------- files
def save(ds: xr.Dataset, path: str | os.PathLike) -> Path:
    """Write ``ds`` as netCDF (engine h5netcdf) atomically: a temp file in the same folder, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        ds.to_netcdf(tmp, engine="h5netcdf")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the result is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def load(path: str | os.PathLike) -> xr.Dataset:
    """Read a report written by :func:`save` fully into memory (the file is closed afterwards)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such report: {path}")
    return xr.load_dataset(path, engine="h5netcdf")


# ---------------------------------------------------------------------------------------- text
def _cell(v: float, fmt: str) -> str:
    if np.isnan(v):
        return "—"
    text = format(v, fmt)
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def _fmt_table(row_names: Sequence[str], col_names: Sequence[str], values: np.ndarray, fmt: str,
               corner: str = "", width: int = 9) -> str:
    w0 = max([len(corner), *(len(r) for r in row_names)]) + 2
    w = max([width, *(len(c) + 2 for c in col_names)])
    lines = [corner.ljust(w0) + "".join(c.rjust(w) for c in col_names)]
    for r, row in zip(row_names, values):
        lines.append(r.ljust(w0) + "".join(_cell(v, fmt).rjust(w) for v in row))
    return "\n".join(lines)


def _matrix_table(ds: xr.Dataset, reference: str, damping: float) -> str:
    """Frobenius cosine (relative error) per block, top-k overlap and W1(log) of every matrix method."""
    methods = [str(m) for m in ds.method.values]
    blocks = [str(b) for b in ds.block.values]
    cos_all = ds["cosine"].sel({"reference": reference, "block": "all"}).values
    mat = [m for m, c in zip(methods, cos_all) if not np.isnan(c)]
    spectra = "eigenvalues" in ds
    head = (f"\nMatrix agreement with {reference}: Frobenius cosine (relative Frobenius error), whole matrix "
            f"('all') and per block;\noverlap = mean squared cosine of the top-{ds.sizes['top']} eigenspaces"
            + ("; W1(log) = Wasserstein-1 of log10 eigenvalues at λ" if spectra else ""))
    if not mat:
        return head + "\n(no matrix methods in this report: only directions, e.g. sgd)"
    cos = ds["cosine"].sel({"reference": reference, "method": mat}).values
    rel = ds["relative_error"].sel({"reference": reference, "method": mat}).values
    w0 = max([8, *(len(m) for m in mat)]) + 2
    w = max([16, *(len(b) + 2 for b in blocks)])
    lines = [head, "method".ljust(w0) + "".join(b.rjust(w) for b in blocks)
             + "overlap".rjust(10) + (" W1(log)".rjust(10) if spectra else "")]
    for i, m in enumerate(mat):
        cells = "".join(f"{cos[i, b]:.3f} ({rel[i, b]:.2g})".rjust(w) for b in range(len(blocks)))
        extra = f"{float(ds['subspace_overlap'].sel({'method': m, 'reference': reference})):.3f}".rjust(10)
        if spectra:
            wl = float(ds["wasserstein_log"].sel({"method": m, "reference": reference, "damping": damping}))
            extra += f"{wl:.3f}".rjust(10)
        lines.append(m.ljust(w0) + cells + extra)
    return "\n".join(lines)


def _step_table(ds: xr.Dataset, reference: str, damping: float) -> str:
    """Step norm, energy error, step size, predicted and actual loss change of every method."""
    dsel = ds.sel({"damping": damping})
    head = (f"\nStep quality against {reference}: |x| step norm; energy err = |x - x*|_(B+λI) / |x*|_(B+λI), "
            f"x* = -(B+λI)^-1 g;\nalpha = step size ({ds.attrs.get('step_rule')}); predicted = change of the "
            f"quadratic model of {reference}; actual = L(θ + alpha x) - L(θ)")
    cols = ["|x|", "energy err", "alpha", "predicted", "actual"]
    vals = np.stack([dsel["step_norm"].values, dsel["energy_error"].sel({"reference": reference}).values,
                     dsel["alpha"].values, dsel["predicted_change"].sel({"reference": reference}).values,
                     dsel["actual_change"].values], axis=1)
    return head + "\n" + _fmt_table(_marked(ds, damping), cols, vals, ".3g", "method")


#: what marks a method whose C + λI is not positive definite in the text tables (the figures: ``*``)
INDEFINITE_MARK = " *"


def not_positive_definite(ds: xr.Dataset, damping: float) -> list[str]:
    """Return the methods whose C + λI is not positive definite at ``damping``.

    Empty for reports without the variable.
    """
    if "positive_definite" not in ds:
        return []
    pd = ds["positive_definite"].sel({"damping": damping}).values
    return [str(m) for m, v in zip(ds.method.values, pd) if v == 0]


def _marked(ds: xr.Dataset, damping: float) -> list[str]:
    """Return the method names, those with C + λI not positive definite at ``damping`` marked."""
    bad = set(not_positive_definite(ds, damping))
    return [str(m) + (INDEFINITE_MARK if str(m) in bad else "") for m in ds.method.values]


def _definiteness_table(ds: xr.Dataset, damping: float) -> str:
    """Smallest eigenvalue of every matrix and whether C + λI is positive definite at each damping."""
    if "min_eigenvalue" not in ds:
        return ""
    low = ds["min_eigenvalue"].values
    rows = [i for i, v in enumerate(low) if np.isfinite(v)]
    if not rows:
        return ""
    pd = ds["positive_definite"].values
    names = [str(ds.method.values[i]) for i in rows]
    cols = ["λ_min"] + [f"λ={float(d):g}" for d in ds.damping.values]
    w0 = max([8, *(len(n) for n in names)]) + 2
    w = max([11, *(len(c) + 2 for c in cols)])
    lines = ["method".ljust(w0) + "".join(c.rjust(w) for c in cols)]
    for i, n in zip(rows, names):
        cells = [f"{low[i]:.3g}"] + ["—" if np.isnan(v) else ("yes" if v else "NO") for v in pd[i]]
        lines.append(n.ljust(w0) + "".join(c.rjust(w) for c in cells))
    bad = not_positive_definite(ds, damping)
    foot = (f"\n{INDEFINITE_MARK.strip()} marks below: C + λI is not positive definite at λ = {damping:g} "
            f"({', '.join(bad)}); its step -(C + λI)^-1 g need not be a descent direction\n  (remedies: "
            "saddle-free-newton, hessian-positive)") if bad else ""
    return ("\nDefiniteness: smallest eigenvalue λ_min of each matrix, and whether C + λI is positive definite"
            "\n" + "\n".join(lines) + foot)


def _report_choice(ds: xr.Dataset, reference: str | Sequence[str] | None,
                   damping: float | None) -> tuple[list[str], float]:
    """Return the references (default: all of them) and the damping (default: the middle one) to format."""
    if not isinstance(ds, xr.Dataset):
        raise TypeError(f"expected the xarray.Dataset of curvlab.compare.report; got {type(ds).__name__}")
    missing = [v for v in ("cosine", "relative_error", "direction_cosine", "step_norm", "loss") if v not in ds]
    if missing:
        raise ValueError(f"not a curvlab compare report: it lacks the variables {', '.join(missing)}")
    have = [str(r) for r in ds.reference.values]
    refs = have if reference is None else [reference] if isinstance(reference, str) else list(reference)
    unknown = [r for r in refs if r not in have]
    if unknown or not refs:
        given = ", ".join(map(repr, unknown)) if unknown else repr(reference)
        raise ValueError(f"reference {given} is not in the report; it has {', '.join(have)}")
    values = [float(d) for d in ds.damping.values]
    if damping is None:
        return refs, values[len(values) // 2]
    match = [d for d in values if math.isclose(d, float(damping), rel_tol=1e-9, abs_tol=0.0)]
    if not match:
        raise ValueError(f"damping {damping!r} is not in the report; it has {', '.join(f'{d:g}' for d in values)}")
    return refs, match[0]


def format_report(ds: xr.Dataset, reference: str | Sequence[str] | None = None, damping: float | None = None) -> str:
    """Return the report as text: matrix agreement per block, definiteness, direction agreement and step quality.

    ``reference``: one reference or several (default: every reference of the report, a matrix
    table and a step-quality table for each); ``damping``: one of the report's dampings (default:
    the middle one). A report of direction methods only (e.g. ``sgd``) has no matrix table. A method
    whose C + λI is not positive definite at that damping is marked ``*`` in the direction and step
    tables (its step need not be a descent direction); the definiteness table lists every damping.
    """
    refs, damping = _report_choice(ds, reference, damping)
    methods = _marked(ds, damping)
    out = [f"{ds.attrs.get('title', 'curvlab report')}  (N={ds.attrs.get('num_samples')}, "
           f"P={ds.attrs.get('num_params')}, loss={float(ds['loss']):.4f}, |g|={float(ds['gradient_norm']):.3e})"]
    out += [_matrix_table(ds, r, damping) for r in refs]
    out += [t for t in (_definiteness_table(ds, damping),) if t]
    out.append(f"\nUpdate directions at damping {damping:g} (damping rule: {ds.attrs.get('damping_rule')}): "
               "pairwise cosine")
    dc = ds["direction_cosine"].sel({"damping": damping}).values
    if len(methods) <= 8:
        out.append(_fmt_table(methods, methods, dc, ".2f", "method"))
    else:  # numbered columns keep the table narrow
        rows = [f"{i + 1:>2} {m}" for i, m in enumerate(methods)]
        out.append(_fmt_table(rows, [str(i + 1) for i in range(len(methods))], dc, ".2f", "", width=6))
    out += [_step_table(ds, r, damping) for r in refs]
    if ds.attrs.get("skipped_methods"):
        out.append(f"\nskipped (not available): {ds.attrs['skipped_methods']}")
    return "\n".join(out)
