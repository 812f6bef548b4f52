"""Distributed training that never hangs (`sts_trainer.distributed`): the blank image, the ranks' agreement, FSDP
checkpoints; and, with 2 processes, ZeRO-3 and FSDP runs where one rank's batches have no image.

ZeRO-3 and FSDP gather a module's parameters when it runs, forward and backward, and reduce the gradients of the
parameters that have one: a batch without images must call the same modules in the same order as an image batch and
leave gradients on the same parameters. That is checked here on every architecture in one process, then shown on 2.
"""

import contextlib
import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from sts_trainer import STSTrainingArguments
from sts_trainer.architectures import ARCHITECTURES, CUSTOM_VLM, ModelParts, find_parts
from sts_trainer.distributed import (
    BlankImage,
    blank_image_mode,
    fill_adam_state,
)
from sts_trainer.layer_skip import LayerSkipper
from sts_trainer.token_compression import TokenCompressor, image_features

from .helpers import for_alignment
from .test_architectures import ARCHS, KEEP, VLMS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


# ---- the blank image, on every architecture --------------------------------------------------------------------------


def test_every_vision_language_architecture_has_a_blank_image():
    assert {name for name, facts in ARCHITECTURES.items() if facts.blank_image is not None} == set(ARCHS)


@pytest.mark.parametrize("model_type", VLMS)
def test_the_blank_image_runs_the_vision_path(model_type):
    arch = ARCHS[model_type]
    model = arch.model()
    parts = find_parts(model)
    features = image_features(model, parts.facts, parts.facts.blank_image(model.config))
    assert len(features) >= 1 and all(f.shape[0] >= 1 and torch.isfinite(f).all() for f in features)


class Gathers:
    """What ZeRO-3 and FSDP would gather and reduce in one training forward and backward: the modules with
    parameters of their own, in the order they run; the parameters left with a gradient; the decoder layers the
    backward passes through."""

    def __init__(self, model):
        self.model, self.order, self.backward = model, [], []
        self.handles = [
            module.register_forward_pre_hook(lambda m, a, name=name: self.order.append(name))
            for name, module in model.named_modules() if any(True for _ in module.parameters(recurse=False))
        ]
        for i, layer in enumerate(find_parts(model).layers):
            self.handles.append(layer.register_forward_hook(self._through(i)))

    def _through(self, index):
        def hook(module, args, output):
            if output.requires_grad:
                output.register_hook(lambda grad: self.backward.append(index))
        return hook

    def run(self, batch, contexts=()):
        self.order, self.backward = [], []
        self.model.zero_grad(set_to_none=True)
        with contextlib.ExitStack() as stack:
            for context in contexts:
                stack.enter_context(context)
            loss = self.model(**batch).loss
        if loss.requires_grad:  # a batch without images, the language model frozen: nothing to train without the blank
            loss.backward()
        grads = {name: p.grad.clone() for name, p in self.model.named_parameters() if p.grad is not None}
        return loss.detach(), list(self.order), sorted(self.backward), grads

    def remove(self):
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("vtc", [False, True], ids=["vision-in-the-forward", "vision-in-vtc"])
@pytest.mark.parametrize("model_type", VLMS)
def test_a_batch_without_images_gathers_what_an_image_batch_gathers(model_type, vtc):
    """Alignment trainability (the language model frozen: its backward must still run on the batch without images).
    With VTC compressing, an image batch's vision path runs in VTC's hook, before the model's forward; without, after
    the token embeddings. The blank's runs at the same place, and the loss is bit for bit the one without it."""
    arch = ARCHS[model_type]
    model = for_alignment(arch.model())
    model.train()
    parts = find_parts(model)
    compressor = TokenCompressor(parts.image_token_id, KEEP, facts=parts.facts) if vtc else None
    if compressor is not None:
        compressor.install(model)
    with_images = arch.collate(replace(arch, images_per_sample=(1,)).samples(2))
    without = arch.collate(replace(arch, images_per_sample=(0,)).samples(2, seed=1))
    assert not any(key.startswith("pixel_values") for key in without)
    gathers = Gathers(model)
    plain_loss, plain_order, _, plain_grads = gathers.run(without, [compressor.micro_batch(0)] if vtc else [])

    guard = BlankImage(parts, "blank", compressor)
    guard.install()
    contexts = lambda: [guard.active()] + ([compressor.micro_batch(0)] if vtc else [])  # noqa: E731
    image_loss, image_order, image_backward, image_grads = gathers.run(with_images, contexts())
    loss, order, backward, grads = gathers.run(without, contexts())
    assert guard.blank_forwards == 1  # the image batch ran its own images, not the blank

    assert order == image_order  # the same modules gathered, in the same order
    assert any(name.startswith(prefix) for name in order for prefix in ("model.vision_tower", "model.visual",
                                                                         "model.vision_model"))
    assert order != plain_order
    assert backward == image_backward and len(backward) == len(parts.layers)  # through every decoder layer
    assert grads.keys() == image_grads.keys() and len(grads) > 0  # the projector's: reduced on every rank
    assert all(torch.count_nonzero(g) == 0 for g in grads.values())  # and exactly zero here
    assert torch.equal(loss, plain_loss) and not plain_grads  # the loss is bit for bit unchanged
    guard.remove()
    gathers.run(without, [compressor.micro_batch(0)] if vtc else [])
    assert guard.blank_forwards == 1  # removed: nothing runs any more


