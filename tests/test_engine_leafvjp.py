"""The structured sweep's per-leaf fallback (secorder._engine.leafvjp): parameters no interface
covers (tied or twice-used weights, an embedding added to the tokens, a weight computed from
the leaves, the weight stacks of decomposed RNN kernels) get per-sample vector-Jacobian products.

Every result against dense float64 references built from the whole batch's Jacobian; the route
is reported (``path_info`` / ``method_info``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn
from torch.func import functional_call

import secorder
from secorder import fisher_diagonal, fisher_trace
from secorder._engine.sweep import engine_output_diagonal
from secorder._pytree import flatten, unflatten, unravel
from secorder.testing import dense_hessian, flat_function

DT = torch.float64
N = 5


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Tied(nn.Module):
    """Embedding table reused as the output head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.lin = nn.Embedding(7, 4), nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.lin(self.emb(x).mean(1))) @ self.emb.weight.T


class Twice(nn.Module):
    """One Linear called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(torch.tanh(self.a(x)))))


class PosEmb(nn.Module):
    """Token embedding + position embedding added (GPT-2/BERT style)."""

    def __init__(self) -> None:
        super().__init__()
        self.tok, self.pos, self.head = nn.Embedding(7, 4), nn.Embedding(3, 4), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.tok(x) + self.pos(torch.arange(x.shape[1], device=x.device))
        return self.head(torch.tanh(h).mean(1))


class ClsToken(nn.Module):
    """A learned token expanded to the batch and concatenated with the data (ViT style): the
    expanded token is sized by the batch, so the fallback restricts the whole op's cotangent."""

    def __init__(self) -> None:
        super().__init__()
        self.cls, self.head = nn.Parameter(torch.randn(1, 1, 3)), nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.cat([self.cls.expand(x.shape[0], 1, 3), x], 1)
        return self.head(torch.tanh(h).pow(2).sum(1))


