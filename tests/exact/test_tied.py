"""Parameters used outside their module (tied weights): the oracle must take the generic exact path.

The three models of the tied-weights issue, in float64, for every kind × structure and every
matrix-free product, against the double-backward / per-sample-gradient references of
``curvlab.reference`` (which share nothing with the oracle's layer formulas).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab as cl
from curvlab import reference
from curvlab.layers import survey

TOL = 1e-10


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


class TiedModules(nn.Module):
    """Two modules sharing one weight (curvlinops' weight-tying case)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear1 = nn.Linear(4, 4)
        self.linear2 = nn.Linear(4, 4, bias=False)
        self.linear2.weight = self.linear1.weight

    def forward(self, x):
        a, b = x.split(4, -1)
        return torch.cat([self.linear1(a), self.linear2(b)], -1)


class TiedAutoencoder(nn.Module):
    """The decoder reuses the encoder's weight functionally: F.linear(h, enc.weight.t(), dec_bias)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(6, 3)
        self.dec_bias = nn.Parameter(0.1 * torch.randn(6))

    def forward(self, x):
        return F.linear(torch.sigmoid(self.enc(x)), self.enc.weight.t(), self.dec_bias)


class TiedConv(nn.Module):
    """A convolution and the transposed convolution with the same weight."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        h = torch.tanh(self.conv(x))
        r = F.conv_transpose2d(h, self.conv.weight, padding=1)
        return self.out(torch.tanh(r).flatten(1))


def _problem(name: str) -> cl.Problem:
    torch.manual_seed(0)
    if name == "modules":
        return cl.Problem(TiedModules().double(), nn.MSELoss(), torch.rand(3, 8), torch.rand(3, 8))
    if name == "autoencoder":
        X = torch.rand(5, 6, dtype=torch.float64)
        return cl.Problem(TiedAutoencoder().double(), nn.BCEWithLogitsLoss(), X, X)
    X = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    return cl.Problem(TiedConv().double(), nn.CrossEntropyLoss(), X, torch.randint(0, 3, (4,)))


NAMES = ["modules", "autoencoder", "conv"]


@pytest.fixture(scope="module")
def refs():
    cache = {}

    def get(name):
        if name not in cache:
            prob = _problem(name)
            cache[name] = (prob, reference.hessian(prob), reference.ggn(prob), reference.empirical_fisher(prob))
        return cache[name]

    return get


def _mask(prob: cl.Problem) -> torch.Tensor:
    m = torch.zeros(prob.num_params, prob.num_params, dtype=torch.bool)
    for s in prob.partition.slices:
        m[s, s] = True
    return m


@pytest.mark.parametrize("name", NAMES)
def test_tied_parameters_take_the_generic_path(refs, name):
    prob, *_ = refs(name)
    sv = survey(prob)
    tied = {"modules": "linear1", "autoencoder": "enc", "conv": "conv"}[name]
    assert tied not in sv.layers
    assert "tied or shared" in sv.rejected[tied] or "not a trainable parameter" in sv.rejected[tied]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("structure", ["full", "block", "diag"])
def test_hessian_ggn_ef_match_autograd(refs, name, structure):
    prob, H, G, EF = refs(name)
    mask = _mask(prob)
    for fn, ref in ((cl.exact.hessian, H), (cl.exact.ggn, G), (cl.exact.empirical_fisher, EF)):
        C = fn(prob, structure=structure)
        if structure == "diag":
            assert rel(C.diagonal(), ref.diagonal()) < TOL
        else:
            assert rel(C.to_dense(), ref if structure == "full" else ref * mask) < TOL


@pytest.mark.parametrize("name", NAMES)
def test_fisher_mc_matches_its_formula_and_expectation(refs, name):
    """Same draws: to 1e-10. In expectation: with 20,000 labels per input the relative Frobenius
    error to the GGN is ≈ 1/√S·O(1) ≈ 0.01; we require < 0.05."""
    prob, _, G, _ = refs(name)
    samples, seed = 4, 3
    gen = torch.Generator().manual_seed(seed)
    labels = prob.likelihood.sample(prob.output().detach(), samples, gen)
    ref = reference.fisher_mc_from(prob, labels)
    for structure in ("full", "block", "diag"):
        C = cl.exact.fisher_mc(prob, structure, samples=samples, seed=seed)
        if structure == "diag":
            assert rel(C.diagonal(), ref.diagonal()) < TOL
        else:
            assert rel(C.to_dense(), ref if structure == "full" else ref * _mask(prob)) < TOL
    F_many = cl.exact.fisher_mc(prob, samples=20_000, seed=0).to_dense()
    assert float((F_many - G).norm() / G.norm()) < 0.05


@pytest.mark.parametrize("name", NAMES)
def test_matrix_free_products(refs, name):
    prob, H, G, EF = refs(name)
    V = torch.randn(prob.num_params, 3, dtype=torch.float64)
    assert rel(cl.exact.hvp(prob, V), H @ V) < TOL
    assert rel(cl.exact.ggn_vp(prob, V), G @ V) < TOL
    assert rel(cl.exact.ef_vp(prob, V), EF @ V) < TOL
    Fmc = cl.exact.fisher_mc(prob, samples=3, seed=1).to_dense()
    assert rel(cl.exact.fisher_mc_vp(prob, V, samples=3, seed=1), Fmc @ V) < TOL
    for kind, ref in (("hessian", H), ("ggn", G), ("empirical_fisher", EF)):
        assert rel(cl.exact.get(kind)(prob, structure="operator") @ V, ref @ V) < TOL


def test_the_issue_example_to_machine_precision():
    """The reported case: curvlab's Hessian was the Hessian with the second use of W held constant."""
    torch.manual_seed(0)
    m = TiedModules().double().eval()
    X, y = torch.rand(1, 8, dtype=torch.float64), torch.rand(1, 8, dtype=torch.float64)
    L = nn.MSELoss()
    H = cl.exact.hessian(cl.Problem(m, L, X, y)).to_dense()
    ps = list(m.parameters())
    g = torch.cat([t.flatten() for t in torch.autograd.grad(L(m(X), y), ps, create_graph=True)])
    Href = torch.stack([torch.cat([t.flatten() for t in torch.autograd.grad(g[i], ps, retain_graph=True)])
                        for i in range(len(g))])
    assert float((H - Href).norm() / Href.norm()) < 1e-13


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("method", ["kfac", "ekfac", "tkfac", "tekfac", "kfoc", "foof"])
def test_approximators_refuse_tied_parameters_naming_them(refs, name, method):
    prob, *_ = refs(name)
    tied = {"modules": "linear1.weight", "autoencoder": "enc.weight", "conv": "conv.weight"}[name]
    with pytest.raises(ValueError, match=rf"'{tied}'.*(tied or shared|not a trainable)"):
        getattr(cl.approx, method)(prob)


@pytest.mark.parametrize("name", ["modules", "autoencoder"])
def test_kfac_with_exact_blocks_for_tied_parameters(refs, name):
    """unsupported='exact' takes the tied parameters' blocks from the oracle (same Fisher type)."""
    prob, _, G, _ = refs(name)
    K = cl.approx.kfac(prob, unsupported="exact")
    for b, s in zip(K.blocks, K.block_slices):
        if isinstance(b, cl.Dense):
            assert rel(b.to_dense(), G[s, s]) < TOL
