"""Batched matrix-vector products of curvature matrices: the operators estimators consume.

An operator represents a symmetric P×P matrix A over the flattened parameters. It
exposes

* ``size`` (P), ``dtype``, ``device``; ``dtype`` is the dtype of the rows and results, float32
  for float16/bfloat16 parameters, whose products run in the parameters' dtype
  (``compute_dtype``; the policy of :func:`secorder._pytree.accumulating`);
* ``matmat(V)``: for a ``(k, P)`` tensor whose rows are vectors, the ``(k, P)`` tensor of
  rows A v_i;
* ``quadform(V)``: the ``k`` values v_iᵀ A v_i, which some operators compute more
  cheaply than through ``matmat`` (second-order forward mode for the Hessian, one
  Jacobian-vector product for the GGN).

Estimators (``secorder.estimators``) only ever call these; they never know which
curvature matrix they are looking at. Chunking (``chunk_size``) is applied by the
estimators, so an operator call always receives exactly the rows it should form at once.

Hessian strategies
------------------
The Hessian of a scalar function g of the parameter leaves can be multiplied onto a
batch of vectors in several ways, all giving the same numbers up to rounding:

``"rev_rev"``
    ``torch.func.vjp(torch.func.grad(g))`` linearized once, then ``vmap`` of the
    vector-Jacobian product over the rows (reverse over reverse). Composes with
    ``vmap`` and ``grad``.
``"fwd_rev"``
    ``vmap`` of ``torch.func.jvp(torch.func.grad(g))`` (forward over reverse): no
    stored double-backward graph, lower peak memory. Composes with ``vmap``/``grad``.
``"autograd"``
    a Python loop of ``torch.autograd.grad`` calls on one retained double-backward
    graph (the PyHessian way). Eager only.
``"autograd_batched"``
    one ``torch.autograd.grad(..., is_grads_batched=True)`` call per chunk on the
    retained graph. Eager only.

``"taylor"``
    for quadratic forms only: one evaluation of the function is recorded as a tape of ATen
    operations (:mod:`secorder._engine.tape`), one reverse pass gives the adjoint of every
    intermediate, and vᵀHv = Σ_k ⟨ḡ_k, d²f_k[u̇_k, u̇_k]⟩ is then summed over the ops in
    one forward-mode pass per batch of probes (:mod:`secorder._engine.taylor`). About one tangent
    forward pass per probe instead of a forward tangent plus a double backward, and every
    convolution stays dense with the probes folded into its batch or channel dimension.
    ``matmat`` uses the eager ``"auto"`` rule. Eager only; refused for functions with random
    ops or in-place updates of aliased tensors (a replay would differ).

``"finite_difference"``
    the fallback for functions with operators that have neither a double-backward nor
    a forward-mode derivative (some fused attention kernels, cuDNN RNNs): central
    differences of gradients, needing only first derivatives,

        H v ≈ (∇g(θ + h v) − ∇g(θ − h v)) / (2h),   h = ε^{1/3} · max(1, ‖θ‖) / ‖v‖,

    with ε the machine epsilon of the dtype. The step moves θ by ε^{1/3}·max(1, ‖θ‖);
    the truncation error is O(h²) (h²/6 times the third derivative of g along v) and the
    rounding error O(ε/h), so the result has about two thirds of the digits of the dtype
    (relative error ~1e-5 in float32, ~1e-11 in float64 for smooth g). Cost: two
    gradient evaluations per row, in a Python loop. Eager (``torch.autograd.grad``,
    results detached) or, under ``torch.func`` transforms, ``torch.func.grad``. Not in
    :data:`STRATEGIES` (the exact strategies); accepted wherever a strategy is.

``"auto"`` picks per call; see :func:`resolve_strategy` for the documented rule.

The autograd strategies (``"rev_rev"``, ``"fwd_rev"``, ``"autograd"``, ``"autograd_batched"``,
``"finite_difference"``) run ``fn`` under :func:`secorder._losses.closed_form_losses`:
``F.cross_entropy`` is differentiated with the closed-form softmax curvature, so the product
never runs the double backward of ``log_softmax`` over the logits (below 2× a gradient's peak
memory on a 50,257-entry vocabulary, ``benchmarks/bench_memory.py``). Same numbers to rounding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp, vmap

from secorder._engine.tape import TapeUnsupportedError
from secorder._engine.taylor import TaylorQuadform
from secorder._errors import error
from secorder._kernels import decomposed_kernels, with_decomposed_kernels
from secorder._losses import closed_form_losses
from secorder._pytree import HALF_DTYPES, accumulating, accumulation_dtype, numel, ravel, unravel
from secorder._validate import check_finite_enabled, check_finite_result, diagnose_nonfinite

__all__ = [
    "STRATEGIES",
    "FALLBACK_STRATEGIES",
    "DenseOperator",
    "HessianOperator",
    "LinearOperator",
    "StrategyFailedError",
    "check_strategy",
    "in_functorch_transform",
    "resolve_strategy",
]

STRATEGIES = ("auto", "rev_rev", "fwd_rev", "autograd", "autograd_batched", "taylor")
FALLBACK_STRATEGIES = ("finite_difference",)
_EAGER_ONLY = ("autograd", "autograd_batched", "taylor")


class LinearOperator(Protocol):
    """What an estimator needs from a symmetric P×P operator (see the module docstring)."""

    @property
    def size(self) -> int: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    def matmat(self, V: Tensor) -> Tensor: ...

    def quadform(self, V: Tensor) -> Tensor: ...


class DenseOperator:
    """An explicit symmetric matrix as an operator (tests, examples, small problems).

    Example:
        >>> import torch
        >>> op = DenseOperator(torch.diag(torch.tensor([1.0, 2.0, 3.0])))
        >>> op.quadform(torch.ones(2, 3))
        tensor([6., 6.])
    """

    def __init__(self, matrix: Tensor) -> None:
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise error(
                "DenseOperator(matrix)",
                "matrix must be a square 2-d tensor",
                f"shape {tuple(matrix.shape)}",
                "Pass a P×P tensor.",
            )
        self.matrix = matrix

    @property
    def size(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return self.matrix.dtype

    @property
    def device(self) -> torch.device:
        return self.matrix.device

    def matmat(self, V: Tensor) -> Tensor:
        return V @ self.matrix.T

    def quadform(self, V: Tensor) -> Tensor:
        return (self.matmat(V) * V).sum(-1)


def in_functorch_transform(leaves: Sequence[Tensor] = ()) -> bool:
    """Whether we are running inside a ``torch.func`` transform (vmap, grad, jvp, ...)."""
    try:
        if torch._C._functorch.peek_interpreter_stack() is not None:
            return True
        return any(torch._C._functorch.is_functorch_wrapped_tensor(x) for x in leaves)
    except AttributeError:  # pragma: no cover - very old torch
        return False


def check_strategy(call: str, strategy: object) -> str:
    """Validate a strategy name."""
    if strategy == "fwd_fwd":
        raise error(
            call,
            "strategy must be one of "
            f"{', '.join(repr(s) for s in STRATEGIES + FALLBACK_STRATEGIES)}; "
            '"fwd_fwd" (jvp of jvp) was removed: PyTorch\'s nested forward mode returns wrong '
            "second derivatives for layer_norm and batch_norm without raising "
            "(pytorch/pytorch#196700, #196699, #198017)",
            "'fwd_fwd'",
            'Use strategy="taylor" (eager; no double backward either) or "fwd_rev" '
            "(under torch.func transforms).",
        )
    if strategy not in STRATEGIES + FALLBACK_STRATEGIES:
        raise error(
            call,
            f"strategy must be one of {', '.join(repr(s) for s in STRATEGIES + FALLBACK_STRATEGIES)}",
            f"{strategy!r}",
            'Use strategy="auto" unless you have measured that another one is faster.',
        )
    return str(strategy)


def resolve_strategy(call: str, strategy: str, leaves: Sequence[Tensor]) -> str:
    """Validate ``strategy`` and settle what can be settled before the first product.

    The ``"auto"`` rule, from the measurements in ``benchmarks/RESULTS.md`` (CPU):

    * inside a ``torch.func`` transform, or when a parameter requires grad with grad
      mode on (the result must stay differentiable): ``"rev_rev"``;
    * under ``torch.compile`` (while Dynamo traces): ``"fwd_rev"``, the strategy that
      compiles (``"rev_rev"`` with freshly drawn probes fails in Inductor with "Cannot
      access storage of TensorWrapper", and the ``"autograd"`` ones need double backward,
      which AOTAutograd does not support; measured with torch 2.13 on CPU);
    * otherwise (plain eager evaluation) the choice is made at the first product. Quadratic
      forms vᵀHv (Hutchinson's trace, the quadratic-form part of Hutch++) use ``"taylor"``
      when the function can be recorded (no random ops, no in-place update of an aliased
      tensor) and its autograd graph has at most 16 ops or is dominated by convolutions (at
      least 1/8 of its ops): the fastest on the MLP and the CNN of
      ``benchmarks/bench_hessian.py`` and on a ResNet, and 1.5-4x slower than ``"rev_rev"``
      on attention and recurrent models (``benchmarks/bench_models.py``; see
      ``_taylor_too_slow``; ``HessianOperator.taylor_skipped`` says why it was passed over,
      and then ``"rev_rev"`` is used unless convolutions dominate); otherwise, and for
      ``matmat``, the autograd graph of one
      evaluation of the function decides (that graph is reused, not wasted):
      ``"autograd"`` (a loop over one retained double-backward graph) if the function
      contains a convolution, whose batched double backward falls back to slow grouped
      kernels under ``vmap``; ``"rev_rev"`` (one batched product per chunk) otherwise,
      which is fastest on matmul-based models.

    Returns:
        A concrete strategy, or ``"auto"`` when it is decided at the first product.
    """
    check_strategy(call, strategy)
    transformed = in_functorch_transform(leaves)
    if strategy in _EAGER_ONLY and transformed:
        raise error(
            call,
            f'strategy="{strategy}" uses torch.autograd.grad and runs only outside torch.func transforms',
            "a call inside vmap/grad/jvp",
            'Use strategy="rev_rev" or "fwd_rev" (or "auto") under torch.func transforms.',
        )
    if strategy != "auto":
        return strategy
    if torch.compiler.is_compiling():  # inductor fails on vmap(vjp) of fresh probes; fwd_rev compiles
        return "fwd_rev"
    needs_graph = torch.is_grad_enabled() and any(leaf.requires_grad for leaf in leaves)
    if transformed or needs_graph:
        return "rev_rev"
    return "auto"


def _graph_has_convolution(root: Tensor) -> bool:
    """Whether the autograd graph behind ``root`` contains a convolution."""
    seen: set[int] = set()
    stack = [root.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if "Convolution" in type(node).__name__:
            return True
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


class StrategyFailedError(RuntimeError):
    """A Hessian strategy could not form its products (the message names the call and the
    strategies to try); callers that take no ``strategy=`` re-raise it with their own fix."""


def _strategy_failure(call: str, strategy: str, exc: Exception, half: bool = False) -> Exception:
    """``half``: float16/bfloat16 parameters, for which finite differences are refused."""
    fallback = () if half else FALLBACK_STRATEGIES
    others = [s for s in STRATEGIES + fallback if s not in ("auto", strategy)]
    return error(
        call,
        f'strategy="{strategy}" failed while forming Hessian-vector products '
        "(some operators lack double-backward or forward-mode derivatives)",
        f"{type(exc).__name__}: {exc}",
        f"Pass another strategy: one of {', '.join(repr(s) for s in others)}; "
        + (
            'strategy="finite_difference" needs only first derivatives (in float32 or float64: '
            "cast the parameters and inputs first)."
            if half
            else 'strategy="finite_difference" needs only first derivatives.'
        ),
        cls=StrategyFailedError,
    )


def _detached_output(call: str) -> Exception:
    return error(
        call,
        "f's output must depend on the differentiated argument through autograd",
        "an output that does not require grad (f detached it: .detach(), .item(), numpy, "
        "torch.no_grad inside f; or it does not depend on the argument at all)",
        "Compute the loss from the argument with torch operations and without detaching; if f is "
        "constant in the argument, its Hessian is 0 and needs no computing.",
    )


_TAYLOR_MAX_OPS = 16
_TAYLOR_CONV_SHARE = 8


def _graph_stats(root: Tensor) -> tuple[int, int]:
    """(ops, convolutions) in the autograd graph behind ``root`` (leaf accumulators excluded)."""
    seen: set[int] = set()
    stack, ops, convs = [root.grad_fn], 0, 0
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        name = type(node).__name__
        if name != "AccumulateGrad":
            ops += 1
            convs += "Convolution" in name
        stack.extend(next_node for next_node, _ in node.next_functions)
    return ops, convs


def _taylor_too_slow(
    fn: Callable[[list[Tensor]], Tensor], leaves: Sequence[Tensor]
) -> tuple[str | None, bool | None]:
    """Why the eager ``"auto"`` rule passes over the Taylor tape for quadratic forms (``None``:
    use it), from the autograd graph of one forward pass; and whether convolutions dominate
    that graph (``None``: unknown), which then also picks ``"autograd"`` over ``"rev_rev"``
    for the products (a ViT's one patch convolution does not: ``"rev_rev"`` is 3-4x faster
    there).

    The tangent pass walks the tape op by op in Python, so its cost grows with the number of
    ops; reverse over reverse runs the same ops in autograd's C++ engine, and the Taylor rule
    for a convolution (probes folded into its batch) is where the tape gains most. Measured
    (``benchmarks/bench_models.py`` sizes, K = 16, CPU, batch 4): Taylor is faster on the MLP
    (10 ops) and the CNN (9 ops, 2 convolutions) of ``bench_hessian.py`` and on a ResNet
    (~29 ops, 7 convolutions), and 1.5-4x slower than ``"rev_rev"`` on GPT-2, BERT, a ViT
    (~62 ops, one patch convolution), ``nn.MultiheadAttention``, SDPA and LSTM models. Rule:
    Taylor when there are at most 16 ops or convolutions are at least 1/8 of them.
    """
    inputs = [leaf.detach().requires_grad_(True) for leaf in leaves]
    with torch.enable_grad():
        out = fn(inputs)
    if not isinstance(out, Tensor) or out.grad_fn is None:
        return None, None
    ops, convs = _graph_stats(out)
    conv_heavy = convs > 0 and convs * _TAYLOR_CONV_SHARE >= ops
    if ops <= _TAYLOR_MAX_OPS or conv_heavy:
        return None, convs > 0
    reason = (
        f"{ops} ops with {convs} convolutions in the autograd graph: reverse over reverse is "
        "faster there (see secorder.operators._taylor_too_slow)"
    )
    return reason, False


def _closed_form() -> contextlib.AbstractContextManager[object]:
    """Where the autograd strategies form products: ``F.cross_entropy`` with its closed-form
    softmax curvature (:func:`secorder._losses.closed_form_losses`; same numbers, a few copies of
    the logits instead of the double backward of ``log_softmax``); nothing under
    ``torch.compile``."""
    return contextlib.nullcontext() if torch.compiler.is_compiling() else closed_form_losses()


class HessianOperator:
    """The Hessian of a scalar function of a list of tensors, as a batched operator.

    Args:
        fn: ``fn(leaves) -> scalar tensor``.
        leaves: the point at which the Hessian is taken.
        strategy: a strategy (see the module docstring); ``"auto"`` here means the
            eager rule of :func:`resolve_strategy`, decided at the first product (see
            :attr:`strategy` afterwards).
        call: the public call form, for error messages.
        one_at_a_time: the caller multiplies one vector per call (Lanczos): then the eager
            ``"auto"`` rule always takes the ``"autograd"`` loop on the retained graph, which
            has the least overhead per single product (measured on the MLP of
            ``benchmarks/bench_estimators.py``: 0.16 s against 0.19 s for ``"rev_rev"``).

    Attributes:
        strategy: the strategy of ``matmat`` (``"auto"`` until the first product settles it).
        quadform_strategy: the strategy of ``quadform`` (``None`` until the first quadratic
            form; ``"taylor"`` or the ``matmat`` strategy).
        taylor_skipped: why the eager ``"auto"`` rule could not use ``"taylor"`` (or ``None``).
    """

    def __init__(
        self,
        fn: Callable[[list[Tensor]], Tensor],
        leaves: Sequence[Tensor],
        strategy: str,
        call: str = "HessianOperator",
        *,
        one_at_a_time: bool = False,
    ) -> None:
        self.fn = fn
        self.leaves = list(leaves)
        self.shapes = [leaf.shape for leaf in self.leaves]
        self.strategy = strategy
        self.call = call
        self._linearized: Callable[[list[Tensor]], tuple[list[Tensor]]] | None = None
        self._graph: tuple[list[Tensor], list[Tensor], list[int]] | None = None
        self._has_conv = False
        self.one_at_a_time = one_at_a_time
        self.requested = strategy
        self.quadform_strategy: str | None = None
        self.taylor_skipped: str | None = None
        self._taylor: TaylorQuadform | None = None
        self._known_conv: bool | None = None  # from the auto rule's forward graph

    def _settle_strategy(self) -> str:
        if self.strategy in ("auto", "taylor"):
            if self._known_conv is None:  # the graph of one evaluation tells (and is kept)
                self._autograd_graph()
            has_conv = self._has_conv if self._known_conv is None else self._known_conv
            self.strategy = "autograd" if has_conv or self.one_at_a_time else "rev_rev"
            if self.strategy == "rev_rev":  # the probe graph is not used again: free it now
                self._graph = None  # (a retained double-backward graph held 2x the memory)
        return self.strategy

    def _settle_quadform(self) -> str:
        if self.quadform_strategy is None:
            if self.requested == "taylor":
                self._taylor = TaylorQuadform(self.fn, self.leaves)  # TapeUnsupportedError: caller
                self.quadform_strategy = "taylor"
            elif self.requested == "auto" and self.strategy == "auto" and not self.one_at_a_time:
                try:  # one forward pass decides before the Taylor preparation is paid
                    self.taylor_skipped, self._known_conv = _taylor_too_slow(self.fn, self.leaves)
                    if self.taylor_skipped is None:
                        self._taylor = TaylorQuadform(self.fn, self.leaves)
                        self.quadform_strategy = "taylor"
                except TapeUnsupportedError as exc:
                    cause = exc.__cause__
                    if isinstance(cause, Exception) and type(cause) not in (
                        RuntimeError,
                        NotImplementedError,
                    ):
                        raise cause from None  # the user's own exception, raised while f ran
                    other = self._not_the_strategy()  # ... or one that a plain evaluation raises too
                    if other is not None:
                        raise other from None
                    self.taylor_skipped = str(exc)
                if self._taylor is not None and self._taylor.zero:
                    other = self._not_the_strategy()  # a detached output, not H = 0
                    if other is not None:
                        raise other
            if self.quadform_strategy is None:
                self.quadform_strategy = self._settle_strategy()
        return self.quadform_strategy

    @property
    def size(self) -> int:
        return numel(self.leaves)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of rows and results: float32 for half-precision parameters
        (:func:`secorder._pytree.accumulation_dtype`)."""
        return accumulation_dtype(self.leaves[0].dtype)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The parameters' dtype, in which the products are formed."""
        return self.leaves[0].dtype

    @property
    def device(self) -> torch.device:
        return self.leaves[0].device

    # -- strategies -------------------------------------------------------------
    def _vjp_fn(self) -> Callable[[list[Tensor]], tuple[list[Tensor]]]:
        if self._linearized is None:
            self._linearized = vjp(grad(self.fn), self.leaves)[1]
        return self._linearized

    def _autograd_graph(self) -> tuple[list[Tensor], list[Tensor], list[int]]:
        if self._graph is None:
            with _closed_form():  # the constant-gradient check below evaluates the same way
                self._graph = self._build_graph()
        return self._graph

    def _build_graph(self) -> tuple[list[Tensor], list[Tensor], list[int]]:
        inputs = [leaf.detach().requires_grad_(True) for leaf in self.leaves]
        with torch.enable_grad():
            out = self.fn(inputs)
            if not out.requires_grad:
                raise _detached_output(self.call)
            self._has_conv = _graph_has_convolution(out)
            grads = torch.autograd.grad(out, inputs, create_graph=True, allow_unused=True)
        keep = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        constant = [i for i, g in enumerate(grads) if g is not None and not g.requires_grad]
        if constant:
            self._check_constant_gradient(constant, [grads[i] for i in constant])
        return (inputs, [grads[i] for i in keep], keep)

    def _check_constant_gradient(self, indices: list[int], grads: list[Tensor]) -> None:
        """Verify a gradient that autograd recorded as constant in θ (its Hessian rows would be 0).

        A gradient that truly does not depend on θ is computed from the same θ-free values at
        any point, so it comes out bitwise equal at a moved θ. If it changes, autograd lost the
        second derivative (a custom ``autograd.Function`` with ``@once_differentiable``, or a
        backward run under ``no_grad``), and the zero rows would be silently wrong.
        """
        flat = ravel([leaf.detach() for leaf in self.leaves])
        index = torch.arange(flat.numel(), dtype=flat.dtype, device=flat.device)
        direction = (index * 0.6180339887) % 1 - 0.5  # deterministic, in no symmetry's null space
        step = torch.finfo(flat.dtype).eps ** (1 / 3) * torch.clamp(torch.linalg.vector_norm(flat), min=1.0)
        moved = [x.requires_grad_(True) for x in unravel(flat + step * direction, self.shapes)]
        with torch.enable_grad():
            again = torch.autograd.grad(self.fn(moved), moved, allow_unused=True)
        changed = [
            i
            for i, g in zip(indices, grads)
            if again[i] is None or not torch.equal(again[i].detach(), g.detach())
        ]
        if changed:
            cause = RuntimeError(
                f"autograd recorded the gradient of parameter leaves {changed[:10]} as constant "
                "(no second derivative), yet it changes with the parameters: f contains an "
                "operation whose backward is not differentiable (a custom autograd.Function "
                "with @once_differentiable, or a backward computed under torch.no_grad)"
            )
            raise _strategy_failure(
                self.call,
                self.strategy if self.strategy != "auto" else "autograd",
                cause,
                self.compute_dtype in HALF_DTYPES,
            ) from cause

    def _hv_autograd(self, rows: list[Tensor], batched: bool) -> list[Tensor]:
        inputs, grads, keep = self._autograd_graph()
        k = rows[0].shape[0]
        if not grads:  # the gradient is constant: H = 0
            return [torch.zeros_like(r) for r in rows]
        with torch.enable_grad():
            if batched:
                outs = torch.autograd.grad(
                    grads,
                    inputs,
                    [rows[i] for i in keep],
                    retain_graph=True,
                    allow_unused=True,
                    is_grads_batched=True,
                )
                res = [o if o is not None else torch.zeros_like(r) for o, r in zip(outs, rows)]
            else:
                per = []
                for j in range(k):
                    outs = torch.autograd.grad(
                        grads, inputs, [rows[i][j] for i in keep], retain_graph=True, allow_unused=True
                    )
                    per.append([o if o is not None else torch.zeros_like(x) for o, x in zip(outs, inputs)])
                res = [torch.stack([p[i] for p in per]) for i in range(len(inputs))]
        return [r.detach() for r in res]

    def _hv_finite_difference(self, rows: list[Tensor]) -> list[Tensor]:
        """Central differences of gradients (see the module docstring for the step and error)."""
        V = ravel(rows, batch_dims=1)
        theta = ravel(self.leaves)
        if theta.dtype in HALF_DTYPES:  # measured: errors of 34% (bfloat16), 15% (float16) of the largest
            # diagonal entry of the MLP of tests/test_halfprecision.py
            raise error(
                self.call,
                "strategy='finite_difference' needs float32 or float64 parameters (its step keeps "
                "about a third of the format's digits: less than one in bfloat16 or float16)",
                f"{theta.dtype} parameters",
                "Use an exact strategy ('auto', 'rev_rev', 'fwd_rev', 'autograd'), which forms the "
                "products in half precision and sums them in float32, or cast the parameters and "
                "inputs to float32 for finite differences.",
            )
        eps = torch.finfo(theta.dtype).eps
        reach = eps ** (1 / 3) * torch.clamp(torch.linalg.vector_norm(theta), min=1.0)
        eager = not in_functorch_transform(self.leaves)

        def gradient(point: Tensor) -> Tensor:
            leaves = unravel(point, self.shapes)
            if not eager:
                return ravel(list(grad(self.fn)(leaves)))
            inputs = [leaf.detach().requires_grad_(True) for leaf in leaves]
            with torch.enable_grad():
                out = torch.autograd.grad(self.fn(inputs), inputs, allow_unused=True)
            return ravel([torch.zeros_like(x) if g is None else g for g, x in zip(out, inputs)])

        out = []
        for v in V:
            norm = torch.linalg.vector_norm(v)
            h = reach / torch.clamp(norm, min=torch.finfo(theta.dtype).tiny)
            hv = (gradient(theta + h * v) - gradient(theta - h * v)) / (2 * h)
            out.append(torch.where(norm > 0, hv, torch.zeros_like(hv)))
        return unravel(torch.stack(out), self.shapes)

    def _matmat_leaves(self, rows: list[Tensor]) -> list[Tensor]:
        with _closed_form():
            return self._matmat_strategy(rows)

    def _matmat_strategy(self, rows: list[Tensor]) -> list[Tensor]:
        s = self._settle_strategy()
        if s == "finite_difference":
            return self._hv_finite_difference(rows)
        if s == "rev_rev":
            return list(vmap(self._vjp_fn())(rows)[0])
        if s == "fwd_rev":
            gfn = grad(self.fn)
            return list(vmap(lambda v: jvp(gfn, (self.leaves,), (v,))[1])(rows))
        return self._hv_autograd(rows, batched=(s == "autograd_batched"))

    # -- failures: the user's, the input's, or the strategy's -------------------------------
    def _not_the_strategy(self) -> BaseException | None:
        """After a failed product: the error to raise instead of blaming the strategy, if any.

        One plain evaluation of the function with grad on (eager only): an exception there is
        the user's own and passes through; an output that autograd cannot differentiate
        (detached, computed under no_grad) is reported as such. ``None``: the plain evaluation
        is sound, so the failure is one of the strategy's (a missing double-backward or
        forward-mode formula) and another strategy may avoid it.
        """
        if in_functorch_transform(self.leaves):
            return None
        inputs = [leaf.detach().requires_grad_(True) for leaf in self.leaves]
        try:
            with torch.enable_grad():
                out = self.fn(inputs)
        except Exception as exc:  # the user's own error: pass it through unchanged
            return exc
        if not out.requires_grad:
            return _detached_output(self.call)
        return None

    def _fail(self, strategy: str, exc: Exception) -> BaseException:
        other = self._not_the_strategy()
        half = self.compute_dtype in HALF_DTYPES
        return other if other is not None else _strategy_failure(self.call, strategy, exc, half)

    def _check_rows(self, V: object) -> None:
        if not isinstance(V, Tensor) or V.dim() != 2 or V.shape[1] != self.size:
            shape = tuple(V.shape) if isinstance(V, Tensor) else type(V).__name__
            raise error(
                f"{type(self).__name__}.matmat(V) in {self.call}",
                f"V must be a (k, P) tensor of k row vectors over the P={self.size} flattened parameters",
                f"{shape}",
                "Pass V of shape (k, P), e.g. V.unsqueeze(0) for a single vector.",
            )

    def _check_result(self, out: Tensor, what: str) -> Tensor:
        if check_finite_enabled() and not torch.compiler.is_compiling() and not in_functorch_transform([out]):
            check_finite_result(self.call, what, out, lambda: diagnose_nonfinite(self.fn, self.leaves))
        return out

    # -- public ----------------------------------------------------------------
    @accumulating
    def matmat(self, V: Tensor) -> Tensor:
        """Rows ``H v_i`` for the rows ``v_i`` of the ``(k, P)`` tensor ``V``."""
        self._check_rows(V)
        rows = unravel(V, self.shapes)
        if self._graph is not None and self.strategy in ("autograd", "autograd_batched"):
            # The retained graph was recorded under both modes and f does not run again: the
            # products are backward passes, which the modes' substitutions (forward functions:
            # F.cross_entropy, attention, RNN kernels) never meet. Skipping them saves a Python
            # intercept of every torch call here (~15% of a product on GPT-2 of
            # benchmarks/bench_models.py, where Lanczos forms one product at a time).
            try:
                out = self._hv_autograd(rows, batched=self.strategy == "autograd_batched")
            except (RuntimeError, NotImplementedError) as exc:
                with decomposed_kernels():
                    raise self._fail(self.strategy, exc) from exc
        else:
            with decomposed_kernels():
                try:
                    out = self._matmat_leaves(rows)
                except StrategyFailedError:  # already names the call and the strategies (raised once)
                    raise
                except (RuntimeError, NotImplementedError) as exc:
                    raise self._fail(self.strategy, exc) from exc
        return self._check_result(ravel(out, batch_dims=1), "Hessian-vector products")

    @accumulating
    @with_decomposed_kernels
    def quadform(self, V: Tensor) -> Tensor:
        """The ``k`` values ``v_iᵀ H v_i`` for the rows of ``V``."""
        self._check_rows(V)
        try:
            s = self._settle_quadform()
        except TapeUnsupportedError as exc:
            raise self._fail("taylor", exc) from exc
        if s == "taylor":
            assert self._taylor is not None
            try:
                return self._check_result(self._taylor(unravel(V, self.shapes)), "quadratic forms vᵀHv")
            except (RuntimeError, NotImplementedError) as exc:
                if self.requested == "taylor":  # asked for explicitly
                    raise self._fail("taylor", exc) from exc
                self.taylor_skipped = f"{type(exc).__name__}: {exc}"
                self._taylor, self.quadform_strategy = None, self._settle_strategy()
                s = self.quadform_strategy
        return (self.matmat(V) * V).sum(-1)
