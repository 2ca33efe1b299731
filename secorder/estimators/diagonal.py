"""Diagonal estimators: exact by basis probes, and Hutchinson's (Bekas, Kokiopoulou, Saad 2007).

Exact: A_ii = e_iᵀ A e_i. The one-hot rows e_i are formed ``chunk_size`` at a time, so
memory stays at ``chunk_size × P`` entries and the full P×P matrix is never built.
Cost: P matrix-vector products.

Hutchinson: for probes with independent zero-mean unit-variance entries,
E[v ⊙ A v] = diag(A); the mean over K probes is unbiased, with per-entry standard
error std/√K. For Rademacher probes the variance of entry i is
Σ_{j≠i} A_ij² / K.

References:
    C. Bekas, E. Kokiopoulou, Y. Saad, "An estimator for the diagonal of a matrix",
    Appl. Numer. Math. 57 (2007).
"""

from __future__ import annotations

import torch
from torch import Tensor

from secorder import probes as _probes
from secorder._chunking import default_chunk_size
from secorder._progress import progress_bar
from secorder.operators import LinearOperator

__all__ = ["exact_diagonal", "hutchinson_diagonal"]


def exact_diagonal(op: LinearOperator, *, chunk_size: int | None = None, progress: bool = False) -> Tensor:
    """The exact diagonal of ``op`` from P one-hot products, ``chunk_size`` at a time.

    ``progress=True`` shows a tqdm bar over the chunks (tqdm is optional).

    Example:
        >>> import torch
        >>> from secorder.operators import DenseOperator
        >>> exact_diagonal(DenseOperator(torch.tensor([[2.0, 1.0], [1.0, 3.0]])), chunk_size=1)
        tensor([2., 3.])
    """
    size = op.size
    if chunk_size is None:
        chunk_size = default_chunk_size(size, size, op.dtype.itemsize)
    parts = []
    ranges = list(_probes.chunks(size, chunk_size))
    for start, stop in progress_bar(ranges, progress, "exact_diagonal(op)", "exact diagonal (chunks)"):
        rows = torch.arange(stop - start, device=op.device)
        basis = torch.zeros(stop - start, size, dtype=op.dtype, device=op.device)
        basis[rows, rows + start] = 1
        parts.append(op.matmat(basis)[rows, rows + start])
    return torch.cat(parts)


def hutchinson_diagonal(
    op: LinearOperator,
    num_probes: int,
    *,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Hutchinson's diagonal estimate mean(v ⊙ Av) and its per-entry standard error.

    Example:
        >>> import torch
        >>> from secorder.operators import DenseOperator
        >>> A = DenseOperator(torch.diag(torch.tensor([1.0, 2.0])))
        >>> hutchinson_diagonal(A, 3, generator=torch.Generator().manual_seed(0))[0]
        tensor([1., 2.])
    """
    if chunk_size is None:
        chunk_size = default_chunk_size(num_probes, op.size, op.dtype.itemsize)
    # Running mean and sum of squared deviations (Chan et al.'s parallel update), so
    # memory stays at one chunk of products whatever num_probes is.
    count = 0
    mean: Tensor | None = None
    m2: Tensor | None = None
    for start, stop in _probes.chunks(num_probes, chunk_size):
        V = _probes.draw(stop - start, op.size, distribution, generator, op.dtype, op.device)
        samples = V * op.matmat(V)
        n = stop - start
        c_mean = samples.mean(0)
        c_m2 = ((samples - c_mean) ** 2).sum(0)
        if mean is None or m2 is None:
            mean, m2 = c_mean, c_m2
        else:
            delta = c_mean - mean
            total = count + n
            mean = mean + delta * (n / total)
            m2 = m2 + c_m2 + delta**2 * (count * n / total)
        count += n
    assert mean is not None and m2 is not None
    if count < 2:
        return mean, torch.full_like(mean, float("nan"))
    return mean, (m2 / (count - 1)).sqrt() / count**0.5
