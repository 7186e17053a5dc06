"""Probe prompts (shared by Serve and eval) and batched prefix-forced generation."""

import json

import pytest
import torch

from kilm_ray.model.generation import generate, score_continuations
from kilm_ray.method.probes import (
    ProbeError, appositive_prompt, describe_prompt, fill_prompt, parse_knowledge, qa_prompt, split_marked_text,
)
from kilm_ray.method.tokenizer import load_tokenizer, special_ids

from conftest import GPT2_BPE


@pytest.fixture(scope="module")
def tok(shared_data):
    return load_tokenizer(f"gpt2-bpe:{GPT2_BPE}")


@pytest.fixture(scope="module")
def model():
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    cfg = BartConfig(vocab_size=300, d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=40,
                     pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, dropout=0.0)
    return BartForConditionalGeneration(cfg).eval()


def test_describe_prompt_matches_the_training_format(tok):
    sp = special_ids(tok)
    p = describe_prompt(tok, sp, "Aristotle was a Greek ", "philosopher", " and polymath.")
    decoded = tok.decode(p.encoder_ids)
    assert decoded == "<s>Aristotle was a Greek<ent> philosopher</ent><ent_desc><mask></ent_desc> and polymath.</s>"
    assert tok.decode(p.decoder_prefix) == "</s><s>Aristotle was a Greek<ent> philosopher</ent><ent_desc>"
    assert p.stop_id == sp.desc_end
    assert split_marked_text("a <ent>b</ent> c") == ("a ", "b", " c")
    with pytest.raises(ProbeError):
        split_marked_text("a <ent>b</ent> <ent>c</ent>")


def test_appositive_qa_fill_prompts(tok):
    sp = special_ids(tok)
    p = appositive_prompt(tok, sp, "Plato met Aristotle, <appos>, in Athens. Aristotle left.", "Aristotle")
    assert tok.decode(p.encoder_ids) == ("<s>Plato met<ent> Aristotle</ent>,<ent_desc><mask></ent_desc> , "
                                         "in Athens. Aristotle left.</s>")
    q = qa_prompt(tok, sp, "Who taught Alexander?")
    assert tok.decode(q.encoder_ids) == "<s>Question: Who taught Alexander? Answer:<mask></s>"
    assert tok.decode(q.decoder_prefix) == "</s><s>Question: Who taught Alexander? Answer:"
    f = fill_prompt(tok, sp, "The <mask> is blue.")
    assert sp.mask in f.encoder_ids and f.decoder_prefix == [sp.eos, sp.bos]
    for build, args in ((qa_prompt, ("  ?",)), (fill_prompt, ("no mask",)),
                        (appositive_prompt, ("x <appos>", "Plato"))):
        with pytest.raises(ProbeError):
            build(tok, sp, *args)


def test_parse_knowledge(tok):
    sp = special_ids(tok)
    ids = tok("Aristotle", add_special_tokens=False).input_ids + [sp.sep] + \
        tok(" a Greek philosopher", add_special_tokens=False).input_ids + [sp.desc_end, 50, 60]
    assert parse_knowledge(tok, sp, ids) == ("Aristotle", "a Greek philosopher")
    assert parse_knowledge(tok, sp, tok("Plato", add_special_tokens=False).input_ids) == ("Plato", "")


@pytest.mark.parametrize("beams", [1, 3])
def test_batched_prefixes_of_different_lengths_equal_one_by_one(model, beams):
    encs = [[0, 5, 6, 7, 8, 2], [0, 9, 10, 2], [0, 11, 12, 13, 14, 15, 16, 2]]
    prefixes = [[2, 0, 5, 6, 7], [2, 0], [2, 0, 11, 12, 13, 14, 15, 16, 20, 21]]
    batched = generate(model, encs, prefixes, 1, 2, [2, 299], max_new_tokens=8, num_beams=beams)
    alone = [generate(model, [e], [p], 1, 2, [2, 299], max_new_tokens=8, num_beams=beams)[0]
             for e, p in zip(encs, prefixes)]
    for b, a in zip(batched, alone):
        assert b.tokens == a.tokens and b.token_logprobs == pytest.approx(a.token_logprobs, abs=1e-5)


