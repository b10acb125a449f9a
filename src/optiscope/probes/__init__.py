"""Probes: measurements taken inside the optimizer step, cheap enough to leave on.

``optiscope.Adam(params, probe=True)`` or ``optiscope.probe(optimizer)`` turns
them on; after each step ``optimizer.probes`` holds the latest values per param
group and per parameter (by name when named parameters were given). The
kernels fill a row of sums per tensor (:mod:`.layout`) in the same pass as the
update; :mod:`.measure` turns those rows into the numbers below.

``optiscope.probe(model)`` on an ``nn.Module`` probes its ``optiscope.Dropout``
layers: the observed keep rate, and a one-time warning when one runs in
training mode with gradients off (a forgotten ``model.eval()``).

Example:
    >>> import torch, optiscope
    >>> w = torch.nn.Parameter(torch.ones(4))
    >>> opt = optiscope.Adam([w], lr=1e-3, probe=True)
    >>> w.grad = torch.ones(4)
    >>> opt.step()
    >>> round(opt.probes["params"]["group0.param0"]["update_rms"], 6)
    0.001
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from . import layout, measure
from .sinks import CallbackSink, CSVSink, History, JSONLSink, Sink, TensorBoardSink

__all__ = [
    "CSVSink",
    "CallbackSink",
    "DropoutProbe",
    "ForgottenEvalWarning",
    "History",
    "JSONLSink",
    "OptimizerProbe",
    "TensorBoardSink",
    "probe",
    "remove",
]


class ForgottenEvalWarning(UserWarning):
    """A Dropout layer ran in training mode while gradients were off."""


class _Probe:
    def __init__(self, source: str, sinks: Iterable[Sink], every: int) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every must be an integer >= 1, got {every!r}")
        self.source = source
        self.every = every
        self.history = History()
        self.sinks: list[Sink] = [self.history, *sinks]
        self.latest: dict[str, Any] | None = None
        self.calls = 0

    def _emit(self, record: dict[str, Any]) -> None:
        self.latest = record
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


class OptimizerProbe(_Probe):
    """Collects the rows an optimizer's step fills and turns them into a record."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, sinks: Iterable[Sink], every: int
    ):
        super().__init__(type(optimizer).__name__, sinks, every)
        self.optimizer = optimizer
        self.layout: tuple[str, ...] = optimizer._probe_layout  # type: ignore[attr-defined]
        self._trackers: dict[int, measure.MomentumTracker] = {}
        self._groups: list[dict[str, Any]] = []
        self._params: dict[str, Any] = {}

    # -- called by the optimizer's step --------------------------------------------
    def wants_this_step(self) -> bool:
        self.calls += 1
        return (self.calls - 1) % self.every == 0

    def new_rows(self, count: int) -> np.ndarray:
        rows = np.zeros((count, len(self.layout)))
        if self.layout is layout.ADAM:
            rows[:, layout.ADAM.index("step_min")] = np.inf
            rows[:, layout.ADAM.index("step_max")] = -np.inf
        return rows

    def add_group(
        self,
        group_index: int,
        group: dict[str, Any],
        params: list[torch.Tensor],
        rows: np.ndarray,
        corrections: list[tuple[float, float]] | None = None,
    ) -> None:
        names = group.get("param_names")
        position = {id(p): i for i, p in enumerate(group["params"])}
        index = np.array([position[id(p)] for p in params])
        labels = [
            names[i] if names else f"group{group_index}.param{i}"
            for i in index.tolist()
        ]
        per_param = [measure.common_metrics(row) for row in rows]
        merged = measure.merge_rows(rows, self.layout)
        pooled = measure.common_metrics(merged)
        summary: dict[str, Any] = {"group": group_index, "lr": group["lr"], **pooled}
        if self.layout is layout.MOMENTUM:
            beta = group["momentum"]
            tracker = self._trackers.setdefault(
                group_index, measure.MomentumTracker(len(group["params"]) + 1)
            )
            ratios = tracker.update(index, rows)
            pooled_ratio = tracker.update(
                np.array([len(group["params"])]), rows.sum(0)[None]
            )
            predicted = (1 - beta) / (1 + beta)
            for metrics, ratio in zip(per_param, ratios, strict=True):
                metrics["variance_ratio"] = float(ratio)
                metrics["predicted_variance_ratio"] = predicted
            summary["variance_ratio"] = float(pooled_ratio[0])
            summary["predicted_variance_ratio"] = predicted
        else:
            assert corrections is not None
            for metrics, row, c in zip(per_param, rows, corrections, strict=True):
                metrics.update(measure.adam_metrics(row, c))
            group_adam = measure.adam_metrics(merged, corrections[0])
            del group_adam["bias_correction1"], group_adam["bias_correction2"]
            summary.update(group_adam)
        self._groups.append(summary)
        self._params.update(zip(labels, per_param, strict=True))

    def finish_step(self) -> None:
        record = {
            "step": self.calls,
            "source": self.source,
            "groups": self._groups,
            "params": self._params,
        }
        self._groups, self._params = [], {}
        self._emit(record)


