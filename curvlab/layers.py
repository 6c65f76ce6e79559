"""Which modules get layer-structured formulas, and why: one survey of the model per problem.

The fast paths of the oracle and of every approximator treat a layer z = W a (+ b) from its
inputs a and output cotangents g alone (the GGN block Σ_n M_n ⊗ a_n a_nᵀ, the Hessian block from
pre-activation second derivatives, KFAC's A ⊗ G). That is exact only under one precondition:

    **the layer's parameters reach the loss only through this one call of its module.**

A weight tied to a second module (``linear2.weight = linear1.weight``), used functionally elsewhere
(a tied autoencoder's ``F.linear(h, enc.weight.t())``), or a module called twice per forward pass
breaks it, and treating such a layer as single-use silently drops the other uses. So the
precondition is verified on the problem, twice, before a fast path is used:

1. **Structurally**: one forward pass under a ``TorchFunctionMode`` records every torch operation
   that consumes each trainable parameter tensor, and which module's forward was running. A layer
   qualifies when it is called exactly once and each of its parameters is consumed exactly once,
   by that call's ``linear`` / ``conv2d``.
2. **Numerically**: in the same pass the layer inputs a and outputs z are recorded, and one
   backward pass of a random output cotangent u gives both ∂(u·f)/∂z and autograd's
   ∂(u·f)/∂θ. The gradient assembled from the layer, Σ_n Σ_t g_nt a_ntᵀ, must equal autograd's
   to √ε relative to its norm; any use the trace could not see (a custom operator) shows up here.

The pass costs one forward and one backward pass over the first :data:`SURVEY_SAMPLES` samples
(a fraction of one gradient: uses do not depend on how many samples are looked at; a model whose
control flow depends on the data is still caught when a capture records a layer called more or
less than once, which then takes the generic path) and its verdict is cached on the problem
(shared by ``Problem.at`` and ``Problem.subset``: same model, same parameters). Layers that fail
either check, and every parameter outside ``nn.Linear`` / ``nn.Conv2d``, take the generic exact
path (per-sample Jacobian rows, Hessian-vector products); :func:`survey` says why for each module.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from curvlab.problem import Problem

__all__ = ["Rule", "RULES", "Layer", "Use", "Survey", "survey", "structured_layers", "SURVEY_SAMPLES"]

#: the survey runs on the first this-many samples of the problem
SURVEY_SAMPLES = 16


# ---------------------------------------------------------------------------------------- layer rules
def _linear_inputs(module: nn.Module, inp: Tensor) -> Tensor:  # (N, ..., d_in) -> (N, T, d_in)
    return inp.reshape(inp.shape[0], -1, inp.shape[-1])


def _linear_grad(out_grad: Tensor, n: int) -> Tensor:  # (k, N, ..., d_out) -> (k, N, T, d_out)
    t = math.prod(out_grad.shape[2:-1])  # explicit (not -1): k may be 0
    return out_grad.reshape(out_grad.shape[0], n, t, out_grad.shape[-1])


def _conv_inputs(module: nn.Module, inp: Tensor) -> Tensor:  # unfolded patches (N, L, C·kh·kw)
    patches = F.unfold(inp, module.kernel_size, dilation=module.dilation, padding=module.padding,
                       stride=module.stride)
    return patches.transpose(1, 2).contiguous()  # one copy here, not one per later reshape into rows


def _conv_grad(out_grad: Tensor, n: int) -> Tensor:  # (k, N, d_out, H, W) -> (k, N, L, d_out)
    k, _, d_out = out_grad.shape[:3]
    return out_grad.reshape(k, n, d_out, math.prod(out_grad.shape[3:])).transpose(2, 3).contiguous()


def _conv_supported(m: nn.Module) -> str | None:
    if m.groups != 1:
        return f"groups={m.groups} (only groups=1 is layer-structured)"
    if m.padding_mode != "zeros" or isinstance(m.padding, str):
        return f"padding {m.padding!r} with padding_mode={m.padding_mode!r} (only numeric zero padding)"
    return None


@dataclass(frozen=True)
class Rule:
    """How one module type is treated as a layer z = W a (+ b).

    ``inputs(module, x)`` turns the module's input into a (N, T, d_in) (T positions sharing the
    weight); ``grads(dz, N)`` turns cotangents at its output (k, N, *out) into (k, N, T, d_out);
    ``ops`` are the torch functions through which the parameters must enter; ``unsupported(module)``
    says why a configuration of the type is not layer-structured (None if it is).
    """

    kind: str
    inputs: Callable[[nn.Module, Tensor], Tensor]
    grads: Callable[[Tensor, int], Tensor]
    ops: tuple[str, ...]
    unsupported: Callable[[nn.Module], str | None] = lambda m: None


RULES: dict[type, Rule] = {
    nn.Linear: Rule("linear", _linear_inputs, _linear_grad, ("linear",)),
    nn.Conv2d: Rule("conv2d", _conv_inputs, _conv_grad, ("conv2d",), _conv_supported),
}


# ---------------------------------------------------------------------------------------- the survey
@dataclass(frozen=True)
class Use:
    """One consumption of a parameter tensor: the torch function and the innermost running module."""

    module: str
    op: str

    def __str__(self) -> str:
        return f"{self.op} in {self.module or '(root)'}"


@dataclass(frozen=True)
class Layer:
    """A verified layer-structured module: its parameters' place in θ and its input layout."""

    name: str
    module: nn.Module
    kind: str
    weight: str
    bias: str | None
    start: int
    stop: int
    input_ndim: int

    @property
    def rule(self) -> Rule:
        """The :class:`Rule` for the module's type."""
        return RULES[type(self.module)]

    @property
    def single_position(self) -> bool:
        """One weight application per sample: a linear layer on (N, d_in) inputs."""
        return self.kind == "linear" and self.input_ndim == 2


