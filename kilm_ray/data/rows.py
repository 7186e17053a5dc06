"""The tables of the pipeline and the row conversions between them: pure functions over pyarrow tables
(no Ray), each mapped over blocks or called on one bucket of a group-by by the stages.

The parse stage stores each dump page's record split into the tables later stages read, so that a stage
reads only what it needs and the large ``doc`` column is scanned only by the steps that use it:

    articles        page_id, title, doc         chunking (and the tokenizer's paragraph sample)
    links           page_id, target             one row per distinct link target of an article
    redirects       title, redirect
    knowledge       title, short_description, first_sentence   in-dump knowledge of articles
    disambiguation  title                        pages whose links carry no knowledge
"""

from __future__ import annotations

import json
import zlib
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kilm_ray.data.corpus.wikitext import DISAMBIGUATION, EMPTY_TEXT
from kilm_ray.data.corpus.knowledge import MATCH_RULES
from kilm_ray.data.corpus.links import entity_key, follow_redirect

RAW_SCHEMA = pa.schema([("source", pa.string()), ("index", pa.int64()), ("xml", pa.large_string()),
                        ("error", pa.string())])
PAGE_SCHEMA = pa.schema([
    ("kind", pa.string()), ("reason", pa.string()), ("title", pa.string()), ("page_id", pa.int64()),
    ("redirect", pa.string()), ("short_description", pa.string()), ("first_sentence", pa.string()),
    ("doc", pa.large_string()), ("where", pa.string()),
])
PAGE_TABLES = {
    "articles": pa.schema([("page_id", pa.int64()), ("title", pa.string()), ("doc", pa.large_string())]),
    "links": pa.schema([("page_id", pa.int64()), ("target", pa.string())]),
    "redirects": pa.schema([("title", pa.string()), ("redirect", pa.string())]),
    "knowledge": pa.schema([("title", pa.string()), ("short_description", pa.string()),
                            ("first_sentence", pa.string())]),
    "disambiguation": pa.schema([("title", pa.string())]),
}
KB_LINE_SCHEMA = pa.schema([("range", pa.int32()), ("line_no", pa.int64()), ("line", pa.large_string())])
# A knowledge-base row: its row id (match, key, exact; ``corpus.knowledge.KBEntry.row_ids``) and priority.
KB_SCHEMA = pa.schema([("key", pa.string()), ("match", pa.string()), ("exact", pa.string()),
                       ("description", pa.string()), ("p0", pa.float64()), ("p1", pa.float64()), ("p2", pa.float64())])
REDIRECT_SCHEMA = pa.schema([("key", pa.string()), ("kind", pa.string()), ("page_id", pa.int64()),
                             ("src", pa.string()), ("dst", pa.string())])
# Everything grouped by entity key: links, in-dump knowledge, disambiguation pages, knowledge-base rows ...
ENTITY_SCHEMA = pa.schema([
    ("key", pa.string()), ("kind", pa.string()), ("page_id", pa.int64()), ("target", pa.string()),
    ("resolved", pa.string()), ("template", pa.string()), ("first_sentence", pa.string()),
    ("description", pa.string()), ("match", pa.string()), ("exact", pa.string()),
])
# ... what that grouping gives back (resolved links, or links that wait for the bare-title row) ...
LINK_SCHEMA = pa.schema([
    ("state", pa.string()), ("key", pa.string()), ("page_id", pa.int64()), ("target", pa.string()),
    ("resolved", pa.string()), ("source", pa.string()), ("knowledge", pa.large_list(pa.int32())),
    ("template", pa.string()), ("first_sentence", pa.string()), ("rule", pa.string()),
])
# ... and what is grouped by page: the article and its resolved links.
PAGE_GROUP_SCHEMA = pa.schema([
    ("page_id", pa.int64()), ("kind", pa.string()), ("title", pa.string()), ("doc", pa.large_string()),
    ("target", pa.string()), ("resolved", pa.string()), ("source", pa.string()),
    ("knowledge", pa.large_list(pa.int32())), ("rule", pa.string()),
])
ARTICLE_STATS = "__article__"
LINK_COLUMNS = ["links", "links_template", "links_first_sentence", "links_external", "links_no_knowledge",
                *[f"links_external_{rule}" for rule in MATCH_RULES]]
