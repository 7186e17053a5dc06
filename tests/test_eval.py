"""The evaluation harness: metric functions, and a full evaluation of a trained tiny model on the
real data (description generation, disambiguation with its baseline, retention, QA, report)."""

import json

import pytest

from kilm_ray.eval.metrics import exact_match, normalize, rouge_l, token_f1


def test_metric_functions():
    assert normalize("The  Great, Wall!") == "great wall"
    assert exact_match("the Aristotle", "Aristotle") == 1.0 and exact_match("Plato", "Aristotle") == 0.0
    assert token_f1("greek philosopher", "an ancient greek philosopher") == pytest.approx(0.8)  # P 1, R 2/3
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0
    assert rouge_l("w x y z", "w y z") == pytest.approx(2 * 0.75 * 1.0 / 1.75)  # LCS 3
    assert rouge_l("z y x w", "w x y z") == pytest.approx(0.25)  # LCS 1 ("a" would be dropped as an article)


def test_full_evaluation_and_report(trained_export, tiny_data, tiny_config, shared_data, tmp_path):
    from kilm_ray.cli import main

    qa = tmp_path / "nq-open-test.qa.csv"  # the DPR NQ-open layout: question<TAB>Python list of answers
    qa.write_text("who taught alexander the great\t['Aristotle']\nwhat is the capital of france\t['Paris', 'paris']\n")
    out = tmp_path / "report"
    code = main(["eval", "--model", trained_export, "--data", tiny_data, "--report", str(out), "--qa", str(qa),
                 "--knowledge", str(shared_data / "wordnet-nouns.jsonl.gz"), "--run",
                 str(tmp_path.parent), "eval.max_samples=40", "eval.max_disambiguation_mentions=40",
                 "eval.train_recall_samples=16", "eval.max_sense_items=24"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    split = metrics["split"]
    assert split["evaluated"] == "test" and split["mentions"] == 40 == split["seen"] + split["unseen"]
    assert split["seen"] > 0 and split["unseen"] > 0 and split["test_articles"] > 0
    d = metrics["describe"]
    assert d["all"]["mentions"] == 40 and d["seen"]["mentions"] == split["seen"]
    assert 0 <= d["seen"]["title_exact_match"] <= 1 and 0 <= d["seen"]["copy_rule_title_exact_match"] <= 1
    assert all("<sep>" in e["gold"] for g in ("seen", "unseen") for e in d["examples"][g])
    assert metrics["training_recall"]["all"]["mentions"] == 16
    assert metrics["appositive"]["all"]["mentions"] + sum(metrics["appositive"]["refused"].values()) == 40
    senses = metrics["word_senses"]["all"]
    assert senses["mentions"] == 24 and senses["mean_candidates"] >= 2 and senses["gold_among_candidates"] == 1.0
    assert 0 <= senses["accuracy"] <= 1 and 0 < senses["random_accuracy"] < 1
    anchors = metrics["disambiguation_anchor"]["all"]
    assert anchors["mentions"] == 0 or anchors["mean_candidates"] >= 2
    r = metrics["retention"]
    assert r["tokens"] > 500 and r["infilling_loss"] > 0 and r["perplexity"] > 1
    assert metrics["qa"]["questions"] == 2 and metrics["qa"]["examples"][1]["answers"] == ["Paris", "paris"]
    assert metrics["config"]["masking"]["knowledge_slot"] is True and metrics["model_parameters"] > 0
    assert metrics["data_manifest"]["run_key"] and len(metrics["source"]["commit"] or "x" * 40) == 40
    report = (out / "report.md").read_text()
    assert "seen: title exact match" in report and "held-out text: infilling loss" in report
    assert (out / "describe.png").stat().st_size > 5000


def test_split_is_held_out_and_mentions_labelled_on_real_excerpt(tiny_data):
    """No evaluated sample id or article is in train; a mention is 'seen' exactly when a training
    chunk links its entity with knowledge."""
    from kilm_ray.eval.split import iter_mentions, split_invariants, trained_titles
    from kilm_ray.loader import SampleStore

    stores = {s: SampleStore.load(tiny_data, s) for s in ("train", "valid", "test")}
    counts = split_invariants(stores)
    assert counts["test_samples"] > 0 and counts["valid_samples"] > 0 and counts["train_samples"] > 100
    train_ids = {stores["train"].sample_id(i) for i in range(len(stores["train"]))}
    trained = trained_titles(stores["train"])
    train_titles = {t for i in range(len(stores["train"])) for t in stores["train"].entity_titles(i)}
    mentions = list(iter_mentions(stores["test"], "test", lambda ids: str(list(ids)), 10**6, trained))
    assert mentions and all(m.sample_id not in train_ids for m in mentions)
    assert all(m.seen == (m.title in train_titles) for m in mentions)
    assert {m.group for m in mentions} == {"seen", "unseen"}
    # A broken split is caught: a training chunk in the evaluated split.
    with pytest.raises(AssertionError, match="not held out"):
        split_invariants({"train": stores["train"], "test": stores["train"]})


def test_sense_items_from_usage_examples():
    from kilm_ray.eval.senses import find_word, most_frequent_sense_accuracy, random_accuracy, sense_items, usage_examples

    rows = [("bank", 1, 'sloping land; "they pulled the canoe up on the bank"'),
            ("bank", 2, 'a financial institution; "he cashed a check at the bank"; "banks lend money"'),
            ("bank", 3, "a long ridge"), ("solo", 1, 'a single thing; "a solo for once"')]
    assert usage_examples(rows[1][2]) == ["he cashed a check at the bank", "banks lend money"]
    assert find_word("Banks lend money", "bank") == (0, 5) and find_word("embankment", "bank") is None
    items = sense_items(rows)
    assert [(i.gold, i.mention, i.senses) for i in items] == [
        (0, "bank", ("sloping land", "a financial institution", "a long ridge")),
        (1, "bank", ("sloping land", "a financial institution", "a long ridge")),
        (1, "banks", ("sloping land", "a financial institution", "a long ridge"))]  # 'solo' has one sense
    assert items[1].left == "he cashed a check at the " and items[1].right == ""
    assert most_frequent_sense_accuracy(items) == pytest.approx(1 / 3) and random_accuracy(items) == pytest.approx(1 / 3)


def test_usage_examples_stay_out_of_training_data(tiny_data, shared_data):
    """The word-sense probe's contexts are in neither the knowledge strings nor the training text."""
    from kilm_ray.eval.harness import read_wordnet_rows
    from kilm_ray.eval.senses import seeded_sample, sense_items
    from kilm_ray.loader import SampleStore
    from kilm_ray.tokenizer import load_tokenizer

    items = sense_items(read_wordnet_rows(str(shared_data / "wordnet-nouns.jsonl.gz")))
    assert len(items) > 8_000
    sample = seeded_sample(items, 300, 0)
    assert sample == seeded_sample(items, 300, 0) and len({i.context for i in sample}) > 290
    tokenizer = load_tokenizer(f"{tiny_data}/tokenizer")
    train = SampleStore.load(tiny_data, "train")
    knowledge = " ".join(tokenizer.decode(e.knowledge) for i in range(len(train)) for e in train.entities(i)).lower()
    text = " ".join(train.text(i) for i in range(len(train))).lower()
    assert len(knowledge) > 10_000 and len(text) > 50_000
    assert not [i.context for i in sample if i.context.lower() in knowledge or i.context.lower() in text]


def test_qa_files_as_published(tmp_path):
    from kilm_ray.eval.harness import parse_qa_text, read_qa_file

    dpr = "who wrote the iliad\t['Homer']\nwhen did the war end\t[\"1865\", 'April 9, 1865']\n"
    assert parse_qa_text(dpr) == [("who wrote the iliad", ["Homer"]), ("when did the war end", ["1865", "April 9, 1865"])]
    assert parse_qa_text("q one\tA\tB\n\nq two\tC\n") == [("q one", ["A", "B"]), ("q two", ["C"])]
    js = json.dumps([{"question": "q1", "answers": ["a", "b"]}, {"question": "q2", "answer": "c"}, ["q3", ["d"]]])
    assert parse_qa_text(js) == [("q1", ["a", "b"]), ("q2", ["c"]), ("q3", ["d"])]
    bad = tmp_path / "qa.tsv"
    bad.write_text("fine question\t['answer']\nno answer here\n")
    with pytest.raises(ValueError, match=r"qa.tsv:2: expected question<TAB>"):
        read_qa_file(str(bad))
    with pytest.raises(ValueError, match=r"qa.tsv:1: the answers .* not a Python list literal"):
        parse_qa_text("q\t['unclosed\n", "qa.tsv")
    with pytest.raises(ValueError, match=r"item 1: expected a question and a non-empty list"):
        parse_qa_text(json.dumps([["q", ["a"]], {"question": "q2", "answers": []}]))


def test_retention_at_matched_training_loss():
    from kilm_ray.eval.report import matched_retention

    curves = {"kilm": [(6.0, 7.0), (4.0, 6.0), (3.0, 5.5)],  # reaches 3.0; at 3.5: halfway 6.0 -> 5.5
              "baseline": [(5.0, 6.5), (3.5, 6.2), (1.0, 7.0)]}
    matched = matched_retention(curves)
    assert matched["train_text_loss"] == 3.0
    assert matched["heldout_text_loss"]["kilm"] == pytest.approx(5.5)
    assert matched["heldout_text_loss"]["baseline"] == pytest.approx(6.2 + (0.5 / 2.5) * 0.8)


def test_compare_report_side_by_side(tmp_path):
    from kilm_ray.cli import main

    paths = []
    for name, em in (("a", 0.6), ("b", 0.0)):
        group = {"mentions": 3, "title_exact_match": em, "description_f1": 0.5, "copy_rule_title_exact_match": 0.7}
        metrics = {"model": name, "split": {"evaluated": "test", "mentions": 6, "seen": 3, "unseen": 3},
                   "describe": {"all": group, "seen": group, "unseen": group, "examples": {}},
                   "retention": {"infilling_loss": 3.0 + em, "perplexity": 20.0}}
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(metrics))
        paths.append(str(path))
    doc = tmp_path / "EXPERIMENTS.md"
    doc.write_text("# Experiments\n\nNarrative stays.\n")
    args = ["compare", "--metrics", *paths, "--labels", "KILM", "infilling", "--out", str(tmp_path / "r"),
            "--into", str(doc)]
    assert main(args) == 0
    report = (tmp_path / "r" / "report.md").read_text()
    assert "| metric | KILM | infilling |" in report and "| seen: title exact match | 0.600 | 0.000 |" in report
    first = doc.read_text()
    assert first.startswith("# Experiments\n\nNarrative stays.") and "| seen: title exact match | 0.600 |" in first
    assert main(args) == 0 and doc.read_text() == first  # regenerated in place, not appended twice
    assert main(["compare", "--metrics", *paths, "--labels", "one", "--out", str(tmp_path / "r")]) == 2
