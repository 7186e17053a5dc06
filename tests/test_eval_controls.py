"""The evaluation's controls as pure functions: bootstrap intervals and paired tests, the seeded sample,
the tables' group-by rows, the training lookup, what counts as a title the mention does not give, the
data-matched baseline's plain-text probe, and question files as published. No Ray, no model."""

import gzip
import json

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kilm_ray.method.metrics import same_up_to_inflection
from kilm_ray.eval.stats import claim, interval, paired_test, ratio_interval


def test_bootstrap_interval_covers_the_mean_and_narrows_with_more_items():
    rng = np.random.default_rng(0)
    small, large = rng.binomial(1, 0.6, 50).astype(float), rng.binomial(1, 0.6, 2000).astype(float)
    a, b = interval(small, seed=1), interval(large, seed=1)
    assert a["low"] < a["mean"] < a["high"] and b["low"] < b["mean"] < b["high"]
    assert (b["high"] - b["low"]) < (a["high"] - a["low"]) / 4  # ~ 1/sqrt(n): 40x the items, ~6x narrower
    assert abs((b["high"] - b["low"]) - 2 * 1.96 * np.sqrt(0.24 / 2000)) < 0.01  # the normal approximation
    assert interval(small, seed=1) == a  # seeded: a regenerated report prints the same interval
    assert interval([], seed=1)["n"] == 0 and interval([0.5])["low"] == 0.5


def test_paired_test_sees_a_consistent_small_difference_that_unpaired_intervals_hide():
    rng = np.random.default_rng(3)
    base = rng.uniform(0, 1, 400)
    a, b = base + 0.02, base  # every item 0.02 better: invisible next to the spread, plain when paired
    test = paired_test(a, b, seed=0)
    assert test["difference"] == pytest.approx(0.02) and test["low"] > 0 and test["p_value"] < 0.001
    # The rule of the report: no claim where the intervals overlap, whatever the paired test says.
    assert claim(interval(a), interval(b), test) == "no difference claimed"
    far = base + 0.5
    assert claim(interval(far), interval(b), paired_test(far, b)) == "higher"
    noise = paired_test(base + rng.normal(0, 0.05, 400), base, seed=0)
    assert noise["p_value"] > 0.05 and noise["low"] < 0 < noise["high"]
    with pytest.raises(ValueError, match="same items"):
        paired_test([1.0, 2.0], [1.0])


def test_ratio_interval_is_a_ratio_of_sums_over_items():
    loss, tokens = [10.0, 30.0, 20.0], [5, 10, 5]
    r = ratio_interval(loss, tokens, seed=0)
    assert r["ratio"] == pytest.approx(60 / 20) and r["low"] <= 3.0 <= r["high"]
    frac = ratio_interval([1, 0, 1, 1], [1, 1, 1, 1])  # a model's EM over the lookup's, same mentions
    assert frac["ratio"] == 0.75


def test_inflections_are_not_titles_the_mention_does_not_give():
    assert same_up_to_inflection("consonants", "consonant") and same_up_to_inflection("Cities", "city")
    assert same_up_to_inflection("Aristotle's", "Aristotle") and same_up_to_inflection("the Greeks", "Greek")
    assert not same_up_to_inflection("Hebrew", "Hebrew alphabet")
    assert not same_up_to_inflection("Civil War", "American Civil War") and not same_up_to_inflection("cat", "cut")


def test_seeded_sample_is_bottom_k_of_keyed_hashes_across_articles():
    from kilm_ray.eval.select import bottom_k, mention_candidates, mention_key, shards_holding

    table = pa.table({"sample_id": list(range(100)), "article": [f"A{i // 10}" for i in range(100)],
                      "input_ids": [[5, 6, 7, 8]] * 100, "ent_start": [[0, 2]] * 100, "ent_end": [[1, 3]] * 100,
                      "ent_title": [["T0", "T1"]] * 100})
    picked = mention_candidates(table, 7, 10, 20, lambda ids: "w" + "".join(map(str, ids)))
    keys = sorted(mention_key(7, s, j) for s in range(100) for j in range(2))
    assert [p["key"] for p in picked] == keys[:20]  # exactly the 20 smallest keys of all 200 mentions
    assert len({p["article"] for p in picked}) >= 6  # spread over the articles, not the first sample ids
    assert picked[0]["surface"] == ("w5" if picked[0]["entity"] == 0 else "w7")
    # Merging per-task samples gives the global sample, whatever the cut into tasks.
    halves = [mention_candidates(table.slice(0, 50), 7, 10, 20, str), mention_candidates(table.slice(50), 7, 10, 20, str)]
    assert [r["key"] for r in bottom_k(halves[0] + halves[1], 20)] == keys[:20]
    assert len(mention_candidates(table, 7, 1, 0, str)) == 100  # k = 0: all; max_entities 1: the first per chunk
    assert mention_candidates(table, 8, 10, 20, str) != picked  # another seed, another sample
    entries = [{"path": "a", "min_sample_id": 0, "max_sample_id": 9}, {"path": "b", "min_sample_id": 10,
                                                                        "max_sample_id": 19}]
    assert [e["path"] for e in shards_holding(entries, [12, 30])] == ["b"]


