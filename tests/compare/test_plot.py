"""Every figure renders to a PNG from a real report, headless, without touching pyplot's state."""

from __future__ import annotations

import collections
import math

import matplotlib
import pytest
import torch
from matplotlib.figure import Figure
from torch import nn

import curvlab as cl
import curvlab.plot as cp

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name", list(cp.FIGURES))
def test_each_figure_renders_to_png(small_report, tmp_path, name):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    fig = cp.FIGURES[name](small_report)
    assert isinstance(fig, Figure)
    path = tmp_path / f"{name}.png"
    fig.savefig(path, dpi=60)
    assert path.read_bytes()[:8] == PNG and path.stat().st_size > 5000
    assert plt.get_fignums() == before  # no pyplot figure was opened
    title = " ".join(t.get_text() for ax in fig.axes for t in (ax.title,)) + (fig._suptitle.get_text()
                                                                              if fig._suptitle else "")
    assert "diabetes-mlp" in title


def test_figure_options(small_report):
    fig = cp.direction_cosines(small_report, damping=0.1)
    assert "λ = 0.1" in fig.axes[0].get_title()
    with pytest.raises(ValueError, match="not in the report"):
        cp.direction_cosines(small_report, damping=0.5)
    fig = cp.ladder(small_report, reference="hessian")
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == ["full\n(ggn)", "block\n(ggn-block)", "kron\n(kfac)", "MC\n(kfac-mc)", "empirical\n(kfac-ef)"]
    fig = cp.layer_errors(small_report, methods=["kfac", "kfac-exact", "foof"])
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["kfac = kfac-exact", "foof"]  # one matrix, one bar
    fig = cp.spectra(small_report, methods=["ggn", "kfac"])
    assert len(fig.axes) == 2


def test_save_figures_skips_what_does_not_apply(small_report, tmp_path):
    paths = cp.save_figures(small_report, tmp_path / "r")
    assert [p.name for p in paths] == ["r-cosines.png", "r-spectra.png", "r-ladder.png", "r-layers.png"]
    top_only = small_report.drop_vars(["eigenvalues"]).drop_dims("eig")
    with pytest.raises(ValueError, match="full spectra"):
        cp.spectra(top_only)
    names = [p.name for p in cp.save_figures(top_only, tmp_path / "t")]
    assert names == ["t-cosines.png", "t-ladder.png", "t-layers.png"]


def test_backend_is_left_alone():
    assert matplotlib.get_backend()  # importing curvlab.plot did not force a backend switch


# ---------------------------------------------------------------------------- layout: nothing clipped or overlapping
def _seven_layer_problem() -> cl.Problem:
    """A tanh MLP of seven linear layers with named blocks (hidden1 … hidden6, output)."""
    gen = torch.Generator().manual_seed(0)
    widths = [5, 6, 6, 6, 6, 6, 6, 2]
    layers: dict[str, nn.Module] = {}
    for i in range(7):
        layers[f"hidden{i + 1}" if i < 6 else "output"] = nn.Linear(widths[i], widths[i + 1])
        if i < 6:
            layers[f"act{i + 1}"] = nn.Tanh()
    torch.manual_seed(0)
    model = nn.Sequential(collections.OrderedDict(layers)).double()
    X = torch.randn(16, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(16, 2, generator=gen, dtype=torch.float64)
    return cl.Problem(model, nn.MSELoss(), X, y)


@pytest.fixture(scope="module")
def seven_block_report(_one_thread):
    return cl.compare.report(_seven_layer_problem(), methods=["ggn", "ggn-block", "kfac", "ekfac", "sgd"],
                             damping=[0.1], k=2)


@pytest.fixture(scope="module")
def one_method_report(small_prob):
    return cl.compare.report(small_prob, methods=["kfac"], damping=[0.1], k=2)


def _layout_faults(fig) -> list[str]:
    """Drawn texts outside the figure (clipped) and overlapping x tick labels, after drawing on Agg."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()
    renderer = fig.canvas.get_renderer()
    faults = []
    drawn = fig.get_tightbbox(renderer)  # inches: everything drawn, ticks beyond the view limits excluded
    w, h = fig.get_size_inches()
    tol = 1.0 / fig.dpi
    if drawn.x0 < -tol or drawn.y0 < -tol or drawn.x1 > w + tol or drawn.y1 > h + tol:
        faults.append(f"clipped: drawn extent {drawn.bounds} exceeds the figure (0, 0, {w}, {h})")
    for ax in fig.axes:
        lo, hi = sorted(ax.get_xlim())
        ticks = [t for t in ax.get_xticklabels()
                 if t.get_visible() and t.get_text() and lo <= t.get_position()[0] <= hi]
        for a, b in zip(ticks, ticks[1:]):
            if _overlap(ax, a, b, renderer):
                faults.append(f"overlap: {a.get_text()!r} / {b.get_text()!r}")
    return faults


def _overlap(ax, a, b, renderer) -> bool:
    """Do two neighbouring tick labels overlap? Rotated (parallel) labels: when their baselines are closer
    than a label's own height; horizontal ones: when their boxes intersect."""
    from matplotlib.text import Text

    angle = math.radians(a.get_rotation())
    if abs(math.sin(angle)) < 1e-3:
        return a.get_window_extent(renderer).overlaps(b.get_window_extent(renderer))
    flat = Text(0, 0, a.get_text(), fontproperties=a.get_fontproperties(), figure=a.figure)
    height = flat.get_window_extent(renderer).height
    xa, xb = (ax.transData.transform((t.get_position()[0], 0))[0] for t in (a, b))
    return abs(xb - xa) * abs(math.sin(angle)) < height - 1


@pytest.mark.parametrize("which", ["seven_block_report", "one_method_report", "small_report"])
@pytest.mark.parametrize("name", list(cp.FIGURES))
def test_no_text_is_clipped_or_overlaps(request, which, name):
    ds = request.getfixturevalue(which)
    try:
        fig = cp.FIGURES[name](ds)
    except ValueError as exc:  # a figure that does not apply to this report (e.g. one block)
        assert "no " in str(exc) or "single block" in str(exc)
        return
    assert _layout_faults(fig) == []


def test_seven_blocks_and_one_rung_are_drawn(seven_block_report, one_method_report):
    fig = cp.layer_errors(seven_block_report)
    assert [t.get_text().split("\n")[0] for t in fig.axes[0].get_xticklabels()] == \
        [f"hidden{i}" for i in range(1, 7)] + ["output"]
    fig = cp.ladder(one_method_report)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["kron\n(kfac)"]
    assert "Error ladder" in fig.axes[0].get_title()


def test_not_a_report_and_bad_dpi_are_refused(small_report, tmp_path):
    import xarray as xr

    other = xr.Dataset({"temperature": ("time", [1.0, 2.0])})
    with pytest.raises(ValueError, match="not a curvlab compare report"):
        cp.save_figures(other, tmp_path / "x")
    for fn in cp.FIGURES.values():
        with pytest.raises(ValueError, match="not a curvlab compare report"):
            fn(other)
    with pytest.raises(TypeError, match="xarray.Dataset"):
        cp.ladder({"cosine": 1})
    for dpi in (0, 5, 100_000, float("nan"), True):
        with pytest.raises(ValueError, match="dpi must be a number from 20 to 600"):
            cp.save_figures(small_report, tmp_path / "x", dpi=dpi)
    assert list(tmp_path.iterdir()) == []
