"""Small shared pieces of the estimators: chunked products and per-block sums.

Every batched product an estimator forms goes through :func:`matmat` or
:func:`quadform`, which push ``chunk_size`` rows through the operator at a time, so the
memory of the intermediate tangents stays bounded whatever the number of rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from secorder import probes as _probes
from secorder._chunking import default_chunk_size
from secorder._errors import error
from secorder.operators import LinearOperator

__all__ = ["block_sums", "check_block_sizes", "check_budget", "draw", "matmat", "quadform"]


def _chunk(op: LinearOperator, rows: int, chunk_size: int | None) -> int:
    if chunk_size is None:
        return default_chunk_size(rows, op.size, op.dtype.itemsize)
    return chunk_size


def matmat(op: LinearOperator, V: Tensor, chunk_size: int | None) -> Tensor:
    """The rows ``A v_i`` of the ``(k, P)`` tensor ``V``, ``chunk_size`` rows per operator call."""
    step = _chunk(op, V.shape[0], chunk_size)
    if V.shape[0] <= step:
        return op.matmat(V)
    return torch.cat([op.matmat(V[a:b]) for a, b in _probes.chunks(V.shape[0], step)])


def quadform(op: LinearOperator, V: Tensor, chunk_size: int | None) -> Tensor:
    """The ``k`` values ``v_iᵀ A v_i`` for the rows of ``V``, ``chunk_size`` rows per call."""
    step = _chunk(op, V.shape[0], chunk_size)
    if V.shape[0] <= step:
        return op.quadform(V)
    return torch.cat([op.quadform(V[a:b]) for a, b in _probes.chunks(V.shape[0], step)])


def draw(op: LinearOperator, num: int, distribution: str, generator: torch.Generator | None) -> Tensor:
    """``num`` probes for ``op`` as the rows of a ``(num, P)`` tensor (see :func:`secorder.probes.draw`)."""
    return _probes.draw(num, op.size, distribution, generator, op.dtype, op.device)


def block_sums(values: Tensor, block_sizes: Sequence[int]) -> Tensor:
    """Sum the last dimension of ``values`` over consecutive blocks: ``(..., P)`` → ``(..., len(blocks))``.

    Example:
        >>> block_sums(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), [1, 3])
        tensor([[1., 9.]])
    """
    parts = torch.split(values, list(block_sizes), dim=-1)
    return torch.stack([p.sum(-1) for p in parts], dim=-1)


def check_budget(call: str, num_probes: object, minimum: int, what: str) -> int:
    """Check that ``num_probes`` is an int of at least ``minimum`` (the estimator's smallest budget)."""
    if not isinstance(num_probes, int) or isinstance(num_probes, bool) or num_probes < minimum:
        raise error(
            call,
            f"num_probes (the total budget of matrix-vector products) must be an int >= {minimum} for {what}",
            f"{num_probes!r}",
            f'Pass num_probes={minimum} or more, or use method="hutchinson" for smaller budgets.',
        )
    return num_probes


def check_block_sizes(call: str, block_sizes: Sequence[int], size: int) -> list[int]:
    """Check that ``block_sizes`` are non-negative ints summing to ``size``."""
    sizes = list(block_sizes)
    if any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in sizes) or sum(sizes) != size:
        raise error(
            call,
            f"block_sizes must be non-negative ints summing to the operator size {size}",
            f"{sizes!r}",
            "Pass the numel of each parameter leaf, e.g. [p.numel() for p in leaves].",
        )
    return sizes
