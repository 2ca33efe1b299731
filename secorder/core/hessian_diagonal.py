"""The exact diagonal of the Hessian, eagerly: ``func()`` + a list of tensors (torch_secorder's shape).

For a closure ``func`` returning a scalar loss L and tensors p_1, …, p_m that it
uses, :func:`hessian_diagonal` returns diag(∇²L) split like the tensors. It is exact:
H_ii = e_iᵀ H e_i from one-hot Hessian-vector products, batched (``vmap`` over chunks
of one-hot rows on one retained double-backward graph) and taken block by block
(the diagonal block H_jj of each tensor needs a backward pass from ∂L/∂p_j to p_j
only). Cost: P Hessian-vector products for P entries, run as a few batched calls
rather than one backward pass per entry. The estimator is
:func:`secorder.estimators.exact_diagonal`, shared with :func:`secorder.hessian_diagonal`.

Exact or Hutchinson? The exact diagonal costs P products. When P is large and a
noisy estimate will do, use the transform :func:`secorder.hessian_diagonal` with
``num_probes=K`` (Hutchinson's mean of v ⊙ Hv, K products, with a standard error).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from secorder import _cost
from secorder._validate import check_bool, check_callable
from secorder.core._closure import ClosureGraph, check_params, check_vectors, chunk_rows
from secorder.core._model import model_closure
from secorder.estimators import exact_diagonal

__all__ = ["hessian_diagonal", "model_hessian_diagonal"]


def exact_block_diagonal(graph: ClosureGraph, i: int) -> Tensor:
    """The exact diagonal of the block H_ii of ``graph.params[i]``, flat, by the shared estimator."""
    op = graph.operator([i])
    return exact_diagonal(op, chunk_size=chunk_rows(op))


def check_exact_cost(graph: ClosureGraph, quantity: str, randomized: str) -> None:
    """The exact budget (:mod:`secorder._cost`): P one-hot products over the live tensors."""
    size = sum(graph.params[i].numel() for i in graph.live())
    route = _cost.Route("hvp", size, f"P={size:,} one-hot Hessian-vector products")
    _cost.check_budget(graph.call, quantity, [route], [randomized])


def block_diagonals(graph: ClosureGraph) -> list[Tensor]:
    """diag(H) per entry of ``graph.params``: one exact block diagonal per live tensor, zeros elsewhere."""
    check_exact_cost(
        graph,
        "Hessian diagonal",
        "the transform secorder.hessian_diagonal(f, num_probes=K) (Hutchinson, K HVPs) on a function "
        "of the parameters",
    )
    out = []
    for i, p in enumerate(graph.params):
        if graph.grads[i] is None:
            out.append(graph.zeros(i))
        else:
            out.append(exact_block_diagonal(graph, i).reshape(p.shape))
    return out


def hessian_diagonal(
    func: Callable[[], Tensor],
    params: list[Tensor],
    v: list[Tensor] | None = None,
    create_graph: bool = False,
    strict: bool = False,
) -> list[Tensor]:
    """Compute the exact diagonal of the Hessian of ``func()`` with respect to ``params``.

    diag(H)_i = ∂²L/∂θ_i², from P one-hot Hessian-vector products on one retained
    double-backward graph, batched and taken per tensor (see the module docstring).
    Cost: one gradient with ``create_graph=True``, then P Hessian-vector products in
    batched calls.

    Args:
        func: a callable with no arguments returning the scalar loss L; it must use
            the tensors in ``params`` (it is called once).
        params: the tensors to differentiate with respect to (e.g.
            ``list(model.parameters())``).
        v: optional tensors shaped like ``params``; then the result is v_i · H_ii.
        create_graph: if True, the result is differentiable with respect to
            ``params`` (e.g. to penalize curvature).
        strict: if True, raise when a tensor that requires grad gets no gradient
            from ``func()``; if False, its diagonal is zeros.

    Returns:
        A list of tensors shaped like ``params``. Tensors that do not require grad get
        zeros.

    Raises:
        TypeError: ``params`` is not a list of floating tensors, or ``func()`` does not
            return a tensor.
        ValueError: ``func()`` is not a scalar, ``v`` does not match ``params``, or
            ``strict=True`` and a tensor is unused.

    Example:
        >>> import torch
        >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> hessian_diagonal(lambda: (x**3).sum(), [x])          # 6 x
        [tensor([ 6., 12.])]
        >>> hessian_diagonal(lambda: (x**3).sum(), [x], v=[torch.tensor([1.0, -1.0])])
        [tensor([  6., -12.])]

    See Also:
        :func:`secorder.hessian_diagonal`, the ``torch.func`` transform (also Hutchinson's estimate).
    """
    call = "hessian_diagonal(func, params)"
    check_callable(call, "func", func)
    plist = check_params(call, params)
    check_bool(call, "create_graph", create_graph)
    check_bool(call, "strict", strict)
    vs = None if v is None else check_vectors(call, "v", v, plist)
    graph = ClosureGraph(call, func, plist, create_graph=create_graph, strict=strict)
    diags = block_diagonals(graph)
    if vs is not None:
        diags = [d * a for d, a in zip(diags, vs)]
    return diags


def model_hessian_diagonal(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Any,
    targets: Any,
    create_graph: bool = False,
    strict: bool = False,
) -> list[Tensor]:
    """Compute the exact Hessian diagonal of ``loss_fn(model(inputs), targets)`` for ``model.parameters()``.

    Same as :func:`hessian_diagonal` with the closure built for you. The model is
    evaluated through :func:`torch.func.functional_call` with its own parameters and
    cloned buffers: its parameters, buffers (BatchNorm running statistics included)
    and train/eval flag are the same after the call.

    Args:
        model: the module.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``, e.g. ``nn.MSELoss()`` or
            ``torch.nn.functional.cross_entropy``.
        inputs: the model's input (passed as one positional argument).
        targets: the targets.
        create_graph: if True, the result is differentiable with respect to the parameters.
        strict: if True, raise when a parameter that requires grad gets no gradient.

    Returns:
        A list of tensors shaped like ``list(model.parameters())`` (zeros for frozen ones).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False).double()
        >>> x = torch.tensor([[1.0, 2.0], [3.0, 0.0]], dtype=torch.float64)
        >>> y = torch.zeros(2, 1, dtype=torch.float64)
        >>> # (2/N) Σ_n x_ni²
        >>> model_hessian_diagonal(model, torch.nn.functional.mse_loss, x, y)
        [tensor([[10.,  4.]], dtype=torch.float64)]
    """
    call = "model_hessian_diagonal(model, loss_fn, inputs, targets)"
    func, params = model_closure(call, model, loss_fn, inputs, targets)
    check_bool(call, "create_graph", create_graph)
    check_bool(call, "strict", strict)
    graph = ClosureGraph(
        call, func, params, create_graph=create_graph, strict=strict, what="loss_fn(model(inputs), targets)"
    )
    return block_diagonals(graph)
