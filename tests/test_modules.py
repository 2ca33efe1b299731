"""module_loss never mutates the module and handles buffers, frozen parameters and BatchNorm."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import secorder
from secorder.testing import dense_hessian


def _state(model: nn.Module):
    return {k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()]


@pytest.mark.parametrize("train", [True, False])
def test_no_mutation_with_batchnorm(train: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double()
    model.train(train)
    before, flags = _state(model)
    f, params = secorder.module_loss(model, nn.functional.cross_entropy)
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    t = secorder.hessian_trace(f)(params, x, y)
    secorder.hessian_diagonal(f, num_probes=3)(params, x, y, generator=torch.Generator().manual_seed(0))
    secorder.hessian_trace(f, num_probes=3, strategy="autograd")(params, x, y)
    after, flags_after = _state(model)
    assert flags == flags_after
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(t, dense_hessian(f, params, x, y).trace())


def test_frozen_parameters_are_excluded_and_used() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    model[0].weight.requires_grad_(False)
    f, params = secorder.module_loss(model, nn.functional.mse_loss)
    assert list(params) == ["0.bias", "2.weight", "2.bias"]
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)
    ref = copy.deepcopy(model)
    torch.testing.assert_close(f(params, x, y), nn.functional.mse_loss(ref(x), y))


def test_tuple_inputs_are_unpacked() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 1)

        def forward(self, a, b):
            return self.lin(a) * b

    model = Two().double()
    f, params = secorder.module_loss(model, nn.functional.mse_loss)
    a, b, y = (
        torch.randn(4, 2, dtype=torch.float64),
        torch.randn(4, 1, dtype=torch.float64),
        torch.randn(4, 1, dtype=torch.float64),
    )
    torch.testing.assert_close(f(params, (a, b), y), nn.functional.mse_loss(model(a, b), y))
    H = dense_hessian(
        lambda p: nn.functional.mse_loss(torch.func.functional_call(model, p, (a, b)), y), params
    )
    torch.testing.assert_close(secorder.hessian_trace(f)(params, (a, b), y), torch.trace(H))
