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

from ..probes.layout import ADAM, HIST_BINS, HIST_MIN_EXP, HIST_START

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
# probe, each chunk is updated in blocks of ``BLOCK`` elements; a block's
# inputs are summed just before its update and its outputs just after, while
# they are still in L1, so memory is still crossed once. The sums run in
# float64 with reassociation allowed (vectorized); the update is untouched.

#: Elements per probed block: θ, g, m, v and the θ copy of a block fit in L1.
BLOCK = 2048
_STATS_JIT = dict(fastmath={"reassoc"})
_EXPONENT = np.uint64(52)
_EXPONENT_MASK = np.uint64(0x7FF)
_INF_BITS = np.uint64(0x7FF0000000000000)
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


def _block(probe):
    """Elements per inner loop: the whole chunk unprobed, ``BLOCK`` probed."""


@overload(_block)
def _block_overload(probe):
    if isinstance(probe, types.NoneType):
        return lambda probe: CHUNK
    return lambda probe: BLOCK


def _scratch(probe):
    """Per-call scratch of a probed kernel: θ of one block, sub-histograms."""


@overload(_scratch)
def _scratch_overload(probe):
    if isinstance(probe, types.NoneType):
        return lambda probe: None
    return lambda probe: (np.empty(BLOCK), None, np.empty(BLOCK))


def _open(probe, scratch, c, n):
    """Start chunk ``c`` (``n`` elements): zero its partial row and histograms."""


@overload(_open)
def _open_overload(probe, scratch, c, n):
    if isinstance(probe, types.NoneType):
        return lambda probe, scratch, c, n: None

    def open_chunk(probe, scratch, c, n):
        row = probe[0][c]
        row[:] = 0.0
        row[0] = n
        if row.size > HIST_START:  # Adam: extrema start empty
            row[_STEP_MIN] = np.inf
            row[_STEP_MAX] = -np.inf

    return open_chunk


def _close(probe, scratch, c):
    """End chunk ``c``: fold the sub-histograms into its row (Adam only)."""


@overload(_close)
def _close_overload(probe, scratch, c):
    if isinstance(probe, types.NoneType):
        return lambda probe, scratch, c: None

    def close_chunk(probe, scratch, c):
        row = probe[0][c]
        if row.size > HIST_START:  # "bin >= k" counts to bins
            row[HIST_START] = row[0]
            for k in range(HIST_BINS - 1):
                row[HIST_START + k] -= row[HIST_START + k + 1]

    return close_chunk


def _inputs(probe, scratch, c, theta, grad, buffer):
    """Before a block's update: Σg², non-finite g, θ saved; for momentum
    (``buffer`` given) Σ g·m_prev with g the gradient the EMA averages."""


@overload(_inputs, jit_options=_STATS_JIT)
def _inputs_overload(probe, scratch, c, theta, grad, buffer):
    if isinstance(probe, types.NoneType):
        return lambda probe, scratch, c, theta, grad, buffer: None
    momentum = not isinstance(buffer, types.NoneType)

    def inputs(probe, scratch, c, theta, grad, buffer):
        before, row, hyper = scratch[0], probe[0][c], probe[1]
        sign, weight_decay = hyper[0], hyper[1]
        grad_sq, grad_m, bad = 0.0, 0.0, 0
        for i in range(theta.size):
            th = _load(theta, i, before)
            raw = _load(grad, i, before)
            before[i] = th
            grad_sq += raw * raw
            bad += 0 if abs(raw) < np.inf else 1
            if momentum:
                g = raw * sign + weight_decay * th
                grad_m += g * _load(buffer, i, before)
        row[1] += grad_sq
        row[4] += bad
        if momentum:
            row[5] += grad_m

    return inputs


def _momentum_outputs(probe, scratch, c, theta, buffer):
    """After a block's update: Σ(Δθ)², Σθ², Σm²."""


