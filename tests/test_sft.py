"""STS over TRL's `SFTTrainer` (`sts_trainer.sft`), on a tiny LLaVA and a tiny Qwen2-VL fed by TRL's own
vision-language collator: alignment with VTC, instruction tuning with LDS, sparsity off equal to `SFTTrainer`."""

from dataclasses import dataclass

import datasets
import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
    TrainingArguments,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.processing_utils import ProcessorMixin
from trl import SFTConfig, SFTTrainer

from sts_trainer import STSMixin
from sts_trainer.architectures import find_parts
from sts_trainer.lab import synthetic
from sts_trainer.sft import STSSFTConfig, STSSFTTrainer
from sts_trainer.token_compression import num_kept

from .helpers import LossRecorder, for_alignment

QWEN_SPECIAL = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>",
                "<|video_pad|>"]
# Qwen-style chat: an image block renders as <|vision_start|><|image_pad|><|vision_end|>, which the processor expands
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}"
    "{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


class ImageQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2-VL's processor for images only (its video processor needs torchvision, which this machine lacks)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token, self.video_token = tokenizer.image_token, tokenizer.video_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def qwen2_vl_and_processor(seed=0):
    """A tiny Qwen2-VL and its processor, built locally: 4 px patches merged 2 x 2, so a 32 x 16 image gives a 4 x 8
    patch grid (image_grid_thw (1, 4, 8)) and 8 visual tokens."""
    words = [*QWEN_SPECIAL, *synthetic.vocabulary(), "user", "assistant"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(QWEN_SPECIAL)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<|im_end|>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )
    images = Qwen2VLImageProcessorPil(min_pixels=16 * 16, max_pixels=32 * 32, patch_size=4, merge_size=2,
                                      temporal_patch_size=2)
    processor = ImageQwen2VLProcessor(image_processor=images, tokenizer=tokenizer, chat_template=QWEN_TEMPLATE)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=len(tokenizer), pad_token_id=0, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3]})
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2)
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=processor.image_token_id,
                           video_token_id=processor.video_token_id, vision_start_token_id=ids("<|vision_start|>"),
                           vision_end_token_id=ids("<|vision_end|>"))
    torch.manual_seed(seed)
    return Qwen2VLForConditionalGeneration(config), processor


def llava_and_processor(seed=0):
    processor = synthetic.build_tokenizer_and_processor()
    return synthetic.tiny_llava_for(processor, seed=seed), processor


MODELS = {"llava": llava_and_processor, "qwen2_vl": qwen2_vl_and_processor}
IMAGE_SIZES = {"llava": (32, 32), "qwen2_vl": (32, 16)}
VISUAL_TOKENS = {"llava": 16, "qwen2_vl": 8}


def conversations(model_type, n=8, seed=0):
    """TRL's conversational VLM format: images, and messages whose user turn holds an image block and a question."""
    samples = synthetic.generate(n, seed=seed)
    rows = []
    for sample in samples:
        image = synthetic.render(sample.scene, size=32).resize(IMAGE_SIZES[model_type])
        rows.append({
            "images": [image],
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample.question}]},
                {"role": "assistant", "content": [{"type": "text", "text": sample.answer}]},
            ],
        })
    return datasets.Dataset.from_list(rows)


def run(trainer_cls, config_cls, model, processor, dataset, out_dir, **options):
    args = config_cls(
        output_dir=out_dir, max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0,
        disable_tqdm=True, activation_checkpointing=False, max_length=None, **options,
    )
    recorder = LossRecorder()
    trainer = trainer_cls(model=model, args=args, train_dataset=dataset, processing_class=processor,
                          callbacks=[recorder])
    trainer.train()
    return trainer, recorder


class FirstLayerProbe:
    """The width of the sequence entering decoder layer 0, and how often each decoder layer runs, in training."""

    def __init__(self, model):
        layers = find_parts(model).layers
        self.dense, self.widths, self.calls = [], [], [0] * len(layers)
        # registered before training starts, so it runs before VTC's pre-hook: the batch as the collator made it
        model.register_forward_pre_hook(
            lambda m, a, kw: self.dense.append(kw["input_ids"].shape[1]) if m.training else None, with_kwargs=True
        )
        layers[0].register_forward_pre_hook(self._width, with_kwargs=True)
        for i, layer in enumerate(layers):
            layer.register_forward_pre_hook(lambda m, a, _i=i: self.calls.__setitem__(_i, self.calls[_i] + m.training))

    def _width(self, module, args, kwargs):
        if module.training:
            self.widths.append((args[0] if args else kwargs["hidden_states"]).shape[1])


def test_the_trl_trainer_is_the_mixin_over_sft_trainer():
    assert issubclass(STSSFTTrainer, STSMixin) and issubclass(STSSFTTrainer, SFTTrainer)
    assert issubclass(STSSFTConfig, SFTConfig) and STSSFTTrainer.sts_args_class is STSSFTConfig
    # SFTConfig's own defaults for Trainer's fields are kept
    for name in ("learning_rate", "logging_steps", "activation_checkpointing", "bf16"):
        assert STSSFTConfig.__dataclass_fields__[name].default == SFTConfig.__dataclass_fields__[name].default


