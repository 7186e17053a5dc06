"""Batched generation and scoring with forced decoder prefixes of different lengths.

KILM probes force a long decoder prefix (``</s><s>{left}<ent>{mention}</ent><ent_desc>``) that
differs in length from request to request. BART's decoder gives every row of a batch the same
positions (``arange + cache length``), so plain left padding would shift the positions of padded
rows. ``left_padded_positions`` patches the decoder's position embedding *instance* (no weights
change, state dict untouched) to subtract each row's padding, which lets Hugging Face ``generate``
(greedy or beam) run one batch of mixed-length prefixes; results equal generating each alone.
"""

from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch


def _offset_forward(self, input_ids, cache_length: int = 0, position_ids=None):
    offsets = self._kilm_left_pad
    if offsets is None:
        return self._kilm_original_forward(input_ids, cache_length, position_ids=position_ids)
    bsz = input_ids.shape[0]
    seq_len = input_ids.shape[1]
    if position_ids is None:
        position_ids = torch.arange(cache_length, cache_length + seq_len, device=self.weight.device)
    if offsets.shape[0] != bsz:  # beams: each input's row is repeated num_beams times
        offsets = offsets.repeat_interleave(bsz // offsets.shape[0])
    positions = position_ids.view(1, -1) - offsets.view(-1, 1).to(position_ids.device)
    # A row whose own budget is spent may run on while a longer row finishes; its extra tokens are cut
    # off afterwards, so clamping its positions only keeps the lookup in range and changes no kept token.
    positions = positions.clamp(min=0, max=self.num_embeddings - self.offset - 1)
    return torch.nn.Embedding.forward(self, positions + self.offset)


@contextlib.contextmanager
def left_padded_positions(model, pads: torch.Tensor) -> Iterator[None]:
    """Within the block, decoder row ``i`` starts its positions after ``pads[i]`` padding tokens."""
    emb = model.get_decoder().embed_positions
    if not hasattr(emb, "_kilm_original_forward"):
        emb._kilm_original_forward = emb.forward
        emb._kilm_left_pad = None
        emb.forward = types.MethodType(_offset_forward, emb)
    emb._kilm_left_pad = pads
    try:
        yield
    finally:
        emb._kilm_left_pad = None


def _pad(seqs: Sequence[Sequence[int]], pad_id: int, left: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if left:
            ids[i, width - len(s):] = torch.tensor(list(s), dtype=torch.long)
            mask[i, width - len(s):] = 1
        else:
            ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
            mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


@dataclass
class Generated:
    tokens: list[int]  # new tokens after the forced prefix
    score: float  # mean log-probability of the new tokens (HF sequence score for beams)
    token_logprobs: Optional[list[float]] = None  # greedy only: one per token
    finish_reason: str = "stop"  # "stop": a stop token ended it; "length": the token budget did

    def truncated(self, n: int) -> "Generated":
        """The first ``n`` tokens (greedy decoding is prefix-consistent, so this equals generating n)."""
        if len(self.tokens) <= n or self.token_logprobs is None:
            return self
        lps = self.token_logprobs[:n]
        return Generated(self.tokens[:n], sum(lps) / max(len(lps), 1), lps, "length")


def token_budgets(prefix_lengths: Sequence[int], max_new_tokens: int | Sequence[int], max_positions: int) -> list[int]:
    """New tokens each row may generate: its own ask, within the learned positions after its own prefix
    (never the longest prefix of the batch, so a neighbour cannot shorten a row's answer)."""
    asks = [max_new_tokens] * len(prefix_lengths) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    return [max(0, min(int(ask), max_positions - int(n))) for ask, n in zip(asks, prefix_lengths)]


def generation_groups(rows: Sequence[tuple[int, int, int, tuple[int, ...]]], max_positions: int) -> list[list[int]]:
    """Which requests of a dynamic batch may share one ``generate`` call without changing each other's answer.

    ``rows`` are ``(prefix length, max_new_tokens, num_beams, stop ids)``. All greedy rows share one call:
    each stops at its own stop tokens and budget (a per-row stopping criterion). Beam search is not
    prefix-consistent, so beam rows share a call only with the same beam width, stop tokens and effective
    budget."""
    groups: dict[tuple, list[int]] = {}
    for i, (prefix_len, max_new, beams, stops) in enumerate(rows):
        key: tuple = (beams,)
        if beams > 1:
            key += (tuple(stops), token_budgets([prefix_len], max_new, max_positions)[0])
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def _finish(row: Sequence[int], stop_ids: Sequence[int], pad_id: int, budget: int) -> tuple[list[int], str]:
    tokens: list[int] = []
    for t in row[:budget]:
        if t == pad_id and tokens and tokens[-1] in stop_ids:
            break
        tokens.append(t)
        if t in stop_ids:
            return tokens, "stop"
    return tokens, "length"


class _RowStops:
    """HF stopping criterion (per-row booleans): row i is done at one of its own stop ids or after its own
    budget, so rows with different stops and lengths share one greedy call and the call ends with its
    longest *running* row."""

    def __init__(self, stops: list[set[int]], budgets: list[int], start: int):
        self.stops, self.budgets, self.start = stops, budgets, start

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        made = input_ids.shape[1] - self.start
        last = input_ids[:, -1].tolist()
        return torch.tensor([t in s or made >= b for t, s, b in zip(last, self.stops, self.budgets)],
                            dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def generate(model, encoder_ids: Sequence[Sequence[int]], prefixes: Sequence[Sequence[int]], pad_id: int,
             eos_id: int, stop_ids: Sequence[int] | Sequence[Sequence[int]], max_new_tokens: int | Sequence[int] = 32,
             num_beams: int = 1) -> list[Generated]:
    """Continue each forced decoder prefix; stop at any of ``stop_ids`` (one list for all, or one per row)
    or after the row's own budget (``max_new_tokens``, one for all or one per row, within the learned
    positions after its prefix).

    Greedy rows are independent: each row's tokens equal generating it alone. Beam search is not
    prefix-consistent, so rows of one beam call need one budget and one stop list (the Serve model groups
    them so)."""
    if stop_ids and not isinstance(stop_ids[0], int):
        row_stops = [[int(t) for t in s] for s in stop_ids]
    else:
        row_stops = [[int(t) for t in stop_ids]] * len(prefixes)
    common = sorted(set.intersection(*(set(s) for s in row_stops))) if row_stops else []
    device = next(model.parameters()).device
    budgets = token_budgets([len(p) for p in prefixes], max_new_tokens, model.config.max_position_embeddings)
    steps = max(budgets)
    if num_beams > 1 and (len(set(budgets)) > 1 or len(common) != len(set(row_stops[0]))):
        raise ValueError(f"beam search rows need one budget and one stop list, got budgets {sorted(set(budgets))}")
    if not common:
        raise ValueError("rows must share at least one stop id (e.g. </s>)")
    if steps <= 0:
        return [Generated([], 0.0, [], "length") for _ in prefixes]
    input_ids, attention = _pad(encoder_ids, pad_id, left=False, device=device)
    dec_ids, dec_mask = _pad(prefixes, pad_id, left=True, device=device)
    pads = (dec_mask == 0).sum(dim=1)
    extra = {}
    if num_beams == 1 and (len(set(budgets)) > 1 or any(len(set(s)) != len(common) for s in row_stops)):
        from transformers import StoppingCriteriaList

        extra["stopping_criteria"] = StoppingCriteriaList(
            [_RowStops([set(s) for s in row_stops], budgets, dec_ids.shape[1])])
    with left_padded_positions(model, pads):
        out = model.generate(
            input_ids=input_ids, attention_mask=attention, decoder_input_ids=dec_ids, decoder_attention_mask=dec_mask,
            max_new_tokens=steps, num_beams=num_beams, do_sample=False, eos_token_id=common,
            pad_token_id=pad_id, forced_bos_token_id=None, forced_eos_token_id=None, no_repeat_ngram_size=0,
            length_penalty=1.0, early_stopping=True if num_beams > 1 else False, min_length=0,
            return_dict_in_generate=True, output_scores=True, **extra)
    width = dec_ids.shape[1]
    new = out.sequences[:, width:].tolist()
    beam_scores = out.sequences_scores.tolist() if num_beams > 1 and out.sequences_scores is not None else None
    step_logprobs = None if beam_scores else model.compute_transition_scores(
        out.sequences, out.scores, normalize_logits=True).float().tolist()
    results = []
    for i, (row, budget) in enumerate(zip(new, budgets)):
        tokens, reason = _finish(row, row_stops[i], pad_id, budget)
        if beam_scores is not None:
            results.append(Generated(tokens, float(beam_scores[i]), None, reason))
        else:
            lps = [float(x) for x in step_logprobs[i][: len(tokens)]]
            results.append(Generated(tokens, sum(lps) / max(len(lps), 1), lps, reason))
    return results


def _continuation_logprobs(model, hidden: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
                           targets: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """log p(target) at the given (row, position) pairs only: the vocabulary projection and softmax run on
    the scored positions, in chunks, never on every position of every row."""
    out = []
    bias = getattr(model, "final_logits_bias", None)
    for a in range(0, len(rows), chunk):
        h = hidden[rows[a: a + chunk], positions[a: a + chunk]]
        logits = model.lm_head(h)
        if bias is not None:
            logits = logits + bias.view(-1).to(logits.dtype)
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        out.append(logprobs.gather(1, targets[a: a + chunk].view(-1, 1)).view(-1))
    return torch.cat(out) if out else torch.zeros(0)


def _score_rows(model, encoder_kwargs: dict, prefixes: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
                pad_id: int) -> list[tuple[float, int]]:
    device = next(model.parameters()).device
    dec, dec_mask = _pad([list(p) + list(c) for p, c in zip(prefixes, continuations)], pad_id, left=False,
                         device=device)
    hidden = model.model(decoder_input_ids=dec[:, :-1], decoder_attention_mask=dec_mask[:, :-1],
                         **encoder_kwargs).last_hidden_state
    rows, positions, targets = [], [], []
    for i, (prefix, cont) in enumerate(zip(prefixes, continuations)):
        start = len(prefix) - 1  # the hidden state at t predicts token t + 1
        rows += [i] * len(cont)
        positions += range(start, start + len(cont))
        targets += [int(t) for t in cont]
    picked = _continuation_logprobs(model, hidden, torch.tensor(rows, device=device),
                                    torch.tensor(positions, device=device), torch.tensor(targets, device=device))
    out, at = [], 0
    for cont in continuations:
        out.append((float(picked[at: at + len(cont)].sum()), len(cont)))
        at += len(cont)
    return out


@torch.no_grad()
def score_continuations(model, items: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]],
                        pad_id: int) -> list[tuple[float, int]]:
    """(sum log-probability, token count) of each ``(encoder_ids, forced prefix, continuation)``, in one
    teacher-forced batch (right padding: positions are the usual ones)."""
    device = next(model.parameters()).device
    enc, enc_mask = _pad([e for e, _, _ in items], pad_id, left=False, device=device)
    return _score_rows(model, {"input_ids": enc, "attention_mask": enc_mask}, [p for _, p, _ in items],
                       [c for _, _, c in items], pad_id)


def token_budget_batches(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Consecutive index groups whose padded size (rows x longest) stays within ``budget`` tokens; a row
    longer than the budget goes alone."""
    groups: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i, n in enumerate(lengths):
        if current and (len(current) + 1) * max(longest, n) > budget:
            groups.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    if current:
        groups.append(current)
    return groups


@torch.no_grad()
def score_candidates(model, encoder_ids: Sequence[int], prefix: Sequence[int], continuations: Sequence[Sequence[int]],
                     pad_id: int, token_budget: int = 4096) -> list[tuple[float, int]]:
    """Score many continuations of one prompt: the encoder runs once, the decoder in sub-batches of at most
    ``token_budget`` padded tokens, so the cost depends on this prompt only (never on its neighbours)."""
    device = next(model.parameters()).device
    enc = torch.tensor([list(encoder_ids)], dtype=torch.long, device=device)
    mask = torch.ones_like(enc)
    encoded = model.get_encoder()(input_ids=enc, attention_mask=mask)
    results: list[tuple[float, int]] = []
    lengths = [len(prefix) + len(c) for c in continuations]
    for group in token_budget_batches(lengths, token_budget):
        n = len(group)
        hidden = encoded.last_hidden_state.expand(n, -1, -1)
        kwargs = {"encoder_outputs": (hidden,), "attention_mask": mask.expand(n, -1)}
        results += _score_rows(model, kwargs, [prefix] * n, [continuations[i] for i in group], pad_id)
    return results


def batched(items: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(items), size):
        yield items[i: i + size]


def default_device(requested: str = "auto") -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def greedy_describe(model, prompts: Sequence, sp, max_new_tokens: int, batch_size: int,
                    num_beams: int = 1) -> list[Generated]:
    """Generate the knowledge of many describe prompts, in batches."""
    results: list[Generated] = []
    for chunk in batched(list(prompts), batch_size):
        results += generate(model, [p.encoder_ids for p in chunk], [p.decoder_prefix for p in chunk], sp.pad,
                            sp.eos, [sp.desc_end, sp.eos], max_new_tokens, num_beams)
    return results

