"""Behind the operators: the gate, one contiguity rule, then a backend per device.

Every fused call goes through the same four stages:

1. :func:`~optiscope.kernels.gate.check_rows` checks every tensor; nothing has
   been modified if it raises;
2. Adam's step counters advance and their bias corrections are computed, once
   per distinct step count, by :func:`optiscope.rules.bias_corrections`;
3. rows are made flat: a row whose tensors are all dense with the parameter's
   strides (contiguous, ``channels_last`` or any other order) is passed as flat
   views of its memory, since the rules are elementwise; any other row is copied
   to contiguous tensors and the written ones are copied back afterwards;
4. each device's rows go to its backend (:mod:`.cpu`, :mod:`.triton` for
   CUDA, :mod:`.torch_rule` for anything else), each with fresh probe rows that
   are then folded into the caller's.

Until the CPU kernels are loaded (:mod:`.loading`), a plain float32 or float64
CPU step skips stages 3 and 4 (its rows are contiguous) and runs through
:mod:`.numpy_twin`, with bitwise the kernels' results.
"""

from __future__ import annotations

import functools
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from operator import attrgetter, methodcaller
from types import ModuleType

import numpy as np
import torch

from .. import _checks, rules
from . import loading, numpy_twin, rows, torch_rule
from .gate import PLAIN_TYPES, Column, Inspection, check_rows, is_plain
from .records import (
    AdamBatch,
    AdamHyper,
    MomentumBatch,
    MomentumHyper,
    StochasticRounding,
)

_warned: set[tuple[str, torch.dtype]] = set()


def momentum(
    batch: MomentumBatch,
    hyper: MomentumHyper,
    stats: torch.Tensor | None,
    labels: Sequence[str] | None = None,
) -> None:
    """:func:`optiscope.rules.momentum_step` on every row of ``batch``, fused."""
    columns = momentum_columns(batch)
    seen = check_rows(columns, labels=labels)
    table = _stats_table(stats, len(batch.params), rows.MOMENTUM)
    if table is None and _while_loading(seen) and numpy_twin.takes(batch):
        loading.start(functools.partial(_warm, batch.params[0].dtype, hyper))
        numpy_twin.momentum_(batch, hyper)
        return

    def call(backend: ModuleType, tensors, part, picked, memory) -> None:
        extra = {} if memory is None else {"memory": memory}
        backend.momentum_(MomentumBatch(*tensors), hyper, part, **extra)

    _run(columns, seen, table, rows.MOMENTUM, call)


def adam(
    batch: AdamBatch,
    hyper: AdamHyper,
    steps: Sequence[torch.Tensor],
    stats: torch.Tensor | None,
    labels: Sequence[str] | None = None,
    rounding_seed: int | None = None,
    rounding_streams: Sequence[int] = (),
) -> None:
    """:func:`optiscope.rules.adam_step` on every row of ``batch``, fused; each
    ``steps[i]`` (a one-element tensor) is advanced by one first.
    ``batch.corrections`` and ``batch.rounding`` are ignored: they are made
    here from ``steps`` (and, with a ``rounding_seed``, from
    ``rounding_streams[i]``, row ``i``'s stochastic rounding stream)."""
    columns = adam_columns(batch, hyper.amsgrad)
    seen = check_rows(columns, labels=labels)
    check_steps(steps, len(batch.params), labels)
    check_streams(rounding_seed, rounding_streams, batch.exp_avgs)
    table = _stats_table(stats, len(batch.params), rows.ADAM)
    corrections = advance(steps, hyper)
    rounding = stochastic_rounding(rounding_seed, rounding_streams, steps)
    if (
        table is None
        and _while_loading(seen)
        and numpy_twin.takes([c.tensors for c in columns])
    ):
        loading.start(functools.partial(_warm, batch.params[0].dtype, hyper))
        numpy_twin.adam_(batch._replace(corrections=corrections), hyper)
        return

    def call(backend: ModuleType, tensors, part, picked, memory) -> None:
        m_max = tensors[4] if hyper.amsgrad else None
        mine = corrections if len(picked) == len(corrections) else None
        mine = mine or [corrections[i] for i in picked]
        sub = AdamBatch(*tensors[:4], m_max, mine, _pick_rounding(rounding, picked))
        extra = {} if memory is None else {"memory": memory}
        backend.adam_(sub, hyper, part, **extra)

    _run(columns, seen, table, rows.ADAM, call)


