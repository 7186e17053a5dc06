"""Validation during training: fixed example sets, losses reduced over every worker, and (rank 0)
the title accuracy of greedy descriptions."""

from __future__ import annotations

import logging
import math
from typing import Callable, Optional

import torch

from kilm_ray.config import KilmConfig
from kilm_ray.store.loader import SampleStore, eval_example_list
from kilm_ray.method.masking import MaskingParams, SpecialIds, collate
from kilm_ray.model.bart import token_losses
from kilm_ray.train.metrics import LossSums

log = logging.getLogger("kilm_ray.train")


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def forward_losses(engine, batch: dict) -> torch.Tensor:
    encoder_mask, causal_mask = attention_masks(batch, engine.module.config._attn_implementation,
                                                engine.module.get_input_embeddings().weight.dtype)
    out = engine(input_ids=batch["input_ids"], attention_mask=encoder_mask, decoder_input_ids=batch["decoder_input_ids"],
                 decoder_attention_mask=causal_mask, use_cache=False)
    return token_losses(out.logits, batch["labels"])


def attention_masks(batch: dict, attn_implementation: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The 4-D masks BART's attention uses, built here from the padding mask: the encoder's padding
    (``(B, 1, 1, S)``, also the decoder's cross-attention mask) and the decoder's causal mask
    (``(1, 1, T, T)``). Given 2-D masks, transformers reads each back to the host to decide whether it
    may skip it (``padding_mask.all()``: three device syncs per forward); 4-D masks are used as they
    are. Boolean (True = attend) for SDPA, additive for eager attention; the same attention either way."""
    padding = batch["attention_mask"].bool()[:, None, None, :]
    t = batch["decoder_input_ids"].shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=padding.device).tril()[None, None]
    if attn_implementation == "sdpa":
        return padding, causal
    low = torch.finfo(dtype).min
    return (torch.zeros(padding.shape, dtype=dtype, device=padding.device).masked_fill(~padding, low),
            torch.zeros(causal.shape, dtype=dtype, device=padding.device).masked_fill(~causal, low))


class Validation:
    """Fixed example sets, the same across epochs and masking settings so trials compare:

    - ``valid``: the valid split's mentions (held-out articles) in the evaluation format (one sample
      per entity, only its knowledge masked);
    - ``valid_text`` / ``train_text``: plain BART text infilling (seeded masks, no entity markup) on
      held-out text and on the first training chunks. Their pair over training gives retention at
      matched training loss (``kilm-ray compare``): held-out infilling loss where both models fit
      their training text equally well.

    ``all_reduce(tensor)`` sums a device tensor over the workers (in place)."""

    def __init__(self, stores: dict[str, Optional[SampleStore]], cfg: KilmConfig, sp: SpecialIds, rank: int,
                 world_size: int, all_reduce: Callable[[torch.Tensor], None]):
        self.sets = {}
        n = cfg.train.eval_max_samples
        text_params = MaskingParams.from_config(cfg.masking, knowledge_prob=0.0)
        for split, name in (("valid", "valid"), ("valid", "valid_text"), ("train", "train_text")):
            store = stores.get(split)
            if store is None:
                continue
            if name == "valid":
                examples = eval_example_list(store, n, cfg.data.max_eval_entities, sp)
            else:
                examples = [store.retention_example(i, cfg.eval.seed, text_params, sp)
                            for i in range(min(len(store), n) if n else len(store))]
            if examples:
                self.sets[name] = examples
        self.cfg, self.sp, self.rank, self.world_size, self.all_reduce = cfg, sp, rank, world_size, all_reduce

    @torch.no_grad()
    def run(self, engine, device: torch.device) -> dict[str, float]:
        engine.eval()
        metrics: dict[str, float] = {}
        micro = self.cfg.train.micro_batch_size
        weight = self.cfg.masking.knowledge_loss_weight
        for split, examples in self.sets.items():
            shard = examples[self.rank:: self.world_size]
            # Every rank runs the same number of forwards (ZeRO-3 gathers weights in forward).
            n_batches = math.ceil(math.ceil(len(examples) / self.world_size) / micro)
            sums = LossSums(device)
            for b in range(n_batches):
                part = shard[b * micro: (b + 1) * micro]
                batch = collate(part or examples[:1], self.sp, weight, weights_scale=None if part else [0.0])
                if not part:
                    batch["knowledge_mask"][:] = False
                    batch["labels"][:] = -100
                batch = to_device({k: torch.from_numpy(v) for k, v in batch.items()}, device)
                sums.add_batch(forward_losses(engine, batch), batch)
            vector = sums.vector()
            self.all_reduce(vector)
            total = LossSums.totals(vector.tolist()).summary(prefix=f"{split}_")
            metrics.update(total if split == "valid" else {f"{split}_loss": total[f"{split}_loss"]})
        engine.train()
        return metrics

    def describe_accuracy(self, engine, tokenizer, n: int) -> dict[str, float]:
        """Title exact match of greedy descriptions on the first ``n`` valid samples (rank 0)."""
        from kilm_ray.method.metrics import exact_match
        from kilm_ray.model.generation import greedy_describe
        from kilm_ray.method.probes import gold_knowledge, parse_knowledge, prompt_from_example

        examples = self.sets.get("valid", [])[:n]
        if not examples:
            return {}
        sp = self.sp
        model = engine.module
        model.eval()
        prompts = [prompt_from_example(e.input_ids, e.labels, sp) for e in examples]
        outputs = greedy_describe(model, prompts, sp, max_new_tokens=self.cfg.data.max_knowledge_tokens + 1,
                                  batch_size=16)
        hits = [exact_match(parse_knowledge(tokenizer, sp, o.tokens)[0], gold_knowledge(tokenizer, sp, e.labels)[0])
                for o, e in zip(outputs, examples)]
        model.train()
        return {"description_accuracy": sum(hits) / len(hits)}
