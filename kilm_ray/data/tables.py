"""The tables the evaluation reads instead of the training split: derived from a committed dataset's
shards by Ray Data group-bys, written under the dataset and listed in its manifest (``tables``).

    titles/part-*.parquet    one row per entity title linked with knowledge in train, and per article:
                             title, train_mentions (training mentions with knowledge), source (its
                             knowledge source), knowledge (its token ids, the first training mention's),
                             article_split (the split of the article with that title; null if none)
    surfaces/part-*.parquet  one row per normalized anchor text of a training mention: surface, titles
                             (most linked first, at most MAX_TITLES), counts, mentions

What the harness asks of them is bounded by the mentions it evaluates: a held-out mention is *seen*
when its title has ``train_mentions > 0``; anchor candidates and the training lookup (most frequent
training title of the anchor text, with its knowledge) come from ``surfaces`` and ``titles``; a
held-out article whose title is a trained entity with ``first_sentence`` knowledge had its first
sentence in the training data (counted at build time). Lookups stream the tables with a filter on the
asked keys; no process holds a table.

The row functions are pure (pyarrow); :func:`build_tables` is the Ray layer.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kilm_ray import storage
from kilm_ray.method.metrics import normalize

log = logging.getLogger("kilm_ray.eval")

MAX_TITLES = 16  # anchor candidates kept per surface (most linked first)
TABLES_FORMAT = 1
ENTITY_SCHEMA = pa.schema([
    ("kind", pa.string()), ("title", pa.string()), ("surface", pa.string()), ("split", pa.string()),
    ("source", pa.string()), ("knowledge", pa.large_list(pa.int32())), ("order", pa.int64()),
])
TITLE_SCHEMA = pa.schema([
    ("title", pa.string()), ("train_mentions", pa.int64()), ("source", pa.string()),
    ("knowledge", pa.large_list(pa.int32())), ("article_split", pa.string()),
])
SURFACE_SCHEMA = pa.schema([
    ("surface", pa.string()), ("titles", pa.large_list(pa.string())), ("counts", pa.large_list(pa.int64())),
    ("mentions", pa.int64()),
])
SHARD_COLUMNS = ["sample_id", "article", "input_ids", "ent_start", "ent_end", "ent_title", "ent_source",
                 "ent_knowledge"]


def surface_key(text: str) -> str:
    """The anchor text as a lookup key: normalized as exact match normalizes (case, punctuation, articles)."""
    return normalize(text)


def mention_order(sample_id: int, entity: int) -> int:
    """A total order of mentions (sample id, then position in the chunk)."""
    return int(sample_id) * 1024 + int(entity)


# ----------------------------------------------------------------------------------------------
# Pure row functions
# ----------------------------------------------------------------------------------------------


def entity_rows(batch: pa.Table, split: str, decode) -> pa.Table:
    """Chunk rows of ``split`` -> one ``mention`` row per training mention with knowledge (its title,
    normalized anchor text, source, knowledge, order) and one ``article`` row per article of the batch."""
    rows: dict[str, list] = {name: [] for name in ENTITY_SCHEMA.names}

    def add(kind, title, surface, source, knowledge, order):
        for name, value in zip(ENTITY_SCHEMA.names, (kind, title, surface, split, source, knowledge, order)):
            rows[name].append(value)

    articles = {}
    sids = batch.column("sample_id").to_pylist()
    for i, article in enumerate(batch.column("article").to_pylist()):
        articles.setdefault(article, sids[i])
    for article, sid in articles.items():
        add("article", article, None, None, None, int(sid) * 1024)
    if split == "train":
        ids_col, starts, ends = batch.column("input_ids"), batch.column("ent_start"), batch.column("ent_end")
        titles, sources, know = batch.column("ent_title"), batch.column("ent_source"), batch.column("ent_knowledge")
        for i, sid in enumerate(sids):
            ids = ids_col[i].values.to_numpy()
            for j, (s, e, title, source) in enumerate(zip(starts[i].as_py(), ends[i].as_py(), titles[i].as_py(),
                                                          sources[i].as_py())):
                add("mention", title, surface_key(decode(ids[s:e].tolist())), source, know[i][j].as_py(),
                    mention_order(sid, j))
    return pa.Table.from_pydict(rows, schema=ENTITY_SCHEMA)


def _group_starts(keys: np.ndarray) -> np.ndarray:
    """Indices where a run of equal keys starts (keys sorted)."""
    if len(keys) == 0:
        return np.zeros(0, dtype=np.int64)
    first = np.ones(len(keys), dtype=bool)
    first[1:] = keys[1:] != keys[:-1]
    return np.flatnonzero(first)


def title_rows(bucket: pa.Table) -> pa.Table:
    """Entity rows of one bucket -> one row per title: its training mentions, the source and knowledge of
    its first training mention, and the split of the article with that title."""
    mentions = bucket.filter(pc.equal(bucket["kind"], "mention")).sort_by([("title", "ascending"),
                                                                          ("order", "ascending")])
    keys = mentions["title"].to_numpy(zero_copy_only=False)
    starts = _group_starts(keys)
    counts = np.diff(np.append(starts, len(keys)))
    trained = mentions.take(pa.array(starts, pa.int64())).select(["title", "source", "knowledge"]).append_column(
        "train_mentions", pa.array(counts, pa.int64()))
    articles = bucket.filter(pc.equal(bucket["kind"], "article")).sort_by([("title", "ascending"),
                                                                           ("order", "ascending")])
    a_keys = articles["title"].to_numpy(zero_copy_only=False)
    articles = articles.take(pa.array(_group_starts(a_keys), pa.int64())).select(["title", "split"]).rename_columns(
        ["title", "article_split"])
    keys = pc.unique(pa.concat_arrays([trained["title"].combine_chunks().cast(pa.string()),
                                       articles["title"].combine_chunks().cast(pa.string())]))
    keys = keys.take(pc.sort_indices(keys))
    at_trained = pc.index_in(keys, value_set=trained["title"].combine_chunks())
    at_article = pc.index_in(keys, value_set=articles["title"].combine_chunks())
    picked = trained.take(at_trained)  # null rows where a title has no training mention
    joined = pa.table({"title": keys, "train_mentions": pc.fill_null(picked["train_mentions"], 0),
                       "source": picked["source"], "knowledge": picked["knowledge"],
                       "article_split": articles["article_split"].take(at_article)})
    return joined.select(TITLE_SCHEMA.names).cast(TITLE_SCHEMA)


def surface_rows(bucket: pa.Table, max_titles: int = MAX_TITLES) -> pa.Table:
    """Training mentions of one bucket -> one row per anchor text: its titles, most linked first (ties by
    title), with their counts."""
    mentions = bucket.filter(pc.equal(bucket["kind"], "mention"))
    pairs = mentions.group_by(["surface", "title"]).aggregate([("order", "count")])
    pairs = pairs.sort_by([("surface", "ascending"), ("order_count", "descending"), ("title", "ascending")])
    keys = pairs["surface"].to_numpy(zero_copy_only=False)
    starts = _group_starts(keys)
    ends = np.append(starts[1:], len(keys))
    titles, counts = pairs["title"].to_pylist(), pairs["order_count"].to_pylist()
    out = {"surface": [keys[s] for s in starts], "titles": [titles[s:min(e, s + max_titles)] for s, e in zip(starts, ends)],
           "counts": [counts[s:min(e, s + max_titles)] for s, e in zip(starts, ends)],
           "mentions": [int(sum(counts[s:e])) for s, e in zip(starts, ends)]}
    return pa.Table.from_pydict(out, schema=SURFACE_SCHEMA)


def title_summary(table: pa.Table) -> dict[str, Any]:
    """Counts of a titles part: trained entities; articles per split; held-out articles whose first
    sentence was a trained entity's knowledge (``first_sentence_in_training``)."""
    trained = pc.greater(table["train_mentions"], 0)
    leaked = pc.and_(trained, pc.equal(table["source"], "first_sentence"))
    out: dict[str, Any] = {"trained_entities": int(pc.sum(trained).as_py() or 0), "articles": {},
                           "first_sentence_in_training": {}}
    for split in ("train", "valid", "test"):
        in_split = pc.equal(table["article_split"], split)
        out["articles"][split] = int(pc.sum(in_split).as_py() or 0)
        out["first_sentence_in_training"][split] = int(pc.sum(pc.and_(in_split, leaked)).as_py() or 0)
    return out


