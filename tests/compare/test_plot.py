"""Every figure renders to a PNG from a real report, headless, without touching pyplot's state."""

from __future__ import annotations

import matplotlib
import pytest
from matplotlib.figure import Figure

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
