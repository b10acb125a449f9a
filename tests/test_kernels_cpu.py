"""The fused CPU kernels against the per-tensor torch rules, and their exactness."""

from __future__ import annotations

import warnings

import pytest
import torch
from configs import CONFIGS, Config, adam_options, momentum_options

import optiscope
from optiscope import kernels
from optiscope.adam import adam_step
from optiscope.momentum import momentum_step

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# 0-dim, vector, non-contiguous (transposed), empty, and one over a chunk.
SHAPES = [(), (7,), (6, 5), (0,), (3, 0), (70_001,)]


def make_tensors(dtype: torch.dtype, state_dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)

    def randn(shape, dtype, scale=1.0):
        t = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
        return t.to(dtype)

    params = [randn(s, dtype) for s in SHAPES]
    params[2] = params[2].t()  # non-contiguous
    grads = [randn(p.shape, dtype) for p in params]
    m = [randn(p.shape, state_dtype, 0.1) for p in params]
    v = [randn(p.shape, state_dtype, 0.1).abs() for p in params]
    vmax = [x * 1.5 for x in v]
    return params, grads, m, v, vmax


def fused_and_per_tensor(config: Config, dtype, state_dtype, steps: int = 3):
    """Run the kernels and the per-tensor rules from the same start; return both."""
    results = []
    for fused in (True, False):
        params, grads, m, v, vmax = make_tensors(dtype, state_dtype)
        for t in range(1, steps + 1):
            if config.cls is optiscope.Momentum:
                if fused:
                    kernels.momentum_(params, grads, m, **momentum_options(config))
                for p, g, b in zip(params, grads, m, strict=True):
                    if not fused:
                        momentum_step(p, g, b, **momentum_options(config))
                continue
            options = adam_options(config)
            vmax_or_none = vmax if options["amsgrad"] else None
            if fused:
                kernels.adam_(
                    params, grads, m, v, vmax_or_none, [t] * len(params), **options
                )
                continue
            for i in range(len(params)):
                vmax_i = vmax[i] if options["amsgrad"] else None
                adam_step(params[i], grads[i], m[i], v[i], vmax_i, step=t, **options)
        results.append((params, m, v))
    return results


def assert_close_to_the_dtype(actual, expected, dtype) -> None:
    """Within 2 ulp of the stored dtype, relative to the tensor's scale: the two
    paths round the same float32/64 arithmetic in a different order."""
    for a, e in zip(actual, expected, strict=True):
        assert a.dtype == e.dtype and a.shape == e.shape and a.stride() == e.stride()
        if e.numel() == 0:
            continue
        scale = e.double().abs().max().clamp_min(1e-30)
        error = (a.double() - e.double()).abs().max() / scale
        assert error <= 2 * torch.finfo(dtype).eps


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernels_match_the_per_tensor_rules(config: Config, dtype) -> None:
    (p1, m1, v1), (p2, m2, v2) = fused_and_per_tensor(config, dtype, dtype)
    assert_close_to_the_dtype(p1, p2, dtype)
    assert_close_to_the_dtype(m1, m2, dtype)
    assert_close_to_the_dtype(v1, v2, dtype)


@pytest.mark.parametrize(
    "config", [c for c in CONFIGS if c.cls is not optiscope.Momentum], ids=str
)
@pytest.mark.parametrize(
    ("dtype", "state_dtype"),
    [
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.float16, torch.float32),
    ],
    ids=str,
)
def test_state_dtype_matches_the_per_tensor_rule(config, dtype, state_dtype) -> None:
    (p1, m1, v1), (p2, m2, _) = fused_and_per_tensor(config, dtype, state_dtype)
    # A state rounded one ulp apart moves the parameter by lr * that ulp.
    coarser = max(dtype, state_dtype, key=lambda d: torch.finfo(d).eps)
    assert_close_to_the_dtype(p1, p2, coarser)
    assert_close_to_the_dtype(m1, m2, state_dtype)
    assert all(x.dtype == state_dtype for x in m1 + v1)


def test_mixed_dtype_lists_take_one_call() -> None:
    params = [torch.randn(5, dtype=d) for d in DTYPES]
    grads = [torch.randn_like(p) for p in params]
    buffers = [torch.zeros_like(p) for p in params]
    expected = [p.clone() for p in params]
    expected_buffers = [b.clone() for b in buffers]
    options = dict(lr=0.1, momentum=0.9, weight_decay=0.0, maximize=False)
    kernels.momentum_(params, grads, buffers, **options)
    for p, g, b in zip(expected, grads, expected_buffers, strict=True):
        momentum_step(p, g, b, **options)
    for a, e in zip(params, expected, strict=True):
        assert_close_to_the_dtype([a], [e], e.dtype)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_bitwise_identical_across_runs_and_thread_counts(config: Config) -> None:
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 2):
            torch.set_num_threads(threads)
            (params, m, v), _ = fused_and_per_tensor(
                config, torch.float32, torch.float32
            )
            runs.append(params + m + v)
    finally:
        torch.set_num_threads(before)
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], run, strict=True))


def test_float16_zero_gradient_stays_finite_where_torch_for_loop_makes_nan() -> None:
    """eps=1e-8 underflows to 0 in float16, so torch's for-loop Adam divides 0 by 0."""
    ours = torch.nn.Parameter(torch.tensor([0.5, -0.25], dtype=torch.float16))
    theirs = torch.nn.Parameter(ours.detach().clone())
    opt_ours = optiscope.Adam([ours], lr=1e-3)
    opt_theirs = torch.optim.Adam([theirs], lr=1e-3, foreach=False)
    for _ in range(3):
        for w, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            w.grad = torch.tensor([0.0, 1.0], dtype=torch.float16)
            opt.step()
    assert torch.isnan(theirs[0])
    assert ours[0].item() == 0.5 and torch.isfinite(ours).all()


def test_unsupported_device_falls_back_with_one_warning(monkeypatch) -> None:
    monkeypatch.setattr(kernels, "_warned", set())
    params = [torch.ones(3, device="meta")]
    args = (params, [torch.ones(3, device="meta")], [torch.zeros(3, device="meta")])
    options = dict(lr=0.1, momentum=0.9, weight_decay=0.0, maximize=False)
    with pytest.warns(
        RuntimeWarning, match="no fused kernel for torch.float32 on meta"
    ):
        kernels.momentum_(*args, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernels.momentum_(*args, **options)  # second call: silent
