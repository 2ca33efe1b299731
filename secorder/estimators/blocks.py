"""Per-block traces: the traces of the diagonal blocks of A for a partition of the coordinates.

For a parameter pytree the blocks are its leaves, so the block traces are the traces of
the per-layer (per-tensor) curvature blocks, tr(E_b A) with E_b the selector of block b.
Every estimator here computes them from one set of products, and the block values sum
to the estimator's total.

* exact: segment sums of the exact diagonal (P products);
* Hutchinson: vᵀE_bAv = Σ_{j∈b} v_j (Av)_j is unbiased for tr(E_bA); unlike the total
  it needs full products Av (no quadratic-form shortcut);
* Hutch++, XTrace, XNysTrace: see their modules.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from secorder import probes as _probes
from secorder._chunking import default_chunk_size
from secorder.estimators import _products
from secorder.estimators._products import check_block_sizes
from secorder.estimators.diagonal import exact_diagonal
from secorder.estimators.hutchinson import mean_and_stderr
from secorder.operators import LinearOperator

__all__ = ["check_block_sizes", "exact_block_traces", "hutchinson_block_traces"]


def exact_block_traces(
    op: LinearOperator, block_sizes: Sequence[int], *, chunk_size: int | None = None, progress: bool = False
) -> Tensor:
    """The exact traces of the diagonal blocks, from the exact diagonal (P products;
    ``progress=True`` shows a tqdm bar over its chunks).

    Example:
        >>> import torch
        >>> from secorder.operators import DenseOperator
        >>> exact_block_traces(DenseOperator(torch.diag(torch.tensor([1.0, 2.0, 3.0]))), [1, 2])
        tensor([1., 5.])
    """
    sizes = check_block_sizes("exact_block_traces(op, block_sizes)", block_sizes, op.size)
    return _products.block_sums(exact_diagonal(op, chunk_size=chunk_size, progress=progress), sizes)


def hutchinson_block_traces(
    op: LinearOperator,
    num_probes: int,
    block_sizes: Sequence[int],
    *,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Hutchinson estimates of the block traces, mean over probes of (Σ_{j∈b} v_j (Av)_j)_b.

    Uses the same probes as :func:`~secorder.estimators.hutchinson_trace` with the same
    generator state, so the block values sum to its estimate (up to rounding).

    Args:
        op: a symmetric operator.
        num_probes: K, the number of probes (K products).
        block_sizes: sizes of consecutive coordinate blocks, summing to ``op.size``.
        distribution, generator, chunk_size: as in :func:`~secorder.estimators.hutchinson_trace`.

    Returns:
        ``(traces, stderr)``, tensors of length ``len(block_sizes)``.

    Example:
        >>> import torch
        >>> from secorder.operators import DenseOperator
        >>> A = DenseOperator(torch.diag(torch.tensor([1.0, 2.0, 3.0])))
        >>> hutchinson_block_traces(A, 2, [1, 2], generator=torch.Generator().manual_seed(0))[0]
        tensor([1., 5.])
    """
    sizes = check_block_sizes("hutchinson_block_traces(op, num_probes, block_sizes)", block_sizes, op.size)
    step = (
        chunk_size if chunk_size is not None else default_chunk_size(num_probes, op.size, op.dtype.itemsize)
    )
    values = []
    for start, stop in _probes.chunks(num_probes, step):
        V = _products.draw(op, stop - start, distribution, generator)
        values.append(_products.block_sums(V * op.matmat(V), sizes))
    return mean_and_stderr(torch.cat(values))
