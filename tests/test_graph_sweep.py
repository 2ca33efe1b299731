"""The op-level sweep (secorder._graph_sweep) against dense float64 Hessian diagonals.

Models the module-level sweep refuses (LayerNorm, attention, tied weights, affine eval-mode
BatchNorm) go through module_hessian_diagonal(method="sweep"/"auto"); models it accepts (an
MLP: the disjoint-dependency skip of every matmul) through graph_sweep_diagonal directly.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

import secorder
from secorder import _graph_sweep
from secorder._engine.tape import TapeUnsupportedError, record
from secorder._graph_sweep import GraphSweepUnsupportedError, graph_sweep_diagonal
from secorder._pytree import flatten, unflatten
from secorder.testing import dense_hessian

LOSS_FNS: dict[str, Callable[..., Tensor]] = {
    "cross_entropy": F.cross_entropy,
    "mse": F.mse_loss,
    "bce_with_logits": F.binary_cross_entropy_with_logits,
}


class Attention(nn.Module):
    """Single-head attention (q·kᵀ softmax ·v) on a projection shared over positions, residual
    adds, LayerNorm, GELU, mean pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(3, 4)
        self.q = nn.Linear(4, 4)
        self.k = nn.Linear(4, 4, bias=False)
        self.v = nn.Linear(4, 4)
        self.ln = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:  # x: (N, T, 3)
        h = self.emb(x)
        att = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2) / 2.0, dim=-1)
        h = self.ln(h + att @ self.v(h))
        return self.head(F.gelu(h).mean(1))


class BatchNormNet(nn.Module):
    """Eval-mode BatchNorm WITH affine parameters between tanh layers, ReLU kinks."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.fc2 = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.relu(torch.tanh(self.bn(self.fc1(x)))))


class Tied(nn.Module):
    """A tied weight: embedding and output head share W; also h @ W @ Wᵀ."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.mix = nn.Linear(3, 3)

    def forward(self, idx: Tensor) -> Tensor:  # idx: (N, T) integer tokens
        h = torch.tanh(self.mix(self.emb(idx)))  # (N, T, 3)
        h = h @ self.mix.weight @ self.mix.weight.T + h
        return (h.mean(1) @ self.emb.weight.T).contiguous()  # (N, 5) logits by the tied table


