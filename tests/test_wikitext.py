"""Wikitext cleaning, links, descriptions and the dump reader: hand-made cases and the real excerpt."""

import bz2

import pytest

from kilm_ray.data.corpus.compressed import TruncatedInput
from kilm_ray.data.corpus.dump import MalformedPage, iter_raw_pages, parse_page_xml
from kilm_ray.data.corpus.wikitext import (
    clean_description, first_sentence, is_namespaced, normalize_title, parse_article, redirect_target,
)

from conftest import DUMP


def links_of(paragraph):
    return [(paragraph.text[l.start:l.end], l.target) for l in paragraph.links]


def test_lead_cleaning_links_and_markup():
    text = (
        "{{Short description|Ancient Greek [[philosopher]]}}\n{{Infobox person|name=X|born={{birth date|1|2|3}}}}\n"
        "[[File:Bust.jpg|thumb|A bust of [[Aristotle]]]]\n"
        "'''Aristotle''' ({{IPAc-en|ˈ|æ}}; {{lang-grc|Ἀριστοτέλης}}) was a [[Ancient Greece|Greek]] "
        "[[philosopher]]s<ref>Smith, p. 3</ref> born in [[stagira_(ancient city)#History|Stagira]]."
        "<!-- a comment --> See [http://example.org the site] and [[Category:People]] [[fr:Aristote]].\n\n"
        "* a list item with [[Plato]]\n"
        "He taught [[Alexander the Great|Alexander]] at the <b>[[Lyceum]]</b>.\n"
        "== Life ==\nNot in the lead [[Plato]]."
    )
    article = parse_article(text)
    assert article.short_description == "Ancient Greek philosopher"
    assert [p.text for p in article.paragraphs] == [
        "Aristotle was a Greek philosophers born in Stagira. See the site and.",
        "He taught Alexander at the Lyceum.",
    ]
    assert links_of(article.paragraphs[0]) == [
        ("Greek", "Ancient Greece"), ("philosophers", "Philosopher"), ("Stagira", "Stagira (ancient city)")]
    assert links_of(article.paragraphs[1]) == [("Alexander", "Alexander the Great"), ("Lyceum", "Lyceum")]


def test_whole_article_mode_skips_reference_sections():
    text = "Lead [[A]].\n== History ==\nBody [[B]].\n== References ==\n[[C]] cited\n== Later ==\nMore [[D]]."
    article = parse_article(text, mode="article")
    assert [p.text for p in article.paragraphs] == ["Lead A.", "History", "Body B.", "Later", "More D."][0:1] + [
        "Body B.", "More D."]
    assert [l.target for p in article.paragraphs for l in p.links] == ["A", "B", "D"]


def test_paragraph_filters():
    text = "Redirect somewhere.\n\nSee http: nothing.\n\nKept text.\n\nImage: foo"
    assert [p.text for p in parse_article(text).paragraphs] == ["Kept text."]


def test_titles_namespaces_redirects():
    assert normalize_title(" foo_bar#Section ") == "Foo bar"
    assert normalize_title("#only anchor") is None
    assert is_namespaced("File:x.jpg") and is_namespaced(":Category:X") and is_namespaced("fr:Paris")
    assert is_namespaced("wikt:word") and not is_namespaced("Star Wars: Episode IV")
    assert redirect_target("#REDIRECT [[computer accessibility#x]]") == "Computer accessibility"
    assert redirect_target("#redirect: [[Foo]]") == "Foo" and redirect_target("Normal text") is None


@pytest.mark.parametrize("desc, expected", [
    ("Ancient Greek philosopher", "Ancient Greek philosopher"),
    ("Mercury may refer to:", None), ("Redirect to X", None), ("", None), ("thumb", None), ("Right", None),
    ("Wikipedia list article", None), ("none", None), (None, None),
])
def test_description_filters(desc, expected):
    assert clean_description(desc) == expected


def test_first_sentence_respects_abbreviations_and_initials():
    assert first_sentence("J. R. R. Tolkien was an English writer. He wrote books.") == \
        "J. R. R. Tolkien was an English writer."
    assert first_sentence("The U.S. is large, e.g. Texas. Next one.") == "The U.S. is large, e.g. Texas."
    assert first_sentence("No end") == "No end"


