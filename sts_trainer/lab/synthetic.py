"""An offline synthetic image-question world: scenes of coloured shapes (and short words) with questions and captions.

Used by the demo, the tests and the accuracy experiment, where no real data set or tokenizer can be downloaded::

    from sts_trainer.lab.synthetic import build_tokenizer_and_processor, tiny_llava_for, write_dataset

    paths = write_dataset("data", num_samples=1000, split="train", seed=0, stage="instruction")
    held_out = write_dataset("data", num_samples=200, split="test", seed=0, stage="instruction")
    processor = build_tokenizer_and_processor("data/processor", image_size=32, patch_size=8)
    model = tiny_llava_for(processor)

A scene is 1-4 shapes (circle, square, triangle) in six colours, one per cell of a 2x2 grid, or, for the `ocr`
category, a 1-3 character word written in the top half above 0-2 shapes. Questions come in six categories (`color`,
`shape`, `count`, `spatial`, `existence`, `ocr`), each answered by one word; yes/no questions are balanced. Every
scene also has a one-sentence caption, the target of the alignment stage.

Splits partition the space of scenes by a hash of the scene, so a held-out split never shows a scene (hence an image)
that the training split can contain, whatever the seeds.
"""

import hashlib
import json
import os
import random
import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import (
    CLIPImageProcessorPil,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from ..llava.data import CHAT_TEMPLATE, IMAGE_TOKEN
from .tiny import tiny_llava_config

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 50, 170),
    "orange": (250, 130, 20),
}
WORDS = ("cat", "dog", "sun", "car", "box", "hat", "cup", "map", "bus", "pen", "ok", "hi", "go", "5", "7", "42", "99")
CATEGORIES = ("color", "shape", "count", "spatial", "existence", "ocr")
STAGES = ("alignment", "instruction")
# Each scene hashes to one of ten buckets; a split owns some buckets, so splits never share a scene.
SPLIT_BUCKETS = {"train": range(0, 8), "val": range(8, 9), "test": range(9, 10)}
ROWS, COLUMNS = ("top", "bottom"), ("left", "right")

QUESTIONS = {
    "color": ("What color is the {kind}?",),
    "shape": ("What shape is the {color} object?",),
    "count": ("How many shapes are there?", "How many {color} shapes are there?"),
    "spatial": (
        "Is the {color} {kind} left of the {color2} {kind2}?",
        "Is the {color} {kind} on the left or on the right of the {color2} {kind2}?",
    ),
    "existence": ("Is there a {color} {kind} in the image?",),
    "ocr": ("What is written in the image?", "What word is written?"),
}
INSTRUCTIONS = ("Describe the image.", "What is in the picture?", "Give a short description of the image.")
CAPTION_SHAPE = "a {color} {kind} at the {row} {column}"
CAPTION_TEXT = "the word {word} at the top"
CAPTION_GLUE = ", and ."
ANSWERS = ("yes", "no", "left", "right", "0", "1", "2", "3", "4")

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
ROLE_MARKERS = ("USER:", "ASSISTANT:")  # the markers CHAT_TEMPLATE writes; one token each
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IMAGE_TOKEN, *ROLE_MARKERS)


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    column: int  # grid cell, 0 = left
    row: int  # grid cell, 0 = top
    dx: int  # offset of the centre from the cell's centre, in 1/16 of the image side: -2 or 2 (see _random_scene)
    dy: int
    big: bool


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    word: str | None = None  # written in the top half when set
    word_dx: int = 0

    def bucket(self) -> int:
        """A stable hash of the scene in [0, 10): which split may use it."""
        return int(hashlib.md5(repr(self).encode()).hexdigest(), 16) % 10


@dataclass
class Sample:
    """A scene, one question of `category` about it with its one-word answer, and the scene's caption."""

    id: str
    scene: Scene
    category: str
    question: str
    answer: str
    caption: str


def _draw(scene: Scene, size: int, image: Image.Image, shape_fill, word_fill) -> None:
    """Draw the scene's shapes (`shape_fill(shape)`) and word (`word_fill`) on `image`, a `size`-pixel square."""
    draw = ImageDraw.Draw(image)
    cell = size / 2
    for shape in scene.shapes:
        cx = (shape.column + 0.5) * cell + shape.dx * size / 16
        cy = (shape.row + 0.5) * cell + shape.dy * size / 16
        r = size / 8 + (size / 32 if shape.big else 0)
        fill = shape_fill(shape)
        if shape.kind == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif shape.kind == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    if scene.word is not None:
        font = ImageFont.load_default(size=max(8, round(size * 0.3)))
        left, top, right, bottom = draw.textbbox((0, 0), scene.word, font=font)
        x = (size - (right - left)) / 2 - left + scene.word_dx * size / 16
        y = (size / 2 - (bottom - top)) / 2 - top
        draw.text((x, y), scene.word, fill=word_fill, font=font)


