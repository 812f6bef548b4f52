"""The same run on every backend: a layer LDS skipped in every micro-batch of a step stays still (weights and optimizer
state) under one process, DDP, ZeRO-2, ZeRO-3 and FSDP2; a wrapper that hides LDS's decision is caught; the savings
report is the whole run's under several processes and after a resume."""

import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from sts_trainer import STSTrainer
from sts_trainer.lab.tiny import collate, synthetic_samples, tiny_llava, tiny_llava_config
from sts_trainer.layer_skip import LayerSkipper
from sts_trainer.savings import STATE_FILE

from .helpers import tiny_dataset, train, training_args
from .test_layer_skip import layers_of, read_records, run_script

BIN = os.path.dirname(sys.executable)


# ---- the optimizer guard, in one process ---------------------------------------------------------------------------


def _adam_after_steps(guarded: bool, zero_filled: bool):
    """A tiny LLaVA trained 3 AdamW steps with every layer, then one step in which layer 1 is skipped; returns layer
    1's weights and Adam state before and after that step. `zero_filled` gives the skipped layer a zero gradient,
    as DeepSpeed ZeRO does (one process leaves it None)."""
    model = tiny_llava(seed=0)
    skipper = LayerSkipper(alpha=0.0, seed=0)
    skipper.install(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    skipper.split_param_groups(optimizer)
    if guarded:
        skipper.guard_optimizer(optimizer)
    batch = collate(synthetic_samples(2, tiny_llava_config()))
    layer = layers_of(model)[1]

    def snapshot():
        return ([p.detach().clone() for p in layer.parameters()],
                [{k: v.clone() for k, v in optimizer.state[p].items()} for p in layer.parameters()])

    for step in range(4):
        skipper.probabilities = lambda s, total, _step=step: [float(_step == 3 and i == 1) for i in range(4)]
        with skipper.micro_batch(step, 0, 4) as record:
            model(**batch).loss.backward()
        if step == 3:
            assert record.skipped == [False, True, False, False]
            before = snapshot()
            if zero_filled:
                for p in layer.parameters():
                    p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    skipper.remove()
    return before, snapshot()


def test_split_param_groups_gives_each_layer_its_groups_with_the_same_hyperparameters():
    model = tiny_llava(seed=0)
    skipper = LayerSkipper()
    skipper.install(model)
    decay = [p for n, p in model.named_parameters() if "norm" not in n]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                   {"params": [p for n, p in model.named_parameters() if "norm" in n],
                                    "weight_decay": 0.0}], lr=1e-3)
    before = sum(len(g["params"]) for g in optimizer.param_groups)
    skipper.split_param_groups(optimizer)
    groups = optimizer.param_groups
    assert sum(len(g["params"]) for g in groups) == before
    assert {g["sts_layer"] for g in groups} == {None, 0, 1, 2, 3}
    for group in groups:
        if group["sts_layer"] is not None:
            own = {id(p) for p in layers_of(model)[group["sts_layer"]].parameters()}
            assert all(id(p) in own for p in group["params"])
    assert sorted({g["weight_decay"] for g in groups}) == [0.0, 0.1] and {g["lr"] for g in groups} == {1e-3}


@pytest.mark.parametrize("zero_filled", [False, True], ids=["no-gradient", "zero-gradient"])
def test_a_layer_skipped_in_the_whole_step_keeps_its_weights_and_adam_state(zero_filled):
    (weights, state), (weights_after, state_after) = _adam_after_steps(guarded=True, zero_filled=zero_filled)
    assert all(torch.equal(a, b) for a, b in zip(weights, weights_after))
    assert all(torch.equal(a[k], b[k]) for a, b in zip(state, state_after) for k in a)


def test_without_the_guard_a_zero_gradient_moves_the_skipped_layer():
    """What the guard prevents (ZeRO's zero-filled gradient, Adam's momentum and weight decay); the test above could
    fail."""
    (weights, state), (weights_after, state_after) = _adam_after_steps(guarded=False, zero_filled=True)
    assert not all(torch.equal(a, b) for a, b in zip(weights, weights_after))
    assert not all(torch.equal(a["exp_avg"], b["exp_avg"]) for a, b in zip(state, state_after))


