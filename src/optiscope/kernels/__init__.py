"""The one interface the optimizers and dropout call for their fused work.

* :func:`momentum_` and :func:`adam_`: the rules of
  :func:`optiscope.rules.momentum_step` and :func:`optiscope.rules.adam_step`
  on whole lists of tensors, through the operators ``torch.ops.optiscope.*``;
* :func:`check_momentum` and :func:`check_adam`: the same checks without the
  step, so an optimizer can validate every group before it changes any;
* :func:`dropout_forward`, :func:`dropout_backward` and :func:`count_kept`:
  inverted dropout with the Philox mask of :mod:`.philox`, regenerated, never
  stored.

Rows are routed before they reach an operator: plain tensors go to it as they
are, a ``DTensor`` as its local shard (the rules are elementwise and need no
communication), tensors being traced by torch.compile to the operator's fake
implementation, and any other tensor subclass to the per-tensor torch rule.
Behind the operator, :mod:`.gate` checks every tensor before :mod:`.dispatch`
takes an address.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch

from .. import _checks
from . import dispatch, loading, ops, philox, rows, torch_rule
from .gate import PLAIN_TYPES, check_rows, is_plain
from .records import AdamBatch, AdamHyper, MomentumBatch, MomentumHyper

_PLAIN = frozenset(PLAIN_TYPES)

__all__ = [
    "adam_",
    "check_adam",
    "check_momentum",
    "count_kept",
    "dropout_backward",
    "dropout_forward",
    "momentum_",
    "philox",
]


# -- routing ---------------------------------------------------------------------
@functools.cache
def _dtensor_type() -> type | None:
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def _traced(t: torch.Tensor) -> bool:
    """A FakeTensor or functional tensor: torch.compile is tracing, and the
    operator's fake implementation stands for the kernel."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    return isinstance(t, (FakeTensor, FunctionalTensor))


def _local(t: torch.Tensor) -> torch.Tensor | None:
    """What the operator takes for ``t``, or None for the per-tensor rule."""
    if is_plain(t):
        return t
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(t, dtensor):
        return t.to_local()
    return t if _traced(t) else None


def _route(
    columns: Sequence[Sequence[torch.Tensor] | None],
) -> tuple[list[int], list[list[torch.Tensor] | None], list[int], bool]:
    """Rows for the operator (with their tensors, DTensors as local shards),
    rows for the per-tensor rule, and whether every tensor was plain."""
    if all(set(map(type, c)) <= _PLAIN for c in columns if c is not None):
        # Every tensor plain: the usual case, decided in one scan.
        return list(range(len(columns[0]))), list(columns), [], True
    fused: list[int] = []
    local: list[list[torch.Tensor] | None] = [
        None if c is None else [] for c in columns
    ]
    per_tensor: list[int] = []
    for i in range(len(columns[0])):
        row = [None if c is None else _local(c[i]) for c in columns]
        if any(c is not None and r is None for c, r in zip(columns, row, strict=True)):
            per_tensor.append(i)
            continue
        fused.append(i)
        for out, r in zip(local, row, strict=True):
            if out is not None:
                out.append(r)
    return fused, local, per_tensor, False


def _pick(column: Sequence | None, picked: list[int]) -> list | None:
    return None if column is None else [column[i] for i in picked]


def _labels(
    labels: Sequence[str] | None, picked: list[int], total: int
) -> Sequence[str] | None:
    """The labels of rows ``picked`` out of ``total`` (read only on an error)."""
    if len(picked) == total:
        return labels
    return [labels[i] if labels is not None else f"params[{i}]" for i in picked]


def _compiling() -> bool:
    return torch.compiler.is_compiling()


# -- checks without a step ---------------------------------------------------------
def check_momentum(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor],
    *,
    labels: Sequence[str] | None = None,
) -> None:
    """Raise what :func:`momentum_` would raise for these tensors, changing nothing."""
    _check(
        (params, grads, momentum_buffers),
        labels,
        lambda batch: dispatch.momentum_columns(MomentumBatch(*batch)),
    )


