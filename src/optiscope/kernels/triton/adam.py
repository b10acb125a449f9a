r"""Adam: :func:`optiscope.rules.adam_step` in one pass over memory.

:math:`m` is torch's lerp (:func:`_lerp`), so it rounds as in
``torch.optim.Adam``; :math:`v` adds :math:`((1-\beta_2) g)\,g`, so a finite
float32 :math:`|g| \ge 1.85\cdot10^{19}` does not overflow :math:`g^2`. float32
square roots and divisions are the IEEE-rounded ones (``sqrt_rn``,
``div_rn``). The per-tensor :math:`\alpha/c_1` and :math:`\sqrt{c_2}` are
computed on the host in float64 from the batch's bias corrections and rounded
in the kernel like every host scalar.

One launch per tensor; with a probe, each program also writes its row of
``rows.ADAM`` up to the histogram, and each tensor takes one more launch for
its histogram sample (:mod:`.probe_rows`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import triton
import triton.language as tl

from .. import rows
from ..records import AdamBatch, AdamHyper, StochasticRounding
from . import common
from .common import (
    by_device,
    computes_in_fp64,
    f64,
    on,
    philox4x32_10,
    round_stochastic,
    round_to,
    to_bits,
)
from .probe_rows import (
    ADAM_COLUMNS,
    eps_threshold,
    fold_into,
    fold_programs,
    probe_common,
    program_rows,
    step_histograms,
)

# The columns this kernel fills after probe_common's.
_EPS_DOMINATED = tl.constexpr(rows.ADAM.index("eps_dominated"))
_STEP_MIN = tl.constexpr(rows.ADAM.index("step_min"))
_STEP_MAX = tl.constexpr(rows.ADAM.index("step_max"))
_ADAM_WIDTH = tl.constexpr(len(ADAM_COLUMNS))

_NO_DECAY, _L2_DECAY, _DECOUPLED_DECAY = 0, 1, 2


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
        "seed_lo",
        "seed_hi",
        "offset_lo",
        "offset_hi",
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
    seed_lo,  # STOCHASTIC: the Philox key and offset of this tensor's words
    seed_hi,
    offset_lo,
    offset_hi,
    DECAY: tl.constexpr,  # _NO_DECAY, _L2_DECAY or _DECOUPLED_DECAY
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    FP64: tl.constexpr,
    PROBE: tl.constexpr,
    STOCHASTIC: tl.constexpr,
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
        g = g + f64(decay, compute) * theta
    elif DECAY == 2:
        theta = theta * f64(decay, compute)
    m = _lerp(m, g, f64(ema_weight1, compute))
    # (1 - beta2) * g first: g * g overflows float32 for |g| >= 1.85e19.
    v = v * f64(beta2, compute) + (f64(one_minus_beta2, compute) * g) * g
    if STOCHASTIC:
        # Word i of philox.random_words: word i & 3 of block i >> 2, each block
        # made by all four of its elements' lanes (no lane exchange needed).
        block = offs >> 2
        zero = tl.zeros_like(offs).to(tl.uint32)
        r0, r1, r2, r3 = philox4x32_10(
            (block & 0xFFFFFFFF).to(tl.uint32),
            (block >> 32).to(tl.uint32),
            zero + tl.cast(offset_lo, tl.uint32),
            zero + tl.cast(offset_hi, tl.uint32),
            tl.cast(seed_lo, tl.uint32),
            tl.cast(seed_hi, tl.uint32),
        )
        word = offs & 3
        noise = tl.where(
            word == 0, r0, tl.where(word == 1, r1, tl.where(word == 2, r2, r3))
        )
        m_stored = round_stochastic(m, noise)
        v_stored = round_stochastic(v, noise >> 16)
    else:
        m_stored = round_to(m, exp_avg_ptr.dtype.element_ty)
        v_stored = round_to(v, exp_avg_sq_ptr.dtype.element_ty)
    tl.store(exp_avg_ptr + offs, m_stored, mask=mask)
    tl.store(exp_avg_sq_ptr + offs, v_stored, mask=mask)
    if AMSGRAD:
        v_max = tl.load(max_exp_avg_sq_ptr + offs, mask=mask, other=0.0)
        # The running max keeps max(v_max, v as stored); the step divides by
        # max(v_max, v), v unrounded (rounding to nearest commutes with max).
        kept = tl.maximum(v_max, v_stored, propagate_nan=tl.PropagateNan.ALL)
        v = tl.maximum(v_max.to(compute), v, propagate_nan=tl.PropagateNan.ALL)
        v_stored = (
            kept if STOCHASTIC else round_to(v, max_exp_avg_sq_ptr.dtype.element_ty)
        )
        tl.store(max_exp_avg_sq_ptr + offs, v_stored, mask=mask)
    denom = _div(_sqrt(v, FP64), f64(sqrt_c2, compute), FP64) + f64(eps, compute)
    # A zero denominator (eps = 0, a coordinate that only saw zero gradients)
    # takes no step; the division is made safe first so 0/0 is never evaluated.
    no_signal = denom == 0.0
    update = _div(m, tl.where(no_signal, 1.0, denom), FP64)
    update = tl.where(no_signal, 0.0, update)
    theta = theta + f64(neg_step_size, compute) * update
    theta_stored = round_to(theta, param_ptr.dtype.element_ty)
    tl.store(param_ptr + offs, theta_stored, mask=mask)
    if PROBE:
        row = probe_common(rows_ptr, row0, raw, theta0, theta_stored, mask, _ADAM_WIDTH)
        # v as stored. The step lr/(sqrt(v/c2)+eps) falls as v grows, so its
        # extrema are the step of v's; a NaN or negative v makes a NaN step.
        kept = v_stored.to(tl.float64)
        valid = mask & (kept >= 0.0)
        dominated = valid & (kept < f64(eps_below, tl.float64))
        tl.store(row + _EPS_DOMINATED, tl.sum(dominated.to(tl.float64), axis=0))
        least = tl.min(tl.where(valid, kept, float("inf")), axis=0)
        greatest = tl.max(tl.where(valid, kept, 0.0), axis=0)
        invalid = tl.sum((mask & ~valid).to(tl.int32), axis=0) > 0
        lr64, c2_64 = f64(lr, tl.float64), f64(c2, tl.float64)
        eps64 = f64(eps, tl.float64)
        step_min = lr64 / (tl.sqrt(greatest / c2_64) + eps64)
        step_max = lr64 / (tl.sqrt(least / c2_64) + eps64)
        tl.store(row + _STEP_MIN, tl.where(invalid, float("nan"), step_min))
        tl.store(row + _STEP_MAX, tl.where(invalid, float("nan"), step_max))


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
    every element; the histogram the sample of
    :func:`optiscope.kernels.rows.hist_stride`, read after the step.
    """
    for device, idx in by_device(batch.params):
        columns = batch[:-1]  # the tensors and corrections, row by row
        picked = AdamBatch(
            *(
                None if column is None else [column[i] for i in idx]
                for column in columns
            ),
            _pick_rounding(batch.rounding, idx),
        )
        with on(device):
            found = _adam_rows(picked, hyper, stats is not None)
        if found is not None:
            fold_into(stats, idx, found, rows.ADAM)


