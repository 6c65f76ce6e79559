"""Exact curvature from low-rank factors: spectra and damped natural-gradient steps vs dense and curvlinops.

    python benchmarks/lowrank.py                  # the full table (a few minutes: dense eigh of P = 8,970)
    python benchmarks/lowrank.py --no-dense-eigh  # skip the dense eigh (keep the dense eigvalsh)

Three sections, every time from scratch (matrix built inside the timed call):

1. ``digits-mlp-wide`` (N = 256, float64): all P eigenvalues of the GGN and of the empirical Fisher
   from the low-rank form (capture, r×r Gram, its eigvalsh) against the dense matrix's eigvalsh and
   eigh (build included); max |difference| / max eigenvalue.
2. ``digits-mlp-wide``: the damped natural-gradient step (G + λI)⁻¹g, full and block-diagonal, by
   Woodbury on the low-rank form against a Cholesky solve of the materialised dense matrix.
3. ``digits-mlp-1m`` (N = 128): the same step on 1.1M parameters (dense matrices would need 9 TiB)
   with peak extra memory and the residual ‖(G + λI)x − g‖/‖g‖ from GGN-vector products; the top-10
   spectrum; next to it curvlinops' ``GGNLinearOperator`` with SciPy's conjugate gradients to the
   same residual (floored at 1e-10), in the same run.

Low-rank figures are medians of ``--repeats`` runs after a warm-up; dense and CG figures (seconds
to minutes each) are single runs. Protocol of ``harness.py`` (2 threads, glibc heap reuse).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import fmt_bytes, fmt_seconds, median_time, peak_extra_memory, reexec_with_heap_reuse, table  # noqa: E402


def timed(fn, repeats: int):
    """(result, seconds): one warm-up run whose result is kept, then the median of ``repeats`` runs."""
    out = fn()
    return out, median_time(fn, repeats)


def once(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def spectrum_rows(prob, kind: str, target: int, args, rows, targets) -> None:
    import torch

    import curvlab as cl

    oracle = cl.exact.get(kind)
    w, t_lr = timed(lambda: oracle(prob, structure="low_rank").eigvalsh(), args.repeats)
    ev, t_vals = once(lambda: torch.linalg.eigvalsh(oracle(prob).to_dense()))
    L = oracle(prob, structure="low_rank")
    note = f"rank {L.rank} of r = {L.factor.rank}, {prob.num_params - L.rank} zeros"
    rows.append([f"{kind} spectrum", "low rank: Gram eigvalsh", fmt_seconds(t_lr), "-", "-", note])
    rows.append([f"{kind} spectrum", "dense: build + eigvalsh", fmt_seconds(t_vals), f"{t_vals / t_lr:,.0f}x",
                 f"{float((w - ev).abs().max() / ev.abs().max()):.1e}", ""])
    best, against = t_vals, "eigvalsh"
    if not args.no_dense_eigh:
        (ev2, _), t_eigh = once(lambda: torch.linalg.eigh(oracle(prob).to_dense()))
        rows.append([f"{kind} spectrum", "dense: build + eigh", fmt_seconds(t_eigh), f"{t_eigh / t_lr:,.0f}x",
                     f"{float((w - ev2).abs().max() / ev2.abs().max()):.1e}", ""])
        best, against = t_eigh, "eigh"
    targets.append([f"{kind} spectrum ≥ {target}x faster than dense {against}", f"{best / t_lr:,.0f}x",
                    "met" if best / t_lr >= target else "NOT met"])


def spectra(prob, args, rows, targets) -> None:
    for kind, target in (("ggn", 20), ("empirical_fisher", 200)):
        spectrum_rows(prob, kind, target, args, rows, targets)


def steps(prob, args, rows, targets) -> None:
    import curvlab as cl

    g, lam = prob.gradient(), args.damping
    for lr, dense, label in (("low_rank", "full", "full"), ("block_low_rank", "block", "block-diagonal")):
        x, t_lr = timed(lambda lr=lr: cl.exact.ggn(prob, structure=lr).solve(g, lam), args.repeats)
        xd, t_d = once(lambda dense=dense: cl.exact.ggn(prob, structure=dense).solve(g, lam))
        diff = float((x - xd).norm() / xd.norm())
        rows.append([f"NG step ({label})", "low rank: Woodbury", fmt_seconds(t_lr), "-", "-", f"λ = {lam:g}"])
        rows.append([f"NG step ({label})", "dense: build + Cholesky solve", fmt_seconds(t_d), f"{t_d / t_lr:,.0f}x",
                     f"{diff:.1e}", ""])
        if label == "full":
            targets.append(["wide NG step ≥ 10x faster than a dense Cholesky solve", f"{t_d / t_lr:,.0f}x",
                            "met" if t_d / t_lr >= 10 else "NOT met"])


def curvlinops_cg(prob, g, lam: float, rtol: float, maxiter: int = 5000):
    """curvlinops' GGN operator + λI with SciPy CG to ``rtol``: (x, iterations), or None if not installed."""
    try:
        import curvlinops
    except ImportError:
        return None
    import numpy as np
    import torch
    from scipy.sparse.linalg import LinearOperator, cg

    params = [p for p in prob.model.parameters() if p.requires_grad]
    op = curvlinops.GGNLinearOperator(prob.model, prob.loss_fn, params, [(prob.X, prob.y)],
                                      check_deterministic=False, num_data=prob.num_samples)

    def mv(v: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(v).reshape(-1))
        return (op @ t + lam * t).numpy()

    count = [0]
    A = LinearOperator((prob.num_params,) * 2, matvec=mv, dtype=np.float64)
    x, info = cg(A, g.numpy(), rtol=rtol, atol=0.0, maxiter=maxiter,
                 callback=lambda _: count.__setitem__(0, count[0] + 1))
    return torch.from_numpy(x), count[0], info


