import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from sts_trainer.token_compression import (
    compress_batch,
    instruction_indices,
    num_kept,
    random_indices,
    uniform_indices,
)
from sts_trainer.layer_skip import decision_generator
from sts_trainer.tiny import IMAGE_TOKEN_ID, collate, freeze_for_alignment, synthetic_samples, tiny_llava, tiny_llava_config

from .helpers import ListDataset, train, training_args

TOKENS_PER_IMAGE = 16  # tiny_llava_config(): 32 px images, 8 px patches


def test_num_kept_rounds_half_up_and_keeps_at_least_one():
    assert [num_kept(16, r) for r in (1.0, 0.5, 0.25, 0.1, 0.01)] == [16, 8, 4, 2, 1]
    assert num_kept(3, 0.5) == 2  # 1.5 rounds up
    assert num_kept(5, 0.1) == 1  # 0.5 rounds up
    assert num_kept(576, 0.5) == 288 and num_kept(576, 0.25) == 144


def test_uniform_keeps_the_expected_indices():
    # 4 x 4 grid keeping 2 x 2: rows and columns 1 and 3
    assert uniform_indices(16, 4).tolist() == [5, 7, 13, 15]
    # 8 of 16 is not a square: every second token in raster order, centred
    assert uniform_indices(16, 8).tolist() == [1, 3, 5, 7, 9, 11, 13, 15]
    assert uniform_indices(10, 3).tolist() == [1, 5, 8]
    assert uniform_indices(16, 16).tolist() == list(range(16))
    # 24 x 24 (LLaVA-1.5) keeping 12 x 12: a stride-2 lattice
    kept = uniform_indices(576, 144)
    assert kept.tolist() == [r * 24 + c for r in range(1, 24, 2) for c in range(1, 24, 2)]


