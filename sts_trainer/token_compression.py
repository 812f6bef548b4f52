"""Visual Token Compressor (VTC): feed the language model a physically shorter sequence during alignment (and,
beyond the paper, in instruction tuning too).

After the projector, each image's n visual tokens are reduced to k = max(1, round(keep_ratio * n)) (rounded half up),
and the batch handed to the language model is rebuilt without the dropped ones: input ids, attention mask, labels,
position ids and per-token type ids (`token_type_ids`, `mm_token_type_ids`) are shortened together, per sample, so
nothing is misaligned. The kept features reach the model through its `mm_encoder_outputs` argument (or, for a custom
model, as `inputs_embeds` built here), so gradients flow to the projector through the kept tokens only.

Packed (padding-free) batches, several sequences per row told apart by position ids that restart and no attention
mask, stay packed: each sequence is shortened on its own and no attention mask is created (it would switch off
transformers' detection of the packed sequences, see `find_packed_sequence_indices` in `transformers.masking_utils`).

The keep ratio may follow a schedule over the stage (`keep_ratio_at`), and some optimizer steps may keep every token
(`is_full_token_step`); a step that keeps every token leaves the forward untouched, exactly as with VTC off.

What differs between architectures (which inputs feed the vision path, newline tokens, tiles, M-RoPE positions) is
data in `architectures.ARCHITECTURES`, each image's token grid included; `TokenCompressor` reads it.
"""

import contextlib
import math
import os
from collections.abc import Collection
from dataclasses import dataclass, field
from fractions import Fraction

import torch
import torch.nn.functional as F
from jinja2 import TemplateError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput

from .architectures import ARCHITECTURES, CUSTOM_VLM, get_path, vtc_facts
from .arguments import VTC_KEEP_SCHEDULES
from .randomness import FULL_TOKEN_STREAM, VTC_STREAM, decision_generator


IGNORE_INDEX = -100
# Per-token inputs besides ids, mask, labels and positions, shortened with the sequence (0 = text, also for padding):
# PaliGemma's prefix/suffix and Gemma3's image-block `token_type_ids`, Qwen2-VL's modality `mm_token_type_ids`.
TOKEN_TYPE_KEYS = ("token_type_ids", "mm_token_type_ids")
# Inputs of Qwen2-VL's `get_rope_index` besides input ids and attention mask.
_ROPE_INPUTS = ("mm_token_type_ids", "image_grid_thw", "video_grid_thw", "second_per_grid_ts")
_VIDEO_INPUTS = ("pixel_values_videos", "video_grid_thw")

def image_grids(config, vision_inputs: dict, sizes: list[int]) -> list[tuple[int, int] | None]:
    """The grid (rows, cols) of language-model tokens of each image (or tile) of a batch, in batch order, from the
    architecture's `token_grids` (see `architectures.Architecture`); None for an image whose `sizes[i]` tokens are
    not that grid, or where the architecture has none: `uniform` spaces those in raster order."""
    token_grids = ARCHITECTURES.get(getattr(config, "model_type", None), CUSTOM_VLM).token_grids
    grids = token_grids(config, vision_inputs, len(sizes)) if token_grids is not None else [None] * len(sizes)
    return [grid if grid is not None and grid[0] * grid[1] == n else None for grid, n in zip(grids, sizes)]


def num_kept(n: int, keep_ratio: float) -> int:
    """Tokens kept of an image of `n` tokens: max(1, round(keep_ratio * n)), rounded half up."""
    return max(1, min(n, math.floor(keep_ratio * n + 0.5)))


