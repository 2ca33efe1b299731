"""Fast rules of the sweep's walk: the column-batched VJP rules (secorder._engine.vjps)
against the generic road (``vmap`` of the op's ``vjp``), the closed-form pointwise derivatives
(``OpRule.derivs``), and both end to end against dense float64 Hessians."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

import secorder
from secorder._engine import vjps
from secorder._engine.rules import rule
from secorder._engine.tape import Ref, record, resolve
from secorder._pytree import flatten
from secorder.testing import dense_hessian

DT = torch.float64

CONVS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "conv2d": lambda x, w: F.conv2d(x, w, padding=1),
    "conv2d_strided_dilated": lambda x, w: F.conv2d(x, w, stride=2, padding=2, dilation=2),
    "conv2d_groups": lambda x, w: F.conv2d(x, w[:, :2], groups=2, padding=1),
    "conv1d_strided": lambda x, w: F.conv1d(x.flatten(2), w[..., 0], stride=3),
    "conv3d": lambda x, w: F.conv3d(
        x.unsqueeze(2).expand(-1, -1, 3, -1, -1), w.unsqueeze(2).expand(-1, -1, 2, -1, -1)
    ),
    "conv_transpose2d_output_padding": lambda x, w: F.conv_transpose2d(
        x, w.transpose(0, 1), stride=2, padding=1, output_padding=1
    ),
    "conv2d_unbatched": lambda x, w: F.conv2d(x[0], w, padding=1),
}


def _node_of(tape: Any, name: str) -> int:
    return next(i for i, node in enumerate(tape.nodes) if node.func is getattr(torch.ops.aten, name).default)


def _generic(node: Any, values: list[Any], ct: Tensor) -> Tensor:
    base = resolve((node.args, node.kwargs), values)

    def fn(x: Tensor) -> Tensor:
        out = node.func(x, *base[0][1:], **base[1])
        return out[0] if node.multi else out

    _, pull = vjp(fn, base[0][0])
    return vmap(pull)(ct)[0]


@pytest.mark.parametrize("inplace", [False, True], ids=["fresh", "inplace"])
@pytest.mark.parametrize("loop", [False, True], ids=["folded", "one_column_at_a_time"])
@pytest.mark.parametrize("name", sorted(CONVS))
def test_convolution_vjp_matches_generic(
    name: str, loop: bool, inplace: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Strides, padding, dilation, groups, 1-D/3-D, transposed with output padding, an unbatched
    input; folded into the batch dimension and one column at a time; with ``inplace`` (columns
    the walk owns) the gradients overwrite the columns where the sizes allow."""
    monkeypatch.setattr(vjps, "_LOOP_BYTES", 0 if loop else 1 << 62)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 7, 7, dtype=DT, generator=g)
    w = torch.randn(4, 4, 3, 3, dtype=DT, generator=g)
    conv = CONVS[name]
    tape = record(lambda ls: conv(ls[0], ls[1]).sum(), [x, w])  # x as a leaf: the input side depends
    values = tape.values if tape.values is not None else tape.replay([x, w])
    i = _node_of(tape, "convolution")
    node = tape.nodes[i]
    out = values[node.outputs[0]]
    ct = torch.randn(5, *out.shape, dtype=DT, generator=g)
    want = _generic(node, values, ct)
    given = ct.clone()
    opts = {"inplace": True} if inplace else {}
    got = rule(node.func).vjp(node, values, [(0, 0)], {node.outputs[0]: given}, **opts)
    assert got is not None
    torch.testing.assert_close(got[0], want, rtol=1e-12, atol=1e-12)
    overwritten = got[0].untyped_storage().data_ptr() == given.untyped_storage().data_ptr()
    same_size = out.numel() == values[node.args[0].index].numel()
    assert overwritten == (inplace and loop and same_size)
    if not overwritten:
        assert torch.equal(given, ct)  # the columns are left as they were


