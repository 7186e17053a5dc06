"""Link resolution: every link out of every article through its target's redirects to the target's
knowledge, tokenized once per entity.

``distributed`` (Ray Data group-bys; no process holds a table that grows with the corpus):

    redirects ──(self-join x corpus.redirect_rounds)──> hops
    links + hops ──group by target──> links keyed by their resolved title
    + in-dump knowledge + disambiguation pages + knowledge-base rows ──group by entity──> resolved links
    (a title whose answer needs the qualified knowledge-base row of its bare name, "Mercury (planet)" ->
     "mercury" carrying "planet", goes round once more, keyed by that)           [stage: links]

``lookup``: the driver reads the redirect, knowledge and disambiguation tables into one
:class:`~kilm_ray.data.corpus.knowledge.KnowledgeLookup` that every chunking process holds (small inputs).
Both give identical samples.
"""

from __future__ import annotations

import logging
from typing import Optional

import pyarrow as pa
import pyarrow.compute as pc

from kilm_ray import storage
from kilm_ray.config import KilmConfig
from kilm_ray.data.corpus.knowledge import NAME, QUALIFIED, TITLE, KnowledgeLookup, load_knowledge_base, match_keys
from kilm_ray.data.corpus.links import PENDING, bare_key, choose_knowledge
from kilm_ray.data.corpus.wikitext import is_disambiguation_title
from kilm_ray.data.rows import (KB_SCHEMA, LINK_SCHEMA, PAGE_TABLES, deferred_rows, disambiguation_rows,
                                    dump_knowledge_rows, edge_rows, extend_edges, follow_links, kb_entity_rows,
                                    link_rows, redirect_rows, table)
from kilm_ray.data.shuffle import bucketed, light_args, light_map, partitions_for
from kilm_ray.data.sources import read_parquet_files
from kilm_ray.data.stages import Stage, merge_reports, stage_bytes, stage_files
from kilm_ray.data.vocab import worker_tokenizer

log = logging.getLogger("kilm_ray.pipeline")


def uses_distributed_resolution(mode: str, lookup_max_input_mb: float, input_bytes: int) -> bool:
    """corpus.link_resolution: 'auto' resolves small inputs by lookup (its tables are bounded by the
    input limit) and everything else distributed."""
    if mode == "auto":
        return input_bytes > lookup_max_input_mb * 1e6
    return mode == "distributed"


def resolve_entities(bucket: pa.Table, sources: list[str], has_kb: bool, bare_round: bool, tokenizer,
                     max_knowledge_tokens: int) -> pa.Table:
    """All rows of the entity keys of one bucket: links, in-dump knowledge, disambiguation pages,
    knowledge-base rows. Chooses each linked title's knowledge, tokenizes it once, and gives every link
    to it its answer (links without knowledge, and links to disambiguation pages, are dropped: they
    stay plain text). A knowledge-base row matches by its row id (``KnowledgeLookup.describe``'s rules):
    in the first round the exact title, then the name; a title whose answer needs the qualified row of
    its bare name ("Mercury (planet)": "mercury" carrying "planet") is handed on, keyed by that name."""
    from kilm_ray.method.chunking import knowledge_ids

    rows = bucket.drop_columns(["bucket"]).to_pylist() if "bucket" in bucket.column_names else bucket.to_pylist()
    kb = {(r["match"], r["key"], r["exact"]): r["description"] for r in rows if r["kind"] == "kb"}
    dump = {r["resolved"]: r for r in rows if r["kind"] == "dump"}
    disambiguation = {r["resolved"] for r in rows if r["kind"] == "disambiguation"}
    links: dict[str, list[dict]] = {}
    for r in rows:
        if r["kind"] in ("link", "deferred"):
            links.setdefault(r["resolved"], []).append(r)
    out: list[dict] = []
    for title, refs in sorted(links.items()):
        if title in disambiguation or is_disambiguation_title(title):
            continue
        rule_ids = dict(match_keys(title))
        if bare_round:
            first = refs[0]
            template, first_sentence = first["template"], first["first_sentence"]
            choice = choose_knowledge(sources, template, first_sentence, None, True, kb.get(rule_ids[QUALIFIED]),
                                      True)
        else:
            known = dump.get(title, {})
            template, first_sentence = known.get("template"), known.get("first_sentence")
            own = next(((kb[rule_ids[rule]], rule) for rule in (TITLE, NAME) if rule_ids[rule] in kb), None)
            choice = choose_knowledge(sources, template, first_sentence, own, has_kb and QUALIFIED in rule_ids)
        if choice is None:
            continue
        if choice == PENDING:
            out.extend({"state": "deferred", "key": bare_key(title), "page_id": r["page_id"], "target": r["target"],
                        "resolved": title, "template": template, "first_sentence": first_sentence} for r in refs)
            continue
        ids = knowledge_ids(tokenizer.encode, title, choice[0], tokenizer.token_id("<sep>"), max_knowledge_tokens)
        out.extend({"state": "resolved", "page_id": r["page_id"], "target": r["target"], "resolved": title,
                    "source": choice[1], "knowledge": ids, "rule": choice[2]} for r in refs)
    return table(out, LINK_SCHEMA)


def _resolve_bucket(bucket: pa.Table, tokenizer_ref: dict, **kwargs) -> pa.Table:
    return resolve_entities(bucket, tokenizer=worker_tokenizer(tokenizer_ref), **kwargs)


