"""Exact match after the VQA v2 answer normalisation, as an `evaluate` metric."""

import datasets
import evaluate

# A relative import, so that `evaluate.load(path)` copies vqa_accuracy.py next to this file in its module cache.
from .vqa_accuracy import normalize_answer

_DESCRIPTION = """\
Exact match: the fraction of predictions equal to their reference after both are normalised with the VQA v2
evaluation script's rules (see the `vqa_accuracy` metric): newlines/tabs to spaces and strip; punctuation deleted or
spaced out ("1,000" -> "1000", "black/white" -> "black white"); periods that end no decimal deleted; lowercase;
number words to digits ("two" -> "2"); articles a/an/the dropped; contractions restored ("dont" -> "don't").
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): one predicted answer per example.
    references (`list[str]`): one reference answer per example.
Returns:
    exact_match (`float`): fraction of examples whose normalised prediction equals the normalised reference, in [0, 1].
Examples:
    >>> from sts_trainer.llava.metrics import load_metric
    >>> exact_match = load_metric("exact_match")
    >>> exact_match.compute(predictions=["Two.", "The dog", "cat"], references=["2", "dog", "cats"])
    {'exact_match': 0.6666666666666666}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        matches = [normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references)]
        return {"exact_match": sum(matches) / len(matches)}
