"""The structured sweep on a tape of the whole batch (secorder._engine.batch / .sweep).

Every result against dense float64 Hessians (secorder.testing.dense_hessian); the batch-axis
proof's accept and refuse lists (each refusal names the op); the public wiring of
``hessian_diagonal(f)`` / ``hessian_trace(f)`` (``exact="auto"``, ``"sweep"``, ``"hvp"``,
``method_info``) and of ``fisher_trace`` / ``fisher_diagonal`` for a plain ``model_fn``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import secorder
from secorder._engine import sweep
from secorder._engine.batch import BatchAxisError, analyze
from secorder._engine.sweep import EngineUnsupportedError, engine_diagonal
from secorder._engine.tape import record
from secorder._pytree import flatten, unflatten, unravel
from secorder.testing import dense_hessian

DT = torch.float64


def _params(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in model.named_parameters()}


def _dense_diag(f: Callable[..., Tensor], params: dict[str, Tensor], *args: Any) -> dict[str, Tensor]:
    diag = dense_hessian(lambda p: f(p, *args), params).diagonal()
    leaves, spec = flatten(params)  # dense_hessian's flat order
    return unflatten(spec, unravel(diag, [leaf.shape for leaf in leaves]))  # type: ignore[no-any-return]


def _check(f: Callable[..., Tensor], params: dict[str, Tensor], *args: Any, method: str = "sweep") -> Any:
    fn = secorder.hessian_diagonal(f)
    got = fn(params, *args)
    assert fn.method_info.method == method, fn.method_info
    ref = _dense_diag(f, params, *args)
    for k in params:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-9, atol=1e-12)
    tr = secorder.hessian_trace(f)
    torch.testing.assert_close(tr(params, *args), sum(r.sum() for r in ref.values()), rtol=1e-9, atol=1e-12)
    assert tr.method_info.method == method
    return fn.method_info


def _check_sweep(f: Callable[..., Tensor], params: dict[str, Tensor], *args: Any) -> Any:
    """exact="sweep" forced (whatever the cost model prefers) against the dense diagonal."""
    fn = secorder.hessian_diagonal(f, exact="sweep")
    got = fn(params, *args)
    ref = _dense_diag(f, params, *args)
    for k in params:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-9, atol=1e-12)
    return fn.method_info


class Seq(nn.Module):
    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _mlp(act: type[nn.Module] = nn.Tanh, widths: tuple[int, ...] = (5, 6, 6, 3), seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), act()]
    return Seq(*layers[:-1]).to(DT)


def _ce(model: nn.Module, **kw: Any) -> Callable[..., Tensor]:
    return lambda p, x, y: F.cross_entropy(functional_call(model, p, (x,)), y, **kw)


@pytest.mark.parametrize(
    "act", [nn.Tanh, nn.Sigmoid, nn.GELU, nn.Softplus, nn.ReLU, nn.SiLU], ids=lambda a: a.__name__
)
def test_mlp_exact(act: type[nn.Module]) -> None:
    model = _mlp(act)
    x, y = torch.randn(7, 5, dtype=DT), torch.randint(0, 3, (7,))
    info = _check(_ce(model), _params(model), x, y)
    assert info.num_params == sum(p.numel() for p in model.parameters())


def test_deep_mlp_explicit_columns() -> None:
    """Four layers: a pointwise group's columns reach two interfaces behind its own (explicit walk)."""
    model = _mlp(nn.Tanh, (4, 5, 5, 5, 3))
    x, y = torch.randn(6, 4, dtype=DT), torch.randint(0, 3, (6,))
    info = _check(_ce(model), _params(model), x, y)
    assert info.num_columns == 5 + 5 + 5 + 2  # three tanh layers, cross-entropy C - 1
    model = _mlp(nn.Sigmoid, (4, 5, 3, 6, 5, 3), seed=4)  # five layers, widths changing
    x, y = torch.randn(7, 4, dtype=DT), torch.randint(0, 3, (7,))
    _check(_ce(model), _params(model), x, y)


def test_cnn_exact() -> None:
    torch.manual_seed(1)
    model = Seq(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2),
        nn.Tanh(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 3),
    ).to(DT)
    x, y = torch.randn(5, 3, 8, 8, dtype=DT), torch.randint(0, 3, (5,))
    _check(_ce(model), _params(model), x, y)


def test_max_pool_padded_exact() -> None:
    """The column-batched max-pool VJP (a scatter by the recorded indices), padding and overlap."""
    torch.manual_seed(5)
    model = Seq(
        nn.Conv2d(2, 3, 3), nn.Tanh(), nn.MaxPool2d(3, stride=2, padding=1), nn.Flatten(), nn.Linear(27, 3)
    ).to(DT)
    x, y = torch.randn(4, 2, 8, 8, dtype=DT), torch.randint(0, 3, (4,))
    _check(_ce(model), _params(model), x, y)


