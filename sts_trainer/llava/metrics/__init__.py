"""Metrics for VQA-style evaluation, shipped as `evaluate` modules so that they load with no Hub access.

    from sts_trainer.llava.metrics import load_metric
    vqa = load_metric("vqa_accuracy")
    vqa.compute(predictions=["Two."], references=[["2"] * 10])  # {'vqa_accuracy': 1.0}

Each metric is one file in `METRICS_DIR`; `evaluate.load(str(METRICS_DIR / "pope.py"))` is the same as
`load_metric("pope")`. `metric.inputs_description` documents each metric's inputs, outputs and normalisation.
"""

from pathlib import Path

import evaluate

METRICS_DIR = Path(__file__).parent
AVAILABLE_METRICS = ["exact_match", "mme", "pope", "vqa_accuracy"]


def load_metric(name: str, **kwargs) -> evaluate.EvaluationModule:
    """Load the shipped metric `name` from its file; `kwargs` go to `evaluate.load` (e.g. `num_process`, `process_id`)."""
    if name not in AVAILABLE_METRICS:
        raise ValueError(f"Unknown metric {name!r}. Available metrics: {', '.join(AVAILABLE_METRICS)}.")
    return evaluate.load(str(METRICS_DIR / f"{name}.py"), **kwargs)
