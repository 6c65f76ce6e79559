"""Layer inputs and backpropagated output cotangents: one forward pass, one batched backward pass.

Every Fisher-type curvature — exact GGN, Monte-Carlo Fisher, empirical Fisher, and all of KFAC's
factors — has the form

    C = Σ_n Σ_k v_nk v_nkᵀ,   v_nk = J_nᵀ u_nk,

where J_n is sample n's output Jacobian and u_nk ∈ R^C are *output cotangents*: the columns of a
symmetric factor of the loss Hessian (GGN, KFAC type-2), gradients at sampled labels (MC), or the
gradient at the data labels (empirical), scaled by √R (see ``curvlab.losses``).

For a layer z = W a (+ b) applied once per sample, v_nk restricted to the layer is g_nk ⊗ a_n with
g_nk = B_nᵀ u_nk the backpropagated cotangent at z (row-major weight order), so only (a, g) need
to be stored; with weight sharing (extra input dimensions, convolution patches) it is
Σ_t g_nkt ⊗ a_nt.  :func:`capture` collects them for every ``nn.Linear`` and ``nn.Conv2d`` with a
single forward pass and one vmapped backward pass over all k cotangents (``is_grads_batched``),
and per-sample rows v_nk for every other parameter with ``torch.func`` (vector-Jacobian products
of single-sample forward passes: vmapped, or looped over the samples where vmap cannot batch the
model, e.g. ``nn.LSTM`` — :func:`rows_path`), so any architecture reverse mode can differentiate
works.

:func:`capture_with_gradient` also returns the batch loss and its gradient from the same two passes
(the loss's output cotangent joins the batched backward pass): training methods whose statistics
need this pass anyway skip a separate gradient pass.

The structured path assumes, as every per-sample method does, that the model treats samples
independently (no batch statistics): :class:`~curvlab.Problem` rejects batch norm in training mode.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from curvlab import memory
from curvlab.layers import Layer, structured_layers, survey
from curvlab.linalg.layout import KronLayout
from curvlab.problem import Problem
from curvlab.vocabulary import fisher_type

__all__ = ["LayerIO", "Capture", "capture", "recording", "supported_layers", "per_sample_jacobian_rows", "FISHER_TYPES",
           "EF_PER", "output_cotangents", "sampled_output_grads", "AutodiffPath", "Trial", "autodiff_path",
           "rows_path", "ROWS_PATHS", "loss_cotangent", "capture_with_gradient", "capture_plain",
           "layer_piece", "model_holds_theta", "note_model_holds", "forget_model_holds"]


@dataclass
class LayerIO:
    """One layer's inputs and backpropagated cotangents.

    ``layer`` is the survey's :class:`~curvlab.layers.Layer` (its module, kind, parameter names and
    place in θ; the properties ``name``, ``module``, ``kind``, ``weight``, ``bias`` and ``start`` read
    it). ``a`` has shape (N, T, d_in): the layer input (convolution: unfolded patches, channel-major
    as in ``weight.flatten()``) at T positions (T = 1 without weight sharing); ``g`` has shape
    (k, N, T, d_out): ∂(u_k · f)/∂z at the layer's pre-activations. The layer's parameters sit in
    θ at ``start`` as the weight (d_out × d_in row-major) followed by the bias when ``has_bias``.
    """

    layer: Layer
    a: Tensor
    g: Tensor

    @property
    def name(self) -> str:
        """The layer's module name."""
        return self.layer.name

    @property
    def module(self) -> nn.Module:
        """The layer's module."""
        return self.layer.module

    @property
    def kind(self) -> str:
        """The layer rule's kind (``"linear"``, ``"conv2d"``)."""
        return self.layer.kind

    @property
    def weight(self) -> str:
        """The weight's parameter name."""
        return self.layer.weight

    @property
    def bias(self) -> str | None:
        """The bias's parameter name (None without one)."""
        return self.layer.bias

    @property
    def start(self) -> int:
        """Where the layer's parameters start in θ."""
        return self.layer.start

    @property
    def has_bias(self) -> bool:
        """Whether the layer has a bias (``bias`` names its parameter)."""
        return self.bias is not None

    @property
    def d_in(self) -> int:
        """Input width d_in: the last dimension of ``a`` (convolution: the unfolded patch size)."""
        return self.a.shape[-1]

    @property
    def d_out(self) -> int:
        """Output width d_out: the last dimension of ``g``."""
        return self.g.shape[-1]

    @property
    def positions(self) -> int:
        """Number T of positions the layer is applied at per sample (1 without weight sharing)."""
        return self.a.shape[1]

    @property
    def size(self) -> int:
        """Number of the layer's parameters in θ: d_out·d_in, plus d_out with a bias."""
        return self.d_out * self.d_in + (self.d_out if self.has_bias else 0)

    @property
    def stop(self) -> int:
        """End of the layer's range in θ: ``start + size``."""
        return self.start + self.size

    @property
    def layout(self) -> KronLayout:
        """The layer's folded d_out × (d_in + 1) layout [W b] (d_in without a bias) and its θ order."""
        return KronLayout.of_layer(self.d_out, self.d_in, self.has_bias)

    def jacobian_rows(self) -> Tensor:
        """Return the explicit per-sample rows v_nk = Σ_t g_nkt ⊗ ā_nt restricted to this layer, shape (k, N, size).

        ā = [a, 1] (:meth:`KronLayout.augment`); the weight and bias parts are written straight into
        their ranges in parameter order (:meth:`KronLayout.parts`).
        """
        k, n = self.g.shape[:2]
        lay = self.layout
        abar = lay.augment(self.a)
        out = torch.empty(k, n, self.size, dtype=self.g.dtype, device=self.g.device)
        for cols, rng in lay.parts():
            out[:, :, rng].view(k, n, self.d_out, -1).copy_(torch.einsum("kntp,nti->knpi", self.g, abar[..., cols]))
        return out


