"""Figures of an agreement report (``curvlab.compare.report``): each takes the Dataset, returns a Figure.

    ds = curvlab.compare.load("data/results/digits-mlp.nc")
    fig = curvlab.plot.direction_cosines(ds)      # heatmap of pairwise cosines of update directions
    fig = curvlab.plot.spectra(ds)                # eigenvalues of several methods, log-log, dampings marked
    fig = curvlab.plot.ladder(ds)                 # relative error: full → block → kron → MC → empirical
    fig = curvlab.plot.layer_errors(ds)           # relative error per layer (block) and method
    curvlab.plot.save_figures(ds, "data/results/digits-mlp")   # all four as PNGs

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas: no pyplot state, no display
needed (headless), and the caller's backend is left alone. Figures are sized by what they show
(methods, rungs, blocks), long tick labels are rotated and titles wrapped to the figure's width, so
no text overlaps or is clipped. matplotlib, seaborn and xarray are imported on first use.
"""

from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import xarray as xr
    from matplotlib.figure import Figure

__all__ = ["direction_cosines", "spectra", "ladder", "layer_errors", "save_figures", "check_report", "FIGURES",
           "DPI_RANGE", "INDEFINITE_MARK"]

#: the mark of a method whose C + λI is not positive definite (its step need not be a descent direction)
INDEFINITE_MARK = "*"

#: the resolutions :func:`save_figures` accepts (dots per inch): beyond 600 a figure is hundreds of megapixels
DPI_RANGE = (20, 600)

#: what every figure reads: dimensions, data variables and coordinates of a ``curvlab.compare.report``
_REPORT_DIMS = ("method", "reference", "block", "damping")
_REPORT_VARS = ("cosine", "relative_error", "direction_cosine")
_REPORT_COORDS = ("family", "rung", "block_size")


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _wrap(text: str, width_in: float, fontsize: float = 10.0) -> str:
    """``text`` with each line wrapped to fit ``width_in`` inches at ``fontsize`` points (≈0.58 em a character)."""
    chars = max(20, int(width_in * 72 / (0.58 * fontsize)))
    return "\n".join(textwrap.fill(line, chars) if line else line for line in text.split("\n"))


def check_report(ds: Any) -> None:
    """Raise ``TypeError``/``ValueError`` unless ``ds`` is a Dataset written by ``curvlab.compare.report``."""
    import xarray as xr

    if not isinstance(ds, xr.Dataset):
        raise TypeError(f"expected an xarray.Dataset from curvlab.compare.report; got {type(ds).__name__}")
    missing = ([f"dimension {d!r}" for d in _REPORT_DIMS if d not in ds.dims]
               + [f"variable {v!r}" for v in _REPORT_VARS if v not in ds.data_vars]
               + [f"coordinate {c!r}" for c in _REPORT_COORDS if c not in ds.coords])
    if missing:
        raise ValueError(f"not a curvlab compare report (it lacks {', '.join(missing[:3])}"
                         f"{' …' if len(missing) > 3 else ''}); make one with `curvlab compare` or "
                         "curvlab.compare.report")


def _sns():
    import seaborn as sns

    return sns


