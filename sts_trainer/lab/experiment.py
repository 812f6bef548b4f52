"""Accuracy retention on a miniature LLaVA: pretrained toy foundation models, LLaVA's token profile, paired seeds.

    python -m sts_trainer.lab.experiment --output_dir accuracy_results   # 5 seeds: docs/accuracy.md; resumes
    python -m sts_trainer.lab.experiment --quick --output_dir /tmp/acc    # a smoke run, ~1 min; numbers meaningless

The testbed is LLaVA-1.5's setting in miniature. A frozen *pretrained* language model (it knows the world's language:
it answers questions about a scene written in words, one word per image patch) and a frozen *pretrained* vision
encoder (its features carry colour, shape, position, count and text), both from `sts_trainer.lab.foundation`, built
once and cached; the two never trained together. Each image
gives 256 visual tokens against captions of a few dozen text tokens. Stage 1 (alignment) trains a fresh projector on
captions; stage 2 (instruction tuning) trains projector and language model on questions. Every run goes through the
command line's code path (`sts_trainer.llava.train.run`, as `sts-train` does), then answers the same held-out
questions greedily (`sts_trainer.llava.evaluate`), scored by exact match per category and overall.

    variant              stage 1 (alignment)        stage 2 (instruction tuning)
    baseline             dense                      dense
    VTC <strategy> <r>   VTC, keep ratio r          dense          (uniform, random, instruction, pool; r = 0.5, 0.25)
    LDS                  dense                      LDS (alpha 0.5, epsilon 0.5, quadratic: the paper's)
    STS                  VTC uniform 0.5            LDS            (every STS option at its default)
    STS with pool        VTC pool 0.5               LDS
    LDS lr_mass          dense                      LDS whose decay follows the learning rate's mass (lds_progress)
    LDS redundancy       dense                      LDS skipping the layers that change the stream least most
                                                    (lds_layer_order='redundancy'; STS redundancy: after VTC)
    VTC uniform 0.5 original positions     (stage 1 at the full sequence's position ids, whatever --vtc_position_ids)
    STS lr_mass original positions         VTC uniform 0.5 at the full sequence's position ids, then LDS lr_mass
    dense at STS's FLOPs dense, fewer steps          dense, fewer steps (equal compute: STS's FLOPs per stage)
    no alignment         skipped                    dense          (a control: what stage 1 is worth here)

**Paired design.** Per seed, every variant trains on the same data, from the same initial weights (the foundation
models, and a projector initialised from the seed), on the same batches in the same order. Variants with the same
stage 1 share its output (baseline and LDS; VTC uniform 0.5 and STS). Dense stages run with `sts_stage='none'`.

**Statistics.** Retention = the variant's accuracy / the baseline's, pooled over seeds (the ratio of the means). Its
95% interval is a paired, crossed bootstrap over seeds and questions: every seed answers the same held-out questions,
so each resample draws seeds with replacement and one resample of the questions shared by all of them, the same
draws for the variant and the baseline (`retention_interval`). Each row also says whether retention is within 1
point of 100% at 95% (`equivalence`), and gives the chance-adjusted retention (accuracy above a uniform guess among
each category's answers, over the baseline's). By default all seeds share one foundation pair (one pretraining seed),
and the interval does not cover the variation between pretrained pairs; `--foundation_seeds N` crosses N pairs with
the seeds (every pair trains every seed on the same data) and resamples pairs, then seeds within them. **Regime
axes**: `--length` (both stages' steps and scenes times a factor), `--foundation deep` (a 12-layer language model at
about the same FLOPs per token) and `--vtc_position_ids`. FLOPs saved = 1 - whole-run
actual / whole-run dense training FLOPs (`flops.py`'s analytic count, from each stage's `sts` totals). A dense stage
keeps no ledger, but it trains on exactly the micro-batches that the sparse runs of the same seed and stage count as
their `dense_flops`, so that count is the baseline's FLOPs; the experiment warns if the runs of a stage disagree on
it. Wall-clock saved = 1 - the variant's training time (both stages' `train_runtime`) / the baseline's, per seed.

**Resuming.** Each finished run is kept (`stage1/<setting>/sts_train_summary.json`, `stage2/<variant>/result.json`);
run the same command again and it trains only what is missing, so an interrupted experiment resumes and `--seeds`
can grow. `experiment.json` holds the arguments a folder's runs were made with; other arguments are refused.
"""

import contextlib
import json
import logging
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, HfArgumentParser
from transformers.utils import logging as hf_logging

from ..arguments import STSTrainingArguments
from ..layer_skip import LayerSkipper
from ..llava.data import IMAGE_TOKEN, PLAIN_TEMPLATE, DataArguments, to_messages
from ..llava.evaluate import evaluate_model, read_questions
from ..llava.metrics.vqa_accuracy import normalize_answer
from ..llava.train import ModelArguments, run
from .demo import RECIPES
from .foundation import DEFAULT_CACHE, EXPERIMENT_RECIPES, QUICK_RECIPE, build_foundation
from .synthetic import CATEGORIES, write_dataset

logger = logging.getLogger("sts_trainer")

# Stage-1 settings: dense, or VTC with a strategy and keep ratio. ('uniform', 0.5) is STS's default. The control
# 'skipped' (no alignment stage) is handled in run_seed.
STAGE1 = {"dense": None} | {
    f"VTC {strategy} {ratio}": {"vtc_strategy": strategy, "vtc_keep_ratio": ratio}
    for strategy in ("uniform", "random", "instruction", "pool")
    for ratio in (0.5, 0.25)
} | {"VTC uniform 0.5 original positions": {"vtc_strategy": "uniform", "vtc_keep_ratio": 0.5,
                                           "vtc_position_ids": "original"},
     # DualSpeed's mode isolator: 4 learned soft tokens open each image's kept tokens in alignment
     "VTC uniform 0.5 isolator": {"vtc_strategy": "uniform", "vtc_keep_ratio": 0.5, "vtc_mode_isolator": 4}}
