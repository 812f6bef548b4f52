"""Where STS finds the parts it works on, and how each model takes its images, per `config.model_type`: plain data.

Each entry of `ARCHITECTURES` describes the `*ForConditionalGeneration` / `*ForCausalLM` model of transformers; module
paths are attribute paths from that model.

Parts (both components):
- `language_model`: the decoder stack whose parameters decide the stage (with the model's output embeddings);
- `layers`: its list of decoder layers (LDS skips entries of it; the list itself is never shortened, so per-layer
  facts indexed by position, such as Gemma3's and Qwen2-VL's `layer_types[i]`, stay right);
- `projector`: the module that maps vision features into the language model (VTC works on its output);
- `image_token`: the config attribute holding the id of the image placeholder token.

How the model takes images (VTC only):
- `image_inputs`: the batch keys that the vision path consumes; VTC hands them to the model's `get_image_features`
  and removes them from what the language model gets (they describe the full image, not the kept tokens);
- `features`: what the model's forward expects in `mm_encoder_outputs["image"].pooler_output`: 'list' of per-image
  (n_i, D) tensors, or one 'tensor' (PaliGemma, Gemma3 and InternVL index `.shape` and call `.to()` on it);
- `route`: how the kept features reach the model. 'mm_encoder_outputs': the model's own argument for precomputed
  image features (every transformers VLM listed here has it). 'inputs_embeds': VTC embeds the shortened input ids
  itself, writes the kept features over the image placeholders and passes `inputs_embeds` (the custom-model route);
- `newline`: path of a learned embedding that the model appends to the image features (LLaVA-NeXT's `image_newline`
  after every row of the anyres grid, and after a single-tile image). Its rows are always kept: they tell the
  language model where a row of the grid ends, and they are a few percent of the tokens. `vtc_keep_ratio` applies to
  the other tokens of the image (the base image and the high-resolution tiles, in the model's own order);
- `tile_tokens`: path of the number of tokens per tile, when `get_image_features` returns one tensor per *sample*
  holding all its tiles (Idefics3, SmolVLM): VTC splits it into tiles and compresses each tile as an image;
- `rope_index`: path of the model's M-RoPE position function (Qwen2-VL, Qwen2.5-VL). Positions are then computed by
  it on the FULL sequence, and the kept tokens keep theirs ('original' semantics, whatever `vtc_position_ids` says):
  M-RoPE gives an image token its (t, h, w) place on the image grid, which only the full sequence defines;
- `first_position`: the position id of a sequence's first token (PaliGemma counts from 1), used by
  `vtc_position_ids='original'` when the batch brings no position ids.

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

from dataclasses import dataclass, field

from torch import nn

_VTC_DEFAULTS = {
    "image_inputs": ("pixel_values",),
    "features": "list",
    "route": "mm_encoder_outputs",
    "newline": None,
    "tile_tokens": None,
    "rope_index": None,
    "first_position": 0,
}
_LLAVA = {
    **_VTC_DEFAULTS,
    "language_model": "model.language_model",
    "layers": "model.language_model.layers",
    "projector": "model.multi_modal_projector",
    "image_token": "image_token_id",
    "image_inputs": ("pixel_values", "image_sizes", "vision_feature_layer", "vision_feature_select_strategy"),
}
_LLAVA_NEXT = {**_LLAVA, "newline": "model.image_newline"}
_QWEN2_VL = {
    **_LLAVA,
    "projector": "model.visual.merger",
    "image_inputs": ("pixel_values", "image_grid_thw"),  # pixel_values: flattened patches of every image
    "rope_index": "model.get_rope_index",
}
_IDEFICS3 = {
    **_LLAVA,
    "language_model": "model.text_model",
    "layers": "model.text_model.layers",
    "projector": "model.connector",
    "image_inputs": ("pixel_values", "pixel_attention_mask"),
    "tile_tokens": "model.image_seq_len",
}
_CAUSAL_LM = {
    **_VTC_DEFAULTS,
    "language_model": "model",
    "layers": "model.layers",
    "projector": None,
    "image_token": None,
}

ARCHITECTURES: dict[str, dict] = {
    # vision-language models
    "llava": _LLAVA,
    "llava_next": _LLAVA_NEXT,  # anyres tiles: a variable number of tokens per image, newline tokens kept
    "llava_next_video": _LLAVA_NEXT,  # images only: batches with videos are refused by VTC
    "llava_onevision": {
        **_LLAVA_NEXT,
        "image_inputs": _LLAVA["image_inputs"] + ("vision_aspect_ratio", "batch_num_images"),
    },
    "qwen2_vl": _QWEN2_VL,
    "qwen2_5_vl": _QWEN2_VL,
    "idefics3": _IDEFICS3,
    "smolvlm": _IDEFICS3,
    "paligemma": {**_LLAVA, "image_inputs": ("pixel_values",), "features": "tensor", "first_position": 1},
    "gemma3": {**_LLAVA, "image_inputs": ("pixel_values",), "features": "tensor"},
    "mistral3": {**_LLAVA, "image_inputs": ("pixel_values", "image_sizes", "vision_feature_layer")},
    "internvl": {
        **_LLAVA,
        "image_inputs": ("pixel_values", "vision_feature_layer", "vision_feature_select_strategy"),
        "features": "tensor",
    },
    # text-only causal LMs (LDS only)
    "llama": _CAUSAL_LM,
    "mistral": _CAUSAL_LM,
    "qwen2": _CAUSAL_LM,
    "qwen3": _CAUSAL_LM,
    "gemma": _CAUSAL_LM,
    "gemma2": _CAUSAL_LM,
    "gemma3_text": _CAUSAL_LM,
}

# The VTC facts of a model named by the user (see the module docstring for the contract).
CUSTOM_VLM = {**_VTC_DEFAULTS, "route": "inputs_embeds"}

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
    facts: dict = field(default_factory=lambda: dict(CUSTOM_VLM))

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


def vtc_facts(model: nn.Module) -> dict:
    """The VTC facts of `model`: its architecture's entry, or `CUSTOM_VLM` for a model_type not listed."""
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
        facts = {**CUSTOM_VLM, "language_model": parent or layers, "layers": layers, "projector": projector,
                 "image_token": None}
        source = {"layers": "sts_decoder_layers", "projector": "sts_projector"}
    else:
        source = {"layers": f"The {model_type!r} decoder-layer path", "projector": f"The {model_type!r} projector path"}
        facts = {**facts, "layers": layers or facts["layers"], "projector": projector or facts["projector"]}
        if layers:
            source["layers"] = "sts_decoder_layers"
        if projector:
            source["projector"] = "sts_projector"

    layer_list = get_path(base, facts["layers"], source["layers"])
    if not isinstance(layer_list, nn.ModuleList):
        raise ValueError(
            f"{source['layers']} {facts['layers']!r} names a {type(layer_list).__name__}; LDS needs the nn.ModuleList "
            "of decoder layers."
        )
    projector_module = get_path(base, facts["projector"], source["projector"]) if facts["projector"] else None
    if image_token_id is None and facts["image_token"] is not None:
        image_token_id = getattr(config, facts["image_token"])
    if projector_module is not None and image_token_id is None:
        raise ValueError(
            f"sts_projector is set for {type(base).__name__} but the image placeholder token is unknown: "
            "pass sts_image_token_id (VTC finds the visual tokens of the sequence by it)."
        )
    return ModelParts(
        model=base,
        model_type=model_type,
        language_model=get_path(base, facts["language_model"], source["layers"]),
        layers=layer_list,
        projector=projector_module,
        image_token_id=image_token_id,
        facts=facts,
    )
