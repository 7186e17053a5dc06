"""Tokenized chunks with entity spans: the stored unit of the KILM corpus (no masks baked in).

An article's paragraphs are tokenized once with character offsets; each link with knowledge becomes
a token span; paragraphs are packed into chunks of at most ``max_tokens`` text tokens, and a
paragraph too long for one chunk is cut at a sentence end (else any token) outside every mention.
Pure functions: the tokenizer enters as an ``encode(text) -> (ids, offsets)`` callable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

Encode = Callable[[str], tuple[list[int], list[tuple[int, int]]]]


@dataclass
class Mention:
    start: int  # token span in the chunk, [start, end)
    end: int
    title: str
    source: str  # knowledge source: template | first_sentence | external
    knowledge: list[int]


@dataclass
class Chunk:
    input_ids: list[int]
    mentions: list[Mention]
    text: str


@dataclass
class _Piece:
    ids: list[int]
    mentions: list[Mention]
    text: str
    sentence_end: list[bool] = field(default_factory=list)


def char_span_to_tokens(offsets: Sequence[tuple[int, int]], start: int, end: int) -> Optional[tuple[int, int]]:
    """Token span [i, j) of the tokens overlapping characters [start, end), or None."""
    i = next((k for k, (_, e) in enumerate(offsets) if e > start), None)
    if i is None:
        return None
    j = i
    while j < len(offsets) and offsets[j][0] < end:
        j += 1
    return (i, j) if j > i else None


def tokenize_paragraph(encode: Encode, text: str, links: Sequence[tuple[int, int, str, str, list[int]]]) -> _Piece:
    """Tokens of a paragraph and the token spans of its ``(char_start, char_end, title, source,
    knowledge_ids)`` links; overlapping spans keep the first."""
    ids, offsets = encode(text)
    mentions: list[Mention] = []
    for c_start, c_end, title, source, knowledge in links:
        span = char_span_to_tokens(offsets, c_start, c_end)
        if span is None or (mentions and span[0] < mentions[-1].end):
            continue
        mentions.append(Mention(span[0], span[1], title, source, knowledge))
    sentence_end = [text[e - 1:e] in (".", "!", "?") and (e == len(text) or text[e:e + 1] == " ")
                    for _, e in offsets]
    return _Piece(list(ids), mentions, text, sentence_end)


def _split_long(piece: _Piece, max_tokens: int) -> list[_Piece]:
    """Cut a piece longer than ``max_tokens`` at sentence ends (else anywhere) outside mentions."""
    out = []
    ids, mentions, ends = piece.ids, piece.mentions, piece.sentence_end
    offset = 0
    while len(ids) - offset > max_tokens:
        limit = offset + max_tokens

        def allowed(c: int) -> bool:
            return all(not (m.start < c < m.end) for m in mentions)

        cut = next((c for c in range(limit, offset + max_tokens // 2, -1) if ends[c - 1] and allowed(c)), None)
        if cut is None:
            cut = next((c for c in range(limit, offset, -1) if allowed(c)), limit)
        out.append(_slice(piece, offset, cut))
        offset = cut
    out.append(_slice(piece, offset, len(ids)))
    return out


def _slice(piece: _Piece, a: int, b: int) -> _Piece:
    mentions = [Mention(m.start - a, m.end - a, m.title, m.source, m.knowledge)
                for m in piece.mentions if m.start >= a and m.end <= b]
    return _Piece(piece.ids[a:b], mentions, "", piece.sentence_end[a:b])


def pack_chunks(pieces: Sequence[_Piece], max_tokens: int, newline_ids: Sequence[int],
                min_tokens: int = 1, decode: Optional[Callable[[list[int]], str]] = None) -> list[Chunk]:
    """Greedily pack paragraphs (joined by a newline) into chunks of at most ``max_tokens``."""
    chunks: list[Chunk] = []
    cur_ids: list[int] = []
    cur_mentions: list[Mention] = []

    def flush() -> None:
        nonlocal cur_ids, cur_mentions
        if len(cur_ids) >= min_tokens:
            text = decode(cur_ids) if decode else ""
            chunks.append(Chunk(cur_ids, cur_mentions, text))
        cur_ids, cur_mentions = [], []

    for whole in pieces:
        for piece in _split_long(whole, max_tokens) if len(whole.ids) > max_tokens else [whole]:
            if not piece.ids:
                continue
            sep = list(newline_ids) if cur_ids else []
            if len(cur_ids) + len(sep) + len(piece.ids) > max_tokens:
                flush()
                sep = []
            base = len(cur_ids) + len(sep)
            cur_ids = cur_ids + sep + piece.ids
            cur_mentions += [Mention(m.start + base, m.end + base, m.title, m.source, m.knowledge)
                             for m in piece.mentions]
    flush()
    return chunks


def newline_ids(encode: Encode) -> list[int]:
    """The tokens of the newline that joins two paragraphs in a chunk: a newline after text, whatever
    the tokenizer's ``add_prefix_space`` (which would tokenize a lone "\n" as " \n")."""
    return encode("x\n")[0][len(encode("x")[0]):]


def knowledge_ids(encode: Encode, title: str, description: str, sep_id: int, max_tokens: int) -> list[int]:
    """Tokens of ``Title<sep>description``, the description cut to fit ``max_tokens`` in all. Both
    parts are encoded as words after a space (``ĠTitle``), as the official code's tokenizer sees
    ``<ent_desc> Title <sep> description``: a title then has the tokens of the same words in text."""
    title_ids = encode(" " + title)[0][: max(1, max_tokens // 2)]
    desc_ids = encode(" " + description)[0]
    room = max_tokens - len(title_ids) - 1
    return title_ids + [sep_id] + desc_ids[: max(0, room)]


def title_as_mentioned(encode: Encode, sep_id: int, max_tokens: int, surface: str, title: str,
                       knowledge: Sequence[int]) -> list[int]:
    """Wikipedia titles ignore the case of their first letter (``[[vowel]]`` links the page Vowel).
    When a mention starts with the title's first letter in lower case, spell the title that way in this
    mention's knowledge: the same title, in the tokens the text uses, so a small model trained from
    scratch can copy it instead of learning a capitalised twin of every word (exact match ignores case)."""
    first = title[:1]
    if not (first.isupper() and surface[:1] == first.lower()) or sep_id not in knowledge:
        return list(knowledge)
    rest = list(knowledge[list(knowledge).index(sep_id):])
    title_ids = encode(" " + surface[:1] + title[1:])[0][: max(1, max_tokens // 2)]
    return (title_ids + rest)[:max_tokens]