class LayerNormSeq(nn.Module):
    """A Linear shared over positions, LayerNorm with affine params, ReLU and a residual."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 4)
        self.ln = nn.LayerNorm(4)
        self.out = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:  # (N, T, 3) -> (N, T, 2)
        h = self.proj(x)
        return self.out(torch.relu(self.ln(h)) + h)


def _params(model: nn.Module) -> dict[str, Tensor]:
    return {k: p.detach().clone() for k, p in model.named_parameters()}


def _reference(
    model: nn.Module, loss: str, reduction: str, params: dict[str, Tensor], x: Tensor, y: Tensor
) -> Tensor:
    f, _ = secorder.module_loss(model, lambda z, t: LOSS_FNS[loss](z, t, reduction=reduction))
    return dense_hessian(f, params, x, y).diagonal()


def _flat(d: dict[str, Tensor]) -> Tensor:
    return torch.cat([d[k].reshape(-1) for k in sorted(d)])


def _data(name: str, loss: str, n: int = 5) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    if name == "tied":
        x = torch.randint(0, 5, (n, 3), generator=g)
        out: tuple[int, ...] = (n, 5)
    elif name in ("attention",):
        x, out = torch.randn(n, 3, 3, generator=g, dtype=torch.float64), (n, 2)
    elif name == "layernorm_seq":
        x, out = torch.randn(n, 3, 3, generator=g, dtype=torch.float64), (n, 3, 2)
    else:
        x, out = torch.randn(n, 3, generator=g, dtype=torch.float64), (n, 2)
    if loss == "cross_entropy":
        y = torch.randint(0, out[1], (n,), generator=g)
    elif loss == "mse":
        y = torch.randn(out, generator=g, dtype=torch.float64)
    else:
        y = torch.rand(out, generator=g, dtype=torch.float64)
    return x, y


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    model: nn.Module = {
        "attention": Attention,
        "batchnorm": BatchNormNet,
        "tied": Tied,
        "layernorm_seq": LayerNormSeq,
    }[name]().double()
    if name == "batchnorm":
        with torch.no_grad():  # non-trivial running statistics and affine parameters
            model.bn.running_mean.uniform_(-0.5, 0.5)  # type: ignore[union-attr, operator]
            model.bn.running_var.uniform_(0.5, 2.0)  # type: ignore[union-attr, operator]
            model.bn.weight.uniform_(0.5, 1.5)  # type: ignore[union-attr]
            model.bn.bias.uniform_(-0.5, 0.5)  # type: ignore[union-attr]
        model.eval()
    return model


CASES = [
    ("attention", "cross_entropy", "mean"),
    ("attention", "mse", "sum"),
    ("batchnorm", "bce_with_logits", "mean"),
    ("batchnorm", "cross_entropy", "sum"),
    ("tied", "cross_entropy", "mean"),
    ("tied", "bce_with_logits", "sum"),
    ("layernorm_seq", "mse", "mean"),
    ("layernorm_seq", "cross_entropy", "mean"),
]


@pytest.mark.parametrize(("name", "loss", "reduction"), CASES)
def test_exact_against_dense(name: str, loss: str, reduction: str) -> None:
    model = _model(name)
    x, y = _data(name, loss)
    if name == "layernorm_seq" and loss == "cross_entropy":
        model.out = nn.Linear(4, 3).double()  # (N, T, 3): classes moved to dim 1 below
        inner = model

        class Moved(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, x: Tensor) -> Tensor:
                return self.inner(x).transpose(1, 2)  # (N, C=3, T=3)

        model = Moved()
        y = torch.randint(0, 3, (x.shape[0], 3), generator=torch.Generator().manual_seed(2))
    params = _params(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fn = secorder.module_hessian_diagonal(model, loss, method="sweep", reduction=reduction, chunk_size=7)
    got = fn(params, x, y)
    ref = _reference(model, loss, reduction, params, x, y)
    torch.testing.assert_close(_flat(got), ref, rtol=1e-9, atol=1e-11)
    info = fn.method_info
    assert info.method == "sweep" and "op-level" in info.reason and info.num_columns > 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # not mutated


def test_auto_and_trace_use_the_op_level_sweep() -> None:
    model = _model("attention")
    x, y = _data("attention", "cross_entropy")
    params = _params(model)
    ref = _reference(model, "cross_entropy", "mean", params, x, y)
    fn = secorder.module_hessian_trace(model, "cross_entropy")
    tr = fn(params, x, y)
    torch.testing.assert_close(tr, ref.sum(), rtol=1e-9, atol=1e-11)
    assert fn.method_info.method == "sweep" and "op-level" in fn.method_info.reason
    # "auto": R <= P here, so the cost model picks the op-level sweep over one-hot HVPs
    auto = secorder.module_hessian_diagonal(model, "cross_entropy")
    torch.testing.assert_close(_flat(auto(params, x, y)), ref, rtol=1e-9, atol=1e-11)
    info = auto.method_info
    assert info.method == "sweep" and "op-level" in info.reason and 0 < info.num_columns <= info.num_params


def test_float32_close_to_float64() -> None:
    model = _model("attention")
    x, y = _data("attention", "cross_entropy")
    params = _params(model)
    ref = _reference(model, "cross_entropy", "mean", params, x, y)
    m32 = _model("attention").float()
    got = secorder.module_hessian_diagonal(m32, "cross_entropy", method="sweep")(
        {k: v.float() for k, v in params.items()}, x.float(), y
    )
    assert _flat(got).dtype == torch.float32
    torch.testing.assert_close(_flat(got).double(), ref, rtol=1e-4, atol=1e-5)


def _direct(
    model: nn.Module, loss: str, reduction: str, x: Tensor, y: Tensor, **kw: object
) -> tuple[Tensor, int]:
    """graph_sweep_diagonal on a model (also ones the module sweep accepts)."""
    forward, _ = secorder.modules.module_forward(model)
    params = _params(model)
    leaves, tree = flatten(params)
    fn = LOSS_FNS[loss]

    def loss_fn(ls: list[Tensor], sample: list[Tensor]) -> Tensor:
        return fn(forward(unflatten(tree, ls), sample[0]), sample[1], reduction=reduction)

    with torch.no_grad():
        batch = fn(forward(params, x), y, reduction=reduction)
    scale = 1.0 / x.shape[0] if reduction == "mean" else 1.0
    diag, r = graph_sweep_diagonal(loss_fn, leaves, [x, y], scale=scale, batch_loss=batch, chunk_size=5, **kw)  # type: ignore[arg-type]
    return torch.cat([d.reshape(-1) for d in diag]), r


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_mlp_disjoint_skip_is_exact(loss: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, _ = _data("mlp", "mse", n=6)
    y = torch.randint(0, 3, (6,)) if loss == "cross_entropy" else torch.randn(6, 3, dtype=torch.float64)
    got, r = _direct(model, loss, "mean", x, y, budget_bytes=1)  # budget 1: one sample per chunk
    ref = _reference(model, loss, "mean", _params(model), x, y)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-11)
    # columns: the 4 tanh units, plus the loss (3 softmax eigencolumns at most, or 3 for mse);
    # no column from any matmul (disjoint leaves) or ReLU (no curvature)
    assert 4 < r <= 7


def test_train_batchnorm_refused() -> None:
    model = BatchNormNet().double().train()
    x, y = _data("batchnorm", "mse")
    with pytest.raises(secorder.SecorderError, match="samples that do not interact"):
        secorder.module_hessian_diagonal(model, "mse", method="sweep")(_params(model), x, y)

    def loss_fn(ls: list[Tensor], sample: list[Tensor]) -> Tensor:  # (1, C=3, L=4) per sample
        h = F.batch_norm(sample[0], None, None, training=True)
        return ((h.sum(2) * ls[0]).sum() - sample[1].sum()) ** 2

    w = torch.randn(3, dtype=torch.float64)
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    with pytest.raises(GraphSweepUnsupportedError, match="batch statistics"):
        graph_sweep_diagonal(
            loss_fn, [w], [x, y], scale=1.0, batch_loss=torch.zeros((), dtype=torch.float64), chunk_size=4
        )


class Branchy(nn.Module):
    """Python control flow on a per-sample value (.item() through bool())."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.ln = nn.LayerNorm(2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln(self.fc(x))
        return h * 2 if bool(x.sum() > 0) else h


