"""Every documented bad input gives a clear error: call, contract, what was received, a fix."""

from __future__ import annotations

import pytest
import torch

import secorder

f_sq = lambda x: (x**2).sum()
X = torch.ones(3)


@pytest.mark.parametrize("bad", [0, -1, 2.5, "10", True])
def test_num_probes_must_be_positive_int(bad) -> None:
    with pytest.raises(
        ValueError,
        match=r"hessian_trace\(f\)\(\*args\): num_probes must be None \(exact\) or an int >= 1, but received",
    ):
        secorder.hessian_trace(f_sq, num_probes=bad)
    with pytest.raises(ValueError, match=r"hessian_diagonal\(f\)\(\*args\): num_probes must be"):
        secorder.hessian_diagonal(f_sq, num_probes=bad)


def test_unknown_distribution() -> None:
    with pytest.raises(
        ValueError,
        match=r"distribution must be one of 'rademacher', 'gaussian', 'sphere', but received 'uniform'",
    ):
        secorder.hessian_trace(f_sq, num_probes=3, distribution="uniform")


@pytest.mark.parametrize("bad", [0, -2, 1.5])
def test_chunk_size_must_be_positive_int(bad) -> None:
    with pytest.raises(
        ValueError, match=r"chunk_size must be None \(automatic\) or an int >= 1, but received"
    ):
        secorder.hessian_diagonal(f_sq, chunk_size=bad)


def test_unknown_strategy_and_method() -> None:
    with pytest.raises(ValueError, match=r"strategy must be one of 'auto', .*but received 'fast'"):
        secorder.hessian_trace(f_sq, strategy="fast")
    with pytest.raises(ValueError, match=r"method must be one of 'hutchinson'.*but received 'magic'"):
        secorder.hessian_trace(f_sq, num_probes=3, method="magic")


def test_argnums_out_of_range_and_wrong_type() -> None:
    with pytest.raises(
        ValueError, match=r"argnums must index one of the 1 positional arguments, but received argnums=2"
    ):
        secorder.hessian_trace(f_sq, argnums=2)(X)
    with pytest.raises(TypeError, match=r"argnums must be a single int"):
        secorder.hessian_trace(f_sq, argnums=(0, 1))


def test_non_scalar_output() -> None:
    with pytest.raises(
        ValueError,
        match=r"hessian_trace\(f\)\(\*args\): f must return a scalar \(0-dim\) tensor, but received a tensor of shape \(3,\)\. Reduce it",
    ):
        secorder.hessian_trace(lambda x: x**2)(X)


def test_non_tensor_output() -> None:
    with pytest.raises(TypeError, match=r"f must return a scalar \(0-dim\) tensor, but received a tuple"):
        secorder.hessian_diagonal(lambda x: ((x**2).sum(), 1))(X)
    with pytest.raises(TypeError, match=r"but received a float"):
        secorder.hessian_trace(lambda x: 1.0)(X)


@pytest.mark.parametrize(
    "bad, what",
    [
        (torch.ones(3, dtype=torch.long), "an integer or boolean tensor of dtype torch.int64"),
        (torch.ones(3, dtype=torch.complex64), "a complex tensor of dtype torch.complex64"),
    ],
)
def test_integer_or_complex_parameters(bad, what) -> None:
    with pytest.raises(
        TypeError,
        match=rf"every leaf of args\[0\] must be a real floating-point tensor, but received {what} at args\[0\]\['w'\]",
    ):
        secorder.hessian_trace(lambda p: (p["w"] ** 2).sum())({"w": bad})


def test_non_tensor_leaf_and_empty_tree() -> None:
    with pytest.raises(
        TypeError, match=r"every leaf of args\[0\] must be a torch.Tensor, but received float"
    ):
        secorder.hessian_trace(lambda p: p["w"] ** 2)({"w": 1.0})
    with pytest.raises(ValueError, match=r"args\[0\] must be a tensor or a non-empty pytree of tensors"):
        secorder.hessian_trace(lambda p: torch.tensor(0.0))({})


