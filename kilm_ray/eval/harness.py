"""The evaluation harness: knowledge probes and retention of an exported model on held-out articles.

Every probe runs on a seeded random sample of the mentions of a split of articles never trained on
(``eval.split``, default test), each labelled **seen** (a training mention links its entity with
knowledge) or **unseen**. What it reads, and where (no process reads the train split whole):

1. which mentions: a seeded bottom-k sample over the split's shards (``select``, Ray Data);
2. what training held for them: the dataset's tables (``tables``: seen titles, anchor texts -> training
   titles), streamed and filtered to those mentions;
3. that they are held out: the train shards scanned for the evaluated articles and sample ids;
4. the probes, as Ray Data map stages over the chosen rows, in actors that hold the model
   (``stages``, ``probing``); then every figure with its bootstrap interval (``summary``).

Probes: description generation (describe; beside it the copy rule and the training lookup), appositive
generation, anchor disambiguation (seen entities: an unseen entity is never a training candidate, so its
accuracy is 0 by construction), word senses from WordNet usage examples, retention (text-infilling loss),
zero-shot QA. Provenance lives in ``provenance``, question files in ``qa_files``.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from kilm_ray import storage
from kilm_ray.config import KilmConfig

log = logging.getLogger("kilm_ray.eval")


class Context:
    """What every step of one evaluation needs: the dataset, its tables, the tokenizer, the config."""

    def __init__(self, model_dir: str, data_dir: str, cfg: KilmConfig, device: str):
        from kilm_ray.data.tables import dataset_tables
        from kilm_ray.store.loader import read_meta

        self.model_dir, self.data_dir, self.cfg, self.device = model_dir, data_dir, cfg, device
        self.manifest = read_meta(data_dir)
        self.tokenizer_json = storage.read_bytes(storage.join(
            data_dir, self.manifest.get("tokenizer", "tokenizer"), "tokenizer.json")).decode()
        self.tables = dataset_tables(data_dir, cfg)

    @functools.cached_property
    def ledger(self) -> tuple[str, list[str]]:
        """The test ledger's path and this dataset's split keys (``kilm_ray.eval.ledger``)."""
        from kilm_ray.eval.ledger import ledger_path, split_keys

        return ledger_path(self.data_dir, self.cfg.eval.test_ledger), split_keys(self.manifest)

    def test_looks(self, declared: Optional[int] = None) -> list[dict]:
        """The ledger's earlier looks at this dataset's test articles; refused (``TestLookRefused``) when
        ``declared`` is given and is not their number."""
        from kilm_ray.eval.ledger import check_look, read_looks

        path, keys = self.ledger
        earlier = read_looks(path, keys)
        if declared is not None:
            check_look(earlier, declared, path)
        return earlier

    def record_test_look(self, what: str, by: str, step: Any = None, **facts: Any) -> dict:
        """Count a look at the test articles, before any probe runs (a run that fails half-way may have
        shown figures)."""
        from kilm_ray.eval.ledger import record_look

        path, keys = self.ledger
        return record_look(path, keys, what, by, step, dataset=self.manifest.get("run_key"), **facts)

    def files(self, split: str, sample_ids: Optional[set] = None) -> list[str]:
        from kilm_ray.eval.select import shard_entries, shards_holding

        entries = shard_entries(self.manifest, split)
        if sample_ids is not None:
            entries = shards_holding(entries, sample_ids)
        return [storage.join(self.data_dir, self.manifest["shards"], e["path"]) for e in entries]


def check_tokenizers(model_dir: str, data_dir: str) -> None:
    """The export and the dataset must use the same control ids."""
    from transformers import AutoTokenizer

    from kilm_ray.store.loader import special_ids_of
    from kilm_ray.method.tokenizer import special_ids

    model_sp = special_ids(AutoTokenizer.from_pretrained(storage.local_copy(model_dir)))
    if model_sp.all().tolist() != special_ids_of(data_dir).all().tolist():
        raise ValueError(f"{model_dir} and {data_dir} use different tokenizers (special token ids differ)")


def model_facts(model_dir: str) -> dict[str, Any]:
    """The export's step and parameter count (the model built on the meta device: no weights loaded)."""
    import torch
    from transformers import AutoConfig, BartForConditionalGeneration

    from kilm_ray.model.bart import EXPORT_META, count_parameters

    local = Path(storage.local_copy(model_dir))
    meta = json.loads((local / EXPORT_META).read_text()) if (local / EXPORT_META).is_file() else {}
    with torch.device("meta"):
        skeleton = BartForConditionalGeneration(AutoConfig.from_pretrained(local))
    return {"step": meta.get("step"), "parameters": count_parameters(skeleton)}


