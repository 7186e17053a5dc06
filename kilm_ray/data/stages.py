"""Saved stages: what a stage wrote is what its writers reported when they completed.

A stage writes parquet files through :class:`TablesSink`, a Ray Data ``Datasink``: each write task
writes its files under a temporary name and renames them into place (on S3, where a PUT is atomic, to
the final name directly), with a name no other attempt uses, and returns the list. Ray Data hands the
returns of the write tasks that *completed* to ``on_write_complete``; that list is the stage. A task that
died after writing (a lost node, a killed worker) and was run again leaves a file nobody lists; a
half-written file is never under a final name. The stage's record (``<name>.json``: files, row counts,
sizes and the stage's summary) is written last, atomically: a stage with a record is done and a rerun
reads it back instead of redoing it; one without is cleared and redone.

Stages live under ``out/_work/<run key>/``; stages that hold token ids live under
``tok-<tokenizer hash>/`` below it, so a resumed run never mixes the ids of two tokenizers.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import pyarrow as pa
from ray.data import Datasink

from kilm_ray import storage
from kilm_ray.cluster import release_freed_memory

log = logging.getLogger("kilm_ray.pipeline")

# Fault injection for the tests (never set in production):
# - the first write task (in the whole cluster) that can create this marker file dies right after its
#   files are in place, before it reports them (a node lost at the worst moment);
KILL_AFTER_WRITE_ENV = "KILM_RAY_TEST_KILL_AFTER_WRITE"
# - the driver waits this many seconds between writing the shards and the commit (a window in which
#   the test kills it during the shard stage).
HOLD_BEFORE_COMMIT_ENV = "KILM_RAY_TEST_HOLD_BEFORE_COMMIT"


def hold_before_commit() -> None:
    seconds = float(os.environ.get(HOLD_BEFORE_COMMIT_ENV) or 0)
    if seconds:
        import time

        log.info("holding %.0f s before the commit (%s)", seconds, HOLD_BEFORE_COMMIT_ENV)
        time.sleep(seconds)


def write_atomic(uri: str, write: Callable[[Any, str], None]) -> None:
    """``write(filesystem, path)`` to ``uri`` so that a reader sees the whole file or none: a temporary
    name and a rename on a local disk; on object stores the final name (a PUT is atomic)."""
    fs, path = storage.resolve(uri)
    storage.make_parent(fs, path)
    if storage.is_remote(uri):
        write(fs, path)
        return
    tmp = f"{os.path.dirname(path)}/.{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        write(fs, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes_atomic(uri: str, data) -> None:
    def write(fs, path: str) -> None:
        with fs.open_output_stream(path, compression=None) as f:
            f.write(data)

    write_atomic(uri, write)


def write_parquet_atomic(uri: str, rows: pa.Table) -> int:
    """Write ``rows`` as one parquet file, atomically; returns its size in bytes."""
    import pyarrow.parquet as pq

    buffer = pa.BufferOutputStream()
    pq.write_table(rows, buffer)
    data = buffer.getvalue()
    write_bytes_atomic(uri, data)
    return data.size


def _maybe_die_after_write() -> None:
    marker = os.environ.get(KILL_AFTER_WRITE_ENV)
    if not marker:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, f"{os.getpid()}\n".encode())
    os.close(fd)
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class WriteReport:
    """What one write task wrote: files per table ``{"path", "rows", "bytes"}`` and its counts."""

    files: dict[str, list[dict]] = field(default_factory=dict)
    counts: list[dict] = field(default_factory=list)


class TablesSink(Datasink):
    """Writes what a stage computes. ``split(block) -> ({table: rows}, counts)`` turns the rows a write
    task receives into the tables it writes (``{table}/part-{hint}{attempt}-{i}.parquet``, at most
    ``max_rows`` rows a file) and a JSON-able summary; ``describe(table, rows)`` adds fields to a file's
    entry (``name_hint``: the ``hint`` of its name). After the write, ``reports`` holds what every
    completed task reported."""

    def __init__(self, directory: str, split: Callable, min_rows: Optional[int] = None,
                 max_rows: Optional[int] = None, describe: Optional[Callable[[str, pa.Table], dict]] = None,
                 batch_rows: Optional[int] = None):
        self.directory, self.split, self.reports = directory, split, []
        self._min_rows, self.max_rows, self.describe, self.batch_rows = min_rows, max_rows, describe, batch_rows

    @property
    def min_rows_per_write(self) -> Optional[int]:
        return self._min_rows

    def get_name(self) -> str:
        return f"Write[{self.directory.rstrip('/').rsplit('/', 1)[-1]}]"

    def write(self, blocks: Iterable, ctx) -> WriteReport:
        from ray.data.block import BlockAccessor

        report = WriteReport()
        attempt = uuid.uuid4().hex[:12]  # no other attempt of any task writes these names
        parts: dict[str, list[pa.Table]] = {}
        written: dict[str, int] = {}

        def flush(name: str, final: bool) -> None:
            rows = pa.concat_tables(parts.pop(name, []) or [pa.table({})])
            for part in _slices(rows, self.max_rows):
                if not final and self.max_rows and part.num_rows < self.max_rows:
                    parts[name] = [part]  # a remainder: wait for more rows
                    return
                extra = self.describe(name, part) if self.describe else {}
                path = f"{name}/part-{extra.pop('name_hint', '')}{attempt}-{written.get(name, 0)}.parquet"
                written[name] = written.get(name, 0) + 1
                size = write_parquet_atomic(storage.join(self.directory, path), part)
                report.files.setdefault(name, []).append({"path": path, "rows": part.num_rows, "bytes": size,
                                                          **extra})

        for block in blocks:  # Ray Data bundles blocks up to min_rows_per_write: one file per table
            # ``split`` sees at most batch_rows rows at a time: Ray Data coalesces a read task's output
            # into blocks of up to 128 MiB (a whole knowledge-base file as Python rows took 1.1 GB).
            for batch in _slices(BlockAccessor.for_block(block).to_arrow(), self.batch_rows):
                tables, counts = self.split(batch)
                report.counts.append(counts)
                for name, rows in tables.items():
                    parts.setdefault(name, []).append(rows)
                    if self.max_rows and sum(p.num_rows for p in parts[name]) >= self.max_rows:
                        flush(name, final=False)
        for name in list(parts):
            flush(name, final=True)
        _maybe_die_after_write()
        return report

    def on_write_complete(self, write_result) -> None:
        self.reports = list(write_result.write_returns)


def _slices(rows: pa.Table, max_rows: Optional[int]) -> list[pa.Table]:
    if not rows.num_rows:
        return []
    if not max_rows or rows.num_rows <= max_rows:
        return [rows]
    return [rows.slice(i, max_rows) for i in range(0, rows.num_rows, max_rows)]


def merge_reports(reports: list[WriteReport]) -> tuple[dict[str, list[dict]], list[dict]]:
    """The files (per table, sorted by path) and the counts of every completed write task."""
    files: dict[str, list[dict]] = {}
    counts: list[dict] = []
    for report in reports:
        for name, entries in report.files.items():
            files.setdefault(name, []).extend(entries)
        counts.extend(report.counts)
    return {name: sorted(entries, key=lambda e: e["path"]) for name, entries in sorted(files.items())}, counts


class Stage:
    """One saved stage: a directory of files and the record ``<name>.json`` beside it."""

    def __init__(self, parent: str, name: str):
        self.name = name
        self.dir = storage.join(parent, name)
        self.record_uri = storage.join(parent, f"{name}.json")

    def record(self) -> Optional[dict]:
        """The stage's record if it finished (its files, their rows and sizes, its summary)."""
        if not storage.exists(self.record_uri):
            return None
        return json.loads(storage.read_bytes(self.record_uri))

    def clear(self) -> None:
        fs, path = storage.resolve(self.dir)
        fs.delete_dir_contents(path, missing_dir_ok=True)

    def sink(self, split: Callable, **kwargs):
        return TablesSink(self.dir, split, **kwargs)

    def finish(self, sink, summarize: Callable[[list[dict]], dict]) -> dict:
        """Record what ``sink``'s completed writers wrote and ``summarize(counts)``: the stage is done."""
        files, counts = merge_reports(sink.reports)
        return self.finish_with(files, summarize(counts))

    def finish_with(self, files: dict[str, list[dict]], summary: dict) -> dict:
        record = {"files": files, "summary": summary}
        write_bytes_atomic(self.record_uri, json.dumps(record).encode())
        release_freed_memory()  # the stage's refs and results are gone: its peak need not stay
        return record


