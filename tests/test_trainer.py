import copy
import json
import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    Dinov2Config,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from sts_trainer import STSMixin, STSTrainer, plan_sparsity
from sts_trainer.lab.tiny import collate, freeze_for_alignment, tiny_llava, tiny_llava_config
from sts_trainer.layer_skip import _SkippableLayer
from sts_trainer.savings import STATE_FILE

from .helpers import ListDataset, LossRecorder, plain_training_args, tiny_dataset, train, training_args


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


# ---- a drop-in on any model: 'auto' leaves a model STS cannot sparsify to plain Trainer ------------------------------


class Regressor(nn.Module):
    """A custom model Trainer trains: no config, no decoder layers."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, x, labels=None):
        prediction = self.net(x).squeeze(-1)
        return {"loss": F.mse_loss(prediction, labels), "logits": prediction}


def _gpt2():
    torch.manual_seed(3)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32))


def _bert():
    torch.manual_seed(3)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        vocab_size=64, max_position_embeddings=32, num_labels=3)
    return BertForSequenceClassification(config)


def _samples(kind, n=24):
    generator = torch.Generator().manual_seed(7)
    if kind == "regressor":
        x = torch.randn(n, 4, generator=generator)
        return [{"x": x[i], "labels": x[i].sum()} for i in range(n)]
    ids = torch.randint(1, 64, (n, 12), generator=generator)
    if kind == "gpt2":
        return [{"input_ids": ids[i], "labels": ids[i]} for i in range(n)]
    return [{"input_ids": ids[i], "attention_mask": torch.ones(12, dtype=torch.long), "labels": ids[i, 0] % 3}
            for i in range(n)]


UNKNOWN_MODELS = {"gpt2": _gpt2, "bert": _bert, "regressor": Regressor}


def _run(trainer_cls, kind, out, resume=None, **overrides):
    args = plain_training_args(
        out, max_steps=6, per_device_train_batch_size=4, eval_strategy="steps", eval_steps=2, save_strategy="steps",
        save_steps=2, load_best_model_at_end=True, metric_for_best_model="eval_loss", learning_rate=0.05, **overrides
    )
    recorder = LossRecorder()
    model = UNKNOWN_MODELS[kind]()
    samples = _samples(kind)
    trainer = trainer_cls(model=model, args=args, train_dataset=ListDataset(samples[:16]),
                          eval_dataset=ListDataset(samples[16:]), callbacks=[recorder])
    trainer.train(resume_from_checkpoint=resume)
    predictions = trainer.predict(ListDataset(samples[16:])).predictions
    return trainer, recorder, model, predictions


def _checkpoint_files(out):
    return sorted(os.path.relpath(os.path.join(root, name), out) for root, _, names in os.walk(out) for name in names)


@pytest.mark.parametrize("kind", sorted(UNKNOWN_MODELS))
def test_auto_on_a_model_sts_cannot_sparsify_trains_exactly_like_trainer(kind, tmp_path, caplog):
    plain, plain_log, plain_model, plain_predictions = _run(Trainer, kind, str(tmp_path / "plain"))
    with caplog.at_level("WARNING", logger="sts_trainer"):
        sts, sts_log, sts_model, sts_predictions = _run(STSTrainer, kind, str(tmp_path / "sts"))
    assert sts.sts_plan.stage == "none" and sts.sts_plan.not_sparsified
    assert len(plain_log.losses) == 6 and plain_log.losses == sts_log.losses  # bit for bit
    eval_losses = [[log["eval_loss"] for log in r.logs if "eval_loss" in log] for r in (plain_log, sts_log)]
    assert len(eval_losses[0]) == 3 and eval_losses[0] == eval_losses[1]
    assert plain.state.best_model_checkpoint.replace("plain", "sts") == sts.state.best_model_checkpoint
    assert_same_weights(plain_model, sts_model)  # the best checkpoint, restored at the end
    assert torch.equal(torch.as_tensor(plain_predictions), torch.as_tensor(sts_predictions))
    assert plain.state.total_flos == sts.state.total_flos
    # the same folder as Trainer's: nothing sparsified, no report (the warning says why)
    assert _checkpoint_files(tmp_path / "plain") == _checkpoint_files(tmp_path / "sts")
    report = sts.sts_ledger.totals()
    assert report["sparsified"] is False and "does not know the architecture" in report["not_sparsified_reason"]
    warnings = [r.getMessage() for r in caplog.records if "not sparsified" in r.getMessage()]
    assert len(warnings) == 1 and "sts_decoder_layers" in warnings[0]
    assert (type(sts_model).__name__ if kind == "regressor" else f"'{kind}'") in warnings[0]

    # resume: the second half from checkpoint-2 equals Trainer's resumed run
    resumed_plain = _run(Trainer, kind, str(tmp_path / "plain"), resume=str(tmp_path / "plain" / "checkpoint-2"))
    resumed_sts = _run(STSTrainer, kind, str(tmp_path / "sts"), resume=str(tmp_path / "sts" / "checkpoint-2"))
    assert resumed_plain[1].losses == resumed_sts[1].losses and len(resumed_sts[1].losses) == 4
    assert_same_weights(resumed_plain[2], resumed_sts[2])


def test_asking_for_sparsity_on_an_unknown_architecture_keeps_the_error(out_dir):
    for options in (dict(sts_stage="instruction"), dict(sts_lds="on"), dict(sts_projector="net")):
        with pytest.raises(ValueError, match="does not know the architecture 'gpt2'.*Supported model types: .*llava"):
            STSTrainer(model=_gpt2(), args=training_args(out_dir, **options))
    # and at train() when the model comes from model_init
    trainer = STSTrainer(model_init=_gpt2, args=training_args(out_dir, sts_stage="instruction"),
                         train_dataset=ListDataset(_samples("gpt2")))
    with pytest.raises(ValueError, match="does not know the architecture 'gpt2'"):
        trainer.train()


def test_model_init_gets_the_components(out_dir):
    """With model_init, Trainer builds a new model in train(): the components go on that one."""
    calls = []
    layers_seen = []

    def model_init():
        model = tiny_llava(seed=1)
        calls.append(model)
        return model

    class Probe(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            layers_seen.append(all(isinstance(layer, _SkippableLayer) for layer in calls[-1].model.language_model.layers))

    trainer = STSTrainer(model_init=model_init, args=training_args(out_dir, max_steps=2, lds_alpha=1.0,
                                                                   lds_schedule="constant"),
                         train_dataset=tiny_dataset(), data_collator=collate, callbacks=[Probe()])
    trainer.train()
    assert len(calls) == 2 and trainer.model is calls[-1]
    assert layers_seen == [True, True] and trainer.sts_plan.parts.model is calls[-1]
    assert trainer.sts_ledger.totals()["mean_skipped_layer_fraction"] > 0
    # an unknown model through model_init trains as plain Trainer
    trainer = STSTrainer(model_init=_gpt2, args=plain_training_args(out_dir, max_steps=2),
                         train_dataset=ListDataset(_samples("gpt2")))
    trainer.train()
    assert trainer.sts_plan.not_sparsified


# ---- stage detection, named errors ---------------------------------------------------------------------------------


def test_training_embeddings_or_lm_head_in_alignment_stays_alignment_with_a_warning(out_dir, caplog):
    for extra in ("embed_tokens", "lm_head"):
        model = freeze_for_alignment(tiny_llava())
        for name, param in model.named_parameters():
            param.requires_grad |= extra in name
        with caplog.at_level("WARNING", logger="sts_trainer"):
            trainer, _ = train(model, training_args(out_dir, max_steps=1))
        assert (trainer.sts_plan.stage, trainer.sts_plan.vtc, trainer.sts_plan.lds) == ("alignment", True, False)
        assert "none of its decoder layers" in caplog.text
    # a trainable decoder layer makes it instruction
    assert plan_sparsity(tiny_llava(), training_args(out_dir)).stage == "instruction"


def test_a_model_with_nothing_trainable_is_a_named_error(out_dir):
    model = tiny_llava()
    for param in model.parameters():
        param.requires_grad = False
    trainer = STSTrainer(model=model, args=training_args(out_dir), train_dataset=tiny_dataset(), data_collator=collate)
    trainer.evaluate(tiny_dataset(4))  # evaluation alone is fine
    with pytest.raises(ValueError, match="No parameter of the model .*requires grad"):
        trainer.train()


@pytest.mark.parametrize("explicit", [dict(sts_lds="on"), dict(sts_stage="instruction")], ids=["sts_lds", "stage"])
def test_torch_compile_with_lds_asked_for_is_refused_by_name(out_dir, explicit):
    with pytest.raises(ValueError, match="torch_compile=True cannot be combined with LDS.*sts_lds='off'"):
        STSTrainer(model=tiny_llava(), args=training_args(out_dir, torch_compile=True, **explicit),
                   train_dataset=tiny_dataset(), data_collator=collate)


def test_torch_compile_under_auto_turns_lds_off_with_one_warning(out_dir, caplog):
    with caplog.at_level("WARNING", logger="sts_trainer"):
        trainer = STSTrainer(model=tiny_llava(), args=training_args(out_dir, torch_compile=True),
                             train_dataset=tiny_dataset(), data_collator=collate)
        trainer._install_sts(None)
    try:
        assert trainer.sts_plan.stage == "instruction" and not trainer.sts_plan.lds and not trainer._components
        assert trainer.sts_plan.not_sparsified.startswith("LDS is off: torch_compile=True")
        assert not trainer.args.ddp_find_unused_parameters  # DDP set up as for Trainer
        warnings = [r.getMessage() for r in caplog.records if "LDS is off" in r.getMessage()]
        assert len(warnings) == 1 and "sts_lds='on'" in warnings[0]
    finally:
        trainer._remove_sts()
    # VTC stays on where it is the stage's component: only LDS goes
    plan = plan_sparsity(tiny_llava(), training_args(out_dir, torch_compile=True, sts_vtc="on"))
    assert plan.vtc and not plan.lds and plan.not_sparsified is None and plan.note.startswith("LDS is off")


class PositionalDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])

    def forward(self, hidden):
        for layer in self.layers:
            hidden = layer(hidden)
        return hidden


class PositionalModel(nn.Module):
    """A custom model whose decoder stack is called positionally: `self.decoder(hidden)`."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(16, 8)
        self.decoder = PositionalDecoder()
        self.head = nn.Linear(8, 16)

    def forward(self, input_ids, labels=None):
        logits = self.head(self.decoder(self.embed(input_ids)))
        return {"loss": F.cross_entropy(logits.flatten(0, 1), labels.flatten()), "logits": logits}


