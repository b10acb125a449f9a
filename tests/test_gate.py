"""Memory safety and atomic steps: every tensor is checked before a kernel sees
an address, and a refused step or load changes nothing.

Each fault sits in the second param group, so a step that applied groups one
by one would already have moved the first when it failed.
"""

from __future__ import annotations

import io

import pytest
import torch
from configs import config

import optiscope

ADAM = config("adam-l2-amsgrad")
MOMENTUM = config("momentum")


def two_groups(cfg, steps: int = 2):
    """An optimizer over two groups of two parameters, ``steps`` steps in."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3, generator=gen)) for _ in range(4)]
    opt = cfg.cls(
        [{"params": params[:2]}, {"params": params[2:], "lr": 0.02}], **cfg.options
    )
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    return opt, params


def snapshot(opt) -> list[torch.Tensor]:
    """Every parameter, gradient and state tensor (step counters included)."""
    out = []
    for group in opt.param_groups:
        for p in group["params"]:
            out.append(p.detach().clone())
            out.append(p.grad.clone() if p.grad is not None else torch.empty(0))
            for value in opt.state[p].values():
                if isinstance(value, torch.Tensor):
                    out.append(value.clone())
    return out


def assert_unchanged(before: list[torch.Tensor], opt) -> None:
    after = snapshot(opt)
    assert len(before) == len(after)
    for a, b in zip(before, after, strict=True):
        assert (a.dtype, a.shape, a.device) == (b.dtype, b.shape, b.device)
        if a.device.type != "meta":  # a meta tensor has no values to compare
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def _shrink_grad(opt, params):
    params[2].grad.data = torch.ones(10)


def _int_grad(opt, params):
    params[3].grad.data = torch.ones(4, 3, dtype=torch.int64)


def _state(name, make):
    def fault(opt, params):
        state = opt.state[params[3]]
        if name in state:
            state[name] = make(params[3], state[name])

    return fault


FAULTS = {
    "grad with fewer elements": (
        _shrink_grad,
        ValueError,
        r"grad of parameter 'group1\.param0' has shape \(10,\), but the parameter "
        r"has shape \(4, 3\)",
    ),
    "int64 gradient": (
        _int_grad,
        TypeError,
        r"grad of parameter 'group1\.param1' has dtype torch\.int64",
    ),
    "state from a smaller model": (
        _state("exp_avg", lambda p, s: torch.zeros(2)),
        ValueError,
        r"exp_avg of parameter 'group1\.param1' has shape \(2,\)",
    ),
    "states of mixed dtypes": (
        _state("exp_avg_sq", lambda p, s: s.float().double()),
        TypeError,
        r"exp_avg_sq of parameter 'group1\.param1' has dtype torch\.float64, but "
        r"exp_avg is torch\.float32",
    ),
    "int64 state": (
        _state("exp_avg", lambda p, s: s.long()),
        TypeError,
        r"exp_avg of parameter 'group1\.param1' has dtype torch\.int64",
    ),
    "state aliasing its parameter": (
        _state("exp_avg", lambda p, s: p.data),
        ValueError,
        r"shares memory with param of parameter 'group1\.param1'",
    ),
    "broadcast state (stride 0)": (
        _state("exp_avg", lambda p, s: torch.zeros(1).expand(4, 3)),
        ValueError,
        r"exp_avg of parameter 'group1\.param1' stores one element for several",
    ),
    "sparse state": (
        _state("exp_avg", lambda p, s: s.to_sparse()),
        TypeError,
        r"exp_avg of parameter 'group1\.param1' is a Tensor with layout torch\.sparse_coo",
    ),
    "state on another device": (
        _state("exp_avg", lambda p, s: s.to("meta")),
        ValueError,
        r"exp_avg of parameter 'group1\.param1' is on meta",
    ),
    "step of several elements": (
        _state("step", lambda p, s: torch.ones(3)),
        TypeError,
        r"step of parameter 'group1\.param1' must be a one-element real tensor",
    ),
}
MOMENTUM_FAULTS = {
    "sparse buffer in the first group": (
        lambda opt, params: opt.state[params[0]].update(
            momentum_buffer=opt.state[params[0]]["momentum_buffer"].to_sparse()
        ),
        TypeError,
        r"momentum_buffer of parameter 'group0\.param0' is a Tensor with layout",
    ),
    "buffer from a smaller model": (
        _state("momentum_buffer", lambda p, s: torch.zeros(5)),
        ValueError,
        r"momentum_buffer of parameter 'group1\.param1' has shape \(5,\)",
    ),
    "buffer aliasing the gradient": (
        _state("momentum_buffer", lambda p, s: p.grad),
        ValueError,
        r"shares memory",
    ),
}


@pytest.mark.parametrize("fault", list(FAULTS), ids=str)
def test_adam_refuses_before_changing_anything(fault) -> None:
    make, error, message = FAULTS[fault]
    opt, params = two_groups(ADAM)
    make(opt, params)
    before = snapshot(opt)
    with pytest.raises(error, match=message):
        opt.step()
    assert_unchanged(before, opt)


@pytest.mark.parametrize(
    "fault",
    ["grad with fewer elements", "int64 gradient", *MOMENTUM_FAULTS],
    ids=str,
)
def test_momentum_refuses_before_changing_anything(fault) -> None:
    make, error, message = {**FAULTS, **MOMENTUM_FAULTS}[fault]
    opt, params = two_groups(MOMENTUM)
    make(opt, params)
    before = snapshot(opt)
    with pytest.raises(error, match=message):
        opt.step()
    assert_unchanged(before, opt)


def test_refused_first_step_adds_no_state() -> None:
    """A parameter's state is created only when the whole step applies."""
    opt, params = two_groups(ADAM, steps=0)
    _shrink_grad(opt, params)
    with pytest.raises(ValueError):
        opt.step()
    assert len(opt.state) == 0


