"""The likelihoods behind the supported losses.

Every supported loss is the negative log-likelihood of an exponential-family model over the
network output ``f`` (up to scale and constants).  curvlab writes the user's loss as

    L(θ) = R · Σ_n ℓ_n,     ℓ_n = sample n's *summed* unreduced loss,

with ``R = 1/(number of unreduced loss terms)`` for ``reduction="mean"`` (1/N for cross-entropy,
1/(N·D) for ``MSELoss`` and ``BCEWithLogitsLoss`` with D outputs per sample) and ``R = 1`` for
``"sum"`` (see ``shared/design.md``, "Scale").  For each loss this module gives, in closed form and
batched over samples:

* ``per_sample(f, y)``      ℓ_n, shape (N,)
* ``grad_output(f, y)``     ∇_f ℓ_n, shape of f
* ``hvp_output(f, u)``      ∇²_f ℓ_n · u_n, shape of f
* ``hessian_sqrt(f)``       S with Σ_k S_k S_kᵀ = ∇²_f ℓ_n, shape (k, *f.shape)
* ``sample(f, m, gen)``     m labels drawn from the likelihood ℓ_n is the negative log of

| loss | ℓ_n | ∇²_f ℓ_n | likelihood sampled |
|---|---|---|---|
| CrossEntropyLoss | −log softmax(f)_y | diag(p) − ppᵀ | Categorical(p) |
| MSELoss | ‖f − y‖² | 2 I | N(f, ½ I) |
| BCEWithLogitsLoss | Σ_d −y log σ(f) − (1−y) log(1−σ(f)) | diag(σ(1−σ)) | Bernoulli(σ(f)) |

These are the conventions of curvlinops (Dangel et al.), so results compare entry by entry.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["Likelihood", "CrossEntropy", "SquaredError", "BinaryCrossEntropy", "likelihood_for"]


class Likelihood:
    """Closed-form derivatives of one supported loss with respect to the network output."""

    name: str = ""

    def __init__(self, loss_fn: nn.Module) -> None:
        reduction = getattr(loss_fn, "reduction", None)
        if reduction not in ("mean", "sum"):
            raise ValueError(
                f"unsupported reduction {reduction!r} of {type(loss_fn).__name__}: curvlab supports "
                "reduction='mean' and reduction='sum' (use one of them; 'none' has no scalar loss)"
            )
        self.loss_fn = loss_fn
        self.reduction: str = reduction

    # -- shapes and scale -------------------------------------------------------------------
    def check(self, f: Tensor, y: Tensor) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def terms_per_sample(self, f: Tensor) -> int:
        """Number of unreduced loss terms of one sample (1 for CE, D for MSE/BCE)."""
        return 1

    def scale(self, f: Tensor) -> float:
        """R: the factor that turns Σ_n ℓ_n into the user's loss."""
        if self.reduction == "sum":
            return 1.0
        return 1.0 / (f.shape[0] * self.terms_per_sample(f))

    # -- derivatives -----------------------------------------------------------------------
    def per_sample(self, f: Tensor, y: Tensor) -> Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def grad_output(self, f: Tensor, y: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def hvp_output(self, f: Tensor, u: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def hessian_sqrt(self, f: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def sample(self, f: Tensor, m: int, generator: torch.Generator | None) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def sampled_grad_output(self, f: Tensor, m: int, generator: torch.Generator | None) -> Tensor:
        """∇_f ℓ_n(ŷ_s) for m labels ŷ_s drawn from the model's predictive; shape (m, *f.shape)."""
        ys = self.sample(f, m, generator)
        return self.grad_output(f, ys)  # every grad_output broadcasts over a leading sample axis

    def loss(self, f: Tensor, y: Tensor) -> Tensor:
        """The user's loss R Σ_n ℓ_n (equals ``loss_fn(f, y)``)."""
        return self.per_sample(f, y).sum() * self.scale(f)


def _flat_outputs(f: Tensor) -> Tensor:
    return f.reshape(f.shape[0], -1)


class CrossEntropy(Likelihood):
    """``nn.CrossEntropyLoss`` with integer class targets: ℓ_n = −log softmax(f_n)[y_n]."""

    name = "cross_entropy"

    def __init__(self, loss_fn: nn.CrossEntropyLoss) -> None:
        super().__init__(loss_fn)
        if loss_fn.weight is not None:
            raise ValueError("CrossEntropyLoss(weight=...) is not supported: class weights break the "
                             "likelihood interpretation; reweight the data instead")
        if loss_fn.label_smoothing != 0.0:
            raise ValueError(f"CrossEntropyLoss(label_smoothing={loss_fn.label_smoothing}) is not "
                             "supported: use label_smoothing=0")

    def check(self, f: Tensor, y: Tensor) -> None:
        if f.ndim != 2:
            raise ValueError(f"CrossEntropyLoss needs model outputs of shape (N, C); got {tuple(f.shape)} "
                             "(flatten spatial outputs into the batch first)")
        if y.dtype != torch.long:
            raise TypeError(f"CrossEntropyLoss targets must be integer class indices (torch.long) of shape "
                            f"(N,); got dtype {y.dtype} (probability targets are not supported)")
        if y.shape != (f.shape[0],):
            raise ValueError(f"CrossEntropyLoss targets must have shape (N,) = ({f.shape[0]},); "
                             f"got {tuple(y.shape)}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= f.shape[1]):
            bad = y[(y < 0) | (y >= f.shape[1])][0].item()
            raise ValueError(f"CrossEntropyLoss target {bad} is outside [0, {f.shape[1]}) for a model "
                             f"with {f.shape[1]} outputs")

    def per_sample(self, f: Tensor, y: Tensor) -> Tensor:
        return -torch.log_softmax(f, dim=1).gather(1, y[:, None]).squeeze(1)

    def grad_output(self, f: Tensor, y: Tensor) -> Tensor:
        p = torch.softmax(f, dim=1)
        return p - torch.nn.functional.one_hot(y, f.shape[1]).to(p.dtype)

    def hvp_output(self, f: Tensor, u: Tensor) -> Tensor:
        p = torch.softmax(f, dim=1)
        return p * u - p * (p * u).sum(dim=1, keepdim=True)

    def hessian_sqrt(self, f: Tensor) -> Tensor:
        # S[c] = √p_c (e_c − p): Σ_c S_c S_cᵀ = diag(p) − 2ppᵀ + ppᵀ Σ_c p_c = diag(p) − ppᵀ.
        p = torch.softmax(f, dim=1)  # (N, C)
        sq = p.sqrt()
        eye = torch.eye(f.shape[1], dtype=f.dtype, device=f.device)
        return sq.T[:, :, None] * (eye[:, None, :] - p[None, :, :])  # (C, N, C)

    def sample(self, f: Tensor, m: int, generator: torch.Generator | None) -> Tensor:
        p = torch.softmax(f, dim=1)
        return torch.multinomial(p, m, replacement=True, generator=generator).T  # (m, N)

    def sampled_grad_output(self, f: Tensor, m: int, generator: torch.Generator | None) -> Tensor:
        # the same draws as sample(), with the softmax computed once: p − onehot(ŷ_s)
        p = torch.softmax(f, dim=1)
        ys = torch.multinomial(p, m, replacement=True, generator=generator).T  # (m, N)
        return p[None] - torch.nn.functional.one_hot(ys, f.shape[1]).to(p.dtype)


class SquaredError(Likelihood):
    """``nn.MSELoss``: ℓ_n = ‖f_n − y_n‖², the negative log-likelihood of N(f, ½I) up to constants."""

    name = "squared_error"

    def check(self, f: Tensor, y: Tensor) -> None:
        if not torch.is_floating_point(y):
            raise TypeError(f"MSELoss targets must be floating point; got dtype {y.dtype}")
        if y.shape != f.shape:
            raise ValueError(f"MSELoss targets must have the model output's shape {tuple(f.shape)}; "
                             f"got {tuple(y.shape)}")

    def terms_per_sample(self, f: Tensor) -> int:
        return math.prod(f.shape[1:])

    def per_sample(self, f: Tensor, y: Tensor) -> Tensor:
        return _flat_outputs((f - y) ** 2).sum(dim=1)

    def grad_output(self, f: Tensor, y: Tensor) -> Tensor:
        return 2.0 * (f - y)

    def hvp_output(self, f: Tensor, u: Tensor) -> Tensor:
        return 2.0 * u

    def hessian_sqrt(self, f: Tensor) -> Tensor:
        d = math.prod(f.shape[1:])
        eye = torch.eye(d, dtype=f.dtype, device=f.device) * math.sqrt(2.0)
        return eye[:, None, :].expand(d, f.shape[0], d).reshape(d, *f.shape)

    def sample(self, f: Tensor, m: int, generator: torch.Generator | None) -> Tensor:
        noise = torch.randn((m, *f.shape), generator=generator, dtype=f.dtype, device=f.device)
        return f[None] + math.sqrt(0.5) * noise


class BinaryCrossEntropy(Likelihood):
    """``nn.BCEWithLogitsLoss``: ℓ_n = Σ_d −y log σ(f) − (1−y) log(1−σ(f)), Bernoulli(σ(f)) likelihood."""

    name = "binary_cross_entropy"

    def __init__(self, loss_fn: nn.BCEWithLogitsLoss) -> None:
        super().__init__(loss_fn)
        if loss_fn.weight is not None or loss_fn.pos_weight is not None:
            raise ValueError("BCEWithLogitsLoss(weight=..., pos_weight=...) is not supported: weights "
                             "break the likelihood interpretation")

    def check(self, f: Tensor, y: Tensor) -> None:
        if not torch.is_floating_point(y):
            raise TypeError(f"BCEWithLogitsLoss targets must be floating point in [0, 1]; got dtype {y.dtype}")
        if y.shape != f.shape:
            raise ValueError(f"BCEWithLogitsLoss targets must have the model output's shape "
                             f"{tuple(f.shape)}; got {tuple(y.shape)}")
        if y.numel() and (float(y.min()) < 0.0 or float(y.max()) > 1.0):
            bad = y[(y < 0) | (y > 1)][0].item()
            raise ValueError(f"BCEWithLogitsLoss target {bad} is outside [0, 1]")

    def terms_per_sample(self, f: Tensor) -> int:
        return math.prod(f.shape[1:])

    def per_sample(self, f: Tensor, y: Tensor) -> Tensor:
        terms = torch.nn.functional.binary_cross_entropy_with_logits(f, y, reduction="none")
        return _flat_outputs(terms).sum(dim=1)

    def grad_output(self, f: Tensor, y: Tensor) -> Tensor:
        return torch.sigmoid(f) - y

    def hvp_output(self, f: Tensor, u: Tensor) -> Tensor:
        s = torch.sigmoid(f)
        return s * (1 - s) * u

    def hessian_sqrt(self, f: Tensor) -> Tensor:
        d = math.prod(f.shape[1:])
        s = torch.sigmoid(_flat_outputs(f))
        root = (s * (1 - s)).sqrt()  # (N, D)
        eye = torch.eye(d, dtype=f.dtype, device=f.device)
        return (eye[:, None, :] * root[None, :, :]).reshape(d, *f.shape)

    def sample(self, f: Tensor, m: int, generator: torch.Generator | None) -> Tensor:
        s = torch.sigmoid(f)
        u = torch.rand((m, *f.shape), generator=generator, dtype=f.dtype, device=f.device)
        return (u < s[None]).to(f.dtype)


_SUPPORTED = {
    nn.CrossEntropyLoss: CrossEntropy,
    nn.MSELoss: SquaredError,
    nn.BCEWithLogitsLoss: BinaryCrossEntropy,
}


def likelihood_for(loss_fn: nn.Module) -> Likelihood:
    """The :class:`Likelihood` of a loss module instance; a clear error for anything else."""
    if isinstance(loss_fn, type):
        raise TypeError(f"pass a loss *instance* such as {loss_fn.__name__}(), not the class")
    for cls, lik in _SUPPORTED.items():
        if type(loss_fn) is cls:
            return lik(loss_fn)
    names = ", ".join(c.__name__ for c in _SUPPORTED)
    raise TypeError(f"unsupported loss {type(loss_fn).__name__}: curvlab supports {names} "
                    "(with reduction 'mean' or 'sum')")
