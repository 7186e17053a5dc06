"""The evaluation harness: metric functions, and a full evaluation of a trained tiny model on the
real data (description generation, disambiguation with its baseline, retention, QA, report)."""

import json
from pathlib import Path

import pytest

from kilm_ray.method.metrics import exact_match, normalize, rouge_l, token_f1


def test_metric_functions():
    assert normalize("The  Great, Wall!") == "great wall"
    assert exact_match("the Aristotle", "Aristotle") == 1.0 and exact_match("Plato", "Aristotle") == 0.0
    assert token_f1("greek philosopher", "an ancient greek philosopher") == pytest.approx(0.8)  # P 1, R 2/3
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0
    assert rouge_l("w x y z", "w y z") == pytest.approx(2 * 0.75 * 1.0 / 1.75)  # LCS 3
    assert rouge_l("z y x w", "w x y z") == pytest.approx(0.25)  # LCS 1 ("a" would be dropped as an article)


def test_full_evaluation_and_report(trained_export, tiny_data, tiny_config, shared_data, tmp_path, capsys):
    from kilm_ray.cli import main

    qa = tmp_path / "nq-open-test.qa.csv"  # the DPR NQ-open layout: question<TAB>Python list of answers
    qa.write_text("who taught alexander the great\t['Aristotle']\nwhat is the capital of france\t['Paris', 'paris']\n"
                  "what does <ent> mean\t['a token']\n")  # a control token: skipped and counted, not a crash
    train_qa = tmp_path / "webquestions.examples.train.json"  # few-shot exemplars, in WebQuestions' layout
    train_qa.write_text(json.dumps([{"utterance": "who taught plato?", "targetValue": '(list (description Socrates))'},
                                    {"utterance": "what is the capital of italy?", "targetValue": "(list (description Rome))"},
                                    {"utterance": "who wrote the republic?", "targetValue": "(list (description Plato))"}]))
    appos = tmp_path / "appos-test.jsonl"  # ApposCorpus's layout (a row of news_gold_test/en/per)
    appos.write_text(json.dumps({"previous_sentence": [], "input": ["Aristotle", ",", "<appos>", ",", "taught", "."],
                                 "next_sentence": [], "name": "Aristotle", "target": ["a", "Greek", "philosopher"],
                                 "descriptions": "Greek philosopher"}) + "\n")
    out = tmp_path / "report"
    code = main(["eval", "--model", trained_export, "--data", tiny_data, "--report", str(out), "--qa", str(qa),
                 "--knowledge", str(shared_data / "wordnet-nouns.jsonl.gz"), "--run",
                 str(tmp_path.parent), "eval.max_samples=40", "eval.max_disambiguation_mentions=40",
                 "eval.train_recall_samples=16", "eval.max_sense_items=24", "eval.retention_max_chunks=24",
                 "eval.qa_shots=2", f"eval.qa_exemplar_file={train_qa}", "eval.qa_prompt=1", "--appos", str(appos)])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    split = metrics["split"]
    assert split["evaluated"] == "test" and split["mentions"] == 40 == split["seen"] + split["unseen"]
    assert split["seen"] > 0 and split["unseen"] > 0 and split["test_articles"] > 0 and split["articles"] > 1
    assert split["held_out_check"] == {"articles_checked": split["articles"], "samples_checked": split["chunks"],
                                       "articles_in_train": 0, "samples_in_train": 0}
    d = metrics["describe"]
    assert d["all"]["mentions"] == 40 and d["seen"]["mentions"] == split["seen"]
    assert 0 <= d["seen"]["title_exact_match"] <= 1 and 0 <= d["seen"]["copy_rule_title_exact_match"] <= 1
    low, high = d["seen"]["intervals"]["copy_rule_title_exact_match"]
    assert low <= d["seen"]["copy_rule_title_exact_match"] <= high and high - low > 0
    assert sorted(d["per_item"]["id"]) == sorted(set(d["per_item"]["id"])) and len(d["per_item"]["id"]) == 40
    assert all("<sep>" in e["gold"] for g in ("seen", "unseen") for e in d["examples"][g])
    lookup = metrics["training_lookup"]
    assert lookup["all"]["mentions"] == 40 and lookup["seen"]["title_exact_match"] > 0
    assert lookup["unseen"]["title_exact_match"] < 0.1  # a memory of training cannot name an untrained entity
    assert set(d["fraction_of_lookup"]["seen"]) == {"title_exact_match", "description_f1"}
    assert metrics["training_recall"]["all"]["mentions"] == 16
    assert metrics["appositive"]["all"]["mentions"] + sum(metrics["appositive"].get("refused", {}).values()) == 40
    senses = metrics["word_senses"]["all"]
    assert senses["mentions"] == 24 and senses["mean_candidates"] >= 2
    assert 0 <= senses["accuracy"] <= 1 and 0 < senses["random_accuracy"] < 1
    anchors = metrics["disambiguation_anchor"]
    assert "unseen" not in anchors and (anchors["seen"]["mentions"] == 0 or anchors["seen"]["mean_candidates"] >= 2)
    r = metrics["retention"]
    assert r["chunks"] == 24 == metrics["retention_train_text"]["chunks"] and r["tokens"] > 500
    assert r["intervals"]["infilling_loss"][0] <= r["infilling_loss"] <= r["intervals"]["infilling_loss"][1]
    q = metrics["qa"]
    assert (q["read"], q["questions"], q["skipped"]) == (3, 2, {"a control token in the question": 1})
    assert q["examples"][1]["answers"] == ["Paris", "paris"]
    # Few-shot as the paper: 2 exemplars by TF-IDF from the training questions (a tiny model answers nothing
    # useful: this is the plumbing, not a score).
    assert (q["shots"], q["exemplars"], q["exemplar_pool"], q["prompt_variant"]) == (2, "tfidf", 3, 1)
    assert metrics["config"]["masking"]["knowledge_slot"] is True and metrics["model_parameters"] > 0
    assert metrics["probe_form"] == "slot" and metrics["test_look"]["look"] == 1
    # The dataset's ledger counted that look; a second one must be declared (refused before any probe runs).
    again = main(["eval", "--model", trained_export, "--data", tiny_data, "--report", str(tmp_path / "again")])
    assert again == 2 and "looked at 1 time(s)" in capsys.readouterr().err and not (tmp_path / "again").exists()
    assert metrics["data_manifest"]["run_key"] and len(metrics["source"]["commit"] or "x" * 40) == 40
    report = (out / "report.md").read_text()
    assert "seen: title exact match" in report and "held-out text: infilling loss" in report
    assert "training lookup, title exact match" in report and "questions skipped" in report
    assert "### 2-shot, exemplars by tfidf from" in report and "(prompt variant 1)" in report
    assert metrics["appos_corpus"]["scored"] == 1 and "### ApposCorpus appositive generation" in report
    assert (out / "describe.png").stat().st_size > 5000


