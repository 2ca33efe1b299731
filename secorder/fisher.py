"""Fisher, GGN and empirical-Fisher transforms: :func:`fisher_trace`, :func:`fisher_diagonal`.

Definitions
-----------
Let ``z = model_fn(θ, X)`` be the outputs of shape ``(N, *out)`` (the batch first), N the
number of samples and L(θ) = loss(z, Y) with the given reduction. l_n is the loss of
sample n alone, scaled so that

    L = (1/N) Σ_n l_n  (``reduction="mean"``)      L = Σ_n l_n  (``reduction="sum"``),

i.e. L = c Σ_n l_n with c = 1/N or 1. Concretely, with m = the number of entries of one
sample that the reduction averages over (m = 1 for ``"sum"``):

* ``"cross_entropy"``: logits ``(N, C)`` or ``(N, C, d1, ...)`` and integer targets
  ``(N,)`` or ``(N, d1, ...)``. With extra dimensions (sequence positions, pixels) each
  sample n is *one* item whose loss l_n is the mean (``"mean"``, m = d1·d2·…) or the sum
  (``"sum"``) of its positions' cross-entropies — exactly how
  ``F.cross_entropy(z, Y, reduction=...)`` combines them, L = (1/(N m)) Σ_{n,t} ce_{n,t}.
  A position is not a sample: the empirical Fisher uses the gradient of each sample's
  whole loss.
* ``"mse"``: targets shaped like z; ``F.mse_loss`` with ``"mean"`` averages over all N×D
  elements, so l_n is the mean over that sample's D outputs (m = D).
* ``"bce_with_logits"``: targets shaped like z, in [0, 1]; l_n the mean (m = D) or sum of
  that sample's elementwise losses.
* a callable ``loss(outputs, targets) -> scalar`` (``kind="ggn"`` and ``"empirical"``):
  l_n = loss(z[n:n+1], Y[n:n+1]); ``loss(z, Y)`` must equal the mean (``"mean"``) or the
  sum (``"sum"``) of these, which is checked on the values (eager mode). The output
  Hessian comes from autodiff.

Precision: float16/bfloat16 parameters are accepted; the model and the products run in that
dtype, every sum in float32, and results come back in float32; exact values then come from
one-hot operator products (path ``"one_hot"``), see ``docs/transforms.rst``, "Precision".

The three kinds, all P×P over the parameters θ (J = ∂z/∂θ, J_n sample n's rows):

* ``kind="ggn"``: G = Jᵀ (∇²_z L) J = c Σ_n J_nᵀ (∇²_{z_n} l_n) J_n. For cross-entropy and
  BCE this is the Fisher information of the model's predictive distribution.
* ``kind="empirical"``: E = c Σ_n ∇l_n ∇l_nᵀ, so tr(E) = (1/N) Σ_n ‖∇l_n‖² for ``"mean"``.
* ``kind="mc"``: the Monte-Carlo Fisher (c/K) Σ_n Σ_k g_{n,k} g_{n,k}ᵀ with K =
  ``num_probes`` samples per datum: each target replaced by a draw from the model's
  predictive distribution (categorical over softmax(z), Bernoulli(σ(z)), and for MSE a
  Gaussian around z), g_{n,k} the resulting gradient rescaled so that E[g gᵀ] equals
  J_nᵀ ∇²_{z_n} l_n J_n exactly (see :meth:`secorder._losses._BuiltinLoss.sample_columns`;
  for MSE this is ŷ ~ N(z, (m/2)·I)). Hence E[mc] = G.

Estimation
----------
* ``num_probes=None`` (``"ggn"``, ``"empirical"``): exact. diag(A) = c Σ_n Σ_r
  (J_nᵀ s_{n,r})², where s_{n,r} are the columns of a square-root factor of the
  output-space matrix (for the GGN: of ∇²_{z_n} l_n — C per position for cross-entropy,
  D for MSE/BCE; for the empirical Fisher the single column ∇_{z_n} l_n; for the MC
  Fisher the K sampled gradients). Cost: R backward passes for R columns. The trace is
  the sum of the diagonal.
* ``num_probes=K`` (``"ggn"``, ``"empirical"``): the randomized estimator named by
  ``method`` (Hutchinson by default) on the operator of :mod:`secorder._fisher_operators`:
  vᵀ G v = (J v)ᵀ ∇²_z L (J v) costs one forward-mode Jacobian-vector product per probe,
  much cheaper than a Hessian-vector product. Probes are batched with ``vmap``,
  ``chunk_size`` at a time.

Paths
-----
For an ``nn.Module`` the exact computations (and ``"mc"``) take a fast path by default
(:mod:`secorder._layers`): one forward pass with hooks records each supported layer's
inputs and outputs (``nn.Linear`` with or without extra leading dimensions,
``nn.Conv2d``, ``nn.Embedding``, ``nn.LayerNorm``, ``nn.RMSNorm``, their biases), one
ordinary backward pass per factor column gives the layer output gradients, and matrix
products form the squared per-sample gradients without materializing N×P of them. Any
other parameter (other layer types, shared weights, a weight used outside its layer) is
computed by the generic ``torch.func`` route (per-sample vector-Jacobian products under
``vmap``), which works for any model that treats samples independently. Under
``torch.func`` transforms (e.g. ``vmap`` over an ensemble) everything takes the generic
route. Choose with ``path="auto" | "generic" | "fast"``; after each call the returned
function's ``path_info`` attribute (a :class:`FisherPath`) says which parameters took which
route.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from secorder import probes as _probes
from secorder._chunking import check_chunk_size
from secorder._errors import error
from secorder._fisher_operators import EmpiricalFisherOperator, GGNOperator, MCFisherOperator
from secorder._kernels import with_decomposed_kernels
from secorder._layers import FastCapture
from secorder._losses import KINDS, Factor, LossSpec, resolve_loss
from secorder._persample import ColumnAccumulator, check_same_outputs, input_dims, per_sample_columns
from secorder._pytree import TreeSpec, check_floating_tree, flatten, unflatten, unravel
from secorder._select import Selector, check_select, split
from secorder._validate import (
    call_deterministic,
    check_bool,
    check_deterministic_module,
    check_finite_enabled,
    check_method,
    check_module_call,
    check_num_probes,
    check_requires_no_grad,
    check_same_dtype_device,
    half_precision_refusal,
)
from secorder.estimators import (
    BLOCK_TRACE_ESTIMATORS,
    DIAGONAL_ESTIMATORS,
    TRACE_ESTIMATORS,
    check_min_probes,
    exact_diagonal,
)
from secorder.modules import module_forward, unwrap_module
from secorder.operators import in_functorch_transform

__all__ = ["PATHS", "FisherPath", "fisher_diagonal", "fisher_operator", "fisher_trace"]

PATHS = ("auto", "generic", "fast")


class FisherPath(NamedTuple):
    """Which route computed a call: ``path`` is ``"fast"``, ``"generic"``, ``"fast+generic"``,
    ``"hutchinson"`` (the operator route) or ``"one_hot"`` (one-hot products of the operator:
    exact values of float16/bfloat16 parameters); ``fast``/``generic`` name the parameters (dict keys,
    or leaf positions for other pytrees) of each route."""

    path: str
    fast: tuple[str, ...]
    generic: tuple[str, ...]


class _Setup(NamedTuple):
    call: str
    model_fn: Callable[[Any, Any], Any] | None
    module: nn.Module | None
    loss: LossSpec
    kind: str
    num_probes: int | None
    chunk_size: int | None
    with_stderr: bool
    estimator: Callable[..., tuple[Tensor, Tensor]]
    distribution: str
    path: str
    selector: Selector | None
    per_sample: bool = False


def _configure(
    call: str,
    model_fn: object,
    loss: object,
    kind: object,
    num_probes: object,
    reduction: object,
    chunk_size: object,
    with_stderr: object,
    method: object,
    distribution: object,
    path: object,
    registry: Mapping[str, Callable[..., tuple[Tensor, Tensor]]],
    select: object = None,
    per_sample: object = False,
) -> _Setup:
    """Construction-time validation shared by the transforms."""
    model_fn = unwrap_module(model_fn)
    module = model_fn if isinstance(model_fn, nn.Module) else None
    if module is None and not callable(model_fn):
        raise error(
            call,
            "model_fn must be an nn.Module or a callable model_fn(params, inputs) -> outputs",
            f"a {type(model_fn).__name__}",
            "Pass the model itself, or e.g. lambda p, x: torch.func.functional_call(model, p, (x,)).",
            cls=TypeError,
        )
    if kind not in KINDS:
        raise error(
            call,
            f"kind must be one of {', '.join(repr(k) for k in KINDS)}",
            f"{kind!r}",
            "Use kind='ggn' (the Fisher of the predictive distribution), 'empirical' or 'mc'.",
        )
    loss_spec = resolve_loss(call, loss, reduction, str(kind))
    probes = check_num_probes(call, num_probes)
    if kind == "mc" and probes is None:
        raise error(
            call,
            "kind='mc' needs num_probes, the number of sampled targets per datum",
            "num_probes=None",
            "Pass e.g. num_probes=1 (unbiased) or more samples for a lower variance; for the exact "
            "Fisher use kind='ggn'.",
        )
    check_chunk_size(call, chunk_size)
    check_bool(call, "with_stderr", with_stderr)
    estimator = check_method(call, method, registry)
    if kind != "mc":  # for the MC Fisher num_probes counts sampled targets, not products
        check_min_probes(call, str(method), probes)
    _probes.check_distribution(call, distribution)
    if path not in PATHS:
        raise error(
            call,
            f"path must be one of {', '.join(repr(p) for p in PATHS)}",
            f"{path!r}",
            "Use path='auto' (fast layers where possible) or 'generic' (torch.func everywhere).",
        )
    if path == "fast":
        if module is None:
            raise error(
                call,
                "path='fast' needs an nn.Module (it hooks the module's layers)",
                f"a {type(model_fn).__name__}",
                "Pass the nn.Module as model_fn, or use path='auto'/'generic' for plain functions.",
            )
        if probes is not None and kind != "mc":
            raise error(
                call,
                "path='fast' applies to the exact computations (num_probes=None) and kind='mc'",
                f"num_probes={probes} with kind={kind!r} (a randomized estimate on the operator route)",
                "Drop path= (the Hutchinson estimate uses forward-mode products of the whole model), "
                "or pass num_probes=None for the exact value.",
            )
    check_bool(call, "per_sample", per_sample)
    if per_sample and (kind == "mc" or probes is not None):
        raise error(
            call,
            "per_sample=True is exact (kind='ggn' or 'empirical', num_probes=None): the squares are "
            "formed per sample by the structured sweep",
            f"per_sample=True with kind={kind!r}, num_probes={probes}",
            "Drop num_probes and use kind='ggn' (the expectation the MC Fisher estimates) or "
            "'empirical', or drop per_sample.",
        )
    if per_sample and path == "fast":
        raise error(
            call,
            "per_sample=True runs on the structured sweep over a tape of the whole batch, not the "
            "module's layer hooks (path='fast')",
            "per_sample=True with path='fast'",
            "Use path='auto'.",
        )
    return _Setup(
        call,
        None if module is not None else model_fn,  # type: ignore[arg-type]
        module,
        loss_spec,
        str(kind),
        probes,
        chunk_size,  # type: ignore[arg-type]
        bool(with_stderr),
        estimator,
        str(distribution),
        str(path),
        check_select(call, select),
        bool(per_sample),
    )


def _check_module(call: str, model: nn.Module, per_sample: bool) -> None:
    """Refuse modules whose outputs are random or couple the samples of a batch."""
    check_deterministic_module(call, model)
    for name, m in model.named_modules():
        if per_sample and isinstance(m, nn.modules.batchnorm._BatchNorm):
            batch_stats = m.training or not m.track_running_stats or m.running_mean is None
            if batch_stats:
                raise error(
                    call,
                    "per-sample quantities (kind='empirical', kind='mc' and the exact GGN) need a "
                    "model that treats the samples of a batch independently",
                    f"{type(m).__name__} at '{name}' normalizing with batch statistics "
                    f"({'train mode' if m.training else 'track_running_stats=False'})",
                    "Call model.eval() to use the running statistics, or use kind='ggn' with "
                    "num_probes (Hutchinson), which is defined through the whole batch's Jacobian.",
                )


def _check_outputs(call: str, z: object, eager: bool) -> Tensor:
    if not isinstance(z, Tensor):
        raise error(
            call,
            "model_fn must return a tensor of outputs with the batch as dimension 0",
            f"a {type(z).__name__}",
            "Wrap the model to return only the logits/predictions, e.g. lambda p, x: f(p, x).logits.",
            cls=TypeError,
        )
    if z.dim() == 0 or not z.is_floating_point():
        raise error(
            call,
            "model_fn must return a floating tensor of shape (N, ...) with the batch first",
            f"a tensor of shape {tuple(z.shape)} and dtype {z.dtype}",
            "Return per-sample outputs (not the loss) in floating point.",
        )
    if eager and check_finite_enabled():
        finite = torch.isfinite(z)
        if not bool(finite.all()):
            bad = (~finite).nonzero()
            samples = sorted({int(i) for i in bad[:, 0]})
            n_nan, n_inf = int(torch.isnan(z).sum()), int(torch.isinf(z).sum())
            shown = ", ".join(str(s) for s in samples[:10]) + (", ..." if len(samples) > 10 else "")
            raise error(
                call,
                "the model outputs must be finite",
                f"{n_nan} NaN and {n_inf} infinite output entries, in samples [{shown}] "
                f"(first at outputs{tuple(int(i) for i in bad[0])})",
                "Check those samples' inputs and the parameters (e.g. all(torch.isfinite(p).all() "
                "for p in params.values())); a diverged training run needs a smaller step size.",
            )
    return z


def _check_independent(call: str, fn: Callable[[Any], Tensor], inputs: Any, z: Tensor) -> None:
    """Compare the outputs of the first N-1 samples run as a smaller batch with the batch outputs."""
    n = z.shape[0]
    if n < 2:
        return
    x_leaves, x_spec, dims = input_dims(inputs, n)
    sub = unflatten(x_spec, [a[: n - 1] if d == 0 else a for a, d in zip(x_leaves, dims)])
    try:
        z_sub = fn(sub)
    except Exception as exc:
        raise error(
            call,
            "per-sample quantities need a model that treats samples independently and runs on any batch size",
            f"an error when running the first {n - 1} samples: {type(exc).__name__}: {exc}",
            "Make the model batch-size agnostic, or use kind='ggn' with num_probes.",
        ) from exc
    check_same_outputs(call, z_sub, z[: n - 1], f"the batch shrinks from {n} to {n - 1} samples")


def _leaf_names(params: Any, count: int) -> list[str]:
    if isinstance(params, dict) and all(isinstance(k, str) for k in params):
        names, _ = flatten({k: k for k in params})
        if len(names) == count:
            return [str(n) for n in names]
    return [str(i) for i in range(count)]


@with_decomposed_kernels
def _run(
    s: _Setup, params: Any, inputs: Any, targets: Any, generator: torch.Generator | None, trace: bool
) -> tuple[Any, Any, list[Tensor], TreeSpec, FisherPath]:
    """Evaluate the configured quantity: flat diagonal (or 0-dim trace), stderr, leaves, spec, path;
    with ``per_sample`` the per-leaf rows (N, *shape) and None (or the (N,) traces and zeros)."""
    call = s.call
    full = params
    params, restore = split(call, s.selector, params)
    leaves, spec = check_floating_tree(call, "params", params)
    check_same_dtype_device(call, "params", leaves)
    check_module_call(call, s.module, full, leaves, (inputs, targets))
    gen = _probes.check_generator(call, generator, leaves[0].device)
    transformed = in_functorch_transform(leaves)
    hutchinson = s.num_probes is not None and s.kind != "mc"
    per_sample = not (hutchinson and s.kind == "ggn")
    names = _leaf_names(params, len(leaves))

    if s.module is not None:
        _check_module(call, s.module, per_sample)
        forward, _ = module_forward(s.module)
    else:
        assert s.model_fn is not None
        forward = s.model_fn

    def fn(ls: list[Tensor], x: Any) -> Any:
        return call_deterministic(call, forward, leaves, restore(unflatten(spec, ls)), x)

    # float16/bfloat16: the column routes sum squares in the parameters' dtype; the exact values
    # come from one-hot products of the operator instead (float32 accumulation at its boundary)
    half = half_precision_refusal(leaves, "the column route (per-layer, sweep or per-sample columns)")
    use_fast = (
        half is None
        and s.module is not None
        and not s.per_sample
        and not hutchinson
        and s.path != "generic"
        and not transformed
        and isinstance(params, dict)
    )
    if s.path == "fast" and not use_fast:
        raise error(
            call,
            "path='fast' runs eagerly on a dict of parameters, outside torch.func transforms",
            "a call inside vmap/grad/jvp" if transformed else f"params of type {type(params).__name__}",
            "Use path='auto' (which switches to the generic route there) or path='generic'.",
        )
    needs_graph = torch.is_grad_enabled() and any(leaf.requires_grad for leaf in leaves)
    capture: FastCapture | None = None
    if use_fast:
        assert s.module is not None
        capture = FastCapture(s.module, names, leaves, create_graph=needs_graph)
        if not capture.fast_indices and s.path != "fast":
            capture = None
    tape = None
    if capture is None and half is None and _engine_route(s, transformed, needs_graph, hutchinson):
        tape = _record_outputs(fn, leaves, inputs)  # the engine's tape gives z: one forward pass
    if capture is not None:
        z = capture.forward(lambda ls: fn(ls, inputs))
    else:
        z = tape.result if tape is not None else fn(leaves, inputs)
    z = _check_outputs(call, z, eager=not transformed)
    s.loss.check(call, z, targets)
    scale = s.loss.scale(z)
    if per_sample and s.module is None and not transformed:
        # Every per-sample route (exact GGN by columns, empirical, MC, Hutchinson on the
        # empirical Fisher) evaluates samples apart: one check for all of them, so a model
        # tied to its batch size gets the same clear error on every route.
        _check_independent(call, lambda x: fn(leaves, x), inputs, z)

    if s.per_sample and half is not None:
        raise error(
            call,
            "per_sample=True comes from the structured sweep, which sums squares in the parameters' dtype",
            half,
            "Cast the parameters and inputs to float32 for per-sample values, or drop per_sample "
            "(the batch value of half-precision parameters is accumulated in float32).",
        )
    if s.per_sample:
        rows = [
            r.mul_(scale)
            for r in _per_sample_rows(s, fn, leaves, inputs, targets, z, transformed, needs_graph)
        ]
        info = FisherPath("fast", tuple(names), ())
        if trace:  # (N,)
            est = sum((r.flatten(1).sum(1) for r in rows[1:]), start=rows[0].flatten(1).sum(1))
            return est, torch.zeros_like(est), leaves, spec, info
        return rows, None, leaves, spec, info  # per-leaf rows (N, *shape), no stderr

    if hutchinson:
        assert s.num_probes is not None
        op: GGNOperator | EmpiricalFisherOperator
        if s.kind == "ggn":
            op = GGNOperator(lambda ls: fn(ls, inputs), leaves, s.loss, z, targets, call)
        else:
            cols = s.loss.per_sample_grads(z, targets).unsqueeze(0)
            op = EmpiricalFisherOperator(lambda ls: fn(ls, inputs), leaves, cols, scale, z, call=call)
        est, err = s.estimator(
            op, s.num_probes, distribution=s.distribution, generator=gen, chunk_size=s.chunk_size
        )
        return est, err, leaves, spec, FisherPath("hutchinson", (), tuple(names))

    if half is not None:
        est, err = _half_exact(s, fn, leaves, inputs, targets, z, scale, gen, trace)
        return est, err, leaves, spec, FisherPath("one_hot", (), tuple(names))

    z_factor = z if (capture is None or needs_graph) else z.detach()
    factor: Factor
    if s.kind == "ggn":
        factor = s.loss.factor(z_factor, targets)
    elif s.kind == "empirical":
        factor = Factor.from_tensor(s.loss.per_sample_grads(z_factor, targets).unsqueeze(0))
    else:
        assert s.num_probes is not None
        factor = Factor.from_tensor(s.loss.sample_columns(z_factor, s.num_probes, gen))
    per_column = s.kind == "mc" and s.with_stderr
    acc = ColumnAccumulator(
        [leaf.shape for leaf in leaves], factor.num_columns, trace=trace, per_column=per_column, like=z
    )
    generic = list(range(len(leaves)))
    swept = False
    if capture is not None:
        capture.accumulate(z, factor, acc, trace=trace, per_column=per_column)
        generic = capture.generic_indices
    elif _engine_route(s, transformed, needs_graph, hutchinson):
        swept = _engine_accumulate(s, fn, leaves, inputs, z, factor, acc, tape)
        if swept:
            generic = []
    if generic:
        per_sample_columns(
            call,
            fn,
            leaves,
            generic,
            inputs,
            z,
            factor,
            acc,
            chunk_size=s.chunk_size,
            check_independence=not transformed,
        )
    est, err = acc.result(average=s.kind == "mc", scale=scale)
    fast = list(range(len(leaves))) if swept else ([] if capture is None else capture.fast_indices)
    label = "fast+generic" if fast and generic else ("fast" if fast else "generic")
    info = FisherPath(label, tuple(names[i] for i in fast), tuple(names[i] for i in generic))
    return est, err, leaves, spec, info


def _half_exact(
    s: _Setup,
    fn: Callable[[list[Tensor], Any], Any],
    leaves: list[Tensor],
    inputs: Any,
    targets: Any,
    z: Tensor,
    scale: float,
    gen: torch.Generator | None,
    trace: bool,
) -> tuple[Tensor, Tensor]:
    """The exact GGN / empirical Fisher (or the MC Fisher of the drawn targets) of half-precision
    parameters: the diagonal from P one-hot products of the operator, each formed in the
    parameters' dtype and accumulated in float32 (``_pytree.accumulating``)."""
    if s.kind == "mc" and s.with_stderr:
        raise error(
            s.call,
            "with_stderr=True of the MC Fisher needs the per-draw column route, which sums squares "
            "in the parameters' dtype",
            half_precision_refusal(leaves, "the column route") or "",
            "Drop with_stderr, or cast the parameters and inputs to float32.",
        )
    op: GGNOperator | EmpiricalFisherOperator

    def g(ls: list[Tensor]) -> Any:
        return fn(ls, inputs)

    if s.kind == "ggn":
        op = GGNOperator(g, leaves, s.loss, z, targets, s.call)
    elif s.kind == "empirical":
        cols = s.loss.per_sample_grads(z, targets).unsqueeze(0)
        op = EmpiricalFisherOperator(g, leaves, cols, scale, z, call=s.call)
    else:
        assert s.num_probes is not None
        op = MCFisherOperator(g, leaves, s.loss, z, s.num_probes, gen, s.call)
    diag = exact_diagonal(op, chunk_size=s.chunk_size)
    est = diag.sum() if trace else diag
    return est, torch.zeros_like(est)