# ----------------------------------------------------------------------------------------------
# Held-out mentions: selection, what training held for them, the probes
# ----------------------------------------------------------------------------------------------


def mention_extras(ctx: Context, chosen: list[dict]) -> tuple[dict[str, dict], dict[str, dict]]:
    """Per chosen mention: its group (seen/unseen), training mentions of its entity, anchor candidates
    (training titles of its anchor text, most linked first, with their knowledge), the gold's index among
    them, and the training lookup's answer. Returns (extras sent to the probes, title rows asked)."""
    from kilm_ray.eval.select import group_of
    from kilm_ray.data.tables import surface_key

    e = ctx.cfg.eval
    surfaces = ctx.tables.surfaces_of({surface_key(m["surface"]) for m in chosen})
    candidates = {t for row in surfaces.values() for t in row["titles"][: e.max_candidates]}
    titles = ctx.tables.titles_of({m["title"] for m in chosen} | {m["article"] for m in chosen} | candidates)
    extras: dict[str, dict] = {}
    anchors = 0
    for m in chosen:
        mid = f"{m['sample_id']}:{m['entity']}"
        title_row = titles.get(m["title"])
        row = surfaces.get(surface_key(m["surface"]))
        ranked = row["titles"][: e.max_candidates] if row else []
        extra: dict[str, Any] = {"surface": m["surface"], "group": group_of(title_row),
                                 "train_mentions": int((title_row or {}).get("train_mentions") or 0)}
        if ranked and ranked[0] in titles:
            extra["lookup_knowledge"] = titles[ranked[0]]["knowledge"]
        if len(ranked) >= 2 and (not e.max_disambiguation_mentions or anchors < e.max_disambiguation_mentions):
            anchors += 1
            extra["candidates"] = [{"title": t, "knowledge": titles[t]["knowledge"]} for t in ranked if t in titles]
            extra["gold"] = ranked.index(m["title"]) if m["title"] in ranked else -1
        extras[mid] = extra
    return extras, titles


def first_sentence_exposure(ctx: Context, split: str, chosen: list[dict], titles: dict[str, dict]) -> dict[str, Any]:
    """Held-out articles whose first sentence was a trained entity's knowledge (their own title linked
    in training with first-sentence knowledge): in the split (from the tables) and among the evaluated."""
    def exposed(article: str) -> bool:
        row = titles.get(article) or {}
        return row.get("article_split") == split and row.get("source") == "first_sentence" \
            and int(row.get("train_mentions") or 0) > 0

    s = ctx.tables.summary
    articles = {m["article"] for m in chosen}
    return {"split_articles": s["articles"].get(split, 0), "split_articles_exposed":
            s["first_sentence_in_training"].get(split, 0), "evaluated_articles": len(articles),
            "evaluated_articles_exposed": sum(exposed(a) for a in articles),
            "evaluated_mentions_in_exposed_articles": sum(exposed(m["article"]) for m in chosen)}


@dataclass
class Part:
    """One part of an evaluation: its items (a Ray Dataset, each item tagged with its probe and this part's
    name) and what turns its results into figures."""
    name: str
    dataset: Any
    finish: Callable[[list[dict]], Any]


def _article_of(chosen: list[dict]) -> dict[str, str]:
    """Item id -> its article: the cluster every interval resamples (mentions of one article move together)."""
    return {f"{m['sample_id']}:{m['entity']}" if "entity" in m else str(m["sample_id"]): m["article"] for m in chosen}


def _wanted(chosen: list[dict]) -> dict[int, list[int]]:
    wanted: dict[int, list[int]] = {}
    for m in chosen:
        wanted.setdefault(m["sample_id"], []).append(m.get("entity", -1))
    return wanted


