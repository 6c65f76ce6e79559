"""Wolinski's GroupedNewton on digits (claims W1–W5): the same as `curvlab run grouped-newton`.

    python studies/grouped_newton.py [--quick] [--out FOLDER]

Every configuration key and its default: curvlab/studies/grouped_newton.py (STUDY.config).
"""

import argparse

import curvlab as cl

#: changes of the full configuration, e.g. {"seeds": 3, "adam_lr": [0.01, 0.03], "steps": 400}
OVERRIDES: dict = {}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small configuration (about a minute)")
    parser.add_argument("--out", default=None, help="results folder (default data/results)")
    args = parser.parse_args()
    ds = cl.studies.run("grouped-newton", quick=args.quick, out=args.out, **OVERRIDES)
    print(cl.studies.format_verdicts(ds))
