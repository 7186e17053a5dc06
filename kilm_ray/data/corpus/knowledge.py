"""Knowledge of entities: in-dump sources, external knowledge bases, and their lookup.

External knowledge base files are JSON Lines (optionally gzipped), one entity per line, in one of two
kinds, and each kind is matched to link targets by its own rule:

    {"title": "Paris", "description": "capital and largest city of France"}
        an entity with an English Wikipedia title (a Wikidata sitelink): matched on that exact title
        only (rule ``title``); its label and aliases are not names to match, since a label names many
        entities ("Paris" is a city, a prince, a dozen towns).
    {"name": "Aristotle", "description": "...", "aliases": [...], "qualifiers": ["philosopher"]}
        a knowledge base without titles (WordNet): matched case-insensitively on the name or an alias
        (rule ``name``), and a title with a disambiguator, "Mercury (planet)", on its bare name only when
        the row carries that qualifier (rule ``qualified``): never across a qualifier it does not carry.

Optional fields: ``rank`` (lower wins when a title, name or qualified name has several lines, default
0). Lines in the shape of WordNet rows (``name``, ``gloss``, ``sense``, ``instance``, ``hypernyms``) are
accepted as they are: a name's description is the gloss of its instance synset (a named entity) if it
has one, else of its most frequent sense; the hypernyms and the gloss's domain ("(Greek mythology)"),
with their head nouns ("terrestrial planet", "planet"), are the row's qualifiers.

A bad line (not JSON, no title or name, no description) is skipped and counted, and the first few are
named (``file:line: reason``) in the preprocessing stats.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator, Optional

from kilm_ray import storage
from kilm_ray.data.corpus.wikitext import (DISAMBIGUATION, EMPTY_TEXT, clean_description, is_disambiguation_title,
                                           normalize_title)

_PAREN_SUFFIX = re.compile(r"\s*\([^)]*\)\s*$")


def kb_key(name: str) -> str:
    """Matching key between link targets and knowledge-base names: case- and underscore-insensitive."""
    return re.sub(r"\s+", " ", name.replace("_", " ")).strip().lower()


# How a knowledge-base row is matched (the ``match`` of its rows; the rule counted in the stats).
TITLE, NAME, QUALIFIED = "title", "name", "qualified"
MATCH_RULES = (TITLE, NAME, QUALIFIED)


def split_qualifier(title: str) -> Optional[tuple[str, str]]:
    """("Mercury", "planet") for "Mercury (planet)"; None for a title without a disambiguator."""
    bare = _PAREN_SUFFIX.sub("", title)
    if not bare or bare == title:
        return None
    return bare, title[len(bare):].strip()[1:-1].strip()


def title_row_id(title: str) -> tuple[str, str, str]:
    """The row id of a titled row, and what a page title looks up for rule ``title``: one function for
    both sides, so the row and the lookup agree on Wikipedia's spelling rules."""
    return TITLE, kb_key(title), normalize_title(title) or ""


def match_keys(title: str) -> list[tuple[str, tuple[str, str, str]]]:
    """(rule, row id) to try for a resolved page title, in order: the exact title, the name, and for a
    title with a disambiguator its bare name carrying that qualifier. A row id is (match, key, exact):
    ``key`` groups rows (the lower-cased name), ``exact`` tells rows of one key apart (the title as
    Wikipedia spells it, or the qualifier)."""
    ids = [(TITLE, title_row_id(title)), (NAME, (NAME, kb_key(title), ""))]
    split = split_qualifier(title)
    if split is not None:
        ids.append((QUALIFIED, (QUALIFIED, kb_key(split[0]), kb_key(split[1]))))
    return ids


def external_knowledge(title: str, rows: dict) -> Optional[tuple[str, str]]:
    """(description, rule) of the first row that matches ``title`` (``rows``: row id -> description)."""
    for rule, row_id in match_keys(title):
        if row_id in rows:
            return rows[row_id], rule
    return None


def wordnet_description(gloss: str) -> str:
    """The definition part of a WordNet gloss, without its quoted usage examples."""
    return re.split(r';\s*"', gloss, maxsplit=1)[0].strip().rstrip(";").strip()


_GLOSS_DOMAIN = re.compile(r"^\(([^()]+)\)")


