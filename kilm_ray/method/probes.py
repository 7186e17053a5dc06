"""Knowledge-probe prompts and the parsing of their outputs (DESIGN.md §1 "Probing"). Pure functions
shared by the Serve endpoints and the evaluation harness, so both ask the model the same way::

    describe:   encoder <s>{left}<ent>{mention}</ent><ent_desc><mask></ent_desc>{right}</s>
                decoder </s><s>{left}<ent>{mention}</ent><ent_desc>  ... -> "{Title}<sep>{description}"
    appositive: the entity's last mention before the slot in <ent></ent>, the slot as <ent_desc><mask></ent_desc>;
                the answer is the text after <sep>
    qa:         encoder "Question: {q}? Answer: <mask>", decoder </s><s> Question: {q}? Answer:
    fill:       encoder = the text with <mask>, decoder </s><s>
    complete:   the text-generation protocols (TGI, OpenAI): a marked mention is a describe probe, a <mask>
                a fill, any other text is continued (encoder <s>{text}<mask></s>, decoder </s><s>{text})

The data-matched baseline (``masking.knowledge_as_text``) learned knowledge as plain text, so it is asked
in plain text, with no slot (``text_*`` below)::

    describe:   encoder <s>{left}{mention}, <mask>,{right}</s>, decoder </s><s>{left}{mention},
                ... -> "{Title}: {description}" up to the ',' that the right context follows
    candidates: "{Title}: {description}," ranked as plain continuations of that decoder prefix

``AnswerStream`` turns generated ids into the answer's fields as they come, one text delta per token,
whose concatenation is exactly the parsed answer.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Sequence

from kilm_ray.method.chunking import char_span_to_tokens, knowledge_ids
from kilm_ray.method.masking import SpecialIds, knowledge_text, slot_sequences


class ProbeError(ValueError):
    """A probe request that cannot be built; the message says what is wrong with the input."""


@functools.lru_cache(maxsize=8)  # per tokenizer object (identity-hashed): asked on every request
def control_tokens(tokenizer) -> tuple[str, ...]:
    """Strings the tokenizer turns into control ids (``<s>``, ``<mask>``, ``<ent>``, ``<sep>``, ...)."""
    return tuple(sorted(set(tokenizer.all_special_tokens), key=lambda t: (-len(t), t)))


def refuse_control_tokens(field: str, text: str, control: Sequence[str], allowed: Sequence[str] = ()) -> None:
    """User text must stay plain text: a literal ``<ent_desc>`` or ``</s>`` would be tokenized as the
    control token and rewrite the prompt (the mention dropped, the decoder prefix cut at the user's token)."""
    found = sorted((t for t in control if t not in allowed and t in text), key=text.index)
    if found:
        raise ProbeError(f"{field}: contains the reserved token{'s' if len(found) > 1 else ''} "
                         f"{', '.join(found)}; remove {'them' if len(found) > 1 else 'it'} (they control the prompt format)")


def _plain(ids: Sequence[int], sp: SpecialIds, allowed: Sequence[int] = ()) -> None:
    """Belt and braces after the string check: no control id came out of user text."""
    control = set(int(t) for t in sp.all()) - set(allowed)
    if any(int(t) in control for t in ids):
        raise ProbeError("the text contains reserved control tokens")


@dataclass
class Prompt:
    encoder_ids: list[int]
    decoder_prefix: list[int]  # forced decoder tokens, starting with </s>
    stop_id: int  # generation ends at this token (or </s>)


def _encode(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], enc["offset_mapping"]


def _slot_prompt(tokenizer, sp: SpecialIds, text: str, start: int, end: int, slot_char: Optional[int]) -> Prompt:
    ids, offsets = _encode(tokenizer, text)
    _plain(ids, sp)
    span = char_span_to_tokens(offsets, start, end)
    if span is None:
        raise ProbeError("the mention covers no tokens")
    slot = span[1]
    if slot_char is not None:
        slot = next((i for i, (s, _) in enumerate(offsets) if s >= slot_char), len(ids))
        slot = max(slot, span[1])
    source, _, _ = slot_sequences(ids, span[0], span[1], None, sp, slot=slot)
    desc_at = int(list(source).index(sp.desc))
    return Prompt([int(t) for t in source], [sp.eos] + [int(t) for t in source[: desc_at + 1]], sp.desc_end)


def describe_prompt(tokenizer, sp: SpecialIds, left: str, mention: str, right: str) -> Prompt:
    if not mention.strip():
        raise ProbeError("'mention' is empty")
    control = control_tokens(tokenizer)
    for field, value in (("left", left), ("mention", mention), ("right", right)):
        refuse_control_tokens(field, value, control)
    text = left + mention + right
    return _slot_prompt(tokenizer, sp, text, len(left), len(left) + len(mention), None)


def mention_parts(text: Optional[str], left: Optional[str], mention: Optional[str],
                  right: Optional[str]) -> tuple[str, str, str]:
    """The mention and its context, from ``text`` with ``<ent>...</ent>`` or from ``left``/``mention``/``right``."""
    if text is not None:
        if left is not None or mention is not None or right is not None:
            raise ProbeError("give either 'text' with <ent>...</ent> or 'left'/'mention'/'right', not both")
        return split_marked_text(text)
    if mention is None:
        raise ProbeError("missing the mention: give 'text' with <ent>...</ent>, or 'mention' (with optional "
                         "'left' and 'right')")
    return left or "", mention, right or ""


def split_marked_text(text: str, open_tag: str = "<ent>", close_tag: str = "</ent>") -> tuple[str, str, str]:
    """``"... <ent>Aristotle</ent> ..."`` -> (left, mention, right)."""
    a = text.find(open_tag)
    b = text.find(close_tag, a + len(open_tag)) if a >= 0 else -1
    if a < 0 or b < 0:
        raise ProbeError(f"'text' must mark the mention as {open_tag}...{close_tag}")
    if text.find(open_tag, b) >= 0:
        raise ProbeError(f"'text' marks more than one mention with {open_tag}")
    return text[:a], text[a + len(open_tag): b], text[b + len(close_tag):]


def appositive_prompt(tokenizer, sp: SpecialIds, text: str, mention: str, slot_marker: str = "<appos>") -> Prompt:
    """``text`` holds the slot marker once; the last occurrence of ``mention`` before it is the entity."""
    if text.count(slot_marker) != 1:
        raise ProbeError(f"'text' must contain the slot marker {slot_marker} exactly once")
    control = control_tokens(tokenizer)
    refuse_control_tokens("text", text, control)
    refuse_control_tokens("mention", mention, control)
    slot_char = text.index(slot_marker)
    plain = text.replace(slot_marker, "")
    start = plain.rfind(mention, 0, slot_char) if mention else -1
    if start < 0:
        raise ProbeError(f"the mention {mention!r} does not occur before the slot")
    return _slot_prompt(tokenizer, sp, plain, start, start + len(mention), slot_char)


def qa_prompt(tokenizer, sp: SpecialIds, question: str, exemplars: Sequence[tuple[str, str]] = (),
              variant: int = 2, max_input_tokens: Optional[int] = None) -> Prompt:
    """Zero- or few-shot QA (``kilm_ray.method.fewshot``): the exemplars and the question in prompt
    ``variant``, the answer in the ``<mask>``. Past ``max_input_tokens`` the earliest tokens go (the
    question asked is at the end), as the official code keeps the last 974."""
    from kilm_ray.method.fewshot import qa_text

    if not question.strip().rstrip("?").strip():
        raise ProbeError("'question' is empty")
    control = control_tokens(tokenizer)
    refuse_control_tokens("question", question, control)
    for k, (q, a) in enumerate(exemplars):
        refuse_control_tokens(f"exemplar {k}", q + " " + a, control)
    # The space after "Answer: " goes, as BART's <mask> (lstrip) absorbs it and the official few-shot decoder
    # prefix (inputs[:-2]) ends before it: variants 1 and 2 differ in the exemplars' answers.
    stem_ids = _encode(tokenizer, qa_text(question, exemplars, variant).rstrip())[0]
    _plain(stem_ids, sp)
    if max_input_tokens is not None and len(stem_ids) + 3 > max_input_tokens:
        stem_ids = stem_ids[len(stem_ids) + 3 - max_input_tokens:]
    return Prompt([sp.bos, *stem_ids, sp.mask, sp.eos],
                  [sp.eos, sp.bos, *stem_ids], sp.eos)


def fill_prompt(tokenizer, sp: SpecialIds, text: str) -> Prompt:
    if "<mask>" not in text:
        raise ProbeError("'text' must contain at least one <mask>")
    refuse_control_tokens("text", text, control_tokens(tokenizer), allowed=("<mask>",))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    _plain(ids, sp, allowed=(sp.mask,))
    return Prompt([sp.bos, *ids, sp.eos], [sp.eos, sp.bos], sp.eos)


def continuation_prompt(tokenizer, sp: SpecialIds, text: str) -> Prompt:
    """Continue ``text``: BART reconstructs it from ``<s>{text}<mask></s>`` with the text forced as the
    decoder's prefix, so what it generates is what follows (the QA prompt is this with a question stem)."""
    if not text.strip():
        raise ProbeError("the prompt is empty")
    refuse_control_tokens("prompt", text, control_tokens(tokenizer))
    ids = _encode(tokenizer, text)[0]
    _plain(ids, sp)
    return Prompt([sp.bos, *ids, sp.mask, sp.eos], [sp.eos, sp.bos, *ids], sp.eos)


COMPLETION_KINDS = ("describe", "fill", "continue")


def completion_prompt(tokenizer, sp: SpecialIds, text: str) -> tuple[Prompt, str]:
    """The prompt of the text-generation protocols (TGI ``inputs``, OpenAI ``prompt``) and its kind: a
    mention marked ``<ent>...</ent>`` asks for its knowledge (``Title<sep>description``), text with
    ``<mask>`` is filled (the whole text comes back), any other text is continued."""
    if "<ent>" in text or "</ent>" in text:
        left, mention, right = split_marked_text(text)
        refuse_control_tokens("prompt", left + mention + right, control_tokens(tokenizer))
        return describe_prompt(tokenizer, sp, left, mention, right), "describe"
    if "<mask>" in text:
        return fill_prompt(tokenizer, sp, text), "fill"
    return continuation_prompt(tokenizer, sp, text), "continue"


def build_prompt(tokenizer, sp: SpecialIds, task: str, fields: dict) -> Prompt:
    """The prompt of a generating probe (``describe``, ``appositive``, ``qa``, ``fill``, ``complete``) from
    its request fields; a ProbeError names what is wrong with them."""
    if task == "describe":
        left, mention, right = mention_parts(fields.get("text"), fields.get("left"), fields.get("mention"),
                                             fields.get("right"))
        if fields.get("text") is not None:
            refuse_control_tokens("text", left + mention + right, control_tokens(tokenizer))
        return describe_prompt(tokenizer, sp, left, mention, right)
    if task == "appositive":
        return appositive_prompt(tokenizer, sp, fields["text"], fields["mention"])
    if task == "qa":
        return qa_prompt(tokenizer, sp, fields["question"])
    if task == "fill":
        return fill_prompt(tokenizer, sp, fields["text"])
    if task == "complete":
        return completion_prompt(tokenizer, sp, fields["prompt"])[0]
    raise ValueError(f"unknown task {task!r}")


# The answer's fields, in the order they are generated, and the token that moves to the next one.
ANSWER_FIELDS = {"describe": ("title", "description"), "appositive": ("title", "appositive"),
                 "qa": ("answer",), "fill": ("text",), "complete": ("text",)}


class AnswerStream:
    """Generated ids -> the answer's fields, a text delta per token. The concatenated deltas of a field
    are exactly what ``parse_knowledge`` / ``parse_text`` give for the same ids (a delta is held back while
    the text so far ends in whitespace, which the parse strips, or in a partial UTF-8 character).

    ``complete`` (the text-generation protocols) is raw: special tokens such as ``<sep>`` stay in the text,
    nothing is stripped, and only the stop token (which ends the answer) is left out."""

    def __init__(self, tokenizer, sp: SpecialIds, task: str, stop_ids: Sequence[int] = ()):
        self.tokenizer, self.sp, self.task = tokenizer, sp, task
        self.fields = ANSWER_FIELDS[task]
        self.raw = task == "complete"
        if self.raw:
            self.stops = frozenset(int(t) for t in stop_ids)
        else:
            self.stops = frozenset((sp.desc_end, sp.eos) if len(self.fields) == 2 else (sp.eos,))
        self.field = 0
        self.ids: dict[str, list[int]] = {f: [] for f in self.fields}
        self.sent: dict[str, str] = {f: "" for f in self.fields}
        self.done = False

    def _text(self, field: str) -> str:
        return self.tokenizer.decode(self.ids[field], skip_special_tokens=not self.raw,
                                     clean_up_tokenization_spaces=False)

    def feed(self, token: int) -> tuple[str, str]:
        """(field, text delta) for one generated token; after a stop token, nothing more is taken."""
        name = self.fields[self.field]
        if self.done:
            return name, ""
        if int(token) in self.stops:
            self.done = True
            return name, ""
        if not self.raw and int(token) == self.sp.sep and self.field + 1 < len(self.fields):
            self.field += 1
            return self.fields[self.field], ""
        self.ids[name].append(int(token))
        text = self._text(name)
        ready = text if self.raw else text.lstrip().rstrip()
        ready = ready.rstrip("\ufffd")  # a partial UTF-8 character waits for its next byte
        return name, self._advance(name, ready)

    def _advance(self, name: str, ready: str) -> str:
        sent = self.sent[name]
        if not ready.startswith(sent) or len(ready) <= len(sent):
            return ""
        self.sent[name] = ready
        return ready[len(sent):]

    def finish(self) -> dict[str, tuple[str, str]]:
        """Each field's whole text and the delta not yet sent (held back until now)."""
        out = {}
        for name in self.fields:
            text = self._text(name)
            text = text if self.raw else text.strip()
            sent = self.sent[name]
            out[name] = (text, text[len(sent):] if text.startswith(sent) else "")
            self.sent[name] = text
        return out


def candidate_continuation(tokenizer, sp: SpecialIds, title: str, description: str, max_tokens: int,
                           field: str = "candidate") -> list[int]:
    """The scored continuation of a disambiguation candidate, ``Title<sep>description</ent_desc>``, at most
    ``max_tokens`` long: the title keeps up to half, the description is cut (never the whole request refused)."""
    control = control_tokens(tokenizer)
    refuse_control_tokens(f"{field}.title", title, control)
    refuse_control_tokens(f"{field}.description", description, control)
    if max_tokens < 3:
        raise ProbeError(f"no room to score {field}: {max_tokens} tokens left after the prompt")
    ids = knowledge_ids(lambda text: _encode(tokenizer, text), title, description, sp.sep, max_tokens - 1)
    _plain(ids, sp, allowed=(sp.sep,))
    return ids + [sp.desc_end]


def prompt_from_example(input_ids: Sequence[int], labels: Sequence[int], sp: SpecialIds) -> Prompt:
    """The describe prompt of a stored evaluation example (its slot already masked)."""
    labels = [int(t) for t in labels]
    desc_at = labels.index(sp.desc)
    return Prompt([int(t) for t in input_ids], [sp.eos] + labels[: desc_at + 1], sp.desc_end)


def parse_knowledge(tokenizer, sp: SpecialIds, generated: Sequence[int]) -> tuple[str, str]:
    """Generated tokens after ``<ent_desc>`` -> (title, description), cut at ``</ent_desc>``."""
    ids = until(generated, (sp.desc_end, sp.eos))
    if sp.sep in ids:
        cut = ids.index(sp.sep)
        title_ids, desc_ids = ids[:cut], ids[cut + 1:]
    else:
        title_ids, desc_ids = ids, []
    return _decode(tokenizer, title_ids), _decode(tokenizer, desc_ids)


def parse_text(tokenizer, sp: SpecialIds, generated: Sequence[int]) -> str:
    return _decode(tokenizer, until(generated, (sp.eos,)))


def gold_knowledge(tokenizer, sp: SpecialIds, labels: Sequence[int]) -> tuple[str, str]:
    labels = [int(t) for t in labels]
    return parse_knowledge(tokenizer, sp, labels[labels.index(sp.desc) + 1:])


def until(ids: Sequence[int], stops: tuple[int, ...]) -> list[int]:
    """The tokens before the first of ``stops``."""
    out = []
    for t in ids:
        if int(t) in stops:
            break
        out.append(int(t))
    return out


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()


# ----------------------------------------------------------------------------------------------
# Knowledge as plain text: the data-matched baseline's probes
# ----------------------------------------------------------------------------------------------


def text_prompt_from_ids(ids: Sequence[int], end: int, sp: SpecialIds) -> Prompt:
    """``<s>{text up to the mention's end}, <mask>,{rest}</s>``, the decoder forced up to the first comma:
    the appositive's place, as the baseline saw knowledge in training (token ``end`` ends the mention)."""
    if sp.comma < 0:
        raise ProbeError("this tokenizer has no single ',' token: the plain-text probe needs one")
    ids = [int(t) for t in ids]
    if not 0 < end <= len(ids):
        raise ProbeError(f"bad mention end {end} for {len(ids)} tokens")
    head = [sp.bos, *ids[:end], sp.comma]
    return Prompt(head + [sp.mask, sp.comma, *ids[end:], sp.eos], [sp.eos, *head], sp.eos)


def text_describe_prompt(tokenizer, sp: SpecialIds, left: str, mention: str, right: str) -> Prompt:
    """:func:`text_prompt_from_ids` of a request given as text (the word-sense probe's examples)."""
    if not mention.strip():
        raise ProbeError("'mention' is empty")
    control = control_tokens(tokenizer)
    for field, value in (("left", left), ("mention", mention), ("right", right)):
        refuse_control_tokens(field, value, control)
    ids, offsets = _encode(tokenizer, left + mention + right)
    _plain(ids, sp)
    span = char_span_to_tokens(offsets, len(left), len(left) + len(mention))
    if span is None:
        raise ProbeError("the mention covers no tokens")
    return text_prompt_from_ids(ids, span[1], sp)


def text_candidate_continuation(tokenizer, sp: SpecialIds, title: str, description: str, max_tokens: int,
                                field: str = "candidate") -> list[int]:
    """A candidate as the baseline would write it: ``Title: description,`` (at most ``max_tokens``)."""
    ids = candidate_continuation(tokenizer, sp, title, description, max_tokens, field)[:-1]
    return knowledge_text(ids, sp) + [sp.comma]


def cut_text_knowledge(generated: Sequence[int], right: Sequence[int], sp: SpecialIds, max_tokens: int,
                       match: int = 3) -> list[int]:
    """The appositive in a plain-text generation: the tokens before the first ``,`` that the right
    context (its first ``match`` tokens, or ``</s>`` where there is none) follows; without one, the first
    ``max_tokens`` (the longest knowledge trained on) before any ``</s>``."""
    gen = [int(t) for t in generated]
    want = [int(t) for t in right[:match]] or [sp.eos]
    for i, t in enumerate(gen):
        if t == sp.eos:
            return gen[:min(i, max_tokens)]
        if t == sp.comma:
            after = gen[i + 1: i + 1 + len(want)]
            if after and after == want[:len(after)]:
                return gen[:i]
            if not after and i == len(gen) - 1:
                return gen[:i]
    return gen[:max_tokens]


def parse_text_knowledge(tokenizer, sp: SpecialIds, knowledge: Sequence[int]) -> tuple[str, str]:
    """``Title: description`` tokens -> (title, description), split at the first ``:``."""
    ids = [int(t) for t in knowledge]
    if sp.colon in ids:
        cut = ids.index(sp.colon)
        return _decode(tokenizer, ids[:cut]), _decode(tokenizer, ids[cut + 1:])
    return _decode(tokenizer, ids), ""