def test_conv1d_strided_exact() -> None:
    torch.manual_seed(2)
    model = Seq(nn.Conv1d(2, 3, 3, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(9, 2)).to(DT)
    x, y = torch.randn(4, 2, 8, dtype=DT), torch.randint(0, 2, (4,))
    _check(_ce(model), _params(model), x, y)


def test_weighted_losses_exact() -> None:
    """Adjoints come from the batch loss: class weights, per-sample weights, a regularizer."""
    model = _mlp(nn.Tanh, (4, 5, 3))
    p = _params(model)
    x, y = torch.randn(8, 4, dtype=DT), torch.randint(0, 3, (8,))
    cw, sw = torch.rand(3, dtype=DT) + 0.1, torch.rand(8, dtype=DT)
    _check(_ce(model, weight=cw), p, x, y)
    _check(
        lambda q, x, y, s: (F.cross_entropy(functional_call(model, q, (x,)), y, reduction="none") * s).sum(),
        p,
        x,
        y,
        sw,
    )
    reg = lambda q, x, y: _ce(model)(q, x, y) + 0.3 * sum((v**4).sum() for v in q.values())
    _check(reg, p, x, y)


def test_regression_losses_exact() -> None:
    model = _mlp(nn.Tanh, (4, 5, 2))
    p = _params(model)
    x, t = torch.randn(6, 4, dtype=DT), torch.randn(6, 2, dtype=DT)
    _check(lambda q, x, t: F.mse_loss(functional_call(model, q, (x,)), t), p, x, t)
    _check(lambda q, x, t: ((functional_call(model, q, (x,)) - t) ** 2).sum(1).mean(), p, x, t)
    _check(
        lambda q, x, t: F.binary_cross_entropy_with_logits(functional_call(model, q, (x,)), t.sigmoid()),
        p,
        x,
        t,
    )
    _check(lambda q, x, t: (functional_call(model, q, (x,)).softmax(-1) * t).sum(), p, x, t)


def test_positions_per_sample_exact() -> None:
    """(N, T, d) → (N·T, d) reshapes: the sample axis with a group of T rows per sample."""
    torch.manual_seed(3)
    lin, head = nn.Linear(4, 5, bias=False).to(DT), nn.Linear(5, 3, bias=False).to(DT)
    p = {"a": lin.weight.detach(), "b": head.weight.detach()}

    def f(q: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        h = torch.tanh(x @ q["a"].T)  # (N, T, 5)
        logits = torch.log_softmax(h @ q["b"].T, -1)  # (N, T, 3): softmax rows per position
        return -(logits.gather(-1, y[..., None])).mean()

    x, y = torch.randn(4, 3, 4, dtype=DT), torch.randint(0, 3, (4, 3))
    _check(f, p, x, y)


# -- the batch-axis proof: accepted and refused programs ----------------------------------------


def _analyze(f: Callable[..., Tensor], w: Tensor, *data: Tensor) -> Any:
    tape = record(lambda ls: f(ls[0], *data), [w])
    assert tape.values is not None
    return analyze(tape, tape.values, list(data), int(data[0].shape[0]))


W = torch.randn(4, 4, dtype=DT)
X = torch.randn(6, 4, dtype=DT)

ACCEPT: dict[str, Callable[..., Tensor]] = {
    "mean": lambda w, x: torch.tanh(x @ w).pow(2).mean(),
    "reshape_positions": lambda w, x: torch.tanh(x.reshape(6, 2, 2).reshape(12, 2) @ w[:2]).sum(),
    "permute": lambda w, x: (x @ w).T.tanh().sum(),
    "cat_features": lambda w, x: torch.cat([x @ w, x], 1).tanh().sum(),
    "stack": lambda w, x: torch.stack([x @ w, x], 2).tanh().sum(),
    "regularizer": lambda w, x: (x @ w).tanh().mean() + (w**2).sum(),
    "log_of_parameter_only": lambda w, x: (x @ w).sum() * 2.0 + torch.log((w**2).sum()),
    "data_centered_by_batch_mean": lambda w, x: torch.tanh((x - x.mean(0)) @ w).sum(),
    "softmax_features": lambda w, x: (x @ w).softmax(1).pow(2).sum(),
    # heads split off a permuted value: unbind(0) drops the dimension before the samples' one
    "unbind_heads": lambda w, x: (
        (x @ w).reshape(6, 2, 2).permute(1, 0, 2).unbind(0)[0].softmax(1).pow(2).sum()
    ),
}

REFUSE: dict[str, tuple[Callable[..., Tensor], str]] = {
    "centering": (
        lambda w, x: ((x @ w) - (x @ w).mean(0)).pow(2).sum(),
        r"aten\.sub\.Tensor.*sum over samples",
    ),
    "gram": (lambda w, x: ((x @ w) @ (x @ w).T).tanh().sum(), r"aten\.mm\.default"),
    "batch_max": (lambda w, x: (x @ w).amax(0).sum(), r"aten\.amax\.default.*nonlinearly"),
    "log_of_mean_loss": (lambda w, x: torch.log((x @ w).pow(2).mean()), r"aten\.log\.default.*after the sum"),
    "softmax_over_samples": (lambda w, x: (x @ w).softmax(0).pow(2).sum(), r"_softmax.*over the sample axis"),
    "mixing_matrix": (
        lambda w, x: (torch.ones(6, 6, dtype=DT) @ (x @ w)).tanh().sum(),
        r"aten\.mm\.default.*contracts",
    ),
    "norm_over_samples": (
        lambda w, x: (x @ w).norm(dim=0).sum(),
        r"linalg_vector_norm.*over the sample axis",
    ),
    "select_sample": (lambda w, x: (x @ w)[0].tanh().sum(), r"aten\.select\.int.*picks samples"),
    "unbind_then_softmax_over_samples": (
        lambda w, x: (x @ w).reshape(6, 2, 2).permute(1, 0, 2).unbind(0)[0].softmax(0).pow(2).sum(),
        r"_softmax.*over the sample axis",
    ),
}


@pytest.mark.parametrize("name", list(ACCEPT))
def test_proof_accepts(name: str) -> None:
    _analyze(ACCEPT[name], W, X)


@pytest.mark.parametrize("name", list(REFUSE))
def test_proof_refuses_naming_the_op(name: str) -> None:
    f, pattern = REFUSE[name]
    with pytest.raises(BatchAxisError, match=pattern) as info:
        _analyze(f, W, X)
    assert "tape position" in str(info.value)


@pytest.mark.parametrize("name", list(ACCEPT))
def test_accepted_programs_exact(name: str) -> None:
    f = ACCEPT[name]
    (d,), _ = engine_diagonal(lambda ls: f(ls[0], X), [W], [X])
    torch.testing.assert_close(d, dense_hessian(lambda w: f(w, X), W).diagonal().reshape(W.shape))


def test_train_batch_norm_refused() -> None:
    torch.manual_seed(0)
    model = Seq(nn.Linear(4, 5), nn.BatchNorm1d(5, track_running_stats=False), nn.Tanh(), nn.Linear(5, 3)).to(
        DT
    )
    x, y = torch.randn(6, 4, dtype=DT), torch.randint(0, 3, (6,))
    f = _ce(model)
    p = _params(model)
    names = list(p)
    with pytest.raises(EngineUnsupportedError, match=r"batch_norm.*training mode"):
        engine_diagonal(lambda ls: f(dict(zip(names, ls)), x, y), list(p.values()), [x, y])
    fn = secorder.hessian_diagonal(f)
    got = fn(p, x, y)  # auto: one-hot HVPs, with the reason
    assert fn.method_info.method == "hvp" and "training mode" in fn.method_info.reason
    ref = _dense_diag(f, p, x, y)
    for k in p:
        torch.testing.assert_close(got[k], ref[k])


# -- the public wiring ------------------------------------------------------------------------


def test_auto_falls_back_with_reasons() -> None:
    model = _mlp(nn.Tanh, (3, 4, 2))
    p, f = _params(model), _ce(model)
    x, y = torch.randn(5, 3, dtype=DT), torch.randint(0, 2, (5,))
    fn = secorder.hessian_diagonal(f)
    stacked = {k: torch.stack([v, v + 0.1]) for k, v in p.items()}
    out = torch.func.vmap(fn, in_dims=(0, None, None))(stacked, x, y)
    assert fn.method_info.method == "hvp" and "torch.func" in fn.method_info.reason
    one = secorder.hessian_diagonal(f)({k: v[1] for k, v in stacked.items()}, x, y)
    for k in p:
        torch.testing.assert_close(out[k][1], one[k])
    # parameters that require grad: one-hot HVPs keep the graph (never a detached value)
    q = {k: v.clone().requires_grad_(True) for k, v in p.items()}
    d = fn(q, x, y)
    assert fn.method_info.method == "hvp" and "require grad" in fn.method_info.reason
    assert d["net.0.weight"].grad_fn is not None
    with pytest.raises(ValueError, match=r"exact='sweep' returns values without a gradient.*exact='auto'"):
        secorder.hessian_diagonal(f, exact="sweep")(q, x, y)
    fn_h = secorder.hessian_diagonal(f, exact="hvp")
    fn_h(p, x, y)
    assert fn_h.method_info.method == "hvp" and fn_h.method_info.reason == "exact='hvp' requested"
    fn_s = secorder.hessian_diagonal(lambda q, s: (q["net.0.weight"] ** 3).sum() * s, exact="auto")
    fn_s(p, 2.0)
    assert "batched along dimension 0" in fn_s.method_info.reason


def test_auto_cost_model_prefers_hvps_when_columns_exceed_parameters() -> None:
    w = torch.randn(1, 40, dtype=DT)
    x = torch.randn(3, 1, dtype=DT)
    # two groups of 40 columns (the transpose keeps the tanh pair from being one pointwise region)
    f = lambda w, x: torch.tanh(torch.tanh(x @ w).T).sum()
    fn = secorder.hessian_diagonal(f)
    got = fn(w, x)
    assert fn.method_info.method == "hvp" and "R=80" in fn.method_info.reason
    forced = secorder.hessian_diagonal(f, exact="sweep")
    torch.testing.assert_close(forced(w, x), got)
    assert forced.method_info.method == "sweep" and forced.method_info.num_columns == 80
    torch.testing.assert_close(got, dense_hessian(lambda v: f(v, x), w).diagonal().reshape(w.shape))


def test_rnn_keeps_working() -> None:
    torch.manual_seed(0)
    rnn, head = nn.RNN(3, 4, batch_first=True).to(DT), nn.Linear(4, 2).to(DT)
    mods = nn.ModuleDict({"rnn": rnn, "head": head})
    p = _params(mods)

    def f(q: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out, _ = functional_call(mods["rnn"], {k[4:]: v for k, v in q.items() if k.startswith("rnn.")}, (x,))
        logits = functional_call(
            mods["head"], {k[5:]: v for k, v in q.items() if k.startswith("head.")}, (out[:, -1],)
        )
        return F.cross_entropy(logits, y)

    x, y = torch.randn(4, 3, 3, dtype=DT), torch.randint(0, 2, (4,))
    fn = secorder.hessian_diagonal(f)
    got = fn(p, x, y)
    ref = _dense_diag(f, p, x, y)
    for k in p:
        torch.testing.assert_close(got[k], ref[k])


@pytest.mark.parametrize("kind", ["ggn", "empirical"])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "bce_with_logits"])
def test_fisher_plain_model_fn_through_engine(kind: str, loss: str) -> None:
    model = Seq(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)).to(DT)
    p = _params(model)
    model_fn = lambda q, x: functional_call(model, q, (x,))
    x = torch.randn(5, 2, 6, dtype=DT)
    y = torch.randint(0, 3, (5,)) if loss == "cross_entropy" else torch.rand(5, 3, dtype=DT)
    for make in (secorder.fisher_diagonal, secorder.fisher_trace):
        fast = make(model_fn, loss, kind=kind)
        generic = make(model_fn, loss, kind=kind, path="generic")
        a, b = fast(p, x, y), generic(p, x, y)
        assert fast.path_info.path == "fast" and generic.path_info.path == "generic"
        if isinstance(a, dict):
            for k in a:
                torch.testing.assert_close(a[k], b[k])
        else:
            torch.testing.assert_close(a, b)


