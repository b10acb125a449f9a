"""The momentum update loop: ``m ← β·m + (1−β)·g``, ``θ ← θ − α·m``, fused."""

from __future__ import annotations

from typing import NamedTuple

import numba

from .bits import as_stored, dot3, load, store, tally, zero
from .jit import JIT
from .probe_sums import momentum_chunk, open_chunk
from .threads import CHUNK, claim, parts, view


class MomentumRule(NamedTuple):
    """The hyperparameters of one group, each in the compute dtype."""

    lr: float
    beta: float  # momentum
    weight: float  # 1 - momentum, rounded once from float64
    weight_decay: float
    sign: float  # -1 if maximize, else 1


@numba.njit(**JIT)
def momentum_element(arrays, i, rule):
    """Update element ``i`` of ``arrays`` (θ, g, m); return what a probe sums:
    (g as stored, Δθ as stored, θ after, g with decay, m before, m as stored)."""
    theta, grad, buffer = arrays
    like = rule.sign
    th = load(theta, i, like)
    raw = load(grad, i, like)
    g = rule.sign * raw
    if rule.weight_decay != 0:
        g = g + rule.weight_decay * th
    m_prev = load(buffer, i, like)
    # β·m + (1−β)·g, not lerp: with g = ±inf (or m = ±inf) lerp makes NaN where
    # torch's SGD and the reference make ±inf. With β = 0, no 0·m (NaN if m is
    # infinite): m is g, as in the reference and torch's SGD without a buffer.
    m = rule.weight * g if rule.beta == 0 else rule.beta * m_prev + rule.weight * g
    new = th - rule.lr * m
    store(buffer, i, m)
    store(theta, i, new)
    after = as_stored(theta, new)
    return raw, after - th, after, g, m_prev, as_stored(buffer, m)


@numba.njit(**JIT)
def momentum_kernel(
    chunks,  # threads.Chunks
    params,  # int64 addresses, one per tensor
    grads,
    buffers,
    param_like,  # empty arrays of each column's storage dtype
    grad_like,
    buffer_like,
    rule,  # MomentumRule
    probe,  # None, or probe_sums.MomentumProbe
):
    like = rule.sign
    while True:
        c = claim(chunks.taken)
        if c >= chunks.tensor.size:
            break
        t, start = chunks.tensor[c], chunks.start[c]
        stop = min(start + CHUNK, chunks.sizes[t])
        theta = view(params, chunks.sizes, t, start, stop, param_like)
        grad = view(grads, chunks.sizes, t, start, stop, grad_like)
        buffer = view(buffers, chunks.sizes, t, start, stop, buffer_like)
        whole = (theta, grad, buffer)
        # Three parts in step, probed or not (why: BENCHMARKS.md, "CPU kernel
        # design history"); both loops call the one per-element update.
        size = (stop - start) // 3
        p1, p2, p3 = parts(whole, 0, size), parts(whole, 1, size), parts(whole, 2, size)
        if probe is None:
            for i in range(size):
                momentum_element(p1, i, rule)
                momentum_element(p2, i, rule)
                momentum_element(p3, i, rule)
            for i in range(3 * size, stop - start):
                momentum_element(whole, i, rule)
            continue
        open_chunk(probe, c, stop - start)
        grad_sq = update_sq = param_sq = grad_m = m_sq = zero(like)
        for i in range(size):
            r1, d1, a1, g1, m1, k1 = momentum_element(p1, i, rule)
            r2, d2, a2, g2, m2, k2 = momentum_element(p2, i, rule)
            r3, d3, a3, g3, m3, k3 = momentum_element(p3, i, rule)
            grad_sq = tally(grad_sq, dot3(r1, r1, r2, r2, r3, r3))
            update_sq = tally(update_sq, dot3(d1, d1, d2, d2, d3, d3))
            param_sq = tally(param_sq, dot3(a1, a1, a2, a2, a3, a3))
            grad_m = tally(grad_m, dot3(g1, m1, g2, m2, g3, m3))
            m_sq = tally(m_sq, dot3(k1, k1, k2, k2, k3, k3))
        for i in range(3 * size, stop - start):
            r, d, a, g, m, k = momentum_element(whole, i, rule)
            grad_sq = tally(grad_sq, r * r)
            update_sq = tally(update_sq, d * d)
            param_sq = tally(param_sq, a * a)
            grad_m = tally(grad_m, g * m)
            m_sq = tally(m_sq, k * k)
        sums = (grad_sq, update_sq, param_sq, grad_m, m_sq)
        momentum_chunk(probe, c, theta, grad, buffer, like, sums)
