"""The command line end to end on the demo's synthetic data: both stages, LoRA, resume, bad input, chat templates,
option checks, DeepSpeed."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoProcessor, CLIPVisionModel, LlamaForCausalLM, LlavaForConditionalGeneration

from sts_trainer import STSTrainingArguments
from sts_trainer.lab.demo import DemoArguments, build_assets
from sts_trainer.lab.synthetic import write_dataset
from sts_trainer.llava.data import CHAT_TEMPLATE
from sts_trainer.llava.train import check_stages, main, parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    demo = DemoArguments(output_dir=str(root), foundation="random", hidden_size=32, num_layers=4)
    assets = build_assets(demo)
    alignment = write_dataset(str(root / "data"), 24, "train", 0, "alignment")
    instruction = write_dataset(str(root / "data"), 24, "train", 0, "instruction")
    return {"root": root, **assets, "alignment": alignment, "instruction": instruction}


def common(out, steps=3, **extra):
    args = ["--output_dir", str(out), "--max_steps", str(steps), "--per_device_train_batch_size", "4",
            "--learning_rate", "1e-3", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
            "--disable_tqdm", "True", "--seed", "0"]
    for key, value in extra.items():
        args += [f"--{key}", str(value)]
    return args


def data(world, stage):
    return ["--data_path", world[stage]["data_path"], "--image_folder", world[stage]["image_folder"]]


@pytest.fixture(scope="module")
def stage1(world):
    out = world["root"] / "stage1"
    summary = main(["--language_model", world["language_model"], "--vision_tower", world["vision_tower"],
                    "--training_stage", "alignment", *data(world, "alignment"), *common(out)])
    return out, summary


def test_stage1_composes_trains_the_projector_with_vtc_and_saves_plain_checkpoints(world, stage1):
    out, summary = stage1
    assert summary["stage"] == "alignment" and summary["steps"] == 3
    assert summary["sts"]["stage"] == "alignment" and summary["sts"]["mean_kept_visual_fraction"] == 0.5
    assert summary["sts"]["flops_saving"] > 0
    model = LlavaForConditionalGeneration.from_pretrained(out)  # plain transformers
    processor = AutoProcessor.from_pretrained(out)
    assert model.config.image_token_id == processor.image_token_id
    # frozen parts are exactly the pretrained ones they were composed from
    language_model = LlamaForCausalLM.from_pretrained(world["language_model"])
    vision = CLIPVisionModel.from_pretrained(world["vision_tower"])
    assert all(torch.equal(a, b) for a, b in zip(model.model.language_model.parameters(), language_model.model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(model.model.vision_tower.parameters(), vision.parameters()))
    projector = load_file(out / "mm_projector.safetensors")
    assert set(projector) == {f"model.multi_modal_projector.{k}" for k in model.model.multi_modal_projector.state_dict()}
    assert torch.equal(projector["model.multi_modal_projector.linear_1.weight"], model.model.multi_modal_projector.linear_1.weight)
    assert (out / "sts_savings.json").exists() and (out / "sts_train_summary.json").exists()


def test_stage2_from_stage1_trains_the_language_model_with_lds(world, stage1):
    out = world["root"] / "stage2"
    summary = main(["--model_name_or_path", str(stage1[0]), "--training_stage", "instruction",
                    *data(world, "instruction"), *common(out, lds_alpha=1.0, lds_schedule="constant")])
    assert summary["sts"]["stage"] == "instruction" and summary["sts"]["mean_skipped_layer_fraction"] > 0.2
    before = LlavaForConditionalGeneration.from_pretrained(stage1[0])
    after = LlavaForConditionalGeneration.from_pretrained(out)
    assert not torch.equal(before.model.language_model.layers[0].mlp.up_proj.weight, after.model.language_model.layers[0].mlp.up_proj.weight)
    assert torch.equal(before.model.vision_tower.embeddings.patch_embedding.weight,
                       after.model.vision_tower.embeddings.patch_embedding.weight)


def test_lora_with_merge(world, stage1):
    out = world["root"] / "lora"
    summary = main(["--model_name_or_path", str(stage1[0]), "--training_stage", "instruction", "--lora_enable",
                    "--lora_r", "4", "--lora_alpha", "8", "--merge_lora", "--projector_lr", "1e-2",
                    *data(world, "instruction"), *common(out, learning_rate=1e-2)])
    assert summary["sts"]["stage"] == "instruction"  # LoRA on the language model counts as training it
    assert (out / "adapter_model.safetensors").exists()
    merged = LlavaForConditionalGeneration.from_pretrained(out / "merged")
    base = LlavaForConditionalGeneration.from_pretrained(stage1[0])
    assert set(merged.state_dict()) == set(base.state_dict())
    changed = [n for n, p in merged.named_parameters() if not torch.equal(p, base.state_dict()[n])]
    assert any("q_proj" in n for n in changed) and any("multi_modal_projector" in n for n in changed)
    assert not any("vision_tower" in n for n in changed)


def test_resume_from_a_checkpoint_gives_the_uninterrupted_result(world, stage1):
    args = ["--model_name_or_path", str(stage1[0]), "--training_stage", "instruction", *data(world, "instruction")]
    full = world["root"] / "full"
    main([*args, *common(full, steps=4, save_strategy="steps", save_steps=2)])
    resumed = world["root"] / "resumed"
    os.makedirs(resumed)
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    main([*args, *common(resumed, steps=4, save_strategy="steps", save_steps=2,
                         resume_from_checkpoint=resumed / "checkpoint-2")])
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    initial = LlavaForConditionalGeneration.from_pretrained(stage1[0])
    final = LlavaForConditionalGeneration.from_pretrained(resumed)
    assert not torch.equal(initial.lm_head.weight, final.lm_head.weight)


def test_arguments_from_a_yaml_file(world, stage1, tmp_path):
    settings = {"model_name_or_path": str(stage1[0]), "training_stage": "instruction",
                "data_path": world["instruction"]["data_path"], "image_folder": world["instruction"]["image_folder"],
                "output_dir": str(tmp_path / "out"), "max_steps": 1, "per_device_train_batch_size": 2,
                "report_to": "none", "save_strategy": "no", "sts_stage": "none"}
    path = tmp_path / "args.yaml"
    path.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in settings.items()))
    summary = main([str(path)])
    assert summary["steps"] == 1 and summary["sts"] is None


def bad_dataset(world, tmp_path, case):
    image_folder = world["instruction"]["image_folder"]
    records = json.load(open(world["instruction"]["data_path"]))[:4]
    bad = dict(records[2], id="bad-one")
    if case == "missing image":
        bad["image"] = "train/nowhere.png"
    elif case == "unreadable image":
        broken = os.path.join(image_folder, "train", "broken.png")
        with open(broken, "w") as f:
            f.write("not a png")
        bad["image"] = "train/broken.png"
    elif case == "image outside image_folder":
        bad["image"] = "../../../etc/passwd"
    elif case == "image count mismatch":
        bad["conversations"] = [dict(bad["conversations"][0], value="<image><image>\nTwo?"), bad["conversations"][1]]
    elif case == "no assistant turn":
        bad["conversations"] = bad["conversations"][:1]
    records[2] = bad
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(records))
    return ["--data_path", str(path), "--image_folder", image_folder]


@pytest.mark.parametrize(
    "case", ["missing image", "unreadable image", "image outside image_folder", "image count mismatch", "no assistant turn"]
)
def test_bad_samples_are_named_or_skipped(world, stage1, tmp_path, case):
    args = ["--model_name_or_path", str(stage1[0]), "--training_stage", "instruction", *bad_dataset(world, tmp_path, case)]
    with pytest.raises(ValueError, match=rf"Bad sample id='bad-one' \(index 2 .*{case}"):
        main([*args, *common(tmp_path / "strict", steps=1)])
    summary = main([*args, "--skip_bad_samples", *common(tmp_path / "skip", steps=1)])
    assert summary["skipped_samples"] == 1


def test_truncation_through_image_tokens_is_named(world, stage1, tmp_path):
    args = ["--model_name_or_path", str(stage1[0]), "--training_stage", "instruction", *data(world, "instruction")]
    with pytest.raises(ValueError, match=r"Bad sample id='train-s0-000000' \(index 0 .*truncated through image tokens"):
        main([*args, "--model_max_length", "10", *common(tmp_path, steps=1)])


# The last: the sts_plus recipe (VTC and LDS composed in instruction tuning), with full-token steps and
# self-distillation's extra no-grad forward, under ZeRO-3.
STS_PLUS = ["--sts_preset", "sts_plus", "--vtc_full_token_fraction", "0.5", "--vtc_distill_weight", "1.0"]


@pytest.mark.parametrize(
    "zero, stage, extra",
    [("zero2", "alignment", []), ("zero3", "alignment", []), ("zero3", "instruction", []),
     ("zero3", "instruction", STS_PLUS)],
    ids=["zero2-alignment", "zero3-alignment", "zero3-instruction", "zero3-sts_plus"],
)
def test_two_processes_with_the_deepspeed_launcher(world, stage1, tmp_path, zero, stage, extra):
    if stage == "alignment":  # composing a new model under ZeRO-3 too
        model = ["--language_model", world["language_model"], "--vision_tower", world["vision_tower"]]
    else:
        model = ["--model_name_or_path", str(stage1[0])]
    out = tmp_path / "out"
    command = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2", "--master_port", "29631",
               "--module", "sts_trainer.llava.train", *model, "--training_stage", stage, *data(world, stage),
               "--deepspeed", os.path.join(ROOT, "configs", f"{zero}.json"), *common(out, steps=3), *extra]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    summary = json.loads((out / "sts_train_summary.json").read_text())
    assert summary["steps"] == 3 and summary["sts"]["stage"] == stage and summary["world_size"] == 2
    if extra:
        totals = summary["sts"]
        assert totals["mean_scheduled_keep_ratio"] == pytest.approx(0.15) and totals["full_token_steps"] >= 1
        assert totals["mean_skipped_layer_fraction"] is not None
    model = LlavaForConditionalGeneration.from_pretrained(out)
    assert model.lm_head.weight.shape[0] == len(AutoProcessor.from_pretrained(out).tokenizer)
    if stage == "alignment":
        projector = load_file(out / "mm_projector.safetensors")
        assert torch.equal(projector["model.multi_modal_projector.linear_2.weight"], model.model.multi_modal_projector.linear_2.weight)


def text_only_rank_data(world, stage, tmp_path, batch=2, world_size=2):
    """LLaVA-format data in an order where, read sequentially, rank 1's batches are text-only (the human turn without
    its <image>, no 'image') and rank 0's have one image per sample."""
    records = json.load(open(world[stage]["data_path"]))[:16]
    for i, record in enumerate(records):
        if (i // batch) % world_size == 1:
            del record["image"]
            turn = record["conversations"][0]
            turn["value"] = turn["value"].replace("<image>\n", "")
    path = tmp_path / "text_only_rank.json"
    path.write_text(json.dumps(records))
    return ["--data_path", str(path), "--image_folder", world[stage]["image_folder"]]


@pytest.mark.parametrize("stage, blank", [("alignment", "auto"), ("instruction", "auto"), ("instruction", "off")])
def test_zero3_where_one_rank_has_no_images_completes_without_modality_grouping(world, stage1, tmp_path, stage, blank):
    """The deepspeed launcher, ZeRO-3, 2 CPU processes, no --group_by_modality_length: a batch without images runs
    the blank image (sts_blank_image='auto'), so both ranks gather the vision tower's parameters every step. With
    sts_blank_image='off' the same run stops at its first step with an error naming the option."""
    if stage == "alignment":
        model = ["--language_model", world["language_model"], "--vision_tower", world["vision_tower"]]
    else:
        model = ["--model_name_or_path", str(stage1[0])]
    out = tmp_path / "out"
    command = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2", "--master_port", "29632",
               "--module", "sts_trainer.llava.train", *model, "--training_stage", stage,
               *text_only_rank_data(world, stage, tmp_path), "--deepspeed", os.path.join(ROOT, "configs", "zero3.json"),
               *common(out, steps=3, per_device_train_batch_size=2, train_sampling_strategy="sequential",
                       sts_blank_image=blank)]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    if blank == "off":
        assert result.returncode != 0 and "have images on 1 of 2 ranks" in result.stderr
        return
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    assert "a batch without images runs the vision tower and projector on a blank image" in result.stderr + result.stdout
    summary = json.loads((out / "sts_train_summary.json").read_text())
    assert summary["steps"] == 3 and summary["sts"]["stage"] == stage and summary["world_size"] == 2
    LlavaForConditionalGeneration.from_pretrained(out)


