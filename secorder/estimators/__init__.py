"""Estimators: functions of a batched operator (see :mod:`secorder.operators`).

Every trace estimator has the signature
``estimator(op, num_probes, *, distribution, generator, chunk_size) -> (estimate, stderr)``
and every diagonal estimator the same with ``(diagonal, stderr)`` flat tensors of
length P; ``num_probes`` is always the total budget of products. Per-block trace
estimators take ``block_sizes`` after ``num_probes`` and return one value per block.
The registries below map the public ``method=`` names of the transforms to them; a new
estimator becomes available everywhere (Hessian, GGN, empirical Fisher, MC Fisher) by
registering it here.

=============  ==========================================  ===========  ==========
method         estimator                                   min. budget  operators
=============  ==========================================  ===========  ==========
"hutchinson"   Hutchinson 1989                             1            any
"hutch++"      Meyer, Musco, Musco, Woodruff 2021          3            any
"xtrace"       Epperly, Tropp, Webber 2024                 2            any
"xnystrace"    Epperly, Tropp, Webber 2024 (Nyström)       1            PSD only
"xdiag"        Epperly, Tropp, Webber 2024 (diagonal)      2            any
=============  ==========================================  ===========  ==========
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from secorder._errors import error
from secorder.estimators import epperly2024xdiag, epperly2024xtrace, meyer2021hutchpp
from secorder.estimators.blocks import check_block_sizes, exact_block_traces, hutchinson_block_traces
from secorder.estimators.diagonal import exact_diagonal, hutchinson_diagonal
from secorder.estimators.epperly2024xdiag import xdiag
from secorder.estimators.epperly2024xtrace import (
    xnystrace,
    xnystrace_block_traces,
    xtrace,
    xtrace_block_traces,
)
from secorder.estimators.frobenius import exact_frobenius_norm_sq, frobenius_norm_sq
from secorder.estimators.hutchinson import hutchinson_trace
from secorder.estimators.meyer2021hutchpp import hutchpp_block_traces, hutchpp_trace
from secorder.estimators.stopping import AdaptiveResult, adaptive_trace

__all__ = [
    # registries
    "BLOCK_TRACE_ESTIMATORS",
    "DIAGONAL_ESTIMATORS",
    "MIN_PROBES",
    "TRACE_ESTIMATORS",
    "check_min_probes",
    # trace
    "hutchinson_trace",
    "hutchpp_trace",
    "xnystrace",
    "xtrace",
    # per-block traces
    "check_block_sizes",
    "exact_block_traces",
    "hutchinson_block_traces",
    "hutchpp_block_traces",
    "xnystrace_block_traces",
    "xtrace_block_traces",
    # diagonal
    "exact_diagonal",
    "hutchinson_diagonal",
    "xdiag",
    # squared Frobenius norm
    "exact_frobenius_norm_sq",
    "frobenius_norm_sq",
    # stopping on the standard error
    "AdaptiveResult",
    "adaptive_trace",
]

Estimator = Callable[..., tuple[Tensor, Tensor]]

TRACE_ESTIMATORS: dict[str, Estimator] = {
    "hutchinson": hutchinson_trace,
    "hutch++": hutchpp_trace,
    "xtrace": xtrace,
    "xnystrace": xnystrace,
}

DIAGONAL_ESTIMATORS: dict[str, Estimator] = {
    "hutchinson": hutchinson_diagonal,
    "xdiag": xdiag,
}

BLOCK_TRACE_ESTIMATORS: dict[str, Estimator] = {
    "hutchinson": hutchinson_block_traces,
    "hutch++": hutchpp_block_traces,
    "xtrace": xtrace_block_traces,
    "xnystrace": xnystrace_block_traces,
}

MIN_PROBES: dict[str, int] = {
    "hutchinson": 1,
    "hutch++": meyer2021hutchpp.MIN_PROBES,
    "xtrace": epperly2024xtrace.MIN_PROBES_XTRACE,
    "xnystrace": epperly2024xtrace.MIN_PROBES_XNYSTRACE,
    "xdiag": epperly2024xdiag.MIN_PROBES,
}


def check_min_probes(call: str, method: str, num_probes: int | None) -> None:
    """Construction-time check that ``num_probes`` meets ``method``'s smallest budget."""
    minimum = MIN_PROBES.get(method, 1)
    if num_probes is not None and num_probes < minimum:
        raise error(
            call,
            f'method="{method}" needs num_probes (the total budget of products) >= {minimum}',
            f"num_probes={num_probes}",
            f'Pass num_probes={minimum} or more, or use method="hutchinson".',
        )
