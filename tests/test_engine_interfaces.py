"""Parameter interfaces (secorder._engine.interfaces) against per-sample gradients by vmap(grad) in float64."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812 - the PyTorch convention
from hypothesis import given
from hypothesis import strategies as st

from secorder._chunking import memory_budget, set_memory_budget
from secorder._engine import interfaces
from secorder._engine.interfaces import param_squares
from secorder._engine.rules import rule
from secorder._engine.tape import TapeNode, record, replace_at, resolve

aten = torch.ops.aten
DT = torch.float64


@dataclass
class Case:
    """One op call: ``fn(leaves)`` records it; the node is the first with ``func``."""

    fn: Callable[[list[torch.Tensor]], torch.Tensor]
    leaves: list[torch.Tensor]
    func: Any
    position: tuple[Any, ...]
    axes: dict[tuple[Any, ...], tuple[int, int]]
    out_axis: tuple[int, int]
    n: int


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=_g(seed), dtype=DT)


def _node(case: Case) -> tuple[TapeNode, list[Any]]:
    tape = record(case.fn, case.leaves)
    nodes = [nd for nd in tape.nodes if nd.func == case.func]
    assert nodes, f"{case.func} not on the tape: {[str(nd.func) for nd in tape.nodes]}"
    return nodes[0], tape.replay(case.leaves)


def _masks(out_shape: tuple[int, ...], axis: tuple[int, int], n: int) -> torch.Tensor:
    """(N, *out_shape): 1 on sample n's slice of the output."""
    dim, group = axis
    idx = torch.arange(out_shape[dim]) // group
    m = (idx.unsqueeze(0) == torch.arange(n).unsqueeze(1)).to(DT)  # (N, size)
    shape = [n] + [1] * len(out_shape)
    shape[dim + 1] = out_shape[dim]
    return m.reshape(shape).expand(n, *out_shape)


