import json
import os

import numpy as np
import pytest
import torch

from sts_trainer.lab import experiment, figures, foundation, paired
from sts_trainer.lab.synthetic import CATEGORIES


def _no_pretraining(*args, **kwargs):
    raise AssertionError("a foundation model was pretrained; the shipped pair should have been used")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("accuracy")
    cache = tmp_path_factory.mktemp("foundation")
    argv = ["--quick", "--output_dir", str(out), "--foundation_cache", str(cache)]
    with pytest.MonkeyPatch.context() as patch:  # the shipped quick pair: no pretraining step runs
        patch.setattr(foundation, "pretrain_vision", _no_pretraining)
        patch.setattr(foundation, "pretrain_language_model", _no_pretraining)
        result = experiment.main(argv)
    assert os.listdir(cache) == []  # nothing built into the cache either
    return out, argv, result


def test_quick_experiment_writes_every_variant(quick):
    out, _, result = quick
    names = [row["variant"] for row in result["rows"]]
    assert names == [v.name for v in experiment.VARIANTS]
    assert names[0] == "baseline" and names[-1] == "no alignment (control)" and len(names) == 34
    assert "VTC-I uniform 0.1 + full 0.1 + LDS (after VTC uniform 0.5)" in names
    assert {"STS with pool (VTC pool 0.5 + LDS)", "LDS lr_mass", "VTC uniform 0.5 original positions",
            "STS lr_mass original positions (VTC uniform 0.5 original positions + LDS lr_mass)", "LDS redundancy", "STS redundancy (VTC uniform 0.5 + LDS redundancy)"} <= set(names)
    for strategy in ("uniform", "random", "instruction", "pool"):
        assert f"VTC {strategy} 0.5" in names and f"VTC {strategy} 0.25" in names
    saved = json.loads((out / "accuracy.json").read_text())
    assert saved["rows"] == result["rows"] and len(saved["per_seed"]) == 1
    table = (out / "accuracy.md").read_text()
    # five tables: the summary, the equivalence one and two more with a line per variant, the token profile
    # (the first two have no rows when a few steps left the baseline at 0%: retention undefined)
    per_variant = 4 if "pooled_retention" in result["rows"][0] else 2
    assert table.count("\n|") == per_variant * len(names) + 4 * 2 + 4
    assert "| variant | regime | retention | 95% low | 95% high | LLaVA-1.5-7B FLOPs saved |" in table
    assert all(category in table for category in CATEGORIES)
    # the line format docs/accuracy.md keeps, read by scripts: | STS ... | ... | retention | ...
    sts_line = next(line for line in table.splitlines() if line.startswith("| STS"))
    assert sts_line.count("|") == len(CATEGORIES) + 6
    if "pooled_retention" in result["rows"][0]:
        assert "[" in sts_line
        assert "| STS defaults | " in table and "| sts_plus | " in table  # the summary's names of the recipes
    assert set(experiment.SUMMARY_NAMES) <= set(names)
    # the summary table reads back (python -m sts_trainer.lab.figures --summary): a row per retention, same numbers
    summary = figures.read_summary(str(out / "accuracy.md"))
    with_retention = [row for row in result["rows"] if "pooled_retention" in row]
    assert [row["variant"] for row in summary] == [experiment.SUMMARY_NAMES.get(row["variant"], row["variant"])
                                                   for row in with_retention]
    for read, row in zip(summary, with_retention):
        assert read["retention"] == pytest.approx(100 * row["pooled_retention"]["point"], abs=0.051)
        assert read["low"] == pytest.approx(100 * row["pooled_retention"]["ci95"][0], abs=0.051)
    # a paired ratio over the baseline (python -m sts_trainer.lab.paired) is the row's retention, interval and all
    for row in with_retention:
        ratio = paired.paired_ratio(saved, row["variant"], "baseline")
        assert ratio == pytest.approx((row["pooled_retention"]["point"], *row["pooled_retention"]["ci95"]))


