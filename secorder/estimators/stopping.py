"""Stopping on the standard error: draw products in rounds until the estimate is precise enough.

``adaptive_trace`` stops as soon as

    stderr ≤ atol + rtol · abs(estimate)

or when the next round would exceed ``max_probes`` products, and reports which of the
two happened. With ``method="hutchinson"`` each round adds ``batch`` probes to a running
mean and variance (nothing is recomputed). The low-rank estimators cannot be extended
probe by probe, so for them each round is a fresh, independent run with twice the
previous budget (``batch``, 2·``batch``, 4·``batch``, ...); the result is the last run's,
and ``num_products`` counts every product spent, discarded runs included.

Caveats: the stopping rule looks at an estimated standard error, so the returned
estimate is very slightly biased (optional stopping), and a stderr from few samples is
itself noisy: never use fewer than about 10 probes per round with Hutchinson. The loop is
data dependent, so it runs eagerly only: inside ``torch.func`` transforms use a fixed
``num_probes``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from secorder._errors import error
from secorder.estimators.hutchinson import quadform_samples
from secorder.operators import LinearOperator, in_functorch_transform

__all__ = ["AdaptiveResult", "adaptive_trace", "check_adaptive_options", "check_eager"]


class AdaptiveResult(NamedTuple):
    """Result of a trace estimate run to a tolerance."""

    estimate: Tensor
    """The trace estimate (0-dim)."""
    stderr: Tensor
    """Its standard error (0-dim)."""
    num_products: int
    """Products of the operator spent in total."""
    converged: bool
    """Whether stderr ≤ atol + rtol·abs(estimate) was reached (False: the budget ran out)."""


def _nonneg_float(call: str, name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or math.isinf(value):
        raise error(
            call,
            f"{name} must be a finite number >= 0",
            f"{value!r}",
            f"Pass e.g. {name}=0.01.",
        )
    return float(value)


def _pos_int(call: str, name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise error(
            call,
            f"{name} must be an int >= {minimum}",
            f"{value!r}",
            f"Pass e.g. {name}={max(minimum, 10)}.",
        )
    return value


def check_adaptive_options(
    call: str, atol: object, rtol: object, max_probes: object, batch: object, method: object
) -> None:
    """Validate the options of :func:`adaptive_trace` (shared with the transforms)."""
    from secorder._validate import check_method
    from secorder.estimators import MIN_PROBES, TRACE_ESTIMATORS

    check_method(call, method, TRACE_ESTIMATORS)
    a = _nonneg_float(call, "atol", atol)
    r = _nonneg_float(call, "rtol", rtol)
    if a == 0 and r == 0:
        raise error(
            call,
            "atol and rtol must not both be 0 (the standard error would have to vanish)",
            f"atol={atol!r}, rtol={rtol!r}",
            "Pass a relative tolerance such as rtol=0.01, or an absolute one such as atol=1.0.",
        )
    minimum = max(2, MIN_PROBES[str(method)])
    b = _pos_int(call, "batch", batch, minimum)
    m = _pos_int(call, "max_probes", max_probes, 1)
    if m < b:
        raise error(
            call,
            "max_probes must be at least batch (the products of the first round)",
            f"max_probes={m}, batch={b}",
            f"Raise max_probes to {b} or more, or lower batch.",
        )


def check_eager(call: str, tensors: list[Tensor], *, what: str, fix: str) -> None:
    """Raise a clear error when a data-dependent loop (``what``) runs inside a ``torch.func`` transform."""
    if in_functorch_transform(tensors):
        raise error(
            call,
            f"{what} is a data-dependent loop and runs only eagerly",
            "a call inside a torch.func transform (vmap, grad, jvp, ...)",
            fix,
            cls=RuntimeError,
        )


_WHAT = "stopping on the standard error"
_FIX = (
    "Inside transforms use a fixed budget: secorder.hessian_trace(f, num_probes=K, "
    "with_stderr=True) (or the estimator with num_probes=K)."
)


def adaptive_trace(
    op: LinearOperator,
    *,
    atol: float = 0.0,
    rtol: float = 1e-2,
    max_probes: int = 1000,
    batch: int = 10,
    method: str = "hutchinson",
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
) -> AdaptiveResult:
    """Estimate tr(A) in rounds until stderr ≤ atol + rtol·abs(estimate) or the budget is spent.

    Args:
        op: a symmetric operator.
        atol: absolute tolerance on the standard error.
        rtol: relative tolerance on the standard error.
        max_probes: the most products to spend.
        batch: products per round (Hutchinson) or of the first run (other methods);
            at least 2 (and the method's minimum budget).
        method: a key of :data:`secorder.estimators.TRACE_ESTIMATORS`.
        distribution: probe distribution (:mod:`secorder.probes`).
        generator: the source of all randomness (``None``: the global generator).
        chunk_size: rows per operator call (``None``: from the memory budget).

    Returns:
        :class:`AdaptiveResult` ``(estimate, stderr, num_products, converged)``.

    Raises:
        ValueError: invalid options.
        RuntimeError: called inside a ``torch.func`` transform.

    Example:
        >>> import torch
        >>> from secorder.operators import DenseOperator
        >>> A = DenseOperator(torch.diag(torch.tensor([1.0, 2.0, 3.0])))
        >>> adaptive_trace(A, rtol=0.01, generator=torch.Generator().manual_seed(0))
        AdaptiveResult(estimate=tensor(6.), stderr=tensor(0.), num_products=10, converged=True)
    """
    from secorder.estimators import TRACE_ESTIMATORS

    call = "adaptive_trace(op)"
    check_adaptive_options(call, atol, rtol, max_probes, batch, method)
    probe = torch.zeros((), dtype=op.dtype, device=op.device)
    check_eager(call, [probe], what=_WHAT, fix=_FIX)
    if method == "hutchinson":
        return _hutchinson_rounds(op, atol, rtol, max_probes, batch, distribution, generator, chunk_size)
    estimator = TRACE_ESTIMATORS[method]
    cap = {"xtrace": 2 * op.size, "xnystrace": op.size}.get(method, max_probes)
    used, budget = 0, batch
    while True:
        est, err = estimator(
            op, budget, distribution=distribution, generator=generator, chunk_size=chunk_size
        )
        used += budget
        check_eager(call, [est], what=_WHAT, fix=_FIX)
        if bool(err <= atol + rtol * est.abs()):
            return AdaptiveResult(est, err, used, True)
        nxt = min(2 * budget, max_probes - used, cap)
        if nxt < batch or budget >= cap:
            return AdaptiveResult(est, err, used, False)
        budget = nxt


def _hutchinson_rounds(
    op: LinearOperator,
    atol: float,
    rtol: float,
    max_probes: int,
    batch: int,
    distribution: str,
    generator: torch.Generator | None,
    chunk_size: int | None,
) -> AdaptiveResult:
    count = 0
    mean = torch.zeros((), dtype=op.dtype, device=op.device)
    m2 = torch.zeros((), dtype=op.dtype, device=op.device)
    while True:
        n = min(batch, max_probes - count)
        values = quadform_samples(
            op, n, distribution=distribution, generator=generator, chunk_size=chunk_size
        )
        # Chan et al.'s parallel update of the running mean and sum of squared deviations.
        c_mean = values.mean()
        c_m2 = ((values - c_mean) ** 2).sum()
        total = count + n
        delta = c_mean - mean
        mean = mean + delta * (n / total)
        m2 = m2 + c_m2 + delta**2 * (count * n / total)
        count = total
        err = (m2 / (count - 1)).sqrt() / count**0.5
        if bool(err <= atol + rtol * mean.abs()):
            return AdaptiveResult(mean, err, count, True)
        if count >= max_probes:
            return AdaptiveResult(mean, err, count, False)
