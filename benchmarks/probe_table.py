"""The probe table of a real training run: per parameter, the last step's probes.

An MLP 64-256-256-10 with dropout trains on the embedded digits with
``optiscope.Adam(lr=1e-3, probe=True)`` (batch 64), then the last step's
``optimizer.probes`` is printed as a Markdown table, with the validation
accuracy. Usage: python benchmarks/probe_table.py [--steps N] [--seed N]
"""

from __future__ import annotations

import argparse

import torch

import optiscope
from optiscope.lab import data

COLUMNS = {
    "grad RMS": "grad_rms",
    "update RMS": "update_rms",
    "param RMS": "param_rms",
    "upd/weight": "update_to_weight",
    "step min": "step_min",
    "median": "step_median",
    "max": "step_max",
    "ε-dominated": "eps_dominated_fraction",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    digits = data.load(None, args.seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(digits.x_train.shape[1], 256),
        torch.nn.ReLU(),
        optiscope.Dropout(0.1),
        torch.nn.Linear(256, 256),
        torch.nn.ReLU(),
        optiscope.Dropout(0.1),
        torch.nn.Linear(256, 10),
    )
    opt = optiscope.Adam(model.named_parameters(), lr=1e-3, probe=True)
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    for _ in range(args.steps):
        batch = torch.randint(0, len(digits.y_train), (64,), generator=gen)
        loss = torch.nn.functional.cross_entropy(
            model(digits.x_train[batch]), digits.y_train[batch]
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(digits.x_val).argmax(1) == digits.y_val).float().mean()

    print(
        f"digits MLP 64-256-256-10, Adam lr 1e-3, batch 64, {args.steps} steps; "
        f"validation accuracy {float(accuracy):.3f}\n"
    )
    print("| param | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for name, values in opt.probes["params"].items():
        cells = []
        for key in COLUMNS.values():
            value = values[key]
            cells.append(f"{value:.3f}" if key.startswith("eps") else f"{value:.2e}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