# 64-bit offsets wherever a column's values can pass 2^31 in one file or one combined table.
CHUNK_SCHEMA = pa.schema([
    ("split", pa.string()), ("sample_id", pa.int64()), ("article", pa.string()), ("chunk_index", pa.int32()),
    ("text", pa.large_string()), ("input_ids", pa.large_list(pa.int32())), ("ent_start", pa.large_list(pa.int32())),
    ("ent_end", pa.large_list(pa.int32())), ("ent_title", pa.large_list(pa.string())),
    ("ent_source", pa.large_list(pa.string())), ("ent_knowledge", pa.large_list(pa.large_list(pa.int32()))),
    *[(name, pa.int32()) for name in LINK_COLUMNS],
])


def table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema)


def _nulls(n: int, kind: pa.DataType) -> pa.Array:
    return pa.nulls(n, kind)


# ----------------------------------------------------------------------------------------------
# Parsed pages -> the stage's tables and counts
# ----------------------------------------------------------------------------------------------


def split_pages(batch: pa.Table, max_errors: int = 50) -> tuple[dict[str, pa.Table], dict[str, Any]]:
    """Page records (``PAGE_SCHEMA``) -> the parse stage's tables (:data:`PAGE_TABLES`) and what its
    stats need (kinds, reasons, error examples, paragraphs). Each article's ``doc`` is decoded once."""
    kind = batch["kind"]
    articles = batch.filter(pc.equal(kind, "article"))
    redirects = batch.filter(pc.equal(kind, "redirect"))
    disambiguation = batch.filter(pc.and_(pc.equal(kind, "skipped"), pc.equal(batch["reason"], DISAMBIGUATION)))
    known = articles.filter(pc.or_(pc.is_valid(articles["short_description"]), pc.is_valid(articles["first_sentence"])))
    described = batch.filter(pc.and_(pc.equal(batch["reason"], EMPTY_TEXT), pc.is_valid(batch["short_description"])))
    known = pa.concat_tables([known, described]) if described.num_rows else known
    page_ids, targets = [], []
    paragraphs = 0
    for page_id, doc in zip(articles["page_id"].to_pylist(), articles["doc"].to_pylist()):
        parsed = json.loads(doc)
        paragraphs += len(parsed)
        for target in sorted({link[2] for _, links in parsed for link in links}):
            page_ids.append(page_id)
            targets.append(target)
    kinds: Counter = Counter(kind.to_pylist())
    reasons: Counter = Counter()
    errors: list[str] = []
    for r in batch.filter(pc.is_valid(batch["reason"])).select(["kind", "reason", "title", "where"]).to_pylist():
        reasons[f"{r['kind']}:{r['reason']}"] += 1
        if r["kind"] == "error" and len(errors) < max_errors:
            errors.append(f"{r['where']}: {r['reason']}: {r['title']}")
    tables = {
        "articles": articles.select(["page_id", "title", "doc"]).cast(PAGE_TABLES["articles"]),
        "links": pa.table({"page_id": pa.array(page_ids, pa.int64()), "target": pa.array(targets, pa.string())}),
        "redirects": redirects.select(["title", "redirect"]).cast(PAGE_TABLES["redirects"]),
        "knowledge": known.select(["title", "short_description", "first_sentence"]).cast(PAGE_TABLES["knowledge"]),
        "disambiguation": disambiguation.select(["title"]).cast(PAGE_TABLES["disambiguation"]),
    }
    counts = {"kinds": dict(kinds), "reasons": dict(reasons), "errors": errors, "paragraphs": paragraphs}
    return tables, counts


