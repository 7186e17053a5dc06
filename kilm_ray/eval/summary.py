"""Per-item probe results -> the figures of metrics.json, each with its bootstrap 95% interval. Pure.

Every figure is a mean over items (mentions, examples, questions) or a ratio of sums (losses over
tokens); ``intervals[key] = [low, high]`` stands beside each, a bootstrap over the items' clusters (a
row's ``cluster``: the article of a mention or chunk, the word of a sense item, the question itself;
``kilm_ray.eval.stats``), and ``clusters`` says how many there were. The per-item scores are kept too
(``per_item``, with each item's cluster), keyed by item id, so ``kilm-ray compare`` can pair two models
on the same items and resample the same clusters.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from kilm_ray.eval.split import GROUPS
from kilm_ray.eval.stats import interval, ratio_interval

KNOWLEDGE_KEYS = ("title_exact_match", "description_f1", "description_rouge_l")


def description_f1_name(cut: Optional[int]) -> str:
    """How description F1 is printed: its gold is the knowledge as stored, cut to ``cut`` tokens."""
    return f"description token F1 (gold cut to {cut} tokens)" if cut else "description token F1"


def cluster_of(row: dict) -> Any:
    """The unit a bootstrap resamples: the row's ``cluster`` (its article), else the item itself."""
    return row.get("cluster", row["id"])


def _mean_with_interval(out: dict, key: str, rows: Sequence[dict], values: Sequence[float], seed: int) -> None:
    iv = interval(values, seed, clusters=[cluster_of(r) for r in rows])
    out[key] = iv["mean"]
    out.setdefault("intervals", {})[key] = [iv["low"], iv["high"]]


def _clusters(rows: Sequence[dict]) -> int:
    return len({cluster_of(r) for r in rows})


def _scored(rows: Sequence[dict], probe: str) -> list[dict]:
    return [r for r in rows if isinstance(r.get(probe), dict) and "refused" not in r[probe]]


def knowledge_summary(rows: Sequence[dict], probe: str, seed: int = 0) -> dict[str, Any]:
    """A knowledge-generation probe (describe, appositive, lookup) per group (all, seen, unseen): its
    means, the copy rule (mention text as the title), and the title exact match on the mentions whose
    title is not the mention text, nor an inflection of it."""
    out: dict[str, Any] = {}
    scored = _scored(rows, probe)
    for group in ("all", *GROUPS):
        sel = [r for r in scored if group == "all" or r["group"] == group]
        summary: dict[str, Any] = {"mentions": len(sel), "clusters": _clusters(sel)}
        if sel:
            for key in KNOWLEDGE_KEYS:
                _mean_with_interval(summary, key, sel, [r[probe][key] for r in sel], seed)
            if all("title_exact_match_generated" in r[probe] for r in sel):  # eval.title_candidates
                _mean_with_interval(summary, "title_exact_match_generated", sel,
                                    [r[probe]["title_exact_match_generated"] for r in sel], seed)
                summary["titles_from_mention"] = sum(r[probe]["title_source"] == "mention" for r in sel)
            _mean_with_interval(summary, "copy_rule_title_exact_match", sel, [r["copy_rule"] for r in sel], seed)
            differs = [r for r in sel if r["title_differs"]]
            summary["title_not_mention"] = len(differs)
            if differs:
                _mean_with_interval(summary, "title_exact_match_title_not_mention", differs,
                                    [r[probe]["title_exact_match"] for r in differs], seed)
                summary["title_not_mention_clusters"] = _clusters(differs)
        out[group] = summary
    refused = [r[probe]["refused"] for r in rows if isinstance(r.get(probe), dict) and "refused" in r[probe]]
    if refused:
        out["refused"] = {reason: refused.count(reason) for reason in sorted(set(refused))}
    out["per_item"] = per_item(scored, probe, KNOWLEDGE_KEYS)
    return out


def per_item(rows: Sequence[dict], probe: str, keys: Sequence[str]) -> dict[str, list]:
    return {"id": [r["id"] for r in rows], "group": [r.get("group") for r in rows],
            "cluster": [cluster_of(r) for r in rows], **{k: [r[probe][k] for r in rows] for k in keys}}


def fraction_of_lookup(model: dict[str, list], lookup: dict[str, list], keys: Sequence[str] = (
        "title_exact_match", "description_f1"), seed: int = 0) -> dict[str, Any]:
    """The model's figure as a fraction of the training lookup's, on the same mentions, per group, with a
    bootstrap interval (articles resampled with both scores)."""
    index = {i: k for k, i in enumerate(lookup["id"])}
    clusters = model.get("cluster", model["id"])
    out: dict[str, Any] = {}
    for group in ("all", *GROUPS):
        pairs = [(k, index[i]) for k, (i, g) in enumerate(zip(model["id"], model["group"]))
                 if i in index and (group == "all" or g == group)]
        out[group] = {key: ratio_interval([model[key][a] for a, _ in pairs], [lookup[key][b] for _, b in pairs], seed,
                                          clusters=[clusters[a] for a, _ in pairs])
                      for key in keys}
    return out