def render(scene: Scene, size: int = 32) -> Image.Image:
    """Draw the scene on a white `size` x `size` RGB image."""
    image = Image.new("RGB", (size, size), "white")
    _draw(scene, size, image, lambda shape: COLORS[shape.color], "black")
    return image


# One word per image patch, naming what covers it: the scene "written" in the image's own layout.
BLANK_PATCH = "blank"
SHAPE_PATCH_WORDS = tuple(f"{color}_{kind}" for color in COLORS for kind in SHAPES)
TEXT_PATCH_WORDS = tuple(f"text_{word}" for word in WORDS)
PATCH_WORDS = (BLANK_PATCH, *SHAPE_PATCH_WORDS, *TEXT_PATCH_WORDS)


def patch_words(scene: Scene, size: int, patch_size: int) -> list[str]:
    """What covers each `patch_size` patch of the scene rendered at `size` pixels, row-major: `blank`, a shape as
    `<color>_<kind>`, or the written word as `text_<word>` (a patch with any ink of the word is the word's).

    The words are those of `PATCH_WORDS`, one per visual token of an image, in the order the tokens reach the
    language model.
    """
    shapes = Image.new("L", (size, size), 0)  # label 1 + index in SHAPE_PATCH_WORDS; shapes fill without blending
    _draw(Scene(scene.shapes), size, shapes, lambda s: 1 + SHAPE_PATCH_WORDS.index(f"{s.color}_{s.kind}"), 0)
    labels = torch.from_numpy(np.asarray(shapes, dtype=np.int64).copy())  # (size, size)
    if scene.word is not None:
        ink = Image.new("L", (size, size), 0)  # text is anti-aliased: threshold its coverage
        _draw(Scene((), scene.word, scene.word_dx), size, ink, lambda s: 0, 255)
        inked = torch.from_numpy(np.asarray(ink) > 96)
        labels[inked] = len(SHAPE_PATCH_WORDS) + 1 + WORDS.index(scene.word)
    g = size // patch_size
    patches = labels.view(g, patch_size, g, patch_size).permute(0, 2, 1, 3).reshape(g * g, -1)  # (patches, pixels)
    counts = torch.nn.functional.one_hot(patches, len(PATCH_WORDS)).sum(1)  # (patches, words): pixels of each
    counts[:, 0] = 0
    text = counts[:, 1 + len(SHAPE_PATCH_WORDS) :].sum(1) > 0  # any ink of the word
    shape = counts.max(1).values * 4 >= patches.shape[1]  # a shape covering at least a quarter of the patch
    index = torch.where(text | shape, counts.argmax(1), 0)
    return [PATCH_WORDS[i] for i in index.tolist()]


def caption(scene: Scene) -> str:
    """One sentence naming every shape and its place, and the written word, e.g. 'A red circle at the top left.'"""
    parts = [
        CAPTION_SHAPE.format(color=s.color, kind=s.kind, row=ROWS[s.row], column=COLUMNS[s.column])
        for s in sorted(scene.shapes, key=lambda s: (s.row, s.column))
    ]
    if scene.word is not None:
        parts.insert(0, CAPTION_TEXT.format(word=scene.word))
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text[0].upper() + text[1:] + "."


def _random_scene(rng: random.Random, with_word: bool) -> Scene:
    # Shapes get distinct (kind, colour) pairs and distinct cells; a word takes the whole top row. A shape sits at the
    # centre of one quarter of its cell, which at 32 pixels with 8-pixel patches is one patch: each shape then falls
    # (almost) wholly on one visual token, which a tiny random vision tower can read. Centred on the cell, it would be
    # split over four patches.
    cells = [(0, 1), (1, 1)] if with_word else [(0, 0), (1, 0), (0, 1), (1, 1)]
    count = rng.randint(0, 2) if with_word else rng.randint(1, 4)
    looks = rng.sample([(k, c) for k in SHAPES for c in COLORS], count)
    shapes = tuple(
        Shape(kind, color, column, row, rng.choice((-2, 2)), rng.choice((-2, 2)), rng.random() < 0.5)
        for (kind, color), (column, row) in zip(looks, rng.sample(cells, count))
    )
    if with_word:
        return Scene(shapes, rng.choice(WORDS), rng.randint(-1, 1))
    return Scene(shapes)


