"""State dtypes: float16 parameters keep their state in float32 (Adam's moments,
Momentum's buffer), ``state_dtype=torch.float16`` is refused, bfloat16 keeps
bfloat16 state, checkpoints keep state dtypes bit for bit, and a parameter
whose dtype changed after its state was made is refused, naming it, until its
state is migrated by ``load_state_dict``."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from configs import CONFIGS, DTYPES, Config, config, randn

import optiscope
from optiscope import reference

MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")


def state_dtype_of(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype == torch.float16 else dtype


def tensors_of(state: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k in MOMENTS}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_default_state_dtype(cfg: Config, dtype: torch.dtype) -> None:
    w = torch.nn.Parameter(randn((3, 4), dtype=dtype))
    opt = cfg.cls([w], **cfg.options)
    w.grad = randn((3, 4), dtype=dtype, scale=1e-3)
    opt.step()
    moments = tensors_of(opt.state[w])
    assert set(moments) == set(cfg.state_keys) - {"step"}
    for value in moments.values():
        assert value.dtype == state_dtype_of(dtype)
    assert w.dtype == dtype


@pytest.mark.parametrize("name", ["adam", "adamw", "adam-l2-amsgrad"])
def test_float16_adam_steps_stay_near_lr(name: str) -> None:
    """The issue's repro: float16 weights, gradients ~1e-3, lr=1e-2. With v in
    float16, (1−β2)·g² underflowed and single steps reached ~4,700·lr; Adam's
    step is bounded by lr·(1−β1)/√(1−β2) ≈ 3.2·lr, and the run tracks float64."""
    cfg = config(name)
    runs = {}
    for dtype in (torch.float64, torch.float16):
        gen = torch.Generator().manual_seed(4)
        w = torch.nn.Parameter(randn((1000,), generator=gen, dtype=dtype))
        opt = cfg.cls([w], **cfg.options)
        largest = 0.0
        for _ in range(5):
            w.grad = randn((1000,), generator=gen, dtype=dtype, scale=1e-3)
            before = w.detach().double()
            opt.step()
            largest = max(largest, (w.detach().double() - before).abs().max().item())
        runs[dtype] = (w.detach().double(), largest)
    lr = cfg.options["lr"]
    assert runs[torch.float16][1] < 3.2 * lr
    deviation = (runs[torch.float16][0] - runs[torch.float64][0]).abs().max()
    # Rounding of θ (|θ| < 4) to float16 at each of 5 steps: 2^-9 per step.
    assert deviation < 5 * 2**-9


def test_float16_momentum_buffer_keeps_small_averages() -> None:
    """(1−β)·g = 1e-7 is below float16's subnormal resolution (6e-8); the float32
    buffer holds it as the float64 reference does."""
    w = torch.nn.Parameter(torch.zeros(4, dtype=torch.float16))
    opt = optiscope.Momentum([w], lr=0.1, momentum=0.99)
    theta, m = np.zeros(4), np.zeros(4)
    for _ in range(10):
        w.grad = torch.full((4,), 1e-5, dtype=torch.float16)
        opt.step()
        g = w.grad.double().numpy()
        theta, m = reference.momentum_step(theta, m, g, lr=0.1, momentum=0.99)
    buffer = opt.state[w]["momentum_buffer"].double().numpy()
    np.testing.assert_allclose(buffer, m, rtol=1e-6)


@pytest.mark.parametrize("cls", [optiscope.Adam, optiscope.AdamW])
def test_float16_state_dtype_is_refused(cls) -> None:
    message = (
        "state_dtype must be None (float32 for float16 parameters, else the "
        "parameter's dtype) or one of torch.float64, torch.float32, "
        "torch.bfloat16, got torch.float16: float16 cannot hold"
    )
    w = torch.nn.Parameter(torch.ones(2, dtype=torch.float16))
    with pytest.raises(TypeError, match=re.escape(message)):
        cls([w], state_dtype=torch.float16)
    opt = cls([w])
    with pytest.raises(TypeError, match=re.escape(message)):
        opt.add_param_group(
            {
                "params": [torch.nn.Parameter(torch.ones(2))],
                "state_dtype": torch.float16,
            }
        )
    assert len(opt.param_groups) == 1
    w.grad = torch.ones(2, dtype=torch.float16)
    opt.step()
    saved = {k: v.clone() for k, v in opt.state[w].items()}
    before = w.detach().clone()
    opt.param_groups[0]["state_dtype"] = torch.float16
    with pytest.raises(TypeError, match=re.escape(message)):
        opt.step()
    assert torch.equal(w, before)
    assert all(torch.equal(opt.state[w][k], v) for k, v in saved.items())


@pytest.mark.parametrize(
    ("param_dtype", "state_dtype"),
    [
        (torch.float16, torch.bfloat16),
        (torch.float16, torch.float64),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.bfloat16),
    ],
)
def test_an_explicit_state_dtype_is_kept(param_dtype, state_dtype) -> None:
    w = torch.nn.Parameter(randn((5,), dtype=param_dtype))
    opt = optiscope.Adam([w], lr=1e-2, state_dtype=state_dtype, amsgrad=True)
    w.grad = randn((5,), dtype=param_dtype)
    opt.step()
    assert {v.dtype for v in tensors_of(opt.state[w]).values()} == {state_dtype}


@pytest.mark.parametrize("name", ["momentum", "adam-l2-amsgrad"])
def test_float16_checkpoint_keeps_float32_state_bit_for_bit(name: str) -> None:
    """torch's load_state_dict casts state to the parameter's dtype, which would
    round the float32 state of a float16 parameter to float16."""
    cfg = config(name)
    w = torch.nn.Parameter(randn((7,), dtype=torch.float16))
    opt = cfg.cls([w], **cfg.options)
    for k in range(3):
        w.grad = randn((7,), dtype=torch.float16, scale=10.0**-k)
        opt.step()
    clone = cfg.cls([torch.nn.Parameter(w.detach().clone())], **cfg.options)
    clone.load_state_dict(opt.state_dict())
    (restored,) = clone.state.values()
    for key, value in tensors_of(opt.state[w]).items():
        assert restored[key].dtype == torch.float32
        assert torch.equal(restored[key], value)


@pytest.mark.parametrize("name", ["momentum", "adam"])
def test_a_checkpoint_with_float16_state_loads_into_float32_state(name) -> None:
    """A checkpoint made when float16 parameters had float16 state (or by
    torch.optim) loads exactly: float16 values are float32 values."""
    cfg = config(name)
    w = torch.nn.Parameter(randn((6,), dtype=torch.float16))
    opt = cfg.cls([w], **cfg.options)
    w.grad = randn((6,), dtype=torch.float16)
    opt.step()
    saved = opt.state_dict()
    old = {k: v.half() for k, v in tensors_of(saved["state"][0]).items()}
    saved = {**saved, "state": {0: {**saved["state"][0], **old}}}
    clone = cfg.cls([torch.nn.Parameter(w.detach().clone())], **cfg.options)
    clone.load_state_dict(saved)
    (restored,) = clone.state.values()
    for key, value in old.items():
        assert restored[key].dtype == torch.float32
        assert torch.equal(restored[key], value.float())


def two_layer_model(dtype=torch.float32) -> torch.nn.Sequential:
    torch.manual_seed(2)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).to(dtype)


def backward(model: torch.nn.Sequential) -> None:
    """Gradients in each parameter's own dtype (layers may differ in dtype)."""
    gen = torch.Generator().manual_seed(8)
    for p in model.parameters():
        p.grad = randn(p.shape, generator=gen, dtype=p.dtype)