def test_a_decoder_stack_called_positionally_trains_with_lds(out_dir):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 16, (16, 6), generator=generator)
    dataset = ListDataset([{"input_ids": ids[i], "labels": ids[i]} for i in range(16)])
    model = PositionalModel()
    calls = [0, 0, 0]
    for i, layer in enumerate(model.decoder.layers):
        layer.register_forward_pre_hook(lambda m, a, _i=i: calls.__setitem__(_i, calls[_i] + 1))
    args = training_args(out_dir, sts_decoder_layers="decoder.layers", lds_alpha=1.0, lds_epsilon=1.0,
                         lds_schedule="constant")  # p = 0, 1, 1
    trainer = STSTrainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    assert trainer.sts_plan.lds and calls == [4, 0, 0]


def test_training_forwards_under_sts_pass_use_cache_false(out_dir):
    model = tiny_llava()
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append((m.training, kw.get("use_cache"))), with_kwargs=True)
    trainer, _ = train(model, training_args(out_dir, max_steps=2, per_device_eval_batch_size=4),
                       eval_dataset=tiny_dataset(4))
    trainer.evaluate()
    assert [use for training, use in seen if training] == [False, False]
    assert all(use is None for training, use in seen if not training)  # evaluation is not touched


# ---- the savings ledger across a resumed run, and models flops.py cannot count --------------------------------------


