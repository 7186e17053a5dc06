"""KILM sample construction and BART text infilling: pure functions of token ids (numpy, no Ray,
no torch). Every random choice is drawn from ``sample_rng(seed, epoch, sample_id)``, so the same
sample is built identically in preprocessing tests, the training loader, Ray Data, Tune trials and
the benchmark, and after any resume or re-scale.

Formats (DESIGN.md §1)::

    source: <s>{left}<ent>{mention}</ent><ent_desc><mask></ent_desc>{right}</s>   (+ text infilling)
    target: <s>{left}<ent>{mention}</ent><ent_desc>{Title}<sep>{description}</ent_desc>{right}</s>
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

LABEL_PAD = -100


@dataclass(frozen=True)
class SpecialIds:
    bos: int
    eos: int
    pad: int
    mask: int
    ent: int
    ent_end: int
    desc: int
    desc_end: int
    sep: int
    # Plain-text tokens of knowledge written as text (the data-matched baseline, masking.knowledge_as_text):
    # "," around the appositive, ":" between title and description. -1 = unknown (a dataset made before).
    comma: int = -1
    colon: int = -1

    def all(self) -> np.ndarray:
        """The control ids (never masked, never plain text)."""
        return np.array([self.bos, self.eos, self.pad, self.mask, self.ent, self.ent_end, self.desc,
                         self.desc_end, self.sep], dtype=np.int64)


@dataclass(frozen=True)
class MaskingParams:
    mask_ratio: float = 0.3
    poisson_lambda: float = 3.0
    knowledge_prob: float = 1.0
    entities_per_chunk: int = 1  # linked entities marked per chunk (at most; the paper marks one)
    knowledge_slot: bool = True  # False: marked as <ent>mention</ent> only (the fair baseline)
    knowledge_as_text: bool = False  # with knowledge_slot False: "mention, Title: description," as plain text

    @classmethod
    def from_config(cls, masking, knowledge_prob: Optional[float] = None) -> "MaskingParams":
        prob = masking.knowledge_prob if knowledge_prob is None else knowledge_prob
        return cls(masking.mask_ratio, masking.poisson_lambda, prob, masking.entities_per_chunk,
                   masking.knowledge_slot, getattr(masking, "knowledge_as_text", False))


@dataclass
class Entity:
    start: int  # token span of the mention inside the chunk's text tokens, [start, end)
    end: int
    knowledge: Sequence[int]  # token ids of "Title<sep>description"


@dataclass
class Example:
    input_ids: np.ndarray  # encoder tokens
    labels: np.ndarray  # decoder targets (the whole target sequence)
    knowledge: np.ndarray  # bool per label: inside the knowledge slot (knowledge tokens and </ent_desc>)
    sample_id: int
    entity: int = -1  # index of the entity given a knowledge slot, -1 for none


def sample_rng(seed: int, epoch: int, sample_id: int) -> np.random.Generator:
    """The only source of randomness for one sample in one epoch."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFFFFFF, int(epoch), int(sample_id) & 0x7FFFFFFFFFFFFFFF])


def slot_sequences(ids: Sequence[int], start: int, end: int, knowledge: Optional[Sequence[int]],
                   sp: SpecialIds, slot: Optional[int] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source, target, knowledge mask over target) with the mention ``ids[start:end]`` marked and a
    knowledge slot after token ``slot`` (default: right after the mention). ``knowledge=None`` gives
    the source only (the target equals the source then; for probes)."""
    slot = end if slot is None else slot
    if not (0 <= start < end <= slot <= len(ids)):
        raise ValueError(f"bad mention span [{start}, {end}) / slot {slot} for {len(ids)} tokens")
    ids = list(ids)
    head = [sp.bos, *ids[:start], sp.ent, *ids[start:end], sp.ent_end, *ids[end:slot], sp.desc]
    tail = [sp.desc_end, *ids[slot:], sp.eos]
    source = np.array(head + [sp.mask] + tail, dtype=np.int64)
    if knowledge is None:
        return source, source.copy(), np.zeros(len(source), dtype=bool)
    knowledge = list(knowledge)
    target = np.array(head + knowledge + tail, dtype=np.int64)
    in_slot = np.zeros(len(target), dtype=bool)
    in_slot[len(head): len(head) + len(knowledge) + 1] = True  # + </ent_desc>: knowing where to stop
    return source, target, in_slot


def knowledge_text(knowledge: Sequence[int], sp: SpecialIds) -> list[int]:
    """``Title<sep>description`` as plain text: ``Title: description`` (the ``<sep>`` id becomes ``:``)."""
    if sp.colon < 0 or sp.comma < 0:
        raise ValueError("this dataset's special ids have no plain ',' and ':' tokens (made before "
                         "masking.knowledge_as_text existed): rerun kilm-ray preprocess")
    return [sp.colon if int(t) == sp.sep else int(t) for t in knowledge]


def appositive_sequences(ids: Sequence[int], entities: Sequence[Entity],
                         sp: SpecialIds) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The data-matched baseline's text: each of ``entities`` followed by its knowledge as a plain-text
    appositive, ``mention, Title: description,``, in source and target alike (no markup, nothing forced
    into a mask: BART text infilling decides what is masked). The knowledge mask covers the knowledge
    and its closing comma, as KILM's covers the knowledge and ``</ent_desc>``."""
    seq: list[int] = [sp.bos]
    in_slot: list[bool] = [False]
    pos = 0
    for ent in entities:
        if not (pos <= ent.start < ent.end <= len(ids)):
            raise ValueError(f"bad or overlapping mention span [{ent.start}, {ent.end}) for {len(ids)} tokens")
        head = [*ids[pos:ent.end], sp.comma]
        know = knowledge_text(ent.knowledge, sp)
        seq += head + know + [sp.comma]
        in_slot += [False] * len(head) + [True] * (len(know) + 1)
        pos = ent.end
    seq += [*ids[pos:], sp.eos]
    in_slot += [False] * (len(ids) - pos + 1)
    source = np.array(seq, dtype=np.int64)
    return source, source.copy(), np.array(in_slot, dtype=bool)


