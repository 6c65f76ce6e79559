"""kfac-vs-newton (Benzing 2022, arXiv:2201.12250): KFAC vs exact natural gradient vs FOOF on digits.

The same as ``curvlab run kfac-vs-newton``: ``python studies/kfac_vs_newton.py [--quick] [--processes N]``
writes data/results/kfac-vs-newton[-quick].nc and its figures and prints the verdicts. Edit OVERRIDES
to change the grid (the keys: ``curvlab studies kfac-vs-newton``).
"""

import curvlab as cl

OVERRIDES: dict = {
    # "damping": [1e-4, 1e-2, 1.0],                  # the λ of the direction comparisons
    # "problem": "digits-autoencoder", "n": 128,     # another canned problem (curvature batch of n samples)
}

if __name__ == "__main__":
    cl.studies.script("kfac-vs-newton", OVERRIDES)   # --quick, --out FOLDER, --processes N, --restart
