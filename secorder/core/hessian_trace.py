"""The exact trace of the Hessian, eagerly: ``func()`` + a list of tensors (torch_secorder's shape).

:func:`hessian_trace` returns tr(∇²L) = Σ_i H_ii, the sum of the exact diagonal of
:mod:`secorder.core.hessian_diagonal` (batched one-hot Hessian-vector products, block
by block). ``num_samples`` is accepted and ignored, as in torch_secorder 0.0.1: this
function is always exact.

Exact or Hutchinson? The exact trace costs P Hessian-vector products for P
parameters. For large models use Hutchinson's estimator: eagerly
:func:`secorder.core.hvp.hessian_trace` (``num_samples`` products), or the transform
:func:`secorder.hessian_trace` with ``num_probes=K``, which also returns a standard
error so you know when K is large enough.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from secorder._validate import check_bool, check_callable
from secorder.core._closure import ClosureGraph, check_params
from secorder.core._model import model_closure
from secorder.core.hessian_diagonal import check_exact_cost, exact_block_diagonal

__all__ = ["hessian_trace", "model_hessian_trace"]


def exact_trace(graph: ClosureGraph) -> Tensor:
    """Σ over live tensors of the sum of their exact block diagonals (0 if none)."""
    check_exact_cost(
        graph, "Hessian trace", "secorder.core.hvp.hessian_trace(func, params, num_samples=K) (Hutchinson)"
    )
    total = graph.scalar_zero()
    for i in graph.live():
        total = total + exact_block_diagonal(graph, i).sum()
    return total


def hessian_trace(
    func: Callable[[], Tensor],
    params: list[Tensor],
    num_samples: int = 1,
    create_graph: bool = False,
    strict: bool = False,
) -> Tensor:
    """Compute the exact trace of the Hessian of ``func()`` with respect to ``params``.

    tr(H) = Σ_i e_iᵀ H e_i, the sum of :func:`~secorder.core.hessian_diagonal.hessian_diagonal`.
    Cost: one gradient with ``create_graph=True``, then P Hessian-vector products in
    batched calls (not one backward pass per entry).

    Args:
        func: a callable with no arguments returning the scalar loss; it must use the
            tensors in ``params`` (it is called once).
        params: the tensors to differentiate with respect to.
        num_samples: ignored (kept for compatibility with torch_secorder; the trace is exact).
        create_graph: if True, the result is differentiable with respect to ``params``.
        strict: if True, raise when a tensor that requires grad gets no gradient
            from ``func()``; if False, it contributes zero.

    Returns:
        A 0-dim tensor.

    Raises:
        TypeError, ValueError: see :func:`~secorder.core.hessian_diagonal.hessian_diagonal`.

    Example:
        >>> import torch
        >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> def quadratic():
        ...     return x.pow(2).sum()
        >>> hessian_trace(quadratic, [x], num_samples=1000)   # tr(2I), exactly
        tensor(4.)

    See Also:
        :func:`secorder.core.hvp.hessian_trace` (Hutchinson), :func:`secorder.hessian_trace`.
    """
    call = "hessian_trace(func, params)"
    check_callable(call, "func", func)
    plist = check_params(call, params)
    check_bool(call, "create_graph", create_graph)
    check_bool(call, "strict", strict)
    return exact_trace(ClosureGraph(call, func, plist, create_graph=create_graph, strict=strict))


def model_hessian_trace(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Any,
    targets: Any,
    num_samples: int = 1,
    create_graph: bool = False,
    strict: bool = False,
) -> Tensor:
    """Compute the exact Hessian trace of ``loss_fn(model(inputs), targets)`` for ``model.parameters()``.

    Same as :func:`hessian_trace` with the closure built for you. The model is
    evaluated through :func:`torch.func.functional_call` with its own parameters and
    cloned buffers: its parameters, buffers (BatchNorm running statistics included)
    and train/eval flag are the same after the call.

    Args:
        model: the module.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``, e.g. ``nn.MSELoss()`` or
            ``torch.nn.functional.cross_entropy``.
        inputs: the model's input (passed as one positional argument).
        targets: the targets.
        num_samples: ignored (kept for compatibility; the trace is exact).
        create_graph: if True, the result is differentiable with respect to the parameters.
        strict: if True, raise when a parameter that requires grad gets no gradient.

    Returns:
        A 0-dim tensor.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 1).double()
        >>> x = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
        >>> y = torch.zeros(2, 1, dtype=torch.float64)
        >>> # (2/N) Σ_n (‖x_n‖² + 1)
        >>> model_hessian_trace(model, torch.nn.functional.mse_loss, x, y)
        tensor(9., dtype=torch.float64)
    """
    call = "model_hessian_trace(model, loss_fn, inputs, targets)"
    func, params = model_closure(call, model, loss_fn, inputs, targets)
    check_bool(call, "create_graph", create_graph)
    check_bool(call, "strict", strict)
    graph = ClosureGraph(
        call, func, params, create_graph=create_graph, strict=strict, what="loss_fn(model(inputs), targets)"
    )
    return exact_trace(graph)
