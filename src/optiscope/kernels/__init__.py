"""The one interface the optimizers and dropout call for their fused, one-pass work.

Five functions:

* :func:`momentum_` and :func:`adam_`: the rules of
  :func:`optiscope.momentum_step` and :func:`optiscope.adam_step`, exactly;
* :func:`dropout_forward` and :func:`dropout_backward`: inverted dropout with
  the Philox mask of :mod:`optiscope.kernels.philox`, regenerated, never stored;
* :func:`count_kept`: how many elements that mask keeps, for probes (CPU only).

Dispatch, per tensor:

* CPU tensors of float64, float32, bfloat16 or float16 go to the numba kernels
  in :mod:`optiscope.kernels.cpu` and :mod:`optiscope.kernels.cpu_dropout`
  (non-contiguous ones by copy-in/copy-out);
* CUDA tensors go to ``optiscope.kernels.triton_kernels`` (same four names),
  imported on the first CUDA tensor;
* anything else takes the per-tensor torch rule, with one warning per
  device and dtype.
"""

from __future__ import annotations

import functools
import math
import sys
import warnings
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from . import philox

__all__ = ["adam_", "count_kept", "dropout_backward", "dropout_forward", "momentum_"]

_CPU_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
_warned: set[tuple[str, torch.dtype]] = set()


# -- dispatch --------------------------------------------------------------------------
def _warn_once(device: torch.device, dtype: torch.dtype, why: str) -> None:
    key = (device.type, dtype)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(
            f"optiscope has no fused kernel for {dtype} on {device.type} ({why}); "
            "using the per-tensor torch path",
            RuntimeWarning,
            stacklevel=3,
        )


def _triton() -> Any | None:
    try:
        from . import triton_kernels
    except ImportError:
        return None
    return triton_kernels


def _backend(t: torch.Tensor) -> str:
    """``"cpu"``, ``"cuda"`` or ``"torch"`` (the per-tensor fallback)."""
    if t.device.type == "cpu" and t.dtype in _CPU_DTYPES:
        return "cpu"
    if t.device.type == "cuda" and _triton() is not None:
        return "cuda"
    why = "no Triton backend" if t.device.type == "cuda" else "unsupported"
    _warn_once(t.device, t.dtype, why)
    return "torch"


def _split(columns: Sequence[Sequence[Any]]) -> dict[str, list[int]]:
    """Indices of the tensors (``columns[0]``) that each backend takes."""
    routes: dict[str, list[int]] = defaultdict(list)
    for i, t in enumerate(columns[0]):
        routes[_backend(t)].append(i)
    return routes


def _pick(column: Sequence[Any] | None, indices: list[int]) -> list[Any] | None:
    return None if column is None else [column[i] for i in indices]


# -- CPU plumbing ------------------------------------------------------------------
def _numpy_like(dtype: torch.dtype) -> np.ndarray:
    """An empty array whose dtype tells the kernel how ``dtype`` is stored."""
    storage = {
        torch.float64: np.float64,
        torch.float32: np.float32,
        torch.bfloat16: np.uint16,  # bits; the kernel converts
        torch.float16: np.int16,  # bits; the kernel converts
    }[dtype]
    return np.empty(0, dtype=storage)


def _compute_dtype(*dtypes: torch.dtype) -> type:
    return np.float64 if torch.float64 in dtypes else np.float32


class _Contiguous:
    """Contiguous stand-ins for a list of tensors, copied back on ``close``."""

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self.originals = list(tensors)
        self.views = [t if t.is_contiguous() else t.contiguous() for t in tensors]

    def addresses(self) -> np.ndarray:
        return np.fromiter(
            (t.data_ptr() for t in self.views), np.int64, len(self.views)
        )

    def close(self) -> None:
        for original, view in zip(self.originals, self.views, strict=True):
            if view is not original:
                original.copy_(view)