def test_truncation_and_position_cap(model):
    encs, prefixes = [[0, 5, 6, 2]], [[2, 0, 5, 6]]
    long = generate(model, encs, prefixes, 1, 2, [299], max_new_tokens=8)[0]
    short = generate(model, encs, prefixes, 1, 2, [299], max_new_tokens=3)[0]
    assert long.truncated(3).tokens == short.tokens and long.truncated(3).mean_logprob == pytest.approx(short.mean_logprob)
    # 40 learned positions: a 36-token prefix leaves room for 4 new tokens, not the 20 asked for.
    capped = generate(model, encs, [[2, 0] + [7] * 34], 1, 2, [299], max_new_tokens=20)[0]
    assert len(capped.tokens) <= 4
    assert generate(model, encs, [[2, 0] + [7] * 38], 1, 2, [299], max_new_tokens=5)[0].tokens == []


def test_scoring_in_a_batch_equals_alone(model):
    items = [([0, 5, 6, 2], [2, 0, 5], [3, 4]), ([0, 9, 2], [2, 0], [5]), ([0, 9, 10, 11, 2], [2, 0, 9, 10], [7, 8, 9])]
    together = score_continuations(model, items, 1)
    for item, (lp, n) in zip(items, together):
        alone_lp, alone_n = score_continuations(model, [item], 1)[0]
        assert n == alone_n == len(item[2]) and lp == pytest.approx(alone_lp, abs=1e-5) and lp < 0


def test_a_long_neighbour_does_not_shorten_a_row(model):
    """Budgets are per row: a 36-token prefix (room for 4) beside a short one leaves the short row its 12."""
    encs, short, long = [[0, 5, 6, 2], [0, 5, 6, 2]], [2, 0, 5, 6], [2, 0] + [7] * 34
    alone = generate(model, encs[:1], [short], 1, 2, [299], max_new_tokens=12)[0]
    together = generate(model, encs, [short, long], 1, 2, [299], max_new_tokens=[12, 12])
    assert together[0].tokens == alone.tokens and len(alone.tokens) == 12 and alone.finish_reason == "length"
    assert len(together[1].tokens) == 4 and together[1].finish_reason == "length"
    mixed = generate(model, encs, [short, short], 1, 2, [299], max_new_tokens=[3, 12])
    assert mixed[0].tokens == alone.tokens[:3] and mixed[1].tokens == alone.tokens
    with pytest.raises(ValueError, match="one budget"):
        generate(model, encs, [short, short], 1, 2, [299], max_new_tokens=[3, 12], num_beams=2)
    # Rows with their own stop tokens share one call: each equals its own call alone.
    stops = [[299, alone.tokens[2]], [299]]
    per_row = generate(model, encs, [short, short], 1, 2, stops, max_new_tokens=12)
    first_alone = generate(model, encs[:1], [short], 1, 2, stops[0], max_new_tokens=12)[0]
    cut = alone.tokens.index(alone.tokens[2]) + 1
    assert per_row[0].tokens == first_alone.tokens == alone.tokens[:cut] and per_row[0].finish_reason == "stop"
    assert per_row[1].tokens == alone.tokens


def test_candidates_scored_with_one_encoder_pass_in_token_budget_batches(model):
    from kilm_ray.model.generation import score_candidates, token_budget_batches

    assert token_budget_batches([3, 3, 3, 10, 2], 9) == [[0, 1, 2], [3], [4]]
    assert token_budget_batches([], 9) == []
    enc, prefix = [0, 5, 6, 7, 2], [2, 0, 5]
    conts = [[3, 4], [5], [7, 8, 9, 10], [11]]
    reference = score_continuations(model, [(enc, prefix, c) for c in conts], 1)
    for budget in (1, 8, 10_000):  # one row per forward, a few, all at once: the same scores
        got = score_candidates(model, enc, prefix, conts, 1, token_budget=budget)
        assert [n for _, n in got] == [n for _, n in reference]
        assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in reference], abs=1e-5)


@pytest.mark.parametrize("build, args, field, token", [
    (describe_prompt, ("Hello <ent_desc> evil ", "philosopher", "."), "left", "<ent_desc>"),
    (describe_prompt, ("", "Plato</s>", ""), "mention", "</s>"),
    (describe_prompt, ("", "Plato", " <pad><mask>"), "right", "<pad>, <mask>"),
    (appositive_prompt, ("Plato <sep>, <appos>.", "Plato"), "text", "<sep>"),
    (qa_prompt, ("Who <s>taught</ent> Alexander?",), "question", "<s>, </ent>"),
    (fill_prompt, ("The <mask> is <ent>blue.",), "text", "<ent>"),
])
def test_control_tokens_in_user_text_are_refused_by_name(tok, build, args, field, token):
    sp = special_ids(tok)
    with pytest.raises(ProbeError) as err:
        build(tok, sp, *args)
    assert str(err.value).startswith(f"{field}: contains the reserved token") and token in str(err.value)


