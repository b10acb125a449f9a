"""The Adam update loop (Adam, AdamW, amsgrad), fused: one pass over memory."""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np
from numba import types
from numba.extending import overload

from .bits import (
    as_stored,
    dot3,
    empty_range,
    lerp,
    load,
    raw_bits,
    store,
    tally,
    umax,
    umin,
    zero,
)
from .jit import JIT
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


def _running_max(array, index, value, like):
    """amsgrad's ``max(v_max, v)``, stored and returned; ``value`` if no array."""


@overload(_running_max)
def _running_max_overload(array, index, value, like):
    if isinstance(array, types.NoneType):
        return lambda array, index, value, like: value

    def running_max(array, index, value, like):
        previous = load(array, index, like)
        largest = value if value > previous or value != value else previous
        store(array, index, largest)
        return largest

    return running_max


@numba.njit(**JIT)
def adam_element(arrays, i, step_size, sqrt_bias2, rule):
    """Update element ``i`` of ``arrays`` (θ, g, m, v, v_max or None); return
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
    store(m_, i, m)
    store(v_, i, v)
    v = _running_max(vmax_, i, v, like)
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
        # Three parts in step, probed or not (why: BENCHMARKS.md, "CPU kernel
        # design history"); both loops call the one per-element update.
        size = (stop - start) // 3
        p1, p2, p3 = parts(whole, 0, size), parts(whole, 1, size), parts(whole, 2, size)
        if probe is None:
            for i in range(size):
                adam_element(p1, i, step_size, sqrt_bias2, rule)
                adam_element(p2, i, step_size, sqrt_bias2, rule)
                adam_element(p3, i, step_size, sqrt_bias2, rule)
            for i in range(3 * size, stop - start):
                adam_element(whole, i, step_size, sqrt_bias2, rule)
            continue
        open_chunk(probe, c, stop - start)
        grad_sq = update_sq = param_sq = zero(like)
        low, high = empty_range(like)
        for i in range(size):
            r1, d1, a1, v1 = adam_element(p1, i, step_size, sqrt_bias2, rule)
            r2, d2, a2, v2 = adam_element(p2, i, step_size, sqrt_bias2, rule)
            r3, d3, a3, v3 = adam_element(p3, i, step_size, sqrt_bias2, rule)
            grad_sq = tally(grad_sq, dot3(r1, r1, r2, r2, r3, r3))
            update_sq = tally(update_sq, dot3(d1, d1, d2, d2, d3, d3))
            param_sq = tally(param_sq, dot3(a1, a1, a2, a2, a3, a3))
            low = umin(low, umin(umin(v1, v2), v3))
            high = umax(high, umax(umax(v1, v2), v3))
        for i in range(3 * size, stop - start):
            r, d, after, bits = adam_element(whole, i, step_size, sqrt_bias2, rule)
            grad_sq = tally(grad_sq, r * r)
            update_sq = tally(update_sq, d * d)
            param_sq = tally(param_sq, after * after)
            low, high = umin(low, bits), umax(high, bits)
        sums = (grad_sq, update_sq, param_sq, low, high)
        used = either(vmax_, v_)
        adam_chunk(probe, c, t, theta, grad, used, start, like, sums, counts)