def test_random_is_reproducible_from_seed_and_step_and_changes_with_step():
    a = random_indices(16, 8, decision_generator(0, 5, 0, 1))
    b = random_indices(16, 8, decision_generator(0, 5, 0, 1))
    c = random_indices(16, 8, decision_generator(0, 6, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.tolist() == sorted(set(a.tolist())) and len(a) == 8


def test_instruction_keeps_the_most_similar_tokens_in_order():
    features = torch.tensor(
        [[0.0, 1, 0, 0], [0.2, 0.9, 0, 0], [3.0, 0.1, 0, 0], [0, 0, 1, 0], [-1.0, 0, 0, 0], [1.0, 0, 0.05, 0]]
    )
    query = torch.tensor([2.0, 0, 0, 0])
    assert instruction_indices(features, query, 2).tolist() == [2, 5]
    assert instruction_indices(features, query, 3).tolist() == [1, 2, 5]


def test_instruction_strategy_uses_the_instruction_text_embeddings():
    # Vocabulary of 8 ids; the instruction tokens 1, 2 embed to e0 + e1 directions, the answer token 3 to e3.
    embed = nn.Embedding(8, 4)
    with torch.no_grad():
        embed.weight.zero_()
        embed.weight[1] = torch.tensor([1.0, 0, 0, 0])
        embed.weight[2] = torch.tensor([1.0, 0.2, 0, 0])
        embed.weight[3] = torch.tensor([0, 0, 0, 5.0])
    image = 7
    input_ids = torch.tensor([[1, 2, image, image, image, image, 3, 3]])
    labels = torch.tensor([[-100] * 6 + [3, 3]])
    features = torch.tensor([[0, 0, 0, 1.0], [1.0, 0.1, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 2.0]])
    out, _ = compress_batch(
        {"input_ids": input_ids, "labels": labels}, [features], image, 0.5, "instruction", "compact", embed_tokens=embed
    )
    kept = out["mm_encoder_outputs"]["image"].pooler_output[0]
    # Most similar to the instruction's mean embedding: tokens 1 and 2 (not 0 and 3, which match the answer).
    assert torch.equal(kept, features[[1, 2]])


def make_batch(images_per_sample=(1, 0, 2, 1), padding_side="right", seed=0):
    config = tiny_llava_config()
    samples = synthetic_samples(len(images_per_sample), config, images_per_sample, seed=seed)
    return collate(samples, padding_side), config


def fake_features(batch, dim=8):
    n_images = batch["pixel_values"].shape[0]
    return list(torch.randn(n_images, TOKENS_PER_IMAGE, dim))


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("strategy", ["uniform", "random", "instruction"])
@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.25])
def test_labels_and_text_stay_aligned(padding_side, strategy, ratio):
    batch, _ = make_batch(padding_side=padding_side)
    features = fake_features(batch)
    out, stats = compress_batch(
        dict(batch), features, IMAGE_TOKEN_ID, ratio, strategy, "compact",
        embed_tokens=nn.Embedding(128, 8), generator=decision_generator(0, 0, 0, 1),
    )
    k = num_kept(TOKENS_PER_IMAGE, ratio)
    images = [1, 0, 2, 1]
    assert stats.kept_tokens == k * sum(images) and stats.visual_tokens == TOKENS_PER_IMAGE * sum(images)
    for row, n_images in enumerate(images):
        old_real = batch["attention_mask"][row].bool()
        new_real = out["attention_mask"][row].bool()
        old_ids, new_ids = batch["input_ids"][row][old_real], out["input_ids"][row][new_real]
        assert len(new_ids) == len(old_ids) - n_images * (TOKENS_PER_IMAGE - k)
        # text tokens: the same, in the same order; image placeholders: exactly the kept ones
        assert torch.equal(old_ids[old_ids != IMAGE_TOKEN_ID], new_ids[new_ids != IMAGE_TOKEN_ID])
        assert int((new_ids == IMAGE_TOKEN_ID).sum()) == n_images * k
        # the loss-carrying labels are the same tokens, and each is still preceded by the same input token
        old_labels, new_labels = batch["labels"][row], out["labels"][row]
        assert torch.equal(old_labels[old_labels != -100], new_labels[new_labels != -100])
        old_prev = batch["input_ids"][row][:-1][old_labels[1:] != -100]
        new_prev = out["input_ids"][row][:-1][new_labels[1:] != -100]
        assert torch.equal(old_prev, new_prev)
        # padding stays on its side
        if padding_side == "right":
            assert new_real[: int(new_real.sum())].all()
        else:
            assert new_real[len(new_real) - int(new_real.sum()) :].all()
    assert out["input_ids"].shape[1] == max(int(out["attention_mask"][r].sum()) for r in range(4))
    assert "pixel_values" not in out


def test_position_ids_compact_and_original():
    batch, _ = make_batch(images_per_sample=(1, 2))
    features = fake_features(batch)
    out, _ = compress_batch(dict(batch), features, IMAGE_TOKEN_ID, 0.25, "uniform", "compact")
    assert "position_ids" not in out  # the model numbers the shorter sequence 0..L'-1 itself
    out, _ = compress_batch(dict(batch), features, IMAGE_TOKEN_ID, 0.25, "uniform", "original")
    for row in range(2):
        real = out["attention_mask"][row].bool()
        positions = out["position_ids"][row][real]
        old_ids = batch["input_ids"][row]
        # original positions: strictly increasing, and each kept token sits where it sat in the full sequence
        assert torch.equal(old_ids[positions], out["input_ids"][row][real])
        assert (positions.diff() > 0).all()
    # given position ids (left padding, counted from the first real token) are compacted or kept
    left, _ = make_batch(images_per_sample=(1, 2), padding_side="left")
    left["position_ids"] = (left["attention_mask"].cumsum(1) - 1).clamp(min=0)
    out, _ = compress_batch(dict(left), fake_features(left), IMAGE_TOKEN_ID, 0.25, "uniform", "compact")
    for row in range(2):
        real = out["attention_mask"][row].bool()
        assert out["position_ids"][row][real].tolist() == list(range(int(real.sum())))


