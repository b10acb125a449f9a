r"""numba kernels for dropout on the CPU: Philox4x32-10 words, generated in SIMD lanes.

The stream is the one of :mod:`optiscope.kernels.philox`, bit for bit. Two things
make the generator fast without changing a bit of it:

* **One counter per SIMD lane.** The loop over Philox blocks is the innermost
  loop, and the 10 rounds inside it have a constant trip count, so LLVM unrolls
  them and vectorizes over blocks: each 64-bit lane holds one 32-bit word, and
  every ``a * b`` of two words below ``2^32`` becomes one ``vpmuludq``
  (32×32→64 bits), whose high and low halves are the Philox ``mulhi``/``mullo``.
* **Masking in the same loop.** Block ``b`` covers elements ``4b .. 4b+3``, so
  the loop that makes its four words also writes those four outputs; the words
  never touch memory.

Chunking is :mod:`optiscope.kernels.cpu`'s: fixed ``CHUNK``-element chunks under
``prange``, so results are bitwise identical across thread counts.
"""

from __future__ import annotations

import types as pytypes

import numba
import numpy as np
from numba import prange

from .cpu import _JIT, CHUNK, _load, _store

_M0 = np.uint64(0xD2511F53)
_M1 = np.uint64(0xCD9E8D57)
_W0 = np.uint64(0x9E3779B9)
_W1 = np.uint64(0xBB67AE85)
_LOW32 = np.uint64(0xFFFFFFFF)
_U32 = np.uint64(32)
_ROUNDS = 10


