"""Evaluation by mention: which held-out mentions there are and whether their entity was trained on.

Pure functions over :class:`~kilm_ray.loader.SampleStore` objects (no Ray, no torch). The splits are
by article (``kilm_ray.corpus.articles.split_of``), so an evaluated mention is never a training
sample; what varies is the entity. A mention is **seen** when its entity's knowledge (a chunk of the
train split links it, with knowledge) was in the training data: the question is whether the model
brings that knowledge back in a context it never saw. **unseen** entities test generalisation to
knowledge the model was never given.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

from kilm_ray.eval.metrics import normalize

GROUPS = ("seen", "unseen")  # the entity groups every probe reports


@dataclass(frozen=True)
class Mention:
    split: str
    row: int  # position in the split's store
    entity: int  # index among the chunk's entities
    sample_id: int
    article: str
    surface: str
    title: str
    knowledge: tuple[int, ...]
    seen: bool = False  # the entity's knowledge was in the training data

    @property
    def group(self) -> str:
        return GROUPS[0] if self.seen else GROUPS[1]

    @property
    def title_is_surface(self) -> bool:
        """The copy rule gets the title: the mention text is the title, up to case and punctuation."""
        return normalize(self.surface) == normalize(self.title)


def trained_titles(train_store) -> Counter:
    """Entity title -> linked mentions with knowledge in the training split."""
    counts: Counter = Counter()
    for i in range(len(train_store)):
        counts.update(train_store.entity_titles(i))
    return counts


def iter_mentions(store, split: str, decode, max_entities: int,
                  trained: Optional[Iterable[str]] = None) -> Iterator[Mention]:
    """Every stored mention of a split (the first ``max_entities`` per chunk), labelled seen/unseen
    against ``trained`` titles. ``decode`` turns token ids into text."""
    trained = trained if trained is not None else ()
    for i in range(len(store)):
        ids = store.ids(i)
        article = store.article(i)
        for j, (ent, title) in enumerate(zip(store.entities(i)[:max_entities], store.entity_titles(i))):
            yield Mention(split, i, j, store.sample_id(i), article, decode(ids[ent.start:ent.end]).strip(), title,
                          tuple(int(t) for t in ent.knowledge), title in trained)


def split_invariants(stores: dict[str, object]) -> dict[str, int]:
    """What makes the evaluation held out, checked on the data: no evaluated sample id and no
    evaluated article is in train. Returns the counts; raises ``AssertionError`` naming a violation."""
    def ids_and_articles(store) -> tuple[set[int], set[str]]:
        return ({store.sample_id(i) for i in range(len(store))}, {store.article(i) for i in range(len(store))})

    train_ids, train_articles = ids_and_articles(stores["train"])
    out = {"train_samples": len(train_ids), "train_articles": len(train_articles)}
    for split, store in stores.items():
        if split == "train":
            continue
        ids, articles = ids_and_articles(store)
        shared_ids, shared_articles = ids & train_ids, articles & train_articles
        if shared_ids or shared_articles:
            raise AssertionError(f"{split} is not held out: {len(shared_ids)} sample ids and "
                                 f"{len(shared_articles)} articles also in train, e.g. "
                                 f"{sorted(shared_articles)[:3] or sorted(shared_ids)[:3]}")
        out[f"{split}_samples"], out[f"{split}_articles"] = len(ids), len(articles)
    return out


def group_counts(mentions: Iterable[Mention]) -> dict[str, int]:
    counts = Counter(m.group for m in mentions)
    return {g: counts[g] for g in GROUPS}
