"""Toy foundation models of the synthetic world: a pretrained language model and a pretrained vision encoder.

    python -m sts_trainer.lab.foundation                   # find (shipped, cached) or build the default pair
    python -m sts_trainer.lab.foundation --ship            # build and ship it with the package (after a recipe change)
    python -m sts_trainer.lab.foundation --ship --quick    # the same for the seconds-long pair the tests use
    python -m sts_trainer.lab.foundation --ship --shipped deep   # the 12-layer pair of the accuracy experiment

LLaVA starts from a language model that already knows language (Vicuna) and a vision encoder whose features already
describe images (CLIP); alignment only has to connect them. This module builds that situation in miniature, so that
alignment matters and accuracy retention is measured in the method's regime:

- the **language model** (a small Llama) is pretrained on text of the world only: the scene written where the image
  will stand, followed by a question about it and its one-word answer, or by the instruction to describe the image
  and the caption, in both formats training uses (the chat template and the plain alignment format). The scene is
  written as the image's *patch words* by default (`synthetic.patch_words`: one word per image patch, in the order
  of the visual tokens, naming the shape and colour or the written word covering it, or `blank`), so that the
  language model learns to read a scene laid out as the image path will give it; `--scene_text caption` writes
  the caption instead. It learns to answer from a written scene before it ever sees an image;
- the **vision encoder** (a small CLIP vision tower) is pretrained on the world's images, supervised on each patch's
  word (from that patch's token), on what is in each cell of the 2x2 grid (colour and shape), the written word and
  the number of shapes (each read from the tokens of its own region), so its patch features carry colour, shape,
  position, count and text.

Alignment then has to learn what LLaVA's projector learns: a map from each visual token's features to what the
language model reads there. The language model never saw a feature vector, and nothing trains them together.

The pairs of `SHIPPED_RECIPES` (the default recipe, the demo's and the accuracy experiment's, and the tests' quick
one) ship inside the package (`sts_trainer/lab/foundation_models/<key>/`, with their tokenizer, processor, report and
a `MANIFEST.json` of the recipe, its key and each file's SHA-256), so nobody waits for a build. Any other recipe is
built once and cached under `<cache_dir>`, one folder per model and recipe key (a hash of the fields each model is
built from, and of `FOUNDATION_VERSION`, bumped when what a recipe builds changes). `build_foundation` returns the
paths: the shipped pair when its key matches the recipe and every file checks out, else the cache, else a build. They
are what `sts-train --language_model ... --vision_tower ...` composes into a LLaVA model, as it would Vicuna and CLIP.
`report.json` holds how well each learned its task on held-out scenes (written last: its presence marks a finished
build). After a change of `FoundationRecipe`'s defaults, of `QUICK_RECIPE` or of `FOUNDATION_VERSION`, re-ship with
`--ship` (a test fails until then).
"""

import hashlib
import json
import math
import os
import random
import shutil
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModel, HfArgumentParser, LlamaForCausalLM

from ..llava.data import CHAT_TEMPLATE, IMAGE_TOKEN, PLAIN_TEMPLATE, to_messages
from .synthetic import (
    COLORS,
    INSTRUCTIONS,
    PATCH_WORDS,
    SHAPES,
    WORDS,
    build_tokenizer_and_processor,
    generate,
    patch_words,
    render,
    tiny_llava_config_for,
)

FOUNDATION_VERSION = 2
SCENE_TEXTS = ("patch_words", "patch_words_varied", "caption")
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "sts_trainer", "foundation")


