"""nn.Module models on the structured engine route (the same as a plain model_fn's) against the
generic route and dense references.

The generic route (vector-Jacobian products of the whole batch) is itself checked against dense
float64 references in test_fisher.py; here every supported layer, their combinations, the models
the structured sweep refuses (the route taken and its reason: tied and raw-used weights,
parametrizations, ops without a per-sample rule, batch not in dimension 0, train-mode
BatchNorm), in-place outputs, no-mutation and differentiability are compared with it (and a few
with a dense reference directly).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812 - the PyTorch convention
from torch import Tensor, nn

from secorder import fisher_diagonal, fisher_trace
from secorder._pytree import flatten, ravel
from secorder.modules import module_forward
from secorder.testing import flat_function
from tests.conftest import tol

TOL = tol(torch.float64)


def _flat(tree: Any) -> Tensor:
    return ravel(flatten(tree)[0])


def _params(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}


def compare(
    model: nn.Module,
    loss: Any,
    x: Any,
    y: Tensor,
    *,
    kinds: tuple[str, ...] = ("ggn", "empirical", "mc"),
    expect: str = "fast",
    reduction: str = "mean",
    fallback: bool = False,
) -> dict[str, Any]:
    """Auto (the structured sweep, ``expect="fast"``, or the generic route where it refuses) vs
    generic for trace and diagonal of each kind; returns the last path_info. ``fallback``: the
    model has parameters no interface covers, so auto takes the generic route (per-leaf VJPs
    are slower there) and ``path="fast"`` (the sweep with per-leaf VJPs) is compared instead."""
    params = _params(model)
    info = {}
    for kind in kinds:
        probes = 3 if kind == "mc" else None
        for transform in (fisher_trace, fisher_diagonal):
            gen = lambda: torch.Generator().manual_seed(0)
            if fallback:
                auto = transform(model, loss, kind=kind, num_probes=probes, reduction=reduction)
                auto(params, x, y, generator=gen())
                assert auto.path_info.path == "generic", auto.path_info
                assert "per-leaf vector-Jacobian products" in auto.path_info.reason
            path = "fast" if fallback else "auto"
            fast = transform(model, loss, kind=kind, num_probes=probes, reduction=reduction, path=path)
            generic = transform(
                model, loss, kind=kind, num_probes=probes, reduction=reduction, path="generic"
            )
            a = fast(params, x, y, generator=gen())
            b = generic(params, x, y, generator=gen())
            assert fast.path_info.path == expect, fast.path_info
            assert generic.path_info.path == "generic"
            torch.testing.assert_close(_flat(a), _flat(b), **TOL)
            info[kind] = fast.path_info
    return info


def _seed(n: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(n)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, groups=2, bias=False),
        nn.Tanh(),
        nn.Conv2d(4, 2, 2, padding="same", dilation=2),
        nn.Flatten(),
        nn.Linear(2 * 2 * 2, 3),
    ).double()


class SeqModel(nn.Module):
    def __init__(self, vocab: int = 7, dim: int = 4, classes: int = 3, rms: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.norm: nn.Module = nn.RMSNorm(dim) if rms else nn.LayerNorm(dim)
        self.out = nn.Linear(dim, classes)

    def forward(self, idx: Tensor) -> Tensor:
        return self.out(torch.tanh(self.norm(self.emb(idx)))).transpose(1, 2)


class ResidualLN(nn.Module):
    def __init__(self, d: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(3, d)
        self.block = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.Tanh(), nn.Linear(d, d))
        self.head = nn.Linear(d, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        h = h + self.block(h)
        return self.head(h)


def _ce_data(n: int = 6, d: int = 4, c: int = 3) -> tuple[Tensor, Tensor]:
    g = _seed(1)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(0, c, (n,), generator=g)


# --------------------------------------------------------------------------- supported layers


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "bce_with_logits"])
def test_mlp_fast_equals_generic(loss: str, reduction: str) -> None:
    x, y = _ce_data()
    if loss != "cross_entropy":
        y = torch.rand(6, 3, generator=_seed(2), dtype=torch.float64)
    compare(mlp(), loss, x, y, reduction=reduction)


def test_mlp_fast_equals_dense_reference() -> None:
    model, (x, y) = mlp(), _ce_data()
    params = _params(model)
    forward, _ = module_forward(model)
    z_of, theta = flat_function(lambda p: forward(p, x), (params,))
    z = z_of(theta)
    jac = torch.autograd.functional.jacobian(z_of, theta).reshape(z.numel(), -1)
    hz = torch.autograd.functional.hessian(lambda zf: F.cross_entropy(zf.reshape(z.shape), y), z.reshape(-1))
    ggn = jac.T @ hz @ jac
    got = fisher_diagonal(model, "cross_entropy")(params, x, y)
    torch.testing.assert_close(_flat(got), ggn.diagonal(), **TOL)
    assert list(got) == list(params)


@pytest.mark.parametrize("kind", ["ggn", "empirical"])
def test_exact_diagonal_with_stderr_gives_zeros(kind: str) -> None:
    """The exact diagonal's standard error is zero in every entry (formed only when asked for),
    the diagonal the same as without with_stderr."""
    model, (x, y) = mlp(), _ce_data()
    params = _params(model)
    plain = fisher_diagonal(model, "cross_entropy", kind=kind)(params, x, y)
    diag, err = fisher_diagonal(model, "cross_entropy", kind=kind, with_stderr=True)(params, x, y)
    assert list(err) == list(params)
    for k in params:
        torch.testing.assert_close(diag[k], plain[k], rtol=0, atol=0)
        assert err[k].shape == params[k].shape and not err[k].any()


def test_linear_weight_squares_come_out_in_the_leaf_layout() -> None:
    """F.linear's weight enters its addmm as t(W): the sweep forms its squares as (δ²ᵀ x²)ᵀ so
    that the transpose back to W is contiguous (no strided copy when the diagonal is
    flattened), with the values of Σ_n Σ_r (J_nᵀ s_nr)^⊙2 formed densely."""
    from secorder._engine.sweep import engine_output_diagonal

    g = _seed(7)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    p = [
        torch.randn(5, 4, generator=g, dtype=torch.float64),
        torch.randn(5, generator=g, dtype=torch.float64),
    ]
    p.append(torch.randn(3, 5, generator=g, dtype=torch.float64))

    def model(ls: list[Tensor]) -> Tensor:
        return F.linear(torch.tanh(F.linear(x, ls[0], ls[1])), ls[2])

    cols = torch.randn(2, 6, 3, generator=g, dtype=torch.float64)
    got = engine_output_diagonal(model, p, [x], lambda a, b: cols[a:b], lambda a, b: None, 2)
    jac = torch.func.jacrev(lambda *ls: model(list(ls)), argnums=(0, 1, 2))(*p)  # per leaf (N, 3, *shape)
    for leaf, j in enumerate(jac):
        ref = torch.einsum("rnc,nc...->rn...", cols, j).square().sum((0, 1))
        torch.testing.assert_close(got[leaf], ref, **TOL)
    assert got[0].is_contiguous() and got[2].is_contiguous()


def test_cnn_conv_variants() -> None:
    x = torch.randn(5, 3, 6, 6, generator=_seed(1), dtype=torch.float64)
    y = torch.randint(0, 3, (5,), generator=_seed(2))
    info = compare(cnn(), "cross_entropy", x, y)
    assert "0.weight" in info["ggn"].fast and "2.weight" in info["ggn"].fast and "4.bias" in info["ggn"].fast


def test_embedding_layernorm_sequence() -> None:
    idx = torch.tensor([[1, 2, 2, 0], [3, 3, 3, 3], [0, 0, 5, 6], [6, 1, 2, 4]])
    y = torch.randint(0, 3, (4, 4), generator=_seed(3))
    model = SeqModel().double()
    info = compare(model, "cross_entropy", idx, y)
    assert set(info["ggn"].fast) == {"emb.weight", "norm.weight", "norm.bias", "out.weight", "out.bias"}
    diag = fisher_diagonal(model, "cross_entropy")(_params(model), idx, y)
    assert torch.all(diag["emb.weight"][0] == 0)  # padding_idx gets no gradient


@pytest.mark.skipif(not hasattr(nn, "RMSNorm"), reason="nn.RMSNorm needs torch >= 2.4")
def test_rmsnorm() -> None:
    idx = torch.tensor([[1, 2, 2], [3, 4, 3], [5, 0, 6]])
    compare(
        SeqModel(rms=True).double(), "cross_entropy", idx, torch.randint(0, 3, (3, 3), generator=_seed(3))
    )


def test_embedding_without_extra_dims() -> None:
    model = nn.Sequential(nn.Embedding(5, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    compare(model, "cross_entropy", torch.tensor([0, 4, 4, 1]), torch.tensor([0, 1, 1, 0]))


def test_linear_with_extra_leading_dims_mse() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x = torch.randn(4, 2, 3, 3, generator=_seed(1), dtype=torch.float64)
    y = torch.randn(4, 2, 3, 2, generator=_seed(2), dtype=torch.float64)
    compare(model, "mse", x, y)


def test_linear_sequence_trace_by_gram_matrices() -> None:
    # T·(in+out) < in·out: the trace uses ⟨Δ Δᵀ, A Aᵀ⟩ per sample instead of per-sample gradients
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)).double()
    x = torch.randn(4, 2, 8, generator=_seed(1), dtype=torch.float64)
    y = torch.randn(4, 2, 8, generator=_seed(2), dtype=torch.float64)
    compare(model, "mse", x, y)
    compare(model, lambda z, t: (torch.sin(z) * t).mean(), x, y, kinds=("ggn",))  # weighted columns


def test_residual_layernorm() -> None:
    torch.manual_seed(0)
    x, y = _ce_data(d=3)
    compare(ResidualLN().double(), "cross_entropy", x, y)


def test_callable_loss_on_fast_path() -> None:
    x5 = torch.randn(5, 3, 6, 6, generator=_seed(1), dtype=torch.float64)
    y5 = torch.randint(0, 3, (5,), generator=_seed(2))
    compare(cnn(), lambda z, t: F.cross_entropy(z, t), x5, y5, kinds=("ggn",))  # weighted conv columns
    idx = torch.tensor([[1, 2, 2, 0], [3, 3, 3, 3], [0, 0, 5, 6]])
    torch.manual_seed(0)
    compare(
        SeqModel().double(),
        lambda z, t: F.cross_entropy(z, t),
        idx,
        torch.randint(0, 3, (3, 4)),
        kinds=("ggn",),
    )
    x, y = _ce_data()
    yy = torch.randn(6, 3, generator=_seed(4), dtype=torch.float64)
    compare(mlp(), lambda z, t: (torch.sin(z) * t).mean(), x, yy, kinds=("ggn", "empirical"))
    compare(mlp(), lambda z, t: F.cross_entropy(z, t), x, y, kinds=("ggn", "empirical"))


@pytest.mark.parametrize("arch", ["mlp", "cnn", "seq"])
def test_mc_with_stderr_fast_equals_generic(arch: str) -> None:
    if arch == "mlp":
        model, (x, y) = mlp(), _ce_data()
    elif arch == "seq":
        torch.manual_seed(0)
        model = SeqModel().double()
        x = torch.tensor([[1, 2, 2, 0], [3, 3, 3, 3], [0, 0, 5, 6]])
        y = torch.randint(0, 3, (3, 4), generator=_seed(3))
    else:
        model = cnn()
        x = torch.randn(5, 3, 6, 6, generator=_seed(1), dtype=torch.float64)
        y = torch.randint(0, 3, (5,), generator=_seed(2))
    params = _params(model)
    for transform in (fisher_trace, fisher_diagonal):
        a = transform(model, "cross_entropy", kind="mc", num_probes=5, with_stderr=True)
        b = transform(model, "cross_entropy", kind="mc", num_probes=5, with_stderr=True, path="generic")
        (ea, sa), (eb, sb) = a(params, x, y, generator=_seed()), b(params, x, y, generator=_seed())
        torch.testing.assert_close(_flat(ea), _flat(eb), **TOL)
        torch.testing.assert_close(_flat(sa), _flat(sb), **TOL)


# --------------------------------------------------------------------------- fallbacks


class TwiceCalled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.lin(torch.tanh(self.lin(x))))


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.out = nn.Linear(3, 5, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, idx: Tensor) -> Tensor:
        return self.out(torch.tanh(self.emb(idx)))


class RawUse(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.lin(x)) + 0.1 * x @ self.lin.weight.T  # the weight used outside its layer
        return self.head(h)


class Scale(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.s


class TimeMajor(nn.Module):
    """Runs a Linear on (T, N, d): the batch is not dimension 0 there."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 3)

    def forward(self, x: Tensor) -> Tensor:  # x: (N, T, 2) with T != N
        return self.lin(x.transpose(0, 1)).transpose(0, 1).transpose(1, 2)


