"""The one gate in front of every kernel: no address is taken before it passes.

A fused step hands raw addresses and sizes to numba or Triton, which trust
them. So before any of that, every tensor of the call is checked here:

* a plain dense ``torch.Tensor`` (``nn.Parameter`` included), not a subclass
  such as ``DTensor``, whose ``data_ptr()`` is 0;
* on the parameter's device, with the parameter's shape;
* of a supported dtype: the gradient in the parameter's, the states of a row
  in one dtype;
* holding memory (a non-zero address) when it has elements; a written tensor
  with no element stored twice (no stride-0 broadcast);
* sharing no byte with any other tensor of the call.

A failure raises before anything is modified, naming the parameter (its name
where the optimizer has one, else its position), the tensor and the mismatch.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter, methodcaller
from typing import NamedTuple

import numpy as np
import torch

from ..rules import SUPPORTED_DTYPES

#: The tensor types a kernel may address (a subclass may have its own dispatch).
PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)
#: Devices whose tensors a kernel addresses; others (meta) go to the torch rule.
_KERNEL_DEVICES = ("cpu", "cuda")
_ITEM_SIZE = {d: torch.empty(0, dtype=d).element_size() for d in SUPPORTED_DTYPES}
_PLAIN_SET = frozenset(PLAIN_TYPES)
_SUPPORTED_SET = frozenset(SUPPORTED_DTYPES)
_STRIDED = {torch.strided}
_SHAPE = attrgetter("shape")
_DEVICE = attrgetter("device")
_DTYPE = attrgetter("dtype")
_LAYOUT = attrgetter("layout")
_CONTIGUOUS = methodcaller("is_contiguous")
_ADDRESS = methodcaller("data_ptr")
_NUMEL = methodcaller("numel")


class Memory(NamedTuple):
    """Where the checked tensors lie, as the gate read it: a backend that takes
    addresses uses these instead of reading every tensor again."""

    #: Per column, the data address of each row's tensor (int64).
    addresses: list[np.ndarray]
    #: Elements per row.
    numels: np.ndarray
    #: Per row, the dtype of the parameter (and gradient), and of the states.
    dtypes: tuple[list[torch.dtype], list[torch.dtype]]


class Inspection(NamedTuple):
    """What the gate saw, so the dispatcher need not look again."""

    #: Every tensor is contiguous and has elements: rows go to a backend as they are.
    simple: bool
    #: The one device of every row, or None where rows differ.
    device: torch.device | None
    #: Addresses and sizes, where the gate read them (plain tensors, real memory).
    memory: Memory | None = None


class Column:
    """One tensor per row, by role: ``Column("exp_avg", tensors, written=True)``."""

    __slots__ = ("name", "tensors", "written")

    def __init__(
        self, name: str, tensors: Sequence[torch.Tensor], *, written: bool
    ) -> None:
        self.name = name
        self.tensors = tensors
        self.written = written


def is_plain(t: object) -> bool:
    """A dense tensor whose memory a kernel may address: ``torch.Tensor`` or
    ``nn.Parameter`` itself, strided, not a subclass with its own dispatch."""
    return type(t) in PLAIN_TYPES and t.layout == torch.strided  # type: ignore[attr-defined]


def _label(labels: Sequence[str] | None, row: int) -> str:
    return repr(labels[row]) if labels is not None else f"params[{row}]"


def check_rows(
    columns: Sequence[Column],
    *,
    labels: Sequence[str] | None = None,
    addresses: bool = True,
    plain: bool = True,
) -> Inspection:
    """Check every tensor of a fused call; raise TypeError or ValueError on the
    first mismatch, else return what the dispatcher and the backend need to know
    of them. ``columns[0]`` holds the parameters and ``columns[1]`` the
    gradients; the rest are states. ``addresses=False`` skips what needs real
    memory (addresses and overlap), for tensors traced by torch.compile;
    ``plain=False`` checks rows bound for the per-tensor torch rule, which may
    hold tensor subclasses and takes no address.

    Each property is read for a whole column at once (``map`` over C getters):
    a step of 200 tensors has 800 to check, and a Python loop over them cost
    more than the fused kernel's whole host side. A message is built, by
    :func:`_explain`, only for a row that fails.
    """
    params = columns[0].tensors
    count = len(params)
    for column in columns:
        if len(column.tensors) != count:
            raise ValueError(
                f"{column.name} has {len(column.tensors)} tensors for "
                f"{count} parameters"
            )
    for column in columns:
        tensors = column.tensors
        if plain and not set(map(type, tensors)) <= _PLAIN_SET:
            _explain_first(columns, labels, plain)
        if not plain and not all(isinstance(t, torch.Tensor) for t in tensors):
            _explain_first(columns, labels, plain)
    shapes = list(map(_SHAPE, params))
    devices = list(map(_DEVICE, params))
    dtypes = list(map(_DTYPE, params))
    states = columns[2].tensors if len(columns) > 2 else params
    state_dtypes = list(map(_DTYPE, states)) if len(columns) > 2 else dtypes
    if not (set(dtypes) | set(state_dtypes)) <= _SUPPORTED_SET:
        _explain_first(columns, labels, plain)
    simple = True
    found_addresses = []
    for c, column in enumerate(columns):
        tensors = column.tensors
        if c > 0:
            expected = dtypes if c < 2 else state_dtypes
            if (
                list(map(_SHAPE, tensors)) != shapes
                or list(map(_DEVICE, tensors)) != devices
                or (c != 2 and list(map(_DTYPE, tensors)) != expected)
            ):
                _explain_first(columns, labels, plain)
        reading = addresses and plain
        # Reading addresses refuses every layout but strided (sparse, mkldnn:
        # "Cannot access data pointer"), so only a traced call reads layouts.
        if not reading and set(map(_LAYOUT, tensors)) != _STRIDED:
            _explain_first(columns, labels, plain)
        try:
            contiguous = list(map(_CONTIGUOUS, tensors))
            found = list(map(_ADDRESS, tensors)) if reading else None
        except RuntimeError:
            _explain_first(columns, labels, plain)
        if not all(contiguous):
            simple = False
            for row, t in enumerate(tensors):
                if column.written and not contiguous[row] and not _no_broadcast(t):
                    _explain(columns, row, labels, plain)
        if reading:
            found_addresses.append((found, contiguous))
    numels = np.fromiter(map(_NUMEL, shapes), np.int64, count)
    if count and not numels.all():
        simple = False
    memory = None
    if addresses and plain and count:
        memory = _check_memory(
            columns, labels, found_addresses, numels, devices, (dtypes, state_dtypes)
        )
    first = devices[0] if devices else None
    one_device = first if devices.count(first) == len(devices) else None
    return Inspection(simple, one_device, memory)


def _explain_first(
    columns: Sequence[Column], labels: Sequence[str] | None, plain: bool
) -> None:
    """Raise the error of the first row that fails a check."""
    for row in range(len(columns[0].tensors)):
        try:
            _explain(columns, row, labels, plain)
        except AssertionError:
            continue
    raise AssertionError("the gate refused a call that no check explains")


def _check_memory(
    columns: Sequence[Column],
    labels: Sequence[str] | None,
    found: list[tuple[list[int], list[bool]]],
    numels: np.ndarray,
    devices: list[torch.device],
    dtypes: tuple[list[torch.dtype], list[torch.dtype]],
) -> Memory:
    """Non-zero addresses, and no byte shared between two tensors of the call."""
    count = len(numels)
    kernel_device = {d: d.type in _KERNEL_DEVICES for d in set(devices)}
    if all(kernel_device.values()):
        addressed = numels
    else:  # a meta tensor, say, takes no kernel and has no address
        mask = np.fromiter((kernel_device[d] for d in devices), bool, count)
        addressed = np.where(mask, numels, 0)
    address = np.array([a for a, _ in found], np.int64)  # (columns, rows)
    if not address.all():
        missing = (address == 0) & (addressed > 0)
        if missing.any():
            c, row = (int(k) for k in np.argwhere(missing)[0])
            name = f"{columns[c].name} of parameter {_label(labels, row)}"
            raise ValueError(f"{name} has elements but no memory (address 0)")
    item = [
        np.fromiter(map(_ITEM_SIZE.__getitem__, d), np.int64, count) for d in dtypes
    ]
    span = np.empty_like(address)
    for c, (_, contiguous) in enumerate(found):
        span[c] = addressed * item[0 if c < 2 else 1]
        if not all(contiguous):  # the bytes from the first element to the last
            for row in [r for r, flag in enumerate(contiguous) if not flag]:
                if addressed[row]:
                    t = columns[c].tensors[row]
                    span[c, row] = _span(t) * t.element_size()
    _check_overlap(columns, labels, address.ravel(), (address + span).ravel())
    return Memory(list(address), numels, dtypes)


def _span(t: torch.Tensor) -> int:
    """Elements from the first to the last of ``t`` (strides are >= 0 in torch)."""
    return 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))


def _no_broadcast(t: torch.Tensor) -> bool:
    return not any(
        stride == 0 and size > 1
        for stride, size in zip(t.stride(), t.shape, strict=True)
    )


def _explain(
    columns: Sequence[Column], row: int, labels: Sequence[str] | None, plain: bool
) -> None:
    """Raise the error for the first tensor of ``row`` that fails a check."""
    param = columns[0].tensors[row]
    state_dtype = None
    for index, column in enumerate(columns):
        t = column.tensors[row]
        where = f"{column.name} of parameter {_label(labels, row)}"
        _check_one(t, param, where, writable=column.written, plain=plain)
        if index == 1 and t.dtype != param.dtype:
            raise TypeError(
                f"{where} has dtype {t.dtype}, but the parameter is {param.dtype}; "
                "a gradient must have its parameter's dtype"
            )
        if index >= 2:
            if state_dtype is not None and t.dtype != state_dtype[1]:
                raise TypeError(
                    f"{where} has dtype {t.dtype}, but {state_dtype[0]} is "
                    f"{state_dtype[1]}; the states of a parameter share one dtype"
                )
            state_dtype = (column.name, t.dtype)
    raise AssertionError("a row failed the gate but no check explains it")


def _check_one(
    t: object, param: torch.Tensor, where: str, *, writable: bool, plain: bool
) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{where} must be a torch.Tensor, got {type(t).__name__}")
    if plain and not is_plain(t):
        raise TypeError(
            f"{where} is a {type(t).__name__} with layout {t.layout}; the fused "
            "kernels take plain dense tensors only"
        )
    if t.layout != torch.strided:
        raise TypeError(f"{where} has layout {t.layout}; a strided tensor is needed")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{where} has dtype {t.dtype}; supported: "
            f"{', '.join(str(d) for d in SUPPORTED_DTYPES)}"
        )
    if t.device != param.device:
        raise ValueError(
            f"{where} is on {t.device}, but the parameter is on {param.device}"
        )
    if t.shape != param.shape:
        raise ValueError(
            f"{where} has shape {tuple(t.shape)}, but the parameter has shape "
            f"{tuple(param.shape)} (a state or gradient from another model?)"
        )
    if writable and not _no_broadcast(t):
        raise ValueError(
            f"{where} stores one element for several indices (stride 0); "
            "it cannot be updated in place"
        )


def _check_overlap(
    columns: Sequence[Column],
    labels: Sequence[str] | None,
    start: np.ndarray,
    stop: np.ndarray,
) -> None:
    """Raise if two of the byte ranges ``[start, stop)`` intersect; range ``k``
    belongs to column ``k // rows``, row ``k % rows``."""
    if start.size < 2:
        return
    if start.size <= _FEW_RANGES:
        clash = _first_clash_few(start.tolist(), stop.tolist())
    else:
        clash = _first_clash_many(start, stop)
    if clash is not None:
        rows = len(columns[0].tensors)
        names = [
            f"{columns[i // rows].name} of parameter {_label(labels, i % rows)}"
            for i in clash
        ]
        raise ValueError(
            f"{names[0]} shares memory with {names[1]}; "
            "the tensors of a step must not overlap"
        )


