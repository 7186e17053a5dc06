"""The Ray Data pipeline: Wikipedia dump(s) + knowledge bases -> KILM chunk shards, committed with a
manifest; and a Ray Dataset of masked examples for any (split, epoch, seed).

The plan, top to bottom (:func:`preprocess`); every step is a pure function from ``kilm_ray.corpus``
mapped over blocks or groups, and no process holds a table of the corpus::

    read      one task per dump file, or per byte range of a multistream dump (its index)
    parse     pages -> article / redirect / skipped / error records          [stage: pages/]
    kb        knowledge-base lines -> (key, description), best row per key   [stage: kb/]  (group-by)
    tokenizer trained on a bounded, seeded hash sample of the paragraphs (or loaded)
    links     (page, target) per article; redirects compressed (self-join x redirect_rounds) and
              joined onto the targets
    knowledge links + in-dump knowledge + kb rows, grouped by entity key: each entity's knowledge
              chosen in corpus.knowledge_sources order and tokenized once  [stage: links/]
              (a second grouping on the title without its "(...)" for the external fallback)
    chunk     articles + their resolved links, grouped by page -> chunks -> parquet shards per split
    commit    stats.json, tokenizer/, then manifest.json: the files, row counts, sample-id ranges,
              config and tokenizer hashes. Readers read only what the manifest lists.

Work goes to ``out/_work/<run key>/`` (the key hashes the inputs and settings); a stage that
finished is not redone when the same command is rerun after a crash, and the output of a rerun is
identical to an uninterrupted run's. Shards go to ``out/shards/<run key>/``; after the manifest is
written, the work directory and shards of other settings are removed.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import json
import logging
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kilm_ray import __version__, storage
from kilm_ray.config import KilmConfig
from kilm_ray.chunking import title_as_mentioned
from kilm_ray.corpus.articles import SPLITS, LinkCounts, article_chunks, chunk_rows, page_record, paragraphs_from_doc, split_of
from kilm_ray.corpus.dump import DUMP_SUFFIXES, ReadUnit, iter_raw_pages, read_units
from kilm_ray.corpus.knowledge import KB_SUFFIXES, KnowledgeLookup, kb_line_rows, load_knowledge_base
from kilm_ray.corpus.links import (PENDING, bare_key, choose_knowledge, entity_key, follow_redirect,
                                   page_link_targets, sample_hash, sample_threshold, table_resolver)
from kilm_ray.masking import MaskingParams, build_train_example, collate, Entity

log = logging.getLogger("kilm_ray.data")

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1

PAGE_SCHEMA = pa.schema([
    ("kind", pa.string()), ("reason", pa.string()), ("title", pa.string()), ("page_id", pa.int64()),
    ("redirect", pa.string()), ("short_description", pa.string()), ("first_sentence", pa.string()),
    ("doc", pa.large_string()), ("where", pa.string()),
])
ARTICLE_STATS = "__article__"
# 64-bit offsets wherever a column's values can pass 2^31 in one file or one combined table.
CHUNK_SCHEMA = pa.schema([
    ("split", pa.string()), ("sample_id", pa.int64()), ("article", pa.string()), ("chunk_index", pa.int32()),
    ("text", pa.large_string()), ("input_ids", pa.large_list(pa.int32())), ("ent_start", pa.large_list(pa.int32())),
    ("ent_end", pa.large_list(pa.int32())), ("ent_title", pa.large_list(pa.string())),
    ("ent_source", pa.large_list(pa.string())), ("ent_knowledge", pa.large_list(pa.large_list(pa.int32()))),
    ("links", pa.int32()), ("links_template", pa.int32()), ("links_first_sentence", pa.int32()),
    ("links_external", pa.int32()), ("links_no_knowledge", pa.int32()),
])
RAW_SCHEMA = pa.schema([("source", pa.string()), ("index", pa.int64()), ("xml", pa.large_string()),
                        ("error", pa.string())])
KB_LINE_SCHEMA = pa.schema([("file_index", pa.int32()), ("line_no", pa.int64()), ("line", pa.large_string())])
KB_SCHEMA = pa.schema([("key", pa.string()), ("description", pa.string()), ("p0", pa.float64()),
                       ("p1", pa.float64()), ("p2", pa.float64())])
# One schema for everything grouped by entity key (links, in-dump knowledge, knowledge-base rows) ...
ENTITY_SCHEMA = pa.schema([
    ("key", pa.string()), ("kind", pa.string()), ("page_id", pa.int64()), ("target", pa.string()),
    ("resolved", pa.string()), ("template", pa.string()), ("first_sentence", pa.string()),
    ("description", pa.string()),
])
# ... what the grouping gives back (resolved links, or links that wait for the bare-title row) ...
LINK_SCHEMA = pa.schema([
    ("state", pa.string()), ("key", pa.string()), ("page_id", pa.int64()), ("target", pa.string()),
    ("resolved", pa.string()), ("source", pa.string()), ("knowledge", pa.large_list(pa.int32())),
    ("template", pa.string()), ("first_sentence", pa.string()),
])
# ... and what is grouped by page: the article and its resolved links.
PAGE_GROUP_SCHEMA = pa.schema([
    ("page_id", pa.int64()), ("kind", pa.string()), ("title", pa.string()), ("doc", pa.large_string()),
    ("target", pa.string()), ("resolved", pa.string()), ("source", pa.string()),
    ("knowledge", pa.large_list(pa.int32())),
])
LINK_COLUMNS = ["links", "links_template", "links_first_sentence", "links_external", "links_no_knowledge"]
SHARD_ROWS = 8192  # chunks per parquet shard (per split) at most: the writing task holds one shard


def task_resources(cfg: KilmConfig) -> dict:
    """Ray remote args that place preprocessing tasks (corpus.task_resources, e.g. CPU nodes)."""
    return {"resources": dict(cfg.corpus.task_resources)} if cfg.corpus.task_resources else {}


def light_pool():
    """Compute strategy of the steps that ask for (almost) no CPU (reads, writes): at most one task per
    cluster CPU at a time. Unbounded, Ray Data ran as many as there were blocks in flight, each in its
    own worker process: 61 processes on a 4 k-article corpus, 131 on 16 k, 362 on 64 k (2 CPUs)."""
    import ray
    import ray.data

    return ray.data.TaskPoolStrategy(size=max(2, int(ray.cluster_resources().get("CPU", 2))))


def _map(ds, fn, cfg: KilmConfig, num_cpus: float = 1, batch_size: Optional[int] = None, **kwargs):
    """``fn(batch, **kwargs)`` over pyarrow batches (whole blocks unless ``batch_size``)."""
    light = {"compute": light_pool()} if num_cpus < 0.25 else {}  # 0.25 CPU: at most 4 per CPU anyway
    return ds.map_batches(fn, batch_format="pyarrow", batch_size=batch_size, num_cpus=num_cpus, fn_kwargs=kwargs,
                          **light, **task_resources(cfg))


def _table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema)


# ----------------------------------------------------------------------------------------------
# Reading: dump pages and knowledge-base lines
# ----------------------------------------------------------------------------------------------


def _raw_page_blocks(unit: ReadUnit, max_pages: int, pages_per_block: int) -> Iterable[pa.Table]:
    rows: list[dict] = []
    for raw in iter_raw_pages(unit, max_pages):
        rows.append({"source": raw.source, "index": raw.index, "xml": raw.xml, "error": raw.error})
        if len(rows) >= pages_per_block:
            yield _table(rows, RAW_SCHEMA)
            rows = []
    if rows:
        yield _table(rows, RAW_SCHEMA)


KB_LINES_PER_BATCH = 20_000


def _kb_line_blocks(file_index: int, uri: str, lines_per_block: int = KB_LINES_PER_BATCH) -> Iterable[pa.Table]:
    rows: list[dict] = []
    for line_no, line in enumerate(storage.iter_lines(uri), start=1):
        rows.append({"file_index": file_index, "line_no": line_no, "line": line})
        if len(rows) >= lines_per_block:
            yield _table(rows, KB_LINE_SCHEMA)
            rows = []
    if rows:
        yield _table(rows, KB_LINE_SCHEMA)


def _datasource(make_blocks: list, schema: pa.Schema, inputs: list[str]):
    """A Ray Data datasource with one streaming read task per ``make_blocks`` callable."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class StreamingDatasource(Datasource):
        def estimate_inmemory_data_size(self) -> Optional[int]:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list:
            return [ReadTask(make, BlockMetadata(num_rows=None, size_bytes=None, input_files=[src], exec_stats=None),
                             schema=schema) for make, src in zip(make_blocks, inputs)]

    return StreamingDatasource()