@dataclass
class GenericRows:
    """Explicit per-sample rows v_nk, shape (k, N, size), for parameters in θ[start:start+size]."""

    names: tuple[str, ...]
    start: int
    rows: Tensor

    @property
    def size(self) -> int:
        return self.rows.shape[-1]

    @property
    def stop(self) -> int:
        return self.start + self.size


@dataclass
class Capture:
    """What :func:`capture` returns: pieces in parameter order, covering all of θ."""

    pieces: list[LayerIO | GenericRows]
    output: Tensor
    num_samples: int


#: the Fisher types, by their output cotangents (see :func:`output_cotangents`)
FISHER_TYPES = ("type2", "mc", "empirical")


def sampled_output_grads(prob: Problem, f: Tensor, samples: int, seed: int, data: bool = False) -> Tensor:
    """∇_f ℓ_n at ``samples`` labels drawn from the model's predictive, shape (samples, N, *out).

    Draws come from a ``torch.Generator`` seeded with ``seed``: the oracle's ``fisher_mc`` and
    KFAC's ``fisher="mc"`` with the same seed see the same labels. ``data=True`` appends ∇_f ℓ_n at
    the problem's labels y_n (one more row, from the same evaluation of the likelihood).
    """
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise ValueError(f"samples must be a positive integer; got {samples!r}")
    gen = torch.Generator(device=f.device)
    gen.manual_seed(int(seed))
    if data:
        return prob.likelihood.sampled_and_data_grad_output(f, samples, gen, prob.y)
    return prob.likelihood.sampled_grad_output(f, samples, gen)


#: how the empirical Fisher groups loss terms (see :func:`output_cotangents`)
EF_PER = ("sample", "position")


