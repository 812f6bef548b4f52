"""MME accuracy, accuracy+ and score per subtask, as an `evaluate` metric.

The answer parsing and the scores follow MME's `eval_tool/calculation.py` (MME benchmark,
https://github.com/BradyFU/Awesome-Multimodal-Large-Language-Models/tree/Evaluation).
"""

from collections import defaultdict

import datasets
import evaluate

_DESCRIPTION = """\
MME asks two yes/no questions about each image (one true, one false) in each of 14 subtasks ("existence", "count",
"OCR", ...). Per subtask:
- accuracy: fraction of questions answered right;
- accuracy_plus: fraction of images whose questions are all answered right (both of the pair);
- score = (accuracy + accuracy_plus) * 100, at most 200.
The MME score of a set of subtasks is the sum of their scores (perception: 10 subtasks, at most 2000; cognition: 4,
at most 800): pass only the subtasks you want summed.

Normalisation of a prediction, as in MME's calculation.py: lowercase; "yes" if "yes" occurs in the first four
characters, else "no" if "no" does ("No.", "not really", "none" -> no), else "other", which counts as wrong
("I think yes" -> other). References must be "yes" or "no" (case and surrounding whitespace ignored).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): the model's answers (free text; parsed to yes/no/other as described).
    references (`list[str]`): the ground-truth answers, "yes" or "no".
    image_ids (`list[str]`): the image each question is about; questions with the same (category, image id) form
        the image's group for accuracy_plus. Image ids need only be unique within a subtask.
    categories (`list[str]`, *optional*): the subtask of each question, passed to `compute` (not to `add_batch`)
        and aligned with all the examples it scores. Without it, all questions form one subtask.
Returns:
    accuracy (`float`): fraction of all questions answered right, in [0, 1].
    accuracy_plus (`float`): fraction of all (category, image) groups answered entirely right, in [0, 1].
    score (`float`): sum over subtasks of (subtask accuracy + subtask accuracy_plus) * 100.
    {category}/accuracy, {category}/accuracy_plus, {category}/score (`float`): the same for each subtask, when
        `categories` is given.
Examples:
    >>> from sts_trainer.llava.metrics import load_metric
    >>> mme = load_metric("mme")
    >>> mme.compute(predictions=["Yes", "No", "Yes", "Yes"], references=["yes", "no", "yes", "no"],
    ...             image_ids=["a.jpg", "a.jpg", "b.jpg", "b.jpg"])
    {'accuracy': 0.75, 'accuracy_plus': 0.5, 'score': 125.0}
"""

_CITATION = """\
@article{fu2023mme,
  title={{MME}: A Comprehensive Evaluation Benchmark for Multimodal Large Language Models},
  author={Fu, Chaoyou and Chen, Peixian and Shen, Yunhang and Qin, Yulei and Zhang, Mengdan and Lin, Xu and
          Yang, Jinrui and Zheng, Xiawu and Li, Ke and Sun, Xing and Wu, Yunsheng and Ji, Rongrong},
  journal={arXiv preprint arXiv:2306.13394},
  year={2023}
}
"""


def mme_label(text: str) -> str:
    """MME's `parse_pred_ans`: "yes", "no" or "other" from the first four characters of the lowercased answer."""
    prefix = text.lower()[:4]
    return "yes" if "yes" in prefix else "no" if "no" in prefix else "other"


def accuracies(correct: list[bool], groups: list) -> tuple[float, float]:
    """(accuracy, accuracy_plus): the fraction of questions right, and of groups (images) with every question right."""
    by_group = defaultdict(list)
    for group, right in zip(groups, correct):
        by_group[group].append(right)
    return sum(correct) / len(correct), sum(map(all, by_group.values())) / len(by_group)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MME(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.Value("string"),
                    "image_ids": datasets.Value("string"),
                }
            ),
            reference_urls=["https://github.com/BradyFU/Awesome-Multimodal-Large-Language-Models/tree/Evaluation"],
        )

    def _compute(self, predictions, references, image_ids, categories=None):
        labels = [reference.strip().lower() for reference in references]
        if bad := sorted(set(labels) - {"yes", "no"}):
            raise ValueError(f"MME references must be 'yes' or 'no', got {bad}.")
        if categories is not None and len(categories) != len(predictions):
            raise ValueError(f"Got {len(categories)} categories for {len(predictions)} predictions.")
        per_category = categories is not None
        categories = categories if per_category else [""] * len(predictions)
        correct = [mme_label(prediction) == label for prediction, label in zip(predictions, labels)]
        groups = list(zip(categories, image_ids))

        accuracy, accuracy_plus = accuracies(correct, groups)
        results = {"accuracy": accuracy, "accuracy_plus": accuracy_plus, "score": 0.0}
        for category in dict.fromkeys(categories):  # subtasks in order of first appearance
            index = [i for i, c in enumerate(categories) if c == category]
            accuracy, accuracy_plus = accuracies([correct[i] for i in index], [groups[i] for i in index])
            score = (accuracy + accuracy_plus) * 100
            results["score"] += score
            if per_category:
                results.update(
                    {f"{category}/accuracy": accuracy, f"{category}/accuracy_plus": accuracy_plus, f"{category}/score": score}
                )
        return results