def million(args, rows, targets) -> None:
    import curvlab as cl

    prob = cl.problems.load("digits-mlp-1m", n=args.big_n)
    g, lam = prob.gradient(), args.damping
    step = lambda: cl.exact.ggn(prob, structure="low_rank").solve(g, lam)  # noqa: E731
    step()
    x, mem = peak_extra_memory(step)
    t = median_time(step, args.repeats)
    res = float((cl.exact.ggn_vp(prob, x) + lam * x - g).norm() / g.norm())
    rows.append(["1m NG step (full)", "low rank: Woodbury", fmt_seconds(t), "-", f"res {res:.1e}",
                 f"P = {prob.num_params:,}, peak {fmt_bytes(mem)}"])
    targets.append(["1m NG step < 2 s", fmt_seconds(t), "met" if t < 2 else "NOT met"])
    targets.append(["1m NG step peak memory < 2 GiB", fmt_bytes(mem), "met" if mem < 2 * 2**30 else "NOT met"])
    ggn, ef = cl.exact.ggn, cl.exact.empirical_fisher
    for label, fn in (("1m NG step (block-diag.)", lambda: ggn(prob, structure="block_low_rank").solve(g, lam)),
                      ("1m EF step (full)", lambda: ef(prob, structure="low_rank").solve(g, lam)),
                      ("1m GGN top-10 eigenpairs", lambda: ggn(prob, structure="low_rank")._top_eigen(10))):
        _, tt = timed(fn, args.repeats)
        rows.append([label, "low rank", fmt_seconds(tt), "-", "-", ""])
    if args.no_peers:
        return
    target = max(res, 1e-10)
    out, t_cg = once(lambda: curvlinops_cg(prob, g, lam, target))
    if out is None:
        rows.append(["1m NG step (full)", "curvlinops GGN + SciPy CG", "skipped: curvlinops not installed", "", "", ""])
        return
    xc, iters, info = out
    res_cg = float((cl.exact.ggn_vp(prob, xc) + lam * xc - g).norm() / g.norm())
    rows.append(["1m NG step (full)", "curvlinops GGN + SciPy CG", fmt_seconds(t_cg), f"{t_cg / t:,.0f}x",
                 f"res {res_cg:.1e}", f"{iters} iterations to rtol {target:.0e}" + ("" if info == 0 else
                                                                                      f" (not converged: {info})")])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--damping", type=float, default=1e-3)
    ap.add_argument("--no-dense-eigh", action="store_true", help="skip the dense eigh (the eigvalsh stays)")
    ap.add_argument("--no-peers", action="store_true", help="skip curvlinops + CG")
    ap.add_argument("--wide", default="digits-mlp-wide", help="the problem of sections 1 and 2")
    ap.add_argument("--wide-n", type=int, default=256)
    ap.add_argument("--big-n", type=int, default=128, help="samples of digits-mlp-1m")
    args = ap.parse_args(argv)
    reexec_with_heap_reuse()

    import torch

    import curvlab as cl

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, float64, allocator: glibc heap reuse\n")
    rows: list[list[str]] = []
    targets: list[list[str]] = []
    wide = cl.problems.load(args.wide, n=args.wide_n)
    spectra(wide, args, rows, targets)
    steps(wide, args, rows, targets)
    million(args, rows, targets)
    print(f"## {args.wide} (P = {wide.num_params:,}, N = {wide.num_samples}) and digits-mlp-1m "
          f"(P = 1,126,410, N = {args.big_n})")
    print(table(rows, ["quantity", "method", "time", "slower than low rank", "max rel diff / residual", "note"]))
    print()
    print(table(targets, ["target", "measured", ""]))


if __name__ == "__main__":
    main()