def wordnet_qualifiers(hypernyms: Iterable[str], gloss: str = "") -> list[str]:
    """A WordNet row's qualifiers: its hypernyms and the domain its gloss opens with ("(Greek mythology)
    the prince of Troy ..."), each also by its head noun ("terrestrial planet" -> "planet"): the words
    Wikipedia's disambiguators use ("Mercury (planet)", "Paris (mythology)")."""
    domain = _GLOSS_DOMAIN.match(gloss.strip())
    out: list[str] = []
    for name in [*hypernyms, *([domain.group(1)] if domain else [])]:
        if not isinstance(name, str) or not name.strip():
            continue
        for q in (name, name.split()[-1]):
            if kb_key(q) not in out:
                out.append(kb_key(q))
    return out


@dataclass
class KBStats:
    lines: int = 0
    entities: int = 0
    bad_lines: int = 0
    bad_examples: list[str] = field(default_factory=list)

    def bad(self, where: str, reason: str) -> None:
        self.bad_lines += 1
        if len(self.bad_examples) < 20:
            self.bad_examples.append(f"{where}: {reason}")


@dataclass(frozen=True)
class KBEntry:
    """One knowledge-base line: a titled entity (``title``) or named one (``names``, ``qualifiers``)."""

    title: Optional[str]
    names: tuple[str, ...]
    qualifiers: tuple[str, ...]
    description: str
    priority: tuple

    def row_ids(self) -> list[tuple[str, str, str]]:
        if self.title is not None:
            return [title_row_id(self.title)]
        ids = []
        for name in self.names:
            ids.append((NAME, kb_key(name), ""))
            ids.extend((QUALIFIED, kb_key(name), q) for q in self.qualifiers)
        return ids


def _strings(row: dict, field_name: str) -> list[str]:
    values = row.get(field_name) or []
    if not isinstance(values, list):
        raise ValueError(f"'{field_name}' is not a list")
    return [v.strip() for v in values if isinstance(v, str) and v.strip()]


def _entry_from_row(row: dict) -> KBEntry:
    """The entry of one KB line; raises ValueError with the reason."""
    title = row.get("title")
    if title is not None and (not isinstance(title, str) or not normalize_title(title)):
        raise ValueError("'title' is not a page title")
    name = row.get("name")
    if title is None and (not isinstance(name, str) or not name.strip()):
        raise ValueError("no 'title' or 'name'")
    names = [] if title is not None else [name.strip(), *_strings(row, "aliases")]
    if "description" in row:
        desc = row["description"]
        priority: tuple = (0, float(row.get("rank", 0)))
        qualifiers = [kb_key(q) for q in _strings(row, "qualifiers")]
    elif "gloss" in row:  # WordNet-shaped row: instance synsets (named entities) first, then sense rank
        desc = wordnet_description(str(row["gloss"]))
        priority = (0 if row.get("instance") else 1, float(row.get("sense", 1)))
        qualifiers = wordnet_qualifiers(_strings(row, "hypernyms"), str(row["gloss"]))
    else:
        raise ValueError("no 'description' (or WordNet 'gloss')")
    if not isinstance(desc, str) or not desc.strip():
        raise ValueError("empty description")
    return KBEntry(title.strip() if title is not None else None, tuple(names), tuple(dict.fromkeys(qualifiers)),
                   desc.strip(), priority)


def clean_entry(row: dict, max_chars: int) -> Optional[KBEntry]:
    """The entry of one KB line with its description through the description filters; None when they
    drop it. Raises ValueError / TypeError with the reason the line is bad."""
    entry = _entry_from_row(row)
    desc = clean_description(entry.description, max_chars)
    return None if desc is None else replace(entry, description=desc)


def flat_rank(priority: tuple) -> float:
    """A row's own priority as one ``rank`` (WordNet's (instance, sense) keeps its order)."""
    return priority[0] * 1e6 + priority[1]


