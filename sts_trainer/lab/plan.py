"""`sts-plan`: the training FLOPs STS saves on a model, per stage and over a whole two-stage run, before training.

    python -m sts_trainer.lab.plan --model_config configs/models/llava-1.5-7b.json
    python -m sts_trainer.lab.plan --model_config configs/models/llava-1.5-13b.json --json
    python -m sts_trainer.lab.plan --model_config configs/models/llava-1.5-7b.json --sts_config configs/sts_plus.yaml

The model is read from its config alone (a directory holding config.json, or a config JSON file) and instantiated on
the meta device to count parameters and check that sts_trainer knows its module paths: no weights are loaded. The
run is LLaVA-1.5's recipe:
- alignment: only the projector trains; by default VTC keeps `vtc_keep_ratio` of each image's tokens;
- instruction tuning: the projector and the LLM train; by default LDS skips decoder layers with the expected rate
  over the stage.
The vision tower is frozen in both. `--sts_config` prices another recipe (a preset's name or a YAML file with
'alignment' and 'instruction' sections, as the trainer's `sts_preset`): keep-ratio schedules, full-token steps and
self-distillation's extra forward included. A last comparison prices DualSpeed's published setting the same way.
FLOPs are counted as in `sts_trainer.flops` (matmuls, forward + backward), as expectations over the stage's steps.
"""

import json
import math
import sys
import tempfile
from collections import defaultdict
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, HfArgumentParser, PretrainedConfig

from ..architectures import find_parts
from ..arguments import LDS_PROGRESS, LDS_SCHEDULES, PRESET_OPTION_NAMES, STSTrainingArguments
from ..flops import PARTS, TrainingStep, step_flops, visual_tokens_per_image
from ..layer_skip import lr_mass_progress, schedule_learning_rates, skip_probability
from ..token_compression import keep_ratio_at, num_kept

# DualSpeed (arXiv 2602.03815) as published for LLaVA-1.5: alignment dense; in instruction tuning 90% of the visual
# tokens pruned after the projector by diversity (DivPrune), one step in ten with every token and self-distillation.
DUALSPEED = {
    "alignment": {"sts_vtc": "off", "sts_lds": "off"},
    "instruction": {"sts_vtc": "on", "sts_lds": "off", "vtc_strategy": "diverse", "vtc_keep_ratio": 0.1,
                    "vtc_keep_schedule": "constant", "vtc_full_token_fraction": 0.1, "vtc_distill_weight": 1.0},
}


