"""Exact Hessian diagonal of an ``nn.Module`` loss by structured second-order backpropagation.

For a loss built from operations v_k = f_k(u_k), with ḡ_k the adjoint of op k's output,
J_k the Jacobian of its input u_k with respect to the parameters θ, and
M_k = ∇²_u ⟨ḡ_k, f_k(u)⟩ the op's gradient-weighted local Hessian, the Hessian is exactly

    H = Σ_k J_kᵀ M_k J_k

(the second-order adjoint identity; Bishop 1992; Dangel, Harmeling and Hennig 2020 unroll it
along a chain). With M_k = Σ_c σ_c s_c s_cᵀ (signed columns),

    diag H = Σ_k Σ_c σ_c (J_kᵀ s_c)²,

and every J_kᵀ s_c is a vector-Jacobian product. Samples are independent, so the square is
taken per sample (of the gradient summed over every use of a shared weight, i.e. over
positions of a Linear over a sequence or of a convolution). Which ops contribute:

* the loss: M = ∇²_z L, the columns of :meth:`secorder._losses.LossSpec.factor` (the GGN; for
  cross-entropy on (N, C) logits C − 1 columns, its rank: see :func:`_loss_factor`);
* elementwise activations a = φ(u) (tanh, sigmoid, GELU, SiLU, softplus, ELU, ...):
  M = diag(ḡ ⊙ φ''(u)) per sample: one signed column e_j per unit, weight ḡ_j φ''(u_j);
* ops linear in their tensor inputs (adds, reshapes, concatenation, pooling, ReLU and other
  piecewise-linear maps, products with constants) and ``nn.Linear`` / ``nn.Conv2d`` /
  ``nn.Embedding`` (linear in the weight for a fixed input; x does not depend on its own
  layer's weight) contribute nothing.

Implementation: one forward pass with the layer hooks of :class:`secorder._layers.FastCapture`
(which records each layer's inputs and outputs) under a ``TorchFunctionMode`` that records the
activations and refuses every op it does not know to be covered by the rules above (attention
products of two parameter-dependent tensors, LayerNorm, train-mode BatchNorm, ...). One backward
pass gives the activation adjoints ḡ; the columns are then pulled back to the layer outputs by
batched backward passes (``is_grads_batched``, a chunk of columns at a time; on CPU one plain
pass per column when one column's gradients are large), and the layers' matrix-product rules
of :mod:`secorder._layers` square and sum the per-sample gradients. An activation's columns
e_j need no backward pass at the ``nn.Linear`` that produces its input (the layer's deferred
Σ_c w_c δ_c^⊙2 gains w itself) nor, through one more elementwise activation ψ of another
Linear's output u', at that layer (ψ'(u')^⊙2 ⊙ (w W^⊙2)); further up a chain of Linear layers
and elementwise activations the per-sample columns are carried by matrix products, and only
where the chain ends are they handed to backward passes (see :class:`_UnitPlan`).

Curvature propagation (Martens, Sutskever and Swersky 2012): with independent random signs
v_{n,c} per sample and column, the cotangents P = Σ_{σ_c>0} v_c s_c and Q = Σ_{σ_c<0} v_c s_c
(all ops at once) give E[(J_nᵀ P)² − (J_nᵀ Q)²] = diag H_n exactly: an unbiased estimate at
two backward passes per probe (done as one batched pass of two cotangents).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from secorder._errors import error
from secorder._layers import FastCapture, _Conv2dLayer, _LinearLayer
from secorder._losses import CrossEntropyLoss, Factor, LossSpec
from secorder._persample import ColumnAccumulator

__all__ = ["ACTIVATIONS", "SweepTooCostlyError", "SweepUnsupportedError", "sweep_diagonal"]

# Elementwise ops with curvature: their second derivative is taken by autodiff.
ACTIVATIONS = frozenset(
    {"tanh", "sigmoid", "gelu", "silu", "softplus", "elu", "selu", "celu", "mish", "logsigmoid", "softsign"}
)
# Ops linear (or piecewise linear) in each tensor argument and jointly linear in all of them.
_LINEAR = frozenset(
    {
        "add", "sub", "rsub", "neg", "cat", "concat", "concatenate", "stack", "hstack", "vstack",
        "reshape", "view", "view_as", "flatten", "unflatten", "permute", "transpose", "t", "mT",
        "contiguous", "squeeze", "unsqueeze", "getitem", "sum", "mean", "clone", "expand",
        "expand_as", "repeat", "split", "chunk", "narrow", "select", "movedim", "moveaxis",
        "unbind", "pad", "relu", "relu6", "leaky_relu", "hardtanh", "max_pool1d", "max_pool2d",
        "max_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices", "avg_pool1d",
        "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
        "adaptive_max_pool2d", "adaptive_max_pool2d_with_indices", "identity", "float", "double",
        "to", "type_as", "detach", "flip", "roll", "zero_pad2d", "constant_pad_nd",
    }
)  # fmt: skip
# Products: linear as long as at most one tensor argument depends on the parameters.
_PRODUCTS = frozenset({"mul", "rmul", "matmul", "mm", "bmm", "einsum", "outer", "linear", "conv1d", "conv2d"})
_DIVISIONS = frozenset({"div", "truediv", "true_divide"})
_METADATA = frozenset(
    {"size", "dim", "numel", "is_floating_point", "shape", "dtype", "device", "ndim", "requires_grad",
     "grad_fn", "is_leaf", "data_ptr", "stride", "storage_offset", "is_contiguous", "get_device",
     "element_size", "__get__", "_version", "grad", "names", "layout", "is_sparse", "is_cuda"}
)  # fmt: skip


class SweepUnsupportedError(Exception):
    """An op of the model is not covered by the sweep's rules (``reason`` says which)."""