# -- property test: random MLPs and losses against dense Hessians -------------------------------


@settings(max_examples=15, deadline=None)
@given(
    widths=st.lists(st.integers(1, 5), min_size=2, max_size=4),
    act=st.sampled_from([nn.Tanh, nn.Sigmoid, nn.GELU, nn.ELU]),
    loss=st.sampled_from(["ce", "mse", "sum_ce"]),
    n=st.integers(1, 5),
    seed=st.integers(0, 1000),
)
def test_random_mlps_exact(widths: list[int], act: type[nn.Module], loss: str, n: int, seed: int) -> None:
    widths = [3, *widths, 3]
    model = _mlp(act, tuple(widths), seed)
    p = _params(model)
    torch.manual_seed(seed)
    x = torch.randn(n, 3, dtype=DT)
    if loss == "mse":
        t = torch.randn(n, 3, dtype=DT)
        f = lambda q, x, t: F.mse_loss(functional_call(model, q, (x,)), t)
    else:
        t = torch.randint(0, 3, (n,))
        f = _ce(model, reduction="sum" if loss == "sum_ce" else "mean")
    fn = secorder.hessian_diagonal(f)
    got = fn(p, x, t)
    ref = _dense_diag(f, p, x, t)
    for k in p:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-8, atol=1e-11)


def test_closure_captured_inputs_exact() -> None:
    """Inputs captured by the closure are constants to the proof (the same for every sample):
    the values computed from them are one block, still exact."""
    model = _mlp(nn.Tanh, (3, 4, 2))
    p = _params(model)
    xc, y = torch.randn(4, 3, dtype=DT), torch.randint(0, 2, (4,))
    f = lambda q, y: F.cross_entropy(functional_call(model, q, (xc,)), y)
    d = secorder.hessian_diagonal(f, exact="sweep")(p, y)
    ref = _dense_diag(f, p, y)
    for k in p:
        torch.testing.assert_close(d[k], ref[k])


class _Block(nn.Module):
    """Transformer block without biases or norm affines: LayerNorm rows, two-head causal
    attention (bmm of two parameter-dependent operands, (N·heads) batch matrices per batch),
    GELU MLP, residuals, mean pooling, linear head."""

    def __init__(self, d: int = 6, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.emb = nn.Linear(5, d, bias=False)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.fc, self.pr = nn.Linear(d, 2 * d, bias=False), nn.Linear(2 * d, d, bias=False)
        self.head = nn.Linear(d, 3, bias=False)
        self.ln1 = nn.LayerNorm(d, elementwise_affine=False)
        self.ln2 = nn.LayerNorm(d, elementwise_affine=False)

    def forward(self, x: Tensor) -> Tensor:
        n, t, _ = x.shape
        h = self.emb(x)
        q, k, v = self.qkv(self.ln1(h)).chunk(3, dim=-1)

        def split(z: Tensor) -> Tensor:
            return z.reshape(n, t, self.heads, -1).transpose(1, 2).reshape(n * self.heads, t, -1)

        q, k, v = split(q), split(k), split(v)
        att = torch.bmm(q, k.transpose(1, 2)) / q.shape[-1] ** 0.5
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool), 1)
        att = att.masked_fill(mask, float("-inf")).softmax(-1)
        o = torch.bmm(att, v).reshape(n, self.heads, t, -1).transpose(1, 2).reshape(n, t, -1)
        h = h + o
        h = h + self.pr(F.gelu(self.fc(self.ln2(h))))
        return self.head(h.mean(1))


