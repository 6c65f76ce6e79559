"""Identities of papers.md §0–§2 and §6 between KFAC, EKFAC, TKFAC, TEKFAC, FOOF, KFOC and the oracle."""

from __future__ import annotations

import math

import pytest
import torch

import curvlab as cl
from curvlab.linalg import Kron
from tests.approx import cases
from tests.approx.cases import exact_of, rel

FISHERS = ["type2", "mc", "empirical"]
PROBLEMS = {
    "mlp-ce": lambda: cases.mlp(n=16),
    "mlp-mse-sum": lambda: cases.mlp(n=12, loss="mse", reduction="sum"),
    "mlp-bce-nobias": lambda: cases.mlp(n=12, loss="bce", bias=False),
    "cnn": lambda: cases.cnn(n=5),
    "shared-reduce": lambda: cases.shared_reduce(),
    "sequence": lambda: cases.sequence(),
}


def fro(A: torch.Tensor, B: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(A - B))


@pytest.fixture(scope="module")
def built():
    cache = {}

    def get(name: str, fisher: str, approx: str = "expand"):
        key = (name, fisher, approx)
        if key not in cache:
            prob = PROBLEMS[name]()
            kw = dict(fisher=fisher, mc_samples=2, seed=7)
            cache[key] = dict(
                prob=prob, F=exact_of(prob, fisher, mc_samples=2, seed=7),
                kfac=cl.approx.kfac(prob, approx=approx, **kw), ekfac=cl.approx.ekfac(prob, approx=approx, **kw),
                tkfac=cl.approx.tkfac(prob, approx=approx, **kw), tekfac=cl.approx.tekfac(prob, approx=approx, **kw),
                kfoc=cl.approx.kfoc(prob, **kw))
        return cache[key]

    return get


CASES = [(p, f, a) for p in PROBLEMS for f in FISHERS for a in ("expand", "reduce")
         if a == "expand" or p in ("cnn", "shared-reduce", "sequence")]


@pytest.mark.parametrize("name,fisher,approx", CASES)
def test_trace_restriction(built, name, fisher, approx):
    """T1: tr(TKFAC) = tr(EKFAC) = tr(F) per block; tr(KFAC)/tr(F) = 1/c."""
    b = built(name, fisher, approx)
    for i, F in enumerate(b["F"].blocks):
        tr = float(F.trace())
        assert math.isclose(float(b["tkfac"].blocks[i].trace()), tr, rel_tol=1e-10)
        assert math.isclose(float(b["ekfac"].blocks[i].trace()), tr, rel_tol=1e-10)
        assert math.isclose(float(b["tekfac"].blocks[i].trace()), tr, rel_tol=1e-10)
        c = b["tkfac"].info[b["F"].block_names[i]]["c"]
        assert math.isclose(float(b["kfac"].blocks[i].trace()) * c, tr, rel_tol=1e-10)


@pytest.mark.parametrize("name,fisher,approx", CASES)
def test_frobenius_ordering(built, name, fisher, approx):
    """T2: ‖F − EKFAC‖ ≤ ‖F − KFAC‖, ‖F − TKFAC‖; KFOC is the best Kronecker product."""
    b = built(name, fisher, approx)
    for i, F in enumerate(b["F"].blocks):
        D = F.to_dense()
        err = {m: fro(D, b[m].blocks[i].to_dense()) for m in ("kfac", "ekfac", "tkfac", "tekfac", "kfoc")}
        slack = 1e-10 * float(torch.linalg.matrix_norm(D))
        assert err["ekfac"] <= err["kfac"] + slack
        assert err["ekfac"] <= err["tkfac"] + slack
        assert err["tekfac"] == pytest.approx(err["ekfac"], rel=1e-12, abs=slack)
        assert err["kfoc"] <= err["kfac"] + slack
        assert err["kfoc"] <= err["tkfac"] + slack


@pytest.mark.parametrize("name,fisher,approx", CASES)
def test_ekfac_is_the_optimal_diagonal_in_the_kfac_basis(built, name, fisher, approx):
    b = built(name, fisher, approx)
    for i, F in enumerate(b["F"].blocks):
        E, K = b["ekfac"].blocks[i], b["kfac"].blocks[i]
        assert E.Q_A is K.eigen().Q_A or torch.equal(E.Q_A, K.eigen().Q_A)
        Q = K.eigen().kron_vectors(E.Q_A, E.Q_G)
        S_opt = torch.diagonal(Q.T @ F.to_dense() @ Q)  # the Frobenius-optimal diagonal
        assert rel(E.S.reshape(-1), S_opt) < 1e-10


