"""Hessian-vector products, Hutchinson's trace and Gauss-Newton products, eagerly (torch_secorder's shape).

* :func:`exact_hvp` / :func:`model_hvp`: H v by double backpropagation on one
  retained graph. Cost: about two gradients.
* :func:`hessian_trace`: Hutchinson's estimate (1/K) Σ_k v_kᵀ H v_k from K = ``num_samples``
  Rademacher probes, all K products batched on one retained graph (not a Python
  loop, and ``func`` is called once, not once per probe). The estimator is
  :func:`secorder.estimators.hutchinson_trace`, shared with :func:`secorder.hessian_trace`.
* :func:`gauss_newton_product`: G v with G = Jᵀ (∇²_z L) J, the generalized
  Gauss-Newton matrix of the loss L(z) at the model outputs z. Cost: one
  forward-mode Jacobian-vector product, one Hessian-vector product of the loss in
  output space, one vector-Jacobian product.

Exact or Hutchinson? The exact trace (:func:`secorder.core.hessian_trace.hessian_trace`)
costs P products; Hutchinson costs K and has standard deviation
√(2(‖H‖²_F − Σ_i H_ii²)/K) for Rademacher probes. Prefer Hutchinson once P is in the
thousands and a few percent of error will do; use the transform
:func:`secorder.hessian_trace` with ``with_stderr=True`` to see that error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vjp

from secorder import probes as _probes
from secorder._errors import error
from secorder._pytree import ravel, unravel
from secorder._validate import check_bool, check_callable
from secorder.core._closure import ClosureGraph, SparseProbeOperator, check_params, check_vectors, chunk_rows
from secorder.core._model import check_model, model_closure
from secorder.estimators import hutchinson_trace
from secorder.modules import module_forward

__all__ = ["exact_hvp", "gauss_newton_product", "hessian_trace", "model_hvp"]

SPARSE_DENSITY = 0.1


def _as_returned(out: list[Tensor]) -> Tensor | list[Tensor]:
    """torch_secorder's convention: a tensor for one parameter, else a list."""
    return out[0] if len(out) == 1 else out


def _hvp(graph: ClosureGraph, vs: list[Tensor]) -> list[Tensor]:
    """H v over all tensors, zeros for those that do not require grad."""
    train = graph.trainable()
    out = [graph.zeros(i) for i in range(len(graph.params))]
    if not graph.live():
        return out
    op = graph.operator(train)
    flat = ravel([vs[i] for i in train]).unsqueeze(0)
    hv = unravel(op.matmat(flat)[0], op.shapes)
    for i, h in zip(train, hv):
        out[i] = h
    return out


def exact_hvp(
    func: Callable[[], Tensor],
    params: list[Tensor],
    v: Tensor | list[Tensor],
    create_graph: bool = False,
) -> Tensor | list[Tensor]:
    """Compute the exact Hessian-vector product H v of ``func()`` with respect to ``params``.

    H v = ∇_θ(∇_θ L · v), by double backpropagation. Cost: about two gradients.

    Args:
        func: a callable with no arguments returning the scalar loss L.
        params: the tensors θ.
        v: a tensor (for one parameter) or a list of tensors shaped like ``params``.
        create_graph: if True, the result is differentiable with respect to ``params``.

    Returns:
        H v: a tensor if ``params`` has one entry, else a list shaped like ``params``
        (zeros for tensors that do not require grad or are unused).

    Raises:
        TypeError, ValueError: ``params`` or ``v`` malformed, ``func()`` not a scalar.

    Example:
        >>> import torch
        >>> x = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
        >>> exact_hvp(lambda: (x**3).sum(), [x], torch.ones(3))   # H = diag(6 x)
        tensor([ 6., 12., 18.])
    """
    call = "exact_hvp(func, params, v)"
    check_callable(call, "func", func)
    plist = check_params(call, params)
    vs = check_vectors(call, "v", v, plist)
    check_bool(call, "create_graph", create_graph)
    graph = ClosureGraph(call, func, plist, create_graph=create_graph, strict=False)
    return _as_returned(_hvp(graph, vs))


