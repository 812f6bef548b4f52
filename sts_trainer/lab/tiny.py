"""Tiny models and synthetic batches built locally (random weights, no downloads) for tests, the demo and benchmarks."""

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

IMAGE_TOKEN_ID = 127
PAD_TOKEN_ID = 0


def tiny_llava_config(
    num_layers: int = 4,
    hidden_size: int = 64,
    image_size: int = 32,
    patch_size: int = 8,
    vocab_size: int = 128,
) -> LlavaConfig:
    """A LLaVA config (CLIP vision tower + Llama language model) small enough to train on a CPU in milliseconds.

    Each image gives (image_size / patch_size)^2 visual tokens (16 by default).
    """
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=image_size, patch_size=patch_size,
    )
    text = LlamaConfig(
        hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size, pad_token_id=PAD_TOKEN_ID,
        max_position_embeddings=512,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
        image_seq_length=(image_size // patch_size) ** 2,
    )


def tiny_llava(seed: int = 0, **config_kwargs) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(tiny_llava_config(**config_kwargs))


def freeze_for_alignment(model: LlavaForConditionalGeneration) -> LlavaForConditionalGeneration:
    """Stage-1 trainability: only the projector trains."""
    for name, param in model.named_parameters():
        param.requires_grad = "multi_modal_projector" in name
    return model


def synthetic_samples(
    num_samples: int,
    config: LlavaConfig,
    images_per_sample: tuple[int, ...] = (1,),
    prompt_length: int = 6,
    answer_length: int = 4,
    seed: int = 0,
) -> list[dict]:
    """Samples of `[prompt][image tokens ...][answer]` with labels on the answer only.

    `images_per_sample` cycles over samples (0 gives a text-only sample). The answer is a function of the image, so
    the task is learnable: answer token j = 1 + (sum of the image's pixel signs in column band j) mod 32.
    """
    generator = torch.Generator().manual_seed(seed)
    tokens_per_image = config.image_seq_length
    size = config.vision_config.image_size
    vocab = config.text_config.vocab_size
    samples = []
    for i in range(num_samples):
        n_images = images_per_sample[i % len(images_per_sample)]
        prompt = torch.randint(1, min(vocab, IMAGE_TOKEN_ID), (prompt_length + i % 3,), generator=generator)
        pixels = torch.randn(n_images, 3, size, size, generator=generator)
        if n_images:
            bands = (pixels[0].sign().sum(0).sum(0).view(answer_length, -1).sum(1)).long()
            answer = 1 + bands.remainder(32)
        else:
            answer = torch.randint(1, min(vocab, IMAGE_TOKEN_ID), (answer_length,), generator=generator)
        image_tokens = torch.full((n_images * tokens_per_image,), IMAGE_TOKEN_ID)
        input_ids = torch.cat([prompt, image_tokens, answer])
        labels = torch.cat([torch.full((len(prompt) + len(image_tokens),), -100), answer])
        sample = {"input_ids": input_ids, "labels": labels}
        if n_images:
            sample["pixel_values"] = pixels
        samples.append(sample)
    return samples


def collate(samples: list[dict], padding_side: str = "right") -> dict:
    """Pad `input_ids` / `labels`, build `attention_mask`, stack the images of all samples in batch order."""
    length = max(len(s["input_ids"]) for s in samples)
    batch = {
        "input_ids": torch.full((len(samples), length), PAD_TOKEN_ID),
        "labels": torch.full((len(samples), length), -100),
        "attention_mask": torch.zeros((len(samples), length), dtype=torch.long),
    }
    for row, sample in enumerate(samples):
        n = len(sample["input_ids"])
        span = slice(0, n) if padding_side == "right" else slice(length - n, length)
        batch["input_ids"][row, span] = sample["input_ids"]
        batch["labels"][row, span] = sample["labels"]
        batch["attention_mask"][row, span] = 1
    images = [s["pixel_values"] for s in samples if "pixel_values" in s]
    if images:
        batch["pixel_values"] = torch.cat(images)
    return batch