# Stage-2 settings: dense, LDS with the paper's defaults (STSTrainingArguments' lds_* defaults), and the frontier
# beyond the paper: VTC in instruction tuning ('VTC-I') at a strategy and keep ratio, with or without full-token
# steps, LDS, self-distillation, a keep ratio rising to 1.0.
def _vtc_i(strategy: str, ratio: float, full: float = 0.0, lds: bool = False, **options) -> dict:
    return {"sts_vtc": "on", "sts_lds": "on" if lds else "off", "vtc_strategy": strategy, "vtc_keep_ratio": ratio,
            "vtc_full_token_fraction": full, **options}


STAGE2 = {
    "dense": None,
    "LDS": {},
    "LDS zero-filled": {},  # LDS as DeepSpeed ZeRO trained it before the optimizer guard (`zero_filled_skipped_layers`)
    "LDS lr_mass": {"lds_progress": "lr_mass"},  # the decay follows the learning rate's mass, not the steps
    "LDS redundancy": {"lds_layer_order": "redundancy"},  # the depth factors in the order of measured redundancy
    "VTC-I diverse 0.1": _vtc_i("diverse", 0.1),
    "VTC-I diverse 0.1 + full 0.1": _vtc_i("diverse", 0.1, 0.1),
    "VTC-I uniform 0.1 + full 0.1": _vtc_i("uniform", 0.1, 0.1),
    "VTC-I uniform 0.05 + full 0.1": _vtc_i("uniform", 0.05, 0.1),
    "VTC-I uniform 0.1 + full 0.1 + LDS 0.2": _vtc_i("uniform", 0.1, 0.1, lds=True, lds_alpha=0.2),
    "VTC-I diverse 0.1 + full 0.1 + LDS": _vtc_i("diverse", 0.1, 0.1, lds=True),
    "VTC-I uniform 0.1 + full 0.1 + LDS": _vtc_i("uniform", 0.1, 0.1, lds=True),
    "VTC-I uniform 0.1 + full 0.15 + LDS": _vtc_i("uniform", 0.1, 0.15, lds=True),
    "VTC-I uniform 0.15 + full 0.1 + LDS": _vtc_i("uniform", 0.15, 0.1, lds=True),
    "VTC-I diverse 0.25 + full 0.1 + LDS": _vtc_i("diverse", 0.25, 0.1, lds=True),
    "VTC-I diverse 0.1 + full 0.1 + LDS + distillation": _vtc_i("diverse", 0.1, 0.1, lds=True, vtc_distill_weight=1.0),
    "VTC-I diverse 0.1 to 1.0 cosine + full 0.1 + LDS": _vtc_i("diverse", 0.1, 0.1, lds=True,
                                                               vtc_keep_schedule="cosine"),
}


@dataclass(frozen=True)
class Variant:
    name: str
    stage1: str  # key of STAGE1, or 'skipped'
    stage2: str  # key of STAGE2
    # An equal-compute dense baseline: both stages dense, each cut to the steps that spend the training FLOPs the
    # named variant's stage spent (the same seed's run of it, which must be chosen too).
    budget_of: str | None = None


VARIANTS = (
    Variant("baseline", "dense", "dense"),
    *(Variant(name, name, "dense") for name in STAGE1 if name != "dense"),
    Variant("LDS", "dense", "LDS"),
    Variant("LDS with zero-gradient steps (ZeRO before the guard)", "dense", "LDS zero-filled"),
    Variant("STS (VTC uniform 0.5 + LDS)", "VTC uniform 0.5", "LDS"),
    Variant("STS with pool (VTC pool 0.5 + LDS)", "VTC pool 0.5", "LDS"),
    Variant("LDS lr_mass", "dense", "LDS lr_mass"),
    Variant("STS lr_mass (VTC uniform 0.5 + LDS lr_mass)", "VTC uniform 0.5", "LDS lr_mass"),
    Variant("STS lr_mass original positions (VTC uniform 0.5 original positions + LDS lr_mass)",
            "VTC uniform 0.5 original positions", "LDS lr_mass"),  # the two remedies measured at 4x, together
    Variant("LDS redundancy", "dense", "LDS redundancy"),
    Variant("STS redundancy (VTC uniform 0.5 + LDS redundancy)", "VTC uniform 0.5", "LDS redundancy"),
    *(Variant(f"{name} (after VTC uniform 0.5)", "VTC uniform 0.5", name) for name in STAGE2 if name.startswith("VTC-I")),
    Variant("dense at STS's FLOPs", "dense", "dense", budget_of="STS (VTC uniform 0.5 + LDS)"),
    Variant("no alignment (control)", "skipped", "dense"),
)
# The summary table's header (docs/accuracy.md keeps it; `figures --summary` finds the table by it), and its names
# for the variants that are a shipped recipe (docs/accuracy.md and scripts read them).
SUMMARY_HEADER = "| variant | regime | retention | 95% low | 95% high | LLaVA-1.5-7B FLOPs saved |"
SUMMARY_NAMES = {"STS (VTC uniform 0.5 + LDS)": "STS defaults",
                 "VTC-I uniform 0.15 + full 0.1 + LDS (after VTC uniform 0.5)": "sts_plus"}
COLUMNS = (*CATEGORIES, "overall", "retention", "flops_saved", "wall_clock_saved")
RECIPE = RECIPES["pretrained"]  # the demo's recipe on the pretrained pair
LLAVA_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "models" / "llava-1.5-7b.json"


