"""The one place optree is imported: flattening parameter pytrees and flat-vector views.

Key order: ``optree`` sorts dictionary keys when flattening, while
``dict(model.named_parameters())`` keeps insertion order. Every leaf list inside
secorder is in optree's sorted order, and :func:`unflatten` restores the caller's
original key order, so results always come back with the structure (and key
order) of the input. Two dicts with the same keys in different orders flatten to
the same leaf order, which is what makes tangent/parameter matching independent
of key order.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import optree
import torch
from torch import Tensor

from secorder._errors import error

__all__ = [
    "HALF_DTYPES",
    "TreeSpec",
    "accumulating",
    "accumulation_dtype",
    "check_floating_tree",
    "flatten",
    "numel",
    "ravel",
    "unflatten",
    "unravel",
]

TreeSpec = optree.PyTreeSpec

# -- the precision policy ------------------------------------------------------------------------
#: The half-precision parameter dtypes secorder accepts. Every operation of the user's function
#: (and every product the strategies form from it) runs in this dtype; everything secorder adds
#: on top (probes, the reductions of quadratic forms, estimator means and variances, Lanczos and
#: its orthogonalization, sketches, accumulated diagonals) runs in :func:`accumulation_dtype`.
HALF_DTYPES = (torch.float16, torch.bfloat16)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype secorder accumulates in for parameters of ``dtype``: float32 for float16 and
    bfloat16, else ``dtype`` itself (float32, float64).

    Example:
        >>> accumulation_dtype(torch.bfloat16), accumulation_dtype(torch.float64)
        (torch.float32, torch.float64)
    """
    return torch.float32 if dtype in HALF_DTYPES else dtype


_M = TypeVar("_M", bound=Callable[..., Tensor])


def accumulating(method: _M) -> _M:
    """The one place the precision policy meets an operator: wrap ``matmat``/``quadform``.

    The operator's ``dtype`` is the accumulation dtype and its ``compute_dtype`` the parameters'
    dtype. The wrapped method receives ``V`` rounded to the compute dtype (the product is the
    user's function's, in its own precision) and its result is returned in the accumulation
    dtype, so every estimator, reduction and Lanczos iteration above the operator runs in float32
    for half-precision parameters, unchanged for float32/float64 ones.
    """

    @functools.wraps(method)
    def wrapper(self: Any, V: Any) -> Tensor:
        compute = self.compute_dtype
        if isinstance(V, Tensor) and V.is_floating_point() and V.dtype != compute:
            V = V.to(compute)
        out = method(self, V)
        acc = accumulation_dtype(compute)
        return out.to(acc) if out.dtype != acc else out

    return wrapper  # type: ignore[return-value]


def flatten(tree: Any) -> tuple[list[Any], TreeSpec]:
    """Flatten ``tree`` into leaves (dict keys sorted) and a spec that restores it."""
    leaves, spec = optree.tree_flatten(tree, none_is_leaf=False)
    return list(leaves), spec


def unflatten(spec: TreeSpec, leaves: Sequence[Any]) -> Any:
    """Rebuild a pytree of ``spec``'s structure (original dict key order) from ``leaves``."""
    return optree.tree_unflatten(spec, list(leaves))


def check_floating_tree(call: str, name: str, tree: Any) -> tuple[list[Tensor], TreeSpec]:
    """Flatten ``tree`` and check that it is a non-empty pytree of real floating tensors.

    Args:
        call: the call form used in error messages.
        name: what the tree is, e.g. ``"args[0]"``.
        tree: the pytree.

    Returns:
        ``(leaves, spec)``.

    Raises:
        TypeError: a leaf is not a tensor, or is an integer, boolean, complex or
            8-bit floating (float8) tensor. float16 and bfloat16 are accepted (see
            :data:`HALF_DTYPES` and :func:`accumulation_dtype`).
        ValueError: the tree has no leaves.
    """
    leaves, spec = flatten(tree)
    if not leaves:
        raise error(
            call,
            f"{name} must be a tensor or a non-empty pytree of tensors",
            f"a pytree with no tensor leaves ({spec})",
            "Pass the parameters to differentiate, e.g. dict(model.named_parameters()).",
        )
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, Tensor) and leaf.is_floating_point() and torch.finfo(leaf.dtype).bits >= 16:
            continue
        path = _leaf_path(spec, i)
        if isinstance(leaf, Tensor) and leaf.is_floating_point():
            raise error(
                call,
                f"every leaf of {name} must be float64, float32, float16 or bfloat16 (8-bit "
                "floating formats have no arithmetic for the second-order products)",
                f"a tensor of dtype {leaf.dtype} at {name}{path}",
                "Compute curvature in bfloat16 or float32: cast the parameters and inputs, e.g. "
                "{k: v.bfloat16() for k, v in params.items()} or model.float().",
                cls=TypeError,
            )
        if not isinstance(leaf, Tensor):
            raise error(
                call,
                f"every leaf of {name} must be a torch.Tensor",
                f"{type(leaf).__name__} at {name}{path}",
                "Convert it with torch.as_tensor(..., dtype=torch.float64) or move it out of the "
                "differentiated argument.",
                cls=TypeError,
            )
        if not leaf.is_floating_point():
            kind = "a complex" if leaf.is_complex() else "an integer or boolean"
            raise error(
                call,
                f"every leaf of {name} must be a real floating-point tensor",
                f"{kind} tensor of dtype {leaf.dtype} at {name}{path}",
                "Cast it with .to(torch.float32) or .double(); second-order quantities of "
                "complex or integer parameters are not defined here.",
                cls=TypeError,
            )
    return leaves, spec


def _leaf_path(spec: TreeSpec, index: int) -> str:
    try:
        accessors = optree.treespec_accessors(spec)
        return "".join(f"[{e.entry!r}]" for e in accessors[index])
    except Exception:  # pragma: no cover - optree without accessors
        return f" (leaf {index})"


def numel(leaves: Sequence[Tensor]) -> int:
    """Total number of elements of ``leaves``."""
    return sum(int(leaf.numel()) for leaf in leaves)


def ravel(leaves: Sequence[Tensor], batch_dims: int = 0) -> Tensor:
    """Concatenate ``leaves`` into one tensor of shape ``(*batch, P)``.

    ``batch_dims`` leading dimensions are shared by every leaf and kept.
    """
    if batch_dims == 0:
        return torch.cat([leaf.reshape(-1) for leaf in leaves])
    batch = leaves[0].shape[:batch_dims]
    return torch.cat([leaf.reshape((*batch, -1)) for leaf in leaves], dim=-1)


def unravel(flat: Tensor, shapes: Sequence[torch.Size]) -> list[Tensor]:
    """Split the last dimension of ``flat`` into views shaped ``(*batch, *shape)``."""
    batch = flat.shape[:-1]
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    parts = torch.split(flat, sizes, dim=-1)
    return [p.reshape((*batch, *s)) for p, s in zip(parts, shapes)]
