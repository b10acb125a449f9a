r"""numba kernels for the CPU: one pass over memory per optimizer step.

Layout shared by every kernel:

* **Many tensors, one call.** The tensors of a step are described by int64
  arrays of data addresses and sizes; :func:`_typed_pointer` turns an address
  into a typed pointer and ``numba.carray`` into an array, so 200 small tensors
  cost one kernel launch, not 200.
* **Fixed chunks.** Work is cut into chunks of ``CHUNK`` elements of one tensor,
  whatever the thread count. Kernels take a range of chunks and run serially
  (``nogil``) on the threads of a pool in :mod:`optiscope.kernels` (dropout's,
  in :mod:`.cpu_dropout`, uses ``prange``). Every update is elementwise, so it
  is bitwise identical across runs and thread counts.
  A per-chunk partial sum (issue 5's probes) is one more output array indexed
  by chunk, reduced per tensor in chunk order afterwards: deterministic too.
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
from ..probes.layout import ADAM, HIST_BINS, HIST_MIN_EXP, HIST_START, HIST_STRIDE

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


# -- probes: per-chunk sums in the same pass -----------------------------------------
# A probe is None (compiled out: the kernel is the plain update) or a tuple
# ``(partials, hyper64, ...)``: ``partials[c]`` is chunk ``c``'s row of the
# layout in :mod:`optiscope.probes.layout`, overwritten by the kernel. With a
# probe, each chunk is updated in blocks of ``BLOCK`` elements and each block's
# sums are taken while it is still in L1, so memory is still crossed once.
# The update loop only keeps what the step overwrites (θ, and momentum's
# m_prev) in a scratch block; a read-back of the block (:func:`_adam_sums`,
# :func:`_momentum_sums`) then sums in float64. Fused into the update loop, the
# float64 type would halve its vector width (LLVM picks lanes for the widest
# type), which costs more than the read-back from L1. Reassociation is allowed on the sums' additions only (:func:`_sum`,
# a flag on the instruction), so they vectorize across lanes while the update
# keeps its bits. Counts and ``v``'s extrema work on the float's bits (a
# non-negative double orders like its bits), which needs no float flag. The
# histogram bins a sample, every ``HIST_STRIDE``-th element, by table
# (:func:`step_bins`): no root or division per element.

#: Elements per probed block: θ, g, m and v of a block fit in L1.
BLOCK = 2048
_EXPONENT = np.uint64(52)
_EXPONENT_MASK = np.uint64(0x7FF)
_ABS_MASK = np.uint64(0x7FFFFFFFFFFFFFFF)
_INF_BITS = np.uint64(0x7FF0000000000000)
_NO_BITS = np.uint64(0)
_ALL_BITS = np.uint64(0xFFFFFFFFFFFFFFFF)
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
def _sum(typingctx, total, value):
    """``total + value`` (float64) with reassociation allowed on this one addition,
    so a loop's running sum may be split across vector lanes; the flag sits on
    the instruction, not on the function, and the update around it keeps its
    IEEE order."""
    sig = types.float64(types.float64, types.float64)

    def codegen(context, builder, signature, args):
        return builder.fadd(args[0], args[1], flags=("reassoc",))

    return sig, codegen


def _block(probe):
    """Elements per inner loop: the whole chunk unprobed, ``BLOCK`` probed."""


@overload(_block)
def _block_overload(probe):
    if isinstance(probe, types.NoneType):
        return lambda probe: CHUNK
    return lambda probe: BLOCK


def _open(probe, c, n):
    """Start chunk ``c`` (``n`` elements): zero its row; Adam's extrema empty."""


@overload(_open)
def _open_overload(probe, c, n):
    if isinstance(probe, types.NoneType):
        return lambda probe, c, n: None

    def open_chunk(probe, c, n):
        row = probe[0][c]
        row[:] = 0.0
        row[0] = n
        if row.size > HIST_START:
            row[_STEP_MIN] = np.inf
            row[_STEP_MAX] = -np.inf

    return open_chunk