def test_reader_and_parser_on_the_real_excerpt(shared_data):
    raws = list(iter_raw_pages(str(DUMP)))
    assert len(raws) == 206 and all(r.xml for r in raws)
    pages = [parse_page_xml(r.xml) for r in raws]
    assert sum(p.redirect is not None for p in pages) == 100
    anarchism = next(p for p in pages if p.title == "Anarchism")
    article = parse_article(anarchism.text)
    first = article.paragraphs[0]
    assert first_sentence(first.text) == (
        "Anarchism is a political philosophy that advocates self-governed societies based on voluntary institutions.")
    assert ("political philosophy", "Political philosophy") in links_of(first)
    # No markup survives in any lead or whole article of the excerpt.
    markup = ("[[", "]]", "{{", "}}", "<ref", "''", "&lt;", "|-")
    for page in pages:
        for mode in ("lead", "article"):
            if page.redirect is not None:
                continue
            for para in parse_article(page.text, mode).paragraphs:
                assert not any(m in para.text for m in markup), para.text
                for link in para.links:
                    assert para.text[link.start:link.end].strip() == para.text[link.start:link.end]


def test_reader_limits_and_truncated_input(tmp_path, shared_data):
    assert len(list(iter_raw_pages(str(DUMP), max_pages=5))) == 5
    data = DUMP.read_bytes()
    cut = tmp_path / "cut.xml.bz2"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(TruncatedInput, match=rf"cut.xml.bz2: ends at byte {len(data) // 2}, inside the compressed"):
        list(iter_raw_pages(str(cut)))
    raws = list(iter_raw_pages(str(cut), keep_truncated=True))
    assert raws[-1].xml is None and "ended early" in raws[-1].error
    assert 10 < len(raws) - 1 < 206  # everything before the cut is delivered
    plain = tmp_path / "plain.xml"
    plain.write_bytes(bz2.decompress(data))
    assert len(list(iter_raw_pages(str(plain)))) == 206


def test_malformed_page_is_named():
    with pytest.raises(MalformedPage, match="not well-formed"):
        parse_page_xml("<page><title>X</title><revision><text>a</text></page>")
    with pytest.raises(MalformedPage, match="no <text>"):
        parse_page_xml("<page><title>X</title><ns>0</ns><revision></revision></page>")


def test_reads_that_decompress_to_nothing_do_not_end_the_input(shared_data):
    """bz2 gives no output until a whole block is in: with small reads most reads decompress to b"".
    The reader took that for the end of the input and silently dropped the rest (found on a multistream
    byte range whose last 100 pages went missing)."""
    assert len(list(iter_raw_pages(str(DUMP), read_size=4096))) == 206


def test_what_mediawiki_shows_is_kept(shared_data):
    """<onlyinclude> and <noinclude> content is shown on the page itself (only <includeonly> is not): the
    excerpt's "Agricultural science" lead sits inside <onlyinclude> and was lost, the article skipped."""
    from kilm_ray.data.corpus.articles import page_record

    text = "<noinclude>A [[b]] c.</noinclude> <includeonly>Hidden.</includeonly><onlyinclude>'''D''' is e.</onlyinclude>"
    paragraphs = parse_article(text).paragraphs
    assert [p.text for p in paragraphs] == ["A b c. D is e."] and [l.target for l in paragraphs[0].links] == ["B"]
    raw = next(r for r in iter_raw_pages(str(DUMP)) if "<title>Agricultural science</title>" in r.xml)
    record = page_record(raw)
    assert record["kind"] == "article"
    assert record["first_sentence"].startswith("Agricultural science is a broad multidisciplinary field of biology")


def test_a_lead_without_text_still_gives_its_short_description_as_knowledge():
    """A lead that is only a list or a table trains nothing, but its {{Short description}} is the entity's
    knowledge (the official code keeps it): both the lookup path and the distributed tables take it."""
    from kilm_ray.data.corpus.articles import page_record
    from kilm_ray.data.corpus.dump import RawPage
    from kilm_ray.data.corpus.knowledge import KnowledgeLookup
    from kilm_ray.data.rows import PAGE_SCHEMA, split_pages, table

    xml = ("<page><title>List of moons</title><ns>0</ns><id>7</id><revision><text>{{Short description|Wikipedia "
           "list of natural satellites}}\n* [[Moon]]\n* [[Phobos (moon)|Phobos]]\n</text></revision></page>")
    record = page_record(RawPage("x", 0, xml))
    assert (record["kind"], record["reason"], record["short_description"]) == \
        ("skipped", "empty_text", "Wikipedia list of natural satellites")
    lookup = KnowledgeLookup()
    lookup.add_page(record)
    assert lookup.describe("List of moons") == ("Wikipedia list of natural satellites", "template", None)
    tables, _ = split_pages(table([record], PAGE_SCHEMA))
    assert tables["knowledge"].to_pylist() == [{"title": "List of moons", "short_description":
                                                "Wikipedia list of natural satellites", "first_sentence": None}]
