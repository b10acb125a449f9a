"""The CPU backend: numba kernels, one pass over memory per optimizer step.

Four functions: :func:`momentum_`, :func:`adam_`, :func:`dropout_forward` and
:func:`count_kept`. The dispatcher guarantees, and nothing here checks again,
that every tensor is a plain dense contiguous CPU tensor with ``numel > 0``;
that a grad has its param's shape and dtype; that the states of a row share
one dtype (the param's, or Adam's ``state_dtype``) and the param's shape; that
dtypes are float64, float32, bfloat16 or float16; and that no two tensors
overlap. Rows may differ in dtype: each group of rows with the same dtypes is
one kernel call.

``stats`` is None or a float64 array with a row per tensor and the columns of
:data:`~optiscope.kernels.rows.MOMENTUM` or :data:`~optiscope.kernels.rows.ADAM`,
pre-initialised by the caller (zeros; Adam's ``step_min = +inf``,
``step_max = -inf``): row ``i`` gets tensor ``i``'s sums added and its extrema
combined, NaN winning.

Modules: :mod:`.bits` (loads, stores, bit tricks), :mod:`.threads` (chunks and
the pool), :mod:`.momentum` and :mod:`.adam` (the update loops),
:mod:`.probe_sums` (what a probe adds to them), :mod:`.tables` (host-side
tables), :mod:`.dropout`. Kernels compile on first use and are cached on disk
(:mod:`.jit`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from ... import rules
from .. import rows as layout
from ..gate import Memory
from ..records import AdamBatch, AdamHyper, MomentumBatch, MomentumHyper
from .adam import AdamRule, Rounding, adam_kernel
from .dropout import count_kept, dropout_forward
from .momentum import MomentumRule, momentum_kernel
from .probe_sums import AdamProbe, MomentumProbe
from .steps import advance_counts
from .tables import fold_partials, step_bins, step_thresholds
from .threads import Chunks, chunk_table, run

__all__ = ["adam_", "advance_steps", "count_kept", "dropout_forward", "momentum_"]

#: How each dtype is stored in the arrays a kernel sees: 16-bit floats as bits.
_STORAGE = {
    torch.float64: np.float64,
    torch.float32: np.float32,
    torch.bfloat16: np.uint16,
    torch.float16: np.int16,
}


def _like(dtype: torch.dtype) -> np.ndarray:
    """An empty array whose dtype tells a kernel how ``dtype`` is stored."""
    return np.empty(0, dtype=_STORAGE[dtype])


def _compute(*dtypes: torch.dtype) -> type:
    """The NumPy scalar type of :func:`optiscope.rules.compute_dtype`."""
    return np.float64 if rules.compute_dtype(*dtypes) == torch.float64 else np.float32


def _addresses(column: Sequence[torch.Tensor], idx: list[int]) -> np.ndarray:
    return np.fromiter((column[i].data_ptr() for i in idx), np.int64, len(idx))


class _Group(NamedTuple):
    """Rows that share their dtypes: one kernel call."""

    dtypes: tuple[torch.dtype, ...]  # of each column
    rows: list[int]
    addresses: list[np.ndarray]  # per column, int64
    sizes: np.ndarray  # elements per row, int64


def _groups(
    columns: Sequence[Sequence[torch.Tensor]], memory: Memory | None
) -> list[_Group]:
    """The batch's rows grouped by their dtypes, with their addresses and sizes:
    from ``memory`` (what the gate read) where given, else read here."""
    if memory is None:
        by_dtypes: dict[tuple, list[int]] = defaultdict(list)
        for i in range(len(columns[0])):
            by_dtypes[tuple(c[i].dtype for c in columns)].append(i)
        return [
            _Group(
                key,
                idx,
                [_addresses(c, idx) for c in columns],
                np.fromiter((columns[0][i].numel() for i in idx), np.int64, len(idx)),
            )
            for key, idx in by_dtypes.items()
        ]
    param_dtypes, state_dtypes = memory.dtypes
    # A gradient has its parameter's dtype and the states share one (the gate).
    keys = list(zip(param_dtypes, state_dtypes, strict=True))
    if keys.count(keys[0]) == len(keys):  # the usual case: one group, no indexing
        idx = list(range(len(keys)))
        dtypes = (keys[0][0], keys[0][0], *[keys[0][1]] * (len(columns) - 2))
        return [_Group(dtypes, idx, memory.addresses, memory.numels)]
    by_key: dict[tuple, list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        by_key[key].append(i)
    return [
        _Group(
            (p, p, *[s] * (len(columns) - 2)),
            idx,
            [a[idx] for a in memory.addresses],
            memory.numels[idx],
        )
        for (p, s), idx in by_key.items()
    ]


def momentum_(
    batch: MomentumBatch,
    hyper: MomentumHyper,
    stats: np.ndarray | None,
    memory: Memory | None = None,
) -> None:
    """:func:`optiscope.rules.momentum_step` on every row of ``batch``, in place.
    ``memory``: the gate's reading of the batch, if the caller has it."""
    sign = -1.0 if hyper.maximize else 1.0
    for group in _groups(batch, memory):
        p_dtype, g_dtype, b_dtype = group.dtypes
        compute = _compute(p_dtype, b_dtype)
        rule = MomentumRule(
            *map(compute, (hyper.lr, hyper.momentum, 1.0 - hyper.momentum)),
            compute(hyper.weight_decay),
            compute(sign),
        )
        chunks = chunk_table(group.sizes)
        probe = None
        if stats is not None:
            probe = MomentumProbe(np.empty((chunks.tensor.size, stats.shape[1])))
        run(
            momentum_kernel,
            chunks,
            *group.addresses,
            _like(p_dtype),
            _like(g_dtype),
            _like(b_dtype),
            rule,
            probe,
        )
        if probe is not None:
            rows = np.array(group.rows, np.int64)
            fold_partials(stats, rows, probe.partials, chunks.tensor, False)


