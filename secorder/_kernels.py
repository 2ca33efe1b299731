"""Decomposed kernels: the one place secorder swaps fused kernels for their math form.

Some fused kernels have no double-backward or forward-mode derivative, so a Hessian-vector
product, a Jacobian-vector product or a recorded tape through them fails although the
function they compute is an ordinary composition of differentiable ops:

* ``F.scaled_dot_product_attention`` (Hugging Face's default ``"sdpa"`` attention, timm's
  ``fused_attn``, ``nn.MultiheadAttention``): the flash/efficient CPU and CUDA kernels have
  no double backward and no forward-mode rule. Under :func:`decomposed_kernels` the math
  backend runs (``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``): matmul, softmax,
  matmul, the same function.
* ``nn.MultiheadAttention``'s inference fast path (``aten::_native_multi_head_attention``,
  taken under ``no_grad``, e.g. while a tape is recorded): switched off
  (``torch.backends.mha.set_fastpath_enabled(False)``). Its slow path
  (``F.multi_head_attention_forward``) projects (L, N, E) inputs as (L·N, E) rows, which
  interleaves the samples with the positions; in its plain form (no masks, no dropout) it is
  computed samples-first instead (:func:`_mha`), the same function,
  so a recorded tape keeps the per-sample structure the structured sweep needs.
* ``nn.RNN``/``nn.LSTM``/``nn.GRU`` (``torch._VF.rnn_tanh``/``rnn_relu``/``lstm``/``gru``):
  the mkldnn (CPU, float32/bfloat16) and cuDNN kernels have no double backward or
  forward-mode rule, and the native CPU path breaks under ``vmap`` of a per-sample gradient.
  They are replaced by :func:`_rnn`, a Python loop over time steps of ``linear`` and
  pointwise ops with the same gate equations as the PyTorch documentation (one matrix
  product of all time steps' inputs per layer and direction, then one ``linear`` of the
  hidden state per step). Packed sequences keep the native kernel.

One more substitution fixes *which function* is differentiated rather than how:

* ``F.embedding`` with ``padding_idx`` (BERT's ``[PAD]`` row, ``nn.Embedding(padding_idx=)``):
  PyTorch's gradient rule freezes the padding row (zero gradient), while forward mode lets a
  tangent through it, so reverse-mode (exact, ``rev_rev``) and forward-mode (Taylor,
  Hutchinson of the GGN) routes differentiated different functions. secorder defines every
  quantity for the function in which the padding row is a constant, as the gradient rule
  says (its rows and columns of every curvature matrix are zero; the diagonal is zero
  there): under :func:`decomposed_kernels` the lookup is ``where(ids == padding_idx,
  out.detach(), out)`` with the same forward value.

One works around a failure of a fused kernel's double backward under ``vmap``:

* ``F.layer_norm`` of a tensor batched by :func:`torch.func.vmap` (e.g.
  ``vmap(hessian_trace(u, argnums=1))`` over points, strategy ``"rev_rev"``): the derivative
  of ``native_layer_norm_backward`` (PyTorch's layer-norm double backward) accumulates in
  place into a tensor that is not batched while the cotangent is, which ``vmap`` refuses
  ("inplace arithmetic ... not possible"). Under :func:`decomposed_kernels` a batched
  ``F.layer_norm`` is computed in its math form (mean, biased variance, ``rsqrt``, affine:
  :func:`_layer_norm`), whose derivatives are out of place. Unbatched calls (and so recorded
  tapes, whose rules know ``native_layer_norm``) keep the fused kernel.

And one keeps the user's model as it was:

* ``F.batch_norm`` in training mode updates ``running_mean``/``running_var`` in place. A
  loss written with ``functional_call(model, params, x)`` (buffers not passed) hands it the
  module's own buffers, so each of the many evaluations secorder makes would move them; under
  :func:`decomposed_kernels` clones go in (the normalization uses batch statistics, so the
  value is the same). ``nn.BatchNorm``'s own ``num_batches_tracked += 1`` happens in the
  module's Python code and still counts (it matters only for ``momentum=None``):
  :func:`secorder.module_loss` clones every buffer and changes nothing.

Every place that forms second derivatives or records a tape enters
:func:`decomposed_kernels`: the Hessian operator's products, the Fisher operators' products
and per-sample routes, :func:`secorder._engine.tape.record`, and the eager API's closure graph
(``secorder.core._closure.ClosureGraph``). Entering it is cheap and
re-entrant; under ``torch.compile`` it does nothing (the flags are global Python state).
The user's own evaluations outside secorder are untouched.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F  # noqa: N812 - the PyTorch convention
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["decomposed_kernels", "plain_kernels", "with_decomposed_kernels", "with_plain_kernels"]

_VF = torch._C._VariableFunctions
_RNN_FUNCS = {
    getattr(_VF, name): name for name in ("lstm", "gru", "rnn_tanh", "rnn_relu") if hasattr(_VF, name)
}


def _cell(kind: str, xw: Tensor, h: Tensor, c: Tensor | None, w_hh: Tensor, b_hh: Tensor | None,
          w_hr: Tensor | None) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """One time step; ``xw`` = x W_ihᵀ + b_ih (precomputed for all steps)."""
    hw = F.linear(h, w_hh, b_hh)
    if kind == "lstm":
        assert c is not None
        i, f, g, o = (xw + hw).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return (h if w_hr is None else F.linear(h, w_hr)), c
    if kind == "gru":
        xr, xz, xn = xw.chunk(3, dim=-1)
        hr, hz, hn = hw.chunk(3, dim=-1)
        r = torch.sigmoid(xr + hr)
        z = torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return (1 - z) * n + z * h, None
    pre = xw + hw
    return (torch.tanh(pre) if kind == "rnn_tanh" else torch.relu(pre)), None


def _rnn(kind: str, args: Sequence[Any]) -> Any:
    """``torch._VF.<kind>(input, hx, params, has_biases, num_layers, dropout, train,
    bidirectional, batch_first)`` as a composition of differentiable ops."""
    x, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first = args
    if kind == "lstm":
        h0, c0 = hx
    else:
        h0, c0 = hx, None
    if batch_first:
        x = x.transpose(0, 1)  # (T, B, F)
    dirs = 2 if bidirectional else 1
    per = 2 + (2 if has_biases else 0)
    proj = kind == "lstm" and h0.shape[-1] != c0.shape[-1]
    per += 1 if proj else 0
    h_out, c_out = [], []
    for layer in range(num_layers):
        outs = []
        for d in range(dirs):
            idx = layer * dirs + d
            w = params[idx * per : (idx + 1) * per]
            w_ih, w_hh = w[0], w[1]
            b_ih, b_hh = (w[2], w[3]) if has_biases else (None, None)
            w_hr = w[-1] if proj else None
            # all time steps at once, on the samples-first layout (N, T, F): its rows n·T + t keep
            # each sample's steps together, which a recorded tape's per-sample proof follows (the
            # time-major (T·N, F) rows would interleave the samples); the same products per row
            xw = F.linear(x.transpose(0, 1), w_ih, b_ih).transpose(0, 1)
            h, c = h0[idx], (c0[idx] if c0 is not None else None)
            steps = range(x.shape[0]) if d == 0 else range(x.shape[0] - 1, -1, -1)
            ys: list[Tensor] = []
            for t in steps:
                h, c = _cell(kind, xw[t], h, c, w_hh, b_hh, w_hr)
                ys.append(h)
            if d == 1:
                ys.reverse()
            outs.append(torch.stack(ys))
            h_out.append(h)
            if c is not None:
                c_out.append(c)
        x = outs[0] if dirs == 1 else torch.cat(outs, dim=-1)
        if dropout > 0 and train and layer < num_layers - 1:
            x = F.dropout(x, dropout, training=True)
    out = x.transpose(0, 1) if batch_first else x
    if kind == "lstm":
        return out, torch.stack(h_out), torch.stack(c_out)
    return out, torch.stack(h_out)


def _embedding(func: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """``F.embedding`` with ``padding_idx``: the padding row enters as a constant.

    PyTorch's gradient rule for ``padding_idx`` gives the padding row a zero gradient, but its
    forward-mode rule lets a tangent through; the lookup of the padding row is detached here,
    so reverse mode, forward mode and recorded tapes all differentiate the same function
    (see :func:`decomposed_kernels`).
    """
    names = ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    idx, weight, pad = bound["input"], bound["weight"], bound.get("padding_idx")
    if pad is None or bound.get("max_norm") is not None or not isinstance(weight, Tensor):
        return func(*args, **kwargs)
    pad = int(pad) + (weight.shape[0] if int(pad) < 0 else 0)
    bound["padding_idx"] = None
    out = func(**bound)
    return torch.where((idx == pad).unsqueeze(-1), out.detach(), out)


def _batch_norm(func: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """``F.batch_norm`` in training mode normalizes with the batch statistics and *updates*
    ``running_mean``/``running_var`` in place; a user's ``f`` built on ``functional_call``
    without buffers would pass the module's own buffers, and every one of secorder's many
    evaluations would move them. Clones go in instead: the same value, no write-back."""
    names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    if bound.get("training") and isinstance(bound.get("running_mean"), Tensor):
        bound["running_mean"] = bound["running_mean"].clone()
        if isinstance(bound.get("running_var"), Tensor):
            bound["running_var"] = bound["running_var"].clone()
    return func(**bound)


def _batched(obj: Any) -> bool:
    """Whether a tensor is batched by ``torch.func.vmap`` at any level of functorch wrapping."""
    f = torch._C._functorch
    if not isinstance(obj, Tensor):
        return False
    while f.is_functorch_wrapped_tensor(obj):
        if f.is_batchedtensor(obj):
            return True
        obj = f.get_unwrapped(obj)
    return False


def _layer_norm(func: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """``F.layer_norm`` of a ``vmap``-batched tensor in its math form (see
    :func:`decomposed_kernels`): the same function, with out-of-place derivatives of every order."""
    names = ("input", "normalized_shape", "weight", "bias", "eps")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    x, w, b = bound["input"], bound.get("weight"), bound.get("bias")
    if not any(_batched(t) for t in (x, w, b)) or not isinstance(x, Tensor):
        return func(*args, **kwargs)
    eps = bound.get("eps", 1e-5)
    dims = tuple(range(-len(tuple(bound["normalized_shape"])), 0))
    # half precision: statistics in float32, as the fused kernel computes them
    z = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    mu = z.mean(dims, keepdim=True)
    zc = z - mu
    out = (zc * torch.rsqrt((zc * zc).mean(dims, keepdim=True) + eps)).to(x.dtype)
    if w is not None:
        out = out * w
    if b is not None:
        out = out + b
    return out


_MHA_ARGS = (
    "query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias",
    "bias_k", "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias",
)  # fmt: skip


def _mha(func: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """``F.multi_head_attention_forward`` (what ``nn.MultiheadAttention`` calls, with inputs
    (L, N, E): ``batch_first`` modules transpose before) computed samples-first: the original
    flattens (L, N, E) to (L·N, E) for its projections, which interleaves the samples with the
    positions, so a recorded tape's per-sample proof (:mod:`secorder._engine.batch`) cannot
    follow it; here the inputs go back to (N, L, E) first, and the same projections, heads,
    ``scaled_dot_product_attention`` (or, with ``need_weights``, the original's explicit
    softmax and product, the weights averaged over heads unless ``average_attn_weights=False``)
    and output projection follow (the same function, the same arithmetic per row). Only the
    plain case: one packed projection weight, no masks, no ``bias_k``/``bias_v``/
    ``add_zero_attn``/static keys, no dropout; anything else calls the original."""
    b = dict(zip(_MHA_ARGS, args))
    b.update(kwargs)
    q, k, v = b["query"], b["key"], b["value"]
    w, bias = b["in_proj_weight"], b["in_proj_bias"]
    plain = (
        isinstance(q, Tensor)
        and isinstance(k, Tensor)
        and isinstance(v, Tensor)
        and q.dim() == 3
        and k.dim() == 3
        and k.shape == v.shape
        and isinstance(w, Tensor)
        and not b.get("use_separate_proj_weight", False)
        and b.get("bias_k") is None
        and b.get("bias_v") is None
        and not b.get("add_zero_attn", False)
        and (b.get("dropout_p", 0.0) == 0.0 or not b.get("training", True))
        and b.get("key_padding_mask") is None
        and b.get("attn_mask") is None
        and not b.get("is_causal", False)
        and b.get("static_k") is None
        and b.get("static_v") is None
        and q.shape[-1] == b["embed_dim_to_check"]
    )
    if not plain:
        return func(*args, **kwargs)
    n, length, e = q.shape[1], q.shape[0], q.shape[2]
    heads = int(b["num_heads"])
    qb, kb, vb = (t.transpose(0, 1) for t in (q, k, v))  # (N, L, E): samples first
    if q is k and k is v:
        qp, kp, vp = F.linear(qb, w, bias).chunk(3, -1)
    else:
        ws = w.chunk(3)
        bs = bias.chunk(3) if bias is not None else (None, None, None)
        qp, kp, vp = (F.linear(t, wi, bi) for t, wi, bi in zip((qb, kb, vb), ws, bs))
    qh, kh, vh = (t.unflatten(-1, (heads, e // heads)).transpose(1, 2) for t in (qp, kp, vp))
    weights = None
    if b.get("need_weights", True):  # the original's explicit softmax(q kᵀ/√d) and product
        attn = torch.softmax((qh * (1.0 / (e // heads)) ** 0.5) @ kh.transpose(-2, -1), -1)  # (N, H, L, S)
        out = attn @ vh
        weights = attn.mean(1) if b.get("average_attn_weights", True) else attn
    else:
        out = F.scaled_dot_product_attention(qh, kh, vh)  # (N, H, L, hd)
    out = F.linear(out.transpose(1, 2).reshape(n, length, e), b["out_proj_weight"], b["out_proj_bias"])
    return out.transpose(0, 1), weights


_SUBSTITUTED = frozenset(
    {F.embedding, F.batch_norm, F.layer_norm, F.multi_head_attention_forward, *_RNN_FUNCS}
)  # the functions _Decomposed replaces


class _Decomposed(TorchFunctionMode):
    """Routes the (unpacked) ``torch._VF`` RNN kernels through :func:`_rnn`, freezes the
    padding row of ``F.embedding`` (:func:`_embedding`), keeps train-mode ``F.batch_norm``
    from writing running statistics back (:func:`_batch_norm`), computes a ``vmap``-batched
    ``F.layer_norm`` in its math form (:func:`_layer_norm`) and ``nn.MultiheadAttention``'s
    attention samples-first (:func:`_mha`)."""

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        if func not in _SUBSTITUTED:  # every other call, one set lookup (the recorder's forward)
            return func(*args, **(kwargs or {}))
        kwargs = kwargs or {}
        if func is F.embedding:
            return _embedding(func, args, kwargs)
        if func is F.batch_norm:
            return _batch_norm(func, args, kwargs)
        if func is F.layer_norm:
            return _layer_norm(func, args, kwargs)
        if func is F.multi_head_attention_forward:
            return _mha(func, args, kwargs)
        kind = _RNN_FUNCS.get(func)
        # packed sequences pass batch_sizes second and the params list fourth
        unpacked = len(args) == 9 and isinstance(args[2], (list, tuple))
        if unpacked and kind == "lstm":  # packed LSTM: hx (a tuple) third, params fourth
            unpacked = not isinstance(args[3], (list, tuple))
        if kind is not None and not kwargs and unpacked:
            return _rnn(kind, args)
        return func(*args, **kwargs)


@contextlib.contextmanager
def _mha_fastpath_off() -> Iterator[None]:
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):  # pragma: no cover - old torch
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


_SDP_FLAGS = [
    (name == "math", getattr(torch._C, f"_get_{name}_sdp_enabled"), getattr(torch._C, f"_set_sdp_use_{name}"))
    for name in ("cudnn", "flash", "mem_efficient", "math", "overrideable")
    if hasattr(torch._C, f"_get_{name}_sdp_enabled") and hasattr(torch._C, f"_set_sdp_use_{name}")
]  # (enabled in the block, getter, setter) of each attention backend's global flag


@contextlib.contextmanager
def _math_attention() -> Iterator[None]:
    """``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`` by the same global flags, without its
    list and enum handling (2 µs instead of 10 per entry: every recording enters it)."""
    before = [get() for _, get, _ in _SDP_FLAGS]
    try:
        for math_backend, _, set_ in _SDP_FLAGS:
            set_(math_backend)
        yield
    finally:
        for (_, _, set_), enabled in zip(_SDP_FLAGS, before):
            set_(enabled)


_depth = 0


@contextlib.contextmanager
def decomposed_kernels() -> Iterator[None]:
    """Run the block with attention and RNN kernels in their decomposed (math) form.

    Re-entrant (an inner entry does nothing); a no-op while ``torch.compile`` traces.
    """
    global _depth
    if _depth > 0 or torch.compiler.is_compiling():
        yield
        return
    _depth += 1
    try:
        with _math_attention(), _mha_fastpath_off(), _Decomposed():
            yield
    finally:
        _depth -= 1


@contextlib.contextmanager
def plain_kernels() -> Iterator[None]:
    """Suspend :func:`decomposed_kernels` for secorder's own arithmetic on recorded values.

    The substitutions concern the user's function only; a tape walk calls ATen ops on values
    already recorded, and under the ``TorchFunctionMode`` each of its several hundred torch
    calls per evaluation would pass through a Python intercept. Inside this block the mode is
    off (a nested :func:`decomposed_kernels`, around a new evaluation of the user's function,
    enters it again); it does nothing when the mode is not the innermost one.
    """
    global _depth
    stack = torch.overrides._get_current_function_mode_stack()
    if _depth == 0 or not stack or not isinstance(stack[-1], _Decomposed):
        yield
        return
    saved = _depth
    _depth = 0
    try:
        with torch.overrides._pop_mode_temporarily():
            yield
    finally:
        _depth = saved


_F = TypeVar("_F", bound=Callable[..., Any])


def with_decomposed_kernels(fn: _F) -> _F:
    """Decorator form of :func:`decomposed_kernels`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with decomposed_kernels():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def with_plain_kernels(fn: _F) -> _F:
    """Decorator form of :func:`plain_kernels`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with plain_kernels():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
