"""kfac-vs-newton (Benzing 2022, arXiv:2201.12250): KFAC vs exact natural gradient vs FOOF on digits.

The same as ``curvlab run kfac-vs-newton``: ``python studies/kfac_vs_newton.py [--quick] [--processes N]``
writes data/results/kfac-vs-newton[-quick].nc and its figures and prints the verdicts. Edit OVERRIDES
to change the grid (the keys: ``curvlab studies kfac-vs-newton``).
"""

import argparse

import curvlab as cl

OVERRIDES: dict = {
    # "damping": [1e-4, 1e-2, 1.0],                  # the λ of the direction comparisons
    # "problem": "digits-autoencoder", "n": 128,     # another canned problem (curvature batch of n samples)
}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small grid (about a minute)")
    parser.add_argument("--processes", type=int, default=None, help="run the cells in N worker processes")
    args = parser.parse_args()
    executor = None if args.processes is None else f"processes:{args.processes}"
    ds = cl.studies.run("kfac-vs-newton", quick=args.quick, executor=executor, **OVERRIDES)
    print(cl.studies.format_verdicts(ds))