class Unused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(4, 3)
        self.spare = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.used(x)


def test_unused_layer_gets_zeros() -> None:
    torch.manual_seed(0)
    model, (x, y) = Unused().double(), _ce_data()
    compare(model, "cross_entropy", x, y)
    diag, err = fisher_diagonal(model, "cross_entropy", kind="mc", num_probes=3, with_stderr=True)(
        _params(model), x, y, generator=_seed()
    )
    assert torch.all(diag["spare.weight"] == 0) and torch.all(err["spare.bias"] == 0)
    # the used layer's MC diagonal estimates its GGN diagonal (many draws: within 5 stderr)
    mc, mc_err = fisher_diagonal(model, "cross_entropy", kind="mc", num_probes=400, with_stderr=True)(
        _params(model), x, y, generator=_seed()
    )
    ggn = fisher_diagonal(model, "cross_entropy")(_params(model), x, y)
    for k in ("used.weight", "used.bias"):
        assert ((mc[k] - ggn[k]).abs() < 5 * mc_err[k]).all(), k


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # vmap of weight_norm
@pytest.mark.parametrize(
    ("variant", "expect", "reason"),
    [
        ("weight_norm", "fallback", ""),  # a weight computed from the leaves: per-leaf VJPs (leafvjp)
        ("user_hook", "fast", ""),  # the tape records what the hook does
        ("reflect_padding", "generic", "not along dimension 0"),
        ("scaled_embedding", "generic", "no per-sample rule for the parameter argument"),
    ],
)
def test_layers_the_sweep_cannot_take_go_generic(variant: str, expect: str, reason: str) -> None:
    torch.manual_seed(0)
    if variant == "reflect_padding":
        model = nn.Sequential(
            nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), nn.Flatten(), nn.Linear(32, 3)
        )
        x = torch.randn(4, 2, 4, 4, generator=_seed(1))
    elif variant == "scaled_embedding":
        model = nn.Sequential(nn.Embedding(5, 3, scale_grad_by_freq=True), nn.Flatten(), nn.Linear(6, 3))
        x = torch.tensor([[0, 1], [2, 2], [4, 3], [1, 1]])
    else:
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        x = torch.randn(4, 4, generator=_seed(1))
        if variant == "weight_norm":
            model[0] = torch.nn.utils.parametrizations.weight_norm(model[0])
        else:
            model[0].register_forward_hook(lambda m, i, o: o * 2)
    model = model.double()
    x = x.double() if x.is_floating_point() else x
    fb = expect == "fallback"
    expect = "fast" if fb else expect
    info = compare(model, "cross_entropy", x, torch.tensor([0, 1, 2, 1]), expect=expect, fallback=fb)
    assert set(info["ggn"].fast if expect == "fast" else info["ggn"].generic) == set(_params(model))
    assert reason in info["ggn"].reason, info["ggn"]


