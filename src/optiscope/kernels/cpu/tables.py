"""Host-side tables of the probes: the Adam step's thresholds and bins, and the
fold of per-chunk rows into per-tensor rows."""

from __future__ import annotations

import numba
import numpy as np

# numba freezes these constants into the cached functions (the cache stamp
# covers rows.py: see .jit).
from ..rows import ADAM, HIST_BINS, HIST_MIN_EXP
from .bits import ALL_BITS, INF_BITS, NO_BITS, bits_double, double_bits
from .jit import HOST_JIT

_STEP_MIN, _STEP_MAX = ADAM.index("step_min"), ADAM.index("step_max")
_EXPONENT = np.uint64(52)
_MANTISSA = np.uint64((1 << 52) - 1)
#: The lower edge of each histogram bin, ``2^(k-1+HIST_MIN_EXP)``.
_BIN_EDGES = 2.0 ** (np.arange(HIST_BINS) - 1 + HIST_MIN_EXP)


# -- the Adam step's thresholds ------------------------------------------------------
def step_thresholds(lr: float, eps: float, correction2: np.ndarray) -> np.ndarray:
    """Per ``correction2``, the float64 ``v`` thresholds of the Adam probe:
    column 0 the least ``v`` with ``sqrt(v/c2) >= eps``; column ``k >= 1`` the
    least ``v`` whose step ``lr/(sqrt(v/c2)+eps)`` is below bin ``k``'s lower
    edge ``2^(k-1+HIST_MIN_EXP)``. Each predicate is evaluated with the same
    float64 operations as the oracle, and is monotone in ``v`` (a root and a
    division, correctly rounded, are monotone), so the least ``v`` is found
    exactly: from the closed-form solution, by a search over the bits of
    non-negative doubles (which order like the doubles) that starts a few ulp
    wide and doubles until it brackets the answer."""
    c2 = np.ascontiguousarray(correction2, np.float64)
    out = np.empty((c2.size, HIST_BINS))
    _thresholds(float(lr), float(eps), c2, _BIN_EDGES, out)
    return out


@numba.njit(**HOST_JIT)
def _holds(bits, lr, eps, c2, k, edge):
    """:func:`step_thresholds`' predicate ``k`` at ``v`` with these bits."""
    root = np.sqrt(bits_double(bits) / c2)
    return root >= eps if k == 0 else lr / (root + eps) < edge


@numba.njit(**HOST_JIT)
def _thresholds(lr, eps, c2, edges, out):
    for r in range(c2.size):
        for k in range(edges.size):
            root = eps if k == 0 else lr / edges[k] - eps
            guess = c2[r] * root * root if root > 0 else 0.0
            start = double_bits(guess) if guess < np.inf else INF_BITS
            # Bracket the least v that holds in (low, high], then bisect.
            width = np.uint64(1)
            if _holds(start, lr, eps, c2[r], k, edges[k]):
                high = start
                low = start - width if start >= width else NO_BITS
                while low > NO_BITS and _holds(low, lr, eps, c2[r], k, edges[k]):
                    high, width = low, width * np.uint64(2)
                    low = low - width if low >= width else NO_BITS
                if low == NO_BITS and _holds(low, lr, eps, c2[r], k, edges[k]):
                    out[r, k] = 0.0
                    continue
            else:  # every predicate holds at +inf
                low = start
                high = min(start + width, INF_BITS)
                while not _holds(high, lr, eps, c2[r], k, edges[k]):
                    low, width = high, width * np.uint64(2)
                    high = min(high + width, INF_BITS)
            while high - low > np.uint64(1):
                mid = low + (high - low) // np.uint64(2)
                if _holds(mid, lr, eps, c2[r], k, edges[k]):
                    high = mid
                else:
                    low = mid
            out[r, k] = bits_double(high)


def step_bins(below: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of :func:`step_thresholds`, the histogram bin of ``v`` without a
    root or a division, indexed by the top 12 bits of ``v`` (sign and exponent):
    ``bins`` is the bin of the range's least ``v`` and ``cuts`` the bits from
    which ``v`` is one bin lower. The step falls as ``v`` grows, so the bin of
    ``v`` is the number of thresholds ``k >= 1`` above ``v``, which a walk over
    the ranges in order counts. Over one octave of ``v`` the step changes by
    at most √2, so it spans two bins at most; a range where the bins at its two
    ends differ otherwise (``eps`` near 0 with subnormal ``v``, where the step
    is not near-linear), or whose ``v`` are negative (-0.0 included: the root
    of a negative is NaN), gets bin -1, for the exact formula."""
    below = np.ascontiguousarray(below, np.float64)
    bins = np.empty((below.shape[0], 4096), np.int64)
    cuts = np.empty((below.shape[0], 4096), np.uint64)
    _fill_bins(below, bins, cuts)
    return bins, cuts


@numba.njit(**HOST_JIT)
def _fill_bins(below, bins, cuts):
    for r in range(below.shape[0]):
        ascending = np.sort(below[r, 1:])
        n = ascending.size
        at_least, at_most = 0, 0  # thresholds <= the range's least / greatest v
        for top in range(4096):
            bins[r, top], cuts[r, top] = -1, ALL_BITS
            if top >= 2048:
                continue
            least = np.uint64(top) << _EXPONENT
            least_v, greatest_v = bits_double(least), bits_double(least | _MANTISSA)
            while at_least < n and ascending[at_least] <= least_v:
                at_least += 1
            while at_most < n and ascending[at_most] <= greatest_v:
                at_most += 1
            first, last = n - at_least, n - at_most
            if last == first:
                bins[r, top] = first
            elif last == first - 1:
                bins[r, top] = first
                cuts[r, top] = double_bits(ascending[at_least])


# -- per-chunk rows to per-tensor rows -------------------------------------------------
@numba.njit(**HOST_JIT)
def fold_partials(stats, rows, partials, chunk_tensor, extrema):
    """Each tensor's chunks summed in chunk order, then added to its row
    ``rows[tensor]`` of ``stats``; with ``extrema``, Adam's
    ``step_min``/``step_max`` columns take the minimum and maximum instead,
    NaN winning."""
    total = np.zeros(partials.shape[1])
    c = 0
    while c < chunk_tensor.size:
        tensor = chunk_tensor[c]
        total[:] = partials[c]
        c += 1
        while c < chunk_tensor.size and chunk_tensor[c] == tensor:
            _combine_into(total, partials[c], extrema)
            c += 1
        _combine_into(stats[rows[tensor]], total, extrema)


@numba.njit(**HOST_JIT)
def _combine_into(target, values, extrema):
    """``target += values``, but with ``extrema`` Adam's ``step_min`` and
    ``step_max`` take the minimum and maximum, NaN winning."""
    for k in range(target.size):
        if extrema and k == _STEP_MIN:
            target[k] = _nan_min(target[k], values[k])
        elif extrema and k == _STEP_MAX:
            target[k] = -_nan_min(-target[k], -values[k])
        else:
            target[k] += values[k]


@numba.njit(**HOST_JIT)
def _nan_min(a, b):
    if a != a or b != b:
        return np.nan
    return min(a, b)