def test_trainer_builds_per_layer_groups_and_the_losses_are_those_of_one_group(out_dir):
    """Under LDS the trainer's optimizer has per-layer groups; with nothing skipped, training is what it was."""
    args = dict(sts_stage="instruction", lds_alpha=0.0)
    trainer, recorder = train(tiny_llava(seed=0), training_args(out_dir, **args))
    assert {g.get("sts_layer") for g in trainer.optimizer.param_groups} == {None, 0, 1, 2, 3}
    plain, plain_recorder = train(tiny_llava(seed=0), training_args(out_dir + "-plain", sts_stage="none"))
    assert recorder.losses == plain_recorder.losses


# ---- 2 ranks on every backend ---------------------------------------------------------------------------------------

FORCED = ["--max_steps", "4", "--lds_alpha", "0.5", "--force_skip", "2:1,3"]
LAUNCHERS = {
    "ddp": ([os.path.join(BIN, "torchrun"), "--nproc_per_node", "2", "--master_port", "29631"], []),
    "zero2": ([os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port", "29632"],
              ["--deepspeed", "configs/zero2.json"]),
    "zero3": ([os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port", "29633"],
              ["--deepspeed", "configs/zero3.json"]),
    "fsdp2": ([os.path.join(BIN, "torchrun"), "--nproc_per_node", "2", "--master_port", "29634"],
              ["--fsdp", "full_shard auto_wrap", "--fsdp_config", "configs/fsdp.json"]),
}


def _run_forced(tmp_path, backend, *extra):
    launcher, options = LAUNCHERS[backend]
    out = tmp_path / backend
    result = run_script(out, *FORCED, *options, *extra, launcher=launcher)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    records = read_records(out / "layers_rank0.jsonl")
    assert [sorted(r["layers"]) for r in records] == [[0, 1, 2, 3], [0, 1, 2, 3], [0, 2], [0, 1, 2, 3]]
    return out, torch.load(out / "layer_weights.pt")


def _moved(weights, layer):
    prefix = f"{layer}."
    return [name for name in weights["before"] if name.startswith(prefix)
            and not torch.equal(weights["before"][name], weights["after"][name])]


@pytest.fixture(scope="module")
def backend_runs(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("backends")
    return {backend: _run_forced(tmp_path, backend) for backend in LAUNCHERS}


@pytest.mark.parametrize("backend", list(LAUNCHERS))
def test_skipped_layers_stay_bit_identical_through_the_step_on_every_backend(backend_runs, backend):
    out, weights = backend_runs[backend]
    assert _moved(weights, 1) == [] and _moved(weights, 3) == []
    assert _moved(weights, 0) and _moved(weights, 2)  # the layers that ran did train in that step


def test_ddp_and_zero2_train_the_same_model(backend_runs):
    ddp = load_file(backend_runs["ddp"][0] / "final" / "model.safetensors")
    zero2 = load_file(backend_runs["zero2"][0] / "final" / "model.safetensors")
    assert ddp.keys() == zero2.keys()
    for name in ddp:
        torch.testing.assert_close(zero2[name], ddp[name], rtol=1e-4, atol=1e-5, msg=name)


def test_under_zero2_without_the_guard_the_skipped_layers_move(tmp_path):
    """The same run with the guard off: ZeRO's zero-filled gradients move the skipped layers (what the guard fixes,
    so the tests above could fail)."""
    _, weights = _run_forced(tmp_path, "zero2", "--unguarded")
    assert _moved(weights, 1) and _moved(weights, 3)


def test_the_savings_report_sums_the_ranks(backend_runs):
    out, _ = backend_runs["ddp"]
    totals = json.loads((out / "sts_savings.json").read_text())["totals"]
    assert totals["processes"] == 2 and len(totals["per_rank"]) == 2
    assert totals["micro_batches"] == 8 == sum(r["micro_batches"] for r in totals["per_rank"])
    assert totals["dense_flops"] == pytest.approx(sum(r["dense_flops"] for r in totals["per_rank"]))
    assert totals["per_rank"][1]["dense_flops"] > 0


# ---- wrappers that would hide the decision ---------------------------------------------------------------------------


class Wrapper(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


def test_a_wrapper_put_in_place_of_a_layer_after_install_is_named():
    model = tiny_llava(seed=0)
    skipper = LayerSkipper(alpha=0.5)
    skipper.install(model)
    layers = layers_of(model)
    layers[2] = Wrapper(layers[2])  # as FSDP1's auto wrap does
    with pytest.raises(RuntimeError, match="decoder layer 2 was replaced by a Wrapper.*FSDP2"):
        with skipper.micro_batch(0, 0, 10):
            pass


def test_a_layer_that_runs_although_skipped_is_caught():
    """A skip the ledger would record must be a skip that happened: a decoder layer left in eval mode inside a
    training model ignores LDS's decision, and the check after the forward names it."""
    model = tiny_llava(seed=0)
    skipper = LayerSkipper(alpha=1.0, epsilon=1.0, schedule="constant")  # p = 0, 2/3, 1, 1
    skipper.install(model)
    model.train()
    layers_of(model)[3].eval()
    batch = collate(synthetic_samples(2, tiny_llava_config()))
    with pytest.raises(RuntimeError, match=r"decoder layers \[3\] did not do what LDS decided"):
        with skipper.micro_batch(0, 0, 10) as record:
            assert record.skipped[3]
            model(**batch)


def test_fsdp1_with_lds_is_refused_and_under_auto_turned_off(out_dir, monkeypatch, caplog):
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(fsdp_version=1)

    def fsdp1(trainer):
        trainer.accelerator.state.fsdp_plugin = plugin
        trainer.is_fsdp_enabled = True

    explicit = STSTrainer(model=tiny_llava(), args=training_args(out_dir, sts_stage="instruction"),
                          train_dataset=tiny_dataset(), data_collator=collate)
    fsdp1(explicit)
    with pytest.raises(ValueError, match="FSDP1.*fsdp_version: 2"):
        explicit._install_sts(None)
    explicit._remove_sts()
    auto = STSTrainer(model=tiny_llava(), args=training_args(out_dir), train_dataset=tiny_dataset(),
                      data_collator=collate)
    fsdp1(auto)
    with caplog.at_level("WARNING", logger="sts_trainer"):
        auto._install_sts(None)
    assert "lds" not in auto._components and auto.sts_plan.not_sparsified.startswith("LDS is off: FSDP1")
    assert "sts_lds='on'" in caplog.text
    auto._remove_sts()
    plugin2 = FullyShardedDataParallelPlugin(fsdp_version=2)
    explicit.accelerator.state.fsdp_plugin = plugin2
    assert explicit._lds_cannot_run() is None
    explicit.accelerator.state.fsdp_plugin = None


def test_a_deepspeed_optimizer_section_is_refused_with_lds(out_dir, monkeypatch):
    from accelerate.state import AcceleratorState

    trainer = STSTrainer(model=tiny_llava(), args=training_args(out_dir, sts_lds="on"), train_dataset=tiny_dataset(),
                         data_collator=collate)

    class Plugin:
        deepspeed_config = {"optimizer": {"type": "AdamW"}}

    trainer.is_deepspeed_enabled = True
    monkeypatch.setattr(AcceleratorState, "deepspeed_plugin", property(lambda self: Plugin()))
    try:
        with pytest.raises(ValueError, match="'optimizer' section"):
            trainer._install_sts(None)
    finally:
        trainer._remove_sts()


# ---- the savings report across a resume -----------------------------------------------------------------------------


def test_a_resumed_run_reports_the_whole_runs_wall_clock(tmp_path):
    common = ["--max_steps", "4", "--save_steps", "2"]
    assert run_script(tmp_path, *common, "--exit_at_step", "2").returncode == 3
    saved = json.loads((tmp_path / "checkpoint-2" / STATE_FILE).read_text())["ledger"]
    assert saved["wall_clock_seconds"] > 0.0
    resumed = run_script(tmp_path, *common, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    totals = json.loads((tmp_path / "sts_savings.json").read_text())["totals"]
    assert totals["wall_clock_seconds"] > saved["wall_clock_seconds"]
    assert totals["micro_batches"] == 4
