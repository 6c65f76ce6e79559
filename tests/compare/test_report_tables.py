"""The report's construction: low-rank forms where cheaper, definiteness, the memory plan, progress.

References: the same report quantities from dense matrices passed in as custom methods (the
comparators on ``Dense`` objects), dense eigenvalues (torch.linalg.eigvalsh), and the memory
budget's arithmetic (bytes of P×P float64 matrices).
"""

from __future__ import annotations

import ast
import gc
import io
import math
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

import curvlab as cl
import curvlab.compare as cc
from curvlab import memory
from curvlab.compare import methods as reg
from curvlab.linalg import CurvatureMatrix, Dense, LowRank
from tests.compare.conftest import REPORT_METHODS


def sel(ds, var, **kw) -> np.ndarray:
    return ds[var].sel(kw).values


# ---------------------------------------------------------------------------------------- one function per table
ROOT = Path(__file__).resolve().parents[2]


def _code_lines(node: ast.AST, source: list[str]) -> int:
    """Lines of code of a function: its span without the docstring, blank lines and comment lines."""
    body = node.body
    start = body[0].end_lineno + 1 if (isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                                        and isinstance(body[0].value.value, str)) else body[0].lineno
    lines = source[start - 1:node.end_lineno]
    return sum(1 for line in lines if line.strip() and not line.strip().startswith("#"))


def test_no_long_function_in_compare_and_plot():
    files = sorted((ROOT / "curvlab" / "compare").glob("*.py")) + [ROOT / "curvlab" / "plot.py"]
    long = []
    for path in files:
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = _code_lines(node, text.splitlines())
                if n > 60:
                    long.append(f"{path.name}:{node.name} ({n} lines)")
    assert long == []


def test_every_variable_has_units_and_a_description_only():
    for name, entry in cc.VARIABLES.items():
        assert len(entry) == 2 and all(isinstance(t, str) and t for t in entry), name


# ---------------------------------------------------------------------------------------- low-rank forms
def test_fisher_type_matrices_are_low_rank_where_cheaper(small_report, small_prob):
    """diabetes-mlp with N = 32: r = N·C = 32 rows < P = 193 (and < the first block's 176)."""
    rep = dict(zip(small_report.method.values, small_report.representation.values))
    assert rep["ggn"] == "low_rank" and rep["ef"] == "low_rank" and rep["ggn-block"] == "block_low_rank"
    assert rep["hessian"] == "full" and rep["kfac"] == "kron" and rep["sgd"] == "vector"
    assert str(small_report.structure.sel({"method": "ggn"}).values) == "full"  # what it is is unchanged
    text = small_report.attrs["representations"]
    assert "ggn: low_rank (r = 32 factor rows < 193)" in text
    assert "ggn-block: block_low_rank (r = 32 factor rows < 176)" in text
    assert "ggn: low-rank form" in small_report.attrs["memory_plan"]


def test_dense_where_the_rank_is_not_smaller():
    prob = cl.problems.load("diabetes-mlp", n=256)  # r = 256 > P = 193
    ds = cc.report(prob, methods=["ggn", "ef", "kfac"], damping=[0.1], k=2)
    assert list(ds.representation.values) == ["full", "full", "kron"]
    assert "low-rank" not in ds.attrs["memory_plan"]
    assert reg.low_rank_variant("ggn") == "ggn-low-rank" and reg.low_rank_variant("ef-block") == "ef-block-low-rank"
    assert reg.low_rank_variant("hessian") is None and reg.low_rank_variant("kfac") is None
    assert reg.factor_rows("ggn", prob) == 256 and reg.factor_rows("fisher-mc", prob, 3) == 768