def test_resumed_run_continues_the_savings_ledger_and_warns_on_changed_options(out_dir, caplog):
    args = dict(max_steps=4, save_strategy="steps", save_steps=2, lds_alpha=1.0)
    full, _ = train(tiny_llava(), training_args(out_dir + "-full", **args))
    train(tiny_llava(), training_args(out_dir, **args))
    state = json.load(open(os.path.join(out_dir, "checkpoint-2", STATE_FILE)))
    assert state["options"]["lds_alpha"] == 1.0 and len(state["ledger"]["records"]) == 2
    with caplog.at_level("WARNING", logger="sts_trainer"):
        trainer = STSTrainer(model=tiny_llava(), args=training_args(out_dir, **args), train_dataset=tiny_dataset(),
                             data_collator=collate)
        trainer.train(resume_from_checkpoint=os.path.join(out_dir, "checkpoint-2"))
    assert "resuming with" not in caplog.text
    report = json.load(open(os.path.join(out_dir, "sts_savings.json")))
    uninterrupted = full.sts_ledger.to_dict()["records"]
    assert report["totals"]["optimizer_steps"] == 4 and report["micro_batches"] == uninterrupted
    assert trainer.state.total_flos == pytest.approx(sum(int(r["actual_flops"]) for r in report["micro_batches"]))
    # a changed STS option is named
    with caplog.at_level("WARNING", logger="sts_trainer"):
        trainer = STSTrainer(model=tiny_llava(), args=training_args(out_dir, **{**args, "lds_alpha": 0.3}),
                             train_dataset=tiny_dataset(), data_collator=collate)
        trainer.train(resume_from_checkpoint=True)  # the last checkpoint, checkpoint-4
    assert "resuming with lds_alpha=0.3, but the checkpoint's run had lds_alpha=1.0" in caplog.text


