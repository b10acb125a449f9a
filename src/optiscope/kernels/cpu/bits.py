"""Typed pointers, float bit conversions, loads and stores, small intrinsics.

Storage vs compute dtype: arrays are loaded with :func:`load` into the compute
dtype (float64 for float64, float32 for everything else) and written back with
:func:`store`, rounding once. bfloat16 travels as ``uint16`` bits and float16
as ``int16`` bits (numba has no 16-bit float type), converted with
round-to-nearest-even. A ``like`` argument is a float scalar of the compute
dtype: only its type is read.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core.errors import TypingError
from numba.extending import intrinsic, overload

from .jit import JIT

U16 = np.uint32(16)
INF_BITS = np.uint64(0x7FF0000000000000)
NO_BITS = np.uint64(0)
ALL_BITS = np.uint64(0xFFFFFFFFFFFFFFFF)


# -- pointers and bit casts ---------------------------------------------------------
@intrinsic
def typed_pointer(typingctx, address, like):
    """``address`` (int64) as a pointer to ``like``'s element type."""
    if not isinstance(like, types.Array):
        raise TypingError("like must be an array")
    sig = types.CPointer(like.dtype)(address, like)

    def codegen(context, builder, signature, args):
        pointer_type = context.get_value_type(signature.return_type)
        return builder.inttoptr(args[0], pointer_type)

    return sig, codegen


def _bitcast(source, target, ir_target):
    """An intrinsic reinterpreting a ``source`` value as ``target``."""

    def typer(typingctx, value):
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir_target)

        return target(source), codegen

    return intrinsic(typer)


float_bits = _bitcast(types.float32, types.uint32, ir.IntType(32))
bits_float = _bitcast(types.uint32, types.float32, ir.FloatType())
double_bits = _bitcast(types.float64, types.uint64, ir.IntType(64))
bits_double = _bitcast(types.uint64, types.float64, ir.DoubleType())


