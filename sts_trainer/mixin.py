"""`STSMixin`: the Sparse Training Scheme over any `transformers.Trainer` subclass.

    class STSTrainer(STSMixin, Trainer): ...              # sts_trainer.trainer
    class STSSFTTrainer(STSMixin, trl.SFTTrainer): ...    # sts_trainer.sft, for TRL users
    class MyTrainer(STSMixin, LLaVATrainer): ...          # a user's own Trainer subclass

The mixin goes first, so its methods wrap the trainer's. When training starts it resolves the stage
(`stage.plan_sparsity`) and installs the components for it; each training forward opens their `micro_batch`
contexts, and what they record is summed into the savings ledger (`savings.SavingsLedger`) and merged into the logs.
Evaluation, prediction and generation never open a context: they see the dense model.
"""

import contextlib
import inspect
import json
import logging
import os
from collections import defaultdict
from dataclasses import fields

import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import PretrainedConfig, PreTrainedModel, TrainingArguments
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightRenaming, apply_renamings
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

from .arguments import STS_OPTION_NAMES, STSTrainingArguments
from .callbacks import SavingsReportCallback
from .distributed import (
    AGREEING_ARGUMENTS,
    BlankImage,
    blank_image_mode,
    check_ranks_agree,
    fill_adam_state,
    gather_from_ranks,
    parameter_sharding,
)
from .flops import UncountableModelError, dynamic_resolution, micro_batch_flops, vision_flops, visual_tokens_per_image
from .layer_skip import LayerSkipper, SkipRecord, lr_mass_progress, scheduler_learning_rates
from .savings import STATE_FILE, MicroBatchRecord, SavingsLedger
from .stage import SparsityPlan, asks_for_sparsity, find_named_parts, lds_incompatible, plan_sparsity
from .token_compression import (
    IGNORE_INDEX, ISOLATOR_ATTRIBUTE, ISOLATOR_FILE, CompressionRecord, TokenCompressor, find_isolator, load_isolator,
    save_isolator, template_token_ids,
)

logger = logging.getLogger("sts_trainer")

# Model outputs that `prediction_step` leaves out unless the caller names its own `ignore_keys`: the cache, and each
# modality encoder's output (transformers 5.24 VLMs return `image_outputs`, whose `hidden_states` hold None for the
# vision layers not selected; the evaluation loop cannot pad None, and these are not predictions).
DEFAULT_IGNORE_KEYS = ("cache", "past_key_values", "image_outputs", "video_outputs", "audio_outputs")