def _per_sample_rows(
    s: _Setup,
    fn: Callable[[list[Tensor], Any], Any],
    leaves: list[Tensor],
    inputs: Any,
    targets: Any,
    z: Tensor,
    transformed: bool,
    needs_graph: bool,
) -> list[Tensor]:
    """``per_sample=True``: rows (N, *leaf.shape) of Σ_r w_{n,r} (J_nᵀ s_{n,r})^⊙2 (before the
    reduction's scale) from the structured sweep; an error naming why where it cannot run."""
    from secorder._engine.sweep import EngineUnsupportedError, engine_output_diagonal

    call = s.call
    why = None
    if transformed:
        why = "inside a torch.func transform (the sweep records the function eagerly as a tape)"
    elif needs_graph:
        check_requires_no_grad(
            call,
            leaves,
            "per_sample=True",
            "Per-sample rows come from the structured sweep, which is not differentiable.",
        )
    data = (
        [inputs] if isinstance(inputs, Tensor) else list(inputs) if isinstance(inputs, (tuple, list)) else []
    )
    n = int(z.shape[0]) if z.dim() > 0 else -1
    if why is None and (
        not data or not all(isinstance(d, Tensor) and d.dim() > 0 and d.shape[0] == n for d in data)
    ):
        why = "the inputs must be a tensor (or a tuple of tensors) batched along dimension 0"
    if why is None:
        zd = z.detach()
        factor = (
            s.loss.factor(zd, targets)
            if s.kind == "ggn"
            else Factor.from_tensor(s.loss.per_sample_grads(zd, targets).unsqueeze(0))
        )
        try:
            return engine_output_diagonal(
                lambda ls: fn(ls, inputs),
                leaves,
                data,
                factor.columns,
                factor.weights,
                factor.num_columns,
                chunk_size=s.chunk_size,
                per_sample=True,
            )
        except EngineUnsupportedError as exc:
            why = f"the structured sweep refused: {exc.args[0]}"
    raise error(
        call,
        "per_sample=True needs the structured sweep: an eager call whose parameters do not require "
        "grad, inputs batched along dimension 0, the samples independent and every op covered by a rule",
        why,
        "Call it outside torch.func transforms on inputs batched along dimension 0 (a tensor or a "
        "tuple of tensors), or evaluate each sample alone, or drop per_sample.",
        cls=RuntimeError if transformed else ValueError,
    )