def test_a_vision_tower_flops_cannot_count_trains_and_is_reported_not_counted(out_dir, caplog):
    vision = Dinov2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          image_size=32, patch_size=8)
    config = tiny_llava_config()
    config = LlavaConfig(vision_config=vision, text_config=config.text_config, image_token_id=config.image_token_id,
                         image_seq_length=16, vision_feature_layer=-1)
    torch.manual_seed(0)
    model = freeze_for_alignment(LlavaForConditionalGeneration(config))
    plain = Trainer(model=copy.deepcopy(model), args=plain_training_args(out_dir + "-plain", max_steps=3),
                    train_dataset=tiny_dataset(), data_collator=collate)
    plain.train()
    with caplog.at_level("WARNING", logger="sts_trainer"):
        trainer, _ = train(model, training_args(out_dir, max_steps=3))
    assert trainer.sts_plan.vtc and trainer.state.global_step == 3
    assert caplog.text.count("training FLOPs are not counted") == 1 and "dinov2" in caplog.text
    assert trainer.state.total_flos == plain.state.total_flos  # Trainer's own estimate
    totals = json.load(open(os.path.join(out_dir, "sts_savings.json")))["totals"]
    assert totals["flops_counted"] is False and "dinov2" in totals["flops_not_counted_reason"]
    assert totals["dense_flops"] is None and totals["mean_kept_visual_fraction"] == pytest.approx(0.5)


def test_restoring_a_checkpoint_reads_its_tensors_without_building_a_second_model(out_dir, monkeypatch):
    trained = tiny_llava(seed=0)
    train(trained, training_args(out_dir, max_steps=2, save_strategy="steps", save_steps=2))
    fresh = tiny_llava(seed=9)
    trainer = STSTrainer(model=fresh, args=training_args(out_dir))

    def refuse(*args, **kwargs):
        raise AssertionError("from_pretrained was called")

    monkeypatch.setattr(LlavaForConditionalGeneration, "from_pretrained", refuse)
    trainer._load_from_checkpoint(os.path.join(out_dir, "checkpoint-2"))
    assert_same_weights(fresh, trained)


# ---- prediction and evaluation with metrics -------------------------------------------------------------------------


def test_predict_and_evaluate_with_metrics_on_tiny_llava(out_dir):
    model = freeze_for_alignment(tiny_llava())
    seen = []

    def compute_metrics(prediction):
        seen.append(prediction)
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        return {"token_accuracy": float((logits[:, :-1].argmax(-1) == prediction.label_ids[:, 1:]).mean())}

    args = training_args(out_dir, max_steps=1, per_device_eval_batch_size=3, eval_strategy="steps", eval_steps=1)
    trainer = STSTrainer(model=model, args=args, train_dataset=tiny_dataset(), eval_dataset=tiny_dataset(5, seed=2),
                         data_collator=collate, compute_metrics=compute_metrics)
    trainer.train()  # evaluates once during training
    metrics = trainer.evaluate()
    output = trainer.predict(tiny_dataset(5, seed=2))
    logits = output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions
    assert logits.shape[0] == 5 and logits.shape[-1] == tiny_llava_config().text_config.vocab_size
    assert "eval_token_accuracy" in metrics and "test_token_accuracy" in output.metrics and len(seen) == 3