class SweepTooCostlyError(SweepUnsupportedError):
    """More columns per sample than ``max_columns`` (``args[0]`` is the count R)."""


def _name(func: Any) -> str:
    name = getattr(func, "__name__", str(func))
    if name == "__get__":
        owner = getattr(func, "__self__", None)
        name = getattr(owner, "__name__", name)
    return name.strip("_")


def _tensors(args: Sequence[Any], kwargs: dict[str, Any]) -> list[Tensor]:
    out: list[Tensor] = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(b for b in a if isinstance(b, Tensor))
    return out


class _Activation:
    __slots__ = ("derivs", "func", "input", "kwargs", "output", "version")

    def __init__(self, func: Any, inp: Tensor, output: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]):
        self.func = func
        self.input = inp
        self.output = output
        self.kwargs = (args, kwargs)
        self.version = (inp._version, output._version)
        self.derivs: tuple[Tensor, Tensor] | None = None

    def derivatives(self) -> tuple[Tensor, Tensor]:
        """φ'(u) and φ''(u) elementwise, by differentiating Σ φ(u) and Σ φ'(u) (φ acts elementwise)."""
        if self.derivs is not None:
            return self.derivs
        args, kwargs = self.kwargs
        with torch.enable_grad():
            x = self.input.detach().requires_grad_(True)
            y = self.func(x, *args, **kwargs)
            (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
            (h,) = torch.autograd.grad(g.sum(), x, allow_unused=True) if g.requires_grad else (None,)
        self.derivs = (g.detach(), torch.zeros_like(x) if h is None else h)
        return self.derivs


class _Recorder(TorchFunctionMode):
    """Records elementwise activations; raises :class:`SweepUnsupportedError` for unknown curvature."""

    def __init__(self, fast: set[int], n: int | None = None) -> None:
        super().__init__()
        self.fast = fast
        self.activations: list[_Activation] = []
        self.problem: str | None = None

    def _refuse(self, reason: str) -> None:
        if self.problem is None:
            self.problem = reason

    def __torch_function__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = _name(func)
        if name in _METADATA or self.problem is not None:
            return out
        outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(o, Tensor)]
        if not any(o.requires_grad for o in outs):
            return out
        tensors = _tensors(args, kwargs)
        dep = [t for t in tensors if t.requires_grad]
        if name in ACTIVATIONS:
            if (
                kwargs.get("inplace")
                or name.endswith("_")
                or len(dep) != 1
                or not args
                or dep[0] is not args[0]
                or not isinstance(out, Tensor)
            ):
                self._refuse(f"{name} in place or on several parameter-dependent tensors")
            else:
                self.activations.append(_Activation(func, args[0], out, tuple(args[1:]), kwargs))
        elif name in _LINEAR or name.rstrip("_") in _LINEAR:
            if name.endswith("_") or kwargs.get("inplace"):
                self._refuse(f"in-place {name}")
        elif name in ("linear", "conv1d", "conv2d", "embedding"):
            # weight and bias must be parameters of a recorded fast layer, or constants
            for t in tensors[1:]:
                if t.requires_grad and id(t) not in self.fast:
                    self._refuse(f"{name} with a weight that depends on the parameters in another way")
        elif name in _PRODUCTS:
            if len(dep) > 1:
                self._refuse(f"{name} of two parameter-dependent tensors (a bilinear op, e.g. attention)")
        elif name in _DIVISIONS:
            if len(tensors) > 1 and tensors[1].requires_grad:
                self._refuse(f"{name} by a parameter-dependent tensor")
        elif name == "dropout" or name.endswith("dropout"):
            training = kwargs.get("training", args[2] if len(args) > 2 else True)
            p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
            if training and p > 0:
                self._refuse("dropout in train mode (a random function)")
        elif name == "batch_norm":
            training = kwargs.get("training", args[5] if len(args) > 5 else False)
            if training:
                raise error(
                    "module_hessian_diagonal(model, loss)",
                    "the structured sweep squares per-sample gradients, which needs a model that "
                    "treats the samples of a batch independently",
                    "BatchNorm normalizing with batch statistics (train mode or track_running_stats=False)",
                    "Call model.eval() to use the running statistics, or use method='hvp' (one-hot "
                    "Hessian-vector products of the whole batch loss).",
                )
            affine = [t for t in tensors[3:5] if t.requires_grad]
            if affine:
                self._refuse("BatchNorm with trainable affine parameters (no sweep rule yet)")
        else:
            self._refuse(f"the op '{name}' (no sweep rule)")
        return out


