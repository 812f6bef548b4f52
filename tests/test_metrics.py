import json
import os
import subprocess
import sys

import pytest

from sts_trainer.llava.metrics import AVAILABLE_METRICS, METRICS_DIR, load_metric
from sts_trainer.llava.metrics.mme import mme_label
from sts_trainer.llava.metrics.pope import pope_label
from sts_trainer.llava.metrics.vqa_accuracy import normalize_answer, vqa_soft_accuracy


@pytest.mark.parametrize(
    "answer, normalized",
    [
        ("Two.", "2"),
        ("the dog", "dog"),
        ("An apple", "apple"),
        ("dont", "don't"),
        ("Whats", "what's"),
        ("none", "0"),
        # The official rule deletes every listed punctuation mark once the answer contains digit,digit.
        ("1,000", "1000"),
        ("3.5", "3.5"),
        ("5.", "5"),
        ("Yes!", "yes"),
        ("black/white", "black white"),
        ("black / white", "black white"),
        ("A red, white bus", "red white bus"),
        ("  Ten\n", "10"),
    ],
)
def test_vqa_normalisation(answer, normalized):
    assert normalize_answer(answer) == normalized


@pytest.mark.parametrize("matching, accuracy", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_leave_one_out(matching, accuracy):
    # With m of 10 matching: the m subsets that drop a match score min(1, (m-1)/3), the others min(1, m/3).
    # m=2: (2 * 1/3 + 8 * 2/3) / 10 = 0.6; m=3: (3 * 2/3 + 7 * 1) / 10 = 0.9.
    answers = ["cat"] * matching + ["dog"] * (10 - matching)
    assert vqa_soft_accuracy("cat", answers) == pytest.approx(accuracy)


def test_vqa_accuracy_metric_normalises_both_sides_and_accumulates_batches():
    predictions = ["Two.", "cat", "no"]
    references = [["two"] * 10, ["Cat."] * 2 + ["dog"] * 8, ["yes"] * 10]
    vqa = load_metric("vqa_accuracy")
    assert vqa.compute(predictions=predictions, references=references)["vqa_accuracy"] == pytest.approx(1.6 / 3)
    vqa.add_batch(predictions=predictions[:2], references=references[:2])
    vqa.add_batch(predictions=predictions[2:], references=references[2:])
    assert vqa.compute()["vqa_accuracy"] == pytest.approx(1.6 / 3)


def test_exact_match():
    exact_match = load_metric("exact_match")
    result = exact_match.compute(predictions=["Two.", "The Dog", "cat", "dont"], references=["2", "dog", "cats", "don't"])
    assert result == {"exact_match": pytest.approx(0.75)}


@pytest.mark.parametrize(
    "text, label",
    [
        ("Yes, there is a dog in the image.", "yes"),
        ("No.", "no"),
        ("No, there is not.", "no"),
        ("There is no dog.", "no"),
        ("The dog is not there", "no"),
        ("Yes. No other animals are visible.", "yes"),  # only the first sentence counts
        ("NO", "yes"),  # whole-word and case-sensitive, as in POPE's evaluate.py
        ("Nope", "yes"),
    ],
)
def test_pope_parsing(text, label):
    assert pope_label(text) == label


def test_pope_confusion_matrix():
    # TP = 3, FN = 2, FP = 1, TN = 2: precision 3/4, recall 3/5, F1 = 2 * 0.75 * 0.6 / 1.35 = 2/3,
    # accuracy 5/8, yes_ratio 4/8.
    predictions = ["Yes", "Yes, it is.", "yes", "No", "There is no cat.", "Yes", "No.", "not at all"]
    references = ["yes", "yes", "Yes", "yes", "yes", "no", "no", "no"]
    result = load_metric("pope").compute(predictions=predictions, references=references)
    assert result == pytest.approx({"accuracy": 5 / 8, "precision": 0.75, "recall": 0.6, "f1": 2 / 3, "yes_ratio": 0.5})


def test_pope_all_no_has_zero_precision_and_bad_reference_raises():
    pope = load_metric("pope")
    result = pope.compute(predictions=["No", "No"], references=["yes", "no"])
    assert result == {"accuracy": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0}
    with pytest.raises(ValueError, match="'maybe'"):
        pope.compute(predictions=["No"], references=["maybe"])


@pytest.mark.parametrize(
    "text, label",
    [("Yes", "yes"), (" Yes, it is.", "yes"), ("No.", "no"), ("Not really", "no"), ("none", "no"), ("I think yes", "other")],
)
def test_mme_parsing(text, label):
    assert mme_label(text) == label


def test_mme_accuracy_plus_and_score_per_subtask():
    # color: a.jpg both right, b.jpg one right, c.jpg both right -> acc 5/6, acc+ 2/3, score 150.
    # count: a.jpg (another image than color's a.jpg) one right, d.jpg none right ("other" is wrong) -> acc 1/4,
    # acc+ 0, score 25. Total 175; pooled: 6/10 questions and 2/5 images right.
    predictions = ["Yes", "No", "Yes", "Yes", "No", "no.", "Yes", "Yes", "I think so", "No"]
    references = ["yes", "no", "yes", "no", "no", "no", "yes", "no", "yes", "yes"]
    image_ids = ["a.jpg", "a.jpg", "b.jpg", "b.jpg", "c.jpg", "c.jpg", "a.jpg", "a.jpg", "d.jpg", "d.jpg"]
    categories = ["color"] * 6 + ["count"] * 4
    mme = load_metric("mme")
    result = mme.compute(predictions=predictions, references=references, image_ids=image_ids, categories=categories)
    assert result == pytest.approx(
        {
            "accuracy": 0.6,
            "accuracy_plus": 0.4,
            "score": 175.0,
            "color/accuracy": 5 / 6,
            "color/accuracy_plus": 2 / 3,
            "color/score": 150.0,
            "count/accuracy": 0.25,
            "count/accuracy_plus": 0.0,
            "count/score": 25.0,
        }
    )
    # Without categories everything is one subtask, and the two a.jpg are one image.
    result = mme.compute(predictions=predictions, references=references, image_ids=image_ids)
    assert result == pytest.approx({"accuracy": 0.6, "accuracy_plus": 0.25, "score": 85.0})
    with pytest.raises(ValueError, match="2 categories for 10 predictions"):
        mme.compute(predictions=predictions, references=references, image_ids=image_ids, categories=["color"] * 2)


def test_unknown_metric_lists_the_available_ones():
    with pytest.raises(ValueError, match="Available metrics: exact_match, mme, pope, vqa_accuracy"):
        load_metric("bleu")


def test_every_module_loads_offline_by_path(tmp_path):
    # A fresh process with the Hub off and an empty module cache, loading each file with plain `evaluate.load`.
    inputs = {
        "exact_match": {"predictions": ["Two."], "references": ["2"]},
        "mme": {"predictions": ["yes", "no"], "references": ["yes", "no"], "image_ids": ["a", "a"]},
        "pope": {"predictions": ["No."], "references": ["no"]},
        "vqa_accuracy": {"predictions": ["Two."], "references": [["2"] * 10]},
    }
    assert sorted(inputs) == AVAILABLE_METRICS
    script = (
        "import json, sys, evaluate\n"
        "paths, inputs = json.loads(sys.argv[1]), json.loads(sys.argv[2])\n"
        "print(json.dumps({name: evaluate.load(paths[name]).compute(**inputs[name]) for name in inputs}))\n"
    )
    paths = {name: str(METRICS_DIR / f"{name}.py") for name in inputs}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    run = subprocess.run(
        [sys.executable, "-c", script, json.dumps(paths), json.dumps(inputs)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert results == {
        "exact_match": {"exact_match": 1.0},
        "mme": {"accuracy": 1.0, "accuracy_plus": 1.0, "score": 200.0},
        "pope": {"accuracy": 1.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0},
        "vqa_accuracy": {"vqa_accuracy": 1.0},
    }