def test_mismatched_placeholders_name_the_sample_and_both_counts():
    batch, _ = make_batch(images_per_sample=(1, 1, 1))
    first = int((batch["input_ids"][1] == IMAGE_TOKEN_ID).nonzero()[0])
    batch["input_ids"][1, first : first + 3] = 5  # sample 1 loses 3 of its 16 placeholders
    with pytest.raises(ValueError, match=r"Sample 1 of the batch has 13 image placeholder tokens.*number 16"):
        compress_batch(dict(batch), fake_features(batch), IMAGE_TOKEN_ID, 0.5, "uniform", "compact")
    batch, _ = make_batch(images_per_sample=(1, 1))
    with pytest.raises(ValueError, match=r"3 images.*account for only 2"):
        compress_batch(dict(batch), fake_features(batch) + fake_features(batch)[:1], IMAGE_TOKEN_ID, 0.5, "uniform", "compact")


def test_a_labelled_image_token_is_an_error():
    batch, _ = make_batch(images_per_sample=(1,))
    batch["labels"][0, 8] = 3
    with pytest.raises(ValueError, match="Sample 0 .* loss label on an image placeholder"):
        compress_batch(dict(batch), fake_features(batch), IMAGE_TOKEN_ID, 0.5, "uniform", "compact")


def test_gradients_reach_the_projector_through_kept_tokens_only():
    model = freeze_for_alignment(tiny_llava())
    batch, _ = make_batch(images_per_sample=(1, 1))
    features = model.get_image_features(pixel_values=batch["pixel_values"], return_dict=True).pooler_output
    features = [f.detach().requires_grad_() for f in features]
    out, _ = compress_batch(dict(batch), features, IMAGE_TOKEN_ID, 0.25, "uniform", "compact")
    model(**out).loss.backward()
    kept = uniform_indices(TOKENS_PER_IMAGE, 4)
    for f in features:
        norms = f.grad.norm(dim=-1)
        assert (norms[kept] > 0).all()
        dropped = torch.ones(TOKENS_PER_IMAGE, dtype=torch.bool)
        dropped[kept] = False
        assert (norms[dropped] == 0).all()