FILES_PER_READ_TASK = 8
STAGE_FILE_ROWS = 2048  # page records per work-directory file (a few MB of parquet)


def _parquet_blocks(files: list[str], columns: Optional[list[str]], rows_per_block: int) -> Iterable[pa.Table]:
    import pyarrow.parquet as pq

    for uri in files:
        fs, path = storage.resolve(uri)
        with fs.open_input_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=rows_per_block, columns=columns):
                yield pa.Table.from_batches([batch])


def read_parquet_files(files: list[str], schema: pa.Schema, columns: Optional[list[str]] = None,
                       rows_per_block: int = STAGE_FILE_ROWS):
    """A Ray Dataset of parquet files we listed ourselves: one streaming read task per few files. Ray
    2.60's ``read_parquet`` starts 32 footer-reading actors (a process each) per call to plan the read;
    on a 2-core node the distributed pipeline's reads started hundreds and the node ran out of memory
    on a 2 k-article corpus. We already know the files and their schema."""
    import ray.data

    if columns:
        schema = pa.schema([schema.field(c) for c in columns])
    if not files:
        return ray.data.from_arrow(schema.empty_table())
    groups = [files[i:i + FILES_PER_READ_TASK] for i in range(0, len(files), FILES_PER_READ_TASK)]
    makers = [lambda g=g: _parquet_blocks(g, columns, rows_per_block) for g in groups]
    return ray.data.read_datasource(_datasource(makers, schema, [g[0] for g in groups]),
                                    override_num_blocks=len(groups), compute=light_pool())


def read_pages(units: list[ReadUnit | str], cfg: KilmConfig):
    import ray.data

    c = cfg.corpus
    units = [u if isinstance(u, ReadUnit) else ReadUnit(u) for u in units]
    makers = [lambda u=u: _raw_page_blocks(u, c.max_pages, c.pages_per_block) for u in units]
    # Reading (decompress, cut at <page>) is light: a fraction of a CPU, and a resource shape unlike
    # the parse step's, so that Ray Data does not fuse the two into one sequential task per file.
    return ray.data.read_datasource(_datasource(makers, RAW_SCHEMA, [u.label for u in units]),
                                    override_num_blocks=len(units), num_cpus=0.01, compute=light_pool(),
                                    **task_resources(cfg))


def parse_pages(raw, cfg: KilmConfig):
    """Each block of raw pages -> page records, one parse task per block, in parallel."""
    # Ray Data coalesces small yields of a read task into one large block; re-cut the stream
    # (streaming, no barrier) so that blocks of pages_per_block pages are parsed side by side.
    blocks = raw.repartition(target_num_rows_per_block=cfg.corpus.pages_per_block)
    _light_task(blocks, cfg)
    return _map(blocks, _parse_batch, cfg, mode=cfg.corpus.mode, max_chars=cfg.corpus.max_description_chars)


def _light_task(ds, cfg: KilmConfig) -> None:
    """Run the re-blocking step of ``ds`` on a sliver of a CPU, like the read. By default each
    streaming-repartition task takes a whole CPU and keeps it while it waits for the parse step to
    take its output: on a 1-CPU node they held the CPU the parse tasks needed, and 8 dump files took
    534 s instead of 55 s. ``Dataset.repartition`` takes no remote args, so set them on its operator."""
    op = ds._logical_plan.dag
    if not hasattr(op, "ray_remote_args"):
        log.warning("this Ray version's repartition operator has no ray_remote_args; it takes 1 CPU per task")
        return
    object.__setattr__(op, "ray_remote_args", {"num_cpus": 0.01, **task_resources(cfg)})


def _parse_batch(batch: pa.Table, mode: str, max_chars: int) -> pa.Table:
    from kilm_ray.corpus.dump import RawPage

    rows = [page_record(RawPage(r["source"], r["index"], r["xml"], r["error"]), mode, max_chars)
            for r in batch.to_pylist()]
    return _table(rows, PAGE_SCHEMA)


# ----------------------------------------------------------------------------------------------
# Stages written to the work directory (restartable; each returns its counts to the driver)
# ----------------------------------------------------------------------------------------------


def _part_name(batch: pa.Table, columns: list[str], prefix: str = "part") -> str:
    """A file name that depends only on the batch's content (a rerun writes the same names); the
    columns hashed must tell apart any two batches that one writer gives."""
    digest = hashlib.blake2b(digest_size=8)
    for column in columns:
        for value in batch.column(column).to_pylist():
            digest.update(str(value).encode() + b"\0")
    return f"{prefix}-{digest.hexdigest()}.parquet"


def _write_part(batch: pa.Table, directory: str, name: str) -> None:
    import pyarrow.parquet as pq

    fs, root = storage.resolve(directory)
    fs.create_dir(root, recursive=True)
    pq.write_table(batch, f"{root}/{name}", filesystem=fs)


def _write_pages(batch: pa.Table, directory: str) -> pa.Table:
    """Store one block of page records; return what the stats need (kinds, reasons, paragraphs)."""
    if batch.num_rows:
        _write_part(batch, directory, _part_name(batch, ["where"]))
    kinds: Counter = Counter()
    reasons: Counter = Counter()
    errors: list[str] = []
    paragraphs = 0
    for r in batch.select(["kind", "reason", "title", "where", "doc"]).to_pylist():
        kinds[r["kind"]] += 1
        if r["reason"]:
            reasons[f"{r['kind']}:{r['reason']}"] += 1
        if r["kind"] == "error" and len(errors) < 50:
            errors.append(f"{r['where']}: {r['reason']}: {r['title']}")
        if r["kind"] == "article":
            paragraphs += len(json.loads(r["doc"]))
    counts = {"kinds": kinds, "reasons": reasons, "errors": errors, "paragraphs": paragraphs}
    return pa.table({"counts": [json.dumps(counts)]})


def _parse_kb_lines(batch: pa.Table, max_chars: int, files: list[str], directory: str) -> pa.Table:
    rows: list[dict] = []
    lines = bad = 0
    examples: list[str] = []
    for r in batch.to_pylist():
        out, reason = kb_line_rows(r["line"], r["file_index"], max_chars)
        if reason is not None:
            bad += 1
            if len(examples) < 20:
                examples.append(f"{files[r['file_index']]}:{r['line_no']}: {reason}")
        if out or reason is not None:
            lines += 1
        rows.extend(out)
    if rows:
        table = _table(rows, KB_SCHEMA)
        _write_part(table, directory, _part_name(batch, ["file_index", "line_no"]))
    return pa.table({"counts": [json.dumps({"lines": lines, "bad_lines": bad, "bad_examples": examples})]})


