"""`STSTrainer`: a drop-in `Trainer` that trains with stage-aware sparsity."""

import contextlib
import logging
import os
from collections import defaultdict

import torch
from transformers import PretrainedConfig, PreTrainedModel, Trainer, TrainingArguments
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

from .arguments import STSTrainingArguments
from .callbacks import SavingsReportCallback
from .flops import micro_batch_flops, visual_tokens_per_image
from .layer_skip import LayerSkipper, decision_generator
from .savings import MicroBatchRecord, SavingsLedger
from .stage import SparsityPlan, plan_sparsity
from .token_compression import TokenCompressor

logger = logging.getLogger("sts_trainer")

# VTC's random strategy draws from its own stream of (seed, step, micro-step); LDS's decisions use stream 0.
_VTC_STREAM = 1


class STSTrainer(Trainer):
    """`Trainer` with the Sparse Training Scheme.

    When training starts, the stage is resolved from `args.sts_stage` (see `plan_sparsity`) and the components for it
    are installed: the Visual Token Compressor for alignment, the Layer Dynamic Skipper for instruction tuning. They
    act only inside training forwards; evaluation, prediction and generation see the dense model. They are removed
    when training ends. With `sts_stage='none'` this is exactly `Trainer`.

    A plain `TrainingArguments` is accepted and upgraded to `STSTrainingArguments` with every STS option at its default.
    """

    def __init__(self, model=None, args: TrainingArguments | None = None, *trainer_args, **trainer_kwargs):
        if args is None:
            args = STSTrainingArguments(output_dir="tmp_trainer")
        elif not isinstance(args, STSTrainingArguments):
            args = STSTrainingArguments.from_training_arguments(args)
        # Decided before Trainer builds its Accelerator, which reads the DDP settings once.
        if model is not None and plan_sparsity(model, args).lds:
            _allow_skipped_layers_in_ddp(args)
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        if self.args.should_log and not logger.handlers:
            logger.addHandler(logging.StreamHandler())
            logger.setLevel(logging.INFO)
        self.sts_plan: SparsityPlan | None = None
        self._compressor: TokenCompressor | None = None
        self._skipper: LayerSkipper | None = None
        self._sts_step, self._sts_micro_step = -1, 0
        self._sts_metrics: dict[str, list[float]] = defaultdict(list)
        self.sts_ledger: SavingsLedger | None = None
        self._sts_report: SavingsReportCallback | None = None
        self._sts_hooks = []
        self._sts_micro_batch: dict | None = None  # what the current training micro-batch ran, for its FLOPs

    def train(self, *args, **kwargs):
        self._install_sts()
        try:
            return super().train(*args, **kwargs)
        finally:
            self._remove_sts()

    def _install_sts(self) -> None:
        plan = plan_sparsity(self.model, self.args)
        if plan.lds and self.args.parallel_mode.value == "distributed" and not self.args.ddp_find_unused_parameters:
            raise ValueError(
                "LDS is on but this STSTrainer was created when the stage did not call for it, so DDP was set up "
                "without find_unused_parameters. Pass ddp_find_unused_parameters=True, or set sts_stage explicitly."
            )
        args = self.args
        if plan.vtc:
            self._compressor = TokenCompressor(
                plan.parts.model,
                plan.parts.image_token_id,
                args.vtc_keep_ratio,
                args.vtc_strategy,
                args.vtc_position_ids,
                facts=plan.parts.facts,
            )
            self._compressor.install()
        if plan.lds:
            self._skipper = LayerSkipper(plan.parts.layers, args.lds_alpha, args.lds_epsilon, args.lds_schedule, args.seed)
            self._skipper.install()
        self.sts_plan = plan
        if plan.vtc or plan.lds:
            self.sts_ledger = SavingsLedger(plan.stage)
            self._sts_report = SavingsReportCallback(self.sts_ledger)
            self.add_callback(self._sts_report)
            self._sts_hooks.append(
                plan.parts.language_model.register_forward_pre_hook(self._record_llm_length, with_kwargs=True)
            )
            self._sts_trains = _trainable_parts(plan.parts)
        logger.info(plan.describe(args))

    def _remove_sts(self) -> None:
        for handle in self._sts_hooks:
            handle.remove()
        self._sts_hooks.clear()
        if self._sts_report is not None:
            self.remove_callback(self._sts_report)
        if self._compressor is not None:
            self._compressor.remove()
            self._compressor = None
        if self._skipper is not None:
            self._skipper.remove()
            self._skipper = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training or (self._compressor is None and self._skipper is None):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        with self._sparse_forward(inputs):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    @contextlib.contextmanager
    def _sparse_forward(self, inputs):
        """Switch the components on for one training forward (one micro-batch), then record what they did."""
        step = self.state.global_step
        if step != self._sts_step:
            self._sts_step, self._sts_micro_step = step, 0
        else:
            self._sts_micro_step += 1
        micro_step = self._sts_micro_step
        parts = self.sts_plan.parts
        input_ids = inputs["input_ids"]  # (B, L) before compression
        record = {"step": step, "batch_size": input_ids.shape[0], "dense_length": input_ids.shape[1]}
        record["visual_tokens"] = int((input_ids == parts.image_token_id).sum()) if parts.is_multimodal else 0
        self._sts_micro_batch = record
        if self._skipper is not None:
            skips, probs = self._skipper.decide(step, self.state.max_steps, micro_step)
            record.update(executed_layers=len(skips) - sum(skips), skip_probabilities=probs)
            record["skipped_fraction"] = sum(skips) / len(skips)
            self._sts_metrics["lds_skipped_fraction"].append(record["skipped_fraction"])
            self._sts_metrics["lds_skip_probability"].append(sum(probs) / len(probs))
        if self._compressor is not None:
            self._compressor.generator = decision_generator(self.args.seed, step, micro_step, _VTC_STREAM)
            self._compressor.active = True
        try:
            yield
        finally:
            if self._skipper is not None:
                self._skipper.clear()
            if self._compressor is not None:
                self._compressor.active = False
                for stats in self._compressor.stats:
                    record["kept_fraction"] = stats.kept_tokens / stats.visual_tokens
                    self._sts_metrics["vtc_kept_fraction"].append(record["kept_fraction"])
                    self._sts_metrics["vtc_input_length_before"].append(stats.length_before)
                    self._sts_metrics["vtc_input_length_after"].append(stats.length_after)
                self._compressor.stats.clear()

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = self.model if model is None else model
        if not self._restore_full_weights(resume_from_checkpoint, model):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        if not self._restore_full_weights(self.state.best_model_checkpoint, self.model):
            super()._load_best_model()

    def _restore_full_weights(self, checkpoint: str, model) -> bool:
        """Restore a full-model checkpoint through `from_pretrained`, which understands its key names; False when the
        checkpoint or the setup is one Trainer's own loading handles (PEFT adapters, DeepSpeed, FSDP).

        `Trainer` loads the saved state dict non-strictly, and transformers saves some models (LLaVA among them) with
        legacy key names (`language_model.model.layers...`): nothing matches, only a warning is printed, and training
        silently goes on from the current weights (on resume, and with `load_best_model_at_end`). Loading through
        `from_pretrained` converts the keys, and the strict `load_state_dict` guarantees every weight was restored.
        """
        has_full_weights = any(
            os.path.isfile(os.path.join(checkpoint, name))
            for name in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
        )
        if not isinstance(model, PreTrainedModel) or not has_full_weights or self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return False
        logger.info(f"STS: restoring the model weights from {checkpoint}.")
        saved = type(model).from_pretrained(checkpoint, dtype=next(model.parameters()).dtype)
        with torch.no_grad():
            model.load_state_dict(saved.state_dict(), strict=True)
        return True

    def _record_llm_length(self, module, args, kwargs):
        """The sequence length the language model really receives (after VTC), for the actual FLOPs."""
        if self._sts_micro_batch is not None and module.training:
            embeds = kwargs.get("inputs_embeds")
            self._sts_micro_batch["llm_length"] = (embeds if embeds is not None else kwargs["input_ids"]).shape[1]

    def floating_point_ops(self, inputs) -> int:
        """Actual FLOPs of the micro-batch just trained (kept tokens, executed layers), from `flops.py`'s count.

        Trainer sums these into `state.total_flos`. Without STS components this is Trainer's own estimate.
        """
        record, self._sts_micro_batch = self._sts_micro_batch, None
        config = getattr(self.sts_plan.parts.model, "config", None) if record is not None else None
        if self.sts_ledger is None or not isinstance(config, PretrainedConfig):
            return super().floating_point_ops(inputs)  # e.g. a custom nn.Module: no config to count from
        images = 0
        if record["visual_tokens"]:
            # images (or tiles) of the config's size; dynamic-resolution models are counted at a reference size
            images = max(1, round(record["visual_tokens"] / visual_tokens_per_image(config)))
        common = dict(config=config, batch_size=record["batch_size"], images=images, **self._sts_trains)
        dense = micro_batch_flops(llm_length=record["dense_length"], **common)
        actual = micro_batch_flops(
            llm_length=record.get("llm_length", record["dense_length"]),
            executed_layers=record.get("executed_layers"),
            **common,
        )
        self.sts_ledger.add(
            MicroBatchRecord(
                step=record["step"],
                dense_flops=dense,
                actual_flops=actual,
                kept_fraction=record.get("kept_fraction"),
                skipped_fraction=record.get("skipped_fraction"),
                skip_probabilities=record.get("skip_probabilities"),
            )
        )
        self._sts_metrics["sts_flops_dense"].append(dense)
        self._sts_metrics["sts_flops_actual"].append(actual)
        return int(actual)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Training logs carry 'loss'; STS metrics are means over the micro-batches since the previous one.
        if "loss" in logs and self._sts_metrics:
            metrics = self._sts_metrics
            flops = {name: sum(metrics.pop(name)) for name in ("sts_flops_dense", "sts_flops_actual") if name in metrics}
            logs.update({name: sum(values) / len(values) for name, values in metrics.items()})
            if flops:
                logs.update(flops)
                logs["sts_flops_saving"] = 1.0 - flops["sts_flops_actual"] / flops["sts_flops_dense"]
            metrics.clear()
        super().log(logs, start_time)