def _entity_batch():
    return pa.table({
        "sample_id": [1, 2, 3], "article": ["Alpha", "Alpha", "Beta"],
        "input_ids": [[10, 11, 12], [10, 13], [14, 10]], "ent_start": [[0, 2], [0], [1]], "ent_end": [[1, 3], [1], [2]],
        "ent_title": [["Vowel", "Letter (alphabet)"], ["Vowel"], ["Vowel"]],
        "ent_source": [["external", "first_sentence"], ["external"], ["external"]],
        "ent_knowledge": [[[1, 2], [3, 4]], [[1, 9]], [[5, 2]]]})


def test_tables_group_rows_titles_surfaces_and_first_sentence_exposure():
    from kilm_ray.data.tables import entity_rows, surface_rows, title_rows, title_summary

    words = {10: "vowel", 11: "x", 12: "letters", 13: "y", 14: "z"}
    train = entity_rows(_entity_batch(), "train", lambda ids: " ".join(words[i] for i in ids))
    held = entity_rows(pa.table({"sample_id": [50, 51], "article": ["Letter (alphabet)", "Gamma"]}), "test", str)
    rows = pa.concat_tables([train, held])
    titles = {r["title"]: r for r in title_rows(rows).to_pylist()}
    assert titles["Vowel"]["train_mentions"] == 3 and titles["Vowel"]["knowledge"] == [1, 2]  # the first mention's
    assert titles["Letter (alphabet)"] == {"title": "Letter (alphabet)", "train_mentions": 1, "source": "first_sentence",
                                           "knowledge": [3, 4], "article_split": "test"}
    assert titles["Alpha"]["article_split"] == "train" and titles["Gamma"]["train_mentions"] == 0
    summary = title_summary(title_rows(rows))
    assert summary["trained_entities"] == 2 and summary["articles"] == {"train": 2, "valid": 0, "test": 2}
    # A test article whose own first sentence was a trained entity's knowledge: counted.
    assert summary["first_sentence_in_training"] == {"train": 0, "valid": 0, "test": 1}
    surfaces = {r["surface"]: r for r in surface_rows(train).to_pylist()}
    assert surfaces["vowel"] == {"surface": "vowel", "titles": ["Vowel"], "counts": [3], "mentions": 3}
    assert surfaces["letters"]["titles"] == ["Letter (alphabet)"]
    two = surface_rows(pa.concat_tables([train, train.slice(0, 0)]).set_column(
        2, "surface", pa.array(["s"] * train.num_rows)))  # one anchor text for everything: the titles ranked
    assert two.to_pylist()[0]["titles"] == ["Vowel", "Letter (alphabet)"] and two.to_pylist()[0]["counts"] == [3, 1]


def _tokenizer():
    from pathlib import Path

    from kilm_ray.method.tokenizer import from_bpe_files

    bpe = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gpt2-bpe"
    return from_bpe_files(bpe / "encoder.json", bpe / "vocab.bpe")


def test_plain_text_probe_of_the_data_matched_baseline():
    from kilm_ray.method.masking import knowledge_text
    from kilm_ray.method.probes import cut_text_knowledge, parse_text_knowledge, text_candidate_continuation, text_describe_prompt
    from kilm_ray.method.tokenizer import special_ids

    tok = _tokenizer()
    sp = special_ids(tok)
    assert sp.comma >= 0 and sp.colon >= 0
    prompt = text_describe_prompt(tok, sp, "Aristotle was a Greek ", "philosopher", " of Stagira.")
    assert tok.decode(prompt.encoder_ids) == "<s>Aristotle was a Greek philosopher,<mask>, of Stagira.</s>"
    assert tok.decode(prompt.decoder_prefix) == "</s><s>Aristotle was a Greek philosopher,"
    cand = text_candidate_continuation(tok, sp, "Philosopher", "a lover of wisdom", 16)
    assert tok.decode(cand) == " Philosopher: a lover of wisdom,"
    right = tok(" of Stagira.", add_special_tokens=False)["input_ids"]
    generated = cand + right + [sp.eos]
    kept = cut_text_knowledge(generated, right, sp, 16)
    assert parse_text_knowledge(tok, sp, kept) == ("Philosopher", "a lover of wisdom")
    # A comma inside the description is not the end: the right context does not follow it.
    inner = tok(" Sage: wise, old", add_special_tokens=False)["input_ids"]
    assert parse_text_knowledge(tok, sp, cut_text_knowledge(inner + [sp.comma] + right, right, sp, 16)) == (
        "Sage", "wise, old")
    assert cut_text_knowledge(inner + [sp.eos], right, sp, 16) == inner  # stopped early: all it wrote
    assert knowledge_text([5, sp.sep, 6], sp) == [5, sp.colon, 6]


