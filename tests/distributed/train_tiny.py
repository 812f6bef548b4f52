"""Train a tiny LLaVA with STSTrainer as a user would launch it; record which decoder layers ran.

    python tests/distributed/train_tiny.py --out DIR [--max_steps N] [--save_steps K] [--exit_at_step K] [--resume]
    torchrun --nproc_per_node 2 tests/distributed/train_tiny.py --out DIR
    deepspeed --num_gpus 2 tests/distributed/train_tiny.py --out DIR --deepspeed configs/zero3.json
    torchrun --nproc_per_node 2 tests/distributed/train_tiny.py --out DIR --fsdp "full_shard auto_wrap" \
        --fsdp_config configs/fsdp.json

Writes DIR/layers_rank{R}.jsonl: one line per training forward, {"step", "layers": indices of the layers that ran,
"visual": image placeholders the language model received} (VTC in instruction tuning: --sts_vtc on).
With --force_skip K:I,J layers I and J are skipped in every micro-batch of step K and no layer is skipped otherwise;
DIR/layer_weights.pt (rank 0) then holds the decoder layers' full weights before and after step K ("before",
"after"); --unguarded turns off the optimizer guard that keeps such a layer still (to show what it prevents).
With --exit_at_step K the process dies (os._exit) right after the checkpoint of step K is written. With
--text_only_rank R the data is in order (sequential sampling) and rank R's batches have no image, the others' one
image per sample. DIR/result.json (rank 0): global_step, world_size, the logged losses, whether FSDP was on, and with
--evaluate the evaluation losses (at step 2 during training, then after it, on data of the same layout).
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from transformers import TrainerCallback  # noqa: E402

from sts_trainer import STSTrainer, STSTrainingArguments  # noqa: E402
from sts_trainer.lab.tiny import (  # noqa: E402
    collate,
    freeze_for_alignment,
    synthetic_samples,
    tiny_llava,
    tiny_llava_config,
)


class CPUFSDPTrainer(STSTrainer):
    """FSDP through Accelerate on CPU processes, for tests. Accelerate enables FSDP on accelerators only (its
    `AcceleratorState` keeps the FSDP plugin for MULTI_GPU, MULTI_XPU, ... but not MULTI_CPU) while torch's FSDP2 runs
    on CPU with gloo: this sets the state Accelerate would have set on GPUs, and nothing else."""

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        state = self.accelerator.state
        state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
        state.distributed_type = DistributedType.FSDP
        self.is_fsdp_enabled = True


def full_weights(trainer, layers) -> dict[str, torch.Tensor]:
    """The decoder layers' weights, whole, on every backend (a collective under ZeRO-3 and FSDP: every rank calls it)."""
    params = dict(layers.named_parameters())
    if trainer.is_deepspeed_enabled:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {name: p.detach().clone() for name, p in params.items()}
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for name, p in params.items()}


class WeightsAroundStep(TrainerCallback):
    """The decoder layers' weights before and after optimizer step `step`, saved by rank 0."""

    def __init__(self, step, layers, path):
        self.step, self.layers, self.path, self.trainer, self.weights = step, layers, path, None, {}

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step and "before" not in self.weights:
            self.weights["before"] = full_weights(self.trainer, self.layers)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step + 1 and "after" not in self.weights:
            self.weights["after"] = full_weights(self.trainer, self.layers)
            if state.is_world_process_zero:
                torch.save(self.weights, self.path)


