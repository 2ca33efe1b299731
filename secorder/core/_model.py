"""``model, loss_fn, inputs, targets`` → a closure over the model's own parameters.

The closure evaluates the model through :func:`secorder.modules.module_forward`
(``torch.func.functional_call`` with the real parameters and *cloned* buffers), so
its graph reaches the parameters the user holds (``create_graph=True`` results are
differentiable with respect to them) while BatchNorm running statistics, other
buffers and the train/eval flag are never changed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from secorder._errors import error
from secorder._validate import check_callable
from secorder.modules import module_forward

__all__ = ["check_model", "model_closure", "model_forward"]


def check_model(call: str, model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise error(
            call,
            "model must be a torch.nn.Module",
            f"a {type(model).__name__}",
            "Pass the module itself; for a plain function of tensors use the closure form, "
            "e.g. hessian_trace(lambda: loss(x), [x]).",
            cls=TypeError,
        )
    return model


def model_forward(call: str, model: object) -> tuple[Callable[[Any], Any], list[Tensor]]:
    """``forward(inputs)`` through the real trainable parameters, and ``list(model.parameters())``."""
    module = check_model(call, model)
    forward, _ = module_forward(module)
    trainable: dict[str, Tensor] = {k: p for k, p in module.named_parameters() if p.requires_grad}

    def fwd(inputs: Any) -> Any:
        # (inputs,): the inputs are one positional argument, as in ``model(inputs)``.
        return forward(trainable, (inputs,))

    return fwd, list(module.parameters())


def model_closure(
    call: str, model: object, loss_fn: object, inputs: Any, targets: Any
) -> tuple[Callable[[], Any], list[Tensor]]:
    """``func() = loss_fn(model(inputs), targets)`` without mutating ``model``, and its parameters."""
    fwd, params = model_forward(call, model)
    check_callable(call, "loss_fn", loss_fn)
    assert callable(loss_fn)

    def func() -> Any:
        return loss_fn(fwd(inputs), targets)

    return func, params
