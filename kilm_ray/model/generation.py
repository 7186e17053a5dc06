"""Batched generation and scoring with forced decoder prefixes of different lengths.

KILM probes force a long decoder prefix (``</s><s>{left}<ent>{mention}</ent><ent_desc>``) that
differs in length from request to request. BART's decoder gives every row of a batch the same
positions (``arange + cache length``), so plain left padding would shift the positions of padded
rows. ``left_padded_positions`` patches the decoder's position embedding *instance* (no weights
change, state dict untouched) to subtract each row's padding, which lets one batch hold mixed-length
prefixes; results equal generating each alone.

Greedy decoding is a step loop of our own (``greedy_steps``): it yields every step's tokens (the Serve
replica streams them) and keeps only the chosen tokens' log-probabilities. Beam search is Hugging Face's
``generate`` without ``output_scores``, followed by one teacher-forced pass for the chosen answers'
log-probabilities. Neither holds a ``rows x vocabulary`` tensor per generated step.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import types
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch


def _offset_forward(self, input_ids, cache_length: int = 0, position_ids=None):
    offsets = self._kilm_left_pad
    if offsets is None:
        return self._kilm_original_forward(input_ids, cache_length, position_ids=position_ids)
    bsz = input_ids.shape[0]
    seq_len = input_ids.shape[1]
    if position_ids is None:
        position_ids = torch.arange(cache_length, cache_length + seq_len, device=self.weight.device)
    if bsz % offsets.shape[0]:
        raise RuntimeError(f"position offsets for {offsets.shape[0]} rows on a batch of {bsz}: another call's "
                           "offsets (left_padded_positions must not be held across a yield)")
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


@contextlib.contextmanager
def last_position_logits(model) -> Iterator[None]:
    """Within the block, the LM head projects only the last position of a sequence. BART's generate has no
    ``logits_to_keep``: its first step projected every position of every forced prefix (128 rows x 16
    prefix tokens x 50 k: 412 MB, twice with the bias; a 500-token prefix: 13 GB), and used only the last."""
    head = model.lm_head
    original = head.forward
    head.forward = lambda hidden: original(hidden[:, -1:] if hidden.dim() == 3 else hidden)
    try:
        yield
    finally:
        del head.forward  # the class's forward again


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
    token_logprobs: list[float]  # log-probability of each new token under the model (greedy and beam alike)
    finish_reason: str = "stop"  # "stop": a stop token ended it; "length": the token budget did

    @property
    def mean_logprob(self) -> float:
        """Mean log-probability of the new tokens: the same quantity for greedy and beam answers."""
        return sum(self.token_logprobs) / len(self.token_logprobs) if self.token_logprobs else 0.0

    def truncated(self, n: int) -> "Generated":
        """The first ``n`` tokens (greedy decoding is prefix-consistent, so this equals generating n)."""
        if len(self.tokens) <= n:
            return self
        return Generated(self.tokens[:n], self.token_logprobs[:n], "length")


@dataclass
class Step:
    """One row's token of one greedy step: the token, its log-probability and, when asked, the most
    likely alternatives ``[(token, logprob), ...]`` (best first, the chosen one included)."""
    token: int
    logprob: float
    top: Optional[list[tuple[int, float]]] = None


def per_row(value: int | Sequence[int], rows: int) -> list[int]:
    """A setting given once for all rows or once per row, as one int per row."""
    return [int(value)] * rows if isinstance(value, int) else [int(v) for v in value]


def token_budgets(prefix_lengths: Sequence[int], max_new_tokens: int | Sequence[int], max_positions: int) -> list[int]:
    """New tokens each row may generate: its own ask, within the learned positions after its own prefix
    (never the longest prefix of the batch, so a neighbour cannot shorten a row's answer)."""
    asks = per_row(max_new_tokens, len(prefix_lengths))
    return [max(0, min(int(ask), max_positions - int(n))) for ask, n in zip(asks, prefix_lengths)]


def generation_groups(rows: Sequence[tuple], max_positions: int) -> list[list[int]]:
    """Which requests of a dynamic batch may share one ``generate`` call without changing each other's answer.

    ``rows`` are ``(prefix length, max_new_tokens, num_beams, stop ids[, model key])``. All greedy rows of one
    model share one call: each stops at its own stop tokens and budget. Beam search is not prefix-consistent,
    so beam rows share a call only with the same beam width, stop tokens and effective budget. Rows of
    different models (a rollout swapped the model between two requests) never share a call."""
    groups: dict[tuple, list[int]] = {}
    for i, (prefix_len, max_new, beams, stops, *model) in enumerate(rows):
        key: tuple = (tuple(model), beams)
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


def _row_stops(stop_ids: Sequence[int] | Sequence[Sequence[int]], rows: int) -> list[list[int]]:
    if stop_ids and not isinstance(stop_ids[0], int):
        return [[int(t) for t in s] for s in stop_ids]
    return [[int(t) for t in stop_ids]] * rows


def _logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head on the given hidden states only (BART adds ``final_logits_bias``), in float32."""
    logits = model.lm_head(hidden)
    bias = getattr(model, "final_logits_bias", None)
    if bias is not None:
        logits = logits + bias.view(-1).to(logits.dtype)
    return logits.float()


def repeated_ngram_tokens(tokens: Sequence[int], n: int) -> list[int]:
    """The tokens that, appended to ``tokens``, would make an n-gram that already occurs in them."""
    if n <= 0 or len(tokens) < n:
        return []
    context = tuple(tokens[len(tokens) - n + 1:])
    return sorted({tokens[j + n - 1] for j in range(len(tokens) - n + 1) if tuple(tokens[j:j + n - 1]) == context})


def cache_keyword(parameter_names) -> str:
    """The name under which a decoder forward takes (and its output returns) the key/value cache.

    transformers 5.24 renamed ``past_key_values`` to ``cache`` (the keyword and ``Seq2SeqModelOutput``'s field;
    the old names stay as deprecated aliases, with a warning, until 5.40); 5.0 to 5.23 know only
    ``past_key_values`` and put an unknown ``cache=`` into ``**kwargs`` unread, so the choice must come from
    the signature, never from trying one name."""
    names = set(parameter_names)
    if "cache" in names:
        return "cache"
    if "past_key_values" in names:
        return "past_key_values"
    raise TypeError(f"a forward that takes neither cache nor past_key_values: {sorted(names)}")


@functools.lru_cache(maxsize=None)
def _model_cache_keyword(model_class: type) -> str:
    return cache_keyword(inspect.signature(model_class.forward).parameters)


@torch.no_grad()
def greedy_steps(model, encoder_ids: Sequence[Sequence[int]], prefixes: Sequence[Sequence[int]], pad_id: int,
                 stop_ids: Sequence[int] | Sequence[Sequence[int]], max_new_tokens: int | Sequence[int] = 32,
                 top_n: int = 0, stopped: Optional[Callable[[int], bool]] = None,
                 no_repeat_ngram_size: int | Sequence[int] = 0) -> Iterator[list[Optional[Step]]]:
    """Greedy decoding of a batch, one step at a time: yields, per step, a list with a ``Step`` for each row
    that made a token and ``None`` for rows already done. Row ``i`` is done after one of its stop ids, after
    its own budget, or once ``stopped(i)`` is true (its client left, a stop string matched).

    Only each row's chosen token, its log-probability and ``top_n`` alternatives are kept: one step holds
    one ``rows x vocabulary`` logits tensor, whatever the length (generate's ``output_scores`` held all of
    them). Rows are independent: a row's tokens equal decoding it alone (left padding with shifted
    positions, ``left_padded_positions``).

    ``no_repeat_ngram_size`` n > 0 (one for all rows or one per row): a token that would repeat an n-gram
    of the row's own continuation is never chosen (the prefix is not counted: a title copied from the
    mention before the slot is no repeat). The reported log-probabilities stay the model's."""
    n = len(prefixes)
    row_stops = [set(s) for s in _row_stops(stop_ids, n)]
    device = next(model.parameters()).device
    budgets = token_budgets([len(p) for p in prefixes], max_new_tokens, model.config.max_position_embeddings)
    running = [b > 0 for b in budgets]
    if not any(running):
        return
    input_ids, attention = _pad(encoder_ids, pad_id, left=False, device=device)
    dec_ids, dec_mask = _pad(prefixes, pad_id, left=True, device=device)
    pads = (dec_mask == 0).sum(dim=1)
    encoded = model.get_encoder()(input_ids=input_ids, attention_mask=attention).last_hidden_state
    made: list[list[int]] = [[] for _ in range(n)]  # each row's tokens so far
    no_repeat = per_row(no_repeat_ngram_size, n)
    cache = None
    cache_kw = _model_cache_keyword(type(model.model))  # "cache" from transformers 5.24, else "past_key_values"
    step_ids, mask = dec_ids, dec_mask
    while any(running):
        # The patched positions hold for this forward only, never across a yield: while the caller has the
        # step (a Serve replica forwards it, then scores another request on the same model), the model is
        # the plain one again (held across yields, a scoring pass took this batch's offsets: wrong scores,
        # or a shape error when the counts did not divide).
        with left_padded_positions(model, pads):
            out = model.model(encoder_outputs=(encoded,), attention_mask=attention, decoder_input_ids=step_ids,
                              decoder_attention_mask=mask, use_cache=True, **{cache_kw: cache})
        cache = getattr(out, cache_kw)  # the output field has the same name as the keyword
        logits = _logits(model, out.last_hidden_state[:, -1])
        logprobs = torch.log_softmax(logits, dim=-1)
        if any(no_repeat):
            logits = logits.clone()
            for i in range(n):
                if running[i] and no_repeat[i]:
                    banned = repeated_ngram_tokens(made[i], no_repeat[i])
                    if banned:
                        logits[i, banned] = float("-inf")
        chosen = logits.argmax(dim=-1)
        picked = logprobs.gather(1, chosen.view(-1, 1)).view(-1).tolist()
        top = logprobs.topk(top_n, dim=-1) if top_n else None
        tokens = chosen.tolist()
        step: list[Optional[Step]] = [None] * n
        for i in range(n):
            if not running[i]:
                tokens[i] = pad_id
                continue
            alternatives = None
            if top is not None:
                alternatives = list(zip(top.indices[i].tolist(), top.values[i].tolist()))
            step[i] = Step(tokens[i], float(picked[i]), alternatives)
            made[i].append(tokens[i])
            if tokens[i] in row_stops[i] or len(made[i]) >= budgets[i]:
                running[i] = False
        yield step
        if stopped is not None:
            for i in range(n):
                if running[i] and stopped(i):
                    running[i] = False
        step_ids = torch.tensor(tokens, dtype=torch.long, device=device).view(-1, 1)
        mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=device)], dim=1)


