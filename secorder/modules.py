"""From ``nn.Module`` + loss to a pure function ``f(params, inputs, targets)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn
from torch.func import functional_call

from secorder._errors import error
from secorder._select import check_select, split
from secorder._validate import check_callable

__all__ = ["module_forward", "module_loss"]


def _check_module(call: str, model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise error(
            call,
            "model must be a torch.nn.Module",
            f"{type(model).__name__}",
            "Pass the module itself; for a plain function use the transforms directly.",
            cls=TypeError,
        )
    return model


def module_forward(
    model: nn.Module, /, *, select: Any = None
) -> tuple[Callable[[dict[str, Tensor], Any], Any], dict[str, Tensor]]:
    """Turn ``model`` into ``forward(params, inputs)`` plus a detached copy-free params dict.

    ``params`` holds the parameters that require grad (detached: same storage, no
    autograd history), in ``named_parameters()`` order; with ``select`` (a glob, a list
    of globs, a compiled regex or a predicate on names, see :mod:`secorder._select`) only
    the selected ones. ``forward`` accepts any subset of the parameters: every parameter
    it is not given enters at its current value, detached (held fixed), as do frozen
    parameters. Buffers are cloned on every call, so train-mode BatchNorm updates a
    throw-away copy and the module's running statistics never change. The module is
    never mutated (parameters, buffers, train/eval flag).
    ``inputs`` is a tensor or a tuple of positional inputs.
    """
    model = _check_module("module_forward(model)", model)
    call = "module_forward(model, select=...)"
    selector = check_select(call, select)
    held = {k: p.detach() for k, p in model.named_parameters()}
    params, _ = split(call, selector, {k: held[k] for k, p in model.named_parameters() if p.requires_grad})
    buffers = dict(model.named_buffers())

    def forward(p: dict[str, Tensor], inputs: Any) -> Any:
        state = {**held, **{k: b.clone() for k, b in buffers.items()}, **p}
        args = inputs if isinstance(inputs, tuple) else (inputs,)
        return functional_call(model, state, args)

    return forward, params


def module_loss(
    model: nn.Module, loss_fn: Callable[[Any, Any], Tensor], /, *, select: Any = None
) -> tuple[Callable[[dict[str, Tensor], Any, Any], Tensor], dict[str, Tensor]]:
    """Turn ``model`` and ``loss_fn`` into ``f(params, inputs, targets)`` and its params.

    ``f(params, inputs, targets) = loss_fn(model(inputs; params), targets)`` through
    :func:`torch.func.functional_call`; see :func:`module_forward` for what ``params``
    holds (``select`` picks a subset by name, the rest held fixed) and the no-mutation
    guarantee.

    Example:
        >>> import torch, secorder
        >>> model = torch.nn.Linear(3, 1)
        >>> f, params = secorder.module_loss(model, torch.nn.functional.mse_loss)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> trace = secorder.hessian_trace(f)(params, x, y)
        >>> bool(torch.isclose(trace, 2 * (x.pow(2).sum() / 8 + 1)))   # 2/N·(ΣxᵢᵀxᵢΣ + N)
        True
    """
    call = "module_loss(model, loss_fn)"
    _check_module(call, model)
    check_callable(call, "loss_fn", loss_fn)
    forward, params = module_forward(model, select=select)

    def f(p: dict[str, Tensor], inputs: Any, targets: Any) -> Tensor:
        return loss_fn(forward(p, inputs), targets)

    f.secorder_module = model  # type: ignore[attr-defined]  # for secorder.data's train-mode check
    return f, params
