"""Benchmark: STS against plain training and against the best any implementation could do, side by side.

    python -m sts_trainer.lab.bench                      # about 15 minutes on 2 CPU cores
    python -m sts_trainer.lab.bench --quick              # a smoke run (seconds; numbers meaningless)
    python -m sts_trainer.lab.bench --profile llava-1.5-7b   # LLaVA-1.5-7B's real shapes on one GPU (gpu_bench.py)

Every configuration trains the same CPU-sized LLaVA (a small vision tower, a language model that dominates the cost)
for a few optimizer steps with `Trainer` or `STSTrainer`; all configurations run in one process, interleaved in
alternating order over several rounds, one thread, warm-up steps dropped. Per configuration and round the median step
time is taken; a row's speedup is the median over rounds of (baseline median / its median), so drift between rounds
cancels.

Beside each STS row stands its oracle, plain `Trainer` on a model and data that natively have only what STS kept:
- VTC keep ratio r: images of a smaller size giving a square grid of about r * n visual tokens (the vision tower runs
  on the smaller image too, so the oracle is slightly better than anything that must encode the full image);
- LDS: a model with only the decoder layers that ran. STS runs a different number of layers each step, so oracle models
  of every depth are timed, and each STS step is compared with the oracle of the depth it actually ran;
- VTC + LDS composed in instruction tuning (the beyond-the-paper step): both at once, oracle models of every depth on
  the smaller image, each step against the depth it ran ('uniform', 'pool' and 'diverse' side by side: the
  differences are the costs of pooling and of the diverse selection, also timed on their own below the table).
Efficiency = oracle time / STS time (1.0: STS costs nothing beyond the work it keeps); the work-adjusted efficiency
divides out the FLOPs difference between a VTC row and its oracle (which encodes a smaller image).

Columns: median step time (ms); measured speedup over the stage's plain `Trainer`; the oracle's speedup; the speedup
the analytic FLOPs predict (`flops.micro_batch_flops`); efficiency; and peak memory: `torch.cuda.max_memory_allocated`
on a GPU, otherwise the bytes of activations saved for backward in one step (what STS shrinks; parameters excluded).
"""

import argparse
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field, replace

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging as hf_logging

from ..arguments import STSTrainingArguments
from ..flops import micro_batch_flops
from ..token_compression import diverse_indices, num_kept, pool_features, uniform_indices
from ..trainer import STSTrainer
from .tiny import collate, freeze_for_alignment, synthetic_samples, tiny_llava, tiny_llava_config
from .timing import StepTimer


@dataclass
class Setup:
    """The benchmark model and data sizes."""

    hidden_size: int = 256
    num_layers: int = 8
    patch_size: int = 4
    image_size: int = 96  # 24 x 24 = 576 visual tokens, as LLaVA-1.5
    prompt_length: int = 24
    batch_size: int = 2
    steps: int = 6
    warmup: int = 2
    rounds: int = 5


QUICK = Setup(hidden_size=64, num_layers=4, patch_size=8, image_size=48, prompt_length=8, steps=3, warmup=1, rounds=2)


@dataclass
class Config:
    name: str
    stage: str  # 'alignment' or 'instruction'
    sts: dict | None  # STSTrainer options; None: plain Trainer
    image_size: int
    num_layers: int
    oracle_of: str | None = None  # the row this one is the oracle of; 'LDS' / 'VTC+LDS': a depth oracle of that group
    depth_oracles: str = "LDS"  # a row with LDS: the group of depth oracles its steps are compared with
    times: list[list[float]] = field(default_factory=list)  # per round, per measured step
    executed: list[list[int]] = field(default_factory=list)  # LDS: per round, layers run per measured step
    flops: tuple[float, float] | None = None  # (dense, actual) per step, mean over the measured steps
    memory: float | None = None


def _model(setup: Setup, config: Config):
    model = tiny_llava(
        seed=0, num_layers=config.num_layers, hidden_size=setup.hidden_size,
        image_size=config.image_size, patch_size=setup.patch_size, vocab_size=512,
    )
    return freeze_for_alignment(model) if config.stage == "alignment" else model


def _trainer(setup: Setup, config: Config, out_dir: str, callbacks) -> Trainer:
    model = _model(setup, config)
    model_config = model.config
    samples = synthetic_samples(
        setup.batch_size * (setup.steps + setup.warmup), model_config, (1,), prompt_length=setup.prompt_length
    )
    common = dict(
        output_dir=out_dir, per_device_train_batch_size=setup.batch_size, max_steps=setup.warmup + setup.steps,
        learning_rate=1e-4, logging_steps=10_000, save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )
    if config.sts is None:
        args, cls = TrainingArguments(**common), Trainer
    else:
        args, cls = STSTrainingArguments(**common, **config.sts), STSTrainer
    return cls(model=model, args=args, train_dataset=samples, data_collator=collate, callbacks=callbacks)


