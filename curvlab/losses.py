"""The likelihoods behind the supported losses.

Every supported loss is the negative log-likelihood of an exponential-family model over the
network output ``f`` (up to scale and constants).  curvlab writes the user's loss as

    L(θ) = R · Σ_n ℓ_n,     ℓ_n = sample n's *summed* unreduced loss,

with ``R = 1/(number of unreduced loss terms)`` for ``reduction="mean"`` (1/N for cross-entropy
on (N, C) outputs, 1/(N·T) on (N, C, d₁, …) outputs with T = d₁·… positions; 1/(N·D) for
``MSELoss`` and ``BCEWithLogitsLoss`` with D outputs per sample) and ``R = 1`` for ``"sum"``.
Extra output dimensions are loss terms of one sample: ℓ_n sums over them.  For each loss this
module gives, in closed form and batched over samples:

* ``per_sample(f, y)``      ℓ_n, shape (N,)
* ``grad_output(f, y)``     ∇_f ℓ_n, shape of f
* ``hvp_output(f, u)``      ∇²_f ℓ_n · u_n, shape of f
* ``hessian_sqrt(f)``       S with Σ_k S_k S_kᵀ = ∇²_f ℓ_n, shape (k, *f.shape) (k = outputs per sample)
* ``sample(f, m, gen)``     m labels drawn from the likelihood ℓ_n is the negative log of

| loss | ℓ_n | ∇²_f ℓ_n | likelihood sampled |
|---|---|---|---|
| CrossEntropyLoss | Σ_t −log softmax(f_t)_{y_t} | per position t: diag(p_t) − p_t p_tᵀ | Categorical(p_t) per t |
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
        """Raise ValueError/TypeError unless outputs ``f`` and targets ``y`` suit this loss."""
        raise NotImplementedError

    def terms_per_sample(self, f: Tensor) -> int:
        """Return the number of unreduced loss terms of one sample (1 for CE, D for MSE/BCE)."""
        return 1

    def scale(self, f: Tensor) -> float:
        """R: the factor that turns Σ_n ℓ_n into the user's loss."""
        if self.reduction == "sum":
            return 1.0
        return 1.0 / (f.shape[0] * self.terms_per_sample(f))

    # -- derivatives -----------------------------------------------------------------------
    def per_sample(self, f: Tensor, y: Tensor) -> Tensor:  # pragma: no cover - overridden
        """Return ℓ_n, each sample's summed unreduced loss; shape (N,)."""
        raise NotImplementedError

    def grad_output(self, f: Tensor, y: Tensor) -> Tensor:  # pragma: no cover
        """Return ∇_f ℓ_n, shape of ``f`` (``y`` may carry a leading sample axis)."""
        raise NotImplementedError

    def hvp_output(self, f: Tensor, u: Tensor) -> Tensor:  # pragma: no cover
        """Return ∇²_f ℓ_n · u_n for ``u`` of the shape of ``f``."""
        raise NotImplementedError

    def hessian_sqrt(self, f: Tensor) -> Tensor:  # pragma: no cover
        """Return S with Σ_k S_k S_kᵀ = ∇²_f ℓ_n; shape (k, *f.shape)."""
        raise NotImplementedError

    def sample(self, f: Tensor, m: int, generator: torch.Generator | None) -> Tensor:  # pragma: no cover
        """Draw m labels from the likelihood ℓ_n is the negative log of; shape (m, *y.shape)."""
        raise NotImplementedError

    # -- positions --------------------------------------------------------------------------
    #: the output axis that holds one position's features (classes); the others after the batch
    #: axis are positions
    feature_axis: int = -1

    def positions(self, f: Tensor) -> int:
        """Return T, the number of positions of one sample's output.

        The positions are the axes between the batch axis and the feature axis (the last for MSE and
        BCE, as curvlinops flattens them; dim 1 for CE).
        """
        return math.prod(f.shape[1:-1])

    def split_positions(self, g: Tensor) -> Tensor:
        """(N, *out) → (T, N, *out): slice t keeps position t of ``g`` and is zero elsewhere."""
        if g.ndim < 3:  # one position
            return g[None]
        n, d = g.shape[0], g.shape[-1]
        t = math.prod(g.shape[1:-1])
        eye = torch.eye(t, dtype=g.dtype, device=g.device)
        return (g.reshape(n, t, d)[None] * eye[:, None, :, None]).reshape(t, *g.shape)

    def sampled_grad_output(self, f: Tensor, m: int, generator: torch.Generator | None) -> Tensor:
        """∇_f ℓ_n(ŷ_s) for m labels ŷ_s drawn from the model's predictive; shape (m, *f.shape)."""
        ys = self.sample(f, m, generator)
        return self.grad_output(f, ys)  # every grad_output broadcasts over a leading sample axis

    def sampled_and_data_grad_output(self, f: Tensor, m: int, generator: torch.Generator | None,
                                     y: Tensor) -> Tensor:
        """Return :meth:`sampled_grad_output` (the same draws) with ∇_f ℓ_n(y_n) appended; shape (m + 1, *f.shape)."""
        ys = self.sample(f, m, generator)
        return self.grad_output(f, torch.cat([ys, y[None].to(ys.dtype)]))

    def loss(self, f: Tensor, y: Tensor) -> Tensor:
        """Return the user's loss R Σ_n ℓ_n (equals ``loss_fn(f, y)``)."""
        return self.per_sample(f, y).sum() * self.scale(f)


