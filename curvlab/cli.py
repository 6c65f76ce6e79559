"""The ``curvlab`` command line: one small function per subcommand, all registered in :data:`COMMANDS`.

    curvlab problems                      the canned problems
    curvlab oracle NAME [--n N] ...       a problem's exact curvature: traces, top eigenvalues, timings
    curvlab compare NAME [--methods ...]  agreement report (netCDF + figures under data/results/)
    curvlab plot FILE.nc                  redraw a saved report's figures beside it

Adding a subcommand: write ``_configure_x(parser)`` (its arguments; :func:`add_problem_arguments`
gives the usual NAME/--n/--seed/--dtype) and ``_run_x(args) -> int`` (prints to stdout, returns the
exit status), and append ``Command("x", "one-line help", _configure_x, _run_x)`` to ``COMMANDS``.

User errors — bad arguments, an unknown problem, a matrix over the memory budget, any ``ValueError``
or ``TypeError`` raised while running — print one line to stderr and exit with status 2; pass
``--traceback`` (before the subcommand) to see the full traceback instead.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import torch

__all__ = ["main", "Command", "COMMANDS", "add_problem_arguments", "problem_from_args", "format_table",
           "UsageError"]

EXIT_USAGE = 2


class UsageError(Exception):
    """A user error a subcommand reports as one line (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr and exit status 2 (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


@dataclass(frozen=True)
class Command:
    """A subcommand: its name, one-line help, how to declare its arguments, and what it runs."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ---------------------------------------------------------------------------- shared helpers
_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def add_problem_arguments(parser: argparse.ArgumentParser) -> None:
    """NAME, --n, --seed, --dtype: the arguments that pick a canned problem."""
    from curvlab import problems

    parser.add_argument("name", metavar="NAME", help="a canned problem (see `curvlab problems`)")
    parser.add_argument("--n", type=int, default=problems.DEFAULT_N,
                        help=f"number of samples (default {problems.DEFAULT_N})")
    parser.add_argument("--seed", type=int, default=0, help="data subset and initialisation seed (default 0)")
    parser.add_argument("--dtype", choices=list(_DTYPES), default="float64", help="default float64")


def problem_from_args(args: argparse.Namespace) -> Any:
    """The :class:`curvlab.Problem` that :func:`add_problem_arguments`' arguments name."""
    from curvlab import problems

    return problems.load(args.name, n=args.n, seed=args.seed, dtype=_DTYPES[args.dtype])


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[bool] | None = None) -> str:
    """A plain aligned text table; ``right[j]`` right-aligns column j (default: all but the first)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[j]) for r in cells) for j in range(len(headers))]
    right = [j > 0 for j in range(len(headers))] if right is None else list(right)

    def line(r: list[str]) -> str:
        return "  ".join(c.rjust(w) if rj else c.ljust(w) for c, w, rj in zip(r, widths, right)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def _sci(x: float) -> str:
    return f"{x: .3e}"


# ---------------------------------------------------------------------------- curvlab problems
def _configure_problems(parser: argparse.ArgumentParser) -> None:
    pass


def _run_problems(args: argparse.Namespace) -> int:
    from curvlab import problems

    rows = []
    for name in problems.names():
        d = problems.describe(name)
        rows.append([name, d["num_params"], d["n_default"], d["n_max"], d["loss"], d["architecture"],
                     d["description"]])
    print(format_table(["name", "P", "N", "max N", "loss", "architecture", "description"], rows,
                       right=[False, True, True, True, False, False, False]))
    return 0


# ---------------------------------------------------------------------------- curvlab oracle
_ORACLE_KINDS = ("hessian", "ggn", "fisher_mc", "empirical_fisher")


def _configure_oracle(parser: argparse.ArgumentParser) -> None:
    add_problem_arguments(parser)
    parser.add_argument("--kinds", default="hessian,ggn,empirical_fisher",
                        help="comma-separated curvatures among " + ", ".join(_ORACLE_KINDS)
                        + " (default hessian,ggn,empirical_fisher)")
    parser.add_argument("--mc-samples", type=int, default=1,
                        help="labels drawn per input for fisher_mc (default 1)")
    parser.add_argument("--top", type=int, default=5, help="how many top eigenvalues to show (default 5)")


def _parse_kinds(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in kinds if k not in _ORACLE_KINDS]
    if bad or not kinds:
        raise UsageError(f"--kinds: unknown curvature {', '.join(bad) or repr(text)}; use "
                         + ", ".join(_ORACLE_KINDS))
    return kinds


def _run_oracle(args: argparse.Namespace) -> int:
    from curvlab import exact

    kinds = _parse_kinds(args.kinds)
    if args.top < 1:
        raise UsageError(f"--top must be at least 1; got {args.top}")
    if args.mc_samples < 1:
        raise UsageError(f"--mc-samples must be at least 1; got {args.mc_samples}")
    prob = problem_from_args(args)
    g = prob.gradient()
    loss_name = f"{type(prob.loss_fn).__name__}({prob.likelihood.reduction})"
    header = [
        ("problem", f"{prob.name}  ({prob.meta.get('architecture', '')})"),
        ("data", f"{prob.meta.get('dataset', '?')}, N = {prob.num_samples}, seed {prob.meta.get('seed', '?')}, "
                 f"{str(prob.dtype).replace('torch.', '')}"),
        ("P", f"{prob.num_params}"),
        ("loss", f"{loss_name} = {prob.loss():.6g}"),
        ("|grad|", f"{float(g.norm()):.6e}"),
    ]
    width = max(len(k) for k, _ in header)
    for k, v in header:
        print(f"{k.ljust(width)}  {v}")
    print(flush=True)

    # torch.func's first transform in a process imports torch._dynamo (≈1.5 s): do it before the
    # clock starts, so that "build s" is the computation of each matrix and not torch's set-up
    import torch._dynamo  # noqa: F401

    rows = []
    for kind in kinds:
        kwargs = {"samples": args.mc_samples, "seed": args.seed} if kind == "fisher_mc" else {}
        t0 = time.perf_counter()
        C = exact.get(kind)(prob, structure="full", **kwargs)
        t1 = time.perf_counter()
        ev = C.eigvalsh()
        t2 = time.perf_counter()
        scale = float(ev.abs().max())
        negative = int((ev < -1e-10 * scale).sum())
        top = ev.flip(0)[: args.top].tolist()
        rows.append([kind, _sci(float(C.trace())), " ".join(_sci(v) for v in top), negative,
                     f"{t1 - t0:.2f}", f"{t2 - t1:.2f}"])
    print(format_table(["curvature (full)", "trace", f"top-{args.top} eigenvalues", "#neg", "build s",
                        "eigvalsh s"], rows, right=[False, True, False, True, True, True]))
    return 0


# ---------------------------------------------------------------------------- curvlab compare
def _configure_compare(parser: argparse.ArgumentParser) -> None:
    from curvlab.compare.methods import DEFAULT_METHODS

    add_problem_arguments(parser)
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help="comma-separated method names (default: " + ",".join(DEFAULT_METHODS)
                        + "); see curvlab.compare.methods")
    parser.add_argument("--references", default="ggn", help="comma-separated exact references (default ggn)")
    parser.add_argument("--damping", default="1e-3,1e-2,1e-1", help="comma-separated dampings (default 1e-3,1e-2,1e-1)")
    parser.add_argument("--k", type=int, default=20, help="top eigenpairs for ratios and overlaps (default 20)")
    parser.add_argument("--damping-rule", choices=["own", "exact"], default="own",
                        help="own: each method's damping rule (KFAC: pi); exact: (C + λI)⁻¹ for all (default own)")
    parser.add_argument("--step", default="armijo",
                        help="step size for the loss changes: armijo, model, or a learning rate (default armijo)")
    parser.add_argument("--mc-samples", type=int, default=1, help="labels per input for Monte-Carlo methods")
    parser.add_argument("--top-only", action="store_true",
                        help="top-k eigenpairs only (no full spectra: faster for large P)")
    parser.add_argument("--out", default=None, help="netCDF file to write (default data/results/NAME-compare.nc)")
    parser.add_argument("--no-figures", action="store_true", help="do not draw the PNG figures")
    parser.add_argument("--quiet", action="store_true", help="no progress messages on stderr")


def _csv(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UsageError(f"{what}: give at least one value; got {text!r}")
    return items


def _run_compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from curvlab import plot
    from curvlab.compare import format_report, report, save

    try:
        dampings = [float(d) for d in _csv(args.damping, "--damping")]
    except ValueError:
        raise UsageError(f"--damping: expected comma-separated numbers; got {args.damping!r}") from None
    step: float | str = args.step
    if step not in ("armijo", "model"):
        try:
            step = float(step)
        except ValueError:
            raise UsageError(f"--step: use armijo, model or a number; got {args.step!r}") from None
    if args.k < 1:
        raise UsageError(f"--k must be at least 1; got {args.k}")
    out = Path(args.out) if args.out else Path("data") / "results" / f"{args.name}-compare.nc"
    _check_writable(out)  # before the report's minutes of work, not after
    prob = problem_from_args(args)
    t0 = time.perf_counter()

    def progress(msg: str) -> None:
        if not args.quiet:
            print(f"[{time.perf_counter() - t0:6.1f} s] {msg}", file=sys.stderr, flush=True)

    ds = report(prob, methods=_csv(args.methods, "--methods"), damping=dampings,
                references=_csv(args.references, "--references"), k=args.k, full_spectrum=not args.top_only,
                damping_rule=args.damping_rule, step=step, mc_samples=args.mc_samples, seed=args.seed,
                skip_unavailable=True, progress=progress)
    print(format_report(ds))
    try:
        path = save(ds, out)
        print(f"\nwrote {path}  ({time.perf_counter() - t0:.0f} s)")
        if not args.no_figures:
            for fig in plot.save_figures(ds, path.with_suffix("")):
                print(f"wrote {fig}")
    except OSError as exc:
        raise UsageError(f"cannot write {out}: {exc}") from None
    return 0


def _check_writable(out: Any) -> None:
    """Refuse (one line, status 2) an output path whose folder cannot be created or written to."""
    import tempfile

    if out.is_dir():
        raise UsageError(f"--out: {out} is a folder; give a file name such as {out / 'report.nc'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as exc:
        raise UsageError(f"--out: cannot write into {out.parent}: {exc}") from None


# ---------------------------------------------------------------------------- curvlab plot
def _configure_plot(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE.nc", help="a report written by `curvlab compare`")
    parser.add_argument("--dpi", type=int, default=130, help="resolution of the PNGs (default 130)")


def _run_plot(args: argparse.Namespace) -> int:
    from pathlib import Path

    from curvlab import plot
    from curvlab.compare import load

    path = Path(args.file)
    if not path.is_file():
        raise UsageError(f"no such file: {path}")
    try:
        ds = load(path)
    except OSError as exc:
        raise UsageError(f"cannot read {path} as netCDF: {exc}") from None
    written = plot.save_figures(ds, path.with_suffix(""), dpi=args.dpi)
    if not written:
        raise UsageError(f"{path} holds no variables these figures draw (is it a `curvlab compare` report?)")
    for fig in written:
        print(f"wrote {fig}")
    return 0


# ---------------------------------------------------------------------------- registry and entry point
#: Every subcommand, in the order ``curvlab --help`` lists them.
COMMANDS: list[Command] = [
    Command("problems", "list the canned problems", _configure_problems, _run_problems),
    Command("oracle", "summarise a problem's exact Hessian, GGN and empirical Fisher", _configure_oracle,
            _run_oracle),
    Command("compare", "agreement report: KFAC family vs exact curvature (matrices, spectra, directions)",
            _configure_compare, _run_compare),
    Command("plot", "draw the figures of a saved report (PNGs beside FILE.nc)", _configure_plot, _run_plot),
]


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per entry of :data:`COMMANDS`."""
    from curvlab import __version__

    parser = _Parser(prog="curvlab", description="Exact curvature of small networks vs the KFAC family.")
    parser.add_argument("--version", action="version", version=f"curvlab {__version__}")
    parser.add_argument("--traceback", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.configure(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``curvlab ARGV``; returns the exit status (0 success, 2 user error, 130 interrupted)."""
    from curvlab.memory import MemoryBudgetError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help, --version, or a one-line usage error
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return int(args._run(args))
    except (UsageError, ValueError, TypeError, MemoryBudgetError) as exc:
        if args.traceback:
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"curvlab {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("curvlab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `curvlab problems | head`: the reader left; stop quietly
        _silence_stdout()
        return 0


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush cannot fail again."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (e.g. captured by a test)
        pass
    finally:
        os.close(devnull)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