def test_question_files_as_published(tmp_path):
    from kilm_ray.eval.qa_files import QAFileError, cut_answer, parse_qa_text, read_qa_file

    nq = tmp_path / "NQ-open.dev.jsonl.gz"  # Google's NQ-open, compressed
    nq.write_bytes(gzip.compress(b'{"question": "when was the last time anyone was on the moon", "answer": '
                                 b'["14 December 1972 UTC", "December 1972"]}\n{"question": "who wrote he ain\'t '
                                 b'heavy", "answer": ["Bobby Scott"]}\nnot json\n'))
    parsed = read_qa_file(str(nq))
    assert parsed.format == "jsonl" and parsed.rows == 3 and len(parsed.pairs) == 2
    assert parsed.pairs[1] == ("who wrote he ain't heavy", ["Bobby Scott"])
    assert dict(parsed.skipped) == {"not JSON (Expecting value)": 1} and "NQ-open.dev.jsonl.gz:3" in parsed.examples[0]
    # DPR's TSV through a CSV reader: a quoted question keeps its tab; answers are a Python list literal.
    dpr = 'who got the first nobel prize in physics\t[\'Wilhelm Conrad Röntgen\']\n"a\tquoted" question\t["x", \'y\']\n'
    (tmp_path / "nq-test.qa.csv").write_text(dpr)
    assert read_qa_file(str(tmp_path / "nq-test.qa.csv")).pairs == [
        ("who got the first nobel prize in physics", ["Wilhelm Conrad Röntgen"]), ("a\tquoted question", ["x", "y"])]
    assert parse_qa_text("q one\tA\tB\n\nq two\tC\n").pairs == [("q one", ["A", "B"]), ("q two", ["C"])]
    js = json.dumps([{"question": "q1", "answers": ["a", "b"]}, {"question": "q2", "answer": "c"}, ["q3", ["d"]],
                     {"question": "q4", "answers": []}])
    got = parse_qa_text(js)
    assert got.pairs == [("q1", ["a", "b"]), ("q2", ["c"]), ("q3", ["d"])] and got.skipped["no answer strings"] == 1
    bad = parse_qa_text("fine question\t['answer']\nno answer here\nq\t['unclosed\n", "qa.tsv")
    assert len(bad.pairs) == 1 and sum(bad.skipped.values()) == 2
    with pytest.raises(QAFileError, match="no question with an answer"):
        parse_qa_text("just a line\n", "empty.tsv")
    # The official KILM QA post-processing.
    assert cut_answer(" Aristotle\nQuestion: who") == "Aristotle" and cut_answer("Paris Question: next") == "Paris"
    # TriviaQA's published JSON, pretty-printed (as unfiltered-web-dev.json) or on one line: normalized aliases.
    trivia = {"Data": [{"Answer": {"Aliases": ["Sinclair Lewis", "Harry Sinclair Lewis"], "NormalizedAliases": [
        "sinclair lewis", "harry sinclair lewis"], "Value": "Sinclair Lewis", "Type": "WikipediaEntity"},
        "EntityPages": [], "Question": "Which American-born Sinclair won the Nobel Prize for Literature in 1930?",
        "QuestionId": "tc_1", "QuestionSource": "http://www.triviacountry.com/"},
        {"Answer": {"Value": "Exeter", "Type": "FreeForm"}, "Question": "Where is the UK's Met Office?"},
        {"Answer": {}, "Question": "no answer at all"}], "Domain": "Web", "Split": "dev", "Version": 1.0}
    for text in (json.dumps(trivia, indent=2), json.dumps(trivia)):
        got = parse_qa_text(text, "unfiltered-web-dev.json")
        assert got.format == "triviaqa json" and got.rows == 3 and got.skipped["no answer strings"] == 1
        assert got.pairs == [(trivia["Data"][0]["Question"], ["sinclair lewis", "harry sinclair lewis"]),
                             ("Where is the UK's Met Office?", ["Exeter"])]
    # WebQuestions' published JSON: the answers are targetValue's descriptions, quoted or not.
    webq = json.dumps([{"url": "http://www.freebase.com/view/en/justin_bieber", "targetValue":
                        '(list (description "Jazmyn Bieber") (description "Jaxon Bieber"))',
                        "utterance": "what is the name of justin bieber brother?"},
                       {"url": "u", "targetValue": "(list (description Canada))", "utterance": "where is toronto?"},
                       {"url": "u", "targetValue": "(list)", "utterance": "nothing?"}])
    got = parse_qa_text(webq, "webquestions.examples.test.json")
    assert got.format == "webquestions json" and got.skipped["no answer strings"] == 1
    assert got.pairs == [("what is the name of justin bieber brother?", ["Jazmyn Bieber", "Jaxon Bieber"]),
                         ("where is toronto?", ["Canada"])]
    # JSON lines whose first line is broken: that row skipped and counted, the rest read.
    broken = parse_qa_text('{"question": "cut short\n{"question": "q", "answer": ["a"]}\n', "nq.jsonl")
    assert broken.format == "jsonl" and broken.pairs == [("q", ["a"])] and sum(broken.skipped.values()) == 1
    with pytest.raises(QAFileError, match="'Data' list"):
        parse_qa_text('{"version": 1,\n "data": []}', "squad.json")


