"""Accuracy retention: the demo's recipe trained densely and with each STS variant, same seeds, data and steps.

    python -m sts_trainer.lab.experiment --output_dir accuracy_results   # 3 seeds, ~40 min on 2 CPU cores: docs/accuracy.md
    python -m sts_trainer.lab.experiment --quick --output_dir /tmp/acc    # a smoke run, under a minute; numbers meaningless

Per seed, the synthetic world's data and the tiny models are built once (`sts_trainer.lab.demo`; the demo's recipe, with
fewer instruction steps by default to fit the time budget), and every variant trains from them for the same steps on
the same batches:

    variant              stage 1 (alignment)        stage 2 (instruction tuning)
    baseline             dense                      dense
    VTC <strategy> <r>   VTC, keep ratio r          dense          (uniform, random, instruction; r = 0.5, 0.25)
    LDS                  dense                      LDS (alpha 0.5, epsilon 0.5, quadratic: the paper's)
    STS                  VTC uniform 0.5            LDS            (every STS option at its default)
    no alignment         skipped                    dense          (a control: what stage 1 is worth here)

Dense stages run with `sts_stage='none'` (plain `Trainer`). Variants with the same stage 1 share its output (baseline
and LDS; VTC uniform 0.5 and STS). Each trained model answers the same held-out questions greedily
(`evaluate.evaluate_model`), scored by exact match, per category and overall.

The table (`accuracy.md`, numbers in `accuracy.json`): accuracy per category and overall; retention = the variant's
overall accuracy / the baseline's, per seed; FLOPs saved = 1 - whole-run actual / whole-run dense training FLOPs; and
wall-clock saved = 1 - the variant's training time (both stages' `train_runtime`) / the baseline's. Every cell is the
mean over seeds with (min-max). FLOPs are `flops.py`'s analytic count, from each stage's `sts` totals
(`sts_savings.json`). A dense stage keeps no ledger, but it trains on exactly the micro-batches that the sparse runs
of the same seed and stage count as their `dense_flops` (same data, same seed, same sampler), so that count is the
baseline's FLOPs, the reference; the experiment warns if the runs of a stage disagree on it.
"""

import json
import logging
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field, replace

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, HfArgumentParser
from transformers.utils import logging as hf_logging

from ..llava.data import DataArguments
from ..llava.evaluate import evaluate_model
from ..llava.train import ModelArguments, run
from .demo import DemoArguments, _training_args, build_assets
from .synthetic import CATEGORIES, write_dataset

logger = logging.getLogger("sts_trainer")

# Stage-1 settings: dense, or VTC with a strategy and keep ratio. ('uniform', 0.5) is STS's default. The control
# 'skipped' (no alignment stage) is handled in run_seed.
STAGE1 = {"dense": None} | {
    f"VTC {strategy} {ratio}": {"vtc_strategy": strategy, "vtc_keep_ratio": ratio}
    for strategy in ("uniform", "random", "instruction")
    for ratio in (0.5, 0.25)
}
# Stage-2 settings: dense, or LDS with the paper's defaults (STSTrainingArguments' lds_* defaults).
STAGE2 = {"dense": None, "LDS": {}}


@dataclass(frozen=True)
class Variant:
    name: str
    stage1: str  # key of STAGE1, or 'skipped'
    stage2: str  # key of STAGE2


VARIANTS = (
    Variant("baseline", "dense", "dense"),
    *(Variant(name, name, "dense") for name in STAGE1 if name != "dense"),
    Variant("LDS", "dense", "LDS"),
    Variant("STS (VTC uniform 0.5 + LDS)", "VTC uniform 0.5", "LDS"),
    Variant("no alignment (control)", "skipped", "dense"),
)
COLUMNS = (*CATEGORIES, "overall", "retention", "flops_saved", "wall_clock_saved")


@dataclass
class ExperimentArguments:
    output_dir: str = field(default="accuracy_results", metadata={"help": "Where data, runs, accuracy.json/.md go."})
    seeds: int = field(default=3, metadata={"help": "Number of seeds (0, 1, ...), each with its own data and weights."})
    quick: bool = field(default=False, metadata={"help": "A smoke run: tiny sizes, a few steps, one seed."})
    train_samples: int = field(default=DemoArguments.train_samples, metadata={"help": "Training scenes per stage."})
    test_samples: int = field(default=600, metadata={"help": "Held-out questions (the same for every run)."})
    alignment_steps: int = field(default=DemoArguments.alignment_steps, metadata={"help": "Optimizer steps, stage 1."})
    instruction_steps: int = field(
        default=800,
        metadata={"help": "Optimizer steps of stage 2 (the demo: 1500; fewer here, so that 3 seeds x 10 variants fit "
                          "in about 40 minutes on 2 CPU cores)."},
    )
    alignment_lr: float = field(default=2e-3, metadata={"help": "Stage-1 learning rate (the demo's)."})
    instruction_lr: float = field(default=5e-4, metadata={"help": "Stage-2 learning rate (the demo's)."})

    def __post_init__(self):
        if self.seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {self.seeds}.")


