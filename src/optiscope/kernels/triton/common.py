"""What every Triton kernel of the backend shares: launch parameters, the
rounding helpers, and the host's scalars and devices.

The arithmetic follows :func:`optiscope.rules.momentum_step`,
:func:`optiscope.rules.adam_step` and torch:

* bfloat16 and float16 tensors are computed in float32 and rounded once on
  store (:func:`round_to`); the compute dtype is float64 if the parameter or a
  state of its row is float64, else float32 (:func:`computes_in_fp64`, after
  :func:`optiscope.rules.compute_dtype`);
* every multiply and add rounds on its own: kernels are launched with
  ``enable_fp_fusion=False``;
* host scalars travel as the int64 bits of their float64 (:func:`to_bits`) and are
  rounded to the compute dtype inside the kernel (:func:`f64`), which is what
  torch does to a Python scalar.

Indices are int64 throughout, so tensors of more than :math:`2^{31}` elements
are addressed correctly. Rows on several GPUs are run device by device
(:func:`by_device`, :func:`on`).
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterator

import torch
import triton
import triton.language as tl

from ... import rules
from ..philox import PHILOX_M0, PHILOX_M1, PHILOX_W0, PHILOX_W1, ROUNDS

# Elements per program for the optimizer kernels, counters per program for
# dropout (4 elements each). Module attributes, read at each call, so a
# benchmark or a test can try others by setting them here.
OPTIMIZER_BLOCK = 2048
OPTIMIZER_WARPS = 8
DROPOUT_COUNTERS = 512
DROPOUT_WARPS = 8
HIST_LANES = 1024  # histogram samples per program
FOLD_ROWS = 64  # program rows a fold step adds at once


# --- device helpers ----------------------------------------------------------

# The Philox constants, as compile-time constants the kernels can read.
_M0 = tl.constexpr(PHILOX_M0)
_M1 = tl.constexpr(PHILOX_M1)
_W0 = tl.constexpr(PHILOX_W0)
_W1 = tl.constexpr(PHILOX_W1)
_ROUNDS = tl.constexpr(ROUNDS)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 counter words ``c0..c3`` and key ``(k0, k1)``:
    dropout's mask and Adam's stochastic rounding draw from it."""
    for _ in tl.static_range(_ROUNDS):
        hi0 = tl.umulhi(c0, _M0)
        lo0 = c0 * _M0
        hi1 = tl.umulhi(c2, _M1)
        lo1 = c2 * _M1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + _W0
        k1 = k1 + _W1
    return c0, c1, c2, c3


@triton.jit
def f64(bits, dtype: tl.constexpr):
    # A host float travels as the int64 bits of its float64 (see to_bits), so it
    # arrives exact under the compiler and the interpreter alike; rounding it
    # to the compute dtype here is what torch does to a Python scalar.
    return tl.cast(bits, tl.int64).to(tl.float64, bitcast=True).to(dtype)


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """``x`` rounded once to ``dtype``, to nearest even."""
    if dtype == tl.bfloat16:
        # On the bits, because the interpreter truncates to bfloat16; the same
        # integer ops give the GPU's cvt.rn result, so both are checked alike.
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, (bits >> 16) | 0x40, rounded)  # NaN stays NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def round_stochastic(x, noise):
    """float32 ``x`` to bfloat16, rounded up in magnitude iff its low 16 bits
    plus the low 16 bits of ``noise`` (uint32) carry: see
    :func:`optiscope.rules.stochastic_round`."""
    bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
    rounded = (bits + (noise & 0xFFFF)) >> 16
    rounded = tl.where(x != x, (bits >> 16) | 0x40, rounded)  # NaN stays NaN
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


# --- host helpers ------------------------------------------------------------


def to_bits(x: float) -> int:
    """The float64 ``x`` as a signed int64, for :func:`f64` to reinterpret."""
    return struct.unpack("<q", struct.pack("<d", x))[0]


def from_bits(bits: int) -> float:
    """The inverse of :func:`to_bits`."""
    return struct.unpack("<d", struct.pack("<q", bits))[0]


def computes_in_fp64(*tensors: torch.Tensor) -> bool:
    return rules.compute_dtype(*(t.dtype for t in tensors)) == torch.float64


def by_device(params: list[torch.Tensor]) -> Iterator[tuple[torch.device, list[int]]]:
    """The rows on each device, in order: a kernel runs on the current device."""
    rows_of: dict[torch.device, list[int]] = {}
    for i, param in enumerate(params):
        rows_of.setdefault(param.device, []).append(i)
    yield from rows_of.items()


def on(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()  # CPU tensors, under the interpreter