def _engine_route(s: _Setup, transformed: bool, needs_graph: bool, hutchinson: bool) -> bool:
    """Whether the exact GGN / empirical Fisher of a plain ``model_fn`` tries the structured sweep."""
    return (
        s.kind != "mc"
        and s.path != "generic"
        and not transformed
        and not needs_graph
        and not s.per_sample
        and not hutchinson
    )


def _record_outputs(fn: Callable[[list[Tensor], Any], Any], leaves: list[Tensor], inputs: Any) -> Any:
    """A tape of ``fn(leaves, inputs)`` for the structured sweep, whose result is the outputs z
    (None where it cannot be recorded: the caller evaluates ``fn`` itself, so a user's own
    exception passes through from that call)."""
    from secorder._engine.tape import TapeUnsupportedError, record

    try:
        return record(lambda ls: fn(ls, inputs), leaves)
    except TapeUnsupportedError:
        return None


def _engine_accumulate(
    s: _Setup,
    fn: Callable[[list[Tensor], Any], Any],
    leaves: list[Tensor],
    inputs: Any,
    z: Tensor,
    factor: Factor,
    acc: ColumnAccumulator,
    tape: Any = None,
) -> bool:
    """The exact GGN / empirical Fisher of a plain ``model_fn`` by the structured sweep over a
    tape of the whole batch (:func:`secorder._engine.sweep.engine_output_diagonal`: the loss
    node's columns only, squared per-sample gradients at the layers' tape ops, the per-sample
    structure proven on the tape); False (nothing added) where it does not apply."""
    from secorder._engine.sweep import EngineUnsupportedError, engine_output_diagonal

    data = (
        [inputs] if isinstance(inputs, Tensor) else list(inputs) if isinstance(inputs, (tuple, list)) else []
    )
    n = int(z.shape[0]) if z.dim() > 0 else -1
    if not data or not all(isinstance(d, Tensor) and d.dim() > 0 and d.shape[0] == n for d in data):
        return False
    try:
        diag = engine_output_diagonal(
            lambda ls: fn(ls, inputs),
            leaves,
            data,
            factor.columns,
            factor.weights,
            factor.num_columns,
            chunk_size=s.chunk_size,
            tape=tape,
        )
    except EngineUnsupportedError:
        return False
    for i, d in enumerate(diag):
        acc.add_total(i, d)
    return True