def test_module_called_twice_takes_the_sweep() -> None:
    """A weight at two ops: the per-leaf fallback (per-sample VJPs summed, then squared) with
    path='fast'; auto takes the generic route, cheaper there."""
    torch.manual_seed(0)
    info = compare(TwiceCalled().double(), "cross_entropy", *_ce_data(), fallback=True)
    assert set(info["ggn"].fast) == set(_params(TwiceCalled())), info["ggn"]


def test_tied_weights_fall_back() -> None:
    torch.manual_seed(0)
    info = compare(
        Tied().double(),
        "cross_entropy",
        torch.tensor([0, 2, 4, 4]),
        torch.tensor([1, 0, 3, 4]),
        fallback=True,
    )
    assert info["ggn"].fast == ("emb.weight",), info["ggn"]


def test_raw_use_of_a_weight_takes_the_sweep() -> None:
    torch.manual_seed(0)
    info = compare(RawUse().double(), "cross_entropy", *_ce_data(), fallback=True)
    assert set(info["ggn"].fast) == set(_params(RawUse()))


def test_custom_module_takes_the_sweep() -> None:
    """A module of no known layer type: the tape sees its ops (an elementwise scale), so the
    sweep covers it like any other (there is no list of supported layer types)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), Scale(5), nn.Tanh(), nn.Linear(5, 3)).double()
    info = compare(model, "cross_entropy", *_ce_data())
    assert "1.s" in info["empirical"].fast


def test_batch_not_in_dim0_takes_the_sweep() -> None:
    """Samples along dimension 1 inside the model: the Linear becomes a bmm of an expanded
    weight (no interface), covered per leaf by per-sample VJPs (secorder._engine.leafvjp)."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, 2, generator=_seed(1), dtype=torch.float64)
    y = torch.randint(0, 3, (3, 4), generator=_seed(2))
    info = compare(TimeMajor().double(), "cross_entropy", x, y, fallback=True)
    assert set(info["ggn"].fast) == {"lin.weight", "lin.bias"}


