"""curvlab.approx.factors on its own: KFAC factors, per-sample gradients, traces and collect's plans.

Independent references: layer inputs recorded by a forward hook written here; the Jacobian
J_nt = ∂f_n/∂z_nt of the output w.r.t. a perturbation injected at the layer's output
(``torch.autograd.functional.jacobian``) and Λ_n = ∇²_f ℓ_n from ``torch.func.hessian`` of torch's
loss, so that the type-2 output factor is G = R Σ_n Σ_t J_ntᵀ Λ_n J_nt (expand) or
R Σ_n (Σ_t J_nt)ᵀ Λ_n (Σ_t J_nt) (reduce); per-sample gradients from ``curvlab.reference``
(vmapped ``grad`` and ``jacrev``); exact blocks from ``curvlab.reference.ggn``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.autograd.functional import jacobian
from torch.func import functional_call, hessian, vmap
from torch.nn import functional as F

import curvlab as cl
from curvlab import reference
from curvlab.approx.factors import KronPiece, collect
from curvlab.capture import output_cotangents

ARCHS = {
    # T = 1
    "mlp": (lambda: nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)), (4,)),
    # T = 2 with p·q > T(p + q): Gram-matrix traces
    "sequence": (lambda: nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Flatten(), nn.Linear(10, 2)), (2, 6)),
    # T = 4 patches with p·q ≤ T(p + q): explicit per-sample gradients
    "cnn": (lambda: nn.Sequential(nn.Conv2d(1, 2, 2), nn.Tanh(), nn.Flatten(), nn.Linear(8, 2)), (1, 3, 3)),
    "layernorm": (lambda: nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Tanh(), nn.Linear(3, 2)), (4,)),
}
N = 5


def make(arch: str, partition="module", n: int = N, reduction: str = "mean") -> cl.Problem:
    builder, shape = ARCHS[arch]
    torch.manual_seed(0)
    model = builder().double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (n,), generator=g)
    return cl.Problem(model, nn.CrossEntropyLoss(reduction=reduction), X, y, partition=partition)


def pieces(col) -> list[KronPiece]:
    return [p for plan in col.plans for p in (plan.pieces or [])]


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-11) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    err = float((a - b).abs().max()) / max(1e-300, float(b.abs().max()))
    assert err <= tol, err


# ---------------------------------------------------------------------------------------- references
def layer_inputs(prob: cl.Problem, module: nn.Module) -> torch.Tensor:
    """(N, T, d_in) inputs of a layer, recorded by a hook (convolution: patches from F.unfold)."""
    seen = {}

    def hook(_m, inp, _out) -> None:
        seen["x"] = inp[0].detach()

    h = module.register_forward_hook(hook)
    with torch.no_grad():
        prob.output()
    h.remove()
    x = seen["x"]
    if isinstance(module, nn.Conv2d):
        return F.unfold(x, module.kernel_size, stride=module.stride).transpose(1, 2)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def output_jacobian(prob: cl.Problem, module: nn.Module) -> torch.Tensor:
    """J[n, c, t, o] = ∂f_nc / ∂z_nto at the layer's output (same-sample entries)."""
    shape = {}

    def probe(_m, _inp, out) -> None:
        shape["z"] = out.shape

    h = module.register_forward_hook(probe)
    with torch.no_grad():
        prob.output()
    h.remove()

    def f(eps):
        h = module.register_forward_hook(lambda _m, _inp, out: out + eps)
        try:
            return functional_call(prob.model, prob.params(), (prob.X,))
        finally:
            h.remove()

    J = jacobian(f, torch.zeros(shape["z"], dtype=torch.float64))  # (N, C, N, *z)
    idx = torch.arange(prob.num_samples)
    J = J[idx, :, idx]  # (N, C, *z per sample)
    if isinstance(module, nn.Conv2d):  # (N, C, d_out, H, W) -> (N, C, T, d_out)
        return J.flatten(3).transpose(2, 3)
    return J.reshape(J.shape[0], J.shape[1], -1, J.shape[-1])


def loss_hessians(prob: cl.Problem) -> torch.Tensor:
    fn = type(prob.loss_fn)(reduction="sum")
    f = prob.output().detach()
    return vmap(hessian(lambda fn_, yn: fn(fn_[None], yn[None])))(f, prob.y)


def reference_rows(prob: cl.Problem, fisher: str) -> torch.Tensor:
    """v_nk = J_nᵀ u_nk over all of θ, (k, N, P), with the Fisher type's output cotangents."""
    J = reference.output_jacobians(prob)
    U = output_cotangents(prob, fisher)(prob.output().detach())
    return torch.einsum("knc,ncp->knp", U.reshape(U.shape[0], prob.num_samples, -1), J)