def test_few_shot_prompts_and_exemplars_as_the_paper_chooses_them():
    """The four prompt variants; k exemplars by TF-IDF (the most similar training questions, never the
    question itself) or one seeded random draw shared by every question; a long prompt keeps its end."""
    from kilm_ray.method.fewshot import TfidfExemplars, choose_exemplars, qa_text
    from kilm_ray.method.probes import ProbeError, qa_prompt
    from kilm_ray.method.tokenizer import special_ids

    assert qa_text("who wrote hamlet") == "Question: who wrote hamlet? Answer:"  # the zero-shot prompt as before
    shots = [("who wrote macbeth", "Shakespeare"), ("capital of france", "Paris")]
    assert qa_text("who wrote hamlet?", shots, 1) == ("Question: who wrote macbeth Answer: Shakespeare \n\n Question: "
                                                      "capital of france Answer: Paris \n\n Question: who wrote hamlet? Answer: ")
    assert qa_text("q", shots[:1], 4) == "Q: who wrote macbeth A:Shakespeare \n\n Q: q? A:"
    pool = [("who wrote macbeth", "Shakespeare"), ("what is the capital of france", "Paris"),
            ("who wrote the odyssey", "Homer"), ("who wrote hamlet", "Shakespeare"), ("how tall is everest", "8849 m"),
            *[(f"how many legs has animal number {i}", str(i)) for i in range(12)]]  # DrQA's idf: 0 for common words
    index = TfidfExemplars(pool)
    near = index.nearest("who wrote hamlet?", 2)
    assert ("who wrote hamlet", "Shakespeare") not in near  # the question asked is never its own exemplar
    assert near[0] == ("who wrote macbeth", "Shakespeare") and len(near) == 2
    assert index.nearest("capital city of france", 1) == [("what is the capital of france", "Paris")]
    drawn = choose_exemplars(["a?", "b?"], pool, 3, "random", seed=7)
    assert drawn[0] == drawn[1] and len(drawn[0]) == 3 and drawn == choose_exemplars(["c?", "d?"], pool, 3, "random", 7)
    assert choose_exemplars(["a?"], pool, 3, "random", 8) != drawn[:1]
    assert choose_exemplars(["a?"], pool, 0, "tfidf", 0) == [[]]
    tok = _tokenizer()
    sp = special_ids(tok)
    zero = qa_prompt(tok, sp, "who wrote hamlet")
    assert tok.decode(zero.decoder_prefix[2:]) == "Question: who wrote hamlet? Answer:"
    few = qa_prompt(tok, sp, "who wrote hamlet", shots, variant=3, max_input_tokens=12)
    assert len(few.encoder_ids) == 12 and tok.decode(few.decoder_prefix[2:]).endswith("who wrote hamlet? A:")
    assert few.encoder_ids[-2:] == [sp.mask, sp.eos] and few.decoder_prefix[2:] == few.encoder_ids[1:-2]
    with pytest.raises(ProbeError, match="exemplar 0"):
        qa_prompt(tok, sp, "q", [("what is <mask>", "x")])
    # A training question holding a control token never becomes an exemplar; a question sharing nothing
    # weighted with the pool gets fewer than k (DrQA's stopwords weigh nothing: "who is it" shares nothing).
    assert choose_exemplars(["what is <x>?"], [("what is <mask>", "y"), ("plain question", "z")], 2, "random", 0) == [
        [("plain question", "z")]]
    assert index.nearest("who is it", 3) == []


