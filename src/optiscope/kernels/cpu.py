r"""numba kernels for the CPU: one pass over memory per optimizer step and per dropout.

Layout shared by every kernel:

* **Many tensors, one call.** The tensors of a step are described by int64
  arrays of data addresses and sizes; :func:`_typed_pointer` turns an address
  into a typed pointer and ``numba.carray`` into an array, so 200 small tensors
  cost one kernel launch, not 200.
* **Fixed chunks.** Work is cut into chunks of ``CHUNK`` elements of one tensor,
  whatever the thread count, and ``prange`` runs over chunks. Every result is
  elementwise, so it is bitwise identical across runs and thread counts.
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

import types as pytypes

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core.errors import TypingError
from numba.extending import intrinsic, overload

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


# -- momentum ----------------------------------------------------------------------
@numba.njit(parallel=True, **_JIT)
def momentum_kernel(
    params,  # int64 addresses, one per tensor
    grads,
    buffers,
    sizes,  # int64 numel per tensor
    chunk_tensor,  # int64 tensor index of each chunk
    chunk_start,  # int64 first element of each chunk
    hyper,  # compute dtype: lr, 1 - momentum, weight_decay, sign (-1 if maximize)
    param_like,
    grad_like,
    buffer_like,
):
    lr, weight, weight_decay, sign = hyper[0], hyper[1], hyper[2], hyper[3]
    one = hyper[3] * hyper[3]
    for c in prange(chunk_tensor.size):
        t, start = chunk_tensor[c], chunk_start[c]
        stop = min(start + CHUNK, sizes[t])
        theta = _view(params, sizes, t, start, stop, param_like)
        grad = _view(grads, sizes, t, start, stop, grad_like)
        buffer = _view(buffers, sizes, t, start, stop, buffer_like)
        for i in range(stop - start):
            th = _load(theta, i, hyper)
            g = sign * _load(grad, i, hyper)
            if weight_decay != 0:
                g = g + weight_decay * th
            m = _lerp(_load(buffer, i, hyper), g, weight, one)
            _store(buffer, i, m)
            _store(theta, i, th - lr * m)


# -- adam ----------------------------------------------------------------------------
@numba.njit(parallel=True, **_JIT)
def adam_kernel(
    params,  # int64 addresses, one per tensor
    grads,
    exp_avgs,
    exp_avg_sqs,
    max_exp_avg_sqs,  # addresses, or zeros when not amsgrad
    sizes,
    chunk_tensor,
    chunk_start,
    step_sizes,  # compute dtype, per tensor: lr / (1 - beta1^t)
    sqrt_bias2s,  # compute dtype, per tensor: sqrt(1 - beta2^t)
    hyper,  # compute dtype: 1-beta1, beta2, 1-beta2, eps, l2, decay factor, sign
    param_like,
    grad_like,
    state_like,
    max_like,  # state_like with amsgrad, else None: compiled without the max
):
    weight1, beta2, weight2, eps = hyper[0], hyper[1], hyper[2], hyper[3]
    l2, decay, sign = hyper[4], hyper[5], hyper[6]
    one, zero = sign * sign, sign - sign
    for c in prange(chunk_tensor.size):
        t, start = chunk_tensor[c], chunk_start[c]
        stop = min(start + CHUNK, sizes[t])
        step_size, sqrt_bias2 = step_sizes[t], sqrt_bias2s[t]
        theta = _view(params, sizes, t, start, stop, param_like)
        grad = _view(grads, sizes, t, start, stop, grad_like)
        m_ = _view(exp_avgs, sizes, t, start, stop, state_like)
        v_ = _view(exp_avg_sqs, sizes, t, start, stop, state_like)
        vmax_ = _optional_view(max_exp_avg_sqs, sizes, t, start, stop, max_like)
        for i in range(stop - start):
            th = _load(theta, i, hyper) * decay  # decoupled decay; decay=1 otherwise
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


# -- serial twins --------------------------------------------------------------------------
def _serial_twin(
    kernel: numba.core.registry.CPUDispatcher,
) -> numba.core.registry.CPUDispatcher:
    """The same kernel compiled without threads (``prange`` runs as ``range``).

    Small steps take it: waking a thread pool costs more than the work, and
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


momentum_kernel_serial = _serial_twin(momentum_kernel)
adam_kernel_serial = _serial_twin(adam_kernel)
