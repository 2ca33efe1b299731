"""torch.compile of the returned functions (CPU, Inductor). Skipped without a C++ compiler.

Under compilation ``strategy="auto"`` resolves to ``"fwd_rev"`` (see
:func:`secorder.operators.resolve_strategy`): ``"rev_rev"`` with freshly drawn probes fails
in Inductor and the ``"autograd"`` strategies need double backward, which AOTAutograd lacks.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from torch._dynamo.utils import counters

import secorder

pytestmark = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None, reason="Inductor needs a C++ compiler"
)


def f(x):
    return (x**3).sum() + x[0] * x[1]


X = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)


def _compiled_graphs() -> tuple[int, int, int]:
    """(graphs Dynamo compiled, calls captured in them, graph breaks) since the last reset.

    A compiled function that silently ran eagerly (every frame skipped or fallen back)
    would report no graphs: the tests below assert that compilation happened.
    """
    return (
        counters["stats"]["unique_graphs"],
        counters["stats"]["calls_captured"],
        sum(counters["graph_break"].values()),
    )


def _reset() -> None:
    torch._dynamo.reset()
    counters.clear()


def test_compiled_hutchinson_trace_equals_eager() -> None:
    _reset()
    fn = secorder.hessian_trace(f, num_probes=4, with_stderr=True)
    compiled = torch.compile(fn)
    got = compiled(X, generator=torch.Generator().manual_seed(0))
    graphs, captured, _breaks = _compiled_graphs()
    # drawing probes from a torch.Generator breaks the graph; the products are compiled
    assert graphs >= 1 and captured >= 10, (graphs, captured)
    want = fn(X, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_compiled_exact_diagonal_and_compiled_f() -> None:
    _reset()
    diag = torch.compile(secorder.hessian_diagonal(f))(X)
    graphs, captured, breaks = _compiled_graphs()
    assert graphs == 1 and captured >= 10 and breaks == 0, (graphs, captured, breaks)  # one whole graph
    torch.testing.assert_close(diag, 6 * X, rtol=1e-12, atol=1e-12)
    # Transforming a compiled f is not a compiled path: Dynamo refuses torch.func transforms
    # of a compiled function called from eager code (pytorch#128711) and f runs eagerly. The
    # numbers are right; compile the transformed function (above) to get a graph.
    _reset()
    tr = secorder.hessian_trace(torch.compile(f), strategy="fwd_rev")(X)
    assert _compiled_graphs()[0] == 0 and counters["unimplemented"], "torch.func over compiled f now compiles"
    torch.testing.assert_close(tr, 6 * X.sum(), rtol=1e-12, atol=1e-12)


def test_autograd_strategy_under_compile_fails_clearly() -> None:
    _reset()
    fn = torch.compile(secorder.hessian_trace(f, num_probes=2, strategy="autograd"))
    with pytest.raises(
        RuntimeError,
        match=r'(?s)strategy="autograd" failed while forming Hessian-vector products.*finite_difference',
    ):
        fn(X, generator=torch.Generator().manual_seed(0))