def _nonfinite(probe, row, grad_sq, grad, hyper):
    """Count a block's non-finite gradients into ``row[4]``, only where its Σg²
    says there may be some (a non-finite g makes Σg² inf or NaN; so can an
    overflow of finite float64 g, and then the count is 0, still exact)."""


@overload(_nonfinite)
def _nonfinite_overload(probe, row, grad_sq, grad, hyper):
    def count(probe, row, grad_sq, grad, hyper):
        if abs(grad_sq) < np.inf:
            return
        bad = 0
        for i in range(grad.size):
            bad += 0 if abs(_load(grad, i, hyper)) < np.inf else 1
        row[4] += bad

    return count


# None probes get 0, not None, for the running sums: a loop variable of type
# None keeps LLVM from vectorizing the plain update.
def _momentum_sums(probe, before, previous, theta, grad, buffer, hyper):
    """A block's Σg², Σ(Δθ)², Σθ², Σg·m_prev, Σm², read back while it is in
    L1; ``g`` is the gradient the EMA averages, in float64 like the oracle's."""


@overload(_momentum_sums)
def _momentum_sums_overload(probe, before, previous, theta, grad, buffer, hyper):
    def sums(probe, before, previous, theta, grad, buffer, hyper):
        sign, weight_decay = probe[1][0], probe[1][1]
        grad_sq, update_sq, param_sq, grad_m, m_sq = 0.0, 0.0, 0.0, 0.0, 0.0
        for i in range(theta.size):
            r = np.float64(_load(grad, i, hyper))
            th = np.float64(before[i])
            after = np.float64(_load(theta, i, hyper))
            m = np.float64(_load(buffer, i, hyper))
            g = r * sign + weight_decay * th
            delta = after - th
            grad_sq = _sum(grad_sq, r * r)
            update_sq = _sum(update_sq, delta * delta)
            param_sq = _sum(param_sq, after * after)
            grad_m = _sum(grad_m, g * np.float64(previous[i]))
            m_sq = _sum(m_sq, m * m)
        return grad_sq, update_sq, param_sq, grad_m, m_sq

    return sums


def _momentum_block(probe, scratch, c, theta, grad, buffer, hyper):
    """Add a block's sums to chunk ``c``'s row."""


@overload(_momentum_block)
def _momentum_block_overload(probe, scratch, c, theta, grad, buffer, hyper):
    if isinstance(probe, types.NoneType):
        return lambda probe, scratch, c, theta, grad, buffer, hyper: None

    def block_end(probe, scratch, c, theta, grad, buffer, hyper):
        before, previous = scratch
        acc = _momentum_sums(probe, before, previous, theta, grad, buffer, hyper)
        row = probe[0][c]
        row[1] += acc[0]
        row[2] += acc[1]
        row[3] += acc[2]
        row[5] += acc[3]
        row[6] += acc[4]
        _nonfinite(probe, row, acc[0], grad, hyper)

    return block_end


def _scratch(probe, like):
    """A probed kernel's θ-before buffer of one block (compute dtype)."""


@overload(_scratch)
def _scratch_overload(probe, like):
    if isinstance(probe, types.NoneType):
        return lambda probe, like: None
    return lambda probe, like: np.empty(BLOCK, like.dtype)


def _keep(scratch, i, value, other):
    """``scratch[i] = value`` where the kernel is probed; given a pair of
    buffers, ``scratch[0][i], scratch[1][i] = value, other``."""


@overload(_keep)
def _keep_overload(scratch, i, value, other):
    if isinstance(scratch, types.NoneType) or (
        isinstance(scratch, types.BaseTuple) and isinstance(scratch[0], types.NoneType)
    ):
        return lambda scratch, i, value, other: None
    if isinstance(scratch, types.BaseTuple):

        def keep_pair(scratch, i, value, other):
            scratch[0][i] = value
            scratch[1][i] = other

        return keep_pair

    def keep(scratch, i, value, other):
        scratch[i] = value

    return keep


def _adam_sums(probe, before, theta, grad, v_used, hyper):
    """A block's Σg², Σ(Δθ)², Σθ², and the bits of its least and greatest ``v``
    (a non-negative double orders like its bits; a NaN's lie above +inf's),
    read back while the block is in L1."""


