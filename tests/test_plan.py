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