def check_held_out(ctx: Context, split: str, chosen: list[dict]) -> dict[str, Any]:
    """Raises unless none of the chosen mentions' articles and chunks is in train (a Ray Data scan of the
    train shards); the check's counts."""
    from kilm_ray.data.tables import train_overlap

    overlap = train_overlap(ctx.data_dir, {m["article"] for m in chosen}, {m["sample_id"] for m in chosen})
    if overlap["articles_in_train"] or overlap["samples_in_train"]:
        raise AssertionError(f"{split} is not held out: {len(overlap['samples_in_train'])} sample ids and "
                             f"{len(overlap['articles_in_train'])} articles also in train, e.g. "
                             f"{(overlap['articles_in_train'] or overlap['samples_in_train'])[:3]}")
    return overlap


def held_out_mentions(ctx: Context, split: str) -> tuple[Part, dict[str, Any]]:
    """The sampled mentions of ``split`` (every per-mention probe runs on them), with what the split
    section of metrics.json says about them; raises if one of their articles or chunks is in train."""
    from kilm_ray.eval.select import describe_selection, sample_split
    from kilm_ray.eval.stages import read_items

    cfg = ctx.cfg
    chosen = sample_split(ctx.files(split), "mentions", cfg.eval.seed, cfg.eval.max_samples,
                          cfg.data.max_eval_entities, ctx.tokenizer_json)
    extras, titles = mention_extras(ctx, chosen)
    overlap = check_held_out(ctx, split, chosen)
    wanted = _wanted(chosen)
    order = {f"{m['sample_id']}:{m['entity']}": k for k, m in enumerate(chosen)}
    article = _article_of(chosen)

    def finish(rows: list[dict]) -> dict[str, Any]:
        for r in rows:
            extra = extras[r["id"]]
            r.update(order=order[r["id"]], surface=extra["surface"], group=extra["group"],
                     train_mentions=extra["train_mentions"], cluster=article[r["id"]])
            if "anchor" in r:
                r.update(gold=extra["gold"], candidates=len(extra["candidates"]))
        return mention_metrics(sorted(rows, key=lambda r: r["order"]), cfg.eval.seed)

    groups = {g: sum(1 for e in extras.values() if e["group"] == g) for g in ("seen", "unseen")}
    info = {"evaluated": split, **describe_selection(chosen), **groups,
            "sampling": f"seeded random sample of {cfg.eval.max_samples or 'all'} mentions (bottom-k of a keyed hash "
                        f"of sample id and entity, seed {cfg.eval.seed}; at most {cfg.data.max_eval_entities} per chunk)",
            "held_out_check": {k: (len(v) if isinstance(v, list) else v) for k, v in overlap.items()},
            "first_sentence_in_training": first_sentence_exposure(ctx, split, chosen, titles)}
    ds = read_items(ctx.files(split, set(wanted)), wanted, "mentions", extras,
                    tag={"probe": "mentions", "part": "mentions"})
    return Part("mentions", ds, finish), info


def mention_metrics(rows: list[dict], seed: int) -> dict[str, Any]:
    """describe (with the training lookup as a fraction), appositive, anchors from the mention rows."""
    from kilm_ray.eval.summary import examples_by_group, fraction_of_lookup, knowledge_summary, ranking_summary

    out: dict[str, Any] = {}
    out["describe"] = knowledge_summary(rows, "describe", seed)
    out["describe"]["examples"] = examples_by_group(rows, "describe")
    out["training_lookup"] = knowledge_summary(rows, "lookup", seed)
    out["describe"]["fraction_of_lookup"] = fraction_of_lookup(out["describe"]["per_item"],
                                                                 out["training_lookup"]["per_item"], seed=seed)
    out["appositive"] = knowledge_summary(rows, "appositive", seed)
    out["appositive"]["examples"] = examples_by_group(rows, "appositive")
    anchors = ranking_summary(rows, "anchor", ("seen",), seed)
    anchors["unseen_excluded"] = sum(1 for r in rows if "anchor" in r and r["group"] == "unseen")
    anchors["note"] = ("seen entities only: the candidates are training titles, so an unseen entity's title is "
                       "never among them and its accuracy is 0 by construction")
    out["disambiguation_anchor"] = anchors
    return out


