"""Few-shot QA as the paper evaluates it: k exemplars (question, answer) from the training questions
before the question asked, chosen at random or by TF-IDF similarity, in one of four prompt variants.
Pure Python, no model.

The variants (the official code's ``--method 1..4``) differ in the trigger words and in a space after the
answer trigger, which changes how the answer's first word is tokenized::

    1  "Question: {q} Answer: {a}"      2  "Question: {q} Answer:{a}"   (zero-shot here: variant 2)
    3  "Q: {q} A: {a}"                  4  "Q: {q} A:{a}"

Exemplars are joined by ``" \\n\\n "`` and the question asked ends with its trigger, the answer to come
in the ``<mask>`` (``kilm_ray.method.probes.qa_prompt``; the space after a trigger before the mask goes, as
BART's ``<mask>`` absorbs it). Training questions holding a control token are left out of the pool.
Exemplar choice:

- ``random``: one seeded draw of k training questions, the same for every question asked (the official
  code seeds the draw once per run);
- ``tfidf``: the k training questions most similar to the question asked, by TF-IDF over hashed word
  unigrams and bigrams, an n-gram with a stopword left out (DrQA's, the official retriever's: weights
  ``log(1 + tf) * max(0, log((N - df + 0.5) / (df + 0.5)))``, scored by dot product), ties to the earlier
  training question; a training question identical to the question asked is never its own exemplar. A
  question sharing no weighted n-gram with the pool gets fewer than k (the official code too; counted).
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections import Counter, defaultdict
from typing import Sequence

QA_PROMPTS = {1: ("Question: ", "Answer: "), 2: ("Question: ", "Answer:"), 3: ("Q: ", "A: "), 4: ("Q: ", "A:")}
EXEMPLAR_JOIN = " \n\n "
_WORD = re.compile(r"\w+", re.UNICODE)
_BUCKETS = 1 << 24  # hashed n-grams, as DrQA's 2^24
# DrQA's n-gram filter: English stopwords (NLTK's list, which DrQA uses) never weigh in.
STOPWORDS = frozenset("""
i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she her hers herself it its
itself they them their theirs themselves what which who whom this that these those am is are was were be been being
have has had having do does did doing a an the and but if or because as until while of at by for with about against
between into through during before after above below to from up down in out on off over under again further then once
here there when where why how all any both each few more most other some such no nor not only own same so than too
very s t can will just don should now d ll m o re ve y ain aren couldn didn doesn hadn hasn haven isn ma mightn mustn
needn shan shouldn wasn weren won wouldn
""".split())
CONTROL = ("<s>", "</s>", "<pad>", "<unk>", "<mask>", "<ent>", "</ent>", "<ent_desc>", "</ent_desc>", "<sep>")


def asked(question: str) -> str:
    """The question as asked: stripped, ending with one '?'."""
    return question.strip().rstrip("?").strip() + "?"


def qa_text(question: str, exemplars: Sequence[tuple[str, str]] = (), variant: int = 2) -> str:
    """The prompt's text before the ``<mask>``: the exemplars, then the question and its answer trigger."""
    if variant not in QA_PROMPTS:
        raise ValueError(f"QA prompt variant {variant}: choose one of {sorted(QA_PROMPTS)}")
    q, a = QA_PROMPTS[variant]
    shots = [f"{q}{eq.strip()} {a}{ea.strip()}" for eq, ea in exemplars]
    return EXEMPLAR_JOIN.join([*shots, f"{q}{asked(question)} {a}"])


def _terms(text: str) -> list[int]:
    words = _WORD.findall(text.lower())
    grams = [w for w in words if w not in STOPWORDS] + [
        f"{x} {y}" for x, y in zip(words, words[1:]) if x not in STOPWORDS and y not in STOPWORDS]
    return [int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "big") % _BUCKETS for g in grams]


class TfidfExemplars:
    """An inverted index of the training questions; :meth:`nearest` gives the k most similar."""

    def __init__(self, pairs: Sequence[tuple[str, str]]):
        self.pairs = list(pairs)
        self.postings: dict[int, list[tuple[int, float]]] = defaultdict(list)
        df: Counter = Counter()
        counts = []
        for doc, (question, _) in enumerate(self.pairs):
            tf = Counter(_terms(question))
            counts.append(tf)
            df.update(tf.keys())
        n = len(self.pairs)
        self.idf = {t: max(0.0, math.log((n - d + 0.5) / (d + 0.5))) for t, d in df.items()}
        for doc, tf in enumerate(counts):
            for t, c in tf.items():
                weight = math.log1p(c) * self.idf[t]
                if weight > 0:
                    self.postings[t].append((doc, weight))
        self._normal = [asked(q).lower() for q, _ in self.pairs]

    def nearest(self, question: str, k: int) -> list[tuple[str, str]]:
        scores: dict[int, float] = defaultdict(float)
        for t, c in Counter(_terms(question)).items():
            w = math.log1p(c) * self.idf.get(t, 0.0)
            if w > 0:
                for doc, dw in self.postings[t]:
                    scores[doc] += w * dw
        same = asked(question).lower()
        ranked = sorted((d for d in scores if self._normal[d] != same), key=lambda d: (-scores[d], d))
        return [self.pairs[d] for d in ranked[:k]]


def random_exemplars(pairs: Sequence[tuple[str, str]], k: int, seed: int) -> list[tuple[str, str]]:
    """One seeded draw of k training questions (every question asked gets the same ones)."""
    return random.Random(seed).sample(list(pairs), min(k, len(pairs)))


def usable(pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The training pairs a prompt can hold: none with a control token (it would rewrite the prompt)."""
    return [(q, a) for q, a in pairs if not any(t in q or t in a for t in CONTROL)]


def choose_exemplars(questions: Sequence[str], pairs: Sequence[tuple[str, str]], k: int, how: str,
                     seed: int) -> list[list[tuple[str, str]]]:
    """Each question's exemplars (``how``: ``random`` or ``tfidf``; k = 0: none) from the usable pairs."""
    pairs = usable(pairs)
    if k <= 0:
        return [[] for _ in questions]
    if how == "random":
        drawn = random_exemplars(pairs, k, seed)
        return [list(drawn) for _ in questions]
    if how == "tfidf":
        index = TfidfExemplars(pairs)
        return [index.nearest(q, k) for q in questions]
    raise ValueError(f"exemplar choice {how!r}: random or tfidf")
