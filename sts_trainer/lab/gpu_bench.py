"""The benchmark at a real model's layer shapes: what STS saves on a GPU at LLaVA-1.5-7B's sizes.

    python -m sts_trainer.lab.bench --profile llava-1.5-7b --out DIR        # one GPU: about 5 minutes (H100 / H200)
    bash scripts/gpu_bench.sh                                              # the same in one device call, see README
    python -m sts_trainer.lab.bench --profile llava-1.5-7b --reduced       # the same code path on a CPU, in seconds

LLaVA-1.5-7B's layer shapes with random weights: CLIP ViT-L/14 at 336 px (24 layers, 1024 wide, 576 visual tokens,
features from the second-to-last layer as LLaVA takes them), the two-layer GELU MLP projector, and LLaMA-7B decoder
layers (4096 wide, 11008 MLP, 32 heads, vocabulary 32000), only `llm_layers` of them (LLaMA-7B has 32; fewer fit one
GPU's memory and the call's time with the optimizer state of instruction tuning: the FLOPs, the oracles and every
ratio use the same count). bf16 weights, PyTorch's SDPA attention (flash attention on Hopper), fused AdamW.
Batches as LLaVA-1.5's per-device batch sizes on 8 GPUs: alignment 32 images with a caption of about 40 tokens
(576 + ~40 tokens each); instruction tuning 16 samples with one image each, all of a step's samples of one text
length (as LLaVA's length-grouped sampler makes them alike), the steps' lengths from `INSTRUCTION_TEXT_TOKENS`: an
approximation of LLaVA-665K's length profile written here (not measured from the data set, which cannot be
downloaded here), from short VQA-style turns to long conversations; the measured steps average about 1,100 tokens.

Rows, as the CPU benchmark's (`sts_trainer.lab.bench`): `Trainer`; `STSTrainer` with sparsity off; VTC 0.5 and 0.25
in alignment, each beside its oracle (plain `Trainer` on images whose native grid has about as many tokens as VTC
keeps); LDS in instruction tuning at a fixed rate of 0.5 and at the paper's stage-mean rate (1/6, depth slope 0.5),
each step against the oracle of the depth it ran (a model of only that many layers); the composed `sts_plus` step
(VTC uniform 0.15, one step in ten with every token, LDS at the stage-mean rate), against depth oracles on the
smaller image (on the full image for its full-token steps). Oracle depths are timed at 1, L/2 and L layers and
interpolated linearly in between (every decoder layer has the same shape; the fit's error at L/2 is reported).

Per row: median step time, measured speedup over the stage's `Trainer`, the speedup the analytic FLOPs predict
(`flops.micro_batch_flops`, the same layer count), efficiency (oracle time / STS time), the wall-clock saving as a
fraction of the FLOPs-predicted saving, peak GPU memory (`torch.cuda.max_memory_allocated`), and MFU: the step's
actual FLOPs per second over the device's bf16 peak (`--peak_tflops`; datasheet H100/H200 SXM dense bf16: 989) and
over the bf16 matrix-product rate measured on the device at the start (8192^3), which is what the hardware gives.
"""

import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field, replace

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Trainer,
    TrainingArguments,
)

from ..arguments import STSTrainingArguments
from ..flops import micro_batch_flops
from ..presets import PRESETS
from ..token_compression import num_kept
from ..trainer import STSTrainer
from .timing import StepTimer
from .tiny import collate, freeze_for_alignment

IMAGE_TOKEN_ID = 32000  # LLaVA-1.5's <image>, past LLaMA's 32000 text tokens
# Text tokens of each instruction-tuning step's samples, step by step (LLaVA-665K's profile, approximated; the first
# two are the warm-up's).
INSTRUCTION_TEXT_TOKENS = (120, 420, 80, 260, 760, 1100)


@dataclass
class Profile:
    """A real model's shapes and its recipe's batches."""

    name: str = "llava-1.5-7b"
    vision_layers: int = 24
    vision_hidden: int = 1024
    vision_intermediate: int = 4096
    vision_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    llm_layers: int = 8
    llm_hidden: int = 4096
    llm_intermediate: int = 11008
    llm_heads: int = 32
    vocab_size: int = 32064
    alignment_batch: int = 32
    alignment_text: int = 40
    instruction_batch: int = 16
    steps: int = 4
    warmup: int = 2
    rounds: int = 2
    peak_tflops: float = 989.0
    instruction_text: tuple[int, ...] = INSTRUCTION_TEXT_TOKENS

    @property
    def visual_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


