"""`curvlab compare` and `curvlab plot` end to end on a small problem."""

from __future__ import annotations

from curvlab.cli import main
from curvlab.compare import load


def test_compare_writes_report_and_figures_then_plot_redraws(tmp_path, capsys):
    out = tmp_path / "res" / "d.nc"
    rc = main(["compare", "diabetes-mlp", "--n", "32", "--methods", "ggn,ggn-block,kfac,kfac-ef,sgd",
               "--damping", "0.01,0.1", "--k", "4", "--out", str(out), "--quiet"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "Matrix agreement with ggn" in text and "pairwise cosine" in text and "energy err" in text
    ds = load(out)
    assert list(ds.method.values) == ["ggn", "ggn-block", "kfac", "kfac-ef", "sgd"]
    assert ds.attrs["problem"] == "diabetes-mlp" and ds.attrs["num_samples"] == 32
    pngs = sorted(p.name for p in out.parent.glob("*.png"))
    assert pngs == ["d-cosines.png", "d-ladder.png", "d-layers.png", "d-spectra.png"]
    for p in out.parent.glob("*.png"):
        p.unlink()
    assert main(["plot", str(out)]) == 0
    assert len(list(out.parent.glob("*.png"))) == 4


def test_compare_and_plot_errors_are_one_line(tmp_path, capsys):
    assert main(["compare", "diabetes-mlp", "--methods", "nope", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown method 'nope'" in err
    assert main(["compare", "diabetes-mlp", "--damping", "x", "--quiet"]) == 2
    assert "--damping" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "missing.nc")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_compare_refuses_an_unwritable_output_before_computing(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    rc = main(["compare", "diabetes-mlp", "--n", "8", "--methods", "kfac", "--out", str(blocker / "r.nc"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--out: cannot write into" in err
    assert main(["compare", "diabetes-mlp", "--n", "8", "--out", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a folder" in err