def _reference(
    node: TapeNode, values: list[Any], case: Case, cols: torch.Tensor, w: torch.Tensor | None
) -> torch.Tensor:
    """Per-sample rows Σ_c w_c (∂⟨cols[c]|_n, op⟩/∂arg)^⊙2 by vmap(grad) over (column, sample)."""
    args = resolve((node.args, node.kwargs), values)
    path = case.position
    theta = args[path[0]][path[1]]

    def out(t: torch.Tensor) -> torch.Tensor:
        a, k = replace_at(args, path, t)
        res = node.func(*a, **k)
        return res[0] if node.multi else res

    def h(t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return (out(t) * c).sum()

    masked = cols.unsqueeze(1) * _masks(tuple(cols.shape[1:]), case.out_axis, case.n)  # (R, N, *out)
    grads = torch.func.vmap(torch.func.vmap(torch.func.grad(h), in_dims=(None, 0)), in_dims=(None, 0))(
        theta, masked
    )  # (R, N, *theta)
    sq = grads**2
    if w is not None:  # (R,) or (R, N)
        sq = sq * w.reshape(*w.shape, *([1] * (sq.dim() - w.dim())))
    return sq.sum(0)


def _check(case: Case, num_cols: int = 3) -> None:
    node, values = _node(case)
    out0 = values[node.outputs[0]]
    for seed, weighted in ((1, None), (2, "columns"), (3, "signed (column, sample)")):
        cols = _randn(num_cols, *out0.shape, seed=seed)
        w = None
        if weighted == "columns":
            w = torch.rand(num_cols, generator=_g(seed + 10), dtype=DT)
        elif weighted is not None:  # e.g. the signs of curvature columns, per sample
            w = torch.randn(num_cols, case.n, generator=_g(seed + 10), dtype=DT)
        ref = _reference(node, values, case, cols, w)
        total = param_squares(node, values, case.position, case.axes, case.out_axis, cols, w, case.n)
        rows = param_squares(
            node, values, case.position, case.axes, case.out_axis, cols, w, case.n, per_sample=True
        )
        assert total is not None and rows is not None
        torch.testing.assert_close(rows, ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(total, ref.sum(0), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(rows.sum(0), total, rtol=1e-10, atol=1e-12)


N = 4


def _mm_cases() -> dict[str, Case]:
    k, m = 5, 3
    cases = {}
    for g in (1, 3):
        cases[f"mm-x@W-g{g}"] = Case(
            lambda lv: torch.mm(lv[1], lv[0]),
            [_randn(k, m), _randn(N * g, k, seed=1)],
            aten.mm.default,
            (0, 1),
            {(0, 0): (0, g)},
            (0, g),
            N,
        )
        cases[f"mm-W@x-g{g}"] = Case(
            lambda lv: torch.mm(lv[0], lv[1]),
            [_randn(m, k), _randn(k, N * g, seed=1)],
            aten.mm.default,
            (0, 0),
            {(0, 1): (1, g)},
            (1, g),
            N,
        )
        cases[f"linear-weight-g{g}"] = Case(
            lambda lv: F.linear(lv[2], lv[0], lv[1]),
            [_randn(m, k), _randn(m, seed=2), _randn(N, g, k, seed=1)],
            aten.addmm.default,
            (0, 2),  # mat2 = weight.t()
            {(0, 1): (0, g)},  # (N, g, k) viewed as (N·g, k)
            (0, g),
            N,
        )
        cases[f"linear-bias-g{g}"] = Case(
            lambda lv: F.linear(lv[2], lv[0], lv[1]),
            [_randn(m, k), _randn(m, seed=2), _randn(N, g, k, seed=1)],
            aten.addmm.default,
            (0, 0),
            {(0, 1): (0, g)},
            (0, g),
            N,
        )
    cases["addmm-alpha-beta-weight"] = Case(
        lambda lv: torch.addmm(lv[1], lv[2], lv[0], beta=0.5, alpha=-2.0),
        [_randn(k, m), _randn(m, seed=2), _randn(N * 2, k, seed=1)],
        aten.addmm.default,
        (0, 2),
        {(0, 1): (0, 2)},
        (0, 2),
        N,
    )
    cases["addmm-alpha-beta-bias"] = Case(
        lambda lv: torch.addmm(lv[1], lv[2], lv[0], beta=0.5, alpha=-2.0),
        [_randn(k, m), _randn(m, seed=2), _randn(N * 2, k, seed=1)],
        aten.addmm.default,
        (0, 0),
        {(0, 1): (0, 2)},
        (0, 2),
        N,
    )
    cases["addmm-W@x"] = Case(
        lambda lv: torch.addmm(lv[1], lv[0], lv[2]),
        [_randn(m, k), _randn(m, 1, seed=2), _randn(k, N * 2, seed=1)],
        aten.addmm.default,
        (0, 1),
        {(0, 2): (1, 2)},
        (1, 2),
        N,
    )
    for target, pos in (("batch2", (0, 2)), ("bias", (0, 0))):
        cases[f"baddbmm-{target}"] = Case(
            lambda lv: torch.baddbmm(lv[1], lv[2], lv[0], beta=0.5, alpha=3.0),
            [_randn(2, k, m), _randn(1, 1, m, seed=2), _randn(2, N * 2, k, seed=1)],
            aten.baddbmm.default,
            pos,
            {(0, 1): (1, 2)},
            (1, 2),
            N,
        )
    for rows in (1, 3):
        for g in (1, 2):
            cases[f"bmm-batch-rows{rows}-g{g}"] = Case(
                lambda lv: torch.bmm(lv[1], lv[0].expand(lv[1].shape[0], k, m)),
                [_randn(1, k, m), _randn(N * g, rows, k, seed=1)],
                aten.bmm.default,
                (0, 1),
                {(0, 0): (0, g)},
                (0, g),
                N,
            )
    for g in (1, 2):
        cases[f"bmm-rows-g{g}"] = Case(
            lambda lv: torch.bmm(lv[1], lv[0]),
            [_randn(2, k, m), _randn(2, N * g, k, seed=1)],
            aten.bmm.default,
            (0, 1),
            {(0, 0): (1, g)},
            (1, g),
            N,
        )
        cases[f"bmm-left-cols-g{g}"] = Case(
            lambda lv: torch.bmm(lv[0], lv[1]),
            [_randn(2, m, k), _randn(2, k, N * g, seed=1)],
            aten.bmm.default,
            (0, 0),
            {(0, 1): (2, g)},
            (2, g),
            N,
        )
        cases[f"bmm-left-batch-g{g}"] = Case(
            lambda lv: torch.bmm(lv[0].expand(lv[1].shape[0], m, k), lv[1]),
            [_randn(1, m, k), _randn(N * g, k, 2, seed=1)],
            aten.bmm.default,
            (0, 0),
            {(0, 1): (0, g)},
            (0, g),
            N,
        )
    return cases


def _conv_cases() -> dict[str, Case]:
    cases = {}
    specs = {
        "conv2d": (F.conv2d, (4, 2, 3, 3), (4, 7, 6), dict(stride=2, padding=1, dilation=2, groups=2)),
        "conv2d-plain": (F.conv2d, (3, 4, 3, 3), (4, 5, 5), {}),
        "conv2d-1x1-output": (F.conv2d, (3, 4, 3, 3), (4, 3, 3), {}),
        "conv1d": (F.conv1d, (4, 2, 3), (4, 9), dict(stride=2, padding=2, dilation=1, groups=2)),
        "conv3d": (F.conv3d, (2, 3, 2, 2, 2), (3, 4, 3, 4), dict(padding=1)),
        "conv_transpose2d": (
            F.conv_transpose2d,
            (4, 3, 3, 3),
            (4, 4, 3),
            dict(stride=2, padding=1, output_padding=1, groups=2, dilation=1),
        ),
        "conv_transpose1d": (F.conv_transpose1d, (2, 3, 3), (2, 5), dict(stride=2)),
    }
    for name, (conv, wshape, xshape, kw) in specs.items():
        cout = wshape[1] * kw.get("groups", 1) if "transpose" in name else wshape[0]
        for g in (1, 2):
            for target, pos in (("weight", (0, 1)), ("bias", (0, 2))):
                cases[f"{name}-{target}-g{g}"] = Case(
                    lambda lv, conv=conv, kw=kw: conv(lv[2], lv[0], lv[1], **kw),
                    [_randn(*wshape), _randn(cout, seed=2), _randn(N * g, *xshape, seed=1)],
                    aten.convolution.default,
                    pos,
                    {(0, 0): (0, g)},
                    (0, g),
                    N,
                )
    return cases


def _embedding_cases() -> dict[str, Case]:
    vocab, dim = 6, 3
    repeated = torch.tensor([[0, 1, 1, 5], [2, 2, 2, 3], [4, 0, 3, 1], [1, 5, 5, 0]])
    unique = torch.tensor([[0, 1, 2, 5], [2, 3, 4, 1], [4, 0, 3, 1], [1, 5, 2, 0]])
    cases = {}
    for name, idx in (("repeats", repeated), ("unique", unique)):
        for pad in (None, 1):
            cases[f"embedding-{name}-pad{pad}"] = Case(
                lambda lv, idx=idx, pad=pad: F.embedding(idx, lv[0], padding_idx=pad),
                [_randn(vocab, dim)],
                aten.embedding.default,
                (0, 0),
                {(0, 1): (0, 1)},
                (0, 1),
                N,
            )
    cases["embedding-sample-axis-1"] = Case(
        lambda lv: F.embedding(repeated.T.contiguous(), lv[0]),
        [_randn(vocab, dim)],
        aten.embedding.default,
        (0, 0),
        {(0, 1): (1, 1)},
        (1, 1),
        N,
    )
    cases["embedding-grouped"] = Case(
        lambda lv: F.embedding(repeated.reshape(8, 2), lv[0]),
        [_randn(vocab, dim)],
        aten.embedding.default,
        (0, 0),
        {(0, 1): (0, 2)},
        (0, 2),
        N,
    )
    return cases


def _norm_cases() -> dict[str, Case]:
    cases = {}
    for target, pos in (("weight", (0, 2)), ("bias", (0, 3))):
        cases[f"layer_norm-{target}-rows"] = Case(
            lambda lv: F.layer_norm(lv[2], (5,), lv[0], lv[1]),
            [_randn(5), _randn(5, seed=2), _randn(N, 5, seed=1)],
            aten.native_layer_norm.default,
            pos,
            {(0, 0): (0, 1)},
            (0, 1),
            N,
        )
        cases[f"layer_norm-{target}-seq"] = Case(
            lambda lv: F.layer_norm(lv[2], (5,), lv[0], lv[1]),
            [_randn(5), _randn(5, seed=2), _randn(N, 3, 5, seed=1)],
            aten.native_layer_norm.default,
            pos,
            {(0, 0): (0, 1)},
            (0, 1),
            N,
        )
        cases[f"layer_norm-{target}-flat-seq"] = Case(
            lambda lv: F.layer_norm(lv[2], (5,), lv[0], lv[1]),
            [_randn(5), _randn(5, seed=2), _randn(N * 3, 5, seed=1)],
            aten.native_layer_norm.default,
            pos,
            {(0, 0): (0, 3)},
            (0, 3),
            N,
        )
        cases[f"layer_norm-{target}-2d-seq-first"] = Case(
            lambda lv: F.layer_norm(lv[2], (2, 3), lv[0], lv[1]),
            [_randn(2, 3), _randn(2, 3, seed=2), _randn(3, N, 2, 3, seed=1)],
            aten.native_layer_norm.default,
            pos,
            {(0, 0): (1, 1)},
            (1, 1),
            N,
        )
    for target, pos in (("weight", (0, 1)), ("bias", (0, 2))):
        cases[f"group_norm-{target}"] = Case(
            lambda lv: F.group_norm(lv[2], 2, lv[0], lv[1]),
            [_randn(4), _randn(4, seed=2), _randn(N, 4, 3, 2, seed=1)],
            aten.native_group_norm.default,
            pos,
            {(0, 0): (0, 1)},
            (0, 1),
            N,
        )
        rm, rv = _randn(4, seed=5), torch.rand(4, generator=_g(6), dtype=DT) + 0.5
        for shape in ((N, 4), (N, 4, 3, 2)):
            cases[f"batch_norm_eval-{target}-{len(shape)}d"] = Case(
                lambda lv, rm=rm, rv=rv: F.batch_norm(lv[2], rm, rv, lv[0], lv[1], training=False),
                [_randn(4), _randn(4, seed=2), _randn(*shape, seed=1)],
                aten.native_batch_norm.default,
                pos,
                {(0, 0): (0, 1)},
                (0, 1),
                N,
            )
        cases[f"batch_norm_legit_no_training-{target}"] = Case(
            lambda lv, rm=rm, rv=rv: aten._native_batch_norm_legit_no_training(
                lv[2], lv[0], lv[1], rm, rv, 0.1, 1e-5
            )[0],
            [_randn(4), _randn(4, seed=2), _randn(N, 4, 3, seed=1)],
            aten._native_batch_norm_legit_no_training.default,
            pos,
            {(0, 0): (0, 1)},
            (0, 1),
            N,
        )
    return cases


def _elementwise_cases() -> dict[str, Case]:
    ops = {
        "add": (lambda x, p: x + p, aten.add.Tensor, (0, 1)),
        "radd": (lambda x, p: p + x, aten.add.Tensor, (0, 0)),
        "sub-alpha": (lambda x, p: torch.sub(x, p, alpha=3.0), aten.sub.Tensor, (0, 1)),
        "mul": (lambda x, p: x * p, aten.mul.Tensor, (0, 1)),
        "div-num": (lambda x, p: p / (x.abs() + 1), aten.div.Tensor, (0, 0)),
        "div-den": (lambda x, p: x / (p.abs() + 1), aten.div.Tensor, (0, 1)),
    }
    layouts = {
        # (x shape, param shape, sample axis)
        "rows": ((N, 5), (5,), (0, 1)),
        "seq": ((N, 3, 5), (5,), (0, 1)),
        "seq-pos": ((N, 3, 5), (3, 1), (0, 1)),
        "flat-seq": ((N * 3, 5), (5,), (0, 3)),
        "sample-dim-1": ((3, N, 5), (3, 1, 5), (1, 1)),
        "per-entry": ((N * 2, 5), (N * 2, 5), (0, 2)),
        "per-entry-bcast": ((N * 2, 5), (N * 2, 1), (0, 2)),
        "scalar": ((N, 5), (), (0, 1)),
    }
    cases = {}
    for oname, (op, func, pos) in ops.items():
        for lname, (xs, ps, axis) in layouts.items():
            if oname.startswith("div-den") and lname != "rows":
                continue
            x_pos = (0, 1 - pos[1])
            node_pos = pos
            # div-den: the parameter side is abs(p) + 1 (a leaf through ops): test at that argument
            cases[f"{oname}-{lname}"] = Case(
                lambda lv, op=op: op(lv[1], lv[0]),
                [_randn(*ps), _randn(*xs, seed=1)],
                func,
                node_pos,
                {x_pos: axis},
                axis,
                N,
            )
    return cases


CASES = {**_mm_cases(), **_conv_cases(), **_embedding_cases(), **_norm_cases(), **_elementwise_cases()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_rule_matches_vmap_grad(name: str) -> None:
    _check(CASES[name])


@pytest.mark.parametrize(
    "name",
    ["mm-x@W-g3", "conv2d-weight-g2", "conv1d-weight-g1", "embedding-repeats-padNone", "bmm-rows-g2",
     "layer_norm-weight-seq", "add-per-entry-bcast"],
)  # fmt: skip
@pytest.mark.parametrize("per_sample_weights", [False, True], ids=["w(R)", "w(R,N)"])
def test_chunked_equals_unchunked(name: str, per_sample_weights: bool) -> None:
    """A tiny memory budget forces one column and one sample per chunk: same result."""
    case = CASES[name]
    node, values = _node(case)
    cols = _randn(5, *values[node.outputs[0]].shape, seed=3)
    shape = (5, case.n) if per_sample_weights else (5,)
    w = torch.randn(shape, generator=_g(4), dtype=DT)
    full = param_squares(node, values, case.position, case.axes, case.out_axis, cols, w, case.n)
    old = memory_budget()
    try:
        set_memory_budget(64)
        small = param_squares(node, values, case.position, case.axes, case.out_axis, cols, w, case.n)
    finally:
        set_memory_budget(old)
    assert full is not None and small is not None
    torch.testing.assert_close(small, full, rtol=1e-12, atol=1e-14)


def test_float32_matches_float64() -> None:
    case = CASES["linear-weight-g3"]
    node, values = _node(case)
    cols = _randn(3, *values[node.outputs[0]].shape, seed=3)
    ref = param_squares(node, values, case.position, case.axes, case.out_axis, cols, None, case.n)
    values32 = [v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for v in values]
    got = param_squares(node, values32, case.position, case.axes, case.out_axis, cols.float(), None, case.n)
    assert got is not None and ref is not None and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


def test_every_interface_is_registered() -> None:
    for name, fn in interfaces.INTERFACES.items():
        packet, _, overload = name.partition(".")
        op = getattr(getattr(aten, packet), overload or "default")
        assert rule(op).interface is fn, name


def _none(case: Case, **overrides: Any) -> Any:
    node, values = _node(case)
    cols = _randn(2, *values[node.outputs[0]].shape, seed=3)
    kw = dict(position=case.position, axes=case.axes, out_axis=case.out_axis)
    kw.update(overrides)
    return param_squares(node, values, kw["position"], kw["axes"], kw["out_axis"], cols, None, case.n)


def test_no_rule_returns_none() -> None:
    relu = Case(lambda lv: torch.relu(lv[0]), [_randn(N, 3)], aten.relu.default, (0, 0), {}, (0, 1), N)
    assert _none(relu) is None


def test_parameter_side_per_sample_returns_none() -> None:
    case = CASES["mm-x@W-g1"]
    assert _none(case, axes={(0, 0): (0, 1), (0, 1): (0, 1)}) is None


def test_samples_contracted_returns_none() -> None:
    """x of shape (k, N) contracted over samples: the output is no longer per-sample."""
    case = Case(
        lambda lv: torch.mm(lv[1], lv[0]),
        [_randn(N, 3), _randn(2, N, seed=1)],
        aten.mm.default,
        (0, 1),
        {(0, 0): (1, 1)},
        (0, 1),
        N,
    )
    assert _none(case) is None


def test_batch_stat_ops_return_none() -> None:
    scaled = Case(
        lambda lv: F.embedding(torch.tensor([[0, 1], [1, 1]]), lv[0], scale_grad_by_freq=True),
        [_randn(3, 2)],
        aten.embedding.default,
        (0, 0),
        {(0, 1): (0, 1)},
        (0, 1),
        2,
    )
    assert _none(scaled) is None
    rm, rv = torch.zeros(3, dtype=DT), torch.ones(3, dtype=DT)
    train = Case(
        lambda lv: F.batch_norm(lv[1], rm.clone(), rv.clone(), lv[0], None, training=True),
        [_randn(3), _randn(N, 3, seed=1)],
        aten.native_batch_norm.default,
        (0, 1),
        {(0, 0): (0, 1)},
        (0, 1),
        N,
    )
    assert _none(train) is None


@pytest.mark.parametrize(
    "name",
    ["linear-weight-g3", "linear-bias-g1", "conv2d-weight-g2", "conv1d-weight-g1", "layer_norm-weight-seq",
     "embedding-repeats-pad1", "mul-seq", "bmm-rows-g2"],
)  # fmt: skip
def test_result_carries_the_gradient(name: str) -> None:
    """With leaves, columns and weights that require grad, the squares are differentiable and
    their gradient is the reference's (a curvature regularizer must never get a silently detached value)."""
    case = CASES[name]
    leaves = [t.clone().requires_grad_(t.is_floating_point()) for t in case.leaves]
    tape = record(case.fn, leaves)
    node = next(nd for nd in tape.nodes if nd.func == case.func)
    values = tape.replay(leaves)
    cols = _randn(2, *values[node.outputs[0]].shape, seed=7).requires_grad_(True)
    w = torch.rand(2, generator=_g(8), dtype=DT).requires_grad_(True)
    got = param_squares(node, values, case.position, case.axes, case.out_axis, cols, w, case.n)
    assert got is not None and got.requires_grad
    ref = _reference(node, values, case, cols, w).sum(0)
    probe = _randn(*ref.shape, seed=9)
    floating = [t for t in leaves if t.requires_grad] + [cols, w]
    g_got = torch.autograd.grad((got * probe).sum(), floating, allow_unused=True, materialize_grads=True)
    g_ref = torch.autograd.grad((ref * probe).sum(), floating, allow_unused=True, materialize_grads=True)
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_keyword_argument_positions() -> None:
    """Positions and axes given as keyword paths ``(1, name)`` bind like positional ones."""
    case = CASES["addmm-alpha-beta-weight"]
    node, values = _node(case)
    kw_node = TapeNode(node.func, node.args[:1], {"mat1": node.args[1], "mat2": node.args[2], **node.kwargs},
                       node.outputs, node.multi)  # fmt: skip
    cols = _randn(3, *values[node.outputs[0]].shape, seed=3)
    ref = param_squares(node, values, (0, 2), {(0, 1): (0, 2)}, (0, 2), cols, None, N)
    got = param_squares(kw_node, values, (1, "mat2"), {(1, "mat1"): (0, 2)}, (0, 2), cols, None, N)
    assert ref is not None and got is not None
    torch.testing.assert_close(got, ref)


@st.composite
def _elementwise_layouts(draw: st.DrawFn) -> tuple[Case, str]:
    """A random output shape, sample dimension and group, and a parameter broadcast to it
    (each dimension 1 or full, leading dimensions possibly dropped) met by add/mul/div."""
    n = draw(st.integers(1, 3))
    g = draw(st.integers(1, 3))
    ndim = draw(st.integers(1, 3))
    d = draw(st.integers(0, ndim - 1))
    shape = [draw(st.integers(1, 3)) for _ in range(ndim)]
    shape[d] = n * g
    pshape = [s if draw(st.booleans()) else 1 for s in shape]
    pshape = pshape[draw(st.integers(0, ndim - 1)) :]
    op = draw(st.sampled_from(["add", "mul", "div"]))
    fns = {"add": (lambda x, p: x + p), "mul": (lambda x, p: x * p), "div": (lambda x, p: x / (p.abs() + 1))}
    funcs = {"add": aten.add.Tensor, "mul": aten.mul.Tensor, "div": aten.div.Tensor}
    seed = draw(st.integers(0, 2**16))
    case = Case(
        lambda lv, f=fns[op]: f(lv[1], lv[0]),
        [_randn(*pshape, seed=seed), _randn(*shape, seed=seed + 1)],
        funcs[op],
        (0, 1),
        {(0, 0): (d, g)},
        (d, g),
        n,
    )
    return case, f"{op} x{tuple(shape)} p{tuple(pshape)} axis{(d, g)}"


@given(_elementwise_layouts())
def test_elementwise_random_layouts(layout: tuple[Case, str]) -> None:
    case, _ = layout
    _check(case, num_cols=2)


@st.composite
def _matmul_layouts(draw: st.DrawFn) -> Case:
    """mm/bmm with the parameter on either side and samples along any admissible dimension."""
    n, g = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    k, m, b, rows = (draw(st.integers(1, 3)) for _ in range(4))
    batched = draw(st.booleans())
    right = draw(st.booleans())  # the parameter on the right: y = x @ P
    seed = draw(st.integers(0, 2**16))
    if not batched:
        x_shape, p_shape = ((n * g, k), (k, m)) if right else ((k, n * g), (m, k))
        axis = (0, g) if right else (1, g)
        func = aten.mm.default
    else:
        along_batch = draw(st.booleans())
        if right:
            x_shape = (n * g, rows, k) if along_batch else (b, n * g, k)
            p_shape, axis = ((n * g, k, m) if along_batch else (b, k, m)), ((0, g) if along_batch else (1, g))
        else:
            x_shape = (n * g, k, rows) if along_batch else (b, k, n * g)
            p_shape, axis = ((n * g, m, k) if along_batch else (b, m, k)), ((0, g) if along_batch else (2, g))
        func = aten.bmm.default
    op = torch.bmm if batched else torch.mm
    fn = (lambda lv: op(lv[1], lv[0])) if right else (lambda lv: op(lv[0], lv[1]))
    return Case(
        fn,
        [_randn(*p_shape, seed=seed), _randn(*x_shape, seed=seed + 1)],
        func,
        (0, 1) if right else (0, 0),
        {(0, 0) if right else (0, 1): axis},
        axis,
        n,
    )


@given(_matmul_layouts())
def test_matmul_random_layouts(case: Case) -> None:
    _check(case, num_cols=2)


def test_column_squares_cache_follows_in_place_updates() -> None:
    """The weight and bias calls share Σ_c cols², but never across an in-place change of cols."""
    case = CASES["linear-bias-g1"]
    node, values = _node(case)
    cols = _randn(3, *values[node.outputs[0]].shape, seed=3)
    first = param_squares(node, values, case.position, case.axes, case.out_axis, cols, None, N)
    cols.mul_(2.0)
    second = param_squares(node, values, case.position, case.axes, case.out_axis, cols, None, N)
    assert first is not None and second is not None
    torch.testing.assert_close(second, 4 * first)


@pytest.mark.parametrize(
    "name",
    ["linear-weight-g3", "bmm-rows-g2", "conv2d-weight-g2", "conv3d-weight-g1", "embedding-repeats-pad1",
     "layer_norm-weight-seq", "group_norm-weight", "mul-per-entry-bcast"],
)  # fmt: skip
def test_device_is_kept(name: str, device: torch.device) -> None:
    """The rules run where the values live and agree with the CPU result."""
    case = CASES[name]
    node, values = _node(case)
    cols = _randn(3, *values[node.outputs[0]].shape, seed=3)
    w = torch.randn((3, case.n), generator=_g(4), dtype=DT)
    ref = param_squares(
        node, values, case.position, case.axes, case.out_axis, cols, w, case.n, per_sample=True
    )
    moved = [v.to(device) if isinstance(v, torch.Tensor) else v for v in values]

    def to(obj: Any) -> Any:  # constants captured in the node (e.g. embedding indices)
        if isinstance(obj, torch.Tensor):
            return obj.to(device)
        if isinstance(obj, (list, tuple)):
            return type(obj)(to(o) for o in obj)
        return {k: to(v) for k, v in obj.items()} if isinstance(obj, dict) else obj

    node = TapeNode(node.func, to(node.args), to(node.kwargs), node.outputs, node.multi)
    got = param_squares(
        node,
        moved,
        case.position,
        case.axes,
        case.out_axis,
        cols.to(device),
        w.to(device),
        case.n,
        per_sample=True,
    )
    assert ref is not None and got is not None and got.device.type == device.type
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-10, atol=1e-12)