_COMMON_ARGS = """
    Args:
        model_fn: ``model_fn(params, inputs) -> outputs`` with the batch first, or an
            ``nn.Module`` (then ``params`` is a dict like ``dict(model.named_parameters())``
            and ``inputs`` a tensor or a tuple of positional inputs; the module is never
            mutated).
        loss: ``"cross_entropy"``, ``"mse"``, ``"bce_with_logits"``, or (``kind="ggn"``,
            ``"empirical"``) a callable ``loss(outputs, targets) -> scalar``.
        kind: ``"ggn"``, ``"empirical"`` or ``"mc"`` (see :mod:`secorder.fisher`).
        num_probes: ``None`` for the exact value (``"ggn"``, ``"empirical"``); K random
            probes for the estimator ``method``; for ``"mc"`` the number of sampled
            targets per datum (required).
        reduction: ``"mean"`` or ``"sum"``, as in ``torch.nn.functional``.
        chunk_size: rows (probes, or per-sample gradients on the generic exact route)
            formed at once; ``None`` sizes them from the memory budget.
        with_stderr: also return the standard error (over probes for Hutchinson, over the
            K draws for ``"mc"`` (NaN for K = 1), zeros when exact).
        method: the randomized estimator for ``num_probes`` (a key of the registries in
            :mod:`secorder.estimators`).
        distribution: the probe distribution for ``method``: ``"rademacher"``, ``"gaussian"``
            or ``"sphere"`` (:mod:`secorder.probes`).
        path: ``"auto"``, ``"generic"`` or ``"fast"`` (see :mod:`secorder.fisher`).
        select: compute over a subset of ``params`` (a dict keyed by name): a glob, a list
            of globs, a compiled regex or a predicate on names; the other parameters are
            held fixed and results hold only the selected entries; the cost scales with the
            selection (e.g. ``select="fc.*"`` for the last layer; :mod:`secorder._select`).
        per_sample: exact per-sample values with a leading batch axis N (``kind`` ``"ggn"``
            or ``"empirical"``, ``num_probes=None``): row n is c Σ_r (J_nᵀ s_{n,r})^⊙2 for
            the diagonal (its sum for the trace), c = 1/N for ``reduction="mean"`` and 1 for
            ``"sum"``, so each row carries the reduction's 1/N and the rows sum to the batch
            value. Squares per sample from the structured sweep over a tape of the whole
            batch (:mod:`secorder._engine.sweep`), never a loop over samples; where it cannot
            run (under ``torch.func`` transforms, parameters that require grad, an op that
            mixes samples or has no rule) an error says why.
"""