class DropoutProbe(_Probe):
    """The keep rate each probed ``optiscope.Dropout`` observed, per forward call."""

    def __init__(self, name: str, sinks: Iterable[Sink], every: int) -> None:
        super().__init__("Dropout", sinks, every)
        self.name = name
        self.warned = False

    def observe(self, module: nn.Module, kept: int, numel: int) -> None:
        self.calls += 1
        if (self.calls - 1) % self.every == 0:
            self._emit(
                {
                    "step": self.calls,
                    "source": self.source,
                    "modules": {
                        self.name: {
                            "keep_rate": kept / numel if numel else float("nan"),
                            "expected_keep_rate": 1.0 - module.p,
                            "numel": numel,
                        }
                    },
                }
            )

    def check_mode(self, module: nn.Module) -> None:
        if module.training and not torch.is_grad_enabled() and not self.warned:
            self.warned = True
            warnings.warn(
                f"Dropout layer {self.name!r} ran in training mode with gradients off "
                "(torch.no_grad or torch.inference_mode): did you forget model.eval()? "
                "Evaluation should not drop units.",
                ForgottenEvalWarning,
                stacklevel=4,
            )


def probe(
    target: torch.optim.Optimizer | nn.Module,
    *,
    sinks: Iterable[Sink] = (),
    every: int = 1,
) -> OptimizerProbe | list[DropoutProbe]:
    """Turn probes on for an optiscope optimizer, or for the Dropout layers of a module.

    ``sinks`` receive every record (an in-memory :class:`History` is always kept);
    ``every=k`` measures one step in ``k`` and leaves the others untouched.
    Returns the probe (or, for a module, one probe per Dropout layer).
    """
    from ..dropout import Dropout

    sinks = list(sinks)
    if isinstance(target, torch.optim.Optimizer):
        if not hasattr(target, "_probe_layout"):
            raise TypeError(
                f"probe() takes an optiscope optimizer or an nn.Module, got "
                f"{type(target).__name__}"
            )
        target._probe = OptimizerProbe(target, sinks, every)  # type: ignore[attr-defined]
        return target._probe  # type: ignore[attr-defined]
    if isinstance(target, nn.Module):
        probes = []
        for name, module in target.named_modules():
            if isinstance(module, Dropout):
                module._probe = DropoutProbe(name or "dropout", sinks, every)
                probes.append(module._probe)
        if not probes:
            raise ValueError(
                f"{type(target).__name__} has no optiscope.Dropout layer to probe"
            )
        return probes
    raise TypeError(
        f"probe() takes an optiscope optimizer or an nn.Module, got {type(target).__name__}"
    )


def remove(target: torch.optim.Optimizer | nn.Module) -> None:
    """Turn probes off again (closing their sinks); a no-op where none is attached."""
    from ..dropout import Dropout

    modules = target.modules() if isinstance(target, nn.Module) else [target]
    for obj in modules:
        if isinstance(obj, (Dropout, torch.optim.Optimizer)) and getattr(
            obj, "_probe", None
        ):
            obj._probe.close()
            obj._probe = None
