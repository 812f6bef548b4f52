"""STS beyond LLaVA: every architecture of `sts_trainer.architectures`, a custom VLM and text-only causal LMs.

For each vision-language architecture, on a tiny random model built here:
- VTC: during an STSTrainer alignment step, the sequence entering the first decoder layer is the text plus the kept
  visual tokens of each image (LLaVA-NeXT / OneVision: newline tokens are always kept, the ratio applies to the rest);
- LDS: a layer with skip probability 1 is never called, one with probability 0 always is;
- sts_stage='none' gives Trainer's losses bit for bit;
- `save_pretrained` after STS training gives a checkpoint that plain transformers reloads with the same keys.
And the real-size configuration of a published checkpoint, on the meta device: `find_parts` resolves and
`flops.step_flops` computes.
"""

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3TextConfig,
    GemmaConfig,
    Idefics3Config,
    InternVLConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaNextConfig,
    LlavaNextVideoConfig,
    LlavaOnevisionConfig,
    Mistral3Config,
    MistralConfig,
    PaliGemmaConfig,
    PixtralVisionConfig,
    Qwen2_5_VLConfig,
    Qwen2Config,
    Qwen2VLConfig,
    SiglipVisionConfig,
    SmolVLMConfig,
    Trainer,
    TrainingArguments,
)
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

from sts_trainer import STSTrainer, STSTrainingArguments
from sts_trainer.architectures import ARCHITECTURES, find_parts
from sts_trainer.flops import TrainingStep, step_flops, visual_tokens_per_image
from sts_trainer.layer_skip import LayerSkipper, _SkippableLayer
from sts_trainer.token_compression import num_kept, uniform_indices

from .helpers import ListDataset, LossRecorder, Received, for_alignment, training_args

VOCAB, IMAGE, START, END, PAD = 128, 127, 125, 124, 0
KEEP = 0.25


# ---- tiny models and their data -------------------------------------------------------------------------------------


def _llama(**kwargs) -> LlamaConfig:
    return LlamaConfig(**{**_TEXT, **kwargs})


_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=VOCAB, pad_token_id=PAD, max_position_embeddings=512)
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


@dataclass
class Image:
    """One image (or tile) of a sample: its inputs to the model, its visual tokens, and those always kept."""

    inputs: dict
    tokens: int
    newlines: int = 0

    @property
    def expected_kept(self) -> int:
        return num_kept(self.tokens - self.newlines, KEEP) + self.newlines


@dataclass
class Arch:
    """A tiny model of one architecture and the synthetic samples it takes."""

    model_type: str
    config: callable  # () -> config
    image: callable  # (generator, index, images in its sample) -> Image: the index-th image (sizes vary with it)
    collate_images: callable  # list of per-sample lists of Image.inputs -> batch keys
    images_per_sample: tuple = (1, 2, 1, 0)
    token_types: str | None = None  # 'paligemma', 'gemma3' or 'mrope': per-token type ids the model takes

    def model(self, seed=0):
        torch.manual_seed(seed)
        return AutoModelForImageTextToText.from_config(self.config())

    def samples(self, num_samples=8, seed=0) -> list[dict]:
        """[prompt] ([START] [image placeholders] [END]) per image [answer], labels on the answer only."""
        generator = torch.Generator().manual_seed(seed)
        samples, index = [], 0
        for i in range(num_samples):
            n_images = self.images_per_sample[i % len(self.images_per_sample)]
            images = [self.image(generator, index + j, n_images) for j in range(n_images)]
            index += n_images
            prompt = torch.randint(1, 100, (5 + i % 3,), generator=generator)
            answer = torch.randint(1, 100, (4,), generator=generator)
            pieces, kinds = [prompt], [torch.zeros(len(prompt), dtype=torch.long)]
            for image in images:
                pieces.append(torch.tensor([START] + [IMAGE] * image.tokens + [END]))
                kinds.append(torch.tensor([0] + [1] * image.tokens + [0]))
            pieces.append(answer)
            kinds.append(torch.full((4,), 2))  # 2: answer
            input_ids, kind = torch.cat(pieces), torch.cat(kinds)
            labels = torch.where(kind == 2, input_ids, -100)
            samples.append({"input_ids": input_ids, "labels": labels, "kind": kind, "images": images})
        return samples

    def collate(self, samples: list[dict]) -> dict:
        length = max(len(s["input_ids"]) for s in samples)
        batch = {
            "input_ids": torch.full((len(samples), length), PAD),
            "labels": torch.full((len(samples), length), -100),
            "attention_mask": torch.zeros((len(samples), length), dtype=torch.long),
        }
        kinds = torch.zeros((len(samples), length), dtype=torch.long)
        for row, sample in enumerate(samples):
            n = len(sample["input_ids"])
            batch["input_ids"][row, :n] = sample["input_ids"]
            batch["labels"][row, :n] = sample["labels"]
            batch["attention_mask"][row, :n] = 1
            kinds[row, :n] = sample["kind"]
        if self.token_types == "paligemma":  # 0: prefix (image and prompt, bidirectional), 1: suffix (answer)
            batch["token_type_ids"] = (kinds == 2).long()
        elif self.token_types == "gemma3":  # 1 on image tokens: bidirectional attention within an image
            batch["token_type_ids"] = (kinds == 1).long()
        elif self.token_types == "mrope":  # modality of each token, for the M-RoPE position function
            batch["mm_token_type_ids"] = (kinds == 1).int()
        if any(s["images"] for s in samples):
            batch.update(self.collate_images([[image.inputs for image in s["images"]] for s in samples]))
        return batch

    def expected_row_lengths(self, samples, ratio_applied=True) -> list[int]:
        lengths = []
        for s in samples:
            dropped = sum(image.tokens - image.expected_kept for image in s["images"]) if ratio_applied else 0
            lengths.append(len(s["input_ids"]) - dropped)
        return lengths


def _cat_keys(*keys):
    def collate(per_sample):
        flat = [image for images in per_sample for image in images]
        return {key: torch.stack([image[key] for image in flat]) for key in keys}
    return collate


# LLaVA: CLIP 32 px images in 8 px patches -> 16 tokens.
def _llava_config():
    return LlavaConfig(vision_config=CLIPVisionConfig(**_VISION, image_size=32, patch_size=8), text_config=_llama(),
                       image_token_id=IMAGE, image_seq_length=16)


def _llava_image(generator, index, images_in_sample):
    return Image({"pixel_values": torch.randn(3, 32, 32, generator=generator)}, 16)


# LLaVA-NeXT: 32 px tiles of 4 x 4 tokens, anyres grids up to 2 x 2 tiles. An image of size (H, W) gives a base tile
# (16 tokens) and its best grid of tiles, unpadded to the image's aspect ratio, with a newline token after each row.
_PINPOINTS = [[32, 64], [64, 32], [64, 64]]
_NEXT_SIZES = [(32, 64), (64, 64), (64, 40), (40, 64)]


