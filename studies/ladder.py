"""The approximation ladder (full → block → Kronecker → Monte-Carlo → empirical) on every canned problem,
against the exact GGN and Hessian (claims L1–L3): the same as `curvlab run ladder`.

    python studies/ladder.py [--quick] [--out FOLDER]

Every configuration key and its default: curvlab/studies/ladder.py (STUDY.config).
"""

import argparse

import curvlab as cl

#: changes of the full configuration, e.g. {"problems": ["digits-mlp"], "checkpoints": [0, 100], "n": 512}
OVERRIDES: dict = {}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small configuration (well under a minute)")
    parser.add_argument("--out", default=None, help="results folder (default data/results)")
    args = parser.parse_args()
    ds = cl.studies.run("ladder", quick=args.quick, out=args.out, **OVERRIDES)
    print(cl.studies.format_verdicts(ds))