def merge_summaries(parts: Iterable[dict]) -> dict[str, Any]:
    total: dict[str, Any] = {"trained_entities": 0, "articles": Counter(), "first_sentence_in_training": Counter(),
                             "surfaces": 0, "ambiguous_surfaces": 0}
    for part in parts:
        for key in ("trained_entities", "surfaces", "ambiguous_surfaces"):
            total[key] += part.get(key, 0)
        for key in ("articles", "first_sentence_in_training"):
            total[key].update(part.get(key, {}))
    return {k: dict(v) if isinstance(v, Counter) else v for k, v in total.items()}


# ----------------------------------------------------------------------------------------------
# Lookups: stream a table, keep the asked keys
# ----------------------------------------------------------------------------------------------


def lookup(files: list[str], column: str, keys: Iterable[str], rows_per_batch: int = 65_536) -> dict[str, dict]:
    """``key -> row`` for the rows of a table whose ``column`` is one of ``keys``; the table is read a
    batch at a time (memory: one batch and the answer)."""
    import pyarrow.parquet as pq

    wanted = pa.array(sorted(set(keys)), pa.string())
    found: dict[str, dict] = {}
    if len(wanted) == 0:
        return found
    for uri in files:
        fs, path = storage.resolve(uri)
        with fs.open_input_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=rows_per_batch):
                hit = batch.filter(pc.is_in(batch.column(column), value_set=wanted))
                for row in hit.to_pylist():
                    found[row[column]] = row
    return found