@intrinsic
def half_bits_to_float(typingctx, bits):
    """float16 bits (int16) to float32: exact."""
    sig = types.float32(types.int16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


@intrinsic
def float_to_half_bits(typingctx, value):
    """float32 to float16 bits (int16), rounding to nearest even."""
    sig = types.int16(types.float32)

    def codegen(context, builder, signature, args):
        half = builder.fptrunc(args[0], ir.HalfType())
        return builder.bitcast(half, ir.IntType(16))

    return sig, codegen


def _bfloat16_typer(stochastic):
    """The typer of an intrinsic rounding a float32 to bfloat16 bits (uint16):
    ``(bits + addend) >> 16``, a NaN kept as a quiet NaN. To nearest even the
    addend is ``0x7FFF + lsb``; stochastically it is the low 16 bits of a random
    word, so the value rounds up in magnitude with probability (distance to
    the lower neighbour) / (spacing). Written in 32-bit IR because numba would
    widen uint32 arithmetic to 64 bits and halve the loop's vector width."""

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        bits = builder.bitcast(args[0], i32)
        top = builder.lshr(bits, ir.Constant(i32, 16))
        if stochastic:
            addend = builder.and_(args[1], ir.Constant(i32, 0xFFFF))
        else:
            lsb = builder.and_(top, ir.Constant(i32, 1))
            addend = builder.add(lsb, ir.Constant(i32, 0x7FFF))
        rounded = builder.lshr(builder.add(bits, addend), ir.Constant(i32, 16))
        quiet_nan = builder.or_(top, ir.Constant(i32, 0x40))
        is_nan = builder.fcmp_unordered("uno", args[0], args[0])
        chosen = builder.select(is_nan, quiet_nan, rounded)
        return builder.trunc(chosen, ir.IntType(16))

    if stochastic:

        def typer(typingctx, value, noise):
            if value != types.float32 or noise != types.uint32:
                raise TypingError("value must be float32 and noise uint32")
            return types.uint16(value, noise), codegen

        return typer

    def typer(typingctx, value):
        if value != types.float32:
            raise TypingError("value must be float32")
        return types.uint16(value), codegen

    return typer


_bfloat16_nearest = intrinsic(_bfloat16_typer(stochastic=False))
_bfloat16_stochastic = intrinsic(_bfloat16_typer(stochastic=True))


@numba.njit(**JIT)
def bfloat16_bits(value):
    """float32 to bfloat16 bits, rounding to nearest even; NaN stays a (quiet) NaN."""
    return _bfloat16_nearest(value)


@numba.njit(**JIT)
def bfloat16_stochastic_bits(value, noise):
    """float32 to bfloat16 bits, rounded up in magnitude iff ``lo + noise >= 2^16``
    where ``lo`` is the value's low 16 bits and ``noise`` the low 16 bits of the
    uint32 ``noise``: with uniform noise, the expected stored value is ``value``."""
    return _bfloat16_stochastic(value, noise)


# -- loads and stores ------------------------------------------------------------------
def load(array, index, like):
    """``array[index]`` in the compute dtype of ``like``."""


def store(array, index, value):
    """``array[index] = value``, rounded once to the storage dtype."""


def as_stored(array, value):
    """``value`` (compute dtype) rounded as :func:`store` would store it in
    ``array``, back in the compute dtype: what a load after the store gives."""


@overload(load)
def _load(array, index, like):
    wide = like == types.float64
    if array.dtype == types.uint16:  # bfloat16: the top half of a float32

        def load_bfloat16(array, index, like):
            value = bits_float(np.uint32(array[index]) << U16)
            return np.float64(value) if wide else value

        return load_bfloat16
    if array.dtype == types.int16:  # float16

        def load_float16(array, index, like):
            value = half_bits_to_float(array[index])
            return np.float64(value) if wide else value

        return load_float16
    if wide:
        return lambda array, index, like: np.float64(array[index])
    return lambda array, index, like: np.float32(array[index])


@overload(store)
def _store(array, index, value):
    if array.dtype == types.uint16:

        def store_bfloat16(array, index, value):
            array[index] = bfloat16_bits(np.float32(value))

        return store_bfloat16
    if array.dtype == types.int16:

        def store_float16(array, index, value):
            array[index] = float_to_half_bits(np.float32(value))

        return store_float16

    def store_float(array, index, value):
        array[index] = value

    return store_float


def store_stochastic(array, index, value, noise):
    """``array[index] = value`` for a bfloat16 ``array``, rounded stochastically
    with the low 16 bits of ``noise`` (see :func:`bfloat16_stochastic_bits`)."""


def as_stored_stochastic(array, value, noise):
    """``value`` as :func:`store_stochastic` stores it, back in the compute dtype."""


@overload(store_stochastic)
def _store_stochastic(array, index, value, noise):
    if array.dtype != types.uint16:
        raise TypingError("stochastic rounding stores bfloat16 (uint16) arrays only")

    def store_bfloat16(array, index, value, noise):
        array[index] = bfloat16_stochastic_bits(np.float32(value), noise)

    return store_bfloat16


@overload(as_stored_stochastic)
def _as_stored_stochastic(array, value, noise):
    wide = value == types.float64

    def as_bfloat16(array, value, noise):
        bits = bfloat16_stochastic_bits(np.float32(value), noise)
        stored = bits_float(np.uint32(bits) << U16)
        return np.float64(stored) if wide else stored

    return as_bfloat16


@overload(as_stored)
def _as_stored(array, value):
    wide = value == types.float64
    if array.dtype == types.uint16:

        def as_bfloat16(array, value):
            stored = bits_float(np.uint32(bfloat16_bits(np.float32(value))) << U16)
            return np.float64(stored) if wide else stored

        return as_bfloat16
    if array.dtype == types.int16:

        def as_float16(array, value):
            stored = half_bits_to_float(float_to_half_bits(np.float32(value)))
            return np.float64(stored) if wide else stored

        return as_float16
    if wide and array.dtype == types.float32:
        return lambda array, value: np.float64(np.float32(value))
    return lambda array, value: value


# -- arithmetic the update and the sums share ------------------------------------------
@numba.njit(**JIT)
def lerp(a, b, weight, one):
    """torch's lerp: ``a + w(b-a)`` for ``w < 0.5``, else ``b - (b-a)(1-w)``."""
    if weight < 0.5:
        return a + weight * (b - a)
    return b - (b - a) * (one - weight)


@intrinsic
def tally(typingctx, total, value):
    """``total + value`` (one float type) with reassociation allowed on this one
    addition, so a loop's running sum may be split across vector lanes; the
    flag sits on the instruction, and the update around it keeps its IEEE order."""
    if not isinstance(total, types.Float) or total != value:
        raise TypingError("total and value must be floats of one type")
    sig = total(total, value)

    def codegen(context, builder, signature, args):
        return builder.fadd(args[0], args[1], flags=("reassoc",))

    return sig, codegen


@intrinsic
def dot3(typingctx, a1, b1, a2, b2, a3, b3):
    """``a1*b1 + a2*b2 + a3*b3`` (one float type), the products allowed to fuse
    into the additions: the term three elements add to a running sum."""
    if not isinstance(a1, types.Float) or not a1 == b1 == a2 == b2 == a3 == b3:
        raise TypingError("a1, b1, a2, b2, a3 and b3 must be floats of one type")
    sig = a1(a1, b1, a2, b2, a3, b3)

    def codegen(context, builder, signature, args):
        term = builder.fmul(args[0], args[1])
        for x, y in ((args[2], args[3]), (args[4], args[5])):
            product = builder.fmul(x, y, flags=("contract",))
            term = builder.fadd(term, product, flags=("contract",))
        return term

    return sig, codegen


def zero(like):
    """A running sum's start: 0 in ``like``'s dtype."""


@overload(zero)
def _zero(like):
    if like == types.float64:
        return lambda like: 0.0
    return lambda like: np.float32(0.0)


# -- ordering floats by their bits -----------------------------------------------------
def _float_width_typer(masked):
    """The typer of an intrinsic giving a float's bits (float32 as uint32,
    float64 as uint64), with the sign bit cleared if ``masked``. Typed by hand,
    because numba would widen a uint32 ``&`` to 64 bits and halve the loop's
    vector width."""

    def typer(typingctx, value):
        if value not in (types.float32, types.float64):
            raise TypingError("value must be float32 or float64")
        width = value.bitwidth
        sig = types.Integer(f"uint{width}")(value)

        def codegen(context, builder, signature, args):
            bits = builder.bitcast(args[0], ir.IntType(width))
            if not masked:
                return bits
            return builder.and_(
                bits, ir.Constant(ir.IntType(width), (1 << width - 1) - 1)
            )

        return sig, codegen

    return typer


#: The bits of ``|value|``: they order like the values, a NaN's above +inf's.
order_bits = intrinsic(_float_width_typer(masked=True))
#: The bits of ``value``. A float of sign bit clear orders like them, up to
#: +inf's (:func:`inf_bits`); a negative value, -0.0 and a NaN lie above.
raw_bits = intrinsic(_float_width_typer(masked=False))


def _unsigned_extremum(is_max):
    """The typer of an intrinsic ``max(a, b)`` (or ``min``) of two unsigned
    integers of one width, kept at that width."""

    def typer(typingctx, a, b):
        if not isinstance(a, types.Integer) or a != b:
            raise TypingError("a and b must be integers of one type")
        sig = a(a, b)

        def codegen(context, builder, signature, args):
            pick = builder.icmp_unsigned(">" if is_max else "<", args[0], args[1])
            return builder.select(pick, args[0], args[1])

        return sig, codegen

    return typer


umin = intrinsic(_unsigned_extremum(False))
umax = intrinsic(_unsigned_extremum(True))


def inf_bits(bits):
    """+inf's bits at the width of ``bits``."""


@overload(inf_bits)
def _inf_bits(bits):
    if bits == types.uint64:
        return lambda bits: INF_BITS
    return lambda bits: np.uint32(0x7F800000)


def empty_range(like):
    """``(least, greatest)`` bits before any value: (all ones, 0) at the width
    of ``like``'s dtype."""


@overload(empty_range)
def _empty_range(like):
    if like == types.float64:
        return lambda like: (ALL_BITS, NO_BITS)
    return lambda like: (np.uint32(0xFFFFFFFF), np.uint32(0))


def bits_value(bits):
    """:func:`order_bits` inverted, as a float64 (exact); NaN bits give NaN."""


@overload(bits_value)
def _bits_value(bits):
    if bits == types.uint64:
        return lambda bits: bits_double(bits)
    return lambda bits: np.float64(bits_float(bits))