def _best_kb_rows(bucket: pa.Table) -> pa.Table:
    """The winning row of each knowledge-base key of one bucket (earlier file, then the row's own
    priority, then the description, so that ties break the same way in every run)."""
    ordered = bucket.select(KB_SCHEMA.names).sort_by(
        [("key", "ascending"), ("p0", "ascending"), ("p1", "ascending"), ("p2", "ascending"),
         ("description", "ascending")])
    keys = ordered["key"].to_numpy(zero_copy_only=False)
    first = np.ones(len(keys), dtype=bool)
    first[1:] = keys[1:] != keys[:-1]
    return ordered.filter(pa.array(first))


def _with_bucket(batch: pa.Table, column: str, buckets: int) -> pa.Table:
    values = batch[column].to_pylist()
    if pa.types.is_integer(batch.schema.field(column).type):
        ids = [v % buckets for v in values]
    else:
        ids = [zlib.crc32(v.encode()) % buckets for v in values]
    return batch.append_column("bucket", pa.array(ids, pa.int32()))


def bucketed(ds, column: str, fn, cfg: KilmConfig, partitions: int, **fn_kwargs):
    """``fn`` once per bucket of rows whose ``column`` hashes alike: all rows of a key meet in one call,
    and a call holds about 1/(4 x partitions) of the data. Grouping by bucket instead of by key keeps
    Ray Data's guarantee (a group is never split) without a Python call per key, which cost 300 us
    each: 45 s for the 118 k keys of WordNet alone on 2 CPUs."""
    buckets = 4 * partitions
    keyed = _map(ds, _with_bucket, cfg, num_cpus=0.25, column=column, buckets=buckets)
    return keyed.groupby("bucket", num_partitions=partitions).map_groups(
        fn, batch_format="pyarrow", fn_kwargs=fn_kwargs, **task_resources(cfg))


def _write_rows(batch: pa.Table, directory: str, columns: list[str], prefix: str = "part") -> pa.Table:
    if batch.num_rows:
        _write_part(batch, directory, _part_name(batch, columns, prefix))
    return pa.table({"counts": [json.dumps({"rows": batch.num_rows})]})


def _counts(ds) -> list[dict]:
    return [json.loads(c) for b in ds.iter_batches(batch_format="pyarrow", batch_size=None)
            for c in b["counts"].to_pylist()]


class Stages:
    """Stage outputs under ``out/_work/<run key>/``: a stage whose ``<name>.json`` exists finished and
    is read back instead of being redone; one that did not is cleared and run again."""

    def __init__(self, work: str):
        self.work = work

    def dir(self, name: str) -> str:
        return storage.join(self.work, name)

    def done(self, name: str) -> Optional[dict]:
        marker = storage.join(self.work, f"{name}.json")
        return json.loads(storage.read_bytes(marker)) if storage.exists(marker) else None

    def clear(self, name: str) -> None:
        fs, path = storage.resolve(self.dir(name))
        fs.delete_dir_contents(path, missing_dir_ok=True)

    def finish(self, name: str, summary: dict) -> dict:
        storage.write_bytes(storage.join(self.work, f"{name}.json"), json.dumps(summary).encode())
        return summary

    def read(self, name: str, schema: pa.Schema):
        return read_parquet_files(storage.list_files(self.dir(name), ".parquet"), schema)


def parse_stage(stages: Stages, units: list[ReadUnit], cfg: KilmConfig) -> dict:
    found = stages.done("pages")
    if found:
        log.info("pages: parsed by an earlier run, reused (%s)", stages.dir("pages"))
        return found
    stages.clear("pages")
    parsed = parse_pages(read_pages(units, cfg), cfg)
    # Files of STAGE_FILE_ROWS pages, not one per parse block: enwiki would leave 1.4 M small files.
    parts = _counts(_map(parsed, _write_pages, cfg, num_cpus=0, batch_size=STAGE_FILE_ROWS,
                         directory=stages.dir("pages")))
    kinds, reasons, errors, paragraphs = Counter(), Counter(), [], 0
    for part in parts:
        kinds.update(part["kinds"])
        reasons.update(part["reasons"])
        errors.extend(part["errors"][: 50 - len(errors)])
        paragraphs += part["paragraphs"]
    for example in errors:
        log.warning("skipped page %s", example)
    pages = {
        "read": sum(kinds.values()), "articles": kinds["article"], "redirects": kinds["redirect"],
        "skipped": {k.split(":", 1)[1]: v for k, v in sorted(reasons.items()) if k.startswith("skipped:")},
        "errors": {k.split(":", 1)[1]: v for k, v in sorted(reasons.items()) if k.startswith("error:")},
        "error_examples": sorted(errors),
    }
    return stages.finish("pages", {"pages": pages, "paragraphs": paragraphs})


def kb_stage(stages: Stages, files: list[str], cfg: KilmConfig) -> dict:
    """Knowledge-base files -> one (key, description) row per key, the best line winning."""
    import ray.data

    found = stages.done("kb")
    if found:
        log.info("knowledge base: loaded by an earlier run, reused (%s)", stages.dir("kb"))
        return found
    summary = {"files": files, "lines": 0, "entities": 0, "bad_lines": 0, "bad_examples": []}
    stages.clear("kb_rows")
    stages.clear("kb")
    if files:
        makers = [lambda i=i, f=f: _kb_line_blocks(i, f) for i, f in enumerate(files)]
        lines = ray.data.read_datasource(_datasource(makers, KB_LINE_SCHEMA, files), override_num_blocks=len(files),
                                         num_cpus=0.01, compute=light_pool(), **task_resources(cfg))
        # Ray Data coalesces a read task's yields into blocks of up to 128 MiB: parse them 20 k lines at a
        # time (whole blocks as Python rows took a worker to 1.1 GB on 640 k lines, and grew with the file).
        for part in _counts(_map(lines, _parse_kb_lines, cfg, batch_size=KB_LINES_PER_BATCH,
                                 max_chars=cfg.corpus.max_description_chars, files=files,
                                 directory=stages.dir("kb_rows"))):
            summary["lines"] += part["lines"]
            summary["bad_lines"] += part["bad_lines"]
            summary["bad_examples"].extend(part["bad_examples"][: 20 - len(summary["bad_examples"])])
        best = bucketed(stages.read("kb_rows", KB_SCHEMA), "key", _best_kb_rows, cfg, _partitions(cfg, stages, "kb_rows"))
        summary["entities"] = sum(p["rows"] for p in _counts(_map(best, _write_rows, cfg, num_cpus=0,
                                                                  directory=stages.dir("kb"), columns=["key"])))
        stages.clear("kb_rows")
    for example in summary["bad_examples"]:
        log.warning("skipped knowledge-base line %s", example)
    return stages.finish("kb", summary)


# ----------------------------------------------------------------------------------------------
# Tokenizer from a bounded, seeded sample of paragraphs
# ----------------------------------------------------------------------------------------------


def _sample_paragraphs(batch: pa.Table, seed: int, threshold: int) -> pa.Table:
    hashes, texts = [], []
    for r in batch.select(["kind", "doc"]).to_pylist():
        if r["kind"] != "article":
            continue
        for text, _ in json.loads(r["doc"]):
            h = sample_hash(seed, text)
            if h < threshold:
                hashes.append(h)
                texts.append(text)
    return pa.table({"hash": pa.array(hashes, pa.int64()), "text": pa.array(texts, pa.large_string())})


