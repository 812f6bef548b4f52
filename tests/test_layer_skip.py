import copy
import io
import json
import os
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import LlavaForConditionalGeneration, Trainer, TrainerCallback
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from sts_trainer import STSTrainer, skip_probability
from sts_trainer.lab.tiny import collate, synthetic_samples, tiny_llava, tiny_llava_config
from sts_trainer.layer_skip import (
    LayerSkipper,
    _SkippableLayer,
    lr_mass_progress,
    schedule_learning_rates,
    scheduler_learning_rates,
)

from .helpers import plain_training_args, train, training_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "distributed", "train_tiny.py")


def layers_of(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.language_model.layers


# ---- the schedule --------------------------------------------------------------------------------------------------


def test_schedule_start_middle_end():
    L, E = 32, 1000
    # start: alpha times the depth factor, from 1 - eps (first layer) to 1 + eps (last layer)
    assert skip_probability(0, E, 0, L, 0.5, 0.5) == pytest.approx(0.25)
    assert skip_probability(0, E, L - 1, L, 0.5, 0.5) == pytest.approx(0.75)
    # middle: quadratic decay (1/2)^2 = 1/4; linear 1/2; constant 1
    assert skip_probability(500, E, L - 1, L, 0.5, 0.5) == pytest.approx(0.75 / 4)
    assert skip_probability(500, E, L - 1, L, 0.5, 0.5, "linear") == pytest.approx(0.75 / 2)
    assert skip_probability(500, E, L - 1, L, 0.5, 0.5, "constant") == pytest.approx(0.75)
    # end: dense
    assert all(skip_probability(E, E, l, L, 0.5, 0.5) == 0.0 for l in range(L))
    assert skip_probability(E, E, 3, L, 0.5, 0.5, "constant") > 0


def test_schedule_depth_factor_and_layer_mean():
    L, E, alpha, eps = 12, 100, 0.5, 0.5
    for e in (0, 10, 37, 50, 99):
        probs = [skip_probability(e, E, l, L, alpha, eps) for l in range(L)]
        assert sum(probs) / L == pytest.approx(alpha * (1 - e / E) ** 2)
        steps = [b - a for a, b in zip(probs, probs[1:])]
        assert all(s == pytest.approx(steps[0]) and s >= 0 for s in steps)  # linear in depth
    # the depth factor at layer l: 1 + eps * (2l - (L - 1)) / (L - 1)
    assert skip_probability(0, E, 4, L, 1.0, 0.3, "constant") == pytest.approx(1 + 0.3 * (8 - 11) / 11)
    # clamped to [0, 1]; one layer has depth factor 1; no slope with eps 0
    assert skip_probability(0, E, L - 1, L, 1.0, 1.0) == 1.0
    assert skip_probability(0, E, 0, 1, 0.4, 0.5) == pytest.approx(0.4)
    assert len({skip_probability(5, E, l, L, 0.5, 0.0) for l in range(L)}) == 1
    # the whole-stage mean with the quadratic schedule tends to alpha / 3
    mean = sum(skip_probability(e, 10_000, l, L, alpha, eps) for e in range(0, 10_000, 7) for l in range(L))
    assert mean / (L * len(range(0, 10_000, 7))) == pytest.approx(alpha / 3, rel=1e-2)


def test_lr_mass_progress_is_the_share_of_the_learning_rate_spent_before_each_step():
    assert lr_mass_progress([1.0, 1.0, 2.0]) == pytest.approx([0.0, 0.25, 0.5])
    assert lr_mass_progress([0.0, 2.0, 2.0]) == pytest.approx([0.0, 0.0, 0.5])  # a warm-up from 0 spends nothing
    with pytest.raises(ValueError, match="lds_progress='steps'"):
        lr_mass_progress([0.0, 0.0])
    # a constant learning rate: progress by mass is progress by steps, so the probabilities are the paper's
    E = 10
    progress = lr_mass_progress(schedule_learning_rates("constant", E))
    assert progress == pytest.approx([e / E for e in range(E)])
    for e in range(E):
        assert skip_probability(e, E, 3, 4, 0.5, 0.5, progress=progress[e]) == pytest.approx(
            skip_probability(e, E, 3, 4, 0.5, 0.5))
    # a decaying one runs ahead of the steps: less skipping at every step after the first
    cosine = lr_mass_progress(schedule_learning_rates("cosine", 600, 30))
    assert all(p >= e / 600 for e, p in enumerate(cosine) if e >= 60) and cosine[300] > 0.75
    mean = sum(skip_probability(e, 600, 0, 1, 0.5, 0.0, progress=p) for e, p in enumerate(cosine)) / 600
    assert mean == pytest.approx(0.1028, abs=1e-3)  # against alpha / 3 = 0.167 by steps


def test_lr_mass_needs_a_schedule_that_is_a_function_of_the_step():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="lds_progress='lr_mass' needs .* StepLR"):
        scheduler_learning_rates(torch.optim.lr_scheduler.StepLR(optimizer, 2), 4)
    # a LambdaLR subclass whose lambdas are per-step multipliers, not the rate itself
    with pytest.raises(ValueError, match="MultiplicativeLR"):
        scheduler_learning_rates(torch.optim.lr_scheduler.MultiplicativeLR(optimizer, lambda step: 0.9), 4)
    with pytest.raises(ValueError, match="reduce_lr_on_plateau"):
        training_args("unused", lds_progress="lr_mass", lr_scheduler_type="reduce_lr_on_plateau")