def page_stats(parts: list[dict], max_errors: int = 50) -> dict[str, Any]:
    """The counts of every write of the parse stage, summed: the ``pages`` section of stats.json."""
    kinds: Counter = Counter()
    reasons: Counter = Counter()
    errors: list[str] = []
    paragraphs = 0
    for part in parts:
        kinds.update(part["kinds"])
        reasons.update(part["reasons"])
        errors.extend(part["errors"][: max_errors - len(errors)])
        paragraphs += part["paragraphs"]
    pages = {
        "read": sum(kinds.values()), "articles": kinds["article"], "redirects": kinds["redirect"],
        "skipped": {k.split(":", 1)[1]: v for k, v in sorted(reasons.items()) if k.startswith("skipped:")},
        "errors": {k.split(":", 1)[1]: v for k, v in sorted(reasons.items()) if k.startswith("error:")},
        "error_examples": sorted(errors),
    }
    return {"pages": pages, "paragraphs": paragraphs}


# ----------------------------------------------------------------------------------------------
# Buckets of a group-by
# ----------------------------------------------------------------------------------------------


def with_bucket(batch: pa.Table, column: str, buckets: int) -> pa.Table:
    """``batch`` with a ``bucket`` column: a stable hash of ``column`` modulo ``buckets``."""
    values = batch[column].to_pylist()
    if pa.types.is_integer(batch.schema.field(column).type):
        ids = [v % buckets for v in values]
    else:
        ids = [zlib.crc32(v.encode()) % buckets for v in values]
    return batch.append_column("bucket", pa.array(ids, pa.int32()))


def best_kb_rows(bucket: pa.Table) -> pa.Table:
    """The winning row of each knowledge-base row id (key, match, exact) of one bucket (smaller source,
    then the row's own priority, then the description, so that ties break the same way in every run and
    on both paths)."""
    ids = ["key", "match", "exact"]
    ordered = bucket.select(KB_SCHEMA.names).sort_by(
        [(c, "ascending") for c in [*ids, "p0", "p1", "p2", "description"]])
    first = np.ones(ordered.num_rows, dtype=bool)
    if ordered.num_rows:
        same = np.ones(ordered.num_rows - 1, dtype=bool)
        for c in ids:
            values = ordered[c].to_numpy(zero_copy_only=False)
            same &= values[1:] == values[:-1]
        first[1:] = ~same
    return ordered.filter(pa.array(first))


# ----------------------------------------------------------------------------------------------
# Redirects and links
# ----------------------------------------------------------------------------------------------


def _redirect_table(src: pa.Array, dst: pa.Array, kinds: tuple[str, ...]) -> pa.Table:
    """(src, dst) pairs as ``hop`` rows (keyed by src, to be followed) and/or ``edge`` rows (keyed by
    dst, to be extended), in one table: each input is read once for both."""
    parts = []
    n = len(src)
    for kind in kinds:
        parts.append(pa.table({"key": src if kind == "hop" else dst, "kind": pa.array([kind] * n, pa.string()),
                               "page_id": _nulls(n, pa.int64()), "src": src, "dst": dst}, schema=REDIRECT_SCHEMA))
    return pa.concat_tables(parts)


def redirect_rows(batch: pa.Table, kinds: tuple[str, ...] = ("hop", "edge")) -> pa.Table:
    """Rows of the ``redirects`` table as hops and edges (the first round of chain compression)."""
    return _redirect_table(batch["title"].combine_chunks(), batch["redirect"].combine_chunks(), kinds)


def edge_rows(batch: pa.Table, kinds: tuple[str, ...] = ("hop", "edge")) -> pa.Table:
    """A round's output (src, dst) as the next round's hops and edges, or (kinds=("hop",)) final hops."""
    return _redirect_table(batch["src"].combine_chunks(), batch["dst"].combine_chunks(), kinds)


