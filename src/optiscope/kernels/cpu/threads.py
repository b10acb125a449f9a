"""Fixed chunks, claimed one at a time by the threads of torch's OpenMP team.

A kernel sees the tensors of a step as int64 arrays of data addresses and
sizes (:func:`view` makes a chunk's arrays from them), so 200 small tensors
cost one call, not 200.

Work is cut into chunks of :data:`CHUNK` elements of one tensor, whatever the
thread count. The same kernel runs (``nogil``) on every thread of the team
torch's own ops use (:func:`run`), each taking the next free chunk from a shared counter (:func:`claim`) until none is left.
Every update is elementwise and a chunk is computed the same way whichever
thread takes it, so results are bitwise identical across runs and thread
counts; a probe's per-chunk sums are reduced per tensor in chunk order
afterwards (:func:`~optiscope.kernels.cpu.tables.fold_partials`).
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.core.errors import TypingError
from numba.extending import intrinsic, overload

from .bits import typed_pointer
from .jit import JIT

#: Elements per unit of parallel work: large enough to amortise scheduling,
#: small enough that 2 threads balance on a few tensors. A multiple of 4
#: (the Philox block), so dropout chunks start on a block.
CHUNK = 1 << 16


class Chunks(NamedTuple):
    """The work of one kernel call: every tensor cut into chunks, in order."""

    sizes: np.ndarray  # int64 numel of each tensor
    tensor: np.ndarray  # int64 tensor of each chunk
    start: np.ndarray  # int64 first element of each chunk, in its tensor
    taken: np.ndarray  # int64[1]: chunks claimed so far, shared by the threads


def chunk_table(sizes: np.ndarray) -> Chunks:
    """The chunks of tensors of ``sizes`` (int64) elements, none claimed yet."""
    tensor, start = _cut(sizes.tobytes())
    return Chunks(sizes, tensor, start, np.zeros(1, np.int64))


@functools.lru_cache(maxsize=64)  # a training loop steps the same sizes each time
def _cut(sizes_bytes: bytes) -> tuple[np.ndarray, np.ndarray]:
    """The tensor and first element of each chunk (read-only, shared by calls)."""
    sizes = np.frombuffer(sizes_bytes, np.int64)
    counts = -(-sizes // CHUNK)
    tensor = np.repeat(np.arange(sizes.size, dtype=np.int64), counts)
    first_chunk = np.repeat(np.cumsum(counts) - counts, counts)
    start = (np.arange(tensor.size, dtype=np.int64) - first_chunk) * CHUNK
    tensor.flags.writeable = start.flags.writeable = False
    return tensor, start


@intrinsic
def claim(typingctx, counter):
    """Take the next chunk: ``counter[0] += 1`` as one atomic operation,
    returning the value before. Threads that share ``counter`` each take the
    chunks they get to, so a thread slowed by another process on its core
    takes fewer."""
    if not (isinstance(counter, types.Array) and counter.dtype == types.int64):
        raise TypingError("counter must be an int64 array")
    sig = types.int64(counter)

    def codegen(context, builder, signature, args):
        array = context.make_array(signature.args[0])(context, builder, args[0])
        one = ir.Constant(ir.IntType(64), 1)
        return builder.atomic_rmw("add", array.data, one, "monotonic")

    return sig, codegen


# -- a chunk's arrays -----------------------------------------------------------------
@numba.njit(**JIT)
def view(addresses, sizes, tensor, start, stop, like):
    """Elements ``start:stop`` of tensor ``tensor`` as an array of ``like``'s dtype."""
    whole = numba.carray(typed_pointer(addresses[tensor], like), sizes[tensor])
    return whole[start:stop]


def optional_view(addresses, sizes, tensor, start, stop, like):
    """:func:`view`, or None where ``like`` is None (a state the rule doesn't use)."""


@overload(optional_view)
def _optional_view(addresses, sizes, tensor, start, stop, like):
    if isinstance(like, types.NoneType):
        return lambda addresses, sizes, tensor, start, stop, like: None
    return lambda addresses, sizes, tensor, start, stop, like: view(
        addresses, sizes, tensor, start, stop, like
    )


