"""K-BFGS on the digits ReLU autoencoder (Goldfarb, Ren & Bahamou 2020, arXiv:2006.08877).

    python studies/kbfgs_autoencoder.py [--quick]      # the same as `curvlab run kbfgs-autoencoder [--quick]`

Change the grid by editing OVERRIDES (the keys `curvlab studies kbfgs-autoencoder` lists), e.g.
{"epochs": 20, "grid": {"kbfgs": {"lr": [1.0], "damping": [1e-3]}, "adam": {"lr": [1e-2]}}}.
"""

import curvlab as cl

OVERRIDES: dict = {}

if __name__ == "__main__":
    cl.studies.script("kbfgs-autoencoder", OVERRIDES)   # --quick, --out FOLDER, --processes N, --restart