def momentum_columns(batch: MomentumBatch) -> list[Column]:
    return [
        Column("param", batch.params, written=True),
        Column("grad", batch.grads, written=False),
        Column("momentum_buffer", batch.buffers, written=True),
    ]


def adam_columns(batch: AdamBatch, amsgrad: bool) -> list[Column]:
    columns = [
        Column("param", batch.params, written=True),
        Column("grad", batch.grads, written=False),
        Column("exp_avg", batch.exp_avgs, written=True),
        Column("exp_avg_sq", batch.exp_avg_sqs, written=True),
    ]
    if amsgrad:
        if batch.max_exp_avg_sqs is None:
            raise ValueError("amsgrad needs max_exp_avg_sqs, got None")
        columns.append(Column("max_exp_avg_sq", batch.max_exp_avg_sqs, written=True))
    return columns


def check_steps(
    steps: Sequence[torch.Tensor], count: int, labels: Sequence[str] | None
) -> None:
    """Each step counter is a one-element real tensor holding a whole number >= 0."""
    if len(steps) != count:
        raise ValueError(f"steps has {len(steps)} counters for {count} parameters")
    for row, t in enumerate(steps):
        if not isinstance(t, torch.Tensor) or t.numel() != 1 or t.is_complex():
            name = repr(labels[row]) if labels is not None else f"params[{row}]"
            raise TypeError(
                f"step of parameter {name} must be a one-element real tensor, got {t!r}"
            )


def advance(
    steps: Sequence[torch.Tensor], hyper: AdamHyper
) -> list[rules.BiasCorrection]:
    """Add one to every counter; return each row's bias corrections."""
    if not steps:
        return []
    steps = list(steps)
    # torch's own kind of counter, with the kernels ready: one pass.
    if loading.ready() is not None and _float32_cpu_counters(steps):
        counts = (
            _cpu()
            .advance_steps(np.fromiter(map(_ADDRESS, steps), np.int64, len(steps)))
            .tolist()
        )
    else:  # other counters (a loaded checkpoint, say), or no kernels yet
        torch._foreach_add_(steps, 1)
        counts = [t.item() for t in steps]
    corrections = functools.cache(
        lambda t: rules.bias_corrections(
            hyper.beta1, hyper.beta2, t, hyper.bias_correction
        )
    )
    return [corrections(int(t)) for t in counts]


def check_streams(
    seed: int | None, streams: Sequence[int], exp_avgs: Sequence[torch.Tensor]
) -> None:
    """With stochastic rounding: bfloat16 moments, a seed in ``[0, 2^63)`` and
    one stream in ``[0, 2^31)`` per parameter."""
    if seed is None:
        return
    count = len(exp_avgs)
    dtypes = {t.dtype for t in exp_avgs}
    if dtypes - {torch.bfloat16}:
        raise TypeError(
            "stochastic rounding (a rounding_seed) needs bfloat16 moments, got "
            f"{', '.join(sorted(map(str, dtypes)))}"
        )
    if not 0 <= seed < 2**63:
        raise ValueError(f"rounding_seed must be in [0, 2**63), got {seed}")
    if len(streams) != count or not all(0 <= s < 2**31 for s in streams):
        raise ValueError(
            f"rounding_streams must hold one stream in [0, 2**31) per parameter "
            f"({count}), got {list(streams)[:8]}"
        )


def stochastic_rounding(
    seed: int | None, streams: Sequence[int], steps: Sequence[torch.Tensor]
) -> StochasticRounding | None:
    """The rows' stochastic rounding after :func:`advance` (each offset from
    the row's stream and new step count), or None to round to nearest."""
    if seed is None:
        return None
    offsets = [
        rules.rounding_offset(stream, int(t.item()))
        for stream, t in zip(streams, steps, strict=True)
    ]
    return StochasticRounding(seed, offsets)


def _pick_rounding(
    rounding: StochasticRounding | None, picked: list[int]
) -> StochasticRounding | None:
    if rounding is None or len(picked) == len(rounding.offsets):
        return rounding
    return StochasticRounding(rounding.seed, [rounding.offsets[i] for i in picked])


def _float32_cpu_counters(steps: list[torch.Tensor]) -> bool:
    return (
        set(map(type, steps)) <= _PLAIN
        and set(map(_DTYPE, steps)) == _FLOAT32
        and set(map(_DEVICE_TYPE, steps)) == _CPU
        and set(map(_NUMEL, steps)) == _ONE
    )


