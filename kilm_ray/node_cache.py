"""A per-node, memory-mapped copy of a split: what lets every training rank read only the rows it
uses, with memory that does not grow with the corpus.

The first process on a node that opens a split converts the manifest's parquet shards (local or
``s3://``, downloaded once per node) into uncompressed Arrow IPC files, one record batch each, and
writes the split's ``sample_id`` order as memory-mapped index arrays; every other process on the
node waits on a file lock and then maps the same files. A rank's resident anonymous memory is then
a few arrays per shard, whatever the corpus size; the rows it touches are page cache, shared by the
ranks of the node and reclaimable by the kernel.

Layout of ``<root>/<dataset key>-<split>/`` (written under ``.tmp-*`` and renamed into place)::

    00000.arrow ...      the shards in manifest order
    sorted_file.npy      int32: for sorted position q, the shard holding it
    sorted_row.npy       int64: its row in that shard
    sorted_sid.npy       int64: its sample_id
    order-<seed>-<epoch>.npy   the epoch permutations (written by the first rank that needs one)

No Ray here.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import heapq
import json
import mmap
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa

MERGE_CHUNK = 65_536


def default_root() -> Path:
    return Path(os.environ.get("KILM_RAY_CACHE") or Path(tempfile.gettempdir()) / "kilm_ray_cache")


def split_key(manifest: dict, split: str, files: list[str]) -> str:
    """A directory name that changes whenever the dataset or its shards do."""
    digest = hashlib.sha256(json.dumps([manifest.get("run_key"), split, files]).encode()).hexdigest()[:20]
    return f"{digest}-{split}"


@contextlib.contextmanager
def node_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between the processes of one node (released if the holder dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def merged_order(runs: list[np.ndarray]) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(shard, row, sample_id) chunks in ascending sample_id over shards that are each sorted.

    Shards whose id ranges do not overlap are concatenated; overlapping ones go through a k-way
    merge, so memory stays at one chunk per shard rather than the whole split."""
    spans = sorted((int(r[0]), int(r[-1]), k) for k, r in enumerate(runs) if len(r))
    disjoint = all(a[1] < b[0] for a, b in zip(spans, spans[1:]))
    if disjoint:
        for _, _, k in spans:
            for start in range(0, len(runs[k]), MERGE_CHUNK):
                sids = np.asarray(runs[k][start: start + MERGE_CHUNK], dtype=np.int64)
                yield np.full(len(sids), k, np.int32), np.arange(start, start + len(sids), dtype=np.int64), sids
        return

    def entries(k: int):
        run = runs[k]
        for start in range(0, len(run), MERGE_CHUNK):
            for offset, sid in enumerate(np.asarray(run[start: start + MERGE_CHUNK]).tolist()):
                yield sid, k, start + offset

    buffer: list[tuple[int, int, int]] = []
    for entry in heapq.merge(*(entries(k) for k in range(len(runs)))):
        buffer.append(entry)
        if len(buffer) == MERGE_CHUNK:
            yield _columns(buffer)
            buffer = []
    if buffer:
        yield _columns(buffer)


def _columns(entries: list[tuple[int, int, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    sid, shard, row = zip(*entries)
    return np.array(shard, np.int32), np.array(row, np.int64), np.array(sid, np.int64)


def write_arrow(table: pa.Table, path: Path) -> None:
    """One uncompressed record batch: zero-copy numpy views once mapped."""
    table = table.combine_chunks()
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=max(table.num_rows, 1))


def _random_access(mapping: mmap.mmap) -> mmap.mmap:
    """Training reads scattered rows: the hint stops page faults from reading ahead neighbours no one
    asked for. (Mapped page-cache pages still count in a process's RSS: on kernels that cache files in
    large folios a 1 kB read maps up to a whole folio; those pages are shared and reclaimable.)"""
    if hasattr(mapping, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        mapping.madvise(mmap.MADV_RANDOM)
    return mapping


def map_batch(path: Path) -> pa.RecordBatch:
    with open(path, "rb") as handle:
        mapping = _random_access(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ))
    reader = pa.ipc.open_file(pa.BufferReader(pa.py_buffer(mapping)))
    if reader.num_record_batches != 1:
        raise ValueError(f"{path}: expected one record batch, found {reader.num_record_batches}")
    return reader.get_batch(0)


def map_array(path: Path) -> np.ndarray:
    """A saved .npy array, memory-mapped read-only for random access."""
    array = np.load(path, mmap_mode="r")
    if getattr(array, "_mmap", None) is not None:
        _random_access(array._mmap)
    return array


def build_split(directory: Path, n_files: int, read_shard: Callable[[int], pa.Table]) -> None:
    """Convert ``n_files`` shards (``read_shard(k)``, one in memory at a time) and index their order."""
    if (directory / "sorted_sid.npy").exists():
        return
    tmp = directory.with_name(f".tmp-{directory.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    total = 0
    for k in range(n_files):
        table = read_shard(k)
        write_arrow(table, tmp / f"{k:05d}.arrow")
        total += table.num_rows
        del table
    runs = [map_batch(tmp / f"{k:05d}.arrow").column("sample_id").to_numpy() for k in range(n_files)]
    arrays = {name: np.lib.format.open_memmap(tmp / f"sorted_{name}.npy", mode="w+", dtype=dtype, shape=(total,))
              for name, dtype in (("file", np.int32), ("row", np.int64), ("sid", np.int64))}
    at = 0
    for shard, row, sid in merged_order(runs):
        n = len(sid)
        arrays["file"][at: at + n], arrays["row"][at: at + n], arrays["sid"][at: at + n] = shard, row, sid
        at += n
    for array in arrays.values():
        array.flush()
    del arrays, runs
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)  # atomic: a split directory is complete or absent


def cached_array(path: Path, lock: Path, make: Callable[[], np.ndarray]) -> np.ndarray:
    """``make()`` saved once per node at ``path`` and memory-mapped by everyone."""
    if not path.exists():
        with node_lock(lock):
            if not path.exists():
                tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
                with open(tmp, "wb") as handle:
                    np.save(handle, make())
                os.replace(tmp, path)
    return map_array(path)

