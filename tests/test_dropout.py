"""Inverted dropout against its equations: values, expectation (CLT bounds), mask, modes."""

from __future__ import annotations

import math

import pytest
import torch
from tests_helpers import DEVICES

import optiscope
from optiscope.functional import dropout

PS = [0.1, 0.5, 0.9]


@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16]
)
@pytest.mark.parametrize("device", DEVICES)
def test_every_output_is_zero_or_scaled_input(p, dtype, device) -> None:
    h = torch.randn(10_000, dtype=dtype, device=device)
    y = dropout(h, p)
    assert y.dtype == dtype and y.device == h.device and y.shape == h.shape
    scaled = h * (1.0 / (1.0 - p))
    assert bool(((y == 0) | (y == scaled)).all())


@pytest.mark.parametrize("p", PS)
def test_mean_over_a_million_draws_is_within_4_standard_errors(p) -> None:
    """CLT: each h_drop = h·d/(1-p) has mean h and variance h²·p/(1-p), so the mean of
    n i.i.d. draws has standard error |h|·sqrt(p / ((1-p)·n)). 4 SE is a 6e-5 two-sided
    false-alarm rate per case, with the seed fixed."""
    n, h = 1_000_000, 1.7
    y = dropout(
        torch.full((n,), h, dtype=torch.float64),
        p,
        generator=torch.Generator().manual_seed(1234),
    )
    standard_error = h * math.sqrt(p / ((1 - p) * n))
    assert abs(y.mean().item() - h) <= 4 * standard_error


@pytest.mark.parametrize("p", PS)
def test_keep_rate_is_within_4_sigma_of_1_minus_p(p) -> None:
    """The kept count is Binomial(n, 1-p): sigma of the rate is sqrt(p(1-p)/n)."""
    n = 1_000_000
    y = dropout(torch.ones(n), p, generator=torch.Generator().manual_seed(99))
    keep_rate = (y != 0).double().mean().item()
    assert abs(keep_rate - (1 - p)) <= 4 * math.sqrt(p * (1 - p) / n)


def test_gradient_flows_through_the_same_mask() -> None:
    h = torch.randn(1000, dtype=torch.float64, requires_grad=True)
    y = dropout(h, 0.3)
    y.backward(torch.ones_like(y))
    kept = y != 0
    assert torch.equal(h.grad, kept.double() / 0.7)


def test_evaluation_is_identity_and_draws_no_random_numbers() -> None:
    h = torch.randn(100)
    generator = torch.Generator().manual_seed(5)
    state, global_state = generator.get_state(), torch.get_rng_state()
    layer = optiscope.Dropout(0.5, generator=generator).eval()
    assert torch.equal(layer(h), h) and torch.equal(dropout(h, 0.5, training=False), h)
    assert torch.equal(generator.get_state(), state)
    assert torch.equal(torch.get_rng_state(), global_state)


def test_module_honours_train_and_eval() -> None:
    layer = optiscope.Dropout(0.5)
    h = torch.ones(1000)
    assert (layer(h) == 0).any()
    layer.eval()
    assert torch.equal(layer(h), h)
    layer.train()
    assert (layer(h) == 0).any()
    assert repr(layer) == "Dropout(p=0.5)"


def test_p_zero_is_identity_without_randomness() -> None:
    h = torch.randn(100)
    state = torch.get_rng_state()
    assert torch.equal(dropout(h, 0.0), h)
    assert torch.equal(torch.get_rng_state(), state)


def test_p_one_is_all_zeros_without_division_by_zero() -> None:
    h = torch.tensor([1.0, -2.0, float("inf"), float("nan")], requires_grad=True)
    y = dropout(h, 1.0)
    assert torch.equal(y, torch.zeros(4))
    y.sum().backward()
    assert torch.equal(h.grad, torch.zeros(4))


def test_generator_makes_the_mask_reproducible() -> None:
    h = torch.randn(1000)
    a = dropout(h, 0.5, generator=torch.Generator().manual_seed(7))
    b = dropout(h, 0.5, generator=torch.Generator().manual_seed(7))
    c = dropout(h, 0.5, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (4, 5)])
def test_shapes_including_empty_and_scalar(shape) -> None:
    h = torch.randn(shape)
    assert dropout(h, 0.5).shape == h.shape


def test_non_contiguous_input() -> None:
    h = torch.randn(64, 32).t()
    y = dropout(h, 0.5)
    assert y.shape == h.shape
    assert bool(((y == 0) | (y == h * 2.0)).all())
