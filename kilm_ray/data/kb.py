"""The knowledge-base stage: knowledge-base files, read in byte ranges, -> one row per row id (a title, a
name, or a name with a qualifier; ``corpus.knowledge.KBEntry``), the best line winning (an earlier
``--knowledge`` source, then the line's own rank)."""

from __future__ import annotations

import functools
import json
import logging
from typing import Optional

import pyarrow as pa

from kilm_ray import storage
from kilm_ray.config import KilmConfig
from kilm_ray.data.corpus.knowledge import KB_SUFFIXES, kb_line_rows
from kilm_ray.data.corpus.ranges import TextRange, plan_ranges
from kilm_ray.data.rows import KB_SCHEMA, best_kb_rows, table
from kilm_ray.data.shuffle import bucketed, light_args, partitions_for, task_resources
from kilm_ray.data.sources import KB_LINES_PER_BLOCK, read_kb_lines, read_parquet_files
from kilm_ray.data.stages import Stage, stage_bytes, stage_files

log = logging.getLogger("kilm_ray.pipeline")

IMPORT_RECORD = "import.json"  # written last by `kilm-ray import-kb`: the shards it wrote
# 2: Wikidata rows are matched on their enwiki title only (1 also matched labels and aliases by name).
IMPORT_FORMAT = 2
MAX_BAD_EXAMPLES = 20


def knowledge_files(spec: str) -> list[str]:
    """The files one ``--knowledge`` argument names: the shards an ``import-kb`` directory lists, else
    files, directories, globs and prefixes (``storage.expand``)."""
    if not any(c in spec for c in "*?["):
        record_uri = storage.join(spec, IMPORT_RECORD)
        if storage.exists(record_uri):
            record = json.loads(storage.read_bytes(record_uri))
            if not record.get("complete"):
                raise storage.InputError(f"knowledge base {spec}: the import that writes it did not finish "
                                         f"({record_uri}); rerun kilm-ray import-kb")
            if record.get("format", 1) != IMPORT_FORMAT:
                raise storage.InputError(f"knowledge base {spec}: written by an older kilm-ray import-kb whose rows "
                                         "match Wikidata labels and aliases by name (wrong entities for red links); "
                                         "rerun kilm-ray import-kb")
            return [storage.join(spec, name) for name in record["files"]]
    return storage.expand(spec, KB_SUFFIXES, "knowledge file")


def knowledge_sources(specs: list[str]) -> list[tuple[int, str]]:
    """(source index, file) of every knowledge-base file: the index of the argument it came from (the
    shards of one import are one source)."""
    return [(i, f) for i, spec in enumerate(specs) for f in knowledge_files(spec)]


def kb_ranges(sources: list[tuple[int, str]], unit_bytes: int,
              sizes: Optional[dict[str, int]] = None) -> tuple[list[TextRange], list[int]]:
    """The byte ranges the files are read in; ``sizes``: the files' sizes when the plan has them."""
    sizes = sizes if sizes is not None else storage.file_sizes([uri for _, uri in sources])
    ranges, source_of = [], []
    for source, uri in sources:
        for r in plan_ranges(uri, sizes[uri], unit_bytes):
            ranges.append(r)
            source_of.append(source)
    return ranges, source_of


def parse_kb_lines(batch: pa.Table, ranges: list[TextRange], sources: list[int],
                   max_chars: int) -> tuple[dict[str, pa.Table], dict]:
    rows: list[dict] = []
    lines = bad = 0
    examples: list[str] = []
    for r in batch.to_pylist():
        if not r["line"].strip():
            continue
        lines += 1
        out, reason = kb_line_rows(r["line"], sources[r["range"]], max_chars)
        if reason is not None:
            bad += 1
            if len(examples) < MAX_BAD_EXAMPLES:
                examples.append(f"{ranges[r['range']].where(r['line_no'])}: {reason}")
        rows.extend(out)
    return {"rows": table(rows, KB_SCHEMA)}, {"lines": lines, "bad_lines": bad, "bad_examples": examples}


def _summarize_lines(counts: list[dict]) -> dict:
    examples: list[str] = []
    for c in counts:
        examples.extend(c["bad_examples"][: MAX_BAD_EXAMPLES - len(examples)])
    return {"lines": sum(c["lines"] for c in counts), "bad_lines": sum(c["bad_lines"] for c in counts),
            "bad_examples": sorted(examples)}


def _best_rows(rows: pa.Table) -> tuple[dict[str, pa.Table], dict]:
    return {"kb": rows}, {"rows": rows.num_rows}


def kb_stage(stage: Stage, lines_stage: Stage, sources: list[tuple[int, str]], cfg: KilmConfig,
             sizes: Optional[dict[str, int]] = None) -> dict:
    """Read, parse (20 k lines per task) and reduce to the best row per key."""
    record = stage.record()
    if record:
        log.info("knowledge base: loaded by an earlier run, reused (%s)", stage.dir)
        return record
    summary = {"files": [uri for _, uri in sources], "lines": 0, "entities": 0, "bad_lines": 0, "bad_examples": []}
    stage.clear()
    if not sources:
        return stage.finish_with({}, summary)
    lines_stage.clear()
    ranges, source_of = kb_ranges(sources, max(1, int(cfg.corpus.kb_read_unit_mb * 2**20)), sizes)
    # Parsing runs in the write tasks (a whole CPU each), 20 k lines at a time.
    sink = lines_stage.sink(functools.partial(parse_kb_lines, ranges=ranges, sources=source_of,
                                              max_chars=cfg.corpus.max_description_chars),
                            min_rows=KB_LINES_PER_BLOCK, batch_rows=KB_LINES_PER_BLOCK, max_rows=4 * KB_LINES_PER_BLOCK)
    read_kb_lines(ranges, cfg).write_datasink(sink, ray_remote_args={"num_cpus": 1, **task_resources(cfg)})
    parsed = lines_stage.finish(sink, _summarize_lines)
    summary.update(parsed["summary"])
    rows = read_parquet_files(stage_files(parsed, "rows", lines_stage.dir), KB_SCHEMA, cfg=cfg)
    best = bucketed(rows, "key", best_kb_rows, cfg, partitions_for(cfg, stage_bytes(parsed, "rows"), "kb rows"))
    sink = stage.sink(_best_rows)
    best.write_datasink(sink, ray_remote_args=light_args(cfg))
    record = stage.finish(sink, lambda counts: {**summary, "entities": sum(c["rows"] for c in counts)})
    lines_stage.clear()
    return record
