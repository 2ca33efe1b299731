"""The decomposed-kernels mode and its suspension (secorder._kernels), and the one-reduction
finite checks of secorder._validate."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch.overrides import TorchFunctionMode

from secorder._kernels import decomposed_kernels, plain_kernels
from secorder._validate import _all_finite, check_finite_tree


def _modes() -> list[TorchFunctionMode]:
    return torch.overrides._get_current_function_mode_stack()


def test_plain_kernels_suspends_and_nested_entry_reenters() -> None:
    """Inside plain_kernels the mode is off; a nested decomposed_kernels (a new evaluation of the
    user's function) is on again, and the padding row of an embedding is again a constant."""
    weight = torch.randn(4, 3, requires_grad=True)
    idx = torch.tensor([0, 1, 1])

    def padded_grad() -> torch.Tensor:
        (g,) = torch.autograd.grad(F.embedding(idx, weight, padding_idx=1).sum(), weight)
        return g

    with decomposed_kernels():
        depth = len(_modes())
        assert depth >= 1
        with plain_kernels():
            assert len(_modes()) == depth - 1
            with decomposed_kernels():
                assert len(_modes()) == depth
                assert padded_grad()[1].abs().sum() == 0  # the padding row: a constant
        assert len(_modes()) == depth
    assert len(_modes()) == depth - 1


def test_plain_kernels_leaves_other_modes_alone() -> None:
    """Another mode innermost: nothing is popped."""

    class Other(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            return func(*args, **(kwargs or {}))

    with decomposed_kernels(), Other():
        depth = len(_modes())
        with plain_kernels():
            assert len(_modes()) == depth
    with plain_kernels():  # outside any mode: a no-op
        assert len(_modes()) == 0


@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64]
)
def test_all_finite_one_reduction(dtype: torch.dtype) -> None:
    finite = [torch.randn(3).to(dtype), torch.tensor(2.0).to(dtype), torch.randn(2, 2).to(dtype)]
    assert _all_finite(finite)
    assert not _all_finite([*finite, torch.tensor([1.0, float("nan")]).to(dtype)])
    assert not _all_finite([*finite, torch.tensor([float("-inf")]).to(dtype)])


def test_overflowing_sum_of_finite_entries_is_not_refused() -> None:
    """The L1 norm of large finite entries overflows: the full check runs and passes."""
    big = torch.full((4,), 3e38)
    assert not _all_finite([big])
    check_finite_tree("f(x)", "x", {"a": big, "b": torch.ones(2)})
    with pytest.raises(ValueError, match=r"x must be finite.*1 NaN.*at x\['b'\]"):
        check_finite_tree("f(x)", "x", {"a": big, "b": torch.tensor([0.0, float("nan")])})


MHA_CALLS = {
    "self": lambda x, y: ((x, x, x), {}),
    "cross_k_is_v": lambda x, y: ((x, y, y), {}),
    "cross_separate": lambda x, y: ((x, y, y.clone()), {}),
    "key_padding_mask": lambda x, y: (
        (x, x, x),
        {"key_padding_mask": torch.tensor([[False] * 4 + [True]] * 3)},
    ),
    "causal_mask": lambda x, y: ((x, x, x), {"attn_mask": torch.ones(5, 5).triu(1).bool()}),
    "need_weights": lambda x, y: ((x, x, x), {"need_weights": True}),
    "per_head_weights": lambda x, y: ((x, y, y), {"need_weights": True, "average_attn_weights": False}),
}


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("call", list(MHA_CALLS))
def test_multihead_attention_samples_first_is_the_same_function(call: str, bias: bool) -> None:
    """nn.MultiheadAttention(batch_first=True) under decomposed_kernels (the samples-first form
    where it applies, the original otherwise) equals the plain module, values and gradients."""
    torch.manual_seed(0)
    m = torch.nn.MultiheadAttention(8, 2, batch_first=True, bias=bias).double()
    x, y = torch.randn(3, 5, 8, dtype=torch.float64), torch.randn(3, 4, 8, dtype=torch.float64)
    args, kw = MHA_CALLS[call](x, y)
    kw.setdefault("need_weights", False)

    def run() -> tuple[torch.Tensor, ...]:
        out, weights = m(*args, **kw)
        loss = out.pow(2).sum() + (0 if weights is None else weights.pow(2).sum())
        extra = () if weights is None else (weights,)
        return (out, *extra, *torch.autograd.grad(loss, list(m.parameters())))

    ref = run()
    with decomposed_kernels():
        got = run()
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def test_decomposed_kernels_select_the_math_attention_backend_and_restore_the_flags() -> None:
    """The block enables only the math backend of ``scaled_dot_product_attention`` (as
    ``sdpa_kernel(SDPBackend.MATH)`` would) and restores every flag on exit, also after an error."""
    from torch.nn.attention import SDPBackend, _cur_sdpa_kernel_backends

    before = _cur_sdpa_kernel_backends()
    assert SDPBackend.FLASH_ATTENTION in before or SDPBackend.EFFICIENT_ATTENTION in before
    with decomposed_kernels():
        assert _cur_sdpa_kernel_backends() == [SDPBackend.MATH]
    assert _cur_sdpa_kernel_backends() == before
    with pytest.raises(KeyError), decomposed_kernels():
        raise KeyError("inside")
    assert _cur_sdpa_kernel_backends() == before
