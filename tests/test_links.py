"""The pure functions of the distributed link resolution agree with the in-memory lookup."""

import itertools

import pyarrow as pa

from kilm_ray.data.corpus.knowledge import KnowledgeLookup, kb_line_rows, match_keys
from kilm_ray.data.corpus.links import (PENDING, bare_key, choose_knowledge, follow_redirect, page_link_targets,
                                   sample_hash, sample_threshold)
from kilm_ray.data.rows import best_kb_rows, extend_edges, follow_links


def test_redirect_rounds_follow_chains_and_stop_at_loops():
    redirects = {"A": "B", "B": "C", "C": "D", "Loop1": "Loop2", "Loop2": "Loop1"}
    edges = dict(redirects)
    for _ in range(2):  # two rounds of compression: chains of up to four redirects
        edges = {src: follow_redirect(src, dst, edges.get(dst)) for src, dst in edges.items()}
    lookup = KnowledgeLookup(redirects=redirects)
    assert edges["A"] == lookup.resolve("A") == "D"
    assert edges["Loop1"] == lookup.resolve("Loop1") == "Loop2"


def test_bucket_functions_follow_redirects_and_pick_the_best_kb_row():
    hop = {"kind": "hop", "page_id": None}
    bucket = pa.Table.from_pylist([
        {"key": "B", "src": "A", "dst": "B", "kind": "edge", "page_id": None, "bucket": 0},
        {"key": "B", "src": "B", "dst": "C", **hop, "bucket": 0},
    ])
    assert extend_edges(bucket).to_pylist() == [{"src": "A", "dst": "C"}]
    links = pa.Table.from_pylist([
        {"key": "A", "kind": "link", "page_id": 7, "src": "A", "dst": None, "bucket": 0},
        {"key": "A", "src": "A", "dst": "Mercury (planet)", **hop, "bucket": 0},
        {"key": "Z", "kind": "link", "page_id": 8, "src": "Z", "dst": None, "bucket": 0},
    ])
    assert [(r["page_id"], r["resolved"], r["key"]) for r in follow_links(links).to_pylist()] == [
        (7, "Mercury (planet)", "mercury (planet)"), (8, "Z", "z")]
    name = {"match": "name", "exact": ""}
    rows = [dict(r, key="x", bucket=1, **name) for r in ({"description": "late file", "p0": 1.0, "p1": 0.0, "p2": 0.0},
                                                         {"description": "sense 2", "p0": 0.0, "p1": 1.0, "p2": 2.0},
                                                         {"description": "sense 1", "p0": 0.0, "p1": 1.0, "p2": 1.0})]
    rows.append({"key": "y", "description": "only", "p0": 0.0, "p1": 0.0, "p2": 0.0, "bucket": 1, **name})
    # Rows of one key but another match or exact value are other row ids: each keeps its own winner.
    rows.append({"key": "x", "match": "qualified", "exact": "planet", "description": "a planet", "p0": 0.0,
                 "p1": 1.0, "p2": 2.0, "bucket": 1})
    rows.append({"key": "x", "match": "title", "exact": "X", "description": "title X", "p0": 2.0, "p1": 0.0,
                 "p2": 0.0, "bucket": 1})
    best = best_kb_rows(pa.Table.from_pylist(rows)).to_pylist()
    assert [(r["key"], r["match"], r["description"]) for r in best] == [
        ("x", "name", "sense 1"), ("x", "qualified", "a planet"), ("x", "title", "title X"), ("y", "name", "only")]


def test_choose_knowledge_matches_the_lookup_for_every_source_order():
    external = {("name", "e", ""): "ext e", ("qualified", "mercury", "planet"): "a planet", ("name", "c", ""): "ext c",
                ("title", "d", "D"): "ext D", ("name", "nothing", ""): "a bare nothing"}
    lookup = KnowledgeLookup(template={"C": "tmpl"}, first_sentence={"C": "first", "D": "D first"}, external=external)
    for sources in itertools.permutations(["template", "first_sentence", "external"]):
        lookup.sources = sources
        for title in ("C", "D", "E", "Mercury (planet)", "Mercury (element)", "Nothing (at all)", "Nothing"):
            ids = dict(match_keys(title))
            own = next(((external[ids[r]], r) for r in ("title", "name") if ids[r] in external), None)
            args = (lookup.template.get(title), lookup.first_sentence.get(title), own)
            first = choose_knowledge(sources, *args, bare_key(title) is not None)
            if first == PENDING:
                first = choose_knowledge(sources, *args[:2], None, True, external.get(ids["qualified"]), True)
            assert first == lookup.describe(title), (sources, title)


def test_kb_lines_page_targets_and_the_tokenizer_sample():
    rows, bad = kb_line_rows('{"name": "Aristotle", "aliases": ["Aristoteles"], "description": "a philosopher", '
                             '"qualifiers": ["Philosopher"]}', 2)
    assert bad is None and rows[0]["p0"] == 2.0 and [(r["match"], r["key"], r["exact"]) for r in rows] == [
        ("name", "aristotle", ""), ("qualified", "aristotle", "philosopher"),
        ("name", "aristoteles", ""), ("qualified", "aristoteles", "philosopher")]
    rows, _ = kb_line_rows('{"title": "Aristotle_(film)", "name": "Aristotle", "description": "a film"}', 0)
    assert [(r["match"], r["key"], r["exact"]) for r in rows] == [("title", "aristotle (film)", "Aristotle (film)")]
    assert kb_line_rows("not json", 0)[1].startswith("not JSON") and kb_line_rows("  ", 0) == ([], None)
    assert kb_line_rows('{"description": "x"}', 0)[1] == "no 'title' or 'name'"
    doc = '[["a b", [[0, 1, "B"], [2, 3, "A"]]], ["c", [[0, 1, "B"]]]]'
    assert page_link_targets(doc) == ["A", "B"]
    assert sample_threshold(10, 5) == 2**63 and 0 < sample_threshold(10, 1000) < 2**63 // 50
    assert sample_hash(0, "text") == sample_hash(0, "text") != sample_hash(1, "text")


def test_shuffle_partitions_grow_with_the_input_and_auto_picks_the_path():
    from kilm_ray.data.resolution import uses_distributed_resolution
    from kilm_ray.data.shuffle import MAX_PARTITIONS, shuffle_partitions

    mb = 2**20
    assert shuffle_partitions(0, 10 * mb, 32, cpus=4) == 4  # small input: one per CPU
    assert shuffle_partitions(0, 3200 * mb, 32, cpus=4) == 100  # a partition holds ~32 MB at any size
    assert shuffle_partitions(0, 10**15, 32, cpus=4) == MAX_PARTITIONS
    assert shuffle_partitions(7, 3200 * mb, 32, cpus=4) == 7  # configured
    assert not uses_distributed_resolution("auto", 64, 63 * 10**6)
    assert uses_distributed_resolution("auto", 64, 65 * 10**6)
    assert uses_distributed_resolution("distributed", 64, 1) and not uses_distributed_resolution("lookup", 64, 10**12)