def _question(rng: random.Random, scene: Scene, category: str, want_yes: bool) -> tuple[str, str] | None:
    """A (question, answer) pair of `category` about `scene`, or None when the scene cannot answer one."""
    shapes = scene.shapes
    templates = QUESTIONS[category]
    if category == "color":
        unique = [s for s in shapes if sum(t.kind == s.kind for t in shapes) == 1]
        if not unique:
            return None
        s = rng.choice(unique)
        return templates[0].format(kind=s.kind), s.color
    if category == "shape":
        unique = [s for s in shapes if sum(t.color == s.color for t in shapes) == 1]
        if not unique:
            return None
        s = rng.choice(unique)
        return templates[0].format(color=s.color), s.kind
    if category == "count":
        if rng.random() < 0.5:
            return templates[0], str(len(shapes))
        color = rng.choice(list(COLORS))
        return templates[1].format(color=color), str(sum(s.color == color for s in shapes))
    if category == "spatial":
        pairs = [(a, b) for a in shapes for b in shapes if a.column < b.column]
        if not pairs:
            return None
        left, right = rng.choice(pairs)
        a, b = (left, right) if want_yes else (right, left)
        names = dict(color=a.color, kind=a.kind, color2=b.color, kind2=b.kind)
        if rng.random() < 0.5:
            return templates[0].format(**names), "yes" if want_yes else "no"
        return templates[1].format(**names), "left" if want_yes else "right"
    if category == "existence":
        present = {(s.color, s.kind) for s in shapes}
        pool = sorted(present) if want_yes else [(c, k) for c in COLORS for k in SHAPES if (c, k) not in present]
        color, kind = rng.choice(pool)
        return templates[0].format(color=color, kind=kind), "yes" if want_yes else "no"
    if category == "ocr":
        return (rng.choice(templates), scene.word) if scene.word is not None else None
    raise ValueError(f"Unknown question category {category!r}; choose from {CATEGORIES}.")


def generate(num_samples: int, split: str = "train", seed: int = 0) -> list[Sample]:
    """`num_samples` scenes of `split` with one question each, the categories in turn (so balanced).

    Deterministic in (split, seed). Yes/no questions alternate between 'yes' and 'no' within each category.
    """
    if split not in SPLIT_BUCKETS:
        raise ValueError(f"Unknown split {split!r}; choose from {sorted(SPLIT_BUCKETS)}.")
    rng = random.Random(f"sts-synthetic/{split}/{seed}")
    asked = dict.fromkeys(CATEGORIES, 0)
    samples = []
    for i in range(num_samples):
        category = CATEGORIES[i % len(CATEGORIES)]
        want_yes = asked[category] % 2 == 0
        while True:  # rejection sampling: a scene of this split that can answer this category
            scene = _random_scene(rng, with_word=category == "ocr")
            if scene.bucket() not in SPLIT_BUCKETS[split]:
                continue
            qa = _question(rng, scene, category, want_yes)
            if qa is not None:
                break
        asked[category] += 1
        samples.append(Sample(f"{split}-s{seed}-{i:06d}", scene, category, *qa, caption(scene)))
    return samples


def write_dataset(
    out_dir: str,
    num_samples: int,
    split: str = "train",
    seed: int = 0,
    stage: str = "instruction",
    image_size: int = 32,
) -> dict[str, str]:
    """Write a LLaVA-format data set of `num_samples` synthetic scenes under `out_dir`.

    Files written (image paths in both JSON files are relative to `out_dir/images`):
      - `images/{split}/{id}.png`, one image per sample, `image_size` pixels square;
      - `{split}_s{seed}_{stage}.json`, a JSON list of `{"id", "image", "conversations"}`: for 'instruction' the
        human turn is `"<image>\\n" + question` and the gpt turn the one-word answer; for 'alignment' the human turn
        is `"<image>\\n" + a short instruction` ("Describe the image.") and the gpt turn the caption;
      - `{split}_s{seed}_questions.jsonl`, one `{"id", "image", "question", "answer", "category"}` per line, for
        evaluation (written for every split; use it on a held-out split).
    Returns `{"data_path", "image_folder", "questions_path"}`.
    """
    if stage not in STAGES:
        raise ValueError(f"Unknown stage {stage!r}; choose from {STAGES}.")
    image_folder = os.path.join(out_dir, "images")
    os.makedirs(os.path.join(image_folder, split), exist_ok=True)
    rng = random.Random(f"sts-synthetic-instructions/{split}/{seed}")
    records, questions = [], []
    for sample in generate(num_samples, split, seed):
        image = f"{split}/{sample.id}.png"
        render(sample.scene, image_size).save(os.path.join(image_folder, image))
        if stage == "instruction":
            turns = (f"{IMAGE_TOKEN}\n{sample.question}", sample.answer)
        else:
            turns = (f"{IMAGE_TOKEN}\n{rng.choice(INSTRUCTIONS)}", sample.caption)
        records.append({
            "id": sample.id,
            "image": image,
            "conversations": [{"from": "human", "value": turns[0]}, {"from": "gpt", "value": turns[1]}],
        })
        questions.append({
            "id": sample.id, "image": image, "question": sample.question, "answer": sample.answer,
            "category": sample.category,
        })
    paths = {
        "data_path": os.path.join(out_dir, f"{split}_s{seed}_{stage}.json"),
        "image_folder": image_folder,
        "questions_path": os.path.join(out_dir, f"{split}_s{seed}_questions.jsonl"),
    }
    with open(paths["data_path"], "w") as f:
        json.dump(records, f, indent=1)
    with open(paths["questions_path"], "w") as f:
        f.writelines(json.dumps(q) + "\n" for q in questions)
    return paths