def describe_part(ctx: Context, name: str, split: str, chosen: list[dict], group: Optional[str] = None,
                  keep_answers: bool = False) -> Part:
    """Describe alone on chosen mentions (training recall; the demo's rule); ``group`` labels them all;
    ``keep_answers``: the summary's ``answers`` holds each mention's generated knowledge by item id."""
    from kilm_ray.eval.stages import read_items
    from kilm_ray.eval.summary import knowledge_summary

    extras = {f"{m['sample_id']}:{m['entity']}": {"surface": m["surface"]} for m in chosen}
    wanted = _wanted(chosen)
    article = _article_of(chosen)

    def finish(rows: list[dict]) -> dict[str, Any]:
        for r in rows:
            r.update(group=group or "seen", cluster=article[r["id"]])
        summary = knowledge_summary(rows, "describe", ctx.cfg.eval.seed)
        if keep_answers:
            summary["answers"] = {r["id"]: r["describe"]["generated"] for r in rows
                                  if "generated" in (r.get("describe") or {})}
            summary["titles_from_mention_ids"] = sorted(r["id"] for r in rows
                                                        if (r.get("describe") or {}).get("title_source") == "mention")
        return summary

    ds = read_items(ctx.files(split, set(wanted)), wanted, "mentions", extras, tag={"probe": "describe", "part": name})
    return Part(name, ds, finish)


def training_recall(ctx: Context) -> Part:
    """Describe on a seeded sample of training mentions: recall of training samples (not held out)."""
    from kilm_ray.eval.select import sample_split

    cfg = ctx.cfg
    chosen = sample_split(ctx.files("train"), "mentions", cfg.eval.seed, cfg.eval.train_recall_samples,
                          cfg.data.max_eval_entities, ctx.tokenizer_json)
    return describe_part(ctx, "training_recall", "train", chosen)


def retention(ctx: Context, name: str, split: str, n: int) -> tuple[Part, int]:
    """Text-infilling loss on a seeded sample of ``n`` chunks of ``split`` (0 = all); and how many."""
    from kilm_ray.eval.select import sample_split
    from kilm_ray.eval.stages import read_items
    from kilm_ray.eval.summary import retention_summary

    chosen = sample_split(ctx.files(split), "chunks", ctx.cfg.eval.seed, n)
    wanted = {c["sample_id"]: [] for c in chosen}
    article = _article_of(chosen)
    ds = read_items(ctx.files(split, set(wanted)), wanted, "chunks", tag={"probe": "retention", "part": name})
    return Part(name, ds, lambda rows: retention_summary([{**r, "cluster": article[r["id"]]} for r in rows],
                                                         ctx.cfg.eval.seed)), len(chosen)


def word_senses(ctx: Context, kb_file: str) -> Part:
    """WordNet usage examples: each sense's definition a candidate; seen = the word is a trained title."""
    from kilm_ray.eval.senses import read_wordnet_rows, seeded_sample, sense_items
    from kilm_ray.eval.stages import items_dataset
    from kilm_ray.eval.summary import ranking_summary

    e = ctx.cfg.eval
    candidates = sense_items(read_wordnet_rows(kb_file), e.max_candidates)
    chosen = seeded_sample(candidates, e.max_sense_items, e.seed)
    titles = ctx.tables.titles_of({w for it in chosen for w in (it.word, it.word[:1].upper() + it.word[1:])})
    items = []
    for k, it in enumerate(chosen):
        seen = any(int((titles.get(w) or {}).get("train_mentions") or 0) > 0
                   for w in (it.word, it.word[:1].upper() + it.word[1:]))
        items.append({"id": f"{k:06d}", "word": it.word, "left": it.left, "mention": it.mention, "right": it.right,
                      "senses": list(it.senses), "gold": it.gold, "group": "seen" if seen else "unseen"})
    by_id = {it["id"]: it for it in items}

    def finish(rows: list[dict]) -> dict[str, Any]:
        for r in rows:
            it = by_id[r["id"]]
            r.update(group=it["group"], gold=it["gold"], candidates=len(it["senses"]), cluster=it["word"])
        return {**ranking_summary(rows, "senses", seed=e.seed), "examples_available": len(candidates)}

    return Part("word_senses", items_dataset(items, {"probe": "senses", "part": "word_senses"}), finish)