def _pick_rounding(
    rounding: StochasticRounding | None, idx: list[int]
) -> StochasticRounding | None:
    if rounding is None:
        return None
    return StochasticRounding(rounding.seed, [rounding.offsets[i] for i in idx])


def _adam_rows(batch: AdamBatch, hyper: AdamHyper, probe: bool) -> np.ndarray | None:
    if hyper.weight_decay == 0.0:
        decay_mode, decay = _NO_DECAY, 0.0
    elif hyper.decoupled_weight_decay:
        decay_mode, decay = _DECOUPLED_DECAY, 1.0 - hyper.lr * hyper.weight_decay
    else:
        decay_mode, decay = _L2_DECAY, hyper.weight_decay
    used = batch.max_exp_avg_sqs if hyper.amsgrad else batch.exp_avg_sqs
    rounding = batch.rounding
    seed = 0 if rounding is None else rounding.seed
    first, parts = program_rows(batch.params, ADAM_COLUMNS, probe)
    for i, param in enumerate(batch.params):
        c1, c2 = batch.corrections[i]
        offset = 0 if rounding is None else rounding.offsets[i]
        _adam_kernel[(triton.cdiv(param.numel(), common.OPTIMIZER_BLOCK),)](
            param,
            batch.grads[i],
            batch.exp_avgs[i],
            batch.exp_avg_sqs[i],
            used[i],
            param if parts is None else parts,
            first[i],
            param.numel(),
            to_bits(-(hyper.lr / c1)),
            to_bits(math.sqrt(c2)),
            to_bits(hyper.eps),
            to_bits(1.0 - hyper.beta1),
            to_bits(hyper.beta2),
            to_bits(1.0 - hyper.beta2),
            to_bits(decay),
            to_bits(hyper.lr),
            to_bits(c2),
            to_bits(eps_threshold(hyper.eps, c2) if probe else 0.0),
            seed & 0xFFFFFFFF,
            seed >> 32,
            offset & 0xFFFFFFFF,
            offset >> 32,
            DECAY=decay_mode,
            AMSGRAD=hyper.amsgrad,
            MAXIMIZE=hyper.maximize,
            FP64=computes_in_fp64(param, batch.exp_avgs[i]),
            PROBE=probe,
            STOCHASTIC=rounding is not None,
            BLOCK=common.OPTIMIZER_BLOCK,
            num_warps=common.OPTIMIZER_WARPS,
            enable_fp_fusion=False,
        )
    if parts is None:
        return None
    head = fold_programs(parts, first, ADAM_COLUMNS)
    counts = step_histograms(used, batch.corrections, hyper)
    return torch.cat([head, counts.to(torch.float64)], dim=1).cpu().numpy()
