"""The embedded demo: LLaVA's two training stages with STS, end to end, on a machine with nothing downloaded.

    sts-demo                               # or: python -m sts_trainer.lab.demo; ~4 min on 2 CPU cores
    sts-demo --dense                       # the same without STS, for comparison
    sts-demo --foundation random           # random-weight models, nothing to build: ~2.5 min

It writes a synthetic image-question world in LLaVA format (PNG scenes of coloured shapes, captions for alignment,
questions on colour, shape, counting, position, existence and short text for instruction tuning) and takes the
pretrained toy models of `sts_trainer.lab.foundation`: a language model that knows the world's language and a
vision encoder whose features describe its images, shipped with the package (`--foundation random` builds
random-weight ones in seconds instead). Then, through the same code path as the
command line (`sts_trainer.llava.train.run`):
  1. alignment: a new LLaVA composed from the two, only the projector trains, with the Visual Token Compressor;
  2. instruction tuning from stage 1's output, projector and language model train, with the Layer Dynamic Skipper;
and ends with a summary: per stage steps, time, FLOPs saved, final loss, and accuracy on held-out questions, next
to the language model's own accuracy when the scene is written out in words (the ceiling alignment works towards).
"""

import json
import os
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, CLIPVisionModel, HfArgumentParser, LlamaForCausalLM

from ..arguments import STSTrainingArguments
from ..llava.data import DataArguments
from ..llava.evaluate import evaluate_model
from ..llava.train import ModelArguments, run
from .foundation import DEFAULT_CACHE, FoundationRecipe, build_foundation
from .synthetic import build_tokenizer_and_processor, tiny_llava_config_for, write_dataset

# Each foundation's recipe: the pretrained pair's is the accuracy experiment's (docs/accuracy.md), the random pair's
# needs far more instruction steps to learn the world from scratch.
RECIPES = {
    "pretrained": dict(train_samples=4000, alignment_steps=100, instruction_steps=150, batch_size=16,
                       alignment_lr=1e-3, instruction_lr=2e-4, image_size=64),
    "random": dict(train_samples=5000, alignment_steps=150, instruction_steps=1500, batch_size=32,
                   alignment_lr=2e-3, instruction_lr=5e-4, image_size=32),
}


@dataclass
class DemoArguments:
    output_dir: str = field(default="sts_demo", metadata={"help": "Where data, models, checkpoints and results go."})
    foundation: str = field(
        default="pretrained",
        metadata={"help": "'pretrained': the toy foundation models of sts_trainer.lab.foundation, a language model "
                          "that knows the world's language and a vision encoder whose features describe its images "
                          "(shipped with the package; built and cached only if the shipped files are missing), so "
                          "that alignment connects them as it connects Vicuna and CLIP. 'random': random-weight models of --hidden_size and "
                          "--num_layers, built in seconds.",
                  "choices": list(RECIPES)},
    )
    foundation_cache: str = field(default=DEFAULT_CACHE, metadata={"help": "Where the pretrained models are cached "
                                                                           "if they must be built."})
    # None: the foundation's recipe (RECIPES)
    train_samples: int | None = field(default=None, metadata={"help": "Synthetic training scenes (each stage)."})
    test_samples: int = field(default=300, metadata={"help": "Held-out questions for the final accuracy."})
    alignment_steps: int | None = field(default=None, metadata={"help": "Optimizer steps of stage 1."})
    instruction_steps: int | None = field(default=None, metadata={"help": "Optimizer steps of stage 2."})
    batch_size: int | None = field(default=None, metadata={"help": "Samples per step."})
    alignment_lr: float | None = field(default=None, metadata={"help": "Learning rate of stage 1 (the projector)."})
    instruction_lr: float | None = field(default=None, metadata={"help": "Learning rate of stage 2."})
    hidden_size: int = field(default=128, metadata={"help": "--foundation random: width of the language model."})
    num_layers: int = field(default=4, metadata={"help": "--foundation random: decoder layers of the language model."})
    image_size: int | None = field(
        default=None,
        metadata={"help": "--foundation random: image side in pixels, 8-pixel patches (the pretrained models read "
                          "64-pixel images in 4-pixel patches)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of data, weights and training."})
    dense: bool = field(default=False, metadata={"help": "Train without STS (sts_stage='none'), for comparison."})

    def __post_init__(self):
        if self.foundation not in RECIPES:
            raise ValueError(f"foundation={self.foundation!r} is not valid; choose one of {list(RECIPES)}.")
        pretrained = FoundationRecipe()
        if self.foundation == "pretrained" and self.image_size not in (None, pretrained.image_size):
            raise ValueError(f"--foundation pretrained reads {pretrained.image_size}-pixel images: leave --image_size "
                             f"out (got {self.image_size}), or use --foundation random.")
        for name, value in RECIPES[self.foundation].items():
            if getattr(self, name) is None:
                setattr(self, name, value)