def check_adam(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    max_exp_avg_sqs: Sequence[torch.Tensor] | None,
    steps: Sequence[torch.Tensor],
    *,
    labels: Sequence[str] | None = None,
) -> None:
    """Raise what :func:`adam_` would raise for these tensors, changing nothing."""
    amsgrad = max_exp_avg_sqs is not None
    _check(
        (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs),
        labels,
        lambda batch: dispatch.adam_columns(AdamBatch(*batch, []), amsgrad),
    )
    dispatch.check_steps(steps, len(params), labels)


def _check(columns, labels, make_columns) -> None:
    fused, local, per_tensor, _ = _route(columns)
    # Real memory only outside tracing: under torch.compile the operator's
    # implementation checks the real tensors when it runs, and fake tensors
    # reach only its fake implementation.
    check_rows(
        make_columns(local),
        labels=_labels(labels, fused, len(columns[0])),
        addresses=not _compiling(),
        plain=not any(_traced(t) for t in local[0]),
    )
    if per_tensor:
        picked = [_pick(c, per_tensor) for c in columns]
        check_rows(
            make_columns(picked),
            labels=_labels(labels, per_tensor, len(columns[0])),
            plain=False,
        )


# -- the steps ----------------------------------------------------------------------
@torch.no_grad()
def momentum_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    maximize: bool,
    stats: np.ndarray | None = None,
) -> None:
    """:func:`optiscope.rules.momentum_step` on every ``(param, grad, buffer)``,
    in one pass over memory.

    ``stats``: None, or a float64 array of shape ``(len(params),
    len(rows.MOMENTUM))``, zeros or earlier sums; row ``i`` gets the sums of
    tensor ``i`` added, measured in the same pass as the update.
    """
    hyper = MomentumHyper(float(lr), float(momentum), float(weight_decay), maximize)
    columns = (params, grads, momentum_buffers)
    fused, local, per_tensor, plain = _route(columns)
    table = _table(stats, len(params), rows.MOMENTUM)
    if per_tensor:  # checked before the operator changes anything
        picked = [_pick(c, per_tensor) for c in columns]
        check_rows(
            dispatch.momentum_columns(MomentumBatch(*picked)),
            labels=_labels(None, per_tensor, len(columns[0])),
            plain=False,
        )
    if fused:
        part = _part(table, fused, rows.MOMENTUM)
        ops.step("momentum_", (*local, *hyper, part), plain)
        _fold(table, part, fused, rows.MOMENTUM)
    if per_tensor:
        part = (
            None
            if table is None
            else dispatch.fresh_rows(len(per_tensor), rows.MOMENTUM)
        )
        torch_rule.momentum_(MomentumBatch(*picked), hyper, part)
        _fold(table, part, per_tensor, rows.MOMENTUM)


@torch.no_grad()
def adam_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    max_exp_avg_sqs: Sequence[torch.Tensor] | None,
    steps: Sequence[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    amsgrad: bool,
    maximize: bool,
    bias_correction: bool,
    rounding_seed: int | None = None,
    rounding_streams: Sequence[int] = (),
    stats: np.ndarray | None = None,
) -> None:
    """:func:`optiscope.rules.adam_step` on every tensor, in one pass over memory.

    ``rounding_seed``: None to round bfloat16 moments to nearest, or the seed
    (``0 <= seed < 2^63``) of their stochastic rounding; element ``i`` of
    tensor ``k`` then takes word ``i`` of :func:`philox.random_words` at offset
    :func:`optiscope.rules.rounding_offset` ``(rounding_streams[k], step)``.

    ``steps[i]`` is tensor ``i``'s step counter (a one-element tensor, torch's
    ``state["step"]``), advanced by one here; ``max_exp_avg_sqs`` is needed only
    with ``amsgrad``. ``stats``: None, or a float64 array of shape
    ``(len(params), len(rows.ADAM))``, pre-initialised (zeros, ``step_min =
    +inf``, ``step_max = -inf``) or holding earlier rows; row ``i`` gets tensor
    ``i``'s sums added and its extrema combined.
    """
    hyper = AdamHyper(
        float(lr),
        float(beta1),
        float(beta2),
        float(eps),
        float(weight_decay),
        decoupled_weight_decay,
        amsgrad,
        maximize,
        bias_correction,
    )
    vmax = max_exp_avg_sqs if amsgrad else None
    columns = (params, grads, exp_avgs, exp_avg_sqs, vmax, steps)
    fused, local, per_tensor, plain = _route(columns[:5])
    plain = plain and set(map(type, steps)) <= _PLAIN
    table = _table(stats, len(params), rows.ADAM)
    if per_tensor:  # checked before the operator changes anything
        picked = [_pick(c, per_tensor) for c in columns]
        check_rows(
            dispatch.adam_columns(AdamBatch(*picked[:5], []), amsgrad),
            labels=_labels(None, per_tensor, len(columns[0])),
            plain=False,
        )
        dispatch.check_steps(picked[5], len(per_tensor), None)
        dispatch.check_streams(rounding_seed, rounding_streams, exp_avgs)
    if fused:
        part = _part(table, fused, rows.ADAM)
        m_max = local[4] if amsgrad else []
        streams = list(rounding_streams) if rounding_seed is not None else []
        args = (
            *local[:4],
            m_max,
            _pick(steps, fused),
            *hyper,
            part,
            rounding_seed,
            _pick(streams, fused) if streams else [],
        )
        ops.step("adam_", args, plain)
        _fold(table, part, fused, rows.ADAM)
    if per_tensor:
        corrections = dispatch.advance(picked[5], hyper)
        mine = (
            _pick(list(rounding_streams), per_tensor)
            if rounding_seed is not None
            else []
        )
        rounding = dispatch.stochastic_rounding(rounding_seed, mine, picked[5])
        batch = AdamBatch(*picked[:5], corrections, rounding)
        part = (
            None if table is None else dispatch.fresh_rows(len(per_tensor), rows.ADAM)
        )
        torch_rule.adam_(batch, hyper, part)
        _fold(table, part, per_tensor, rows.ADAM)


