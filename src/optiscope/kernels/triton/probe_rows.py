r"""Probe rows: from each program of an optimizer kernel to each tensor, to the
caller's ``stats``.

With ``stats``, every program of an optimizer kernel also writes one float64
row in the column order of :mod:`optiscope.kernels.rows` (all of
``rows.MOMENTUM``; ``rows.ADAM`` up to the histogram), from the values the step
loaded and stored, in float64 so no range is lost: :func:`probe_common` writes
the columns both layouts share, each kernel the rest. Adam's
``step_min``/``step_max`` are the step formula applied to the program's
greatest and least ``v`` (two scalars, not a float64 root per element), and
``eps_dominated`` counts the ``v`` below the least ``v`` with
:math:`\sqrt{v/c_2} \ge \epsilon`, found exactly on the host
(:func:`eps_threshold`). A second kernel combines each tensor's program rows in
order (sums added, extrema taking the minimum and maximum, NaN winning), so the
sums do not depend on scheduling (:func:`fold_programs`). Adam's histogram bins
the fixed sample of :func:`optiscope.kernels.rows.hist_stride` (about 4096
elements of a large tensor) in a small kernel per tensor, counted by one
``bincount`` per call (:func:`step_histograms`). The rows reach the host in one
copy per call and are folded into ``stats`` (:func:`fold_into`). On GPUs with
slow float64 the probe costs more than it would in float32. Not yet run on a
GPU: tested through Triton's interpreter.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import triton
import triton.language as tl

from .. import rows
from ..records import AdamHyper
from . import common
from .common import f64, from_bits, to_bits

# The probe rows' columns, named from rows.py (both layouts start with COMMON).
# Momentum's kernel fills its whole row; Adam's fills rows.ADAM up to the
# histogram, whose counts step_histograms appends.
MOMENTUM_COLUMNS = rows.MOMENTUM
ADAM_COLUMNS = rows.ADAM[: rows.HIST_START]
_NUMEL = tl.constexpr(rows.COMMON.index("numel"))
_GRAD_SQ = tl.constexpr(rows.COMMON.index("sum_grad_sq"))
_UPDATE_SQ = tl.constexpr(rows.COMMON.index("sum_update_sq"))
_PARAM_SQ = tl.constexpr(rows.COMMON.index("sum_param_sq"))
_NONFINITE = tl.constexpr(rows.COMMON.index("nonfinite_grads"))
_HIST_MIN_EXP = tl.constexpr(rows.HIST_MIN_EXP)
_HIST_BINS = tl.constexpr(rows.HIST_BINS)


# --- in the optimizer kernels: one row per program -------------------------------


@triton.jit
def probe_common(rows_ptr, row0, raw, before, after, mask, WIDTH: tl.constexpr):
    """This program's columns of ``rows.COMMON`` (row ``row0 + program``), in
    float64: ``raw`` the gradient as loaded, ``before`` and ``after`` θ as stored
    before and after the step. Returns the row's address."""
    row = rows_ptr + (row0 + tl.program_id(0).to(tl.int64)) * WIDTH
    g = raw.to(tl.float64)
    theta = after.to(tl.float64)
    delta = theta - before.to(tl.float64)
    tl.store(row + _NUMEL, tl.sum(mask.to(tl.float64), axis=0))
    tl.store(row + _GRAD_SQ, tl.sum(tl.where(mask, g * g, 0.0), axis=0))
    tl.store(row + _UPDATE_SQ, tl.sum(tl.where(mask, delta * delta, 0.0), axis=0))
    tl.store(row + _PARAM_SQ, tl.sum(tl.where(mask, theta * theta, 0.0), axis=0))
    finite = tl.abs(g) < float("inf")
    tl.store(row + _NONFINITE, tl.sum((mask & ~finite).to(tl.float64), axis=0))
    return row


def program_rows(
    params: list[torch.Tensor], columns: tuple[str, ...], probe: bool
) -> tuple[list[int], torch.Tensor | None]:
    """Each tensor's first program row, and the uninitialised rows of every
    program of the call (every program writes its whole row)."""
    first = [0]
    for param in params:
        first.append(first[-1] + triton.cdiv(param.numel(), common.OPTIMIZER_BLOCK))
    if not probe:
        return first, None
    shape = (first[-1], len(columns))
    return first, torch.empty(shape, dtype=torch.float64, device=params[0].device)


@functools.lru_cache(maxsize=1024)
def eps_threshold(eps: float, c2: float) -> float:
    """The least float64 ``v >= 0`` with ``sqrt(v / c2) >= eps`` in float64 (the
    oracle's ``√v̂ < ε`` is ``v`` below it): a bisection over the bits of the
    doubles in ``[0, inf]``, which order like the doubles, and the predicate
    is monotone in ``v`` (a rounded division and root are)."""

    def holds(bits: int) -> bool:
        return math.sqrt(from_bits(bits) / c2) >= eps

    low, high = 0, to_bits(math.inf)
    if holds(low):
        return 0.0
    if not holds(high):
        return math.inf
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if holds(mid) else (mid, high)
    return from_bits(high)


# --- Adam's step histogram -----------------------------------------------------


