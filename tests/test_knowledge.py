"""Knowledge bases: our JSONL schema, WordNet rows and database files, bad lines, the lookup."""

import gzip
import json

from kilm_ray.data.corpus.knowledge import (
    KBStats, KnowledgeLookup, iter_jsonl, kb_keys_for_title, load_knowledge_base, parse_wordnet_database,
    select_best, wordnet_description, write_kb_jsonl,
)

from conftest import WORDNET


def test_schema_ranks_aliases_and_bad_lines(tmp_path):
    kb = tmp_path / "kb.jsonl"
    kb.write_text("\n".join([
        json.dumps({"name": "Aristotle", "description": "Greek philosopher", "rank": 1}),
        json.dumps({"name": "aristotle", "description": "a better description", "rank": 0}),
        json.dumps({"name": "Paris", "description": "capital of France", "aliases": ["Paree"]}),
        "{not json",
        json.dumps({"description": "no name"}),
        json.dumps(["a", "list"]),
        json.dumps({"name": "Empty", "description": "  "}),
        "",
    ]) + "\n")
    table, stats = load_knowledge_base([str(kb)])
    assert table == {"aristotle": "a better description", "paris": "capital of France",
                     "paree": "capital of France"}
    assert stats.bad_lines == 4
    assert stats.bad_examples[0] == f"{kb}:4: not JSON (Expecting property name enclosed in double quotes)"
    assert any(":5: no 'name'" in e for e in stats.bad_examples)


def test_wordnet_rows_prefer_instances_then_sense_rank(tmp_path):
    rows = [
        {"name": "Mercury", "sense": 1, "gloss": "a heavy silvery metal; \"an example\"", "instance": False},
        {"name": "Mercury", "sense": 2, "gloss": "the smallest planet", "instance": True},
        {"name": "bank", "sense": 2, "gloss": "sloping land", "instance": False},
        {"name": "bank", "sense": 1, "gloss": "a financial institution; \"he cashed a check\"", "instance": False},
    ]
    table = select_best(enumerate(rows, 1), "rows", KBStats())
    assert table["mercury"] == ("Mercury", "the smallest planet")
    assert table["bank"] == ("bank", "a financial institution")
    assert wordnet_description('the act; "quoted example"; "another"') == "the act"


def test_real_wordnet_file_and_normalized_export(tmp_path, shared_data):
    stats = KBStats()
    table = select_best(iter_jsonl(str(WORDNET), stats), str(WORDNET), stats)
    assert stats.lines == 146_312 and stats.bad_lines == 0
    assert table["aristotle"][1].startswith("one of the greatest of the ancient Athenian philosophers")
    out = tmp_path / "wn.jsonl.gz"
    assert write_kb_jsonl(table, str(out)) == len(table)
    first = json.loads(gzip.open(out, "rt").readline())
    assert set(first) == {"name", "description"}
    reloaded, _ = load_knowledge_base([str(out)])
    assert reloaded["aristotle"] == table["aristotle"][1]


def test_wordnet_database_parser(tmp_path):
    (tmp_path / "data.noun").write_text(
        "  1 This software and database is being provided...\n"
        "09000001 18 n 01 Aristotle 0 001 @i 09000002 n 0000 | one of the greatest Athenian philosophers\n"
        "09000002 18 n 02 philosopher 0 thinker 0 000 | a specialist in philosophy; \"an example\"\n")
    (tmp_path / "index.noun").write_text(
        "  1 This software and database is being provided...\n"
        "aristotle n 1 1 @i 1 0 09000001  \n"
        "philosopher n 1 0 1 0 09000002  \n")
    rows = list(parse_wordnet_database(tmp_path / "data.noun", tmp_path / "index.noun"))
    assert rows == [
        {"name": "Aristotle", "sense": 1, "gloss": "one of the greatest Athenian philosophers", "instance": True,
         "synset": "09000001", "hypernyms": ["philosopher"]},
        {"name": "philosopher", "sense": 1, "gloss": 'a specialist in philosophy; "an example"', "instance": False,
         "synset": "09000002", "hypernyms": []},
    ]


def test_lookup_redirect_chains_and_source_order():
    lookup = KnowledgeLookup(redirects={"A": "B", "B": "C", "Loop1": "Loop2", "Loop2": "Loop1"},
                             template={"C": "from template"}, first_sentence={"C": "C is a letter.", "D": "D is."},
                             external={"e": "external e", "mercury": "a planet"})
    assert lookup.resolve("A") == "C" and lookup.resolve("Loop1") in ("Loop1", "Loop2")
    assert lookup.describe("C") == ("from template", "template")
    assert lookup.describe("D") == ("D is.", "first_sentence")
    assert lookup.describe("E") == ("external e", "external")
    assert lookup.describe("Mercury (planet)") == ("a planet", "external")
    assert kb_keys_for_title("Mercury (planet)") == ["mercury (planet)", "mercury"]
    lookup.sources = ("first_sentence", "template")
    assert lookup.describe("C") == ("C is a letter.", "first_sentence")
    assert lookup.describe("E") is None
