"""The Ray Data pipeline: a Wikipedia dump -> KILM chunk shards (parquet per split) + stats.json +
the tokenizer; and a Ray Dataset of masked examples for any (split, epoch, seed).

Stages (each a pure function from ``kilm_ray.corpus`` mapped over blocks)::

    read (one task per dump file, streaming) -> parse pages (parallel) -> [materialize]
      -> knowledge lookup: redirects + in-dump descriptions + external KB (driver, then shared)
      -> tokenizer (loaded, or trained on the parsed text)
      -> build chunks (actor pool: resolve links, tokenize, chunk, split) -> write parquet per split
"""

from __future__ import annotations

import json
import logging
import random
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import pyarrow as pa

from kilm_ray import __version__, storage
from kilm_ray.config import KilmConfig
from kilm_ray.corpus.articles import SPLITS, LinkCounts, article_chunks, chunk_rows, page_record, paragraphs_from_doc, split_of
from kilm_ray.corpus.dump import iter_raw_pages
from kilm_ray.corpus.knowledge import KnowledgeLookup, load_knowledge_base
from kilm_ray.masking import MaskingParams, build_train_example, collate, Entity

log = logging.getLogger("kilm_ray.data")

PAGE_SCHEMA = pa.schema([
    ("kind", pa.string()), ("reason", pa.string()), ("title", pa.string()), ("page_id", pa.int64()),
    ("redirect", pa.string()), ("short_description", pa.string()), ("first_sentence", pa.string()),
    ("doc", pa.large_string()), ("where", pa.string()),
])
ARTICLE_STATS = "__article__"
CHUNK_SCHEMA = pa.schema([
    ("split", pa.string()), ("sample_id", pa.int64()), ("article", pa.string()), ("chunk_index", pa.int32()),
    ("text", pa.string()), ("input_ids", pa.list_(pa.int32())), ("ent_start", pa.list_(pa.int32())),
    ("ent_end", pa.list_(pa.int32())), ("ent_title", pa.list_(pa.string())),
    ("ent_source", pa.list_(pa.string())), ("ent_knowledge", pa.list_(pa.list_(pa.int32()))),
    ("links", pa.int32()), ("links_template", pa.int32()), ("links_first_sentence", pa.int32()),
    ("links_external", pa.int32()), ("links_no_knowledge", pa.int32()),
])


# ----------------------------------------------------------------------------------------------
# Reading the dump
# ----------------------------------------------------------------------------------------------


def _raw_page_blocks(uri: str, max_pages: int, pages_per_block: int) -> Iterable[pa.Table]:
    rows: list[dict] = []
    for raw in iter_raw_pages(uri, max_pages):
        rows.append({"source": raw.source, "index": raw.index, "xml": raw.xml, "error": raw.error})
        if len(rows) >= pages_per_block:
            yield pa.Table.from_pylist(rows, schema=RAW_SCHEMA)
            rows = []
    if rows:
        yield pa.Table.from_pylist(rows, schema=RAW_SCHEMA)


RAW_SCHEMA = pa.schema([("source", pa.string()), ("index", pa.int64()), ("xml", pa.large_string()),
                        ("error", pa.string())])


