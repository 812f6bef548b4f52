"""STS for TRL users: `STSSFTConfig` (TRL's `SFTConfig` with the STS options) and `STSSFTTrainer` (`STSMixin` over
TRL's `SFTTrainer`). Needs TRL: `pip install 'sts_trainer[trl]'`; the rest of sts_trainer never imports it.

    from sts_trainer.sft import STSSFTConfig, STSSFTTrainer

    args = STSSFTConfig(output_dir="out", sts_stage="auto", vtc_keep_ratio=0.5, lds_alpha=0.5)   # was: SFTConfig
    trainer = STSSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor)
    trainer.train()

What TRL's `SFTTrainer` does is kept: its vision-language collator, its fused LM-head loss, its metrics and model
card. Two things to know. TRL's vision collator labels every token but padding (unless `assistant_only_loss=True`),
image placeholders included; under VTC those placeholder labels are cleared, since dropped tokens cannot be trained
on (the loss is then over text tokens only, in every step). TRL turns gradient checkpointing on by default; LDS needs
it non-reentrant, as for `STSTrainer`.
"""

from dataclasses import dataclass

from trl import SFTConfig, SFTTrainer

from .arguments import STSTrainingArguments
from .mixin import STSMixin


@dataclass
class STSSFTConfig(SFTConfig, STSTrainingArguments):
    """`SFTConfig` plus the options of the Sparse Training Scheme (see `STSTrainingArguments`).

    `SFTConfig` comes first so that its own defaults for `TrainingArguments` fields (which it changes) win: the
    dataclass fields of the later base would otherwise bring back `TrainingArguments`' defaults."""


class STSSFTTrainer(STSMixin, SFTTrainer):
    """TRL's `SFTTrainer` with the Sparse Training Scheme. A plain `SFTConfig` (or `TrainingArguments`) is upgraded to
    `STSSFTConfig` with every STS option at its default."""

    sts_args_class = STSSFTConfig