def kfoc_reference(D: torch.Tensor, K: Kron) -> torch.Tensor:
    """Best Kronecker product of a dense block by the SVD of its Van Loan rearrangement."""
    p, q = K.p, K.q
    perm = K.layout.perm()
    Df = torch.empty_like(D)
    Df[perm[:, None], perm[None, :]] = D  # folded order (o, i)
    R = Df.reshape(p, q, p, q).permute(0, 2, 1, 3).reshape(p * p, q * q)
    U, s, Vh = torch.linalg.svd(R)
    return Kron(Vh[0].reshape(q, q), s[0] * U[:, 0].reshape(p, p), K.bias).to_dense()


@pytest.mark.parametrize("name", ["mlp-ce", "cnn", "shared-reduce", "sequence"])
def test_kfoc_matches_dense_svd(built, name):
    b = built(name, "type2")
    for i, F in enumerate(b["F"].blocks):
        K = b["kfoc"].blocks[i]
        assert rel(K.to_dense(), kfoc_reference(F.to_dense(), K)) < 1e-7
        assert float(K.A.trace()) == pytest.approx(float(b["kfac"].blocks[i].A.trace()), rel=1e-10)


def test_kfoc_exact_when_kfac_is():
    prob = cases.deep_linear()
    K = cl.approx.kfoc(prob)
    F = cl.exact.ggn(prob, structure="block")
    for k, f in zip(K.blocks, F.blocks):
        assert rel(k.to_dense(), f.to_dense()) < 1e-9


def test_mc_converges_to_type2_in_expectation():
    """E[G_mc] = G_type2 (A is deterministic): with S samples the error shrinks like 1/√S."""
    prob = cases.mlp(n=6)
    ref = cl.approx.kfac(prob, fisher="type2").to_dense()
    errs = {s: rel(cl.approx.kfac(prob, fisher="mc", mc_samples=s, seed=0).to_dense(), ref) for s in (10, 20000)}
    assert errs[20000] < 0.03  # stated tolerance: 3 % of the largest entry at 20,000 samples
    assert errs[20000] < errs[10] / 5


def test_ekfac_mc_converges_to_type2():
    prob = cases.mlp(n=6)
    ref = cl.approx.ekfac(prob, fisher="type2").to_dense()
    assert rel(cl.approx.ekfac(prob, fisher="mc", mc_samples=20000, seed=1).to_dense(), ref) < 0.03


def test_foof_is_kfac_with_identity_output_factor():
    prob = cases.mlp(n=16)
    K, Fo = cl.approx.kfac(prob), cl.approx.foof(prob)
    assert Fo.structure == "forward_only"
    g = prob.gradient()
    lam = 0.05
    for kb, fb, s in zip(K.blocks, Fo.blocks, K.block_slices):
        eye = torch.eye(kb.p, dtype=torch.float64)
        assert rel(fb.A, kb.A) < 1e-12 and torch.equal(fb.G, eye)
        kfac_G_eq_I = Kron(kb.A, eye, kb.bias)
        assert rel(Fo.direction(g, lam)[s], kfac_G_eq_I.direction(g[s], lam)) < 1e-12
        # = KFAC's factored damping with G := I and no damping on G
        assert rel(Fo.direction(g, lam)[s], kfac_G_eq_I.direction(g[s], (lam, 0.0), "factored")) < 1e-10
    assert rel(Fo.direction(g, lam, "own"), Fo.direction(g, lam)) == 0.0


def test_foof_is_the_least_squares_step_on_neurons():
    """ΔW = argmin Σ_n ‖ΔW a_n + g_n‖² + λ′‖ΔW‖² = −∇W (A + λI)⁻¹ with λ = λ′/N (papers.md §1.2)."""
    prob = cases.mlp(n=16, loss="ce", reduction="sum")
    Fo = cl.approx.foof(prob)
    g = prob.gradient()
    lam_prime = 0.3
    N = prob.num_samples
    d = Fo.direction(g, lam_prime / N)
    # last layer, explicit least squares over samples: rows a_n (with the bias input), targets −g_n
    with torch.no_grad():
        h = torch.tanh(prob.model[2](torch.tanh(prob.model[0](prob.X))))
        f = prob.output()
    a = torch.cat([h, torch.ones(N, 1, dtype=torch.float64)], dim=1)
    gz = prob.likelihood.grad_output(f, prob.y)  # per-sample ∂ℓ_n/∂z (sum reduction: R = 1)
    lhs = a.T @ a + lam_prime * torch.eye(a.shape[1], dtype=torch.float64)
    dW = torch.linalg.solve(lhs, -(a.T @ gz)).T  # (out, in+1) = [ΔW Δb]
    s = Fo.block_slices[-1]
    step = torch.cat([dW[:, :-1].reshape(-1), dW[:, -1]])  # parameter order: W row-major, then b
    assert rel(d[s], N * step) < 1e-10  # the neuron step Δz_n = −η g_n with η = N


