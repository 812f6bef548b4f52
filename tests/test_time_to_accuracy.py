import json
import os

import pytest
import torch
from safetensors.torch import load_file

from sts_trainer.lab import experiment, foundation, time_to_accuracy
from sts_trainer.lab.time_to_accuracy import DEFAULT_VARIANTS, checkpoint_steps, compute_to_reach, summarize


def _no_pretraining(*args, **kwargs):
    raise AssertionError("a foundation model was pretrained; the shipped pair should have been used")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """A quick experiment with the three curves' variants and the sparse runs that count dense FLOPs, then their
    curves at 2 checkpoints (every step of the quick stage 2)."""
    out = tmp_path_factory.mktemp("accuracy")
    figures = tmp_path_factory.mktemp("figures")
    cache = tmp_path_factory.mktemp("foundation")
    with pytest.MonkeyPatch.context() as patch:  # the shipped quick pair: no pretraining step runs
        patch.setattr(foundation, "pretrain_vision", _no_pretraining)
        patch.setattr(foundation, "pretrain_language_model", _no_pretraining)
        result = experiment.main(["--quick", "--output_dir", str(out), "--foundation_cache", str(cache),
                                  "--variants", ",".join(DEFAULT_VARIANTS[1:])])
        summary = time_to_accuracy.main(["--results", str(out), "--checkpoints", "2", "--out", str(figures)])
    return out, figures, result, summary


def _folder(out, name):
    variant = next(v for v in experiment.VARIANTS if v.name == name)
    return os.path.basename(experiment.stage2_folder(str(out / "seed0"), variant))


def test_each_curve_is_the_experiments_run_with_checkpoints(quick):
    out, figures, result, summary = quick
    assert list(summary["variants"]) == list(DEFAULT_VARIANTS)
    for name in DEFAULT_VARIANTS:
        folder = out / "curves" / "seed0" / _folder(out, name)
        curve = json.loads((folder / "curve.json").read_text())
        assert [p["step"] for p in curve["points"]] == [1, 2]
        assert (folder / "checkpoint-1" / "model.safetensors").exists()
        # trained again with checkpoints saved, the run is the experiment's, weight for weight and answer for answer
        final = load_file(folder / "model.safetensors")
        reference = load_file(out / "seed0" / "stage2" / _folder(out, name) / "model.safetensors")
        assert final.keys() == reference.keys() and all(torch.equal(final[k], reference[k]) for k in final)
        assert curve["reproduced"] is True
        assert curve["points"][-1]["correct"] == result["runs"][0][name]["correct"]
        earlier = load_file(folder / "checkpoint-1" / "model.safetensors")
        assert any(not torch.equal(earlier[k], final[k]) for k in final)  # a real earlier model
        flops = [p["flops"] for p in curve["points"]]
        assert curve["stage1_flops"] < flops[0] < flops[1]
        assert curve["points"][0]["seconds"] < curve["points"][1]["seconds"]
        # the cumulative FLOPs end at the experiment's count of both stages
        stage1, stage2 = result["runs"][0][name]["stages"]
        dense1, dense2 = result["references"][0]["stage1_dense_flops"], result["references"][0]["stage2_dense_flops"]
        whole = (stage1["sts"]["actual_flops"] if stage1["sts"] else dense1) + (
            stage2["sts"]["actual_flops"] if stage2["sts"] else dense2)
        assert flops[-1] == pytest.approx(whole, rel=1e-9)
    sts = summary["variants"]["STS (VTC uniform 0.5 + LDS)"]["points"][-1]
    assert sts["flops_share"] < 1.0 and summary["variants"]["baseline"]["points"][-1]["flops_share"] == 1.0
    assert (figures / "time_to_accuracy.png").stat().st_size > 10_000
    table = (out / "time_to_accuracy.md").read_text()
    assert "| STS defaults | 1 |" in table and "| sts_plus | 1 |" in table and "| dense | 1 |" in table
    saved = json.loads((out / "time_to_accuracy.json").read_text())
    assert saved["checkpoints"] == 2 and saved["summary"]["variants"].keys() == summary["variants"].keys()


def test_finished_curves_are_reused(quick, capsys):
    out, figures, _, summary = quick
    again = time_to_accuracy.main(["--results", str(out), "--checkpoints", "2", "--out", str(figures)])
    assert capsys.readouterr().out.count("curve done before, reused") == len(DEFAULT_VARIANTS)
    assert again == summary


