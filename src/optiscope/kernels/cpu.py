r"""numba kernels for the CPU: one pass over memory per optimizer step.

Layout shared by every kernel:

* **Many tensors, one call.** The tensors of a step are described by int64
  arrays of data addresses and sizes; :func:`_typed_pointer` turns an address
  into a typed pointer and ``numba.carray`` into an array, so 200 small tensors
  cost one kernel launch, not 200.
* **Fixed chunks.** Work is cut into chunks of ``CHUNK`` elements of one tensor,
  whatever the thread count. The same kernel runs (``nogil``) on every thread
  of a pool in :mod:`optiscope.kernels`, each taking the next free chunk from a
  shared counter (:func:`_claim`) until none is left (dropout's kernels, in
  :mod:`.cpu_dropout`, use ``prange``). Every update is elementwise, and a
  chunk is computed the same way whichever thread takes it, so results are
  bitwise identical across runs and thread counts. A probe's per-chunk sums
  (issue 5) are one more output array indexed by chunk, reduced per tensor in
  chunk order afterwards: deterministic too.
* **Storage vs compute dtype.** Arrays are loaded with :func:`_load` into the
  compute dtype (float64 for float64, float32 for everything else) and written
  back with :func:`_store`, rounding once. bfloat16 travels as ``uint16`` bits
  and float16 as ``int16`` bits (numba has no 16-bit float type), converted
  with round-to-nearest-even.

Kernels compile on first use and are cached on disk (``cache=True``).
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core.errors import TypingError
from numba.extending import intrinsic, overload

# numba freezes these constants into the cached kernels, and its cache is keyed on
# this file's timestamp: a change to them in layout.py needs this file touched.
from .rows import ADAM, HIST_BINS, HIST_MIN_EXP, HIST_START

#: Elements per unit of parallel work: large enough to amortise scheduling,
#: small enough that 2 threads balance on a few tensors. A multiple of 4
#: (the Philox block), so dropout chunks start on a block.
CHUNK = 1 << 16

_JIT = dict(nogil=True, cache=True)


# -- bits and pointers -----------------------------------------------------------
@intrinsic
def _typed_pointer(typingctx, address, like):
    """``address`` (int64) as a pointer to ``like``'s element type."""
    if not isinstance(like, types.Array):
        raise TypingError("like must be an array")
    sig = types.CPointer(like.dtype)(address, like)

    def codegen(context, builder, signature, args):
        pointer_type = context.get_value_type(signature.return_type)
        return builder.inttoptr(args[0], pointer_type)

    return sig, codegen


@intrinsic
def _float_bits(typingctx, value):
    """The IEEE bits of a float32, as uint32."""
    sig = types.uint32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@intrinsic
