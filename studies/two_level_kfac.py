"""Two-level KFAC vs KFAC (Koroko et al. 2023, arXiv:2303.18083): energy errors and training curves.

    python studies/two_level_kfac.py [--quick]         # the same as `curvlab run two-level-kfac [--quick]`

Change the grid by editing OVERRIDES (the keys `curvlab studies two-level-kfac` lists), e.g.
{"problems": ["digits-mlp-deep"], "damping": [1e-3, 1e-1], "seeds": 3}.
"""

import curvlab as cl

OVERRIDES: dict = {}

if __name__ == "__main__":
    cl.studies.script("two-level-kfac", OVERRIDES)   # --quick, --out FOLDER, --processes N, --restart
