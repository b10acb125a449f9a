"""What trains with optiscope besides a plain loop, each against torch.optim in
the same setup: learning-rate schedulers (OneCycleLR cycling ``betas`` and
``momentum`` too), SWA and EMA, CPU autocast, GradScaler, a torch.compile'd
training step, and torch.func workflows. The README's compatibility table
quotes these tests; the distributed rows are in ``test_distributed.py``, the
third-party ones in ``tests/integration/``.

Parity is ``max |θ − θ_ref|`` over every parameter element (``max_abs``) and
that over ``max |θ_ref|`` (``max_rel``); each test records both with
``record_property`` (``pytest --junitxml`` shows them). Momentum is compared
with ``SGD(lr=α(1−β), momentum=β, dampening=0)``, which takes the same steps
while β is constant; where a scheduler changes β there is no SGD equivalent,
and the reference is :func:`optiscope.reference.momentum_step` in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from configs import config
from torch import nn
from torch.optim import lr_scheduler as sched

import optiscope
from optiscope import reference

STEPS = 30
#: float32 parity with torch.optim after STEPS steps (measured: 1e-8 to 1e-7).
TOLERANCE = 1e-6

ADAM, ADAMW, MOMENTUM = config("adam"), config("adamw"), config("momentum")
PAIRS = [ADAM, ADAMW, MOMENTUM]


def _model(seed: int = 0, *, batchnorm: bool = False) -> nn.Sequential:
    torch.manual_seed(seed)  # the layers' initial weights
    if batchnorm:
        # No bias before BatchNorm: its gradient is zero up to rounding, and
        # Adam's g/(√v+ε) turns that noise into lr-sized steps of any sign, so
        # two optimizers 1e-8 apart would part by 1e-2 there.
        first = [nn.Linear(6, 8, bias=False), nn.BatchNorm1d(8)]
    else:
        first = [nn.Linear(6, 8)]
    return nn.Sequential(*first, nn.Tanh(), nn.Linear(8, 2))


def _batches(count: int = STEPS, seed: int = 1) -> list[tuple[torch.Tensor, ...]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 6, generator=gen), torch.randn(16, 2, generator=gen))
        for _ in range(count)
    ]


def _both(cfg) -> tuple[Callable, Callable]:
    """Factories for the optiscope optimizer of ``cfg`` and its torch equivalent."""
    torch_cls, torch_options = cfg.torch_equivalent
    return (
        lambda params: cfg.cls(params, **cfg.options),
        lambda params: torch_cls(params, **torch_options),
    )


def _parity(ours, ref, record_property=None) -> dict:
    ours, ref = [t.detach() for t in ours], [t.detach() for t in ref]
    diff = max((a - b).abs().max().item() for a, b in zip(ours, ref, strict=True))
    scale = max(b.abs().max().item() for b in ref)
    out = {"max_abs": diff, "max_rel": diff / scale}
    if record_property is not None:
        for key, value in out.items():
            record_property(key, value)
    return out


def _train(model, opt, batches, after_step: Callable | None = None) -> None:
    for x, y in batches:
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        if after_step is not None:
            after_step(loss.item())


# -- schedulers ----------------------------------------------------------------------
def _step_lr(opt):
    return sched.StepLR(opt, step_size=7, gamma=0.5)


def _cosine_restarts(opt):
    return sched.CosineAnnealingWarmRestarts(opt, T_0=8)


def _lambda(opt):
    return sched.LambdaLR(opt, lambda step: 1 / (1 + 0.3 * step))


def _warmup_then_cosine(opt):
    warmup = sched.LinearLR(opt, start_factor=0.1, total_iters=5)
    cosine = sched.CosineAnnealingLR(opt, T_max=STEPS - 5)
    return sched.SequentialLR(opt, [warmup, cosine], milestones=[5])


def _chained(opt):
    return sched.ChainedScheduler(
        [sched.ExponentialLR(opt, 0.95), sched.MultiStepLR(opt, [10, 20], 0.5)]
    )


def _plateau(opt):
    return sched.ReduceLROnPlateau(opt, factor=0.5, patience=1, threshold=0.5)


# Each scales the learning rate by a factor of the step, so the SGD mapping's
# α(1−β) stays exact under it.
MULTIPLICATIVE = [
    _step_lr,
    _cosine_restarts,
    _lambda,
    _warmup_then_cosine,
    _chained,
    _plateau,
]


def _scheduled(make_opt, make_sched, max_lr: float | None = None):
    model = _model()
    opt = make_opt(model.parameters())
    scheduler = make_sched(opt) if max_lr is None else make_sched(opt, max_lr)
    plateau = isinstance(scheduler, sched.ReduceLROnPlateau)
    lrs = []

    def after(loss: float) -> None:
        lrs.append(opt.param_groups[0]["lr"])
        scheduler.step(loss) if plateau else scheduler.step()

    _train(model, opt, _batches(), after)
    return list(model.parameters()), lrs


@pytest.mark.parametrize("make_sched", MULTIPLICATIVE, ids=lambda f: f.__name__[1:])
@pytest.mark.parametrize("cfg", PAIRS, ids=str)
def test_lr_schedulers_match_torch_optim(cfg, make_sched, record_property) -> None:
    ours, ref = _both(cfg)
    ours_params, ours_lrs = _scheduled(ours, make_sched)
    ref_params, ref_lrs = _scheduled(ref, make_sched)
    scale = ours_lrs[0] / ref_lrs[0]  # 1/(1−β) for the SGD mapping, else 1
    assert len(set(ours_lrs)) > 1, "the scheduler never changed lr"
    assert ours_lrs == pytest.approx([lr * scale for lr in ref_lrs], rel=1e-12)
    parity = _parity(ours_params, ref_params, record_property)
    assert parity["max_abs"] <= TOLERANCE, parity


def _one_cycle(opt, max_lr):
    return sched.OneCycleLR(opt, max_lr=max_lr, total_steps=STEPS)


def _cyclic(opt, max_lr):
    return sched.CyclicLR(opt, base_lr=max_lr / 10, max_lr=max_lr, step_size_up=5)


@pytest.mark.parametrize(
    "make_sched", [_one_cycle, _cyclic], ids=["onecycle", "cyclic"]
)
@pytest.mark.parametrize("cfg", [ADAM, ADAMW], ids=str)
def test_cycled_betas_match_torch_optim(cfg, make_sched, record_property) -> None:
    """OneCycleLR and CyclicLR cycle β1 through the group's ``betas``."""
    ours, ref = _both(cfg)
    betas = []

    def recording(opt, max_lr):
        scheduler = make_sched(opt, max_lr)
        step = scheduler.step

        def step_and_record():
            betas.append(opt.param_groups[0]["betas"][0])
            step()

        scheduler.step = step_and_record  # type: ignore[method-assign]
        return scheduler

    ours_params, _ = _scheduled(ours, recording, max_lr=1e-2)
    ref_params, _ = _scheduled(ref, make_sched, max_lr=1e-2)
    assert max(betas) - min(betas) >= 0.09, "β1 was not cycled"
    parity = _parity(ours_params, ref_params, record_property)
    assert parity["max_abs"] <= TOLERANCE, parity