def marked_sequences(ids: Sequence[int], entities: Sequence[Entity], sp: SpecialIds,
                     knowledge_slot: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source, target, knowledge mask over target) with each of ``entities`` (sorted, non-overlapping)
    marked as ``<ent>mention</ent>``, followed by its knowledge slot when ``knowledge_slot``: masked in
    the source, ``Title<sep>description`` in the target. One entity with a slot = :func:`slot_sequences`."""
    source: list[int] = [sp.bos]
    target: list[int] = [sp.bos]
    in_slot: list[bool] = [False]
    pos = 0
    for ent in entities:
        if not (pos <= ent.start < ent.end <= len(ids)):
            raise ValueError(f"bad or overlapping mention span [{ent.start}, {ent.end}) for {len(ids)} tokens")
        marked = [*ids[pos:ent.start], sp.ent, *ids[ent.start:ent.end], sp.ent_end]
        source += marked
        target += marked
        in_slot += [False] * len(marked)
        if knowledge_slot:
            knowledge = [int(t) for t in ent.knowledge]
            source += [sp.desc, sp.mask, sp.desc_end]
            target += [sp.desc, *knowledge, sp.desc_end]
            in_slot += [False] + [True] * (len(knowledge) + 1)  # + </ent_desc>: knowing where to stop
        pos = ent.end
    tail = [*ids[pos:], sp.eos]
    source += tail
    target += tail
    in_slot += [False] * len(tail)
    return (np.array(source, dtype=np.int64), np.array(target, dtype=np.int64), np.array(in_slot, dtype=bool))


def plain_sequences(ids: Sequence[int], sp: SpecialIds) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    seq = np.array([sp.bos, *ids, sp.eos], dtype=np.int64)
    return seq, seq.copy(), np.zeros(len(seq), dtype=bool)


def text_infilling(tokens: np.ndarray, rng: np.random.Generator, ratio: float, poisson_lambda: float,
                   sp: SpecialIds, return_spans: bool = False):
    """BART text infilling. Budget = ceil(ratio * non-special tokens); span lengths ~ Poisson(lambda),
    zero lengths dropped; spans stop at special tokens and at already-masked tokens; each run of
    masked tokens becomes one ``<mask>``. Returns the new tokens (and the drawn span lengths)."""
    maskable = ~np.isin(tokens, sp.all())
    n_maskable = int(maskable.sum())
    budget = math.ceil(ratio * n_maskable - 1e-9)
    drawn: list[int] = []
    if budget == 0:
        return (tokens.copy(), drawn) if return_spans else tokens.copy()
    masked = np.zeros(len(tokens), dtype=bool)
    remaining = budget
    while remaining > 0:
        for length in rng.poisson(poisson_lambda, size=int(remaining / max(poisson_lambda, 0.5)) + 4):
            if length == 0:
                continue
            drawn.append(int(length))
            free = np.flatnonzero(maskable & ~masked)
            pos = int(free[rng.integers(len(free))])
            span = 0
            while span < length and remaining > 0 and pos < len(tokens) and maskable[pos] and not masked[pos]:
                masked[pos] = True
                pos += 1
                span += 1
                remaining -= 1
            if remaining == 0:
                break
    # Collapse: keep unmasked tokens and the first token of each masked run (as <mask>).
    run_start = masked & ~np.concatenate(([False], masked[:-1]))
    out = tokens.copy()
    out[run_start] = sp.mask
    out = out[~masked | run_start]
    return (out, drawn) if return_spans else out


def build_train_example(ids: Sequence[int], entities: Sequence[Entity], sample_id: int, seed: int,
                        epoch: int, params: MaskingParams, sp: SpecialIds) -> Example:
    """One training example: with probability ``knowledge_prob`` up to ``entities_per_chunk`` entities
    (uniform, without replacement) are marked and get knowledge slots (or markup only, for the
    baseline; or their knowledge as a plain-text appositive, for the data-matched baseline), the other
    links stay plain text; then text infilling on the source."""
    rng = sample_rng(seed, epoch, sample_id)
    chosen: list[int] = []
    if entities and params.knowledge_prob > 0 and rng.random() < params.knowledge_prob:
        if params.entities_per_chunk == 1 or len(entities) == 1:
            chosen = [int(rng.integers(len(entities)))]  # the one-entity draw of earlier versions, kept
        else:
            k = min(params.entities_per_chunk, len(entities))
            chosen = sorted(int(i) for i in rng.choice(len(entities), size=k, replace=False))
    if chosen and params.knowledge_as_text and not params.knowledge_slot:
        source, target, in_slot = appositive_sequences(ids, [entities[i] for i in chosen], sp)
    elif chosen:
        source, target, in_slot = marked_sequences(ids, [entities[i] for i in chosen], sp, params.knowledge_slot)
    else:
        source, target, in_slot = plain_sequences(ids, sp)
    source = text_infilling(source, rng, params.mask_ratio, params.poisson_lambda, sp)
    return Example(source, target, in_slot, sample_id, chosen[0] if chosen else -1)


def build_eval_examples(ids: Sequence[int], entities: Sequence[Entity], sample_id: int, max_entities: int,
                        sp: SpecialIds) -> list[Example]:
    """Evaluation: one example per entity (the first ``max_entities``), only its knowledge masked."""
    out = []
    for index, ent in enumerate(entities[:max_entities]):
        source, target, in_slot = slot_sequences(ids, ent.start, ent.end, ent.knowledge, sp)
        out.append(Example(source, target, in_slot, sample_id, index))
    return out


def build_retention_example(ids: Sequence[int], sample_id: int, seed: int, params: MaskingParams,
                            sp: SpecialIds) -> Example:
    """Plain BART text infilling on text without entity structure (the retention test)."""
    rng = sample_rng(seed, 0, sample_id)
    source, target, in_slot = plain_sequences(ids, sp)
    return Example(text_infilling(source, rng, params.mask_ratio, params.poisson_lambda, sp), target, in_slot,
                   sample_id)


def collate(examples: Sequence[Example], sp: SpecialIds, knowledge_weight: float = 1.0,
            pad_to_multiple: int = 8, weights_scale: Optional[Sequence[float]] = None) -> dict[str, np.ndarray]:
    """Pad a list of examples into arrays: input_ids, attention_mask, decoder_input_ids (labels
    shifted right after ``</s>``, as BART), labels (-100 on padding), label_weights (0 on padding,
    ``knowledge_weight`` on knowledge tokens, 1 elsewhere; times ``weights_scale[i]`` per example),
    knowledge_mask."""
    def padded_len(n: int) -> int:
        return int(math.ceil(n / pad_to_multiple) * pad_to_multiple)

    batch = len(examples)
    src_len = padded_len(max(len(e.input_ids) for e in examples))
    tgt_len = padded_len(max(len(e.labels) for e in examples))
    input_ids = np.full((batch, src_len), sp.pad, dtype=np.int64)
    attention = np.zeros((batch, src_len), dtype=np.int64)
    labels = np.full((batch, tgt_len), LABEL_PAD, dtype=np.int64)
    decoder_in = np.full((batch, tgt_len), sp.pad, dtype=np.int64)
    weights = np.zeros((batch, tgt_len), dtype=np.float32)
    knowledge = np.zeros((batch, tgt_len), dtype=bool)
    for i, ex in enumerate(examples):
        n, m = len(ex.input_ids), len(ex.labels)
        input_ids[i, :n] = ex.input_ids
        attention[i, :n] = 1
        labels[i, :m] = ex.labels
        decoder_in[i, 0] = sp.eos
        decoder_in[i, 1:m] = ex.labels[: m - 1]
        w = np.where(ex.knowledge, knowledge_weight, 1.0).astype(np.float32)
        weights[i, :m] = w * (1.0 if weights_scale is None else weights_scale[i])
        knowledge[i, :m] = ex.knowledge
    return {"input_ids": input_ids, "attention_mask": attention, "decoder_input_ids": decoder_in,
            "labels": labels, "label_weights": weights, "knowledge_mask": knowledge}