@dataclass
class Survey:
    """What one traced forward pass found (see the module docstring).

    Attributes
    ----------
    layers:
        the verified layer-structured modules, by module name, in θ order.
    rejected:
        module name → why a module of a layer type (or owning parameters) is not layer-structured.
    uses:
        trainable parameter name → every operation that consumed it.
    calls:
        module name → number of forward calls.
    activations_per_sample:
        entries of every leaf module's outputs per sample (what one tangent costs to push through).
    """

    layers: dict[str, Layer] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    uses: dict[str, tuple[Use, ...]] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    activations_per_sample: float = 0.0

    def generic_parameters(self, param_names: list[str]) -> list[str]:
        """Return the trainable parameters outside every verified layer, in θ order."""
        covered = {n for L in self.layers.values() for n in (L.weight, L.bias) if n}
        return [n for n in param_names if n not in covered]

    def reason(self, param: str) -> str:
        """Why ``param`` takes the generic path (empty if it is in a verified layer)."""
        owner = param.rsplit(".", 1)[0] if "." in param else ""
        if owner in self.rejected:
            return self.rejected[owner]
        if any(param in (L.weight, L.bias) for L in self.layers.values()):
            return ""
        uses = self.uses.get(param, ())
        return "not a parameter of nn.Linear / nn.Conv2d" + (f" (used by {_list(uses)})" if uses else "")


def _list(uses: tuple[Use, ...]) -> str:
    return ", ".join(map(str, uses)) or "no operation"


class _Trace(TorchFunctionMode):
    """Records which torch functions consume the tracked tensors, and inside which module."""

    def __init__(self, tracked: dict[int, str], stack: list[str]) -> None:
        super().__init__()
        self.tracked, self.stack = tracked, stack
        self.uses: dict[str, list[Use]] = {n: [] for n in tracked.values()}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if _has_tensor(out):  # .shape, .dtype, .dim() … read metadata: not a use
            for a in (*args, *kwargs.values()):
                for t in (a if isinstance(a, (list, tuple)) else (a,)):
                    name = self.tracked.get(id(t)) if isinstance(t, Tensor) else None
                    if name is not None:
                        self.uses[name].append(Use(self.stack[-1] if self.stack else "",
                                                   getattr(func, "__name__", str(func))))
        return out