def test_transformer_block_exact() -> None:
    """LayerNorm rows, closed-form bilinear columns of attention products, dense columns of the
    rest, (N, T, d) → (N·T, d) and (N·heads) layouts: exact against the dense Hessian."""
    torch.manual_seed(7)
    model = _Block().to(DT)
    x, y = torch.randn(4, 4, 5, dtype=DT), torch.randint(0, 3, (4,))
    _check(_ce(model), _params(model), x, y)


def test_tied_weights_fall_back_with_reason() -> None:
    """A weight meeting data it also computed, on the LEFT of the product (w @ h(w)ᵀ): the mm's
    local Hessian couples a parameter-only and a per-sample argument in a layout no curvature
    rule covers yet: one-hot HVPs, saying why."""
    torch.manual_seed(8)
    w = torch.randn(4, 4, dtype=DT)
    f = lambda w, x: torch.tanh(w @ torch.tanh(x @ w).T).sum()
    x = torch.randn(5, 4, dtype=DT)
    fn = secorder.hessian_diagonal(f)
    got = fn(w, x)
    assert fn.method_info.method == "hvp" and "parameter-only and per-sample" in fn.method_info.reason
    torch.testing.assert_close(got, dense_hessian(lambda v: f(v, x), w).diagonal().reshape(4, 4))


@pytest.mark.parametrize("bias", [False, True], ids=["mm", "addmm"])
def test_tied_weights_cross_columns_exact(bias: bool) -> None:
    """h(w) @ wᵀ (+ b), the layout of a tied LM head: closed-form cross columns whose
    parameter-only part enters the per-leaf fallback's per-sample gradients (one row and
    several rows per sample)."""
    torch.manual_seed(8)
    p = {"w": torch.randn(4, 4, dtype=DT), "b": torch.randn(4, dtype=DT)}
    f = lambda q, x: torch.tanh(F.linear(torch.tanh(x @ q["w"]), q["w"], q["b"] if bias else None)).sum()
    _check_sweep(f, p, torch.randn(5, 4, dtype=DT))
    emb = {"emb": torch.randn(6, 3, dtype=DT), "w1": torch.randn(3, 3, dtype=DT)}

    def lm(q: dict[str, Tensor], ids: Tensor, y: Tensor) -> Tensor:
        h = torch.tanh(F.embedding(ids, q["emb"]) @ q["w1"])  # (N, T, d)
        logits = F.linear(h, q["emb"], q["w1"][0].repeat(2) if bias else None)  # (N, T, V), tied
        return F.cross_entropy(logits.transpose(1, 2), y)

    _check_sweep(lm, emb, torch.randint(0, 6, (3, 4)), torch.randint(0, 6, (3, 4)))


def test_vector_norm_rows_with_zero_rows_exact() -> None:
    """Row-wise vector norms: per-row local Hessians; rows whose adjoint is zero (here rows that
    ReLU zeroed, where the norm's second derivative is unbounded) contribute exactly zero."""
    torch.manual_seed(9)
    p = {"a": torch.randn(4, 4, dtype=DT), "b": torch.randn(4, 4, dtype=DT)}
    x = torch.randn(6, 4, dtype=DT)

    def f(p: dict[str, Tensor], x: Tensor) -> Tensor:
        h = torch.relu(x @ p["a"] - 1.5)
        g = torch.tanh(x @ p["b"])
        return (h * h.norm(dim=1, keepdim=True)).sum() + g.norm(dim=-1).pow(3).mean()

    _check(f, p, x)


class _TokenBlock(nn.Module):
    """The benchmark's transformer block (benchmarks/bench_engine_models.py) at test size: token
    and position embeddings, pre-LayerNorm (affine) causal two-head attention with biases, GELU
    MLP, residuals, final LayerNorm, mean pooling, linear head."""

    def __init__(self, vocab: int = 11, t: int = 5, d: int = 6, heads: int = 2, classes: int = 3) -> None:
        super().__init__()
        self.heads = heads
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.1 * torch.randn(t, d))
        self.ln1, self.ln2, self.lnf = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.head = nn.Linear(d, classes)
        with torch.no_grad():  # affine parameters away from their initial ones and zeros
            for ln in (self.ln1, self.ln2, self.lnf):
                ln.weight.add_(0.3 * torch.randn(d))
                ln.bias.add_(0.3 * torch.randn(d))

    def forward(self, idx: Tensor) -> Tensor:
        n, t = idx.shape
        h = self.emb(idx) + self.pos
        q, k, v = self.qkv(self.ln1(h)).chunk(3, dim=-1)

        def split(z: Tensor) -> Tensor:
            return z.reshape(n, t, self.heads, -1).transpose(1, 2)

        q, k, v = split(q), split(k), split(v)
        att = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool), 1)
        att = att.masked_fill(mask, float("-inf")).softmax(-1)
        h = h + self.proj((att @ v).transpose(1, 2).reshape(n, t, -1))
        h = h + self.out(F.gelu(self.fc(self.ln2(h))))
        return self.head(self.lnf(h).mean(1))