def output_cotangents(prob: Problem, fisher: str, samples: int = 1, seed: int = 0,
                      per: str = "sample") -> Callable[[Tensor], Tensor]:
    """Return f ↦ the output cotangents u (k, N, *out) of a Fisher type.

    They are scaled so that Σ_n Σ_k (J_nᵀu_nk)(J_nᵀu_nk)ᵀ is exactly the oracle's matrix:

    * ``"type2"``: √R × the columns of a symmetric factor of ∇²_f ℓ_n (k = outputs) → ``ggn``
    * ``"mc"``: √(R/S) × ∇_f ℓ_n(ŷ_s), S labels ŷ_s from the model (k = S) → ``fisher_mc``
    * ``"empirical"``: √R × ∇_f ℓ_n(y_n) at the data labels (k = 1) → ``empirical_fisher``;
      with ``per="position"`` √R × ∇_f ℓ_nt for each of the T output positions t (k = T, each
      zero outside its position; :meth:`~curvlab.losses.Likelihood.split_positions`) →
      ``empirical_fisher(per="position")`` = R Σ_n Σ_t ∇ℓ_nt ∇ℓ_ntᵀ
    """
    fisher = fisher_type(fisher)  # any spelling of curvlab.vocabulary
    if per not in EF_PER:
        raise ValueError(f"unknown per={per!r}: use one of {EF_PER}")
    if per == "position" and fisher != "empirical":
        raise ValueError(f"per='position' is defined for the empirical Fisher only; got fisher={fisher!r}")
    R = prob.loss_scale
    lik = prob.likelihood
    if fisher == "type2":
        d = prob.num_outputs  # one column per output (per class and position): D·N·D numbers
        memory.check((d, prob.num_samples, d), prob.dtype, "the type-2 output cotangents",
                     'use fisher="mc" (S sampled cotangents per sample), or the matrix-free GGN '
                     '(structure="operator")')
        return lambda f: R**0.5 * lik.hessian_sqrt(f)
    if fisher == "mc":
        if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
            raise ValueError(f"samples must be a positive integer; got {samples!r}")
        def mc(f: Tensor) -> Tensor:
            return (R / samples) ** 0.5 * sampled_output_grads(prob, f, samples, seed)

        def mc_with_loss(f: Tensor) -> Tensor:  # [U; ∇_f L], both from one evaluation of the likelihood
            shape = (samples + 1,) + (1,) * f.ndim
            scale = torch.full(shape, (R / samples) ** 0.5, dtype=f.dtype, device=f.device)
            scale[-1] = R
            return sampled_output_grads(prob, f, samples, seed, data=True) * scale

        mc.with_loss = mc_with_loss  # type: ignore[attr-defined]  # used by capture_with_gradient
        return mc
    if fisher == "empirical":
        if per == "position":
            t = lik.positions(torch.empty((1, *prob.output_shape), device="meta"))
            memory.check((t, prob.num_samples, prob.num_outputs), prob.dtype,
                         "the per-position output cotangents", 'use structure="operator"')
            return lambda f: R**0.5 * lik.split_positions(lik.grad_output(f, prob.y))
        return lambda f: R**0.5 * lik.grad_output(f, prob.y)[None]
    raise ValueError(f"unknown fisher type {fisher!r}: use one of {FISHER_TYPES}")


def supported_layers(prob: Problem) -> dict[str, nn.Module]:
    """Modules whose trainable parameters get the structured (a, g) treatment, by module name.

    The verified layers of :func:`curvlab.layers.survey`: ``nn.Linear`` and ``nn.Conv2d`` (groups=1,
    zero padding) whose weight and bias are trainable, sit in θ as weight then bias, and reach the
    loss only through one call of the module (checked by tracing and by a gradient comparison).
    """
    return structured_layers(prob)


# ---------------------------------------------------------------------------------------- autodiff paths
#: exceptions by which torch says a transform is not available for an operation (vmap: a batching
#: rule or an in-place write into an unbatched tensor; forward mode / double backward: a missing
#: derivative formula); probes catch only these, and only around a tiny trial run
_UNAVAILABLE = (RuntimeError, NotImplementedError)


@dataclass(frozen=True)
class AutodiffPath:
    """Which way of differentiating works for a problem's model (probed once, cached).

    ``path`` is the first of the tried paths whose trial run succeeded (None: none did);
    ``refused`` says for each faster path why it was not taken: the module that was executing
    when torch refused (None when the failure came from a backward pass) and torch's message.
    """

    path: str | None
    refused: tuple[tuple[str, str | None, str], ...]

    def reasons(self) -> str:
        """Why the faster paths were refused, one ``path: [in module M:] error`` per path."""
        return "; ".join(f"{what}: {'' if mod is None else f'in module {mod}: '}{msg}"
                         for what, mod, msg in self.refused)

    def module(self) -> str:
        """Return the module named by the first refusal that names one ("an operation of the model" if none)."""
        return next((f"module {m}" for _, m, _ in self.refused if m is not None), "an operation of the model")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _run_locating(model: nn.Module, fn: Callable[[], object]) -> tuple[str | None, str] | None:
    """Run ``fn`` and locate where torch refused it.

    Return None if it succeeds, else (the innermost module whose forward was running when torch
    raised one of :data:`_UNAVAILABLE`, or None; the error's first line).
    """
    stack: list[str] = []

    def pre(name: str) -> Callable:
        return lambda m, _inp: stack.append(f"{name or '(root)'!r} ({type(m).__name__})")

    def post(_m: nn.Module, _inp: tuple, _out: object) -> None:
        stack.pop()

    handles = []
    for name, m in model.named_modules():
        handles += [m.register_forward_pre_hook(pre(name)), m.register_forward_hook(post)]
    try:
        fn()
    except _UNAVAILABLE as exc:
        return (stack[-1] if stack else None), _first_line(exc)
    finally:
        for h in handles:
            h.remove()
    return None


