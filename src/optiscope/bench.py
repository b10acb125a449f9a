"""``optiscope bench``: our fused steps and dropout against torch, in one process.

Every case times its variants round-robin (one step of each per round, so
machine noise hits all of them alike) and reports the median and min–max over
the rounds. Bandwidth is bytes actually read + written per element over the
median time; "% triad" compares it with ``a += s*b`` measured in the same rounds.
Results are data first (``bench.json``); the table is rendered from them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import optiscope
from optiscope.kernels import loading

#: Bytes read + written per element by one step (fp32): Momentum reads
#: θ, g, m and writes θ, m; Adam reads θ, g, m, v and writes θ, m, v.
BYTES_PER_ELEMENT = {"Momentum": 5 * 4, "Adam": 7 * 4, "AdamW": 7 * 4}
TRIAD_BYTES, COPY_BYTES = 3 * 4, 2 * 4  # a += s*b reads a, b, writes a; copy 1+1
LR, MOMENTUM = 1e-3, 0.9


@dataclass(frozen=True)
class Case:
    rule: str  # Momentum, Adam or AdamW
    numel: int
    tensors: int
    threads: int


# -- timing ------------------------------------------------------------------------------
def round_robin(
    variants: dict[str, Callable[[], Any]],
    rounds: int,
    before: Callable[[], Any] | None = None,
) -> dict[str, dict]:
    """Median and min–max seconds of each variant, timed one after another per
    round; ``before``, if given, runs untimed before each timing."""
    for run in variants.values():  # warm-up: compile, allocate state
        run()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, run in variants.items():
            if before is not None:
                before()
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {
        name: {
            "median_s": statistics.median(t),
            "min_s": min(t),
            "max_s": max(t),
            "times_s": t,
        }
        for name, t in times.items()
    }


def paired_ratio(
    timings: dict[str, dict], base: Sequence[str], other: Sequence[str]
) -> dict[str, float]:
    """The summed times of the variants ``base`` over those of ``other``, round by
    round (one round ran them all, back to back): median, min and max."""

    def sums(names: Sequence[str]) -> list[float]:
        return [
            sum(t) for t in zip(*(timings[n]["times_s"] for n in names), strict=True)
        ]

    ratios = [b / o for b, o in zip(sums(base), sums(other), strict=True)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def torch_optimizer(rule: str, params: list[torch.Tensor], impl: str):
    flags = {"for-loop": dict(foreach=False), "foreach": dict(foreach=True)}
    flags["fused"] = dict(fused=True)
    if rule == "Momentum":  # the same trajectory, in SGD's summing convention
        return torch.optim.SGD(
            params, lr=LR * (1 - MOMENTUM), momentum=MOMENTUM, **flags[impl]
        )
    return getattr(torch.optim, rule)(params, lr=LR, **flags[impl])


def our_optimizer(rule: str, params: list[torch.Tensor]):
    if rule == "Momentum":
        return optiscope.Momentum(params, lr=LR, momentum=MOMENTUM)
    return getattr(optiscope, rule)(params, lr=LR)


def split_sizes(numel: int, tensors: int, seed: int = 0) -> list[int]:
    """``tensors`` sizes summing to ``numel``, spread over two decades like a model's."""
    weights = np.random.default_rng(seed).uniform(0.1, 10.0, tensors)
    sizes = np.floor(weights / weights.sum() * numel).astype(np.int64)
    sizes[-1] += numel - sizes.sum()
    return sizes.tolist()


