"""The evaluation harness: knowledge probes and retention of an exported model on held-out articles.

Every probe is evaluated by mention on a split of articles never trained on (``eval.split``, default
test); each mention is labelled by whether its entity's knowledge was in the training data (seen) or
not (unseen), see ``kilm_ray.eval.split``. The probes:

- Description generation (describe): the generated ``Title<sep>description`` against the held-out
  knowledge (title exact match, description token F1 and ROUGE-L), per group; beside it the copy
  rule (the mention text as the title) and the exact match where the title is not the mention.
  ``training_recall`` runs the same probe on training mentions and is named for what it is.
- Appositive generation: the slot moved to the end of the mention's sentence, the description after
  ``<sep>`` scored against the held-out description.
- Anchor disambiguation: held-out mentions whose anchor text links to several titles in the training
  split; candidates are those training titles only (the test mention does not count), ranked by the
  mean log-probability of their knowledge; the gold may be missing (then the answer is wrong).
- Word senses (with a WordNet-shaped knowledge base): the usage examples of ``kilm_ray.eval.senses``.
- Retention: BART text-infilling loss on held-out text (and, named as such, on training text).
- Zero-shot QA on a question file (``read_qa_file``): exact match and F1, max over the answers.

Prompts come from ``kilm_ray.probes`` and decoding from ``kilm_ray.generation``: the same code as
the Serve endpoints.
"""

from __future__ import annotations

import ast
import itertools
import json
import logging
import math
import subprocess
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from kilm_ray.config import KilmConfig
from kilm_ray.eval.metrics import best_over, exact_match, mean, rouge_l, token_f1
from kilm_ray.eval.split import GROUPS, Mention, group_counts, iter_mentions, split_invariants, trained_titles
from kilm_ray.loader import SampleStore, special_ids_of
from kilm_ray.masking import Example, MaskingParams, SpecialIds, collate
from kilm_ray.probes import (Prompt, ProbeError, appositive_prompt, candidate_continuation, describe_prompt,
                             gold_knowledge, parse_knowledge, parse_text, prompt_from_example, qa_prompt)

log = logging.getLogger("kilm_ray.eval")


def mention_examples(store: SampleStore, mentions: Sequence[Mention], max_entities: int,
                     sp: SpecialIds) -> list[Example]:
    """The stored evaluation example (only this entity's knowledge masked) of each mention."""
    by_row: dict[int, list[Example]] = {}
    out = []
    for m in mentions:
        if m.row not in by_row:
            by_row[m.row] = store.eval_examples(m.row, max_entities, sp)
        out.append(by_row[m.row][m.entity])
    return out


def _scores_by_group(mentions: Sequence[Mention], rows: Sequence[dict[str, float]]) -> dict[str, Any]:
    """Mean of each per-mention score, over all mentions and per seen/unseen group; with the copy rule
    (title = mention text) and the title exact match on the mentions where the copy rule fails."""
    def summary(pairs: list[tuple[Mention, dict]]) -> dict[str, Any]:
        out: dict[str, Any] = {"mentions": len(pairs)}
        if not pairs:
            return out
        for key in pairs[0][1]:
            out[key] = mean(r[key] for _, r in pairs)
        out["copy_rule_title_exact_match"] = mean(float(m.title_is_surface) for m, _ in pairs)
        differs = [r for m, r in pairs if not m.title_is_surface]
        out["title_not_mention"] = len(differs)
        if differs and "title_exact_match" in pairs[0][1]:
            out["title_exact_match_title_not_mention"] = mean(r["title_exact_match"] for r in differs)
        return out

    pairs = list(zip(mentions, rows))
    return {"all": summary(pairs), **{g: summary([p for p in pairs if p[0].group == g]) for g in GROUPS}}


def _knowledge_scores(tokenizer, sp: SpecialIds, generated: Sequence[int], gold_title: str,
                      gold_desc: str) -> tuple[dict[str, float], str]:
    title, desc = parse_knowledge(tokenizer, sp, generated)
    scores = {"title_exact_match": exact_match(title, gold_title), "description_f1": token_f1(desc, gold_desc),
              "description_rouge_l": rouge_l(desc, gold_desc)}
    return scores, f"{title} <sep> {desc}"


# ----------------------------------------------------------------------------------------------
# Description generation and appositives
# ----------------------------------------------------------------------------------------------