def _run(setup: Setup, config: Config, out_dir: str) -> None:
    timer = StepTimer()
    trainer = _trainer(setup, config, out_dir, [timer])
    trainer.train()
    config.times.append(timer.times[setup.warmup :])
    if isinstance(trainer, STSTrainer) and trainer.sts_ledger is not None:
        records = trainer.sts_ledger.records[setup.warmup :]
        if config.sts.get("sts_stage") == "instruction":
            config.executed.append([round(config.num_layers * (1 - r.skipped_fraction)) for r in records])
        config.flops = (statistics.mean(r.dense_flops for r in records), statistics.mean(r.actual_flops for r in records))


def _plain_flops(setup: Setup, config: Config) -> float:
    model_config = tiny_llava_config(
        num_layers=config.num_layers, hidden_size=setup.hidden_size, image_size=config.image_size,
        patch_size=setup.patch_size, vocab_size=512,
    )
    tokens = (config.image_size // setup.patch_size) ** 2
    length = setup.prompt_length + 2 + tokens + 4  # prompts are prompt_length + (i % 3) tokens, padded to the longest
    train_llm = config.stage == "instruction"
    return micro_batch_flops(
        model_config, setup.batch_size, length, setup.batch_size,
        train_vision=train_llm, train_projector=True, train_llm=train_llm,
    )


def _saved_activation_bytes(setup: Setup, config: Config, out_dir: str) -> float:
    """Peak memory: CUDA's peak allocation on a GPU, else the activations saved for backward in one step."""
    trainer = _trainer(setup, config, out_dir, [])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        trainer.train()
        return float(torch.cuda.max_memory_allocated())
    parameters = {p.data_ptr() for p in trainer.model.parameters()}
    seen, sizes = set(), []

    def pack(tensor):
        key = (tensor.data_ptr(), tensor.shape)
        if tensor.data_ptr() not in parameters and key not in seen:
            seen.add(key)
            sizes[-1] += tensor.numel() * tensor.element_size()
        return tensor

    class Measure(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            seen.clear()
            sizes.append(0)
            self.context = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
            self.context.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            self.context.__exit__(None, None, None)

    trainer.add_callback(Measure())
    trainer.train()
    return float(max(sizes))


def build_configs(setup: Setup) -> list[Config]:
    n = (setup.image_size // setup.patch_size) ** 2
    L = setup.num_layers
    configs = [
        Config("alignment: Trainer", "alignment", None, setup.image_size, L),
        Config("alignment: STSTrainer, sparsity off", "alignment", {"sts_stage": "none"}, setup.image_size, L),
    ]
    for ratio in (0.5, 0.25):
        kept = num_kept(n, ratio)
        side = round(math.sqrt(kept))  # the nearest square grid a native image can give
        name = f"alignment: VTC keep {ratio}"
        configs.append(Config(name, "alignment", {"sts_stage": "alignment", "vtc_keep_ratio": ratio}, setup.image_size, L))
        configs.append(Config(f"  oracle: {side * side} native visual tokens", "alignment", None, side * setup.patch_size, L, oracle_of=name))
    configs += [
        Config("instruction: Trainer", "instruction", None, setup.image_size, L),
        Config("instruction: STSTrainer, sparsity off", "instruction", {"sts_stage": "none"}, setup.image_size, L),
    ]
    for rate in (0.25, 0.5):
        options = {"sts_stage": "instruction", "lds_alpha": rate, "lds_epsilon": 0.0, "lds_schedule": "constant"}
        configs.append(Config(f"instruction: LDS fixed rate {rate}", "instruction", options, setup.image_size, L))
    configs.append(Config("instruction: LDS paper schedule (0.5, 0.5)", "instruction", {"sts_stage": "instruction"}, setup.image_size, L))
    for depth in range(1, L + 1):
        configs.append(Config(f"  oracle: {depth} layers", "instruction", None, setup.image_size, depth, oracle_of="LDS"))
    ratio = COMPOSED_KEEP_RATIO
    side = round(math.sqrt(num_kept(n, ratio)))
    for strategy in ("uniform", "pool", "diverse"):
        options = {"sts_stage": "instruction", "sts_vtc": "on", "vtc_keep_ratio": ratio, "vtc_strategy": strategy,
                   "lds_alpha": 0.5, "lds_epsilon": 0.0, "lds_schedule": "constant"}
        configs.append(Config(f"instruction: VTC {strategy} keep {ratio} + LDS fixed rate 0.5", "instruction",
                              options, setup.image_size, L, depth_oracles="VTC+LDS"))
    for depth in range(1, L + 1):
        configs.append(Config(f"  oracle: {side * side} native visual tokens, {depth} layers", "instruction", None,
                              side * setup.patch_size, depth, oracle_of="VTC+LDS"))
    return configs


COMPOSED_KEEP_RATIO = 0.25


def selection_cost(setup: Setup, repeats: int = 20) -> dict:
    """Median time of choosing one step's visual tokens (the benchmark's batch of images, its visual tokens, its
    projector width) with `diverse_indices` and with `uniform_indices` on the image's square grid, and of pooling
    them (`pool_features`, on top of the uniform selection), in ms."""
    n = (setup.image_size // setup.patch_size) ** 2
    k = num_kept(n, COMPOSED_KEEP_RATIO)
    side = setup.image_size // setup.patch_size
    features = [torch.randn(n, setup.hidden_size, generator=torch.Generator().manual_seed(i)) for i in range(setup.batch_size)]
    timings = {}
    for name, select in (("diverse", lambda: diverse_indices(features, [k] * len(features))),
                         ("uniform", lambda: [uniform_indices(n, k, (side, side)) for _ in features]),
                         ("pool", lambda: [pool_features(f, k, (side, side)) for f in features])):
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            select()
            runs.append(1000 * (time.perf_counter() - start))
        timings[f"{name}_ms"] = statistics.median(runs)
    return {"images": setup.batch_size, "visual_tokens": n, "kept": k, **timings}


def _ratios(numerator: Config, denominator: Config) -> list[float]:
    """Per round: median step time of numerator / median step time of denominator."""
    return [statistics.median(a) / statistics.median(b) for a, b in zip(numerator.times, denominator.times)]


def _median_ratio(numerator: Config, denominator: Config) -> float:
    return statistics.median(_ratios(numerator, denominator))


def summarize(setup: Setup, configs: list[Config]) -> list[dict]:
    by_name = {c.name: c for c in configs}
    depth_oracles = {group: {c.num_layers: c for c in configs if c.oracle_of == group} for group in ("LDS", "VTC+LDS")}
    rows = []
    for config in configs:
        if config.oracle_of in depth_oracles:
            continue
        baseline = by_name[f"{config.stage}: Trainer"]
        row = {
            "configuration": config.name,
            "step_ms": 1000 * statistics.median(t for run in config.times for t in run),
            "speedup": 1 / _median_ratio(config, baseline),
            "speedup_range": [1 / max(_ratios(config, baseline)), 1 / min(_ratios(config, baseline))],
            "memory_mb": config.memory / 2**20 if config.memory is not None else None,
        }
        dense = _plain_flops(setup, baseline)
        if config.oracle_of is None and config.sts and config.flops:
            row["flops_speedup"] = config.flops[0] / config.flops[1]
        elif config.oracle_of:
            row["flops_speedup"] = dense / _plain_flops(setup, config)
        if config.executed:  # LDS: each measured step against the oracle of the depth it ran
            ratios = []
            for r, (times, executed) in enumerate(zip(config.times, config.executed)):
                group = depth_oracles[config.depth_oracles]
                oracle = sum(statistics.median(group[e].times[r]) if e else 0.0 for e in executed)
                base = statistics.median(baseline.times[r]) * len(times)
                ratios.append((base / oracle if oracle else float("nan"), oracle / sum(times)))
            row["oracle_speedup"] = statistics.median(r[0] for r in ratios)
            row["efficiency"] = statistics.median(r[1] for r in ratios)
            row["mean_layers_run"] = statistics.mean(e for run in config.executed for e in run)
            row["composed"] = config.depth_oracles == "VTC+LDS"
        rows.append(row)
    # VTC rows: their oracle is the next row
    for i, row in enumerate(rows):
        if row["configuration"].startswith("  oracle") and i > 0:
            sts_row = rows[i - 1]
            sts_row["oracle_speedup"] = row["speedup"]
            sts_row["efficiency"] = _median_ratio(by_name[row["configuration"]], by_name[sts_row["configuration"]])
    return add_work_adjusted_efficiency(rows)


def add_work_adjusted_efficiency(rows: list[dict]) -> list[dict]:
    """Efficiency per unit of work: (oracle time / oracle FLOPs) / (STS time / STS FLOPs).

    A VTC oracle also encodes a smaller image and projects fewer tokens, work that any implementation compressing
    after the projector must still do; this column takes that out. LDS oracles run exactly STS's work, so there it
    equals the efficiency. A composed row's oracles both encode the smaller image and vary in depth step by step;
    it has no work-adjusted figure (its plain efficiency is a lower bound).
    """
    for i, row in enumerate(rows):
        if "efficiency" not in row or row.get("composed"):
            continue
        oracle = rows[i + 1] if i + 1 < len(rows) and rows[i + 1]["configuration"].startswith("  oracle") else None
        if oracle is not None:
            row["work_adjusted_efficiency"] = row["efficiency"] * oracle["flops_speedup"] / row["flops_speedup"]
        else:
            row["work_adjusted_efficiency"] = row["efficiency"]
    return rows


def markdown(rows: list[dict], setup: Setup, machine: str, selection: dict | None = None) -> str:
    def fmt(value, spec):
        return "" if value is None else format(value, spec)

    lines = [
        f"Machine: {machine}. Model: LLaVA with a {setup.num_layers}-layer, {setup.hidden_size}-wide language model, "
        f"{(setup.image_size // setup.patch_size) ** 2} visual tokens per image, batch {setup.batch_size}; "
        f"{setup.rounds} rounds x {setup.steps} steps (after {setup.warmup} warm-up).",
        "",
        "| configuration | step (ms) | speedup (range over rounds) | oracle speedup | FLOPs-predicted | efficiency "
        "| work-adjusted efficiency | memory (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['configuration'].strip()} | {r['step_ms']:.1f} | {r['speedup']:.3f} "
            f"({r['speedup_range'][0]:.2f}-{r['speedup_range'][1]:.2f}) | {fmt(r.get('oracle_speedup'), '.3f')} "
            f"| {fmt(r.get('flops_speedup'), '.3f')} | {fmt(r.get('efficiency'), '.3f')} "
            f"| {fmt(r.get('work_adjusted_efficiency'), '.3f')} | {fmt(r.get('memory_mb'), '.1f')} |"
        )
    if selection is not None:
        lines += ["", f"Token selection of one step ({selection['images']} images, {selection['kept']} of "
                  f"{selection['visual_tokens']} tokens each): diverse {selection['diverse_ms']:.2f} ms, uniform "
                  f"{selection['uniform_ms']:.2f} ms, pool {selection['pool_ms']:.2f} ms (medians)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_results", help="directory for bench.json and bench.md")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of all configurations (default 5)")
    parser.add_argument("--steps", type=int, default=None, help="measured steps per run (default 8)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run; the numbers mean nothing")
    parser.add_argument("--from_json", default=None, help="only re-render the table of a saved bench.json")
    parser.add_argument("--profile", default=None,
                        help="a real model's layer shapes (llava-1.5-7b), on one GPU (sts_trainer/lab/gpu_bench.py): "
                             "writes bench-gpu.json and bench-gpu.md")
    parser.add_argument("--reduced", action="store_true",
                        help="with --profile: the same rows at a width a CPU runs in seconds (numbers meaningless)")
    parser.add_argument("--llm_layers", type=int, default=None,
                        help="with --profile: decoder layers of the language model (default: the profile's)")
    cli = parser.parse_args(argv)
    if cli.profile:
        from . import gpu_bench  # a GPU-only module, imported when asked for

        if cli.profile not in gpu_bench.PROFILES:
            parser.error(f"--profile {cli.profile!r}: choose one of {', '.join(gpu_bench.PROFILES)}.")
        profile = gpu_bench.PROFILES[cli.profile]
        profile = gpu_bench.reduced(profile) if cli.reduced else profile
        overrides = {k: v for k, v in (("llm_layers", cli.llm_layers), ("rounds", cli.rounds), ("steps", cli.steps))
                     if v}
        hf_logging.set_verbosity_error()
        return gpu_bench.main(replace(profile, **overrides), cli.out)
    if cli.from_json:
        saved = json.load(open(cli.from_json))
        rows = add_work_adjusted_efficiency(saved["rows"])
        print(markdown(rows, Setup(**saved["setup"]), saved["machine"], saved.get("selection")))
        return rows
    setup = QUICK if cli.quick else Setup()
    if cli.rounds:
        setup.rounds = cli.rounds
    if cli.steps:
        setup.steps = cli.steps
    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    os.makedirs(cli.out, exist_ok=True)
    scratch = os.path.join(cli.out, "scratch")

    configs = build_configs(setup)
    for config in configs:
        config.memory = _saved_activation_bytes(setup, config, scratch)
    for r in range(setup.rounds):
        order = configs if r % 2 == 0 else configs[::-1]
        start = time.perf_counter()
        for config in order:
            _run(setup, config, scratch)
        print(f"round {r + 1}/{setup.rounds}: {time.perf_counter() - start:.0f} s", flush=True)

    rows = summarize(setup, configs)
    selection = selection_cost(setup)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, 1 thread"
    if torch.cuda.is_available():
        machine = f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    table = markdown(rows, setup, machine, selection)
    with open(os.path.join(cli.out, "bench.json"), "w") as f:
        json.dump({"setup": vars(setup), "machine": machine, "rows": rows, "selection": selection}, f, indent=1)
    with open(os.path.join(cli.out, "bench.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    return rows


if __name__ == "__main__":
    main()
