"""Checkpoints across conventions: a ``torch.optim.SGD`` state_dict loads into
``Momentum`` converted (m = (1−β)·b, lr/(1−β)) with a warning, or is refused
where no Momentum matches; ``Momentum.sgd_state_dict()`` goes the other way;
``torch.optim.Adam``/``AdamW`` state_dicts load as they are."""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
from configs import Config, config, randn

import optiscope
from optiscope.momentum import SGDConventionWarning

MAPPING = "Momentum(lr=a, momentum=b) == SGD(lr=a*(1-b), momentum=b, dampening=0)"


def grads(count: int, seed: int = 1) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        [randn((4, 3), generator=gen, dtype=torch.float64) for _ in range(2)]
        for _ in range(count)
    ]


def params() -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [
        torch.nn.Parameter(randn((4, 3), generator=gen, dtype=torch.float64))
        for _ in range(2)
    ]


def run(opt: torch.optim.Optimizer, ps, gs) -> None:
    for step in gs:
        for p, g in zip(ps, step, strict=True):
            p.grad = g.clone()
        opt.step()


def twin(ps) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(p.detach().clone()) for p in ps]


def assert_same_dict(a, b) -> None:
    """Equal state_dicts, tensors compared bit for bit."""
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for key, entry in a["state"].items():
        assert entry.keys() == b["state"][key].keys()
        for name, value in entry.items():
            assert torch.equal(value, b["state"][key][name]), name


@pytest.mark.parametrize("name", ["momentum", "momentum-l2-max"])
def test_an_sgd_state_dict_is_converted_and_continues_its_trajectory(name) -> None:
    cfg = config(name)
    sgd_cls, sgd_options = cfg.torch_equivalent
    beta = cfg.options["momentum"]
    ps = params()
    sgd = sgd_cls(ps, **sgd_options)
    steps = grads(12)
    run(sgd, ps, steps[:6])
    saved = sgd.state_dict()
    untouched = copy.deepcopy(saved)
    ours = twin(ps)
    # Another lr and momentum: the loaded groups replace them, as in torch.
    opt = optiscope.Momentum(ours, lr=7.0, momentum=0.3)
    expected = (
        f"group 0: momentum={beta:g}, lr {sgd_options['lr']:.6g} -> "
        f"{sgd_options['lr'] / (1 - beta):.6g}"
    )
    with pytest.warns(SGDConventionWarning, match=re.escape(expected)) as caught:
        opt.load_state_dict(saved)
    assert "multiplied by (1-momentum)" in str(caught[0].message)
    assert MAPPING in str(caught[0].message)
    assert_same_dict(saved, untouched)  # the caller's dict is not modified
    group = opt.param_groups[0]
    assert group["lr"] == pytest.approx(cfg.options["lr"], rel=1e-15)
    assert group["momentum"] == beta
    assert not {"dampening", "nesterov", "foreach", "fused"} & set(group)
    for p, q in zip(ps, ours, strict=True):
        torch.testing.assert_close(
            opt.state[q]["momentum_buffer"],
            sgd.state[p]["momentum_buffer"] * (1 - beta),
            rtol=1e-15,
            atol=0,
        )
    run(sgd, ps, steps[6:])
    run(opt, ours, steps[6:])
    for p, q in zip(ps, ours, strict=True):
        torch.testing.assert_close(q, p, rtol=1e-13, atol=1e-15)


def test_without_conversion_the_steps_would_differ() -> None:
    """The test above can fail: SGD's buffer read as Momentum's (the old silent
    load) takes steps 1/(1−β) = 10 times too large."""
    cfg = config("momentum")
    sgd_cls, sgd_options = cfg.torch_equivalent
    ps = params()
    sgd = sgd_cls(ps, **sgd_options)
    steps = grads(8)
    run(sgd, ps, steps[:4])
    ours = twin(ps)
    opt = optiscope.Momentum(ours, **cfg.options)
    for p, q in zip(ps, ours, strict=True):
        opt.state[q]["momentum_buffer"] = sgd.state[p]["momentum_buffer"].clone()
    run(sgd, ps, steps[4:])
    run(opt, ours, steps[4:])
    worst = max((p - q).abs().max().item() for p, q in zip(ps, ours, strict=True))
    assert worst > 1e-2


def test_a_converted_state_dict_round_trips_without_a_second_conversion() -> None:
    cfg = config("momentum")
    sgd_cls, sgd_options = cfg.torch_equivalent
    ps = params()
    sgd = sgd_cls(ps, **sgd_options)
    run(sgd, ps, grads(3))
    opt = optiscope.Momentum(twin(ps))
    with pytest.warns(SGDConventionWarning):
        opt.load_state_dict(sgd.state_dict())
    saved = copy.deepcopy(opt.state_dict())
    again = optiscope.Momentum(twin(ps))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again.load_state_dict(saved)
    assert_same_dict(again.state_dict(), saved)


