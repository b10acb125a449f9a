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
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..kernels import rows as layout

RUNNING_DECAY = 0.99


def common_metrics(row: np.ndarray) -> dict[str, float]:
    """RMS of gradient, update and parameter; update-to-weight ratio; non-finite count."""
    n = max(row[0], 1.0)
    grad_rms = math.sqrt(row[1] / n)
    update_rms = math.sqrt(row[2] / n)
    param_rms = math.sqrt(row[3] / n)
    return {
        "grad_rms": grad_rms,
        "update_rms": update_rms,
        "param_rms": param_rms,
        # cs231n's rule of thumb: about 1e-3 per step
        "update_to_weight": update_rms / param_rms if param_rms > 0 else math.inf,
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
        "step_median": histogram_quantile(counts, 0.5),
        "step_max": float(row[_STEP_MAX]),
        "step_histogram": counts.astype(np.int64).tolist(),
        "eps_dominated_fraction": float(row[_EPS_DOMINATED] / n),
        "bias_correction1": corrections[0],
        "bias_correction2": corrections[1],
    }


class MomentumTracker:
    """Running means of Σg², Σm² and Σg·m_prev, one row per tensor of a group."""

    _COLUMNS = (
        layout.MOMENTUM.index("sum_grad_sq"),
        layout.MOMENTUM.index("sum_m_sq"),
        layout.MOMENTUM.index("sum_grad_dot_prev_m"),
    )

    def __init__(self, rows: int) -> None:
        self.means = np.zeros((rows, 3))
        self.weights = np.zeros(rows)

    def update(self, index: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Fold one step's ``rows`` into tracker rows ``index``; return their estimates."""
        fresh = rows[:, list(self._COLUMNS)]
        self.means[index] = (
            RUNNING_DECAY * self.means[index] + (1 - RUNNING_DECAY) * fresh
        )
        self.weights[index] = RUNNING_DECAY * self.weights[index] + (1 - RUNNING_DECAY)
        return variance_ratio(self.means[index] / self.weights[index, None])


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