def bench_case(case: Case, rounds: int) -> dict[str, Any]:
    torch.set_num_threads(case.threads)
    sizes = split_sizes(case.numel, case.tensors)
    grads = [torch.randn(n) for n in sizes]
    steps: dict[str, Callable[[], Any]] = {}

    def make(build) -> Callable[[], Any]:
        params = [torch.nn.Parameter(torch.randn(n)) for n in sizes]
        for p, g in zip(params, grads, strict=True):
            p.grad = g  # read-only in every optimizer: shared to save memory
        return build(params).step

    for impl in ("for-loop", "foreach", "fused"):
        steps[f"torch {impl}"] = make(
            lambda ps, i=impl: torch_optimizer(case.rule, ps, i)
        )
    steps["optiscope"] = make(lambda ps: our_optimizer(case.rule, ps))
    a, b = [torch.randn(n) for n in sizes], [torch.randn(n) for n in sizes]

    def triad() -> None:
        for x, y in zip(a, b, strict=True):
            x.add_(y, alpha=0.5)

    steps["triad"] = triad
    timings = round_robin(steps, rounds)
    triad_gbs = TRIAD_BYTES * case.numel / timings.pop("triad")["median_s"] / 1e9
    bytes_moved = BYTES_PER_ELEMENT[case.rule] * case.numel
    ours, fused = timings["optiscope"]["median_s"], timings["torch fused"]["median_s"]
    loop = timings["torch for-loop"]["median_s"]
    for t in timings.values():
        t["gb_per_s"] = bytes_moved / t["median_s"] / 1e9
        t["percent_of_triad"] = 100 * t["gb_per_s"] / triad_gbs
    return {
        **case.__dict__,
        "triad_gb_per_s": triad_gbs,
        "variants": timings,
        "speedup_vs_fused": fused / ours,
        "speedup_vs_fused_per_round": paired_ratio(
            timings, ["torch fused"], ["optiscope"]
        ),
        "speedup_vs_for_loop": loop / ours,
    }


def bench_state_dtype(numel: int, threads: int, rounds: int) -> dict[str, Any]:
    """Adam on one float32 tensor of ``numel`` elements: torch fused (float32
    state) against optiscope with float32, bfloat16 and stochastically rounded
    bfloat16 moments. Each round times every variant once, each right after a
    triad ``a += b/2`` (untimed), as a step comes after the backward's torch
    ops. bfloat16 moments move 20 bytes per element instead of 28, so 1.4 is
    the bandwidth-bound speedup. Returns each variant's seconds and its
    per-round speedup over torch fused (median, min and max over the rounds)."""
    torch.set_num_threads(threads)
    grad = torch.randn(numel)
    a, b = torch.randn(numel), torch.randn(numel)

    def make(build) -> Callable[[], Any]:
        param = torch.nn.Parameter(torch.randn(numel))
        param.grad = grad  # read-only in every optimizer: shared to save memory
        return build([param]).step

    bf16 = dict(lr=LR, state_dtype=torch.bfloat16)
    steps = {
        "torch fused": make(lambda ps: torch.optim.Adam(ps, lr=LR, fused=True)),
        "optiscope float32": make(lambda ps: optiscope.Adam(ps, lr=LR)),
        "optiscope bfloat16": make(lambda ps: optiscope.Adam(ps, **bf16)),
        "optiscope bfloat16 stochastic": make(
            lambda ps: optiscope.Adam(ps, **bf16, stochastic_rounding=True)
        ),
    }
    timings = round_robin(steps, rounds, before=lambda: a.add_(b, alpha=0.5))
    variants = {}
    for name, t in timings.items():
        ratio = paired_ratio(timings, ["torch fused"], [name])
        variants[name] = {
            **{k: t[k] for k in ("median_s", "min_s", "max_s")},
            "speedup_vs_fused": ratio["median"],
            "speedup_min": ratio["min"],
            "speedup_max": ratio["max"],
        }
    return {"numel": numel, "threads": threads, "rounds": rounds, **variants}


def bench_bandwidth(numel: int, threads: int, rounds: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    a, b = torch.randn(numel), torch.randn(numel)
    timings = round_robin(
        {"triad": lambda: a.add_(b, alpha=0.5), "copy": lambda: a.copy_(b)}, rounds
    )
    return {
        "numel": numel,
        "threads": threads,
        "triad_gb_per_s": TRIAD_BYTES * numel / timings["triad"]["median_s"] / 1e9,
        "copy_gb_per_s": COPY_BYTES * numel / timings["copy"]["median_s"] / 1e9,
        "timings": timings,
    }


def bench_probes(rule: str, numel: int, threads: int, rounds: int) -> dict[str, Any]:
    """``optiscope.Adam`` (or ``Momentum``) steps on one float32 tensor: probes off, probes on every
    step, and on every 10th step (``every=10``). One optimizer and one set of
    tensors serve all three, the probe attached or removed between timings:
    separate tensors would differ by where their pages landed (measured here:
    up to 10% between two identical unprobed optimizers). Each timed call is
    10 steps, so the ``every=10`` variant pays exactly one measured step; times
    are per step, medians over ``rounds`` interleaved rounds, and the overhead
    is the median over rounds of probed / off - 1, each ratio taken between
    neighbouring timings, so that the machine's drift cancels."""
    torch.set_num_threads(threads)
    w = torch.nn.Parameter(torch.randn(numel))
    w.grad = torch.randn(numel)
    opt = getattr(optiscope, rule)([w], lr=LR)
    settings = {"probes off": None, "probes on": 1, "every=10": 10}

    def ten_steps(every: int | None) -> float:
        optiscope.probes.remove(opt)
        if every is not None:
            optiscope.probe(opt, every=every)
        start = time.perf_counter()
        for _ in range(10):
            opt.step()
        return (time.perf_counter() - start) / 10

    for every in settings.values():  # warm-up: compile, allocate state
        ten_steps(every)
    times: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(rounds):
        for name, every in settings.items():
            times[name].append(ten_steps(every))
    optiscope.probes.remove(opt)
    timings = {
        name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t)}
        for name, t in times.items()
    }
    off = np.array(times["probes off"])

    def overhead(name: str) -> float:
        return float(np.median(np.array(times[name]) / off) - 1)

    return {
        "rule": rule,
        "numel": numel,
        "threads": threads,
        "timings": timings,
        "overhead": overhead("probes on"),
        "overhead_every_10": overhead("every=10"),
    }


