"""Knowledge of entities: in-dump sources, external knowledge bases, and their lookup.

External knowledge base files are JSON Lines (optionally gzipped), one entity per line::

    {"name": "Aristotle", "description": "one of the greatest ancient Athenian philosophers"}

Optional fields: ``rank`` (lower wins when a name has several lines, default 0) and ``aliases``
(more names for the same description). Lines in the shape of WordNet rows (``name``, ``gloss``,
``sense``, ``instance``) are accepted as they are: the entity's description is the gloss of its
instance synset (a named entity) if it has one, else of its most frequent sense. Wikidata
descriptions fit the first shape (label -> name, description -> description).

A bad line (not JSON, no name, no description) is skipped and counted, and the first few are
named (``file:line: reason``) in the preprocessing stats.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

from kilm_ray import storage
from kilm_ray.data.corpus.wikitext import DISAMBIGUATION, EMPTY_TEXT, clean_description, is_disambiguation_title

_PAREN_SUFFIX = re.compile(r"\s*\([^)]*\)\s*$")


def kb_key(name: str) -> str:
    """Matching key between link targets and knowledge-base names: case- and underscore-insensitive."""
    return re.sub(r"\s+", " ", name.replace("_", " ")).strip().lower()


def kb_keys_for_title(title: str) -> list[str]:
    """Keys to try for a page title: as is, then without a disambiguator ("Mercury (planet)")."""
    keys = [kb_key(title)]
    bare = _PAREN_SUFFIX.sub("", title)
    if bare and bare != title:
        keys.append(kb_key(bare))
    return keys


def wordnet_description(gloss: str) -> str:
    """The definition part of a WordNet gloss, without its quoted usage examples."""
    return re.split(r';\s*"', gloss, maxsplit=1)[0].strip().rstrip(";").strip()


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


def _entry_from_row(row: dict) -> tuple[list[str], str, tuple]:
    """(names, description, priority) of one KB line; raises ValueError with the reason."""
    name = row.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ValueError("no 'name'")
    aliases = row.get("aliases") or []
    if not isinstance(aliases, list):
        raise ValueError("'aliases' is not a list")
    names = [name] + [a for a in aliases if isinstance(a, str) and a.strip()]
    if "description" in row:
        desc = row["description"]
        priority: tuple = (0, float(row.get("rank", 0)))
    elif "gloss" in row:  # WordNet-shaped row: instance synsets (named entities) first, then sense rank
        desc = wordnet_description(str(row["gloss"]))
        priority = (0 if row.get("instance") else 1, float(row.get("sense", 1)))
    else:
        raise ValueError("no 'description' (or WordNet 'gloss')")
    if not isinstance(desc, str) or not desc.strip():
        raise ValueError("empty description")
    return names, desc.strip(), priority


def select_best(rows: Iterable[tuple[int, dict]], source: str, stats: KBStats,
                max_chars: int = 400) -> dict[str, tuple[str, str]]:
    """key -> (display name, description), keeping the best-priority line for each key."""
    best: dict[str, tuple[tuple, str, str]] = {}
    for line_no, row in rows:
        stats.lines += 1
        try:
            names, desc, priority = _entry_from_row(row)
        except (ValueError, TypeError) as exc:
            stats.bad(f"{source}:{line_no}", str(exc))
            continue
        desc = clean_description(desc, max_chars)
        if desc is None:
            continue
        for name in names:
            key = kb_key(name)
            if key not in best or priority < best[key][0]:
                best[key] = (priority, name.strip(), desc)
    stats.entities += len(best)
    return {key: (name, desc) for key, (_, name, desc) in best.items()}


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
    """One line of a knowledge-base file -> (rows ``{key, description, p0, p1, p2}`` (one per name and
    alias; the smallest ``(p0, p1, p2, description)`` wins a key), None) or ([], the reason it is bad).
    ``source_index``: which ``--knowledge`` argument the file came from (earlier ones win). A blank line,
    or one whose description the filters drop, gives ([], None)."""
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
        names, desc, priority = _entry_from_row(row)
    except (ValueError, TypeError) as exc:
        return [], str(exc)
    desc = clean_description(desc, max_chars)
    if desc is None:
        return [], None
    p0, p1, p2 = kb_priority(source_index, priority)
    return [{"key": kb_key(name), "description": desc, "p0": p0, "p1": p1, "p2": p2} for name in names], None


def load_knowledge_base(uris: list[str], max_chars: int = 400,
                        sources: Optional[list[int]] = None) -> tuple[dict[str, str], KBStats]:
    """KB files -> key -> description, in one process (the lookup path). The winner of a key is the one
    the distributed path picks (``pipeline.rows.best_kb_rows``): the earlier source (``sources[i]``: the
    ``--knowledge`` argument file ``i`` came from; default: each file its own), then the row's own
    priority, then the description."""
    stats = KBStats()
    best: dict[str, tuple] = {}
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
                candidate = (r["p0"], r["p1"], r["p2"], r["description"])
                if r["key"] not in best or candidate < best[r["key"]]:
                    best[r["key"]] = candidate
    stats.entities = len(best)
    return {key: value[3] for key, value in best.items()}, stats


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


def write_kb_jsonl(table: dict[str, tuple[str, str]], out: str) -> int:
    """Write key -> (name, description) as our JSONL schema (gzipped if ``out`` ends in .gz)."""
    import gzip

    lines = "".join(json.dumps({"name": name, "description": desc}, ensure_ascii=False) + "\n"
                    for name, desc in sorted(table.values()))
    data = lines.encode("utf-8")
    storage.write_bytes(out, gzip.compress(data) if out.endswith(".gz") else data)
    return len(table)


# ----------------------------------------------------------------------------------------------
# The lookup used while building samples
# ----------------------------------------------------------------------------------------------


@dataclass
class KnowledgeLookup:
    """Redirects and descriptions by source; a plain picklable object shared by Ray actors."""

    redirects: dict[str, str] = field(default_factory=dict)
    template: dict[str, str] = field(default_factory=dict)
    first_sentence: dict[str, str] = field(default_factory=dict)
    external: dict[str, str] = field(default_factory=dict)
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

    def describe(self, title: str) -> Optional[tuple[str, str]]:
        """(description, source) of a resolved page title, trying the sources in order; None for a
        disambiguation page (it names several entities: no knowledge is right for a link to it)."""
        if title in self.disambiguation or is_disambiguation_title(title):
            return None
        for source in self.sources:
            if source == "external":
                for key in kb_keys_for_title(title):
                    if key in self.external:
                        return self.external[key], source
            else:
                desc = getattr(self, source).get(title)
                if desc:
                    return desc, source
        return None