def _chunks(sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tensor index, first element, elements) of every fixed-size chunk, in order."""
    from .cpu import CHUNK

    counts = -(-sizes // CHUNK)
    tensor = np.repeat(np.arange(sizes.size, dtype=np.int64), counts)
    first_chunk = np.repeat(np.cumsum(counts) - counts, counts)
    start = (np.arange(tensor.size, dtype=np.int64) - first_chunk) * CHUNK
    return tensor, start, np.minimum(sizes[tensor] - start, CHUNK)


_pool: ThreadPoolExecutor | None = None


def _run(kernel: Any, head: tuple, chunk_numel: np.ndarray, tail: tuple) -> None:
    """``kernel(*head, next_chunk, chunks, *tail)`` on ``torch.get_num_threads()``
    threads (this one included), all sharing the counter ``next_chunk`` from
    which each takes the next chunk it updates. Taken this way rather than cut
    into equal ranges, because right after a torch op (the backward pass) torch's
    OpenMP workers spin for a few milliseconds on the same cores, and a thread
    sharing its core with one would hold the whole step back. Results don't
    depend on who takes what: each chunk is computed, and its partial sums
    written, the same way whichever thread runs it."""
    global _pool
    from .cpu import CHUNK

    next_chunk = np.zeros(1, np.int64)
    chunks = chunk_numel.size
    threads = min(torch.get_num_threads(), chunks)
    if threads < 2 or int(chunk_numel.sum()) <= CHUNK:
        kernel(*head, next_chunk, chunks, *tail)
        return
    if _pool is None or _pool._max_workers < threads - 1:
        _pool = ThreadPoolExecutor(threads - 1, thread_name_prefix="optiscope")
    futures = [
        _pool.submit(kernel, *head, next_chunk, chunks, *tail)
        for _ in range(threads - 1)
    ]
    kernel(*head, next_chunk, chunks, *tail)
    for future in futures:
        future.result()


def _fold(
    stats: np.ndarray, rows: np.ndarray, partials: np.ndarray, chunk_tensor: np.ndarray
) -> None:
    """Reduce per-chunk partial rows per tensor, in chunk order, into ``stats[rows]``:
    sums add, ``step_min``/``step_max`` combine (NaN wins, as in torch)."""
    from . import rows as layout
    from . import cpu

    extrema = partials.shape[1] == len(layout.ADAM)
    cpu.fold_partials(stats, rows, partials, chunk_tensor, extrema)


def _groups(*columns: Sequence[torch.Tensor]) -> dict[tuple, list[int]]:
    """Indices of non-empty tensors grouped by the dtypes of their row."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i in range(len(columns[0])):
        if columns[0][i].numel() > 0:
            groups[tuple(c[i].dtype for c in columns)].append(i)
    return groups


def _momentum_cpu(
    params, grads, buffers, stats, rows, *, lr, momentum, weight_decay, maximize
):
    from . import cpu

    sign = -1.0 if maximize else 1.0
    for (p_dtype, g_dtype, b_dtype), idx in _groups(params, grads, buffers).items():
        compute = _compute_dtype(p_dtype, b_dtype)
        theta, grad, buffer = (
            _Contiguous([column[i] for i in idx]) for column in (params, grads, buffers)
        )
        sizes = np.array([params[i].numel() for i in idx], dtype=np.int64)
        hyper = np.array([lr, 1.0 - momentum, weight_decay, sign], compute)
        chunk_tensor, chunk_start, chunk_numel = _chunks(sizes)
        probe = None
        if stats is not None:
            partials = np.empty((chunk_tensor.size, stats.shape[1]))
            probe = (partials, np.array([sign, weight_decay]))
        head = (
            theta.addresses(),
            grad.addresses(),
            buffer.addresses(),
            sizes,
            chunk_tensor,
            chunk_start,
        )
        tail = (
            hyper,
            _numpy_like(p_dtype),
            _numpy_like(g_dtype),
            _numpy_like(b_dtype),
            probe,
        )
        _run(cpu.momentum_kernel, head, chunk_numel, tail)
        theta.close()
        buffer.close()
        if probe is not None:
            _fold(stats, rows[idx], probe[0], chunk_tensor)