def _anyres_tokens(size, pinpoints=_PINPOINTS, tile=32, side=4) -> tuple[int, int]:
    rows_of_tiles, cols_of_tiles = get_anyres_image_grid_shape(size, pinpoints, tile)
    grid = unpad_image(torch.zeros(1, rows_of_tiles * side, cols_of_tiles * side), torch.tensor(size))  # (1, h, w)
    rows, cols = grid.shape[1:]
    return side * side + rows * (cols + 1), rows  # base tile + rows of the grid each ended by a newline


def _next_image(generator, index, images_in_sample, pinpoints=_PINPOINTS, one_tile_if_several=False):
    size = _NEXT_SIZES[index % len(_NEXT_SIZES)]
    tiles = 1 + math.prod(get_anyres_image_grid_shape(size, pinpoints, 32))
    tokens, newlines = _anyres_tokens(size, pinpoints)
    if one_tile_if_several and images_in_sample > 1:  # OneVision: the base tile of each image, then a newline
        tiles, tokens, newlines = 1, 17, 1
    pixels = torch.randn(tiles, 3, 32, 32, generator=generator)
    return Image({"pixel_values": pixels, "image_sizes": torch.tensor(size)}, tokens, newlines)


def _collate_tiles(per_sample):
    """(images, max tiles, 3, H, W) zero-padded, as the LLaVA-NeXT processor gives them, and image_sizes."""
    flat = [image for images in per_sample for image in images]
    tiles = max(image["pixel_values"].shape[0] for image in flat)
    pixels = torch.zeros(len(flat), tiles, 3, 32, 32)
    for i, image in enumerate(flat):
        pixels[i, : image["pixel_values"].shape[0]] = image["pixel_values"]
    return {"pixel_values": pixels, "image_sizes": torch.stack([image["image_sizes"] for image in flat])}


def _llava_next_config(cls=LlavaNextConfig, **kwargs):
    return cls(vision_config=CLIPVisionConfig(**_VISION, image_size=32, patch_size=8), text_config=_llama(),
               image_token_id=IMAGE, image_grid_pinpoints=_PINPOINTS, **kwargs)


# LLaVA-OneVision: SigLIP 32 px tiles, anyres_max_9; a sample of several images gets one tile per image (+ newline).
_OV_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]


def _onevision_config():
    return LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**_VISION, image_size=32, patch_size=8),
        text_config=Qwen2Config(**_TEXT), image_token_id=IMAGE, video_token_id=126,
        image_grid_pinpoints=_OV_PINPOINTS, vision_feature_layer=-1, vision_feature_select_strategy="full",
    )


def _onevision_collate(per_sample):
    batch = _collate_tiles(per_sample)
    batch["batch_num_images"] = torch.tensor([len(images) for images in per_sample])
    return batch


# Qwen2-VL / Qwen2.5-VL: pixel_values are flattened patches (t*h*w, 3 * 2 * 4 * 4) with image_grid_thw (t, h, w);
# the merger joins 2 x 2 patches: (1, 8, 8) -> 16 tokens, (1, 4, 8) -> 8 tokens.
_QWEN_TEXT = dict(_TEXT, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3]}, bos_token_id=1,
                  eos_token_id=2)
_QWEN_TOKENS = dict(image_token_id=IMAGE, video_token_id=126, vision_start_token_id=START, vision_end_token_id=END)


def _qwen2_vl_config():
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2)
    return Qwen2VLConfig(text_config=_QWEN_TEXT, vision_config=vision, **_QWEN_TOKENS)


def _qwen2_5_vl_config():
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1])
    return Qwen2_5_VLConfig(text_config=_QWEN_TEXT, vision_config=vision, **_QWEN_TOKENS)


