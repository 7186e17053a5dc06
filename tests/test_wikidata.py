"""Wikidata's JSON dump as a knowledge source: a sample in the dump's exact layout (``[``, one entity per
line with a trailing comma, ``]``), with a complete item record as Wikidata publishes it, a property, an
item without an English description, one without an English Wikipedia article, a disambiguation item
and a malformed line; read in parallel byte ranges of a bz2 file by ``kilm-ray import-kb --wikidata``,
then reduced by preprocessing's knowledge-base stage."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from kilm_ray.data.corpus.wikidata import MalformedEntity, entity_rows, line_rows, write_dump

# Douglas Adams (Q42) as the dump holds it (claims shortened to four of its statements; every field
# of an entity and of a statement in its published shape).
Q42 = {
    "type": "item", "id": "Q42",
    "labels": {"en": {"language": "en", "value": "Douglas Adams"}, "fr": {"language": "fr", "value": "Douglas Adams"}},
    "descriptions": {"en": {"language": "en", "value": "English writer and humorist (1952\u20132001)"},
                     "fr": {"language": "fr", "value": "\u00e9crivain et humoriste britannique"}},
    "aliases": {"en": [{"language": "en", "value": "Douglas No\u00ebl Adams"},
                       {"language": "en", "value": "Douglas Noel Adams"},
                       {"language": "en", "value": "Douglas N. Adams"}],
                "fr": [{"language": "fr", "value": "Douglas No\u00ebl Adams"}]},
    "claims": {
        "P31": [{"mainsnak": {"snaktype": "value", "property": "P31", "hash": "ad7d38a03cdd40cdc373de0dc4e7b7fcbccb31d9",
                              "datavalue": {"value": {"entity-type": "item", "numeric-id": 5, "id": "Q5"},
                                            "type": "wikibase-entityid"}, "datatype": "wikibase-item"},
                 "type": "statement", "id": "Q42$F078E5B3-F9A8-480E-B7AC-D97778CBBEF9", "rank": "normal",
                 "references": [{"hash": "fa278ebfc458360e5aed63d5058cca83c46134f1",
                                 "snaks": {"P248": [{"snaktype": "value", "property": "P248",
                                                     "hash": "b0ba8b0a7a9ce1be8fb1b7e9ae2a5dcb4cbd1d2b",
                                                     "datavalue": {"value": {"entity-type": "item", "numeric-id": 54919,
                                                                             "id": "Q54919"},
                                                                   "type": "wikibase-entityid"},
                                                     "datatype": "wikibase-item"}]},
                                 "snaks-order": ["P248"]}]}],
        "P21": [{"mainsnak": {"snaktype": "value", "property": "P21", "hash": "85ad4b1e9e6b9a1e2a14e2a7fe94f7c1c2e6c2a7",
                              "datavalue": {"value": {"entity-type": "item", "numeric-id": 6581097, "id": "Q6581097"},
                                            "type": "wikibase-entityid"}, "datatype": "wikibase-item"},
                 "type": "statement", "id": "q42$39F4DE4F-C277-449C-9F99-512350971B5B", "rank": "normal"}],
        "P106": [{"mainsnak": {"snaktype": "value", "property": "P106", "hash": "5d0a0da7ab8e1cd3bb4e8fbc9a1cc68dce1cc2e0",
                               "datavalue": {"value": {"entity-type": "item", "numeric-id": 36180, "id": "Q36180"},
                                             "type": "wikibase-entityid"}, "datatype": "wikibase-item"},
                  "type": "statement", "id": "Q42$e0f736bd-4711-c43b-9277-af1e9b2fb85f", "rank": "normal",
                  "qualifiers": {"P580": [{"snaktype": "value", "property": "P580",
                                           "hash": "1c7e3b0b5f1a4c9b3d7e8a2f6c5d4e3b2a190817",
                                           "datavalue": {"value": {"time": "+1978-00-00T00:00:00Z", "timezone": 0,
                                                                   "before": 0, "after": 0, "precision": 9,
                                                                   "calendarmodel": "http://www.wikidata.org/entity/Q1985727"},
                                                         "type": "time"}, "datatype": "time"}]},
                  "qualifiers-order": ["P580"]}],
        "P569": [{"mainsnak": {"snaktype": "value", "property": "P569", "hash": "2f1a6c4b8e0d3f5a7c9b1d2e4f6a8c0e1b3d5f7a",
                               "datavalue": {"value": {"time": "+1952-03-11T00:00:00Z", "timezone": 0, "before": 0,
                                                       "after": 0, "precision": 11,
                                                       "calendarmodel": "http://www.wikidata.org/entity/Q1985727"},
                                             "type": "time"}, "datatype": "time"},
                  "type": "statement", "id": "q42$D8404CDA-25E4-4334-AF13-A3290BCD9C0F", "rank": "normal"}],
    },
    "sitelinks": {"enwiki": {"site": "enwiki", "title": "Douglas Adams", "badges": []},
                  "frwiki": {"site": "frwiki", "title": "Douglas Adams", "badges": []},
                  "enwikiquote": {"site": "enwikiquote", "title": "Douglas Adams", "badges": []}},
    "pageid": 138, "ns": 0, "title": "Q42", "lastrevid": 2127386463, "modified": "2024-04-15T13:01:09Z",
}
P31 = {"type": "property", "datatype": "wikibase-item", "id": "P31",
       "labels": {"en": {"language": "en", "value": "instance of"}},
       "descriptions": {"en": {"language": "en", "value": "that class of which this subject is a particular example"}},
       "aliases": {"en": [{"language": "en", "value": "is a"}]}, "claims": {},
       "pageid": 3918489, "ns": 120, "title": "Property:P31", "lastrevid": 2120000000,
       "modified": "2024-04-01T00:00:00Z"}


def item(qid: str, label=None, description=None, enwiki=None, aliases=(), instance_of=None) -> dict:
    entity = {"type": "item", "id": qid, "labels": {}, "descriptions": {}, "aliases": {}, "claims": {},
              "sitelinks": {}, "pageid": int(qid[1:]), "ns": 0, "title": qid, "lastrevid": 1,
              "modified": "2024-01-01T00:00:00Z"}
    if label:
        entity["labels"]["en"] = {"language": "en", "value": label}
    if description:
        entity["descriptions"]["en"] = {"language": "en", "value": description}
    if aliases:
        entity["aliases"]["en"] = [{"language": "en", "value": a} for a in aliases]
    if enwiki:
        entity["sitelinks"]["enwiki"] = {"site": "enwiki", "title": enwiki, "badges": []}
    if instance_of:
        entity["claims"]["P31"] = [{"mainsnak": {"snaktype": "value", "property": "P31", "datatype": "wikibase-item",
                                                 "datavalue": {"value": {"entity-type": "item", "id": instance_of},
                                                               "type": "wikibase-entityid"}},
                                    "type": "statement", "rank": "normal", "id": f"{qid}$1"}]
    return entity


PARIS = item("Q90", "Paris", "capital and largest city of France", "Paris", aliases=["City of Light"])
PARIS_TEXAS = item("Q830149", "Paris", "city in Lamar County, Texas, United States", "Paris, Texas")
NO_ENGLISH = {**item("Q3108591", enwiki=None), "labels": {"fr": {"language": "fr", "value": "Gr\u00e9goire"}},
              "descriptions": {"fr": {"language": "fr", "value": "pr\u00e9nom"}},
              "sitelinks": {"frwiki": {"site": "frwiki", "title": "Gr\u00e9goire", "badges": []}}}
UNLINKED = item("Q106475474", "Anne Dupont", "French botanist")
DISAMBIGUATION = item("Q221431", "Paris", "Wikimedia disambiguation page", "Paris (disambiguation)",
                      instance_of="Q4167410")
SAMPLE = [Q42, P31, PARIS, PARIS_TEXAS, NO_ENGLISH, UNLINKED, DISAMBIGUATION]


def test_entities_are_kept_by_their_english_wikipedia_title():
    rows, outcome = entity_rows(Q42)
    # One row, matched on the exact enwiki title only: labels and aliases name other entities too.
    assert outcome == "kept" and rows == [{"title": "Douglas Adams", "wikidata": "Q42",
                                           "description": "English writer and humorist (1952\u20132001)"}]
    assert entity_rows(P31) == ([], "property")
    assert entity_rows(NO_ENGLISH) == ([], "no_english_description")
    assert entity_rows(UNLINKED) == ([], "no_enwiki_sitelink")
    assert entity_rows(DISAMBIGUATION) == ([], "disambiguation")
    assert entity_rows(PARIS_TEXAS)[0] == [{"title": "Paris, Texas", "label": "Paris", "wikidata": "Q830149",
                                            "description": "city in Lamar County, Texas, United States"}]
    assert line_rows("[") == ([], None) and line_rows("]") == ([], None) and line_rows("") == ([], None)
    assert line_rows(json.dumps(PARIS) + ",")[1] == "kept"
    with pytest.raises(MalformedEntity, match="not JSON"):
        line_rows('{"type":"item","id":"Q1","labels":{"en":')
    with pytest.raises(MalformedEntity, match="no entity"):
        line_rows('{"labels": {}},')


def test_import_reads_the_dump_in_ranges_and_preprocessing_reads_its_shards(tmp_path, ray_cluster, tiny_config):
    from kilm_ray.data.kb import knowledge_sources, kb_stage
    from kilm_ray.data.stages import Stage, stage_files

    # Enough filler items that the bz2 file has many compressed blocks, the sample spread among them.
    filler = [item(f"Q{10_000 + i}", f"Filler {i}", f"filler item number {i} of the test dump", f"Filler {i}",
                   aliases=[f"F{i}"]) for i in range(6000)]
    entities = filler[:2000] + SAMPLE[:4] + filler[2000:4000] + SAMPLE[4:] + filler[4000:]
    dump = write_dump(entities, str(tmp_path / "latest-all.json.bz2"))
    import bz2

    lines = bz2.decompress(open(dump, "rb").read()).decode().split("\n")
    assert lines[0] == "[" and lines[-2] == "]" and lines[1].endswith(",") and not lines[-3].endswith(",")
    broken_at = 3000  # a line cut short, as a damaged copy would have it
    lines[broken_at] = lines[broken_at][:60]
    (tmp_path / "latest-all.json.bz2").write_bytes(bz2.compress("\n".join(lines).encode(), 1))

    out = tmp_path / "kb"
    proc = subprocess.run([sys.executable, "-m", "kilm_ray.cli", "import-kb", "--wikidata", dump, "--out", str(out),
                           "--address", ray_cluster.get_runtime_context().gcs_address, "corpus.kb_read_unit_mb=0.01"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "import.json").read_text())
    assert record["complete"] and len(record["files"]) > 3  # byte ranges read in parallel
    assert record["entities"] == len(entities) - 1 and record["malformed"] == 1
    assert record["malformed_examples"][0].startswith(f"{dump}@") and "not JSON" in record["malformed_examples"][0]
    assert (record["kept"], record["property"], record["no_english_description"], record["no_enwiki_sitelink"],
            record["disambiguation"]) == (len(filler) - 1 + 3, 1, 1, 1, 1)
    rows = [json.loads(line) for f in record["files"] for line in gzip.open(out / f, "rt")]
    assert {"title": "Douglas Adams", "description": "English writer and humorist (1952\u20132001)",
            "wikidata": "Q42"} in rows
    assert len({r["wikidata"] for r in rows}) == len(rows) == record["rows"]  # every line once
    assert record["format"] == 2

    # preprocess --knowledge DIR: the shards, one source; rows are keyed by title only.
    sources = knowledge_sources([str(out)])
    assert [f for _, f in sources] == [str(out / f) for f in record["files"]] and {s for s, _ in sources} == {0}
    kb = kb_stage(Stage(str(tmp_path / "work"), "kb"), Stage(str(tmp_path / "work"), "kb_lines"), sources,
                  tiny_config)
    table = {(r["match"], r["key"], r["exact"]): r["description"]
             for f in stage_files(kb, "kb", str(tmp_path / "work" / "kb")) for r in pq.read_table(f).to_pylist()}
    assert table[("title", "paris", "Paris")] == "capital and largest city of France"
    assert table[("title", "paris, texas", "Paris, Texas")].startswith("city in Lamar County")
    assert {match for match, _, _ in table} == {"title"}  # no label or alias is a name to match
    assert not any(key in ("city of light", "douglas noel adams", "anne dupont", "instance of",
                           "paris (disambiguation)") for _, key, _ in table)
    assert kb["summary"]["entities"] == len(table) and kb["summary"]["bad_lines"] == 0


def test_an_unfinished_import_is_refused(tmp_path):
    from kilm_ray import storage
    from kilm_ray.data.kb import knowledge_files

    (tmp_path / "import.json").write_text(json.dumps({"complete": False}))
    (tmp_path / "part-00000.jsonl.gz").write_bytes(gzip.compress(b'{"name": "a", "description": "b"}\n'))
    with pytest.raises(storage.InputError, match="did not finish"):
        knowledge_files(str(tmp_path))
    # An import from before title-only matching keyed labels and aliases as names: refused, not misread.
    (tmp_path / "import.json").write_text(json.dumps({"complete": True, "files": ["part-00000.jsonl.gz"]}))
    with pytest.raises(storage.InputError, match="older kilm-ray import-kb"):
        knowledge_files(str(tmp_path))


def test_the_dump_is_read_from_s3_in_the_same_ranges(tmp_path, s3_server):
    import bz2

    from kilm_ray.data.corpus.ranges import iter_range_lines, plan_ranges

    entities = SAMPLE + [item(f"Q{50_000 + i}", f"Item {i}", f"item {i} of a test dump", f"Item {i}")
                         for i in range(3000)]
    local = write_dump(entities, str(tmp_path / "latest-all.json.bz2"))
    data = open(local, "rb").read()
    s3_server.put_object(Bucket="kilm", Key="wikidata/latest-all.json.bz2", Body=data)
    ranges = plan_ranges("s3://kilm/wikidata/latest-all.json.bz2", len(data), 8_000)
    assert len(ranges) > 2
    lines = [line for r in ranges for line in iter_range_lines(r)]
    assert lines == bz2.decompress(data).decode().rstrip("\n").split("\n")
    assert [line_rows(line)[1] for line in lines[1:4]] == ["kept", "property", "kept"]
