import hashlib
import json
import os
from collections import Counter

import pytest
from transformers import AutoProcessor, AutoTokenizer, LlavaProcessor

from sts_trainer.lab.synthetic import (
    CATEGORIES,
    COLORS,
    Scene,
    Shape,
    build_tokenizer_and_processor,
    generate,
    render,
    tiny_llava_config_for,
    tiny_llava_for,
    write_dataset,
)


@pytest.fixture(scope="module")
def processor():
    return build_tokenizer_and_processor(image_size=32, patch_size=8)


def files_digest(folder):
    digests = {}
    for root, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                digests[os.path.relpath(os.path.join(root, name), folder)] = hashlib.md5(f.read()).hexdigest()
    return digests


def test_write_dataset_is_llava_format_and_deterministic(tmp_path):
    first = write_dataset(str(tmp_path / "a"), 24, split="train", seed=3, stage="instruction")
    second = write_dataset(str(tmp_path / "b"), 24, split="train", seed=3, stage="instruction")
    records = json.load(open(first["data_path"]))
    assert records == json.load(open(second["data_path"]))
    assert files_digest(first["image_folder"]) == files_digest(second["image_folder"])
    assert len(records) == 24
    questions = [json.loads(line) for line in open(first["questions_path"])]
    for record, question in zip(records, questions):
        assert set(record) == {"id", "image", "conversations"}
        assert os.path.isfile(os.path.join(first["image_folder"], record["image"]))
        human, gpt = record["conversations"]
        assert (human["from"], gpt["from"]) == ("human", "gpt")
        assert human["value"] == "<image>\n" + question["question"]
        assert gpt["value"] == question["answer"] and " " not in question["answer"]
        assert set(question) == {"id", "image", "question", "answer", "category"}
        assert (question["id"], question["image"]) == (record["id"], record["image"])
    assert Counter(q["category"] for q in questions) == dict.fromkeys(CATEGORIES, 4)


def test_alignment_stage_pairs_an_instruction_with_the_caption(tmp_path):
    paths = write_dataset(str(tmp_path), 6, split="train", seed=0, stage="alignment")
    for record, sample in zip(json.load(open(paths["data_path"])), generate(6, "train", 0)):
        human, gpt = record["conversations"]
        assert human["value"].startswith("<image>\n") and len(human["value"]) > len("<image>\n")
        assert gpt["value"] == sample.caption and gpt["value"].endswith(".")


def test_different_seeds_write_different_images(tmp_path):
    a = write_dataset(str(tmp_path), 6, split="train", seed=0)
    b = write_dataset(str(tmp_path), 6, split="train", seed=1)
    images = [{r["image"] for r in json.load(open(paths["data_path"]))} for paths in (a, b)]
    assert not images[0] & images[1]


def test_splits_never_share_a_scene():
    train = {repr(s.scene) for s in generate(600, "train", seed=0)}
    for split in ("val", "test"):
        held_out = {repr(s.scene) for s in generate(200, split, seed=0)}
        assert not train & held_out
    with pytest.raises(ValueError, match="split"):
        generate(1, "dev")


def test_yes_no_answers_are_balanced():
    samples = generate(240, "train", seed=0)
    for category in ("existence", "spatial"):
        answers = Counter(s.answer for s in samples if s.category == category)
        assert answers["yes"] + answers["left"] == answers["no"] + answers["right"]


def test_answers_match_the_pixels():
    # The colour at a shape's centre is the colour its question names.
    for sample in generate(60, "test", seed=1):
        if sample.category != "color":
            continue
        image = render(sample.scene, 32)
        (shape,) = [s for s in sample.scene.shapes if f"the {s.kind}?" in sample.question]
        assert shape.color == sample.answer
        x = (shape.column + 0.5) * 16 + shape.dx * 2
        y = (shape.row + 0.5) * 16 + shape.dy * 2
        assert image.getpixel((int(x), int(y))) == COLORS[sample.answer]


