"""Philox4x32-10 words in numba, bit for bit the stream of
:mod:`optiscope.kernels.philox`: dropout's mask and Adam's stochastic rounding
draw from it."""

from __future__ import annotations

import numba
import numpy as np

from .. import philox
from .jit import JIT

_M0 = np.uint64(philox.PHILOX_M0)
_M1 = np.uint64(philox.PHILOX_M1)
_W0 = np.uint64(philox.PHILOX_W0)
_W1 = np.uint64(philox.PHILOX_W1)
_ROUNDS = philox.ROUNDS
LOW32 = np.uint64(0xFFFFFFFF)
U32 = np.uint64(32)


@numba.njit(inline="always", **JIT)
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on one counter, words held in uint64 below ``2^32``.

    The masks change no value; they let LLVM prove that both factors of every
    product are below ``2^32``, which it needs to use ``vpmuludq``.
    """
    c0, c1, c2, c3 = c0 & LOW32, c1 & LOW32, c2 & LOW32, c3 & LOW32
    k0, k1 = k0 & LOW32, k1 & LOW32
    for _ in range(_ROUNDS):
        prod0 = _M0 * c0
        prod1 = _M1 * c2
        c0, c1, c2, c3 = (
            (prod1 >> U32) ^ c1 ^ k0,
            prod1 & LOW32,
            (prod0 >> U32) ^ c3 ^ k1,
            prod0 & LOW32,
        )
        k0 = (k0 + _W0) & LOW32
        k1 = (k1 + _W1) & LOW32
    return c0, c1, c2, c3


@numba.njit(inline="always", **JIT)
def block_words(block, c2, c3, k0, k1):
    """The four words of Philox block ``block`` (uint64) of the stream."""
    return philox4x32_10(block & LOW32, block >> U32, c2, c3, k0, k1)
