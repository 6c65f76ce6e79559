#!/usr/bin/env python
"""The cheapest plain-PyTorch step of KFAC and K-BFGS on an MLP: what the issue-10 targets are read against.

    python benchmarks/floors.py                    # digits-mlp, batch 128, float32, 1 thread
    python benchmarks/floors.py --problem digits-mlp --batch 128 --pairs 15

Each floor is a hand-written step for ``nn.Sequential`` MLPs of ``nn.Linear`` layers and
cross-entropy, with nothing but the operations the method needs — no checks, no flat parameter
vector, no ``Problem``, no CurvatureMatrix — and the same settings as ``cl.optim``'s defaults:

* **KFAC** (Martens & Grosse 2015): forward with hooks recording each layer's input a and output z;
  the loss gradient by a plain backward pass (``torch.autograd.grad`` of the loss w.r.t. the
  parameters, graph kept); one label per sample drawn from the model's predictive (inverse CDF) and
  its cotangent p − e_ŷ backpropagated to the z's (a second backward pass); per layer
  A ← ρA + (1 − ρ) h hᵀ/N (h = [a 1]) and G ← ρG + (1 − ρ) g gᵀ/N as one in-place ``addmm_`` each
  (ρ = 0.95); every 10 steps π-damped inverses (A + π√λ I)⁻¹, (G + √λ/π I)⁻¹ by Cholesky (λ = 1e-2);
  the direction (G + ·)⁻¹ [∇W ∇b] (A + ·)⁻¹ (two GEMMs per layer), KL-clipping (κ = 1e-2, one host
  read), heavy-ball momentum 0.9 and the update by ``torch._foreach`` ops. A second variant runs the
  forward pass once on the batch stacked twice and one backward pass of [∇_f L; p − e_ŷ] to the z's,
  reading ∇W = g_Lᵀ h off the first half (valid only for models whose samples do not interact: no
  batch normalisation, no dropout — which is why the library does not do this). ``--compiled`` adds
  a third: everything after the two backward passes (averages, direction, clipping with the factor
  kept on the device, momentum, step) as one function under ``torch.compile`` (inductor's C++ kernels;
  compiled at the first step, not timed).
* **K-BFGS** (Goldfarb, Ren & Bahamou 2020): pass 1 — forward with hooks, backward of the loss to the
  parameters and the z's; A's moving average (ρ = 0.9), the Hessian-action BFGS update of H_a with
  s_a = H_a h̄, y_a = (A + √λ I) s_a; the direction −H_g [∇W ∇b] H_a on the momentum-averaged gradient
  (μ = 0.9); the update; pass 2 on the same batch at the new θ — forward with hooks, backward of the
  loss to the z's only; per layer s = z̄⁺ − z̄, y = ḡ⁺ − ḡ, Powell damping (μ₁ = 0.2) and
  Levenberg–Marquardt damping (μ₂ = √λ, λ = 0.3) decided from one host read of (sᵀy, yᵀH_g y),
  then the BFGS update of H_g. No skip rule (the library's counts no skips on this problem).

The unit is torch's ``optim.SGD`` step (``zero_grad``, forward, loss, backward, update), and the
figures are medians over ``--pairs`` interleaved blocks (40 SGD steps, 40 floor steps, 20 curvlab
steps, in one process), so that load changes move unit and method together. The floors' numbers are
not checked against curvlab's (they are timings, not implementations to use); the step's operations
are what matter: the targets of issue 10 (KFAC ≤ 2×, K-BFGS ≤ 3× an SGD step) can be met only if
the floors are well below them.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import math
import os
import statistics
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import reexec_with_heap_reuse, table  # noqa: E402


def _linear_layers(model):
    import torch

    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not layers or any(m.bias is None for m in layers):
        raise ValueError("the floors are written for MLPs of nn.Linear layers with biases")
    return layers


class _Recorder:
    """Forward hooks that keep each layer's (input, output) of the last call."""

    def __init__(self, layers) -> None:
        self.records = [None] * len(layers)
        for i, m in enumerate(layers):
            m.register_forward_hook(self._hook(i))

    def _hook(self, i: int):
        def hook(_m, inputs, output):
            self.records[i] = (inputs[0].detach(), output)

        return hook


def _sample_cotangent(f, minus_one):
    """p − e_ŷ per sample, ŷ drawn from softmax(f) by the inverse CDF (one uniform per sample)."""
    import torch

    p = torch.softmax(f, dim=1)
    u = torch.rand(f.shape[0], 1, dtype=f.dtype)
    ys = (p.cumsum(1) < u).sum(1, keepdim=True).clamp_(max=f.shape[1] - 1)
    return p.scatter_add(1, ys, minus_one.expand(f.shape[0], 1)), p