def test_tokenizer_covers_every_text_of_the_world(processor):
    tokenizer = processor.tokenizer
    samples = generate(600, "train", seed=0)
    texts = [t for s in samples for t in (s.question, s.answer, s.caption)]
    texts += ["Describe the image.", "What is in the picture?", "Give a short description of the image."]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids, text
    assert tokenizer.decode(tokenizer("Is there a red circle?", add_special_tokens=False)["input_ids"]) == (
        "is there a red circle ?"
    )


def test_processor_expands_image_and_reloads_offline(tmp_path, processor):
    out = str(tmp_path / "processor")
    build_tokenizer_and_processor(out, image_size=32, patch_size=8)
    reloaded = AutoProcessor.from_pretrained(out, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert isinstance(reloaded, LlavaProcessor)
    assert tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert reloaded.image_token_id == processor.image_token_id == tokenizer.convert_tokens_to_ids("<image>")
    sample = generate(1, "train", 0)[0]
    messages = [{"role": "user", "content": [{"type": "image", "image": render(sample.scene)},
                                             {"type": "text", "text": "\n" + sample.question}]}]
    prompt = reloaded.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == f"<s>USER: <image>\n{sample.question} ASSISTANT:"
    inputs = reloaded.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                          return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 32, 32)
    assert (inputs["input_ids"] == reloaded.image_token_id).sum() == (32 // 8) ** 2


def test_bad_image_size_is_refused():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        build_tokenizer_and_processor(image_size=30, patch_size=8)


def test_tiny_llava_matches_the_processor(processor):
    config = tiny_llava_config_for(processor, num_layers=2, hidden_size=32)
    assert config.image_token_id == processor.image_token_id
    assert config.text_config.vocab_size == len(processor.tokenizer)
    assert config.text_config.pad_token_id == processor.tokenizer.pad_token_id
    assert config.image_seq_length == (32 // 8) ** 2
    model = tiny_llava_for(processor, num_layers=2, hidden_size=32)
    assert model.config.text_config.num_hidden_layers == 2


def test_patch_words_name_what_covers_each_patch():
    from sts_trainer.lab.synthetic import PATCH_WORDS, patch_words

    # a big square, half side 64/8 + 64/32 = 10 pixels, centred at 16 + 8 = 24: pixels 14..34 in both directions
    scene = Scene((Shape("square", "red", 0, 0, 2, 2, True),))
    words = patch_words(scene, 64, 4)
    assert len(words) == 256 and set(words) == {"blank", "red_square"}
    grid = [words[r * 16 : (r + 1) * 16] for r in range(16)]
    covered = [(r, c) for r in range(16) for c in range(16) if grid[r][c] == "red_square"]
    # 4-pixel patches 3..8 (pixels 12..35) hold at least a quarter of square (patch 3 at the corner: 2 x 2 of 4 x 4
    # pixels, exactly a quarter); patch 9 (36..39) none
    assert covered == [(r, c) for r in range(3, 9) for c in range(3, 9)]
    text = patch_words(Scene((), "cat"), 64, 4)
    assert {w for w in text if w != "blank"} == {"text_cat"}
    assert all(w == "blank" for w in text[128:])  # the word is written in the top half
    assert set(PATCH_WORDS) >= set(words) | set(text)


def test_patch_words_join_the_vocabulary_only_when_asked():
    from sts_trainer.lab.synthetic import PATCH_WORDS

    plain = build_tokenizer_and_processor(image_size=32, patch_size=8)
    with_words = build_tokenizer_and_processor(image_size=32, patch_size=8, with_patch_words=True)
    assert len(with_words.tokenizer) == len(plain.tokenizer) + len(PATCH_WORDS)
    ids = with_words.tokenizer(" ".join(PATCH_WORDS), add_special_tokens=False)["input_ids"]
    assert len(ids) == len(PATCH_WORDS) and with_words.tokenizer.unk_token_id not in ids
    # the other words keep their ids
    assert with_words.tokenizer("red circle")["input_ids"] == plain.tokenizer("red circle")["input_ids"]