def adam_(
    batch: AdamBatch,
    hyper: AdamHyper,
    stats: np.ndarray | None,
    memory: Memory | None = None,
) -> None:
    """:func:`optiscope.rules.adam_step` on every row of ``batch``, in place;
    ``batch.corrections[i]`` are row ``i``'s bias corrections. ``memory``: the
    gate's reading of the batch, if the caller has it."""
    columns = list(batch[:4]) + ([batch.max_exp_avg_sqs] if hyper.amsgrad else [])
    decoupled = hyper.decoupled_weight_decay
    for group in _groups(columns, memory):
        p_dtype, g_dtype, s_dtype = group.dtypes[:3]
        compute = _compute(p_dtype, s_dtype)
        rule = AdamRule(
            *map(compute, (1.0 - hyper.beta1, hyper.beta2, 1.0 - hyper.beta2)),
            compute(hyper.eps),
            compute(0.0 if decoupled else hyper.weight_decay),
            compute(1.0 - hyper.lr * hyper.weight_decay if decoupled else 1.0),
            compute(-1.0 if hyper.maximize else 1.0),
        )
        chunks = chunk_table(group.sizes)
        c1, c2 = _corrections(batch.corrections, group.rows)
        probe = None
        if stats is not None:
            probe = _adam_probe(hyper, chunks, c2, stats.shape[1])
        if hyper.amsgrad:  # else compiled without the running max
            vmax, vmax_like = group.addresses[4], _like(s_dtype)
        else:
            vmax, vmax_like = np.zeros(len(group.rows), np.int64), None
        run(
            adam_kernel,
            chunks,
            *group.addresses[:4],
            vmax,
            _like(p_dtype),
            _like(g_dtype),
            _like(s_dtype),
            vmax_like,
            # In float64 from the caller's corrections, then rounded once.
            (hyper.lr / c1).astype(compute),
            np.sqrt(c2).astype(compute),
            rule,
            probe,
            _rounding(batch, group.rows),
        )
        if probe is not None:
            rows = np.array(group.rows, np.int64)
            fold_partials(stats, rows, probe.partials, chunks.tensor, True)


def _rounding(batch: AdamBatch, rows: list[int]) -> Rounding | None:
    """Stochastic rounding's seed and the rows' Philox offsets, or None."""
    if batch.rounding is None:
        return None
    offsets = np.array([batch.rounding.offsets[i] for i in rows], np.uint64)
    return Rounding(batch.rounding.seed, offsets)


def _corrections(
    corrections: Sequence[tuple[float, float]], rows: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """``c1`` and ``c2`` of ``rows``; one pair broadcast when all rows share it."""
    first = corrections[0]
    if corrections.count(first) == len(corrections):  # one step count for all
        c1 = np.full(len(rows), first[0])
        c2 = np.full(len(rows), first[1])
        return c1, c2
    pairs = np.array([corrections[i] for i in rows], np.float64).reshape(-1, 2)
    return pairs[:, 0].copy(), pairs[:, 1].copy()


def advance_steps(addresses: np.ndarray) -> np.ndarray:
    """Add one to the float32 step counters at ``addresses`` (checked by the
    caller: one-element float32 CPU tensors); return their new values."""
    counts = np.empty(addresses.size)
    advance_counts(addresses, _like(torch.float32), counts)
    return counts


def _adam_probe(
    hyper: AdamHyper, chunks: Chunks, c2: np.ndarray, columns: int
) -> AdamProbe:
    """The arrays an Adam probe reads: one table of step bins per distinct ``c2``."""
    if (c2 == c2[0]).all():  # the usual case: one step count for all
        unique, inverse = c2[:1], np.zeros(c2.size, np.int64)
    else:
        unique, inverse = np.unique(c2, return_inverse=True)
    below = step_thresholds(hyper.lr, hyper.eps, unique)
    bins, cuts = step_bins(below)
    strides = [layout.hist_stride(n) for n in chunks.sizes.tolist()]
    return AdamProbe(
        partials=np.empty((chunks.tensor.size, columns)),
        lr=float(hyper.lr),
        eps=float(hyper.eps),
        c2=c2,
        eps_below=below[inverse, 0],
        bins=bins,
        cuts=cuts,
        tables=inverse.astype(np.int64),
        strides=np.array(strides, np.int64),
    )
