"""Probe prompts (shared by Serve and eval) and batched prefix-forced generation."""

import pytest
import torch

from kilm_ray.generation import generate, score_continuations
from kilm_ray.probes import (
    ProbeError, appositive_prompt, describe_prompt, fill_prompt, parse_knowledge, qa_prompt, split_marked_text,
)
from kilm_ray.tokenizer import load_tokenizer, special_ids

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
        assert b.tokens == a.tokens and b.score == pytest.approx(a.score, abs=1e-5)


def test_truncation_and_position_cap(model):
    encs, prefixes = [[0, 5, 6, 2]], [[2, 0, 5, 6]]
    long = generate(model, encs, prefixes, 1, 2, [299], max_new_tokens=8)[0]
    short = generate(model, encs, prefixes, 1, 2, [299], max_new_tokens=3)[0]
    assert long.truncated(3).tokens == short.tokens and long.truncated(3).score == pytest.approx(short.score)
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