def test_quick_experiment_columns_and_references(quick):
    _, _, result = quick
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
        assert baseline["pooled_retention"] == {"point": 1.0, "ci95": [1.0, 1.0], "equivalence": "within 1 point"}
    assert baseline["flops_saved"]["mean"] == 0.0 and baseline["wall_clock_saved"]["mean"] == 0.0
    # VTC saves only in stage 1, LDS only in stage 2; every run of a stage counted the same dense FLOPs.
    for name, row in rows.items():
        if name.startswith("VTC "):
            assert row["stage1_flops_saved"]["mean"] > 0.0 and row["stage2_flops_saved"]["mean"] == 0.0
        if name.startswith("VTC-I"):  # VTC in both stages
            assert row["stage1_flops_saved"] == rows["VTC uniform 0.5"]["stage1_flops_saved"]
            assert row["stage2_flops_saved"]["mean"] > 0.0
    assert rows["LDS"]["stage1_flops_saved"]["mean"] == 0.0
    assert rows["no alignment (control)"]["stage1_flops_saved"]["mean"] == 1.0
    sts, vtc = rows["STS (VTC uniform 0.5 + LDS)"], rows["VTC uniform 0.5"]
    assert sts["stage1_flops_saved"] == vtc["stage1_flops_saved"]  # the same stage-1 run
    assert sts["flops_saved"]["mean"] >= vtc["flops_saved"]["mean"]
    composed = rows["VTC-I uniform 0.1 + full 0.1 + LDS (after VTC uniform 0.5)"]
    assert composed["stage2_flops_saved"]["mean"] > sts["stage2_flops_saved"]["mean"]
    # each variant's recipe priced on LLaVA-1.5-7B by sts-plan, as the README's tables
    assert rows["baseline"]["llava_plan_flops_saved"] == 0.0
    assert rows["no alignment (control)"]["llava_plan_flops_saved"] is None
    assert sts["llava_plan_flops_saved"] == pytest.approx(0.252, abs=5e-4)
    assert composed["llava_plan_flops_saved"] == pytest.approx(0.583, abs=5e-4)
    assert result["references"][0]["dense_flops_disagreement"] == 0.0
    # shared stage 1: baseline and LDS start stage 2 from the same alignment run
    runs = result["runs"][0]
    assert runs["baseline"]["stages"][0] is runs["LDS"]["stages"][0]
    # per-question correctness, in the question file's order, agrees with the metric
    for name, run in runs.items():
        assert len(run["correct"]) == result["arguments"]["test_samples"]
        assert np.mean(run["correct"]) == pytest.approx(run["scores"]["exact_match"])
    profile = result["token_profile"]
    assert profile["testbed"]["visual_tokens_per_image"] == 16  # the quick foundation: 32 px, 8-pixel patches
    assert profile["llava-1.5-7b"]["visual_tokens_per_image"] == 576
    assert 0.0 < profile["testbed"]["alignment_flops_share"] < 1.0


def test_same_seed_starts_from_the_same_projector(quick, tmp_path):
    """Paired design: a run composes its new projector from its seed, whatever ran before it in the process."""
    import torch
    from safetensors.torch import load_file

    from sts_trainer.lab.foundation import QUICK_RECIPE, build_foundation
    from sts_trainer.lab.synthetic import write_dataset
    from sts_trainer.llava.data import DataArguments
    from sts_trainer.llava.train import ModelArguments, run

    out, argv, _ = quick
    foundation = build_foundation(QUICK_RECIPE, argv[argv.index("--foundation_cache") + 1])
    data = write_dataset(str(tmp_path / "data"), 8, "train", 0, "alignment", QUICK_RECIPE.image_size)
    exp = experiment.ExperimentArguments(alignment_lr=0.0, alignment_steps=1, batch_size=4)  # weights stay at init
    projectors = []
    for seed, noise in ((0, 1), (0, 1000), (1, 1)):
        torch.rand(noise)  # the global generator's state differs between the runs
        summary = run(
            ModelArguments(language_model=foundation["language_model"], vision_tower=foundation["vision_tower"]),
            DataArguments(data_path=data["data_path"], image_folder=data["image_folder"]),
            experiment._training_args(exp, "stage1", seed, str(tmp_path / f"run{seed}-{noise}"), None),
        )
        projectors.append(load_file(os.path.join(summary["output_dir"], "mm_projector.safetensors")))
    assert projectors[0].keys() == projectors[2].keys() and len(projectors[0]) >= 2
    assert all(torch.equal(projectors[0][k], projectors[1][k]) for k in projectors[0])
    assert not all(torch.equal(projectors[0][k], projectors[2][k]) for k in projectors[0])


