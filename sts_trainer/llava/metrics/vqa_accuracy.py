"""VQAv2 soft accuracy with the official answer normalisation, as an `evaluate` metric.

The normalisation (`normalize_answer`) and the leave-one-out scoring (`vqa_soft_accuracy`) reproduce the VQA v2
evaluation script, `PythonEvaluationTools/vqaEvaluation/vqaEval.py` in https://github.com/GT-Vision-Lab/VQA
(`VQAEval.contractions`, `manualMap`, `articles`, `punct`, `processPunctuation`, `processDigitArticle`, `evaluate`).
`exact_match` imports `normalize_answer` from here.
"""

import re

import datasets
import evaluate

_DESCRIPTION = """\
VQAv2 soft accuracy. Each question has a list of human answers (10 in VQAv2). A prediction scores
min(1, #humans who gave that answer / 3) against each of the leave-one-out subsets of the human answers, and the
question's accuracy is the mean over those subsets, as in the official VQA evaluation: with 10 answers, 0, 1, 2, 3
and >= 4 matches give 0.0, 0.3, 0.6, 0.9 and 1.0. The metric is the mean over questions, in [0, 1] (the official
script reports it x100).

Normalisation (prediction and every human answer), from the VQA v2 evaluation script:
- newlines and tabs become spaces, surrounding whitespace is stripped;
- punctuation ; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? ! is deleted where it touches a space or the answer
  contains a digit-comma-digit (so "1,000" -> "1000"), and replaced by a space otherwise ("black/white" -> "black white");
- a period not followed by a digit is deleted ("5." -> "5", "3.5" stays);
- lowercase; number words "none", "zero" ... "ten" become digits; articles a/an/the are dropped;
- contractions written without apostrophe get it back ("dont" -> "don't", "whats" -> "what's").
Unlike the official script, which normalises only when the human answers disagree (VQA annotations are already
normalised), both sides are always normalised here, so a generated "Yes." matches ten humans' "yes".
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): one predicted answer per question.
    references (`list[list[str]]`): the human answers of each question (10 for VQAv2; any non-empty list works).
Returns:
    vqa_accuracy (`float`): mean soft accuracy over questions, in [0, 1].
Examples:
    >>> from sts_trainer.llava.metrics import load_metric
    >>> vqa = load_metric("vqa_accuracy")
    >>> vqa.compute(predictions=["Two."], references=[["2", "2", "two", "3", "3", "3", "3", "3", "3", "3"]])
    {'vqa_accuracy': 0.9}
"""

_CITATION = """\
@inproceedings{goyal2017making,
  title={Making the {V} in {VQA} Matter: Elevating the Role of Image Understanding in Visual Question Answering},
  author={Goyal, Yash and Khot, Tejas and Summers-Stay, Douglas and Batra, Dhruv and Parikh, Devi},
  booktitle={CVPR},
  year={2017}
}
"""

# The tables below are copied from `VQAEval.__init__` in the VQA v2 evaluation script. Keys with capitals ("Im",
# "Ive", "Id've") can never match because words are lowercased first; they are kept as in the original.
# fmt: off
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
MANUAL_MAP = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
# fmt: on
ARTICLES = ["a", "an", "the"]
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
# "(?!<=\d)" is a mistyped lookbehind in the official script: as written it never fails, so every period that is
# not followed by a digit is deleted. Kept as is to give the official results.
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")


def process_punctuation(text: str) -> str:
    """`VQAEval.processPunctuation`: delete or space out punctuation, then delete periods that end no decimal."""
    out = text
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # The official script passes re.UNICODE where `sub` takes `count`, capping it at 32 periods; no answer has as many.
    return PERIOD_STRIP.sub("", out)


def process_digit_article(text: str) -> str:
    """`VQAEval.processDigitArticle`: lowercase, number words to digits, drop articles, restore contractions."""
    words = []
    for word in text.lower().split():
        word = MANUAL_MAP.get(word, word)
        if word not in ARTICLES:
            words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_answer(answer: str) -> str:
    """The VQA v2 answer normalisation: "Two." -> "2", "the dog" -> "dog", "dont" -> "don't", "1,000" -> "1000"."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(answer))


def vqa_soft_accuracy(prediction: str, answers: list[str]) -> float:
    """Soft accuracy of one prediction against its human answers, averaged over the leave-one-out subsets.

    With m of the n answers matching, the subset without answer i has m - [answer i matches] matches and scores
    min(1, that / 3); the result is the mean of the n subset scores (10 answers, 2 matching: (2/3 * 8 + 1/3 * 2) / 10 = 0.6).
    """
    prediction = normalize_answer(prediction)
    matches = [normalize_answer(answer) == prediction for answer in answers]
    total = sum(matches)
    return sum(min(1.0, (total - match) / 3) for match in matches) / len(matches)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class VQAAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
            reference_urls=["https://github.com/GT-Vision-Lab/VQA", "https://visualqa.org/evaluation.html"],
        )

    def _compute(self, predictions, references):
        scores = [vqa_soft_accuracy(prediction, answers) for prediction, answers in zip(predictions, references)]
        return {"vqa_accuracy": sum(scores) / len(scores)}
