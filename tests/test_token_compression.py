
import itertools
import math
import os

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import (
    Mistral3Config,
    MistralConfig,
    PixtralVisionConfig,
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from sts_trainer.lab.synthetic import build_tokenizer_and_processor
from sts_trainer.lab.tiny import (
    IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
    collate,
    freeze_for_alignment,
    synthetic_samples,
    tiny_llava,
    tiny_llava_config,
)
from sts_trainer.randomness import decision_generator
from sts_trainer.token_compression import (
    TokenCompressor,
    compress_batch,
    diverse_indices,
    image_grids,
    instruction_indices,
    is_full_token_step,
    keep_ratio_at,
    num_kept,
    pool_features,
    pool_groups,
    random_indices,
    template_token_ids,
    uniform_indices,
)

from .helpers import ListDataset, Received, tiny_dataset, train, training_args

TOKENS_PER_IMAGE = 16  # tiny_llava_config(): 32 px images, 8 px patches
QWEN_START, QWEN_END = 125, 124  # vision start / end tokens of the tiny Qwen2-VL


def tiny_qwen2_vl_config() -> Qwen2VLConfig:
    """Qwen2-VL with 4 px patches merged 2 x 2 (as tests/test_architectures.py builds it)."""
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128, pad_token_id=0, max_position_embeddings=512, bos_token_id=1,
                eos_token_id=2, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3]})
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2)
    return Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN_ID, video_token_id=126,
                         vision_start_token_id=QWEN_START, vision_end_token_id=QWEN_END)


def test_num_kept_rounds_half_up_and_keeps_at_least_one():
    assert [num_kept(16, r) for r in (1.0, 0.5, 0.25, 0.1, 0.01)] == [16, 8, 4, 2, 1]
    assert num_kept(3, 0.5) == 2  # 1.5 rounds up
    assert num_kept(5, 0.1) == 1  # 0.5 rounds up
    assert num_kept(576, 0.5) == 288 and num_kept(576, 0.25) == 144


def test_uniform_keeps_the_expected_indices():
    # 4 x 4 grid keeping 2 x 2: rows and columns 1 and 3
    assert uniform_indices(16, 4, grid=(4, 4)).tolist() == [5, 7, 13, 15]
    # 8 of a 4 x 4 grid: 4 rows of 2 (the strides 1 and 2 are as near as 2 rows of 4 would give; ties go to rows)
    assert uniform_indices(16, 8, grid=(4, 4)).tolist() == [1, 3, 5, 7, 9, 11, 13, 15]
    assert uniform_indices(16, 16, grid=(4, 4)).tolist() == list(range(16))
    # 24 x 24 (LLaVA-1.5) keeping 12 x 12: a stride-2 lattice
    kept = uniform_indices(576, 144, grid=(24, 24))
    assert kept.tolist() == [r * 24 + c for r in range(1, 24, 2) for c in range(1, 24, 2)]
    # no grid: evenly spaced in raster order, centred, whether or not the count is a square
    assert uniform_indices(10, 3).tolist() == [1, 5, 8]
    assert uniform_indices(16, 4).tolist() == [2, 6, 10, 14]
    with pytest.raises(ValueError, match="grid 4 x 5 has 20 tokens, but the image has 16"):
        uniform_indices(16, 4, grid=(4, 5))


def kept_cells(grid, ratio):
    """(rows, cols) of the tokens uniform VTC keeps of an image with this token grid."""
    n = grid[0] * grid[1]
    kept = uniform_indices(n, num_kept(n, ratio), grid)
    return (kept // grid[1]).tolist(), (kept % grid[1]).tolist()


def test_uniform_on_a_qwen2_vl_grid_covers_the_columns_evenly():
    # image_grid_thw (1, 4, 16) in patches, merged 2 x 2: a 2 x 8 grid of language-model tokens
    config = tiny_qwen2_vl_config()
    grids = image_grids(config, {"image_grid_thw": torch.tensor([[1, 4, 16]])}, [16])
    assert grids == [(2, 8)]
    rows, cols = kept_cells(grids[0], 0.25)  # 4 tokens: one row, 4 columns spread over the 8
    assert cols == [1, 3, 5, 7] and rows == [1, 1, 1, 1]
    rows, cols = kept_cells(grids[0], 0.5)  # 8 tokens: both rows, every second column
    assert cols == [1, 3, 5, 7] * 2 and rows == [0] * 4 + [1] * 4


@pytest.mark.parametrize("grid, kept_grid", [((16, 64), (8, 32)), ((18, 32), (9, 16)), ((24, 24), (12, 12))])
def test_uniform_on_wide_grids_spreads_over_the_whole_width(grid, kept_grid):
    rows, cols = kept_cells(grid, 0.25)
    # a lattice of stride 2 both ways, over all rows and all columns
    assert sorted(set(rows)) == list(range(1, grid[0], 2)) and sorted(set(cols)) == list(range(1, grid[1], 2))
    assert len(rows) == kept_grid[0] * kept_grid[1] and len(set(zip(rows, cols))) == len(rows)


@pytest.mark.parametrize("grid, k", [((24, 24), 23), ((4, 4), 5), ((2, 8), 9), ((16, 64), 101)])
def test_uniform_without_an_exact_lattice_still_covers_rows_and_columns(grid, k):
    n = grid[0] * grid[1]
    kept = uniform_indices(n, k, grid)
    rows, cols = kept // grid[1], kept % grid[1]
    assert len(set(kept.tolist())) == k and kept.tolist() == sorted(kept.tolist())
    kept_rows = sorted(set(rows.tolist()))
    per_row = [int((rows == r).sum()) for r in kept_rows]
    assert max(per_row) - min(per_row) <= 1  # k split over the rows as evenly as can be
    # the kept rows and each row's columns spread over the whole height and width (no half left out)
    assert kept_rows[0] < grid[0] / 2 <= kept_rows[-1] or len(kept_rows) == 1
    for r in kept_rows:
        row_cols = cols[rows == r]
        assert row_cols.min() < grid[1] / 2 <= row_cols.max() or len(row_cols) == 1


def test_image_grids_per_architecture():
    qwen = tiny_qwen2_vl_config()
    thw = torch.tensor([[1, 4, 16], [1, 8, 8], [1, 6, 4]])
    assert image_grids(qwen, {"image_grid_thw": thw}, [16, 16, 6]) == [(2, 8), (4, 4), (3, 2)]
    # Mistral3: pixel (h, w) // (patch 8 * merge 2)
    mistral3 = Mistral3Config(
        vision_config=PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, head_dim=16, image_size=64, patch_size=8),
        text_config=MistralConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=128),
        spatial_merge_size=2,
    )
    assert image_grids(mistral3, {"image_sizes": torch.tensor([[32, 64], [64, 48]])}, [8, 12]) == [(2, 4), (4, 3)]
    # fixed resolution: the config's square; a token count that is not that square has no grid
    llava = tiny_llava_config()
    assert image_grids(llava, {}, [16, 17]) == [(4, 4), None]
    assert image_grids(None, {}, [16]) == [None]  # a custom model