def _spy_row_cuts(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Record the cuts the row packing finds (None entries: no packing for that group)."""
    from secorder._engine import sweep

    cuts: list[Any] = []
    real = sweep._row_cut

    def spy(*a: Any) -> Any:
        out = real(*a)
        cuts.append(out)
        return out

    monkeypatch.setattr(sweep, "_row_cut", spy)
    return cuts


def test_token_transformer_block_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    """Embedding + position parameter, affine LayerNorms (closed-form columns), attention and a
    GELU MLP whose one-row columns are walked packed over rows and compressed at the residual
    stream, the ± column pairs of q kᵀ skipping the qkv squares (they cancel): exact against
    the dense float64 Hessian, with the packing and the skip taken."""
    from secorder._engine import sweep

    cuts = _spy_row_cuts(monkeypatch)
    skips: list[frozenset[int]] = []
    real = sweep._pair_cancels
    monkeypatch.setattr(sweep, "_pair_cancels", lambda *a: skips.append(real(*a)) or skips[-1])
    torch.manual_seed(11)
    model = _TokenBlock().to(DT)
    idx, y = torch.randint(0, 11, (4, 5)), torch.randint(0, 3, (4,))
    _check(_ce(model), _params(model), idx, y)
    assert any(c is not None and c[0] is not None for c in cuts)  # compressed at a cut
    assert any(c is not None and c[0] is None for c in cuts)  # ln1: served by interfaces alone
    assert sorted(len(s) for s in skips) == [0, 0, 1, 1]  # q kᵀ skips the qkv squares (twice: diag, trace)


@pytest.mark.parametrize("affine", [True, False])
def test_residual_layer_norm_mlp_exact(affine: bool) -> None:
    """Pre-LayerNorm residual MLP (one row per sample): closed-form LayerNorm columns, the one-hot
    part transported in closed form through the first Linear; a constant input row (x̂ = 0)."""
    torch.manual_seed(12)

    class Res(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(5, 6)
            self.ln = nn.LayerNorm(6, elementwise_affine=affine)
            self.fc, self.out = nn.Linear(6, 6), nn.Linear(6, 6)
            self.lnf = nn.LayerNorm(6, elementwise_affine=affine)
            self.head = nn.Linear(6, 3)

        def forward(self, x: Tensor) -> Tensor:
            h = self.inp(x)
            h = h + self.out(torch.tanh(self.fc(self.ln(h))))
            return self.head(self.lnf(h))

    model = Res().to(DT)
    if affine:
        with torch.no_grad():
            model.ln.weight.add_(0.5 * torch.randn(6, dtype=DT))
            model.lnf.bias.add_(0.5 * torch.randn(6, dtype=DT))
    x, y = torch.randn(6, 5, dtype=DT), torch.randint(0, 3, (6,))
    _check(_ce(model), _params(model), x, y)


def test_layer_norm_rows_sequence_exact() -> None:
    """LayerNorm over (N, T, d) rows with a per-sample weighted loss, a constant row (x̂ = 0, only
    ε in the variance) and rows with zero adjoint (masked out): packed rows, exact."""
    torch.manual_seed(13)
    p = {"w": torch.randn(12, 16, dtype=DT), "g": torch.randn(16, dtype=DT), "b": torch.randn(16, dtype=DT)}
    x = torch.randn(3, 4, 12, dtype=DT)
    x[1, 2] = 0.0  # x @ w is a zero row: constant LayerNorm input
    keep = torch.ones(3, 4, 1, dtype=DT)
    keep[2, 1:] = 0.0
    wts = torch.tensor([0.5, 2.0, 1.0], dtype=DT)

    def f(p: dict[str, Tensor], x: Tensor, keep: Tensor, wts: Tensor) -> Tensor:
        h = F.layer_norm(x @ p["w"], (16,), p["g"], p["b"])
        return (wts[:, None, None] * keep * torch.tanh(h).pow(2)).sum()

    _check(f, p, x, keep, wts)


@pytest.mark.parametrize("limit", ["width", "budget"])
def test_row_packing_limits_stay_exact(limit: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cut wider than MAX_ROW_WIDTH takes the regular walk; a tiny memory budget walks the
    packed columns one at a time: exact either way."""
    from secorder._engine import sweep

    if limit == "width":
        monkeypatch.setattr(sweep, "MAX_ROW_WIDTH", 2)
    else:
        monkeypatch.setattr(sweep, "memory_budget", lambda: 1 << 17)
    torch.manual_seed(14)
    model = _TokenBlock().to(DT)
    idx, y = torch.randint(0, 11, (3, 5)), torch.randint(0, 3, (3,))
    _check(_ce(model), _params(model), idx, y)


@pytest.mark.parametrize("overlap", [False, True])
def test_bilinear_pair_skip_only_for_disjoint_features(
    overlap: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """q kᵀ with q and k slices of one projection: disjoint features skip the projection's
    squares (the ± pairs cancel), overlapping ones do not; exact either way."""
    from secorder._engine import sweep

    skips: list[frozenset[int]] = []
    real = sweep._pair_cancels
    monkeypatch.setattr(sweep, "_pair_cancels", lambda *a: skips.append(real(*a)) or skips[-1])
    torch.manual_seed(15)
    p = {"w": torch.randn(8, 24, dtype=DT), "b": torch.randn(8, dtype=DT), "h": torch.randn(4, 3, dtype=DT)}
    x = 0.3 * torch.randn(3, 4, 24, dtype=DT)
    lo = 2 if overlap else 4

    def f(p: dict[str, Tensor], x: Tensor) -> Tensor:
        z = F.linear(x, p["w"], p["b"])  # addmm on the (N·T, 24) view
        att = torch.softmax(z[..., :4] @ z[..., lo : lo + 4].transpose(1, 2), -1)
        return torch.tanh(att @ z[..., :4] @ p["h"]).pow(2).sum()

    _check(f, p, x)
    assert any(len(s) == 1 for s in skips) != overlap


@pytest.mark.parametrize("bound", ["chunk_size", "memory_budget"])
def test_column_blocks_bounded(bound: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every walk's column block holds at most ``chunk_size`` columns (balanced chunks), and a
    memory budget too small for two columns walks them one at a time; the diagonal, the GGN
    diagonal and the deferred squares at the layers stay exact."""
    from secorder._chunking import memory_budget, set_memory_budget
    from secorder._engine import sweep

    seen: list[int] = []
    walk = sweep._Walker.walk

    def spy(self: Any, group: Any, cols: Any, signs: Tensor, *a: Any, **k: Any) -> None:
        seen.append(int(signs.shape[0]))
        walk(self, group, cols, signs, *a, **k)

    monkeypatch.setattr(sweep._Walker, "walk", spy)
    model = _mlp(nn.Tanh, (4, 5, 5, 5, 6))
    params = _params(model)
    x, y = torch.randn(6, 4, dtype=DT), torch.randint(0, 6, (6,))
    f = _ce(model)
    ref = _dense_diag(f, params, x, y)
    old = memory_budget()
    try:
        if bound == "memory_budget":
            set_memory_budget(64)
            fn = secorder.hessian_diagonal(f)
            limit = 1
        else:
            fn = secorder.hessian_diagonal(f, chunk_size=2)
            limit = 2
        got = fn(params, x, y)
        assert fn.method_info.method == "sweep"
        assert seen and max(seen) <= limit
        mf = lambda p, x: functional_call(model, p, (x,))
        seen.clear()
        ggn = secorder.fisher_diagonal(mf, "cross_entropy", chunk_size=limit)(params, x, y)
        ggn_ref = secorder.fisher_diagonal(mf, "cross_entropy", path="generic")(params, x, y)
    finally:
        set_memory_budget(old)
    for k in params:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(ggn[k], ggn_ref[k], rtol=1e-9, atol=1e-12)
    assert seen and max(seen) <= limit  # the GGN's columns: C = 6 at the outputs, in chunks


@pytest.mark.parametrize("masked", [True, False], ids=["causal_mask", "no_mask"])
def test_attention_dead_entries_split_the_bilinear_form(
    masked: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """att @ v with att a causal softmax: its exact zeros are constant in θ, so the bilinear
    columns are formed per inner index over the live rows only (R drops by the masked half
    of the att @ v columns); without a mask nothing is dead and R is unchanged. Exact against
    the dense float64 Hessian either way, and the same diagonal as the unsplit form."""
    from secorder._engine import sweep

    torch.manual_seed(13)
    model = _TokenBlock().to(DT)
    if not masked:
        monkeypatch.setattr(torch, "triu", lambda x, diagonal=0: torch.zeros_like(x))
    idx, y = torch.randint(0, 11, (4, 5)), torch.randint(0, 3, (4,))
    params = _params(model)
    split = _check(_ce(model), params, idx, y)
    found: list[Any] = []
    real = sweep._dead_entries
    monkeypatch.setattr(sweep, "_dead_entries", lambda *a: found.append(real(*a)) or None)
    fn = secorder.hessian_diagonal(_ce(model))
    whole = fn(params, idx, y)
    assert fn.method_info.method == "sweep"
    d, t, heads = 6, 5, 2
    if masked:
        assert any(x is not None for x in found)
        # per head, att @ v (t×t times t×dh, ḡ of full rank min(t, dh)): 2·min(t, dh)·t columns
        # whole, 2·Σ_j min(t − j, dh) split (column j of att is live in rows j..t−1)
        dh = d // heads
        dropped = heads * 2 * (t * min(t, dh) - sum(min(t - j, dh) for j in range(t)))
        assert fn.method_info.num_columns - split.num_columns == dropped
    else:
        assert all(x is None for x in found)
        assert fn.method_info.num_columns == split.num_columns
    got = secorder.hessian_diagonal(_ce(model))(params, idx, y)
    for k in params:
        torch.testing.assert_close(got[k], whole[k], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("per_sample", [False, True], ids=["summed", "per_sample"])
def test_layer_norm_affine_squares_deferred_exact(per_sample: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A layer norm over one row per sample: its affine weight and bias squares are taken once
    from the column-summed δ^⊙2 of every group and chunk (deferred, like a Linear's), with a
    chunk of one column (many chunks summed); exact against dense float64 Hessians, per sample
    (row n: the Hessian of sample n's term) and summed."""
    from secorder._engine import sweep

    taken: list[Any] = []
    real = sweep._Walker._norm_rows
    monkeypatch.setattr(sweep._Walker, "_norm_rows", lambda self, i: taken.append(real(self, i)) or taken[-1])
    torch.manual_seed(14)
    model = nn.Sequential(
        nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 5), nn.LayerNorm(5), nn.Linear(5, 3)
    ).to(DT)
    with torch.no_grad():
        for ln in (model[1], model[4]):
            ln.weight.add_(0.5 * torch.randn(5, dtype=DT))
            ln.bias.add_(0.5 * torch.randn(5, dtype=DT))
    names = [k for k, _ in model.named_parameters()]
    leaves = [p.detach() for _, p in model.named_parameters()]
    x, y = torch.randn(6, 4, dtype=DT), torch.randint(0, 3, (6,))

    def loss(ls: list[Tensor], xs: Tensor = x, ys: Tensor = y) -> Tensor:
        return F.cross_entropy(functional_call(model, dict(zip(names, ls)), (xs,)), ys, reduction="sum")

    got, _ = engine_diagonal(loss, leaves, [x, y], chunk_size=1, per_sample=per_sample)
    assert sum(t is not None for t in taken) == 2
    rows = []
    for n in range(x.shape[0] if per_sample else 1):
        xs, ys = (x[n : n + 1], y[n : n + 1]) if per_sample else (x, y)
        h = dense_hessian(lambda ps, xs=xs, ys=ys: loss(list(ps), xs, ys), tuple(leaves)).diagonal()
        rows.append(unravel(h, [p.shape for p in leaves]))  # (flat, in the leaves' order)
    for j in range(len(leaves)):
        want = torch.stack([r[j] for r in rows]) if per_sample else rows[0][j]
        torch.testing.assert_close(got[j], want.reshape(got[j].shape), rtol=1e-9, atol=1e-12)


def test_closed_form_columns_start_at_a_layer_norm_output(monkeypatch: pytest.MonkeyPatch) -> None:
    """LayerNorm → Linear → tanh (one row per sample): the tanh columns are served in closed form
    at the Linear (squares m) and start as explicit columns √|m_j| B[:, j] at the layer norm's
    output (no one-hot columns through the Linear's VJP); exact against the dense Hessian."""
    from secorder._engine import sweep

    served: list[bool] = []
    real = sweep._Walker.closed_form
    monkeypatch.setattr(
        sweep._Walker, "closed_form", lambda self, g, step: served.append(real(self, g, step)) or served[-1]
    )
    starts: list[int] = []
    real_walk = sweep._Walker.walk

    def walk(self: Any, group: Any, cols: Any, signs: Tensor, *a: Any, **k: Any) -> None:
        node = self.plan.tape.nodes[self.plan.producer.get(group.value, 0)]
        starts.append(node.func is torch.ops.aten.native_layer_norm.default)
        real_walk(self, group, cols, signs, *a, **k)

    monkeypatch.setattr(sweep._Walker, "walk", walk)
    torch.manual_seed(15)
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3)).to(
        DT
    )
    x, y = torch.randn(6, 4, dtype=DT), torch.randint(0, 3, (6,))
    _check(_ce(model), _params(model), x, y)
    assert any(served) and any(starts)


