"""Probes: measurements taken inside the optimizer step, cheap enough to leave on.

``optiscope.Adam(params, probe=True)`` or ``optiscope.probe(optimizer)`` turns
them on; after each step ``optimizer.probes`` holds the latest values per param
group and per parameter (by name when named parameters were given). The
kernels fill a row of sums per tensor (:mod:`.layout`) in the same pass as the
update; :mod:`.measure` turns those rows into the numbers below.

``optiscope.probe(model)`` on an ``nn.Module`` probes its ``optiscope.Dropout``
layers: the observed keep rate, and a one-time warning when one runs in
training mode with gradients off (a forgotten ``model.eval()``).

A probe travels with a copy of its optimizer or module (``copy.deepcopy``,
``pickle``, ``torch.save``): the copy's probe has the same configuration
(``every``, the count of calls, the sinks by kind) and a copy of the records
so far, and goes on from there; file and TensorBoard sinks in the copy are
detached until reopened (see :mod:`.sinks`).

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

from ..kernels import rows as layout
from . import measure
from .sinks import (
    CallbackSink,
    CSVSink,
    DetachedSinkWarning,
    History,
    JSONLSink,
    Sink,
    TensorBoardSink,
)

__all__ = [
    "CSVSink",
    "CallbackSink",
    "DetachedSinkWarning",
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
        self.history = History(before_read=self._flush)
        self.sinks: list[Sink] = [self.history, *sinks]
        self._latest: dict[str, Any] | None = None
        self.calls = 0

    @property
    def latest(self) -> dict[str, Any] | None:
        """The newest record, or None before the first measured call."""
        self._flush()
        return self._latest

    def _flush(self) -> None:
        """Build any records still pending (see :class:`OptimizerProbe`)."""

    def _emit(self, record: dict[str, Any]) -> None:
        self._latest = record
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        self._flush()
        for sink in self.sinks:
            sink.close()


class OptimizerProbe(_Probe):
    """Collects the rows an optimizer's step fills and turns them into a record.

    A step only stores its rows (and the hyperparameters it ran with); the
    record of numbers is built when something reads it (``latest``,
    ``optimizer.probes``, ``history``), in step order, so the result is the
    same as building it at once. Right after the step the CPU caches hold the
    parameters just streamed, not the interpreter's working set, and building
    a record there took ~0.3 ms, 5% of a two-thread 10M-element Adam step.
    With a sink besides the history (a file, TensorBoard, a callback), each
    record is built and written at its step, so an interrupted run loses none.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, sinks: Iterable[Sink], every: int
    ):
        super().__init__(type(optimizer).__name__, sinks, every)
        self.optimizer = optimizer
        self.layout: tuple[str, ...] = optimizer._probe_layout  # type: ignore[attr-defined]
        self._trackers: dict[int, measure.MomentumTracker] = {}
        self._step_groups: list[tuple] = []
        self._pending: list[tuple[int, list[tuple]]] = []

    def __getstate__(self) -> dict[str, Any]:
        # The layout is compared by identity with kernels.rows' tuples; a copy
        # takes it from the optimizer's class again instead of an equal tuple.
        return {k: v for k, v in self.__dict__.items() if k != "layout"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.layout = type(self.optimizer)._probe_layout

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
        position = {id(p): i for i, p in enumerate(group["params"])}
        index = np.array([position[id(p)] for p in params])
        # What the record needs from the group, as it was at this step.
        options = {
            "lr": group["lr"],
            "momentum": group.get("momentum"),
            "names": group.get("param_names"),
            "size": len(group["params"]),
        }
        self._step_groups.append((group_index, options, index, rows, corrections))

    def finish_step(self) -> None:
        self._pending.append((self.calls, self._step_groups))
        self._step_groups = []
        if len(self.sinks) > 1:
            self._flush()

    # -- building records -------------------------------------------------------------
    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        for step, groups in pending:
            summaries: list[dict[str, Any]] = []
            params: dict[str, Any] = {}
            for entry in groups:
                summary, per_param = self._group_record(*entry)
                summaries.append(summary)
                params.update(per_param)
            self._emit(
                {
                    "step": step,
                    "source": self.source,
                    "groups": summaries,
                    "params": params,
                }
            )

    def _group_record(
        self,
        group_index: int,
        options: dict[str, Any],
        index: np.ndarray,
        rows: np.ndarray,
        corrections: list[tuple[float, float]] | None,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        names = options["names"]
        labels = [
            names[i] if names else f"group{group_index}.param{i}"
            for i in index.tolist()
        ]
        per_param = [measure.common_metrics(row) for row in rows]
        merged = measure.merge_rows(rows, self.layout)
        pooled = measure.common_metrics(merged)
        summary: dict[str, Any] = {"group": group_index, "lr": options["lr"], **pooled}
        if self.layout is layout.MOMENTUM:
            beta = options["momentum"]
            tracker = self._trackers.setdefault(
                group_index, measure.MomentumTracker(options["size"] + 1)
            )
            ratios = tracker.update(index, rows)
            pooled_ratio = tracker.update(
                np.array([options["size"]]), rows.sum(0)[None]
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
        return summary, dict(zip(labels, per_param, strict=True))


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
            if getattr(module, "probe_kind", None) == "dropout":
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
    modules = target.modules() if isinstance(target, nn.Module) else [target]
    for obj in modules:
        if getattr(obj, "_probe", None) is not None:
            obj._probe.close()
            obj._probe = None