def test_projector_learning_rate_and_modality_grouping(world, stage1, tmp_path):
    from transformers import AutoModelForImageTextToText

    from sts_trainer.arguments import STSTrainingArguments
    from sts_trainer.llava.data import DataArguments, LazyLlavaDataset, ModalityLengthGroupedSampler
    from sts_trainer.llava.train import LlavaTrainer, ModelArguments, set_trainable

    model = AutoModelForImageTextToText.from_pretrained(stage1[0])
    processor = AutoProcessor.from_pretrained(stage1[0])
    model = set_trainable(model, ModelArguments(model_name_or_path=str(stage1[0]), training_stage="instruction"))
    dataset = LazyLlavaDataset.from_arguments(
        DataArguments(data_path=world["instruction"]["data_path"], image_folder=world["instruction"]["image_folder"]),
        processor,
    )
    args = STSTrainingArguments(output_dir=str(tmp_path), learning_rate=1e-4, per_device_train_batch_size=3,
                                report_to=[], use_cpu=True)
    trainer = LlavaTrainer(model=model, args=args, train_dataset=dataset, projector_lr=5e-3, group_by_modality=True)
    optimizer = trainer.create_optimizer()
    projector = {id(p) for p in model.model.multi_modal_projector.parameters()}
    for group in optimizer.param_groups:
        is_projector = {id(p) in projector for p in group["params"]}
        assert len(is_projector) == 1  # a group is all projector or none of it
        assert group["lr"] == (5e-3 if is_projector.pop() else 1e-4)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == sum(p.requires_grad for p in model.parameters())
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, ModalityLengthGroupedSampler)
    assert sorted(sampler) == list(range(len(dataset)))


