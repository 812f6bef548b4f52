"""sts_trainer: stage-aware sparse training (STS) for multimodal LLMs, as a drop-in Hugging Face `Trainer`."""

from .arguments import STSTrainingArguments
from .layer_skip import LayerSkipper, skip_probability
from .stage import SparsityPlan, plan_sparsity
from .token_compression import TokenCompressor, compress_batch
from .trainer import STSTrainer

__version__ = "0.1.0"

__all__ = [
    "LayerSkipper",
    "STSTrainer",
    "STSTrainingArguments",
    "SparsityPlan",
    "TokenCompressor",
    "compress_batch",
    "plan_sparsity",
    "skip_probability",
]