@pytest.mark.parametrize("cfg", [ADAM, MOMENTUM], ids=str)
def test_a_fault_in_the_first_group_is_named_and_adds_no_state(cfg) -> None:
    """The first group is checked by its operator; the refusal still names the
    parameter, and the state made for the step is not kept."""
    opt, params = two_groups(cfg, steps=0)
    params[1].grad.data = torch.ones(5)
    with pytest.raises(ValueError, match=r"grad of parameter 'group0\.param1'"):
        opt.step()
    assert len(opt.state) == 0
    opt, params = two_groups(cfg)
    params[0].grad.data = torch.ones(5)
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"grad of parameter 'group0\.param0'"):
        opt.step()
    assert_unchanged(before, opt)


def test_named_parameters_are_named_in_the_error() -> None:
    model = torch.nn.Linear(3, 2)
    opt = optiscope.Adam(model.named_parameters())
    model(torch.ones(1, 3)).sum().backward()
    model.bias.grad.data = torch.ones(7)
    with pytest.raises(ValueError, match=r"grad of parameter 'bias' has shape \(7,\)"):
        opt.step()


@pytest.mark.parametrize("cfg", [ADAM, MOMENTUM], ids=str)
def test_checkpoint_of_a_smaller_model_is_refused_at_load(cfg) -> None:
    small, large = torch.nn.Linear(3, 2), torch.nn.Linear(5, 2)
    opt_small = cfg.cls(small.parameters(), **cfg.options)
    small(torch.ones(1, 3)).sum().backward()
    opt_small.step()
    buffer = io.BytesIO()
    torch.save(opt_small.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    opt = cfg.cls(large.parameters(), **cfg.options)
    large(torch.ones(1, 5)).sum().backward()
    opt.step()
    before = snapshot(opt)
    state_before = opt.state_dict()
    with pytest.raises(
        ValueError, match=r"parameter 'group0\.param0'.*has shape \(2, 3\)"
    ):
        opt.load_state_dict(saved)
    assert_unchanged(before, opt)
    assert opt.state_dict()["param_groups"] == state_before["param_groups"]
    opt.step()  # still usable


def test_python_number_step_loads_and_steps() -> None:
    model = torch.nn.Linear(3, 2)
    opt = optiscope.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    saved = opt.state_dict()
    for state in saved["state"].values():
        state["step"] = 1  # as older checkpoints hold it
    opt.load_state_dict(saved)
    opt.step()
    assert all(s["step"].dtype == torch.float32 for s in opt.state.values())
    assert all(s["step"].item() == 2.0 for s in opt.state.values())


@pytest.mark.parametrize("bad", [-1, 2.5, "3"])
def test_bad_step_is_refused_at_load(bad) -> None:
    model = torch.nn.Linear(3, 2)
    opt = optiscope.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    saved = opt.state_dict()
    next(iter(saved["state"].values()))["step"] = bad
    with pytest.raises((TypeError, ValueError), match="step"):
        opt.load_state_dict(saved)


def test_tensor_lr_takes_the_float_lr_steps() -> None:
    """torch accepts a tensor ``lr``; so do we, with identical steps."""
    runs = []
    for lr in (0.01, torch.tensor(0.01)):
        opt, params = two_groups(config("adam"), steps=0)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        runs.append([p.detach().clone() for p in params])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


class _Wrapped(torch.Tensor):
    """A tensor subclass with no kernel of its own: it takes the per-tensor rule."""


def test_tensor_subclass_takes_the_per_tensor_rule() -> None:
    gen = torch.Generator().manual_seed(3)
    data, grad = torch.randn(5, 4, generator=gen), torch.randn(5, 4, generator=gen)
    results = []
    for make in (lambda t: t, lambda t: t.as_subclass(_Wrapped)):
        p = make(data.clone())
        p.grad = make(grad.clone())
        opt = optiscope.Adam([p], lr=0.1)
        opt.step()
        opt.step()
        results.append(torch.Tensor(p).clone())
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_dtensor_parameter_steps_on_its_local_shard(tmp_path) -> None:
    """A DTensor's ``data_ptr()`` is 0; it must never reach a kernel as memory."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        gen = torch.Generator().manual_seed(0)
        data, grad = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen)
        for cls in (optiscope.Adam, optiscope.Momentum):
            plain = torch.nn.Parameter(data.clone())
            plain.grad = grad.clone()
            sharded = torch.nn.Parameter(
                distribute_tensor(data.clone(), mesh, [Shard(0)])
            )
            sharded.grad = distribute_tensor(grad.clone(), mesh, [Shard(0)])
            for p in (plain, sharded):
                opt = cls([p], lr=0.1)
                opt.step()
                opt.step()
            assert torch.equal(sharded.to_local(), plain.detach())
    finally:
        dist.destroy_process_group()


def test_stats_of_the_wrong_shape_are_refused_before_the_step() -> None:
    import numpy as np

    from optiscope import kernels

    p, g, m = torch.zeros(3), torch.ones(3), torch.zeros(3)
    with pytest.raises(ValueError, match="stats must be a float64"):
        kernels.momentum_(
            [p],
            [g],
            [m],
            lr=0.1,
            momentum=0.9,
            weight_decay=0.0,
            maximize=False,
            stats=np.zeros((2, 2)),
        )
    assert torch.equal(p, torch.zeros(3)) and torch.equal(m, torch.zeros(3))


def test_the_operator_checks_its_own_arguments() -> None:
    """Called directly, ``torch.ops.optiscope.adam_`` refuses what the gate refuses."""
    p, g = torch.zeros(4), torch.ones(3)
    m, v, step = torch.zeros(4), torch.zeros(4), torch.zeros(())
    with pytest.raises(ValueError, match=r"grad of parameter params\[0\] has shape"):
        torch.ops.optiscope.adam_(
            [p],
            [g],
            [m],
            [v],
            [],
            [step],
            0.1,
            0.9,
            0.999,
            1e-8,
            0.0,
            False,
            False,
            False,
            True,
            None,
        )
    assert step.item() == 0.0


def test_the_few_ranges_path_finds_the_same_clash_as_numpy() -> None:
    """Steps of a few tensors check overlap in Python, others with numpy: on
    random byte ranges (many clashing, many empty) both name the same pair."""
    import numpy as np

    from optiscope.kernels import gate

    rng = np.random.default_rng(0)
    seen = {True: 0, False: 0}
    for _ in range(3000):
        n = int(rng.integers(2, gate._FEW_RANGES + 1))
        start = rng.integers(0, 200, n).astype(np.int64)
        stop = start + rng.integers(0, 12, n)
        few = gate._first_clash_few(start.tolist(), stop.tolist())
        assert few == gate._first_clash_many(start, stop)
        seen[few is None] += 1
    assert min(seen.values()) > 100  # both outcomes were exercised
