"""`STSTrainingArguments`: every option of the Sparse Training Scheme, on top of `TrainingArguments`."""

import copy
import re
from dataclasses import MISSING, dataclass, field, fields

from transformers import TrainingArguments

from .presets import load_preset

STAGES = ("auto", "alignment", "instruction", "none")
SWITCHES = ("auto", "on", "off")
VTC_STRATEGIES = ("uniform", "random", "instruction", "diverse", "pool")
VTC_KEEP_SCHEDULES = ("constant", "linear", "cosine", "step")
VTC_POSITION_IDS = ("compact", "original")
LDS_SCHEDULES = ("quadratic", "linear", "constant")
LDS_PROGRESS = ("steps", "lr_mass")
LDS_LAYER_ORDERS = ("depth", "redundancy")
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
            "help": "Training stage, which decides the sparsity used. 'auto': 'instruction' when a parameter of the "
            "language model's decoder layers is trainable (LoRA adapters in them count), 'alignment' otherwise (also "
            "when only its embeddings or LM head train, with a warning saying so). "
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
            "the tokens most similar (cosine) to the mean embedding of the sample's instruction text. 'diverse': "
            "greedy max-min (farthest-point) selection on the projector's output features, by cosine distance, as "
            "DivPrune does: each kept token is the one farthest from those already kept. 'pool': merges instead of "
            "dropping: the tokens 'uniform' keeps, each carrying the mean of the grid neighbours nearest to it "
            "(16 x 16 tokens at keep 0.5: blocks of one row by 2 columns; 24 x 24 at keep 0.25: 2 x 2; uneven "
            "strides give blocks differing by a row or a column), so every patch still reaches the language model, "
            "at the sequence length and language-model FLOPs of 'uniform'.",
            "choices": list(VTC_STRATEGIES),
        },
    )
    vtc_keep_schedule: str = field(
        default="constant",
        metadata={
            "help": "How the keep ratio moves over the stage's optimizer steps. 'constant': vtc_keep_ratio throughout. "
            "'linear', 'cosine': from vtc_keep_ratio to vtc_keep_ratio_end over the first vtc_keep_schedule_fraction "
            "of the stage, then vtc_keep_ratio_end. 'step': vtc_keep_ratio until that point, then vtc_keep_ratio_end. "
            "A schedule that ends at 1.0 drops no visual token from that point on.",
            "choices": list(VTC_KEEP_SCHEDULES),
        },
    )
    vtc_keep_ratio_end: float = field(
        default=1.0,
        metadata={"help": "Keep ratio a non-constant vtc_keep_schedule ends at, in (0, 1]."},
    )
    vtc_keep_schedule_fraction: float = field(
        default=1.0,
        metadata={
            "help": "Fraction of the stage's optimizer steps, in (0, 1], over which a non-constant vtc_keep_schedule "
            "moves from vtc_keep_ratio to vtc_keep_ratio_end (it reaches the end ratio at the last of those steps)."
        },
    )
    vtc_full_token_fraction: float = field(
        default=0.0,
        metadata={
            "help": "Fraction of optimizer steps, in [0, 1), that run with every visual token while VTC is on (every "
            "micro-batch of a chosen step). Steps are drawn from a generator seeded from (seed, step): the same on "
            "every rank and after resuming. The model then also trains on the full token set it sees at inference."
        },
    )
    vtc_distill_weight: float = field(
        default=0.0,
        metadata={
            "help": "Self-distillation on full-token steps, >= 0 (0: off). The loss gains weight * KL(pruned || "
            "full) on the answer tokens: the teacher is a no-grad forward of the same batch with the step's "
            "compression, the student the full-token forward. The teacher's forward is counted in the FLOPs. "
            "Without full-token steps (vtc_full_token_fraction 0) it has no effect, and the trainer warns."
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
    vtc_mode_isolator: int = field(
        default=0,
        metadata={
            "help": "Beyond the paper (DualSpeed's mode isolator): how many learned soft tokens, >= 0 (0: off; "
            "DualSpeed uses 4), open each image's kept tokens in every compressed training forward, so the language "
            "model can tell a compressed sequence from the full ones it sees at inference. Evaluation, generation "
            "and full-token steps never see them. They train with the projector (at --projector_lr under the LLaVA "
            "command line) and are saved beside the model's weights, in sts_mode_isolator.safetensors, never in "
            "them: plain transformers loads the checkpoint without them. A later run with the option (resuming, "
            "or the next stage) starts from that file in the checkpoint or the model's folder. Needs "
            "vtc_position_ids='compact' (so not M-RoPE models such as Qwen2-VL)."
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
    lds_progress: str = field(
        default="steps",
        metadata={
            "help": "What the LDS schedule decays over: 'steps' (t = e / E, the paper's) or 'lr_mass' (t = the share "
            "of the learning-rate schedule's summed rates spent before step e). With a decaying learning rate, "
            "'lr_mass' moves the skipping away from the steps with the largest updates, and skips less in all "
            "(alpha 0.5, cosine: about 10 percent of layer runs instead of 17). It needs a LambdaLR schedule (every "
            "lr_scheduler_type except reduce_lr_on_plateau).",
            "choices": list(LDS_PROGRESS),
        },
    )
    lds_layer_order: str = field(
        default="depth",
        metadata={
            "help": "Which layers LDS skips more: 'depth' (the paper's: the skip probability grows linearly with "
            "depth, from 1 - epsilon to 1 + epsilon times the mean) or 'redundancy' (the same factors given in the "
            "order of each layer's measured change of the residual stream, the mean cosine similarity between the "
            "hidden states entering and leaving it over its executed training forwards: the layer that changes "
            "them least is skipped most). The mean skip rate, hence the saving, is the same. Re-ranked every "
            "lds_rerank_every optimizer steps from every rank's measurements (so all ranks skip alike, and a resumed "
            "run ranks as an uninterrupted one); depth order until the first ranking.",
            "choices": list(LDS_LAYER_ORDERS),
        },
    )
    lds_rerank_every: int = field(
        default=25,
        metadata={"help": "With lds_layer_order='redundancy': optimizer steps between two rankings of the layers."},
    )

    sts_preset: str | None = field(
        default=None,
        metadata={
            "help": "A recipe of STS options per stage: a preset's name ('sts_plus': see sts_trainer.presets and "
            "configs/sts_plus.yaml) or the path of a YAML file with 'alignment' and 'instruction' sections. Once the "
            "stage is known, the section for it sets every STS option not given explicitly; options given "
            "explicitly win, also when their value is the default."
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
    sts_blank_image: str = field(
        default="auto",
        metadata={
            "help": "Under ZeRO-3 or FSDP, a rank whose batch has no image would skip the vision tower while the "
            "others gather its parameters, and training would hang. 'auto': under ZeRO-3 or FSDP with more than one "
            "process, such a batch runs the vision tower and projector on one blank image, and 0 times their output "
            "is added to the language model's input (loss and gradients exactly unchanged; one small vision forward "
            "per batch without images); nothing changes otherwise. 'on': always. 'off': never; under ZeRO-3 or FSDP "
            "every forward then checks that the ranks agree on having images and raises an error if not.",
            "choices": list(SWITCHES),
        },
    )

    def __new__(cls, *args, **kwargs):
        # The options given to the constructor, by name or position: `sts_preset` sets only the others. (The
        # dataclass __init__ assigns every field, so __post_init__ cannot tell a given value from a default.)
        self = super().__new__(cls)
        names = [f.name for f in fields(cls) if f.init]
        self.__dict__["_sts_given"] = frozenset(names[: len(args)]) | frozenset(kwargs)
        return self

    def __post_init__(self):
        super().__post_init__()
        self.validate_sts()

    def given_explicitly(self, name: str) -> bool:
        """Whether option `name` was given (to the constructor, or set later to a value other than its default)."""
        default = next(f.default for f in fields(STSTrainingArguments) if f.name == name)
        return name in self.__dict__.get("_sts_given", ()) or getattr(self, name) != default

    def validate_sts(self) -> None:
        """Raise a `ValueError` naming the first STS option whose value is out of range or unknown."""
        for name, allowed in (
            ("sts_stage", STAGES),
            ("sts_vtc", SWITCHES),
            ("sts_lds", SWITCHES),
            ("vtc_strategy", VTC_STRATEGIES),
            ("vtc_position_ids", VTC_POSITION_IDS),
            ("vtc_keep_schedule", VTC_KEEP_SCHEDULES),
            ("lds_schedule", LDS_SCHEDULES),
            ("lds_progress", LDS_PROGRESS),
            ("lds_layer_order", LDS_LAYER_ORDERS),
            ("sts_blank_image", SWITCHES),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(allowed)}.")
        if self.lds_progress == "lr_mass" and str(getattr(self.lr_scheduler_type, "value", self.lr_scheduler_type)) \
                == "reduce_lr_on_plateau":
            raise ValueError(
                "lds_progress='lr_mass' needs a learning-rate schedule known in advance; "
                "lr_scheduler_type='reduce_lr_on_plateau' depends on the evaluation. Use lds_progress='steps'."
            )
        for name in ("vtc_keep_ratio", "vtc_keep_ratio_end", "vtc_keep_schedule_fraction"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name}={value} is out of range; it must be in (0, 1].")
        if not 0.0 <= self.vtc_full_token_fraction < 1.0:
            raise ValueError(
                f"vtc_full_token_fraction={self.vtc_full_token_fraction} is out of range; it must be in [0, 1) "
                "(1 would never compress: turn VTC off with sts_vtc='off' instead)."
            )
        if self.vtc_distill_weight < 0.0:
            raise ValueError(f"vtc_distill_weight={self.vtc_distill_weight} is out of range; it must be >= 0.")
        isolator = self.vtc_mode_isolator
        if isinstance(isolator, bool) or not isinstance(isolator, int) or isolator < 0:
            raise ValueError(f"vtc_mode_isolator={isolator!r} is not valid; it must be an integer >= 0 (0: off).")
        if isolator and self.vtc_position_ids != "compact":
            raise ValueError(
                f"vtc_mode_isolator={isolator} needs vtc_position_ids='compact' (got {self.vtc_position_ids!r}): its "
                "soft tokens take dropped tokens' places, which 'original' positions would give them too."
            )
        if self.lds_rerank_every < 1:
            raise ValueError(f"lds_rerank_every={self.lds_rerank_every} is out of range; it must be >= 1.")
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
        if self.sts_preset is not None:
            for stage, options in load_preset(self.sts_preset).items():
                unknown = sorted(set(options) - set(PRESET_OPTION_NAMES))
                if unknown:
                    raise ValueError(
                        f"sts_preset={self.sts_preset!r}: its '{stage}' section sets {', '.join(unknown)}, which a "
                        f"recipe cannot set; it may set {', '.join(PRESET_OPTION_NAMES)}."
                    )
        token = self.sts_image_token_id
        if token is not None and (isinstance(token, bool) or not isinstance(token, int) or token < 0):
            raise ValueError(f"sts_image_token_id={token!r} is not valid; it must be a non-negative integer token id.")

    def for_stage(self, stage: str) -> "STSTrainingArguments":
        """These arguments, or, with `sts_preset`, a copy where the preset's section for `stage` ('alignment' or
        'instruction') sets every STS option not given explicitly (`given_explicitly`)."""
        if self.sts_preset is None or stage not in ("alignment", "instruction"):
            return self
        staged = copy.copy(self)
        for name, value in load_preset(self.sts_preset)[stage].items():
            if not self.given_explicitly(name):
                setattr(staged, name, value)
        staged.validate_sts()
        return staged

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
        upgraded.__dict__.setdefault("_sts_given", frozenset())
        for f in fields(cls):
            if f.name not in args.__dict__:
                setattr(upgraded, f.name, f.default_factory() if f.default is MISSING else f.default)
        upgraded.validate_sts()
        return upgraded


# The fields STSTrainingArguments adds to TrainingArguments, in their order.
STS_OPTION_NAMES = tuple(f.name for f in fields(STSTrainingArguments) if f.name not in _TRAINING_ARGUMENT_NAMES)
# What a recipe (`sts_preset`) may set: the components and their options, not the stage or the model's parts.
PRESET_OPTION_NAMES = tuple(name for name in STS_OPTION_NAMES if name.startswith(("vtc_", "lds_")) or name in (
    "sts_vtc", "sts_lds"))