def paragraph_sample(pages, cfg: KilmConfig, total: int) -> list[str]:
    """The ``tokenizer.train_max_paragraphs`` paragraphs with the smallest seeded hashes: the same
    sample whatever the block layout, and the driver holds at most that many (plus a margin)."""
    wanted = cfg.tokenizer.train_max_paragraphs
    candidates = _map(pages, _sample_paragraphs, cfg, seed=cfg.corpus.split_seed,
                      threshold=sample_threshold(wanted, total))
    heap: list[tuple[int, str]] = []  # max-heap of the smallest hashes, as (-hash, text)
    for batch in candidates.iter_batches(batch_format="pyarrow", batch_size=4096):
        for h, text in zip(batch["hash"].to_pylist(), batch["text"].to_pylist()):
            if len(heap) < wanted:
                heapq.heappush(heap, (-h, text))
            elif -heap[0][0] > h:
                heapq.heapreplace(heap, (-h, text))
    return [text for _, text in sorted(((-h, t) for h, t in heap))]


def prepare_tokenizer(cfg: KilmConfig, sample_texts, local_dir: Path):
    """The tokenizer: trained on ``sample_texts()`` (source=train) or loaded; saved to ``local_dir``."""
    from kilm_ray.tokenizer import load_tokenizer, train_bpe

    if cfg.tokenizer.source == "train":
        texts = sample_texts()
        log.info("training a byte-level BPE (vocab %d) on %d paragraphs", cfg.tokenizer.vocab_size, len(texts))
        tokenizer = train_bpe(texts, cfg.tokenizer.vocab_size)
    else:
        tokenizer = load_tokenizer(cfg.tokenizer.source)
    tokenizer.model_max_length = 1_000_000  # paragraphs are chunked after tokenization, not truncated
    tokenizer.save_pretrained(str(local_dir))
    return tokenizer


# ----------------------------------------------------------------------------------------------
# Link resolution: redirects, knowledge by entity, tokenized once per entity
# ----------------------------------------------------------------------------------------------


REDIRECT_SCHEMA = pa.schema([("key", pa.string()), ("kind", pa.string()), ("page_id", pa.int64()),
                             ("src", pa.string()), ("dst", pa.string())])


def _redirect_rows(batch: pa.Table, key: str) -> pa.Table:
    """Redirect pages as ``hop`` rows keyed by their source (to be followed) or ``edge`` rows keyed by
    their destination (to be extended)."""
    rows = batch.filter(pc.equal(batch["kind"], "redirect"))
    n = rows.num_rows
    return pa.table({"key": rows["title" if key == "src" else "redirect"],
                     "kind": ["hop" if key == "src" else "edge"] * n, "page_id": pa.nulls(n, pa.int64()),
                     "src": rows["title"], "dst": rows["redirect"]}, schema=REDIRECT_SCHEMA)


def _as_rows(batch: pa.Table, kind: str) -> pa.Table:
    """A (src, dst) redirect table as ``hop`` (keyed by src) or ``edge`` (keyed by dst) rows."""
    n = batch.num_rows
    return pa.table({"key": batch["src" if kind == "hop" else "dst"], "kind": [kind] * n,
                     "page_id": pa.nulls(n, pa.int64()), "src": batch["src"], "dst": batch["dst"]},
                    schema=REDIRECT_SCHEMA)


def _extend_edges(bucket: pa.Table) -> pa.Table:
    """One round of chain compression in one bucket: each edge ``a -> b`` meets the hop ``b -> c``."""
    rows = bucket.drop_columns(["bucket"]).to_pylist()
    hops = {r["src"]: r["dst"] for r in rows if r["kind"] == "hop"}
    edges = [r for r in rows if r["kind"] == "edge"]
    return pa.table({"src": pa.array([r["src"] for r in edges], pa.string()),
                     "dst": pa.array([follow_redirect(r["src"], r["dst"], hops.get(r["dst"])) for r in edges],
                                     pa.string())})


def redirect_table(pages, cfg: KilmConfig, partitions: int):
    """Redirects as ``hop`` rows with chains followed: each round, every ``a -> b`` meets ``b -> c``."""
    edges = None
    for _ in range(cfg.corpus.redirect_rounds):
        if edges is None:
            rows = _map(pages, _redirect_rows, cfg, num_cpus=0.25, key="dst").union(
                _map(pages, _redirect_rows, cfg, num_cpus=0.25, key="src"))
        else:
            rows = _map(edges, _as_rows, cfg, num_cpus=0.25, kind="edge").union(
                _map(edges, _as_rows, cfg, num_cpus=0.25, kind="hop"))
        edges = bucketed(rows, "key", _extend_edges, cfg, partitions)
    if edges is None:
        return _map(pages, _redirect_rows, cfg, num_cpus=0.25, key="src")
    return _map(edges, _as_rows, cfg, num_cpus=0.25, kind="hop")


def _link_rows(batch: pa.Table) -> pa.Table:
    """Distinct link targets of each article, keyed by target (to meet the target's redirect)."""
    page_ids, targets = [], []
    for r in batch.select(["kind", "page_id", "doc"]).to_pylist():
        if r["kind"] == "article":
            for target in page_link_targets(r["doc"]):
                page_ids.append(r["page_id"])
                targets.append(target)
    n = len(targets)
    return pa.table({"key": pa.array(targets, pa.string()), "kind": ["link"] * n,
                     "page_id": pa.array(page_ids, pa.int64()), "src": pa.array(targets, pa.string()),
                     "dst": pa.nulls(n, pa.string())}, schema=REDIRECT_SCHEMA)


def _follow_links(bucket: pa.Table) -> pa.Table:
    """Links of one bucket of targets through their redirects -> entity rows keyed by the resolved title."""
    rows = bucket.drop_columns(["bucket"]).to_pylist()
    hops = {r["src"]: r["dst"] for r in rows if r["kind"] == "hop"}
    out = []
    for r in rows:
        if r["kind"] == "link":
            resolved = hops.get(r["src"], r["src"])
            out.append({"key": entity_key(resolved), "kind": "link", "page_id": r["page_id"], "target": r["src"],
                        "resolved": resolved})
    return _table(out, ENTITY_SCHEMA)


def _dump_knowledge_rows(batch: pa.Table) -> pa.Table:
    rows = [{"key": entity_key(r["title"]), "kind": "dump", "resolved": r["title"],
             "template": r["short_description"], "first_sentence": r["first_sentence"]}
            for r in batch.select(["kind", "title", "short_description", "first_sentence"]).to_pylist()
            if r["kind"] == "article" and (r["short_description"] or r["first_sentence"])]
    return _table(rows, ENTITY_SCHEMA)


def _kb_entity_rows(batch: pa.Table) -> pa.Table:
    n = batch.num_rows
    return pa.table({"key": batch["key"], "kind": ["kb"] * n, "page_id": pa.nulls(n, pa.int64()),
                     "target": pa.nulls(n, pa.string()), "resolved": pa.nulls(n, pa.string()),
                     "template": pa.nulls(n, pa.string()), "first_sentence": pa.nulls(n, pa.string()),
                     "description": batch["description"]}, schema=ENTITY_SCHEMA)


_TOKENIZERS: dict[str, Any] = {}


def _corpus_tokenizer(tokenizer_ref: dict):
    """One Rust tokenizer per worker process and job, fetched once from the object store (the ref
    travels inside a dict so that Ray hands it over as a ref, not as the whole JSON per task)."""
    import ray

    from kilm_ray.tokenizer import CorpusTokenizer

    ref = tokenizer_ref["tokenizer_json"]
    if ref.hex() not in _TOKENIZERS:
        _TOKENIZERS.clear()
        _TOKENIZERS[ref.hex()] = CorpusTokenizer(ray.get(ref))
    return _TOKENIZERS[ref.hex()]


