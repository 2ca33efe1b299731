"""module_hessian_diagonal and curvature propagation on the structured engine against dense
float64 Hessian diagonals.

Models with LayerNorm, attention and affine eval-mode BatchNorm go through
module_hessian_diagonal(method="sweep"/"auto"/"curvature_propagation") (thin wrappers over
hessian_diagonal of the plain function); a weight tied on the left of a product, which the
engine refuses, through one-hot HVPs with the reason (method="auto") or an error naming it; single
ops through
secorder._engine.sweep directly.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

import secorder
from secorder._engine import sweep as engine
from secorder._engine.sweep import engine_cp_diagonal, engine_diagonal
from secorder._engine.tape import TapeUnsupportedError, record
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


class TiedLeft(nn.Module):
    """A weight on the parameter side AND the left of a product with data it computed (W h(W)ᵀ):
    no curvature rule covers that layout yet."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.mix(x))  # (N, 3)
        return (self.mix.weight[:2] @ h.T).T  # (N, 2)


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
        "tied_left": TiedLeft,
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
    ("tied_left", "cross_entropy", "mean"),
    ("layernorm_seq", "mse", "mean"),
    ("layernorm_seq", "cross_entropy", "mean"),
]


# models the engine refuses today (no rule yet), with the reason it gives
# (tied weights on the right of a product, h(W) @ W and h @ Wᵀ, take closed-form cross columns)
REFUSED = {"tied_left": "no curvature rule yet for aten.mm"}  # W @ h(W)ᵀ: W on the left


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
    ref = _reference(model, loss, reduction, params, x, y)
    if name in REFUSED:  # refused by the sweep (named), exact by one-hot HVPs with the reason
        fn = secorder.module_hessian_diagonal(model, loss, method="sweep", reduction=reduction)
        with pytest.raises(secorder.SecorderError, match=r"method='sweep'.*" + REFUSED[name]):
            fn(params, x, y)
        fn = secorder.module_hessian_diagonal(model, loss, reduction=reduction, chunk_size=7)
        torch.testing.assert_close(_flat(fn(params, x, y)), ref, rtol=1e-9, atol=1e-11)
        assert fn.method_info.method == "hvp" and REFUSED[name] in fn.method_info.reason
        return
    fn = secorder.module_hessian_diagonal(model, loss, method="sweep", reduction=reduction, chunk_size=7)
    got = fn(params, x, y)
    torch.testing.assert_close(_flat(got), ref, rtol=1e-9, atol=1e-11)
    info = fn.method_info
    assert info.method == "sweep" and "structured sweep" in info.reason and info.num_columns > 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # not mutated


def test_auto_and_trace_use_the_sweep() -> None:
    model = _model("attention")
    x, y = _data("attention", "cross_entropy")
    params = _params(model)
    ref = _reference(model, "cross_entropy", "mean", params, x, y)
    fn = secorder.module_hessian_trace(model, "cross_entropy")
    tr = fn(params, x, y)
    torch.testing.assert_close(tr, ref.sum(), rtol=1e-9, atol=1e-11)
    assert fn.method_info.method == "sweep" and "structured sweep" in fn.method_info.reason
    # "auto": R <= P here, so the cost model picks the sweep over one-hot HVPs
    auto = secorder.module_hessian_diagonal(model, "cross_entropy")
    torch.testing.assert_close(_flat(auto(params, x, y)), ref, rtol=1e-9, atol=1e-11)
    info = auto.method_info
    assert info.method == "sweep" and "structured sweep" in info.reason
    assert 0 < info.num_columns <= info.num_params


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


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_mlp_disjoint_skip_is_exact(loss: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, _ = _data("mlp", "mse", n=6)
    y = torch.randint(0, 3, (6,)) if loss == "cross_entropy" else torch.randn(6, 3, dtype=torch.float64)
    f, _ = secorder.module_loss(model, LOSS_FNS[loss])
    fn = secorder.hessian_diagonal(f, exact="sweep", chunk_size=1)
    got = _flat(fn(_params(model), x, y))
    r = fn.method_info.num_columns
    ref = _reference(model, loss, "mean", _params(model), x, y)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-11)
    # columns: the 4 tanh units, plus the loss (C − 1 = 2 cross-entropy columns, or 3 for mse);
    # no column from any matmul (disjoint leaves) or ReLU (no curvature)
    assert 4 < r <= 7


