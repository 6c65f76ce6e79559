"""Training with any curvature: one preconditioning ``torch.optim.Optimizer`` and short training runs.

    opt = cl.optim.make("kfac", model, loss_fn, lr=0.1, damping=1e-2)   # any method by name
    opt.step(X, y); opt.curvature(); opt.direction()
    ds = cl.optim.train(prob, "kbfgs", steps=200, batch_size=64, seed=0, checkpoints=[0, 100, 200])

Methods (:data:`METHODS`, :func:`names`): ``sgd``, ``adam``, ``rmsprop`` (torch's own), ``kfac``,
``ekfac``, ``tkfac``, ``tekfac``, ``foof`` (running averages, amortised inverses), ``ng``,
``ng-block`` (exact subsampled natural gradient by Woodbury), ``newton``, ``newton-block`` (exact
damped Hessian), ``kbfgs``, ``kbfgs-l`` (Kronecker-factored quasi-Newton). See
:mod:`curvlab.optim.methods` for every option and its default.
"""

from curvlab.optim.methods import METHODS, TrainingMethod, make, names
from curvlab.optim.optimizer import CurvatureOptimizer, TorchOptimizer
from curvlab.optim.preconditioners import (
    ExactPreconditioner,
    KBFGSPreconditioner,
    KroneckerPreconditioner,
    Preconditioner,
)
from curvlab.optim.train import batches, train

__all__ = ["make", "train", "names", "METHODS", "TrainingMethod", "CurvatureOptimizer", "TorchOptimizer",
           "Preconditioner", "KroneckerPreconditioner", "ExactPreconditioner", "KBFGSPreconditioner", "batches"]
