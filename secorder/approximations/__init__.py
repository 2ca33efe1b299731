"""The eager Fisher API in torch_secorder's shape, with the numbers of the definitions.

Thin wrappers: the empirical Fisher goes through :func:`secorder.fisher_trace` /
:func:`secorder.fisher_diagonal` (``kind="empirical"``); the Fisher of a classifier's
logits works on the graph the given outputs carry and shares the loss factor and the
column accumulator of :mod:`secorder.fisher`. Submodules:
:mod:`secorder.approximations.fisher_trace`, :mod:`secorder.approximations.fisher_diagonal`.
"""

from secorder.approximations.fisher_diagonal import empirical_fisher_diagonal, generalized_fisher_diagonal
from secorder.approximations.fisher_trace import empirical_fisher_trace, generalized_fisher_trace

__all__ = [
    "empirical_fisher_trace",
    "generalized_fisher_trace",
    "empirical_fisher_diagonal",
    "generalized_fisher_diagonal",
]