def test_low_rank_report_values_equal_the_dense_ones(small_prob):
    """The same numbers from the low-rank GGN and EF as from their dense matrices (custom methods)."""
    G, E = cl.exact.ggn(small_prob), cl.exact.empirical_fisher(small_prob)
    assert isinstance(G, Dense)
    damping = [1e-2, 1e-1]
    ds = cc.report(small_prob, methods={"ggn": "ggn", "ef": "ef", "ggn-dense": G, "ef-dense": E, "kfac": "kfac"},
                   references=["ggn", "ggn-dense"], damping=damping, k=4)
    assert list(ds.representation.values) == ["low_rank", "low_rank", "full", "full", "kron"]
    for lr, dense in (("ggn", "ggn-dense"), ("ef", "ef-dense")):
        for var in ("cosine", "relative_error", "trace_ratio", "logdet_difference", "top_ratio", "subspace_overlap",
                    "fraction_below", "positive_definite", "step_norm", "slope", "energy_error", "alpha",
                    "predicted_change", "actual_change"):
            a, b = sel(ds, var, method=lr), sel(ds, var, method=dense)
            np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10, err_msg=f"{lr} {var}")
        np.testing.assert_allclose(sel(ds, "eigenvalues", method=lr), sel(ds, "eigenvalues", method=dense),
                                   rtol=1e-9, atol=1e-12)
        for lam in damping:  # the two forms take the same step
            assert float(ds["direction_cosine"].sel({"damping": lam, "method": lr, "versus": dense})) == \
                pytest.approx(1.0, abs=1e-10)
    for var in ("cosine", "relative_error"):  # the low-rank and the dense reference give kfac the same numbers
        np.testing.assert_allclose(sel(ds, var, method="kfac", reference="ggn"),
                                   sel(ds, var, method="kfac", reference="ggn-dense"), rtol=1e-9, atol=1e-14)


def test_near_exact_blocks_keep_their_digits_against_a_low_rank_reference(small_report):
    """KFAC is exact on the last layer (one output, MSE): the block error stays at rounding, not at the
    ~1e-8 that ‖A‖² + ‖B‖² − 2⟨A, B⟩ would leave between two structures."""
    last = small_report.block.values[-1]
    assert str(small_report.representation.sel({"method": "ggn"}).values) == "low_rank"
    for m in ("kfac", "ekfac"):
        assert float(small_report["relative_error"].sel({"method": m, "reference": "ggn", "block": last})) < 1e-12


# ---------------------------------------------------------------------------------------- definiteness
def test_min_eigenvalue_and_positive_definite_against_dense(small_report, small_prob):
    ds = small_report
    P = small_prob.num_params
    dense = {"hessian": cl.exact.hessian(small_prob), "ggn": cl.exact.ggn(small_prob),
             "kfac": cl.approx.kfac(small_prob), "foof": cl.approx.foof(small_prob)}
    for m, C in dense.items():
        w = torch.linalg.eigvalsh(C.to_dense())
        scale = float(w.abs().max())
        assert float(ds["min_eigenvalue"].sel({"method": m})) == pytest.approx(float(w[0]), abs=1e-10 * scale)
        for lam in ds.damping.values:
            want = float(w[0]) + lam > math.sqrt(P) * torch.finfo(torch.float64).eps * (scale + lam)
            assert float(ds["positive_definite"].sel({"method": m, "damping": lam})) == float(want), (m, lam)
    assert float(ds["min_eigenvalue"].sel({"method": "hessian"})) < 0
    assert np.isnan(sel(ds, "positive_definite", method="sgd")).all()
    assert np.isnan(float(ds["min_eigenvalue"].sel({"method": "sgd"})))


def test_positive_definite_switches_at_minus_the_smallest_eigenvalue(small_prob):
    w0 = float(cl.exact.hessian(small_prob).eigvalsh()[0])
    assert w0 < 0
    damping = [0.5 * -w0, 2.0 * -w0]
    ds = cc.report(small_prob, methods=["hessian", "ggn"], damping=damping, k=2)
    assert list(sel(ds, "positive_definite", method="hessian")) == [0.0, 1.0]
    assert list(sel(ds, "positive_definite", method="ggn")) == [1.0, 1.0]
    text = cc.format_report(ds, damping=damping[0])
    assert "hessian *" in text and "ggn *" not in text and "NO" in text
    assert "not positive definite at λ = " in text and "saddle-free-newton" in text
    assert "hessian *" not in cc.format_report(ds, damping=damping[1])


def test_top_only_report_still_says_whether_it_is_definite(small_prob):
    ds = cc.report(small_prob, methods=["hessian", "ggn-block"], damping=[1e-3], k=3, full_spectrum=False)
    w0 = float(cl.exact.hessian(small_prob).eigvalsh()[0])
    assert float(ds["min_eigenvalue"].sel({"method": "hessian"})) == pytest.approx(w0, rel=1e-8)
    assert float(ds["positive_definite"].sel({"method": "hessian", "damping": 1e-3})) == 0.0