# -- dropout ------------------------------------------------------------------------------
def saved_bytes(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> int:
    """Bytes autograd saves for backward during ``fn(x)``, not counting ``x`` itself."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if t.data_ptr() != x.data_ptr():
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return total


def bench_dropout(side: int, threads: int, rounds: int, p: float = 0.5) -> dict:
    """torch's ``F.dropout`` and ours, forward and backward, on a ``side × side``
    float32 leaf; our ``inplace=True`` on an activation; and ``x.clone()``.

    The in-place variant is timed as a net uses it: on a non-leaf activation,
    made fresh each round by the ``clone`` variant (``h = x.clone()``), whose
    own time (the previous ``h`` freed included) is reported on its own line
    and is not part of the dropout's. Its
    backward is ``h.backward(g)``: our backward, then clone's, which passes the
    gradient on untouched, and x's gradient, which takes that tensor without a
    copy. ``clone`` is also the baseline of our out-of-place forward: one read
    and one write of a fresh tensor, as the forward does. Returned ratios, of
    medians: ``speedup`` (torch forward+backward over ours), ``speedup_inplace``
    (over our in-place forward+backward) and ``forward_vs_clone`` (our
    out-of-place forward over clone; at most 1 means no slower than a copy).
    """
    torch.set_num_threads(threads)
    x = torch.randn(side, side, requires_grad=True)
    g = torch.randn(side, side)
    variants = {"torch": F.dropout, "optiscope": optiscope.functional.dropout}
    steps: dict[str, Callable[[], Any]] = {}
    for name, fn in variants.items():
        held: dict[str, torch.Tensor] = {}

        def forward(fn=fn, held=held) -> None:
            held["y"] = fn(x, p)

        def backward(held=held) -> None:
            held["y"].backward(g)
            x.grad = None

        steps[f"{name} forward"], steps[f"{name} backward"] = forward, backward
    activation: dict[str, torch.Tensor] = {}

    def clone() -> None:
        activation["h"] = x.clone()

    def inplace_forward() -> None:
        optiscope.functional.dropout(activation["h"], p, inplace=True)

    def inplace_backward() -> None:
        # h stays until the next clone replaces it: freeing an activation is
        # not the dropout's cost (the out-of-place outputs above are freed by
        # the next forward, which allocated them).
        activation["h"].backward(g)
        x.grad = None

    steps["clone"] = clone  # runs just before the in-place pair, every round
    steps["optiscope inplace forward"] = inplace_forward
    steps["optiscope inplace backward"] = inplace_backward
    timings = round_robin(steps, rounds)
    for name in (*variants, "optiscope inplace"):
        timings[f"{name} forward+backward"] = {
            "median_s": timings[f"{name} forward"]["median_s"]
            + timings[f"{name} backward"]["median_s"]
        }

    def median(name: str) -> float:
        return timings[name]["median_s"]

    both = "forward+backward"
    return {
        "shape": [side, side],
        "threads": threads,
        "p": p,
        "timings": timings,
        "speedup": median(f"torch {both}") / median(f"optiscope {both}"),
        "speedup_inplace": median(f"torch {both}")
        / median(f"optiscope inplace {both}"),
        "forward_vs_clone": median("optiscope forward") / median("clone"),
        "speedup_inplace_per_round": paired_ratio(
            timings,
            ["torch forward", "torch backward"],
            ["optiscope inplace forward", "optiscope inplace backward"],
        ),
        "forward_vs_clone_per_round": paired_ratio(
            timings, ["optiscope forward"], ["clone"]
        ),
        "saved_bytes": {
            **{n: saved_bytes(lambda h, f=f: f(h, p), x) for n, f in variants.items()},
            "optiscope inplace": saved_bytes(
                lambda h: optiscope.functional.dropout(h.clone(), p, inplace=True), x
            ),
        },
    }


# -- first step and state_dtype -------------------------------------------------------------
FIRST_STEP = """
import time
start = time.perf_counter()
import torch
{imports}
model = torch.nn.Linear(256, 256)
opt = {make}(model.parameters(), lr=1e-3{options})
model(torch.randn(8, 256)).square().mean().backward()
opt.step()
print(time.perf_counter() - start)
"""


def first_step_latency(rule: str = "Adam", rounds: int = 5) -> dict[str, Any]:
    """Seconds from the start of a fresh process (before ``import torch``) to the
    end of its first step: ours with an empty numba cache (a fresh machine), ours
    with the cache filled, and torch's fused step. Each is the median of
    ``rounds`` processes, the three run in turn so that a busy host slows all
    alike; ``cold_process_s`` is the whole cold process, start to exit, which
    also waits for the kernels compiling behind the first steps. ``rule`` is
    ``"Adam"`` or ``"AdamW"``: a name both packages share."""
    scripts = {
        "optiscope": FIRST_STEP.format(
            imports="import optiscope", make=f"optiscope.{rule}", options=""
        ),
        "torch": FIRST_STEP.format(
            imports="", make=f"torch.optim.{rule}", options=", fused=True"
        ),
    }

    def seconds(script: str, cache: str) -> tuple[float, float]:
        began = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-c", script],
            env={**os.environ, "NUMBA_CACHE_DIR": cache},
            capture_output=True,
            text=True,
            check=True,
        )
        return float(out.stdout.strip().splitlines()[-1]), time.perf_counter() - began

    times: dict[str, list[float]] = {
        k: []
        for k in ("cold_cache_s", "cold_process_s", "warm_cache_s", "torch_fused_s")
    }
    with tempfile.TemporaryDirectory() as warm:
        seconds(scripts["optiscope"], warm)  # fills the warm cache
        for _ in range(rounds):
            with tempfile.TemporaryDirectory() as cold:
                first, whole = seconds(scripts["optiscope"], cold)
            times["cold_cache_s"].append(first)
            times["cold_process_s"].append(whole)
            times["warm_cache_s"].append(seconds(scripts["optiscope"], warm)[0])
            times["torch_fused_s"].append(seconds(scripts["torch"], warm)[0])
    result: dict[str, Any] = {k: statistics.median(v) for k, v in times.items()}
    result["runs"] = times
    return result


#: The moments ``state_dtype_accuracy`` compares: (state dtype, stochastic rounding).
STATE_VARIANTS = {
    "float32": (torch.float32, False),
    "bfloat16": (torch.bfloat16, False),
    "bfloat16 stochastic": (torch.bfloat16, True),
}


def state_dtype_accuracy(steps: int, seed: int = 0, seeds: int = 1) -> dict[str, Any]:
    """An MLP on the embedded digits, trained with Adam keeping its moments in
    float32, in bfloat16 rounded to nearest, and in bfloat16 rounded
    stochastically: per seed the same split, initialisation and batches for
    all three. Each variant reports its test accuracy and loss, averaged over
    ``seeds`` seeds from ``seed`` on, and each seed's under ``per_seed``;
    ``loss_difference`` is bfloat16's mean test loss minus float32's (and
    ``stochastic_loss_difference`` the stochastic one's)."""
    data = np.load(Path(__file__).parent / "lab" / "data" / "digits.npz")
    x = torch.tensor(data["X"], dtype=torch.float32) / 16.0
    y = torch.tensor(data["y"], dtype=torch.int64)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in STATE_VARIANTS}
    for s in range(seed, seed + seeds):
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(s))
        train, test = order[:1400], order[1400:]
        for name, (dtype, stochastic) in STATE_VARIANTS.items():
            torch.manual_seed(s)
            model = torch.nn.Sequential(
                torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)
            )
            opt = optiscope.Adam(
                model.parameters(),
                lr=1e-3,
                state_dtype=dtype,
                stochastic_rounding=stochastic,
                rounding_seed=s if stochastic else None,
            )
            batches = torch.Generator().manual_seed(s)
            for _ in range(steps):
                batch = train[torch.randint(len(train), (64,), generator=batches)]
                opt.zero_grad()
                F.cross_entropy(model(x[batch]), y[batch]).backward()
                opt.step()
            with torch.no_grad():
                logits = model(x[test])
                runs[name].append(
                    {
                        "seed": s,
                        "test_accuracy": (logits.argmax(1) == y[test])
                        .float()
                        .mean()
                        .item(),
                        "test_loss": F.cross_entropy(logits, y[test]).item(),
                    }
                )
    results: dict[str, Any] = {"steps": steps, "seeds": seeds}
    for name, per_seed in runs.items():
        results[name] = {
            key: statistics.mean(r[key] for r in per_seed)
            for key in ("test_accuracy", "test_loss")
        }
        results[name]["per_seed"] = per_seed
    float32_loss = results["float32"]["test_loss"]
    results["loss_difference"] = results["bfloat16"]["test_loss"] - float32_loss
    results["stochastic_loss_difference"] = (
        results["bfloat16 stochastic"]["test_loss"] - float32_loss
    )
    return results