_PLAIN = frozenset(PLAIN_TYPES)
_FLOAT32, _CPU, _ONE = {torch.float32}, {True}, {1}
_DTYPE = attrgetter("dtype")
_DEVICE_TYPE = attrgetter("is_cpu")
_NUMEL = methodcaller("numel")
_ADDRESS = methodcaller("data_ptr")


def _stats_table(
    stats: torch.Tensor | None, count: int, layout: tuple[str, ...]
) -> np.ndarray | None:
    if stats is None:
        return None
    if not (
        type(stats) is torch.Tensor
        and stats.device.type == "cpu"
        and stats.dtype == torch.float64
        and stats.shape == (count, len(layout))
        and stats.is_contiguous()
    ):
        raise ValueError(
            f"stats must be a contiguous float64 CPU tensor of shape ({count}, "
            f"{len(layout)}), got {getattr(stats, 'dtype', type(stats))} "
            f"{tuple(getattr(stats, 'shape', ()))}"
        )
    return stats.numpy()


def fresh_rows(count: int, layout: tuple[str, ...]) -> np.ndarray:
    """Rows before any value: zeros, and an empty range for Adam's extrema."""
    table = np.zeros((count, len(layout)))
    if "step_min" in layout:
        table[:, layout.index("step_min")] = np.inf
        table[:, layout.index("step_max")] = -np.inf
    return table


def _flat(row: list[torch.Tensor]) -> list[tuple[torch.Tensor, bool]]:
    """Each tensor of the row as a contiguous tensor (a backend reads it as flat
    memory), and whether it is a copy. Contiguous tensors pass as they are;
    tensors dense in one common order are viewed in place; otherwise each
    non-contiguous one is copied."""
    if all(t.is_contiguous() for t in row):
        return [(t, False) for t in row]
    strides = row[0].stride()
    if all(t.stride() == strides for t in row) and _dense(row[0]):
        return [(t.as_strided((t.numel(),), (1,)), False) for t in row]
    return [(t, False) if t.is_contiguous() else (t.contiguous(), True) for t in row]


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t`` covers a gap-free block of memory once: contiguous after its
    dimensions are put in order of decreasing stride."""
    order = sorted(range(t.dim()), key=lambda d: t.stride(d), reverse=True)
    return t.permute(order).is_contiguous()


def _run(
    columns: list[Column],
    seen: Inspection,
    table: np.ndarray | None,
    layout: tuple[str, ...],
    call: Callable,
) -> None:
    """``call(backend, tensors, rows, picked)`` for each backend's rows."""
    params = columns[0].tensors
    memory = None
    if seen.simple and seen.device is not None:  # the usual case, no per-row work
        backend = _backend(params[0])
        routes = {backend: list(range(len(params)))}
        if backend is loading.ready():  # the CPU kernels take the gate's addresses
            memory = seen.memory
    else:
        routes = defaultdict(list)
        for i, p in enumerate(params):
            if p.numel() > 0:
                routes[_backend(p)].append(i)
    for backend, picked in routes.items():
        if seen.simple:
            flat = None
            tensors = [list(c.tensors) for c in columns]
        else:
            flat = [_flat([c.tensors[i] for c in columns]) for i in picked]
            tensors = [[row[k][0] for row in flat] for k in range(len(columns))]
        part = None if table is None else fresh_rows(len(picked), layout)
        call(backend, tensors, part, picked, memory)
        for i, row in zip(picked, flat, strict=True) if flat else ():
            for column, (view, is_copy) in zip(columns, row, strict=True):
                if is_copy and column.written:
                    column.tensors[i].copy_(view)
        if part is not None:
            for j, i in enumerate(picked):
                torch_rule.combine_row(table[i], part[j], layout)


def _cpu() -> ModuleType:
    # Loaded on the first CPU step, not with optiscope: numba's import and
    # cache load take about half a second.
    return loading.backend()


def _while_loading(seen: Inspection) -> bool:
    """Whether the rows are bound for the CPU backend, which is not ready yet."""
    return (
        loading.pending()
        and seen.simple
        and seen.device is not None
        and seen.device.type == "cpu"
    )


