"""The evaluation's Ray Data stages: read the chosen rows of a split, and run a probe over them in actors
that hold the model (``eval.actors`` of them, ``eval.cpus_per_actor`` CPUs and ``eval.gpus_per_actor``
GPUs each). Items and results travel as JSON strings, one per row; the probe functions are
``kilm_ray.eval.probing``'s. The driver gets one small result per item back.
"""

from __future__ import annotations

import json
import logging
from typing import Optional

import pyarrow as pa

from kilm_ray import storage

log = logging.getLogger("kilm_ray.eval")


def _rows_of(batch: pa.Table, wanted: dict[str, list[int]], kind: str) -> list[dict]:
    """The wanted rows of a batch of chunk rows as items: per mention (``kind="mentions"``: the chunk's
    tokens, the mention's span and knowledge) or per chunk (``"chunks"``: the tokens)."""
    import pyarrow.compute as pc

    sids = pa.array([int(s) for s in wanted], pa.int64())
    hit = batch.filter(pc.is_in(batch["sample_id"], value_set=sids))
    out = []
    for row in hit.to_pylist():
        sid = int(row["sample_id"])
        if kind == "chunks":
            out.append({"id": str(sid), "sample_id": sid, "article": row["article"], "ids": row["input_ids"]})
            continue
        for j in wanted[str(sid)]:
            out.append({"id": f"{sid}:{j}", "sample_id": sid, "entity": j, "article": row["article"],
                        "ids": row["input_ids"], "start": row["ent_start"][j], "end": row["ent_end"][j],
                        "knowledge": row["ent_knowledge"][j], "title": row["ent_title"][j]})
    return out


def _read_items(batch: pa.Table, wanted: dict[str, list[int]], kind: str, extras: dict[str, dict],
                decode_json: Optional[str], tag: dict) -> pa.Table:
    import pyarrow.parquet as pq

    from kilm_ray.method.tokenizer import CorpusTokenizer

    decode = CorpusTokenizer(decode_json).decode if decode_json else None
    items = []
    columns = ["sample_id", "article", "input_ids"] + (
        ["ent_start", "ent_end", "ent_title", "ent_knowledge"] if kind == "mentions" else [])
    for uri in batch["path"].to_pylist():
        fs, path = storage.resolve(uri)
        with fs.open_input_file(path) as f:
            for chunk in pq.ParquetFile(f).iter_batches(batch_size=4096, columns=columns):
                for item in _rows_of(pa.Table.from_batches([chunk]), wanted, kind):
                    if decode is not None and kind == "mentions":
                        item["surface"] = decode(item["ids"][item["start"]:item["end"]]).strip()
                    item.update(extras.get(item["id"], {}))
                    item.update(tag)
                    items.append(json.dumps(item))
    return pa.table({"item": pa.array(items, pa.large_string())})


def read_items(files: list[str], wanted: dict[int, list[int]], kind: str, extras: Optional[dict[str, dict]] = None,
               tokenizer_json: Optional[str] = None, tag: Optional[dict] = None):
    """A Ray Dataset of the items of ``wanted`` (sample id -> entity indices; chunks: any list) read from
    ``files`` (those holding them), each with its ``extras[id]`` and ``tag`` merged in (``probe``: the
    probe to run on it; ``part``: which part of the evaluation it is)."""
    import ray.data

    wanted_s = {str(k): list(v) for k, v in wanted.items()}
    ds = ray.data.from_items([{"path": f} for f in files], override_num_blocks=max(1, len(files)))
    return ds.map_batches(_read_items, batch_format="pyarrow", batch_size=1, num_cpus=0.5,
                          fn_kwargs={"wanted": wanted_s, "kind": kind, "extras": extras or {},
                                     "decode_json": tokenizer_json, "tag": tag or {}})


