"""From ``nn.Module`` + loss to a pure function ``f(params, inputs, targets)``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn
from torch.func import functional_call

from secorder._errors import error
from secorder._select import check_select, split
from secorder._validate import check_callable, check_param_names

__all__ = ["module_forward", "module_loss", "unwrap_module"]


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


def unwrap_module(model: object) -> object:
    """The module a ``torch.compile`` wrapper holds (``model._orig_mod``), else ``model`` itself.

    secorder evaluates models through :func:`torch.func.functional_call` and its own tapes;
    the compiled wrapper adds nothing there and prefixes every parameter name with
    ``_orig_mod.``, so the wrapped module is used (same parameters, same function).
    """
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except ImportError:  # pragma: no cover - torch without dynamo
        return model
    while isinstance(model, OptimizedModule):
        model = model._orig_mod
    return model


def module_forward(
    model: nn.Module, /, *, select: Any = None, strict: bool = True
) -> tuple[Callable[[dict[str, Tensor], Any], Any], dict[str, Tensor]]:
    """Turn ``model`` into ``forward(params, inputs)`` plus a detached copy-free params dict.

    ``params`` holds the parameters that require grad (detached: same storage, no
    autograd history), in ``named_parameters()`` order; with ``select`` (a glob, a list
    of globs, a compiled regex or a predicate on names, see :mod:`secorder._select`) only
    the selected ones. The params passed to ``forward`` must hold every name of ``params``
    (any order); names of the other parameters and of buffers may be added. Every
    parameter not given enters at its current value, detached (held fixed), as do frozen
    parameters. A misspelled or missing name raises, naming the nearest expected names,
    instead of being ignored (curvature 0) or silently held fixed. Buffers are cloned on
    every call, so train-mode BatchNorm updates a throw-away copy and the module's running
    statistics never change. The module is never mutated (parameters, buffers, train/eval
    flag). ``inputs`` is a tensor or a tuple of positional inputs. ``strict=False`` skips the
    name check (for secorder's own callers, which check the names at their entry point and
    pass subsets on).
    """
    model = _check_module("module_forward(model)", unwrap_module(model))
    call = "module_forward(model, select=...)"
    selector = check_select(call, select)
    held = {k: p.detach() for k, p in model.named_parameters()}
    params, _ = split(call, selector, {k: held[k] for k, p in model.named_parameters() if p.requires_grad})
    buffers = dict(model.named_buffers())

    names = list(params)
    optional = [*(k for k in held if k not in params), *buffers]  # may be passed too

    def forward(p: dict[str, Tensor], inputs: Any) -> Any:
        if not isinstance(p, Mapping):
            raise error(
                "module_forward(model)(params, inputs)",
                "params must be a dict keyed by the model's parameter names",
                f"a {type(p).__name__}",
                "Pass the params dict returned with the function, or "
                "{k: p.detach() for k, p in model.named_parameters()}.",
                cls=TypeError,
            )
        if strict:
            check_param_names("module_loss(model, loss_fn) -> f(params, ...)", names, p, optional)
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
    model = _check_module(call, unwrap_module(model))
    check_callable(call, "loss_fn", loss_fn)
    forward, params = module_forward(model, select=select)

    def f(p: dict[str, Tensor], inputs: Any, targets: Any) -> Tensor:
        return loss_fn(forward(p, inputs), targets)

    f.secorder_module = model  # type: ignore[attr-defined]  # for secorder.data's train-mode check
    return f, params