# -- the command ------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    import numba

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return {
        "cpu": cpu,
        "avx512": " avx512f " in flags,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "numba": numba.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "date": date.today().isoformat(),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    rounds = 3 if quick else args.rounds
    sizes = [1 << 16] if quick else [10_000_000, 50_000_000]
    many, count = ((1 << 16), 20) if quick else (10_000_000, 200)
    threads = [1, 2] if not quick else [min(2, torch.get_num_threads())]
    default_threads = torch.get_num_threads()
    cases = [
        Case(rule, n, 1, t)
        for n in sizes
        for t in threads
        for rule in BYTES_PER_ELEMENT
    ]
    cases += [Case(rule, many, count, t) for t in threads for rule in BYTES_PER_ELEMENT]
    report: dict[str, Any] = {"machine": machine(), "rounds": rounds, "quick": quick}
    # Load the CPU kernels here, before any timing: a first step would load them
    # on a thread, whose imports and compiles hold the GIL from the variants.
    loading.backend()
    with _progress() as progress:
        task = progress.add_task("bench", total=len(cases) + len(threads) * 4 + 3)
        report["bandwidth"] = []
        for t in threads:
            report["bandwidth"].append(bench_bandwidth(sizes[0], t, rounds))
            progress.advance(task)
        report["optimizers"] = []
        for case in cases:
            progress.update(
                task,
                description=f"{case.rule} {case.numel:,}×{case.tensors} {case.threads}t",
            )
            report["optimizers"].append(bench_case(case, rounds))
            progress.advance(task)
        report["probes"] = []
        # A few percent between two large times: more rounds than the rest.
        probe_rounds = rounds if quick else max(rounds, 21)
        for rule in ("Adam", "Momentum"):
            for t in threads:
                progress.update(task, description=f"{rule} probes on/off {t}t")
                report["probes"].append(bench_probes(rule, sizes[0], t, probe_rounds))
                progress.advance(task)
        report["dropout"] = []
        for t in threads:
            progress.update(task, description=f"dropout {t}t")
            report["dropout"].append(bench_dropout(128 if quick else 4096, t, rounds))
            progress.advance(task)
        torch.set_num_threads(default_threads)
        progress.update(task, description="first step (fresh process)")
        report["first_step"] = None if quick else first_step_latency()
        progress.advance(task)
        progress.update(task, description="bfloat16 moments, speed")
        numel = 1 << 16 if quick else 10_000_000
        report["state_dtype_speed"] = bench_state_dtype(numel, 1, max(rounds, 3))
        progress.advance(task)
        progress.update(task, description="state_dtype on digits")
        report["state_dtype"] = state_dtype_accuracy(
            20 if quick else 1500, seeds=1 if quick else 3
        )
        progress.advance(task)
    report["targets"] = targets(report)
    return report


class _NoProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, *args: Any, **kwargs: Any) -> int:
        return 0

    def advance(self, *args: Any, **kwargs: Any) -> None:
        return None

    def update(self, *args: Any, **kwargs: Any) -> None:
        return None


