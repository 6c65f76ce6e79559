#!/usr/bin/env python
"""Time to build each KFAC-family approximation on the canned problems, against one gradient and curvlinops.

    python benchmarks/approx.py                                # every canned problem, float32 and float64
    python benchmarks/approx.py --problems digits-mlp digits-mlp-wide --dtypes float32 --runs 21

Protocol (that of ``shared/reference/peer-benchmarks.md``, so figures compare with its anchors):

* ``torch.set_num_threads(2)``, N = 256 samples (``cl.problems.load(name)``), CPU.
* Each figure is the median of ``--runs`` timed calls after one warm-up (3 runs when a call takes
  over 1 s, 1 over 5 s) of what a user calls to get the object from scratch: ``cl.approx.kfac(prob,
  ...)`` etc. — factors (and for EKFAC/TEKFAC the factor eigendecompositions and the eigenvalue
  correction) included, nothing densified. For curvlinops (when ``import curvlinops`` works):
  building ``KFACLinearOperator`` / ``EKFACLinearOperator`` (``check_deterministic=False``,
  ``num_data`` given, ``separate_weight_and_bias=False`` — the same matrix as curvlab's) and then
  computing its factors (``compute_kronecker_factors``; EKFAC: eigenvectors and correction).
* The unit is one plain gradient: ``loss_fn(model(X), y)`` then ``torch.autograd.grad`` over all
  parameters, median of 200 runs.
* Allocator: by default the script re-executes itself with glibc keeping freed memory for reuse
  (``MALLOC_MMAP_MAX_=0``, large ``MALLOC_TRIM_THRESHOLD_``; ``benchmarks/harness.py``), as the
  peer harness did;
  ``--allocator default`` keeps glibc's defaults.

Targets (issue 3, on the 64-64-64-10 MLP of the peer anchors = ``digits-mlp-wide``, float32):
``mc`` and ``empirical`` KFAC within 3× of one gradient; ``type2`` KFAC no slower than 2.1 ms and
EKFAC no slower than 9.3 ms (nngeometry, the fastest peer). The script prints whether they hold.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import HEAP_ENV, reexec_with_heap_reuse  # noqa: E402  (the allocator setting shared by benchmarks)


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--problems", nargs="*", default=None, help="canned problem names (default: all)")
    ap.add_argument("--dtypes", nargs="*", default=["float32", "float64"], choices=["float32", "float64"])
    ap.add_argument("--runs", type=int, default=15, help="timed runs per figure (median)")
    ap.add_argument("--methods", nargs="*", default=None, help="subset of method labels")
    ap.add_argument("--allocator", choices=["reuse", "default"], default="reuse")
    ap.add_argument("--no-peers", action="store_true", help="skip curvlinops even when installed")
    return ap.parse_args()


def median_time(fn: Callable[[], object], runs: int) -> tuple[float, int]:
    """Median wall time of ``fn`` over ``runs`` calls after one warm-up (fewer runs for slow calls)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    if first > 5.0:
        runs = 1
    elif first > 1.0:
        runs = min(runs, 3)
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), runs


def gradient_unit(prob) -> float:
    import torch

    params = [p for p in prob.model.parameters() if p.requires_grad]

    def grad() -> None:
        loss = prob.loss_fn(prob.model(prob.X), prob.y)
        torch.autograd.grad(loss, params)

    return median_time(grad, 200)[0]


def curvlab_methods(prob) -> dict[str, Callable[[], object]]:
    from torch import nn

    import curvlab as cl

    A = cl.approx
    out = {
        "KFAC type-2": lambda: A.kfac(prob, fisher="type2"),
        "KFAC MC (1 sample)": lambda: A.kfac(prob, fisher="mc", mc_samples=1),
        "KFAC empirical": lambda: A.kfac(prob, fisher="empirical"),
        "EKFAC type-2": lambda: A.ekfac(prob, fisher="type2"),
        "TKFAC type-2": lambda: A.tkfac(prob, fisher="type2"),
        "TEKFAC type-2": lambda: A.tekfac(prob, fisher="type2"),
        "FOOF": lambda: A.foof(prob),
        "KFOC type-2": lambda: A.kfoc(prob, fisher="type2"),
    }
    if any(isinstance(m, nn.Conv2d) for m in prob.model.modules()):
        out["KFAC type-2, reduce"] = lambda: A.kfac(prob, fisher="type2", approx="reduce")
    return out