PROFILES = {"llava-1.5-7b": Profile()}


def reduced(profile: Profile) -> Profile:
    """The profile at a width a CPU trains in milliseconds (same token counts and code path; numbers meaningless)."""
    return replace(profile, vision_layers=2, vision_hidden=32, vision_intermediate=64, vision_heads=2, llm_layers=4,
                   llm_hidden=32, llm_intermediate=64, llm_heads=2, alignment_batch=2, instruction_batch=2, steps=2,
                   warmup=1, rounds=1, instruction_text=(40, 120, 60), name=profile.name + " (reduced)")


def model_config(profile: Profile, layers: int | None = None, image_size: int | None = None) -> LlavaConfig:
    image_size = image_size or profile.image_size
    vision = CLIPVisionConfig(
        hidden_size=profile.vision_hidden, intermediate_size=profile.vision_intermediate,
        num_hidden_layers=profile.vision_layers, num_attention_heads=profile.vision_heads, image_size=image_size,
        patch_size=profile.patch_size, projection_dim=768, hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        hidden_size=profile.llm_hidden, intermediate_size=profile.llm_intermediate,
        num_hidden_layers=layers or profile.llm_layers, num_attention_heads=profile.llm_heads,
        num_key_value_heads=profile.llm_heads, vocab_size=profile.vocab_size, max_position_embeddings=4096,
        pad_token_id=0,
    )
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
                       image_seq_length=(image_size // profile.patch_size) ** 2, vision_feature_layer=-2,
                       vision_feature_select_strategy="default", projector_hidden_act="gelu")