def _qwen_image(generator, index, images_in_sample):
    grid = (1, 8, 8) if index % 2 == 0 else (1, 4, 8)
    patches = torch.randn(math.prod(grid), 3 * 2 * 4 * 4, generator=generator)
    return Image({"pixel_values": patches, "image_grid_thw": torch.tensor(grid)}, math.prod(grid) // 4)


def _qwen_collate(per_sample):
    flat = [image for images in per_sample for image in images]
    return {"pixel_values": torch.cat([image["pixel_values"] for image in flat]),
            "image_grid_thw": torch.stack([image["image_grid_thw"] for image in flat])}


# Idefics3 / SmolVLM: 64 px tiles in 8 px patches, pixel shuffle by 2 -> 16 tokens per tile; pixel_values
# (samples, max tiles, 3, 64, 64), samples with fewer tiles padded with all-zero tiles.
def _idefics3_config(cls):
    return lambda: cls(vision_config=dict(**_VISION, image_size=64, patch_size=8), text_config=_llama(),
                       scale_factor=2, image_token_id=IMAGE)


def _idefics3_image(generator, index, images_in_sample):
    return Image({"pixel_values": torch.randn(3, 64, 64, generator=generator)}, 16)


def _idefics3_collate(per_sample):
    tiles = max(len(images) for images in per_sample)
    pixels = torch.zeros(len(per_sample), tiles, 3, 64, 64)
    for row, images in enumerate(per_sample):
        for j, image in enumerate(images):
            pixels[row, j] = image["pixel_values"]
    return {"pixel_values": pixels}


# PaliGemma: SigLIP 32 px / 8 px -> 16 tokens; Gemma 1 decoder. Gemma3: SigLIP 32 px / 8 px, 16 tokens per image.
def _paligemma_config():
    text = GemmaConfig(**{**_TEXT, "head_dim": 16})
    return PaliGemmaConfig(vision_config=SiglipVisionConfig(**_VISION, image_size=32, patch_size=8), text_config=text,
                           image_token_id=IMAGE, projection_dim=64, hidden_size=64, vocab_size=VOCAB)


def _gemma3_config():
    text = Gemma3TextConfig(**{**_TEXT, "head_dim": 16, "sliding_window": 8,
                               "layer_types": ["sliding_attention", "full_attention"] * 2})
    return Gemma3Config(vision_config=SiglipVisionConfig(**_VISION, image_size=32, patch_size=8), text_config=text,
                        mm_tokens_per_image=16, image_token_id=IMAGE, boi_token_id=START, eoi_token_id=END)


# Mistral3: Pixtral with 8 px patches, 2 x 2 patch merge: 64 x 64 -> 16 tokens, 32 x 64 -> 8 tokens.
def _mistral3_config():
    vision = PixtralVisionConfig(**_VISION, head_dim=16, image_size=64, patch_size=8)
    return Mistral3Config(vision_config=vision, text_config=MistralConfig(**_TEXT), image_token_id=IMAGE,
                          spatial_merge_size=2)


def _mistral3_image(generator, index, images_in_sample):
    height = 64 if index % 2 == 0 else 32
    pixels = torch.zeros(3, 64, 64)
    pixels[:, :height] = torch.randn(3, height, 64, generator=generator)
    return Image({"pixel_values": pixels, "image_sizes": torch.tensor([height, 64])}, (height // 16) * 4)


# InternVL: 64 px tiles in 8 px patches, pixel shuffle 0.5 -> 16 tokens per tile.
def _internvl_config():
    vision = dict(**_VISION, image_size=64, patch_size=8)
    return InternVLConfig(vision_config=vision, text_config=Qwen2Config(**_TEXT), image_token_id=IMAGE,
                          image_seq_length=16, downsample_ratio=0.5)


def _internvl_image(generator, index, images_in_sample):
    return Image({"pixel_values": torch.randn(3, 64, 64, generator=generator)}, 16)


ARCHS = {
    arch.model_type: arch
    for arch in [
        Arch("llava", _llava_config, _llava_image, _cat_keys("pixel_values")),
        Arch("llava_next", _llava_next_config, _next_image, _collate_tiles),
        Arch("llava_next_video", lambda: _llava_next_config(LlavaNextVideoConfig, video_token_id=126), _next_image,
             _collate_tiles),
        Arch("llava_onevision", _onevision_config,
             lambda g, i, n: _next_image(g, i, n, _OV_PINPOINTS, one_tile_if_several=True), _onevision_collate),
        Arch("qwen2_vl", _qwen2_vl_config, _qwen_image, _qwen_collate, token_types="mrope"),
        Arch("qwen2_5_vl", _qwen2_5_vl_config, _qwen_image, _qwen_collate, token_types="mrope"),
        Arch("idefics3", _idefics3_config(Idefics3Config), _idefics3_image, _idefics3_collate),
        Arch("smolvlm", _idefics3_config(SmolVLMConfig), _idefics3_image, _idefics3_collate),
        Arch("paligemma", _paligemma_config, _llava_image, _cat_keys("pixel_values"), images_per_sample=(1,),
             token_types="paligemma"),
        Arch("gemma3", _gemma3_config, _llava_image, _cat_keys("pixel_values"), token_types="gemma3"),
        Arch("mistral3", _mistral3_config, _mistral3_image, _cat_keys("pixel_values", "image_sizes")),
        Arch("internvl", _internvl_config, _internvl_image, _cat_keys("pixel_values")),
    ]
}
VLMS = sorted(ARCHS)


# ---- running STSTrainer / Trainer on them ----------------------------------------------------------------------------


def train(arch, model, args, trainer_cls=STSTrainer, samples=None):
    recorder = LossRecorder()
    trainer = trainer_cls(
        model=model, args=args, train_dataset=ListDataset(samples if samples is not None else arch.samples()),
        data_collator=arch.collate, callbacks=[recorder],
    )
    trainer.train()
    return trainer, recorder


def args_for(out_dir, cls=STSTrainingArguments, **overrides):
    # the collator needs the samples' own keys ('images', 'kind'): Trainer must not drop them
    return training_args(out_dir, cls=cls, max_steps=2, remove_unused_columns=False, **overrides)


class InputProbe:
    """In training forwards: the real length of each row the language model embeds, and the sequence length entering
    the first decoder layer."""

    def __init__(self, model, pad=PAD):
        parts = find_parts(model)
        self.pad, self.rows, self.layer0 = pad, [], []
        self.handles = [
            parts.model.get_input_embeddings().register_forward_hook(self._embedded),
            parts.layers[0].register_forward_pre_hook(self._layer, with_kwargs=True),
        ]

    def _embedded(self, module, args, output):
        if module.training and args[0].dim() == 2:  # not the 'instruction' strategy's query, a flat list of tokens
            self.rows.append((args[0] != self.pad).sum(1).tolist())

    def _layer(self, module, args, kwargs):
        if module.training:
            self.layer0.append((args[0] if args else kwargs["hidden_states"]).shape[1])

    def remove(self):
        for handle in self.handles:
            handle.remove()


def assert_reloads_in_plain_transformers(model, out_dir, auto_class=AutoModelForImageTextToText):
    """save_pretrained after STS training: plain transformers reloads the same keys and the trained weights."""
    assert not any(isinstance(module, _SkippableLayer) for module in model.modules())
    path = f"{out_dir}/saved"
    model.save_pretrained(path)
    reloaded = auto_class.from_pretrained(path)
    assert type(reloaded) is type(model)
    assert list(reloaded.state_dict()) == list(type(model)(model.config).state_dict())
    trained = model.state_dict()
    assert all(torch.equal(value, trained[key]) for key, value in reloaded.state_dict().items())


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[key], sb[key]) for key in sa)


# ---- every vision-language architecture, tiny -----------------------------------------------------------------------


def test_every_mapped_vision_language_architecture_is_tested_here():
    mapped = {name for name, facts in ARCHITECTURES.items() if facts.projector is not None}
    assert mapped == set(ARCHS)


@pytest.mark.parametrize("model_type", VLMS)
def test_vtc_shortens_the_language_model_input(model_type, out_dir):
    arch = ARCHS[model_type]
    model = for_alignment(arch.model())
    projector_before = [p.detach().clone() for p in find_parts(model).projector.parameters()]
    samples = arch.samples()
    probe = InputProbe(model)
    trainer, recorder = train(arch, model, args_for(out_dir, vtc_keep_ratio=KEEP), samples=samples)
    probe.remove()
    assert trainer.sts_plan.stage == "alignment" and trainer.sts_plan.vtc and not trainer.sts_plan.lds
    # every sample went through once: its text plus, per image, the kept tokens (and, where the model has them, the
    # newline tokens, which are always kept)
    assert len(probe.rows) == 2
    assert sorted(sum(probe.rows, [])) == sorted(arch.expected_row_lengths(samples))
    assert probe.layer0 == [max(rows) for rows in probe.rows]
    assert sum(sum(rows) for rows in probe.rows) < sum(arch.expected_row_lengths(samples, ratio_applied=False))
    assert all(log["vtc_input_length_after"] < log["vtc_input_length_before"] for log in recorder.logs if "loss" in log)
    # the projector learned through the kept tokens
    assert any(not torch.equal(a, b) for a, b in zip(projector_before, find_parts(model).projector.parameters()))
    assert_reloads_in_plain_transformers(model, out_dir)


def _projector_rows_with_gradient(arch, samples, out_dir, **options) -> int:
    """Alignment training of a fresh model with `options`: how many of the projector's output rows (one per visual
    token) got a gradient in the first step."""
    model = for_alignment(arch.model())
    grads = []

    def keep_grad(module, args, output):
        if module.training:
            output.register_hook(grads.append)

    handle = find_parts(model).projector.register_forward_hook(keep_grad)
    train(arch, model, args_for(out_dir, **options), samples=samples)
    handle.remove()
    first = grads[0]
    return int((first.reshape(-1, first.shape[-1]).abs().sum(1) > 0).sum())


@pytest.mark.parametrize("model_type", VLMS)
def test_pool_carries_every_visual_token_that_dense_training_does(model_type, out_dir):
    """'pool' at the keep ratio 'uniform' uses: the same sequence lengths, but every projector output that dense
    alignment trains through still gets a gradient; 'uniform' drops some."""
    arch = ARCHS[model_type]
    samples = arch.samples()
    probe = InputProbe(model := for_alignment(arch.model()))
    train(arch, model, args_for(out_dir, vtc_keep_ratio=KEEP, vtc_strategy="pool"), samples=samples)
    probe.remove()
    assert sorted(sum(probe.rows, [])) == sorted(arch.expected_row_lengths(samples))
    dense = _projector_rows_with_gradient(arch, samples, out_dir, sts_stage="none")
    pooled = _projector_rows_with_gradient(arch, samples, out_dir, vtc_keep_ratio=KEEP, vtc_strategy="pool")
    uniform = _projector_rows_with_gradient(arch, samples, out_dir, vtc_keep_ratio=KEEP, vtc_strategy="uniform")
    assert pooled == dense > uniform


@pytest.mark.parametrize("model_type", VLMS)
def test_lds_never_runs_a_layer_with_probability_one(model_type, out_dir):
    arch = ARCHS[model_type]
    model = arch.model()
    layers = find_parts(model).layers
    calls = [0] * len(layers)
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda module, args, _i=i: calls.__setitem__(_i, calls[_i] + module.training))
    # alpha 1, eps 1, constant: depth factors 0, 2/3, 4/3, 2 -> p = 0, 2/3, 1, 1
    args = args_for(out_dir, lds_alpha=1.0, lds_epsilon=1.0, lds_schedule="constant")
    trainer, recorder = train(arch, model, args)
    assert trainer.sts_plan.stage == "instruction" and trainer.sts_plan.lds and not trainer.sts_plan.vtc
    assert calls[0] == 2 and calls[2] == calls[3] == 0
    assert all(0.5 <= log["lds_skipped_fraction"] <= 0.75 for log in recorder.logs if "loss" in log)
    assert_reloads_in_plain_transformers(model, out_dir)