def test_lr_mass_in_training_follows_the_trainers_own_schedule(out_dir, tmp_path):
    E = 6
    args = dict(max_steps=E, lds_alpha=1.0, lds_epsilon=0.0, lds_schedule="linear", lr_scheduler_type="linear")
    _, by_steps = train(tiny_llava(), training_args(out_dir, **args))
    recipe = tmp_path / "recipe.yaml"  # set by the instruction stage's section of a recipe, as a preset would
    recipe.write_text(json.dumps({"instruction": {"lds_progress": "lr_mass"}}))
    trainer, by_mass = train(tiny_llava(), training_args(out_dir, sts_preset=str(recipe), **args))
    steps = [log["lds_skip_probability"] for log in by_steps.logs if "loss" in log]
    mass = [log["lds_skip_probability"] for log in by_mass.logs if "loss" in log]
    # linear decay of the learning rate from step 0: rates (E - e) / E, progress 1 - (E - e)(E - e + 1) / (E (E + 1))
    assert steps == pytest.approx([(E - e) / E for e in range(E)])
    assert mass == pytest.approx([(E - e) * (E - e + 1) / (E * (E + 1)) for e in range(E)])
    assert trainer.sts_plan.lds and "progress=lr_mass" in trainer.sts_plan.describe()


def test_decisions_are_seeded_per_step_and_leave_the_global_rng_alone():
    skipper = LayerSkipper(alpha=0.5, epsilon=0.5, schedule="constant", seed=7)
    skipper.install(tiny_llava())
    state = torch.random.get_rng_state()
    a, probs = skipper.decide(3, 10, 0)
    assert torch.equal(state, torch.random.get_rng_state())
    assert skipper.decide(3, 10, 0)[0] == a
    draws = [tuple(skipper.decide(s, 10, m)[0]) for s in range(20) for m in range(2)]
    assert len(set(draws)) > 4  # decisions change with step and micro-step
    # p = 0 never skips, p = 1 always skips
    skipper.alpha, skipper.epsilon = 1.0, 1.0
    for step in range(20):
        skips, probs = skipper.decide(step, 1000, 0)
        assert probs[0] == 0.0 and not skips[0]
        assert probs[-1] == 1.0 and skips[-1]
    skipper.remove()


def test_patching_is_reversible_and_keeps_state_dict_keys_and_eval_logits():
    model = tiny_llava()
    reference = tiny_llava()
    reference.load_state_dict(model.state_dict())
    classes = [type(layer) for layer in layers_of(model)]
    skipper = LayerSkipper(1.0, 0.0, "constant", seed=0)
    skipper.install(model)
    assert list(model.state_dict()) == list(reference.state_dict())
    skipper.decide(0, 10, 0)  # every layer marked skipped
    ids = torch.randint(1, 100, (2, 12))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference.eval()(input_ids=ids).logits)
    model.train()
    hidden = torch.randn(2, 5, 64)
    assert layers_of(model)[1](hidden) is hidden  # training: identity
    skipper.remove()
    assert [type(layer) for layer in layers_of(model)] == classes
    assert all("_sts_skip" not in vars(layer) for layer in layers_of(model))


