r"""Inverted dropout as a function: :math:`h_\text{drop} = \gamma\, d \circ h`."""

from __future__ import annotations

import torch

from . import _checks, kernels


def dropout(
    input: torch.Tensor,
    p: float = 0.5,
    training: bool = True,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""Inverted dropout.

    .. math::
        h_\text{drop} = \gamma\, d \circ h, \qquad
        d_i \sim \text{Bernoulli}(1-p) \text{ i.i.d.}, \qquad
        \gamma = \frac{1}{1-p}

    so that :math:`E[h_\text{drop}] = h`. Units are dropped with probability
    ``p``, kept and scaled by :math:`\gamma` otherwise; the gradient flows
    through the same mask.

    * ``training=False`` or ``p=0``: the identity; no random numbers are drawn.
    * ``p=1``: all zeros (and zero gradient), with no division by zero.
    * ``generator``: the ``torch.Generator`` one 63-bit seed is drawn from; the
      mask is Philox4x32-10 of ``(seed, element index)``
      (:mod:`optiscope.kernels.philox`), so the same generator state gives the
      same mask on every device, and backward regenerates it instead of saving it.

    Dtype, shape and device of ``input`` are preserved.

    Example:
        >>> import torch
        >>> from optiscope.functional import dropout
        >>> y = dropout(torch.ones(4), p=0.5, generator=torch.Generator().manual_seed(0))
        >>> sorted(set(y.tolist())) in ([0.0, 2.0], [0.0], [2.0])
        True
    """
    return _dropout(input, p, training, generator)[0]


def draw_seed(generator: torch.Generator | None) -> int:
    """A seed in ``[0, 2^63 - 1)`` from ``generator`` (or torch's default one), so
    ``torch.manual_seed`` and ``generator=`` make the mask reproducible."""
    device = generator.device if generator is not None else "cpu"
    high = 2**63 - 1
    return int(torch.randint(high, (), generator=generator, device=device).item())


def _dropout(
    input: torch.Tensor, p: float, training: bool, generator: torch.Generator | None
) -> tuple[torch.Tensor, int | None]:
    """:func:`dropout`, and the Philox seed of its mask (None where none was drawn)."""
    _checks.floating_tensor("input", input)
    p = _checks.probability("p", p)
    training = _checks.flag("training", training)
    if not training or p == 0.0:
        return input, None
    if p == 1.0:
        zeros = torch.where(
            torch.zeros((), dtype=torch.bool, device=input.device), input, 0.0
        )
        return zeros, None
    seed = draw_seed(generator)
    return kernels.dropout_forward(input, p, seed, 0), seed