def test_bad_requests_name_what_to_do(quick, tmp_path):
    out, *_ = quick
    with pytest.raises(FileNotFoundError, match="no finished experiment"):
        time_to_accuracy.main(["--results", str(tmp_path)])
    with pytest.raises(ValueError, match="Unknown variant"):
        time_to_accuracy.main(["--results", str(out), "--variants", "LDS 0.9"])
    with pytest.raises(ValueError, match="shorter dense run or a control"):
        time_to_accuracy.main(["--results", str(out), "--variants", "dense at STS's FLOPs"])
    with pytest.raises(ValueError, match="checkpoints must be"):
        time_to_accuracy.main(["--results", str(out), "--checkpoints", "0"])
    with pytest.raises(FileNotFoundError, match="no finished stage 1"):  # a variant the experiment did not run
        time_to_accuracy.main(["--results", str(out), "--variants", "VTC random 0.25", "--checkpoints", "2"])


def test_checkpoint_steps_are_even_and_end_at_the_last_step():
    assert checkpoint_steps(600, 8) == [75, 150, 225, 300, 375, 450, 525, 600]
    assert checkpoint_steps(10, 3) == [4, 8, 10]
    assert checkpoint_steps(2, 8) == [1, 2]
    assert checkpoint_steps(5, 1) == [5]


def test_compute_to_reach_interpolates_between_checkpoints():
    assert compute_to_reach([1.0, 2.0, 3.0], [0.2, 0.6, 0.8], 0.7) == pytest.approx(2.5)
    assert compute_to_reach([1.0, 2.0], [0.2, 0.6], 0.6) == pytest.approx(2.0)
    assert compute_to_reach([1.0, 2.0], [0.9, 0.95], 0.5) == 1.0  # reached at the first checkpoint: an upper bound
    assert compute_to_reach([1.0, 2.0], [0.2, 0.6], 0.61) is None


def _curve(name, flops, accuracy, seed=0):
    return {"variant": name, "seed": seed, "reproduced": True,
            "points": [{"step": 10 * (i + 1), "flops": f, "seconds": f / 10, "accuracy": a}
                       for i, (f, a) in enumerate(zip(flops, accuracy))]}


def test_summary_compares_compute_to_reach_99_percent_of_dense_final():
    curves = {
        "baseline": [_curve("baseline", [25, 50, 75, 100], [0.5, 0.8, 0.98, 1.0]),
                     _curve("baseline", [25, 50, 75, 100], [0.5, 0.8, 0.98, 1.0], seed=1)],
        "fast": [_curve("fast", [20, 40, 60, 80], [0.6, 0.99, 1.0, 1.0]),
                 _curve("fast", [20, 40, 60, 80], [0.6, 0.99, 1.0, 1.0], seed=1)],
        "lossy": [_curve("lossy", [20, 40, 60, 80], [0.5, 0.7, 0.85, 0.9]),
                  _curve("lossy", [20, 40, 60, 80], [0.5, 0.7, 0.85, 0.9], seed=1)],
    }
    summary = summarize(curves)
    assert summary["target_accuracy"] == pytest.approx(0.99)
    base, fast, lossy = (summary["variants"][n] for n in ("baseline", "fast", "lossy"))
    assert base["reach_flops"] == pytest.approx(87.5)  # between 0.98 at 75 and 1.0 at 100
    assert fast["reach_flops"] == pytest.approx(40.0)
    assert fast["reach_flops_saved"] == pytest.approx(1 - 40 / 87.5)
    assert fast["reach_seconds_saved"] == pytest.approx(1 - 4 / 8.75)
    assert lossy["reach_flops"] is None and lossy["reach_flops_saved"] is None
    assert fast["points"][-1]["flops_share"] == pytest.approx(0.8)
    assert lossy["points"][-1]["of_dense_final"] == pytest.approx(0.9)
    with pytest.raises(ValueError, match="dense baseline"):
        summarize({"fast": curves["fast"]})
    shifted = {**curves, "fast": [curves["fast"][0], _curve("fast", [20, 40], [0.6, 0.99], seed=1)]}
    with pytest.raises(ValueError, match="different steps"):
        summarize(shifted)
