"""Exact Hessian diagonal and trace of ``nn.Module`` losses: :func:`module_hessian_diagonal`.

``L(θ) = loss(model(X; θ), Y)`` with a built-in loss (``"cross_entropy"``, ``"mse"``,
``"bce_with_logits"``, conventions of :mod:`secorder.fisher`). Thin wrappers: the module and
the loss become the plain function ``f(params, inputs, targets)`` (:func:`secorder.modules.module_forward`
plus the loss), whose diagonal comes from the one implementation behind
:func:`secorder.hessian_diagonal`. Methods:

* ``"sweep"``: the exact diagonal by the structured second-order sweep over a tape of the whole
  batch (:mod:`secorder._engine.sweep`, as ``hessian_diagonal(f, exact="sweep")``):
  diag H = Σ_k Σ_c σ_c (J_kᵀ s_c)² over the signed columns of every op's gradient-weighted
  local Hessian (the loss's C − 1 cross-entropy columns, pointwise activations in closed form,
  LayerNorm and softmax rows, attention products, a dense local Hessian for any other op),
  one batched reverse walk per chunk of columns. Cost: R batched columns per sample. Refused
  with the engine's reason: ops that mix samples (train-mode BatchNorm), an op with no rule,
  tied weights.
* ``"hvp"``: exact, P batched one-hot Hessian-vector products of the whole batch loss
  (``hessian_diagonal(f, exact="hvp")``); works for any model, cost P HVPs.
* ``"curvature_propagation"``: Martens, Sutskever and Swersky (2012): the same sweep with random
  signed mixtures of its columns (``hessian_diagonal(f, num_probes=K,
  method="curvature_propagation")``), an unbiased estimate with per-entry standard errors, at
  one batched walk of two columns per probe.
* ``"auto"``: the sweep when it covers the model and R ≤ P (the cost model of
  :mod:`secorder._cost`: R batched columns against P HVPs); else one-hot HVPs when P ≤
  ``max_hvp_params``; else the exact sweep whatever R (when it refuses the model: a clear error
  suggesting ``method="hvp"``, or the randomized routes where P exceeds the exact budget). After
  each call ``fn.method_info`` (a :class:`SweepInfo`) says which method ran, why, and the
  estimates it compared.

Every exact method obeys the exact budget (:func:`secorder.set_exact_budget`): when even the
cheapest available route needs more products, the call is refused before any product, naming
``method="curvature_propagation", num_probes=K`` (where the sweep covers the model) and
Hutchinson on :func:`secorder.module_loss`.

References:
    C. Bishop. Exact calculation of the Hessian matrix for the multilayer perceptron.
    Neural Computation, 1992.
    F. Dangel, S. Harmeling, P. Hennig. Modular block-diagonal curvature approximations for
    feedforward architectures. AISTATS 2020.
    J. Martens, I. Sutskever, K. Swersky. Estimating the Hessian by back-propagating
    curvature. ICML 2012.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from secorder import _cost
from secorder._chunking import check_chunk_size
from secorder._errors import error
from secorder._losses import CallableLoss, LossSpec, resolve_loss
from secorder._pytree import check_floating_tree, unflatten
from secorder._select import check_select, split
from secorder._validate import (
    check_bool,
    check_deterministic_module,
    check_module_call,
    check_module_names,
    check_num_probes,
    check_requires_no_grad,
    half_precision_refusal,
)
from secorder.hessian import (
    SweepInfo,
    _cp_diagonal_leaves,
    _exact_diagonal_leaves,
    _mean_stderr,
    _randomized_routes,
    hessian_diagonal,
)
from secorder.modules import module_forward, unwrap_module
from secorder.operators import StrategyFailedError

__all__ = ["METHODS", "SweepInfo", "module_hessian_diagonal", "module_hessian_trace"]

METHODS = ("auto", "sweep", "hvp", "curvature_propagation")
_TRACE_KEY = "\x00trace"  # not a valid parameter name


def _configure(
    call: str, model: object, loss: object, method: object, num_probes: object, reduction: object
) -> tuple[LossSpec, int | None]:
    if not isinstance(model, nn.Module):
        raise error(
            call,
            "model must be a torch.nn.Module",
            type(model).__name__,
            "Pass the module; for a plain function f(params, ...) use secorder.hessian_diagonal(f).",
            cls=TypeError,
        )
    if method not in METHODS:
        raise error(
            call,
            f"method must be one of {', '.join(repr(m) for m in METHODS)}",
            f"{method!r}",
            "Use 'auto' to let the cost model choose.",
        )
    spec = resolve_loss(call, loss, reduction, "ggn")
    if isinstance(spec, CallableLoss):
        raise error(
            call,
            "the structured sweep needs a built-in loss ('cross_entropy', 'mse', 'bce_with_logits')",
            "a callable loss",
            "Use a built-in loss name, or secorder.hessian_diagonal on "
            "secorder.module_loss(model, loss) for any loss.",
            cls=TypeError,
        )
    k = check_num_probes(call, num_probes)
    if method == "curvature_propagation" and k is None:
        raise error(
            call,
            "method='curvature_propagation' needs num_probes",
            "num_probes=None",
            "Pass num_probes=K (e.g. 10), or method='sweep' for the exact diagonal.",
        )
    if method not in ("curvature_propagation",) and k is not None:
        raise error(
            call,
            "num_probes is only used by method='curvature_propagation'",
            f"num_probes={k} with method={method!r}",
            "Drop num_probes, or pass method='curvature_propagation'.",
        )
    return spec, k


def module_hessian_diagonal(
    model: nn.Module,
    loss: str,
    /,
    *,
    method: str = "auto",
    num_probes: int | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
    with_stderr: bool = False,
    max_hvp_params: int = 20_000,
    select: Any = None,
) -> Callable[..., Any]:
    """Transform ``model`` and ``loss`` into a function returning diag(∇²_θ L) as a params dict.

    diag H = Σ_k Σ_c σ_c (J_kᵀ s_c)² over the signed columns s_c of each op's gradient-weighted
    local Hessian (see :mod:`secorder.module_hessian` for the methods and their rules).

    Args:
        model: the module (never mutated).
        loss: ``"cross_entropy"``, ``"mse"`` or ``"bce_with_logits"``.
        method: ``"auto"``, ``"sweep"``, ``"hvp"`` or ``"curvature_propagation"``.
        num_probes: K probes for ``"curvature_propagation"`` (``None`` otherwise).
        reduction: ``"mean"`` or ``"sum"``, as in ``torch.nn.functional``.
        chunk_size: columns (or one-hot tangents) per batched backward pass.
        with_stderr: also return per-entry standard errors (zeros when exact).
        max_hvp_params: the largest P for which ``"auto"`` falls back to one-hot HVPs.
        select: the diagonal over a subset of ``params`` by name (a glob, a list of globs, a
            compiled regex or a predicate; :mod:`secorder._select`): the other parameters
            are held fixed and the result holds only the selected entries.

    Returns:
        ``diag_fn(params, inputs, targets, generator=None)`` returning a dict shaped like
        ``params`` (or ``(diagonal, stderr)``); ``diag_fn.method_info`` is a
        :class:`SweepInfo` for the last call.

    Raises:
        SecorderError, TypeError: invalid options; at call time, a model the chosen method
            cannot handle (train-mode BatchNorm, unsupported ops for ``"sweep"``).

    Example:
        >>> import torch, secorder
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
        >>> model = model.double()
        >>> params = {k: p.detach() for k, p in model.named_parameters()}
        >>> sweep = secorder.module_hessian_diagonal(model, "cross_entropy", method="sweep")
        >>> d = sweep(params, x, y)
        >>> f, _ = secorder.module_loss(model, torch.nn.functional.cross_entropy)
        >>> ref = secorder.hessian_diagonal(f)(params, x, y)
        >>> all(torch.allclose(d[k], ref[k]) for k in d)
        True

    References:
        Bishop 1992; Dangel, Harmeling and Hennig 2020; Martens, Sutskever and Swersky 2012
        (curvature propagation).
    """
    call = "module_hessian_diagonal(model, loss)(params, inputs, targets)"
    model = unwrap_module(model)  # type: ignore[assignment]
    spec, k = _configure(call, model, loss, method, num_probes, reduction)
    check_chunk_size(call, chunk_size)
    check_bool(call, "with_stderr", with_stderr)
    if not isinstance(max_hvp_params, int) or isinstance(max_hvp_params, bool) or max_hvp_params < 0:
        raise error(
            call,
            "max_hvp_params must be an int >= 0 (the largest P for which method='auto' may use one-hot HVPs)",
            f"{max_hvp_params!r}",
            "Pass e.g. max_hvp_params=20_000 (the default), or 0 to never fall back to HVPs.",
        )
    selector = check_select(call, select)
    forward, _ = module_forward(model, strict=False)  # names are checked here, subsets passed on

    def f(p: Any, x: Any, y: Any) -> Tensor:
        return spec.total(forward(p, x), y)

    def diag_fn(params: Any, inputs: Any, targets: Any, generator: torch.Generator | None = None) -> Any:
        check_module_names(call, model, params)
        params, _ = split(call, selector, params)  # forward holds the others fixed
        diag, err, info = _run(
            call, diag_fn, model, forward, spec, f, params, inputs, targets, method, k, generator,
            chunk_size, max_hvp_params,
        )  # fmt: skip
        diag_fn.method_info = info  # type: ignore[attr-defined]
        diag_fn.trace_stderr = err.pop(_TRACE_KEY, None)  # type: ignore[attr-defined]
        return (diag, err) if with_stderr else diag

    diag_fn.method_info = None  # type: ignore[attr-defined]
    return diag_fn


def module_hessian_trace(model: nn.Module, loss: str, /, **options: Any) -> Callable[..., Any]:
    """Transform ``model`` and ``loss`` into a function returning tr(∇²_θ L) = Σ diag.

    Same options and methods as :func:`module_hessian_diagonal` (exact by the sweep or
    one-hot HVPs; curvature propagation gives an unbiased trace estimate, and with
    ``with_stderr`` its standard error over the per-probe traces). ``trace_fn.method_info``
    as there.
    """
    call = "module_hessian_trace(model, loss)"
    allowed = ("method", "num_probes", "reduction", "chunk_size", "with_stderr", "max_hvp_params")
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise error(
            call,
            f"the options are those of module_hessian_diagonal: {', '.join(allowed)}",
            f"unknown keyword arguments {unknown}",
            "Drop or correct them (see help(secorder.module_hessian_trace)).",
            cls=TypeError,
        )
    with_stderr = check_bool(call, "with_stderr", options.pop("with_stderr", False))
    inner = module_hessian_diagonal(model, loss, with_stderr=True, **options)

    def trace_fn(params: Any, inputs: Any, targets: Any, generator: torch.Generator | None = None) -> Any:
        diag, _err = inner(params, inputs, targets, generator)
        trace_fn.method_info = inner.method_info  # type: ignore[attr-defined]
        total = sum(d.sum() for d in diag.values())
        assert isinstance(total, Tensor)
        if not with_stderr:
            return total
        trace_err = inner.trace_stderr  # type: ignore[attr-defined]
        return total, (torch.zeros_like(total) if trace_err is None else trace_err)

    trace_fn.method_info = None  # type: ignore[attr-defined]
    return trace_fn


def _run(
    call: str,
    fn: Any,
    model: nn.Module,
    forward: Callable[..., Any],
    spec: LossSpec,
    f: Callable[..., Tensor],
    params: Any,
    inputs: Any,
    targets: Any,
    method: str,
    k: int | None,
    generator: torch.Generator | None,
    chunk_size: int | None,
    max_hvp: int,
) -> tuple[Any, Any, SweepInfo]:
    """The module's checks, then the route of :func:`secorder.hessian_diagonal` for ``f``:
    (diagonal, standard errors, the method report)."""
    leaves, _ = check_floating_tree(call, "params", params)
    if not isinstance(params, dict):
        raise error(
            call,
            "params must be a dict of parameters (names as in model.named_parameters())",
            type(params).__name__,
            "Pass {k: p.detach() for k, p in model.named_parameters()}.",
            cls=TypeError,
        )
    check_module_call(call, None, params, leaves, (inputs, targets))  # names: in diag_fn
    check_deterministic_module(call, model)
    if method != "hvp":
        check_requires_no_grad(
            call,
            leaves,
            f"method={method!r} (the structured sweep, or one-hot HVPs on detached parameters)",
            "For a differentiable value use method='hvp', or secorder.hessian_diagonal / "
            "hessian_trace on f from secorder.module_loss(model, loss).",
        )
    p_count = sum(leaf.numel() for leaf in leaves)
    with torch.no_grad():  # the targets against the outputs, once, with the loss's own message
        z = forward(params, inputs)
    if isinstance(z, Tensor):
        spec.check(call, z, targets)
    args = (params, inputs, targets)

    def zeros(d: Any) -> Any:
        return {n: torch.zeros_like(v) for n, v in d.items()}

    def hvp_route(reason: str, cost: str = "") -> tuple[Any, Any, SweepInfo]:
        route = _cost.Route("hvp", p_count, f"P={p_count:,} one-hot Hessian-vector products")
        _cost.check_budget(
            call, "Hessian diagonal", [route], _randomized_routes(call, "method", False), reason
        )
        try:
            diag = hessian_diagonal(f, chunk_size=chunk_size, exact="hvp")(*args)
        except StrategyFailedError as exc:  # its fix names strategy=, which this call does not take
            raise error(
                call,
                f"the one-hot Hessian-vector products of method='hvp' ({reason}) need double "
                "backward through every op of the model",
                f"{type(exc.__cause__).__name__}: {exc.__cause__}",
                "Use secorder.hessian_diagonal(f, strategy='finite_difference') with f from "
                "secorder.module_loss(model, loss) (first derivatives only), or an estimate "
                "with method='curvature_propagation', num_probes=K where the sweep covers the model.",
                cls=RuntimeError,
            ) from exc
        return diag, zeros(diag), SweepInfo("hvp", 0, p_count, reason, cost or _cost.describe([route]))

    if method == "hvp":
        return hvp_route("method='hvp'")
    half = half_precision_refusal(leaves, f"method={method!r} (the structured sweep)")
    if half is not None:  # one-hot HVPs accumulate in float32 at the operator's boundary
        if method != "auto":
            raise error(
                call,
                f"method={method!r} needs float32 or float64 parameters",
                half,
                "Use method='hvp' (P one-hot Hessian-vector products, accumulated in float32), or "
                "for an estimate secorder.hessian_diagonal(f, num_probes=K) with f from "
                "secorder.module_loss(model, loss).",
            )
        return hvp_route(half)
    coupled = next(
        (
            (name, m)
            for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and (m.training or not m.track_running_stats or m.running_mean is None)
        ),
        None,
    )
    if coupled is not None:  # the samples interact: only the batch loss's one-hot products apply
        name, m = coupled
        if method == "auto" and p_count <= max_hvp:
            return hvp_route(
                f"{type(m).__name__} at '{name}' normalizes with batch statistics (samples coupled)"
            )
        raise error(
            call,
            f"method={method!r} needs samples that do not interact (per-sample rules)",
            f"{type(m).__name__} at '{name}' normalizing with batch statistics",
            "Call model.eval() to use the running statistics, or pass method='hvp' (P one-hot "
            "Hessian-vector products of the batch loss, exact for train-mode BatchNorm).",
        )
    if method == "curvature_propagation":
        assert k is not None
        mean, err, per_probe, spec_ = _cp_diagonal_leaves(
            call, fn, f, args, 0, k, generator, chunk_size,
            fix="Use method='hvp' (exact, P one-hot Hessian-vector products, any model), or "
            "secorder.hessian_diagonal(f, num_probes=K) (Hutchinson) with f from "
            "secorder.module_loss(model, loss).",
        )  # fmt: skip
        d, e = unflatten(spec_, mean), unflatten(spec_, err)
        traces = sum(p.flatten(1).sum(1) for p in per_probe)
        assert isinstance(traces, Tensor)
        e[_TRACE_KEY] = _mean_stderr(traces)[1]  # popped by diag_fn; read by module_hessian_trace
        return d, e, fn.method_info
    swept = _exact_diagonal_leaves(
        call, fn, f, args, 0, chunk_size, method, option="method", max_hvp_params=max_hvp
    )
    if swept is None:  # method='auto' and one-hot HVPs are cheaper, or the sweep refused
        return hvp_route(fn.method_info.reason, fn.method_info.cost)
    d = unflatten(swept[1], swept[0])
    return d, zeros(d), fn.method_info
