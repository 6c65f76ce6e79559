"""The ``curvlab`` command line: one small function per subcommand, all registered in :data:`COMMANDS`.

    curvlab problems                      the canned problems
    curvlab methods                       the method names compare accepts: what each is, structure, damping
    curvlab oracle NAME [--n N] ...       a problem's exact curvature: traces, top eigenvalues, timings
    curvlab compare NAME [--methods ...]  agreement report (netCDF + figures under data/results/)
    curvlab plot FILE.nc                  redraw a saved report's (or study's) figures beside it
    curvlab studies [NAME]                the canned studies (NAME: its configuration and claims)
    curvlab run NAME [--quick] [--set k=v] [--dask ADDR|local] [--processes N] [--restart] [--out DIR]
                                          run a study (resumable; netCDF, figures, verdict table)

Adding a subcommand: write ``_configure_x(parser)`` (its arguments; :func:`add_problem_arguments`
gives the usual NAME/--n/--seed/--dtype) and ``_run_x(args) -> int`` (prints to stdout, returns the
exit status), and append ``Command("x", "one-line help", _configure_x, _run_x)`` to ``COMMANDS``.

User errors — bad arguments, an unknown problem, a bad ``CURVLAB_MAX_DENSE_BYTES``, a matrix over the
memory budget, a file that cannot be read or written, any ``ValueError`` or ``TypeError`` raised while
running — print one line to stderr and exit with status 2; pass ``--traceback`` (before the
subcommand) to see the full traceback instead. Every argument is checked before any computation.
Warnings are printed as one line each (``curvlab CMD: warning: …``), without source lines.
``oracle`` and ``compare`` draw a progress bar with the time left on stderr (one tick per stage: a
matrix built, its eigenvalues, a table) when stdout and stderr are terminals, and nothing otherwise
or with ``--quiet``.

Only the standard library and torch are imported at start-up; everything heavy (xarray,
matplotlib, seaborn, scipy) is imported by the subcommand that needs it, so ``curvlab --help`` and
``curvlab problems`` cost little more than ``import torch``.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
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


def _int_at_least(low: int) -> Callable[[str], int]:
    """Return an argparse type: an integer ≥ ``low`` (one-line error otherwise)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}; got {value}")
        return value

    parse.__name__ = f"int >= {low}"
    return parse


def _dpi(text: str) -> int:
    """Return an argparse type: a resolution within ``curvlab.plot.DPI_RANGE``."""
    from curvlab.plot import DPI_RANGE

    value = _int_at_least(1)(text)
    if not DPI_RANGE[0] <= value <= DPI_RANGE[1]:
        raise argparse.ArgumentTypeError(f"must be from {DPI_RANGE[0]} to {DPI_RANGE[1]}; got {value}")
    return value


class _HelpFormatter(argparse.HelpFormatter):
    """Help text wrapped between words only: method names such as ``kfac-exact`` stay whole."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        import textwrap

        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


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
    parser.add_argument("--n", type=_int_at_least(1), default=problems.DEFAULT_N,
                        help=f"number of samples (default {problems.DEFAULT_N})")
    parser.add_argument("--seed", type=_int_at_least(0), default=0,
                        help="data subset and initialisation seed (default 0)")
    parser.add_argument("--dtype", choices=list(_DTYPES), default="float64", help="default float64")


def problem_from_args(args: argparse.Namespace) -> Any:
    """Return the :class:`curvlab.Problem` that :func:`add_problem_arguments`' arguments name."""
    from curvlab import problems

    return problems.load(args.name, n=args.n, seed=args.seed, dtype=_DTYPES[args.dtype])


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[bool] | None = None) -> str:
    """Return a plain aligned text table; ``right[j]`` right-aligns column j (default: all but the first)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[j]) for r in cells) for j in range(len(headers))]
    right = [j > 0 for j in range(len(headers))] if right is None else list(right)

    def line(r: list[str]) -> str:
        return "  ".join(c.rjust(w) if rj else c.ljust(w) for c, w, rj in zip(r, widths, right)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def _sci(x: float) -> str:
    return f"{x: .3e}"


def show_progress(args: argparse.Namespace) -> bool:
    """Return whether a command draws a progress bar.

    It does when not ``--quiet`` and both stderr (where the bar goes) and stdout are terminals, so that
    piped or redirected output carries no bar.
    """
    return not getattr(args, "quiet", False) and _is_terminal(sys.stderr) and _is_terminal(sys.stdout)


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or unusual stream
        return False


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


# ---------------------------------------------------------------------------- curvlab methods
#: what each damping rule of the method registry means (``mode`` of ``C.direction``)
_DAMPING_RULES = {
    "exact": "(C + λI)⁻¹",
    "pi": "π-damping (A + π√λ I) ⊗ (G + √λ/π I)",
    "factored": "factored (A + √λI) ⊗ (G + √λI)",
    "trace": "trace-normalised factored (TKFAC)",
}


def _configure_methods(parser: argparse.ArgumentParser) -> None:
    pass


def _damping_rule(name: str, spec: Any) -> str:
    """Return a registry entry's damping rule in words; "own" is the method's paper's rule (see curvlab.approx)."""
    if spec.family == "first-order":
        return "none (x = −g)"
    if spec.mode != "own":
        return _DAMPING_RULES.get(spec.mode, spec.mode)
    from curvlab.approx.base import OWN_MODES

    own = OWN_MODES.get(name.split("-")[0])
    return f"own: {_DAMPING_RULES[own]}" if own else "own (the method's paper)"