class ExitAfterSave(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            sys.stdout.flush()
            os._exit(3)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=-1)  # passed by the deepspeed launcher
    parser.add_argument("--out", required=True)
    parser.add_argument("--max_steps", type=int, default=6)
    parser.add_argument("--save_steps", type=int, default=0)
    parser.add_argument("--exit_at_step", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--deepspeed", default=None)
    parser.add_argument("--fsdp", default="")
    parser.add_argument("--fsdp_config", default=None)
    parser.add_argument("--cpu_fsdp", default="on", choices=["on", "off"])  # off: Accelerate's own state on CPU
    parser.add_argument("--grad_accum", type=int, default=1)
    parser.add_argument("--lds_alpha", type=float, default=0.5)
    parser.add_argument("--lds_schedule", default="constant")
    parser.add_argument("--lds_layer_order", default="depth")
    parser.add_argument("--lds_rerank_every", type=int, default=25)
    parser.add_argument("--activation_checkpointing", action="store_true")
    parser.add_argument("--sts_vtc", default="auto")
    parser.add_argument("--vtc_keep_ratio", type=float, default=0.5)
    parser.add_argument("--vtc_full_token_fraction", type=float, default=0.0)
    parser.add_argument("--vtc_mode_isolator", type=int, default=0)
    parser.add_argument("--stage", default="instruction", choices=["alignment", "instruction"])
    parser.add_argument("--text_only_rank", type=int, default=-1)  # this rank's batches have no image
    parser.add_argument("--sts_blank_image", default="auto")
    parser.add_argument("--freeze_vision", action="store_true")  # LLaVA's instruction tuning: the tower is frozen
    parser.add_argument("--evaluate", action="store_true")  # at step 2 during training, and once after it
    parser.add_argument("--force_skip", default=None)  # "K:I,J": layers I, J skipped in every micro-batch of step K
    parser.add_argument("--unguarded", action="store_true")  # no LayerSkipper.guard_optimizer
    cli = parser.parse_args()
    if cli.force_skip:
        from sts_trainer.layer_skip import LayerSkipper

        forced_step, forced = cli.force_skip.split(":")
        forced_step, forced = int(forced_step), {int(i) for i in forced.split(",")}

        def probabilities(self, step, total_steps):  # p = 1 for the forced layers at the forced step, else 0
            return [float(step == forced_step and i in forced) for i in range(len(self.layers))]

        LayerSkipper.probabilities = probabilities
        if cli.unguarded:
            LayerSkipper.guard_optimizer = lambda self, optimizer: None

    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", 0))
    if cli.deepspeed:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    # Built before the arguments: with ZeRO-3 a from-config model created afterwards is built under zero.Init.
    model = tiny_llava(seed=0)
    if cli.stage == "alignment":
        freeze_for_alignment(model)
    elif cli.freeze_vision:
        model.model.vision_tower.requires_grad_(False)
    args = STSTrainingArguments(
        output_dir=cli.out,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        eval_strategy="steps" if cli.evaluate else "no",
        eval_steps=2,
        gradient_accumulation_steps=cli.grad_accum,
        max_steps=cli.max_steps,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="steps" if cli.save_steps else "no",
        save_steps=cli.save_steps or 500,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
        deepspeed=cli.deepspeed,
        fsdp=cli.fsdp,
        fsdp_config=cli.fsdp_config,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", 1)) > 1 else None,
        activation_checkpointing=cli.activation_checkpointing,
        sts_stage=cli.stage,
        sts_blank_image=cli.sts_blank_image,
        train_sampling_strategy="sequential" if cli.text_only_rank >= 0 else "random",
        lds_alpha=cli.lds_alpha,
        lds_schedule=cli.lds_schedule,
        lds_layer_order=cli.lds_layer_order,
        lds_rerank_every=cli.lds_rerank_every,
        sts_vtc=cli.sts_vtc,
        vtc_keep_ratio=cli.vtc_keep_ratio,
        vtc_full_token_fraction=cli.vtc_full_token_fraction,
        vtc_mode_isolator=cli.vtc_mode_isolator,
    )
    samples = synthetic_samples(64, tiny_llava_config(), (1,), seed=0)
    if cli.text_only_rank >= 0:
        # In order, batch b goes to rank b % world: the batches of one rank are text-only, the others' have images.
        text = synthetic_samples(64, tiny_llava_config(), (0,), seed=1)
        world, batch = int(os.environ.get("WORLD_SIZE", 1)), args.per_device_train_batch_size
        samples = [(text if (i // batch) % world == cli.text_only_rank else samples)[i] for i in range(64)]
    eval_samples = samples[:8] if cli.evaluate else None  # the same layout: 2 batches per rank
    trainer = (CPUFSDPTrainer if cli.fsdp and cli.cpu_fsdp == "on" else STSTrainer)(
        model=model,
        args=args,
        train_dataset=samples,
        eval_dataset=eval_samples,
        data_collator=collate,
        callbacks=[ExitAfterSave(cli.exit_at_step)] if cli.exit_at_step else [],
    )
    if cli.force_skip:
        around = WeightsAroundStep(forced_step, model.model.language_model.layers,
                                   os.path.join(cli.out, "layer_weights.pt"))
        around.trainer = trainer
        trainer.add_callback(around)

    os.makedirs(cli.out, exist_ok=True)
    records = open(os.path.join(cli.out, f"layers_rank{rank}.jsonl"), "a")
    current = {}

    def start(module, args, kwargs):  # on the LLaVA model, after VTC's hook on the model around it
        if module.training:
            visual = int((kwargs["input_ids"] == model.config.image_token_id).sum())
            current["record"] = {"step": trainer.state.global_step, "layers": [], "visual": visual}

    def ran(index):
        def hook(module, args, kwargs):
            if module.training:
                current["record"]["layers"].append(index)

        return hook

    def finish(module, args, kwargs, output):
        if module.training:
            records.write(json.dumps(current["record"]) + "\n")
            records.flush()

    language_model = model.model.language_model
    model.model.register_forward_pre_hook(start, with_kwargs=True)
    language_model.register_forward_hook(finish, with_kwargs=True)
    for i, layer in enumerate(language_model.layers):
        layer.register_forward_pre_hook(ran(i), with_kwargs=True)

    if cli.lds_layer_order == "redundancy":  # what ranked the layers: this rank's own measurements, the ranking
        class RedundancyState(TrainerCallback):
            def on_train_end(self, *args, **kwargs):
                skipper = trainer._components["lds"]
                whole = skipper.measured()  # a collective: every rank's sums
                with open(os.path.join(cli.out, f"lds_rank{rank}.json"), "w") as f:
                    json.dump({"local": [m.totals() for m in skipper._meters], "whole": whole,
                               "similarity": skipper.similarity,
                               "ranks": skipper.ranks, "ranked_at": skipper._ranked_at}, f)

        trainer.add_callback(RedundancyState())
    trainer.train(resume_from_checkpoint=True if cli.resume else None)
    trainer.save_model(os.path.join(cli.out, "final"))
    evaluated = trainer.evaluate() if cli.evaluate else {}
    if trainer.is_world_process_zero():
        with open(os.path.join(cli.out, "result.json"), "w") as f:
            losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
            during = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]
            json.dump({"global_step": trainer.state.global_step, "world_size": args.world_size, "losses": losses,
                       "fsdp": trainer.is_fsdp_enabled, "eval_losses": [*during, evaluated.get("eval_loss")]}, f)
    records.close()
    # gloo process groups sometimes abort at interpreter exit after a finished run; end cleanly instead.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