# Bytes of the largest layer-output gradient of the columns pulled back in one batched pass, when
# ``chunk_size`` is None: on CPU, 42 MB batches of a CNN's (k, N, C, H, W) gradients ran 2-3x slower
# than batches of 2-5 columns (blocks this large are freshly mapped, page-faulted memory).
_COLUMN_BYTES = 16 << 20
# From this size of one column's largest layer-output gradient (CPU, ``chunk_size`` None), columns
# go through plain backward passes one at a time: vmap runs a convolution's backward per column
# and concatenates, and its batched ReLU backward was slower too (benchmark CNN: 39 ms for 9
# columns one at a time against 54-68 ms in batches of 2-4, 1 thread).
_LOOP_BYTES = 1 << 20

_Pull = Callable[[list[tuple[Tensor, Tensor]], "Tensor | None", ColumnAccumulator, frozenset[int]], None]


class _UnitPlan:
    """The columns e_j (weights w_j) of a curved activation, in closed form along chains of layers.

    When the activation input u = W a (+ b) is the output of a ``nn.Linear`` called once on
    ``(N, in_features)``, column e_j gives that layer the per-sample weight gradient e_j a_nᵀ,
    i.e. Σ_n w_{n,j} a_n^⊙2 in row j: the layer's deferred Σ_c w_c δ_c^⊙2 gains w itself, with
    no backward pass. The column's pullback to a is the row W_j. When a = ψ(u') is an
    elementwise activation of the output u' of another such layer, the columns at u' are
    ψ'(u') ⊙ W_j, and Σ_j w_j (ψ'(u') ⊙ W_j)^⊙2 = ψ'(u')^⊙2 ⊙ (w W^⊙2): one matrix product.
    Further up such a chain the columns δ_j differ per sample; they are carried explicitly
    (δ ← ψ'(u'') ⊙ (δ W'), adding ψ'^⊙2 ⊙ Σ_j w_j (δ_j W')^⊙2 to each layer) and handed to a
    batched backward pass only where the chain ends in another kind of node. When u is the
    output of a ``nn.Conv2d`` called once, that layer's part is closed too (Σ_{n,p} w U_n^⊙2 per
    output channel) and only the layers upstream get one-hot columns. Any other graph (the
    activation input not a layer output, e.g. a residual add; a Linear over positions) uses
    one-hot columns at the activation input.
    """

    def __init__(self, capture: FastCapture, acts: Sequence[_Activation]) -> None:
        self.leaves = capture.leaves
        self.single: dict[int, _LinearLayer] = {
            id(layer.records[0].output): layer
            for layer in capture.layers
            if isinstance(layer, _LinearLayer) and len(layer.records) == 1 and layer.positions == 1
        }
        self.convs: dict[int, _Conv2dLayer] = {
            id(layer.records[0].output): layer
            for layer in capture.layers
            if isinstance(layer, _Conv2dLayer) and len(layer.records) == 1
        }
        self.acts = {id(a.output): a for a in acts}

    def _weight(self, layer: _LinearLayer) -> Tensor | None:
        idx = layer.attrs.get("weight")
        return None if idx is None else self.leaves[idx].detach()

    def _step(self, x: Tensor) -> tuple[_Activation, _LinearLayer] | None:
        """(ψ, layer) when x = ψ(u') is an elementwise activation of a one-position Linear's output u'."""
        prev = self.acts.get(id(x))
        layer = None if prev is None else self.single.get(id(prev.input))
        return None if prev is None or layer is None else (prev, layer)

    def unit_columns(
        self, act: _Activation, w: Tensor, chunk: int, pull: _Pull, acc: ColumnAccumulator
    ) -> None:
        """Add Σ_j w_j (J e_j)^⊙2 terms of the columns e_j at ``act.input`` to the layers."""
        n = w.shape[0]
        flat_w = w.reshape(n, -1)
        conv = self.convs.get(id(act.input))
        if conv is not None:  # the convolution producing u in closed form, one-hot columns upstream
            conv.add_units(w, acc)
            if conv.records[0].input.requires_grad:
                self._one_hot(act.input, flat_w, chunk, pull, acc, frozenset({id(conv)}))
            return
        layer = self.single.get(id(act.input))
        if layer is None:
            self._one_hot(act.input, flat_w, chunk, pull, acc, frozenset())
            return
        layer.add_diagonal(flat_w)
        x = layer.records[0].input
        weight = self._weight(layer)
        if not x.requires_grad:
            return
        if weight is None:  # a weight outside the params: one-hot columns for the layers upstream
            self._one_hot(act.input, flat_w, chunk, pull, acc, frozenset({id(layer)}))
            return
        step = self._step(x)
        if step is None:  # dense rows W_j at the layer input
            for j0, j1 in _ranges(flat_w.shape[1], chunk):
                rows = weight[j0:j1, None, :].expand(j1 - j0, n, weight.shape[1])
                pull([(x, rows.reshape(j1 - j0, *x.shape))], flat_w[:, j0:j1].T, acc, frozenset())
            return
        prev, inner = step
        d1 = prev.derivatives()[0].reshape(n, -1)
        inner.add_diagonal(d1 * d1 * (flat_w @ (weight * weight)))
        if not inner.records[0].input.requires_grad:
            return
        for j0, j1 in _ranges(flat_w.shape[1], chunk):
            self._walk(d1 * weight[j0:j1, None, :], flat_w[:, j0:j1].T, prev, inner, pull, acc)

    def _walk(
        self,
        delta: Tensor,
        wt: Tensor,
        act: _Activation,
        layer: _LinearLayer,
        pull: _Pull,
        acc: ColumnAccumulator,
    ) -> None:
        """Carry columns ``delta`` (k, N, d) at ``layer``'s output (already in its D2) upstream.

        ``layer``'s input requires grad (there are layers upstream).
        """
        k, n = delta.shape[:2]
        while True:
            x = layer.records[0].input
            weight = self._weight(layer)
            if weight is None:
                pull([(act.input, delta.reshape(k, *act.input.shape))], wt, acc, frozenset({id(layer)}))
                return
            cols = delta @ weight  # (k, N, d_in): the columns at x
            step = self._step(x)
            if step is None:
                pull([(x, cols.reshape(k, *x.shape))], wt, acc, frozenset())
                return
            act, layer = step
            d1 = act.derivatives()[0].reshape(n, -1)
            layer.add_diagonal(d1 * d1 * _weighted_squares(cols, wt))
            if not layer.records[0].input.requires_grad:
                return
            delta = cols * d1

    def _one_hot(
        self,
        node: Tensor,
        flat_w: Tensor,
        chunk: int,
        pull: _Pull,
        acc: ColumnAccumulator,
        skip: frozenset[int],
    ) -> None:
        n, units = flat_w.shape
        for s0, s1 in _ranges(units, chunk):
            eye = torch.zeros(s1 - s0, units, dtype=flat_w.dtype, device=flat_w.device)
            eye[torch.arange(s1 - s0), torch.arange(s0, s1)] = 1.0
            cot = eye[:, None, :].expand(s1 - s0, n, units).reshape(s1 - s0, *node.shape)
            pull([(node, cot)], flat_w[:, s0:s1].T, acc, skip)