def build_model(profile: Profile, stage: str, layers: int | None = None, image_size: int | None = None):
    """Random weights, built directly on the device in bf16 (CUDA) or fp32 (CPU), SDPA attention."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = model_config(profile, layers, image_size)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    return freeze_for_alignment(model) if stage == "alignment" else model


def samples(profile: Profile, stage: str, batch: int, image_size: int | None = None) -> list[dict]:
    """The samples of every step, in training order (sequential sampling): [prompt][image tokens][text], labels on
    the text after the prompt; an instruction-tuning step's samples all have that step's `instruction_text` length."""
    image_size = image_size or profile.image_size
    tokens = (image_size // profile.patch_size) ** 2
    vocab = min(profile.vocab_size, IMAGE_TOKEN_ID)
    generator = torch.Generator().manual_seed(0)
    out = []
    for step in range(profile.warmup + profile.steps):
        text = profile.alignment_text if stage == "alignment" else profile.instruction_text[
            step % len(profile.instruction_text)]
        prompt = min(12, text // 2)
        for _ in range(batch):
            ids = torch.randint(1, vocab, (text,), generator=generator)
            image = torch.full((tokens,), IMAGE_TOKEN_ID)
            out.append({
                "input_ids": torch.cat([ids[:prompt], image, ids[prompt:]]),
                "labels": torch.cat([torch.full((prompt + tokens,), -100), ids[prompt:]]),
                "pixel_values": torch.randn(1, 3, image_size, image_size, generator=generator),
            })
    return out


class GPUStepTimer(StepTimer):
    """`bench.StepTimer` (device-synchronised step times), with the peak-memory counter reset when the run starts."""

    def on_train_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()


@dataclass
class Row:
    name: str
    stage: str
    sts: dict | None
    layers: int
    image_size: int
    oracle_of: str | None = None  # the row this one is the oracle of, or 'full' / 'small': a depth oracle
    times: list[list[float]] = field(default_factory=list)
    executed: list[list[int]] = field(default_factory=list)  # LDS: layers run per measured step, per round
    full_tokens: list[list[bool]] = field(default_factory=list)  # VTC: full-token steps, per round
    actual_flops: list[float] | None = None  # STS: per measured step (the ledger's)
    memory: float = 0.0


def build_rows(profile: Profile) -> list[Row]:
    n, L, size = profile.visual_tokens, profile.llm_layers, profile.image_size

    def native(ratio):  # the image whose native square grid has about as many tokens as VTC keeps
        return round(math.sqrt(num_kept(n, ratio))) * profile.patch_size

    rows = [Row("alignment: Trainer", "alignment", None, L, size),
            Row("alignment: STSTrainer, sparsity off", "alignment", {"sts_stage": "none"}, L, size)]
    for ratio in (0.5, 0.25):
        name = f"alignment: VTC keep {ratio}"
        rows.append(Row(name, "alignment", {"sts_stage": "alignment", "vtc_keep_ratio": ratio}, L, size))
        side = native(ratio) // profile.patch_size
        rows.append(Row(f"  oracle: {side * side} native visual tokens", "alignment", None, L, native(ratio),
                        oracle_of=name))
    plus = PRESETS["sts_plus"]["instruction"]
    rows += [
        Row("instruction: Trainer", "instruction", None, L, size),
        Row("instruction: STSTrainer, sparsity off", "instruction", {"sts_stage": "none"}, L, size),
        Row("instruction: LDS fixed rate 0.5", "instruction",
            {"sts_stage": "instruction", "lds_alpha": 0.5, "lds_epsilon": 0.0, "lds_schedule": "constant"}, L, size),
        Row("instruction: LDS at the paper's stage-mean rate (1/6, slope 0.5)", "instruction",
            {"sts_stage": "instruction", "lds_alpha": 1 / 6, "lds_schedule": "constant"}, L, size),
        # sts_plus's VTC with LDS at the paper's stage-mean rate (its quadratic decay would be the first steps' only)
        Row(f"instruction: sts_plus (VTC uniform {plus['vtc_keep_ratio']} + full-token "
            f"{plus['vtc_full_token_fraction']}) + LDS at the stage-mean rate", "instruction",
            {"sts_stage": "instruction", "sts_preset": "sts_plus", "lds_alpha": 1 / 6, "lds_schedule": "constant"},
            L, size),
    ]
    depths = sorted({1, max(1, L // 2), L})
    for group, image in (("full", size), ("small", native(plus["vtc_keep_ratio"]))):
        for depth in depths:
            tokens = (image // profile.patch_size) ** 2
            rows.append(Row(f"  oracle: {depth} layers, {tokens} visual tokens", "instruction", None, depth, image,
                            oracle_of=group))
    return rows


def _args(profile: Profile, row: Row, out_dir: str, batch: int):
    common = dict(
        output_dir=out_dir, per_device_train_batch_size=batch, max_steps=profile.warmup + profile.steps,
        learning_rate=1e-5, logging_steps=10_000, save_strategy="no", report_to=[], disable_tqdm=True, seed=0,
        dataloader_num_workers=0, train_sampling_strategy="sequential", use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available(), optim="adamw_torch_fused" if torch.cuda.is_available() else "adamw_torch",
    )
    if row.sts is None:
        return TrainingArguments(**common), Trainer
    return STSTrainingArguments(**common, **row.sts), STSTrainer


def run_row(profile: Profile, row: Row, out_dir: str) -> None:
    batch = profile.alignment_batch if row.stage == "alignment" else profile.instruction_batch
    data = samples(profile, row.stage, batch, row.image_size)
    args, cls = _args(profile, row, out_dir, batch)
    timer = GPUStepTimer()
    model = build_model(profile, row.stage, row.layers, row.image_size)
    trainer = cls(model=model, args=args, train_dataset=data, data_collator=collate, callbacks=[timer])
    trainer.train()
    row.times.append(timer.times[profile.warmup :])
    if torch.cuda.is_available():
        row.memory = max(row.memory, float(torch.cuda.max_memory_allocated()))
    ledger = getattr(trainer, "sts_ledger", None)
    if ledger is not None and ledger.records:
        records = ledger.records[profile.warmup :]  # one micro-batch per step
        row.actual_flops = [r.actual_flops for r in records]
        if any(r.skipped_fraction is not None for r in records):
            row.executed.append([round(row.layers * (1 - r.skipped_fraction)) for r in records])
        row.full_tokens.append([bool(r.full_tokens) for r in records])
    del trainer, model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def dense_flops(profile: Profile, row: Row) -> list[float]:
    """Analytic FLOPs of each measured step of a row run densely (sequential batches: the same for every row)."""
    batch = profile.alignment_batch if row.stage == "alignment" else profile.instruction_batch
    data = samples(profile, row.stage, batch, row.image_size)
    config = model_config(profile, row.layers, row.image_size)
    trains = row.stage == "instruction"
    out = []
    for step in range(profile.warmup, profile.warmup + profile.steps):
        chunk = data[step * batch : (step + 1) * batch]
        images = sum("pixel_values" in s for s in chunk)
        length = max(len(s["input_ids"]) for s in chunk)
        out.append(micro_batch_flops(config, batch, length, images, train_vision=trains, train_projector=True,
                                     train_llm=trains))
    return out


def measured_matmul_tflops() -> float | None:
    """bf16 8192^3 matrix products per second on the device (mean of 10 after 3 warm-ups), in TFLOP/s."""
    if not torch.cuda.is_available():
        return None
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12


def _median_step(row: Row, r: int) -> float:
    return statistics.median(row.times[r])


def _oracle_time(group: dict[int, Row], r: int, depth: int) -> float:
    """A depth oracle's median step time in round r, interpolated linearly between the timed depths."""
    timed = sorted(group)
    if depth in group:
        return _median_step(group[depth], r)
    low = max(d for d in timed if d < depth)
    high = min(d for d in timed if d > depth)
    t_low, t_high = _median_step(group[low], r), _median_step(group[high], r)
    return t_low + (t_high - t_low) * (depth - low) / (high - low)


