"""The pure parts of preprocessing on a cluster (no Ray): byte ranges of large files, where output may go,
what is planned for, which links carry knowledge, and how BART's pretrained tokenizer sees a mention."""

from __future__ import annotations

import bz2
import gzip
import random

import pytest

from kilm_ray import storage
from kilm_ray.data.corpus.dump import ReadUnit
from kilm_ray.data.corpus.knowledge import KnowledgeLookup
from kilm_ray.data.corpus.ranges import TextRange, iter_range_lines, plan_ranges
from kilm_ray.data.corpus.wikitext import ENWIKI, SiteNamespaces, is_disambiguation, parse_article
from kilm_ray.data.plan import check_shared_storage, unsplittable_warnings
from kilm_ray.data.shuffle import planned_cpus

from conftest import GPT2_BPE


def _text(lines: int, seed: int = 0) -> tuple[list[str], bytes]:
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghij klmnop") for _ in range(rng.randint(1, 12))) for _ in range(3000)]
    out = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 120))) for _ in range(lines)]
    return out, ("\n".join(out) + "\n").encode()


@pytest.mark.parametrize("name, compress", [
    ("kb.jsonl", lambda b: b),
    ("kb.jsonl.bz2", lambda b: bz2.compress(b, 1)),  # one stream of ~100 kB blocks, cut at bit offsets
    ("kb-multi.jsonl.bz2", lambda b: bz2.compress(b[:300_001], 1) + bz2.compress(b[300_001:], 2)),
    ("kb.jsonl.gz", gzip.compress),  # not splittable: one range
])
def test_byte_ranges_give_every_line_once(tmp_path, name, compress):
    lines, data = _text(4000)
    path = tmp_path / name
    path.write_bytes(compress(data))
    size = path.stat().st_size
    for unit in (7_000, 33_333, size):
        ranges = plan_ranges(str(path), size, unit)
        assert (len(ranges) == 1) == (name.endswith(".gz") or unit >= size)
        assert [line for r in ranges for line in iter_range_lines(r)] == lines, (name, unit)
    # Ranges that cut through every kind of line end, empty lines and a last line without newline.
    tiny = tmp_path / "tiny.txt"
    for body in (b"a\n\nbb\nccc", b"\n\n\n", b"abc\n", b"x"):
        tiny.write_bytes(body)
        expected = body.decode().split("\n")[:-1] if body.endswith(b"\n") else body.decode().split("\n")
        for unit in range(1, len(body) + 1):
            assert [l for r in plan_ranges(str(tiny), len(body), unit) for l in iter_range_lines(r)] == expected
    assert TextRange("f", 10, 5, 2).where(3) == "f@10:+3" and TextRange("f").where(3) == "f:3"


def test_a_local_path_on_a_cluster_of_several_nodes_is_refused_unless_declared_shared(tmp_path):
    out = str(tmp_path / "out")
    check_shared_storage([("--out", out)], nodes=1, autoscaling=False, shared=[])  # one machine: fine
    with pytest.raises(storage.InputError, match=r"--out .* is a local path, but this Ray cluster has 3 nodes.*"
                                                 r"corpus.shared_paths=\["):
        check_shared_storage([("--out", out)], nodes=3, autoscaling=False, shared=[])
    with pytest.raises(storage.InputError, match="autoscaling enabled"):
        check_shared_storage([("--dump", "/data/x.bz2")], nodes=1, autoscaling=True, shared=["/mnt/efs"])
    check_shared_storage([("--out", "s3://b/x"), ("--out", out)], nodes=3, autoscaling=True, shared=[str(tmp_path)])
    with pytest.raises(storage.InputError):  # a prefix of the name is not a parent directory
        check_shared_storage([("--out", str(tmp_path) + "-other")], nodes=2, autoscaling=False, shared=[str(tmp_path)])


def test_plans_for_the_configured_maximum_and_warns_about_inputs_that_cannot_be_split():
    assert planned_cpus(present=16, configured_max=16 + 8 * 36) == 304  # spot CPU nodes not there yet
    assert planned_cpus(present=4, configured_max=None) == 4 and planned_cpus(4, 304, override=64) == 64
    mb = 2**20
    whole = [ReadUnit("enwiki-pages-articles.xml.bz2")]
    ranges = [ReadUnit("enwiki-multistream.xml.bz2", 0, 64 * mb), ReadUnit("enwiki-multistream.xml.bz2", 64 * mb, 9)]
    warnings = unsplittable_warnings([("enwiki-pages-articles.xml.bz2", 23_000 * mb)], whole, 64 * mb,
                                     [("kb.jsonl.gz", 500 * mb), ("kb.jsonl.bz2", 500 * mb)], 64 * mb)
    assert len(warnings) == 2 and "multistream" in warnings[0] and "gzip cannot be split" in warnings[1]
    assert not unsplittable_warnings([("enwiki-multistream.xml.bz2", 23_000 * mb)], ranges, 64 * mb, [], 64 * mb)