def extend_edges(bucket: pa.Table) -> pa.Table:
    """One round of chain compression in one bucket: each edge ``a -> b`` meets the hop ``b -> c``."""
    rows = bucket.drop_columns(["bucket"]).to_pylist()
    hops = {r["src"]: r["dst"] for r in rows if r["kind"] == "hop"}
    edges = [r for r in rows if r["kind"] == "edge"]
    return pa.table({"src": pa.array([r["src"] for r in edges], pa.string()),
                     "dst": pa.array([follow_redirect(r["src"], r["dst"], hops.get(r["dst"])) for r in edges],
                                     pa.string())})


def link_rows(batch: pa.Table) -> pa.Table:
    """Rows of the ``links`` table keyed by their target (to meet the target's redirect)."""
    n = batch.num_rows
    targets = batch["target"].combine_chunks()
    return pa.table({"key": targets, "kind": pa.array(["link"] * n, pa.string()), "page_id": batch["page_id"],
                     "src": targets, "dst": _nulls(n, pa.string())}, schema=REDIRECT_SCHEMA)


def follow_links(bucket: pa.Table) -> pa.Table:
    """Links of one bucket of targets through their redirects -> entity rows keyed by the resolved title."""
    rows = bucket.drop_columns(["bucket"]).to_pylist()
    hops = {r["src"]: r["dst"] for r in rows if r["kind"] == "hop"}
    out = []
    for r in rows:
        if r["kind"] == "link":
            resolved = hops.get(r["src"], r["src"])
            out.append({"key": entity_key(resolved), "kind": "link", "page_id": r["page_id"], "target": r["src"],
                        "resolved": resolved})
    return table(out, ENTITY_SCHEMA)


def dump_knowledge_rows(batch: pa.Table) -> pa.Table:
    """Rows of the ``knowledge`` table as entity rows (in-dump knowledge of an article)."""
    rows = [{"key": entity_key(r["title"]), "kind": "dump", "resolved": r["title"],
             "template": r["short_description"], "first_sentence": r["first_sentence"]}
            for r in batch.to_pylist()]
    return table(rows, ENTITY_SCHEMA)


def disambiguation_rows(batch: pa.Table) -> pa.Table:
    """Rows of the ``disambiguation`` table as entity rows: the titles whose links carry no knowledge."""
    rows = [{"key": entity_key(t), "kind": "disambiguation", "resolved": t} for t in batch["title"].to_pylist()]
    return table(rows, ENTITY_SCHEMA)


def kb_entity_rows(batch: pa.Table) -> pa.Table:
    n = batch.num_rows
    return pa.table({"key": batch["key"], "kind": pa.array(["kb"] * n, pa.string()), "page_id": _nulls(n, pa.int64()),
                     "target": _nulls(n, pa.string()), "resolved": _nulls(n, pa.string()),
                     "template": _nulls(n, pa.string()), "first_sentence": _nulls(n, pa.string()),
                     "description": batch["description"], "match": batch["match"], "exact": batch["exact"]},
                    schema=ENTITY_SCHEMA)


def deferred_rows(batch: pa.Table) -> pa.Table:
    """Links whose knowledge waits for the knowledge-base row of their bare title, keyed by it."""
    rows = batch.filter(pc.equal(batch["state"], "deferred"))
    n = rows.num_rows
    return pa.table({"key": rows["key"], "kind": pa.array(["deferred"] * n, pa.string()), "page_id": rows["page_id"],
                     "target": rows["target"], "resolved": rows["resolved"], "template": rows["template"],
                     "first_sentence": rows["first_sentence"], "description": _nulls(n, pa.string()),
                     "match": _nulls(n, pa.string()), "exact": _nulls(n, pa.string())}, schema=ENTITY_SCHEMA)