class KfacFloor:
    """KFAC in plain torch (see the module docstring); ``stacked=True``: the batch-stacked variant."""

    def __init__(self, model, lr=0.1, damping=1e-2, decay=0.95, momentum=0.9, kl_clip=1e-2, period=10,
                 stacked=False, compiled=False) -> None:
        import torch

        self.model, self.layers = model, _linear_layers(model)
        self.params = [p for m in self.layers for p in (m.weight, m.bias)]
        self.rec = _Recorder(self.layers)
        self.lr, self.damping, self.decay, self.momentum, self.kl_clip = lr, damping, decay, momentum, kl_clip
        self.period, self.stacked = period, stacked
        self.A: list = [None] * len(self.layers)
        self.G: list = [None] * len(self.layers)
        self.inv: list = []
        self.buf: list | None = None
        self.k = 0
        self.minus_one = torch.full((1, 1), -1.0)
        self.compiled = torch.compile(self._post, dynamic=False) if compiled else None

    def _statistics(self, X, y):
        import torch
        import torch.nn.functional as F

        n = X.shape[0]
        if not self.stacked:
            f = self.model(X)
            loss = F.cross_entropy(f, y)
            grads = torch.autograd.grad(loss, self.params, retain_graph=True)
            with torch.no_grad():
                cot, _ = _sample_cotangent(f.detach(), self.minus_one)
            zs = [r[1] for r in self.rec.records[:-1]]
            gs = [*torch.autograd.grad(f, zs, cot), cot]
            hs = [F.pad(r[0], (0, 1), value=1.0) for r in self.rec.records]
            return loss, [torch.cat([grads[2 * i], grads[2 * i + 1][:, None]], 1) for i in range(len(hs))], hs, gs
        f2 = self.model(torch.cat([X, X]))
        f = f2[:n].detach()
        with torch.no_grad():
            cot, p = _sample_cotangent(f, self.minus_one)
            loss = -torch.log(p.gather(1, y[:, None])).mean()
            g_loss = p.scatter_add(1, y[:, None], self.minus_one.expand(n, 1)).div_(n)
        zs = [r[1] for r in self.rec.records[:-1]]
        cot2 = torch.cat([g_loss, cot])
        gs2 = [*torch.autograd.grad(f2, zs, cot2), cot2]
        hs = [F.pad(r[0][:n], (0, 1), value=1.0) for r in self.rec.records]
        Ms = [g[:n].T @ h for g, h in zip(gs2, hs)]
        return loss, Ms, hs, [g[n:] for g in gs2]

    def _refresh(self) -> None:
        import torch

        self.inv = []
        for A, G in zip(self.A, self.G):
            pi = math.sqrt((float(A.trace()) / A.shape[0]) / (float(G.trace()) / G.shape[0]))
            la, lg = pi * self.damping**0.5, self.damping**0.5 / pi
            eye_a, eye_g = torch.eye(A.shape[0], dtype=A.dtype), torch.eye(G.shape[0], dtype=G.dtype)
            self.inv.append((torch.cholesky_inverse(torch.linalg.cholesky(A + la * eye_a)),
                             torch.cholesky_inverse(torch.linalg.cholesky(G + lg * eye_g))))

    def _post(self, hs, gs, Ms, A, G, inv, buf):
        """The step after the backward passes as one pure function (for ``compiled``): new A, G, buffer, steps."""
        import torch

        n, b = hs[0].shape[0], self.decay
        A = [torch.addmm(a, h.T, h, beta=b, alpha=(1 - b) / n) for a, h in zip(A, hs)]
        G = [torch.addmm(g_, g.T, g, beta=b, alpha=(1 - b) / n) for g_, g in zip(G, gs)]
        ds = [Gi @ M @ Ai for (Ai, Gi), M in zip(inv, Ms)]
        quad = self.lr**2 * sum((d * M).sum() for d, M in zip(ds, Ms)).abs()
        nu = torch.clamp(torch.sqrt(self.kl_clip / quad), max=1.0)
        buf = [self.momentum * B + d for B, d in zip(buf, ds)]
        steps = [v * (-self.lr * nu) for B in buf for v in (B[:, :-1], B[:, -1])]
        return A, G, buf, steps

    def step(self, X, y) -> None:
        import torch

        with torch.enable_grad():
            loss, Ms, hs, gs = self._statistics(X, y)
        n, b = X.shape[0], self.decay
        if self.compiled is not None and self.buf is not None and self.k % self.period != 0:
            with torch.no_grad():
                self.A, self.G, self.buf, steps = self.compiled(hs, gs, Ms, self.A, self.G, self.inv, self.buf)
                torch._foreach_add_(self.params, steps)
            self.k += 1
            return
        with torch.no_grad():
            for i, (h, g) in enumerate(zip(hs, gs)):
                if self.A[i] is None:
                    self.A[i], self.G[i] = h.T @ h / n, g.T @ g / n
                else:
                    self.A[i].addmm_(h.T, h, beta=b, alpha=(1 - b) / n)
                    self.G[i].addmm_(g.T, g, beta=b, alpha=(1 - b) / n)
            if self.k % self.period == 0:
                self._refresh()
            ds = [Gi @ M @ Ai for (Ai, Gi), M in zip(self.inv, Ms)]
            quad = self.lr**2 * abs(float(sum(torch.vdot(d.reshape(-1), M.reshape(-1)) for d, M in zip(ds, Ms))))
            nu = min(1.0, math.sqrt(self.kl_clip / quad)) if quad > 0 else 1.0
            if self.buf is None:
                self.buf = [d.clone() for d in ds]
            else:
                torch._foreach_mul_(self.buf, self.momentum)
                torch._foreach_add_(self.buf, ds)
            views = [v for B in self.buf for v in (B[:, :-1], B[:, -1])]
            torch._foreach_add_(self.params, views, alpha=-self.lr * nu)
        self.k += 1