class LengthProbe:
    """Records the sequence entering the first decoder layer and the language model, per forward."""

    def __init__(self, model):
        self.records = []
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.handles = [
            base.model.language_model.register_forward_pre_hook(self._lm, with_kwargs=True),
            base.model.language_model.layers[0].register_forward_pre_hook(self._layer, with_kwargs=True),
        ]

    def _lm(self, module, args, kwargs):
        mask = kwargs["attention_mask"]
        self.records.append({"training": module.training, "row_lengths": mask.sum(1).tolist(), "position_ids": kwargs.get("position_ids")})

    def _layer(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        self.records[-1]["layer0_length"] = hidden.shape[1]


def expected_row_lengths(samples, ratio):
    lengths = []
    for s in samples:
        n_images = 0 if "pixel_values" not in s else s["pixel_values"].shape[0]
        text = len(s["input_ids"]) - n_images * TOKENS_PER_IMAGE
        lengths.append(text + n_images * num_kept(TOKENS_PER_IMAGE, ratio))
    return lengths


@pytest.mark.parametrize(
    "strategy, position_ids, padding_side",
    [
        ("uniform", "compact", "right"),
        ("random", "compact", "left"),
        ("instruction", "compact", "right"),
        ("uniform", "original", "left"),
        ("random", "original", "right"),
        ("instruction", "original", "left"),
    ],
)
def test_first_decoder_layer_sees_text_plus_kept_visual_tokens(out_dir, strategy, position_ids, padding_side):
    config = tiny_llava_config()
    samples = synthetic_samples(8, config, images_per_sample=(1, 0, 2, 1), seed=3)
    model = freeze_for_alignment(tiny_llava())
    probe = LengthProbe(model)
    args = training_args(
        out_dir, max_steps=2, vtc_keep_ratio=0.25, vtc_strategy=strategy, vtc_position_ids=position_ids,
        per_device_train_batch_size=4,
    )
    trainer, recorder = train(model, args, ListDataset(samples), padding_side=padding_side)
    assert len(probe.records) == 2
    seen = sorted(sum((r["row_lengths"] for r in probe.records), []))
    assert seen == sorted(expected_row_lengths(samples, 0.25))
    for record in probe.records:
        assert record["layer0_length"] == max(record["row_lengths"])
        assert (record["position_ids"] is not None) == (position_ids == "original")
    logged = [log for log in recorder.logs if "loss" in log]
    assert logged[0]["vtc_kept_fraction"] == pytest.approx(4 / 16)
    assert logged[0]["vtc_input_length_after"] < logged[0]["vtc_input_length_before"]


@pytest.mark.parametrize("strategy", ["uniform", "random", "instruction"])
@pytest.mark.parametrize("position_ids", ["compact", "original"])
def test_keep_ratio_one_gives_the_losses_of_training_without_vtc(out_dir, strategy, position_ids):
    models = [freeze_for_alignment(tiny_llava(seed=2)) for _ in range(2)]
    dataset = ListDataset(synthetic_samples(16, tiny_llava_config(), (1, 0, 2), seed=1))
    _, dense = train(models[0], training_args(out_dir, sts_stage="none"), dataset)
    probe = LengthProbe(models[1])
    trainer, sparse = train(
        models[1],
        training_args(out_dir, sts_stage="alignment", vtc_keep_ratio=1.0, vtc_strategy=strategy, vtc_position_ids=position_ids),
        dataset,
    )
    assert trainer.sts_plan.vtc and all(log["vtc_kept_fraction"] == 1.0 for log in sparse.logs if "loss" in log)
    assert dense.losses == sparse.losses
    assert all(torch.equal(a, b) for a, b in zip(models[0].parameters(), models[1].parameters()))


def test_evaluation_prediction_and_generation_see_the_full_sequence(out_dir):
    config = tiny_llava_config()
    samples = synthetic_samples(8, config, (1, 2), seed=4)
    model = freeze_for_alignment(tiny_llava())
    probe = LengthProbe(model)
    args = training_args(out_dir, max_steps=2, vtc_keep_ratio=0.25, per_device_eval_batch_size=4, eval_strategy="steps", eval_steps=1)
    dataset = ListDataset(samples)
    trainer, _ = train(model, args, dataset, padding_side="right", eval_dataset=dataset)
    train_records = [r for r in probe.records if r["training"]]
    eval_records = [r for r in probe.records if not r["training"]]
    assert train_records and eval_records
    full = sorted(expected_row_lengths(samples, 1.0))
    assert sorted(sum((r["row_lengths"] for r in eval_records[:2]), [])) == full
    # after training: evaluate/predict/generate are dense too
    probe.records.clear()
    metrics = trainer.evaluate(dataset)
    trainer.predict(dataset)
    batch = collate(samples[:2])
    model.eval()
    with torch.no_grad():
        dense_loss = model(**batch).loss
        model.generate(**{k: v for k, v in batch.items() if k != "labels"}, max_new_tokens=2, do_sample=False)
    assert all(sorted(r["row_lengths"]) == sorted(expected_row_lengths(samples[i * 4 : i * 4 + 4], 1.0)) for i, r in enumerate(probe.records[:2]))
    assert probe.records[-1]["row_lengths"][0] >= full[0]  # generation's prefill: full prompt
    assert metrics["eval_loss"] > 0 and torch.isfinite(dense_loss)


def test_vtc_with_gradient_checkpointing_and_a_peft_model(out_dir):
    config = tiny_llava_config()
    samples = synthetic_samples(8, config, (1,), seed=5)
    model = tiny_llava()
    for p in model.parameters():
        p.requires_grad = False
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["linear_1", "linear_2"]))  # LoRA on the projector
    probe = LengthProbe(model)
    projector_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = training_args(out_dir, max_steps=2, vtc_keep_ratio=0.5, activation_checkpointing=True)
    trainer, _ = train(model, args, ListDataset(samples))
    assert trainer.sts_plan.stage == "alignment" and trainer.sts_plan.vtc
    assert sorted(sum((r["row_lengths"] for r in probe.records), [])) == sorted(expected_row_lengths(samples, 0.5))
    changed = [n for n, p in model.named_parameters() if n in projector_before and not torch.equal(p, projector_before[n])]
    assert changed  # gradients reached the projector's adapters through the kept tokens