def test_the_mixin_over_a_users_own_trainer_subclass(out_dir):
    """A user's Trainer subclass keeps its own overrides under the mixin, and STS runs inside them."""
    seen = []

    class OwnTrainer(Trainer):  # e.g. LLaVA's LLaVATrainer: its own loss bookkeeping and optimizer
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            seen.append(inputs["input_ids"].shape[0])
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    class STSOwnTrainer(STSMixin, OwnTrainer):
        pass

    model = tiny_llava()
    calls = [0] * 4
    for i, layer in enumerate(model.model.language_model.layers):
        layer.register_forward_pre_hook(lambda m, a, _i=i: calls.__setitem__(_i, calls[_i] + m.training))
    @dataclass
    class OwnArguments(TrainingArguments):  # LLaVA's train.py has one, with fields of its own
        mm_projector_lr: float | None = None

    args = training_args(out_dir, cls=OwnArguments, max_steps=2, mm_projector_lr=0.5)
    trainer = STSOwnTrainer(model=model, args=args, train_dataset=tiny_dataset(), data_collator=collate)
    assert trainer.args.sts_stage == "auto" and trainer.args.mm_projector_lr == 0.5  # upgraded, its own field kept
    trainer.args.lds_alpha, trainer.args.lds_epsilon, trainer.args.lds_schedule = 1.0, 1.0, "constant"
    trainer.train()
    assert seen == [4, 4]  # the user's override ran, around STS's forward
    assert trainer.sts_plan.lds and calls[0] == 2 and calls[2] == calls[3] == 0


