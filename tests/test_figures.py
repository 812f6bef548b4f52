"""The experiment's figures (`python -m sts_trainer.lab.figures`) from accuracy.json files."""

import json

import pytest
from PIL import Image

from sts_trainer.lab import figures


def _results(folder, regime_arguments, rows, regime=None):
    folder.mkdir()
    data = {"arguments": regime_arguments, "rows": rows}
    if regime is not None:
        data["regime"] = regime
    (folder / "accuracy.json").write_text(json.dumps(data))
    return str(folder)


def _row(variant, point, low, high, saved=None):
    row = {"variant": variant, "pooled_retention": {"point": point, "ci95": [low, high]}}
    if saved is not None:
        row["llava_plan_flops_saved"] = saved
    return row


def test_figures_from_two_regimes(tmp_path):
    # an older file without its regime (named from its arguments), and a newer one that holds it
    harsh = _results(tmp_path / "harsh", {"length": 1.0, "foundation": "default"},
                     [_row("baseline", 1, 1, 1, 0.0), _row("LDS", 0.92, 0.90, 0.95, 0.11)])
    deep = _results(tmp_path / "deep", {"length": 4.0, "foundation": "deep"},
                    [_row("baseline", 1, 1, 1, 0.0), _row("LDS", 0.93, 0.90, 0.96, 0.11),
                     _row("VTC pool 0.5", 0.97, 0.95, 0.99, 0.14), _row("dense at STS's FLOPs", 0.95, 0.92, 0.98),
                     {"variant": "no retention (baseline at 0%)"}], regime="4x, 12 layers")
    loaded = [figures.load_results(harsh), figures.load_results(deep)]
    assert [r["regime"] for r in loaded] == ["1x, 4 layers", "4x, 12 layers"]
    points = figures.retention_points(loaded)
    assert set(points) == {"LDS", "VTC pool 0.5", "dense at STS's FLOPs"}  # no baseline, no row without retention
    assert points["LDS"] == [(0, 92.0, 90.0, 95.0), (1, 93.0, 90.0, 96.0)]
    assert points["VTC pool 0.5"] == [(1, 97.0, 95.0, 99.0)]
    paths = figures.main(["--results", harsh, deep, "--out", str(tmp_path / "figs")])
    for path in paths.values():
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 500


def test_a_folder_without_results_gets_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `python -m sts_trainer.lab.experiment"):
        figures.load_results(str(tmp_path))
