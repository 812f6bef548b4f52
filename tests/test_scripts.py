"""The launch scripts and configs: every argument they pass is one the command line knows, with a valid value."""

import json
import os
import re
import shlex
import subprocess

import pytest
import yaml
from transformers import HfArgumentParser

from sts_trainer.arguments import STSTrainingArguments
from sts_trainer.llava.data import DataArguments
from sts_trainer.llava.train import ModelArguments

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def script_arguments(name):
    text = open(os.path.join(ROOT, "scripts", name)).read()
    command = text[text.index("--module sts_trainer.llava.train") + len("--module sts_trainer.llava.train") : text.index('"$@"')]
    command = re.sub(r"\$\{?(\w+)\}?", "x", command.replace("\\\n", " "))
    return shlex.split(command)


@pytest.mark.parametrize("name, stage", [("pretrain.sh", "alignment"), ("finetune.sh", "instruction")])
def test_launch_scripts_pass_only_known_valid_arguments(name, stage):
    args = script_arguments(name)
    parser = HfArgumentParser((ModelArguments, DataArguments, STSTrainingArguments))
    namespace, unknown = parser.parse_known_args(args)
    assert unknown == []
    assert namespace.training_stage == stage and namespace.sts_stage == "auto"
    assert os.path.isfile(os.path.join(ROOT, namespace.deepspeed))
    text = open(os.path.join(ROOT, "scripts", name)).read()
    assert text.splitlines()[1].startswith("# bash scripts/")  # opens with its exact command


@pytest.mark.parametrize("node_rank", [None, "1"], ids=["ssh", "no-ssh"])
def test_the_multinode_script_launches_finetune_from_the_hostfile(tmp_path, node_rank):
    """scripts/multinode.sh run with a stand-in `deepspeed` first on PATH that records its arguments."""
    record = tmp_path / "argv"
    fake = tmp_path / "bin" / "deepspeed"
    fake.parent.mkdir()
    fake.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {record}\n')
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{fake.parent}:{os.environ['PATH']}", MASTER_ADDR="10.0.0.1")
    if node_rank is not None:
        env["NODE_RANK"] = node_rank
    subprocess.run(["bash", os.path.join(ROOT, "scripts", "multinode.sh"), "hosts.txt", "--max_steps", "10"],
                   env=env, check=True, cwd=ROOT)
    argv = record.read_text().splitlines()
    launcher = ["--hostfile", "hosts.txt", "--master_addr", "10.0.0.1", "--master_port", "29500"]
    if node_rank is not None:
        launcher += ["--no_ssh", "--node_rank", "1"]
    assert argv[: len(launcher) + 2] == [*launcher, "--module", "sts_trainer.llava.train"]
    parser = HfArgumentParser((ModelArguments, DataArguments, STSTrainingArguments))
    namespace, unknown = parser.parse_known_args(argv[len(launcher) + 2 :])
    assert unknown == [] and namespace.training_stage == "instruction" and namespace.max_steps == 10
    assert namespace.per_device_train_batch_size == 8 and namespace.deepspeed == "configs/zero3.json"
    env.pop("MASTER_ADDR")
    missing = subprocess.run(["bash", os.path.join(ROOT, "scripts", "multinode.sh"), "hosts.txt"], env=env,
                             capture_output=True, text=True, cwd=ROOT)
    assert missing.returncode != 0 and "set MASTER_ADDR" in missing.stderr


@pytest.mark.parametrize("name", ["zero2.json", "zero3.json", "zero3_offload.json"])
def test_deepspeed_configs_leave_batch_and_precision_to_the_trainer(name):
    config = json.load(open(os.path.join(ROOT, "configs", name)))
    for key in ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps"):
        assert config[key] == "auto"
    assert config["bf16"]["enabled"] == "auto"
    assert config["_comment"].startswith("deepspeed --num_gpus")
    stage = config["zero_optimization"]["stage"]
    assert stage == (2 if name == "zero2.json" else 3)
    if stage == 3:
        assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_accelerate_config_points_at_an_existing_deepspeed_config():
    config = yaml.safe_load(open(os.path.join(ROOT, "configs", "accelerate_zero2.yaml")))
    assert config["distributed_type"] == "DEEPSPEED"
    assert os.path.isfile(os.path.join(ROOT, config["deepspeed_config"]["deepspeed_config_file"]))


def test_the_fsdp_configs_agree():
    """configs/fsdp.json (Trainer arguments) and configs/accelerate_fsdp.yaml (accelerate launch) set the same FSDP:
    version 2, layers wrapped by class, sharded checkpoints; the Trainer reads the JSON into Accelerate's plugin."""
    trainer_form = json.load(open(os.path.join(ROOT, "configs", "fsdp.json")))
    accelerate_form = yaml.safe_load(open(os.path.join(ROOT, "configs", "accelerate_fsdp.yaml")))
    assert accelerate_form["distributed_type"] == "FSDP"
    fsdp = {key.removeprefix("fsdp_"): value for key, value in accelerate_form["fsdp_config"].items()}
    assert fsdp.pop("version") == trainer_form.pop("version") == 2
    assert fsdp.pop("transformer_layer_cls_to_wrap").split(",") == trainer_form.pop("transformer_layer_cls_to_wrap")
    trainer_form.pop("_comment")
    assert fsdp == trainer_form
    args = STSTrainingArguments(output_dir="unused", fsdp="full_shard auto_wrap",
                                fsdp_config=os.path.join(ROOT, "configs", "fsdp.json"))
    assert args.fsdp_plugin_args["fsdp_version"] == 2
    assert args.fsdp_plugin_args["state_dict_type"] == "SHARDED_STATE_DICT"
    assert args.fsdp_plugin_args["transformer_cls_names_to_wrap"] == "LlamaDecoderLayer,CLIPEncoderLayer"
