"""Hessian transforms: :func:`hvp`, :func:`hessian_trace`, :func:`hessian_diagonal`.

Each takes a function and returns a new function of the same arguments, like
:func:`torch.func.grad`. Let ``f(*args)`` return a scalar tensor and let θ = ``args[argnums]``
(any pytree of real floating tensors: a tensor, a dict such as
``dict(model.named_parameters())``, a list, nested). H = ∇²_θ f.

The transformed functions compose with :func:`torch.func.vmap` (over parameters
stacked by :func:`torch.func.stack_module_state`, ``randomness="different"`` for the
randomized estimators) and :func:`torch.func.grad` (curvature regularizers), and keep
the device and dtype of their inputs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from secorder import probes as _probes
from secorder._chunking import check_chunk_size
from secorder._errors import error
from secorder._pytree import TreeSpec, check_floating_tree, flatten, ravel, unflatten, unravel
from secorder._validate import (
    check_argnums,
    check_bool,
    check_callable,
    check_method,
    check_num_probes,
    check_same_dtype_device,
    check_scalar_output,
)
from secorder.estimators import DIAGONAL_ESTIMATORS, TRACE_ESTIMATORS, exact_diagonal
from secorder.operators import HessianOperator, check_strategy, resolve_strategy

__all__ = ["hessian_diagonal", "hessian_operator", "hessian_trace", "hvp"]


def _bind(
    call: str, f: Callable[..., Any], args: tuple[Any, ...], argnums: int
) -> tuple[Callable[[list[Tensor]], Tensor], list[Tensor], TreeSpec, int]:
    """Check the call's arguments and return ``g(leaves) = f(*args with args[argnums] from leaves)``."""
    index = check_argnums(call, argnums, len(args))
    leaves, spec = check_floating_tree(call, f"args[{index}]", args[index])
    check_same_dtype_device(call, f"args[{index}]", leaves)

    def g(new_leaves: list[Tensor]) -> Tensor:
        new_args = list(args)
        new_args[index] = unflatten(spec, new_leaves)
        return check_scalar_output(call, f(*new_args))

    return g, leaves, spec, index


def hessian_operator(
    f: Callable[..., Any], *args: Any, argnums: int = 0, strategy: str = "auto"
) -> tuple[HessianOperator, TreeSpec]:
    """The Hessian of ``f`` at ``args`` as a batched operator over the flattened θ.

    Lower-level than the transforms: use it to feed your own estimator (any function
    of :class:`~secorder.operators.LinearOperator`).

    Returns:
        ``(operator, spec)``; ``secorder._pytree.unflatten(spec, ...)`` of per-leaf
        pieces rebuilds θ's structure.
    """
    call = "hessian_operator(f, *args)"
    g, leaves, spec, _ = _bind(call, f, args, argnums)
    concrete = resolve_strategy(call, strategy, leaves)
    return HessianOperator(g, leaves, concrete, call), spec


def _check_common(call: str, f: object, argnums: object, chunk_size: object, strategy: object) -> None:
    """Construction-time checks shared by the transforms."""
    check_callable(call, "f", f)
    check_argnums(call, argnums)
    check_chunk_size(call, chunk_size)
    check_strategy(call, strategy)


