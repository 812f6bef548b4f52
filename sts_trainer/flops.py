"""Analytic FLOPs of one training step of a vision-language model, dense and with STS sparsity.

The model is vision tower -> projector -> decoder LLM -> LM head (a text-only causal LM is the same without the first
two). The shapes of the vision towers and projectors are facts of `architectures.py` (`VISION_TOWERS`, and each
entry's `tokens_per_tile` and `projector_matmuls`); the decoders are all llama-like (gated MLP, grouped-query
attention).
Counting rules, chosen so the numbers match `torch.utils.flop_counter.FlopCounterMode`:

- A matmul (m x k) @ (k x n) costs 2 * m * k * n FLOPs. Only matmuls are counted (the patch-embedding convolution is
  a matmul over patches): norms, activations, softmax, rotary embeddings, residual adds and the loss are a few
  percent of a step at most and are ignored.
- Attention scores Q K^T and the weighted sum A V are counted over the full S x S square although the decoder is
  causal: dense kernels (eager, SDPA math, cuBLAS) compute the full square, and flash kernels are credited with it
  by the FLOP counters users compare against. MFU figures in the literature use the same convention.
- Backward of a matmul with a weight: the gradient with respect to its input (the "activation gradient") costs 1x its
  forward and is paid when anything trainable lies before it; the gradient with respect to its weight costs 1x its
  forward and is paid when that weight trains. An attention-score matmul has no weight but two activation operands,
  so its backward costs 2x its forward whenever gradients flow through it.
- The parts are chained, so gradients flow through a part when it or any part before it trains. In alignment (only the
  projector trains) the frozen LLM and LM head pay activation gradients but no weight gradients, and the frozen vision
  tower before everything trainable pays no backward at all. The first matmul of a part sees the part's input, which
  needs a gradient only when something before the part trains (the vision tower's first matmul sees pixels: never).
  The LLM's input needs one when the LLM trains (its token embeddings train with it) or anything before it trains.
- LoRA: frozen base weights pay no weight gradient. The adapters (A: in -> r, B: r -> out) beside them cost 2 T (in r
  + r out) forward per token, and as much again for each of their weight and input gradients.
- The vision tower runs all its layers, but LLaVA reads the hidden state of `vision_feature_layer` (-2 for LLaVA-1.5):
  layers above it get no gradient, so they cost forward FLOPs only.

STS enters in two places: VTC shortens the LLM sequence (`kept_visual_tokens_per_image`; the vision tower and the
projector still see every token), and LDS runs fewer decoder layers (`executed_layers`; a skipped layer costs
nothing, forward or backward). Per-layer cost is the same for every layer, so an expected number of executed layers
gives the expected FLOPs exactly.
"""

from dataclasses import dataclass

from transformers import PretrainedConfig

from .architectures import ARCHITECTURES, CUSTOM_VLM, VISION_TOWERS, feature_layers, side_of
from .layer_skip import skip_probability

PARTS = ("vision", "projector", "llm_layers", "lm_head")


class UncountableModelError(ValueError):
    """The model has a part whose shape `flops.py` does not know (a vision tower not in `VISION_TOWERS`)."""


@dataclass(frozen=True)
class TrainingStep:
    """The shape of one training step (one micro-batch) and which parts of the model train.

    Every sample has `text_tokens_per_sample` text tokens (padding included: padded tokens are computed like any
    other) and `images_per_sample` images, each giving `visual_tokens_per_image` tokens to the LLM without compression,
    so the dense LLM sequence has S = text_tokens_per_sample + images_per_sample * visual_tokens_per_image tokens.
    """

    batch_size: int
    text_tokens_per_sample: int
    images_per_sample: int = 0
    visual_tokens_per_image: int = 0
    train_vision: bool = False
    train_projector: bool = False
    train_llm: bool = False  # decoder layers, token embeddings and LM head
    # trainable adapter weights (LoRA A and B) per decoder layer, beside frozen base weights (train_llm False)
    llm_adapter_weights_per_layer: float = 0.0

    def __post_init__(self):
        if self.batch_size < 1 or self.text_tokens_per_sample < 0 or self.images_per_sample < 0:
            raise ValueError(f"A step needs batch_size >= 1 and non-negative token and image counts, got {self}.")
        if self.images_per_sample and self.visual_tokens_per_image < 1:
            raise ValueError(f"Images need visual_tokens_per_image >= 1, got {self.visual_tokens_per_image}.")


