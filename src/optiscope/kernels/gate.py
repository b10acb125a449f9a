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
    for row, param in enumerate(params):
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
    if addresses and plain:
        _check_memory(columns, labels)


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
    if writable and any(
        stride == 0 and size > 1
        for stride, size in zip(t.stride(), t.shape, strict=True)
    ):
        raise ValueError(
            f"{where} stores one element for several indices (stride 0); "
            "it cannot be updated in place"
        )


def _check_memory(columns: Sequence[Column], labels: Sequence[str] | None) -> None:
    """Non-zero addresses, and no byte shared between two tensors of the call."""
    starts, stops, names = [], [], []
    for column in columns:
        for row, t in enumerate(column.tensors):
            if t.numel() == 0 or t.device.type not in _KERNEL_DEVICES:
                continue
            address = t.data_ptr()
            where = f"{column.name} of parameter {_label(labels, row)}"
            if address == 0:
                raise ValueError(f"{where} has elements but no memory (address 0)")
            span = sum(
                (n - 1) * abs(s) for n, s in zip(t.shape, t.stride(), strict=True)
            )
            low = (
                address
                - sum(
                    (n - 1) * -s
                    for n, s in zip(t.shape, t.stride(), strict=True)
                    if s < 0
                )
                * t.element_size()
            )
            starts.append(low)
            stops.append(low + (span + 1) * t.element_size())
            names.append(where)
    if len(starts) < 2:
        return
    start, stop = np.array(starts, np.int64), np.array(stops, np.int64)
    order = np.argsort(start, kind="stable")
    running_stop = np.maximum.accumulate(stop[order])
    clash = np.flatnonzero(start[order][1:] < running_stop[:-1])
    if clash.size:
        second = int(order[clash[0] + 1])
        first = int(
            order[: clash[0] + 1][
                np.argmax(stop[order][: clash[0] + 1] > start[second])
            ]
        )
        raise ValueError(
            f"{names[second]} shares memory with {names[first]}; "
            "the tensors of a step must not overlap"
        )