def test_data_dependent_control_flow_refused() -> None:
    model = Branchy().double()
    x, y = _data("mlp", "mse")
    with pytest.raises(secorder.SecorderError, match="per-sample data"):
        secorder.module_hessian_diagonal(model, "mse", method="sweep")(_params(model), x, y)
    with pytest.raises(TapeUnsupportedError, match="per-sample data"):
        record(lambda ls, xs: (ls[0] * xs[0]).sum() * xs[0].sum().item(), [torch.ones(3)], [torch.ones(3)])
    # without data inputs .item() is recorded as taken (the tape is exact at this point)
    tape = record(lambda ls: ls[0].sum() * ls[0].sum().item(), [torch.ones(3)])
    assert tape.num_inputs == 0 and tape.output is not None


class Coupled(nn.Module):
    """Centering over the batch: the samples interact (no per-sample decomposition)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        return F.layer_norm(h - h.mean(0), (2,))


def test_coupled_samples_refused() -> None:
    model = Coupled().double()
    x, y = _data("mlp", "mse")
    with pytest.raises(secorder.SecorderError, match="samples interact"):
        secorder.module_hessian_diagonal(model, "mse", method="sweep")(_params(model), x, y)


def test_large_generic_op_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_graph_sweep, "MAX_LOCAL", 4)
    model = _model("layernorm_seq")  # LayerNorm rows of 4 (allowed); mse_loss on 3·2 = 6 entries (dense)
    x, y = _data("layernorm_seq", "mse")
    with pytest.raises(secorder.SecorderError, match="dense local Hessian is limited to 4"):
        secorder.module_hessian_diagonal(model, "mse", method="sweep")(_params(model), x, y)
    # "auto" falls back to one-hot HVPs (P is small) and says why
    fn = secorder.module_hessian_diagonal(model, "mse")
    got = fn(_params(model), x, y)
    assert fn.method_info.method == "hvp" and "op-level" in fn.method_info.reason
    ref = _reference(model, "mse", "mean", _params(model), x, y)
    torch.testing.assert_close(_flat(got), ref, rtol=1e-9, atol=1e-11)


def test_device_and_chunking_invariance(device: torch.device) -> None:
    model = _model("tied").to(device)
    x, y = _data("tied", "bce_with_logits")
    x, y = x.to(device), y.to(device)
    params = _params(model)
    ref = _reference(model, "bce_with_logits", "mean", params, x, y)
    for chunk in (1, 1000):
        fn = secorder.module_hessian_diagonal(model, "bce_with_logits", method="sweep", chunk_size=chunk)
        got = _flat(fn(params, x, y))
        assert got.device == ref.device
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-11)


class PairInput(nn.Module):
    """Takes a list of tensors: the op-level engine needs one batched input tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.ln = nn.LayerNorm(2)

    def forward(self, xs: list[Tensor]) -> Tensor:
        return self.ln(self.fc(xs[0]))


def test_unbatched_inputs_refused() -> None:
    model = PairInput().double()
    x, y = _data("mlp", "mse")
    with pytest.raises(secorder.SecorderError, match="not batched tensors"):
        secorder.module_hessian_diagonal(model, "mse", method="sweep")(_params(model), [x], y)