def test_patched_layers_keep_their_class_name_and_a_wrapper_installed_after_stays():
    """FSDP's auto wrap finds layers by class name (`transformer_layer_cls_to_wrap`), and FSDP2's fully_shard derives
    a class from the layer's own after LDS is installed: remove() leaves such a class and the layer runs again."""
    model = tiny_llava()
    skipper = LayerSkipper(1.0, 0.0, "constant", seed=0)
    skipper.install(model)
    layers = layers_of(model)
    assert {type(layer).__name__ for layer in layers} == {"LlamaDecoderLayer"}
    assert all(isinstance(layer, _SkippableLayer) for layer in layers)
    wrapped = type("FSDPLlamaDecoderLayer", (type(layers[0]),), {})
    layers[0].__class__ = wrapped  # as fully_shard(layer) does
    skipper.decide(0, 10, 0)
    model.train()
    hidden = torch.randn(2, 5, 64)
    assert layers[0](hidden) is hidden  # still skipped while installed
    skipper.remove()
    assert type(layers[0]) is wrapped and type(layers[1]) is LlamaDecoderLayer
    position = torch.arange(5)[None]
    embeddings = model.model.language_model.rotary_emb(hidden, position)
    assert layers[0](hidden, position_embeddings=embeddings) is not hidden  # unmarked: it runs


def installed_with_every_layer_skipped(model):
    skipper = LayerSkipper(1.0, 0.0, "constant", seed=0)
    skipper.install(model)
    skipper.decide(0, 10, 0)  # p = 1 everywhere: every layer marked skipped
    return skipper


