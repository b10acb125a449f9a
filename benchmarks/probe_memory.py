"""Memory of a probe left on: RSS over many probed steps with a JSONL sink.

A model of ``--tensors`` parameters (100 by default, ``--numel`` elements
each, so the step itself is cheap and the probe's bookkeeping dominates) is
stepped ``--steps`` times (100,000 by default) with ``optiscope.probe(opt,
sinks=[JSONLSink(path)])`` at its defaults: every step measured, the last 100
records kept in ``probe.history``. The resident set size (``/proc/self/statm``)
is sampled as it goes; the run passes if it stays within ``--budget-mb``
(20 MB) of its value once the history is full (step 1,000). The JSONL file
goes to a temporary directory and is deleted afterwards unless ``--keep``.

Usage: python benchmarks/probe_memory.py [--steps N] [--optimizer Adam|Momentum]
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

import optiscope
from optiscope.probes import JSONLSink

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * PAGE / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--tensors", type=int, default=100)
    parser.add_argument("--numel", type=int, default=16)
    parser.add_argument("--optimizer", choices=["Adam", "Momentum"], default="Adam")
    parser.add_argument("--samples", type=int, default=20, help="RSS samples")
    parser.add_argument("--budget-mb", type=float, default=20.0)
    parser.add_argument("--keep", action="store_true", help="keep the JSONL file")
    args = parser.parse_args()

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    params = [
        torch.nn.Parameter(torch.randn(args.numel, generator=gen))
        for _ in range(args.tensors)
    ]
    grads = [torch.randn(args.numel, generator=gen) for _ in params]
    opt = getattr(optiscope, args.optimizer)(params, lr=1e-3)
    folder = Path(tempfile.mkdtemp(prefix="probe-memory-"))
    path = folder / "run.jsonl"
    baseline_step = min(1000, args.steps)
    marks = sorted(
        {1, 100, baseline_step}
        | {max(1, args.steps * k // args.samples) for k in range(1, args.samples + 1)}
    )
    rows = []
    start_rss = rss_mb()
    started = time.perf_counter()
    with JSONLSink(path) as sink:
        probe = optiscope.probe(opt, sinks=[sink])
        for step in range(1, args.steps + 1):
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            opt.step()
            if step == marks[0]:
                marks.pop(0)
                gc.collect()
                rows.append(
                    (
                        step,
                        rss_mb(),
                        len(probe.history),
                        len(probe._pending),
                        path.stat().st_size / 2**20,
                        time.perf_counter() - started,
                    )
                )
                print(
                    "step {:>7,}  RSS {:8.1f} MB  history {:>3}  pending {}  "
                    "file {:9.1f} MB  {:7.1f} s".format(*rows[-1]),
                    flush=True,
                )
    size = path.stat().st_size
    if args.keep:
        print(f"kept {path}")
    else:
        shutil.rmtree(folder)
    base = next(r[1] for r in rows if r[0] == baseline_step)
    peak = max(r[1] for r in rows if r[0] >= baseline_step)
    end = rows[-1][1]
    per_step = (time.perf_counter() - started) / args.steps * 1e3
    print(
        f"\n{args.optimizer}, {args.tensors} tensors of {args.numel}, "
        f"{args.steps:,} probed steps, JSONL {size / 2**30:.2f} GB, "
        f"{per_step:.2f} ms per step"
    )
    print(f"RSS before the probe {start_rss:.1f} MB; at step 1: {rows[0][1]:.1f} MB")
    print(
        f"RSS at step {baseline_step:,} (history full) {base:.1f} MB; peak after it "
        f"{peak:.1f} MB (+{peak - base:.1f}); at the end {end:.1f} MB "
        f"(+{end - base:.1f}); budget +{args.budget_mb:g} MB"
    )
    flat = peak - base <= args.budget_mb
    print("flat" if flat else "NOT flat")
    return 0 if flat else 1


if __name__ == "__main__":
    raise SystemExit(main())