@overload(_adam_sums)
def _adam_sums_overload(probe, before, theta, grad, v_used, hyper):
    def sums(probe, before, theta, grad, v_used, hyper):
        grad_sq, update_sq, param_sq, low, high = 0.0, 0.0, 0.0, _ALL_BITS, _NO_BITS
        for i in range(theta.size):
            r = np.float64(_load(grad, i, hyper))
            after = np.float64(_load(theta, i, hyper))
            delta = after - np.float64(before[i])
            bits = _double_bits(np.float64(_load(v_used, i, hyper)))
            grad_sq = _sum(grad_sq, r * r)
            update_sq = _sum(update_sq, delta * delta)
            param_sq = _sum(param_sq, after * after)
            low = min(low, bits)
            high = max(high, bits)
        return grad_sq, update_sq, param_sq, low, high

    return sums


def _adam_block(probe, before, c, tensor, theta, grad, v_used, lo, hyper):
    """Add a block (tensor index ``lo`` on) to chunk ``c``'s row. The effective
    step ``s = lr/(sqrt(v/c2)+eps)`` falls as ``v`` grows, so ``s``'s extrema
    are ``s`` of ``v``'s; ε-dominated is ``v`` below a threshold
    (:func:`step_thresholds`, exact), counted only where the least ``v`` is;
    the histogram bins the sampled elements (tensor index a multiple of
    ``HIST_STRIDE``) by ``s`` computed with the oracle's float64 operations."""


@overload(_adam_block)
def _adam_block_overload(probe, before, c, tensor, theta, grad, v_used, lo, hyper):
    if isinstance(probe, types.NoneType):
        return lambda probe, before, c, tensor, theta, grad, v_used, lo, hyper: None

    def block_end(probe, before, c, tensor, theta, grad, v_used, lo, hyper):
        acc = _adam_sums(probe, before, theta, grad, v_used, hyper)
        row = probe[0][c]
        lr, eps, correction2 = probe[1][0], probe[1][1], probe[2][tensor]
        row[1] += acc[0]
        row[2] += acc[1]
        row[3] += acc[2]
        _nonfinite(probe, row, acc[0], grad, hyper)
        low, high = acc[3], acc[4]
        if high > _INF_BITS:  # a NaN step: torch's min and max are NaN too
            row[_STEP_MIN] = row[_STEP_MAX] = np.nan
        elif row[_STEP_MIN] == row[_STEP_MIN]:
            smallest = lr / (np.sqrt(_bits_double(high) / correction2) + eps)
            largest = lr / (np.sqrt(_bits_double(low) / correction2) + eps)
            row[_STEP_MIN] = min(row[_STEP_MIN], smallest)
            row[_STEP_MAX] = max(row[_STEP_MAX], largest)
        below = probe[3][tensor][0]
        if low < _double_bits(below):
            dominated = 0
            for i in range(v_used.size):
                dominated += 1 if _load(v_used, i, hyper) < below else 0
            row[5] += dominated
        table = probe[6][tensor]
        bins, cuts = probe[4][table], probe[5][table]
        first = (HIST_STRIDE - lo % HIST_STRIDE) % HIST_STRIDE
        for i in range(first, v_used.size, HIST_STRIDE):
            v = np.float64(_load(v_used, i, hyper))
            bits = _double_bits(v)
            top = bits >> _EXPONENT
            k = bins[top]
            if k < 0:  # a range :func:`step_bins` leaves to the exact formula
                k = _octave(lr / (np.sqrt(v / correction2) + eps))
            elif bits >= cuts[top]:
                k -= 1
            row[HIST_START + k] += 1.0

    return block_end


@numba.njit(**_JIT)
def _octave(step):
    """:func:`optiscope.probes.layout.octave_bin`, from the exponent bits."""
    if not step > 0:
        return 0
    exponent = np.int64((_double_bits(step) >> _EXPONENT) & _EXPONENT_MASK)
    return min(max(exponent - _OCTAVE_BIAS, 0), HIST_BINS - 1)