@pytest.mark.parametrize(
    "model_type, strategy",
    [(t, ("uniform", "random", "instruction", "diverse", "pool")[i % 5]) for i, t in enumerate(VLMS)]
    + [("llava", s) for s in ("random", "instruction", "diverse", "pool")],  # every strategy on LLaVA itself
)
def test_vtc_and_lds_composed_in_instruction_tuning(model_type, strategy, out_dir):
    arch = ARCHS[model_type]
    model = arch.model()
    samples = arch.samples()
    probe = InputProbe(model)
    layers = find_parts(model).layers
    calls = [0] * len(layers)
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda module, args, _i=i: calls.__setitem__(_i, calls[_i] + module.training))
    # skip probabilities 0, 2/3, 1, 1 over the 4 layers (as above), and VTC in the same forwards
    args = args_for(out_dir, sts_vtc="on", vtc_keep_ratio=KEEP, vtc_strategy=strategy, lds_alpha=1.0,
                    lds_epsilon=1.0, lds_schedule="constant")
    trainer, recorder = train(arch, model, args, samples=samples)
    probe.remove()
    assert trainer.sts_plan.stage == "instruction" and trainer.sts_plan.vtc and trainer.sts_plan.lds
    assert sorted(sum(probe.rows, [])) == sorted(arch.expected_row_lengths(samples))
    assert probe.layer0 == [max(rows) for rows in probe.rows]
    assert calls[0] == 2 and calls[2] == calls[3] == 0
    assert all(log["vtc_keep_ratio"] == KEEP and log["lds_skipped_fraction"] >= 0.5
               for log in recorder.logs if "loss" in log)
    assert_reloads_in_plain_transformers(model, out_dir)


@pytest.mark.parametrize("model_type", VLMS)
def test_sparsity_off_trains_exactly_like_trainer(model_type, out_dir):
    arch = ARCHS[model_type]
    models = [arch.model(seed=1), arch.model(seed=1)]
    _, plain = train(arch, models[0], args_for(out_dir, cls=TrainingArguments), trainer_cls=Trainer)
    trainer, sts = train(arch, models[1], args_for(out_dir, sts_stage="none"))
    assert trainer.sts_plan.stage == "none" and len(plain.losses) == 2
    assert plain.losses == sts.losses
    assert_same_weights(*models)


def _logits(predictions):
    """The logits among the predictions: a tuple when the model returns more than logits (Qwen2-VL: rope_deltas)."""
    return predictions[0] if isinstance(predictions, tuple) else predictions


@pytest.mark.parametrize("model_type", VLMS)
def test_predict_and_evaluate_with_metrics_after_sts_training(model_type, out_dir):
    """transformers 5.24 VLM outputs carry each encoder's output (`image_outputs`, with None hidden states): the
    evaluation loop must get logits, as with a model that returns only them."""
    arch = ARCHS[model_type]
    samples = arch.samples(6)
    args = args_for(out_dir, per_device_eval_batch_size=4, vtc_keep_ratio=KEEP)
    trainer = STSTrainer(
        model=for_alignment(arch.model()), args=args, train_dataset=ListDataset(samples), eval_dataset=ListDataset(samples),
        data_collator=arch.collate,
        compute_metrics=lambda p: {"rows": float(len(p.label_ids)), "vocab": float(_logits(p.predictions).shape[-1])},
    )
    trainer.train()
    assert trainer.sts_plan.vtc
    metrics = trainer.evaluate()
    assert metrics["eval_rows"] == 6 and metrics["eval_vocab"] == VOCAB and metrics["eval_loss"] > 0
    output = trainer.predict(ListDataset(samples))
    logits = _logits(output.predictions)
    # dense at prediction: the full sequence's logits, padded to the longest row across batches
    assert logits.shape == (6, max(len(s["input_ids"]) for s in samples), VOCAB)
    assert output.metrics["test_rows"] == 6


# ---- what the language model receives: positions, per-token types, newline tokens ------------------------------------


