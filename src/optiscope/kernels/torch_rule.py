"""The per-tensor backend: :mod:`optiscope.rules` one tensor at a time.

It takes what no fused kernel takes (a device with none, a tensor subclass the
dispatcher routed here) and, with a probe, computes the same rows the kernels
sum in their pass, from copies taken before the step, in extra passes. It is
also the oracle the kernels' probe rows are tested against.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .. import rules
from . import philox, rows
from .records import AdamBatch, AdamHyper, MomentumBatch, MomentumHyper


def momentum_(
    batch: MomentumBatch, hyper: MomentumHyper, stats: np.ndarray | None
) -> None:
    for i, (p, g, m) in enumerate(zip(*batch, strict=True)):
        before = p.detach().clone() if stats is not None else None
        m_prev = m.clone() if stats is not None else None
        rules.momentum_step(p, g, m, **hyper._asdict())
        if stats is not None:
            row = momentum_row(
                before,
                p,
                g,
                m_prev,
                m,
                maximize=hyper.maximize,
                weight_decay=hyper.weight_decay,
            )
            combine_row(stats[i], row, rows.MOMENTUM)


def adam_(batch: AdamBatch, hyper: AdamHyper, stats: np.ndarray | None) -> None:
    options = hyper._asdict()
    del options["bias_correction"]
    rounding = batch.rounding
    for i in range(len(batch.params)):
        p, v = batch.params[i], batch.exp_avg_sqs[i]
        noise = None
        if rounding is not None:  # the words every backend draws
            words = philox.random_words(p.numel(), rounding.seed, rounding.offsets[i])
            noise = torch.from_numpy(words.astype(np.int64)).to(p.device)
        vmax = batch.max_exp_avg_sqs[i] if hyper.amsgrad else None
        before = p.detach().clone() if stats is not None else None
        rules.adam_update(
            p,
            batch.grads[i],
            batch.exp_avgs[i],
            v,
            vmax,
            correction=batch.corrections[i],
            noise=noise,
            **options,
        )
        if stats is not None:
            row = adam_row(
                before,
                p,
                batch.grads[i],
                v if vmax is None else vmax,
                lr=hyper.lr,
                eps=hyper.eps,
                correction2=batch.corrections[i].c2,
            )
            combine_row(stats[i], row, rows.ADAM)


def combine_row(target: np.ndarray, values: np.ndarray, layout: tuple) -> None:
    """``target += values``, except that Adam's ``step_min``/``step_max`` take the
    minimum and maximum (NaN winning), as the kernels fold their chunks."""
    if "step_min" in layout:
        low, high = layout.index("step_min"), layout.index("step_max")
        pair = target[[low, high]].copy()
        target += values
        with np.errstate(invalid="ignore"):
            target[low] = (
                np.nan
                if np.isnan([pair[0], values[low]]).any()
                else min(pair[0], values[low])
            )
            target[high] = (
                np.nan
                if np.isnan([pair[1], values[high]]).any()
                else max(pair[1], values[high])
            )
        return
    target += values


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def common_row(
    before: torch.Tensor, after: torch.Tensor, grad: torch.Tensor
) -> list[float]:
    """The columns of :data:`rows.COMMON`, from the parameter before and after."""
    g, update = _f64(grad), _f64(after) - _f64(before)
    return [
        float(g.numel()),
        float((g * g).sum()),
        float((update * update).sum()),
        float((_f64(after) ** 2).sum()),
        float((~torch.isfinite(g)).sum()),
    ]


def momentum_row(
    before: torch.Tensor,
    after: torch.Tensor,
    grad: torch.Tensor,
    m_prev: torch.Tensor,
    m_new: torch.Tensor,
    *,
    maximize: bool,
    weight_decay: float,
) -> np.ndarray:
    """The momentum row from snapshots; ``g`` is the gradient the EMA averaged
    (with no decay term at all when ``weight_decay`` is 0, as in the step: an
    infinite θ must not make it 0·inf = NaN)."""
    g = _f64(grad) * (-1.0 if maximize else 1.0)
    if weight_decay != 0.0:
        g = g + weight_decay * _f64(before)
    return np.array(
        [
            *common_row(before, after, grad),
            float((g * _f64(m_prev)).sum()),
            float((_f64(m_new) ** 2).sum()),
        ]
    )


def adam_row(
    before: torch.Tensor,
    after: torch.Tensor,
    grad: torch.Tensor,
    v_used: torch.Tensor,
    *,
    lr: float,
    eps: float,
    correction2: float,
) -> np.ndarray:
    """The Adam row from snapshots; ``v_used`` is v (or its running max) after the
    step. The histogram bins every ``rows.hist_stride(numel)``-th step only."""
    v_hat = _f64(v_used) / correction2
    step = rules.effective_step(lr, v_hat, eps).reshape(-1)
    sample = step[:: rows.hist_stride(step.numel())]
    counts = torch.bincount(octave_bins(sample), minlength=rows.HIST_BINS).double()
    return np.array(
        [
            *common_row(before, after, grad),
            float((torch.sqrt(v_hat) < eps).sum()),
            float(step.min()) if step.numel() else math.inf,
            float(step.max()) if step.numel() else -math.inf,
            *counts.tolist(),
        ]
    )


def octave_bins(values: torch.Tensor) -> torch.Tensor:
    """:func:`rows.octave_bin` for a whole tensor, through ``torch.frexp``."""
    exponent = torch.frexp(values).exponent.long()
    bins = (exponent - rows.HIST_MIN_EXP).clamp(0, rows.HIST_BINS - 1)
    bins = torch.where(values > 0, bins, 0)
    return torch.where(torch.isinf(values), rows.HIST_BINS - 1, bins)


def dropout_forward(
    x: torch.Tensor,
    p: float,
    seed: int,
    offset: int,
    out: torch.Tensor | None = None,
    *,
    box: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
) -> torch.Tensor:
    """The mask from :mod:`.philox` on the host, applied with torch ops; ``x``
    contiguous, written into ``out`` (``x`` itself, or None for a new tensor).
    With ``box = (global_shape, start)`` element ``i`` takes the bit of its
    row-major index in the tensor of ``global_shape`` ``x`` is the block of."""
    if box is None:
        keep = philox.keep_mask(x.numel(), p, seed, offset)
    else:
        index = box_indices(tuple(x.shape), *box)
        keep = words_at(index, seed, offset) >= np.uint32(philox.threshold(p))
    keep = torch.from_numpy(keep).to(x.device).view(x.shape)
    y = torch.where(keep, x * (1.0 / (1.0 - p)), 0.0)
    return y if out is None else out.copy_(y)


def box_indices(
    shape: tuple[int, ...], global_shape: tuple[int, ...], start: tuple[int, ...]
) -> np.ndarray:
    """The row-major index in a tensor of ``global_shape`` of each element (in
    row-major order) of its block of ``shape`` at ``start``: a uint64 vector."""
    index = np.zeros((), np.uint64)
    stride = 1
    strides = []
    for size in reversed(global_shape):
        strides.append(stride)
        stride *= size
    for size, first, step in zip(shape, start, reversed(strides), strict=True):
        along = (first + np.arange(size, dtype=np.uint64)) * np.uint64(step)
        index = np.add.outer(index, along)
    return index.reshape(-1)


def words_at(index: np.ndarray, seed: int, offset: int) -> np.ndarray:
    """``philox.random_words(...)[index]`` without the words in between: the
    word ``index & 3`` of Philox block ``index >> 2`` for each index."""
    blocks = index >> np.uint64(2)
    counter = np.empty((index.size, 4), dtype=np.uint32)
    counter[:, 0] = blocks & np.uint64(0xFFFFFFFF)
    counter[:, 1] = blocks >> np.uint64(32)
    counter[:, 2] = offset & 0xFFFFFFFF
    counter[:, 3] = offset >> 32
    words = philox.philox4x32(counter, (seed & 0xFFFFFFFF, seed >> 32))
    return words[np.arange(index.size), (index & np.uint64(3)).astype(np.intp)]
