"""The training command line: LLaVA's two stages on Hugging Face models, with STS.

    sts-train args.yaml                                # every argument from one JSON or YAML file
    deepspeed --num_gpus 8 -m sts_trainer.llava.train --deepspeed configs/zero2.json \\
        --language_model lmsys/vicuna-7b-v1.5 --vision_tower openai/clip-vit-large-patch14-336 \\
        --training_stage alignment --data_path blip_laion_cc_sbu_558k.json --image_folder images \\
        --output_dir checkpoints/stage1 ...            # scripts/pretrain.sh and scripts/finetune.sh have the rest

Stage 1 (`--training_stage alignment`) trains only the projector, with the Visual Token Compressor; stage 2
(`--training_stage instruction`, `--model_name_or_path` the output of stage 1) trains projector and language model,
fully or with LoRA, with the Layer Dynamic Skipper. The STS options are those of `STSTrainingArguments`.
"""

import argparse
import contextlib
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field

import torch
import yaml
from safetensors.torch import save_file
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    HfArgumentParser,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    set_seed,
)
from transformers.integrations import deepspeed as hf_deepspeed

from ..architectures import find_parts
from ..arguments import STSTrainingArguments
from ..stage import find_named_parts
from ..token_compression import find_isolator
from ..trainer import STSTrainer
from .data import (
    CHAT_TEMPLATE,
    DataArguments,
    LazyLlavaDataset,
    LlavaDataCollator,
    ModalityLengthGroupedSampler,
    resolve_chat_template,
)

logger = logging.getLogger("sts_trainer")

TRAINING_STAGES = ("alignment", "instruction")