def _has_tensor(out: Any) -> bool:
    if isinstance(out, Tensor):
        return True
    return isinstance(out, (list, tuple)) and any(isinstance(o, Tensor) for o in out)


def _candidates(prob: Problem, sv: Survey) -> dict[str, tuple[nn.Module, str, str | None]]:
    """Modules of a layer type whose own trainable tensors are weight (then bias) contiguously in θ."""
    names, order = set(prob.param_names), {n: i for i, n in enumerate(prob.param_names)}
    out: dict[str, tuple[nn.Module, str, str | None]] = {}
    for mname, m in prob.model.named_modules():
        rule = RULES.get(type(m))
        if rule is None:
            continue
        why = rule.unsupported(m)
        prefix = f"{mname}." if mname else ""
        w, b = prefix + "weight", prefix + "bias"
        own = [n for n, _ in m.named_parameters(prefix=mname, recurse=False) if n in names]
        if why is None and w not in names:
            why = ("its weight is not a trainable parameter of its own (frozen, or tied to another "
                   "module's parameter)")
        if why is None and (own != [w] + ([b] if b in names else [])
                            or (b in names and order[b] != order[w] + 1)):
            why = f"its trainable tensors {own} are not its weight followed by its bias in θ"
        if why is None:
            out[mname] = (m, w, b if b in names else None)
        else:
            sv.rejected[mname] = why
    return out


def _single_use(mname: str, params: list[str], rule: Rule, sv: Survey) -> str | None:
    """Why a candidate layer breaks the single-use precondition structurally (None: it does not)."""
    if sv.calls.get(mname, 0) != 1:
        return (f"it is called {sv.calls.get(mname, 0)} times per forward pass (applied more than once or "
                f"never; layer formulas need exactly one call)")
    for p in params:
        uses = sv.uses.get(p, ())
        if len(uses) != 1 or uses[0].module != mname or uses[0].op not in rule.ops:
            return (f"its parameter {p!r} reaches the loss through {len(uses)} operation(s) ({_list(uses)}), "
                    f"not only through one call of the module (tied or shared weights)")
    return None


def _traced_forward(prob: Problem, X: Tensor, cands: dict, sv: Survey) -> tuple[Tensor, Tensor, dict[str, list]]:
    """One forward pass on X: uses, calls, leaf activations, and each candidate's (input, output)."""
    theta = prob.theta.detach().clone().requires_grad_(True)
    params = prob.params(theta)
    tracked = {id(params[n]): n for n in prob.param_names}
    stack: list[str] = []
    io: dict[str, list] = {n: [] for n in cands}
    acts = [0]

    def pre(name: str):
        def hook(_m: nn.Module, _inp: tuple) -> None:
            stack.append(name)
            sv.calls[name] = sv.calls.get(name, 0) + 1

        return hook

    def post(name: str, leaf: bool):
        def hook(_m: nn.Module, inp: tuple, out: Any) -> Any:
            stack.pop()
            if leaf and isinstance(out, Tensor):
                acts[0] += out.numel()
            if name in io and inp and isinstance(inp[0], Tensor) and isinstance(out, Tensor):
                io[name].append((inp[0].detach(), out))
                return out.clone()  # in-place operations downstream must not touch the recorded z
            return None

        return hook

    handles = []
    for name, m in prob.model.named_modules():
        handles.append(m.register_forward_pre_hook(pre(name)))
        handles.append(m.register_forward_hook(post(name, not list(m.children()))))
    trace = _Trace(tracked, stack)
    try:
        with torch.enable_grad(), trace:
            f = functional_call(prob.model, params, (X,))
    finally:
        for h in handles:
            h.remove()
    sv.uses = {n: tuple(u) for n, u in trace.uses.items()}
    sv.activations_per_sample = acts[0] / X.shape[0]
    return theta, f, io


