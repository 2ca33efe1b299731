"""XDiag: the exchangeable diagonal estimator with a per-entry error estimate.

With k = ⌊m/2⌋ probes and P_i the projector onto span{Aω_j : j ≠ i} (as in XTrace,
:mod:`secorder.estimators.epperly2024xtrace`), each

    d_i = diag(P_i A) + ω_i ⊙ (I − P_i) A ω_i

is an unbiased estimate of diag(A): the first term is exact, the second is the
Bekas–Kokiopoulou–Saad diagonal estimator applied to (I − P_i)A with a probe
independent of P_i. XDiag returns the mean of the d_i. In the coordinates of Y = QR,
P_i = QΠ_iQᵀ with Π_i = B − x_ix_iᵀ, so with Z = AQ

    d_i = diag(Q B Zᵀ) − (Qx_i) ⊙ (Zx_i) + ω_i ⊙ (Aω_i − QΠ_i r_i),   r_i = QᵀAω_i.

Per-entry error estimate: the d_i are exchangeable, and, like XTrace's, the reported
standard error of entry j is the standard deviation of (d_i)_j over i divided by √k.
It describes the spread of the leave-one-out estimates; it is not a guaranteed bound.

Cost: 2⌊m/2⌋ products; memory: about 5kP entries.

References:
    E. N. Epperly, J. A. Tropp, R. J. Webber, "XTrace: Making the most of every sample
    in stochastic trace estimation", SIAM J. Matrix Anal. Appl. 45(1), 2024 (XDiag).
    C. Bekas, E. Kokiopoulou, Y. Saad, "An estimator for the diagonal of a matrix",
    Appl. Numer. Math. 57 (2007).
"""

from __future__ import annotations

import torch
from torch import Tensor

from secorder.estimators import _products
from secorder.estimators.epperly2024xtrace import check_sketch_size, exchangeable_sketch
from secorder.estimators.hutchinson import mean_and_stderr
from secorder.operators import LinearOperator

__all__ = ["MIN_PROBES", "xdiag"]

MIN_PROBES = 2


def xdiag(
    op: LinearOperator,
    num_probes: int,
    *,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """XDiag estimate of diag(A) from ``num_probes`` products, with per-entry standard errors.

    Args:
        op: a symmetric operator (:mod:`secorder.operators`).
        num_probes: m >= 2, the budget; ⌊m/2⌋ probes, each used in two products.
        distribution: probe distribution (Rademacher is best for diagonals: its
            residual term has no variance from the diagonal itself).
        generator: the source of all randomness (``None``: the global generator).
        chunk_size: rows per operator call (``None``: from the memory budget).

    Returns:
        ``(diagonal, stderr)``, flat tensors of length P (stderr NaN for k = 1).

    Raises:
        ValueError: ``num_probes < 2`` or ⌊m/2⌋ > P.

    Example:
        >>> import torch
        >>> from secorder.operators import DenseOperator
        >>> M = torch.tensor([[2.0, 1.0, 0.0], [1.0, 3.0, 0.0], [0.0, 0.0, 0.0]],
        ...                  dtype=torch.float64)
        >>> gen = torch.Generator().manual_seed(0)
        >>> d, err = xdiag(DenseOperator(M), 6, distribution="gaussian", generator=gen)
        >>> [round(x, 8) for x in d.tolist()]   # 3 probes > rank 2: exact
        [2.0, 3.0, 0.0]
    """
    call = "xdiag(op, num_probes)"
    _products.check_budget(call, num_probes, MIN_PROBES, "XDiag")
    k = check_sketch_size(call, num_probes // 2, op.size)
    sk = exchangeable_sketch(op, k, distribution, generator, chunk_size)
    QX, ZX = sk.X.T @ sk.Qt, sk.X.T @ sk.Z
    low_rank = ((sk.B @ sk.Qt) * sk.Z).sum(0) - QX * ZX
    PiR = sk.B @ sk.R - sk.X * (sk.X * sk.R).sum(0)  # columns Π_i r_i
    samples = low_rank + sk.Om * (sk.Y - PiR.T @ sk.Qt)
    return mean_and_stderr(samples)