def folded(piece: KronPiece, rows: torch.Tensor) -> torch.Tensor:
    """Rows (k, N, P) restricted to the piece, as (k, N, p, q): [W b] with the bias column last."""
    r = rows[:, :, piece.start:piece.stop]
    k, n = r.shape[:2]
    p = piece.d_out
    if not piece.weight:
        return r.reshape(k, n, p, 1)
    qw = piece.io.d_in
    W = r[:, :, :p * qw].reshape(k, n, p, qw)
    return torch.cat([W, r[:, :, p * qw:].reshape(k, n, p, 1)], dim=3) if piece.bias else W


# ---------------------------------------------------------------------------------------- factors
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("arch", ["mlp", "sequence", "cnn"])
def test_input_and_output_factors(arch, approx):
    prob = make(arch)
    col = collect(prob, "type2", approx=approx)
    Lam = loss_hessians(prob)
    R = prob.loss_scale
    for piece in pieces(col):
        assert piece.folded
        a = layer_inputs(prob, piece.io.module)  # (N, T, q)
        a = torch.cat([a, torch.ones_like(a[..., :1])], dim=2)
        n, t, _ = a.shape
        J = output_jacobian(prob, piece.io.module)  # (N, C, T, p)
        if approx == "expand" or t == 1:
            A_ref = torch.einsum("nti,ntj->ij", a, a) / (n * t)
            G_ref = R * torch.einsum("ncto,ncd,ndtp->op", J, Lam, J)
        else:
            abar = a.mean(1)
            A_ref = abar.T @ abar / n
            Js = J.sum(2)
            G_ref = R * torch.einsum("nco,ncd,ndp->op", Js, Lam, Js)
        close(piece.input_factor(approx), A_ref)
        close(piece.output_factor(approx), G_ref)


def test_factors_are_the_exact_block_for_one_sample():
    """N = 1, T = 1: F = M ⊗ a aᵀ exactly, so A ⊗ G (row-major: G ⊗ A) is the exact GGN block."""
    prob = make("mlp", n=1)
    ggn = reference.ggn(prob)
    for piece in pieces(collect(prob, "type2")):
        K = torch.kron(piece.output_factor(), piece.input_factor())  # folded (o, i) order
        p, q = piece.d_out, piece.io.d_in
        idx = torch.arange(p * (q + 1)).reshape(p, q + 1)
        perm = torch.cat([idx[:, :q].reshape(-1), idx[:, q]])  # parameter order: W row-major, then b
        close(K[perm][:, perm], ggn[piece.start:piece.stop, piece.start:piece.stop])


def test_weight_and_bias_in_separate_blocks():
    prob = make("mlp", partition="per_tensor")
    col = collect(prob, "type2")
    folded_col = collect(make("mlp"), "type2")
    whole = {p.name: p for p in pieces(folded_col)}
    ps = pieces(col)
    assert [(p.name, p.weight, p.bias) for p in ps] == [("0", True, False), ("0", False, True),
                                                         ("2", True, False), ("2", False, True)]
    for p in ps:
        assert not p.folded
        G = whole[p.name].output_factor()
        close(p.output_factor(), G)  # the same backpropagated cotangents
        if p.weight:
            assert p.d_in == p.io.d_in
            close(p.input_factor(), whole[p.name].input_factor()[:-1, :-1])
        else:
            assert p.d_in == 1 and p.size == p.d_out
            assert torch.equal(p.input_factor(), torch.ones(1, 1, dtype=torch.float64))
            assert torch.equal(p.inputs(), torch.ones(N, 1, 1, dtype=torch.float64))


# ---------------------------------------------------------------------------------------- per-sample statistics
@pytest.mark.parametrize("partition", ["module", "per_tensor"])
@pytest.mark.parametrize("arch", ["mlp", "sequence", "cnn"])
def test_per_sample_gradients(arch, partition):
    prob = make(arch, partition)
    rows = {f: reference_rows(prob, f) for f in ("type2", "empirical")}
    # the empirical rows are √R × the per-sample gradients, by autograd
    close(rows["empirical"][0], prob.loss_scale**0.5 * reference.per_sample_gradients(prob))
    for fisher in ("type2", "empirical"):
        for piece in pieces(collect(prob, fisher)):
            ref = folded(piece, rows[fisher])
            close(piece.per_sample_gradients(), ref)
            close(piece.per_sample_gradients(1, 3), ref[:, 1:3])
            QA = torch.linalg.qr(torch.randn(piece.d_in, piece.d_in, dtype=torch.float64))[0]
            QG = torch.linalg.qr(torch.randn(piece.d_out, piece.d_out, dtype=torch.float64))[0]
            rot = QG.T @ ref @ QA
            close(piece.per_sample_gradients(0, None, QA, QG), rot)
            close(piece.eigen_second_moments(QA, QG), (rot**2).sum(dim=(0, 1)))


