"""One-shot check of the Triton kernels on a CUDA GPU: correctness, then speed.

Run from the repository root on a machine with a GPU (about a minute on an H100):

    python benchmarks/gpu_check.py

Correctness (exit status 1 if any check fails):

* Adam/AdamW/amsgrad/maximize: our kernel against ``torch.optim.Adam(fused=True)``
  and against :func:`optiscope.adam_step` on CPU; bfloat16 parameters too;
* float64 Adam against the NumPy reference; Momentum against ``momentum_step``;
* the probe rows of Adam and Momentum (device partial rows, their fold, the
  step histogram) against rows recomputed on the CPU from snapshots;
* the dropout mask, bit for bit, against the NumPy Philox stream
  (``philox.keep_mask``), and backward against the stored-mask gradient.

Speed, at 100M float32 elements, candidates interleaved round by round, median
of the rounds, timed with CUDA events:

* our Adam against ``torch.optim.Adam(fused=True).step()`` and against a
  device-to-device copy (``dst.copy_(src)``): effective bandwidth, with Adam
  moving 28 bytes per element (4 loads, 3 stores) and the copy 8;
* our dropout forward + backward against ``torch.native_dropout`` and its
  backward, and the bytes each saves between the two (our mask is regenerated).

Targets: Adam >= 1.0x torch fused and >= 85% of copy bandwidth; dropout >= 1.0x
native_dropout with 0 saved bytes. Prints a table; writes everything to
``$OUT/gpu_bench.json`` when ``OUT`` is set. The compiled kernels can also be
run through the unit tests: ``TRITON_INTERPRET=0 python -m pytest
tests/test_triton_kernels.py``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

if importlib.util.find_spec("optiscope") is None:  # a checkout, not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from optiscope import adam_step, momentum_step, reference, rules
from optiscope.kernels import philox, rows
from optiscope.kernels.records import AdamBatch, AdamHyper, MomentumBatch, MomentumHyper

NUMEL = 100_000_000  # elements per benchmark tensor (float32: 400 MB each)
ROUNDS = 9  # interleaved timing rounds; the median is reported
ITERS = 5  # calls per timed round
ADAM_BYTES = 28  # per element: param, grad, exp_avg, exp_avg_sq in; 3 out
COPY_BYTES = 8
DROPOUT_P = 0.1
DEVICE = "cuda"  # the correctness checks also run on "cpu" under TRITON_INTERPRET=1
DROPOUT_SIZES = [1, 7, 2049, 1 << 20, (1 << 22) + 3]


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("gpu_check: unset TRITON_INTERPRET; this script times compiled kernels")
        return 2
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible; this script needs a GPU (H100)")
        return 2
    try:
        from optiscope.kernels import triton as tk
    except ImportError as error:
        print(f"gpu_check: cannot import the Triton kernels ({error})")
        return 2

    started = time.perf_counter()
    device = torch.cuda.get_device_name()
    print(f"gpu_check on {device}, torch {torch.__version__}")
    checks = run_checks(tk)
    for name, ok, detail in checks:
        print(f"  [{'ok' if ok else 'FAIL'}] {name}: {detail}")
    timings = run_timings(tk)
    sweep = run_block_sweep(tk)
    results = summarize(device, checks, timings, sweep)
    results["seconds"] = round(time.perf_counter() - started, 1)
    print(render(results))
    out = os.environ.get("OUT")
    if out:
        path = Path(out) / "gpu_bench.json"
        path.write_text(json.dumps(results, indent=2))
        print(f"wrote {path}")
    return 0 if results["correct"] else 1


# --- correctness -------------------------------------------------------------

ADAM_OPTIONS = {
    "adam": dict(lr=1e-2, weight_decay=0.0, decoupled_weight_decay=False),
    "adam-l2-amsgrad": dict(
        lr=1e-2, beta2=0.99, eps=1e-6, weight_decay=0.1, amsgrad=True
    ),
    "adam-maximize": dict(lr=1e-2, maximize=True),
    "adamw": dict(lr=1e-2, weight_decay=1e-2, decoupled_weight_decay=True),
    "adamw-amsgrad": dict(
        lr=1e-2, weight_decay=0.3, decoupled_weight_decay=True, amsgrad=True
    ),
}
# No empty tensor: the dispatcher never hands one to a backend.
SHAPES = [(1000, 257), (33,), (), (4097,)]


def adam_kwargs(**options) -> dict:
    kwargs = dict(
        lr=1e-3,
        beta1=0.9,
        beta2=0.999,
        eps=1e-8,
        weight_decay=0.0,
        decoupled_weight_decay=False,
        amsgrad=False,
        maximize=False,
        bias_correction=True,
    )
    kwargs.update(options)
    return kwargs


def adam_call(tk, params, grads, states, steps, kw, stats=None) -> None:
    """One call of the backend as the dispatcher makes it: records, and bias
    corrections from :func:`optiscope.rules.bias_corrections`."""
    corrections = [
        rules.bias_corrections(kw["beta1"], kw["beta2"], t, kw["bias_correction"])
        for t in steps
    ]
    vmax = states[2] if kw["amsgrad"] else None
    batch = AdamBatch(params, grads, states[0], states[1], vmax, corrections)
    tk.adam_(batch, AdamHyper(**kw), stats)


def fresh_stats(count: int, layout: tuple[str, ...]) -> np.ndarray:
    """Probe rows as the dispatcher passes them: zeros, an empty step range."""
    stats = np.zeros((count, len(layout)))
    if "step_min" in layout:
        stats[:, layout.index("step_min")] = math.inf
        stats[:, layout.index("step_max")] = -math.inf
    return stats


def torch_adam(params, kw) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if kw["decoupled_weight_decay"] else torch.optim.Adam
    return cls(
        params,
        lr=kw["lr"],
        betas=(kw["beta1"], kw["beta2"]),
        eps=kw["eps"],
        weight_decay=kw["weight_decay"],
        amsgrad=kw["amsgrad"],
        maximize=kw["maximize"],
        fused=True,
    )


def check_adam_vs_torch(tk, name, options, dtype) -> tuple[bool, str]:
    """Three steps on a list of tensors: ours, torch fused, and adam_step on CPU."""
    kw = adam_kwargs(**options)
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
    ours = [t.to(DEVICE, copy=True) for t in start]
    theirs = [torch.nn.Parameter(t.to(DEVICE, copy=True)) for t in start]
    cpu = [t.clone() for t in start]
    states = [[torch.zeros_like(t) for t in ours] for _ in range(3)]
    cpu_states = [[torch.zeros_like(t) for t in cpu] for _ in range(3)]
    opt = torch_adam(theirs, kw)
    for t in range(1, 4):
        grads = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
        moved = [g.to(DEVICE, copy=True) for g in grads]
        adam_call(tk, ours, moved, states, [t] * len(ours), kw)
        for p, g in zip(theirs, grads, strict=True):
            p.grad = g.to(DEVICE, copy=True)
        opt.step()
        for i, g in enumerate(grads):
            adam_step(
                cpu[i],
                g,
                cpu_states[0][i],
                cpu_states[1][i],
                cpu_states[2][i] if kw["amsgrad"] else None,
                step=t,
                **kw,
            )
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else {}
    worst_torch = worst_cpu = 0.0
    for a, b, c in zip(ours, theirs, cpu, strict=True):
        a, b = a.cpu(), b.detach().cpu()
        if a.numel():
            worst_torch = max(worst_torch, (a.double() - b.double()).abs().max().item())
            worst_cpu = max(worst_cpu, (a.double() - c.double()).abs().max().item())
        try:
            torch.testing.assert_close(a, b, **tol)
            torch.testing.assert_close(a, c, **tol)
        except AssertionError as error:
            return False, f"{name} {dtype}: {str(error).splitlines()[0]}"
    return True, f"max |ours-fused| {worst_torch:.2e}, |ours-cpu| {worst_cpu:.2e}"


def check_adam_float64(tk) -> tuple[bool, str]:
    kw = adam_kwargs(lr=1e-2, weight_decay=0.1, amsgrad=True)
    gen = np.random.default_rng(0)
    theta = gen.standard_normal(10_001)
    m, v, vmax = np.zeros_like(theta), np.zeros_like(theta), None
    p = torch.from_numpy(theta).to(DEVICE, copy=True)
    states = [torch.zeros_like(p) for _ in range(3)]
    for t in range(1, 4):
        g = gen.standard_normal(theta.shape)
        grad = torch.from_numpy(g).to(DEVICE, copy=True)
        adam_call(tk, [p], [grad], [[s] for s in states], [t], kw)
        theta, m, v, vmax = reference.adam_step(theta, m, v, g, t=t, v_max=vmax, **kw)
    err = np.abs(p.cpu().numpy() - theta).max()
    return bool(err <= 1e-12), f"max |ours-reference| {err:.1e}"


def check_momentum(tk) -> tuple[bool, str]:
    kw = dict(lr=0.03, momentum=0.5, weight_decay=0.1, maximize=True)
    gen = torch.Generator().manual_seed(1)
    cpu = [torch.randn(s, generator=gen) for s in SHAPES]
    ours = [t.to(DEVICE, copy=True) for t in cpu]
    bufs, cpu_bufs = (
        [torch.zeros_like(t) for t in ours],
        [torch.zeros_like(t) for t in cpu],
    )
    for _ in range(3):
        grads = [torch.randn(s, generator=gen) for s in SHAPES]
        moved = [g.to(DEVICE, copy=True) for g in grads]
        tk.momentum_(MomentumBatch(ours, moved, bufs), MomentumHyper(**kw), None)
        for p, g, b in zip(cpu, grads, cpu_bufs, strict=True):
            momentum_step(p, g, b, **kw)
    try:
        for a, b in zip(ours + bufs, cpu + cpu_bufs, strict=True):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-6, atol=1e-7)
    except AssertionError as error:
        return False, str(error).splitlines()[0]
    return True, "equal to momentum_step to 1e-6"


def snapshot_row(before, after, grad, extra: list[float]) -> np.ndarray:
    """rows.COMMON from snapshots, in float64 NumPy, then ``extra``."""
    g, theta = grad.cpu().double().numpy(), after.cpu().double().numpy()
    update = theta - before.cpu().double().numpy()
    common = [g.size, (g * g).sum(), (update * update).sum(), (theta * theta).sum()]
    return np.array([*common, (~np.isfinite(g)).sum(), *extra], dtype=np.float64)


def adam_snapshot_extra(v_used, lr: float, eps: float, c2: float) -> list[float]:
    """Adam's columns after rows.COMMON, by their definitions in rows.py."""
    root = np.sqrt(v_used.cpu().double().numpy().reshape(-1) / c2)
    step = lr / (root + eps)
    sample = step[:: rows.hist_stride(step.size)].tolist()
    bins = [rows.HIST_BINS - 1 if s == math.inf else rows.octave_bin(s) for s in sample]
    counts = np.bincount(bins, minlength=rows.HIST_BINS)
    return [(root < eps).sum(), step.min(), step.max(), *counts]