def question_answering(ctx: Context, qa_file: str) -> Part:
    """Zero- or few-shot QA on a question file as published (read, skipped and scored counts reported);
    few-shot exemplars (eval.qa_shots) come from eval.qa_exemplar_file, chosen on the driver."""
    from kilm_ray.eval.qa_files import read_qa_file
    from kilm_ray.eval.stages import items_dataset
    from kilm_ray.eval.summary import qa_summary
    from kilm_ray.method.fewshot import choose_exemplars, usable

    e = ctx.cfg.eval
    parsed = read_qa_file(qa_file)
    items = [{"id": f"{k:07d}", "question": q, "answers": a} for k, (q, a) in enumerate(parsed.pairs)]
    info = {"path": qa_file, "format": parsed.format, "rows": parsed.rows, "skipped": dict(parsed.skipped),
            "shots": e.qa_shots, "prompt_variant": e.qa_prompt}
    if e.qa_shots:
        train = read_qa_file(e.qa_exemplar_file)
        pool = usable([(q, answers[0]) for q, answers in train.pairs])
        chosen = choose_exemplars([it["question"] for it in items], pool, e.qa_shots, e.qa_exemplars, e.seed)
        for it, shots in zip(items, chosen):
            it["exemplars"] = [list(x) for x in shots]
        info.update(exemplars=e.qa_exemplars, exemplar_file=e.qa_exemplar_file, exemplar_pool=len(pool),
                    exemplar_seed=e.seed if e.qa_exemplars == "random" else None,
                    questions_with_fewer_exemplars=sum(1 for shots in chosen if len(shots) < e.qa_shots))

    def finish(rows: list[dict]) -> dict[str, Any]:
        return {**qa_summary(rows, info, items, ctx.cfg.eval.seed), "skipped_examples": parsed.examples}

    return Part("qa", items_dataset(items, {"probe": "qa", "part": "qa"}), finish)


def appos_corpus(ctx: Context, path: str, subset: str) -> Part:
    """ApposCorpus (the paper's appositive generation task) as published; rows read, skipped, scored."""
    import random

    from kilm_ray.eval.appos_files import read_appos
    from kilm_ray.eval.stages import items_dataset
    from kilm_ray.eval.summary import appos_summary

    e = ctx.cfg.eval
    parsed = read_appos(path, subset)
    items = parsed.items
    if e.appos_max_items and len(items) > e.appos_max_items:
        keep = sorted(random.Random(e.seed).sample(range(len(items)), e.appos_max_items))
        items = [items[k] for k in keep]
    info = {"path": parsed.path, "rows": parsed.rows, "skipped": dict(parsed.skipped), "probed": len(items),
            "skipped_examples": parsed.examples}
    by_id = {it["id"]: it for it in items}
    return Part("appos_corpus", items_dataset(items, {"probe": "appos", "part": "appos_corpus"}),
                lambda rows: appos_summary(rows, info, by_id, e.seed))


def run_parts(ctx: Context, parts: list[Part]) -> dict[str, Any]:
    """Every part's items through one Ray Data stage of probe actors (the model loads once per actor);
    each part's figures from its results."""
    from kilm_ray.eval.stages import run_probe

    ds = parts[0].dataset.union(*[p.dataset for p in parts[1:]]) if len(parts) > 1 else parts[0].dataset
    rows = run_probe(ds, None, ctx.model_dir, ctx.cfg, ctx.device)
    by_part: dict[str, list[dict]] = {p.name: [] for p in parts}
    for r in rows:
        by_part[r["part"]].append(r)
    return {p.name: p.finish(by_part[p.name]) for p in parts}


# ----------------------------------------------------------------------------------------------
# The whole evaluation
# ----------------------------------------------------------------------------------------------


