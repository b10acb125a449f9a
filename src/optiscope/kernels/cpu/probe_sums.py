"""What a probed step adds to the update loop: the chunk's row of sums.

A probe is None (compiled out: the kernel is the plain update) or a
:class:`MomentumProbe` / :class:`AdamProbe`, whose ``partials[c]`` is chunk
``c``'s row of :mod:`optiscope.kernels.rows`, overwritten by the kernel.

The update loop keeps the chunk's running sums (and Adam's least and greatest
``v``, by their raw bits) in the compute dtype, so the loop keeps its vector
width; they add with :func:`~.bits.tally`, reassociation allowed on that
addition only. What costs more than the loop can hide is done here, after the
loop, on the chunk while it is in L2, and only where needed:

* a chunk whose float32 Σg², Σθ² or Σm² leaves ``[2**-80, inf)`` is summed
  again in float64 from the chunk, which the step leaves holding g, θ and m.
  Σ(Δθ)² and momentum's Σg·m_prev need θ and m from before the step, which
  are gone: they stay float32 sums (their range: :mod:`optiscope.kernels.rows`);
* non-finite gradients are counted only where Σg² is not finite;
* ε-dominated coordinates are counted only where the chunk's least ``v`` is
  below the threshold;
* the histogram bins a sample (every ``hist_stride``-th element) by table
  (:func:`~.tables.step_bins`): no root or division per element.

The precision this gives is derived in ``tests/test_kernel_stats.py``
(``sum_tolerance``); the measurements behind the design are in BENCHMARKS.md.
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np
from numba import types
from numba.extending import overload

# numba freezes these constants into the cached kernels (the cache stamp covers
# rows.py: see .jit).
from ..rows import ADAM, HIST_BINS, HIST_MIN_EXP, HIST_START, MOMENTUM
from .bits import (
    ALL_BITS,
    NO_BITS,
    bits_value,
    double_bits,
    inf_bits,
    load,
    order_bits,
    tally,
    umax,
    umin,
)
from .jit import JIT

_NUMEL = ADAM.index("numel")
_GRAD_SQ = ADAM.index("sum_grad_sq")
_UPDATE_SQ = ADAM.index("sum_update_sq")
_PARAM_SQ = ADAM.index("sum_param_sq")
_NONFINITE = ADAM.index("nonfinite_grads")
_EPS_DOMINATED = ADAM.index("eps_dominated")
_STEP_MIN = ADAM.index("step_min")
_STEP_MAX = ADAM.index("step_max")
_GRAD_M = MOMENTUM.index("sum_grad_dot_prev_m")
_M_SQ = MOMENTUM.index("sum_m_sq")
assert MOMENTUM[: _NONFINITE + 1] == ADAM[: _NONFINITE + 1]

_EXPONENT = np.uint64(52)
_EXPONENT_MASK = np.uint64(0x7FF)
#: A float32 chunk sum below this may have lost terms to underflow (a square
#: under 2**-126 keeps only an absolute 2**-150): 65,536 of them move a sum of
#: 2**-80 by under 2**-54 of itself.
_TRUSTED_LEAST = 2.0**-80
_OCTAVE_BIAS = 1022 + HIST_MIN_EXP  # biased exponent - 1022 is frexp's exponent


class MomentumProbe(NamedTuple):
    partials: np.ndarray  # float64 (chunks, len(rows.MOMENTUM))


class AdamProbe(NamedTuple):
    partials: np.ndarray  # float64 (chunks, len(rows.ADAM))
    lr: float
    eps: float
    c2: np.ndarray  # float64 per tensor: 1 - beta2^t
    eps_below: np.ndarray  # float64 per tensor: v below this is ε-dominated
    bins: np.ndarray  # int64 (tables, 4096): tables.step_bins
    cuts: np.ndarray  # uint64 (tables, 4096): tables.step_bins
    tables: np.ndarray  # int64 per tensor: its row of bins and cuts
    strides: np.ndarray  # int64 per tensor: rows.hist_stride(numel)


def trusted(total):
    """Whether a chunk sum from the loop needs no float64 second pass."""


@overload(trusted)
def _trusted(total):
    if total == types.float64:  # as the second pass would sum, unless inf or NaN
        return lambda total: abs(total) < np.inf
    return lambda total: _TRUSTED_LEAST <= abs(total) < np.inf


@numba.njit(**JIT)
def open_chunk(probe, c, n):
    """Start chunk ``c`` (``n`` elements): zero its row."""
    row = probe.partials[c]
    row[:] = 0.0
    row[_NUMEL] = n


def hist_counts(probe):
    """The histogram's four rows of counts (see :func:`adam_chunk`), if probed."""