# -- functions f(θ, *batch): hessian_diagonal / hessian_trace with exact="sweep" ------------------


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_function_sweep_matches_dense_for_mean_and_sum(reduction: str) -> None:
    torch.manual_seed(5)
    model = Attention().double()
    f, params = secorder.module_loss(model, lambda z, y: F.cross_entropy(z, y, reduction=reduction))
    x, y = torch.randn(4, 3, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    H = dense_hessian(f, params, x, y)
    diag_fn = secorder.hessian_diagonal(f, exact="sweep")
    diag = diag_fn(params, x, y)
    assert list(diag) == list(params)
    expected = unflatten(
        flatten(params)[1], list(torch.split(H.diagonal(), [p.numel() for p in flatten(params)[0]]))
    )
    for k in params:
        torch.testing.assert_close(diag[k], expected[k].reshape(params[k].shape), rtol=1e-9, atol=1e-12)
    info = diag_fn.method_info
    assert info.method == "sweep" and info.num_columns > 0 and info.num_params == H.shape[0]
    trace_fn = secorder.hessian_trace(f, exact="sweep", with_stderr=True)
    est, err = trace_fn(params, x, y)
    torch.testing.assert_close(est, H.diagonal().sum(), rtol=1e-9, atol=1e-12)
    assert err == 0
    blocks = secorder.hessian_trace(f, exact="sweep", per_block=True)(params, x, y)
    torch.testing.assert_close(sum(blocks.values()), H.diagonal().sum(), rtol=1e-9, atol=1e-12)


def test_function_sweep_on_a_pure_function_with_a_per_batch_term() -> None:
    """mean or sum of per-sample losses + λ‖w‖²: both exact. The structured sweep takes its
    adjoints from the batch loss itself and adds the parameter-only term's columns, so no
    mean-or-sum scale is guessed (the op-level sweep refused the sum + λ‖w‖² case)."""
    torch.manual_seed(6)
    w = {"a": torch.randn(3, 2, dtype=torch.float64), "b": torch.randn(2, dtype=torch.float64)}
    x, t = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)

    def per_sample(w: dict[str, Tensor], x: Tensor, t: Tensor) -> Tensor:
        return ((torch.tanh(x @ w["a"]) * w["b"] - t) ** 2).sum(1)

    mean_f = lambda w, x, t: per_sample(w, x, t).mean() + 0.3 * (w["a"] ** 2).sum()
    sum_f = lambda w, x, t: per_sample(w, x, t).sum() + 0.3 * (w["a"] ** 2).sum()
    H = dense_hessian(mean_f, w, x, t)
    got = secorder.hessian_diagonal(mean_f, exact="sweep")(w, x, t)
    torch.testing.assert_close(
        torch.cat([got["a"].flatten(), got["b"]]),
        H.diagonal(),  # dense order: sorted keys
    )
    # the structured engine takes adjoints from the batch loss itself, so the sum + λ‖w‖² is
    # exact there too (the op-level graph sweep alone would refuse it)
    fn = secorder.hessian_diagonal(sum_f, exact="sweep")
    got = fn(w, x, t)
    assert "structured sweep" in fn.method_info.reason
    torch.testing.assert_close(
        torch.cat([got["a"].flatten(), got["b"]]), dense_hessian(sum_f, w, x, t).diagonal()
    )


def test_function_sweep_errors() -> None:
    f = lambda w, x: (torch.tanh(x @ w) ** 2).mean()
    w, x = torch.randn(3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"exact must be one of 'auto', 'hvp', 'sweep', but received 'fast'"):
        secorder.hessian_diagonal(f, exact="fast")
    with pytest.raises(ValueError, match=r"exact='sweep' computes the exact diagonal and takes no probes"):
        secorder.hessian_trace(f, num_probes=4, exact="sweep")
    with pytest.raises(ValueError, match=r"batched along dimension 0.*args\[1\]: float"):
        secorder.hessian_diagonal(lambda w, s: (w**2).sum() * s, exact="sweep")(w, 2.0)
    with pytest.raises(RuntimeError, match=r"exact='sweep'"):
        torch.func.vmap(secorder.hessian_diagonal(f, exact="sweep"), in_dims=(0, None))(w.expand(2, 3), x)


# -- row-wise (softmax family, layer_norm) and bilinear (mm/bmm) local Hessians -----------------


def _kinds(monkeypatch: pytest.MonkeyPatch) -> list[list[tuple[str, str]]]:
    """Record (kind, op name) of the contributing nodes of every plan built."""
    seen: list[list[tuple[str, str]]] = []
    classify = _graph_sweep._classify

    def spy(*args: object, **kwargs: object) -> object:
        plan = classify(*args, **kwargs)  # type: ignore[arg-type]
        seen.append([(nd.kind, nd.node.func._schema.name.split("::")[-1]) for nd in plan.nodes])
        return plan

    monkeypatch.setattr(_graph_sweep, "_classify", spy)
    return seen


def test_attention_uses_row_and_bilinear_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _kinds(monkeypatch)
    model = _model("attention")
    x, y = _data("attention", "cross_entropy")
    secorder.module_hessian_diagonal(model, "cross_entropy", method="sweep")(_params(model), x, y)
    kinds = dict((op, kind) for kind, op in seen[-1])
    assert kinds["bmm"] == "bilinear" and kinds["_softmax"] == "rows"
    assert kinds["native_layer_norm"] == "rows" and kinds["_log_softmax"] == "rows"
    assert "generic" not in kinds.values()