def test_compress_batch_uses_each_images_grid():
    batch, _ = make_batch(images_per_sample=(1, 1))
    features = fake_features(batch)
    out, _ = compress_batch(dict(batch), features, IMAGE_TOKEN_ID, 0.25, "uniform", "compact", grids=[(2, 8), (4, 4)])
    kept = out["mm_encoder_outputs"]["image"].pooler_output
    assert torch.equal(kept[0], features[0][[9, 11, 13, 15]]) and torch.equal(kept[1], features[1][[5, 7, 13, 15]])


def test_vtc_keeps_the_expected_grid_positions_of_a_qwen2_vl_image():
    """End to end: a 2 x 8 token image (image_grid_thw (1, 4, 16)) through TokenCompressor on a tiny Qwen2-VL."""
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(tiny_qwen2_vl_config())
    ids = torch.tensor([[3, 4, 5, 6, QWEN_START] + [IMAGE_TOKEN_ID] * 16 + [QWEN_END, 10, 11, 12, 13]])
    batch = {
        "input_ids": ids, "attention_mask": torch.ones_like(ids),
        "labels": torch.cat([torch.full((1, 22), -100), ids[:, 22:]], 1),  # on the answer
        "mm_token_type_ids": (ids == IMAGE_TOKEN_ID).int(), "pixel_values": torch.randn(64, 3 * 2 * 4 * 4),
        "image_grid_thw": torch.tensor([[1, 4, 16]]),
    }
    with torch.no_grad():
        full = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output[0]
    for ratio, expected in [(0.25, [9, 11, 13, 15]), (0.5, [1, 3, 5, 7, 9, 11, 13, 15])]:
        received = Received(model, ratio, "uniform")
        with torch.no_grad():
            model(**batch)
        received.remove()
        kept = received.kwargs["mm_encoder_outputs"]["image"].pooler_output[0]
        torch.testing.assert_close(kept, full[expected])
        # the model's own M-RoPE positions of the kept tokens: (row, column) on the image grid, offset by the text
        positions = received.kwargs["position_ids"][:, 0]  # (3, L')
        is_image = received.kwargs["input_ids"][0] == IMAGE_TOKEN_ID
        t, h, w = positions[:, is_image]
        assert ((h - t) * 8 + (w - t)).tolist() == expected


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
@pytest.mark.parametrize("strategy", ["uniform", "random", "instruction", "diverse", "pool"])
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


@pytest.mark.parametrize(
    "n, k, grid, blocks",
    [
        (16, 4, (4, 4), [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]),  # 2 x 2 blocks
        (16, 8, (4, 4), [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]]),  # 1 x 2
        (16, 4, (2, 8), [[8 * r + c for r in range(2) for c in range(2 * j, 2 * j + 2)] for j in range(4)]),
        (6, 3, None, [[0, 1], [2, 3], [4, 5]]),  # no grid: runs of consecutive tokens
        (4, 4, (2, 2), [[0], [1], [2], [3]]),
    ],
)
def test_pool_blocks_are_neighbours_on_the_grid(n, k, grid, blocks):
    groups = pool_groups(n, k, grid)
    assert [sorted((groups == g).nonzero().squeeze(1).tolist()) for g in range(k)] == blocks


@pytest.mark.parametrize("grid, k", [((24, 24), 288), ((24, 24), 144), ((24, 24), 29), ((27, 27), 365),
                                     ((11, 11), 61), ((7, 5), 17), ((3, 11), 2), (None, 7), (None, 73)])
def test_pool_blocks_cover_every_token_once_and_hold_the_kept_token_order(grid, k):
    n = {None: 35 if k < 35 else 100}.get(grid) or grid[0] * grid[1]
    groups = pool_groups(n, k, grid)
    counts = torch.bincount(groups, minlength=k)
    assert groups.shape == (n,) and len(counts) == k and (counts > 0).all()
    # block g holds the g-th token uniform keeps (uneven strides included), and is made of that token's neighbours:
    # every token's block is on a kept row nearest to the token's row, at a kept column of that row nearest to its
    # column
    kept = uniform_indices(n, k, grid)
    assert torch.equal(groups[kept], torch.arange(k))
    rows, cols = grid or (1, n)
    row, col = torch.arange(n) // cols, torch.arange(n) % cols
    kept_row, kept_col = row[kept], col[kept]
    row_gap = (row[:, None] - kept_row[None, :]).abs()  # (n, k)
    assert torch.equal(row_gap.gather(1, groups[:, None]).squeeze(1), row_gap.min(1).values)
    same_row = kept_row[None, :] == kept_row[groups][:, None]  # (n, k) the kept tokens on the block's row
    col_gap = (col[:, None] - kept_col[None, :]).abs().masked_fill(~same_row, n)
    assert torch.equal(col_gap.gather(1, groups[:, None]).squeeze(1), col_gap.min(1).values)


