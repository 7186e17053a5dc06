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
    positions = (position_ids.view(1, -1) - offsets.view(-1, 1).to(position_ids.device)).clamp(min=0)
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

    def truncated(self, n: int) -> "Generated":
        """The first ``n`` tokens (greedy decoding is prefix-consistent, so this equals generating n)."""
        if len(self.tokens) <= n or self.token_logprobs is None:
            return self
        lps = self.token_logprobs[:n]
        return Generated(self.tokens[:n], sum(lps) / max(len(lps), 1), lps)


@torch.no_grad()
def generate(model, encoder_ids: Sequence[Sequence[int]], prefixes: Sequence[Sequence[int]], pad_id: int,
             eos_id: int, stop_ids: Sequence[int], max_new_tokens: int = 32, num_beams: int = 1) -> list[Generated]:
    """Continue each forced decoder prefix; stop at any of ``stop_ids`` or after ``max_new_tokens``."""
    device = next(model.parameters()).device
    input_ids, attention = _pad(encoder_ids, pad_id, left=False, device=device)
    dec_ids, dec_mask = _pad(prefixes, pad_id, left=True, device=device)
    pads = (dec_mask == 0).sum(dim=1)
    # Never decode past the learned positions (prefix + new tokens <= max_position_embeddings).
    room = model.config.max_position_embeddings - int((dec_mask.sum(dim=1)).max())
    max_new_tokens = min(max_new_tokens, room)
    if max_new_tokens <= 0:
        return [Generated([], 0.0, []) for _ in prefixes]
    with left_padded_positions(model, pads):
        out = model.generate(
            input_ids=input_ids, attention_mask=attention, decoder_input_ids=dec_ids, decoder_attention_mask=dec_mask,
            max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False, eos_token_id=list(stop_ids),
            pad_token_id=pad_id, forced_bos_token_id=None, forced_eos_token_id=None, no_repeat_ngram_size=0,
            length_penalty=1.0, early_stopping=True if num_beams > 1 else False, min_length=0,
            return_dict_in_generate=True, output_scores=True)
    width = dec_ids.shape[1]
    new = out.sequences[:, width:].tolist()
    beam_scores = out.sequences_scores.tolist() if num_beams > 1 and out.sequences_scores is not None else None
    step_logprobs = None if beam_scores else model.compute_transition_scores(
        out.sequences, out.scores, normalize_logits=True).float().tolist()
    results = []
    for i, row in enumerate(new):
        tokens: list[int] = []
        for t in row:
            if t == pad_id and tokens and tokens[-1] in stop_ids:
                break
            tokens.append(t)
            if t in stop_ids:
                break
        if beam_scores is not None:
            results.append(Generated(tokens, float(beam_scores[i])))
        else:
            lps = [float(x) for x in step_logprobs[i][: len(tokens)]]
            results.append(Generated(tokens, sum(lps) / max(len(lps), 1), lps))
    return results


@torch.no_grad()
def score_continuations(model, items: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]],
                        pad_id: int) -> list[tuple[float, int]]:
    """(sum log-probability, token count) of each ``(encoder_ids, forced prefix, continuation)``, in one
    teacher-forced batch (right padding: positions are the usual ones)."""
    device = next(model.parameters()).device
    enc, enc_mask = _pad([e for e, _, _ in items], pad_id, left=False, device=device)
    dec, dec_mask = _pad([list(p) + list(c) for _, p, c in items], pad_id, left=False, device=device)
    logits = model(input_ids=enc, attention_mask=enc_mask, decoder_input_ids=dec[:, :-1],
                   decoder_attention_mask=dec_mask[:, :-1]).logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    out = []
    for i, (_, prefix, cont) in enumerate(items):
        start = len(prefix) - 1  # logits at t predict token t + 1
        targets = torch.tensor(list(cont), device=device)
        picked = logprobs[i, start: start + len(cont)].gather(1, targets.view(-1, 1)).sum()
        out.append((float(picked), len(cont)))
    return out


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

