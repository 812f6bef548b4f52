import pytest

from sts_trainer.lab import demo


def test_demo_runs_both_stages_and_reports(tmp_path):
    summary = demo.main([
        "--output_dir", str(tmp_path), "--train_samples", "8", "--test_samples", "6", "--alignment_steps", "1",
        "--instruction_steps", "1", "--batch_size", "4", "--hidden_size", "32", "--num_layers", "2",
    ])
    assert [s["stage"] for s in summary["stages"]] == ["alignment", "instruction"]
    assert summary["stages"][0]["sts"]["flops_saving"] > 0.0  # VTC in alignment
    assert 0.0 <= summary["held_out"]["exact_match"] <= 1.0 and summary["text_only_ceiling"] is None
    assert (tmp_path / "summary.json").exists()


def test_pretrained_demo_names_the_image_size_it_needs(tmp_path):
    with pytest.raises(ValueError, match="--image_size 64"):
        demo.main(["--output_dir", str(tmp_path), "--foundation", "pretrained", "--foundation_cache", str(tmp_path)])
