"""``optiscope doctor`` on the lab's own training: the ``"doctor"`` section.

After the claims, the lab's digits MLP (the shared nets' shape, dropout and
batch) is trained briefly once with Adam and once with Momentum, each
optimizer probed, and :func:`optiscope.probes.diagnose` reads the records. Only
the public ``diagnose`` and ``Finding.to_dict`` are used. The result is plain
data for ``results.json``; it is a deterministic function of (data, seed, quick).
"""

from __future__ import annotations

from typing import Any

import torch

import optiscope

from .claims.c1_momentum_variance import LR as MOMENTUM_LR
from .claims.shared import (
    DEPTH,
    DROPOUT_P,
    HIDDEN,
    MOMENTUM_BETA,
    NET_BATCH,
    NET_LR,
)
from .data import Dataset
from .training import mlp, train

SEVERITIES = ("info", "warning", "error")  # the doctor's, least severe first
KEY = "doctor"  # the top-level key in results.json, and the resume cache's name


def steps(quick: bool) -> int:
    return 200 if quick else 300


def run(data: Dataset, seed: int, quick: bool) -> dict[str, Any]:
    """Train, probe and diagnose; the ``"doctor"`` section of ``results.json``."""
    n = steps(quick)
    runs = []
    findings: list[dict[str, Any]] = []
    for offset, name in enumerate(("Adam", "Momentum")):
        base = seed + 700 + 10 * offset
        model = mlp(data, 1, HIDDEN, DEPTH, DROPOUT_P, base)
        params = list(model.named_parameters())
        if name == "Adam":
            lr, opt = NET_LR, optiscope.Adam(params, lr=NET_LR)
        else:
            lr = MOMENTUM_LR
            opt = optiscope.Momentum(params, lr=lr, momentum=MOMENTUM_BETA)
        # A fixed run id: same seed, same results.json.
        probe = optiscope.probe(opt, history=None, run=f"lab-{name.lower()}")
        torch.manual_seed(base + 2)  # dropout masks
        train([model], [opt], data, steps=n, batch=NET_BATCH, seed=base + 1)
        found = [f.to_dict() for f in optiscope.probes.diagnose(probe)]
        optiscope.probes.remove(opt)
        findings += found
        runs.append(
            {
                "optimizer": name,
                "lr": lr,
                "momentum": MOMENTUM_BETA if name == "Momentum" else None,
                "steps": n,
                "findings": len(found),
            }
        )
    return {
        "model": {
            "hidden": HIDDEN,
            "depth": DEPTH,
            "dropout": DROPOUT_P,
            "batch": NET_BATCH,
            "seed": seed,
        },
        "runs": runs,
        "findings": findings,
        "counts": {s: sum(f["severity"] == s for f in findings) for s in SEVERITIES},
    }


def problems(section: Any) -> list[str]:
    """What is wrong with a cached ``"doctor"`` section; [] if nothing."""
    if not isinstance(section, dict):
        return ["the doctor section is not an object"]
    for name, kind in (("runs", list), ("findings", list), ("counts", dict)):
        if not isinstance(section.get(name), kind):
            return [f"field {name!r} of the doctor section is malformed"]
    if not all(
        isinstance(f, dict) and f.get("severity") in SEVERITIES
        for f in section["findings"]
    ):
        return ["a malformed doctor finding"]
    return []
