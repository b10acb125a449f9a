"""The Hugging Face ``Trainer`` with ``optimizers=(optiscope.AdamW(...), None)``:
its linear schedule, gradient clipping and checkpoint resume, on a BERT built
from a tiny config (no download)."""

from __future__ import annotations

import pytest
import torch

import optiscope

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it

pytestmark = pytest.mark.integration

#: float32 parity with torch.optim.AdamW after 12 steps.
TOLERANCE = 1e-6
STEPS = 12


def _model():
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    torch.manual_seed(0)  # the layers' initial weights
    return transformers.BertForSequenceClassification(config)


def _dataset() -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (48, 8), generator=gen)
    labels = torch.randint(0, 2, (48,), generator=gen)
    return [{"input_ids": i, "labels": y} for i, y in zip(ids, labels, strict=True)]


def _train(make_opt, out, *, save_steps=None, resume=None):
    model = _model()
    args = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        use_cpu=True,
        report_to="none",
        logging_strategy="no",
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        seed=0,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=_dataset(),
        optimizers=(make_opt(model.parameters()), None),
    )
    trainer.train(resume_from_checkpoint=resume)
    return model


def _parity(a, b, record_property) -> dict:
    pairs = list(zip(a.parameters(), b.parameters(), strict=True))
    diff = max((p - q).abs().max().item() for p, q in pairs)
    scale = max(q.abs().max().item() for _, q in pairs)
    out = {"max_abs": diff, "max_rel": diff / scale}
    for key, value in out.items():
        record_property(key, value)
    return out


def _ours(params):
    return optiscope.AdamW(params, lr=1e-3, weight_decay=0.01)


def test_trainer_with_optiscope_adamw_matches_torch(tmp_path, record_property) -> None:
    ours = _train(_ours, tmp_path / "ours")
    ref = _train(
        lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01), tmp_path / "ref"
    )
    parity = _parity(ours, ref, record_property)
    assert parity["max_abs"] <= TOLERANCE, parity


def test_trainer_resume_from_checkpoint_equals_one_run(
    tmp_path, record_property
) -> None:
    """The Trainer saves optimizer.pt with torch.save and loads it back."""
    _train(_ours, tmp_path / "run", save_steps=STEPS // 2)
    checkpoint = tmp_path / "run" / f"checkpoint-{STEPS // 2}"
    resumed = _train(_ours, tmp_path / "resumed", resume=str(checkpoint))
    parity = _parity(resumed, _train(_ours, tmp_path / "whole"), record_property)
    assert parity["max_abs"] == 0.0, parity
