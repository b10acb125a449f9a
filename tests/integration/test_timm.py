"""timm models trained by optiscope, with timm's own cosine scheduler and EMA,
against torch.optim in the same setup."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from configs import config

try:
    import torchvision  # noqa: F401  (timm imports it)
except (ImportError, RuntimeError) as error:
    # torchvision's PyPI wheels link against CUDA builds of torch; with the CPU
    # build they fail to load ("operator torchvision::nms does not exist").
    pytest.skip(
        f"timm needs a torchvision built for this torch: {error}",
        allow_module_level=True,
    )
timm = pytest.importorskip("timm")

pytestmark = pytest.mark.integration

#: float32 parity with torch.optim after 8 steps.
TOLERANCE = 1e-6
STEPS = 8
#: Small models of three families that timm keeps for its own tests.
MODELS = ["test_vit", "test_efficientnet", "test_convnext"]


def _run(model_name: str, make_opt):
    from timm.scheduler import CosineLRScheduler
    from timm.utils import ModelEmaV3

    torch.manual_seed(0)  # the model's initial weights
    model = timm.create_model(model_name, pretrained=False, num_classes=3)
    size = model.pretrained_cfg["input_size"]
    opt = make_opt(model.parameters())
    # Warm up from 1% of the base lr: a fraction, so that the SGD mapping's
    # α(1−β) holds at every step.
    base = opt.param_groups[0]["lr"]
    schedule = CosineLRScheduler(
        opt, t_initial=STEPS, warmup_t=2, warmup_lr_init=base / 100, t_in_epochs=False
    )
    ema = ModelEmaV3(model, decay=0.9)
    gen = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        x = torch.randn(4, *size, generator=gen)
        y = torch.randint(0, 3, (4,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        schedule.step_update(step + 1)
        ema.update(model, step=step)
    return [*model.parameters(), *ema.module.parameters()]


@pytest.mark.parametrize("name", ["adamw", "momentum"])
@pytest.mark.parametrize("model_name", MODELS)
def test_timm_model_trains_like_with_torch_optim(
    model_name, name, record_property
) -> None:
    if model_name not in timm.list_models(model_name):
        pytest.skip(f"this timm has no {model_name}")
    cfg = config(name)
    torch_cls, torch_options = cfg.torch_equivalent
    ours = _run(model_name, lambda p: cfg.cls(p, **cfg.options))
    ref = _run(model_name, lambda p: torch_cls(p, **torch_options))
    pairs = list(zip(ours, ref, strict=True))
    diff = max((p - q).abs().max().item() for p, q in pairs)
    scale = max(q.abs().max().item() for _, q in pairs)
    record_property("max_abs", diff)
    record_property("max_rel", diff / scale)
    assert diff <= TOLERANCE, (diff, diff / scale)