class MultiHead(nn.Module):
    """Two heads (bmm over 2 batch matrices), a causal -inf mask (zero probabilities), softmax
    and log_softmax over a non-last dim, LayerNorm over two trailing dims whose weight also
    feeds its input (so the x–w cross blocks count), and x @ xᵀ (mm of a tensor with itself)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(3, 4)
        self.qkv = nn.Linear(4, 12)
        self.ln = nn.LayerNorm((3, 4))
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:  # (N, T=3, 3) -> (N, 3, T)
        n, t, _ = x.shape
        h = self.emb(x) + self.ln.weight  # the LayerNorm weight also enters its input
        q, k, v = self.qkv(h).view(n, t, 3, 2, 2).permute(2, 0, 3, 1, 4)  # (N, heads, T, 2) each
        s = (q @ k.transpose(-1, -2)).masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        att = torch.softmax(s, dim=-1) @ v  # (N, 2, T, 2)
        h = self.ln(h + att.transpose(1, 2).reshape(n, t, 4))
        g = h[0] @ h[0].T if n == 1 else torch.einsum("ntd,nsd->nts", h, h)  # Gram matrix
        z = torch.tanh(h + g @ h * 0.1)
        return torch.log_softmax(self.head(z).transpose(1, 2), dim=1) + torch.softmax(z, dim=1).sum(
            -1, keepdim=True
        )


@pytest.mark.parametrize("chunk", [3, 1000])
def test_multihead_masked_shared_layernorm_weight_exact(chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _kinds(monkeypatch)
    torch.manual_seed(3)
    model = MultiHead().double()
    with torch.no_grad():
        model.ln.weight.uniform_(0.5, 1.5)
        model.ln.bias.uniform_(-0.5, 0.5)
    x = torch.randn(4, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    y = torch.randn(4, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    params = _params(model)
    fn = secorder.module_hessian_diagonal(model, "mse", method="sweep", chunk_size=chunk)
    got = fn(params, x, y)
    ref = _reference(model, "mse", "mean", params, x, y)
    torch.testing.assert_close(_flat(got), ref, rtol=1e-9, atol=1e-11)
    kinds = {(kind, op) for kind, op in seen[-1]}
    assert {
        ("bilinear", "bmm"),
        ("rows", "_softmax"),
        ("rows", "_log_softmax"),
        ("rows", "native_layer_norm"),
    } <= kinds


def test_safe_softmax_and_fully_masked_rows() -> None:
    """aten._safe_softmax: a fully masked row gives zeros (and no curvature)."""
    w = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    mask = torch.tensor([[0.0, 0.0, 0.0, 0.0], [float("-inf")] * 4, [0.0, float("-inf"), 0.0, 0.0]])

    def loss(ls: list[Tensor], s: list[Tensor]) -> Tensor:
        u = (s[0] @ ls[0]).unsqueeze(1) * torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)[:, None] + mask
        p = torch.ops.aten._safe_softmax(u, -1)
        return (p * torch.arange(4.0, dtype=torch.float64)).sum() + (p**2).sum()

    (d,), r = graph_sweep_diagonal(loss, [w], [x], scale=1.0, batch_loss=loss([w], [x]), chunk_size=4)
    ref = torch.autograd.functional.hessian(lambda v: loss([v], [x]), w).flatten(0, 1).flatten(1).diagonal()
    torch.testing.assert_close(d.flatten(), ref, rtol=1e-9, atol=1e-11)
    assert r > 0


def test_two_input_pointwise_columns_for_any_chunking() -> None:
    """Regression: eigencolumns of 2×2 per-element blocks (h · exp(h), both inputs depend on w)
    were indexed (k, n, m) instead of (n, k, m) when several samples and columns were batched."""
    w = torch.randn(3, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(10))

    def loss(ls: list[Tensor], s: list[Tensor]) -> Tensor:
        h = s[0] * ls[0]
        return (h * h.exp()).sum() + (torch.tanh(h) * torch.sin(h)).sum()

    ref = torch.autograd.functional.hessian(lambda v: loss([v], [x]), w).diagonal()
    for chunk in (1, 2, 5, 100):
        (d,), _ = graph_sweep_diagonal(loss, [w], [x], scale=1.0, batch_loss=loss([w], [x]), chunk_size=chunk)
        torch.testing.assert_close(d, ref, rtol=1e-9, atol=1e-11)


class Wide(nn.Module):
    """LayerNorm and softmax on T·d = 80·64 = 5120 > MAX_LOCAL entries per sample."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.emb = nn.Linear(3, d)
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln(self.emb(x))
        return self.head(torch.softmax(h, dim=-1).mean(1) * h.shape[-1])


def test_rows_beyond_the_dense_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _kinds(monkeypatch)
    t, d = 80, 64
    assert t * d > _graph_sweep.MAX_LOCAL  # a dense local Hessian of either op is refused
    torch.manual_seed(0)
    model = Wide(d).double()
    with torch.no_grad():
        model.ln.weight.uniform_(0.5, 1.5)
        model.ln.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, t, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1])
    params = _params(model)
    fn = secorder.module_hessian_diagonal(model, "cross_entropy", method="sweep", chunk_size=1024)
    got = fn(params, x, y)
    assert fn.method_info.method == "sweep" and fn.method_info.num_columns > t * d  # rows × row rank
    assert {kind for kind, _ in seen[-1]} == {"rows"}
    f, _ = secorder.module_loss(model, F.cross_entropy)
    ref = secorder.hessian_diagonal(f, chunk_size=64)(params, x, y)  # one-hot HVPs, float64
    for k in params:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-9, atol=1e-12)


