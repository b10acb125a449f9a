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

import numpy as np
import torch

from ..rules import SUPPORTED_DTYPES

_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)
#: Devices whose tensors a kernel addresses; others (meta) go to the torch rule.
_KERNEL_DEVICES = ("cpu", "cuda")
_ITEM_SIZE = {d: torch.empty(0, dtype=d).element_size() for d in SUPPORTED_DTYPES}


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
    return type(t) in _PLAIN_TYPES and t.layout == torch.strided  # type: ignore[attr-defined]


def _label(labels: Sequence[str] | None, row: int) -> str:
    return repr(labels[row]) if labels is not None else f"params[{row}]"


def check_rows(
    columns: Sequence[Column],
    *,
    labels: Sequence[str] | None = None,
    addresses: bool = True,
    plain: bool = True,
) -> None:
    """Check every tensor of a fused call; raise TypeError or ValueError on the
    first mismatch. ``columns[0]`` holds the parameters and ``columns[1]`` the
    gradients; the rest are states. ``addresses=False`` skips what needs real
    memory (addresses and overlap), for tensors traced by torch.compile;
    ``plain=False`` checks rows bound for the per-tensor torch rule, which may
    hold tensor subclasses and takes no address."""
    params = columns[0].tensors
    for column in columns:
        if len(column.tensors) != len(params):
            raise ValueError(
                f"{column.name} has {len(column.tensors)} tensors for "
                f"{len(params)} parameters"
            )
    kinds = _PLAIN_TYPES if plain else None
    memory = addresses and plain
    starts: list[int] = []
    stops: list[int] = []
    where: list[tuple[int, int]] = []
    # One pass of a handful of attribute reads per tensor: the message is
    # built, by _explain, only for a row that fails.
    for row, param in enumerate(params):
        if not isinstance(param, torch.Tensor):
            _explain(columns, row, labels, plain)
        shape, device, dtype = param.shape, param.device, param.dtype
        state_dtype = columns[2].tensors[row].dtype if len(columns) > 2 else dtype
        addressed = memory and device.type in _KERNEL_DEVICES
        for c, column in enumerate(columns):
            t = column.tensors[row]
            kind = type(t)
            t_dtype = t.dtype if isinstance(t, torch.Tensor) else None
            if not (
                (kind in kinds if kinds is not None else t_dtype is not None)
                and t_dtype == (dtype if c < 2 else state_dtype)
                and t_dtype in SUPPORTED_DTYPES
                and t.shape == shape
                and t.device == device
                and t.layout == torch.strided
            ):
                _explain(columns, row, labels, plain)
            contiguous = t.is_contiguous()
            if column.written and not contiguous and not _no_broadcast(t):
                _explain(columns, row, labels, plain)
            if addressed:
                numel = t.numel()
                if numel == 0:
                    continue
                address = t.data_ptr()
                if address == 0:
                    name = f"{column.name} of parameter {_label(labels, row)}"
                    raise ValueError(f"{name} has elements but no memory (address 0)")
                span = numel if contiguous else _span(t)
                starts.append(address)
                stops.append(address + span * _ITEM_SIZE[t_dtype])
                where.append((c, row))
    if len(starts) > 1:
        _check_overlap(columns, labels, starts, stops, where)


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
    starts: list[int],
    stops: list[int],
    where: list[tuple[int, int]],
) -> None:
    """Raise if two of the byte ranges ``[start, stop)`` intersect."""
    start, stop = np.array(starts, np.int64), np.array(stops, np.int64)
    order = np.argsort(start, kind="stable")
    reach = np.maximum.accumulate(stop[order])
    clash = np.flatnonzero(start[order][1:] < reach[:-1])
    if clash.size:
        k = int(clash[0]) + 1
        second = int(order[k])
        first = int(order[:k][np.argmax(stop[order[:k]] > start[second])])
        names = [
            f"{columns[c].name} of parameter {_label(labels, row)}"
            for c, row in (where[second], where[first])
        ]
        raise ValueError(
            f"{names[0]} shares memory with {names[1]}; "
            "the tensors of a step must not overlap"
        )
