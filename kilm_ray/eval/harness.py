"""The evaluation harness: knowledge probes and retention on a preprocessed dataset.

- Description generation (valid_seen / valid_unseen): the describe probe of every stored entity
  mention; exact match of the generated title, token F1 and ROUGE-L of the description.
- Zero-shot entity disambiguation: mentions whose anchor text links to several targets in the
  corpus; candidates ranked by the mean log-probability of their knowledge string; accuracy
  against the linked target and against the most-frequent-target baseline. Optionally, names with
  several WordNet senses (a knowledge-base file in WordNet shape).
- Retention: BART text-infilling loss / perplexity on held-out text without entity structure.
- Zero-shot QA on ``question<TAB>answer[<TAB>answer...]`` lines: EM and F1 (max over answers).

Prompts come from ``kilm_ray.probes`` and decoding from ``kilm_ray.generation``: the same code as
the Serve endpoints.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from kilm_ray.config import KilmConfig
from kilm_ray.eval.metrics import best_over, exact_match, mean, rouge_l, token_f1
from kilm_ray.loader import SampleStore, special_ids_of
from kilm_ray.masking import MaskingParams, SpecialIds, collate
from kilm_ray.probes import Prompt, gold_knowledge, parse_knowledge, parse_text, prompt_from_example, qa_prompt

log = logging.getLogger("kilm_ray.eval")


@dataclass
class Mention:
    split: str
    row: int  # position in the split's store
    entity: int  # index among the chunk's entities
    surface: str
    title: str
    knowledge: list[int]


def iter_mentions(store: SampleStore, split: str, tokenizer, max_entities: int):
    for i in range(len(store)):
        ids = store.ids(i)
        for j, (ent, title) in enumerate(zip(store.entities(i)[:max_entities], store.entity_titles(i))):
            surface = tokenizer.decode(ids[ent.start:ent.end], skip_special_tokens=True).strip()
            yield Mention(split, i, j, surface, title, [int(t) for t in ent.knowledge])


# ----------------------------------------------------------------------------------------------
# Description generation
# ----------------------------------------------------------------------------------------------


def describe_eval(model, tokenizer, sp: SpecialIds, store: SampleStore, cfg: KilmConfig) -> dict[str, Any]:
    from kilm_ray.generation import greedy_describe

    examples = []
    for i in range(len(store)):
        for ex in store.eval_examples(i, cfg.data.max_eval_entities, sp):
            examples.append(ex)
            if cfg.eval.max_samples and len(examples) >= cfg.eval.max_samples:
                break
        if cfg.eval.max_samples and len(examples) >= cfg.eval.max_samples:
            break
    if not examples:
        return {"samples": 0}
    prompts = [prompt_from_example(e.input_ids, e.labels, sp) for e in examples]
    outputs = greedy_describe(model, prompts, sp, cfg.eval.max_new_tokens, cfg.eval.batch_size, cfg.eval.num_beams)
    em, f1, rl, shown = [], [], [], []
    for ex, out in zip(examples, outputs):
        title, desc = parse_knowledge(tokenizer, sp, out.tokens)
        gold_title, gold_desc = gold_knowledge(tokenizer, sp, ex.labels)
        em.append(exact_match(title, gold_title))
        f1.append(token_f1(desc, gold_desc))
        rl.append(rouge_l(desc, gold_desc))
        if len(shown) < 8:
            shown.append({"gold": f"{gold_title} <sep> {gold_desc}", "generated": f"{title} <sep> {desc}"})
    return {"samples": len(examples), "title_exact_match": mean(em), "description_f1": mean(f1),
            "description_rouge_l": mean(rl), "examples": shown}


# ----------------------------------------------------------------------------------------------
# Zero-shot entity disambiguation
# ----------------------------------------------------------------------------------------------


@dataclass
class DisambiguationItem:
    mention: Mention
    candidates: list[tuple[str, list[int]]]  # (title, knowledge ids)
    gold: int
    baseline: int  # index of the most frequent candidate
    source: str  # anchor | wordnet


def anchor_items(stores: dict[str, SampleStore], tokenizer, cfg: KilmConfig) -> list[DisambiguationItem]:
    """Mentions (in validation splits) whose surface text links to several titles in the corpus."""
    counts: dict[str, Counter] = defaultdict(Counter)  # anchor -> linked titles, whole corpus
    train_counts: dict[str, Counter] = defaultdict(Counter)  # ... in train only: the baseline's prior
    knowledge: dict[str, list[int]] = {}
    mentions: list[Mention] = []
    for split, store in stores.items():
        for m in iter_mentions(store, split, tokenizer, 10**6):
            knowledge.setdefault(m.title, m.knowledge)
            counts[m.surface.lower()][m.title] += 1
            if split == "train":
                train_counts[m.surface.lower()][m.title] += 1
            else:
                mentions.append(m)
    items = []
    for m in mentions:
        titles = counts[m.surface.lower()]
        if len(titles) < 2:
            continue
        ranked = [t for t, _ in titles.most_common()][: cfg.eval.max_candidates]
        if m.title not in ranked:
            ranked[-1] = m.title
        prior = train_counts[m.surface.lower()]
        baseline_title = max(ranked, key=lambda t: (prior[t], titles[t], t))
        items.append(DisambiguationItem(m, [(t, knowledge[t]) for t in ranked], ranked.index(m.title),
                                        ranked.index(baseline_title), "anchor"))
    return items


def wordnet_items(stores: dict[str, SampleStore], tokenizer, sp: SpecialIds, kb_file: str,
                  cfg: KilmConfig) -> list[DisambiguationItem]:
    """Mentions whose title has several WordNet senses; gold = the sense the data used."""
    from kilm_ray.chunking import knowledge_ids
    from kilm_ray.corpus.knowledge import KBStats, iter_jsonl, kb_keys_for_title, wordnet_description

    senses: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for _, row in iter_jsonl(kb_file, KBStats()):
        if "gloss" in row and isinstance(row.get("name"), str):
            senses[row["name"].lower()].append((int(row.get("sense", 1)), wordnet_description(row["gloss"])))

    def encode(text: str):
        return tokenizer(text, add_special_tokens=False)["input_ids"], None

    items = []
    for split, store in stores.items():
        if split == "train":
            continue
        for m in iter_mentions(store, split, tokenizer, 10**6):
            key = next((k for k in kb_keys_for_title(m.title) if len(senses.get(k, [])) >= 2), None)
            if key is None:
                continue
            options = sorted(senses[key])[: cfg.eval.max_candidates]
            cands = [(f"{m.title} ({rank})", knowledge_ids(encode, m.title, desc, sp.sep, cfg.data.max_knowledge_tokens))
                     for rank, desc in options]
            gold = next((i for i, (_, ids) in enumerate(cands) if ids == m.knowledge), None)
            if gold is not None:
                items.append(DisambiguationItem(m, cands, gold, 0, "wordnet"))
    return items


@torch.no_grad()
def disambiguation_eval(model, tokenizer, sp: SpecialIds, stores: dict[str, SampleStore],
                        items: list[DisambiguationItem], cfg: KilmConfig) -> dict[str, Any]:
    from kilm_ray.generation import batched, score_continuations

    if cfg.eval.max_disambiguation_mentions:
        items = items[: cfg.eval.max_disambiguation_mentions]
    if not items:
        return {"mentions": 0}
    flat = []
    for k, item in enumerate(items):
        store = stores[item.mention.split]
        example = store.eval_examples(item.mention.row, item.mention.entity + 1, sp)[item.mention.entity]
        prompt = prompt_from_example(example.input_ids, example.labels, sp)
        for c, (_, ids) in enumerate(item.candidates):
            flat.append((k, c, (prompt.encoder_ids, prompt.decoder_prefix, list(ids) + [sp.desc_end])))
    scores: dict[tuple[int, int], float] = {}
    for chunk in batched(flat, cfg.eval.batch_size):
        for (k, c, _), (logprob, n) in zip(chunk, score_continuations(model, [t for _, _, t in chunk], sp.pad)):
            scores[(k, c)] = logprob / max(n, 1)
    hits, base = [], []
    for k, item in enumerate(items):
        predicted = max(range(len(item.candidates)), key=lambda c: scores[(k, c)])
        hits.append(float(predicted == item.gold))
        base.append(float(item.baseline == item.gold))
    return {"mentions": len(items), "accuracy": mean(hits), "most_frequent_baseline": mean(base),
            "mean_candidates": mean(len(i.candidates) for i in items)}


# ----------------------------------------------------------------------------------------------
# Retention and QA
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def retention_eval(model, sp: SpecialIds, store: SampleStore, cfg: KilmConfig) -> dict[str, Any]:
    """Text-infilling loss on held-out chunks with no entity markup (what BART was trained for)."""
    from kilm_ray.train.metrics import token_losses

    n = min(len(store), cfg.eval.retention_max_chunks) if cfg.eval.retention_max_chunks else len(store)
    params = MaskingParams(cfg.masking.mask_ratio, cfg.masking.poisson_lambda, 0.0)
    examples = [store.retention_example(i, cfg.eval.seed, params, sp) for i in range(n)]
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for start in range(0, len(examples), cfg.eval.batch_size):
        batch = collate(examples[start: start + cfg.eval.batch_size], sp, 1.0)
        batch = {k: torch.from_numpy(v).to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       decoder_input_ids=batch["decoder_input_ids"]).logits
        ce = token_losses(logits, batch["labels"])
        total += float(ce.sum())
        tokens += int((batch["labels"] != -100).sum())
    loss = total / max(tokens, 1)
    return {"chunks": n, "tokens": tokens, "infilling_loss": loss, "perplexity": math.exp(min(loss, 50))}


def read_qa_file(path: str) -> list[tuple[str, list[str]]]:
    from kilm_ray import storage

    pairs = []
    for line_no, line in enumerate(storage.iter_lines(path), start=1):
        parts = [p.strip() for p in line.rstrip("\n").split("\t")]
        if not line.strip():
            continue
        if len(parts) < 2 or not parts[0] or not any(parts[1:]):
            raise ValueError(f"{path}:{line_no}: expected question<TAB>answer[<TAB>answer...]")
        pairs.append((parts[0], [a for a in parts[1:] if a]))
    return pairs


def qa_eval(model, tokenizer, sp: SpecialIds, qa_file: str, cfg: KilmConfig) -> dict[str, Any]:
    from kilm_ray.generation import batched, generate

    pairs = read_qa_file(qa_file)
    prompts: list[Prompt] = [qa_prompt(tokenizer, sp, q) for q, _ in pairs]
    answers = []
    for chunk in batched(prompts, cfg.eval.batch_size):
        outs = generate(model, [p.encoder_ids for p in chunk], [p.decoder_prefix for p in chunk], sp.pad, sp.eos,
                        [sp.eos], cfg.eval.max_new_tokens, cfg.eval.num_beams)
        answers += [parse_text(tokenizer, sp, o.tokens) for o in outs]
    em = [best_over(exact_match, a, golds) for a, (_, golds) in zip(answers, pairs)]
    f1 = [best_over(token_f1, a, golds) for a, (_, golds) in zip(answers, pairs)]
    return {"questions": len(pairs), "exact_match": mean(em), "f1": mean(f1),
            "examples": [{"question": q, "answers": g, "generated": a} for (q, g), a in list(zip(pairs, answers))[:8]]}


# ----------------------------------------------------------------------------------------------
# The whole evaluation
# ----------------------------------------------------------------------------------------------


def evaluate(model_dir: str, data_dir: str, cfg: KilmConfig, kb_file: Optional[str] = None,
             qa_file: Optional[str] = None, device: str = "auto") -> dict[str, Any]:
    from kilm_ray import storage
    from kilm_ray.generation import default_device
    from kilm_ray.model import load_export
    from kilm_ray.tokenizer import special_ids

    device = default_device(device)
    model, tokenizer, meta = load_export(storage.local_copy(model_dir), device=device)
    sp = special_ids(tokenizer)
    if sp != special_ids_of(data_dir):
        raise ValueError(f"{model_dir} and {data_dir} use different tokenizers (special token ids differ)")
    stores = {s: SampleStore.load(data_dir, s) for s in ("train", "valid_seen", "valid_unseen")}
    metrics: dict[str, Any] = {"model": model_dir, "data": data_dir, "model_step": meta.get("step"), "device": device}
    for split in ("valid_seen", "valid_unseen"):
        log.info("description generation on %s", split)
        metrics[f"describe_{split}"] = describe_eval(model, tokenizer, sp, stores[split], cfg)
    log.info("entity disambiguation")
    metrics["disambiguation_anchor"] = disambiguation_eval(model, tokenizer, sp, stores,
                                                           anchor_items(stores, tokenizer, cfg), cfg)
    if kb_file:
        metrics["disambiguation_wordnet"] = disambiguation_eval(model, tokenizer, sp, stores,
                                                                wordnet_items(stores, tokenizer, sp, kb_file, cfg), cfg)
    log.info("retention (text infilling on held-out text, and on training text)")
    metrics["retention"] = retention_eval(model, sp, stores["valid_unseen"], cfg)
    metrics["retention_train_text"] = retention_eval(model, sp, stores["train"], cfg)
    if qa_file:
        metrics["qa"] = qa_eval(model, tokenizer, sp, qa_file, cfg)
    return metrics


def headline(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers worth a table row."""
    out = {}
    for split in ("valid_seen", "valid_unseen"):
        d = metrics.get(f"describe_{split}", {})
        for key in ("title_exact_match", "description_f1", "description_rouge_l"):
            if key in d:
                out[f"{split} {key}"] = d[key]
    for name in ("disambiguation_anchor", "disambiguation_wordnet"):
        d = metrics.get(name, {})
        if d.get("mentions"):
            out[f"{name} accuracy"] = d["accuracy"]
            out[f"{name} most-frequent baseline"] = d["most_frequent_baseline"]
    if "retention" in metrics:
        out["retention infilling loss"] = metrics["retention"]["infilling_loss"]
    if "retention_train_text" in metrics:
        out["infilling loss on training text"] = metrics["retention_train_text"]["infilling_loss"]
    if "qa" in metrics:
        out["qa exact match"] = metrics["qa"]["exact_match"]
        out["qa f1"] = metrics["qa"]["f1"]
    return out


def save_metrics(metrics: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "metrics.json"
    path.write_text(json.dumps(metrics, indent=2, default=str))
    return path