def test_resume_reuses_finished_runs(quick, capsys):
    out, argv, result = quick
    summary = out / "seed0" / "stage2" / "baseline" / "result.json"
    before = summary.stat().st_mtime_ns
    again = experiment.main(argv)
    assert summary.stat().st_mtime_ns == before  # nothing retrained
    assert "done before, reused" in capsys.readouterr().out
    assert again["rows"] == result["rows"]


def test_resume_refuses_other_arguments(quick):
    _, argv, _ = quick
    with pytest.raises(ValueError, match="instruction_lr differ"):
        experiment.main([*argv, "--instruction_lr", "1e-3"])


def test_retention_interval_is_paired():
    rng = np.random.default_rng(0)
    baseline = (rng.random((5, 400)) < 0.6).astype(float)
    # the same answers: retention exactly 1, and the paired interval has no width
    assert experiment.retention_interval(baseline, baseline, 200) == (1.0, 1.0, 1.0)
    # a variant that loses a tenth of the baseline's correct answers: retention 0.9, inside a tight interval
    variant = baseline.copy()
    lost = np.flatnonzero(baseline.ravel())[::10]
    variant.ravel()[lost] = 0.0
    point, low, high = experiment.retention_interval(variant, baseline, 500)
    assert point == pytest.approx(variant.mean() / baseline.mean())
    assert low < point < high and high < 1.0 and low > 0.85
    with pytest.raises(ValueError, match="shape"):
        experiment.retention_interval(variant[:, :10], baseline, 10)
    with pytest.raises(ValueError, match="undefined"):
        experiment.retention_interval(variant, np.zeros_like(baseline), 10)


def test_zero_filled_skipped_layers_train_as_zero_did_before_the_guard():
    """The comparison variant: a layer skipped in the whole step gets a zero gradient, and AdamW moves it."""
    from sts_trainer.layer_skip import LayerSkipper

    from .test_backends import _adam_after_steps

    def layer1_moves():
        (weights, _), (after, _) = _adam_after_steps(guarded=True, zero_filled=False)
        return any(not torch.equal(a, b) for a, b in zip(weights, after))

    with experiment.zero_filled_skipped_layers():
        assert layer1_moves()
    assert not layer1_moves()
    assert LayerSkipper.guard_optimizer.__name__ == "guard_optimizer"  # restored


def test_the_interval_is_crossed_seeds_that_answer_alike_add_no_information():
    """Every seed answers the same questions: five seeds whose answers are identical are worth one seed, and the
    interval must be as wide as one seed's (a nested resample, questions drawn afresh per seed, would shrink it by
    about sqrt(5))."""
    rng = np.random.default_rng(1)
    base_row = (rng.random(400) < 0.6).astype(float)
    variant_row = base_row * (rng.random(400) < 0.85)
    one = experiment.retention_interval(variant_row[None], base_row[None], 2000)
    five = experiment.retention_interval(np.tile(variant_row, (5, 1)), np.tile(base_row, (5, 1)), 2000)
    assert five[0] == pytest.approx(one[0])
    assert (five[2] - five[1]) == pytest.approx(one[2] - one[1], rel=0.15)