def test_figures_mark_indefinite_methods(small_report):
    import curvlab.plot as cp

    lam = 0.01
    assert cc.report.__module__ == "curvlab.compare.report"
    fig = cp.direction_cosines(small_report, damping=lam)
    ax = fig.axes[0]
    ticks = [t.get_text() for t in ax.get_yticklabels()]
    assert "hessian *" in ticks and "ggn" in ticks and "ggn *" not in ticks
    texts = [t.get_text() for t in ax.texts]
    assert sum(t.endswith("*") for t in texts) == 2 * len(ticks) - 1  # the hessian's row and column
    assert "not positive definite (hessian)" in ax.get_title()
    legend = [t.get_text() for t in cp.spectra(small_report).axes[0].get_legend().get_texts()]
    assert any(t.startswith("hessian") and "not PD" in t for t in legend)
    assert not any(t.startswith("ggn ") and "not PD" in t for t in legend)


# ---------------------------------------------------------------------------------------- memory as a whole
def test_the_whole_report_is_held_against_the_budget(monkeypatch):
    """Each dense 193×193 matrix (291 KiB) fits a budget of six, but three dense references with their
    factorisations and eigendecompositions do not: refused before anything is built; one fits."""
    prob = cl.problems.load("diabetes-mlp", n=256)  # r ≥ P: the GGN and EF are dense
    one = memory.nbytes((prob.num_params,) * 2, torch.float64)

    def boom(*args, **kwargs):
        raise AssertionError("built something before checking the memory plan")

    with memory.budget(6 * one):
        monkeypatch.setattr(reg, "build", boom)
        with pytest.raises(memory.MemoryBudgetError, match=r"would hold about .* at once \(largest: .*hessian"):
            cc.report(prob, methods=["kfac"], references=["ggn", "hessian", "ef"], damping=[0.1], k=2)
        monkeypatch.undo()
        ds = cc.report(prob, methods=["kfac"], references=["ggn"], damping=[0.1], k=2)
    assert 0 < ds.attrs["memory_estimate_bytes"] <= 6 * one == ds.attrs["memory_budget_bytes"]
    assert "within the budget" in ds.attrs["memory_plan"]


def test_matrices_are_released_once_their_tables_are_done(monkeypatch):
    """While a method is built, no earlier non-reference matrix is still alive (weak references)."""
    prob = cl.problems.load("diabetes-mlp", n=256)
    build = reg.build
    seen: dict[str, weakref.ref] = {}
    alive_at: dict[str, list[str]] = {}

    def tracking(name, prob_, cache=None, **options):
        gc.collect()
        alive_at[name] = [n for n, r in seen.items() if r() is not None]
        out = build(name, prob_, cache, **options)
        if isinstance(out, CurvatureMatrix):
            seen.setdefault(name, weakref.ref(out))
        return out

    monkeypatch.setattr(reg, "build", tracking)
    cc.report(prob, methods=["hessian", "ef", "ggn-block", "kfac", "fisher-mc"], references=["ggn"], damping=[0.1], k=2)
    assert alive_at["ef"] == ["ggn"]
    assert alive_at["kfac"] == ["ggn"] and alive_at["fisher-mc"] == ["ggn"]


def test_a_source_is_kept_until_the_method_that_reads_it(monkeypatch):
    """hessian is read by saddle-free-newton (its eigh): kept that long, then dropped; so is the kfac of kfac-pi."""
    prob = cl.problems.load("diabetes-mlp", n=32)
    build = reg.build
    hold: dict[str, weakref.ref] = {}
    alive_at: dict[str, set[str]] = {}

    def tracking(name, prob_, cache=None, **options):
        gc.collect()
        alive_at[name] = {n for n, r in hold.items() if r() is not None}
        out = build(name, prob_, cache, **options)
        if isinstance(out, CurvatureMatrix) and name not in hold:
            hold[name] = weakref.ref(out)
        return out

    monkeypatch.setattr(reg, "build", tracking)
    ds = cc.report(prob, methods=["hessian", "kfac", "ef", "saddle-free-newton", "kfac-pi", "sgd"], damping=[0.1], k=2)
    assert {"hessian", "kfac"} <= alive_at["saddle-free-newton"]
    assert "hessian" not in alive_at["kfac-pi"] and "kfac" in alive_at["kfac-pi"]
    assert "ef" not in alive_at["saddle-free-newton"]
    assert "kfac" not in alive_at["sgd"]
    assert float(ds["relative_error"].sel({"method": "kfac-pi", "reference": "ggn", "block": "all"})) == \
        float(ds["relative_error"].sel({"method": "kfac", "reference": "ggn", "block": "all"}))