#: Up to this many ranges a sort in Python is quicker than numpy's calls,
#: whose fixed cost dominates a step of a few tensors.
_FEW_RANGES = 32


def _first_clash_few(start: list[int], stop: list[int]) -> tuple[int, int] | None:
    """:func:`_first_clash_many` for a few ranges, in Python: the same answer."""
    order = sorted(
        (k for k in range(len(start)) if stop[k] > start[k]), key=start.__getitem__
    )
    reach = None
    for position, second in enumerate(order):
        if reach is not None and start[second] < reach:
            first = next(j for j in order[:position] if stop[j] > start[second])
            return second, first
        reach = stop[second] if reach is None else max(reach, stop[second])
    return None


def _first_clash_many(start: np.ndarray, stop: np.ndarray) -> tuple[int, int] | None:
    """The first range (in order of start, ties by index) that begins inside an
    earlier one, and the first earlier one it begins inside; empty ranges hold
    no byte. None if no two ranges intersect."""
    keep = np.flatnonzero(stop > start)
    start, stop = start[keep], stop[keep]
    order = np.argsort(start, kind="stable")
    reach = np.maximum.accumulate(stop[order])
    clash = np.flatnonzero(start[order][1:] < reach[:-1])
    if not clash.size:
        return None
    k = int(clash[0]) + 1
    second = int(order[k])
    first = int(order[:k][np.argmax(stop[order[:k]] > start[second])])
    return int(keep[second]), int(keep[first])
