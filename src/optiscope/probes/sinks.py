"""Where probe records go: memory, JSONL, CSV, TensorBoard, or a callback.

A record is one step of one probed object, a plain dict::

    {"run": "20250101-120000-3fa2c1", "step": 12, "source": "Adam",
     "groups": [{...}], "params": {"fc.weight": {...}}}

``run`` identifies the :func:`optiscope.probe` call that made it, so records
of several runs in one file stay apart. Every sink receives the same dicts;
``flatten`` turns one into ``(scope, metric, value)`` triples for the tabular
sinks, leaving out list-valued entries such as histograms (those are in the
JSONL).

Memory: a :class:`History` keeps the last ``maxlen`` records (100 by default,
``None`` for all, 0 for none); the other sinks stream, so a probe with a file
sink holds at most ``maxlen`` records however long the run.

Files: :class:`JSONLSink` and :class:`CSVSink` start a new file unless
``append=True``; they are context managers, their ``close()`` may be called
any number of times, and they are closed by :func:`optiscope.probes.remove`,
when they are garbage-collected, and at interpreter exit (whichever comes
first). Writing to a closed sink raises ``ValueError``, as writing to a closed
file does.

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

import atexit
import collections
import contextlib
import csv
import json
import math
import warnings
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

#: How many records a :class:`History` keeps unless told otherwise.
DEFAULT_HISTORY = 100


class Sink:
    """What a probe writes to: ``write(record)`` and ``close()``.

    Any object with these two methods works as a sink; this base class adds the
    context manager (``with JSONLSink(path) as sink: ...`` closes it).
    """

    def write(self, record: dict[str, Any]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the sink holds; calling it again does nothing."""

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def flatten(record: dict[str, Any]) -> Iterator[tuple[str, str, float]]:
    scopes = [(f"group{g['group']}", g) for g in record.get("groups", [])]
    scopes += list(record.get("params", {}).items())
    scopes += list(record.get("modules", {}).items())
    for scope, values in scopes:
        for metric, value in values.items():
            if isinstance(value, (int, float)) and metric != "group":
                yield scope, metric, float(value)


class History(Sink):
    """The last ``maxlen`` records in memory, oldest first.

    A sequence: ``len(history)``, ``history[-1]``, ``history[2:5]`` and
    ``for record in history`` work, and ``history.records`` is a list of them.
    ``maxlen=None`` keeps every record (memory then grows with the run);
    ``maxlen=0`` keeps none (``probe.latest`` still holds the newest).

    ``before_read`` runs before the records are read: an optimizer's probe
    builds its pending records there (see ``OptimizerProbe``).
    """

    def __init__(
        self,
        maxlen: int | None = DEFAULT_HISTORY,
        before_read: Callable[[], None] | None = None,
    ) -> None:
        if maxlen is not None and (
            not isinstance(maxlen, int) or isinstance(maxlen, bool) or maxlen < 0
        ):
            raise ValueError(f"history must be None or an integer >= 0, got {maxlen!r}")
        self._records: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=maxlen
        )
        self._before_read = before_read

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if not isinstance(self._records, collections.deque):  # an older pickle
            self._records = collections.deque(self._records, maxlen=DEFAULT_HISTORY)

    @property
    def maxlen(self) -> int | None:
        """How many records are kept (None: all)."""
        return self._records.maxlen

    def _read(self) -> collections.deque[dict[str, Any]]:
        if self._before_read is not None:
            self._before_read()
        return self._records

    @property
    def records(self) -> list[dict[str, Any]]:
        """The kept records, oldest first (a new list)."""
        return list(self._read())

    def __len__(self) -> int:
        return len(self._read())

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(list(self._read()))

    def __getitem__(self, index: int | slice) -> Any:
        records = self._read()
        if isinstance(index, slice):
            return list(records)[index]
        return records[index]

    def __repr__(self) -> str:
        return f"History({len(self._records)} records, maxlen={self.maxlen})"

    def write(self, record: dict[str, Any]) -> None:
        self._records.append(record)

    def clear(self) -> None:
        """Forget the kept records."""
        self._records.clear()

    def series(self, scope: str, metric: str) -> list[float]:
        """One metric of one scope (``"group0"`` or a parameter name) over the kept
        steps."""
        return [
            v
            for r in self._read()
            for s, m, v in flatten(r)
            if (s, m) == (scope, metric)
        ]


class DetachedSinkWarning(UserWarning):
    """A copied file or TensorBoard sink was written to: it writes nowhere until
    ``reopen()`` is called on it."""


# Open file and TensorBoard sinks, closed at interpreter exit.
_OPEN: weakref.WeakSet[_Detachable] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for sink in list(_OPEN):
        sink.close()


class _Detachable(Sink):
    """A sink with an open resource (a file, a SummaryWriter) that a copy does not
    share: a copy keeps the location and is detached until :meth:`reopen`."""

    #: The attributes holding the open resource, dropped from a copy.
    _open_attributes: tuple[str, ...] = ()
    _warned = False
    closed = False

    @property
    def detached(self) -> bool:
        """True for a copy that has not been reopened: records go nowhere."""
        return getattr(self, self._open_attributes[0]) is None and not self.closed

    def reopen(self) -> _Detachable:
        """Open the location again, appending (a copy, or a closed sink); a no-op
        if open."""
        if getattr(self, self._open_attributes[0]) is None or self.closed:
            self._start(append=True)
            self._warned = False
        return self

    def _start(self, append: bool) -> None:
        self._open(append)
        self.closed = False
        _OPEN.add(self)

    def _open(self, append: bool) -> None:
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        if getattr(self, self._open_attributes[0], None) is not None:
            self._release()
            for name in self._open_attributes:
                setattr(self, name, None)
            self.closed = True
        _OPEN.discard(self)

    def __del__(self) -> None:
        # Like a file object, but without the ResourceWarning: a sink dropped
        # with its probe or optimizer closes its file.
        with contextlib.suppress(Exception):
            self.close()

    def _writable(self) -> bool:
        """Whether a record can be written; warns once where it cannot."""
        if self.closed:
            raise ValueError(f"write to a closed sink: {self!r}")
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
        state["closed"] = False
        return state


