"""What every optiscope optimizer shares with ``torch.optim.Optimizer``.

A subclass says four things: how to check a param group's options
(``_check_group``), which state a parameter still lacks (``_new_state``), how
to check one group's tensors (``_check_tensors``) and how to update them
(``_update``). The torch contract (param groups, closures, hooks,
``state_dict``) comes from ``torch.optim.Optimizer`` itself.

A step is atomic: every group is checked (options, gradients, state, every
tensor through the kernels' gate) before any counter, state or parameter
changes, so a refused step leaves the optimizer and the model bit-identical.

State dtype: a parameter's state is kept in :func:`default_state_dtype` of its
dtype (float32 for float16, whose range cannot hold Adam's ``(1−β2)·g²``;
else the parameter's own), unless Adam's ``state_dtype`` says otherwise. A
parameter whose dtype changed after its state was made (``model.to(dtype)``
mid-training) is refused at the next step, naming it; ``load_state_dict``
migrates state to the current dtypes (see :meth:`OptiscopeOptimizer.step`).

Copies: ``copy.deepcopy``, ``pickle`` and ``torch.save`` keep the probe with
the optimizer (see :meth:`OptiscopeOptimizer.__getstate__`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import _checks, rules
from .probes import OptimizerProbe
from .probes import probe as attach_probe

ParamsT = (
    Iterable[torch.Tensor]
    | Iterable[dict[str, Any]]
    | Iterable[tuple[str, torch.Tensor]]
)


@dataclass
class GroupWork:
    """One group's checked step: its options, the parameters with a gradient,
    their state (with entries still to be added) and their names."""

    index: int
    group: dict[str, Any]
    options: dict[str, Any]
    params: list[torch.Tensor]
    states: list[dict[str, Any]]
    labels: Sequence[str]
    #: Whether :meth:`OptiscopeOptimizer._plan` made state to keep.
    new: bool = True


class OptiscopeOptimizer(torch.optim.Optimizer):
    """Base class: validation before mutation, lazy state, closure handling."""

    #: Suggested replacement named in the error for sparse gradients.
    _sparse_alternative = "torch.optim.SparseAdam"

    #: Which per-tensor sums a probed step fills (see :mod:`optiscope.kernels.rows`).
    _probe_layout: tuple[str, ...]

    #: The state tensors of a parameter, in the dtype of :meth:`_state_dtype`;
    #: the first is always present once the parameter has state.
    _state_tensors: tuple[str, ...]

    def __init__(
        self, params: ParamsT, defaults: dict[str, Any], *, probe: bool = False
    ) -> None:
        defaults = self._check_group(dict(defaults))
        self._probe: OptimizerProbe | None = None
        super().__init__(params, defaults)
        if _checks.flag("probe", probe):
            attach_probe(self)

    @property
    def probes(self) -> dict[str, Any] | None:
        """The latest probe record (per group and per parameter), or None if not probed."""
        return None if self._probe is None else self._probe.latest

    # -- hooks for subclasses -------------------------------------------------
    def _check_group(self, group: dict[str, Any]) -> dict[str, Any]:
        """Validate and normalise one group's options; raise on bad input."""
        raise NotImplementedError

    def _new_state(
        self, param: torch.Tensor, options: dict[str, Any], state: dict[str, Any]
    ) -> dict[str, Any]:
        """The entries ``state`` lacks for a step with ``options`` (all of them
        for a parameter's first step)."""
        raise NotImplementedError

    def _check_tensors(self, work: GroupWork) -> None:
        """Raise what :meth:`_update` would raise for these tensors."""
        raise NotImplementedError

    def _update(self, work: GroupWork, stats: np.ndarray | None) -> None:
        """Update the group; with ``stats``, also fill one probe row per tensor."""
        raise NotImplementedError

    def _state_dtype(self, dtype: torch.dtype, options: dict[str, Any]) -> torch.dtype:
        """The dtype of the state of a parameter of ``dtype`` in a group with
        ``options``."""
        return default_state_dtype(dtype)

    def _after_load(self, state_dict: dict[str, Any]) -> None:
        """Give each loaded state tensor the dtype of :meth:`_state_dtype`.

        torch casts every floating-point state to its parameter's dtype on load,
        which would round float32 moments of a float16 parameter (or those of a
        group with a ``state_dtype``) to the parameter's dtype; where the state
        dtype is not the parameter's, the state is restored from the saved
        tensor instead, so a checkpoint round trip is bit for bit.
        """
        saved = state_dict["state"]
        groups = zip(self.param_groups, state_dict["param_groups"], strict=True)
        for group, saved_group in groups:
            options = {**self.defaults, **group}
            for param, key in zip(group["params"], saved_group["params"], strict=True):
                dtype = self._state_dtype(param.dtype, options)
                if dtype == param.dtype or not param.is_floating_point():
                    continue
                for name in self._state_tensors:
                    value = saved.get(key, {}).get(name)
                    if isinstance(value, torch.Tensor) and value.is_floating_point():
                        self.state[param][name] = value.to(
                            device=param.device, dtype=dtype, copy=True
                        )

    def _load_state_check(
        self, param: torch.Tensor, group: dict[str, Any], state: dict[str, Any]
    ) -> None:
        """Raise if a loaded ``state`` cannot belong to ``param``."""
        raise NotImplementedError

    # -- torch.optim.Optimizer contract -----------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Check the merged group before torch stores it, so a refused group
        # leaves self.param_groups untouched.
        merged = {**getattr(self, "defaults", {}), **param_group}
        checked = self._check_group({k: v for k, v in merged.items() if k != "params"})
        options = {k: checked[k] for k in param_group if k != "params" and k in checked}
        super().add_param_group({**param_group, **options})

    def __getstate__(self) -> dict[str, Any]:
        """What ``copy.deepcopy``, ``pickle`` and ``torch.save`` keep: torch's
        ``defaults``, ``state`` and ``param_groups``, and the probe.

        A copy steps bit for bit as the original would. Its probe keeps the
        configuration (``every``, the step count, the sinks by kind) and a copy
        of the records so far; a file or TensorBoard sink in the copy is
        detached (see :mod:`optiscope.probes.sinks`). Hooks are not kept, as in
        torch. ``state_dict()`` never holds probe state.
        """
        return {**super().__getstate__(), "_probe": self._probe}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # A pickle made before probes travelled with the optimizer has none;
        # load_state_dict also calls this, without "_probe", and keeps the probe.
        self.__dict__.setdefault("_probe", None)
        # torch adds "differentiable" to the defaults; it is not an option of ours
        # and must not appear in the groups (state_dict round trips stay equal).
        own = [k for k in self.defaults if k != "differentiable"]
        for group in self.param_groups:
            for key in own:
                group.setdefault(key, self.defaults[key])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.load_state_dict``, checked at load time.

        Every state tensor must have its parameter's shape and a floating dtype;
        ``step`` may be a tensor or a Python number (as torch's optimizers
        accept) and is stored as a float32 tensor. A mismatch raises, naming
        the parameter, and leaves the optimizer as it was.
        """
        before = (self.state, self.param_groups)
        super().load_state_dict(state_dict)
        try:
            self._after_load(state_dict)
            for index, group in enumerate(self.param_groups):
                labels = _labels(group, index)
                for position, param in enumerate(group["params"]):
                    state = self.state.get(param)
                    if not state:
                        continue
                    try:
                        _normalise_step(state)
                        self._load_state_check(param, group, state)
                    except (TypeError, ValueError) as error:
                        raise type(error)(
                            f"state of parameter {labels[position]!r} in the loaded "
                            f"state_dict: {error}"
                        ) from None
        except BaseException:
            self.state, self.param_groups = before
            raise

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Perform one update of every parameter that has a ``.grad``.

        ``closure`` re-evaluates the model and returns the loss, as in
        ``torch.optim``; it runs with gradients enabled and its loss is returned.

        A parameter whose state has another dtype than :meth:`_state_dtype` of
        the parameter's dtype (it was converted, e.g. by ``model.to(dtype)``,
        after its state was made) is refused with a ``TypeError`` naming it, as
        torch.optim refuses it; ``optimizer.load_state_dict(
        optimizer.state_dict())`` migrates the state to the new dtype.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._probe is not None:
            self._probed_step()
            return loss
        self._apply(self._plan(), None)
        return loss

    @torch.compiler.disable
    def _probed_step(self) -> None:
        # Outside torch.compile: the probe's bookkeeping is Python state that
        # a compiled graph would guard on and recompile for at every step.
        probe = self._probe
        works = self._plan()
        measuring = probe.wants_this_step()
        rows = [probe.new_rows(len(w.params)) if measuring else None for w in works]
        self._apply(works, rows)
        if measuring:
            for work, table in zip(works, rows, strict=True):
                corrections = self._corrections(work)
                probe.add_group(work.index, work.group, work.params, table, corrections)
            probe.finish_step()

    def _apply(
        self, works: list[GroupWork], rows: list[np.ndarray | None] | None
    ) -> None:
        """Update every checked group. The first group's tensors are checked by
        its operator (every operator checks its own, before it changes
        anything), so the state that :meth:`_plan` made is kept only once that
        has passed; a refused step then leaves no trace."""
        rows = rows or [None] * len(works)
        for k, (work, table) in enumerate(zip(works, rows, strict=True)):
            if k > 0:
                self._update(work, table)
                continue
            try:
                self._update(work, table)
            except (TypeError, ValueError, RuntimeError):
                # The same refusal, naming the parameter (torch's dispatcher
                # refuses a sparse tensor before the operator's own checks).
                self._check_tensors(work)
                raise
            for w in works:
                for p, state in zip(w.params, w.states, strict=True) if w.new else ():
                    if self.state.get(p) is not state:
                        self.state[p].update(state)

    def _corrections(self, work: GroupWork) -> list[tuple[float, float]] | None:
        """Each tensor's bias corrections after the step (Adam's probes)."""
        return None

    def _plan(self) -> list[GroupWork]:
        """Check every group's options, gradients and (from the second group on)
        tensors, and make the state each parameter lacks, without keeping it
        yet. Raises before anything is modified."""
        works = []
        for index, group in enumerate(self.param_groups):
            options = self._check_group(dict(group))
            params = self._params_with_grad(group)
            if not params:
                continue
            states = []
            new_state = False
            get = self.state.get
            for p in params:
                state = get(p)
                new = self._new_state(p, options, state or {})
                if new:
                    new_state = True
                    state = {**state, **new} if state else new
                states.append(state)
            self._check_state_dtypes(group, index, options, params, states)
            work = GroupWork(
                index, group, options, params, states, _Labels(group, index, params)
            )
            work.new = new_state
            if works:  # the first group is checked by its operator (see _apply)
                self._check_tensors(work)
            works.append(work)
        return works

    def _check_state_dtypes(
        self,
        group: dict[str, Any],
        index: int,
        options: dict[str, Any],
        params: list[torch.Tensor],
        states: list[dict[str, Any]],
    ) -> None:
        """Raise if a parameter's state is not in the dtype its state belongs in.

        The kernels would step a float64 parameter with float32 state without
        complaint (the gate allows a ``state_dtype``), so a ``model.to(dtype)``
        after the state was made is caught here; one dtype per group is the
        usual case, decided in two scans.
        """
        key = self._state_tensors[0]
        param_dtypes = [p.dtype for p in params]
        found = [getattr(s.get(key), "dtype", None) for s in states]
        expected = {d: self._state_dtype(d, options) for d in set(param_dtypes)}
        if len(expected) == 1 and set(found) == set(expected.values()):
            return
        for row, (dtype, have) in enumerate(zip(param_dtypes, found, strict=True)):
            # A state that is no tensor or of an unsupported dtype is the gate's
            # to refuse, with its own message; here only a float state that
            # belongs to another parameter dtype.
            if have in _SUPPORTED and have != expected[dtype]:
                label = _Labels(group, index, params)[row]
                raise TypeError(
                    f"parameter {label!r} is {dtype} but its {key} is {have}: the "
                    "parameter's dtype changed after its state was made (model.to("
                    f"dtype) mid-training?). {type(self).__name__} keeps the state "
                    f"of a {dtype} parameter in {expected[dtype]}. To continue, "
                    "migrate the state explicitly with "
                    "optimizer.load_state_dict(optimizer.state_dict())"
                )

    def _params_with_grad(self, group: dict[str, Any]) -> list[torch.Tensor]:
        params = [p for p in group["params"] if p.grad is not None]
        # Comprehensions, not map(attrgetter): torch.compile traces this, and
        # dynamo cannot call an attrgetter.
        if {p.grad.layout for p in params} - _STRIDED:
            raise TypeError(
                f"{type(self).__name__} does not support sparse gradients; "
                f"use {self._sparse_alternative} for sparse parameters"
            )
        dtypes = {p.dtype for p in params}
        if not dtypes <= _SUPPORTED:
            raise TypeError(
                f"{type(self).__name__} updates float64, float32, bfloat16 and "
                f"float16 parameters, got a parameter of dtype "
                f"{min(dtypes - _SUPPORTED, key=str)}"
            )
        return params


_STRIDED = {torch.strided}
_SUPPORTED = frozenset(rules.SUPPORTED_DTYPES)


class _Labels(Sequence[str]):
    """The names of a group's parameters with a gradient, made only when an
    error needs one (a step of 200 parameters would otherwise build 200
    strings it never reads)."""

    def __init__(
        self, group: dict[str, Any], index: int, params: list[torch.Tensor]
    ) -> None:
        self._group, self._index, self._params = group, index, params

    def __len__(self) -> int:
        return len(self._params)

    def __getitem__(self, row):  # type: ignore[override]
        if isinstance(row, slice):
            return [self[i] for i in range(len(self))[row]]
        names = _labels(self._group, self._index)
        position = {id(p): i for i, p in enumerate(self._group["params"])}
        return names[position[id(self._params[row])]]


def default_state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a parameter's optimizer state is kept in by default: float32 for
    float16 (whose smallest normal number, 6.1e-5, and flush to 0 below 6e-8
    would lose ``(1−β2)·g²`` for typical gradients, and with it the step size),
    else the parameter's own dtype (bfloat16 has float32's range).

    >>> default_state_dtype(torch.float16), default_state_dtype(torch.bfloat16)
    (torch.float32, torch.bfloat16)
    """
    return torch.float32 if dtype == torch.float16 else dtype


