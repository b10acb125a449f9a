r"""From the per-tensor sums of :mod:`.layout` to the numbers a user reads.

Momentum's variance reduction, without per-coordinate state
-------------------------------------------------------------
For one coordinate with i.i.d. gradients :math:`g_t` of mean :math:`\mu` and
variance :math:`\sigma^2`, the EMA :math:`m_t = \beta m_{t-1} + (1-\beta) g_t`
is stationary with :math:`E[m] = \mu` and
:math:`\mathrm{Var}(m) = \frac{(1-\beta)^2}{1-\beta^2}\sigma^2 = \frac{1-\beta}{1+\beta}\sigma^2`.
Because :math:`g_t` is independent of :math:`m_{t-1}`,
:math:`E[g_t m_{t-1}] = \mu^2`, so

.. math::
    \frac{E[m_t^2] - E[g_t m_{t-1}]}{E[g_t^2] - E[g_t m_{t-1}]}
    = \frac{\mathrm{Var}(m) + \mu^2 - \mu^2}{\sigma^2 + \mu^2 - \mu^2}
    = \frac{1-\beta}{1+\beta}.

Summing numerator and denominator over the coordinates of a tensor gives the
ratio of total variances :math:`\sum_i \mathrm{Var}(m_i) / \sum_i \sigma_i^2`, which
is the same :math:`(1-\beta)/(1+\beta)` for i.i.d. noise. The expectations are
running means over steps (an EMA with decay ``RUNNING_DECAY``, debiased), of
three scalars per tensor: :math:`\sum g^2`, :math:`\sum m^2` and
:math:`\sum g\, m_{\text{prev}}`. No per-element state is added.

Two estimates are reported, per tensor and per group:

``variance_ratio_raw``
    The ratio from this step's sums alone. Its expectations are averages over
    the tensor's coordinates only, so it is meaningful for a large tensor
    whose coordinates share their noise statistics, and only once the buffer
    is warm; on a small tensor it is noise (it can be negative).
``variance_ratio``
    The smoothed estimate: running means over about the last
    ``1/(1 − RUNNING_DECAY) = 100`` measured steps. A tensor's running means
    start only after :func:`warmup_steps` ``= ⌈2/(1−β)⌉`` measured calls (20 at
    β = 0.9), since a buffer that starts at zero has not yet reached its
    stationary variance (it is ``1 − β^{2t}`` of it); before that it is NaN.
    Trust it once it has folded in a few tens of steps: on i.i.d. noise it is
    within 5% of ``(1−β)/(1+β)`` after a few hundred (``tests/test_probes.py``).
    It measures the smoothing momentum gives *if* the gradient noise is
    uncorrelated from step to step; a value far above the prediction means the
    gradients are positively correlated across steps (the noise is
    persistent: momentum averages less of it away), far below means they
    alternate in sign (oscillation across a valley).

``predicted_variance_ratio`` is :math:`(1-\beta)/(1+\beta)` and the group's
``variance_ratio_warmup`` the warm-up in measured calls.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np

from ..kernels import rows as layout

RUNNING_DECAY = 0.99


def common_metrics(row: np.ndarray) -> dict[str, float]:
    """Element count; RMS of gradient, update and parameter; update-to-weight ratio;
    non-finite count."""
    n = max(row[0], 1.0)
    grad_rms = math.sqrt(row[1] / n)
    update_rms = math.sqrt(row[2] / n)
    param_rms = math.sqrt(row[3] / n)
    return {
        "numel": int(row[0]),
        "grad_rms": grad_rms,
        "update_rms": update_rms,
        "param_rms": param_rms,
        # cs231n's rule of thumb: about 1e-3 per step
        "update_to_weight": (
            update_rms / param_rms
            if param_rms > 0
            else (math.inf if param_rms == 0 else math.nan)
        ),
        "nonfinite_grads": int(row[4]),
    }


def histogram_quantile(counts: np.ndarray, q: float) -> float:
    """The ``q``-quantile from octave counts, geometric within its bin (±1 octave)."""
    total = counts.sum()
    if total == 0:
        return math.nan
    target = q * total
    cumulative = np.cumsum(counts)
    k = int(np.searchsorted(cumulative, target, side="left"))
    below = cumulative[k - 1] if k > 0 else 0.0
    fraction = (target - below) / counts[k] if counts[k] > 0 else 0.5
    low = 2.0 ** (layout.HIST_MIN_EXP + k - 1)
    return low * 2.0**fraction


_STEP_MIN = layout.ADAM.index("step_min")
_STEP_MAX = layout.ADAM.index("step_max")
_EPS_DOMINATED = layout.ADAM.index("eps_dominated")


def adam_metrics(row: np.ndarray, corrections: tuple[float, float]) -> dict[str, Any]:
    counts = row[layout.HIST_START :]
    n = max(row[0], 1.0)
    return {
        "step_min": float(row[_STEP_MIN]),
        "step_median": float(histogram_quantile(counts, 0.5)),
        "step_max": float(row[_STEP_MAX]),
        "step_histogram": counts.astype(np.int64).tolist(),
        "eps_dominated_fraction": float(row[_EPS_DOMINATED] / n),
        "bias_correction1": corrections[0],
        "bias_correction2": corrections[1],
    }


class MomentumTracker:
    """Running means of Σg², Σm² and Σg·m_prev, one slot per tensor of a group.

    Slots are the tensors' positions in the group and grow when parameters are
    appended to it; a slot whose tensor changed size starts over. A slot folds
    a step into its running means only once its momentum buffer is warm
    (:func:`warmup_steps` calls after the slot first appeared), so the
    smoothed estimate is NaN until then.
    """

    _COLUMNS = (
        layout.MOMENTUM.index("sum_grad_sq"),
        layout.MOMENTUM.index("sum_m_sq"),
        layout.MOMENTUM.index("sum_grad_dot_prev_m"),
    )

    def __init__(self) -> None:
        self.means = np.zeros((0, 3))
        self.weights = np.zeros(0)
        self.first = np.zeros(0, dtype=np.int64)  # the call at which a slot began
        self.numel = np.zeros(0)

    def _grow(self, size: int) -> None:
        extra = size - len(self.weights)
        if extra > 0:
            self.means = np.concatenate([self.means, np.zeros((extra, 3))])
            self.weights = np.concatenate([self.weights, np.zeros(extra)])
            self.first = np.concatenate([self.first, np.full(extra, -1)])
            self.numel = np.concatenate([self.numel, np.full(extra, -1.0)])

    def update(
        self, index: np.ndarray, rows: np.ndarray, beta: float, call: int
    ) -> dict[str, Any]:
        """Fold call ``call``'s ``rows`` into slots ``index``.

        Returns per tensor the smoothed and the raw (this step alone) estimate,
        and the same two for the group (from the sums over its tensors).
        """
        fresh = rows[:, list(self._COLUMNS)]
        self._grow(int(index.max()) + 1 if len(index) else 0)
        numel = rows[:, 0]
        changed = self.numel[index] != numel
        if changed.any():
            slots = index[changed]
            self.means[slots] = 0.0
            self.weights[slots] = 0.0
            self.first[slots] = call
            self.numel[slots] = numel[changed]
        warm = (call - self.first[index]) >= warmup_steps(beta)
        slots = index[warm]
        self.means[slots] = (
            RUNNING_DECAY * self.means[slots] + (1 - RUNNING_DECAY) * fresh[warm]
        )
        self.weights[slots] = RUNNING_DECAY * self.weights[slots] + (1 - RUNNING_DECAY)
        weights = self.weights[index]
        with np.errstate(divide="ignore", invalid="ignore"):
            debiased = self.means[index] / weights[:, None]
        smoothed = np.where(weights > 0, variance_ratio(debiased), np.nan)
        ready = weights > 0
        pooled = (
            float(variance_ratio(debiased[ready].sum(0))[0])
            if ready.any()
            else math.nan
        )
        return {
            "smoothed": smoothed,
            "raw": variance_ratio(fresh),
            "pooled": pooled,
            "pooled_raw": float(variance_ratio(fresh.sum(0))[0]),
        }


def warmup_steps(beta: float) -> int:
    r"""Steps before a fresh momentum buffer's variance is within 2% of its
    stationary value: :math:`\lceil 2/(1-\beta) \rceil`.

    From a zero buffer, :math:`\mathrm{Var}(m_t) = \frac{1-\beta}{1+\beta}
    \sigma^2 (1-\beta^{2t})`, and :math:`\beta^{2t} \le e^{-2t(1-\beta)}
    \le e^{-4} \approx 0.018` for :math:`t \ge 2/(1-\beta)`.

    >>> warmup_steps(0.9), warmup_steps(0.0)
    (20, 2)
    """
    if not beta < 1:
        return sys.maxsize
    return math.ceil(round(2 / (1 - beta), 9))


def variance_ratio(means: np.ndarray) -> np.ndarray:
    """(E[m²] − E[g·m_prev]) / (E[g²] − E[g·m_prev]) for rows of (E[g²], E[m²], E[g·m_prev])."""
    gg, mm, gm = np.atleast_2d(means).T
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(gg - gm > 0, (mm - gm) / (gg - gm), np.nan)


def merge_rows(rows: np.ndarray, layout_: tuple[str, ...]) -> np.ndarray:
    """Pool per-tensor rows into one group row: sums add, extrema combine."""
    merged = rows.sum(axis=0)
    if "step_min" in layout_:
        merged[layout_.index("step_min")] = rows[:, layout_.index("step_min")].min()
        merged[layout_.index("step_max")] = rows[:, layout_.index("step_max")].max()
    return merged
