r"""Triton kernels for CUDA tensors: Momentum, Adam and dropout in one pass over memory.

The dispatcher in :mod:`optiscope.kernels` imports this module lazily, only for
CUDA tensors, and calls the four functions below. Each kernel reads every
element once and writes it once; the arithmetic is the same as
:func:`optiscope.momentum_step` and :func:`optiscope.adam_step`:

* bfloat16 and float16 tensors are computed in float32 and rounded once on
  store; the compute dtype is the widest of the parameter and its states
  (float64 if any of them is float64), as in :func:`optiscope.rules.compute_dtype`;
* float32 square roots and divisions are the IEEE-rounded ones
  (``sqrt_rn``, ``div_rn``), not the approximate instructions;
* host scalars travel as float64 and are rounded to the compute dtype inside
  the kernel, which is what torch does to a Python scalar;
* per-tensor scalars (the bias corrections, since step counts may differ) are
  computed on the host, once per tensor per step.

Dropout draws its mask from Philox4x32-10 exactly as specified in
:mod:`optiscope.kernels.philox`, so a ``(seed, offset)`` gives the same mask
here as the NumPy reference, bit for bit, and backward regenerates the mask
instead of saving it.

With ``probe=True`` the optimizer kernels also write one float64 row of sums
per program (Σg², Σ(Δθ)², Σθ², non-finite g; momentum's Σg·m_prev and Σm²;
Adam's ε-dominated count and v's extrema), computed in float64 from the values
the step loaded and stored, so no range is lost; the rows are added on the
device and copied to the host once per list. On GPUs with slow float64 this
costs more than it would in float32. Adam's histogram bins the fixed sample of
``probes.layout.hist_stride`` after the step (about 4096 elements of a large
tensor). Not yet run on a GPU: tested through Triton's interpreter.

Indices are int64 throughout, so tensors of more than :math:`2^{31}` elements
are addressed correctly. Launches: one per tensor.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import torch
import triton
import triton.language as tl

from .philox import PHILOX_M0, PHILOX_M1, PHILOX_W0, PHILOX_W1, ROUNDS, threshold

# Elements per program for the optimizer kernels, counters per program for
# dropout (4 elements each). Module attributes so a benchmark can try others.
OPTIMIZER_BLOCK = 2048
OPTIMIZER_WARPS = 8
DROPOUT_COUNTERS = 512
DROPOUT_WARPS = 8

# Columns of one program's probe row (see _probe_common and the kernels).
MOMENTUM_STATS = tl.constexpr(6)
ADAM_STATS = tl.constexpr(8)

# Launches pass enable_fp_fusion=False: every multiply and add rounds on its own,
# as in the sequence of torch ops the kernels stand for (and it is memory-bound).
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
    # torch's lerp, so the EMA rounds as in torch.optim and optiscope.adam_step:
    # the form that is exact at weight == 1 (momentum = 0 gives m = g exactly).
    return tl.where(
        weight < 0.5,
        start + weight * (end - start),
        end - (end - start) * (1.0 - weight),
    )


@triton.jit
def _probe_common(stats_ptr, raw, before, after, mask, WIDTH: tl.constexpr):
    """Columns 0-3 of this program's probe row: Σg², Σ(Δθ)², Σθ² and the count
    of non-finite g, in float64 (``raw`` the gradient as loaded, ``before`` and
    ``after`` θ as stored before and after the step)."""
    row = stats_ptr + tl.program_id(0).to(tl.int64) * WIDTH
    g = raw.to(tl.float64)
    theta = after.to(tl.float64)
    delta = theta - before.to(tl.float64)
    tl.store(row + 0, tl.sum(g * g, axis=0))
    tl.store(row + 1, tl.sum(delta * delta, axis=0))
    tl.store(row + 2, tl.sum(theta * theta, axis=0))
    finite = tl.abs(g) < float("inf")
    tl.store(row + 3, tl.sum((mask & ~finite).to(tl.float64), axis=0))
    return row


# --- Momentum ----------------------------------------------------------------


@triton.jit(do_not_specialize=["neg_lr", "ema_weight", "weight_decay"])
def _momentum_kernel(
    param_ptr,
    grad_ptr,
    buf_ptr,
    stats_ptr,  # PROBE: (programs, MOMENTUM_STATS) float64; else never touched
    numel,
    neg_lr,
    ema_weight,  # 1 - momentum
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
    m = _lerp(m_prev, g, _f64(ema_weight, compute))
    theta = theta0 + _f64(neg_lr, compute) * m
    m_stored = _round_to(m, buf_ptr.dtype.element_ty)
    theta_stored = _round_to(theta, param_ptr.dtype.element_ty)
    tl.store(buf_ptr + offs, m_stored, mask=mask)
    tl.store(param_ptr + offs, theta_stored, mask=mask)
    if PROBE:
        row = _probe_common(stats_ptr, raw, theta0, theta_stored, mask, MOMENTUM_STATS)
        kept = m_stored.to(tl.float64)
        tl.store(row + 4, tl.sum(g.to(tl.float64) * m_prev.to(tl.float64), axis=0))
        tl.store(row + 5, tl.sum(kept * kept, axis=0))


def momentum_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    maximize: bool,
    probe: bool = False,
) -> list[np.ndarray] | None:
    r""":func:`optiscope.momentum_step` on every tensor of the lists, in place.

    .. math::
        g \leftarrow \pm g + \lambda\theta, \quad
        m \leftarrow \beta m + (1-\beta) g, \quad
        \theta \leftarrow \theta - \alpha m

    With ``probe``, returns each tensor's row of ``probes.layout.MOMENTUM``,
    summed by the same kernel (one float64 row per program, added on the
    device, one copy to the host for the whole list).
    """
    _check_lists(params, grads, momentum_buffers)
    partials: list[torch.Tensor | None] = []
    for param, grad, buf in zip(params, grads, momentum_buffers, strict=True):
        numel = param.numel()
        stats = _probe_buffer(param, MOMENTUM_STATS.value) if probe else None
        partials.append(stats)
        if numel == 0:
            continue
        grid = (triton.cdiv(numel, OPTIMIZER_BLOCK),)
        _momentum_kernel[grid](
            param,
            grad,
            buf,
            param if stats is None else stats,
            numel,
            _bits(-lr),
            _bits(1.0 - momentum),
            _bits(weight_decay),
            HAS_DECAY=weight_decay != 0.0,
            MAXIMIZE=maximize,
            FP64=_computes_in_fp64(param, buf),
            PROBE=probe,
            BLOCK=OPTIMIZER_BLOCK,
            num_warps=OPTIMIZER_WARPS,
            enable_fp_fusion=False,
        )
    if not probe:
        return None
    # Per tensor: numel, then the kernel's six columns summed over programs.
    sums = [
        torch.cat(
            [torch.tensor([float(p.numel())], device=b.device, dtype=b.dtype), b.sum(0)]
        )
        for p, b in zip(params, partials, strict=True)
    ]
    return list(torch.stack(sums).cpu().numpy()) if sums else []


def _probe_buffer(param: torch.Tensor, width: int) -> torch.Tensor:
    """One zeroed float64 row per program of ``param``'s launch."""
    programs = triton.cdiv(param.numel(), OPTIMIZER_BLOCK)
    return torch.zeros((programs, width), device=param.device, dtype=torch.float64)


