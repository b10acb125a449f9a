"""``optiscope.Dropout``: the module form of :func:`optiscope.functional.dropout`."""

from __future__ import annotations

import torch
from torch import nn

from . import _checks
from .functional import dropout


class Dropout(nn.Module):
    r"""Inverted dropout, :math:`h_\text{drop} = \frac{1}{1-p}\, d \circ h`, in training only.

    In ``.train()`` mode each unit is zeroed with probability ``p`` and the kept
    ones are scaled by :math:`1/(1-p)`, so the expected activation is unchanged.
    In ``.eval()`` mode it is the identity and draws no random numbers: the
    trained network is evaluated as the average of its thinned sub-networks
    (weight scaling), deterministically.

    Example:
        >>> import torch, optiscope
        >>> layer = optiscope.Dropout(p=0.5).eval()
        >>> torch.equal(layer(torch.ones(3)), torch.ones(3))
        True
    """

    def __init__(
        self, p: float = 0.5, *, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        self.p = _checks.probability("p", p)
        self.generator = generator

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return dropout(input, self.p, self.training, generator=self.generator)

    def extra_repr(self) -> str:
        return f"p={self.p}"
