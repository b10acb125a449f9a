"""Each bad input gets an error naming the argument, its value and the allowed range,
and a refused call modifies nothing."""

from __future__ import annotations

import copy
import re

import pytest
import torch

import optiscope
from optiscope.functional import dropout

BAD_OPTIONS = [
    (
        optiscope.Momentum,
        {"lr": -0.1},
        ValueError,
        "lr must be a finite number >= 0, got -0.1",
    ),
    (
        optiscope.Momentum,
        {"lr": float("nan")},
        ValueError,
        "lr must be a finite number >= 0",
    ),
    (
        optiscope.Momentum,
        {"lr": "0.1"},
        TypeError,
        "lr must be a real number, got '0.1'",
    ),
    (
        optiscope.Momentum,
        {"momentum": 1.0},
        ValueError,
        "momentum must be in [0, 1), got 1.0",
    ),
    (
        optiscope.Momentum,
        {"momentum": -0.5},
        ValueError,
        "momentum must be in [0, 1), got -0.5",
    ),
    (
        optiscope.Momentum,
        {"weight_decay": -1},
        ValueError,
        "weight_decay must be a finite number >= 0, got -1",
    ),
    (
        optiscope.Momentum,
        {"maximize": 1},
        TypeError,
        "maximize must be True or False, got 1",
    ),
    (
        optiscope.Adam,
        {"lr": -1e-3},
        ValueError,
        "lr must be a finite number >= 0, got -0.001",
    ),
    (
        optiscope.Adam,
        {"eps": -1e-8},
        ValueError,
        "eps must be a finite number >= 0, got -1e-08",
    ),
    (
        optiscope.Adam,
        {"betas": (1.0, 0.999)},
        ValueError,
        "betas[0] must be in [0, 1), got 1.0",
    ),
    (
        optiscope.Adam,
        {"betas": (0.9, -0.1)},
        ValueError,
        "betas[1] must be in [0, 1), got -0.1",
    ),
    (
        optiscope.Adam,
        {"betas": 0.9},
        TypeError,
        "betas must be a pair (beta1, beta2), got 0.9",
    ),
    (
        optiscope.Adam,
        {"weight_decay": -0.1},
        ValueError,
        "weight_decay must be a finite number >= 0, got -0.1",
    ),
    (
        optiscope.AdamW,
        {"weight_decay": -0.1},
        ValueError,
        "weight_decay must be a finite number >= 0, got -0.1",
    ),
    (
        optiscope.Adam,
        {"state_dtype": torch.int32},
        TypeError,
        "state_dtype must be None",
    ),
    (
        optiscope.Adam,
        {"stochastic_rounding": True, "state_dtype": torch.float32},
        ValueError,
        "stochastic_rounding=True needs bfloat16 moments (state_dtype="
        "torch.bfloat16, or bfloat16 parameters with state_dtype=None), got "
        "state dtypes torch.float32",
    ),
    (
        optiscope.AdamW,
        {
            "stochastic_rounding": True,
            "state_dtype": torch.bfloat16,
            "rounding_seed": -1,
        },
        ValueError,
        "rounding_seed must be an int in [0, 2**63) (or None to draw one) with "
        "stochastic_rounding=True, got -1",
    ),
    (
        optiscope.Adam,
        {"stochastic_rounding": "yes"},
        TypeError,
        "stochastic_rounding must be True or False, got 'yes'",
    ),
]


@pytest.mark.parametrize(("cls", "options", "error", "message"), BAD_OPTIONS)
def test_constructor_rejects(cls, options, error, message) -> None:
    with pytest.raises(error, match=re.escape(message)):
        cls([torch.nn.Parameter(torch.ones(2))], **options)


@pytest.mark.parametrize(("cls", "options", "error", "message"), BAD_OPTIONS)
def test_refused_param_group_is_not_added(cls, options, error, message) -> None:
    opt = cls([torch.nn.Parameter(torch.ones(2))])
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(error, match=re.escape(message)):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], **options})
    assert len(opt.param_groups) == 1 and opt.state_dict() == before


@pytest.mark.parametrize(("cls", "options", "error", "message"), BAD_OPTIONS)
def test_bad_option_set_after_construction_refuses_step_untouched(
    cls, options, error, message
) -> None:
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = cls([{"params": [a]}, {"params": [b]}])
    opt.param_groups[1].update(
        options
    )  # the second group is bad; the first must not move
    a.grad, b.grad = torch.ones(2), torch.ones(2)
    with pytest.raises(error, match=re.escape(message)):
        opt.step()
    assert (
        torch.equal(a, torch.ones(2))
        and torch.equal(b, torch.ones(2))
        and not opt.state
    )


@pytest.mark.parametrize("cls", [optiscope.Momentum, optiscope.Adam, optiscope.AdamW])
def test_sparse_gradient_names_the_alternative_and_moves_nothing(cls) -> None:
    dense, sparse = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = cls([dense, sparse])
    dense.grad = torch.ones(3)
    sparse.grad = torch.ones(3).to_sparse()
    with pytest.raises(
        TypeError, match=r"does not support sparse gradients; use torch\.optim"
    ):
        opt.step()
    assert torch.equal(dense, torch.ones(3)) and not opt.state


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"p": -0.1}, ValueError, "p must be a probability in [0, 1], got -0.1"),
        ({"p": 1.5}, ValueError, "p must be a probability in [0, 1], got 1.5"),
        ({"p": "half"}, TypeError, "p must be a real number, got 'half'"),
        ({"training": "yes"}, TypeError, "training must be True or False, got 'yes'"),
    ],
)
def test_dropout_rejects_bad_arguments(kwargs, error, message) -> None:
    x = torch.ones(4)
    with pytest.raises(error, match=re.escape(message)):
        dropout(x, **kwargs)
    if "p" in kwargs:
        with pytest.raises(error, match=re.escape(message)):
            optiscope.Dropout(kwargs["p"])


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.uint8])
def test_dropout_rejects_non_floating_input(dtype) -> None:
    with pytest.raises(
        TypeError, match=f"input must be a floating-point tensor, got dtype {dtype}"
    ):
        dropout(torch.ones(4, dtype=dtype), 0.5)


def test_non_floating_parameter_is_refused() -> None:
    w = torch.ones(3, dtype=torch.int64)
    w.grad = torch.ones(3, dtype=torch.int64)
    opt = optiscope.Adam([torch.nn.Parameter(torch.ones(1))])
    opt.param_groups[0]["params"].append(w)
    with pytest.raises(TypeError, match=r"got a parameter of dtype torch\.int64"):
        opt.step()
