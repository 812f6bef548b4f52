"""`STSTrainer`: a drop-in `Trainer` that trains with stage-aware sparsity."""

import contextlib
import inspect
import json
import logging
import os
from collections import defaultdict

import torch
from safetensors import safe_open
from transformers import PretrainedConfig, PreTrainedModel, Trainer, TrainingArguments
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightRenaming, apply_renamings
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

from .arguments import STSTrainingArguments
from .callbacks import SavingsReportCallback
from .flops import UncountableModelError, micro_batch_flops, visual_tokens_per_image
from .layer_skip import LayerSkipper, decision_generator
from .savings import STATE_FILE, MicroBatchRecord, SavingsLedger
from .stage import SparsityPlan, asks_for_sparsity, plan_sparsity
from .token_compression import TokenCompressor, template_token_ids

logger = logging.getLogger("sts_trainer")

# VTC's random strategy draws from its own stream of (seed, step, micro-step); LDS's decisions use stream 0.
_VTC_STREAM = 1
# Model outputs that `prediction_step` leaves out unless the caller names its own `ignore_keys`: the cache, and each
# modality encoder's output (transformers 5.24 VLMs return `image_outputs`, whose `hidden_states` hold None for the
# vision layers not selected; the evaluation loop cannot pad None, and these are not predictions).
DEFAULT_IGNORE_KEYS = ("cache", "past_key_values", "image_outputs", "video_outputs", "audio_outputs")