def describe_eval(model, tokenizer, sp: SpecialIds, store: SampleStore, mentions: Sequence[Mention],
                  cfg: KilmConfig) -> dict[str, Any]:
    from kilm_ray.generation import greedy_describe

    if not mentions:
        return {"all": {"mentions": 0}}
    examples = mention_examples(store, mentions, cfg.data.max_eval_entities, sp)
    prompts = [prompt_from_example(e.input_ids, e.labels, sp) for e in examples]
    outputs = greedy_describe(model, prompts, sp, cfg.eval.max_new_tokens, cfg.eval.batch_size, cfg.eval.num_beams)
    rows, shown = [], defaultdict(list)
    for m, ex, out in zip(mentions, examples, outputs):
        gold_title, gold_desc = gold_knowledge(tokenizer, sp, ex.labels)
        scores, generated = _knowledge_scores(tokenizer, sp, out.tokens, gold_title, gold_desc)
        rows.append(scores)
        if len(shown[m.group]) < 6:
            shown[m.group].append({"mention": m.surface, "gold": f"{gold_title} <sep> {gold_desc}",
                                   "generated": generated})
    result = _scores_by_group(mentions, rows)
    result["examples"] = dict(shown)
    return result


def appositive_text(left: str, mention: str, right: str) -> tuple[str, str]:
    """(text with an ``<appos>`` slot at the end of the mention's sentence, the mention): the probe
    asks for the description away from the mention, where an appositive would stand."""
    stop = right.find(". ")
    stop = len(right.rstrip()) if stop < 0 else stop
    return left + mention + right[:stop] + "<appos>" + right[stop:], mention


def appositive_eval(model, tokenizer, sp: SpecialIds, store: SampleStore, mentions: Sequence[Mention],
                    cfg: KilmConfig) -> dict[str, Any]:
    from kilm_ray.generation import greedy_describe

    def decode(ids) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    kept, prompts, golds, refused = [], [], [], Counter()
    for m in mentions:
        ids = store.ids(m.row)
        ent = store.entities(m.row)[m.entity]
        text, mention = appositive_text(decode(ids[: ent.start]), decode(ids[ent.start: ent.end]), decode(ids[ent.end:]))
        try:
            prompts.append(appositive_prompt(tokenizer, sp, text, mention))
        except ProbeError as exc:
            refused[str(exc)[:80]] += 1
            continue
        kept.append(m)
        golds.append(parse_knowledge(tokenizer, sp, list(m.knowledge)))
    if not kept:
        return {"all": {"mentions": 0}, "refused": dict(refused)}
    outputs = greedy_describe(model, prompts, sp, cfg.eval.max_new_tokens, cfg.eval.batch_size, cfg.eval.num_beams)
    rows, shown = [], []
    for m, out, (gold_title, gold_desc) in zip(kept, outputs, golds):
        scores, generated = _knowledge_scores(tokenizer, sp, out.tokens, gold_title, gold_desc)
        rows.append(scores)
        if len(shown) < 6:
            shown.append({"mention": m.surface, "gold": gold_desc, "generated": generated})
    return {**_scores_by_group(kept, rows), "refused": dict(refused), "examples": shown}


# ----------------------------------------------------------------------------------------------
# Disambiguation: anchors and word senses
# ----------------------------------------------------------------------------------------------


@dataclass
class RankingItem:
    """One mention to disambiguate: its prompt, the candidates' continuations, the gold index (-1 =
    the right answer is not among the candidates), the baseline's choice and the seen/unseen group."""
    prompt: Prompt
    candidates: list[list[int]]
    gold: int
    baseline: int
    group: str


@torch.no_grad()
def rank_candidates(model, sp: SpecialIds, items: Sequence[RankingItem], batch_size: int) -> list[int]:
    """The candidate with the highest mean log-probability per token, for each item."""
    from kilm_ray.generation import batched, score_continuations

    flat = [(k, c, (item.prompt.encoder_ids, item.prompt.decoder_prefix, cont))
            for k, item in enumerate(items) for c, cont in enumerate(item.candidates)]
    scores: dict[tuple[int, int], float] = {}
    for chunk in batched(flat, batch_size):
        for (k, c, _), (logprob, n) in zip(chunk, score_continuations(model, [t for _, _, t in chunk], sp.pad)):
            scores[(k, c)] = logprob / max(n, 1)
    return [max(range(len(item.candidates)), key=lambda c: scores[(k, c)]) for k, item in enumerate(items)]


