"""What is measured: a model, a loss and a data set, with one fixed flattening of the parameters.

Conventions (``docs/conventions.md``): the parameter vector θ ∈ R^P is the concatenation of the
trainable tensors of ``model.named_parameters()`` in that order, each flattened row-major. The
model is never mutated: every evaluation goes through ``torch.func.functional_call`` with the
parameters given explicitly, so a Problem can be evaluated at any θ.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from curvlab.linalg.base import all_finite
from curvlab.losses import Likelihood, likelihood_for

__all__ = ["Problem", "Block", "Partition"]


@dataclass(frozen=True)
class Block:
    """One block of a partition: a named, contiguous range of the flat parameter vector."""

    name: str
    slice: slice
    params: tuple[str, ...]

    @property
    def size(self) -> int:
        """The number of parameters in the block."""
        return self.slice.stop - self.slice.start

    def __iter__(self) -> Iterator[Any]:
        """Unpack a block as its ``(name, slice)`` pair: ``for name, s in prob.partition: ...``."""
        return iter((self.name, self.slice))


class Partition(tuple):
    """Ordered, contiguous, non-overlapping blocks covering the whole flat parameter vector.

    Each block is a :class:`Block` that unpacks as ``(name, slice)`` (the design's contract) and also
    has ``.name``, ``.slice``, ``.params`` and ``.size``; ``partition["name"]`` looks one up by name.
    """

    def __new__(cls, blocks: Iterable[Block]) -> Partition:
        """Return the partition of ``blocks``, in order."""
        return super().__new__(cls, tuple(blocks))

    @property
    def names(self) -> list[str]:
        """The blocks' names, in order."""
        return [b.name for b in self]

    @property
    def slices(self) -> list[slice]:
        """The blocks' slices of θ, in order."""
        return [b.slice for b in self]

    @property
    def sizes(self) -> list[int]:
        """The blocks' sizes, in order."""
        return [b.size for b in self]

    def __getitem__(self, key: Any) -> Any:  # allow lookup by name
        if isinstance(key, str):
            for b in self:
                if b.name == key:
                    return b
            raise KeyError(f"no block named {key!r}; blocks are {self.names}")
        return super().__getitem__(key)


_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_finite(t: Tensor, what: str) -> None:
    """Raise ``ValueError`` naming the first NaN/inf entry of ``t``, if any."""
    if t.dtype in _FLOAT and not all_finite(t):
        bad = (~torch.isfinite(t)).nonzero()[0].tolist()
        raise ValueError(f"{what} contains NaN or inf (first at index {tuple(bad)}: {t[tuple(bad)].item()})")


class Problem:
    """A model, a supported loss, and data: the object every curvature is computed for.

    Parameters
    ----------
    model:
        any ``torch.nn.Module``; its trainable parameters (``requires_grad=True``) are θ.
        Modules that behave differently in training (dropout, batch normalisation) must be in
        ``eval()`` mode, since curvature is only defined for a deterministic function.
    loss_fn:
        an instance of ``nn.CrossEntropyLoss``, ``nn.MSELoss`` or ``nn.BCEWithLogitsLoss`` with
        ``reduction="mean"`` or ``"sum"``.
    X, y:
        inputs (N, ...) and targets (N, ...) with the same first dimension.
    partition:
        ``"module"`` (default: one block per module that owns parameters, weight and bias
        together), ``"per_tensor"``, ``"all"`` (one block), or a sequence of blocks given as lists
        of parameter names or ``(name, [parameter names])`` pairs covering θ contiguously in order.
    name, meta:
        provenance kept with every result (data set, seed, …).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        X: Tensor,
        y: Tensor,
        partition: str | Sequence[Any] = "module",
        name: str | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        if not isinstance(X, Tensor) or not isinstance(y, Tensor):
            raise TypeError(f"X and y must be torch tensors; got {type(X).__name__} and {type(y).__name__}")
        self.likelihood: Likelihood = likelihood_for(loss_fn)
        self.loss_fn = loss_fn
        self.model = model
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError(f"model {type(model).__name__} has no trainable parameters "
                             "(every parameter has requires_grad=False)")
        dtypes = {p.dtype for _, p in named}
        if len(dtypes) != 1:
            raise TypeError(f"all trainable parameters must share one dtype; got {sorted(map(str, dtypes))}")
        self.dtype: torch.dtype = named[0][1].dtype
        self.device: torch.device = named[0][1].device
        if self.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"parameters must be float32 or float64; got {self.dtype}")
        for n, p in named:
            _check_finite(p.detach(), f"parameter {n!r}")
        self._check_eval_mode(model)

        self.param_names: list[str] = [n for n, _ in named]
        self.param_shapes: list[torch.Size] = [p.shape for _, p in named]
        self.param_sizes: list[int] = [p.numel() for _, p in named]
        offsets = [0]
        for s in self.param_sizes:
            offsets.append(offsets[-1] + s)
        self.param_slices: dict[str, slice] = {
            n: slice(offsets[i], offsets[i + 1]) for i, n in enumerate(self.param_names)
        }
        self.num_params: int = offsets[-1]
        self.theta: Tensor = torch.cat([p.detach().reshape(-1) for _, p in named])
        # Non-trainable parameters and buffers stay fixed at their current values.
        self._fixed: dict[str, Tensor] = {
            n: p.detach() for n, p in model.named_parameters() if not p.requires_grad
        }
        self._fixed.update({n: b for n, b in model.named_buffers()})

        self.X, self.y = self._prepare_data(X, y)
        self.num_samples: int = self.X.shape[0]

        with torch.no_grad():
            try:
                f = self.output()
            except Exception as exc:  # make shape errors name the problem
                raise ValueError(f"the model failed on X of shape {tuple(X.shape)}: {exc}") from exc
        if not isinstance(f, Tensor) or f.shape[:1] != X.shape[:1]:
            raise ValueError(f"the model must map X of shape {tuple(X.shape)} to outputs with the same "
                             f"first dimension; got {getattr(f, 'shape', type(f))}")
        self.likelihood.check(f, self.y)
        self.output_shape: tuple[int, ...] = tuple(f.shape[1:])
        self.loss_scale: float = self.likelihood.scale(f)
        self.partition: Partition = self._make_partition(partition)
        self.name = name or type(model).__name__
        self.meta: dict[str, Any] = dict(meta or {})
        #: facts about the model's structure (which layers get structured formulas …), shared by
        #: the problems made from this one with ``at`` and ``subset`` (same model, same parameters)
        self.structure_cache: dict[str, Any] = {}

    # ------------------------------------------------------------------ construction helpers
    @staticmethod
    def _check_eval_mode(model: nn.Module) -> None:
        stochastic = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm,
                      nn.modules.instancenorm._InstanceNorm, nn.Dropout)
        for mname, m in model.named_modules():
            if isinstance(m, stochastic) and m.training:
                raise ValueError(
                    f"module {mname or type(model).__name__!r} ({type(m).__name__}) is in training "
                    "mode, where the model is random or couples samples; call model.eval() first")

    def _prepare_data(self, X: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """X and y checked (same number of samples, finite) and cast to the parameters' dtype and device."""
        if not isinstance(X, Tensor) or not isinstance(y, Tensor):
            raise TypeError(f"X and y must be torch tensors; got {type(X).__name__} and {type(y).__name__}")
        if X.ndim == 0 or y.ndim == 0 or X.shape[0] != y.shape[0]:
            raise ValueError(f"X and y must have the same number of samples; got X of shape {tuple(X.shape)} "
                             f"and y of shape {tuple(y.shape)}")
        if X.shape[0] == 0:
            raise ValueError("the data set is empty (N = 0)")
        if torch.is_floating_point(X):
            X = X.to(dtype=self.dtype)
        if torch.is_floating_point(y):
            y = y.to(dtype=self.dtype)
        elif y.dtype in (torch.int8, torch.int16, torch.int32, torch.uint8) and self.likelihood.name == "cross_entropy":
            y = y.long()  # class indices in a narrower integer type
        X, y = X.to(self.device), y.to(self.device)
        _check_finite(X, "X")
        _check_finite(y, "y")
        return X, y

    def _make_partition(self, spec: str | Sequence[Any]) -> Partition:
        names = self.param_names
        if isinstance(spec, str):
            if spec in ("module", "layer"):
                groups: list[tuple[str, list[str]]] = []
                for n in names:
                    owner = n.rsplit(".", 1)[0] if "." in n else ""
                    if groups and groups[-1][0] == owner:
                        groups[-1][1].append(n)
                    else:
                        groups.append((owner, [n]))
                groups = [(owner or "(root)", ps) for owner, ps in groups]
            elif spec == "per_tensor":
                groups = [(n, [n]) for n in names]
            elif spec == "all":
                groups = [("all", list(names))]
            else:
                raise ValueError(f"unknown partition {spec!r}: use 'module', 'per_tensor', 'all' or a "
                                 "sequence of parameter-name lists")
        else:
            if not isinstance(spec, Iterable):
                raise TypeError(f"partition must be 'module', 'per_tensor', 'all' or a sequence of parameter-name "
                                f"lists; got {type(spec).__name__} {spec!r}")
            groups = []
            for i, item in enumerate(spec):
                named = isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                if named and not isinstance(item[1], str):
                    groups.append((item[0], list(item[1])))
                else:
                    ps = [item] if isinstance(item, str) else list(item)
                    groups.append((f"block{i}", ps))
        flat = [p for _, ps in groups for p in ps]
        if flat != names:
            unknown = [p for p in flat if p not in names]
            if unknown:
                raise ValueError(f"partition names unknown parameters {unknown}; parameters are {names}")
            raise ValueError("a partition must list every trainable parameter exactly once, in "
                             f"named_parameters() order, as contiguous blocks; parameters are {names}, "
                             f"the partition lists {flat}")
        blocks = []
        seen: set[str] = set()
        for gname, ps in groups:
            if not ps:
                raise ValueError(f"partition block {gname!r} is empty")
            if gname in seen:
                raise ValueError(f"partition block name {gname!r} is used twice")
            seen.add(gname)
            span = slice(self.param_slices[ps[0]].start, self.param_slices[ps[-1]].stop)
            blocks.append(Block(gname, span, tuple(ps)))
        return Partition(blocks)

    # ------------------------------------------------------------------ parameter vectors
    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        """Flat vector (P,) → {name: tensor} in the model's shapes (views, no copy)."""
        if theta.shape != (self.num_params,):
            raise ValueError(f"parameter vector must have shape ({self.num_params},); got {tuple(theta.shape)}")
        return {n: theta[self.param_slices[n]].view(s) for n, s in zip(self.param_names, self.param_shapes)}

    def flatten(self, tensors: Mapping[str, Tensor] | Sequence[Tensor]) -> Tensor:
        """{name: tensor} or a list in parameter order → flat vector (P,)."""
        if isinstance(tensors, Mapping):
            missing = [n for n in self.param_names if n not in tensors]
            if missing:
                raise ValueError(f"missing parameters {missing}")
            tensors = [tensors[n] for n in self.param_names]
        tensors = list(tensors)
        if len(tensors) != len(self.param_names):
            raise ValueError(f"expected {len(self.param_names)} tensors; got {len(tensors)}")
        for t, n, s in zip(tensors, self.param_names, self.param_shapes):
            if t.numel() != math.prod(s):
                raise ValueError(f"tensor for {n!r} has {t.numel()} entries; expected shape {tuple(s)}")
        return torch.cat([t.reshape(-1) for t in tensors])

    def params(self, theta: Tensor | None = None) -> dict[str, Tensor]:
        """All tensors ``functional_call`` needs: trainable ones from θ, the rest fixed."""
        theta = self.theta if theta is None else theta
        return {**self._fixed, **self.unflatten(theta)}

    @property
    def fixed_tensors(self) -> dict[str, Tensor]:
        """Buffers and non-trainable parameters, held at their values when the Problem was made."""
        return self._fixed

    # ------------------------------------------------------------------ evaluation
    def output(self, theta: Tensor | None = None, X: Tensor | None = None) -> Tensor:
        """Return the model output f(X; θ) without touching the model's own parameters."""
        return functional_call(self.model, self.params(theta), (self.X if X is None else X,))

    def loss_tensor(self, theta: Tensor | None = None, X: Tensor | None = None, y: Tensor | None = None) -> Tensor:
        """L(θ) as a differentiable 0-d tensor (the user's loss, its reduction included)."""
        f = self.output(theta, X)
        return self.likelihood.loss(f, self.y if y is None else y)

    def loss(self, theta: Tensor | None = None) -> float:
        """L(θ) as a float."""
        with torch.no_grad():
            return float(self.loss_tensor(theta))

    def gradient(self, theta: Tensor | None = None) -> Tensor:
        """∇L(θ), flat (P,)."""
        theta = self.check_theta(theta).detach().requires_grad_(True)
        with torch.enable_grad():
            loss = self.loss_tensor(theta)
            (g,) = torch.autograd.grad(loss, theta)
        return g

    def check_theta(self, theta: Tensor | None) -> Tensor:
        """Return the parameter vector to evaluate at: the problem's own θ for None, else ``theta`` checked.

        Raises ``ValueError`` unless ``theta`` has shape (P,) and finite entries; it is cast to the
        problem's dtype and device.
        """
        if theta is None:
            return self.theta
        theta = torch.as_tensor(theta, dtype=self.dtype, device=self.device)
        if theta.shape != (self.num_params,):
            raise ValueError(f"parameter vector must have shape ({self.num_params},); got {tuple(theta.shape)}")
        _check_finite(theta, "theta")
        return theta

    def at(self, theta: Tensor) -> Problem:
        """Return the same problem evaluated at other parameter values θ (the model is not mutated)."""
        theta = self.check_theta(theta)
        new = self._copy()
        new.theta = theta.detach().clone()
        return new

    def subset(self, index: Tensor | slice | Sequence[int]) -> Problem:
        """Return the same problem on a subset of the samples (a minibatch), at the same θ."""
        new = self._copy()
        new.X, new.y = self.X[index], self.y[index]
        if new.X.shape[0] == 0:
            raise ValueError("the subset is empty")
        new.num_samples = new.X.shape[0]
        with torch.no_grad():
            new.loss_scale = self.likelihood.scale(new.output())
        return new

    def check_batch(self, X: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Return a batch of other data (X, y) checked as :meth:`with_batch` checks it, without a new problem.

        The same per-sample shapes as the problem's, finite, cast to the parameters' dtype and device;
        raises ``ValueError`` otherwise.
        """
        X, y = self._prepare_data(X, y)
        if X.shape[1:] != self.X.shape[1:] or y.shape[1:] != self.y.shape[1:]:
            raise ValueError(f"the batch's samples have shapes X {tuple(X.shape[1:])}, y {tuple(y.shape[1:])}; "
                             f"the problem's are X {tuple(self.X.shape[1:])}, y {tuple(self.y.shape[1:])}")
        return X, y

    def with_batch(self, X: Tensor, y: Tensor, theta: Tensor | None = None) -> Problem:
        """Return the same problem on other data of the same per-sample shapes (a minibatch), optionally at θ.

        Cheaper than a new :class:`Problem`: the model, partition and cached survey are shared and no
        forward pass is run (the loss scale follows from the batch size). Raises ``ValueError`` when a
        sample's shape differs from the problem's.
        """
        X, y = self.check_batch(X, y)
        new = self._copy()
        new.X, new.y, new.num_samples = X, y, X.shape[0]
        new.loss_scale = self.likelihood.scale(torch.empty((X.shape[0], *self.output_shape), device="meta"))
        if theta is not None:
            new.theta = self.check_theta(theta).detach().clone()
        return new

    def _copy(self) -> Problem:
        new = object.__new__(Problem)
        new.__dict__.update(self.__dict__)
        new.meta = dict(self.meta)
        return new

    # ------------------------------------------------------------------ description
    @property
    def num_outputs(self) -> int:
        """The number of outputs per sample, Π output_shape."""
        return math.prod(self.output_shape)

    def summary(self) -> dict[str, Any]:
        """Provenance: what a result was computed on."""
        return {
            "problem": self.name,
            "model": repr(self.model).replace("\n", " "),
            "loss": f"{type(self.loss_fn).__name__}(reduction={self.likelihood.reduction!r})",
            "num_samples": self.num_samples,
            "num_params": self.num_params,
            "dtype": str(self.dtype).replace("torch.", ""),
            "blocks": ", ".join(f"{b.name}:{b.size}" for b in self.partition),
            **{k: v for k, v in self.meta.items() if isinstance(v, (str, int, float))},
        }

    def __repr__(self) -> str:
        return (f"Problem({self.name!r}, N={self.num_samples}, P={self.num_params}, "
                f"loss={type(self.loss_fn).__name__}({self.likelihood.reduction}), dtype={self.dtype})")