class STSTrainer(Trainer):
    """`Trainer` with the Sparse Training Scheme.

    When training starts, the stage is resolved from `args.sts_stage` (see `plan_sparsity`) and the components for it
    are installed: the Visual Token Compressor for alignment, the Layer Dynamic Skipper for instruction tuning. They
    act only inside training forwards; evaluation, prediction and generation see the dense model. They are removed
    when training ends. With `sts_stage='none'`, or 'auto' on a model STS cannot sparsify, this is exactly `Trainer`.

    A plain `TrainingArguments` is accepted and upgraded to `STSTrainingArguments` with every STS option at its default.
    """

    def __init__(self, model=None, args: TrainingArguments | None = None, *trainer_args, **trainer_kwargs):
        if args is None:
            args = STSTrainingArguments(output_dir="tmp_trainer")
        elif not isinstance(args, STSTrainingArguments):
            args = STSTrainingArguments.from_training_arguments(args)
        # Decided before Trainer builds its Accelerator, which reads the DDP settings once. What the user asked for
        # explicitly fails here; under 'auto', a model with nothing to train is reported when training starts
        # (evaluation alone must work).
        if model is not None:
            try:
                plan = plan_sparsity(model, args)
            except ValueError:
                if asks_for_sparsity(args):
                    raise
                plan = None
            if plan is not None and plan.lds:
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
        self._sts_forward_kwargs: dict = {}

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        if resume_from_checkpoint is True:  # resolved as Trainer does, so the STS state is read from the same folder
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        return super().train(resume_from_checkpoint or None, *args, **kwargs)

    def _inner_training_loop(self, *args, resume_from_checkpoint: str | None = None, **kwargs):
        # Installed here, not in train(): Trainer.train replaces the model first when it has a model_init.
        self._install_sts(resume_from_checkpoint)
        try:
            return super()._inner_training_loop(*args, resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        finally:
            self._remove_sts()

    def _install_sts(self, resume_from_checkpoint: str | None) -> None:
        plan = plan_sparsity(self.model, self.args)
        args = self.args
        if plan.lds and args.parallel_mode.value == "distributed" and not args.ddp_find_unused_parameters:
            raise ValueError(
                "LDS is on but this STSTrainer was created when the stage did not call for it, so DDP was set up "
                "without find_unused_parameters. Pass ddp_find_unused_parameters=True, or set sts_stage explicitly."
            )
        if plan.lds and args.torch_compile:
            raise ValueError(
                "torch_compile=True cannot be combined with LDS: every new set of skipped layers is a new graph, and "
                "after torch.compile's recompilation limit the whole model silently falls back to eager. Turn "
                "torch_compile off for the instruction stage, or turn LDS off with sts_lds='off'."
            )
        if plan.vtc:
            self._compressor = TokenCompressor(
                plan.parts.model,
                plan.parts.image_token_id,
                args.vtc_keep_ratio,
                args.vtc_strategy,
                args.vtc_position_ids,
                facts=plan.parts.facts,
                query_ignore_ids=template_token_ids(self.processing_class) if args.vtc_strategy == "instruction" else None,
            )
            self._compressor.install()
        if plan.lds:
            self._skipper = LayerSkipper(plan.parts.layers, args.lds_alpha, args.lds_epsilon, args.lds_schedule, args.seed)
            self._skipper.install()
        self.sts_plan = plan
        if plan.vtc or plan.lds or plan.not_sparsified:
            self.sts_ledger = SavingsLedger(plan.stage, not_sparsified=plan.not_sparsified)
            if resume_from_checkpoint is not None and plan.not_sparsified is None:
                self._resume_ledger(resume_from_checkpoint)
            self._sts_report = SavingsReportCallback(self.sts_ledger)
            self.add_callback(self._sts_report)
        if plan.vtc or plan.lds:
            self._sts_hooks.append(
                plan.parts.language_model.register_forward_pre_hook(self._record_llm_length, with_kwargs=True)
            )
            self._sts_trains = _trainable_parts(plan.parts)
            # No KV cache in training forwards (LDS would leave holes in it), where the model takes the argument:
            # by name, or through the **kwargs a transformers model passes on to its language model.
            forward = inspect.signature(plan.parts.model.forward).parameters.values()
            takes = any(p.name == "use_cache" for p in forward) or (
                isinstance(plan.parts.model, PreTrainedModel) and any(p.kind is p.VAR_KEYWORD for p in forward)
            )
            self._sts_forward_kwargs = {"use_cache": False} if takes else {}
        if plan.note:
            logger.warning(f"STS: {plan.note}")
        (logger.warning if plan.not_sparsified else logger.info)(plan.describe(args))

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

    def _save_checkpoint(self, model, trial) -> None:
        """Trainer's checkpoint, plus the savings ledger so far and the STS options (`savings.STATE_FILE`)."""
        super()._save_checkpoint(model, trial)
        if self.sts_ledger is None or self.sts_plan.not_sparsified is not None or not self.args.should_save:
            return
        folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        with open(os.path.join(folder, STATE_FILE), "w") as f:
            json.dump({"options": self.args.sts_options(), "ledger": self.sts_ledger.to_dict()}, f)

    def _resume_ledger(self, checkpoint: str) -> None:
        """Continue the ledger of the run being resumed, and warn by name about each STS option that changed."""
        path = os.path.join(checkpoint, STATE_FILE)
        if not os.path.isfile(path):
            logger.warning(f"STS: {checkpoint} has no {STATE_FILE}; the savings report covers the resumed part only.")
            return
        with open(path) as f:
            saved = json.load(f)
        for name, value in self.args.sts_options().items():
            if saved["options"].get(name) != value:
                logger.warning(
                    f"STS: resuming with {name}={value!r}, but the checkpoint's run had {name}="
                    f"{saved['options'].get(name)!r}; the savings report mixes both settings."
                )
        ledger = SavingsLedger.from_dict(saved["ledger"])
        self.sts_ledger.records = ledger.records
        self.sts_ledger.wall_clock_seconds = ledger.wall_clock_seconds
        self.sts_ledger.flops_not_counted = ledger.flops_not_counted

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training or (self._compressor is None and self._skipper is None):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        with self._sparse_forward(inputs):
            return super().compute_loss(model, {**inputs, **self._sts_forward_kwargs}, return_outputs, num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if ignore_keys is None:
            config = getattr(self.model, "config", None)
            ignore_keys = list(getattr(config, "keys_to_ignore_at_inference", None) or []) + list(DEFAULT_IGNORE_KEYS)
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

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
        input_ids = inputs.get("input_ids")  # (B, L) before compression
        if input_ids is None:  # a custom model fed other inputs: its first tensor gives the batch's shape
            input_ids = next(value for value in inputs.values() if isinstance(value, torch.Tensor))
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
        """Restore a full-model checkpoint strictly, under the model's own key names; False when the checkpoint or
        the setup is one Trainer's own loading handles (PEFT adapters, DeepSpeed, FSDP).

        `Trainer` loads the saved state dict non-strictly, and transformers saves some models (LLaVA among them) with
        legacy key names (`language_model.model.layers...`): nothing matches, only a warning is printed, and training
        silently goes on from the current weights (on resume, and with `load_best_model_at_end`). Here the saved keys
        are renamed as `from_pretrained` renames them, the tensors are read memory-mapped, and every weight of the
        model must be restored (weights tied to another are not saved). A checkpoint whose conversion is more than a
        renaming (fused or split tensors) is loaded through `from_pretrained` instead.
        """
        has_full_weights = any(
            os.path.isfile(os.path.join(checkpoint, name))
            for name in (SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME)
        )
        if not isinstance(model, PreTrainedModel) or not has_full_weights or self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return False
        logger.info(f"STS: restoring the model weights from {checkpoint}.")
        state = _renamed_safetensors(checkpoint, model)
        if state is None:
            state = type(model).from_pretrained(checkpoint, dtype=next(model.parameters()).dtype).state_dict()
        tied = set(getattr(model, "all_tied_weights_keys", None) or {})
        with torch.no_grad():
            missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [key for key in missing if key not in tied]
        if missing or unexpected:
            raise RuntimeError(
                f"The checkpoint {checkpoint} does not match the model {type(model).__name__}: missing "
                f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}."
            )
        return True

    def _record_llm_length(self, module, args, kwargs):
        """The sequence length the language model really receives (after VTC), for the actual FLOPs."""
        if self._sts_micro_batch is None or not module.training:
            return
        sequence = kwargs.get("inputs_embeds")
        if sequence is None:
            sequence = kwargs.get("input_ids")
        if sequence is None and args:  # a decoder stack called positionally: self.decoder(hidden_states)
            sequence = args[0]
        if isinstance(sequence, torch.Tensor) and sequence.dim() >= 2:
            self._sts_micro_batch["llm_length"] = sequence.shape[1]

    def floating_point_ops(self, inputs) -> int:
        """Actual FLOPs of the micro-batch just trained (kept tokens, executed layers), from `flops.py`'s count.

        Trainer sums these into `state.total_flos`. Without STS components this is Trainer's own estimate, and so it
        is for a model `flops.py` cannot count: accounting never stops a run (a warning, and the report says so).
        """
        record, self._sts_micro_batch = self._sts_micro_batch, None
        config = getattr(self.sts_plan.parts.model, "config", None) if record is not None else None
        if self.sts_ledger is None or not isinstance(config, PretrainedConfig):
            return super().floating_point_ops(inputs)  # e.g. a custom nn.Module: no config to count from
        dense = actual = None
        if self.sts_ledger.flops_not_counted is None:
            try:
                dense, actual = self._micro_batch_flops(config, record)
            except UncountableModelError as error:
                self.sts_ledger.flops_not_counted = str(error)
                logger.warning(f"STS: training FLOPs are not counted, Trainer's estimate is used instead: {error}")
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
        if actual is None:
            return super().floating_point_ops(inputs)
        self._sts_metrics["sts_flops_dense"].append(dense)
        self._sts_metrics["sts_flops_actual"].append(actual)
        return int(actual)

    def _micro_batch_flops(self, config: PretrainedConfig, record: dict) -> tuple[float, float]:
        """(dense, actual) FLOPs of a recorded micro-batch."""
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
        return dense, actual

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


def _trainable_parts(parts) -> dict:
    """What trains, for the FLOPs count: projector, language model (its own weights), adapters in its decoder layers
    (LoRA: the base weights beside them stay frozen), and anything else (the vision side)."""
    projector = {id(p) for p in parts.projector.parameters()} if parts.projector is not None else set()
    language_model = {id(p) for p in parts.language_model_parameters()}
    trains = {"train_vision": False, "train_projector": False, "train_llm": False}
    for name, p in parts.model.named_parameters():
        if p.requires_grad and not _is_adapter(name):
            key = "train_projector" if id(p) in projector else "train_llm" if id(p) in language_model else "train_vision"
            trains[key] = True
    adapters = sum(p.numel() for name, p in parts.layers.named_parameters() if p.requires_grad and _is_adapter(name))
    trains["llm_adapter_weights_per_layer"] = adapters / len(parts.layers)
    return trains


def _is_adapter(name: str) -> bool:
    """A PEFT LoRA weight (`...q_proj.lora_A.default.weight`); adapters elsewhere count with the part they sit in."""
    return ".lora_A." in name or ".lora_B." in name


def _renamed_safetensors(checkpoint: str, model: PreTrainedModel) -> dict[str, torch.Tensor] | None:
    """The checkpoint's safetensors, memory-mapped, under the model's key names (the renamings `from_pretrained`
    applies); None when the checkpoint is not safetensors or its conversion is more than renaming keys."""
    conversions = get_model_conversion_mapping(model)
    if any(not isinstance(conversion, WeightRenaming) for conversion in conversions):
        return None
    index = os.path.join(checkpoint, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(checkpoint, SAFE_WEIGHTS_NAME)):
        files = [SAFE_WEIGHTS_NAME]
    else:
        return None
    state = {}
    for name in files:
        with safe_open(os.path.join(checkpoint, name), framework="pt") as f:
            for key in f.keys():
                state[apply_renamings(key, conversions)] = f.get_tensor(key)
    return state


def _allow_skipped_layers_in_ddp(args: STSTrainingArguments) -> None:
    """Skipped layers leave parameters without gradients: DDP must look for them, with non-reentrant checkpointing."""
    if args.ddp_find_unused_parameters is not True:
        args.ddp_find_unused_parameters = True
        logger.info("STS: LDS is on, so ddp_find_unused_parameters=True (skipped layers have no gradient).")
    ckpt_kwargs = args.activation_checkpointing_kwargs or {}
    if args.activation_checkpointing and ckpt_kwargs.get("use_reentrant", False):
        args.activation_checkpointing_kwargs = {**ckpt_kwargs, "use_reentrant": False}
        logger.info("STS: LDS is on, so activation checkpointing is non-reentrant (needed with skipped layers in DDP).")