def test_inplace_relu_after_layers() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3),
        nn.ReLU(inplace=True),
        nn.Flatten(),
        nn.Linear(12, 4),
        nn.ReLU(inplace=True),
        nn.Linear(4, 3),
    ).double()
    x = torch.randn(5, 2, 4, 4, generator=_seed(1), dtype=torch.float64)
    compare(model, "cross_entropy", x, torch.randint(0, 3, (5,), generator=_seed(2)))


def test_batchnorm_eval_takes_the_sweep_and_train_the_batch_evaluation() -> None:
    """Eval mode: BatchNorm is an affine map per sample (the sweep). Train mode: the sweep's proof
    refuses (naming the op) and the generic route gives the quantities of the batch evaluation,
    J the whole batch's Jacobian, equal to the dense references built from it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = _ce_data()
    with torch.no_grad():
        model(x)  # move the running statistics away from their initial values
    model.eval()
    info = compare(model, "cross_entropy", x, y)
    assert "1.weight" in info["ggn"].fast
    model.train()
    info = compare(model, "cross_entropy", x, y, expect="generic", kinds=("ggn", "empirical"))
    assert "aten.native_batch_norm.default" in info["ggn"].reason, info["ggn"]
    assert model.training
    buffers = {k: b.detach() for k, b in model.named_buffers()}
    z_of, theta = flat_function(
        lambda p: torch.func.functional_call(model, (p, {k: b.clone() for k, b in buffers.items()}), (x,)),
        (_params(model),),
    )
    z = z_of(theta)
    n = z.shape[0]
    jac = torch.autograd.functional.jacobian(z_of, theta).reshape(n, -1, theta.numel())
    hz = torch.autograd.functional.hessian(
        lambda zf: F.cross_entropy(zf.reshape(z.shape), y), z.detach().reshape(-1)
    )
    jf = jac.reshape(-1, theta.numel())
    g = torch.autograd.functional.jacobian(lambda zz: F.cross_entropy(zz, y, reduction="sum"), z.detach())
    per = torch.einsum("nop,no->np", jac, g)  # J_nᵀ ∇_{z_n} l_n
    want = {"ggn": (jf.T @ hz @ jf).diagonal(), "empirical": (per**2).sum(0) / n}
    for kind in ("ggn", "empirical"):
        got = fisher_diagonal(model, "cross_entropy", kind=kind)(_params(model), x, y)
        torch.testing.assert_close(_flat(got), want[kind], **TOL)
    est, err = fisher_trace(model, "cross_entropy", num_probes=300, with_stderr=True)(
        _params(model), x, y, generator=_seed()
    )
    assert abs(float(est - want["ggn"].sum())) < 5 * float(err), (float(est), float(err))


def test_module_returning_a_tuple_is_refused() -> None:
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            return self.lin(x), x

    model = Pair().double()
    with pytest.raises(TypeError, match="model_fn must return a tensor"):
        fisher_trace(model, "cross_entropy")(_params(model), *_ce_data())


def test_dropout_in_train_mode_is_refused() -> None:
    model = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.5), nn.Linear(5, 3)).double()
    with pytest.raises(ValueError, match=r"Dropout\(p=0\.5\) in train mode at '1'"):
        fisher_trace(model, "cross_entropy", num_probes=2)(_params(model), *_ce_data())
    model.eval()
    compare(model, "cross_entropy", *_ce_data(), kinds=("ggn",))


# --------------------------------------------------------------------------- contracts


def test_model_is_not_mutated() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(inplace=True), nn.Linear(5, 3)).double()
    model.eval()
    before = copy.deepcopy(model.state_dict())
    flags = [m.training for m in model.modules()]
    x, y = _ce_data()
    for kind, probes in (("ggn", None), ("empirical", None), ("mc", 2), ("ggn", 3)):
        fisher_diagonal(model, "cross_entropy", kind=kind, num_probes=probes)(
            dict(model.named_parameters()), x, y, generator=_seed()
        )
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert flags == [m.training for m in model.modules()]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_differentiable_when_parameters_require_grad() -> None:
    """Parameters that require grad: the generic route (the sweep is not differentiable), with
    the reason; the value equals the sweep's and its gradient matches central differences."""
    model, (x, y) = mlp(), _ce_data()
    base = _params(model)
    direction = {k: torch.randn(v.shape, generator=_seed(3), dtype=v.dtype) for k, v in base.items()}
    for kind in ("ggn", "empirical"):
        params = {k: v.clone().requires_grad_(True) for k, v in base.items()}
        fn = fisher_trace(model, "cross_entropy", kind=kind)
        out = fn(params, x, y)
        assert fn.path_info.path == "generic" and "require grad" in fn.path_info.reason
        with pytest.raises(ValueError, match=r"path='fast' runs the structured sweep.*require grad"):
            fisher_trace(model, "cross_entropy", kind=kind, path="fast")(params, x, y)
        torch.testing.assert_close(out.detach(), fn(base, x, y), **TOL)
        assert fn.path_info.path == "fast"
        grads = torch.autograd.grad(out, list(params.values()))
        slope = sum(float((g * direction[k]).sum()) for g, k in zip(grads, params))
        h = 1e-5
        plus = fn({k: v + h * direction[k] for k, v in base.items()}, x, y)
        minus = fn({k: v - h * direction[k] for k, v in base.items()}, x, y)
        assert abs(slope - float(plus - minus) / (2 * h)) < 1e-6 * (1 + abs(slope)), kind