def kept_positions(input_ids: torch.Tensor, ratio=KEEP, grids=()) -> torch.Tensor:
    """Indices of a (right-padded) row that uniform VTC keeps: every real token but the dropped image placeholders;
    each run of placeholders is one image (images are delimited by START / END)."""
    ids = input_ids[input_ids != PAD]
    keep = torch.ones(len(ids), dtype=torch.bool)
    is_image = (ids == IMAGE).int()
    starts = ((is_image.diff(prepend=torch.tensor([0]))) == 1).nonzero().squeeze(1)
    grids = iter(grids)
    for start in starts.tolist():
        n = int(is_image[start:].cumprod(0).sum())
        dropped = torch.ones(n, dtype=torch.bool)
        dropped[uniform_indices(n, num_kept(n, ratio), next(grids, None))] = False
        keep[start : start + n] = ~dropped
    return keep.nonzero().squeeze(1)


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl"])
def test_mrope_positions_are_the_full_sequences_at_the_kept_tokens(model_type):
    arch = ARCHS[model_type]
    model = arch.model()
    samples = arch.samples(4)
    batch = arch.collate(samples)
    full, _ = model.model.get_rope_index(
        batch["input_ids"], batch["mm_token_type_ids"], image_grid_thw=batch["image_grid_thw"],
        attention_mask=batch["attention_mask"],
    )  # (3, B, L): computed on the full sequence by the model's own function
    received = Received(model, KEEP, position_mode="compact")  # M-RoPE models keep the original positions regardless
    model(**batch)
    received.remove()
    positions = received.kwargs["position_ids"]  # (3, B, L')
    assert positions.shape[:2] == (3, 4) and positions.shape[2] < batch["input_ids"].shape[1]
    for row in range(4):
        grids = [(h // 2, w // 2) for _, h, w in (image.inputs["image_grid_thw"].tolist() for image in samples[row]["images"])]
        kept = kept_positions(batch["input_ids"][row], grids=grids)
        assert torch.equal(positions[:, row, : len(kept)], full[:, row, kept])
    # text after an image keeps its offset from the full image grid: positions are not renumbered 0..L'-1
    assert int(positions[0, 1].max()) > int(received.kwargs["attention_mask"][1].sum())


def test_paligemma_original_positions_count_from_one():
    arch = ARCHS["paligemma"]
    model = arch.model()
    batch = arch.collate(arch.samples(4))
    received = Received(model, KEEP, position_mode="original")
    model(**batch)
    received.remove()
    for row in range(4):
        kept = kept_positions(batch["input_ids"][row], grids=[(4, 4)])
        assert received.kwargs["position_ids"][row, : len(kept)].tolist() == (kept + 1).tolist()


@pytest.mark.parametrize("model_type", ["paligemma", "gemma3", "qwen2_vl", "qwen2_5_vl"])
def test_token_type_ids_are_shortened_with_the_sequence(model_type):
    arch = ARCHS[model_type]
    model = arch.model()
    batch = arch.collate(arch.samples(4))
    received = Received(model, KEEP)
    model(**batch)
    received.remove()
    kwargs = received.kwargs
    key = "mm_token_type_ids" if arch.token_types == "mrope" else "token_type_ids"
    assert kwargs[key].shape == kwargs["input_ids"].shape < batch["input_ids"].shape
    if arch.token_types == "paligemma":  # suffix = the answer
        assert torch.equal(kwargs[key].bool(), kwargs["labels"] != -100)
    else:  # image tokens
        assert torch.equal(kwargs[key].bool(), kwargs["input_ids"] == IMAGE)


def test_vtc_refuses_what_it_cannot_compress_faithfully():
    arch = ARCHS["qwen2_vl"]
    model = arch.model()
    batch = arch.collate(arch.samples(2))
    received = Received(model, KEEP)
    with pytest.raises(ValueError, match=r"video inputs \(pixel_values_videos, video_grid_thw\)"):
        model(**batch, pixel_values_videos=torch.zeros(4, 96), video_grid_thw=torch.tensor([[1, 2, 2]]))
    del batch["mm_token_type_ids"]
    with pytest.raises(ValueError, match="M-RoPE positions of the full sequence and needs `mm_token_type_ids`"):
        model(**batch)
    received.remove()


@pytest.mark.parametrize("model_type", ["llava_next", "llava_next_video", "llava_onevision"])
def test_newline_tokens_are_kept_and_the_rest_compressed(model_type):
    arch = ARCHS[model_type]
    model = arch.model()
    samples = arch.samples(4)
    images = [image for s in samples for image in s["images"]]
    received = Received(model, KEEP)
    model(**arch.collate(samples))
    received.remove()
    kept = received.kwargs["mm_encoder_outputs"]["image"].pooler_output
    newline = model.model.image_newline
    assert [len(f) for f in kept] == [image.expected_kept for image in images]
    assert [int((f == newline).all(-1).sum()) for f in kept] == [image.newlines for image in images]
    assert sum(image.newlines for image in images) > 0


@pytest.mark.parametrize("model_type", VLMS)
def test_decoder_layers_return_a_plain_tensor(model_type):
    """A skipped layer returns its input hidden states: that fits only if the layer itself returns a tensor."""
    arch = ARCHS[model_type]
    model = arch.model()
    outputs = []
    for layer in find_parts(model).layers:
        layer.register_forward_hook(lambda module, args, output: outputs.append(type(output)))
    model(**arch.collate(arch.samples(2)))
    assert outputs == [torch.Tensor] * len(find_parts(model).layers)


def test_skipping_keeps_each_gemma3_layer_on_its_own_attention_type():
    """Gemma3 picks each layer's mask by `layer_types[i]`, i its position in the list: LDS skips a layer in place."""
    arch = ARCHS["gemma3"]
    model = arch.model()
    layers = find_parts(model).layers
    assert model.config.text_config.layer_types == ["sliding_attention", "full_attention"] * 2
    masks = {}
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(
            lambda module, args, kwargs, _i=i: masks.__setitem__(_i, kwargs["attention_mask"]), with_kwargs=True
        )
    batch = arch.collate(arch.samples(4))
    model.train()
    model(**batch)
    dense = dict(masks)
    assert not torch.equal(dense[2], dense[3])  # sliding window vs full attention over sequences longer than 8
    skipper = LayerSkipper(0.0, 0.0, "constant", seed=0)
    skipper.install(layers)
    layers[1]._sts_skip = True
    masks.clear()
    model(**batch)
    skipper.remove()
    assert sorted(masks) == [0, 2, 3] and len(layers) == 4
    assert all(torch.equal(masks[i], dense[i]) for i in (0, 2, 3))


def test_a_layer_returning_a_tuple_is_refused_with_a_clear_error():
    class TupleLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, hidden_states):
            return (self.linear(hidden_states),)

    layers = nn.ModuleList([TupleLayer(), TupleLayer()])
    skipper = LayerSkipper(0.0, 0.0, "constant", seed=0)
    skipper.install(layers)
    with pytest.raises(TypeError, match="LDS cannot skip TupleLayer: it returns a tuple"):
        layers[0](torch.randn(1, 2, 4))
    skipper.remove()
    assert isinstance(layers[0](torch.randn(1, 2, 4)), tuple)  # unpatched: the layer's own behaviour


# ---- a custom VLM written as a plain nn.Module, named through the override options ---------------------------------


class Block(nn.Module):
    """A pre-norm decoder block: causal self-attention and an MLP; returns the hidden states tensor."""

    def __init__(self, dim):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, hidden_states, padding_mask=None):
        length = hidden_states.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool).triu(1)
        x = self.norm1(hidden_states)
        hidden_states = hidden_states + self.attention(x, x, x, attn_mask=causal, key_padding_mask=padding_mask)[0]
        return hidden_states + self.mlp(self.norm2(hidden_states))