class Tables:
    """A dataset's tables, as listed in its manifest (or built beside it for an older dataset)."""

    def __init__(self, entry: dict, root: str):
        self.entry = entry
        self.titles = [storage.join(root, p) for p in entry["titles"]]
        self.surfaces = [storage.join(root, p) for p in entry["surfaces"]]
        self.summary = entry["summary"]

    def titles_of(self, titles: Iterable[str]) -> dict[str, dict]:
        return lookup(self.titles, "title", titles)

    def surfaces_of(self, surfaces: Iterable[str]) -> dict[str, dict]:
        return lookup(self.surfaces, "surface", surfaces)


# ----------------------------------------------------------------------------------------------
# The Ray layer
# ----------------------------------------------------------------------------------------------


def _read_entity_rows(batch: pa.Table, tokenizer_json: str, mentions_only: bool = False) -> pa.Table:
    import pyarrow.parquet as pq

    from kilm_ray.method.tokenizer import CorpusTokenizer

    tok = CorpusTokenizer(tokenizer_json)
    parts = []
    for split, uri in zip(batch["split"].to_pylist(), batch["path"].to_pylist()):
        fs, path = storage.resolve(uri)
        columns = SHARD_COLUMNS if split == "train" else ["sample_id", "article"]
        with fs.open_input_file(path) as f:
            for chunk in pq.ParquetFile(f).iter_batches(batch_size=2048, columns=columns):
                rows = entity_rows(pa.Table.from_batches([chunk]), split, tok.decode)
                parts.append(rows.filter(pc.equal(rows["kind"], "mention")) if mentions_only else rows)
    return pa.concat_tables(parts) if parts else ENTITY_SCHEMA.empty_table()


def _write_table(rows: pa.Table, out: str, name: str) -> str:
    import pyarrow.parquet as pq

    fs, root = storage.resolve(out)
    target = f"{root}/{name}"
    storage.make_parent(fs, target)
    if storage.is_remote(out):
        pq.write_table(rows, target, filesystem=fs)  # one PUT: whole or absent
    else:
        tmp = f"{target}.tmp"
        pq.write_table(rows, tmp, filesystem=fs)
        fs.move(tmp, target)  # a retried task rewrites the same name: the output is idempotent
    return name


def _titles_bucket(bucket: pa.Table, out: str) -> pa.Table:
    part = int(bucket["bucket"][0].as_py())
    rows = title_rows(bucket.drop_columns(["bucket"]))
    name = _write_table(rows, out, f"titles/part-{part:05d}.parquet")
    return pa.table({"counts": [json.dumps({"file": name, **title_summary(rows)})]})


def _surfaces_bucket(bucket: pa.Table, out: str) -> pa.Table:
    part = int(bucket["bucket"][0].as_py())
    rows = surface_rows(bucket.drop_columns(["bucket"]))
    name = _write_table(rows, out, f"surfaces/part-{part:05d}.parquet")
    ambiguous = int(pc.sum(pc.greater(pc.list_value_length(rows["titles"]), 1)).as_py() or 0)
    return pa.table({"counts": [json.dumps({"file": name, "surfaces": rows.num_rows, "ambiguous_surfaces": ambiguous})]})


def _counts(ds) -> list[dict]:
    """The ``counts`` column (one JSON record per group call) of ``ds``."""
    return [json.loads(c) for b in ds.iter_batches(batch_format="pyarrow", batch_size=None)
            for c in b["counts"].to_pylist()]