def ranking_summary(items: Sequence[RankingItem], predicted: Sequence[int]) -> dict[str, Any]:
    def summary(pairs) -> dict[str, Any]:
        if not pairs:
            return {"mentions": 0}
        return {"mentions": len(pairs), "accuracy": mean(float(p == i.gold) for i, p in pairs),
                "baseline_accuracy": mean(float(i.baseline == i.gold) for i, _ in pairs),
                "random_accuracy": mean((1 / len(i.candidates)) if i.gold >= 0 else 0.0 for i, _ in pairs),
                "gold_among_candidates": mean(float(i.gold >= 0) for i, _ in pairs),
                "mean_candidates": mean(len(i.candidates) for i, _ in pairs)}

    pairs = list(zip(items, predicted))
    return {"all": summary(pairs), **{g: summary([p for p in pairs if p[0].group == g]) for g in GROUPS}}


def anchor_items(train: SampleStore, store: SampleStore, mentions: Sequence[Mention], tokenizer, sp: SpecialIds,
                 cfg: KilmConfig) -> list[RankingItem]:
    """Held-out mentions whose anchor text links to two or more titles in the training split. The
    candidates and the most-frequent-target baseline come from training links only."""
    def decode(ids) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    targets: dict[str, Counter] = defaultdict(Counter)
    knowledge: dict[str, list[int]] = {}
    for m in iter_mentions(train, "train", decode, 10**6):
        targets[m.surface.lower()][m.title] += 1
        knowledge.setdefault(m.title, list(m.knowledge))
    examples = mention_examples(store, mentions, cfg.data.max_eval_entities, sp)
    items = []
    for m, ex in zip(mentions, examples):
        counts = targets.get(m.surface.lower())
        if not counts or len(counts) < 2:
            continue
        ranked = [t for t, _ in counts.most_common(cfg.eval.max_candidates)]
        items.append(RankingItem(prompt_from_example(ex.input_ids, ex.labels, sp),
                                 [knowledge[t] + [sp.desc_end] for t in ranked],
                                 ranked.index(m.title) if m.title in ranked else -1, 0, m.group))
    return items


def read_wordnet_rows(kb_file: str) -> list[tuple[str, int, str]]:
    from kilm_ray.corpus.knowledge import KBStats, iter_jsonl

    return [(row["name"], int(row.get("sense", 1)), row["gloss"]) for _, row in iter_jsonl(kb_file, KBStats())
            if isinstance(row.get("gloss"), str) and isinstance(row.get("name"), str)]


def sense_ranking_items(sense_items, tokenizer, sp: SpecialIds, trained: set[str], cfg: KilmConfig) -> list[RankingItem]:
    """Word-sense items as ranking items: the example as a describe prompt, each sense's definition as a
    candidate knowledge string; seen = a trained entity has the word as its title."""
    from kilm_ray.eval.metrics import normalize

    trained_norm = {normalize(t) for t in trained}
    items = []
    for it in sense_items:
        title = it.word[:1].upper() + it.word[1:]
        try:
            prompt = describe_prompt(tokenizer, sp, it.left, it.mention, it.right)
            cands = [candidate_continuation(tokenizer, sp, title, d, cfg.data.max_knowledge_tokens + 1) for d in it.senses]
        except ProbeError:
            continue
        items.append(RankingItem(prompt, cands, it.gold, 0, "seen" if normalize(it.word) in trained_norm else "unseen"))
    return items


# ----------------------------------------------------------------------------------------------
# Retention and QA
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def retention_eval(model, sp: SpecialIds, store: SampleStore, cfg: KilmConfig) -> dict[str, Any]:
    """Text-infilling loss on held-out chunks with no entity markup (what BART was trained for)."""
    from kilm_ray.train.metrics import token_losses

    n = min(len(store), cfg.eval.retention_max_chunks) if cfg.eval.retention_max_chunks else len(store)
    params = MaskingParams.from_config(cfg.masking, knowledge_prob=0.0)
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


def _qa_pair(question, answers, where: str) -> tuple[str, list[str]]:
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(question, str) or not question.strip() or not isinstance(answers, list) \
            or not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"{where}: expected a question and a non-empty list of answer strings")
    return question.strip(), [a.strip() for a in answers if a.strip()]


