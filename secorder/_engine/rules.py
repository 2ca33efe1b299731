"""The one registry of ATen op rules shared by every tape engine.

Each ATen op the engines treat specially has one :class:`OpRule` in :data:`RULES`, keyed by
the op overload (JAX's shape: one table keyed by the primitive, one entry holding every rule
of that op). An engine looks an op up with :func:`rule`; an op with no entry gets the default
rule (no special structure), and each engine then takes its generic road for it (nested
first-order AD, or a dense local Hessian). Adding an op means adding its rule here, once.

Fields:

* ``linear``: jointly linear in all its floating tensor arguments (views, sums, concatenation,
  pooling by averages, ...). Tangents pass through the op itself; no curvature. A floating
  argument that does not depend on the parameters contributes a zero tangent.
* ``linear_first``: an op with several outputs (or constant floating arguments such as
  ``nll_loss``'s class weights) linear in ``args[0]``; its other outputs carry no derivative.
* ``no_curvature``: no second derivative (almost everywhere) though not covered by the two
  above for the Taylor engine: piecewise-linear maps (ReLU, max pooling), additions, dtype
  copies. The sweep passes columns through them by vector-Jacobian products.
* ``multilinear``: linear in each floating input separately (matrix products, convolutions,
  elementwise products, eval-mode batch norm): curvature only in cross terms between inputs.
* ``family``: a closed form an engine has for the op (``"softmax"``, ``"matmul"``,
  ``"addmm"``, ``"conv"``, ``"layer_norm"``, ``"batch_norm"``).
* ``view_twin``: the reshape an aliasing view is replayed as.
* ``interface``: where a parameter meets per-sample data (matrix products, convolutions,
  embedding, norm affines, elementwise ops with a broadcast parameter), the rule giving the
  squared per-sample gradients of the parameter-side argument
  (:func:`secorder._engine.interfaces.param_squares`).
* ``collapsed``: the collapsed-Taylor rule (:mod:`secorder._engine.jet`) that pushes a value,
  K directional derivatives and the summed second derivatives through the op (the PDE
  operators of :mod:`secorder.pde`); ops without one take ``jet.linear`` when ``linear``,
  ``jet.no_curvature`` when ``no_curvature`` or ``linear_first``, else nested AD on the op.
* ``vjp``: a column-batched vector-Jacobian product the sweep's reverse walk uses instead of
  its generic vmapped ``vjp`` (:mod:`secorder._engine.vjps`: max pooling, convolution).
* ``derivs``: a unary elementwise op's closed-form (f, f', f'') (:data:`secorder._engine.jet.DERIVS`),
  shared by the collapsed Taylor rule and the sweep's diagonal columns m = ḡ ⊙ f''.
* ``deriv_from_output``: f'(x) from the recorded output y = f(x) alone (tanh: 1 - y², sigmoid:
  y(1 - y), exp: y), the same numbers as ``derivs``' f' without evaluating f again (the
  sweep's walk, :func:`secorder._engine.vjps.pointwise_vjp`).
* ``batch``: the op's batch rule for the per-sample proof (:mod:`secorder._engine.batch`):
  how a sample axis passes through it (``"pointwise"`` is the default for ops tagged
  pointwise; an op with none refuses a batched parameter-dependent input).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["RULES", "OpRule", "ops", "rule"]

aten = torch.ops.aten


@dataclass(frozen=True)
class OpRule:
    """Everything the engines know about one ATen op (see the module docstring)."""

    linear: bool = False
    linear_first: bool = False
    no_curvature: bool = False
    multilinear: bool = False
    family: str | None = None
    view_twin: Any = None
    interface: Any = (
        None  # Callable[[interfaces._Ctx], Tensor | None]: squared per-sample parameter gradients
    )
    collapsed: Any = None  # collapsed Taylor rule (ctx, func, args, kwargs) -> outputs (jet.py)
    vjp: Any = None  # column-batched VJP of the sweep's walk (vjps.py)
    derivs: Any = None  # (func, x, *args[1:], **kwargs) -> (f(x), f'(x), f''(x) or None) (jet.py)
    deriv_from_output: Any = None  # (y) -> f'(x) for y = f(x)
    batch: str | None = None

    @property
    def curvature_free(self) -> bool:
        """The op contributes no second-order term (the sweep's pass-through set)."""
        return self.linear or self.linear_first or self.no_curvature


_DEFAULT = OpRule()
RULES: dict[Any, OpRule] = {}


def ops(*names: str) -> list[Any]:
    """ATen overloads by ``"packet.overload"`` name (``.default`` when omitted); missing ones skipped."""
    out = []
    for name in names:
        packet, _, overload = name.partition(".")
        op = getattr(getattr(aten, packet, None), overload or "default", None)
        if op is not None:
            out.append(op)
    return out


def _register(names: tuple[str, ...], **fields: Any) -> None:
    for op in ops(*names):
        RULES[op] = dataclasses.replace(RULES.get(op, _DEFAULT), **fields)


def rule(func: Any) -> OpRule:
    """The rule of ATen op ``func`` (the default rule when it has none)."""
    return RULES.get(func, _DEFAULT)


_register(
    (
        "view", "_unsafe_view", "reshape", "t", "transpose.int", "permute", "expand", "squeeze.dim",
        "squeeze.dims", "squeeze", "unsqueeze", "select.int", "slice.Tensor", "clone", "alias",
        "cat", "stack", "sum.dim_IntList", "sum", "mean.dim", "mean", "index_select", "embedding",
        "avg_pool2d", "avg_pool1d", "avg_pool3d", "_adaptive_avg_pool2d", "repeat", "flip", "roll",
        "narrow", "gather", "diagonal", "tril", "triu", "neg", "unfold", "im2col", "col2im",
        "flatten.using_ints", "unflatten.int",
    ),
    linear=True,
)  # fmt: skip
_register(("nll_loss_forward", "split.Tensor", "split_with_sizes", "unbind.int"), linear_first=True)
_register(
    (
        "_to_copy", "copy", "chunk", "max_pool2d_with_indices", "max_pool1d_with_indices",
        "max_pool3d_with_indices", "constant_pad_nd", "relu", "leaky_relu", "hardtanh", "add.Tensor",
        "add.Scalar", "sub.Tensor", "sub.Scalar", "rsub.Tensor", "rsub.Scalar", "mul.Scalar",
        "div.Scalar", "expand_copy", "lift_fresh_copy", "masked_fill.Scalar", "_adaptive_avg_pool3d",
        "adaptive_max_pool2d",
    ),
    no_curvature=True,
)  # fmt: skip
_register(
    (
        "mm", "bmm", "matmul", "addmm", "baddbmm", "convolution", "mul.Tensor",
        "_native_batch_norm_legit_no_training", "dot", "mv", "einsum",
        "nll_loss_forward", "nll_loss2d_forward",  # linear in the input, times the class weights
    ),
    multilinear=True,
)  # fmt: skip
_register(("_softmax", "_log_softmax", "_safe_softmax"), family="softmax")
_register(("mm", "bmm", "matmul"), family="matmul")
_register(("addmm", "baddbmm"), family="addmm")
_register(("convolution",), family="conv")
_register(("native_layer_norm",), family="layer_norm")
_register(("view", "_unsafe_view"), view_twin=aten.reshape.default)


# ---- parameter interfaces (helper B, issue 11): squared per-sample parameter gradients ----
# ``OpRule.interface``: the rule of :mod:`secorder._engine.interfaces` for the op (where a
# parameter meets per-sample data), called through ``interfaces.param_squares``.
from secorder._engine import interfaces as _interfaces  # noqa: E402 - the rules refer to the registry

for _name, _fn in _interfaces.INTERFACES.items():
    _register((_name,), interface=_fn)
# ---- end of parameter interfaces ----
# ---- column-batched VJPs of the sweep's reverse walk ------------------------------------------
from secorder._engine import vjps as _vjps  # noqa: E402

for _name, _fn in _vjps.VJPS.items():
    _register((_name,), vjp=_fn)
# ---- end of column-batched VJPs ----
# ---- collapsed Taylor rules (secorder.pde: Laplacians, weighted traces, biharmonic) -------------
from secorder._engine import jet as _jet  # noqa: E402  (the rules need the registry's names above)

for _name, _derivs in _jet.DERIVS.items():
    _register((_name,), collapsed=_jet.pointwise_rule(_derivs), derivs=_derivs)
_register(("tanh",), deriv_from_output=lambda y: 1 - y * y)
_register(("sigmoid",), deriv_from_output=lambda y: y * (1 - y))
_register(("exp",), deriv_from_output=lambda y: y)
_register(("gelu",), collapsed=_jet.gelu_rule)
_register(("zeros_like", "ones_like", "full_like", "empty_like"), collapsed=_jet.constant_rule)
_register(("mul.Tensor",), collapsed=_jet.mul_rule)
_register(("div.Tensor",), collapsed=_jet.div_rule)
_register(("add.Tensor", "sub.Tensor", "rsub.Tensor"), collapsed=_jet.add_rule)
_register(
    ("add.Scalar", "sub.Scalar", "rsub.Scalar", "mul.Scalar", "div.Scalar", "neg"),
    collapsed=_jet.scalar_affine_rule,
)
_register(("sum.dim_IntList", "sum", "mean.dim", "mean"), collapsed=_jet.reduce_rule)
_register(("view", "_unsafe_view", "reshape"), collapsed=_jet.view_rule)
_register(("squeeze.dim", "squeeze.dims", "squeeze", "unsqueeze"), collapsed=_jet.reshape_rule)
_register(("mm", "bmm", "matmul", "addmm", "baddbmm"), collapsed=_jet.matmul_rule)
_register(("_softmax", "_log_softmax"), collapsed=_jet.softmax_rule)
_register(("native_layer_norm",), collapsed=_jet.layer_norm_rule)
_register(("convolution",), collapsed=_jet.conv_rule)
_register(
    ("max_pool2d_with_indices", "max_pool1d_with_indices", "max_pool3d_with_indices"),
    collapsed=_jet.max_pool_rule,
)
# ---- end of collapsed Taylor rules ---------------------------------------------------------------
# ---- batch rules (the batch-axis proof, secorder._engine.batch) ----------------------------
_register(("clone", "alias", "_to_copy", "lift_fresh_copy", "detach", "copy"), batch="same_shape")
_register(
    ("view", "_unsafe_view", "reshape", "flatten.using_ints", "unflatten.int", "view_copy"), batch="reshape"
)
_register(("t", "transpose.int", "permute"), batch="permute")
_register(("unsqueeze",), batch="unsqueeze")
_register(("squeeze.dim", "squeeze.dims", "squeeze"), batch="squeeze")
_register(("expand",), batch="expand")
_register(("select.int", "slice.Tensor", "narrow", "index_select", "gather"), batch="index")
_register(("sum.dim_IntList", "sum", "mean.dim", "mean"), batch="reduce_linear")
_register(
    ("amax", "amin", "logsumexp", "var.correction", "std.correction", "prod.dim_int", "max.dim", "min.dim"),
    batch="reduce",
)
_register(("_softmax", "_log_softmax", "_safe_softmax"), batch="softmax")
_register(("linalg_vector_norm",), batch="norm")
_register(("cumsum", "cumprod", "logcumsumexp"), batch="scan")
_register(("mv",), batch="mv")
_register(("split.Tensor", "split_with_sizes", "unbind.int", "chunk"), batch="split")
_register(("cat", "stack"), batch="cat")
_register(("mm", "bmm"), batch="matmul")
_register(("addmm", "baddbmm"), batch="addmm")
_register(
    (
        "convolution", "max_pool2d_with_indices", "max_pool1d_with_indices", "max_pool3d_with_indices",
        "avg_pool2d", "avg_pool1d", "avg_pool3d", "_adaptive_avg_pool2d", "_adaptive_avg_pool3d",
        "adaptive_max_pool2d", "_native_batch_norm_legit_no_training", "native_batch_norm",
        "_native_batch_norm_legit", "nll_loss_forward", "nll_loss2d_forward",
    ),
    batch="batch_first",
)  # fmt: skip
_register(("native_layer_norm",), batch="layer_norm")
_register(("embedding",), batch="embedding")
_register(("mse_loss", "binary_cross_entropy_with_logits"), batch="loss_reduce")
_register(("constant_pad_nd",), batch="pad")
_register(
    (
        "add.Tensor", "sub.Tensor", "add.Scalar", "sub.Scalar", "rsub.Tensor", "rsub.Scalar", "neg",
        "mul.Scalar", "div.Scalar",
    ),
    batch="pointwise_linear",
)  # fmt: skip
_register(("mul.Tensor", "div.Tensor"), batch="scale")
