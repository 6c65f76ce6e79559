"""The exact Hessian of layers at several positions (convolutions, linear layers on sequences).

Everything against ``curvlab.reference.hessian`` (double-backward autograd of L(θ), nothing shared
with the code under test), float64, relative error < 1e-10: full, block and diagonal structures,
several partitions, both routes of :mod:`curvlab.exact.hessian_layers` (GGN + chained Ψ terms for
piecewise-linear chains; the direct pre-activation route otherwise), and the structure tests that
choose between them. Plus the row-restricted :meth:`KronLayout.scatter` the routes write with.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab import reference
from curvlab.exact.hessian_layers import layer_sites, structure, tangent_mode
from curvlab.linalg.layout import KronLayout

TOL = 1e-10
N = 5


class Skip(nn.Module):
    """conv → relu → conv with a skip connection: the second conv's input is not a chain link."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1), nn.Linear(32, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.out(torch.relu(self.b(h) + h).flatten(1))


def _unflatten_net():
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Unflatten(1, (2, 2, 2)), nn.Conv2d(2, 3, 2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(3, 3))


def _bn_net():
    m = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(), nn.Conv2d(2, 2, 2, stride=2),
                      nn.ReLU(), nn.Flatten(), nn.Linear(8, 3))
    with torch.no_grad():
        m[1].running_mean.uniform_(-0.5, 0.5)
        m[1].running_var.uniform_(0.5, 2.0)
        m[1].weight.uniform_(0.5, 1.5)
    return m.eval()


# name -> (builder, input shape, expected route of every verified layer: "fast" or "direct")
ARCHS = {
    "stride-padding": (lambda: nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 2, stride=2),
                                             nn.ReLU(), nn.Flatten(), nn.Linear(8, 3)), (1, 4, 4), "fast"),
    "dilation-nobias": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3, padding=2, dilation=2, bias=False), nn.ReLU(),
                                              nn.Conv2d(3, 2, 3, stride=(2, 1)), nn.ReLU(), nn.Flatten(),
                                              nn.Linear(12, 3)), (2, 6, 5), "fast"),
    "three-convs": (lambda: nn.Sequential(nn.Conv2d(1, 2, 2), nn.ReLU(), nn.Conv2d(2, 3, 2, padding=(1, 0)),
                                          nn.ReLU(), nn.Conv2d(3, 3, (2, 3), bias=False), nn.Flatten()),
                    (1, 4, 5), "fast"),
    "inplace-relu": (lambda: nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(inplace=True),
                                           nn.Conv2d(2, 2, 3, stride=2), nn.ReLU(inplace=True), nn.Flatten(),
                                           nn.Linear(8, 3)), (1, 5, 5), "fast"),
    "conv-linear": (lambda: nn.Sequential(nn.Conv2d(2, 3, 2, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(12, 3)),
                    (2, 4, 4), "fast"),
    "linear-conv": (_unflatten_net, (6,), "fast"),
    "sequence": (lambda: nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Flatten(), nn.Linear(12, 3)), (3, 5), "fast"),
    "batchnorm-eval": (_bn_net, (1, 4, 4), "fast"),
    "tanh": (lambda: nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 2, stride=2),
                                   nn.Sigmoid(), nn.Flatten(), nn.Linear(8, 3)), (1, 4, 4), "direct"),
    "maxpool": (lambda: nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(3, 2, 2), nn.ReLU(), nn.Flatten(), nn.Linear(2, 3)), (1, 4, 4),
                "direct"),
    "skip": (Skip, (1, 4, 4), "direct"),
    "sequence-tanh": (lambda: nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)), (3, 5),
                      "direct"),
}


def make(arch: str, loss: str = "ce", seed: int = 0, partition="module") -> cl.Problem:
    builder, shape, _ = ARCHS[arch]
    torch.manual_seed(seed)
    model = builder().double()
    g = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(N, *shape, generator=g, dtype=torch.float64)
    with torch.no_grad():
        C = model(X).shape[1]
    if loss == "ce":
        return cl.Problem(model, nn.CrossEntropyLoss(), X, torch.randint(0, C, (N,), generator=g), partition=partition)
    if loss == "mse":
        return cl.Problem(model, nn.MSELoss(reduction="sum"), X, torch.randn(N, C, generator=g, dtype=torch.float64),
                          partition=partition)
    return cl.Problem(model, nn.BCEWithLogitsLoss(), X, torch.rand(N, C, generator=g, dtype=torch.float64),
                      partition=partition)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


@pytest.fixture(scope="module")
def refs():
    cache = {}

    def get(arch, loss="ce"):
        if (arch, loss) not in cache:
            prob = make(arch, loss)
            cache[arch, loss] = (prob, reference.hessian(prob))
        return cache[arch, loss]

    return get


@pytest.mark.parametrize("arch", list(ARCHS))
def test_routes(arch):
    """The structure tests pick GGN + chained Ψ for piecewise-linear chains, the direct route otherwise."""
    prob = make(arch)
    sites = layer_sites(prob)
    st = structure(prob, sites)
    shared = [n for n, s in sites.items() if not s.single]
    assert shared
    expected = ARCHS[arch][2] == "fast"
    assert st.fast(list(sites), shared[0]) == expected
    if arch in ("tanh", "sequence-tanh"):
        assert shared[0] in st.residual
    if arch in ("maxpool", "skip"):
        assert not st.residual and not st.chained(list(sites), shared[0])


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("structure_", ["full", "block", "diag"])
def test_against_reference(refs, arch, structure_):
    prob, H = refs(arch)
    C = cl.exact.hessian(prob, structure=structure_).to_dense()
    if structure_ == "diag":
        C, H = C.diagonal(), H.diagonal()
    elif structure_ == "block":
        mask = torch.zeros_like(H, dtype=torch.bool)
        for s in prob.partition.slices:
            mask[s, s] = True
        H = H * mask
    assert rel(C, H) < TOL


