"""The squared Frobenius norm ‖A‖²_F = tr(A²) = Σ_ij A_ij², exact and by Hutchinson.

For probes with E[vvᵀ] = I, E[‖Av‖²] = E[vᵀA²v] = tr(A²), so the mean of ‖Av_k‖² over K
probes is unbiased (Hutchinson's estimator applied to A², one product of A per probe).
Useful to predict the variance of Hutchinson's trace estimate, which is
2(‖A‖²_F − Σ A_ii²)/K for Rademacher probes and 2‖A‖²_F/K for Gaussian ones.

Exact: Σ_i ‖Ae_i‖² from P one-hot products, ``chunk_size`` at a time.

References:
    M. F. Hutchinson (1989), see :mod:`secorder.estimators.hutchinson`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from secorder import probes as _probes
from secorder._chunking import default_chunk_size
from secorder.estimators import _products
from secorder.estimators.hutchinson import mean_and_stderr
from secorder.operators import LinearOperator

__all__ = ["exact_frobenius_norm_sq", "frobenius_norm_sq"]


def frobenius_norm_sq(
    op: LinearOperator,
    num_probes: int,
    *,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Hutchinson's estimate of ‖A‖²_F, the mean of ‖Av‖², and its standard error.

    Args:
        op: a symmetric operator.
        num_probes: K, the number of probes (K products).
        distribution: ``"rademacher"``, ``"gaussian"`` or ``"sphere"``.
        generator: the source of the probes (``None``: the global generator).
        chunk_size: probes per operator call (``None``: from the memory budget).

    Returns:
        ``(estimate, stderr)``, both 0-dim.

    Example:
        >>> import torch
        >>> from secorder.operators import DenseOperator
        >>> A = DenseOperator(torch.diag(torch.tensor([1.0, 2.0, 3.0])))
        >>> # exact for diagonal A
        >>> frobenius_norm_sq(A, 3, generator=torch.Generator().manual_seed(0))
        (tensor(14.), tensor(0.))
    """
    step = (
        chunk_size if chunk_size is not None else default_chunk_size(num_probes, op.size, op.dtype.itemsize)
    )
    values = []
    for start, stop in _probes.chunks(num_probes, step):
        V = _products.draw(op, stop - start, distribution, generator)
        values.append((op.matmat(V) ** 2).sum(-1))
    return mean_and_stderr(torch.cat(values))


def exact_frobenius_norm_sq(op: LinearOperator, *, chunk_size: int | None = None) -> Tensor:
    """‖A‖²_F exactly, as Σ_i ‖Ae_i‖² from P one-hot products.

    Example:
        >>> import torch
        >>> from secorder.operators import DenseOperator
        >>> exact_frobenius_norm_sq(DenseOperator(torch.tensor([[2.0, 1.0], [1.0, 3.0]])))
        tensor(15.)
    """
    size = op.size
    if chunk_size is None:
        chunk_size = default_chunk_size(size, size, op.dtype.itemsize)
    total = torch.zeros((), dtype=op.dtype, device=op.device)
    for start, stop in _probes.chunks(size, chunk_size):
        rows = torch.arange(stop - start, device=op.device)
        basis = torch.zeros(stop - start, size, dtype=op.dtype, device=op.device)
        basis[rows, rows + start] = 1
        total = total + (op.matmat(basis) ** 2).sum()
    return total