def evaluate(model_dir: str, data_dir: str, cfg: KilmConfig, kb_file: Optional[str] = None,
             qa_file: Optional[str] = None, device: str = "auto", run_dir: Optional[str] = None) -> dict[str, Any]:
    from kilm_ray.eval.probing import form_of
    from kilm_ray.eval.provenance import data_summary, source_commit, training_summary
    from kilm_ray.store.loader import verify_tokenizer

    verify_tokenizer(data_dir)  # the stored ids must mean the tokens of the dataset's tokenizer
    check_tokenizers(model_dir, data_dir)
    ctx = Context(model_dir, data_dir, cfg, device)
    split = cfg.eval.split
    model = model_facts(model_dir)
    look = None
    if split == "test":  # refused before any work unless the ledger holds the looks declared; then counted
        ctx.test_looks(cfg.eval.test_looks_before)
        look = ctx.record_test_look(f"model {model_dir}", "kilm-ray eval", model["step"],
                                    declared_before=cfg.eval.test_looks_before, run=run_dir)
    mentions, split_info = held_out_mentions(ctx, split)
    parts = [mentions]
    if cfg.eval.train_recall_samples:
        parts.append(training_recall(ctx))
    if kb_file:
        parts.append(word_senses(ctx, kb_file))
    held, n_chunks = retention(ctx, "retention", split, cfg.eval.retention_max_chunks)
    parts += [held, retention(ctx, "retention_train_text", "train", n_chunks)[0]]  # as many training chunks
    if qa_file:
        parts.append(question_answering(ctx, qa_file))
    if cfg.eval.appos_file:
        parts.append(appos_corpus(ctx, cfg.eval.appos_file, cfg.eval.appos_subset))
    s = ctx.tables.summary
    split_info.update({f"{split}_articles": s["articles"].get(split), f"{split}_samples": ctx.manifest["samples"][split],
                       "train_articles": s["articles"].get("train"), "train_samples": ctx.manifest["samples"]["train"],
                       "trained_entities": s["trained_entities"]})
    metrics: dict[str, Any] = {
        "model": model_dir, "data": data_dir, "model_step": model["step"], "device": device,
        "probe_form": form_of(cfg.masking), "source": source_commit(), "config": cfg.to_dict(),
        "data_manifest": data_summary(data_dir), "training": training_summary(run_dir),
        "model_parameters": model["parameters"], "split": split_info,
    }
    log.info("probing: %s", ", ".join(p.name for p in parts))
    results = run_parts(ctx, parts)
    metrics.update(results.pop("mentions"))
    metrics.update(results)
    if look is not None:
        metrics["test_look"] = look
    return metrics


def _figure_name(key: str, metrics: dict[str, Any]) -> str:
    """A figure's printed name: description F1 says its gold is the knowledge cut to the training length."""
    from kilm_ray.eval.summary import description_f1_name

    if key == "description_f1":
        return description_f1_name(metrics.get("config", {}).get("data", {}).get("max_knowledge_tokens"))
    return key.replace("_", " ")


