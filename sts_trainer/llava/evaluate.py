"""Evaluation: batched greedy generation over a question file, scored with the metric modules shipped in the package.

    sts-eval --model_name_or_path out/stage2 --questions test_questions.jsonl --image_folder images \\
        --metric exact_match --output_dir out/eval

A question file is JSONL (or a JSON list) of {"id", "image" (path relative to --image_folder), "question",
"answer" (a string, or a list of human answers for VQAv2-style soft accuracy), optional "category"}. Writes
`predictions.jsonl` and `scores.json` (overall and per category) to --output_dir. Nothing is compressed or skipped:
the model is a plain transformers model in eval mode.

Local layout of the standard benchmarks (convert each to the question format above; no downloads happen here):
- GQA: testdev_balanced_questions.json + images/ -> {"id": qid, "image": imageId + ".jpg", "question", "answer"};
  metric exact_match.
- VQAv2: v2_OpenEnded_mscoco_val2014_questions.json + annotations + val2014/ -> "answer": the 10 human answers;
  metric vqa_accuracy.
- POPE: coco_pope_{random,popular,adversarial}.json + val2014/ -> "answer": "yes"/"no", "category": the split;
  metric pope.
- MME: one folder per subtask with images and "question<TAB>yes/no" lines -> "category": the subtask, "image" the
  file (two questions per image); metric mme.
- ScienceQA (image subset): problems.json + images/ -> the question with its lettered choices, "answer" the letter;
  metric exact_match.
"""

import json
import os
from dataclasses import dataclass, field

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, HfArgumentParser

from .data import IMAGE_TOKEN, to_messages
from .metrics import AVAILABLE_METRICS, load_metric


@dataclass
class EvalArguments:
    model_name_or_path: str = field(metadata={"help": "The model to evaluate (a local directory with its processor)."})
    questions: str = field(metadata={"help": "Question file, JSONL or a JSON list (see the module docstring)."})
    image_folder: str = field(default=".", metadata={"help": "Folder the questions' image paths are relative to."})
    metric: str = field(
        default="exact_match", metadata={"help": "How answers are scored.", "choices": list(AVAILABLE_METRICS)}
    )
    output_dir: str = field(default="eval_results", metadata={"help": "Where predictions.jsonl and scores.json go."})
    batch_size: int = field(default=32, metadata={"help": "Questions per generation batch."})
    max_new_tokens: int = field(default=8, metadata={"help": "Longest answer generated (greedy)."})


def read_questions(path: str) -> list[dict]:
    with open(path) as f:
        text = f.read()
    records = json.loads(text) if text.lstrip().startswith("[") else [json.loads(line) for line in text.splitlines() if line.strip()]
    for i, q in enumerate(records):
        missing = {"id", "image", "question", "answer"} - set(q)
        if missing:
            raise ValueError(f"Question {i} (id={q.get('id')!r}) of {path} lacks {sorted(missing)}.")
    return records


@torch.no_grad()
def generate_answers(model, processor, questions: list[dict], image_folder: str, batch_size: int = 32,
                     max_new_tokens: int = 8, progress: bool = True) -> list[str]:
    """Greedy answers to `questions`, in order, with the prompt format the model was trained on (its chat template)."""
    model.eval()
    tokenizer = processor.tokenizer
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation continues at the right end
    answers = []
    batches = range(0, len(questions), batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="answering", unit="batch")
    try:
        for start in batches:
            batch = questions[start : start + batch_size]
            prompts = [
                processor.apply_chat_template(
                    to_messages([{"from": "human", "value": f"{IMAGE_TOKEN}\n{q['question']}"}]),
                    add_generation_prompt=True, tokenize=False,
                )
                for q in batch
            ]
            images = [Image.open(os.path.join(image_folder, q["image"])).convert("RGB") for q in batch]
            inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt", add_special_tokens=False)
            inputs = inputs.to(model.device)
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            new_tokens = output[:, inputs["input_ids"].shape[1] :]
            answers += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = padding_side
    return answers


def score(questions: list[dict], predictions: list[str], metric: str) -> dict:
    """The metric overall and, when questions have a 'category', per category ('<category>/<key>')."""
    module = load_metric(metric)

    def compute(indices):
        kwargs = {"predictions": [predictions[i] for i in indices], "references": [questions[i]["answer"] for i in indices]}
        if metric == "mme":
            kwargs["image_ids"] = [str(questions[i]["image"]) for i in indices]
        return module.compute(**kwargs)

    scores = compute(range(len(questions)))
    categories = sorted({q["category"] for q in questions if "category" in q})
    for category in categories:
        indices = [i for i, q in enumerate(questions) if q.get("category") == category]
        scores.update({f"{category}/{k}": v for k, v in compute(indices).items()})
    return scores


def evaluate_model(model, processor, questions_path: str, image_folder: str, metric: str = "exact_match",
                   output_dir: str | None = None, batch_size: int = 32, max_new_tokens: int = 8) -> dict:
    questions = read_questions(questions_path)
    predictions = generate_answers(model, processor, questions, image_folder, batch_size, max_new_tokens)
    scores = score(questions, predictions, metric)
    if output_dir is not None:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "predictions.jsonl"), "w") as f:
            for q, p in zip(questions, predictions):
                f.write(json.dumps({"id": q["id"], "prediction": p, "answer": q["answer"], "category": q.get("category")}) + "\n")
        with open(os.path.join(output_dir, "scores.json"), "w") as f:
            json.dump(scores, f, indent=1)
    return scores


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(EvalArguments).parse_args_into_dataclasses(argv)
    processor = AutoProcessor.from_pretrained(args.model_name_or_path)
    model = AutoModelForImageTextToText.from_pretrained(args.model_name_or_path)
    scores = evaluate_model(model, processor, args.questions, args.image_folder, args.metric, args.output_dir,
                            args.batch_size, args.max_new_tokens)
    print(json.dumps(scores, indent=1))
    return scores


if __name__ == "__main__":
    main()