@pytest.fixture(scope="module")
def probe_model():
    """A tiny random BART with the GPT-2 BPE and the KILM tokens: the probes' contracts, not their scores."""
    import torch

    from kilm_ray.config import ModelConfig
    from kilm_ray.eval.probing import ProbeModel
    from kilm_ray.model.bart import build_model
    from kilm_ray.method.tokenizer import special_ids

    torch.manual_seed(0)
    tok = _tokenizer()
    sp = special_ids(tok)
    model = build_model(ModelConfig(preset="tiny", dropout=0.0), len(tok), sp, 128).eval()
    return lambda form: ProbeModel(model, tok, sp, form, max_new_tokens=6, batch_size=4, max_knowledge_tokens=8)


def _mention_item(tok, sp, left, mention, right, title, desc, k):
    from kilm_ray.method.chunking import knowledge_ids

    ids_left = tok(left, add_special_tokens=False)["input_ids"]
    ids_mention = tok(mention, add_special_tokens=False)["input_ids"]
    ids = ids_left + ids_mention + tok(right, add_special_tokens=False)["input_ids"]
    know = knowledge_ids(lambda t: (tok(t, add_special_tokens=False)["input_ids"], None), title, desc, sp.sep, 12)
    return {"id": f"{k}:0", "ids": ids, "start": len(ids_left), "end": len(ids_left) + len(ids_mention),
            "knowledge": know, "surface": mention.strip(), "title": title}


def test_probe_functions_on_a_model(probe_model):
    """Each probe gives one result per item, in both forms; the training lookup scores its prediction against the
    gold; an unbuildable appositive and a question with a control token are refused, not raised."""
    from kilm_ray.eval import probing
    from kilm_ray.method.masking import MaskingParams

    pm = probe_model("slot")
    tok, sp = pm.tokenizer, pm.sp
    items = [_mention_item(tok, sp, "The Greek ", "philosophers", " taught in Athens. Then more.", "Philosopher",
                           "a lover of wisdom", 1),
             _mention_item(tok, sp, "He wrote in ", "Hebrew", ".", "Hebrew alphabet", "the script of Hebrew", 2)]
    items[0]["lookup_knowledge"] = items[0]["knowledge"]  # the lookup knows this one
    items[1]["candidates"] = [{"title": "Hebrew language", "knowledge": items[0]["knowledge"]},
                              {"title": "Hebrew alphabet", "knowledge": items[1]["knowledge"]}]
    items[1]["gold"] = 1
    for form in ("slot", "text"):
        rows = probing.mentions(probe_model(form), items)
        assert [r["id"] for r in rows] == ["1:0", "2:0"]
        assert rows[0]["lookup"] == {"title_exact_match": 1.0, "description_f1": 1.0, "description_rouge_l": 1.0}
        assert rows[1]["lookup"]["title_exact_match"] == 0.0  # nothing known of this anchor text: no answer
        assert rows[0]["title_differs"] is False and rows[0]["copy_rule"] == 0.0  # an inflection, not knowledge
        assert rows[1]["title_differs"] is True and "anchor" in rows[1] and "anchor" not in rows[0]
        assert all(0 <= r["describe"]["description_f1"] <= 1 and "<sep>" in r["describe"]["generated"] for r in rows)
        assert all("title_exact_match" in r["appositive"] or "refused" in r["appositive"] for r in rows)
    qa = probing.qa(pm, [{"question": "who taught alexander", "answers": ["Aristotle"]},
                         {"question": "what is <ent_desc> for", "answers": ["x"]}])
    assert "exact_match" in qa[0] and qa[1] == {"skipped": "a control token in the question"}
    senses = probing.senses(pm, [{"word": "bank", "left": "he sat on the ", "mention": "bank", "right": " of it",
                                  "senses": ["sloping land", "a financial institution"], "gold": 0}])
    assert senses[0]["predicted"] in (0, 1) and senses[0]["correct"] == float(senses[0]["predicted"] == 0)
    losses = probing.retention(pm, [{"ids": it["ids"], "sample_id": k} for k, it in enumerate(items)],
                               MaskingParams(0.3, 3.0, 0.0), 0)
    assert [r["tokens"] for r in losses] == [len(it["ids"]) + 2 for it in items] and all(r["loss_sum"] > 0 for r in losses)


