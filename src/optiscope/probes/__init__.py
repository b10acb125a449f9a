"""Probes: measurements taken inside the optimizer step, cheap enough to leave on.

``optiscope.Adam(params, probe=True)`` or ``optiscope.probe(optimizer)`` turns
them on; after each step ``optimizer.probes`` holds the latest values per param
group and per parameter (by name when named parameters were given). The
kernels fill a row of sums per tensor (:mod:`.layout`) in the same pass as the
update; :mod:`.measure` turns those rows into the numbers below.

``optiscope.probe(model)`` on an ``nn.Module`` probes its ``optiscope.Dropout``
layers: the observed keep rate, and a one-time warning when one runs in
training mode with gradients off (a forgotten ``model.eval()``), pointing at
the caller's line.

Left on for a long run: ``probe.history`` keeps the last 100 records
(``history=`` on :func:`probe`), sinks stream (:mod:`.sinks`), at most
:data:`MAX_PENDING` steps wait to be built, and every record carries its
``run`` id. :func:`diagnose` (:mod:`.doctor`) turns records into findings.

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

import collections
import os
import secrets
import sys
import time
import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from ..kernels import rows as layout
from . import measure
from .doctor import Finding, diagnose
from .sinks import (
    DEFAULT_HISTORY,
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
    "Finding",
    "ForgottenEvalWarning",
    "History",
    "JSONLSink",
    "OptimizerProbe",
    "Sink",
    "TensorBoardSink",
    "diagnose",
    "probe",
    "remove",
]

#: Pending steps an optimizer's probe keeps before it builds their records.
MAX_PENDING = 32


def new_run_id() -> str:
    """A run id: the local start time and 6 random hex digits, e.g.
    ``20250101-120000-3fa2c1``."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


class ForgottenEvalWarning(UserWarning):
    """A Dropout layer ran in training mode while gradients were off."""