class CustomVLM(nn.Module):
    """A VLM sts_trainer has no entry for: 8 px patches of 32 px images -> a linear 'vision encoder' -> `projector` ->
    a decoder of `blocks`. It meets the custom-model contract of `sts_trainer.architectures`: `get_image_features`,
    `get_input_embeddings`, and a forward that also takes `inputs_embeds`."""

    def __init__(self, dim=32, num_layers=4):
        super().__init__()
        self.vision = nn.Linear(3 * 8 * 8, dim)
        self.projector = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.embed = nn.Embedding(VOCAB, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(num_layers))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, VOCAB)

    def get_input_embeddings(self):
        return self.embed

    def get_image_features(self, pixel_values):  # (N, 3, 32, 32) -> (N, 16, D)
        patches = pixel_values.unfold(2, 8, 8).unfold(3, 8, 8)  # (N, 3, 4, 4, 8, 8)
        patches = patches.permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)  # (N, 16, 192)
        return self.projector(self.vision(patches))

    def forward(self, input_ids=None, attention_mask=None, labels=None, pixel_values=None, inputs_embeds=None):
        if inputs_embeds is None:
            is_image = input_ids == IMAGE
            inputs_embeds = self.embed(input_ids.masked_fill(is_image, 0))
            if pixel_values is not None:
                features = self.get_image_features(pixel_values).flatten(0, 1)
                inputs_embeds = inputs_embeds.masked_scatter(is_image[..., None], features)
        padding = None if attention_mask is None else attention_mask == 0
        hidden = inputs_embeds
        for block in self.blocks:
            hidden = block(hidden, padding)
        logits = self.head(self.norm(hidden))
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return {"loss": loss, "logits": logits}


CUSTOM = Arch("custom", None, _llava_image, _cat_keys("pixel_values"))
OVERRIDES = dict(sts_decoder_layers="blocks", sts_projector="projector", sts_image_token_id=IMAGE)


def custom_vlm(seed=0):
    torch.manual_seed(seed)
    return CustomVLM()


def test_an_unknown_architecture_gets_an_error_listing_the_supported_ones_and_the_options(out_dir):
    with pytest.raises(ValueError) as error:
        find_parts(custom_vlm())
    message = str(error.value)
    assert "does not know the architecture None (CustomVLM)" in message
    assert all(name in message for name in ("llava", "qwen2_vl", "idefics3", "gemma3", "llama"))
    assert all(option in message for option in ("sts_decoder_layers", "sts_projector", "sts_image_token_id"))
    # asked for explicitly, the error comes at construction; under 'auto' the model trains as with Trainer
    with pytest.raises(ValueError, match="Supported model types"):
        STSTrainer(model=custom_vlm(), args=args_for(out_dir, sts_stage="alignment"))
    assert STSTrainer(model=custom_vlm(), args=args_for(out_dir)).args.sts_stage == "auto"


def test_the_override_options_are_checked_against_the_model(out_dir):
    model = custom_vlm()
    parts = find_parts(model, projector="projector", layers="blocks", image_token_id=IMAGE)
    assert parts.layers is model.blocks and parts.projector is model.projector and parts.image_token_id == IMAGE
    assert parts.language_model is model.blocks  # the layer list sits on the root: it is the decoder stack
    with pytest.raises(ValueError, match=r"sts_decoder_layers 'decoder.blocks' .*CustomVLM.*no attribute 'decoder'"):
        find_parts(model, layers="decoder.blocks")
    with pytest.raises(ValueError, match=r"sts_decoder_layers 'blocks.0' names a Block; LDS needs the nn.ModuleList"):
        find_parts(model, layers="blocks.0")
    with pytest.raises(ValueError, match="pass sts_image_token_id"):
        find_parts(model, projector="projector", layers="blocks")
    with pytest.raises(ValueError, match="sts_projector 'proj' does not resolve"):
        find_parts(model, projector="proj", layers="blocks", image_token_id=IMAGE)
    # a known architecture: the options override its facts
    llava = ARCHS["llava"].model()
    other_layers = find_parts(llava, layers="model.vision_tower.encoder.layers").layers
    assert other_layers is llava.model.vision_tower.encoder.layers
    assert find_parts(llava, image_token_id=5).image_token_id == 5


@pytest.mark.parametrize(
    "option, value",
    [("sts_decoder_layers", "model..layers"), ("sts_decoder_layers", "model/layers"), ("sts_projector", "1proj"),
     ("sts_image_token_id", -1), ("sts_image_token_id", "7"), ("sts_image_token_id", True)],
)
def test_override_options_are_validated(out_dir, option, value):
    with pytest.raises(ValueError, match=option):
        STSTrainingArguments(output_dir=out_dir, report_to=[], use_cpu=True, **{option: value})


def test_a_custom_vlm_gets_vtc_through_inputs_embeds(out_dir):
    model = custom_vlm()
    for param in model.parameters():
        param.requires_grad = False
    for param in model.projector.parameters():
        param.requires_grad = True
    projector_before = [p.detach().clone() for p in model.projector.parameters()]
    samples = CUSTOM.samples()
    lengths = []
    padding = []

    def record(module, args):  # args: hidden states (B, L, D), padding mask (B, L)
        if module.training:
            lengths.append(args[0].shape[1])
            padding.append((~args[1]).sum(1).tolist())

    model.blocks[0].register_forward_pre_hook(record)
    trainer, _ = train(CUSTOM, model, args_for(out_dir, vtc_keep_ratio=KEEP, **OVERRIDES),
                       samples=samples)
    assert trainer.sts_plan.stage == "alignment" and trainer.sts_plan.vtc
    assert sorted(sum(padding, [])) == sorted(CUSTOM.expected_row_lengths(samples))
    assert lengths == [max(rows) for rows in padding]
    assert any(not torch.equal(a, b) for a, b in zip(projector_before, model.projector.parameters()))


def test_a_custom_vlm_gets_lds_and_keeps_its_state_dict(out_dir):
    model = custom_vlm()
    keys = list(model.state_dict())
    calls = [0] * 4
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda module, args, _i=i: calls.__setitem__(_i, calls[_i] + module.training))
    args = args_for(out_dir, lds_alpha=1.0, lds_epsilon=1.0, lds_schedule="constant", **OVERRIDES)
    trainer, _ = train(CUSTOM, model, args, trainer_cls=STSTrainer)
    assert trainer.sts_plan.stage == "instruction" and trainer.sts_plan.lds
    assert calls[0] == 2 and calls[2] == calls[3] == 0
    assert list(model.state_dict()) == keys and type(model.blocks[0]) is Block


