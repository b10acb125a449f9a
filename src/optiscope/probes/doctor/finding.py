"""The :class:`Finding` type, its severities, and what the checks share to
build findings: the run's fields, tensors grouped by layer, a step range."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .records import _Run

SEVERITIES = ("info", "warning", "error")


@dataclass(frozen=True)
class Finding:
    """One conclusion from the probe records, with what it rests on."""

    code: str
    severity: str
    title: str
    scope: str  # a parameter, a layer ("0": 0.weight and 0.bias), a group, a module
    steps: tuple[int, int]  # the first and last step of the evidence
    evidence: dict[str, Any]
    threshold: str
    basis: str
    action: str
    source: str = ""  # "Adam", "Momentum", "Dropout", ...
    run: str | None = None
    parameters: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``steps`` and ``parameters`` as lists)."""
        out = asdict(self)
        out["steps"] = list(self.steps)
        out["parameters"] = list(self.parameters)
        return out

    def __str__(self) -> str:
        first, last = self.steps
        steps = f"step {first}" if first == last else f"steps {first}–{last}"
        return f"[{self.severity}] {self.title}: {self.scope} ({steps})"


def _finding(run: _Run, **fields: Any) -> Finding:
    return Finding(source=run.source, run=run.run, **fields)


def _layers(names: Iterable[str]) -> dict[str, dict[str, str]]:
    """Tensors by layer: ``{"0": {"weight": "0.weight", "bias": "0.bias"}}``."""
    layers: dict[str, dict[str, str]] = defaultdict(dict)
    for name in names:
        prefix, _, kind = name.rpartition(".")
        if kind in ("weight", "bias") and prefix:
            layers[prefix][kind] = name
        else:
            layers[name]["tensor"] = name
    return layers


def _steps(steps: np.ndarray) -> tuple[int, int]:
    return (int(steps[0]), int(steps[-1])) if len(steps) else (0, 0)