def _resolve_entities(bucket: pa.Table, sources: list[str], has_kb: bool, bare_round: bool,
                      tokenizer_ref, max_knowledge_tokens: int) -> pa.Table:
    """All rows of the entity keys of one bucket: links, in-dump knowledge, knowledge-base rows.
    Chooses each linked title's knowledge, tokenizes it once, and gives every link to it its answer
    (links without knowledge are dropped: they stay plain text). In the first round a title whose
    answer needs the knowledge-base row of its bare title ("Mercury (planet)" -> "mercury") is handed
    on, keyed by that."""
    from kilm_ray.chunking import knowledge_ids

    rows = bucket.drop_columns(["bucket"]).to_pylist()
    kb = {r["key"]: r["description"] for r in rows if r["kind"] == "kb"}
    dump = {r["resolved"]: r for r in rows if r["kind"] == "dump"}
    links: dict[str, list[dict]] = {}
    for r in rows:
        if r["kind"] in ("link", "deferred"):
            links.setdefault(r["resolved"], []).append(r)
    out: list[dict] = []
    tokenizer = None
    for title, refs in sorted(links.items()):
        if bare_round:
            first = refs[0]
            template, first_sentence = first["template"], first["first_sentence"]
            choice = choose_knowledge(sources, template, first_sentence, None, True, kb.get(first["key"]), True)
        else:
            known = dump.get(title, {})
            template, first_sentence = known.get("template"), known.get("first_sentence")
            choice = choose_knowledge(sources, template, first_sentence, kb.get(refs[0]["key"]),
                                      has_kb and bare_key(title) is not None)
        if choice is None:
            continue
        if choice == PENDING:
            out.extend({"state": "deferred", "key": bare_key(title), "page_id": r["page_id"], "target": r["target"],
                        "resolved": title, "template": template, "first_sentence": first_sentence} for r in refs)
            continue
        tokenizer = tokenizer or _corpus_tokenizer(tokenizer_ref)
        ids = knowledge_ids(tokenizer.encode, title, choice[0], tokenizer.token_id("<sep>"), max_knowledge_tokens)
        out.extend({"state": "resolved", "page_id": r["page_id"], "target": r["target"], "resolved": title,
                    "source": choice[1], "knowledge": ids} for r in refs)
    return _table(out, LINK_SCHEMA)


def _deferred_rows(batch: pa.Table) -> pa.Table:
    rows = batch.filter(pc.equal(batch["state"], "deferred"))
    n = rows.num_rows
    return pa.table({"key": rows["key"], "kind": ["deferred"] * n, "page_id": rows["page_id"],
                     "target": rows["target"], "resolved": rows["resolved"], "template": rows["template"],
                     "first_sentence": rows["first_sentence"], "description": pa.nulls(n, pa.string())},
                    schema=ENTITY_SCHEMA)


def _page_link_rows(batch: pa.Table) -> pa.Table:
    rows = batch.filter(pc.equal(batch["state"], "resolved"))
    n = rows.num_rows
    return pa.table({"page_id": rows["page_id"], "kind": ["link"] * n, "title": pa.nulls(n, pa.string()),
                     "doc": pa.nulls(n, pa.large_string()), "target": rows["target"], "resolved": rows["resolved"],
                     "source": rows["source"], "knowledge": rows["knowledge"]}, schema=PAGE_GROUP_SCHEMA)


def _page_article_rows(batch: pa.Table) -> pa.Table:
    rows = batch.filter(pc.equal(batch["kind"], "article"))
    n = rows.num_rows
    return pa.table({"page_id": rows["page_id"], "kind": ["article"] * n, "title": rows["title"], "doc": rows["doc"],
                     "target": pa.nulls(n, pa.string()), "resolved": pa.nulls(n, pa.string()),
                     "source": pa.nulls(n, pa.string()), "knowledge": pa.nulls(n, pa.large_list(pa.int32()))},
                    schema=PAGE_GROUP_SCHEMA)


def links_stage(stages: Stages, cfg: KilmConfig, has_kb: bool, tokenizer_ref) -> dict:
    """Every link out of every article, resolved through redirects and joined with its entity's
    knowledge (first round: by the entity's key; second: by its bare title's key)."""
    found = stages.done("links")
    if found:
        log.info("links: resolved by an earlier run, reused (%s)", stages.dir("links"))
        return found
    stages.clear("links")
    partitions = _partitions(cfg, stages, "pages", "kb")
    pages = stages.read("pages", PAGE_SCHEMA)
    links = _map(pages, _link_rows, cfg, num_cpus=0.25).union(redirect_table(pages, cfg, partitions))
    entity_rows = [bucketed(links, "key", _follow_links, cfg, partitions),
                   _map(pages, _dump_knowledge_rows, cfg, num_cpus=0.25)]
    if has_kb:
        entity_rows.append(_map(stages.read("kb", KB_SCHEMA), _kb_entity_rows, cfg, num_cpus=0.25))
    resolve = dict(sources=list(cfg.corpus.knowledge_sources), has_kb=has_kb, tokenizer_ref=tokenizer_ref,
                   max_knowledge_tokens=cfg.data.max_knowledge_tokens)
    first = bucketed(entity_rows[0].union(*entity_rows[1:]), "key", _resolve_entities, cfg, partitions,
                     **resolve, bare_round=False)
    rows = sum(p["rows"] for p in _counts(_map(first, _write_rows, cfg, num_cpus=0, directory=stages.dir("links"),
                                               columns=["state", "page_id", "target"], prefix="first")))
    written = stages.read("links", LINK_SCHEMA)
    deferred = _map(written, _deferred_rows, cfg, num_cpus=0.25)
    if has_kb and deferred.count():
        kb_rows = _map(stages.read("kb", KB_SCHEMA), _kb_entity_rows, cfg, num_cpus=0.25)
        second = bucketed(deferred.union(kb_rows), "key", _resolve_entities, cfg, partitions, **resolve,
                          bare_round=True)
        rows += sum(p["rows"] for p in _counts(_map(second, _write_rows, cfg, num_cpus=0, directory=stages.dir("links"),
                                                    columns=["page_id", "target"], prefix="bare")))
    return stages.finish("links", {"rows": rows})


# ----------------------------------------------------------------------------------------------
# Chunks: each article with its resolved links
# ----------------------------------------------------------------------------------------------


def _chunk_articles(articles: Iterable[dict], resolver_of, tokenizer, cfg: KilmConfig) -> pa.Table:
    """Articles -> chunk rows and one stats row per article; ``resolver_of(page_id)`` resolves links."""
    out: list[dict[str, Any]] = []
    retitle = None
    if cfg.data.title_as_mentioned:
        retitle = functools.partial(title_as_mentioned, tokenizer.encode, tokenizer.token_id("<sep>"),
                                    cfg.data.max_knowledge_tokens)
    for r in articles:
        chunks, counts = article_chunks(paragraphs_from_doc(r["doc"]), resolver_of(r["page_id"]), tokenizer.encode,
                                        tokenizer.decode, tokenizer.encode("\n")[0], cfg.data.max_text_tokens,
                                        cfg.data.min_chunk_tokens, retitle)
        splits = split_of(r["title"], cfg.corpus.split_seed, cfg.corpus.valid_fraction,
                          cfg.corpus.test_fraction)
        out.extend({**row, **_zero_counts()} for row in chunk_rows(r["page_id"], r["title"], chunks, splits,
                                                                       cfg.data.train_min_mentions))
        out.append(_article_stats_row(r["page_id"], r["title"], counts, len(chunks)))
    return _table(out, CHUNK_SCHEMA)