class Recurrent(nn.Module):
    def __init__(self, cell: type[nn.Module]) -> None:
        super().__init__()
        self.rnn, self.head = cell(3, 4, batch_first=True), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def _case(name: str) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    y = torch.randint(0, 3, (N,), generator=_g(2))
    tokens = torch.randint(0, 7, (N, 3), generator=_g(1))
    seq = torch.randn(N, 3, 3, generator=_g(1), dtype=DT)
    model: nn.Module
    if name == "tied":
        model, x, y = Tied(), tokens, torch.randint(0, 7, (N,), generator=_g(2))
    elif name == "twice":
        model, x = Twice(), torch.randn(N, 4, generator=_g(1), dtype=DT)
    elif name == "posemb":
        model, x = PosEmb(), tokens
    elif name == "cls":
        model, x = ClsToken(), seq
    elif name == "weight_norm":
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        model[0] = torch.nn.utils.parametrizations.weight_norm(model[0])
        x = torch.randn(N, 4, generator=_g(1), dtype=DT)
    else:
        model, x = Recurrent({"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[name]), seq
    return model.to(DT), x, y


def _params(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in model.named_parameters()}


def _dense(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Per-sample diagonals (N, P) of J_nᵀ ∇²l J_n and of (1/N) ∇l_n ∇l_nᵀ for the mean
    cross-entropy, J the whole batch's Jacobian (float64, dense)."""
    params = _params(model)
    z_of, theta = flat_function(lambda p: functional_call(model, p, (x,)), (params,))
    z = z_of(theta)
    jac = torch.autograd.functional.jacobian(z_of, theta)  # (N, C, P)
    ggn, emp = [], []
    for n in range(N):
        ln = lambda zn, n=n: F.cross_entropy(zn[None], y[n : n + 1], reduction="sum") / N
        h = torch.autograd.functional.hessian(ln, z[n])
        g = torch.autograd.functional.jacobian(ln, z[n])
        ggn.append(torch.einsum("cp,cd,dp->p", jac[n], h, jac[n]))
        gn = jac[n].T @ g * N  # ∇l_n (the sample's own loss)
        emp.append(gn * gn / N)
    return {"ggn": torch.stack(ggn), "empirical": torch.stack(emp)}


def _split(params: dict[str, Tensor], rows: Tensor) -> dict[str, Tensor]:
    """(..., P) in secorder's flat order → per leaf (..., *shape)."""
    leaves, spec = flatten(params)
    parts, start = [], 0
    for leaf in leaves:
        parts.append(rows[..., start : start + leaf.numel()].reshape(*rows.shape[:-1], *leaf.shape))
        start += leaf.numel()
    return unflatten(spec, parts)  # type: ignore[no-any-return]


CASES = ["tied", "twice", "posemb", "cls", "weight_norm", "lstm", "gru", "rnn"]


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # vmap of weight_norm
@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("kind", ["ggn", "empirical"])
def test_fisher_through_the_sweep_matches_dense(name: str, kind: str) -> None:
    model, x, y = _case(name)
    params = _params(model)
    ref_rows = _dense(model, x, y)[kind]  # (N, P)
    ref, ref_each = _split(params, ref_rows.sum(0)), _split(params, ref_rows)
    auto = fisher_diagonal(model, "cross_entropy", kind=kind)
    auto_diag = auto(params, x, y)  # auto: the whole-batch VJPs (cheaper than per-leaf ones)
    assert auto.path_info.path == "generic", auto.path_info
    assert "per-leaf vector-Jacobian products" in auto.path_info.reason
    diag_fn = fisher_diagonal(model, "cross_entropy", kind=kind, path="fast")
    diag = diag_fn(params, x, y)
    assert diag_fn.path_info.path == "fast", diag_fn.path_info
    for k in params:
        torch.testing.assert_close(auto_diag[k], ref[k], rtol=1e-9, atol=1e-12)
    assert set(diag_fn.path_info.fast) == set(params)
    for k in params:
        torch.testing.assert_close(diag[k], ref[k], rtol=1e-9, atol=1e-12)
    tr_fn = fisher_trace(model, "cross_entropy", kind=kind, path="fast")
    torch.testing.assert_close(tr_fn(params, x, y), ref_rows.sum(), rtol=1e-9, atol=1e-12)
    assert tr_fn.path_info.path == "fast"
    # per-sample rows: row n is sample n's term (the rows sum to the diagonal)
    rows_fn = fisher_diagonal(model, "cross_entropy", kind=kind, per_sample=True, path="fast")
    rows = rows_fn(params, x, y)
    assert rows_fn.path_info.path == "fast"
    for k in params:
        torch.testing.assert_close(rows[k], ref_each[k], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 2, None])
def test_chunking_does_not_change_the_fallback(chunk: int | None) -> None:
    model, x, y = _case("lstm")
    params = _params(model)
    got = fisher_diagonal(model, "cross_entropy", chunk_size=chunk, path="fast")(params, x, y)
    ref = fisher_diagonal(model, "cross_entropy", path="generic")(params, x, y)
    for k in params:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-9, atol=1e-12)


def test_covered_and_fallback_leaves_together_with_signed_weights() -> None:
    """Signed per-sample column weights (an indefinite loss factor): a leaf used twice (fallback)
    beside a covered leaf, against Σ_n Σ_r w_nr (J_nᵀ s_nr)^⊙2 formed densely."""
    torch.manual_seed(3)
    p = [torch.randn(4, 4, dtype=DT), torch.randn(4, 2, dtype=DT)]
    x = torch.randn(N, 4, dtype=DT)

    def model(ls: list[Tensor]) -> Tensor:
        return torch.tanh(torch.tanh(x @ ls[0]) @ ls[0]) @ ls[1]

    cols = torch.randn(3, N, 2, dtype=DT)
    w = torch.randn(3, N, dtype=DT)
    got = engine_output_diagonal(model, p, [x], lambda a, b: cols[a:b], lambda a, b: w[a:b], 3, chunk_size=2)
    jac = torch.func.jacrev(lambda a, b: model([a, b]), argnums=(0, 1))(*p)  # per leaf (N, 2, *shape)
    for leaf, j in enumerate(jac):
        g = torch.einsum("rnc,nc...->rn...", cols, j)
        torch.testing.assert_close(got[leaf], torch.einsum("rn,rn...->...", w, g * g), rtol=1e-9, atol=1e-12)


def _dense_diag(f: Callable[..., Tensor], params: dict[str, Tensor], *args: Any) -> dict[str, Tensor]:
    diag = dense_hessian(lambda q: f(q, *args), params).diagonal()
    leaves, spec = flatten(params)
    return unflatten(spec, unravel(diag, [leaf.shape for leaf in leaves]))  # type: ignore[no-any-return]


@pytest.mark.parametrize("name", ["tied_data", "posemb", "reparam"])
def test_hessian_diagonal_exact_through_the_fallback(name: str) -> None:
    """Where no op couples a per-sample and a parameter-only argument of one leaf nonlinearly,
    the exact Hessian diagonal takes the sweep with the fallback leaves."""
    torch.manual_seed(4)
    x = torch.randn(N, 3, dtype=DT)
    x2 = torch.randn(N, 3, dtype=DT)
    y = torch.randint(0, 3, (N,))
    if name == "tied_data":  # one weight at two mm with data (two towers)
        params = {"w": torch.randn(3, 3, dtype=DT), "v": torch.randn(3, 3, dtype=DT)}

        def f(p: dict[str, Tensor], x: Tensor, x2: Tensor, y: Tensor) -> Tensor:
            h = torch.tanh(x @ p["w"]) + torch.sin(x2 @ p["w"])
            return F.cross_entropy(h @ p["v"], y)
    elif name == "posemb":
        params = {"pos": torch.randn(3, 3, dtype=DT), "v": torch.randn(3, 3, dtype=DT)}

        def f(p: dict[str, Tensor], x: Tensor, x2: Tensor, y: Tensor) -> Tensor:
            h = torch.tanh(x[:, :, None] + p["pos"])  # (N, 3, 3): a parameter added to data
            return F.cross_entropy(h.sum(1) @ p["v"], y)
    else:  # a weight computed from the leaves (weight-norm-like) meeting the data
        params = {"g": torch.randn(3, dtype=DT), "d": torch.randn(3, 3, dtype=DT)}

        def f(p: dict[str, Tensor], x: Tensor, x2: Tensor, y: Tensor) -> Tensor:
            w = p["d"] * (p["g"] / p["d"].norm(dim=0))
            return F.cross_entropy(torch.tanh(x @ w) + x2, y)

    fn = secorder.hessian_diagonal(f, exact="sweep")  # "auto" may prefer HVPs for so few parameters
    got = fn(params, x, x2, y)
    assert fn.method_info.method == "sweep", fn.method_info
    ref = _dense_diag(f, params, x, x2, y)
    for k in params:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-9, atol=1e-12)
    if name != "reparam":  # per-sample rows (a reparametrization has parameter-only curvature)
        rows = secorder.hessian_diagonal(f, exact="sweep", per_sample=True)(params, x, x2, y)
        for k in params:
            torch.testing.assert_close(rows[k].sum(0), ref[k], rtol=1e-9, atol=1e-12)