def _loss_factor(loss: LossSpec, z: Tensor, targets: Any) -> Factor:
    """The loss Hessian's columns; for cross-entropy on ``(N, C)`` logits C − 1 of them (its rank).

    diag(p) − ppᵀ = Σ_{j<C} D_j l_j l_jᵀ (the LDLᵀ factorization of the multinomial
    covariance): with the classes sorted by probability, largest last, tail masses
    q_j = Σ_{i>j} p_i (q_{-1} = Σ p = 1), D_j = p_j q_j / q_{j-1}, (l_j)_j = 1 and (l_j)_i = −p_i / q_j
    for i > j. Every q_j ≥ max p ≥ 1/C, so no division is ill-conditioned.
    """
    if not isinstance(loss, CrossEntropyLoss) or z.dim() != 2 or z.shape[1] < 2:
        return loss.factor(z, targets)
    c = z.shape[1]
    p = torch.softmax(z, dim=1)
    order = p.argsort(dim=1)
    ps = p.gather(1, order)  # ascending: the largest probability last
    tail = ps.flip(1).cumsum(1).flip(1)  # tail[:, j] = Σ_{i≥j} ps_i
    q, q_prev = tail[:, 1:], tail[:, :-1]  # (N, C−1): q_j and q_{j−1}
    d = ps[:, :-1] * q / q_prev
    j = torch.arange(c - 1, device=z.device)[:, None]
    i = torch.arange(c, device=z.device)[None, :]
    low = (-ps[:, None, :] / q[:, :, None]) * (i > j)  # (N, C−1, C): −p_i / q_j below the diagonal
    cols_sorted = d.sqrt()[:, :, None] * (low + (i == j).to(z.dtype))
    cols = torch.zeros_like(cols_sorted).scatter(2, order[:, None, :].expand(-1, c - 1, -1), cols_sorted)
    return Factor.from_tensor(cols.transpose(0, 1).contiguous())


