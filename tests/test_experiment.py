import json

import pytest

from sts_trainer.lab import experiment
from sts_trainer.lab.synthetic import CATEGORIES


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("accuracy")
    return out, experiment.main(["--quick", "--output_dir", str(out)])


def test_quick_experiment_writes_every_variant(quick):
    out, result = quick
    names = [row["variant"] for row in result["rows"]]
    assert names == [v.name for v in experiment.VARIANTS]
    assert names[0] == "baseline" and names[-1] == "no alignment (control)" and len(names) == 10
    for strategy in ("uniform", "random", "instruction"):
        assert f"VTC {strategy} 0.5" in names and f"VTC {strategy} 0.25" in names
    saved = json.loads((out / "accuracy.json").read_text())
    assert saved["rows"] == result["rows"] and len(saved["per_seed"]) == 1
    table = (out / "accuracy.md").read_text()
    assert table.count("\n|") == 2 * (len(names) + 2)  # two tables: header, separator, one line per variant
    assert all(category in table for category in CATEGORIES)


def test_quick_experiment_columns_and_references(quick):
    _, result = quick
    rows = {row["variant"]: row for row in result["rows"]}
    for row in rows.values():
        for key in experiment.COLUMNS:
            if key == "retention" and rows["baseline"]["overall"]["mean"] == 0.0:
                continue  # a few steps may leave the baseline at 0%: retention is undefined, left out
            assert set(row[key]) == {"mean", "min", "max", "std"}
        for key in (*CATEGORIES, "overall"):
            assert 0.0 <= row[key]["mean"] <= 1.0
    baseline = rows["baseline"]
    if "retention" in baseline:
        assert baseline["retention"]["mean"] == pytest.approx(1.0)
    assert baseline["flops_saved"]["mean"] == 0.0 and baseline["wall_clock_saved"]["mean"] == 0.0
    # VTC saves only in stage 1, LDS only in stage 2; every run of a stage counted the same dense FLOPs.
    for name, row in rows.items():
        if name.startswith("VTC"):
            assert row["stage1_flops_saved"]["mean"] > 0.0 and row["stage2_flops_saved"]["mean"] == 0.0
    assert rows["LDS"]["stage1_flops_saved"]["mean"] == 0.0
    assert rows["no alignment (control)"]["stage1_flops_saved"]["mean"] == 1.0
    sts, vtc = rows["STS (VTC uniform 0.5 + LDS)"], rows["VTC uniform 0.5"]
    assert sts["stage1_flops_saved"] == vtc["stage1_flops_saved"]  # the same stage-1 run
    assert sts["flops_saved"]["mean"] >= vtc["flops_saved"]["mean"]
    assert result["references"][0]["dense_flops_disagreement"] == 0.0
    # shared stage 1: baseline and LDS start stage 2 from the same alignment run
    runs = result["runs"][0]
    assert runs["baseline"]["stages"][0] is runs["LDS"]["stages"][0]
