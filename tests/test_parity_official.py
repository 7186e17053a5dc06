"""The comparison functions of scripts/parity_official.py on hand-made strings (the script itself needs the
official checkout and spaCy and runs outside the suite). No Ray, no network, no model."""

import importlib.util
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("parity_official", REPO / "scripts" / "parity_official.py")
parity = importlib.util.module_from_spec(_spec)
sys.modules["parity_official"] = parity  # dataclasses look their module up
_spec.loader.exec_module(parity)

G = parity.SPACE


def test_the_script_imports_nothing_heavy_at_module_level():
    for heavy in ("torch", "transformers", "spacy", "ray", "kilm_ray.method.masking"):
        assert heavy not in vars(parity), heavy


def test_lead_drop_reasons_follow_filter_para_order():
    assert parity.official_lead_drop_reason("") == "empty"
    assert parity.official_lead_drop_reason("REDIRECT Al Gore") == "starts with redirect"
    assert parity.official_lead_drop_reason("See http://x and File:y.png") == "contains File:, http:"
    text = "a" * 150 + "\n\n" + "b" * 48  # 2 newlines in 200 characters: rate 0.01, dropped
    assert parity.official_lead_drop_reason(text).startswith("newline rate 0.010")
    assert parity.official_lead_drop_reason("a" * 300 + "\n" + "b" * 99) is None  # 1 in 400
    assert parity.official_lead_drop_reason("Flew [[1950 in aviation|1950]].") == "in aviation link"
    assert parity.official_lead_drop_reason("Alabama is a state.") is None


def test_knowledge_kinds():
    assert parity.knowledge_diff("A  state.", "A state. ") is None
    assert parity.knowledge_diff("A state.", None) == "knowledge_only_official"
    assert parity.knowledge_diff(None, "A state.") == "knowledge_only_ours"
    assert parity.knowledge_diff("Aardvark ( ; Orycteropus) is", "Aardvark (Orycteropus) is") == "knowledge_spacing"
    assert parity.knowledge_diff("A Chinese abacus", "The abacus is a tool.", "thumb|A Chinese abacus") == \
        "knowledge_caption"
    assert parity.knowledge_diff("A Chinese abacus", "The abacus is a tool.") == "knowledge_text"


def test_text_helpers():
    assert parity.blank_lines("one\n\ntwo\n \nthree\n") == 2
    assert parity.blank_lines("one\ntwo") == 0
    assert parity.unlink("the [[U.S. state|state]] of [[Alabama]]") == "the state of Alabama"
    assert parity.word_similarity("a b c d", "a b c d") == 1.0
    assert parity.word_similarity("a b c d", "w x y z") == 0.0


def test_link_targets_as_the_official_code_keys_them():
    assert parity.link_target("state (polity)|state") == "State (polity)"
    assert parity.link_target("Georgia_(U.S. state)#History|Georgia") == "Georgia (U.S. state)"
    assert parity.link_target("#History") == "#History"  # an anchor alone keeps its text, as ent.split("#")
    assert parity.wikilinks("[[a]] and [[a|A]], [[b c|x]]") == Counter({"A": 2, "B c": 1})
    only_official, only_ours = parity.counter_diff(Counter({"A": 2, "B": 1}), Counter({"A": 1, "C": 1}))
    assert only_official == Counter({"A": 1, "B": 1}) and only_ours == Counter({"C": 1})


def test_space_tokens_around_markers():
    official = ["<s>", f"{G}the", G, "<ent>", f"{G}Mercury", "</ent>", "<ent_desc>", "<mask>", "</ent_desc>",
                f"{G},", "</s>"]
    ours = ["<s>", f"{G}the", "<ent>", f"{G}Mercury", "</ent>", "<ent_desc>", "<mask>", "</ent_desc>", ",", "</s>"]
    assert parity.lone_space_before(official, "<ent>") == 1
    assert parity.lone_space_before(ours, "<ent>") == 0
    assert parity.space_added_after(official, "</ent_desc>", ", and")
    assert not parity.space_added_after(ours, "</ent_desc>", ", and")
    assert not parity.space_added_after(official, "</ent_desc>", " and")  # the text had that space
    assert not parity.space_added_after(["<s>", "x"], "</ent_desc>", "")
    assert parity.sample_checks(official, "<s> the ", "Mercury</ent>", ",</s>", True, True) == \
        ["space_before_ent", "space_after_ent_desc"]
    assert parity.sample_checks(ours, " the", " Mercury", ",", True, True) == []
    # "three-<ent>astronaut": the mention's first token gained a space; at a text's start it did not
    hyphen = ["<s>", f"{G}three", "-", "<ent>", f"{G}astronaut", "</ent>"]
    assert parity.sample_checks(hyphen, "<s> three-", "astronaut</ent>", "", True, None) == ["space_in_mention"]
    start = ["<s>", "<ent>", f"{G}Mercury", "</ent>"]
    assert parity.sample_checks(start, "<s>", "Mercury</ent>", "", True, None) == []
    assert parity.sample_checks(start, "<s>", "Mercury", "", False, False) == ["eos_cut", "knowledge_cut"]


def test_sequence_ends_and_ratios():
    assert parity.ends_with([0, 5, 2, 1, 1], 2, 1)
    assert not parity.ends_with([0, 5, 7, 1], 2, 1)
    assert not parity.ends_with([1, 1], 2, 1)
    assert parity.realised_ratio(200, 150) == 0.25
    assert parity.realised_ratio(0, 0) == 0.0


def test_summary_counts_samples_by_split_and_entities():
    D = parity.Diff
    diffs = [D("Alabama", "blank_lines", "2 empty lines", "3 paragraphs"),
             D("Alabama", "space_before_ent", "1 of 1", "0 of 1", n=1, split="evaluation"),
             D("Alabama", "space_before_ent", "10 of 10", "0 of 10", n=10, split="training"),
             D("Angola", "space_before_ent", "2 of 2", "0 of 2", n=2, split="evaluation")]
    summary = parity.summarize(diffs)
    assert list(summary) == list(parity.KINDS)
    assert summary["space_before_ent"] == (3, 10, 2)
    assert summary["blank_lines"] == (1, 0, 1)
    assert summary["eos_cut"] == (0, 0, 0)
    lines = parity.format_summary(summary)
    assert any(line.split()[:4] == ["space_before_ent", "3", "10", "2"] for line in lines)
    report = parity.format_by_entity(diffs)
    assert report[0] == "== Alabama" and "== Angola" in report
    assert report[1].split()[0] == "blank_lines"  # KINDS order within an entity
    assert "space_before_ent (training)" in report[5]
