"""Hutchinson's trace estimator (Hutchinson 1989; Girard 1989).

For probes v with E[v vᵀ] = I, E[vᵀ A v] = tr(A), so the mean of vᵀ A v over K
independent probes is unbiased. Its variance is ``2(‖A‖²_F − Σ A_ii²)/K`` for
Rademacher probes and ``2‖A‖²_F/K`` for Gaussian ones; the standard error reported
is the sample standard deviation of the K values over √K.

Cost: K quadratic forms (K Hessian-vector products, or less where the operator has
a cheaper quadratic form), ``chunk_size`` at a time.

References:
    M. F. Hutchinson, "A stochastic estimator of the trace of the influence matrix for
    Laplacian smoothing splines", Comm. Statist. Simulation Comput. 18 (1989).
"""

from __future__ import annotations

import torch
from torch import Tensor

from secorder import probes as _probes
from secorder._chunking import default_chunk_size
from secorder.operators import LinearOperator

__all__ = ["hutchinson_trace", "mean_and_stderr", "quadform_samples"]


def quadform_samples(
    op: LinearOperator,
    num_probes: int,
    *,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """The ``num_probes`` values vᵀAv for probes drawn in chunks; a ``(num_probes,)`` tensor."""
    if chunk_size is None:
        chunk_size = default_chunk_size(num_probes, op.size, op.dtype.itemsize)
    values = []
    for start, stop in _probes.chunks(num_probes, chunk_size):
        V = _probes.draw(stop - start, op.size, distribution, generator, op.dtype, op.device)
        values.append(op.quadform(V))
    return torch.cat(values)


def mean_and_stderr(samples: Tensor, dim: int = 0) -> tuple[Tensor, Tensor]:
    """Sample mean and its standard error along ``dim`` (NaN stderr for a single sample)."""
    k = samples.shape[dim]
    mean = samples.mean(dim)
    if k < 2:
        return mean, torch.full_like(mean, float("nan"))
    return mean, samples.std(dim, correction=1) / k**0.5


def hutchinson_trace(
    op: LinearOperator,
    num_probes: int,
    *,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Hutchinson's estimate of tr(A) and its standard error.

    Args:
        op: the operator.
        num_probes: K, the number of probes.
        distribution: ``"rademacher"``, ``"gaussian"`` or ``"sphere"``.
        generator: the source of the probes (``None``: the global generator).
        chunk_size: probes per batched product (``None``: from the memory budget).

    Returns:
        ``(estimate, stderr)``, both 0-dim.

    Example:
        >>> import torch
        >>> from secorder.operators import DenseOperator
        >>> A = DenseOperator(torch.diag(torch.tensor([1.0, 2.0, 3.0])))
        >>> est, err = hutchinson_trace(A, 4, generator=torch.Generator().manual_seed(0))
        >>> est, err   # Rademacher probes are exact on a diagonal matrix
        (tensor(6.), tensor(0.))
    """
    samples = quadform_samples(
        op, num_probes, distribution=distribution, generator=generator, chunk_size=chunk_size
    )
    return mean_and_stderr(samples)
