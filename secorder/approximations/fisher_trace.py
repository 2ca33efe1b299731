"""Traces of the empirical Fisher and of the Fisher (torch_secorder's shape), with correct numbers.

* :func:`empirical_fisher_trace`: tr(E) for E = c Σ_n ∇l_n ∇l_nᵀ (c = 1/N for a
  mean-reduced loss, 1 for a sum), i.e. the mean over samples of the squared norm of
  each sample's gradient. It is :func:`secorder.fisher_trace` with ``kind="empirical"``
  (conventions in :mod:`secorder.fisher`).
* :func:`generalized_fisher_trace`: tr(F) for the Fisher of the categorical
  likelihood with the given logits, F = Σ_n E_{y∼p(·∣x_n)}[∇ log p(y∣x_n) ∇ log p(y∣x_n)ᵀ]
  = Σ_n J_nᵀ (diag p_n − p_n p_nᵀ) J_n, computed exactly through the graph that
  ``outputs`` carries (no second forward pass).

torch_secorder 0.0.1 returned the squared norm of the *batch* gradient for both
(‖∇L‖², resp. ‖∇ Σ_n log p(y_n∣x_n)‖²), which is not the trace of either matrix:
the cross terms between samples do not cancel. See the "migrating" page of the docs.

Exact or Hutchinson? Both traces here are exact. For large models, the transform
:func:`secorder.fisher_trace` also offers ``num_probes=K`` (Hutchinson, one
Jacobian-vector product per probe) with a standard error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from secorder.approximations._common import _check_num_samples, categorical_fisher, empirical_fisher

__all__ = ["empirical_fisher_trace", "generalized_fisher_trace"]


def empirical_fisher_trace(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Any,
    targets: Any,
    num_samples: int = 1,
) -> Tensor:
    """Compute the trace of the empirical Fisher, (1/N) Σ_n ‖∇_θ l_n‖² for a mean-reduced loss.

    l_n is sample n's loss on the scale of the batch loss (L = (1/N) Σ_n l_n for
    ``reduction="mean"``, L = Σ_n l_n for ``"sum"``, where tr(E) = Σ_n ‖∇l_n‖²). The
    reduction is read from the loss module (``nn.MSELoss(reduction=...)``), is
    ``"mean"`` for ``torch.nn.functional`` losses, and is measured on the outputs for
    other callables. Cost: per-sample gradients, by the structured sweep over a tape of the
    batch where it applies (see :mod:`secorder.fisher`).

    Args:
        model: the module (not mutated; with BatchNorm in train mode the gradients of each
            sample's loss term include its dependence on the batch statistics, see
            :mod:`secorder.fisher`).
        loss_fn: ``loss_fn(outputs, targets) -> scalar``, e.g. ``nn.MSELoss()``,
            ``nn.CrossEntropyLoss()``, ``torch.nn.functional.cross_entropy``.
        inputs: the model's input (one positional argument), batch first.
        targets: the targets, batch first.
        num_samples: accepted for compatibility and ignored (the trace is exact).

    Returns:
        A 0-dim tensor.

    Raises:
        SecorderError: the loss couples samples or does not reduce by mean or sum, or
            targets do not fit the loss.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False).double()
        >>> torch.nn.init.zeros_(model.weight)
        Parameter containing:
        tensor([[0., 0.]], dtype=torch.float64, requires_grad=True)
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
        >>> y = torch.ones(2, 1, dtype=torch.float64)
        >>> # ∇l_n = −2 x_n: (4 + 16) / 2
        >>> empirical_fisher_trace(model, torch.nn.MSELoss(), x, y)
        tensor(10., dtype=torch.float64)
    """
    call = "empirical_fisher_trace(model, loss_fn, inputs, targets)"
    _check_num_samples(call, num_samples)
    out = empirical_fisher(call, model, loss_fn, inputs, targets, trace=True)
    assert isinstance(out, Tensor)
    return out


def generalized_fisher_trace(
    model: nn.Module,
    outputs: Tensor,
    targets: Tensor,
    loss_type: str = "nll",
    num_samples: int = 1,
    create_graph: bool = False,
) -> Tensor:
    """Compute the trace of the Fisher of the categorical likelihood with logits ``outputs``.

    tr(F) = Σ_n E_{y∼p(·∣x_n)} ‖∇_θ log p(y∣x_n)‖² = Σ_n Σ_c p_nc ‖J_nᵀ(e_c − p_n)‖²,
    with p_n = softmax(z_n) and J_n = ∂z_n/∂θ. It equals the GGN of the summed
    cross-entropy, ``secorder.fisher_trace(model, "cross_entropy", reduction="sum")``.
    It is computed exactly through the autograd graph that ``outputs`` carries: N·C
    vector-Jacobian products through that graph, batched; the model is not run again
    and the graph is retained (you can still call ``backward`` on a loss of ``outputs``).

    Args:
        model: the module whose parameters θ produced ``outputs``.
        outputs: the logits ``model(inputs)`` of shape (N, C), with their graph.
        targets: class labels of shape (N,); checked, but they do not enter the value (the
            Fisher averages over the model's own predictive distribution).
        loss_type: ``"nll"`` (the categorical likelihood); others are not supported.
        num_samples: accepted for compatibility and ignored (the trace is exact).
        create_graph: if True, the result is differentiable with respect to θ.

    Returns:
        A 0-dim tensor.

    Raises:
        NotImplementedError: ``loss_type`` is not ``"nll"``.
        SecorderError: ``outputs`` has no graph or is not (N, C); ``targets`` is not (N,) integer.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 2, bias=False).double()
        >>> torch.nn.init.zeros_(model.weight)
        Parameter containing:
        tensor([[0., 0.],
                [0., 0.]], dtype=torch.float64, requires_grad=True)
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
        >>> generalized_fisher_trace(model, model(x), torch.tensor([0, 1]))
        tensor(2.5000, dtype=torch.float64)

        With p = (½, ½): tr(diag p − p pᵀ) = ½, times Σ_n ‖x_n‖² = 5.
    """
    call = "generalized_fisher_trace(model, outputs, targets)"
    out = categorical_fisher(call, model, outputs, targets, loss_type, num_samples, create_graph, trace=True)
    assert isinstance(out, Tensor)
    return out
