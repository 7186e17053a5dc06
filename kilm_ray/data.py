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

    return ray.data.read_datasource(_dump_datasource(uris, cfg.corpus.max_pages, cfg.corpus.pages_per_block),
                                    override_num_blocks=len(uris))


def _parse_batch(batch: pa.Table, mode: str, max_chars: int) -> pa.Table:
    from kilm_ray.corpus.dump import RawPage

    rows = [page_record(RawPage(r["source"], r["index"], r["xml"], r["error"]), mode, max_chars)
            for r in batch.to_pylist()]
    return pa.Table.from_pylist(rows, schema=PAGE_SCHEMA)


# ----------------------------------------------------------------------------------------------
# Knowledge lookup and tokenizer (driver side)
# ----------------------------------------------------------------------------------------------


def build_lookup(parsed, cfg: KilmConfig, knowledge_files: list[str]) -> tuple[KnowledgeLookup, dict]:
    """Redirects and descriptions from the parsed pages, plus external KB files; and page stats."""
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
            elif r["kind"] == "redirect":
                lookup.redirects[r["title"]] = r["redirect"]
            elif r["kind"] == "article":
                if r["short_description"]:
                    lookup.template[r["title"]] = r["short_description"]
                if r["first_sentence"]:
                    lookup.first_sentence[r["title"]] = r["first_sentence"]
    kb_stats = None
    if knowledge_files and "external" in cfg.corpus.knowledge_sources:
        lookup.external, kb_stats = load_knowledge_base(knowledge_files, cfg.corpus.max_description_chars)
        for example in kb_stats.bad_examples:
            log.warning("skipped knowledge-base line %s", example)
    pages = {
        "read": sum(kinds.values()),
        "articles": kinds["article"],
        "redirects": kinds["redirect"],
        "skipped": {k.split(":", 1)[1]: v for k, v in reasons.items() if k.startswith("skipped:")},
        "errors": {k.split(":", 1)[1]: v for k, v in reasons.items() if k.startswith("error:")},
        "error_examples": errors,
    }
    kb = {"files": knowledge_files, "lines": 0, "entities": 0, "bad_lines": 0, "bad_examples": []}
    if kb_stats is not None:
        kb.update(lines=kb_stats.lines, entities=kb_stats.entities, bad_lines=kb_stats.bad_lines,
                  bad_examples=kb_stats.bad_examples)
    table = {"redirects": len(lookup.redirects), "template": len(lookup.template),
             "first_sentence": len(lookup.first_sentence), "external": len(lookup.external)}
    return lookup, {"pages": pages, "knowledge_base": kb, "knowledge_table": table}


def _paragraph_sample(parsed, limit: int, seed: int) -> list[str]:
    texts: list[str] = []
    for batch in parsed.select_columns(["kind", "doc"]).iter_batches(batch_format="pyarrow", batch_size=256):
        for r in batch.to_pylist():
            if r["kind"] == "article":
                texts.extend(text for text, _ in json.loads(r["doc"]))
    if len(texts) > limit:
        texts = random.Random(seed).sample(texts, limit)
    return texts


def prepare_tokenizer(cfg: KilmConfig, parsed, local_dir: Path):
    from kilm_ray.tokenizer import load_tokenizer, train_bpe

    if cfg.tokenizer.source == "train":
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
    """Ray Data callable class: loads the tokenizer and the lookup once per actor."""

    def __init__(self, lookup, tokenizer_files: dict, cfg_dict: dict):
        import ray

        from kilm_ray.config import config_from_dict

        self.lookup = ray.get(lookup) if isinstance(lookup, ray.ObjectRef) else lookup
        self.cfg = config_from_dict(cfg_dict)
        self.tokenizer = tokenizer_from_files(tokenizer_files)
        self.sep = self.tokenizer.convert_tokens_to_ids("<sep>")
        self.newline = self.encode("\n")[0]
        self.cache: dict = {}

    def encode(self, text: str):
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return enc["input_ids"], enc["offset_mapping"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, clean_up_tokenization_spaces=False)

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


def _zero_counts() -> dict[str, int]:
    return {"links": 0, "links_template": 0, "links_first_sentence": 0, "links_external": 0, "links_no_knowledge": 0}


def _article_stats_row(page_id: int, title: str, counts: LinkCounts, n_chunks: int) -> dict[str, Any]:
    return {"split": ARTICLE_STATS, "sample_id": page_id, "article": title, "chunk_index": n_chunks, "text": "",
            "input_ids": [], "ent_start": [], "ent_end": [], "ent_title": [], "ent_source": [], "ent_knowledge": [],
            "links": counts.links, "links_template": counts.template, "links_first_sentence": counts.first_sentence,
            "links_external": counts.external, "links_no_knowledge": counts.no_knowledge}