def test_partial_params_dict() -> None:
    model, (x, y) = mlp(), _ce_data()
    sub = {"2.weight": model[2].weight.detach()}
    # a dict missing keys is refused (it would silently use the live parameters) ...
    with pytest.raises(ValueError, match=r"missing keys \['0.bias', '0.weight', '2.bias'\]"):
        fisher_diagonal(model, "cross_entropy")(sub, x, y)
    # ... a subset is chosen by freezing the other parameters
    for name, p in model.named_parameters():
        p.requires_grad_(name == "2.weight")
    a = fisher_diagonal(model, "cross_entropy")(sub, x, y)
    b = fisher_diagonal(model, "cross_entropy", path="generic")(sub, x, y)
    torch.testing.assert_close(a["2.weight"], b["2.weight"], **TOL)


def test_float32(dtype: torch.dtype) -> None:
    model, (x, y) = mlp().to(dtype), _ce_data()
    x = x.to(dtype)
    params = _params(model)
    a = fisher_diagonal(model, "cross_entropy")(params, x, y)
    b = fisher_diagonal(model, "cross_entropy", path="generic")(params, x, y)
    for k in a:
        assert a[k].dtype == dtype
        torch.testing.assert_close(a[k], b[k], **tol(dtype))


def test_auto_switches_to_generic_under_vmap_and_fast_refuses() -> None:
    models = [mlp()]
    models.append(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double())  # another init
    stacked, _ = torch.func.stack_module_state(models)
    x, y = _ce_data()
    fn = fisher_trace(models[0], "cross_entropy", kind="empirical")
    batched = torch.func.vmap(fn, in_dims=(0, None, None))(stacked, x, y)
    assert fn.path_info.path == "generic" and "torch.func transform" in fn.path_info.reason
    loop = torch.stack([fn(_params(m), x, y) for m in models])
    assert (loop[0] - loop[1]).abs() > 1e-3 * loop.abs().max()  # a mix-up of members would show
    torch.testing.assert_close(batched, loop, **TOL)
    fast = fisher_trace(models[0], "cross_entropy", kind="empirical", path="fast")
    with pytest.raises(RuntimeError, match=r"path='fast' runs the structured sweep.*torch.func transform"):
        torch.func.vmap(fast, in_dims=(0, None, None))(stacked, x, y)