def _pick_damping(ds: xr.Dataset, damping: float | None) -> float:
    values = [float(d) for d in ds.damping.values]
    if damping is None:
        return values[len(values) // 2]
    best = min(values, key=lambda d: abs(math.log10(max(d, 1e-300)) - math.log10(max(damping, 1e-300))))
    if not math.isclose(best, damping, rel_tol=1e-9):
        raise ValueError(f"damping {damping} is not in the report; it has {values}")
    return best


def _reference(ds: xr.Dataset, reference: str | None) -> str:
    refs = [str(r) for r in ds.reference.values]
    if reference is None:
        return refs[0]
    if reference not in refs:
        raise ValueError(f"reference {reference!r} is not in the report; it has {refs}")
    return reference


def _matrix_methods(ds: xr.Dataset) -> list[str]:
    """Methods with a matrix (finite Frobenius cosine against the first reference)."""
    cos = ds["cosine"].isel(reference=0).sel({"block": "all"})
    return [str(m) for m, v in zip(ds.method.values, cos.values) if np.isfinite(v)]


def _distinct(ds: xr.Dataset, methods: list[str], var: str) -> list[tuple[str, list[str]]]:
    """Group methods whose ``var`` values are identical (e.g. kfac and kfac-exact share a matrix).

    Returns (label, members) in first-seen order; the label joins the members with " = ".
    """
    groups: list[tuple[np.ndarray, list[str]]] = []
    for m in methods:
        v = np.asarray(ds[var].sel({"method": m}).values, dtype=float)
        for ref, members in groups:
            if ref.shape == v.shape and np.allclose(ref, v, rtol=1e-12, atol=0, equal_nan=True):
                members.append(m)
                break
        else:
            groups.append((v, [m]))
    return [(" = ".join(members), members) for _, members in groups]


def _title(ds: xr.Dataset) -> str:
    return f"{ds.attrs.get('problem', '')}  (N={ds.attrs.get('num_samples', '?')}, P={ds.attrs.get('num_params', '?')})"


def _not_positive_definite(ds: xr.Dataset, damping: float) -> list[str]:
    from curvlab.compare.report import not_positive_definite

    return not_positive_definite(ds, damping)


def _cell_labels(values: np.ndarray, marked: np.ndarray) -> np.ndarray:
    """Cosine annotations with two decimals; a cell of a not positive definite method marked."""
    out = np.empty(values.shape, dtype=object)
    for idx, v in np.ndenumerate(values):
        text = "" if not np.isfinite(v) else f"{v:.2f}".replace("-0.00", "0.00")
        out[idx] = text + INDEFINITE_MARK if text and marked[idx] else text
    return out


def direction_cosines(ds: xr.Dataset, damping: float | None = None) -> Figure:
    """Heatmap of the pairwise cosines between the methods' update directions at one damping.

    A method whose C + λI is not positive definite at that damping is marked ``*`` (its tick labels
    and every cell of its row and column): its step need not be a descent direction, so cosines near
    0 with every other method are expected.
    """
    check_report(ds)
    sns = _sns()
    lam = _pick_damping(ds, damping)
    C = ds["direction_cosine"].sel({"damping": lam})
    bad = set(_not_positive_definite(ds, lam))
    names = [str(m) + (f" {INDEFINITE_MARK}" if str(m) in bad else "") for m in ds.method.values]
    flag = np.array([str(m) in bad for m in ds.method.values])
    n = len(names)
    fig_w = max(5.5, 1.0 + 0.62 * n)
    fig = _figure(fig_w, max(3.8, 1.2 + 0.55 * n))
    ax = fig.subplots()
    annot_size = 9 if n <= 10 else 7.5
    labels = _cell_labels(C.values, flag[:, None] | flag[None, :])
    sns.heatmap(C.values, ax=ax, vmin=-1, vmax=1, center=0, cmap="RdBu_r", annot=labels, fmt="",
                annot_kws={"size": annot_size}, xticklabels=names, yticklabels=names, square=True,
                linewidths=0.5, linecolor="white", cbar_kws={"label": "cosine", "shrink": 0.7})
    ax.set_xticklabels(names, rotation=45, ha="right")
    ax.set_yticklabels(names, rotation=0)
    note = (f"\n{INDEFINITE_MARK} C + λI not positive definite ({', '.join(sorted(bad))}): its step need not "
            "descend") if bad else ""
    ax.set_title(_wrap(f"Cosine between the methods' update directions at damping λ = {lam:g} "
                       f"(damping rule: {ds.attrs.get('damping_rule', '?')}){note}\n{_title(ds)}", fig_w - 0.6),
                 fontsize=10)
    return fig


def _indefinite_note(ds: xr.Dataset, method: str) -> str:
    """", C + λI indefinite at λ = …" for a matrix that is not positive definite at some damping, else ""."""
    if "positive_definite" not in ds:
        return ""
    pd = ds["positive_definite"].sel({"method": method}).values
    bad = [f"{float(d):g}" for d, v in zip(ds.damping.values, pd) if v == 0]
    if not bad:
        return ""
    where = "every λ shown" if len(bad) == len(pd) else "λ = " + ", ".join(bad)
    return f"; {INDEFINITE_MARK} C + λI not PD at {where}"


def _spectrum_panel(ax, ds: xr.Dataset, groups: list[tuple[str, list[str]]], palette, floor: float,
                    exact_style: bool) -> None:
    rank = np.arange(1, ds.sizes["eig"] + 1)
    for color, (label, members) in zip(palette, groups):
        w = ds["eigenvalues"].sel({"method": members[0]}).values
        tol = 1e-9 * np.nanmax(np.abs(w))
        keep = w > tol
        neg, zero = float((w < -tol).mean()), float((np.abs(w) <= tol).mean())
        notes = [f"{100 * neg:.0f}% < 0"] if neg >= 0.005 else []
        if zero >= 0.005:
            notes.append(f"{100 * zero:.0f}% ≈ 0")
        if notes:
            label += "  (" + ", ".join(notes) + ")"
        label += _indefinite_note(ds, members[0])
        ax.plot(rank[keep], np.maximum(w[keep], floor), color=color, lw=2.0 if exact_style else 1.5,
                ls="-" if exact_style else "--", label=label)
    for lam in ds.damping.values:
        ax.axhline(float(lam), color="0.35", lw=0.8, ls=":")
        ax.annotate(f"λ = {float(lam):g}", (1, float(lam)), xytext=(2, 2), textcoords="offset points",
                    ha="left", va="bottom", fontsize=8, color="0.3")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue rank (1 = largest)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")


def spectra(ds: xr.Dataset, methods: list[str] | None = None) -> Figure:
    """Eigenvalues against their rank (log-log), exact matrices left, approximations right.

    The first reference is drawn in both panels (black) for comparison; the dampings are dotted
    lines, so the share of a spectrum under a line is what that damping swamps. Eigenvalues below
    1e-9 of a matrix's largest are numerically zero (rank deficiency) and are not drawn; the legend
    gives the share of negative and of zero eigenvalues, and marks ``*`` a matrix whose C + λI is not
    positive definite at some damping. Methods with identical spectra share a curve.
    """
    check_report(ds)
    if "eigenvalues" not in ds:
        raise ValueError("the report has no full spectra (it was made with full_spectrum=False)")
    sns = _sns()
    methods = _matrix_methods(ds) if methods is None else list(methods)
    if not methods:
        raise ValueError("the report has no matrix methods to draw spectra of")
    ref = _reference(ds, None)
    fam = dict(zip([str(m) for m in ds.method.values], [str(f) for f in ds.family.values]))
    exact = [m for m in methods if fam.get(m) == "exact"]
    approx = [m for m in methods if fam.get(m) != "exact"]
    w_all = ds["eigenvalues"].sel({"method": methods}).values
    top = float(np.nanmax(w_all))
    floor = min(float(ds.damping.values.min()) / 100, top * 1e-7) if top > 0 else 1e-12
    panels = ([(exact, True, "exact curvature")] if exact else []) + \
        ([(approx, False, "approximations")] if approx else [])
    fig = _figure(6.5 * len(panels), 5.5)
    axes = np.atleast_1d(fig.subplots(1, len(panels), sharey=True))
    for ax, (ms, is_exact, name) in zip(axes, panels):
        groups = _distinct(ds, ms, "eigenvalues")
        palette = sns.color_palette("tab10", max(len(groups), 1))
        if not is_exact and ref in [str(m) for m in ds.method.values]:
            _spectrum_panel(ax, ds, [(f"{ref} (reference)", [ref])], ["black"], floor, True)
        _spectrum_panel(ax, ds, groups, palette, floor, is_exact)
        ax.set_title(name, fontsize=10)
    axes[0].set_ylim(floor, 2.0 * top if top > floor else 10 * floor)
    axes[0].set_ylabel("eigenvalue")
    fig.suptitle(_wrap(f"Spectra (eigenvalues > 0, descending; dotted: dampings)\n{_title(ds)}",
                       6.5 * len(panels) - 0.5), fontsize=10)
    return fig


def _ladder_methods(ds: xr.Dataset) -> list[tuple[str, str]]:
    from curvlab.compare.methods import LADDER

    present = {str(r): str(m) for m, r in zip(ds.method.values, ds.rung.values) if str(r)}
    return [(rung, present[rung]) for rung, _ in LADDER if rung in present]


def _within_blocks(ds: xr.Dataset, method: str, reference: str) -> float:
    """Relative error restricted to the diagonal blocks: √Σ_b (e_b ‖B_bb‖)² / √Σ_b ‖B_bb‖²."""
    blocks = [str(b) for b in ds.block.values if str(b) != "all"]
    if not blocks or "reference_norm" not in ds:
        return math.nan
    e = ds["relative_error"].sel({"method": method, "reference": reference, "block": blocks}).values
    n = ds["reference_norm"].sel({"reference": reference, "block": blocks}).values
    return float(np.sqrt(np.sum((e * n) ** 2)) / np.sqrt(np.sum(n**2)))


def ladder(ds: xr.Dataset, reference: str | None = None) -> Figure:
    """Relative error ‖A − B‖_F/‖B‖_F along the ladder full → block → kron → MC → empirical.

    Each rung adds one approximation (dropping the cross-layer blocks, Kronecker factorisation,
    Monte-Carlo labels, empirical labels). Two bars per rung: the error on the whole matrix, and the
    error within the diagonal blocks only (what the Kronecker, MC and empirical steps change).
    """
    check_report(ds)
    sns = _sns()
    reference = _reference(ds, reference)
    rungs = _ladder_methods(ds)
    if not rungs:
        raise ValueError("the report has no ladder methods (ggn, ggn-block, kfac, kfac-mc, kfac-ef)")
    whole = [float(ds["relative_error"].sel({"method": m, "reference": reference, "block": "all"}))
             for _, m in rungs]
    within = [_within_blocks(ds, m, reference) for _, m in rungs]
    cos = [float(ds["cosine"].sel({"method": m, "reference": reference, "block": "all"})) for _, m in rungs]
    fig_w = max(6.0, 2.0 + 1.7 * len(rungs))
    fig = _figure(fig_w, 5.0)
    ax = fig.subplots()
    c_whole, c_within = sns.color_palette("crest", 2)
    x = np.arange(len(rungs))
    width = 0.38
    b1 = ax.bar(x - width / 2, whole, width, color=c_whole, edgecolor="0.2", label="whole matrix")
    b2 = ax.bar(x + width / 2, within, width, color=c_within, edgecolor="0.2", label="within diagonal blocks")
    for b, e, c in zip(b1, whole, cos):
        ax.annotate(f"{e:.3g}\n(cos {c:.3f})", (b.get_x() + b.get_width() / 2, b.get_height()), xytext=(0, 3),
                    textcoords="offset points", ha="center", va="bottom", fontsize=8)
    for b, e in zip(b2, within):
        if np.isfinite(e):
            ax.annotate(f"{e:.3g}", (b.get_x() + b.get_width() / 2, b.get_height()), xytext=(0, 3),
                        textcoords="offset points", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [f"{rung}\n({m})" for rung, m in rungs])
    ax.set_ylabel(f"relative Frobenius error vs {reference}")
    finite = [e for e in whole + within if np.isfinite(e)]
    top = max(finite, default=1.0)
    ax.set_ylim(0, 1.3 * top if top > 0 else 1.0)
    ax.legend(fontsize=9, loc="upper left")
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_title(_wrap(f"Error ladder: each rung adds one approximation of {reference}\n{_title(ds)}",
                       fig_w - 0.6), fontsize=10)
    return fig


def _layer_layout(ticks: list[str], legend: list[str], max_width: float = 16.0) -> tuple[float, float, bool]:
    """Return (width, height, rotate) of the per-layer figure.

    Each block is as wide as its tick label at 10 pt (≈0.09 in per character) or its bars (0.32 in each),
    plus the legend; labels are rotated beyond ``max_width``.
    """
    n_b, n_m = len(ticks), len(legend)
    chars = max(len(line) for t in ticks for line in t.split("\n"))
    legend_in = (0.7 + 0.075 * max(len(m) for m in legend)) * (1 if n_m <= 8 else 2)
    bars = 0.32 * n_m
    width = 1.3 + legend_in + n_b * max(bars, 0.09 * chars + 0.3)
    if width <= max_width:
        return max(7.0, width), 5.0, False
    width = 1.3 + legend_in + n_b * max(bars, 0.5)  # rotated labels need about two lines of height each
    return max(7.0, width), 5.0 + 0.06 * chars, True


def layer_errors(ds: xr.Dataset, reference: str | None = None, methods: list[str] | None = None) -> Figure:
    """Draw grouped bars: relative error of each method's diagonal block against the reference's, per layer.

    The y axis is logarithmic; a method that is exact on a block (error < 1e-12) is drawn at the
    floor and marked "exact". Methods with identical errors (the same matrix) share a bar.
    """
    check_report(ds)
    sns = _sns()
    reference = _reference(ds, reference)
    if methods is None:
        methods = [m for m in _matrix_methods(ds) if m != reference]
    groups = _distinct(ds, methods, "relative_error")
    labels, methods = [g[0] for g in groups], [g[1][0] for g in groups]
    blocks = [str(b) for b in ds.block.values if str(b) != "all"]
    if not blocks:
        raise ValueError("the report has a single block; there is nothing to show per layer")
    if not methods:
        raise ValueError(f"the report has no matrix method besides the reference {reference!r} to show per layer")
    sizes = dict(zip([str(b) for b in ds.block.values], [int(s) for s in ds.block_size.values]))
    E = ds["relative_error"].sel({"reference": reference, "method": methods, "block": blocks}).values
    floor = 1e-12
    finite = E[np.isfinite(E) & (E > floor)]
    lo = 10 ** math.floor(math.log10(finite.min())) / 2 if finite.size else 1e-3
    n_m, n_b = len(methods), len(blocks)
    ticks = [f"{b}\n({sizes.get(b, '?')} params)" for b in blocks]
    fig_w, fig_h, rotate = _layer_layout(ticks, labels)
    fig = _figure(fig_w, fig_h)
    ax = fig.subplots()
    palette = sns.color_palette("tab10" if n_m <= 10 else "tab20", n_m)
    width = 0.8 / n_m
    x = np.arange(n_b)
    for i, (m, color) in enumerate(zip(labels, palette)):
        vals = E[i]
        shown = np.where(np.isfinite(vals) & (vals > floor), vals, lo)
        pos = x - 0.4 + width * (i + 0.5)
        ax.bar(pos, shown - lo, bottom=lo, width=width, color=color, label=m, edgecolor="0.25", linewidth=0.4)
        for p, v in zip(pos, vals):
            if np.isfinite(v) and v <= floor:
                ax.annotate("exact", (p, lo), xytext=(0, 2), textcoords="offset points", rotation=90,
                            ha="center", va="bottom", fontsize=7, color="0.3")
    ax.set_yscale("log")
    ax.set_ylim(bottom=lo)
    if rotate:
        ax.set_xticks(x, ticks, rotation=40, ha="right", rotation_mode="anchor")
    else:
        ax.set_xticks(x, ticks)
    ax.set_xlabel("block of the parameter partition (layer)")
    ax.set_ylabel(f"relative error of the diagonal block vs {reference}")
    ax.grid(True, axis="y", which="major", alpha=0.3)
    ax.legend(fontsize=8, ncol=1 if n_m <= 8 else 2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(_wrap(f"Per-layer error ‖A_bb − B_bb‖_F / ‖B_bb‖_F\n{_title(ds)}", fig_w - 2.5), fontsize=10)
    return fig


#: figure name → function, as written by :func:`save_figures`
FIGURES = {"cosines": direction_cosines, "spectra": spectra, "ladder": ladder, "layers": layer_errors}


def save_figures(ds: xr.Dataset, stem: str | os.PathLike, dpi: int = 130) -> list[Path]:
    """Write every figure that applies to ``ds`` as ``{stem}-{name}.png``; return the paths written.

    A figure that does not apply (no full spectra, no ladder methods, a single block) is skipped.
    Raises ``ValueError`` for a Dataset that is not a report or a ``dpi`` outside :data:`DPI_RANGE`,
    ``OSError`` when the folder cannot be written (a failed write leaves no partial PNG).
    """
    check_report(ds)
    lo, hi = DPI_RANGE
    if isinstance(dpi, bool) or not isinstance(dpi, (int, float)) or not lo <= dpi <= hi:
        raise ValueError(f"dpi must be a number from {lo} to {hi}; got {dpi!r}")
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fn in FIGURES.items():
        try:
            fig = fn(ds)
        except ValueError:
            continue
        path = stem.parent / f"{stem.name}-{name}.png"
        tmp = path.parent / f".{path.name}.tmp.png"
        try:
            fig.savefig(tmp, dpi=dpi)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        written.append(path)
    return written