def test_links_other_namespaces_and_wikis_keep_their_text_and_disambiguation_pages_carry_no_knowledge():
    text = ("'''X''' is in [[CSI: Miami]], see [[wikt:gallant|gallant]] and [[:Category:Heroes|heroes]], "
            "[[:fr:Paris|Paris]] and [[Wikipedia:Manual|the manual]].[[fr:X]][[Category:Y]] "
            "[[File:a.jpg|thumb|a caption]]")
    paragraph = parse_article(text).paragraphs[0]
    assert paragraph.text == "X is in CSI: Miami, see gallant and heroes, Paris and the manual."
    assert [(paragraph.text[l.start:l.end], l.target) for l in paragraph.links] == [("CSI: Miami", "CSI: Miami")]
    # Namespaces come from the dump's <siteinfo>: German ones here.
    german = SiteNamespaces.from_siteinfo('<siteinfo><namespaces><namespace key="6" case="first-letter">Datei'
                                          '</namespace><namespace key="14" case="first-letter">Kategorie</namespace>'
                                          '</namespaces></siteinfo>')
    article = parse_article("[[Datei:a.jpg|mini|Bild]][[Kategorie:Stadt]]Berlin ist eine [[Stadt]].", "lead", german)
    assert [p.text for p in article.paragraphs] == ["Berlin ist eine Stadt."]
    assert ENWIKI.link_kind("Category:X") == "drop" and german.link_kind("Category:X") == "article"
    for title, wikitext in [("Austin (disambiguation)", "x"), ("Mercury", "x\n{{disambiguation}}"),
                            ("Smith", "{{hndis|Smith}}"), ("Springfield", "{{Place name disambiguation}}"),
                            ("Foo", "x __DISAMBIG__")]:
        assert is_disambiguation(title, wikitext), title
    assert not is_disambiguation("Paris", "{{about|the city|other uses|Paris (disambiguation)}}{{Disambiguation needed}}")
    lookup = KnowledgeLookup(redirects={"Mercury (disambig)": "Mercury"}, template={"Venus": "a planet"},
                             external={("name", "mercury", ""): "a planet",
                                       ("name", "aberdeen (disambiguation)", ""): "x"},
                             disambiguation={"Mercury"})
    assert lookup.describe(lookup.resolve("Mercury (disambig)")) is None
    assert lookup.describe("Aberdeen (disambiguation)") is None
    assert lookup.describe("Venus") == ("a planet", "template", None)


def test_bart_pretrained_tokenizer_sees_a_paragraph_opening_mention_as_its_title():
    """As the official KILM code (add_prefix_space=True for BART): "Aristotle" opening a paragraph and the
    " Aristotle" of its knowledge are the same token; the newline between paragraphs stays one token."""
    from kilm_ray.method.chunking import knowledge_ids, newline_ids
    from kilm_ray.config import load_config
    from kilm_ray.data.vocab import add_prefix_space, build_tokenizer
    from kilm_ray.method.tokenizer import CorpusTokenizer

    cfg = load_config(None, [f"tokenizer.source=gpt2-bpe:{GPT2_BPE}"])
    assert add_prefix_space(cfg) and not add_prefix_space(load_config(None, []))
    tokenizer = CorpusTokenizer(build_tokenizer(cfg, lambda: []).backend_tokenizer.to_str())
    ids, offsets = tokenizer.encode("Aristotle was a philosopher.")
    title = knowledge_ids(tokenizer.encode, "Aristotle", "a philosopher", tokenizer.token_id("<sep>"), 32)
    assert ids[0] == title[0] and len(tokenizer.encode(" Aristotle")[0]) == 1 and offsets[0] == (0, 9)
    assert newline_ids(tokenizer.encode) == [198]  # "\n" alone, not " \n"
    plain = load_config(None, [f"tokenizer.source=gpt2-bpe:{GPT2_BPE}", "tokenizer.add_prefix_space=false"])
    bare = CorpusTokenizer(build_tokenizer(plain, lambda: []).backend_tokenizer.to_str())
    assert bare.encode("Aristotle was")[0][0] != title[0]  # what the official code did not do


def test_multistream_index_offsets_are_read_once_per_index_version(tmp_path, monkeypatch):
    """A plan (a resume's included) reads the stream offsets of a multistream index from the node cache
    while the index is unchanged; a changed index (size, time) is read again."""
    import os

    from kilm_ray.data.corpus import dump as dump_module

    monkeypatch.setenv("KILM_RAY_CACHE", str(tmp_path / "cache"))
    pages = [f"<page><title>P{i}</title><ns>0</ns><id>{i + 1}</id><revision><text>body {i}</text></revision></page>\n"
             for i in range(30)]
    path = dump_module.write_multistream(pages, str(tmp_path / "x-multistream.xml.bz2"), pages_per_stream=5)
    first = dump_module.read_units([path], unit_bytes=1)
    assert len(first) == 6  # one range per stream of 5 pages (the last runs on through the footer)

    def no_reading(uri):
        raise AssertionError("the index was read again")

    monkeypatch.setattr(dump_module, "_index_lines", no_reading)
    assert dump_module.read_units([path], unit_bytes=1) == first
    monkeypatch.undo()
    monkeypatch.setenv("KILM_RAY_CACHE", str(tmp_path / "cache"))
    dump_module.write_multistream(pages, path, pages_per_stream=10)  # another index under the same name
    index = path[: -len(".xml.bz2")] + "-index.txt.bz2"
    os.utime(index, ns=(10**18, 10**18))
    assert len(dump_module.read_units([path], unit_bytes=1)) == 3
