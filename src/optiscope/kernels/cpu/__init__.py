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

import numpy as np
import torch

from ... import rules
from .. import rows as layout
from ..records import AdamBatch, AdamHyper, MomentumBatch, MomentumHyper
from .adam import AdamRule, adam_kernel
from .dropout import count_kept, dropout_forward
from .momentum import MomentumRule, momentum_kernel
from .probe_sums import AdamProbe, MomentumProbe
from .tables import fold_partials, step_bins, step_thresholds
from .threads import Chunks, chunk_table, run

__all__ = ["adam_", "count_kept", "dropout_forward", "momentum_"]

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


def _groups(*columns: Sequence[torch.Tensor]) -> dict[tuple, list[int]]:
    """Row indices grouped by the dtypes of their row."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i in range(len(columns[0])):
        groups[tuple(c[i].dtype for c in columns)].append(i)
    return groups


def _addresses(column: Sequence[torch.Tensor], idx: list[int]) -> np.ndarray:
    return np.fromiter((column[i].data_ptr() for i in idx), np.int64, len(idx))


def momentum_(
    batch: MomentumBatch, hyper: MomentumHyper, stats: np.ndarray | None
) -> None:
    """:func:`optiscope.rules.momentum_step` on every row of ``batch``, in place."""
    params, grads, buffers = batch
    sign = -1.0 if hyper.maximize else 1.0
    for (p_dtype, g_dtype, b_dtype), idx in _groups(params, grads, buffers).items():
        compute = _compute(p_dtype, b_dtype)
        rule = MomentumRule(
            *map(compute, (hyper.lr, hyper.momentum, 1.0 - hyper.momentum)),
            compute(hyper.weight_decay),
            compute(sign),
        )
        chunks = chunk_table(np.array([params[i].numel() for i in idx], np.int64))
        probe = None
        if stats is not None:
            probe = MomentumProbe(np.empty((chunks.tensor.size, stats.shape[1])))
        run(
            momentum_kernel,
            chunks,
            _addresses(params, idx),
            _addresses(grads, idx),
            _addresses(buffers, idx),
            _like(p_dtype),
            _like(g_dtype),
            _like(b_dtype),
            rule,
            probe,
        )
        if probe is not None:
            rows = np.array(idx, np.int64)
            fold_partials(stats, rows, probe.partials, chunks.tensor, False)


def adam_(batch: AdamBatch, hyper: AdamHyper, stats: np.ndarray | None) -> None:
    """:func:`optiscope.rules.adam_step` on every row of ``batch``, in place;
    ``batch.corrections[i]`` are row ``i``'s bias corrections."""
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, corrections = batch
    decoupled = hyper.decoupled_weight_decay
    for (p_dtype, g_dtype, s_dtype), idx in _groups(params, grads, exp_avgs).items():
        compute = _compute(p_dtype, s_dtype)
        rule = AdamRule(
            *map(compute, (1.0 - hyper.beta1, hyper.beta2, 1.0 - hyper.beta2)),
            compute(hyper.eps),
            compute(0.0 if decoupled else hyper.weight_decay),
            compute(1.0 - hyper.lr * hyper.weight_decay if decoupled else 1.0),
            compute(-1.0 if hyper.maximize else 1.0),
        )
        chunks = chunk_table(np.array([params[i].numel() for i in idx], np.int64))
        c1 = np.array([corrections[i].c1 for i in idx], np.float64)
        c2 = np.array([corrections[i].c2 for i in idx], np.float64)
        probe = None
        if stats is not None:
            probe = _adam_probe(hyper, chunks, c2, stats.shape[1])
        if hyper.amsgrad:  # else compiled without the running max
            vmax, vmax_like = _addresses(max_exp_avg_sqs, idx), _like(s_dtype)
        else:
            vmax, vmax_like = np.zeros(len(idx), np.int64), None
        run(
            adam_kernel,
            chunks,
            _addresses(params, idx),
            _addresses(grads, idx),
            _addresses(exp_avgs, idx),
            _addresses(exp_avg_sqs, idx),
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
        )
        if probe is not None:
            rows = np.array(idx, np.int64)
            fold_partials(stats, rows, probe.partials, chunks.tensor, True)


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
