"""A per-node, memory-mapped copy of a split: what lets every training rank read only the rows it
uses, with memory that does not grow with the corpus.

The node is prepared before training starts (``kilm_ray.train.node_prep``: a Ray task per node, before
the worker group exists, so no rank waits in a collective while another node converts its data). The
builder converts the manifest's parquet shards (local or ``s3://``, downloaded once per node) into
uncompressed Arrow IPC files, one record batch each, and writes the split's ``sample_id`` order as
memory-mapped index arrays; every other process on the node waits on a file lock and then maps the
same files. A rank's resident anonymous memory is then a few arrays per shard, whatever the corpus
size; the rows it touches are page cache, shared by the ranks of the node and reclaimable.

Layout of ``<root>/<dataset key>-<split>/`` (written under ``.tmp-*`` and renamed into place)::

    00000.arrow ...      the shards in manifest order
    sorted_file.npy      int32: for sorted position q, the shard holding it
    sorted_row.npy       int64: its row in that shard
    sorted_sid.npy       int64: its sample_id
    sorted_len.npy       int32: its source length (text + knowledge tokens), for length grouping
    order-<seed>-<epoch>.npy   the epoch permutations (written by the first rank that needs one)

The sorted index is a vectorized, bounded-memory merge (:func:`merged_order`): quantiles of a fixed-size
sample of the shards' (sorted) ids cut the id range into buckets of about ``MERGE_BUCKET`` rows; each
bucket is gathered from every shard with ``searchsorted`` and sorted with numpy. A failed build removes
its temporary directory; one killed outright leaves it to the next builder, which removes it under the
node lock.

No Ray here.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import mmap
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import pyarrow as pa

# Rows per merge bucket (~32 bytes of working memory each) and ids sampled to place the bucket edges.
MERGE_BUCKET = 1 << 20
MERGE_SAMPLE = 1 << 17
# Bumped when the layout changes, so a node never maps a copy in an older layout.
LAYOUT = 2


def default_root() -> Path:
    return Path(os.environ.get("KILM_RAY_CACHE") or Path(tempfile.gettempdir()) / "kilm_ray_cache")


def split_key(manifest: dict, split: str, files: list[str]) -> str:
    """A directory name that changes whenever the dataset or its shards do."""
    digest = hashlib.sha256(json.dumps([manifest.get("run_key"), split, files, LAYOUT]).encode()).hexdigest()[:20]
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


def merged_order(runs: list[np.ndarray], bucket: int = MERGE_BUCKET, sample: int = MERGE_SAMPLE,
                 release: Optional[Callable[[list[int]], None]] = None
                 ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(shard, row, sample_id) chunks in ascending sample_id over shards that are each sorted.

    Vectorized and bounded: the edges of buckets of about ``bucket`` ids are quantiles of ``sample``
    ids drawn from all shards; each bucket takes its slice of every shard (``searchsorted``, one
    cursor per shard) and sorts it with numpy. Memory is one bucket (plus the sample), whatever the
    split's size; ``runs`` may be memory-mapped, and then ``release(shards)`` is called as soon as
    the merge is done reading those shards' pages for now (:func:`release`)."""
    release = release or (lambda shards: None)
    lengths = np.array([len(r) for r in runs], dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return
    n_buckets = max(1, -(-total // bucket))
    edges = _bucket_edges(runs, lengths, n_buckets, sample, release)
    cursor = np.zeros(len(runs), dtype=np.int64)
    for hi in [*edges, None]:
        ends = lengths.copy() if hi is None else np.array(
            [np.searchsorted(r, hi, side="left") if n else 0 for r, n in zip(runs, lengths)], dtype=np.int64)
        counts = ends - cursor
        live = np.flatnonzero(counts)
        if len(live):
            sid = np.concatenate([np.asarray(runs[k][cursor[k]: ends[k]], dtype=np.int64) for k in live])
            shard = np.repeat(live.astype(np.int32), counts[live])
            # row = cursor of the shard + position within its slice
            starts = np.repeat(cursor[live] - np.concatenate([[0], np.cumsum(counts[live])[:-1]]), counts[live])
            row = starts + np.arange(len(sid), dtype=np.int64)
            order = np.argsort(sid, kind="stable")
            release(list(range(len(runs))))  # every shard's searchsorted touched a page or two
            yield shard[order], row[order], sid[order]
        cursor = ends


def _bucket_edges(runs: list[np.ndarray], lengths: np.ndarray, n_buckets: int, sample: int,
                  release: Callable[[list[int]], None]) -> list[int]:
    """``n_buckets - 1`` ascending ids that cut the union of ``runs`` into about equal parts."""
    if n_buckets <= 1:
        return []
    total = int(lengths.sum())
    rng = np.random.default_rng(0)
    picks = np.sort(rng.integers(0, total, size=min(sample, total)))
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    owner = np.searchsorted(starts, picks, side="right") - 1
    drawn = np.empty(len(picks), dtype=np.int64)
    for k in np.unique(owner):  # one gather per shard that was drawn from
        mask = owner == k
        drawn[mask] = np.asarray(runs[k])[picks[mask] - starts[k]]
        release([int(k)])
    drawn.sort()
    cuts = drawn[(np.arange(1, n_buckets) * len(drawn)) // n_buckets]
    return sorted(set(int(c) for c in cuts))


def source_lengths_of(batch: pa.RecordBatch | pa.Table) -> np.ndarray:
    """Text plus knowledge tokens of every row (what decides a sample's padded size), vectorized."""
    ids = batch.column("input_ids")
    knowledge = batch.column("ent_knowledge")
    if isinstance(ids, pa.ChunkedArray):
        ids, knowledge = ids.combine_chunks(), knowledge.combine_chunks()
    text = np.diff(ids.offsets.to_numpy())
    outer = knowledge.offsets.to_numpy()
    inner = knowledge.values.offsets.to_numpy()
    return (text + inner[outer[1:]] - inner[outer[:-1]]).astype(np.int32)


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
    return map_batch_and_mapping(path)[0]


def map_batch_and_mapping(path: Path) -> tuple[pa.RecordBatch, mmap.mmap]:
    """The file's one record batch, zero-copy over a read-only mapping (returned too, for
    :func:`release`)."""
    with open(path, "rb") as handle:
        mapping = _random_access(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ))
    reader = pa.ipc.open_file(pa.BufferReader(pa.py_buffer(mapping)))
    if reader.num_record_batches != 1:
        raise ValueError(f"{path}: expected one record batch, found {reader.num_record_batches}")
    return reader.get_batch(0), mapping


def release(mappings) -> None:
    """Unmap from this process the pages it has read of ``mappings`` (``MADV_DONTNEED``): they stay
    in the node's page cache, and a later read maps them again. What keeps a rank's resident memory
    flat over an epoch of scattered reads (each read of a large-folio page cache maps up to a folio)."""
    if not hasattr(mmap, "MADV_DONTNEED"):
        return
    for mapping in mappings:
        try:
            mapping.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):  # closed, or a platform without it
            pass


def map_array(path: Path) -> np.ndarray:
    """A saved .npy array, memory-mapped read-only for random access."""
    array = np.load(path, mmap_mode="r")
    if getattr(array, "_mmap", None) is not None:
        _random_access(array._mmap)
    return array


def build_split(directory: Path, n_files: int, read_shard: Callable[[int], pa.Table]) -> None:
    """Convert ``n_files`` shards (``read_shard(k)``, one in memory at a time) and index their order.
    Call under the node lock (:func:`node_lock`): leftovers of a builder that was killed are removed
    first, and a build that fails removes what it wrote."""
    if (directory / "sorted_sid.npy").exists():
        return
    for stale in directory.parent.glob(f".tmp-{directory.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = directory.with_name(f".tmp-{directory.name}-{os.getpid()}")
    tmp.mkdir(parents=True)
    try:
        _build(tmp, n_files, read_shard)
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(tmp, directory)  # atomic: a split directory is complete or absent
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _build(tmp: Path, n_files: int, read_shard: Callable[[int], pa.Table]) -> None:
    """Arrow copies of the shards, then the sorted index, each output written as a stream (nothing
    mapped for writing, no array of the split's size in memory)."""
    counts = []
    with open(tmp / "lengths.raw", "wb") as lengths:  # source lengths in shard order, int32
        for k in range(n_files):
            table = read_shard(k)
            write_arrow(table, tmp / f"{k:05d}.arrow")
            source_lengths_of(table).tofile(lengths)
            counts.append(table.num_rows)
            del table
    runs, mappings = [], []
    for k in range(n_files):
        batch, mapping = map_batch_and_mapping(tmp / f"{k:05d}.arrow")
        runs.append(batch.column("sample_id").to_numpy())
        mappings.append(mapping)
    total = int(sum(counts))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    lengths = np.memmap(tmp / "lengths.raw", dtype=np.int32, mode="r", shape=(total,)) if total else np.zeros(0, np.int32)
    columns = (("file", np.int32), ("row", np.int64), ("sid", np.int64), ("len", np.int32))
    outputs = {name: open(tmp / f"sorted_{name}.npy", "wb") for name, _ in columns}
    try:
        for name, dtype in columns:
            np.lib.format.write_array_header_1_0(outputs[name], {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                                 "fortran_order": False, "shape": (total,)})
        for shard, row, sid in merged_order(runs, release=lambda shards: release([mappings[k] for k in shards])):
            shard.tofile(outputs["file"])
            row.tofile(outputs["row"])
            sid.tofile(outputs["sid"])
            np.asarray(lengths[offsets[shard] + row], dtype=np.int32).tofile(outputs["len"])
            release([lengths._mmap] if getattr(lengths, "_mmap", None) is not None else [])
    finally:
        for handle in outputs.values():
            handle.close()
    del lengths
    (tmp / "lengths.raw").unlink()


def cached_array(path: Path, lock: Path, make: Callable[[], np.ndarray]) -> Path:
    """``make()`` saved once per node at ``path`` (the first process that needs it computes it under
    ``lock``); returns the path. Files are never removed here: other runs on the node (or this run
    resumed from an earlier epoch) may still read them; they are 8 bytes a sample on the disk."""
    if not path.exists():
        with node_lock(lock):
            if not path.exists():
                tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
                try:
                    with open(tmp, "wb") as handle:
                        np.save(handle, make())
                    os.replace(tmp, path)
                finally:
                    tmp.unlink(missing_ok=True)
    return path


def read_rows(path: Path, start: int, stop: int) -> np.ndarray:
    """Rows ``[start, stop)`` of a saved 1-D .npy array, read (not mapped): the caller holds a copy of
    what it asked for and nothing else, so reading slice after slice of large arrays leaves no pages
    in its resident memory."""
    with open(path, "rb") as handle:
        major, _ = np.lib.format.read_magic(handle)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(handle)
        start, stop = max(0, start), min(int(shape[0]), stop)
        handle.seek(handle.tell() + start * dtype.itemsize)
        return np.fromfile(handle, dtype=dtype, count=max(0, stop - start))