def test_the_interval_resamples_foundation_pairs_then_seeds():
    """With several foundation pairs the rows are pairs' seeds, pair-major. Pairs and seeds that answer alike are
    worth one run (the interval is one run's); pairs that disagree widen it beyond what the same rows read as seeds
    of one pair give, since a resample may draw the same pair three times."""
    rng = np.random.default_rng(2)
    base = (rng.random((2, 400)) < 0.6).astype(float)
    variant = base * (rng.random((2, 400)) < 0.9)
    one = experiment.retention_interval(variant[:1], base[:1], 2000)
    alike = experiment.retention_interval(np.tile(variant[0], (6, 1)), np.tile(base[0], (6, 1)), 2000, pairs=3)
    assert alike[0] == pytest.approx(one[0])
    assert (alike[2] - alike[1]) == pytest.approx(one[2] - one[1], rel=0.15)
    # pair 2 keeps everything, pair 0 loses a fifth of its correct answers: the pairs disagree
    pairs = [base * (rng.random((2, 400)) < keep) for keep in (0.8, 0.9, 1.0)]
    variant6, base6 = np.concatenate(pairs), np.tile(base, (3, 1))
    flat = experiment.retention_interval(variant6, base6, 2000)
    crossed = experiment.retention_interval(variant6, base6, 2000, pairs=3)
    assert crossed[0] == pytest.approx(flat[0])
    assert crossed[2] - crossed[1] > 1.3 * (flat[2] - flat[1])
    with pytest.raises(ValueError, match="3 foundation pairs"):
        experiment.retention_interval(variant6[:5], base6[:5], 10, pairs=3)


def test_foundation_pairs_cross_the_seeds(quick, tmp_path, monkeypatch):
    """--foundation_seeds 2: pair 1 is the recipe pretrained with seed 1, trains seed 0 on pair 0's data under
    pair1/, and every row has each pair's retention; pair 0's runs are found, not retrained."""
    import shutil

    out, argv, _ = quick
    cache = argv[argv.index("--foundation_cache") + 1]  # an argument of the folder's runs
    folder = tmp_path / "acc"
    shutil.copytree(out, folder)
    built = []
    real = foundation.build_foundation
    monkeypatch.setattr(experiment, "build_foundation",
                        lambda recipe, cache: built.append(recipe) or real(recipe, cache))
    before = (folder / "seed0" / "stage2" / "baseline" / "result.json").stat().st_mtime_ns
    result = experiment.main(["--quick", "--output_dir", str(folder), "--foundation_cache", cache,
                              "--foundation_seeds", "2", "--variants", "VTC uniform 0.5"])
    assert [r.seed for r in built] == [0, 1] and built[1] == foundation.replace(foundation.QUICK_RECIPE, seed=1)
    assert (folder / "seed0" / "stage2" / "baseline" / "result.json").stat().st_mtime_ns == before
    assert sorted(os.listdir(folder / "pair1" / "seed0" / "stage2")) == sorted(
        os.path.basename(experiment.stage2_folder("", v)) for v in experiment.VARIANTS
        if v.name in ("baseline", "VTC uniform 0.5"))
    assert not (folder / "pair1" / "seed0" / "data").exists()  # the pairs train on the same data
    assert set(result["runs"]) == {0, "pair1/seed0"} and len(result["per_seed"]) == 2
    assert [p["recipe"]["seed"] for p in result["foundation_pairs"]] == [0, 1]
    assert result["regime"].endswith(", 2 foundation pairs")
    assert "| variant | pair 0 | pair 1 |" in (folder / "accuracy.md").read_text()
    with pytest.raises(ValueError, match="foundation_seeds"):
        experiment.ExperimentArguments(foundation_seeds=0)