_RAISES = """
    Raises:
        SecorderError, TypeError: invalid options (at construction); at call time, targets
            that do not fit the loss (dtype, shape, batch size, range), non-finite outputs,
            a model whose outputs are random (dropout in train mode) or, for per-sample
            quantities, couple the samples of a batch (BatchNorm in train mode).
"""


def fisher_trace(
    model_fn: Callable[[Any, Any], Any] | nn.Module,
    loss: str | Callable[[Tensor, Any], Tensor],
    /,
    *,
    kind: str = "ggn",
    num_probes: int | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
    with_stderr: bool = False,
    method: str = "hutchinson",
    distribution: str = "rademacher",
    path: str = "auto",
    per_block: bool = False,
    select: Any = None,
    per_sample: bool = False,
) -> Callable[..., Any]:
    """Transform a model and a loss into a function returning the trace of the GGN/Fisher.

    tr(G) = c Σ_n Σ_r ‖J_nᵀ s_{n,r}‖² exactly (R backward passes; for cross-entropy
    R = C per position), tr(E) = c Σ_n ‖∇l_n‖² (one per-sample gradient pass), or the MC
    Fisher's trace (K backward passes); with ``num_probes=K`` for ``"ggn"``/``"empirical"``,
    (1/K) Σ_k v_kᵀ A v_k at one Jacobian-vector product per probe. Definitions and
    conventions: :mod:`secorder.fisher`.
    {args}
    Returns:
        ``trace_fn(params, inputs, targets, generator=None)`` returning a 0-dim tensor (or
        ``(estimate, stderr)``); with ``per_block=True`` a pytree shaped like ``params`` of
        the traces of the diagonal blocks, one per leaf (per-layer curvature; exact from the
        diagonal, or by the block variant of ``method`` from one set of probes; the MC Fisher
        without standard errors). ``generator`` drives the probes and MC samples (same state,
        same result). ``trace_fn.path_info`` describes the route of the last call. Composes
        with ``torch.func.vmap`` over stacked parameters (generic route).
    {raises}
    Example:
        >>> import torch
        >>> X, Y = torch.eye(2), torch.zeros(2, 1)
        >>> model_fn = lambda w, x: x @ w                       # J_n = x_nᵀ, ∇²l_n = 2
        >>> fisher_trace(model_fn, "mse")(torch.zeros(2, 1), X, Y)   # (1/N) Σ_n 2 ‖x_n‖²
        tensor(2.)
        >>> fisher_trace(model_fn, "mse", kind="empirical")(
        ...     torch.zeros(2, 1), X, torch.ones(2, 1))   # ∇l_n = 2(z_n − y_n) x_n = −2 x_n
        tensor(4.)
        >>> fisher_trace(model_fn, "mse", num_probes=3)(torch.zeros(2, 1), X, Y,
        ...              generator=torch.Generator().manual_seed(0))  # G = I: exact
        tensor(2.)

    See Also:
        :func:`fisher_diagonal`, :func:`secorder.hessian_trace`.

    References:
        N. N. Schraudolph, "Fast curvature matrix-vector products for second-order gradient
        descent", Neural Computation 14 (2002) (GGN); J. Martens, "New insights and
        perspectives on the natural gradient method", JMLR 21 (2020) (GGN = Fisher, MC and
        empirical Fisher); F. Kunstner, L. Balles, P. Hennig, "Limitations of the empirical
        Fisher approximation", NeurIPS 2019; F. Dangel, F. Kunstner, P. Hennig, "BackPACK:
        Packing more into backprop", ICLR 2020 (per-layer squared-gradient products);
        M. F. Hutchinson (1989).
    """
    call = "fisher_trace(model_fn, loss)(params, inputs, targets)"
    setup = _configure(
        call,
        model_fn,
        loss,
        kind,
        num_probes,
        reduction,
        chunk_size,
        with_stderr,
        method,
        distribution,
        path,
        TRACE_ESTIMATORS,
        select,
        per_sample,
    )

    check_bool(call, "per_block", per_block)
    if per_block and kind == "mc" and with_stderr:
        raise error(
            call,
            "per_block=True with with_stderr=True is available for kind='ggn' and 'empirical' "
            "(exact, or from the block estimators); the MC Fisher has per-entry errors only",
            "kind='mc', per_block=True, with_stderr=True",
            "Drop with_stderr for per-block MC traces, or use fisher_diagonal(..., kind='mc', "
            "with_stderr=True) for per-entry errors.",
        )

    def trace_fn(params: Any, inputs: Any, targets: Any, generator: torch.Generator | None = None) -> Any:
        if not per_block:
            est, err, _, _, info = _run(setup, params, inputs, targets, generator, trace=True)
            trace_fn.path_info = info  # type: ignore[attr-defined]
            return (est, err) if setup.with_stderr else est
        randomized = setup.num_probes is not None and setup.kind != "mc"
        blocks_setup = setup
        if randomized:  # one set of probes; the block estimator sums v ⊙ Av per leaf

            def estimator(op: Any, k: int, **kw: Any) -> tuple[Tensor, Tensor]:
                sizes = [int(torch.Size(sh).numel()) for sh in op.shapes]
                return BLOCK_TRACE_ESTIMATORS[str(method)](op, k, sizes, **kw)

            blocks_setup = setup._replace(estimator=estimator)
        est, err, leaves, spec, info = _run(blocks_setup, params, inputs, targets, generator, trace=False)
        trace_fn.path_info = info  # type: ignore[attr-defined]
        if not randomized:  # the exact (or MC) diagonal, summed per leaf; exact: no error
            sizes = [leaf.numel() for leaf in leaves]
            if setup.per_sample:  # per-leaf rows (N, *shape) → one (N,) per leaf
                est = torch.stack([part.flatten(1).sum(1) for part in est])
            else:
                est = torch.stack([part.sum() for part in est.split(sizes)])
            err = torch.zeros_like(est)
        tree = unflatten(spec, list(est.unbind()))
        return (tree, unflatten(spec, list(err.unbind()))) if setup.with_stderr else tree

    _finish(trace_fn, model_fn)
    return trace_fn