def greedy(model, encoder_ids, prefixes, pad_id, stop_ids, max_new_tokens=32,
           no_repeat_ngram_size: int = 0) -> list[Generated]:
    """``greedy_steps`` run to the end: each row's tokens, log-probabilities and finish reason."""
    n = len(prefixes)
    row_stops = _row_stops(stop_ids, n)
    tokens: list[list[int]] = [[] for _ in range(n)]
    logprobs: list[list[float]] = [[] for _ in range(n)]
    for step in greedy_steps(model, encoder_ids, prefixes, pad_id, stop_ids, max_new_tokens,
                             no_repeat_ngram_size=no_repeat_ngram_size):
        for i, s in enumerate(step):
            if s is not None:
                tokens[i].append(s.token)
                logprobs[i].append(s.logprob)
    return [Generated(t, lp, "stop" if t and t[-1] in row_stops[i] else "length")
            for i, (t, lp) in enumerate(zip(tokens, logprobs))]


@torch.no_grad()
def beam_search(model, encoder_ids, prefixes, pad_id, stop_ids, max_new_tokens, num_beams) -> list[Generated]:
    """Hugging Face beam search without ``output_scores`` (it keeps every step's ``beams x vocabulary``
    scores: 3.3 GB for 32 requests x 4 beams x 128 tokens at BART's vocabulary); the chosen answers'
    token log-probabilities come from one teacher-forced pass over them instead."""
    row_stops = _row_stops(stop_ids, len(prefixes))
    budgets = token_budgets([len(p) for p in prefixes], max_new_tokens, model.config.max_position_embeddings)
    if len(set(budgets)) > 1 or any(set(s) != set(row_stops[0]) for s in row_stops):
        raise ValueError(f"beam search rows need one budget and one stop list, got budgets {sorted(set(budgets))}")
    if budgets[0] <= 0:
        return [Generated([], [], "length") for _ in prefixes]
    device = next(model.parameters()).device
    input_ids, attention = _pad(encoder_ids, pad_id, left=False, device=device)
    dec_ids, dec_mask = _pad(prefixes, pad_id, left=True, device=device)
    pads = (dec_mask == 0).sum(dim=1)
    with left_padded_positions(model, pads), last_position_logits(model):
        sequences = model.generate(
            input_ids=input_ids, attention_mask=attention, decoder_input_ids=dec_ids, decoder_attention_mask=dec_mask,
            max_new_tokens=budgets[0], num_beams=num_beams, do_sample=False, eos_token_id=sorted(row_stops[0]),
            pad_token_id=pad_id, forced_bos_token_id=None, forced_eos_token_id=None, no_repeat_ngram_size=0,
            length_penalty=1.0, early_stopping=True, min_length=0, output_scores=False, return_dict_in_generate=False)
    width = dec_ids.shape[1]
    rows = [_finish(row, row_stops[0], pad_id, budgets[0]) for row in sequences[:, width:].tolist()]
    logprobs = token_logprobs(model, [(e, p, t) for e, p, (t, _) in zip(encoder_ids, prefixes, rows)], pad_id)
    return [Generated(t, lp, reason) for (t, reason), lp in zip(rows, logprobs)]


