"""Fisher, GGN and empirical-Fisher transforms: :func:`fisher_trace`, :func:`fisher_diagonal`.

Definitions
-----------
Let ``z = model_fn(θ, X)`` be the outputs of shape ``(N, *out)`` (the batch first), N the
number of samples and L(θ) = loss(z, Y) with the given reduction. l_n is sample n's term
of that loss (a function of z_n, the outputs of sample n in the batch evaluation), scaled so
that

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
One route for an ``nn.Module`` and a plain ``model_fn`` (the module runs through
:func:`secorder.modules.module_forward`, a ``functional_call``). The exact computations and
``"mc"`` take the structured sweep by default (:func:`secorder._engine.sweep.engine_output_diagonal`):
one evaluation of the model on the whole batch is recorded as an ATen tape, its per-sample
structure is proven on the tape by :mod:`secorder._engine.batch` (no check on values), and
the loss node's columns are pulled back in one batched reverse pass per chunk of columns, the
squared per-sample gradients formed at each parameter's interface (``mm``/``addmm``,
convolutions, embeddings, norm affines, biases, elementwise scales) without materializing
N×P of them. Parameters no interface covers (tied or reused weights, an embedding added to the
tokens, parametrizations, the weight stacks of decomposed RNN kernels) get per-sample
vector-Jacobian products at the ops where they meet the data, summed before squaring
(:mod:`secorder._engine.leafvjp`); the other parameters keep their interfaces. ``path="auto"``
takes them where the cost model (:mod:`secorder._cost`) puts them below the generic route
below: about 2.5 whole-batch VJPs per column plus a fixed 64 against N·R (measured: the GPT-2
of ``tests/_zoo.py``, R = 4,096, is 1.5× faster this way at N = 4 and 2.9× at N = 8, while the
LSTM/GRU/BERT with R = 3 are faster on the generic route, ``benchmarks/bench_leafvjp.py``);
``path="fast"`` forces them. The MC Fisher with ``with_stderr=True`` runs one sweep per draw on
the same tape.

Where the sweep cannot run, the **generic route** computes the same quantity by definition:
J_nᵀ s_{n,r} is the vector-Jacobian product of the whole batch's outputs with the cotangent
that holds s_{n,r} in sample n's rows and zeros elsewhere (``vmap`` over ``chunk_size``
(sample, column) pairs at a time). It assumes nothing about the model, so it is exact for
any model, differentiable, and valid under ``torch.func`` transforms; it costs one backward
pass of the whole batch per (sample, column) pair (about N times the sweep's work or more).
It is taken when

* ``path="generic"`` is passed;
* the call runs inside a ``torch.func`` transform (``vmap`` over an ensemble, ``grad``): no
  eager tape can be recorded;
* the parameters require grad with grad mode on (the result must carry their gradient; the
  sweep is not differentiable);
* the inputs are not a tensor (or a tuple of tensors) batched along dimension 0;
* the tape cannot be recorded (random ops, ``out=`` ops, aliased in-place ops) or the sweep
  refuses: an op that mixes samples in a parameter-dependent value (train-mode BatchNorm, a
  θ-dependent batch mean), an op without a per-sample rule, outputs not batched along
  dimension 0.

``path="fast"`` forces the sweep (an error with the reason where it cannot run). After each
call the returned function's ``path_info`` attribute (a :class:`FisherPath`) names the route
and, for the generic one, the reason.

Cost: the sweep walks R columns (C per position for cross-entropy), the generic route forms
N·R vector-Jacobian products, the one-hot route of half precision P products
(:mod:`secorder._cost`; ``path_info.cost`` gives the estimates). Every exact route, forced ones
too, needs at most :func:`secorder.exact_budget` products: above it the call is refused before
any product, naming ``num_probes=K`` (Hutchinson) and the MC Fisher (``kind="mc"``). With
parameters no interface covers, ``path="auto"`` also takes the sweep with per-leaf VJPs where
the generic route's N·R products exceed the budget.

Models that couple samples
--------------------------
No route checks values or evaluates a sample alone: every quantity is that of the batch
evaluation z = model_fn(θ, X), J_n the rows of its Jacobian for sample n's outputs, so
∇l_n = J_nᵀ ∇_{z_n} l_n is the gradient of sample n's term of the batch loss. For a model
that treats samples independently this is the usual per-sample gradient; for one that couples
them (train-mode BatchNorm, a batch mean inside the model) it includes l_n's dependence on the
other samples through the coupling, on every route alike (sweep, generic, Hutchinson).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import vjp, vmap

from secorder import _cost
from secorder import probes as _probes
from secorder._chunking import check_chunk_size, default_chunk_size
from secorder._errors import error
from secorder._fisher_operators import EmpiricalFisherOperator, GGNOperator, MCFisherOperator
from secorder._kernels import decomposed_kernels, with_decomposed_kernels
from secorder._losses import KINDS, Factor, LossSpec, resolve_loss
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
    """Which route computed a call: ``path`` is ``"fast"`` (the structured sweep over a tape of
    the whole batch), ``"generic"`` (vector-Jacobian products of the whole batch),
    ``"hutchinson"`` (the operator route) or ``"one_hot"`` (one-hot products of the operator:
    exact values of float16/bfloat16 parameters); ``fast``/``generic`` name the parameters (dict keys,
    or leaf positions for other pytrees) of each route; ``reason`` says why the generic route
    was taken (empty otherwise); ``cost`` gives the cost model's estimates of the exact routes
    it compared, in products, and the budget (:mod:`secorder._cost`; empty for estimators)."""

    path: str
    fast: tuple[str, ...]
    generic: tuple[str, ...]
    reason: str = ""
    cost: str = ""


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
            "Use path='auto' (the structured sweep where it applies) or 'generic' (vector-Jacobian "
            "products of the whole batch).",
        )
    if path == "fast" and probes is not None and kind != "mc":
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


def _batch_data(inputs: Any, n: int) -> list[Tensor] | None:
    """The inputs as the structured sweep's batched data: a tensor, or a tuple/list of tensors,
    each batched along dimension 0 (None otherwise)."""
    data = (
        [inputs]
        if isinstance(inputs, Tensor)
        else list(inputs)
        if isinstance(inputs, (tuple, list))
        else None
    )
    if not data or not all(isinstance(d, Tensor) and d.dim() > 0 and d.shape[0] == n for d in data):
        return None
    return data


def _leaf_names(params: Any, count: int) -> list[str]:
    if isinstance(params, dict) and all(isinstance(k, str) for k in params):
        names, _ = flatten({k: k for k in params})
        if len(names) == count:
            return [str(n) for n in names]
    return [str(i) for i in range(count)]


class _Accumulator:
    """Per-leaf sums over the factor's columns (of squared gradients, or of per-sample rows), or,
    with ``per_column`` (the MC Fisher's standard errors over its draws), a per-entry mean and
    variance over the columns (Chan et al.'s parallel update) and the per-column traces."""

    def __init__(self, num_leaves: int, *, per_column: bool) -> None:
        self.per_column = per_column
        self.sums: list[Tensor | None] = [None] * num_leaves
        self.traces: list[Tensor] = []
        self.welford: list[tuple[int, Tensor, Tensor] | None] = [None] * num_leaves

    def add(self, parts: Sequence[Tensor]) -> None:
        """Add ``parts[i]`` (k, *shape) for leaf i: the contributions of k columns."""
        if not self.per_column:
            self.add_sums([p.sum(0) for p in parts])
            return
        self.traces.append(sum((p.flatten(1).sum(1) for p in parts[1:]), start=parts[0].flatten(1).sum(1)))
        for i, p in enumerate(parts):
            k, c_mean = p.shape[0], p.mean(0)
            c_m2 = ((p - c_mean) ** 2).sum(0)
            state = self.welford[i]
            if state is None:
                self.welford[i] = (k, c_mean, c_m2)
                continue
            count, mean, m2 = state
            total = count + k
            delta = c_mean - mean
            self.welford[i] = (total, mean + delta * (k / total), m2 + c_m2 + delta**2 * (count * k / total))

    def add_sums(self, sums: Sequence[Tensor]) -> None:
        """Add per-leaf sums over columns (or per-sample rows summed over columns)."""
        for i, t in enumerate(sums):
            cur = self.sums[i]
            self.sums[i] = t if cur is None else cur + t

    def totals(self, leaves: Sequence[Tensor], rows: int | None = None) -> list[Tensor]:
        """The per-leaf sums ((rows, *shape) zeros where nothing was added)."""
        lead = () if rows is None else (rows,)
        return [leaf.new_zeros(*lead, *leaf.shape) if s is None else s for s, leaf in zip(self.sums, leaves)]

    def mean_stderr(self, leaves: Sequence[Tensor], num_columns: int, trace: bool) -> tuple[Tensor, Tensor]:
        """``per_column``: the mean over the columns and its standard error (NaN for one column),
        flat (P,) or the 0-dim trace."""
        if trace:
            cols = torch.cat(self.traces)
            mean = cols.mean()
            err = (
                cols.std(correction=1) / math.sqrt(num_columns)
                if num_columns > 1
                else torch.full_like(mean, math.nan)
            )
            return mean, err
        means, errs = [], []
        for state, leaf in zip(self.welford, leaves):
            count, mean, m2 = (
                state if state is not None else (0, torch.zeros_like(leaf), torch.zeros_like(leaf))
            )
            means.append(mean.reshape(-1))
            err = (
                (m2 / (count - 1)).sqrt() / math.sqrt(count) if count > 1 else torch.full_like(mean, math.nan)
            )
            errs.append(err.reshape(-1))
        return torch.cat(means), torch.cat(errs)


def _run(
    s: _Setup,
    params: Any,
    inputs: Any,
    targets: Any,
    generator: torch.Generator | None,
    trace: bool,
    outputs: list[Tensor] | None = None,
) -> tuple[Any, Any, list[Tensor], TreeSpec, FisherPath]:
    """Evaluate the configured quantity: flat diagonal (or 0-dim trace), stderr (None for an
    exact diagonal: zeros), leaves, spec, path;
    with ``per_sample`` the per-leaf rows (N, *shape) and None (or the (N,) traces and zeros).
    ``outputs``: a list that receives the model's outputs of this evaluation (detached), for
    callers that also need them (the laplace-torch backends' loss: no second forward pass).

    One route for an ``nn.Module`` and a plain ``model_fn``: the structured sweep over a tape of
    the whole batch where it applies, else the generic route (:func:`_generic_columns`), with the
    reason in the returned :class:`FisherPath`."""
    call = s.call
    full = params
    params, restore = split(call, s.selector, params)
    leaves, spec = check_floating_tree(call, "params", params)
    check_same_dtype_device(call, "params", leaves)
    check_module_call(call, s.module, full, leaves, (inputs, targets))
    gen = _probes.check_generator(call, generator, leaves[0].device)
    transformed = in_functorch_transform(leaves)
    hutchinson = s.num_probes is not None and s.kind != "mc"
    names = tuple(_leaf_names(params, len(leaves)))

    if s.module is not None:
        check_deterministic_module(call, s.module)
        forward, _ = module_forward(s.module)
    else:
        assert s.model_fn is not None
        forward = s.model_fn

    def fn(ls: list[Tensor], x: Any) -> Any:
        return call_deterministic(call, forward, leaves, restore(unflatten(spec, ls)), x)

    needs_graph = torch.is_grad_enabled() and any(leaf.requires_grad for leaf in leaves)
    # float16/bfloat16: the column routes sum squares in the parameters' dtype; the exact values
    # come from one-hot products of the operator instead (float32 accumulation at its boundary)
    half = half_precision_refusal(leaves, "the column routes (the structured sweep or per-sample columns)")
    why: str | None = None  # why the generic route (None: the structured sweep)
    if half is not None and not hutchinson:
        why = half
    elif s.path == "generic":
        why = "path='generic' was requested"
    elif transformed:
        why = "inside a torch.func transform (the structured sweep records the function eagerly as a tape)"
    elif needs_graph:
        why = (
            "the parameters require grad (the result carries their gradient; the sweep is not differentiable)"
        )
    if why is not None and s.path == "fast":
        _refuse_fast(call, why, transformed)
    tape = None
    if why is None and not hutchinson:
        tape, why = _record_outputs(fn, leaves, inputs)
    if tape is not None:
        z = tape.result
    else:
        with decomposed_kernels():  # the function every route differentiates (secorder._kernels)
            z = fn(leaves, inputs)
    z = _check_outputs(call, z, eager=not transformed)
    if outputs is not None:
        outputs.append(z.detach())
    s.loss.check(call, z, targets)
    scale = s.loss.scale(z)

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
        return est, err, leaves, spec, FisherPath("hutchinson", (), names)

    if half is not None:
        if s.per_sample:
            raise error(
                call,
                "per_sample=True comes from the column routes, which sum squares in the parameters' dtype",
                half,
                "Cast the parameters and inputs to float32 for per-sample values, or drop per_sample "
                "(the batch value of half-precision parameters is accumulated in float32).",
            )
        p_count = sum(leaf.numel() for leaf in leaves)
        one_hot = _cost.Route("one_hot", p_count, f"P={p_count:,} one-hot operator products")
        _cost.check_budget(call, _quantity(s), [one_hot], _randomized(s), half)
        est, err = _half_exact(s, fn, leaves, inputs, targets, z, scale, gen, trace)
        return est, err, leaves, spec, FisherPath("one_hot", (), names, half, _cost.describe([one_hot]))

    n = int(z.shape[0])
    data = _batch_data(inputs, n)
    if why is None and data is None:
        why = "the inputs are not a tensor (or a tuple of tensors) batched along dimension 0"
    z_factor = z if why is not None else z.detach()  # the generic route differentiates through it
    factor: Factor
    if s.kind == "ggn":
        factor = s.loss.factor(z_factor, targets)
    elif s.kind == "empirical":
        factor = Factor.from_tensor(s.loss.per_sample_grads(z_factor, targets).unsqueeze(0))
    else:
        assert s.num_probes is not None
        factor = Factor.from_tensor(s.loss.sample_columns(z_factor, s.num_probes, gen))
    per_column = s.kind == "mc" and s.with_stderr
    acc = _Accumulator(len(leaves), per_column=per_column)
    # the cost model (secorder._cost): R column walks of the sweep against N·R whole-batch VJPs
    r_cols = factor.num_columns
    fast = _cost.Route(
        "fast", r_cols, f"R={r_cols:,} columns per sample, walked for all N={n} samples at once"
    )
    generic = _cost.Route(
        "generic", n * r_cols, f"N·R={n}·{r_cols:,} vector-Jacobian products of the whole batch"
    )
    compared = [generic]
    if why is None:
        assert data is not None
        compared = [fast] if s.path == "fast" else [fast, generic]
        _cost.check_budget(call, _quantity(s), compared, _randomized(s))
        # per-leaf VJPs for parameters no interface covers (if the plan needs them): "auto"
        # takes them where their measured cost is below the generic route's N·R products
        # (GPT-2 at N >= 3), or where those exceed the budget
        leafvjp = _cost.leaf_vjp_sweep(r_cols, n)
        fallback = (
            s.path == "fast" or leafvjp.products < generic.products or not _cost.within(generic.products)
        )
        why = _engine_accumulate(s, fn, leaves, inputs, data, factor, acc, tape, per_column, fallback, trace)
        if why is not None and s.path == "fast":
            _refuse_fast(call, why, transformed)
        if why is not None and not fallback:  # the generic route, also against per-leaf VJPs
            compared = [fast, leafvjp, generic]
    if why is not None:
        _cost.check_budget(call, _quantity(s), [generic], _randomized(s), f"the generic route: {why}")
        _generic_columns(s, lambda ls: fn(ls, inputs), leaves, z, factor, acc, per_column)
    cost = _cost.describe(compared)
    info = (
        FisherPath("fast", names, (), "", cost)
        if why is None
        else FisherPath("generic", (), names, why, cost)
    )

    if s.per_sample:
        rows = _scaled(acc.totals(leaves, n), scale)
        if trace:  # (N,)
            est = sum((r.flatten(1).sum(1) for r in rows[1:]), start=rows[0].flatten(1).sum(1))
            return est, torch.zeros_like(est), leaves, spec, info
        return rows, None, leaves, spec, info  # per-leaf rows (N, *shape), no stderr
    if per_column:
        est, err = acc.mean_stderr(leaves, factor.num_columns, trace)
        return est * scale, err * scale, leaves, spec, info
    totals = acc.totals(leaves)
    if not trace:  # the flat diagonal, scaled in place; no error (None: zeros, formed if asked for)
        est = _flat_scaled(totals, factor.num_columns if s.kind == "mc" else 1, scale)
        return est, None, leaves, spec, info
    est = torch.stack([t.sum() for t in totals]).sum()  # per-leaf sums: no flat copy of the diagonal
    if s.kind == "mc":
        est = est / factor.num_columns
    est = est * scale
    return est, torch.zeros_like(est), leaves, spec, info


def _flat_scaled(totals: list[Tensor], divisor: int, scale: float) -> Tensor:
    """``torch.cat([t.reshape(-1) for t in totals]) / divisor * scale`` (the same operations on
    every entry, so the same numbers), the division and scaling in place on the fresh
    concatenation: no scaled copies of the diagonal (the MLP's: 118k entries)."""
    flat = torch.cat([t.reshape(-1) for t in totals])
    if divisor != 1:
        flat.div_(divisor)
    return flat.mul_(scale)


def _quantity(s: _Setup) -> str:
    """The quantity of a call, for the cost model's refusal."""
    kind = {"ggn": "GGN", "empirical": "empirical Fisher", "mc": "MC Fisher"}[s.kind]
    return f"{kind} {'trace' if s.call.startswith('fisher_trace') else 'diagonal'}"


def _randomized(s: _Setup) -> list[str]:
    """The randomized calls of this transform that stay affordable when the exact value is not
    (each with standard errors: ``with_stderr=True``)."""
    name = "fisher_trace" if s.call.startswith("fisher_trace") else "fisher_diagonal"
    kind = ", kind='empirical'" if s.kind == "empirical" else ""  # the MC Fisher's: the GGN's
    hutch = f"{name}(model_fn, loss{kind}, num_probes=K) (Hutchinson: K Jacobian-vector products)"
    mc = (
        f"{name}(model_fn, loss, kind='mc', num_probes=K) (the MC Fisher, whose expectation is the "
        "GGN: K sampled targets per sample, K column walks)"
    )
    routes = {"ggn": [hutch, mc], "empirical": [hutch], "mc": [mc + " with a smaller K", hutch]}[s.kind]
    if s.per_sample:
        return [
            f"no randomized route gives per-sample rows; for the batch value drop per_sample: {routes[0]}"
        ]
    return routes


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


def _scaled(rows: list[Tensor], scale: float) -> list[Tensor]:
    """``rows`` times ``scale``, in place where a row is the engine's own fresh tensor (no autograd
    graph, storage shared with no other row): the (N, *shape) rows are the largest arrays of a
    per-sample call, and a second copy of them costs more than the sweep (the MLP: 69 -> 35 ms)."""
    seen: set[int] = set()
    out = []
    for r in rows:
        if in_functorch_transform([r]):  # a functorch wrapper: no storage of its own to share
            out.append(r * scale)
            continue
        ptr = r.untyped_storage().data_ptr()
        if r.requires_grad or ptr in seen:
            out.append(r * scale)
        else:
            out.append(r.mul_(scale))
        seen.add(ptr)
    return out


def _refuse_fast(call: str, why: str, transformed: bool) -> None:
    raise error(
        call,
        "path='fast' runs the structured sweep: an eager call (outside torch.func transforms) whose "
        "parameters do not require grad, on inputs batched along dimension 0 (a tensor or a tuple of "
        "tensors), with the per-sample structure proven on the tape and every op covered by a rule",
        why,
        "Use path='auto' (which takes the generic route there and says why in fn.path_info) or "
        "path='generic'.",
        cls=RuntimeError if transformed else ValueError,
    )


def _record_outputs(
    fn: Callable[[list[Tensor], Any], Any], leaves: list[Tensor], inputs: Any
) -> tuple[Any, str | None]:
    """A tape of ``fn(leaves, inputs)`` for the structured sweep, whose result is the outputs z,
    or (None, the reason) where it cannot be recorded (the caller evaluates ``fn`` itself, so a
    user's own exception passes through from that call)."""
    from secorder._engine.tape import TapeUnsupportedError, record

    try:
        return record(lambda ls: fn(ls, inputs), leaves), None
    except TapeUnsupportedError as exc:
        return None, f"the tape cannot be recorded: {exc.args[0]}"


def _engine_accumulate(
    s: _Setup,
    fn: Callable[[list[Tensor], Any], Any],
    leaves: list[Tensor],
    inputs: Any,
    data: list[Tensor],
    factor: Factor,
    acc: _Accumulator,
    tape: Any,
    per_column: bool,
    fallback: bool,
    trace: bool = False,
) -> str | None:
    """The exact GGN / empirical / MC Fisher by the structured sweep over a tape of the whole batch
    (:func:`secorder._engine.sweep.engine_output_diagonal`: the loss node's columns only, squared
    per-sample gradients at the parameters' interfaces, the per-sample structure proven on the
    tape); None when done, else the sweep's reason for refusing (nothing added). ``trace``: the
    accumulator receives per-leaf sums (0-dim) only, the cheaper Linear-layer traces."""
    from secorder._engine.sweep import EngineUnsupportedError, engine_output_diagonal

    def sweep(c0: int, c1: int) -> list[Tensor]:
        return engine_output_diagonal(
            lambda ls: fn(ls, inputs),
            leaves,
            data,
            lambda a, b: factor.columns(c0 + a, c0 + b),
            lambda a, b: factor.weights(c0 + a, c0 + b),
            c1 - c0,
            chunk_size=s.chunk_size,
            per_sample=s.per_sample,
            tape=tape,
            fallback=fallback,  # per-leaf VJPs allowed (path="fast", or the generic route over budget)
            trace=trace and not per_column and not s.per_sample,
        )

    try:
        if not per_column:
            acc.add_sums(sweep(0, factor.num_columns))
            return None
        # the MC Fisher's standard errors: one sweep per draw, reusing the tape
        parts = [sweep(c, c + 1) for c in range(factor.num_columns)]
    except EngineUnsupportedError as exc:
        return f"the structured sweep refused: {exc.args[0]}"
    acc.add([torch.stack(p) for p in zip(*parts)])
    return None


@with_decomposed_kernels
def _generic_columns(
    s: _Setup,
    g: Callable[[list[Tensor]], Tensor],
    leaves: list[Tensor],
    z: Tensor,
    factor: Factor,
    acc: _Accumulator,
    per_column: bool,
) -> None:
    """The generic route, exact by definition with no assumption on the model: J_nᵀ s_{n,r} is the
    vector-Jacobian product of the whole batch's outputs with the cotangent holding s_{n,r} in
    sample n's rows and zeros elsewhere (so for a model that couples samples the quantities are
    those of the batch evaluation, J_n the rows of its Jacobian). One backward pass of the batch
    per (sample, column) pair, vmapped ``chunk_size`` pairs at a time; differentiable, and runs
    under ``torch.func`` transforms."""
    n, r = int(z.shape[0]), factor.num_columns
    vjp_fn = vjp(g, leaves)[1]
    size = sum(int(leaf.numel()) for leaf in leaves)
    rows = s.chunk_size or default_chunk_size(n * r, max(size, int(z.numel())), z.dtype.itemsize)
    k_cols = max(1, min(r, rows // n))
    n_chunk = max(1, min(n, rows // k_cols))
    eye = torch.eye(n, dtype=z.dtype, device=z.device)
    extra = [1] * (z.dim() - 1)
    for c0 in range(0, r, k_cols):
        c1 = min(r, c0 + k_cols)
        cols, w = factor.columns(c0, c1), factor.weights(c0, c1)
        parts: list[Tensor] | None = None
        rows_of: list[list[Tensor]] = [[] for _ in leaves]  # per_sample: (m, *shape) per sample chunk
        for n0 in range(0, n, n_chunk):
            n1 = min(n, n0 + n_chunk)
            onehot = eye[n0:n1].reshape(1, n1 - n0, n, *extra)
            cot = (cols[:, n0:n1].unsqueeze(2) * onehot).flatten(0, 1)  # (k·m, N, *out)
            grads = vmap(vjp_fn)(cot)[0]
            chunk = []
            for gr in grads:
                sq = (gr * gr).reshape(c1 - c0, n1 - n0, *gr.shape[1:])
                if w is not None:
                    sq = sq * w[:, n0:n1].reshape(c1 - c0, n1 - n0, *[1] * (gr.dim() - 1))
                chunk.append(sq.sum(0) if s.per_sample else sq.sum(1))
            if s.per_sample:
                for i, p in enumerate(chunk):
                    rows_of[i].append(p)
            else:
                parts = chunk if parts is None else [a + b for a, b in zip(parts, chunk)]
        if s.per_sample:
            acc.add_sums([torch.cat(rs) for rs in rows_of])
        elif parts is not None:
            acc.add(parts)


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
        chunk_size: rows formed at once: probes, columns of the structured sweep, or
            (sample, column) pairs on the generic route; ``None`` sizes them from the memory
            budget.
        with_stderr: also return the standard error (over probes for Hutchinson, over the
            K draws for ``"mc"`` (NaN for K = 1), zeros when exact).
        method: the randomized estimator for ``num_probes`` (a key of the registries in
            :mod:`secorder.estimators`).
        distribution: the probe distribution for ``method``: ``"rademacher"``, ``"gaussian"``
            or ``"sphere"`` (:mod:`secorder.probes`).
        path: ``"auto"`` (the structured sweep where it applies, else the generic route),
            ``"generic"`` or ``"fast"`` (the sweep or an error saying why); see
            :mod:`secorder.fisher`.
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
            run, from the generic route (the same rows; ``path_info`` says why).
"""

_RAISES = """
    Raises:
        SecorderError, TypeError: invalid options (at construction); at call time, targets
            that do not fit the loss (dtype, shape, batch size, range), non-finite outputs,
            a model whose outputs are random (dropout in train mode), or ``path="fast"``
            where the structured sweep cannot run (the reason named).
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

    def diag_fn(
        params: Any,
        inputs: Any,
        targets: Any,
        generator: torch.Generator | None = None,
        _outputs: list[Tensor] | None = None,
    ) -> Any:
        est, err, leaves, spec, info = _run(setup, params, inputs, targets, generator, False, _outputs)
        diag_fn.path_info = info  # type: ignore[attr-defined]
        shapes = [leaf.shape for leaf in leaves]
        if setup.per_sample:  # per-leaf rows (N, *shape)
            tree = unflatten(spec, est)
            return (tree, unflatten(spec, [torch.zeros_like(r) for r in est])) if setup.with_stderr else tree
        tree = unflatten(spec, unravel(est, shapes))
        if setup.with_stderr:  # the exact diagonal's error (None): zeros
            return tree, unflatten(spec, unravel(torch.zeros_like(est) if err is None else err, shapes))
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
            check_deterministic_module(call, setup.module)
            forward, _ = module_forward(setup.module)
        else:
            assert setup.model_fn is not None
            forward = setup.model_fn

        def fn(ls: list[Tensor]) -> Any:
            return call_deterministic(call, forward, leaves, restore(unflatten(spec, ls)), inputs)

        z = _check_outputs(call, fn(leaves), eager=not transformed)
        setup.loss.check(call, z, targets)
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