def test_mention_as_a_title_candidate_is_kept_only_where_the_model_scores_it_higher(probe_model):
    """eval.title_candidates=generated_or_mention: a title is replaced by the mention exactly where the
    model's summed log-probability of mention+<sep> beats its decoded title+<sep>; the description is then
    decoded after the mention; the decoded title's own score is kept beside."""
    import dataclasses

    from kilm_ray.eval import probing
    from kilm_ray.eval.summary import knowledge_summary
    from kilm_ray.model.generation import generate, score_continuations

    base = dataclasses.replace(probe_model("slot"), batch_size=2)  # several generation batches, per-row budgets
    pm = dataclasses.replace(base, title_candidates="generated_or_mention")
    tok, sp = pm.tokenizer, pm.sp
    items = [_mention_item(tok, sp, "The Greek ", "philosophers", " taught in Athens.", "Philosopher", "a lover", 1),
             _mention_item(tok, sp, "He wrote in ", "Hebrew", ".", "Hebrew alphabet", "the script", 2),
             _mention_item(tok, sp, "A ", "dog", " barked.", "Dog", "a domestic animal", 3),
             _mention_item(tok, sp, "In ", " the Democratic Republic of the Congo", ".", "Congo", "a country", 4)]
    plain = probing.describe(base, items)
    ranked = probing.describe(pm, items)
    prompts = [probing.describe_prompt_of(pm, it) for it in items]
    sources = []
    for it, p, a, b in zip(items, prompts, plain, ranked):
        greedy = generate(pm.model, [p.encoder_ids], [p.decoder_prefix], sp.pad, sp.eos, [p.stop_id, sp.eos],
                          pm.max_new_tokens)[0]
        title = probing.title_part(greedy.tokens, sp)
        mention = it["ids"][it["start"]:it["end"]]
        (s_mention, _), (s_title, _) = score_continuations(
            pm.model, [(p.encoder_ids, p.decoder_prefix, mention + [sp.sep]),
                       (p.encoder_ids, p.decoder_prefix, title + [sp.sep])], sp.pad)
        wins = mention != title and s_mention > s_title
        sources.append(b["title_source"])
        assert b["title_source"] == ("mention" if wins else "generated")
        assert b["title_exact_match_generated"] == a["title_exact_match"]
        if wins:
            left = pm.max_new_tokens - len(mention) - 1
            rest = generate(pm.model, [p.encoder_ids], [p.decoder_prefix + mention + [sp.sep]], sp.pad, sp.eos,
                            [p.stop_id, sp.eos], left)[0].tokens if left > 0 else []
            assert b["generated"].split(" <sep> ")[0] == it["surface"]
            assert b["generated"] == "{} <sep> {}".format(*probing.parse_knowledge(
                tok, sp, mention + [sp.sep] + list(rest)))
        else:
            assert b["generated"] == a["generated"]
    assert "mention" in sources and "generated" in sources  # untrained: long decoded titles lose to short mentions
    # A mention that uses the whole budget (3 tokens and <sep> of 4): taken, nothing decoded after it.
    short = probing.describe(dataclasses.replace(pm, max_new_tokens=4), items[:1])[0]
    assert short["title_source"] == "mention" and short["generated"] == f"{items[0]['surface']} <sep> "
    summary = knowledge_summary(
        [{"id": it["id"], "group": "seen", "copy_rule": 0.0, "title_differs": True, "describe": r}
         for it, r in zip(items, ranked)], "describe")
    assert summary["all"]["titles_from_mention"] == sources.count("mention")
    assert "title_exact_match_generated" in summary["all"]["intervals"]
    from kilm_ray.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="eval.title_candidates applies to greedy decoding; eval.num_beams is 2"):
        load_config(None, ["eval.num_beams=2", "eval.title_candidates=generated_or_mention"])


