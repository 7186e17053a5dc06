"""Link resolution as row operations: the pure functions behind the distributed knowledge join.

Nothing here holds a table of the corpus. The Ray Data plan (``kilm_ray.data.plan``) brings together, by
key, the rows that belong together (a link and the redirect of its target; all links to one
entity with that entity's knowledge; one page with its resolved links) and calls these functions on
each group. The same functions, fed from a :class:`~kilm_ray.data.corpus.knowledge.KnowledgeLookup`,
serve the single-process baseline and the unit tests, so both paths make identical samples.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

from kilm_ray.data.corpus.knowledge import QUALIFIED, kb_key, split_qualifier

PENDING = "pending"  # the choice needs the qualified knowledge-base row of the title without its "(...)"


def page_link_targets(doc: str) -> list[str]:
    """Distinct link targets of one parsed page (``page_record``'s ``doc``), sorted."""
    return sorted({link[2] for _, links in json.loads(doc) for link in links})


def follow_redirect(src: str, dst: str, next_dst: Optional[str]) -> str:
    """One round of redirect-chain compression: ``src -> dst -> next_dst`` becomes ``src -> next_dst``.
    A chain that comes back to ``src`` (a redirect loop) keeps its first hop, as the lookup did."""
    return next_dst if next_dst is not None and next_dst != src else dst


def entity_key(title: str) -> str:
    """The grouping key of a resolved title: its knowledge-base key (in-dump knowledge is matched on
    the exact title inside the group, external knowledge on the key)."""
    return kb_key(title)


def bare_key(title: str) -> Optional[str]:
    """The key of the title without a disambiguator ("Mercury (planet)" -> "mercury"), if it has one."""
    split = split_qualifier(title)
    return kb_key(split[0]) if split is not None else None


Choice = tuple[str, str, Optional[str]]  # (description, source, rule of an external match)


def choose_knowledge(sources: Sequence[str], template: Optional[str], first_sentence: Optional[str],
                     external: Optional[tuple[str, str]], has_bare: bool = False, external_bare: Optional[str] = None,
                     bare_looked_up: bool = False) -> Optional[Choice] | str:
    """(description, source, rule) by ``corpus.knowledge_sources`` order, as ``KnowledgeLookup.describe``
    does (``external``: the (description, rule) of the title's own row, by title or name); None if no
    source knows the entity; :data:`PENDING` if the answer depends on the qualified row of the title
    without its disambiguator (``has_bare``), which was not looked up yet."""
    for source in sources:
        if source == "template" and template:
            return template, source, None
        if source == "first_sentence" and first_sentence:
            return first_sentence, source, None
        if source == "external":
            if external:
                return external[0], source, external[1]
            if has_bare:
                if not bare_looked_up:
                    return PENDING
                if external_bare:
                    return external_bare, source, QUALIFIED
    return None


def sample_hash(seed: int, text: str) -> int:
    """A seeded 64-bit hash: paragraphs with the smallest values form the tokenizer's sample, the same
    whatever the order or grouping in which they were read."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{text}".encode(), digest_size=8).digest(), "big") >> 1


def sample_threshold(wanted: int, total: int, margin: float = 1.25) -> int:
    """Hash threshold that keeps about ``margin * wanted`` of ``total`` paragraphs (all if fewer)."""
    if total <= wanted:
        return 2**63
    return min(2**63, int(2**63 * min(1.0, margin * wanted / total)))


@dataclass(frozen=True)
class ResolvedLink:
    title: str
    source: str
    knowledge: list[int]
    rule: Optional[str] = None  # how an external knowledge-base row matched (knowledge.MATCH_RULES)


LinkResolver = Callable[[str], Optional[ResolvedLink]]


def lookup_resolver(lookup, make_knowledge: Callable[[str, str], list[int]],
                    cache: Optional[dict] = None) -> LinkResolver:
    """A resolver over an in-memory :class:`KnowledgeLookup` (the single-process baseline, tests)."""
    cache = {} if cache is None else cache

    def resolve(target: str) -> Optional[ResolvedLink]:
        title = lookup.resolve(target)
        if title not in cache:
            found = lookup.describe(title)
            cache[title] = None if found is None else ResolvedLink(title, found[1], make_knowledge(title, found[0]),
                                                                   found[2])
        return cache[title]

    return resolve


def table_resolver(rows: Iterable[tuple[str, str, str, list[int], Optional[str]]]) -> LinkResolver:
    """A resolver over one page's resolved links ``(target, title, source, knowledge, rule)``, as the
    distributed join brings them back to their page; a target not among them has no knowledge."""
    table = {target: ResolvedLink(title, source, list(knowledge), rule)
             for target, title, source, knowledge, rule in rows}
    return table.get