@pytest.mark.parametrize("arch", ["stride-padding", "tanh", "linear-conv"])
@pytest.mark.parametrize("loss", ["mse", "bce"])
def test_other_losses(refs, arch, loss):
    prob, H = refs(arch, loss)
    assert rel(cl.exact.hessian(prob).to_dense(), H) < TOL


@pytest.mark.parametrize("arch", ["three-convs", "tanh"])
@pytest.mark.parametrize("partition", ["per_tensor", "all", "spanning"])
def test_other_partitions(arch, partition):
    """Blocks spanning several layers (the chain then runs through layers outside a block), and
    per-tensor blocks (weight and bias apart: Hessian-vector-product columns)."""
    if partition == "spanning":
        names = [n for n, _ in make(arch).model.named_parameters()]
        partition = [names[:1], names[1:4], names[4:]]
    prob = make(arch, partition=partition)
    H = reference.hessian(prob)
    mask = torch.zeros_like(H, dtype=torch.bool)
    for s in prob.partition.slices:
        mask[s, s] = True
    assert rel(cl.exact.hessian(prob, "block").to_dense(), H * mask) < TOL
    assert rel(cl.exact.hessian(prob, "diag").to_dense().diagonal(), H.diagonal()) < TOL


@pytest.mark.parametrize("arch", ["dilation-nobias", "skip"])
def test_other_parameter_values(arch):
    prob = make(arch)
    theta = prob.theta + 0.3 * torch.randn(prob.num_params, dtype=torch.float64,
                                           generator=torch.Generator().manual_seed(5))
    moved = prob.at(theta)
    assert rel(cl.exact.hessian(prob, theta=theta).to_dense(), reference.hessian(moved)) < TOL


@pytest.mark.parametrize("arch", ["stride-padding", "tanh", "sequence"])
def test_float32_close_to_float64(arch):
    p64 = make(arch)
    p32 = cl.Problem(p64.model.float(), p64.loss_fn, p64.X.float(), p64.y)
    a = cl.exact.hessian(p32).to_dense()
    assert a.dtype == torch.float32
    assert rel(a.double(), cl.exact.hessian(p64).to_dense()) < 1e-5
    assert structure(p32, layer_sites(p32)).fast(list(layer_sites(p32)), "0") == (ARCHS[arch][2] == "fast")


def test_tangent_modes():
    """Pre-activation directions for a short sequence (T·d_out ≤ P/2), parameter directions for a
    convolution over many positions."""
    sites = layer_sites(make("sequence"))
    assert tangent_mode(sites["0"]) == "pre"  # T = 3, d_out = 4: 12 ≤ 24 / 2
    sites = layer_sites(make("stride-padding"))
    assert tangent_mode(sites["0"]) == "param"  # T = 16, d_out = 3: 48 > 30 / 2


def test_canned_cnn_takes_the_fast_route():
    prob = cl.problems.load("digits-cnn", n=8)
    sites = layer_sites(prob)
    st = structure(prob, sites)
    assert not st.residual and all(st.fast(list(sites), n) for n in sites)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("accumulate", [True, False])
def test_layout_scatter_rows(bias, accumulate):
    """scatter(rows=…) writes exactly the parameter-order entries of the given folded rows."""
    r, c = KronLayout(3, 4 if bias else 3, bias), KronLayout(2, 3, bias)
    T = torch.randn(r.size, c.size, dtype=torch.float64)
    dense = T[r.perm()][:, c.perm()]  # T in parameter order on both sides
    base = torch.randn(r.size, c.size, dtype=torch.float64)
    for rows in (slice(0, 3), slice(1, 2), slice(2, 3)):
        out = base.clone()
        r.scatter(out, T.view(r.rows, -1)[rows].reshape(-1, c.size), c, rows, accumulate=accumulate)
        sel = torch.zeros(r.size, dtype=torch.bool)
        for _, rng in r.parts(rows):
            sel[rng] = True
        want = base.clone()
        want[sel] = (base[sel] if accumulate else 0) + dense[sel]
        assert torch.equal(out, want)
    with pytest.raises(ValueError, match="rows"):
        list(r.parts(slice(2, 5)))


@pytest.mark.parametrize("o,i", [(1, 300), (2, 700)])
def test_kron_sums_by_pairs(o, i):
    """Few outputs, many inputs: the kernels of curvlab.exact.outer take one GEMM per (o, p); the
    result against an explicit einsum, and the symmetric one exactly symmetric in a strided block."""
    from curvlab.exact.outer import _by_pairs, _kron_sum_into, _kron_sum_symmetric_into

    assert _by_pairs(o * o, i * i)
    g = torch.Generator().manual_seed(3)
    G = torch.randn(4, o, 2, generator=g, dtype=torch.float64)
    M = torch.einsum("nok,npk->nop", G, G)
    a, b = (torch.randn(4, i, generator=g, dtype=torch.float64) for _ in range(2))
    big = torch.zeros(o * i + 2, o * i + 3, dtype=torch.float64)
    out = big[1:o * i + 1, 2:o * i + 2]
    _kron_sum_into(out, M, a, b)
    assert rel(out, torch.einsum("nop,ni,nj->oipj", M, a, b).reshape(o * i, o * i)) < 1e-14
    _kron_sum_symmetric_into(out, M, a)
    assert rel(out, torch.einsum("nop,ni,nj->oipj", M, a, a).reshape(o * i, o * i)) < 1e-14
    assert torch.equal(out, out.T)
