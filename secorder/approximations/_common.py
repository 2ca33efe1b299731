"""Shared pieces of the eager Fisher functions: loss detection and the outputs' graph.

Loss detection (:func:`resolve_eager_loss`): torch_secorder's functions take a loss
*callable*; secorder's Fisher transforms need to know how it combines samples
(``reduction``) and, for speed, whether it is one of the built-in losses. Known losses
map to built-in names (``nn.MSELoss``/``F.mse_loss`` → ``"mse"``, cross-entropy,
BCE-with-logits) with the module's ``reduction`` (functions default to ``"mean"``,
as in ``torch.nn.functional``); any other callable is passed through, with its
reduction read from a ``reduction`` attribute or measured on the model's outputs (the
batch loss equals the mean or the sum of the per-sample losses).

The outputs' graph (:class:`OutputsJacobian`): ``generalized_fisher_*`` receive the
model outputs z with their autograd graph and must not run the model again, so J = ∂z/∂θ
is only available as vector-Jacobian products Jᵀw through that graph; a chunk of them
runs as one ``vmap`` over :func:`torch.autograd.grad` (see :mod:`secorder.core._closure`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from secorder._errors import SecorderError, error
from secorder._pytree import HALF_DTYPES, accumulation_dtype
from secorder.core._closure import _batched_grad

__all__ = ["OutputsJacobian", "categorical_fisher", "empirical_fisher", "resolve_eager_loss"]

_FUNCTIONS: dict[Callable[..., Any], str] = {
    nn.functional.mse_loss: "mse",
    nn.functional.cross_entropy: "cross_entropy",
    nn.functional.binary_cross_entropy_with_logits: "bce_with_logits",
}


def _module_name(loss_fn: nn.Module) -> str | None:
    """The built-in name of a loss module whose options the built-in loss reproduces."""
    if type(loss_fn) is nn.MSELoss:
        return "mse"
    if type(loss_fn) is nn.CrossEntropyLoss:
        plain = loss_fn.weight is None and loss_fn.label_smoothing == 0.0 and loss_fn.ignore_index == -100
        return "cross_entropy" if plain else None
    if type(loss_fn) is nn.BCEWithLogitsLoss:
        return "bce_with_logits" if loss_fn.weight is None and loss_fn.pos_weight is None else None
    return None


def _check_reduction(call: str, reduction: object) -> str:
    if reduction not in ("mean", "sum"):
        raise error(
            call,
            "loss_fn must reduce the batch to a scalar with reduction 'mean' or 'sum'",
            f"reduction={reduction!r}",
            "Use the loss with its default reduction='mean' (or 'sum').",
        )
    return str(reduction)


def _measured_reduction(call: str, loss_fn: Callable[..., Any], z: Tensor, targets: Any) -> str:
    """'mean' or 'sum': how ``loss_fn`` combines the per-sample losses, measured on ``z``."""
    n = z.shape[0]
    with torch.no_grad():
        total = loss_fn(z, targets)
        if not isinstance(total, Tensor) or total.dim() != 0:
            got = f"shape {tuple(total.shape)}" if isinstance(total, Tensor) else type(total).__name__
            raise error(
                call,
                "loss_fn(model(inputs), targets) must return a scalar (0-dim) tensor",
                got,
                "Use a reduced loss, e.g. nn.MSELoss() with the default reduction='mean'.",
            )
        per = torch.stack([loss_fn(z[i : i + 1], _take(targets, i, n)).reshape(()) for i in range(n)])
    if z.dtype in HALF_DTYPES:  # the batch loss, each per-sample loss and their mean round once
        tol = 2 * torch.finfo(z.dtype).eps  # each (u relative): 3u < 2·eps = 4u
    else:
        tol = 1e-4 if z.dtype == torch.float32 else 1e-9
    for name, value in (("mean", per.mean()), ("sum", per.sum())):
        if torch.allclose(total, value, rtol=tol, atol=tol * (1 + float(value.abs()))):
            return name
    raise error(
        call,
        "loss_fn(outputs, targets) must be the mean or the sum of its per-sample values "
        "loss_fn(outputs[n:n+1], targets[n:n+1]) (the empirical Fisher is built from them)",
        f"a batch loss of {float(total):.6g}, while the per-sample losses have mean "
        f"{float(per.mean()):.6g} and sum {float(per.sum()):.6g}",
        "Use a loss that averages or sums independent per-sample terms (e.g. nn.MSELoss(), "
        "F.cross_entropy); losses that couple samples have no empirical Fisher.",
    )


def _take(targets: Any, i: int, n: int) -> Any:
    if isinstance(targets, Tensor) and targets.dim() > 0 and targets.shape[0] == n:
        return targets[i : i + 1]
    return targets


def resolve_eager_loss(
    call: str, loss_fn: object, outputs: Callable[[], Tensor], targets: Any
) -> tuple[str | Callable[..., Any], str]:
    """``(loss, reduction)`` for :func:`secorder.fisher_trace` from a torch_secorder-style ``loss_fn``.

    ``outputs()`` evaluates the model (no gradient) when the reduction must be measured.
    """
    if not callable(loss_fn):
        raise error(
            call,
            "loss_fn must be callable, e.g. nn.MSELoss() or torch.nn.functional.cross_entropy",
            f"a {type(loss_fn).__name__}",
            "Pass the loss function itself.",
            cls=TypeError,
        )
    if isinstance(loss_fn, nn.Module):
        reduction = getattr(loss_fn, "reduction", None)
        if isinstance(reduction, str):
            reduction = _check_reduction(call, reduction)
            name = _module_name(loss_fn)
            return (name if name is not None else loss_fn), reduction
    if loss_fn in _FUNCTIONS:
        return _FUNCTIONS[loss_fn], "mean"
    if isinstance(loss_fn, functools.partial) and loss_fn.func in _FUNCTIONS and not loss_fn.args:
        extra = set(loss_fn.keywords) - {"reduction"}
        reduction = _check_reduction(call, loss_fn.keywords.get("reduction", "mean"))
        return (loss_fn if extra else _FUNCTIONS[loss_fn.func]), reduction
    with torch.no_grad():
        z = outputs()
    return loss_fn, _measured_reduction(call, loss_fn, z, targets)


class OutputsJacobian:
    """J = ∂z/∂θ for outputs z that carry their autograd graph: batched products Jᵀ w.

    Args:
        outputs: z, computed from ``params`` with grad enabled.
        params: the tensors θ (those that do not require grad are left out).
        create_graph: keep the products differentiable with respect to θ.
    """

    def __init__(self, outputs: Tensor, params: Sequence[Tensor], create_graph: bool) -> None:
        self.outputs = outputs
        self.indices = [i for i, p in enumerate(params) if p.requires_grad]
        self.inputs = [params[i] for i in self.indices]
        self.create_graph = create_graph

    def vjp(self, W: Tensor) -> list[Tensor]:
        """Rows Jᵀ w_i for the ``(k, *z.shape)`` cotangents ``W``: one ``(k, *p.shape)`` tensor per input."""
        return _batched_grad([self.outputs], self.inputs, [W], self.create_graph)


# -- the two computations behind the public functions -------------------------------------
def _check_num_samples(call: str, num_samples: object) -> None:
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise error(
            call,
            "num_samples must be an int >= 1 (it is accepted for compatibility; the result is exact)",
            f"{num_samples!r}",
            "Leave num_samples at its default of 1.",
        )


def _check_model(call: str, model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise error(
            call,
            "model must be a torch.nn.Module",
            f"a {type(model).__name__}",
            "Pass the module whose parameters the curvature is taken with respect to.",
            cls=TypeError,
        )
    return model


def empirical_fisher(
    call: str, model: object, loss_fn: object, inputs: Any, targets: Any, *, trace: bool
) -> Tensor | list[Tensor]:
    """tr(E) or diag(E) (a list shaped like ``model.parameters()``) via :func:`secorder.fisher_trace`."""
    from secorder.fisher import fisher_diagonal, fisher_trace
    from secorder.modules import module_forward

    module = _check_model(call, model)
    forward, detached = module_forward(module)
    loss, reduction = resolve_eager_loss(call, loss_fn, lambda: forward(detached, (inputs,)), targets)
    # inputs are one positional argument, as in model(inputs): wrap them in a 1-tuple.
    transform = fisher_trace if trace else fisher_diagonal
    try:
        result = transform(module, loss, kind="empirical", reduction=reduction)(detached, (inputs,), targets)
    except (SecorderError, TypeError) as exc:
        # Name the call the user made; the transform's own call form follows in brackets.
        prefix, sep, rest = str(exc).partition("): ")
        if not sep or not prefix.startswith("fisher_"):
            raise
        via = f"{prefix.split('(')[0]}(..., kind='empirical')"
        raise type(exc)(f"{call} [via secorder.{via}]: {rest}") from exc
    if trace:
        return result
    return [result[k] if k in result else torch.zeros_like(p) for k, p in module.named_parameters()]


def categorical_fisher(
    call: str,
    model: object,
    outputs: object,
    targets: object,
    loss_type: object,
    num_samples: object,
    create_graph: object,
    *,
    trace: bool,
) -> Tensor | list[Tensor]:
    """tr(F) or diag(F) of the categorical likelihood with logits ``outputs``, through their graph.

    F = Σ_n J_nᵀ (diag(p_n) − p_n p_nᵀ) J_n, p_n = softmax(z_n). The factor
    diag(p) − p pᵀ = Σ_c s_c s_cᵀ with s_c = √p_c (e_c − p) is the one of
    :class:`secorder._losses.CrossEntropyLoss` with ``reduction="sum"``, and
    diag(F) = Σ_{n,c} (J_nᵀ s_{n,c})², one vector-Jacobian product per (sample, class)
    through the outputs' graph, summed per parameter.
    """
    from secorder._chunking import default_chunk_size
    from secorder._losses import CrossEntropyLoss
    from secorder._validate import check_bool
    from secorder.core._closure import MAX_CHUNK_ROWS

    module = _check_model(call, model)
    if not isinstance(loss_type, str) or loss_type.lower() != "nll":
        raise error(
            call,
            "loss_type must be 'nll' (the categorical likelihood of logits)",
            f"{loss_type!r}",
            "Pass loss_type='nll' with logits of shape (N, C); for other losses use "
            "secorder.fisher_trace(model, loss, kind='ggn'), the Fisher of any exponential family.",
            cls=NotImplementedError,
        )
    _check_num_samples(call, num_samples)
    check_bool(call, "create_graph", create_graph)
    if not isinstance(outputs, Tensor) or outputs.dim() != 2 or not outputs.is_floating_point():
        got = (
            f"shape {tuple(outputs.shape)}, dtype {outputs.dtype}"
            if isinstance(outputs, Tensor)
            else (f"a {type(outputs).__name__}")
        )
        raise error(
            call,
            "outputs must be floating-point logits of shape (N, C)",
            got,
            "Pass outputs = model(inputs) for a classifier.",
            cls=TypeError if not isinstance(outputs, Tensor) else SecorderError,
        )
    n, c = outputs.shape
    if not isinstance(targets, Tensor) or tuple(targets.shape) != (n,) or targets.is_floating_point():
        got = (
            f"shape {tuple(targets.shape)}, dtype {targets.dtype}"
            if isinstance(targets, Tensor)
            else f"a {type(targets).__name__}"
        )
        raise error(
            call,
            f"targets must be integer class labels of shape (N,) = ({n},)",
            got,
            "Pass class indices, e.g. torch.randint(0, C, (N,)); the Fisher takes the expectation "
            "over the model's own predictive distribution, so their values do not change the result.",
        )
    if not outputs.requires_grad:
        raise error(
            call,
            "outputs must carry the autograd graph of model(inputs) (the Fisher is computed through it)",
            "outputs that do not require grad",
            "Compute outputs = model(inputs) with grad enabled (not under torch.no_grad()) and "
            "do not detach them.",
        )
    params = list(module.parameters())
    jac = OutputsJacobian(outputs, params, bool(create_graph))
    z = outputs if create_graph else outputs.detach()
    acc_dtype = accumulation_dtype(z.dtype)  # float32 for half precision: squares and sums in it
    if not jac.inputs:  # no parameter requires grad
        zero = [torch.zeros_like(p, dtype=acc_dtype) for p in params]
        return torch.zeros((), dtype=acc_dtype, device=z.device) if trace else zero
    factor = CrossEntropyLoss("sum").factor(z, targets)
    shapes = [p.shape for p in jac.inputs]
    sums: list[Tensor | None] = [None] * len(shapes)
    size = sum(p.numel() for p in jac.inputs)
    rows = min(MAX_CHUNK_ROWS, default_chunk_size(n * c, max(size, n * c), z.dtype.itemsize))
    k_cols = max(1, min(c, rows // n))
    n_chunk = max(1, min(n, rows // k_cols))
    for c0 in range(0, c, k_cols):
        c1 = min(c, c0 + k_cols)
        cols = factor.columns(c0, c1)  # (k, N, C): s_{n,c} for every sample n
        totals: list[Tensor | None] = [None] * len(shapes)
        for n0 in range(0, n, n_chunk):
            n1 = min(n, n0 + n_chunk)
            # One cotangent per (class, sample n): s_{n,c} placed at row n, zeros elsewhere.
            W = torch.zeros(c1 - c0, n1 - n0, n, c, dtype=z.dtype, device=z.device)
            local = torch.arange(n1 - n0, device=z.device)
            W[:, local, local + n0, :] = cols[:, n0:n1]
            grads = jac.vjp(W.reshape((c1 - c0) * (n1 - n0), n, c))
            for j, g in enumerate(grads):
                g = g.to(acc_dtype)  # a half value's square is exact in float32
                sq = (g * g).reshape(c1 - c0, n1 - n0, *g.shape[1:]).sum(1)  # Σ over the samples
                prev = totals[j]
                totals[j] = sq if prev is None else prev + sq
        for j, t in enumerate(totals):
            if t is not None:
                prev_sum = sums[j]
                sums[j] = t.sum(0) if prev_sum is None else prev_sum + t.sum(0)
    per_param = [torch.zeros_like(p, dtype=acc_dtype) if t is None else t for t, p in zip(sums, jac.inputs)]
    if trace:
        return sum((t.sum() for t in per_param), start=z.new_zeros((), dtype=acc_dtype))
    out = [torch.zeros_like(p, dtype=acc_dtype) for p in params]
    for i, t in zip(jac.indices, per_param):
        out[i] = t
    return out
