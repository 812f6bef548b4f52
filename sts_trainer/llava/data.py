"""LLaVA-format data: a JSON / JSONL file and an image folder -> a lazily processed dataset, its collator and sampler.

    data_args = DataArguments(data_path="llava_v1_5_mix665k.json", image_folder="images", skip_bad_samples=True)
    train_dataset = LazyLlavaDataset.from_arguments(data_args, processor)
    collator = LlavaDataCollator(pad_token_id=processor.tokenizer.pad_token_id)
    ...
    print(train_dataset.skip_report())

A sample is `{"id": ..., "image": "a.png" | ["a.png", "b.png"] | absent, "conversations": [{"from": "human",
"value": "<image>\\nWhat is this?"}, {"from": "gpt", "value": "A cat."}, ...]}` with one `<image>` in the text per
image. Rows are read into a `datasets.Dataset` and checked once up front (text, file paths and image headers); images
are decoded and text tokenised per item on access.
"""

import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field

import datasets
import torch
from PIL import Image
from transformers import ProcessorMixin

logger = logging.getLogger("sts_trainer")

IGNORE_INDEX = -100
IMAGE_TOKEN = "<image>"  # LLaVA's placeholder in the data's text, one per image
ROLES = {"human": "user", "gpt": "assistant", "system": "system"}  # LLaVA's `from` -> chat role
CONVERSATION_FORMATS = ("chat", "plain")
CONVERSATION_FORMAT_CHOICES = ("auto", *CONVERSATION_FORMATS)
CHAT_TEMPLATE_CHOICES = ("auto", "llava", "processor")  # or the path of a Jinja file
_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")
PADDING_SIDES = ("right", "left")

# Renders a message's content: a string, or a list of {"type": "image"} / {"type": "text", "text"} blocks.
_RENDER_CONTENT = (
    "{% macro render(content) %}{% if content is string %}{{ content }}{% else %}{% for block in content %}"
    "{% if block['type'] == 'image' %}<image>{% elif block['type'] == 'text' %}{{ block['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% endmacro %}"
)
# LLaVA-1.5 style: "<s>USER: <image>\nQuestion? ASSISTANT: Answer</s>USER: ...". The {% generation %} block marks
# the tokens that get labels: each assistant reply and its end-of-turn token.
CHAT_TEMPLATE = _RENDER_CONTENT + (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {{ render(message['content']) }} "
    "{% elif message['role'] == 'assistant' %}"
    "ASSISTANT: {% generation %}{{ render(message['content']) }}{{ eos_token }}{% endgeneration %}"
    "{% else %}{{ render(message['content']) }} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
# LLaVA's pretraining format for alignment: the prompt (image and instruction) then the caption, no role markers.
PLAIN_TEMPLATE = _RENDER_CONTENT + (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ render(message['content']) }}{{ eos_token }}{% endgeneration %}"
    "{% else %}{{ render(message['content']) }}\n{% endif %}{% endfor %}"
)


