"""``curvlab studies``, ``curvlab run`` and ``curvlab plot`` on a study: output, files, one-line errors."""

from __future__ import annotations

import pytest

import curvlab as cl
from curvlab import cli


def test_studies_lists_name_paper_description_claims(toy, capsys):
    assert cli.main(["studies"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "paper", "description", "claims"]
    [row] = [line for line in lines[2:] if line.split()[0] == "toy"]
    assert toy.STUDY.paper in row and toy.STUDY.description in row and row.endswith("T1, T2")


def test_studies_name_shows_the_configuration_and_claims(toy, capsys):
    assert cli.main(["studies", "toy"]) == 0
    out = capsys.readouterr().out
    assert "a       [1, 2, 3]   [1, 2]" in out and "points  5           3" in out
    assert "T2     y stays at most 10" in out


def test_run_quick_prints_the_verdicts_and_writes_the_files(toy, tmp_path, capsys):
    assert cli.main(["run", "toy", "--quick", "--out", str(tmp_path), "--set", "b=0.5,2", "--set", "points=4"]) == 0
    out = capsys.readouterr().out
    assert toy.CALLS == [(1, 0.5), (1, 2.0), (2, 0.5), (2, 2.0)]
    ds = cl.studies.load(tmp_path / "toy-quick.nc")
    assert ds.attrs["quick"] == 1 and ds.sizes["x"] == 4 and ds["b"].values.tolist() == [0.5, 2.0]
    assert cl.studies.format_verdicts(ds) in out
    assert f"wrote {tmp_path / 'toy-quick.nc'}" in out and f"wrote {tmp_path / 'toy-quick-mean.png'}" in out


def test_run_with_a_failed_cell_exits_1_listing_it(toy, tmp_path, capsys):
    assert cli.main(["run", "toy", "--quick", "--out", str(tmp_path), "--set", "fail=[[2, 0.5]]"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == ["curvlab run: failed cell {'a': 2, 'b': 0.5}: ValueError: toy failure at a=2, b=0.5"]
    assert (tmp_path / "toy-quick.nc").is_file()


@pytest.mark.parametrize("argv, message", [
    (["run", "toy", "--set", "steps=3"],
     "--set: unknown configuration key 'steps' for study 'toy'; valid: a, b, points, fail"),
    (["run", "toy", "--set", "points=many"], "--set: points: expected an integer (like the default 5); got \"many\""),
    (["run", "toy", "--set", "b=[1, \"x\"]"], "--set: b[1]: expected a number (like the default 0.5); got \"x\""),
    (["run", "toy", "--set", "points"], "--set: expected KEY=VALUE; got 'points'"),
    (["run", "toy", "--set", "=3"], "--set: expected KEY=VALUE; got '=3'"),
    (["run", "nope"], "unknown study 'nope'; valid:"),
    (["run", "toy", "--processes", "0"], "argument --processes: must be at least 1; got 0"),
    (["run", "toy", "--processes", "2", "--dask", "local"], "not allowed with argument"),
    (["studies", "nope"], "unknown study 'nope'; valid:"),
])
def test_bad_arguments_are_one_line_and_status_2(toy, tmp_path, capsys, argv, message):
    assert cli.main([*argv, "--out", str(tmp_path)] if argv[0] == "run" else argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith("curvlab")
    assert toy.CALLS == [] and list(tmp_path.iterdir()) == []  # refused before any computation


def test_a_changed_configuration_is_one_line_status_2_and_restart_runs(toy, tmp_path, capsys):
    base = ["run", "toy", "--quick", "--out", str(tmp_path)]
    assert cli.main(base) == 0
    capsys.readouterr()
    assert cli.main([*base, "--set", "points=4"]) == 2
    [err] = capsys.readouterr().err.strip().splitlines()
    assert "another configuration (points: 3 → 4)" in err and "--restart" in err
    assert cli.main([*base, "--set", "points=4", "--restart"]) == 0


def test_plot_redraws_a_study_figures(toy, tmp_path, capsys):
    assert cli.main(["run", "toy", "--quick", "--out", str(tmp_path)]) == 0
    png = tmp_path / "toy-quick-mean.png"
    png.unlink()
    capsys.readouterr()
    assert cli.main(["plot", str(tmp_path / "toy-quick.nc")]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {png}"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_listing_the_studies_imports_nothing_heavy():
    """`curvlab studies` imports every study module: they keep xarray, matplotlib … inside their functions."""
    import subprocess
    import sys
    from pathlib import Path

    heavy = ("xarray", "pandas", "scipy", "matplotlib", "seaborn", "h5netcdf", "distributed")
    code = ("import contextlib, io, sys\nfrom curvlab.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    codes = [main(['studies']), main(['run', '--help'])]\n"
            "assert codes == [0, 0], codes\n"
            f"print([m for m in {heavy!r} if m in sys.modules])")
    root = str(Path(__file__).resolve().parents[2])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_scripts_entry_point_runs_with_overrides_and_prints_the_verdicts(toy, tmp_path, capsys):
    ds = cl.studies.script("toy", {"b": [0.5]}, ["--quick", "--out", str(tmp_path)])
    assert toy.CALLS == [(1, 0.5), (2, 0.5)]
    assert (tmp_path / "toy-quick.nc").exists() and bool(ds.attrs["quick"])
    assert "T1" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        cl.studies.script("toy", {}, ["--processes", "0"])
    assert info.value.code == 2 and "--processes must be ≥ 1; got 0" in capsys.readouterr().err


def test_every_study_script_calls_the_entry_point_of_its_study():
    import ast
    import pathlib

    folder = pathlib.Path(__file__).parents[2] / "studies"
    scripts = sorted(folder.glob("*.py"))
    assert len(scripts) == len(cl.studies.names()) - ("toy" in cl.studies.names())
    for path in scripts:
        calls = [node for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Call)
                 and getattr(node.func, "attr", None) == "script"]
        assert [c.args[0].value for c in calls] == [path.stem.replace("_", "-")], path