@dataclass
class PlanArguments:
    """What the planner needs to know about the model, the data and the STS options."""

    model_config: str = field(
        metadata={"help": "The model: a local directory holding config.json, or a config JSON file "
                  "(e.g. configs/models/llava-1.5-7b.json). Only the config is read."}
    )
    visual_tokens_per_image: int | None = field(
        default=None,
        metadata={"help": "Visual tokens one image gives the language model without compression. Default: from "
                  "the config, (image_size / patch_size)^2 (576 for LLaVA-1.5: 336 px, patch 14)."},
    )
    alignment_text_tokens_per_sample: int = field(
        default=32,
        metadata={"help": "Text tokens per alignment sample, padding included. LLaVA-1.5 aligns on BLIP captions "
                  "of about a dozen words (~20 Llama tokens) plus BOS, newline, EOS and padding to the longest "
                  "caption of the batch: 32."},
    )
    instruction_text_tokens_per_sample: int = field(
        default=256,
        metadata={"help": "Text tokens per instruction-tuning sample, padding included. LLaVA-1.5's 665K mix is "
                  "multi-turn VQA and conversations with the Vicuna system prompt: a few hundred tokens; 256."},
    )
    images_per_sample: int = field(
        default=1,
        metadata={"help": "Images per sample, in both stages. LLaVA-1.5: 1 (the 40K text-only ShareGPT samples of "
                  "the 665K mix are ignored, which overstates instruction-tuning visual compute by about 6 percent)."},
    )
    alignment_samples: int = field(
        default=558_128, metadata={"help": "Samples of the alignment stage (LLaVA-1.5: LCS-558K, one epoch)."}
    )
    instruction_samples: int = field(
        default=665_298,
        metadata={"help": "Samples of the instruction-tuning stage (LLaVA-1.5: llava_v1_5_mix665k, one epoch)."},
    )
    alignment_batch_size: int = field(
        default=256,
        metadata={"help": "Global batch size of alignment (LLaVA-1.5: 256): the stage's number of optimizer steps, "
                  "over which a keep-ratio schedule moves."},
    )
    batch_size: int = field(
        default=128,
        metadata={"help": "Global batch size of instruction tuning (LLaVA-1.5: 128). It sets the stage's number of "
                  "optimizer steps, over which the LDS schedule decays; FLOPs per sample do not depend on it."},
    )
    vtc_keep_ratio: float = field(
        default=0.5, metadata={"help": "VTC: fraction of each image's visual tokens kept in alignment, in (0, 1]."}
    )
    lds_alpha: float = field(default=0.5, metadata={"help": "LDS base skip rate in instruction tuning, in [0, 1]."})
    lds_epsilon: float = field(default=0.5, metadata={"help": "LDS depth slope, in [0, 1]."})
    lds_schedule: str = field(
        default="quadratic",
        metadata={"help": "How the LDS skip rate decays over the stage.", "choices": list(LDS_SCHEDULES)},
    )
    lds_progress: str = field(
        default="steps",
        metadata={"help": "What the LDS schedule decays over: 'steps' or 'lr_mass' (the trainer's lds_progress), "
                  "priced with the learning-rate schedule below.", "choices": list(LDS_PROGRESS)},
    )
    lr_scheduler_type: str = field(
        default="cosine",
        metadata={"help": "The learning-rate schedule (LLaVA-1.5: cosine in both stages), for "
                  "lds_progress='lr_mass'."},
    )
    warmup_ratio: float = field(
        default=0.03, metadata={"help": "Its warm-up, as a fraction of the stage's steps (LLaVA-1.5: 0.03)."}
    )
    sts_config: str | None = field(
        default=None,
        metadata={"help": "A recipe to price: a preset's name (sts_plus) or a YAML file with 'alignment' and "
                  "'instruction' sections of STS options (configs/sts_plus.yaml), as the trainer's sts_preset. Its "
                  "options win over the flags above still at their defaults."},
    )
    json: bool = field(default=False, metadata={"help": "Print the plan as JSON instead of a table."})

    def __post_init__(self):
        if not 0.0 < self.vtc_keep_ratio <= 1.0:
            raise ValueError(f"vtc_keep_ratio={self.vtc_keep_ratio} is out of range; it must be in (0, 1].")
        for name in ("lds_alpha", "lds_epsilon"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)} is out of range; it must be in [0, 1].")
        if self.lds_schedule not in LDS_SCHEDULES:
            raise ValueError(f"lds_schedule={self.lds_schedule!r} is not valid; choose one of {LDS_SCHEDULES}.")
        if self.lds_progress not in LDS_PROGRESS:
            raise ValueError(f"lds_progress={self.lds_progress!r} is not valid; choose one of {LDS_PROGRESS}.")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio={self.warmup_ratio} is out of range; it must be in [0, 1).")
        if min(self.alignment_samples, self.instruction_samples, self.batch_size, self.alignment_batch_size) < 1:
            raise ValueError(
                "alignment_samples, instruction_samples, alignment_batch_size and batch_size must be positive."
            )


# The planner's flags that are STS options of the trainer too (a recipe's section wins over those at their defaults).
STS_FLAGS = ("vtc_keep_ratio", "lds_alpha", "lds_epsilon", "lds_schedule", "lds_progress")


def load_config(path: str) -> PretrainedConfig:
    """The config in a local directory (its config.json) or JSON file; never touches the Hub."""
    if not Path(path).exists():
        raise FileNotFoundError(f"No model config at {path!r}: give a directory with config.json or a JSON file.")
    return AutoConfig.from_pretrained(path)


def count_parameters(config: PretrainedConfig) -> dict[str, int]:
    """Parameters of the model built from `config` on the meta device (no memory, no weights), per part.

    Building it also checks that sts_trainer knows where the model's projector and decoder layers live.
    """
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    parts = find_parts(model)
    language_model = sum(p.numel() for p in parts.language_model_parameters())
    projector = sum(p.numel() for p in parts.projector.parameters())
    total = sum(p.numel() for p in model.parameters())
    return {"vision": total - language_model - projector, "projector": projector, "language_model": language_model,
            "total": total}


