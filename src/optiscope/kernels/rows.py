r"""What a probed step measures, per tensor, as one row of float64 sums.

A kernel (or the torch fallback) fills one row per parameter tensor in the
same pass as the update; everything a user sees is derived from these rows on
the host, so the kernels only ever add, count, and take minima and maxima.

Precision: a CPU kernel sums in its compute dtype (float32 for float32,
bfloat16 and float16 parameters) within each 65,536-element chunk, and adds
chunks in float64. A float32 chunk sum has a relative error below
``8192 · 2**-24 ≈ 4.9e-4`` of the sum of its terms' magnitudes in the worst
case (at least 8 vector lanes of at most 8192 terms each) and near ``1e-6`` on
typical data. A chunk's Σg², Σθ² or Σm² that leaves float32's range is redone
in float64 from the chunk; Σ(Δθ)² and Σg·m_prev cannot be (θ and m from
before the step are gone), so their terms keep an absolute ``2**-150`` below
``2**-126`` and a change ``|Δθ| >= 2**64`` makes Σ(Δθ)² inf (see
:mod:`optiscope.kernels.cpu`). Counts, ``step_min`` and ``step_max`` are exact.

Columns shared by every optimizer:

``numel``, ``sum_grad_sq`` (Σg²), ``sum_update_sq`` (Σ(Δθ)², Δθ the change of the
stored parameter), ``sum_param_sq`` (Σθ² after the step), ``nonfinite_grads``.

Momentum adds ``sum_grad_dot_prev_m`` (Σ g·m_{t-1}) and ``sum_m_sq`` (Σ m_t²).

Adam adds ``eps_dominated`` (count of √v̂ < ε), ``step_min``/``step_max`` of the
per-coordinate effective step :math:`s = α/(\sqrt{\hat v}+ε)` and a histogram of
:math:`s` with one bin per octave: bin ``k`` holds :math:`2^{k-1+E} \le s < 2^{k+E}`,
with ``E = HIST_MIN_EXP``; bin 0 holds everything below (and NaN), the last
everything above. Octaves are read off the float's exponent bits, which costs no
logarithm. ``eps_dominated``, ``step_min`` and ``step_max`` cover every coordinate;
the histogram covers a fixed sample, the coordinates whose index in the flattened
tensor is a multiple of :func:`hist_stride` (``ceil(numel / stride)`` of them,
element 0 always among them, about ``HIST_SAMPLES`` at most), so the median
step read from it is an estimate from that sample. Binning a step costs a table
lookup that the vectorized update loop cannot do; for every coordinate of a
large tensor it would cost more than the probe's whole budget.
"""

from __future__ import annotations

import functools
import math

COMMON = ("numel", "sum_grad_sq", "sum_update_sq", "sum_param_sq", "nonfinite_grads")
MOMENTUM = (*COMMON, "sum_grad_dot_prev_m", "sum_m_sq")

HIST_MIN_EXP = -40  # 2^-40 ≈ 9e-13
HIST_MAX_EXP = 24  # 2^24 ≈ 1.7e7, above α/ε for any α ≤ 0.1 and ε ≥ 1e-8
HIST_BINS = HIST_MAX_EXP - HIST_MIN_EXP + 2  # plus underflow and overflow bins
ADAM = (
    *COMMON,
    "eps_dominated",
    "step_min",
    "step_max",
    *(f"hist{k}" for k in range(HIST_BINS)),
)
HIST_START = ADAM.index("hist0")
#: The least histogram stride. Binning a sampled step costs about as much as
#: updating 2 coordinates, so a 1-in-61 sample costs ~3% of the step.
HIST_STRIDE = 61
#: About the most coordinates of one tensor the histogram samples: enough to
#: place an octave-wide median, few enough to cost nothing on 10M elements.
HIST_SAMPLES = 1 << 12


@functools.lru_cache(maxsize=4096)
def hist_stride(numel: int) -> int:
    """The histogram's stride for a tensor of ``numel`` elements: it counts
    coordinates ``0, s, 2s, ...`` with ``s`` the least prime that is at least
    ``HIST_STRIDE`` and ``numel / HIST_SAMPLES``. Prime, so the sample does not
    alias with the row lengths of a weight (a power of two, or any length below
    ``s``): with a stride of 16, a (256, 64) weight would sample only input
    columns 0, 16, 32 and 48.

    >>> hist_stride(1000), hist_stride(10_000_000)
    (61, 2447)
    """
    stride = max(HIST_STRIDE, -(-numel // HIST_SAMPLES))
    while any(stride % d == 0 for d in range(2, math.isqrt(stride) + 1)):
        stride += 1
    return stride


def column(layout: tuple[str, ...], name: str) -> int:
    return layout.index(name)


def octave_bin(value: float) -> int:
    """The histogram bin of a positive ``value`` (the same rule the kernels apply)."""
    if not value > 0:
        return 0
    if value == math.inf:
        return HIST_BINS - 1
    exponent = math.frexp(value)[
        1
    ]  # value = f·2^e with 0.5 <= f < 1, so 2^(e-1) <= value
    return min(max(exponent - HIST_MIN_EXP, 0), HIST_BINS - 1)


def bin_edges() -> list[float]:
    """Lower edges of bins 1..HIST_BINS-1 (bin 0 is everything below the first)."""
    return [2.0 ** (HIST_MIN_EXP + k - 1) for k in range(1, HIST_BINS)]
