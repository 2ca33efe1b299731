"""The cost model of the exact routes and the budget that caps them.

Every exact quantity has one or more routes, and their costs differ by orders of magnitude
on the same model: P one-hot Hessian-vector products against R column walks of the
structured sweep against N·R whole-batch vector-Jacobian products of the generic Fisher
route. Before any route starts its products, its work is estimated here in **products**:
one product is one vector taken through the whole batch's graph (a Hessian-vector product of
the batch loss, a batched reverse walk of one curvature column over every sample at once, a
vector-Jacobian product of the batch outputs, a one-hot product of a GGN/Fisher operator):

========================  ==========================================  ===========================
route                     products                                     decided from
========================  ==========================================  ===========================
``"hvp"`` / ``"one_hot"``  P (one-hot rows of the operator)             the parameter count
``"sweep"`` / ``"fast"``   R (columns per sample, walked for all N      the sweep's plan (one
                          samples at once)                             recording of ``f``)
``"generic"``             N·R (one backward pass per sample and        the loss's factor
                          column)
========================  ==========================================  ===========================

The products are counted, not weighted: a Hessian-vector product costs about 2-3 backward
passes (34,176 one-hot HVPs of the GPT-2 of ``tests/_zoo.py`` took 3.6 ms each, its 16,384
generic vector-Jacobian products 1.3 ms each; ``benchmarks/RESULTS.md``, bench_exact), a
sweep column a little more than one (the interface squares; row packing walks fewer), so a
count of 1:1 slightly favours one-hot HVPs, as the structured sweep's ``R ≤ P`` rule always
did. ``"auto"`` takes the cheapest available route (:func:`cheapest`); the reason and the
estimates land in ``method_info`` / ``path_info``.

One weight is measured, because it decides between two Fisher routes of similar counts: the
sweep with per-leaf vector-Jacobian products (parameters no interface covers: tied weights,
position embeddings; :mod:`secorder._engine.leafvjp`) costs about :data:`LEAF_VJP_WALK` = 2.5
whole-batch VJPs per column plus :data:`LEAF_VJP_FIXED` = 64 for the recording and the plan
(:func:`leaf_vjp_sweep`). The Hessian sweep's columns are weighted likewise where its plan
needs per-leaf VJPs: 1 + m/:data:`LEAF_MEETINGS_PER_WALK` per column for m meetings
(:func:`sweep`). Measured on one CPU thread against one-hot HVPs (``tests/_zoo.py``,
benchmark sizes, batch 4): RNN R=1,474, m=16: 1.61 s against 0.56 s for P=2,563; LSTM
R=6,498, m=16: 6.2 s against 4.7 s for P=8,899; GRU R=5,506, m=18: 3.4 s against 2.5 s for
P=6,787 (weights 2.0-2.1: HVPs chosen); GPT-2 R=16,510, m=3: 12-15 s against 112 s for
P=34,176 (weight 1.19: the sweep). Measured on one CPU thread, ``path="fast"`` against
``path="generic"``: the GPT-2 of ``tests/_zoo.py`` (R = 4,096) at N = 2, 4, 8 took
5.0 / 4.6 s, 9.4 / 14.3 s, 18.7 / 54.5 s (predicted ratios 1.25, 0.63, 0.31; measured 1.09,
0.66, 0.34); BERT, LSTM and GRU of ``tests/_zoo.py`` (R = 3, N = 4) 0.10-0.34 s against
0.02-0.06 s (the fixed part).

The budget (:func:`exact_budget`, default :data:`DEFAULT_BUDGET` = 1,000,000 products) caps
every exact route, forced ones included (``exact="hvp"``/``"sweep"``,
``path="fast"``/``"generic"``, ``method=`` of the module transforms): when even the cheapest
available route needs more, the call is refused before any product is formed
(:func:`refuse`), naming the estimate, the randomized routes of that function (Hutchinson,
curvature propagation, the MC Fisher, with their standard errors) and how to lift the cap
(:func:`set_exact_budget`). It is a module setting, like the memory budget of
:mod:`secorder._chunking`, not a keyword: one setting covers every exact entry point (the
Hessian and Fisher transforms, the module transforms, whole datasets) and is not threaded
through each signature. The default lets every benchmark-size model of ``tests/_zoo.py`` run
exactly (GPT-2 with a 256 vocabulary: 34,176 one-hot HVPs) and refuses the GPT-2 with a
50,257 vocabulary of ``benchmarks/bench_memory.py`` (1.6M one-hot HVPs, 3.2M sweep columns)
and ResNet-18's 11.7M one-hot HVPs; on the models measured a product took 1-4 ms on one CPU
thread, so the budget is of the order of an hour.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

from secorder._errors import SecorderError, error

__all__ = [
    "DEFAULT_BUDGET",
    "ExactBudgetError",
    "Route",
    "cheapest",
    "check_budget",
    "describe",
    "exact_budget",
    "leaf_vjp_sweep",
    "refuse",
    "set_exact_budget",
]

DEFAULT_BUDGET = 1_000_000
LEAF_VJP_WALK = 2.5
LEAF_VJP_FIXED = 64
LEAF_MEETINGS_PER_WALK = 16
_BUDGET: list[int | None] = [DEFAULT_BUDGET]


class ExactBudgetError(SecorderError):
    """An exact quantity whose cheapest route needs more products than :func:`exact_budget`
    allows (a :class:`~secorder.SecorderError`, raised before any product is formed)."""


def exact_budget() -> int | None:
    """The most products an exact route may start (``None``: no cap); see :mod:`secorder._cost`."""
    return _BUDGET[0]


def set_exact_budget(num_products: int | None) -> None:
    """Set the most products (Hessian-vector products, sweep column walks, vector-Jacobian
    products) an exact route may start; ``None`` removes the cap.

    Exact quantities whose cheapest route needs more are refused before any work, with the
    estimate and the randomized routes that stay affordable (:mod:`secorder._cost`). The
    default is 1,000,000.

    Example:
        >>> import secorder
        >>> secorder.set_exact_budget(5_000_000)
        >>> secorder.exact_budget()
        5000000
        >>> secorder.set_exact_budget(1_000_000)   # the default
    """
    if num_products is not None and (
        not isinstance(num_products, int) or isinstance(num_products, bool) or num_products < 1
    ):
        raise error(
            "set_exact_budget(num_products)",
            "num_products must be a positive int (products an exact route may start) or None (no cap)",
            f"{num_products!r}",
            "Pass e.g. 10_000_000, or None to remove the cap.",
        )
    _BUDGET[0] = num_products


class Route(NamedTuple):
    """An exact route and its estimated work: ``name`` (``"sweep"``, ``"hvp"``, ``"fast"``,
    ``"generic"``, ``"one_hot"``), ``products`` and ``what`` (how they are counted)."""

    name: str
    products: int
    what: str


def sweep(num_columns: int, meetings: int = 0) -> Route:
    """The Hessian sweep's R column walks, weighted by ``1 + meetings / LEAF_MEETINGS_PER_WALK``
    where ``meetings`` ops of the plan need per-leaf VJPs (each adds a per-sample VJP of that
    op to every walk): the decomposed RNN kernels meet their weight stacks once per time step
    (16-18 meetings on the models of ``tests/_zoo.py``), a transformer its embeddings 1-3 times."""
    products = math.ceil(num_columns * (1 + meetings / LEAF_MEETINGS_PER_WALK))
    what = f"R={num_columns:,} columns per sample, walked for all samples at once"
    if meetings:
        what += f", weighted 1 + {meetings}/{LEAF_MEETINGS_PER_WALK} for {meetings} per-leaf VJP meetings"
    return Route("sweep", products, what)


def leaf_vjp_sweep(num_columns: int, num_samples: int) -> Route:
    """The sweep with per-leaf VJPs in whole-batch VJP equivalents (the measured weight above)."""
    products = math.ceil(LEAF_VJP_WALK * num_columns + LEAF_VJP_FIXED)
    return Route(
        "fast with per-leaf VJPs",
        products,
        f"{LEAF_VJP_WALK}·R + {LEAF_VJP_FIXED} whole-batch VJP equivalents, R={num_columns:,}, "
        f"for all N={num_samples} samples at once",
    )


def describe(routes: Sequence[Route]) -> str:
    """The estimates as one line, e.g. ``"sweep: 4,096 products (R=4,096 columns ...); ..."``,
    and the budget."""
    budget = exact_budget()
    parts = [f"{r.name}: {r.products:,} products ({r.what})" for r in routes]
    cap = "no cap" if budget is None else f"{budget:,}"
    return "estimated " + "; ".join(parts) + f"; budget {cap} (secorder.exact_budget())"


def cheapest(routes: Sequence[Route]) -> Route:
    """The route with the fewest products (the first of equals: callers list the preferred
    route first)."""
    return min(routes, key=lambda r: r.products)


def within(products: int) -> bool:
    """Whether ``products`` fit the budget."""
    budget = exact_budget()
    return budget is None or products <= budget


def refuse(
    call: str, quantity: str, routes: Sequence[Route], randomized: Sequence[str], note: str = ""
) -> Exception:
    """The refusal of an exact quantity that no route can afford: the estimates, the randomized
    routes of the caller (``randomized``: complete calls with their keywords), how to lift the
    cap. ``note``: why other routes are not available (the sweep's refusal, ...)."""
    budget = exact_budget()
    need = cheapest(routes).products
    options = "; ".join(randomized)
    return error(
        call,
        f"an exact {quantity} may start at most secorder.exact_budget()={budget:,} products (one "
        "product: one vector through the whole batch's graph), checked before any work",
        describe(routes) + (f" ({note})" if note else ""),
        (f"For an estimate with standard errors use {options}. " if options else "")
        + f"For the exact value, lift the cap: secorder.set_exact_budget({_round_up(need):_}) (or None "
        "for no cap), or compute over fewer parameters (select=) or a smaller batch.",
        cls=ExactBudgetError,
    )


def check_budget(
    call: str, quantity: str, routes: Sequence[Route], randomized: Sequence[str], note: str = ""
) -> None:
    """Raise :func:`refuse`'s error when even the cheapest of ``routes`` exceeds the budget."""
    if routes and not within(cheapest(routes).products):
        raise refuse(call, quantity, routes, randomized, note)


def _round_up(n: int) -> int:
    """``n`` rounded up to two significant digits (a budget to suggest)."""
    if n < 100:
        return n
    unit = 10 ** (len(str(n)) - 2)
    return -(-n // unit) * unit
