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
    assert report["dropout"][0]["saved_bytes"]["optiscope"] == 0


def test_first_step_latency_times_ours_cold_and_warm_and_torch_fused() -> None:
    times = first_step_latency(rounds=1)
    medians = ("cold_cache_s", "cold_process_s", "warm_cache_s", "torch_fused_s")
    for key in medians:
        assert times[key] == times["runs"][key][0] > 0
    assert times["cold_process_s"] > times["cold_cache_s"]