def _scale(flops: dict[str, float], samples: int) -> dict[str, float]:
    return {part: value * samples for part, value in flops.items()}


def stage_options(args: PlanArguments, recipe: str | dict | None, stage: str) -> dict:
    """The STS options of one stage: the planner's flags, then `recipe`'s section for the stage (a preset's name, a
    YAML file, as `sts_preset`, or the same as a dict) over those still at their defaults; as the trainer resolves
    them. Adds 'vtc' and 'lds': whether each component runs in the stage."""
    with tempfile.TemporaryDirectory() as folder:
        if isinstance(recipe, dict):
            path = Path(folder) / "recipe.yaml"
            path.write_text(json.dumps(recipe))  # JSON is YAML
            recipe = str(path)
        # the planner's flags that differ from the trainer's defaults count as given (its parser fills in the rest)
        defaults = {f.name: f.default for f in fields(STSTrainingArguments)}
        flags = {name: getattr(args, name) for name in STS_FLAGS if getattr(args, name) != defaults[name]}
        staged = STSTrainingArguments(output_dir=folder, report_to="none", sts_preset=recipe, **flags).for_stage(stage)
    options = {name: getattr(staged, name) for name in PRESET_OPTION_NAMES}
    options["vtc"] = staged.sts_vtc == "on" or (staged.sts_vtc == "auto" and stage == "alignment")
    options["lds"] = staged.sts_lds == "on" or (staged.sts_lds == "auto" and stage == "instruction")
    return options


def price_stage(config, shape: TrainingStep, samples: int, steps: int, options: dict,
                lr_schedule: tuple[str, float]) -> dict:
    """Dense and expected STS FLOPs of a stage of `samples` samples in `steps` optimizer steps of `shape` (per
    sample), with `options` (`stage_options`).

    Per step e: VTC keeps num_kept(n, keep_ratio_at(e)) tokens per image (plus `vtc_mode_isolator` soft tokens),
    except on full-token steps (an expected fraction `vtc_full_token_fraction` of the steps), which keep all and,
    with self-distillation, add a forward (no backward) of the pruned sequence; LDS runs sum_l (1 - p_l(e)) decoder
    layers. FLOPs are linear in the number of executed layers, so pricing each kept count at the mean of its steps'
    executed layers is exact. With lds_progress='lr_mass', the decay follows `lr_schedule` (the scheduler's name, its
    warm-up fraction)."""
    num_layers = config.get_text_config().num_hidden_layers
    visual = shape.visual_tokens_per_image
    full = options["vtc_full_token_fraction"] if options["vtc"] else 0.0
    by_kept: dict[int, list[float]] = defaultdict(list)  # kept tokens per image -> executed layers of its steps
    progress = [None] * steps
    if options["lds"] and options["lds_progress"] == "lr_mass":
        name, warmup = lr_schedule
        progress = lr_mass_progress(schedule_learning_rates(name, steps, math.ceil(warmup * steps)))
    for e in range(steps):
        ratio = keep_ratio_at(e, steps, options["vtc_keep_ratio"], options["vtc_keep_ratio_end"],
                              options["vtc_keep_schedule"], options["vtc_keep_schedule_fraction"])
        kept = num_kept(visual, ratio) if options["vtc"] else visual
        if kept < visual:  # the mode isolator's soft tokens open each compressed image's kept tokens
            kept += options["vtc_mode_isolator"]
        layers = num_layers
        if options["lds"]:
            layers -= sum(
                skip_probability(e, steps, layer, num_layers, options["lds_alpha"], options["lds_epsilon"],
                                 options["lds_schedule"], progress[e])
                for layer in range(num_layers)
            )
        by_kept[kept].append(layers)
    forward_only = replace(shape, train_vision=False, train_projector=False, train_llm=False)
    sts = dict.fromkeys((*PARTS, "total"), 0.0)
    for kept, layers in by_kept.items():
        mean_layers = sum(layers) / len(layers)
        pruned = step_flops(config, shape, kept_visual_tokens_per_image=kept, executed_layers=mean_layers)
        dense_tokens = step_flops(config, shape, executed_layers=mean_layers)
        teacher = step_flops(config, forward_only, kept_visual_tokens_per_image=kept, executed_layers=mean_layers)
        # the trainer distils only where the step's keep ratio drops tokens
        distill = 1.0 if options["vtc"] and options["vtc_distill_weight"] > 0 and kept < visual else 0.0
        for part in sts:
            per_step = (1 - full) * pruned[part] + full * (dense_tokens[part] + distill * teacher[part])
            sts[part] += per_step * len(layers) / steps
    dense = step_flops(config, shape)
    all_layers = [layer for layers in by_kept.values() for layer in layers]
    mean_kept = sum(kept * len(layers) for kept, layers in by_kept.items()) / steps
    return {
        "samples": samples,
        "optimizer_steps": steps,
        "vtc": options["vtc"],
        "lds": options["lds"],
        "kept_visual_tokens_per_image": mean_kept * (1 - full) + visual * full,
        "full_token_fraction": full,
        "self_distillation": bool(options["vtc"] and full and options["vtc_distill_weight"] > 0),
        "executed_layer_fraction": sum(all_layers) / len(all_layers) / num_layers,
        "dense_flops": _scale(dense, samples),
        "sts_flops": _scale(sts, samples),
        "saving": 1.0 - sts["total"] / dense["total"],
    }


