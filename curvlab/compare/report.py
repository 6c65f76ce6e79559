"""The agreement report: every comparator over methods × references × blocks × dampings, as xarray.

    ds = curvlab.compare.report(prob, methods=["ggn-block", "kfac", "sgd"], references=["ggn"],
                                damping=[1e-3, 1e-2])
    curvlab.compare.save(ds, "data/results/digits-mlp.nc")     # atomic netCDF (h5netcdf)
    ds = curvlab.compare.load("data/results/digits-mlp.nc")

Dimensions: ``method`` (the compared methods), ``reference`` (exact matrices compared against),
``block`` ("all" = the whole matrix, then the blocks of ``prob.partition``), ``damping``, ``eig``
(eigenvalue index, 0 = largest), ``top`` (rank of the top-k eigenpairs, 1 … k), ``factor`` (A, G:
the Kronecker factors) and ``versus`` (the methods again, second axis of the direction-cosine
matrix). Every variable carries ``units`` and
``description`` attributes (see :data:`VARIABLES`); the Dataset's attributes hold the problem's
provenance (``prob.summary()``), the settings and the library versions. Values that do not exist
for a method (a spectrum of ``sgd``, a logdet of an indefinite Hessian) are NaN.

Selecting: ``ds.sel(method="kfac")`` does not work, since ``method`` is also the name of ``sel``'s
own interpolation argument; write ``ds.sel({"method": "kfac"})`` or ``ds.loc[{"method": "kfac"}]``.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import Tensor

from curvlab.compare import methods as _methods
from curvlab.compare.directions import direction_of, energy_norm, step_size
from curvlab.compare.kron import factor_fraction_below
from curvlab.compare.matrices import cosine, logdet_difference, relative_error, restrict, trace_ratio
from curvlab.compare.spectra import eigenvalues, fraction_below, negative_mass, spectra
from curvlab.linalg import CurvatureMatrix
from curvlab.problem import Problem

__all__ = ["report", "check_arguments", "save", "load", "format_report", "VARIABLES", "DEFAULT_DAMPING"]

DEFAULT_DAMPING: tuple[float, ...] = (1e-3, 1e-2, 1e-1)

#: variable → (dimensions, units, description)
VARIABLES: dict[str, tuple[tuple[str, ...], str, str]] = {
    "cosine": (("method", "reference", "block"), "1",
               "Frobenius cosine <A,B>_F / (|A|_F |B|_F) of the method's matrix A and the reference B, "
               "on the whole matrix (block 'all') or on the diagonal blocks A_bb, B_bb"),
    "relative_error": (("method", "reference", "block"), "1",
                       "relative Frobenius error |A - B|_F / |B|_F (block 'all' includes the cross-block mass "
                       "a block-diagonal A misses)"),
    "trace_ratio": (("method", "reference", "block", "damping"), "1", "tr(A + damping I) / tr(B + damping I)"),
    "logdet_difference": (("method", "reference", "block", "damping"), "nat",
                          "log det(A + damping I) - log det(B + damping I) (NaN if not positive definite)"),
    "eigenvalues": (("method", "eig"), "loss / parameter^2", "all eigenvalues of the method's matrix, descending"),
    "wasserstein": (("method", "reference"), "loss / parameter^2",
                    "Wasserstein-1 distance between the eigenvalue distributions of A and B"),
    "wasserstein_log": (("method", "reference", "damping"), "decade",
                        "Wasserstein-1 distance between log10(max(eig, 0) + damping) of A and of B"),
    "top_ratio": (("method", "reference", "top"), "1", "ratio of the i-th largest eigenvalues, eig_i(A) / eig_i(B)"),
    "subspace_overlap": (("method", "reference"), "1",
                         "mean squared cosine of the principal angles between the top-k eigenspaces of A and B "
                         "(1: same subspace, 0: orthogonal)"),
    "fraction_below": (("method", "damping"), "1",
                       "fraction of the method's eigenvalues below the damping (the share the damping swamps)"),
    "factor_fraction_below": (("method", "block", "damping", "factor"), "1",
                              "per Kronecker layer: fraction of the eigenvalues of factor A (inputs) or G (output "
                              "gradients) below that factor's damping share (the method's factored rule, else pi)"),
    "negative_mass": (("method",), "1",
                      "sum of |negative eigenvalues| of the method's matrix over tr(GGN) "
                      "(over sum |eig| without a GGN)"),
    "direction_cosine": (("damping", "method", "versus"), "1",
                         "cosine between the update directions of two methods for the full-batch gradient"),
    "step_norm": (("method", "damping"), "parameter",
                  "Euclidean norm of the update direction x (before the step size)"),
    "slope": (("method", "damping"), "loss", "directional derivative g^T x (negative: descent direction)"),
    "energy_error": (("method", "reference", "damping"), "1",
                     "|x - x*|_{B + damping I} / |x*|_{B + damping I}, x* = -(B + damping I)^-1 g the exact damped "
                     "step of the reference"),
    "alpha": (("method", "damping"), "1", "step size taken along x (see attribute step_rule)"),
    "predicted_change": (("method", "reference", "damping"), "loss",
                         "change of the local quadratic model alpha g^T x + alpha^2/2 x^T B x with the reference's "
                         "curvature B"),
    "actual_change": (("method", "damping"), "loss", "actual loss change L(theta + alpha x) - L(theta)"),
    "reference_norm": (("reference", "block"), "loss / parameter^2",
                       "Frobenius norm of the reference |B|_F (block 'all') or of its diagonal block |B_bb|_F"),
    "build_seconds": (("method",), "s", "wall-clock time to build the method's matrix"),
    "loss": ((), "loss", "loss L(theta) at the evaluation point"),
    "gradient_norm": ((), "loss / parameter", "Euclidean norm of the full-batch gradient"),
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
    """A netCDF-safe attribute value (plain str, int or float)."""
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


def _float(x: Tensor | float) -> float:
    return float(x)


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
    """Check :func:`report`'s arguments without building anything; raise ``ValueError``/``TypeError`` naming
    the offending value.

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
           progress: Callable[[str], None] | None = None) -> xr.Dataset:
    """Compare ``methods`` with the exact ``references`` on ``prob``; return an ``xarray.Dataset``.

    Parameters
    ----------
    methods:
        registered names (:mod:`curvlab.compare.methods`: every exact kind × structure, the KFAC
        family, ``"sgd"``) or a mapping name → CurvatureMatrix / direction callable / registered name.
    damping:
        the dampings λ of the direction, trace, logdet and spectral-fraction comparisons.
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
        called with a short message before each stage.
    """
    if not isinstance(prob, Problem):
        raise TypeError(f"expected a curvlab.Problem; got {type(prob).__name__}")
    order, refs, custom, dampings = check_arguments(methods, damping, references, k=k, damping_rule=damping_rule,
                                                    step=step, mc_samples=mc_samples, seed=seed)
    say = progress or (lambda msg: None)
    seed = int(prob.meta.get("seed", 0)) if seed is None else int(seed)
    for name, obj in custom.items():
        if isinstance(obj, CurvatureMatrix) and obj.size != prob.num_params:
            raise ValueError(f"method {name!r} is a {obj.size}×{obj.size} matrix; the problem has "
                             f"{prob.num_params} parameters")

    # ---------------------------------------------------------------- build
    cache: dict[str, Any] = {}
    built: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    skipped: list[str] = []
    notes: list[str] = []
    for name in dict.fromkeys(refs + order):
        if name in custom:
            built[name] = custom[name]
            seconds[name] = math.nan
            continue
        say(f"building {name}")
        t0 = time.perf_counter()
        try:
            built[name] = _methods.build(name, prob, cache, mc_samples=mc_samples, seed=seed)
        except Exception as exc:
            if not skip_unavailable or name in refs:
                raise
            skipped.append(name)
            warnings.warn(f"report: skipping {name!r}: {exc}", stacklevel=2)
            continue
        seconds[name] = time.perf_counter() - t0
    order = [m for m in order if m in built]
    if not order:
        raise ValueError(f"no method could be built (skipped: {skipped})")
    for r in refs:
        if not isinstance(built[r], CurvatureMatrix):
            raise ValueError(f"reference {r!r} is not a matrix method")

    def spec_of(name: str) -> _methods.MethodSpec | None:
        return None if name in custom else _methods.spec(name)

    def mode_of(name: str) -> str:
        """The damping rule of a method's directions (registry "own" follows damping_rule)."""
        s = spec_of(name)
        if s is None:
            return "exact"
        if s.mode == "own":
            return "own" if damping_rule == "own" else "exact"
        return s.mode

    def factor_mode(name: str) -> str:
        """The factored split (λ_A, λ_G) a method's factors see: its own rule if factored, else π."""
        m = mode_of(name)
        if m == "own":
            m = getattr(built[name], "own_mode", "exact")
        return m if m in ("pi", "factored", "trace") else "pi"

    M, R, D = len(order), len(refs), len(dampings)
    block_names = ["all", *prob.partition.names]
    block_spec = [(b.name, b.slice) for b in prob.partition]
    B = len(block_names)
    P = prob.num_params
    k = max(1, min(int(k), P))
    nan = math.nan
    mats = {m: built[m] for m in order if isinstance(built[m], CurvatureMatrix)}

    # ---------------------------------------------------------------- spectra first (later logdets reuse them)
    eig = np.full((M, P), nan)
    if full_spectrum:
        for i, m in enumerate(order):
            if m in mats:
                say(f"spectrum of {m}")
                eig[i] = eigenvalues(mats[m]).detach().cpu().double().numpy()
        for r in refs:
            if r not in mats:
                eigenvalues(built[r])

    # ---------------------------------------------------------------- matrix agreement
    cos = np.full((M, R, B), nan)
    rel = np.full((M, R, B), nan)
    tr = np.full((M, R, B, D), nan)
    ld = np.full((M, R, B, D), nan)
    w1 = np.full((M, R), nan)
    w1log = np.full((M, R, D), nan)
    ratio = np.full((M, R, k), nan)
    overlap = np.full((M, R), nan)
    for j, r in enumerate(refs):
        Bm = built[r]
        for i, m in enumerate(order):
            if m not in mats:
                continue
            A = mats[m]
            say(f"{m} vs {r}")
            c = cosine(A, Bm, blocks=block_spec)
            e = relative_error(A, Bm, blocks=block_spec)
            cos[i, j] = [c[b] for b in block_names]
            rel[i, j] = [e[b] for b in block_names]
            sp = spectra(A, Bm, k=k, full=full_spectrum)
            w1[i, j] = sp.wasserstein
            overlap[i, j] = sp.overlap
            ratio[i, j] = sp.top_ratio.detach().cpu().numpy()
            if full_spectrum:
                for d, lam in enumerate(dampings):
                    w1log[i, j, d] = spectra(A, Bm, k=k, full=True, damping=lam).wasserstein_log if lam > 0 \
                        else sp.wasserstein_log

    ref_norm = np.full((R, B), nan)
    for j, r in enumerate(refs):
        ref_norm[j] = [float(built[r].frobenius_norm())] + [float(restrict(built[r], s).frobenius_norm())
                                                             for _, s in block_spec]

    frac = np.full((M, D), nan)
    neg = np.full((M,), nan)
    ggn = built.get("ggn") if isinstance(built.get("ggn"), CurvatureMatrix) else None
    if full_spectrum:
        for i, m in enumerate(order):
            if m in mats:
                frac[i] = [fraction_below(mats[m], lam) for lam in dampings]
                neg[i] = negative_mass(mats[m], ggn)

    ffrac = np.full((M, B, D, 2), nan)
    for i, m in enumerate(order):
        if m not in mats:
            continue
        for d, lam in enumerate(dampings):
            per = factor_fraction_below(mats[m], lam, factor_mode(m))
            for b, bname in enumerate(block_names):
                if bname in per:
                    ffrac[i, b, d] = per[bname]

    # ---------------------------------------------------------------- directions
    g = prob.gradient()
    loss0 = prob.loss()

    def loss_at(d: Tensor) -> float:
        return prob.loss(prob.theta + d)

    dcos = np.full((D, M, M), nan)
    norm = np.full((M, D), nan)
    slope = np.full((M, D), nan)
    alpha = np.full((M, D), nan)
    actual = np.full((M, D), nan)
    eerr = np.full((M, R, D), nan)
    pred = np.full((M, R, D), nan)
    for d, lam in enumerate(dampings):
        # per damping, so that a dense matrix is factorised once per damping (logdets, then solves)
        say(f"trace ratios and logdets at damping {lam:g}")
        for j, r in enumerate(refs):
            for i, m in enumerate(order):
                if m not in mats:
                    continue
                A, Bm = mats[m], built[r]
                t = trace_ratio(A, Bm, lam, blocks=block_spec)
                tr[i, j, :, d] = [t[b] for b in block_names]
                try:
                    ldiff = logdet_difference(A, Bm, lam, blocks=block_spec)
                    ld[i, j, :, d] = [ldiff[b] for b in block_names]
                except ValueError:  # not positive definite as a whole: try block by block
                    for b, (_, s) in enumerate([("all", slice(0, P)), *block_spec]):
                        try:
                            ld[i, j, b, d] = float(logdet_difference(A, Bm, lam, blocks=[("x", s)])["x"])
                        except ValueError:
                            pass
        say(f"directions at damping {lam:g}")
        xs: dict[int, Tensor] = {}
        for i, m in enumerate(order):
            try:
                xs[i] = direction_of(built[m], g, lam, mode_of(m)).to(g.dtype)
            except (ValueError, RuntimeError) as exc:
                notes.append(f"{m} at damping {lam:g}: {exc}")
        for i, x in xs.items():
            norm[i, d] = float(torch.linalg.vector_norm(x))
            slope[i, d] = float(g @ x)
            for i2, x2 in xs.items():
                n1, n2 = norm[i, d], float(torch.linalg.vector_norm(x2))
                dcos[d, i, i2] = float(x @ x2) / (n1 * n2) if n1 > 0 and n2 > 0 else nan
            try:
                a = step_size(step, x, g, built[refs[0]], loss_at, loss0)
            except ValueError as exc:
                notes.append(f"{order[i]} step size at damping {lam:g}: {exc}")
                continue
            alpha[i, d] = a
            actual[i, d] = loss_at(a * x) - loss0
        for j, r in enumerate(refs):
            C = built[r]
            try:
                x_star = -C.solve(g, lam)
            except (ValueError, RuntimeError) as exc:
                notes.append(f"reference {r} at damping {lam:g}: {exc}")
                x_star = None
            denom = energy_norm(C, x_star, lam) if x_star is not None else nan
            for i, x in xs.items():
                if x_star is not None and denom > 0:
                    eerr[i, j, d] = energy_norm(C, x - x_star, lam) / denom
                if not math.isnan(alpha[i, d]):
                    a = alpha[i, d]
                    pred[i, j, d] = a * float(g @ x) + 0.5 * a * a * float(x @ (C @ x))

    # ---------------------------------------------------------------- assemble
    values = {"cosine": cos, "relative_error": rel, "trace_ratio": tr, "logdet_difference": ld,
              "wasserstein": w1, "wasserstein_log": w1log, "top_ratio": ratio, "subspace_overlap": overlap,
              "fraction_below": frac,
              "factor_fraction_below": ffrac, "negative_mass": neg, "direction_cosine": dcos, "step_norm": norm,
              "slope": slope, "energy_error": eerr, "alpha": alpha, "predicted_change": pred,
              "actual_change": actual,
              "reference_norm": ref_norm, "build_seconds": np.array([seconds.get(m, nan) for m in order]),
              "loss": np.array(loss0), "gradient_norm": np.array(float(torch.linalg.vector_norm(g)))}
    if full_spectrum:
        values["eigenvalues"] = eig
    data_vars = {}
    for name, arr in values.items():
        dims, units, desc = VARIABLES[name]
        data_vars[name] = xr.Variable(dims, np.asarray(arr, dtype=np.float64),
                                      attrs={"units": units, "description": desc})

    def method_coord(field: str, default: str) -> np.ndarray:
        out = []
        for m in order:
            s = spec_of(m)
            out.append(getattr(s, field) if s is not None else default)
        return np.array(out, dtype=str)

    structures = np.array([(spec_of(m).structure if spec_of(m) is not None else
                            getattr(built[m], "structure", "vector")) for m in order], dtype=str)
    coords = {
        "method": ("method", np.array(order, dtype=str), {"description": "compared method (registry name)"}),
        "reference": ("reference", np.array(refs, dtype=str), {"description": "exact matrix compared against"}),
        "block": ("block", np.array(block_names, dtype=str),
                  {"description": "'all' = whole matrix, else a block of the problem's partition"}),
        "damping": ("damping", np.array(dampings, dtype=np.float64),
                    {"units": "loss / parameter^2", "description": "Tikhonov damping lambda added as lambda I"}),
        "top": ("top", np.arange(1, k + 1), {"description": "rank of the top eigenpair (1 = largest)"}),
        "factor": ("factor", np.array(["A", "G"], dtype=str),
                   {"description": "Kronecker factor: A = input second moments, G = output-gradient second moments"}),
        "versus": ("versus", np.array(order, dtype=str), {"description": "second method of a pairwise comparison"}),
        "family": ("method", method_coord("family", "custom"), {"description": "exact, approx or first-order"}),
        "structure": ("method", structures, {"description": "representation of the method's matrix"}),
        "mode": ("method", np.array([mode_of(m) for m in order], dtype=str),
                 {"description": "damping rule of the method's directions"}),
        "rung": ("method", method_coord("rung", ""),
                 {"description": "rung on the error ladder full > block > kron > MC > empirical"}),
        "block_size": ("block", np.array([P, *prob.partition.sizes], dtype=np.int64),
                       {"description": "number of parameters in the block"}),
    }
    if full_spectrum:
        coords["eig"] = ("eig", np.arange(P), {"description": "eigenvalue index, 0 = largest"})
    coords = {n: xr.Variable(dims, v, attrs=a) for n, (dims, v, a) in coords.items()}

    attrs: dict[str, Any] = {"title": f"curvlab agreement report: {prob.name}"}
    attrs.update({k_: _attr(v) for k_, v in prob.summary().items()})
    attrs.update({
        "methods": ", ".join(order), "references": ", ".join(refs), "skipped_methods": ", ".join(skipped),
        "k": k, "full_spectrum": int(bool(full_spectrum)), "damping_rule": damping_rule,
        "step_rule": str(step), "mc_samples": int(mc_samples), "mc_seed": seed,
        "negative_mass_reference": "ggn" if ggn is not None else "sum |eig|",
        "notes": " | ".join(notes),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    })
    attrs.update({k_: _attr(v) for k_, v in _versions().items()})
    return xr.Dataset(data_vars, coords=coords, attrs=attrs)


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
    methods = [str(m) for m in ds.method.values]
    head = (f"\nStep quality against {reference}: |x| step norm; energy err = |x - x*|_(B+λI) / |x*|_(B+λI), "
            f"x* = -(B+λI)^-1 g;\nalpha = step size ({ds.attrs.get('step_rule')}); predicted = change of the "
            f"quadratic model of {reference}; actual = L(θ + alpha x) - L(θ)")
    cols = ["|x|", "energy err", "alpha", "predicted", "actual"]
    vals = np.stack([dsel["step_norm"].values, dsel["energy_error"].sel({"reference": reference}).values,
                     dsel["alpha"].values, dsel["predicted_change"].sel({"reference": reference}).values,
                     dsel["actual_change"].values], axis=1)
    return head + "\n" + _fmt_table(methods, cols, vals, ".3g", "method")


def _report_choice(ds: xr.Dataset, reference: str | Sequence[str] | None,
                   damping: float | None) -> tuple[list[str], float]:
    """The references (default: all of them) and the damping (default: the middle one) to format."""
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
    """The report as text: matrix agreement per block, direction agreement and step quality at one damping.

    ``reference``: one reference or several (default: every reference of the report, a matrix
    table and a step-quality table for each); ``damping``: one of the report's dampings (default:
    the middle one). A report of direction methods only (e.g. ``sgd``) has no matrix table.
    """
    refs, damping = _report_choice(ds, reference, damping)
    methods = [str(m) for m in ds.method.values]
    out = [f"{ds.attrs.get('title', 'curvlab report')}  (N={ds.attrs.get('num_samples')}, "
           f"P={ds.attrs.get('num_params')}, loss={float(ds['loss']):.4f}, |g|={float(ds['gradient_norm']):.3e})"]
    out += [_matrix_table(ds, r, damping) for r in refs]
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
