"""Training loader memory per rank against corpus size (issue 13).

Writes synthetic KILM datasets (parquet shards + manifest in the preprocessing format, rows shaped
like article-mode chunks: 100-500 text tokens, 0-8 entities with 10-40 knowledge tokens, shards of
pages hash-distributed so their sample-id ranges overlap as preprocessing writes them) at several
sizes, then in a fresh process per size and per loader:

- ``mapped``: today's ``SampleStore`` (the node's memory-mapped copy; its one-off build per node is
  timed in a process of its own, as the first rank of a node does it once per dataset);
- ``in_memory``: the previous loader, which read the whole split into every rank (same rows, same
  order, rebuilt here from pyarrow so the two run in one bench).

Each rank process runs ``--steps`` steps of rank 0 of 2 (global batch 64, micro-batch 8, masking and
collation included) and reports steps/s, peak RSS (VmHWM: anonymous memory plus mapped file pages it
touched) and anonymous RSS at the end (RssAnon: what is the process's own; mapped pages are page
cache shared by a node's ranks and reclaimable).

    .venv/bin/python bench/loader_memory.py --sizes 20000 80000 320000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import save  # noqa: E402

SPECIAL = {"bos": 0, "pad": 1, "eos": 2, "mask": 50264, "ent": 50265, "ent_end": 50266, "desc": 50267,
           "desc_end": 50268, "sep": 50269}
ROWS_PER_SHARD = 4000


def _status() -> dict:
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) / 1024
    return out


def write_dataset(root: Path, n_rows: int, seed: int = 0) -> None:
    """A committed dataset of ``n_rows`` train chunks (train split only)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    n_shards = max(1, n_rows // ROWS_PER_SHARD)
    pages = np.arange(n_rows // 4 + 1)
    shard_of_page = rng.integers(0, n_shards, len(pages))  # hash partitioning: ranges overlap
    files = []
    (root / "shards/k/train").mkdir(parents=True, exist_ok=True)
    sid_all = np.array([p * 10_000 + c for p in pages for c in range(4)][:n_rows], dtype=np.int64)
    shard_all = shard_of_page[sid_all // 10_000]
    for k in range(n_shards):
        sids = np.sort(sid_all[shard_all == k])
        if not len(sids):
            continue
        n = len(sids)
        lengths = rng.integers(100, 500, n)
        ids = [rng.integers(3, 50_000, int(length), dtype=np.int32) for length in lengths]
        n_ent = rng.integers(0, 9, n)
        starts, ends, know, titles = [], [], [], []
        for length, m in zip(lengths, n_ent):
            pos = np.sort(rng.choice(np.arange(1, int(length) - 4, 4), size=int(m), replace=False)).astype(np.int32)
            starts.append(pos)
            ends.append(pos + 2)
            know.append([rng.integers(3, 50_000, int(rng.integers(10, 40)), dtype=np.int32) for _ in range(m)])
            titles.append([f"Entity {int(x)}" for x in pos])
        table = pa.table({
            "sample_id": sids, "article": [f"Page {s // 10_000}" for s in sids],
            "chunk_index": (sids % 10_000).astype(np.int32),
            "text": pa.array(["word " * int(length) for length in lengths], pa.large_string()),
            "input_ids": pa.array(ids, pa.large_list(pa.int32())),
            "ent_start": pa.array(starts, pa.large_list(pa.int32())),
            "ent_end": pa.array(ends, pa.large_list(pa.int32())),
            "ent_title": pa.array(titles, pa.large_list(pa.string())),
            "ent_source": pa.array([["template"] * len(t) for t in titles], pa.large_list(pa.string())),
            "ent_knowledge": pa.array(know, pa.large_list(pa.large_list(pa.int32()))),
        })
        name = f"train/part-{int(sids[0]):016d}.parquet"
        pq.write_table(table, root / "shards/k" / name)
        files.append({"path": name, "rows": n, "min_sample_id": int(sids[0]), "max_sample_id": int(sids[-1])})
    manifest = {"format": 1, "run_key": f"synthetic-{n_rows}-{seed}", "special_ids": SPECIAL, "shards": "shards/k",
                "files": {"train": sorted(files, key=lambda f: f["min_sample_id"]), "valid": [],
                          "test": []}, "samples": {"train": n_rows}}
    (root / "manifest.json").write_text(json.dumps(manifest))


class InMemoryStore:
    """The previous loader: every rank reads and sorts the whole split (a baseline, not a product)."""

    def __init__(self, data_dir: str):
        import pyarrow as pa
        import pyarrow.parquet as pq

        from kilm_ray.store.loader import STORE_COLUMNS, split_files

        table = pa.concat_tables([pq.read_table(f, columns=STORE_COLUMNS) for f in split_files(data_dir, "train")])
        table = table.sort_by("sample_id").combine_chunks()
        self.sample_ids = table.column("sample_id").to_numpy()
        ids = table.column("input_ids").chunk(0)
        self._ids, self._ids_off = ids.values.to_numpy(), ids.offsets.to_numpy()
        starts = table.column("ent_start").chunk(0)
        self._start, self._ent_off = starts.values.to_numpy(), starts.offsets.to_numpy()
        self._end = table.column("ent_end").chunk(0).values.to_numpy()
        know = table.column("ent_knowledge").chunk(0).values
        self._know, self._know_off = know.values.to_numpy(), know.offsets.to_numpy()
        self.texts = table.column("text")
        self.titles = table.column("ent_title")

    def __len__(self) -> int:
        return len(self.sample_ids)

    def train_example(self, i, seed, epoch, params, sp):
        from kilm_ray.method.masking import Entity, build_train_example

        a, b = self._ent_off[i], self._ent_off[i + 1]
        entities = [Entity(int(self._start[j]), int(self._end[j]), self._know[self._know_off[j]: self._know_off[j + 1]])
                    for j in range(a, b)]
        return build_train_example(self._ids[self._ids_off[i]: self._ids_off[i + 1]], entities,
                                   int(self.sample_ids[i]), seed, epoch, params, sp)


def rank_process(data_dir: str, loader: str, steps: int) -> dict:
    from kilm_ray.store.loader import BatchPlan, SampleStore, StepDataset, special_ids_of
    from kilm_ray.method.masking import MaskingParams

    t0 = time.perf_counter()
    store = SampleStore.load(data_dir, "train") if loader == "mapped" else InMemoryStore(data_dir)
    open_s = time.perf_counter() - t0
    order = store.order_slice if loader == "mapped" else None
    plan = BatchPlan(len(store), 64, 8, 2, epochs=1, seed=0, order_source=order)
    dataset = StepDataset(store, plan, 0, 0, MaskingParams(0.3, 3.0, 1.0), special_ids_of(data_dir), 1.0,
                          group_by_length=loader == "mapped")
    dataset[0]
    t0 = time.perf_counter()
    for k in range(1, steps + 1):
        dataset[k * (plan.steps_per_epoch // (steps + 1))]  # spread over the epoch: touches all of it
    return {"open_s": open_s, "steps_per_s": steps / (time.perf_counter() - t0), **_status()}


def build_process(data_dir: str) -> dict:
    from kilm_ray.store.loader import SampleStore

    t0 = time.perf_counter()
    SampleStore.load(data_dir, "train")
    return {"build_s": time.perf_counter() - t0, **_status()}


def _run(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 80_000, 320_000])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--work", default="/tmp/kilm_loader_bench")
    parser.add_argument("--rank", nargs=2, metavar=("DATA", "LOADER"))
    parser.add_argument("--build", metavar="DATA")
    args = parser.parse_args()
    if args.rank:
        print(json.dumps(rank_process(args.rank[0], args.rank[1], args.steps)))
        return
    if args.build:
        print(json.dumps(build_process(args.build)))
        return
    import os
    import shutil

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    os.environ["KILM_RAY_CACHE"] = str(work / "cache")
    rows = []
    for n in args.sizes:
        data = work / f"data-{n}"
        t0 = time.perf_counter()
        write_dataset(data, n)
        parquet_mb = sum(f.stat().st_size for f in data.rglob("*.parquet")) / 2**20
        print(f"{n} rows: generated in {time.perf_counter() - t0:.0f} s, {parquet_mb:.0f} MB parquet", file=sys.stderr)
        row = {"rows": n, "parquet_mb": round(parquet_mb, 1), "node_build": _run("--build", str(data))}
        for loader in ("mapped", "in_memory"):
            row[loader] = _run("--steps", str(args.steps), "--rank", str(data), loader)
        print(json.dumps(row), file=sys.stderr)
        rows.append(row)
        shutil.rmtree(data, ignore_errors=True)
    first, last = rows[0], rows[-1]
    summary = {loader: {"peak_rss_ratio_largest_vs_smallest": last[loader]["VmHWM"] / first[loader]["VmHWM"],
                        "anon_rss_ratio_largest_vs_smallest": last[loader]["RssAnon"] / first[loader]["RssAnon"],
                        "steps_per_s_ratio_largest_vs_smallest": last[loader]["steps_per_s"] / first[loader]["steps_per_s"]}
               for loader in ("mapped", "in_memory")}
    save("loader_memory", {"sizes": args.sizes, "steps": args.steps, "rows": rows, "summary": summary})
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