# --- Adam --------------------------------------------------------------------


@triton.jit(
    do_not_specialize=[
        "neg_step_size",
        "sqrt_c2",
        "eps",
        "ema_weight1",
        "beta2",
        "one_minus_beta2",
        "decay",
    ]
)
def _adam_kernel(
    param_ptr,
    grad_ptr,
    exp_avg_ptr,
    exp_avg_sq_ptr,
    max_exp_avg_sq_ptr,  # any tensor when not AMSGRAD; never touched then
    stats_ptr,  # PROBE: (programs, ADAM_STATS) float64; else never touched
    numel,
    neg_step_size,  # -lr / c1
    sqrt_c2,
    eps,
    ema_weight1,  # 1 - beta1
    beta2,
    one_minus_beta2,
    decay,  # lambda for L2, 1 - lr * lambda when decoupled
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
    v = v * _f64(beta2, compute) + _f64(one_minus_beta2, compute) * g * g
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
        # v as stored: the step of a coordinate is lr/(sqrt(v/c2)+eps) of it,
        # falling as v grows, so v's extrema give the step's (on the host).
        row = _probe_common(stats_ptr, raw, theta0, theta_stored, mask, ADAM_STATS)
        kept = v_stored.to(tl.float64)
        below = tl.cast(eps_below, tl.int64).to(tl.float64, bitcast=True)
        dominated = mask & (kept < below)
        tl.store(row + 4, tl.sum(dominated.to(tl.float64), axis=0))
        tl.store(row + 5, tl.min(tl.where(mask, kept, float("inf")), axis=0))
        tl.store(row + 6, tl.max(tl.where(mask, kept, -float("inf")), axis=0))
        tl.store(row + 7, tl.sum((mask & (kept != kept)).to(tl.float64), axis=0))


def adam_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    max_exp_avg_sqs: list[torch.Tensor] | None,
    steps: list[int],
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
    probe: bool = False,
) -> list[np.ndarray] | None:
    r""":func:`optiscope.adam_step` on every tensor of the lists, in place.

    ``steps[i]`` is :math:`t` for tensor ``i``, already incremented (1 on the
    first update). With bias correction, :math:`c_i = 1-\beta_i^t` per tensor:

    .. math::
        \theta \leftarrow \theta - \frac{\alpha}{c_1}\,
            \frac{m}{\sqrt{v}/\sqrt{c_2} + \epsilon}

    and a zero denominator gives a zero step.

    With ``probe``, returns each tensor's row of ``probes.layout.ADAM``. The
    kernel sums Σg², Σ(Δθ)², Σθ², the non-finite g and the ε-dominated v
    (below the exact threshold of ``kernels.cpu.step_thresholds``), and takes
    v's extrema, one float64 row per program; the step's extrema follow from
    v's on the host, and the histogram bins the same fixed sample as on the
    CPU (``probes.layout.hist_stride``), read after the step: about 4096
    elements of a large tensor, not a pass over it.
    """
    _check_lists(params, grads, exp_avgs, exp_avg_sqs)
    if amsgrad:
        if max_exp_avg_sqs is None:
            raise ValueError("amsgrad=True needs max_exp_avg_sqs, got None")
        _check_lists(params, max_exp_avg_sqs)
    if len(steps) != len(params):
        raise ValueError(f"got {len(steps)} steps for {len(params)} params")
    if weight_decay == 0.0:
        decay_mode, decay = _NO_DECAY, 0.0
    elif decoupled_weight_decay:
        decay_mode, decay = _DECOUPLED_DECAY, 1.0 - lr * weight_decay
    else:
        decay_mode, decay = _L2_DECAY, weight_decay
    results: list[torch.Tensor] = []
    thresholds: dict[float, float] = {}
    for i, (param, step) in enumerate(zip(params, steps, strict=True)):
        numel = param.numel()
        c1 = 1.0 - beta1**step if bias_correction else 1.0
        c2 = 1.0 - beta2**step if bias_correction else 1.0
        v_max = max_exp_avg_sqs[i] if amsgrad else exp_avg_sqs[i]
        stats = _probe_buffer(param, ADAM_STATS.value) if probe else None
        if probe and c2 not in thresholds:  # tensors mostly share a step count
            thresholds[c2] = _eps_threshold(lr, eps, c2)
        below = thresholds[c2] if probe else 0.0
        if numel > 0:
            grid = (triton.cdiv(numel, OPTIMIZER_BLOCK),)
            _adam_kernel[grid](
                param,
                grads[i],
                exp_avgs[i],
                exp_avg_sqs[i],
                v_max,
                param if stats is None else stats,
                numel,
                _bits(-lr / c1),
                _bits(math.sqrt(c2)),
                _bits(eps),
                _bits(1.0 - beta1),
                _bits(beta2),
                _bits(1.0 - beta2),
                _bits(decay),
                _bits(below),
                DECAY=decay_mode,
                AMSGRAD=amsgrad,
                MAXIMIZE=maximize,
                FP64=_computes_in_fp64(param, exp_avgs[i], exp_avg_sqs[i], v_max),
                PROBE=probe,
                BLOCK=OPTIMIZER_BLOCK,
                num_warps=OPTIMIZER_WARPS,
                enable_fp_fusion=False,
            )
        if stats is not None:
            results.append(_adam_row(stats, v_max, lr=lr, eps=eps, correction2=c2))
    if not probe:
        return None
    return list(torch.stack(results).cpu().numpy()) if results else []