def _bits_float(typingctx, bits):
    """uint32 bits as the float32 they encode."""
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def _half_bits_to_float(typingctx, bits):
    """float16 bits (int16) to float32: exact."""
    sig = types.float32(types.int16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


@intrinsic
def _float_to_half_bits(typingctx, value):
    """float32 to float16 bits (int16), rounding to nearest even."""
    sig = types.int16(types.float32)

    def codegen(context, builder, signature, args):
        half = builder.fptrunc(args[0], ir.HalfType())
        return builder.bitcast(half, ir.IntType(16))

    return sig, codegen


_U16 = np.uint32(16)
_BF16_ROUND = np.uint32(0x7FFF)
_ONE_U32 = np.uint32(1)
_QUIET_BIT = np.uint32(0x40)


@numba.njit(**_JIT)
def _bfloat16_bits(value):
    """float32 to bfloat16 bits, rounding to nearest even; NaN stays a (quiet) NaN."""
    bits = _float_bits(value)
    rounded = (bits + _BF16_ROUND + ((bits >> _U16) & _ONE_U32)) >> _U16
    quiet_nan = (bits >> _U16) | _QUIET_BIT
    return np.uint16(quiet_nan if value != value else rounded)


def _load(array, index, like):
    """``array[index]`` in the compute dtype of ``like`` (an array)."""


def _store(array, index, value):
    """``array[index] = value``, rounded once to the storage dtype."""


@overload(_load)
def _load_overload(array, index, like):
    wide = like.dtype == types.float64
    if array.dtype == types.uint16:  # bfloat16: the top half of a float32

        def load_bfloat16(array, index, like):
            value = _bits_float(np.uint32(array[index]) << _U16)
            return np.float64(value) if wide else value

        return load_bfloat16
    if array.dtype == types.int16:  # float16

        def load_float16(array, index, like):
            value = _half_bits_to_float(array[index])
            return np.float64(value) if wide else value

        return load_float16
    if wide:
        return lambda array, index, like: np.float64(array[index])
    return lambda array, index, like: np.float32(array[index])


@overload(_store)
def _store_overload(array, index, value):
    if array.dtype == types.uint16:

        def store_bfloat16(array, index, value):
            array[index] = _bfloat16_bits(np.float32(value))

        return store_bfloat16
    if array.dtype == types.int16:

        def store_float16(array, index, value):
            array[index] = _float_to_half_bits(np.float32(value))

        return store_float16

    def store_float(array, index, value):
        array[index] = value

    return store_float


@numba.njit(**_JIT)
def _view(addresses, sizes, tensor, start, stop, like):
    whole = numba.carray(_typed_pointer(addresses[tensor], like), sizes[tensor])
    return whole[start:stop]


def _optional_view(addresses, sizes, tensor, start, stop, like):
    """:func:`_view`, or None where ``like`` is None (a state the rule doesn't use)."""


@overload(_optional_view)
def _optional_view_overload(addresses, sizes, tensor, start, stop, like):
    if isinstance(like, types.NoneType):
        return lambda addresses, sizes, tensor, start, stop, like: None
    return lambda addresses, sizes, tensor, start, stop, like: _view(
        addresses, sizes, tensor, start, stop, like
    )


def _running_max(array, index, value, like):
    """amsgrad's ``max(v_max, v)``, stored and returned; ``value`` if no array."""


@overload(_running_max)
def _running_max_overload(array, index, value, like):
    if isinstance(array, types.NoneType):
        return lambda array, index, value, like: value

    def running_max(array, index, value, like):
        previous = _load(array, index, like)
        largest = value if value > previous or value != value else previous
        _store(array, index, largest)
        return largest

    return running_max


@numba.njit(**_JIT)
def _lerp(a, b, weight, one):
    """torch's lerp: ``a + w(b-a)`` for ``w < 0.5``, else ``b - (b-a)(1-w)``."""
    if weight < 0.5:
        return a + weight * (b - a)
    return b - (b - a) * (one - weight)


@intrinsic
def _claim(typingctx, counter):
    """Take the next chunk: ``counter[0] += 1`` as one atomic operation,
    returning the value before. Threads that share ``counter`` each take the
    chunks they get to, so a thread slowed by another process on its core
    (torch's OpenMP workers spin for a while after each torch op) takes fewer."""
    if not (isinstance(counter, types.Array) and counter.dtype == types.int64):
        raise TypingError("counter must be an int64 array")
    sig = types.int64(counter)

    def codegen(context, builder, signature, args):
        array = context.make_array(signature.args[0])(context, builder, args[0])
        one = ir.Constant(ir.IntType(64), 1)
        return builder.atomic_rmw("add", array.data, one, "monotonic")

    return sig, codegen


# -- probes: sums kept by the update loop itself ----------------------------------------
# A probe is None (compiled out: the kernel is the plain update) or a tuple
# ``(partials, hyper64, ...)``: ``partials[c]`` is chunk ``c``'s row of the
# layout in :mod:`optiscope.probes.layout`, overwritten by the kernel.
#
# The update loop keeps the chunk's running sums (and Adam's least and greatest
# ``v``) in the compute dtype, so the loop keeps its vector width.
#
# **Parts.** Both loops, probed or not, walk the chunk's three equal parts in
# step: iteration ``i`` updates elements ``i``, ``i + n/3`` and ``i + 2n/3``
# (the 0-2 left over come after the loop), and the probed loop adds one term
# per sum for the three (:func:`_dot3`). Why, measured on a 10M-element
# float32 Adam step with torch's 4 KiB pages: once the step runs from memory,
# every running sum is a dependency chain whose next link waits for the
# slowest load, and the waiting links fill the scheduler that would otherwise
# run ahead and issue later loads. A one-stream probed loop cost +11-16%
# against the one-stream unprobed loop; two halves in step (half the links)
# +3-10%, more on a busy host; three parts 0-2%, at 1 and 2 threads. Three
# parts also start their streams at offsets that are not multiples of the
# page size, so the seven streams don't all cross a page (and restart the
# hardware prefetcher) at once; the unprobed loop is no slower for it. Four
# parts spilled registers (+10-34%); software prefetches were slower too
# (+11-35%: the hardware prefetcher already saturates the memory system).
# Both loops call the one per-element update (:func:`_adam_element`,
# :func:`_momentum_element`), so a probe never changes a value the step writes.
#
# Earlier designs measured worse: a float64 read-back of each L1-sized block
# (+45%), L1-sized blocks at all (+6% on their own, for the loop entries and
# exits). What costs more than the loop can hide is done afterwards, on the
# chunk while it is in L2, and only where needed:
#
# * a float32 sum loses range, not precision: a chunk whose Σg² or Σθ² (or
#   momentum's Σm²) leaves ``[2**-80, inf)`` (underflowed terms, an overflow of
#   finite values, or a non-finite value) is summed again in float64
#   (:func:`_sums64_adam`, :func:`_sums64_momentum`) from the chunk, which the
#   step leaves holding g, θ and m. Σ(Δθ)² and momentum's Σg·m_prev need θ and
#   m from before the step, which are gone (keeping them in a scratch chunk
#   cost 3-4% of the step): they stay float32 sums, whose terms keep only an
#   absolute 2**-150 below 2**-126 (an update RMS off by under 3e-23) and
#   overflow at 2**128 (a change ``|Δθ| >= 2**64`` reports inf);
# * non-finite gradients are counted only where Σg² is not finite;
# * ε-dominated coordinates are counted only where the chunk's least ``v`` is
#   below the threshold;
# * the histogram bins a sample (every
#   :func:`~optiscope.probes.layout.hist_stride`-th element) by table
#   (:func:`step_bins`): no root or division per element.
#
# Reassociation is allowed on the sums' additions only (:func:`_tally`, a flag
# on the instruction), so they split across vector lanes while the update keeps
# its IEEE order. A float32 chunk sum thus adds at most ``CHUNK / (3 lanes)``
# terms per lane (2731 with the 8 float32 lanes of AVX2; LLVM picks 16 here),
# each carrying two roundings more than a single product (its two additions):
# a relative error below ``2742 · 2**-24 ≈ 1.6e-4`` of the sum of the terms'
# magnitudes (the derivation is in ``tests/test_kernel_stats.py``), and near
# ``2**-24 · sqrt(2731)`` for typical data; chunks add in
# float64. ``v``'s extrema are taken on the float's raw bits (:func:`_raw_bits`:
# a float of sign bit clear orders like its bits, a NaN above +inf), which
# needs no flag; a chunk whose greatest bits lie above +inf's (a NaN, -0.0 or
# a negative ``v``) takes them again from ``|v|`` in the second pass.

_EXPONENT = np.uint64(52)
_EXPONENT_MASK = np.uint64(0x7FF)
_INF_BITS = np.uint64(0x7FF0000000000000)
_NO_BITS = np.uint64(0)
_ALL_BITS = np.uint64(0xFFFFFFFFFFFFFFFF)
#: A float32 chunk sum below this may have lost terms to underflow (a square
#: under 2**-126 keeps only an absolute 2**-150): 65,536 of them move a sum of
#: 2**-80 by under 2**-54 of itself.
_TRUSTED_LEAST = 2.0**-80
_OCTAVE_BIAS = 1022 + HIST_MIN_EXP  # biased exponent - 1022 is frexp's exponent
_STEP_MIN, _STEP_MAX = ADAM.index("step_min"), ADAM.index("step_max")


@intrinsic
def _double_bits(typingctx, value):
    """The IEEE bits of a float64, as uint64."""
    sig = types.uint64(types.float64)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))

    return sig, codegen