def test_candidate_continuations_are_cut_to_the_budget(tok):
    from kilm_ray.method.probes import candidate_continuation

    sp = special_ids(tok)
    ids = candidate_continuation(tok, sp, "Mercury (planet)", "the smallest planet " * 500, 20)
    assert len(ids) == 20 and ids[-1] == sp.desc_end and ids.count(sp.sep) == 1
    assert tok.decode(ids[: ids.index(sp.sep)]) == " Mercury (planet)"
    short = candidate_continuation(tok, sp, "Mercury", "a planet", 64)
    assert tok.decode(short) == " Mercury<sep> a planet</ent_desc>"  # as knowledge_ids encodes it in training
    with pytest.raises(ProbeError, match="candidates.3.title: contains the reserved token <sep>"):
        candidate_continuation(tok, sp, "A<sep>B", "", 64, field="candidates.3")


def test_generation_groups_keep_answers_independent_of_neighbours():
    from kilm_ray.model.generation import generation_groups

    rows = [(10, 8, 1, (5,)), (30, 40, 1, (5,)), (10, 8, 2, (5,)), (10, 40, 2, (5,)), (10, 8, 2, (5,)),
            (10, 8, 1, (2,)), (36, 40, 2, (5,)), (38, 40, 2, (5,))]
    # all greedy rows share a call; beam rows need the same width, stops and effective budget
    # (max 40 positions: a 36-token prefix leaves 4, a 38-token prefix 2)
    assert generation_groups(rows, 40) == [[0, 1, 5], [2, 4], [3], [6], [7]]


def test_greedy_steps_equal_hugging_face_greedy_and_its_scores(model):
    """Our step loop picks the tokens HF's greedy generate picks, with the log-probabilities HF's
    output_scores + compute_transition_scores gave (which held every step's full scores)."""
    encs, prefixes = [[0, 5, 6, 7, 8, 2], [0, 9, 10, 2]], [[2, 0, 5, 6], [2, 0, 9]]
    ours = generate(model, encs, prefixes, 1, 2, [299], max_new_tokens=10)
    for e, p, g in zip(encs, prefixes, ours):
        out = model.generate(input_ids=torch.tensor([e]), decoder_input_ids=torch.tensor([p]), max_new_tokens=10,
                             num_beams=1, do_sample=False, eos_token_id=[299], pad_token_id=1, forced_bos_token_id=None,
                             forced_eos_token_id=None, no_repeat_ngram_size=0, min_length=0,
                             return_dict_in_generate=True, output_scores=True)
        reference = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)[0].tolist()
        assert g.tokens == out.sequences[0, len(p):].tolist()
        assert g.token_logprobs == pytest.approx(reference[: len(g.tokens)], abs=1e-5)


def test_beam_answers_carry_the_same_mean_logprob_as_greedy_ones(model):
    """Beam answers' token log-probabilities come from a teacher-forced pass: their mean is the quantity a
    greedy answer reports, and with length_penalty 1 it equals HF's own beam score."""
    encs, prefixes = [[0, 5, 6, 7, 8, 2], [0, 9, 10, 2]], [[2, 0, 5, 6], [2, 0, 9]]
    beams = generate(model, encs, prefixes, 1, 2, [2, 299], max_new_tokens=6, num_beams=3)
    for e, p, g in zip(encs, prefixes, beams):
        out = model.generate(input_ids=torch.tensor([e]), decoder_input_ids=torch.tensor([p]), max_new_tokens=6,
                             num_beams=3, do_sample=False, eos_token_id=[2, 299], pad_token_id=1, length_penalty=1.0,
                             early_stopping=True, forced_bos_token_id=None, forced_eos_token_id=None,
                             no_repeat_ngram_size=0, min_length=0, return_dict_in_generate=True, output_scores=True)
        assert g.tokens == [t for t in out.sequences[0, len(p):].tolist() if t != 1]
        assert len(g.token_logprobs) == len(g.tokens)
        assert g.mean_logprob == pytest.approx(float(out.sequences_scores[0]), abs=1e-4)
        forced = score_continuations(model, [(e, p, g.tokens)], 1)[0]
        assert g.mean_logprob == pytest.approx(forced[0] / forced[1], abs=1e-6)