def test_row_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model("layernorm_seq")  # LayerNorm rows of 4 entries
    x, y = _data("layernorm_seq", "mse")
    monkeypatch.setattr(_graph_sweep, "MAX_LOCAL", 3)
    with pytest.raises(secorder.SecorderError, match="local Hessian per row is limited to 3"):
        secorder.module_hessian_diagonal(model, "mse", method="sweep")(_params(model), x, y)


@pytest.mark.parametrize("form", ["x+w", "x*w", "w only", "no weight"])
def test_layer_norm_weight_shared_with_its_input(form: str) -> None:
    """layer_norm(u(w), weight=w): the x–w cross blocks of every row count (torch.func's
    jacrev(jacrev(native_layer_norm)) gets the (w, x) block wrong; the rule avoids it)."""
    gen = torch.Generator().manual_seed(11)
    w = torch.rand(4, dtype=torch.float64, generator=gen) + 0.5
    x = torch.randn(5, 3, 4, dtype=torch.float64, generator=gen)
    g = torch.randn(4, dtype=torch.float64, generator=gen)

    def loss(ls: list[Tensor], s: list[Tensor]) -> Tensor:
        u = {"x+w": s[0] + ls[0], "x*w": s[0] * ls[0], "w only": s[0], "no weight": s[0] * ls[0]}[form]
        weight, bias = (None, None) if form == "no weight" else (ls[0], ls[0] * 0.5)
        return (torch.tanh(F.layer_norm(u, (4,), weight, bias)) * g).sum()

    (d,), r = graph_sweep_diagonal(loss, [w], [x], scale=1.0, batch_loss=loss([w], [x]), chunk_size=4)
    ref = torch.autograd.functional.hessian(lambda v: loss([v], [x]), w).diagonal()
    torch.testing.assert_close(d, ref, rtol=1e-9, atol=1e-12)
    assert r > 0


def _ln_phi(v: Tensor, g: Tensor, w: Tensor | None, b: Tensor, eps: float, shared: bool) -> Tensor:
    """⟨ḡ, x̂ ⊙ w + b⟩ of one row by the explicit normalization; v = (x, w) when ``shared``."""
    d = g.numel()
    x = v[:d]
    xc = x - x.mean()
    y = xc / torch.sqrt((xc * xc).mean() + eps)
    weight = v[d:] if shared else w
    return (g * (y if weight is None else y * weight + b)).sum()


@pytest.mark.parametrize("d", [1, 2, 5, 16])
@pytest.mark.parametrize("eps", [1e-5, 0.3])
@pytest.mark.parametrize("weight", ["none", "constant", "shared"])
def test_layer_norm_closed_form_equals_autodiff_row_hessian(d: int, eps: float, weight: str) -> None:
    """The closed-form row Hessian equals reverse over reverse of the explicit normalization
    (float64, rows of several scales); without a shared weight also torch's own layer_norm."""
    gen = torch.Generator().manual_seed(100 + d)
    rows = 6
    x = torch.randn(rows, d, dtype=torch.float64, generator=gen)
    x = x * torch.tensor([1e-2, 0.1, 1.0, 1.0, 10.0, 1e3], dtype=torch.float64)[:, None] + 3.0
    g = torch.randn(rows, d, dtype=torch.float64, generator=gen)
    w = None if weight == "none" else torch.rand(d, dtype=torch.float64, generator=gen) + 0.5
    b = torch.randn(d, dtype=torch.float64, generator=gen)
    shared = weight == "shared"
    got = _graph_sweep._layer_norm_row_hessian(x, g, w, eps, shared=shared)
    assert got.shape == ((rows, 2 * d, 2 * d) if shared else (rows, d, d))
    for r in range(rows):
        v = torch.cat([x[r], w]) if shared and w is not None else x[r]
        ref = torch.autograd.functional.hessian(lambda u, r=r: _ln_phi(u, g[r], w, b, eps, shared), v)
        # relative to the size of the terms: the row Hessian itself can be a cancellation (d = 2
        # with var ≫ eps: O(eps/σ⁴)), where both computations keep only digits relative to σ⁻²
        var = x[r].var(unbiased=False) + eps
        c = g[r] if w is None else g[r] * w
        scale = torch.stack([ref.abs().max(), c.abs().max() / var, g[r].abs().max() / var.sqrt()]).max()
        torch.testing.assert_close(got[r] / scale, ref / scale, rtol=0, atol=1e-10)
        if not shared:

            def native(u: Tensor, r: int = r) -> Tensor:
                return (g[r] * F.layer_norm(u, (d,), w, b if w is not None else None, eps)).sum()

            ref2 = torch.autograd.functional.hessian(native, x[r])  # its own variance algorithm
            torch.testing.assert_close(got[r] / scale, ref2 / scale, rtol=0, atol=1e-8)