@dataclass
class DataArguments:
    """Where the training data is and how it becomes token sequences."""

    data_path: str | None = field(
        default=None,
        metadata={
            "help": "Training data in LLaVA format: a JSON list, or JSONL with one sample per line, of "
            "{'id', 'image' (a path, a list of paths, or absent for text-only), 'conversations': [{'from': "
            "'human'|'gpt'|'system', 'value': text}]}, with one '<image>' in the text per image."
        },
    )
    image_folder: str | None = field(
        default=None,
        metadata={
            "help": "Folder that the data's image paths are relative to. A path that leads outside it ('../x.png', "
            "an absolute path elsewhere) is a bad sample. Default: the folder of the data file."
        },
    )
    eval_data_path: str | None = field(
        default=None, metadata={"help": "Optional evaluation data, same format and image folder as data_path."}
    )
    model_max_length: int = field(
        default=2048,
        metadata={
            "help": "Longest token sequence, image placeholders included. Longer samples lose their end; a sample "
            "whose image placeholders would be cut is a bad sample."
        },
    )
    conversation_format: str = field(
        default="auto",
        metadata={
            "help": "How conversations become text. 'chat': the processor's chat template (USER: ... ASSISTANT: "
            "...), labels on the assistant replies. 'plain': LLaVA's pretraining format for the alignment stage, the "
            "prompt followed by the caption, labels on the caption. 'auto': 'plain' for the alignment stage, 'chat' "
            "otherwise.",
            "choices": list(CONVERSATION_FORMAT_CHOICES),
        },
    )
    chat_template: str = field(
        default="auto",
        metadata={
            "help": "The chat template that turns conversations into text ('chat' format), saved with the processor "
            "in output_dir so that the next stage and inference use the same one. It must mark the assistant replies "
            "(the tokens that get labels) with a Jinja 'generation' block, which most hub processors' templates lack. "
            "'auto': the processor's template if it has such a block, else 'llava' (with a warning). 'llava': "
            "LLaVA-1.5's 'USER: ... ASSISTANT: ...' template (sts_trainer.llava.data.CHAT_TEMPLATE). 'processor': the "
            "processor's own; an error if it has no such block. Or the path of a Jinja file holding the template."
        },
    )
    skip_bad_samples: bool = field(
        default=False,
        metadata={
            "help": "Skip bad samples (missing, unreadable or out-of-folder image, '<image>' count not matching the "
            "images, no assistant turn, truncation through image tokens) instead of stopping with an error. Skips "
            "are counted with their reasons and reported."
        },
    )
    group_by_modality_length: bool = field(
        default=False,
        metadata={
            "help": "Build batches of image samples only or text-only samples only, of similar lengths (LLaVA's "
            "option of the same name; see ModalityLengthGroupedSampler)."
        },
    )

    def __post_init__(self):
        if self.model_max_length < 1:
            raise ValueError(f"model_max_length must be a positive number of tokens, got {self.model_max_length}.")
        if self.conversation_format not in CONVERSATION_FORMAT_CHOICES:
            raise ValueError(
                f"conversation_format must be one of {CONVERSATION_FORMAT_CHOICES}, got {self.conversation_format!r}."
            )
        if self.chat_template not in CHAT_TEMPLATE_CHOICES:
            _read_template_file(self.chat_template)  # a bad file fails here, before a model loads


def has_generation_block(template: str | None) -> bool:
    """Whether a chat template marks the assistant replies with `{% generation %}` (as `CHAT_TEMPLATE` does)."""
    return bool(template and _GENERATION_BLOCK.search(template))


def _read_template_file(path: str) -> str:
    """The chat template in the Jinja file that --chat_template names, which must have a `{% generation %}` block."""
    if not os.path.isfile(path):
        raise ValueError(
            f"--chat_template {path!r} is neither one of {CHAT_TEMPLATE_CHOICES} nor a file; give one of those, or "
            "the path of a Jinja file holding a chat template."
        )
    with open(path) as f:
        template = f.read()
    if not has_generation_block(template):
        raise ValueError(
            f"The chat template in {path} (--chat_template) has no {{% generation %}} block, so the assistant "
            "replies to train on cannot be found; put {% generation %}...{% endgeneration %} around each reply and "
            "its end-of-turn token, as sts_trainer.llava.data.CHAT_TEMPLATE does."
        )
    return template