@dataclass
class ExperimentArguments:
    output_dir: str = field(default="accuracy_results", metadata={"help": "Where data, runs, accuracy.json/.md go."})
    seeds: int = field(default=5, metadata={"help": "Number of seeds (0, 1, ...), each with its own data, projector "
                                                    "initialisation and batch order."})
    quick: bool = field(default=False, metadata={"help": "A smoke run: the quick foundation models, tiny sizes, a "
                                                         "few steps, one seed."})
    train_samples: int = field(default=RECIPE["train_samples"],
                               metadata={"help": "Training scenes per stage and seed."})
    test_samples: int = field(default=1200, metadata={"help": "Held-out questions (the same for every run), in "
                                                              "equal parts per category."})
    alignment_steps: int = field(default=RECIPE["alignment_steps"], metadata={"help": "Optimizer steps of stage 1."})
    instruction_steps: int = field(default=RECIPE["instruction_steps"],
                                   metadata={"help": "Optimizer steps of stage 2."})
    batch_size: int = field(default=RECIPE["batch_size"], metadata={"help": "Samples per optimizer step, both stages."})
    alignment_lr: float = field(default=RECIPE["alignment_lr"],
                                metadata={"help": "Stage-1 learning rate (the projector's)."})
    instruction_lr: float = field(default=RECIPE["instruction_lr"],
                                  metadata={"help": "Stage-2 learning rate (projector and language model)."})
    variants: str | None = field(
        default=None,
        metadata={"help": "Comma-separated variant names to run (default: all). The baseline is always run. A quick "
                          "check of a testbed: --variants 'no alignment (control)'."},
    )
    bootstrap: int = field(default=2000, metadata={"help": "Bootstrap resamples for the retention intervals."})
    foundation: str = field(
        default="default",
        metadata={"help": "A regime axis: the toy foundation pair (foundation.EXPERIMENT_RECIPES): 'default', a "
                          "4-layer 128-wide language model; 'deep', 12 layers 72 wide at about the same FLOPs per "
                          "token; 'deep_no_layout', the deep one pretrained on patch words of varying number and "
                          "order (no fixed image layout; built on first use, about 17 min, then cached).",
                  "choices": [name for name in EXPERIMENT_RECIPES if name != "quick"]},
    )
    length: float = field(
        default=1.0,
        metadata={"help": "Training length, a regime axis: both stages' optimizer steps and training scenes times this "
                          "(2, 4: a longer run on more distinct samples, so that no sample repeats more often than at "
                          "1)."},
    )
    vtc_position_ids: str = field(
        default="compact",
        metadata={"help": "A regime axis: the position ids of every VTC setting ('compact' or 'original'; see "
                          "STSTrainingArguments.vtc_position_ids).", "choices": ["compact", "original"]},
    )
    foundation_seeds: int = field(
        default=1,
        metadata={"help": "Foundation pairs crossed with the seeds: the --foundation recipe pretrained with seeds 0, "
                          "1, ... (pair 0 is the shipped one; each other pair is built on first use, 13 to 25 min per "
                          "pair on 2 CPU cores at 4 layers, then cached). Every pair trains every seed on the same "
                          "data; pair k's runs go under <output_dir>/pair<k>/ (pair 0's where a one-pair experiment "
                          "keeps them), and the interval resamples pairs, then seeds within them."},
    )
    foundation_cache: str = field(default=DEFAULT_CACHE, metadata={"help": "Where the pretrained toy foundation "
                                                                           "models are cached (built when missing)."})

    def __post_init__(self):
        if self.seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {self.seeds}.")
        if self.foundation_seeds < 1:
            raise ValueError(f"foundation_seeds must be >= 1 (the number of foundation pairs), got "
                             f"{self.foundation_seeds}.")
        if min(self.train_samples, self.test_samples, self.alignment_steps, self.instruction_steps,
               self.batch_size, self.bootstrap) < 1:
            raise ValueError("train_samples, test_samples, alignment_steps, instruction_steps, batch_size and "
                             "bootstrap must be positive.")

        if self.foundation not in EXPERIMENT_RECIPES or self.foundation == "quick":
            raise ValueError(f"foundation={self.foundation!r} is not valid; choose one of "
                             f"{[name for name in EXPERIMENT_RECIPES if name != 'quick']} (--quick for the quick pair).")
        if self.length <= 0:
            raise ValueError(f"length must be positive, got {self.length}.")
        if self.vtc_position_ids not in ("compact", "original"):
            raise ValueError(f"vtc_position_ids={self.vtc_position_ids!r} is not valid; choose compact or original.")
        known = [v.name for v in VARIANTS]
        unknown = sorted(set(self.chosen()) - set(known))
        if unknown:
            raise ValueError(f"Unknown variants {unknown} in --variants; choose from {known}.")

    def chosen(self) -> list[str]:
        if self.variants is None:
            return [v.name for v in VARIANTS]
        return list(dict.fromkeys(["baseline", *(name.strip() for name in self.variants.split(",") if name.strip())]))

    def scaled(self, name: str) -> int:
        """`train_samples`, `alignment_steps` or `instruction_steps` at this run's `length`."""
        return max(1, round(getattr(self, name) * self.length))

    def regime(self, lm_layers: int) -> str:
        return (f"{self.length:g}x, {lm_layers} layers"
                + (", no fixed layout" if EXPERIMENT_RECIPES[self.foundation].scene_text == "patch_words_varied" else "")
                + (", original positions" if self.vtc_position_ids == "original" else "")
                + (f", {self.foundation_seeds} foundation pairs" if self.foundation_seeds > 1 else ""))

    def defining(self) -> dict:
        """The arguments a run's result depends on: a folder's runs are only reused under the same ones."""
        free = ("output_dir", "seeds", "foundation_seeds", "variants", "bootstrap")  # more of them resume a folder
        return {k: v for k, v in asdict(self).items() if k not in free}


QUICK = dict(seeds=1, train_samples=24, test_samples=12, alignment_steps=2, instruction_steps=2, batch_size=4,
             bootstrap=50)


