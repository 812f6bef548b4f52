"""`STSTrainingArguments`: every option of the Sparse Training Scheme, on top of `TrainingArguments`."""

import copy
import re
from dataclasses import MISSING, dataclass, field, fields

from transformers import TrainingArguments

STAGES = ("auto", "alignment", "instruction", "none")
SWITCHES = ("auto", "on", "off")
VTC_STRATEGIES = ("uniform", "random", "instruction")
VTC_POSITION_IDS = ("compact", "original")
LDS_SCHEDULES = ("quadratic", "linear", "constant")
_TRAINING_ARGUMENT_NAMES = {f.name for f in fields(TrainingArguments)}
_MODULE_PATH = re.compile(r"[A-Za-z_]\w*(\.\w+)*")  # 'model.layers', 'blocks.0.mlp'


@dataclass
class STSTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the options of the Sparse Training Scheme (STS).

    STS applies the Visual Token Compressor (VTC) during modality alignment, when the language model is frozen, and the
    Layer Dynamic Skipper (LDS) during instruction tuning, when it trains. Evaluation and generation are never sparse.
    """

    sts_stage: str = field(
        default="auto",
        metadata={
            "help": "Training stage, which decides the sparsity used. 'auto': 'alignment' when no parameter of the "
            "language model is trainable, 'instruction' otherwise (LoRA adapters on it count as trainable). "
            "'alignment': visual token compression. 'instruction': layer skipping. 'none': plain Trainer behaviour.",
            "choices": list(STAGES),
        },
    )
    sts_vtc: str = field(
        default="auto",
        metadata={
            "help": "Visual Token Compressor switch. 'auto': on in the alignment stage only; 'on' or 'off' force it "
            "in any stage (it may run together with LDS).",
            "choices": list(SWITCHES),
        },
    )
    sts_lds: str = field(
        default="auto",
        metadata={
            "help": "Layer Dynamic Skipper switch. 'auto': on in the instruction stage only; 'on' or 'off' force it "
            "in any stage (it may run together with VTC).",
            "choices": list(SWITCHES),
        },
    )
    vtc_keep_ratio: float = field(
        default=0.5,
        metadata={
            "help": "Fraction of each image's visual tokens that the language model receives while VTC is on, in "
            "(0, 1]. An image of n tokens keeps max(1, round(ratio * n)); the others are removed from the sequence."
        },
    )
    vtc_strategy: str = field(
        default="uniform",
        metadata={
            "help": "Which visual tokens VTC keeps. 'uniform': evenly spaced over the image's token grid "
            "(deterministic; best for OCR and counting). 'random': a new random subset every step. 'instruction': "
            "the tokens most similar (cosine) to the mean embedding of the sample's instruction text.",
            "choices": list(VTC_STRATEGIES),
        },
    )
    vtc_position_ids: str = field(
        default="compact",
        metadata={
            "help": "Position ids of the shortened sequence. 'compact': numbered as if the dropped tokens were never "
            "there. 'original': every kept token keeps its position in the full sequence.",
            "choices": list(VTC_POSITION_IDS),
        },
    )
    lds_alpha: float = field(
        default=0.5,
        metadata={
            "help": "LDS base skip rate, in [0, 1]: the mean skip probability over layers at the first step. "
            "Averaged over a stage with the quadratic schedule, alpha / 3 of the decoder-layer compute is skipped."
        },
    )
    lds_epsilon: float = field(
        default=0.5,
        metadata={
            "help": "LDS depth slope, in [0, 1]: the skip probability grows linearly with depth from "
            "(1 - epsilon) to (1 + epsilon) times the mean, so shallow layers are protected."
        },
    )
    lds_schedule: str = field(
        default="quadratic",
        metadata={
            "help": "How the LDS skip rate decays over the stage's optimizer steps e of E: 'quadratic' "
            "((E - e) / E)^2 (the paper's), 'linear' (E - e) / E, 'constant' 1.",
            "choices": list(LDS_SCHEDULES),
        },
    )

    sts_decoder_layers: str | None = field(
        default=None,
        metadata={
            "help": "Module path, from the model, of its list of decoder layers (an nn.ModuleList), e.g. "
            "'model.layers'. Needed for a model whose model_type sts_trainer does not know (LDS skips entries of this "
            "list; the module holding it decides the stage); overrides the known path otherwise."
        },
    )
    sts_projector: str | None = field(
        default=None,
        metadata={
            "help": "Module path, from the model, of the projector that maps vision features into the language "
            "model, e.g. 'mm_projector'. Needed for VTC on a model whose model_type sts_trainer does not know "
            "(together with sts_decoder_layers and sts_image_token_id); overrides the known path otherwise."
        },
    )
    sts_image_token_id: int | None = field(
        default=None,
        metadata={
            "help": "Token id of the image placeholder in input_ids (one placeholder per visual token). Needed for "
            "VTC on a model whose model_type sts_trainer does not know; overrides the config's value otherwise."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.validate_sts()

    def validate_sts(self) -> None:
        """Raise a `ValueError` naming the first STS option whose value is out of range or unknown."""
        for name, allowed in (
            ("sts_stage", STAGES),
            ("sts_vtc", SWITCHES),
            ("sts_lds", SWITCHES),
            ("vtc_strategy", VTC_STRATEGIES),
            ("vtc_position_ids", VTC_POSITION_IDS),
            ("lds_schedule", LDS_SCHEDULES),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(allowed)}.")
        if not 0.0 < self.vtc_keep_ratio <= 1.0:
            raise ValueError(f"vtc_keep_ratio={self.vtc_keep_ratio} is out of range; it must be in (0, 1].")
        for name in ("lds_alpha", "lds_epsilon"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value} is out of range; it must be in [0, 1].")
        for name in ("sts_decoder_layers", "sts_projector"):
            value = getattr(self, name)
            if value is not None and not _MODULE_PATH.fullmatch(value):
                raise ValueError(
                    f"{name}={value!r} is not a module path; give attribute names joined by dots, as in "
                    "model.named_modules() (e.g. 'model.language_model.layers')."
                )
        token = self.sts_image_token_id
        if token is not None and (isinstance(token, bool) or not isinstance(token, int) or token < 0):
            raise ValueError(f"sts_image_token_id={token!r} is not valid; it must be a non-negative integer token id.")

    def sts_options(self) -> dict:
        """The STS options (the fields this class adds to `TrainingArguments`) and their values."""
        return {name: getattr(self, name) for name in STS_OPTION_NAMES}

    @classmethod
    def from_training_arguments(cls, args: TrainingArguments) -> "STSTrainingArguments":
        """A copy of `args` (a `TrainingArguments`, of any subclass) as a `cls`, with every field of `cls` that `args`
        lacks (the STS options) at its default; the values `args` has, its own extra fields included, are kept.

        The copy keeps the already-processed values of `args` (its `__post_init__` is not run a second time, which
        would e.g. re-read a DeepSpeed config).
        """
        upgraded = copy.copy(args)
        upgraded.__class__ = cls
        for f in fields(cls):
            if f.name not in args.__dict__:
                setattr(upgraded, f.name, f.default_factory() if f.default is MISSING else f.default)
        upgraded.validate_sts()
        return upgraded


# The fields STSTrainingArguments adds to TrainingArguments, in their order.
STS_OPTION_NAMES = tuple(f.name for f in fields(STSTrainingArguments) if f.name not in _TRAINING_ARGUMENT_NAMES)
