"""Dropout: the Philox mask, drawn in the kernel, never stored.

The mask comes from Philox4x32-10 exactly as specified in
:mod:`optiscope.kernels.philox`, so a ``(seed, offset)`` gives the same mask
here as the NumPy reference, bit for bit, and backward regenerates the mask
instead of saving it. One launch per call.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..philox import threshold
from . import common
from .common import f64, philox4x32_10, round_to, to_bits


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
    r0, r1, r2, r3 = philox4x32_10(
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
    y = tl.where(keep, x.to(compute) * f64(gamma, compute), 0.0)
    tl.store(y_ptr + offs, round_to(y, y_ptr.dtype.element_ty), mask=mask)


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
    grid = (triton.cdiv(numel, 4 * common.DROPOUT_COUNTERS),)
    _dropout_kernel[grid](
        x,
        y,
        numel,
        threshold(p),
        seed & 0xFFFFFFFF,
        seed >> 32,
        offset & 0xFFFFFFFF,
        offset >> 32,
        to_bits(1.0 / (1.0 - p)),
        FP64=x.dtype == torch.float64,
        COUNTERS=common.DROPOUT_COUNTERS,
        num_warps=common.DROPOUT_WARPS,
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
