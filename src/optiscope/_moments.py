"""The two small pieces Momentum and Adam share: the EMA and its bias correction."""

from __future__ import annotations

import torch


def ema_(average: torch.Tensor, value: torch.Tensor, beta: float) -> torch.Tensor:
    r"""Update a running average in place: :math:`a \leftarrow \beta a + (1-\beta) x`.

    Written as ``lerp`` (``a + (1-\beta)(x - a)``), the same arithmetic as
    ``torch.optim.Adam``, so the two agree to rounding.
    """
    return average.lerp_(value, 1.0 - beta)


def bias_correction(beta: float, step: int) -> float:
    r""":math:`1 - \beta^t`, the mass an EMA started at zero has after ``t`` steps.

    Dividing by it turns the zero-started average into an unbiased one:
    if every :math:`x_s` has mean :math:`\mu`, then
    :math:`E[a_t] = (1-\beta^t)\mu`.
    """
    return 1.0 - beta**step