def _run(stages: dict) -> dict:
    dense = {p: sum(s["dense_flops"][p] for s in stages.values()) for p in (*PARTS, "total")}
    sts = {p: sum(s["sts_flops"][p] for s in stages.values()) for p in (*PARTS, "total")}
    return {"dense_flops": dense, "sts_flops": sts, "saving": 1.0 - sts["total"] / dense["total"]}


def price_run(args: PlanArguments, recipe: str | dict | None) -> dict:
    """Both stages and the whole run priced for `recipe` (see `stage_options`; None: the flags alone):
    {'visual_tokens_per_image', 'stages': {'alignment', 'instruction'}, 'run'}. Parameters are not counted."""
    config = load_config(args.model_config)
    if getattr(config, "vision_config", None) is None:
        raise ValueError(f"{args.model_config} is a text-only model ({config.model_type}); the planner plans the "
                         "two stages of a vision-language model.")
    visual = visual_tokens_per_image(config) if args.visual_tokens_per_image is None else args.visual_tokens_per_image
    # FLOPs per sample, from a step of one sample: step FLOPs are linear in the batch size (padding is in the text
    # token counts), so a stage costs samples x this whatever its batch size.
    images = args.images_per_sample
    shapes = {
        "alignment": TrainingStep(1, args.alignment_text_tokens_per_sample, images, visual, train_projector=True),
        "instruction": TrainingStep(
            1, args.instruction_text_tokens_per_sample, images, visual, train_projector=True, train_llm=True
        ),
    }
    samples = {"alignment": args.alignment_samples, "instruction": args.instruction_samples}
    steps = {
        "alignment": math.ceil(args.alignment_samples / args.alignment_batch_size),
        "instruction": math.ceil(args.instruction_samples / args.batch_size),
    }
    stages = {
        stage: price_stage(config, shapes[stage], samples[stage], steps[stage], stage_options(args, recipe, stage),
                           (args.lr_scheduler_type, args.warmup_ratio))
        for stage in shapes
    }
    return {"config": config, "visual_tokens_per_image": visual, "stages": stages, "run": _run(stages)}


def plan(args: PlanArguments) -> dict:
    """Dense and STS FLOPs of both stages and of the whole run, per part, for the recipe `args.sts_config` (or the
    flags), and the whole run under DualSpeed's published setting; see the module docstring."""
    priced = price_run(args, args.sts_config)
    config = priced["config"]
    # its published setting whatever the STS flags say (the shape of the run is the same)
    defaults = {name: PlanArguments.__dataclass_fields__[name].default for name in STS_FLAGS}
    dualspeed = price_run(replace(args, **defaults), DUALSPEED)
    return {
        "model_config": args.model_config,
        "model_type": config.model_type,
        "sts_config": args.sts_config,
        "parameters": count_parameters(config),
        "decoder_layers": config.get_text_config().num_hidden_layers,
        "visual_tokens_per_image": priced["visual_tokens_per_image"],
        "options": {k: v for k, v in asdict(args).items() if k not in ("model_config", "json")},
        "stages": priced["stages"],
        "run": priced["run"],
        "dualspeed": {"stages": dualspeed["stages"], "run": dualspeed["run"]},
    }


