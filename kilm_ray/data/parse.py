"""The parse stage: dump read units -> page records -> the stage's tables (``rows.PAGE_TABLES``)."""

from __future__ import annotations

import logging

import pyarrow as pa

from kilm_ray.config import KilmConfig
from kilm_ray.data.corpus.articles import page_record
from kilm_ray.data.corpus.dump import RawPage, ReadUnit
from kilm_ray.data.corpus.wikitext import SiteNamespaces
from kilm_ray.data.rows import PAGE_SCHEMA, page_stats, split_pages, table
from kilm_ray.data.shuffle import light_args, light_repartition, map_rows
from kilm_ray.data.sources import STAGE_FILE_ROWS, read_raw_pages
from kilm_ray.data.stages import Stage

log = logging.getLogger("kilm_ray.pipeline")


def parse_block(batch: pa.Table, mode: str, max_chars: int, namespaces: SiteNamespaces) -> pa.Table:
    rows = [page_record(RawPage(r["source"], r["index"], r["xml"], r["error"]), mode, max_chars, namespaces)
            for r in batch.to_pylist()]
    return table(rows, PAGE_SCHEMA)


def parse_pages(units: list[ReadUnit], namespaces: SiteNamespaces, cfg: KilmConfig):
    """Each block of raw pages -> page records, one parse task per block, in parallel. Ray Data coalesces
    small yields of a read task into one large block; the stream is re-cut into blocks of
    corpus.pages_per_block pages so that they are parsed side by side."""
    raw = light_repartition(read_raw_pages(units, cfg), cfg.corpus.pages_per_block, cfg)
    return map_rows(raw, parse_block, cfg, mode=cfg.corpus.mode, max_chars=cfg.corpus.max_description_chars,
                    namespaces=namespaces)


def parse_stage(stage: Stage, units: list[ReadUnit], namespaces: SiteNamespaces, cfg: KilmConfig) -> dict:
    record = stage.record()
    if record:
        log.info("pages: parsed by an earlier run, reused (%s)", stage.dir)
        return record
    stage.clear()
    # Files of STAGE_FILE_ROWS pages, not one per parse block: enwiki would leave 1.4 M small files.
    sink = stage.sink(split_pages, min_rows=STAGE_FILE_ROWS)
    parse_pages(units, namespaces, cfg).write_datasink(sink, ray_remote_args=light_args(cfg))
    record = stage.finish(sink, page_stats)
    for example in record["summary"]["pages"]["error_examples"]:
        log.warning("skipped page %s", example)
    return record
