"""The method registry: every name a comparison accepts, and how to build it from a Problem.

One place maps a name to a builder. A method is either a CurvatureMatrix (whose update direction
is ``C.direction(g, λ, mode)`` with the registered ``mode``) or a direction callable
``(g, λ) -> x`` (``"sgd"``: x = −g).

Names
-----
exact (the oracle, ``curvlab.exact``), every kind × structure:
    ``hessian``, ``ggn``, ``fisher-mc`` (Monte-Carlo Fisher), ``ef`` (empirical Fisher) — full;
    the same with ``-block`` (exact diagonal blocks of ``prob.partition``), ``-diag``, ``-operator``
    (matrix-free), and for the three Fisher-type kinds ``-low-rank`` (s·UᵀU from the r = N·k
    per-sample factor rows: Woodbury solves, spectra from the r×r Gram) and ``-block-low-rank``
    (one such block per partition block). A ``-block``/``-diag`` entry is read off the full matrix,
    and a ``-block-low-rank`` entry off the ``-low-rank`` one, when that has already been built in the
    same session (same numbers, no second pass over the data).
remedies for indefinite curvature, exact from the Hessian's eigendecomposition H = Q Λ Qᵀ (the
cached ``eigh`` of ``hessian`` or of each ``hessian-block`` block; nothing else is computed):
    ``saddle-free-newton`` — |H| = Q |Λ| Qᵀ, the saddle-free Newton method of Dauphin et al. (2014,
    arXiv 1406.2572): it rescales by the curvature's magnitude and flips the step along negative
    curvature, so the step is a descent direction; ``hessian-positive`` — Q max(Λ, 0) Qᵀ, the
    negative eigenvalues clipped to 0 (positive semi-definite; damping makes it definite); both also
    ``-block`` (per diagonal block of the Hessian).
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
:data:`LADDER`. :func:`low_rank_variant` and :func:`factor_rows` tell a report when a Fisher-type
matrix is cheaper in its low-rank form (r < P).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from curvlab.linalg import BlockDiagonal, CurvatureMatrix, Dense, Diagonal, LowRank
from curvlab.linalg.spectral import Spectral
from curvlab.problem import Problem

__all__ = ["MethodSpec", "REGISTRY", "ALIASES", "LADDER", "DEFAULT_METHODS", "names", "spec", "build",
           "canonical", "low_rank_variant", "factor_rows"]

Builder = Callable[[Problem, dict, Mapping[str, Any]], Any]


@dataclass(frozen=True)
class MethodSpec:
    """One named method: how to build it and what it is."""

    name: str
    description: str
    family: str                       # "exact", "approx" or "first-order"
    structure: str                    # full, block, diag, operator, low_rank, kron, eigen_kron, … or "vector"
    build: Builder = field(repr=False)
    mode: str = "exact"               # damping rule of its directions: "own" = the method's paper's rule
                                      # (switched to "exact" by report(damping_rule="exact")), or pinned
    rung: str = ""                    # its rung on the error ladder ("" if none)
    sources: tuple[str, ...] = ()     # built entries it reads off when they are in the cache
    eigh_of: str = ""                 # the entry whose eigendecomposition it is computed from ("" if none)


# ---------------------------------------------------------------------------------------- exact
_KINDS = {"hessian": ("hessian", "exact Hessian ∇²L"),
          "ggn": ("ggn", "exact generalised Gauss-Newton (= exact Fisher for CE/MSE/BCE)"),
          "fisher-mc": ("fisher_mc", "Monte-Carlo Fisher (labels sampled from the model)"),
          "ef": ("empirical_fisher", "empirical Fisher (data labels)")}
_STRUCT = {"": "full", "-block": "block", "-diag": "diag", "-operator": "operator",
           "-low-rank": "low_rank", "-block-low-rank": "block_low_rank"}
#: the structures of sums of outer products (the Fisher-type kinds only, not the Hessian)
_LOW_RANK = ("low_rank", "block_low_rank")


def _read_off(structure: str, full: Any, prob: Problem) -> CurvatureMatrix | None:
    """Return a block, diagonal or block-low-rank matrix read off a cached full one (None: nothing to read)."""
    if structure == "diag" and isinstance(full, Dense):
        return Diagonal(full.matrix.diagonal().clone())
    if structure == "block" and isinstance(full, Dense):
        return BlockDiagonal([Dense(full.matrix[b.slice, b.slice].clone()) for b in prob.partition],
                             prob.partition.names)
    if structure == "block_low_rank" and isinstance(full, LowRank):
        # the full matrix's own (cached) restrictions: the same objects a comparison restricts it to
        return BlockDiagonal([full.restrict(b.slice) for b in prob.partition], prob.partition.names)
    return None


def _exact_builder(alias: str, structure: str) -> Builder:
    kind = _KINDS[alias][0]
    source = alias + ("-low-rank" if structure == "block_low_rank" else "")

    def build(prob: Problem, cache: dict, options: Mapping[str, Any]) -> CurvatureMatrix:
        import curvlab.exact as ex

        if structure in ("block", "diag", "block_low_rank"):
            out = _read_off(structure, cache.get(source), prob)
            if out is not None:
                return out
        kwargs: dict[str, Any] = {}
        if kind == "fisher_mc":
            kwargs = {"samples": int(options.get("mc_samples", 1)), "seed": int(options.get("seed", 0))}
        return getattr(ex, kind)(prob, structure=structure, **kwargs)

    return build


def low_rank_variant(name: str) -> str | None:
    """Return the low-rank registry name of an exact Fisher-type method, or None for every other method.

    For example ``ggn`` → ``ggn-low-rank``, ``ef-block`` → ``ef-block-low-rank``.
    """
    s = spec(name)
    alias = s.name.removesuffix("-block")
    if s.family != "exact" or s.structure not in ("full", "block") or alias not in _KINDS or alias == "hessian":
        return None
    return f"{alias}-block-low-rank" if s.structure == "block" else f"{alias}-low-rank"


def factor_rows(name: str, prob: Problem, mc_samples: int = 1) -> int:
    """Return r, the number of factor rows U (r × P) of an exact Fisher-type method.

    N·C for the GGN (C = the outputs per sample), N·S for the Monte-Carlo Fisher (S labels per input),
    N for the empirical Fisher.
    """
    alias = spec(name).name.split("-block")[0].removesuffix("-low-rank")
    per = {"ggn": prob.num_outputs, "fisher-mc": int(mc_samples), "ef": 1}
    if alias not in per:
        raise ValueError(f"{name!r} is not a sum of outer products (ggn, fisher-mc, ef); it has no factor rows")
    return prob.num_samples * per[alias]


# ---------------------------------------------------------------------------------------- remedies
#: remedy → (what it does to the Hessian's eigenvalues Λ, description)
_REMEDIES = {
    "saddle-free-newton": (lambda w: w.abs(), "saddle-free Newton |H| = Q|Λ|Qᵀ (Dauphin et al. 2014, "
                           "arXiv 1406.2572), from the Hessian's eigendecomposition"),
    "hessian-positive": (lambda w: w.clamp_min(0.0), "positive part of the Hessian, Q max(Λ, 0) Qᵀ "
                         "(negative eigenvalues clipped to 0), from its eigendecomposition"),
}


def _spectral_of(C: CurvatureMatrix, fn: Callable[[Tensor], Tensor]) -> Spectral:
    """Q fn(Λ) Qᵀ from C's (cached) eigendecomposition C = Q Λ Qᵀ: shares C's eigenvectors."""
    w, Q = C.eigh()
    return Spectral(fn(w), Q)


def _remedy_builder(remedy: str, block: bool) -> Builder:
    fn = _REMEDIES[remedy][0]
    source = "hessian-block" if block else "hessian"

    def build(prob: Problem, cache: dict, options: Mapping[str, Any]) -> CurvatureMatrix:
        H = cache[source] if source in cache else REGISTRY[source].build(prob, cache, options)
        if not block:
            return _spectral_of(H, fn)
        return BlockDiagonal([_spectral_of(b, fn) for b in H.blocks], H.block_names)

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
            if alias == "hessian" and structure in _LOW_RANK:
                continue
            name = alias + suffix
            sources = {"block": (alias,), "diag": (alias,), "block_low_rank": (f"{alias}-low-rank",)}
            reg[name] = MethodSpec(name, f"{desc}, {structure}", "exact", structure,
                                   _exact_builder(alias, structure), rung=rungs.get((alias, structure), ""),
                                   sources=sources.get(structure, ()))
    for remedy, (_, desc) in _REMEDIES.items():
        reg[remedy] = MethodSpec(remedy, desc, "exact", "spectral", _remedy_builder(remedy, False),
                                 sources=("hessian",), eigh_of="hessian")
        reg[f"{remedy}-block"] = MethodSpec(f"{remedy}-block", f"{desc}, per diagonal block", "exact",
                                            "block_spectral", _remedy_builder(remedy, True),
                                            sources=("hessian-block", "hessian"), eigh_of="hessian-block")
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
                                         "approx", "kron", _shared("kfac"), mode=mode, sources=("kfac",))
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
    """Return the registered name for ``name`` or one of its :data:`ALIASES`; raises ValueError for unknown names."""
    if not isinstance(name, str):
        raise TypeError(f"a method name must be a string; got {type(name).__name__}")
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; valid names: {', '.join(REGISTRY)}")
    return key


def spec(name: str) -> MethodSpec:
    """Return the :class:`MethodSpec` of a method name."""
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