def test_sgd_without_momentum_loads_silently_and_continues() -> None:
    """momentum=0: SGD keeps no buffer and the same lr means the same steps."""
    cfg = config("sgd")
    sgd_cls, sgd_options = cfg.torch_equivalent
    ps = params()
    sgd = sgd_cls(ps, **sgd_options)
    steps = grads(6)
    run(sgd, ps, steps[:3])
    ours = twin(ps)
    opt = optiscope.Momentum(ours, lr=1.0, momentum=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.load_state_dict(sgd.state_dict())
    assert opt.param_groups[0]["lr"] == sgd_options["lr"]
    assert opt.param_groups[0]["momentum"] == 0
    run(sgd, ps, steps[3:])
    run(opt, ours, steps[3:])
    for p, q in zip(ps, ours, strict=True):
        torch.testing.assert_close(q, p, rtol=1e-15, atol=0)


def test_a_scheduler_initial_lr_is_converted_too() -> None:
    ps = params()
    sgd = torch.optim.SGD(ps, lr=0.01, momentum=0.8)
    torch.optim.lr_scheduler.StepLR(sgd, step_size=2)
    run(sgd, ps, grads(1))
    opt = optiscope.Momentum(twin(ps))
    with pytest.warns(SGDConventionWarning):
        opt.load_state_dict(sgd.state_dict())
    assert opt.param_groups[0]["initial_lr"] == pytest.approx(0.05, rel=1e-15)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05, rel=1e-15)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"nesterov": True}, "group 1 has nesterov=True"),
        ({"dampening": 0.5}, "group 1 has dampening=0.5"),
        ({"momentum": 1.5}, "momentum of group 1 of the SGD state_dict must be in"),
    ],
)
def test_an_sgd_state_dict_without_equivalent_is_refused(change, words) -> None:
    ps = params()
    sgd = torch.optim.SGD(
        [{"params": ps[:1]}, {"params": ps[1:]}], lr=0.01, momentum=0.9
    )
    run(sgd, ps, grads(2))
    saved = sgd.state_dict()
    saved["param_groups"][1].update(change)
    ours = twin(ps)
    opt = optiscope.Momentum([{"params": ours[:1]}, {"params": ours[1:]}])
    run(opt, ours, grads(1, seed=3))
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=re.escape(words)) as error:
        opt.load_state_dict(saved)
    if "momentum" not in change:
        assert MAPPING in str(error.value)
    assert_same_dict(opt.state_dict(), before)


@pytest.mark.parametrize("name", ["momentum", "momentum-l2-max", "sgd"])
def test_sgd_state_dict_continues_in_torch_sgd(name) -> None:
    """The other direction: Momentum.sgd_state_dict() loaded into torch.optim.SGD
    continues Momentum's trajectory; the optimizer itself is unchanged."""
    cfg = config(name)
    ps = params()
    opt = optiscope.Momentum(ps, **cfg.options)
    steps = grads(10)
    run(opt, ps, steps[:5])
    before = copy.deepcopy(opt.state_dict())
    exported = opt.sgd_state_dict()
    assert_same_dict(opt.state_dict(), before)
    theirs = twin(ps)
    sgd = torch.optim.SGD(theirs, lr=1.0)
    sgd.load_state_dict(exported)
    _, sgd_options = cfg.torch_equivalent
    for key, value in sgd_options.items():
        if isinstance(value, float):
            value = pytest.approx(value, rel=1e-15)
        assert sgd.param_groups[0][key] == value, key
    run(opt, ps, steps[5:])
    run(sgd, theirs, steps[5:])
    for p, q in zip(ps, theirs, strict=True):
        torch.testing.assert_close(q, p, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("name", ["adam", "adam-l2-amsgrad", "adamw-amsgrad"])
def test_a_torch_adam_state_dict_loads_as_it_is(name) -> None:
    cfg = config(name)
    torch_cls, torch_options = cfg.torch_equivalent
    ps = params()
    theirs = torch_cls(ps, **torch_options)
    steps = grads(8)
    run(theirs, ps, steps[:4])
    saved = theirs.state_dict()
    ours_ps = twin(ps)
    ours = cfg.cls(ours_ps, lr=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # A copy: torch's load keeps tensors of the right dtype as they are, and
        # both optimizers go on stepping.
        ours.load_state_dict(copy.deepcopy(saved))
    for p, q in zip(ps, ours_ps, strict=True):
        for key, value in theirs.state[p].items():
            assert ours.state[q][key].dtype == value.dtype
            assert torch.equal(ours.state[q][key], value), key
    assert ours.param_groups[0]["lr"] == torch_options["lr"]
    run(theirs, ps, steps[4:])
    run(ours, ours_ps, steps[4:])
    for p, q in zip(ps, ours_ps, strict=True):
        torch.testing.assert_close(q, p, rtol=1e-13, atol=1e-15)


def test_conversion_sees_only_sgd_param_groups() -> None:
    """A Momentum state_dict has neither dampening nor nesterov: no conversion."""
    cfg: Config = config("momentum")
    ps = params()
    opt = optiscope.Momentum(ps, **cfg.options)
    run(opt, ps, grads(2))
    saved = copy.deepcopy(opt.state_dict())
    again = optiscope.Momentum(twin(ps))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again.load_state_dict(saved)
    assert_same_dict(again.state_dict(), saved)