NO_GENERATION_TEMPLATE = CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")


@pytest.fixture(scope="module")
def no_generation_model(world, stage1):
    """Stage 1's output with a chat template like most hub processors': no {% generation %} block."""
    path = world["root"] / "no_generation"
    shutil.copytree(stage1[0], path)
    (path / "chat_template.jinja").write_text(NO_GENERATION_TEMPLATE)
    assert AutoProcessor.from_pretrained(path).chat_template == NO_GENERATION_TEMPLATE
    return str(path)


@pytest.fixture(scope="module")
def no_generation_language_model(world):
    """The language model to compose from, its tokenizer shipping a chat template without a {% generation %} block."""
    path = world["root"] / "no_generation_language_model"
    shutil.copytree(world["language_model"], path)
    (path / "chat_template.jinja").write_text(NO_GENERATION_TEMPLATE)
    return str(path)


@pytest.mark.parametrize("source, choice", [("processor", "auto"), ("processor", "llava"), ("tokenizer", "auto")])
def test_chat_template_without_generation_block_falls_back_to_llava(
    world, no_generation_model, no_generation_language_model, tmp_path, caplog, source, choice
):
    if source == "processor":
        model = ["--model_name_or_path", no_generation_model]
    else:  # composing: the processor takes the tokenizer's template
        model = ["--language_model", no_generation_language_model, "--vision_tower", world["vision_tower"]]
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="sts_trainer"):
        summary = main([*model, "--training_stage", "instruction", "--chat_template", choice,
                        *data(world, "instruction"), *common(out, steps=1)])
    assert summary["steps"] == 1
    assert AutoProcessor.from_pretrained(out).chat_template == CHAT_TEMPLATE  # what stage 2 / inference will use
    warnings = [r.getMessage() for r in caplog.records if "--chat_template" in r.getMessage()]
    assert len(warnings) == (choice == "auto")