def test_pool_carries_each_blocks_mean_and_every_token_gets_gradient():
    batch, _ = make_batch(images_per_sample=(1, 1))
    features = [f.requires_grad_() for f in fake_features(batch)]
    out, stats = compress_batch(dict(batch), features, IMAGE_TOKEN_ID, 0.25, "pool", "compact",
                                grids=[(4, 4), None])
    uniform, _ = compress_batch(dict(batch), [f.detach() for f in features], IMAGE_TOKEN_ID, 0.25, "uniform",
                                "compact", grids=[(4, 4), None])
    kept = out["mm_encoder_outputs"]["image"].pooler_output
    # the same sequence as 'uniform' (the same placeholders kept, the same lengths), merged features
    assert torch.equal(out["input_ids"], uniform["input_ids"]) and stats.kept_tokens == 8
    blocks = [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    torch.testing.assert_close(kept[0], torch.stack([features[0][b].mean(0) for b in blocks]))
    torch.testing.assert_close(kept[1], torch.stack([features[1][4 * j : 4 * j + 4].mean(0) for j in range(4)]))
    sum(k.sum() for k in kept).backward()
    for f in features:
        torch.testing.assert_close(f.grad, torch.full_like(f, 0.25))  # each token's share of its block of 4


def test_pool_keeps_keep_always_tokens_as_they_are():
    features = torch.randn(6, 3)
    batch = {"input_ids": torch.tensor([[5] + [IMAGE_TOKEN_ID] * 6 + [7]]), "attention_mask": torch.ones(1, 8).long()}
    fixed = torch.tensor([False, False, True, False, False, True])  # newline tokens, say
    out, _ = compress_batch(batch, [features], IMAGE_TOKEN_ID, 0.5, "pool", "compact", keep_always=[fixed])
    kept = out["mm_encoder_outputs"]["image"].pooler_output[0]
    # 4 selectable tokens (0, 1, 3, 4) pooled into 2, around uniform's kept 1 and 4; tokens 2 and 5 untouched
    torch.testing.assert_close(kept, torch.stack([features[[0, 1]].mean(0), features[2], features[[3, 4]].mean(0),
                                                  features[5]]))


def test_pool_features_keep_the_dtype():
    features = torch.randn(16, 4, dtype=torch.bfloat16)
    pooled = pool_features(features, 4, (4, 4))
    assert pooled.dtype == torch.bfloat16 and pooled.shape == (4, 4)
    with pytest.raises(ValueError, match="Cannot pool 16 tokens into 17"):
        pool_groups(16, 17)


# ---- packed (padding-free) batches ----------------------------------------------------------------------------------


def pack(rows_of_samples):
    """Padding-free rows: each the given samples one after another, positions restarting at 0 per sample, no attention
    mask; a row shorter than the longest ends with a pad sequence of its own (positions from 0, labels -100)."""
    length = max(sum(len(s["input_ids"]) for s in samples) for samples in rows_of_samples)
    rows = {"input_ids": [], "labels": [], "position_ids": []}
    for samples in rows_of_samples:
        pad = length - sum(len(s["input_ids"]) for s in samples)
        rows["input_ids"].append(torch.cat([s["input_ids"] for s in samples] + [torch.full((pad,), PAD_TOKEN_ID)]))
        rows["labels"].append(torch.cat([s["labels"] for s in samples] + [torch.full((pad,), -100)]))
        positions = [torch.arange(len(s["input_ids"])) for s in samples] + [torch.arange(pad)]
        rows["position_ids"].append(torch.cat(positions))
    batch = {key: torch.stack(value) for key, value in rows.items()}
    images = [s["pixel_values"] for samples in rows_of_samples for s in samples if "pixel_values" in s]
    batch["pixel_values"] = torch.cat(images)
    return batch


def sequence_losses(model, batch, strategy):
    """Per-token losses of each sequence the language model gets under VTC (keep 0.25), row by row; a sequence is
    where positions count up from 0 (the whole row without position ids). Sequences without labels are left out."""
    received = Received(model, 0.25, strategy)
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits  # (B, L', V)
    received.remove()
    labels, positions = received.kwargs["labels"], received.kwargs.get("position_ids")
    if positions is None:
        positions = torch.arange(labels.shape[1]).expand_as(labels)
    losses = []
    for row in range(len(labels)):
        bounds = (positions[row] == 0).nonzero().squeeze(1).tolist() + [labels.shape[1]]
        for start, end in zip(bounds, bounds[1:]):
            target = labels[row, start + 1 : end]
            per_token = F.cross_entropy(logits[row, start : end - 1], target, ignore_index=-100, reduction="none")
            if (target != -100).any():
                losses.append(per_token[target != -100])
    return losses, received.kwargs


@pytest.mark.parametrize("strategy", ["uniform", "instruction"])
def test_each_packed_sequence_gets_the_loss_it_gets_alone(strategy):
    model = tiny_llava().eval()
    samples = synthetic_samples(4, tiny_llava_config(), images_per_sample=(1, 2, 1, 1), seed=7)
    batch = pack([samples[:2], samples[2:]])  # rows of 1 + 2 and 1 + 1 images: unequal lengths after VTC
    packed, received = sequence_losses(model, batch, strategy)
    alone = [sequence_losses(model, collate([sample]), strategy)[0][0] for sample in samples]
    assert len(packed) == len(alone) == 4
    for a, b in zip(packed, alone):
        torch.testing.assert_close(a, b)
    assert "attention_mask" not in received  # transformers keeps telling the packed sequences apart


def test_a_packed_batch_stays_packed():
    samples = synthetic_samples(4, tiny_llava_config(), images_per_sample=(1, 2, 1, 1), seed=7)
    batch = pack([samples[:2], samples[2:]])
    out, _ = compress_batch(dict(batch), fake_features(batch), IMAGE_TOKEN_ID, 0.25, "uniform", "compact")
    k = num_kept(TOKENS_PER_IMAGE, 0.25)
    lengths = [len(s["input_ids"]) - s["pixel_values"].shape[0] * (TOKENS_PER_IMAGE - k) for s in samples]
    row_pad = batch["input_ids"].shape[1] - len(samples[2]["input_ids"]) - len(samples[3]["input_ids"])
    width = out["input_ids"].shape[1]
    assert width == lengths[2] + lengths[3] + row_pad and "attention_mask" not in out
    # each sequence numbered from 0 on its own, and the shorter row's padding is a sequence of its own, unlabelled
    filler = width - lengths[0] - lengths[1]
    expected = [list(range(lengths[0])) + list(range(lengths[1])) + list(range(filler)),
                list(range(lengths[2])) + list(range(lengths[3])) + list(range(row_pad))]
    assert out["position_ids"].tolist() == expected
    assert (out["labels"][0, width - filler :] == -100).all()
    assert (out["input_ids"][0, width - filler :] == PAD_TOKEN_ID).all()


def test_flash_attention_and_sequence_inputs_of_a_packed_batch_are_rebuilt():
    """DataCollatorWithFlattening's flash-attention kwargs, sequence index and shifted labels describe the shortened
    sequence, as the collator itself would write them for the compressed samples."""
    from transformers import DataCollatorWithFlattening

    samples = synthetic_samples(3, tiny_llava_config(), images_per_sample=(1, 2, 1), seed=7)
    features = [{"input_ids": s["input_ids"].tolist(), "labels": s["labels"].tolist()} for s in samples]
    collator = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_seq_idx=True, return_tensors="pt")
    batch = collator(features)
    batch["shift_labels"] = torch.cat([batch["labels"][:, 1:], torch.full((1, 1), -100)], 1)
    batch["pixel_values"] = torch.cat([s["pixel_values"] for s in samples])
    out, _ = compress_batch(dict(batch), fake_features(batch), IMAGE_TOKEN_ID, 0.25, "uniform", "compact")
    k = num_kept(TOKENS_PER_IMAGE, 0.25)
    lengths = [len(s["input_ids"]) - s["pixel_values"].shape[0] * (TOKENS_PER_IMAGE - k) for s in samples]
    # what the collator writes for samples of the compressed lengths
    shortened = [{"input_ids": out["input_ids"][0, a:b].tolist(), "labels": out["labels"][0, a:b].tolist()}
                 for a, b in itertools.pairwise([0, *itertools.accumulate(lengths)])]
    expected = collator(shortened)
    for key in ("cu_seq_lens_q", "cu_seq_lens_k", "seq_idx", "position_ids", "labels"):
        assert torch.equal(out[key], expected[key]), key
    assert out["max_length_q"] == out["max_length_k"] == expected["max_length_q"] == max(lengths)
    assert out["cu_seq_lens_q"].dtype == batch["cu_seq_lens_q"].dtype
    shifted = torch.cat([expected["labels"][:, 1:], torch.full((1, 1), -100)], 1)
    shifted[0, torch.tensor(list(itertools.accumulate(lengths)))[:-1] - 1] = -100  # no label across a boundary
    assert torch.equal(out["shift_labels"], shifted)
    # without position ids, they cannot be rebuilt: named
    del batch["position_ids"]
    with pytest.raises(ValueError, match="cu_seq_lens_q.*position_ids"):
        compress_batch(dict(batch), fake_features(batch), IMAGE_TOKEN_ID, 0.25, "uniform", "compact")