def summarize(profile: Profile, rows: list[Row], matmul_tflops: float | None) -> tuple[list[dict], dict]:
    by_name = {row.name: row for row in rows}
    oracles = {g: {row.layers: row for row in rows if row.oracle_of == g} for g in ("full", "small")}
    out = []
    for row in rows:
        if row.oracle_of in oracles:
            continue
        base = by_name[f"{row.stage}: Trainer"]
        ratios = [_median_step(base, r) / _median_step(row, r) for r in range(len(row.times))]
        dense = dense_flops(profile, by_name[f"{row.stage}: Trainer"])
        actual = row.actual_flops or dense_flops(profile, row)
        step = statistics.median(t for run in row.times for t in run)
        entry = {
            "configuration": row.name, "step_ms": 1000 * step, "speedup": statistics.median(ratios),
            "speedup_range": [min(ratios), max(ratios)], "flops_speedup": sum(dense) / sum(actual),
            "peak_memory_gb": row.memory / 1e9 if row.memory else None,
            "tflops": sum(actual) / len(actual) / step / 1e12,
        }
        entry["mfu"] = entry["tflops"] / profile.peak_tflops
        entry["mfu_of_measured_matmul"] = entry["tflops"] / matmul_tflops if matmul_tflops else None
        if row.executed:  # LDS: each step against the oracle of the depth it ran (on the full or the small image)
            efficiencies, oracle_speedups = [], []
            for r, (times, executed) in enumerate(zip(row.times, row.executed)):
                full = row.full_tokens[r] if row.full_tokens else [True] * len(times)
                vtc = bool(row.sts and (row.sts.get("sts_preset") or row.sts.get("sts_vtc") == "on"))
                oracle = sum(_oracle_time(oracles["full" if (f or not vtc) else "small"], r, e) if e else 0.0
                             for e, f in zip(executed, full))
                efficiencies.append(oracle / sum(times))
                oracle_speedups.append(_median_step(base, r) * len(times) / oracle)
            entry["efficiency"] = statistics.median(efficiencies)
            entry["oracle_speedup"] = statistics.median(oracle_speedups)
            entry["mean_layers_run"] = statistics.mean(e for run in row.executed for e in run)
        elif row.oracle_of is None and row.sts and row.sts.get("sts_stage") == "alignment":
            oracle = next(o for o in rows if o.oracle_of == row.name)
            entry["oracle_speedup"] = statistics.median(
                _median_step(base, r) / _median_step(oracle, r) for r in range(len(row.times)))
            entry["efficiency"] = statistics.median(
                _median_step(oracle, r) / _median_step(row, r) for r in range(len(row.times)))
        if entry["flops_speedup"] > 1.0:
            # wall-clock saving as a fraction of the FLOPs-predicted saving (the issue's 0.9 target)
            entry["saving_vs_flops"] = (1 - 1 / entry["speedup"]) / (1 - 1 / entry["flops_speedup"])
        out.append(entry)
    fit = {}
    for group, depth_rows in oracles.items():
        depths = sorted(depth_rows)
        if len(depths) == 3:
            low, mid, high = depths
            predicted = [_median_step(depth_rows[low], r) + (_median_step(depth_rows[high], r) - _median_step(
                depth_rows[low], r)) * (mid - low) / (high - low) for r in range(len(depth_rows[mid].times))]
            fit[group] = statistics.median(p / _median_step(depth_rows[mid], r) - 1 for r, p in enumerate(predicted))
    return out, {"linear_fit_error_at_half_depth": fit}