def test_packed_rows_closed_form_at_a_linear_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GELU columns of a transformer MLP (one-row columns on (N·T, 4d) rows) served at their
    Linear in closed form (squares m per row) and packed from its input on as √|m_j| B[:, j]
    per row, instead of one-hot columns through the product: exact against the dense Hessian."""
    from secorder._engine import sweep

    taken: list[Any] = []
    real = sweep._packed_closed_form
    monkeypatch.setattr(sweep, "_packed_closed_form", lambda *a: taken.append(real(*a)) or taken[-1])
    torch.manual_seed(16)
    model = _TokenBlock().to(DT)
    idx, y = torch.randint(0, 11, (4, 5)), torch.randint(0, 3, (4,))
    _check(_ce(model), _params(model), idx, y)
    assert any(t is not None for t in taken)


def test_attention_dead_entries_split_bounded_by_the_memory_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-inner-index split holds K masked copies of ḡ: over an eighth of the memory budget
    it is not taken (the whole form's columns, more of them), and the result stays exact."""
    from secorder._engine import sweep

    torch.manual_seed(13)
    model = _TokenBlock().to(DT)
    idx, y = torch.randint(0, 11, (4, 5)), torch.randint(0, 3, (4,))
    split = _check(_ce(model), _params(model), idx, y)
    monkeypatch.setattr(sweep, "memory_budget", lambda: 1 << 12)
    whole = _check(_ce(model), _params(model), idx, y)
    assert whole.num_columns > split.num_columns