def test_a_packed_batch_with_original_positions_is_refused():
    samples = synthetic_samples(2, tiny_llava_config(), images_per_sample=(1,), seed=7)
    batch = pack([samples])
    with pytest.raises(ValueError, match="'original' cannot compress a packed batch"):
        compress_batch(dict(batch), fake_features(batch), IMAGE_TOKEN_ID, 0.25, "uniform", "original")


def test_qwen2_vl_packed_positions_renumber_the_text_row_only():
    # Qwen2-VL's packed form (4, B, L): text positions, then the three M-RoPE rows (here text + 100, distinct)
    samples = synthetic_samples(2, tiny_llava_config(), images_per_sample=(1,), seed=7)
    batch = pack([samples])
    text = batch["position_ids"]  # (1, L)
    batch["position_ids"] = torch.stack([text, text + 100, text + 200, text + 300])
    out, _ = compress_batch(dict(batch), fake_features(batch), IMAGE_TOKEN_ID, 0.25, "uniform", "original")
    kept = (batch["input_ids"][0] != IMAGE_TOKEN_ID).clone()
    for start in [s for s in range(text.shape[1]) if text[0, s] == 0]:
        first = start + int((batch["input_ids"][0, start:] == IMAGE_TOKEN_ID).int().argmax())
        kept[first + uniform_indices(TOKENS_PER_IMAGE, 4)] = True  # no grids given: raster order
    assert "attention_mask" not in out
    lengths = [len(s["input_ids"]) - TOKENS_PER_IMAGE + 4 for s in samples]
    assert out["position_ids"][0, 0].tolist() == list(range(lengths[0])) + list(range(lengths[1]))
    assert torch.equal(out["position_ids"][1:, 0], batch["position_ids"][1:, 0][:, kept])


def test_original_positions_without_an_attention_mask_get_one():
    # rows of equal length, no mask: the gaps of 'original' positions would otherwise read as packed sequences
    batch, _ = make_batch(images_per_sample=(1, 1), seed=1)
    batch["input_ids"], batch["labels"] = batch["input_ids"][:, :26], batch["labels"][:, :26]
    del batch["attention_mask"]
    out, _ = compress_batch(dict(batch), fake_features(batch), IMAGE_TOKEN_ID, 0.25, "uniform", "original")
    assert torch.equal(out["attention_mask"], torch.ones_like(out["input_ids"]))


# ---- the instruction strategy's query -------------------------------------------------------------------------------


@pytest.mark.parametrize("images_per_sample", [(1,), (1, 0, 2), (2, 1, 1)])
def test_instruction_embeds_once_per_micro_batch_without_gradient(images_per_sample):
    model = tiny_llava()
    model.get_input_embeddings().weight.requires_grad_(True)
    calls = []  # (dims of the ids embedded, grad enabled, output requires grad)
    model.get_input_embeddings().register_forward_hook(
        lambda module, args, output: calls.append((args[0].dim(), torch.is_grad_enabled(), output.requires_grad))
    )
    batch = collate(synthetic_samples(len(images_per_sample), tiny_llava_config(), images_per_sample, seed=2))
    received = Received(model, 0.25, "instruction")
    model(**batch, use_cache=False).loss.backward()
    received.remove()
    # one call for the queries of the whole micro-batch, outside autograd; then the model's own embedding
    assert calls == [(1, False, False), (2, True, True)]