@numba.njit(inline="always", **_JIT)
def _philox(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on one counter, words held in uint64 below ``2^32``.

    The masks below change no value; they let LLVM prove that both factors of
    every product are below ``2^32``, which is what it needs to use ``vpmuludq``.
    """
    c0, c1, c2, c3 = c0 & _LOW32, c1 & _LOW32, c2 & _LOW32, c3 & _LOW32
    k0, k1 = k0 & _LOW32, k1 & _LOW32
    for _ in range(_ROUNDS):
        prod0 = _M0 * c0
        prod1 = _M1 * c2
        c0, c1, c2, c3 = (
            (prod1 >> _U32) ^ c1 ^ k0,
            prod1 & _LOW32,
            (prod0 >> _U32) ^ c3 ^ k1,
            prod0 & _LOW32,
        )
        k0 = (k0 + _W0) & _LOW32
        k1 = (k1 + _W1) & _LOW32
    return c0, c1, c2, c3


@numba.njit(inline="always", **_JIT)
def _block_words(block, c2, c3, k0, k1):
    """The four words of Philox block ``block`` (uint64) of the stream."""
    return _philox(block & _LOW32, block >> _U32, c2, c3, k0, k1)


@numba.njit(**_JIT)
def _mask_blocks(x, out, first_block, cut, gamma, c2, c3, k0, k1):
    """Whole blocks: ``x`` and ``out`` are views of ``4 * blocks`` elements from
    element ``4 * first_block`` (uint64) on. Indices are ``4b + j`` with ``b`` from
    a ``range``: provably non-negative, so numba adds no wraparound branch and
    LLVM sees consecutive accesses."""
    scale = gamma[0]
    zero = scale - scale
    for b in range(x.size // 4):
        r0, r1, r2, r3 = _block_words(first_block + np.uint64(b), c2, c3, k0, k1)
        i = 4 * b
        y0 = _load(x, i, gamma) * scale  # loaded either way: no branch to vectorize
        y1 = _load(x, i + 1, gamma) * scale
        y2 = _load(x, i + 2, gamma) * scale
        y3 = _load(x, i + 3, gamma) * scale
        _store(out, i, y0 if r0 >= cut else zero)
        _store(out, i + 1, y1 if r1 >= cut else zero)
        _store(out, i + 2, y2 if r2 >= cut else zero)
        _store(out, i + 3, y3 if r3 >= cut else zero)


@numba.njit(**_JIT)
def _mask_tail(x, out, block, cut, gamma, c2, c3, k0, k1):
    """The first ``x.size < 4`` elements of Philox block ``block`` (uint64)."""
    scale = gamma[0]
    zero = scale - scale
    words = _block_words(block, c2, c3, k0, k1)
    for j in range(x.size):
        keep = words[j] >= cut
        _store(out, j, _load(x, j, gamma) * scale if keep else zero)


@numba.njit(parallel=True, **_JIT)
def dropout_kernel(x, out, cut, gamma, seed, offset):
    """``out_i = x_i * gamma`` where Philox word ``r_i >= cut``, else 0.

    ``gamma`` is a one-element array in the compute dtype; ``seed`` and ``offset``
    are uint64, as in :mod:`optiscope.kernels.philox`. No mask is stored.
    """
    n = x.size
    k0, k1 = seed & _LOW32, seed >> _U32
    c2, c3 = offset & _LOW32, offset >> _U32
    cut64 = np.uint64(cut)
    for c in prange((n + CHUNK - 1) // CHUNK):
        start = c * CHUNK  # CHUNK is a multiple of 4: chunks start on a block
        stop = min(start + CHUNK, n)
        tail = stop - (stop - start) % 4
        block = np.uint64(start // 4)
        xs, outs = x[start:tail], out[start:tail]
        _mask_blocks(xs, outs, block, cut64, gamma, c2, c3, k0, k1)
        if tail < stop:
            block = np.uint64(tail // 4)
            xs, outs = x[tail:stop], out[tail:stop]
            _mask_tail(xs, outs, block, cut64, gamma, c2, c3, k0, k1)


@numba.njit(**_JIT)
def _count_blocks(first_block, blocks, cut, c2, c3, k0, k1):
    """How many of the ``4 * blocks`` words from ``first_block`` on are ``>= cut``."""
    kept = 0
    for b in range(blocks):
        r0, r1, r2, r3 = _block_words(first_block + np.uint64(b), c2, c3, k0, k1)
        kept += (r0 >= cut) + (r1 >= cut) + (r2 >= cut) + (r3 >= cut)
    return kept


@numba.njit(parallel=True, **_JIT)
def count_kernel(numel, cut, seed, offset):
    """The number of ``i < numel`` whose Philox word ``r_i >= cut``; reads no memory.

    Counts per fixed chunk, then sums the chunks in order: the same total for any
    thread count.
    """
    k0, k1 = seed & _LOW32, seed >> _U32
    c2, c3 = offset & _LOW32, offset >> _U32
    cut64 = np.uint64(cut)
    chunks = (numel + CHUNK - 1) // CHUNK
    kept = np.zeros(chunks, np.int64)
    for c in prange(chunks):
        start = c * CHUNK
        stop = min(start + CHUNK, numel)
        blocks = (stop - start) // 4
        kept[c] = _count_blocks(np.uint64(start >> 2), blocks, cut64, c2, c3, k0, k1)
        tail = start + 4 * blocks
        if tail < stop:
            words = _block_words(np.uint64(tail >> 2), c2, c3, k0, k1)
            for j in range(stop - tail):
                kept[c] += words[j] >= cut64
    return kept.sum()


def _serial_twin(
    kernel: numba.core.registry.CPUDispatcher,
) -> numba.core.registry.CPUDispatcher:
    """The same kernel compiled without threads (``prange`` runs as ``range``).

    Small tensors take it: waking a thread pool costs more than the work, and
    much more when torch's own OpenMP threads are still spinning on the cores.
    It has its own name, so the two never share a cache entry.
    """
    source = kernel.py_func
    twin = pytypes.FunctionType(
        source.__code__, source.__globals__, f"{source.__name__}_serial"
    )
    twin.__qualname__ = f"{source.__qualname__}_serial"
    twin.__doc__ = source.__doc__
    return numba.njit(**_JIT)(twin)


dropout_kernel_serial = _serial_twin(dropout_kernel)
count_kernel_serial = _serial_twin(count_kernel)
