"""The planner (`python -m sts_trainer.lab.plan`) on the shipped LLaVA-1.5 configs, in-process and offline."""

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
from transformers import LlamaConfig, LlavaConfig

from sts_trainer.flops import PARTS
from sts_trainer.lab.plan import load_config, main

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "models"


@pytest.fixture(scope="module", params=["llava-1.5-7b", "llava-1.5-13b"])
def report(request):
    # Run once per config: building the meta-device model is the slow part (a few seconds).
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["--model_config", str(CONFIGS / f"{request.param}.json"), "--json"])
    return request.param, json.loads(out.getvalue())


def test_report_structure(report):
    name, report = report
    assert report["model_type"] == "llava"
    assert report["visual_tokens_per_image"] == 576  # (336 / 14)^2
    assert report["decoder_layers"] == {"llava-1.5-7b": 32, "llava-1.5-13b": 40}[name]
    assert set(report["stages"]) == {"alignment", "instruction"}
    for section in (*report["stages"].values(), report["run"]):
        assert set(section["dense_flops"]) == set(section["sts_flops"]) == {*PARTS, "total"}
        assert section["dense_flops"]["total"] == pytest.approx(sum(section["dense_flops"][p] for p in PARTS))
    for part in (*PARTS, "total"):
        assert report["run"]["dense_flops"][part] == pytest.approx(
            sum(stage["dense_flops"][part] for stage in report["stages"].values())
        )


def test_sts_saves_flops_in_each_stage(report):
    _, report = report
    alignment, instruction = report["stages"]["alignment"], report["stages"]["instruction"]
    assert alignment["samples"] == 558_128 and instruction["samples"] == 665_298
    for stage in (alignment, instruction):
        assert stage["sts_flops"]["total"] < stage["dense_flops"]["total"]
        assert stage["saving"] > 0.1
        # the vision tower and the projector see every visual token and every step, in both stages
        for part in ("vision", "projector"):
            assert stage["sts_flops"][part] == stage["dense_flops"][part]
    assert alignment["kept_visual_tokens_per_image"] == 288
    # LDS over ~5.2K steps skips ~alpha / 3 of the decoder layers: the decoder-layer FLOPs shrink by that share
    assert instruction["optimizer_steps"] == 5198  # ceil(665298 / 128)
    assert instruction["executed_layer_fraction"] == pytest.approx(1 - 0.5 / 3, abs=1e-3)
    assert instruction["sts_flops"]["llm_layers"] == pytest.approx(
        instruction["executed_layer_fraction"] * instruction["dense_flops"]["llm_layers"]
    )
    assert 0 < report["run"]["saving"] < alignment["saving"]


def test_parameter_count_on_meta_device(report):
    name, report = report
    params = report["parameters"]
    assert params["total"] == params["vision"] + params["projector"] + params["language_model"]
    assert params["vision"] == pytest.approx(303.5e6, rel=1e-3)  # CLIP ViT-L/14-336
    if name == "llava-1.5-7b":
        assert params["total"] == pytest.approx(7.06e9, rel=1e-3)  # llava-hf/llava-1.5-7b-hf: 7,063,427,072
    else:
        assert params["total"] == pytest.approx(13.35e9, rel=1e-3)


def test_table_output(capsys):
    main(["--model_config", str(CONFIGS / "llava-1.5-7b.json"), "--vtc_keep_ratio", "0.25"])
    table = capsys.readouterr().out
    for expected in ("alignment", "instruction", "whole run", "saving", "dense EFLOP", "STS EFLOP", "7.06B",
                     "VTC keeps 144 of 576"):
        assert expected in table


def test_load_config_from_directory(tmp_path):
    shutil.copy(CONFIGS / "llava-1.5-13b.json", tmp_path / "config.json")
    config = load_config(str(tmp_path))
    assert isinstance(config, LlavaConfig)
    assert config.text_config.hidden_size == 5120 and config.image_token_id == 32000
    with pytest.raises(FileNotFoundError):
        load_config(str(tmp_path / "missing"))


def test_text_only_model_is_refused(tmp_path):
    text_only = LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2)
    text_only.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="text-only"):
        main(["--model_config", str(tmp_path)])


def _plan(*extra):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["--model_config", str(CONFIGS / "llava-1.5-7b.json"), *extra])
    return out.getvalue()


