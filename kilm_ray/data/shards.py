"""Chunks: each article with its resolved links -> tokenized chunks -> parquet shards per split, written
into the dataset's own directory (``datasets/<run key>/{train,valid,test}/``) by a Datasink whose write
tasks report their files, rows and sample-id ranges: the manifest lists exactly those."""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Optional

import pyarrow as pa

from kilm_ray.method.chunking import newline_ids, title_as_mentioned
from kilm_ray.config import KilmConfig, config_from_dict
from kilm_ray.data.corpus.articles import SPLITS, LinkCounts, article_chunks, chunk_rows, paragraphs_from_doc, split_of
from kilm_ray.data.corpus.knowledge import KnowledgeLookup
from kilm_ray.data.corpus.links import LinkResolver, table_resolver
from kilm_ray.data.rows import (ARTICLE_STATS, CHUNK_SCHEMA, shard_tables, split_counts, sum_counts, table,
                                    zero_link_counts)
from kilm_ray.data.shuffle import light_args
from kilm_ray.data.stages import TablesSink, merge_reports
from kilm_ray.data.vocab import worker_tokenizer

SHARD_ROWS = 8192  # chunks per parquet shard (per split) at most: the writing task holds one shard


def _article_stats_row(page_id: int, title: str, counts: LinkCounts, n_chunks: int) -> dict[str, Any]:
    return {"split": ARTICLE_STATS, "sample_id": page_id, "article": title, "chunk_index": n_chunks, "text": "",
            "input_ids": [], "ent_start": [], "ent_end": [], "ent_title": [], "ent_source": [], "ent_knowledge": [],
            "links": counts.links, "links_template": counts.template, "links_first_sentence": counts.first_sentence,
            "links_external": counts.external, "links_no_knowledge": counts.no_knowledge,
            **{f"links_external_{rule}": n for rule, n in counts.external_by_rule.items()}}


def chunk_articles(articles: Iterable[dict], resolver_of: Callable[[int], LinkResolver], tokenizer,
                   cfg: KilmConfig) -> pa.Table:
    """Articles (page_id, title, doc) -> chunk rows and one stats row per article."""
    out: list[dict[str, Any]] = []
    retitle = None
    if cfg.data.title_as_mentioned:
        retitle = functools.partial(title_as_mentioned, tokenizer.encode, tokenizer.token_id("<sep>"),
                                    cfg.data.max_knowledge_tokens)
    newline = newline_ids(tokenizer.encode)
    for r in articles:
        chunks, counts = article_chunks(paragraphs_from_doc(r["doc"]), resolver_of(r["page_id"]), tokenizer.encode,
                                        tokenizer.decode, newline, cfg.data.max_text_tokens,
                                        cfg.data.min_chunk_tokens, retitle)
        splits = split_of(r["title"], cfg.corpus.split_seed, cfg.corpus.valid_fraction, cfg.corpus.test_fraction)
        out.extend({**row, **zero_link_counts()} for row in chunk_rows(r["page_id"], r["title"], chunks, splits,
                                                                         cfg.data.train_min_mentions))
        out.append(_article_stats_row(r["page_id"], r["title"], counts, len(chunks)))
    return table(out, CHUNK_SCHEMA)


def chunk_page_bucket(bucket: pa.Table, tokenizer_ref: dict, cfg_dict: dict) -> pa.Table:
    """The articles of one bucket of page ids, each with its resolved links (distributed path). A page
    that arrives twice (an upstream task re-run after a node loss) is chunked once."""
    rows = bucket.drop_columns(["bucket"]).to_pylist()
    links: dict[int, dict[str, tuple]] = {}
    articles: dict[int, dict] = {}
    for r in rows:
        if r["kind"] == "link":
            links.setdefault(r["page_id"], {})[r["target"]] = (r["target"], r["resolved"], r["source"], r["knowledge"],
                                                            r["rule"])
        else:
            articles.setdefault(r["page_id"], r)
    ordered = [articles[page_id] for page_id in sorted(articles)]
    return chunk_articles(ordered, lambda page_id: table_resolver(links.get(page_id, {}).values()),
                          worker_tokenizer(tokenizer_ref), config_from_dict(cfg_dict))


class ChunkBuilder:
    """The lookup path: resolves links through the shared lookup, tokenizes and chunks articles."""

    def __init__(self, lookup: KnowledgeLookup, external: Optional[dict], tokenizer_json: str, cfg_dict: dict):
        from kilm_ray.method.chunking import knowledge_ids
        from kilm_ray.data.corpus.links import lookup_resolver
        from kilm_ray.method.tokenizer import CorpusTokenizer

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
        return chunk_articles(batch.to_pylist(), lambda _: self.resolve, self.tokenizer, self.cfg)


_BUILDERS: dict[tuple, ChunkBuilder] = {}


def chunk_with_lookup(batch: pa.Table, refs: dict, cfg_dict: dict) -> pa.Table:
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


# ----------------------------------------------------------------------------------------------
# Shards
# ----------------------------------------------------------------------------------------------


def _split_shards(batch: pa.Table, max_eval_entities: int) -> tuple[dict[str, pa.Table], dict]:
    tables, counts = shard_tables(batch)
    for split, rows in tables.items():
        counts[split] = split_counts(rows, max_eval_entities)
    return tables, counts


def _sample_ids(split: str, rows: pa.Table) -> dict:
    first, last = rows["sample_id"][0].as_py(), rows["sample_id"][-1].as_py()
    return {"name_hint": f"{first:016d}-", "min_sample_id": first, "max_sample_id": last}


def write_shards(built, directory: str, cfg: KilmConfig) -> tuple[list[dict], dict]:
    """Write every split's chunks under ``directory`` in one pass; returns the files (split, path, rows,
    sample-id range) and the counts (links, chunks, samples per split)."""
    sink = TablesSink(directory, functools.partial(_split_shards, max_eval_entities=cfg.data.max_eval_entities),
                      min_rows=SHARD_ROWS, max_rows=SHARD_ROWS, describe=_sample_ids)
    built.write_datasink(sink, ray_remote_args=light_args(cfg))
    files, counts = merge_reports(sink.reports)
    listed = [{"split": split, **{k: f[k] for k in ("path", "rows", "bytes", "min_sample_id", "max_sample_id")}}
              for split in SPLITS for f in sorted(files.get(split, []), key=lambda f: f["min_sample_id"])]
    return listed, sum_counts(counts, SPLITS)