@dataclass(frozen=True)
class _PartCost:
    """Forward FLOPs of one part, split by how their backward is paid."""

    weight: float  # matmuls with a weight: x @ W
    score: float = 0.0  # attention-score matmuls (Q K^T, A V): no weight, two activation operands
    entry: float = 0.0  # the share of `weight` whose input is the part's input
    forward_only: float = 0.0  # matmuls whose output does not reach the loss (vision layers above the feature layer)

    def total(self, trains: bool, upstream_trains: bool) -> float:
        """forward + backward: weight grads if `trains`; activation grads where something before them trains."""
        flows = trains or upstream_trains
        weight_grads = self.weight if trains else 0.0
        input_grads = (self.weight - self.entry) * flows + self.entry * upstream_trains
        score_grads = 2.0 * self.score * flows
        return self.weight + self.score + self.forward_only + weight_grads + input_grads + score_grads


def _matmul(m: float, k: float, n: float) -> float:
    return 2.0 * m * k * n


def _attention(tokens: int, hidden: int, heads: int, kv_heads: int, head_dim: int) -> tuple[float, float]:
    """Forward FLOPs of one self-attention over one sequence: (projections, scores).

    q, o: 2 S h (H d) each; k, v: 2 S h (H_kv d) each (grouped-query attention shares K/V heads);
    scores: Q K^T and A V, 2 H S^2 d each, over the full S x S square.
    """
    projections = 2 * _matmul(tokens, hidden, heads * head_dim) + 2 * _matmul(tokens, hidden, kv_heads * head_dim)
    scores = 2 * _matmul(tokens, head_dim, tokens) * heads
    return projections, scores


# A dynamic-resolution model's image, for per-image counts (`visual_tokens_per_image`): 448 x 448 pixels.
REFERENCE_IMAGE_SIZE = 448


def _vision_config(config: PretrainedConfig) -> PretrainedConfig | None:
    vision = getattr(config, "vision_config", None)  # None: a text-only LLM
    if vision is not None and vision.model_type not in VISION_TOWERS:
        raise UncountableModelError(
            f"sts_trainer.flops does not know the vision tower {vision.model_type!r} of {config.model_type!r}; "
            f"it knows {', '.join(sorted(VISION_TOWERS))}. Add its shape to `architectures.VISION_TOWERS`."
        )
    return vision


def _tower(config: PretrainedConfig) -> dict:
    """Shape of the vision tower (`architectures.VISION_TOWERS`): width, heads, MLP width, layers, patch side, values
    per patch, patches merged per LLM token, and its kind (class token, gated MLP, dynamic, joint, windowed)."""
    vision = config.vision_config
    tower = VISION_TOWERS[vision.model_type]
    return dict(
        cls=tower.cls, gated=tower.gated, dynamic=tower.dynamic, joint=tower.joint, windowed=tower.windowed,
        hidden=getattr(vision, tower.hidden), heads=getattr(vision, tower.heads), layers=getattr(vision, tower.layers),
        mlp=tower.mlp(vision), patch=side_of(vision.patch_size), values=tower.values(vision), merge=tower.merge(config),
    )


def dynamic_resolution(config: PretrainedConfig) -> bool:
    """Whether the model's vision tower takes each image at its own size (Qwen2-VL, Qwen2.5-VL, Pixtral)."""
    return _vision_config(config) is not None and _tower(config)["dynamic"]