def generate(model, encoder_ids: Sequence[Sequence[int]], prefixes: Sequence[Sequence[int]], pad_id: int,
             eos_id: int, stop_ids: Sequence[int] | Sequence[Sequence[int]], max_new_tokens: int | Sequence[int] = 32,
             num_beams: int = 1, no_repeat_ngram_size: int = 0) -> list[Generated]:
    """Continue each forced decoder prefix; stop at any of ``stop_ids`` (one list for all, or one per row)
    or after the row's own budget (``max_new_tokens``, one for all or one per row, within the learned
    positions after its prefix).

    Greedy rows are independent: each row's tokens equal generating it alone. Beam search is not
    prefix-consistent, so rows of one beam call need one budget and one stop list (the Serve model groups
    them so)."""
    if not any(_row_stops(stop_ids, len(prefixes))):
        raise ValueError("every row needs a stop id (e.g. </s>)")
    if num_beams > 1:
        return beam_search(model, encoder_ids, prefixes, pad_id, stop_ids, max_new_tokens, num_beams)
    return greedy(model, encoder_ids, prefixes, pad_id, stop_ids, max_new_tokens, no_repeat_ngram_size)


def _continuation_logprobs(model, hidden: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
                           targets: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """log p(target) at the given (row, position) pairs only: the vocabulary projection and softmax run on
    the scored positions, ``chunk`` at a time (256 x 50 k logits: 51 MB), never on every position."""
    out = []
    for a in range(0, len(rows), chunk):
        logprobs = torch.log_softmax(_logits(model, hidden[rows[a: a + chunk], positions[a: a + chunk]]), dim=-1)
        out.append(logprobs.gather(1, targets[a: a + chunk].view(-1, 1)).view(-1))
    return torch.cat(out) if out else torch.zeros(0)


def _score_rows(model, encoder_kwargs: dict, prefixes: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
                pad_id: int) -> list[list[float]]:
    """Each continuation's token log-probabilities after its forced prefix (teacher forcing)."""
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
    picked = picked.tolist()
    out, at = [], 0
    for cont in continuations:
        out.append(picked[at: at + len(cont)])
        at += len(cont)
    return out


@torch.no_grad()
def token_logprobs(model, items: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]],
                   pad_id: int) -> list[list[float]]:
    """The log-probability of each token of each ``(encoder_ids, forced prefix, continuation)``, in one
    teacher-forced batch (right padding: positions are the usual ones)."""
    nonempty = [i for i, (_, _, c) in enumerate(items) if len(c)]
    out: list[list[float]] = [[] for _ in items]
    if not nonempty:
        return out
    device = next(model.parameters()).device
    enc, enc_mask = _pad([items[i][0] for i in nonempty], pad_id, left=False, device=device)
    scored = _score_rows(model, {"input_ids": enc, "attention_mask": enc_mask}, [items[i][1] for i in nonempty],
                         [items[i][2] for i in nonempty], pad_id)
    for i, lps in zip(nonempty, scored):
        out[i] = lps
    return out


def score_continuations(model, items: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]],
                        pad_id: int) -> list[tuple[float, int]]:
    """(sum log-probability, token count) of each ``(encoder_ids, forced prefix, continuation)``."""
    return [(float(sum(lps)), len(lps)) for lps in token_logprobs(model, items, pad_id)]


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
        results += [(float(sum(lps)), len(lps)) for lps in
                    _score_rows(model, kwargs, [prefix] * n, [continuations[i] for i in group], pad_id)]
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