def test_the_blank_changes_no_gradient_of_an_instruction_step():
    """Everything trainable, LDS on: a batch without images gets the same loss and the same gradients with the
    blank image, and the vision side's gradients are exactly zero."""
    arch = ARCHS["llava"]
    model = arch.model()
    model.train()
    parts = find_parts(model)
    skipper = LayerSkipper(alpha=0.5, schedule="constant")
    skipper.install(parts.layers)
    batch = arch.collate(replace(arch, images_per_sample=(0,)).samples(3))
    gathers = Gathers(model)
    loss, _, _, grads = gathers.run(batch, [skipper.micro_batch(1, 0, 10)])
    guard = BlankImage(parts, "blank")
    guard.install()
    blank_loss, _, _, blank_grads = gathers.run(batch, [guard.active(), skipper.micro_batch(1, 0, 10)])
    assert torch.equal(loss, blank_loss)
    vision = {name for name in blank_grads if name not in grads}
    assert vision and all(name.startswith(("model.vision_tower", "model.multi_modal_projector")) for name in vision)
    assert all(torch.count_nonzero(blank_grads[name]) == 0 for name in vision)
    assert all(torch.equal(grads[name], blank_grads[name]) for name in grads)


def test_a_model_without_a_blank_image_is_refused_by_name():
    arch = ARCHS["llava"]
    parts = find_parts(arch.model())
    custom = ModelParts(parts.model, "my_vlm", parts.language_model, parts.layers, parts.projector,
                        parts.image_token_id, CUSTOM_VLM)
    with pytest.raises(ValueError, match="sts_blank_image: sts_trainer has no blank image .* sts_blank_image='off'"):
        BlankImage(custom, "blank")
    BlankImage(custom, "check")  # checking needs no blank image


@pytest.mark.parametrize(
    "option, sharding, world, mode",
    [("auto", "ZeRO-3", 2, "blank"), ("auto", "FSDP", 4, "blank"), ("auto", "ZeRO-3", 1, None), ("auto", None, 2, None),
     ("on", None, 1, "blank"), ("off", "ZeRO-3", 2, "check"), ("off", None, 2, None), ("off", "FSDP", 1, None)],
)
def test_what_sts_blank_image_means(option, sharding, world, mode):
    assert blank_image_mode(option, sharding, world) == mode


def test_sts_blank_image_is_validated():
    with pytest.raises(ValueError, match="sts_blank_image='sometimes' is not valid"):
        STSTrainingArguments(output_dir="unused", sts_blank_image="sometimes")


