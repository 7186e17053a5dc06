"""Knowledge bases: our JSONL schema, WordNet rows and database files, bad lines, the lookup."""

import gzip
import json

from kilm_ray.data.corpus.knowledge import (
    KBStats, KnowledgeLookup, iter_jsonl, load_knowledge_base, match_keys, normalized_rows, parse_wordnet_database,
    wordnet_description, wordnet_qualifiers, write_kb_jsonl,
)

from conftest import WORDNET


def _names(table: dict) -> dict:
    return {key: desc for (match, key, _), desc in table.items() if match == "name"}


def _write(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_schema_ranks_aliases_and_bad_lines(tmp_path):
    kb = _write(tmp_path / "kb.jsonl", [
        {"name": "Aristotle", "description": "Greek philosopher", "rank": 1},
        {"name": "aristotle", "description": "a better description", "rank": 0},
        {"name": "Paris", "description": "capital of France", "aliases": ["Paree"]},
        "{not json",
        {"description": "no name"},
        ["a", "list"],
        {"name": "Empty", "description": "  "},
        {"title": "Paris, Texas", "description": "a city in Texas", "name": "Paris"},
        "",
    ])
    table, stats = load_knowledge_base([kb])
    assert _names(table) == {"aristotle": "a better description", "paris": "capital of France",
                             "paree": "capital of France"}
    # A titled row is matched on its title only (its "name" is not a name to match).
    assert table[("title", "paris, texas", "Paris, Texas")] == "a city in Texas" and len(table) == 4
    assert stats.bad_lines == 4
    assert stats.bad_examples[0] == f"{kb}:4: not JSON (Expecting property name enclosed in double quotes)"
    assert any(":5: no 'title' or 'name'" in e for e in stats.bad_examples)


WORDNET_ROWS = [
    {"name": "Mercury", "sense": 1, "gloss": "a heavy silvery metal; \"an example\"", "instance": False,
     "hypernyms": ["metallic element"]},
    {"name": "Mercury", "sense": 2, "gloss": "the smallest planet", "instance": True,
     "hypernyms": ["terrestrial planet"]},
    {"name": "bank", "sense": 2, "gloss": "sloping land", "instance": False, "hypernyms": ["slope"]},
    {"name": "bank", "sense": 1, "gloss": "a financial institution; \"he cashed a check\"", "instance": False},
    {"name": "Paris", "sense": 1, "gloss": "the capital and largest city of France", "instance": True,
     "hypernyms": ["national capital"]},
    {"name": "Paris", "sense": 2, "gloss": "(Greek mythology) the prince of Troy who abducted Helen",
     "instance": True, "hypernyms": ["mythical being"]},
    {"name": "John Smith", "sense": 1, "gloss": "English explorer who helped found Jamestown", "instance": True,
     "hypernyms": ["explorer"]},
]


def test_wordnet_rows_prefer_instances_then_sense_rank_and_carry_their_qualifiers(tmp_path):
    table, _ = load_knowledge_base([_write(tmp_path / "wn.jsonl", WORDNET_ROWS)])
    assert _names(table)["mercury"] == "the smallest planet" and _names(table)["bank"] == "a financial institution"
    assert table[("qualified", "mercury", "element")] == "a heavy silvery metal"
    assert table[("qualified", "mercury", "planet")] == table[("qualified", "mercury", "terrestrial planet")]
    assert wordnet_qualifiers(["terrestrial planet", "planet", " "]) == ["terrestrial planet", "planet"]
    assert wordnet_qualifiers(["prince"], "(Greek mythology) the prince of Troy") == [
        "prince", "greek mythology", "mythology"]
    assert wordnet_description('the act; "quoted example"; "another"') == "the act"


def test_red_links_never_take_another_entitys_knowledge(tmp_path):
    """Knowledge for links to pages missing from the dump: a Wikidata row by its exact title, a WordNet row by
    its name, or by its bare name only when it carries the title's qualifier."""
    wikidata = _write(tmp_path / "wikidata.jsonl", [
        {"title": "John Smith (explorer)", "description": "English explorer (1580-1631)", "label": "John Smith"},
        {"title": "Paris", "description": "capital of France", "label": "Paris"},
        {"title": "Paris, Texas", "description": "city in Texas", "label": "Paris"},
    ])
    table, _ = load_knowledge_base([wikidata, _write(tmp_path / "wn.jsonl", WORDNET_ROWS)])
    lookup = KnowledgeLookup(external=table)
    assert lookup.describe("John Smith (explorer)") == ("English explorer (1580-1631)", "external", "title")
    # Red links: another John Smith, or a bare name whose rows do not carry the qualifier, get nothing.
    assert lookup.describe("John Smith (cricketer, born 1850)") is None
    assert lookup.describe("John Smith (footballer)") is None
    assert lookup.describe("Bank (geography)") is None and lookup.describe("Paris (Texas)") is None
    # ... while a row that carries the qualifier (a WordNet hypernym or its head noun) answers.
    assert lookup.describe("Mercury (planet)") == ("the smallest planet", "external", "qualified")
    assert lookup.describe("Mercury (element)") == ("a heavy silvery metal", "external", "qualified")
    assert lookup.describe("Paris (mythology)")[0].startswith("(Greek mythology) the prince of Troy")
    assert lookup.describe("John Smith") == ("English explorer who helped found Jamestown", "external", "name")
    # Titles are exact (but for Wikipedia's first letter and underscores): a label is not a title.
    assert lookup.describe("paris") == ("capital of France", "external", "title")
    assert lookup.describe("Paris,_Texas") == ("city in Texas", "external", "title")
    assert lookup.describe("Paris, texas") is None
    assert [rule for rule, _ in match_keys("Mercury (planet)")] == ["title", "name", "qualified"]


def test_real_wordnet_file_and_normalized_export(tmp_path, shared_data):
    stats = KBStats()
    out = tmp_path / "wn.jsonl.gz"
    n = write_kb_jsonl(normalized_rows(iter_jsonl(str(WORDNET), stats), str(WORDNET), stats), str(out))
    assert stats.lines == 146_312 and stats.bad_lines == 0 and n == stats.entities
    first = json.loads(gzip.open(out, "rt").readline())
    assert {"name", "description"} <= set(first) <= {"name", "description", "qualifiers", "rank", "aliases"}
    original, _ = load_knowledge_base([str(WORDNET)])
    reloaded, _ = load_knowledge_base([str(out)])
    assert reloaded == original  # the same row wins every name and qualified name
    assert original[("name", "aristotle", "")].startswith("one of the greatest of the ancient Athenian philosophers")


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
                             external={("name", "e", ""): "external e",
                                       ("qualified", "mercury", "planet"): "a planet"})
    assert lookup.resolve("A") == "C" and lookup.resolve("Loop1") in ("Loop1", "Loop2")
    assert lookup.describe("C") == ("from template", "template", None)
    assert lookup.describe("D") == ("D is.", "first_sentence", None)
    assert lookup.describe("E") == ("external e", "external", "name")
    assert lookup.describe("Mercury (planet)") == ("a planet", "external", "qualified")
    lookup.sources = ("first_sentence", "template")
    assert lookup.describe("C") == ("C is a letter.", "first_sentence", None)
    assert lookup.describe("E") is None
