r"""Dropout on the CPU: Philox4x32-10 words generated in SIMD lanes, never stored.

The stream is the one of :mod:`optiscope.kernels.philox`, bit for bit. Two
things make the generator fast without changing a bit of it:

* **One counter per SIMD lane.** The loop over Philox blocks is the innermost
  loop, and the 10 rounds inside it have a constant trip count, so LLVM unrolls
  them and vectorizes over blocks: each 64-bit lane holds one 32-bit word, and
  every ``a * b`` of two words below ``2^32`` becomes one ``vpmuludq``
  (32×32→64 bits), whose high and low halves are the Philox ``mulhi``/``mullo``.
* **Masking in the same loop.** Block ``b`` covers elements ``4b .. 4b+3``, so
  the loop that makes its four words also writes those four outputs.

Chunks are the fixed ``CHUNK``-element chunks of :mod:`.threads`, claimed by
the threads of torch's OpenMP team as the optimizer kernels' are, so results
are bitwise identical across thread counts.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import numba
import numpy as np
import torch

from ... import rules
from .. import philox
from .bits import load, store
from .jit import JIT
from .philox_words import LOW32 as _LOW32
from .philox_words import U32 as _U32
from .philox_words import block_words
from .threads import CHUNK, chunk_table, claim, run


# -- kernels ---------------------------------------------------------------------------
@numba.njit(inline="always", **JIT)
def _mask_four(x, out, i, words, cut, scale):
    """Elements ``i .. i+3`` of ``out``: ``x * scale`` where the block's word is
    ``>= cut``, else 0; each element is read before it is written."""
    r0, r1, r2, r3 = words
    nothing = scale - scale
    y0 = load(x, i, scale) * scale  # loaded either way: no branch to vectorize
    y1 = load(x, i + 1, scale) * scale
    y2 = load(x, i + 2, scale) * scale
    y3 = load(x, i + 3, scale) * scale
    store(out, i, y0 if r0 >= cut else nothing)
    store(out, i + 1, y1 if r1 >= cut else nothing)
    store(out, i + 2, y2 if r2 >= cut else nothing)
    store(out, i + 3, y3 if r3 >= cut else nothing)


@numba.njit(**JIT)
def _mask_blocks(x, out, first_block, cut, scale, c2, c3, k0, k1):
    """Whole blocks: ``x`` and ``out`` are views of ``4 * blocks`` elements from
    element ``4 * first_block`` (uint64) on. Indices are ``4b + j`` with ``b`` from
    a ``range``: provably non-negative, so numba adds no wraparound branch and
    LLVM sees consecutive accesses."""
    for b in range(x.size // 4):
        words = block_words(first_block + np.uint64(b), c2, c3, k0, k1)
        _mask_four(x, out, 4 * b, words, cut, scale)


@numba.njit(**JIT)
def _mask_blocks_inplace(x, first_block, cut, scale, c2, c3, k0, k1):
    """:func:`_mask_blocks` written over ``x``. Not ``_mask_blocks(x, x)``: of
    two arrays LLVM vectorizes only behind a run-time check that they do not
    overlap, which ``x`` over itself fails, and the scalar loop is ~4x slower."""
    for b in range(x.size // 4):
        words = block_words(first_block + np.uint64(b), c2, c3, k0, k1)
        _mask_four(x, x, 4 * b, words, cut, scale)


@numba.njit(**JIT)
def _mask_tail(x, out, block, cut, scale, c2, c3, k0, k1):
    """The first ``x.size < 4`` elements of Philox block ``block`` (uint64)."""
    nothing = scale - scale
    words = block_words(block, c2, c3, k0, k1)
    for j in range(x.size):
        keep = words[j] >= cut
        store(out, j, load(x, j, scale) * scale if keep else nothing)


@numba.njit(**JIT)
def dropout_kernel(chunks, x, out, cut, scale, seed, offset, inplace):
    """``out_i = x_i * scale`` where Philox word ``r_i >= cut``, else 0, on the
    chunks this thread claims (:func:`~.threads.run`).

    ``scale`` is γ in the compute dtype; ``seed`` and ``offset`` are uint64, as
    in :mod:`optiscope.kernels.philox`. ``inplace``: ``out`` is ``x`` itself.
    """
    n = x.size
    k0, k1 = seed & _LOW32, seed >> _U32
    c2, c3 = offset & _LOW32, offset >> _U32
    cut64 = np.uint64(cut)
    while True:
        c = claim(chunks.taken)
        if c >= chunks.start.size:
            return
        start = chunks.start[c]  # CHUNK is a multiple of 4: chunks start on a block
        stop = min(start + CHUNK, n)
        tail = stop - (stop - start) % 4
        block = np.uint64(start // 4)
        xs, outs = x[start:tail], out[start:tail]
        if inplace:
            _mask_blocks_inplace(xs, block, cut64, scale, c2, c3, k0, k1)
        else:
            _mask_blocks(xs, outs, block, cut64, scale, c2, c3, k0, k1)
        if tail < stop:
            block = np.uint64(tail // 4)
            xs, outs = x[tail:stop], out[tail:stop]
            _mask_tail(xs, outs, block, cut64, scale, c2, c3, k0, k1)


@numba.njit(**JIT)
def _count_blocks(first_block, blocks, cut, c2, c3, k0, k1):
    """How many of the ``4 * blocks`` words from ``first_block`` on are ``>= cut``."""
    kept = 0
    for b in range(blocks):
        r0, r1, r2, r3 = block_words(first_block + np.uint64(b), c2, c3, k0, k1)
        kept += (r0 >= cut) + (r1 >= cut) + (r2 >= cut) + (r3 >= cut)
    return kept


@numba.njit(**JIT)
def count_kernel(chunks, numel, cut, seed, offset, kept):
    """``kept[c]``: how many ``i`` of chunk ``c`` have Philox word ``r_i >= cut``,
    for the chunks this thread claims; reads no tensor."""
    k0, k1 = seed & _LOW32, seed >> _U32
    c2, c3 = offset & _LOW32, offset >> _U32
    cut64 = np.uint64(cut)
    while True:
        c = claim(chunks.taken)
        if c >= chunks.start.size:
            return
        start = chunks.start[c]
        stop = min(start + CHUNK, numel)
        blocks = (stop - start) // 4
        kept[c] = _count_blocks(np.uint64(start >> 2), blocks, cut64, c2, c3, k0, k1)
        tail = start + 4 * blocks
        if tail < stop:
            words = block_words(np.uint64(tail >> 2), c2, c3, k0, k1)
            for j in range(stop - tail):
                kept[c] += words[j] >= cut64


# -- host wrappers ---------------------------------------------------------------------
_BITS = {torch.bfloat16: torch.uint16, torch.float16: torch.int16}


def dropout_forward(
    x: torch.Tensor,
    p: float,
    seed: int,
    offset: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""``x * γ`` where the Philox word of element ``i`` keeps it, else 0: ``x`` a
    contiguous CPU float tensor, ``0 < p < 1``, ``0 <= seed < 2^63``.
    :math:`\gamma = 1/(1-p)` is rounded to the compute dtype, as ``x * gamma``
    does in torch. Written into ``out`` if given (``x`` itself: each element is
    read before its own slot is written), else into a new tensor."""
    if out is None:
        out = torch.empty_like(x)
        _prefer_huge_pages(out)
    bits = _BITS.get(x.dtype, x.dtype)
    wide = rules.compute_dtype(x.dtype) == torch.float64
    scale = (np.float64 if wide else np.float32)(1.0 / (1.0 - p))
    run(
        dropout_kernel,
        chunk_table(np.array([x.numel()], np.int64)),
        x.view(bits).reshape(-1).numpy(),
        out.view(bits).reshape(-1).numpy(),
        philox.threshold(p),
        scale,
        np.uint64(seed),
        np.uint64(offset),
        out is x,
    )
    return out


