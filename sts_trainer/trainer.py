"""`STSTrainer`: a drop-in `Trainer` that trains with stage-aware sparsity."""

from transformers import Trainer

from .mixin import STSMixin


class STSTrainer(STSMixin, Trainer):
    """`Trainer` with the Sparse Training Scheme (`STSMixin` over `transformers.Trainer`).

    When training starts, the stage is resolved from `args.sts_stage` (see `plan_sparsity`) and the components for it
    are installed: the Visual Token Compressor for alignment, the Layer Dynamic Skipper for instruction tuning. They
    act only inside training forwards; evaluation, prediction and generation see the dense model. They are removed
    when training ends. With `sts_stage='none'`, or 'auto' on a model STS cannot sparsify, this is exactly `Trainer`.

    A plain `TrainingArguments` is accepted and upgraded to `STSTrainingArguments` with every STS option at its default.
    """
