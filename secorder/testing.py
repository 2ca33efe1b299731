"""Dense references for checking curvature code (public: test your own code with them).

Everything here builds full P×P matrices with :func:`torch.autograd.functional.hessian`
/ :func:`torch.func.jacrev`; use it on small problems, in float64.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from secorder._pytree import flatten, numel, ravel, unflatten, unravel

__all__ = ["dense_hessian", "flat_function"]


def flat_function(
    f: Callable[..., Tensor], args: tuple[Any, ...], argnums: int = 0
) -> tuple[Callable[[Tensor], Tensor], Tensor]:
    """``f`` as a function of the flattened ``args[argnums]`` (secorder's leaf order), and that vector.

    The flat order is the one every secorder operator uses (dict keys sorted, see
    :mod:`secorder._pytree`).
    """
    leaves, spec = flatten(args[argnums])
    shapes = [leaf.shape for leaf in leaves]

    def flat_f(x: Tensor) -> Tensor:
        new_args = list(args)
        new_args[argnums] = unflatten(spec, unravel(x, shapes))
        return f(*new_args)

    return flat_f, ravel([leaf.detach() for leaf in leaves])


def dense_hessian(f: Callable[..., Tensor], *args: Any, argnums: int = 0) -> Tensor:
    """The P×P Hessian of scalar ``f`` w.r.t. ``args[argnums]`` in secorder's flat order.

    Example:
        >>> import torch
        >>> dense_hessian(lambda x: (x**2).sum(), torch.ones(2))
        tensor([[2., 0.],
                [0., 2.]])
    """
    flat_f, x = flat_function(f, args, argnums)
    H = torch.autograd.functional.hessian(flat_f, x)
    return H.reshape(numel(flatten(args[argnums])[0]), -1)