def ranking_summary(rows: Sequence[dict], probe: str, groups: Sequence[str] = ("all", *GROUPS),
                    seed: int = 0) -> dict[str, Any]:
    """A ranking probe (anchors, word senses): accuracy; the first candidate (most frequent training
    target, or WordNet's first sense); a uniform random choice (expected); gold among the candidates."""
    scored = [r for r in rows if isinstance(r.get(probe), dict) and "correct" in r[probe]]
    out: dict[str, Any] = {}
    for group in groups:
        sel = [r for r in scored if group == "all" or r["group"] == group]
        summary: dict[str, Any] = {"mentions": len(sel), "clusters": _clusters(sel)}
        if sel:
            _mean_with_interval(summary, "accuracy", sel, [r[probe]["correct"] for r in sel], seed)
            _mean_with_interval(summary, "baseline_accuracy", sel, [float(r["gold"] == 0) for r in sel], seed)
            summary["random_accuracy"] = sum((1 / r["candidates"]) if r["gold"] >= 0 else 0.0 for r in sel) / len(sel)
            summary["gold_among_candidates"] = sum(float(r["gold"] >= 0) for r in sel) / len(sel)
            summary["mean_candidates"] = sum(r["candidates"] for r in sel) / len(sel)
        out[group] = summary
    refused = [r for r in rows if isinstance(r.get(probe), dict) and "refused" in r[probe]]
    if refused:
        out["refused"] = len(refused)
    out["per_item"] = {"id": [r["id"] for r in scored], "group": [r["group"] for r in scored],
                       "cluster": [cluster_of(r) for r in scored], "correct": [r[probe]["correct"] for r in scored],
                       "baseline": [float(r["gold"] == 0) for r in scored]}
    return out


def retention_summary(rows: Sequence[dict], seed: int = 0) -> dict[str, Any]:
    """Token-weighted infilling loss over chunks (a ratio of sums) with its interval over their articles."""
    from kilm_ray.eval.probing import perplexity

    iv = ratio_interval([r["loss_sum"] for r in rows], [r["tokens"] for r in rows], seed,
                        clusters=[cluster_of(r) for r in rows])
    return {"chunks": len(rows), "clusters": iv["clusters"], "tokens": int(sum(r["tokens"] for r in rows)),
            "infilling_loss": iv["ratio"], "intervals": {"infilling_loss": [iv["low"], iv["high"]]},
            "perplexity": perplexity(iv["ratio"]),
            "per_item": {"id": [r["id"] for r in rows], "cluster": [cluster_of(r) for r in rows],
                         "loss_sum": [r["loss_sum"] for r in rows], "tokens": [r["tokens"] for r in rows]}}


def qa_summary(rows: Sequence[dict], file_info: dict[str, Any], items: Sequence[dict],
               seed: int = 0) -> dict[str, Any]:
    """QA: questions read from the file, skipped (by reason: unreadable rows, control tokens), scored;
    exact match and token F1 over the scored ones."""
    scored = [r for r in rows if "exact_match" in r]
    skipped = dict(file_info.get("skipped", {}))
    for r in rows:
        if "skipped" in r:
            skipped[r["skipped"]] = skipped.get(r["skipped"], 0) + 1
    out: dict[str, Any] = {"file": file_info.get("path"), "format": file_info.get("format"),
                           "read": file_info.get("rows"), "skipped": skipped, "questions": len(scored),
                           "clusters": _clusters(scored),
                           **{k: file_info[k] for k in ("shots", "prompt_variant", "exemplars", "exemplar_file",
                                                        "exemplar_pool", "exemplar_seed", "questions_with_fewer_exemplars")
                              if k in file_info}}
    _mean_with_interval(out, "exact_match", scored, [r["exact_match"] for r in scored], seed)
    _mean_with_interval(out, "f1", scored, [r["f1"] for r in scored], seed)
    by_id = {it["id"]: it for it in items}
    out["examples"] = [{"question": by_id[r["id"]]["question"], "answers": by_id[r["id"]]["answers"],
                        "generated": r["generated"]} for r in scored[:8]]
    out["per_item"] = {"id": [r["id"] for r in scored], "exact_match": [r["exact_match"] for r in scored],
                       "f1": [r["f1"] for r in scored]}
    return out


def appos_summary(rows: Sequence[dict], info: dict[str, Any], items: dict[str, dict],
                  seed: int = 0) -> dict[str, Any]:
    """ApposCorpus: token F1 and ROUGE-L of the generated appositive against the gold, on the rows whose gold
    is not empty (each row its own cluster: the corpus gives no article), and F1 against the entity's
    description; rows with an empty gold and refused prompts counted."""
    done = [r for r in rows if "generated" in r]
    scored = [r for r in done if "appositive_f1" in r]
    out: dict[str, Any] = {**info, "scored": len(scored), "target_empty": sum(1 for r in done if r.get("target_empty")),
                           "refused": sum(1 for r in rows if "refused" in r)}
    if scored:
        _mean_with_interval(out, "appositive_f1", scored, [r["appositive_f1"] for r in scored], seed)
        _mean_with_interval(out, "appositive_rouge_l", scored, [r["appositive_rouge_l"] for r in scored], seed)
    described = [r for r in done if "description_f1" in r]
    if described:
        _mean_with_interval(out, "description_f1", described, [r["description_f1"] for r in described], seed)
    out["examples"] = [{"text": items[r["id"]]["text"][-160:], "mention": items[r["id"]]["mention"],
                        "gold": r["target"], "generated": r["generated"]} for r in scored[:6]]
    out["per_item"] = {"id": [r["id"] for r in scored], "appositive_f1": [r["appositive_f1"] for r in scored]}
    return out


def examples_by_group(rows: Sequence[dict], probe: str, n: int = 6,
                      order: Optional[dict[str, int]] = None) -> dict[str, list[dict]]:
    """The first ``n`` scored mentions of each group (in sample order), as mention / gold / generated."""
    scored = sorted(_scored(rows, probe), key=lambda r: (order or {}).get(r["id"], 0))
    return {g: [{"mention": r["surface"], "gold": r["gold"], "generated": r[probe]["generated"]}
                for r in scored if r["group"] == g][:n] for g in GROUPS}
