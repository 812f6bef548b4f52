import json
import math

from sts_trainer.lab import bench


def test_quick_benchmark_produces_every_row(tmp_path):
    rows = bench.main(["--quick", "--rounds", "1", "--out", str(tmp_path)])
    names = [r["configuration"].strip() for r in rows]
    assert names[:2] == ["alignment: Trainer", "alignment: STSTrainer, sparsity off"]
    assert "alignment: VTC keep 0.25" in names and "instruction: LDS paper schedule (0.5, 0.5)" in names
    for row in rows:
        if row["configuration"].startswith(("alignment: VTC", "instruction: LDS")):
            assert math.isfinite(row["efficiency"]) and math.isfinite(row["oracle_speedup"])
            assert row["flops_speedup"] >= 1.0
    vtc = rows[names.index("alignment: VTC keep 0.25")]
    assert vtc["flops_speedup"] > 1.5 and vtc["memory_mb"] < rows[0]["memory_mb"]  # fewer saved activations
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert len(saved["rows"]) == len(rows)
    assert (tmp_path / "bench.md").read_text().count("\n|") == len(rows) + 2  # header, separator, rows