def test_chunked_samples_in_fast_products() -> None:
    from secorder import set_memory_budget
    from secorder._chunking import memory_budget

    x = torch.randn(5, 3, 6, 6, generator=_seed(1), dtype=torch.float64)
    y = torch.randint(0, 3, (5,), generator=_seed(2))
    model = cnn()
    want = fisher_diagonal(model, "cross_entropy")(_params(model), x, y)
    old = memory_budget()
    set_memory_budget(1)  # forces one sample per chunk in the per-sample products
    try:
        got = fisher_diagonal(model, "cross_entropy")(_params(model), x, y)
    finally:
        set_memory_budget(old)
    torch.testing.assert_close(_flat(got), _flat(want), **TOL)


# --------------------------------------------------------------------------- walk internals


def _linear_params(g: torch.Generator) -> dict[str, Tensor]:
    def r(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64) / 2

    return {
        "w1": r(5, 4), "b1": r(5), "w2": r(5, 6), "b2": r(1, 6), "w3": r(3, 6), "b3": r(1), "w4": r(3, 3),
        "s": r(3),
    }  # fmt: skip


def _linear_fn(p: dict[str, Tensor], x: Tensor) -> Tensor:
    h = torch.tanh(F.linear(x, p["w1"], p["b1"]))  # t + addmm: the deferred squares
    h = torch.relu(torch.addmm(p["b2"], h, p["w2"]))  # weight not transposed, bias (1, m)
    h = torch.addmm(p["b3"], h, p["w3"].t(), beta=0.5, alpha=2.0)  # keyword scalars, a (1,) bias
    return (h @ p["w4"]) * p["s"]  # mm without bias, an elementwise scale