def _kernel_state() -> tuple[bool, ...]:
    """Return the attention kernels torch may pick: part of every verdict's key.

    ``torch.nn.attention.sdpa_kernel`` changes them, and only the math kernel has forward-mode and
    second derivatives.
    """
    b = torch.backends.cuda
    return (b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.math_sdp_enabled(), b.cudnn_sdp_enabled())


#: a path's name and its trial run on a few samples
Trial = tuple[str, Callable[[], object]]


def autodiff_path(prob: Problem, key: str, trials: Callable[[], list[Trial]]) -> AutodiffPath:
    """Return the first of the trials whose run succeeds (a cached verdict).

    The trials are built by ``trials()`` on a cache miss only; the verdict is cached on
    ``prob.structure_cache`` under ``key`` and the enabled attention kernels (shared with
    ``Problem.at`` / ``subset``: the same model).
    """
    key_ = (key, _kernel_state())
    cached = prob.structure_cache.get(key_)
    if cached is not None:
        return cached
    refused = []
    verdict = None
    for name, trial in trials():
        failure = _run_locating(prob.model, trial)
        if failure is None:
            verdict = AutodiffPath(name, tuple(refused))
            break
        refused.append((name, *failure))
    verdict = verdict or AutodiffPath(None, tuple(refused))
    prob.structure_cache[key_] = verdict
    return verdict


# ---------------------------------------------------------------------------------------- per-sample rows
def _single_sample_fn(model: nn.Module, rest: dict[str, Tensor], x: Tensor) -> Callable:
    def f1(p: dict[str, Tensor]) -> Tensor:
        return functional_call(model, {**rest, **p}, (x[None],))[0]

    return f1


def _rows_vmapped(model: nn.Module, rest: dict, sub: dict, X: Tensor, U: Tensor) -> dict[str, Tensor]:
    """Fast path: vmap over the samples of single-sample vjps, vmapped over the k cotangents."""
    def rows(x: Tensor, u: Tensor) -> dict[str, Tensor]:
        _, pullback = vjp(_single_sample_fn(model, rest, x), sub)
        return vmap(pullback)(u)[0]

    out = vmap(rows)(X, U.transpose(0, 1))
    return {n: t.transpose(0, 1) for n, t in out.items()}


def _rows_looped(model: nn.Module, rest: dict, sub: dict, X: Tensor, U: Tensor,
                 batched: bool) -> dict[str, Tensor]:
    """Compute the rows in reverse mode one sample at a time (one vjp per sample).

    Vmapped over the cotangents when ``batched``, else one pullback per cotangent: for modules vmap
    cannot batch over samples.
    """
    per = []
    for i in range(X.shape[0]):
        _, pullback = vjp(_single_sample_fn(model, rest, X[i]), sub)
        if batched:
            per.append(vmap(pullback)(U[:, i])[0])
        else:
            cols = [pullback(u)[0] for u in U[:, i]]
            per.append({n: torch.stack([c[n] for c in cols]) for n in sub})
    return {n: torch.stack([r[n] for r in per], dim=1) for n in sub}


#: the ways :func:`per_sample_jacobian_rows` differentiates, fastest first
ROWS_PATHS = ("vmap", "per_sample", "loop")


