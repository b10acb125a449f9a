"""What every optiscope optimizer shares with ``torch.optim.Optimizer``.

Subclasses say three things: how to check a param group's options
(``_check_group``), which state a parameter needs (``_init_state``) and how to
update one group (``_update_group``). The torch contract (param groups,
closures, hooks, ``state_dict``) comes from ``torch.optim.Optimizer`` itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import _checks

if TYPE_CHECKING:
    from .probes import OptimizerProbe

ParamsT = (
    Iterable[torch.Tensor]
    | Iterable[dict[str, Any]]
    | Iterable[tuple[str, torch.Tensor]]
)


class OptiscopeOptimizer(torch.optim.Optimizer):
    """Base class: validation before mutation, lazy state, closure handling."""

    #: Suggested replacement named in the error for sparse gradients.
    _sparse_alternative = "torch.optim.SparseAdam"

    #: Which per-tensor sums a probed step fills (see :mod:`optiscope.probes.layout`).
    _probe_layout: tuple[str, ...]

    def __init__(
        self, params: ParamsT, defaults: dict[str, Any], *, probe: bool = False
    ) -> None:
        defaults = self._check_group(dict(defaults))
        self._probe: OptimizerProbe | None = None
        super().__init__(params, defaults)
        if _checks.flag("probe", probe):
            from .probes import probe as attach

            attach(self)

    @property
    def probes(self) -> dict[str, Any] | None:
        """The latest probe record (per group and per parameter), or None if not probed."""
        return None if self._probe is None else self._probe.latest

    # -- hooks for subclasses -------------------------------------------------
    def _check_group(self, group: dict[str, Any]) -> dict[str, Any]:
        """Validate and normalise one group's options; raise on bad input."""
        raise NotImplementedError

    def _init_state(self, param: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def _update_group(
        self,
        group: dict[str, Any],
        params: list[torch.Tensor],
        stats: np.ndarray | None,
    ) -> list[tuple[float, float]] | None:
        """Update ``params``; with ``stats``, also fill one probe row per tensor.

        Returns what a probe needs beyond the rows (Adam: each tensor's bias
        corrections), or None.
        """
        raise NotImplementedError

    # -- torch.optim.Optimizer contract -----------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Check the merged group before torch stores it, so a refused group
        # leaves self.param_groups untouched.
        merged = {**getattr(self, "defaults", {}), **param_group}
        checked = self._check_group({k: v for k, v in merged.items() if k != "params"})
        options = {k: checked[k] for k in param_group if k != "params" and k in checked}
        super().add_param_group({**param_group, **options})

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Perform one update of every parameter that has a ``.grad``.

        ``closure`` re-evaluates the model and returns the loss, as in
        ``torch.optim``; it runs with gradients enabled and its loss is returned.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Validate every group first: a refused step must not half-update the model.
        for group in self.param_groups:
            self._check_group(dict(group))
        work = [(g, self._params_with_grad(g)) for g in self.param_groups]
        probe = self._probe
        measuring = probe is not None and probe.wants_this_step()
        for index, (group, params) in enumerate(work):
            if not params:
                continue
            for p in params:
                if not self.state[p]:
                    self.state[p].update(self._init_state(p, group))
            rows = probe.new_rows(len(params)) if measuring else None
            extra = self._update_group(group, params, rows)
            if measuring:
                probe.add_group(index, group, params, rows, extra)
        if measuring:
            probe.finish_step()
        return loss

    def _params_with_grad(self, group: dict[str, Any]) -> list[torch.Tensor]:
        params = []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise TypeError(
                    f"{type(self).__name__} does not support sparse gradients; "
                    f"use {self._sparse_alternative} for sparse parameters"
                )
            if p.dtype not in _checks.FLOATING_DTYPES:
                raise TypeError(
                    f"{type(self).__name__} updates float64, float32, bfloat16 and "
                    f"float16 parameters, got a parameter of dtype {p.dtype}"
                )
            params.append(p)
        return params