QUICK = dict(seeds=1, train_samples=24, test_samples=12, alignment_steps=2, instruction_steps=2)
QUICK_MODEL = dict(batch_size=4, hidden_size=32, num_layers=2)


def run_seed(exp: ExperimentArguments, recipe: DemoArguments, test: dict[str, str]) -> dict[str, dict]:
    """Train every variant for `recipe.seed`; return per variant its two stage summaries and held-out scores."""
    root = recipe.output_dir
    data_dir = os.path.join(root, "data")
    alignment_data, instruction_data = (
        write_dataset(data_dir, exp.train_samples, "train", recipe.seed, stage, recipe.image_size)
        for stage in ("alignment", "instruction")
    )
    assets = build_assets(recipe)

    def train(stage: str, key: str, sts: dict | None, output_dir: str, **model_args) -> dict:
        steps, lr, data = (exp.alignment_steps, exp.alignment_lr, alignment_data)
        if stage == "stage2":
            steps, lr, data = (exp.instruction_steps, exp.instruction_lr, instruction_data)
        args = _training_args(recipe, stage, steps, lr)
        args.output_dir, args.disable_tqdm = output_dir, True
        args.sts_stage = "none" if sts is None else "auto"
        for name, value in (sts or {}).items():
            setattr(args, name, value)
        args.validate_sts()
        print(f"\n== seed {recipe.seed}: {stage} {key} ==", flush=True)
        return run(
            ModelArguments(**model_args), DataArguments(data_path=data["data_path"], image_folder=data["image_folder"]),
            args,
        )

    stage1 = {}
    for key in dict.fromkeys(v.stage1 for v in VARIANTS if v.stage1 in STAGE1):
        output_dir = os.path.join(root, "stage1", key.replace(" ", "_"))
        stage1[key] = train("stage1", key, STAGE1[key], output_dir, **assets, training_stage="alignment")
    results = {}
    for variant in VARIANTS:
        output_dir = os.path.join(root, "stage2", variant.name.split(" (")[0].replace(" ", "_"))
        # the control composes the model afresh: stage 2 starts from an untrained projector
        init = assets if variant.stage1 == "skipped" else {"model_name_or_path": stage1[variant.stage1]["output_dir"]}
        stage2 = train("stage2", variant.name, STAGE2[variant.stage2], output_dir, **init, training_stage="instruction")
        start = time.perf_counter()
        model = AutoModelForImageTextToText.from_pretrained(output_dir)
        processor = AutoProcessor.from_pretrained(output_dir)
        scores = evaluate_model(
            model, processor, test["questions_path"], test["image_folder"], "exact_match",
            os.path.join(output_dir, "eval"),
        )
        results[variant.name] = {
            "stages": [stage1.get(variant.stage1), stage2],
            "scores": scores,
            "eval_seconds": time.perf_counter() - start,
        }
    return results


def dense_references(results: dict[str, dict]) -> tuple[list[float], float]:
    """Per stage, the dense training FLOPs of this seed's batches, and the largest relative disagreement between runs.

    Every sparse run of a stage counts the same micro-batches densely; a dense run keeps no ledger but trains on them.
    """
    references, disagreement = [], 0.0
    for index in range(2):
        stages = [r["stages"][index] for r in results.values()]
        counts = [s["sts"]["dense_flops"] for s in stages if s is not None and s["sts"]]
        if not counts:
            raise ValueError(f"No sparse run of stage {index + 1} to count its dense FLOPs from.")
        references.append(counts[0])
        disagreement = max(disagreement, (max(counts) - min(counts)) / max(counts))
    return references, disagreement


def seed_metrics(results: dict[str, dict]) -> tuple[dict[str, dict], dict]:
    """Per variant: accuracy per category and overall, retention, FLOPs and wall-clock saved (fractions)."""
    (dense1, dense2), disagreement = dense_references(results)
    if disagreement:
        logger.warning(f"Runs of the same stage counted different dense FLOPs (up to {100 * disagreement:.2g}% apart): "
                       "their batches differ, so the FLOPs savings are approximate.")
    base = results["baseline"]
    base_wall = sum(s["wall_clock_seconds"] for s in base["stages"])
    metrics = {}
    for name, r in results.items():
        # a stage that did not run (the control's stage 1) costs nothing; a dense one costs the reference
        actual = [
            0.0 if s is None else s["sts"]["actual_flops"] if s["sts"] else dense
            for s, dense in zip(r["stages"], (dense1, dense2))
        ]
        wall = sum(s["wall_clock_seconds"] for s in r["stages"] if s is not None)
        row = {c: r["scores"].get(f"{c}/exact_match") for c in CATEGORIES}
        row["overall"] = r["scores"]["exact_match"]
        row["retention"] = row["overall"] / base["scores"]["exact_match"] if base["scores"]["exact_match"] else None
        row["flops_saved"] = 1.0 - sum(actual) / (dense1 + dense2)
        row["stage1_flops_saved"] = 1.0 - actual[0] / dense1
        row["stage2_flops_saved"] = 1.0 - actual[1] / dense2
        row["wall_clock_saved"] = 1.0 - wall / base_wall
        row["train_seconds"] = wall
        metrics[name] = row
    reference = {
        "stage1_dense_flops": dense1, "stage2_dense_flops": dense2, "stage1_share": dense1 / (dense1 + dense2),
        "dense_flops_disagreement": disagreement,
    }
    return metrics, reference