def test_chat_template_processor_or_a_file(world, no_generation_model, tmp_path):
    args = ["--model_name_or_path", no_generation_model, "--training_stage", "instruction", *data(world, "instruction")]
    with pytest.raises(ValueError, match="--chat_template processor: .*--chat_template auto or llava"):
        main([*args, "--chat_template", "processor", *common(tmp_path / "processor", steps=1)])
    template = tmp_path / "template.jinja"
    template.write_text(CHAT_TEMPLATE + "{# from a file #}")
    summary = main([*args, "--chat_template", str(template), *common(tmp_path / "file", steps=1)])
    assert summary["steps"] == 1
    assert AutoProcessor.from_pretrained(tmp_path / "file").chat_template == template.read_text()
    template.write_text(NO_GENERATION_TEMPLATE)
    with pytest.raises(ValueError, match=re.escape(f"{template} (--chat_template) has no {{% generation %}} block")):
        main([*args, "--chat_template", str(template), *common(tmp_path / "bad", steps=1)])


@pytest.mark.parametrize("value", ["-1", "0", "inf", "nan"])
def test_projector_lr_must_be_positive_and_finite(tmp_path, value):
    with pytest.raises(ValueError, match="--projector_lr must be a positive, finite learning rate"):
        parse(["--model_name_or_path", "m", "--projector_lr", value, "--output_dir", str(tmp_path)])