def normalized_rows(rows: Iterable[tuple[int, dict]], source: str, stats: KBStats,
                    max_chars: int = 400) -> Iterator[dict]:
    """Every good line in our JSONL schema (``import-kb --jsonl / --wordnet-dir``): the same rows win the
    same titles, names and qualified names when the output is read as when the input is."""
    for line_no, row in rows:
        stats.lines += 1
        try:
            entry = clean_entry(row, max_chars)
        except (ValueError, TypeError) as exc:
            stats.bad(f"{source}:{line_no}", str(exc))
            continue
        if entry is None:
            continue
        stats.entities += 1
        out: dict = {"title": entry.title} if entry.title is not None else {"name": entry.names[0]}
        if len(entry.names) > 1:
            out["aliases"] = list(entry.names[1:])
        if entry.qualifiers:
            out["qualifiers"] = list(entry.qualifiers)
        out["description"] = entry.description
        if flat_rank(entry.priority):
            out["rank"] = flat_rank(entry.priority)
        yield out


def iter_jsonl(uri: str, stats: KBStats) -> Iterator[tuple[int, dict]]:
    for line_no, line in enumerate(storage.iter_lines(uri), start=1):
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            stats.lines += 1
            stats.bad(f"{uri}:{line_no}", f"not JSON ({exc.msg})")
            continue
        if not isinstance(row, dict):
            stats.lines += 1
            stats.bad(f"{uri}:{line_no}", "not a JSON object")
            continue
        yield line_no, row


KB_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.bz2", ".json", ".json.gz", ".json.bz2", ".gz", ".bz2")


def kb_priority(file_index: int, priority: tuple) -> tuple[float, float, float]:
    """Sort key of a knowledge-base row for one key: earlier files win, then the row's own priority
    (rank, or WordNet instance/sense), as ``load_knowledge_base`` merges them."""
    return float(file_index), float(priority[0]), float(priority[1])


def kb_line_rows(line: str, source_index: int, max_chars: int = 400) -> tuple[list[dict], Optional[str]]:
    """One line of a knowledge-base file -> (rows ``{key, match, exact, description, p0, p1, p2}``, one
    per row id (:meth:`KBEntry.row_ids`; the smallest ``(p0, p1, p2, description)`` wins a row id), None)
    or ([], the reason it is bad). ``source_index``: which ``--knowledge`` argument the file came from
    (earlier ones win). A blank line, or one whose description the filters drop, gives ([], None)."""
    line = line.strip()
    if not line:
        return [], None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        return [], f"not JSON ({exc.msg})"
    if not isinstance(row, dict):
        return [], "not a JSON object"
    try:
        entry = clean_entry(row, max_chars)
    except (ValueError, TypeError) as exc:
        return [], str(exc)
    if entry is None:
        return [], None
    p0, p1, p2 = kb_priority(source_index, entry.priority)
    return [{"key": key, "match": match, "exact": exact, "description": entry.description, "p0": p0, "p1": p1,
             "p2": p2}
            for match, key, exact in entry.row_ids()], None


def load_knowledge_base(uris: list[str], max_chars: int = 400,
                        sources: Optional[list[int]] = None) -> tuple[dict[tuple[str, str, str], str], KBStats]:
    """KB files -> row id (match, key, exact) -> description, in one process (the lookup path). The
    winner of a row id is the one the distributed path picks (``data.rows.best_kb_rows``): the earlier
    source (``sources[i]``: the ``--knowledge`` argument file ``i`` came from; default: each file its
    own), then the row's own priority, then the description."""
    stats = KBStats()
    best: dict[tuple, tuple] = {}
    for i, uri in enumerate(uris):
        source = sources[i] if sources else i
        for line_no, line in enumerate(storage.iter_lines(uri), start=1):
            if not line.strip():
                continue
            stats.lines += 1
            rows, reason = kb_line_rows(line, source, max_chars)
            if reason is not None:
                stats.bad(f"{uri}:{line_no}", reason)
            for r in rows:
                row_id = (r["match"], r["key"], r["exact"])
                candidate = (r["p0"], r["p1"], r["p2"], r["description"])
                if row_id not in best or candidate < best[row_id]:
                    best[row_id] = candidate
    stats.entities = len(best)
    return {row_id: value[3] for row_id, value in best.items()}, stats


# ----------------------------------------------------------------------------------------------
# WordNet importers
# ----------------------------------------------------------------------------------------------


