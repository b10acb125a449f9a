"""The Adam update loop (Adam, AdamW, amsgrad), fused: one pass over memory."""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np
from numba import types
from numba.extending import overload

from .bits import (
    as_stored,
    as_stored_stochastic,
    dot3,
    empty_range,
    lerp,
    load,
    raw_bits,
    store,
    store_stochastic,
    tally,
    umax,
    umin,
    zero,
)
from .jit import JIT
from .philox_words import block_words
from .probe_sums import adam_chunk, hist_counts, open_chunk
from .threads import CHUNK, claim, either, optional_view, parts, view


class AdamRule(NamedTuple):
    """The hyperparameters of one group, each in the compute dtype."""

    weight1: float  # 1 - beta1
    beta2: float
    weight2: float  # 1 - beta2
    eps: float
    l2: float  # weight_decay folded into g, or 0 when decoupled
    decay: float  # 1 - lr * weight_decay when decoupled, or 1
    sign: float  # -1 if maximize, else 1


class Rounding(NamedTuple):
    """Stochastic rounding of bfloat16 moments: element ``i`` of tensor ``t``
    takes word ``i`` of ``philox.random_words(numel, seed, offsets[t])``; its
    low 16 bits round ``m``, its high 16 bits ``v``."""

    seed: int  # uint64, below 2^63
    offsets: np.ndarray  # uint64, per tensor


_LOW32, _HIGH = np.uint64(0xFFFFFFFF), np.uint64(32)
#: Elements whose Philox words are made at once, then read by the update loop:
#: few enough to stay in L1, a multiple of 4 (a Philox block).
WORDS = 1024


def _running_max(array, index, value, kept, like):
    """amsgrad's ``max(v_max, v)``: stores ``max(v_max, kept)`` (``kept``: v as
    stored, or v itself when the store rounds it to nearest, which commutes
    with the max) and returns ``max(v_max, value)``; ``value`` if no array."""


@overload(_running_max)
def _running_max_overload(array, index, value, kept, like):
    if isinstance(array, types.NoneType):
        return lambda array, index, value, kept, like: value

    def running_max(array, index, value, kept, like):
        previous = load(array, index, like)
        store(array, index, kept if kept > previous or kept != kept else previous)
        return value if value > previous or value != value else previous

    return running_max


def _store_moments(m_, v_, i, m, v, noise):
    """Store ``m`` and ``v`` rounded to nearest (``noise`` None) or
    stochastically; return ``v`` as the running max should keep it."""


@overload(_store_moments)
def _store_moments_overload(m_, v_, i, m, v, noise):
    if isinstance(noise, types.NoneType):

        def nearest(m_, v_, i, m, v, noise):
            store(m_, i, m)
            store(v_, i, v)
            return v

        return nearest

    def stochastic(m_, v_, i, m, v, noise):
        high = noise >> np.uint32(16)
        store_stochastic(m_, i, m, noise)
        store_stochastic(v_, i, v, np.uint32(high))
        return as_stored_stochastic(v_, v, np.uint32(high))

    return stochastic


@numba.njit(**JIT)
def adam_element(arrays, i, step_size, sqrt_bias2, rule, noise):
    """Update element ``i`` of ``arrays`` (θ, g, m, v, v_max or None), the
    moments rounded to nearest or, with a uint32 ``noise``, stochastically; return
    what a probe sums: (g as stored, Δθ as stored, θ after, the bits of the
    ``v`` the step used, as stored)."""
    theta, grad, m_, v_, vmax_ = arrays
    sign = like = rule.sign
    one, nothing = sign * sign, sign - sign  # in the compute dtype
    th0 = load(theta, i, like)
    th = th0 * rule.decay
    raw = load(grad, i, like)
    g = sign * raw
    if rule.l2 != 0:
        g = g + rule.l2 * th
    m = lerp(load(m_, i, like), g, rule.weight1, one)  # torch's lerp
    # ((1−β2)·g)·g, as torch: (1−β2)·(g·g) overflows for |g| ≥ 1.85e19 in float32.
    v = load(v_, i, like) * rule.beta2 + (rule.weight2 * g) * g
    kept = _store_moments(m_, v_, i, m, v, noise)
    v = _running_max(vmax_, i, v, kept, like)
    denom = np.sqrt(v) / sqrt_bias2 + rule.eps
    update = nothing if denom == 0 else m / denom
    new = th - step_size * update
    store(theta, i, new)
    after = as_stored(theta, new)
    return raw, after - th0, after, raw_bits(as_stored(either(vmax_, v_), v))