def curvlinops_methods(prob) -> dict[str, Callable[[], object]]:
    from curvlinops import EKFACLinearOperator, KFACLinearOperator
    from curvlinops.kfac import FisherType

    model = copy.deepcopy(prob.model)  # a failing peer may leave hooks behind: keep them off curvlab's model
    params = [p for p in model.parameters() if p.requires_grad]
    data = [(prob.X, prob.y)]

    def kfac(fisher_type) -> Callable[[], object]:
        def build() -> object:
            K = KFACLinearOperator(model, prob.loss_fn, params, data, fisher_type=fisher_type,
                                   check_deterministic=False, num_data=prob.num_samples,
                                   separate_weight_and_bias=False)
            K.compute_kronecker_factors()
            return K
        return build

    def ekfac() -> object:
        E = EKFACLinearOperator(model, prob.loss_fn, params, data, fisher_type=FisherType.TYPE2,
                                check_deterministic=False, num_data=prob.num_samples,
                                separate_weight_and_bias=False)
        E._maybe_compute_ekfac()  # factors, eigenvectors and eigenvalue correction
        return E

    return {
        "KFAC type-2": kfac(FisherType.TYPE2),
        "KFAC MC (1 sample)": kfac(FisherType.MC),
        "KFAC empirical": kfac(FisherType.EMPIRICAL),
        "EKFAC type-2": ekfac,
    }


def backpack_methods(prob) -> dict[str, Callable[[], object]]:
    """BackPACK 1.7: KFLR (= type-2 KFAC) and KFAC (MC, 1 sample), forward + backward included;
    ``extend`` on a copy of the model is one-off set-up and not timed (as in peer-benchmarks.md)."""
    import warnings

    from backpack import backpack, extend
    from backpack.extensions import KFAC, KFLR

    warnings.filterwarnings("ignore", message=".*Full backward hook.*")
    model, loss_fn = extend(copy.deepcopy(prob.model)), extend(copy.deepcopy(prob.loss_fn))

    def run(ext) -> Callable[[], object]:
        def build() -> object:
            model.zero_grad()
            with backpack(ext):
                loss_fn(model(prob.X), prob.y).backward()
            return [getattr(p, ext.savefield) for p in model.parameters()]
        return build

    return {"KFAC type-2": run(KFLR()), "KFAC MC (1 sample)": run(KFAC(mc_samples=1))}


def nngeometry_methods(prob) -> dict[str, Callable[[], object]]:
    """nngeometry 0.4: FIM(PMatKFAC) (exact = type-2), FIM(PMatEKFAC) + update_diag, and
    FIM_MonteCarlo(PMatKFAC, 1 trial); classification (cross-entropy) in float32 only — its helper
    matrices are built in the default dtype (peer-benchmarks.md). The loader is one-off set-up."""
    import torch
    from nngeometry.metrics import FIM, FIM_MonteCarlo
    from nngeometry.object import PMatEKFAC, PMatKFAC
    from torch.utils.data import DataLoader, TensorDataset

    if prob.dtype != torch.float32 or type(prob.loss_fn).__name__ != "CrossEntropyLoss":
        return {}
    model = copy.deepcopy(prob.model)
    loader = DataLoader(TensorDataset(prob.X, prob.y), batch_size=prob.num_samples)

    def ekfac() -> object:
        F = FIM(model=model, loader=loader, representation=PMatEKFAC, variant="classif_logits")
        F.update_diag(loader)
        return F

    return {
        "KFAC type-2": lambda: FIM(model=model, loader=loader, representation=PMatKFAC, variant="classif_logits"),
        "KFAC MC (1 sample)": lambda: FIM_MonteCarlo(model=model, loader=loader, representation=PMatKFAC,
                                                     variant="classif_logits", trials=1),
        "EKFAC type-2": ekfac,
    }


PEERS = {"curvlinops": curvlinops_methods, "BackPACK": backpack_methods, "nngeometry": nngeometry_methods}
PEER_PACKAGES = {"curvlinops": "curvlinops-for-pytorch", "BackPACK": "backpack-for-pytorch", "nngeometry": "nngeometry"}


def fmt_time(t: float) -> str:
    return f"{t * 1e3:.2f} ms" if t < 1 else f"{t:.2f} s"