@dataclass
class ModelArguments:
    """Which model to train, and which of its parts train."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "An existing LLaVA-style model (a local directory or hub id with its processor), e.g. the output "
            "of stage 1. Give this, or --language_model and --vision_tower to compose a new model."
        },
    )
    language_model: str | None = field(
        default=None,
        metadata={"help": "Compose a new LLaVA model: the causal language model (with its tokenizer) to start from."},
    )
    vision_tower: str | None = field(
        default=None,
        metadata={"help": "Compose a new LLaVA model: the CLIP vision tower (with its image processor)."},
    )
    vision_feature_layer: int = field(
        default=-2, metadata={"help": "Composing: the vision tower layer whose output is projected (LLaVA-1.5: -2)."}
    )
    training_stage: str = field(
        default="alignment",
        metadata={
            "help": "'alignment' (stage 1): only the projector trains; vision tower and language model are frozen. "
            "'instruction' (stage 2): projector and language model train (fully, or with --lora_enable); the vision "
            "tower stays frozen. With --sts_stage auto, STS picks its component from this.",
            "choices": list(TRAINING_STAGES),
        },
    )
    lora_enable: bool = field(
        default=False, metadata={"help": "Instruction stage: train LoRA adapters on the language model (and the "
                                         "projector fully) instead of the whole language model."}
    )
    lora_r: int = field(default=128, metadata={"help": "LoRA rank (LLaVA-1.5: 128)."})
    lora_alpha: int = field(default=256, metadata={"help": "LoRA scaling alpha (LLaVA-1.5: 256)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: str | None = field(
        default=None,
        metadata={"help": "Comma-separated module names to adapt. Default: every linear layer of the language model."},
    )
    projector_lr: float | None = field(
        default=None,
        metadata={"help": "A learning rate of its own for the projector, > 0 (default: --learning_rate)."},
    )
    merge_lora: bool = field(
        default=False,
        metadata={"help": "After LoRA training, also write the merged model to <output_dir>/merged (loads in plain "
                          "transformers, no PEFT needed)."},
    )

    def __post_init__(self):
        if self.training_stage not in TRAINING_STAGES:
            raise ValueError(f"training_stage={self.training_stage!r} is not valid; choose one of {TRAINING_STAGES}.")
        composing = self.language_model is not None or self.vision_tower is not None
        if composing and self.model_name_or_path is not None:
            raise ValueError("Give --model_name_or_path, or --language_model with --vision_tower, not both.")
        if composing and (self.language_model is None or self.vision_tower is None):
            raise ValueError("Composing a new model needs both --language_model and --vision_tower.")
        if not composing and self.model_name_or_path is None:
            raise ValueError("Give --model_name_or_path, or --language_model and --vision_tower.")
        if self.lora_enable and self.training_stage != "instruction":
            raise ValueError("--lora_enable adapts the language model, which only trains in the instruction stage.")
        if self.lora_r < 1 or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_r must be >= 1 and lora_dropout in [0, 1); got {self.lora_r}, {self.lora_dropout}.")
        if self.projector_lr is not None and not (math.isfinite(self.projector_lr) and self.projector_lr > 0):
            raise ValueError(f"--projector_lr must be a positive, finite learning rate; got {self.projector_lr}.")


def check_stages(model_args: ModelArguments, training_args: STSTrainingArguments) -> None:
    """Warn when --sts_stage names the other stage than --training_stage: STS follows --sts_stage (its 'auto' follows
    what trains), while what trains follows --training_stage."""
    sts_stage, training_stage = training_args.sts_stage, model_args.training_stage
    if sts_stage in TRAINING_STAGES and sts_stage != training_stage:
        components = {"alignment": "the Visual Token Compressor", "instruction": "the Layer Dynamic Skipper"}
        logger.warning(
            f"--sts_stage {sts_stage} overrides what --training_stage {training_stage} would pick: STS applies "
            f"{components[sts_stage]} (the {sts_stage} stage's) instead of {components[training_stage]}, while the "
            f"parameters that train are still those of the {training_stage} stage. Pass --sts_stage auto to follow "
            "the training stage."
        )


@contextlib.contextmanager
def _without_zero3_init():
    """Build a model from configs in full even when ZeRO-3 is configured.

    With ZeRO-3 set up (the training arguments exist), transformers builds from-config models under `zero.Init`,
    where weight initialisation fails on the empty partitions. A composed model is built in full, like a model built
    before the arguments; DeepSpeed partitions it when training starts.
    """
    config = hf_deepspeed.deepspeed_config() and hf_deepspeed._hf_deepspeed_config_weak_ref()
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if config is not None:
            hf_deepspeed.set_hf_deepspeed_config(config)


def compose_llava(model_args: ModelArguments) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A new LLaVA model from a causal LM and a CLIP vision tower, with a freshly initialised projector.

    The tokenizer gets the `<image>` token (and a pad token) if it lacks them; the embeddings are resized to match.
    """
    tokenizer = AutoTokenizer.from_pretrained(model_args.language_model)
    if "<image>" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    vision_config = AutoConfig.from_pretrained(model_args.vision_tower)
    vision_config = getattr(vision_config, "vision_config", vision_config)  # a full CLIP checkpoint
    text_config = AutoConfig.from_pretrained(model_args.language_model)
    config = LlavaConfig(
        vision_config=vision_config.to_dict() | {"model_type": vision_config.model_type},
        text_config=text_config.to_dict() | {"model_type": text_config.model_type},
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=model_args.vision_feature_layer,
        vision_feature_select_strategy="default",
        image_seq_length=(vision_config.image_size // vision_config.patch_size) ** 2,
    )
    config.text_config.pad_token_id = tokenizer.pad_token_id
    with _without_zero3_init():
        model = LlavaForConditionalGeneration(config)
        language_model = AutoModelForCausalLM.from_pretrained(model_args.language_model)
        vision_tower = type(model.model.vision_tower).from_pretrained(model_args.vision_tower)
    model.model.language_model.load_state_dict(language_model.get_decoder().state_dict())
    model.lm_head.load_state_dict(language_model.get_output_embeddings().state_dict())
    model.model.vision_tower.load_state_dict(vision_tower.state_dict())
    model.resize_token_embeddings(len(tokenizer))
    processor = LlavaProcessor(
        image_processor=AutoImageProcessor.from_pretrained(model_args.vision_tower),
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tokenizer.chat_template or CHAT_TEMPLATE,
    )
    return model, processor


def load_model(model_args: ModelArguments):
    if model_args.model_name_or_path is None:
        return compose_llava(model_args)
    processor = AutoProcessor.from_pretrained(model_args.model_name_or_path)
    model = AutoModelForImageTextToText.from_pretrained(model_args.model_name_or_path)
    return model, processor


def model_parts(model, training_args: STSTrainingArguments | None = None):
    """`find_parts` with the parts the user named (`--sts_projector`, `--sts_decoder_layers`, `--sts_image_token_id`),
    so the command line finds the same projector and language model as the trainer does."""
    return find_parts(model) if training_args is None else find_named_parts(model, training_args)


def set_trainable(model, model_args: ModelArguments, training_args: STSTrainingArguments | None = None):
    """Stage 1: the projector only. Stage 2: projector and language model, or LoRA adapters on the language model."""
    parts = model_parts(model, training_args)
    for param in model.parameters():
        param.requires_grad = False
    for param in parts.projector.parameters():
        param.requires_grad = True
    if model_args.training_stage == "alignment":
        return model
    if not model_args.lora_enable:
        for param in parts.language_model_parameters():
            param.requires_grad = True
        return model
    from peft import LoraConfig, get_peft_model

    if model_args.lora_target_modules:
        targets = [name.strip() for name in model_args.lora_target_modules.split(",")]
    else:  # every linear layer of the language model's decoder layers
        language_model = {id(m) for m in parts.language_model.modules()}
        targets = sorted(
            name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and id(m) in language_model
        )
    projector_name = next(name for name, m in model.named_modules() if m is parts.projector)
    config = LoraConfig(
        r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
        target_modules=targets, modules_to_save=[projector_name],
    )
    return get_peft_model(model, config)


class LlavaTrainer(STSTrainer):
    """`STSTrainer` with the command line's extras: a projector learning rate and modality-grouped batches."""

    def __init__(self, *args, projector_lr: float | None = None, group_by_modality: bool = False, **kwargs):
        self.projector_lr = projector_lr
        self.group_by_modality = group_by_modality
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model=None):
        if self.projector_lr is None or self.optimizer is not None:
            return super().create_optimizer(model)
        model = self.model if model is None else model
        projector = {id(p) for p in model_parts(model, self.args).projector.parameters()}
        if (isolator := find_isolator(model)) is not None:  # the mode isolator trains with the projector
            projector.add(id(isolator.tokens))
        decay = set(self.get_decay_parameter_names(model))
        groups = {}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            lr = self.projector_lr if id(param) in projector else self.args.learning_rate
            weight_decay = self.args.weight_decay if name in decay else 0.0
            groups.setdefault((lr, weight_decay), []).append(param)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        optimizer_kwargs.pop("lr", None)
        self.optimizer = optimizer_cls(
            [{"params": params, "lr": lr, "weight_decay": wd} for (lr, wd), params in groups.items()],
            lr=self.args.learning_rate, **optimizer_kwargs,
        )
        return self.optimizer

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if not self.group_by_modality:
            return super()._get_train_sampler(train_dataset)
        generator = torch.Generator().manual_seed(self.args.data_seed if self.args.data_seed is not None else self.args.seed)
        group_size = self.args.per_device_train_batch_size * self.args.world_size
        return ModalityLengthGroupedSampler(dataset.modality_lengths(), group_size, generator)