@pytest.mark.parametrize("chunk_size", [None, 1], ids=["one_chunk", "column_chunks"])
@pytest.mark.parametrize("kind", ["ggn", "empirical"])
def test_linear_traces_without_products_equal_the_diagonal_sums(kind: str, chunk_size: int | None) -> None:
    """The sweep's trace mode (per-leaf sums; Σ_n ‖x_n‖² Σ_j (Σ_c w_c δ_c²)_nj at mm/addmm layers
    instead of a product with x^⊙2) equals the sum of its diagonal and the generic route's trace."""
    x, y = _ce_data(n=7, d=4, c=3)
    params = _linear_params(_seed(3))
    fast = fisher_trace(_linear_fn, "cross_entropy", kind=kind, path="fast", chunk_size=chunk_size)
    got = fast(params, x, y)
    assert fast.path_info.path == "fast"
    diag = fisher_diagonal(_linear_fn, "cross_entropy", kind=kind, path="fast")(params, x, y)
    generic = fisher_trace(_linear_fn, "cross_entropy", kind=kind, path="generic")(params, x, y)
    torch.testing.assert_close(got, _flat(diag).sum(), **TOL)
    torch.testing.assert_close(got, generic, **TOL)


class ReluBranches(nn.Module):
    """ReLU columns the walk overwrites in place next to values with two consumers: the
    pre-activation feeds a ReLU and a skip layer, a ReLU output feeds two layers, and the model
    ends in a ReLU (the loss node's own columns, which the walk must not overwrite)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.lin1 = nn.Linear(3 * 4 * 4, 5)
        self.skip = nn.Linear(3 * 4 * 4, 5)
        self.lin2 = nn.Linear(5, 4)
        self.lin3 = nn.Linear(5, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.conv(x)).flatten(1)
        a = torch.relu(self.lin1(h))
        return torch.relu(self.lin2(a) + self.lin3(a) + self.lin2(torch.tanh(self.skip(h)))) + 0.1


def test_inplace_walk_with_shared_values_equals_generic() -> None:
    torch.manual_seed(0)
    model = ReluBranches().double()
    x = torch.randn(6, 2, 4, 4, generator=_seed(4), dtype=torch.float64)
    y = torch.randint(0, 4, (6,), generator=_seed(5))
    compare(model, "cross_entropy", x, y, kinds=("ggn", "empirical"), fallback=True)