def parse_wordnet_database(data_noun: str | Path, index_noun: str | Path) -> Iterator[dict]:
    """Rows {name, sense, gloss, instance, synset, hypernyms} from WordNet's ``data.noun`` and
    ``index.noun`` (as Debian's ``wordnet-base`` installs them under /usr/share/wordnet)."""
    synsets: dict[str, tuple[list[str], str, bool, list[str]]] = {}
    with open(data_noun, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("  "):  # licence header
                continue
            head, _, gloss = line.partition(" | ")
            fields = head.split()
            offset, w_cnt = fields[0], int(fields[3], 16)
            words = [fields[4 + 2 * i].replace("_", " ") for i in range(w_cnt)]
            words = [re.sub(r"\((?:p|a|ip)\)$", "", w) for w in words]
            p_idx = 4 + 2 * w_cnt
            p_cnt = int(fields[p_idx])
            pointers = [fields[p_idx + 1 + 4 * i: p_idx + 5 + 4 * i] for i in range(p_cnt)]
            instance = any(p[0] == "@i" for p in pointers)
            hypernym_offsets = [p[1] for p in pointers if p[0] in ("@", "@i") and p[2] == "n"]
            synsets[offset] = (words, gloss.strip(), instance, hypernym_offsets)
    with open(index_noun, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("  "):
                continue
            fields = line.split()
            lemma, synset_cnt, p_cnt = fields[0], int(fields[2]), int(fields[3])
            offsets = fields[4 + p_cnt + 2:][:synset_cnt]
            for sense, offset in enumerate(offsets, start=1):
                if offset not in synsets:
                    continue
                words, gloss, instance, hyper = synsets[offset]
                name = next((w for w in words if w.lower() == lemma.replace("_", " ")), lemma.replace("_", " "))
                yield {"name": name, "sense": sense, "gloss": gloss, "instance": instance, "synset": offset,
                       "hypernyms": [synsets[h][0][0] for h in hyper if h in synsets]}


def write_kb_jsonl(rows: Iterable[dict], out: str) -> int:
    """Write rows of our JSONL schema (``normalized_rows``), gzipped if ``out`` ends in .gz."""
    import gzip

    lines = [json.dumps(row, ensure_ascii=False) + "\n" for row in rows]
    data = "".join(lines).encode("utf-8")
    storage.write_bytes(out, gzip.compress(data) if out.endswith(".gz") else data)
    return len(lines)


# ----------------------------------------------------------------------------------------------
# The lookup used while building samples
# ----------------------------------------------------------------------------------------------


@dataclass
class KnowledgeLookup:
    """Redirects and descriptions by source; a plain picklable object shared by Ray actors."""

    redirects: dict[str, str] = field(default_factory=dict)
    template: dict[str, str] = field(default_factory=dict)
    first_sentence: dict[str, str] = field(default_factory=dict)
    external: dict[tuple[str, str, str], str] = field(default_factory=dict)  # row id -> description
    sources: tuple[str, ...] = ("template", "first_sentence", "external")
    disambiguation: set[str] = field(default_factory=set)

    def add_page(self, record: dict) -> None:
        """Take what one page record (``corpus.articles.page_record``) says about entities."""
        if record["kind"] == "redirect":
            self.redirects[record["title"]] = record["redirect"]
        elif record["kind"] == "article":
            if record["short_description"]:
                self.template[record["title"]] = record["short_description"]
            if record["first_sentence"]:
                self.first_sentence[record["title"]] = record["first_sentence"]
        elif record["kind"] == "skipped" and record.get("reason") == DISAMBIGUATION:
            self.disambiguation.add(record["title"])
        elif record["kind"] == "skipped" and record.get("reason") == EMPTY_TEXT and record.get("short_description"):
            self.template[record["title"]] = record["short_description"]

    def resolve(self, title: str, max_hops: int = 5) -> str:
        seen = {title}
        for _ in range(max_hops):
            nxt = self.redirects.get(title)
            if nxt is None or nxt in seen:
                break
            seen.add(nxt)
            title = nxt
        return title

    def describe(self, title: str) -> Optional[tuple[str, str, Optional[str]]]:
        """(description, source, rule) of a resolved page title, trying the sources in order (``rule``:
        how an external row matched, else None); None for a disambiguation page (it names several
        entities: no knowledge is right for a link to it)."""
        if title in self.disambiguation or is_disambiguation_title(title):
            return None
        for source in self.sources:
            if source == "external":
                found = external_knowledge(title, self.external)
                if found is not None:
                    return found[0], source, found[1]
            else:
                desc = getattr(self, source).get(title)
                if desc:
                    return desc, source, None
        return None
