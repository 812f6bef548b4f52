"""Visual Token Compressor (VTC): feed the language model a physically shorter sequence during alignment.

After the projector, each image's n visual tokens are reduced to k = max(1, round(keep_ratio * n)) (rounded half up),
and the batch handed to the language model is rebuilt without the dropped ones: input ids, attention mask, labels,
position ids and per-token type ids (`token_type_ids`, `mm_token_type_ids`) are shortened together, per sample, so
nothing is misaligned. The kept features reach the model through its `mm_encoder_outputs` argument (or, for a custom
model, as `inputs_embeds` built here), so gradients flow to the projector through the kept tokens only.

What differs between architectures (which inputs feed the vision path, newline tokens, tiles, M-RoPE positions) is
data in `architectures.ARCHITECTURES`; `TokenCompressor` reads it.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput

from .architectures import get_path, vtc_facts

IGNORE_INDEX = -100
# Per-token inputs besides ids, mask, labels and positions, shortened with the sequence (0 = text, also for padding):
# PaliGemma's prefix/suffix and Gemma3's image-block `token_type_ids`, Qwen2-VL's modality `mm_token_type_ids`.
TOKEN_TYPE_KEYS = ("token_type_ids", "mm_token_type_ids")
# Inputs of Qwen2-VL's `get_rope_index` besides input ids and attention mask.
_ROPE_INPUTS = ("mm_token_type_ids", "image_grid_thw", "video_grid_thw", "second_per_grid_ts")
_VIDEO_INPUTS = ("pixel_values_videos", "video_grid_thw")


def num_kept(n: int, keep_ratio: float) -> int:
    """Tokens kept of an image of `n` tokens: max(1, round(keep_ratio * n)), rounded half up."""
    return max(1, min(n, math.floor(keep_ratio * n + 0.5)))


def _centers(n: int, k: int) -> torch.Tensor:
    """`k` evenly spaced indices in range(n): the centres of `k` equal bins."""
    return ((torch.arange(k, dtype=torch.float64) + 0.5) * n / k).floor().long()


def uniform_indices(n: int, k: int) -> torch.Tensor:
    """`k` of `n` token indices evenly spaced over the image's token grid, ascending.

    When both n and k are perfect squares (a square grid of s x s tokens, keeping t x t), the kept tokens form a
    t x t lattice over the grid; otherwise they are evenly spaced in raster order.
    """
    side, kept_side = math.isqrt(n), math.isqrt(k)
    if side * side == n and kept_side * kept_side == k:
        rows = _centers(side, kept_side)  # (t,)
        return (rows[:, None] * side + rows[None, :]).flatten()
    return _centers(n, k)


def random_indices(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """`k` of `n` token indices drawn without replacement from `generator`, ascending."""
    return torch.randperm(n, generator=generator)[:k].sort().values


def instruction_indices(features: torch.Tensor, query: torch.Tensor | None, k: int) -> torch.Tensor:
    """The `k` tokens of `features` (n, D) most cosine-similar to `query` (D,), ascending (original order kept).

    With no instruction text (`query` None) the choice falls back to `uniform_indices`.
    """
    if query is None:
        return uniform_indices(features.shape[0], k)
    scores = F.cosine_similarity(features.detach().float(), query.detach().float()[None, :], dim=-1)  # (n,)
    return scores.topk(k).indices.sort().values.cpu()


@dataclass
class CompressionStats:
    kept_tokens: int
    visual_tokens: int
    length_before: float  # mean tokens per sample entering the language model without VTC
    length_after: float  # the same with VTC


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


def _gather_rows(values: torch.Tensor, order: torch.Tensor, filler_mask: torch.Tensor, filler) -> torch.Tensor:
    """values (..., B, L) gathered along the last dim by order (B, L'); filler where filler_mask (B, L') is True."""
    index = order.expand(*values.shape[:-2], *order.shape)
    out = values.gather(-1, index)
    return out.masked_fill(filler_mask.expand_as(out), filler)


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
) -> tuple[dict, CompressionStats]:
    """Drop visual tokens from a batch; return the new model inputs and what was kept.

    `inputs` holds `input_ids` (B, L) with one placeholder per visual token, and optionally `attention_mask`,
    `labels`, `position_ids` ((B, L) or (..., B, L), e.g. M-RoPE's (3, B, L)), `token_type_ids` and
    `mm_token_type_ids` (B, L). `image_features` lists each image's projected features (n_i, D) in batch order.
    The result replaces those keys, and `mm_encoder_outputs` carries the kept features.
    `keep_always` marks, per image, tokens kept whatever the strategy (bool (n_i,); LLaVA-NeXT's newline tokens):
    the strategy picks k = max(1, round(keep_ratio * m)) of the m other tokens, in their own order.
    `first_position` is the position of a sequence's first token, for 'original' positions built here.
    Right or left padding is kept as it was; rows that end up shorter than the longest are padded on the same side.
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

    keep = torch.ones_like(input_ids, dtype=torch.bool)  # (B, L)
    kept_features = []
    for sample, images in enumerate(assignment):
        if not images:
            continue
        positions = is_image[sample].nonzero().squeeze(1)  # (sum n_i,)
        query = None
        if strategy == "instruction":
            text = ~is_image[sample]
            if attention_mask is not None:
                text &= attention_mask[sample].bool()
            if labels is not None:
                text &= labels[sample] == IGNORE_INDEX  # the instruction, not the answer
            if text.any():
                query = embed_tokens(input_ids[sample][text]).mean(0)  # (D,)
        offset = 0
        for image in images:
            features = image_features[image]  # (n, D)
            n = features.shape[0]
            fixed = torch.zeros(n, dtype=torch.bool) if keep_always is None else keep_always[image].cpu()
            selectable = (~fixed).nonzero().squeeze(1)  # (m,) the tokens the strategy chooses among
            m = selectable.numel()
            k = num_kept(m, keep_ratio) if m else 0
            if strategy == "uniform":
                chosen = uniform_indices(m, k)
            elif strategy == "random":
                chosen = random_indices(m, k, generator)
            else:
                chosen = instruction_indices(features[selectable.to(features.device)], query, k)
            dropped = ~fixed  # (n,)
            dropped[selectable[chosen]] = False
            kept = (~dropped).nonzero().squeeze(1)  # (k + n_fixed,) ascending
            keep[sample, positions[offset : offset + n][dropped.to(device)]] = False
            kept_features.append(features[kept.to(features.device)])
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
    elif filler.any():
        out["attention_mask"] = (~filler).long()
    if labels is not None:
        out["labels"] = _gather_rows(labels, order, filler, IGNORE_INDEX)
    for key in TOKEN_TYPE_KEYS:
        if inputs.get(key) is not None:
            out[key] = _gather_rows(inputs[key], order, filler, 0)
    if position_mode == "original" or position_ids is not None:
        if position_ids is None:
            position_ids = torch.arange(first_position, first_position + length, device=device).expand(batch, length)
        if position_mode == "compact":
            # each kept token moves back by the number of tokens dropped before it in its row
            position_ids = position_ids - torch.cumsum(~keep, dim=1)
        out["position_ids"] = _gather_rows(position_ids, order, filler, 0)
    for key in ("pixel_values", "image_sizes"):
        out.pop(key, None)
    out["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=kept_features)}

    real_before = attention_mask.sum() if attention_mask is not None else batch * length
    stats = CompressionStats(
        kept_tokens=sum(f.shape[0] for f in kept_features),
        visual_tokens=sum(sizes),
        length_before=float(real_before) / batch,
        length_after=float(real_before - (~keep).sum()) / batch,
    )
    return out, stats


class TokenCompressor:
    """Applies `compress_batch` inside the model's forward while `active` is set (training forwards only).

    It is a forward pre-hook on the transformers model, so it runs inside whatever wraps the model (DDP, DeepSpeed,
    PEFT): the vision tower and projector run every step on every rank, inside the engine's forward. How the model
    takes its images comes from `facts` (an entry of `architectures.ARCHITECTURES`; by default the model's own, or
    the custom-model contract `CUSTOM_VLM` for a model type not listed there).
    """

    def __init__(
        self,
        model,
        image_token_id: int,
        keep_ratio: float,
        strategy: str,
        position_mode: str,
        facts: dict | None = None,
    ):
        self.model = model
        self.image_token_id = image_token_id
        self.keep_ratio, self.strategy, self.position_mode = keep_ratio, strategy, position_mode
        self.facts = vtc_facts(model) if facts is None else facts
        self.generator: torch.Generator | None = None  # set per micro-batch for the 'random' strategy
        self.active = False
        self.stats: list[CompressionStats] = []
        self._handle = None

    def install(self) -> None:
        if self._handle is None:
            self._handle = self.model.register_forward_pre_hook(self._compress, with_kwargs=True)

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.active = False

    def _compress(self, module, args, kwargs):
        if not self.active or kwargs.get("pixel_values") is None:
            return None
        if args or kwargs.get("input_ids") is None:
            raise ValueError("VTC needs the batch passed to the model as keyword arguments, with input_ids.")
        videos = [key for key in _VIDEO_INPUTS if kwargs.get(key) is not None]
        if videos:
            raise ValueError(
                f"VTC compresses image tokens only, and this batch has video inputs ({', '.join(videos)}). "
                "Train on image batches in the alignment stage, or turn VTC off with sts_vtc='off'."
            )
        facts = self.facts
        kwargs = dict(kwargs)
        position_mode = self.position_mode
        if facts["rope_index"] is not None:
            # M-RoPE: positions of the FULL sequence from the model's own function; kept tokens keep theirs.
            if kwargs.get("position_ids") is None:
                kwargs["position_ids"] = self._rope_positions(module, kwargs)  # (3, B, L)
            position_mode = "original"
        vision_inputs = {key: kwargs.pop(key) for key in facts["image_inputs"] if key in kwargs}
        features = self._image_features(module, {k: v for k, v in vision_inputs.items() if v is not None})
        keep_always = None
        if facts["newline"] is not None:
            # The newline rows of the features are copies of this embedding: always kept.
            newline = get_path(module, facts["newline"]).detach()  # (D,)
            keep_always = [(f.detach() == newline.to(f.dtype)).all(-1) for f in features]  # (n_i,) each
        config = getattr(module, "config", None)
        pad_token_id = (config.get_text_config().pad_token_id if config is not None else None) or 0
        kwargs, stats = compress_batch(
            kwargs,
            features,
            self.image_token_id,
            self.keep_ratio,
            self.strategy,
            position_mode,
            embed_tokens=module.get_input_embeddings(),
            generator=self.generator,
            pad_token_id=pad_token_id,
            keep_always=keep_always,
            first_position=facts["first_position"],
        )
        kept = kwargs.pop("mm_encoder_outputs")["image"].pooler_output  # list of (k_i, D)
        if facts["route"] == "inputs_embeds":
            # The model gets the embedded sequence with the kept features written over the image placeholders.
            input_ids = kwargs.pop("input_ids")  # (B, L')
            is_image = input_ids == self.image_token_id
            embeds = module.get_input_embeddings()(input_ids.masked_fill(is_image, 0))  # (B, L', D)
            kept = torch.cat(kept).to(embeds.device, embeds.dtype)  # (sum k_i, D)
            kwargs["inputs_embeds"] = embeds.masked_scatter(is_image[..., None], kept)
        elif facts["features"] == "tensor":
            kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=torch.cat(kept)[None])}
        else:
            kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=kept)}
        self.stats.append(stats)
        return args, kwargs

    def _image_features(self, module, vision_inputs: dict) -> list[torch.Tensor]:
        """Projected features of every image (or tile) of the batch, in batch order: a list of (n_i, D)."""
        if self.facts["route"] == "inputs_embeds":
            features = module.get_image_features(**vision_inputs)  # the custom-model contract
            if isinstance(features, ModelOutput):
                features = features.pooler_output
        else:
            features = module.get_image_features(**vision_inputs, return_dict=True).pooler_output
        if self.facts["tile_tokens"] is not None:
            # one (tiles * t, D) tensor per sample: compress each tile of t tokens as an image
            tokens = get_path(module, self.facts["tile_tokens"])
            features = [tile for sample in features for tile in sample.split(tokens) if len(tile)]
        return list(features)

    def _rope_positions(self, module, kwargs: dict) -> torch.Tensor:
        """M-RoPE position ids (3, B, L) of the full sequence, from the model's own `get_rope_index`."""
        if kwargs.get("mm_token_type_ids") is None:
            raise ValueError(
                f"VTC on {type(module).__name__} computes the M-RoPE positions of the full sequence and needs "
                "`mm_token_type_ids` in the batch (the model's processor returns it: 1 on image tokens, 0 on text)."
            )
        rope_index = get_path(module, self.facts["rope_index"])
        inputs = {key: kwargs[key] for key in _ROPE_INPUTS if kwargs.get(key) is not None}
        position_ids, _ = rope_index(kwargs["input_ids"], attention_mask=kwargs.get("attention_mask"), **inputs)
        return position_ids