@pytest.mark.parametrize("name", ["momentum", "adam", "adamw-amsgrad"])
@pytest.mark.parametrize("new_dtype", [torch.float64, torch.bfloat16])
def test_a_parameter_whose_dtype_changed_is_refused_naming_it(name, new_dtype):
    """model.to(dtype) after the state was made: the step is refused before
    anything changes, naming the first parameter (torch.optim raises too)."""
    cfg = config(name)
    model = two_layer_model()
    # The first layer in its own group: the refusal comes from the second
    # group, after the first group's checks passed; still nothing changes.
    opt = cfg.cls(
        [
            {
                "params": list(model[0].parameters()),
                "param_names": ["0.weight", "0.bias"],
            },
            {
                "params": list(model[1].parameters()),
                "param_names": ["1.weight", "1.bias"],
            },
        ],
        **cfg.options,
    )
    backward(model)
    opt.step()
    model[1].to(new_dtype)
    backward(model)
    params = [p.detach().clone() for p in model.parameters()]
    state = {p: {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    key = "momentum_buffer" if name == "momentum" else "exp_avg"
    message = (
        f"parameter '1.weight' is {new_dtype} but its {key} is torch.float32: the "
        "parameter's dtype changed after its state was made"
    )
    with pytest.raises(TypeError, match=re.escape(message)) as error:
        opt.step()
    assert "optimizer.load_state_dict(optimizer.state_dict())" in str(error.value)
    for p, q in zip(model.parameters(), params, strict=True):
        assert torch.equal(p, q)
    for p, s in opt.state.items():
        assert all(torch.equal(s[k], v) for k, v in state[p].items())


@pytest.mark.parametrize("name", ["momentum", "adam"])
def test_load_state_dict_migrates_state_to_the_new_dtype(name) -> None:
    """The remedy the error names: the state is cast to the new dtype (exact for
    float32 -> float64) and training continues as torch.optim would after the
    same load."""
    cfg = config(name)
    model = two_layer_model()
    opt = cfg.cls(model.parameters(), **cfg.options)
    backward(model)
    opt.step()
    before = {k: v.clone() for k, v in tensors_of(opt.state[model[0].weight]).items()}
    model.to(torch.float64)
    opt.load_state_dict(opt.state_dict())
    migrated = tensors_of(opt.state[model[0].weight])
    for key, value in before.items():
        assert migrated[key].dtype == torch.float64
        assert torch.equal(migrated[key], value.double())
    backward(model)
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", ["momentum", "adam"])
def test_float32_and_float16_convert_into_each_other_freely(name) -> None:
    """float16 parameters keep float32 state, so model.half() and model.float()
    mid-training need no migration: the state is already in the right dtype."""
    cfg = config(name)
    model = two_layer_model()
    opt = cfg.cls(model.parameters(), **cfg.options)
    for dtype in (torch.float32, torch.float16, torch.float32):
        model.to(dtype)
        backward(model)
        opt.step()
    state = opt.state[model[0].weight]
    assert {v.dtype for v in tensors_of(state).values()} == {torch.float32}