def test_tables_label_mentions_as_the_training_split_does(tiny_data, tiny_config, tmp_path):
    """On the real excerpt: the tables' seen titles and anchor targets are what a scan of the whole train
    split gives; the seeded sample with k = 0 is every test mention; the held-out check finds a train
    article when asked for one; and a dataset made before the tables gets the same tables built beside it."""
    import os
    from collections import Counter, defaultdict

    from kilm_ray.eval.select import sample_split
    from kilm_ray.data.tables import dataset_tables, surface_key, train_overlap
    from kilm_ray.store.loader import SampleStore, read_meta, split_files
    from kilm_ray.method.tokenizer import CorpusTokenizer

    manifest = read_meta(tiny_data)
    tok = CorpusTokenizer((Path(tiny_data) / manifest["tokenizer"] / "tokenizer.json").read_text())
    train = SampleStore.load(tiny_data, "train")
    counts, targets = Counter(), defaultdict(Counter)
    for i in range(len(train)):
        ids = train.ids(i)
        for ent, title in zip(train.entities(i), train.entity_titles(i)):
            counts[title] += 1
            targets[surface_key(tok.decode(ids[ent.start:ent.end].tolist()))][title] += 1
    tables = dataset_tables(tiny_data, tiny_config)
    assert tables.summary["trained_entities"] == len(counts)
    found = tables.titles_of(list(counts) + ["No Such Title"])
    assert {t: r["train_mentions"] for t, r in found.items()} == dict(counts)
    ambiguous = [s for s, c in targets.items() if len(c) > 1][:20]
    rows = tables.surfaces_of(ambiguous)
    assert ambiguous and all(rows[s]["counts"] == sorted(targets[s].values(), reverse=True)[:16] for s in ambiguous)
    test = SampleStore.load(tiny_data, "test")
    every = sample_split(split_files(tiny_data, "test"), "mentions", 5, 0, tiny_config.data.max_eval_entities,
                         tok.backend.to_str())
    assert len(every) == sum(min(len(test.entities(i)), tiny_config.data.max_eval_entities) for i in range(len(test)))
    assert len({(m["sample_id"], m["entity"]) for m in every}) == len(every)
    check = train_overlap(tiny_data, [every[0]["article"], train.article(0)], [every[0]["sample_id"]])
    assert check["articles_in_train"] == [train.article(0)] and check["samples_in_train"] == []
    # A dataset without tables (made before them): built into the node's cache with the same group-bys.
    old = tmp_path / "old"
    old.mkdir()
    os.symlink(Path(tiny_data) / "datasets", old / "datasets")
    (old / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "tables"}))
    rebuilt = dataset_tables(str(old), tiny_config)
    some = sorted(counts)[:50]
    assert rebuilt.summary == tables.summary and rebuilt.titles_of(some) == tables.titles_of(some) != {}


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
    from kilm_ray.eval.senses import read_wordnet_rows, seeded_sample, sense_items
    from kilm_ray.store.loader import SampleStore
    from kilm_ray.method.tokenizer import load_tokenizer

    items = sense_items(read_wordnet_rows(str(shared_data / "wordnet-nouns.jsonl.gz")))
    assert len(items) > 8_000
    sample = seeded_sample(items, 300, 0)
    assert sample == seeded_sample(items, 300, 0) and len({i.context for i in sample}) > 290
    from kilm_ray.store.loader import verify_tokenizer

    tokenizer = load_tokenizer(verify_tokenizer(tiny_data))
    train = SampleStore.load(tiny_data, "train")
    knowledge = " ".join(tokenizer.decode(e.knowledge) for i in range(len(train)) for e in train.entities(i)).lower()
    text = " ".join(train.text(i) for i in range(len(train))).lower()
    assert len(knowledge) > 10_000 and len(text) > 50_000
    assert not [i.context for i in sample if i.context.lower() in knowledge or i.context.lower() in text]


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
    ids = [f"{k}:0" for k in range(60)]
    for name, em in (("a", 0.6), ("b", 0.0)):
        scores = [1.0 if k < 60 * em else 0.0 for k in range(60)]
        group = {"mentions": 30, "title_exact_match": em, "description_f1": 0.5, "copy_rule_title_exact_match": 0.7,
                 "intervals": {"title_exact_match": [em - 0.1, em + 0.1]}}
        per_item = {"id": ids, "group": ["seen", "unseen"] * 30, "title_exact_match": scores,
                    "description_f1": [0.5] * 60}
        metrics = {"model": name, "split": {"evaluated": "test", "mentions": 60, "seen": 30, "unseen": 30},
                   "describe": {"all": group, "seen": group, "unseen": group, "examples": {}, "per_item": per_item},
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
    assert "| metric | KILM | infilling |" in report
    assert "| seen: title exact match | 0.600 [0.500, 0.700] | 0.000 [-0.100, 0.100] |" in report
    # The paired test on the same mentions: KILM right on 36 of 60 where the other is right on none.
    assert "| seen: title exact match | +0.600 [" in report and ": higher |" in report
    assert ("| seen: description token F1 | +0.000 [+0.000, +0.000], p 1.0000, n 30 in 30 articles: no difference "
            "claimed |") in report
    # The model as a fraction of the training lookup: seen entities only (no memory of training names an
    # unseen one: a ratio to ~0 means nothing).
    assert "| seen: title exact match as a fraction of the lookup's |" in report
    assert "unseen: title exact match as a fraction" not in report
    from kilm_ray.eval.report import _shown_path

    assert _shown_path("s3://kilm/qa.jsonl") == "s3://kilm/qa.jsonl" and _shown_path("/elsewhere/q.tsv") == "/elsewhere/q.tsv"
    first = doc.read_text()
    assert first.startswith("# Experiments\n\nNarrative stays.") and "| seen: title exact match | 0.600" in first
    assert main(args) == 0 and doc.read_text() == first  # regenerated in place, not appended twice
    assert main(["compare", "--metrics", *paths, "--labels", "one", "--out", str(tmp_path / "r")]) == 2
    # Configs are chosen on valid: --selection puts the valid figures beside the test ones, model by model.
    assert main(["compare", "--metrics", *paths, "--labels", "KILM", "infilling", "--out", str(tmp_path / "s"),
                 "--selection", *paths]) == 0
    selected = (tmp_path / "s" / "report.md").read_text()
    assert "### Valid split: the split configs are chosen on" in selected
    assert "| valid split (selection) | KILM | infilling |" in selected
    assert main(["compare", "--metrics", *paths, "--labels", "KILM", "infilling", "--out", str(tmp_path / "s"),
                 "--selection", paths[0]]) == 2