def _weighted_squares(cols: Tensor, wt: Tensor) -> Tensor:
    """Σ_j wt[j, n] cols[j, n, :]^⊙2 as an (N, d) tensor, by one batched product over the samples."""
    return torch.bmm(wt.T.unsqueeze(1), (cols * cols).transpose(0, 1)).squeeze(1)


def _ranges(total: int, step: int) -> list[tuple[int, int]]:
    return [(s, min(total, s + step)) for s in range(0, total, step)]


def sweep_diagonal(
    call: str,
    model: nn.Module,
    names: Sequence[str],
    leaves: Sequence[Tensor],
    forward: Callable[[list[Tensor]], Any],
    loss: LossSpec,
    targets: Any,
    *,
    num_probes: int | None,
    generator: torch.Generator | None,
    chunk_size: int | None,
    max_columns: int | None = None,
) -> tuple[list[Tensor], list[Tensor] | None, int]:
    """The Hessian diagonal per leaf, and R.

    For curvature propagation also the per-entry stderr per leaf, followed by one more
    0-dim tensor: the standard error of the trace over the probes.

    Raises :class:`SweepUnsupportedError` when a parameter or op is not covered by the rules.
    """
    capture = FastCapture(model, names, leaves, create_graph=False)
    fast_ids = {id(capture.leaves[i]) for i in capture.fast_indices}
    recorder = _Recorder(fast_ids)

    def run(ls: list[Tensor]) -> Any:
        recorder.activations, recorder.problem = [], None  # FastCapture may rerun the forward
        with recorder:
            return forward(ls)

    with torch.enable_grad():
        z = capture.forward(run)
    if recorder.problem is not None:
        raise SweepUnsupportedError(recorder.problem)
    if capture.generic_indices:
        bad = ", ".join(names[i] for i in capture.generic_indices[:3])
        raise SweepUnsupportedError(f"parameters outside a supported Linear/Conv2d/Embedding call ({bad})")
    for layer in capture.layers:
        # A layer called again on something that depends on the parameters may see its own
        # weight in its input: a bilinear term (W applied to a function of W) with no rule yet.
        recs = layer.records
        if len(recs) > 1 and any(isinstance(r.input, Tensor) and r.input.requires_grad for r in recs):
            raise SweepUnsupportedError(
                f"a {type(layer.module).__name__} called {len(recs)} times on parameter-dependent inputs "
                "(a weight applied to something that may depend on it)"
            )
    if not isinstance(z, Tensor) or z.dim() == 0:
        raise SweepUnsupportedError("model outputs that are not a batched tensor")
    loss.check(call, z, targets)
    acts = [a for a in recorder.activations if a.output.requires_grad]
    for a in acts:
        if (a.input._version, a.output._version) != a.version:
            raise SweepUnsupportedError("an activation input or output modified in place")
    outs = [rec.output for layer in capture.layers for rec in layer.records]
    c = loss.scale(z)
    with torch.enable_grad():
        total = loss.total(z, targets)
    # Activation adjoints ḡ = ∂L/∂a and column weights ḡ φ''(u) / c (c is applied at the end).
    curved: list[tuple[_Activation, Tensor]] = []
    if acts:
        gbar = torch.autograd.grad(total, [a.output for a in acts], retain_graph=True, allow_unused=True)
        for a, g in zip(acts, gbar):
            if g is not None:
                curved.append((a, (g * a.derivatives()[1] / c).detach()))
    factor = _loss_factor(loss, z.detach(), targets)
    n = z.shape[0]
    shapes = [leaf.shape for leaf in capture.leaves]

    def pull(
        pairs: list[tuple[Tensor, Tensor]],
        weights: Tensor | None,
        acc: ColumnAccumulator,
        skip: frozenset[int] = frozenset(),
    ) -> None:
        """VJPs of k columns (cotangents ``(k, *node.shape)`` at the nodes) into ``acc``.

        One batched pass (``is_grads_batched``), or with ``chunk_size == 1`` one plain backward
        pass per column. Layers whose ids are in ``skip`` got these columns in closed form.
        """
        k = pairs[0][1].shape[0]
        if chunk_size == 1 or k == 1:
            for j in range(k):
                grads = torch.autograd.grad(
                    [nd for nd, _ in pairs],
                    outs,
                    [ct[j] for _, ct in pairs],
                    retain_graph=True,
                    allow_unused=True,
                )
                batch: list[Tensor | None] = [None if g is None else g.unsqueeze(0) for g in grads]
                feed(batch, None if weights is None else weights[j : j + 1], acc, skip)
            return
        grads = torch.autograd.grad(
            [nd for nd, _ in pairs],
            outs,
            [ct for _, ct in pairs],
            retain_graph=True,
            allow_unused=True,
            is_grads_batched=True,
        )
        feed(grads, weights, acc, skip)

    def feed(
        grads: Sequence[Tensor | None], weights: Tensor | None, acc: ColumnAccumulator, skip: frozenset[int]
    ) -> None:
        pos = 0
        for layer in capture.layers:
            m = len(layer.records)
            deltas = list(grads[pos : pos + m])
            pos += m
            if id(layer) not in skip and any(d is not None for d in deltas):
                layer.columns(deltas, weights, acc)

    if not outs:
        zero = [torch.zeros(s, dtype=z.dtype, device=z.device) for s in shapes]
        return zero, (None if num_probes is None else [t.clone() for t in zero]), 0
    num_cols = factor.num_columns + sum(int(w[0].numel()) for _, w in curved)
    if max_columns is not None and num_cols > max_columns:
        raise SweepTooCostlyError(num_cols)
    if chunk_size is None:  # columns per batched pass; on CPU their output gradients should stay small
        col_bytes = max(int(o.numel()) for o in outs) * z.element_size() if z.device.type == "cpu" else 1
        chunk_size = 1 if col_bytes >= _LOOP_BYTES else max(1, min(64, _COLUMN_BYTES // max(1, col_bytes)))

    if num_probes is None:
        acc = ColumnAccumulator(shapes, 1, trace=False, per_column=False, like=z)
        for s0 in range(0, factor.num_columns, chunk_size):
            s1 = min(factor.num_columns, s0 + chunk_size)
            cols = factor.columns(s0, s1).detach()
            w = factor.weights(s0, s1)
            pull([(z, cols)], None if w is None else w.detach(), acc)
        plan = _UnitPlan(capture, acts)
        for a, w in curved:
            plan.unit_columns(a, w, chunk_size, pull, acc)
        for layer in capture.layers:
            layer.finish(acc)
        est, _ = acc.result(average=False, scale=c)
        return _split(est, shapes), None, num_cols

    # Curvature propagation: per probe, cotangents P (positive columns) and Q (negative ones).
    cols_all = factor.columns(0, factor.num_columns).detach()  # (R, N, *out)
    w_loss = factor.weights(0, factor.num_columns)
    w_loss = (
        torch.ones(cols_all.shape[:2], dtype=z.dtype, device=z.device) if w_loss is None else w_loss.detach()
    )
    wl = w_loss.reshape(*w_loss.shape, *([1] * (cols_all.dim() - 2)))
    samples: list[Tensor] = []
    for _ in range(num_probes):
        acc = ColumnAccumulator(shapes, 1, trace=False, per_column=False, like=z)
        v = _signs(w_loss.shape, generator, z)
        vv = v.reshape(wl.shape)
        root = wl.abs().sqrt() * vv
        p_z = (cols_all * root * (wl > 0)).sum(0)
        q_z = (cols_all * root * (wl < 0)).sum(0)
        cots_pq = [(z, torch.stack([p_z, q_z]))]
        for a, w in curved:
            r = w.abs().sqrt() * _signs(w.shape, generator, z)
            cots_pq.append((a.input, torch.stack([r * (w > 0), r * (w < 0)])))
        signs = torch.tensor([1.0, -1.0], dtype=z.dtype, device=z.device)[:, None].expand(2, n)
        pull(cots_pq, signs, acc)
        for layer in capture.layers:
            layer.finish(acc)
            if isinstance(layer, _LinearLayer):
                layer.D2 = None  # deferred column sums belong to this probe only
        est, _ = acc.result(average=False, scale=c)
        samples.append(est)
    stack = torch.stack(samples)
    mean = stack.mean(0)
    err = (
        stack.std(0, correction=1) / math.sqrt(num_probes)
        if num_probes > 1
        else torch.full_like(mean, math.nan)
    )
    traces = stack.sum(1)
    trace_err = (
        traces.std(correction=1) / math.sqrt(num_probes) if num_probes > 1 else traces.new_tensor(math.nan)
    )
    return _split(mean, shapes), [*_split(err, shapes), trace_err], num_cols


def _signs(shape: Sequence[int], generator: torch.Generator | None, like: Tensor) -> Tensor:
    bits = torch.randint(0, 2, tuple(shape), generator=generator, device=like.device)
    return (2 * bits - 1).to(like.dtype)


def _split(flat: Tensor, shapes: Sequence[torch.Size]) -> list[Tensor]:
    out, pos = [], 0
    for s in shapes:
        k = math.prod(s)
        out.append(flat[pos : pos + k].reshape(s))
        pos += k
    return out