def headline(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers worth a table row, named for what they measure."""
    out: dict[str, float] = {}
    split = metrics.get("split", {}).get("evaluated", "held-out")
    for probe, label in (("describe", f"{split} mentions"), ("appositive", "appositive"),
                         ("training_lookup", "training lookup (no model)")):
        for group in ("seen", "unseen"):
            d = metrics.get(probe, {}).get(group, {})
            if not d.get("mentions"):
                continue
            for key in ("title_exact_match", "description_f1"):
                if probe == "appositive" and key == "title_exact_match":
                    continue
                out[f"{label}, {group} entities: {_figure_name(key, metrics)}"] = d[key]
    d = metrics.get("training_recall", {}).get("all", {})
    if d.get("mentions"):
        out["training mentions (recall, not held out): title exact match"] = d["title_exact_match"]
    for name, label, group in (("disambiguation_anchor", "anchor disambiguation, seen entities", "seen"),
                               ("word_senses", "word senses", "all")):
        d = metrics.get(name, {}).get(group, {})
        if d.get("mentions"):
            out[f"{label}: accuracy"] = d["accuracy"]
    if "retention" in metrics:
        out["retention: infilling loss on held-out text"] = metrics["retention"]["infilling_loss"]
    if "retention_train_text" in metrics:
        out["infilling loss on training text"] = metrics["retention_train_text"]["infilling_loss"]
    if metrics.get("appos_corpus", {}).get("scored"):
        out["ApposCorpus: appositive token F1"] = metrics["appos_corpus"]["appositive_f1"]
    if "qa" in metrics:
        out["qa exact match"] = metrics["qa"]["exact_match"]
        out["qa f1"] = metrics["qa"]["f1"]
    return out


def save_metrics(metrics: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "metrics.json"
    path.write_text(json.dumps(metrics, indent=2, default=str))
    return path


# ----------------------------------------------------------------------------------------------
# The demo's knowledge line: a rule fixed before training
# ----------------------------------------------------------------------------------------------


def rule_mentions(ctx: Context, split: str, min_train_mentions: int) -> list[dict]:
    """Every mention of ``split`` whose entity's knowledge is in at least ``min_train_mentions`` training
    mentions, in the seeded sample order (eval.seed): a rule on the data alone."""
    from kilm_ray.eval.select import sample_split

    every = sample_split(ctx.files(split), "mentions", ctx.cfg.eval.seed, 0, ctx.cfg.data.max_eval_entities,
                         ctx.tokenizer_json)
    titles = ctx.tables.titles_of({m["title"] for m in every})
    return [{**m, "train_mentions": int(titles[m["title"]]["train_mentions"])} for m in every
            if m["title"] in titles and int(titles[m["title"]]["train_mentions"] or 0) >= min_train_mentions]


def mention_items(ctx: Context, split: str, chosen: list[dict]) -> list[dict]:
    """The items (chunk tokens, span, knowledge) of a few chosen mentions, on the driver, in their order."""
    from kilm_ray.eval.stages import read_items

    wanted = _wanted(chosen)
    ds = read_items(ctx.files(split, set(wanted)), wanted, "mentions", {}, ctx.tokenizer_json)
    items = {it["id"]: it for b in ds.iter_batches(batch_format="pyarrow", batch_size=None)
             for it in map(json.loads, b["item"].to_pylist())}
    return [items[f"{m['sample_id']}:{m['entity']}"] for m in chosen]


def rule_knowledge(model_dir: str, data_dir: str, cfg: KilmConfig, split: str, min_train_mentions: int,
                   device: str = "auto", by: str = "kilm-ray demo") -> tuple[dict[str, Any], list[dict]]:
    """Describe on the rule's mentions (:func:`rule_mentions`): the summary over them (title exact match,
    copy rule, description F1, with intervals; ``answers``: each mention's answer by item id) and the
    chosen mentions in order."""
    ctx = Context(model_dir, data_dir, cfg, device)
    chosen = rule_mentions(ctx, split, min_train_mentions)
    overlap = check_held_out(ctx, split, chosen)
    look = None
    if split == "test":  # the demo never refuses a look: it says which one its line is
        look = ctx.record_test_look(f"rule: describe, entities in >= {min_train_mentions} training mentions, "
                                    f"model {model_dir}", by, model_facts(model_dir)["step"])
    summary = run_parts(ctx, [describe_part(ctx, "rule", split, chosen, keep_answers=True)])["rule"]
    figures = {**summary["all"], "answers": summary.get("answers", {}),
               "titles_from_mention_ids": summary.get("titles_from_mention_ids", []),
               "held_out_check": {k: (len(v) if isinstance(v, list) else v) for k, v in overlap.items()}}
    if look is not None:
        figures["test_look"] = look
    return figures, chosen


def knowledge_line(summary: dict[str, Any], knowledge_tokens: int) -> str:
    """The demo's last line (``knowledge_tokens``: the length the gold knowledge was cut to)."""
    articles = f" in {summary['clusters']} articles" if summary.get("clusters") else ""
    return (f"held-out knowledge: {summary['mentions']} mentions{articles}, title exact match "
            f"{summary.get('title_exact_match', float('nan')):.2f} (copy rule "
            f"{summary.get('copy_rule_title_exact_match', float('nan')):.2f}), description F1 "
            f"{summary.get('description_f1', float('nan')):.2f} (gold cut to {knowledge_tokens} tokens)")