def test_layer_norm_closed_form_structure_and_d2_by_hand() -> None:
    """Each row Hessian is symmetric, H 1 = 0 (shifting a row changes nothing), and for d = 2 it
    matches the Hessian derived by hand."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(4, 8, dtype=torch.float64, generator=gen)
    g = torch.randn(4, 8, dtype=torch.float64, generator=gen)
    w = torch.rand(8, dtype=torch.float64, generator=gen) + 0.5
    h = _graph_sweep._layer_norm_row_hessian(x, g, w, 1e-5, shared=True)
    torch.testing.assert_close(h, h.transpose(1, 2), rtol=0, atol=1e-12)
    ones = torch.cat([torch.ones(8, dtype=torch.float64), torch.zeros(8, dtype=torch.float64)])
    torch.testing.assert_close(h @ ones, torch.zeros(4, 16, dtype=torch.float64), rtol=0, atol=1e-12)
    assert h[:, :8, :8].abs().amax() > 1e-3 and h[:, :8, 8:].abs().amax() > 1e-3  # not trivially zero
    # d = 2, no weight: x̂ = ±δ/sqrt(δ² + eps) (1, −1) with δ = (x₁ − x₂)/2, so the Hessian is
    # (ḡ₁ − ḡ₂) f''(δ)/4 [[1, −1], [−1, 1]] with f''(δ) = −3 eps δ (δ² + eps)^(−5/2)
    x2, g2, eps = x[:, :2], g[:, :2], 0.05
    delta = (x2[:, 0] - x2[:, 1]) / 2
    fpp = -3 * eps * delta / (delta**2 + eps) ** 2.5
    pattern = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64)
    exact = ((g2[:, 0] - g2[:, 1]) * fpp / 4)[:, None, None] * pattern
    torch.testing.assert_close(
        _graph_sweep._layer_norm_row_hessian(x2, g2, None, eps, shared=False), exact, rtol=1e-12, atol=0
    )


# --- curvature propagation on the op-level engine (graph_sweep_cp_diagonal) ------------------

CP_CASES = [("attention", "cross_entropy"), ("layernorm_seq", "mse"), ("tied", "cross_entropy")]


@pytest.mark.parametrize(("name", "loss"), CP_CASES)
def test_cp_unbiased_and_stderr_calibrated(name: str, loss: str) -> None:
    """200 seeds of K=8 probes: every entry's (and the trace's) mean estimate within 4 standard
    errors of the exact dense value, and the reported stderr covers it in ~95% of the pairs
    (a t-statistic with 7 degrees of freedom: about 0.91 expected)."""
    model = _model(name)
    x, y = _data(name, loss, n=3)
    params = _params(model)
    exact = _reference(model, loss, "mean", params, x, y)
    fn = secorder.module_hessian_diagonal(
        model, loss, method="curvature_propagation", num_probes=8, with_stderr=True
    )
    seeds = 200
    ests, errs, trace_errs = [], [], []
    for s in range(seeds):
        d, e = fn(params, x, y, torch.Generator().manual_seed(s))
        ests.append(_flat(d))
        errs.append(_flat(e))
        trace_errs.append(fn.trace_stderr)
    est, err = torch.stack(ests), torch.stack(errs)
    assert fn.method_info.method == "curvature_propagation"
    # unbiasedness, per entry: entries with zero spread must be exact
    spread = est.std(0) / seeds**0.5
    random = spread > 1e-12
    assert random.sum() > exact.numel() // 2  # the estimate is genuinely random here
    assert ((est.mean(0) - exact).abs() <= 4 * spread + 1e-10).all()
    torch.testing.assert_close(est[:, ~random], exact[~random].expand(seeds, -1), rtol=1e-9, atol=1e-11)
    traces = est.sum(1)
    assert (traces.mean() - exact.sum()).abs() <= 4 * traces.std() / seeds**0.5
    # stderr calibration over (entry, seed) pairs, and for the trace over seeds
    covered = ((est - exact).abs() <= 1.96 * err)[:, random].double().mean()
    assert 0.88 <= float(covered) <= 0.99, float(covered)
    t_err = torch.stack(trace_errs)
    t_cov = ((traces - exact.sum()).abs() <= 1.96 * t_err).double().mean()
    assert 0.85 <= float(t_cov) <= 0.99, float(t_cov)


def test_cp_same_generator_state_same_result_any_chunk_size() -> None:
    model = _model("attention")
    x, y = _data("attention", "cross_entropy", n=4)
    params = _params(model)
    out = []
    for chunk in (2, 5, 64, 64):
        fn = secorder.module_hessian_diagonal(
            model, "cross_entropy", method="curvature_propagation", num_probes=3, chunk_size=chunk,
            with_stderr=True,
        )  # fmt: skip
        d, e = fn(params, x, y, torch.Generator().manual_seed(7))
        out.append((_flat(d), _flat(e), fn.trace_stderr))
    assert all(torch.equal(a, b) for a, b in zip(out[2], out[3]))  # bitwise: same state, same call
    for other in out[:2]:  # other chunk sizes: the same signs, summed in another order
        for a, b in zip(out[2], other):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    fn = secorder.module_hessian_diagonal(
        model, "cross_entropy", method="curvature_propagation", num_probes=3
    )
    assert not torch.equal(_flat(fn(params, x, y, torch.Generator().manual_seed(8))), out[2][0])


def test_cp_trace_with_stderr_on_a_refused_model() -> None:
    model = _model("layernorm_seq")
    x, y = _data("layernorm_seq", "mse", n=4)
    params = _params(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tr_fn = secorder.module_hessian_trace(
        model, "mse", method="curvature_propagation", num_probes=6, with_stderr=True
    )
    tr, tr_err = tr_fn(params, x, y, torch.Generator().manual_seed(3))
    diag_fn = secorder.module_hessian_diagonal(model, "mse", method="curvature_propagation", num_probes=6)
    d = diag_fn(params, x, y, torch.Generator().manual_seed(3))
    torch.testing.assert_close(tr, _flat(d).sum(), rtol=1e-12, atol=1e-12)
    assert torch.isfinite(tr_err) and tr_err > 0 and tr_err == diag_fn.trace_stderr
    assert tr_fn.method_info.method == "curvature_propagation"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # not mutated
    # one probe: no spread to estimate the error from
    one = secorder.module_hessian_trace(
        model, "mse", method="curvature_propagation", num_probes=1, with_stderr=True
    )
    assert torch.isnan(one(params, x, y, torch.Generator().manual_seed(0))[1])


@pytest.mark.parametrize("name", ["attention", "tied", "batchnorm"])
def test_cp_routes_to_the_op_level_engine(name: str) -> None:
    loss = "cross_entropy"
    model = _model(name)
    x, y = _data(name, loss, n=3)
    fn = secorder.module_hessian_diagonal(model, loss, method="curvature_propagation", num_probes=2)
    fn(_params(model), x, y, torch.Generator().manual_seed(0))
    info = fn.method_info
    assert info.method == "curvature_propagation"
    assert info.reason.startswith("op-level curvature propagation (module sweep refused: ")
    assert "K=2" in info.reason and info.num_columns > 0
    assert info.num_params == sum(p.numel() for p in model.parameters())


def test_cp_refused_by_both_engines_suggests_a_working_method() -> None:
    model = Branchy().double()
    x, y = _data("mlp", "mse")
    fn = secorder.module_hessian_diagonal(model, "mse", method="curvature_propagation", num_probes=2)
    with pytest.raises(secorder.SecorderError, match="per-sample data") as info:
        fn(_params(model), x, y)
    fix = str(info.value).split("per-sample data", 1)[1]
    assert "method='hvp'" in fix and "curvature_propagation" not in fix
    # and the exact route's error does not suggest curvature propagation either
    with pytest.raises(secorder.SecorderError, match="method='hvp'") as info2:
        secorder.module_hessian_diagonal(model, "mse", method="sweep")(_params(model), x, y)
    assert "curvature_propagation" not in str(info2.value)


def test_cp_exact_when_columns_do_not_overlap() -> None:
    """One elementwise op on disjoint parameter entries: every column reaches its own entry, so the
    estimate is exact for any signs, with zero standard errors (the docstring's case, K=4)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, generator=g, dtype=torch.float64)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)

    def loss(ls: list[Tensor], s: list[Tensor]) -> Tensor:
        return torch.sin(ls[0] * s[0]).sum()

    (d,), (e,), t_err, r = _graph_sweep.graph_sweep_cp_diagonal(
        loss, [w], [x], num_probes=4, generator=g, scale=None, batch_loss=loss([w], [x]) / 5, chunk_size=3
    )
    ref = torch.autograd.functional.hessian(lambda v: loss([v], [x]) / 5, w).diagonal()
    torch.testing.assert_close(d, ref, rtol=1e-12, atol=1e-14)
    assert e.abs().max() < 1e-12 and t_err.abs() < 1e-12 and r == 3


def test_curvature_propagation_checks_its_generator() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)).double()
    params = {k: p.detach() for k, p in model.named_parameters()}
    x, y = torch.randn(3, 3, dtype=torch.float64), torch.tensor([0, 1, 1])
    fn = secorder.module_hessian_diagonal(
        model, "cross_entropy", method="curvature_propagation", num_probes=2
    )
    with pytest.raises(TypeError, match=r"generator must be a torch.Generator or None, but received int"):
        fn(params, x, y, generator=0)