def rows_path(prob: Problem) -> AutodiffPath:
    """Return how per-sample Jacobian rows are computed for this model.

    The path is ``"vmap"`` (vmap over samples and cotangents), ``"per_sample"`` (a loop over
    samples, vmap over cotangents: e.g. ``nn.LSTM`` / ``nn.GRU``, whose forward writes into
    unbatched state under vmap) or ``"loop"`` (no vmap); decided by trial runs on two samples,
    cached on the problem.
    """
    model = prob.model

    def trials() -> list[Trial]:
        params = prob.params()
        sub = {n: params[n] for n in prob.param_names}
        rest = {n: t for n, t in params.items() if n not in sub}
        X = prob.X[:2]
        gen = torch.Generator(device=prob.device).manual_seed(0)
        U = torch.randn((2, X.shape[0], *prob.output_shape), generator=gen, dtype=prob.dtype, device=prob.device)
        return [("vmap", lambda: _rows_vmapped(model, rest, sub, X, U)),
                ("per_sample", lambda: _rows_looped(model, rest, sub, X[:1], U[:, :1], True)),
                ("loop", lambda: _rows_looped(model, rest, sub, X[:1], U[:, :1], False))]

    verdict = autodiff_path(prob, "autodiff.rows", trials)
    if verdict.path is None:
        raise ValueError(f"torch.func cannot differentiate model {type(model).__name__} in reverse mode: it "
                         f"refuses {verdict.module()} ({verdict.reasons()}); per-sample Jacobian rows need "
                         "torch.func's vector-Jacobian products of every operation: make that module "
                         "transformable by torch.func (see torch's message) or replace it")
    return verdict


