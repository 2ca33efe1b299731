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

from collections.abc import Sequence
from typing import Any

import optree
import torch
from torch import Tensor

from secorder._errors import error

__all__ = [
    "TreeSpec",
    "check_floating_tree",
    "flatten",
    "numel",
    "ravel",
    "unflatten",
    "unravel",
]

TreeSpec = optree.PyTreeSpec


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
            half-precision (float16, bfloat16, float8) tensor.
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
        if isinstance(leaf, Tensor) and leaf.is_floating_point() and torch.finfo(leaf.dtype).bits >= 32:
            continue
        path = _leaf_path(spec, i)
        if isinstance(leaf, Tensor) and leaf.is_floating_point():
            raise error(
                call,
                f"every leaf of {name} must be float32 or float64 (second-order products of "
                "half-precision values keep about 3 significant digits, and no float32 "
                "accumulation is done for them)",
                f"a tensor of dtype {leaf.dtype} at {name}{path}",
                "Compute curvature in float32: cast the parameters and inputs, e.g. "
                "model.float() or {k: v.float() for k, v in params.items()}.",
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