def resolve_chat_template(choice: str, processor_template: str | None) -> str:
    """The chat template that `choice` (`DataArguments.chat_template`) picks for a processor that has
    `processor_template` (None for none). 'auto' logs a warning when it falls back to `CHAT_TEMPLATE`."""
    if choice == "llava":
        return CHAT_TEMPLATE
    if choice not in CHAT_TEMPLATE_CHOICES:
        return _read_template_file(choice)
    if has_generation_block(processor_template):
        return processor_template
    problem = "is missing"
    if processor_template:
        problem = "has no {% generation %} block to mark the assistant replies to train on"
    if choice == "processor":
        raise ValueError(
            f"--chat_template processor: the processor's chat template {problem}. Pass --chat_template auto or llava "
            "(LLaVA-1.5's template, sts_trainer.llava.data.CHAT_TEMPLATE), or --chat_template path/to/template.jinja with a "
            "{% generation %} block around each reply."
        )
    logger.warning(
        f"--chat_template auto: the processor's chat template {problem}, so LLaVA-1.5's template "
        "(sts_trainer.llava.data.CHAT_TEMPLATE, 'USER: ... ASSISTANT: ...') is used instead and saved with the processor. "
        "Pass --chat_template llava to choose it, or processor or path/to/template.jinja for another."
    )
    return CHAT_TEMPLATE


class _BadSample(Exception):
    def __init__(self, kind: str, detail: str, advice: str):
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail, self.advice = kind, detail, advice


def to_messages(conversations: list[dict]) -> list[dict]:
    """LLaVA turns as chat messages: `from` human/gpt/system -> `role` user/assistant/system, and `value` -> `content`
    blocks, `{"type": "image"}` where the text had `<image>` and `{"type": "text", "text": ...}` around them."""
    messages = []
    for turn in conversations:
        content = []
        for k, text in enumerate(turn["value"].split(IMAGE_TOKEN)):
            if k:
                content.append({"type": "image"})
            if text:
                content.append({"type": "text", "text": text})
        messages.append({"role": ROLES[turn["from"]], "content": content})
    return messages


def _read_records(path: str) -> list[tuple[int, int | None, object]]:
    """(index, line or None, record) for each sample of a JSON list or a JSONL file; a JSONL line that does not
    parse gives its `JSONDecodeError` as the record, to be reported as a bad sample."""
    with open(path) as f:
        text = f.read()
    if text.lstrip().startswith("["):
        return [(index, None, record) for index, record in enumerate(json.loads(text))]
    records = []
    for line, content in enumerate(text.splitlines(), start=1):
        if content.strip():
            try:
                record = json.loads(content)
            except json.JSONDecodeError as error:
                record = error
            records.append((len(records), line, record))
    return records


