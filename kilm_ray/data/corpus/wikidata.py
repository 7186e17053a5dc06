"""Wikidata's JSON dump (``latest-all.json.bz2`` / ``.gz``) as knowledge-base rows: pure functions, no Ray.

The dump is one JSON array with one entity per line::

    [
    {"type":"item","id":"Q31","labels":{...},"descriptions":{...},"aliases":{...},"claims":{...},"sitelinks":{...}},
    {"type":"property","id":"P31",...},
    ...
    ]

Every entity line but the last ends with a comma. An item is kept when it has an English description
and an English Wikipedia article, and is matched on that article's exact title (``sitelinks.enwiki.title``)
only: a sitelink names exactly one article, which is what links point to, while labels and aliases are
ambiguous ("Paris" is a city, a prince, a dozen towns; a red link to "John Smith (cricketer, born 1850)"
must not get another John Smith's description). So items without an enwiki sitelink have nothing to
match and are skipped; properties, lexemes and disambiguation pages (instance of Q4167410) too; all
counted.

The rows are our knowledge-base JSONL schema (``kilm_ray.data.corpus.knowledge``): ``title``,
``description``, and ``wikidata`` and ``label`` for provenance (not matched).
"""

from __future__ import annotations

import json
from typing import Any, Optional

DISAMBIGUATION_ITEM = "Q4167410"  # "Wikimedia disambiguation page"

# What happened to one line (the counts in the import's stats).
KEPT = "kept"
SKIPPED = ("property", "other_type", "no_english_description", "no_enwiki_sitelink", "disambiguation")


class MalformedEntity(ValueError):
    """A line that is not an entity of the dump's layout; the message says why."""


def entity_of_line(line: str) -> Optional[dict[str, Any]]:
    """The entity on one dump line; None for the array's ``[`` / ``]`` lines and blank lines."""
    text = line.strip()
    if text.endswith(","):
        text = text[:-1].rstrip()
    if text in ("", "[", "]"):
        return None
    try:
        entity = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MalformedEntity(f"not JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(entity, dict):
        raise MalformedEntity("not a JSON object")
    if not isinstance(entity.get("id"), str) or not isinstance(entity.get("type"), str):
        raise MalformedEntity("no entity 'id' / 'type'")
    return entity


def _english(entity: dict, field: str) -> Optional[str]:
    value = (entity.get(field) or {}).get("en")
    text = value.get("value") if isinstance(value, dict) else None
    return text.strip() if isinstance(text, str) and text.strip() else None


def _is_disambiguation(entity: dict, description: str) -> bool:
    if description.lower() == "wikimedia disambiguation page":
        return True
    for claim in (entity.get("claims") or {}).get("P31") or []:
        value = ((claim.get("mainsnak") or {}).get("datavalue") or {}).get("value")
        if isinstance(value, dict) and value.get("id") == DISAMBIGUATION_ITEM:
            return True
    return False


def entity_rows(entity: dict[str, Any]) -> tuple[list[dict], str]:
    """Knowledge-base rows of one entity (one row, keyed by its enwiki title, or none) and what
    happened to it (:data:`KEPT` or one of :data:`SKIPPED`)."""
    if entity["type"] != "item":
        return [], "property" if entity["type"] == "property" else "other_type"
    description = _english(entity, "descriptions")
    if description is None:
        return [], "no_english_description"
    if _is_disambiguation(entity, description):
        return [], "disambiguation"
    enwiki = ((entity.get("sitelinks") or {}).get("enwiki") or {}).get("title")
    if not isinstance(enwiki, str) or not enwiki.strip():
        return [], "no_enwiki_sitelink"
    row = {"title": enwiki.strip(), "description": description, "wikidata": entity["id"]}
    label = _english(entity, "labels")
    if label is not None and label != row["title"]:
        row["label"] = label
    return [row], KEPT


def line_rows(line: str) -> tuple[list[dict], Optional[str]]:
    """One dump line -> (rows, outcome); outcome None for the array's bracket lines and blank lines.
    Raises :class:`MalformedEntity`."""
    entity = entity_of_line(line)
    if entity is None:
        return [], None
    return entity_rows(entity)


def write_dump(entities: list[dict], out: str) -> str:
    """Entities in the dump's exact layout (``[``, one entity per line with a trailing comma but the
    last, ``]``), compressed by the file's suffix (.bz2, .gz). For tests and benchmarks."""
    import bz2
    import gzip

    from kilm_ray import storage

    body = "[\n" + ",\n".join(json.dumps(e, ensure_ascii=False, separators=(",", ":")) for e in entities) + "\n]\n"
    data = body.encode()
    if out.endswith(".bz2"):
        data = bz2.compress(data)
    elif out.endswith(".gz"):
        data = gzip.compress(data)
    storage.write_bytes(out, data)
    return out


MAX_EXAMPLES = 20


def convert_range(lines, where, write_row) -> dict[str, Any]:
    """Every line of one byte range of the dump -> knowledge-base rows (``write_row(row)``); returns the
    counts: ``entities`` (entity lines), ``rows``, one count per outcome, ``malformed`` with the first
    examples (``where(line_no): reason``)."""
    counts: dict[str, Any] = {"entities": 0, "rows": 0, "malformed": 0, "malformed_examples": []}
    for line_no, line in enumerate(lines, start=1):
        try:
            rows, outcome = line_rows(line)
        except MalformedEntity as exc:
            counts["malformed"] += 1
            if len(counts["malformed_examples"]) < MAX_EXAMPLES:
                counts["malformed_examples"].append(f"{where(line_no)}: {exc}")
            continue
        if outcome is None:
            continue
        counts["entities"] += 1
        counts[outcome] = counts.get(outcome, 0) + 1
        for row in rows:
            write_row(row)
        counts["rows"] += len(rows)
    return counts


def sum_counts(parts: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {"entities": 0, "rows": 0, "malformed": 0, "malformed_examples": []}
    for part in parts:
        for key, value in part.items():
            if key == "malformed_examples":
                total[key].extend(value[: MAX_EXAMPLES - len(total[key])])
            else:
                total[key] = total.get(key, 0) + value
    return total