@intrinsic
def _bits_double(typingctx, bits):
    """uint64 bits as the float64 they encode."""
    sig = types.float64(types.uint64)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return sig, codegen


@intrinsic
def _tally(typingctx, total, value):
    """``total + value`` (one float type) with reassociation allowed on this one
    addition, so a loop's running sum may be split across vector lanes; the
    flag sits on the instruction, not on the function, and the update around
    it keeps its IEEE order."""
    if not isinstance(total, types.Float) or total != value:
        raise TypingError("total and value must be floats of one type")
    sig = total(total, value)

    def codegen(context, builder, signature, args):
        return builder.fadd(args[0], args[1], flags=("reassoc",))

    return sig, codegen


@intrinsic
def _order_bits(typingctx, value):
    """The bits of ``|value|`` (float32 as uint32, float64 as uint64): they order
    like the values, with a NaN's above +inf's. Typed by hand, because numba
    would widen a uint32 ``&`` to 64 bits and halve the loop's vector width."""
    if value not in (types.float32, types.float64):
        raise TypingError("value must be float32 or float64")
    width = value.bitwidth
    sig = types.Integer(f"uint{width}")(value)

    def codegen(context, builder, signature, args):
        bits = builder.bitcast(args[0], ir.IntType(width))
        return builder.and_(bits, ir.Constant(ir.IntType(width), (1 << width - 1) - 1))

    return sig, codegen


@intrinsic
def _raw_bits(typingctx, value):
    """The bits of ``value`` (float32 as uint32, float64 as uint64). A float of
    sign bit clear orders like them, up to +inf's (:func:`_inf_bits`); a
    negative value, -0.0 and a NaN lie above."""
    if value not in (types.float32, types.float64):
        raise TypingError("value must be float32 or float64")
    width = value.bitwidth
    sig = types.Integer(f"uint{width}")(value)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(width))

    return sig, codegen


def _inf_bits(bits):
    """+inf's bits at the width of ``bits``."""


@overload(_inf_bits)
def _inf_bits_overload(bits):
    if bits == types.uint64:
        return lambda bits: _INF_BITS
    return lambda bits: np.uint32(0x7F800000)


def _unsigned_extremum(is_max):
    """The typer of an intrinsic ``max(a, b)`` (or ``min``) of two unsigned
    integers of one width, kept at that width (see :func:`_order_bits`)."""

    def typer(typingctx, a, b):
        if not isinstance(a, types.Integer) or a != b:
            raise TypingError("a and b must be integers of one type")
        sig = a(a, b)

        def codegen(context, builder, signature, args):
            pick = builder.icmp_unsigned(">" if is_max else "<", args[0], args[1])
            return builder.select(pick, args[0], args[1])

        return sig, codegen

    return typer


_umin = intrinsic(_unsigned_extremum(False))
_umax = intrinsic(_unsigned_extremum(True))


@intrinsic
def _dot3(typingctx, a1, b1, a2, b2, a3, b3):
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


def _part(array, k, size):
    """``array[k*size:(k+1)*size]``, or None for None (a state the rule doesn't use)."""


@overload(_part)
def _part_overload(array, k, size):
    if isinstance(array, types.NoneType):
        return lambda array, k, size: None
    return lambda array, k, size: array[k * size : (k + 1) * size]


def _parts(arrays, k, size):
    """:func:`_part` of each array of ``arrays`` (a tuple of 3 or 5)."""