def markdown(rows: list[dict], profile: Profile, machine: str, extra: dict) -> str:
    def fmt(value, spec):
        return "" if value is None else format(value, spec)

    measured = extra.get("matmul_tflops")
    matmul = "" if measured is None else f"; the bf16 8192^3 matmul measured {measured:.0f} TFLOP/s"
    lines = [
        f"Machine: {machine}. Profile {profile.name}: CLIP ViT-L/14-336 shapes ({profile.vision_layers} layers, "
        f"{profile.vision_hidden} wide, {profile.visual_tokens} visual tokens), MLP projector, {profile.llm_layers} "
        f"LLaMA-7B decoder layers ({profile.llm_hidden} wide, MLP {profile.llm_intermediate}); batches: alignment "
        f"{profile.alignment_batch}, instruction {profile.instruction_batch}; {profile.rounds} rounds x "
        f"{profile.steps} steps after {profile.warmup} warm-up. MFU against {profile.peak_tflops:g} TFLOP/s "
        f"(bf16 dense, datasheet){matmul}.",
        "",
        "| configuration | step (ms) | speedup (range) | FLOPs-predicted | saving / predicted saving | oracle speedup "
        "| efficiency | peak memory (GB) | TFLOP/s | MFU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['configuration'].strip()} | {r['step_ms']:.1f} | {r['speedup']:.3f} ({r['speedup_range'][0]:.2f}-"
            f"{r['speedup_range'][1]:.2f}) | {r['flops_speedup']:.3f} | {fmt(r.get('saving_vs_flops'), '.2f')} "
            f"| {fmt(r.get('oracle_speedup'), '.3f')} | {fmt(r.get('efficiency'), '.3f')} "
            f"| {fmt(r.get('peak_memory_gb'), '.1f')} | {r['tflops']:.1f} | {100 * r['mfu']:.1f}% |"
        )
    fit = extra.get("linear_fit_error_at_half_depth") or {}
    if fit:
        lines += ["", "Depth oracles interpolated linearly between 1, L/2 and L layers; the line through 1 and L "
                  "misses the timed L/2 by " + ", ".join(f"{100 * v:+.1f}% ({k} image)" for k, v in fit.items()) + "."]
    return "\n".join(lines)


def machine_description() -> str:
    import transformers

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return f"{device}, torch {torch.__version__}, transformers {transformers.__version__}"


def main(profile: Profile, out_dir: str) -> list[dict]:
    os.makedirs(out_dir, exist_ok=True)
    scratch = os.path.join(out_dir, "scratch")
    matmul = measured_matmul_tflops()
    rows = build_rows(profile)
    start = time.perf_counter()
    run_row(profile, replace(rows[0], times=[]), scratch)  # one discarded run: the device's and libraries' start-up
    machine = machine_description()
    for r in range(profile.rounds):
        for row in rows if r % 2 == 0 else rows[::-1]:
            run_row(profile, row, scratch)
        print(f"round {r + 1}/{profile.rounds}: {time.perf_counter() - start:.0f} s", flush=True)
        # written after every round: a call that runs out of time still leaves the rounds it finished
        summary, extra = summarize(profile, rows, matmul)
        extra |= {"matmul_tflops": matmul, "rounds_done": r + 1}
        table = markdown(summary, replace(profile, rounds=r + 1), machine, extra)
        with open(os.path.join(out_dir, "bench-gpu.json"), "w") as f:
            json.dump({"profile": asdict(profile), "machine": machine, "rows": summary, **extra,
                       "seconds": time.perf_counter() - start}, f, indent=1)
        with open(os.path.join(out_dir, "bench-gpu.md"), "w") as f:
            f.write(table + "\n")
    print(table)
    return summary
