"""Curvature of the loss over a whole dataset: an iterable of ``(inputs, targets)`` batches.

Let batch b hold N_b samples, N = Σ_b N_b, and L_b the batch loss with the given
``reduction``. The dataset loss is

    L = Σ_b (N_b / N) L_b   (``reduction="mean"``)       L = Σ_b L_b   (``reduction="sum"``),

so an uneven last batch is weighted by its size, and every curvature matrix of L is the
same weighted sum of the batch matrices (H = Σ_b w_b H_b, likewise the GGN and the
empirical Fisher). Results equal the full-batch results on the concatenated data up to
rounding.

Two routes, chosen from ``num_probes``:

* **exact** (``num_probes=None``; also ``kind="mc"``): the quantity is linear in the
  matrix, so it is computed batch by batch in **one pass** over the data and summed with
  the weights w_b (each batch's exact diagonal costs P products of that batch).
* **randomized** (``num_probes=K``): the estimator ``method`` of
  :mod:`secorder.estimators` runs unchanged on a :class:`DatasetOperator`, whose products
  are Σ_b w_b A_b V, one pass over the data per chunk of probes. The same probes hit every
  batch, so Hutchinson's estimate equals the full-batch estimate for the same generator,
  and estimators that need products of the full matrix (Hutch++, Lanczos, ...) get them.
  Each pass rebuilds every batch's operator (one forward and backward pass per batch to
  linearize it), so a larger ``chunk_size`` means fewer passes; memory holds one batch's
  graph and one chunk of rows at a time.

Determinism check (``check_determinism=True``, the default): a multi-pass estimate is only
meaningful if every pass sees the same function. Each batch gets a cheap fingerprint
(shapes, sum and sum of squares of its tensors); any later pass whose fingerprints differ
raises an error naming the batch (a shuffling loader, random augmentation, ``drop_last``
with shuffling). A model in train mode with Dropout (random) or BatchNorm (batch
statistics: the dataset quantity would depend on the batching) is refused up front; the
model is ``model_fn`` for the Fisher, and for the Hessian the ``model=`` argument or the
module behind a :func:`secorder.module_loss` function.

Non-finite values: in eager mode every batch's contribution is checked; a non-finite
one raises an error naming the quantity (loss, gradient or products, diagnosed on the
failing batch only) and the batch index. Under ``torch.func`` transforms (``vmap`` over
stacked parameters) data-dependent checks are impossible: they are skipped and NaN/Inf
propagate into the result like any other ``torch`` computation.

Distributed
-----------
When ``torch.distributed`` is initialised, each rank passes its own shard of the data;
every dataset-level sum (the weighted contributions and N) is all-reduced, so all ranks
return the value a single process would get on the union of the shards. Randomized
estimates need identical probes on every rank: create the generator with the same seed
on every rank (``torch.Generator(device).manual_seed(0)``); probes that differ between ranks
are detected (two checksums all-reduced per pass) and raise an error on every rank. Works with ``gloo`` (CPU
tensors) and ``nccl`` (CUDA tensors). Across machines::

    # on each of 2 machines (node_rank 0 and 1), 4 processes per machine
    torchrun --nnodes=2 --nproc-per-node=4 --node-rank=$NODE_RANK \\
        --rdzv-backend=c10d --rdzv-endpoint=$HOST0:29500 script.py

    # script.py
    torch.distributed.init_process_group("gloo")   # or "nccl" with params on cuda:LOCAL_RANK
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    loader = DataLoader(dataset, batch_size=64,
                        sampler=DistributedSampler(dataset, shuffle=False, drop_last=False))
    tr = secorder.dataset_hessian_trace(f, params, loader, num_probes=100,
                                        generator=torch.Generator().manual_seed(0))

``DistributedSampler`` pads the last shard by repeating samples unless the dataset size is a
multiple of the world size; shard the data yourself (e.g. ``Subset`` of
``range(rank, len(ds), world)``) for exact equality with a single process.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from secorder import _cost
from secorder import probes as _probes
from secorder._chunking import check_chunk_size
from secorder._errors import SecorderError, error
from secorder._progress import progress_bar
from secorder._pytree import accumulation_dtype, check_floating_tree, flatten, ravel, unflatten, unravel
from secorder._select import check_select, split
from secorder._validate import (
    check_bool,
    check_callable,
    check_finite_enabled,
    check_finite_tree,
    check_grad_context,
    check_method,
    check_num_probes,
    finite_checks,
    inspectable,
)
from secorder.estimators import DIAGONAL_ESTIMATORS, TRACE_ESTIMATORS, exact_diagonal
from secorder.operators import LinearOperator, check_strategy, in_functorch_transform

__all__ = [
    "DatasetOperator",
    "dataset_fisher_diagonal",
    "dataset_fisher_trace",
    "dataset_hessian_diagonal",
    "dataset_hessian_trace",
]

REDUCTIONS = ("mean", "sum")
Batch = tuple[Any, Any]


# -- helpers ----------------------------------------------------------------------------
def _unpack(call: str, batch: object, index: int) -> Batch:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise error(
            call,
            "data must yield (inputs, targets) pairs",
            f"a {type(batch).__name__} at batch {index}",
            "Yield (x, y) from the iterable, e.g. a DataLoader over a TensorDataset(X, Y).",
            cls=TypeError,
        )
    return batch[0], batch[1]


def _batch_size(call: str, inputs: Any, index: int) -> int:
    leaves, _ = flatten(inputs)
    tensors = [x for x in leaves if isinstance(x, Tensor) and x.dim() > 0]
    if not tensors:
        raise error(
            call,
            "the inputs of each batch must contain a tensor with the samples along dimension 0",
            f"inputs without such a tensor at batch {index}",
            "Yield (x, y) with x of shape (N, ...).",
        )
    return int(tensors[0].shape[0])


def _fingerprint(x: Any, y: Any, n: int) -> tuple[Any, ...]:
    """An exact, per-sample, order-insensitive fingerprint of a batch.

    Each sample i gets a hash of the bytes of its rows ``t[i]`` of every tensor batched along
    dimension 0 (inputs and targets together, so re-pairing inputs with other targets changes
    it; any change of any bit, e.g. a random flip, changes it); the fingerprint is the sorted
    multiset of these hashes (so reordering samples within a batch does not change it) plus
    the shapes, dtypes and bytes of the unbatched tensors and the reprs of non-tensors.
    """
    leaves, spec = flatten((x, y))
    rows: list[Any] = []
    shared: list[Any] = [str(spec)]
    for leaf in leaves:
        if isinstance(leaf, Tensor):
            t = leaf.detach().contiguous().cpu()
            if t.dim() > 0 and t.shape[0] == n:
                rows.append(t.reshape(n, -1).view(torch.uint8).numpy() if t.numel() else None)
                shared.append((tuple(t.shape), str(t.dtype)))
            else:
                shared.append(
                    (tuple(t.shape), str(t.dtype), _digest(t.reshape(-1).view(torch.uint8).numpy()))
                )
        else:
            shared.append(repr(leaf))
    per_sample = sorted(_digest(*[r[i] for r in rows if r is not None]) for i in range(n))
    return (tuple(shared), tuple(per_sample))


def _digest(*arrays: Any) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        h.update(a.tobytes())
        h.update(b"|")
    return h.digest()


def check_batch(call: str, x: Any, y: Any, b: int, n: int) -> None:
    """A batch must be non-empty, and its inputs and targets must have the same number of samples."""
    if n == 0:
        raise error(
            call,
            "every batch must hold at least one sample (the mean of a loss over 0 samples is NaN)",
            f"an empty batch at batch {b}",
            "Drop empty batches from the data (e.g. DataLoader(..., drop_last=True) or a filter).",
        )
    sizes = [int(t.shape[0]) for t in flatten(y)[0] if isinstance(t, Tensor) and t.dim() > 0]
    if sizes and any(s != n for s in sizes):
        raise error(
            call,
            "the inputs and targets of each batch must hold the same number of samples along dimension 0",
            f"{n} input samples and targets with {sizes} samples at batch {b}",
            "Yield matching (x, y) pairs, e.g. from a TensorDataset(X, Y).",
        )


def _check_model_mode(call: str, model: nn.Module | None) -> None:
    if model is None:
        return
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
            what, why = f"{type(m).__name__}(p={m.p})", "redraws its mask on every pass"
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            what, why = type(m).__name__, "normalizes with each batch's statistics"
        else:
            continue
        raise error(
            call,
            "the model must compute the same deterministic function on every pass and batch",
            f"{what} in train mode at '{name or type(model).__name__}', which {why}",
            "Call model.eval() first, or pass check_determinism=False if you really want the "
            "curvature of the train-mode function of each batch.",
        )


def _distributed() -> bool:
    return bool(torch.distributed.is_available() and torch.distributed.is_initialized())


def _all_reduce(total: Tensor, count: int) -> tuple[Tensor, int]:
    """Sum ``total`` and ``count`` over the ranks of the default process group (if any)."""
    if not _distributed():
        return total, count
    total = total.clone()
    n = torch.tensor([float(count)], dtype=torch.float64, device=total.device)
    torch.distributed.all_reduce(total)
    torch.distributed.all_reduce(n)
    return total, round(float(n.item()))


def _check_same_on_ranks(call: str, V: Tensor) -> None:
    """Raise on every rank if the probe rows differ between ranks (compared by two checksums)."""
    if not _distributed() or in_functorch_transform([V]):
        return
    weights = torch.linspace(1.0, 2.0, V.shape[-1], dtype=torch.float64, device=V.device)
    sums = torch.stack([V.double().sum(), (V.double() * weights).sum()])
    lo, hi = sums.clone(), sums.clone()
    torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise error(
            call,
            "every rank must apply the same probes (the products are summed over ranks)",
            f"probes that differ between ranks (checksums from {lo.tolist()} to {hi.tolist()})",
            "Create the generator with the same seed on every rank, e.g. "
            "torch.Generator(device).manual_seed(0), not a rank-dependent seed or None.",
        )


def _agree_on_failure(call: str, device: torch.device, exc: Exception | None) -> None:
    """All-reduce whether any rank failed this pass; raise on every rank if one did."""
    flag = torch.tensor([0.0 if exc is None else 1.0], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    if float(flag.item()) > 0 and exc is None:
        raise error(
            call,
            "every rank must complete its pass over its shard of the data",
            "an error on another rank (its message is in that rank's output)",
            "Fix the failing rank's data or parameters; all ranks stop together rather than "
            "waiting at the all-reduce for the process group's timeout.",
            cls=RuntimeError,
        )


class _Pass:
    """Shared bookkeeping of passes over the data: weights, fingerprints, finiteness, progress."""

    def __init__(
        self,
        call: str,
        data: Iterable[Any],
        reduction: str,
        check_determinism: bool,
        check_finite: bool,
        progress: bool,
        diagnose: Callable[[Any, Any], str],
        leaves: Sequence[Tensor],
    ) -> None:
        if isinstance(data, Iterator):
            raise error(
                call,
                "data must be re-iterable (a DataLoader, a list of batches, ...)",
                f"a one-shot iterator ({type(data).__name__})",
                "Pass list(batches) or the DataLoader itself; a generator is exhausted after one pass.",
                cls=TypeError,
            )
        self.call = call
        self.data = data
        self.reduction = reduction
        self.check_determinism = check_determinism
        self.check_finite = check_finite
        self.progress = progress
        self.diagnose = diagnose
        self.leaves = list(leaves)
        self.fingerprints: list[tuple[Any, ...]] | None = None
        self.passes = 0

    def run(self, contribution: Callable[[Any, Any], Tensor], quantity: str) -> Tensor:
        """Σ_b w_b contribution(x_b, y_b), all-reduced over ranks.

        When distributed, a failure on one rank is shared (one all-reduced flag per pass),
        so every rank raises instead of waiting at the all-reduce for the group's timeout.
        """
        sync = _distributed() and not in_functorch_transform(self.leaves)
        try:
            total, count = self._local(contribution, quantity)
        except Exception as exc:
            if sync:
                _agree_on_failure(self.call, self.leaves[0].device, exc)
            raise
        if sync:
            _agree_on_failure(self.call, self.leaves[0].device, None)
            total, count = _all_reduce(total, count)
        return total / count if self.reduction == "mean" else total

    def _local(self, contribution: Callable[[Any, Any], Tensor], quantity: str) -> tuple[Tensor, int]:
        """This process's Σ_b w_b contribution and sample count, with the per-batch checks."""
        total: Tensor | None = None
        count = 0
        prints: list[tuple[Any, ...]] = []
        desc = f"{quantity} (pass {self.passes + 1})"
        for b, batch in enumerate(progress_bar(self.data, self.progress, self.call, desc)):
            x, y = _unpack(self.call, batch, b)
            n_b = _batch_size(self.call, x, b)
            check_batch(self.call, x, y, b, n_b)
            checks = self.check_finite and check_finite_enabled()
            if checks and not in_functorch_transform(self.leaves):
                check_finite_tree(self.call, f"the inputs of batch {b}", x, samples=True)
                check_finite_tree(self.call, f"the targets of batch {b}", y, samples=True)
            if self.check_determinism:
                prints.append(_fingerprint(x, y, n_b))
                self._compare(prints, b)
            try:
                with finite_checks(False):  # checked below, naming the batch
                    out = contribution(x, y)
            except SecorderError as exc:  # a per-batch check (targets, outputs): say which batch
                raise type(exc)(f"{exc} (in batch {b} of the data, {n_b} samples)") from exc
            if checks and not in_functorch_transform([out]) and not bool(torch.isfinite(out).all()):
                raise error(
                    self.call,
                    f"the loss, gradients and {quantity} of every batch must be finite",
                    f"{self.diagnose(x, y)} at batch {b} (of {n_b} samples)",
                    "Check that batch's inputs and targets and the parameters for NaN/Inf "
                    "(a diverged run needs a smaller step), or compute in float64.",
                )
            weighted = out * n_b if self.reduction == "mean" else out
            total = weighted if total is None else total + weighted
            count += n_b
        if total is None:
            raise error(self.call, "data must yield at least one batch", "an empty iterable", "Pass data.")
        if self.check_determinism and self.fingerprints is not None and len(prints) != len(self.fingerprints):
            raise self._changed(
                f"{len(self.fingerprints)} batches on pass 1 and {len(prints)} on pass {self.passes + 1}"
            )
        if self.fingerprints is None:
            self.fingerprints = prints
        self.passes += 1
        return total, count

    def _compare(self, prints: list[tuple[Any, ...]], b: int) -> None:
        if self.fingerprints is None:
            return
        if b >= len(self.fingerprints):
            raise self._changed(f"more batches than the {len(self.fingerprints)} of pass 1")
        if prints[b] != self.fingerprints[b]:
            raise self._changed(f"different contents at batch {b} on pass {self.passes + 1}")

    def _changed(self, what: str) -> Exception:
        return error(
            self.call,
            "the data must yield the same batches on every pass (randomized estimates take "
            "several passes, one per chunk of probes)",
            what,
            "Use a loader without shuffling and without random augmentation (DataLoader(..., "
            "shuffle=False), a deterministic transform), or materialize the batches once with "
            "list(loader); pass check_determinism=False to skip this check.",
        )


