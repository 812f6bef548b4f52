"""Analytic FLOPs (`sts_trainer.flops`): hand-computed counts, sparse vs dense, and agreement with PyTorch's counter."""

import pytest
from peft import LoraConfig, get_peft_model
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

from sts_trainer.architectures import find_parts
from sts_trainer.flops import TrainingStep, expected_executed_fraction, step_flops, visual_tokens_per_image
from sts_trainer.lab.tiny import IMAGE_TOKEN_ID, collate, synthetic_samples, tiny_llava, tiny_llava_config
from sts_trainer.layer_skip import LayerSkipper
from sts_trainer.mixin import _trainable_parts
from sts_trainer.token_compression import TokenCompressor, num_kept


def hand_config() -> LlavaConfig:
    """Small enough to count by hand: 8x8 images in 4x4 patches (4 patches + CLS), widths 8, MLPs 16, vocab 10."""
    vision = CLIPVisionConfig(
        hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, image_size=8, patch_size=4
    )
    text = LlamaConfig(
        hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=4, vocab_size=10,
    )
    return LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-2)


# One sample: 3 text tokens + 1 image of 4 visual tokens -> LLM sequence S = 7.
# Vision tower, per image (S_v = 5, d = 4 per head):
#   patch embedding   2 * 4 patches * (3*4*4 = 48) * 8                 = 3072
#   per layer: q,k,v,o 4 * 2*5*8*8 = 2560; scores 2 heads * (QK^T 2*5*4*5 + AV 2*5*5*4) = 800;
#              MLP 2 * 2*5*8*16 = 2560                                 -> 5920
#   forward: 3072 + 2 * 5920                                             = 14912
# Projector over 4 tokens: linear_1 2*4*8*8 = 512, linear_2 2*4*8*8 = 512 -> forward 1024.
# LLM layer over S = 7 (2 heads, 1 KV head, head_dim 4):
#   q 2*7*8*8 = 896, k 2*7*8*4 = 448, v 448, o 896; MLP 3 * 2*7*8*16 = 5376 -> weight matmuls 8064
#   scores 2 heads * (2*7*4*7 + 2*7*7*4) = 1568                           -> forward 9632
# LM head: 2*7*8*10 = 1120.
VISION = 14912  # frozen and first: no backward
LAYER_FORWARD, LAYER_WEIGHTS, LAYER_SCORES = 9632, 8064, 1568


def test_hand_counts_alignment():
    flops = step_flops(hand_config(), TrainingStep(1, 3, 1, 4, train_projector=True))
    assert flops["vision"] == VISION
    # forward 1024 + weight grads 1024 + input grad of linear_2 only (linear_1 sees frozen vision features) 512
    assert flops["projector"] == 1024 + 1024 + 512
    # frozen LLM behind the trainable projector: activation grads (1x weights, 2x scores), no weight grads
    assert flops["llm_layers"] == 2 * (LAYER_FORWARD + LAYER_WEIGHTS + 2 * LAYER_SCORES) == 2 * 20832
    assert flops["lm_head"] == 1120 + 1120
    assert flops["total"] == VISION + 2560 + 41664 + 2240 == 61376


def test_hand_counts_instruction():
    flops = step_flops(hand_config(), TrainingStep(1, 3, 1, 4, train_projector=True, train_llm=True))
    assert flops["vision"] == VISION
    assert flops["projector"] == 2560
    # forward + weight grads + activation grads
    assert flops["llm_layers"] == 2 * (LAYER_FORWARD + 2 * LAYER_WEIGHTS + 2 * LAYER_SCORES) == 2 * 28896
    assert flops["lm_head"] == 3 * 1120


def test_hand_counts_vtc_and_lds():
    config = hand_config()
    # VTC keeps 2 of 4 visual tokens: S' = 5. Layer weights: q 640, k 320, v 320, o 640, MLP 3 * 2*5*8*16 = 3840
    # -> 5760; scores 2 heads * (2*5*4*5 + 2*5*5*4) = 800. Vision and projector still see all 4 tokens.
    vtc = step_flops(config, TrainingStep(1, 3, 1, 4, train_projector=True), kept_visual_tokens_per_image=2)
    assert vtc["vision"] == VISION and vtc["projector"] == 2560
    assert vtc["llm_layers"] == 2 * (2 * 5760 + 3 * 800) == 27840
    assert vtc["lm_head"] == 2 * (2 * 5 * 8 * 10) == 1600
    # LDS runs 1 of 2 layers: half the decoder-layer FLOPs, nothing else changes.
    instruction = TrainingStep(1, 3, 1, 4, train_projector=True, train_llm=True)
    lds = step_flops(config, instruction, executed_layers=1)
    assert lds["llm_layers"] == 28896
    assert lds["total"] == step_flops(config, instruction)["total"] - 28896


