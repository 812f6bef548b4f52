import json
import os

import pytest
from transformers import Trainer

from sts_trainer.flops import micro_batch_flops
from sts_trainer.lab.tiny import freeze_for_alignment, tiny_llava, tiny_llava_config

from .helpers import plain_training_args, train, training_args


def test_vtc_run_reports_actual_flops_and_writes_the_report(out_dir, capsys):
    model = freeze_for_alignment(tiny_llava())
    lengths = []  # dense batch lengths; this hook runs before VTC's, which is added when training starts
    model.register_forward_pre_hook(lambda m, a, kw: lengths.append(kw["input_ids"].shape[1]), with_kwargs=True)
    trainer, recorder = train(model, training_args(out_dir, max_steps=3, vtc_keep_ratio=0.25))
    report = json.load(open(os.path.join(out_dir, "sts_savings.json")))
    totals = report["totals"]
    assert totals["stage"] == "alignment" and totals["optimizer_steps"] == 3 and totals["micro_batches"] == 3
    assert 0 < totals["actual_flops"] < totals["dense_flops"]
    assert totals["mean_kept_visual_fraction"] == pytest.approx(0.25)
    assert os.path.getsize(os.path.join(out_dir, "sts_savings.png")) > 1000
    # Trainer's total_flos is the sum of the actual FLOPs
    assert trainer.state.total_flos == pytest.approx(sum(int(r["actual_flops"]) for r in report["micro_batches"]))
    # the first batch: 4 samples of one image each; VTC drops 12 of the 16 tokens of every row
    config = tiny_llava_config()
    flags = dict(train_vision=False, train_projector=True, train_llm=False)
    first = report["micro_batches"][0]
    assert first["dense_flops"] == pytest.approx(micro_batch_flops(config, 4, lengths[0], 4, **flags))
    assert first["actual_flops"] == pytest.approx(micro_batch_flops(config, 4, lengths[0] - 12, 4, **flags))
    logged = [log for log in recorder.logs if "loss" in log]
    assert logged[0]["sts_flops_dense"] == pytest.approx(first["dense_flops"])
    assert logged[0]["sts_flops_saving"] == pytest.approx(1 - first["actual_flops"] / first["dense_flops"])
    assert "STS savings (alignment stage, 3 steps" in capsys.readouterr().out


def test_lds_run_counts_only_executed_layers(out_dir):
    trainer, _ = train(tiny_llava(), training_args(out_dir, max_steps=4, lds_alpha=1.0, lds_epsilon=1.0, lds_schedule="constant"))
    records = trainer.sts_ledger.records
    config = tiny_llava_config()
    flags = dict(train_vision=True, train_projector=True, train_llm=True)
    for r in records:
        executed = round(4 * (1 - r.skipped_fraction))
        assert executed < 4  # the last layer always skips
        assert r.actual_flops == pytest.approx(micro_batch_flops(config, 4, 28, 4, executed_layers=executed, **flags), rel=0.2)
        assert r.actual_flops < r.dense_flops
    assert trainer.sts_ledger.totals()["flops_saving"] > 0.2


def test_sparsity_off_keeps_trainers_flops_and_writes_no_report(out_dir):
    sts, _ = train(tiny_llava(), training_args(out_dir, sts_stage="none"))
    plain, _ = train(tiny_llava(), plain_training_args(out_dir + "-plain"), trainer_cls=Trainer)
    assert sts.state.total_flos == plain.state.total_flos > 0
    assert not os.path.exists(os.path.join(out_dir, "sts_savings.json"))


def test_the_report_shows_the_keep_ratio_and_the_full_token_steps(tmp_path):
    from sts_trainer.savings import MicroBatchRecord, SavingsLedger

    ledger = SavingsLedger("instruction")
    for step, (ratio, full) in enumerate([(0.1, False), (0.4, True), (0.7, False), (1.0, False)]):
        for _ in range(2):  # two micro-batches per step
            ledger.add(MicroBatchRecord(step, 10.0, 5.0, kept_fraction=1.0 if full else ratio, keep_ratio=ratio,
                                        full_tokens=full))
    totals = ledger.totals()
    assert totals["mean_scheduled_keep_ratio"] == pytest.approx(0.55) and totals["full_token_steps"] == 1
    assert "VTC keep ratio 0.550 on average (schedule); 1 of 4 steps with every token" in ledger.summary()
    paths = ledger.write(str(tmp_path))
    assert os.path.getsize(paths["plot"]) > 1000
    assert SavingsLedger.from_dict(ledger.to_dict()).totals() == totals
    assert SavingsLedger("alignment", [MicroBatchRecord(0, 1.0, 1.0)]).totals()["full_token_steps"] is None
