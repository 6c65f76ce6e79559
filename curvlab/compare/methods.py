"""The method registry: every name a comparison accepts, and how to build it from a Problem.

One place maps a name to a builder. A method is either a CurvatureMatrix (whose update direction
is ``C.direction(g, λ, mode)`` with the registered ``mode``) or a direction callable
``(g, λ) -> x`` (``"sgd"``: x = −g).

Names
-----
exact (the oracle, ``curvlab.exact``), every kind × structure:
    ``hessian``, ``ggn``, ``fisher-mc`` (Monte-Carlo Fisher), ``ef`` (empirical Fisher) — full;
    the same with ``-block`` (exact diagonal blocks of ``prob.partition``), ``-diag``, ``-operator``
    (matrix-free). A ``-block``/``-diag`` entry is read off the full matrix when that has already
    been built in the same session (same numbers, no second pass over the data).
approximators (``curvlab.approx``, imported lazily):
    ``kfac`` (type-2 Fisher, exact expectation), ``kfac-mc``, ``kfac-ef``, ``ekfac``, ``tkfac``,
    ``tekfac``, ``foof``, ``kfoc`` — their directions use the method's own damping rule (``mode="own"``,
    e.g. π-damping for KFAC) unless a report asks for exact damping everywhere;
    ``kfac-exact`` / ``kfac-pi`` / ``kfac-factored`` are type-2 KFAC with a pinned rule (standard
    Tikhonov (A⊗G + λI)⁻¹, π-damping, factored √λ) whatever the report's setting.
first order:
    ``sgd`` — the plain negative gradient (no matrix; matrix comparisons are NaN for it).

The ladder (full → block → kron → MC → empirical) that splits KFAC's error into dropped
cross-layer blocks, Kronecker factorisation, Monte-Carlo sampling and the empirical Fisher is
:data:`LADDER`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from curvlab.linalg import BlockDiagonal, CurvatureMatrix, Dense, Diagonal
from curvlab.problem import Problem

__all__ = ["MethodSpec", "REGISTRY", "ALIASES", "LADDER", "DEFAULT_METHODS", "names", "spec", "build",
           "canonical"]

Builder = Callable[[Problem, dict, Mapping[str, Any]], Any]


@dataclass(frozen=True)
class MethodSpec:
    """One named method: how to build it and what it is."""

    name: str
    description: str
    family: str                       # "exact", "approx" or "first-order"
    structure: str                    # full, block, diag, operator, kron, eigen_kron, … or "vector"
    build: Builder = field(repr=False)
    mode: str = "exact"               # damping rule of its directions: "own" = the method's paper's rule
                                      # (switched to "exact" by report(damping_rule="exact")), or pinned
    rung: str = ""                    # its rung on the error ladder ("" if none)


# ---------------------------------------------------------------------------------------- exact
_KINDS = {"hessian": ("hessian", "exact Hessian ∇²L"),
          "ggn": ("ggn", "exact generalised Gauss-Newton (= exact Fisher for CE/MSE/BCE)"),
          "fisher-mc": ("fisher_mc", "Monte-Carlo Fisher (labels sampled from the model)"),
          "ef": ("empirical_fisher", "empirical Fisher (data labels)")}
_STRUCT = {"": "full", "-block": "block", "-diag": "diag", "-operator": "operator"}


def _exact_builder(alias: str, structure: str) -> Builder:
    kind = _KINDS[alias][0]

    def build(prob: Problem, cache: dict, options: Mapping[str, Any]) -> CurvatureMatrix:
        import curvlab.exact as ex

        full = cache.get(alias)
        if structure in ("block", "diag") and isinstance(full, Dense):
            if structure == "diag":
                return Diagonal(full.matrix.diagonal().clone())
            return BlockDiagonal([Dense(full.matrix[b.slice, b.slice].clone()) for b in prob.partition],
                                 prob.partition.names)
        kwargs: dict[str, Any] = {}
        if kind == "fisher_mc":
            kwargs = {"samples": int(options.get("mc_samples", 1)), "seed": int(options.get("seed", 0))}
        return getattr(ex, kind)(prob, structure=structure, **kwargs)

    return build


# ---------------------------------------------------------------------------------------- approximators
def _approx_builder(fn_name: str, **kwargs: Any) -> Builder:
    def build(prob: Problem, cache: dict, options: Mapping[str, Any]) -> CurvatureMatrix:
        try:
            approx = importlib.import_module("curvlab.approx")
        except ImportError as exc:  # pragma: no cover - depends on the tree
            raise RuntimeError(f"this method needs curvlab.approx.{fn_name}, but curvlab.approx cannot be "
                               f"imported: {exc}") from exc
        fn = getattr(approx, fn_name, None)
        if fn is None:
            raise RuntimeError(f"this method needs curvlab.approx.{fn_name}(), which this installation of "
                               "curvlab does not provide")
        kw = dict(kwargs)
        if kw.get("fisher") == "mc":
            kw.update(mc_samples=int(options.get("mc_samples", 1)), seed=int(options.get("seed", 0)))
        return fn(prob, **kw)

    return build


def _shared(base: str) -> Builder:
    """Reuse the matrix built for ``base`` (variants that differ only in their damping rule)."""

    def build(prob: Problem, cache: dict, options: Mapping[str, Any]) -> CurvatureMatrix:
        if base not in cache:
            cache[base] = REGISTRY[base].build(prob, cache, options)
        return cache[base]

    return build


def _sgd(prob: Problem, cache: dict, options: Mapping[str, Any]) -> Callable[[Tensor, float], Tensor]:
    def direction(g: Tensor, damping: float) -> Tensor:
        return -g

    return direction


def _registry() -> dict[str, MethodSpec]:
    reg: dict[str, MethodSpec] = {}
    rungs = {("ggn", "full"): "full", ("ggn", "block"): "block"}
    for alias, (_, desc) in _KINDS.items():
        for suffix, structure in _STRUCT.items():
            name = alias + suffix
            reg[name] = MethodSpec(name, f"{desc}, {structure}", "exact", structure,
                                   _exact_builder(alias, structure), rung=rungs.get((alias, structure), ""))
    approx = [
        ("kfac", "KFAC, type-2 Fisher (exact expectation over the model's predictive)", "kron", "kfac",
         {"fisher": "type2"}, "kron"),
        ("kfac-mc", "KFAC, Monte-Carlo Fisher (sampled labels)", "kron", "kfac", {"fisher": "mc"}, "MC"),
        ("kfac-ef", "KFAC, empirical Fisher (data labels)", "kron", "kfac", {"fisher": "empirical"}, "empirical"),
        ("ekfac", "EKFAC: KFAC eigenbasis with re-fitted diagonal scaling", "eigen_kron", "ekfac", {}, ""),
        ("tkfac", "TKFAC: trace-restricted KFAC", "trace_kron", "tkfac", {}, ""),
        ("tekfac", "TEKFAC: trace-restricted EKFAC", "eigen_kron", "tekfac", {}, ""),
        ("foof", "FOOF: A ⊗ I, input factor only (gradient descent on neurons)", "forward_only", "foof", {}, ""),
        ("kfoc", "KFOC: nearest Kronecker product (rank-1 KPSVD) of each block", "kron", "kfoc", {}, ""),
    ]
    for name, desc, structure, fn, kw, rung in approx:
        reg[name] = MethodSpec(name, desc, "approx", structure, _approx_builder(fn, **kw), mode="own", rung=rung)
    for mode, desc in (("exact", "standard (exact Tikhonov) damping (A ⊗ G + λI)⁻¹"),
                       ("pi", "π-damping (A + π√λI) ⊗ (G + √λ/π I)"),
                       ("factored", "factored damping (A + √λI) ⊗ (G + √λI)")):
        reg[f"kfac-{mode}"] = MethodSpec(f"kfac-{mode}", f"KFAC (type-2) with {desc} for its directions",
                                         "approx", "kron", _shared("kfac"), mode=mode)
    reg["sgd"] = MethodSpec("sgd", "plain gradient descent, x = −g", "first-order", "vector", _sgd)
    return reg


REGISTRY: dict[str, MethodSpec] = _registry()

#: other spellings accepted by :func:`canonical`
ALIASES: dict[str, str] = {
    "newton": "hessian", "gauss-newton": "ggn", "gn": "ggn", "fisher": "ggn",
    "fisher_mc": "fisher-mc", "mc": "fisher-mc", "empirical_fisher": "ef", "empirical-fisher": "ef",
    "kfac-empirical": "kfac-ef", "kfac-type2": "kfac", "gd": "sgd", "gradient": "sgd",
}

#: the error ladder: full GGN → exact blocks → Kronecker → Monte-Carlo → empirical (rung label, method)
LADDER: tuple[tuple[str, str], ...] = (("full", "ggn"), ("block", "ggn-block"), ("kron", "kfac"),
                                        ("MC", "kfac-mc"), ("empirical", "kfac-ef"))

#: what ``curvlab compare`` and :func:`curvlab.compare.report` use by default
DEFAULT_METHODS: tuple[str, ...] = ("hessian", "ggn", "ggn-block", "fisher-mc", "ef", "kfac", "kfac-exact",
                                    "kfac-mc", "kfac-ef", "ekfac", "tkfac", "tekfac", "foof", "kfoc", "sgd")


def names() -> list[str]:
    """Every registered method name."""
    return list(REGISTRY)


def canonical(name: str) -> str:
    """The registered name for ``name`` or one of its :data:`ALIASES`; raises ValueError for unknown names."""
    if not isinstance(name, str):
        raise TypeError(f"a method name must be a string; got {type(name).__name__}")
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; valid names: {', '.join(REGISTRY)}")
    return key


def spec(name: str) -> MethodSpec:
    """The :class:`MethodSpec` of a method name."""
    return REGISTRY[canonical(name)]


def build(name: str, prob: Problem, cache: dict | None = None, **options: Any) -> CurvatureMatrix | Callable:
    """Build method ``name`` for ``prob``.

    ``cache`` (a dict, name → built object) is shared between calls so that variants reuse work
    (``ggn-block`` from ``ggn``, ``kfac-pi`` from ``kfac``). ``options``: ``mc_samples`` (labels
    per input for ``fisher-mc``, default 1) and ``seed`` (Monte-Carlo seed, default 0).
    """
    if not isinstance(prob, Problem):
        raise TypeError(f"expected a curvlab.Problem; got {type(prob).__name__}")
    s = spec(name)
    cache = {} if cache is None else cache
    if s.name not in cache:
        out = s.build(prob, cache, options)
        if isinstance(out, CurvatureMatrix) and (out.size != prob.num_params):
            raise RuntimeError(f"method {s.name!r} built a {out.size}×{out.size} matrix for a problem with "
                               f"{prob.num_params} parameters")
        cache[s.name] = out
    return cache[s.name]