def test_train_batchnorm_refused() -> None:
    model = BatchNormNet().double().train()
    x, y = _data("batchnorm", "mse")
    with pytest.raises(secorder.SecorderError, match="samples that do not interact"):
        secorder.module_hessian_diagonal(model, "mse", method="sweep")(_params(model), x, y)

    def f(w: Tensor, x: Tensor) -> Tensor:  # batch statistics over the samples of x @ w
        h = F.batch_norm(x @ w, None, None, training=True)
        return (torch.tanh(h) ** 2).sum()

    w = torch.randn(3, 4, dtype=torch.float64)
    x = torch.randn(5, 3, dtype=torch.float64)
    with pytest.raises(secorder.SecorderError, match=r"exact='sweep'.*batch_norm"):
        secorder.hessian_diagonal(f, exact="sweep")(w, x)
    auto = secorder.hessian_diagonal(f)  # one-hot HVPs of the batch loss: exact here
    torch.testing.assert_close(auto(w, x).flatten(), dense_hessian(f, w, x).diagonal())
    assert auto.method_info.method == "hvp" and "batch_norm" in auto.method_info.reason


class Branchy(nn.Module):
    """Python control flow on a per-sample value (.item() through bool())."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.ln = nn.LayerNorm(2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln(self.fc(x))
        return h * 2 if bool(x.sum() > 0) else h


def test_data_dependent_control_flow() -> None:
    """The tape of the whole batch records the branch the data takes; the data are fixed for the
    Hessian, so the sweep is exact. Per-sample data read by .item() while recording are refused."""
    model = Branchy().double()
    x, y = _data("mlp", "mse")
    got = secorder.module_hessian_diagonal(model, "mse", method="sweep")(_params(model), x, y)
    ref = _reference(model, "mse", "mean", _params(model), x, y)
    torch.testing.assert_close(_flat(got), ref, rtol=1e-9, atol=1e-11)
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
    with pytest.raises(secorder.SecorderError, match=r"sub.*combines a sum over samples"):
        secorder.module_hessian_diagonal(model, "mse", method="sweep")(_params(model), x, y)


class LogSumExp(nn.Module):
    """logsumexp over the last dimension: no closed-form rule, a dense local Hessian per sample."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.out = nn.Linear(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.logsumexp(self.fc(x), -1, keepdim=True))


def test_large_generic_op_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    model = LogSumExp().double()
    x, y = _data("mlp", "mse")
    fn = secorder.module_hessian_diagonal(model, "mse", method="sweep")
    ref = _reference(model, "mse", "mean", _params(model), x, y)
    torch.testing.assert_close(_flat(fn(_params(model), x, y)), ref, rtol=1e-9, atol=1e-11)
    monkeypatch.setattr(engine, "MAX_LOCAL", 2)  # 4 entries per sample: over the limit
    with pytest.raises(secorder.SecorderError, match=r"logsumexp.*dense local Hessian limit 2"):
        fn(_params(model), x, y)
    # "auto" falls back to one-hot HVPs (P is small) and says why
    fn = secorder.module_hessian_diagonal(model, "mse")
    got = fn(_params(model), x, y)
    assert fn.method_info.method == "hvp" and "dense local Hessian limit 2" in fn.method_info.reason
    torch.testing.assert_close(_flat(got), ref, rtol=1e-9, atol=1e-11)


def test_device_and_chunking_invariance(device: torch.device) -> None:
    model = _model("attention").to(device)
    x, y = _data("attention", "bce_with_logits")
    x, y = x.to(device), y.to(device)
    params = _params(model)
    ref = _reference(model, "bce_with_logits", "mean", params, x, y)
    for chunk in (1, 1000):
        fn = secorder.module_hessian_diagonal(model, "bce_with_logits", method="sweep", chunk_size=chunk)
        got = _flat(fn(params, x, y))
        assert got.device == ref.device
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-11)


