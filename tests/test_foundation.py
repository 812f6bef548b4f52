import collections
import json
import os
import random
from dataclasses import asdict, replace

import pytest
import torch
from transformers import AutoTokenizer, CLIPVisionModel, LlamaForCausalLM

from sts_trainer.lab import foundation
from sts_trainer.lab.foundation import (QUICK_RECIPE, SHIPPED_RECIPES, AttributeHeads, build_foundation, scene_targets,
                                        world_texts)
from sts_trainer.lab.synthetic import PATCH_WORDS, Scene, Shape, build_tokenizer_and_processor


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = tmp_path_factory.mktemp("foundation")
    return cache, build_foundation(QUICK_RECIPE, str(cache), use_shipped=False)


def test_build_saves_loadable_models_and_a_report(built):
    cache, paths = built
    assert paths["language_model"].startswith(os.path.join(str(cache), f"language-{QUICK_RECIPE.key('language')}"))
    assert paths["vision_tower"].startswith(os.path.join(str(cache), f"vision-{QUICK_RECIPE.key('vision')}"))
    model = LlamaForCausalLM.from_pretrained(paths["language_model"])
    tokenizer = AutoTokenizer.from_pretrained(paths["language_model"])
    assert model.config.hidden_size == QUICK_RECIPE.lm_hidden_size and len(tokenizer) == model.config.vocab_size
    vision = CLIPVisionModel.from_pretrained(paths["vision_tower"])
    assert vision.config.image_size == QUICK_RECIPE.image_size and vision.config.patch_size == QUICK_RECIPE.patch_size
    report = json.loads(open(paths["report"]).read())
    assert report["key"] == QUICK_RECIPE.key() and report["visual_tokens"] == 16
    for key in ("cell_color_accuracy", "cell_shape_accuracy", "word_accuracy", "count_accuracy"):
        assert 0.0 <= report["vision_encoder"][key] <= 1.0
    assert report["vision_encoder"]["feature_rms"] > 0.0
    assert 0.0 <= report["language_model"]["text_only_accuracy"] <= 1.0


def test_a_cached_build_is_reused_and_only_a_changed_model_rebuilt(built, monkeypatch):
    cache, paths = built
    before = os.stat(paths["report"]).st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("rebuilt a cached model")

    monkeypatch.setattr(foundation, "pretrain_vision", fail)
    monkeypatch.setattr(foundation, "pretrain_language_model", fail)
    assert build_foundation(QUICK_RECIPE, str(cache), use_shipped=False) == paths
    assert os.stat(paths["report"]).st_mtime_ns == before
    # a vision-only change: a new vision encoder, the cached language model
    monkeypatch.undo()
    monkeypatch.setattr(foundation, "pretrain_language_model", fail)
    other = replace(QUICK_RECIPE, feature_scale_weight=0.5)
    assert other.key() != QUICK_RECIPE.key() and other.key("language") == QUICK_RECIPE.key("language")
    rebuilt = build_foundation(other, str(cache), use_shipped=False)
    assert rebuilt["language_model"] == paths["language_model"] and rebuilt["vision_tower"] != paths["vision_tower"]
    assert CLIPVisionModel.from_pretrained(rebuilt["vision_tower"]).config.hidden_size == other.vision_hidden_size
    # a language-model change rebuilds it
    with pytest.raises(AssertionError, match="rebuilt"):
        build_foundation(replace(QUICK_RECIPE, lm_steps=4), str(cache), use_shipped=False)


def test_scene_targets_name_each_cell_the_word_and_the_count():
    scene = Scene((Shape("circle", "red", 1, 0, 2, -2, False), Shape("triangle", "blue", 0, 1, -2, 2, True)))
    colors, shapes, word, count = scene_targets(scene)[:4], scene_targets(scene)[4:8], *scene_targets(scene)[8:]
    # cells: top-left, top-right, bottom-left, bottom-right; 0 = empty
    assert colors == [0, 1, 3, 0] and shapes == [0, 1, 3, 0] and word == 0 and count == 2
    assert scene_targets(Scene((), "cat"))[8] == 1