class _Probe:
    def __init__(
        self,
        source: str,
        sinks: Iterable[Sink],
        every: int,
        history: int | None = DEFAULT_HISTORY,
        run: str | None = None,
    ) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every must be an integer >= 1, got {every!r}")
        if run is not None and not isinstance(run, str):
            raise TypeError(f"run must be a string, got {type(run).__name__}")
        self.source = source
        self.every = every
        self.run = run if run is not None else new_run_id()
        self.history = History(history, before_read=self._flush)
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
        """Build what is pending and close every sink (a no-op the second time)."""
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
    At most :data:`MAX_PENDING` steps wait: the next step builds them all, so
    memory stays bounded when nothing reads the probe. With a sink besides the
    history (a file, TensorBoard, a callback), each record is built and written
    at its step, so an interrupted run loses none.

    The group's parameters may change between steps: parameters appended to a
    group, new groups (``add_param_group``), and parameters without a gradient
    at some steps (they are left out of that step's record) are all followed.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        sinks: Iterable[Sink],
        every: int,
        history: int | None = DEFAULT_HISTORY,
        run: str | None = None,
    ):
        super().__init__(type(optimizer).__name__, sinks, every, history, run)
        self.optimizer = optimizer
        self.layout: tuple[str, ...] = optimizer._probe_layout  # type: ignore[attr-defined]
        self._trackers: dict[int, measure.MomentumTracker] = {}
        self._step_groups: list[tuple] = []
        self._pending: collections.deque[tuple[int, list[tuple]]] = collections.deque()
        self._names: dict[int, tuple[list[str], tuple[str, ...]]] = {}

    def __getstate__(self) -> dict[str, Any]:
        # The layout is compared by identity with kernels.rows' tuples; a copy
        # takes it from the optimizer's class again instead of an equal tuple.
        return {k: v for k, v in self.__dict__.items() if k not in ("layout", "_names")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.layout = type(self.optimizer)._probe_layout
        self._names = {}
        if not isinstance(self._pending, collections.deque):
            self._pending = collections.deque(self._pending)
        if "run" not in state:  # a probe pickled before records carried one
            self.run = new_run_id()

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

    def _snapshot_names(
        self, group_index: int, names: list[str] | None
    ) -> tuple[str, ...] | None:
        """The group's names as a tuple, remade only when its list changed."""
        if names is None:
            return None
        held = self._names.get(group_index)
        if held is None or held[0] is not names or len(held[1]) != len(names):
            held = self._names[group_index] = (names, tuple(names))
        return held[1]

    def add_group(
        self,
        group_index: int,
        group: dict[str, Any],
        params: list[torch.Tensor],
        rows: np.ndarray,
        corrections: list[tuple[float, float]] | None = None,
    ) -> None:
        position = {id(p): i for i, p in enumerate(group["params"])}
        index = np.array([position[id(p)] for p in params], dtype=np.int64)
        # What the record needs from the group, as it was at this step.
        options = {
            "lr": group["lr"],
            "momentum": group.get("momentum"),
            "eps": group.get("eps"),
            "names": self._snapshot_names(group_index, group.get("param_names")),
        }
        self._step_groups.append((group_index, options, index, rows, corrections))

    def finish_step(self) -> None:
        self._pending.append((self.calls, self._step_groups))
        self._step_groups = []
        if len(self.sinks) > 1 or len(self._pending) >= MAX_PENDING:
            self._flush()

    # -- building records -------------------------------------------------------------
    def _flush(self) -> None:
        # One step at a time, removed once written: a failure leaves the
        # steps after it pending instead of losing them.
        pending = self._pending
        while pending:
            step, groups = pending[0]
            summaries: list[dict[str, Any]] = []
            params: dict[str, Any] = {}
            for entry in groups:
                summary, per_param = self._group_record(step, *entry)
                summaries.append(summary)
                params.update(per_param)
            pending.popleft()
            self._emit(
                {
                    "run": self.run,
                    "step": step,
                    "source": self.source,
                    "groups": summaries,
                    "params": params,
                }
            )

    def _group_record(
        self,
        step: int,
        group_index: int,
        options: dict[str, Any],
        index: np.ndarray,
        rows: np.ndarray,
        corrections: list[tuple[float, float]] | None,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        names = options["names"]
        labels = [
            names[i]
            if names is not None and i < len(names)
            else f"group{group_index}.param{i}"
            for i in index.tolist()
        ]
        per_param = [measure.common_metrics(row) for row in rows]
        merged = measure.merge_rows(rows, self.layout)
        pooled = measure.common_metrics(merged)
        summary: dict[str, Any] = {"group": group_index, "lr": options["lr"], **pooled}
        if self.layout is layout.MOMENTUM:
            beta = options["momentum"]
            tracker = self._trackers.get(group_index)
            if not isinstance(tracker, measure.MomentumTracker) or not hasattr(
                tracker, "first"
            ):  # none yet, or one from a pickle of an older version
                tracker = self._trackers[group_index] = measure.MomentumTracker()
            ratios = tracker.update(index, rows, beta, step)
            predicted = (1 - beta) / (1 + beta)
            for metrics, smoothed, raw in zip(
                per_param, ratios["smoothed"], ratios["raw"], strict=True
            ):
                metrics["variance_ratio"] = float(smoothed)
                metrics["variance_ratio_raw"] = float(raw)
                metrics["predicted_variance_ratio"] = predicted
            summary["momentum"] = beta
            summary["variance_ratio"] = ratios["pooled"]
            summary["variance_ratio_raw"] = ratios["pooled_raw"]
            summary["predicted_variance_ratio"] = predicted
            summary["variance_ratio_warmup"] = measure.warmup_steps(beta)
        else:
            assert corrections is not None
            for metrics, row, c in zip(per_param, rows, corrections, strict=True):
                metrics.update(measure.adam_metrics(row, c))
            group_adam = measure.adam_metrics(merged, corrections[0])
            del group_adam["bias_correction1"], group_adam["bias_correction2"]
            summary["eps"] = options["eps"]
            summary.update(group_adam)
        return summary, dict(zip(labels, per_param, strict=True))


class DropoutProbe(_Probe):
    """The keep rate each probed ``optiscope.Dropout`` observed, per forward call.

    A call in training mode with gradients off (``torch.no_grad`` or
    ``torch.inference_mode``: a forgotten ``model.eval()``) warns once
    (:class:`ForgottenEvalWarning`, pointing at the caller's line) and is always
    recorded, with ``"grad_enabled": False``, whatever ``every`` says.
    """

    def __init__(
        self,
        name: str,
        sinks: Iterable[Sink],
        every: int,
        history: int | None = DEFAULT_HISTORY,
        run: str | None = None,
    ) -> None:
        super().__init__("Dropout", sinks, every, history, run)
        self.name = name
        self.warned = False

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if "run" not in state:  # a probe pickled before records carried one
            self.run = new_run_id()

    def observe(self, module: nn.Module, kept: int, numel: int) -> None:
        self.calls += 1
        grad_enabled = torch.is_grad_enabled()
        if (self.calls - 1) % self.every == 0 or not grad_enabled:
            self._emit(
                {
                    "run": self.run,
                    "step": self.calls,
                    "source": self.source,
                    "modules": {
                        self.name: {
                            "keep_rate": kept / numel if numel else float("nan"),
                            "expected_keep_rate": 1.0 - module.p,
                            "numel": numel,
                            "grad_enabled": grad_enabled,
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
                stacklevel=_caller_level(),
            )


#: Code whose frames a warning skips to reach the user's line.
_INTERNAL = (
    os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,
)


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside torch and optiscope, counted
    from the function that calls this one (``check_mode``, level 1)."""
    frame = sys._getframe(2)
    level = 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(
        _INTERNAL
    ):
        frame = frame.f_back
        level += 1
    return level


def probe(
    target: torch.optim.Optimizer | nn.Module,
    *,
    sinks: Iterable[Sink] = (),
    every: int = 1,
    history: int | None = DEFAULT_HISTORY,
    run: str | None = None,
) -> OptimizerProbe | list[DropoutProbe]:
    """Turn probes on for an optiscope optimizer, or for the Dropout layers of a module.

    ``sinks`` receive every record; ``probe.history`` keeps the last ``history``
    records in memory (100 by default; ``None`` keeps all, ``0`` none, e.g.
    when a file sink has them). ``every=k`` measures one step in ``k`` and
    leaves the others untouched. ``run`` names the run in every record (by
    default the start time and a random suffix); give an optimizer and a
    model the same ``run`` to tie their records together.
    Returns the probe (or, for a module, one probe per Dropout layer).
    Replacing a probe closes the sinks of the old one that the new one
    does not share.
    """
    sinks = list(sinks)
    if isinstance(target, torch.optim.Optimizer):
        if not hasattr(target, "_probe_layout"):
            raise TypeError(
                f"probe() takes an optiscope optimizer or an nn.Module, got "
                f"{type(target).__name__}"
            )
        made = OptimizerProbe(target, sinks, every, history, run)
        _replace(target, made)
        return made
    if isinstance(target, nn.Module):
        layers = [
            (name, module)
            for name, module in target.named_modules()
            if getattr(module, "probe_kind", None) == "dropout"
        ]
        if not layers:
            raise ValueError(
                f"{type(target).__name__} has no optiscope.Dropout layer to probe"
            )
        run = run if run is not None else new_run_id()
        probes = []
        for name, module in layers:
            made = DropoutProbe(name or "dropout", sinks, every, history, run)
            _replace(module, made)
            probes.append(made)
        return probes
    raise TypeError(
        f"probe() takes an optiscope optimizer or an nn.Module, got {type(target).__name__}"
    )


def _replace(obj: Any, new: _Probe) -> None:
    """Attach ``new``; the probe it replaces builds its pending records and closes
    the sinks that ``new`` does not share."""
    old = getattr(obj, "_probe", None)
    obj._probe = new
    if old is not None:
        old._flush()
        for sink in old.sinks:
            if not any(sink is kept for kept in new.sinks):
                sink.close()


def remove(target: torch.optim.Optimizer | nn.Module) -> None:
    """Turn probes off again (closing their sinks); a no-op where none is attached."""
    modules = target.modules() if isinstance(target, nn.Module) else [target]
    for obj in modules:
        if getattr(obj, "_probe", None) is not None:
            obj._probe.close()
            obj._probe = None