def test_each_row_gives_every_pairs_own_retention():
    """Rows pair-major: pair 0's seeds, then pair 1's; each pair's retention is its own rows' ratio of means."""
    base = np.array([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=float)
    variant = np.array([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 1, 0]], dtype=float)
    per_seed = [{"baseline": {"overall": b.mean()}, "VTC uniform 0.5": {"overall": v.mean()}}
                for b, v in zip(base, variant)]
    rows = experiment.aggregate(per_seed, {"baseline": base, "VTC uniform 0.5": variant}, 50, pairs=2)
    vtc = next(row for row in rows if row["variant"] == "VTC uniform 0.5")
    assert vtc["per_pair_retention"] == [pytest.approx(6 / 7), pytest.approx(4 / 6)]
    assert vtc["pooled_retention"]["point"] == pytest.approx(10 / 13)
    assert "per_pair_retention" not in experiment.aggregate(per_seed, {"baseline": base, "VTC uniform 0.5": variant},
                                                            50)[1]


def test_chance_adjusted_retention_and_equivalence():
    questions = [{"category": "existence", "answer": a} for a in ("yes", "no")] * 2 + [
        {"category": "ocr", "answer": w} for w in ("cat", "dog", "sun", "car")]
    chance = experiment.chance_per_question(questions)
    assert chance.tolist() == [0.5] * 4 + [0.25] * 4
    baseline = np.array([[1, 1, 1, 0, 1, 1, 0, 0]], dtype=float)  # 62.5%, chance 37.5%
    variant = np.array([[1, 0, 1, 0, 1, 0, 0, 0]], dtype=float)  # 37.5%: at chance
    point, _, _ = experiment.retention_interval(variant, baseline, 50, chance=chance)
    assert point == pytest.approx(0.0)
    assert experiment.retention_interval(variant, baseline, 50)[0] == pytest.approx(0.6)
    assert experiment.equivalence(0.992, 1.01) == "within 1 point"
    assert experiment.equivalence(0.95, 0.985) == "below by more than 1 point"
    assert experiment.equivalence(0.97, 1.0) == "undecided"


def test_the_length_axis_scales_both_stages_and_the_scenes():
    exp = experiment.ExperimentArguments(length=4)
    assert (exp.scaled("train_samples"), exp.scaled("alignment_steps"), exp.scaled("instruction_steps")) == (
        4 * exp.train_samples, 4 * exp.alignment_steps, 4 * exp.instruction_steps)
    assert experiment._training_args(exp, "stage2", 0, "/tmp/x", {}).max_steps == 4 * exp.instruction_steps
    assert exp.regime(4) == "4x, 4 layers"
    original = experiment.ExperimentArguments(vtc_position_ids="original")
    assert experiment._training_args(original, "stage1", 0, "/tmp/x", {"vtc_keep_ratio": 0.5}).vtc_position_ids == (
        "original")
    with pytest.raises(ValueError, match="length"):
        experiment.ExperimentArguments(length=0)


def test_the_equal_compute_baseline_trains_densely_for_the_sts_variants_flops(quick):
    _, _, result = quick
    runs = result["runs"][0]
    sts, budget = runs["STS (VTC uniform 0.5 + LDS)"], runs["dense at STS's FLOPs"]
    assert all(stage["sts"] is None for stage in budget["stages"])  # dense in both stages
    for index, name in enumerate(("alignment_steps", "instruction_steps")):
        fraction = sts["stages"][index]["sts"]["actual_flops"] / sts["stages"][index]["sts"]["dense_flops"]
        assert budget["stages"][index]["steps"] == max(1, round(experiment.QUICK[name] * fraction))
    row = next(r for r in result["rows"] if r["variant"] == "dense at STS's FLOPs")
    assert row["llava_plan_flops_saved"] is None and row["flops_saved"]["mean"] >= 0.0
    with pytest.raises(ValueError, match="choose that variant too"):
        experiment._budget_steps(experiment.ExperimentArguments(), {}, experiment.VARIANTS[-2])