def _adam_cpu(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    max_exp_avg_sqs,
    steps,
    stats,
    rows,
    *,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    decoupled_weight_decay,
    amsgrad,
    maximize,
    bias_correction,
):
    from . import rows as layout
    from . import cpu

    for (p_dtype, g_dtype, s_dtype), idx in _groups(params, grads, exp_avgs).items():
        compute = _compute_dtype(p_dtype, s_dtype)
        columns = [params, grads, exp_avgs, exp_avg_sqs]
        columns += [max_exp_avg_sqs] if amsgrad else []
        theta, grad, m, v, *vmax = (
            _Contiguous([column[i] for i in idx]) for column in columns
        )
        sizes = np.array([params[i].numel() for i in idx], dtype=np.int64)
        t = np.array([steps[i] for i in idx], dtype=np.float64)
        c1 = 1.0 - beta1**t if bias_correction else np.ones_like(t)
        c2 = 1.0 - beta2**t if bias_correction else np.ones_like(t)
        hyper = np.array(
            [
                1.0 - beta1,
                beta2,
                1.0 - beta2,
                eps,
                0.0 if decoupled_weight_decay else weight_decay,
                1.0 - lr * weight_decay if decoupled_weight_decay else 1.0,
                -1.0 if maximize else 1.0,
            ],
            compute,
        )
        chunk_tensor, chunk_start, chunk_numel = _chunks(sizes)
        probe = None
        if stats is not None:
            partials = np.empty((chunk_tensor.size, stats.shape[1]))
            if (c2 == c2[0]).all():  # the usual case: one step count for all
                unique, inverse = c2[:1], np.zeros(c2.size, np.int64)
            else:
                unique, inverse = np.unique(c2, return_inverse=True)
            below = cpu.step_thresholds(lr, eps, unique)
            bins, cuts = cpu.step_bins(below)
            tables = inverse.astype(np.int64)
            strides = [layout.hist_stride(n) for n in sizes.tolist()]
            probe = (
                partials,
                np.array([lr, eps]),
                c2,
                below[inverse],
                bins,
                cuts,
                tables,
                np.array(strides, np.int64),
            )
        head = (
            theta.addresses(),
            grad.addresses(),
            m.addresses(),
            v.addresses(),
            vmax[0].addresses() if amsgrad else np.zeros(len(idx), np.int64),
            sizes,
            chunk_tensor,
            chunk_start,
        )
        tail = (
            (lr / c1).astype(compute),
            np.sqrt(c2).astype(compute),
            hyper,
            _numpy_like(p_dtype),
            _numpy_like(g_dtype),
            _numpy_like(s_dtype),
            _numpy_like(s_dtype) if amsgrad else None,
            probe,
        )
        _run(cpu.adam_kernel, head, chunk_numel, tail)
        for written in (theta, m, v, *vmax):
            written.close()
        if probe is not None:
            _fold(stats, rows[idx], probe[0], chunk_tensor)


# -- probes on the torch fallback: from snapshots, in separate passes --------------------
def _check_stats(stats: np.ndarray | None, rows: int, layout_: tuple) -> None:
    if stats is None:
        return
    if not (
        isinstance(stats, np.ndarray)
        and stats.dtype == np.float64
        and stats.shape == (rows, len(layout_))
    ):
        raise ValueError(
            f"stats must be a float64 numpy array of shape ({rows}, {len(layout_)}), "
            f"got {getattr(stats, 'dtype', type(stats))} "
            f"{getattr(stats, 'shape', '')}"
        )


def _add_row(stats: np.ndarray, row: int, values: np.ndarray, layout_: tuple) -> None:
    """Fold one tensor's row into ``stats[row]`` as :func:`_fold` does."""
    if "step_min" in layout_:
        low, high = layout_.index("step_min"), layout_.index("step_max")
        stats[row, low] = np.minimum(stats[row, low], values[low])
        stats[row, high] = np.maximum(stats[row, high], values[high])
        values = values.copy()
        values[[low, high]] = 0.0
    stats[row] += values


