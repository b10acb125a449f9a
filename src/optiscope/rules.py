r"""The per-tensor torch rules, and every sub-rule the backends share.

:func:`momentum_step` and :func:`adam_step` state each update with plain torch
ops on one tensor: the readable form of what the fused kernels do, and the
path any tensor without a kernel takes (a tensor subclass, an unsupported
device). The small rules above them have one home here, used by every backend:

* :data:`SUPPORTED_DTYPES` and :func:`compute_dtype` (bfloat16 and float16 are
  computed in float32 and rounded once);
* :func:`bias_corrections` (:math:`1-\beta^t` in float64 with Python's ``pow``);
* :func:`effective_step` (Adam's :math:`\alpha/(\sqrt{\hat v}+\epsilon)`);
* :func:`adam_denominator_is_zero`, the convention where
  :math:`\sqrt{\hat v}+\epsilon = 0`;
* :func:`stochastic_round` and :func:`rounding_offset`, the stochastic
  rounding of bfloat16 moments and where its random bits come from.

This module imports nothing else from optiscope but its argument checks.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

#: The parameter dtypes optiscope updates.
SUPPORTED_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


class BiasCorrection(NamedTuple):
    r""":math:`c_1 = 1-\beta_1^t` and :math:`c_2 = 1-\beta_2^t` of one tensor, in float64
    (both 1 without bias correction); made by :func:`bias_corrections`."""

    c1: float
    c2: float


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype the arithmetic of a row runs in: float64 if any tensor of the row
    is float64, else float32. bfloat16 and float16 cannot hold the small
    differences a step makes (``1 - 0.999`` next to 1, ``eps=1e-8``), so they are
    widened and rounded once on store.

    >>> compute_dtype(torch.bfloat16), compute_dtype(torch.float32, torch.float64)
    (torch.float32, torch.float64)
    """
    return torch.float64 if torch.float64 in dtypes else torch.float32


def bias_corrections(
    beta1: float, beta2: float, step: int, enabled: bool = True
) -> BiasCorrection:
    r""":math:`(1-\beta_1^t,\ 1-\beta_2^t)`: the mass a zero-started EMA has after
    ``t`` steps; dividing by it makes the average unbiased. Computed once per
    tensor per step, in float64, with Python's correctly rounded ``pow`` (NumPy's
    vectorised pow is 1 ulp off for some ``t``). Both are 1 when not ``enabled``.

    >>> bias_corrections(0.9, 0.999, 1)
    BiasCorrection(c1=0.09999999999999998, c2=0.0010000000000000009)
    """
    if not enabled:
        return BiasCorrection(1.0, 1.0)
    return BiasCorrection(1.0 - beta1**step, 1.0 - beta2**step)


def effective_step(lr: float, v_hat: torch.Tensor, eps: float) -> torch.Tensor:
    r"""Adam's per-coordinate step size :math:`\alpha/(\sqrt{\hat v}+\epsilon)`,
    in float64: what the probes and the lab report as "the step Adam gives"."""
    denom = torch.sqrt(v_hat.to(torch.float64)) + eps
    # torch.div, not ``lr / denom``: torch computes a scalar over a tensor as a
    # reciprocal times lr, 1 ulp from the division every backend performs.
    return torch.div(torch.tensor(lr, dtype=torch.float64, device=denom.device), denom)


def adam_denominator_is_zero(eps: float, dtype: torch.dtype) -> bool:
    r"""Whether :math:`\sqrt{\hat v}+\epsilon` can be exactly 0 in ``dtype``: only
    when ``eps`` is 0 there, i.e. 0 or below the dtype's least subnormal. Those
    coordinates take no step (they have seen only zero gradients)."""
    return torch.tensor(eps, dtype=dtype).item() == 0.0


def rounding_offset(stream: int, step: int) -> int:
    """The Philox offset of a parameter's stochastic rounding at ``step``:
    ``stream`` (the parameter's position in the optimizer, counting across
    groups as ``state_dict`` numbers them) in the high 32 bits, ``step`` in the
    low, so every parameter and step draws its own words."""
    return (stream << 32) | (step & 0xFFFFFFFF)