@overload(hist_counts)
def _hist_counts(probe):
    if isinstance(probe, types.NoneType):
        return lambda probe: None
    return lambda probe: np.zeros((4, HIST_BINS))


# -- after the loop: the float64 second pass, where a float32 sum is not trusted ----
@numba.njit(**JIT)
def _count_nonfinite(row, grad, like):
    """Count a chunk's non-finite gradients, only where its float64 Σg² says
    there may be some (a non-finite g makes Σg² inf or NaN; so can an overflow
    of finite float64 g, and then the count is 0, still exact)."""
    if abs(row[_GRAD_SQ]) < np.inf:
        return
    bad = 0
    for i in range(grad.size):
        bad += 0 if abs(load(grad, i, like)) < np.inf else 1
    row[_NONFINITE] += bad


@numba.njit(**JIT)
def _sums64_adam(theta, grad, v_used, like):
    """A chunk's Σg² and Σθ² in float64, and the bits of its least and greatest
    ``|v|`` (:func:`~.bits.order_bits`), from the chunk as the step left it."""
    grad_sq, param_sq = 0.0, 0.0
    low, high = ALL_BITS, NO_BITS
    for i in range(theta.size):
        r = np.float64(load(grad, i, like))
        after = np.float64(load(theta, i, like))
        bits = order_bits(np.float64(load(v_used, i, like)))
        grad_sq = tally(grad_sq, r * r)
        param_sq = tally(param_sq, after * after)
        low, high = umin(low, bits), umax(high, bits)
    return grad_sq, param_sq, low, high


@numba.njit(**JIT)
def _sums64_momentum(theta, grad, buffer, like):
    """A chunk's Σg², Σθ² and Σm² in float64, from the chunk as the step left it."""
    grad_sq, param_sq, m_sq = 0.0, 0.0, 0.0
    for i in range(theta.size):
        r = np.float64(load(grad, i, like))
        after = np.float64(load(theta, i, like))
        m = np.float64(load(buffer, i, like))
        grad_sq = tally(grad_sq, r * r)
        param_sq = tally(param_sq, after * after)
        m_sq = tally(m_sq, m * m)
    return grad_sq, param_sq, m_sq


@numba.njit(**JIT)
def momentum_chunk(probe, c, theta, grad, buffer, like, sums):
    """Fill chunk ``c``'s row from the loop's ``sums`` (Σg², Σ(Δθ)², Σθ²,
    Σg·m_prev, Σm²), taking Σg², Σθ² and Σm² again in float64 from the chunk
    where one is not trusted."""
    grad_sq, update_sq, param_sq, grad_m, m_sq = sums
    row = probe.partials[c]
    row[_GRAD_SQ] = grad_sq
    row[_UPDATE_SQ] = update_sq
    row[_PARAM_SQ] = param_sq
    row[_GRAD_M] = grad_m
    row[_M_SQ] = m_sq
    if not (trusted(grad_sq) and trusted(param_sq) and trusted(m_sq)):
        redone = _sums64_momentum(theta, grad, buffer, like)
        row[_GRAD_SQ], row[_PARAM_SQ], row[_M_SQ] = redone
    _count_nonfinite(row, grad, like)