def test_template_tokens_do_not_change_the_query():
    # ids 1, 2: the instruction (along e0); 5, 6: chat-template tokens (along e3), 7: image, 3: answer, 0: pad
    embed = nn.Embedding(8, 4)
    with torch.no_grad():
        embed.weight.zero_()
        embed.weight[1] = torch.tensor([1.0, 0, 0, 0])
        embed.weight[2] = torch.tensor([1.0, 0.2, 0, 0])
        embed.weight[5] = embed.weight[6] = torch.tensor([0, 0, 0, 5.0])
    image = 7
    input_ids = torch.tensor([[5, 1, 2, image, image, image, image, 6, 3], [1, 2, image, image, image, image, 3, 0, 0]])
    batch = {
        "input_ids": input_ids,
        "attention_mask": (torch.arange(9) < torch.tensor([[9], [7]])).long(),
        "labels": torch.where(input_ids == 3, 3, -100),
    }
    features = torch.tensor([[0, 0, 0, 1.0], [1.0, 0.1, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 2.0]])

    def kept(ignore):
        out, _ = compress_batch(dict(batch), [features, features], image, 0.5, "instruction", "compact",
                                embed_tokens=embed, query_ignore_ids=ignore)
        return out["mm_encoder_outputs"]["image"].pooler_output

    with_template, without = kept(ignore={5, 6})
    assert torch.equal(with_template, features[[1, 2]]) and torch.equal(without, features[[1, 2]])
    assert torch.equal(kept(ignore=())[0], features[[0, 3]])  # the template tokens would have led the query


def test_template_token_ids_are_the_chat_templates_and_the_special_ones():
    processor = build_tokenizer_and_processor()
    tokenizer = processor.tokenizer
    special = set(tokenizer.all_special_ids)
    # LLaVA-1.5's "USER: ... ASSISTANT: ...</s>" around the messages
    assert template_token_ids(processor) == special | set(tokenizer.convert_tokens_to_ids(["USER:", "ASSISTANT:"]))
    assert tokenizer.chat_template is None and template_token_ids(tokenizer) == special  # no template
    assert template_token_ids(None) == set()
    # a template that refuses a system turn; the contents' own words are not collected
    words = ["<pad>", "<s>", "</s>", "<unk>", "user", "assistant", "says", ":", "placeholder"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    plain = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                    unk_token="<unk>")
    plain.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system turn') }}{% endif %}"
        "{{ m['role'] }} says: {{ m['content'] }}\n{% endfor %}"
    )
    assert template_token_ids(plain) == {0, 1, 2, 3, 4, 5, 6, 7}


# Qwen2-VL's chat template (Qwen2.5-VL ships the same one): a conversation without a system turn gets the default
# system prompt.
QWEN_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)