def test_one_cycle_momentum_matches_the_reference_rule(record_property) -> None:
    """OneCycleLR cycles Momentum's β (0.95 → 0.85 → 0.95). SGD has no
    equivalent once β moves, so the reference is the float64 NumPy rule with
    each step's α and β, on a float64 model fed the same gradients."""
    model = _model().double()
    ref_model = _model().double()
    opt = optiscope.Momentum(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = sched.OneCycleLR(opt, max_lr=0.5, total_steps=STEPS)
    buffers = [torch.zeros_like(p).numpy() for p in ref_model.parameters()]
    used = []
    for x, y in _batches():
        x, y = x.double(), y.double()
        group = opt.param_groups[0]
        lr, beta = group["lr"], group["momentum"]
        used.append(beta)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
        ref_model.zero_grad()
        F.mse_loss(ref_model(x), y).backward()
        with torch.no_grad():
            for p, m in zip(ref_model.parameters(), buffers, strict=True):
                theta, m[...] = reference.momentum_step(
                    p.detach().numpy(), m, p.grad.numpy(), lr=lr, momentum=beta
                )
                p.copy_(torch.from_numpy(theta))
        scheduler.step()
    assert max(used) - min(used) >= 0.09, "β was not cycled"
    parity = _parity(list(model.parameters()), list(ref_model.parameters()))
    record_property("max_abs", parity["max_abs"])
    record_property("max_rel", parity["max_rel"])
    assert parity["max_abs"] <= 1e-13, parity


# -- SWA and EMA ---------------------------------------------------------------------
def _swa(make_opt, swa_lr: float, ema: bool):
    from torch.optim.swa_utils import (
        SWALR,
        AveragedModel,
        get_ema_multi_avg_fn,
        update_bn,
    )

    model = _model(batchnorm=True)
    opt = make_opt(model.parameters())
    averaged = (
        AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
        if ema
        else AveragedModel(model)
    )
    swa_sched = SWALR(opt, swa_lr=swa_lr, anneal_epochs=5)
    batches = _batches()
    for step, (x, y) in enumerate(batches):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
        if step >= 10:  # SWA phase: average and anneal to swa_lr
            averaged.update_parameters(model)
            swa_sched.step()
    update_bn([x for x, _ in batches], averaged)
    return [*averaged.parameters(), *averaged.buffers()]


@pytest.mark.parametrize("ema", [False, True], ids=["swa", "ema"])
@pytest.mark.parametrize("cfg", [ADAM, MOMENTUM], ids=str)
def test_swa_and_ema_match_torch_optim(cfg, ema, record_property) -> None:
    ours, ref = _both(cfg)
    # SWALR sets lr outright, so the SGD mapping needs swa_lr·(1−β) too.
    ratio = cfg.torch_equivalent[1]["lr"] / cfg.options["lr"]
    swa_lr = 5e-3
    parity = _parity(
        _swa(ours, swa_lr, ema), _swa(ref, swa_lr * ratio, ema), record_property
    )
    assert parity["max_abs"] <= TOLERANCE, parity


# -- AMP -------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", PAIRS, ids=str)
def test_cpu_autocast_bfloat16_matches_torch_optim(cfg, record_property) -> None:
    """Forward in bfloat16 under autocast, float32 weights, gradients and state."""

    def run(make_opt):
        model = _model()
        opt = make_opt(model.parameters())
        for x, y in _batches():
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
            assert out.dtype == torch.bfloat16
            F.mse_loss(out.float(), y).backward()
            opt.step()
        return list(model.parameters())

    ours, ref = _both(cfg)
    parity = _parity(run(ours), run(ref), record_property)
    assert parity["max_abs"] <= TOLERANCE, parity


SKIPPED = {4, 11}  # steps whose loss is made infinite


@pytest.mark.parametrize("cfg", PAIRS, ids=str)
def test_grad_scaler_skips_inf_steps_like_torch_optim(cfg, record_property) -> None:
    """GradScaler with unscale_ and gradient clipping: an infinite gradient
    skips the step (no state or counter moves) and halves the scale."""

    def run(make_opt):
        model = _model()
        opt = make_opt(model.parameters())
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=5)
        scales = []
        for step, (x, y) in enumerate(_batches()):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.mse_loss(model(x).float(), y)
            if step in SKIPPED:
                loss = loss * math.inf
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
            scales.append(scaler.get_scale())
        return model, opt, scales

    ours, ref = _both(cfg)
    model, opt, scales = run(ours)
    ref_model, _, ref_scales = run(ref)
    assert scales == ref_scales
    assert scales[min(SKIPPED)] == scales[min(SKIPPED) - 1] / 2
    if cfg.cls is not optiscope.Momentum:
        steps = {int(opt.state[p]["step"]) for p in model.parameters()}
        assert steps == {STEPS - len(SKIPPED)}
    parity = _parity(
        list(model.parameters()), list(ref_model.parameters()), record_property
    )
    assert parity["max_abs"] <= TOLERANCE, parity