class DatasetOperator:
    """Σ_b w_b A_b over the batches of a dataset, as an operator (see the module docstring).

    Args:
        make_op: ``make_op(inputs, targets) -> operator`` of one batch (its loss with the
            given ``reduction``).
        passes: the :class:`_Pass` bookkeeping (data, weights, checks).
        size, dtype, device: those of the parameters (``dtype`` becomes the operator's
            ``compute_dtype``; its ``dtype`` is the accumulation dtype, float32 for
            float16/bfloat16, as for every operator: :func:`secorder._pytree.accumulating`).
    """

    def __init__(
        self,
        make_op: Callable[[Any, Any], LinearOperator],
        passes: _Pass,
        size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.make_op = make_op
        self.passes = passes
        self._size, self._dtype, self._device = size, accumulation_dtype(dtype), device
        self.compute_dtype = dtype  # the batch operators round rows to it and return float32

    @property
    def size(self) -> int:
        return self._size

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    def matmat(self, V: Tensor) -> Tensor:
        """Rows Σ_b w_b A_b v_i, one pass over the data."""
        _check_same_on_ranks(self.passes.call, V)
        return self.passes.run(lambda x, y: self.make_op(x, y).matmat(V), "products")

    def quadform(self, V: Tensor) -> Tensor:
        """Values Σ_b w_b v_iᵀ A_b v_i, one pass over the data."""
        _check_same_on_ranks(self.passes.call, V)
        return self.passes.run(lambda x, y: self.make_op(x, y).quadform(V), "products")


# -- validation -------------------------------------------------------------------------
def _check_options(
    call: str,
    reduction: object,
    num_probes: object,
    chunk_size: object,
    flags: dict[str, object],
) -> None:
    if reduction not in REDUCTIONS:
        raise error(
            call,
            "reduction must be 'mean' or 'sum' (how each batch's loss combines its samples)",
            f"{reduction!r}",
            "Use reduction='mean' for losses averaged over the batch, 'sum' for summed ones.",
        )
    check_num_probes(call, num_probes)
    check_chunk_size(call, chunk_size)
    for name, value in flags.items():
        check_bool(call, name, value)


def _finish(
    est: Tensor, err: Tensor, leaves: list[Tensor], spec: Any, diagonal: bool, with_stderr: bool
) -> Any:
    if diagonal:
        shapes = [leaf.shape for leaf in leaves]
        tree = unflatten(spec, unravel(est, shapes))
        return (tree, unflatten(spec, unravel(err, shapes))) if with_stderr else tree
    return (est, err) if with_stderr else est


# -- Hessian ----------------------------------------------------------------------------
def _dataset_hessian(
    call: str,
    f: Callable[..., Tensor],
    params: Any,
    data: Iterable[Any],
    diagonal: bool,
    num_probes: int | None,
    reduction: str,
    generator: torch.Generator | None,
    with_stderr: bool,
    chunk_size: int | None,
    strategy: str,
    method: str,
    distribution: str,
    model: nn.Module | None,
    check_determinism: bool,
    check_finite: bool,
    progress: bool,
    select: Any = None,
) -> Any:
    from secorder.hessian import hessian_operator  # local: hessian imports nothing from here

    check_callable(call, "f", f)
    if model is None:
        model = getattr(f, "secorder_module", None)
    params, restore = split(call, check_select(call, select), params)
    if select is not None:
        f_all = f

        def f(p: Any, *batch: Any) -> Tensor:  # the unselected parameters held fixed
            return f_all(restore(p), *batch)

    _check_options(
        call,
        reduction,
        num_probes,
        chunk_size,
        dict(
            with_stderr=with_stderr,
            check_determinism=check_determinism,
            check_finite=check_finite,
            progress=progress,
        ),
    )
    check_strategy(call, strategy)
    registry = DIAGONAL_ESTIMATORS if diagonal else TRACE_ESTIMATORS
    estimator = check_method(call, method, registry)
    _probes.check_distribution(call, distribution)
    leaves, spec = check_floating_tree(call, "params", params)
    check_grad_context(call, leaves)
    if check_finite and any(inspectable(leaf) for leaf in leaves):
        check_finite_tree(call, "params", params)
    gen = _probes.check_generator(call, generator, leaves[0].device)
    if model is None:
        model = getattr(f, "secorder_module", None)
    if check_determinism:
        _check_model_mode(call, model)

    def diagnose(x: Any, y: Any) -> str:
        p = [leaf.detach().requires_grad_(True) for leaf in leaves]
        with torch.enable_grad():
            loss = f(unflatten(spec, p), x, y)
            if not bool(torch.isfinite(loss).all()):
                return f"a non-finite loss ({float(loss.detach())})"
            grads = torch.autograd.grad(loss, p, allow_unused=True)
        bad = [i for i, g in enumerate(grads) if g is not None and not bool(torch.isfinite(g).all())]
        if bad:
            return f"a finite loss but a non-finite gradient (in parameter leaves {bad})"
        return "a finite loss and gradient but non-finite Hessian-vector products"

    passes = _Pass(call, data, reduction, check_determinism, check_finite, progress, diagnose, leaves)

    def make_op(x: Any, y: Any) -> LinearOperator:
        return hessian_operator(f, params, x, y, strategy=strategy)[0]

    if num_probes is None:
        size = sum(int(leaf.numel()) for leaf in leaves)
        name = "dataset_hessian_diagonal" if diagonal else "dataset_hessian_trace"
        _cost.check_budget(  # the cost model (secorder._cost): P one-hot products of each batch
            call,
            f"Hessian {'diagonal' if diagonal else 'trace'} (per batch)",
            [_cost.Route("hvp", size, f"P={size:,} one-hot Hessian-vector products of each batch")],
            [f"{name}(f, params, data, num_probes=K) (K products per batch)"],
        )
        if diagonal:
            est = passes.run(
                lambda x, y: exact_diagonal(make_op(x, y), chunk_size=chunk_size, progress=progress),
                "diagonal",
            )
        else:
            est = passes.run(
                lambda x, y: exact_diagonal(make_op(x, y), chunk_size=chunk_size, progress=progress).sum(),
                "trace",
            )
        return _finish(est, torch.zeros_like(est), leaves, spec, diagonal, with_stderr)
    size = sum(int(leaf.numel()) for leaf in leaves)
    op = DatasetOperator(make_op, passes, size, leaves[0].dtype, leaves[0].device)
    est, err = estimator(op, num_probes, distribution=distribution, generator=gen, chunk_size=chunk_size)
    return _finish(est, err, leaves, spec, diagonal, with_stderr)


_HESSIAN_ARGS = """
    Args:
        f: ``f(params, inputs, targets) -> scalar``, the loss of one batch with ``reduction``
            over its samples (e.g. from :func:`secorder.module_loss`).
        params: θ, a pytree of floating tensors.
        data: a re-iterable of ``(inputs, targets)`` batches (a DataLoader, a list, ...);
            inputs hold the samples along dimension 0.
        num_probes: ``None`` for the exact value (one pass), or K probes for ``method``.
        reduction: ``"mean"`` (L = Σ_b (N_b/N) L_b) or ``"sum"`` (L = Σ_b L_b).
        generator: the source of the probes (same seed on every rank when distributed).
        with_stderr: also return the standard error (zeros when exact).
        chunk_size: rows per batched product (``None``: from the memory budget); a
            randomized estimate makes one pass over the data per chunk of probes.
        strategy: how Hessian-vector products are formed (:mod:`secorder.operators`),
            including ``"finite_difference"`` for operators without double backward.
        method: the randomized estimator (a key of :mod:`secorder.estimators`' registries).
        distribution: the probe distribution, ``"rademacher"``, ``"gaussian"`` or ``"sphere"``.
        model: the ``nn.Module`` inside ``f``, for the train-mode check (found
            automatically for functions made by :func:`secorder.module_loss`).
        check_determinism: refuse train-mode Dropout/BatchNorm and data that change between
            passes (see :mod:`secorder.data`).
        check_finite: raise on a non-finite batch contribution (eager mode).
        progress: show a tqdm progress bar over the batches of each pass.
        select: the curvature of a subset of ``params`` (a dict keyed by name) picked by a
            glob, a list of globs, a compiled regex or a predicate; the other parameters are
            held fixed and results hold only the selected entries (:mod:`secorder._select`).

    Raises:
        SecorderError, TypeError: invalid options or data; a non-finite batch (naming the
            batch and whether the loss, the gradient or the products are at fault); data
            that change between passes; a train-mode model with Dropout or BatchNorm.
        ImportError: ``progress=True`` without tqdm installed.
"""


def dataset_hessian_trace(
    f: Callable[..., Tensor],
    params: Any,
    data: Iterable[Any],
    /,
    *,
    num_probes: int | None = None,
    reduction: str = "mean",
    generator: torch.Generator | None = None,
    with_stderr: bool = False,
    chunk_size: int | None = None,
    strategy: str = "auto",
    method: str = "hutchinson",
    distribution: str = "rademacher",
    model: nn.Module | None = None,
    check_determinism: bool = True,
    check_finite: bool = True,
    progress: bool = False,
    select: Any = None,
) -> Any:
    """The trace of the Hessian of the loss over a whole dataset, exact or estimated.

    tr(H) with H = Σ_b w_b ∇²_θ L_b (w_b = N_b/N for ``"mean"``, 1 for ``"sum"``):
    exactly as Σ_b w_b tr(H_b) in one pass (P products per batch), or by ``method`` with
    K probes on :class:`DatasetOperator` (K products per batch, one pass per chunk).
    {args}
    Returns:
        A 0-dim tensor, or ``(estimate, stderr)`` with ``with_stderr=True``.

    Example:
        >>> import torch
        >>> f = lambda w, x, y: ((x @ w - y) ** 2).mean()         # H_b = 2 X_bᵀX_b / N_b
        >>> X, Y = torch.arange(10.0).reshape(5, 2), torch.zeros(5)
        >>> data = [(X[:2], Y[:2]), (X[2:], Y[2:])]               # uneven batches
        >>> dataset_hessian_trace(f, torch.zeros(2), data)        # = 2 ‖X‖²_F / 5
        tensor(114.)
    """
    return _dataset_hessian(
        "dataset_hessian_trace(f, params, data)", f, params, data, False, num_probes, reduction,
        generator, with_stderr, chunk_size, strategy, method, distribution, model,
        check_determinism, check_finite, progress, select,
    )  # fmt: skip


def dataset_hessian_diagonal(
    f: Callable[..., Tensor],
    params: Any,
    data: Iterable[Any],
    /,
    *,
    num_probes: int | None = None,
    reduction: str = "mean",
    generator: torch.Generator | None = None,
    with_stderr: bool = False,
    chunk_size: int | None = None,
    strategy: str = "auto",
    method: str = "hutchinson",
    distribution: str = "rademacher",
    model: nn.Module | None = None,
    check_determinism: bool = True,
    check_finite: bool = True,
    progress: bool = False,
    select: Any = None,
) -> Any:
    """The diagonal of the Hessian of the loss over a whole dataset, exact or estimated.

    diag(H) = Σ_b w_b diag(H_b) exactly in one pass (P one-hot products per batch,
    ``chunk_size`` at a time), or by ``method`` with K probes on :class:`DatasetOperator`.
    {args}
    Returns:
        A pytree shaped like ``params``, or ``(diagonal, stderr)`` pytrees.

    Example:
        >>> import torch
        >>> f = lambda w, x, y: ((x @ w - y) ** 2).sum()
        >>> X, Y = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]), torch.zeros(3)
        >>> dataset_hessian_diagonal(f, torch.zeros(2), [(X[:2], Y[:2]), (X[2:], Y[2:])],
        ...                          reduction="sum")           # 2 Σ_n x_n²
        tensor([ 4., 10.])
    """
    return _dataset_hessian(
        "dataset_hessian_diagonal(f, params, data)", f, params, data, True, num_probes, reduction,
        generator, with_stderr, chunk_size, strategy, method, distribution, model,
        check_determinism, check_finite, progress, select,
    )  # fmt: skip


# -- Fisher / GGN / empirical Fisher ----------------------------------------------------
def _dataset_fisher(
    call: str,
    model_fn: Any,
    loss: Any,
    params: Any,
    data: Iterable[Any],
    diagonal: bool,
    kind: str,
    num_probes: int | None,
    reduction: str,
    generator: torch.Generator | None,
    with_stderr: bool,
    chunk_size: int | None,
    method: str,
    distribution: str,
    path: str,
    check_determinism: bool,
    check_finite: bool,
    progress: bool,
    select: Any = None,
) -> Any:
    from secorder.fisher import fisher_diagonal, fisher_operator, fisher_trace

    full = params
    params, restore = split(call, check_select(call, select), params)
    # a module gets the full params and select= (its transforms check the names, then hold
    # the rest fixed); a function gets the selected params with the rest restored around it
    module_select = select if isinstance(model_fn, nn.Module) else None
    given = full if module_select is not None else params
    if select is not None and not isinstance(model_fn, nn.Module):
        model_fn_all = model_fn

        def model_fn(p: Any, x: Any) -> Any:
            return model_fn_all(restore(p), x)

    _check_options(
        call,
        reduction,
        num_probes,
        chunk_size,
        dict(
            with_stderr=with_stderr,
            check_determinism=check_determinism,
            check_finite=check_finite,
            progress=progress,
        ),
    )
    registry = DIAGONAL_ESTIMATORS if diagonal else TRACE_ESTIMATORS
    estimator = check_method(call, method, registry)
    leaves, spec = check_floating_tree(call, "params", params)
    check_grad_context(call, leaves)
    if check_finite and any(inspectable(leaf) for leaf in leaves):
        check_finite_tree(call, "params", params)
    gen = _probes.check_generator(call, generator, leaves[0].device)
    if kind == "mc" and with_stderr:
        raise error(
            call,
            "with_stderr=True is not available over a dataset for kind='mc'",
            "with_stderr=True",
            "Pass with_stderr=False, or compute per batch with secorder.fisher_trace.",
        )
    if check_determinism and isinstance(model_fn, nn.Module):
        _check_model_mode(call, model_fn)
    passes = _Pass(
        call, data, reduction, check_determinism, check_finite, progress,
        lambda x, y: f"non-finite {'diagonal' if diagonal else 'trace'} contributions (finite outputs)",
        leaves,
    )  # fmt: skip
    if num_probes is None or kind == "mc":
        common = dict(
            kind=kind,
            num_probes=num_probes,
            reduction=reduction,
            chunk_size=chunk_size,
            path=path,
            select=module_select,
        )
        if diagonal:
            fn = fisher_diagonal(model_fn, loss, **common)  # type: ignore[arg-type]

            def contribution(x: Any, y: Any) -> Tensor:
                return ravel(flatten(fn(given, x, y, generator=gen))[0])

        else:
            fn = fisher_trace(model_fn, loss, **common)  # type: ignore[arg-type]

            def contribution(x: Any, y: Any) -> Tensor:
                return fn(given, x, y, generator=gen)

        try:
            est = passes.run(contribution, "diagonal" if diagonal else "trace")
        except _cost.ExactBudgetError as exc:  # the per-batch transform's refusal, in this call's words
            name = "dataset_fisher_diagonal" if diagonal else "dataset_fisher_trace"
            estimates = str(exc).split(", but received ", 1)[-1].split(". For an estimate", 1)[0]
            raise error(
                call,
                "the exact value of each batch may start at most secorder.exact_budget() products "
                "(checked before any product)",
                f"a batch whose {estimates}",
                f"For an estimate with standard errors use {name}(model_fn, loss, params, data, "
                "num_probes=K) (Hutchinson, one pass over the data per chunk of probes) or kind='mc', "
                "num_probes=K; for the exact value lift the cap with secorder.set_exact_budget, or use "
                "smaller batches.",
                cls=_cost.ExactBudgetError,
            ) from exc
        return _finish(est, torch.zeros_like(est), leaves, spec, diagonal, with_stderr)
    op_fn = fisher_operator(model_fn, loss, kind=kind, reduction=reduction, select=module_select)

    def make_op(x: Any, y: Any) -> LinearOperator:
        return op_fn(given, x, y)[0]

    size = sum(int(leaf.numel()) for leaf in leaves)
    op = DatasetOperator(make_op, passes, size, leaves[0].dtype, leaves[0].device)
    est, err = estimator(op, num_probes, distribution=distribution, generator=gen, chunk_size=chunk_size)
    return _finish(est, err, leaves, spec, diagonal, with_stderr)


_FISHER_ARGS = """
    Args:
        model_fn: an ``nn.Module`` or ``model_fn(params, inputs) -> outputs`` (see
            :func:`secorder.fisher_trace`).
        loss: ``"cross_entropy"``, ``"mse"``, ``"bce_with_logits"`` or a callable.
        params: the parameters (a dict for an ``nn.Module``).
        data: a re-iterable of ``(inputs, targets)`` batches.
        kind: ``"ggn"``, ``"empirical"`` or ``"mc"``.
        num_probes: ``None`` for the exact value (one pass); K probes for ``method``
            (``"ggn"``/``"empirical"``, one pass per chunk of probes); sampled targets per
            datum for ``"mc"`` (one pass).
        reduction: ``"mean"`` (L = (1/N) Σ_n l_n over the whole dataset) or ``"sum"``.
        generator: probes and MC samples (same seed on every rank when distributed).
        with_stderr: also return the standard error (not for ``"mc"``).
        chunk_size: rows per batched product (``None``: from the memory budget).
        method: the randomized estimator for ``num_probes``.
        distribution: the probe distribution, ``"rademacher"``, ``"gaussian"`` or ``"sphere"``.
        path: ``"auto"``, ``"generic"`` or ``"fast"`` for the exact routes.
        check_determinism: refuse train-mode Dropout/BatchNorm and data that change between
            passes.
        check_finite: raise on a non-finite batch contribution (eager mode).
        progress: show a tqdm progress bar over the batches of each pass.
        select: the curvature of a subset of ``params`` (a dict keyed by name) picked by a
            glob, a list of globs, a compiled regex or a predicate; the other parameters are
            held fixed and results hold only the selected entries (:mod:`secorder._select`).

    Raises:
        SecorderError, TypeError: as :func:`secorder.fisher_trace`, plus invalid data, a
            non-finite batch contribution (naming the batch), data that change between passes
            and train-mode Dropout/BatchNorm.
        ImportError: ``progress=True`` without tqdm installed.
"""


def dataset_fisher_trace(
    model_fn: Any,
    loss: Any,
    params: Any,
    data: Iterable[Any],
    /,
    *,
    kind: str = "ggn",
    num_probes: int | None = None,
    reduction: str = "mean",
    generator: torch.Generator | None = None,
    with_stderr: bool = False,
    chunk_size: int | None = None,
    method: str = "hutchinson",
    distribution: str = "rademacher",
    path: str = "auto",
    check_determinism: bool = True,
    check_finite: bool = True,
    progress: bool = False,
    select: Any = None,
) -> Any:
    """The trace of the GGN, empirical Fisher or MC Fisher of the loss over a whole dataset.

    Σ_b w_b tr(A_b) in one pass for the exact and MC values (per batch as
    :func:`secorder.fisher_trace`), or ``method`` with K probes on :class:`DatasetOperator`
    (one Jacobian-vector product per probe and batch).
    {args}
    Returns:
        A 0-dim tensor, or ``(estimate, stderr)``.

    Example:
        >>> import torch
        >>> X, Y = torch.eye(3), torch.zeros(3, 1)
        >>> data = [(X[:2], Y[:2]), (X[2:], Y[2:])]
        >>> # (1/N) Σ 2‖x_n‖²
        >>> dataset_fisher_trace(lambda w, x: x @ w, "mse", torch.zeros(3, 1), data)
        tensor(2.)
    """
    return _dataset_fisher(
        "dataset_fisher_trace(model_fn, loss, params, data)", model_fn, loss, params, data, False,
        kind, num_probes, reduction, generator, with_stderr, chunk_size, method, distribution, path,
        check_determinism, check_finite, progress, select,
    )  # fmt: skip


def dataset_fisher_diagonal(
    model_fn: Any,
    loss: Any,
    params: Any,
    data: Iterable[Any],
    /,
    *,
    kind: str = "ggn",
    num_probes: int | None = None,
    reduction: str = "mean",
    generator: torch.Generator | None = None,
    with_stderr: bool = False,
    chunk_size: int | None = None,
    method: str = "hutchinson",
    distribution: str = "rademacher",
    path: str = "auto",
    check_determinism: bool = True,
    check_finite: bool = True,
    progress: bool = False,
    select: Any = None,
) -> Any:
    """The diagonal of the GGN, empirical Fisher or MC Fisher of the loss over a whole dataset.

    Σ_b w_b diag(A_b) in one pass (per batch as :func:`secorder.fisher_diagonal`), or
    ``method`` with K probes on :class:`DatasetOperator`.
    {args}
    Returns:
        A pytree shaped like ``params``, or ``(diagonal, stderr)`` pytrees.

    Example:
        >>> import torch
        >>> X, Y = torch.tensor([[1.0, 2.0], [3.0, 0.0]]), torch.zeros(2, 1)
        >>> dataset_fisher_diagonal(lambda w, x: x @ w, "mse", torch.zeros(2, 1),
        ...                         [(X[:1], Y[:1]), (X[1:], Y[1:])], reduction="sum")
        tensor([[20.],
                [ 8.]])
    """
    return _dataset_fisher(
        "dataset_fisher_diagonal(model_fn, loss, params, data)", model_fn, loss, params, data, True,
        kind, num_probes, reduction, generator, with_stderr, chunk_size, method, distribution, path,
        check_determinism, check_finite, progress, select,
    )  # fmt: skip


for _f, _args in (
    (dataset_hessian_trace, _HESSIAN_ARGS),
    (dataset_hessian_diagonal, _HESSIAN_ARGS),
    (dataset_fisher_trace, _FISHER_ARGS),
    (dataset_fisher_diagonal, _FISHER_ARGS),
):
    if _f.__doc__:
        _f.__doc__ = _f.__doc__.replace("{args}", _args)