def test_the_default_system_prompt_of_qwen_vl_templates_is_left_out_of_the_query():
    """Qwen2-VL / Qwen2.5-VL write "You are a helpful assistant." only where a conversation has no system turn (the
    usual training sample); its words are the template's, not the instruction's."""
    words = ["<pad>", "<|im_start|>", "<|im_end|>", "system", "user", "assistant", "You", "are", "a", "helpful",
             "assistant.", "placeholder", "what", "colour", "<unk>"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tokenizer.chat_template = QWEN_VL_TEMPLATE
    ids = template_token_ids(tokenizer)
    prompt = set(tokenizer.convert_tokens_to_ids(["You", "are", "a", "helpful", "assistant."]))
    assert prompt <= ids
    assert tokenizer.convert_tokens_to_ids("placeholder") not in ids
    assert not {tokenizer.convert_tokens_to_ids(w) for w in ("what", "colour")} & ids
    # a sample as Qwen's processor writes it: what the query keeps is the user's words only
    sample = tokenizer.apply_chat_template([{"role": "user", "content": "what colour"}], tokenize=False)
    kept = [t for t in tokenizer(sample, add_special_tokens=False)["input_ids"] if t not in ids]
    assert tokenizer.convert_ids_to_tokens(kept) == ["what", "colour"]


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
    # every token reached the language model
    seen = sorted(sum((r["row_lengths"] for r in probe.records if r["training"]), []))
    assert seen == sorted(len(s["input_ids"]) for s in dataset.samples)
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


def test_the_component_on_a_bare_model_without_a_trainer():
    """install / micro_batch / remove: only forwards inside the block are compressed, and the record says how."""
    config = tiny_llava_config()
    samples = synthetic_samples(4, config, (1, 2), seed=3)
    batch = collate(samples)
    model = freeze_for_alignment(tiny_llava())
    widths = []
    model.model.language_model.layers[0].register_forward_pre_hook(lambda m, a: widths.append(a[0].shape[1]))
    compressor = TokenCompressor(IMAGE_TOKEN_ID, keep_ratio=0.25)
    compressor.install(model)
    model(**batch)  # not in a block: dense
    with compressor.micro_batch(step=0) as record:
        model(**batch).loss.backward()
    model(**batch)
    compressor.remove()
    full, short = batch["input_ids"].shape[1], max(expected_row_lengths(samples, 0.25))
    assert widths == [full, short, full]
    assert len(record.forwards) == 1 and record.llm_length == short and record.kept_fraction == 0.25
    assert record.forwards[0].visual_tokens == sum(TOKENS_PER_IMAGE * (1 + i % 2) for i in range(4))
    assert len(model._forward_pre_hooks) == 0


# ---- beyond the paper: keep-ratio schedules, full-token steps, diverse selection ---------------------------------------


@pytest.mark.parametrize("schedule", ["linear", "cosine", "step"])
@pytest.mark.parametrize("total, fraction", [(7, 1.0), (100, 1.0), (100, 0.5), (10, 0.3), (5, 0.01)])
def test_keep_ratio_schedules_reach_the_end_ratio_exactly(schedule, total, fraction):
    values = [keep_ratio_at(step, total, 0.1, 1.0, schedule, fraction) for step in range(total)]
    rise = max(1, math.ceil(fraction * total))
    assert values[rise - 1 :] == [1.0] * (total - rise + 1)  # exactly 1.0 from the end of the rise on
    if rise > 1:
        assert values[0] == 0.1 and all(v < 1.0 for v in values[: rise - 1])
        assert values == sorted(values)  # never falls
    if schedule == "step":
        assert set(values[: rise - 1]) <= {0.1}
    if schedule == "linear" and rise > 2:
        assert values[1] - values[0] == pytest.approx(0.9 / (rise - 1))
    assert all(keep_ratio_at(step, total, 0.3, 1.0, "constant", fraction) == 0.3 for step in range(total))
    with pytest.raises(ValueError, match="schedule"):
        keep_ratio_at(0, total, 0.1, 1.0, "exponential", fraction)


def test_full_token_steps_depend_on_seed_and_step_only():
    steps = range(2000)
    chosen = [is_full_token_step(0, step, 0.1) for step in steps]
    torch.manual_seed(123)  # the global generator is not used
    torch.rand(5)
    assert chosen == [is_full_token_step(0, step, 0.1) for step in steps]
    assert 0.08 < sum(chosen) / len(chosen) < 0.12
    assert chosen != [is_full_token_step(1, step, 0.1) for step in steps]
    assert not any(is_full_token_step(0, step, 0.0) for step in steps)
    # a larger fraction adds steps and keeps the ones a smaller fraction chose (one uniform draw per step)
    more = [is_full_token_step(0, step, 0.3) for step in steps]
    assert all(m for c, m in zip(chosen, more) if c) and sum(more) > sum(chosen)


def _angles(*degrees):
    radians = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([radians.cos(), radians.sin()], dim=1).float()  # (n, 2)


def _min_pairwise_distance(features, subset):
    unit = F.normalize(features[list(subset)], dim=-1)
    distance = 1 - unit @ unit.T
    return float(distance[~torch.eye(len(subset), dtype=torch.bool)].min())


def test_diverse_keeps_the_most_mutually_distant_tokens():
    # four directions 90 degrees apart, and two near-copies of the first (3 and 6 degrees); scaled differently:
    # cosine distance ignores the norm
    features = _angles(0, 3, 90, 6, 180, 270) * torch.tensor([[1.0], [2.0], [0.5], [3.0], [1.0], [4.0]])
    (chosen,) = diverse_indices([features], [4])
    assert set(chosen.tolist()) in ({0, 2, 4, 5}, {1, 2, 4, 5}, {3, 2, 4, 5})  # one of the copies, and the others
    assert chosen.tolist() == sorted(chosen.tolist())
    best = max(_min_pairwise_distance(features, s) for s in itertools.combinations(range(6), 4))
    assert _min_pairwise_distance(features, chosen.tolist()) == pytest.approx(best)
    # k = 2: two opposite directions
    (two,) = diverse_indices([features], [2])
    assert _min_pairwise_distance(features, two.tolist()) == pytest.approx(2.0)


def test_diverse_is_batched_over_images_of_different_sizes():
    generator = torch.Generator().manual_seed(0)
    features = [torch.randn(n, 8, generator=generator) for n in (16, 5, 1, 30, 16)]
    ks = [num_kept(f.shape[0], 0.25) for f in features]
    together = diverse_indices(features, ks)
    alone = [diverse_indices([f], [k])[0] for f, k in zip(features, ks)]
    assert all(torch.equal(a, b) for a, b in zip(together, alone))
    for f, k, chosen in zip(features, ks, together):
        assert len(chosen) == k == len(set(chosen.tolist())) and 0 <= chosen.min() and chosen.max() < f.shape[0]
    # every token, when all are kept
    assert diverse_indices([features[1]], [5])[0].tolist() == list(range(5))


def _layer_widths(model):
    widths = []
    model.model.language_model.layers[0].register_forward_pre_hook(lambda m, a: widths.append(a[0].shape[1]))
    return widths


def test_a_full_token_step_or_a_schedule_at_one_leaves_the_forward_untouched():
    samples = synthetic_samples(4, tiny_llava_config(), (1, 2), seed=3)
    batch = collate(samples)
    model = freeze_for_alignment(tiny_llava())
    widths = _layer_widths(model)
    full, short = batch["input_ids"].shape[1], max(expected_row_lengths(samples, 0.25))
    with torch.no_grad():
        reference = model(**batch).logits
    full_step = next(step for step in range(100) if is_full_token_step(0, step, 0.5))
    sparse_step = next(step for step in range(100) if not is_full_token_step(0, step, 0.5))
    compressor = TokenCompressor(IMAGE_TOKEN_ID, keep_ratio=0.25, full_token_fraction=0.5)
    compressor.install(model)
    records, logits = [], []
    for step in (full_step, sparse_step):
        with torch.no_grad(), compressor.micro_batch(step) as record:
            logits.append(model(**batch).logits)
        records.append(record)
    compressor.remove()
    assert widths[1:] == [full, short]
    assert torch.equal(logits[0], reference)  # the full-token step: bit-identical to VTC off
    assert records[0].full_tokens and records[0].kept_fraction == 1.0 and records[0].llm_length == full
    assert not records[1].full_tokens and records[1].kept_fraction == 0.25

    # a linear schedule from 0.25 to 1.0 over 5 steps: short at the start, the dense forward exactly at the end
    compressor = TokenCompressor(IMAGE_TOKEN_ID, keep_ratio=0.25, keep_schedule="linear", keep_ratio_end=1.0)
    compressor.install(model)
    widths.clear()
    outputs = []
    for step in (0, 4):
        with torch.no_grad(), compressor.micro_batch(step, max_steps=5) as record:
            outputs.append(model(**batch).logits)
    compressor.remove()
    assert widths == [short, full] and record.keep_ratio == 1.0
    assert torch.equal(outputs[1], reference)  # bit-identical to VTC off
    with pytest.raises(ValueError, match="number of optimizer steps"):
        with TokenCompressor(IMAGE_TOKEN_ID, keep_schedule="cosine").micro_batch(0):
            pass


@pytest.mark.parametrize("strategy", ["uniform", "diverse"])
def test_a_schedule_ending_at_one_trains_its_last_steps_like_vtc_off(out_dir, strategy):
    """Steps after the rise (here steps 2 and 3 of 4) run every token: with keep ratio 1.0 from step 0 the run is
    bit-identical to a run without VTC."""
    models = [freeze_for_alignment(tiny_llava(seed=2)) for _ in range(2)]
    dataset = ListDataset(synthetic_samples(16, tiny_llava_config(), (1, 0, 2), seed=1))
    _, dense = train(models[0], training_args(out_dir, sts_stage="none"), dataset)
    trainer, sparse = train(
        models[1],
        training_args(out_dir, sts_stage="alignment", vtc_strategy=strategy, vtc_keep_ratio=1.0,
                      vtc_keep_schedule="cosine", vtc_keep_ratio_end=1.0, vtc_keep_schedule_fraction=0.5),
        dataset,
    )
    assert trainer.sts_plan.vtc and [log["vtc_keep_ratio"] for log in sparse.logs if "loss" in log] == [1.0] * 4
    assert dense.losses == sparse.losses
    assert all(torch.equal(a, b) for a, b in zip(models[0].parameters(), models[1].parameters()))


# ---- beyond the paper: DualSpeed's mode isolator ---------------------------------------------------------------------


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("strategy", ["uniform", "pool", "random"])
def test_the_isolator_opens_each_images_kept_tokens(padding_side, strategy):
    batch, _ = make_batch(padding_side=padding_side)
    features = fake_features(batch)
    isolator = torch.randn(3, 8)
    plain, _ = compress_batch(dict(batch), features, IMAGE_TOKEN_ID, 0.25, strategy, "compact",
                              generator=decision_generator(0, 0, 0, 1))
    out, stats = compress_batch(dict(batch), features, IMAGE_TOKEN_ID, 0.25, strategy, "compact",
                                generator=decision_generator(0, 0, 0, 1), isolator=isolator)
    images = [1, 0, 2, 1]
    k = num_kept(TOKENS_PER_IMAGE, 0.25)
    assert stats.kept_tokens == k * sum(images)  # visual tokens only; the soft tokens are not the image's
    assert stats.length_after == pytest.approx(plain_length(plain) + 3 * sum(images) / 4)
    kept = out["mm_encoder_outputs"]["image"].pooler_output
    without = plain["mm_encoder_outputs"]["image"].pooler_output
    assert len(kept) == sum(images)
    for image, (with_isolator, alone) in enumerate(zip(kept, without)):
        assert torch.equal(with_isolator[:3], isolator) and torch.equal(with_isolator[3:], alone)
    for row, n_images in enumerate(images):
        new_real = out["attention_mask"][row].bool()
        new_ids = out["input_ids"][row][new_real]
        old_ids = plain["input_ids"][row][plain["attention_mask"][row].bool()]
        assert int((new_ids == IMAGE_TOKEN_ID).sum()) == n_images * (k + 3)
        assert torch.equal(new_ids[new_ids != IMAGE_TOKEN_ID], old_ids[old_ids != IMAGE_TOKEN_ID])
        new_labels, old_labels = out["labels"][row], plain["labels"][row]
        assert torch.equal(new_labels[new_labels != -100], old_labels[old_labels != -100])


def plain_length(out) -> float:
    return float(out["attention_mask"].sum()) / out["attention_mask"].shape[0]


def test_the_isolator_needs_dropped_places_and_compact_positions():
    batch, _ = make_batch(images_per_sample=(1, 1))
    features = fake_features(batch)
    with pytest.raises(ValueError, match=r"Sample 0 .* 16 visual tokens of which VTC drops 2, fewer than the mode "
                                         r"isolator's 4"):
        compress_batch(dict(batch), features, IMAGE_TOKEN_ID, 0.875, "uniform", "compact", isolator=torch.zeros(4, 8))
    with pytest.raises(ValueError, match="needs vtc_position_ids='compact'"):
        compress_batch(dict(batch), features, IMAGE_TOKEN_ID, 0.5, "uniform", "original", isolator=torch.zeros(4, 8))


def test_the_language_model_reads_the_isolators_tokens_and_they_get_gradient():
    """On a bare model: the language model's input holds the isolator's tokens right before each image's kept
    features, and a backward reaches them; outside a micro-batch nothing of it is used."""
    model = freeze_for_alignment(tiny_llava())
    batch = collate(synthetic_samples(2, tiny_llava_config(), (1, 2), seed=3))
    seen = []
    model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["inputs_embeds"].detach().clone()), with_kwargs=True
    )
    compressor = TokenCompressor(IMAGE_TOKEN_ID, keep_ratio=0.25, mode_isolator=2)
    compressor.install(model)
    tokens = model.sts_mode_isolator.tokens
    assert tokens.shape == (2, model.config.text_config.hidden_size) and tokens.requires_grad
    with compressor.micro_batch(step=0) as record:
        model(**batch).loss.backward()
    model(**batch)  # outside: every token, no isolator
    compressor.remove()
    assert tokens.grad is not None and tokens.grad.abs().sum() > 0
    assert record.kept_fraction == 0.25 and record.llm_length == seen[0].shape[1]
    for row, n_images in enumerate((1, 2)):
        ids, _ = compress_batch(dict(batch), fake_features(batch), IMAGE_TOKEN_ID, 0.25, "uniform", "compact",
                                isolator=torch.zeros(2, 8))
        slots = (ids["input_ids"][row] == IMAGE_TOKEN_ID).nonzero().squeeze(1)
        assert len(slots) == n_images * (4 + 2)
        for image in range(n_images):
            opening = seen[0][row, slots[image * 6 : image * 6 + 2]]
            assert torch.equal(opening, tokens.detach())
    assert seen[1].shape[1] == batch["input_ids"].shape[1]  # the dense forward: full length
    assert not any(torch.equal(seen[1][0, i], tokens[0].detach()) for i in range(seen[1].shape[1]))