class PairInput(nn.Module):
    """Takes a list of tensors: the sweep needs batched tensor arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.ln = nn.LayerNorm(2)

    def forward(self, xs: list[Tensor]) -> Tensor:
        return self.ln(self.fc(xs[0]))


def test_unbatched_inputs_refused() -> None:
    model = PairInput().double()
    x, y = _data("mlp", "mse")
    with pytest.raises(secorder.SecorderError, match=r"batched along dimension 0.*args\[1\]: list"):
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
    mean-or-sum scale is guessed."""
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
    # exact there too
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
def test_multihead_masked_shared_layernorm_weight_exact(chunk: int) -> None:
    """Exact by "auto" (the engine's batch proof refuses the head reshape today: one-hot HVPs)."""
    torch.manual_seed(3)
    model = MultiHead().double()
    with torch.no_grad():
        model.ln.weight.uniform_(0.5, 1.5)
        model.ln.bias.uniform_(-0.5, 0.5)
    x = torch.randn(4, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    y = torch.randn(4, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    params = _params(model)
    fn = secorder.module_hessian_diagonal(model, "mse", chunk_size=chunk)
    got = fn(params, x, y)
    ref = _reference(model, "mse", "mean", params, x, y)
    torch.testing.assert_close(_flat(got), ref, rtol=1e-9, atol=1e-11)


def test_safe_softmax_and_fully_masked_rows() -> None:
    """aten._safe_softmax: a fully masked row gives zeros (and no curvature)."""
    w = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    mask = torch.tensor([[0.0, 0.0, 0.0, 0.0], [float("-inf")] * 4, [0.0, float("-inf"), 0.0, 0.0]])

    def loss(ls: list[Tensor], s: list[Tensor]) -> Tensor:
        u = (s[0] @ ls[0]).unsqueeze(1) * torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)[:, None] + mask
        p = torch.ops.aten._safe_softmax(u, -1)
        return (p * torch.arange(4.0, dtype=torch.float64)).sum() + (p**2).sum()

    (d,), r = engine_diagonal(lambda ls: loss(ls, [x]), [w], [x], chunk_size=4)
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
        (d,), _ = engine_diagonal(lambda ls: loss(ls, [x]), [w], [x], chunk_size=chunk)
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


def test_rows_beyond_the_dense_limit() -> None:
    t, d = 80, 64
    assert t * d > engine.MAX_LOCAL  # a dense local Hessian of either op would be refused
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
    f, _ = secorder.module_loss(model, F.cross_entropy)
    ref = secorder.hessian_diagonal(f, chunk_size=64)(params, x, y)  # one-hot HVPs, float64
    for k in params:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-9, atol=1e-12)


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

    # w at two ops meeting the data (the input and the affine weight), or an affine bias computed
    # from w, is refused by the engine today: "auto" takes one-hot HVPs there
    fn = secorder.hessian_diagonal(lambda v, x: loss([v], [x]), chunk_size=4)
    d = fn(w, x)
    ref = torch.autograd.functional.hessian(lambda v: loss([v], [x]), w).diagonal()
    torch.testing.assert_close(d, ref, rtol=1e-9, atol=1e-12)


# --- curvature propagation on the engine (engine_cp_diagonal) -------------------------------

CP_CASES = [("attention", "cross_entropy"), ("layernorm_seq", "mse")]


@pytest.mark.parametrize(("name", "loss"), CP_CASES)
def test_cp_unbiased_and_stderr_calibrated(name: str, loss: str) -> None:
    """120 seeds of K=8 probes: every entry's (and the trace's) mean estimate within 4 standard
    errors of the exact dense value, and the reported stderr covers it in ~95% of the pairs
    (a t-statistic with 7 degrees of freedom: about 0.91 expected)."""
    model = _model(name)
    x, y = _data(name, loss, n=3)
    params = _params(model)
    exact = _reference(model, loss, "mean", params, x, y)
    fn = secorder.module_hessian_diagonal(
        model, loss, method="curvature_propagation", num_probes=8, with_stderr=True
    )
    seeds = 120
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


def test_cp_trace_with_stderr() -> None:
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


@pytest.mark.parametrize(("name", "loss"), [("attention", "cross_entropy"), ("layernorm_seq", "mse")])
def test_cp_reports_the_engine(name: str, loss: str) -> None:
    model = _model(name)
    x, y = _data(name, loss, n=3)
    fn = secorder.module_hessian_diagonal(model, loss, method="curvature_propagation", num_probes=2)
    fn(_params(model), x, y, torch.Generator().manual_seed(0))
    info = fn.method_info
    assert info.method == "curvature_propagation"
    assert info.reason.startswith("curvature propagation over the batch tape")
    assert "K=2" in info.reason and info.num_columns > 0
    assert info.num_params == sum(p.numel() for p in model.parameters())


def test_cp_refused_suggests_a_working_method() -> None:
    model = Coupled().double()
    x, y = _data("mlp", "mse")
    fn = secorder.module_hessian_diagonal(model, "mse", method="curvature_propagation", num_probes=2)
    with pytest.raises(secorder.SecorderError, match="combines a sum over samples") as info:
        fn(_params(model), x, y)
    fix = str(info.value).split("per-sample terms there", 1)[1]
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

    (d,), (e,), (per_probe,), r = engine_cp_diagonal(
        lambda ls: loss(ls, [x]) / 5, [w], [x], num_probes=4, generator=g, chunk_size=3
    )
    ref = torch.autograd.functional.hessian(lambda v: loss([v], [x]) / 5, w).diagonal()
    torch.testing.assert_close(d, ref, rtol=1e-12, atol=1e-14)
    assert e.abs().max() < 1e-12 and per_probe.shape == (4, 3) and r == 3


def test_curvature_propagation_checks_its_generator() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)).double()
    params = {k: p.detach() for k, p in model.named_parameters()}
    x, y = torch.randn(3, 3, dtype=torch.float64), torch.tensor([0, 1, 1])
    fn = secorder.module_hessian_diagonal(
        model, "cross_entropy", method="curvature_propagation", num_probes=2
    )
    with pytest.raises(TypeError, match=r"generator must be a torch.Generator or None, but received int"):
        fn(params, x, y, generator=0)