def _dump_datasource(uris: list[str], max_pages: int, pages_per_block: int):
    """A Ray Data datasource with one streaming read task per dump file."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class WikiDumpDatasource(Datasource):
        def estimate_inmemory_data_size(self) -> Optional[int]:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list:
            tasks = []
            for uri in uris:
                meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=[uri], exec_stats=None)
                tasks.append(ReadTask(lambda u=uri: _raw_page_blocks(u, max_pages, pages_per_block), meta,
                                      schema=RAW_SCHEMA))
            return tasks

    return WikiDumpDatasource()


def read_pages(uris: list[str], cfg: KilmConfig):
    import ray.data

    # Reading (decompress, cut at <page>) is light: a fraction of a CPU, and a resource shape unlike
    # the parse step's, so that Ray Data does not fuse the two into one sequential task per file.
    return ray.data.read_datasource(_dump_datasource(uris, cfg.corpus.max_pages, cfg.corpus.pages_per_block),
                                    override_num_blocks=len(uris), num_cpus=0.01, **task_resources(cfg))


def task_resources(cfg: KilmConfig) -> dict:
    """Ray remote args that place preprocessing tasks (corpus.task_resources, e.g. CPU nodes)."""
    return {"resources": dict(cfg.corpus.task_resources)} if cfg.corpus.task_resources else {}


def parse_pages(raw, cfg: KilmConfig):
    """Each block of raw pages -> page records, one parse task per block, in parallel."""
    # Ray Data coalesces small yields of a read task into one large block; re-cut the stream
    # (streaming, no barrier) so that blocks of pages_per_block pages are parsed side by side.
    blocks = raw.repartition(target_num_rows_per_block=cfg.corpus.pages_per_block)
    _light_task(blocks, cfg)
    return blocks.map_batches(_parse_batch, batch_format="pyarrow", batch_size=None, num_cpus=1,
                              fn_kwargs={"mode": cfg.corpus.mode, "max_chars": cfg.corpus.max_description_chars},
                              **task_resources(cfg))


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
    return pa.Table.from_pylist(rows, schema=PAGE_SCHEMA)


# ----------------------------------------------------------------------------------------------
# Knowledge lookup and tokenizer (driver side)
# ----------------------------------------------------------------------------------------------


def _load_kb(files: list[str], max_chars: int) -> tuple[dict, dict]:
    """External knowledge bases -> (key -> description, stats); runs as a Ray task beside parsing."""
    table, stats = load_knowledge_base(files, max_chars)
    for example in stats.bad_examples:
        log.warning("skipped knowledge-base line %s", example)
    return table, {"files": files, "lines": stats.lines, "entities": stats.entities, "bad_lines": stats.bad_lines,
                   "bad_examples": stats.bad_examples}


def build_lookup(parsed, cfg: KilmConfig) -> tuple[KnowledgeLookup, dict]:
    """Redirects and in-dump descriptions from the parsed pages; and the page stats."""
    lookup = KnowledgeLookup(sources=tuple(cfg.corpus.knowledge_sources))
    kinds: Counter = Counter()
    reasons: Counter = Counter()
    errors: list[str] = []
    columns = ["kind", "reason", "title", "redirect", "short_description", "first_sentence", "where"]
    for batch in parsed.select_columns(columns).iter_batches(batch_format="pyarrow", batch_size=4096):
        for r in batch.to_pylist():
            kinds[r["kind"]] += 1
            if r["reason"]:
                reasons[f"{r['kind']}:{r['reason']}"] += 1
            if r["kind"] == "error" and len(errors) < 50:
                errors.append(f"{r['where']}: {r['reason']}: {r['title']}")
                log.warning("skipped page %s: %s: %s", r["where"], r["reason"], r["title"])
            lookup.add_page(r)
    pages = {
        "read": sum(kinds.values()),
        "articles": kinds["article"],
        "redirects": kinds["redirect"],
        "skipped": {k.split(":", 1)[1]: v for k, v in reasons.items() if k.startswith("skipped:")},
        "errors": {k.split(":", 1)[1]: v for k, v in reasons.items() if k.startswith("error:")},
        "error_examples": errors,
    }
    table = {"redirects": len(lookup.redirects), "template": len(lookup.template),
             "first_sentence": len(lookup.first_sentence)}
    return lookup, {"pages": pages, "knowledge_table": table}


def _paragraph_sample(parsed, limit: int, seed: int) -> list[str]:
    texts: list[str] = []
    for batch in parsed.select_columns(["kind", "doc"]).iter_batches(batch_format="pyarrow", batch_size=256):
        for r in batch.to_pylist():
            if r["kind"] == "article":
                texts.extend(text for text, _ in json.loads(r["doc"]))
    if len(texts) > limit:
        texts = random.Random(seed).sample(texts, limit)
    return texts


def prepare_tokenizer(cfg: KilmConfig, parsed, local_dir: Path, preloaded=None):
    from kilm_ray.tokenizer import load_tokenizer, train_bpe

    if preloaded is not None:
        tokenizer = preloaded
    elif cfg.tokenizer.source == "train":
        texts = _paragraph_sample(parsed, cfg.tokenizer.train_max_paragraphs, cfg.corpus.split_seed)
        log.info("training a byte-level BPE (vocab %d) on %d paragraphs", cfg.tokenizer.vocab_size, len(texts))
        tokenizer = train_bpe(texts, cfg.tokenizer.vocab_size)
    else:
        tokenizer = load_tokenizer(cfg.tokenizer.source)
    tokenizer.model_max_length = 1_000_000  # paragraphs are chunked after tokenization, not truncated
    tokenizer.save_pretrained(str(local_dir))
    return tokenizer


# ----------------------------------------------------------------------------------------------
# Building chunks (actor pool)
# ----------------------------------------------------------------------------------------------


class ChunkBuilder:
    """Resolves links, tokenizes and chunks a batch of parsed pages (see corpus.articles)."""

    def __init__(self, lookup: KnowledgeLookup, external: Optional[dict], tokenizer_json: str, cfg_dict: dict):
        from kilm_ray.config import config_from_dict
        from kilm_ray.tokenizer import CorpusTokenizer

        self.lookup = lookup
        if external:
            self.lookup.external = external
        self.cfg = config_from_dict(cfg_dict)
        self.tokenizer = CorpusTokenizer(tokenizer_json)
        self.encode, self.decode = self.tokenizer.encode, self.tokenizer.decode
        self.sep = self.tokenizer.token_id("<sep>")
        self.newline = self.encode("\n")[0]
        self.cache: dict = {}

    def __call__(self, batch: pa.Table) -> pa.Table:
        cfg = self.cfg
        rows: list[dict[str, Any]] = []
        for r in batch.to_pylist():
            if r["kind"] != "article":
                continue
            chunks, counts = article_chunks(
                paragraphs_from_doc(r["doc"]), self.lookup, self.encode, self.decode, self.sep, self.newline,
                cfg.data.max_text_tokens, cfg.data.max_knowledge_tokens, cfg.data.min_chunk_tokens, self.cache)
            if len(self.cache) > 200_000:
                self.cache.clear()
            splits = split_of(r["title"], cfg.corpus.split_seed, cfg.corpus.valid_unseen_fraction,
                              cfg.corpus.valid_seen_fraction)
            for row in chunk_rows(r["page_id"], r["title"], chunks, splits):
                rows.append({**row, **_zero_counts()})
            rows.append(_article_stats_row(r["page_id"], r["title"], counts, len(chunks)))
        return pa.Table.from_pylist(rows, schema=CHUNK_SCHEMA)


_BUILDERS: dict[tuple, ChunkBuilder] = {}


def _build_chunks(batch: pa.Table, refs: dict, cfg_dict: dict) -> pa.Table:
    """Ray Data task: one ChunkBuilder per worker process and job, kept across tasks. Tasks reuse
    the warm worker processes of the parse step (no actor start-up), and each process fetches
    the lookup, the knowledge base and the tokenizer from the object store once."""
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


LINK_COLUMNS = ["links", "links_template", "links_first_sentence", "links_external", "links_no_knowledge"]
SHARD_ROWS = 50_000  # chunks per parquet shard (per split) at most


def _write_shards(batch: pa.Table, out: str, max_eval_entities: int) -> pa.Table:
    """Write one batch of built rows as one parquet shard per split; return its counts (stats)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    fs, root = storage.resolve(out)
    counts: dict[str, Any] = {"links": {k: 0 for k in LINK_COLUMNS}, "chunks": 0}
    articles = batch.filter(pc.equal(batch["split"], ARTICLE_STATS))
    for key in LINK_COLUMNS:
        counts["links"][key] = int(pc.sum(articles[key]).as_py() or 0)
    counts["chunks"] = int(pc.sum(articles["chunk_index"]).as_py() or 0)
    for split in SPLITS:
        rows = batch.filter(pc.equal(batch["split"], split)).drop_columns(["split", *LINK_COLUMNS])
        n_mentions = pc.list_value_length(rows["ent_start"]).to_numpy(zero_copy_only=False)
        counts[split] = {"chunks": rows.num_rows, "knowledge_chunks": int((n_mentions > 0).sum()),
                         "mentions": int(n_mentions.sum()),
                         "eval_samples": int(np.minimum(n_mentions, max_eval_entities).sum())}
        if rows.num_rows:
            first = int(pc.min(rows["sample_id"]).as_py())
            fs.create_dir(f"{root}/{split}", recursive=True)
            pq.write_table(rows, f"{root}/{split}/part-{first:016d}.parquet", filesystem=fs)
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