def _chunk_pages(bucket: pa.Table, tokenizer_ref, cfg_dict: dict) -> pa.Table:
    """The articles of one bucket of page ids, each with its resolved links (distributed path)."""
    from kilm_ray.config import config_from_dict

    rows = bucket.drop_columns(["bucket"]).to_pylist()
    links: dict[int, list] = {}
    for r in rows:
        if r["kind"] == "link":
            links.setdefault(r["page_id"], []).append((r["target"], r["resolved"], r["source"], r["knowledge"]))
    articles = sorted((r for r in rows if r["kind"] == "article"), key=lambda r: r["page_id"])
    return _chunk_articles(articles, lambda page_id: table_resolver(links.get(page_id, ())),
                           _corpus_tokenizer(tokenizer_ref), config_from_dict(cfg_dict))


# ----------------------------------------------------------------------------------------------
# The lookup path (corpus.link_resolution: lookup): one in-memory table shared by every process
# ----------------------------------------------------------------------------------------------


def _load_kb(files: list[str], max_chars: int) -> tuple[dict, dict]:
    """External knowledge bases -> (key -> description, stats); runs as a Ray task beside parsing."""
    table, stats = load_knowledge_base(files, max_chars)
    return table, {"files": files, "lines": stats.lines, "entities": stats.entities, "bad_lines": stats.bad_lines,
                   "bad_examples": stats.bad_examples}


def build_lookup(pages, cfg: KilmConfig) -> KnowledgeLookup:
    """Redirects and in-dump descriptions of every page, in one dict per source on the driver."""
    lookup = KnowledgeLookup(sources=tuple(cfg.corpus.knowledge_sources))
    columns = ["kind", "title", "redirect", "short_description", "first_sentence"]
    for batch in pages.select_columns(columns).iter_batches(batch_format="pyarrow", batch_size=4096):
        for r in batch.to_pylist():
            lookup.add_page(r)
    return lookup


class ChunkBuilder:
    """Resolves links through the shared lookup, tokenizes and chunks a batch of parsed pages."""

    def __init__(self, lookup: KnowledgeLookup, external: Optional[dict], tokenizer_json: str, cfg_dict: dict):
        from kilm_ray.chunking import knowledge_ids
        from kilm_ray.config import config_from_dict
        from kilm_ray.corpus.links import lookup_resolver
        from kilm_ray.tokenizer import CorpusTokenizer

        if external:
            lookup.external = external
        self.cfg = config_from_dict(cfg_dict)
        self.tokenizer = CorpusTokenizer(tokenizer_json)
        sep, max_k = self.tokenizer.token_id("<sep>"), self.cfg.data.max_knowledge_tokens
        self.cache: dict = {}
        self.resolve = lookup_resolver(
            lookup, lambda title, desc: knowledge_ids(self.tokenizer.encode, title, desc, sep, max_k), self.cache)

    def __call__(self, batch: pa.Table) -> pa.Table:
        if len(self.cache) > 200_000:
            self.cache.clear()
        return _chunk_articles((r for r in batch.to_pylist() if r["kind"] == "article"), lambda _: self.resolve,
                               self.tokenizer, self.cfg)


_BUILDERS: dict[tuple, ChunkBuilder] = {}


def _build_chunks(batch: pa.Table, refs: dict, cfg_dict: dict) -> pa.Table:
    """Ray Data task: one ChunkBuilder per worker process and job, kept across tasks; each process
    fetches the lookup, the knowledge base and the tokenizer from the object store once."""
    import ray

    key = tuple(ref.hex() for ref in refs.values())
    builder = _BUILDERS.get(key)
    if builder is None:
        _BUILDERS.clear()
        lookup, external, tokenizer_json = ray.get([refs["lookup"], refs["external"], refs["tokenizer_json"]])
        builder = _BUILDERS[key] = ChunkBuilder(lookup, external, tokenizer_json, cfg_dict)
    return builder(batch)


def _zero_counts() -> dict[str, int]:
    return {"links": 0, "links_template": 0, "links_first_sentence": 0, "links_external": 0, "links_no_knowledge": 0}


def _article_stats_row(page_id: int, title: str, counts: LinkCounts, n_chunks: int) -> dict[str, Any]:
    return {"split": ARTICLE_STATS, "sample_id": page_id, "article": title, "chunk_index": n_chunks, "text": "",
            "input_ids": [], "ent_start": [], "ent_end": [], "ent_title": [], "ent_source": [], "ent_knowledge": [],
            "links": counts.links, "links_template": counts.template, "links_first_sentence": counts.first_sentence,
            "links_external": counts.external, "links_no_knowledge": counts.no_knowledge}