def step_thresholds(lr: float, eps: float, correction2: np.ndarray) -> np.ndarray:
    """Per ``correction2``, the float64 ``v`` thresholds of the Adam probe:
    column 0 the least ``v`` with ``sqrt(v/c2) >= eps``; column ``k >= 1`` the
    least ``v`` whose step ``lr/(sqrt(v/c2)+eps)`` is below bin ``k``'s lower
    edge ``2^(k-1+HIST_MIN_EXP)``. Found by bisection over the bits of
    non-negative doubles (ordered like the doubles), evaluating ``s`` with the
    same float64 operations as the oracle, so the counts are exact."""
    c2 = np.ascontiguousarray(correction2, np.float64)
    edges = 2.0 ** (np.arange(HIST_BINS) - 1 + HIST_MIN_EXP)
    out = np.empty((c2.size, HIST_BINS))
    _bisect(float(lr), float(eps), c2, edges, out)
    return out


_HOST_JIT = dict(cache=True, error_model="numpy")  # x/0 is inf, as in numpy


@numba.njit(**_HOST_JIT)
def _bisect(lr, eps, c2, edges, out):
    """:func:`step_thresholds`' bisection, one threshold at a time."""
    for r in range(c2.size):
        for k in range(edges.size):
            low, high = _NO_BITS, _INF_BITS  # every predicate holds at +inf
            while low < high:
                mid = low + (high - low) // np.uint64(2)
                root = np.sqrt(_bits_double(mid) / c2[r])
                holds = root >= eps if k == 0 else lr / (root + eps) < edges[k]
                if holds:
                    high = mid
                else:
                    low = mid + np.uint64(1)
            out[r, k] = _bits_double(high)


