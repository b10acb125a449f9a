"""The dispatcher's one contiguity rule and its routing, the same for every
backend: dense rows in any common memory order are updated in place, other
rows through contiguous copies written back; each device goes to its backend."""

from __future__ import annotations

import warnings

import pytest
import torch
from configs import DTYPES, config, randn

import optiscope
from optiscope.kernels import dispatch, torch_rule

CASES = [config("adam-l2-amsgrad"), config("momentum-l2-max")]


def steps(cfg, param: torch.Tensor, grads: list[torch.Tensor]) -> torch.Tensor:
    opt = cfg.cls([param], **cfg.options)
    for g in grads:
        param.grad = g
        opt.step()
    return opt


def grads_like(shape, count=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [randn(shape, generator=gen) for _ in range(count)]


@pytest.mark.parametrize("cfg", CASES, ids=str)
def test_channels_last_rows_are_updated_in_place_like_contiguous_ones(cfg) -> None:
    gen = torch.Generator().manual_seed(1)
    data = randn((2, 3, 4, 5), generator=gen)
    grads = grads_like(data.shape)
    plain = torch.nn.Parameter(data.clone())
    steps(cfg, plain, grads)
    nhwc = torch.nn.Parameter(data.clone().to(memory_format=torch.channels_last))
    address = nhwc.data_ptr()
    opt = steps(cfg, nhwc, [g.to(memory_format=torch.channels_last) for g in grads])
    assert nhwc.data_ptr() == address and nhwc.is_contiguous(
        memory_format=torch.channels_last
    )
    for value in opt.state[nhwc].values():
        if value.dim() == 4:  # states keep the parameter's memory order
            assert value.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(nhwc, plain)


@pytest.mark.parametrize("cfg", CASES, ids=str)
def test_strided_views_are_copied_and_written_back(cfg) -> None:
    """A parameter that is every other column of a larger tensor (not dense)."""
    gen = torch.Generator().manual_seed(2)
    base = randn((6, 8), generator=gen)
    grads = grads_like((6, 4))
    plain = torch.nn.Parameter(base[:, ::2].clone())
    steps(cfg, plain, grads)
    holder = base.clone()
    view = holder[:, ::2]
    assert not view.is_contiguous()
    steps(cfg, view, grads)
    assert torch.equal(view, plain)
    assert torch.equal(holder[:, 1::2], base[:, 1::2])  # the gaps are untouched


def test_rows_of_different_dtypes_in_one_group() -> None:
    params = [torch.nn.Parameter(torch.linspace(-1, 1, 9, dtype=d)) for d in DTYPES]
    opt = optiscope.Adam(params, lr=0.1)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    for p in params:
        expected = torch.linspace(-1, 1, 9, dtype=torch.float64) - 0.1
        torch.testing.assert_close(p.double(), expected, rtol=0, atol=1e-2)


def test_a_device_without_kernels_takes_the_per_tensor_rule_with_one_warning(
    monkeypatch,
) -> None:
    monkeypatch.setattr(dispatch, "_warned", set())
    meta = torch.ones(4, device="meta")
    with pytest.warns(
        RuntimeWarning, match="no fused kernel for torch.float32 on meta"
    ):
        assert dispatch._backend(meta) is torch_rule
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch._backend(meta) is torch_rule  # once per device and dtype


def test_meta_parameters_step_through_the_fake_implementation() -> None:
    """Meta tensors hold no values: torch runs the operator's fake implementation."""
    p = torch.nn.Parameter(torch.ones(4, device="meta"))
    p.grad = torch.ones(4, device="meta")
    opt = optiscope.Adam([p])
    opt.step()
    assert opt.state[p]["exp_avg"].device.type == "meta"


def test_the_rule_backend_takes_the_same_steps_as_the_kernels(monkeypatch) -> None:
    cfg = config("adam")
    data = randn((5, 7), generator=torch.Generator().manual_seed(3))
    grads = grads_like(data.shape)
    kernel = torch.nn.Parameter(data.clone())
    steps(cfg, kernel, grads)
    monkeypatch.setattr(dispatch, "_backend", lambda t: torch_rule)
    rule = torch.nn.Parameter(data.clone())
    steps(cfg, rule, grads)
    torch.testing.assert_close(kernel, rule, rtol=2e-7, atol=1e-7)


def test_an_eager_step_bumps_versions_without_the_dispatcher() -> None:
    """Plain eager steps skip torch's dispatcher, but mark what they write as
    modified, as the operator's ADInplaceOrView kernel does: autograd then
    refuses a tensor saved before the step."""
    p = torch.nn.Parameter(torch.randn(8))
    p.grad = torch.randn(8)
    opt = optiscope.Adam([p], lr=0.1)
    opt.step()
    state = opt.state[p]
    before = [t._version for t in (p, state["exp_avg"], state["exp_avg_sq"])]
    step_before = state["step"]._version
    grad_before = p.grad._version
    opt.step()
    after = [t._version for t in (p, state["exp_avg"], state["exp_avg_sq"])]
    assert all(b > a for a, b in zip(before, after, strict=True))
    assert state["step"]._version > step_before and p.grad._version == grad_before


def test_a_dispatch_mode_sees_the_step_as_one_operator() -> None:
    """Where a TorchDispatchMode is active, the step goes through torch's
    dispatcher, so the mode sees ``optiscope.momentum_`` (and nothing bypasses it)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    p = torch.nn.Parameter(torch.randn(8))
    p.grad = torch.randn(8)
    opt = optiscope.Momentum([p], lr=0.1)
    opt.step()
    with Seen() as seen:
        opt.step()
    assert "optiscope.momentum_.default" in seen.ops