def hvp(f: Callable[..., Any], /, *, argnums: int = 0, strategy: str = "auto") -> Callable[..., Any]:
    """Transform ``f`` into a function computing Hessian-vector products H·v.

    ``hvp(f)(v, *args)`` returns H v, where H = ∇²_θ ``f(*args)`` with θ = ``args[argnums]``
    and ``v`` a pytree with θ's structure (dict key order may differ). The tangent
    comes first so that ``torch.func.vmap(hvp(f), in_dims=(0, None, ...))`` maps over a
    batch of tangents. Cost: about two gradient evaluations.

    Args:
        f: a function returning a scalar tensor.
        argnums: which positional argument of ``f`` is θ.
        strategy: how to form the product (see :mod:`secorder.operators`); ``"auto"``
            uses forward-over-reverse under ``torch.func`` transforms and when the
            result must be differentiable, and one retained double-backward otherwise.

    Returns:
        ``hvp_fn(v, *args)`` returning a pytree shaped like θ.

    Raises:
        ValueError: the tangent's structure or shapes differ from θ's.

    Example:
        >>> import torch
        >>> f = lambda x: (x**3).sum()
        >>> hvp(f)(torch.ones(3), torch.tensor([1.0, 2.0, 3.0]))   # H = diag(6 x)
        tensor([ 6., 12., 18.])
    """
    call = "hvp(f)(v, *args)"
    _check_common(call, f, argnums, None, strategy)

    @functools.wraps(f)
    def hvp_fn(v: Any, *args: Any) -> Any:
        g, leaves, spec, index = _bind(call, f, args, argnums)
        v_leaves, v_spec = flatten(v)
        if v_spec != spec or any(
            not isinstance(a, Tensor) or a.shape != b.shape for a, b in zip(v_leaves, leaves)
        ):
            received = [tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__ for a in v_leaves]
            raise error(
                call,
                f"v must have the structure and shapes of args[{index}] ({spec}, shapes "
                f"{[tuple(leaf.shape) for leaf in leaves]})",
                f"{v_spec} with shapes {received}",
                "Build v with the same keys and shapes, e.g. "
                "{k: torch.randn_like(p) for k, p in params.items()}.",
            )
        op = HessianOperator(g, leaves, resolve_strategy(call, strategy, leaves), call)
        flat_v = ravel([a.to(leaves[0].dtype) for a in v_leaves]).unsqueeze(0)
        out = op.matmat(flat_v)[0]
        return unflatten(spec, unravel(out, [leaf.shape for leaf in leaves]))

    return hvp_fn


def hessian_trace(
    f: Callable[..., Any],
    /,
    *,
    argnums: int = 0,
    num_probes: int | None = None,
    distribution: str = "rademacher",
    chunk_size: int | None = None,
    with_stderr: bool = False,
    strategy: str = "auto",
    method: str = "hutchinson",
) -> Callable[..., Any]:
    """Transform ``f`` into a function returning tr(∇²_θ f), exact or by Hutchinson's estimator.

    * ``num_probes=None``: exact, Σ_i e_iᵀ H e_i from P one-hot Hessian-vector
      products (the sum of :func:`hessian_diagonal`). Cost: P HVPs.
    * ``num_probes=K``: Hutchinson, (1/K) Σ_k v_kᵀ H v_k with probes drawn from
      ``generator``; unbiased since E[v vᵀ] = I. Cost: K HVPs (or K second-order
      forward passes with ``strategy="fwd_fwd"``), ``chunk_size`` at a time.

    Args:
        f: a function of ``*args`` returning a scalar tensor.
        argnums: which positional argument of ``f`` is θ (any pytree of floating tensors).
        num_probes: ``None`` for the exact trace, or the number K of random probes.
        distribution: ``"rademacher"`` (default, lowest variance) or ``"gaussian"``.
        chunk_size: probes (or one-hot rows) per batched product; ``None`` sizes chunks
            from the memory budget (:func:`secorder.set_memory_budget`). The result does
            not depend on it beyond rounding.
        with_stderr: also return the standard error of the estimate (0 for exact).
        strategy: how Hessian-vector products are formed (:mod:`secorder.operators`).
        method: the randomized estimator used when ``num_probes`` is given (a key of
            :data:`secorder.estimators.TRACE_ESTIMATORS`); ``num_probes`` is its total
            budget of products.

    Returns:
        ``trace_fn(*args, generator=None)`` returning a 0-dim tensor, or
        ``(estimate, stderr)`` with ``with_stderr=True``. Same generator state gives the
        same result. Composes with ``torch.func.vmap`` and ``torch.func.grad``.

    Raises:
        ValueError, TypeError: invalid options (at construction) or arguments (at call).

    Example:
        >>> import torch
        >>> f = lambda x: (x**2).sum() + x[0] * x[1]
        >>> hessian_trace(f)(torch.ones(3))                 # H = [[2,1,0],[1,2,0],[0,0,2]]
        tensor(6.)
        >>> g = lambda x: (x**2 * torch.tensor([1.0, 2.0, 3.0])).sum()
        >>> hessian_trace(g, num_probes=5)(torch.ones(3), generator=torch.Generator().manual_seed(0))
        tensor(12.)

    See Also:
        :func:`hessian_diagonal`, :func:`secorder.fisher_trace`.

    References:
        M. F. Hutchinson (1989), see :mod:`secorder.estimators.hutchinson`.
    """
    call = "hessian_trace(f)(*args)"
    _check_common(call, f, argnums, chunk_size, strategy)
    check_num_probes(call, num_probes)
    estimator = check_method(call, method, TRACE_ESTIMATORS)
    _probes.check_distribution(call, distribution)
    check_bool(call, "with_stderr", with_stderr)

    @functools.wraps(f)
    def trace_fn(*args: Any, generator: torch.Generator | None = None) -> Any:
        g, leaves, _, _ = _bind(call, f, args, argnums)
        gen = _probes.check_generator(call, generator, leaves[0].device)
        op = HessianOperator(g, leaves, resolve_strategy(call, strategy, leaves), call)
        if num_probes is None:
            est = exact_diagonal(op, chunk_size=chunk_size).sum()
            err = torch.zeros_like(est)
        else:
            est, err = estimator(
                op, num_probes, distribution=distribution, generator=gen, chunk_size=chunk_size
            )
        return (est, err) if with_stderr else est

    return trace_fn