def model_hvp(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    x: Any,
    y: Any,
    v: Tensor | list[Tensor],
    create_graph: bool = False,
) -> Tensor | list[Tensor]:
    """Compute H v for the loss ``loss_fn(model(x), y)`` with respect to ``model.parameters()``.

    Same as :func:`exact_hvp` with the closure built for you; the model is not mutated
    (parameters, buffers, BatchNorm statistics, train/eval flag).

    Args:
        model: the module.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        x: the model's input.
        y: the targets.
        v: tensors shaped like ``list(model.parameters())`` (a tensor if there is one).
        create_graph: if True, the result is differentiable with respect to the parameters.

    Returns:
        H v, a tensor for a single parameter, else a list.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False).double()
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        >>> y = torch.zeros(2, 1, dtype=torch.float64)
        >>> # H = (2/N) XᵀX = I
        >>> model_hvp(model, torch.nn.functional.mse_loss, x, y, torch.ones(1, 2))
        tensor([[1., 1.]], dtype=torch.float64)
    """
    call = "model_hvp(model, loss_fn, x, y, v)"
    func, params = model_closure(call, model, loss_fn, x, y)
    vs = check_vectors(call, "v", v, params)
    check_bool(call, "create_graph", create_graph)
    graph = ClosureGraph(
        call, func, params, create_graph=create_graph, strict=False, what="loss_fn(model(x), y)"
    )
    return _as_returned(_hvp(graph, vs))


def _check_num_samples(call: str, num_samples: object) -> int:
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise error(
            call,
            "num_samples must be an int >= 1",
            f"{num_samples!r}",
            "Pass the number of random probes, e.g. num_samples=100.",
        )
    return num_samples


