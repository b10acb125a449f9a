"""``optiscope bench --quick`` runs end to end and writes its report."""

import json

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
    assert report["dropout"][0]["saved_bytes"]["optiscope"] == 0


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
