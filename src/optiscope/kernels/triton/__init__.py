"""The Triton backend: Momentum, Adam and dropout on CUDA tensors, one pass over
memory.

The dispatcher (:mod:`optiscope.kernels.dispatch`) imports this package lazily,
for CUDA tensors, and calls the four functions below with the records of
:mod:`optiscope.kernels.records`. It has checked every tensor first
(:mod:`optiscope.kernels.gate`) and made each row contiguous, so nothing is
checked again here. Each kernel reads every element once and writes it once,
with the arithmetic of :func:`optiscope.rules.momentum_step` and
:func:`optiscope.rules.adam_step`, rounded as :mod:`.common` describes.

Launches: one per tensor (two with an Adam probe), and with a probe a few more
per call (the fold, the count, the copy). Rows on several GPUs are run device by
device.

Modules: :mod:`.common` (launch parameters, rounding, host scalars and
devices), :mod:`.momentum` and :mod:`.adam` (the update kernels and their
launches), :mod:`.probe_rows` (what a probe writes per program, folds per tensor
and bins), :mod:`.dropout` (Philox and the mask). The launch parameters
(``common.OPTIMIZER_BLOCK`` and the like) are read at each call, so they are
set on :mod:`.common`, not here. A kernel is interpreted or compiled as
``TRITON_INTERPRET`` was when it was decorated: to switch, reload
:mod:`.common`, :mod:`.probe_rows`, :mod:`.momentum`, :mod:`.adam` and
:mod:`.dropout` in that order (each imports only those before it), then this
package.
"""

from __future__ import annotations

from .adam import adam_
from .dropout import dropout_backward, dropout_forward
from .momentum import momentum_

__all__ = ["adam_", "dropout_backward", "dropout_forward", "momentum_"]
