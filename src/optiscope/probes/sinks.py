"""Where probe records go: memory, JSONL, CSV, TensorBoard, or a callback.

A record is one step of one probed object, a plain dict::

    {"step": 12, "source": "Adam", "groups": [{...}], "params": {"fc.weight": {...}}}

Every sink receives the same dicts; ``flatten`` turns one into
``(scope, metric, value)`` triples for the tabular sinks, leaving out
list-valued entries such as histograms (those are in the JSONL).

Copies (``copy.deepcopy``, ``pickle``, ``torch.save`` of a probed optimizer or
model): a :class:`History` is copied with its records. A file or TensorBoard
sink keeps its path but not its open file: the copy is *detached*. Its first
write warns once (:class:`DetachedSinkWarning`) and records then reach only
the probe's history, so a copy never interleaves its records with the
original's in one file, nor creates a file from another working directory.
``sink.reopen()`` on the copy appends to the file again. A
:class:`CallbackSink` keeps its function (pickling it needs a picklable
function, as pickle always does).
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol


class Sink(Protocol):
    def write(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def flatten(record: dict[str, Any]) -> Iterator[tuple[str, str, float]]:
    scopes = [(f"group{g['group']}", g) for g in record.get("groups", [])]
    scopes += list(record.get("params", {}).items())
    scopes += list(record.get("modules", {}).items())
    for scope, values in scopes:
        for metric, value in values.items():
            if isinstance(value, (int, float)) and metric != "group":
                yield scope, metric, float(value)


class History:
    """Keeps every record in memory: ``probe.history.records``.

    ``before_read`` runs before the records are read: an optimizer's probe
    builds its pending records there (see ``OptimizerProbe``).
    """

    def __init__(self, before_read: Callable[[], None] | None = None) -> None:
        self._records: list[dict[str, Any]] = []
        self._before_read = before_read

    @property
    def records(self) -> list[dict[str, Any]]:
        if self._before_read is not None:
            self._before_read()
        return self._records

    def write(self, record: dict[str, Any]) -> None:
        self._records.append(record)

    def series(self, scope: str, metric: str) -> list[float]:
        """One metric of one scope (``"group0"`` or a parameter name) over the steps."""
        return [
            v
            for r in self.records
            for s, m, v in flatten(r)
            if (s, m) == (scope, metric)
        ]

    def close(self) -> None:
        pass


class DetachedSinkWarning(UserWarning):
    """A copied file or TensorBoard sink was written to: it writes nowhere until
    ``reopen()`` is called on it."""


class _Detachable:
    """A sink with an open resource (a file, a SummaryWriter) that a copy does not
    share: a copy keeps the location and is detached until :meth:`reopen`."""

    #: The attributes holding the open resource, dropped from a copy.
    _open_attributes: tuple[str, ...] = ()
    _warned = False

    @property
    def detached(self) -> bool:
        """True for a copy that has not been reopened: records go nowhere."""
        return getattr(self, self._open_attributes[0]) is None

    def reopen(self) -> _Detachable:
        """Open the location again (appending to a file); a no-op if open."""
        if self.detached:
            self._open()
            self._warned = False
        return self

    def _open(self) -> None:
        raise NotImplementedError

    def _writable(self) -> bool:
        """Whether a record can be written; warns once where it cannot."""
        if not self.detached:
            return True
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"{self!r} is a copy (copy.deepcopy, pickle or torch.save) and is "
                "detached: records still reach the probe's history, not this sink. "
                "Call reopen() on it to append to the same location again.",
                DetachedSinkWarning,
                stacklevel=4,
            )
        return False

    def __getstate__(self) -> dict[str, Any]:
        # An open file cannot be pickled, and two objects writing one file would
        # interleave their records: the copy keeps the location only.
        state = dict(self.__dict__)
        for name in self._open_attributes:
            state[name] = None
        state["_warned"] = False
        return state


class JSONLSink(_Detachable):
    """One JSON object per line and step, flushed at once so a crash loses nothing.

    Appends to ``path``. A copy is detached until :meth:`reopen` (see the module).
    """

    _open_attributes = ("handle",)

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).absolute()
        self._open()

    def _open(self) -> None:
        self.handle = self.path.open("a", encoding="utf-8")

    def __repr__(self) -> str:
        return f"JSONLSink({str(self.path)!r})"

    def write(self, record: dict[str, Any]) -> None:
        if self._writable():
            self.handle.write(json.dumps(record, allow_nan=True) + "\n")
            self.handle.flush()

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


class CSVSink(_Detachable):
    """Long format: ``step,scope,metric,value``; one row per scalar.

    Appends to ``path`` (with a header if it is new or empty). A copy is
    detached until :meth:`reopen` (see the module).
    """

    _open_attributes = ("handle", "writer")

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).absolute()
        self._open()

    def _open(self) -> None:
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        self.handle = self.path.open("a", newline="", encoding="utf-8")
        self.writer = csv.writer(self.handle, lineterminator="\n")
        if fresh:
            self.writer.writerow(["step", "source", "scope", "metric", "value"])

    def __repr__(self) -> str:
        return f"CSVSink({str(self.path)!r})"

    def write(self, record: dict[str, Any]) -> None:
        if not self._writable():
            return
        for scope, metric, value in flatten(record):
            self.writer.writerow(
                [record["step"], record["source"], scope, metric, repr(value)]
            )
        self.handle.flush()

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


class TensorBoardSink(_Detachable):
    """Scalars as ``source/scope/metric`` through ``torch.utils.tensorboard``.

    Needs the ``tensorboard`` package (``pip install optiscope[tensorboard]``).
    A copy is detached until :meth:`reopen`, which starts a new event file in
    the same ``log_dir`` (see the module).
    """

    _open_attributes = ("writer",)

    def __init__(self, log_dir: str | Path) -> None:
        self.log_dir = Path(log_dir).absolute()
        self._open()

    def _open(self) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:  # tensorboard itself is missing
            raise ImportError(
                "TensorBoardSink needs the tensorboard package: "
                "pip install 'optiscope[tensorboard]'"
            ) from error
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def __repr__(self) -> str:
        return f"TensorBoardSink({str(self.log_dir)!r})"

    def write(self, record: dict[str, Any]) -> None:
        if not self._writable():
            return
        for scope, metric, value in flatten(record):
            if math.isfinite(value):
                self.writer.add_scalar(
                    f"{record['source']}/{scope}/{metric}", value, record["step"]
                )

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class CallbackSink:
    """Calls ``fn(record)`` after every probed step."""

    def __init__(self, fn: Callable[[dict[str, Any]], None]) -> None:
        self.fn = fn

    def write(self, record: dict[str, Any]) -> None:
        self.fn(record)

    def close(self) -> None:
        pass
