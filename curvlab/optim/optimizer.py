"""One ``torch.optim.Optimizer`` that preconditions the gradient with any curvature method.

    opt = cl.optim.make("kfac", model, loss_fn, lr=0.05, damping=1e-2)
    for X, y in batches:
        opt.step(X, y)                 # or opt.step(closure=lambda: (X, y))
    opt.curvature()                    # the CurvatureMatrix in use (aligned with the oracle's blocks)
    opt.direction()                    # the direction of the last step; opt.direction(X, y): for that batch

One step on a minibatch (X, y) at parameters θ:

1. the batch loss and gradient g (the user's loss on the batch; from the preconditioner's statistics
   pass where it makes one on the step batch), plus weight decay: g ← g + τθ;
2. the preconditioner refreshes its statistics from the curvature batch (the step batch, or a
   seeded fraction of it: ``curvature_fraction``) and gives the direction d (e.g. −(C + λI)⁻¹g);
3. KL-clipping (Ba, Grosse & Martens 2017; the KFAC implementations of Koroko et al. 2023):
   d ← ν d with ν = min(1, √(κ / (η² |dᵀg|))), so the quadratic change of the step, η²ν²|dᵀg|
   (= η²‖νd‖²_C for d = −C⁻¹g, the KL divergence to second order for a Fisher C), is at most κ;
4. momentum μ: heavy ball on the direction, b ← μ b + d (the step is η b) — or, for K-BFGS, an
   exponential average of the gradient before step 2 (ḡ ← μ ḡ + (1 − μ) g), as its authors do;
5. θ ← θ + η b, written into the model's parameters; K-BFGS then takes its second pass.

The model is updated in place; the curvature is computed through :class:`curvlab.Problem`
(``functional_call`` at the flat θ), so every method sees exactly the parameters being trained.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.capture import forget_model_holds, note_model_holds
from curvlab.linalg import CurvatureMatrix, Diagonal
from curvlab.linalg.base import all_finite
from curvlab.optim.preconditioners import Preconditioner
from curvlab.problem import Problem

__all__ = ["CurvatureOptimizer", "TorchOptimizer"]


def _check_number(value: Any, what: str, low: float = 0.0, low_open: bool = False,
                  high: float | None = None) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a number; got {type(value).__name__} {value!r}") from None
    bad = not math.isfinite(x) or x < low or (low_open and x == low) or (high is not None and x > high)
    if bad:
        bound = f"{'>' if low_open else '≥'} {low}" + (f" and ≤ {high}" if high is not None else "")
        raise ValueError(f"{what} must be finite and {bound}; got {value!r}")
    return x


class _BatchOptimizer(torch.optim.Optimizer):
    """What every curvlab optimizer shares: the model, its loss, minibatch problems at the current θ."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module, method: str, defaults: dict[str, Any]) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"model {type(model).__name__} has no trainable parameters")
        super().__init__(params, defaults)
        self.model, self.loss_fn, self.method = model, loss_fn, method
        from curvlab.losses import likelihood_for

        likelihood_for(loss_fn)  # an unsupported loss raises here, before any step
        self._problem: Problem | None = None
        self._last_direction: Tensor | None = None
        self.steps_taken = 0

    def _batch(self, X: Tensor | None, y: Tensor | None, closure: Callable | None) -> tuple[Tensor, Tensor]:
        if X is None and closure is not None:
            out = closure()
            if not (isinstance(out, tuple) and len(out) == 2):
                raise ValueError(f"{self.method}: the closure must return the minibatch (X, y) (curvature methods "
                                 "need the batch, not only a loss); or call opt.step(X, y)")
            X, y = out
        if X is None or y is None:
            raise ValueError(f"{self.method}: step needs a minibatch: opt.step(X, y) or "
                             "opt.step(closure=lambda: (X, y))")
        return X, y

    def theta(self) -> Tensor:
        """Return the model's trainable parameters as one flat vector (parameter order)."""
        return torch.cat([p.detach().reshape(-1) for g in self.param_groups for p in g["params"]])

    def _set_theta(self, theta: Tensor) -> None:
        params = [p for group in self.param_groups for p in group["params"]]
        pieces = torch.split(theta, [p.numel() for p in params])
        with torch.no_grad():
            torch._foreach_copy_(params, [v.view_as(p) for v, p in zip(pieces, params)])

    def problem(self, X: Tensor, y: Tensor) -> Problem:
        """Return the minibatch as a :class:`~curvlab.Problem` at the model's current parameters."""
        if self._problem is None:
            self._problem = Problem(self.model, self.loss_fn, X, y, name=type(self.model).__name__)
            names = [n for n, p in self.model.named_parameters() if p.requires_grad]
            if names != self._problem.param_names:  # pragma: no cover - defensive
                raise RuntimeError("the optimizer's parameters are not the model's trainable parameters in order")
            return self._problem
        return self._problem.with_batch(X, y, self.theta())