def fisher_diagonal(
    model_fn: Callable[[Any, Any], Any] | nn.Module,
    loss: str | Callable[[Tensor, Any], Tensor],
    /,
    *,
    kind: str = "ggn",
    num_probes: int | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
    with_stderr: bool = False,
    method: str = "hutchinson",
    distribution: str = "rademacher",
    path: str = "auto",
    select: Any = None,
    per_sample: bool = False,
) -> Callable[..., Any]:
    """Transform a model and a loss into a function returning the diagonal of the GGN/Fisher.

    diag(G) = c Σ_n Σ_r (J_nᵀ s_{n,r})² exactly, diag(E) = c Σ_n (∇l_n)², the MC Fisher's
    diagonal (c/K) Σ_{n,k} g_{n,k}², or with ``num_probes=K`` (``"ggn"``/``"empirical"``)
    the estimator ``method`` (Hutchinson: (1/K) Σ_k v_k ⊙ A v_k, one JVP and one VJP per
    probe). Definitions and conventions: :mod:`secorder.fisher`.
    {args}
    Returns:
        ``diag_fn(params, inputs, targets, generator=None)`` returning a pytree shaped like
        ``params`` (same structure and dict key order), or ``(diagonal, stderr)`` pytrees.
        ``diag_fn.path_info`` describes the route of the last call.
    {raises}
    Example:
        >>> import torch
        >>> X, Y = torch.tensor([[1.0, 2.0], [3.0, 0.0]]), torch.zeros(2, 1)
        >>> model_fn = lambda p, x: x @ p["w"]
        >>> fisher_diagonal(model_fn, "mse", reduction="sum")({"w": torch.zeros(2, 1)}, X, Y)
        {'w': tensor([[20.], [ 8.]])}

    See Also:
        :func:`fisher_trace`, :func:`secorder.hessian_diagonal`.

    References:
        See :func:`fisher_trace`; C. Bekas, E. Kokiopoulou, Y. Saad (2007) for the
        randomized diagonal.
    """
    call = "fisher_diagonal(model_fn, loss)(params, inputs, targets)"
    setup = _configure(
        call,
        model_fn,
        loss,
        kind,
        num_probes,
        reduction,
        chunk_size,
        with_stderr,
        method,
        distribution,
        path,
        DIAGONAL_ESTIMATORS,
        select,
        per_sample,
    )

    def diag_fn(params: Any, inputs: Any, targets: Any, generator: torch.Generator | None = None) -> Any:
        est, err, leaves, spec, info = _run(setup, params, inputs, targets, generator, trace=False)
        diag_fn.path_info = info  # type: ignore[attr-defined]
        shapes = [leaf.shape for leaf in leaves]
        if setup.per_sample:  # per-leaf rows (N, *shape)
            tree = unflatten(spec, est)
            return (tree, unflatten(spec, [torch.zeros_like(r) for r in est])) if setup.with_stderr else tree
        tree = unflatten(spec, unravel(est, shapes))
        if setup.with_stderr:
            return tree, unflatten(spec, unravel(err, shapes))
        return tree

    _finish(diag_fn, model_fn)
    return diag_fn