def aggregate(per_seed: list[dict[str, dict]]) -> list[dict]:
    """One row per variant: every metric's mean, min, max and standard deviation over seeds."""
    rows = []
    for variant in VARIANTS:
        row = {"variant": variant.name, "stage1": variant.stage1, "stage2": variant.stage2}
        for key in per_seed[0][variant.name]:
            values = [m[variant.name][key] for m in per_seed if m[variant.name][key] is not None]
            if values:
                row[key] = {
                    "mean": statistics.fmean(values), "min": min(values), "max": max(values),
                    "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                }
        rows.append(row)
    return rows


def markdown(rows: list[dict], references: list[dict], exp: ExperimentArguments, recipe: DemoArguments,
             machine: str) -> str:
    def cell(row, key, scale=100.0, spec=".1f"):
        if key not in row:
            return ""
        v = row[key]
        if exp.seeds == 1:
            return format(scale * v["mean"], spec)
        return f"{scale * v['mean']:{spec}} ({scale * v['min']:{spec}}-{scale * v['max']:{spec}})"

    share = statistics.fmean(r["stage1_share"] for r in references)
    headers = [*CATEGORIES, "overall", "retention", "FLOPs saved", "wall-clock saved"]
    lines = [
        f"Machine: {machine}. Recipe: {exp.seeds} seed(s); {exp.train_samples} training scenes per stage; "
        f"{exp.alignment_steps} alignment + {exp.instruction_steps} instruction steps of batch {recipe.batch_size}; "
        f"a {recipe.num_layers}-layer, {recipe.hidden_size}-wide language model; "
        f"{(recipe.image_size // 8) ** 2} visual tokens per image; {exp.test_samples} held-out questions. "
        "Numbers in %: mean over seeds (min-max); retention = overall accuracy / the baseline's, per seed; FLOPs and "
        "wall-clock saved over the whole run (both stages) against the baseline.",
        "",
        "| variant | " + " | ".join(headers) + " |",
        "|---|" + "---:|" * len(headers),
    ]
    for row in rows:
        lines.append(f"| {row['variant']} | " + " | ".join(cell(row, key) for key in COLUMNS) + " |")
    lines += [
        "",
        f"Per stage (stage 1 is {100 * share:.1f}% of the baseline's training FLOPs):",
        "",
        "| variant | stage 1 | stage 2 | stage-1 FLOPs saved | stage-2 FLOPs saved | training time (s) |",
        "|---|---|---|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['variant']} | {row['stage1']} | {row['stage2']} | {cell(row, 'stage1_flops_saved')} "
            f"| {cell(row, 'stage2_flops_saved')} | {cell(row, 'train_seconds', 1.0, '.0f')} |"
        )
    return "\n".join(lines)


def machine_description() -> str:
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def main(argv: list[str] | None = None) -> dict:
    (exp,) = HfArgumentParser(ExperimentArguments).parse_args_into_dataclasses(argv)
    model_sizes = {}
    if exp.quick:
        exp = replace(exp, **QUICK)
        model_sizes = QUICK_MODEL
    torch.set_num_threads(min(2, torch.get_num_threads()))
    hf_logging.set_verbosity_error()
    start = time.perf_counter()
    recipe = DemoArguments(output_dir=exp.output_dir, **model_sizes)
    # one held-out set for every seed and variant: the test split never shares a scene with a training split
    test = write_dataset(
        os.path.join(exp.output_dir, "test"), exp.test_samples, "test", 0, "instruction", recipe.image_size
    )
    per_seed, references, raw = [], [], {}
    for seed in range(exp.seeds):
        seed_recipe = replace(recipe, output_dir=os.path.join(exp.output_dir, f"seed{seed}"), seed=seed)
        results = run_seed(exp, seed_recipe, test)
        metrics, reference = seed_metrics(results)
        per_seed.append(metrics)
        references.append(reference)
        raw[seed] = results
        print(f"seed {seed} done after {time.perf_counter() - start:.0f} s: "
              + ", ".join(f"{name} {100 * m['overall']:.1f}%" for name, m in metrics.items()), flush=True)
    rows = aggregate(per_seed)
    machine = machine_description()
    table = markdown(rows, references, exp, recipe, machine)
    output = {
        "arguments": asdict(exp), "recipe": asdict(recipe), "machine": machine, "seconds": time.perf_counter() - start,
        "rows": rows, "per_seed": per_seed, "references": references, "runs": raw,
    }
    with open(os.path.join(exp.output_dir, "accuracy.json"), "w") as f:
        json.dump(output, f, indent=1)
    with open(os.path.join(exp.output_dir, "accuracy.md"), "w") as f:
        f.write(table + "\n")
    print("\n" + table)
    return output


if __name__ == "__main__":
    main()