# -- pointwise regions: chains of elementwise ops of one source as one diagonal group -------------


def _gelu_new(x: Tensor) -> Tensor:  # GPT-2's activation as Hugging Face writes it
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * torch.pow(x, 3.0))))


REGIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu_new": _gelu_new,
    "silu_by_hand": lambda h: h * torch.sigmoid(h),
    "chain_of_unary": lambda h: torch.exp(torch.tanh(h) * 0.5) + 1.0,
    "with_data": lambda h: h * torch.tanh(h) * X_SCALE,  # a batched constant inside the region
}
X_SCALE = torch.rand(5, 6, dtype=DT) + 0.5


@pytest.mark.parametrize("name", list(REGIONS))
def test_pointwise_region_one_group_exact(name: str) -> None:
    """A region of pointwise ops of one value h (products of two operands that both come from h
    included) is one diagonal group of 6 columns (its entries) beside cross-entropy's; exact."""
    act = REGIONS[name]
    torch.manual_seed(11)
    p = {"a": torch.randn(4, 6, dtype=DT), "b": torch.randn(6, 3, dtype=DT)}
    f = lambda q, x, y: F.cross_entropy(act(x @ q["a"]) @ q["b"], y)
    x, y = torch.randn(5, 4, dtype=DT), torch.randint(0, 3, (5,))
    names = list(p)
    g = lambda ls: f(dict(zip(names, ls)), x, y)
    diag, r = engine_diagonal(g, list(p.values()), [x, y])
    tape = record(g, list(p.values()), adjoints=sweep._recorded_adjoints)
    groups = sweep._groups(sweep._plan(tape, tape.values, [x, y], 5), tape.extra, 5, 1e-14)
    h = tape.nodes[0].outputs[0]  # x @ a: the region's source
    assert (groups[0].value, groups[0].count) == (h, 6) and len(groups) == 2  # + log-softmax
    assert r == sum(gr.count for gr in groups)
    ref = _dense_diag(f, p, x, y)
    for k, d in zip(names, diag):
        torch.testing.assert_close(d, ref[k], rtol=1e-9, atol=1e-12)


def test_pointwise_region_with_escaping_value_exact() -> None:
    """An intermediate of the chain used outside it (t = tanh(h) feeds the product and the head):
    no single region, each op takes its own group (the product a dense local Hessian); exact."""
    torch.manual_seed(12)
    p = {"a": torch.randn(4, 6, dtype=DT), "b": torch.randn(6, 3, dtype=DT), "c": torch.randn(6, 3, dtype=DT)}

    def f(q: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        h = x @ q["a"]
        t = torch.tanh(h)
        return F.cross_entropy((h * t) @ q["b"] + t @ q["c"], y)

    _check_sweep(f, p, torch.randn(5, 4, dtype=DT), torch.randint(0, 3, (5,)))


def test_pointwise_region_on_a_leaf_and_unused_entries_exact() -> None:
    """A region on a parameter leaf (a regularizer w·sigmoid(w)) and a region whose output is
    only partly used (zero adjoints on the rest): exact."""
    torch.manual_seed(13)
    p = {"a": torch.randn(4, 6, dtype=DT), "b": torch.randn(3, 3, dtype=DT)}

    def f(q: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        h = _gelu_new(x @ q["a"])[:, :3]
        return F.cross_entropy(h @ q["b"], y) + (q["b"] * torch.sigmoid(q["b"])).sum()

    _check_sweep(f, p, torch.randn(5, 4, dtype=DT), torch.randint(0, 3, (5,)))


def test_pointwise_region_curvature_propagation_unbiased() -> None:
    """Curvature propagation mixes the region's diagonal columns: mean within 5 standard errors."""
    torch.manual_seed(14)
    p = {"a": torch.randn(4, 6, dtype=DT), "b": torch.randn(6, 3, dtype=DT)}
    f = lambda q, x, y: F.cross_entropy(_gelu_new(x @ q["a"]) @ q["b"], y)
    x, y = torch.randn(5, 4, dtype=DT), torch.randint(0, 3, (5,))
    fn = secorder.hessian_diagonal(f, num_probes=300, method="curvature_propagation", with_stderr=True)
    mean, err = fn(p, x, y, generator=torch.Generator().manual_seed(0))
    ref = _dense_diag(f, p, x, y)
    for k in p:
        assert bool(((mean[k] - ref[k]).abs() <= 5 * err[k] + 1e-12).all()), k


class _MHAHead(nn.Module):
    def __init__(self, need_weights: bool) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)
        self.need_weights = need_weights

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.attn(x, x, x, need_weights=self.need_weights)[0].mean(1))