def page_link_rows(batch: pa.Table) -> pa.Table:
    """Resolved links as rows of their page's group."""
    rows = batch.filter(pc.equal(batch["state"], "resolved"))
    n = rows.num_rows
    return pa.table({"page_id": rows["page_id"], "kind": pa.array(["link"] * n, pa.string()),
                     "title": _nulls(n, pa.string()), "doc": _nulls(n, pa.large_string()), "target": rows["target"],
                     "resolved": rows["resolved"], "source": rows["source"], "knowledge": rows["knowledge"],
                     "rule": rows["rule"]}, schema=PAGE_GROUP_SCHEMA)


def page_article_rows(batch: pa.Table) -> pa.Table:
    """Rows of the ``articles`` table as rows of their page's group."""
    n = batch.num_rows
    return pa.table({"page_id": batch["page_id"], "kind": pa.array(["article"] * n, pa.string()),
                     "title": batch["title"], "doc": batch["doc"], "target": _nulls(n, pa.string()),
                     "resolved": _nulls(n, pa.string()), "source": _nulls(n, pa.string()),
                     "knowledge": _nulls(n, pa.large_list(pa.int32())), "rule": _nulls(n, pa.string())},
                    schema=PAGE_GROUP_SCHEMA)


# ----------------------------------------------------------------------------------------------
# Chunks -> shards: counts per split
# ----------------------------------------------------------------------------------------------


def zero_link_counts() -> dict[str, int]:
    return {name: 0 for name in LINK_COLUMNS}


def shard_tables(batch: pa.Table) -> tuple[dict[str, pa.Table], dict[str, Any]]:
    """Built rows (``CHUNK_SCHEMA``: chunks of every split and one stats row per article) -> the rows of
    each split sorted by ``sample_id``, and the counts of this batch."""
    counts: dict[str, Any] = {"links": {}, "chunks": 0}
    articles = batch.filter(pc.equal(batch["split"], ARTICLE_STATS))
    for key in LINK_COLUMNS:
        counts["links"][key] = int(pc.sum(articles[key]).as_py() or 0)
    counts["chunks"] = int(pc.sum(articles["chunk_index"]).as_py() or 0)
    tables = {}
    from kilm_ray.data.corpus.articles import SPLITS

    for split in SPLITS:
        rows = batch.filter(pc.equal(batch["split"], split)).drop_columns(["split", *LINK_COLUMNS]).sort_by("sample_id")
        tables[split] = rows
    return tables, counts


def split_counts(rows: pa.Table, max_eval_entities: int) -> dict[str, int]:
    """Chunks, chunks with knowledge, mentions and evaluation samples of one split's rows."""
    n_mentions = pc.list_value_length(rows["ent_start"]).to_numpy(zero_copy_only=False)
    return {"chunks": rows.num_rows, "knowledge_chunks": int((n_mentions > 0).sum()), "mentions": int(n_mentions.sum()),
            "eval_samples": int(np.minimum(n_mentions, max_eval_entities).sum())}


def sum_counts(parts: list[dict], splits: tuple[str, ...]) -> dict:
    """The counts of every shard write summed: the links, chunks and samples sections of stats.json."""
    links: Counter = Counter()
    per_split = {s: Counter() for s in splits}
    chunks = 0
    for part in parts:
        links.update(part["links"])
        chunks += part["chunks"]
        for split in splits:
            per_split[split].update(part.get(split, {}))
    return {
        "links": {"total": links["links"],
                  "with_knowledge": {"template": links["links_template"],
                                     "first_sentence": links["links_first_sentence"],
                                     "external": links["links_external"]},
                  # external knowledge by how its row matched: exact title, name, name + qualifier
                  "external_by_rule": {rule: links[f"links_external_{rule}"] for rule in MATCH_RULES},
                  "without_knowledge": links["links_no_knowledge"]},
        "chunks": {"total": chunks},
        "samples": {s: {k: c.get(k, 0) for k in ("chunks", "knowledge_chunks", "mentions", "eval_samples")}
                    for s, c in per_split.items()},
    }