@numba.njit(**JIT)
def adam_kernel(
    chunks,  # threads.Chunks
    params,  # int64 addresses, one per tensor
    grads,
    exp_avgs,
    exp_avg_sqs,
    max_exp_avg_sqs,  # addresses, or zeros when not amsgrad
    param_like,  # empty arrays of each column's storage dtype
    grad_like,
    state_like,
    max_like,  # state_like with amsgrad, else None: compiled without the max
    step_sizes,  # compute dtype, per tensor: lr / c1
    sqrt_bias2s,  # compute dtype, per tensor: sqrt(c2)
    rule,  # AdamRule
    probe,  # None, or probe_sums.AdamProbe
    rounding,  # None (to nearest), or Rounding
):
    like = rule.sign
    counts = hist_counts(probe)
    sizes = chunks.sizes
    while True:
        c = claim(chunks.taken)
        if c >= chunks.tensor.size:
            break
        t, start = chunks.tensor[c], chunks.start[c]
        stop = min(start + CHUNK, sizes[t])
        step_size, sqrt_bias2 = step_sizes[t], sqrt_bias2s[t]
        theta = view(params, sizes, t, start, stop, param_like)
        grad = view(grads, sizes, t, start, stop, grad_like)
        m_ = view(exp_avgs, sizes, t, start, stop, state_like)
        v_ = view(exp_avg_sqs, sizes, t, start, stop, state_like)
        vmax_ = optional_view(max_exp_avg_sqs, sizes, t, start, stop, max_like)
        whole = (theta, grad, m_, v_, vmax_)
        if rounding is not None:
            noise = np.empty(WORDS, np.uint32)
            _stochastic_chunk(
                whole,
                start,
                step_size,
                sqrt_bias2,
                rule,
                noise,
                rounding.seed,
                rounding.offsets[t],
                probe,
                c,
                t,
                counts,
            )
            continue
        # Three parts in step, probed or not (why: BENCHMARKS.md, "CPU kernel
        # design history"); both loops call the one per-element update.
        size = (stop - start) // 3
        p1, p2, p3 = parts(whole, 0, size), parts(whole, 1, size), parts(whole, 2, size)
        if probe is None:
            for i in range(size):
                adam_element(p1, i, step_size, sqrt_bias2, rule, None)
                adam_element(p2, i, step_size, sqrt_bias2, rule, None)
                adam_element(p3, i, step_size, sqrt_bias2, rule, None)
            for i in range(3 * size, stop - start):
                adam_element(whole, i, step_size, sqrt_bias2, rule, None)
            continue
        open_chunk(probe, c, stop - start)
        grad_sq = update_sq = param_sq = zero(like)
        low, high = empty_range(like)
        for i in range(size):
            r1, d1, a1, v1 = adam_element(p1, i, step_size, sqrt_bias2, rule, None)
            r2, d2, a2, v2 = adam_element(p2, i, step_size, sqrt_bias2, rule, None)
            r3, d3, a3, v3 = adam_element(p3, i, step_size, sqrt_bias2, rule, None)
            grad_sq = tally(grad_sq, dot3(r1, r1, r2, r2, r3, r3))
            update_sq = tally(update_sq, dot3(d1, d1, d2, d2, d3, d3))
            param_sq = tally(param_sq, dot3(a1, a1, a2, a2, a3, a3))
            low = umin(low, umin(umin(v1, v2), v3))
            high = umax(high, umax(umax(v1, v2), v3))
        for i in range(3 * size, stop - start):
            r, d, after, bits = adam_element(
                whole, i, step_size, sqrt_bias2, rule, None
            )
            grad_sq = tally(grad_sq, r * r)
            update_sq = tally(update_sq, d * d)
            param_sq = tally(param_sq, after * after)
            low, high = umin(low, bits), umax(high, bits)
        sums = (grad_sq, update_sq, param_sq, low, high)
        used = either(vmax_, v_)
        adam_chunk(probe, c, t, theta, grad, used, start, like, sums, counts)


def _span(array, first, stop):
    """``array[first:stop]``, or None for None."""


@overload(_span)
def _span_overload(array, first, stop):
    if isinstance(array, types.NoneType):
        return lambda array, first, stop: None
    return lambda array, first, stop: array[first:stop]


@numba.njit(**JIT)
def _stochastic_chunk(
    whole, start, step_size, sqrt_bias2, rule, noise, seed, offset, probe, c, t, counts
):
    """One chunk (from element ``start`` of its tensor) with stochastically
    rounded moments: ``WORDS`` Philox words at a time into ``noise``, then the
    update of those elements, so that both loops vectorize. The update indexes
    a slice from 0 (an offset index costs numba's wraparound check and the
    vector loop with it: 5x slower)."""
    theta, grad, m_, v_, vmax_ = whole
    like = rule.sign
    key, counter = np.uint64(seed), np.uint64(offset)
    k0, k1 = key & _LOW32, key >> _HIGH
    c2, c3 = counter & _LOW32, counter >> _HIGH
    grad_sq = update_sq = param_sq = zero(like)
    low, high = empty_range(like)
    n = theta.size
    for first in range(0, n, WORDS):
        stop = min(first + WORDS, n)
        block = np.uint64((start + first) // 4)  # start and WORDS: multiples of 4
        for b in range((stop - first + 3) // 4):
            r0, r1, r2, r3 = block_words(block + np.uint64(b), c2, c3, k0, k1)
            noise[4 * b] = np.uint32(r0)
            noise[4 * b + 1] = np.uint32(r1)
            noise[4 * b + 2] = np.uint32(r2)
            noise[4 * b + 3] = np.uint32(r3)
        part = (
            theta[first:stop],
            grad[first:stop],
            m_[first:stop],
            v_[first:stop],
            _span(vmax_, first, stop),
        )
        for j in range(stop - first):
            r, d, after, bits = adam_element(
                part, j, step_size, sqrt_bias2, rule, noise[j]
            )
            if probe is not None:
                grad_sq = tally(grad_sq, r * r)
                update_sq = tally(update_sq, d * d)
                param_sq = tally(param_sq, after * after)
                low, high = umin(low, bits), umax(high, bits)
    if probe is not None:
        open_chunk(probe, c, n)
        sums = (grad_sq, update_sq, param_sq, low, high)
        used = either(vmax_, v_)
        adam_chunk(probe, c, t, theta, grad, used, start, like, sums, counts)
