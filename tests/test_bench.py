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
        "instruction: VTC uniform keep 0.25 + LDS fixed rate 0.5", "instruction: VTC pool keep 0.25 + LDS fixed rate 0.5",
        "instruction: VTC diverse keep 0.25 + LDS fixed rate 0.5"]
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
    assert saved["selection"]["diverse_ms"] > 0 and saved["selection"]["pool_ms"] > 0
    assert saved["selection"]["kept"] == 9  # 36 tokens at keep 0.25
    assert "Token selection of one step" in (tmp_path / "bench.md").read_text()
    assert (tmp_path / "bench.md").read_text().count("\n|") == len(rows) + 2  # header, separator, rows


def test_the_gpu_profile_runs_at_a_reduced_width_on_cpu(tmp_path):
    """`--profile llava-1.5-7b` (the device call's benchmark) at a CPU's width: every row, and the columns the
    targets read (measured and FLOPs-predicted saving, efficiency against oracles, MFU)."""
    from sts_trainer.lab import gpu_bench

    rows = bench.main(["--profile", "llava-1.5-7b", "--reduced", "--out", str(tmp_path)])
    names = [r["configuration"] for r in rows]
    assert names[:2] == ["alignment: Trainer", "alignment: STSTrainer, sparsity off"]
    for name in ("alignment: VTC keep 0.5", "alignment: VTC keep 0.25", "instruction: LDS fixed rate 0.5"):
        row = rows[names.index(name)]
        assert row["flops_speedup"] > 1.0 and math.isfinite(row["efficiency"]) and math.isfinite(row["saving_vs_flops"])
    plus = next(r for r in rows if r["configuration"].startswith("instruction: sts_plus"))
    assert plus["flops_speedup"] > 1.5 and math.isfinite(plus["efficiency"]) and plus["mean_layers_run"] <= 4
    assert all(r["mfu"] > 0 and r["mfu_of_measured_matmul"] is None for r in rows)  # no GPU: no measured matmul
    assert not any("oracle: " in n and "layers" in n for n in names)  # depth oracles are folded into the LDS rows
    saved = json.loads((tmp_path / "bench-gpu.json").read_text())
    assert saved["profile"]["vision_layers"] == 2 and set(saved["linear_fit_error_at_half_depth"]) == {"full", "small"}
    table = (tmp_path / "bench-gpu.md").read_text()
    assert table.count("\n|") == len(rows) + 2 and "CLIP ViT-L/14-336 shapes" in table
    # the real profile is LLaVA-1.5-7B's shapes
    full = gpu_bench.PROFILES["llava-1.5-7b"]
    config = gpu_bench.model_config(full)
    assert (full.visual_tokens, config.vision_config.num_hidden_layers, config.vision_config.hidden_size) == (576, 24, 1024)
    assert (config.text_config.hidden_size, config.text_config.intermediate_size,
            config.text_config.num_attention_heads) == (4096, 11008, 32)