def test_a_custom_vlm_with_sparsity_off_trains_exactly_like_trainer(out_dir):
    models = [custom_vlm(seed=1), custom_vlm(seed=1)]
    _, plain = train(CUSTOM, models[0], args_for(out_dir, cls=TrainingArguments), trainer_cls=Trainer)
    _, sts = train(CUSTOM, models[1], args_for(out_dir, sts_stage="none", **OVERRIDES), trainer_cls=STSTrainer)
    assert plain.losses == sts.losses
    assert_same_weights(*models)


# ---- text-only causal LMs: LDS -------------------------------------------------------------------------------------


class TextLM(Arch):
    def model(self, seed=0):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(self.config())


def _text_lm(model_type, **kwargs):
    return TextLM(model_type, lambda: AutoConfig.for_model(model_type, **_TEXT, **kwargs), None, None,
                  images_per_sample=(0,))


TEXT_LMS = {
    arch.model_type: arch
    for arch in [
        _text_lm("llama"),
        _text_lm("qwen2"),
        _text_lm("mistral"),
        _text_lm("qwen3", head_dim=16),
        _text_lm("gemma", head_dim=16),
        _text_lm("gemma2", head_dim=16, sliding_window=8),
        _text_lm("gemma3_text", head_dim=16, sliding_window=8),
    ]
}


def test_every_mapped_text_lm_is_tested_here():
    assert {name for name, facts in ARCHITECTURES.items() if facts.projector is None} == set(TEXT_LMS)


@pytest.mark.parametrize("model_type", sorted(TEXT_LMS))
def test_lds_on_a_text_only_causal_lm(model_type, out_dir):
    arch = TEXT_LMS[model_type]
    model = arch.model()
    parts = find_parts(model)
    assert not parts.is_multimodal
    calls = [0] * len(parts.layers)
    outputs = []
    for i, layer in enumerate(parts.layers):
        layer.register_forward_pre_hook(lambda module, args, _i=i: calls.__setitem__(_i, calls[_i] + module.training))
        layer.register_forward_hook(lambda module, args, output: outputs.append(type(output)))
    args = args_for(out_dir, lds_alpha=1.0, lds_epsilon=1.0, lds_schedule="constant")
    trainer, _ = train(arch, model, args)
    assert trainer.sts_plan.stage == "instruction" and trainer.sts_plan.lds and not trainer.sts_plan.vtc
    assert calls[0] == 2 and calls[2] == calls[3] == 0
    assert set(outputs) == {torch.Tensor}  # the layers that ran returned a plain tensor
    assert_reloads_in_plain_transformers(model, out_dir, auto_class=AutoModelForCausalLM)


@pytest.mark.parametrize("model_type", sorted(TEXT_LMS))
def test_a_text_only_lm_with_sparsity_off_trains_exactly_like_trainer(model_type, out_dir):
    arch = TEXT_LMS[model_type]
    models = [arch.model(seed=1), arch.model(seed=1)]
    _, plain = train(arch, models[0], args_for(out_dir, cls=TrainingArguments), trainer_cls=Trainer)
    _, sts = train(arch, models[1], args_for(out_dir, sts_stage="none"))
    assert plain.losses == sts.losses
    assert_same_weights(*models)


# ---- real-size configurations on the meta device ---------------------------------------------------------------------
# Key values of each checkpoint's published config.json (the rest at the config class defaults); no weights are read.

_CLIP_L_336 = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                   num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
_SIGLIP_SO400M = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                      num_hidden_layers=27, num_attention_heads=16, patch_size=14)
_LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]

REAL_CONFIGS = {
    # model_type: (checkpoint, config kwargs, visual tokens of one image or tile at the config's resolution)
    "llava": ("llava-hf/llava-1.5-7b-hf", dict(
        vision_config=_CLIP_L_336, image_token_id=32000, vision_feature_layer=-2,
        text_config=dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, vocab_size=32064, max_position_embeddings=4096)), 576),
    "llava_next": ("llava-hf/llava-v1.6-mistral-7b-hf", dict(
        vision_config=_CLIP_L_336, image_token_id=32000, vision_feature_layer=-2,
        image_grid_pinpoints=_LLAVA_NEXT_PINPOINTS,
        text_config=dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=32064,
                         max_position_embeddings=32768, rope_theta=1e6, sliding_window=None)), 576),
    "llava_next_video": ("llava-hf/LLaVA-NeXT-Video-7B-hf", dict(
        vision_config=_CLIP_L_336, image_token_id=32001, video_token_id=32000, vision_feature_layer=-2,
        image_grid_pinpoints=_LLAVA_NEXT_PINPOINTS,
        text_config=dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, vocab_size=32064, max_position_embeddings=4096)), 576),
    "llava_onevision": ("llava-hf/llava-onevision-qwen2-7b-ov-hf", dict(
        vision_config=dict(_SIGLIP_SO400M, num_hidden_layers=26, image_size=384, vision_use_head=False),
        image_token_id=151646, video_token_id=151647, vision_feature_layer=-1,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
        text_config=dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, vocab_size=152128, rope_theta=1e6)), 729),
    "qwen2_vl": ("Qwen/Qwen2-VL-7B-Instruct", dict(
        vision_config=dict(depth=32, embed_dim=1280, hidden_size=3584, mlp_ratio=4, num_heads=16, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rope_theta=1e6,
                         rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652), 256),
    "qwen2_5_vl": ("Qwen/Qwen2.5-VL-7B-Instruct", dict(
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2),
        text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000, rope_theta=1e6,
                         rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652), 256),
    "idefics3": ("HuggingFaceM4/Idefics3-8B-Llama3", dict(
        vision_config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                           image_size=364, patch_size=14),
        text_config=dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128259, rope_theta=500000.0),
        scale_factor=2, image_token_id=128257), 169),
    "smolvlm": ("HuggingFaceTB/SmolVLM-256M-Instruct", dict(
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=512, patch_size=16),
        text_config=dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49280, rope_theta=100000.0,
                         max_position_embeddings=8192),
        scale_factor=4, image_token_id=49190), 64),
    "paligemma": ("google/paligemma-3b-pt-224", dict(
        vision_config=dict(_SIGLIP_SO400M, image_size=224, projection_dim=2048, vision_use_head=False),
        text_config=dict(model_type="gemma", hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
                         num_attention_heads=8, num_key_value_heads=1, head_dim=256, vocab_size=257216),
        image_token_id=257152, projection_dim=2048, hidden_size=2048, vocab_size=257216), 256),
    "gemma3": ("google/gemma-3-4b-it", dict(
        vision_config=dict(_SIGLIP_SO400M, image_size=896, vision_use_head=False),
        text_config=dict(model_type="gemma3_text", hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=256, vocab_size=262208,
                         sliding_window=1024, query_pre_attn_scalar=256,
                         rope_scaling={"rope_type": "linear", "factor": 8.0}),
        mm_tokens_per_image=256, image_token_id=262144, boi_token_id=255999, eoi_token_id=256000), 256),
    "mistral3": ("mistralai/Mistral-Small-3.1-24B-Instruct-2503", dict(
        vision_config=dict(model_type="pixtral", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                           num_attention_heads=16, head_dim=64, image_size=1540, patch_size=14),
        text_config=dict(model_type="mistral", hidden_size=5120, intermediate_size=32768, num_hidden_layers=40,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=131072,
                         max_position_embeddings=131072, rope_theta=1e9, sliding_window=None),
        image_token_id=10, spatial_merge_size=2, multimodal_projector_bias=False, vision_feature_layer=-1,
        tie_word_embeddings=False), 256),
    "internvl": ("OpenGVLab/InternVL3-1B-hf", dict(
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=[448, 448], patch_size=[14, 14]),
        text_config=dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151674, rope_theta=1e6),
        image_token_id=151667, image_seq_length=256, downsample_ratio=0.5, vision_feature_layer=-1,
        tie_word_embeddings=False), 256),
    # text-only causal LMs
    "llama": ("meta-llama/Meta-Llama-3-8B", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192), 0),
    "qwen2": ("Qwen/Qwen2-7B", dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, rope_theta=1e6, max_position_embeddings=131072), 0),
    "mistral": ("mistralai/Mistral-7B-v0.1", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32000, sliding_window=4096), 0),
    "qwen3": ("Qwen/Qwen3-8B", dict(
        hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, rope_theta=1e6), 0),
    "gemma": ("google/gemma-2b", dict(
        hidden_size=2048, intermediate_size=16384, num_hidden_layers=18, num_attention_heads=8,
        num_key_value_heads=1, head_dim=256, vocab_size=256000), 0),
    "gemma2": ("google/gemma-2-9b", dict(
        hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
        num_key_value_heads=8, head_dim=256, vocab_size=256000, sliding_window=4096), 0),
    "gemma3_text": ("google/gemma-3-1b-pt", dict(
        hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, vocab_size=262144, sliding_window=512), 0),
}


