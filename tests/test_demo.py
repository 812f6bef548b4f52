import os

import pytest

from sts_trainer.lab import demo, foundation


def test_demo_runs_both_stages_and_reports(tmp_path):
    summary = demo.main([
        "--output_dir", str(tmp_path), "--train_samples", "8", "--test_samples", "6", "--alignment_steps", "1",
        "--instruction_steps", "1", "--batch_size", "4", "--hidden_size", "32", "--num_layers", "2",
        "--foundation", "random",
    ])
    assert [s["stage"] for s in summary["stages"]] == ["alignment", "instruction"]
    assert summary["stages"][0]["sts"]["flops_saving"] > 0.0  # VTC in alignment
    assert 0.0 <= summary["held_out"]["exact_match"] <= 1.0 and summary["text_only_ceiling"] is None
    assert (tmp_path / "summary.json").exists()


def test_each_foundation_has_its_recipe_and_options_override_it():
    pretrained, random = demo.DemoArguments(), demo.DemoArguments(foundation="random")
    assert pretrained.foundation == "pretrained" and pretrained.image_size == 64 and pretrained.instruction_steps == 150
    assert random.image_size == 32 and random.instruction_steps == 1500
    assert demo.DemoArguments(foundation="random", instruction_steps=7).instruction_steps == 7


def test_pretrained_demo_names_the_image_size_it_reads():
    with pytest.raises(ValueError, match="64-pixel images"):
        demo.DemoArguments(image_size=32)


def test_the_pretrained_demo_takes_the_shipped_pair_without_pretraining(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a foundation model was pretrained; the shipped pair should have been used")

    monkeypatch.setattr(foundation, "pretrain_vision", fail)
    monkeypatch.setattr(foundation, "pretrain_language_model", fail)
    cache = tmp_path / "empty_cache"
    summary = demo.main([
        "--output_dir", str(tmp_path / "out"), "--foundation_cache", str(cache), "--train_samples", "8",
        "--test_samples", "6", "--alignment_steps", "1", "--instruction_steps", "1", "--batch_size", "4",
    ])
    assert not cache.exists()
    shipped = foundation.shipped_foundation(foundation.FoundationRecipe())
    assert 0.0 < summary["text_only_ceiling"] <= 1.0
    assert summary["text_only_ceiling"] == foundation.json.load(open(shipped["report"]))["language_model"][
        "text_only_accuracy"]
    assert "held-out accuracy" in demo.format_summary(summary, demo.DemoArguments())
    assert os.path.isdir(tmp_path / "out" / "stage2")