@dataclass(frozen=True)
class FoundationRecipe:
    """What the two toy foundation models are and how they are pretrained. Every field is part of the cache key."""

    image_size: int = field(default=64, metadata={"help": "Image side in pixels."})
    patch_size: int = field(default=4, metadata={"help": "Vision patch side: (image_size / patch_size)^2 visual "
                                                         "tokens."})
    vision_hidden_size: int = field(default=64, metadata={"help": "Width of the vision encoder."})
    vision_layers: int = field(default=3, metadata={"help": "Transformer layers of the vision encoder."})
    vision_steps: int = field(default=600, metadata={"help": "Pretraining steps of the vision encoder."})
    vision_images: int = field(default=6000, metadata={"help": "Distinct training images of the vision encoder."})
    feature_scale_weight: float = field(
        default=0.01,
        metadata={"help": "Weight of a penalty on the mean square of the encoder's output features, which keeps them "
                          "of order 1 as CLIP's are (without it they grow to norms in the hundreds)."},
    )
    scene_text: str = field(
        default="patch_words",
        metadata={"help": "How the language model's pretraining texts give the scene, where the image will stand: "
                          "'patch_words', one word per image patch naming what covers it (the image's own layout: "
                          "what the projector can map each visual token to); 'patch_words_varied', the patch words "
                          "of a random subset of the patches (a quarter to all of them), in raster order in half of "
                          "the texts and shuffled in the other half, so that no position stands for a place in the "
                          "image (`varied_patch_words`); 'caption', the scene's caption.",
                  "choices": list(SCENE_TEXTS)},
    )
    lm_hidden_size: int = field(default=128, metadata={"help": "Width of the language model."})
    lm_layers: int = field(default=4, metadata={"help": "Decoder layers of the language model."})
    lm_steps: int = field(default=1000, metadata={"help": "Pretraining steps of the language model."})
    lm_texts: int = field(default=20000, metadata={"help": "Distinct pretraining texts of the language model."})
    lm_batch_size: int = field(default=32, metadata={"help": "Pretraining batch size of the language model."})
    batch_size: int = field(default=64, metadata={"help": "Pretraining batch size of the vision encoder."})
    learning_rate: float = field(default=2e-3, metadata={"help": "Peak learning rate of both (cosine decay)."})
    seed: int = field(default=0, metadata={"help": "Seed of the scenes, the weights and the batches."})

    @property
    def visual_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def key(self, part: str | None = None) -> str:
        """A hash of the recipe, or of the fields one part ('vision' or 'language') is built from."""
        fields = asdict(self)
        if part is not None:
            own = "vision_" if part == "vision" else "lm_"
            shared = ("learning_rate", "seed", "image_size", "patch_size") + (
                ("batch_size", "feature_scale_weight") if part == "vision" else ("scene_text",))
            fields = {k: v for k, v in fields.items() if k.startswith(own) or k in shared}
        text = json.dumps({"version": FOUNDATION_VERSION, **fields}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# Seconds-long: for tests, where the numbers do not matter but every code path runs.
QUICK_RECIPE = FoundationRecipe(
    image_size=32, patch_size=8, vision_hidden_size=32, vision_layers=1, vision_steps=3, vision_images=64,
    lm_hidden_size=32, lm_layers=2, lm_steps=3, lm_texts=64, lm_batch_size=8, batch_size=16,
)


# The recipes whose pairs ship with the package (re-shipped by `--ship`).
# "deep": the depth axis of the accuracy experiment, 12 decoder layers at about the default's FLOPs per token
# (12 x 72^2 against 4 x 128^2: 95%), so LDS skips one layer of many instead of a third of the model.
SHIPPED_RECIPES = {"default": FoundationRecipe(), "deep": FoundationRecipe(lm_layers=12, lm_hidden_size=72),
                   "quick": QUICK_RECIPE}
# Regime axes built on demand (not shipped; cached after the first build): "deep_no_layout", the deep pair's language
# model pretrained on patch words of varying number and order (`varied_patch_words`), the deep pair's vision encoder.
EXPERIMENT_RECIPES = SHIPPED_RECIPES | {
    "deep_no_layout": replace(SHIPPED_RECIPES["deep"], scene_text="patch_words_varied"),
}
SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "foundation_models")
MANIFEST = "MANIFEST.json"
# Minutes a build takes on 2 CPU cores (measured), said before one starts.
BUILD_MINUTES = {"default": 13, "deep": 17, "deep_no_layout": 17, "quick": 0.1}


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def shipped_foundation(recipe: FoundationRecipe, shipped_dir: str | None = None) -> dict[str, str] | None:
    """The paths of the pair shipped for `recipe` (as `build_foundation` returns them), or None when none ships for
    its key, or when a shipped file is missing or does not match its manifest (a warning names the file)."""
    root = os.path.join(shipped_dir or SHIPPED_DIR, recipe.key())
    manifest_path = os.path.join(root, MANIFEST)
    if not os.path.isdir(root):
        return None
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as error:
        warnings.warn(f"The shipped foundation models' manifest {manifest_path} cannot be read ({error}); using the "
                      "cache or building them instead.", stacklevel=3)
        return None
    for name, digest in manifest["files"].items():
        path = os.path.join(root, name)
        if not os.path.isfile(path) or _sha256(path) != digest:
            problem = "is missing" if not os.path.isfile(path) else "does not match its manifest (corrupt)"
            warnings.warn(f"The shipped foundation model file {path} {problem}; using the cache or building the "
                          "models instead. Reinstall sts_trainer to restore it.", stacklevel=3)
            return None
    return {part: os.path.join(root, part) for part in ("language_model", "vision_tower", "processor")} | {
        "report": os.path.join(root, "report.json")}