def test_greedy_steps_stream_each_token_and_stop_rows_on_request(model):
    from kilm_ray.model.generation import greedy_steps

    encs, prefixes = [[0, 5, 6, 2], [0, 9, 10, 2]], [[2, 0, 5], [2, 0, 9]]
    whole = generate(model, encs, prefixes, 1, 2, [299], max_new_tokens=8)
    seen: list[list[int]] = [[], []]
    steps = 0
    for step in greedy_steps(model, encs, prefixes, 1, [299], 8, top_n=3, stopped=lambda i: i == 1 and len(seen[1]) >= 2):
        steps += 1
        for i, s in enumerate(step):
            if s is not None:
                seen[i].append(s.token)
                assert s.top[0] == (s.token, pytest.approx(s.logprob)) and len(s.top) == 3
    assert seen[0] == whole[0].tokens and steps == len(whole[0].tokens)
    assert seen[1] == whole[1].tokens[:2]  # stopped from outside after its second token



def test_scoring_between_two_greedy_steps_sees_the_plain_model(model):
    """A Serve replica scores a disambiguation request on the same model while a greedy batch is between
    two steps: neither answer may change (the batch's position offsets once leaked into the scoring pass:
    a 500 'size of tensor a (2) must match ... (0)', or silently shifted scores)."""
    from kilm_ray.model.generation import greedy_steps

    encs, prefixes = [[0, 5, 6, 2], [0, 9, 10, 11, 2]], [[2, 0, 5, 6, 7], [2, 0, 9]]  # rows padded differently
    scored = [([0, 9, 2], [2, 0], [5, 6]), ([0, 9, 10, 11, 2], [2, 0, 9, 10], [7, 8, 9])]
    alone = score_continuations(model, scored, 1)
    tokens: list[list[int]] = [[], []]
    for step in greedy_steps(model, encs, prefixes, 1, [299], 6):
        for i, s in enumerate(step):
            if s is not None:
                tokens[i].append(s.token)
        for item, want in zip(scored, alone):  # one request alone (1 row), then both (2 rows)
            assert score_continuations(model, [item], 1)[0][0] == pytest.approx(want[0], abs=1e-5)
        assert [lp for lp, _ in score_continuations(model, scored, 1)] == pytest.approx([a for a, _ in alone], abs=1e-5)
    assert tokens == [g.tokens for g in generate(model, encs, prefixes, 1, 2, [299], max_new_tokens=6)]