def stochastic_round(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    r"""float32 ``x`` rounded to bfloat16, up in magnitude with probability
    (distance to the lower neighbour) / (spacing), so that
    :math:`E[\text{stored}] = x`.

    With ``b`` the bits of ``x`` and ``r`` the low 16 bits of ``noise`` (int64,
    uniform on :math:`[0, 2^{16})` or wider), the stored bits are
    :math:`\lfloor (b + r) / 2^{16} \rfloor`: ``x``'s low 16 bits plus ``r``
    carry into the kept half with probability (low bits)/:math:`2^{16}`. A NaN
    stays a quiet NaN; a value within a spacing of the largest bfloat16 may
    round to inf, as it would with probability that small.

    >>> x = torch.tensor([1.0 + 2.0**-9])  # a quarter of the way from 1 to 1 + 2^-7
    >>> low, high = torch.tensor([0xBFFF]), torch.tensor([0xC000])  # r < or >= 3/4
    >>> stochastic_round(x, low).item(), stochastic_round(x, high).item()
    (1.0, 1.0078125)
    """
    bits = x.to(torch.float32).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    kept = (bits + (noise.to(torch.int64) & 0xFFFF)) >> 16
    kept = torch.where(torch.isnan(x), (bits >> 16) | 0x40, kept)
    # The kept half back in the top of a float32, which converts exactly.
    high = kept << 16
    high = torch.where(high >= 2**31, high - 2**32, high).to(torch.int32)
    return high.view(torch.float32).to(torch.bfloat16)


def momentum_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor,
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    r"""One momentum step for one tensor, in place on ``param`` and ``momentum_buffer``.

    .. math::

        g &\leftarrow \pm\nabla_\theta J + \lambda\theta
            \quad(\text{minus when maximizing; } \lambda = \text{weight\_decay}) \\
        m &\leftarrow \beta m + (1-\beta) g \\
        \theta &\leftarrow \theta - \alpha m

    ``momentum_buffer`` is the seed's :math:`m`. ``grad`` is read, never written.
    The average is a multiply and an add, not a lerp: an infinite gradient then
    gives an infinite :math:`m`, as in the equation and in torch's SGD; with
    :math:`\beta = 0` it is :math:`g` itself.
    """
    dtype = compute_dtype(param.dtype, momentum_buffer.dtype)
    theta, m = param.to(dtype), momentum_buffer.to(dtype)
    g = grad.to(dtype)
    if maximize:
        g = -g
    if weight_decay != 0.0:
        g = g.add(theta, alpha=weight_decay)
    # With β = 0 the average is the gradient itself: no 0·m, which is NaN
    # where m is infinite (torch's SGD keeps no buffer then).
    m = g.clone() if momentum == 0.0 else m.mul(momentum).add_(g, alpha=1.0 - momentum)
    theta = theta.add(m, alpha=-lr)
    momentum_buffer.copy_(m)
    param.copy_(theta)


def adam_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    max_exp_avg_sq: torch.Tensor | None,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    amsgrad: bool,
    maximize: bool,
    bias_correction: bool,
) -> None:
    r"""One Adam step for one tensor, in place on ``param`` and the moments.

    ``step`` is :math:`t`, counted from 1 for the first update.

    .. math::

        g &\leftarrow \pm\nabla_\theta J \;(+\lambda\theta \text{ if L2}),
            \qquad \theta \leftarrow (1-\alpha\lambda)\theta \text{ if decoupled} \\
        m &\leftarrow \beta_1 m + (1-\beta_1) g \\
        v &\leftarrow \beta_2 v + ((1-\beta_2)\, g) \odot g,
            \qquad \hat v \leftarrow \max(\hat v, v) \text{ if amsgrad} \\
        \theta &\leftarrow \theta - \frac{\alpha}{c_1}\,
            \frac{m}{\sqrt{v} / \sqrt{c_2} + \epsilon},
            \qquad (c_1, c_2) = \text{bias\_corrections}(\beta_1, \beta_2, t)

    :math:`m` is a lerp, as in ``torch.optim.Adam``; :math:`v` multiplies
    :math:`(1-\beta_2) g` by :math:`g` (torch's grouping), so a finite
    :math:`|g| \ge 1.85\cdot 10^{19}` does not overflow :math:`g^2` in float32.
    Where the denominator is exactly zero (``eps`` 0 in the compute dtype, and a
    coordinate whose gradient has always been 0) the step is zero.
    """
    adam_update(
        param,
        grad,
        exp_avg,
        exp_avg_sq,
        max_exp_avg_sq,
        correction=bias_corrections(beta1, beta2, step, bias_correction),
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        decoupled_weight_decay=decoupled_weight_decay,
        amsgrad=amsgrad,
        maximize=maximize,
    )


def adam_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    max_exp_avg_sq: torch.Tensor | None,
    *,
    correction: BiasCorrection,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    amsgrad: bool,
    maximize: bool,
    noise: torch.Tensor | None = None,
) -> None:
    r""":func:`adam_step` with its bias corrections already computed.

    ``noise``: None (moments rounded to nearest on store), or one int64 word
    per element for bfloat16 moments: its low 16 bits round :math:`m`, its
    high 16 bits :math:`v` (:func:`stochastic_round`); with amsgrad the running
    max keeps :math:`\max(v_\max, v_\text{stored})` while the step divides by
    :math:`\max(v_\max, v)`, as without it."""
    stored = (param, exp_avg, exp_avg_sq)
    stored += () if max_exp_avg_sq is None else (max_exp_avg_sq,)
    dtype = compute_dtype(*(t.dtype for t in stored))
    theta, m, v, *vmax = (t.to(dtype) for t in stored)
    g = grad.to(dtype)
    if maximize:
        g = -g
    if weight_decay != 0.0:
        if decoupled_weight_decay:
            theta = theta.mul(1.0 - lr * weight_decay)
        else:
            g = g.add(theta, alpha=weight_decay)
    m = m.lerp(g, 1.0 - beta1)
    v = v.mul(beta2).add_(g.mul(1.0 - beta2).mul_(g))
    used = v
    kept_m = kept_v = None
    if noise is not None:
        kept_m = stochastic_round(m, noise.view(m.shape))
        kept_v = stochastic_round(v, noise.view(v.shape) >> 16)
    if amsgrad:
        previous = vmax[0]
        used = torch.maximum(previous, v)
        vmax[0] = used if kept_v is None else torch.maximum(previous, kept_v.to(dtype))
    denom = (used.sqrt() / math.sqrt(correction.c2)).add_(eps)
    update = m / denom
    if adam_denominator_is_zero(eps, dtype):
        update = update.masked_fill_(denom == 0, 0.0)
    theta = theta.add(update, alpha=-lr / correction.c1)
    if kept_m is not None:
        m, v = kept_m, kept_v
    for target, value in zip(stored, (theta, m, v, *vmax), strict=True):
        target.copy_(value)