def test_convolution_vjp_declines_other_positions() -> None:
    """Columns asked for the weight too (a per-sample weight): the generic road (None)."""
    x, w = torch.randn(2, 3, 5, 5, dtype=DT), torch.randn(4, 3, 3, 3, dtype=DT)
    tape = record(lambda ls: F.conv2d(ls[0], ls[1]).sum(), [x, w])
    values = tape.values if tape.values is not None else tape.replay([x, w])
    node = tape.nodes[_node_of(tape, "convolution")]
    ct = torch.randn(2, *values[node.outputs[0]].shape, dtype=DT)
    assert vjps.convolution_vjp(node, values, [(0, 0), (0, 1)], {node.outputs[0]: ct}) is None


@pytest.mark.parametrize("loop", [False, True], ids=["folded", "one_column_at_a_time"])
def test_cnn_diagonal_exact_through_the_vjp_rules(loop: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Curvature behind two convolutions (GELU between them): the columns of the second
    activation reach the first convolution through the convolution VJP rule."""
    monkeypatch.setattr(vjps, "_LOOP_BYTES", 0 if loop else 1 << 62)
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.GELU(),
        nn.Conv2d(3, 4, 3, stride=2, groups=1),
        nn.ReLU(),
        nn.ConvTranspose2d(4, 2, 3, stride=2, output_padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(2 * 8 * 8, 3),
    ).to(DT)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(4, 2, 7, 7, dtype=DT), torch.randint(0, 3, (4,))

    def f(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    fn = secorder.hessian_diagonal(f)
    got = fn(params, x, y)
    assert fn.method_info.method == "sweep", fn.method_info
    ref = dense_hessian(lambda p: f(p, x, y), params).diagonal()
    got_flat = torch.cat([leaf.reshape(-1) for leaf in flatten(got)[0]])  # dense_hessian's flat order
    torch.testing.assert_close(got_flat, ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("op", ["relu", "tanh", "sigmoid"])
def test_pointwise_vjp_inplace_overwrites_the_columns_with_the_same_values(op: str) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, dtype=DT, generator=g)
    fn = getattr(torch, op)
    tape = record(lambda ls: fn(ls[0]).sum(), [x])
    values = tape.values if tape.values is not None else tape.replay([x])
    node = tape.nodes[_node_of(tape, op)]
    ct = torch.randn(3, 4, 6, dtype=DT, generator=g)
    fresh = vjps.pointwise_vjp(node, values, [(0, 0)], {node.outputs[0]: ct})
    given = ct.clone()
    got = vjps.pointwise_vjp(node, values, [(0, 0)], {node.outputs[0]: given}, inplace=True)
    assert fresh is not None and got is not None and got[0] is given
    torch.testing.assert_close(got[0], fresh[0], rtol=0, atol=0)
    torch.testing.assert_close(fresh[0], _generic(node, values, ct), rtol=1e-12, atol=1e-12)


def test_fisher_cnn_with_columns_overwritten_by_the_walk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Convolutions of equal input and output sizes, one column at a time (the in-place input
    gradients) and ReLU/tanh columns overwritten in place: the GGN and empirical Fisher diagonals
    equal the generic route's."""
    monkeypatch.setattr(vjps, "_LOOP_BYTES", 0)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 3, 3, padding=1), nn.Tanh(),
        nn.Conv2d(3, 3, 3, padding=1), nn.Flatten(), nn.Linear(3 * 5 * 5, 4),
    ).to(DT)  # fmt: skip
    params = {k: v.detach() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 3, 5, 5, dtype=DT, generator=g), torch.randint(0, 4, (5,), generator=g)
    for kind in ("ggn", "empirical"):
        fast = secorder.fisher_diagonal(model, "cross_entropy", kind=kind, path="fast")(params, x, y)
        ref = secorder.fisher_diagonal(model, "cross_entropy", kind=kind, path="generic")(params, x, y)
        torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)


POINTWISE: dict[str, Callable[[Tensor], Tensor]] = {
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "sin": torch.sin,
    "cos": torch.cos,
    "exp": lambda h: torch.exp(0.3 * h),
    "log": lambda h: torch.log(h * h + 1.0),
    "sqrt": lambda h: torch.sqrt(h * h + 1.0),
    "rsqrt": lambda h: torch.rsqrt(h * h + 1.0),
    "reciprocal": lambda h: torch.reciprocal(h * h + 1.0),
    "pow2": lambda h: h**2,
    "pow3": lambda h: h**3,
    "silu": F.silu,
    "softplus": lambda h: F.softplus(h, beta=2.0, threshold=1.0),
}


