"""Named recipes (`sts_preset`): the packaged preset, its YAML file, and how a stage's section is applied."""

from pathlib import Path

import pytest
import yaml

from sts_trainer import STSTrainingArguments, plan_sparsity
from sts_trainer.lab.tiny import freeze_for_alignment, tiny_llava
from sts_trainer.presets import PRESETS, load_preset

from .helpers import train, training_args

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def make(tmp_path, **kwargs):
    return STSTrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, **kwargs)


def test_the_recipe_file_holds_the_preset():
    assert yaml.safe_load((CONFIGS / "sts_plus.yaml").read_text()) == PRESETS["sts_plus"]
    assert load_preset(str(CONFIGS / "sts_plus.yaml")) == load_preset("sts_plus")


def test_each_stage_gets_its_section_and_explicit_options_win(tmp_path):
    args = make(tmp_path, sts_preset="sts_plus", vtc_full_token_fraction=0.2)
    instruction, alignment = args.for_stage("instruction"), args.for_stage("alignment")
    assert (instruction.sts_vtc, instruction.vtc_strategy, instruction.vtc_keep_ratio) == ("on", "uniform", 0.15)
    assert instruction.vtc_full_token_fraction == 0.2  # given explicitly: the preset's 0.1 does not apply
    assert (alignment.sts_vtc, alignment.vtc_strategy, alignment.vtc_keep_ratio) == ("auto", "uniform", 0.5)
    assert args.vtc_keep_ratio == 0.5 and args.sts_vtc == "auto"  # the arguments themselves are unchanged
    assert make(tmp_path).for_stage("instruction").sts_vtc == "auto"  # no preset: nothing changes


def test_an_option_given_at_its_default_value_still_wins(tmp_path):
    args = make(tmp_path, sts_preset="sts_plus", vtc_keep_ratio=0.5)  # 0.5 is the default; the preset says 0.15
    assert args.for_stage("instruction").vtc_keep_ratio == 0.5
    assert make(tmp_path, sts_preset="sts_plus").for_stage("instruction").vtc_keep_ratio == 0.15
    later = make(tmp_path, sts_preset="sts_plus")
    later.vtc_keep_ratio = 0.3  # set after construction: not the default, so given
    assert later.for_stage("instruction").vtc_keep_ratio == 0.3
    positional = STSTrainingArguments(str(tmp_path), sts_preset="sts_plus", report_to="none")
    assert positional.for_stage("instruction").vtc_keep_ratio == 0.15


def test_the_command_line_passes_on_only_what_was_given(tmp_path):
    from sts_trainer.llava.train import parse

    common = ["--model_name_or_path", "m", "--data_path", "d.json", "--output_dir", str(tmp_path),
              "--report_to", "none", "--sts_preset", "sts_plus"]
    _, _, given = parse([*common, "--vtc_keep_ratio", "0.5"])
    assert given.for_stage("instruction").vtc_keep_ratio == 0.5
    _, _, defaulted = parse(common)
    assert defaulted.for_stage("instruction").vtc_keep_ratio == 0.15
    # and a plain TrainingArguments upgraded by the trainer gives none
    from transformers import TrainingArguments

    upgraded = STSTrainingArguments.from_training_arguments(TrainingArguments(str(tmp_path), report_to="none"))
    upgraded.sts_preset = "sts_plus"
    assert upgraded.for_stage("instruction").vtc_keep_ratio == 0.15


def test_the_plan_of_each_stage_uses_the_preset(tmp_path):
    args = make(tmp_path, sts_preset=str(CONFIGS / "sts_plus.yaml"))
    aligned = plan_sparsity(freeze_for_alignment(tiny_llava()), args)
    assert aligned.stage == "alignment" and aligned.vtc and not aligned.lds
    assert aligned.args.vtc_keep_ratio == 0.5
    tuned = plan_sparsity(tiny_llava(), args)
    assert tuned.stage == "instruction" and tuned.vtc and tuned.lds
    assert tuned.args.vtc_keep_ratio == 0.15
    assert "keep_ratio=0.15, full-token steps 0.1" in tuned.describe()


@pytest.mark.parametrize(
    "recipe, message",
    [
        ({"instruction": {"sts_stage": "alignment"}}, "sts_stage, which a recipe cannot set"),
        ({"instruction": {"vtc_keep_ratioo": 0.2}}, "vtc_keep_ratioo"),
        ({"finetune": {"vtc_keep_ratio": 0.2}}, "sections alignment, instruction only"),
        ({"instruction": ["vtc_keep_ratio"]}, "'instruction' section must map"),
    ],
)
def test_a_bad_recipe_file_names_what_is_wrong(tmp_path, recipe, message):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ValueError, match=message):
        make(tmp_path, sts_preset=str(path))


def test_a_recipe_value_out_of_range_fails_when_its_stage_is_resolved(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"instruction": {"vtc_keep_ratio": 0.0}}))
    args = make(tmp_path, sts_preset=str(path))
    with pytest.raises(ValueError, match="vtc_keep_ratio=0.0 is out of range"):
        args.for_stage("instruction")
    with pytest.raises(FileNotFoundError, match="no recipe file"):
        make(tmp_path, sts_preset=str(tmp_path / "missing.yaml"))


def test_training_with_the_preset_composes_vtc_and_lds_in_instruction_tuning(out_dir):
    trainer, recorder = train(tiny_llava(), training_args(out_dir, max_steps=3, sts_preset="sts_plus"))
    logged = [log for log in recorder.logs if "loss" in log]
    assert trainer.sts_plan.vtc and trainer.sts_plan.lds
    assert all(log["vtc_keep_ratio"] == 0.15 for log in logged)
    assert all("lds_skipped_fraction" in log and "vtc_full_token_steps" in log for log in logged)
    totals = trainer.sts_ledger.totals()
    assert totals["mean_scheduled_keep_ratio"] == pytest.approx(0.15) and totals["flops_saving"] > 0


def test_the_preset_is_the_experiments_chosen_setting():
    """docs/accuracy.md reports the preset's accuracy as this experiment variant's."""
    from sts_trainer.lab.experiment import STAGE1, STAGE2

    preset = PRESETS["sts_plus"]
    instruction = dict(preset["instruction"])
    assert instruction.pop("lds_alpha") == STSTrainingArguments.lds_alpha  # the default the variant runs with
    assert STAGE2["VTC-I uniform 0.15 + full 0.1 + LDS"] == instruction
    assert STAGE1["VTC uniform 0.5"] == preset["alignment"]
