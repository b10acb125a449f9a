"""The torch.optim.Optimizer contract, item by item, for every configuration."""

from __future__ import annotations

import io

import pytest
import torch
from configs import CONFIGS, Config
from tests_helpers import snapshot, train_steps

import optiscope


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_state_dict_round_trip_mid_run_is_bit_identical(config: Config) -> None:
    model_a = torch.nn.Linear(4, 3)
    opt_a = config.cls(model_a.parameters(), **config.options)
    train_steps(model_a, opt_a, 5, seed=1)

    buffer = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model_b = torch.nn.Linear(4, 3)
    model_b.load_state_dict(saved["model"])
    opt_b = config.cls(model_b.parameters(), **config.options)
    opt_b.load_state_dict(saved["opt"])

    train_steps(model_a, opt_a, 5, seed=2)
    train_steps(model_b, opt_b, 5, seed=2)
    for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_closure_returns_loss_and_runs_with_grad(config: Config) -> None:
    model = torch.nn.Linear(3, 1)
    opt = config.cls(model.parameters(), **config.options)
    x = torch.randn(8, 3)

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    before = snapshot(model)
    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.requires_grad
    assert any(
        not torch.equal(a, b) for a, b in zip(before, snapshot(model), strict=True)
    )


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_param_groups_with_own_options_and_add_param_group(config: Config) -> None:
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = config.cls([{"params": [a], "lr": 0.0}], **config.options)
    opt.add_param_group({"params": [b]})
    assert opt.param_groups[1]["lr"] == config.options["lr"]
    a.grad, b.grad = torch.ones(3), torch.ones(3)
    opt.step()
    assert torch.equal(a, torch.ones(3)), "lr=0 group must not move"
    assert not torch.equal(b, torch.ones(3))


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_params_without_grad_are_skipped_and_grad_is_not_modified(
    config: Config,
) -> None:
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = config.cls([a, b], **config.options)
    a.grad = torch.full((3,), 0.5)
    grad_before = a.grad.clone()
    opt.step()
    assert torch.equal(a.grad, grad_before)
    assert torch.equal(b, torch.ones(3)) and b not in opt.state


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_step_and_state_dict_hooks_run(config: Config) -> None:
    a = torch.nn.Parameter(torch.ones(3))
    opt = config.cls([a], **config.options)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("state_dict") or sd)
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load") or sd)
    a.grad = torch.ones(3)
    opt.step()
    opt.load_state_dict(opt.state_dict())
    assert calls == ["pre", "post", "state_dict", "load"]


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16]
)
def test_dtypes_follow_float64_run(config: Config, dtype: torch.dtype) -> None:
    """Low precision updates track the float64 run to the dtype's resolution."""
    results = {}
    for d in (torch.float64, dtype):
        w = torch.nn.Parameter(torch.linspace(-1, 1, 16, dtype=torch.float64).to(d))
        opt = config.cls([w], **config.options)
        gen = torch.Generator().manual_seed(0)
        for _ in range(20):
            w.grad = torch.randn(16, generator=gen, dtype=torch.float64).to(d)
            opt.step()
        # float16 parameters keep their state in float32 (see test_precision.py).
        state_dtype = torch.float32 if d == torch.float16 else d
        state = opt.state[w]
        moment = state.get("exp_avg", state.get("momentum_buffer"))
        assert w.dtype == d and moment.dtype == state_dtype
        results[d] = w.detach().double()
    resolution = torch.finfo(dtype).eps * 40  # 20 steps, each rounding twice at most
    assert torch.allclose(
        results[dtype], results[torch.float64], rtol=resolution, atol=resolution
    )


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_zero_gradient_never_moves_or_becomes_nan(
    config: Config, dtype: torch.dtype
) -> None:
    """A coordinate whose gradient is always 0 stays put, even with eps=0 or in float16."""
    w = torch.nn.Parameter(torch.tensor([0.5, -0.25], dtype=dtype))
    opt = config.cls([w], **{**config.options, "weight_decay": 0.0})
    for _ in range(5):
        w.grad = torch.tensor([0.0, 1.0], dtype=dtype)
        opt.step()
    assert w[0].item() == 0.5 and torch.isfinite(w).all()


def test_momentum_schedulers_cycle_momentum() -> None:
    w = torch.nn.Parameter(torch.ones(2))
    opt = optiscope.Momentum([w], lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=10)
    seen = set()
    for _ in range(9):
        w.grad = torch.ones(2)
        opt.step()
        sched.step()
        seen.add(round(opt.param_groups[0]["momentum"], 6))
    assert len(seen) > 3


def test_adam_schedulers_cycle_betas() -> None:
    w = torch.nn.Parameter(torch.ones(2))
    opt = optiscope.Adam([w], lr=0.1)
    sched = torch.optim.lr_scheduler.CyclicLR(
        opt,
        base_lr=0.01,
        max_lr=0.1,
        step_size_up=3,
        base_momentum=0.8,
        max_momentum=0.95,
    )
    beta1s, lrs = set(), set()
    for _ in range(6):
        w.grad = torch.ones(2)
        opt.step()
        sched.step()
        beta1s.add(round(opt.param_groups[0]["betas"][0], 6))
        lrs.add(round(opt.param_groups[0]["lr"], 6))
    assert len(beta1s) > 2 and len(lrs) > 2


def test_lr_scheduler_lr_takes_effect() -> None:
    """A StepLR that zeroes the lr stops the parameter."""
    w = torch.nn.Parameter(torch.ones(2))
    opt = optiscope.Adam([w], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.0)
    w.grad = torch.ones(2)
    opt.step()
    sched.step()
    moved = w.detach().clone()
    opt.step()
    assert torch.equal(w, moved)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_cuda_matches_cpu(config: Config) -> None:
    cpu, gpu = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    gpu.load_state_dict(cpu.state_dict())
    gpu.cuda()
    opts = [config.cls(m.parameters(), **config.options) for m in (cpu, gpu)]
    train_steps(cpu, opts[0], 5, seed=1)
    train_steps(gpu, opts[1], 5, seed=1)
    for a, b in zip(cpu.parameters(), gpu.parameters(), strict=True):
        assert torch.allclose(a, b.cpu(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("param_dtype", "state_dtype"),
    [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)],
)
def test_state_dtype_survives_a_checkpoint_bit_for_bit(
    param_dtype, state_dtype
) -> None:
    """torch's load_state_dict casts states to the parameter dtype; ours must not."""
    w = torch.nn.Parameter(torch.linspace(-1, 1, 7, dtype=param_dtype))
    opt = optiscope.Adam([w], lr=1e-2, state_dtype=state_dtype)
    for _ in range(3):
        w.grad = torch.linspace(0.1, 1, 7, dtype=param_dtype)
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    clone = optiscope.Adam([torch.nn.Parameter(w.detach().clone())], lr=1e-2)
    clone.load_state_dict(torch.load(buffer, weights_only=True))
    (restored,) = clone.state.values()
    for key in ("exp_avg", "exp_avg_sq"):
        assert restored[key].dtype == state_dtype
        assert torch.equal(restored[key], opt.state[w][key])
