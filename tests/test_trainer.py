import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback

from sts_trainer import STSTrainer, plan_sparsity
from sts_trainer.layer_skip import _SkippableLayer
from sts_trainer.tiny import freeze_for_alignment, tiny_llava

from .helpers import plain_training_args, train, training_args


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("frozen", [False, True], ids=["full", "alignment"])
def test_stage_none_trains_exactly_like_trainer(out_dir, frozen):
    models = [tiny_llava(seed=1), tiny_llava(seed=1)]
    if frozen:
        models = [freeze_for_alignment(m) for m in models]
    _, plain = train(models[0], plain_training_args(out_dir), trainer_cls=Trainer)
    _, sts = train(models[1], training_args(out_dir, sts_stage="none"))
    assert len(plain.losses) == 4
    assert plain.losses == sts.losses  # bit for bit
    assert_same_weights(models[0], models[1])


def test_plain_training_arguments_are_accepted(out_dir):
    trainer = STSTrainer(model=tiny_llava(), args=plain_training_args(out_dir))
    assert trainer.args.sts_stage == "auto" and trainer.args.max_steps == 4


def test_stage_detection(out_dir):
    args = training_args(out_dir)
    full = tiny_llava()
    assert plan_sparsity(full, args).stage == "instruction"
    aligned = freeze_for_alignment(tiny_llava())
    plan = plan_sparsity(aligned, args)
    assert (plan.stage, plan.vtc, plan.lds) == ("alignment", True, False)

    lora = tiny_llava()
    for p in lora.parameters():
        p.requires_grad = False
    lora = get_peft_model(lora, LoraConfig(r=4, target_modules=r".*language_model.*\.(q_proj|v_proj)"))
    assert any(p.requires_grad for n, p in lora.named_parameters() if "lora_" in n)
    plan = plan_sparsity(lora, args)
    assert (plan.stage, plan.vtc, plan.lds) == ("instruction", False, True)

    # Nothing of the LLM trainable except LoRA on the vision tower: still alignment.
    vision_lora = tiny_llava()
    for p in vision_lora.parameters():
        p.requires_grad = False
    vision_lora = get_peft_model(vision_lora, LoraConfig(r=4, target_modules=r".*vision_tower.*\.(q_proj|v_proj)"))
    assert plan_sparsity(vision_lora, args).stage == "alignment"


def test_explicit_stage_and_switches(out_dir):
    model = tiny_llava()  # fully trainable: 'auto' would say instruction
    plan = plan_sparsity(model, training_args(out_dir, sts_stage="alignment"))
    assert (plan.vtc, plan.lds) == (True, False)
    plan = plan_sparsity(model, training_args(out_dir, sts_stage="instruction", sts_vtc="on"))
    assert (plan.vtc, plan.lds) == (True, True)
    plan = plan_sparsity(model, training_args(out_dir, sts_lds="off"))
    assert (plan.stage, plan.vtc, plan.lds) == ("instruction", False, False)
    plan = plan_sparsity(model, training_args(out_dir, sts_stage="none"))
    assert (plan.vtc, plan.lds, plan.parts) == (False, False, None)
    plan = plan_sparsity(model, training_args(out_dir, sts_stage="none", sts_lds="on"))
    assert (plan.vtc, plan.lds) == (False, True)


def test_vtc_on_a_text_only_model_is_an_error(out_dir):
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=64)
    with pytest.raises(ValueError, match="sts_vtc='on'"):
        plan_sparsity(LlamaForCausalLM(config), training_args(out_dir, sts_vtc="on"))


class SeamProbe(TrainerCallback):
    """What the model looks like while training runs."""

    def __init__(self, model):
        self.model = model
        self.layer_classes = None
        self.pre_hooks = None

    def on_step_begin(self, args, state, control, **kwargs):
        self.layer_classes = [type(layer) for layer in self.model.model.language_model.layers]
        self.pre_hooks = len(self.model._forward_pre_hooks)


@pytest.mark.parametrize("frozen", [False, True], ids=["instruction", "alignment"])
def test_components_are_installed_for_the_stage_and_removed_after(out_dir, frozen, caplog):
    model = tiny_llava()
    if frozen:
        freeze_for_alignment(model)
    original = [type(layer) for layer in model.model.language_model.layers]
    keys = set(model.state_dict())
    probe = SeamProbe(model)
    with caplog.at_level("INFO", logger="sts_trainer"):
        trainer, _ = train(model, training_args(out_dir, max_steps=1), callbacks=[probe])
    assert trainer.sts_plan.stage == ("alignment" if frozen else "instruction")
    assert f"stage={trainer.sts_plan.stage}" in caplog.text
    if frozen:  # VTC: a pre-hook on the model, layers untouched
        assert probe.pre_hooks == 1 and probe.layer_classes == original
    else:  # LDS: skippable layers, no hook
        assert probe.pre_hooks == 0
        assert all(issubclass(cls, _SkippableLayer) for cls in probe.layer_classes)
    assert [type(layer) for layer in model.model.language_model.layers] == original
    assert len(model._forward_pre_hooks) == 0
    assert set(model.state_dict()) == keys