def _bfgs_inverse_update(H, s, y, Hy, sy, yHy):
    """H⁺ = H − ρ(s (Hy)ᵀ + (Hy) sᵀ) + (ρ² yᵀHy + ρ) s sᵀ, ρ = 1/(sᵀy): two rank-one pairs as one GEMM."""
    import torch

    rho = 1.0 / sy
    U = torch.stack([s, Hy], dim=1)  # (d, 2)
    C = torch.tensor([[rho * rho * yHy + rho, -rho], [-rho, 0.0]], dtype=H.dtype)
    return torch.addmm(H, U @ C, U.T)


class KbfgsFloor:
    """K-BFGS in plain torch (see the module docstring)."""

    def __init__(self, model, lr=0.3, damping=0.3, momentum=0.9, decay=0.9, mu1=0.2, weight_decay=1e-5) -> None:
        import torch

        self.model, self.layers = model, _linear_layers(model)
        self.params = [p for m in self.layers for p in (m.weight, m.bias)]
        self.rec = _Recorder(self.layers)
        self.lr, self.momentum, self.decay, self.mu1, self.wd = lr, momentum, decay, mu1, weight_decay
        self.sqrt_lam = math.sqrt(damping)
        self.A: list = [None] * len(self.layers)
        self.Ha = [torch.eye(m.in_features + 1) for m in self.layers]
        self.Hg = [torch.eye(m.out_features) for m in self.layers]
        self.avg: list | None = None

    def step(self, X, y) -> None:
        import torch
        import torch.nn.functional as F

        n, L = X.shape[0], len(self.layers)
        with torch.enable_grad():
            f = self.model(X)
            loss = F.cross_entropy(f, y)
            zs = [r[1] for r in self.rec.records]
            out = torch.autograd.grad(loss, [*self.params, *zs])
        grads, gzs = out[:2 * L], out[2 * L:]
        hs = [F.pad(r[0], (0, 1), value=1.0) for r in self.rec.records]
        with torch.no_grad():
            z_bar = [z.detach().mean(0) for z in zs]
            g_bar = [g.mean(0) for g in gzs]
            Ms = [torch.cat([grads[2 * i] + self.wd * self.params[2 * i],
                             (grads[2 * i + 1] + self.wd * self.params[2 * i + 1])[:, None]], 1) for i in range(L)]
            if self.avg is None:
                self.avg = [M.clone() for M in Ms]
            else:
                torch._foreach_lerp_(self.avg, Ms, 1 - self.momentum)
            for i, h in enumerate(hs):  # A's average, then H_a by the Hessian-action BFGS update
                if self.A[i] is None:
                    self.A[i] = h.T @ h / n
                else:
                    self.A[i].addmm_(h.T, h, beta=self.decay, alpha=(1 - self.decay) / n)
                s = self.Ha[i] @ h.mean(0)
                yv = torch.addmv(s, self.A[i], s, beta=self.sqrt_lam)
                Hy = self.Ha[i] @ yv
                sy, yHy = torch.stack([s @ yv, yv @ Hy]).tolist()
                self.Ha[i] = _bfgs_inverse_update(self.Ha[i], s, yv, Hy, sy, yHy)
            ds = [Hg @ M @ Ha for Hg, M, Ha in zip(self.Hg, self.avg, self.Ha)]
            views = [v for D in ds for v in (D[:, :-1], D[:, -1])]
            torch._foreach_add_(self.params, views, alpha=-self.lr)
        with torch.enable_grad():  # pass 2: the same batch at the new θ
            f = self.model(X)
            loss2 = F.cross_entropy(f, y)
            zs2 = [r[1] for r in self.rec.records]
            gzs2 = torch.autograd.grad(loss2, zs2)
        with torch.no_grad():
            for i in range(L):
                s = zs2[i].detach().mean(0) - z_bar[i]
                yv = (gzs2[i].mean(0) - g_bar[i]) * n
                Hy = self.Hg[i] @ yv
                sy, yHy = torch.stack([s @ yv, yv @ Hy]).tolist()
                if sy < self.mu1 * yHy:  # Powell: s ← θs + (1 − θ)H y, sᵀy = μ₁ yᵀHy
                    t = (1 - self.mu1) * yHy / (yHy - sy)
                    s = t * s + (1 - t) * Hy
                yv = yv + self.sqrt_lam * s  # Levenberg–Marquardt: sᵀy ≥ μ₂ ‖s‖²
                Hy = self.Hg[i] @ yv
                sy, yHy = torch.stack([s @ yv, yv @ Hy]).tolist()
                self.Hg[i] = _bfgs_inverse_update(self.Hg[i], s, yv, Hy, sy, yHy)