@triton.jit(do_not_specialize=["samples", "stride", "out0", "bin0", "lr", "eps", "c2"])
def _step_bins_kernel(
    v_ptr,
    bins_ptr,  # int64: bin0 + the bin of each sample, from out0 on
    samples,  # ceil(numel / stride)
    stride,
    out0,
    bin0,
    lr,
    eps,
    c2,
    LANES: tl.constexpr,
):
    """The histogram bin of Adam's step at elements ``0, stride, 2·stride, ...``
    of ``v``, by :func:`optiscope.kernels.rows.octave_bin`'s rule."""
    j = tl.program_id(0).to(tl.int64) * LANES + tl.arange(0, LANES)
    mask = j < samples
    v = tl.load(v_ptr + j * stride, mask=mask, other=0.0).to(tl.float64)
    root = tl.sqrt(v / f64(c2, tl.float64))
    step = f64(lr, tl.float64) / (root + f64(eps, tl.float64))
    # step = f·2^e with 0.5 <= f < 1 has the biased exponent e + 1022, so the
    # octave is read off the bits (subnormals fall in bin 0, inf in the last).
    biased = (step.to(tl.int64, bitcast=True) >> 52) & 0x7FF
    k = tl.minimum(tl.maximum(biased - 1022 - _HIST_MIN_EXP, 0), _HIST_BINS - 1)
    k = tl.where(step > 0.0, k, 0)  # 0, negative and NaN steps: bin 0
    tl.store(bins_ptr + out0 + j, bin0 + k, mask=mask)


def step_histograms(
    used: list[torch.Tensor], corrections: list, hyper: AdamHyper
) -> torch.Tensor:
    """Each tensor's histogram of the step on its sample of ``used`` (v or its
    running max), as one (tensors, HIST_BINS) count tensor."""
    samples = [-(-v.numel() // rows.hist_stride(v.numel())) for v in used]
    bins = torch.empty(sum(samples), dtype=torch.int64, device=used[0].device)
    out0 = 0
    for i, (v, count) in enumerate(zip(used, samples, strict=True)):
        _step_bins_kernel[(triton.cdiv(count, common.HIST_LANES),)](
            v,
            bins,
            count,
            rows.hist_stride(v.numel()),
            out0,
            i * rows.HIST_BINS,
            to_bits(hyper.lr),
            to_bits(hyper.eps),
            to_bits(corrections[i].c2),
            LANES=common.HIST_LANES,
        )
        out0 += count
    counts = torch.bincount(bins, minlength=len(used) * rows.HIST_BINS)
    return counts.view(len(used), rows.HIST_BINS)


# --- from programs to tensors to the caller's table ------------------------------


@triton.jit
def _fold_kernel(
    parts_ptr,
    first_ptr,  # int64 (tensors + 1): tensor t owns rows first[t] to first[t + 1]
    out_ptr,
    WIDTH: tl.constexpr,
    LOW: tl.constexpr,  # the column that takes the minimum, or -1
    HIGH: tl.constexpr,  # the column that takes the maximum, or -1
    ROWS: tl.constexpr,
    COLUMNS: tl.constexpr,  # WIDTH rounded up to a power of two
):
    """Tensor ``t``'s program rows combined into one, in row order: columns
    added, except ``LOW`` and ``HIGH``, which take the minimum and maximum (NaN
    winning)."""
    t = tl.program_id(0)
    start = tl.load(first_ptr + t)
    stop = tl.load(first_ptr + t + 1)
    r = tl.arange(0, ROWS)[:, None]
    c = tl.arange(0, COLUMNS)[None, :]
    total = tl.zeros([COLUMNS], dtype=tl.float64)
    least = tl.full([COLUMNS], float("inf"), dtype=tl.float64)
    greatest = tl.full([COLUMNS], -float("inf"), dtype=tl.float64)
    nan = tl.zeros([COLUMNS], dtype=tl.int32)
    for base in range(start, stop, ROWS):
        valid = (base + r < stop) & (c < WIDTH)
        x = tl.load(parts_ptr + (base + r) * WIDTH + c, mask=valid, other=0.0)
        total += tl.sum(x, axis=0)
        number = valid & (x == x)
        least = tl.minimum(least, tl.min(tl.where(number, x, float("inf")), axis=0))
        greatest = tl.maximum(
            greatest, tl.max(tl.where(number, x, -float("inf")), axis=0)
        )
        nan = tl.maximum(nan, tl.max((x != x).to(tl.int32), axis=0))
    column = tl.arange(0, COLUMNS)
    out = tl.where(column == LOW, least, tl.where(column == HIGH, greatest, total))
    extremum = (column == LOW) | (column == HIGH)
    out = tl.where(extremum & (nan > 0), float("nan"), out)
    tl.store(out_ptr + t * WIDTH + column, out, mask=column < WIDTH)


def fold_programs(
    parts: torch.Tensor, first: list[int], columns: tuple[str, ...]
) -> torch.Tensor:
    """One row per tensor, on the device, from its programs' rows."""
    tensors = len(first) - 1
    out = torch.empty((tensors, len(columns)), dtype=torch.float64, device=parts.device)
    extrema = "step_min" in columns
    _fold_kernel[(tensors,)](
        parts,
        torch.tensor(first, dtype=torch.int64).to(parts.device),
        out,
        WIDTH=len(columns),
        LOW=columns.index("step_min") if extrema else -1,
        HIGH=columns.index("step_max") if extrema else -1,
        ROWS=common.FOLD_ROWS,
        COLUMNS=triton.next_power_of_2(len(columns)),
    )
    return out


def fold_into(
    stats: np.ndarray, idx: list[int], found: np.ndarray, layout: tuple[str, ...]
) -> None:
    """Add ``found[j]`` to ``stats[idx[j]]``; Adam's ``step_min``/``step_max``
    take the minimum and maximum instead, NaN winning (as np.minimum does)."""
    target = stats[idx]
    summed = np.ones(len(layout), dtype=bool)
    if "step_min" in layout:
        low, high = layout.index("step_min"), layout.index("step_max")
        summed[[low, high]] = False
        target[:, low] = np.minimum(target[:, low], found[:, low])
        target[:, high] = np.maximum(target[:, high], found[:, high])
    target[:, summed] += found[:, summed]
    stats[idx] = target