def _finish(fn: Callable[..., Any], model_fn: object) -> None:
    if not isinstance(model_fn, nn.Module) and callable(model_fn):
        functools.update_wrapper(fn, model_fn, updated=())
    fn.path_info = None  # type: ignore[attr-defined]


for _f in (fisher_trace, fisher_diagonal):
    if _f.__doc__:
        _f.__doc__ = _f.__doc__.replace("{args}", _COMMON_ARGS).replace("{raises}", _RAISES)


def fisher_operator(
    model_fn: Callable[[Any, Any], Any] | nn.Module,
    loss: str | Callable[[Tensor, Any], Tensor],
    /,
    *,
    kind: str = "ggn",
    reduction: str = "mean",
    num_samples: int = 1,
    select: Any = None,
) -> Callable[..., tuple[Any, TreeSpec]]:
    """The GGN, empirical Fisher or MC Fisher at a point as a batched operator (lower level).

    Feed it to any estimator of :mod:`secorder.estimators`. Quadratic forms cost one
    Jacobian-vector product, products one JVP and one VJP (see
    :mod:`secorder._fisher_operators`).

    Returns:
        ``op_fn(params, inputs, targets, generator=None) -> (operator, spec)``, where
        ``generator`` drives the MC samples (``kind="mc"``, ``num_samples`` per datum).

    Example:
        >>> import torch
        >>> from secorder.estimators import exact_diagonal
        >>> op, _ = fisher_operator(lambda w, x: x @ w, "mse", reduction="sum")(
        ...     torch.zeros(2, 1), torch.eye(2), torch.zeros(2, 1))
        >>> exact_diagonal(op)                                   # G = 2 XᵀX = 2 I
        tensor([2., 2.])
    """
    call = "fisher_operator(model_fn, loss)(params, inputs, targets)"
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise error(
            call,
            "num_samples must be an int >= 1 (sampled targets per datum for kind='mc')",
            f"{num_samples!r}",
            "Pass e.g. num_samples=1.",
        )
    setup = _configure(
        call,
        model_fn,
        loss,
        kind,
        num_samples if kind == "mc" else None,
        reduction,
        None,
        False,
        "hutchinson",
        "rademacher",
        "generic",
        TRACE_ESTIMATORS,
        select,
    )

    def op_fn(
        params: Any, inputs: Any, targets: Any, generator: torch.Generator | None = None
    ) -> tuple[Any, TreeSpec]:
        full = params
        params, restore = split(call, setup.selector, params)
        leaves, spec = check_floating_tree(call, "params", params)
        check_same_dtype_device(call, "params", leaves)
        check_module_call(call, setup.module, full, leaves, (inputs, targets))
        gen = _probes.check_generator(call, generator, leaves[0].device)
        transformed = in_functorch_transform(leaves)
        if setup.module is not None:
            _check_module(call, setup.module, setup.kind != "ggn")
            forward, _ = module_forward(setup.module)
        else:
            assert setup.model_fn is not None
            forward = setup.model_fn

        def fn(ls: list[Tensor]) -> Any:
            return call_deterministic(call, forward, leaves, restore(unflatten(spec, ls)), inputs)

        z = _check_outputs(call, fn(leaves), eager=not transformed)
        setup.loss.check(call, z, targets)
        if setup.kind != "ggn" and setup.module is None and not transformed:
            _check_independent(call, lambda x: forward(restore(unflatten(spec, leaves)), x), inputs, z)
        op: Any
        if setup.kind == "ggn":
            op = GGNOperator(fn, leaves, setup.loss, z, targets, call)
        elif setup.kind == "empirical":
            cols = setup.loss.per_sample_grads(z, targets).unsqueeze(0)
            op = EmpiricalFisherOperator(fn, leaves, cols, setup.loss.scale(z), z, call=call)
        else:
            op = MCFisherOperator(fn, leaves, setup.loss, z, num_samples, gen, call)
        return op, spec

    return op_fn
