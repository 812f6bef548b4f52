"""What STS knows of each architecture, per `config.model_type`: typed entries, plain data.

Each entry of `ARCHITECTURES` describes the `*ForConditionalGeneration` / `*ForCausalLM` model of transformers; module
paths are attribute paths from that model.

What an entry holds (`Architecture`): where the parts are, how the model takes its images (VTC), and its shapes
(token grids for `uniform`, tokens per image and projector widths for `flops.py`); vision towers, which several
models share, have entries of their own (`VISION_TOWERS`, by `vision_config.model_type`). Adding a model is one entry
here (and one in `VISION_TOWERS` for a new tower).

Text-only causal LMs have no projector and no image token: LDS works on them, VTC does not.

A model whose `model_type` is not here (a custom VLM, a plain `nn.Module`) works when the user names its parts with
`STSTrainingArguments.sts_decoder_layers` (enough for LDS), `sts_projector` and `sts_image_token_id` (needed for VTC).
VTC then uses the `CUSTOM_VLM` facts, the contract such a model must meet:
- `get_image_features(pixel_values)` returns the projected features of every image of the batch, in batch order: a
  tensor (num_images, n, D), a list of (n_i, D) tensors, or a transformers `ModelOutput` whose `pooler_output` is one;
- `get_input_embeddings()` returns the token embedding module (VTC embeds the shortened `input_ids` with it);
- `forward` accepts `inputs_embeds` (instead of `input_ids`, `pixel_values`), `attention_mask`, `labels` and, with
  `vtc_position_ids='original'`, `position_ids`, and computes the loss from them;
- the image placeholder positions of `input_ids` hold `sts_image_token_id`, one per visual feature;
- for LDS, each decoder layer takes the hidden states (B, L, D) as its first argument and returns the new hidden
  states as a plain tensor (every transformers 5 decoder layer does).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn


def side_of(value) -> int:
    return value if isinstance(value, int) else value[0]  # InternVL writes sizes as [h, w]


def _patches_per_side(config) -> int:
    return side_of(config.vision_config.image_size) // side_of(config.vision_config.patch_size)


def feature_layers(config) -> list[int]:
    """The vision hidden states the projector reads: `vision_feature_layer` where the model has one, else the last."""
    layer = getattr(config, "vision_feature_layer", -1)
    return [layer] if isinstance(layer, int) else list(layer)


def _square_grids(side: Callable):
    """Grids of a fixed-resolution model: every image (or tile) a square of `side(config)` tokens per side."""
    return lambda config, vision_inputs, count: [(side(config), side(config))] * count


def _qwen2_vl_grids(config, vision_inputs, count):
    # image_grid_thw (t, h, w) counts vision patches; the merger joins merge^2 of them into one token, in raster order
    merge = config.vision_config.spatial_merge_size
    return [(t * (h // merge), w // merge) for t, h, w in vision_inputs["image_grid_thw"].tolist()]


def _mistral3_grids(config, vision_inputs, count):
    # image_sizes (h, w) in pixels; Pixtral patches merged by spatial_merge_size, as Mistral3Model.get_image_features
    ratio = config.vision_config.patch_size * config.spatial_merge_size
    return [(h // ratio, w // ratio) for h, w in torch.as_tensor(vision_inputs["image_sizes"]).tolist()]


# Blank images (`blank_image`): one image of the smallest input the model's vision path takes, every value BLANK
# (not 0: Idefics3 and SmolVLM drop all-zero tiles as padding).
BLANK = 0.5


def _channels(vision_config) -> int:
    return getattr(vision_config, "num_channels", None) or getattr(vision_config, "in_channels", 3)


def _blank_fixed(config) -> dict:
    # one image at the tower's resolution: pixel_values (1, C, H, W)
    vision = config.vision_config
    size = vision.image_size
    height, width = (size, size) if isinstance(size, int) else size
    return {"pixel_values": torch.full((1, _channels(vision), height, width), BLANK)}


def _blank_anyres(config) -> dict:
    # LLaVA-NeXT / OneVision: an image of one tile's size, as its tiles (the base tile and its anyres grid)
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    size = side_of(config.vision_config.image_size)
    tiles = image_size_to_num_patches((size, size), config.image_grid_pinpoints, size)
    return {
        "pixel_values": torch.full((1, tiles, _channels(config.vision_config), size, size), BLANK),
        "image_sizes": torch.tensor([[size, size]]),
    }


def _blank_qwen2_vl(config) -> dict:
    # one merged token: a (1, merge, merge) grid of flattened patches (C * temporal patch * patch * patch values)
    vision = config.vision_config
    merge = vision.spatial_merge_size
    values = _channels(vision) * vision.temporal_patch_size * vision.patch_size**2
    return {"pixel_values": torch.full((merge * merge, values), BLANK), "image_grid_thw": torch.tensor([[1, merge, merge]])}


def _blank_tiles(config) -> dict:
    # Idefics3 / SmolVLM: pixel_values (samples, tiles, C, H, W), one sample of one tile
    return {"pixel_values": _blank_fixed(config)["pixel_values"][None]}


def _blank_pixtral(config) -> dict:
    # Mistral3: two merged tokens, one row of two (with one token, Mistral3Model.get_image_features squeezes the
    # token dimension away and fails)
    side = config.vision_config.patch_size * config.spatial_merge_size
    pixels = torch.full((1, _channels(config.vision_config), side, 2 * side), BLANK)
    return {"pixel_values": pixels, "image_sizes": torch.tensor([[side, 2 * side]])}


def _llava_projector(config, vision: int, hidden: int) -> list[tuple[int, int]]:
    # linear_1 over the concatenated feature layers, then linear_2
    return [(vision * len(feature_layers(config)), hidden), (hidden, hidden)]


@dataclass(frozen=True)
class Architecture:
    """What STS knows of one `model_type`: where its parts are, how it takes its images, and its shapes.

    Parts (module paths from the model):
    - `language_model`: the decoder stack whose parameters decide the stage (with the model's output embeddings);
    - `layers`: its list of decoder layers (LDS skips entries of it; the list itself is never shortened, so per-layer
      facts indexed by position, such as Gemma3's and Qwen2-VL's `layer_types[i]`, stay right);
    - `projector`: the module that maps vision features into the language model (VTC works on its output);
    - `image_token`: the config attribute holding the id of the image placeholder token.

    How the model takes images (VTC):
    - `image_inputs`: the batch keys that the vision path consumes; VTC hands them to the model's `get_image_features`
      and removes them from what the language model gets (they describe the full image, not the kept tokens);
    - `features`: what the model's forward expects in `mm_encoder_outputs["image"].pooler_output`: 'list' of
      per-image (n_i, D) tensors, or one 'tensor' (PaliGemma, Gemma3 and InternVL index `.shape` and call `.to()`);
    - `route`: how the kept features reach the model. 'mm_encoder_outputs': the model's own argument for
      precomputed image features (every transformers VLM listed here has it). 'inputs_embeds': VTC embeds the
      shortened input ids itself, writes the kept features over the image placeholders and passes `inputs_embeds`;
    - `newline`: path of a learned embedding the model appends to the image features (LLaVA-NeXT's `image_newline`
      after every row of the anyres grid, and after a single-tile image). Its rows are always kept: they tell the
      language model where a row of the grid ends, and they are a few percent of the tokens;
    - `tile_tokens`: path of the number of tokens per tile, when `get_image_features` returns one tensor per *sample*
      holding all its tiles (Idefics3, SmolVLM): VTC splits it into tiles and compresses each tile as an image;
    - `rope_index`: path of the model's M-RoPE position function (Qwen2-VL, Qwen2.5-VL). Positions are then computed
      by it on the FULL sequence, and the kept tokens keep theirs ('original' semantics, whatever
      `vtc_position_ids` says): M-RoPE gives an image token its (t, h, w) place on the image grid;
    - `first_position`: the position id of a sequence's first token (PaliGemma counts from 1);
    - `token_grids(config, vision_inputs, count)`: the (rows, cols) grid of language-model tokens of each of the
      batch's `count` images (or tiles), for the `uniform` strategy; None: no single grid (LLaVA-NeXT's base tile
      plus an unpadded grid of tiles), tokens are spaced in raster order.

    Shapes (`flops.py`):
    - `tokens_per_tile(config, patches)`: the language-model tokens of one image (or tile) of `patches` patches;
      None: the patches, plus the class token under `vision_feature_select_strategy='full'` (a dynamic-resolution
      tower: the patches over the merge);
    - `projector_matmuls(config, vision_width, text_width)`: (in, out) widths of the projector's matmuls, in order,
      per visual token.

    Distributed (`distributed.BlankImage`):
    - `blank_image(config)`: the vision inputs of one blank image, which a batch without images runs through the
      vision tower and projector under ZeRO-3 or FSDP (every rank then gathers the same parameters); None: unknown.
    """

    language_model: str
    layers: str
    projector: str | None = None
    image_token: str | None = None
    image_inputs: tuple[str, ...] = ("pixel_values",)
    features: str = "list"
    route: str = "mm_encoder_outputs"
    newline: str | None = None
    tile_tokens: str | None = None
    rope_index: str | None = None
    first_position: int = 0
    token_grids: Callable | None = None
    tokens_per_tile: Callable | None = None
    projector_matmuls: Callable = _llava_projector
    blank_image: Callable | None = _blank_fixed


@dataclass(frozen=True)
class VisionTower:
    """The shape of a ViT vision tower, by `vision_config.model_type`, for `flops.py`: widths by attribute name of
    the vision config, and the values per patch and the patches merged per language-model token as functions."""

    cls: bool = False  # a class token
    gated: bool = False  # a gated MLP (gate, up, down)
    dynamic: bool = False  # each image at its own size: the patches follow the image
    joint: bool = False  # attention over all images of a batch as one sequence (block-diagonal mask): Pixtral
    windowed: bool = False  # window attention but in `fullatt_block_indexes`: Qwen2.5-VL
    hidden: str = "hidden_size"
    heads: str = "num_attention_heads"
    layers: str = "num_hidden_layers"
    mlp: Callable = lambda vision: vision.intermediate_size
    values: Callable = lambda vision: vision.num_channels * side_of(vision.patch_size) ** 2
    merge: Callable = lambda config: 1


# Qwen2-VL / 2.5-VL: a patch spans 2 frames (an image is repeated in time); the merger joins m x m patches.
_QWEN_VALUES = lambda vision: vision.in_channels * vision.temporal_patch_size * vision.patch_size**2  # noqa: E731
_QWEN_MERGE = lambda config: config.vision_config.spatial_merge_size**2  # noqa: E731

VISION_TOWERS: dict[str, VisionTower] = {
    "clip_vision_model": VisionTower(cls=True),
    "siglip_vision_model": VisionTower(),
    "idefics3_vision": VisionTower(),
    "smolvlm_vision": VisionTower(),
    "internvl_vision": VisionTower(cls=True),
    "pixtral": VisionTower(gated=True, dynamic=True, joint=True, merge=lambda config: config.spatial_merge_size**2),
    "qwen2_vl_vision": VisionTower(
        dynamic=True, hidden="embed_dim", heads="num_heads", layers="depth",
        mlp=lambda vision: vision.embed_dim * vision.mlp_ratio, values=_QWEN_VALUES, merge=_QWEN_MERGE,
    ),
    "qwen2_5_vl_vision": VisionTower(
        gated=True, dynamic=True, windowed=True, heads="num_heads", layers="depth", values=_QWEN_VALUES,
        merge=_QWEN_MERGE,
    ),
}

_LLAVA = Architecture(
    language_model="model.language_model",
    layers="model.language_model.layers",
    projector="model.multi_modal_projector",
    image_token="image_token_id",
    image_inputs=("pixel_values", "image_sizes", "vision_feature_layer", "vision_feature_select_strategy"),
    token_grids=_square_grids(_patches_per_side),
)
_LLAVA_NEXT = replace(_LLAVA, newline="model.image_newline", token_grids=None, blank_image=_blank_anyres)
_QWEN2_VL = replace(
    _LLAVA,
    projector="model.visual.merger",
    image_inputs=("pixel_values", "image_grid_thw"),  # pixel_values: flattened patches of every image
    rope_index="model.get_rope_index",
    token_grids=_qwen2_vl_grids,
    blank_image=_blank_qwen2_vl,
    projector_matmuls=lambda config, vision, hidden: [
        (vision * config.vision_config.spatial_merge_size**2,) * 2,
        (vision * config.vision_config.spatial_merge_size**2, hidden),
    ],
)
_IDEFICS3 = replace(
    _LLAVA,
    language_model="model.text_model",
    layers="model.text_model.layers",
    projector="model.connector",
    image_inputs=("pixel_values", "pixel_attention_mask"),
    tile_tokens="model.image_seq_len",
    blank_image=_blank_tiles,
    token_grids=_square_grids(lambda config: _patches_per_side(config) // config.scale_factor),  # pixel shuffle
    tokens_per_tile=lambda config, patches: patches // config.scale_factor**2,
    projector_matmuls=lambda config, vision, hidden: [(vision * config.scale_factor**2, hidden)],
)
_CAUSAL_LM = Architecture(language_model="model", layers="model.layers", blank_image=None)

ARCHITECTURES: dict[str, Architecture] = {
    # vision-language models
    "llava": _LLAVA,
    "llava_next": _LLAVA_NEXT,  # anyres tiles: a variable number of tokens per image, newline tokens kept
    "llava_next_video": _LLAVA_NEXT,  # images only: batches with videos are refused by VTC
    "llava_onevision": replace(
        _LLAVA_NEXT, image_inputs=_LLAVA.image_inputs + ("vision_aspect_ratio", "batch_num_images")
    ),
    "qwen2_vl": _QWEN2_VL,
    "qwen2_5_vl": _QWEN2_VL,
    "idefics3": _IDEFICS3,
    "smolvlm": _IDEFICS3,
    "paligemma": replace(
        _LLAVA, image_inputs=("pixel_values",), features="tensor", first_position=1,
        projector_matmuls=lambda config, vision, hidden: [(vision, config.projection_dim)],
    ),
    "gemma3": replace(
        _LLAVA, image_inputs=("pixel_values",), features="tensor",
        token_grids=_square_grids(lambda config: math.isqrt(config.mm_tokens_per_image)),  # pooled
        tokens_per_tile=lambda config, patches: config.mm_tokens_per_image,
        projector_matmuls=lambda config, vision, hidden: [(vision, hidden)],  # after average pooling
    ),
    "mistral3": replace(
        _LLAVA, image_inputs=("pixel_values", "image_sizes", "vision_feature_layer"), token_grids=_mistral3_grids,
        blank_image=_blank_pixtral,
        # patch merger (h_v m^2 -> h_v), then linear_1 and linear_2
        projector_matmuls=lambda config, vision, hidden: [
            (vision * config.spatial_merge_size**2, vision), (vision, hidden), (hidden, hidden)
        ],
    ),
    "internvl": replace(
        _LLAVA, image_inputs=("pixel_values", "vision_feature_layer", "vision_feature_select_strategy"),
        features="tensor",
        token_grids=_square_grids(lambda config: math.isqrt(config.image_seq_length)),  # after the pixel shuffle
        tokens_per_tile=lambda config, patches: int(patches * config.downsample_ratio**2),
        projector_matmuls=lambda config, vision, hidden: [(int(vision / config.downsample_ratio**2), hidden),
                                                          (hidden, hidden)],
    ),
    # text-only causal LMs (LDS only)
    "llama": _CAUSAL_LM,
    "mistral": _CAUSAL_LM,
    "qwen2": _CAUSAL_LM,
    "qwen3": _CAUSAL_LM,
    "gemma": _CAUSAL_LM,
    "gemma2": _CAUSAL_LM,
    "gemma3_text": _CAUSAL_LM,
}

# The facts of a model named by the user (see the module docstring for the contract); `find_parts` fills the paths.
CUSTOM_VLM = Architecture(language_model="", layers="", route="inputs_embeds", blank_image=None)

OVERRIDE_OPTIONS = (
    "sts_decoder_layers (module path of the decoder-layer list, e.g. 'model.layers'; enough for LDS), "
    "sts_projector (module path of the projector) and sts_image_token_id (id of the image placeholder token), "
    "both needed for VTC"
)


class UnknownArchitectureError(ValueError):
    """`find_parts` met a model whose `model_type` is not in `ARCHITECTURES` and whose parts the user did not name."""


@dataclass
class ModelParts:
    """The parts of one model that STS touches, and the facts of its architecture."""

    model: nn.Module  # the transformers model itself (a PEFT wrapper removed)
    model_type: str | None
    language_model: nn.Module
    layers: nn.ModuleList
    projector: nn.Module | None
    image_token_id: int | None
    facts: Architecture = CUSTOM_VLM

    @property
    def is_multimodal(self) -> bool:
        return self.projector is not None

    def language_model_parameters(self):
        """Parameters of the language model: its decoder stack and its output embeddings (the LM head)."""
        yield from self.language_model.parameters()
        # a custom model written as a plain nn.Module may have no get_output_embeddings
        get_output_embeddings = getattr(self.model, "get_output_embeddings", None)
        head = get_output_embeddings() if get_output_embeddings is not None else None
        if head is not None:
            yield from head.parameters()


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (the model itself otherwise)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def get_path(root, path: str, source: str = "the module path"):
    """`root.a.b.c` for path 'a.b.c' (digits index a ModuleList); a ValueError naming `source` if a step is missing."""
    value = root
    for depth, name in enumerate(path.split(".")):
        if not hasattr(value, name):
            where = ".".join(path.split(".")[:depth]) or "the model"
            raise ValueError(
                f"{source} {path!r} does not resolve in {type(root).__name__}: {where} "
                f"({type(value).__name__}) has no attribute {name!r}."
            )
        value = getattr(value, name)
    return value


def vtc_facts(model: nn.Module) -> Architecture:
    """The facts of `model`: its architecture's entry, or `CUSTOM_VLM` for a model_type not listed."""
    model_type = getattr(getattr(unwrap(model), "config", None), "model_type", None)
    return ARCHITECTURES.get(model_type, CUSTOM_VLM)


