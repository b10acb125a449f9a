"""The CPU kernels' arithmetic in NumPy: what a step runs while the kernels load.

numba needs about half a second of imports and setup before the first call of
a cached kernel, and seconds to compile one that is not cached yet
(:mod:`.loading`). Meanwhile a plain step (no probe; float32 or float64
throughout) is computed here, operation for operation as
:func:`optiscope.kernels.cpu.adam.adam_element` and
:func:`optiscope.kernels.cpu.momentum.momentum_element` do it: each NumPy ufunc on
a float32 or float64 array is one correctly rounded IEEE operation, and
numba does not fuse the kernel's multiplies and adds, so every value is
bitwise the kernel's (NaN stays NaN; its payload bits may differ). A step
therefore gives the same result whichever of the two runs it, and a run does
not depend on when the kernel became ready. ``tests/test_loading.py`` holds
the two to that, option by option.

torch's own ops are not used: its ``lerp`` and ``add(alpha=)`` fuse a
multiply into the add, and its float32 ``sqrt`` of a large tensor is not
correctly rounded.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .records import AdamBatch, AdamHyper, MomentumBatch, MomentumHyper

#: The dtypes this path takes: those whose storage is the compute dtype.
DTYPES = (torch.float32, torch.float64)
#: The most parameter elements of a step this path takes. An Adam step here
#: costs about 6 ns an element (1 thread, this project's 2-core machine; the
#: kernel about 1.2), and loading a kernel from numba's cache about 0.5 s in
#: all: beyond this many elements, waiting for the kernel is sooner.
MAX_ELEMENTS = 1 << 26
#: Elements per slice: the temporaries of a slice stay in cache (the rule is
#: elementwise, so slicing changes no value).
_SLICE = 1 << 15


def takes(columns: Sequence[Sequence[torch.Tensor]]) -> bool:
    """Whether every tensor of ``columns`` is float32, or every one float64, and
    the parameters (``columns[0]``) have at most :data:`MAX_ELEMENTS` in all."""
    dtypes = {t.dtype for column in columns for t in column}
    if len(dtypes) != 1 or not dtypes <= set(DTYPES):
        return False
    return sum(t.numel() for t in columns[0]) <= MAX_ELEMENTS


def _slices(*arrays: np.ndarray | None):
    """The arrays (1-d, one length; None stays None) cut into :data:`_SLICE`
    elements at a time."""
    size = arrays[0].size
    for start in range(0, size, _SLICE):
        yield [None if a is None else a[start : start + _SLICE] for a in arrays]


def momentum_(batch: MomentumBatch, hyper: MomentumHyper) -> None:
    """:func:`optiscope.rules.momentum_step` on every row of ``batch``, in place,
    with the CPU kernel's rounding. The caller guarantees :func:`takes`,
    contiguous CPU tensors, and what the gate checks."""
    for row in zip(*batch, strict=True):
        arrays = [t.detach().numpy().reshape(-1) for t in row]
        for theta, grad, buffer in _slices(*arrays):
            _momentum_slice(theta, grad, buffer, hyper)


def _momentum_slice(theta, grad, buffer, hyper: MomentumHyper) -> None:
    # The rule's scalars rounded once to the compute dtype, as cpu.momentum_ does.
    c = theta.dtype.type
    lr, beta, weight = c(hyper.lr), c(hyper.momentum), c(1.0 - hyper.momentum)
    sign, decay = c(-1.0 if hyper.maximize else 1.0), c(hyper.weight_decay)
    with np.errstate(all="ignore"):
        g = sign * grad
        if decay != 0:
            g = g + decay * theta
        m = weight * g if beta == 0 else beta * buffer + weight * g
        buffer[...] = m
        theta[...] = theta - lr * m


def adam_(batch: AdamBatch, hyper: AdamHyper) -> None:
    """:func:`optiscope.rules.adam_step` on every row of ``batch``, in place, with
    the CPU kernel's rounding. The caller guarantees :func:`takes`, contiguous
    CPU tensors, and what the gate checks."""
    for i, (c1, c2) in enumerate(batch.corrections):
        columns = [*batch[:4], batch.max_exp_avg_sqs if hyper.amsgrad else None]
        arrays = [
            None if c is None else c[i].detach().numpy().reshape(-1) for c in columns
        ]
        for theta, grad, m_, v_, vmax_ in _slices(*arrays):
            _adam_slice(theta, grad, m_, v_, vmax_, hyper, c1, c2)


def _adam_slice(theta, grad, m_, v_, vmax_, hyper: AdamHyper, c1: float, c2: float):
    # The rule's scalars rounded once to the compute dtype, as cpu.adam_ does.
    c = theta.dtype.type
    decoupled = hyper.decoupled_weight_decay
    sign = c(-1.0 if hyper.maximize else 1.0)
    weight1, beta2, weight2 = c(1.0 - hyper.beta1), c(hyper.beta2), c(1.0 - hyper.beta2)
    l2 = c(0.0 if decoupled else hyper.weight_decay)
    decay = c(1.0 - hyper.lr * hyper.weight_decay if decoupled else 1.0)
    step_size, sqrt_bias2 = c(hyper.lr / c1), c(np.sqrt(c2))
    with np.errstate(all="ignore"):
        th = theta * decay
        g = sign * grad
        if l2 != 0:
            g = g + l2 * th
        m = _lerp(m_, g, weight1, c(1.0))
        v = v_ * beta2 + (weight2 * g) * g
        m_[...] = m
        v_[...] = v
        if vmax_ is not None:  # the kernel's max: NaN in v wins
            v = np.where((v > vmax_) | (v != v), v, vmax_)
            vmax_[...] = v
        denom = np.sqrt(v) / sqrt_bias2 + c(hyper.eps)
        update = np.where(denom == 0, c(0.0), m / denom)
        theta[...] = th - step_size * update


def _lerp(a, b, weight, one):
    """:func:`~optiscope.kernels.cpu.bits.lerp`: ``a + w(b-a)`` for ``w < 0.5``,
    else ``b - (b-a)(1-w)``."""
    if weight < 0.5:
        return a + weight * (b - a)
    return b - (b - a) * (one - weight)