# ---- the optimizer state an FSDP checkpoint needs --------------------------------------------------------------------


@pytest.mark.parametrize("cls", [torch.optim.AdamW, torch.optim.Adam])
def test_filling_adam_state_changes_no_update(cls):
    def run(fill):
        torch.manual_seed(0)
        a, b = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(3))
        optimizer = cls([a, b], lr=0.1, weight_decay=0.1)
        for step in range(3):
            a.grad = torch.randn(4)
            b.grad = torch.randn(3) if step == 2 else None  # b has no gradient before the "checkpoint"
            if step == 1 and fill:
                assert fill_adam_state(optimizer) == 1 and len(optimizer.state[b]) == 3
            optimizer.step()
        return a.detach(), b.detach(), optimizer.state[b]["step"]

    plain, filled = run(False), run(True)
    assert all(torch.equal(x, y) for x, y in zip(plain, filled))


def test_filling_state_is_for_adam_only():
    parameter = torch.nn.Parameter(torch.randn(2))
    assert fill_adam_state(torch.optim.SGD([parameter], lr=0.1, momentum=0.9)) is None


# ---- 2 processes: one rank's batches have no image -------------------------------------------------------------------


def launch(launcher, out, *args, timeout=300):
    if launcher == "deepspeed":
        command = [os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port", "29642"]
    else:
        command = [os.path.join(BIN, "torchrun"), "--nproc_per_node", "2", "--master_port", "29643"]
    command += [os.path.join(ROOT, "tests", "distributed", "train_tiny.py"), "--out", str(out), "--text_only_rank", "1",
                *args]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def records(out, rank):
    return [json.loads(line) for line in open(os.path.join(out, f"layers_rank{rank}.jsonl"))]


def assert_one_rank_text_only(out, steps):
    ranks = [records(out, 0), records(out, 1)]
    assert [r["step"] for r in ranks[0]] == [r["step"] for r in ranks[1]] == list(range(steps))
    assert all(r["visual"] > 0 for r in ranks[0]) and all(r["visual"] == 0 for r in ranks[1])
    assert [r["layers"] for r in ranks[0]] == [r["layers"] for r in ranks[1]]  # the same LDS decisions
    return ranks


ZERO3 = ["--deepspeed", "configs/zero3.json", "--max_steps", "3"]


@pytest.mark.parametrize(
    "stage, extra",
    [("alignment", ["--evaluate"]),
     ("instruction", ["--sts_vtc", "on", "--vtc_keep_ratio", "0.25", "--vtc_full_token_fraction", "0.5"])],
    ids=["alignment-vtc-and-evaluation", "instruction-vtc-lds-full-token-steps"],
)
def test_zero3_with_a_text_only_rank_completes(tmp_path, stage, extra):
    """Both stages; in alignment also evaluation (text-only batches on rank 1 too) during training and, with the
    blank image installed anew over DeepSpeed's hooks, in `evaluate()` after it."""
    result = launch("deepspeed", tmp_path, *ZERO3, "--stage", stage, *extra)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    summary = json.load(open(tmp_path / "result.json"))
    assert summary["global_step"] == 3
    if "--evaluate" in extra:
        assert len(summary["eval_losses"]) >= 2 and all(isinstance(loss, float) for loss in summary["eval_losses"])
    ranks = assert_one_rank_text_only(tmp_path, 3)
    if stage == "alignment":
        assert all(r["layers"] == [0, 1, 2, 3] for r in ranks[0]) and {r["visual"] for r in ranks[0]} == {16}
    else:  # some steps compressed (8 of 32 visual tokens kept), some full-token steps (32), layers skipped
        assert {r["visual"] for r in ranks[0]} == {8, 32}
        assert any(len(r["layers"]) < 4 for r in ranks[0])


def test_zero3_trains_the_mode_isolator_with_a_text_only_rank_and_saves_it_apart(tmp_path):
    """The isolator is gathered on the rank whose batches have no image too (the blank image's compressed path calls
    it), so ZeRO-3 completes; the saved weights hold the plain model's keys, the isolator its own file."""
    from safetensors import safe_open

    from sts_trainer.token_compression import load_isolator

    result = launch("deepspeed", tmp_path, *ZERO3, "--stage", "alignment", "--vtc_mode_isolator", "2")
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    ranks = assert_one_rank_text_only(tmp_path, 3)
    assert {r["visual"] for r in ranks[0]} == {2 * (8 + 2)}  # 2 images a batch: 8 of 16 tokens kept, 2 soft ones
    tokens = load_isolator(str(tmp_path / "final"))
    assert tokens.shape == (2, 64) and torch.isfinite(tokens).all() and tokens.abs().sum() > 0
    with safe_open(str(tmp_path / "final" / "model.safetensors"), framework="pt") as f:
        assert not any("sts_mode_isolator" in key for key in f.keys())


def test_zero3_with_the_blank_image_off_stops_with_an_error_naming_it(tmp_path):
    result = launch("deepspeed", tmp_path, *ZERO3, "--sts_blank_image", "off", timeout=200)
    assert result.returncode != 0
    assert "have images on 1 of 2 ranks" in result.stderr and "sts_blank_image='off' is set" in result.stderr


FSDP = ["--fsdp", "full_shard auto_wrap", "--fsdp_config", "configs/fsdp.json", "--max_steps", "4", "--sts_vtc", "on",
        "--vtc_keep_ratio", "0.25", "--freeze_vision", "--evaluate"]


def test_fsdp_with_a_text_only_rank_trains_saves_and_resumes(tmp_path):
    """FSDP2 through Accelerate, on 2 CPU processes (tests/distributed/train_tiny.py sets the Accelerate state that
    CPU processes do not get): VTC and LDS, the same decisions on both ranks, a sharded checkpoint at step 2 that a
    killed run resumes from to the uninterrupted run's losses and evaluation losses (evaluated during training and
    after it, with text-only batches on rank 1)."""
    whole = tmp_path / "whole"
    result = launch("torchrun", whole, *FSDP)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    expected = json.load(open(whole / "result.json"))
    assert expected["fsdp"] and expected["global_step"] == 4 and expected["world_size"] == 2
    assert_one_rank_text_only(whole, 4)

    resumed = tmp_path / "resumed"
    killed = launch("torchrun", resumed, *FSDP, "--save_steps", "2", "--exit_at_step", "2")
    assert killed.returncode != 0 and (resumed / "checkpoint-2" / "sts_state.json").exists()
    assert not (resumed / "result.json").exists()
    result = launch("torchrun", resumed, *FSDP, "--save_steps", "2", "--resume")
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    resumed_summary = json.load(open(resumed / "result.json"))
    assert resumed_summary["losses"] == expected["losses"]  # bit for bit
    assert resumed_summary["eval_losses"] == expected["eval_losses"] and len(expected["eval_losses"]) >= 3
    ranks = [records(resumed, 0), records(resumed, 1)]
    assert [r["layers"] for r in ranks[0]] == [r["layers"] for r in records(whole, 0)]  # steps 0-1, then 2-3 resumed
    assert [r["layers"] for r in ranks[1]] == [r["layers"] for r in ranks[0]]


def launch_nodes(out, node_args, timeout=300):
    """Two nodes of one process each, from a hostfile, as scripts/multinode.sh launches without ssh: one deepspeed
    launcher per node (--no_ssh --node_rank i), here both on this machine."""
    hostfile = os.path.join(out, "hostfile")
    os.makedirs(out, exist_ok=True)
    with open(hostfile, "w") as f:
        f.write("node0 slots=1\nnode1 slots=1\n")
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    nodes = []
    for rank, args in enumerate(node_args):
        command = [os.path.join(BIN, "deepspeed"), "--hostfile", hostfile, "--no_ssh", "--node_rank", str(rank),
                   "--master_addr", "127.0.0.1", "--master_port", "29644",
                   os.path.join(ROOT, "tests", "distributed", "train_tiny.py"), "--out", str(out / "run"), *ZERO3,
                   "--text_only_rank", "1", *args]
        nodes.append(subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    logs = [node.communicate(timeout=timeout)[0] for node in nodes]
    return [node.returncode for node in nodes], logs


def test_two_nodes_from_a_hostfile_with_a_text_only_node(tmp_path):
    codes, logs = launch_nodes(tmp_path, [["--stage", "instruction"]] * 2)
    assert codes == [0, 0], [log[-3000:] for log in logs]
    assert json.load(open(tmp_path / "run" / "result.json"))["world_size"] == 2
    assert_one_rank_text_only(tmp_path / "run", 3)


def test_nodes_launched_with_different_sts_options_stop_at_the_start_naming_it(tmp_path):
    codes, logs = launch_nodes(tmp_path, [["--lds_alpha", "0.5"], ["--lds_alpha", "0.3"]], timeout=200)
    assert codes[0] != 0 and codes[1] != 0
    for log in logs:
        assert "lds_alpha differs between ranks (rank 0: 0.5, rank 1: 0.3)" in log
    assert records(tmp_path / "run", 0) == records(tmp_path / "run", 1) == []  # no training forward ran


def test_fsdp_asked_for_on_cpu_processes_is_reported(tmp_path):
    """Without the test's override, Accelerate drops the FSDP plugin on CPU processes (MULTI_CPU) and Trainer trains
    with DDP: the trainer says so instead of letting the run look sharded."""
    result = launch("torchrun", tmp_path, "--fsdp", "full_shard auto_wrap", "--fsdp_config", "configs/fsdp.json",
                    "--cpu_fsdp", "off", "--max_steps", "1")
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    assert not json.load(open(tmp_path / "result.json"))["fsdp"]
    assert "Accelerate did not enable FSDP (DistributedType.MULTI_CPU)" in result.stderr


def test_the_blank_image_in_one_process_trains_alike_and_its_flops_are_counted(tmp_path):
    """sts_blank_image='on' without sharding: the same losses as 'off' bit for bit (with plain SGD: the blank gives
    the vision side a zero gradient where 'off' gives none, which Adam's momentum would move, as ZeRO's zero-filled
    gradients do); the ledger counts each blank's vision forward and projector backward, in the dense and the actual
    FLOPs alike."""
    from sts_trainer import STSTrainer
    from sts_trainer.flops import vision_flops
    from sts_trainer.lab.tiny import collate, synthetic_samples, tiny_llava, tiny_llava_config

    samples = synthetic_samples(8, tiny_llava_config(), (1, 1, 0, 0), seed=0)  # batches of 2: images, text, ...
    runs = {}
    for option in ("off", "on"):
        model = tiny_llava(seed=0)
        calls = []
        model.model.vision_tower.register_forward_hook(lambda module, args, output: calls.append(1))
        args = STSTrainingArguments(
            output_dir=str(tmp_path / option), per_device_train_batch_size=2, max_steps=4, learning_rate=1e-3,
            logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0,
            train_sampling_strategy="sequential", sts_stage="instruction", sts_blank_image=option, optim="sgd",
        )
        trainer = STSTrainer(model=model, args=args, train_dataset=samples, data_collator=collate)
        trainer.train()
        records = trainer.sts_ledger.records
        runs[option] = ([h["loss"] for h in trainer.state.log_history if "loss" in h], len(calls),
                        sum(r.dense_flops for r in records), sum(r.actual_flops for r in records), model.config)
    (losses_off, calls_off, dense_off, actual_off, config), (losses_on, calls_on, dense_on, actual_on, _) = (
        runs["off"], runs["on"])
    assert losses_on == losses_off and len(losses_on) == 4
    assert (calls_off, calls_on) == (2, 4)  # two image batches; the two text-only ones ran the blank
    blank = vision_flops(config, 1, 16, train_vision=True, train_projector=True, train_llm=True)
    assert dense_on - dense_off == pytest.approx(2 * blank) and actual_on - actual_off == pytest.approx(2 * blank)