def count_kept(numel: int, p: float, seed: int, offset: int) -> int:
    """How many of ``numel`` elements the mask of :func:`dropout_forward` keeps,
    generated without reading or writing a tensor: ``0 <= p <= 1``."""
    if p == 1.0 or numel == 0:
        return 0  # the threshold 2^32 does not fit a word; nothing is kept
    chunks = chunk_table(np.array([numel], np.int64))
    kept = np.zeros(chunks.start.size, np.int64)
    run(
        count_kernel,
        chunks,
        numel,
        philox.threshold(p),
        np.uint64(seed),
        np.uint64(offset),
        kept,
    )
    return int(kept.sum())


_HUGE_PAGE = 1 << 21
_MADV_HUGEPAGE = 14


@functools.cache
def _madvise() -> Any | None:
    """libc's ``madvise``, or None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise


def _prefer_huge_pages(t: torch.Tensor) -> None:
    """Ask Linux for 2 MiB pages under a fresh, untouched output: faulting a
    64 MiB output in 4 KiB pages costs as much as the dropout itself, and
    ``MADV_HUGEPAGE`` (honoured where transparent huge pages are ``madvise`` or
    ``always``) makes it 32 faults. Only advice: a refusal is ignored."""
    first = -(-t.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
    stop = (t.data_ptr() + t.numel() * t.element_size()) // _HUGE_PAGE * _HUGE_PAGE
    madvise = _madvise() if stop - first >= 2 * _HUGE_PAGE else None
    if madvise is not None:
        madvise(first, stop - first, _MADV_HUGEPAGE)
