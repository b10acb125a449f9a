r"""Philox4x32-10 (Salmon et al., SC'11): the one counter-based RNG behind every dropout mask.

Every backend (NumPy here, numba on CPU, Triton on GPU) computes the same
function of ``(seed, offset, element index)``, so a seed gives the same mask bit
for bit on every device, and backward can regenerate the mask instead of saving it.

The stream, for the ``i``-th element of a contiguous tensor (row-major):

* key  ``(k0, k1) = (seed mod 2^32, seed >> 32)``, ``0 <= seed < 2^63``;
* counter ``(i >> 2 mod 2^32, i >> 34, offset mod 2^32, offset >> 32)``;
* ``r_i`` = word ``i & 3`` of ``Philox4x32_10(counter, key)``;
* element ``i`` is kept iff ``r_i >= threshold(p)`` with
  ``threshold(p) = floor(p * 2^32)``, so ``P(keep) = 1 - threshold/2^32``, within
  ``2^-32`` of ``1 - p``. ``p = 1`` never reaches a kernel (the output is zero).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9  # golden ratio
PHILOX_W1 = 0xBB67AE85  # sqrt(3) - 1
ROUNDS = 10

_MASK32 = np.uint64(0xFFFFFFFF)


def threshold(p: float) -> int:
    """The 32-bit cut below which a draw drops its element, for ``0 <= p < 1``."""
    return int(p * 2.0**32)


def philox4x32(counter: NDArray[np.uint32], key: tuple[int, int]) -> NDArray[np.uint32]:
    """Philox4x32-10 on counters of shape ``(n, 4)``; returns ``(n, 4)`` uint32 words."""
    c = [counter[:, j].astype(np.uint64) for j in range(4)]
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    for _ in range(ROUNDS):
        prod0 = np.uint64(PHILOX_M0) * c[0]
        prod1 = np.uint64(PHILOX_M1) * c[2]
        hi0, lo0 = prod0 >> np.uint64(32), prod0 & _MASK32
        hi1, lo1 = prod1 >> np.uint64(32), prod1 & _MASK32
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
        k0 = (k0 + np.uint64(PHILOX_W0)) & _MASK32
        k1 = (k1 + np.uint64(PHILOX_W1)) & _MASK32
    return np.stack(c, axis=1).astype(np.uint32)


def random_words(numel: int, seed: int, offset: int = 0) -> NDArray[np.uint32]:
    """``r_i`` for ``i < numel``: the reference stream every backend must reproduce."""
    blocks = np.arange((numel + 3) // 4, dtype=np.uint64)
    counter = np.empty((blocks.size, 4), dtype=np.uint32)
    counter[:, 0] = blocks & _MASK32
    counter[:, 1] = blocks >> np.uint64(32)
    counter[:, 2] = offset & 0xFFFFFFFF
    counter[:, 3] = offset >> 32
    key = (seed & 0xFFFFFFFF, seed >> 32)
    return philox4x32(counter, key).reshape(-1)[:numel]


def keep_mask(numel: int, p: float, seed: int, offset: int = 0) -> NDArray[np.bool_]:
    """The keep mask ``d`` of a contiguous tensor of ``numel`` elements."""
    return random_words(numel, seed, offset) >= np.uint32(threshold(p))
