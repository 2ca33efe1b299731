"""Every documented bad input gives a clear error: call, contract, what was received, a fix."""

from __future__ import annotations

from typing import Any

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


# -- error branches that no other test reached (found with coverage) --------------------------


class _FunctionalBatchNorm(torch.nn.Module):
    """Batch statistics through torch.nn.functional, not an nn.BatchNorm module."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.batch_norm(x, None, None, training=True)


def test_sweep_refuses_functional_batch_statistics() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), _FunctionalBatchNorm(), torch.nn.Tanh(), torch.nn.Linear(4, 2)
    ).double()
    params = {k: p.detach() for k, p in model.named_parameters()}
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"batch_norm.*batch statistics .*method='hvp'"):
        secorder.module_hessian_diagonal(model, "mse", method="sweep")(params, x, y)


def test_f_returning_an_integer_scalar() -> None:
    with pytest.raises(
        TypeError, match=r"f must return a real floating-point scalar, but received dtype torch.int64"
    ):
        secorder.hessian_trace(lambda x: (x**2).sum().long())(X)


def test_eager_fisher_loss_must_be_reduced() -> None:
    from secorder.approximations.fisher_trace import empirical_fisher_trace

    model = torch.nn.Linear(3, 2).double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    loss = lambda z, t: torch.nn.functional.mse_loss(z, t, reduction="none")
    with pytest.raises(
        ValueError, match=r"must return a scalar \(0-dim\) tensor, but received shape \(4, 2\)"
    ):
        empirical_fisher_trace(model, loss, x, y)


def test_dataset_batches_need_batched_inputs() -> None:
    w = torch.ones(2)
    f = lambda p, x, y: ((x * p).sum() - y) ** 2
    with pytest.raises(
        ValueError, match=r"samples along dimension 0, but received inputs without such a tensor at batch 0"
    ):
        secorder.dataset_hessian_trace(f, w, [(torch.tensor(1.0), torch.tensor(0.0))])


def test_dataset_must_yield_the_same_batches_on_every_pass() -> None:
    w = torch.ones(2, dtype=torch.float64)
    f = lambda p, x, y: ((x @ p - y) ** 2).mean()
    batches = [
        (torch.randn(3, 2, dtype=torch.float64), torch.randn(3, dtype=torch.float64)) for _ in range(3)
    ]

    class Shifting:
        """Pass 1 yields the first `first` batches, later passes `later` of them."""

        def __init__(self, first: int, later: int) -> None:
            self.sizes, self.passes = (first, later), 0

        def __iter__(self):
            n = self.sizes[min(self.passes, 1)]
            self.passes += 1
            return iter(batches[:n])

    run = lambda data: secorder.dataset_hessian_trace(
        f, w, data, num_probes=4, chunk_size=1, generator=torch.Generator().manual_seed(0)
    )
    with pytest.raises(ValueError, match=r"same batches on every pass.*more batches than the 2 of pass 1"):
        run(Shifting(2, 3))
    with pytest.raises(ValueError, match=r"same batches on every pass.*3 batches on pass 1 and 2 on pass 2"):
        run(Shifting(3, 2))
    torch.testing.assert_close(run(Shifting(3, 3)), run(batches))  # the same batches: fine


def test_module_hessian_params_must_be_a_dict() -> None:
    model = torch.nn.Linear(3, 2).double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"params must be a dict of parameters.*but received list"):
        secorder.module_hessian_diagonal(model, "mse")([p.detach() for p in model.parameters()], x, y)


def test_dense_operator_needs_a_square_matrix() -> None:
    from secorder.operators import DenseOperator

    with pytest.raises(
        ValueError,
        match=r"DenseOperator\(matrix\): matrix must be a square 2-d tensor, but received shape \(2, 3\)",
    ):
        DenseOperator(torch.ones(2, 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device type")
def test_generator_on_another_device_type() -> None:
    with pytest.raises(
        ValueError, match=r"the generator must live on the same device type as the parameters"
    ):
        secorder.hessian_trace(f_sq, num_probes=2)(X, generator=torch.Generator(device="cuda"))


def test_strategy_failure_is_reported_once() -> None:
    """A StrategyFailedError raised while forming products (the constant-gradient check of the
    autograd strategy) passes through HessianOperator.matmat unwrapped: its message once."""
    from torch.autograd.function import once_differentiable

    class Cube(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
            ctx.save_for_backward(x)
            return x**3

        @staticmethod
        @once_differentiable
        def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
            (x,) = ctx.saved_tensors
            return 3 * x**2 * g

    def f(x: torch.Tensor) -> torch.Tensor:
        return Cube.apply(x).sum()

    with pytest.raises(secorder.operators.StrategyFailedError) as info:
        secorder.hessian_diagonal(f, exact="hvp", strategy="autograd")(torch.ones(3, dtype=torch.float64))
    msg = str(info.value)
    assert msg.count("failed while forming Hessian-vector products") == 1, msg
    assert "once_differentiable" in msg and msg.startswith("hessian_diagonal(f)(*args)")
