"""Which mentions and chunks an evaluation reads: a seeded random sample across the whole split.

Every mention (a chunk's ``entity``-th linked entity, the first ``data.max_eval_entities`` of a chunk)
gets a key, a keyed hash of ``(seed, sample_id, entity)``; the sample of ``k`` is the ``k`` smallest
keys (bottom-k: uniform over the split's mentions, spread over its articles, and the same whatever the
shard layout or the number of tasks). Chunks are sampled the same way by ``(seed, sample_id)``.
``k = 0`` takes everything, in key order.

The pure functions are here; :func:`sample_split` runs them as a Ray Data map over the split's shards
(each task keeps its own bottom-k, the driver merges them with a heap of ``k``).
"""

from __future__ import annotations

import hashlib
import heapq
import json
from typing import Any, Iterable, Optional

import pyarrow as pa

from kilm_ray import storage


def mention_key(seed: int, sample_id: int, entity: int) -> int:
    digest = hashlib.blake2b(f"{int(seed)}:{int(sample_id)}:{int(entity)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1  # fits an int64


def chunk_key(seed: int, sample_id: int) -> int:
    return mention_key(seed, sample_id, -1)


def bottom_k(rows: Iterable[dict], k: int) -> list[dict]:
    """The ``k`` rows with the smallest ``key`` (all rows when ``k`` is 0), in key order."""
    if k <= 0:
        return sorted(rows, key=lambda r: r["key"])
    return heapq.nsmallest(k, rows, key=lambda r: r["key"])


def mention_candidates(batch: pa.Table, seed: int, max_entities: int, k: int, decode) -> list[dict]:
    """The bottom-k mentions of a batch of chunk rows: key, sample id, entity index, article, title and
    anchor text (``decode`` turns token ids into text)."""
    sids = batch.column("sample_id").to_pylist()
    counts = [min(len(t), max_entities) for t in batch.column("ent_title").to_pylist()]
    keyed = [(mention_key(seed, sid, j), i, j) for i, (sid, n) in enumerate(zip(sids, counts)) for j in range(n)]
    keyed = sorted(keyed)[:k] if k > 0 else keyed
    out = []
    for key, i, j in keyed:
        ids = batch.column("input_ids")[i].values.to_numpy()
        start, end = batch.column("ent_start")[i][j].as_py(), batch.column("ent_end")[i][j].as_py()
        out.append({"key": key, "sample_id": sids[i], "entity": j, "article": batch.column("article")[i].as_py(),
                    "title": batch.column("ent_title")[i][j].as_py(), "surface": decode(ids[start:end].tolist()).strip()})
    return out


def chunk_candidates(batch: pa.Table, seed: int, k: int) -> list[dict]:
    rows = [{"key": chunk_key(seed, sid), "sample_id": sid, "article": art}
            for sid, art in zip(batch.column("sample_id").to_pylist(), batch.column("article").to_pylist())]
    return bottom_k(rows, k)


def shard_entries(manifest: dict, split: str) -> list[dict]:
    """The manifest's shard records of ``split``: path (relative to the shard directory), rows, sample-id range."""
    return list(manifest["files"].get(split, []))


def shards_holding(entries: list[dict], sample_ids: Iterable[int]) -> list[dict]:
    """The shards whose sample-id range holds one of ``sample_ids`` (the others need not be read)."""
    ids = sorted({int(s) for s in sample_ids})
    import bisect

    out = []
    for e in entries:
        at = bisect.bisect_left(ids, int(e["min_sample_id"]))
        if at < len(ids) and ids[at] <= int(e["max_sample_id"]):
            out.append(e)
    return out


# ----------------------------------------------------------------------------------------------
# The Ray layer
# ----------------------------------------------------------------------------------------------


MENTION_COLUMNS = ["sample_id", "article", "input_ids", "ent_start", "ent_end", "ent_title"]


def _sample_batch(batch: pa.Table, what: str, seed: int, k: int, max_entities: int,
                  tokenizer_json: Optional[str]) -> pa.Table:
    import pyarrow.parquet as pq

    decode = None
    if what == "mentions":
        from kilm_ray.method.tokenizer import CorpusTokenizer

        decode = CorpusTokenizer(tokenizer_json).decode
    kept: list[dict] = []
    for uri in batch["path"].to_pylist():
        fs, path = storage.resolve(uri)
        with fs.open_input_file(path) as f:
            for chunk in pq.ParquetFile(f).iter_batches(
                    batch_size=4096, columns=MENTION_COLUMNS if what == "mentions" else ["sample_id", "article"]):
                table = pa.Table.from_batches([chunk])
                found = (mention_candidates(table, seed, max_entities, k, decode) if what == "mentions"
                         else chunk_candidates(table, seed, k))
                kept = bottom_k(kept + found, k)
    return pa.table({"rows": [json.dumps(kept)]})


def sample_split(files: list[str], what: str, seed: int, k: int, max_entities: int = 10,
                 tokenizer_json: Optional[str] = None) -> list[dict]:
    """The seeded sample of ``k`` mentions (``what="mentions"``) or chunks (``"chunks"``) of the shards
    ``files``, in key order: one Ray Data task per shard, the driver merging k at a time."""
    import ray.data

    if not files:
        return []
    ds = ray.data.from_items([{"path": f} for f in files], override_num_blocks=len(files))
    parts = ds.map_batches(_sample_batch, batch_format="pyarrow", batch_size=1, num_cpus=0.5,
                           fn_kwargs={"what": what, "seed": seed, "k": k, "max_entities": max_entities,
                                      "tokenizer_json": tokenizer_json})
    kept: list[dict] = []
    for batch in parts.iter_batches(batch_format="pyarrow", batch_size=None):
        for blob in batch["rows"].to_pylist():
            kept = bottom_k(kept + json.loads(blob), k)
    return kept


def group_of(title_row: Optional[dict]) -> str:
    """seen: the entity's knowledge was in training (a training mention links it with knowledge)."""
    return "seen" if title_row and int(title_row.get("train_mentions") or 0) > 0 else "unseen"


def describe_selection(mentions: list[dict]) -> dict[str, Any]:
    """How the evaluated mentions spread: mentions, articles, chunks."""
    return {"mentions": len(mentions), "articles": len({m["article"] for m in mentions}),
            "chunks": len({m["sample_id"] for m in mentions})}
