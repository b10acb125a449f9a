"""Where probe records go: memory, JSONL, CSV, TensorBoard, or a callback.

A record is one step of one probed object, a plain dict::

    {"step": 12, "source": "Adam", "groups": [{...}], "params": {"fc.weight": {...}}}

Every sink receives the same dicts; ``flatten`` turns one into
``(scope, metric, value)`` triples for the tabular sinks, leaving out
list-valued entries such as histograms (those are in the JSONL).
"""

from __future__ import annotations

import csv
import json
import math
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


class JSONLSink:
    """One JSON object per line and step, flushed at once so a crash loses nothing."""

    def __init__(self, path: str | Path) -> None:
        self.handle = Path(path).open("a", encoding="utf-8")  # noqa: SIM115 (closed by close())

    def write(self, record: dict[str, Any]) -> None:
        self.handle.write(json.dumps(record, allow_nan=True) + "\n")
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


class CSVSink:
    """Long format: ``step,scope,metric,value``; one row per scalar."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        fresh = not path.exists() or path.stat().st_size == 0
        self.handle = path.open("a", newline="", encoding="utf-8")
        self.writer = csv.writer(self.handle, lineterminator="\n")
        if fresh:
            self.writer.writerow(["step", "source", "scope", "metric", "value"])

    def write(self, record: dict[str, Any]) -> None:
        for scope, metric, value in flatten(record):
            self.writer.writerow(
                [record["step"], record["source"], scope, metric, repr(value)]
            )
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


class TensorBoardSink:
    """Scalars as ``source/scope/metric`` through ``torch.utils.tensorboard``.

    Needs the ``tensorboard`` package (``pip install optiscope[tensorboard]``).
    """

    def __init__(self, log_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:  # tensorboard itself is missing
            raise ImportError(
                "TensorBoardSink needs the tensorboard package: "
                "pip install 'optiscope[tensorboard]'"
            ) from error
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, record: dict[str, Any]) -> None:
        for scope, metric, value in flatten(record):
            if math.isfinite(value):
                self.writer.add_scalar(
                    f"{record['source']}/{scope}/{metric}", value, record["step"]
                )

    def close(self) -> None:
        self.writer.close()


class CallbackSink:
    """Calls ``fn(record)`` after every probed step."""

    def __init__(self, fn: Callable[[dict[str, Any]], None]) -> None:
        self.fn = fn

    def write(self, record: dict[str, Any]) -> None:
        self.fn(record)

    def close(self) -> None:
        pass