def test_attribute_heads_read_each_region():
    heads = AttributeHeads(hidden_size=8, grid=4)
    patches = torch.zeros(2, 16, 8)
    outputs = heads(patches)
    assert len(outputs) == 11 and outputs[0].shape == (2, 7) and outputs[4].shape == (2, 4)
    assert outputs[10].shape == (2, 16, len(PATCH_WORDS))
    # a feature in the bottom-right cell changes only that cell's logits (and the all-token count)
    changed = patches.clone()
    changed.view(2, 4, 4, 8)[:, 2:, 2:] = 1.0
    after = heads(changed)
    moved = [k for k in range(11) if not torch.equal(outputs[k], after[k])]
    assert moved == [3, 7, 9, 10]  # its cell, the count, the patches


def test_world_texts_put_the_caption_where_the_image_goes():
    processor = build_tokenizer_and_processor(image_size=32, patch_size=8)
    texts = world_texts(processor, 6, "train", 0)
    chat, plain = texts[0], texts[1]
    assert chat[0].startswith("<s>USER: ") and chat[0].endswith("ASSISTANT:") and "<image>" not in chat[0]
    assert plain[1].endswith(".") and plain[0].startswith("<s>" + plain[1])  # caption, instruction, caption
    ids = foundation._encode(processor.tokenizer, [chat])[0]
    assert processor.tokenizer.unk_token_id not in ids.tolist() and ids[-1] == processor.tokenizer.eos_token_id



def test_world_texts_can_write_the_scene_as_its_patch_words():
    processor = build_tokenizer_and_processor(image_size=32, patch_size=8, with_patch_words=True)
    prompt, answer = world_texts(processor, 1, "train", 0, "patch_words", 32, 8)[0]
    scene = prompt.removeprefix("<s>USER: ").split("\n")[0].split()
    assert len(scene) == 16 and set(scene) <= set(PATCH_WORDS) and set(scene) != {"blank"}
    ids = foundation._encode(processor.tokenizer, [(prompt, answer)])[0]
    assert processor.tokenizer.unk_token_id not in ids.tolist()
    with pytest.raises(ValueError, match="scene_text"):
        world_texts(processor, 1, "train", 0, "pixels")


def test_varied_patch_words_have_no_fixed_layout():
    """'patch_words_varied': a subset of a quarter to all of the scene's patch words, in raster order or shuffled;
    over many texts the count and the order both vary, and every word is one of the scene's, at most once."""
    rng = random.Random(0)
    words = [f"w{i}" for i in range(16)]
    counts, shuffled = set(), 0
    for _ in range(400):
        kept = foundation.varied_patch_words(words, rng)
        assert 4 <= len(kept) <= 16 and len(set(kept)) == len(kept) and set(kept) <= set(words)
        counts.add(len(kept))
        shuffled += kept != sorted(kept, key=words.index)
    assert counts == set(range(4, 17))
    assert 150 < shuffled < 250  # about half, a few raster-ordered subsets of length 1 or 0 aside

    processor = build_tokenizer_and_processor(image_size=32, patch_size=8, with_patch_words=True)
    full = world_texts(processor, 40, "train", 0, "patch_words", 32, 8)
    varied = world_texts(processor, 40, "train", 0, "patch_words_varied", 32, 8)
    lengths = set()
    for (prompt, answer), (full_prompt, full_answer) in zip(varied, full):
        assert answer == full_answer  # the same scenes and questions; only the scene's words differ
        if prompt.startswith("<s>USER: "):  # a question (chat template): the scene is the user turn's first line
            scene = prompt.removeprefix("<s>USER: ").split("\n")[0].split()
            whole = full_prompt.removeprefix("<s>USER: ").split("\n")[0].split()
            assert len(whole) == 16 and collections.Counter(scene) <= collections.Counter(whole)
            lengths.add(len(scene))
    assert len(lengths) > 3 and max(lengths) <= 16 and min(lengths) >= 4
    assert foundation.EXPERIMENT_RECIPES["deep_no_layout"].key("vision") == SHIPPED_RECIPES["deep"].key("vision")
    assert foundation.EXPERIMENT_RECIPES["deep_no_layout"].key("language") != SHIPPED_RECIPES["deep"].key("language")


# ---- the pairs shipped with the package ------------------------------------------------------------------------------