class LazyLlavaDataset(torch.utils.data.Dataset):
    """A LLaVA-format data set whose items are processed on access.

    Each item is `{"input_ids", "labels", "attention_mask"}` (1-D `LongTensor`s) and, when the sample has images,
    `"pixel_values"` (n_images, 3, H, W). Each `<image>` becomes the processor's image token repeated as many times
    as the model has visual tokens per image. `labels` are `IGNORE_INDEX` (-100) except on the assistant replies and
    their end-of-turn tokens. Sequences longer than `model_max_length` are cut at the end, never through image tokens.

    Bad samples are found up front, when the data set is built: bad format, no assistant turn, `<image>` count not
    matching the images, an image path outside `image_folder`, a missing image or one whose header does not read,
    truncation through image tokens. Each raises a `ValueError` naming the sample, or, with `skip_bad_samples`, is
    left out and recorded in `skipped` as (index in the file, id, reason). An image that is found corrupt only when
    decoded on access raises likewise or, with `skip_bad_samples`, is recorded and replaced by the next good item
    (that record lives in the process that loaded it, a DataLoader worker perhaps; a warning is logged there).

    The text is tokenised with the tokenizer and the chat template (which must mark replies with `{% generation %}`),
    then each image token is repeated to the processor's count: the ids are those of `processor.apply_chat_template(
    ..., tokenize=True)`, and one code path both checks the samples up front and builds the items, so they agree.
    Checking costs about 0.4 ms per short synthetic sample on one CPU core, once per process; longer conversations
    and real tokenizers cost more.
    """

    def __init__(
        self,
        data_path: str,
        processor: ProcessorMixin,
        image_folder: str | None = None,
        model_max_length: int = 2048,
        conversation_format: str = "chat",
        skip_bad_samples: bool = False,
    ):
        if conversation_format not in CONVERSATION_FORMATS:
            raise ValueError(f"conversation_format must be one of {CONVERSATION_FORMATS}, got {conversation_format!r}.")
        self.data_path = data_path
        self.processor = processor
        self.image_folder = os.path.abspath(image_folder or os.path.dirname(os.path.abspath(data_path)))
        self.model_max_length = model_max_length
        self.skip_bad_samples = skip_bad_samples
        self.chat_template = PLAIN_TEMPLATE if conversation_format == "plain" else processor.chat_template
        if not has_generation_block(self.chat_template):
            raise ValueError(
                "The processor's chat template has no {% generation %} block, so the assistant replies to train on "
                "cannot be found. With sts-train pass --chat_template auto, llava or path/to/template.jinja (one with "
                "such a block); in Python set `processor.chat_template = sts_trainer.llava.data.CHAT_TEMPLATE`."
            )
        self.skipped: list[tuple[int, str, str]] = []
        records = _read_records(data_path)
        rows = []
        for index, line, record in records:
            sample_id = str(record.get("id", "<no id>")) if isinstance(record, dict) else "<no id>"
            try:
                rows.append({"index": index, "line": line, "id": sample_id, **self._check(record)})
            except _BadSample as bad:
                self._reject(index, line, sample_id, bad)
        self.num_records = len(records)
        if self.skipped:
            logger.warning(self.skip_report())
        if not rows:
            raise ValueError(f"No usable sample in {data_path}: {self.skip_report()}")
        self.rows = datasets.Dataset.from_list(rows)

    @classmethod
    def from_arguments(
        cls, args: DataArguments, processor: ProcessorMixin, evaluation: bool = False
    ) -> "LazyLlavaDataset":
        """The training data set (`args.data_path`) or, with `evaluation=True`, the evaluation one.

        `conversation_format='auto'` is the chat template here; the command line resolves it per stage first. The
        chat template is the processor's: the command line sets `processor.chat_template` from `args.chat_template`
        (with `resolve_chat_template`) first.
        """
        conversation_format = "chat" if args.conversation_format == "auto" else args.conversation_format
        return cls(
            args.eval_data_path if evaluation else args.data_path, processor, args.image_folder, args.model_max_length,
            conversation_format, args.skip_bad_samples,
        )

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} samples")  # ends iteration over the data set
        for offset in range(len(self)):
            row = self.rows[(i + offset) % len(self)]
            try:
                images = [self._load_image(path) for path in row["image"]]
                input_ids, labels = self._encode(row["conversations"], [(im.height, im.width) for im in images])
            except _BadSample as bad:
                self._reject(row["index"], row["line"], row["id"], bad)
                logger.warning(f"Skipped sample id={row['id']!r} on access: {bad}")
                continue
            item = {
                "input_ids": torch.tensor(input_ids),
                "labels": torch.tensor(labels),
                "attention_mask": torch.ones(len(input_ids), dtype=torch.long),
            }
            if images:
                item["pixel_values"] = self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
            return item
        raise ValueError(f"Every sample of {self.data_path} failed on access: {self.skip_report()}")

    def modality_lengths(self) -> list[int]:
        """Token length of each item, positive for samples with images and negative for text-only ones (LLaVA's
        convention, for `ModalityLengthGroupedSampler`). Exact: image tokens included, after truncation."""
        return list(self.rows["length"])

    def skip_report(self) -> str:
        """How many samples were skipped and why, e.g. for the end of training."""
        counts = Counter(reason.split(": ", 1)[0] for _, _, reason in self.skipped)
        lines = [f"Skipped {len(self.skipped)} of {self.num_records} samples of {self.data_path}."]
        lines += [f"  {kind}: {count}" for kind, count in counts.most_common()]
        if self.skipped:
            index, sample_id, reason = self.skipped[0]
            lines.append(f"  first: index {index}, id={sample_id!r}: {reason}")
        return "\n".join(lines)

    def _reject(self, index: int, line: int | None, sample_id: str, bad: _BadSample) -> None:
        if not self.skip_bad_samples:
            where = f"index {index}" + (f", line {line}" if line is not None else "")
            raise ValueError(
                f"Bad sample id={sample_id!r} ({where} of {self.data_path}): {bad}. To fix: {bad.advice}; or pass "
                "--skip_bad_samples to skip such samples (they are counted and reported)."
            ) from None
        self.skipped.append((index, sample_id, str(bad)))

    def _check(self, record: object) -> dict:
        """The columns stored for a good sample, or `_BadSample`; reads only image headers."""
        turns = record.get("conversations") if isinstance(record, dict) else None
        images = (record.get("image") or []) if isinstance(record, dict) else []
        images = [images] if isinstance(images, str) else images
        if not (
            isinstance(turns, list)
            and all(isinstance(t, dict) and t.get("from") in ROLES and isinstance(t.get("value"), str) for t in turns)
            and isinstance(images, list)
            and all(isinstance(name, str) for name in images)
        ):
            raise _BadSample(
                "bad format", str(record)[:200],
                "write each sample as {'id', 'image': path or list of paths, 'conversations': [{'from': "
                "'human'|'gpt'|'system', 'value': text}]}",
            )
        conversations = [{"from": t["from"], "value": t["value"]} for t in turns]
        if not any(t["from"] == "gpt" for t in conversations):
            raise _BadSample("no assistant turn", "no turn is from 'gpt'", "add the reply to train on as a 'gpt' turn")
        placeholders = sum(t["value"].count(IMAGE_TOKEN) for t in conversations)
        if placeholders != len(images):
            raise _BadSample(
                "image count mismatch", f"the text has {placeholders} {IMAGE_TOKEN} but 'image' lists {len(images)}",
                f"put exactly one {IMAGE_TOKEN} in the text for each image listed in 'image'",
            )
        paths = [self._resolve(name) for name in images]
        sizes = [self._image_size(path) for path in paths]
        input_ids, _ = self._encode(conversations, sizes)
        return {"image": paths, "conversations": conversations, "length": len(input_ids) if paths else -len(input_ids)}

    def _resolve(self, name: str) -> str:
        # Lexical check (no symlink resolution): linking a data set's images into the folder stays allowed.
        path = os.path.normpath(os.path.join(self.image_folder, name))
        if os.path.commonpath([self.image_folder, path]) != self.image_folder:
            raise _BadSample(
                "image outside image_folder", f"{name!r} leads to {path}, outside {self.image_folder}",
                "give image paths relative to --image_folder, without '..'",
            )
        if not os.path.isfile(path):
            raise _BadSample("missing image", f"{path} does not exist", "add the image or correct its path")
        return path

    @staticmethod
    def _image_size(path: str) -> tuple[int, int]:
        try:
            with Image.open(path) as image:  # reads the header only
                return image.height, image.width
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise _BadSample("unreadable image", f"{path}: {error}", "replace the file with a valid image") from None

    @staticmethod
    def _load_image(path: str) -> Image.Image:
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise _BadSample("unreadable image", f"{path}: {error}", "replace the file with a valid image") from None

    def _encode(self, conversations: list[dict], image_sizes: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of a conversation whose images have these (height, width), truncated."""
        tokenizer, image_token_id = self.processor.tokenizer, self.processor.image_token_id
        encoding = tokenizer.apply_chat_template(
            to_messages(conversations), chat_template=self.chat_template, tokenize=True, return_dict=True,
            return_assistant_tokens_mask=True,
        )
        rendered = encoding["input_ids"].count(image_token_id)
        if rendered != len(image_sizes):
            raise _BadSample(
                "image count mismatch",
                f"the chat template wrote {rendered} image tokens for {len(image_sizes)} images",
                "make the chat template write the processor's image token once per image block",
            )
        # Visual tokens per image as the processor counts them (the hook inference servers use).
        per_image = self.processor._get_num_multimodal_tokens(image_sizes=image_sizes)["num_image_tokens"]
        per_image = iter(per_image if image_sizes else [])
        input_ids, labels = [], []
        for token, is_reply in zip(encoding["input_ids"], encoding["assistant_masks"]):
            if token == image_token_id:
                n = next(per_image)
                input_ids += [token] * n
                labels += [IGNORE_INDEX] * n
            else:
                input_ids.append(token)
                labels.append(token if is_reply else IGNORE_INDEX)
        if len(input_ids) > self.model_max_length:
            last_image_token = max((p for p, t in enumerate(input_ids) if t == image_token_id), default=-1)
            if last_image_token >= self.model_max_length:
                raise _BadSample(
                    "truncated through image tokens",
                    f"{len(input_ids)} tokens whose image tokens end at {last_image_token + 1}, beyond "
                    f"model_max_length={self.model_max_length}",
                    "raise --model_max_length or shorten the text before the last image",
                )
            input_ids, labels = input_ids[: self.model_max_length], labels[: self.model_max_length]
        if all(label == IGNORE_INDEX for label in labels):
            raise _BadSample(
                "no answer tokens",
                f"no assistant token is left within model_max_length={self.model_max_length}",
                "raise --model_max_length or shorten the prompt",
            )
        return input_ids, labels


@dataclass
class LlavaDataCollator:
    """Pads `input_ids` (with `pad_token_id`), `labels` (with -100) and `attention_mask` (with 0) to the longest item,
    on the right by default, and stacks the images of all items in batch order into one `pixel_values` tensor
    (total images, 3, H, W), left out when the batch has none."""

    pad_token_id: int
    padding_side: str = "right"

    def __post_init__(self):
        if self.padding_side not in PADDING_SIDES:
            raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {self.padding_side!r}.")

    def __call__(self, features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        batch = {
            "input_ids": torch.full((len(features), length), self.pad_token_id),  # (B, L)
            "labels": torch.full((len(features), length), IGNORE_INDEX),
            "attention_mask": torch.zeros((len(features), length), dtype=torch.long),
        }
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            span = slice(0, n) if self.padding_side == "right" else slice(length - n, length)
            for key in ("input_ids", "labels", "attention_mask"):
                batch[key][row, span] = feature[key]
        images = [f["pixel_values"] for f in features if "pixel_values" in f]
        if images:
            batch["pixel_values"] = torch.cat(images)  # (sum of n_images, 3, H, W)
        return batch


class ModalityLengthGroupedSampler(torch.utils.data.Sampler):
    """LLaVA's `group_by_modality_length`: indices in groups of `group_size` that hold image samples only or
    text-only samples only, each group sorted longest first, the groups in random order, incomplete groups last.

    `lengths` come from `LazyLlavaDataset.modality_lengths()`. Use `group_size` = per-device batch size x number of
    processes, so that all processes see the same modality at each step: under ZeRO-3 a process whose batch has no
    image would skip the vision tower that the others gather.
    """

    def __init__(self, lengths: list[int], group_size: int, generator: torch.Generator | None = None):
        self.lengths, self.group_size, self.generator = lengths, group_size, generator

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        full, partial = [], []
        for with_images in (True, False):
            indices = [i for i, n in enumerate(self.lengths) if (n > 0) == with_images]
            indices = [indices[j] for j in torch.randperm(len(indices), generator=self.generator).tolist()]
            for start in range(0, len(indices), self.group_size):
                group = sorted(indices[start : start + self.group_size], key=lambda i: -abs(self.lengths[i]))
                (full if len(group) == self.group_size else partial).append(group)
        order = torch.randperm(len(full), generator=self.generator).tolist()
        return iter([i for j in order for i in full[j]] + [i for group in partial for i in group])