class CurvatureOptimizer(_BatchOptimizer):
    """A preconditioned gradient method (see the module docstring). Build it with :func:`curvlab.optim.make`.

    Parameters
    ----------
    model, loss_fn:
        the network (updated in place) and a supported loss (CrossEntropyLoss, MSELoss, BCEWithLogitsLoss).
    preconditioner:
        the method's state (:mod:`curvlab.optim.preconditioners`).
    lr, momentum, weight_decay, kl_clip:
        η > 0, μ ∈ [0, 1), τ ≥ 0, κ > 0 or None (no clipping).
    curvature_fraction:
        the share of each step batch its curvature is computed on (1: the whole batch; else the first
        ⌈f·N⌉ samples of a permutation drawn from ``seed`` and the step number).
    """

    def __init__(self, model: nn.Module, loss_fn: nn.Module, preconditioner: Preconditioner, method: str,
                 lr: float, momentum: float = 0.0, weight_decay: float = 0.0, kl_clip: float | None = None,
                 curvature_fraction: float = 1.0, seed: int = 0) -> None:
        lr = _check_number(lr, "lr", low_open=True)
        momentum = _check_number(momentum, "momentum", high=1.0)
        if momentum == 1.0:
            raise ValueError("momentum must be < 1; got 1.0")
        weight_decay = _check_number(weight_decay, "weight_decay")
        if kl_clip is not None:
            kl_clip = _check_number(kl_clip, "kl_clip", low_open=True)
        curvature_fraction = _check_number(curvature_fraction, "curvature_fraction", low_open=True, high=1.0)
        super().__init__(model, loss_fn, method, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})
        self.preconditioner = preconditioner
        self.kl_clip, self.curvature_fraction, self.seed = kl_clip, curvature_fraction, int(seed)
        self._buffer: Tensor | None = None
        self.last_loss: float | None = None
        self.last_clip: float = 1.0
        #: every option in effect, the method's defaults included (filled by :func:`curvlab.optim.make`)
        self.options: dict[str, Any] = {}

    @property
    def lr(self) -> float:
        """The learning rate η (of the first parameter group)."""
        return self.param_groups[0]["lr"]

    def _curvature_batch(self, batch: Problem) -> Problem:
        if self.curvature_fraction >= 1.0:
            return batch
        n = max(1, math.ceil(self.curvature_fraction * batch.num_samples))
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.steps_taken)
        idx = torch.randperm(batch.num_samples, generator=gen)[:n].to(batch.X.device)
        return batch.with_batch(batch.X[idx], batch.y[idx])

    def _gradient(self, batch: Problem, curvature_batch: Problem) -> tuple[float, Tensor]:
        out = self.preconditioner.loss_and_gradient(batch, self.steps_taken, curvature_batch)
        if out is None:
            theta = batch.theta.detach().requires_grad_(True)
            with torch.enable_grad():
                loss = batch.loss_tensor(theta)
                (g,) = torch.autograd.grad(loss, theta)
            out = (float(loss.detach()), g)
        return out

    def _momentum_direction(self, g: Tensor) -> Tensor:
        group = self.param_groups[0]
        mu = group["momentum"]
        if self.preconditioner.momentum_on == "gradient":
            self._buffer = g.clone() if self._buffer is None or mu == 0 else mu * self._buffer + (1 - mu) * g
            return self._clipped(self.preconditioner.direction(self._buffer), g)
        d = self._clipped(self.preconditioner.direction(g), g)
        self._buffer = d if self._buffer is None or mu == 0 else torch.add(d, self._buffer, alpha=mu)
        return self._buffer

    def _clipped(self, d: Tensor, g: Tensor) -> Tensor:
        self.last_clip = 1.0
        if self.kl_clip is not None:
            quad = self.lr**2 * abs(float(d @ g))
            if quad > self.kl_clip:
                self.last_clip = math.sqrt(self.kl_clip / quad)
        return d if self.last_clip == 1.0 else d * self.last_clip

    def step(self, X: Tensor | None = None, y: Tensor | None = None, closure: Callable | None = None) -> float:
        """One update on the minibatch (X, y) (or the (X, y) a closure returns); returns the batch loss.

        Within the step the model's parameters are noted to hold the batch's θ, then the new θ
        (:func:`curvlab.capture.note_model_holds`), so the plain passes need not compare them.
        """
        try:
            return self._step(X, y, closure)
        finally:
            forget_model_holds(self.model)

    def _step(self, X: Tensor | None, y: Tensor | None, closure: Callable | None) -> float:
        X, y = self._batch(X, y, closure)
        batch = self.problem(X, y)
        note_model_holds(self.model, batch.theta)  # batch.theta was just read off the parameters
        curvature_batch = self._curvature_batch(batch)
        loss, g = self._gradient(batch, curvature_batch)
        if not math.isfinite(loss) or not all_finite(g):
            raise FloatingPointError(f"{self.method}: the loss or gradient is not finite at step {self.steps_taken} "
                                     f"(loss {loss}); lower the learning rate or raise the damping")
        tau = self.param_groups[0]["weight_decay"]
        if tau:
            g = g + tau * batch.theta
        try:
            self.preconditioner.update(curvature_batch, self.steps_taken)
            d = self._momentum_direction(g)
        except FloatingPointError as e:  # non-finite statistics: the run has diverged
            raise FloatingPointError(f"{self.method}: step {self.steps_taken}: {e}; lower the learning rate or "
                                     "raise the damping") from e
        theta = torch.add(batch.theta, d, alpha=self.lr)
        if not all_finite(theta):  # checked before the model is written: nothing half-done
            raise FloatingPointError(f"{self.method}: the update is not finite at step {self.steps_taken} (the "
                                     "curvature's solve overflowed); lower the learning rate or raise the damping")
        self._set_theta(theta)
        note_model_holds(self.model, theta)
        self.preconditioner.after_step(batch, theta)
        self._last_direction, self.last_loss = d, loss
        self.steps_taken += 1
        return loss

    def curvature(self) -> CurvatureMatrix | None:
        """Return the CurvatureMatrix the method preconditions with now (None before the first step)."""
        return self.preconditioner.curvature()

    def direction(self, X: Tensor | None = None, y: Tensor | None = None) -> Tensor | None:
        """Return the update direction of the last step (Δθ / lr), or the one for a given batch.

        Given a batch (X, y), it is the direction the current curvature would take for that batch's
        gradient (without momentum, clipping or state updates).
        """
        if X is None:
            return self._last_direction
        if self.curvature() is None:
            raise ValueError(f"{self.method}: no curvature yet; take a step first")
        batch = self.problem(X, y)
        g = batch.gradient()
        tau = self.param_groups[0]["weight_decay"]
        return self.preconditioner.direction(g + tau * batch.theta if tau else g)

    def state_summary(self) -> dict[str, Any]:
        """Diagnostics: steps taken, the last KL-clipping factor, the preconditioner's counters."""
        return {"steps": self.steps_taken, "clip": self.last_clip, **self.preconditioner.state()}