def build_tables(files: dict[str, list[str]], tokenizer_json, out: str, cfg, input_bytes: int) -> dict[str, Any]:
    """Group the shards' mentions by title and by anchor text (Ray Data, hash-bucketed group-bys) and
    write both tables under ``out``. Returns their manifest entry: files relative to ``out``, counts.

    ``files``: split -> shard URIs; ``tokenizer_json``: the tokenizer (a string or an object ref);
    ``input_bytes``: the shards' size, which sizes the group-bys (as every shuffle of the pipeline: from
    the data and the cluster's planned maximum, not from the CPUs present at that moment)."""
    import ray.data

    from kilm_ray.data.shuffle import bucketed, partitions_for
    from kilm_ray.data.shuffle import map_rows as _map

    partitions = partitions_for(cfg, input_bytes, "evaluation tables")
    def shards(splits: tuple[str, ...]):
        items = [{"split": s, "path": p} for s in splits for p in files.get(s, [])]
        return ray.data.from_items(items, override_num_blocks=max(1, len(items)))

    # Titles: training mentions and every split's articles. Anchor texts: training mentions only (a block
    # of no rows would reach the shuffle as a table without columns; a train shard always has mentions).
    rows = _map(shards(("train", "valid", "test")), _read_entity_rows, cfg, num_cpus=1, batch_size=1,
                tokenizer_json=tokenizer_json)
    title_parts = _counts(bucketed(rows, "title", _titles_bucket, cfg, partitions, out=out))
    mentions = _map(shards(("train",)), _read_entity_rows, cfg, num_cpus=1, batch_size=1,
                    tokenizer_json=tokenizer_json, mentions_only=True)
    surface_parts = _counts(bucketed(mentions, "surface", _surfaces_bucket, cfg, partitions, out=out))
    summary = merge_summaries(title_parts + surface_parts)
    return {"format": TABLES_FORMAT, "titles": sorted(p["file"] for p in title_parts),
            "surfaces": sorted(p["file"] for p in surface_parts), "summary": summary}


def dataset_tables(data_dir: str, cfg) -> Tables:
    """The tables of a dataset: those its manifest lists, else (a dataset made before they existed) built
    once into this node's cache from its shards, with the same group-bys."""
    from kilm_ray.store import node_cache
    from kilm_ray.store.loader import read_meta, split_files

    manifest = read_meta(data_dir)
    entry = manifest.get("tables")
    if entry:
        return Tables(entry, storage.join(data_dir, entry["dir"]))
    directory = node_cache.default_root() / f"eval-tables-{manifest['run_key']}"
    done = directory / "tables.json"
    if not done.exists():
        log.info("%s has no evaluation tables (made before they existed): building them into %s", data_dir, directory)
        tokenizer_json = storage.read_bytes(storage.join(data_dir, manifest.get("tokenizer", "tokenizer"),
                                                         "tokenizer.json")).decode()
        files = {s: split_files(data_dir, s) for s in ("train", "valid", "test")}
        entry = build_tables(files, tokenizer_json, str(directory), cfg,
                             sum(storage.file_size(f) for listed in files.values() for f in listed))
        done.write_text(json.dumps(entry))
    return Tables(json.loads(done.read_text()), str(directory))


def with_dir(entry: dict, rel: str) -> dict:
    """The manifest's ``tables`` entry: ``dir`` relative to the dataset directory."""
    return {"dir": rel, **entry}


def train_overlap(data_dir: str, articles: Iterable[str], sample_ids: Iterable[int]) -> dict[str, Any]:
    """Which of the evaluated ``articles`` and ``sample_ids`` occur in the train split: a Ray Data scan
    of the train shards' two columns, filtered to the asked values (the driver holds those and the hits)."""
    import ray.data

    from kilm_ray.store.loader import split_files

    want_articles = sorted(set(articles))
    want_ids = sorted({int(s) for s in sample_ids})
    files = split_files(data_dir, "train")
    if not files:
        return {"articles_checked": len(want_articles), "samples_checked": len(want_ids), "articles_in_train": [],
                "samples_in_train": []}
    ds = ray.data.from_items([{"path": f} for f in files], override_num_blocks=len(files))
    hits = ds.map_batches(_overlap_batch, batch_format="pyarrow", batch_size=1, num_cpus=0.5,
                          fn_kwargs={"articles": want_articles, "sample_ids": want_ids})
    found_articles, found_ids = set(), set()
    for batch in hits.iter_batches(batch_format="pyarrow", batch_size=None):
        for row in batch.to_pylist():
            found_articles.update(json.loads(row["articles"]))
            found_ids.update(json.loads(row["sample_ids"]))
    return {"articles_checked": len(want_articles), "samples_checked": len(want_ids),
            "articles_in_train": sorted(found_articles), "samples_in_train": sorted(found_ids)}


def _overlap_batch(batch: pa.Table, articles: list[str], sample_ids: list[int]) -> pa.Table:
    import pyarrow.parquet as pq

    arts, sids = set(), set()
    a_set, s_set = pa.array(articles, pa.string()), pa.array(sample_ids, pa.int64())
    for uri in batch["path"].to_pylist():
        fs, path = storage.resolve(uri)
        with fs.open_input_file(path) as f:
            for chunk in pq.ParquetFile(f).iter_batches(batch_size=65_536, columns=["sample_id", "article"]):
                arts.update(chunk.column("article").filter(pc.is_in(chunk.column("article"), value_set=a_set)).to_pylist())
                sids.update(chunk.column("sample_id").filter(
                    pc.is_in(chunk.column("sample_id"), value_set=s_set)).to_pylist())
    return pa.table({"articles": [json.dumps(sorted(arts))], "sample_ids": [json.dumps(sorted(sids))]})
