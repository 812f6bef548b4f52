"""sts_trainer: stage-aware sparse training (STS) for multimodal LLMs, as a drop-in Hugging Face `Trainer`."""

from .arguments import STSTrainingArguments
from .layer_skip import LayerSkipper, SkipRecord, skip_probability
from .mixin import STSMixin
from .stage import SparsityPlan, plan_sparsity
from .token_compression import CompressionRecord, TokenCompressor, compress_batch
from .trainer import STSTrainer

__version__ = "0.1.0"

__all__ = [
    "CompressionRecord",
    "LayerSkipper",
    "STSMixin",
    "SkipRecord",
    "STSTrainer",
    "STSTrainingArguments",
    "SparsityPlan",
    "TokenCompressor",
    "compress_batch",
    "plan_sparsity",
    "skip_probability",
]