def test_low_rank_forms_let_a_report_fit_where_dense_ones_would_not(small_prob):
    """The memory plan counts each representation: with N = 32 the GGN, EF and their blocks are low rank,
    so a budget below three dense matrices suffices."""
    one = memory.nbytes((small_prob.num_params,) * 2, torch.float64)
    with memory.budget(int(3.5 * one)):
        ds = cc.report(small_prob, methods=["ggn", "ggn-block", "ef", "fisher-mc", "kfac"], damping=[0.1], k=2)
    assert set(ds.representation.values) == {"low_rank", "block_low_rank", "kron"}
    # at most the transient dense twin of the GGN (while kfac is compared with it) and the factors' Grams
    assert one <= ds.attrs["memory_estimate_bytes"] < 1.5 * one


# ---------------------------------------------------------------------------------------- progress
def test_progress_bar_callable_and_silence(small_prob, capsys):
    messages: list[str] = []
    cc.report(small_prob, methods=["ggn", "kfac", "sgd"], damping=[0.1], k=2, progress=messages.append)
    assert messages[0] == "building ggn"
    assert "building kfac" in messages and "spectrum of kfac" in messages and messages[-1] == "direction cosines"
    assert capsys.readouterr().err == ""
    cc.report(small_prob, methods=["ggn", "kfac", "sgd"], damping=[0.1], k=2)  # default: silent
    assert capsys.readouterr().err == ""
    cc.report(small_prob, methods=["ggn", "kfac", "sgd"], damping=[0.1], k=2, progress=True)
    err = capsys.readouterr().err
    total = 3 + 5 * 3 + 1  # three builds, five tables per method, the direction cosines
    assert "compare diabetes-mlp" in err and f"/{total} " in err and "stage" in err and "<" in err  # time left
    with pytest.raises(TypeError, match="progress must be True, False, None or a callable"):
        cc.report(small_prob, methods=["ggn"], progress="yes")


def test_low_rank_names_build_low_rank_matrices(small_prob):
    cache: dict = {}
    full = reg.build("ggn-low-rank", small_prob, cache)
    blocks = reg.build("ggn-block-low-rank", small_prob, cache)
    assert isinstance(full, LowRank) and all(isinstance(b, LowRank) for b in blocks.blocks)
    assert all(b is full.restrict(s) for b, s in zip(blocks.blocks, blocks.block_slices))  # read off the full one
    G = cl.exact.ggn(small_prob).to_dense()
    assert float((full.to_dense() - G).abs().max()) <= 1e-12 * float(G.abs().max())
    buf = io.StringIO()
    print(REPORT_METHODS, file=buf)  # the shared report's methods include the ladder and a Hessian
    assert "hessian" in buf.getvalue()


def test_dense_partners_are_compared_with_the_dense_twin(small_prob, monkeypatch):
    """A low-rank GGN against the dense Hessian: the Frobenius products use the oracle's dense GGN
    (built at 2NP² flops), not 2P²r flops through the factor; the spectra keep the low-rank form."""
    inner = LowRank._inner

    def guarded(self, other):
        assert not isinstance(other, Dense), "a low-rank matrix was multiplied through a dense one"
        return inner(self, other)

    monkeypatch.setattr(LowRank, "_inner", guarded)
    ds = cc.report(small_prob, methods=["hessian", "ggn"], references=["ggn", "hessian"], damping=[0.1], k=2)
    assert list(ds.representation.values) == ["full", "low_rank"]
    H, G = cl.exact.hessian(small_prob), cl.exact.ggn(small_prob)
    assert float(ds["cosine"].sel({"method": "hessian", "reference": "ggn", "block": "all"})) == \
        pytest.approx(float(cc.cosine(H, G)), rel=1e-12)
    assert float(ds["relative_error"].sel({"method": "ggn", "reference": "hessian", "block": "all"})) == \
        pytest.approx(float(cc.relative_error(G, H)), rel=1e-12)