def hessian_trace(
    func: Callable[[], Tensor],
    params: list[Tensor],
    num_samples: int = 10,
    create_graph: bool = False,
    sparse: bool = False,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Estimate the trace of the Hessian of ``func()`` by Hutchinson's method.

    tr(H) ≈ (1/K) Σ_k v_kᵀ H v_k for K = ``num_samples`` Rademacher probes v_k
    (independent ±1 entries, so E[v vᵀ] = I and the estimate is unbiased). The K
    products run batched on one retained double-backward graph. Cost: one gradient
    with ``create_graph=True`` and K Hessian-vector products.

    Args:
        func: a callable with no arguments returning the scalar loss.
        params: the tensors to differentiate with respect to.
        num_samples: K, the number of probes.
        create_graph: if True, the estimate is differentiable with respect to ``params``.
        sparse: if True, probes with about 10% non-zero entries, scaled by 1/√0.1 so
            that the estimate stays unbiased (its variance is higher; no speed gain).
        generator: (keyword-only, not in torch_secorder) the source of the probes;
            ``None`` uses the global generator. The same generator state gives the
            same estimate.

    Returns:
        A 0-dim tensor (torch_secorder 0.0.1 returned a Python float).

    Raises:
        ValueError: ``num_samples`` is not a positive int; see also :func:`exact_hvp`.

    Example:
        >>> import torch
        >>> x = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
        >>> f = lambda: (torch.tensor([1.0, 2.0, 3.0]) * x**2).sum()   # H = diag(2, 4, 6)
        >>> hessian_trace(f, [x], num_samples=5, generator=torch.Generator().manual_seed(0))
        tensor(12.)

        Rademacher probes are exact on a diagonal Hessian (vᵀHv = tr H for every v).

    References:
        M. F. Hutchinson, "A stochastic estimator of the trace of the influence matrix
        for Laplacian smoothing splines", Comm. Statist. Simulation Comput. 18 (1989).
    """
    call = "hessian_trace(func, params, num_samples)"
    check_callable(call, "func", func)
    plist = check_params(call, params)
    k = _check_num_samples(call, num_samples)
    check_bool(call, "create_graph", create_graph)
    check_bool(call, "sparse", sparse)
    graph = ClosureGraph(call, func, plist, create_graph=create_graph, strict=False)
    if not graph.live():
        return graph.scalar_zero()
    op = graph.operator(graph.trainable())
    gen = _probes.check_generator(call, generator, op.device)
    target = SparseProbeOperator(op, SPARSE_DENSITY, gen) if sparse else op
    chunk = chunk_rows(op)
    estimate, _ = hutchinson_trace(target, k, distribution="rademacher", generator=gen, chunk_size=chunk)
    return estimate


def gauss_newton_product(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    x: Any,
    y: Any,
    v: Tensor | list[Tensor],
    create_graph: bool = False,
) -> Tensor | list[Tensor]:
    """Compute the generalized Gauss-Newton product G v for ``loss_fn(model(x), y)``.

    G = Jᵀ (∇²_z L) J, with z = model(x), J = ∂z/∂θ and ∇²_z L the Hessian of the
    loss with respect to the outputs (for mean-reduced losses it carries the 1/N).
    G v = Jᵀ (∇²_z L (J v)): one forward-mode Jacobian-vector product, one
    Hessian-vector product of the loss in output space, one vector-Jacobian product.
    The model's operations need forward-mode derivatives (all common layers have them).

    Args:
        model: the module (not mutated).
        loss_fn: ``loss_fn(outputs, targets) -> scalar``, e.g. ``nn.MSELoss()``.
        x: the model's input.
        y: the targets.
        v: tensors shaped like ``list(model.parameters())`` (a tensor if there is one).
        create_graph: if True, the result is differentiable with respect to the parameters.

    Returns:
        G v, a tensor for a single parameter, else a list (zeros for frozen parameters).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False).double()
        >>> x = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
        >>> y = torch.zeros(2, 1, dtype=torch.float64)
        >>> gauss_newton_product(model, torch.nn.functional.mse_loss, x, y, torch.ones(1, 2))
        tensor([[3., 2.]], dtype=torch.float64)

        For a linear model and squared error, G = H = (2/N) XᵀX = [[2, 1], [1, 1]].
    """
    call = "gauss_newton_product(model, loss_fn, x, y, v)"
    module = check_model(call, model)
    check_callable(call, "loss_fn", loss_fn)
    named = list(module.named_parameters())
    params = [p for _, p in named]
    vs = check_vectors(call, "v", v, params)
    check_bool(call, "create_graph", create_graph)
    train = [i for i, p in enumerate(params) if p.requires_grad]
    out = [torch.zeros_like(p) for p in params]
    if not train:
        return _as_returned(out)
    forward, _ = module_forward(module)
    keys = [named[i][0] for i in train]

    def outputs(ps: tuple[Tensor, ...]) -> Tensor:
        return forward(dict(zip(keys, ps)), (x,))

    def loss_of(z: Tensor) -> Tensor:
        value = loss_fn(z, y)
        if not isinstance(value, Tensor) or value.dim() != 0:
            got = f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
            raise error(
                call,
                "loss_fn(model(x), y) must return a scalar (0-dim) tensor",
                got,
                "Use a reduced loss, e.g. nn.MSELoss() with the default reduction='mean'.",
            )
        return value

    # Real parameters when the result must be differentiable, detached ones otherwise.
    primals = tuple(params[i] if create_graph else params[i].detach() for i in train)
    tangents = tuple(vs[i] for i in train)
    with torch.enable_grad():
        z, Jv = jvp(outputs, (primals,), (tangents,))[:2]
        # Reverse over reverse in output space: jvp(grad(F.mse_loss)) fails in torch 2.13
        # ("ZeroTensors are immutable"), and ∇²_z L is symmetric, so vjp(grad) gives the same.
        HJv = vjp(grad(loss_of), z)[1](Jv)[0]
        Gv = vjp(outputs, primals)[1](HJv)[0]
    for i, g in zip(train, Gv):
        out[i] = g
    return _as_returned(out)