def parse_qa_text(text: str, where: str = "qa file") -> list[tuple[str, list[str]]]:
    """Question files as they are published: the DPR NQ-open TSV (``question<TAB>['answer', ...]``, the
    answers a Python literal list), ``question<TAB>answer[<TAB>answer...]``, or a JSON list of
    ``{"question": ..., "answer"|"answers": ...}`` objects or ``[question, answers]`` pairs."""
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not a JSON list ({exc.msg} at line {exc.lineno})") from None
        pairs = []
        for k, row in enumerate(rows):
            at = f"{where}: item {k}"
            if isinstance(row, dict):
                pairs.append(_qa_pair(row.get("question"), row.get("answers", row.get("answer")), at))
            elif isinstance(row, list) and len(row) == 2:
                pairs.append(_qa_pair(row[0], row[1], at))
            else:
                raise ValueError(f"{at}: expected {{question, answers}} or [question, answers]")
        return pairs
    pairs = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split("\t")]
        at = f"{where}:{line_no}"
        if len(parts) < 2 or not parts[0]:
            raise ValueError(f"{at}: expected question<TAB>['answer', ...] or question<TAB>answer")
        if len(parts) == 2 and parts[1].startswith("["):
            try:
                answers = ast.literal_eval(parts[1])
            except (ValueError, SyntaxError):
                raise ValueError(f"{at}: the answers {parts[1][:60]!r} are not a Python list literal") from None
            pairs.append(_qa_pair(parts[0], answers, at))
        else:
            pairs.append(_qa_pair(parts[0], [a for a in parts[1:] if a], at))
    return pairs


def read_qa_file(path: str) -> list[tuple[str, list[str]]]:
    from kilm_ray import storage

    return parse_qa_text(storage.read_bytes(path).decode("utf-8"), path)


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
    return {"file": qa_file, "questions": len(pairs), "exact_match": mean(em), "f1": mean(f1),
            "examples": [{"question": q, "answers": g, "generated": a} for (q, g), a in list(zip(pairs, answers))[:8]]}


# ----------------------------------------------------------------------------------------------
# Provenance: what produced the numbers
# ----------------------------------------------------------------------------------------------


def source_commit() -> dict[str, Any]:
    """The git commit of the kilm_ray source that ran (and whether it had uncommitted changes)."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return {"commit": commit, "uncommitted_changes": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "uncommitted_changes": None}


def data_summary(data_dir: str) -> dict[str, Any]:
    """The preprocessing manifest's identity and sizes (what the model was trained and tested on)."""
    from kilm_ray.loader import read_meta

    meta = read_meta(data_dir)
    keep = ("run_key", "created", "dumps", "knowledge", "config_sha256", "tokenizer_sha256", "vocab_size", "samples")
    return {k: meta.get(k) for k in keep}


def training_summary(run_dir: Optional[str]) -> dict[str, Any]:
    """The last logged step of a training run: steps, epochs, losses, wall time, tokens."""
    from kilm_ray.eval.report import read_training_log

    if not run_dir:
        return {}
    rows = read_training_log(run_dir)
    if not rows:
        return {"run": run_dir}
    last = rows[-1]
    keys = ("step", "epoch", "train_loss", "train_knowledge_loss", "world_size")
    out = {"run": run_dir, **{k: last[k] for k in keys if k in last},
           "logged_wall_s": round(last.get("time", 0) - rows[0].get("time", 0), 1)}  # first to last log line
    for key in ("valid_loss", "valid_knowledge_loss", "valid_text_loss", "train_text_loss", "description_accuracy"):
        values = [r[key] for r in rows if key in r]
        if values:
            out[f"last_{key}"] = values[-1]
    return out


# ----------------------------------------------------------------------------------------------
# The whole evaluation
# ----------------------------------------------------------------------------------------------


def _limit(items: list, n: int) -> list:
    return items[:n] if n else items