def _eps_threshold(lr: float, eps: float, correction2: float) -> float:
    from .cpu import step_thresholds

    return float(step_thresholds(lr, eps, np.array([correction2]))[0, 0])


def _adam_row(
    stats: torch.Tensor,
    v_used: torch.Tensor,
    *,
    lr: float,
    eps: float,
    correction2: float,
) -> torch.Tensor:
    """One tensor's ``probes.layout.ADAM`` row, on the device, from its programs'
    rows and the histogram's sample of ``v_used``."""
    from . import rows as layout
    from ..probes import measure

    numel = v_used.numel()
    sums = stats[:, :5].sum(0)  # Σg², Σ(Δθ)², Σθ², non-finite, ε-dominated
    nan = stats[:, 7].sum() > 0

    def step(v: torch.Tensor) -> torch.Tensor:  # the oracle's float64 operations
        return lr / (torch.sqrt(v.double() / correction2) + eps)

    if numel == 0:  # as an empty tensor's row starts: nothing to combine
        extrema = stats.new_tensor([math.inf, -math.inf])
    else:
        least, greatest = stats[:, 5].min(), stats[:, 6].max()
        extrema = torch.stack([step(greatest), step(least)])
        extrema = torch.where(nan, torch.nan, extrema)
    sample = step(v_used.reshape(-1)[:: layout.hist_stride(numel)])
    hist = torch.bincount(measure.octave_bins(sample), minlength=layout.HIST_BINS)
    head = stats.new_tensor([float(numel)])
    return torch.cat([head, sums, extrema, hist.double()])


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