# x/0 is inf (eps = 0 and v = 0 is a step of lr/0), not ZeroDivisionError.
@numba.njit(**JIT, error_model="numpy")
def adam_chunk(probe, c, tensor, theta, grad, v_used, start, like, sums, counts):
    """Fill chunk ``c``'s row (tensor index ``start`` on). ``sums`` is the
    loop's Σg², Σ(Δθ)², Σθ² and the raw bits of the least and greatest ``v``;
    Σg², Σθ² and the extrema are taken again in float64 from the chunk where
    one is not trusted (bits above +inf's: a NaN, -0.0 or negative ``v``).

    The effective step ``s = lr/(sqrt(v/c2)+eps)`` falls as ``v`` grows, so
    ``s``'s extrema are ``s`` of ``v``'s. ε-dominated is ``v`` below an exact
    threshold, counted only where the least ``v`` is. The histogram bins the
    sampled elements (tensor index a multiple of the tensor's stride) by
    table, into the four rows of ``counts`` (the calling thread's) in turn, so
    that consecutive samples in one bin don't wait on each other's increment."""
    grad_sq, update_sq, param_sq, low_bits, high_bits = sums
    row = probe.partials[c]
    row[_GRAD_SQ] = grad_sq
    row[_UPDATE_SQ] = update_sq
    row[_PARAM_SQ] = param_sq
    low, high = bits_value(low_bits), bits_value(high_bits)
    if not (
        trusted(grad_sq) and trusted(param_sq) and high_bits <= inf_bits(high_bits)
    ):
        grad_sq64, param_sq64, low_bits64, high_bits64 = _sums64_adam(
            theta, grad, v_used, like
        )
        row[_GRAD_SQ], row[_PARAM_SQ] = grad_sq64, param_sq64
        low, high = bits_value(low_bits64), bits_value(high_bits64)
    _count_nonfinite(row, grad, like)
    lr, eps, correction2 = probe.lr, probe.eps, probe.c2[tensor]
    if high != high:  # a NaN step: torch's min and max are NaN too
        row[_STEP_MIN] = row[_STEP_MAX] = np.nan
    else:
        row[_STEP_MIN] = lr / (np.sqrt(high / correction2) + eps)
        row[_STEP_MAX] = lr / (np.sqrt(low / correction2) + eps)
    below = probe.eps_below[tensor]
    if low < below:
        dominated = 0
        for i in range(v_used.size):
            dominated += 1 if load(v_used, i, like) < below else 0
        row[_EPS_DOMINATED] = dominated
    stride = probe.strides[tensor]
    bins, cuts = probe.bins[probe.tables[tensor]], probe.cuts[probe.tables[tensor]]
    turn = 0
    for i in range((stride - start % stride) % stride, v_used.size, stride):
        v = np.float64(load(v_used, i, like))
        bits = double_bits(v)
        top = bits >> _EXPONENT
        k = bins[top]
        if k < 0:  # a range step_bins leaves to the exact formula
            k = _octave(lr / (np.sqrt(v / correction2) + eps))
        elif bits >= cuts[top]:
            k -= 1
        counts[turn, k] += 1.0
        turn = (turn + 1) & 3
    for k in range(HIST_BINS):
        total = counts[0, k] + counts[1, k] + counts[2, k] + counts[3, k]
        row[HIST_START + k] = total
        counts[0, k] = counts[1, k] = counts[2, k] = counts[3, k] = 0.0


@numba.njit(**JIT)
def _octave(step):
    """:func:`optiscope.kernels.rows.octave_bin`, from the exponent bits."""
    if not step > 0:
        return 0
    exponent = np.int64((double_bits(step) >> _EXPONENT) & _EXPONENT_MASK)
    return min(max(exponent - _OCTAVE_BIAS, 0), HIST_BINS - 1)