def test_the_shipped_pairs_are_todays_recipes():
    """A change of the default recipe, QUICK_RECIPE or FOUNDATION_VERSION without `--ship` fails here."""
    shipped = sorted(os.listdir(foundation.SHIPPED_DIR))
    assert shipped == sorted(recipe.key() for recipe in foundation.SHIPPED_RECIPES.values())
    for recipe in foundation.SHIPPED_RECIPES.values():
        manifest = json.loads(open(os.path.join(foundation.SHIPPED_DIR, recipe.key(), foundation.MANIFEST)).read())
        assert manifest["key"] == recipe.key() and manifest["recipe"] == asdict(recipe)
        assert manifest["language_key"] == recipe.key("language") and manifest["vision_key"] == recipe.key("vision")


@pytest.mark.parametrize("name", sorted(foundation.SHIPPED_RECIPES))
def test_the_shipped_files_load_and_check_out(name):
    recipe = foundation.SHIPPED_RECIPES[name]
    paths = foundation.shipped_foundation(recipe)
    assert paths is not None and build_foundation(recipe, "/nonexistent") == paths
    model = LlamaForCausalLM.from_pretrained(paths["language_model"])
    assert model.config.num_hidden_layers == recipe.lm_layers and model.config.hidden_size == recipe.lm_hidden_size
    assert len(AutoTokenizer.from_pretrained(paths["language_model"])) == model.config.vocab_size
    vision = CLIPVisionModel.from_pretrained(paths["vision_tower"])
    assert vision.config.image_size == recipe.image_size and vision.config.hidden_size == recipe.vision_hidden_size
    report = json.loads(open(paths["report"]).read())
    assert report["key"] == recipe.key() and 0.0 <= report["language_model"]["text_only_accuracy"] <= 1.0


def test_the_shipped_files_stay_small():
    total = sum(os.path.getsize(os.path.join(folder, name))
                for folder, _, names in os.walk(foundation.SHIPPED_DIR) for name in names)
    assert total < 10e6


def test_import_sts_trainer_reads_no_shipped_file():
    code = ("import sys\nopened = []\n"
            "sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == 'open' else None)\n"
            "import sts_trainer, sts_trainer.lab.foundation, sts_trainer.lab.demo\n"
            "print(sum('foundation_models' in f for f in opened), len(opened) > 0)")
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["0", "True"]  # files were opened (the audit hook works), none of the shipped ones


def _copy_shipped(tmp_path, recipe):
    import shutil

    root = tmp_path / "shipped"
    shutil.copytree(os.path.join(foundation.SHIPPED_DIR, recipe.key()), root / recipe.key())
    return root


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_a_damaged_shipped_file_falls_back_to_a_build_with_a_warning_naming_it(tmp_path, monkeypatch, damage):
    root = _copy_shipped(tmp_path, QUICK_RECIPE)
    weights = root / QUICK_RECIPE.key() / "vision_tower" / "model.safetensors"
    if damage == "missing":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    monkeypatch.setattr(foundation, "SHIPPED_DIR", str(root))
    with pytest.warns(UserWarning, match=f"{weights}.*{'is missing' if damage == 'missing' else 'corrupt'}"):
        paths = build_foundation(QUICK_RECIPE, str(tmp_path / "cache"))
    assert paths["vision_tower"].startswith(str(tmp_path / "cache"))  # built (and cached) instead
    assert CLIPVisionModel.from_pretrained(paths["vision_tower"]).config.hidden_size == QUICK_RECIPE.vision_hidden_size


def test_ship_writes_the_pair_with_its_manifest_and_drops_stale_pairs(tmp_path, built, monkeypatch):
    cache, paths = built
    root = tmp_path / "shipped"
    (root / "0123456789abcdef").mkdir(parents=True)  # a pair of a recipe no longer shipped

    def fail(*args, **kwargs):
        raise AssertionError("rebuilt a cached model")

    monkeypatch.setattr(foundation, "pretrain_vision", fail)
    monkeypatch.setattr(foundation, "pretrain_language_model", fail)
    shipped = foundation.ship_foundation(QUICK_RECIPE, str(cache), str(root))
    assert sorted(os.listdir(root)) == [QUICK_RECIPE.key()]
    assert shipped["language_model"] == str(root / QUICK_RECIPE.key() / "language_model")
    manifest = json.loads((root / QUICK_RECIPE.key() / foundation.MANIFEST).read_text())
    assert "vision_tower/model.safetensors" in manifest["files"] and manifest["key"] == QUICK_RECIPE.key()
    assert "text-only ceiling" in foundation.describe(shipped)
