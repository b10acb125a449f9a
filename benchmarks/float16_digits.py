"""float16 training on the lab's digits task, against a float64 reference run.

The lab's MLP (64-256-256-10, ReLU, ``optiscope.Dropout(0.2)``) is built once
in float32 from one seed, cast to each dtype, and trained for the same steps on
the same minibatches with the same dropout masks (the Philox seed of every
forward call comes from torch's default generator, seeded alike). Each run is
compared with the float64 one: final training loss and validation accuracy,
the largest parameter deviation relative to the largest float64 parameter of
its tensor, the deviation of all parameters in the L2 norm relative to the
float64 norm, and the largest single step of any coordinate in units of ``lr``
(Adam's steps are near ``lr``; float16 moments made them thousands of times
larger). The row "float16, float16 moments" replays the old default, which
``Adam(state_dtype=torch.float16)`` now refuses, through the private
``_state_dtype`` hook.

Usage: python benchmarks/float16_digits.py [--steps 300] [--seed 0]
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

import optiscope
from optiscope.lab import data as lab_data


# The lab's MLP and its evaluation, written out here: the lab's own training
# code trains many runs at once and is not this script's concern.
def mlp(digits, *, hidden: int, p_drop: float, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    width = digits.x_train.shape[1]
    return torch.nn.Sequential(
        torch.nn.Linear(width, hidden),
        torch.nn.ReLU(),
        optiscope.Dropout(p_drop),
        torch.nn.Linear(hidden, hidden),
        torch.nn.ReLU(),
        optiscope.Dropout(p_drop),
        torch.nn.Linear(hidden, 10),
    )


def minibatches(n: int, batch: int, steps: int, seed: int):
    """``steps`` batches of ``batch`` row indices, drawn with replacement."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield torch.randint(n, (batch,), generator=generator)


@torch.no_grad()
def full_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    loss = torch.nn.functional.cross_entropy(model(x).double(), y).item()
    model.train()
    return loss


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    hits = (model(x).argmax(1) == y).double().mean().item()
    model.train()
    return hits


class _Float16MomentsAdam(optiscope.Adam):
    """The behaviour before float16 moments were refused: v kept in float16."""

    def _state_dtype(self, dtype, options):
        return dtype


def run(digits, dtype, make_opt, *, steps, seed) -> dict:
    model = mlp(digits, hidden=256, p_drop=0.2, seed=seed).to(dtype)
    cast = dataclasses.replace(
        digits, x_train=digits.x_train.to(dtype), x_val=digits.x_val.to(dtype)
    )
    opt = make_opt(model.parameters())
    lr = opt.param_groups[0]["lr"]
    torch.manual_seed(seed + 2)  # the dropout seeds: the same in every run
    model.train()
    largest_step = 0.0
    for rows in minibatches(len(cast.y_train), 32, steps, seed + 1):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(
            model(cast.x_train[rows]), cast.y_train[rows]
        )
        loss.backward()
        before = [p.detach().to(torch.float64, copy=True) for p in model.parameters()]
        opt.step()
        for p, b in zip(model.parameters(), before, strict=True):
            largest_step = max(largest_step, (p.detach().double() - b).abs().max())
    finite = all(torch.isfinite(p).all() for p in model.parameters())
    return {
        "params": [p.detach().double() for p in model.parameters()],
        "loss": full_loss(model, cast.x_train, cast.y_train),
        "accuracy": accuracy(model, cast.x_val, cast.y_val),
        "step_over_lr": float(largest_step) / lr,
        "finite": bool(finite),
    }


def deviation(params, reference) -> tuple[float, float]:
    """max over tensors of max|θ − θ64| / max|θ64|, and ‖θ − θ64‖ / ‖θ64‖ over
    all parameters together."""
    worst = max(
        float((p - r).abs().max() / r.abs().max())
        for p, r in zip(params, reference, strict=True)
    )
    flat, flat_ref = (
        torch.cat([p.ravel() for p in params]),
        torch.cat([r.ravel() for r in reference]),
    )
    return worst, float((flat - flat_ref).norm() / flat_ref.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    digits = lab_data.load(None, args.seed)

    def adam(params):
        return optiscope.Adam(params, lr=1e-3)

    def old_adam(params):
        return _Float16MomentsAdam(params, lr=1e-3)

    def momentum(params):
        return optiscope.Momentum(params, lr=0.1, momentum=0.9)

    rows = [
        ("Adam", "float64", torch.float64, adam),
        ("Adam", "float32", torch.float32, adam),
        ("Adam", "bfloat16", torch.bfloat16, adam),
        ("Adam", "float16", torch.float16, adam),
        ("Adam", "float16, float16 moments (old)", torch.float16, old_adam),
        ("Momentum", "float64", torch.float64, momentum),
        ("Momentum", "float16", torch.float16, momentum),
    ]
    references = {}
    print(
        f"{args.steps} steps, batch 32, lab MLP 64-256-256-10 with Dropout(0.2), "
        f"seed {args.seed}; Adam lr=1e-3, Momentum lr=0.1 momentum=0.9\n"
    )
    print(
        "| optimizer | parameters | final train loss | val accuracy "
        "| max rel. param deviation vs float64 | rel. L2 deviation "
        "| largest step / lr |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, label, dtype, make in rows:
        result = run(digits, dtype, make, steps=args.steps, seed=args.seed)
        if dtype == torch.float64:
            references[name] = result["params"]
        worst, l2 = deviation(result["params"], references[name])
        loss = f"{result['loss']:.4f}" if result["finite"] else "non-finite"
        print(
            f"| {name} | {label} | {loss} | {result['accuracy']:.4f} | {worst:.2e} "
            f"| {l2:.2e} | {result['step_over_lr']:.3g} |"
        )


if __name__ == "__main__":
    main()