def hessian_diagonal(
    f: Callable[..., Any],
    /,
    *,
    argnums: int = 0,
    num_probes: int | None = None,
    distribution: str = "rademacher",
    chunk_size: int | None = None,
    with_stderr: bool = False,
    strategy: str = "auto",
    method: str = "hutchinson",
) -> Callable[..., Any]:
    """Transform ``f`` into a function returning diag(∇²_θ f) as a pytree shaped like θ.

    * ``num_probes=None``: exact, H_ii = e_iᵀ H e_i from batched one-hot Hessian-vector
      products (``vmap`` over chunks of standard-basis tangents), never the P×P
      Hessian. Cost: P HVPs; memory: ``chunk_size`` tangents (default from the memory
      budget, :mod:`secorder._chunking`).
    * ``num_probes=K``: Hutchinson's diagonal estimate (1/K) Σ_k v_k ⊙ H v_k.

    Args:
        f: a function of ``*args`` returning a scalar tensor.
        argnums: which positional argument of ``f`` is θ.
        num_probes: ``None`` for the exact diagonal, or the number of random probes.
        distribution: ``"rademacher"`` or ``"gaussian"`` (randomized method only).
        chunk_size: one-hot rows or probes per batched product (``None``: automatic).
        with_stderr: also return a pytree of per-entry standard errors (zeros if exact).
        strategy: how Hessian-vector products are formed (:mod:`secorder.operators`).
        method: the randomized estimator used when ``num_probes`` is given (a key of
            :data:`secorder.estimators.DIAGONAL_ESTIMATORS`).

    Returns:
        ``diag_fn(*args, generator=None)`` returning a pytree with θ's structure and key
        order (or ``(diagonal, stderr)``).

    Example:
        >>> import torch
        >>> f = lambda p: (p["w"] ** 3).sum() + (p["b"] ** 2).sum()
        >>> hessian_diagonal(f)({"w": torch.tensor([1.0, 2.0]), "b": torch.zeros(1)})
        {'w': tensor([ 6., 12.]), 'b': tensor([2.])}
    """
    call = "hessian_diagonal(f)(*args)"
    _check_common(call, f, argnums, chunk_size, strategy)
    check_num_probes(call, num_probes)
    estimator = check_method(call, method, DIAGONAL_ESTIMATORS)
    _probes.check_distribution(call, distribution)
    check_bool(call, "with_stderr", with_stderr)

    @functools.wraps(f)
    def diag_fn(*args: Any, generator: torch.Generator | None = None) -> Any:
        g, leaves, spec, _ = _bind(call, f, args, argnums)
        gen = _probes.check_generator(call, generator, leaves[0].device)
        op = HessianOperator(g, leaves, resolve_strategy(call, strategy, leaves), call)
        if num_probes is None:
            diag = exact_diagonal(op, chunk_size=chunk_size)
            err = torch.zeros_like(diag)
        else:
            diag, err = estimator(
                op, num_probes, distribution=distribution, generator=gen, chunk_size=chunk_size
            )
        shapes = [leaf.shape for leaf in leaves]
        tree = unflatten(spec, unravel(diag, shapes))
        if with_stderr:
            return tree, unflatten(spec, unravel(err, shapes))
        return tree

    return diag_fn