@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_alignment_with_vtc_shortens_what_enters_the_first_decoder_layer(model_type, out_dir):
    model, processor = MODELS[model_type]()
    for_alignment(model)
    probe = FirstLayerProbe(model)
    dataset = conversations(model_type)
    projector = [p.detach().clone() for p in find_parts(model).projector.parameters()]
    trainer, recorder = run(STSSFTTrainer, STSSFTConfig, model, processor, dataset, out_dir, vtc_keep_ratio=0.25)
    assert (trainer.sts_plan.stage, trainer.sts_plan.vtc, trainer.sts_plan.lds) == ("alignment", True, False)
    # every row has one image: the first decoder layer sees each batch's width less the dropped placeholders
    dropped = VISUAL_TOKENS[model_type] - num_kept(VISUAL_TOKENS[model_type], 0.25)
    assert len(probe.dense) == 2 and probe.widths == [width - dropped for width in probe.dense]
    assert all(log["vtc_kept_fraction"] == 0.25 for log in recorder.logs if "loss" in log)
    assert all(torch.isfinite(torch.tensor(loss)) for loss in recorder.losses) and len(recorder.losses) == 2
    assert any(not torch.equal(a, b) for a, b in zip(projector, find_parts(model).projector.parameters()))


@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_instruction_tuning_with_lds_never_runs_a_layer_of_probability_one(model_type, out_dir):
    model, processor = MODELS[model_type]()
    probe = FirstLayerProbe(model)
    # alpha 1, eps 1, constant: depth factors 0, 2/3, 4/3, 2 -> p = 0, 2/3, 1, 1
    trainer, recorder = run(STSSFTTrainer, STSSFTConfig, model, processor, conversations(model_type), out_dir,
                            lds_alpha=1.0, lds_epsilon=1.0, lds_schedule="constant")
    assert (trainer.sts_plan.stage, trainer.sts_plan.vtc, trainer.sts_plan.lds) == ("instruction", False, True)
    assert probe.calls[0] == 2 and probe.calls[2] == probe.calls[3] == 0
    assert trainer.sts_ledger.totals()["flops_saving"] > 0.3
    assert "mean_token_accuracy" in recorder.logs[0]  # TRL's own metrics are still there


@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_sparsity_off_trains_exactly_like_sft_trainer(model_type, tmp_path):
    (plain_model, plain_processor), (sts_model, sts_processor) = MODELS[model_type](seed=1), MODELS[model_type](seed=1)
    dataset = conversations(model_type)
    _, plain = run(SFTTrainer, SFTConfig, plain_model, plain_processor, dataset, str(tmp_path / "plain"))
    trainer, sts = run(STSSFTTrainer, STSSFTConfig, sts_model, sts_processor, dataset, str(tmp_path / "sts"),
                       sts_stage="none")
    assert trainer.sts_plan.stage == "none" and len(plain.losses) == 2
    assert plain.losses == sts.losses  # bit for bit
    assert all(torch.equal(a, b) for a, b in zip(plain_model.state_dict().values(), sts_model.state_dict().values()))


def test_a_plain_sft_config_or_a_subclass_of_it_is_upgraded(out_dir):
    model, processor = llava_and_processor()
    args = SFTConfig(output_dir=out_dir, max_steps=1, report_to=[], use_cpu=True, activation_checkpointing=False,
                     max_length=77)
    trainer = STSSFTTrainer(model=model, args=args, train_dataset=conversations("llava", 4), processing_class=processor)
    assert isinstance(trainer.args, STSSFTConfig) and trainer.args.sts_stage == "auto" and trainer.args.max_length == 77

    # a plain TrainingArguments: SFTConfig's own fields are processed as SFTTrainer would (pad_to_multiple_of 'auto')
    plain = TrainingArguments(output_dir=out_dir, report_to=[], use_cpu=True, learning_rate=0.25)
    trainer = STSSFTTrainer(model=model, args=plain, train_dataset=conversations("llava", 4), processing_class=processor)
    assert isinstance(trainer.args, STSSFTConfig) and trainer.args.pad_to_multiple_of is None
    assert trainer.args.learning_rate == 0.25

    @dataclass
    class OtherConfig(SFTConfig):  # a user's own config, with a field of its own
        projector_lr: float = 0.1

    args = OtherConfig(output_dir=out_dir, report_to=[], use_cpu=True, activation_checkpointing=False)
    trainer = STSSFTTrainer(model=model, args=args, train_dataset=conversations("llava", 4), processing_class=processor)
    assert isinstance(trainer.args, STSSFTConfig) and trainer.args.projector_lr == 0.1


def test_lds_with_trls_own_peft_config(out_dir):
    """LoRA through SFTTrainer's `peft_config` (TRL wraps the model itself): the stage is instruction (adapters in the
    decoder layers train), layers of probability 1 never run, and the FLOPs count the adapters, not the base weights."""
    from peft import LoraConfig

    model, processor = llava_and_processor()
    probe = FirstLayerProbe(model)
    args = STSSFTConfig(
        output_dir=out_dir, max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True, activation_checkpointing=False,
        max_length=None, lds_alpha=1.0, lds_epsilon=1.0, lds_schedule="constant",
    )
    lora = LoraConfig(r=4, target_modules=r".*language_model.*\.(q_proj|v_proj)")
    trainer = STSSFTTrainer(model=model, args=args, train_dataset=conversations("llava"), processing_class=processor,
                            peft_config=lora)
    trainer.train()
    assert (trainer.sts_plan.stage, trainer.sts_plan.lds) == ("instruction", True)
    assert probe.calls[0] == 2 and probe.calls[2] == probe.calls[3] == 0
    assert trainer.sts_ledger.totals()["flops_saving"] > 0.3