def test_kfac_with_large_output_damping_approaches_foof():
    """(G + λ_G)⁻¹ ≈ λ_G⁻¹ I for λ_G ≫ ‖G‖: cos(KFAC, FOOF) → 1 (papers.md §1.2, item 5)."""
    prob = cases.mlp(n=16)
    K, Fo = cl.approx.kfac(prob), cl.approx.foof(prob)
    g = prob.gradient()
    dF = Fo.direction(g, 0.1)
    cos = []
    for lam_G in (1e-3, 1e3):
        dK = K.direction(g, (0.1, lam_G), "factored")
        cos.append(float(dK @ dF / (dK.norm() * dF.norm())))
    assert cos[1] > 1 - 1e-6 and cos[1] > cos[0]


def test_tkfac_own_damping_is_the_trace_normalised_rule():
    prob = cases.mlp(n=16)
    T = cl.approx.tkfac(prob)
    g = prob.gradient()
    lam = 0.02
    d = T.direction(g, lam, "own")
    for b, s in zip(T.blocks, T.block_slices):
        A, cG = b.A, b.G
        delta = float(A.trace() * cG.trace())
        P, Q = A / A.trace(), cG / cG.trace()
        mu = math.sqrt(lam / delta)
        M = delta * Kron(P + mu * torch.eye(b.q, dtype=torch.float64), Q + mu * torch.eye(b.p, dtype=torch.float64),
                         b.bias).to_dense()
        assert rel(d[s], -torch.linalg.solve(M, g[s])) < 1e-10


def test_tekfac_own_damping_provisional_rule():
    prob = cases.mlp(n=16)
    E, TE, T = cl.approx.ekfac(prob), cl.approx.tekfac(prob), cl.approx.tkfac(prob)
    assert TE.options["provisional"] is True
    assert rel(TE.to_dense(), E.to_dense()) < 1e-14  # the same matrix: only the damping differs
    g = prob.gradient()
    lam = 0.02
    d = TE.direction(g, lam, "own")
    for b, t, s in zip(TE.blocks, T.blocks, TE.block_slices):
        eA, eG = torch.linalg.eigvalsh(t.A), torch.linalg.eigvalsh(t.G)  # TKFAC's factors
        delta = float(b.S.sum())
        # S*_ij + λ + √(λδ)(p_j + q_i), p = λ_A/tr A, q = λ_G/tr G
        denom = b.S + lam + math.sqrt(lam * delta) * (eA[None, :] / eA.sum() + eG[:, None] / eG.sum())
        ref = b.layout.from_mats(b._unrotate(b._rotate(b.layout.to_mats(g[s][:, None])) / denom))[:, 0]
        assert rel(d[s], -ref) < 1e-9
    # and with exact damping TEKFAC = EKFAC
    assert rel(TE.direction(g, lam), E.direction(g, lam)) < 1e-12


def test_modes_agree_with_dense_per_block():
    prob = cases.cnn(n=4)
    K = cl.approx.kfac(prob)
    g = prob.gradient()
    for mode in ("exact", "factored", "pi", "trace", "own"):
        d = K.direction(g, 0.1, mode)
        for b, s in zip(K.blocks, K.block_slices):
            assert rel(d[s], b.direction(g[s], 0.1, K.own_mode if mode == "own" else mode)) < 1e-12
    inv = K.inverse(0.1, "pi")
    assert rel(inv @ g, -K.direction(g, 0.1, "pi")) < 1e-10
    D = K.to_dense() + 0.1 * torch.eye(prob.num_params, dtype=torch.float64)
    assert rel(K.solve(g, 0.1), torch.linalg.solve(D, g)) < 1e-9
    assert float(K.logdet(0.1)) == pytest.approx(float(torch.logdet(D)), rel=1e-10)
