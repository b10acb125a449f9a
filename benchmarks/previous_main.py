"""This tree's optimizer step against an earlier commit's, in one process.

    python benchmarks/previous_main.py 2028783 [--threads 1] [--rounds 21]

The earlier commit's package is extracted with ``git archive`` into a
temporary folder as ``optiscope_previous`` (its operator namespace renamed, so
both register side by side), then both are timed round-robin with torch's
fused optimizer as the common baseline: 10M float32 elements in 1 tensor and in
200 (sized as ``optiscope bench`` sizes them), and the host side alone on 1 and
200 tensors of 50 elements. Prints medians and the paired median ratio
this/previous.
"""

from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

import optiscope
from optiscope.bench import split_sizes


def load_previous(revision: str, into: Path):
    archive = subprocess.run(
        ["git", "archive", revision, "src/optiscope"],
        check=True,
        capture_output=True,
        cwd=Path(__file__).resolve().parents[1],
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    package = into / "optiscope_previous"
    (into / "src" / "optiscope").rename(package)
    for path in package.rglob("*.py"):
        text = path.read_text()
        path.write_text(
            text.replace('"optiscope::', '"optiscope_previous::').replace(
                "optiscope::", "optiscope_previous::"
            )
        )
    sys.path.insert(0, str(into))
    import optiscope_previous

    return optiscope_previous


def timed(variants: dict, rounds: int) -> dict[str, list[float]]:
    for f in variants.values():
        f()
        f()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, f in variants.items():
            start = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - start)
    return times


def step_of(build, sizes, grads):
    params = [torch.nn.Parameter(torch.randn(n)) for n in sizes]
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    return build(params).step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revision")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=21)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        previous = load_previous(args.revision, Path(folder))
        for rule in ("Adam", "Momentum"):
            options = dict(lr=1e-3, momentum=0.9) if rule == "Momentum" else {}
            if rule == "Momentum":

                def fused(ps):
                    return torch.optim.SGD(ps, lr=1e-4, momentum=0.9, fused=True)
            else:

                def fused(ps):
                    return torch.optim.Adam(ps, lr=1e-3, fused=True)

            for numel, tensors in ((10_000_000, 1), (10_000_000, 200), (50, 200)):
                sizes = split_sizes(numel, tensors) if tensors > 1 else [numel]
                if numel == 50:  # the host side alone: 200 tiny tensors
                    sizes = [50] * 200
                grads = [torch.randn(n) for n in sizes]
                times = timed(
                    {
                        "fused": step_of(fused, sizes, grads),
                        "previous": step_of(
                            lambda ps, r=rule, o=options: getattr(previous, r)(ps, **o),
                            sizes,
                            grads,
                        ),
                        "this": step_of(
                            lambda ps, r=rule, o=options: getattr(optiscope, r)(
                                ps, **o
                            ),
                            sizes,
                            grads,
                        ),
                    },
                    args.rounds,
                )
                median = {k: statistics.median(v) for k, v in times.items()}
                paired = statistics.median(
                    a / b for a, b in zip(times["this"], times["previous"], strict=True)
                )
                print(
                    f"{rule:8s} {sum(sizes):>10,} elements x {len(sizes):3d}: "
                    f"fused {median['fused'] * 1e3:7.3f} ms, previous "
                    f"{median['previous'] * 1e3:7.3f} ms, this "
                    f"{median['this'] * 1e3:7.3f} ms; this/previous (paired "
                    f"median) {paired:.3f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
