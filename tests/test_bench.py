import json
import math

from sts_trainer.lab import bench


def test_quick_benchmark_produces_every_row(tmp_path):
    rows = bench.main(["--quick", "--rounds", "1", "--out", str(tmp_path)])
    names = [r["configuration"].strip() for r in rows]
    assert names[:2] == ["alignment: Trainer", "alignment: STSTrainer, sparsity off"]
    assert "alignment: VTC keep 0.25" in names and "instruction: LDS paper schedule (0.5, 0.5)" in names
    composed = [r for r in rows if r["configuration"].startswith("instruction: VTC")]
    assert [r["configuration"] for r in composed] == [
        "instruction: VTC uniform keep 0.25 + LDS fixed rate 0.5", "instruction: VTC diverse keep 0.25 + LDS fixed rate 0.5"]
    for row in composed:  # both sparsities at once: more FLOPs saved than the shorter sequence alone
        assert row["composed"] and row["mean_layers_run"] < 4 and row["flops_speedup"] > 1.5
        assert "work_adjusted_efficiency" not in row
    assert not any(r["configuration"].strip().startswith("oracle: ") and "layers" in r["configuration"] for r in rows)
    for row in rows:
        if row["configuration"].startswith(("alignment: VTC", "instruction: LDS", "instruction: VTC")):
            assert math.isfinite(row["efficiency"]) and math.isfinite(row["oracle_speedup"])
            assert row["flops_speedup"] >= 1.0
    vtc = rows[names.index("alignment: VTC keep 0.25")]
    assert vtc["flops_speedup"] > 1.5 and vtc["memory_mb"] < rows[0]["memory_mb"]  # fewer saved activations
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert len(saved["rows"]) == len(rows)
    assert saved["selection"]["diverse_ms"] > 0 and saved["selection"]["kept"] == 9  # 36 tokens at keep 0.25
    assert "Token selection of one step" in (tmp_path / "bench.md").read_text()
    assert (tmp_path / "bench.md").read_text().count("\n|") == len(rows) + 2  # header, separator, rows