def _run_methods(args: argparse.Namespace) -> int:
    from curvlab.compare import methods

    rows = [[name, spec.family, spec.structure, _damping_rule(name, spec), spec.description]
            for name, spec in methods.REGISTRY.items()]
    print(format_table(["name", "family", "structure", "damping rule", "what it is"], rows,
                       right=[False] * 5))
    aliases = ", ".join(f"{a} = {n}" for a, n in methods.ALIASES.items())
    print(f"\nalso accepted: {aliases}\n`compare --damping-rule exact` replaces every 'own' rule by (C + λI)⁻¹; "
          "references (--references) must be matrices (not sgd)")
    return 0


# ---------------------------------------------------------------------------- curvlab oracle
_ORACLE_KINDS = ("hessian", "ggn", "fisher_mc", "empirical_fisher")
#: registry name (curvlab.compare.methods, which also resolves its aliases) → oracle kind
_REGISTRY_KINDS = {"hessian": "hessian", "ggn": "ggn", "fisher-mc": "fisher_mc", "ef": "empirical_fisher"}


def _configure_oracle(parser: argparse.ArgumentParser) -> None:
    add_problem_arguments(parser)
    parser.add_argument("--kinds", default="hessian,ggn,empirical_fisher",
                        help="comma-separated curvatures among " + ", ".join(_ORACLE_KINDS)
                        + " (also ef, fisher-mc, newton, gn …; default hessian,ggn,empirical_fisher)")
    parser.add_argument("--mc-samples", type=_int_at_least(1), default=1,
                        help="labels drawn per input for fisher_mc (default 1)")
    parser.add_argument("--top", type=_int_at_least(1), default=5,
                        help="how many top eigenvalues to show (default 5)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (shown only on a terminal)")


def _parse_kinds(text: str) -> list[str]:
    from curvlab.compare.methods import canonical

    kinds, bad = [], []
    for k in (k.strip() for k in text.split(",")):
        if not k:
            continue
        try:
            kinds.append(_REGISTRY_KINDS[canonical(k)])
        except (ValueError, KeyError):
            bad.append(k)
    if bad or not kinds:
        raise UsageError(f"--kinds: unknown curvature {', '.join(bad) or repr(text)}; use "
                         + ", ".join(_ORACLE_KINDS) + " (or ef, fisher-mc)")
    return list(dict.fromkeys(kinds))


def _run_oracle(args: argparse.Namespace) -> int:
    from curvlab import exact

    kinds = _parse_kinds(args.kinds)
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

    bar = _stage_bar(2 * len(kinds), f"oracle {prob.name}") if show_progress(args) else None
    rows = []
    for kind in kinds:
        kwargs = {"samples": args.mc_samples, "seed": args.seed} if kind == "fisher_mc" else {}
        _stage(bar, f"building {kind}")
        t0 = time.perf_counter()
        C = exact.get(kind)(prob, structure="full", **kwargs)
        t1 = time.perf_counter()
        _stage(bar, f"eigenvalues of {kind}", done=1)
        ev = C.eigvalsh()
        t2 = time.perf_counter()
        _stage(bar, "", done=1)
        scale = float(ev.abs().max())
        negative = int((ev < -1e-10 * scale).sum())
        top = ev.flip(0)[: args.top].tolist()
        rows.append([kind, _sci(float(C.trace())), " ".join(_sci(v) for v in top), negative,
                     f"{t1 - t0:.2f}", f"{t2 - t1:.2f}"])
        del C, ev  # one dense matrix at a time
    if bar is not None:
        bar.close()
    print(format_table(["curvature (full)", "trace", f"top-{args.top} eigenvalues", "#neg", "build s",
                        "eigvalsh s"], rows, right=[False, True, False, True, True, True]))
    return 0