def _table(stats: np.ndarray | None, count: int, layout: tuple[str, ...]):
    if stats is None:
        return None
    if not (
        isinstance(stats, np.ndarray)
        and stats.dtype == np.float64
        and stats.shape == (count, len(layout))
    ):
        raise ValueError(
            f"stats must be a float64 numpy array of shape ({count}, {len(layout)}), "
            f"got {getattr(stats, 'dtype', type(stats))} {getattr(stats, 'shape', '')}"
        )
    return stats


def _part(table: np.ndarray | None, picked: list[int], layout) -> torch.Tensor | None:
    if table is None:
        return None
    return torch.from_numpy(dispatch.fresh_rows(len(picked), layout))


def _fold(table, part, picked: list[int], layout) -> None:
    if table is None:
        return
    values = part.numpy() if isinstance(part, torch.Tensor) else part
    for j, i in enumerate(picked):
        torch_rule.combine_row(table[i], values[j], layout)


# -- dropout -------------------------------------------------------------------------
def dropout_forward(
    x: torch.Tensor,
    p: float,
    seed: int | torch.Tensor,
    offset: int = 0,
    *,
    inplace: bool = False,
) -> torch.Tensor:
    r"""``y = x * (1/(1-p))`` where the Philox word of element ``i`` keeps it, else 0.

    ``0 < p < 1``; ``0 <= seed < 2^63``, an int or a one-element int64 tensor
    (what :func:`optiscope.functional.dropout` draws, so that a compiled graph
    takes it as an input). The mask is :func:`optiscope.kernels.philox.keep_mask`
    of ``x.numel()`` elements, element ``i`` being ``x``'s ``i``-th in row-major
    order whatever its strides; :math:`\gamma = 1/(1-p)` is rounded to the
    compute dtype, as ``x * gamma`` does in torch. The output has ``x``'s
    strides, or is ``x`` itself with ``inplace``. Autograd saves no tensor, and
    forward-mode AD and ``torch.func`` transforms (``vmap`` per its
    ``randomness``) go through the same regenerated mask.

    A ``DTensor`` (in eager mode) keeps its placements, and each element of
    its shards takes the bit of its index in the whole tensor (see
    :func:`_dtensor_dropout`).
    """
    seed = _seed_tensor(seed)
    if inplace and x.requires_grad and torch.is_grad_enabled():
        _check_inplace(x)
    if torch.compiler.is_compiling():
        # Dynamo cannot trace a Function with a custom jvp: the operator itself
        # carries the same backward, registered with torch.library.
        y = ops.philox_dropout(x, p, seed, offset)
        return x.copy_(y) if inplace else y
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(x, dtensor):  # eager only
        return _dtensor_dropout(x, p, seed, offset, inplace)
    if not inplace:
        return ops.apply(ops.PhiloxDropout, x, p, seed, offset)
    if torch._C._are_functorch_transforms_active():
        # Transforms see a functional op and an ordinary in-place copy.
        return x.copy_(ops.PhiloxDropout.apply(x, p, seed, offset))
    return ops.apply(ops.PhiloxDropoutInplace, x, p, seed, offset)