def _training_args(exp: ExperimentArguments, stage: str, seed: int, output_dir: str,
                   sts: dict | None, steps: int | None = None, save_steps: int | None = None) -> STSTrainingArguments:
    """A stage's training arguments; with `save_steps`, a checkpoint (the model only) every that many steps."""
    full, lr = (exp.scaled("alignment_steps"), exp.alignment_lr) if stage == "stage1" else (
        exp.scaled("instruction_steps"), exp.instruction_lr)
    steps = steps or full
    args = STSTrainingArguments(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=exp.batch_size, learning_rate=lr,
        warmup_steps=max(1, steps // 20), lr_scheduler_type="cosine", logging_steps=max(1, steps // 10),
        save_strategy="no" if save_steps is None else "steps", save_steps=save_steps or 500,
        save_only_model=save_steps is not None, report_to=[], use_cpu=not torch.cuda.is_available(), seed=seed,
        dataloader_num_workers=0, disable_tqdm=True, sts_stage="none" if sts is None else "auto",
        **{"vtc_position_ids": exp.vtc_position_ids, **(sts or {})},
    )
    return args


@contextlib.contextmanager
def zero_filled_skipped_layers():
    """Train as DeepSpeed ZeRO did before `LayerSkipper.guard_optimizer`: a decoder layer skipped in the whole step
    gets a zero gradient (ZeRO zero-fills its slice of the flat buffer) instead of none, so AdamW still moves it along
    its momentum and decays it. In one process, for the paired comparison in docs/accuracy.md."""
    def zero_fill(skipper, optimizer):
        def fill(opt, args, kwargs):
            for layer in skipper._patched:
                for p in layer.parameters():
                    if p.requires_grad and p.grad is None:
                        p.grad = torch.zeros_like(p)

        skipper._optimizer_hooks.append(optimizer.register_step_pre_hook(fill))

    guard = LayerSkipper.guard_optimizer
    LayerSkipper.guard_optimizer = zero_fill
    try:
        yield
    finally:
        LayerSkipper.guard_optimizer = guard


def _done(path: str) -> dict | None:
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return None


def pair_folder(output_dir: str, pair: int) -> str:
    """Where foundation pair `pair`'s runs go: pair 0's in the folder itself (where a one-pair experiment keeps them),
    pair k's under `pair<k>/`."""
    return output_dir if pair == 0 else os.path.join(output_dir, f"pair{pair}")


def run_name(pair: int, seed: int) -> str:
    """How the progress lines name a run: 'seed 1', or 'pair 2, seed 1' beyond pair 0."""
    return f"seed {seed}" if pair == 0 else f"pair {pair}, seed {seed}"


def run_key(pair: int, seed: int) -> int | str:
    """A run's key in the output's `runs`: the seed for pair 0 (as earlier outputs have it), 'pair<k>/seed<s>' beyond;
    accuracy.json holds it as a string."""
    return seed if pair == 0 else f"pair{pair}/seed{seed}"


def run_seed(exp: ExperimentArguments, seed: int, foundation: dict[str, str], test: dict[str, str],
             pair: int = 0) -> dict[str, dict]:
    """Train (or find, when already trained) every variant for `seed` on foundation pair `pair`; per variant its two
    stage summaries, held-out scores and per-question correctness. Every pair trains a seed on the same data."""
    root = os.path.join(pair_folder(exp.output_dir, pair), f"seed{seed}")
    data_dir = os.path.join(exp.output_dir, f"seed{seed}", "data")
    tag = run_name(pair, seed)
    image_size = foundation["image_size"]
    data = {}

    def dataset(stage):
        if stage not in data:
            data[stage] = write_dataset(data_dir, exp.scaled("train_samples"), "train", seed, stage, image_size)
        return data[stage]

    compose = {"language_model": foundation["language_model"], "vision_tower": foundation["vision_tower"],
               "vision_feature_layer": -1}  # the encoder was pretrained on its last layer's patch tokens

    def train(stage: str, key: str, sts: dict | None, output_dir: str, steps: int | None = None,
              **model_args) -> dict:
        summary = _done(os.path.join(output_dir, "sts_train_summary.json"))
        if summary is not None:
            print(f"== {tag}: {stage} {key}: done before, reused ==", flush=True)
            return summary
        kind = "alignment" if stage == "stage1" else "instruction"
        files = dataset(kind)
        print(f"\n== {tag}: {stage} {key} ==", flush=True)
        return run(
            ModelArguments(**model_args, training_stage=kind),
            DataArguments(data_path=files["data_path"], image_folder=files["image_folder"]),
            _training_args(exp, stage, seed, output_dir, sts, steps),
        )

    stage1 = {}

    def aligned(key: str) -> dict:  # each stage-1 setting trains once, when a variant first needs it
        if key not in stage1:
            output_dir = stage1_folder(root, key)
            stage1[key] = train("stage1", key, STAGE1[key], output_dir, **compose)
        return stage1[key]

    questions = read_questions(test["questions_path"])
    results = {}
    # the baseline and the control first: what the testbed is worth shows after two runs; equal-compute baselines
    # after the variants whose FLOPs they spend
    chosen = [v for v in VARIANTS if v.name in exp.chosen()]
    for variant in sorted(chosen, key=lambda v: (v.name not in ("baseline", "no alignment (control)"),
                                                 v.budget_of is not None)):
        output_dir = stage2_folder(root, variant)
        result = _done(os.path.join(output_dir, "result.json"))
        budget, variant_stage1 = (None, None), variant.stage1
        if variant.budget_of:  # its own dense stage 1, cut short (found, not retrained, when done before)
            budget = _budget_steps(exp, results, variant)
            variant_stage1 = f"dense, {budget[0]} steps"
            if variant_stage1 not in stage1:
                folder = os.path.join(root, "stage1", f"dense_{budget[0]}_steps")
                stage1[variant_stage1] = train("stage1", variant_stage1, None, folder, budget[0], **compose)
        if result is None:
            # the control composes the model afresh: stage 2 starts from an untrained projector
            init = compose if variant.stage1 == "skipped" else {
                "model_name_or_path": (stage1[variant_stage1] if variant.budget_of else aligned(variant.stage1))[
                    "output_dir"]}
            zero_filled = variant.stage2 == "LDS zero-filled"
            with zero_filled_skipped_layers() if zero_filled else contextlib.nullcontext():
                stage2 = train("stage2", variant.name, STAGE2[variant.stage2], output_dir, budget[1], **init)
            result = {"stage2": stage2, **evaluate_run(output_dir, test, questions)}
            with open(os.path.join(output_dir, "result.json"), "w") as f:
                json.dump(result, f, indent=1)
        else:
            print(f"== {tag}: stage2 {variant.name}: done before, reused ==", flush=True)
        if variant.stage1 != "skipped" and not variant.budget_of:
            aligned(variant.stage1)  # a reused stage 2 still reports its stage 1 (found, not retrained)
        results[variant.name] = {
            "stages": [stage1.get(variant_stage1), result["stage2"]],
            "scores": result["scores"], "eval_seconds": result["eval_seconds"], "correct": result["correct"],
        }
    return {v.name: results[v.name] for v in chosen}


def evaluate_run(model_dir: str, test: dict[str, str], questions: list[dict], eval_dir: str | None = None) -> dict:
    """Answer the held-out questions greedily with the model saved in `model_dir` (loaded by plain transformers, so
    dense: nothing skipped or compressed); its scores, per-question correctness (in the question file's order) and
    the seconds it took. Predictions and scores go to `eval_dir` (default `<model_dir>/eval`)."""
    start = time.perf_counter()
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    eval_dir = eval_dir or os.path.join(model_dir, "eval")
    scores = evaluate_model(model, processor, test["questions_path"], test["image_folder"], "exact_match",
                            eval_dir, max_new_tokens=3)
    with open(os.path.join(eval_dir, "predictions.jsonl")) as f:
        predictions = [json.loads(line) for line in f]
    if [p["id"] for p in predictions] != [q["id"] for q in questions]:
        raise RuntimeError(f"{eval_dir}/predictions.jsonl does not follow the question file's order.")
    correct = [int(normalize_answer(p["prediction"]) == normalize_answer(p["answer"])) for p in predictions]
    if abs(statistics.fmean(correct) - scores["exact_match"]) > 1e-9:
        raise RuntimeError(f"Per-question correctness disagrees with the exact_match metric in {eval_dir}.")
    return {"scores": scores, "eval_seconds": time.perf_counter() - start, "correct": correct}


def stage1_folder(root: str, key: str) -> str:
    """Where a seed's stage-1 setting `key` (of STAGE1) is trained and kept."""
    return os.path.join(root, "stage1", key.replace(" ", "_"))


def stage2_folder(root: str, variant: Variant) -> str:
    """Where a seed's stage 2 of `variant` is trained and kept."""
    return os.path.join(root, "stage2", variant.name.split(" (")[0].replace(" ", "_").replace("'", ""))


def _budget_steps(exp: ExperimentArguments, results: dict[str, dict], variant: Variant) -> tuple[int, int]:
    """Per stage, the dense steps that spend the training FLOPs `variant.budget_of` spent in that stage (its
    actual / dense FLOPs times the stage's steps; a dense step costs about the same at every step)."""
    if variant.budget_of not in results:
        raise ValueError(f"The variant {variant.name!r} spends the FLOPs of {variant.budget_of!r}: choose that variant "
                         "too (--variants).")
    steps = []
    for stage, name in zip(results[variant.budget_of]["stages"], ("alignment_steps", "instruction_steps")):
        fraction = stage["sts"]["actual_flops"] / stage["sts"]["dense_flops"] if stage and stage["sts"] else 1.0
        steps.append(max(1, round(exp.scaled(name) * fraction)))
    return steps[0], steps[1]


def dense_references(results: dict[str, dict]) -> tuple[list[float | None], float]:
    """Per stage, the dense training FLOPs of this seed's batches (None without a sparse run of the stage to count
    them), and the largest relative disagreement between runs.

    Every sparse run of a stage counts the same micro-batches densely; a dense run keeps no ledger but trains on them.
    """
    references, disagreement = [], 0.0
    for index in range(2):
        stages = [r["stages"][index] for r in results.values()]
        counts = [s["sts"]["dense_flops"] for s in stages if s is not None and s["sts"]]
        if not counts:
            references.append(None)
            continue
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
        # a dense stage cut short (an equal-compute baseline) costs the reference in proportion to its steps
        full_steps = [base["stages"][0]["steps"] if base["stages"][0] else None, base["stages"][1]["steps"]]
        actual = [
            0.0 if s is None else s["sts"]["actual_flops"] if s["sts"] else
            None if dense is None else dense * s["steps"] / (full or s["steps"])
            for s, dense, full in zip(r["stages"], (dense1, dense2), full_steps)
        ]
        wall = sum(s["wall_clock_seconds"] for s in r["stages"] if s is not None)
        row = {c: r["scores"].get(f"{c}/exact_match") for c in CATEGORIES}
        row["overall"] = r["scores"]["exact_match"]
        row["retention"] = row["overall"] / base["scores"]["exact_match"] if base["scores"]["exact_match"] else None
        counted = dense1 is not None and dense2 is not None
        row["flops_saved"] = 1.0 - sum(actual) / (dense1 + dense2) if counted else None
        row["stage1_flops_saved"] = 1.0 - actual[0] / dense1 if counted else None
        row["stage2_flops_saved"] = 1.0 - actual[1] / dense2 if counted else None
        row["wall_clock_saved"] = 1.0 - wall / base_wall
        row["train_seconds"] = wall
        metrics[name] = row
    reference = {
        "stage1_dense_flops": dense1, "stage2_dense_flops": dense2,
        "stage1_share": dense1 / (dense1 + dense2) if dense1 is not None and dense2 is not None else None,
        "dense_flops_disagreement": disagreement,
    }
    return metrics, reference


def chance_per_question(questions: list[dict]) -> np.ndarray:
    """Each held-out question's chance of being answered right by a uniform guess among its category's answers (the
    distinct answers of that category in the held-out set: yes / no is 1/2, the written word 1/17, ...)."""
    answers: dict[str, set] = {}
    for q in questions:
        answers.setdefault(q.get("category"), set()).add(normalize_answer(q["answer"]))
    return np.array([1.0 / len(answers[q.get("category")]) for q in questions])


def retention_interval(correct: np.ndarray, baseline: np.ndarray, resamples: int, seed: int = 0,
                       level: float = 0.95, chance: np.ndarray | None = None,
                       pairs: int = 1) -> tuple[float, float, float]:
    """Pooled retention (mean accuracy / the baseline's) and its paired bootstrap interval over seeds and questions;
    with `chance` (per question, `chance_per_question`), the chance-adjusted retention (accuracy above chance / the
    baseline's accuracy above chance) instead.

    `correct` and `baseline` are (seeds, questions) arrays of 0/1, the same questions in the same order for every
    seed. The design is crossed, not nested: every seed answered the same questions, so a resample draws seeds with
    replacement and *one* resample of the questions, shared by every drawn seed (and by the variant and the baseline).
    Drawing the questions afresh per seed would treat each seed's questions as new ones and give intervals about a
    quarter too narrow.

    With `pairs` > 1 the rows are that many foundation pairs' seeds, pair-major (pair 0's seeds, then pair 1's, ...,
    the same number each), and the resample is hierarchical: pairs with replacement, then seeds with replacement
    within each drawn pair, so the interval covers the variation between pretrained pairs too.
    """
    if correct.shape != baseline.shape:
        raise ValueError(f"Paired arrays differ in shape: {correct.shape} and {baseline.shape}.")
    if pairs < 1 or correct.shape[0] % pairs:
        raise ValueError(f"{correct.shape[0]} rows cannot be {pairs} foundation pairs with the same number of seeds "
                         "each.")
    if not baseline.any():
        raise ValueError("The baseline answered no question correctly: retention is undefined.")
    n_seeds, n_questions = correct.shape
    chance = np.zeros(n_questions) if chance is None else np.asarray(chance, dtype=float)
    rng = np.random.default_rng(seed)
    ratios = []
    for start in range(0, resamples, 100):  # in chunks, to bound memory at 100 x seeds x questions indices
        count = min(100, resamples - start)
        if pairs == 1:
            seeds = rng.integers(0, n_seeds, (count, n_seeds, 1))
        else:  # rows of the drawn pairs' drawn seeds
            per_pair = n_seeds // pairs
            drawn = rng.integers(0, pairs, (count, pairs, 1))
            seeds = (drawn * per_pair + rng.integers(0, per_pair, (count, pairs, per_pair))).reshape(count, n_seeds, 1)
        questions = rng.integers(0, n_questions, (count, 1, n_questions))  # one draw for every seed
        floor = chance[questions[:, 0]].mean(axis=1)
        kept = correct[seeds, questions].mean(axis=(1, 2)) - floor
        base = baseline[seeds, questions].mean(axis=(1, 2)) - floor
        ratios.append(np.divide(kept, base, out=np.full_like(kept, np.nan), where=base > 0))
    ratios = np.concatenate(ratios)
    point = (correct.mean() - chance.mean()) / (baseline.mean() - chance.mean())
    low, high = np.nanpercentile(ratios, [50 * (1 - level), 50 * (1 + level)])
    return float(point), float(low), float(high)


EQUIVALENCE_MARGIN = 0.01  # "keeps dense accuracy": retention within 1 point of 100% at 95%


def equivalence(low: float, high: float, margin: float = EQUIVALENCE_MARGIN) -> str:
    """What a retention interval says against 100%: 'within 1 point' when its lower bound is >= 1 - margin (at 95%,
    the variant loses at most `margin`), 'below' when even its upper bound is under 1 - margin, else 'undecided'."""
    if low >= 1 - margin:
        return f"within {100 * margin:g} point"
    if high < 1 - margin:
        return f"below by more than {100 * margin:g} point"
    return "undecided"


def aggregate(per_seed: list[dict[str, dict]], correct: dict[str, np.ndarray], resamples: int,
              chance: np.ndarray | None = None, pairs: int = 1) -> list[dict]:
    """One row per variant: every metric's mean, min, max and standard deviation over seeds; the pooled retention
    with its crossed bootstrap interval and what it says against 100% (`equivalence`); with `chance`, the
    chance-adjusted retention too. With `pairs` > 1, `per_seed` and the rows of `correct` are that many foundation
    pairs' seeds, pair-major; the interval resamples pairs, then seeds (`retention_interval`), and each row gives
    every pair's own pooled retention (`per_pair_retention`)."""
    rows = []
    for variant in (v for v in VARIANTS if v.name in per_seed[0]):
        row = {"variant": variant.name, "stage1": variant.stage1, "stage2": variant.stage2}
        for key in per_seed[0][variant.name]:
            values = [m[variant.name][key] for m in per_seed if m[variant.name][key] is not None]
            if values:
                row[key] = {
                    "mean": statistics.fmean(values), "min": min(values), "max": max(values),
                    "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                }
        row["llava_plan_flops_saved"] = planned_saving(variant)
        if correct["baseline"].any():  # else retention is undefined, left out (a smoke run may score 0%)
            point, low, high = retention_interval(correct[variant.name], correct["baseline"], resamples,
                                                  pairs=pairs)
            row["pooled_retention"] = {"point": point, "ci95": [low, high], "equivalence": equivalence(low, high)}
            if pairs > 1:
                row["per_pair_retention"] = [
                    float(v.mean() / b.mean()) if b.any() else None
                    for v, b in zip(np.split(correct[variant.name], pairs), np.split(correct["baseline"], pairs))]
            if chance is not None and correct["baseline"].mean() > chance.mean():
                point, low, high = retention_interval(correct[variant.name], correct["baseline"], resamples,
                                                      chance=chance, pairs=pairs)
                row["chance_adjusted_retention"] = {"point": point, "ci95": [low, high]}
        rows.append(row)
    return rows


def planned_saving(variant: Variant) -> float | None:
    """The whole-run training FLOPs `sts-plan` predicts the variant's two stages save on LLaVA-1.5-7B (its recipe:
    558K alignment and 665K instruction samples); None for the control, which skips a stage."""
    if variant.stage1 == "skipped" or variant.budget_of or not LLAVA_CONFIG.exists():
        return None
    from .plan import PlanArguments, price_run

    recipe = {"alignment": STAGE1[variant.stage1] or {"sts_vtc": "off"},
              "instruction": {"sts_lds": "off"} if STAGE2[variant.stage2] is None else STAGE2[variant.stage2]}
    return price_run(PlanArguments(model_config=str(LLAVA_CONFIG)), recipe)["run"]["saving"]


def token_profile(exp: ExperimentArguments, foundation: dict, references: list[dict], processor) -> dict:
    """The share of visual tokens in what the language model reads in alignment, and alignment's share of the run's
    training FLOPs, here and for LLaVA-1.5-7B (`sts-plan`'s recipe)."""
    with open(os.path.join(exp.output_dir, "seed0", "data", "train_s0_alignment.json")) as f:
        records = json.load(f)
    text = [
        len(processor.tokenizer(
            processor.apply_chat_template(to_messages(r["conversations"]), chat_template=PLAIN_TEMPLATE,
                                          tokenize=False).replace(IMAGE_TOKEN, ""),
            add_special_tokens=False)["input_ids"])
        for r in records[:500]
    ]
    visual = foundation["visual_tokens"]
    mean_text = statistics.fmean(text)
    profile = {
        "testbed": {
            "visual_tokens_per_image": visual, "alignment_text_tokens_per_sample": mean_text,
            "alignment_visual_share": visual / (visual + mean_text),
            "alignment_flops_share": None if references[0]["stage1_share"] is None
            else statistics.fmean(r["stage1_share"] for r in references),
        }
    }
    if LLAVA_CONFIG.exists():
        from .plan import PlanArguments, plan

        args = PlanArguments(model_config=str(LLAVA_CONFIG))
        report = plan(args)
        llava_visual = report["visual_tokens_per_image"]
        profile["llava-1.5-7b"] = {
            "visual_tokens_per_image": llava_visual,
            "alignment_text_tokens_per_sample": args.alignment_text_tokens_per_sample,
            "alignment_visual_share": llava_visual / (llava_visual + args.alignment_text_tokens_per_sample),
            "alignment_flops_share": report["stages"]["alignment"]["dense_flops"]["total"]
            / report["run"]["dense_flops"]["total"],
        }
    return profile


def _pct(v: float, spec: str = ".1f") -> str:
    return format(100 * v, spec)


def markdown(rows: list[dict], profile: dict, exp: ExperimentArguments, foundation: dict, machine: str) -> str:
    def spread(row, key, scale=100.0, spec=".1f"):
        if key not in row:
            return ""
        v = row[key]
        if exp.seeds * exp.foundation_seeds == 1:
            return format(scale * v["mean"], spec)
        return f"{scale * v['mean']:{spec}} ({scale * v['min']:{spec}}-{scale * v['max']:{spec}})"

    def mean(row, key):
        return _pct(row[key]["mean"]) if key in row else ""

    def retention(row):
        if "pooled_retention" not in row:
            return ""
        r = row["pooled_retention"]
        return f"{_pct(r['point'])} [{_pct(r['ci95'][0])}, {_pct(r['ci95'][1])}]"

    regime = exp.regime(foundation["lm_layers"])
    lines = [
        "Summary (retention pooled over seeds, crossed bootstrap 95% interval over seeds and questions; FLOPs saved: "
        "the variant's two stages priced on LLaVA-1.5-7B by sts-plan):",
        "",
        SUMMARY_HEADER,
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        if "pooled_retention" in row:
            r, planned = row["pooled_retention"], row.get("llava_plan_flops_saved")
            name = SUMMARY_NAMES.get(row["variant"], row["variant"])
            lines.append(f"| {name} | {regime} | {_pct(r['point'])} | {_pct(r['ci95'][0])} | "
                         f"{_pct(r['ci95'][1])} | {'' if planned is None else _pct(planned)} |")
    lines += [
        "",
        "Against 100% (within 1 point: the 95% interval's lower bound is at least 99%) and above chance (accuracy "
        "above a uniform guess among each category's answers, over the baseline's):",
        "",
        "| variant | retention vs 100% | chance-adjusted retention [95% CI] |",
        "|---|---|---:|",
    ]
    for row in rows:
        if "pooled_retention" in row:
            adjusted = row.get("chance_adjusted_retention")
            cell = "" if adjusted is None else (f"{_pct(adjusted['point'])} [{_pct(adjusted['ci95'][0])}, "
                                                f"{_pct(adjusted['ci95'][1])}]")
            lines.append(f"| {row['variant']} | {row['pooled_retention']['equivalence']} | {cell} |")
    if exp.foundation_seeds > 1:
        pairs = range(exp.foundation_seeds)
        lines += [
            "",
            f"Per foundation pair (pretraining seed; retention pooled over that pair's {exp.seeds} seed(s)):",
            "",
            "| variant | " + " | ".join(f"pair {p}" for p in pairs) + " |",
            "|---|" + "---:|" * exp.foundation_seeds,
        ]
        for row in rows:
            if "per_pair_retention" in row:
                lines.append(f"| {row['variant']} | "
                             + " | ".join("" if v is None else _pct(v) for v in row["per_pair_retention"]) + " |")
    headers = [*CATEGORIES, "overall", "retention [95% CI]", "FLOPs saved", "wall-clock saved"]
    lines += [
        "",
        f"Machine: {machine}. Recipe: {exp.seeds} seed(s)"
        + (f" on each of {exp.foundation_seeds} foundation pairs (pretraining seeds)" if exp.foundation_seeds > 1
           else "")
        + f"; {exp.scaled('train_samples')} training scenes per stage "
        f"and seed; {exp.scaled('alignment_steps')} alignment + {exp.scaled('instruction_steps')} instruction steps "
        f"of batch {exp.batch_size}; a "
        f"{foundation['lm_layers']}-layer, {foundation['lm_hidden_size']}-wide pretrained language model; "
        f"{foundation['visual_tokens']} visual tokens per image; {exp.test_samples} held-out questions. "
        "Numbers in %. Categories: mean over seeds; overall, FLOPs and wall-clock saved: mean over seeds (min-max); "
        "retention: pooled over seeds, with its crossed bootstrap 95% interval over "
        + ("foundation pairs, seeds within them" if exp.foundation_seeds > 1 else "seeds")
        + " and questions. FLOPs and "
        "wall-clock saved cover the whole run (both stages) against the baseline.",
        "",
        "| variant | " + " | ".join(headers) + " |",
        "|---|" + "---:|" * len(headers),
    ]
    for row in rows:
        cells = [*(mean(row, c) for c in CATEGORIES), spread(row, "overall"), retention(row),
                 spread(row, "flops_saved"), spread(row, "wall_clock_saved")]
        lines.append(f"| {row['variant']} | " + " | ".join(cells) + " |")
    share = profile["testbed"]["alignment_flops_share"]
    lines += [
        "",
        "Per stage" + ("" if share is None else f" (stage 1 is {100 * share:.1f}% of the baseline's training FLOPs)")
        + ":",
        "",
        "| variant | stage 1 | stage 2 | stage-1 FLOPs saved | stage-2 FLOPs saved | training time (s) "
        "| LLaVA-1.5-7B FLOPs saved (sts-plan) |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        planned = row.get("llava_plan_flops_saved")
        lines.append(
            f"| {row['variant']} | {row['stage1']} | {row['stage2']} | {spread(row, 'stage1_flops_saved')} "
            f"| {spread(row, 'stage2_flops_saved')} | {spread(row, 'train_seconds', 1.0, '.0f')} "
            f"| {'' if planned is None else _pct(planned)} |"
        )
    lines += ["", "Token profile:", "", "| | visual tokens per image | text tokens per alignment sample | visual "
              "share of alignment tokens | alignment share of training FLOPs |", "|---|---:|---:|---:|---:|"]
    for name, p in profile.items():
        lines.append(f"| {name} | {p['visual_tokens_per_image']} | {p['alignment_text_tokens_per_sample']:.1f} | "
                     f"{_pct(p['alignment_visual_share'])} | "
                     f"{'' if p['alignment_flops_share'] is None else _pct(p['alignment_flops_share'])} |")
    return "\n".join(lines)


def write_results(folder: str, name: str, data: dict, table: str) -> None:
    """`<folder>/<name>.json` (the data) and `<folder>/<name>.md` (the table), and the table on the screen."""
    with open(os.path.join(folder, f"{name}.json"), "w") as f:
        json.dump(data, f, indent=1)
    with open(os.path.join(folder, f"{name}.md"), "w") as f:
        f.write(table + "\n")
    print("\n" + table)


def machine_description() -> str:
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def _check_folder(exp: ExperimentArguments) -> None:
    """Refuse to mix runs made with other arguments into this folder's results. An argument the folder's file does not
    name (one added to the experiment since) counts as at its default."""
    path = os.path.join(exp.output_dir, "experiment.json")
    before = _done(path)
    defaults = ExperimentArguments().defining()
    if before is not None:
        before = {**{k: v for k, v in defaults.items() if k not in before}, **before}
    if before is not None and before != exp.defining():
        changed = sorted(k for k in set(before) | set(exp.defining()) if before.get(k) != exp.defining().get(k))
        raise ValueError(f"{exp.output_dir} holds runs made with other arguments ({', '.join(changed)} differ): "
                         "give a new --output_dir, or the same arguments to resume.")
    os.makedirs(exp.output_dir, exist_ok=True)
    with open(path, "w") as f:
        json.dump(exp.defining(), f, indent=1)


def main(argv: list[str] | None = None) -> dict:
    (exp,) = HfArgumentParser(ExperimentArguments).parse_args_into_dataclasses(argv)
    if exp.quick:
        exp = replace(exp, **QUICK)
    _check_folder(exp)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    hf_logging.set_verbosity_error()
    start = time.perf_counter()
    recipe = QUICK_RECIPE if exp.quick else EXPERIMENT_RECIPES[exp.foundation]
    # one held-out set for every pair, seed and variant: the test split never shares a scene with a training split
    test = write_dataset(os.path.join(exp.output_dir, "test"), exp.test_samples, "test", 0, "instruction",
                         recipe.image_size)
    per_seed, references, raw, reports = [], [], {}, []
    correct = {name: [] for name in exp.chosen()}
    for pair in range(exp.foundation_seeds):  # pair-major, as `aggregate` reads the rows
        pair_recipe = replace(recipe, seed=recipe.seed + pair)
        pair_foundation = build_foundation(pair_recipe, exp.foundation_cache) | asdict(pair_recipe) | {
            "visual_tokens": pair_recipe.visual_tokens}
        if pair == 0:
            foundation = pair_foundation  # pair 0's describes the testbed
        print(f"Foundation models{f' of pair {pair}' if exp.foundation_seeds > 1 else ''} (recipe "
              f"{pair_recipe.key()}): {os.path.dirname(pair_foundation['report'])}", flush=True)
        with open(pair_foundation["report"]) as f:
            reports.append(json.load(f))
        for seed in range(exp.seeds):
            results = run_seed(exp, seed, pair_foundation, test, pair)
            metrics, reference = seed_metrics(results)
            per_seed.append(metrics)
            references.append(reference)
            raw[run_key(pair, seed)] = results
            for name, r in results.items():
                correct[name].append(r["correct"])
            print(f"{run_name(pair, seed)} done after {time.perf_counter() - start:.0f} s: "
                  + ", ".join(f"{name} {100 * m['overall']:.1f}%" for name, m in metrics.items()), flush=True)
    rows = aggregate(per_seed, {k: np.array(v, dtype=float) for k, v in correct.items()}, exp.bootstrap,
                     chance_per_question(read_questions(test["questions_path"])), exp.foundation_seeds)
    processor = AutoProcessor.from_pretrained(foundation["processor"])
    profile = token_profile(exp, foundation, references, processor)
    machine = machine_description()
    table = markdown(rows, profile, exp, foundation, machine)
    output = {
        "arguments": asdict(exp), "regime": exp.regime(foundation["lm_layers"]), "foundation": reports[0],
        "foundation_pairs": reports,
        "machine": machine,
        "seconds": time.perf_counter() - start, "rows": rows, "per_seed": per_seed, "references": references,
        "token_profile": profile, "runs": raw,
    }
    write_results(exp.output_dir, "accuracy", output, table)
    return output


if __name__ == "__main__":
    main()