def save_outputs(trainer: LlavaTrainer, model_args: ModelArguments, processor) -> None:
    """The model (adapters under LoRA) and processor in output_dir; the projector alone after alignment; the merged
    model after LoRA with --merge_lora."""
    output_dir = trainer.args.output_dir
    trainer.save_model(output_dir)
    model = trainer.accelerator.unwrap_model(trainer.model)
    if model_args.training_stage == "alignment":
        parts = model_parts(model, trainer.args)
        prefix = next(name for name, m in parts.model.named_modules() if m is parts.projector)
        # Under ZeRO-3 the projector's parameters are partitioned: every rank takes part in gathering them.
        gather = contextlib.nullcontext()
        if hf_deepspeed.is_deepspeed_zero3_enabled():
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(list(parts.projector.parameters()))
        with gather:
            state = {f"{prefix}.{k}": v.detach().cpu().clone() for k, v in parts.projector.state_dict().items()}
        if trainer.is_world_process_zero():
            save_file(state, os.path.join(output_dir, "mm_projector.safetensors"))
    if trainer.is_world_process_zero():
        processor.save_pretrained(output_dir)
        if model_args.lora_enable and model_args.merge_lora:
            merged = model.merge_and_unload()
            merged.save_pretrained(os.path.join(output_dir, "merged"))
            processor.save_pretrained(os.path.join(output_dir, "merged"))