def stage_files(record: dict, table: str, root: str) -> list[str]:
    return [storage.join(root, f["path"]) for f in record["files"].get(table, [])]


def stage_bytes(record: dict, *tables: str) -> int:
    return sum(f["bytes"] for t in tables for f in record["files"].get(t, []))


class WorkDir:
    """``out/_work/<run key>/``: the saved stages of one run."""

    def __init__(self, out: str, key: str):
        self.root = storage.join(out, "_work", key)

    def stage(self, name: str) -> Stage:
        return Stage(self.root, name)

    def keyed(self, tokenizer_sha256: str) -> "WorkDir":
        """The stages that depend on the tokenizer's ids (knowledge token ids)."""
        sub = WorkDir.__new__(WorkDir)
        sub.root = storage.join(self.root, f"tok-{tokenizer_sha256[:16]}")
        return sub

    def remove(self) -> None:
        """Delete this run's stages (after its commit); the ``_work`` directory too once it is empty."""
        import pyarrow.fs as pafs

        fs, path = storage.resolve(self.root)
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            fs.delete_dir(path)
        parent = path.rsplit("/", 1)[0]
        if not fs.get_file_info(pafs.FileSelector(parent, allow_not_found=True)):
            if fs.get_file_info(parent).type == pafs.FileType.Directory:
                fs.delete_dir(parent)