def test_text_only_model_and_batch_scaling():
    text = hand_config().text_config
    one = step_flops(text, TrainingStep(1, 7, train_llm=True))
    # same decoder and head as the LLaVA LLM over S = 7, with no vision tower or projector
    assert one == {"vision": 0, "projector": 0, "llm_layers": 2 * 28896, "lm_head": 3 * 1120,
                   "total": 2 * 28896 + 3 * 1120}
    assert step_flops(text, TrainingStep(4, 7, train_llm=True))["total"] == 4 * one["total"]
    with pytest.raises(ValueError, match="no vision tower"):
        step_flops(text, TrainingStep(1, 7, 1, 4, train_llm=True))


def test_nothing_trains_is_forward_only():
    config = hand_config()
    flops = step_flops(config, TrainingStep(1, 3, 1, 4))
    assert flops["total"] == VISION + 1024 + 2 * LAYER_FORWARD + 1120


def test_vision_layers_above_feature_layer_are_forward_only():
    config = hand_config()
    config.vision_feature_layer = -1  # the last layer's output reaches the loss: both layers pay backward
    step = TrainingStep(1, 3, 1, 4, train_vision=True)
    last = step_flops(config, step)["vision"]
    config.vision_feature_layer = -2
    second_last = step_flops(config, step)["vision"]
    # patch embedding: forward + weight grad (pixels need no grad); a layer: 3x weights + 3x scores
    assert last == 2 * 3072 + 2 * 3 * 5920
    assert second_last == 2 * 3072 + 3 * 5920 + 5920


def test_visual_tokens_per_image():
    config = hand_config()
    assert visual_tokens_per_image(config) == 4
    config.vision_feature_select_strategy = "full"  # keeps the CLS token
    assert visual_tokens_per_image(config) == 5
    assert visual_tokens_per_image(config.text_config) == 0


def test_sparse_is_cheaper_and_equal_when_nothing_is_dropped():
    config = tiny_llava_config()
    for step in (
        TrainingStep(2, 10, 1, 16, train_projector=True),
        TrainingStep(2, 10, 2, 16, train_projector=True, train_llm=True),
    ):
        dense = step_flops(config, step)
        assert step_flops(config, step, kept_visual_tokens_per_image=16, executed_layers=4) == dense
        assert step_flops(config, step, kept_visual_tokens_per_image=8)["total"] < dense["total"]
        assert step_flops(config, step, executed_layers=2.5)["total"] < dense["total"]
        assert step_flops(config, step, executed_layers=0)["llm_layers"] == 0
    with pytest.raises(ValueError):
        step_flops(config, TrainingStep(2, 10, 1, 16), kept_visual_tokens_per_image=17)
    with pytest.raises(ValueError):
        step_flops(config, TrainingStep(2, 10, 1, 16), executed_layers=5)


def _measure(model, batch) -> int:
    # Eager attention: FlopCounterMode has no formula for CPU's fused SDPA kernel
    # (aten._scaled_dot_product_flash_attention_for_cpu), so under SDPA it misses the attention scores entirely
    # (8% of this step), which is a gap in the measurement, not in the cost model.
    model.set_attn_implementation("eager")
    with FlopCounterMode(display=False) as counter:
        model(**batch).loss.backward()
    return counter.get_total_flops()


def _train_only(model, vision: bool, projector: bool, llm: bool):
    for name, param in model.named_parameters():
        in_llm = name.startswith(("model.language_model.", "lm_head."))
        param.requires_grad = (vision and "vision_tower" in name) or (projector and "projector" in name) or (
            llm and in_llm
        )
    return model


@pytest.mark.parametrize(
    "vision, projector, llm",
    [(True, True, True), (False, True, False), (False, True, True), (True, False, False)],
    ids=["all", "alignment", "instruction", "vision-only"],
)
def test_matches_pytorch_flop_counter(vision, projector, llm):
    config = tiny_llava_config()
    batch = collate(synthetic_samples(4, config))
    batch_size, length = batch["input_ids"].shape  # right-padded: padding is computed like any token
    visual = config.image_seq_length  # 16
    step = TrainingStep(batch_size, length - visual, 1, visual, vision, projector, llm)
    measured = _measure(_train_only(tiny_llava(), vision, projector, llm), batch)
    # Every matmul is modelled, so the counts agree exactly today; 1% leaves room for a small matmul a future
    # transformers might add (e.g. in rotary embeddings). The brief's bound was 10%.
    assert step_flops(config, step)["total"] == pytest.approx(measured, rel=0.01)