def _gradient_mismatch(layer: Layer, a: Tensor, gz: Tensor | None, grad: Tensor, n: int) -> str | None:
    """Compare Σ_n Σ_t g_nt a_ntᵀ (and Σ g for the bias) with autograd's gradient of the layer."""
    rule = layer.rule
    if gz is None:
        gz = torch.zeros_like(grad[layer.start:layer.stop])
        assembled = gz
    else:
        g = rule.grads(gz[None], n)[0]  # (N, T, d_out)
        gw = torch.einsum("ntp,nti->pi", g, rule.inputs(layer.module, a)).reshape(-1)
        assembled = torch.cat([gw, g.sum(dim=(0, 1))]) if layer.bias else gw
    ref = grad[layer.start:layer.stop]
    tol = math.sqrt(torch.finfo(ref.dtype).eps) * max(float(ref.norm()), float(assembled.norm()), 1e-300)
    err = float((assembled - ref).norm())
    if err > tol:
        return (f"the gradient assembled from its inputs and output cotangents differs from autograd's by "
                f"{err / max(float(ref.norm()), 1e-300):.2e} (relative): its parameters reach the loss "
                f"another way too")
    return None


def _verify(prob: Problem, sv: Survey, cands: dict, theta: Tensor, f: Tensor, io: dict) -> None:
    """Keep the structurally single-use candidates whose assembled gradient matches autograd's."""
    kept: dict[str, tuple[nn.Module, str, str | None]] = {}
    for mname, (m, w, b) in cands.items():
        why = _single_use(mname, [w] + ([b] if b else []), RULES[type(m)], sv)
        if why is None and len(io[mname]) != 1:
            why = "its output was not a single tensor"
        if why is None:
            kept[mname] = (m, w, b)
        else:
            sv.rejected[mname] = why
    gen = torch.Generator(device=f.device).manual_seed(0)
    u = torch.randn(f.shape, generator=gen, dtype=f.dtype, device=f.device)
    zs = [io[name][0][1] for name in kept]
    if f.requires_grad:
        grads = torch.autograd.grad(f, [theta, *zs], grad_outputs=u, allow_unused=True)
    else:  # no parameter reaches the output
        grads = (None,) * (1 + len(zs))
    g_theta = grads[0] if grads[0] is not None else torch.zeros_like(theta)
    for (mname, (m, w, b)), gz in zip(kept.items(), grads[1:]):
        start = prob.param_slices[w].start
        stop = prob.param_slices[b].stop if b else prob.param_slices[w].stop
        layer = Layer(mname, m, RULES[type(m)].kind, w, b, start, stop, io[mname][0][0].ndim)
        why = _gradient_mismatch(layer, io[mname][0][0], gz, g_theta.detach(), f.shape[0])
        if why is None:
            sv.layers[mname] = layer
        else:
            sv.rejected[mname] = why
    sv.layers = dict(sorted(sv.layers.items(), key=lambda kv: kv[1].start))


def survey(prob: Problem) -> Survey:
    """Return the survey of ``prob``'s model (cached on the problem; see the module docstring)."""
    if not isinstance(prob, Problem):
        raise TypeError(f"expected a curvlab.Problem; got {type(prob).__name__}")
    cached = prob.structure_cache.get("survey")
    if cached is not None:
        return cached
    sv = Survey()
    cands = _candidates(prob, sv)
    # the precondition is structural: a few samples show every use at a fraction of a gradient's cost
    theta, f, io = _traced_forward(prob, prob.X[:SURVEY_SAMPLES], cands, sv)
    _verify(prob, sv, cands, theta, f, io)
    prob.structure_cache["survey"] = sv
    return sv


def structured_layers(prob: Problem) -> dict[str, nn.Module]:
    """Return the verified layer-structured modules of ``prob``, by module name, in θ order."""
    return {name: L.module for name, L in survey(prob).layers.items()}
