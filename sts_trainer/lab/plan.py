"""`sts-plan`: the training FLOPs STS saves on a model, per stage and over a whole two-stage run, before training.

    python -m sts_trainer.lab.plan --model_config configs/models/llava-1.5-7b.json
    python -m sts_trainer.lab.plan --model_config configs/models/llava-1.5-13b.json --json

The model is read from its config alone (a directory holding config.json, or a config JSON file) and instantiated on
the meta device to count parameters and check that sts_trainer knows its module paths: no weights are loaded. The
run is LLaVA-1.5's recipe:
- alignment: only the projector trains, VTC keeps `vtc_keep_ratio` of each image's tokens;
- instruction tuning: the projector and the LLM train, LDS skips decoder layers with the expected rate over the stage.
The vision tower is frozen in both. FLOPs are counted as in `sts_trainer.flops` (matmuls, forward + backward).
"""

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, HfArgumentParser, PretrainedConfig

from ..architectures import find_parts
from ..arguments import LDS_SCHEDULES
from ..flops import PARTS, TrainingStep, expected_executed_fraction, step_flops, visual_tokens_per_image
from ..token_compression import num_kept


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
    json: bool = field(default=False, metadata={"help": "Print the plan as JSON instead of a table."})

    def __post_init__(self):
        if not 0.0 < self.vtc_keep_ratio <= 1.0:
            raise ValueError(f"vtc_keep_ratio={self.vtc_keep_ratio} is out of range; it must be in (0, 1].")
        for name in ("lds_alpha", "lds_epsilon"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)} is out of range; it must be in [0, 1].")
        if self.lds_schedule not in LDS_SCHEDULES:
            raise ValueError(f"lds_schedule={self.lds_schedule!r} is not valid; choose one of {LDS_SCHEDULES}.")
        if min(self.alignment_samples, self.instruction_samples, self.batch_size) < 1:
            raise ValueError("alignment_samples, instruction_samples and batch_size must be positive.")


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


def _stage(dense: dict[str, float], sts: dict[str, float], samples: int, **details) -> dict:
    dense, sts = _scale(dense, samples), _scale(sts, samples)
    return {"samples": samples, **details, "dense_flops": dense, "sts_flops": sts,
            "saving": 1.0 - sts["total"] / dense["total"]}


def plan(args: PlanArguments) -> dict:
    """Dense and STS FLOPs of both stages and of the whole run, per part; see the module docstring."""
    config = load_config(args.model_config)
    if getattr(config, "vision_config", None) is None:
        raise ValueError(f"{args.model_config} is a text-only model ({config.model_type}); the planner plans the "
                         "two stages of a vision-language model.")
    num_layers = config.get_text_config().num_hidden_layers
    visual = visual_tokens_per_image(config) if args.visual_tokens_per_image is None else args.visual_tokens_per_image
    # FLOPs per sample, from a step of one sample: step FLOPs are linear in the batch size (padding is in the text
    # token counts), so a stage costs samples x this whatever its batch size.
    images = args.images_per_sample
    alignment = TrainingStep(1, args.alignment_text_tokens_per_sample, images, visual, train_projector=True)
    instruction = TrainingStep(
        1, args.instruction_text_tokens_per_sample, images, visual, train_projector=True, train_llm=True
    )
    kept = num_kept(visual, args.vtc_keep_ratio)
    steps = math.ceil(args.instruction_samples / args.batch_size)
    fraction = expected_executed_fraction(num_layers, steps, args.lds_alpha, args.lds_epsilon, args.lds_schedule)
    stages = {
        "alignment": _stage(
            step_flops(config, alignment),
            step_flops(config, alignment, kept_visual_tokens_per_image=kept),
            args.alignment_samples,
            kept_visual_tokens_per_image=kept,
        ),
        "instruction": _stage(
            step_flops(config, instruction),
            step_flops(config, instruction, executed_layers=fraction * num_layers),
            args.instruction_samples,
            optimizer_steps=steps,
            executed_layer_fraction=fraction,
        ),
    }
    dense = {p: sum(s["dense_flops"][p] for s in stages.values()) for p in (*PARTS, "total")}
    sts = {p: sum(s["sts_flops"][p] for s in stages.values()) for p in (*PARTS, "total")}
    return {
        "model_config": args.model_config,
        "model_type": config.model_type,
        "parameters": count_parameters(config),
        "decoder_layers": num_layers,
        "visual_tokens_per_image": visual,
        "options": {k: v for k, v in asdict(args).items() if k not in ("model_config", "json")},
        "stages": stages,
        "run": {"dense_flops": dense, "sts_flops": sts, "saving": 1.0 - sts["total"] / dense["total"]},
    }


def _count(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def format_table(report: dict) -> str:
    """The plan as plain-text tables (totals, then per part), FLOPs in one SI unit chosen by the largest number."""
    exponent = min(21, 3 * int(math.log10(report["run"]["dense_flops"]["total"]) // 3))
    unit = {0: "", 3: "K", 6: "M", 9: "G", 12: "T", 15: "P", 18: "E", 21: "Z"}[max(exponent, 0)] + "FLOP"
    scale = 10.0 ** max(exponent, 0)
    params, stages = report["parameters"], report["stages"]
    align, instr = stages["alignment"], stages["instruction"]
    rows = {  # label -> (samples, dense, sts)
        "alignment": (align["samples"], align["dense_flops"], align["sts_flops"]),
        "instruction": (instr["samples"], instr["dense_flops"], instr["sts_flops"]),
        "whole run": (align["samples"] + instr["samples"], report["run"]["dense_flops"], report["run"]["sts_flops"]),
    }
    lines = [
        f"STS plan for {report['model_config']} ({report['model_type']}, {report['decoder_layers']} decoder layers)",
        f"parameters: {_count(params['total'])} = vision {_count(params['vision'])} + projector "
        f"{_count(params['projector'])} + language model {_count(params['language_model'])}",
        f"alignment:   projector trains; VTC keeps {align['kept_visual_tokens_per_image']} of "
        f"{report['visual_tokens_per_image']} visual tokens per image",
        f"instruction: projector + LLM train; LDS runs {instr['executed_layer_fraction']:.1%} of decoder layers "
        f"(expected, {instr['optimizer_steps']} optimizer steps)",
        "",
        f"{'stage':<12} {'samples':>10} {'dense ' + unit:>13} {'STS ' + unit:>13} {'saving':>7}",
    ]
    for label, (samples, dense, sts) in rows.items():
        lines.append(f"{label:<12} {samples:>10,} {dense['total'] / scale:>13.2f} {sts['total'] / scale:>13.2f} "
                     f"{1 - sts['total'] / dense['total']:>7.1%}")
    lines += ["", f"{'per part (' + unit + ')':<18}" + "".join(f"{part:>12}" for part in PARTS)]
    for label, (_, dense, sts) in rows.items():
        for kind, flops in (("dense", dense), ("STS", sts)):
            lines.append(f"{label + ' ' + kind:<18}" + "".join(f"{flops[part] / scale:>12.2f}" for part in PARTS))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    (args,) = HfArgumentParser(PlanArguments).parse_args_into_dataclasses(args=argv)
    report = plan(args)
    sys.stdout.write(json.dumps(report, indent=2) + "\n" if args.json else format_table(report))


if __name__ == "__main__":
    main()
