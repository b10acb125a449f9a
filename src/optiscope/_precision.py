"""Low-precision parameters are updated in float32 and rounded once.

bfloat16 and float16 cannot hold the small differences an optimizer step
makes: ``1 - 0.999`` is not representable next to 1 in float16, and ``eps=1e-8``
underflows to 0, which is how a zero gradient turns into ``0/0 = NaN`` in
torch's for-loop Adam. Doing the arithmetic in float32 avoids both.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _LOW_PRECISION else dtype


@contextmanager
def compute_view(*tensors: torch.Tensor) -> Iterator[list[torch.Tensor]]:
    """Yield the tensors in the dtype the arithmetic runs in, and write them back.

    float32 and float64 tensors are yielded as themselves (updates stay in place);
    lower-precision ones as float32 copies, rounded back to their own dtype on exit.
    The compute dtype is the widest of the group, so a float32 parameter with
    bfloat16 state (``state_dtype``) still computes in float32.
    """
    dtype = max(
        (compute_dtype(t.dtype) for t in tensors), key=lambda d: torch.finfo(d).bits
    )
    views = [t if t.dtype == dtype else t.to(dtype) for t in tensors]
    yield views
    for original, view in zip(tensors, views, strict=True):
        if view is not original:
            original.copy_(view)