def preflight(dumps: list[str], knowledge: list[str], tokenizer_source: str = "train") -> None:
    """Fail fast, before any work, naming a missing or unreadable input."""
    if not dumps:
        raise storage.InputError("no dump given (--dump PATH)")
    for uri in dumps:
        storage.check_readable(uri, "dump")
    for uri in knowledge:
        storage.check_readable(uri, "knowledge file")
    if tokenizer_source.startswith("gpt2-bpe:"):
        for name in ("encoder.json", "vocab.bpe"):
            storage.check_readable(str(Path(tokenizer_source.split(":", 1)[1]).expanduser() / name), "tokenizer file")
    elif tokenizer_source.startswith((".", "/", "~")) and not Path(tokenizer_source).expanduser().is_dir():
        raise storage.InputError(f"tokenizer directory not found: {tokenizer_source}")


def preprocess(cfg: KilmConfig, dumps: list[str], out: str, knowledge: Optional[list[str]] = None) -> dict:
    """Run the whole pipeline on the current Ray cluster; returns the stats (also in out/stats.json)."""
    import ray
    import ray.data

    knowledge = list(knowledge or [])
    preflight(dumps, knowledge, cfg.tokenizer.source)
    started = time.time()
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # deterministic tokenizer training and shard order
    # Ray Data reserves a share of the CPUs for every operator; on small clusters that caps the
    # parse step well below the CPUs it could use (1.5 of 2; measured in bench/). Our operators
    # cannot starve each other: reads and shard writes take (almost) no CPU.
    ctx.op_resource_reservation_enabled = False

    preloading = None
    if cfg.tokenizer.source != "train":  # independent of the corpus: load it while the dump is parsed
        from concurrent.futures import ThreadPoolExecutor

        from kilm_ray.tokenizer import load_tokenizer

        preloading = ThreadPoolExecutor(1).submit(load_tokenizer, cfg.tokenizer.source)
    log.info("reading %s", ", ".join(dumps))
    kb_refs = None
    if knowledge and "external" in cfg.corpus.knowledge_sources:  # loads while the dump is parsed
        kb_refs = ray.remote(_load_kb).options(num_returns=2, num_cpus=1, **task_resources(cfg)).remote(
            knowledge, cfg.corpus.max_description_chars)
    parsed = parse_pages(read_pages(dumps, cfg), cfg).materialize()
    log.info("parsed the dump in %.1fs", time.time() - started)
    lookup, stats = build_lookup(parsed, cfg)
    stats["knowledge_base"] = ray.get(kb_refs[1]) if kb_refs else {
        "files": knowledge, "lines": 0, "entities": 0, "bad_lines": 0, "bad_examples": []}
    stats["knowledge_table"]["external"] = stats["knowledge_base"]["entities"]
    log.info("lookup built at %.1fs; pages: %s; knowledge table: %s", time.time() - started, {k: v for k, v in stats["pages"].items() if k != "error_examples"},
             stats["knowledge_table"])

    with tempfile.TemporaryDirectory(prefix="kilm_tok_") as tmp:
        tokenizer_dir = Path(tmp) / "tokenizer"
        tokenizer = prepare_tokenizer(cfg, parsed, tokenizer_dir, preloading.result() if preloading else None)
        log.info("tokenizer ready (%d tokens) at %.1fs", len(tokenizer), time.time() - started)
        storage.upload_dir(tokenizer_dir, storage.join(out, "tokenizer"))
        from kilm_ray.tokenizer import special_ids

        sp = special_ids(tokenizer)
        # The tokenizer and the lookup travel to the chunking tasks (on any node) through the object store.
        refs = {"lookup": ray.put(lookup), "external": kb_refs[0] if kb_refs else ray.put(None),
                "tokenizer_json": ray.put((tokenizer_dir / "tokenizer.json").read_text())}
        built = parsed.map_batches(_build_chunks, batch_format="pyarrow", batch_size=None, num_cpus=1,
                                   fn_kwargs={"refs": refs, "cfg_dict": cfg.to_dict()}, **task_resources(cfg))
        # One pass writes every split's shards and returns the counts: no second read of the data.
        written = built.map_batches(_write_shards, batch_format="pyarrow", batch_size=SHARD_ROWS, num_cpus=0,
                                    **task_resources(cfg),
                                    fn_kwargs={"out": out, "max_eval_entities": cfg.data.max_eval_entities})
        parts = [json.loads(c) for batch in written.iter_batches(batch_format="pyarrow", batch_size=None)
                 for c in batch["counts"].to_pylist()]
        stats.update(_sum_counts(parts))
        if log.isEnabledFor(logging.DEBUG):
            log.debug("Ray Data stats:\n%s", written.stats())
        log.info("wrote %s chunks at %.1fs: %s", stats["chunks"]["total"], time.time() - started,
                 {s: v["chunks"] for s, v in stats["samples"].items()})
        for split in SPLITS:
            if not stats["samples"][split]["chunks"]:
                log.warning("split %s is empty (a small corpus?)", split)
                fs, path = storage.resolve(storage.join(out, split))
                _write_empty_split(fs, path, ["split", *LINK_COLUMNS])

    stats["tokenizer"] = {"source": cfg.tokenizer.source, "vocab_size": len(tokenizer)}
    stats["elapsed_s"] = round(time.time() - started, 2)
    meta = {"kilm_ray_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "dumps": dumps,
            "knowledge": knowledge, "config": {k: cfg.to_dict()[k] for k in ("corpus", "tokenizer", "data")},
            "special_ids": sp.__dict__, "vocab_size": len(tokenizer),
            "samples": {s: stats["samples"][s].get("chunks", 0) for s in SPLITS}}
    storage.write_bytes(storage.join(out, "stats.json"), json.dumps(stats, indent=2).encode())
    storage.write_bytes(storage.join(out, "meta.json"), json.dumps(meta, indent=2).encode())
    return stats


def _write_empty_split(fs, path: str, dropped: list[str]) -> None:
    import pyarrow.parquet as pq

    schema = pa.schema([f for f in CHUNK_SCHEMA if f.name not in dropped])
    fs.create_dir(path, recursive=True)
    pq.write_table(schema.empty_table(), f"{path}/empty.parquet", filesystem=fs)


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
    import ray.data

    from kilm_ray.loader import special_ids_of

    sp = special_ids_of(data_dir)
    params = MaskingParams(cfg.masking.mask_ratio, cfg.masking.poisson_lambda, cfg.masking.knowledge_prob)
    fs, path = storage.resolve(storage.join(data_dir, split))
    ds = ray.data.read_parquet(path, filesystem=fs, columns=["sample_id", "input_ids", "ent_start", "ent_end",
                                                            "ent_knowledge"])
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
