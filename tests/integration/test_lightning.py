"""PyTorch Lightning drives optiscope optimizers as it drives torch.optim's:
bf16-mixed precision, gradient clipping, gradient accumulation, a scheduler,
and resuming from a checkpoint."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from configs import config
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

pytestmark = [
    pytest.mark.integration,
    # Lightning's advice for a real run, not a fault of this one: a 64-sample
    # dataset needs no loader workers.
    pytest.mark.filterwarnings(
        "ignore:The '\\w+_dataloader' does not have many workers"
    ),
    # Lightning 2.6 still builds torch.utils._pytree.LeafSpec, which torch
    # 2.13 deprecates.
    pytest.mark.filterwarnings(
        "ignore:.isinstance\\(treespec, LeafSpec\\). is deprecated:FutureWarning"
    ),
]

#: float32 parity with torch.optim (bf16 forward, float32 weights and state).
TOLERANCE = 1e-6
EPOCHS = 4


class Regressor(pl.LightningModule):
    def __init__(self, make_opt) -> None:
        super().__init__()
        torch.manual_seed(0)  # the layers' initial weights
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))
        self.make_opt = make_opt

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x).float(), y)

    def configure_optimizers(self):
        opt = self.make_opt(self.parameters())
        return {
            "optimizer": opt,
            "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 3, gamma=0.5),
        }


def _loader():
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 6, generator=gen), torch.randn(64, 2, generator=gen)
    dataset = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=False)


def _fit(make_opt, epochs: int, ckpt_path=None, save_to=None) -> Regressor:
    module = Regressor(make_opt)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        precision="bf16-mixed",
        gradient_clip_val=0.5,
        accumulate_grad_batches=2,  # 8 batches: 4 optimizer steps per epoch
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, _loader(), ckpt_path=ckpt_path)
    if save_to is not None:
        trainer.save_checkpoint(save_to)
    return module


def _both(name: str):
    cfg = config(name)
    torch_cls, torch_options = cfg.torch_equivalent
    return (
        lambda params: cfg.cls(params, **cfg.options),
        lambda params: torch_cls(params, **torch_options),
    )


def _parity(a: nn.Module, b: nn.Module, record_property) -> dict:
    pairs = list(zip(a.parameters(), b.parameters(), strict=True))
    diff = max((p - q).abs().max().item() for p, q in pairs)
    scale = max(q.abs().max().item() for _, q in pairs)
    out = {"max_abs": diff, "max_rel": diff / scale}
    for key, value in out.items():
        record_property(key, value)
    return out


@pytest.mark.parametrize("name", ["adam", "adamw", "momentum"])
def test_lightning_training_matches_torch_optim(name, record_property) -> None:
    ours, ref = _both(name)
    parity = _parity(_fit(ours, EPOCHS), _fit(ref, EPOCHS), record_property)
    assert parity["max_abs"] <= TOLERANCE, parity


@pytest.mark.parametrize("name", ["adam", "momentum"])
def test_lightning_resume_equals_an_uninterrupted_run(
    name, tmp_path, record_property
) -> None:
    """Fit half the epochs, save, resume to the end: the same bits as one fit."""
    ours, _ = _both(name)
    checkpoint = tmp_path / "half.ckpt"
    _fit(ours, EPOCHS // 2, save_to=checkpoint)
    resumed = _fit(ours, EPOCHS, ckpt_path=checkpoint)
    parity = _parity(resumed, _fit(ours, EPOCHS), record_property)
    assert parity["max_abs"] == 0.0, parity
