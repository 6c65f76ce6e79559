"""Wolinski's GroupedNewton on digits (claims W1–W5): the same as `curvlab run grouped-newton`.

    python studies/grouped_newton.py [--quick] [--out FOLDER]

Every configuration key and its default: curvlab/studies/grouped_newton.py (STUDY.config).
"""

import curvlab as cl

#: changes of the full configuration, e.g. {"seeds": 3, "adam_lr": [0.01, 0.03], "steps": 400}
OVERRIDES: dict = {}

if __name__ == "__main__":
    cl.studies.script("grouped-newton", OVERRIDES)   # --quick, --out FOLDER, --processes N, --restart
