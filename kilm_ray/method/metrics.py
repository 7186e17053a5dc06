"""Text metrics as pure functions: SQuAD-style normalization, exact match, token F1, ROUGE-L."""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Iterable

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize(text: str) -> str:
    """Lower-case, drop punctuation and articles, collapse whitespace (the SQuAD normalization)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _word_forms(word: str) -> set[str]:
    """A word and its regular plural and possessive spellings (after normalization, which drops the
    apostrophe): consonant -> consonants, church -> churches, city -> cities."""
    forms = {word, word + "s", word + "es"}
    if len(word) > 1 and word.endswith("y"):
        forms.add(word[:-1] + "ies")
    return forms


def same_up_to_inflection(a: str, b: str) -> bool:
    """The two texts are the same words up to case, punctuation, articles and regular plural or
    possessive endings (``consonants`` ~ ``consonant``, ``Aristotle's`` ~ ``Aristotle``). A title that
    differs from its mention only so is not knowledge a model brings: it is the mention, inflected."""
    wa, wb = normalize(a).split(), normalize(b).split()
    return len(wa) == len(wb) and all(x == y or y in _word_forms(x) or x in _word_forms(y) for x, y in zip(wa, wb))


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize(prediction) == normalize(gold))


def token_f1(prediction: str, gold: str) -> float:
    pred, ref = normalize(prediction).split(), normalize(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = Counter(pred) & Counter(ref)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, gold: str) -> float:
    """ROUGE-L F-measure over normalized tokens."""
    pred, ref = normalize(prediction).split(), normalize(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    lcs = _lcs(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def best_over(metric, prediction: str, golds: Iterable[str]) -> float:
    return max((metric(prediction, g) for g in golds), default=0.0)


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")
