"""Tokenizer with the KILM tokens, and tokenized chunks with entity spans."""

import pytest

from kilm_ray.method.chunking import char_span_to_tokens, knowledge_ids, pack_chunks, tokenize_paragraph
from kilm_ray.method.tokenizer import KILM_TOKENS, TokenizerError, load_tokenizer, special_ids, train_bpe

from conftest import GPT2_BPE


@pytest.fixture(scope="module")
def tok(shared_data):
    return load_tokenizer(f"gpt2-bpe:{GPT2_BPE}")


def encoder(tok):
    def encode(text):
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return enc["input_ids"], enc["offset_mapping"]
    return encode


def test_gpt2_bpe_tokenizer_has_words_and_kilm_tokens(tok, tmp_path):
    assert tok.tokenize(" the history of Greece") == ["Ġthe", "Ġhistory", "Ġof", "ĠGreece"]
    sp = special_ids(tok)
    assert len({sp.ent, sp.ent_end, sp.desc, sp.desc_end, sp.sep, sp.mask, sp.bos, sp.eos, sp.pad}) == 9
    # The KILM tokens are atomic.
    assert tok("a<ent>b</ent><sep>", add_special_tokens=False)["input_ids"][1] == sp.ent
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.convert_tokens_to_ids(KILM_TOKENS) == tok.convert_tokens_to_ids(KILM_TOKENS)


def test_trained_bpe_and_bad_sources(tmp_path):
    tok = train_bpe(["the history of the world and of philosophy"] * 50 + ["Aristotle taught Alexander"] * 50, 400)
    assert len(tok) >= 300 and tok.convert_tokens_to_ids("<sep>") != tok.unk_token_id
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(f"gpt2-bpe:{tmp_path}")
    with pytest.raises(TokenizerError, match="cannot load tokenizer"):
        load_tokenizer(str(tmp_path / "nothing-here"))


def test_char_spans_map_to_whole_tokens(tok):
    text = "Anarchism is a political philosophy."
    ids, offsets = encoder(tok)(text)
    start, end = char_span_to_tokens(offsets, 15, 35)
    assert tok.decode(ids[start:end]) == " political philosophy"


def test_chunks_respect_length_and_keep_mentions_whole(tok):
    encode = encoder(tok)
    sentence = "Aristotle taught Alexander the Great in Macedonia. "
    text = (sentence * 12).strip()
    links = []
    for i in range(12):
        s = text.index("Alexander the Great", i * len(sentence))
        links.append((s, s + len("Alexander the Great"), "Alexander the Great", "external", [1, 2]))
    piece = tokenize_paragraph(encode, text, links)
    assert len(piece.mentions) == 12
    chunks = pack_chunks([piece, tokenize_paragraph(encode, "Short one.", [])], 40, encode("\n")[0],
                         decode=lambda ids: tok.decode(ids))
    assert all(len(c.input_ids) <= 40 for c in chunks)
    assert sum(len(c.mentions) for c in chunks) == 12
    for chunk in chunks:
        for m in chunk.mentions:
            assert tok.decode(chunk.input_ids[m.start:m.end]).strip() == "Alexander the Great"
    # Long paragraphs are cut at sentence ends.
    assert all(c.text.rstrip().endswith(".") for c in chunks)
    assert chunks[-1].text.endswith("Short one.")


def test_overlapping_link_spans_keep_the_first(tok):
    piece = tokenize_paragraph(encoder(tok), "AB test", [(0, 1, "A", "x", [1]), (1, 2, "B", "x", [2])])
    assert len(piece.mentions) == 1 and piece.mentions[0].title == "A"


def test_knowledge_ids_fit_the_budget(tok):
    sep = tok.convert_tokens_to_ids("<sep>")
    ids = knowledge_ids(encoder(tok), "Aristotle", "an ancient Greek philosopher " * 20, sep, 16)
    assert len(ids) == 16 and ids[ids.index(sep) - 1] is not None
    assert tok.decode(ids[: ids.index(sep)]) == " Aristotle"  # the word's tokens in running text


def test_title_as_mentioned_respells_only_the_first_letter(tok):
    from kilm_ray.method.chunking import title_as_mentioned

    sep, enc = tok.convert_tokens_to_ids("<sep>"), encoder(tok)
    know = knowledge_ids(enc, "Vowel", "a speech sound", sep, 16)
    respelt = title_as_mentioned(enc, sep, 16, "vowel", "Vowel", know)
    assert tok.decode(respelt) == " vowel<sep> a speech sound"
    assert respelt[: respelt.index(sep)] == enc(" vowel")[0]  # the mention's own tokens
    for surface, title in (("Vowel", "Vowel"), ("sound", "Vowel"), ("iPhone", "iPhone")):
        assert title_as_mentioned(enc, sep, 16, surface, title, know) == know