@pytest.mark.parametrize(
    "training_stage, sts_stage, warns",
    [("alignment", "instruction", True), ("instruction", "alignment", True), ("alignment", "alignment", False),
     ("instruction", "auto", False), ("alignment", "none", False)],
)
def test_sts_stage_naming_the_other_training_stage_warns(tmp_path, caplog, training_stage, sts_stage, warns):
    model_args, _, training_args = parse(["--model_name_or_path", "m", "--training_stage", training_stage,
                                          "--sts_stage", sts_stage, "--output_dir", str(tmp_path)])
    with caplog.at_level(logging.WARNING, logger="sts_trainer"):
        check_stages(model_args, training_args)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == warns
    if warns:
        assert f"--sts_stage {sts_stage} overrides what --training_stage {training_stage} would pick" in messages[0]


def test_the_command_line_honours_the_parts_the_user_names(out_dir):
    """--sts_projector (and the other two part options) reach set_trainable, the projector learning rate and the saved
    projector, as they reach the trainer."""
    from sts_trainer.lab.tiny import tiny_llava
    from sts_trainer.llava.train import ModelArguments, model_parts, set_trainable

    named = STSTrainingArguments(output_dir=out_dir, use_cpu=True, report_to=[], sts_projector="model.multi_modal_projector.linear_2")
    model = set_trainable(tiny_llava(), ModelArguments(model_name_or_path="unused", training_stage="alignment"), named)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"model.multi_modal_projector.linear_2.weight", "model.multi_modal_projector.linear_2.bias"}
    assert model_parts(model, named).projector is model.model.multi_modal_projector.linear_2
    assert model_parts(model).projector is model.model.multi_modal_projector  # the architecture's own, unnamed