def test_the_sts_plus_recipe_saves_more_than_half_of_a_llava_run():
    table = _plan("--sts_config", str(CONFIGS.parent / "sts_plus.yaml"))
    last = table.strip().splitlines()[-1].split()
    assert last[:2] == ["whole", "run"] and float(last[-1].rstrip("%")) >= 55.0
    assert any(line.startswith("DualSpeed ") and line.endswith("%") for line in table.splitlines())
    report = json.loads(_plan("--sts_config", "sts_plus", "--json"))
    assert report["run"]["saving"] >= 0.55 and report["run"]["saving"] == pytest.approx(float(last[-1][:-1]) / 100, abs=5e-4)
    instruction = report["stages"]["instruction"]
    assert instruction["vtc"] and instruction["lds"] and instruction["full_token_fraction"] == 0.1
    assert instruction["kept_visual_tokens_per_image"] == pytest.approx(0.9 * 86 + 0.1 * 576)  # 15% of 576 is 86
    dualspeed = report["dualspeed"]["stages"]
    assert dualspeed["alignment"]["saving"] == 0 and dualspeed["instruction"]["self_distillation"]
    assert 0 < report["dualspeed"]["run"]["saving"] < report["run"]["saving"]


def _instruction(tmp_path, name, **options):
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps({"instruction": {"sts_vtc": "on", "sts_lds": "off", "vtc_keep_ratio": 0.1, **options}}))
    return json.loads(_plan("--sts_config", str(path), "--json"))["stages"]["instruction"]


def test_full_token_steps_and_self_distillation_are_priced(tmp_path):
    from sts_trainer.flops import TrainingStep, step_flops
    from sts_trainer.lab.plan import load_config as load

    pruned = _instruction(tmp_path, "pruned")
    full = _instruction(tmp_path, "full", vtc_full_token_fraction=0.1)
    distilled = _instruction(tmp_path, "distilled", vtc_full_token_fraction=0.1, vtc_distill_weight=1.0)
    assert pruned["saving"] > full["saving"] > distilled["saving"] > 0
    # per sample: 90% pruned steps, 10% full steps plus a forward of the pruned sequence (no backward)
    config = load(str(CONFIGS / "llava-1.5-7b.json"))
    shape = TrainingStep(1, 256, 1, 576, train_projector=True, train_llm=True)
    frozen = TrainingStep(1, 256, 1, 576)
    expected = (0.9 * step_flops(config, shape, 58)["total"]
                + 0.1 * (step_flops(config, shape)["total"] + step_flops(config, frozen, 58)["total"]))
    assert distilled["sts_flops"]["total"] == pytest.approx(expected * distilled["samples"])


@pytest.mark.parametrize("schedule", ["linear", "cosine", "step"])
def test_a_keep_schedule_rising_to_one_is_priced_step_by_step(tmp_path, schedule):
    constant = _instruction(tmp_path, "constant")
    rising = _instruction(tmp_path, schedule, vtc_keep_schedule=schedule, vtc_keep_ratio_end=1.0,
                          vtc_keep_schedule_fraction=0.5)
    # half the stage rises from 0.1 to 1.0, the other half keeps every token
    assert 0 < rising["saving"] < constant["saving"]
    assert 0.5 * 58 < rising["kept_visual_tokens_per_image"] - 0.5 * 576 < 0.5 * 576


def _lds_instruction(tmp_path, name, *flags, **options):
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps({"instruction": {"sts_lds": "on", **options}}))
    return json.loads(_plan("--sts_config", str(path), "--json", *flags))["stages"]["instruction"]


def test_lds_following_the_learning_rate_mass_is_priced_with_the_schedule(tmp_path):
    steps = _lds_instruction(tmp_path, "steps")
    mass = _lds_instruction(tmp_path, "mass", lds_progress="lr_mass")
    # cosine with 3% warm-up (LLaVA-1.5's): the mass runs ahead of the steps, so less is skipped
    assert 0 < mass["saving"] < 0.75 * steps["saving"]
    # a constant learning rate: mass and steps are the same progress
    flat = _lds_instruction(tmp_path, "flat", "--lr_scheduler_type", "constant", "--warmup_ratio", "0",
                            lds_progress="lr_mass")
    assert flat["saving"] == pytest.approx(steps["saving"], rel=1e-9)
