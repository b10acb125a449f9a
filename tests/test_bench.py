"""``optiscope bench --quick`` runs end to end and writes its report."""

import json

from optiscope.bench import first_step_latency
from optiscope.cli import main


def test_bench_quick_writes_every_section(tmp_path) -> None:
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    sections = {"machine", "bandwidth", "optimizers", "probes", "dropout"}
    assert sections | {"state_dtype"} <= set(report)
    assert {r["rule"] for r in report["probes"]} == {"Adam", "Momentum"}
    for r in report["probes"]:
        assert set(r["timings"]) == {"probes off", "probes on", "every=10"}
    variants = set(report["optimizers"][0]["variants"])
    assert variants == {"torch for-loop", "torch foreach", "torch fused", "optiscope"}
    dropout = report["dropout"][0]
    assert dropout["saved_bytes"]["optiscope"] == 0
    assert dropout["saved_bytes"]["optiscope inplace"] == 0
    assert dropout["saved_bytes"]["torch"] > 0
    assert {"clone", "optiscope inplace forward", "optiscope inplace backward"} <= set(
        dropout["timings"]
    )
    for ratio in ("speedup", "speedup_inplace", "forward_vs_clone"):
        assert dropout[ratio] > 0


def test_first_step_latency_times_ours_cold_and_warm_and_torch_fused() -> None:
    times = first_step_latency(rounds=1)
    medians = ("cold_cache_s", "cold_process_s", "warm_cache_s", "torch_fused_s")
    for key in medians:
        assert times[key] == times["runs"][key][0] > 0
    assert times["cold_process_s"] > times["cold_cache_s"]


def test_targets_say_met_or_not_from_the_median() -> None:
    from optiscope.bench import targets

    def row(rule: str, median: float) -> dict:
        ratio = {"median": median, "min": median - 0.1, "max": median + 0.1}
        return {
            "rule": rule,
            "numel": 10,
            "tensors": 1,
            "threads": 2,
            "speedup_vs_fused_per_round": ratio,
        }

    one_thread = {**row("Adam", 0.5), "threads": 1}  # no target at 1 thread
    report = {"optimizers": [row("Adam", 1.02), row("Momentum", 0.97), one_thread]}
    report["first_step"] = {
        "runs": {
            "warm_cache_s": [2.1, 2.2, 2.9],
            "cold_cache_s": [5.0, 2.3, 2.4],
            "torch_fused_s": [2.0, 2.0, 2.0],
        }
    }
    found = {t["target"]: t for t in targets(report)}
    assert [t["met"] for t in found.values()] == [True, False, True, True]
    warm = found["first Adam step, warm numba cache, seconds over torch fused's"]
    assert abs(warm["median"] - 0.2) < 1e-12 and abs(warm["max"] - 0.9) < 1e-12
    cold = found["first Adam step, empty numba cache, seconds over torch fused's"]
    assert abs(cold["max"] - 3.0) < 1e-12 and cold["met"]  # the median decides


def test_bench_state_dtype_times_every_variant() -> None:
    """Each variant's median and per-round speedup over torch fused; torch
    fused's own speedup is 1 in every round."""
    from optiscope.bench import bench_state_dtype

    result = bench_state_dtype(numel=10_000, threads=1, rounds=3)
    variants = {k for k, v in result.items() if isinstance(v, dict)}
    assert variants == {
        "torch fused",
        "optiscope float32",
        "optiscope bfloat16",
        "optiscope bfloat16 stochastic",
    }
    fused = result["torch fused"]
    assert fused["speedup_min"] == fused["speedup_max"] == 1.0
    for name in variants:
        t = result[name]
        assert 0 < t["min_s"] <= t["median_s"] <= t["max_s"]
        assert t["speedup_min"] <= t["speedup_vs_fused"] <= t["speedup_max"]


def test_state_dtype_accuracy_reports_three_variants() -> None:
    """Three kinds of moments, each averaged over the seeds, with each seed's run."""
    from optiscope.bench import state_dtype_accuracy

    result = state_dtype_accuracy(steps=5, seed=0, seeds=2)
    for name in ("float32", "bfloat16", "bfloat16 stochastic"):
        runs = result[name]["per_seed"]
        assert [r["seed"] for r in runs] == [0, 1]
        mean = sum(r["test_loss"] for r in runs) / 2
        assert abs(result[name]["test_loss"] - mean) < 1e-12
    expected = result["bfloat16"]["test_loss"] - result["float32"]["test_loss"]
    assert result["loss_difference"] == expected