def _stage_bar(total: int, desc: str) -> Any:
    """Return a tqdm progress bar on stderr counting stages, with the time left (tqdm is imported here, on use)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="stage", file=sys.stderr, leave=False, dynamic_ncols=True)


def _stage(bar: Any, msg: str, done: int = 0) -> None:
    """Count ``done`` finished stages and show the next one's message (nothing without a bar)."""
    if bar is not None:
        bar.update(done)
        if msg:
            bar.set_postfix_str(msg)


# ---------------------------------------------------------------------------- curvlab compare
def _method_names_help() -> tuple[str, str]:
    """(every method name, the matrix ones usable as references), for ``compare --help``."""
    from curvlab.compare.methods import REGISTRY

    return (", ".join(REGISTRY), ", ".join(n for n, s in REGISTRY.items() if s.family != "first-order"))


def _configure_compare(parser: argparse.ArgumentParser) -> None:
    from curvlab.compare.methods import DEFAULT_METHODS

    names, matrices = _method_names_help()
    add_problem_arguments(parser)
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help="comma-separated method names (default: " + ", ".join(DEFAULT_METHODS)
                        + "); valid: " + names + " (`curvlab methods` says what each is)")
    parser.add_argument("--references", default="ggn",
                        help="comma-separated matrices to compare against (default ggn); valid: " + matrices)
    parser.add_argument("--damping", default="1e-3,1e-2,1e-1", help="comma-separated dampings (default 1e-3,1e-2,1e-1)")
    parser.add_argument("--k", type=_int_at_least(1), default=20,
                        help="top eigenpairs for ratios and overlaps (default 20)")
    parser.add_argument("--damping-rule", choices=["own", "exact"], default="own",
                        help="own: each method's damping rule (KFAC: pi); exact: (C + λI)⁻¹ for all (default own)")
    parser.add_argument("--step", default="armijo",
                        help="step size for the loss changes: armijo, model, or a learning rate (default armijo)")
    parser.add_argument("--mc-samples", type=_int_at_least(1), default=1,
                        help="labels per input for Monte-Carlo methods (default 1)")
    parser.add_argument("--top-only", action="store_true",
                        help="top-k eigenpairs only (no full spectra: faster for large P)")
    parser.add_argument("--out", default=None, help="netCDF file to write (default data/results/NAME-compare.nc)")
    parser.add_argument("--no-figures", action="store_true", help="do not draw the PNG figures")
    parser.add_argument("--dpi", type=_dpi, default=130, help="resolution of the PNG figures (default 130)")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bar (it is shown only when stdout and stderr are terminals)")


