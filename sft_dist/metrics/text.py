"""Text metrics of a generated answer against the reference answer: exact match, token F1, ROUGE-L.

What `metrics.generate_eval_rows` reports at each evaluation (train/evaluation.py): the model answers the eval
rows' prompts and each answer is scored against the row's own answer. All three compare normalised words
(lower case, punctuation dropped, whitespace collapsed; any language: no English article stripping), so that
"Lisboa." and "lisboa" match; a score is in [0, 1], the mean over rows is what gets logged.

- exact_match: the normalised texts are equal.
- token_f1: the harmonic mean of precision and recall of the words, as a bag (SQuAD's F1).
- rouge_l: the F-measure of the longest common subsequence of words (ROUGE-L, beta 1): order counts.
"""

from __future__ import annotations

import unicodedata
from collections import Counter

NAMES = ("exact_match", "token_f1", "rouge_l")


def words(text: str) -> list[str]:
    """Lower-cased words with every Unicode punctuation character removed."""
    kept = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text.lower())
    return kept.split()


def exact_match(prediction: str, reference: str) -> float:
    return float(words(prediction) == words(reference))


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = words(prediction), words(reference)
    return _f_measure(sum((Counter(pred) & Counter(ref)).values()) if pred and ref else 0, pred, ref)


def rouge_l(prediction: str, reference: str) -> float:
    pred, ref = words(prediction), words(reference)
    return _f_measure(_lcs(pred, ref) if pred and ref else 0, pred, ref)


def _f_measure(common: int, pred: list[str], ref: list[str]) -> float:
    """The harmonic mean of precision common/len(pred) and recall common/len(ref); two empty texts match."""
    if not pred or not ref:
        return float(pred == ref)
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def _lcs(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, one row at a time)."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def scores(prediction: str, reference: str) -> dict[str, float]:
    """Every metric of NAMES for one answer."""
    return {"exact_match": exact_match(prediction, reference), "token_f1": token_f1(prediction, reference),
            "rouge_l": rouge_l(prediction, reference)}
