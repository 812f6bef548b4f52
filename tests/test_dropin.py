"""The drop-in promise, on patterns of transformers' own Trainer tests: `STSTrainer` in place of `Trainer`, default
arguments, leaves the same output folder, losses, metrics and checkpoints, wherever STS has nothing to do or turns
itself off (under 'auto', an incompatible setting turns the component off with one warning)."""

import os

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from sts_trainer import STSTrainer

from .helpers import ListDataset, LossRecorder


class RegressionModel(nn.Module):
    """transformers' tests' `RegressionModel`: y = a * x + b, MSE loss, outputs (loss, y)."""

    def __init__(self, a=0.0, b=0.0):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a).float())
        self.b = nn.Parameter(torch.tensor(b).float())
        self.config = None

    def forward(self, input_x, labels=None, **kwargs):
        y = input_x * self.a + self.b
        if labels is None:
            return (y,)
        return (nn.functional.mse_loss(y, labels), y)


def regression_data(n, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=generator)
    y = 2.0 * x + 3.0 + 0.1 * torch.randn(n, generator=generator)
    return ListDataset([{"input_x": x[i], "labels": y[i]} for i in range(n)])


def tiny_causal_lm():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))


def lm_data(n, seed):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (n, 12), generator=generator)
    return ListDataset([{"input_ids": ids[i], "labels": ids[i]} for i in range(n)])


def folder(out):
    return sorted(os.path.relpath(os.path.join(root, name), out) for root, _, names in os.walk(out) for name in names)


PATTERNS = {
    # transformers' test_save_best_checkpoint: save_strategy="best" keeps the best evaluation's checkpoint only
    "save_strategy_best": (lambda: RegressionModel(), regression_data, dict(
        eval_strategy="steps", eval_steps=2, save_strategy="best", metric_for_best_model="eval_loss",
        learning_rate=0.1)),
    # test_checkpoint_rotation: save_total_limit keeps the newest checkpoints
    "checkpoint_rotation": (lambda: RegressionModel(), regression_data, dict(
        save_strategy="steps", save_steps=1, save_total_limit=2, learning_rate=0.1)),
    # a text-only causal LM STS knows (LDS under 'auto') with torch_compile: LDS turns itself off
    "torch_compile": (tiny_causal_lm, lm_data, dict(
        torch_compile=True, torch_compile_backend="eager", save_strategy="steps", save_steps=3)),
}


def _run(trainer_cls, pattern, out):
    make_model, make_data, options = PATTERNS[pattern]
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=4, max_steps=6, logging_steps=1,
                             report_to=[], use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0,
                             **options)
    recorder = LossRecorder()
    trainer = trainer_cls(model=make_model(), args=args, train_dataset=make_data(24, 0),
                          eval_dataset=make_data(8, 1), callbacks=[recorder])
    result = trainer.train()
    metrics = trainer.evaluate()
    return trainer, recorder, result, metrics


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_sts_trainer_leaves_what_trainer_leaves(pattern, tmp_path, caplog):
    plain, plain_log, plain_result, plain_metrics = _run(Trainer, pattern, str(tmp_path / "plain"))
    with caplog.at_level("WARNING", logger="sts_trainer"):
        sts, sts_log, sts_result, sts_metrics = _run(STSTrainer, pattern, str(tmp_path / "sts"))
    assert folder(tmp_path / "plain") == folder(tmp_path / "sts")
    assert len(plain_log.losses) == 6 and plain_log.losses == sts_log.losses
    assert plain_result.training_loss == sts_result.training_loss
    assert plain_metrics["eval_loss"] == sts_metrics["eval_loss"]
    best = [t.state.best_model_checkpoint for t in (plain, sts)]
    assert [None if b is None else os.path.basename(b) for b in best] == [
        None if best[0] is None else os.path.basename(best[0])] * 2
    assert sts.sts_plan.not_sparsified  # nothing sparsified, and the one warning says why
    reasons = [r.getMessage() for r in caplog.records if "not sparsified" in r.getMessage()]
    assert len(reasons) == 1
    if pattern == "torch_compile":
        assert "torch_compile=True cannot be combined with LDS" in reasons[0] and "sts_lds='on'" in reasons[0]
    if pattern == "checkpoint_rotation":
        assert [f.split("/")[0] for f in folder(tmp_path / "sts") if f.endswith("trainer_state.json")] == [
            "checkpoint-5", "checkpoint-6"]