def find_parts(
    model: nn.Module,
    projector: str | None = None,
    layers: str | None = None,
    image_token_id: int | None = None,
) -> ModelParts:
    """Locate language model, decoder layers, projector and image token id of `model`, or explain what is missing.

    `projector` and `layers` (module paths) and `image_token_id` override the architecture's facts; for a model type
    not in `ARCHITECTURES` they are required (`layers` at least). They are `STSTrainingArguments.sts_projector`,
    `sts_decoder_layers` and `sts_image_token_id`.
    """
    base = unwrap(model)
    config = getattr(base, "config", None)
    model_type = getattr(config, "model_type", None)
    facts = ARCHITECTURES.get(model_type)
    if facts is None:
        if layers is None:
            raise UnknownArchitectureError(
                f"sts_trainer does not know the architecture {model_type!r} ({type(base).__name__}). "
                f"Supported model types: {', '.join(sorted(ARCHITECTURES))}. For another model, name its parts "
                f"with the STSTrainingArguments options {OVERRIDE_OPTIONS}; the contract a custom model must meet "
                "is in sts_trainer/architectures.py."
            )
        # The decoder stack is the module holding the layer list (the list itself when it sits on the model's root).
        parent = layers.rpartition(".")[0]
        facts = replace(CUSTOM_VLM, language_model=parent or layers, layers=layers, projector=projector)
        source = {"layers": "sts_decoder_layers", "projector": "sts_projector"}
    else:
        source = {"layers": f"The {model_type!r} decoder-layer path", "projector": f"The {model_type!r} projector path"}
        facts = replace(facts, layers=layers or facts.layers, projector=projector or facts.projector)
        if layers:
            source["layers"] = "sts_decoder_layers"
        if projector:
            source["projector"] = "sts_projector"

    layer_list = get_path(base, facts.layers, source["layers"])
    if not isinstance(layer_list, nn.ModuleList):
        raise ValueError(
            f"{source['layers']} {facts.layers!r} names a {type(layer_list).__name__}; LDS needs the nn.ModuleList "
            "of decoder layers."
        )
    projector_module = get_path(base, facts.projector, source["projector"]) if facts.projector else None
    if image_token_id is None and facts.image_token is not None:
        image_token_id = getattr(config, facts.image_token)
    if projector_module is not None and image_token_id is None:
        raise ValueError(
            f"sts_projector is set for {type(base).__name__} but the image placeholder token is unknown: "
            "pass sts_image_token_id (VTC finds the visual tokens of the sequence by it)."
        )
    return ModelParts(
        model=base,
        model_type=model_type,
        language_model=get_path(base, facts.language_model, source["layers"]),
        layers=layer_list,
        projector=projector_module,
        image_token_id=image_token_id,
        facts=facts,
    )
