r"""Momentum: :func:`optiscope.rules.momentum_step` in one pass over memory.

The average is a multiply and an add, :math:`\beta m + (1-\beta) g`, not a
lerp, so an infinite gradient gives an infinite :math:`m` (a lerp gives NaN).
One launch per tensor; with a probe, each program also writes its row of
``rows.MOMENTUM`` (:mod:`.probe_rows`).
"""

from __future__ import annotations

import numpy as np
import triton
import triton.language as tl

from .. import rows
from ..records import MomentumBatch, MomentumHyper
from . import common
from .common import by_device, computes_in_fp64, f64, on, round_to, to_bits
from .probe_rows import (
    MOMENTUM_COLUMNS,
    fold_into,
    fold_programs,
    probe_common,
    program_rows,
)

# The columns this kernel fills after probe_common's.
_GRAD_DOT_PREV_M = tl.constexpr(rows.MOMENTUM.index("sum_grad_dot_prev_m"))
_M_SQ = tl.constexpr(rows.MOMENTUM.index("sum_m_sq"))
_MOMENTUM_WIDTH = tl.constexpr(len(MOMENTUM_COLUMNS))


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
        g = g + f64(weight_decay, compute) * theta0
    # A multiply and an add, not a lerp: g = ±inf must give m = ±inf, not NaN.
    m = m_prev * f64(beta, compute) + f64(one_minus_beta, compute) * g
    theta = theta0 + f64(neg_lr, compute) * m
    m_stored = round_to(m, buf_ptr.dtype.element_ty)
    theta_stored = round_to(theta, param_ptr.dtype.element_ty)
    tl.store(buf_ptr + offs, m_stored, mask=mask)
    tl.store(param_ptr + offs, theta_stored, mask=mask)
    if PROBE:
        row = probe_common(
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
    for device, idx in by_device(batch.params):
        picked = MomentumBatch(*([column[i] for i in idx] for column in batch))
        with on(device):
            found = _momentum_rows(picked, hyper, stats is not None)
        if found is not None:
            fold_into(stats, idx, found, MOMENTUM_COLUMNS)


def _momentum_rows(
    batch: MomentumBatch, hyper: MomentumHyper, probe: bool
) -> np.ndarray | None:
    first, parts = program_rows(batch.params, MOMENTUM_COLUMNS, probe)
    for i, (param, grad, buf) in enumerate(zip(*batch, strict=True)):
        grid = (triton.cdiv(param.numel(), common.OPTIMIZER_BLOCK),)
        _momentum_kernel[grid](
            param,
            grad,
            buf,
            param if parts is None else parts,
            first[i],
            param.numel(),
            to_bits(-hyper.lr),
            to_bits(hyper.momentum),
            to_bits(1.0 - hyper.momentum),
            to_bits(hyper.weight_decay),
            HAS_DECAY=hyper.weight_decay != 0.0,
            MAXIMIZE=hyper.maximize,
            FP64=computes_in_fp64(param, buf),
            PROBE=probe,
            BLOCK=common.OPTIMIZER_BLOCK,
            num_warps=common.OPTIMIZER_WARPS,
            enable_fp_fusion=False,
        )
    if parts is None:
        return None
    return fold_programs(parts, first, MOMENTUM_COLUMNS).cpu().numpy()