# -- the interface -------------------------------------------------------------------------
def momentum_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    maximize: bool,
    stats: np.ndarray | None = None,
) -> None:
    """:func:`optiscope.momentum_step` on every ``(param, grad, buffer)``, fused.

    ``stats``: None, or a float64 array of shape ``(len(params),
    len(probes.layout.MOMENTUM))``, zeros or earlier sums; row ``i`` gets the sums
    of tensor ``i`` added. The CPU and CUDA kernels sum in the same pass as the
    update; the per-tensor torch fallback computes the rows from before/after
    copies, in extra passes.
    """
    from . import rows as layout
    from ..probes import measure

    _check_stats(stats, len(params), layout.MOMENTUM)
    options = dict(
        lr=lr, momentum=momentum, weight_decay=weight_decay, maximize=maximize
    )
    columns = (params, grads, momentum_buffers)
    for backend, idx in _split(columns).items():
        picked = [_pick(c, idx) for c in columns]
        if backend == "cpu":
            _momentum_cpu(*picked, stats, np.array(idx, np.int64), **options)
            continue
        if backend == "cuda":
            rows = _triton().momentum_(*picked, **options, probe=stats is not None)
            for j, i in enumerate(idx if rows is not None else []):
                _add_row(stats, i, rows[j], layout.MOMENTUM)
            continue
        if stats is not None:
            before = [p.detach().clone() for p in picked[0]]
            m_prev = [b.clone() for b in picked[2]]
        from ..momentum import momentum_step

        for p, g, b in zip(*picked, strict=True):
            momentum_step(p, g, b, **options)
        if stats is not None:
            for j, i in enumerate(idx):
                row = measure.torch_momentum_row(
                    before[j],
                    params[i],
                    grads[i],
                    m_prev[j],
                    momentum_buffers[i],
                    maximize=maximize,
                    weight_decay=weight_decay,
                )
                _add_row(stats, i, row, layout.MOMENTUM)


def adam_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    max_exp_avg_sqs: list[torch.Tensor] | None,
    steps: list[int],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    amsgrad: bool,
    maximize: bool,
    bias_correction: bool,
    stats: np.ndarray | None = None,
) -> None:
    """:func:`optiscope.adam_step` on every tensor, fused; ``steps[i]`` is its ``t``
    (already incremented). ``max_exp_avg_sqs`` is needed only with ``amsgrad``.

    ``stats``: None, or a float64 array of shape ``(len(params),
    len(probes.layout.ADAM))``, pre-initialised (zeros, ``step_min = +inf``,
    ``step_max = -inf``) or holding earlier rows; row ``i`` gets tensor ``i``'s
    sums added and its extrema combined. The CPU and CUDA kernels compute them in
    the same pass as the update (the CUDA histogram from its sample, read after);
    the per-tensor torch fallback from before/after copies, in extra passes.
    """
    from . import rows as layout
    from ..probes import measure

    _check_stats(stats, len(params), layout.ADAM)
    options = dict(
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        decoupled_weight_decay=decoupled_weight_decay,
        amsgrad=amsgrad,
        maximize=maximize,
        bias_correction=bias_correction,
    )
    for backend, idx in _split((params,)).items():
        picked = [
            _pick(c, idx)
            for c in (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)
        ]
        if backend == "cpu":
            _adam_cpu(*picked, stats, np.array(idx, np.int64), **options)
            continue
        if backend == "cuda":
            rows = _triton().adam_(*picked, **options, probe=stats is not None)
            for j, i in enumerate(idx if rows is not None else []):
                _add_row(stats, i, rows[j], layout.ADAM)
            continue
        if stats is not None:
            before = [p.detach().clone() for p in picked[0]]
        from ..adam import adam_step

        p, g, m, v, vmax, t = picked
        for k in range(len(p)):
            vmax_k = vmax[k] if amsgrad else None
            adam_step(p[k], g[k], m[k], v[k], vmax_k, step=t[k], **options)
        if stats is not None:
            for j, i in enumerate(idx):
                used = max_exp_avg_sqs[i] if amsgrad else exp_avg_sqs[i]
                row = measure.torch_adam_row(
                    before[j],
                    params[i],
                    grads[i],
                    used,
                    lr=lr,
                    eps=eps,
                    correction2=1.0 - beta2 ** steps[i] if bias_correction else 1.0,
                )
                _add_row(stats, i, row, layout.ADAM)