def test_the_isolator_is_refused_on_an_m_rope_model():
    model = Qwen2VLForConditionalGeneration(tiny_qwen2_vl_config())
    with pytest.raises(ValueError, match="M-RoPE.*vtc_mode_isolator=0"):
        TokenCompressor(IMAGE_TOKEN_ID, keep_ratio=0.5, mode_isolator=4).install(model)


def test_the_trainer_trains_the_isolator_and_saves_it_beside_clean_weights(out_dir):
    from safetensors import safe_open
    from transformers import LlavaForConditionalGeneration

    from sts_trainer.token_compression import ISOLATOR_FILE, ModeIsolator, load_isolator

    config = tiny_llava_config()
    samples = synthetic_samples(8, config, images_per_sample=(1, 0, 2, 1), seed=3)
    model = freeze_for_alignment(tiny_llava())
    probe = LengthProbe(model)
    args = training_args(out_dir, max_steps=2, vtc_keep_ratio=0.25, vtc_mode_isolator=2, save_strategy="steps",
                         save_steps=2, per_device_eval_batch_size=4)
    trainer, recorder = train(model, args, ListDataset(samples))
    # the language model read each image's 4 kept tokens and the 2 soft tokens; the ledger counted that length
    images = [0 if "pixel_values" not in s else s["pixel_values"].shape[0] for s in samples]
    expected = [length + 2 * n for length, n in zip(expected_row_lengths(samples, 0.25), images)]
    assert sorted(sum((r["row_lengths"] for r in probe.records), [])) == sorted(expected)
    logged = [log for log in recorder.logs if "loss" in log]
    assert logged[0]["vtc_kept_fraction"] == pytest.approx(4 / 16)
    # the isolator trains with the projector: the FLOPs count has the vision tower frozen, as without the isolator
    assert trainer._sts_trains["train_vision"] is False and trainer._sts_trains["train_projector"] is True
    start = ModeIsolator(2, config.text_config.hidden_size, config.text_config.initializer_range, seed=0).tokens
    trained = model.sts_mode_isolator.tokens.detach()
    assert not torch.equal(trained, start)  # it trained (the optimizer took it from the model)
    # the checkpoint: the unpatched model's keys, and the isolator in its own file
    checkpoint = os.path.join(out_dir, "checkpoint-2")
    with safe_open(os.path.join(checkpoint, "model.safetensors"), framework="pt") as f:
        saved = set(f.keys())
    tiny_llava().save_pretrained(os.path.join(out_dir, "unpatched"))
    with safe_open(os.path.join(out_dir, "unpatched", "model.safetensors"), framework="pt") as f:
        assert saved == set(f.keys())
    assert torch.equal(load_isolator(checkpoint), trained)
    loaded, info = LlavaForConditionalGeneration.from_pretrained(checkpoint, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not hasattr(loaded, "sts_mode_isolator")
    trainer.save_model(os.path.join(out_dir, "final"))
    assert torch.equal(load_isolator(os.path.join(out_dir, "final")), trained)
    assert os.path.isfile(os.path.join(out_dir, "final", ISOLATOR_FILE))
    # evaluation after training reads every token and no soft one
    probe.records.clear()
    trainer.evaluate(ListDataset(samples))
    assert sorted(sum((r["row_lengths"] for r in probe.records), [])) == sorted(expected_row_lengths(samples, 1.0))


def test_a_resumed_run_and_the_next_stage_start_from_the_saved_isolator(out_dir):
    from sts_trainer import STSTrainer
    from transformers import LlavaForConditionalGeneration

    from sts_trainer.token_compression import load_isolator

    dataset = ListDataset(synthetic_samples(16, tiny_llava_config(), (1, 2), seed=1))
    options = dict(vtc_keep_ratio=0.25, vtc_mode_isolator=3, save_strategy="steps", save_steps=2)
    whole, _ = train(freeze_for_alignment(tiny_llava()), training_args(out_dir, **options), dataset)  # saves at 2, 4
    model = freeze_for_alignment(tiny_llava())
    trainer = STSTrainer(model=model, args=training_args(out_dir, **options), train_dataset=dataset,
                         data_collator=collate)
    trainer.train(resume_from_checkpoint=os.path.join(out_dir, "checkpoint-2"))
    torch.testing.assert_close(model.sts_mode_isolator.tokens, whole.model.sts_mode_isolator.tokens)
    assert not torch.equal(load_isolator(os.path.join(out_dir, "checkpoint-2")), whole.model.sts_mode_isolator.tokens)
    # the next run on the saved model (the next stage, or alignment continued) starts from the saved tokens
    final = os.path.join(out_dir, "checkpoint-4")
    model = freeze_for_alignment(LlavaForConditionalGeneration.from_pretrained(final))
    train(model, training_args(out_dir + "-next", learning_rate=0.0, **options), dataset)
    assert torch.equal(model.sts_mode_isolator.tokens.detach(), load_isolator(final))
    # a different size is refused, naming the file
    model = freeze_for_alignment(LlavaForConditionalGeneration.from_pretrained(final))
    with pytest.raises(ValueError, match="vtc_mode_isolator=2.*sts_mode_isolator.safetensors"):
        train(model, training_args(out_dir + "-other", **{**options, "vtc_mode_isolator": 2}), dataset)


def test_without_the_option_no_isolator_is_attached(out_dir):
    model = freeze_for_alignment(tiny_llava())
    trainer, _ = train(model, training_args(out_dir, max_steps=1, vtc_keep_ratio=0.25), tiny_dataset(4))
    assert trainer.sts_plan.vtc and not hasattr(model, "sts_mode_isolator")
    assert not any("sts_mode_isolator" in name for name, _ in model.named_parameters())