@pytest.mark.parametrize("partition", ["module", "per_tensor"])
@pytest.mark.parametrize("arch", ["mlp", "sequence", "cnn"])
def test_exact_trace_is_the_trace_of_the_exact_block(arch, partition):
    prob = make(arch, partition)
    ggn = reference.ggn(prob)
    cheaper = set()
    for piece in pieces(collect(prob, "type2")):
        close(piece.exact_trace(), ggn[piece.start:piece.stop, piece.start:piece.stop].trace())
        cheaper.add(piece.explicit_is_cheaper)
    if arch == "sequence" and partition == "module":
        assert cheaper == {False}  # the Gram-matrix path (T = 2, p·q > T(p + q)) …
    if arch == "cnn":
        assert True in cheaper  # … and the explicit path are both exercised


def test_chunked_per_sample_statistics(monkeypatch):
    """Per-sample chunks of one sample give the same statistics."""
    from curvlab.approx import factors

    prob = make("cnn")
    ggn = reference.ggn(prob)
    def moments(p: KronPiece) -> torch.Tensor:
        return p.eigen_second_moments(torch.eye(p.d_in, dtype=torch.float64), torch.eye(p.d_out, dtype=torch.float64))

    whole = [(p.exact_trace(), moments(p)) for p in pieces(collect(prob, "type2"))]
    monkeypatch.setattr(factors, "_CHUNK_BYTES", 1)
    for p, (tr, S) in zip(pieces(collect(prob, "type2")), whole):
        assert p.per_sample_chunks() == [(i, i + 1) for i in range(N)]
        close(p.exact_trace(), tr)
        close(p.exact_trace(), ggn[p.start:p.stop, p.start:p.stop].trace())
        close(moments(p), S)


# ---------------------------------------------------------------------------------------- collect's plans
def test_plans_for_a_partition_that_splits_weight_and_bias():
    prob = make("mlp", partition=[["0.weight"], ("mixed", ["0.bias", "2.weight", "2.bias"])])
    col = collect(prob, "type2")
    assert [plan.block.name for plan in col.plans] == ["block0", "mixed"]
    first, second = col.plans
    assert [(p.weight, p.bias, p.start, p.stop) for p in first.pieces] == [(True, False, 0, 12)]
    assert [(p.name, p.weight, p.bias, p.start, p.stop) for p in second.pieces] == [
        ("0", False, True, 12, 15), ("2", True, True, 15, 23)]
    for plan in col.plans:  # the pieces tile their block
        bounds = [plan.block.slice.start] + [p.stop for p in plan.pieces]
        assert [p.start for p in plan.pieces] == bounds[:-1] and bounds[-1] == plan.block.slice.stop
    assert second.pieces[1].folded and second.pieces[1].d_in == 4


def test_plans_for_unsupported_parameters():
    prob = make("layernorm")
    with pytest.raises(ValueError, match=r"'1\.weight' \(LayerNorm\)"):
        collect(prob, "type2")
    col = collect(prob, "type2", unsupported="exact")
    assert [plan.pieces is None for plan in col.plans] == [False, True, False]
    exact = col.plans[1]
    ggn = reference.ggn(prob)
    s = exact.block.slice
    close(col.exact_block(exact.block).to_dense(), ggn[s, s])


def test_forward_only_collection_has_no_cotangents():
    prob = make("mlp")
    for p, q in zip(pieces(collect(prob, None)), pieces(collect(prob, "type2"))):
        assert p.grads.shape[0] == 0
        assert torch.equal(p.output_factor(), torch.zeros(p.d_out, p.d_out, dtype=torch.float64))
        close(p.input_factor(), q.input_factor(), 0)


def test_collect_bad_arguments():
    prob = make("mlp")
    with pytest.raises(TypeError, match="Problem"):
        collect("prob", "type2")
    with pytest.raises(ValueError, match="'pool'"):
        collect(prob, "type2", approx="pool")
    with pytest.raises(ValueError, match="'skip'"):
        collect(prob, "type2", unsupported="skip")
    with pytest.raises(ValueError, match="'fancy'"):
        collect(prob, "fancy")
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="mc_samples"):
            collect(prob, "mc", mc_samples=bad)
    with pytest.raises(ValueError, match="no exact counterpart"):
        collect(prob, None, unsupported="exact")


def test_mc_collection_scale():
    """mc factors with S samples: G = R/S Σ_n Σ_s ∇ℓ_n(ŷ_s)∇ℓ_n(ŷ_s)ᵀ backpropagated (last layer: B = I)."""
    prob = make("mlp")
    S, seed = 4, 3
    col = collect(prob, "mc", mc_samples=S, seed=seed)
    last = pieces(col)[-1]
    gen = torch.Generator().manual_seed(seed)
    f = prob.output().detach()
    r = prob.likelihood.grad_output(f, prob.likelihood.sample(f, S, gen))  # (S, N, C)
    close(last.output_factor(), prob.loss_scale / S * torch.einsum("snc,snd->cd", r, r))