def items_dataset(items: list[dict], tag: dict):
    """A Ray Dataset of items built on the driver (word senses, questions), tagged as :func:`read_items`'s."""
    import ray.data

    return ray.data.from_items([{"item": json.dumps({**it, **tag})} for it in items],
                               override_num_blocks=max(1, min(len(items) // 64, 16)))


class ProbeActor:
    """Holds the exported model; each call runs one probe over a batch of items."""

    def __init__(self, model_dir: str, device: str, cfg_dict: dict, probe: str, threads: int):
        import torch

        from kilm_ray.config import config_from_dict
        from kilm_ray.eval.probing import ProbeModel, form_of
        from kilm_ray.model.generation import default_device
        from kilm_ray.model.bart import load_export
        from kilm_ray.method.tokenizer import special_ids

        torch.set_num_threads(max(1, threads))
        cfg = config_from_dict(cfg_dict)
        device = default_device(device)
        model, tokenizer, _ = load_export(storage.local_copy(model_dir), device=device)
        e = cfg.eval
        self.pm = ProbeModel(model, tokenizer, special_ids(tokenizer), form_of(cfg.masking), e.max_new_tokens,
                             e.batch_size, e.num_beams, cfg.data.max_knowledge_tokens, e.no_repeat_ngram_size,
                             e.title_candidates, e.qa_prompt,
                             # room for the answer, as the official code keeps 974 of 1,024 positions
                             int(model.config.max_position_embeddings) - e.max_new_tokens)
        self.cfg, self.probe = cfg, probe

    def __call__(self, batch: pa.Table) -> pa.Table:
        items = [json.loads(s) for s in batch["item"].to_pylist()]
        by_probe: dict[str, list[dict]] = {}
        for it in items:
            by_probe.setdefault(it.get("probe") or self.probe, []).append(it)
        results = [r for probe, group in by_probe.items() for r in self.run(probe, group)]
        return pa.table({"result": pa.array([json.dumps(r) for r in results], pa.large_string())})

    def run(self, probe: str, items: list[dict]) -> list[dict]:
        """One probe over items of it; each result carries the item's id and the probe's name."""
        from kilm_ray.eval import probing
        from kilm_ray.method.masking import MaskingParams

        if probe == "mentions":
            results = probing.mentions(self.pm, items)
        elif probe == "describe":
            results = [{"id": it["id"], **probing.mention_facts(self.pm, it), "describe": r}
                       for it, r in zip(items, probing.describe(self.pm, items))]
        elif probe == "retention":
            params = MaskingParams.from_config(self.cfg.masking, knowledge_prob=0.0)
            results = [{"id": it["id"], **r} for it, r in
                       zip(items, probing.retention(self.pm, items, params, self.cfg.eval.seed))]
        elif probe == "senses":
            results = [{"id": it["id"], "senses": r} for it, r in zip(items, probing.senses(self.pm, items))]
        elif probe == "appos":
            results = [{"id": it["id"], **r} for it, r in zip(items, probing.appos_corpus(self.pm, items))]
        elif probe == "qa":
            results = [{"id": it["id"], **r} for it, r in zip(items, probing.qa(self.pm, items))]
        else:
            raise ValueError(f"unknown probe {probe!r}")
        return [{**r, "probe": probe, "part": it.get("part", probe)} for it, r in zip(items, results)]


def run_probe(ds, probe: Optional[str], model_dir: str, cfg, device: str = "auto") -> list[dict]:
    """The probes over the items of ``ds`` (each item's ``probe``, else ``probe``) in ``eval.actors`` actors
    (one model load each, whatever the number of probes); the results, sorted by item id."""
    e = cfg.eval
    gpus = e.gpus_per_actor
    threads = max(1, int(round(e.cpus_per_actor)))
    resources = {"num_cpus": e.cpus_per_actor, **({"num_gpus": gpus} if gpus > 0 else {})}
    out = ds.map_batches(
        ProbeActor, batch_format="pyarrow", batch_size=max(1, e.batch_size * 4), concurrency=e.actors,
        **resources, fn_constructor_kwargs={"model_dir": model_dir, "device": "cuda" if gpus > 0 else device,
                               "cfg_dict": cfg.to_dict(), "probe": probe, "threads": threads})
    results = [json.loads(r) for b in out.iter_batches(batch_format="pyarrow", batch_size=None)
               for r in b["result"].to_pylist()]
    return sorted(results, key=lambda r: r["id"])
