"""trace-restricted (TKFAC arXiv:2011.10741, TEKFAC arXiv:2011.13609, EKFAC arXiv:1806.03884) on digits.

The same as ``curvlab run trace-restricted``: ``python studies/trace_restricted.py [--quick] [--processes N]``
writes data/results/trace-restricted[-quick].nc and its figures and prints the verdicts. Edit OVERRIDES
to change the grid (the keys: ``curvlab studies trace-restricted``).
"""

import argparse

import curvlab as cl

OVERRIDES: dict = {
    # "fishers": ["ggn"],                            # only the true Fisher (GGN), not the empirical Fisher
    # "train_seeds": 10, "lr": 0.05,                 # the training comparison (T4)
}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small grid (about a minute)")
    parser.add_argument("--processes", type=int, default=None, help="run the cells in N worker processes")
    args = parser.parse_args()
    executor = None if args.processes is None else f"processes:{args.processes}"
    ds = cl.studies.run("trace-restricted", quick=args.quick, executor=executor, **OVERRIDES)
    print(cl.studies.format_verdicts(ds))