def _block(step: Callable[[], None], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t0) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problem", default="digits-mlp")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compiled", action="store_true",
                        help="also KFAC with its post-backward math under torch.compile (needs a C++ compiler)")
    args = parser.parse_args()
    reexec_with_heap_reuse()
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from optim import batches, torch_step

    import curvlab as cl

    prob = cl.problems.load(args.problem, n=args.batch * args.batches, dtype=torch.float32)
    data = batches(prob, args.batch, args.batches)

    def stepper(make) -> Callable[[], None]:
        obj = make(copy.deepcopy(prob.model))
        cycle = itertools.cycle(data)

        def step() -> None:
            X, y = next(cycle)
            obj.step(X, y)

        return step

    def curvlab(method: str) -> Callable:
        return lambda model: cl.optim.make(method, model, copy.deepcopy(prob.loss_fn))

    rows = [("KFAC (fisher_mc, statistics every step, inverses every 10)", [
                ("plain torch, two backward passes", stepper(KfacFloor)),
                ("plain torch, one backward of the stacked batch", stepper(lambda m: KfacFloor(m, stacked=True))),
                *([("plain torch, the math after the backward passes under torch.compile",
                    stepper(lambda m: KfacFloor(m, compiled=True)))] if args.compiled else []),
                ("curvlab cl.optim 'kfac'", stepper(curvlab("kfac")))], 2.0),
            ("K-BFGS (two passes per step)", [
                ("plain torch", stepper(KbfgsFloor)),
                ("curvlab cl.optim 'kbfgs'", stepper(curvlab("kbfgs")))], 3.0)]
    sgd = torch_step(prob, data, "sgd")
    steps = [s for _, variants, _ in rows for _, s in variants]
    for s in (sgd, *steps):
        for _ in range(30):
            s()
    units: list[float] = []
    ratios: list[list[float]] = [[] for _ in steps]
    for _ in range(args.pairs):
        units.append(_block(sgd, 40))
        for k, s in enumerate(steps):
            ratios[k].append(_block(s, 20) / units[-1])
    unit = statistics.median(units)
    load = open("/proc/loadavg").read().split()[0] if os.path.exists("/proc/loadavg") else "?"
    print(f"torch {torch.__version__}, {args.threads} thread(s), float32, {args.problem}, batch {args.batch}; "
          f"SGD step {unit * 1e3:.3f} ms (median of {args.pairs} blocks of 40); load average {load}\n")
    out, k = [], 0
    for method, variants, target in rows:
        for label, _ in variants:
            r = statistics.median(ratios[k])
            out.append([method, label, f"{r * unit * 1e3:.3f} ms", f"{r:.2f}x", f"≤ {target:g}x"])
            k += 1
    print(table(out, ["method", "implementation", "per step", "SGD steps", "target"]))


if __name__ == "__main__":
    main()