# Parameters of each checkpoint as its model card states them, in billions: checks the values above.
PUBLISHED_SIZES = {
    "llava": 7.06, "llava_next": 7.57, "llava_next_video": 7.06, "llava_onevision": 8.03, "qwen2_vl": 8.29,
    "qwen2_5_vl": 8.29, "idefics3": 8.46, "smolvlm": 0.256, "paligemma": 2.92, "gemma3": 4.30, "mistral3": 24.0,
    "internvl": 0.938, "llama": 8.03, "qwen2": 7.62, "mistral": 7.24, "qwen3": 8.19, "gemma": 2.51, "gemma2": 9.24,
    "gemma3_text": 1.0,
}


def test_every_mapped_architecture_has_a_real_size_configuration():
    assert set(REAL_CONFIGS) == set(ARCHITECTURES) == set(PUBLISHED_SIZES)


@pytest.mark.parametrize("model_type", sorted(REAL_CONFIGS))
def test_real_size_configuration_on_the_meta_device(model_type):
    checkpoint, kwargs, tokens = REAL_CONFIGS[model_type]
    config = AutoConfig.for_model(model_type, **kwargs)
    text = config.get_text_config()
    auto_class = AutoModelForImageTextToText if tokens else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto_class.from_config(config)
    parts = find_parts(model)
    assert len(parts.layers) == text.num_hidden_layers, checkpoint
    assert parts.is_multimodal == bool(tokens)
    if tokens:
        assert parts.image_token_id == config.image_token_id
        assert visual_tokens_per_image(config) == tokens, checkpoint
        step = TrainingStep(8, 64, 1, tokens, train_projector=True)
        dense = step_flops(config, step)
        sparse = step_flops(config, step, kept_visual_tokens_per_image=num_kept(tokens, 0.5))
        assert all(dense[part] > 0 for part in ("vision", "projector", "llm_layers", "lm_head"))
        assert sparse["total"] < dense["total"] and sparse["vision"] == dense["vision"]
    else:
        step = TrainingStep(8, 512, train_llm=True)
        dense = step_flops(config, step)
        assert dense["llm_layers"] > 0 and dense["vision"] == 0
    lds = step_flops(config, step, executed_layers=text.num_hidden_layers / 2)
    assert lds["llm_layers"] == pytest.approx(dense["llm_layers"] / 2)
    parameters = sum(p.numel() for p in model.parameters())
    assert parameters / 1e9 == pytest.approx(PUBLISHED_SIZES[model_type], rel=0.01), checkpoint


# ---- the FLOPs model against PyTorch's counter, on the tiny models -------------------------------------------------


@pytest.mark.parametrize("model_type", VLMS)
@pytest.mark.parametrize("trains", ["all", "projector"])
def test_flops_model_matches_the_pytorch_counter(model_type, trains):
    arch = ARCHS[model_type]
    model = arch.model()
    if trains == "projector":
        for_alignment(model)
    model.set_attn_implementation("eager")  # FlopCounterMode has no formula for CPU's fused SDPA kernel
    sample = arch.samples(1)[0]
    batch = arch.collate([sample])
    with FlopCounterMode(display=False) as counter:
        model(**batch).loss.backward()
    tokens = sample["images"][0].tokens
    step = TrainingStep(1, batch["input_ids"].shape[1] - tokens, 1, tokens, train_vision=trains == "all",
                        train_projector=True, train_llm=trains == "all")
    # norms, activations, pooling and rotary embeddings are not modelled: within 3%
    assert step_flops(model.config, step)["total"] == pytest.approx(counter.get_total_flops(), rel=0.03)


def test_a_new_model_type_is_one_entry(monkeypatch):
    """Everything per-architecture (parts, how images go in, token grids, FLOPs shapes) comes from its entry."""
    from sts_trainer.token_compression import image_grids

    class RenamedLlavaConfig(LlavaConfig):
        model_type = "renamed_llava"

    config = RenamedLlavaConfig(**{**_llava_config().to_dict(), "model_type": "renamed_llava"})
    model = AutoModelForImageTextToText.from_config(_llava_config())
    model.config = config
    with pytest.raises(ValueError, match="does not know the architecture 'renamed_llava'"):
        find_parts(model)
    assert image_grids(config, {}, [16]) == [None]  # no entry: no known grid
    monkeypatch.setitem(ARCHITECTURES, "renamed_llava", ARCHITECTURES["llava"])
    parts = find_parts(model)
    assert parts.projector is model.model.multi_modal_projector and parts.image_token_id == IMAGE
    assert image_grids(config, {}, [16, 17]) == [(4, 4), None]
    assert visual_tokens_per_image(config) == 16
    step = TrainingStep(2, 10, 1, 16, train_projector=True)
    assert step_flops(config, step) == step_flops(_llava_config(), step)