def _dropout(x: torch.Tensor, p: float, seed: int, offset: int) -> torch.Tensor:
    backend = _backend(x)
    if backend == "cuda":
        return _triton().dropout_forward(x, p, seed, offset)
    gamma = 1.0 / (1.0 - p)
    if backend == "torch":
        keep = philox.keep_mask(x.numel(), p, seed, offset)
        keep = torch.from_numpy(keep).to(x.device).view(x.shape)
        return torch.where(keep, x * gamma, 0.0)
    x = x.contiguous()
    out = torch.empty_like(x)
    _prefer_huge_pages(out)
    like = _numpy_like(x.dtype)
    compute = _compute_dtype(x.dtype)
    kernel = _pick_dropout_kernel("dropout_kernel", x.numel())
    kernel(
        _as_numpy(x, like),
        _as_numpy(out, like),
        philox.threshold(p),
        np.array([gamma], dtype=compute),
        np.uint64(seed),
        np.uint64(offset),
    )
    return out


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
    """Ask Linux for 2 MiB pages under a fresh, untouched output.

    A large dropout output is new memory, and on first touch the kernel faults it
    in 4 KiB page by page: for a 64 MiB tensor that costs as much as the dropout
    itself. ``MADV_HUGEPAGE`` (honoured where transparent huge pages are
    ``madvise`` or ``always``) makes it 32 faults. Only advice: the values are
    unchanged, and a refusal is ignored.
    """
    first = -(-t.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
    stop = (t.data_ptr() + t.numel() * t.element_size()) // _HUGE_PAGE * _HUGE_PAGE
    madvise = _madvise() if stop - first >= 2 * _HUGE_PAGE else None
    if madvise is not None:
        madvise(first, stop - first, _MADV_HUGEPAGE)


def _pick_dropout_kernel(name: str, numel: int) -> Any:
    """The ``prange`` kernel of :mod:`.cpu_dropout` with ``torch.get_num_threads()``
    threads when there is more than one chunk to share; its serial twin otherwise
    (waking numba's pool costs more than a small tensor's work)."""
    import numba

    from . import cpu_dropout

    threads = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    if threads < 2 or numel <= cpu_dropout.CHUNK:
        return getattr(cpu_dropout, f"{name}_serial")
    numba.set_num_threads(threads)
    return getattr(cpu_dropout, name)


def _as_numpy(t: torch.Tensor, like: np.ndarray) -> np.ndarray:
    bits = {np.dtype(np.uint16): torch.uint16, np.dtype(np.int16): torch.int16}
    if like.dtype in bits:
        t = t.view(bits[like.dtype])
    return t.reshape(-1).numpy()


def dropout_forward(x: torch.Tensor, p: float, seed: int, offset: int) -> torch.Tensor:
    r"""``y = x * (1/(1-p))`` where the Philox word of element ``i`` keeps it, else 0.

    ``0 < p < 1``; ``x`` contiguous; ``0 <= seed < 2^63``. The mask is
    :func:`optiscope.kernels.philox.keep_mask` of ``x.numel()`` elements, and
    :math:`\gamma = 1/(1-p)` is rounded to the compute dtype, as ``x * gamma``
    does in torch.
    """
    if not 0.0 < p < 1.0 or math.isnan(p):
        raise ValueError(f"dropout_forward needs 0 < p < 1, got {p!r}")
    return _dropout(x, p, seed, offset)


def dropout_backward(
    grad_y: torch.Tensor, p: float, seed: int, offset: int
) -> torch.Tensor:
    """The gradient of :func:`dropout_forward`: the same mask and scale on ``grad_y``."""
    if grad_y.device.type == "cuda" and _triton() is not None:
        return _triton().dropout_backward(grad_y, p, seed, offset)
    return dropout_forward(grad_y.contiguous(), p, seed, offset)


def count_kept(numel: int, p: float, seed: int, offset: int) -> int:
    """How many of ``numel`` elements the dropout mask keeps: ``keep_mask(...).sum()``.

    The same Philox words as :func:`dropout_forward` on a tensor of ``numel``
    elements, generated and compared on the CPU without reading or writing a
    tensor, so a probe can report the observed keep rate ``count / numel``
    (expected ``1 - p``). ``0 <= p <= 1``; ``0 <= seed < 2^63``.

    Example:
        >>> from optiscope.kernels import count_kept, philox
        >>> kept = count_kept(1000, 0.5, seed=7, offset=0)
        >>> kept == int(philox.keep_mask(1000, 0.5, seed=7).sum())
        True
    """
    if not 0.0 <= p <= 1.0 or math.isnan(p):
        raise ValueError(f"count_kept needs 0 <= p <= 1, got {p!r}")
    if numel < 0:
        raise ValueError(f"count_kept needs numel >= 0, got {numel!r}")
    if p == 1.0 or numel == 0:
        return 0  # the threshold 2^32 does not fit a word; nothing is kept
    kernel = _pick_dropout_kernel("count_kernel", numel)
    return int(kernel(numel, philox.threshold(p), np.uint64(seed), np.uint64(offset)))
