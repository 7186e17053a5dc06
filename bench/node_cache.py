"""The node's copy of a split (``kilm_ray.store.node_cache``) at scale (issue 22): build time and peak memory
of the builder at several sizes, and a training rank's memory across epochs.

Synthetic train splits in the preprocessing format (parquet shards of 8192 rows whose sample ids
are hash-distributed, so every shard spans the whole id range and the merge is a real k-way merge;
short rows, so 16 M rows fit this machine's disk) are written with vectorized pyarrow. Then, each in
a fresh process:

- ``build``: ``SampleStore.load`` of a split no process has copied yet (what the per-node task of
  ``kilm_ray.train.node_prep`` runs): wall time and peak RSS (VmHWM);
- ``merge``: the index merge alone over the copied shards' ids, vectorized (today) and the previous
  heap merge (``heap_merge`` below, the old code kept only as the baseline), same run;
- ``epochs`` (largest size only): a rank of 32 that runs a few steps (masking and collation
  included) in each of 10 epochs, and its memory after each epoch: RssAnon (its own), RssFile
  (mapped page cache, shared by the node's ranks and reclaimable), VmRSS.

    .venv/bin/python bench/node_cache.py --sizes 1000000 4000000 16000000
"""

from __future__ import annotations

import argparse
import heapq
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import save  # noqa: E402

ROWS_PER_SHARD = 8192
SPECIAL = {"bos": 0, "pad": 1, "eos": 2, "mask": 50264, "ent": 50265, "ent_end": 50266, "desc": 50267,
           "desc_end": 50268, "sep": 50269}


def _status() -> dict:
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


def _lists(rng, n: int, lo: int, hi: int, dtype, low_value: int = 3, high_value: int = 50_000):
    import pyarrow as pa

    lengths = rng.integers(lo, hi, n)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    values = rng.integers(low_value, high_value, int(offsets[-1]), dtype=dtype)
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values)), lengths


