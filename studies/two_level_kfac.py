"""Two-level KFAC vs KFAC (Koroko et al. 2023, arXiv:2303.18083): energy errors and training curves.

    python studies/two_level_kfac.py [--quick]         # the same as `curvlab run two-level-kfac [--quick]`

Change the grid by editing OVERRIDES (the keys `curvlab studies two-level-kfac` lists), e.g.
{"problems": ["digits-mlp-deep"], "damping": [1e-3, 1e-1], "seeds": 3}.
"""

import sys

import curvlab as cl

OVERRIDES: dict = {}

if __name__ == "__main__":
    ds = cl.studies.run("two-level-kfac", quick="--quick" in sys.argv[1:], progress=True, **OVERRIDES)
    print(cl.studies.format_verdicts(ds))