def main() -> None:
    args = _parse()
    if args.allocator == "reuse":
        reexec_with_heap_reuse()
    import torch

    import curvlab as cl

    torch.set_num_threads(2)
    peers, notes = [], []
    if not args.no_peers:
        from importlib import import_module
        from importlib.metadata import version

        for peer, package in PEER_PACKAGES.items():
            try:
                import_module({"curvlinops": "curvlinops", "BackPACK": "backpack", "nngeometry": "nngeometry"}[peer])
                peers.append(peer)
                notes.append(f"{package} {version(package)}")
            except Exception as exc:  # pragma: no cover - depends on the environment
                notes.append(f"{peer} skipped ({type(exc).__name__}; pip install -c constraints.txt {package})")
    peer_note = ", ".join(notes) or "not requested"
    names = args.problems or cl.problems.names()
    print(f"# curvlab approximations: build time (median of {args.runs} runs after a warm-up; fewer for calls > 1 s)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, python {platform.python_version()}, "
          f"{platform.processor() or platform.machine()}; allocator: "
          f"{'heap reuse ' + str(HEAP_ENV) if args.allocator == 'reuse' else 'glibc default'}; peers: {peer_note}")
    print()
    print("| problem | dtype | method | curvlab | × gradient | " + " | ".join(peers) + " | fastest peer ÷ curvlab |")
    print("|---|---|---|---:|---:|" + "---:|" * len(peers) + "---:|")
    results: dict[tuple[str, str, str, str], float] = {}
    for name in names:
        for dt in args.dtypes:
            dtype = getattr(torch, dt)
            prob = cl.problems.load(name, dtype=dtype)
            unit = gradient_unit(prob)
            results[(name, dt, "gradient", "torch")] = unit
            print(f"| {name} (P={prob.num_params}) | {dt} | one gradient (unit) | {fmt_time(unit)} | 1.0 |"
                  + " |" * len(peers) + " |")
            ours = curvlab_methods(prob)
            theirs = {}
            for peer in peers:
                try:
                    theirs[peer] = PEERS[peer](prob)
                except Exception as exc:  # pragma: no cover - peer set-up failures are reported
                    theirs[peer] = {"__failed__": f"failed: {type(exc).__name__}"}
            for label, fn in ours.items():
                if args.methods and label not in args.methods:
                    continue
                t, n = median_time(fn, args.runs)
                results[(name, dt, label, "curvlab")] = t
                cells, fastest = [], None
                for peer in peers:
                    methods = theirs[peer]
                    if label not in methods:
                        cells.append(methods.get("__failed__", ""))
                        continue
                    try:
                        tp, npeer = median_time(methods[label], args.runs)
                    except Exception as exc:  # pragma: no cover - peer failures are reported, not fatal
                        cells.append(f"failed: {type(exc).__name__}")
                        continue
                    results[(name, dt, label, peer)] = tp
                    fastest = tp if fastest is None else min(fastest, tp)
                    cells.append(f"{fmt_time(tp)}{f' n={npeer}' if npeer < args.runs else ''} ({tp / unit:.1f}×)")
                if fastest is not None:
                    results[(name, dt, label, "fastest peer")] = fastest
                print(f"| {name} | {dt} | {label} | {fmt_time(t)}{f' n={n}' if n < args.runs else ''} | "
                      f"{t / unit:.1f} | " + " | ".join(cells) + (" | " if cells else "")
                      + (f"{fastest / t:.1f}× |" if fastest is not None else " |"), flush=True)

    print()
    print("## Targets (issue 3)")
    for name in ("digits-mlp", "digits-mlp-wide"):
        key = (name, "float32")
        if (name, "float32", "gradient", "torch") not in results:
            continue
        unit = results[(*key, "gradient", "torch")]
        checks = [
            ("KFAC MC (1 sample)", "≤ 3× gradient", 3 * unit),
            ("KFAC empirical", "≤ 3× gradient", 3 * unit),
            ("KFAC type-2", "≤ 2.1 ms (nngeometry, 64-64-64-10)", 2.1e-3),
            ("EKFAC type-2", "≤ 9.3 ms (nngeometry, 64-64-64-10)", 9.3e-3),
        ]
        for label, what, bound in checks:
            t = results.get((*key, label, "curvlab"))
            if t is not None:
                print(f"- {name} float32 {label}: {fmt_time(t)} = {t / unit:.1f}× gradient, target {what}: "
                      f"{'met' if t <= bound else 'NOT met'}")
        for label in ("KFAC type-2", "EKFAC type-2"):  # the same-run target
            t, tp = results.get((*key, label, "curvlab")), results.get((*key, label, "fastest peer"))
            if t is not None and tp is not None:
                print(f"- {name} float32 {label}: curvlab {fmt_time(t)} vs the fastest peer in this run "
                      f"{fmt_time(tp)}, target no slower: {'met' if t <= tp else 'NOT met'}")


if __name__ == "__main__":
    main()
