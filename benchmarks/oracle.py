"""Time of the exact dense Hessian, GGN and empirical Fisher: curvlab vs naive torch.func vs curvlinops.

    python benchmarks/oracle.py                         # digits-mlp, N = 256, float64
    python benchmarks/oracle.py --problems digits-mlp,digits-mlp-wide,digits-cnn --dtype float32

For every problem and quantity it prints seconds, multiples of one gradient, the ratio to the
machine's floor (2·N·P² flops — the layer-structured contraction — divided by the matmul rate
measured in this run), peak extra memory as a multiple of the result's size, and the agreement
with the reference. curvlinops' operators are materialised by products with the identity in
blocks of 64 columns (its fastest setting on these problems); they are skipped with a note when
``curvlinops`` is not installed (``pip install -c constraints.txt curvlinops-for-pytorch``).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import (  # noqa: E402
    fmt_bytes,
    fmt_seconds,
    gradient_time,
    matmul_rate,
    median_time,
    peak_extra_memory,
    reexec_with_heap_reuse,
    table,
)


def curvlinops_ops(prob):
    """curvlinops' Hessian, GGN and EF operators for the problem, or None when not installed."""
    try:
        import curvlinops
    except ImportError:
        return None
    params = [p for p in prob.model.parameters() if p.requires_grad]
    kw = dict(check_deterministic=False, num_data=prob.num_samples)
    data = [(prob.X, prob.y)]
    return {
        "hessian": lambda: curvlinops.HessianLinearOperator(prob.model, prob.loss_fn, params, data, **kw),
        "ggn": lambda: curvlinops.GGNLinearOperator(prob.model, prob.loss_fn, params, data, **kw),
        "ef": lambda: curvlinops.EFLinearOperator(prob.model, prob.loss_fn, params, data, **kw),
    }


def naive_hessian_fits(prob, limit: float = 12 * 2**30) -> bool:
    """Whether torch.func.hessian (all P tangents through the network at once) fits in ``limit``
    bytes, estimated as 2 × P × (every module's output over the batch) × bytes per entry; on
    digits-mlp-wide the estimate is 6 GiB against 9 GiB measured, on digits-cnn 24 GiB."""
    from curvlab.exact.hessian import activation_count

    return 2 * prob.num_params * activation_count(prob) * prob.theta.element_size() <= limit


def materialise(make_op, P, dtype, chunk=64):
    import torch

    op = make_op()
    out = torch.empty(P, P, dtype=dtype)
    eye = torch.eye(P, dtype=dtype)
    for j in range(0, P, chunk):
        out[:, j:j + chunk] = op @ eye[:, j:j + chunk]
    return out


def survey_row(prob, unit: float, repeats: int) -> list[str]:
    """The cost of verifying the fast paths' precondition (curvlab.layers.survey: one traced forward
    pass and one backward pass), recomputed from scratch each time, in multiples of one gradient."""
    from curvlab.layers import survey

    def fresh():
        prob.structure_cache.pop("survey", None)
        return survey(prob)

    fresh()
    t = median_time(fresh, max(5, repeats))
    return ["layer survey", "curvlab", fmt_seconds(t), f"{t / unit:.1f}x", "-", "-", "-", "-"]


def bench_problem(prob, name: str, args, rate: float, dtype) -> None:
    """Time, memory and agreement of the three dense quantities on one problem; print the table."""
    import curvlab as cl
    from curvlab import reference

    P, N = prob.num_params, prob.num_samples
    unit = gradient_time(prob)
    floor = 2 * N * P**2 / rate
    result_bytes = P * P * prob.theta.element_size()
    print(f"## {name}: P = {P}, N = {N}, one gradient {unit * 1e3:.2f} ms, floor 2NP²/rate "
          f"{fmt_seconds(floor)}, result {fmt_bytes(result_bytes)}")
    ours = {
        "hessian": lambda: cl.exact.hessian(prob).to_dense(),
        "ggn": lambda: cl.exact.ggn(prob).to_dense(),
        "ef": lambda: cl.exact.empirical_fisher(prob).to_dense(),
    }
    naive = {
        "hessian": ("torch.func.hessian", lambda: reference.hessian_func(prob)),
        "ggn": ("vmap(jacrev) J^T Λ J", lambda: reference.ggn(prob)),
        "ef": ("vmap(grad) G^T G", lambda: reference.empirical_fisher(prob)),
    }
    peers = None if args.no_peers else curvlinops_ops(prob)
    rows = [survey_row(prob, unit, args.repeats)]
    for fn in ours.values():  # one warm-up each: one-time allocations of the process are charged to none
        fn()
    for q, fn in ours.items():
        ref, mem = peak_extra_memory(fn)
        t = median_time(fn, args.repeats)
        rows.append([q, "curvlab", fmt_seconds(t), f"{t / unit:,.0f}x", f"{t / floor:.1f}x",
                     f"{mem / result_bytes:.1f}x", "-", "1.0x"])
        ours_t = t
        candidates = []
        if not args.no_naive and (q != "hessian" or naive_hessian_fits(prob)):
            candidates.append(naive[q])
        elif not args.no_naive:
            rows.append([q, naive[q][0], "skipped: needs > 12 GiB (P tangents x all activations)",
                         "", "", "", "", ""])
        if peers is not None:
            candidates.append((f"curvlinops {q} @ I (64 cols)", lambda q=q: materialise(peers[q], P, dtype)))
        for label, other in candidates:
            try:
                M, mem = peak_extra_memory(other)
                t = median_time(other, 1 if t > 2 else args.repeats)
            except (RuntimeError, MemoryError) as exc:  # e.g. out of memory
                rows.append([q, label, f"failed: {type(exc).__name__}", "", "", "", "", ""])
                continue
            agree = float((M - ref).abs().max() / ref.abs().max())
            rows.append([q, label, fmt_seconds(t), f"{t / unit:,.0f}x", f"{t / floor:.1f}x",
                         f"{mem / result_bytes:.1f}x", f"{agree:.1e}", f"{t / ours_t:.1f}x"])
    if peers is None and not args.no_peers:
        print("(curvlinops not installed: peers skipped)")
    print(table(rows, ["quantity", "method", "time", "gradients", "floor", "peak mem / result",
                       "max rel diff", "slower than curvlab"]))
    print()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", default="digits-mlp")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-naive", action="store_true", help="skip the naive torch.func references")
    ap.add_argument("--no-peers", action="store_true", help="skip curvlinops")
    args = ap.parse_args(argv)
    reexec_with_heap_reuse()

    import torch

    import curvlab as cl

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    rate = matmul_rate(dtype)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.dtype}, matmul {rate / 1e9:.1f} GFLOP/s, "
          f"allocator: glibc heap reuse (MALLOC_MMAP_MAX_=0)\n")
    for name in args.problems.split(","):
        bench_problem(cl.problems.load(name, n=args.n, dtype=dtype), name, args, rate, dtype)


if __name__ == "__main__":
    main()