def check_probes(tk) -> tuple[bool, str]:
    """One probed step of Adam (amsgrad, L2) and of Momentum on float32 tensors
    of many programs: counts, extrema and histogram exactly, sums to 1e-12."""
    gen = torch.Generator().manual_seed(2)
    shapes = [(3000, 1001), (33,), (), (70_001,)]
    kw = adam_kwargs(lr=1e-2, weight_decay=0.1, amsgrad=True)
    params = [torch.randn(s, generator=gen).to(DEVICE) for s in shapes]
    grads = [torch.randn(s, generator=gen).to(DEVICE) for s in shapes]
    grads[1][:5] = 0.0
    states = [[torch.rand_like(p) for p in params] for _ in range(3)]
    before = [p.clone() for p in params]
    stats = fresh_stats(len(shapes), rows.ADAM)
    adam_call(tk, params, grads, states, [3] * len(shapes), kw, stats)
    c2 = rules.bias_corrections(kw["beta1"], kw["beta2"], 3).c2
    for i in range(len(shapes)):
        extra = adam_snapshot_extra(states[2][i], kw["lr"], kw["eps"], c2)
        want = snapshot_row(before[i], params[i], grads[i], extra)
        if not rows_agree(stats[i], want, rows.ADAM):
            return False, f"adam row {i}: {stats[i][:8]} != {want[:8]}"
    mkw = dict(lr=0.03, momentum=0.9, weight_decay=0.0, maximize=False)
    bufs = [torch.randn(s, generator=gen).to(DEVICE) for s in shapes]
    m_prev, before = [b.clone() for b in bufs], [p.clone() for p in params]
    stats = fresh_stats(len(shapes), rows.MOMENTUM)
    batch = MomentumBatch(params, grads, bufs)
    tk.momentum_(batch, MomentumHyper(**mkw), stats)
    for i in range(len(shapes)):
        g, m = grads[i].cpu().double(), bufs[i].cpu().double()
        extra = [float((g * m_prev[i].cpu().double()).sum()), float((m * m).sum())]
        want = snapshot_row(before[i], params[i], grads[i], extra)
        if not rows_agree(stats[i], want, rows.MOMENTUM):
            return False, f"momentum row {i}: {stats[i]} != {want}"
    return True, f"{2 * len(shapes)} rows equal to the snapshot rows"