@overload(_parts)
def _parts_overload(arrays, k, size):
    if len(arrays) == 3:
        return lambda arrays, k, size: (
            _part(arrays[0], k, size),
            _part(arrays[1], k, size),
            _part(arrays[2], k, size),
        )
    return lambda arrays, k, size: (
        _part(arrays[0], k, size),
        _part(arrays[1], k, size),
        _part(arrays[2], k, size),
        _part(arrays[3], k, size),
        _part(arrays[4], k, size),
    )


def _zero(like):
    """A running sum's start: 0 in ``like``'s dtype."""


@overload(_zero)
def _zero_overload(like):
    if like.dtype == types.float64:
        return lambda like: 0.0
    return lambda like: np.float32(0.0)


def _empty_range(like):
    """``(least, greatest)`` bits before any value: (all ones, 0) at the width
    of ``like``'s dtype."""


@overload(_empty_range)
def _empty_range_overload(like):
    if like.dtype == types.float64:
        return lambda like: (_ALL_BITS, _NO_BITS)
    return lambda like: (np.uint32(0xFFFFFFFF), np.uint32(0))


def _bits_value(bits):
    """:func:`_order_bits` inverted, as a float64 (exact); NaN bits give NaN."""


@overload(_bits_value)
def _bits_value_overload(bits):
    if bits == types.uint64:
        return lambda bits: _bits_double(bits)
    return lambda bits: np.float64(_bits_float(bits))


def _as_stored(array, value):
    """``value`` (compute dtype) rounded as :func:`_store` would store it in
    ``array``, back in the compute dtype: what a load after the store gives."""


@overload(_as_stored)
def _as_stored_overload(array, value):
    wide = value == types.float64
    if array.dtype == types.uint16:

        def as_bfloat16(array, value):
            stored = _bits_float(np.uint32(_bfloat16_bits(np.float32(value))) << _U16)
            return np.float64(stored) if wide else stored

        return as_bfloat16
    if array.dtype == types.int16:

        def as_float16(array, value):
            stored = _half_bits_to_float(_float_to_half_bits(np.float32(value)))
            return np.float64(stored) if wide else stored

        return as_float16
    if wide and array.dtype == types.float32:
        return lambda array, value: np.float64(np.float32(value))
    return lambda array, value: value


def _trusted(total):
    """Whether a chunk sum from the loop needs no float64 second pass."""


@overload(_trusted)
def _trusted_overload(total):
    if total == types.float64:  # as the second pass would sum, unless inf or NaN
        return lambda total: abs(total) < np.inf
    return lambda total: _TRUSTED_LEAST <= abs(total) < np.inf


@numba.njit(**_JIT)
def _open(probe, c, n):
    """Start chunk ``c`` (``n`` elements): zero its row."""
    row = probe[0][c]
    row[:] = 0.0
    row[0] = n


def _counts(probe):
    """The histogram's four rows of counts (see :func:`_adam_chunk`), if probed."""


@overload(_counts)
def _counts_overload(probe):
    if isinstance(probe, types.NoneType):
        return lambda probe: None
    return lambda probe: np.zeros((4, HIST_BINS))


# -- after the loop: the float64 second pass, where a float32 sum is not trusted ----
@numba.njit(**_JIT)
def _count_nonfinite(row, grad_sq, grad, hyper):
    """Count a chunk's non-finite gradients into ``row[4]``, only where its
    float64 Σg² says there may be some (a non-finite g makes Σg² inf or NaN; so
    can an overflow of finite float64 g, and then the count is 0, still exact)."""
    if abs(grad_sq) < np.inf:
        return
    bad = 0
    for i in range(grad.size):
        bad += 0 if abs(_load(grad, i, hyper)) < np.inf else 1
    row[4] += bad


@numba.njit(**_JIT)
def _sums64_adam(theta, grad, v_used, hyper):
    """A chunk's Σg² and Σθ² in float64, and the bits of its least and greatest
    ``|v|`` (:func:`_order_bits`), from the chunk as the step left it."""
    grad_sq, param_sq = 0.0, 0.0
    low, high = _ALL_BITS, _NO_BITS
    for i in range(theta.size):
        r = np.float64(_load(grad, i, hyper))
        after = np.float64(_load(theta, i, hyper))
        bits = _order_bits(np.float64(_load(v_used, i, hyper)))
        grad_sq = _tally(grad_sq, r * r)
        param_sq = _tally(param_sq, after * after)
        low, high = _umin(low, bits), _umax(high, bits)
    return grad_sq, param_sq, low, high


@numba.njit(**_JIT)
def _sums64_momentum(theta, grad, buffer, hyper):
    """A chunk's Σg², Σθ² and Σm² in float64, from the chunk as the step left it."""
    grad_sq, param_sq, m_sq = 0.0, 0.0, 0.0
    for i in range(theta.size):
        r = np.float64(_load(grad, i, hyper))
        after = np.float64(_load(theta, i, hyper))
        m = np.float64(_load(buffer, i, hyper))
        grad_sq = _tally(grad_sq, r * r)
        param_sq = _tally(param_sq, after * after)
        m_sq = _tally(m_sq, m * m)
    return grad_sq, param_sq, m_sq


