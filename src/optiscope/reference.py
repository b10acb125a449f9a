r"""The three rules of the seed in NumPy float64: the oracle every test compares against.

Read this file first. Each function is the seed's equations, one line per
line, with no fusion, no in-place tricks and no torch import. Each returns new
arrays and leaves its inputs alone.

Notation (the seed's): :math:`\theta` parameters, :math:`g` the minibatch
gradient :math:`\nabla_\theta J`, :math:`m` and :math:`v` the first and second
moment averages, :math:`\alpha` the learning rate.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

Array = NDArray[np.float64]


def momentum_step(
    theta: Array,
    m: Array,
    g: Array,
    *,
    lr: float,
    momentum: float,
    weight_decay: float = 0.0,
    maximize: bool = False,
) -> tuple[Array, Array]:
    r"""Seed 1(a): :math:`m \leftarrow \beta_1 m + (1-\beta_1) g`, :math:`\theta \leftarrow \theta - \alpha m`.

    Returns the new ``(theta, m)``.
    """
    g = -g if maximize else g
    if weight_decay != 0.0:  # L2 folded into the gradient (no 0·θ: θ may be inf)
        g = g + weight_decay * theta
    # With β = 0 the average is the gradient itself (no 0·m: m may be inf).
    m = (1.0 - momentum) * g if momentum == 0.0 else momentum * m + (1.0 - momentum) * g
    theta = theta - lr * m
    return theta, m


def adam_step(
    theta: Array,
    m: Array,
    v: Array,
    g: Array,
    *,
    t: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    amsgrad: bool = False,
    v_max: Array | None = None,
    maximize: bool = False,
    bias_correction: bool = True,
) -> tuple[Array, Array, Array, Array | None]:
    r"""Seed 1(b) and Kingma & Ba's Algorithm 1. ``t`` counts from 1.

    .. math::
        m &\leftarrow \beta_1 m + (1-\beta_1) g \\
        v &\leftarrow \beta_2 v + ((1-\beta_2)\, g) \odot g \\
        \theta &\leftarrow \theta - \alpha\, \hat m / (\sqrt{\hat v} + \epsilon)

    with :math:`\hat m = m/(1-\beta_1^t)`, :math:`\hat v = v/(1-\beta_2^t)` when
    ``bias_correction``, else :math:`\hat m = m`, :math:`\hat v = v`. With
    ``bias_correction=False, eps=0`` this is the seed's
    :math:`\theta \leftarrow \theta - \alpha\, m/\sqrt v`. A coordinate where
    :math:`\sqrt{\hat v}+\epsilon = 0` takes no step; a NaN gradient makes a NaN step.

    Returns the new ``(theta, m, v, v_max)``; ``v_max`` is None unless ``amsgrad``.
    """
    g = -g if maximize else g
    if decoupled_weight_decay:
        theta = theta * (1.0 - lr * weight_decay)
    elif weight_decay != 0.0:
        g = g + weight_decay * theta
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + ((1.0 - beta2) * g) * g
    if amsgrad:
        v_max = np.maximum(v if v_max is None else v_max, v)
    v_used = v_max if amsgrad else v
    m_hat = m / (1.0 - beta1**t) if bias_correction else m
    v_hat = v_used / (1.0 - beta2**t) if bias_correction else v_used
    denom = np.sqrt(v_hat) + eps
    # Zero step only where the denominator is exactly 0 (no signal yet); a NaN
    # gradient gives a NaN step, as in torch.
    nonzero = np.where(denom == 0.0, 1.0, denom)
    with np.errstate(invalid="ignore", over="ignore"):  # inf/inf is NaN, as in torch
        step = np.where(denom == 0.0, 0.0, m_hat / nonzero)
    theta = theta - lr * step
    return theta, m, v, v_max if amsgrad else None


def stochastic_round_bfloat16(x: Array, noise: NDArray[np.uint32]) -> Array:
    r"""``x`` (values a float32 holds exactly) stochastically rounded to bfloat16.

    A float32 is a bfloat16 (its top 16 bits) plus a remainder, its low 16 bits
    ``low``. It is kept as the bfloat16 below it in magnitude, or the one above
    when ``low + r >= 2^16``, ``r`` the low 16 bits of ``noise``: for uniform
    ``r`` the probability of rounding up is ``low / 2^16``, the distance to the
    lower neighbour over the spacing, so :math:`E[\text{rounded}] = x`.
    Returns float64.
    """
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    low = bits & np.uint64(0xFFFF)
    up = low + (noise.astype(np.uint64) & np.uint64(0xFFFF)) >= np.uint64(1 << 16)
    kept = (bits >> np.uint64(16)) + up.astype(np.uint64)
    return (kept << np.uint64(16)).astype(np.uint32).view(np.float32).astype(np.float64)


def dropout(h: Array, d: NDArray[np.bool_], p: float) -> Array:
    r"""Seed (b): :math:`h_\text{drop} = \gamma\, d \circ h` with :math:`\gamma = 1/(1-p)`.

    ``d`` is the keep mask, :math:`d_i \sim \text{Bernoulli}(1-p)`. With
    :math:`p = 1` every unit is dropped and the output is zero (no
    :math:`\gamma` is needed, so none is computed).
    """
    if p == 1.0:
        return np.zeros_like(h, dtype=np.float64)
    gamma = 1.0 / (1.0 - p)
    return gamma * d * h


def dropout_mask(
    rng: np.random.Generator, shape: tuple[int, ...], p: float
) -> NDArray[np.bool_]:
    r""":math:`d_i \sim \text{Bernoulli}(1-p)`, independently."""
    return rng.random(shape) >= p
