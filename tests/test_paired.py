"""Paired ratios between two variants of one experiment (`python -m sts_trainer.lab.paired`)."""

import json

import numpy as np
import pytest

from sts_trainer.lab import paired
from sts_trainer.lab.experiment import retention_interval


def _results(pairs=1, seeds=2, questions=40):
    rng = np.random.default_rng(0)
    runs = {}
    for key in paired.run_keys({"seeds": seeds, "foundation_seeds": pairs}):
        base = rng.random(questions) < 0.7
        runs[key] = {"baseline": {"correct": base.astype(int).tolist()},
                     "VTC": {"correct": (base & (rng.random(questions) < 0.9)).astype(int).tolist()},
                     "LDS": {"correct": (base & (rng.random(questions) < 0.8)).astype(int).tolist()}}
    return {"arguments": {"seeds": seeds, "foundation_seeds": pairs, "bootstrap": 300}, "runs": runs}


def test_a_paired_ratio_is_the_ratio_of_pooled_accuracies_with_the_experiments_interval():
    results = _results()
    vtc, lds = paired.answers(results, "VTC"), paired.answers(results, "LDS")
    assert vtc.shape == (2, 40)
    point, low, high = paired.paired_ratio(results, "VTC", "LDS")
    assert point == pytest.approx(vtc.mean() / lds.mean())
    assert (point, low, high) == retention_interval(vtc, lds, 300)  # the experiment's resamples and draws
    assert low < point < high
    # over the baseline it is retention, below 100% here since the variant only loses answers
    assert paired.paired_ratio(results, "VTC", "baseline")[2] <= 1.0


def test_foundation_pairs_are_rows_pair_by_pair():
    assert paired.run_keys({"seeds": 2, "foundation_seeds": 2}) == ["0", "1", "pair1/seed0", "pair1/seed1"]
    results = _results(pairs=2)
    rows = paired.answers(results, "VTC")
    assert rows[2].tolist() == results["runs"]["pair1/seed0"]["VTC"]["correct"]
    assert paired.paired_ratio(results, "VTC", "LDS") == retention_interval(rows, paired.answers(results, "LDS"),
                                                                            300, pairs=2)


def test_a_missing_variant_or_run_gets_a_clear_error(tmp_path, capsys):
    results = _results()
    with pytest.raises(ValueError, match="No variant 'STS' among the runs of '0'; they are: baseline, VTC, LDS"):
        paired.answers(results, "STS")
    del results["runs"]["1"]
    with pytest.raises(ValueError, match="no runs for '1'"):
        paired.answers(results, "VTC")
    with pytest.raises(SystemExit):
        paired.main(["--results", str(tmp_path), "--variant", "VTC"])
    assert "no accuracy.json" in capsys.readouterr().err


def test_the_command_line_prints_the_ratio(tmp_path, capsys):
    (tmp_path / "accuracy.json").write_text(json.dumps(_results()))
    point, low, high = paired.main(["--results", str(tmp_path), "--variant", "VTC", "--over", "LDS",
                                    "--resamples", "100"])
    assert f"VTC over LDS: {100 * point:.1f}% [{100 * low:.1f}, {100 * high:.1f}]" in capsys.readouterr().out