def _write_shards(batch: pa.Table, out: str, max_eval_entities: int) -> pa.Table:
    """Write one batch of built rows as one parquet shard per split; return its counts and files."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    fs, root = storage.resolve(out)
    counts: dict[str, Any] = {"links": {k: 0 for k in LINK_COLUMNS}, "chunks": 0, "files": []}
    articles = batch.filter(pc.equal(batch["split"], ARTICLE_STATS))
    for key in LINK_COLUMNS:
        counts["links"][key] = int(pc.sum(articles[key]).as_py() or 0)
    counts["chunks"] = int(pc.sum(articles["chunk_index"]).as_py() or 0)
    for split in SPLITS:
        rows = batch.filter(pc.equal(batch["split"], split)).drop_columns(["split", *LINK_COLUMNS])
        rows = rows.sort_by("sample_id")
        n_mentions = pc.list_value_length(rows["ent_start"]).to_numpy(zero_copy_only=False)
        counts[split] = {"chunks": rows.num_rows, "knowledge_chunks": int((n_mentions > 0).sum()),
                         "mentions": int(n_mentions.sum()),
                         "eval_samples": int(np.minimum(n_mentions, max_eval_entities).sum())}
        if rows.num_rows:
            first, last = int(rows["sample_id"][0].as_py()), int(rows["sample_id"][-1].as_py())
            name = f"{split}/part-{first:016d}.parquet"
            fs.create_dir(f"{root}/{split}", recursive=True)
            pq.write_table(rows, f"{root}/{name}", filesystem=fs)
            counts["files"].append({"split": split, "path": name, "rows": rows.num_rows,
                                    "min_sample_id": first, "max_sample_id": last})
    return pa.table({"counts": [json.dumps(counts)]})


def _sum_counts(parts: list[dict]) -> dict:
    links = Counter()
    per_split = {s: Counter() for s in SPLITS}
    chunks = 0
    for part in parts:
        links.update(part["links"])
        chunks += part["chunks"]
        for split in SPLITS:
            per_split[split].update(part[split])
    return {
        "links": {"total": links["links"],
                  "with_knowledge": {"template": links["links_template"],
                                     "first_sentence": links["links_first_sentence"],
                                     "external": links["links_external"]},
                  "without_knowledge": links["links_no_knowledge"]},
        "chunks": {"total": chunks},
        "samples": {s: {k: c.get(k, 0) for k in ("chunks", "knowledge_chunks", "mentions", "eval_samples")}
                    for s, c in per_split.items()},
    }


# ----------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------


def preflight(dumps: list[str], knowledge: list[str], tokenizer_source: str = "train") -> tuple[list[str], list[str]]:
    """Fail fast, before any Ray work, naming a missing or unreadable input; returns the dump files and
    the knowledge-base files (directories, globs and prefixes expanded)."""
    if not dumps:
        raise storage.InputError("no dump given (--dump PATH)")
    kb_files = [f for spec in knowledge for f in storage.expand(spec, KB_SUFFIXES, "knowledge file")]
    dump_files = [f for spec in dumps for f in storage.expand(spec, DUMP_SUFFIXES, "dump")]
    if tokenizer_source.startswith("gpt2-bpe:"):
        for name in ("encoder.json", "vocab.bpe"):
            storage.check_readable(str(Path(tokenizer_source.split(":", 1)[1]).expanduser() / name), "tokenizer file")
    elif tokenizer_source.startswith((".", "/", "~")) and not Path(tokenizer_source).expanduser().is_dir():
        raise storage.InputError(f"tokenizer directory not found: {tokenizer_source}")
    return dump_files, kb_files


def run_key(cfg: KilmConfig, units: list[ReadUnit], kb_files: list[str]) -> str:
    """What the output depends on: the inputs (names, sizes) and the corpus/tokenizer/data settings."""
    inputs = [[u.uri, u.offset, u.length, storage.file_size(u.uri)] for u in units]
    inputs += [[f, storage.file_size(f)] for f in kb_files]
    settings = {k: cfg.to_dict()[k] for k in ("corpus", "tokenizer", "data")}
    settings["corpus"] = {k: v for k, v in settings["corpus"].items() if k not in ("task_resources", "shuffle_partitions",
                                                                                      "shuffle_partition_mb")}
    blob = json.dumps({"inputs": inputs, "settings": settings, "version": __version__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


MAX_PARTITIONS = 8192


def shuffle_partitions(configured: int, input_bytes: int, partition_mb: float, cpus: int) -> int:
    """Partitions of a group-by: as configured, else one per ``partition_mb`` of input (a reduce task
    holds one partition, so its memory stays flat as the corpus grows), at least one per CPU."""
    if configured:
        return configured
    by_size = -(-input_bytes // max(1, int(partition_mb * 2**20)))
    return int(max(2, cpus, min(MAX_PARTITIONS, by_size)))


def _partitions(cfg: KilmConfig, stages: "Stages", *inputs: str) -> int:
    import ray

    size = sum(storage.total_size(stages.dir(name), ".parquet") for name in inputs)
    partitions = shuffle_partitions(cfg.corpus.shuffle_partitions, size, cfg.corpus.shuffle_partition_mb,
                                    int(ray.cluster_resources().get("CPU", 2)))
    log.info("%s: %.1f MB of input -> %d shuffle partitions", "+".join(inputs), size / 1e6, partitions)
    return partitions


def uses_distributed_resolution(mode: str, lookup_max_input_mb: float, input_bytes: int) -> bool:
    """corpus.link_resolution: 'auto' resolves small inputs by lookup (its tables are bounded by the
    input limit) and everything else distributed."""
    if mode == "auto":
        return input_bytes > lookup_max_input_mb * 1e6
    return mode == "distributed"


def preprocess(cfg: KilmConfig, dumps: list[str], out: str, knowledge: Optional[list[str]] = None) -> dict:
    """Run the whole pipeline on the current Ray cluster; returns the stats (also in out/stats.json)."""
    import ray
    import ray.data
    from ray.data.context import ShuffleStrategy

    dump_files, kb_files = preflight(dumps, list(knowledge or []), cfg.tokenizer.source)
    units = read_units(dump_files, max(1, int(cfg.corpus.read_unit_mb * (1 << 20))))  # reads multistream indexes
    started = time.time()
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = False  # order-free: every output is sorted or keyed
    # Ray Data reserves a share of the CPUs for every operator; on small clusters that caps the
    # parse step well below the CPUs it could use (1.5 of 2; measured in bench/). Our operators
    # cannot starve each other: reads and shard writes take (almost) no CPU.
    ctx.op_resource_reservation_enabled = False
    # Shuffles (joins, group-bys) as Ray Data's v2 map/reduce tasks on warm workers: the default
    # aggregator actors start afresh for every operator (5-9 s each on 2 cores; v2: 0.4-1.6 s).
    ctx.shuffle_strategy = ShuffleStrategy.SHUFFLE_V2
    # A shuffle's map task coalesces its input up to this size (Ray's default: 1 GiB, which a map task
    # would hold: its memory grew with the corpus up to that size).
    ctx.shuffle_input_batch_bytes = 16 * 2**20
    key = run_key(cfg, units, kb_files)
    stages = Stages(storage.join(out, "_work", key))
    has_kb = bool(kb_files) and "external" in cfg.corpus.knowledge_sources
    log.info("reading %d dump read unit(s) from %s; run key %s", len(units), ", ".join(dumps), key)

    distributed = uses_distributed_resolution(cfg.corpus.link_resolution, cfg.corpus.lookup_max_input_mb,
                                              sum(storage.file_size(f) for f in dump_files + kb_files))
    log.info("link resolution: %s", "distributed" if distributed else "lookup")
    kb_load = None
    if has_kb and not distributed:  # loads in a task while the dump is parsed
        kb_load = ray.remote(_load_kb).options(num_returns=2, num_cpus=1, **task_resources(cfg)).remote(
            kb_files, cfg.corpus.max_description_chars)
    parsed = parse_stage(stages, units, cfg)
    log.info("parsed at %.1fs: %s", time.time() - started,
             {k: v for k, v in parsed["pages"].items() if k != "error_examples"})
    if distributed:
        kb = kb_stage(stages, kb_files if has_kb else [], cfg)
    else:
        kb = ray.get(kb_load[1]) if kb_load else {"files": [], "lines": 0, "entities": 0, "bad_lines": 0,
                                                  "bad_examples": []}
        for example in kb["bad_examples"]:
            log.warning("skipped knowledge-base line %s", example)
    log.info("knowledge base at %.1fs: %d entities from %d lines", time.time() - started, kb["entities"], kb["lines"])

    with tempfile.TemporaryDirectory(prefix="kilm_tok_") as tmp:
        tokenizer_dir = Path(tmp) / "tokenizer"
        tokenizer = prepare_tokenizer(
            cfg, lambda: paragraph_sample(stages.read("pages", PAGE_SCHEMA), cfg, parsed["paragraphs"]), tokenizer_dir)
        tokenizer_json = (tokenizer_dir / "tokenizer.json").read_text()
        log.info("tokenizer ready (%d tokens) at %.1fs", len(tokenizer), time.time() - started)
        tokenizer_ref = {"tokenizer_json": ray.put(tokenizer_json)}
        pages = stages.read("pages", PAGE_SCHEMA)
        if distributed:
            links_stage(stages, cfg, has_kb, tokenizer_ref)
            log.info("links resolved at %.1fs", time.time() - started)
            grouped = _map(pages, _page_article_rows, cfg, num_cpus=0.25).union(
                _map(stages.read("links", LINK_SCHEMA), _page_link_rows, cfg, num_cpus=0.25))
            built = bucketed(grouped, "page_id", _chunk_pages, cfg, _partitions(cfg, stages, "pages", "links"),
                             tokenizer_ref=tokenizer_ref,
                             cfg_dict=cfg.to_dict())
        else:
            lookup = build_lookup(pages, cfg)
            log.info("lookup built at %.1fs: %d redirects, %d descriptions", time.time() - started,
                     len(lookup.redirects), len(lookup.template) + len(lookup.first_sentence))
            refs = {"lookup": ray.put(lookup), "external": kb_load[0] if kb_load else ray.put(None),
                    "tokenizer_json": tokenizer_ref["tokenizer_json"]}
            built = _map(pages, _build_chunks, cfg, refs=refs, cfg_dict=cfg.to_dict())

        shards = storage.join(out, "shards", key)
        fs, shards_path = storage.resolve(shards)
        fs.delete_dir_contents(shards_path, missing_dir_ok=True)
        # One pass writes every split's shards and returns the counts: no second read of the data.
        parts = _counts(_map(built, _write_shards, cfg, num_cpus=0, batch_size=SHARD_ROWS, out=shards,
                             max_eval_entities=cfg.data.max_eval_entities))
        stats = {"pages": parsed["pages"]}
        stats.update(_sum_counts(parts))
        files = sorted((f for p in parts for f in p["files"]), key=lambda f: (f["split"], f["min_sample_id"]))
        log.info("wrote %s chunks at %.1fs: %s", stats["chunks"]["total"], time.time() - started,
                 {s: v["chunks"] for s, v in stats["samples"].items()})
        for split in SPLITS:
            if not stats["samples"][split]["chunks"]:
                log.warning("split %s is empty (a small corpus?)", split)
        storage.upload_dir(tokenizer_dir, storage.join(out, "tokenizer"))
    # The evaluation's tables (seen titles, anchor texts -> training titles): group-bys over the shards.
    from kilm_ray.eval.tables import build_tables

    tables = build_tables({s: [storage.join(shards, f["path"]) for f in files if f["split"] == s] for s in SPLITS},
                          tokenizer_json, storage.join(shards, "tables"), cfg)
    log.info("evaluation tables at %.1fs: %s", time.time() - started, tables["summary"])

    from kilm_ray.tokenizer import special_ids

    stats["knowledge_base"] = {k: kb[k] for k in ("files", "lines", "entities", "bad_lines", "bad_examples")}
    stats["knowledge_table"] = {"external": kb["entities"]}
    stats["tokenizer"] = {"source": cfg.tokenizer.source, "vocab_size": len(tokenizer)}
    stats["elapsed_s"] = round(time.time() - started, 2)
    storage.write_bytes(storage.join(out, "stats.json"), json.dumps(stats, indent=2).encode())
    manifest = build_manifest(cfg, dumps, kb_files, key, files, stats, special_ids(tokenizer).__dict__,
                              len(tokenizer), tokenizer_json)
    manifest["tables"] = {"dir": f"shards/{key}/tables", **tables}
    commit_manifest(out, manifest)
    _collect_garbage(out, key)
    return stats


def build_manifest(cfg: KilmConfig, dumps: list[str], kb_files: list[str], key: str, files: list[dict],
                   stats: dict, special: dict, vocab_size: int, tokenizer_json: str) -> dict:
    settings = {k: cfg.to_dict()[k] for k in ("corpus", "tokenizer", "data")}
    return {
        "format": MANIFEST_FORMAT, "kilm_ray_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "run_key": key, "dumps": dumps, "knowledge": kb_files, "config": settings,
        "config_sha256": hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest(),
        "tokenizer_sha256": hashlib.sha256(tokenizer_json.encode()).hexdigest(),
        "special_ids": special, "vocab_size": vocab_size,
        "samples": {s: stats["samples"][s]["chunks"] for s in SPLITS},
        "files": {s: [{k: f[k] for k in ("path", "rows", "min_sample_id", "max_sample_id")}
                      for f in files if f["split"] == s] for s in SPLITS},
        "shards": f"shards/{key}", "stats": "stats.json", "tokenizer": "tokenizer",
    }


def commit_manifest(out: str, manifest: dict) -> None:
    """The commit point: written last, atomically (a rename on a local disk; one PUT on S3)."""
    data = json.dumps(manifest, indent=2).encode()
    if storage.is_remote(out):
        storage.write_bytes(storage.join(out, MANIFEST), data)
        return
    target = Path(out) / MANIFEST
    tmp = target.with_suffix(".json.tmp")
    tmp.write_bytes(data)
    tmp.replace(target)


def _collect_garbage(out: str, key: str) -> None:
    """After the commit: the work directory, and shards that the manifest no longer lists."""
    import pyarrow.fs as pafs

    fs, root = storage.resolve(out)
    if fs.get_file_info(f"{root}/_work").type == pafs.FileType.Directory:
        fs.delete_dir(f"{root}/_work")
    shards = fs.get_file_info(pafs.FileSelector(f"{root}/shards", allow_not_found=True))
    for info in shards:
        if info.type == pafs.FileType.Directory and info.base_name != key:
            fs.delete_dir(info.path)


# ----------------------------------------------------------------------------------------------
# Masked examples as a Ray Dataset
# ----------------------------------------------------------------------------------------------


def _mask_rows(batch: dict, seed: int, epoch: int, params: MaskingParams, sp_dict: dict) -> dict:
    from kilm_ray.masking import SpecialIds

    sp = SpecialIds(**sp_dict)
    out: dict[str, list] = {"sample_id": [], "input_ids": [], "labels": [], "knowledge": [], "order": []}
    for i in range(len(batch["sample_id"])):
        starts, ends, know = batch["ent_start"][i], batch["ent_end"][i], batch["ent_knowledge"][i]
        entities = [Entity(int(s), int(e), list(k)) for s, e, k in zip(starts, ends, know)]
        ex = build_train_example(list(batch["input_ids"][i]), entities, int(batch["sample_id"][i]), seed, epoch,
                                 params, sp)
        out["sample_id"].append(ex.sample_id)
        out["input_ids"].append(ex.input_ids)
        out["labels"].append(ex.labels)
        out["knowledge"].append(ex.knowledge)
        out["order"].append(int(np.random.default_rng([seed, epoch, ex.sample_id]).integers(2**62)))
    return {"sample_id": np.array(out["sample_id"]), "order": np.array(out["order"]),
            "input_ids": _object_array(out["input_ids"]), "labels": _object_array(out["labels"]),
            "knowledge": _object_array(out["knowledge"])}


def _object_array(items: list) -> np.ndarray:
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr


def masked_dataset(data_dir: str, split: str, epoch: int, seed: int, cfg: KilmConfig):
    """A Ray Dataset of masked training examples of ``split`` for one epoch, in a seeded order that
    depends on nothing but ``(seed, epoch, sample_id)``. Feed it to ``iter_torch_batches`` with
    :func:`collate_fn`. Masks are identical to the training loader's (same pure function)."""
    from kilm_ray.loader import special_ids_of

    sp = special_ids_of(data_dir)
    params = MaskingParams.from_config(cfg.masking)
    from kilm_ray.loader import split_files

    ds = read_parquet_files(split_files(data_dir, split), CHUNK_SCHEMA,
                            columns=["sample_id", "input_ids", "ent_start", "ent_end", "ent_knowledge"], rows_per_block=1024)
    ds = ds.map_batches(_mask_rows, batch_format="numpy",
                        fn_kwargs={"seed": seed, "epoch": epoch, "params": params, "sp_dict": sp.__dict__})
    return ds.sort("order")


class collate_fn:
    """``iter_torch_batches(collate_fn=collate_fn(cfg, data_dir))``: pads a batch of masked examples."""

    def __init__(self, cfg: KilmConfig, data_dir: str):
        from kilm_ray.loader import special_ids_of

        self.sp = special_ids_of(data_dir)
        self.knowledge_weight = cfg.masking.knowledge_loss_weight

    def __call__(self, batch: dict) -> dict:
        import torch

        from kilm_ray.masking import Example

        examples = [Example(np.asarray(i), np.asarray(l), np.asarray(k, dtype=bool), int(s))
                    for i, l, k, s in zip(batch["input_ids"], batch["labels"], batch["knowledge"], batch["sample_id"])]
        arrays = collate(examples, self.sp, self.knowledge_weight)
        return {k: torch.from_numpy(v) for k, v in arrays.items()}