def _count(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def _describe(stage: dict, visual: int) -> str:
    """What STS does in one priced stage, in words."""
    parts = []
    if stage["vtc"]:
        vtc = f"VTC keeps {round(stage['kept_visual_tokens_per_image'], 1):g} of {visual} visual tokens per image (mean"
        if stage["full_token_fraction"]:
            vtc += f", full-token steps {stage['full_token_fraction']:.0%}"
            vtc += " with self-distillation" if stage["self_distillation"] else ""
        parts.append(vtc + ")")
    if stage["lds"]:
        parts.append(f"LDS runs {stage['executed_layer_fraction']:.1%} of decoder layers")
    return "; ".join(parts) or "dense"


def format_table(report: dict) -> str:
    """The plan as plain-text tables (per part, then totals with DualSpeed's run and the whole run last), FLOPs in
    one SI unit chosen by the largest number."""
    exponent = min(21, 3 * int(math.log10(report["run"]["dense_flops"]["total"]) // 3))
    unit = {0: "", 3: "K", 6: "M", 9: "G", 12: "T", 15: "P", 18: "E", 21: "Z"}[max(exponent, 0)] + "FLOP"
    scale = 10.0 ** max(exponent, 0)
    params, stages, visual = report["parameters"], report["stages"], report["visual_tokens_per_image"]
    align, instr = stages["alignment"], stages["instruction"]
    total_samples = align["samples"] + instr["samples"]
    rows = {  # label -> (samples, dense, sts)
        "alignment": (align["samples"], align["dense_flops"], align["sts_flops"]),
        "instruction": (instr["samples"], instr["dense_flops"], instr["sts_flops"]),
        "whole run": (total_samples, report["run"]["dense_flops"], report["run"]["sts_flops"]),
    }
    dualspeed = report["dualspeed"]
    recipe = f"recipe {report['sts_config']}" if report["sts_config"] else "STS defaults"
    lines = [
        f"STS plan for {report['model_config']} ({report['model_type']}, {report['decoder_layers']} decoder layers), "
        f"{recipe}",
        f"parameters: {_count(params['total'])} = vision {_count(params['vision'])} + projector "
        f"{_count(params['projector'])} + language model {_count(params['language_model'])}",
        f"alignment:   projector trains; {_describe(align, visual)} ({align['optimizer_steps']} optimizer steps)",
        f"instruction: projector + LLM train; {_describe(instr, visual)} ({instr['optimizer_steps']} optimizer steps)",
        f"DualSpeed:   its published setting priced the same way: alignment dense; instruction "
        f"{_describe(dualspeed['stages']['instruction'], visual)}",
        "",
        f"{'per part (' + unit + ')':<18}" + "".join(f"{part:>12}" for part in PARTS),
    ]
    for label, (_, dense, sts) in rows.items():
        for kind, flops in (("dense", dense), ("STS", sts)):
            lines.append(f"{label + ' ' + kind:<18}" + "".join(f"{flops[part] / scale:>12.2f}" for part in PARTS))
    lines += ["", f"{'stage':<12} {'samples':>10} {'dense ' + unit:>13} {'STS ' + unit:>13} {'saving':>7}"]
    table = {**dict(list(rows.items())[:2]),
             "DualSpeed": (total_samples, dualspeed["run"]["dense_flops"], dualspeed["run"]["sts_flops"]),
             "whole run": rows["whole run"]}
    for label, (samples, dense, sts) in table.items():
        lines.append(f"{label:<12} {samples:>10,} {dense['total'] / scale:>13.2f} {sts['total'] / scale:>13.2f} "
                     f"{1 - sts['total'] / dense['total']:>7.1%}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    (args,) = HfArgumentParser(PlanArguments).parse_args_into_dataclasses(args=argv)
    report = plan(args)
    sys.stdout.write(json.dumps(report, indent=2) + "\n" if args.json else format_table(report))


if __name__ == "__main__":
    main()
