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