# -- torch.compile ---------------------------------------------------------------------
# Inductor's own import of torch.jit warns; that is torch's, not ours.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")
# Dynamo reads the loss's .grad when it resumes after backward() and hides the
# warning that gives by swapping warnings.showwarning, which an "error" filter
# never reaches; torch.optim's step hits the same.
@pytest.mark.filterwarnings(
    "ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning"
)
@pytest.mark.parametrize(
    "cfg, backend",
    # inductor once: its compile costs ~10 s on 2 cores (and test_compile.py
    # already holds inductor's compiled step to eager bitwise).
    [(ADAM, "aot_eager"), (MOMENTUM, "aot_eager"), (ADAM, "inductor")],
    ids=["adam-aot_eager", "momentum-aot_eager", "adam-inductor"],
)
def test_compiled_training_step_matches_eager_torch_optim(
    cfg, backend, record_property
) -> None:
    """torch.compile of a whole step: zero_grad, forward, backward and the
    optimizer step. Steps 1 and 2 compile 7 frames in all (step 1 creates the
    state); from step 3 on nothing recompiles, and a step runs 2 graphs
    (backward() breaks the graph, as with torch.optim)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    ours, ref = _both(cfg)
    model, ref_model = _model(), _model()
    opt, ref_opt = ours(model.parameters()), ref(ref_model.parameters())

    def train_step(x, y):
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return loss

    compiled = torch.compile(train_step, backend=counter)
    frames = []
    for x, y in _batches():
        compiled(x, y)
        frames.append(counter.frame_count)
    _train(ref_model, ref_opt, _batches())
    assert frames[-1] == frames[2], f"recompiled after step 3: {frames}"
    record_property("frames", frames[-1])
    parity = _parity(
        list(model.parameters()), list(ref_model.parameters()), record_property
    )
    assert parity["max_abs"] <= TOLERANCE, parity


# -- torch.func ------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", PAIRS, ids=str)
def test_gradients_from_torch_func_grad_match_torch_optim(cfg, record_property) -> None:
    """Gradients from torch.func.grad over functional_call, set as ``.grad``."""
    from torch.func import functional_call, grad

    def run(make_opt):
        model = _model()
        params = dict(model.named_parameters())
        opt = make_opt(params.values())

        def loss_fn(values, x, y):
            return F.mse_loss(functional_call(model, values, (x,)), y)

        for x, y in _batches():
            for name, g in grad(loss_fn)(params, x, y).items():
                params[name].grad = g
            opt.step()
        return list(params.values())

    ours, ref = _both(cfg)
    parity = _parity(run(ours), run(ref), record_property)
    assert parity["max_abs"] <= TOLERANCE, parity


@pytest.mark.parametrize("cfg", PAIRS, ids=str)
def test_stacked_ensemble_matches_torch_optim_and_separate_models(
    cfg, record_property
) -> None:
    """An ensemble from torch.func.stack_module_state, trained through
    vmap(grad(functional_call)): one optimizer over the stacked tensors."""
    from torch.func import functional_call, grad, stack_module_state, vmap

    members = 3
    gen = torch.Generator().manual_seed(2)
    xs = torch.randn(STEPS, members, 16, 6, generator=gen)
    ys = torch.randn(STEPS, members, 16, 2, generator=gen)

    def stacked(make_opt):
        models = [_model(seed) for seed in range(members)]
        params, buffers = stack_module_state(models)
        base = _model().to("meta")

        def loss_fn(p, b, x, y):
            return F.mse_loss(functional_call(base, (p, b), (x,)), y)

        opt = make_opt(params.values())
        for x, y in zip(xs, ys, strict=True):
            for name, g in vmap(grad(loss_fn))(params, buffers, x, y).items():
                params[name].grad = g
            opt.step()
        return list(params.values())

    def separate(make_opt):
        out = []
        for seed in range(members):
            model = _model(seed)
            batches = [(x[seed], y[seed]) for x, y in zip(xs, ys, strict=True)]
            _train(model, make_opt(model.parameters()), batches)
            out.append(list(model.parameters()))
        return [torch.stack(ps) for ps in zip(*out, strict=True)]

    ours, ref = _both(cfg)
    ours_stacked = stacked(ours)
    parity = _parity(ours_stacked, stacked(ref), record_property)
    assert parity["max_abs"] <= TOLERANCE, parity
    # vmap's batched matmuls may round differently from one model at a time.
    apart = _parity(ours_stacked, separate(ours))
    assert apart["max_abs"] <= TOLERANCE, apart
