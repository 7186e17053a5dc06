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

    qa = tmp_path / "qa.tsv"
    qa.write_text("Who taught Alexander the Great\tAristotle\nWhat is the capital of France?\tParis\tparis\n")
    out = tmp_path / "report"
    code = main(["eval", "--model", trained_export, "--data", tiny_data, "--report", str(out), "--qa", str(qa),
                 "--knowledge", str(shared_data / "wordnet-nouns.jsonl.gz"), "--run",
                 str(tmp_path.parent), "eval.max_samples=40", "eval.max_disambiguation_mentions=40"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for split in ("valid_seen", "valid_unseen"):
        d = metrics[f"describe_{split}"]
        assert d["samples"] == 40 and 0 <= d["title_exact_match"] <= 1 and len(d["examples"]) == 8
        assert all("<sep>" in e["gold"] for e in d["examples"])
    for name in ("disambiguation_anchor", "disambiguation_wordnet"):
        d = metrics[name]
        assert d["mentions"] > 0 and d["mean_candidates"] >= 2
        assert 0 <= d["accuracy"] <= 1 and 0 <= d["most_frequent_baseline"] <= 1
    r = metrics["retention"]
    assert r["tokens"] > 1000 and r["infilling_loss"] > 0 and r["perplexity"] > 1
    assert metrics["qa"]["questions"] == 2 and len(metrics["qa"]["examples"]) == 2
    report = (out / "report.md").read_text()
    assert "| valid_seen title_exact_match |" in report and "retention infilling loss" in report
    assert (out / "describe.png").stat().st_size > 5000


def test_bad_qa_file_names_the_line(tmp_path):
    from kilm_ray.eval.harness import read_qa_file

    bad = tmp_path / "qa.tsv"
    bad.write_text("fine question\tanswer\nno answer here\n")
    with pytest.raises(ValueError, match=r"qa.tsv:2: expected question<TAB>answer"):
        read_qa_file(str(bad))


def test_compare_report_side_by_side(tmp_path):
    from kilm_ray.cli import main

    paths = []
    for name, em in (("a", 0.6), ("b", 0.0)):
        metrics = {"model": name, "describe_valid_seen": {"samples": 3, "title_exact_match": em, "description_f1": 0.5,
                                                          "description_rouge_l": 0.4, "examples": []},
                   "retention": {"infilling_loss": 3.0 + em, "perplexity": 20.0}}
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(metrics))
        paths.append(str(path))
    assert main(["compare", "--metrics", *paths, "--labels", "KILM", "infilling", "--out", str(tmp_path / "r")]) == 0
    report = (tmp_path / "r" / "report.md").read_text()
    assert "| metric | KILM | infilling |" in report and "| valid_seen title_exact_match | 0.6000 | 0.0000 |" in report
    assert main(["compare", "--metrics", *paths, "--labels", "one", "--out", str(tmp_path / "r")]) == 2