class JSONLSink(_Detachable):
    """One JSON object per line and step, flushed at once so a crash loses nothing.

    Starts a new file at ``path`` (replacing one that is there) unless
    ``append=True``; every record carries its ``run`` id, so ``optiscope plot``
    and ``optiscope doctor`` keep appended runs apart. A copy is detached until
    :meth:`reopen` (see the module).
    """

    _open_attributes = ("handle",)

    def __init__(self, path: str | Path, *, append: bool = False) -> None:
        self.path = Path(path).absolute()
        self.handle = None
        self._start(append)

    def _open(self, append: bool) -> None:
        self.handle = self.path.open("a" if append else "w", encoding="utf-8")

    def _release(self) -> None:
        self.handle.close()

    def __repr__(self) -> str:
        return f"JSONLSink({str(self.path)!r})"

    def write(self, record: dict[str, Any]) -> None:
        if self._writable():
            self.handle.write(json.dumps(record, allow_nan=True) + "\n")
            self.handle.flush()


class CSVSink(_Detachable):
    """Long format: ``step,run,source,scope,metric,value``; one row per scalar.

    Columns are fixed whatever the run does: a parameter added mid-run (to a
    group, or in a new group) adds rows with its name as ``scope``, never a
    column. Starts a new file unless ``append=True``, which appends to a file
    with the same header (and refuses one with another). A copy is detached
    until :meth:`reopen` (see the module).
    """

    _open_attributes = ("handle", "writer")
    HEADER = ("step", "run", "source", "scope", "metric", "value")

    def __init__(self, path: str | Path, *, append: bool = False) -> None:
        self.path = Path(path).absolute()
        self.handle = self.writer = None
        self._start(append)

    def _open(self, append: bool) -> None:
        fresh = not append or not self.path.exists() or self.path.stat().st_size == 0
        if not fresh:
            with self.path.open(newline="", encoding="utf-8") as existing:
                header = next(csv.reader(existing), [])
            if tuple(header) != self.HEADER:
                raise ValueError(
                    f"{self.path}: cannot append, its header is {','.join(header)!r}, "
                    f"not {','.join(self.HEADER)!r}"
                )
        self.handle = self.path.open(
            "w" if fresh else "a", newline="", encoding="utf-8"
        )
        self.writer = csv.writer(self.handle, lineterminator="\n")
        if fresh:
            self.writer.writerow(self.HEADER)

    def _release(self) -> None:
        self.handle.close()

    def __repr__(self) -> str:
        return f"CSVSink({str(self.path)!r})"

    def write(self, record: dict[str, Any]) -> None:
        if not self._writable():
            return
        step, run, source = record["step"], record.get("run", ""), record["source"]
        self.writer.writerows(
            [step, run, source, scope, metric, repr(value)]
            for scope, metric, value in flatten(record)
        )
        self.handle.flush()


class TensorBoardSink(_Detachable):
    """Scalars as ``source/scope/metric`` through ``torch.utils.tensorboard``.

    Needs the ``tensorboard`` package (``pip install optiscope[tensorboard]``).
    Each sink writes its own event file in ``log_dir``. A copy is detached
    until :meth:`reopen`, which starts a new event file in the same ``log_dir``
    (see the module).
    """

    _open_attributes = ("writer",)

    def __init__(self, log_dir: str | Path) -> None:
        self.log_dir = Path(log_dir).absolute()
        self.writer = None
        self._start(append=False)

    def _open(self, append: bool) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:  # tensorboard itself is missing
            raise ImportError(
                "TensorBoardSink needs the tensorboard package: "
                "pip install 'optiscope[tensorboard]'"
            ) from error
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def _release(self) -> None:
        self.writer.close()

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


class TruncatedRecordWarning(UserWarning):
    """The last line of a JSONL file is not a whole record (a write cut short by
    a crash or a full disk); it was skipped."""


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """The records of a JSONL file, one at a time (the file is not held in memory).

    A last line that is not valid JSON is skipped with a
    :class:`TruncatedRecordWarning`; an invalid line elsewhere raises
    ``ValueError`` naming it.
    """
    path = Path(path)
    with path.open(encoding="utf-8") as handle:
        number, line = 0, handle.readline()
        while line:
            following = handle.readline()
            number += 1
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    if following:
                        raise ValueError(
                            f"{path}, line {number}: not JSON ({error.msg})"
                        ) from None
                    warnings.warn(
                        f"{path}, line {number}: the last line is not a whole "
                        f"record ({error.msg}; a write cut short?): skipped",
                        TruncatedRecordWarning,
                        stacklevel=2,
                    )
                    return
                if not isinstance(record, dict):
                    raise ValueError(f"{path}, line {number}: not a JSON object")
                yield record
            line = following


class CallbackSink(Sink):
    """Calls ``fn(record)`` after every probed step."""

    def __init__(self, fn: Callable[[dict[str, Any]], None]) -> None:
        self.fn = fn

    def write(self, record: dict[str, Any]) -> None:
        self.fn(record)