@numba.njit(**_JIT)
def _momentum_chunk(probe, c, theta, grad, buffer, hyper, sums):
    """Fill chunk ``c``'s row from the loop's ``sums`` (Σg², Σ(Δθ)², Σθ²,
    Σg·m_prev, Σm²), taking Σg², Σθ² and Σm² again in float64 from the chunk
    where one is not trusted. Σ(Δθ)² and Σg·m_prev have no second pass: what
    they need (θ and m before the step) is gone."""
    grad_sq, update_sq, param_sq, grad_m, m_sq = sums
    row = probe[0][c]
    row[1] = grad_sq
    row[2] = update_sq
    row[3] = param_sq
    row[5] = grad_m
    row[6] = m_sq
    if not (_trusted(grad_sq) and _trusted(param_sq) and _trusted(m_sq)):
        row[1], row[3], row[6] = _sums64_momentum(theta, grad, buffer, hyper)
    _count_nonfinite(row, row[1], grad, hyper)


@numba.njit(**_JIT)
def _adam_chunk(probe, c, tensor, theta, grad, v_used, start, hyper, sums, counts):
    """Fill chunk ``c``'s row (tensor index ``start`` on). ``sums`` is the
    loop's Σg², Σ(Δθ)², Σθ² and the raw bits of the least and greatest ``v``;
    Σg², Σθ² and the extrema are taken again in float64 from the chunk where
    one is not trusted (bits above +inf's: a NaN, -0.0 or negative ``v``).
    Σ(Δθ)² has no second pass: θ before the step is gone.

    The effective step ``s = lr/(sqrt(v/c2)+eps)`` falls as ``v`` grows, so
    ``s``'s extrema are ``s`` of ``v``'s. ε-dominated is ``v`` below a threshold
    (:func:`step_thresholds`, exact), counted only where the least ``v`` is. The
    histogram bins the sampled elements (tensor index a multiple of the
    tensor's stride) by table, into the four rows of ``counts`` (the
    calling thread's) in turn, so that consecutive samples in one bin don't
    wait on each other's increment."""
    grad_sq, update_sq, param_sq, low_bits, high_bits = sums
    row = probe[0][c]
    row[1] = grad_sq
    row[2] = update_sq
    row[3] = param_sq
    low, high = _bits_value(low_bits), _bits_value(high_bits)
    # Raw bits: trusted where every v is in [+0, +inf]; else a NaN, -0.0 or a
    # negative v is there, and the second pass orders |v|.
    if not (
        _trusted(grad_sq) and _trusted(param_sq) and high_bits <= _inf_bits(high_bits)
    ):
        row[1], row[3], low_bits64, high_bits64 = _sums64_adam(
            theta, grad, v_used, hyper
        )
        low, high = _bits_value(low_bits64), _bits_value(high_bits64)
    _count_nonfinite(row, row[1], grad, hyper)
    lr, eps, correction2 = probe[1][0], probe[1][1], probe[2][tensor]
    if high != high:  # a NaN step: torch's min and max are NaN too
        row[_STEP_MIN] = row[_STEP_MAX] = np.nan
    else:
        row[_STEP_MIN] = lr / (np.sqrt(high / correction2) + eps)
        row[_STEP_MAX] = lr / (np.sqrt(low / correction2) + eps)
    below = probe[3][tensor][0]
    if low < below:
        dominated = 0
        for i in range(v_used.size):
            dominated += 1 if _load(v_used, i, hyper) < below else 0
        row[5] = dominated
    table, stride = probe[6][tensor], probe[7][tensor]
    bins, cuts = probe[4][table], probe[5][table]
    turn = 0
    for i in range((stride - start % stride) % stride, v_used.size, stride):
        v = np.float64(_load(v_used, i, hyper))
        bits = _double_bits(v)
        top = bits >> _EXPONENT
        k = bins[top]
        if k < 0:  # a range :func:`step_bins` leaves to the exact formula
            k = _octave(lr / (np.sqrt(v / correction2) + eps))
        elif bits >= cuts[top]:
            k -= 1
        counts[turn, k] += 1.0
        turn = (turn + 1) & 3
    for k in range(HIST_BINS):
        total = counts[0, k] + counts[1, k] + counts[2, k] + counts[3, k]
        row[HIST_START + k] = total
        counts[0, k] = counts[1, k] = counts[2, k] = counts[3, k] = 0.0


@numba.njit(**_JIT)
def _octave(step):
    """:func:`optiscope.probes.layout.octave_bin`, from the exponent bits."""
    if not step > 0:
        return 0
    exponent = np.int64((_double_bits(step) >> _EXPONENT) & _EXPONENT_MASK)
    return min(max(exponent - _OCTAVE_BIAS, 0), HIST_BINS - 1)


# -- host-side tables of the Adam probe ---------------------------------------------
def step_thresholds(lr: float, eps: float, correction2: np.ndarray) -> np.ndarray:
    """Per ``correction2``, the float64 ``v`` thresholds of the Adam probe:
    column 0 the least ``v`` with ``sqrt(v/c2) >= eps``; column ``k >= 1`` the
    least ``v`` whose step ``lr/(sqrt(v/c2)+eps)`` is below bin ``k``'s lower
    edge ``2^(k-1+HIST_MIN_EXP)``. Each predicate is evaluated with the same
    float64 operations as the oracle, and is monotone in ``v`` (a root and a
    division, correctly rounded, are monotone), so the least ``v`` is found
    exactly: from the closed-form solution, by a search over the bits of
    non-negative doubles (which order like the doubles) that starts a few ulp
    wide and doubles until it brackets the answer."""
    c2 = np.ascontiguousarray(correction2, np.float64)
    out = np.empty((c2.size, HIST_BINS))
    _thresholds(float(lr), float(eps), c2, _BIN_EDGES, out)
    return out