def test_cluster_bootstrap_widens_intervals_where_items_share_an_article():
    """Mentions of one article move together: resampling them as independent items understates the
    uncertainty. With the articles as clusters the interval is wider, the mean the same, and every figure
    says how many clusters it rests on; a label per item is required."""
    rng = np.random.default_rng(5)
    article_effect = rng.normal(0, 0.3, 10)
    articles = np.repeat(np.arange(10), 100)  # 1,000 mentions in 10 articles
    scores = np.clip(0.5 + article_effect[articles] + rng.normal(0, 0.1, 1000), 0, 1)
    naive, clustered = interval(scores, seed=2), interval(scores, seed=2, clusters=articles.tolist())
    assert clustered["mean"] == naive["mean"] and clustered["n"] == 1000
    assert clustered["clusters"] == 10 and naive["clusters"] == 1000
    assert (clustered["high"] - clustered["low"]) > 3 * (naive["high"] - naive["low"])
    # Every item its own cluster is the plain bootstrap; one cluster gives no spread to resample.
    assert interval(scores, seed=2, clusters=list(range(1000))) == naive
    one = interval([0.2, 0.4], clusters=["A", "A"])
    assert one["low"] == one["high"] == pytest.approx(0.3) and one["clusters"] == 1
    with pytest.raises(ValueError, match="label every item"):
        interval(scores, clusters=[0, 1])
    # Paired: a difference carried by one article of ten is not a difference of the model.
    b = rng.uniform(0, 1, 1000)
    a = b + np.where(articles == 3, 0.3, 0.0)
    naive_test, clustered_test = paired_test(a, b, seed=0), paired_test(a, b, seed=0, clusters=articles)
    assert naive_test["p_value"] < 0.001 and naive_test["low"] > 0
    assert clustered_test["p_value"] > 0.05 and clustered_test["low"] <= 0.0 < clustered_test["high"]
    loss = ratio_interval(scores * 10, np.full(1000, 10.0), seed=0, clusters=articles)
    assert loss["ratio"] == pytest.approx(scores.mean()) and loss["clusters"] == 10
    # Three articles cannot carry a claim, however large the difference: one sign per article gives p >= 0.25.
    few = paired_test([1.0] * 6, [0.0] * 6, clusters=[0, 0, 1, 1, 2, 2])
    assert few["p_value"] > 0.2 and claim({"mean": 1, "low": 1, "high": 1}, {"mean": 0, "low": 0, "high": 0},
                                          few) == "no difference claimed"
    # A NaN score gives no interval and no verdict (not an interval over the finite resamples).
    broken = paired_test([1, 1, 1, 1, 1, float("nan")], [0] * 6, clusters=list(range(6)))
    assert broken["low"] != broken["low"] and interval([1.0, float("nan")])["low"] != interval([1.0, float("nan")])["low"]
    assert claim(interval([1.0, float("nan")]), interval([0.0, 0.0]), broken) == "no difference claimed"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.floats(0, 1)), min_size=1, max_size=40),
       st.integers(0, 2**16))
def test_cluster_bootstrap_interval_holds_the_mean_of_some_resample(items, seed):
    """Whatever the labels: the interval lies within the cluster means' range, and the point figure is
    the mean over items (not over clusters)."""
    labels, values = zip(*items)
    iv = interval(values, seed=seed, resamples=200, clusters=labels)
    by_cluster = {c: np.mean([v for lab, v in items if lab == c]) for c in set(labels)}
    assert min(by_cluster.values()) - 1e-9 <= iv["low"] <= iv["high"] <= max(by_cluster.values()) + 1e-9
    assert iv["mean"] == pytest.approx(np.mean(values)) and iv["clusters"] == len(by_cluster)


def test_test_ledger_counts_every_look_at_the_same_test_articles_and_refuses_undeclared_ones(tmp_path):
    """The ledger belongs to the test articles, not to a run: another tokenizer, test fraction, copy of the
    dump or a second dump beside it looks at the same articles; another split seed does not. A look is
    allowed only where the declared count is the ledger's, naming the earlier looks; the ledger sits beside
    out/manifest.json, never inside a committed dataset, unless eval.test_ledger names a shared file."""
    from kilm_ray.eval.ledger import TestLookRefused, check_look, ledger_path, read_looks, record_look, split_keys

    def manifest(*dumps, seed=2, fraction=0.1):
        return {"dumps": list(dumps), "config": {"corpus": {"split_seed": seed, "test_fraction": fraction}}}

    keys = split_keys(manifest("/data/enwiki.xml.bz2"))
    assert keys == split_keys(manifest("s3://bucket/dumps/enwiki.xml.bz2", fraction=0.2))
    assert set(keys) < set(split_keys(manifest("/data/enwiki.xml.bz2", "/data/dewiki.xml.bz2")))
    assert keys != split_keys(manifest("/data/enwiki.xml.bz2", seed=3))
    out = tmp_path / "out"
    (out / "datasets" / "5a7f").mkdir(parents=True)
    (out / "manifest.json").write_text("{}")
    assert ledger_path(str(out / "datasets" / "5a7f")) == ledger_path(str(out)) == str(out / "test_looks.jsonl")
    assert ledger_path(str(out), "s3://team/kilm/test_looks.jsonl") == "s3://team/kilm/test_looks.jsonl"
    path = ledger_path(str(out))
    check_look(read_looks(path, keys), 0, path)  # nothing looked at yet: a first look
    first = record_look(path, keys, "model a", "kilm-ray eval", step=10)
    assert first["look"] == 1 and first["ledger"] == path
    with pytest.raises(TestLookRefused, match=r"looked at 1 time\(s\).*model a.*eval.test_looks_before=1"):
        check_look(read_looks(path, keys), 0, path)
    with pytest.raises(TestLookRefused, match="holds 1 look"):  # a blanket 99 in a config turns nothing off
        check_look(read_looks(path, keys), 99, path)
    check_look(read_looks(path, keys), 1, path)  # declared: allowed, and counted
    with open(path, "a") as f:
        f.write('{"split_keys": ["torn')  # a writer killed mid-line loses that line only
    both = split_keys(manifest("/data/enwiki.xml.bz2", "/data/dewiki.xml.bz2"))
    assert record_look(path, both, "rule r", "kilm-ray demo")["look"] == 2  # enwiki's test articles again
    assert record_look(path, split_keys(manifest("/x/enwiki.xml.bz2", seed=5)), "model b", "kilm-ray eval")["look"] == 1
    assert [r["what"] for r in read_looks(path, keys)] == ["model a", "rule r"]


