"""The approximation ladder (full → block → Kronecker → Monte-Carlo → empirical) on every canned problem,
against the exact GGN and Hessian (claims L1–L4): the same as `curvlab run ladder`.

    python studies/ladder.py [--quick] [--out FOLDER]

Every configuration key and its default: curvlab/studies/ladder.py (STUDY.config).
"""

import curvlab as cl

#: changes of the full configuration, e.g. {"problems": ["digits-mlp"], "checkpoints": [0, 100], "n": 512}
OVERRIDES: dict = {}

if __name__ == "__main__":
    cl.studies.script("ladder", OVERRIDES)   # --quick, --out FOLDER, --processes N, --restart
