"""The recorder of :mod:`secorder._engine.tape`: what it computes as it records (argument paths,
``depends``/``on_data``/``numels`` per value, the storage counts an in-place op consults) equals
what a separate pass over the finished tape gives."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from secorder._engine.tape import _DATA_DEPENDENT, _STOPS, TapeUnsupportedError, paths, record

F64 = torch.float64


def _fn(ls: list[Tensor], xs: list[Tensor]) -> Tensor:
    (x,) = xs
    h = torch.cat([ls[0] * x, x.detach() + 1.0, ls[1].expand(x.shape[0], 3)], dim=1)
    h = torch.nn.functional.layer_norm(h, (9,), weight=ls[2], bias=None)
    idx = torch.arange(2)
    g = torch.index_select(h, 1, idx).sum(dim=1, keepdim=True)
    return (torch.tanh(g) * ls[0].detach().sum() + h.sum(1, keepdim=True)).squeeze(1)


def _args() -> tuple[list[Tensor], list[Tensor]]:
    gen = torch.Generator().manual_seed(0)
    leaves = [torch.randn(3, generator=gen, dtype=F64), torch.randn(1, 3, generator=gen, dtype=F64)]
    leaves.append(torch.randn(9, generator=gen, dtype=F64))
    return leaves, [torch.randn(4, 3, generator=gen, dtype=F64)]


def test_recorded_paths_equal_a_walk_of_the_arguments() -> None:
    leaves, xs = _args()
    tape = record(_fn, leaves, xs)
    assert any(isinstance(node.args[0], list) for node in tape.nodes)  # a nested argument (cat)
    assert any(node.kwargs or len(node.args) > 3 for node in tape.nodes)
    for node in tape.nodes:
        assert node.arg_paths() == paths((node.args, node.kwargs))


def test_depends_on_data_and_numels_equal_a_pass_over_the_tape() -> None:
    leaves, xs = _args()
    tape = record(_fn, leaves, xs)
    assert tape.values is not None
    depends = [i < tape.num_leaves for i in range(tape.num_values)]
    on_data = [tape.num_leaves <= i < tape.num_leaves + tape.num_inputs for i in range(tape.num_values)]
    for node in tape.nodes:
        refs = [r.index for _, r in paths((node.args, node.kwargs))]
        for o in node.outputs:
            if o is not None:
                depends[o] = node.func not in _STOPS and any(depends[i] for i in refs)
                on_data[o] = any(on_data[i] for i in refs)
    assert tape.depends == depends and False in depends and any(d and not o for d, o in zip(depends, on_data))
    numels = [v.numel() if v.is_floating_point() else 0 for v in tape.values]
    assert tape.numels == numels and 0 in numels  # the arange index is not floating
    assert tape.widest == max(n for n, d in zip(numels, on_data) if d)
    assert not any(node.func in _DATA_DEPENDENT for node in tape.nodes)


def test_inplace_op_on_a_leaf_sharing_storage_with_another_is_refused() -> None:
    """Leaves that are views of one flat buffer: an in-place op on one would change the other."""
    flat = torch.arange(6, dtype=F64)
    leaves = [flat[:3], flat[3:]]

    def fn(ls: list[Tensor]) -> Tensor:
        h = ls[0].mul_(2.0)
        return (h * ls[1]).sum()

    with pytest.raises(TapeUnsupportedError, match="in-place"):
        record(fn, leaves)


def test_inplace_op_on_an_unaliased_value_is_recorded_as_its_twin() -> None:
    def fn(ls: list[Tensor]) -> Tensor:
        h = ls[0] * 2.0
        h.tanh_()
        return (h * ls[1]).sum()

    leaves = [torch.linspace(-1, 1, 3, dtype=F64), torch.linspace(0, 2, 3, dtype=F64)]
    tape = record(fn, leaves)
    assert torch.ops.aten.tanh.default in [node.func for node in tape.nodes]
    assert tape.values is None  # the tensor of the earlier value holds the new one
    assert tape.output is not None
    new = [leaf + 0.5 for leaf in leaves]
    got = tape.replay(new)[tape.output.index]
    torch.testing.assert_close(got, fn([new[0].clone(), new[1]]), rtol=0, atol=0)
