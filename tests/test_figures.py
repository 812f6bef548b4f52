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


SUMMARY = """# Accuracy

Some text | with a bar that is not a table.

| variant | regime | retention | 95% low | 95% high | LLaVA-1.5-7B FLOPs saved |
|---|---|---:|---:|---:|---:|
| baseline | 1x, 4 layers | 100.0 | 100.0 | 100.0 | 0.0 |
| STS defaults | 1x, 4 layers | 87.4 | 84.5 | 90.4 | 25.2 |
| dense at STS's FLOPs | 1x, 4 layers | 91.4 | 88.5 | 94.2 |  |
| STS defaults | 1x, 12 layers | 88.0 | 85.0 | 91.0 | 25.2 |
| STS defaults | 2x, 12 layers | 87.0 | 84.0 | 90.0 | 25.2 |
| STS defaults | 4x, 12 layers | 87.6 | 83.5 | 91.9 | 25.2 |
| STS defaults | 4x, 12 layers, no fixed layout | 99.0 | 97.0 | 101.0 | 25.2 |
| LDS | 4x, 12 layers | 92.8 | 90.0 | 95.7 | 11.4 |

A paragraph after the table.

| another | table |
|---|---|
| not | read |
"""


def test_each_axis_alone_from_the_summary_table(tmp_path):
    path = tmp_path / "accuracy.md"
    path.write_text(SUMMARY)
    rows = figures.read_summary(str(path))
    assert len(rows) == 8 and rows[1] == {"variant": "STS defaults", "regime": "1x, 4 layers", "retention": 87.4,
                                         "low": 84.5, "high": 90.4}
    points = figures.axis_points(rows)
    # the layout-free row lies on no single axis; a variant in one regime is a point, not a curve
    assert set(points) == {"STS defaults", "dense at STS's FLOPs", "LDS"}  # the baseline is 100% by definition
    assert points["STS defaults"] == {(1.0, 4): (87.4, 84.5, 90.4), (1.0, 12): (88.0, 85.0, 91.0),
                                      (2.0, 12): (87.0, 84.0, 90.0), (4.0, 12): (87.6, 83.5, 91.9)}
    length, depth = figures.axis_curves(points)
    assert length == [("STS defaults", 12, [(1.0, 88.0, 85.0, 91.0), (2.0, 87.0, 84.0, 90.0),
                                             (4.0, 87.6, 83.5, 91.9)])]
    assert depth == [("STS defaults", 1.0, [(4, 87.4, 84.5, 90.4), (12, 88.0, 85.0, 91.0)])]
    paths = figures.main(["--summary", str(path), "--out", str(tmp_path / "figs")])
    assert list(paths) == ["axes"]
    with Image.open(paths["axes"]) as image:
        assert image.format == "PNG" and image.width > 500


def test_a_summary_that_cannot_be_read_gets_a_clear_error(tmp_path):
    path = tmp_path / "accuracy.md"
    path.write_text("# no table here\n")
    with pytest.raises(ValueError, match="no summary table"):
        figures.read_summary(str(path))
    path.write_text(SUMMARY.replace("| 88.0 | 85.0 |", "| n/a | 85.0 |"))
    with pytest.raises(ValueError, match="not a number"):
        figures.read_summary(str(path))
    path.write_text(SUMMARY.replace("| 2x, 12 layers |", "| 1x, 12 layers |"))
    with pytest.raises(ValueError, match="Two summary rows for 'STS defaults'"):
        figures.axis_points(figures.read_summary(str(path)))
    path.write_text(SUMMARY.replace("| 1x, 12 layers |", "| 1x, 12 layers, 3 foundation pairs |")
                    .replace("| 2x, 12 layers |", "| 2x, 4 layers, 2 seeds |").replace("| LDS | 4x", "| LDS | 3x"))
    with pytest.raises(ValueError, match="nothing to plot"):
        figures.main(["--summary", str(path), "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        figures.main(["--out", str(tmp_path)])