_HOST_JIT = dict(cache=True, error_model="numpy")  # x/0 is inf, as in numpy
#: The lower edge of each histogram bin, ``2^(k-1+HIST_MIN_EXP)``.
_BIN_EDGES = 2.0 ** (np.arange(HIST_BINS) - 1 + HIST_MIN_EXP)


@numba.njit(**_HOST_JIT)
def _holds(bits, lr, eps, c2, k, edge):
    """:func:`step_thresholds`' predicate ``k`` at ``v`` with these bits."""
    root = np.sqrt(_bits_double(bits) / c2)
    return root >= eps if k == 0 else lr / (root + eps) < edge


@numba.njit(**_HOST_JIT)
def _thresholds(lr, eps, c2, edges, out):
    for r in range(c2.size):
        for k in range(edges.size):
            root = eps if k == 0 else lr / edges[k] - eps
            guess = c2[r] * root * root if root > 0 else 0.0
            start = _double_bits(guess) if guess < np.inf else _INF_BITS
            # Bracket the least v that holds in (low, high], then bisect.
            width = np.uint64(1)
            if _holds(start, lr, eps, c2[r], k, edges[k]):
                high = start
                low = start - width if start >= width else _NO_BITS
                while low > _NO_BITS and _holds(low, lr, eps, c2[r], k, edges[k]):
                    high, width = low, width * np.uint64(2)
                    low = low - width if low >= width else _NO_BITS
                if low == _NO_BITS and _holds(low, lr, eps, c2[r], k, edges[k]):
                    out[r, k] = 0.0
                    continue
            else:  # every predicate holds at +inf
                low = start
                high = min(start + width, _INF_BITS)
                while not _holds(high, lr, eps, c2[r], k, edges[k]):
                    low, width = high, width * np.uint64(2)
                    high = min(high + width, _INF_BITS)
            while high - low > np.uint64(1):
                mid = low + (high - low) // np.uint64(2)
                if _holds(mid, lr, eps, c2[r], k, edges[k]):
                    high = mid
                else:
                    low = mid
            out[r, k] = _bits_double(high)


