r"""Inverted dropout as a function: :math:`h_\text{drop} = \gamma\, d \circ h`."""

from __future__ import annotations

import torch

from . import _checks, kernels

#: Seeds are drawn uniformly from ``[0, SEED_HIGH)``: every 63-bit Philox key.
SEED_HIGH = 2**63 - 1


def dropout(
    input: torch.Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""Inverted dropout.

    .. math::
        h_\text{drop} = \gamma\, d \circ h, \qquad
        d_i \sim \text{Bernoulli}(1-p) \text{ i.i.d.}, \qquad
        \gamma = \frac{1}{1-p}

    so that :math:`E[h_\text{drop}] = h`. Units are dropped with probability
    ``p``, kept and scaled by :math:`\gamma` otherwise; the gradient
    (:math:`\gamma\, d \circ g`) and the forward-mode tangent
    (:math:`\gamma\, d \circ t`) go through the same mask.

    * ``training=False`` or ``p=0``: the identity; no random numbers are drawn.
    * ``p=1``: all zeros (and zero gradient), with no division by zero.
    * ``inplace=True``: ``input`` is overwritten and returned, as with
      ``torch.nn.functional.dropout``; autograd still saves nothing.
    * ``generator``: the ``torch.Generator`` one 63-bit seed is drawn from, as a
      one-element int64 tensor (never a Python int, so ``torch.compile`` does
      not specialize on it); the mask is Philox4x32-10 of ``(seed, i)`` with
      ``i`` the element's index in row-major (logical) order
      (:mod:`optiscope.kernels.philox`), so the same generator state gives the
      same mask on every device and for every memory layout of ``input``, and
      backward regenerates it instead of saving it.
    * Under ``torch.func.vmap``, ``randomness="different"`` draws one seed per
      sample, ``"same"`` one seed for all (each sample's mask indexed by its own
      elements), and ``"error"`` raises, as for ``torch.nn.functional.dropout``.

    Dtype, shape, device and strides (``channels_last`` included) of ``input``
    are preserved.

    Example:
        >>> import torch
        >>> from optiscope.functional import dropout
        >>> y = dropout(torch.ones(4), p=0.5, generator=torch.Generator().manual_seed(0))
        >>> sorted(set(y.tolist())) in ([0.0, 2.0], [0.0], [2.0])
        True
    """
    return _dropout(input, p, training, generator, inplace)[0]


def draw_seed(generator: torch.Generator | None) -> torch.Tensor:
    """A seed in ``[0, 2^63 - 1)`` from ``generator`` (or torch's default one), as a
    0-d int64 tensor on the generator's device, so ``torch.manual_seed`` and
    ``generator=`` make the mask reproducible. It is never read into Python
    here: under ``torch.compile`` the draw is part of the graph (a fresh seed
    each call, no recompilation), and under ``vmap`` it follows ``randomness``."""
    device = generator.device if generator is not None else "cpu"
    return torch.randint(SEED_HIGH, (), generator=generator, device=device)


def _dropout(
    input: torch.Tensor,
    p: float,
    training: bool,
    generator: torch.Generator | None,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`dropout`, and the Philox seed of its mask (None where none was drawn)."""
    _checks.floating_tensor("input", input)
    p = _checks.probability("p", p)
    training = _checks.flag("training", training)
    inplace = _checks.flag("inplace", inplace)
    if not training or p == 0.0:
        return input, None
    if p == 1.0:
        # where, not a multiply by 0: inf and NaN inputs become 0 as well.
        zeros = torch.where(
            torch.zeros((), dtype=torch.bool, device=input.device), input, 0.0
        )
        return (input.copy_(zeros) if inplace else zeros), None
    seed = draw_seed(generator)
    return kernels.dropout_forward(input, p, seed, 0, inplace=inplace), seed
