"""sts_trainer: stage-aware sparse training (STS) for multimodal LLMs, as a drop-in Hugging Face `Trainer`.

The names below load on first use, so `import sts_trainer` is cheap; the core needs only torch and transformers.
`sts_trainer.sft` (TRL users), `sts_trainer.llava` (LLaVA's data format, command line and evaluation) and
`sts_trainer.lab` (planner, benchmark, experiment, demo, synthetic world) are imported by name.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "CompressionRecord": "token_compression",
    "LayerSkipper": "layer_skip",
    "STSMixin": "mixin",
    "STSTrainer": "trainer",
    "STSTrainingArguments": "arguments",
    "SkipRecord": "layer_skip",
    "SparsityPlan": "stage",
    "TokenCompressor": "token_compression",
    "compress_batch": "token_compression",
    "plan_sparsity": "stage",
    "skip_probability": "layer_skip",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sts_trainer' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_EXPORTS])