def vocabulary() -> list[str]:
    """Every word and punctuation mark that the world's questions, answers, captions and instructions can contain."""
    templates = [t for ts in QUESTIONS.values() for t in ts]
    templates += [*INSTRUCTIONS, CAPTION_SHAPE, CAPTION_TEXT, CAPTION_GLUE]
    values = [*SHAPES, *COLORS, *ROWS, *COLUMNS, *WORDS, *ANSWERS]
    # Placeholders always sit between whitespace or punctuation, so the words are the templates' and the values'.
    texts = [re.sub(r"\{\w+\}", " ", t) for t in templates] + values
    pre_tokenizer = _pre_tokenizer()
    return sorted({word for text in texts for word, _ in pre_tokenizer.pre_tokenize_str(text.lower())})


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Whitespace()  # words, and runs of punctuation, split at whitespace


def build_tokenizer_and_processor(
    out_dir: str | None = None, image_size: int = 32, patch_size: int = 8, with_patch_words: bool = False
) -> LlavaProcessor:
    """A word-level tokenizer over `vocabulary()` and a `LlavaProcessor` for `image_size` images, built locally.

    Token ids: `<pad>` 0, `<s>` 1, `</s>` 2, `<unk>` 3, `<image>` 4, `USER:` 5, `ASSISTANT:` 6, then the words
    (lower-cased by the tokenizer), and with `with_patch_words` the words of `PATCH_WORDS` after them. Each
    `<image>` expands to (image_size / patch_size)^2 placeholders: CLIP adds a
    CLS token (`num_additional_image_tokens=1`) that the 'default' feature strategy drops. The chat template is
    `sts_trainer.llava.data.CHAT_TEMPLATE` ("USER: ... ASSISTANT: answer</s>"). What a matching model needs is on the
    processor: `processor.image_token_id`, `len(processor.tokenizer)`, `processor.patch_size`,
    `processor.image_processor.crop_size`; `tiny_llava_for(processor)` builds one. Saved to `out_dir` when given,
    from where `AutoProcessor.from_pretrained(out_dir)` and `AutoTokenizer.from_pretrained(out_dir)` reload it offline.
    """
    if image_size % patch_size:
        raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size}).")
    words = [*vocabulary(), *(PATCH_WORDS if with_patch_words else ())]
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = _pre_tokenizer()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        extra_special_tokens={"image_token": IMAGE_TOKEN}, model_max_length=2048,
    )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}, do_center_crop=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )
    if out_dir is not None:
        processor.save_pretrained(out_dir)
    return processor


def tiny_llava_config_for(processor: LlavaProcessor, num_layers: int = 4, hidden_size: int = 64) -> LlavaConfig:
    """`tiny.tiny_llava_config` matched to `processor`: its vocabulary, image size, patch size and token ids."""
    tokenizer = processor.tokenizer
    config = tiny_llava_config(
        num_layers=num_layers, hidden_size=hidden_size, image_size=processor.image_processor.crop_size["height"],
        patch_size=processor.patch_size, vocab_size=len(tokenizer),
    )
    config.image_token_id = processor.image_token_id
    config.text_config.pad_token_id = tokenizer.pad_token_id
    config.text_config.bos_token_id = tokenizer.bos_token_id
    config.text_config.eos_token_id = tokenizer.eos_token_id
    return config


def tiny_llava_for(
    processor: LlavaProcessor, num_layers: int = 4, hidden_size: int = 64, seed: int = 0
) -> LlavaForConditionalGeneration:
    """A tiny random-weight LLaVA whose config matches `processor` (see `tiny_llava_config_for`)."""
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(tiny_llava_config_for(processor, num_layers, hidden_size))