def _progress():
    try:
        from rich.progress import Progress
    except ImportError:
        return _NoProgress()
    return Progress(transient=True)


# -- the targets of issue 14 ---------------------------------------------------------------
def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each performance target against this run's measurement: the ratio (median,
    min and max over rounds where the section has them), the bound, and whether
    the median meets it. A section the run skipped (``--quick``) yields nothing."""
    found: list[dict[str, Any]] = []

    def add(name: str, ratio: dict[str, float], bound: float, at_least: bool) -> None:
        met = ratio["median"] >= bound if at_least else ratio["median"] <= bound
        sign = "≥" if at_least else "≤"
        found.append(
            {"target": name, "bound": f"{sign} {bound:g}", **ratio, "met": met}
        )

    for row in report.get("optimizers", []):
        if row["threads"] == 2:
            name = f"{row['rule']} {row['numel']:,}×{row['tensors']}, 2 threads vs torch fused"
            add(name, row["speedup_vs_fused_per_round"], 1.0, True)
    for d in report.get("dropout", []):
        shape = "×".join(map(str, d["shape"]))
        where = f"{shape}, p={d['p']}, {d['threads']} thread(s)"
        add(
            f"dropout inplace=True fwd+bwd vs torch F.dropout fwd+bwd, {where}",
            d["speedup_inplace_per_round"],
            20.0,
            True,
        )
        add(
            f"dropout forward (not in place) vs x.clone(), {where}",
            d["forward_vs_clone_per_round"],
            1.0,
            False,
        )
        saved = float(d["saved_bytes"]["optiscope inplace"])
        add(
            f"dropout inplace=True, bytes saved for backward, {where}",
            {"median": saved, "min": saved, "max": saved},
            0.0,
            False,
        )
    speed = report.get("state_dtype_speed")
    if speed:
        bf16 = speed["optiscope bfloat16"]
        add(
            f"Adam, bfloat16 moments, {speed['numel']:,} float32 elements, "
            f"{speed['threads']} thread vs torch fused (float32 state)",
            {
                "median": bf16["speedup_vs_fused"],
                "min": bf16["speedup_min"],
                "max": bf16["speedup_max"],
            },
            1.3,
            True,
        )
    first = report.get("first_step")
    if first:
        runs = first["runs"]
        for key, bound in (("warm_cache_s", 0.3), ("cold_cache_s", 2.0)):
            extra = [
                a - b for a, b in zip(runs[key], runs["torch_fused_s"], strict=True)
            ]
            label = "warm" if key == "warm_cache_s" else "empty"
            add(
                f"first Adam step, {label} numba cache, seconds over torch fused's",
                {
                    "median": statistics.median(extra),
                    "min": min(extra),
                    "max": max(extra),
                },
                bound,
                False,
            )
    return found


def render(report: dict[str, Any]) -> str:
    """Markdown tables of a report (what BENCHMARKS.md shows)."""

    def ms(t: dict) -> str:
        if "min_s" not in t:
            return f"{t['median_s'] * 1e3:.2f}"
        return (
            f"{t['median_s'] * 1e3:.2f} ({t['min_s'] * 1e3:.2f}–{t['max_s'] * 1e3:.2f})"
        )

    m = report["machine"]
    lines = [
        f"Machine: {m['cpu']} ({m['cores']} cores, AVX-512: {m['avx512']}), "
        f"torch {m['torch']}, numba {m['numba']}, numpy {m['numpy']}, "
        f"{m['date']}; median (min–max) of {report['rounds']} interleaved rounds.",
        "",
        "| target | bound | median | min–max | met |",
        "|---|---|---|---|---|",
    ]
    for t in report.get("targets", []):
        lines.append(
            f"| {t['target']} | {t['bound']} | {t['median']:.3g} | "
            f"{t['min']:.3g}–{t['max']:.3g} | {'yes' if t['met'] else '**no**'} |"
        )
    lines += [
        "",
        "| threads | triad GB/s | copy GB/s |",
        "|---|---|---|",
    ]
    for b in report["bandwidth"]:
        lines.append(
            f"| {b['threads']} | {b['triad_gb_per_s']:.1f} | {b['copy_gb_per_s']:.1f} |"
        )
    lines += [
        "",
        "| rule | elements × tensors | threads | variant | ms | GB/s | % triad |"
        " ours vs it |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["optimizers"]:
        ours = row["variants"]["optiscope"]["median_s"]
        for name, t in row["variants"].items():
            vs = "" if name == "optiscope" else f"{t['median_s'] / ours:.2f}×"
            lines.append(
                f"| {row['rule']} | {row['numel']:,} × {row['tensors']} | "
                f"{row['threads']} | {name} | {ms(t)} | {t['gb_per_s']:.1f} | "
                f"{t['percent_of_triad']:.0f}% | {vs} |"
            )
    lines += [
        "",
        "| step, probes | threads | off ms | every step ms | overhead "
        "| every=10 ms | overhead |",
    ]
    lines.append("|---|---|---|---|---|---|---|")
    for r in report.get("probes", []):
        t = r["timings"]
        lines.append(
            f"| {r['rule']} {r['numel']:,} fp32 | {r['threads']} | {ms(t['probes off'])} | "
            f"{ms(t['probes on'])} | {100 * r['overhead']:+.1f}% | "
            f"{ms(t['every=10'])} | {100 * r['overhead_every_10']:+.1f}% |"
        )
    lines += ["", "| dropout | threads | variant | ms | saved for backward |"]
    lines.append("|---|---|---|---|---|")
    for d in report["dropout"]:
        shape = "×".join(map(str, d["shape"]))
        for name, t in d["timings"].items():
            owner = "optiscope inplace" if "inplace" in name else name.split()[0]
            saved = f"{d['saved_bytes'][owner]:,} B" if "backward" in name else ""
            lines.append(
                f"| {shape} p={d['p']} | {d['threads']} | {name} | {ms(t)} | {saved} |"
            )
        lines.append(
            f"| | {d['threads']} | **speedup fwd+bwd** | {d['speedup']:.1f}× | |"
        )
        lines.append(
            f"| | {d['threads']} | **speedup fwd+bwd, in place** | "
            f"{d['speedup_inplace']:.1f}× | |"
        )
        lines.append(
            f"| | {d['threads']} | **forward / clone** | "
            f"{d['forward_vs_clone']:.2f} | |"
        )
    first = report["first_step"]
    if first is not None:
        lines += [
            "",
            "First Adam step in a fresh process, from before `import torch` "
            f"(median of {len(first['runs']['torch_fused_s'])} processes each): "
            f"ours {first['warm_cache_s']:.2f} s with the numba cache filled, "
            f"{first['cold_cache_s']:.2f} s with it empty (the whole cold process "
            f"{first['cold_process_s']:.2f} s, start to exit); torch fused "
            f"{first['torch_fused_s']:.2f} s.",
        ]
    speed = report["state_dtype_speed"]
    lines += [
        "",
        f"| Adam, {speed['numel']:,} float32 elements, {speed['threads']} thread "
        "| ms | vs torch fused, per round |",
        "|---|---|---|",
    ]
    for name, t in speed.items():
        if isinstance(t, dict):
            lines.append(
                f"| {name} | {ms(t)} | {t['speedup_vs_fused']:.2f}× "
                f"({t['speedup_min']:.2f}–{t['speedup_max']:.2f}) |"
            )
    s = report["state_dtype"]
    lines += [
        "",
        f"Moments on digits (MLP 64-128-10, Adam lr 1e-3, {s['steps']} steps, "
        f"mean of {s['seeds']} seed(s)):",
        "",
        "| moments | test accuracy | test loss |",
        "|---|---|---|",
    ]
    for name in STATE_VARIANTS:
        lines.append(
            f"| {name} | {s[name]['test_accuracy']:.4f} | {s[name]['test_loss']:.4f} |"
        )
    return "\n".join(lines)


def handle(args: argparse.Namespace) -> int:
    report = run(args)
    args.out.write_text(json.dumps(report, indent=2))
    text = render(report)
    try:
        from rich.console import Console
        from rich.markdown import Markdown

        Console().print(Markdown(text))
    except ImportError:
        print(text)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def add_bench_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="time our fused steps and dropout against torch, write bench.json",
        description="Time optiscope's fused steps and dropout against torch's "
        "for-loop, foreach and fused paths, interleaved round-robin in one process; "
        "print a table and write bench.json.",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("bench.json"),
        metavar="FILE",
        help="where to write the JSON report (default: ./bench.json)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=7,
        metavar="N",
        help="interleaved timing rounds per case; the median and min–max are "
        "reported (default: 7)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 2^16 elements, 3 rounds, no fresh-process latency (seconds)",
    )
    parser.set_defaults(handler=handle, parser=parser)