def dropout_forward(x: torch.Tensor, p: float, seed: int, offset: int) -> torch.Tensor:
    r"""Inverted dropout :math:`y = \gamma\, d \circ x` with the Philox mask of ``(seed, offset)``.

    ``d_i = 1`` iff ``philox.random_words(n, seed, offset)[i] >= threshold(p)``;
    :math:`\gamma = 1/(1-p)` in float32 (float64 for float64 input), and
    low-precision inputs are scaled in float32 and rounded once. ``0 < p < 1``,
    ``x`` contiguous; returns a new tensor.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1) for the dropout kernel, got {p!r}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed!r}")
    if not 0 <= offset < 2**64:
        raise ValueError(f"offset must be in [0, 2**64), got {offset!r}")
    if not x.is_contiguous():
        raise ValueError("dropout_forward needs a contiguous tensor")
    y = torch.empty_like(x)
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
    grad_y: torch.Tensor, p: float, seed: int, offset: int
) -> torch.Tensor:
    r""":math:`\partial x = \gamma\, d \circ \partial y`: the forward function again,
    with the same ``(seed, offset)``, so the mask is regenerated, never stored."""
    return dropout_forward(grad_y, p, seed, offset)


# --- host helpers ------------------------------------------------------------


def _bits(x: float) -> int:
    """The float64 ``x`` as a signed int64, for :func:`_f64` to reinterpret."""
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _computes_in_fp64(*tensors: torch.Tensor) -> bool:
    return any(t.dtype == torch.float64 for t in tensors)


def _check_lists(params: list[torch.Tensor], *others: list[torch.Tensor]) -> None:
    for other in others:
        if len(other) != len(params):
            raise ValueError(f"got {len(other)} tensors for {len(params)} params")
    for group in (params, *others):
        for t in group:
            if not t.is_contiguous():
                raise ValueError("the Triton kernels need contiguous tensors")
