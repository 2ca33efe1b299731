"""Estimators: functions of a batched operator (see :mod:`secorder.operators`).

Every trace estimator has the signature
``estimator(op, num_probes, *, distribution, generator, chunk_size) -> (estimate, stderr)``
and every diagonal estimator the same with ``(diagonal, stderr)`` flat tensors of
length P. The registries below map the public ``method=`` names of the transforms to
them; a new estimator becomes available everywhere (Hessian, GGN, empirical Fisher,
MC Fisher) by registering it here.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from secorder.estimators.diagonal import exact_diagonal, hutchinson_diagonal
from secorder.estimators.hutchinson import hutchinson_trace

__all__ = [
    "DIAGONAL_ESTIMATORS",
    "TRACE_ESTIMATORS",
    "exact_diagonal",
    "hutchinson_diagonal",
    "hutchinson_trace",
]

Estimator = Callable[..., tuple[Tensor, Tensor]]

TRACE_ESTIMATORS: dict[str, Estimator] = {
    "hutchinson": hutchinson_trace,
}

DIAGONAL_ESTIMATORS: dict[str, Estimator] = {
    "hutchinson": hutchinson_diagonal,
}