class STSMixin:
    """All of STS, for a class that also derives from `transformers.Trainer` (placed after this mixin).

    `sts_args_class` is the arguments class the trainer expects: `STSTrainingArguments`, or one built on it and the
    trainer's own (`sts_trainer.sft.STSSFTConfig` for TRL's `SFTConfig`). Other arguments are upgraded to it: a
    copy with every STS option at its default, the fields it already has kept.
    """

    sts_args_class: type = STSTrainingArguments

    def __init__(self, model=None, args: TrainingArguments | None = None, *trainer_args, **trainer_kwargs):
        args = self._sts_arguments(args)
        # Decided before Trainer builds its Accelerator, which reads the DDP settings once. What the user asked for
        # explicitly fails here; under 'auto', a model with nothing to train is reported when training starts
        # (evaluation alone must work).
        if model is not None and not isinstance(model, str):
            try:
                plan = plan_sparsity(model, args)
            except ValueError:
                if asks_for_sparsity(args):
                    raise
                plan = None
            if plan is not None and plan.lds:
                _allow_unused_parameters_in_ddp(args, "LDS is on", "skipped layers have no gradient")
            if plan is not None and plan.vtc and plan.args.vtc_mode_isolator:
                _allow_unused_parameters_in_ddp(
                    args, "the mode isolator is on", "a forward that is not compressed leaves it without a gradient"
                )
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        if self.args.should_log and not logger.handlers:
            logger.addHandler(logging.StreamHandler())
            logger.setLevel(logging.INFO)
        if self.args.fsdp and not self.is_fsdp_enabled:
            logger.warning(
                f"STS: fsdp={self.args.fsdp!r} was given, but Accelerate did not enable FSDP "
                f"({self.accelerator.state.distributed_type}); training runs without it. Accelerate enables FSDP on "
                "accelerators (CUDA, XPU, NPU, ...) only, not on CPU processes."
            )
        self.sts_plan: SparsityPlan | None = None
        self.sts_ledger: SavingsLedger | None = None
        self._components: dict[str, TokenCompressor | LayerSkipper] = {}
        self._sts_step, self._sts_micro_step = -1, 0
        self._sts_metrics: dict[str, list[float]] = defaultdict(list)
        self._sts_report: SavingsReportCallback | None = None
        self._sts_forward_kwargs: dict = {}
        self._sts_last: tuple[tuple, float | None] | None = None  # the last micro-batch's shape and actual FLOPs
        self._sts_distill_weight = 0.0
        self._blank_image: BlankImage | None = None
        self._sts_warned_optimizer_state = False

    def _sts_arguments(self, args):
        cls = self.sts_args_class
        if args is None:
            return cls(output_dir="tmp_trainer")
        if isinstance(args, cls):
            return args
        if any(f.name not in args.__dict__ and f.name not in STS_OPTION_NAMES for f in fields(cls)):
            # `cls` has fields of its own that `args` lacks (an SFTConfig's, for a plain TrainingArguments): built
            # anew so its __post_init__ processes them, as TRL rebuilds a TrainingArguments into an SFTConfig.
            rebuilt = cls(**{**args.to_dict(), "hub_token": args.hub_token})
            rebuilt.__dict__["_sts_given"] = args.__dict__.get("_sts_given", frozenset())  # not every field passed
            return rebuilt
        # A copy as `cls` with the STS options at their defaults; fields of the user's own arguments class (LLaVA's
        # TrainingArguments subclass adds some) stay on the copy as attributes.
        return cls.from_training_arguments(args)

    # ---- installing the components for the run ---------------------------------------------------------------------

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
        self._check_ranks_agree()
        plan = plan_sparsity(self.model, self.args)
        args = plan.args  # the stage's options: `sts_preset`'s section applied
        if plan.lds and (why := self._lds_cannot_run()) is not None:
            plan = lds_incompatible(plan, args, why)
        if plan.lds and args.parallel_mode.value == "distributed" and not args.ddp_find_unused_parameters:
            raise ValueError(
                "LDS is on but this trainer was created when the stage did not call for it, so DDP was set up "
                "without find_unused_parameters. Pass ddp_find_unused_parameters=True, or set sts_stage explicitly."
            )
        if plan.vtc:
            ignore = template_token_ids(self.processing_class) if args.vtc_strategy == "instruction" else None
            self._components["vtc"] = TokenCompressor(
                plan.parts.image_token_id, args.vtc_keep_ratio, args.vtc_strategy, args.vtc_position_ids, args.seed,
                facts=plan.parts.facts, query_ignore_ids=ignore, keep_schedule=args.vtc_keep_schedule,
                keep_ratio_end=args.vtc_keep_ratio_end, schedule_fraction=args.vtc_keep_schedule_fraction,
                full_token_fraction=args.vtc_full_token_fraction, mode_isolator=args.vtc_mode_isolator,
                isolator_start=self._isolator_start(resume_from_checkpoint, plan.parts.model, args.vtc_mode_isolator),
            )
            self._sts_distill_weight = args.vtc_distill_weight
            if args.vtc_distill_weight and not args.vtc_full_token_fraction:
                logger.warning(
                    f"STS: vtc_distill_weight={args.vtc_distill_weight} has no effect in the {plan.stage} stage: it "
                    "distils on full-token steps, and vtc_full_token_fraction=0 gives none."
                )
            self._components["vtc"].install(plan.parts.model)
        if plan.lds:
            self._components["lds"] = LayerSkipper(args.lds_alpha, args.lds_epsilon, args.lds_schedule, args.seed,
                                                   order=args.lds_layer_order, rerank_every=args.lds_rerank_every)
            self._components["lds"].install(plan.parts.layers)
        self.sts_plan = plan
        self._install_blank_image(plan.parts)
        if plan.vtc or plan.lds or plan.not_sparsified:
            self.sts_ledger = SavingsLedger(plan.stage, not_sparsified=plan.not_sparsified)
            if not plan.not_sparsified and not isinstance(getattr(plan.parts.model, "config", None), PretrainedConfig):
                self.sts_ledger.flops_not_counted = "the model has no transformers config to count FLOPs from"
            if resume_from_checkpoint is not None and plan.not_sparsified is None:
                self._resume_ledger(resume_from_checkpoint)
            self._sts_report = SavingsReportCallback(self.sts_ledger)
            self.add_callback(self._sts_report)
        if plan.vtc or plan.lds:
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
        (logger.warning if plan.not_sparsified else logger.info)(plan.describe())

    @staticmethod
    def _isolator_start(resume_from_checkpoint: str | None, model, size: int) -> torch.Tensor | None:
        """The mode isolator's saved tokens this run starts from: the checkpoint's when resuming, else those saved
        with the model (the previous stage's output folder); None for a new one, or without the isolator."""
        if not size:
            return None
        folder = resume_from_checkpoint or getattr(getattr(model, "config", None), "_name_or_path", None)
        tokens = load_isolator(folder)  # None for a folder without the file, a hub id or no folder
        if tokens is not None:
            logger.info(f"STS: the mode isolator starts from {os.path.join(folder, ISOLATOR_FILE)}.")
        return tokens

    def _lds_cannot_run(self) -> str | None:
        """Why LDS cannot run on this trainer's backend, or None. A skip must be a skip that happens, and a layer
        skipped in every micro-batch of a step must not move (`LayerSkipper.guard_optimizer`)."""
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None) if self.is_fsdp_enabled else None
        if plugin is not None and getattr(plugin, "fsdp_version", 1) != 2:
            return ("FSDP1 (Accelerate's default fsdp_version 1, or \"version\": 1 in fsdp_config) wraps each "
                    "decoder layer in a FullyShardedDataParallel that gathers and runs it whatever LDS decides, so "
                    "no layer would be skipped; use FSDP2: fsdp_version: 2 in the Accelerate config, or "
                    "\"version\": 2 in fsdp_config")
        sharded = self.is_deepspeed_enabled or self.is_fsdp_enabled
        if self.is_deepspeed_enabled and "optimizer" in self.accelerator.state.deepspeed_plugin.deepspeed_config:
            return ("the DeepSpeed config has an 'optimizer' section, so DeepSpeed builds an optimizer with one "
                    "parameter group, and a layer LDS skipped would still move along Adam's momentum (DeepSpeed "
                    "gives it a zero gradient); remove the section so that the Trainer builds the optimizer "
                    "(--optim and --learning_rate set it)")
        if sharded and self.optimizer is not None and any("sts_layer" not in g for g in self.optimizer.param_groups):
            return ("the optimizer was given to the trainer, with parameter groups that mix decoder layers, and under "
                    "DeepSpeed or FSDP a layer LDS skipped would still move along Adam's momentum (it gets a zero "
                    "gradient); let the trainer build the optimizer (its parameter groups are split by layer)")
        return None

    def create_optimizer(self, *args, **kwargs):
        """Trainer's optimizer; under LDS each decoder layer has its own parameter groups, and a layer skipped in every
        micro-batch of a step is left out of that step (`LayerSkipper.guard_optimizer`), on every backend."""
        fresh = self.optimizer is None
        optimizer = super().create_optimizer(*args, **kwargs)
        skipper = self._components.get("lds")
        if skipper is not None:
            if fresh:
                skipper.split_param_groups(optimizer)
            skipper.guard_optimizer(optimizer)
        return optimizer

    def _check_ranks_agree(self) -> None:
        """Fail on every rank, naming the setting, when the ranks were launched with different STS options, seeds
        or step counts (they would skip other layers or keep other tokens, and wait on each other)."""
        settings = {**self.args.sts_options(), **{name: getattr(self.args, name) for name in AGREEING_ARGUMENTS}}
        dataset = self.train_dataset
        settings["len(train_dataset)"] = len(dataset) if hasattr(dataset, "__len__") else None
        check_ranks_agree(settings)

    def _install_blank_image(self, parts, announce: bool = True) -> None:
        """Under ZeRO-3 or FSDP (`distributed.BlankImage`), for a vision-language model."""
        if parts is None or not parts.is_multimodal:
            return
        sharding = parameter_sharding(self)
        mode = blank_image_mode(self.args.sts_blank_image, sharding, self.args.world_size)
        if mode is None:
            return
        self._blank_image = BlankImage(parts, mode, self._components.get("vtc"))
        self._blank_image.install()
        if mode == "blank" and announce:
            logger.info(
                f"STS: {sharding or 'sts_blank_image=on'}: a batch without images runs the vision tower and projector "
                "on a blank image whose contribution is exactly zero, so every rank gathers the same parameters."
            )

    def _blank_image_active(self):
        return self._blank_image.active() if self._blank_image is not None else contextlib.nullcontext()

    def _remove_sts(self) -> None:
        if self._blank_image is not None:
            self._blank_image.remove()
            self._blank_image = None
        if self._sts_report is not None:
            self.remove_callback(self._sts_report)
        for component in self._components.values():
            component.remove()
        self._components.clear()

    # ---- training forwards ------------------------------------------------------------------------------------------

    def get_batch_samples(self, *args, **kwargs):
        """Trainer's micro-batches; under VTC, image placeholders carry no loss label (TRL's vision collator labels
        them), so `num_items_in_batch`, counted here, agrees with what the shortened sequence can be trained on."""
        batches, num_items = super().get_batch_samples(*args, **kwargs)
        if "vtc" in self._components and any([self._unlabel_placeholders(batch) for batch in batches]):  # every one
            num_items = self._get_num_items_in_batch(batches, self.args.device)
        return batches, num_items

    def _unlabel_placeholders(self, batch) -> bool:
        labels, input_ids = batch.get("labels"), batch.get("input_ids")
        if labels is None or input_ids is None:
            return False
        placeholders = (input_ids == self.sts_plan.parts.image_token_id) & (labels != IGNORE_INDEX)
        if not placeholders.any():
            return False
        batch["labels"] = labels.masked_fill(placeholders, IGNORE_INDEX)
        return True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with self._blank_image_active():
            return self._sts_compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _sts_compute_loss(self, model, inputs, return_outputs, num_items_in_batch):
        if not model.training or not self._components:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        step = self.state.global_step
        lds = self._components.get("lds")
        if lds is not None and lds.progress is None and self.sts_plan.args.lds_progress == "lr_mass":
            lds.progress = lr_mass_progress(scheduler_learning_rates(self.lr_scheduler, self.state.max_steps))
        self._sts_micro_step = self._sts_micro_step + 1 if step == self._sts_step else 0  # micro-batch of the step
        blank = self._blank_image
        blank_before = (blank.blank_forwards, blank.blank_backwards) if blank is not None else (0, 0)
        self._sts_step = step
        with contextlib.ExitStack() as stack:
            records = {
                name: stack.enter_context(component.micro_batch(step, self._sts_micro_step, self.state.max_steps))
                for name, component in self._components.items()
            }
            vtc = records.get("vtc")
            inputs = {**inputs, **self._sts_forward_kwargs}
            distill = vtc is not None and vtc.full_tokens and vtc.keep_ratio < 1.0 and self._sts_distill_weight
            if distill and inputs.get("labels") is not None:
                result = self._distilled_loss(model, inputs, vtc, return_outputs, num_items_in_batch)
            else:
                result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        blanks = (blank.blank_forwards - blank_before[0], blank.blank_backwards - blank_before[1]) if blank else (0, 0)
        self._account(inputs, step, vtc, records.get("lds"), blanks)
        return result

    def _distilled_loss(self, model, inputs, vtc: CompressionRecord, return_outputs, num_items_in_batch):
        """A full-token step's loss plus `vtc_distill_weight` * KL(pruned || full) over the answer tokens.

        The teacher is a no-grad forward of the same batch compressed at the step's keep ratio (same skipped layers:
        LDS decides per micro-batch), the student the full-token forward. Both sequences hold the same answer tokens
        in the same order (VTC drops unlabelled image tokens only), so their logits are paired by label position. The
        sum over tokens is normalised like the language-model loss Trainer computes (by `num_items_in_batch` where
        the model takes it, else per micro-batch)."""
        labels = inputs["labels"]  # Trainer's compute_loss pops it from `inputs` under label smoothing
        with torch.no_grad(), self._components["vtc"].teacher_forward():
            teacher = model(**inputs)
        # a batch without images is not compressed: the teacher saw the student's sequence
        teacher_labels = vtc.teacher_labels if vtc.teacher else labels
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        student_logits = outputs["logits"][:, :-1][labels[:, 1:] != IGNORE_INDEX]  # (N, V)
        teacher_logits = teacher["logits"][:, :-1][teacher_labels[:, 1:] != IGNORE_INDEX]  # (N, V)
        kl = F.kl_div(
            F.log_softmax(student_logits.float(), -1), F.log_softmax(teacher_logits.float(), -1),
            log_target=True, reduction="sum",
        )
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            kl = kl / num_items_in_batch
            if self.args.average_tokens_across_devices:  # as Trainer scales its loss
                kl = kl * self.accelerator.num_processes
        else:
            kl = kl / max(1, student_logits.shape[0])
        self._sts_metrics["vtc_distill_kl"].append(float(kl.detach()))
        loss = loss + self._sts_distill_weight * kl.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def _account(self, inputs, step: int, vtc: CompressionRecord | None, lds: SkipRecord | None,
                 blanks: tuple[int, int] = (0, 0)) -> None:
        """Add one micro-batch to the ledger and the metrics: what it would have cost densely, and what it cost.
        `blanks`: the blank image's forwards in it, and how many of them had a backward (a dense run under ZeRO-3
        or FSDP runs them too, so they count in both)."""
        input_ids = inputs.get("input_ids")  # (B, L) before compression
        if input_ids is None:  # a custom model fed other inputs: its first tensor gives the batch's shape
            input_ids = next(value for value in inputs.values() if isinstance(value, torch.Tensor))
        shape = tuple(input_ids.shape[:2])
        dense = actual = None
        config = getattr(self.sts_plan.parts.model, "config", None)
        if self.sts_ledger.flops_not_counted is None:
            try:
                dense, actual = self._micro_batch_flops(config, inputs, input_ids, vtc, lds)
                if blanks[0]:
                    blank = self._blank_image_flops(config, *blanks)
                    dense, actual = dense + blank, actual + blank
            except UncountableModelError as error:
                self.sts_ledger.flops_not_counted = str(error)
                logger.warning(f"STS: training FLOPs are not counted, Trainer's estimate is used instead: {error}")
        kept = vtc.kept_fraction if vtc is not None else None
        self.sts_ledger.add(
            MicroBatchRecord(
                step=step,
                dense_flops=dense,
                actual_flops=actual,
                kept_fraction=kept,
                keep_ratio=vtc.keep_ratio if vtc is not None else None,
                full_tokens=vtc.full_tokens if vtc is not None else None,
                skipped_fraction=lds.skipped_fraction if lds is not None else None,
                skip_probabilities=lds.probabilities if lds is not None else None,
            )
        )
        self._sts_last = (shape, actual)
        metrics = self._sts_metrics
        for stats in vtc.forwards if vtc is not None else ():
            metrics["vtc_kept_fraction"].append(stats.kept_tokens / stats.visual_tokens)
            metrics["vtc_input_length_before"].append(stats.length_before)
            metrics["vtc_input_length_after"].append(stats.length_after)
        if vtc is not None:
            metrics["vtc_keep_ratio"].append(vtc.keep_ratio)
            metrics["vtc_full_token_steps"].append(float(vtc.full_tokens))
        if lds is not None:
            metrics["lds_skipped_fraction"].append(lds.skipped_fraction)
            metrics["lds_skip_probability"].append(sum(lds.probabilities) / len(lds.probabilities))
        if actual is not None:
            metrics["sts_flops_dense"].append(dense)
            metrics["sts_flops_actual"].append(actual)

    def _micro_batch_flops(self, config: PretrainedConfig, inputs, input_ids, vtc, lds) -> tuple[float, float]:
        """(dense, actual) FLOPs of one micro-batch: the tokens the language model really received, the layers that
        really ran."""
        parts = self.sts_plan.parts
        images = visual = 0
        if parts.is_multimodal and (visual := int((input_ids == parts.image_token_id).sum())):
            if dynamic_resolution(config):  # each image at its own size: its share of the batch's visual tokens
                grids = inputs.get("image_grid_thw", inputs.get("image_sizes"))
                images = len(grids) if grids is not None else 1
            else:  # images (or tiles) of the config's size
                images = max(1, round(visual / visual_tokens_per_image(config)))
        common = dict(config=config, batch_size=input_ids.shape[0], images=images, visual_tokens=visual,
                      **self._sts_trains)
        length = input_ids.shape[1]
        dense = micro_batch_flops(llm_length=length, **common)
        llm_length = vtc.llm_length if vtc is not None and vtc.llm_length is not None else length
        executed = lds.executed_layers if lds is not None else None
        actual = micro_batch_flops(llm_length=llm_length, executed_layers=executed, **common)
        for teacher in vtc.teacher if vtc is not None else ():  # self-distillation's pruned forward: no backward
            frozen = {**common, **_NOTHING_TRAINS, "llm_adapter_weights_per_layer": 0.0}
            actual += micro_batch_flops(llm_length=teacher.llm_length, executed_layers=executed, **frozen)
        return dense, actual

    def _blank_image_flops(self, config: PretrainedConfig, forwards: int, backwards: int) -> float:
        """FLOPs of the blank image's runs through the vision tower and projector (`distributed.BlankImage`)."""
        tokens = self._blank_image.visual_tokens
        trains = {key: self._sts_trains[key] for key in _NOTHING_TRAINS}
        flops = vision_flops(config, 1, tokens, **trains) * backwards
        return flops + vision_flops(config, 1, tokens, **_NOTHING_TRAINS) * (forwards - backwards)

    def floating_point_ops(self, inputs) -> int:
        """Actual FLOPs of the micro-batch just trained (kept tokens, executed layers), as the ledger counted them;
        Trainer sums these into `state.total_flos`. A read, with no side effect: Trainer's own estimate for inputs
        that are not the last trained micro-batch, and wherever FLOPs are not counted (accounting never stops a run)."""
        shape = tuple(inputs["input_ids"].shape[:2]) if isinstance(inputs.get("input_ids"), torch.Tensor) else None
        if self._sts_last is not None and self._sts_last[1] is not None and (shape is None or shape == self._sts_last[0]):
            return int(self._sts_last[1])
        return super().floating_point_ops(inputs)

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

    # ---- evaluation ------------------------------------------------------------------------------------------------

    def evaluation_loop(self, *args, **kwargs):
        """Trainer's evaluation loop; outside training (`evaluate()`, `predict()` on their own), under ZeRO-3 or FSDP,
        with the blank image for batches without images, as during training (no other STS component)."""
        if self._blank_image is not None or self.args.sts_stage == "none":  # during training: already installed
            return super().evaluation_loop(*args, **kwargs)
        try:
            parts = find_named_parts(self.model, self.args)
        except ValueError:  # an architecture sts_trainer does not know: nothing to do
            parts = None
        self._install_blank_image(parts, announce=False)
        try:
            return super().evaluation_loop(*args, **kwargs)
        finally:
            if self._blank_image is not None:
                self._blank_image.remove()
                self._blank_image = None

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if ignore_keys is None:
            config = getattr(self.model, "config", None)
            ignore_keys = list(getattr(config, "keys_to_ignore_at_inference", None) or []) + list(DEFAULT_IGNORE_KEYS)
        with self._blank_image_active():  # evaluation during training, under ZeRO-3 or FSDP
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    # ---- checkpoints -----------------------------------------------------------------------------------------------

    def _save_checkpoint(self, model, trial) -> None:
        """The trainer's checkpoint, plus the savings ledger so far and the STS options (`savings.STATE_FILE`).
        Under FSDP, every parameter's optimizer state is saved (`distributed.fill_adam_state`), so the checkpoint
        resumes even when LDS has skipped a layer in every step so far."""
        if self.is_fsdp_enabled and self.optimizer is not None:
            if fill_adam_state(self.optimizer) is None and not self._sts_warned_optimizer_state:
                self._sts_warned_optimizer_state = True
                logger.warning(
                    "STS: under FSDP a parameter that never had a gradient (a layer LDS skipped in every step so far) "
                    f"has no state in {type(getattr(self.optimizer, 'optimizer', self.optimizer)).__name__}, and "
                    "resuming from the checkpoint fails; sts_trainer fills it in for Adam and AdamW only."
                )
        super()._save_checkpoint(model, trial)
        if self.sts_ledger is None or self.sts_plan.not_sparsified is not None:
            return
        # every rank's totals so far (a collective: every rank saves), and the wall-clock so far
        ledger = {**self.sts_ledger.to_dict(), "ranks": gather_from_ranks(self.sts_ledger.rank_sums()),
                  "wall_clock_seconds": self._sts_report.elapsed()}
        lds = self._components.get("lds")
        lds_state = lds.state() if lds is not None else None  # a collective too, under lds_layer_order='redundancy'
        if not self.args.should_save:
            return
        folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        with open(os.path.join(folder, STATE_FILE), "w") as f:
            json.dump({"options": self.args.sts_options(), "ledger": ledger, "lds": lds_state}, f)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Trainer's save; the mode isolator (`vtc_mode_isolator`), when the model has one, goes in its own file
        beside the weights (`ISOLATOR_FILE`), never in them."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        tokens = None
        if state_dict is not None:  # a gathered state dict (ZeRO-3, FSDP): the isolator's tokens are in it
            keys = [key for key in state_dict if f"{ISOLATOR_ATTRIBUTE}." in key]
            tokens = state_dict[keys[0]] if keys else None
            state_dict = {key: value for key, value in state_dict.items() if key not in keys}
        if tokens is None and (isolator := find_isolator(self.model)) is not None:
            tokens = isolator.tokens
        super()._save(output_dir, state_dict)
        if tokens is not None and self.args.should_save:
            if tokens.numel() == 0:  # partitioned under ZeRO-3 without a gathered state dict
                logger.warning(
                    f"STS: the mode isolator is partitioned and was not gathered; it is not saved in {output_dir}."
                )
            else:
                save_isolator(tokens, output_dir)

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
        rank = self.args.process_index
        if rank == 0 or not ledger.ranks:
            self.sts_ledger.records = ledger.records  # rank 0's micro-batches, its own
        elif rank < len(ledger.ranks):  # another rank: its totals before the checkpoint (not its records)
            self.sts_ledger.resumed = ledger.ranks[rank]
        self.sts_ledger.wall_clock_seconds = ledger.wall_clock_seconds
        self.sts_ledger.flops_not_counted = self.sts_ledger.flops_not_counted or ledger.flops_not_counted
        if "lds" in self._components:  # the measurements that rank the layers (lds_layer_order='redundancy')
            self._components["lds"].load_state(saved.get("lds"))

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
        missing = [key for key in missing if key not in tied and not key.startswith(f"{ISOLATOR_ATTRIBUTE}.")]
        if missing or unexpected:
            raise RuntimeError(
                f"The checkpoint {checkpoint} does not match the model {type(model).__name__}: missing "
                f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}."
            )
        return True