@pytest.mark.parametrize("need_weights", [False, True], ids=["sdpa", "weights"])
def test_multihead_attention_per_sample_columns_exact(
    need_weights: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nn.MultiheadAttention recorded samples-first (secorder._kernels): its products are
    per-sample bilinear groups, so a dense local Hessian limit far below the batch's entries
    per product (8 here) is never reached; exact."""
    monkeypatch.setattr(sweep, "MAX_LOCAL", 8)
    torch.manual_seed(15)
    model = _MHAHead(need_weights).to(DT).eval()
    x, y = torch.randn(4, 3, 4, dtype=DT), torch.randint(0, 3, (4,))
    with sdpa_kernel(SDPBackend.MATH):  # the dense reference's double backward needs the math kernel
        _check_sweep(_ce(model), _params(model), x, y)


def test_tied_head_per_sample_rows_exact() -> None:
    """per_sample=True through the tied head's cross columns: row n is diag ∇² of sample n's
    term (its parameter-only part goes into sample n's fallback gradients only)."""
    torch.manual_seed(16)
    p = {"emb": torch.randn(6, 3, dtype=DT), "w1": torch.randn(3, 3, dtype=DT)}

    def lm(q: dict[str, Tensor], ids: Tensor, y: Tensor) -> Tensor:
        h = torch.tanh(F.embedding(ids, q["emb"]) @ q["w1"])
        return F.cross_entropy(F.linear(h, q["emb"]).transpose(1, 2), y, reduction="sum")

    ids, y = torch.randint(0, 6, (3, 4)), torch.randint(0, 6, (3, 4))
    rows = secorder.hessian_diagonal(lm, per_sample=True)(p, ids, y)
    for i in range(3):
        ref = _dense_diag(lm, p, ids[i : i + 1], y[i : i + 1])
        for k in p:
            torch.testing.assert_close(rows[k][i], ref[k], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("batched", [True, False], ids=["per_sample", "parameter_only"])
def test_elementwise_product_of_two_sources_exact(batched: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """silu(h W₁) ⊙ (h W₂) (SwiGLU; both operands share the leaves behind h) and a product of
    two parameter-only values sharing w0: two closed-form columns per entry (a dense local
    Hessian, limited to 4 entries here, would be refused); exact."""
    monkeypatch.setattr(sweep, "MAX_LOCAL", 4)
    torch.manual_seed(17)
    p = {
        "w0": torch.randn(4, 4, dtype=DT),
        "w1": torch.randn(4, 6, dtype=DT),
        "w2": torch.randn(4, 6, dtype=DT),
        "w3": torch.randn(6, 3, dtype=DT),
    }

    def f(q: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        if batched:
            h = torch.tanh(x @ q["w0"])
            return F.cross_entropy((F.silu(h @ q["w1"]) * (h @ q["w2"])) @ q["w3"], y)
        gate = torch.tanh(q["w0"] @ q["w1"]) * (q["w0"] @ q["w2"])  # (4, 6), the same for every sample
        return F.cross_entropy(torch.tanh(x @ gate) @ q["w3"], y)

    _check_sweep(f, p, torch.randn(5, 4, dtype=DT), torch.randint(0, 3, (5,)))


def test_elementwise_product_curvature_propagation_unbiased() -> None:
    """Curvature propagation mixes the product's columns: within 5 standard errors."""
    torch.manual_seed(18)
    p = {
        "w0": torch.randn(4, 4, dtype=DT),
        "w1": torch.randn(4, 6, dtype=DT),
        "w2": torch.randn(4, 6, dtype=DT),
        "w3": torch.randn(6, 3, dtype=DT),
    }

    def f(q: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        h = torch.tanh(x @ q["w0"])
        return F.cross_entropy((F.silu(h @ q["w1"]) * (h @ q["w2"])) @ q["w3"], y)

    x, y = torch.randn(5, 4, dtype=DT), torch.randint(0, 3, (5,))
    fn = secorder.hessian_diagonal(f, num_probes=300, method="curvature_propagation", with_stderr=True)
    mean, err = fn(p, x, y, generator=torch.Generator().manual_seed(0))
    ref = _dense_diag(f, p, x, y)
    for k in p:
        assert bool(((mean[k] - ref[k]).abs() <= 5 * err[k] + 1e-12).all()), k


def test_elementwise_product_with_a_parameter_only_operand_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    """r ⊙ (h₀ W + b) with h₀ a constant (the GRU's first step): a per-sample value times a
    parameter-only one sharing its leaves; the parameter-only part of each column goes to the
    per-leaf fallback per sample (a dense local Hessian, limited to 4 entries, is not used)."""
    monkeypatch.setattr(sweep, "MAX_LOCAL", 4)
    torch.manual_seed(19)
    p = {"w": torch.randn(4, 4, dtype=DT), "b": torch.randn(4, dtype=DT), "v": torch.randn(4, 3, dtype=DT)}

    def f(q: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        h0 = torch.full((x.shape[0], 4), 0.5, dtype=x.dtype)  # the same for every sample
        r = torch.sigmoid(x @ q["w"] + q["b"])
        return F.cross_entropy((r * (h0 @ q["w"] + q["b"])) @ q["v"], y)

    _check_sweep(f, p, torch.randn(5, 4, dtype=DT), torch.randint(0, 3, (5,)))


def test_eigen_columns_nonzero_first_per_sample() -> None:
    """Columns split by ``eigh`` are ordered positive, negative, zero per sample and row, so
    the kept column indices of row t are the first max_n rank_n(t) (not every index nonzero
    for SOME sample, which eigh scatters between its negative and positive eigenvalues); the
    kept columns still give every sample's local Hessian exactly: Σ_c σ_c s_c s_cᵀ = H_{n,t}."""
    from secorder._engine import sweep

    gen = torch.Generator().manual_seed(21)
    n, t, c = 4, 3, 5
    ranks = torch.randint(0, c + 1, (n, t), generator=gen)
    q = torch.linalg.qr(torch.randn(n, t, c, c, generator=gen, dtype=DT)).Q
    lam = torch.randn(n, t, c, generator=gen, dtype=DT)
    lam = torch.where(torch.arange(c) < ranks[..., None], lam, torch.zeros_like(lam))
    h = q @ torch.diag_embed(lam) @ q.transpose(-1, -2)
    ev, vecs = torch.linalg.eigh(h)
    lay = sweep._layout((n, t, c), (0, 1), n, 2)
    group = sweep._group_from_local(0, (0, 1), lay, ev, vecs, 64 * torch.finfo(DT).eps)
    assert group.count == int(ranks.max(0).values.sum())
    cols, signs = group.get(0, group.count)  # (k, N, T, C), (k, N)
    rows = torch.tensor([tt for tt, _ in group.keep])
    rebuilt = torch.zeros_like(h)
    for k in range(group.count):
        s = cols[k, :, rows[k]]  # (N, C): column k lives in row rows[k] of every sample
        rebuilt[:, rows[k]] += signs[k].to(DT)[:, None, None] * s[:, :, None] * s[:, None, :]
    torch.testing.assert_close(rebuilt, h, rtol=1e-9, atol=1e-12)


def test_causal_softmax_rows_take_their_rank() -> None:
    """A causal softmax row t has t + 1 live entries and a Hessian of rank ≤ t (the ones
    vector is in its null space): the softmax group of the test transformer block takes
    heads · Σ_t t columns, and the diagonal stays exact against dense float64 Hessians."""
    from secorder._engine import sweep

    torch.manual_seed(22)
    model = _TokenBlock().to(DT)
    idx, y = torch.randint(0, 11, (4, 5)), torch.randint(0, 3, (4,))
    counts: list[int] = []  # columns of the groups at the softmax input (the masked scores)
    orig_groups = sweep._groups

    def groups(*a: Any) -> list[Any]:
        res = orig_groups(*a)
        plan = a[0]
        for gr in res:
            prod = plan.producer.get(getattr(gr, "value", -1))
            if prod is not None and plan.tape.nodes[prod].func is torch.ops.aten.masked_fill.Scalar:
                counts.append(gr.count)
        return res

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sweep, "_groups", groups)
        _check(_ce(model), _params(model), idx, y)
    heads, t = 2, 5
    assert counts and set(counts) == {heads * t * (t - 1) // 2}  # the diagonal and the trace call