def test_matches_pytorch_flop_counter_with_vtc():
    config = tiny_llava_config()
    batch = collate(synthetic_samples(4, config))
    batch_size, length = batch["input_ids"].shape
    model = _train_only(tiny_llava(), vision=False, projector=True, llm=False)
    compressor = TokenCompressor(IMAGE_TOKEN_ID, keep_ratio=0.5, strategy="uniform", position_mode="compact")
    compressor.install(model)
    with compressor.micro_batch(step=0) as record:
        measured = _measure(model, batch)
    compressor.remove()
    assert record.kept_fraction == 0.5 and record.llm_length == length - 8
    step = TrainingStep(batch_size, length - 16, 1, 16, train_projector=True)
    predicted = step_flops(config, step, kept_visual_tokens_per_image=num_kept(16, 0.5))
    assert predicted["total"] == pytest.approx(measured, rel=0.01)
    assert predicted["total"] < step_flops(config, step)["total"]


def test_matches_pytorch_flop_counter_with_lds():
    config = tiny_llava_config()
    batch = collate(synthetic_samples(4, config))
    batch_size, length = batch["input_ids"].shape
    model = _train_only(tiny_llava(), vision=False, projector=True, llm=True)
    skipper = LayerSkipper(alpha=0.5, epsilon=0.5, schedule="quadratic", seed=0)
    skipper.install(model)
    for layer in (1, 3):
        model.model.language_model.layers[layer]._sts_skip = True
    measured = _measure(model, batch)
    skipper.remove()
    step = TrainingStep(batch_size, length - 16, 1, 16, train_projector=True, train_llm=True)
    assert step_flops(config, step, executed_layers=2)["total"] == pytest.approx(measured, rel=0.01)


def test_expected_executed_fraction():
    # constant schedule, no depth slope: every layer skipped with probability alpha
    assert expected_executed_fraction(8, 10, alpha=0.3, epsilon=0.0, schedule="constant") == pytest.approx(0.7)
    assert expected_executed_fraction(8, 10, alpha=0.0, epsilon=0.5) == 1.0
    # quadratic, unclamped: mean_e ((E - e) / E)^2 over e = 0..E-1 is (E + 1)(2E + 1) / (6 E^2); depth averages to 1
    steps = 100
    mean_decay = (steps + 1) * (2 * steps + 1) / (6 * steps**2)
    assert expected_executed_fraction(32, steps, 0.5, 0.5) == pytest.approx(1 - 0.5 * mean_decay)
    # linear: mean_e (E - e) / E = (E + 1) / (2E)
    assert expected_executed_fraction(32, steps, 0.5, 0.5, "linear") == pytest.approx(1 - 0.5 * 101 / 200)
    # clamping: alpha = 1, eps = 1, L = 3 gives depth factors 0, 1, 2 -> probabilities 0, 1, 1 (clamped)
    assert expected_executed_fraction(3, 5, 1.0, 1.0, "constant") == pytest.approx(1 / 3)


def test_matches_pytorch_flop_counter_with_lora():
    """LoRA on every linear layer of the language model, the projector trained in full (LLaVA's LoRA recipe): the
    frozen base weights pay no weight gradient; the adapters pay forward, weight and input gradients."""
    config = tiny_llava_config()
    batch = collate(synthetic_samples(4, config))
    batch_size, length = batch["input_ids"].shape
    model = _train_only(tiny_llava(), vision=False, projector=False, llm=False)
    targets = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    model = get_peft_model(model, LoraConfig(r=4, target_modules=targets, modules_to_save=["multi_modal_projector"]))
    parts = find_parts(model)
    trains = _trainable_parts(parts)
    assert not trains["train_llm"] and trains["train_projector"]
    # per layer: r * (in + out) for q, k, v, o (64 -> 64, 32, 32, 64) and gate, up, down (64 <-> 128)
    assert trains["llm_adapter_weights_per_layer"] == 4 * (128 + 96 + 96 + 128 + 3 * 192)
    measured = _measure(model, batch)
    step = TrainingStep(batch_size, length - 16, 1, 16, **trains)
    assert step_flops(config, step)["total"] == pytest.approx(measured, rel=0.01)
    # counting the frozen base weights' gradients, as before, is far off
    full = TrainingStep(batch_size, length - 16, 1, 16, train_projector=True, train_llm=True)
    assert step_flops(config, full)["total"] > 1.2 * measured
