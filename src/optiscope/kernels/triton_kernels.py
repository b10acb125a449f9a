r"""Triton kernels for CUDA tensors: Momentum, Adam and dropout in one pass over memory.

The dispatcher (:mod:`optiscope.kernels.dispatch`) imports this module lazily,
for CUDA tensors, and calls the four functions below with the records of
:mod:`.records`. It has checked every tensor first (:mod:`.gate`) and made each
row contiguous, so nothing is checked again here. Each kernel reads every
element once and writes it once, with the arithmetic of
:func:`optiscope.rules.momentum_step` and :func:`optiscope.rules.adam_step`:

* bfloat16 and float16 tensors are computed in float32 and rounded once on
  store; the compute dtype is float64 if the parameter or a state of its row is
  float64, else float32 (:func:`optiscope.rules.compute_dtype`);
* Momentum averages with a multiply and an add, :math:`\beta m + (1-\beta) g`,
  so an infinite gradient gives an infinite :math:`m` (a lerp gives NaN);
  Adam's :math:`m` is torch's lerp, and :math:`v` adds
  :math:`((1-\beta_2) g)\,g`, so a finite float32 :math:`|g| \ge 1.85\cdot10^{19}`
  does not overflow :math:`g^2`;
* float32 square roots and divisions are the IEEE-rounded ones
  (``sqrt_rn``, ``div_rn``), and every multiply and add rounds on its own
  (``enable_fp_fusion=False``);
* host scalars travel as float64 and are rounded to the compute dtype inside
  the kernel, which is what torch does to a Python scalar; Adam's per-tensor
  :math:`\alpha/c_1` and :math:`\sqrt{c_2}` are computed on the host in float64
  from the batch's bias corrections.

Probes: with ``stats``, every program of an optimizer kernel also writes one
float64 row in the column order of :mod:`.rows` (all of ``rows.MOMENTUM``;
``rows.ADAM`` up to the histogram), from the values the step loaded and stored,
in float64 so no range is lost. Adam's ``step_min``/``step_max`` are the step
formula applied to the program's greatest and least ``v`` (two scalars, not a
float64 root per element), and ``eps_dominated`` counts the ``v`` below the least
``v`` with :math:`\sqrt{v/c_2} \ge \epsilon`, found exactly on the host. A
second kernel combines each tensor's program rows in order (sums added,
extrema taking the minimum and maximum, NaN winning), so the sums do not depend
on scheduling. Adam's histogram bins the fixed sample of
:func:`.rows.hist_stride` (about 4096 elements of a large tensor) in a small
kernel per tensor, counted by one ``bincount`` per call. The rows reach the host
in one copy per call and are folded into ``stats``. On GPUs with slow float64
the probe costs more than it would in float32. Not yet run on a GPU: tested
through Triton's interpreter.

Dropout draws its mask from Philox4x32-10 exactly as specified in
:mod:`optiscope.kernels.philox`, so a ``(seed, offset)`` gives the same mask
here as the NumPy reference, bit for bit, and backward regenerates the mask
instead of saving it.

Indices are int64 throughout, so tensors of more than :math:`2^{31}` elements
are addressed correctly. Launches: one per tensor (two with an Adam probe), and
with a probe a few more per call (the fold, the count, the copy). Rows on
several GPUs are run device by device.
"""

from __future__ import annotations

import contextlib
import functools
import math
import struct
from collections.abc import Iterator

import numpy as np
import torch
import triton
import triton.language as tl

from .. import rules
from . import rows
from .philox import PHILOX_M0, PHILOX_M1, PHILOX_W0, PHILOX_W1, ROUNDS, threshold
from .records import AdamBatch, AdamHyper, MomentumBatch, MomentumHyper

__all__ = ["adam_", "dropout_backward", "dropout_forward", "momentum_"]

# Elements per program for the optimizer kernels, counters per program for
# dropout (4 elements each). Module attributes so a benchmark can try others.
OPTIMIZER_BLOCK = 2048
OPTIMIZER_WARPS = 8
DROPOUT_COUNTERS = 512
DROPOUT_WARPS = 8
HIST_LANES = 1024  # histogram samples per program
FOLD_ROWS = 64  # program rows a fold step adds at once