def _labels(group: dict[str, Any], index: int) -> list[str]:
    """The parameters' names where the user gave them, else ``group{i}.param{j}``."""
    names = group.get("param_names") or []
    return [
        names[j] if j < len(names) else f"group{index}.param{j}"
        for j in range(len(group["params"]))
    ]


def _normalise_step(state: dict[str, Any]) -> None:
    """A ``step`` saved as a Python number becomes torch's float32 tensor."""
    if "step" not in state:
        return
    step = state["step"]
    if isinstance(step, torch.Tensor):
        if step.numel() != 1 or step.is_complex():
            raise ValueError(f"step must hold one real number, got {step!r}")
        value = step.item()
    elif isinstance(step, (int, float)) and not isinstance(step, bool):
        value = step
    else:
        raise TypeError(f"step must be a number or a tensor, got {step!r}")
    if not (value >= 0 and float(value).is_integer()):
        raise ValueError(f"step must be a whole number >= 0, got {value!r}")
    if not isinstance(step, torch.Tensor):
        state["step"] = torch.tensor(float(value), dtype=torch.float32)


def check_state_tensor(
    name: str, value: object, param: torch.Tensor, dtypes: Iterable[torch.dtype]
) -> None:
    """A loaded state tensor: a tensor with ``param``'s shape and device and one of
    ``dtypes``."""
    dtypes = tuple(dtypes)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
    if value.shape != param.shape:
        raise ValueError(
            f"{name} has shape {tuple(value.shape)}, but the parameter has shape "
            f"{tuple(param.shape)} (a checkpoint of another model?)"
        )
    if value.dtype not in dtypes:
        raise TypeError(
            f"{name} has dtype {value.dtype}; expected "
            f"{' or '.join(str(d) for d in dtypes)}"
        )
    if value.device != param.device:
        raise ValueError(
            f"{name} is on {value.device}, but the parameter is on {param.device}"
        )