def _appos_rows():
    return [{"previous_sentence": [["The", "summit", "opened", "on", "Monday", "."]],
             "input": ["Talks", "were", "led", "by", "Angela", "Merkel", ",", "<appos>", ",", "in", "Berlin", "."],
             "next_sentence": ["They", "ended", "late", "."], "name": "Angela Merkel",
             "target": ["the", "German", "chancellor"], "descriptions": "Chancellor of Germany from 2005 to 2021",
             "used": [False], "properties": ["position held"], "values": ["chancellor"], "qualifiers": [[]]},
            {"previous_sentence": [], "input": ["Acme", "Corp", "<appos>", "said", "so", "."],
             "next_sentence": [], "name": "Acme Corp", "target": [], "descriptions": ""},
            {"previous_sentence": [], "input": ["no", "slot", "here"], "next_sentence": [], "name": "no", "target": []},
            {"previous_sentence": [], "input": ["A", "<appos>"], "next_sentence": [], "name": "Zed", "target": []}]


def test_appos_corpus_as_published(tmp_path):
    """ApposCorpus's JSONL rows become appositive items built as the official loader builds them (the
    sentence before and after, the slot after the word before it); bad rows are skipped and counted; a
    subset name finds its test file under the corpus root."""
    from kilm_ray.eval.appos_files import ApposFileError, appos_path, read_appos

    root = tmp_path / "ApposCorpus"
    test = root / "news_gold_test" / "en" / "per" / "test.jsonl"
    test.parent.mkdir(parents=True)
    test.write_text("\n".join(json.dumps(r) for r in _appos_rows()) + "\nnot json\n")
    assert appos_path(str(root), "news_per") == str(test)
    parsed = read_appos(str(root), "news_per")
    assert parsed.rows == 5 and len(parsed.items) == 2 and sum(parsed.skipped.values()) == 3
    assert parsed.skipped["the sentence holds 0 <appos> slots"] == 1
    assert parsed.skipped["the name does not occur before the slot"] == 1
    first = parsed.items[0]
    assert first["text"] == ("The summit opened on Monday . Talks were led by Angela Merkel ,<appos> , in Berlin . "
                             "They ended late .")
    assert (first["mention"], first["target"]) == ("Angela Merkel", "the German chancellor")
    assert parsed.items[1]["target"] == "" and parsed.items[1]["text"] == "Acme Corp<appos> said so ."
    with pytest.raises(ApposFileError, match="wiki_org"):
        appos_path(str(root), "blog_per")
    (test.parent / "other.jsonl").write_text('{"input": ["x"]}\n')
    with pytest.raises(ApposFileError, match="no ApposCorpus row"):
        read_appos(str(test.parent / "other.jsonl"))


def test_appos_corpus_probe_scores_against_the_gold_appositive(probe_model):
    from kilm_ray.eval import probing
    from kilm_ray.eval.appos_files import row_item
    from kilm_ray.eval.summary import appos_summary

    items = [row_item(r, k) for k, r in enumerate(_appos_rows()[:2])]
    for form in ("slot", "text"):
        rows = [{"id": it["id"], **r} for it, r in zip(items, probing.appos_corpus(probe_model(form), items))]
        assert 0 <= rows[0]["appositive_f1"] <= 1 and "description_f1" in rows[0]
        assert rows[1]["target_empty"] is True and "appositive_f1" not in rows[1]
        summary = appos_summary(rows, {"path": "x", "rows": 2}, {it["id"]: it for it in items})
        assert summary["scored"] == 1 and summary["target_empty"] == 1 and "appositive_f1" in summary["intervals"]