def keep_ratio_at(
    step: int,
    total_steps: int,
    start: float,
    end: float = 1.0,
    schedule: str = "constant",
    fraction: float = 1.0,
) -> float:
    """The keep ratio at optimizer step `step` (0-based) of `total_steps`.

    The ratio moves from `start` to `end` over the first R = max(1, ceil(fraction * total_steps)) steps, reaching
    `end` exactly at step R - 1 and keeping it after; with t = min(1, step / (R - 1)) (t = 1 when R = 1):

        constant: start       linear: start + (end - start) t
        cosine:   start + (end - start) (1 - cos(pi t)) / 2       step: start while t < 1, then end
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}.")
    if schedule not in VTC_KEEP_SCHEDULES:
        raise ValueError(f"Unknown keep-ratio schedule {schedule!r}; choose one of {', '.join(VTC_KEEP_SCHEDULES)}.")
    if schedule == "constant":
        return start
    rise = max(1, math.ceil(fraction * total_steps))
    t = 1.0 if rise == 1 else min(max(step / (rise - 1), 0.0), 1.0)
    if t >= 1.0:
        return end
    if schedule == "linear":
        return start + (end - start) * t
    if schedule == "cosine":
        return start + (end - start) * (1.0 - math.cos(math.pi * t)) / 2.0
    return start  # 'step', before its end


def is_full_token_step(seed: int, step: int, fraction: float) -> bool:
    """Whether optimizer step `step` runs with every visual token: one draw per step from
    `decision_generator(seed, step, 0, FULL_TOKEN_STREAM)`, below `fraction`. Every micro-batch of the step, on every
    rank, and a resumed run get the same answer."""
    if fraction <= 0.0:
        return False
    return bool(torch.rand(1, generator=decision_generator(seed, step, 0, FULL_TOKEN_STREAM)) < fraction)


def _centers(n: int, k: int) -> torch.Tensor:
    """`k` evenly spaced indices in range(n): the centres of `k` equal bins."""
    return ((torch.arange(k, dtype=torch.float64) + 0.5) * n / k).floor().long()


def _kept_rows(k: int, rows: int, cols: int) -> int:
    """How many rows of a rows x cols grid the k tokens kept by `uniform_indices` occupy."""
    ideal = Fraction(k * rows, cols)  # the square of the row count that makes row and column strides equal

    def stride_ratio(r: int) -> Fraction:  # (row stride / column stride) or its inverse, >= 1
        return max(r * r / ideal, ideal / (r * r))

    # at most `cols` tokens per row, at most one row per token; ties go to more rows
    candidates = range(-(-k // cols), min(rows, k) + 1)
    best = min((r for r in candidates if k % r == 0), key=lambda r: (stride_ratio(r), -r), default=None)
    if best is not None and stride_ratio(best) <= 2:
        return best
    return min(candidates, key=lambda r: (stride_ratio(r), -r))


def uniform_indices(n: int, k: int, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """`k` of `n` token indices spread evenly over the image, ascending.

    With the image's token `grid` (rows, cols), rows * cols = n, in raster order: the kept tokens lie on `kr` rows,
    the centres of `kr` equal bands of rows, each row holding k / kr tokens at the centres of equal bands of columns.
    `kr` is chosen so that the row stride (rows / kr) and the column stride (cols / (k / kr)) are as equal as possible,
    i.e. the kept counts follow the image's aspect ratio: the divisor of k that does so best (a kr x k/kr lattice),
    if its two strides are within a factor of 2 of each other; otherwise (k prime, say) the best row count, and the
    rows hold floor or ceil of k / kr tokens each. So a 24 x 24 grid keeping 144 is the 12 x 12 lattice of stride 2,
    a 2 x 8 grid keeping 4 is one row of 4 columns spread over the 8, a 16 x 64 grid keeping 256 is 8 x 32.
    Without a grid (a token count that is no known grid) the tokens are evenly spaced in raster order.
    """
    if grid is None:
        return _centers(n, k)
    per_row = _kept_lattice(n, k, grid)
    if per_row is None:
        return torch.arange(n)
    rows, cols = grid
    kept_rows = _centers(rows, len(per_row)).tolist()
    return torch.cat([row * cols + _centers(cols, m) for row, m in zip(kept_rows, per_row)])


def _kept_lattice(n: int, k: int, grid: tuple[int, int]) -> list[int] | None:
    """The lattice `uniform_indices` keeps on the token `grid` (rows, cols): the kept tokens of each of its `kr` kept
    rows (k / kr each, or floor / ceil of it); None when every token is kept."""
    rows, cols = grid
    if rows * cols != n:
        raise ValueError(f"The token grid {rows} x {cols} has {rows * cols} tokens, but the image has {n}.")
    if k == n:
        return None
    kr = _kept_rows(k, rows, cols)
    return [(i + 1) * k // kr - i * k // kr for i in range(kr)]


def _nearest_centre(n: int, k: int) -> torch.Tensor:
    """For each of `n` positions, the index of the nearest of the `k` centres `_centers(n, k)` (a position halfway
    between two goes to the later one): the bins around the centres, so each centre is in its own bin."""
    centres = _centers(n, k)
    return torch.bucketize(torch.arange(n), (centres[:-1] + centres[1:] + 1) // 2, right=True)


def pool_groups(n: int, k: int, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """For each of `n` tokens, the index (0 .. k-1) of the pooled token it is averaged into: the `pool` strategy.

    The k pooled tokens are the ones `uniform_indices(n, k, grid)` keeps, in the same order, and each stands for the
    block of grid neighbours nearest to it: a grid row belongs to the nearest of the `kr` kept rows, and a column, in
    that kept row's band, to the nearest of its k / kr kept columns. So every kept token is in its own block, every
    token in exactly one, and no block is empty. Where the strides are whole numbers the blocks are equal (a 16 x 16
    grid pooled to 128: one row by 2 columns; a 24 x 24 grid to 144: 2 x 2); otherwise they differ by a row or a
    column (a 24 x 24 grid to 288, an 18 x 16 lattice: blocks of 1, 2 and 4 tokens). Without a grid, runs of
    consecutive tokens around the kept ones.
    """
    if not 1 <= k <= n:
        raise ValueError(f"Cannot pool {n} tokens into {k}.")
    if grid is None:
        return _nearest_centre(n, k)
    per_row = _kept_lattice(n, k, grid)
    if per_row is None:
        return torch.arange(n)
    rows, cols = grid
    kr = len(per_row)
    first = [i * k // kr for i in range(kr)]  # index of each kept row's first pooled token
    band = _nearest_centre(rows, kr).tolist()  # the kept row whose band each grid row is in
    return torch.cat([first[b] + _nearest_centre(cols, per_row[b]) for b in band])


def pool_features(features: torch.Tensor, k: int, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """`features` (n, D) averaged over the blocks of `pool_groups(n, k, grid)`: (k, D), in the order of the tokens
    `uniform_indices` keeps. Differentiable: every token's feature gets its share of the gradient."""
    groups = pool_groups(features.shape[0], k, grid).to(features.device)
    sums = features.new_zeros(k, features.shape[1], dtype=torch.float32).index_add(0, groups, features.float())
    counts = torch.bincount(groups, minlength=k).to(sums.dtype)
    return (sums / counts[:, None]).to(features.dtype)