def _part(array, k, size):
    """``array[k*size:(k+1)*size]``, or None for None."""


@overload(_part)
def _part_overload(array, k, size):
    if isinstance(array, types.NoneType):
        return lambda array, k, size: None
    return lambda array, k, size: array[k * size : (k + 1) * size]


def parts(arrays, k, size):
    """Part ``k`` of three equal parts of a chunk's ``arrays`` (a tuple of 3 or 5,
    None allowed). The update loops walk the three in step (why: BENCHMARKS.md,
    "CPU kernel design history")."""


@overload(parts)
def _parts(arrays, k, size):
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


def either(first, second):
    """``first``, or ``second`` where ``first`` is None."""


@overload(either)
def _either(first, second):
    if isinstance(first, types.NoneType):
        return lambda first, second: second
    return lambda first, second: first


# -- the team ------------------------------------------------------------------------
# torch's CPU ops run on an OpenMP team whose workers, after each op, spin for a
# few milliseconds waiting for the next one. A pool of our own would share the
# cores with those spinning workers; handing the chunks to the same team instead
# puts the spinning threads to work (BENCHMARKS.md, "Sharing torch's cores").
_Job = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_jobs: dict[int, tuple[Any, Chunks, tuple, list[BaseException]]] = {}
_job_keys = itertools.count(1)


def _work(key: int) -> None:
    """One team thread's share of job ``key``: claim chunks until none is left."""
    kernel, chunks, args, errors = _jobs[key]
    try:
        kernel(chunks, *args)
    except BaseException as error:  # re-raised by run(), on the calling thread
        errors.append(error)


_work_entry = _Job(_work)


@functools.cache
def openmp_team() -> Callable[[Any, int, int, int], None] | None:
    """``GOMP_parallel`` of the OpenMP runtime torch's CPU ops run on, or None
    where torch uses another backend, the runtime can't be found (no
    ``/proc/self/maps``) or more than one candidate is loaded and none is torch's.
    GNU's, Intel's and LLVM's runtimes all export that entry point."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    runtime = re.compile(r"/lib(gomp|iomp5|omp)[-.][^/]*$")
    loaded = {line.split()[-1] for line in maps.splitlines() if runtime.search(line)}
    torch_lib = str(Path(torch.__file__).resolve().parent / "lib") + "/"
    if len(loaded) > 1:
        loaded = {path for path in loaded if path.startswith(torch_lib)}
    if len(loaded) != 1:
        return None
    try:
        entry = ctypes.CDLL(loaded.pop()).GOMP_parallel
    except (OSError, AttributeError):
        return None
    entry.argtypes = [_Job, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    entry.restype = None
    return entry


_pool: ThreadPoolExecutor | None = None


def run(kernel: Any, chunks: Chunks, *args: Any) -> None:
    """``kernel(chunks, *args)`` on ``torch.get_num_threads()`` threads (this one
    included), all claiming chunks from ``chunks.taken``: the threads of torch's
    own OpenMP team where :func:`openmp_team` finds it, else a pool of ours.
    Claimed rather than cut into equal ranges, so that a thread slowed by
    another process on its core takes fewer chunks instead of holding the step."""
    threads = min(torch.get_num_threads(), chunks.tensor.size)
    if threads < 2 or int(chunks.sizes.sum()) <= CHUNK:
        kernel(chunks, *args)
        return
    team = openmp_team()
    if team is not None:
        key = next(_job_keys)
        errors: list[BaseException] = []
        _jobs[key] = (kernel, chunks, args, errors)
        try:
            team(_work_entry, key, threads, 0)  # ctypes lets go of the GIL
        finally:
            del _jobs[key]
        if errors:
            raise errors[0]
        return
    global _pool
    if _pool is None or _pool._max_workers < threads - 1:
        _pool = ThreadPoolExecutor(threads - 1, thread_name_prefix="optiscope")
    futures = [_pool.submit(kernel, chunks, *args) for _ in range(threads - 1)]
    kernel(chunks, *args)
    for future in futures:
        future.result()