def _csv(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UsageError(f"{what}: give at least one value; got {text!r}")
    return items


def _compare_options(args: argparse.Namespace) -> dict[str, Any]:
    """Return the report's keyword arguments from the command line, all checked (nothing is computed)."""
    from curvlab.compare.report import check_arguments

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
    options = dict(methods=_csv(args.methods, "--methods"), damping=dampings,
                   references=_csv(args.references, "--references"), k=args.k, damping_rule=args.damping_rule,
                   step=step, mc_samples=args.mc_samples, seed=args.seed)
    check_arguments(**options)
    return options


def _run_compare(args: argparse.Namespace) -> int:
    from curvlab import plot
    from curvlab.compare.report import format_report, report, save

    options = _compare_options(args)
    out = Path(args.out) if args.out else Path("data") / "results" / f"{args.name}-compare.nc"
    prob = problem_from_args(args)
    _check_writable(out)  # before the report's minutes of work, not after
    t0 = time.perf_counter()
    ds = report(prob, full_spectrum=not args.top_only, skip_unavailable=True, progress=show_progress(args),
                **options)
    print(format_report(ds))
    try:
        path = save(ds, out)
        print(f"\nwrote {path}  ({time.perf_counter() - t0:.0f} s)")
        if not args.no_figures:
            for fig in plot.save_figures(ds, path.with_suffix(""), dpi=args.dpi):
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


# ---------------------------------------------------------------------------- curvlab studies
def _configure_studies(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", nargs="?", default=None,
                        help="show one study in full: its configuration (the keys --set accepts), quick "
                        "overrides and claims")


def _run_studies(args: argparse.Namespace) -> int:
    from curvlab import studies

    if args.name is not None:
        print(_describe_study(studies.get(args.name)))
        return 0
    rows = [[s.name, s.paper, s.description, ", ".join(c.id for c in s.claims)]
            for s in (studies.get(n) for n in studies.names())]
    print(format_table(["name", "paper", "description", "claims"], rows, right=[False] * 4))
    if not rows:
        print("(no studies registered)")
    return 0


def _describe_study(study: Any) -> str:
    """Return a study's configuration, quick overrides and claims, as ``curvlab studies NAME`` prints them."""
    import json

    lines = [f"{study.name}: {study.description}", f"paper: {study.paper}", "",
             "configuration (curvlab run NAME --set KEY=VALUE; --quick applies the second column):"]
    rows = [[k, json.dumps(v), json.dumps(study.quick[k]) if k in study.quick else ""]
            for k, v in study.config.items()]
    lines.append(format_table(["key", "full run", "--quick"], rows, right=[False] * 3))
    if study.claims:
        lines += ["", format_table(["claim", "statement", "criterion"],
                                   [[c.id, c.statement, c.criterion] for c in study.claims], right=[False] * 3)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- curvlab run
def _configure_run(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="a canned study (see `curvlab studies`)")
    parser.add_argument("--quick", action="store_true", help="the study's small grid (NAME-quick.nc)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="settings",
                        help="replace a configuration value (repeatable): JSON where it parses (1e-3, [1, 2], "
                        "true), a,b,c a list, else a string; `curvlab studies NAME` lists the keys")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--dask", metavar="ADDR|local", default=None, type=_dask_address,
                       help="run the cells on Dask: a scheduler address (tcp://host:8786) or local (a LocalCluster)")
    where.add_argument("--processes", type=_int_at_least(1), metavar="N", default=None,
                       help="run the cells in N worker processes")
    parser.add_argument("--restart", action="store_true",
                        help="discard the finished cells of an earlier run in the same folder and start over")
    parser.add_argument("--out", metavar="DIR", default=None, help="results folder (default data/results)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _dask_address(text: str) -> str:
    """Return an argparse type: ``local`` or a scheduler address ``[scheme://]host[:port]``."""
    import re

    if text == "local" or re.fullmatch(r"([a-z][a-z0-9+.-]*://)?[^\s:/]+(:\d+)?/?", text):
        return text
    raise argparse.ArgumentTypeError(f"expected local or a scheduler address such as tcp://host:8786; got {text!r}")


def _setting_value(text: str) -> Any:
    import json

    try:
        return json.loads(text)
    except ValueError:
        if "," in text:
            return [_setting_value(t.strip()) for t in text.split(",") if t.strip()]
        return text


def _parse_settings(items: Sequence[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` options as overrides (values parsed by :func:`_setting_value`)."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set: expected KEY=VALUE; got {item!r}")
        overrides[key.strip()] = _setting_value(value.strip())
    return overrides


def _executor_of(args: argparse.Namespace) -> str | None:
    if args.processes is not None:
        return f"processes:{args.processes}"
    if args.dask is None:
        return None
    if args.dask == "local":
        return "dask"
    return args.dask if "://" in args.dask else f"tcp://{args.dask}"


def _run_run(args: argparse.Namespace) -> int:
    from curvlab import studies
    from curvlab.studies import runner
    from curvlab.studies.study import BadOverride

    try:
        prepared = studies.prepare(args.name, quick=args.quick, out=args.out, **_parse_settings(args.settings))
    except BadOverride as exc:
        raise UsageError(f"--set: {exc}") from None
    _check_writable(prepared.path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", runner.CellFailedWarning)  # listed below, one line per cell
        try:
            ds = runner.execute(prepared, executor=_executor_of(args), restart=args.restart,
                                progress=False if args.quiet else None)
        except ModuleNotFoundError as exc:
            raise UsageError(str(exc)) from None
        except runner.StudyFailed as exc:
            print(f"curvlab run: error: {exc}", file=sys.stderr)
            return 1
    print(studies.format_verdicts(ds))
    print(f"\nwrote {prepared.path}")
    for fig in prepared.figure_paths:
        print(f"wrote {fig}")
    failures = studies.failed_cells(ds)
    for f in failures:
        print(f"curvlab run: failed cell {f['cell']}: {f['error']}", file=sys.stderr)
    return 1 if failures else 0


def _plot_study(path: Any, dpi: int) -> int | None:
    """Redraw a study's figures when ``path`` is a study's Dataset (``attrs["study"]``); None otherwise."""
    from curvlab import studies

    try:
        ds = studies.load(path) if path.is_file() else None
    except (OSError, ValueError, TypeError, KeyError):
        ds = None
    if ds is None or "study" not in ds.attrs:
        return None
    return _write_figures(studies.save_figures, ds, path, dpi, f"{path}: study {ds.attrs['study']!r} drew no figures")


def _write_figures(save: Any, ds: Any, path: Path, dpi: int, empty: str) -> int:
    """Write ``save(ds, path stem, dpi)``'s figures and print their names; ``empty``: the error when none."""
    try:
        written = save(ds, path.with_suffix(""), dpi=dpi)
    except OSError as exc:
        raise UsageError(f"cannot write the figures beside {path}: {exc}") from None
    if not written:
        raise UsageError(empty)
    for fig in written:
        print(f"wrote {fig}")
    return 0


# ---------------------------------------------------------------------------- curvlab plot
def _configure_plot(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE.nc", help="a report written by `curvlab compare`")
    parser.add_argument("--dpi", type=_dpi, default=130, help="resolution of the PNGs (default 130)")


def _load_report(path: Any) -> Any:
    """Return the report in ``path``, or a one-line UsageError: missing, unreadable, or not a report."""
    from curvlab import plot
    from curvlab.compare.report import load

    if path.is_dir():
        raise UsageError(f"{path} is a folder; give a report file (FILE.nc) written by `curvlab compare`")
    if not path.is_file():
        raise UsageError(f"no such file: {path}")
    with warnings.catch_warnings(record=True) as caught:  # a foreign file's reader warnings: moot if refused
        warnings.simplefilter("always")
        try:
            ds = load(path)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise UsageError(f"cannot read {path} as netCDF: {exc}") from None
        try:
            plot.check_report(ds)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"{path}: {exc}") from None
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return ds


def _run_plot(args: argparse.Namespace) -> int:
    from curvlab import plot

    path = Path(args.file)
    if (status := _plot_study(path, args.dpi)) is not None:  # a study's Dataset: its own figures
        return status
    return _write_figures(plot.save_figures, _load_report(path), path, args.dpi,
                          f"{path} holds no variables these figures draw (is it a `curvlab compare` report?)")


# ---------------------------------------------------------------------------- registry and entry point
#: Every subcommand, in the order ``curvlab --help`` lists them.
COMMANDS: list[Command] = [
    Command("problems", "list the canned problems", _configure_problems, _run_problems),
    Command("methods", "list the method names compare accepts: what each is, its structure and damping rule",
            _configure_methods, _run_methods),
    Command("oracle", "summarise a problem's exact Hessian, GGN and empirical Fisher", _configure_oracle,
            _run_oracle),
    Command("compare", "agreement report: KFAC family vs exact curvature (matrices, spectra, directions)",
            _configure_compare, _run_compare),
    Command("plot", "draw the figures of a saved report (PNGs beside FILE.nc)", _configure_plot, _run_plot),
    Command("studies", "list the canned studies (NAME: one study's configuration and claims)", _configure_studies,
            _run_studies),
    Command("run", "run a canned study: resumable, on processes or Dask; netCDF, figures and verdicts",
            _configure_run, _run_run),
]


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with one subparser per entry of :data:`COMMANDS`."""
    from curvlab import __version__

    parser = _Parser(prog="curvlab", description="Exact curvature of small networks vs the KFAC family.",
                     formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"curvlab {__version__}")
    parser.add_argument("--traceback", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help, formatter_class=_HelpFormatter)
        cmd.configure(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``curvlab ARGV``; returns the exit status (0 success, 2 user error, 130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help, --version, or a one-line usage error
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning(args.command)
        return _dispatch(args)


def _dispatch(args: argparse.Namespace) -> int:
    """Run the parsed subcommand; user errors become one line on stderr and status 2."""
    from curvlab import memory

    try:
        memory.get_budget()  # a bad CURVLAB_MAX_DENSE_BYTES is a user error, reported before any work
        return int(args._run(args))
    except (UsageError, ValueError, TypeError, OSError, MemoryError) as exc:
        if isinstance(exc, BrokenPipeError):  # `curvlab problems | head`: the reader left; stop quietly
            _silence_stdout()
            return 0
        if args.traceback:
            raise
        text = str(exc).strip()
        msg = text.splitlines()[0] if text else type(exc).__name__
        if type(exc) is MemoryError:  # a real allocation failure, not curvlab's budget
            msg = f"out of memory ({msg}): use a smaller --n, a cheaper structure or fewer methods"
        print(f"curvlab {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("curvlab: interrupted", file=sys.stderr)
        return 130


def _one_line_warning(command: str) -> Callable[..., None]:
    """Return a ``warnings.showwarning`` that prints ``curvlab COMMAND: warning: message`` (no source line)."""

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
             line: str | None = None) -> None:
        text = str(message).strip()
        first = text.splitlines()[0] if text else category.__name__
        print(f"curvlab {command}: warning: {first}", file=sys.stderr if file is None else file)

    return show


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