# The FLOPs count's flags for a forward with no backward (self-distillation's teacher, the blank image's no-grad runs).
_NOTHING_TRAINS = {"train_vision": False, "train_projector": False, "train_llm": False}


def _trainable_parts(parts) -> dict:
    """What trains, for the FLOPs count: projector (and the mode isolator), language model (its own weights), adapters
    in its decoder layers (LoRA: the base weights beside them stay frozen), and anything else (the vision side)."""
    projector = {id(p) for p in parts.projector.parameters()} if parts.projector is not None else set()
    if (isolator := find_isolator(parts.model)) is not None:  # the mode isolator trains with the projector
        projector |= {id(p) for p in isolator.parameters()}
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


def _allow_unused_parameters_in_ddp(args: STSTrainingArguments, on: str, why: str) -> None:
    """Skipped layers, or a mode isolator in a forward that is not compressed, leave parameters without gradients:
    DDP must look for them, with non-reentrant checkpointing."""
    if args.ddp_find_unused_parameters is not True:
        args.ddp_find_unused_parameters = True
        logger.info(f"STS: {on}, so ddp_find_unused_parameters=True ({why}).")
    ckpt_kwargs = args.activation_checkpointing_kwargs or {}
    if args.activation_checkpointing and ckpt_kwargs.get("use_reentrant", False):
        args.activation_checkpointing_kwargs = {**ckpt_kwargs, "use_reentrant": False}
        logger.info(f"STS: {on}, so activation checkpointing is non-reentrant (needed with unused parameters in DDP).")