@overload(_momentum_outputs, jit_options=_STATS_JIT)
def _momentum_outputs_overload(probe, scratch, c, theta, buffer):
    if isinstance(probe, types.NoneType):
        return lambda probe, scratch, c, theta, buffer: None

    def outputs(probe, scratch, c, theta, buffer):
        before, row = scratch[0], probe[0][c]
        update_sq, param_sq, m_sq = 0.0, 0.0, 0.0
        for i in range(theta.size):
            th = _load(theta, i, before)
            m = _load(buffer, i, before)
            update_sq += (th - before[i]) ** 2
            param_sq += th * th
            m_sq += m * m
        row[2] += update_sq
        row[3] += param_sq
        row[6] += m_sq

    return outputs


def _adam_outputs(probe, scratch, c, tensor, theta, v_used):
    """After a block's update: Σ(Δθ)², Σθ², and from the stored ``v_used`` the
    effective step ``s = lr/(sqrt(v_used/c2)+eps)``'s ε-dominated count, extrema
    and octave histogram, without a division, a root or a scatter per element:
    ``s`` falls as ``v`` grows, so ``s``'s extrema are ``s`` of ``v``'s, and a
    count of ``s`` against an edge is a count of ``v`` against a threshold
    (:func:`step_thresholds`, exact). Histogram columns hold "bin >= k" counts
    until :func:`_close` takes differences."""


@overload(_adam_outputs, jit_options=_STATS_JIT)
def _adam_outputs_overload(probe, scratch, c, tensor, theta, v_used):
    if isinstance(probe, types.NoneType):
        return lambda probe, scratch, c, tensor, theta, v_used: None

    def outputs(probe, scratch, c, tensor, theta, v_used):
        before, vs, row = scratch[0], scratch[2], probe[0][c]
        lr, eps, correction2 = probe[1][0], probe[1][1], probe[2][tensor]
        below = probe[3][tensor]  # [0]: sqrt(v/c2) < eps; [k]: bin >= k
        n = theta.size
        update_sq, param_sq, dominated, nans = 0.0, 0.0, 0, 0
        smallest, largest = np.inf, -np.inf
        for i in range(n):
            th = _load(theta, i, before)
            update_sq += (th - before[i]) ** 2
            param_sq += th * th
            v = _load(v_used, i, before)
            vs[i] = v
            dominated += 1 if v < below[0] else 0
            nans += 1 if v != v else 0
            smallest = v if v < smallest else smallest
            largest = v if v > largest else largest
        row[2] += update_sq
        row[3] += param_sq
        row[5] += dominated
        if nans > 0:  # a NaN step: torch's min and max are NaN too
            row[_STEP_MIN] = row[_STEP_MAX] = np.nan
        if nans < n:
            low = lr / (np.sqrt(largest / correction2) + eps)
            high = lr / (np.sqrt(smallest / correction2) + eps)
            if row[_STEP_MIN] == row[_STEP_MIN]:
                row[_STEP_MIN] = min(row[_STEP_MIN], low)
                row[_STEP_MAX] = max(row[_STEP_MAX], high)
            first, last = _octave(low), _octave(high)
            for k in range(1, first + 1):
                row[HIST_START + k] += n - nans
            for k in range(max(first + 1, 1), last + 1):
                count = 0
                for i in range(n):
                    count += 1 if vs[i] < below[k] else 0
                row[HIST_START + k] += count

    return outputs


@numba.njit(**_JIT)
def _octave(step):
    """:func:`optiscope.probes.layout.octave_bin`, from the exponent bits."""
    if not step > 0:
        return 0
    exponent = np.int64((_double_bits(step) >> _EXPONENT) & _EXPONENT_MASK)
    return min(max(exponent - _OCTAVE_BIAS, 0), HIST_BINS - 1)


