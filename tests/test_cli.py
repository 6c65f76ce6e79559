"""The curvlab command line: the problems table, the oracle summary, one-line errors with status 2."""

from __future__ import annotations

import re

import pytest

from curvlab import cli, problems


def test_problems_table(capsys):
    assert cli.main(["problems"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:4] == ["name", "P", "N", "max"]
    rows = {line.split()[0]: line.split() for line in out[2:]}
    assert list(rows) == problems.names()
    assert rows["digits-mlp"][1:4] == ["3466", "256", "1797"]
    assert rows["digits-mlp"][4] == "CrossEntropyLoss(mean)"
    assert rows["diabetes-mlp"][1:5] == ["193", "256", "442", "MSELoss(mean)"]


def test_oracle_digits_mlp(capsys):
    assert cli.main(["oracle", "digits-mlp", "--n", "32"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^P\s+3466$", out, re.M)
    assert re.search(r"^data\s+digits, N = 32, seed 0, float64$", out, re.M)
    assert re.search(r"^loss\s+CrossEntropyLoss\(mean\) = \d", out, re.M)
    assert re.search(r"^\|grad\|\s+\d\.\d+e[-+]\d+$", out, re.M)
    num = r"-?\d\.\d{3}e[-+]\d{2}"
    rows = {}
    for kind in ("hessian", "ggn", "empirical_fisher"):
        m = re.search(rf"^{kind}\s+({num})\s+((?:{num}\s+){{5}})(\d+)\s+(\d+\.\d\d)\s+(\d+\.\d\d)$", out, re.M)
        assert m, f"no row for {kind} in\n{out}"
        rows[kind] = m
    # Fisher-type matrices are positive semi-definite; the Hessian of an MLP at initialisation is not.
    assert rows["ggn"].group(3) == "0" and rows["empirical_fisher"].group(3) == "0"
    assert int(rows["hessian"].group(3)) > 0
    top = [float(v) for v in rows["ggn"].group(2).split()]
    assert top == sorted(top, reverse=True) and top[0] > 0


def test_oracle_matches_the_oracle(capsys):
    import curvlab as cl

    assert cli.main(["oracle", "diabetes-mlp", "--n", "50", "--kinds", "ggn", "--top", "2", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    prob = problems.load("diabetes-mlp", n=50, seed=3)
    G = cl.exact.ggn(prob)
    ev = G.eigvalsh().flip(0)
    assert f"{float(G.trace()): .3e}" in out
    assert " ".join(f"{float(v): .3e}" for v in ev[:2]) in out
    assert "hessian" not in out


@pytest.mark.parametrize("argv, message", [
    (["oracle", "digits-rnn"], "unknown problem 'digits-rnn'"),
    (["oracle", "diabetes-mlp", "--n", "1000"], "at most n=442"),
    (["oracle", "diabetes-mlp", "--n", "many"], "invalid int value"),
    (["oracle", "diabetes-mlp", "--dtype", "float16"], "invalid choice"),
    (["oracle", "diabetes-mlp", "--kinds", "kfac"], "unknown curvature kfac"),
    (["oracle"], "required"),
    (["frobnicate"], "invalid choice"),
    ([], "required"),
])
def test_errors_are_one_line_with_status_2(capsys, argv, message):
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in captured.err


def test_help_and_version(capsys):
    assert cli.main(["--version"]) == 0
    assert "curvlab" in capsys.readouterr().out
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(cmd.name in out for cmd in cli.COMMANDS)


def test_traceback_flag_reraises():
    with pytest.raises(ValueError, match="unknown problem"):
        cli.main(["--traceback", "oracle", "digits-rnn"])


def test_format_table_aligns():
    text = cli.format_table(["a", "bb"], [["x", 1], ["yyy", 22]])
    assert text.splitlines() == ["a    bb", "---  --", "x     1", "yyy  22"]


def test_module_entry_point_exit_status():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "curvlab", "oracle", "digits-rnn"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "curvlab oracle: error: unknown problem 'digits-rnn'; valid names: " + ", ".join(problems.names())]


# ---------------------------------------------------------------------------- every option, a bad value
def _one_line_error(capsys, argv: list[str]) -> str:
    """Run ``curvlab ARGV`` in-process; assert status 2, nothing on stdout and one line on stderr; return it."""
    rc = cli.main(argv)
    captured = capsys.readouterr()
    assert rc == 2, (argv, captured)
    assert captured.out == "", argv
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, (argv, captured.err)
    return lines[0]


@pytest.fixture()
def no_computation(monkeypatch):
    """Fail the test if a command gets as far as computing a curvature or a report."""
    import sys

    import curvlab.compare.report  # noqa: F401
    from curvlab import exact

    def boom(*args, **kwargs):
        raise AssertionError("computed something before checking every argument")

    monkeypatch.setattr(exact, "get", boom)
    monkeypatch.setattr(sys.modules["curvlab.compare.report"], "report", boom)
    return monkeypatch


@pytest.fixture()
def report_file(tmp_path_factory):
    """A small real report on disk (and the folder it is in)."""
    import curvlab as cl

    prob = problems.load("diabetes-mlp", n=16)
    path = tmp_path_factory.mktemp("report") / "r.nc"
    cl.compare.save(cl.compare.report(prob, methods=["ggn", "kfac"], damping=[0.1], k=2), path)
    return path


def _bad_options(tmp: str) -> list[tuple[list[str], str]]:
    """(argv, expected part of the error line) for each option of each command."""
    problem = [
        (["--n", "0"], "argument --n: must be at least 1; got 0"), (["--n", "many"], "invalid int value"),
        (["--n", "100000"], "at most n=442"), (["--seed", "-1"], "argument --seed: must be at least 0"),
        (["--seed", "x"], "invalid int value"), (["--dtype", "float16"], "invalid choice"),
        (["--bogus"], "unrecognized arguments"),
    ]
    cases: list[tuple[list[str], str]] = [
        (["problems", "extra"], "unrecognized arguments: extra"), (["methods", "--all"], "unrecognized arguments"),
        (["oracle", "nope"], "unknown problem 'nope'"), (["compare", "nope"], "unknown problem 'nope'"),
        (["--frobnicate", "problems"], "unrecognized arguments"), (["frobnicate"], "invalid choice"),
    ]
    for cmd in ("oracle", "compare"):
        cases += [([cmd, "diabetes-mlp", *opt], msg) for opt, msg in problem]
    oracle = [
        (["--kinds", "kfac"], "--kinds: unknown curvature kfac"), (["--kinds", ","], "--kinds: unknown curvature"),
        (["--kinds", "ggn-block"], "unknown curvature ggn-block"),
        (["--mc-samples", "0"], "argument --mc-samples: must be at least 1; got 0"),
        (["--mc-samples", "-2"], "argument --mc-samples: must be at least 1; got -2"),
        (["--top", "0"], "argument --top: must be at least 1; got 0"),
    ]
    compare = [
        (["--methods", "nope"], "unknown method 'nope'"), (["--methods", ","], "--methods: give at least one value"),
        (["--methods", "kfac,kfac"], "listed twice"),
        (["--references", "sgd"], "reference 'sgd' is not a matrix method"),
        (["--references", "nope"], "unknown method 'nope'"), (["--damping", "x"], "--damping: expected"),
        (["--damping", "-1"], "finite non-negative"), (["--damping", "nan"], "finite non-negative"),
        (["--damping", "0.1,0.1"], "listed twice"), (["--k", "0"], "argument --k: must be at least 1"),
        (["--damping-rule", "pi"], "invalid choice"), (["--step", "x"], "--step: use armijo, model or a number"),
        (["--step", "inf"], "finite positive learning rate"), (["--step", "-1"], "finite positive learning rate"),
        (["--mc-samples", "0"], "argument --mc-samples: must be at least 1; got 0"),
        (["--mc-samples", "-2"], "argument --mc-samples: must be at least 1; got -2"),
        (["--out", tmp], "is a folder"), (["--out", f"{tmp}/file/r.nc"], "--out: cannot write into"),
        (["--dpi", "100000"], "argument --dpi: must be from 20 to 600; got 100000"),
        (["--dpi", "0"], "argument --dpi: must be at least 1"),
    ]
    cases += [(["oracle", "diabetes-mlp", *opt], msg) for opt, msg in oracle]
    cases += [(["compare", "diabetes-mlp", "--quiet", *opt], msg) for opt, msg in compare]
    cases += [
        (["plot", f"{tmp}/missing.nc"], "no such file"), (["plot", tmp], "is a folder"),
        (["plot", f"{tmp}/file"], "cannot read"), (["plot", f"{tmp}/other.nc"], "not a curvlab compare report"),
        (["plot", f"{tmp}/other.nc", "--dpi", "100000"], "argument --dpi: must be from 20 to 600; got 100000"),
        (["plot", f"{tmp}/other.nc", "--dpi", "high"], "argument --dpi: invalid int value: 'high'"),
        (["plot"], "required"),
    ]
    from tests.studies import toy_study  # noqa: F401  (registers the study "toy" that the run cases name)

    cases += [
        (["studies", "nope"], "unknown study 'nope'"), (["run", "nope"], "unknown study 'nope'"),
        (["run", "toy", "--set", "nope=1"], "--set: unknown configuration key 'nope'"),
        (["run", "toy", "--set", "points=x"], "--set: points: expected an integer"),
        (["run", "toy", "--dask", "host:port"], "argument --dask: expected local or a scheduler address"),
        (["run", "toy", "--processes", "0"], "argument --processes: must be at least 1; got 0"),
        (["run", "toy", "--out", f"{tmp}/file"], "out must be a folder"),
    ]
    return cases


def test_every_bad_option_of_every_command_is_one_line_and_status_2(capsys, tmp_path, no_computation):
    import xarray as xr

    (tmp_path / "file").write_text("not a netCDF file")
    xr.Dataset({"temperature": ("time", [1.0, 2.0])}).to_netcdf(tmp_path / "other.nc", engine="h5netcdf")
    cases = _bad_options(str(tmp_path))
    for argv, message in cases:
        line = _one_line_error(capsys, argv)
        assert message in line, (argv, line)
    covered = {(argv[0], a) for argv, _ in cases for a in argv if a.startswith("--")}
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, cli.argparse._SubParsersAction))
    for name, p in sub.choices.items():  # every option of every command has a bad-value case
        for action in p._actions:
            opts = [o for o in action.option_strings if o.startswith("--") and o != "--help"]
            if opts and action.nargs != 0:
                assert (name, opts[0]) in covered, f"no bad-value case for {name} {opts[0]}"


def test_plot_in_a_read_only_folder_is_one_line(capsys, report_file, monkeypatch):
    from matplotlib.figure import Figure

    def denied(self, fname, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(fname))

    monkeypatch.setattr(Figure, "savefig", denied)  # as a read-only folder does (root ignores chmod)
    line = _one_line_error(capsys, ["plot", str(report_file)])
    assert line.startswith(f"curvlab plot: error: cannot write the figures beside {report_file}: ")
    assert "Permission denied" in line
    assert sorted(p.name for p in report_file.parent.iterdir()) == ["r.nc"]  # no partial files


def test_plot_redraws_a_report_at_a_chosen_dpi(capsys, report_file):
    assert cli.main(["plot", str(report_file), "--dpi", "40"]) == 0
    out = capsys.readouterr().out
    assert "r-cosines.png" in out and "r-layers.png" in out


def test_memory_budget_and_warnings_are_one_line(capsys, monkeypatch):
    import warnings

    from curvlab import memory

    monkeypatch.setattr(memory, "_budget", 1024)
    assert cli.main(["oracle", "diabetes-mlp", "--n", "8", "--kinds", "ggn"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("curvlab oracle: error: ") and "memory budget of 1.0 KiB" in err[0]
    monkeypatch.setattr(memory, "_budget", 2**30)
    describe = problems.describe

    def noisy(name):
        warnings.warn("something to know\nsecond line", UserWarning, stacklevel=1)
        return describe(name)

    monkeypatch.setattr(problems, "describe", noisy)
    assert cli.main(["problems"]) == 0
    err = capsys.readouterr().err
    assert err.splitlines() and set(err.splitlines()) == {"curvlab problems: warning: something to know"}


def test_oracle_accepts_the_names_used_everywhere_else(capsys):
    assert cli.main(["oracle", "diabetes-mlp", "--n", "12", "--kinds", "ef,fisher-mc,empirical_fisher",
                     "--top", "1"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^empirical_fisher\s", out, re.M) and re.search(r"^fisher_mc\s", out, re.M)
    assert len(re.findall(r"^empirical_fisher\s", out, re.M)) == 1  # ef and empirical_fisher: one row


def test_compare_sgd_only_with_two_references(capsys, tmp_path):
    out = tmp_path / "s.nc"
    rc = cli.main(["compare", "diabetes-mlp", "--n", "16", "--methods", "sgd", "--references", "ggn,hessian",
                   "--damping", "0.1", "--k", "2", "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.err == ""
    for ref in ("ggn", "hessian"):
        assert f"Matrix agreement with {ref}:" in captured.out and f"Step quality against {ref}:" in captured.out
    assert "no matrix methods in this report" in captured.out
    assert out.exists() and (tmp_path / "s-cosines.png").exists()


def test_methods_lists_the_registry(capsys):
    from curvlab.compare import methods

    assert cli.main(["methods"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:4] == ["name", "family", "structure", "damping"]
    rows = {line.split()[0]: line for line in out[2:2 + len(methods.REGISTRY)]}
    assert list(rows) == methods.names()
    assert "kron" in rows["kfac"] and "π-damping" in rows["kfac"] and "own" in rows["kfac"]
    assert "trace-normalised" in rows["tkfac"] and "none (x = −g)" in rows["sgd"]
    assert cli.main(["compare", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    for name in methods.names():
        assert name in help_text
    assert "`curvlab methods`" in help_text


def test_help_problems_and_methods_import_nothing_heavy():
    """The fast start: these commands need torch only, not xarray, scipy, matplotlib or torch's compiler."""
    import subprocess
    import sys
    from pathlib import Path

    heavy = ("xarray", "pandas", "scipy", "matplotlib", "seaborn", "h5netcdf", "torch._dynamo")
    code = ("import contextlib, io, sys\nfrom curvlab.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    codes = [main(['--help']), main(['problems']), main(['methods']), main(['compare', '--help'])]\n"
            "assert codes == [0] * 4, codes\n"
            f"print([m for m in {heavy!r} if m in sys.modules])")
    root = str(Path(__file__).resolve().parents[1])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# ---------------------------------------------------------------------------- progress, memory, indefinite
def test_oracle_and_compare_draw_a_progress_bar_on_a_terminal(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "_is_terminal", lambda stream: True)
    assert cli.main(["oracle", "diabetes-mlp", "--n", "12", "--kinds", "ggn,ef", "--top", "1"]) == 0
    captured = capsys.readouterr()
    assert "oracle diabetes-mlp" in captured.err and "/4 " in captured.err and "stage" in captured.err
    assert re.search(r"^ggn\s", captured.out, re.M) and "stage" not in captured.out
    argv = ["compare", "diabetes-mlp", "--n", "12", "--methods", "ggn,kfac", "--damping", "0.1", "--k", "2",
            "--out", str(tmp_path / "r.nc"), "--no-figures"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "compare diabetes-mlp" in captured.err and "<" in captured.err  # elapsed<left
    assert "Matrix agreement with ggn" in captured.out and "stage" not in captured.out
    assert cli.main([*argv, "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    assert cli.main(["oracle", "diabetes-mlp", "--n", "12", "--kinds", "ggn", "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_no_progress_bar_unless_stdout_and_stderr_are_terminals(capsys, monkeypatch, tmp_path):
    import sys

    argv = ["compare", "diabetes-mlp", "--n", "12", "--methods", "kfac", "--damping", "0.1", "--k", "2",
            "--out", str(tmp_path / "r.nc"), "--no-figures"]
    assert cli.main(argv) == 0  # captured streams are no terminals
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(cli, "_is_terminal", lambda stream: stream is sys.stderr)  # output piped to a file
    assert cli.main(["oracle", "diabetes-mlp", "--n", "12", "--kinds", "ggn"]) == 0
    assert capsys.readouterr().err == ""


def test_compare_refuses_a_report_over_the_memory_budget_in_one_line(capsys, monkeypatch):
    from curvlab import memory

    monkeypatch.setattr(memory, "_budget", 6 * 193 * 193 * 8)  # one dense matrix fits, three references do not
    line = _one_line_error(capsys, ["compare", "diabetes-mlp", "--methods", "kfac", "--references",
                                    "ggn,hessian,ef", "--quiet"])
    assert line.startswith("curvlab compare: error: the report would hold about ") and "memory budget" in line


def test_compare_marks_indefinite_steps(capsys, tmp_path):
    rc = cli.main(["compare", "diabetes-mlp", "--n", "32", "--methods", "hessian,saddle-free-newton,ggn",
                   "--damping", "1e-3", "--k", "2", "--out", str(tmp_path / "r.nc"), "--no-figures", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "Definiteness" in out and "hessian *" in out and "saddle-free-newton *" not in out
    assert re.search(r"^hessian\s+-\d", out, re.M)  # its smallest eigenvalue is negative