def test_a_model_pickled_while_installed_loads_as_the_unpatched_model():
    model, reference = tiny_llava(), tiny_llava()
    classes = [type(layer) for layer in layers_of(model)]
    installed_with_every_layer_skipped(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert [type(layer) for layer in layers_of(loaded)] == classes
    assert all("_sts_skip" not in vars(layer) for layer in layers_of(loaded))
    assert all(layer._sts_skip and isinstance(layer, _SkippableLayer) for layer in layers_of(model))  # still installed
    # in training, where the saved model skips every layer, the loaded one runs them all, as the unpatched model does
    ids = torch.randint(1, 100, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded.train()(input_ids=ids).logits, reference.train()(input_ids=ids).logits)


def test_a_deepcopy_while_installed_is_the_unpatched_model_and_the_original_stays_installed():
    model, reference = tiny_llava(), tiny_llava()
    installed_with_every_layer_skipped(model)
    copied = copy.deepcopy(model)  # e.g. an EMA model taken during training
    assert [type(layer) for layer in layers_of(copied)] == [type(layer) for layer in layers_of(reference)]
    assert all("_sts_skip" not in vars(layer) for layer in layers_of(copied))
    assert all(layer._sts_skip and isinstance(layer, _SkippableLayer) for layer in layers_of(model))
    ids = torch.randint(1, 100, (2, 12))
    with torch.no_grad():
        assert torch.equal(copied.train()(input_ids=ids).logits, reference.train()(input_ids=ids).logits)


def test_a_model_pickled_while_installed_loads_without_sts_trainer(tmp_path):
    model = tiny_llava()
    installed_with_every_layer_skipped(model)
    path = tmp_path / "model.pt"
    torch.save(model, path)
    check = (
        "import sys, torch; model = torch.load(sys.argv[1], weights_only=False); "
        "assert not [name for name in sys.modules if name.split('.')[0] == 'sts_trainer'], 'sts_trainer imported'; "
        "print(sorted({type(layer).__name__ for layer in model.model.language_model.layers}))"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-c", check, str(path)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "['LlamaDecoderLayer']"


def test_output_hidden_states_has_one_entry_per_layer_and_a_skipped_layer_runs_no_other_hook():
    model, reference = tiny_llava(), tiny_llava()
    layers = layers_of(model)
    skipper = LayerSkipper(1.0, 0.0, "constant", seed=0)
    skipper.install(layers)
    for i, layer in enumerate(layers):
        layer._sts_skip = i in (1, 2)
    # stand-ins for ZeRO-3's parameter gather/release hooks, registered on every layer
    calls = [0] * len(layers)
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda module, args, _i=i: calls.__setitem__(_i, calls[_i] + 1))
        layer.register_forward_hook(lambda module, args, output, _i=i: calls.__setitem__(_i, calls[_i] + 1))
    ids = torch.randint(1, 100, (2, 12))
    # what the skips amount to: the model without layers 1 and 2
    without = tiny_llava()
    del layers_of(without)[1:3]
    with torch.no_grad():
        out = model.train()(input_ids=ids, output_hidden_states=True)
        expected = without.train()(input_ids=ids, output_hidden_states=True)
    assert calls == [2, 0, 0, 2]
    hidden = out.hidden_states
    assert len(hidden) == 1 + len(layers)
    assert hidden[2] is hidden[1] and hidden[3] is hidden[1]  # a skipped layer's output is its input
    assert all(torch.equal(hidden[i], expected.hidden_states[j]) for i, j in [(0, 0), (1, 1), (4, 2)])
    assert torch.equal(out.logits, expected.logits)
    # eval mode: no skips, so exactly the unpatched model's hidden states, with every layer's hooks run
    calls[:] = [0] * len(layers)
    with torch.no_grad():
        out = model.eval()(input_ids=ids, output_hidden_states=True)
        dense = reference.eval()(input_ids=ids, output_hidden_states=True)
    assert calls == [2] * len(layers)
    assert len(out.hidden_states) == len(dense.hidden_states) == 1 + len(layers)
    assert all(torch.equal(a, b) for a, b in zip(out.hidden_states, dense.hidden_states))
    assert torch.equal(out.logits, dense.logits)


# ---- in training ---------------------------------------------------------------------------------------------------


def test_alpha_zero_trains_exactly_like_trainer(out_dir):
    models = [tiny_llava(seed=3), tiny_llava(seed=3)]
    _, plain = train(models[0], plain_training_args(out_dir), trainer_cls=Trainer)
    trainer, sts = train(models[1], training_args(out_dir, lds_alpha=0.0))
    assert trainer.sts_plan.lds
    assert plain.losses == sts.losses
    assert all(torch.equal(a, b) for a, b in zip(models[0].parameters(), models[1].parameters()))
    assert all(log["lds_skipped_fraction"] == 0 for log in sts.logs if "loss" in log)


class GradientProbe(TrainerCallback):
    def __init__(self, layers):
        self.layers = layers
        self.has_grad = []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.has_grad.append([any(p.grad is not None for p in layer.parameters()) for layer in self.layers])


def count_forward_calls(layers):
    calls = [0] * len(layers)
    for i, layer in enumerate(layers):
        original = layer.forward

        def counted(*args, _i=i, _original=original, **kwargs):
            calls[_i] += 1
            return _original(*args, **kwargs)

        layer.forward = counted
    return calls


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_layer_with_probability_one_never_runs_and_gets_no_gradient(out_dir, lora):
    model = tiny_llava()
    if lora:
        for p in model.parameters():
            p.requires_grad = False
        model = get_peft_model(model, LoraConfig(r=4, target_modules=r".*language_model.*\.(q_proj|v_proj|down_proj)"))
    layers = layers_of(model)
    calls = count_forward_calls(layers)
    probe = GradientProbe(layers)
    # alpha 1, eps 1, constant: p = 0 for the first layer, 1 for the last
    args = training_args(out_dir, max_steps=5, lds_alpha=1.0, lds_epsilon=1.0, lds_schedule="constant")
    trainer, recorder = train(model, args, callbacks=[probe])
    assert trainer.sts_plan.lds and len(probe.has_grad) == 5
    assert calls[0] == 5 and calls[-1] == 0
    assert all(step[0] and not step[-1] for step in probe.has_grad)
    fractions = [log["lds_skipped_fraction"] for log in recorder.logs if "loss" in log]
    assert all(0.25 <= f <= 0.75 for f in fractions)  # the last layer always, the first never
    # depth factors 0, 2/3, 4/3, 2 clamped to 0, 2/3, 1, 1
    assert [log["lds_skip_probability"] for log in recorder.logs if "loss" in log] == pytest.approx([2 / 3] * 5)


def test_gradient_checkpointing_gives_the_same_losses(out_dir):
    class CheckpointingProbe(TrainerCallback):
        active = None

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            self.active = [layer.gradient_checkpointing for layer in layers_of(model)]

    models = [tiny_llava(seed=4), tiny_llava(seed=4)]
    args = dict(max_steps=4, lds_schedule="constant")
    _, plain = train(models[0], training_args(out_dir, **args))
    calls = [0] * 4
    for i, layer in enumerate(layers_of(models[1])):
        layer.register_forward_pre_hook(lambda module, inputs, _i=i: calls.__setitem__(_i, calls[_i] + 1))
    probe = CheckpointingProbe()
    _, ckpt = train(models[1], training_args(out_dir, activation_checkpointing=True, **args), callbacks=[probe])
    assert probe.active == [True] * 4
    assert plain.losses == pytest.approx(ckpt.losses, abs=1e-6)
    assert sum(calls) < 4 * 4  # skipped layers were not called


def test_evaluation_during_training_is_dense(out_dir):
    class EvalCheck(TrainerCallback):
        def __init__(self):
            self.checked = 0

        def on_step_end(self, args, state, control, model=None, **kwargs):
            # layers are patched now; eval mode must give the unpatched model's logits
            reference = tiny_llava()
            reference.load_state_dict(model.state_dict())
            ids = torch.randint(1, 100, (2, 10))
            model.eval()
            with torch.no_grad():
                assert torch.equal(model(input_ids=ids).logits, reference.eval()(input_ids=ids).logits)
            model.train()
            self.checked += 1

    check = EvalCheck()
    train(tiny_llava(), training_args(out_dir, max_steps=2, lds_alpha=1.0, lds_schedule="constant"), callbacks=[check])
    assert check.checked == 2


def test_checkpoint_loads_in_plain_transformers(out_dir):
    model = tiny_llava()
    train(model, training_args(out_dir, max_steps=4, save_strategy="steps", save_steps=2, lds_alpha=0.8))
    reloaded = LlavaForConditionalGeneration.from_pretrained(os.path.join(out_dir, "checkpoint-4"))
    assert list(reloaded.state_dict()) == list(tiny_llava().state_dict())
    ids = torch.randint(1, 100, (2, 10))
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


def test_resume_restores_the_checkpoint_weights(out_dir):
    trained = tiny_llava(seed=0)
    train(trained, training_args(out_dir, max_steps=2, save_strategy="steps", save_steps=2))
    checkpoint = os.path.join(out_dir, "checkpoint-2")
    fresh = tiny_llava(seed=9)
    trainer = STSTrainer(model=fresh, args=training_args(out_dir))
    trainer._load_from_checkpoint(checkpoint)
    # compare with the checkpoint as plain transformers reads it: a silent non-strict load would leave seed-9 weights
    saved = LlavaForConditionalGeneration.from_pretrained(checkpoint).state_dict()
    assert all(torch.equal(fresh.state_dict()[k], saved[k]) for k in saved)
    assert all(torch.equal(fresh.state_dict()[k], trained.state_dict()[k]) for k in saved)


def run_script(out, *extra, launcher=(), timeout=600):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    command = [*launcher, SCRIPT, "--out", str(out), *extra] if launcher else [sys.executable, SCRIPT, "--out", str(out), *extra]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def read_records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_killed_and_resumed_run_repeats_the_uninterrupted_one(tmp_path):
    common = ["--max_steps", "6", "--save_steps", "3", "--grad_accum", "2"]
    full = run_script(tmp_path / "full", *common)
    assert full.returncode == 0, full.stderr[-3000:]
    killed = run_script(tmp_path / "resumed", *common, "--exit_at_step", "3")
    assert killed.returncode == 3, killed.stderr[-3000:]  # died right after writing checkpoint-3
    assert not (tmp_path / "resumed" / "final").exists()
    resumed = run_script(tmp_path / "resumed", *common, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    uninterrupted = read_records(tmp_path / "full" / "layers_rank0.jsonl")
    pieced = read_records(tmp_path / "resumed" / "layers_rank0.jsonl")
    assert len(uninterrupted) == 12  # 6 steps x 2 micro-batches
    assert pieced == uninterrupted  # same skip decisions, step for step
    assert any(len(r["layers"]) < 4 for r in uninterrupted)
    final_full = load_file(tmp_path / "full" / "final" / "model.safetensors")
    final_resumed = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    assert final_full.keys() == final_resumed.keys()
    assert all(torch.equal(final_full[k], final_resumed[k]) for k in final_full)


# ---- two processes ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "launcher_name, extra",
    [
        ("torchrun", []),
        ("torchrun", ["--activation_checkpointing"]),
        ("deepspeed", ["--deepspeed", "configs/zero2.json"]),
        ("deepspeed", ["--deepspeed", "configs/zero3.json"]),
    ],
    ids=["ddp", "ddp-checkpointing", "zero2", "zero3"],
)
def test_two_ranks_make_identical_decisions(tmp_path, launcher_name, extra):
    bin_dir = os.path.dirname(sys.executable)
    if launcher_name == "torchrun":
        launcher = [os.path.join(bin_dir, "torchrun"), "--nproc_per_node", "2", "--master_port", "29611"]
    else:
        launcher = [os.path.join(bin_dir, "deepspeed"), "--num_gpus", "2", "--master_port", "29612"]
    result = run_script(tmp_path, "--max_steps", "6", *extra, launcher=launcher)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    result = json.loads((tmp_path / "result.json").read_text())
    assert (result["global_step"], result["world_size"], len(result["losses"])) == (6, 2, 6)
    rank0 = read_records(tmp_path / "layers_rank0.jsonl")
    rank1 = read_records(tmp_path / "layers_rank1.jsonl")
    assert len(rank0) == 6 and rank0 == rank1
    assert any(len(r["layers"]) < 4 for r in rank0)  # layers were skipped
    assert (tmp_path / "final" / "model.safetensors").exists()


VTC_IN_INSTRUCTION = ["--sts_vtc", "on", "--vtc_keep_ratio", "0.25", "--vtc_full_token_fraction", "0.4"]


def _expected_visual_tokens(steps):
    """Image placeholders one rank's language model receives per step: 2 images of 16 tokens, 4 each when pruned."""
    from sts_trainer.token_compression import is_full_token_step

    return [32 if is_full_token_step(0, step, 0.4) else 8 for step in range(steps)]


def test_full_token_steps_repeat_after_a_resume(tmp_path):
    common = ["--max_steps", "6", "--save_steps", "3", *VTC_IN_INSTRUCTION]
    assert run_script(tmp_path / "full", *common).returncode == 0
    assert run_script(tmp_path / "resumed", *common, "--exit_at_step", "3").returncode == 3
    resumed = run_script(tmp_path / "resumed", *common, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    uninterrupted = read_records(tmp_path / "full" / "layers_rank0.jsonl")
    assert [r["visual"] for r in uninterrupted] == _expected_visual_tokens(6)
    assert len(set(_expected_visual_tokens(6))) == 2  # both kinds of step occur
    assert read_records(tmp_path / "resumed" / "layers_rank0.jsonl") == uninterrupted


def test_full_token_steps_and_skipped_layers_are_the_same_on_both_ranks(tmp_path):
    launcher = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node", "2",
                "--master_port", "29613"]
    result = run_script(tmp_path, "--max_steps", "6", *VTC_IN_INSTRUCTION, launcher=launcher)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    rank0 = read_records(tmp_path / "layers_rank0.jsonl")
    assert rank0 == read_records(tmp_path / "layers_rank1.jsonl")
    assert [r["visual"] for r in rank0] == _expected_visual_tokens(6)
    assert any(len(r["layers"]) < 4 for r in rank0)


def test_load_best_model_at_end_restores_the_best_checkpoint(out_dir):
    from .helpers import tiny_dataset

    model = tiny_llava()
    args = training_args(
        out_dir, max_steps=4, eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1,
        load_best_model_at_end=True, metric_for_best_model="eval_loss", learning_rate=0.5,
    )
    trainer, _ = train(model, args, eval_dataset=tiny_dataset(8, seed=5))
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-4")  # training diverges: an earlier one is best
    saved = LlavaForConditionalGeneration.from_pretrained(best).state_dict()
    assert all(torch.equal(model.state_dict()[k], saved[k]) for k in saved)


def test_the_component_on_a_bare_model_without_a_trainer():
    """install / micro_batch / remove: inside the block the drawn layers never run (forward or backward)."""
    model = tiny_llava()
    calls = [0] * 4
    for i, layer in enumerate(layers_of(model)):
        layer.register_forward_pre_hook(lambda module, args, _i=i: calls.__setitem__(_i, calls[_i] + 1))
    skipper = LayerSkipper(alpha=1.0, epsilon=1.0, schedule="constant", seed=0)  # p = 0, 2/3, 1, 1
    skipper.install(model)
    batch = collate(synthetic_samples(2, tiny_llava_config()))
    with skipper.micro_batch(step=0, micro_step=0, max_steps=10) as record:
        model(**batch).loss.backward()
    assert record.probabilities[0] == 0.0 and record.skipped[2:] == [True, True]
    assert calls == [0 if skipped else 1 for skipped in record.skipped]
    assert record.executed_layers == calls.count(1) and record.skipped_fraction == calls.count(0) / 4
    assert all(p.grad is None for i in (2, 3) for p in layers_of(model)[i].parameters())
    model(**batch)  # outside the block: every layer runs
    assert calls == [1 + (not skipped) for skipped in record.skipped]
    skipper.remove()
    assert not any(isinstance(layer, _SkippableLayer) for layer in layers_of(model))


# ---- lds_layer_order='redundancy' -------------------------------------------------------------------------------------


def test_redundancy_ranks_order_layers_by_how_little_they_change_the_stream():
    from sts_trainer.layer_skip import redundancy_ranks

    assert redundancy_ranks([0.9, 0.5, 0.99, 0.7]) == [2, 0, 3, 1]  # the most similar (redundant) last
    assert redundancy_ranks([0.8, 0.8, 0.8]) == [0, 1, 2]  # ties keep depth order
    assert redundancy_ranks([0.9, None, 0.2]) == [2, 0, 1]  # not measured: treated as changing it most


def _identity_layers(model, which):
    """Make decoder layers `which` the identity on the residual stream (their output projections zero)."""
    for i in which:
        layer = layers_of(model)[i]
        torch.nn.init.zeros_(layer.self_attn.o_proj.weight)
        torch.nn.init.zeros_(layer.mlp.down_proj.weight)


def test_redundancy_order_skips_the_layers_that_change_the_stream_least(out_dir):
    model = tiny_llava()
    _identity_layers(model, (0, 1))  # the two shallowest layers do nothing: depth order would protect them most
    args = training_args(out_dir, max_steps=8, learning_rate=0.0, lds_alpha=0.4, lds_epsilon=0.5,
                         lds_schedule="constant", lds_layer_order="redundancy", lds_rerank_every=3)
    trainer, logs = train(model, args)
    records = trainer.sts_ledger.records
    depth = [skip_probability(0, 8, l, 4, 0.4, 0.5, "constant") for l in range(4)]
    assert records[0].skip_probabilities == pytest.approx(depth)  # depth order until the first ranking (step 3)
    ranked = records[-1].skip_probabilities
    assert sorted(ranked) == pytest.approx(sorted(depth))  # the same factors, so the same mean rate
    assert min(ranked[0], ranked[1]) > max(ranked[2], ranked[3])  # the identity layers are skipped most
    assert sum(ranked) == pytest.approx(sum(depth))
    assert trainer.sts_plan.lds and "order=redundancy (every 3 steps)" in trainer.sts_plan.describe()


def test_redundancy_measures_training_forwards_only_and_pickles_without_its_meter():
    model = tiny_llava()
    skipper = LayerSkipper(alpha=0.0, order="redundancy", rerank_every=1)
    skipper.install(model)
    ids = torch.randint(1, 100, (2, 10))
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    assert [m.count for m in skipper._meters] == [0, 0, 0, 0]
    model.train()
    with skipper.micro_batch(0, 0, 10):
        model(input_ids=ids)
    assert [m.count for m in skipper._meters] == [1, 1, 1, 1]
    similarity = [total / count for total, count in skipper.measured()]
    assert all(-1.0 <= s <= 1.0 for s in similarity)
    copied = copy.deepcopy(model)
    assert all("_sts_meter" not in layer.__dict__ for layer in layers_of(copied))
    with skipper.micro_batch(1, 0, 10):  # the ranking at step 1 comes from step 0's forward
        model(input_ids=ids)
    assert skipper.similarity == pytest.approx(similarity) and skipper._ranked_at == 1
    skipper.remove()
    assert all("_sts_meter" not in layer.__dict__ for layer in layers_of(model))
    with pytest.raises(ValueError, match="order="):
        LayerSkipper(order="width")
    with pytest.raises(ValueError, match="rerank_every"):
        LayerSkipper(order="redundancy", rerank_every=0)


def test_redundancy_ranking_state_resumes_as_one_measurement():
    skipper = LayerSkipper(order="redundancy")
    skipper.install(tiny_llava())
    skipper.load_state({"measured": [[1.8, 2], [0.5, 1], [0.0, 0], [2.7, 3]], "ranks": [1, 0, 2, 3],
                        "similarity": [0.9, 0.5, None, 0.9], "ranked_at": 25})
    assert skipper.ranks == [1, 0, 2, 3] and skipper._ranked_at == 25
    skipper._meters[2].sum, skipper._meters[2].count = torch.tensor(0.25), 1  # measured after the resume
    assert skipper.measured() == [(1.8, 2), (0.5, 1), (0.25, 1), (2.7, 3)]
    with pytest.raises(ValueError, match="3 layers, the model 4"):
        skipper.load_state({"measured": [[0.0, 0]] * 3, "ranks": None, "similarity": None, "ranked_at": None})
    assert LayerSkipper().state() is None  # depth order keeps no state


def test_redundancy_order_repeats_after_a_resume_and_agrees_between_ranks(tmp_path):
    redundancy = ["--lds_layer_order", "redundancy", "--lds_rerank_every", "2", "--lds_alpha", "0.5"]
    common = ["--max_steps", "6", "--save_steps", "3", *redundancy]
    assert run_script(tmp_path / "full", *common).returncode == 0
    assert run_script(tmp_path / "resumed", *common, "--exit_at_step", "3").returncode == 3
    resumed = run_script(tmp_path / "resumed", *common, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    full = json.loads((tmp_path / "full" / "lds_rank0.json").read_text())
    again = json.loads((tmp_path / "resumed" / "lds_rank0.json").read_text())
    assert full["ranked_at"] == again["ranked_at"] == 4 and full["ranks"] == again["ranks"]
    assert again["similarity"] == pytest.approx(full["similarity"], abs=1e-6)
    assert read_records(tmp_path / "resumed" / "layers_rank0.jsonl") == read_records(
        tmp_path / "full" / "layers_rank0.jsonl")

    launcher = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node", "2",
                "--master_port", "29615"]
    result = run_script(tmp_path / "ddp", "--max_steps", "6", *redundancy, launcher=launcher)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    rank0, rank1 = (json.loads((tmp_path / "ddp" / f"lds_rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["local"] != rank1["local"]  # each rank measured its own batches
    for layer, (whole, a, b) in enumerate(zip(rank0["whole"], rank0["local"], rank1["local"])):
        assert whole == pytest.approx([a[0] + b[0], a[1] + b[1]])  # the ranking reads every rank's measurements
    assert rank0["ranks"] == rank1["ranks"] and rank0["similarity"] == rank1["similarity"]
    assert read_records(tmp_path / "ddp" / "layers_rank0.jsonl") == read_records(tmp_path / "ddp" /
                                                                                   "layers_rank1.jsonl")