def _trainable_parts(parts) -> dict[str, bool]:
    """Which parts train, for the FLOPs count: projector, language model, and anything else (the vision side)."""
    projector = {id(p) for p in parts.projector.parameters()} if parts.projector is not None else set()
    language_model = {id(p) for p in parts.language_model_parameters()}
    trains = {"train_vision": False, "train_projector": False, "train_llm": False}
    for p in parts.model.parameters():
        if p.requires_grad:
            key = "train_projector" if id(p) in projector else "train_llm" if id(p) in language_model else "train_vision"
            trains[key] = True
    return trains


def _allow_skipped_layers_in_ddp(args: STSTrainingArguments) -> None:
    """Skipped layers leave parameters without gradients: DDP must look for them, with non-reentrant checkpointing."""
    if args.ddp_find_unused_parameters is not True:
        args.ddp_find_unused_parameters = True
        logger.info("STS: LDS is on, so ddp_find_unused_parameters=True (skipped layers have no gradient).")
    ckpt_kwargs = args.activation_checkpointing_kwargs or {}
    if args.activation_checkpointing and ckpt_kwargs.get("use_reentrant", False):
        args.activation_checkpointing_kwargs = {**ckpt_kwargs, "use_reentrant": False}
        logger.info("STS: LDS is on, so activation checkpointing is non-reentrant (needed with skipped layers in DDP).")