def write_dataset(root: Path, n_rows: int, seed: int = 0) -> float:
    """A committed dataset of ``n_rows`` train chunks; returns the parquet MB."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    n_shards = max(1, -(-n_rows // ROWS_PER_SHARD))
    sids = rng.permutation(n_rows * 4)[:n_rows].astype(np.int64) * 7 + 11  # unique, spread out
    shard_of = rng.integers(0, n_shards, n_rows)  # hash partitioning: every shard spans the id range
    order = np.argsort(shard_of, kind="stable")
    bounds = np.searchsorted(shard_of[order], np.arange(n_shards + 1))
    (root / "shards/k/train").mkdir(parents=True, exist_ok=True)
    files = []
    for k in range(n_shards):
        ids = np.sort(sids[order[bounds[k]: bounds[k + 1]]])
        n = len(ids)
        if not n:
            continue
        input_ids, text_lengths = _lists(rng, n, 16, 64, np.int32)
        n_ent = rng.integers(0, 3, n)
        ent_off = np.concatenate([[0], np.cumsum(n_ent)]).astype(np.int64)
        m = int(ent_off[-1])
        starts = (rng.integers(0, 8, m) * 2).astype(np.int32)
        knowledge_lists, _ = _lists(rng, m, 4, 12, np.int32)
        table = pa.table({
            "sample_id": ids, "article": pa.array(np.char.add("p", (ids // 100).astype(str))),
            "chunk_index": (ids % 100).astype(np.int32), "text": pa.array(np.full(n, "t"), pa.large_string()),
            "input_ids": input_ids,
            "ent_start": pa.LargeListArray.from_arrays(pa.array(ent_off), pa.array(starts)),
            "ent_end": pa.LargeListArray.from_arrays(pa.array(ent_off), pa.array(starts + 2)),
            "ent_title": pa.LargeListArray.from_arrays(pa.array(ent_off), pa.array(np.full(m, "E"), pa.string())),
            "ent_source": pa.LargeListArray.from_arrays(pa.array(ent_off), pa.array(np.full(m, "t"), pa.string())),
            "ent_knowledge": pa.LargeListArray.from_arrays(pa.array(ent_off), knowledge_lists),
        })
        name = f"train/part-{k:06d}.parquet"
        pq.write_table(table, root / "shards/k" / name)
        files.append({"path": name, "rows": n, "min_sample_id": int(ids[0]), "max_sample_id": int(ids[-1])})
    manifest = {"format": 1, "run_key": f"synthetic-{n_rows}-{seed}", "special_ids": SPECIAL, "shards": "shards/k",
                "files": {"train": files, "valid": [], "test": []}, "samples": {"train": n_rows}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return sum(f.stat().st_size for f in root.rglob("*.parquet")) / 2**20


def heap_merge(runs):
    """The previous merge (baseline only): a Python k-way heap merge, one tuple per row."""
    chunk = 65_536

    def entries(k):
        run = runs[k]
        for start in range(0, len(run), chunk):
            for offset, sid in enumerate(np.asarray(run[start: start + chunk]).tolist()):
                yield sid, k, start + offset

    buffer = []
    for entry in heapq.merge(*(entries(k) for k in range(len(runs)))):
        buffer.append(entry)
        if len(buffer) == chunk:
            yield buffer
            buffer = []
    if buffer:
        yield buffer


def build_process(data: str, cache: str) -> dict:
    from kilm_ray.store.loader import SampleStore

    started = time.perf_counter()
    store = SampleStore.load(data, "train", cache)
    seconds = time.perf_counter() - started
    copy_mb = sum(f.stat().st_size for f in store.directory.iterdir()) / 2**20
    return {"build_s": seconds, "rows": len(store), "copy_mb": copy_mb, **_status()}


def merge_process(directory: str, which: str) -> dict:
    from kilm_ray.store.node_cache import map_batch_and_mapping, merged_order, release

    files = sorted(Path(directory).glob("*.arrow"))
    runs, mappings = [], []
    for f in files:
        batch, mapping = map_batch_and_mapping(f)
        runs.append(batch.column("sample_id").to_numpy())
        mappings.append(mapping)
    started = time.perf_counter()
    n = 0
    merge = (merged_order(runs, release=lambda shards: release([mappings[k] for k in shards]))
             if which == "vectorized" else heap_merge(runs))
    for part in merge:
        n += len(part[0]) if which == "vectorized" else len(part)
    return {"merge_s": time.perf_counter() - started, "rows": n, "shards": len(runs), **_status()}


def epochs_process(data: str, cache: str, epochs: int, steps_per_epoch: int) -> dict:
    from kilm_ray.store.loader import BatchPlan, SampleStore, StepDataset, special_ids_of
    from kilm_ray.method.masking import MaskingParams

    store = SampleStore.load(data, "train", cache)
    plan = BatchPlan(len(store), 8192, 8, 32, epochs, seed=0, order_source=store.order_slice)
    dataset = StepDataset(store, plan, 0, 0, MaskingParams(0.3, 3.0, 1.0), special_ids_of(data), 1.0,
                          group_by_length=True)
    rows = []
    for epoch in range(epochs):
        first = epoch * plan.steps_per_epoch
        started = time.perf_counter()
        for k in range(steps_per_epoch):
            dataset[first + k * (plan.steps_per_epoch // steps_per_epoch)]
        rows.append({"epoch": epoch, "steps_s": (time.perf_counter() - started) / steps_per_epoch, **_status()})
    return {"epochs": rows, "order_files_on_disk": len(list(store.directory.glob("order-*.npy")))}


def _run(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 4_000_000, 16_000_000])
    parser.add_argument("--work", default="/tmp/kilm_node_cache_bench")
    parser.add_argument("--name", default="node_cache", help="result file name (bench/results/NAME.json)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--steps-per-epoch", type=int, default=3)
    parser.add_argument("--heap-max", type=int, default=16_000_000, help="largest size the old heap merge runs at")
    parser.add_argument("--build", nargs=2, metavar=("DATA", "CACHE"))
    parser.add_argument("--merge", nargs=2, metavar=("DIR", "WHICH"))
    parser.add_argument("--epochs-of", nargs=2, metavar=("DATA", "CACHE"))
    args = parser.parse_args()
    if args.build:
        print(json.dumps(build_process(*args.build)))
        return
    if args.merge:
        print(json.dumps(merge_process(*args.merge)))
        return
    if args.epochs_of:
        print(json.dumps(epochs_process(*args.epochs_of, args.epochs, args.steps_per_epoch)))
        return
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    rows = []
    for n in args.sizes:
        data, cache = work / f"data-{n}", work / f"cache-{n}"
        started = time.perf_counter()
        parquet_mb = write_dataset(data, n)
        print(f"{n} rows: generated in {time.perf_counter() - started:.0f} s, {parquet_mb:.0f} MB parquet",
              file=sys.stderr)
        row = {"rows": n, "parquet_mb": round(parquet_mb, 1), "build": _run("--build", str(data), str(cache))}
        (copy,) = [p for p in cache.iterdir() if p.is_dir()]
        row["merge_vectorized"] = _run("--merge", str(copy), "vectorized")
        if n <= args.heap_max:
            row["merge_heap"] = _run("--merge", str(copy), "heap")
        print(json.dumps(row), file=sys.stderr)
        rows.append(row)
        if n == args.sizes[-1]:
            epochs = _run("--epochs-of", str(data), str(cache), "--epochs", str(args.epochs),
                          "--steps-per-epoch", str(args.steps_per_epoch))
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
    first, last = rows[0], rows[-1]
    per_row_s = last["build"]["build_s"] / last["rows"]
    summary = {
        "build_s_per_million_rows": {r["rows"]: r["build"]["build_s"] / r["rows"] * 1e6 for r in rows},
        "peak_rss_mb": {r["rows"]: r["build"]["VmHWM"] for r in rows},
        "peak_rss_ratio_largest_vs_smallest": last["build"]["VmHWM"] / first["build"]["VmHWM"],
        "merge_heap_vs_vectorized": {r["rows"]: r["merge_heap"]["merge_s"] / r["merge_vectorized"]["merge_s"]
                                     for r in rows if "merge_heap" in r},
        "build_s_at_100M_rows_linear": per_row_s * 100e6,
        "copy_mb_per_million_rows": last["build"]["copy_mb"] / last["rows"] * 1e6,
        "rank_rss_anon_mb_by_epoch": [e["RssAnon"] for e in epochs["epochs"]],
        "rank_rss_file_mb_by_epoch": [e["RssFile"] for e in epochs["epochs"]],
    }
    save(args.name, {"sizes": args.sizes, "rows": rows, "epochs": epochs, "summary": summary})
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
