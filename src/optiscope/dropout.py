"""``optiscope.Dropout``: the module form of :func:`optiscope.functional.dropout`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from . import _checks, kernels
from .functional import _dropout

if TYPE_CHECKING:
    from .probes import DropoutProbe


class Dropout(nn.Module):
    r"""Inverted dropout, :math:`h_\text{drop} = \frac{1}{1-p}\, d \circ h`, in training only.

    In ``.train()`` mode each unit is zeroed with probability ``p`` and the kept
    ones are scaled by :math:`1/(1-p)`, so the expected activation is unchanged.
    In ``.eval()`` mode it is the identity and draws no random numbers: the
    trained network is evaluated as the average of its thinned sub-networks
    (weight scaling), deterministically.

    A drop-in for ``torch.nn.Dropout(p, inplace)``: ``inplace=True`` overwrites
    the input, and the output keeps the input's strides and memory format. The
    mask is Philox of ``(seed, i)``, ``i`` the element's row-major index, with
    one seed drawn per call from ``generator`` (or torch's default generator);
    see :func:`optiscope.functional.dropout`.

    Example:
        >>> import torch, optiscope
        >>> layer = optiscope.Dropout(p=0.5).eval()
        >>> torch.equal(layer(torch.ones(3)), torch.ones(3))
        True
        >>> layer
        Dropout(p=0.5, inplace=False)
    """

    #: How :func:`optiscope.probe` recognises a layer it can probe, without
    #: importing this class (probes sit below the layers in the package).
    probe_kind = "dropout"

    def __init__(
        self,
        p: float = 0.5,
        inplace: bool = False,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.p = _checks.probability("p", p)
        self.inplace = _checks.flag("inplace", inplace)
        self.generator = generator
        self._probe: DropoutProbe | None = None  # set by optiscope.probe(module)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        output, seed = _dropout(
            input, self.p, self.training, self.generator, self.inplace
        )
        probe = self._probe
        if probe is not None:
            probe.check_mode(self)
            if self.training:
                numel = input.numel()
                probe.observe(self, self._kept(numel, seed), numel)
        return output

    def _kept(self, numel: int, seed: torch.Tensor | None) -> int:
        """Units the last mask kept, recounted from its seed (no mask is stored)."""
        if seed is None:  # p = 0 keeps all, p = 1 none
            return numel if self.p == 0.0 else 0
        return kernels.count_kept(numel, self.p, int(seed), 0)

    def extra_repr(self) -> str:
        return f"p={self.p}, inplace={self.inplace}"