def redirect_hops(redirects, cfg: KilmConfig, partitions: int):
    """Redirects as ``hop`` rows with chains followed: each round, every ``a -> b`` meets ``b -> c``. Each
    round's input is read once: one map gives both its hop and its edge rows."""
    if not cfg.corpus.redirect_rounds:
        return light_map(redirects, redirect_rows, cfg, kinds=("hop",))
    rows = light_map(redirects, redirect_rows, cfg)
    for round_ in range(cfg.corpus.redirect_rounds):
        edges = bucketed(rows, "key", extend_edges, cfg, partitions)
        last = round_ == cfg.corpus.redirect_rounds - 1
        rows = light_map(edges, edge_rows, cfg, kinds=("hop",) if last else ("hop", "edge"))
    return rows


def _link_counts(batch: pa.Table) -> tuple[dict[str, pa.Table], dict]:
    deferred = int(pc.sum(pc.equal(batch["state"], "deferred")).as_py() or 0)
    return {"links": batch}, {"rows": batch.num_rows, "deferred": deferred}


def links_stage(stage: Stage, pages: dict, pages_root: str, kb: Optional[dict], kb_root: Optional[str],
                cfg: KilmConfig, tokenizer_ref: dict) -> dict:
    """Resolve every link (first round: by the entity's key; second: by its bare title's key)."""
    record = stage.record()
    if record:
        log.info("links: resolved by an earlier run, reused (%s)", stage.dir)
        return record
    stage.clear()
    def read(name: str):
        return read_parquet_files(stage_files(pages, name, pages_root), PAGE_TABLES[name], cfg=cfg)

    has_kb = bool(kb and kb["files"].get("kb"))
    partitions = partitions_for(cfg, stage_bytes(pages, "links", "redirects", "knowledge")
                                + (stage_bytes(kb, "kb") if has_kb else 0), "links+redirects+knowledge+kb")
    links = light_map(read("links"), link_rows, cfg).union(redirect_hops(read("redirects"), cfg, partitions))
    entity_rows = [bucketed(links, "key", follow_links, cfg, partitions),
                   light_map(read("knowledge"), dump_knowledge_rows, cfg),
                   light_map(read("disambiguation"), disambiguation_rows, cfg)]
    kb_rows = (lambda: light_map(read_parquet_files(stage_files(kb, "kb", kb_root), KB_SCHEMA, cfg=cfg),
                                 kb_entity_rows, cfg))
    if has_kb:
        entity_rows.append(kb_rows())
    resolve = dict(sources=list(cfg.corpus.knowledge_sources), has_kb=has_kb, tokenizer_ref=tokenizer_ref,
                   max_knowledge_tokens=cfg.data.max_knowledge_tokens)
    first = bucketed(entity_rows[0].union(*entity_rows[1:]), "key", _resolve_bucket, cfg, partitions, **resolve,
                     bare_round=False)
    reports = _write(first, stage, cfg)
    deferred = sum(c["deferred"] for r in reports for c in r.counts)
    if deferred:  # the second round: deferred links meet the knowledge-base rows of their bare titles
        files = [storage.join(stage.dir, f["path"]) for r in reports for f in r.files.get("links", [])]
        written = read_parquet_files(files, LINK_SCHEMA, cfg=cfg)
        second = bucketed(light_map(written, deferred_rows, cfg).union(kb_rows()), "key", _resolve_bucket, cfg,
                          partitions, **resolve, bare_round=True)
        reports += _write(second, stage, cfg)
    files, counts = merge_reports(reports)
    return stage.finish_with(files, {"rows": sum(c["rows"] for c in counts) - deferred, "deferred": deferred})


def _write(ds, stage: Stage, cfg: KilmConfig) -> list:
    sink = stage.sink(_link_counts)
    ds.write_datasink(sink, ray_remote_args=light_args(cfg))
    return list(sink.reports)


# ----------------------------------------------------------------------------------------------
# The lookup path
# ----------------------------------------------------------------------------------------------


def build_lookup(pages: dict, pages_root: str, cfg: KilmConfig) -> KnowledgeLookup:
    """Redirects, in-dump descriptions and disambiguation pages, in one dict per source on the driver
    (from the parse stage's small tables; the articles' text is not read)."""
    import pyarrow.parquet as pq

    from kilm_ray import storage

    lookup = KnowledgeLookup(sources=tuple(cfg.corpus.knowledge_sources))

    def rows(name: str):
        for uri in stage_files(pages, name, pages_root):
            fs, path = storage.resolve(uri)
            yield from pq.read_table(path, filesystem=fs).to_pylist()

    for r in rows("redirects"):
        lookup.redirects[r["title"]] = r["redirect"]
    for r in rows("knowledge"):
        if r["short_description"]:
            lookup.template[r["title"]] = r["short_description"]
        if r["first_sentence"]:
            lookup.first_sentence[r["title"]] = r["first_sentence"]
    lookup.disambiguation.update(r["title"] for r in rows("disambiguation"))
    return lookup


def load_kb(files: list[str], sources: list[int], max_chars: int) -> tuple[dict, dict]:
    """External knowledge bases -> (key -> description, stats); runs as a Ray task beside parsing."""
    table_, stats = load_knowledge_base(files, max_chars, sources)
    return table_, {"files": files, "lines": stats.lines, "entities": stats.entities, "bad_lines": stats.bad_lines,
                    "bad_examples": stats.bad_examples}
