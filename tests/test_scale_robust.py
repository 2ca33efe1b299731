"""Robustness: the finite-difference fallback strategy, 8-bit float rejection."""

from __future__ import annotations

import pytest
import torch

import secorder
from secorder.operators import STRATEGIES


class _NoDoubleBackward(torch.autograd.Function):
    """Like fused kernels without a double-backward formula: differentiating twice raises."""

    @staticmethod
    def forward(x):
        return x.exp()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, g):
        if torch.is_grad_enabled():
            raise RuntimeError("derivative for _NoDoubleBackward's backward is not implemented")
        (y,) = ctx.saved_tensors
        return g * y


torch.manual_seed(0)
M = torch.randn(4, 3, dtype=torch.float64) / 2


def f_nodd(x):
    return _NoDoubleBackward.apply(M.to(x.dtype) @ x).sum() + (x**4).sum() / 12


def analytic_hessian(x):
    """∇² [Σ exp(Mx) + Σ x⁴/12] = Mᵀ diag(exp(Mx)) M + diag(x²)."""
    m = M.to(x.dtype)
    return m.T @ torch.diag((m @ x).exp()) @ m + torch.diag(x**2)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-7), (torch.float32, 1e-3)])
def test_finite_difference_matches_analytic_hessian(dtype, rtol) -> None:
    x = torch.tensor([0.3, -0.7, 1.1], dtype=dtype)
    H = analytic_hessian(x)
    op, _ = secorder.hessian_operator(f_nodd, x, strategy="finite_difference")
    eye = torch.eye(3, dtype=dtype)
    torch.testing.assert_close(op.matmat(eye), H, rtol=rtol, atol=rtol)
    torch.testing.assert_close(
        secorder.hessian_diagonal(f_nodd, strategy="finite_difference")(x),
        torch.diagonal(H),
        rtol=rtol,
        atol=rtol,
    )
    torch.testing.assert_close(
        secorder.hessian_trace(f_nodd, strategy="finite_difference")(x), torch.trace(H), rtol=rtol, atol=rtol
    )
    v = torch.tensor([1.0, -2.0, 0.5], dtype=dtype)
    torch.testing.assert_close(
        secorder.hvp(f_nodd, strategy="finite_difference")(v, x), H @ v, rtol=rtol, atol=rtol
    )
    # a zero tangent gives zero, not 0/0
    assert bool((op.matmat(torch.zeros(1, 3, dtype=dtype)) == 0).all())


def test_default_strategy_failure_suggests_finite_difference() -> None:
    x = torch.tensor([0.3, -0.7, 1.1], dtype=torch.float64)
    with pytest.raises(
        RuntimeError, match=r"failed while forming Hessian-vector products.*'finite_difference'"
    ):
        secorder.hessian_trace(f_nodd)(x)
    with pytest.raises(RuntimeError, match=r'strategy="finite_difference" needs only first derivatives'):
        secorder.hessian_trace(f_nodd, strategy="autograd")(x)


def test_finite_difference_is_a_valid_strategy_everywhere() -> None:
    assert "finite_difference" not in STRATEGIES  # exact strategies stay listed apart
    with pytest.raises(ValueError, match=r"strategy must be one of .*'finite_difference'"):
        secorder.hessian_trace(f_nodd, strategy="central")
    X, Y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)

    def f(p, x, y):
        return ((_NoDoubleBackward.apply(x @ p) - y) ** 2).mean()

    w = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64)
    data = [(X[:3], Y[:3]), (X[3:], Y[3:])]
    exact = secorder.hessian_trace(lambda p, x, y: ((torch.exp(x @ p) - y) ** 2).mean())(w, X, Y)
    fd = secorder.dataset_hessian_trace(f, w, data, strategy="finite_difference")
    torch.testing.assert_close(fd, exact, rtol=1e-7, atol=1e-9)


def test_finite_difference_under_vmap() -> None:
    f = lambda x: (x**3).sum()
    xs = torch.tensor([[1.0, 2.0], [-1.0, 0.5]], dtype=torch.float64)
    out = torch.func.vmap(secorder.hessian_diagonal(f, strategy="finite_difference"))(xs)
    torch.testing.assert_close(out, 6 * xs, rtol=1e-7, atol=1e-9)


def test_eight_bit_floats_are_rejected() -> None:
    """float16/bfloat16 are accepted (tests/test_halfprecision.py); 8-bit floats are not."""
    if not hasattr(torch, "float8_e5m2"):
        pytest.skip("this torch has no float8 dtypes")
    model = torch.nn.Linear(3, 2)
    params = {k: v.detach().to(torch.float8_e5m2) for k, v in model.named_parameters()}
    with pytest.raises(TypeError, match=r"float64, float32, float16 or bfloat16.*params\['bias'\]"):
        secorder.fisher_trace(model, "mse")(params, torch.ones(4, 3), torch.ones(4, 2))