def per_sample_jacobian_rows(prob: Problem, theta: Tensor, names: list[str], U: Tensor,
                             chunk: int | None = None) -> dict[str, Tensor]:
    """v_nk = J_nᵀ u_nk restricted to the parameters ``names``: {name: (k, N, *shape)}.

    Reverse mode only, so it works for any module ``torch.func`` can differentiate once:
    vector-Jacobian products of single-sample forward passes, vmapped over the samples and
    the k cotangents where vmap can batch the model, else looped (see :func:`rows_path`).
    ``U`` has shape (k, N, *output_shape).
    """
    params = prob.params(theta)
    sub = {n: params[n] for n in names}
    rest = {n: t for n, t in params.items() if n not in sub}
    model = prob.model
    n, k = prob.X.shape[0], U.shape[0]
    if k == 0:
        return {n_: sub[n_].new_zeros((0, n, *sub[n_].shape)) for n_ in names}
    path = rows_path(prob).path
    width = sum(sub[n_].numel() for n_ in names)
    if chunk is None:  # keep one chunk's rows near 64 MiB
        chunk = max(1, min(n, (64 * 2**20) // max(1, 8 * k * width)))
    parts = []
    for s in range(0, n, chunk):
        X, Us = prob.X[s:s + chunk], U[:, s:s + chunk]
        if path == "vmap":
            parts.append(_rows_vmapped(model, rest, sub, X, Us))
        else:
            parts.append(_rows_looped(model, rest, sub, X, Us, batched=path == "per_sample"))
    return {n_: torch.cat([p[n_] for p in parts], dim=1) for n_ in names}


Records = dict[str, list[tuple[Tensor, Tensor]]]


@contextlib.contextmanager
def recording(layers: dict[str, nn.Module]) -> Iterator[Records]:
    """Record each layer's (detached input, output z) for every call inside the ``with`` block.

    The output stays on the autograd graph (a backward pass can differentiate w.r.t. it); the
    module returns a clone, so in-place operations downstream cannot modify the recorded z. The
    hooks are removed when the block ends, also on an exception.
    """
    records: Records = {name: [] for name in layers}

    def make_hook(name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
            records[name].append((inputs[0].detach(), output))
            return output.clone()

        return hook

    handles = [m.register_forward_hook(make_hook(name)) for name, m in layers.items()]
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


def _recorded_forward(prob: Problem, theta: Tensor, layers: dict[str, nn.Module]) -> tuple[Tensor, Records]:
    """Run the forward pass at θ recording each structured layer's input and output z (on the graph)."""
    with recording(layers) as records, torch.enable_grad():
        params = {k: v.detach() for k, v in prob.params(theta).items()}
        # only the structured layers' weights require grad: that puts their outputs z on the
        # autograd graph, and the backward pass below differentiates w.r.t. those z alone
        for name in layers:
            w = (name + "." if name else "") + "weight"
            params[w] = params[w].requires_grad_(True)
        f = functional_call(prob.model, params, (prob.X,))
    return f, records


#: up to this many output cotangents, :func:`_output_grads` runs one plain backward pass each rather than
#: one vmapped pass (digits-mlp, batch 128, float32: two plain passes 97 µs, the vmapped one 128 µs; for
#: 11 cotangents the vmapped pass is 1.8× faster than a loop)
_LOOPED_BACKWARDS = 2


def _output_grads(f: Tensor, zs: list[Tensor], U: Tensor) -> list[Tensor | None]:
    """Cotangents (k, *z.shape) of the layer outputs zs for the k output cotangents U."""
    if U.shape[0] == 0:  # no cotangents (forward-only statistics, e.g. FOOF): no backward pass
        return [None] * len(zs)
    k = U.shape[0]
    if k <= _LOOPED_BACKWARDS:  # a few cotangents: plain backward passes (vmap costs ~1/3 of a gradient)
        per = [torch.autograd.grad(f, zs, grad_outputs=U[i], allow_unused=True, retain_graph=i < k - 1)
               for i in range(k)]
        return [None if per[0][j] is None else torch.stack([gs[j] for gs in per]) for j in range(len(zs))]
    return list(torch.autograd.grad(f, zs, grad_outputs=U, is_grads_batched=True, allow_unused=True))


def layer_piece(prob: Problem, name: str, module: nn.Module, a_in: Tensor, gz: Tensor) -> LayerIO:
    """Return the LayerIO of layer ``name`` from its recorded input and output cotangents gz (k, *z.shape).

    ``name`` is a layer of :func:`curvlab.layers.survey` (its :class:`~curvlab.layers.Layer` is kept).
    """
    layer = survey(prob).layers[name]
    if layer.module is not module:  # pragma: no cover - defensive: the survey is of this very model
        raise RuntimeError(f"layer {name!r} is not the surveyed module")
    rule = layer.rule
    return LayerIO(layer, rule.inputs(module, a_in), rule.grads(gz, prob.X.shape[0]))


def _layer_pieces(prob: Problem, layers: dict[str, nn.Module],
                  records: dict[str, list[tuple[Tensor, Tensor]]], f: Tensor, U: Tensor) -> list[LayerIO]:
    """One LayerIO (inputs a, backpropagated output cotangents g) per structured layer."""
    if not layers:
        return []
    zs = [records[name][0][1] for name in layers]
    pieces = []
    for (name, m), z, gz in zip(layers.items(), zs, _output_grads(f, zs, U)):
        if gz is None:
            gz = torch.zeros((U.shape[0], *z.shape), dtype=z.dtype, device=z.device)
        pieces.append(layer_piece(prob, name, m, records[name][0][0], gz))
    return pieces


def _consecutive_runs(names: list[str], covered: set[str]) -> list[list[str]]:
    """Maximal runs of consecutive parameter names outside ``covered``."""
    runs: list[list[str]] = []
    run: list[str] = []
    for p in names:
        if p in covered:
            if run:
                runs.append(run)
            run = []
        else:
            run.append(p)
    if run:
        runs.append(run)
    return runs


def _generic_pieces(prob: Problem, theta: Tensor, covered: set[str], U: Tensor) -> list[GenericRows]:
    """Explicit per-sample Jacobian rows of the parameters outside structured layers, one piece per run."""
    rest = [p for p in prob.param_names if p not in covered]
    if not rest:
        return []
    n = prob.X.shape[0]
    rows = per_sample_jacobian_rows(prob, theta, rest, U)
    return [GenericRows(tuple(run), prob.param_slices[run[0]].start,
                        torch.cat([rows[p].reshape(U.shape[0], n, -1) for p in run], dim=2))
            for run in _consecutive_runs(prob.param_names, covered)]


def capture(prob: Problem, cotangents: Callable[[Tensor], Tensor], theta: Tensor | None = None,
            layers: dict[str, nn.Module] | None = None, generic: bool = True) -> Capture:
    """Collect (a, g) for structured layers and explicit rows for all other parameters.

    ``cotangents(f)`` maps the detached model output (N, *out) to cotangents U (k, N, *out),
    already scaled as the caller wants (e.g. by √R). With ``generic=False`` parameters outside
    structured layers are skipped (the result then covers only the layers).
    """
    theta = prob.theta if theta is None else theta
    layers = supported_layers(prob) if layers is None else layers
    f, records = _recorded_forward(prob, theta, layers)
    reused = [name for name, rec in records.items() if len(rec) != 1]
    if reused:  # a layer applied several times per forward: treat it generically
        keep = {k: v for k, v in layers.items() if k not in reused}
        return capture(prob, cotangents, theta, keep, generic)

    U = cotangents(f.detach())
    pieces: list[LayerIO | GenericRows] = list(_layer_pieces(prob, layers, records, f, U))
    if generic:
        covered = {p for piece in pieces for p in ([piece.weight] + ([piece.bias] if piece.bias else []))}
        pieces.extend(_generic_pieces(prob, theta, covered, U))
    pieces.sort(key=lambda p: p.start)
    return Capture(pieces, f.detach(), prob.X.shape[0])


#: model → (θ, θ's version, its parameters' signature) noted by the one that just made them equal
_HELD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _signature(params: list[Tensor]) -> tuple:
    """Return what changes when a parameter is replaced, written in place (version counter) or given new storage."""
    return tuple((id(p), p._version, p.data_ptr()) for p in params)


def _trainable(model: nn.Module) -> list[Tensor]:
    return [p for _, p in model.named_parameters() if p.requires_grad]


def note_model_holds(model: nn.Module, theta: Tensor) -> None:
    """Record that the model's trainable parameters equal θ now (the caller has just written or read them).

    :func:`model_holds_theta` then answers from the parameters' version counters and storage instead of
    comparing values, until :func:`forget_model_holds`. Writes that bypass the version counter (in place
    through ``.data``) go unseen, so a note is meant to live only as long as one optimizer step, where
    no user code runs between the note and its use (which is also why the optimizer does not keep θ
    across steps this way: a ``p.data.clamp_(…)`` between steps would be lost).
    """
    _HELD[model] = (weakref.ref(theta), theta._version, _signature(_trainable(model)))


def forget_model_holds(model: nn.Module) -> None:
    """Drop the note of :func:`note_model_holds` (the end of an optimizer step)."""
    _HELD.pop(model, None)


def model_holds_theta(prob: Problem, theta: Tensor | None = None) -> bool:
    """Whether the model's own trainable parameters equal θ (default ``prob.theta``).

    Answered from a note of :func:`note_model_holds` for this very θ when neither θ nor a parameter has
    changed since (version counters, storage); otherwise by one concatenation and comparison.
    """
    theta = prob.theta if theta is None else theta
    params = _trainable(prob.model)
    held = _HELD.get(prob.model)
    if held is not None and held[0]() is theta and held[1] == theta._version and held[2] == _signature(params):
        return True
    if sum(p.numel() for p in params) != theta.numel():
        return False
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    return flat.dtype == theta.dtype and flat.device == theta.device and bool(torch.equal(flat, theta))


def capture_plain(prob: Problem, cotangents: Callable[[Tensor], Tensor],
                  layers: dict[str, nn.Module] | None = None, theta: Tensor | None = None) -> Capture | None:
    """:func:`capture` by a plain call of the model, whose own parameters must hold θ; layers only.

    The forward pass is ``prob.model(prob.X)`` with the layers' inputs and outputs recorded
    (:func:`recording`; no ``functional_call``), then the same batched backward pass to those outputs
    and the same pieces as :func:`capture` with ``generic=False``. Returns None when that does not
    apply (a layer not called exactly once on these data, an output off the autograd graph, e.g. a
    frozen layer on inputs without gradients, or model parameters that do not hold θ = ``theta``,
    default ``prob.theta``, checked by one concatenation and comparison): then use :func:`capture`.
    """
    layers = supported_layers(prob) if layers is None else layers
    if not model_holds_theta(prob, theta):
        return None
    with recording(layers) as records, torch.enable_grad():
        f = prob.model(prob.X)
    if any(len(rec) != 1 or not rec[0][1].requires_grad for rec in records.values()):
        return None
    U = cotangents(f.detach())
    pieces = sorted(_layer_pieces(prob, layers, records, f, U), key=lambda p: p.start)
    return Capture(pieces, f.detach(), prob.X.shape[0])


# ---------------------------------------------------------------------------------------- fused loss gradient
def loss_cotangent(prob: Problem) -> Callable[[Tensor], Tensor]:
    """Return f ↦ ∇_f L = R ∇_f ℓ_n, shape (N, *out).

    It is the output cotangent whose backpropagation is ∇L(θ) (L = R Σ_n ℓ_n, the user's loss with
    its reduction; :mod:`curvlab.losses`).
    """
    R, lik, y = prob.loss_scale, prob.likelihood, prob.y
    return lambda f: R * lik.grad_output(f, y)


def _take_gradient(piece: LayerIO | GenericRows, grad: Tensor, row: int, scale: float) -> None:
    """Write ``scale`` × the parameter gradient of cotangent ``row`` of ``piece`` into ``grad``.

    A layer: ∇W = Σ_n Σ_t g_nt a_ntᵀ (d_out × d_in, row-major as ``weight.flatten()``; convolution:
    over the unfolded patches), ∇b = Σ_n Σ_t g_nt; other parameters: Σ_n v_n, the rows' sum.
    """
    if isinstance(piece, GenericRows):
        grad[piece.start:piece.stop] = piece.rows[row].sum(dim=0)
    else:
        g = piece.g[row].reshape(-1, piece.d_out)  # (N·T, d_out): the cotangent at every sample and position
        w_stop = piece.start + piece.d_out * piece.d_in
        torch.mm(g.T, piece.a.reshape(-1, piece.d_in), out=grad[piece.start:w_stop].view(piece.d_out, piece.d_in))
        if piece.has_bias:
            torch.sum(g, dim=0, out=grad[w_stop:piece.stop])
    if scale != 1.0:
        grad[piece.start:piece.stop] *= scale


def _drop_last(piece: LayerIO | GenericRows) -> None:
    if isinstance(piece, GenericRows):
        piece.rows = piece.rows[:-1]
    else:
        piece.g = piece.g[:-1]


def capture_with_gradient(prob: Problem, cotangents: Callable[[Tensor], Tensor], theta: Tensor | None = None,
                          layers: dict[str, nn.Module] | None = None, generic: bool = True,
                          loss_row: float | None = None, plain: bool = False) -> tuple[Capture, Tensor, Tensor | None]:
    """:func:`capture` plus the batch loss L(θ) and its gradient ∇L(θ) from the same two passes.

    The loss's output cotangent ∇_f L (:func:`loss_cotangent`) is appended to ``cotangents(f)`` (by
    ``cotangents.with_loss(f)`` where the cotangents offer it: the Monte-Carlo ones of
    :func:`output_cotangents` draw their labels and take ∇_f L from one evaluation), so the
    batched backward pass backpropagates it with the others (a plain backward pass when ``cotangents``
    gives none); the gradient is read off the captured pieces (:func:`_take_gradient`) and that
    cotangent dropped, so the :class:`Capture` is exactly :func:`capture`'s. When ∇_f L is already
    ``loss_row`` × the first cotangent (the empirical Fisher's √R ∇_f ℓ_n: ``loss_row`` = √R) nothing
    is appended and the gradient is ``loss_row`` × that cotangent's. Returns (capture, loss as a 0-d
    tensor, flat gradient (P,)); the gradient is None when the pieces do not cover θ (``generic=False``
    with parameters outside structured layers). ``plain=True``: the passes are :func:`capture_plain`'s
    (a plain call of the model, whose parameters must hold θ) where it applies (``generic=False``).
    """
    grad_output = loss_cotangent(prob)

    def fused(f: Tensor) -> Tensor:
        U = cotangents(f)
        return torch.cat([U, grad_output(f)[None].to(U.dtype)])

    fused = getattr(cotangents, "with_loss", fused)  # the cotangents' own [U; ∇_f L] (output_cotangents' "mc")

    theta = prob.theta if theta is None else theta
    cot = cotangents if loss_row is not None else fused
    cap = capture_plain(prob, cot, layers, theta) if plain and not generic else None
    cap = capture(prob, cot, theta, layers, generic) if cap is None else cap
    grad = torch.empty(prob.num_params, dtype=theta.dtype, device=theta.device)
    for piece in cap.pieces:
        _take_gradient(piece, grad, 0 if loss_row is not None else -1, 1.0 if loss_row is None else loss_row)
        if loss_row is None:
            _drop_last(piece)
    covered = sum(p.size for p in cap.pieces) == prob.num_params
    with torch.no_grad():
        loss = prob.likelihood.loss(cap.output, prob.y)
    return cap, loss, grad if covered else None