class TorchOptimizer(_BatchOptimizer):
    """SGD, Adam or RMSprop — torch's own — with the same interface (``step(X, y)``, ``curvature()``).

    ``curvature()`` is the diagonal the method divides by: the identity for SGD, √v̂ + ε for Adam and
    √v + ε for RMSprop (v the running average of squared gradients; Adam's bias-corrected).
    """

    _CLASSES = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "rmsprop": torch.optim.RMSprop}

    def __init__(self, model: nn.Module, loss_fn: nn.Module, method: str, **options: Any) -> None:
        cls = self._CLASSES[method]
        inner = cls([p for p in model.parameters() if p.requires_grad], **options)  # torch checks its options
        super().__init__(model, loss_fn, method, dict(inner.defaults))
        self.inner = inner
        #: torch's options in effect (its defaults included), the scalar ones
        self.options = {k: v for k, v in inner.defaults.items() if isinstance(v, (bool, int, float, str, tuple))}
        self.param_groups = inner.param_groups
        self.state = inner.state
        self.last_loss: float | None = None

    @property
    def lr(self) -> float:
        """The learning rate (of the first parameter group, shared with torch's optimizer)."""
        return self.param_groups[0]["lr"]

    def step(self, X: Tensor | None = None, y: Tensor | None = None, closure: Callable | None = None) -> float:
        """One update of torch's optimizer on the minibatch; returns the batch loss."""
        X, y = self._batch(X, y, closure)
        if self._problem is None:
            self.problem(X, y)  # builds and checks the first batch
        else:
            self._problem.check_batch(X, y)  # the same checks, no problem built
        before = self.theta()
        self.inner.zero_grad()
        with torch.enable_grad():
            loss = self.loss_fn(self.model(X), y)
            loss.backward()
        if not bool(torch.isfinite(loss)):
            raise FloatingPointError(f"{self.method}: the loss is not finite at step {self.steps_taken}")
        self.inner.step()
        self._last_direction = (self.theta() - before) / self.lr
        self.last_loss = float(loss.detach())
        self.steps_taken += 1
        return self.last_loss

    def curvature(self) -> CurvatureMatrix | None:
        """Return the diagonal the method divides by: ones for SGD, √v̂ + ε for Adam, √v + ε for RMSprop.

        v is the running average of squared gradients (RMSprop's ``square_avg``, Adam's ``exp_avg_sq``)
        and v̂ = v / (1 − β₂ᵗ) Adam's bias-corrected one after t steps; None for Adam and RMSprop before
        the first step (no state yet).
        """
        theta = self.theta()
        if self.method == "sgd":
            return Diagonal(torch.ones_like(theta))
        if not self.state:
            return None
        group = self.param_groups[0]
        sq = torch.cat([self.state[p]["square_avg" if self.method == "rmsprop" else "exp_avg_sq"].reshape(-1)
                        for p in group["params"]])
        if self.method == "adam":
            step = float(self.state[group["params"][0]]["step"])
            sq = sq / (1 - group["betas"][1] ** step)
        return Diagonal(sq.sqrt() + group["eps"])

    def direction(self, X: Tensor | None = None, y: Tensor | None = None) -> Tensor | None:
        """Return the direction of the last step (Δθ / lr); for a batch: −g for SGD, −g/(√v̂ + ε) for Adam/RMSprop."""
        if X is None:
            return self._last_direction
        g = self.problem(X, y).gradient()
        C = self.curvature()
        return -g if C is None else -C.solve(g)