def build_assets(demo: DemoArguments) -> dict[str, str]:
    """Tokenizer and processor, a tiny causal LM and a tiny CLIP vision tower, each saved where a user's would be."""
    root = os.path.join(demo.output_dir, "assets")
    processor = build_tokenizer_and_processor(os.path.join(root, "processor"), image_size=demo.image_size, patch_size=8)
    config = tiny_llava_config_for(processor, num_layers=demo.num_layers, hidden_size=demo.hidden_size)
    torch.manual_seed(demo.seed)
    paths = {"language_model": os.path.join(root, "language_model"), "vision_tower": os.path.join(root, "vision_tower")}
    LlamaForCausalLM(config.text_config).save_pretrained(paths["language_model"])
    processor.tokenizer.save_pretrained(paths["language_model"])
    CLIPVisionModel(config.vision_config).save_pretrained(paths["vision_tower"])
    processor.image_processor.save_pretrained(paths["vision_tower"])
    return paths


def _training_args(demo: DemoArguments, stage: str, steps: int, learning_rate: float) -> STSTrainingArguments:
    return STSTrainingArguments(
        output_dir=os.path.join(demo.output_dir, stage),
        max_steps=steps,
        per_device_train_batch_size=demo.batch_size,
        learning_rate=learning_rate,
        warmup_steps=max(1, steps // 20),
        lr_scheduler_type="cosine",
        logging_steps=max(1, steps // 10),
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        seed=demo.seed,
        dataloader_num_workers=0,
        sts_stage="none" if demo.dense else "auto",
    )


def main(argv: list[str] | None = None) -> dict:
    (demo,) = HfArgumentParser(DemoArguments).parse_args_into_dataclasses(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    data_dir = os.path.join(demo.output_dir, "data")
    if demo.foundation == "pretrained":
        foundation = build_foundation(FoundationRecipe(), demo.foundation_cache)
        print(f"Pretrained toy foundation models: {os.path.dirname(foundation['report'])}", flush=True)
        assets = {"language_model": foundation["language_model"], "vision_tower": foundation["vision_tower"],
                  "vision_feature_layer": -1}  # the encoder was pretrained on its last layer's patch tokens
        with open(foundation["report"]) as f:
            ceiling = json.load(f)["language_model"]["text_only_accuracy"]
    else:
        assets, ceiling = build_assets(demo), None
    image_size = demo.image_size
    print(f"Writing the synthetic data under {data_dir} ...", flush=True)
    alignment_data = write_dataset(data_dir, demo.train_samples, "train", demo.seed, "alignment", image_size)
    instruction_data = write_dataset(data_dir, demo.train_samples, "train", demo.seed, "instruction", image_size)
    test_data = write_dataset(data_dir, demo.test_samples, "test", demo.seed, "instruction", image_size)

    print("\n== Stage 1: alignment (projector trains; VTC) ==", flush=True)
    stage1 = run(
        ModelArguments(**assets, training_stage="alignment"),
        DataArguments(data_path=alignment_data["data_path"], image_folder=alignment_data["image_folder"]),
        _training_args(demo, "stage1", demo.alignment_steps, demo.alignment_lr),
    )
    print("\n== Stage 2: instruction tuning (projector + LLM train; LDS) ==", flush=True)
    stage2 = run(
        ModelArguments(model_name_or_path=stage1["output_dir"], training_stage="instruction"),
        DataArguments(data_path=instruction_data["data_path"], image_folder=instruction_data["image_folder"]),
        _training_args(demo, "stage2", demo.instruction_steps, demo.instruction_lr),
    )

    print("\n== Held-out questions ==", flush=True)
    model = AutoModelForImageTextToText.from_pretrained(stage2["output_dir"])
    processor = AutoProcessor.from_pretrained(stage2["output_dir"])
    scores = evaluate_model(
        model, processor, test_data["questions_path"], test_data["image_folder"], "exact_match",
        os.path.join(demo.output_dir, "eval"),
    )
    summary = {"stages": [stage1, stage2], "held_out": scores, "text_only_ceiling": ceiling}
    with open(os.path.join(demo.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print("\n" + format_summary(summary, demo))
    return summary


def format_summary(summary: dict, demo: DemoArguments) -> str:
    lines = ["STS demo summary" + (" (dense: STS off)" if demo.dense else ""), ""]
    lines.append(f"{'stage':<12} {'steps':>6} {'time (s)':>9} {'FLOPs saved':>12} {'final loss':>11}")
    for s in summary["stages"]:
        saved = f"{100 * s['sts']['flops_saving']:.1f}%" if s["sts"] else "-"
        lines.append(f"{s['stage']:<12} {s['steps']:>6} {s['wall_clock_seconds']:>9.1f} {saved:>12} {s['final_loss']:>11.3f}")
    scores = summary["held_out"]
    lines.append("")
    lines.append(f"held-out accuracy (exact match): {100 * scores['exact_match']:.1f}%")
    if summary.get("text_only_ceiling") is not None:
        lines.append(f"  (the language model alone, answering from the scene described in words: "
                     f"{100 * summary['text_only_ceiling']:.1f}%)")
    per_category = {k.split("/")[0]: v for k, v in scores.items() if k.endswith("/exact_match")}
    lines.append("  " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in per_category.items()))
    lines.append(f"outputs: {demo.output_dir}/stage1, {demo.output_dir}/stage2 (plain transformers checkpoints)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