def step_bins(below: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of :func:`step_thresholds`, the histogram bin of ``v`` without a
    root or a division, indexed by the top 12 bits of ``v`` (sign and exponent):
    ``bins`` is the bin of the range's least ``v`` and ``cuts`` the bits from
    which ``v`` is one bin lower. The step falls as ``v`` grows, so the bin of
    ``v`` is the number of thresholds ``k >= 1`` above ``v``, which a walk over
    the ranges in order counts. Over one octave of ``v`` the step changes by
    at most √2, so it spans two bins at most; a range where the bins at its two
    ends differ otherwise (``eps`` near 0 with subnormal ``v``, where the step
    is not near-linear), or whose ``v`` are negative (-0.0 included: the root
    of a negative is NaN), gets bin -1, for the exact formula."""
    below = np.ascontiguousarray(below, np.float64)
    bins = np.empty((below.shape[0], 4096), np.int64)
    cuts = np.empty((below.shape[0], 4096), np.uint64)
    _fill_bins(below, bins, cuts)
    return bins, cuts


@numba.njit(**_HOST_JIT)
def fold_partials(stats, rows, partials, chunk_tensor, extrema):
    """:func:`optiscope.kernels._fold`: each tensor's chunks summed in chunk
    order, then added to its row of ``stats``; with ``extrema``, Adam's
    ``step_min``/``step_max`` columns take the minimum and maximum instead,
    NaN winning."""
    total = np.zeros(partials.shape[1])
    c = 0
    while c < chunk_tensor.size:
        tensor = chunk_tensor[c]
        total[:] = partials[c]
        c += 1
        while c < chunk_tensor.size and chunk_tensor[c] == tensor:
            _combine_into(total, partials[c], extrema)
            c += 1
        _combine_into(stats[rows[tensor]], total, extrema)


@numba.njit(**_HOST_JIT)
def _combine_into(target, values, extrema):
    """``target += values``, but with ``extrema`` Adam's ``step_min`` and
    ``step_max`` take the minimum and maximum, NaN winning."""
    for k in range(target.size):
        if extrema and k == _STEP_MIN:
            target[k] = _nan_min(target[k], values[k])
        elif extrema and k == _STEP_MAX:
            target[k] = -_nan_min(-target[k], -values[k])
        else:
            target[k] += values[k]


@numba.njit(**_HOST_JIT)
def _nan_min(a, b):
    if a != a or b != b:
        return np.nan
    return min(a, b)


_MANTISSA = np.uint64((1 << 52) - 1)


@numba.njit(**_HOST_JIT)
def _fill_bins(below, bins, cuts):
    for r in range(below.shape[0]):
        ascending = np.sort(below[r, 1:])
        n = ascending.size
        at_least, at_most = 0, 0  # thresholds <= the range's least / greatest v
        for top in range(4096):
            bins[r, top], cuts[r, top] = -1, _ALL_BITS
            if top >= 2048:
                continue
            least = np.uint64(top) << _EXPONENT
            least_v, greatest_v = _bits_double(least), _bits_double(least | _MANTISSA)
            while at_least < n and ascending[at_least] <= least_v:
                at_least += 1
            while at_most < n and ascending[at_most] <= greatest_v:
                at_most += 1
            first, last = n - at_least, n - at_most
            if last == first:
                bins[r, top] = first
            elif last == first - 1:
                bins[r, top] = first
                cuts[r, top] = _double_bits(ascending[at_least])


def _either(first, second):
    """``first``, or ``second`` where ``first`` is None."""


@overload(_either)
def _either_overload(first, second):
    if isinstance(first, types.NoneType):
        return lambda first, second: second
    return lambda first, second: first


# -- momentum ----------------------------------------------------------------------
@numba.njit(**_JIT)
def _momentum_element(arrays, i, rule, like):
    """Update element ``i`` of ``arrays`` (θ, g, m); return what a probe sums:
    (g as stored, Δθ as stored, θ after, g with decay, m before, m as stored)."""
    theta, grad, buffer = arrays
    lr, weight, weight_decay, sign, one = rule
    th = _load(theta, i, like)
    raw = _load(grad, i, like)
    g = sign * raw
    if weight_decay != 0:
        g = g + weight_decay * th
    m_prev = _load(buffer, i, like)
    m = _lerp(m_prev, g, weight, one)
    new = th - lr * m
    _store(buffer, i, m)
    _store(theta, i, new)
    after = _as_stored(theta, new)
    return raw, after - th, after, g, m_prev, _as_stored(buffer, m)


@numba.njit(**_JIT)
def momentum_kernel(
    params,  # int64 addresses, one per tensor
    grads,
    buffers,
    sizes,  # int64 numel per tensor
    chunk_tensor,  # int64 tensor index of each chunk
    chunk_start,  # int64 first element of each chunk
    next_chunk,  # int64[1], shared by the calling threads: the next chunk to take
    last,  # the number of chunks
    hyper,  # compute dtype: lr, 1 - momentum, weight_decay, sign (-1 if maximize)
    param_like,
    grad_like,
    buffer_like,
    probe,  # None, or (partials (chunks, len(MOMENTUM)), float64 [sign, l2])
):
    lr, weight, weight_decay, sign = hyper[0], hyper[1], hyper[2], hyper[3]
    one = hyper[3] * hyper[3]
    rule = (lr, weight, weight_decay, sign, one)
    while True:
        c = _claim(next_chunk)
        if c >= last:
            break
        t, start = chunk_tensor[c], chunk_start[c]
        stop = min(start + CHUNK, sizes[t])
        theta = _view(params, sizes, t, start, stop, param_like)
        grad = _view(grads, sizes, t, start, stop, grad_like)
        buffer = _view(buffers, sizes, t, start, stop, buffer_like)
        whole = (theta, grad, buffer)
        size = (stop - start) // 3
        p1, p2, p3 = (
            _parts(whole, 0, size),
            _parts(whole, 1, size),
            _parts(whole, 2, size),
        )
        if probe is None:  # the same loop (see "Parts" above), without sums
            for i in range(size):
                _momentum_element(p1, i, rule, hyper)
                _momentum_element(p2, i, rule, hyper)
                _momentum_element(p3, i, rule, hyper)
            for i in range(3 * size, stop - start):
                _momentum_element(whole, i, rule, hyper)
            continue
        _open(probe, c, stop - start)
        grad_sq = update_sq = param_sq = grad_m = m_sq = _zero(hyper)
        for i in range(size):
            r1, d1, a1, g1, m1, k1 = _momentum_element(p1, i, rule, hyper)
            r2, d2, a2, g2, m2, k2 = _momentum_element(p2, i, rule, hyper)
            r3, d3, a3, g3, m3, k3 = _momentum_element(p3, i, rule, hyper)
            grad_sq = _tally(grad_sq, _dot3(r1, r1, r2, r2, r3, r3))
            update_sq = _tally(update_sq, _dot3(d1, d1, d2, d2, d3, d3))
            param_sq = _tally(param_sq, _dot3(a1, a1, a2, a2, a3, a3))
            grad_m = _tally(grad_m, _dot3(g1, m1, g2, m2, g3, m3))
            m_sq = _tally(m_sq, _dot3(k1, k1, k2, k2, k3, k3))
        for i in range(3 * size, stop - start):
            r, d, a, g, m, k = _momentum_element(whole, i, rule, hyper)
            grad_sq = _tally(grad_sq, r * r)
            update_sq = _tally(update_sq, d * d)
            param_sq = _tally(param_sq, a * a)
            grad_m = _tally(grad_m, g * m)
            m_sq = _tally(m_sq, k * k)
        sums = (grad_sq, update_sq, param_sq, grad_m, m_sq)
        _momentum_chunk(probe, c, theta, grad, buffer, hyper, sums)


# -- adam ----------------------------------------------------------------------------
@numba.njit(**_JIT)
def _adam_element(arrays, i, step_size, sqrt_bias2, rule, like):
    """Update element ``i`` of ``arrays`` (θ, g, m, v, v_max or None); return
    what a probe sums: (g as stored, Δθ as stored, θ after, the bits of the
    ``v`` the step used, as stored)."""
    theta, grad, m_, v_, vmax_ = arrays
    weight1, beta2, weight2, eps, l2, decay, sign, one, zero = rule
    th0 = _load(theta, i, like)
    th = th0 * decay  # decoupled decay, else decay=1
    raw = _load(grad, i, like)
    g = sign * raw
    if l2 != 0:
        g = g + l2 * th
    m = _lerp(_load(m_, i, like), g, weight1, one)
    v = _load(v_, i, like) * beta2 + weight2 * (g * g)
    _store(m_, i, m)
    _store(v_, i, v)
    v = _running_max(vmax_, i, v, like)
    denom = np.sqrt(v) / sqrt_bias2 + eps
    update = zero if denom == 0 else m / denom
    new = th - step_size * update
    _store(theta, i, new)
    after = _as_stored(theta, new)
    return raw, after - th0, after, _raw_bits(_as_stored(_either(vmax_, v_), v))


@numba.njit(**_JIT)
def adam_kernel(
    params,  # int64 addresses, one per tensor
    grads,
    exp_avgs,
    exp_avg_sqs,
    max_exp_avg_sqs,  # addresses, or zeros when not amsgrad
    sizes,
    chunk_tensor,
    chunk_start,
    next_chunk,  # int64[1], shared by the calling threads: the next chunk to take
    last,  # the number of chunks
    step_sizes,  # compute dtype, per tensor: lr / (1 - beta1^t)
    sqrt_bias2s,  # compute dtype, per tensor: sqrt(1 - beta2^t)
    hyper,  # compute dtype: 1-beta1, beta2, 1-beta2, eps, l2, decay factor, sign
    param_like,
    grad_like,
    state_like,
    max_like,  # state_like with amsgrad, else None: compiled without the max
    probe,  # None, or (partials (chunks, len(ADAM)), float64 [lr, eps], c2 per
    # tensor, thresholds per tensor, bins and cuts per table, table and
    # histogram stride per tensor)
):
    sign = hyper[6]
    one, zero = sign * sign, sign - sign  # in the compute dtype
    rule = (hyper[0], hyper[1], hyper[2], hyper[3], hyper[4], hyper[5], sign, one, zero)
    counts = _counts(probe)
    while True:
        c = _claim(next_chunk)
        if c >= last:
            break
        t, start = chunk_tensor[c], chunk_start[c]
        stop = min(start + CHUNK, sizes[t])
        step_size, sqrt_bias2 = step_sizes[t], sqrt_bias2s[t]
        theta = _view(params, sizes, t, start, stop, param_like)
        grad = _view(grads, sizes, t, start, stop, grad_like)
        m_ = _view(exp_avgs, sizes, t, start, stop, state_like)
        v_ = _view(exp_avg_sqs, sizes, t, start, stop, state_like)
        vmax_ = _optional_view(max_exp_avg_sqs, sizes, t, start, stop, max_like)
        whole = (theta, grad, m_, v_, vmax_)
        size = (stop - start) // 3
        p1, p2, p3 = (
            _parts(whole, 0, size),
            _parts(whole, 1, size),
            _parts(whole, 2, size),
        )
        if probe is None:  # the same loop (see "Parts" above), without sums
            for i in range(size):
                _adam_element(p1, i, step_size, sqrt_bias2, rule, hyper)
                _adam_element(p2, i, step_size, sqrt_bias2, rule, hyper)
                _adam_element(p3, i, step_size, sqrt_bias2, rule, hyper)
            for i in range(3 * size, stop - start):
                _adam_element(whole, i, step_size, sqrt_bias2, rule, hyper)
            continue
        _open(probe, c, stop - start)
        grad_sq = update_sq = param_sq = _zero(hyper)
        low, high = _empty_range(hyper)
        for i in range(size):
            r1, d1, a1, v1 = _adam_element(p1, i, step_size, sqrt_bias2, rule, hyper)
            r2, d2, a2, v2 = _adam_element(p2, i, step_size, sqrt_bias2, rule, hyper)
            r3, d3, a3, v3 = _adam_element(p3, i, step_size, sqrt_bias2, rule, hyper)
            grad_sq = _tally(grad_sq, _dot3(r1, r1, r2, r2, r3, r3))
            update_sq = _tally(update_sq, _dot3(d1, d1, d2, d2, d3, d3))
            param_sq = _tally(param_sq, _dot3(a1, a1, a2, a2, a3, a3))
            low = _umin(low, _umin(_umin(v1, v2), v3))
            high = _umax(high, _umax(_umax(v1, v2), v3))
        for i in range(3 * size, stop - start):
            r, d, after, bits = _adam_element(
                whole, i, step_size, sqrt_bias2, rule, hyper
            )
            grad_sq = _tally(grad_sq, r * r)
            update_sq = _tally(update_sq, d * d)
            param_sq = _tally(param_sq, after * after)
            low, high = _umin(low, bits), _umax(high, bits)
        sums = (grad_sq, update_sq, param_sq, low, high)
        used = _either(vmax_, v_)
        _adam_chunk(probe, c, t, theta, grad, used, start, hyper, sums, counts)