@pytest.mark.parametrize("name", sorted(POINTWISE))
def test_pointwise_closed_form_columns_exact(name: str) -> None:
    """The sweep's diagonal columns m = ḡ ⊙ f'' and the closed-form transport's f' from the
    registry's ``derivs`` (:data:`secorder._engine.jet.DERIVS`), two layers deep (the first
    activation's f' carries the second's columns to the first layer) against dense float64."""
    act = POINTWISE[name]
    g = torch.Generator().manual_seed(7)
    params = {
        "w1": torch.randn(5, 4, dtype=DT, generator=g) * 0.7,
        "w2": torch.randn(4, 4, dtype=DT, generator=g) * 0.7,
        "w3": torch.randn(4, 3, dtype=DT, generator=g) * 0.7,
    }
    x, y = torch.randn(6, 5, dtype=DT, generator=g), torch.randint(0, 3, (6,), generator=g)

    def f(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(act(act(x @ p["w1"]) @ p["w2"]) @ p["w3"], y)

    fn = secorder.hessian_diagonal(f)
    got = fn(params, x, y)
    assert fn.method_info.method == "sweep", fn.method_info
    ref = dense_hessian(lambda p: f(p, x, y), params).diagonal()
    got_flat = torch.cat([leaf.reshape(-1) for leaf in flatten(got)[0]])
    torch.testing.assert_close(got_flat, ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("op", ["tanh", "sigmoid", "exp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_deriv_from_output_is_the_closed_form_first_derivative(op: str, dtype: torch.dtype) -> None:
    """``OpRule.deriv_from_output`` (the walk's f' from the recorded output) gives the same
    numbers as ``derivs``' f' (which evaluates f again), entry for entry."""
    func = getattr(torch.ops.aten, op).default
    x = torch.randn(7, 5, dtype=dtype, generator=torch.Generator().manual_seed(3)) * 3
    y, d1, _ = rule(func).derivs(func, x)
    assert torch.equal(rule(func).deriv_from_output(func(x)), d1)
    assert torch.equal(y, func(x))


@pytest.mark.parametrize("kind", ["ggn", "empirical"])
def test_fisher_plain_model_fn_outputs_from_the_engine_tape(kind: str) -> None:
    """The outputs z of a plain ``model_fn`` come from the tape the engine sweeps (one forward
    pass fewer): the same values as the generic route, and one evaluation fewer."""
    g = torch.Generator().manual_seed(11)
    params = {"w": torch.randn(3, 4, dtype=DT, generator=g), "v": torch.randn(4, 2, dtype=DT, generator=g)}
    x, y = torch.randn(5, 3, dtype=DT, generator=g), torch.randint(0, 2, (5,), generator=g)
    calls = [0]

    def model_fn(p: dict[str, Tensor], x: Tensor) -> Tensor:
        calls[0] += 1
        return torch.tanh(x @ p["w"]) @ p["v"]

    fd = secorder.fisher_diagonal(model_fn, "cross_entropy", kind=kind)
    got = fd(params, x, y)
    assert fd.path_info.path == "fast", fd.path_info
    swept_calls = calls[0]
    ref = secorder.fisher_diagonal(model_fn, "cross_entropy", kind=kind, path="generic")(params, x, y)
    for k in params:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-12, atol=1e-14)
    assert swept_calls <= 2  # the recording (z and the tape) and one check; a separate z forward made 3


def test_fisher_plain_model_fn_own_exception_passes_through() -> None:
    params = {"w": torch.randn(3, 2, dtype=DT)}
    x, y = torch.randn(4, 3, dtype=DT), torch.randint(0, 2, (4,))

    def model_fn(p: dict[str, Tensor], x: Tensor) -> Tensor:
        raise KeyError("the user's own error")

    with pytest.raises(KeyError, match="the user's own error"):
        secorder.fisher_diagonal(model_fn, "cross_entropy")(params, x, y)


def _generic_at(node: Any, values: list[Any], position: tuple[Any, ...], ct: Tensor) -> Tensor:
    """The generic road for the argument at ``position`` = (0, i): vmap of the op's vjp."""
    base = resolve((node.args, node.kwargs), values)

    def fn(x: Tensor) -> Tensor:
        args = list(base[0])
        args[position[1]] = x
        out = node.func(*args, **base[1])
        return out[0] if node.multi else out

    _, pull = vjp(fn, base[0][position[1]])
    return vmap(pull)(ct)[0]


def _walk_program(ls: list[Tensor]) -> Tensor:
    x, w, b, v = ls
    h = torch.tanh(F.linear(x, w, b))  # t + addmm
    h = torch.relu(h - 0.1) + torch.sigmoid(h) + torch.exp(0.3 * h) + F.silu(h) + F.softplus(h, beta=2.0)
    h = h.reshape(2, 3, 4).permute(2, 0, 1).transpose(0, 2).unsqueeze(0).squeeze(0)  # views
    h = h.reshape(6, 4) @ v  # mm
    h = 2.0 * torch.addmm(b[:2], h, v.T[:, :2], beta=0.5, alpha=1.5)  # addmm with beta, alpha
    return (torch.sin(h) + torch.cos(h) + torch.log(h * h + 1) + torch.sqrt(h * h + 1)).pow(2).sum()


@pytest.mark.parametrize(
    "op",
    ["addmm", "mm", "t", "transpose", "permute", "view", "_unsafe_view", "unsqueeze", "squeeze", "tanh", "relu", "sigmoid",
     "exp", "silu", "softplus", "sin", "cos", "log", "sqrt", "pow"],
)  # fmt: skip
def test_walk_vjp_rules_match_generic(op: str) -> None:
    """Every column-batched VJP rule of the walk (matrix products on either operand with
    ``alpha``, views, unary pointwise ops) against vmap of the op's own vjp, at every
    floating argument position the rule serves."""
    g = torch.Generator().manual_seed(5)
    leaves = [
        torch.randn(6, 5, dtype=DT, generator=g),
        torch.randn(4, 5, dtype=DT, generator=g),
        torch.randn(4, dtype=DT, generator=g),
        torch.randn(4, 4, dtype=DT, generator=g),
    ]
    tape = record(_walk_program, leaves)
    values = tape.values if tape.values is not None else tape.replay(leaves)
    prefix = {"transpose": "transpose.int", "squeeze": "squeeze.dim", "pow": "pow.Tensor_Scalar"}.get(op, op)
    packet, _, overload = prefix.partition(".")
    target = getattr(getattr(torch.ops.aten, packet), overload or "default")
    nodes = [node for node in tape.nodes if node.func is target]
    assert nodes, [str(n.func) for n in tape.nodes]
    checked = 0
    for node in nodes:
        out = values[node.outputs[0]]
        ct = torch.randn(3, *out.shape, dtype=DT, generator=g)
        floating = [
            (0, i)
            for i, a in enumerate(node.args)
            if isinstance(a, Ref) and values[a.index].is_floating_point()
        ]
        for position in floating:
            got = rule(node.func).vjp(node, values, [position], {node.outputs[0]: ct})
            if position == (0, 0) and node.func is torch.ops.aten.addmm.default:
                assert got is None  # the bias: the generic road
                continue
            assert got is not None, (node.func, position)
            torch.testing.assert_close(
                got[0], _generic_at(node, values, position, ct), rtol=1e-12, atol=1e-12
            )
            checked += 1
    assert checked


def _attention_program(ls: list[Tensor]) -> Tensor:
    x, w, b, g = ls  # x (2, 4, 6), w (6, 9), b (9,), g (6,)
    h = F.layer_norm(x, (6,), g, b[:6])  # native_layer_norm with an affine weight
    q, k, v = (h @ w + b).split(3, dim=-1)  # split.Tensor
    q2, k2 = q.clone().to(torch.float32).to(DT), k.expand(2, 4, 3)  # clone, _to_copy, expand
    att = torch.bmm(q2, k2.transpose(1, 2)) / 1.7  # bmm, div by a number
    mask = torch.triu(torch.ones(4, 4, dtype=torch.bool), 1)
    att = att.masked_fill(mask, float("-inf")).softmax(-1)  # masked_fill, _softmax
    y = torch.bmm(att, v) * g[:3] - 0.5 * v + b[:3] / g[:3].exp()  # mul/sub/add broadcast
    z = torch.split(y, [1, 2], dim=-1)  # split_with_sizes
    return (F.log_softmax(z[1] * z[0] + y[..., :2], -1) ** 2).sum() + (y / (1.5 + g[:3] ** 2)).sum()


@pytest.mark.parametrize(
    "op",
    ["native_layer_norm", "split.Tensor", "split_with_sizes", "clone", "_to_copy", "expand", "bmm", "div.Tensor",
     "masked_fill.Scalar", "_softmax", "_log_softmax", "mul.Tensor", "sub.Tensor", "add.Tensor"],
)  # fmt: skip
def test_walk_vjp_rules_attention_ops_match_generic(op: str) -> None:
    """The rules for attention-block ops (layer norm, split, bmm, softmax, masked fill,
    broadcast arithmetic, copies, expand) against vmap of the op's own vjp, at every floating
    argument position, with columns on every output of a multi-output op (split: also on a
    subset of the pieces)."""
    g = torch.Generator().manual_seed(7)
    leaves = [
        torch.randn(2, 4, 6, dtype=DT, generator=g),
        torch.randn(6, 9, dtype=DT, generator=g),
        torch.randn(9, dtype=DT, generator=g),
        torch.randn(6, dtype=DT, generator=g),
    ]
    tape = record(_attention_program, leaves)
    values = tape.values if tape.values is not None else tape.replay(leaves)
    packet, _, overload = op.partition(".")
    target = getattr(getattr(torch.ops.aten, packet), overload or "default")
    nodes = [node for node in tape.nodes if node.func is target]
    assert nodes, [str(n.func) for n in tape.nodes]
    checked = 0
    for node in nodes:
        outs = [o for o in node.outputs if o is not None and values[o].is_floating_point()]
        subsets = [outs] + ([outs[1:]] if node.multi and len(outs) > 1 else [])  # split: a subset too
        if node.func is torch.ops.aten.native_layer_norm.default:
            subsets = [outs[:1]]  # columns on the normalized output only (mean and 1/std unused)
        for subset in subsets:
            cts = {
                o: torch.randn(3, *values[o].shape, dtype=DT, generator=g).to(values[o].dtype) for o in subset
            }
            floating = [
                (0, i)
                for i, a in enumerate(node.args)
                if isinstance(a, Ref) and values[a.index].is_floating_point()
            ]
            for position in floating:
                got = rule(node.func).vjp(node, values, [position], cts)
                if got is None:  # the generic road: a denominator, the layer norm's affine side
                    declined = {
                        torch.ops.aten.div.Tensor: [(0, 1)],
                        torch.ops.aten.native_layer_norm.default: [(0, 2), (0, 3)],
                    }
                    assert position in declined.get(node.func, []), (node.func, position)
                    continue
                want = _generic_multi(node, values, position, cts)
                torch.testing.assert_close(got[0], want, rtol=1e-12, atol=1e-12)
                checked += 1
    assert checked


def _generic_multi(node: Any, values: list[Any], position: tuple[Any, ...], cts: dict[int, Tensor]) -> Tensor:
    """vmap of the op's vjp at ``position`` with the columns ``cts`` (zeros on other outputs)."""
    base = resolve((node.args, node.kwargs), values)
    outs = [k for k, o in enumerate(node.outputs) if o is not None and values[o].is_floating_point()]

    def fn(x: Tensor) -> tuple[Tensor, ...]:
        args = list(base[0])
        args[position[1]] = x
        out = node.func(*args, **base[1])
        res = list(out) if node.multi else [out]
        return tuple(res[k] for k in outs)

    _, pull = vjp(fn, base[0][position[1]])
    k = next(iter(cts.values())).shape[0]
    full = tuple(
        cts.get(node.outputs[j], values[node.outputs[j]].new_zeros(k, *values[node.outputs[j]].shape))
        for j in outs
    )
    return vmap(pull)(full)[0]
