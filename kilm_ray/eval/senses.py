"""A word-sense probe from WordNet's own usage examples: pure functions, no model.

A WordNet gloss is ``definition; "usage example"; "another example"`` (``bank`` sense 2: "a financial
institution ...; "he cashed a check at the bank""). The example sentence is the context, the word in
it is the mention, the candidates are the word's senses as definitions without examples (what
``kilm_ray.data.corpus.knowledge.wordnet_description`` keeps as knowledge, so no example ever reaches the
training data), and the gold is the sense the example illustrates. Unlike a title -> gloss lookup, the
right answer depends on the context: every sense of the word has the same mention.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Optional

from kilm_ray.data.corpus.knowledge import wordnet_description

_EXAMPLE = re.compile(r'"([^"]{8,})"')


@dataclass(frozen=True)
class SenseItem:
    word: str
    context: str  # the usage example
    start: int  # character span of the word in the context
    end: int
    senses: tuple[str, ...]  # definitions, in WordNet's sense order (most frequent first)
    gold: int  # index into senses

    @property
    def left(self) -> str:
        return self.context[: self.start]

    @property
    def mention(self) -> str:
        return self.context[self.start: self.end]

    @property
    def right(self) -> str:
        return self.context[self.end:]


def usage_examples(gloss: str) -> list[str]:
    """The quoted usage examples after a gloss's definition."""
    cut = re.search(r';\s*"', gloss)
    return [m.strip() for m in _EXAMPLE.findall(gloss[cut.start():])] if cut else []


def find_word(sentence: str, word: str) -> Optional[tuple[int, int]]:
    """Character span of ``word`` (or its plural) as a whole word in ``sentence``, case-insensitive."""
    m = re.search(rf"(?<![\w-]){re.escape(word)}(?:e?s)?(?![\w-])", sentence, flags=re.IGNORECASE)
    return (m.start(), m.end()) if m else None


def sense_items(rows: Iterable[tuple[str, int, str]], max_senses: int = 8) -> list[SenseItem]:
    """``(name, sense number, gloss)`` rows -> one item per usage example of a word with several senses
    whose example contains the word. Words are WordNet's lemmas (underscores already spaces)."""
    by_word: dict[str, dict[int, str]] = defaultdict(dict)
    for name, sense, gloss in rows:
        by_word[name][int(sense)] = gloss
    items = []
    for word, glosses in by_word.items():
        if len(glosses) < 2:
            continue
        order = sorted(glosses)[:max_senses]
        definitions = tuple(wordnet_description(glosses[s]) for s in order)
        for index, sense in enumerate(order):
            for example in usage_examples(glosses[sense]):
                span = find_word(example, word)
                if span is not None:
                    items.append(SenseItem(word, example, span[0], span[1], definitions, index))
    return items


def read_wordnet_rows(kb_file: str) -> list[tuple[str, int, str]]:
    """``(name, sense number, gloss)`` of a WordNet-shaped knowledge base (``kilm-ray import-kb
    --wordnet-dir``'s rows)."""
    from kilm_ray.data.corpus.knowledge import KBStats, iter_jsonl

    return [(row["name"], int(row.get("sense", 1)), row["gloss"]) for _, row in iter_jsonl(kb_file, KBStats())
            if isinstance(row.get("gloss"), str) and isinstance(row.get("name"), str)]


def seeded_sample(items: list[SenseItem], n: int, seed: int) -> list[SenseItem]:
    """A sample that depends on nothing but the items and the seed (a keyed hash order)."""
    def key(item: SenseItem) -> bytes:
        return hashlib.blake2b(f"{seed}:{item.word}:{item.gold}:{item.context}".encode(), digest_size=8).digest()

    ranked = sorted(items, key=key)
    return ranked[:n] if n else ranked


def most_frequent_sense_accuracy(items: list[SenseItem]) -> float:
    """WordNet orders senses by frequency in its tagged corpus: always answering sense 1."""
    return sum(item.gold == 0 for item in items) / len(items) if items else float("nan")


def random_accuracy(items: list[SenseItem]) -> float:
    """Expected accuracy of a uniform random choice among the senses."""
    return sum(1 / len(item.senses) for item in items) / len(items) if items else float("nan")
