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
