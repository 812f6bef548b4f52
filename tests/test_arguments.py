import dataclasses

import pytest
from transformers import HfArgumentParser, TrainingArguments

from sts_trainer import STSTrainingArguments

STS_FIELDS = [f for f in dataclasses.fields(STSTrainingArguments) if f.name.startswith(("sts_", "vtc_", "lds_"))]


def make(tmp_path, **kwargs):
    return STSTrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, **kwargs)


def test_defaults(tmp_path):
    args = make(tmp_path)
    assert (args.sts_stage, args.sts_vtc, args.sts_lds) == ("auto", "auto", "auto")
    assert (args.vtc_keep_ratio, args.vtc_strategy, args.vtc_position_ids) == (0.5, "uniform", "compact")
    assert (args.lds_alpha, args.lds_epsilon, args.lds_schedule) == (0.5, 0.5, "quadratic")


@pytest.mark.parametrize(
    "option, value",
    [
        ("sts_stage", "pretrain"),
        ("sts_vtc", "yes"),
        ("sts_lds", True),
        ("vtc_strategy", "topk"),
        ("vtc_position_ids", "shifted"),
        ("lds_schedule", "cosine"),
        ("lds_progress", "time"),
        ("lds_layer_order", "width"),
        ("lds_rerank_every", 0),
        ("vtc_keep_ratio", 0.0),
        ("vtc_keep_ratio", 1.5),
        ("vtc_keep_ratio", -0.1),
        ("lds_alpha", -0.01),
        ("lds_alpha", 1.01),
        ("lds_epsilon", -1.0),
        ("lds_epsilon", 2.0),
        ("vtc_keep_schedule", "exponential"),
        ("vtc_keep_ratio_end", 0.0),
        ("vtc_keep_schedule_fraction", 1.5),
        ("vtc_full_token_fraction", 1.0),
        ("vtc_full_token_fraction", -0.1),
        ("vtc_distill_weight", -1.0),
        ("vtc_mode_isolator", -1),
        ("vtc_mode_isolator", 1.5),
        ("vtc_mode_isolator", True),
        ("sts_preset", "fastest"),
    ],
)
def test_bad_value_names_the_option(tmp_path, option, value):
    with pytest.raises(ValueError, match=rf"^{option}="):
        make(tmp_path, **{option: value})


@pytest.mark.parametrize("option, value", [("vtc_keep_ratio", 1.0), ("lds_alpha", 0.0), ("lds_alpha", 1.0), ("lds_epsilon", 0.0),
                                           ("vtc_full_token_fraction", 0.0), ("vtc_keep_schedule_fraction", 1.0),
                                           ("vtc_strategy", "diverse"), ("sts_preset", "sts_plus")])
def test_boundary_values_are_valid(tmp_path, option, value):
    assert getattr(make(tmp_path, **{option: value}), option) == value


def test_every_option_has_help_and_choices_are_enforced_on_the_command_line(tmp_path, capsys):
    for f in STS_FIELDS:
        assert len(f.metadata.get("help", "")) > 30, f.name
    parser = HfArgumentParser(STSTrainingArguments)
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--help"])
    usage = capsys.readouterr().out
    for f in STS_FIELDS:
        assert f"--{f.name}" in usage
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--vtc_strategy", "best"])
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--use_cpu", "--sts_stage", "alignment", "--vtc_keep_ratio", "0.25"]
    )
    assert args.sts_stage == "alignment" and args.vtc_keep_ratio == 0.25


def test_plain_training_arguments_are_upgraded_without_losing_values(tmp_path):
    plain = TrainingArguments(output_dir=str(tmp_path), learning_rate=3e-4, max_steps=7, report_to=[], use_cpu=True)
    args = STSTrainingArguments.from_training_arguments(plain)
    assert isinstance(args, STSTrainingArguments)
    assert (args.learning_rate, args.max_steps, args.output_dir) == (3e-4, 7, str(tmp_path))
    assert args.sts_stage == "auto" and args.vtc_keep_ratio == 0.5
    assert not hasattr(plain, "sts_stage")  # the user's object is left alone
    assert args.to_dict()["lds_alpha"] == 0.5


def test_the_mode_isolator_needs_compact_positions(tmp_path):
    with pytest.raises(ValueError, match=r"^vtc_mode_isolator=4 needs vtc_position_ids='compact'"):
        make(tmp_path, vtc_mode_isolator=4, vtc_position_ids="original")
    assert make(tmp_path, vtc_mode_isolator=4).vtc_mode_isolator == 4