def _flat_outputs(f: Tensor) -> Tensor:
    return f.reshape(f.shape[0], -1)


def _shape_name(shape: tuple[int, ...]) -> str:
    return "(N,)" if len(shape) == 1 else "(N, " + ", ".join(f"d{i}" for i in range(1, len(shape))) + ")"


def _one_hot(y: Tensor, c: int, dim: int, dtype: torch.dtype) -> Tensor:
    """one_hot(y) with the class axis at ``dim``."""
    return torch.nn.functional.one_hot(y, c).to(dtype).movedim(-1, dim)


class CrossEntropy(Likelihood):
    """``nn.CrossEntropyLoss`` with integer class targets: ℓ_n = −Σ_t log softmax(f_nt)[y_nt].

    Outputs are (N, C) or, as torch allows, (N, C, d₁, …) with targets (N, d₁, …) (sequences,
    segmentation): the class axis is dim 1 and each of the T = d₁·… positions is one unreduced
    loss term of sample n, so ℓ_n sums over positions and R = 1/(N·T) for ``reduction="mean"``
    (torch's mean over all N·T terms), exactly as MSE and BCE treat extra output dimensions.
    ∇²_f ℓ_n is block diagonal over positions, with block diag(p_t) − p_t p_tᵀ.
    """

    name = "cross_entropy"
    feature_axis = 1

    def __init__(self, loss_fn: nn.CrossEntropyLoss) -> None:
        super().__init__(loss_fn)
        if loss_fn.weight is not None:
            raise ValueError("CrossEntropyLoss(weight=...) is not supported: class weights break the "
                             "likelihood interpretation; reweight the data instead")
        if loss_fn.label_smoothing != 0.0:
            raise ValueError(f"CrossEntropyLoss(label_smoothing={loss_fn.label_smoothing}) is not "
                             "supported: use label_smoothing=0")

    def check(self, f: Tensor, y: Tensor) -> None:
        """Check (N, C, d₁, …) outputs and long class targets (N, d₁, …) in [0, C)."""
        if f.ndim < 2:
            raise ValueError(f"CrossEntropyLoss needs model outputs of shape (N, C) or (N, C, d1, ...); "
                             f"got {tuple(f.shape)}")
        want = (f.shape[0], *f.shape[2:])
        if y.dtype != torch.long:
            raise TypeError(f"CrossEntropyLoss targets must be integer class indices (torch.long) of shape "
                            f"{_shape_name(want)}; got dtype {y.dtype} (probability targets are not supported)")
        if tuple(y.shape) != want:
            raise ValueError(f"CrossEntropyLoss targets must have shape {_shape_name(want)} = {want} for "
                             f"model outputs of shape {tuple(f.shape)} (classes on dim 1); got {tuple(y.shape)}")
        c = f.shape[1]
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= c):
            bad = y[(y < 0) | (y >= c)][0].item()
            raise ValueError(f"CrossEntropyLoss target {bad} is outside [0, {c}) for a model "
                             f"with {c} classes (output dim 1)")

    def terms_per_sample(self, f: Tensor) -> int:
        """T = d₁·… positions (1 for (N, C) outputs)."""
        return math.prod(f.shape[2:])

    def per_sample(self, f: Tensor, y: Tensor) -> Tensor:
        """Return ℓ_n = −Σ_t log softmax(f_nt)[y_nt]; shape (N,)."""
        terms = -torch.log_softmax(f, dim=1).gather(1, y[:, None]).squeeze(1)  # (N, d₁, …)
        return _flat_outputs(terms).sum(dim=1) if terms.ndim > 1 else terms

    def grad_output(self, f: Tensor, y: Tensor) -> Tensor:
        """Return ∇_f ℓ_n = softmax(f) − onehot(y) (classes on dim 1)."""
        # y may carry a leading sample axis (m, N, d₁, …): the class axis of the result is then dim 2
        p = torch.softmax(f, dim=1)
        return p - _one_hot(y, f.shape[1], y.ndim - (f.ndim - 1) + 1, p.dtype)

    def hvp_output(self, f: Tensor, u: Tensor) -> Tensor:
        """Return (diag(p_t) − p_t p_tᵀ) u_t at every position t, p = softmax(f)."""
        p = torch.softmax(f, dim=1)
        return p * u - p * (p * u).sum(dim=1, keepdim=True)

    def hessian_sqrt(self, f: Tensor) -> Tensor:
        """Return S with S[c, t] = √p_ct (e_c − p_t) at position t; shape (C·T, N, C, d₁, …)."""
        # per position t: S[c, t] = √p_ct (e_c − p_t) at t, zero elsewhere; Σ_c S S ᵀ = diag(p_t) − p_t p_tᵀ.
        # k = C·T columns ordered (c, t); shape (C·T, N, C, d₁, …).
        n, c = f.shape[:2]
        t = math.prod(f.shape[2:])
        p = torch.softmax(f, dim=1).reshape(n, c, t)
        eye_c = torch.eye(c, dtype=f.dtype, device=f.device)
        A = p.sqrt().permute(1, 2, 0)[..., None] * (eye_c[:, None, None, :] - p.permute(2, 0, 1)[None])  # (C,T,N,C)
        if t == 1:
            return A.reshape(c, n, *f.shape[1:])
        eye_t = torch.eye(t, dtype=f.dtype, device=f.device)
        S = A[..., None] * eye_t[None, :, None, None, :]  # (C, T, N, C, T)
        return S.reshape(c * t, n, *f.shape[1:])

    def positions(self, f: Tensor) -> int:
        """Return T = d₁·… (the axes after the class axis)."""
        return math.prod(f.shape[2:])

    def split_positions(self, g: Tensor) -> Tensor:
        """Return (T, N, C, d₁, …): slice t keeps position t of ``g`` and is zero elsewhere."""
        if g.ndim < 3:
            return g[None]
        n, c = g.shape[:2]
        t = math.prod(g.shape[2:])
        eye = torch.eye(t, dtype=g.dtype, device=g.device)
        return (g.reshape(n, c, t)[None] * eye[:, None, None, :]).reshape(t, *g.shape)

    def _draw(self, p: Tensor, m: int, generator: torch.Generator | None) -> Tensor:
        """Draw m labels per position from Categorical(p) (classes on dim 1): shape (m, N, d₁, …)."""
        flat = p.movedim(1, -1).reshape(-1, p.shape[1])  # (N·T, C)
        ys = torch.multinomial(flat, m, replacement=True, generator=generator).T  # (m, N·T)
        return ys.reshape(m, p.shape[0], *p.shape[2:])

    def sample(self, f: Tensor, m: int, generator: torch.Generator | None) -> Tensor:
        """Draw m labels per position from Categorical(softmax(f)); shape (m, N, d₁, …)."""
        return self._draw(torch.softmax(f, dim=1), m, generator)

    def _sampled(self, f: Tensor, m: int, generator: torch.Generator | None, y: Tensor | None) -> Tensor:
        """Return p − onehot(ŷ_s) for m labels drawn as in :meth:`sample` (one softmax), then at y (if given)."""
        p = torch.softmax(f, dim=1)
        ys = self._draw(p, m, generator)
        if y is not None:
            ys = torch.cat([ys, y[None]])
        return p[None] - _one_hot(ys, f.shape[1], 2, p.dtype)

    def sampled_grad_output(self, f: Tensor, m: int, generator: torch.Generator | None) -> Tensor:
        """Return p − onehot(ŷ_s) for m labels ŷ_s drawn as in :meth:`sample`; shape (m, *f.shape)."""
        return self._sampled(f, m, generator, None)

    def sampled_and_data_grad_output(self, f: Tensor, m: int, generator: torch.Generator | None,
                                     y: Tensor) -> Tensor:
        """Return p − onehot(·) at the m labels of :meth:`sampled_grad_output`, then at y; (m + 1, *f.shape)."""
        return self._sampled(f, m, generator, y)


