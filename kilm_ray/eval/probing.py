"""The probes, one small function each: a list of items in, one result per item out. No Ray: the
evaluation's Ray Data stages (``kilm_ray.eval.stages``) call them on batches in an actor that holds the
model, and a test can call them on a model directly.

A *mention item* is a held-out chunk's mention: ``ids`` (the chunk's text tokens), ``start``/``end`` (the
mention's token span), ``knowledge`` (its ``Title<sep>description`` ids), ``surface``, ``id``. Prompts
come from ``kilm_ray.method.probes`` (the code Serve uses), in the form the model was trained on:
``slot`` (KILM and the markup-only baseline: ``<ent_desc><mask></ent_desc>``) or ``text`` (the
data-matched baseline, ``masking.knowledge_as_text``: ``mention, <mask>,``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from kilm_ray.method.metrics import best_over, exact_match, rouge_l, same_up_to_inflection, token_f1
from kilm_ray.eval.qa_files import cut_answer
from kilm_ray.method.masking import MaskingParams, SpecialIds, build_retention_example, collate, knowledge_text, slot_sequences
from kilm_ray.method.probes import (Prompt, ProbeError, appositive_prompt, candidate_continuation, cut_text_knowledge,
                             describe_prompt, parse_knowledge, parse_text_knowledge, prompt_from_example,
                             qa_prompt, text_candidate_continuation, text_describe_prompt, text_prompt_from_ids,
                             until, _encode)

FORMS = ("slot", "text")


@dataclass
class ProbeModel:
    model: Any
    tokenizer: Any
    sp: SpecialIds
    form: str  # "slot" | "text": how the model was given knowledge in training
    max_new_tokens: int = 32
    batch_size: int = 16
    num_beams: int = 1
    max_knowledge_tokens: int = 128
    # greedy, slot form: no n-gram repeated within an answer (a text-form answer copies the right context)
    no_repeat_ngram_size: int = 0
    title_candidates: str = "generated"  # or "generated_or_mention" (eval.title_candidates; slot form only)
    qa_prompt_variant: int = 2  # eval.qa_prompt (kilm_ray.method.fewshot.QA_PROMPTS)
    max_input_tokens: Optional[int] = None  # positions less the answer's: a long few-shot prompt loses its start

    def __post_init__(self):
        if self.form not in FORMS:
            raise ValueError(f"probe form {self.form!r}: expected one of {FORMS}")


def form_of(masking) -> str:
    """The probe form a model trained with these masking settings understands."""
    return "text" if getattr(masking, "knowledge_as_text", False) and not masking.knowledge_slot else "slot"


def _decode(tokenizer, ids) -> str:
    return tokenizer.decode([int(t) for t in ids], skip_special_tokens=True, clean_up_tokenization_spaces=False)


def knowledge_scores(title: str, desc: str, gold_title: str, gold_desc: str) -> dict[str, float]:
    return {"title_exact_match": exact_match(title, gold_title), "description_f1": token_f1(desc, gold_desc),
            "description_rouge_l": rouge_l(desc, gold_desc)}


def gold_of(pm: ProbeModel, item: dict) -> tuple[str, str]:
    return parse_knowledge(pm.tokenizer, pm.sp, list(item["knowledge"]))


def mention_facts(pm: ProbeModel, item: dict) -> dict[str, Any]:
    """No model: the gold, the copy rule (the mention text as the title) and whether the title differs
    from the mention other than by inflection (where a right title is knowledge, not copying)."""
    gold_title, gold_desc = gold_of(pm, item)
    return {"gold": f"{gold_title} <sep> {gold_desc}", "copy_rule": exact_match(item["surface"], gold_title),
            "title_differs": not same_up_to_inflection(item["surface"], gold_title)}


def _generate(pm: ProbeModel, prompts: Sequence[Prompt], max_new_tokens: int | Sequence[int]):
    """Greedy (or beam) continuations of the prompts, in batches; one budget for all or one per prompt."""
    from kilm_ray.model.generation import batched, generate, per_row

    budgets = per_row(max_new_tokens, len(prompts))
    outs = []
    for pairs in batched(list(zip(prompts, budgets)), pm.batch_size):
        chunk, chunk_budgets = [p for p, _ in pairs], [b for _, b in pairs]
        outs += generate(pm.model, [p.encoder_ids for p in chunk], [p.decoder_prefix for p in chunk], pm.sp.pad,
                         pm.sp.eos, [[p.stop_id, pm.sp.eos] for p in chunk],
                         max(chunk_budgets) if pm.num_beams > 1 else chunk_budgets, pm.num_beams,
                         pm.no_repeat_ngram_size if pm.form == "slot" else 0)
    return outs


def _read_knowledge(pm: ProbeModel, tokens: Sequence[int], right: Sequence[int]) -> tuple[str, str]:
    if pm.form == "text":
        return parse_text_knowledge(pm.tokenizer, pm.sp, cut_text_knowledge(tokens, right, pm.sp,
                                                                            pm.max_knowledge_tokens))
    return parse_knowledge(pm.tokenizer, pm.sp, tokens)


def describe_prompt_of(pm: ProbeModel, item: dict) -> Prompt:
    ids, start, end = [int(t) for t in item["ids"]], int(item["start"]), int(item["end"])
    if pm.form == "text":
        return text_prompt_from_ids(ids, end, pm.sp)
    source, target, _ = slot_sequences(ids, start, end, list(item["knowledge"]), pm.sp)
    return prompt_from_example(source, target, pm.sp)


def title_part(tokens: Sequence[int], sp) -> list[int]:
    """The title of a generated slot: its tokens before ``<sep>`` (or the slot's end)."""
    return until(tokens, (sp.sep, sp.desc_end, sp.eos))


def mention_titled(pm: ProbeModel, items: Sequence[dict], prompts: Sequence[Prompt], outs: Sequence,
                   budget: int) -> dict[int, list[int]]:
    """``eval.title_candidates=generated_or_mention``: for each mention whose decoded title is not the
    mention's own tokens, both titles (with ``<sep>``) are scored by the model; where the mention scores
    higher, the slot is decoded again after it. Returns the replaced slots' tokens by item index."""
    from kilm_ray.model.generation import batched, score_continuations

    pairs = []
    for k, (item, out) in enumerate(zip(items, outs)):
        mention = [int(t) for t in list(item["ids"])[int(item["start"]):int(item["end"])]]
        generated = title_part(out.tokens, pm.sp)
        if mention and mention != generated:
            pairs.append((k, mention, generated))
    rows = [(prompts[k].encoder_ids, prompts[k].decoder_prefix, title + [pm.sp.sep])
            for k, mention, generated in pairs for title in (mention, generated)]
    scores = [s for chunk in batched(rows, pm.batch_size) for s, _ in score_continuations(pm.model, chunk, pm.sp.pad)]
    chosen = [(k, mention) for i, (k, mention, _) in enumerate(pairs) if scores[2 * i] > scores[2 * i + 1]]
    replaced = {k: mention + [pm.sp.sep] for k, mention in chosen}  # a mention that fills the budget: no more
    more = [(k, mention, budget - len(mention) - 1) for k, mention in chosen if budget - len(mention) - 1 > 0]
    again = [Prompt(prompts[k].encoder_ids, list(prompts[k].decoder_prefix) + mention + [pm.sp.sep], prompts[k].stop_id)
             for k, mention, _ in more]
    for (k, _, _), out in zip(more, _generate(pm, again, [n for _, _, n in more])):
        replaced[k] += list(out.tokens)
    return replaced


def describe(pm: ProbeModel, items: Sequence[dict]) -> list[dict]:
    """Description generation on mentions: the generated title and description against the gold. With
    ``title_candidates=generated_or_mention`` (slot form) each result also says where its title came from
    and scores the decoded title alone (``title_exact_match_generated``)."""
    if not items:
        return []
    budget = pm.max_new_tokens if pm.form == "slot" else pm.max_knowledge_tokens + 4
    prompts = [describe_prompt_of(pm, it) for it in items]
    outs = _generate(pm, prompts, budget)
    rerank = pm.title_candidates == "generated_or_mention" and pm.form == "slot"
    replaced = mention_titled(pm, items, prompts, outs, budget) if rerank else {}
    results = []
    for k, (item, out) in enumerate(zip(items, outs)):
        right = list(item["ids"])[int(item["end"]):]
        decoded_title, decoded_desc = _read_knowledge(pm, out.tokens, right)
        title, desc = _read_knowledge(pm, replaced[k], right) if k in replaced else (decoded_title, decoded_desc)
        gold_title, gold_desc = gold_of(pm, item)
        result = {**knowledge_scores(title, desc, gold_title, gold_desc), "generated": f"{title} <sep> {desc}"}
        if rerank:
            result["title_source"] = "mention" if k in replaced else "generated"
            result["title_exact_match_generated"] = exact_match(decoded_title, gold_title)
        results.append(result)
    return results


def build_or_refuse(items: Sequence[dict], build) -> tuple[list[dict], list[int], list]:
    """``build(item)`` for each item: (a result per item, ``{"refused": reason}`` where building raised
    ProbeError and ``{}`` elsewhere; the indices built; what was built, in their order)."""
    results: list[dict] = [{} for _ in items]
    kept, built = [], []
    for k, item in enumerate(items):
        try:
            built.append(build(item))
        except ProbeError as exc:
            results[k] = {"refused": str(exc)[:80]}
            continue
        kept.append(k)
    return results, kept, built


def appositive_text(left: str, mention: str, right: str) -> tuple[str, str]:
    """(text with an ``<appos>`` slot at the end of the mention's sentence, the mention): the probe asks
    for the description away from the mention, where an appositive would stand."""
    stop = right.find(". ")
    stop = len(right.rstrip()) if stop < 0 else stop
    return left + mention + right[:stop] + "<appos>" + right[stop:], mention


def appositive_prompt_of(pm: ProbeModel, item: dict) -> tuple[Prompt, list[int]]:
    """The appositive prompt of a mention and the tokens after its slot."""
    ids, start, end = list(item["ids"]), int(item["start"]), int(item["end"])
    text, mention = appositive_text(_decode(pm.tokenizer, ids[:start]), _decode(pm.tokenizer, ids[start:end]),
                                    _decode(pm.tokenizer, ids[end:]))
    return appositive_slot_prompt(pm, text, mention)


def appositive_slot_prompt(pm: ProbeModel, text: str, mention: str) -> tuple[Prompt, list[int]]:
    """``text`` with one ``<appos>`` slot after ``mention``: the prompt in the model's form and the tokens
    after the slot (the right context a text-form answer must stop before)."""
    if pm.form == "slot":
        prompt = appositive_prompt(pm.tokenizer, pm.sp, text, mention)
        at = prompt.encoder_ids.index(pm.sp.desc_end)
        return prompt, prompt.encoder_ids[at + 1:-1]
    slot_char = text.index("<appos>")
    plain = text.replace("<appos>", "")
    tokens, offsets = _encode(pm.tokenizer, plain)
    slot = next((i for i, (s, _) in enumerate(offsets) if s >= slot_char), len(tokens))
    if slot == 0:
        raise ProbeError("the slot is before every token")
    return text_prompt_from_ids(tokens, slot, pm.sp), tokens[slot:]


def appositive(pm: ProbeModel, items: Sequence[dict]) -> list[dict]:
    """Appositive generation: the knowledge slot at the end of the mention's sentence; the description
    against the gold (and the title). A mention whose prompt cannot be built is refused (counted)."""
    results, kept, built = build_or_refuse(items, lambda item: appositive_prompt_of(pm, item))
    prompts, rights = [p for p, _ in built], [r for _, r in built]
    budget = pm.max_new_tokens if pm.form == "slot" else pm.max_knowledge_tokens + 4
    for k, out, right in zip(kept, _generate(pm, prompts, budget), rights):
        title, desc = _read_knowledge(pm, out.tokens, right)
        gold_title, gold_desc = gold_of(pm, items[k])
        results[k] = {**knowledge_scores(title, desc, gold_title, gold_desc), "generated": f"{title} <sep> {desc}"}
    return results


def appos_corpus(pm: ProbeModel, items: Sequence[dict]) -> list[dict]:
    """ApposCorpus (``kilm_ray.eval.appos_files``): the knowledge slot where the gold appositive stands;
    the generated description against the gold appositive (token F1, ROUGE-L; rows whose gold is empty are
    kept unscored, ``target_empty``) and against the entity's description."""
    results, kept, built = build_or_refuse(items, lambda it: appositive_slot_prompt(pm, it["text"], it["mention"]))
    prompts, rights = [p for p, _ in built], [r for _, r in built]
    budget = pm.max_new_tokens if pm.form == "slot" else pm.max_knowledge_tokens + 4
    for k, out, right in zip(kept, _generate(pm, prompts, budget), rights):
        _, desc = _read_knowledge(pm, out.tokens, right)
        it = items[k]
        result: dict[str, Any] = {"generated": desc, "target": it["target"]}
        if it["target"].strip():
            result.update(appositive_f1=token_f1(desc, it["target"]), appositive_rouge_l=rouge_l(desc, it["target"]))
        else:
            result["target_empty"] = True
        if it.get("description"):
            result["description_f1"] = token_f1(desc, it["description"])
        results[k] = result
    return results


def candidate_ids(pm: ProbeModel, knowledge: Sequence[int]) -> list[int]:
    """A candidate's stored knowledge as the continuation the model scores."""
    if pm.form == "text":
        return knowledge_text(knowledge, pm.sp) + [pm.sp.comma]
    return [int(t) for t in knowledge] + [pm.sp.desc_end]


@torch.no_grad()
def rank(pm: ProbeModel, prompts: Sequence[Prompt], candidates: Sequence[Sequence[Sequence[int]]]) -> list[int]:
    """For each prompt, the candidate continuation with the highest mean log-probability per token."""
    from kilm_ray.model.generation import batched, score_continuations

    flat = [(k, c, (p.encoder_ids, p.decoder_prefix, list(cont)))
            for k, (p, conts) in enumerate(zip(prompts, candidates)) for c, cont in enumerate(conts)]
    scores: dict[tuple[int, int], float] = {}
    for chunk in batched(flat, pm.batch_size):
        for (k, c, _), (logprob, n) in zip(chunk, score_continuations(pm.model, [t for _, _, t in chunk], pm.sp.pad)):
            scores[(k, c)] = logprob / max(n, 1)
    return [max(range(len(conts)), key=lambda c: scores[(k, c)]) for k, conts in enumerate(candidates)]


def anchors(pm: ProbeModel, items: Sequence[dict]) -> list[dict]:
    """Anchor disambiguation: each item's ``candidates`` (training titles of its anchor text, with their
    knowledge ids) ranked; ``gold`` is the right one's index (-1: not among them)."""
    if not items:
        return []
    prompts = [describe_prompt_of(pm, it) for it in items]
    conts = [[candidate_ids(pm, c["knowledge"]) for c in it["candidates"]] for it in items]
    picked = rank(pm, prompts, conts)
    return [{"predicted": p, "correct": float(p == it["gold"])} for p, it in zip(picked, items)]


def training_lookup(pm: ProbeModel, item: dict) -> dict[str, float]:
    """The training lookup of a mention, no model: the most frequent training title of its anchor text,
    with that title's training knowledge (nothing when the anchor text was never linked in training)."""
    gold_title, gold_desc = gold_of(pm, item)
    predicted = item.get("lookup_knowledge")
    title, desc = parse_knowledge(pm.tokenizer, pm.sp, list(predicted)) if predicted else ("", "")
    return knowledge_scores(title, desc, gold_title, gold_desc)


def mentions(pm: ProbeModel, items: Sequence[dict], appositives: bool = True) -> list[dict]:
    """Every per-mention probe of held-out mentions: facts and the training lookup (no model), describe,
    appositive, and anchors for the items that have candidates."""
    out = [{"id": it["id"], **mention_facts(pm, it), "lookup": training_lookup(pm, it)} for it in items]
    for row, res in zip(out, describe(pm, items)):
        row["describe"] = res
    if appositives:
        for row, res in zip(out, appositive(pm, items)):
            row["appositive"] = res
    ambiguous = [k for k, it in enumerate(items) if len(it.get("candidates") or ()) >= 2]
    for k, res in zip(ambiguous, anchors(pm, [items[k] for k in ambiguous])):
        out[k]["anchor"] = res
    return out


def senses(pm: ProbeModel, items: Sequence[dict]) -> list[dict]:
    """Word senses: the usage example as a describe prompt, each sense's definition a candidate."""
    text = pm.form == "text"
    prompt_of = text_describe_prompt if text else describe_prompt
    candidate_of = text_candidate_continuation if text else candidate_continuation

    def build(it: dict):
        title = it["word"][:1].upper() + it["word"][1:]
        return (prompt_of(pm.tokenizer, pm.sp, it["left"], it["mention"], it["right"]),
                [candidate_of(pm.tokenizer, pm.sp, title, d, pm.max_knowledge_tokens + 1) for d in it["senses"]])

    results, kept, built = build_or_refuse(items, build)
    prompts, conts = [p for p, _ in built], [c for _, c in built]
    for k, p in zip(kept, rank(pm, prompts, conts)):
        results[k] = {"predicted": p, "correct": float(p == items[k]["gold"])}
    return results


def qa(pm: ProbeModel, items: Sequence[dict]) -> list[dict]:
    """Zero- or few-shot QA: the answer generated after ``Question: {q}? Answer:`` (prompt variant
    ``pm.qa_prompt_variant``, after the item's ``exemplars`` if any), cut as the official KILM code cuts it,
    scored by exact match and token F1 (best over the gold answers). A question the prompt refuses (a
    control token in it) is skipped with its reason, never an error of the run."""
    def build(it: dict) -> Prompt:
        return qa_prompt(pm.tokenizer, pm.sp, it["question"], [tuple(x) for x in it.get("exemplars") or []],
                         pm.qa_prompt_variant, pm.max_input_tokens)

    results, kept, prompts = build_or_refuse(items, build)
    for r in results:
        if "refused" in r:
            reason = r.pop("refused")
            r["skipped"] = "a control token in the question" if "reserved token" in reason else reason
    for k, out in zip(kept, _generate(pm, prompts, pm.max_new_tokens)):
        answer = cut_answer(pm.tokenizer.decode([int(t) for t in out.tokens if int(t) != pm.sp.eos],
                                                skip_special_tokens=True, clean_up_tokenization_spaces=True))
        golds = items[k]["answers"]
        results[k] = {"generated": answer, "exact_match": best_over(exact_match, answer, golds),
                      "f1": best_over(token_f1, answer, golds)}
    return results


@torch.no_grad()
def retention(pm: ProbeModel, items: Sequence[dict], params: MaskingParams, seed: int) -> list[dict]:
    """BART text infilling with no entity markup on whole chunks (``ids``): each chunk's summed token loss
    and token count (a token-weighted loss over chunks is a ratio of sums)."""
    from kilm_ray.model.bart import token_losses

    device = next(pm.model.parameters()).device
    out = []
    for start in range(0, len(items), pm.batch_size):
        chunk = items[start: start + pm.batch_size]
        examples = [build_retention_example([int(t) for t in it["ids"]], int(it["sample_id"]), seed, params, pm.sp)
                    for it in chunk]
        batch = {k: torch.from_numpy(v).to(device) for k, v in collate(examples, pm.sp, 1.0).items()}
        logits = pm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          decoder_input_ids=batch["decoder_input_ids"]).logits
        ce = token_losses(logits, batch["labels"])
        mask = batch["labels"] != -100
        for i in range(len(chunk)):
            out.append({"loss_sum": float(ce[i][mask[i]].sum()), "tokens": int(mask[i].sum())})
    return out


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50))
