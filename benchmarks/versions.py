"""Time the same oracle and approximation figures in two checkouts of curvlab, alternating processes.

    python benchmarks/versions.py BEFORE_DIR AFTER_DIR [--problems a,b] [--figures hessian,kfac] [--rounds 3]
    python benchmarks/versions.py BEFORE_DIR AFTER_DIR --problems digits-mlp --figures optim-kfac,optim-kbfgs

An ``optim-METHOD`` figure is one ``cl.optim`` step of METHOD at its defaults (float32, batch 128, one
thread, cycling through 8 minibatches) as a multiple of torch's SGD step on the same batches: the
median over 7 interleaved blocks (40 SGD steps, 20 method steps) after 30 warm-up steps of each —
dimensionless, so the table shows multiples instead of seconds. Options after a colon as JSON:
``optim-kfac:{"fisher":"ggn"}`` (optim figures come after the others in ``--figures``).

Each figure is measured in a fresh process per version, in turn (before, after, before, after …), so
that a swing of the machine's load hits both versions alike: the process builds the canned problem
(N = 256, float64, 2 threads), calls the figure once to warm up and prints the fastest of ``--calls``
calls. The table gives the fastest over the rounds, their ratio and the ratio of each round. A
checkout is any directory holding a ``curvlab`` package (``git worktree add DIR COMMIT``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

FIGURES = {
    "hessian": "cl.exact.hessian(prob).to_dense()",
    "ggn": "cl.exact.ggn(prob).to_dense()",
    "ef": "cl.exact.empirical_fisher(prob).to_dense()",
    "kfac": "cl.approx.kfac(prob, fisher='type2')",
    "kfac-mc": "cl.approx.kfac(prob, fisher='mc', mc_samples=1)",
    "kfac-ef": "cl.approx.kfac(prob, fisher='empirical')",
    "ekfac": "cl.approx.ekfac(prob, fisher='type2')",
    "tkfac": "cl.approx.tkfac(prob, fisher='type2')",
    "foof": "cl.approx.foof(prob)",
    "kfoc": "cl.approx.kfoc(prob, fisher='type2')",
}

CHILD = """
import time, torch
torch.set_num_threads({threads})
import curvlab as cl
prob = cl.problems.load({problem!r}, n={n}, dtype=torch.float64)
f = lambda: {expr}
f()
best = float("inf")
for _ in range({calls}):
    t = time.perf_counter(); f(); best = min(best, time.perf_counter() - t)
print(best)
"""


STEP_CHILD = """
import copy, itertools, json, statistics, time, torch
torch.set_num_threads(1)
import curvlab as cl
prob = cl.problems.load({problem!r}, n=1024, dtype=torch.float32)
data = list(zip(prob.X.split(128), prob.y.split(128)))[:8]
sgd_model, loss_fn = copy.deepcopy(prob.model), copy.deepcopy(prob.loss_fn)
sgd = torch.optim.SGD(sgd_model.parameters(), lr=0.1)
opt = cl.optim.make({method!r}, copy.deepcopy(prob.model), copy.deepcopy(prob.loss_fn), **json.loads({options!r}))
a, b = itertools.cycle(data), itertools.cycle(data)
def sgd_step():
    X, y = next(a); sgd.zero_grad(); loss_fn(sgd_model(X), y).backward(); sgd.step()
def step():
    opt.step(*next(b))
def block(f, k):
    t = time.perf_counter()
    for _ in range(k):
        f()
    return (time.perf_counter() - t) / k
block(sgd_step, 30); block(step, 30)
print(statistics.median(block(step, 20) / block(sgd_step, 40) for _ in range(7)))
"""


def measure(checkout: str, problem: str, figure: str, calls: int, n: int, threads: int) -> float:
    """Return the fastest of ``calls`` calls of ``figure`` on ``problem`` in a fresh process of ``checkout``.

    For an ``optim-METHOD[:JSON]`` figure: the step's multiple of an SGD step (see the module docstring).
    """
    env = dict(os.environ, PYTHONPATH=os.path.abspath(checkout), MALLOC_MMAP_MAX_="0",
               MALLOC_TRIM_THRESHOLD_=str(2**36))
    if figure.startswith("optim-"):
        method, _, options = figure[len("optim-"):].partition(":")
        code = STEP_CHILD.format(problem=problem, method=method, options=options or "{}")
    else:
        code = CHILD.format(threads=threads, problem=problem, n=n, expr=FIGURES[figure], calls=calls)
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd="/", capture_output=True, text=True,
                         check=True)
    return float(out.stdout.strip().splitlines()[-1])


def fmt(seconds: float) -> str:
    """Return seconds as ``12.3 ms`` or ``1.23 s``."""
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def main() -> None:
    """Parse the arguments, alternate the two checkouts per figure and round, print the Markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--problems", default="digits-mlp,digits-autoencoder,digits-cnn")
    ap.add_argument("--figures", default=",".join(FIGURES))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=7, help="timed calls per process (fastest kept)")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if "optim-" in args.figures:  # JSON options may hold commas: optim figures are split on ",optim-", last
        head, *rest = args.figures.split(",optim-")
        figures = (head.split(",") if not head.startswith("optim-") else [head]) + ["optim-" + f for f in rest]
    else:
        figures = args.figures.split(",")
    unknown = [f for f in figures if f not in FIGURES and not f.startswith("optim-")]
    if unknown:
        ap.error(f"unknown figures {unknown}; valid: {', '.join(FIGURES)}")
    times: dict[tuple[str, str, str], list[float]] = {}
    for _ in range(args.rounds):
        for problem in args.problems.split(","):
            for figure in figures:
                for label, checkout in (("before", args.before), ("after", args.after)):
                    t = measure(checkout, problem, figure, args.calls, args.n, args.threads)
                    times.setdefault((problem, figure, label), []).append(t)
    print(f"before: {args.before}, after: {args.after}; N = {args.n}, float64, {args.threads} threads, "
          f"fastest of {args.calls} calls per process, {args.rounds} rounds; load average "
          f"{os.getloadavg()[0]:.2f}\n")
    print("| problem | figure | before | after | after / before | each round |")
    print("|---|---|---:|---:|---:|---|")
    for problem in args.problems.split(","):
        for figure in figures:
            b, a = times[(problem, figure, "before")], times[(problem, figure, "after")]
            rounds = ", ".join(f"{x / y:.2f}" for x, y in zip(a, b))
            if figure.startswith("optim-"):  # multiples of an SGD step: the median round, not the fastest
                mb, ma = statistics.median(b), statistics.median(a)
                print(f"| {problem} | {figure} | {mb:.2f}× | {ma:.2f}× | {ma / mb:.2f} | {rounds} |")
                continue
            print(f"| {problem} | {figure} | {fmt(min(b))} | {fmt(min(a))} | {min(a) / min(b):.2f} | {rounds} |")


if __name__ == "__main__":
    main()
