"""The closed-form cross-entropy of Hessian-vector products (secorder._losses.closed_form_losses):
the same values and first, second and third derivatives as ``F.cross_entropy``'s ATen kernels,
against dense float64 references, through every HessianOperator strategy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812 - the PyTorch convention
from torch.func import grad, jvp, vjp, vmap

import secorder
from secorder._losses import closed_form_cross_entropy, closed_form_losses, resolve_loss
from secorder._pytree import flatten, ravel, unflatten, unravel
from secorder.modules import module_forward
from secorder.operators import HessianOperator

DT = torch.float64

# (logit shape, class dim): (N, C), (N, C, T) with classes contiguous (a transposed (N, T, C)
# tensor, as language models hand it over), (N, C, T) contiguous, and one unbatched sample (C,)
CASES = {
    "NC": ((5, 7), False),
    "NCT-transposed": ((3, 7, 4), True),
    "NCT": ((3, 7, 4), False),
    "C": ((7,), False),
}


def _problem(case: str, seed: int = 0):
    shape, transposed = CASES[case]
    g = torch.Generator().manual_seed(seed)
    c = shape[1] if len(shape) > 1 else shape[0]
    d = 5
    X = torch.randn(
        *(s for i, s in enumerate(shape) if i != (1 if len(shape) > 1 else 0)), d, generator=g, dtype=DT
    )
    W = torch.randn(c, d, generator=g, dtype=DT)
    y_shape = tuple(s for i, s in enumerate(shape) if i != (1 if len(shape) > 1 else 0))
    y = torch.randint(0, c, y_shape, generator=g)

    def logits(w: torch.Tensor) -> torch.Tensor:
        z = X @ w.T  # (..., C): classes last
        if len(shape) == 1:
            return z
        if transposed:
            return z.movedim(-1, 1)  # a view with the classes contiguous
        return z.movedim(-1, 1).contiguous()

    return W, y, logits, g


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", list(CASES))
def test_value_gradient_hessian_match_aten(case: str, reduction: str) -> None:
    W, y, logits, _ = _problem(case)
    if case == "NCT":
        y[0, 1] = -100  # an ignored position (mean divides by the valid ones)

    def f(w: torch.Tensor) -> torch.Tensor:
        out = F.cross_entropy(logits(w), y, reduction=reduction)
        return (
            out
            if reduction != "none"
            else (out * torch.linspace(0.5, 1.5, out.numel(), dtype=DT).view_as(out)).sum()
        )

    ref_val, ref_grad = f(W), grad(f)(W)
    ref_h = torch.func.hessian(f)(W)
    with closed_form_losses():
        val, gr, h = f(W), grad(f)(W), torch.func.hessian(f)(W)
    torch.testing.assert_close(val, ref_val, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(gr, ref_grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(h, ref_h, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("strategy", ["rev_rev", "fwd_rev", "autograd", "autograd_batched", "auto"])
@pytest.mark.parametrize("case", list(CASES))
def test_hessian_operator_matches_dense(case: str, strategy: str) -> None:
    """HessianOperator enters closed_form_losses: its products equal the dense float64 Hessian."""
    W, y, logits, g = _problem(case, seed=1)
    f = lambda ls: F.cross_entropy(logits(ls[0]), y)
    dense = torch.func.hessian(lambda w: f([w]))(W).reshape(W.numel(), W.numel())
    V = torch.randn(3, W.numel(), generator=g, dtype=DT)
    op = HessianOperator(f, [W], strategy)
    torch.testing.assert_close(op.matmat(V), V @ dense, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(op.quadform(V), ((V @ dense) * V).sum(1), rtol=1e-12, atol=1e-13)


def test_third_derivative_and_parameter_dependent_weight() -> None:
    """grad of vᵀHv, and a loss weight λ that is a parameter (also at λ = 0, where the backward
    needs the probabilities the gradient no longer carries)."""
    W, y, logits, g = _problem("NCT-transposed", seed=2)
    v = torch.randn(W.shape, generator=g, dtype=DT)
    third = lambda w: (jvp(grad(lambda u: F.cross_entropy(logits(u), y)), (w,), (v,))[1] * v).sum()
    ref = grad(third)(W)
    with closed_form_losses():
        torch.testing.assert_close(grad(third)(W), ref, rtol=1e-11, atol=1e-13)
    for lam in (0.0, 0.7):
        h = lambda th: th[1] * F.cross_entropy(logits(th[0]), y)
        th = (W, torch.tensor(lam, dtype=DT))
        vv = (v, torch.tensor(1.3, dtype=DT))
        ref_rr = vjp(grad(h), th)[1](vv)[0]
        with closed_form_losses():
            rr = vjp(grad(h), th)[1](vv)[0]
        for a, b in zip(rr, ref_rr):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def test_uncovered_cases_keep_the_aten_kernel() -> None:
    z, y = torch.randn(4, 3, dtype=DT), torch.tensor([0, 2, 1, 1])
    assert closed_form_cross_entropy(z, y, weight=torch.ones(3, dtype=DT)) is None
    assert closed_form_cross_entropy(z, y, label_smoothing=0.1) is None
    assert closed_form_cross_entropy(z, torch.softmax(z, 1)) is None  # probability targets
    with closed_form_losses():  # and the function still computes them
        torch.testing.assert_close(
            F.cross_entropy(z, y, label_smoothing=0.1), F.cross_entropy(z, y, label_smoothing=0.1)
        )


@pytest.mark.parametrize("case", ["NC", "NCT-transposed", "NCT"])
def test_output_space_curvature_in_groups_matches_dense(case: str) -> None:
    """The grouped closed-form diag(p) − ppᵀ products (more samples than groups) equal the dense
    output-space Hessian, with and without autograd recording them."""
    shape, transposed = CASES[case]
    g = torch.Generator().manual_seed(3)
    n = 19  # > 8 groups, uneven
    z = torch.randn(n, *shape[1:], generator=g, dtype=DT)
    if transposed:
        z = z.movedim(1, -1).contiguous().movedim(-1, 1)
    y = torch.randint(0, shape[1], (n, *shape[2:]), generator=g)
    loss = resolve_loss("t", "cross_entropy", "mean", "ggn")
    dense = torch.func.hessian(lambda zz: F.cross_entropy(zz, y))(z).reshape(z.numel(), z.numel())
    U = torch.randn(2, *z.shape, generator=g, dtype=DT)
    Uf = U.reshape(2, -1)
    torch.testing.assert_close(
        loss.hessian_matvec(z, y, U).reshape(2, -1), Uf @ dense, rtol=1e-12, atol=1e-14
    )
    torch.testing.assert_close(
        loss.hessian_quadform(z, y, U), ((Uf @ dense) * Uf).sum(1), rtol=1e-12, atol=1e-14
    )
    Ur = U.clone().requires_grad_(True)
    torch.testing.assert_close(
        loss.hessian_matvec(z, y, Ur).detach().reshape(2, -1), Uf @ dense, rtol=1e-12, atol=1e-14
    )
    batched = vmap(lambda u: loss.hessian_matvec(z, y, u.unsqueeze(0))[0])(U)
    torch.testing.assert_close(batched.reshape(2, -1), Uf @ dense, rtol=1e-12, atol=1e-14)


def test_ggn_operator_holds_no_outputs_and_matches_dense() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 5)).double()
    x, y = torch.randn(11, 4, dtype=DT), torch.randint(0, 5, (11,))
    f, params = module_forward(model)
    op, _ = secorder.fisher_operator(model, "cross_entropy")(params, x, y)
    assert op.outputs is None  # recomputed by each JVP, not held
    leaves, spec = flatten(params)  # the operator's order of the flattened parameters

    def z_of(flat: torch.Tensor) -> torch.Tensor:
        return f(unflatten(spec, unravel(flat, [leaf.shape for leaf in leaves])), x)

    theta = ravel([leaf.detach() for leaf in leaves])
    J = torch.autograd.functional.jacobian(z_of, theta).reshape(-1, theta.numel())
    z = z_of(theta)
    H = torch.func.hessian(lambda zz: F.cross_entropy(zz, y))(z).reshape(z.numel(), z.numel())
    G = J.T @ H @ J
    V = torch.randn(3, theta.numel(), dtype=DT)
    torch.testing.assert_close(op.matmat(V), V @ G, rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(op.quadform(V), ((V @ G) * V).sum(1), rtol=1e-11, atol=1e-13)