def test_mixed_dtypes() -> None:
    with pytest.raises(ValueError, match=r"all leaves of args\[0\] must share one dtype and one device"):
        secorder.hessian_trace(lambda p: (p[0] ** 2).sum() + (p[1] ** 2).sum())(
            [torch.ones(2), torch.ones(2, dtype=torch.float64)]
        )


def test_tangent_structure_mismatch() -> None:
    p = {"a": torch.ones(2), "b": torch.ones(3)}
    fn = secorder.hvp(lambda p: (p["a"] ** 2).sum() * p["b"].sum())
    with pytest.raises(
        ValueError, match=r"hvp\(f\)\(v, \*args\): v must have the structure and shapes of args\[0\]"
    ):
        fn({"a": torch.ones(2)}, p)
    with pytest.raises(ValueError, match=r"but received .* with shapes \[\(3,\), \(3,\)\]"):
        fn({"a": torch.ones(3), "b": torch.ones(3)}, p)


def test_generator_checks() -> None:
    with pytest.raises(TypeError, match=r"generator must be a torch.Generator or None, but received int"):
        secorder.hessian_trace(f_sq, num_probes=2)(X, generator=0)


def test_with_stderr_must_be_bool() -> None:
    with pytest.raises(TypeError, match=r"with_stderr must be True or False, but received 'yes'"):
        secorder.hessian_trace(f_sq, with_stderr="yes")


def test_f_must_be_callable() -> None:
    with pytest.raises(TypeError, match=r"f must be callable, but received Tensor"):
        secorder.hessian_trace(X)


def test_eager_only_strategy_inside_vmap() -> None:
    fn = secorder.hessian_trace(lambda w, x: ((w * x) ** 2).sum(), strategy="autograd")
    with pytest.raises(
        ValueError,
        match=r'strategy="autograd" uses torch.autograd.grad and runs only outside torch.func transforms',
    ):
        torch.func.vmap(fn, in_dims=(0, None))(torch.ones(2, 3), X)


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


def test_strategy_failure_names_other_strategies() -> None:
    f = lambda x: _NoDoubleBackward.apply(x).sum()
    with pytest.raises(
        RuntimeError,
        match=r'strategy="autograd" failed while forming Hessian-vector products.*Pass another strategy: one of \'rev_rev\'',
    ):
        secorder.hessian_trace(f, strategy="autograd")(X)
    with pytest.raises(RuntimeError, match=r'strategy="rev_rev" failed .*Pass another strategy'):
        secorder.hessian_trace(f, strategy="rev_rev")(X)


def test_module_loss_checks() -> None:
    with pytest.raises(
        TypeError,
        match=r"module_loss\(model, loss_fn\): model must be a torch.nn.Module, but received function",
    ):
        secorder.module_loss(f_sq, f_sq)
    with pytest.raises(TypeError, match=r"loss_fn must be callable"):
        secorder.module_loss(torch.nn.Linear(2, 1), "mse")


def test_memory_budget_checks() -> None:
    with pytest.raises(ValueError, match=r"set_memory_budget\(num_bytes\): num_bytes must be a positive int"):
        secorder.set_memory_budget(0)


def test_fisher_randomized_methods_check_their_smallest_budget() -> None:
    model_fn = lambda w, x: x @ w
    with pytest.raises(ValueError, match=r'fisher_trace\(model_fn, loss\).*method="xtrace" needs num_probes'):
        secorder.fisher_trace(model_fn, "mse", num_probes=1, method="xtrace")
    with pytest.raises(
        ValueError, match=r'fisher_diagonal\(model_fn, loss\).*method="xdiag" needs num_probes'
    ):
        secorder.fisher_diagonal(model_fn, "mse", num_probes=1, method="xdiag")
    # the MC Fisher counts sampled targets, not products: one sample is fine
    secorder.fisher_trace(model_fn, "mse", kind="mc", num_probes=1)
