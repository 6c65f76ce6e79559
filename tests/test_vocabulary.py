"""One spelling per idea, the older public spellings still accepted (curvlab.vocabulary)."""

from __future__ import annotations

import pytest
import torch

import curvlab as cl
from curvlab.vocabulary import Curvature, Structure, curvature, fisher_type, mc_samples_of


@pytest.mark.parametrize("spelling,kind", [("ggn", "ggn"), ("type2", "ggn"), ("fisher_mc", "fisher_mc"),
                                           ("mc", "fisher_mc"), ("fisher-mc", "fisher_mc"), ("ef", "empirical_fisher"),
                                           ("empirical", "empirical_fisher"), ("Hessian", "hessian")])
def test_every_spelling_names_one_kind(spelling, kind):
    assert curvature(spelling) is Curvature(kind) and curvature(spelling) == kind
    assert cl.exact.get(spelling) is cl.exact.get(kind)


def test_the_kind_names_and_the_old_spellings_build_the_same_matrices():
    prob = cl.problems.load("diabetes-mlp", n=16)
    for new, old in (("ggn", "type2"), ("fisher_mc", "mc"), ("empirical_fisher", "empirical")):
        a = cl.approx.kfac(prob, fisher=new, mc_samples=2, seed=1).to_dense()
        b = cl.approx.kfac(prob, fisher=old, mc_samples=2, seed=1).to_dense()
        assert torch.equal(a, b)
    F1 = cl.exact.fisher_mc(prob, mc_samples=3, seed=2).to_dense()
    F2 = cl.exact.fisher_mc(prob, samples=3, seed=2).to_dense()
    assert torch.equal(F1, F2)


def test_refusals():
    with pytest.raises(ValueError, match="unknown curvature"):
        curvature("true-fisher")
    with pytest.raises(ValueError, match="not a Fisher-type"):
        fisher_type("hessian")
    with pytest.raises(ValueError, match="give the number of Monte-Carlo samples once"):
        mc_samples_of(2, 3)
    with pytest.raises(ValueError, match="mc_samples must be a positive integer"):
        mc_samples_of(0)


def test_every_matrix_reports_a_structure_of_the_vocabulary():
    prob = cl.problems.load("digits-mlp", n=16)
    names = {s.value for s in Structure}
    mats = [cl.exact.ggn(prob), cl.exact.ggn(prob, "block"), cl.exact.ggn(prob, "diag"), cl.exact.ggn(prob, "low_rank"),
            cl.exact.ggn(prob, "operator"), cl.approx.kfac(prob), cl.approx.ekfac(prob), cl.approx.tkfac(prob),
            cl.approx.foof(prob), cl.approx.two_level_kfac(prob)]
    for C in mats:
        assert C.structure in names, C.structure
    assert {b.structure for b in cl.approx.tkfac(prob).blocks} == {"trace_kron"}
    assert {b.structure for b in cl.approx.foof(prob).blocks} == {"forward_only"}