def random_indices(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """`k` of `n` token indices drawn without replacement from `generator`, ascending."""
    return torch.randperm(n, generator=generator)[:k].sort().values


def instruction_indices(
    features: torch.Tensor, query: torch.Tensor | None, k: int, grid: tuple[int, int] | None = None
) -> torch.Tensor:
    """The `k` tokens of `features` (n, D) most cosine-similar to `query` (D,), ascending (original order kept).

    With no instruction text (`query` None) the choice falls back to `uniform_indices` over `grid`.
    """
    if query is None:
        return uniform_indices(features.shape[0], k, grid)
    scores = F.cosine_similarity(features.detach().float(), query.detach().float()[None, :], dim=-1)  # (n,)
    return scores.topk(k).indices.sort().values.cpu()


def diverse_indices(features: list[torch.Tensor], ks: list[int]) -> list[torch.Tensor]:
    """For each image's features (m_i, D), the `ks[i]` tokens chosen by greedy max-min diversity, ascending.

    Cosine distance d(a, b) = 1 - cos(a, b). The first token is the one farthest from its nearest neighbour
    (largest min_j d(i, j)); each next one is the token whose distance to the nearest token already chosen is largest
    (farthest-point selection, as DivPrune solves the max-min diversity problem). All images are done at once: their
    features are padded to the longest (padding is never chosen), and each of the max(ks) greedy steps is one batched
    argmax over every image's tokens (greedy choices are a prefix: image i keeps the first ks[i]). No gradient.
    """
    if not features:
        return []
    m_max, k_max = max(f.shape[0] for f in features), max(ks)
    device = features[0].device
    with torch.no_grad():
        padded = torch.zeros(len(features), m_max, features[0].shape[-1], device=device)  # (I, M, D)
        valid = torch.zeros(len(features), m_max, dtype=torch.bool, device=device)  # (I, M)
        for i, f in enumerate(features):
            padded[i, : f.shape[0]] = F.normalize(f.detach().float(), dim=-1)
            valid[i, : f.shape[0]] = True
        distance = 1.0 - padded @ padded.transpose(1, 2)  # (I, M, M)
        pair = valid[:, :, None] & valid[:, None, :]
        pair &= ~torch.eye(m_max, dtype=torch.bool, device=device)
        inf = torch.tensor(float("inf"), device=device)
        # each token's distance to its nearest other token (inf when the image has one token)
        nearest = torch.where(pair, distance, inf).min(dim=2).values  # (I, M)
        score = torch.where(valid, nearest, -inf)  # what the next choice maximises
        chosen = torch.empty(len(features), k_max, dtype=torch.long, device=device)
        rows = torch.arange(len(features), device=device)
        for j in range(k_max):
            pick = score.argmax(dim=1)  # (I,)
            chosen[:, j] = pick
            if j == 0:
                score = torch.where(valid, distance[rows, pick], -inf)  # distance to the chosen set
            else:
                score = torch.minimum(score, distance[rows, pick])
            score[rows, pick] = -inf  # never chosen twice
            score = torch.where(valid, score, -inf)
    return [chosen[i, :k].sort().values.cpu() for i, k in enumerate(ks)]


# Placeholder contents of the conversation `template_token_ids` renders: whatever is not inside them is the template's.
_PLACEHOLDER = "placeholder"


def template_token_ids(processing_class) -> set[int]:
    """Ids of the tokens a tokenizer's or processor's chat template writes around the messages, and its special ids:
    what the `instruction` strategy leaves out of its query (`TokenCompressor(query_ignore_ids=...)`).

    The template is rendered on a short conversation with placeholder contents, with a system turn and without one
    (a template may write a default system prompt where a conversation has none: Qwen2-VL's and Qwen2.5-VL's write
    "You are a helpful assistant."), and the ids of every token outside the contents are collected from each
    rendering (by character offsets with a fast tokenizer, else by tokenizing the text between the contents). A
    template that refuses a system turn is rendered without it only; contents are given as strings, or as lists of
    image and text blocks for templates that need those.
    Without a chat template (or one that renders neither way) this is `all_special_ids`; `None` (no processing
    class) gives an empty set.
    """
    if processing_class is None:
        return set()
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    ids = set(tokenizer.all_special_ids)
    template = getattr(processing_class, "chat_template", None) or getattr(tokenizer, "chat_template", None)
    if not template:
        return ids
    for rendered in _render_placeholder_chats(tokenizer, template):
        pieces = rendered.split(_PLACEHOLDER)
        if tokenizer.is_fast:
            spans, start = [], 0  # character spans of the placeholders
            for piece in pieces[:-1]:
                start += len(piece)
                spans.append((start, start + len(_PLACEHOLDER)))
                start += len(_PLACEHOLDER)
            encoding = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
            for token, (begin, end) in zip(encoding["input_ids"], encoding["offset_mapping"]):
                if not any(begin < stop and end > first for first, stop in spans):
                    ids.add(token)
        else:
            for piece in pieces:
                ids.update(tokenizer(piece, add_special_tokens=False)["input_ids"] if piece else [])
    return ids


def _render_placeholder_chats(tokenizer, template: str) -> list[str]:
    """The chat template rendered on a placeholder conversation with a system turn and without one (each that it
    renders), with the first form of contents it renders; empty if it renders none of those tried."""
    blocks = [{"type": "image"}, {"type": "text", "text": _PLACEHOLDER}]
    for content in (_PLACEHOLDER, blocks):
        renderings = []
        for roles in (("system", "user", "assistant", "user", "assistant"), ("user", "assistant", "user", "assistant")):
            messages = [{"role": role, "content": content} for role in roles]
            try:
                rendered = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
            except (TemplateError, ValueError, TypeError, KeyError):  # e.g. a template's raise_exception()
                continue
            # each content rendered, and as text (not a list's repr)
            if rendered.count(_PLACEHOLDER) == len(roles) and "'type'" not in rendered:
                renderings.append(rendered)
        if renderings:
            return renderings
    return []


@dataclass
class CompressionStats:
    """What `compress_batch` did to one batch."""

    kept_tokens: int
    visual_tokens: int
    length_before: float  # mean tokens per sample entering the language model without VTC
    length_after: float  # the same with VTC
    llm_length: int  # the width of the shortened batch (B, L'), padding included: what the language model computes


@dataclass
class CompressionRecord:
    """What VTC did in one training micro-batch (`TokenCompressor.micro_batch`): one entry per forward with images,
    normally one; none when the micro-batch had no images. `keep_ratio` is the schedule's value at this step;
    `full_tokens` marks a full-token step, whose forwards keep every token (`teacher` then holds the stats of the
    no-grad pruned forward that self-distillation runs, `teacher_labels` that forward's labels)."""

    keep_ratio: float = 1.0
    full_tokens: bool = False
    forwards: list[CompressionStats] = field(default_factory=list)
    teacher: list[CompressionStats] = field(default_factory=list)
    teacher_labels: torch.Tensor | None = None

    @property
    def kept_fraction(self) -> float | None:
        visual = sum(f.visual_tokens for f in self.forwards)
        return sum(f.kept_tokens for f in self.forwards) / visual if visual else None

    @property
    def llm_length(self) -> int | None:
        return self.forwards[-1].llm_length if self.forwards else None


def _assign_images(image_counts: list[int], sizes: list[int]) -> list[list[int]]:
    """Which images (in batch order) belong to each sample, from the sample's placeholder count."""
    assignment, next_image = [], 0
    for sample, need in enumerate(image_counts):
        owned, have = [], 0
        while have < need and next_image < len(sizes):
            owned.append(next_image)
            have += sizes[next_image]
            next_image += 1
        if have != need:
            raise ValueError(
                f"Sample {sample} of the batch has {need} image placeholder tokens, but the image features available "
                f"for it number {have} (images give {sizes} tokens each, in batch order). Each <image> in the text "
                "must expand to exactly as many placeholder tokens as its image has features."
            )
        assignment.append(owned)
    if next_image != len(sizes):
        raise ValueError(
            f"The batch has {len(sizes)} images but its samples' placeholder tokens account for only {next_image} "
            f"of them ({sum(image_counts)} placeholder tokens against {sum(sizes)} image features)."
        )
    return assignment


def _text_positions(position_ids: torch.Tensor | None) -> torch.Tensor | None:
    """The (B, L) positions transformers reads packed sequences from: 2D position ids, or the first row of Qwen2-VL's
    (4, B, L) form (text positions before the three M-RoPE rows). Its plain (3, B, L) M-RoPE positions have none."""
    if position_ids is None or position_ids.dim() == 2:
        return position_ids
    return position_ids[0] if position_ids.shape[0] == 4 else None


def _sequence_starts(text_positions: torch.Tensor) -> torch.Tensor:
    """(B, L) True where a sequence starts: the first token, and where the position is not the previous one + 1, as
    transformers' `find_packed_sequence_indices` decides."""
    starts = torch.ones_like(text_positions, dtype=torch.bool)
    starts[:, 1:] = text_positions[:, 1:] != text_positions[:, :-1] + 1
    return starts


def _dropped_before(dropped: torch.Tensor, starts: torch.Tensor | None) -> torch.Tensor:
    """(B, L): how many tokens of its own sequence before each kept token are dropped (the whole row when `starts`,
    the (B, L) sequence starts of a packed batch, is None)."""
    count = torch.cumsum(dropped, dim=1)  # dropped up to each token, in the row
    if starts is None:
        return count
    at_start = torch.where(starts, count - dropped.long(), 0)  # dropped before each sequence's first token
    return count - at_start.cummax(dim=1).values


def _instruction_queries(
    input_ids: torch.Tensor, text: torch.Tensor, sequence: torch.Tensor, embed_tokens
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean embedding of the `text` (B, L) tokens of each sequence ((B, L) index in its row): (B, S, D), and the
    number of tokens behind each (B, S).

    One call of `embed_tokens` for the whole micro-batch, even with no text at all: under ZeRO-3 each call gathers
    the embedding weights, and every rank must gather the same number of times. No gradient: the query only ranks
    tokens, and it must add nothing to the embedding's gradient (nor keep activations for backward).
    """
    with torch.no_grad():
        embedded = embed_tokens(input_ids[text]).float()  # (T, D)
    num_sequences = int(sequence.max()) + 1
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None]  # (B, 1)
    group = (rows * num_sequences + sequence)[text]  # (T,) the sequence of each text token, numbered over the batch
    sums = embedded.new_zeros(input_ids.shape[0] * num_sequences, embedded.shape[-1])
    sums.index_add_(0, group.to(embedded.device), embedded)
    counts = torch.bincount(group, minlength=sums.shape[0]).to(embedded.device)
    means = sums / counts.clamp(min=1)[:, None]
    return means.view(input_ids.shape[0], num_sequences, -1), counts.view(input_ids.shape[0], num_sequences)


def _gather_rows(values: torch.Tensor, order: torch.Tensor, filler_mask: torch.Tensor, filler) -> torch.Tensor:
    """values (..., B, L) gathered along the last dim by order (B, L'); filler (a number or a (B, L') tensor) where
    filler_mask (B, L') is True."""
    index = order.expand(*values.shape[:-2], *order.shape)
    out = values.gather(-1, index)
    return torch.where(filler_mask.expand_as(out), torch.as_tensor(filler, dtype=out.dtype, device=out.device), out)


# Inputs that describe a batch's sequences for packing and flash attention (`DataCollatorWithFlattening`'s
# `return_flash_attn_kwargs` / `return_seq_idx`, and pre-shifted labels): rebuilt for the shortened sequence.
PACKING_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx", "shift_labels")


def _packing_inputs(inputs: dict, out: dict) -> dict:
    """`PACKING_KEYS` present in `inputs`, recomputed for the compressed batch `out`: the sequences start where its
    text positions restart (each row starts one), `cu_seq_lens_*` and `seq_idx` count them over the flattened batch,
    `max_length_*` is the longest, and `shift_labels` are `out`'s labels shifted left within each sequence."""
    present = [key for key in PACKING_KEYS if inputs.get(key) is not None]
    if not present:
        return {}
    text_positions = _text_positions(out.get("position_ids"))
    if present != ["shift_labels"] and (text_positions is None or out.get("attention_mask") is not None):
        raise ValueError(
            f"VTC cannot shorten a batch given {', '.join(present)} without the packed sequences' position_ids (and "
            "no attention_mask): it recomputes those inputs from where the position ids restart. Pass position_ids "
            "(DataCollatorWithFlattening returns them by default), or leave those inputs out."
        )
    if text_positions is None or out.get("attention_mask") is not None:  # one sequence per row
        starts = torch.zeros_like(out["input_ids"], dtype=torch.bool)
        starts[:, 0] = True
    else:
        starts = _sequence_starts(text_positions)
    shape = starts.shape  # (B, L')
    starts = starts.flatten()  # (B * L',)
    rebuilt = {}
    if {"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"} & set(present):
        bounds = torch.cat([starts.nonzero().squeeze(1), torch.tensor([starts.numel()], device=starts.device)])
        cu = bounds.to(torch.int32)
        longest = int((bounds[1:] - bounds[:-1]).max())
        for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
            if key in present:
                rebuilt[key] = cu.to(inputs[key].dtype)
        for key in ("max_length_q", "max_length_k"):
            if key in present:
                rebuilt[key] = longest
    if "seq_idx" in present:
        rebuilt["seq_idx"] = (starts.cumsum(0) - 1).view(shape).to(inputs["seq_idx"].dtype)
    if "shift_labels" in present:
        labels = out.get("labels")
        if labels is None:
            raise ValueError("VTC cannot shorten shift_labels given without labels: pass labels as well, from which "
                             "it shifts the shortened sequence's labels.")
        shifted = torch.full_like(labels, IGNORE_INDEX)
        shifted[:, :-1] = labels[:, 1:]
        next_starts = starts.view(shape)[:, 1:]  # the next token starts another sequence
        shifted[:, :-1] = shifted[:, :-1].masked_fill(next_starts, IGNORE_INDEX)
        rebuilt["shift_labels"] = shifted
    return rebuilt


def compress_batch(
    inputs: dict,
    image_features: list[torch.Tensor],
    image_token_id: int,
    keep_ratio: float,
    strategy: str,
    position_mode: str,
    embed_tokens=None,
    generator: torch.Generator | None = None,
    pad_token_id: int = 0,
    keep_always: list[torch.Tensor] | None = None,
    first_position: int = 0,
    grids: list[tuple[int, int] | None] | None = None,
    query_ignore_ids: Collection[int] = (),
    isolator: torch.Tensor | None = None,
) -> tuple[dict, CompressionStats]:
    """Drop visual tokens from a batch; return the new model inputs and what was kept.

    `inputs` holds `input_ids` (B, L) with one placeholder per visual token, and optionally `attention_mask`,
    `labels`, `position_ids` ((B, L) or (..., B, L), e.g. M-RoPE's (3, B, L)), `token_type_ids` and
    `mm_token_type_ids` (B, L). `image_features` lists each image's projected features (n_i, D) in batch order.
    The result replaces those keys, and `mm_encoder_outputs` carries the kept features.
    `keep_always` marks, per image, tokens kept whatever the strategy (bool (n_i,); LLaVA-NeXT's newline tokens):
    the strategy picks k = max(1, round(keep_ratio * m)) of the m other tokens, in their own order.
    `grids` gives, per image, the (rows, cols) grid of those m tokens in raster order, or None where they form no
    known grid (see `image_grids`, `uniform_indices`); without it every image is spaced in raster order.
    `instruction` ranks an image's tokens against the mean embedding of its sequence's instruction: the tokens that
    are not image placeholders, padding, labelled (the answer), `pad_token_id` or in `query_ignore_ids` (chat
    template and special tokens, see `template_token_ids`), embedded by `embed_tokens` once for the whole batch.
    `diverse` selects every image's tokens in one batched call of `diverse_indices`.
    `pool` keeps the tokens `uniform` keeps, each carrying the mean feature of its block of neighbours on the grid
    (`pool_groups`): every token of the image still reaches the language model, merged; keep_always tokens as they are.
    `first_position` is the position of a sequence's first token, for 'original' positions built here.
    `isolator` (s, D), the mode isolator's soft tokens (`ModeIsolator`): each compressed image's block starts with
    them, then its kept tokens; they take s of the image's dropped placeholders (with 'compact' positions a
    placeholder's identity does not matter), so an image must drop at least s tokens.
    Right or left padding is kept as it was; rows that end up shorter than the longest are padded on the same side.

    A packed batch (no attention mask, position ids restarting inside a row) stays packed: 'compact' positions are
    renumbered within each sequence, shorter rows are padded at the end with a sequence of its own (positions from 0,
    labels -100), and no attention mask is made. Its 2D 'original' positions would leave gaps that transformers reads
    as sequence boundaries, so that is refused; in Qwen2-VL's packed (4, B, L) form the text row (the one transformers
    reads the sequences from) is renumbered and the M-RoPE rows keep their positions.
    """
    input_ids = inputs["input_ids"]  # (B, L)
    attention_mask = inputs.get("attention_mask")  # (B, L) or None
    labels = inputs.get("labels")
    position_ids = inputs.get("position_ids")
    batch, length = input_ids.shape
    device = input_ids.device

    is_image = input_ids == image_token_id  # (B, L)
    sizes = [f.shape[0] for f in image_features]
    assignment = _assign_images(is_image.sum(1).tolist(), sizes)
    grids = [None] * len(sizes) if grids is None else grids

    # Packed rows: transformers detects them only without an attention mask, from the text positions.
    text_positions = _text_positions(position_ids)
    starts = None
    if attention_mask is None and text_positions is not None:
        starts = _sequence_starts(text_positions)  # (B, L)
        if not starts[:, 1:].any():
            starts = None  # one sequence per row
    if starts is not None and position_mode == "original" and position_ids.dim() == 2:
        raise ValueError(
            "VTC with vtc_position_ids='original' cannot compress a packed batch (position_ids restarting inside a "
            "row, no attention_mask): transformers finds the packed sequences where consecutive position ids differ "
            "by other than 1, so the gaps left by the dropped visual tokens would split each sequence. Use "
            "vtc_position_ids='compact' for packed batches, or pad them and pass an attention_mask. (M-RoPE models "
            "such as Qwen2-VL always keep the original positions: give their packed positions in transformers' "
            "(4, B, L) form, the text positions first.)"
        )
    if isolator is not None and position_mode == "original":
        raise ValueError(
            "The mode isolator (vtc_mode_isolator) needs vtc_position_ids='compact': its soft tokens take dropped "
            "tokens' places, and with 'original' positions they would carry those tokens' positions. (M-RoPE models "
            "such as Qwen2-VL always keep the original positions, so they cannot use it.)"
        )
    sequence = starts.cumsum(1) - 1 if starts is not None else torch.zeros_like(input_ids)  # (B, L) index in its row

    if strategy == "instruction":
        text = ~is_image & ~torch.isin(input_ids, torch.tensor([pad_token_id, *query_ignore_ids], device=device))
        if attention_mask is not None:
            text &= attention_mask.bool()
        if labels is not None:
            text &= labels == IGNORE_INDEX  # the instruction, not the answer
        queries, query_tokens = _instruction_queries(input_ids, text, sequence, embed_tokens)  # (B, S, D), (B, S)

    selectable_of = [
        torch.arange(f.shape[0]) if keep_always is None else (~keep_always[i].cpu()).nonzero().squeeze(1)
        for i, f in enumerate(image_features)
    ]  # per image, the tokens the strategy chooses among
    if strategy == "diverse":  # all images of the batch in one batched selection
        diverse = diverse_indices(
            [f[s.to(f.device)] for f, s in zip(image_features, selectable_of)],
            [num_kept(s.numel(), keep_ratio) if s.numel() else 0 for s in selectable_of],
        )

    keep = torch.ones_like(input_ids, dtype=torch.bool)  # (B, L)
    kept_features = []
    for sample, images in enumerate(assignment):
        if not images:
            continue
        positions = is_image[sample].nonzero().squeeze(1)  # (sum n_i,)
        offset = 0
        for image in images:
            features = image_features[image]  # (n, D)
            n = features.shape[0]
            fixed = torch.zeros(n, dtype=torch.bool) if keep_always is None else keep_always[image].cpu()
            selectable = selectable_of[image]  # (m,)
            m = selectable.numel()
            k = num_kept(m, keep_ratio) if m else 0
            if strategy in ("uniform", "pool"):
                chosen = uniform_indices(m, k, grids[image])
            elif strategy == "random":
                chosen = random_indices(m, k, generator)
            elif strategy == "diverse":
                chosen = diverse[image]
            else:
                own = int(sequence[sample, positions[offset]])  # the packed sequence the image is in
                query = queries[sample, own] if query_tokens[sample, own] else None
                chosen = instruction_indices(features[selectable.to(features.device)], query, k, grids[image])
            dropped = ~fixed  # (n,)
            dropped[selectable[chosen]] = False
            kept = (~dropped).nonzero().squeeze(1)  # (k + n_fixed,) ascending
            slots = dropped.clone()  # the placeholders that leave the sequence
            if isolator is not None:
                if int(dropped.sum()) < len(isolator):
                    raise ValueError(
                        f"Sample {sample} of the batch has an image of {n} visual tokens of which VTC drops "
                        f"{int(dropped.sum())}, fewer than the mode isolator's {len(isolator)} tokens "
                        f"(vtc_mode_isolator={len(isolator)}), which take dropped tokens' places. Lower "
                        "vtc_mode_isolator or vtc_keep_ratio."
                    )
                slots[dropped.nonzero().squeeze(1)[: len(isolator)]] = False
            keep[sample, positions[offset : offset + n][slots.to(device)]] = False
            if strategy == "pool" and k < m:  # each kept token carries the mean of its block of neighbours
                chosen_at = selectable[chosen].to(features.device)
                pooled = pool_features(features[selectable.to(features.device)], k, grids[image])
                features = features.index_copy(0, chosen_at, pooled)
            features = features[kept.to(features.device)]  # (k + n_fixed, D)
            if isolator is not None:
                features = torch.cat([isolator.to(features.device, features.dtype), features])  # (s + k + n_fixed, D)
            kept_features.append(features)
            offset += n

    if labels is not None and (labels[~keep] != IGNORE_INDEX).any():
        sample = int((~keep & (labels != IGNORE_INDEX)).any(1).nonzero()[0])
        raise ValueError(
            f"Sample {sample} of the batch has a loss label on an image placeholder token; visual tokens must be "
            f"labelled {IGNORE_INDEX} (VTC removes them from the sequence)."
        )

    # Padding is kept where it was (and trimmed): the new length is the longest row of real kept tokens.
    kept_per_row = keep.sum(1)  # (B,) kept tokens, padding included
    real = attention_mask.bool() if attention_mask is not None else torch.ones_like(keep)
    new_length = int((keep & real).sum(1).max())
    left_padded = attention_mask is not None and bool((attention_mask[:, 0] == 0).any())
    columns = torch.arange(new_length, device=device)[None, :]  # (1, L')
    if left_padded:
        # dropped positions first, then the kept ones in order: the last L' columns are the row, padded on the left
        order = torch.sort(keep.to(torch.int8), dim=1, stable=True).indices[:, length - new_length :]
        filler = columns < (new_length - kept_per_row)[:, None]
    else:
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :new_length]
        filler = columns >= kept_per_row[:, None]  # (B, L')

    out = dict(inputs)
    out["input_ids"] = _gather_rows(input_ids, order, filler, pad_token_id)
    if attention_mask is not None:
        out["attention_mask"] = _gather_rows(attention_mask, order, filler, 0)
    elif starts is None and (filler.any() or (position_mode == "original" and (~keep).any())):
        # Rows of unequal length need a mask; and without one, transformers would read the gaps that dropped tokens
        # leave in 'original' positions as boundaries of packed sequences.
        out["attention_mask"] = (~filler).long()
    if labels is not None:
        out["labels"] = _gather_rows(labels, order, filler, IGNORE_INDEX)
    for key in TOKEN_TYPE_KEYS:
        if inputs.get(key) is not None:
            out[key] = _gather_rows(inputs[key], order, filler, 0)
    if position_mode == "original" or position_ids is not None:
        if position_ids is None:
            position_ids = torch.arange(first_position, first_position + length, device=device).expand(batch, length)
        # each kept token moves back by the number of tokens dropped before it in its sequence
        dropped_before = _dropped_before(~keep, starts)  # (B, L)
        if position_mode == "compact":
            position_ids = position_ids - dropped_before
        elif position_ids.dim() == 3 and position_ids.shape[0] == 4:  # Qwen2-VL's text row: always contiguous
            position_ids = torch.cat([(position_ids[0] - dropped_before)[None], position_ids[1:]])
        # a packed batch's padding is a sequence of its own (positions 0, 1, ...), the others' padding sits at 0
        padding_positions = (columns - kept_per_row[:, None]).clamp(min=0) if starts is not None else 0
        out["position_ids"] = _gather_rows(position_ids, order, filler, padding_positions)
    out.update(_packing_inputs(inputs, out))
    for key in ("pixel_values", "image_sizes"):
        out.pop(key, None)
    out["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=kept_features)}

    real_before = attention_mask.sum() if attention_mask is not None else batch * length
    isolating = len(isolator) * len(kept_features) if isolator is not None else 0  # soft tokens, not visual ones
    stats = CompressionStats(
        kept_tokens=sum(f.shape[0] for f in kept_features) - isolating,
        visual_tokens=sum(sizes),
        length_before=float(real_before) / batch,
        length_after=float(real_before - (~keep).sum()) / batch,
        llm_length=new_length,
    )
    return out, stats


# Where the mode isolator lives on the model while it trains, and the file it is saved in beside the model's weights.
ISOLATOR_ATTRIBUTE = "sts_mode_isolator"
ISOLATOR_FILE = "sts_mode_isolator.safetensors"


class ModeIsolator(nn.Module):
    """DualSpeed's mode isolator: `size` learned soft tokens (size, D) that open each compressed image's block in
    training forwards (`compress_batch`'s `isolator`), telling the language model that this sequence is compressed.
    Attached to the model as `ISOLATOR_ATTRIBUTE` for training, so every backend (DDP, ZeRO, FSDP) and the optimizer
    treat it as one of the model's parameters; kept out of the model's saved weights (`_keys_to_ignore_on_save`) and
    saved in `ISOLATOR_FILE` instead (`save_isolator`). Its forward returns the tokens: called as a module, so that
    ZeRO-3 gathers them. Initialised from N(0, std), std the text config's `initializer_range`, seeded."""

    def __init__(self, size: int, hidden_size: int, std: float, seed: int, dtype=None, device=None):
        super().__init__()
        tokens = torch.randn(size, hidden_size, generator=torch.Generator().manual_seed(seed)) * std
        self.tokens = nn.Parameter(tokens.to(device=device, dtype=dtype))  # (size, D)

    def forward(self) -> torch.Tensor:
        return self.tokens


def attach_isolator(model, size: int, seed: int, start: torch.Tensor | None = None) -> ModeIsolator:
    """The model's mode isolator, attached if it has none (from `start`, (size, D), when given): the same module for
    every later run on this model. Its key is left out of the model's saved weights."""
    isolator = getattr(model, ISOLATOR_ATTRIBUTE, None)
    if isolator is None:
        weight = model.get_input_embeddings().weight
        hidden_size = tuple(getattr(weight, "ds_shape", weight.shape))[-1]  # ZeRO-3 keeps the full shape apart
        config = getattr(model, "config", None)
        std = getattr(config.get_text_config(), "initializer_range", 0.02) if config is not None else 0.02
        isolator = ModeIsolator(size, hidden_size, std, seed, dtype=weight.dtype, device=weight.device)
        model.add_module(ISOLATOR_ATTRIBUTE, isolator)
        # a PreTrainedModel's own set (from post_init); a custom model gets one
        model._keys_to_ignore_on_save = {*(getattr(model, "_keys_to_ignore_on_save", None) or ()),
                                         f"{ISOLATOR_ATTRIBUTE}.tokens"}
    shape = tuple(getattr(isolator.tokens, "ds_shape", isolator.tokens.shape))
    if shape[0] != size:
        raise ValueError(f"The model already has a mode isolator of {shape[0]} tokens, and vtc_mode_isolator={size}.")
    if start is not None:
        if tuple(start.shape) != shape:
            raise ValueError(
                f"The saved mode isolator has shape {tuple(start.shape)}, and this run's is {shape} "
                f"(vtc_mode_isolator={size}, the language model's hidden size). Give the same vtc_mode_isolator, or "
                f"remove {ISOLATOR_FILE} to start a new one."
            )
        with torch.no_grad():
            isolator.tokens.copy_(start)
    return isolator


def find_isolator(model) -> ModeIsolator | None:
    """The mode isolator attached anywhere in `model` (a transformers model, or a PEFT or engine wrapper around it)."""
    return next((module for module in model.modules() if isinstance(module, ModeIsolator)), None)


def save_isolator(tokens: torch.Tensor, folder: str) -> None:
    save_file({"tokens": tokens.detach().to("cpu").contiguous()}, os.path.join(folder, ISOLATOR_FILE))


def load_isolator(folder: str | None) -> torch.Tensor | None:
    """The mode isolator's tokens saved in `folder`, or None where it holds none."""
    path = os.path.join(folder, ISOLATOR_FILE) if folder else None
    return load_file(path)["tokens"] if path and os.path.isfile(path) else None


class TokenCompressor:
    """The Visual Token Compressor as a component: `install(model)` once, then, for each training forward,
    `with compressor.micro_batch(step, micro_step) as record:` switches it on and fills `record` (a
    `CompressionRecord`); `remove()` at the end. Outside a `micro_batch` the model is untouched (evaluation and
    generation see every token).

    It is a forward pre-hook on the transformers model, so it runs inside whatever wraps the model (DDP, DeepSpeed,
    PEFT): the vision tower and projector run every step on every rank, inside the engine's forward. How the model
    takes its images comes from `facts` (an entry of `architectures.ARCHITECTURES`; by default the model's own, or
    the custom-model contract `CUSTOM_VLM` for a model type not listed there). Each image's token grid, for
    `uniform`, comes from the batch's vision inputs and the model's config (`image_grids`). The `random` strategy
    draws from `decision_generator(seed, step, micro_step, VTC_STREAM)`: the same on every rank and after resuming.
    `query_ignore_ids`: token ids the `instruction` strategy leaves out of its query (the chat template's and the
    tokenizer's special tokens: `template_token_ids(processing_class)`), besides the image token and the config's
    bos, eos and pad ids, which are always left out.
    `mode_isolator` > 0 attaches a `ModeIsolator` of that many tokens to the model at `install` (from
    `isolator_start` when given), whose tokens open each image's kept tokens in compressed forwards; it stays on the
    model after `remove` (so that the trainer can save it), unused outside compressed training forwards.
    """

    def __init__(
        self,
        image_token_id: int,
        keep_ratio: float = 0.5,
        strategy: str = "uniform",
        position_mode: str = "compact",
        seed: int = 0,
        facts: dict | None = None,
        query_ignore_ids: Collection[int] | None = None,
        keep_schedule: str = "constant",
        keep_ratio_end: float = 1.0,
        schedule_fraction: float = 1.0,
        full_token_fraction: float = 0.0,
        mode_isolator: int = 0,
        isolator_start: torch.Tensor | None = None,
    ):
        self.image_token_id = image_token_id
        self.keep_ratio, self.strategy, self.position_mode, self.seed = keep_ratio, strategy, position_mode, seed
        self.keep_schedule, self.keep_ratio_end, self.schedule_fraction = keep_schedule, keep_ratio_end, schedule_fraction
        self.full_token_fraction = full_token_fraction
        self.mode_isolator, self._isolator_start = mode_isolator, isolator_start
        self.isolator: ModeIsolator | None = None
        self.facts = facts
        self.query_ignore_ids = {image_token_id, *(query_ignore_ids or ())}
        self.model = None
        self.generator: torch.Generator | None = None  # the current micro-batch's, for the 'random' strategy
        self._record: CompressionRecord | None = None  # set while a micro-batch is open: the compressor is on
        self._teacher = False  # inside `teacher_forward`: compress even on a full-token step
        self._handle = None

    def install(self, model) -> None:
        """Hook into `model` (the transformers model itself, not a PEFT or engine wrapper)."""
        if self._handle is not None:
            return
        self.model = model
        if self.facts is None:
            self.facts = vtc_facts(model)
        self.query_ignore_ids |= _config_special_ids(getattr(model, "config", None))
        if self.mode_isolator:
            if self.facts.rope_index is not None:
                raise ValueError(
                    f"vtc_mode_isolator={self.mode_isolator}: {type(model).__name__} places its tokens with M-RoPE, "
                    "which keeps every kept token's original position, and the isolator needs compact positions. "
                    "Set vtc_mode_isolator=0 for this model."
                )
            self.isolator = attach_isolator(model, self.mode_isolator, self.seed, self._isolator_start)
        self._handle = model.register_forward_pre_hook(self._compress, with_kwargs=True)

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._record = None

    @contextlib.contextmanager
    def micro_batch(self, step: int, micro_step: int = 0, max_steps: int | None = None):
        """Compress the training forwards run inside at the step's keep ratio (`keep_ratio_at`; `max_steps` is
        needed by a non-constant schedule), or keep every token on a full-token step (`is_full_token_step`); yield
        the `CompressionRecord` they fill."""
        if self.keep_schedule != "constant" and not max_steps:
            raise ValueError(f"vtc_keep_schedule={self.keep_schedule!r} needs the stage's number of optimizer steps.")
        ratio = keep_ratio_at(
            step, max_steps or 1, self.keep_ratio, self.keep_ratio_end, self.keep_schedule, self.schedule_fraction
        )
        full = is_full_token_step(self.seed, step, self.full_token_fraction)
        self.generator = decision_generator(self.seed, step, micro_step, VTC_STREAM)
        self._record = record = CompressionRecord(keep_ratio=ratio, full_tokens=full)
        try:
            yield record
        finally:
            self._record = None

    @contextlib.contextmanager
    def teacher_forward(self):
        """Inside an open micro-batch of a full-token step: compress the forwards run inside at the step's keep
        ratio all the same (self-distillation's pruned teacher), recording them in `record.teacher`."""
        self._teacher = True
        try:
            yield
        finally:
            self._teacher = False

    def compresses_now(self) -> bool:
        """Whether an image batch's forward run now is compressed (its vision path runs in this compressor's hook,
        before the model's forward): a micro-batch is open and it does not keep every token."""
        record = self._record
        return record is not None and (self._teacher or not (record.full_tokens or record.keep_ratio >= 1.0))

    def _compress(self, module, args, kwargs):
        record = self._record
        if record is None or kwargs.get("pixel_values") is None:
            return None
        if args or kwargs.get("input_ids") is None:
            raise ValueError("VTC needs the batch passed to the model as keyword arguments, with input_ids.")
        if not self.compresses_now():
            # every token kept: the model runs untouched, exactly as with VTC off; only the counts are recorded
            visual = int((kwargs["input_ids"] == self.image_token_id).sum())
            mask = kwargs.get("attention_mask")
            batch, length = kwargs["input_ids"].shape
            real = float(mask.sum()) / batch if mask is not None else float(length)
            record.forwards.append(CompressionStats(visual, visual, real, real, length))
            return None
        videos = [key for key in _VIDEO_INPUTS if kwargs.get(key) is not None]
        if videos:
            raise ValueError(
                f"VTC compresses image tokens only, and this batch has video inputs ({', '.join(videos)}). "
                "Train on image batches in the alignment stage, or turn VTC off with sts_vtc='off'."
            )
        facts = self.facts
        kwargs = dict(kwargs)
        position_mode = self.position_mode
        if facts.rope_index is not None:
            # M-RoPE: positions of the FULL sequence from the model's own function; kept tokens keep theirs.
            if kwargs.get("position_ids") is None:
                kwargs["position_ids"] = self._rope_positions(module, kwargs)  # (3, B, L)
            position_mode = "original"
        vision_inputs = {key: kwargs.pop(key) for key in facts.image_inputs if key in kwargs}
        features = image_features(module, facts, {k: v for k, v in vision_inputs.items() if v is not None})
        keep_always = None
        if facts.newline is not None:
            # The newline rows of the features are copies of this embedding: always kept.
            newline = get_path(module, facts.newline).detach()  # (D,)
            keep_always = [(f.detach() == newline.to(f.dtype)).all(-1) for f in features]  # (n_i,) each
        config = getattr(module, "config", None)
        pad_token_id = (config.get_text_config().pad_token_id if config is not None else None) or 0
        # the grids of the tokens the strategy chooses among (newlines aside), from the vision inputs popped above
        selectable = [len(f) for f in features] if keep_always is None else [int((~k).sum()) for k in keep_always]
        grids = image_grids(config, vision_inputs, selectable)
        kwargs, stats = compress_batch(
            kwargs,
            features,
            self.image_token_id,
            record.keep_ratio,
            self.strategy,
            position_mode,
            embed_tokens=module.get_input_embeddings(),
            generator=self.generator,
            pad_token_id=pad_token_id,
            keep_always=keep_always,
            first_position=facts.first_position,
            grids=grids,
            query_ignore_ids=self.query_ignore_ids,
            isolator=self.isolator() if self.isolator is not None else None,
        )
        kept = kwargs.pop("mm_encoder_outputs")["image"].pooler_output  # list of (k_i, D)
        if facts.route == "inputs_embeds":
            # The model gets the embedded sequence with the kept features written over the image placeholders.
            input_ids = kwargs.pop("input_ids")  # (B, L')
            is_image = input_ids == self.image_token_id
            embeds = module.get_input_embeddings()(input_ids.masked_fill(is_image, 0))  # (B, L', D)
            kept = torch.cat(kept).to(embeds.device, embeds.dtype)  # (sum k_i, D)
            kwargs["inputs_embeds"] = embeds.masked_scatter(is_image[..., None], kept)
        elif facts.features == "tensor":
            kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=torch.cat(kept)[None])}
        else:
            kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=kept)}
        if self._teacher:
            record.teacher.append(stats)
            record.teacher_labels = kwargs.get("labels")
        else:
            record.forwards.append(stats)
        return args, kwargs

    def _rope_positions(self, module, kwargs: dict) -> torch.Tensor:
        """M-RoPE position ids (3, B, L) of the full sequence, from the model's own `get_rope_index`."""
        if kwargs.get("mm_token_type_ids") is None:
            raise ValueError(
                f"VTC on {type(module).__name__} computes the M-RoPE positions of the full sequence and needs "
                "`mm_token_type_ids` in the batch (the model's processor returns it: 1 on image tokens, 0 on text)."
            )
        rope_index = get_path(module, self.facts.rope_index)
        inputs = {key: kwargs[key] for key in _ROPE_INPUTS if kwargs.get(key) is not None}
        position_ids, _ = rope_index(kwargs["input_ids"], attention_mask=kwargs.get("attention_mask"), **inputs)
        return position_ids


def image_features(module, facts, vision_inputs: dict) -> list[torch.Tensor]:
    """Projected features of every image (or tile) of a batch, in batch order: a list of (n_i, D), from the model's
    own `get_image_features` (the vision tower and the projector)."""
    if facts.route == "inputs_embeds":
        features = module.get_image_features(**vision_inputs)  # the custom-model contract
        if isinstance(features, ModelOutput):
            features = features.pooler_output
    else:
        features = module.get_image_features(**vision_inputs, return_dict=True).pooler_output
    if facts.tile_tokens is not None:
        # one (tiles * t, D) tensor per sample: compress each tile of t tokens as an image
        tokens = get_path(module, facts.tile_tokens)
        features = [tile for sample in features for tile in sample.split(tokens) if len(tile)]
    return list(features)


def _config_special_ids(config) -> set[int]:
    """The bos, eos and pad token ids of a model config's text part (eos may be a list); empty without a config."""
    if config is None:
        return set()
    text = config.get_text_config()
    ids = set()
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(text, name, None)
        ids.update(value if isinstance(value, list) else [] if value is None else [value])
    return ids
