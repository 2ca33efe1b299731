"""Diagonals of the empirical Fisher and of the Fisher (torch_secorder's shape), with correct numbers.

* :func:`empirical_fisher_diagonal`: diag(E) = c Σ_n (∇l_n)² (c = 1/N for a mean-reduced
  loss), :func:`secorder.fisher_diagonal` with ``kind="empirical"``.
* :func:`generalized_fisher_diagonal`: diag(F) for the Fisher of the categorical
  likelihood with the given logits, Σ_n Σ_c p_nc (J_nᵀ(e_c − p_n))², through the graph
  that ``outputs`` carries.

torch_secorder 0.0.1 returned the squared entries of the batch gradient, (∇L)², for
both; see :mod:`secorder.approximations.fisher_trace`.

Exact or Hutchinson? Both diagonals here are exact. :func:`secorder.fisher_diagonal`
also offers Hutchinson's estimate (``num_probes=K``) with per-entry standard errors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from secorder.approximations._common import categorical_fisher, empirical_fisher

__all__ = ["empirical_fisher_diagonal", "generalized_fisher_diagonal"]


def empirical_fisher_diagonal(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Any,
    targets: Any,
) -> list[Tensor]:
    """Compute the diagonal of the empirical Fisher, (1/N) Σ_n (∇_θ l_n)² for a mean-reduced loss.

    Conventions as in :func:`~secorder.approximations.fisher_trace.empirical_fisher_trace`
    (whose value is the sum of this diagonal).

    Args:
        model: the module (not mutated; BatchNorm in eval mode).
        loss_fn: ``loss_fn(outputs, targets) -> scalar``, e.g. ``nn.CrossEntropyLoss()``.
        inputs: the model's input, batch first.
        targets: the targets, batch first.

    Returns:
        A list of tensors shaped like ``list(model.parameters())`` (zeros for frozen ones).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False).double()
        >>> torch.nn.init.zeros_(model.weight)
        Parameter containing:
        tensor([[0., 0.]], dtype=torch.float64, requires_grad=True)
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
        >>> y = torch.ones(2, 1, dtype=torch.float64)
        >>> empirical_fisher_diagonal(model, torch.nn.MSELoss(), x, y)   # ((−2 x_n)² averaged)
        [tensor([[2., 8.]], dtype=torch.float64)]
    """
    call = "empirical_fisher_diagonal(model, loss_fn, inputs, targets)"
    out = empirical_fisher(call, model, loss_fn, inputs, targets, trace=False)
    assert isinstance(out, list)
    return out


def generalized_fisher_diagonal(
    model: nn.Module,
    outputs: Tensor,
    targets: Tensor,
    loss_type: str = "nll",
    create_graph: bool = False,
) -> list[Tensor]:
    """Compute the diagonal of the Fisher of the categorical likelihood with logits ``outputs``.

    diag(F) = Σ_n Σ_c p_nc (J_nᵀ(e_c − p_n))², p_n = softmax(z_n), exactly through the
    graph that ``outputs`` carries (N·C batched vector-Jacobian products; no second
    forward pass). Conventions as in
    :func:`~secorder.approximations.fisher_trace.generalized_fisher_trace`.

    Args:
        model: the module whose parameters produced ``outputs``.
        outputs: logits of shape (N, C) with their graph.
        targets: class labels of shape (N,) (checked; they do not change the value).
        loss_type: ``"nll"``.
        create_graph: if True, the result is differentiable with respect to the parameters.

    Returns:
        A list of tensors shaped like ``list(model.parameters())`` (zeros for frozen ones).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 2, bias=False).double()
        >>> torch.nn.init.zeros_(model.weight)
        Parameter containing:
        tensor([[0., 0.],
                [0., 0.]], dtype=torch.float64, requires_grad=True)
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
        >>> # ¼ Σ_n x_n² per row
        >>> generalized_fisher_diagonal(model, model(x), torch.tensor([0, 1]))
        [tensor([[0.2500, 1.0000],
                [0.2500, 1.0000]], dtype=torch.float64)]
    """
    call = "generalized_fisher_diagonal(model, outputs, targets)"
    out = categorical_fisher(call, model, outputs, targets, loss_type, 1, create_graph, trace=False)
    assert isinstance(out, list)
    return out