def step_bins(
    lr: float, eps: float, correction2: np.ndarray, below: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per ``correction2`` (with its :func:`step_thresholds` row in ``below``),
    the histogram bin of ``v`` without a root or a division: indexed by the top
    12 bits of ``v`` (sign and exponent), ``bins`` is the bin of the range's
    least ``v`` and ``cuts`` the bits from which ``v`` is one bin lower. The step
    is monotone in ``v``, and over one octave of ``v`` it changes by at most
    √2, so it spans two bins at most; a range where the bins at its two ends
    differ otherwise (sign bit with -0.0, or ``eps`` near 0 with subnormal
    ``v``) gets bin -1, for the exact formula."""
    c2 = np.ascontiguousarray(correction2, np.float64)
    bins = np.empty((c2.size, 4096), np.int64)
    cuts = np.empty((c2.size, 4096), np.uint64)
    _fill_bins(float(lr), float(eps), c2, np.ascontiguousarray(below), bins, cuts)
    return bins, cuts


_MANTISSA = np.uint64((1 << 52) - 1)


@numba.njit(**_HOST_JIT)
def _fill_bins(lr, eps, c2, below, bins, cuts):
    for r in range(c2.size):
        for top in range(4096):
            least = np.uint64(top) << _EXPONENT
            first = _octave(lr / (np.sqrt(_bits_double(least) / c2[r]) + eps))
            greatest = _bits_double(least | _MANTISSA)
            last = _octave(lr / (np.sqrt(greatest / c2[r]) + eps))
            cuts[r, top] = _ALL_BITS
            bins[r, top] = first
            if last == first - 1 and top < 2048:
                cuts[r, top] = _double_bits(below[r, first])
            elif last != first:
                bins[r, top] = -1


def _either(first, second):
    """``first``, or ``second`` where ``first`` is None."""


@overload(_either)
def _either_overload(first, second):
    if isinstance(first, types.NoneType):
        return lambda first, second: second
    return lambda first, second: first


# -- momentum ----------------------------------------------------------------------
@numba.njit(**_JIT)
def momentum_kernel(
    params,  # int64 addresses, one per tensor
    grads,
    buffers,
    sizes,  # int64 numel per tensor
    chunk_tensor,  # int64 tensor index of each chunk
    chunk_start,  # int64 first element of each chunk
    first,  # this call updates chunks first..last-1
    last,
    hyper,  # compute dtype: lr, 1 - momentum, weight_decay, sign (-1 if maximize)
    param_like,
    grad_like,
    buffer_like,
    probe,  # None, or (partials (chunks, len(MOMENTUM)), float64 [sign, l2])
):
    lr, weight, weight_decay, sign = hyper[0], hyper[1], hyper[2], hyper[3]
    one = hyper[3] * hyper[3]
    block = _block(probe)
    scratch = _scratch(probe, hyper), _scratch(probe, hyper)
    for c in range(first, last):
        t, start = chunk_tensor[c], chunk_start[c]
        stop = min(start + CHUNK, sizes[t])
        _open(probe, c, stop - start)
        for lo in range(start, stop, block):  # one block unless probed
            hi = min(lo + block, stop)
            theta = _view(params, sizes, t, lo, hi, param_like)
            grad = _view(grads, sizes, t, lo, hi, grad_like)
            buffer = _view(buffers, sizes, t, lo, hi, buffer_like)
            for i in range(hi - lo):
                th = _load(theta, i, hyper)
                raw = _load(grad, i, hyper)
                g = sign * raw
                if weight_decay != 0:
                    g = g + weight_decay * th
                m_prev = _load(buffer, i, hyper)
                m = _lerp(m_prev, g, weight, one)
                new = th - lr * m
                _store(buffer, i, m)
                _store(theta, i, new)
                _keep(scratch, i, th, m_prev)
            _momentum_block(probe, scratch, c, theta, grad, buffer, hyper)


# -- adam ----------------------------------------------------------------------------
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
    first,  # this call updates chunks first..last-1
    last,
    step_sizes,  # compute dtype, per tensor: lr / (1 - beta1^t)
    sqrt_bias2s,  # compute dtype, per tensor: sqrt(1 - beta2^t)
    hyper,  # compute dtype: 1-beta1, beta2, 1-beta2, eps, l2, decay factor, sign
    param_like,
    grad_like,
    state_like,
    max_like,  # state_like with amsgrad, else None: compiled without the max
    probe,  # None, or (partials (chunks, len(ADAM)), float64 [lr, eps], c2 per tensor)
):
    weight1, beta2, weight2, eps = hyper[0], hyper[1], hyper[2], hyper[3]
    l2, decay, sign = hyper[4], hyper[5], hyper[6]
    one, zero = sign * sign, sign - sign
    block, before = _block(probe), _scratch(probe, hyper)
    for c in range(first, last):
        t, start = chunk_tensor[c], chunk_start[c]
        stop = min(start + CHUNK, sizes[t])
        step_size, sqrt_bias2 = step_sizes[t], sqrt_bias2s[t]
        _open(probe, c, stop - start)
        for lo in range(start, stop, block):  # one block unless probed
            hi = min(lo + block, stop)
            theta = _view(params, sizes, t, lo, hi, param_like)
            grad = _view(grads, sizes, t, lo, hi, grad_like)
            m_ = _view(exp_avgs, sizes, t, lo, hi, state_like)
            v_ = _view(exp_avg_sqs, sizes, t, lo, hi, state_like)
            vmax_ = _optional_view(max_exp_avg_sqs, sizes, t, lo, hi, max_like)
            used = _either(vmax_, v_)
            for i in range(hi - lo):
                th0 = _load(theta, i, hyper)
                th = th0 * decay  # decoupled decay, else decay=1
                raw = _load(grad, i, hyper)
                g = sign * raw
                if l2 != 0:
                    g = g + l2 * th
                m = _lerp(_load(m_, i, hyper), g, weight1, one)
                v = _load(v_, i, hyper) * beta2 + weight2 * (g * g)
                _store(m_, i, m)
                _store(v_, i, v)
                v = _running_max(vmax_, i, v, hyper)
                denom = np.sqrt(v) / sqrt_bias2 + eps
                update = zero if denom == 0 else m / denom
                new = th - step_size * update
                _store(theta, i, new)
                _keep(before, i, th0, None)
            _adam_block(probe, before, c, t, theta, grad, used, lo, hyper)