def ship_foundation(recipe: FoundationRecipe, cache_dir: str | None = None,
                    shipped_dir: str | None = None) -> dict[str, str]:
    """Build `recipe`'s pair (or take it from the cache) and write it into the package (`shipped_dir`), with its
    manifest; remove shipped pairs whose key is no longer one of `SHIPPED_RECIPES`. Returns the shipped paths."""
    shipped_dir = shipped_dir or SHIPPED_DIR
    built = build_foundation(recipe, cache_dir, use_shipped=False)
    root = os.path.join(shipped_dir, recipe.key())
    if os.path.isdir(root):
        shutil.rmtree(root)
    for part in ("language_model", "vision_tower", "processor"):
        shutil.copytree(built[part], os.path.join(root, part))
    shutil.copy(built["report"], os.path.join(root, "report.json"))
    files = sorted(os.path.relpath(os.path.join(folder, name), root)
                   for folder, _, names in os.walk(root) for name in names)
    manifest = {"key": recipe.key(), "language_key": recipe.key("language"), "vision_key": recipe.key("vision"),
                "foundation_version": FOUNDATION_VERSION, "recipe": asdict(recipe),
                "files": {name: _sha256(os.path.join(root, name)) for name in files}}
    with open(os.path.join(root, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    current = {r.key() for r in SHIPPED_RECIPES.values()}
    for stale in sorted(os.listdir(shipped_dir)):
        if stale not in current and os.path.isdir(os.path.join(shipped_dir, stale)):
            shutil.rmtree(os.path.join(shipped_dir, stale))
            print(f"removed the shipped pair {stale} (its recipe is no longer shipped)")
    return shipped_foundation(recipe, shipped_dir)


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _train(model, loss_fn, batches, steps: int, learning_rate: float, desc: str) -> list[float]:
    """AdamW with warm-up and cosine decay over `steps`; `batches(step)` gives the step's inputs. Returns the losses."""
    from tqdm.auto import tqdm

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate,
                                  weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _cosine(s, steps, max(1, steps // 20)))
    losses = []
    model.train()
    bar = tqdm(range(steps), desc=desc, unit="step")
    for step in bar:
        loss = loss_fn(batches(step))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{statistics.fmean(losses[-50:]):.3f}")
    return losses


# ---- the vision encoder -------------------------------------------------------------------------------------------

def scene_targets(scene) -> list[int]:
    """Class labels of a scene: colour and shape in each grid cell (0 = empty; cells top-left, top-right,
    bottom-left, bottom-right), the written word (0 = none) and the number of shapes."""
    colors, shapes = [0] * 4, [0] * 4
    for s in scene.shapes:
        cell = 2 * s.row + s.column
        colors[cell] = 1 + list(COLORS).index(s.color)
        shapes[cell] = 1 + SHAPES.index(s.kind)
    word = 0 if scene.word is None else 1 + WORDS.index(scene.word)
    return [*colors, *shapes, word, len(scene.shapes)]


class AttributeHeads(torch.nn.Module):
    """Reads the vision encoder's patch tokens region by region: each grid cell's colour and shape from the mean of
    that cell's tokens, the word from the top half's, the count from all of them, and each patch's word
    (`synthetic.patch_words`: what covers the patch) from that patch's token."""

    def __init__(self, hidden_size: int, grid: int):
        super().__init__()
        self.grid = grid
        self.cell = torch.nn.Linear(hidden_size, 1 + len(COLORS) + 1 + len(SHAPES))
        self.word = torch.nn.Linear(hidden_size, 1 + len(WORDS))
        self.count = torch.nn.Linear(hidden_size, 5)
        self.patch = torch.nn.Linear(hidden_size, len(PATCH_WORDS))

    def forward(self, patches: torch.Tensor) -> list[torch.Tensor]:
        b, _, d = patches.shape  # (B, grid * grid, D), the CLS token removed
        g, h = self.grid, self.grid // 2
        cells = patches.view(b, 2, h, 2, h, d).mean(dim=(2, 4)).reshape(b, 4, d)  # (B, 4, D), row-major cells
        cell_logits = self.cell(cells)  # (B, 4, colours + shapes)
        n_colors = 1 + len(COLORS)
        top = patches.view(b, g, g, d)[:, :h].mean(dim=(1, 2))  # (B, D)
        return [
            *cell_logits[..., :n_colors].unbind(1), *cell_logits[..., n_colors:].unbind(1),
            self.word(top), self.count(patches.mean(1)), self.patch(patches),
        ]


def _scenes(num: int, split: str, seed: int):
    return [sample.scene for sample in generate(num, split, seed)]


def _pixels(processor, scenes, image_size: int) -> torch.Tensor:
    images = [render(scene, image_size) for scene in scenes]
    return processor.image_processor(images, return_tensors="pt")["pixel_values"]


def _patch_targets(scenes, recipe: FoundationRecipe) -> torch.Tensor:
    return torch.tensor([[PATCH_WORDS.index(w) for w in patch_words(s, recipe.image_size, recipe.patch_size)]
                         for s in scenes])  # (N, patches)


def pretrain_vision(recipe: FoundationRecipe, processor,
                    vision_config: CLIPVisionConfig) -> tuple[CLIPVisionModel, dict]:
    torch.manual_seed(recipe.seed)
    model = CLIPVisionModel(vision_config)
    grid = recipe.image_size // recipe.patch_size
    heads = AttributeHeads(vision_config.hidden_size, grid)
    scenes = _scenes(recipe.vision_images, "train", recipe.seed)
    pixels = _pixels(processor, scenes, recipe.image_size)  # (N, 3, S, S)
    targets = torch.tensor([scene_targets(s) for s in scenes])  # (N, 10)
    patch_targets = _patch_targets(scenes, recipe)  # (N, grid * grid)
    generator = torch.Generator().manual_seed(recipe.seed)
    order = torch.randperm(len(scenes), generator=generator)
    modules = torch.nn.ModuleList([model, heads])

    def features(x):
        # the last layer's patch tokens: what the LLaVA model built from this encoder projects (vision_feature_layer -1)
        return model(pixel_values=x).last_hidden_state[:, 1:]  # (B, N, D)

    def batches(step):
        start = (step * recipe.batch_size) % len(scenes)
        index = order[start : start + recipe.batch_size]
        return pixels[index], targets[index], patch_targets[index]

    def loss_fn(batch):
        x, y, y_patch = batch
        patches = features(x)
        *attribute_logits, patch_logits = heads(patches)
        loss = sum(F.cross_entropy(out, y[:, k]) for k, out in enumerate(attribute_logits))
        loss = loss + F.cross_entropy(patch_logits.flatten(0, 1), y_patch.flatten())
        return loss + recipe.feature_scale_weight * patches.pow(2).mean()

    losses = _train(modules, loss_fn, batches, recipe.vision_steps, recipe.learning_rate, "vision encoder")
    modules.eval()
    held_out = _scenes(600 if recipe.vision_images >= 600 else 32, "val", recipe.seed)
    with torch.no_grad():
        held_out_features = features(_pixels(processor, held_out, recipe.image_size))
        *attribute_logits, patch_logits = heads(held_out_features)
    predicted = torch.stack([out.argmax(-1) for out in attribute_logits], 1)
    correct = (predicted == torch.tensor([scene_targets(s) for s in held_out])).float()
    patch_truth = _patch_targets(held_out, recipe)
    covered = patch_truth > 0
    report = {
        "final_loss": statistics.fmean(losses[-20:]),
        "held_out_scenes": len(held_out),
        "cell_color_accuracy": correct[:, :4].mean().item(),
        "cell_shape_accuracy": correct[:, 4:8].mean().item(),
        "word_accuracy": correct[[i for i, s in enumerate(held_out) if s.word is not None], 8].mean().item(),
        "count_accuracy": correct[:, 9].mean().item(),
        "patch_word_accuracy": (patch_logits.argmax(-1) == patch_truth).float().mean().item(),
        "covered_patch_word_accuracy": (patch_logits.argmax(-1) == patch_truth)[covered].float().mean().item(),
        "feature_rms": held_out_features.pow(2).mean().sqrt().item(),
    }
    return model, report


# ---- the language model -------------------------------------------------------------------------------------------

def varied_patch_words(words: list[str], rng: random.Random) -> list[str]:
    """A scene's patch words without a fixed layout: a random subset of them (a quarter to all), in raster order or,
    with probability 1/2, shuffled. A word's position then says nothing certain about where its patch is."""
    kept = sorted(rng.sample(range(len(words)), rng.randint(max(1, -(-len(words) // 4)), len(words))))
    if rng.random() < 0.5:
        rng.shuffle(kept)
    return [words[i] for i in kept]


def world_texts(processor, num: int, split: str, seed: int, scene_text: str = "caption", image_size: int = 64,
                patch_size: int = 4) -> list[tuple[str, str]]:
    """(prompt, completion) pairs of the world's text: the scene where the image will be (its caption, or with
    `scene_text='patch_words'` its patch words for `image_size` / `patch_size`), then a question and its answer
    (chat template) or an instruction and the caption (plain alignment format), in equal parts."""
    if scene_text not in SCENE_TEXTS:
        raise ValueError(f"scene_text={scene_text!r} is not valid; choose one of {SCENE_TEXTS}.")
    rng = random.Random(f"sts-foundation-texts/{split}/{seed}")
    layouts = random.Random(f"sts-foundation-layouts/{split}/{seed}")
    texts = []
    for i, sample in enumerate(generate(num, split, seed)):
        if i % 2 == 0:
            template = CHAT_TEMPLATE
            turns = [{"from": "human", "value": f"{IMAGE_TOKEN}\n{sample.question}"}]
            completion = sample.answer
        else:
            template = PLAIN_TEMPLATE
            turns = [{"from": "human", "value": f"{IMAGE_TOKEN}\n{rng.choice(INSTRUCTIONS)}"}]
            completion = sample.caption
        prompt = processor.apply_chat_template(
            to_messages(turns), chat_template=template, add_generation_prompt=template is CHAT_TEMPLATE, tokenize=False
        )
        scene = sample.caption
        if scene_text in ("patch_words", "patch_words_varied"):
            words = patch_words(sample.scene, image_size, patch_size)
            scene = " ".join(words if scene_text == "patch_words" else varied_patch_words(words, layouts))
        texts.append((prompt.replace(IMAGE_TOKEN, scene), completion))
    return texts


def _encode(tokenizer, texts: list[tuple[str, str]]) -> list[torch.Tensor]:
    """Token ids of prompt + completion + end of sequence (what the templates write after a reply)."""
    full = [f"{prompt}{' ' if prompt.endswith(':') else ''}{completion}{tokenizer.eos_token}"
            for prompt, completion in texts]
    return [torch.tensor(ids) for ids in tokenizer(full, add_special_tokens=False)["input_ids"]]


def _pad(rows: list[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids and their attention mask, (B, T) each."""
    ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=pad)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(r) for r in rows], batch_first=True)
    return ids, mask


def pretrain_language_model(recipe: FoundationRecipe, processor, text_config) -> tuple[LlamaForCausalLM, dict]:
    torch.manual_seed(recipe.seed)
    model = LlamaForCausalLM(text_config)
    tokenizer = processor.tokenizer

    def texts(num, split):
        return world_texts(processor, num, split, recipe.seed, recipe.scene_text, recipe.image_size, recipe.patch_size)

    sequences = _encode(tokenizer, texts(recipe.lm_texts, "train"))
    generator = torch.Generator().manual_seed(recipe.seed)
    order = torch.randperm(len(sequences), generator=generator)
    pad = tokenizer.pad_token_id

    def batches(step):
        start = (step * recipe.lm_batch_size) % len(sequences)
        ids, mask = _pad([sequences[i] for i in order[start : start + recipe.lm_batch_size]], pad)
        return ids, mask, ids.masked_fill(mask == 0, -100)

    def loss_fn(batch):
        ids, mask, labels = batch
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss

    losses = _train(model, loss_fn, batches, recipe.lm_steps, recipe.learning_rate, "language model")
    model.eval()
    # Held out: answer a question about a described scene (the next token after 'ASSISTANT:').
    num = 1200 if recipe.lm_texts >= 1200 else 32
    held_out = [t for t in texts(num, "val") if t[0].endswith("ASSISTANT:")]
    report = {
        "final_loss": statistics.fmean(losses[-20:]),
        "held_out_questions": len(held_out),
        "text_only_accuracy": _answer_accuracy(model, tokenizer, held_out),
    }
    if recipe.scene_text == "patch_words_varied":  # also on every patch word in raster order: what the images give
        full = world_texts(processor, num, "val", recipe.seed, "patch_words", recipe.image_size, recipe.patch_size)
        report["text_only_accuracy_full_layout"] = _answer_accuracy(
            model, tokenizer, [t for t in full if t[0].endswith("ASSISTANT:")])
    return model, report


def _answer_accuracy(model, tokenizer, held_out: list[tuple[str, str]]) -> float:
    """The share of (prompt, one-word answer) pairs whose answer is the model's most likely next token."""
    prompts = [torch.tensor(ids) for ids in tokenizer([p for p, _ in held_out], add_special_tokens=False)["input_ids"]]
    answers = torch.tensor([tokenizer.convert_tokens_to_ids(c) for _, c in held_out])
    correct = []
    with torch.no_grad():
        for start in range(0, len(prompts), 64):
            rows = prompts[start : start + 64]
            lengths = torch.tensor([len(r) for r in rows])
            ids, mask = _pad(rows, tokenizer.pad_token_id)
            logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V); right padding
            last = logits[torch.arange(len(rows)), lengths - 1]
            correct.append(last.argmax(-1) == answers[start : start + 64])
    return torch.cat(correct).float().mean().item()


# ---- build and cache ----------------------------------------------------------------------------------------------

def build_foundation(recipe: FoundationRecipe = FoundationRecipe(), cache_dir: str | None = None,
                     use_shipped: bool = True) -> dict[str, str]:
    """The recipe's pretrained language model, vision encoder and processor: shipped, cached, or built and cached.

    Returns `{"language_model", "vision_tower", "processor", "report"}`: paths of a `LlamaForCausalLM` with its
    tokenizer, a `CLIPVisionModel` with its image processor, the `LlavaProcessor`, and `report.json`. The pair shipped
    with the package is used when its key is the recipe's and its files check out (`shipped_foundation`). Otherwise
    each model is cached under the key of the fields it is built from (`<cache_dir>/language-<key>`,
    `<cache_dir>/vision-<key>`), so a recipe that changes one model rebuilds only that one. A cached model (its
    folder's `report.json` exists) is reused; an unfinished one is rebuilt.
    """
    if use_shipped and (shipped := shipped_foundation(recipe)) is not None:
        return shipped
    cache_dir = cache_dir or os.environ.get("STS_FOUNDATION_CACHE", DEFAULT_CACHE)
    root = os.path.join(cache_dir, recipe.key())
    vision_root = os.path.join(cache_dir, f"vision-{recipe.key('vision')}")
    language_root = os.path.join(cache_dir, f"language-{recipe.key('language')}")
    paths = {
        "language_model": os.path.join(language_root, "language_model"),
        "vision_tower": os.path.join(vision_root, "vision_tower"),
        "processor": os.path.join(root, "processor"),
        "report": os.path.join(root, "report.json"),
    }
    if os.path.exists(paths["report"]):
        return paths
    # a named recipe under another pretraining seed takes as long as the named one
    name = next((n for n, r in EXPERIMENT_RECIPES.items() if replace(r, seed=recipe.seed) == recipe), None)
    estimate = f"about {BUILD_MINUTES[name]:g} min on 2 CPU cores" if name else "minutes to an hour, by its size"
    print(f"Building the toy foundation models of recipe {recipe.key()} ({estimate}; cached under {cache_dir} "
          "after) ...", flush=True)
    processor = build_tokenizer_and_processor(paths["processor"], recipe.image_size, recipe.patch_size,
                                              with_patch_words=recipe.scene_text != "caption")
    config = tiny_llava_config_for(processor, num_layers=recipe.lm_layers, hidden_size=recipe.lm_hidden_size)
    vision_config = config.vision_config
    vision_config.hidden_size = recipe.vision_hidden_size
    vision_config.intermediate_size = 2 * recipe.vision_hidden_size
    vision_config.num_hidden_layers = recipe.vision_layers
    vision_config.num_attention_heads = max(2, recipe.vision_hidden_size // 16)

    def cached(part_root: str, build) -> dict:
        report_path = os.path.join(part_root, "report.json")
        if not os.path.exists(report_path):
            start = time.perf_counter()
            report = build() | {"build_seconds": time.perf_counter() - start}
            with open(report_path, "w") as f:
                json.dump(report, f, indent=1)
        with open(report_path) as f:
            return json.load(f)

    def vision():
        model, report = pretrain_vision(recipe, processor, vision_config)
        model.save_pretrained(paths["vision_tower"])
        processor.image_processor.save_pretrained(paths["vision_tower"])
        return report

    def language():
        model, report = pretrain_language_model(recipe, processor, config.text_config)
        model.save_pretrained(paths["language_model"])
        processor.tokenizer.save_pretrained(paths["language_model"])
        return report

    report = {
        "recipe": asdict(recipe), "key": recipe.key(), "visual_tokens": recipe.visual_tokens,
        "vision_encoder": cached(vision_root, vision), "language_model": cached(language_root, language),
    }
    with open(paths["report"], "w") as f:
        json.dump(report, f, indent=1)
    return paths


@dataclass
class FoundationArguments:
    cache_dir: str = field(default=DEFAULT_CACHE, metadata={"help": "Where builds are cached, one folder per recipe."})
    quick: bool = field(default=False, metadata={"help": "The seconds-long pair the tests use."})
    shipped: str | None = field(default=None, metadata={"help": "The recipe of this SHIPPED_RECIPES entry (default, "
                                                                "deep, quick) instead of the one given by the options.",
                                                        "choices": ["default", "deep", "quick"]})
    ship: bool = field(
        default=False,
        metadata={"help": "Build the pair (or take it from the cache) and write it into the package "
                          "(sts_trainer/lab/foundation_models/<key>), for a recipe of SHIPPED_RECIPES; run it after "
                          "changing the default recipe, QUICK_RECIPE or FOUNDATION_VERSION, and commit the files."},
    )


def describe(paths: dict[str, str]) -> str:
    """Sizes of a pair's files and the held-out accuracies in its report."""
    with open(paths["report"]) as f:
        report = json.load(f)
    lines = []
    for part in ("language_model", "vision_tower", "processor"):
        size = sum(os.path.getsize(os.path.join(folder, name)) for folder, _, names in os.walk(paths[part])
                   for name in names)
        lines.append(f"  {part:<15} {size / 1e6:6.2f} MB   {paths[part]}")
    vision, language = report["vision_encoder"], report["language_model"]
    lines.append(f"  language model: text-only ceiling {100 * language['text_only_accuracy']:.1f}% "
                 f"({language['held_out_questions']} held-out questions)")
    lines.append("  vision encoder: " + ", ".join(
        f"{key.removesuffix('_accuracy').replace('_', ' ')} {100 * vision[key]:.1f}%"
        for key in ("cell_color_accuracy", "cell_shape_accuracy", "word_accuracy", "count_accuracy",
                    "patch_word_accuracy", "covered_patch_word_accuracy")))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, str]:
    parser = HfArgumentParser((FoundationArguments, FoundationRecipe))
    args, recipe = parser.parse_args_into_dataclasses(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.quick:
        recipe = replace(QUICK_RECIPE, seed=recipe.seed)
    elif args.shipped is not None:
        recipe = SHIPPED_RECIPES[args.shipped]
    if args.ship:
        if recipe not in SHIPPED_RECIPES.values():
            raise ValueError(f"Only the recipes of SHIPPED_RECIPES ship with the package ({', '.join(SHIPPED_RECIPES)}"
                             "); change its entry (or add one) first, so that the tests check it.")
        paths = ship_foundation(recipe, args.cache_dir)
        print(f"Shipped recipe {recipe.key()} into {os.path.dirname(paths['report'])}:")
    else:
        paths = build_foundation(recipe, args.cache_dir)
        print(f"Recipe {recipe.key()}:")
    print(describe(paths))
    print(json.dumps(paths, indent=1))
    return paths


if __name__ == "__main__":
    main()