@pytest.mark.slow
@pytest.mark.parametrize("beams, bound_mb", [(4, 400), (1, 150)])
def test_one_batch_at_the_real_vocabulary_stays_bounded(beams, bound_mb):
    """32 requests x 128 new tokens at BART's 50 k vocabulary, as a replica runs them (fresh process, a tiny
    model so the rows x vocabulary tensors dominate): the peak RSS grows by less than ``bound_mb``. Before
    (output_scores, transition scores, the first step's logits at every prefix position) it grew by 5.5 GB
    with 4 beams and 3.2 GB greedy (BENCHMARKS.md, bench/generation_memory.py)."""
    import subprocess
    import sys

    from conftest import REPO

    done = subprocess.run([sys.executable, str(REPO / "bench" / "generation_memory.py"), "--one", "--requests", "32",
                           "--beams", str(beams), "--new-tokens", "128"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["vocab"] == 50265 and result["peak_growth_mb"] < bound_mb, result


def test_answer_stream_deltas_add_up_to_the_parsed_answer(tok):
    """Property: for any generated ids (special tokens, partial UTF-8 characters, spaces), each field's
    streamed deltas concatenate to exactly what parse_knowledge / parse_text give."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from kilm_ray.method.probes import AnswerStream, parse_text

    sp = special_ids(tok)
    pieces = [tok(w, add_special_tokens=False).input_ids for w in
              (" Aristotle", " a", " Greek", "  ", " philosopher", "é", "中文", "\U0001f600", "\n", ".")]
    byte_ids = tok.convert_tokens_to_ids(["Ã", "©", "ä", "¸", "Ń"])  # lone bytes of multi-byte characters
    token = st.one_of(st.sampled_from([t for p in pieces for t in p] + byte_ids),
                      st.sampled_from([sp.sep, sp.desc_end, sp.eos, sp.ent, sp.mask, sp.bos]))

    @settings(max_examples=200, deadline=None, derandomize=True)
    @given(st.lists(token, max_size=14), st.sampled_from(["describe", "appositive", "qa", "fill"]))
    def check(ids, task):
        stream = AnswerStream(tok, sp, task)
        got: dict[str, str] = {}
        for t in ids:
            field, delta = stream.feed(t)
            got[field] = got.get(field, "") + delta
        for field, (text, rest) in stream.finish().items():
            got[field] = got.get(field, "") + rest
            assert got[field] == text
        if task in ("describe", "appositive"):
            title, description = parse_knowledge(tok, sp, ids)
            assert (got["title"], got[stream.fields[1]]) == (title, description)
        else:
            assert got[stream.fields[0]] == parse_text(tok, sp, ids)

    check()


def test_completion_prompts_by_kind(tok):
    from kilm_ray.method.probes import completion_prompt

    sp = special_ids(tok)
    p, kind = completion_prompt(tok, sp, "Aristotle was a Greek <ent>philosopher</ent>.")
    assert kind == "describe" and p == describe_prompt(tok, sp, "Aristotle was a Greek ", "philosopher", ".")
    p, kind = completion_prompt(tok, sp, "Aristotle was a Greek <mask>.")
    assert kind == "fill" and p == fill_prompt(tok, sp, "Aristotle was a Greek <mask>.")
    p, kind = completion_prompt(tok, sp, "Question: Who taught Alexander? Answer:")
    assert kind == "continue" and tok.decode(p.encoder_ids) == "<s>Question: Who taught Alexander? Answer:<mask></s>"
    assert tok.decode(p.decoder_prefix) == "</s><s>Question: Who taught Alexander? Answer:"
    for bad, message in (("a <sep> b", "prompt: contains the reserved token <sep>"), ("  ", "empty"),
                         ("<ent>a</ent> <ent>b</ent>", "more than one mention"),
                         ("x <ent>a</ent> <mask>", "contains the reserved token <mask>")):
        with pytest.raises(ProbeError, match=message):
            completion_prompt(tok, sp, bad)


def test_no_repeat_ngram_bans_only_repeats_of_the_answer_itself(model):
    """eval/serve no_repeat_ngram_size: no n-gram occurs twice in an answer; the answer equals plain greedy up
    to where plain greedy first repeats one. Only the answer's own tokens count (a title copied from the
    mention in the prompt is no repeat)."""
    from kilm_ray.model.generation import greedy, repeated_ngram_tokens

    assert repeated_ngram_tokens([1, 2, 3, 1, 2], 3) == [3]
    assert repeated_ngram_tokens([1, 2, 1, 2, 1], 2) == [2]
    assert repeated_ngram_tokens([7], 2) == [] and repeated_ngram_tokens([4, 5, 4], 1) == [4, 5]
    enc = [[0, 5, 6, 7, 8, 2], [0, 9, 9, 9, 2]]
    prefixes = [[2, 0, 11, 12], [2, 0]]
    plain = greedy(model, enc, prefixes, 1, [2], max_new_tokens=30)
    banned = greedy(model, enc, prefixes, 1, [2], max_new_tokens=30, no_repeat_ngram_size=2)

    def first_repeat(tokens):
        seen = set()
        for i in range(len(tokens) - 1):
            if tuple(tokens[i:i + 2]) in seen:
                return i + 1
            seen.add(tuple(tokens[i:i + 2]))
        return None

    assert any(first_repeat(p.tokens) is not None for p in plain)  # the untrained model loops
    for p, b in zip(plain, banned):
        assert first_repeat(b.tokens) is None
        cut = first_repeat(p.tokens)
        assert b.tokens[:cut] == p.tokens[:cut] and (cut is None or b.tokens[cut] != p.tokens[cut])
        assert all(lp <= 0 for lp in b.token_logprobs)
    # The prompt's n-grams are free: with the loop itself as the prefix, the answer starts by repeating it.
    looped = [[2, 0] + p.tokens[:10] for p in plain]
    again = greedy(model, enc, looped, 1, [2], max_new_tokens=20)
    again_banned = greedy(model, enc, looped, 1, [2], max_new_tokens=20, no_repeat_ngram_size=2)
    for prefix, p, b in zip(looped, again, again_banned):
        cut = first_repeat(p.tokens)
        assert b.tokens[:cut] == p.tokens[:cut]
    assert any(tuple(p.tokens[:2]) in {tuple(q[i:i + 2]) for i in range(len(q) - 1)} for q, p in zip(looped, again))
    # One n per row (Serve: knowledge answers banned, /v1/fill rows not).
    mixed = greedy(model, enc, prefixes, 1, [2], max_new_tokens=30, no_repeat_ngram_size=[2, 0])
    assert mixed[0].tokens == banned[0].tokens and mixed[1].tokens == plain[1].tokens