def _check_inplace(x: torch.Tensor) -> None:
    """torch's refusals of an in-place write, raised before the kernel writes
    anything (autograd itself would raise only after it)."""
    if x.is_leaf:
        raise RuntimeError(
            "a leaf Variable that requires grad is being used in an in-place "
            "operation: dropout(inplace=True) would overwrite it"
        )
    if x._base is not None and x._base.is_leaf and x._base.requires_grad:
        raise RuntimeError(
            "a view of a leaf Variable that requires grad is being used in an "
            "in-place operation: dropout(inplace=True) would overwrite it"
        )


def _dtensor_dropout(
    x: torch.Tensor, p: float, seed: torch.Tensor, offset: int, inplace: bool
) -> torch.Tensor:
    r"""Dropout of a DTensor with its placements kept: each rank masks its shard
    with the bits of the shard's global row-major indices, so the result is
    exactly the unsharded dropout from the same seed (every rank must draw the
    same seed: seed the ranks' generators alike). ``Partial`` shards are
    masked alike too: the mask commutes with sum, average, max and min, as
    :math:`\gamma d \ge 0`."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    for placement in x.placements:
        if type(placement) not in (Shard, Replicate) and not isinstance(
            placement, Partial
        ):
            raise ValueError(
                f"dropout of a DTensor takes Shard, Replicate and Partial "
                f"placements, got {placement} in {tuple(x.placements)}"
            )
    _, start = compute_local_shape_and_global_offset(
        x.shape, x.device_mesh, x.placements
    )
    # to_local and from_local are differentiable: the gradient reaches the
    # operator's backward as a local shard in the same placements.
    local = ops.philox_dropout_box(
        x.to_local(), p, seed, offset, list(x.shape), list(start)
    )
    y = DTensor.from_local(
        local,
        x.device_mesh,
        x.placements,
        run_check=False,
        shape=x.shape,
        stride=x.stride(),
    )
    return x.copy_(y) if inplace else y


def dropout_backward(
    grad_y: torch.Tensor, p: float, seed: int | torch.Tensor, offset: int = 0
) -> torch.Tensor:
    """The gradient of :func:`dropout_forward`: the same mask and scale on ``grad_y``."""
    return ops.philox_dropout_backward(grad_y, p, _seed_tensor(seed), offset)


def _seed_tensor(seed: int | torch.Tensor) -> torch.Tensor:
    """An int seed as the one-element int64 tensor the operators take."""
    if isinstance(seed, torch.Tensor):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(
            f"seed must be an int or a one-element int64 tensor, got {seed!r}"
        )
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return torch.tensor(seed, dtype=torch.int64)


def count_kept(numel: int, p: float, seed: int, offset: int) -> int:
    """How many of ``numel`` elements the dropout mask keeps: ``keep_mask(...).sum()``.

    The same Philox words as :func:`dropout_forward` on a tensor of ``numel``
    elements, generated and compared on the CPU without reading or writing a
    tensor, so a probe can report the observed keep rate ``count / numel``
    (expected ``1 - p``). ``0 <= p <= 1``; ``0 <= seed < 2^63``.

    Example:
        >>> from optiscope.kernels import count_kept, philox
        >>> kept = count_kept(1000, 0.5, seed=7, offset=0)
        >>> kept == int(philox.keep_mask(1000, 0.5, seed=7).sum())
        True
    """
    p = _checks.probability("p", p)
    if numel < 0:
        raise ValueError(f"count_kept needs numel >= 0, got {numel!r}")
    if p == 1.0 or numel == 0:
        return 0  # the threshold 2^32 does not fit a word; nothing is kept
    # numba on first use only, through the loader that announces a compile
    return loading.backend().count_kept(numel, p, seed, offset)
