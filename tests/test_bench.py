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
    dropout = report["dropout"][0]
    assert dropout["saved_bytes"]["optiscope"] == 0
    assert dropout["saved_bytes"]["optiscope inplace"] == 0
    assert dropout["saved_bytes"]["torch"] > 0
    assert {"clone", "optiscope inplace forward", "optiscope inplace backward"} <= set(
        dropout["timings"]
    )
    for ratio in ("speedup", "speedup_inplace", "forward_vs_clone"):
        assert dropout[ratio] > 0
