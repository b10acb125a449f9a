r"""Momentum in the EMA form of the seed: :math:`m \leftarrow \beta m + (1-\beta) g`."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from . import _checks, kernels
from ._optimizer import (
    GroupWork,
    OptiscopeOptimizer,
    ParamsT,
    check_state_tensor,
    default_state_dtype,
)
from .kernels import rows as layout


class SGDConventionWarning(UserWarning):
    """A ``torch.optim.SGD`` state_dict was converted to Momentum's convention."""


class Momentum(OptiscopeOptimizer):
    r"""Momentum SGD with the momentum buffer as an exponential moving average.

    .. math::

        m_t &= \beta\, m_{t-1} + (1-\beta)\, g_t, \qquad m_0 = 0 \\
        \theta_t &= \theta_{t-1} - \alpha\, m_t

    so the first step is :math:`-\alpha(1-\beta) g_1`, and ``momentum=0`` is plain
    SGD. The buffer is stored as ``state[p]["momentum_buffer"]``.

    .. warning::
        ``torch.optim.SGD`` uses another convention: its buffer starts at
        :math:`g_1` and sums, :math:`b_t = \beta b_{t-1} + g_t`, so its steps are
        :math:`1/(1-\beta)` times larger in steady state. The two are the same
        trajectory under the exact mapping

        ``Momentum(lr=α, momentum=β)`` ≡ ``SGD(lr=α(1−β), momentum=β, dampening=0)``

        from the first step on, because :math:`m_t = (1-\beta) b_t` holds at
        :math:`t=1` (:math:`m_1 = (1-\beta)g_1`, :math:`b_1 = g_1`) and both
        recursions are linear with the same :math:`\beta`.

    Interchange with SGD: :meth:`load_state_dict` recognises a
    ``torch.optim.SGD`` state_dict by its param-group keys (``dampening``,
    ``nesterov``) and converts it by that mapping, per group, with an
    :class:`SGDConventionWarning`: ``momentum_buffer`` :math:`m = (1-\beta) b`
    and ``lr`` :math:`\alpha = \alpha_{SGD}/(1-\beta)` (``initial_lr`` too),
    so the steps continue SGD's trajectory. Nesterov or ``dampening != 0``
    cannot be represented and are refused. :meth:`sgd_state_dict` goes the other
    way. A Momentum state_dict loaded straight into ``torch.optim.SGD`` is
    misread by torch (steps :math:`1/(1-\beta)` too large); use
    :meth:`sgd_state_dict` for that.

    Precision: the buffer of a float16 parameter is kept in float32 (as Adam's
    moments are), other buffers in the parameter's dtype; the update is
    computed in float32 (float64 for float64) and rounded once.

    Weight decay is L2: :math:`\lambda\theta` is added to the gradient before the
    average. ``probe=True`` measures every step in the same pass, including an
    estimate of the variance reduction (see :mod:`optiscope.probes.measure`).

    Example:
        >>> import torch, optiscope
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> opt = optiscope.Momentum([w], lr=0.1, momentum=0.9)
        >>> w.grad = torch.ones(2)
        >>> opt.step()
        >>> w.detach()  # 1 - 0.1 * (1 - 0.9) * 1
        tensor([0.9900, 0.9900])
    """

    _probe_layout = layout.MOMENTUM
    _state_tensors = ("momentum_buffer",)

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-2,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        maximize: bool = False,
        *,
        probe: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, maximize=maximize
        )
        super().__init__(params, defaults, probe=probe)

    def _check_group(self, group: dict[str, Any]) -> dict[str, Any]:
        group["lr"] = _checks.non_negative("lr", group["lr"])
        group["momentum"] = _checks.unit_interval_open_right(
            "momentum", group["momentum"]
        )
        group["weight_decay"] = _checks.non_negative(
            "weight_decay", group["weight_decay"]
        )
        group["maximize"] = _checks.flag("maximize", group["maximize"])
        return group

    def _new_state(
        self, param: torch.Tensor, options: dict[str, Any], state: dict[str, Any]
    ) -> dict[str, Any]:
        if "momentum_buffer" in state:
            return {}
        buffer = torch.zeros_like(
            param,
            dtype=default_state_dtype(param.dtype),
            memory_format=torch.preserve_format,
        )
        return {"momentum_buffer": buffer}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a Momentum state_dict, or convert a ``torch.optim.SGD`` one.

        An SGD state_dict (param groups with ``dampening`` or ``nesterov``) is
        converted per group with momentum :math:`\beta`: ``momentum_buffer``
        times :math:`1-\beta`, ``lr`` (and ``initial_lr``) divided by
        :math:`1-\beta`, SGD's own keys dropped; an
        :class:`SGDConventionWarning` says so. Then
        ``Momentum(lr=α, momentum=β)`` continues the trajectory of
        ``SGD(lr=α(1−β), momentum=β, dampening=0)``. Groups with
        ``nesterov=True`` or ``dampening != 0`` have no Momentum equivalent: the
        load is refused with a ``ValueError`` and nothing changes. The dict
        passed in is never modified.
        """
        converted, note = _from_sgd(state_dict)
        super().load_state_dict(converted)
        if note:
            warnings.warn(note, SGDConventionWarning, stacklevel=2)

    def sgd_state_dict(self) -> dict[str, Any]:
        """This optimizer's state_dict in ``torch.optim.SGD``'s convention.

        Loaded into ``torch.optim.SGD``, it continues this optimizer's
        trajectory: per group, ``lr`` (and ``initial_lr``) times :math:`1-\beta`,
        ``momentum_buffer`` :math:`b = m/(1-\beta)` (in the buffer's dtype;
        torch casts it to the parameter's on load), ``dampening=0``,
        ``nesterov=False``. Groups with ``momentum=0`` carry no buffer (SGD
        keeps none). The tensors are new; this optimizer is not changed.
        """
        ours = self.state_dict()
        groups, state = [], {}
        for group in ours["param_groups"]:
            beta = group["momentum"]
            scaled = {k: group[k] * (1 - beta) for k in _LR_KEYS if k in group}
            groups.append({**group, **scaled, **_SGD_DEFAULTS})
            for key in group["params"] if beta else ():
                entry = ours["state"].get(key)
                if entry and "momentum_buffer" in entry:
                    buffer = entry["momentum_buffer"]
                    b = (buffer.to(torch.float64) / (1 - beta)).to(buffer.dtype)
                    state[key] = {**entry, "momentum_buffer": b}
        return {"state": state, "param_groups": groups}

    def _load_state_check(
        self, param: torch.Tensor, group: dict[str, Any], state: dict[str, Any]
    ) -> None:
        if "momentum_buffer" not in state:
            raise ValueError("lacks momentum_buffer")
        check_state_tensor(
            "momentum_buffer",
            state["momentum_buffer"],
            param,
            (default_state_dtype(param.dtype),),
        )

    def _columns(self, work: GroupWork) -> tuple:
        return (
            work.params,
            [p.grad for p in work.params],
            [s["momentum_buffer"] for s in work.states],
        )

    def _check_tensors(self, work: GroupWork) -> None:
        kernels.check_momentum(*self._columns(work), labels=work.labels)

    def _update(self, work: GroupWork, stats: np.ndarray | None) -> None:
        o = work.options
        # One fused pass over every tensor of the group; rules.momentum_step is
        # the per-tensor statement of the same rule.
        kernels.momentum_(
            *self._columns(work),
            lr=o["lr"],
            momentum=o["momentum"],
            weight_decay=o["weight_decay"],
            maximize=o["maximize"],
            stats=stats,
        )


#: Param-group keys of torch.optim.SGD that Momentum has not (their values in
#: the SGD that Momentum matches); ``dampening`` and ``nesterov`` identify SGD.
_SGD_DEFAULTS = {
    "dampening": 0,
    "nesterov": False,
    "foreach": None,
    "differentiable": False,
    "fused": None,
}
#: Learning-rate entries a group may carry (``initial_lr`` from lr_scheduler).
_LR_KEYS = ("lr", "initial_lr")


def _from_sgd(state_dict: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """``state_dict`` in Momentum's convention, and the warning to give, or the
    dict itself and None where it is not an SGD state_dict. Raises ValueError,
    before anything changes, for an SGD group Momentum cannot represent."""
    groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
    if not isinstance(groups, list) or not any(
        isinstance(g, dict) and ("dampening" in g or "nesterov" in g) for g in groups
    ):
        return state_dict, None
    mapping = "Momentum(lr=a, momentum=b) == SGD(lr=a*(1-b), momentum=b, dampening=0)"
    new_groups, new_state, changes = [], dict(state_dict.get("state", {})), []
    for index, group in enumerate(groups):
        beta = _checks.unit_interval_open_right(
            f"momentum of group {index} of the SGD state_dict", group.get("momentum", 0)
        )
        if group.get("nesterov", False):
            raise ValueError(
                f"cannot load this torch.optim.SGD state_dict into Momentum: group "
                f"{index} has nesterov=True, which has no Momentum equivalent; only "
                f"nesterov=False, dampening=0 maps ({mapping})"
            )
        dampening = group.get("dampening", 0)
        if dampening != 0:
            raise ValueError(
                f"cannot load this torch.optim.SGD state_dict into Momentum: group "
                f"{index} has dampening={dampening!r}; only dampening=0 maps "
                f"({mapping}, so the buffer converts as m = (1-b)*buffer)"
            )
        kept = {k: v for k, v in group.items() if k not in _SGD_DEFAULTS}
        for key in _LR_KEYS:
            if key in kept:
                kept[key] = kept[key] / (1 - beta)
        new_groups.append(kept)
        for key in group.get("params", []) if beta else ():
            entry = new_state.get(key)
            buffer = entry.get("momentum_buffer") if isinstance(entry, dict) else None
            if isinstance(buffer, torch.Tensor):
                m = (buffer.to(torch.float64) * (1 - beta)).to(buffer.dtype)
                new_state[key] = {**entry, "momentum_buffer": m}
        if beta:
            changes.append(
                f"group {index}: momentum={beta:g}, lr {_short(group.get('lr'))} -> "
                f"{_short(kept.get('lr'))}"
            )
    # SGD keeps no buffer without momentum, or a None one: a fresh zero buffer
    # is the same (Momentum with momentum=0 steps by the gradient alone).
    for key, entry in list(new_state.items()):
        if isinstance(entry, dict) and entry.get("momentum_buffer", 0) is None:
            entry = {k: v for k, v in entry.items() if k != "momentum_buffer"}
            new_state[key] = entry
    note = None
    if changes:
        note = (
            "converted a torch.optim.SGD state_dict to Momentum's convention: SGD's "
            "momentum_buffer sums (b <- momentum*b + g), Momentum's averages "
            "(m <- momentum*m + (1-momentum)*g), so each buffer was multiplied by "
            "(1-momentum) and each lr divided by it ("
            + "; ".join(changes)
            + f"); the steps continue SGD's trajectory: {mapping}"
        )
    return {**state_dict, "state": new_state, "param_groups": new_groups}, note


def _short(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else repr(value)
