"""Estimators: functions of a batched operator (see :mod:`secorder.operators`).

Each estimator takes an operator and explicit randomness (a generator, or the
probes themselves) and returns an estimate together with its standard error.
"""

from secorder.estimators.diagonal import exact_diagonal, hutchinson_diagonal
from secorder.estimators.hutchinson import hutchinson_trace

__all__ = ["hutchinson_trace", "hutchinson_diagonal", "exact_diagonal"]
