"""Synthetic dumps shaped like English Wikipedia, and synthetic knowledge bases, at any size.

    python bench/synthetic_enwiki.py --articles 10000 --kb-rows 100000 --out /tmp/syn10k

Writes ``enwiki-synthetic-pages-articles-multistream.xml.bz2`` with its ``-index.txt.bz2`` (streams of
100 pages, as Wikimedia cuts them) and ``kb.jsonl.gz``. The shape follows enwiki where it matters to
preprocessing cost: about 1.6 redirect pages per article (2% of them chained), a ``{{Short description}}``
on 80% of articles, link targets drawn Zipf-like (popular entities are linked from everywhere; 5% of
links go to missing pages, 25% through a redirect), an infobox with links, ``<ref>`` citations with
``{{cite web}}``, bold title, sections, lists, a table, categories, HTML comments; about 6 KB of
wikitext per article (enwiki's mean). The knowledge base has ``{name, description}`` rows (30% with an
alias): article titles, linked entities that have no article, and entities nobody links to. Deterministic
in ``--seed``; streaming, so the generator itself stays small at any size.
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import json
import random
from pathlib import Path
from xml.sax.saxutils import escape

WORDS = ("river city county village school war party church battle house district railway station "
         "football club album song film series novel island mountain lake bridge road company king "
         "queen bishop army navy election museum university college hospital airport species genus "
         "family language people province region valley castle tower park garden temple market harbor "
         "the of and in a to was is for on as by with from at that which it his her their its were "
         "first second new old north south east west great little upper lower saint royal national "
         "early late during after before between under over about against within without into").split()
PAGES_PER_STREAM = 100


def title_of(k: int) -> str:
    rng = random.Random(k * 7919)
    words = [rng.choice(WORDS).capitalize() for _ in range(rng.randint(1, 3))]
    return f"{' '.join(words)} {k}" + (" (disambiguation)" if k % 97 == 0 else "")


def _sentence(rng: random.Random, link) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(8, 22))]
    for _ in range(rng.randint(1, 3)):
        words.insert(rng.randrange(len(words)), link())
    if rng.random() < 0.3:
        words.append(f"<ref>{{{{cite web|url=https://example.org/{rng.randrange(10**6)}|title={rng.choice(WORDS)}"
                     f"|date=2020-01-{rng.randint(10, 28)}|publisher={rng.choice(WORDS).capitalize()}}}}}</ref>")
    text = " ".join(words)
    return text[0].upper() + text[1:] + "."


class Shape:
    """Which page each link points at: Zipf-like over articles, sometimes via a redirect or to nowhere."""

    def __init__(self, articles: int, seed: int):
        self.articles = articles
        self.redirects = int(articles * 1.6)
        self.rng = random.Random(seed)
        self.weights_cum = []
        total = 0.0
        for rank in range(1, articles + 1):
            total += 1.0 / rank
            self.weights_cum.append(total)

    def target(self, rng: random.Random) -> str:
        roll = rng.random()
        if roll < 0.05:  # an entity without an article; the knowledge base knows many of them
            return missing_title(rng.randrange(2 * self.articles))
        pick = rng.random() * self.weights_cum[-1]
        lo, hi = 0, self.articles - 1
        while lo < hi:  # bisect on the cumulative Zipf weights
            mid = (lo + hi) // 2
            if self.weights_cum[mid] < pick:
                lo = mid + 1
            else:
                hi = mid
        article = (lo * 2654435761) % self.articles  # popular entities spread over the id range
        if roll < 0.30:
            return redirect_title(article, rng.randrange(2))
        return title_of(article)


def missing_title(n: int) -> str:
    return f"Missing page {n}"


def redirect_title(article: int, variant: int) -> str:
    return f"{title_of(article)} alias{variant}"


def article_xml(k: int, page_id: int, shape: Shape) -> str:
    rng = random.Random(k)
    title = title_of(k)

    def link() -> str:
        target = shape.target(rng)
        return f"[[{target}|{rng.choice(WORDS)} {rng.choice(WORDS)}]]" if rng.random() < 0.4 else f"[[{target}]]"

    parts = []
    if rng.random() < 0.8:
        parts.append(f"{{{{Short description|{rng.choice(WORDS).capitalize()} {rng.choice(WORDS)} in "
                     f"{rng.choice(WORDS)}}}}}")
    parts.append("{{Use dmy dates|date=March 2021}}")
    infobox = "\n".join(f"| {rng.choice(WORDS)}_{i} = {link()}" for i in range(rng.randint(6, 14)))
    parts.append(f"{{{{Infobox {rng.choice(WORDS)}\n| name = {title}\n{infobox}\n}}}}")
    parts.append(f"'''{title}''' ({rng.choice(WORDS)}) is a {rng.choice(WORDS)} {rng.choice(WORDS)} "
                 f"{link()} of {link()}. " + " ".join(_sentence(rng, link) for _ in range(rng.randint(2, 4))))
    parts.append(" ".join(_sentence(rng, link) for _ in range(rng.randint(2, 5))))
    parts.append("<!-- hidden editor note -->")
    for section in range(rng.randint(2, 4)):
        parts.append(f"== {rng.choice(WORDS).capitalize()} {section} ==")
        for _ in range(rng.randint(1, 3)):
            parts.append(" ".join(_sentence(rng, link) for _ in range(rng.randint(3, 6))))
        if rng.random() < 0.3:
            parts.append("\n".join(f"* {link()} {rng.choice(WORDS)}" for _ in range(rng.randint(3, 6))))
        if rng.random() < 0.15:
            parts.append("{| class=\"wikitable\"\n! a !! b\n|-\n| " + link() + " || 12\n|}")
    parts.append("== References ==\n{{Reflist}}")
    parts.append("== External links ==\n* [https://example.org/" + str(k) + " Official site]")
    parts.append("\n".join(f"[[Category:{rng.choice(WORDS).capitalize()} {rng.randrange(500)}]]"
                           for _ in range(rng.randint(2, 5))))
    return _page(title, page_id, "\n\n".join(parts))


def _page(title: str, page_id: int, text: str, redirect: str | None = None) -> str:
    redirect_tag = f'    <redirect title="{escape(redirect, {chr(34): "&quot;"})}" />\n' if redirect else ""
    return (f"  <page>\n    <title>{escape(title)}</title>\n    <ns>0</ns>\n    <id>{page_id}</id>\n{redirect_tag}"
            f"    <revision>\n      <id>{page_id + 10**9}</id>\n      <text xml:space=\"preserve\">{escape(text)}"
            f"</text>\n    </revision>\n  </page>\n")


def pages(articles: int, seed: int):
    """(page_id, title, xml) of every page: articles with their redirects interleaved, as in a dump."""
    shape = Shape(articles, seed)
    page_id = 1
    for k in range(articles):
        yield page_id, title_of(k), article_xml(k, page_id, shape)
        page_id += 1
        rng = random.Random(-k - 1)
        for variant in range(2 if rng.random() < 0.6 else 1):
            target = title_of(k)
            if rng.random() < 0.02 and k:  # a chain: alias -> alias of another -> article
                target = redirect_title(k - 1, 0)
            title = redirect_title(k, variant)
            yield page_id, title, _page(title, page_id, f"#REDIRECT [[{target}]]", target)
            page_id += 1


def write_dump(articles: int, out: Path, seed: int = 0) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    dump = out / "enwiki-synthetic-pages-articles-multistream.xml.bz2"
    index_lines = []
    with open(dump, "wb") as f:
        f.write(bz2.compress(b"<mediawiki>\n"))
        group: list[str] = []
        entries: list[tuple[int, str]] = []

        def flush() -> None:
            offset = f.tell()
            index_lines.extend(f"{offset}:{pid}:{title}" for pid, title in entries)
            f.write(bz2.compress("".join(group).encode()))
            group.clear()
            entries.clear()

        for page_id, title, xml in pages(articles, seed):
            group.append(xml)
            entries.append((page_id, title))
            if len(group) == PAGES_PER_STREAM:
                flush()
        if group:
            flush()
        f.write(bz2.compress(b"</mediawiki>\n"))
    index = out / "enwiki-synthetic-pages-articles-multistream-index.txt.bz2"
    index.write_bytes(bz2.compress(("\n".join(index_lines) + "\n").encode()))
    return dump


def write_kb(rows: int, articles: int, out: Path, seed: int = 0) -> Path:
    rng = random.Random(seed + 1)
    path = out / "kb.jsonl.gz"
    with gzip.open(path, "wt") as f:
        for i in range(rows):
            # A quarter each: article titles (their in-dump knowledge wins), linked entities without an
            # article (the KB's own answers), and entities nobody links to (half).
            kind, n = i % 4, i // 4
            name = (title_of(n % articles) if kind == 0 else missing_title(n) if kind == 1
                    else f"Entity {rng.choice(WORDS)} {i}")
            row = {"name": name, "description": f"{rng.choice(WORDS)} {rng.choice(WORDS)} of {rng.choice(WORDS)}"}
            if rng.random() < 0.3:
                row["aliases"] = [f"{name} ({rng.choice(WORDS)})"]
            f.write(json.dumps(row) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--articles", type=int, required=True)
    parser.add_argument("--kb-rows", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    dump = write_dump(args.articles, args.out, args.seed)
    print(dump, dump.stat().st_size)
    if args.kb_rows:
        kb = write_kb(args.kb_rows, args.articles, args.out, args.seed)
        print(kb, kb.stat().st_size)


if __name__ == "__main__":
    main()