def run(model_args: ModelArguments, data_args: DataArguments, training_args: STSTrainingArguments,
        callbacks: list | None = None) -> dict:
    """Train one stage; return a summary (steps, wall-clock, final loss, STS savings, skipped samples). `callbacks`:
    extra `TrainerCallback`s for the trainer."""
    check_stages(model_args, training_args)
    # A composed model's new projector is initialised from the seed, so runs with the same seed start alike.
    set_seed(training_args.seed)
    model, processor = load_model(model_args)
    # Also the template saved with the processor, so that the next stage and inference use the same one.
    processor.chat_template = resolve_chat_template(data_args.chat_template, processor.chat_template)
    model = set_trainable(model, model_args, training_args)
    if data_args.conversation_format == "auto":
        data_args.conversation_format = "plain" if model_args.training_stage == "alignment" else "chat"
    train_dataset = LazyLlavaDataset.from_arguments(data_args, processor)
    eval_dataset = LazyLlavaDataset.from_arguments(data_args, processor, evaluation=True) if data_args.eval_data_path else None
    trainer = LlavaTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=LlavaDataCollator(pad_token_id=processor.tokenizer.pad_token_id),
        processing_class=processor,
        projector_lr=model_args.projector_lr,
        group_by_modality=data_args.group_by_modality_length,
        callbacks=callbacks,
    )
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    save_outputs(trainer, model_args, processor)
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    summary = {
        "stage": model_args.training_stage,
        "steps": trainer.state.global_step,
        "wall_clock_seconds": result.metrics.get("train_runtime"),
        "final_loss": losses[-1] if losses else None,
        "sts": trainer.sts_ledger.totals() if trainer.sts_ledger is not None else None,
        "skipped_samples": len(train_dataset.skipped),
        "world_size": training_args.world_size,
        "output_dir": training_args.output_dir,
    }
    if train_dataset.skipped:
        logger.warning(train_dataset.skip_report())
    if trainer.is_world_process_zero():
        with open(os.path.join(training_args.output_dir, "sts_train_summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    return summary


def _prepare_cpu(settings: dict) -> dict:
    """Without CUDA: train on the CPU and, under DeepSpeed, set up the gloo process group before the arguments exist
    (Accelerate otherwise finds no backend and believes the world size is 1)."""
    if torch.cuda.is_available():
        return settings
    if settings.get("deepspeed"):
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    return {"use_cpu": True, **settings}


def parse(argv: list[str]) -> tuple[ModelArguments, DataArguments, STSTrainingArguments]:
    """Command-line arguments, or one JSON / YAML file holding them all."""
    parser = HfArgumentParser((ModelArguments, DataArguments, STSTrainingArguments))
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        with open(argv[0]) as f:
            settings = json.load(f) if argv[0].endswith(".json") else yaml.safe_load(f)
    else:
        # argv -> the options given (each destination starts at a marker that argparse overwrites only for an
        # option on the command line, so an option given at its default value counts as given: sts_preset sets the
        # others) -> dataclasses.
        given = object()
        blank = argparse.Namespace(**{action.dest: given for action in parser._actions})
        namespace, unknown = parser.parse_known_args(argv, namespace=blank)
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        settings = {k: v for k, v in vars(namespace).items() if v is not given}
    return parser.parse_dict(_prepare_cpu(settings))


def _strip_local_rank(argv: list[str]) -> list[str]:
    """The deepspeed launcher passes --local_rank; the rank is read from the environment instead."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--local_rank":
            skip = True
        elif not a.startswith("--local_rank="):
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> dict | None:
    argv = _strip_local_rank(list(sys.argv[1:] if argv is None else argv))
    model_args, data_args, training_args = parse(argv)
    return run(model_args, data_args, training_args)


def cli() -> None:
    """The `sts-train` entry point. A distributed worker ends with `os._exit(0)` once its work is flushed: gloo
    process groups occasionally abort at interpreter shutdown after a finished run, failing a good run."""
    main()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    cli()