def evaluate(model_dir: str, data_dir: str, cfg: KilmConfig, kb_file: Optional[str] = None,
             qa_file: Optional[str] = None, device: str = "auto", run_dir: Optional[str] = None) -> dict[str, Any]:
    from kilm_ray import storage
    from kilm_ray.generation import default_device
    from kilm_ray.model import count_parameters, load_export
    from kilm_ray.tokenizer import special_ids

    device = default_device(device)
    model, tokenizer, meta = load_export(storage.local_copy(model_dir), device=device)
    sp = special_ids(tokenizer)
    if sp != special_ids_of(data_dir):
        raise ValueError(f"{model_dir} and {data_dir} use different tokenizers (special token ids differ)")
    split = cfg.eval.split
    stores = {"train": SampleStore.load(data_dir, "train"), split: SampleStore.load(data_dir, split)}
    invariants = split_invariants(stores)  # raises if anything evaluated was trained on
    trained = trained_titles(stores["train"])

    def decode(ids) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    held_out = _limit(list(iter_mentions(stores[split], split, decode, cfg.data.max_eval_entities, trained)),
                      cfg.eval.max_samples)
    metrics: dict[str, Any] = {
        "model": model_dir, "data": data_dir, "model_step": meta.get("step"), "device": device,
        "source": source_commit(), "config": cfg.to_dict(), "data_manifest": data_summary(data_dir),
        "training": training_summary(run_dir), "model_parameters": count_parameters(model),
        "split": {"evaluated": split, **invariants, "mentions": len(held_out), **group_counts(held_out),
                  "trained_entities": len(trained)},
    }
    log.info("description generation on %d %s mentions (%s)", len(held_out), split, group_counts(held_out))
    metrics["describe"] = describe_eval(model, tokenizer, sp, stores[split], held_out, cfg)
    if cfg.eval.train_recall_samples:
        # The first mentions only: decoding every training mention for a sample would grow with the corpus.
        recall = list(itertools.islice(iter_mentions(stores["train"], "train", decode, cfg.data.max_eval_entities,
                                                     trained), cfg.eval.train_recall_samples))
        metrics["training_recall"] = describe_eval(model, tokenizer, sp, stores["train"], recall, cfg)
    log.info("appositive generation")
    metrics["appositive"] = appositive_eval(model, tokenizer, sp, stores[split], held_out, cfg)
    log.info("anchor disambiguation")
    items = _limit(anchor_items(stores["train"], stores[split], held_out, tokenizer, sp, cfg),
                   cfg.eval.max_disambiguation_mentions)
    metrics["disambiguation_anchor"] = ranking_summary(items, rank_candidates(model, sp, items, cfg.eval.batch_size))
    if kb_file:
        from kilm_ray.eval.senses import seeded_sample, sense_items

        log.info("word senses from WordNet usage examples")
        candidates = sense_items(read_wordnet_rows(kb_file), cfg.eval.max_candidates)
        chosen = seeded_sample(candidates, cfg.eval.max_sense_items, cfg.eval.seed)
        items = sense_ranking_items(chosen, tokenizer, sp, set(trained), cfg)
        metrics["word_senses"] = {**ranking_summary(items, rank_candidates(model, sp, items, cfg.eval.batch_size)),
                                  "examples_available": len(candidates)}
    log.info("retention (text infilling on held-out text, and on training text)")
    metrics["retention"] = retention_eval(model, sp, stores[split], cfg)
    metrics["retention_train_text"] = retention_eval(model, sp, stores["train"], cfg)
    if qa_file:
        metrics["qa"] = qa_eval(model, tokenizer, sp, qa_file, cfg)
    return metrics


def headline(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers worth a table row, named for what they measure."""
    out: dict[str, float] = {}
    for probe, label in (("describe", "held-out mentions"), ("appositive", "appositive")):
        for group in ("seen", "unseen"):
            d = metrics.get(probe, {}).get(group, {})
            if not d.get("mentions"):
                continue
            for key in ("title_exact_match", "description_f1"):
                if probe == "appositive" and key == "title_exact_match":
                    continue
                out[f"{label}, {group} entities: {key.replace('_', ' ')}"] = d[key]
    d = metrics.get("training_recall", {}).get("all", {})
    if d.get("mentions"):
        out["training mentions (recall, not held out): title exact match"] = d["title_exact_match"]
    for name, label in (("disambiguation_anchor", "anchor disambiguation"), ("word_senses", "word senses")):
        d = metrics.get(name, {}).get("all", {})
        if d.get("mentions"):
            out[f"{label}: accuracy"] = d["accuracy"]
    if "retention" in metrics:
        out["retention: infilling loss on held-out text"] = metrics["retention"]["infilling_loss"]
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
