"""The preprocessing job: Wikipedia dump(s) + knowledge bases -> an immutable KILM dataset, committed.

:func:`preprocess` is the whole Ray Data graph, one named step per line; each step is a stage that a
rerun after a crash finds saved and reuses (``stages.py``), and every row operation is a pure function
(``rows.py``, ``kilm_ray.data.corpus``).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from kilm_ray import __version__, storage
from kilm_ray.config import KilmConfig
from kilm_ray.data.corpus.articles import SPLITS
from kilm_ray.data.corpus.compressed import READ_KEEPS_FAILING
from kilm_ray.data.corpus.dump import DUMP_SUFFIXES, ReadUnit, read_siteinfo, read_units
from kilm_ray.data.corpus.ranges import splittable
from kilm_ray.data.corpus.wikitext import SiteNamespaces
from kilm_ray.data.commit import DatasetDir, build_manifest
from kilm_ray.data.kb import kb_stage, knowledge_sources
from kilm_ray.data.parse import parse_stage
from kilm_ray.data.resolution import build_lookup, links_stage, load_kb, uses_distributed_resolution
from kilm_ray.data.rows import LINK_SCHEMA, PAGE_TABLES, page_article_rows, page_link_rows
from kilm_ray.data.shards import chunk_page_bucket, chunk_with_lookup, write_shards
from kilm_ray.data.shuffle import (autoscaling_enabled, bucketed, light_map, map_rows, partitions_for,
                                       task_resources)
from kilm_ray.data.sources import read_parquet_files
from kilm_ray.data.stages import WorkDir, hold_before_commit, stage_bytes, stage_files
from kilm_ray.data.vocab import Vocab, paragraph_sample, source_fingerprint, tokenizer_stage

log = logging.getLogger("kilm_ray.pipeline")


def preprocess(cfg: KilmConfig, dumps: list[str], out: str, knowledge: Optional[list[str]] = None) -> dict:
    """Run the whole pipeline on the current Ray cluster; returns the stats (also in the dataset)."""
    import ray

    plan = make_plan(cfg, dumps, list(knowledge or []), out)
    dataset = DatasetDir(out, plan.key)
    if dataset.committed() is not None:
        return dataset.reuse()
    configure_ray_data()
    work, started = WorkDir(out, plan.key), time.time()
    with concurrent.futures.ThreadPoolExecutor(1) as beside:
        kb = beside.submit(knowledge_stage, plan, work)                      # beside the parse
        pages = parse_stage(work.stage("pages"), plan.units, plan.namespaces, cfg)
        log.info("parsed at %.1fs: %s", time.time() - started, _brief(pages["summary"]["pages"]))
        vocab = tokenizer_stage(work.stage("tokenizer"), cfg, lambda: paragraph_sample(
            _read(pages, work, "articles", cfg, ["doc"]), cfg, pages["summary"]["paragraphs"]))
        log.info("tokenizer ready (%d tokens) at %.1fs", vocab.vocab_size, time.time() - started)
        kb_summary, kb_lookup = kb.result()
        log.info("knowledge base at %.1fs: %d entities from %d lines", time.time() - started,
                 kb_summary["summary"]["entities"], kb_summary["summary"]["lines"])
    tokenizer_ref = {"tokenizer_json": ray.put(vocab.tokenizer_json)}
    if plan.distributed:
        links = links_stage(work.keyed(vocab.sha256).stage("links"), pages, work.stage("pages").dir, kb_summary,
                            work.stage("kb").dir, cfg, tokenizer_ref)
        log.info("links resolved at %.1fs", time.time() - started)
        built = chunks_by_page(pages, links, work, vocab, tokenizer_ref, cfg)
    else:
        built = chunks_by_lookup(pages, work, kb_lookup, tokenizer_ref, cfg)
    dataset.prepare()
    files, counts = write_shards(built, dataset.root, cfg)
    log.info("wrote %s chunks at %.1fs: %s", counts["chunks"]["total"], time.time() - started,
             {s: v["chunks"] for s, v in counts["samples"].items()})
    # The evaluation's tables (seen titles, anchor texts -> training titles): group-bys over the shards.
    from kilm_ray.data.tables import build_tables

    tables = None
    if all(any(f["split"] == s and f["rows"] for f in files) for s in SPLITS):  # group-bys need rows
        tables = build_tables({s: [storage.join(dataset.root, f["path"]) for f in files if f["split"] == s]
                               for s in SPLITS}, vocab.tokenizer_json, storage.join(dataset.root, "tables"), cfg,
                              sum(f["bytes"] for f in files))
        log.info("evaluation tables at %.1fs: %s", time.time() - started, tables["summary"])
    stats = _stats(pages, counts, kb_summary["summary"], vocab, cfg, time.time() - started)
    manifest = build_manifest(cfg, dataset, dumps, [f for _, f in plan.kb_sources], files, stats, vocab)
    if tables is not None:  # else eval builds them from the shards when it needs them
        manifest["tables"] = {"dir": f"{dataset.rel}/tables", **tables}
    hold_before_commit()
    dataset.commit(manifest, stats, vocab.uri)
    work.remove()
    return stats


# ----------------------------------------------------------------------------------------------
# The steps
# ----------------------------------------------------------------------------------------------


def knowledge_stage(plan: "Plan", work: WorkDir) -> tuple[dict, Optional[object]]:
    """Distributed: the knowledge-base stage (Ray Data). Lookup: one task loads the whole base into a
    table the chunking processes share. Either runs while the dump is parsed."""
    import ray

    cfg, files = plan.cfg, [f for _, f in plan.kb_sources]
    if plan.distributed:
        record = kb_stage(work.stage("kb"), work.stage("kb_lines"), plan.kb_sources, cfg, plan.sizes)
    elif files:
        table_ref, stats_ref = ray.remote(load_kb).options(num_returns=2, num_cpus=1, **task_resources(cfg)).remote(
            files, [s for s, _ in plan.kb_sources], cfg.corpus.max_description_chars)
        record = {"files": {}, "summary": ray.get(stats_ref)}
        return record, table_ref
    else:
        record = {"files": {}, "summary": {"files": [], "lines": 0, "entities": 0, "bad_lines": 0,
                                           "bad_examples": []}}
    for example in record["summary"]["bad_examples"]:
        log.warning("skipped knowledge-base line %s", example)
    return record, None


def _read(record: dict, work: WorkDir, table: str, cfg: KilmConfig, columns: Optional[list[str]] = None):
    return read_parquet_files(stage_files(record, table, work.stage("pages").dir), PAGE_TABLES[table], columns,
                              cfg=cfg)


def chunks_by_page(pages: dict, links: dict, work: WorkDir, vocab: Vocab, tokenizer_ref: dict, cfg: KilmConfig):
    """Distributed: each article meets its resolved links in a group-by on the page id, then is chunked."""
    links_dir = work.keyed(vocab.sha256).stage("links").dir
    resolved = read_parquet_files(stage_files(links, "links", links_dir), LINK_SCHEMA, cfg=cfg)
    grouped = light_map(_read(pages, work, "articles", cfg), page_article_rows, cfg).union(
        light_map(resolved, page_link_rows, cfg))
    partitions = partitions_for(cfg, stage_bytes(pages, "articles") + stage_bytes(links, "links"), "articles+links")
    return bucketed(grouped, "page_id", chunk_page_bucket, cfg, partitions, tokenizer_ref=tokenizer_ref,
                    cfg_dict=cfg.to_dict())


def chunks_by_lookup(pages: dict, work: WorkDir, kb_table, tokenizer_ref: dict, cfg: KilmConfig):
    """Lookup: the driver builds one table of redirects and in-dump knowledge; every chunking process
    holds it (and the knowledge base) and maps over the articles."""
    import ray

    lookup = build_lookup(pages, work.stage("pages").dir, cfg)
    log.info("lookup built: %d redirects, %d descriptions, %d disambiguation pages", len(lookup.redirects),
             len(lookup.template) + len(lookup.first_sentence), len(lookup.disambiguation))
    refs = {"lookup": ray.put(lookup), "external": kb_table if kb_table is not None else ray.put(None),
            "tokenizer_json": tokenizer_ref["tokenizer_json"]}
    return map_rows(_read(pages, work, "articles", cfg), chunk_with_lookup, cfg, refs=refs, cfg_dict=cfg.to_dict())


def configure_ray_data() -> None:
    import ray.data
    from ray.data.context import ShuffleStrategy

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = False  # order-free: every output is sorted or keyed
    # Ray Data reserves a share of the CPUs for every operator; on small clusters that caps the parse
    # step well below the CPUs it could use (1.5 of 2; measured in bench/). Our operators cannot starve
    # each other: reads and writes take a quarter of a CPU.
    ctx.op_resource_reservation_enabled = False
    # Shuffles (group-bys) as Ray Data's v2 map/reduce tasks on warm workers: the default aggregator
    # actors start afresh for every operator (5-9 s each on 2 cores; v2: 0.4-1.6 s).
    ctx.shuffle_strategy = ShuffleStrategy.SHUFFLE_V2
    # A shuffle's map task coalesces its input up to this size (Ray's default: 1 GiB, which a map task
    # would hold: its memory grew with the corpus up to that size).
    ctx.shuffle_input_batch_bytes = 16 * 2**20
    # A task whose input read kept failing (after kilm_ray's retries in place) runs again, at most twice:
    # Ray Data replays a retried task's output and skips what it had already given, so nothing is read
    # twice. Other errors (a truncated dump, a bug) fail at once: a retry would read the same bytes.
    ctx.retried_map_errors = [READ_KEEPS_FAILING]
    ctx.max_map_retries = 2


def _brief(pages: dict) -> dict:
    return {k: v for k, v in pages.items() if k != "error_examples"}


def _stats(pages: dict, counts: dict, kb: dict, vocab: Vocab, cfg: KilmConfig, elapsed: float) -> dict:
    for split in SPLITS:
        if not counts["samples"][split]["chunks"]:
            log.warning("split %s is empty (a small corpus?)", split)
    return {"pages": pages["summary"]["pages"], **counts,
            "knowledge_base": {k: kb[k] for k in ("files", "lines", "entities", "bad_lines", "bad_examples")},
            "knowledge_table": {"external": kb["entities"]},
            "tokenizer": {"source": cfg.tokenizer.source, "vocab_size": vocab.vocab_size, "sha256": vocab.sha256},
            "elapsed_s": round(elapsed, 2)}


# ----------------------------------------------------------------------------------------------
# The plan: inputs, run key, where the output may go
# ----------------------------------------------------------------------------------------------


@dataclass
class Plan:
    cfg: KilmConfig
    units: list[ReadUnit]
    kb_sources: list[tuple[int, str]]
    namespaces: SiteNamespaces
    key: str
    distributed: bool
    sizes: dict[str, int]  # every input file's size, read once


def preflight(dumps: list[str], knowledge: list[str],
              tokenizer_source: str = "train") -> tuple[list[str], list[tuple[int, str]]]:
    """Fail fast, before any Ray work, naming a missing or unreadable input; returns the dump files and
    the knowledge-base files with the index of the argument each came from."""
    if not dumps:
        raise storage.InputError("no dump given (--dump PATH)")
    kb_sources = knowledge_sources(knowledge)
    dump_files = [f for spec in dumps for f in storage.expand(spec, DUMP_SUFFIXES, "dump")]
    if tokenizer_source.startswith("gpt2-bpe:"):
        for name in ("encoder.json", "vocab.bpe"):
            storage.check_readable(str(Path(tokenizer_source.split(":", 1)[1]).expanduser() / name), "tokenizer file")
    elif tokenizer_source.startswith((".", "/", "~")) and not Path(tokenizer_source).expanduser().is_dir():
        raise storage.InputError(f"tokenizer directory not found: {tokenizer_source}")
    return dump_files, kb_sources


def run_key(cfg: KilmConfig, units: list[ReadUnit], kb_sources: list[tuple[int, str]], sizes: dict[str, int]) -> str:
    """What the output depends on: the inputs (names, sizes (``sizes``: every input file's), which
    --knowledge argument), the tokenizer's files when it is loaded from disk, and the
    corpus/tokenizer/data settings."""
    inputs: list = [[u.uri, u.offset, u.length, sizes[u.uri]] for u in units]
    inputs += [[source, f, sizes[f]] for source, f in kb_sources]
    settings = {k: cfg.to_dict()[k] for k in ("corpus", "tokenizer", "data")}
    settings["corpus"] = {k: v for k, v in settings["corpus"].items() if k not in (
        "task_resources", "shuffle_partitions", "shuffle_partition_mb", "kb_read_unit_mb", "shared_paths",
        "cluster_cpus", "keep_truncated_input")}  # how, not what: the same inputs give the same output
    blob = json.dumps({"inputs": inputs, "settings": settings, "version": __version__,
                       "tokenizer_files": source_fingerprint(cfg.tokenizer.source)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_shared_storage(paths: list[tuple[str, str]], nodes: int, autoscaling: bool, shared: list[str]) -> None:
    """On a cluster of several nodes (or one that can grow), a local path is each node's own disk: tasks
    elsewhere would write output the driver never sees, or find no input. Refuse it unless it is under
    a prefix the user declared shared (``corpus.shared_paths``: an NFS/EFS/FSx mount on every node)."""
    if nodes <= 1 and not autoscaling:
        return
    roots = [str(Path(p).expanduser().resolve()) for p in shared]
    for what, uri in paths:
        if storage.is_remote(uri):
            continue
        local = str(Path(uri).expanduser().resolve())
        if any(local == r or local.startswith(r.rstrip("/") + "/") for r in roots):
            continue
        cluster = f"{nodes} nodes" if nodes > 1 else "autoscaling enabled (more nodes may join)"
        raise storage.InputError(
            f"{what} {uri} is a local path, but this Ray cluster has {cluster}: tasks on other nodes would "
            f"use their own disks. Use s3://..., or if {uri} is on a file system mounted at the same path on "
            f"every node, declare it: corpus.shared_paths=[{local}]")


def unsplittable_warnings(files: list[tuple[str, int]], units: list[ReadUnit], unit_bytes: int,
                          kb_files: list[tuple[str, int]], kb_unit_bytes: int) -> list[str]:
    """Inputs large enough to matter that one task must read from start to end."""
    warnings = []
    whole = {u.uri for u in units if u.length < 0}
    for uri, size in files:
        if uri in whole and uri.endswith((".bz2", ".gz")) and size > 2 * unit_bytes:
            warnings.append(f"dump {uri} ({size / 1e6:.0f} MB) is read by one task: a single compressed stream "
                            "cannot be split. Use the multistream dump with its index (...-pages-articles-"
                            "multistream.xml.bz2 and ...-multistream-index.txt.bz2 side by side) or the split "
                            "files (...-pages-articles1.xml-p1p41242.bz2, ...).")
    for uri, size in kb_files:
        if not splittable(uri) and size > 2 * kb_unit_bytes:
            warnings.append(f"knowledge base {uri} ({size / 1e6:.0f} MB) is read by one task: gzip cannot be "
                            "split. Recompress it as .bz2 (read in parallel byte ranges) or leave it uncompressed.")
    return warnings


def make_plan(cfg: KilmConfig, dumps: list[str], knowledge: list[str], out: str) -> Plan:
    import ray

    dump_files, kb_sources = preflight(dumps, knowledge, cfg.tokenizer.source)
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    paths = [("--out", out)] + [("--dump", f) for f in dump_files] + [("--knowledge", f) for _, f in kb_sources]
    check_shared_storage(paths, nodes, autoscaling_enabled(), cfg.corpus.shared_paths)
    unit_bytes = max(1, int(cfg.corpus.read_unit_mb * 2**20))
    units = read_units(dump_files, unit_bytes)  # reads multistream indexes
    # Every input's size once (one listing per directory: not a HEAD per knowledge shard, three times).
    all_sizes = storage.file_sizes(dump_files + [f for _, f in kb_sources])
    sizes = {f: all_sizes[f] for f in dump_files}
    kb_sizes = [(f, all_sizes[f]) for _, f in kb_sources]
    for warning in unsplittable_warnings(list(sizes.items()), units, unit_bytes, kb_sizes,
                                         int(cfg.corpus.kb_read_unit_mb * 2**20)):
        log.warning(warning)
    key = run_key(cfg, units, kb_sources, all_sizes)
    distributed = uses_distributed_resolution(cfg.corpus.link_resolution, cfg.corpus.lookup_max_input_mb,
                                              sum(sizes.values()) + sum(s for _, s in kb_sizes))
    has_kb = bool(kb_sources) and "external" in cfg.corpus.knowledge_sources
    log.info("reading %d dump read unit(s) from %s; run key %s; link resolution: %s", len(units), ", ".join(dumps),
             key, "distributed" if distributed else "lookup")
    namespaces = SiteNamespaces.from_siteinfo(read_siteinfo(dump_files[0]))
    return Plan(cfg, units, kb_sources if has_kb else [], namespaces, key, distributed, all_sizes)
