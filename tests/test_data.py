import json
import logging
import os
import re
import shutil

import pytest
import torch
from transformers import HfArgumentParser

from sts_trainer.lab.synthetic import build_tokenizer_and_processor, tiny_llava_for, write_dataset
from sts_trainer.llava.data import (
    CHAT_TEMPLATE,
    IGNORE_INDEX,
    DataArguments,
    LazyLlavaDataset,
    LlavaDataCollator,
    ModalityLengthGroupedSampler,
    resolve_chat_template,
    to_messages,
)

TOKENS_PER_IMAGE = (32 // 8) ** 2
NO_GENERATION_TEMPLATE = CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")


@pytest.fixture(scope="module")
def processor():
    return build_tokenizer_and_processor(image_size=32, patch_size=8)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small synthetic data set, plus files for the bad cases: a copy of an image outside the image folder, a file
    that is not an image and a PNG cut in half (its header reads, its pixels do not)."""
    root = tmp_path_factory.mktemp("world")
    paths = write_dataset(str(root), 12, split="train", seed=0, stage="instruction")
    paths["alignment_path"] = write_dataset(str(root), 6, split="train", seed=0, stage="alignment")["data_path"]
    paths["records"] = json.load(open(paths["data_path"]))
    good_image = os.path.join(paths["image_folder"], paths["records"][0]["image"])
    shutil.copy(good_image, root / "outside.png")
    with open(os.path.join(paths["image_folder"], "junk.png"), "w") as f:
        f.write("not an image")
    with open(good_image, "rb") as f:
        data = f.read()
    with open(os.path.join(paths["image_folder"], "cut.png"), "wb") as f:
        f.write(data[: len(data) // 2])
    paths["root"] = str(root)
    return paths


def write(path, records, jsonl=False):
    with open(path, "w") as f:
        if jsonl:
            f.writelines(json.dumps(r) + "\n" for r in records)
        else:
            json.dump(records, f)
    return str(path)


def sample(sample_id, images, question="What color is the circle?", answer="red"):
    images = [images] if isinstance(images, str) else images
    prompt = "<image>\n" * len(images) + question
    return {
        "id": sample_id,
        "image": images if len(images) != 1 else images[0],
        "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}],
    }


def dataset(world, processor, records, tmp_path, jsonl=False, **kwargs):
    path = write(tmp_path / ("data.jsonl" if jsonl else "data.json"), records, jsonl)
    return LazyLlavaDataset(path, processor, image_folder=world["image_folder"], **kwargs)


def test_labels_are_the_answer_and_end_of_turn_only(world, processor):
    ds = LazyLlavaDataset(world["data_path"], processor, image_folder=world["image_folder"])
    tokenizer = processor.tokenizer
    assert len(ds) == 12 and not ds.skipped
    for item, record in zip(ds, world["records"]):
        answer = record["conversations"][1]["value"]
        labelled = item["labels"] != IGNORE_INDEX
        assert torch.equal(item["labels"][labelled], item["input_ids"][labelled])
        assert tokenizer.decode(item["labels"][labelled], skip_special_tokens=True) == answer
        assert item["labels"][labelled][-1] == tokenizer.eos_token_id
        assert labelled.sum() == len(tokenizer(answer, add_special_tokens=False)["input_ids"]) + 1
        assert (item["input_ids"] == processor.image_token_id).sum() == TOKENS_PER_IMAGE
        assert item["pixel_values"].shape == (1, 3, 32, 32)
        assert item["attention_mask"].sum() == len(item["input_ids"])


def test_items_equal_the_processor_chat_template_output(world, processor):
    ds = LazyLlavaDataset(world["data_path"], processor, image_folder=world["image_folder"])
    record = world["records"][0]
    messages = to_messages(record["conversations"])
    image_path = os.path.join(world["image_folder"], record["image"])
    messages[0]["content"][0]["path"] = image_path
    reference = processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt"
    )
    item = ds[0]
    assert torch.equal(item["input_ids"], reference["input_ids"][0])
    assert torch.equal(item["labels"] != IGNORE_INDEX, reference["assistant_masks"][0].bool())
    assert torch.allclose(item["pixel_values"], reference["pixel_values"])


def test_plain_format_labels_the_caption(world, processor):
    ds = LazyLlavaDataset(
        world["alignment_path"], processor, image_folder=world["image_folder"], conversation_format="plain"
    )
    tokenizer = processor.tokenizer
    for item, record in zip(ds, json.load(open(world["alignment_path"]))):
        instruction, caption = (turn["value"] for turn in record["conversations"])
        text = tokenizer.decode(item["input_ids"][item["input_ids"] != processor.image_token_id])
        assert "USER:" not in text and "ASSISTANT:" not in text
        labels = item["labels"][item["labels"] != IGNORE_INDEX]
        assert tokenizer.decode(labels, skip_special_tokens=True) == tokenizer.decode(
            tokenizer(caption, add_special_tokens=False)["input_ids"]
        )
        assert (item["input_ids"] == processor.image_token_id).sum() == TOKENS_PER_IMAGE


def test_json_and_jsonl_give_the_same_items(world, processor, tmp_path):
    records = world["records"][:4]
    from_json = dataset(world, processor, records, tmp_path)
    from_jsonl = dataset(world, processor, records, tmp_path, jsonl=True)
    assert len(from_json) == len(from_jsonl) == 4
    for a, b in zip(from_json, from_jsonl):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_multi_image_and_text_only_samples_collate(world, processor, tmp_path):
    first, second = (r["image"] for r in world["records"][:2])
    records = [
        sample("two", [first, second], "Is the red circle in the first image?", "yes"),
        {"id": "text", "conversations": [{"from": "human", "value": "What color is the circle?"},
                                         {"from": "gpt", "value": "blue"}]},
        world["records"][2],
    ]
    ds = dataset(world, processor, records, tmp_path)
    items = [ds[i] for i in range(3)]
    assert (items[0]["input_ids"] == processor.image_token_id).sum() == 2 * TOKENS_PER_IMAGE
    assert items[0]["pixel_values"].shape == (2, 3, 32, 32)
    assert "pixel_values" not in items[1] and processor.image_token_id not in items[1]["input_ids"]
    lengths = [len(item["input_ids"]) for item in items]
    assert ds.modality_lengths() == [lengths[0], -lengths[1], lengths[2]]

    pad = processor.tokenizer.pad_token_id
    for side in ("right", "left"):
        batch = LlavaDataCollator(pad, padding_side=side)(items)
        assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, max(lengths))
        assert batch["pixel_values"].shape == (3, 3, 32, 32)
        assert torch.equal(batch["pixel_values"][:2], items[0]["pixel_values"])
        assert torch.equal(batch["pixel_values"][2:], items[2]["pixel_values"])
        for row, (item, n) in enumerate(zip(items, lengths)):
            kept = slice(0, n) if side == "right" else slice(max(lengths) - n, max(lengths))
            assert torch.equal(batch["input_ids"][row, kept], item["input_ids"])
            assert torch.equal(batch["labels"][row, kept], item["labels"])
            assert batch["attention_mask"][row].sum() == n
            padding = batch["attention_mask"][row] == 0
            assert (batch["input_ids"][row, padding] == pad).all()
            assert (batch["labels"][row, padding] == IGNORE_INDEX).all()
    assert "pixel_values" not in LlavaDataCollator(pad)([items[1]])
    with pytest.raises(ValueError, match="padding_side"):
        LlavaDataCollator(pad, padding_side="middle")


BAD_CASES = {
    "missing image": lambda w: sample("bad", "train/nowhere.png"),
    "unreadable image": lambda w: sample("bad", "junk.png"),
    "outside image_folder": lambda w: sample("bad", "../outside.png"),
    "absolute path outside": lambda w: sample("bad", os.path.join(w["root"], "outside.png")),
    "more <image> than images": lambda w: {**sample("bad", w["records"][0]["image"]), "conversations": [
        {"from": "human", "value": "<image>\n<image>\nWhat color?"}, {"from": "gpt", "value": "red"}]},
    "image without <image>": lambda w: {**sample("bad", w["records"][0]["image"]), "conversations": [
        {"from": "human", "value": "What color?"}, {"from": "gpt", "value": "red"}]},
    "no assistant turn": lambda w: {**sample("bad", w["records"][0]["image"]), "conversations": [
        {"from": "human", "value": "<image>\nWhat color?"}]},
    "bad format": lambda w: {"id": "bad", "image": w["records"][0]["image"], "conversation": []},
}
BAD_REASONS = {
    "missing image": "missing image", "unreadable image": "unreadable image",
    "outside image_folder": "image outside image_folder", "absolute path outside": "image outside image_folder",
    "more <image> than images": "image count mismatch", "image without <image>": "image count mismatch",
    "no assistant turn": "no assistant turn", "bad format": "bad format",
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_sample_raises_naming_it(world, processor, tmp_path, case):
    records = [world["records"][0], BAD_CASES[case](world)]
    with pytest.raises(ValueError) as error:
        dataset(world, processor, records, tmp_path)
    message = str(error.value)
    assert "id='bad'" in message and "index 1" in message
    assert BAD_REASONS[case] in message and "To fix:" in message and "--skip_bad_samples" in message


def test_jsonl_errors_name_the_line(world, processor, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(world["records"][0]) + "\n\n" + json.dumps(sample("bad", "train/nowhere.png")) + "\n")
    with pytest.raises(ValueError, match=r"id='bad' \(index 1, line 3 of"):
        LazyLlavaDataset(str(path), processor, image_folder=world["image_folder"])
    path.write_text(json.dumps(world["records"][0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"index 1, line 2 of .*bad format"):
        LazyLlavaDataset(str(path), processor, image_folder=world["image_folder"])


def test_truncation_through_image_tokens_raises(world, processor, tmp_path):
    records = [sample("long", world["records"][0]["image"], question="What color is the circle?")]
    records[0]["conversations"][0]["value"] = "What color is the circle on the left of the picture?\n<image>"
    with pytest.raises(ValueError, match="id='long'.*truncated through image tokens"):
        dataset(world, processor, records, tmp_path, model_max_length=TOKENS_PER_IMAGE)


def test_truncation_after_the_images_keeps_the_sample(world, processor, tmp_path):
    record = world["records"][0]
    full = dataset(world, processor, [record], tmp_path)[0]
    cut = dataset(world, processor, [record], tmp_path, model_max_length=len(full["input_ids"]) - 1)[0]
    assert torch.equal(cut["input_ids"], full["input_ids"][:-1])
    assert torch.equal(cut["labels"], full["labels"][:-1])  # the answer stays, the end-of-turn token is cut
    assert (cut["labels"] != IGNORE_INDEX).sum() >= 1
    answer_start = int((full["labels"] != IGNORE_INDEX).nonzero()[0])
    with pytest.raises(ValueError, match="no answer tokens"):
        dataset(world, processor, [record], tmp_path, model_max_length=answer_start)


def test_skip_mode_leaves_bad_samples_out_and_counts_them(world, processor, tmp_path):
    records = [world["records"][0]]
    for n, case in enumerate(BAD_CASES):
        records.append({**BAD_CASES[case](world), "id": f"bad-{n}"})
    records.append(world["records"][1])
    ds = dataset(world, processor, records, tmp_path, skip_bad_samples=True)
    assert len(ds) == 2
    assert [index for index, _, _ in ds.skipped] == list(range(1, len(BAD_CASES) + 1))
    assert [sample_id for _, sample_id, _ in ds.skipped] == [f"bad-{n}" for n in range(len(BAD_CASES))]
    for (_, _, reason), case in zip(ds.skipped, BAD_CASES):
        assert reason.startswith(BAD_REASONS[case])
    report = ds.skip_report()
    assert f"Skipped {len(BAD_CASES)} of {len(records)} samples" in report
    assert "image count mismatch: 2" in report and "image outside image_folder: 2" in report
    assert all(item["input_ids"].numel() for item in ds)


def test_corrupt_image_found_on_access(world, processor, tmp_path):
    records = [sample("cut", "cut.png"), world["records"][1]]
    strict = dataset(world, processor, records, tmp_path)  # the header reads, so it passes the check
    with pytest.raises(ValueError, match="id='cut'.*unreadable image"):
        strict[0]
    lenient = dataset(world, processor, records, tmp_path, skip_bad_samples=True)
    assert torch.equal(lenient[0]["input_ids"], strict[1]["input_ids"])  # replaced by the next good item
    assert [(index, sample_id) for index, sample_id, _ in lenient.skipped] == [(0, "cut")]


def test_all_bad_is_an_error(world, processor, tmp_path):
    with pytest.raises(ValueError, match="No usable sample"):
        dataset(world, processor, [sample("bad", "junk.png")], tmp_path, skip_bad_samples=True)


def test_template_without_generation_block_is_refused(world, processor):
    template = processor.chat_template
    processor.chat_template = NO_GENERATION_TEMPLATE
    try:
        with pytest.raises(ValueError, match="generation.*--chat_template auto, llava or path/to/template.jinja"):
            LazyLlavaDataset(world["data_path"], processor, image_folder=world["image_folder"])
    finally:
        processor.chat_template = template


def test_chat_template_choices(tmp_path, caplog):
    own = CHAT_TEMPLATE.replace("USER:", "User:")  # a processor's own template, with a generation block
    with caplog.at_level(logging.WARNING, logger="sts_trainer"):
        assert resolve_chat_template("auto", own) == resolve_chat_template("processor", own) == own
        assert resolve_chat_template("llava", own) == resolve_chat_template("llava", None) == CHAT_TEMPLATE
    assert not caplog.records
    for template in (NO_GENERATION_TEMPLATE, None):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="sts_trainer"):
            assert resolve_chat_template("auto", template) == CHAT_TEMPLATE
        assert len(caplog.records) == 1 and "--chat_template auto" in caplog.records[0].getMessage()
        assert "CHAT_TEMPLATE" in caplog.records[0].getMessage()
        with pytest.raises(ValueError, match="--chat_template processor: .*--chat_template auto or llava"):
            resolve_chat_template("processor", template)

    path = tmp_path / "template.jinja"
    path.write_text(own)
    assert DataArguments(chat_template=str(path)).chat_template == str(path)
    assert resolve_chat_template(str(path), NO_GENERATION_TEMPLATE) == own
    path.write_text(NO_GENERATION_TEMPLATE)
    with pytest.raises(ValueError, match=re.escape(f"{path} (--chat_template) has no {{% generation %}} block")):
        DataArguments(chat_template=str(path))
    with pytest.raises(ValueError, match="--chat_template 'vicuna' is neither one of .*'llava'.* nor a file"):
        DataArguments(chat_template="vicuna")
    (args,) = HfArgumentParser(DataArguments).parse_args_into_dataclasses(["--chat_template", "llava"])
    assert args.chat_template == "llava" and DataArguments().chat_template == "auto"
    assert "'processor'" in HfArgumentParser(DataArguments).format_help()  # argparse %-formats help texts


def test_modality_grouped_sampler_keeps_each_group_to_one_modality():
    lengths = [5, -3, 7, -2, 9, 4, -8, 6, 1, -1, 2]
    sampler = ModalityLengthGroupedSampler(lengths, group_size=2, generator=torch.Generator().manual_seed(0))
    order = list(sampler)
    assert sorted(order) == list(range(len(lengths))) and len(sampler) == len(lengths)
    full_groups = [order[i : i + 2] for i in range(0, len(order) - 2, 2)]  # the last two may mix modalities
    for group in full_groups:
        assert len({lengths[i] > 0 for i in group}) == 1
        assert abs(lengths[group[0]]) >= abs(lengths[group[1]])


def test_data_arguments_parse_from_the_command_line():
    (args,) = HfArgumentParser(DataArguments).parse_args_into_dataclasses(
        ["--data_path", "d.json", "--image_folder", "img", "--model_max_length", "64", "--skip_bad_samples",
         "--conversation_format", "plain", "--group_by_modality_length"]
    )
    assert (args.data_path, args.image_folder, args.model_max_length) == ("d.json", "img", 64)
    assert args.skip_bad_samples and args.group_by_modality_length and args.conversation_format == "plain"
    assert args.eval_data_path is None
    with pytest.raises(ValueError, match="model_max_length"):
        DataArguments(model_max_length=0)
    with pytest.raises(ValueError, match="conversation_format"):
        DataArguments(conversation_format="vicuna")
    with pytest.raises(SystemExit):
        HfArgumentParser(DataArguments).parse_args_into_dataclasses(["--conversation_format", "vicuna"])


def test_datasets_from_arguments(world, processor, tmp_path):
    eval_path = write(tmp_path / "eval.jsonl", world["records"][:3], jsonl=True)
    args = DataArguments(data_path=world["data_path"], eval_data_path=eval_path, image_folder=world["image_folder"],
                         model_max_length=64)
    train = LazyLlavaDataset.from_arguments(args, processor)
    evaluation = LazyLlavaDataset.from_arguments(args, processor, evaluation=True)
    assert (len(train), len(evaluation)) == (12, 3)
    assert train.model_max_length == evaluation.model_max_length == 64


def test_tiny_llava_trains_on_a_collated_batch(world, processor, tmp_path):
    first, second = (r["image"] for r in world["records"][:2])
    records = [*world["records"][:3], sample("two", [first, second], "Is there a red circle?", "no")]
    ds = dataset(world, processor, records, tmp_path)
    batch = LlavaDataCollator(processor.tokenizer.pad_token_id)([ds[i] for i in range(len(ds))])
    model = tiny_llava_for(processor, num_layers=2, hidden_size=32)
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    projector = model.model.multi_modal_projector
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in projector.parameters())