def _patches_per_tile(config: PretrainedConfig) -> int:
    """Patches of one image (one tile) at the config's resolution; the reference image for a dynamic one."""
    vision, tower = config.vision_config, _tower(config)
    size = REFERENCE_IMAGE_SIZE if tower["dynamic"] else side_of(vision.image_size)
    return (size // tower["patch"]) ** 2


def visual_tokens_per_image(config: PretrainedConfig) -> int:
    """Tokens one image (one tile) gives the LLM, from the config: P = (image_size / patch_size)^2 patches, and
    - LLaVA family: P, plus the CLS token when `vision_feature_select_strategy` is 'full' (LLaVA-1.5: (336/14)^2 = 576;
      a LLaVA-NeXT image is several such tiles plus newline tokens);
    - PaliGemma: P; Gemma3: `mm_tokens_per_image` (pooled); Idefics3 / SmolVLM: P / scale_factor^2 per tile;
      InternVL: P * downsample_ratio^2 per tile;
    - dynamic resolution (Qwen2-VL, Qwen2.5-VL, Mistral3): P / spatial_merge_size^2 for a 448 x 448 reference image.
    """
    vision = _vision_config(config)
    if vision is None:
        return 0
    patches, tower = _patches_per_tile(config), _tower(config)
    architecture = ARCHITECTURES.get(config.model_type)
    if architecture is not None and architecture.tokens_per_tile is not None:
        return architecture.tokens_per_tile(config, patches)
    if tower["dynamic"]:
        return patches // tower["merge"]
    return patches + (tower["cls"] and getattr(config, "vision_feature_select_strategy", None) == "full")


def _vision_cost(config: PretrainedConfig, images: int, tokens_per_image: int) -> _PartCost:
    """A ViT over `images` images, each of `tokens_per_image` LLM tokens, N layers of width h, MLP width I:

        patch embedding (a convolution = matmul over P patches of v values): 2 P v h
        per layer, over S_v = P (+ 1 class token) tokens: attention (4 projections h x h, scores 4 S_v^2 h) and MLP:
        2 * 2 S_v h I (3 * 2 S_v h I when gated)

    P is fixed by the config, times the tiles an image has (LLaVA-NeXT anyres: round(tokens / tokens per tile)), or
    for a dynamic-resolution tower follows the image: P = tokens * (patches merged per token). Layers above the deepest
    `vision_feature_layer` are forward only. Qwen2.5-VL's windowed layers attend within windows of
    (window_size / patch_size)^2 patches; Pixtral's scores span all images of the batch (`VisionTower.joint`).
    """
    tower = _tower(config)
    hidden, heads = tower["hidden"], tower["heads"]
    if tower["dynamic"]:
        patches = tokens_per_image * tower["merge"]
    else:
        patches = _patches_per_tile(config)
        images *= max(1, round(tokens_per_image / visual_tokens_per_image(config)))  # tiles run as separate images
    tokens = patches + tower["cls"]
    projections, scores = _attention(tokens, hidden, heads, heads, hidden // heads)
    layer_weight = (projections + (2 + tower["gated"]) * _matmul(tokens, hidden, tower["mlp"])) * images
    if tower["joint"]:
        scores *= images  # one block-diagonal sequence of all images: (images * S_v)^2
    num_layers = tower["layers"]
    full_layers = num_layers
    window_scores = scores
    if tower["windowed"]:
        full_layers = len(config.vision_config.fullatt_block_indexes)
        window = min(tokens, (config.vision_config.window_size // tower["patch"]) ** 2)
        window_scores = scores * window / tokens
    patch_embedding = _matmul(patches, tower["values"], hidden) * images
    # hidden_states[0] is the embedding output, hidden_states[i] the output of layer i: layers 1..i reach the loss.
    used = max(layer % (num_layers + 1) for layer in feature_layers(config))
    score = (full_layers * scores + (num_layers - full_layers) * window_scores) * images
    used_score = score * used / num_layers  # windowed and full layers are interleaved: spread evenly
    return _PartCost(
        weight=patch_embedding + used * layer_weight,
        score=used_score,
        entry=patch_embedding,
        forward_only=(num_layers - used) * layer_weight + (score - used_score),
    )


def _projector_matmuls(config: PretrainedConfig) -> list[tuple[int, int]]:
    """(in, out) widths of the projector's matmuls, in order, per visual token of the LLM: the architecture's
    `projector_matmuls` (`architectures.ARCHITECTURES`; LLaVA's linear_1 and linear_2 by default), e.g.

        LLaVA family: linear_1 (h_v n_f -> h), linear_2 (h -> h)      PaliGemma: (h_v -> projection_dim)
        Gemma3 (after average pooling): (h_v -> h)                    Idefics3 / SmolVLM (pixel shuffle): (h_v s^2 -> h)
        InternVL (pixel shuffle by r): (h_v / r^2 -> h), (h -> h)
        Mistral3: patch merger (h_v m^2 -> h_v), linear_1 (h_v -> h), linear_2 (h -> h)
        Qwen2-VL / Qwen2.5-VL merger: (h_v m^2 -> h_v m^2), (h_v m^2 -> h)

    (h_v: vision width, h: LLM width, n_f: feature layers concatenated, s / m: tokens merged per side)
    """
    architecture = ARCHITECTURES.get(config.model_type, CUSTOM_VLM)
    return architecture.projector_matmuls(config, _tower(config)["hidden"], config.get_text_config().hidden_size)


def _projector_cost(config: PretrainedConfig, tokens: int) -> _PartCost:
    """The projector's matmuls (`_projector_matmuls`) over `tokens` visual tokens: sum of 2 T in out."""
    costs = [_matmul(tokens, width_in, width_out) for width_in, width_out in _projector_matmuls(config)]
    return _PartCost(weight=sum(costs), entry=costs[0])


def _decoder_layer_cost(text: PretrainedConfig, batch_size: int, tokens: int) -> _PartCost:
    """One llama-like decoder layer (Llama, Mistral, Qwen2/3, Gemma 1/2/3: the LLMs sts_trainer supports) over
    `batch_size` sequences of S = `tokens` tokens, width h, H heads of size d, H_kv key/value heads, MLP width I:

        attention: 2 S h (H d) for q and o, 2 S h (H_kv d) for k and v, 4 H S^2 d for the scores
        gated MLP (gate, up, down): 3 * 2 S h I
    """
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads  # Qwen2Config has no head_dim
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    projections, scores = _attention(tokens, text.hidden_size, heads, kv_heads, head_dim)
    mlp = 3 * _matmul(tokens, text.hidden_size, text.intermediate_size)
    return _PartCost(weight=(projections + mlp) * batch_size, score=scores * batch_size)


def step_flops(
    config: PretrainedConfig,
    step: TrainingStep,
    kept_visual_tokens_per_image: int | None = None,
    executed_layers: float | None = None,
) -> dict[str, float]:
    """FLOPs of one training step (forward + backward) of the model described by `config`, per part and in total.

    `config` is a LLaVA config (with `vision_config` and `text_config`) or a text-only decoder config (Llama, Qwen2,
    ...; then `step` must have no images). Dense by default; STS sparsity is given by
    - `kept_visual_tokens_per_image`: VTC, the LLM sees S' = text + images * kept tokens per sample, while the vision
      tower and the projector still process all `step.visual_tokens_per_image` tokens;
    - `executed_layers`: LDS, how many decoder layers run (an expected value may be fractional); skipped layers cost
      nothing, forward or backward.

    Returns {'vision', 'projector', 'llm_layers', 'lm_head', 'total'} in FLOPs.
    """
    text = config.get_text_config()
    num_layers = text.num_hidden_layers
    kept = step.visual_tokens_per_image if kept_visual_tokens_per_image is None else kept_visual_tokens_per_image
    layers = num_layers if executed_layers is None else executed_layers
    if step.images_per_sample and not 1 <= kept <= step.visual_tokens_per_image:
        raise ValueError(f"kept_visual_tokens_per_image={kept} must be in [1, {step.visual_tokens_per_image}].")
    if not 0 <= layers <= num_layers:
        raise ValueError(f"executed_layers={layers} must be in [0, {num_layers}].")
    images = step.batch_size * step.images_per_sample
    if images and _vision_config(config) is None:
        raise ValueError(f"{type(config).__name__} has no vision tower, but the step has {images} images.")
    llm_tokens = step.text_tokens_per_sample + step.images_per_sample * kept  # S' per sample

    flops = dict.fromkeys(PARTS, 0.0)
    if images:
        flops["vision"] = _vision_cost(config, images, step.visual_tokens_per_image).total(
            step.train_vision, upstream_trains=False
        )
        flops["projector"] = _projector_cost(config, images * step.visual_tokens_per_image).total(
            step.train_projector, upstream_trains=step.train_vision
        )
    adapters = step.llm_adapter_weights_per_layer
    # Gradients flow through the LLM when anything before it trains, or anything in it: its token embeddings train
    # with it; adapters train in every layer (the first layer's input gradient is then counted though not needed).
    flows = step.train_vision or step.train_projector or step.train_llm or adapters > 0
    layer = _decoder_layer_cost(text, step.batch_size, llm_tokens).total(step.train_llm, upstream_trains=flows)
    adapter = _PartCost(weight=2.0 * step.batch_size * llm_tokens * adapters).total(True, upstream_trains=flows)
    flops["llm_layers"] = layers * (layer + adapter)
    # logits at every position: LLaVA and causal LMs in training compute them all (logits_to_keep=0)
    lm_head = _PartCost(weight=_matmul(step.batch_size * llm_tokens, text.hidden_size, text.vocab_size))
    flops["lm_head"] = lm_head.total(step.train_llm, upstream_trains=flows)
    flops["total"] = sum(flops[part] for part in PARTS)
    return flops


def expected_executed_fraction(
    num_layers: int,
    total_steps: int,
    alpha: float,
    epsilon: float,
    schedule: str = "quadratic",
) -> float:
    """Expected fraction of decoder layers LDS runs over a stage of `total_steps` optimizer steps:

        1 - 1 / (E L) * sum_{e=0}^{E-1} sum_{l=0}^{L-1} p_l(e),
        p_l(e) = clamp(alpha * decay(e / E) * (1 + eps * (2l - (L - 1)) / (L - 1)), 0, 1)

    with `skip_probability` itself, so clamping and the schedule are exactly the trainer's. Steps are the trainer's
    `global_step` values 0..E-1. Without clamping the quadratic schedule gives 1 - alpha (E + 1)(2E + 1) / (6 E^2),
    which tends to 1 - alpha / 3 for long stages (0.833 with alpha = 0.5).
    """
    skipped = sum(
        skip_probability(step, total_steps, layer, num_layers, alpha, epsilon, schedule)
        for step in range(total_steps)
        for layer in range(num_layers)
    )
    return 1.0 - skipped / (total_steps * num_layers)


def micro_batch_flops(
    config: PretrainedConfig,
    batch_size: int,
    llm_length: int,
    images: int,
    train_vision: bool,
    train_projector: bool,
    train_llm: bool,
    executed_layers: float | None = None,
    llm_adapter_weights_per_layer: float = 0.0,
    visual_tokens: int | None = None,
) -> float:
    """FLOPs of one micro-batch as the trainer ran it: `images` images through the vision tower and projector, and a
    (batch_size, llm_length) sequence, padding included, through `executed_layers` decoder layers and the LM head.

    Each image is counted at the config's size (`visual_tokens_per_image`), except for a dynamic-resolution tower
    given the batch's `visual_tokens`: then each image has its share of them."""
    flags = dict(
        train_vision=train_vision,
        train_projector=train_projector,
        train_llm=train_llm,
        llm_adapter_weights_per_layer=llm_adapter_weights_per_layer,
    )
    total = vision_flops(config, images, visual_tokens, **flags) if images else 0.0
    text = step_flops(config, TrainingStep(batch_size, llm_length, **flags), executed_layers=executed_layers)
    return total + text["llm_layers"] + text["lm_head"]


def vision_flops(config: PretrainedConfig, images: int, visual_tokens: int | None = None, **flags) -> float:
    """FLOPs of `images` images through the vision tower and projector (forward, and backward where `flags` train
    them): each at the config's size, or, for a dynamic-resolution tower given `visual_tokens`, its share of them."""
    per_image = visual_tokens_per_image(config)
    if visual_tokens is not None and dynamic_resolution(config):
        per_image = max(1, round(visual_tokens / images))
    vision = step_flops(config, TrainingStep(images, 0, 1, per_image, **flags))
    return vision["vision"] + vision["projector"]
