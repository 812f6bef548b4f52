"""POPE object-hallucination metrics (accuracy, precision, recall, F1, yes ratio), as an `evaluate` metric.

The answer parsing and the formulas follow POPE's `evaluate.py` (https://github.com/RUCAIBox/POPE), which LLaVA's
`eval_pope.py` copies.
"""

import datasets
import evaluate

_DESCRIPTION = """\
POPE (Polling-based Object Probing Evaluation) asks "Is there a <object> in the image?" and scores the yes/no answers
as binary classification with "yes" (the object is present) as the positive class.

Normalisation of a prediction, as in POPE's evaluate.py: keep the text before the first period, delete commas, split
on spaces; the answer is "no" if one of the words is exactly "No", "no" or "not", and "yes" otherwise. The test is
case-sensitive and whole-word, as in the original: "No, there is not." -> no, "There is no dog" -> no,
"Yes. No other animals." -> yes, "NO" and "Nope" -> yes. References must be "yes" or "no" (case and surrounding
whitespace ignored).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): the model's answers (free text; parsed to yes/no as described).
    references (`list[str]`): the ground-truth labels, "yes" or "no".
Returns:
    accuracy (`float`): (TP + TN) / N.
    precision (`float`): TP / (TP + FP), 0.0 when nothing is predicted "yes".
    recall (`float`): TP / (TP + FN), 0.0 when no reference is "yes".
    f1 (`float`): 2 * precision * recall / (precision + recall), 0.0 when both are 0.
    yes_ratio (`float`): fraction of predictions parsed as "yes" (a balanced POPE split has 0.5 "yes" references).
Examples:
    >>> from sts_trainer.llava.metrics import load_metric
    >>> pope = load_metric("pope")
    >>> pope.compute(predictions=["Yes, there is.", "No.", "Yes"], references=["yes", "yes", "no"])
    {'accuracy': 0.3333333333333333, 'precision': 0.5, 'recall': 0.5, 'f1': 0.5, 'yes_ratio': 0.6666666666666666}
"""

_CITATION = """\
@inproceedings{li2023evaluating,
  title={Evaluating Object Hallucination in Large Vision-Language Models},
  author={Li, Yifan and Du, Yifan and Zhou, Kun and Wang, Jinpeng and Zhao, Wayne Xin and Wen, Ji-Rong},
  booktitle={EMNLP},
  year={2023}
}
"""


def pope_label(text: str) -> str:
    """POPE's parsing of a free-text answer into "yes" or "no" (first sentence, no commas, whole words)."""
    words = text.split(".")[0].replace(",", "").split(" ")
    return "no" if "No" in words or "not" in words or "no" in words else "yes"


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Pope(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
            reference_urls=["https://github.com/RUCAIBox/POPE"],
        )

    def _compute(self, predictions, references):
        labels = [reference.strip().lower() for reference in references]
        if bad := sorted(set(labels) - {"yes", "no"}):
            raise ValueError(f"POPE references must be 'yes' or 'no', got {bad}.")
        pairs = [(pope_label(prediction), label) for prediction, label in zip(predictions, labels)]
        tp = pairs.count(("yes", "yes"))
        fp = pairs.count(("yes", "no"))
        tn = pairs.count(("no", "no"))
        fn = pairs.count(("no", "yes"))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        return {
            "accuracy": (tp + tn) / len(pairs),
            "precision": precision,
            "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "yes_ratio": (tp + fp) / len(pairs),
        }