def _warm(
    dtype: torch.dtype, hyper: AdamHyper | MomentumHyper, cpu: ModuleType
) -> None:
    """One step of one element each through the kernels a plain step of ``dtype``
    takes (``hyper`` says which): the argument types of the coming steps, so the
    same compiled code."""
    row = [[torch.zeros(1, dtype=dtype)] for _ in range(5)]
    if isinstance(hyper, MomentumHyper):
        cpu.momentum_(MomentumBatch(*row[:3]), hyper, None)
        return
    vmax = row[4] if hyper.amsgrad else None
    batch = AdamBatch(*row[:4], vmax, [rules.BiasCorrection(1.0, 1.0)])
    cpu.adam_(batch, hyper, None)
    counter = torch.zeros(1)
    cpu.advance_steps(np.array([counter.data_ptr()], np.int64))


def _backend(t: torch.Tensor) -> ModuleType:
    if t.device.type == "cpu":
        return _cpu()
    if t.device.type == "cuda":
        triton = _triton()
        if triton is not None:
            return triton
        _warn_once(t, "Triton is not installed")
    else:
        _warn_once(t, "no fused kernel for this device")
    return torch_rule


@functools.cache
def _triton() -> ModuleType | None:
    try:
        from . import triton
    except ImportError:
        return None
    return triton


def _warn_once(t: torch.Tensor, why: str) -> None:
    key = (t.device.type, t.dtype)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(
            f"optiscope has no fused kernel for {t.dtype} on {t.device.type} "
            f"({why}); using the per-tensor torch rule",
            RuntimeWarning,
            stacklevel=4,
        )


def dropout(
    x: torch.Tensor,
    p: float,
    seed: int,
    offset: int,
    *,
    backward: bool = False,
    out: torch.Tensor | None = None,
    box: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
) -> torch.Tensor:
    """Inverted dropout with the Philox mask of ``(seed, offset)``, on ``x``'s device.

    Element ``i`` of the mask belongs to ``x``'s ``i``-th element in row-major
    (logical) order, whatever ``x``'s strides: a transposed or ``channels_last``
    tensor gets the mask of its contiguous copy, on every backend. The result
    has ``x``'s strides (``torch.empty_like``); with ``out=x`` it is written
    over ``x`` itself. A non-contiguous ``x`` is computed on a contiguous copy
    and copied to the result.

    ``box = (global_shape, start)`` makes ``x`` the block at ``start`` of a
    tensor of ``global_shape`` (a DTensor's shard): each element takes the bit
    of its row-major index in that tensor. No kernel takes such an index map,
    so the mask is generated on the host by :mod:`.torch_rule`.
    """
    if _checks.probability("p", p) in (0.0, 1.0):  # no mask to draw: no kernel
        raise ValueError(f"p must be in (0, 1) for a dropout mask, got {p!r}")
    if not 0 <= seed < 2**63 or not 0 <= offset < 2**63:
        raise ValueError(
            f"seed and offset must be in [0, 2**63), got seed={seed}, offset={offset}"
        )
    if not is_plain(x) or x.dtype not in rules.SUPPORTED_DTYPES:
        raise TypeError(
            f"dropout takes a plain dense tensor of dtype "
            f"{', '.join(map(str, rules.SUPPORTED_DTYPES))}, got a "
            f"{type(x).__name__} of dtype {x.dtype} and layout {x.layout}"
        )
    if out is not None and out is not x:
        raise ValueError(
            "out must be None or x itself (dropout writes in place only over its "
            "input), got another tensor"
        )
    if x.numel() > 0 and x.data_ptr() == 0:
        raise ValueError("dropout input has elements but no memory (address 0)")
    if box is not None:
        _check_box(x, *box)
        kernel = functools.partial(torch_rule.dropout_forward, box=box)
    else:
        backend = _backend(x)
        if backward and hasattr(backend, "dropout_backward"):
            kernel = backend.dropout_backward
        else:
            kernel = backend.dropout_forward
    if x.is_contiguous():
        return kernel(x, p, seed, offset, out=out)
    flat = x.contiguous()  # a copy of ours: the kernel may overwrite it
    flat = kernel(flat, p, seed, offset, out=flat)
    result = x if out is not None else torch.empty_like(x)
    return result.copy_(flat)


def _check_box(
    x: torch.Tensor, global_shape: tuple[int, ...], start: tuple[int, ...]
) -> None:
    """``x`` fits in a tensor of ``global_shape`` at ``start``, dimension by dimension."""
    if not (
        len(global_shape) == len(start) == x.dim()
        and all(
            s >= 0 and s + n <= g
            for s, n, g in zip(start, x.shape, global_shape, strict=True)
        )
    ):
        raise ValueError(
            f"a dropout block of shape {tuple(x.shape)} must fit in global_shape "
            f"{tuple(global_shape)} at start {tuple(start)}"
        )
