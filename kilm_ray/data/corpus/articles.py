"""From a raw dump page to KILM chunks: the per-page and per-article steps of preprocessing, as pure
functions that the Ray Data pipeline (``kilm_ray.data.plan``) maps over blocks and that a plain loop
(``bench/preprocess_throughput.py``) calls directly."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from kilm_ray.method.chunking import Chunk, Encode, pack_chunks, tokenize_paragraph
from kilm_ray.data.corpus.dump import MalformedPage, RawPage, parse_page_xml, title_of_raw
from kilm_ray.data.corpus.knowledge import MATCH_RULES
from kilm_ray.data.corpus.links import LinkResolver, ResolvedLink
from kilm_ray.data.corpus.wikitext import (
    DISAMBIGUATION, EMPTY_TEXT, ENWIKI, Paragraph, SiteNamespaces, clean_description, first_sentence, is_article_title,
    is_disambiguation, normalize_title, parse_article, redirect_target,
)

SPLITS = ("train", "valid", "test")  # valid and test: articles held out of training


def page_record(raw: RawPage, mode: str = "lead", max_description_chars: int = 400,
                namespaces: SiteNamespaces = ENWIKI) -> dict[str, Any]:
    """One row per dump page: what it is (article / redirect / skipped / error), why,
    and for articles the cleaned paragraphs (JSON) with their own short description and first sentence.
    A disambiguation page is neither text to train on nor knowledge; its title is kept (links to it
    carry no knowledge)."""
    row: dict[str, Any] = {"kind": "skipped", "reason": None, "title": None, "page_id": -1, "redirect": None,
                           "short_description": None, "first_sentence": None, "doc": None,
                           "where": f"{raw.source}#page{raw.index}"}
    if raw.xml is None:
        row.update(kind="error", reason="truncated_input", title=raw.error)
        return row
    try:
        page = parse_page_xml(raw.xml)
    except MalformedPage as exc:
        row.update(kind="error", reason="malformed_page", title=f"{title_of_raw(raw.xml)}: {exc}")
        return row
    row.update(title=page.title, page_id=page.page_id)
    target = normalize_title(page.redirect) if page.redirect else redirect_target(page.text)
    if target:
        row.update(kind="redirect", redirect=target)
        return row
    if not is_article_title(page.title, page.ns, namespaces):
        row.update(reason="namespace")
        return row
    if is_disambiguation(page.title, page.text):
        row.update(reason=DISAMBIGUATION)
        return row
    try:
        article = parse_article(page.text, mode, namespaces)
    except Exception as exc:  # the parser is robust, but one page must never stop the job
        row.update(kind="error", reason="unparsable_wikitext", title=f"{page.title}: {type(exc).__name__}: {exc}")
        return row
    if not article.paragraphs:  # no text to train on (a lead that is only a list or a table), but a
        # {{Short description}} is still the entity's knowledge, as in the official code
        row.update(reason=EMPTY_TEXT, short_description=clean_description(article.short_description,
                                                                          max_description_chars))
        return row
    row.update(
        kind="article",
        short_description=clean_description(article.short_description, max_description_chars),
        first_sentence=clean_description(first_sentence(article.paragraphs[0].text), max_description_chars),
        doc=json.dumps([[p.text, [[l.start, l.end, l.target] for l in p.links]] for p in article.paragraphs],
                       ensure_ascii=False),
    )
    return row


def paragraphs_from_doc(doc: str) -> list[Paragraph]:
    from kilm_ray.data.corpus.wikitext import Link

    return [Paragraph(text, [Link(s, e, t) for s, e, t in links]) for text, links in json.loads(doc)]


def split_of(title: str, seed: int, valid_fraction: float, test_fraction: float) -> tuple[str, ...]:
    """The split an article's chunks go to, from a keyed hash of its title (a seeded shuffle that
    needs no global pass): ('test',), ('valid',) or ('train',). An article is in one split only, so
    nothing evaluated is a training sample; whether an evaluated mention's entity was seen in
    training is a property of the mention (kilm_ray.eval.split), not of the split."""
    def unit(salt: str) -> float:
        digest = hashlib.blake2b(f"{seed}:{salt}:{title}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64

    if unit("unseen") < test_fraction:  # the salt of the old held-out split: same test articles
        return ("test",)
    if unit("valid") < valid_fraction / max(1.0 - test_fraction, 1e-9):
        return ("valid",)
    return ("train",)


@dataclass
class LinkCounts:
    links: int = 0
    template: int = 0
    first_sentence: int = 0
    external: int = 0
    no_knowledge: int = 0
    # external knowledge by how its knowledge-base row matched (corpus.knowledge.MATCH_RULES)
    external_by_rule: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MATCH_RULES, 0))

    def count(self, hit: ResolvedLink) -> None:
        setattr(self, hit.source, getattr(self, hit.source) + 1)
        if hit.rule is not None:
            self.external_by_rule[hit.rule] += 1


def article_chunks(paragraphs: list[Paragraph], resolve_link: LinkResolver, encode: Encode,
                   decode: Callable[[list[int]], str], newline_ids: list[int], max_text_tokens: int,
                   min_chunk_tokens: int, retitle: Optional[Callable[[str, str, list[int]], list[int]]] = None,
                   ) -> tuple[list[Chunk], LinkCounts]:
    """Resolve each link (``resolve_link``: redirects, then knowledge sources in order), tokenize, and
    chunk. A link without knowledge stays plain surface text. ``retitle(surface, title, knowledge)``
    may respell a mention's knowledge (``data.title_as_mentioned``)."""
    counts = LinkCounts()
    pieces = []
    for para in paragraphs:
        links = []
        for link in para.links:
            counts.links += 1
            hit = resolve_link(link.target)
            if hit is None:
                counts.no_knowledge += 1
                continue
            counts.count(hit)
            knowledge = hit.knowledge
            if retitle is not None:
                knowledge = retitle(para.text[link.start:link.end], hit.title, list(knowledge))
            links.append((link.start, link.end, hit.title, hit.source, knowledge))
        pieces.append(tokenize_paragraph(encode, para.text, links))
    chunks = pack_chunks(pieces, max_text_tokens, newline_ids, min_chunk_tokens, decode)
    return chunks, counts


def chunk_rows(page_id: int, title: str, chunks: list[Chunk], splits: tuple[str, ...],
               train_min_mentions: int = 0) -> list[dict[str, Any]]:
    """Parquet rows of an article's chunks. ``sample_id = page_id * 10000 + chunk index``: stable
    across runs and independent of how Ray scheduled the work. Training chunks with fewer than
    ``train_min_mentions`` linked entities (with knowledge) are left out."""
    rows = []
    for index, chunk in enumerate(chunks):
        for split in splits:
            if split != "train" and not chunk.mentions:
                continue  # evaluation samples are per entity
            if split == "train" and len(chunk.mentions) < train_min_mentions:
                continue
            rows.append({
                "split": split,
                "sample_id": page_id * 10_000 + index,
                "article": title,
                "chunk_index": index,
                "text": chunk.text,
                "input_ids": chunk.input_ids,
                "ent_start": [m.start for m in chunk.mentions],
                "ent_end": [m.end for m in chunk.mentions],
                "ent_title": [m.title for m in chunk.mentions],
                "ent_source": [m.source for m in chunk.mentions],
                "ent_knowledge": [m.knowledge for m in chunk.mentions],
            })
    return rows