def step_thresholds(lr: float, eps: float, correction2: np.ndarray) -> np.ndarray:
    """Per ``correction2``, the float64 ``v`` thresholds of :func:`_adam_outputs`:
    column 0 the least ``v`` with ``sqrt(v/c2) >= eps``; column ``k >= 1`` the
    least ``v`` whose step ``lr/(sqrt(v/c2)+eps)`` is below bin ``k``'s lower
    edge ``2^(k-1+HIST_MIN_EXP)``. Found by bisection over the bits of
    non-negative doubles (ordered like the doubles), evaluating ``s`` with the
    same float64 operations as the oracle, so the counts are exact."""
    c2 = np.asarray(correction2, np.float64)[:, None]
    edges = 2.0 ** (np.arange(HIST_BINS) - 1 + HIST_MIN_EXP)
    low = np.zeros((c2.shape[0], HIST_BINS), np.uint64)
    high = np.full_like(low, _INF_BITS)  # every predicate holds at +inf
    with np.errstate(divide="ignore", invalid="ignore"):
        for _ in range(64):
            mid = low + (high - low) // np.uint64(2)
            root = np.sqrt(mid.view(np.float64) / c2)
            holds = lr / (root + eps) < edges
            holds[:, 0] = root[:, 0] >= eps
            high = np.where(holds, mid, high)
            low = np.where(holds, low, mid + np.uint64(1))
    return high.view(np.float64)


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
    scratch, block = _scratch(probe), _block(probe)
    for c in range(first, last):
        t, start = chunk_tensor[c], chunk_start[c]
        stop = min(start + CHUNK, sizes[t])
        _open(probe, scratch, c, stop - start)
        for lo in range(start, stop, block):  # one block unless probed
            hi = min(lo + block, stop)
            theta = _view(params, sizes, t, lo, hi, param_like)
            grad = _view(grads, sizes, t, lo, hi, grad_like)
            buffer = _view(buffers, sizes, t, lo, hi, buffer_like)
            _inputs(probe, scratch, c, theta, grad, buffer)
            for i in range(hi - lo):
                th = _load(theta, i, hyper)
                g = sign * _load(grad, i, hyper)
                if weight_decay != 0:
                    g = g + weight_decay * th
                m = _lerp(_load(buffer, i, hyper), g, weight, one)
                _store(buffer, i, m)
                _store(theta, i, th - lr * m)
            _momentum_outputs(probe, scratch, c, theta, buffer)


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
    scratch, block = _scratch(probe), _block(probe)
    for c in range(first, last):
        t, start = chunk_tensor[c], chunk_start[c]
        stop = min(start + CHUNK, sizes[t])
        step_size, sqrt_bias2 = step_sizes[t], sqrt_bias2s[t]
        _open(probe, scratch, c, stop - start)
        for lo in range(start, stop, block):  # one block unless probed
            hi = min(lo + block, stop)
            theta = _view(params, sizes, t, lo, hi, param_like)
            grad = _view(grads, sizes, t, lo, hi, grad_like)
            m_ = _view(exp_avgs, sizes, t, lo, hi, state_like)
            v_ = _view(exp_avg_sqs, sizes, t, lo, hi, state_like)
            vmax_ = _optional_view(max_exp_avg_sqs, sizes, t, lo, hi, max_like)
            _inputs(probe, scratch, c, theta, grad, None)
            for i in range(hi - lo):
                th = _load(theta, i, hyper) * decay  # decoupled decay, else decay=1
                g = sign * _load(grad, i, hyper)
                if l2 != 0:
                    g = g + l2 * th
                m = _lerp(_load(m_, i, hyper), g, weight1, one)
                v = _load(v_, i, hyper) * beta2 + weight2 * (g * g)
                _store(m_, i, m)
                _store(v_, i, v)
                v = _running_max(vmax_, i, v, hyper)
                denom = np.sqrt(v) / sqrt_bias2 + eps
                update = zero if denom == 0 else m / denom
                _store(theta, i, th - step_size * update)
            _adam_outputs(probe, scratch, c, t, theta, _either(vmax_, v_))
        _close(probe, scratch, c)
