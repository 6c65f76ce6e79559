"""trace-restricted (TKFAC arXiv:2011.10741, TEKFAC arXiv:2011.13609, EKFAC arXiv:1806.03884) on digits.

The same as ``curvlab run trace-restricted``: ``python studies/trace_restricted.py [--quick] [--processes N]``
writes data/results/trace-restricted[-quick].nc and its figures and prints the verdicts. Edit OVERRIDES
to change the grid (the keys: ``curvlab studies trace-restricted``).
"""

import curvlab as cl

OVERRIDES: dict = {
    # "fishers": ["ggn"],                            # only the true Fisher (GGN), not the empirical Fisher
    # "train_seeds": 10, "lr": 0.05,                 # the training comparison (T4)
}

if __name__ == "__main__":
    cl.studies.script("trace-restricted", OVERRIDES)   # --quick, --out FOLDER, --processes N, --restart