def _sample_stats(built, max_eval_entities: int) -> dict:
    links = Counter()
    per_split = {s: Counter() for s in SPLITS}
    chunks_total = 0
    columns = ["split", "ent_start", "chunk_index", "links", "links_template", "links_first_sentence",
               "links_external", "links_no_knowledge"]
    for batch in built.select_columns(columns).iter_batches(batch_format="pyarrow", batch_size=8192):
        for r in batch.to_pylist():
            if r["split"] == ARTICLE_STATS:
                chunks_total += r["chunk_index"]
                for key in ("links", "links_template", "links_first_sentence", "links_external", "links_no_knowledge"):
                    links[key] += r[key]
                continue
            n = len(r["ent_start"])
            c = per_split[r["split"]]
            c["chunks"] += 1
            c["knowledge_chunks"] += n > 0
            c["mentions"] += n
            c["eval_samples"] += min(n, max_eval_entities)
    return {
        "links": {"total": links["links"],
                  "with_knowledge": {"template": links["links_template"],
                                     "first_sentence": links["links_first_sentence"],
                                     "external": links["links_external"]},
                  "without_knowledge": links["links_no_knowledge"]},
        "chunks": {"total": chunks_total},
        "samples": {s: dict(c) for s, c in per_split.items()},
    }


# ----------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------


def preflight(dumps: list[str], knowledge: list[str]) -> None:
    """Fail fast, before any work, naming a missing or unreadable input."""
    if not dumps:
        raise storage.InputError("no dump given (--dump PATH)")
    for uri in dumps:
        storage.check_readable(uri, "dump")
    for uri in knowledge:
        storage.check_readable(uri, "knowledge file")


def preprocess(cfg: KilmConfig, dumps: list[str], out: str, knowledge: Optional[list[str]] = None) -> dict:
    """Run the whole pipeline on the current Ray cluster; returns the stats (also in out/stats.json)."""
    import ray
    import ray.data
    from ray.data.expressions import col

    knowledge = list(knowledge or [])
    preflight(dumps, knowledge)
    started = time.time()
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # deterministic tokenizer training and shard order

    log.info("reading %s", ", ".join(dumps))
    parsed = read_pages(dumps, cfg).map_batches(
        _parse_batch, batch_format="pyarrow", fn_kwargs={"mode": cfg.corpus.mode,
                                                         "max_chars": cfg.corpus.max_description_chars})
    parsed = parsed.materialize()
    lookup, stats = build_lookup(parsed, cfg, knowledge)
    log.info("pages: %s; knowledge table: %s", {k: v for k, v in stats["pages"].items() if k != "error_examples"},
             stats["knowledge_table"])

    with tempfile.TemporaryDirectory(prefix="kilm_tok_") as tmp:
        tokenizer_dir = Path(tmp) / "tokenizer"
        tokenizer = prepare_tokenizer(cfg, parsed, tokenizer_dir)
        storage.upload_dir(tokenizer_dir, storage.join(out, "tokenizer"))
        from kilm_ray.tokenizer import special_ids

        sp = special_ids(tokenizer)
        # The tokenizer's files travel to the actors (on any node) through the object store.
        files = {f.name: f.read_bytes() for f in tokenizer_dir.iterdir() if f.is_file()}
        n_cpus = max(1, int(ray.available_resources().get("CPU", 1)))
        builder_kwargs = {"lookup": ray.put(lookup), "tokenizer_files": files, "cfg_dict": cfg.to_dict()}
        # No filter before the actor pool: on a 1-CPU node a separate filter task could never get
        # a CPU while the actors hold it (ChunkBuilder skips non-articles itself).
        built = parsed.map_batches(
            ChunkBuilder, batch_format="pyarrow", batch_size=8, fn_constructor_kwargs=builder_kwargs,
            concurrency=(1, n_cpus), num_cpus=1).materialize()
        stats.update(_sample_stats(built, cfg.data.max_eval_entities))
        stats_columns = ["split", "links", "links_template", "links_first_sentence", "links_external",
                         "links_no_knowledge"]
        for split in SPLITS:
            fs, path = storage.resolve(storage.join(out, split))
            if not stats["samples"][split].get("chunks"):
                log.warning("split %s is empty (a small corpus?)", split)
                _write_empty_split(fs, path, stats_columns)
                continue
            built.filter(expr=col("split") == split).drop_columns(stats_columns).write_parquet(path, filesystem=fs)

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


def tokenizer_from_files(files: dict[str, bytes]):
    """A tokenizer from its saved files' contents (shipped to actors on other nodes)."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="kilm_tok_") as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        return AutoTokenizer.from_pretrained(tmp)


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