def rows_agree(found: np.ndarray, want: np.ndarray, layout: tuple[str, ...]) -> bool:
    sums = np.array([name.startswith("sum_") for name in layout])
    close = np.allclose(found[sums], want[sums], rtol=1e-12, atol=0.0)
    return bool(close and np.array_equal(found[~sums], want[~sums]))


def check_dropout(tk) -> tuple[bool, str]:
    cases = 0
    for seed, offset in [
        (0, 0),
        (7, 3),
        (2**32 + 1, 2**33 + 5),
        (2**63 - 1, 2**64 - 1),
    ]:
        for numel in DROPOUT_SIZES:
            for p in (0.1, 0.5):
                y = tk.dropout_forward(
                    torch.ones(numel, device=DEVICE), p, seed, offset
                )
                keep = philox.keep_mask(numel, p, seed, offset)
                if not np.array_equal(y.cpu().numpy() != 0, keep):
                    return False, f"mask differs: seed={seed} offset={offset} n={numel}"
                cases += 1
    p, seed, offset = 0.3, 123, 9
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        x = torch.randn(3, 100_003, device=DEVICE, dtype=dtype)
        keep = torch.from_numpy(philox.keep_mask(x.numel(), p, seed, offset))
        keep = keep.reshape(x.shape).to(DEVICE, copy=True)
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        gamma = torch.tensor(1 / (1 - p), dtype=compute, device=DEVICE)
        expected = torch.where(keep, (x.to(compute) * gamma).to(dtype), 0)
        if not torch.equal(tk.dropout_forward(x, p, seed, offset), expected):
            return False, f"forward values differ for {dtype}"
        if not torch.equal(tk.dropout_backward(x, p, seed, offset), expected):
            return False, f"backward differs from the stored-mask gradient for {dtype}"
    return True, f"mask bitwise equal to NumPy Philox in {cases} cases; 4 dtypes"