# The probe rows' columns, named from rows.py (both layouts start with COMMON).
# Momentum's kernel fills its whole row; Adam's fills rows.ADAM up to the
# histogram, whose counts _step_histograms appends.
MOMENTUM_COLUMNS = rows.MOMENTUM
ADAM_COLUMNS = rows.ADAM[: rows.HIST_START]
_NUMEL = tl.constexpr(rows.COMMON.index("numel"))
_GRAD_SQ = tl.constexpr(rows.COMMON.index("sum_grad_sq"))
_UPDATE_SQ = tl.constexpr(rows.COMMON.index("sum_update_sq"))
_PARAM_SQ = tl.constexpr(rows.COMMON.index("sum_param_sq"))
_NONFINITE = tl.constexpr(rows.COMMON.index("nonfinite_grads"))
_GRAD_DOT_PREV_M = tl.constexpr(rows.MOMENTUM.index("sum_grad_dot_prev_m"))
_M_SQ = tl.constexpr(rows.MOMENTUM.index("sum_m_sq"))
_EPS_DOMINATED = tl.constexpr(rows.ADAM.index("eps_dominated"))
_STEP_MIN = tl.constexpr(rows.ADAM.index("step_min"))
_STEP_MAX = tl.constexpr(rows.ADAM.index("step_max"))
_MOMENTUM_WIDTH = tl.constexpr(len(MOMENTUM_COLUMNS))
_ADAM_WIDTH = tl.constexpr(len(ADAM_COLUMNS))
_HIST_MIN_EXP = tl.constexpr(rows.HIST_MIN_EXP)
_HIST_BINS = tl.constexpr(rows.HIST_BINS)

_NO_DECAY, _L2_DECAY, _DECOUPLED_DECAY = 0, 1, 2

# The Philox constants, as compile-time constants the kernels can read.
_M0 = tl.constexpr(PHILOX_M0)
_M1 = tl.constexpr(PHILOX_M1)
_W0 = tl.constexpr(PHILOX_W0)
_W1 = tl.constexpr(PHILOX_W1)
_ROUNDS = tl.constexpr(ROUNDS)


# --- shared device helpers ---------------------------------------------------


@triton.jit
def _f64(bits, dtype: tl.constexpr):
    # A host float travels as the int64 bits of its float64 (see _bits), so it
    # arrives exact under the compiler and the interpreter alike; rounding it
    # to the compute dtype here is what torch does to a Python scalar.
    return tl.cast(bits, tl.int64).to(tl.float64, bitcast=True).to(dtype)


@triton.jit
def _round_to(x, dtype: tl.constexpr):
    """``x`` rounded once to ``dtype``, to nearest even."""
    if dtype == tl.bfloat16:
        # On the bits, because the interpreter truncates to bfloat16; the same
        # integer ops give the GPU's cvt.rn result, so both are checked alike.
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, (bits >> 16) | 0x40, rounded)  # NaN stays NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _sqrt(x, FP64: tl.constexpr):
    # float64 sqrt is always IEEE-rounded; for float32 ask for it explicitly.
    if FP64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _div(x, y, FP64: tl.constexpr):
    if FP64:
        return x / y
    else:
        return tl.div_rn(x, y)


@triton.jit
def _lerp(start, end, weight):
    # torch's lerp, so Adam's m rounds as in torch.optim.Adam and rules.adam_step.
    return tl.where(
        weight < 0.5,
        start + weight * (end - start),
        end - (end - start) * (1.0 - weight),
    )


@triton.jit
def _probe_common(rows_ptr, row0, raw, before, after, mask, WIDTH: tl.constexpr):
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


# --- Momentum ----------------------------------------------------------------


