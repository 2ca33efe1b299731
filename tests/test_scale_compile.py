"""torch.compile of the returned functions (CPU, Inductor). Skipped without a C++ compiler.

Under compilation ``strategy="auto"`` resolves to ``"fwd_rev"`` (see
:func:`secorder.operators.resolve_strategy`): ``"rev_rev"`` with freshly drawn probes fails
in Inductor and the ``"autograd"`` strategies need double backward, which AOTAutograd lacks.
"""

from __future__ import annotations

import shutil

import pytest
import torch

import secorder

pytestmark = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None, reason="Inductor needs a C++ compiler"
)


def f(x):
    return (x**3).sum() + x[0] * x[1]


X = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)


def test_compiled_hutchinson_trace_equals_eager() -> None:
    torch._dynamo.reset()
    fn = secorder.hessian_trace(f, num_probes=4, with_stderr=True)
    compiled = torch.compile(fn)
    got = compiled(X, generator=torch.Generator().manual_seed(0))
    want = fn(X, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_compiled_exact_diagonal_and_compiled_f() -> None:
    torch._dynamo.reset()
    diag = torch.compile(secorder.hessian_diagonal(f))(X)
    torch.testing.assert_close(diag, 6 * X, rtol=1e-12, atol=1e-12)
    # the other supported path: compile f itself and transform the compiled function
    tr = secorder.hessian_trace(torch.compile(f), strategy="fwd_rev")(X)
    torch.testing.assert_close(tr, 6 * X.sum(), rtol=1e-12, atol=1e-12)


def test_autograd_strategy_under_compile_fails_clearly() -> None:
    torch._dynamo.reset()
    fn = torch.compile(secorder.hessian_trace(f, num_probes=2, strategy="autograd"))
    with pytest.raises(
        RuntimeError,
        match=r'(?s)strategy="autograd" failed while forming Hessian-vector products.*finite_difference',
    ):
        fn(X, generator=torch.Generator().manual_seed(0))