class SquaredError(Likelihood):
    """``nn.MSELoss``: ℓ_n = ‖f_n − y_n‖², the negative log-likelihood of N(f, ½I) up to constants."""

    name = "squared_error"

    def check(self, f: Tensor, y: Tensor) -> None:
        """Check floating-point targets of the model output's shape."""
        if not torch.is_floating_point(y):
            raise TypeError(f"MSELoss targets must be floating point; got dtype {y.dtype}")
        if y.shape != f.shape:
            raise ValueError(f"MSELoss targets must have the model output's shape {tuple(f.shape)}; "
                             f"got {tuple(y.shape)}")

    def terms_per_sample(self, f: Tensor) -> int:
        """Return D, the number of outputs per sample."""
        return math.prod(f.shape[1:])

    def per_sample(self, f: Tensor, y: Tensor) -> Tensor:
        """Return ℓ_n = ‖f_n − y_n‖²; shape (N,)."""
        return _flat_outputs((f - y) ** 2).sum(dim=1)

    def grad_output(self, f: Tensor, y: Tensor) -> Tensor:
        """Return ∇_f ℓ_n = 2 (f − y)."""
        return 2.0 * (f - y)

    def hvp_output(self, f: Tensor, u: Tensor) -> Tensor:
        """Return ∇²_f ℓ_n · u = 2 u."""
        return 2.0 * u

    def hessian_sqrt(self, f: Tensor) -> Tensor:
        """Return S = √2 I per sample; shape (D, *f.shape)."""
        d = math.prod(f.shape[1:])
        eye = torch.eye(d, dtype=f.dtype, device=f.device) * math.sqrt(2.0)
        return eye[:, None, :].expand(d, f.shape[0], d).reshape(d, *f.shape)

    def sample(self, f: Tensor, m: int, generator: torch.Generator | None) -> Tensor:
        """Draw m targets from N(f, ½ I); shape (m, *f.shape)."""
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
        """Check floating-point targets in [0, 1] of the model output's shape."""
        if not torch.is_floating_point(y):
            raise TypeError(f"BCEWithLogitsLoss targets must be floating point in [0, 1]; got dtype {y.dtype}")
        if y.shape != f.shape:
            raise ValueError(f"BCEWithLogitsLoss targets must have the model output's shape "
                             f"{tuple(f.shape)}; got {tuple(y.shape)}")
        if y.numel() and (float(y.min()) < 0.0 or float(y.max()) > 1.0):
            bad = y[(y < 0) | (y > 1)][0].item()
            raise ValueError(f"BCEWithLogitsLoss target {bad} is outside [0, 1]")

    def terms_per_sample(self, f: Tensor) -> int:
        """Return D, the number of outputs per sample."""
        return math.prod(f.shape[1:])

    def per_sample(self, f: Tensor, y: Tensor) -> Tensor:
        """Return ℓ_n = Σ_d −y log σ(f) − (1−y) log(1−σ(f)); shape (N,)."""
        terms = torch.nn.functional.binary_cross_entropy_with_logits(f, y, reduction="none")
        return _flat_outputs(terms).sum(dim=1)

    def grad_output(self, f: Tensor, y: Tensor) -> Tensor:
        """Return ∇_f ℓ_n = σ(f) − y."""
        return torch.sigmoid(f) - y

    def hvp_output(self, f: Tensor, u: Tensor) -> Tensor:
        """Return ∇²_f ℓ_n · u = σ(f)(1 − σ(f)) u."""
        s = torch.sigmoid(f)
        return s * (1 - s) * u

    def hessian_sqrt(self, f: Tensor) -> Tensor:
        """Return S = diag(√(σ(1−σ))) per sample; shape (D, *f.shape)."""
        d = math.prod(f.shape[1:])
        s = torch.sigmoid(_flat_outputs(f))
        root = (s * (1 - s)).sqrt()  # (N, D)
        eye = torch.eye(d, dtype=f.dtype, device=f.device)
        return (eye[:, None, :] * root[None, :, :]).reshape(d, *f.shape)

    def sample(self, f: Tensor, m: int, generator: torch.Generator | None) -> Tensor:
        """Draw m targets from Bernoulli(σ(f)); shape (m, *f.shape)."""
        s = torch.sigmoid(f)
        u = torch.rand((m, *f.shape), generator=generator, dtype=f.dtype, device=f.device)
        return (u < s[None]).to(f.dtype)


_SUPPORTED = {
    nn.CrossEntropyLoss: CrossEntropy,
    nn.MSELoss: SquaredError,
    nn.BCEWithLogitsLoss: BinaryCrossEntropy,
}


def likelihood_for(loss_fn: nn.Module) -> Likelihood:
    """Return the :class:`Likelihood` of a loss module instance; raise a clear error for anything else."""
    if isinstance(loss_fn, type):
        raise TypeError(f"pass a loss *instance* such as {loss_fn.__name__}(), not the class")
    for cls, lik in _SUPPORTED.items():
        if type(loss_fn) is cls:
            return lik(loss_fn)
    names = ", ".join(c.__name__ for c in _SUPPORTED)
    raise TypeError(f"unsupported loss {type(loss_fn).__name__}: curvlab supports {names} "
                    "(with reduction 'mean' or 'sum')")