@triton.jit(
    do_not_specialize=["row0", "neg_lr", "beta", "one_minus_beta", "weight_decay"]
)
def _momentum_kernel(
    param_ptr,
    grad_ptr,
    buf_ptr,
    rows_ptr,  # PROBE: (programs of the call, _MOMENTUM_WIDTH) float64
    row0,  # PROBE: this tensor's first row
    numel,
    neg_lr,
    beta,
    one_minus_beta,
    weight_decay,
    HAS_DECAY: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    FP64: tl.constexpr,
    PROBE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    compute = tl.float64 if FP64 else tl.float32
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    theta0 = tl.load(param_ptr + offs, mask=mask, other=0.0).to(compute)
    raw = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(compute)
    m_prev = tl.load(buf_ptr + offs, mask=mask, other=0.0).to(compute)
    g = raw
    if MAXIMIZE:
        g = -g
    if HAS_DECAY:
        g = g + _f64(weight_decay, compute) * theta0
    # A multiply and an add, not a lerp: g = ±inf must give m = ±inf, not NaN.
    m = m_prev * _f64(beta, compute) + _f64(one_minus_beta, compute) * g
    theta = theta0 + _f64(neg_lr, compute) * m
    m_stored = _round_to(m, buf_ptr.dtype.element_ty)
    theta_stored = _round_to(theta, param_ptr.dtype.element_ty)
    tl.store(buf_ptr + offs, m_stored, mask=mask)
    tl.store(param_ptr + offs, theta_stored, mask=mask)
    if PROBE:
        row = _probe_common(
            rows_ptr, row0, raw, theta0, theta_stored, mask, _MOMENTUM_WIDTH
        )
        dot = tl.where(mask, g.to(tl.float64) * m_prev.to(tl.float64), 0.0)
        kept = m_stored.to(tl.float64)
        tl.store(row + _GRAD_DOT_PREV_M, tl.sum(dot, axis=0))
        tl.store(row + _M_SQ, tl.sum(tl.where(mask, kept * kept, 0.0), axis=0))


def momentum_(
    batch: MomentumBatch, hyper: MomentumHyper, stats: np.ndarray | None
) -> None:
    r""":func:`optiscope.rules.momentum_step` on every row of ``batch``, in place.

    .. math::
        g \leftarrow \pm g + \lambda\theta, \quad
        m \leftarrow \beta m + (1-\beta) g, \quad
        \theta \leftarrow \theta - \alpha m

    ``stats``: None, or float64 rows of ``rows.MOMENTUM``, one per tensor, that
    get the tensor's sums added.
    """
    for device, idx in _by_device(batch.params):
        picked = MomentumBatch(*([column[i] for i in idx] for column in batch))
        with _on(device):
            found = _momentum_rows(picked, hyper, stats is not None)
        if found is not None:
            _fold_into(stats, idx, found, MOMENTUM_COLUMNS)


def _momentum_rows(
    batch: MomentumBatch, hyper: MomentumHyper, probe: bool
) -> np.ndarray | None:
    first, parts = _program_rows(batch.params, MOMENTUM_COLUMNS, probe)
    for i, (param, grad, buf) in enumerate(zip(*batch, strict=True)):
        grid = (triton.cdiv(param.numel(), OPTIMIZER_BLOCK),)
        _momentum_kernel[grid](
            param,
            grad,
            buf,
            param if parts is None else parts,
            first[i],
            param.numel(),
            _bits(-hyper.lr),
            _bits(hyper.momentum),
            _bits(1.0 - hyper.momentum),
            _bits(hyper.weight_decay),
            HAS_DECAY=hyper.weight_decay != 0.0,
            MAXIMIZE=hyper.maximize,
            FP64=_computes_in_fp64(param, buf),
            PROBE=probe,
            BLOCK=OPTIMIZER_BLOCK,
            num_warps=OPTIMIZER_WARPS,
            enable_fp_fusion=False,
        )
    if parts is None:
        return None
    return _fold_programs(parts, first, MOMENTUM_COLUMNS).cpu().numpy()


# --- Adam --------------------------------------------------------------------


@triton.jit(
    do_not_specialize=[
        "row0",
        "neg_step_size",
        "sqrt_c2",
        "eps",
        "ema_weight1",
        "beta2",
        "one_minus_beta2",
        "decay",
        "lr",
        "c2",
        "eps_below",
    ]
)
def _adam_kernel(
    param_ptr,
    grad_ptr,
    exp_avg_ptr,
    exp_avg_sq_ptr,
    max_exp_avg_sq_ptr,  # any tensor when not AMSGRAD; never touched then
    rows_ptr,  # PROBE: (programs of the call, _ADAM_WIDTH) float64
    row0,  # PROBE: this tensor's first row
    numel,
    neg_step_size,  # -lr / c1
    sqrt_c2,
    eps,
    ema_weight1,  # 1 - beta1
    beta2,
    one_minus_beta2,
    decay,  # lambda for L2, 1 - lr * lambda when decoupled
    lr,  # PROBE, with c2: the step formula, in float64
    c2,
    eps_below,  # PROBE: the least float64 v with sqrt(v / c2) >= eps
    DECAY: tl.constexpr,  # _NO_DECAY, _L2_DECAY or _DECOUPLED_DECAY
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    FP64: tl.constexpr,
    PROBE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    compute = tl.float64 if FP64 else tl.float32
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    theta = tl.load(param_ptr + offs, mask=mask, other=0.0).to(compute)
    theta0 = theta
    raw = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(compute)
    g = raw
    m = tl.load(exp_avg_ptr + offs, mask=mask, other=0.0).to(compute)
    v = tl.load(exp_avg_sq_ptr + offs, mask=mask, other=0.0).to(compute)
    if MAXIMIZE:
        g = -g
    if DECAY == 1:
        g = g + _f64(decay, compute) * theta
    elif DECAY == 2:
        theta = theta * _f64(decay, compute)
    m = _lerp(m, g, _f64(ema_weight1, compute))
    # (1 - beta2) * g first: g * g overflows float32 for |g| >= 1.85e19.
    v = v * _f64(beta2, compute) + (_f64(one_minus_beta2, compute) * g) * g
    tl.store(exp_avg_ptr + offs, _round_to(m, exp_avg_ptr.dtype.element_ty), mask=mask)
    v_stored = _round_to(v, exp_avg_sq_ptr.dtype.element_ty)
    tl.store(exp_avg_sq_ptr + offs, v_stored, mask=mask)
    if AMSGRAD:
        v_max = tl.load(max_exp_avg_sq_ptr + offs, mask=mask, other=0.0).to(compute)
        v = tl.maximum(v_max, v, propagate_nan=tl.PropagateNan.ALL)
        v_stored = _round_to(v, max_exp_avg_sq_ptr.dtype.element_ty)
        tl.store(max_exp_avg_sq_ptr + offs, v_stored, mask=mask)
    denom = _div(_sqrt(v, FP64), _f64(sqrt_c2, compute), FP64) + _f64(eps, compute)
    # A zero denominator (eps = 0, a coordinate that only saw zero gradients)
    # takes no step; the division is made safe first so 0/0 is never evaluated.
    no_signal = denom == 0.0
    update = _div(m, tl.where(no_signal, 1.0, denom), FP64)
    update = tl.where(no_signal, 0.0, update)
    theta = theta + _f64(neg_step_size, compute) * update
    theta_stored = _round_to(theta, param_ptr.dtype.element_ty)
    tl.store(param_ptr + offs, theta_stored, mask=mask)
    if PROBE:
        row = _probe_common(
            rows_ptr, row0, raw, theta0, theta_stored, mask, _ADAM_WIDTH
        )
        # v as stored. The step lr/(sqrt(v/c2)+eps) falls as v grows, so its
        # extrema are the step of v's; a NaN or negative v makes a NaN step.
        kept = v_stored.to(tl.float64)
        valid = mask & (kept >= 0.0)
        dominated = valid & (kept < _f64(eps_below, tl.float64))
        tl.store(row + _EPS_DOMINATED, tl.sum(dominated.to(tl.float64), axis=0))
        least = tl.min(tl.where(valid, kept, float("inf")), axis=0)
        greatest = tl.max(tl.where(valid, kept, 0.0), axis=0)
        invalid = tl.sum((mask & ~valid).to(tl.int32), axis=0) > 0
        lr64, c2_64 = _f64(lr, tl.float64), _f64(c2, tl.float64)
        eps64 = _f64(eps, tl.float64)
        step_min = lr64 / (tl.sqrt(greatest / c2_64) + eps64)
        step_max = lr64 / (tl.sqrt(least / c2_64) + eps64)
        tl.store(row + _STEP_MIN, tl.where(invalid, float("nan"), step_min))
        tl.store(row + _STEP_MAX, tl.where(invalid, float("nan"), step_max))


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
    of ``v``, by :func:`.rows.octave_bin`'s rule."""
    j = tl.program_id(0).to(tl.int64) * LANES + tl.arange(0, LANES)
    mask = j < samples
    v = tl.load(v_ptr + j * stride, mask=mask, other=0.0).to(tl.float64)
    root = tl.sqrt(v / _f64(c2, tl.float64))
    step = _f64(lr, tl.float64) / (root + _f64(eps, tl.float64))
    # step = f·2^e with 0.5 <= f < 1 has the biased exponent e + 1022, so the
    # octave is read off the bits (subnormals fall in bin 0, inf in the last).
    biased = (step.to(tl.int64, bitcast=True) >> 52) & 0x7FF
    k = tl.minimum(tl.maximum(biased - 1022 - _HIST_MIN_EXP, 0), _HIST_BINS - 1)
    k = tl.where(step > 0.0, k, 0)  # 0, negative and NaN steps: bin 0
    tl.store(bins_ptr + out0 + j, bin0 + k, mask=mask)


def adam_(batch: AdamBatch, hyper: AdamHyper, stats: np.ndarray | None) -> None:
    r""":func:`optiscope.rules.adam_step` on every row of ``batch``, in place.

    With ``(c_1, c_2) = `` ``batch.corrections[i]`` for tensor ``i``:

    .. math::
        \theta \leftarrow \theta - \frac{\alpha}{c_1}\,
            \frac{m}{\sqrt{v}/\sqrt{c_2} + \epsilon}

    and a zero denominator gives a zero step.

    ``stats``: None, or float64 rows of ``rows.ADAM``, one per tensor: the
    tensor's sums and histogram counts are added, its ``step_min``/``step_max``
    combined (NaN winning). The step's extrema and ε-dominated count cover
    every element; the histogram the sample of :func:`.rows.hist_stride`, read
    after the step.
    """
    for device, idx in _by_device(batch.params):
        picked = AdamBatch(
            *(None if column is None else [column[i] for i in idx] for column in batch)
        )
        with _on(device):
            found = _adam_rows(picked, hyper, stats is not None)
        if found is not None:
            _fold_into(stats, idx, found, rows.ADAM)


def _adam_rows(batch: AdamBatch, hyper: AdamHyper, probe: bool) -> np.ndarray | None:
    if hyper.weight_decay == 0.0:
        decay_mode, decay = _NO_DECAY, 0.0
    elif hyper.decoupled_weight_decay:
        decay_mode, decay = _DECOUPLED_DECAY, 1.0 - hyper.lr * hyper.weight_decay
    else:
        decay_mode, decay = _L2_DECAY, hyper.weight_decay
    used = batch.max_exp_avg_sqs if hyper.amsgrad else batch.exp_avg_sqs
    first, parts = _program_rows(batch.params, ADAM_COLUMNS, probe)
    for i, param in enumerate(batch.params):
        c1, c2 = batch.corrections[i]
        _adam_kernel[(triton.cdiv(param.numel(), OPTIMIZER_BLOCK),)](
            param,
            batch.grads[i],
            batch.exp_avgs[i],
            batch.exp_avg_sqs[i],
            used[i],
            param if parts is None else parts,
            first[i],
            param.numel(),
            _bits(-(hyper.lr / c1)),
            _bits(math.sqrt(c2)),
            _bits(hyper.eps),
            _bits(1.0 - hyper.beta1),
            _bits(hyper.beta2),
            _bits(1.0 - hyper.beta2),
            _bits(decay),
            _bits(hyper.lr),
            _bits(c2),
            _bits(_eps_threshold(hyper.eps, c2) if probe else 0.0),
            DECAY=decay_mode,
            AMSGRAD=hyper.amsgrad,
            MAXIMIZE=hyper.maximize,
            FP64=_computes_in_fp64(param, batch.exp_avgs[i]),
            PROBE=probe,
            BLOCK=OPTIMIZER_BLOCK,
            num_warps=OPTIMIZER_WARPS,
            enable_fp_fusion=False,
        )
    if parts is None:
        return None
    head = _fold_programs(parts, first, ADAM_COLUMNS)
    counts = _step_histograms(used, batch.corrections, hyper)
    return torch.cat([head, counts.to(torch.float64)], dim=1).cpu().numpy()


def _step_histograms(
    used: list[torch.Tensor], corrections: list, hyper: AdamHyper
) -> torch.Tensor:
    """Each tensor's histogram of the step on its sample of ``used`` (v or its
    running max), as one (tensors, HIST_BINS) count tensor."""
    samples = [-(-v.numel() // rows.hist_stride(v.numel())) for v in used]
    bins = torch.empty(sum(samples), dtype=torch.int64, device=used[0].device)
    out0 = 0
    for i, (v, count) in enumerate(zip(used, samples, strict=True)):
        _step_bins_kernel[(triton.cdiv(count, HIST_LANES),)](
            v,
            bins,
            count,
            rows.hist_stride(v.numel()),
            out0,
            i * rows.HIST_BINS,
            _bits(hyper.lr),
            _bits(hyper.eps),
            _bits(corrections[i].c2),
            LANES=HIST_LANES,
        )
        out0 += count
    counts = torch.bincount(bins, minlength=len(used) * rows.HIST_BINS)
    return counts.view(len(used), rows.HIST_BINS)


@functools.lru_cache(maxsize=1024)
def _eps_threshold(eps: float, c2: float) -> float:
    """The least float64 ``v >= 0`` with ``sqrt(v / c2) >= eps`` in float64 (the
    oracle's ``√v̂ < ε`` is ``v`` below it): a bisection over the bits of the
    doubles in ``[0, inf]``, which order like the doubles, and the predicate
    is monotone in ``v`` (a rounded division and root are)."""

    def holds(bits: int) -> bool:
        return math.sqrt(_float(bits) / c2) >= eps

    low, high = 0, _bits(math.inf)
    if holds(low):
        return 0.0
    if not holds(high):
        return math.inf
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if holds(mid) else (mid, high)
    return _float(high)


# --- probe rows: from programs to tensors to the caller's table ----------------


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


def _program_rows(
    params: list[torch.Tensor], columns: tuple[str, ...], probe: bool
) -> tuple[list[int], torch.Tensor | None]:
    """Each tensor's first program row, and the uninitialised rows of every
    program of the call (every program writes its whole row)."""
    first = [0]
    for param in params:
        first.append(first[-1] + triton.cdiv(param.numel(), OPTIMIZER_BLOCK))
    if not probe:
        return first, None
    shape = (first[-1], len(columns))
    return first, torch.empty(shape, dtype=torch.float64, device=params[0].device)


def _fold_programs(
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
        ROWS=FOLD_ROWS,
        COLUMNS=triton.next_power_of_2(len(columns)),
    )
    return out


def _fold_into(
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


# --- dropout -----------------------------------------------------------------


@triton.jit
def _philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 counter words ``c0..c3`` and key ``(k0, k1)``."""
    for _ in tl.static_range(_ROUNDS):
        hi0 = tl.umulhi(c0, _M0)
        lo0 = c0 * _M0
        hi1 = tl.umulhi(c2, _M1)
        lo1 = c2 * _M1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + _W0
        k1 = k1 + _W1
    return c0, c1, c2, c3


@triton.jit(
    do_not_specialize=[
        "drop_below",
        "seed_lo",
        "seed_hi",
        "offset_lo",
        "offset_hi",
        "gamma",
    ]
)
def _dropout_kernel(
    x_ptr,
    y_ptr,
    numel,
    drop_below,  # threshold(p): a word below it drops its element
    seed_lo,
    seed_hi,
    offset_lo,
    offset_hi,
    gamma,
    FP64: tl.constexpr,
    COUNTERS: tl.constexpr,
):
    compute = tl.float64 if FP64 else tl.float32
    # One Philox call per counter gives the words of 4 consecutive elements.
    counter = tl.program_id(0).to(tl.int64) * COUNTERS + tl.arange(0, COUNTERS)
    zero = tl.full([COUNTERS], 0, tl.uint32)
    r0, r1, r2, r3 = _philox4x32_10(
        (counter & 0xFFFFFFFF).to(tl.uint32),
        (counter >> 32).to(tl.uint32),
        zero + tl.cast(offset_lo, tl.uint32),
        zero + tl.cast(offset_hi, tl.uint32),
        tl.cast(seed_lo, tl.uint32),
        tl.cast(seed_hi, tl.uint32),
    )
    word = tl.arange(0, 4)[None, :]  # (1, 4)
    offs = counter[:, None] * 4 + word  # (COUNTERS, 4), element i = 4c + j
    r = tl.where(
        word == 0,
        r0[:, None],
        tl.where(word == 1, r1[:, None], tl.where(word == 2, r2[:, None], r3[:, None])),
    )
    keep = r >= tl.cast(drop_below, tl.uint32)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    y = tl.where(keep, x.to(compute) * _f64(gamma, compute), 0.0)
    tl.store(y_ptr + offs, _round_to(y, y_ptr.dtype.element_ty), mask=mask)


def dropout_forward(
    x: torch.Tensor,
    p: float,
    seed: int,
    offset: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Inverted dropout :math:`y = \gamma\, d \circ x` with the Philox mask of ``(seed, offset)``.

    ``d_i = 1`` iff ``philox.random_words(n, seed, offset)[i] >= threshold(p)``;
    :math:`\gamma = 1/(1-p)` in float32 (float64 for float64 input), and
    low-precision inputs are scaled in float32 and rounded once. ``0 < p < 1``;
    returns a new contiguous tensor, or writes over ``out`` (``x`` itself, when
    contiguous: each element is loaded before its own slot is stored).
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1) for the dropout kernel, got {p!r}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed!r}")
    if not 0 <= offset < 2**64:
        raise ValueError(f"offset must be in [0, 2**64), got {offset!r}")
    if out is not None and (out is not x or not x.is_contiguous()):
        what = "another tensor" if out is not x else "x, but x is not contiguous"
        raise ValueError(f"out must be None or a contiguous x itself, got {what}")
    x = x.contiguous()  # the mask's element i is the i-th in row-major order
    y = torch.empty_like(x) if out is None else out
    numel = x.numel()
    if numel == 0:
        return y
    grid = (triton.cdiv(numel, 4 * DROPOUT_COUNTERS),)
    _dropout_kernel[grid](
        x,
        y,
        numel,
        threshold(p),
        seed & 0xFFFFFFFF,
        seed >> 32,
        offset & 0xFFFFFFFF,
        offset >> 32,
        _bits(1.0 / (1.0 - p)),
        FP64=x.dtype == torch.float64,
        COUNTERS=DROPOUT_COUNTERS,
        num_warps=DROPOUT_WARPS,
        enable_fp_fusion=False,
    )
    return y


def dropout_backward(
    grad_y: torch.Tensor,
    p: float,
    seed: int,
    offset: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    r""":math:`\partial x = \gamma\, d \circ \partial y`: the forward function again,
    with the same ``(seed, offset)``, so the mask is regenerated, never stored."""
    return dropout_forward(grad_y, p, seed, offset, out)


# --- host helpers ------------------------------------------------------------


def _bits(x: float) -> int:
    """The float64 ``x`` as a signed int64, for :func:`_f64` to reinterpret."""
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _float(bits: int) -> float:
    """The inverse of :func:`_bits`."""
    return struct.unpack("<d", struct.pack("<q", bits))[0]


def _computes_in_fp64(*tensors: torch.Tensor) -> bool:
    return rules.compute_dtype(*(t.dtype for t in tensors)) == torch.float64


def _by_device(params: list[torch.Tensor]) -> Iterator[tuple[torch.device, list[int]]]:
    """The rows on each device, in order: a kernel runs on the current device."""
    rows_of: dict[torch.device, list[int]] = {}
    for i, param in enumerate(params):
        rows_of.setdefault(param.device, []).append(i)
    yield from rows_of.items()


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()  # CPU tensors, under the interpreter