def test_under_vtc_labels_on_image_placeholders_are_cleared_in_every_micro_batch(out_dir):
    """TRL-style batches label every token; with gradient accumulation each micro-batch is cleared before counting."""

    def label_everything(samples):
        batch = collate(samples)
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return batch

    counts = []

    class Counting(STSTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            counts.append((int((inputs["labels"][:, 1:] != -100).sum()), int(num_items_in_batch)))
            return super().training_step(model, inputs, num_items_in_batch)

    model = freeze_for_alignment(tiny_llava())
    args = training_args(out_dir, max_steps=2, gradient_accumulation_steps=2, per_device_train_batch_size=2)
    trainer = Counting(model=model, args=args, train_dataset=tiny_dataset(), data_collator=label_everything)
    trainer.train()  # a labelled placeholder reaching VTC would raise
    assert trainer.sts_plan.vtc and len(counts) == 4
    # num_items_in_batch: the labels left on the two micro-batches of each step, image placeholders excluded
    assert [n for _, n in counts] == [counts[0][0] + counts[1][0]] * 2 + [counts[2][0] + counts[3][0]] * 2


# ---- beyond the paper: VTC and LDS composed in instruction tuning ----------------------------------------------------


class LayerCalls:
    """Per training forward: the width of the language model's input and which decoder layers ran, at what width."""

    def __init__(self, model):
        self.forwards = []
        language_model = model.model.language_model
        language_model.register_forward_pre_hook(self._start, with_kwargs=True)
        for index, layer in enumerate(language_model.layers):
            layer.register_forward_pre_hook(self._layer(index), with_kwargs=True)

    def _start(self, module, args, kwargs):
        if module.training:
            self.forwards.append({"width": kwargs["inputs_embeds"].shape[1], "layers": {}, "grad": torch.is_grad_enabled()})

    def _layer(self, index):
        def hook(module, args, kwargs):
            if module.training:
                hidden = args[0] if args else kwargs["hidden_states"]
                self.forwards[-1]["layers"][index] = hidden.shape[1]

        return hook


def test_one_forward_with_vtc_and_lds_composed_shortens_the_sequence_and_skips_layers(out_dir):
    model = tiny_llava()
    dense_widths = []
    model.register_forward_pre_hook(lambda m, a, kw: dense_widths.append(kw["input_ids"].shape[1]), with_kwargs=True)
    calls = LayerCalls(model)
    args = training_args(out_dir, max_steps=4, sts_vtc="on", vtc_keep_ratio=0.25, lds_alpha=0.6, lds_epsilon=0.0,
                         lds_schedule="constant")
    trainer, recorder = train(model, args)
    assert trainer.sts_plan.stage == "instruction" and trainer.sts_plan.vtc and trainer.sts_plan.lds
    records = trainer.sts_ledger.records
    assert len(calls.forwards) == len(records) == 4
    for forward, dense, record in zip(calls.forwards, dense_widths, records):
        assert forward["width"] == dense - 12  # 4 images, one per row: 12 of each 16 visual tokens dropped
        assert set(forward["layers"].values()) <= {forward["width"]}  # every layer that ran saw the short sequence
        assert len(forward["layers"]) == round(4 * (1 - record.skipped_fraction))
        assert record.kept_fraction == 0.25 and 0 < record.actual_flops < record.dense_flops
    assert any(len(f["layers"]) < 4 for f in calls.forwards)  # layers were skipped
    logged = [log for log in recorder.logs if "loss" in log]
    assert all(log["vtc_kept_fraction"] == 0.25 and "lds_skipped_fraction" in log for log in logged)


def _first_step_full_seed(fraction):
    from sts_trainer.token_compression import is_full_token_step

    return next(seed for seed in range(100) if is_full_token_step(seed, 0, fraction))


def test_self_distillation_adds_the_kl_from_the_pruned_forward_and_is_counted(out_dir):
    seed = _first_step_full_seed(0.5)
    options = dict(max_steps=1, seed=seed, sts_vtc="on", sts_lds="off", vtc_keep_ratio=0.25,
                   vtc_full_token_fraction=0.5)
    plain_model, distilled_model = tiny_llava(seed=1), tiny_llava(seed=1)
    calls = LayerCalls(distilled_model)
    _, plain = train(plain_model, training_args(out_dir, **options))
    trainer, distilled = train(distilled_model, training_args(out_dir, vtc_distill_weight=1.0, **options))
    (plain_log,) = [log for log in plain.logs if "loss" in log]
    (log,) = [log for log in distilled.logs if "loss" in log]
    assert log["vtc_full_token_steps"] == 1.0 and log["vtc_kept_fraction"] == 1.0
    # the same batch and weights: the loss grew by exactly the KL term, which is positive
    assert log["vtc_distill_kl"] > 0
    assert log["loss"] - plain_log["loss"] == pytest.approx(log["vtc_distill_kl"], rel=1e-3, abs=1e-4)
    # two forwards: the no-grad pruned teacher, then the full-token student
    teacher, student = calls.forwards
    assert not teacher["grad"] and student["grad"] and teacher["width"] < student["width"]
    (record,) = trainer.sts_ledger.records
    assert record.full_tokens and record.dense_flops < record.actual_flops < 1.5 * record.dense_flops


def test_vtc_and_lds_composed_with_lora_on_the_language_model_and_gradient_checkpointing(out_dir):
    model = tiny_llava()
    for p in model.parameters():
        p.requires_grad = False
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))  # adapters in the decoder
    calls = LayerCalls(model.get_base_model())
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = training_args(out_dir, max_steps=3, sts_vtc="on", vtc_keep_ratio=0.25, lds_alpha=0.6, lds_epsilon=0.0,
                         lds_schedule="constant", activation_checkpointing=True)
    trainer, _ = train(model, args)
    assert trainer.sts_plan.stage == "instruction" and trainer.sts_plan.vtc and trainer.sts_plan.lds
    for forward, record in zip(calls.forwards, trainer.sts_ledger.records):
        assert record.kept_fraction == 0.25 and set(forward["layers"].values()) <= {forward["width"]}
        assert len(forward["layers"]) == round(4 * (1 - record.skipped_fraction))
    assert any(len(f["layers"]) < 4 for f in calls.forwards)
    assert any(not torch.equal(p, adapters[n]) for n, p in model.named_parameters() if n in adapters)