def run_checks(tk) -> list[tuple[str, bool, str]]:
    checks = []
    for name, options in ADAM_OPTIONS.items():
        for dtype in (torch.float32, torch.bfloat16):
            ok, detail = check_adam_vs_torch(tk, name, options, dtype)
            checks.append((f"{name} {str(dtype).removeprefix('torch.')}", ok, detail))
    checks.append(("adam float64 vs reference", *check_adam_float64(tk)))
    checks.append(("momentum vs momentum_step", *check_momentum(tk)))
    checks.append(("probe rows vs snapshots", *check_probes(tk)))
    checks.append(("dropout vs philox.keep_mask", *check_dropout(tk)))
    return checks


# --- timing ------------------------------------------------------------------


def time_interleaved(candidates: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Median milliseconds per call, the candidates taking turns in every round."""
    for fn in candidates.values():  # warm up: compile, allocate, fault in
        fn()
    torch.cuda.synchronize()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(ROUNDS):
        for name, fn in candidates.items():
            begin = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(ITERS):
                fn()
            end.record()
            end.synchronize()
            samples[name].append(begin.elapsed_time(end) / ITERS)
    return {name: statistics.median(ms) for name, ms in samples.items()}


def adam_candidates(tk, n: int) -> dict[str, Callable[[], object]]:
    kw = adam_kwargs()

    def tensors():
        return [torch.rand(n, device=DEVICE) for _ in range(4)]

    p, g, m, v = tensors()
    steps = [1]

    def ours():
        steps[0] += 1
        adam_call(tk, [p], [g], [[m], [v]], steps, kw)

    def ours_probed():  # the probe's sums in the same kernel, its rows to the host
        steps[0] += 1
        adam_call(tk, [p], [g], [[m], [v]], steps, kw, fresh_stats(1, rows.ADAM))

    q = torch.nn.Parameter(torch.rand(n, device=DEVICE))
    q.grad = torch.rand(n, device=DEVICE)
    fused = torch_adam([q], kw)
    src, dst = torch.rand(n, device=DEVICE), torch.empty(n, device=DEVICE)
    return {
        "ours_adam": ours,
        "ours_adam_probed": ours_probed,
        "torch_fused_adam": fused.step,
        "copy": lambda: dst.copy_(src),
    }


def dropout_candidates(tk, n: int) -> tuple[dict[str, Callable[[], object]], dict]:
    x = torch.randn(n, device=DEVICE)
    grad_y = torch.randn(n, device=DEVICE)
    scale = 1.0 / (1.0 - DROPOUT_P)
    saved = {}

    def ours():
        tk.dropout_forward(x, DROPOUT_P, 1234, 0)
        return tk.dropout_backward(grad_y, DROPOUT_P, 1234, 0)

    def native():
        _, mask = torch.native_dropout(x, DROPOUT_P, True)
        saved["native_dropout"] = mask.numel() * mask.element_size()
        return torch.ops.aten.native_dropout_backward(grad_y, mask, scale)

    saved["ours_dropout"] = 0  # backward regenerates the mask from (seed, offset)
    return {"ours_dropout": ours, "native_dropout": native}, saved


def run_timings(tk) -> dict:
    n = NUMEL
    adam = time_interleaved(adam_candidates(tk, n))
    torch.cuda.empty_cache()
    dropout_fns, saved = dropout_candidates(tk, n)
    dropout = time_interleaved(dropout_fns)
    torch.cuda.empty_cache()
    return dict(numel=n, adam_ms=adam, dropout_ms=dropout, saved_bytes=saved)


def run_block_sweep(tk) -> list[dict]:
    """Our Adam with other block sizes and warp counts, to tune the defaults."""
    common = tk.common  # where the kernels read their launch parameters
    default = (common.OPTIMIZER_BLOCK, common.OPTIMIZER_WARPS)
    candidates = {}
    n = NUMEL // 4
    for block, warps in [(1024, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 16)]:
        calls = adam_candidates(tk, n)["ours_adam"]

        def run(block=block, warps=warps, calls=calls):
            common.OPTIMIZER_BLOCK, common.OPTIMIZER_WARPS = block, warps
            calls()

        candidates[f"{block}x{warps}"] = run
    try:
        ms = time_interleaved(candidates)
    finally:
        common.OPTIMIZER_BLOCK, common.OPTIMIZER_WARPS = default
    torch.cuda.empty_cache()
    return [
        dict(config=name, ms=t, gbps=ADAM_BYTES * n / t / 1e6) for name, t in ms.items()
    ]


# --- report ------------------------------------------------------------------


def summarize(device: str, checks, timings: dict, sweep: list[dict]) -> dict:
    """Speedups, bandwidths and targets from the raw timings (milliseconds)."""
    n = timings["numel"]
    adam, dropout = timings["adam_ms"], timings["dropout_ms"]
    adam_gbps = ADAM_BYTES * n / adam["ours_adam"] / 1e6
    copy_gbps = COPY_BYTES * n / adam["copy"] / 1e6
    metrics = {
        "adam_speedup_vs_fused": adam["torch_fused_adam"] / adam["ours_adam"],
        "adam_fraction_of_copy_bandwidth": adam_gbps / copy_gbps,
        "dropout_speedup_vs_native": dropout["native_dropout"]
        / dropout["ours_dropout"],
        "dropout_saved_bytes": timings["saved_bytes"]["ours_dropout"],
        "adam_probe_overhead": adam["ours_adam_probed"] / adam["ours_adam"] - 1,
    }
    targets = {
        "adam_speedup_vs_fused": metrics["adam_speedup_vs_fused"] >= 1.0,
        "adam_fraction_of_copy_bandwidth": metrics["adam_fraction_of_copy_bandwidth"]
        >= 0.85,
        "dropout_speedup_vs_native": metrics["dropout_speedup_vs_native"] >= 1.0,
        "dropout_saved_bytes": metrics["dropout_saved_bytes"] == 0,
        "adam_probe_overhead": metrics["adam_probe_overhead"] <= 0.05,
    }
    return dict(
        device=device,
        correct=all(ok for _, ok, _ in checks),
        checks=[dict(name=name, ok=ok, detail=d) for name, ok, d in checks],
        timings=timings,
        bandwidth_gbps=dict(ours_adam=adam_gbps, copy=copy_gbps),
        metrics=metrics,
        targets_met=targets,
        block_sweep=sweep,
    )


def render(results: dict) -> str:
    t = results["timings"]
    rows = [("candidate", "ms (median)", "GB/s", "saved bytes")]
    bw = results["bandwidth_gbps"]
    for name, ms in t["adam_ms"].items():
        gbps = bw.get(name, ADAM_BYTES * t["numel"] / ms / 1e6)
        rows.append((name, f"{ms:.3f}", f"{gbps:.0f}", ""))
    for name, ms in t["dropout_ms"].items():
        rows.append((name, f"{ms:.3f}", "", str(t["saved_bytes"].get(name, "?"))))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows
    ]
    lines.append("")
    for key, value in results["metrics"].items():
        met = "met" if results["targets_met"][key] else "MISSED"
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        lines.append(f"{key}: {shown} ({met})")
    best = min(results["block_sweep"], key=lambda r: r["ms"], default=None)
    if best is not None and not math.isnan(best["ms"]):
        lines.append(
            f"best adam block x warps: {best['config']} ({best['gbps']:.0f} GB/s)"
        )
    lines.append(f"correct: {results['correct']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
